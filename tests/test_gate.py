"""Gate: at most `limit` in flight; later pages of chains under way are served first."""

from __future__ import annotations

import asyncio

import pytest

from aggregator.gate import Gate, ranked


async def test_limit_and_order() -> None:
    """With the slot taken, waiters are served later pages first, each class in FIFO order,
    and never more than `limit` at once."""
    gate = Gate(1)
    order: list[str] = []
    await gate.acquire()

    async def first(name: str) -> None:
        async with gate:
            order.append(name)
            assert gate.in_flight == 1

    async def later(name: str) -> None:
        async with gate.next_page():
            order.append(name)
            assert gate.in_flight == 1

    tasks = [
        asyncio.create_task(first("first-1")),
        asyncio.create_task(later("later-1")),
        asyncio.create_task(first("first-2")),
        asyncio.create_task(later("later-2")),
    ]
    await asyncio.sleep(0)  # every task is now waiting
    assert gate.waiting == 4
    gate.release()
    await asyncio.gather(*tasks)
    assert order == ["later-1", "later-2", "first-1", "first-2"]
    assert gate.in_flight == 0 and gate.waiting == 0


async def test_a_cancelled_waiter_does_not_lose_the_slot() -> None:
    """A waiter cancelled after it was handed the slot passes it on; a cancelled waiter still
    in the queue is skipped."""
    gate = Gate(1)
    await gate.acquire()
    skipped = asyncio.create_task(gate.acquire())
    handed = asyncio.create_task(gate.acquire())
    last = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    skipped.cancel()
    await asyncio.sleep(0)
    gate.release()  # goes to `handed` (skipping the cancelled one)...
    handed.cancel()  # ...which is cancelled before it runs: the slot moves on to `last`
    with pytest.raises(asyncio.CancelledError):
        await handed
    await asyncio.wait_for(last, 1)
    assert gate.in_flight == 1 and gate.waiting == 0
    gate.release()
    assert gate.in_flight == 0


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Gate(0)


async def test_a_task_holding_a_slot_goes_ahead_in_it() -> None:
    """`slot()` in a task that holds a slot (a renewal while signing) takes no second one;
    in a task that holds none it waits like `async with gate`. Holding ends with the slot."""
    gate = Gate(1)
    other = Gate(1)
    for enter in (lambda: gate, gate.next_page):
        async with enter():
            assert gate.held() and not other.held()
            async with other:  # a slot of another gate, given back: this one is still held
                assert gate.held() and other.held()
            assert gate.held() and not other.held()
            async with asyncio.timeout(1):
                async with gate.slot():
                    assert gate.in_flight == 1
        assert not gate.held() and gate.in_flight == 0

    await gate.acquire()  # held by someone else: this task must wait
    waiting = asyncio.create_task(gate.slot().__aenter__())
    await asyncio.sleep(0)
    assert not waiting.done()
    gate.release()
    await waiting
    assert gate.in_flight == 1


async def test_first_requests_go_by_rank_then_arrival() -> None:
    """First requests wait in the order of their task's rank (`ranked`: the partition's place
    in the plan), equal ranks in arrival order, all after every later page; a task started by
    a ranked task (the broker's AssumeRole) inherits its rank."""
    gate = Gate(1)
    order: list[str] = []
    await gate.acquire()

    async def first(name: str, rank: int | None) -> None:
        if rank is not None:
            ranked(rank)
        async with gate:
            order.append(name)

    async def spawned(name: str, rank: int) -> None:
        ranked(rank)
        await asyncio.create_task(first(name, None))  # inherits the rank

    async def later(name: str) -> None:
        ranked(0)
        async with gate.next_page():
            order.append(name)

    tasks = [
        asyncio.create_task(first("rank-5", 5)),
        asyncio.create_task(spawned("rank-3 (spawned)", 3)),
        asyncio.create_task(first("rank-9", 9)),
        asyncio.create_task(first("rank-3", 3)),
        asyncio.create_task(later("later")),
        asyncio.create_task(first("unranked", None)),
    ]
    for _ in range(3):
        await asyncio.sleep(0)  # every task (and the spawned one) is now waiting
    assert gate.waiting == 6
    gate.release()
    await asyncio.gather(*tasks)
    assert order == ["later", "unranked", "rank-3", "rank-3 (spawned)", "rank-5", "rank-9"]
    assert gate.in_flight == 0 and gate.waiting == 0


async def test_a_cancelled_ranked_waiter_is_skipped() -> None:
    """A cancelled first request leaves the rank queue without taking the slot."""
    gate = Gate(1)
    await gate.acquire()

    async def first(rank: int) -> None:
        ranked(rank)
        await gate.acquire()

    gone = asyncio.create_task(first(0))
    kept = asyncio.create_task(first(1))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    gate.release()
    await asyncio.wait_for(kept, 1)
    assert gone.cancelled() and gate.in_flight == 1 and gate.waiting == 0
