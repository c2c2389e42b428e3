"""Scheduler: fan the plan out under explicit limits.

- **Global concurrency**: one `Gate(max_concurrency)` gates every HTTP request (ListJobs and
  AssumeRole), so at most `max_concurrency` are in flight at any moment. It serves the later
  pages of chains under way before first requests (see gate.py).
- **Per-partition rate**: each (account, region) has its own `AdaptiveThrottler`, an
  asyncio-throttle `Throttler` (at most `rate_limit` requests in any `period` window) that
  halves its rate on a throttle and creeps back up additively on success (AIMD), never above
  the configured `requests_per_second`.
- **Order and fairness**: a fixed pool of workers takes partitions in plan order: the longest
  chains of the previous run first, otherwise accounts round-robin (see plan.longest_first);
  each worker ranks its partition's first requests by that order, so the gate serves them in
  plan order even when a partition reaches it late (gate.ranked).
  A partition fetches its pages one after the other at its own pacer's rate, so an account with
  thousands of jobs cannot starve the rest even though its later pages go first at the gate.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from asyncio_throttle.throttler import Throttler

from .clients import ClientPool, PartitionClients
from .credentials import CredentialBroker
from .direct import DirectSender
from .fetch import PartitionResult, fetch_partition
from .gate import Gate, ranked
from .plan import Partition
from .retry import RetryPolicy

__all__ = ["AdaptiveThrottler", "Limits", "run_plan"]

log = structlog.get_logger()


class AdaptiveThrottler(Throttler):
    """A Throttler whose rate adapts: x0.5 on throttle, +`step` r/s per success, capped.

    Keyword options: `rate` (requests per second, the ceiling), `floor=0.05` r/s,
    `step=0.05` r/s per successful request, `slack=0.01` s (a window is held this much longer
    than its period, so that requests a second apart do not arrive within one second of each
    other when the first took a little longer from the wire to the service), `clock=
    time.monotonic`, `sleep=asyncio.sleep`. Unlike the base class it sleeps exactly until the
    window frees instead of polling.
    """

    def __init__(
        self,
        *,
        rate: float,
        floor: float = 0.05,
        step: float = 0.05,
        slack: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.ceiling = rate
        self.floor = min(floor, rate)
        self.step = step
        self.slack = slack
        self._clock = clock
        self._sleep = sleep
        count, period = self._window(rate)
        super().__init__(rate_limit=count, period=period)
        self.rate = rate

    @staticmethod
    def _window(rate: float) -> tuple[int, float]:
        """(requests, seconds): never more than `rate` requests in any second. A fractional
        rate above 1 rounds down (2.5 r/s: 2 per second; 2 per 0.8 s would let 4 into one
        second, and a throttle's halving from 5 would hardly slow the bursts); below 1, one
        request per 1/rate seconds."""
        count = max(1, math.floor(rate))
        return count, max(1.0, count / rate)

    def _set_rate(self, rate: float) -> None:
        self.rate = min(self.ceiling, max(self.floor, rate))
        self.rate_limit, self.period = self._window(self.rate)

    def on_throttle(self) -> None:
        self._set_rate(self.rate / 2)

    def on_success(self) -> None:
        if self.rate < self.ceiling:
            self._set_rate(self.rate + self.step)

    def flush(self) -> None:
        now = self._clock()
        held = self.period + self.slack
        while self._task_logs and now - self._task_logs[0] >= held:
            self._task_logs.popleft()

    async def acquire(self) -> None:
        while True:
            self.flush()
            if len(self._task_logs) < self.rate_limit:
                break
            held = self.period + self.slack
            # At least a microsecond: a wait that rounding left at 1e-17 s would not move a
            # clock that only sleeps advance, and this loop would spin.
            await self._sleep(max(1e-6, held - (self._clock() - self._task_logs[0])))
        self._task_logs.append(self._clock())

    def sent(self) -> None:
        """The request last acquired for is leaving now (it may have waited for a slot of the
        run's gate since `acquire`): count it from now, so that requests that waited do not
        reach the service in a burst with the next second's. A partition's requests are one
        at a time, so the last entry is that request's."""
        if self._task_logs:
            self._task_logs[-1] = self._clock()


@dataclass(frozen=True, slots=True)
class Limits:
    """The run's limits: `max_concurrency` requests in flight, `requests_per_second` per
    partition, `timeout` seconds per request, `workers` partitions open at once (default
    4 x max_concurrency: more than the gate so paced partitions do not leave slots idle)."""

    max_concurrency: int = 64
    requests_per_second: float = 5.0
    timeout: float = 30.0
    workers: int | None = None


async def run_plan(
    plan: Iterable[Partition],
    *,
    broker: CredentialBroker,
    pool: ClientPool,
    limits: Limits,
    policy: RetryPolicy,
    gate: Gate,
    on_result: Callable[[PartitionResult], None],
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
    sender: DirectSender | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    """Fetch every partition of `plan`, calling `on_result` as each one finishes.

    `gate` is the global concurrency semaphore (shared with the broker's AssumeRole calls);
    `pool` lends the Snowball clients; `sender` (the direct path, if the clients' sessions
    have it installed) sends their ListJobs calls; `now` is the wall clock that dates what
    each partition observed (the run's own, so that both agree).
    Returns when every partition has a result; partition failures are results, not errors.
    """
    rng = rng or random.Random()
    partitions = list(plan)
    queue = enumerate(partitions)
    workers = min(len(partitions), limits.workers or 4 * limits.max_concurrency)

    clients = PartitionClients(pool=pool, broker=broker, sender=sender)

    async def worker() -> None:
        for rank, partition in queue:
            ranked(rank)  # its first requests (and AssumeRole) are served in plan order
            pacer = AdaptiveThrottler(rate=limits.requests_per_second, clock=clock, sleep=sleep)
            result = await fetch_partition(
                partition,
                clients=clients,
                pacer=pacer,
                gate=gate,
                policy=policy,
                sleep=sleep,
                rng=random.Random(rng.random()),
                monotonic=clock,
                now=now,
            )
            on_result(result)

    async with asyncio.TaskGroup() as tg:
        for _ in range(workers):
            tg.create_task(worker())
