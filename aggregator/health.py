"""Health: the daemon's HTTP listener, `/healthz` and `/livez` (JSON), `/metrics` (Prometheus).

Two questions, two endpoints:

- `/healthz` (readiness, alerting): is the inventory current? 200 while the last cycle finished
  within 2 x interval and was complete or partial; 503 otherwise (never finished in time,
  failed, or stuck). Before the first cycle ends the daemon counts as healthy ("starting") for
  2 x interval after start. After a reload to a shorter interval, the last cycle is judged by
  the interval it ran under until the next one ends: a reload alone never turns it 503.
- `/livez` (liveness): is the loop alive? A failed cycle is not a reason to restart: the next
  cycle retries anyway, and a restart loses the counters. 503 only when the loop has shown no
  sign of life (start, cycle started, partition done, cycle finished or failed) for
  2 x interval + partition deadline. Idle, the next cycle is due within interval x (1 + jitter),
  jitter <= 0.5; while a cycle runs, a partition ends at least every partition deadline (each
  one is bounded by it); the rest of the window covers what precedes the first partition
  (output check, account discovery) and follows the last (writing the snapshot).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .config import LimitsSettings
from .fetch import PartitionResult
from .metrics import Metrics
from .records import JobRecord

__all__ = ["HealthServer", "HealthState"]

_PARTITION_DEADLINE = float(LimitsSettings.model_fields["partition_deadline_seconds"].default)
_METRICS_TTL = 1.0  # seconds a rendered /metrics is served again


@dataclass(slots=True)
class HealthState:
    """What `/healthz` and `/livez` report; updated by the service loop as a CycleObserver.

    `interval` is `daemon.interval` and `partition_deadline` is
    `limits.partition_deadline_seconds` (default: that setting's default), both in seconds;
    `clock` is monotonic seconds (injectable for tests). `judged_by` is the longest interval
    in force since the last cycle ended (or since start): `/healthz` judges that cycle by it,
    so a reload to a shorter interval (`reconfigure`) does not make it late.
    """

    interval: float
    clock: Callable[[], float] = time.monotonic
    partition_deadline: float = _PARTITION_DEADLINE
    started: float = 0.0
    last_finished: float | None = None
    last: dict[str, Any] | None = None
    running: bool = False
    cycle_began: float | None = None
    last_sign_of_life: float = 0.0
    judged_by: float = 0.0

    def __post_init__(self) -> None:
        self.started = self.last_sign_of_life = self.clock()
        self.judged_by = self.interval

    def reconfigure(self, interval: float, partition_deadline: float) -> None:
        """Follow reloaded settings. A reload is a sign of life: measured by a shorter
        interval, the last one may be long past."""
        self.interval = interval
        self.judged_by = max(self.judged_by, interval)
        self.partition_deadline = partition_deadline
        self.last_sign_of_life = self.clock()

    def cycle_started(self, snapshot_id: str, partitions: int) -> None:
        self.running = True
        self.cycle_began = self.last_sign_of_life = self.clock()

    def partition_done(self, result: PartitionResult) -> None:
        """Health looks at whole cycles only; liveness counts every partition as progress."""
        self.last_sign_of_life = self.clock()

    def cycle_finished(self, summary: Any, records: Sequence[JobRecord]) -> None:
        self.running = False
        self.last_finished = self.last_sign_of_life = self.clock()
        self.judged_by = self.interval
        self.last = {
            "snapshot_id": summary.snapshot_id,
            "status": summary.status,
            "jobs": summary.jobs,
            "stale": summary.stale,
            "partitions": summary.partitions,
            "wall_seconds": round(summary.wall_seconds, 3),
        }

    def cycle_failed(self, reason: str) -> None:
        self.running = False
        self.last_finished = self.last_sign_of_life = self.clock()
        self.judged_by = self.interval
        self.last = {"status": "failed", "error": reason}

    def report(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, body)."""
        now = self.clock()
        window = 2 * max(self.interval, self.judged_by)
        if self.last_finished is None:
            healthy = now - self.started <= window
            return healthy, {"healthy": healthy, "status": "starting", "running": self.running}
        age = now - self.last_finished
        status = (self.last or {}).get("status")
        healthy = age <= window and status in {"complete", "partial"}
        body = {
            "healthy": healthy,
            "running": self.running,
            "seconds_since_last_cycle": round(age, 3),
            "last_cycle": self.last,
        }
        return healthy, body

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        """(alive, body): alive unless no sign of life for 2 x interval + partition deadline,
        whatever the outcome of the last cycle."""
        now = self.clock()
        window = 2 * self.interval + self.partition_deadline
        quiet = now - self.last_sign_of_life
        alive = quiet <= window
        body: dict[str, Any] = {
            "alive": alive,
            "running": self.running,
            "seconds_since_progress": round(quiet, 3),
            "window_seconds": round(window, 3),
            "cycle_seconds": (
                round(now - self.cycle_began, 3)
                if self.running and self.cycle_began is not None
                else None
            ),
            "seconds_since_last_cycle": (
                None if self.last_finished is None else round(now - self.last_finished, 3)
            ),
            "last_status": (self.last or {}).get("status"),
        }
        return alive, body


# aiohttp's handler logs a malformed request as a traceback quoting the client's bytes, through
# stdlib logging (not structlog: plain text, whatever `logging.level`); its 400 answer is enough.
_QUIET = logging.getLogger("snowball_aggregator.http")
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, under a cap on connections and a lifetime.

    aiohttp has no deadline for a request's headers and keeps connections alive for an hour:
    clients that connect and send nothing (a port scanner, a slow loris) were held until the
    process ran out of file descriptors and its cycles could not write. Past `cap` live
    connections a new one is dropped at once; each is aborted `lifetime` seconds after it was
    accepted (probes and scrapes take milliseconds; Prometheus reconnects).
    """

    def __init__(self, inner: asyncio.Protocol, live: set[_Guarded], cap: int, lifetime: float):
        self._inner = inner
        self._live = live
        self._cap = cap
        self._lifetime = lifetime
        self._timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self._live) >= self._cap:
            transport.abort()  # type: ignore[attr-defined]
            return
        self.transport = transport
        self._live.add(self)
        self._timer = asyncio.get_running_loop().call_later(self._lifetime, self.abort)
        self._inner.connection_made(transport)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:
            return  # dropped over the cap: aiohttp never saw it
        self._live.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class HealthServer:
    """Serves `/healthz`, `/livez` and `/metrics` on `host:port`; an async context manager.

    Keyword options: `state` (HealthState), `metrics` (Metrics), `listen` ("HOST:PORT"; port 0
    picks a free port, see `port` after entry), `max_connections` (64) and
    `connection_lifetime` (seconds, 30; see `_Guarded`). `/metrics` is rendered at most once a
    second (by `state.clock`): a flood of scrapes does not take the event loop from the cycle.
    """

    def __init__(
        self,
        *,
        state: HealthState,
        metrics: Metrics,
        listen: str,
        max_connections: int = 64,
        connection_lifetime: float = 30.0,
    ) -> None:
        self._state = state
        self._metrics = metrics
        host, _, port = listen.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self._live: set[_Guarded] = set()
        self._cap = max_connections
        self._lifetime = connection_lifetime
        self._rendered: tuple[float, bytes] | None = None
        self.port = self._port

    async def _healthz(self, request: web.Request) -> web.Response:
        return _json(*self._state.report())

    async def _livez(self, request: web.Request) -> web.Response:
        return _json(*self._state.liveness())

    async def _metrics_view(self, request: web.Request) -> web.Response:
        now = self._state.clock()
        if self._rendered is None or not 0 <= now - self._rendered[0] < _METRICS_TTL:
            self._rendered = (now, generate_latest(self._metrics.registry))
        return web.Response(body=self._rendered[1], headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def __aenter__(self) -> HealthServer:
        if self._runner is not None:
            raise RuntimeError("HealthServer is already running")
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/metrics", self._metrics_view)
        runner = web.AppRunner(
            app, access_log=None, logger=_QUIET, keepalive_timeout=5.0, shutdown_timeout=1.0
        )
        await runner.setup()
        handler = runner.server
        assert handler is not None
        live, cap, lifetime = self._live, self._cap, self._lifetime
        try:
            server = await asyncio.get_running_loop().create_server(
                lambda: _Guarded(handler(), live, cap, lifetime), self._host or None, self._port
            )
        except OSError:
            await runner.cleanup()
            raise
        for sock in server.sockets:
            self.port = int(sock.getsockname()[1])
            break
        self._runner, self._server = runner, server
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        runner, self._runner = self._runner, None
        server, self._server = self._server, None
        if server is not None:
            server.close()  # no new connections; the open ones go now, answered or not (a
            for connection in list(self._live):  # client that never reads held shutdown 2 min)
                connection.abort()
        if runner is not None:
            await runner.cleanup()


def _json(ok: bool, body: dict[str, Any]) -> web.Response:
    return web.Response(
        body=orjson.dumps(body, option=orjson.OPT_SORT_KEYS),
        status=200 if ok else 503,
        content_type="application/json",
    )
