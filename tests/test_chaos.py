"""Chaos: 50 accounts x every region under every fault at once; the snapshot is still exact."""

from __future__ import annotations

import time
from pathlib import Path

from aggregator.retry import RetryPolicy
from aggregator.sandbox import Faults
from aggregator.service import run_once

from .conftest import SandboxFactory, make_settings
from .test_service import expected, project, read_snapshot

CHAOS = Faults(
    p_500=0.025,
    p_503=0.025,  # 5% 5xx in all
    p_reset=0.02,
    p_hang=0.01,
    hang_seconds=5.0,  # far longer than the client's 0.4 s timeout
    throttle_rps=2.0,  # below the client's 5 r/s
    throttle_burst=2,
    token_ttl=1.5,  # shorter than the slowest partition (8 pages at 2 r/s)
    credential_ttl=4.0,  # shorter than the run
    churn=0.2,
    churn_max=2,
)


async def test_chaos_snapshot_equals_truth(make_sandbox: SandboxFactory, tmp_path: Path) -> None:
    """Every job exactly once, though 5xx, resets, hangs, throttles, token and credential
    expiry and churn all happen in the same run."""
    sb = await make_sandbox(accounts=50, seed=1234, max_jobs=800, faults=CHAOS)
    settings = make_settings(
        sb.account_ids,
        limits={"max_concurrency": 64, "requests_per_second": 5.0, "timeout_seconds": 0.4},
    )
    policy = RetryPolicy(max_attempts=12, base_delay=0.05, max_delay=0.5, max_restarts=20)
    started = time.monotonic()
    summary = await run_once(settings, output=tmp_path, policy=policy)
    wall = time.monotonic() - started
    stats = sb.stats()
    print(
        f"\nchaos: partitions={summary.partitions} jobs={summary.jobs} "
        f"requests={summary.requests} retries={summary.retries} throttles={summary.throttles} "
        f"restarts={summary.restarts} wall={wall:.1f}s faults={dict(sorted(stats.faults.items()))}"
    )
    assert summary.status == "complete", summary.failed[:3]
    records = read_snapshot(summary.data_path)
    keys = [(r["account_id"], r["job_id"]) for r in records]
    assert len(keys) == len(set(keys)), "no duplicates"
    assert project(records) == expected(sb.truth(), "all"), "no job missing, none extra"
    for kind in ("500", "503", "reset", "hang", "throttle", "churn", "credential_expired"):
        assert stats.faults.get(kind, 0) > 0, f"the chaos run never met {kind!r}"
    assert summary.retries > 0 and summary.throttles > 0 and summary.restarts > 0
