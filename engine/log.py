"""Logging for the engine: structlog, imported only when something is logged.

structlog costs ~50 ms to import, a third of a small command's budget, and
most commands log nothing at the default level.  So engine modules get a
light logger that checks the level first and imports structlog on the first
event that passes.  An application sets the level and its structlog setup
with configure(); without it, events at WARNING and above go to the standard
`logging` module (a library must not print).
"""

from __future__ import annotations

from typing import Any, Callable

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40  # the standard logging levels (not imported: start-up time)
_state: dict[str, Any] = {"level": WARNING, "setup": None, "ready": False}


def configure(level: int, setup: Callable[[], None] | None) -> None:
    """Set the threshold, and what sets up structlog once it is needed."""
    _state.update(level=level, setup=setup, ready=False)


def _default_setup() -> None:
    import structlog

    if structlog.is_configured():
        return
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.KeyValueRenderer(key_order=["event"])],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


class Logger:
    def __init__(self, name: str):
        self.name = name

    def _emit(self, level: int, method: str, event: str, **kw: Any) -> None:
        if level < _state["level"]:
            return
        import structlog

        if not _state["ready"]:
            (_state["setup"] or _default_setup)()
            _state["ready"] = True
        getattr(structlog.get_logger(self.name), method)(event, **kw)

    def debug(self, event: str, **kw: Any) -> None:
        self._emit(DEBUG, "debug", event, **kw)

    def info(self, event: str, **kw: Any) -> None:
        self._emit(INFO, "info", event, **kw)

    def warning(self, event: str, **kw: Any) -> None:
        self._emit(WARNING, "warning", event, **kw)

    def error(self, event: str, **kw: Any) -> None:
        self._emit(ERROR, "error", event, **kw)


def get_logger(name: str) -> Logger:
    return Logger(name)
