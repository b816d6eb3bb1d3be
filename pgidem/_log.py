"""structlog setup: one JSON object per line when stderr is not a terminal, pretty when it is."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_configured = False


class _LineLogger:
    """structlog's output: each line goes out in one write, under the stdlib handler's lock.

    structlog's PrintLogger prints the message and its newline as two writes under a lock of its
    own, so a line from the stdlib handler (psycopg_pool's reconnect warnings, from the pool's
    thread) could land between them and two JSON objects shared a line. Here both kinds of line
    take the same lock and each is written whole.
    """

    def __init__(self, handler: logging.StreamHandler[TextIO]) -> None:
        self._handler = handler

    def msg(self, message: str) -> None:
        handler = self._handler
        handler.acquire()
        try:
            handler.stream.write(message + "\n")
            handler.stream.flush()
        finally:
            handler.release()

    log = debug = info = warn = warning = error = err = critical = exception = fatal = msg


def configure(level: str = "INFO", json: bool | None = None) -> None:
    """Configure structlog for pgidem's commands (libraries embedding pgidem configure their own).

    Args:
        level: the lowest level to print.
        json: force JSON (True) or console (False) output; None decides by whether stderr is a
            terminal.
    """
    global _configured
    if json is None:
        json = not sys.stderr.isatty()
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    # Libraries' stdlib logging (psycopg_pool's reconnect warnings...) goes out in the same
    # format, so that a JSON log stays one JSON object per line.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=renderer,
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level]),
        logger_factory=lambda *_args: _LineLogger(handler),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(max(logging.WARNING, logging.getLevelNamesMapping()[level]))
    _configured = True


def get(**bound: Any) -> Any:
    """Return a pgidem logger with the given keys bound."""
    return structlog.get_logger("pgidem").bind(**bound)
