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

import contextlib
import logging
import os
import select
import stat
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import orjson
import structlog

from .errors import redact

__all__ = ["configure_logging", "is_terminal"]

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
    stream = stream or sys.stderr  # None when the process started with stderr closed
    tty = is_terminal(stream)
    as_json = fmt == "json" or (fmt == "auto" and not tty)
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
            file=_Sink(stream, binary=True)  # type: ignore[arg-type]  # write and flush
        )
    else:
        processors = [*shared, structlog.dev.ConsoleRenderer(colors=tty)]
        factory = structlog.PrintLoggerFactory(
            file=_Sink(stream, binary=False)  # type: ignore[arg-type]  # write and flush
        )
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


def is_terminal(stream: Any) -> bool:
    """Whether `stream` is a terminal; False for None (a closed stderr) or a closed file."""
    try:
        return stream is not None and bool(stream.isatty())
    except (OSError, ValueError):  # closed
        return False


_STALLED_AFTER_MS = 50
# What one write may hold, bytes or characters: at most PIPE_BUF (4,096) bytes even in UTF-8,
# which a pipe that polls writable (a free page) takes without blocking.
_CHUNK = 1024


class _Sink:
    """Where the log's lines go: `stream`, or its binary buffer for bytes. A line that cannot
    be written (the reader of a pipe went away, a full disk, stderr closed) is dropped: a log
    that fails must not fail the run or the daemon (every log call raised, and `run` exited 1
    before it fetched anything).

    Nor may a log that is not read stop them: on a pipe, socket or terminal whose reader
    stalled (a log shipper that hangs, a terminal paused with Ctrl-S) a write would block the
    event loop, and with it the run, the daemon's health endpoints and its SIGTERM. So a line
    is written only if the stream can take it within `_STALLED_AFTER_MS` (a reader slower than
    a burst of lines catches up), and not waited for at all once a line was dropped, until
    one goes out again; a dropped line is counted, and the next line that goes out is
    preceded by one that says how many were (`log.dropped`). A regular file always takes it
    (a full disk fails the write instead)."""

    def __init__(self, stream: TextIO | None, *, binary: bool) -> None:
        self._target: Any = stream
        self._decode = False
        self._binary = binary
        if binary and stream is not None:
            buffer = getattr(stream, "buffer", None)
            self._target = buffer if buffer is not None else stream
            self._decode = buffer is None  # a text-only stream (a test's StringIO)
        self._poll: Any = None
        self._pending: list[Any] = []
        self.dropped = 0
        self._torn = False  # a long line was cut short by a reader that stalled
        try:
            fd = stream.fileno() if stream is not None else -1
            if fd >= 0 and not stat.S_ISREG(os.fstat(fd).st_mode):
                self._poll = select.poll()
                self._poll.register(fd, select.POLLOUT)
        except (OSError, ValueError, AttributeError):  # no descriptor: a test's stream
            pass

    def write(self, data: Any) -> None:
        if self._target is None:
            return
        if self._poll is not None:  # a whole line at a time (print writes its "\n" apart)
            self._pending.append(data)
            if not data.endswith(b"\n" if isinstance(data, bytes) else "\n"):
                return
            data = (b"" if isinstance(data, bytes) else "").join(self._pending)
            self._pending.clear()
        with contextlib.suppress(OSError, ValueError):
            # A reader that is only slower than a burst of lines gets a moment to catch up;
            # one that let that moment pass is stalled, and is not waited for again until it
            # has taken a line.
            wait = 0 if self.dropped else _STALLED_AFTER_MS
            if self._poll is not None and not self._poll.poll(wait):
                self.dropped += 1
                return
            if self.dropped:
                notice = self._dropped_line()
                if self._torn:  # (after the part of a line that went out)
                    notice = (b"\n" if isinstance(notice, bytes) else "\n") + notice
                self._target.write(notice)
                self._target.flush()
                self.dropped, self._torn = 0, False
            if self._poll is None or len(data) <= _CHUNK:
                self._target.write(data.decode() if self._decode else data)
                return
            # A long line goes out in pieces that a stream which polls writable takes whole
            # (a pipe: one free page), each waited for as a line is.
            for start in range(0, len(data), _CHUNK):
                if start and not self._poll.poll(_STALLED_AFTER_MS):
                    self.dropped, self._torn = self.dropped + 1, True
                    return
                piece = data[start : start + _CHUNK]
                self._target.write(piece.decode() if self._decode else piece)
                self._target.flush()

    def _dropped_line(self) -> Any:
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        fields = {"lines": self.dropped, "event": "log.dropped", "level": "warning"}
        if self._binary:
            line = orjson.dumps({**fields, "timestamp": now}) + b"\n"
            return line.decode() if self._decode else line
        return f"{now} [warning  ] log.dropped lines={self.dropped} (stderr was not read)\n"

    def flush(self) -> None:
        if self._target is not None:
            with contextlib.suppress(OSError, ValueError):
                self._target.flush()


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
