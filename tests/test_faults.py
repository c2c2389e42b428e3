"""Fault tolerance: every injected failure is retried, restarted or reported, never lost."""

from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from aggregator.errors import OutputError
from aggregator.retry import RetryPolicy
from aggregator.sandbox import Faults
from aggregator.service import run_once

from .conftest import SandboxFactory, make_settings
from .test_service import expected, project, read_snapshot

FAST = RetryPolicy(max_attempts=10, base_delay=0.005, max_delay=0.05, max_restarts=10)
BIG = ("200000000001", "eu-west-1")  # a partition with several pages
REGIONS = {"names": ["us-east-1", "us-west-2", "eu-west-1"]}


def truth_for(sb: Any, regions: list[str], strategy: str = "all") -> list[dict[str, Any]]:
    """The sandbox truth restricted to the queried regions, in record form."""
    out = []
    for job in expected(sb.truth(), strategy):
        kept = [r for r in job["regions"] if r in regions]
        if kept:
            out.append({**job, "regions": kept})
    return out


@pytest.mark.parametrize(
    ("faults", "counter"),
    [
        (Faults(p_500=0.3), "retries"),
        (Faults(p_503=0.3), "retries"),
        (Faults(p_reset=0.3), "retries"),
        (Faults(p_hang=0.3, hang_seconds=5.0), "retries"),
        (Faults(p_truncated=0.3), "retries"),
        (Faults(p_malformed=0.3), "retries"),
        (Faults(p_gateway=0.3), "retries"),
        (Faults(throttle_rps=3.0, throttle_burst=2), "throttles"),
        (Faults(churn=0.5, churn_max=2), "restarts"),
    ],
    ids=["500", "503", "reset", "hang", "truncated", "malformed", "gateway", "throttle", "churn"],
)
async def test_each_fault_is_survived_exactly(
    make_sandbox: SandboxFactory, tmp_path: Path, faults: Faults, counter: str
) -> None:
    """Under one kind of fault the snapshot still equals the truth, and the fault was met."""
    sb = await make_sandbox(accounts=5, seed=31, jobs={BIG: 640}, faults=faults)
    settings = make_settings(
        sb.account_ids, regions=REGIONS, limits={"timeout_seconds": 0.5, "max_concurrency": 8}
    )
    summary = await run_once(settings, output=tmp_path, policy=FAST)
    assert summary.status == "complete", summary.failed
    assert project(read_snapshot(summary.data_path)) == truth_for(sb, REGIONS["names"])
    assert getattr(summary, counter) > 0
    assert summary.requests == sb.stats().total_requests


