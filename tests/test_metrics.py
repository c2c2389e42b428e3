"""Metrics: what the daemon's /metrics counts for cycles that end without a snapshot."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from aggregator.metrics import Metrics
from aggregator.service import run_forever

from .conftest import SandboxFactory, make_settings


async def test_a_cycle_that_raises_counts_as_failed(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """A cycle that raises (here: its output folder became a file once the daemon had
    started) writes nothing and still counts in `cycles_total{status="failed"}`, so alerts
    on failed cycles see it."""
    sb = await make_sandbox(accounts=2, seed=5, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    out = tmp_path / "out"
    metrics = Metrics()
    stop = asyncio.Event()

    class BreakTheOutputThenStop:
        def cycle_started(self, snapshot_id: str, partitions: int) -> None:
            out.rmdir()  # checked (and created) as the daemon opened
            out.write_text("a file, not a directory")

        def cycle_failed(self, reason: str) -> None:
            stop.set()

    await run_forever(
        settings, stop=stop, observers=[metrics, BreakTheOutputThenStop()], output=out
    )
    sample = metrics.registry.get_sample_value
    assert sample("snowball_aggregator_cycles_total", {"status": "failed"}) == 1
    assert sample("snowball_aggregator_cycles_total", {"status": "complete"}) is None


async def test_assume_role_and_organizations_requests_count_even_when_the_cycle_raises(
    make_sandbox: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`requests_total` counts a cycle's AssumeRole and Organizations requests by outcome,
    also when the cycle then raises (here: its snapshot write fails), as the sandbox saw them."""
    from aggregator.errors import OutputError
    from aggregator.snapshot import Store

    sb = await make_sandbox(accounts=3, seed=5, regions=("eu-west-1",))
    settings = make_settings(
        sb.account_ids[:1],
        regions={"names": ["eu-west-1"]},
        accounts={"organizations": {"enabled": True}},
    )

    async def full_disk(self: Store, *args: Any, **kwargs: Any) -> Any:
        raise OutputError("no space left on device")

    monkeypatch.setattr(Store, "write", full_disk)
    metrics = Metrics()
    stop = asyncio.Event()

    class StopAfterOneCycle:
        def cycle_started(self, snapshot_id: str, partitions: int) -> None:
            pass

        def partition_done(self, result: Any) -> None:
            pass

        def cycle_failed(self, reason: str) -> None:
            stop.set()

    await run_forever(
        settings, stop=stop, observers=[metrics, StopAfterOneCycle()], output=tmp_path
    )
    sample = metrics.registry.get_sample_value
    stats = sb.stats().requests
    assume = sample(
        "snowball_aggregator_requests_total", {"operation": "AssumeRole", "outcome": "ok"}
    )
    assert assume == stats["sts:AssumeRole"] == len(sb.active_account_ids)
    listed = sample(
        "snowball_aggregator_requests_total", {"operation": "ListAccounts", "outcome": "ok"}
    )
    assert listed == stats["organizations:ListAccounts"] >= 1
