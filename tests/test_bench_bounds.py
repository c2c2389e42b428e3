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
