"""Logging setup, called once by the CLI; library modules only call `structlog.get_logger()`.

JSON lines rendered by orjson when not on a TTY (or `format = "json"`), readable console output
on a TTY. Events are dotted names (`run.started`, `partition.failed`) with keyword fields;
`snapshot_id`, `account_id` and `region` come from contextvars.

The libraries' own warnings and errors (botocore, aiobotocore, aiohttp, asyncio log through the
standard library) become `library.log` events of the same stream, one line each, at the same
level filter: without this, Python printed them to stderr as bare text with a traceback per
record (aiobotocore logs a failed credential refresh so, once per request). Their exception is
one redacted line, never a traceback; their records below WARNING (botocore's debug records
quote signed headers) are never shown.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import orjson
import structlog

from .errors import redact

__all__ = ["configure_logging"]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(
    *,
    level: str = "info",
    fmt: Literal["json", "console", "auto"] = "auto",
    stream: TextIO | None = None,
) -> None:
    """Configure structlog for the process (logs go to `stream`, default stderr)."""
    stream = stream or sys.stderr
    as_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if as_json:
        processors: list[structlog.typing.Processor] = [
            *shared,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ]
        factory: structlog.typing.WrappedLogger = structlog.BytesLoggerFactory(
            file=stream.buffer if hasattr(stream, "buffer") else None
        )
    else:
        processors = [*shared, structlog.dev.ConsoleRenderer(colors=stream.isatty())]
        factory = structlog.PrintLoggerFactory(file=stream)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _LibraryRecords)]:
        root.removeHandler(handler)
    root.addHandler(_LibraryRecords())


class _LibraryRecords(logging.Handler):
    """Standard-library records (WARNING and above) as `library.log` events."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, object] = {"logger": record.name}
            fields["message"] = redact(record.getMessage())
            exc = record.exc_info[1] if record.exc_info else None
            if exc is not None:
                fields["error"] = redact(f"{type(exc).__name__}: {exc}")
            level = "error" if record.levelno >= logging.ERROR else "warning"
            getattr(structlog.get_logger(), level)("library.log", **fields)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)
