"""Metrics: what the daemon's /metrics counts for cycles that end without a snapshot."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from aggregator.metrics import Metrics
from aggregator.retry import RetryPolicy
from aggregator.sandbox import Faults
from aggregator.service import Aggregator, run_forever

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


FAST = RetryPolicy(max_attempts=10, base_delay=0.005, max_delay=0.05, max_restarts=10)


def _manifest(path: Any) -> Any:
    return orjson.loads(Path(path).read_bytes())


def _requests(metrics: Metrics, operation: str, outcome: str) -> float | None:
    return metrics.registry.get_sample_value(
        "snowball_aggregator_requests_total", {"operation": operation, "outcome": outcome}
    )


async def test_a_throttle_on_the_last_attempt_counts(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """With one attempt per page, the throttled page fails the partition: that throttle is
    in the manifest, the summary and `throttles_total` (it was left out: one short each)."""
    sb = await make_sandbox(
        accounts=1,
        seed=1,
        regions=("eu-west-1",),
        jobs={("200000000000", "eu-west-1"): 300},
        faults=Faults(throttle_rps=0.5, throttle_burst=1),
    )
    settings = make_settings(
        sb.account_ids, regions={"names": ["eu-west-1"]}, limits={"max_attempts": 1}
    )
    metrics = Metrics()
    summary = await run_forever(settings, burst=True, observers=[metrics], output=tmp_path)
    assert summary is not None and summary.status == "failed"
    assert sb.stats().throttled == 1
    assert summary.throttles == 1
    assert metrics.registry.get_sample_value("snowball_aggregator_throttles_total") == 1
    assert _requests(metrics, "ListJobs", "ThrottlingException") == 1


async def test_a_request_cut_off_by_the_partition_deadline_is_not_ok(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """The sandbox holds every ListJobs; the partition deadline cuts the request off: it is
    counted under the deadline's code, where it counted as an "ok" answer."""
    sb = await make_sandbox(
        accounts=1, seed=1, regions=("eu-west-1",), faults=Faults(p_hang=1.0, hang_seconds=2.0)
    )
    settings = make_settings(
        sb.account_ids,
        regions={"names": ["eu-west-1"]},
        limits={"timeout_seconds": 10, "partition_deadline_seconds": 0.2},
    )
    metrics = Metrics()
    summary = await run_forever(settings, burst=True, observers=[metrics], output=tmp_path)
    assert summary is not None
    assert [f["error_code"] for f in summary.failed] == ["PartitionDeadlineExceeded"]
    assert _requests(metrics, "ListJobs", "ok") is None
    assert _requests(metrics, "ListJobs", "PartitionDeadlineExceeded") == 1


async def test_a_renewal_refused_while_signing_is_one_assume_role_per_account(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """The keys expire within botocore's last minutes, so the next cycle renews them while it
    signs ListJobs; the roles no longer trust the hub. Each account asks AssumeRole once (not
    once per region), no ListJobs goes out, and the counts say so: AssumeRole denied, no
    ListJobs (they were counted as ListJobs requests denied too)."""
    regions = ("eu-west-1", "eu-central-1")
    sb = await make_sandbox(
        accounts=2, seed=1, regions=regions, faults=Faults(advertised_credential_ttl=300)
    )
    settings = make_settings(sb.account_ids, regions={"names": list(regions)})
    metrics = Metrics()
    async with Aggregator(settings, observers=[metrics], output=tmp_path) as aggregator:
        first = await aggregator.cycle()
        assert first.status == "complete"
        listed = _requests(metrics, "ListJobs", "ok")
        sb.faults = Faults(
            advertised_credential_ttl=300, deny_assume_role=frozenset(sb.account_ids)
        )
        sb.reset_stats()
        second = await aggregator.cycle()
    wire = sb.stats().requests
    assert wire.get("sts:AssumeRole") == len(sb.account_ids)
    assert not wire.get("snowball:ListJobs")
    assert second.status == "failed"
    assert {(f["operation"], f["error_code"]) for f in second.failed} == {
        ("AssumeRole", "AccessDenied")
    }
    manifest = _manifest(second.manifest_path)
    assert manifest["requests"]["list_jobs"] == 0
    assert manifest["requests"]["assume_role"] == len(sb.account_ids)
    assert _requests(metrics, "ListJobs", "ok") == listed
    assert _requests(metrics, "ListJobs", "AccessDenied") is None
    assert _requests(metrics, "AssumeRole", "AccessDenied") == len(sb.account_ids)


async def test_hub_credentials_that_cannot_be_loaded_send_no_request(
    make_sandbox: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without hub credentials botocore refuses to sign: no request goes out, and none is
    counted (three AssumeRole requests were, in the manifest, the summary and the metrics)."""
    sb = await make_sandbox(accounts=3, seed=1, regions=("eu-west-1",))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    metrics = Metrics()
    summary = await run_forever(settings, burst=True, observers=[metrics], output=tmp_path)
    assert summary is not None and summary.status == "failed"
    assert {f["error_code"] for f in summary.failed} == {"NoCredentials"}
    assert sb.stats().total_requests == 0
    assert summary.requests == 0
    assert _requests(metrics, "AssumeRole", "NoCredentials") is None


async def test_assume_role_and_organizations_retries_count_with_the_others(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """STS answers half its requests with a 500 and Organizations tears a page: each of those
    was tried again, and the manifest's `retries`, the summary and `retries_total` count
    them with the ListJobs retries (they counted ListJobs only)."""
    sb = await make_sandbox(
        accounts=30,
        seed=9,
        regions=("eu-west-1",),
        faults=Faults(p_sts_500=0.5, p_500=0.2, torn_account_pages=1),
    )
    settings = make_settings(
        [], regions={"names": ["eu-west-1"]}, accounts={"organizations": {"enabled": True}}
    )
    metrics = Metrics()
    summary = await run_forever(
        settings, burst=True, observers=[metrics], output=tmp_path, policy=FAST
    )
    assert summary is not None and summary.status == "complete"
    faults = sb.stats().faults
    assert faults["sts_500"] > 0 and faults["500"] > 0 and faults["torn_account_page"] == 1
    # Every fault was answered to a request that was then tried again, and nothing else was.
    expected = faults["sts_500"] + faults["500"] + faults["torn_account_page"]
    assert summary.retries == expected, faults
    assert _manifest(summary.manifest_path)["retries"] == expected
    assert metrics.registry.get_sample_value("snowball_aggregator_retries_total") == expected
