"""Metrics: Prometheus instruments of one process, fed by cycle observations.

Every metric lives in the `Metrics` object's own `CollectorRegistry` (no global state), and is
exposed on `/metrics` by the daemon (see health.py).
"""

from __future__ import annotations

import time
from collections import Counter as Tally
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .fetch import PartitionResult
from .records import JobRecord

if TYPE_CHECKING:
    from .service import RunSummary

__all__ = ["Metrics"]

_PREFIX = "snowball_aggregator"


class Metrics:
    """The daemon's instruments; `observe_*` methods are called by the service loop."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            f"{_PREFIX}_requests",
            "AWS requests by operation and outcome (ok or the error code)",
            ["operation", "outcome"],
            registry=r,
        )
        self.throttles = Counter(f"{_PREFIX}_throttles", "Throttling answers received", registry=r)
        self.retries = Counter(f"{_PREFIX}_retries", "Requests retried after an error", registry=r)
        self.restarts = Counter(
            f"{_PREFIX}_nexttoken_restarts",
            "Partitions restarted from their first page after InvalidNextToken or a NextToken "
            "the chain had already returned",
            registry=r,
        )
        self.partition_duration = Histogram(
            f"{_PREFIX}_partition_duration_seconds",
            "Time to fetch one partition, retries included",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900),
            registry=r,
        )
        self.partitions = Gauge(
            f"{_PREFIX}_partitions",
            "Partitions of the last cycle by status",
            ["status"],
            registry=r,
        )
        self.jobs_by_state = Gauge(
            f"{_PREFIX}_jobs_by_state",
            "Jobs in the last snapshot by JobState",
            ["state"],
            registry=r,
        )
        self.jobs_by_type = Gauge(
            f"{_PREFIX}_jobs_by_type",
            "Jobs in the last snapshot by SnowballType",
            ["type"],
            registry=r,
        )
        self.stale_jobs = Gauge(
            f"{_PREFIX}_stale_jobs",
            "Jobs carried forward as stale in the last snapshot",
            registry=r,
        )
        self.last_success = Gauge(
            f"{_PREFIX}_last_successful_cycle_timestamp_seconds",
            "Unix time at which the last complete or partial cycle finished",
            registry=r,
        )
        self.cycle_duration = Gauge(
            f"{_PREFIX}_cycle_duration_seconds", "Wall time of the last cycle", registry=r
        )
        self.cycles = Counter(f"{_PREFIX}_cycles", "Cycles run, by outcome", ["status"], registry=r)
        self.skipped_cycles = Counter(
            f"{_PREFIX}_skipped_cycles",
            "Scheduled cycles skipped because the previous one was still running",
            registry=r,
        )

    def cycle_started(self, snapshot_id: str, partitions: int) -> None:
        """Nothing to count until partitions finish."""

    def partition_done(self, result: PartitionResult) -> None:
        """Count one finished partition's requests, throttles, retries and duration."""
        errors = sum(n for _, n in result.errors)
        ok = result.requests - errors
        if ok:
            self.requests.labels("ListJobs", "ok").inc(ok)
        for code, n in result.errors:
            self.requests.labels("ListJobs", code).inc(n)
        if result.throttles:
            self.throttles.inc(result.throttles)
        if result.retries:
            self.retries.inc(result.retries)
        if result.restarts:
            self.restarts.inc(result.restarts)
        self.partition_duration.observe(result.duration)

    def requests_made(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Count a cycle's AssumeRole and Organizations requests by (operation, outcome),
        whether the cycle finished or raised (ListJobs are counted by `partition_done`)."""
        for (operation, outcome), n in counts.items():
            self.requests.labels(operation, outcome).inc(n)

    def requests_retried(self, retries: int, throttles: int) -> None:
        """Count a cycle's AssumeRole and Organizations retries and throttling answers,
        whether the cycle finished or raised (ListJobs ones are counted by `partition_done`)."""
        if retries:
            self.retries.inc(retries)
        if throttles:
            self.throttles.inc(throttles)

    def cycle_finished(self, summary: RunSummary, records: Sequence[JobRecord]) -> None:
        """Set the last cycle's gauges from its summary and snapshot records."""
        states: Tally[str] = Tally()
        types: Tally[str] = Tally()
        for record in records:
            states[record.job_state or "null"] += 1
            types[record.snowball_type or "null"] += 1
        self.jobs_by_state.clear()
        self.jobs_by_type.clear()
        for state, n in states.items():
            self.jobs_by_state.labels(state).set(n)
        for kind, n in types.items():
            self.jobs_by_type.labels(kind).set(n)
        self.stale_jobs.set(summary.stale)
        for name in ("ok", "failed", "skipped"):
            self.partitions.labels(name).set(summary.partitions.get(name, 0))
        self.cycle_duration.set(summary.wall_seconds)
        self.cycles.labels(summary.status).inc()
        if summary.status in {"complete", "partial"}:
            self.last_success.set(time.time())

    def cycle_failed(self, reason: str) -> None:
        """A cycle that raised (discovery or the output location failed): no snapshot, but
        counted as a failed cycle like one whose partitions all failed."""
        self.cycles.labels("failed").inc()

    def cycle_skipped(self, missed: int) -> None:
        """Scheduled cycles that did not run because the previous one overran."""
        self.skipped_cycles.inc(missed)
