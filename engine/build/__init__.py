"""Builds: Dockerfiles to images (`layerdb build`).

dockerfile (the parser) and shell (substitution) need nothing else; context
and ignore read the build context; the builder may import the rest of the engine.
"""
