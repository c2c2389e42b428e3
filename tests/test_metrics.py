"""Metrics: what the daemon's /metrics counts for cycles that end without a snapshot."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aggregator.metrics import Metrics
from aggregator.service import run_forever

from .conftest import SandboxFactory, make_settings


async def test_a_cycle_that_raises_counts_as_failed(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """A cycle that raises (here: its output location is under a file, not a directory)
    writes nothing and still counts in `cycles_total{status="failed"}`, so alerts on failed
    cycles see it."""
    sb = await make_sandbox(accounts=2, seed=5, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    metrics = Metrics()
    stop = asyncio.Event()

    class StopAfterOneCycle:
        def cycle_failed(self, reason: str) -> None:
            stop.set()

    await run_forever(
        settings, stop=stop, observers=[metrics, StopAfterOneCycle()], output=blocker / "out"
    )
    sample = metrics.registry.get_sample_value
    assert sample("snowball_aggregator_cycles_total", {"status": "failed"}) == 1
    assert sample("snowball_aggregator_cycles_total", {"status": "complete"}) is None
