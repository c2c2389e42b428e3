"""Health: `/healthz` says whether the inventory is current, `/livez` whether the loop is alive."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
import pytest

from aggregator.config import DaemonSettings, LimitsSettings
from aggregator.health import HealthServer, HealthState
from aggregator.metrics import Metrics
from aggregator.service import run_forever

from .conftest import SandboxFactory, make_settings

INTERVAL = 60.0
DEADLINE = 300.0
WINDOW = 2 * INTERVAL + DEADLINE  # no sign of life for longer than this: stuck

Get = Callable[[str], Awaitable[tuple[int, dict[str, Any]]]]


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(clock: Clock) -> HealthState:
    return HealthState(interval=INTERVAL, clock=clock, partition_deadline=DEADLINE)


@pytest.fixture
async def get(state: HealthState) -> AsyncIterator[Get]:
    """GET a path of a HealthServer on loopback: (status, JSON body)."""
    async with (
        HealthServer(state=state, metrics=Metrics(), listen="127.0.0.1:0") as http,
        aiohttp.ClientSession() as client,
    ):

        async def fetch(path: str) -> tuple[int, dict[str, Any]]:
            async with client.get(f"http://127.0.0.1:{http.port}{path}") as response:
                assert response.content_type == "application/json"
                return response.status, orjson.loads(await response.read())

        yield fetch


class _Summary:
    """The fields of a RunSummary that HealthState reads."""

    snapshot_id = "20260101T000000Z-test"
    status = "complete"
    jobs = 3
    stale = 0
    partitions = 2
    wall_seconds = 1.0


def _partition() -> Any:
    return cast(Any, None)  # HealthState does not look inside a PartitionResult


async def test_livez_stays_up_through_failed_cycles_while_healthz_fails(
    make_sandbox: SandboxFactory, tmp_path: Path, clock: Clock, state: HealthState, get: Get
) -> None:
    """Real failed cycles turn /healthz 503 but leave /livez 200: a restart cannot fix them."""
    sb = await make_sandbox(accounts=2, seed=4)
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    sb.faults = replace(sb.faults, deny_assume_role=frozenset(sb.account_ids))
    for _ in range(3):
        await run_forever(settings, burst=True, observers=[state], output=tmp_path)
        status, body = await get("/healthz")
        assert status == 503 and body["last_cycle"]["status"] == "failed"
        status, body = await get("/livez")
        assert status == 200 and body["alive"] is True and body["last_status"] == "failed"
        clock.now += INTERVAL  # the next cycle is due one interval later
    assert (await get("/livez"))[0] == 200


async def test_livez_fails_only_after_the_window_without_a_cycle(
    clock: Clock, state: HealthState, get: Get
) -> None:
    """Idle after a cycle (failed or not), /livez is 200 up to 2 x interval + partition
    deadline and 503 after, while /healthz already fails after 2 x interval."""
    state.cycle_started("s1", 2)
    state.cycle_failed("disk full")
    clock.now += 2 * INTERVAL + 1
    assert (await get("/healthz"))[0] == 503
    status, body = await get("/livez")
    assert status == 200 and body["running"] is False
    assert body["seconds_since_last_cycle"] == 2 * INTERVAL + 1
    clock.now += WINDOW - (2 * INTERVAL + 1)
    assert (await get("/livez"))[0] == 200
    clock.now += 1
    status, body = await get("/livez")
    assert status == 503 and body["alive"] is False and body["window_seconds"] == WINDOW


async def test_long_cycle_that_makes_progress_is_alive(
    clock: Clock, state: HealthState, get: Get
) -> None:
    """A first cycle far longer than 2 x interval + deadline stays alive while partitions
    finish; once nothing finishes for longer than the window, /livez answers 503."""
    state.cycle_started("s1", 100)
    for _ in range(10):
        clock.now += DEADLINE  # each partition ends within the partition deadline
        state.partition_done(_partition())
        status, body = await get("/livez")
        assert status == 200 and body["running"] is True
    assert body["cycle_seconds"] == 10 * DEADLINE > WINDOW
    assert body["seconds_since_last_cycle"] is None
    assert (await get("/healthz"))[1]["status"] == "starting"
    clock.now += WINDOW + 1  # a hang: no partition ends, the cycle never finishes
    status, body = await get("/livez")
    assert status == 503 and body["running"] is True
    state.cycle_finished(_Summary(), [])
    assert (await get("/livez"))[0] == 200
    assert (await get("/healthz"))[0] == 200


async def test_livez_while_starting_and_after_an_interval_change(
    clock: Clock, state: HealthState, get: Get
) -> None:
    """Before any cycle starts the window counts from start; a reloaded interval (service.py
    sets `state.interval`) moves the window."""
    clock.now += WINDOW
    assert (await get("/livez"))[0] == 200
    clock.now += 1
    assert (await get("/livez"))[0] == 503
    state.interval = 2 * INTERVAL
    status, body = await get("/livez")
    assert status == 200 and body["window_seconds"] == 4 * INTERVAL + DEADLINE


async def test_reload_to_a_shorter_interval_does_not_make_the_last_cycle_late(
    clock: Clock, state: HealthState, get: Get
) -> None:
    """A cycle that ended 1.5 intervals ago is on time; a reload to a tenth of the interval
    (service.py calls `reconfigure`) leaves it on time until the next cycle ends, which is
    then judged by the new interval. Before the first cycle ends, the start likewise; and a
    reload back and forth between two cycles judges the last by the longer interval."""
    clock.now += 1.5 * INTERVAL
    state.reconfigure(INTERVAL / 10, DEADLINE)
    assert (await get("/healthz"))[0] == 200  # starting, under the interval it started with
    state.cycle_started("s1", 2)
    state.cycle_finished(_Summary(), [])
    state.reconfigure(INTERVAL, DEADLINE)
    clock.now += 1.5 * INTERVAL
    state.reconfigure(INTERVAL / 10, DEADLINE)
    status, body = await get("/healthz")
    assert status == 200 and body["seconds_since_last_cycle"] == 1.5 * INTERVAL
    clock.now += 0.5 * INTERVAL + 1  # now late by the old interval too
    assert (await get("/healthz"))[0] == 503
    state.cycle_started("s2", 2)
    state.cycle_finished(_Summary(), [])
    clock.now += 0.2 * INTERVAL
    assert (await get("/healthz"))[0] == 200
    clock.now += 1
    assert (await get("/healthz"))[0] == 503  # the new cycle ran under the new interval


def test_default_window_outlasts_a_partition_deadline_and_then_some() -> None:
    """With the default settings, the liveness window exceeds partition deadline + interval
    x (1 + max jitter), so neither a slow partition nor a jittered wait looks stuck."""
    daemon, limits = DaemonSettings(), LimitsSettings()
    state = HealthState(interval=daemon.interval)
    assert state.partition_deadline == limits.partition_deadline_seconds
    _, body = state.liveness()
    assert body["window_seconds"] > limits.partition_deadline_seconds + daemon.interval * 1.5


# --- the listener under abuse: idle connections, bad requests, clients that never read ------


async def _answer(port: int, request: bytes) -> bytes:
    """Send `request` on a new connection; everything the server sends until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def test_idle_connections_are_capped_and_expire(state: HealthState) -> None:
    """Connections that send nothing (a port scanner, a slow loris) were held for good, until
    the daemon ran out of file descriptors: past the cap a new one is closed at once, and each
    is closed `connection_lifetime` after it was accepted; then requests are served again."""
    server = HealthServer(
        state=state,
        metrics=Metrics(),
        listen="127.0.0.1:0",
        max_connections=2,
        connection_lifetime=0.3,
    )
    async with server as http:
        idle = [await asyncio.open_connection("127.0.0.1", http.port) for _ in range(2)]
        assert await _answer(http.port, b"GET /livez HTTP/1.0\r\n\r\n") == b""  # over the cap
        for reader, writer in idle:  # then each idle one ends with its lifetime
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
        assert (await _answer(http.port, b"GET /livez HTTP/1.0\r\n\r\n")).startswith(
            b"HTTP/1.0 200"
        )


