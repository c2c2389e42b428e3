"""Scheduler: the adaptive throttler paces, halves on throttle and recovers additively."""

from __future__ import annotations

import pytest

from aggregator.scheduler import AdaptiveThrottler


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_throttler_holds_the_rate_without_real_sleep() -> None:
    """20 acquisitions at 5 r/s take 3 s of (fake) time: 5 per 1 s window."""
    clock = FakeClock()
    t = AdaptiveThrottler(rate=5.0, clock=clock, sleep=clock.sleep)
    stamps = []
    for _ in range(20):
        await t.acquire()
        stamps.append(clock.now)
    assert max(sum(1 for s in stamps if w <= s < w + 1.0) for w in stamps) <= 5
    assert 2.9 <= clock.now <= 3.1


async def _most_in_a_second(t: AdaptiveThrottler, clock: FakeClock, n: int = 40) -> int:
    stamps = []
    for _ in range(n):
        await t.acquire()
        stamps.append(clock.now)
    return max(sum(1 for s in stamps if w <= s < w + 1.0 - 1e-9) for w in stamps)


async def test_no_second_ever_holds_more_than_the_rate() -> None:
    """A fractional rate rounds down (2.5 r/s: 2 in any second; 2 per 0.8 s let 4 into one),
    below 1 it spaces requests out, and a throttle's halving from 5 really halves."""
    for rate, most in [(2.5, 2), (3.7, 3), (5.0, 5), (0.5, 1)]:
        clock = FakeClock()
        t = AdaptiveThrottler(rate=rate, clock=clock, sleep=clock.sleep)
        assert await _most_in_a_second(t, clock) == most
    assert (t.rate_limit, t.period) == (1, 2.0)
    clock = FakeClock()
    t = AdaptiveThrottler(rate=5.0, step=0.0, clock=clock, sleep=clock.sleep)
    t.on_throttle()
    assert await _most_in_a_second(t, clock) == 2


async def test_a_request_that_waited_is_counted_from_when_it_left() -> None:
    """Paced at 2 r/s, a request that waited 0.6 s for a slot of the run's gate after its
    `acquire` is counted from when it is sent: the next second's requests wait for it, rather
    than reaching the service in one burst with it."""
    clock = FakeClock()
    t = AdaptiveThrottler(rate=2.0, clock=clock, sleep=clock.sleep)
    sent = []
    for waited in (0.0, 0.6, 0.0, 0.0):
        await t.acquire()
        clock.now += waited  # the gate
        t.sent()
        sent.append(clock.now)
    assert sent == pytest.approx([0.0, 0.6, 1.01, 1.61])  # (the window's 10 ms of slack)


def test_aimd_halves_and_recovers_but_never_exceeds_ceiling() -> None:
    """A throttle halves the rate; successes add `step` up to the configured ceiling."""
    t = AdaptiveThrottler(rate=4.0, step=0.5)
    t.on_throttle()
    assert t.rate == 2.0
    t.on_throttle()
    assert t.rate == 1.0
    for _ in range(100):
        t.on_success()
    assert t.rate == 4.0
    for _ in range(100):
        t.on_throttle()
    assert t.rate == t.floor
