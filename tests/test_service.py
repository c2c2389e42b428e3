"""End to end over loopback: real aiobotocore clients against the sandbox, snapshot == truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from aggregator.plan import US_REGIONS
from aggregator.service import run_once

from .conftest import SandboxFactory, make_settings

COMPARED = (
    "account_id",
    "job_id",
    "job_state",
    "job_type",
    "snowball_type",
    "is_master",
    "creation_date",
    "description",
)


def read_snapshot(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def expected(truth: list[dict[str, Any]], us_strategy: str) -> list[dict[str, Any]]:
    """Truth in record form: with "one", US jobs are seen from us-east-1 only."""
    out = []
    for job in truth:
        regions = list(job["regions"])
        if us_strategy == "one" and set(regions) & set(US_REGIONS):
            regions = [r for r in regions if r not in US_REGIONS] + ["us-east-1"]
        out.append({**{k: job[k] for k in COMPARED}, "regions": sorted(regions)})
    return out


def project(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**{k: r[k] for k in COMPARED}, "regions": r["regions"]} for r in records]


@pytest.mark.parametrize("us_strategy", ["all", "one"])
async def test_snapshot_equals_truth(
    make_sandbox: SandboxFactory, tmp_path: Path, us_strategy: str
) -> None:
    """20 accounts x all regions: no job missing, none extra, none duplicated."""
    sb = await make_sandbox(accounts=20, seed=11)
    settings = make_settings(sb.account_ids, regions={"us_strategy": us_strategy})
    summary = await run_once(settings, output=tmp_path)
    assert summary.status == "complete" and summary.exit_code == 0
    records = read_snapshot(summary.data_path)
    keys = [(r["account_id"], r["job_id"]) for r in records]
    assert keys == sorted(set(keys)), "sorted and unique"
    assert project(records) == expected(sb.truth(), us_strategy)
    assert all(r["stale"] is False and r["snapshot_id"] == summary.snapshot_id for r in records)
    manifest = orjson.loads(summary.manifest_path.read_bytes())
    assert manifest["partitions"]["failed"] == 0
    assert manifest["jobs"] == len(records)
    if us_strategy == "all":
        us_jobs = sum(1 for r in records if set(r["regions"]) & set(US_REGIONS))
        assert manifest["duplicates_removed"] == 3 * us_jobs


async def test_us_strategy_one_makes_fewer_requests(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Querying one US region per account needs fewer ListJobs calls than all four."""
    sb = await make_sandbox(accounts=20, seed=5)
    counts = {}
    for strategy in ("all", "one"):
        sb.reset_stats()
        summary = await run_once(
            make_settings(sb.account_ids, regions={"us_strategy": strategy}),
            output=tmp_path / strategy,
        )
        counts[strategy] = summary.requests
        assert summary.requests == sum(sb.stats().requests.values())
    assert counts["one"] < counts["all"]


