"""The benchmark suite's lower bounds (tests/benchmarks/suite.py): the issue's targets are
judged against them, so they must be right."""

from __future__ import annotations

import pytest

from tests.benchmarks.suite import discovery_bound, first_run_order, rate_bound


def test_rate_bound_is_the_aggregators_window() -> None:
    """5 req/s is 5 requests in any 1 s window: 24 pages of 50 ms start in bursts of five at
    0, 1, 2, 3 and 4 s; the last of those (the 4th of the burst at 4 s) ends 4 x 50 ms later."""
    assert rate_bound(1, 0.05, 5.0) == pytest.approx(0.05)
    assert rate_bound(5, 0.05, 5.0) == pytest.approx(0.25)
    assert rate_bound(6, 0.05, 5.0) == pytest.approx(1.05)
    assert rate_bound(24, 0.05, 5.0) == pytest.approx(4.20)
    assert rate_bound(10, 0.05, 1000.0) == pytest.approx(0.5)  # no pacing: the chain


def test_discovery_bound_counts_the_first_pages_before_each_chain() -> None:
    # One long chain started first: its own pace. Started 100th: 100 answers before it.
    assert discovery_bound([6], 0.001, 0.05, 5.0) == pytest.approx(0.001 + rate_bound(5, 0.05, 5))
    late = discovery_bound([1] * 99 + [6], 0.001, 0.05, 5.0)
    assert late == pytest.approx(0.100 + rate_bound(5, 0.05, 5.0))
    # Many one-page partitions: the sandbox's time to answer them all.
    assert discovery_bound([1] * 1000, 0.001, 0.05, 5.0) == pytest.approx(1.0)


def test_first_run_order_starts_us_regions_then_accounts_round_robin() -> None:
    order = first_run_order(["1", "2"], ["eu-west-1", "us-east-1", "ap-south-1"])
    assert order == [
        ("1", "us-east-1"),
        ("2", "us-east-1"),
        ("1", "ap-south-1"),
        ("2", "ap-south-1"),
        ("1", "eu-west-1"),
        ("2", "eu-west-1"),
    ]


def test_daemon_bench_verdict_holds_memory_descriptors_and_jobs_flat() -> None:
    """The daemon benchmark's targets compare every cycle after the warm-up with the last
    warm-up cycle: flat passes; a resident set that grows past 5% (or 10 MB) in any cycle,
    one more descriptor or thread, or a cycle short of the truth fails."""
    from tests.benchmarks.daemon_bench import verdict

    def rows(rss: list[float], fds: int = 70, jobs: int = 100) -> list[dict[str, object]]:
        return [
            {
                "cycle": i + 1,
                "rss_mb": r,
                "fds": fds,
                "threads": 2,
                "status": "complete",
                "jobs": jobs,
            }
            for i, r in enumerate(rss)
        ]

    flat = rows([100.0, 300.0, 300.0, 304.0, 309.0])
    assert verdict(flat, 3, 100)[0]
    assert not verdict(rows([100.0, 300.0, 300.0, 305.0, 316.0]), 3, 100)[0]  # +16 > 15 MB
    assert verdict(rows([50.0, 60.0, 60.0, 69.0]), 3, 100)[0]  # within the 10 MB floor
    assert not verdict(rows([50.0, 60.0, 60.0, 75.0, 60.0]), 3, 100)[0]  # a peak counts
    leaky = [*flat[:4], {**flat[4], "fds": 71}]
    ok, lines = verdict(leaky, 3, 100)
    assert not ok and lines[1].startswith("  [FAIL] open descriptors 70 after cycle 3, at most 71")
    assert not verdict(flat, 3, 101)[0]  # a cycle short of the truth
