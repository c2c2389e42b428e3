"""Scheduler: the adaptive throttler paces, halves on throttle and recovers additively."""

from __future__ import annotations

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


async def test_fractional_rates_are_exact() -> None:
    """2.5 r/s means 2 per 0.8 s window."""
    t = AdaptiveThrottler(rate=2.5)
    assert (t.rate_limit, t.period) == (2, 0.8)
    t = AdaptiveThrottler(rate=0.5)
    assert (t.rate_limit, t.period) == (1, 2.0)


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