async def test_limits_hold_as_measured_by_the_sandbox(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Peak in-flight never exceeds max_concurrency; no partition exceeds its rate."""
    sb = await make_sandbox(
        accounts=12, seed=3, max_jobs=200, jobs={("200000000000", "eu-west-1"): 2500}
    )
    settings = make_settings(
        sb.account_ids,
        limits={"max_concurrency": 4, "requests_per_second": 20.0},
        regions={"names": ["us-east-1", "eu-west-1", "ap-southeast-2"]},
    )
    summary = await run_once(settings, output=tmp_path)
    assert summary.status == "complete"
    stats = sb.stats()
    assert 1 <= stats.peak_in_flight <= 4
    windows = stats.max_requests_per_second
    assert len(windows) == 36
    assert max(windows.values()) <= 20 + 1  # the rate plus one request of burst
    assert max(windows.values()) >= 10  # the test did push a partition to its limit
    assert max(stats.peak_in_flight_by_region.values()) == 1  # pages strictly in order


async def test_cbor_protocol_returns_the_same_records(
    make_sandbox: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A botocore model that prefers Smithy RPC v2 CBOR gives the same snapshot as JSON."""
    from aggregator.sandbox import cbor_model_path

    sb = await make_sandbox(accounts=6, seed=17, jobs={("200000000001", "eu-west-1"): 450})
    settings = make_settings(sb.account_ids, regions={"names": ["us-east-2", "eu-west-1"]})
    json_run = await run_once(settings, output=tmp_path / "json")
    assert sb.stats().snowball_protocols == {"json": json_run.requests - json_run.accounts}
    sb.reset_stats()
    monkeypatch.setenv("AWS_DATA_PATH", str(cbor_model_path(tmp_path / "models")))
    cbor_run = await run_once(settings, output=tmp_path / "cbor")
    assert set(sb.stats().snowball_protocols) == {"cbor"}
    assert project(read_snapshot(cbor_run.data_path)) == project(read_snapshot(json_run.data_path))
    assert json_run.jobs == cbor_run.jobs > 450


async def test_the_previous_run_orders_the_next_longest_chain_first(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """The manifest's job counts order the next run: the partition with the longest chain
    (three pages here) is asked first. A first run without history goes in plan order."""
    spec: dict[str, Any] = {
        "accounts": 3,
        "seed": 40,
        "regions": ("eu-west-1",),
        "jobs": {("200000000002", "eu-west-1"): 250},
    }
    settings = make_settings(
        ["200000000000", "200000000001", "200000000002"],
        regions={"names": ["eu-west-1"]},
        limits={"max_concurrency": 1},
    )
    arrivals = []
    for _ in range(2):  # a fresh sandbox each time: its counts list first requests in order
        sb = await make_sandbox(**spec)
        await run_once(settings, output=tmp_path)
        arrivals.append([account for account, _ in sb.stats().list_jobs_requests])
    assert arrivals[0][0] == "200000000000"
    assert arrivals[1][0] == "200000000002"


async def test_each_partition_is_ranked_by_its_place_in_the_plan(
    make_sandbox: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker ranks each partition's first requests (its ListJobs and its account's
    AssumeRole, `gate.ranked`) by the partition's place in the plan, so the gate serves them
    in plan order however late they reach it: after a run that saw the long chain, its
    partition is rank 0."""
    from aggregator import gate, scheduler

    seen: list[tuple[int, str]] = []
    real = scheduler.fetch_partition

    async def spy(partition: Any, **options: Any) -> Any:
        seen.append((gate._rank.get(), partition.account_id))
        return await real(partition, **options)

    monkeypatch.setattr(scheduler, "fetch_partition", spy)
    settings = make_settings(
        ["200000000000", "200000000001", "200000000002"],
        regions={"names": ["eu-west-1"]},
    )
    await make_sandbox(
        accounts=3, seed=40, regions=("eu-west-1",), jobs={("200000000002", "eu-west-1"): 250}
    )
    for _ in range(2):
        seen.clear()
        await run_once(settings, output=tmp_path)
    assert sorted(seen) == [(0, "200000000002"), (1, "200000000000"), (2, "200000000001")]


async def test_a_cycle_forgets_the_credentials_of_accounts_it_no_longer_plans(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Each cycle keeps the credentials of the accounts it plans only: an account that leaves
    and comes back assumes its role again (the cache does not grow with churn)."""
    from aggregator.service import Aggregator

    sb = await make_sandbox(accounts=3, seed=8, regions=("eu-west-1",))
    regions = {"names": ["eu-west-1"]}
    every = make_settings(sb.account_ids, regions=regions)
    fewer = make_settings(sb.account_ids[:2], regions=regions)
    assumed = []
    async with Aggregator(every, output=tmp_path) as aggregator:
        for settings in (every, fewer, every):
            aggregator.settings = settings
            summary = await aggregator.cycle()
            assumed.append(_manifest(summary)["requests"]["assume_role"])
    assert assumed == [3, 0, 1]


def _manifest(summary: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = orjson.loads(Path(summary.manifest_path).read_bytes())
    return manifest


async def test_a_run_cancelled_once_it_published_finishes_and_reports_its_snapshot(
    make_sandbox: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancellation (SIGTERM, a shutdown deadline) that comes after LATEST started to move
    does not cut the rest short: the run finishes and reports the snapshot it published,
    instead of claiming it was cancelled with the previous snapshot still LATEST."""
    import asyncio

    from aggregator.snapshot import Store

    sb = await make_sandbox(accounts=2, seed=8, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    pruning, proceed, pruned = asyncio.Event(), asyncio.Event(), asyncio.Event()
    prune = Store.prune

    async def held_prune(self: Store, retain: int) -> Any:
        pruning.set()
        await proceed.wait()  # the cancellation lands here
        result = await prune(self, retain)
        pruned.set()
        return result

    monkeypatch.setattr(Store, "prune", held_prune)
    run = asyncio.create_task(run_once(settings, output=tmp_path))
    await pruning.wait()
    run.cancel()
    await asyncio.sleep(0)
    proceed.set()
    summary = await run
    assert pruned.is_set() and not run.cancelled()
    latest = (tmp_path / "LATEST").read_text().strip()
    assert latest.endswith(f"{summary.snapshot_id}.manifest.json")


async def test_to_the_end_absorbs_a_cancellation_and_finishes() -> None:
    """`to_the_end` runs its awaitable to the end through a cancellation of the awaiting task,
    which then goes on as if the cancellation had come after; without it, the task stops."""
    import asyncio

    from aggregator.snapshot import to_the_end

    started = asyncio.Event()

    async def work(steps: list[str], proceed: asyncio.Event) -> str:
        steps.append("start")
        started.set()
        await proceed.wait()
        steps.append("end")
        return "done"

    async def caller(shielded: bool, steps: list[str], proceed: asyncio.Event) -> str:
        job = work(steps, proceed)
        value = await (to_the_end(job) if shielded else job)
        await asyncio.sleep(0)  # the task is not left cancelling
        return value + "+after"

    for shielded in (True, False):
        steps: list[str] = []
        proceed = asyncio.Event()
        started.clear()
        task = asyncio.create_task(caller(shielded, steps, proceed))
        await started.wait()
        task.cancel()
        await asyncio.sleep(0)
        proceed.set()
        if shielded:
            assert await task == "done+after" and steps == ["start", "end"]
            assert task.cancelling() == 0
        else:
            with pytest.raises(asyncio.CancelledError):
                await task
            assert steps == ["start"]
