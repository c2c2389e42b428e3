"""Logging: the libraries' own records join the configured stream, one redacted line each."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from aggregator.logs import configure_logging
from aggregator.sandbox import Faults
from aggregator.service import run_once

from .conftest import SandboxFactory, make_settings

# A session token as a service would quote it, and an access key id.
TOKEN = "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQDexample"
KEY_ID = "ASIAIOSFODNN7EXAMPLE"


class Stream(io.TextIOWrapper):
    """stderr as a pipe: not a TTY, with a binary buffer (JSON lines are written there)."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO(), encoding="utf-8")

    def isatty(self) -> bool:
        return False

    def getvalue(self) -> str:
        self.flush()
        buffer = self.buffer
        assert isinstance(buffer, io.BytesIO)
        return buffer.getvalue().decode()


@pytest.fixture
def stream() -> Iterator[Stream]:
    """A stream configured as the log's; the root logger's handlers are restored after."""
    root = logging.getLogger()
    handlers = list(root.handlers)
    out = Stream()
    yield out
    root.handlers[:] = handlers


def events(text: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in text.splitlines()]


def test_a_library_warning_is_one_redacted_json_line(stream: Stream) -> None:
    configure_logging(level="info", fmt="json", stream=stream)
    log = logging.getLogger("aiobotocore.credentials")
    try:
        raise RuntimeError(f"denied for {KEY_ID}: X-Amz-Security-Token: {TOKEN}")
    except RuntimeError:
        log.warning("Refreshing temporary credentials failed.", exc_info=True)
    logging.getLogger("botocore.endpoint").debug("Sending http request: X-Amz-Security-Token")
    logging.getLogger("asyncio").error("Unclosed client session")
    text = stream.getvalue()
    assert KEY_ID not in text and TOKEN[:24] not in text and "Traceback" not in text
    found = events(text)
    assert [(e["event"], e["level"], e["logger"]) for e in found] == [
        ("library.log", "warning", "aiobotocore.credentials"),
        ("library.log", "error", "asyncio"),
    ]
    assert found[0]["message"] == "Refreshing temporary credentials failed."
    assert str(found[0]["error"]).startswith("RuntimeError: denied for <redacted>")


def test_the_level_filter_applies_and_reconfiguring_does_not_repeat_lines(
    stream: Stream,
) -> None:
    configure_logging(level="info", fmt="json", stream=stream)
    configure_logging(level="error", fmt="json", stream=stream)  # a reload
    logging.getLogger("aiohttp.client").warning("a warning")
    logging.getLogger("aiohttp.client").error("an error")
    assert [e["message"] for e in events(stream.getvalue())] == ["an error"]


async def test_a_failed_advisory_refresh_logs_json_not_tracebacks(
    make_sandbox: SandboxFactory, tmp_path: Path, stream: Stream
) -> None:
    """Credentials that say they expire within 15 minutes are refreshed before each request;
    when that AssumeRole is denied, aiobotocore logs a warning with the exception (and keeps
    the old credentials). The run completes and the warning is a JSON line of the log."""
    faults = Faults(advertised_credential_ttl=800)
    account = "200000000000"
    sb = await make_sandbox(
        accounts=1,
        seed=3,
        regions=("eu-west-1",),
        faults=faults,
        jobs={(account, "eu-west-1"): 500},
    )
    settings = make_settings(
        [account], regions={"names": ["eu-west-1"]}, output={"directory": str(tmp_path / "o")}
    )
    configure_logging(level="warning", fmt="json", stream=stream)
    task = asyncio.ensure_future(run_once(settings))
    # The sandbox runs on this loop and has no event to wait for: yield until it answered.
    while not sb.stats().requests.get("sts:AssumeRole"):  # noqa: ASYNC110
        await asyncio.sleep(0)
    sb.faults = replace(faults, deny_assume_role=frozenset({account}))
    summary = await task
    assert summary.status == "complete"
    found = events(stream.getvalue())
    assert found and all(e["event"] == "library.log" for e in found)
    assert any("advisory refresh" in str(e["message"]) for e in found), found
    assert all("AccessDenied" in str(e.get("error")) for e in found)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_stderr_nobody_reads_drops_lines_and_never_blocks(fmt: str) -> None:
    """A pipe whose reader is alive but stalled (a hung log shipper): once it is full, lines
    are dropped rather than written, so the loop never blocks (the run, the daemon's health
    endpoints and its SIGTERM froze in the write), and the first line that goes out again
    says how many were dropped."""
    import os

    import structlog

    root = logging.getLogger()
    handlers = list(root.handlers)
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as stderr, os.fdopen(read_end, "rb") as reader:
        configure_logging(level="info", fmt=fmt, stream=stderr)  # type: ignore[arg-type]
        log = structlog.get_logger()
        for i in range(2_000):  # about 400 KB: a pipe holds 64 KB
            log.info("partition.done", n=i, filler="x" * 150)
        held = reader.read1(1 << 20)  # all the pipe holds (64 KB), in one read
        log.info("partition.done", n="after")
        stderr.flush()
        tail = reader.read1(1 << 20).decode()
    root.handlers[:] = handlers
    written = held.decode().count("partition.done")
    assert 0 < written < 2_000
    lines = tail.splitlines()
    assert len(lines) == 2 and ("n=after" in lines[1] or '"n":"after"' in lines[1]), lines
    dropped = 2_000 - written
    if fmt == "json":
        notice = orjson.loads(lines[0])
        assert (notice["event"], notice["lines"], notice["level"]) == (
            "log.dropped",
            dropped,
            "warning",
        )
    else:
        assert f"log.dropped lines={dropped}" in lines[0]


@pytest.mark.timeout(30)
def test_a_long_line_into_a_nearly_full_pipe_is_cut_not_waited_for() -> None:
    """A pipe with one free page and a stalled reader, and a line longer than that page: the
    part that fits goes out, the rest is dropped (the write blocked: a pipe that polls
    writable has room for a page, not for any line), and the notice that follows starts on a
    line of its own."""
    import os

    import structlog

    root = logging.getLogger()
    handlers = list(root.handlers)
    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as stderr, os.fdopen(read_end, "rb") as reader:
        os.write(write_end, b"." * 4096 * 15)  # 15 of the pipe's 16 pages
        configure_logging(level="info", fmt="json", stream=stderr)  # type: ignore[arg-type]
        log = structlog.get_logger()
        log.info("long.line", filler="x" * 8_000)
        first = reader.read1(1 << 20)
        log.info("after")
        stderr.flush()
        rest = reader.read1(1 << 20).decode()
    root.handlers[:] = handlers
    assert first.startswith(b"." * 4096 * 15) and b"x" * 1000 in first
    assert len(first) < 4096 * 15 + 8_000  # cut short
    lines = rest.splitlines()
    notice, after = orjson.loads(lines[-2]), orjson.loads(lines[-1])
    assert (notice["event"], notice["lines"], after["event"]) == ("log.dropped", 1, "after")
