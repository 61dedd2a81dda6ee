"""layerdb's engine: the library.  It never prints; api.LayerDB is the front door.

The modules at this level are the foundation (store, chunks, content, replay, tree,
reader, refs, paths, errors, kinds, log): they import only each other.  Above them,
one subpackage per subsystem, following the data flow: ingest, registry, build,
output, audit, containers, upkeep, explore.  Nothing below api.py imports it.
Logging goes through layerdb.engine.log (structlog, imported lazily).
"""

__version__ = "0.1.0"
