"""Health: the daemon's HTTP listener, `/healthz` (JSON) and `/metrics` (Prometheus text).

`/healthz` answers 200 while the last cycle finished within 2 x interval and was complete or
partial, and 503 otherwise (never finished in time, failed, or stuck). Before the first cycle
ends the daemon counts as healthy ("starting") for 2 x interval after start.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .fetch import PartitionResult
from .metrics import Metrics
from .records import JobRecord

__all__ = ["HealthServer", "HealthState"]


@dataclass(slots=True)
class HealthState:
    """What `/healthz` reports; updated by the service loop as a CycleObserver."""

    interval: float
    clock: Callable[[], float] = time.monotonic
    started: float = 0.0
    last_finished: float | None = None
    last: dict[str, Any] | None = None
    running: bool = False

    def __post_init__(self) -> None:
        self.started = self.clock()

    def cycle_started(self, snapshot_id: str, partitions: int) -> None:
        self.running = True

    def partition_done(self, result: PartitionResult) -> None:
        """Health looks at whole cycles only."""

    def cycle_finished(self, summary: Any, records: Sequence[JobRecord]) -> None:
        self.running = False
        self.last_finished = self.clock()
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
        self.last_finished = self.clock()
        self.last = {"status": "failed", "error": reason}

    def report(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, body)."""
        now = self.clock()
        window = 2 * self.interval
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


class HealthServer:
    """Serves `/healthz` and `/metrics` on `host:port`; an async context manager.

    Keyword options: `state` (HealthState), `metrics` (Metrics), `listen` ("HOST:PORT"; port 0
    picks a free port, see `port` after entry).
    """

    def __init__(self, *, state: HealthState, metrics: Metrics, listen: str) -> None:
        self._state = state
        self._metrics = metrics
        host, _, port = listen.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._runner: web.AppRunner | None = None
        self.port = self._port

    async def _healthz(self, request: web.Request) -> web.Response:
        healthy, body = self._state.report()
        return web.Response(
            body=orjson.dumps(body, option=orjson.OPT_SORT_KEYS),
            status=200 if healthy else 503,
            content_type="application/json",
        )

    async def _metrics_view(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self._metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def __aenter__(self) -> HealthServer:
        if self._runner is not None:
            raise RuntimeError("HealthServer is already running")
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics_view)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        for address in runner.addresses:
            if isinstance(address, tuple):
                self.port = int(address[1])
                break
        self._runner = runner
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
