"""Gate: the global concurrency cap, with chains already under way served first.

Every HTTP request of a run (ListJobs and AssumeRole) holds one of `limit` slots while it is
in flight. Waiters are served in two classes: a partition's later pages
(`async with gate.next_page():`, in FIFO order) before everything else (`async with gate:`),
which is served by rank: the position in the plan of the partition the waiting task works
on (`ranked`, set by the scheduler's workers), then in FIFO order.

Why: a run lasts at least as long as its longest NextToken chain, and a chain's pages are
strictly sequential. With one FIFO queue, every page of a long chain queues behind the first
pages of thousands of partitions not yet started, so the chain, and the run, is stretched by
the whole queue's wait once per page. Measured on 200 accounts x every region at 50 ms
latency and 5 req/s (1,024 workers, 256 slots, the client's CPU the bottleneck), 24-page
chains that started at once took 15.5 s instead of 4.2 s. Serving later pages first keeps
chains at their paced rate while first pages take up what is left; nothing starves, because
each partition's later pages are limited by its own pacer.

Why by rank: the plan puts the longest chains a previous run saw first, but the order in which
first requests reach the gate is not the plan's. Every worker first leases a client, which may
mean an AssumeRole and a client, and when a run starts a thousand workers do so at once on one
loop. Measured on a scheduled one-shot run (a fresh process, the plan ordered by the previous
manifest; 200 accounts x every region, 1,024 workers, 256 slots): the 24-page chains' account
had its keys 0.27 s in, and its first ListJobs then waited 0.40 s at the gate behind first
requests of partitions later in the plan; a chain's pages come in windows of its rate from
its first one, so the run ended that much later (5.37 s; in rank order 5.06 s, the gate wait
0.01 s). Nothing starves: each partition makes one first request (again only on a retry or a
restart), and ranks are finite.

A task that holds a slot may have to make another request before its own goes out: botocore
renews expiring credentials (AssumeRole) while it signs. Waiting for a second slot there could
deadlock the run (every slot held by a request waiting for its own renewal), and the renewal is
the only request the task has in flight at that point, so `held()` tells the caller it may go
ahead in the slot it already has.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import heapq
import itertools
from collections.abc import AsyncIterator
from types import TracebackType

__all__ = ["Gate", "ranked"]

# The plan position of the partition the current task works on (0, first, when none is set:
# discovery and other requests outside a partition).
_rank: contextvars.ContextVar[int] = contextvars.ContextVar("gate_rank", default=0)


def ranked(rank: int) -> None:
    """Give the first requests the current task makes from now on `rank` (lower is served
    first; see the module docstring). Tasks it starts inherit it."""
    _rank.set(rank)


# The gates whose slots the current task holds, innermost last (tasks it starts inherit them).
_holding: contextvars.ContextVar[tuple[Gate, ...]] = contextvars.ContextVar(
    "gate_slots", default=()
)


def _release_hold(gate: Gate) -> None:
    held = _holding.get()
    for i in range(len(held) - 1, -1, -1):
        if held[i] is gate:
            _holding.set(held[:i] + held[i + 1 :])
            return


class Gate:
    """`limit` slots; `async with gate:` for a first request, `gate.next_page()` for a later
    page of a chain under way (served first)."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.limit = limit
        self._free = limit
        self._later: collections.deque[asyncio.Future[None]] = collections.deque()
        # First requests: a heap of (rank, arrival, future).
        self._first: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrivals = itertools.count()

    @property
    def in_flight(self) -> int:
        return self.limit - self._free

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._later if not f.done()) + sum(
            1 for _, _, f in self._first if not f.done()
        )

    async def acquire(self, *, first: bool = True) -> None:
        """Take a slot; `first=False` (a later page) goes ahead of every first request, and
        first requests go in the order of their task's rank (`ranked`), then of arrival."""
        if self._free > 0:  # (a release hands its slot to a live waiter first, if any)
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if first:
            heapq.heappush(self._first, (_rank.get(), next(self._arrivals), future))
        else:
            self._later.append(future)
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # handed a slot as we were cancelled: pass it on
            raise

    def release(self) -> None:
        later, first = self._later, self._first
        while later or first:
            future = later.popleft() if later else heapq.heappop(first)[2]
            if not future.done():
                future.set_result(None)  # the slot goes straight to the waiter
                return
        self._free += 1

    def held(self) -> bool:
        """Whether the current task holds one of this gate's slots (see the module docstring)."""
        return self in _holding.get()

    async def __aenter__(self) -> None:
        await self.acquire()
        _holding.set((*_holding.get(), self))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _release_hold(self)
        self.release()

    @contextlib.asynccontextmanager
    async def next_page(self) -> AsyncIterator[None]:
        """A slot for a later page of a chain under way."""
        await self.acquire(first=False)
        _holding.set((*_holding.get(), self))
        try:
            yield
        finally:
            _release_hold(self)
            self.release()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """A slot for a first request, unless the current task already holds one of this
        gate's: then the request goes in that slot (see the module docstring)."""
        if self.held():
            yield
            return
        async with self:
            yield
