"""layerdb's engine: the library.  It never prints; see layerdb.engine.api.LayerDB."""

__version__ = "0.1.0"