def test_a_malformed_request_is_a_400_and_nothing_on_stderr() -> None:
    """aiohttp logged each malformed request through stdlib logging, which the daemon leaves
    unconfigured: a plain-text traceback on stderr quoting the client's bytes, whatever
    `logging.level` (1,000 of them wrote 12,000 lines). The 400 is enough. (In a process of
    its own: pytest's log capture would hide what reaches stderr.)"""
    script = """
import asyncio
from aggregator.health import HealthServer, HealthState
from aggregator.metrics import Metrics

async def main():
    async with HealthServer(state=HealthState(interval=60.0), metrics=Metrics(),
                            listen="127.0.0.1:0") as http:
        for request in (b"GET /healthz HTTP/9.9\\r\\n\\r\\n", b"GET /\\x00 HTTP/1.1\\r\\n\\r\\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", http.port)
            writer.write(request)
            print(((await reader.read()).split(b" ", 2)[1]).decode())
            writer.close()

asyncio.run(main())
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.stdout.split() == ["400", "400"], proc.stderr
    assert proc.stderr == ""


async def test_shutdown_does_not_wait_for_a_client_that_never_reads(state: HealthState) -> None:
    """A client that pipelines scrapes and never reads its answers held the handler, and the
    daemon's shutdown for two minutes (past any grace period: SIGKILL). It is cut at once."""
    server = HealthServer(state=state, metrics=Metrics(), listen="127.0.0.1:0")
    async with server as http:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, ("127.0.0.1", http.port))
        await loop.sock_sendall(sock, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 2000)
        await asyncio.sleep(1.0)  # the server answers into the full buffers and waits
        exit_server = server.__aexit__(None, None, None)
        await asyncio.wait_for(exit_server, 10)  # (a hang fails here, not after 2 minutes)
        sock.close()


async def test_metrics_are_rendered_at_most_once_a_second(state: HealthState, clock: Clock) -> None:
    """A flood of scrapes rendered the registry on the event loop each time (about 1 ms):
    1,000 at once stretched a cycle 84-fold. Within a second the same rendering is served."""
    metrics = Metrics()
    async with (
        HealthServer(state=state, metrics=metrics, listen="127.0.0.1:0") as http,
        aiohttp.ClientSession() as client,
    ):

        async def scrape() -> bytes:
            async with client.get(f"http://127.0.0.1:{http.port}/metrics") as response:
                return await response.read()

        first = await scrape()
        metrics.cycle_skipped(3)
        assert await scrape() == first
        clock.now += 1.0
        assert await scrape() != first