async def test_a_gateway_answer_that_is_json_but_no_object_is_retried_without_direct(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """A 502 whose body is JSON but no object (a gateway's `null`) made botocore's JSON error
    parser raise AttributeError, and the partition failed at once as "unexpected error"; it is
    an HTTP 5xx like any other, retried, on botocore's own sending path too (`direct=False`;
    the direct path is the parametrized test above)."""
    sb = await make_sandbox(accounts=4, seed=39, jobs={BIG: 640}, faults=Faults(p_gateway=0.3))
    settings = make_settings(sb.account_ids, regions=REGIONS, limits={"max_concurrency": 8})
    summary = await run_once(settings, output=tmp_path, policy=FAST, direct=False)
    assert summary.status == "complete", summary.failed
    assert summary.retries > 0
    assert project(read_snapshot(summary.data_path)) == truth_for(sb, REGIONS["names"])


@pytest.mark.parametrize("direct", [True, False])
async def test_a_job_state_that_is_no_string_never_poisons_the_snapshot(
    make_sandbox: SandboxFactory, tmp_path: Path, direct: bool
) -> None:
    """A service out of its model answers `"JobState": 5`: the record says "5" (text, as
    every reader expects), where the number went into the snapshot and the next run with a
    failed partition, which reads the snapshot back to carry jobs forward, refused it as
    damaged, that run and every later one."""
    account, other = "200000000000", "200000000001"
    jobs = {(account, "eu-west-1"): 3, (other, "eu-west-1"): 3}
    sb = await make_sandbox(accounts=2, seed=40, regions=("eu-west-1",), jobs=jobs)
    assert sorted(sb.account_ids) == [account, other]
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    job = next(j["job_id"] for j in sb.truth() if j["account_id"] == account)
    sb.set_job_state(account, job, 5)  # type: ignore[arg-type]
    first = await run_once(settings, output=tmp_path, policy=FAST, direct=direct)
    assert first.status == "complete"
    assert [r["job_state"] for r in read_snapshot(first.data_path) if r["job_id"] == job] == ["5"]
    sb.faults = Faults(deny_list_jobs=frozenset({other}))
    second = await run_once(settings, output=tmp_path, policy=FAST, direct=direct)
    assert second.status == "partial" and second.stale > 0


@pytest.mark.parametrize("protocol", ["json", "cbor"])
async def test_malformed_and_truncated_bodies_on_both_protocols(
    make_sandbox: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, protocol: str
) -> None:
    """Torn and garbage bodies are retried over CBOR as over JSON, never read as empty pages."""
    from aggregator.sandbox import cbor_model_path

    if protocol == "cbor":
        monkeypatch.setenv("AWS_DATA_PATH", str(cbor_model_path(tmp_path / "models")))
    sb = await make_sandbox(
        accounts=4, seed=32, jobs={BIG: 420}, faults=Faults(p_malformed=0.2, p_truncated=0.2)
    )
    settings = make_settings(sb.account_ids, regions=REGIONS)
    summary = await run_once(settings, output=tmp_path / "out", policy=FAST)
    assert summary.status == "complete", summary.failed
    assert summary.retries > 0
    assert set(sb.stats().snowball_protocols) == {protocol}
    assert project(read_snapshot(summary.data_path)) == truth_for(sb, REGIONS["names"])


@pytest.mark.parametrize("max_attempts", [10, 1])
async def test_expired_credentials_are_renewed_once_and_the_page_continues(
    make_sandbox: SandboxFactory, tmp_path: Path, max_attempts: int
) -> None:
    """Credentials that die server-side mid-run are renewed and nothing is lost; the first
    renewal is free, so even with one attempt per page (the expired keys were kept then, and
    every later cycle failed on them)."""
    now = [0.0]
    sb = await make_sandbox(accounts=3, seed=33, jobs={BIG: 500})
    sb._clock = lambda: now[0]
    sb.faults = replace(sb.faults, credential_ttl=10.0)
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    from aggregator.service import Aggregator

    policy = replace(FAST, max_attempts=max_attempts)
    async with Aggregator(settings, output=tmp_path, policy=policy) as aggregator:
        first = await aggregator.cycle()
        assume_first = sb.stats().requests.get("sts:AssumeRole", 0)
        now[0] += 60.0  # every issued credential is now expired on the server
        second = await aggregator.cycle()
    assert first.status == second.status == "complete"
    assert sb.stats().errors.get("ExpiredTokenException", 0) >= 1
    # one fresh AssumeRole per account, not one per partition or per request
    assert sb.stats().requests["sts:AssumeRole"] - assume_first == len(sb.account_ids)
    assert project(read_snapshot(second.data_path)) == truth_for(sb, ["eu-west-1"])


@pytest.mark.parametrize("concurrency", [64, 1])
@pytest.mark.parametrize("direct", [True, False])
async def test_keys_the_service_no_longer_recognises_are_renewed_once(
    make_sandbox: SandboxFactory, tmp_path: Path, direct: bool, concurrency: int
) -> None:
    """A daemon whose cached keys the service stops recognising (revoked, or its endpoint
    restarted: `UnrecognizedClientException` in a region that needs no opt-in) assumes each
    account's role again, once, and the cycle is complete. It kept the keys until they neared
    their advertised expiry, about 45 minutes of failed cycles with every job stale. Keys
    refused again after that renewal are a denial: one renewal per account and cycle, whether
    its partitions run together or one after the other (not one per page)."""
    sb = await make_sandbox(accounts=3, seed=34, regions=("eu-west-1", "us-east-1"))
    regions = ["eu-west-1", "us-east-1"]
    settings = make_settings(
        sb.account_ids, regions={"names": regions}, limits={"max_concurrency": concurrency}
    )
    from aggregator.service import Aggregator

    async with Aggregator(settings, output=tmp_path, policy=FAST, direct=direct) as aggregator:
        first = await aggregator.cycle()
        assumed = sb.stats().requests.get("sts:AssumeRole", 0)
        sb.revoke_credentials()
        second = await aggregator.cycle()
        assert first.status == second.status == "complete", second.failed
        assert sb.stats().errors.get("UnrecognizedClientException", 0) >= 1
        # one AssumeRole per account, whatever the number of its partitions
        assert sb.stats().requests["sts:AssumeRole"] - assumed == len(sb.account_ids)
        assert project(read_snapshot(second.data_path)) == truth_for(sb, regions)
        # Regions the account never enabled, outside the opt-in list: one renewal, then failed
        denied = sb.account_ids[0]
        sb.faults = Faults(disabled_regions={denied: frozenset(regions)})
        assumed = sb.stats().requests["sts:AssumeRole"]
        third = await aggregator.cycle()
    assert sorted((f["account_id"], f["region"], f["error_code"]) for f in third.failed) == [
        (denied, region, "UnrecognizedClientException") for region in sorted(regions)
    ]
    assert sb.stats().requests["sts:AssumeRole"] - assumed == 1


@pytest.mark.timeout(60)
async def test_credentials_renewed_while_signing_never_wait_for_a_second_slot(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Credentials inside botocore's refresh window (here: AssumeRole says they expire in
    5 minutes, so every signing renews them) are renewed by a request that already holds a
    slot of the concurrency cap; the renewal goes in that slot. Waiting for a second one would
    deadlock with one slot (or with every slot held by a renewing request) until the partition
    deadline failed the partitions."""
    sb = await make_sandbox(
        accounts=3, seed=35, regions=("eu-west-1",), faults=Faults(advertised_credential_ttl=300)
    )
    settings = make_settings(
        sb.account_ids,
        regions={"names": ["eu-west-1"]},
        limits={"max_concurrency": 1},
    )
    policy = replace(FAST, partition_deadline=10.0)
    summary = await run_once(settings, output=tmp_path, policy=policy)
    assert summary.status == "complete", summary.failed
    assert sb.stats().requests["sts:AssumeRole"] > len(sb.account_ids)  # renewed while signing
    assert sb.stats().peak_in_flight == 1
    assert project(read_snapshot(summary.data_path)) == truth_for(sb, ["eu-west-1"])


async def test_an_unexpected_error_fails_its_partitions_alone(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """An error outside the AWS error tree (here: the aws-cn hub profile the config names
    does not exist, so its STS client cannot even be made) fails that account's partitions,
    named by the error; every other partition completes and the snapshot holds their jobs."""
    sb = await make_sandbox(accounts=3, seed=36, regions=("eu-west-1",))
    china = "333333333333"
    settings = make_settings(
        sb.account_ids,
        accounts={"list": [{"id": china, "role_arn": f"arn:aws-cn:iam::{china}:role/Reader"}]},
        partitions={"aws-cn": {"profile": "no-such-profile"}},
        regions={"names": ["eu-west-1", "cn-north-1"]},
    )
    summary = await run_once(settings, output=tmp_path, policy=FAST)
    assert summary.status == "partial" and summary.exit_code == 1
    assert {(f["account_id"], f["error_code"]) for f in summary.failed} == {
        (china, "ProfileNotFound")
    }
    assert "no-such-profile" in summary.failed[0]["message"]
    assert project(read_snapshot(summary.data_path)) == truth_for(sb, ["eu-west-1"])


async def test_hub_credentials_that_fail_to_load_say_why(
    make_sandbox: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The aws-cn hub profile's credential process fails (an SSO login has expired, say):
    that account's partitions fail as access denied with the provider's own words, where
    they said "unexpected error"; every other partition completes."""
    sb = await make_sandbox(accounts=2, seed=38, regions=("eu-west-1",))
    china = "333333333333"
    process = [sys.executable, "-c", "import sys; sys.exit('the session expired: log in again')"]
    config = tmp_path / "config"
    config.write_text(f"[profile cn]\ncredential_process = {shlex.join(process)}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    settings = make_settings(
        sb.account_ids,
        accounts={"list": [{"id": china, "role_arn": f"arn:aws-cn:iam::{china}:role/Reader"}]},
        partitions={"aws-cn": {"profile": "cn"}},
        regions={"names": ["eu-west-1", "cn-north-1"]},
    )
    summary = await run_once(settings, output=tmp_path / "out", policy=FAST)
    assert summary.status == "partial" and summary.exit_code == 1
    assert {(f["account_id"], f["error_code"]) for f in summary.failed} == {
        (china, "CredentialRetrievalError")
    }
    assert "the session expired: log in again" in summary.failed[0]["message"]
    assert project(read_snapshot(summary.data_path)) == truth_for(sb, ["eu-west-1"])


@pytest.mark.timeout(30)  # without loop detection the chain never ends
async def test_a_looping_next_token_restarts_then_fails_the_partition(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """A service that answers a later page with the NextToken it was given (a chain that
    never ends) is caught at once: each US region tried gets its own `max_restarts` fresh
    starts, then the partition fails as `NextTokenLoop`, with a bounded number of requests;
    the other account completes, and nothing it has is lost."""
    looping = "200000000001"
    sb = await make_sandbox(
        accounts=2,
        seed=37,
        regions=("us-east-1", "us-east-2"),
        jobs={(looping, "us-east-1"): 250},
        faults=Faults(looping_tokens=frozenset({looping})),
    )
    settings = make_settings(
        sb.account_ids,
        regions={"names": ["us-east-1", "us-east-2"], "us_strategy": "one"},
    )
    policy = replace(FAST, max_restarts=2)
    summary = await run_once(settings, output=tmp_path, policy=policy)
    assert summary.status == "partial"
    assert [(f["account_id"], f["error_code"]) for f in summary.failed] == [
        (looping, "NextTokenLoop")
    ]
    # two regions x (1 + 2 restarts): each pass is caught on its second page, the first
    # answer that repeats a token
    assert summary.restarts == 4
    assert sb.stats().faults["looping_token"] == 6
    others = [job for job in truth_for(sb, ["us-east-1", "us-east-2"], "one")]
    others = [job for job in others if job["account_id"] != looping]
    assert project(read_snapshot(summary.data_path)) == others


async def test_an_assume_role_answer_without_credentials_fails_that_account_alone(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """AssumeRole answering 200 with no Credentials is a malformed answer: retried within the
    attempt budget, then that account's partitions fail as MalformedResponse; the others
    complete (it was a KeyError that ended every partition of the run)."""
    sb = await make_sandbox(accounts=3, seed=39, regions=("eu-west-1",))
    broken = sb.account_ids[1]
    sb.faults = replace(sb.faults, assume_role_without_credentials=frozenset({broken}))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    policy = replace(FAST, max_attempts=3)
    summary = await run_once(settings, output=tmp_path, policy=policy)
    assert summary.status == "partial"
    assert [(f["account_id"], f["operation"], f["error_code"]) for f in summary.failed] == [
        (broken, "AssumeRole", "MalformedResponse")
    ]
    assert sb.stats().faults["assume_role_without_credentials"] == 3
    others = [j for j in truth_for(sb, ["eu-west-1"]) if j["account_id"] != broken]
    assert project(read_snapshot(summary.data_path)) == others


async def test_attempt_budget_means_what_it_says(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """max_attempts = 3 sends exactly 3 requests for a page that always fails: no hidden
    botocore retries on top."""
    sb = await make_sandbox(accounts=1, seed=34, faults=Faults(p_500=1.0))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    policy = replace(FAST, max_attempts=3)
    summary = await run_once(settings, output=tmp_path, policy=policy)
    assert summary.status == "failed" and summary.exit_code == 1
    assert sb.stats().requests["snowball:ListJobs"] == 3
    assert summary.failed[0]["error_code"] == "InternalFailure"


async def test_denied_accounts_and_disabled_regions_in_the_manifest(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """AssumeRole and ListJobs denials are failed partitions, each logged as a warning (so a
    log level of `warning` still shows them); a disabled region is skipped (info)."""
    sb = await make_sandbox(accounts=4, seed=35)
    a, b, c, _ = sb.account_ids
    sb.faults = Faults(
        deny_assume_role=frozenset({a}),
        deny_list_jobs=frozenset({b}),
        disabled_regions={c: frozenset({"af-south-1"})},
    )
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1", "af-south-1"]})
    with capture_logs() as logs:
        summary = await run_once(settings, output=tmp_path, policy=FAST)
    levels = {
        (e["event"], e["account_id"], e["region"]): e["log_level"]
        for e in logs
        if e["event"] in ("partition.failed", "partition.skipped")
    }
    assert levels == {
        **{
            ("partition.failed", x, r): "warning"
            for x in (a, b)
            for r in ("eu-west-1", "af-south-1")
        },
        ("partition.skipped", c, "af-south-1"): "info",
    }
    assert summary.status == "partial" and summary.exit_code == 1
    manifest = orjson.loads(summary.manifest_path.read_bytes())
    status = {(p["account_id"], p["region"]): p for p in manifest["partition_status"]}
    assert len(status) == 8
    for region in ("eu-west-1", "af-south-1"):
        assert status[(a, region)]["status"] == "failed"
        assert status[(a, region)]["error_code"] == "AccessDenied"
        assert status[(b, region)]["error_code"] == "AccessDeniedException"
        # The account's AssumeRole names STS's region, not another partition's as if its own
        assert status[(a, region)]["message"].startswith(
            f"AssumeRole for {a} (STS in us-east-1) failed: AccessDenied: "
        ), status[(a, region)]
        assert status[(b, region)]["message"].startswith(
            f"ListJobs in {b}/{region} failed: AccessDeniedException: "
        ), status[(b, region)]
    assert status[(c, "af-south-1")]["status"] == "skipped"
    assert status[(c, "af-south-1")]["error_code"] == "UnrecognizedClientException"
    assert status[(c, "eu-west-1")]["status"] == "ok"
    assert manifest["partitions"] == {"planned": 8, "ok": 3, "failed": 4, "skipped": 1}
    failed_ops = {(f["account_id"], f["operation"]) for f in manifest["failed_partitions"]}
    assert failed_ops == {(a, "AssumeRole"), (b, "ListJobs")}
    # AssumeRole for the denied account was tried once for the run, not once per region
    assert sb.stats().errors.get("AccessDenied", 0) == 1


async def test_failed_partition_keeps_its_jobs_as_stale(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Run 1 succeeds; run 2 fails one account: its jobs stay, stale, with last_seen kept."""
    sb = await make_sandbox(accounts=3, seed=36)
    victim = sb.account_ids[1]
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1", "us-east-1"]})
    first = await run_once(settings, output=tmp_path, policy=FAST)
    before = {r["job_id"]: r for r in read_snapshot(first.data_path)}
    victim_jobs = {j for j, r in before.items() if r["account_id"] == victim}
    assert victim_jobs
    sb.faults = replace(sb.faults, deny_list_jobs=frozenset({victim}))
    second = await run_once(settings, output=tmp_path, policy=FAST)
    assert second.status == "partial" and second.exit_code == 1
    after = {r["job_id"]: r for r in read_snapshot(second.data_path)}
    assert set(after) == set(before)
    for job_id, record in after.items():
        assert record["snapshot_id"] == second.snapshot_id
        if job_id in victim_jobs:
            assert record["stale"] is True
            assert record["last_seen"] == before[job_id]["last_seen"]
        else:
            assert record["stale"] is False
    assert second.stale == len(victim_jobs)
    # the failure heals: the next run has the jobs fresh again
    sb.faults = replace(sb.faults, deny_list_jobs=frozenset())
    third = await run_once(settings, output=tmp_path, policy=FAST)
    assert third.status == "complete" and not any(
        r["stale"] for r in read_snapshot(third.data_path)
    )


def cut_in_half(path: Path | str) -> list[bytes]:
    """Keep the first half of the lines of the file at `path`; returns all of them."""
    lines = Path(path).read_bytes().splitlines(keepends=True)
    Path(path).write_bytes(b"".join(lines[: len(lines) // 2]))
    return lines


async def test_a_previous_snapshot_cut_short_is_never_carried_forward_short(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """What a failed partition carries forward comes from the previous snapshot's data file.
    One cut short (a damaged disk, a hand edit) holds fewer records than its manifest says;
    read as it is, the failed account's jobs dropped out of a 'partial' snapshot without a
    word. The run fails with one line instead, and LATEST stays."""
    sb = await make_sandbox(accounts=3, seed=36)
    victim = max(sb.account_ids)  # its lines end the file
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1", "us-east-1"]})
    first = await run_once(settings, output=tmp_path, policy=FAST)
    lines = cut_in_half(first.data_path)
    sb.faults = replace(sb.faults, deny_list_jobs=frozenset({victim}))
    with pytest.raises(OutputError) as info:
        await run_once(settings, output=tmp_path, policy=FAST)
    assert f"{len(lines) // 2} records, but its manifest says {len(lines)}" in str(info.value)
    assert (tmp_path / "LATEST").read_text().strip().endswith(f"{first.snapshot_id}.manifest.json")


async def test_a_region_that_answers_not_enabled_keeps_its_jobs_as_stale(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Run 1 reads jobs in an opt-in region; runs 2 and 3 are told the account has not
    enabled it (skipped, not failed): its jobs stay, stale, with last_seen kept, and the
    change file says they went stale, not that they were removed."""
    sb = await make_sandbox(
        accounts=2,
        seed=38,
        regions=("eu-west-1", "af-south-1"),
        jobs={("200000000000", "af-south-1"): 7},
    )
    victim = "200000000000"
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1", "af-south-1"]})
    first = await run_once(settings, output=tmp_path, policy=FAST)
    before = {r["job_id"]: r for r in read_snapshot(first.data_path)}
    hidden = {
        j for j, r in before.items() if r["account_id"] == victim and r["regions"] == ["af-south-1"]
    }
    assert len(hidden) == 7
    sb.faults = replace(sb.faults, disabled_regions={victim: frozenset({"af-south-1"})})
    for _ in range(2):
        summary = await run_once(settings, output=tmp_path, policy=FAST)
        assert summary.status == "complete" and summary.partitions["skipped"] == 1
        after = {r["job_id"]: r for r in read_snapshot(summary.data_path)}
        assert set(after) == set(before)
        assert {j for j, r in after.items() if r["stale"]} == hidden
        assert all(after[j]["last_seen"] == before[j]["last_seen"] for j in hidden)
        assert summary.stale == 7
    events = _change_events(tmp_path)
    assert {e["event"] for e in events if e["job_id"] in hidden} == {"job_added", "job_went_stale"}


def _change_events(root: Path) -> list[dict[str, Any]]:
    return [
        orjson.loads(line)
        for path in sorted(root.glob("changes/*/*.jsonl"))
        for line in path.read_bytes().splitlines()
    ]


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


async def test_disk_full_is_a_clear_error_and_keeps_the_previous_snapshot(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """ENOSPC while writing: OutputError (exit 2 in the CLI), LATEST still the old snapshot."""
    from aggregator.errors import OutputError

    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "96k"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        sb = await make_sandbox(accounts=2, seed=37, max_jobs=20)
        settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
        first = await run_once(settings, output=disk, policy=FAST)
        latest = (disk / "LATEST").read_text()
        for i in range(400):
            sb.add_job(sb.account_ids[0], "eu-west-1", description="x" * 400 + str(i))
        with pytest.raises(OutputError, match="No space left on device"):
            await run_once(settings, output=disk, policy=FAST)
        assert (disk / "LATEST").read_text() == latest
        assert [r["job_id"] for r in read_snapshot(first.data_path)]
        assert not [p for p in disk.rglob("*") if p.name.endswith(".tmp")]
    finally:
        subprocess.run(["umount", str(disk)], check=False)  # noqa: ASYNC221 - teardown only


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "botocore-sends"])
async def test_no_second_holds_more_requests_than_the_rate_at_the_service(
    make_sandbox: SandboxFactory, tmp_path: Path, direct: bool
) -> None:
    """At 5 r/s, the sandbox never sees 6 ListJobs of one partition in a second, and a service
    limited to exactly our rate never throttles us. A request is counted from when it leaves:
    the first page's AssumeRole, client and connection (tens of ms) used to come between its
    count and its arrival, so the sixth request, sent a second after the first was counted,
    arrived within a second of it. The pacing sleeps are skipped: the clock the pacer and the
    sandbox read is real time plus the seconds slept."""
    import asyncio
    import time

    skipped = [0.0]

    def clock() -> float:
        return time.monotonic() + skipped[0]

    async def sleep(seconds: float) -> None:
        skipped[0] += max(0.0, seconds)
        await asyncio.sleep(0)

    key = ("200000000000", "eu-west-1")
    sb = await make_sandbox(accounts=1, regions=("eu-west-1",), jobs={key: 1000})
    sb._clock = clock
    sb.faults = replace(sb.faults, throttle_rps=5.0, throttle_burst=5)
    settings = make_settings(
        sb.account_ids, regions={"names": ["eu-west-1"]}, limits={"requests_per_second": 5.0}
    )
    summary = await run_once(
        settings, output=tmp_path, policy=FAST, sleep=sleep, monotonic=clock, direct=direct
    )
    assert summary.status == "complete" and summary.throttles == 0
    stats = sb.stats()
    assert stats.list_jobs_requests[key] == 10 and stats.max_requests_per_second[key] == 5
    assert skipped[0] > 0.9  # paced: the second five waited for the first five's second


@pytest.mark.parametrize("direct", [True, False])
async def test_a_broken_connection_and_a_refused_one_are_told_apart(
    make_sandbox: SandboxFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    direct: bool,
) -> None:
    """A connection reset under a request is `ConnectionReset`, a connection never made (the
    endpoint refuses it) `ConnectionError`, on our send path and botocore's alike: a refused
    one read "ConnectionReset" on botocore's, which sends an operator looking for a proxy."""
    import socket

    once = RetryPolicy(max_attempts=1, base_delay=0.005, max_delay=0.05, max_restarts=0)
    sb = await make_sandbox(accounts=1, seed=3, faults=Faults(p_reset=1.0))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    summary = await run_once(settings, output=tmp_path, policy=once, direct=direct)
    (failed,) = summary.failed
    assert (failed["operation"], failed["error_code"]) == ("ListJobs", "ConnectionReset")
    assert sb.stats().faults["reset"] == 1

    with socket.socket() as closed:  # a port nobody listens on (bound, never listening)
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
        summary = await run_once(settings, output=tmp_path, policy=once, direct=direct)
    (failed,) = summary.failed
    assert (failed["operation"], failed["error_code"]) == ("AssumeRole", "ConnectionError")
