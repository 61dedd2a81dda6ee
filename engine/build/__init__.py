"""Builds: Dockerfiles to images (`layerdb build`).

dockerfile (the parser), shell (substitution) and mounts (RUN --mount) need nothing
else; context and ignore read the build context; runtime runs a RUN; cache keeps the
materialised lower dirs; the builder may import the rest of the engine.
"""
