"""layerdb's engine: the library.  It never prints; see layerdb.engine.api.LayerDB."""

import structlog as _structlog

__version__ = "0.1.0"

if not _structlog.is_configured():
    # A library must not print: unless the application configures structlog
    # (the CLI does), engine log events go to the standard `logging` module,
    # which by default shows warnings and errors only, on stderr.
    _structlog.configure(
        processors=[
            _structlog.processors.add_log_level,
            _structlog.processors.KeyValueRenderer(key_order=["event"]),
        ],
        logger_factory=_structlog.stdlib.LoggerFactory(),
        wrapper_class=_structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
