"""layerdb's engine: the library.  It never prints; see layerdb.engine.api.LayerDB.

Logging goes through layerdb.engine.log (structlog, imported lazily).
"""

__version__ = "0.1.0"
