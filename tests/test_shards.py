"""Shards: stable account split, shard selection from CLI or Indexed Job environment, and the
merge of N shard snapshots into one snapshot equal to an unsharded run's."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from aggregator.accounts import Account
from aggregator.config import Settings
from aggregator.errors import ConfigError
from aggregator.sandbox import Faults
from aggregator.service import run_once
from aggregator.shards import (
    Shard,
    ShardError,
    merge_run,
    parse_shard,
    resolve_shard,
    run_location,
    select_shard,
    shard_location,
    shard_manifest,
    shard_of,
)
from aggregator.snapshot import load_schema, open_store

from .conftest import SandboxFactory, make_settings

REGIONS = {"names": ["us-east-1", "us-east-2", "eu-west-1", "ap-southeast-2"]}


def acct(account_id: str) -> Account:
    return Account(account_id, f"arn:aws:iam::{account_id}:role/R")


# --- the split ------------------------------------------------------------------------------


def test_shard_of_is_pinned() -> None:
    """The split is SHA-256 of the id: the same in every process, Python and release."""
    ids = ["111111111111", "222222222222", "333333333333", "200000000000"]
    assert [shard_of(i, 4) for i in ids] == [2, 3, 0, 0]
    assert all(shard_of(i, 1) == 0 for i in ids)


def test_split_is_complete_disjoint_and_balanced() -> None:
    """Every account lands in exactly one of N shards, and shards are about equal."""
    universe = [acct(str(200_000_000_000 + i)) for i in range(10_000)]
    parts = [select_shard(universe, i, 4) for i in range(4)]
    seen = [a.account_id for p in parts for a in p]
    assert sorted(seen) == sorted(a.account_id for a in universe)
    assert len(seen) == len(set(seen))
    assert all(2300 < len(p) < 2700 for p in parts)


def test_a_new_account_moves_no_other() -> None:
    """Adding an account to the organization leaves every other account in its shard."""
    universe = [acct(str(200_000_000_000 + i)) for i in range(500)]
    before = {a.account_id: i for i in range(8) for a in select_shard(universe, i, 8)}
    grown = [*universe, acct("999999999999")]
    after = {a.account_id: i for i in range(8) for a in select_shard(grown, i, 8)}
    assert {k: after[k] for k in before} == before


@pytest.mark.parametrize(
    ("text", "expected"), [("0/4", (0, 4)), ("3/4", (3, 4)), (" 0 / 1 ", (0, 1))]
)
def test_parse_shard(text: str, expected: tuple[int, int]) -> None:
    """I/N is 0-based, like JOB_COMPLETION_INDEX."""
    assert parse_shard(text) == expected


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("4/4", "numbered 0 to 3"),
        ("1/0", "between 1 and"),
        ("-1/4", "is not I/N"),
        ("1of4", "is not I/N"),
        ("", "is not I/N"),
        ("\u0660/\u0662", "is not I/N"),  # digits of another script
    ],
)
def test_parse_shard_rejects(text: str, problem: str) -> None:
    """Malformed or out-of-range shard specs are rejected with a readable reason."""
    with pytest.raises(ValueError, match=problem):
        parse_shard(text)


def test_resolve_shard_from_cli_and_environment() -> None:
    """--shard wins over the Indexed Job variables; the run id comes from --run-id or env."""
    env = {
        "JOB_COMPLETION_INDEX": "2",
        "SNOWBALL_SHARD_COUNT": "4",
        "SNOWBALL_RUN_ID": "run-0001",
    }
    assert resolve_shard(None, None, env) == Shard(2, 4, "run-0001")
    assert resolve_shard("1/3", None, env) == Shard(1, 3, "run-0001")
    assert resolve_shard("1/3", "cli-run", env) == Shard(1, 3, "cli-run")
    assert resolve_shard(None, None, {}) is None
    # An Indexed Job that is not a sharded run: the index alone means nothing.
    assert resolve_shard(None, None, {"JOB_COMPLETION_INDEX": "0"}) is None


@pytest.mark.parametrize(
    ("cli", "run_id", "env", "message"),
    [
        ("5/4", "r", {}, "--shard: shard index 5 is out of range"),
        ("0/4", None, {}, "--shard: a sharded run needs the run id"),
        ("0/4", "../x", {}, "--run-id: '../x' is not a run id"),
        (None, "r9", {}, "--run-id: names a sharded run, but there is no --shard I/N"),
        (
            None,
            None,
            {"JOB_COMPLETION_INDEX": "2", "SNOWBALL_RUN_ID": "run-0001"},
            "SNOWBALL_SHARD_COUNT (environment): not set, but SNOWBALL_RUN_ID and "
            "JOB_COMPLETION_INDEX name a shard of a sharded run: set it to the run's number",
        ),
        (
            None,
            None,
            {"SNOWBALL_SHARD_COUNT": "4", "SNOWBALL_RUN_ID": "r"},
            "SNOWBALL_SHARD_COUNT (environment): is set but JOB_COMPLETION_INDEX is not",
        ),
        (
            None,
            None,
            {"SNOWBALL_SHARD_COUNT": "four", "JOB_COMPLETION_INDEX": "0"},
            "SNOWBALL_SHARD_COUNT (environment): 'four' is not a whole number",
        ),
        (
            None,
            None,
            {"SNOWBALL_SHARD_COUNT": "4", "JOB_COMPLETION_INDEX": "4", "SNOWBALL_RUN_ID": "r"},
            "shard index 4 is out of range",
        ),
        (
            None,
            None,
            {"SNOWBALL_SHARD_COUNT": "4", "JOB_COMPLETION_INDEX": "1", "SNOWBALL_RUN_ID": "a/b"},
            "SNOWBALL_RUN_ID (environment): 'a/b' is not a run id",
        ),
        ("0/4", None, {"SNOWBALL_RUN_ID": "a/b"}, "SNOWBALL_RUN_ID (environment): 'a/b' is not"),
    ],
)
def test_resolve_shard_errors(
    cli: str | None, run_id: str | None, env: dict[str, str], message: str
) -> None:
    """Every wrong shard setting is one ConfigError line naming the option or variable."""
    with pytest.raises(ConfigError) as info:
        resolve_shard(cli, run_id, env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_locations() -> None:
    """Shard snapshots live under <output>/shards/run=<id>/shard=<I>-of-<N>, local or S3."""
    shard = Shard(1, 4, "run-7")
    assert shard_location("out", shard) == str(Path("out/shards/run=run-7/shard=1-of-4"))
    assert shard_location("s3://b/p/", shard) == "s3://b/p/shards/run=run-7/shard=1-of-4"
    assert run_location("s3://b", "run-7") == "s3://b/shards/run=run-7"


def test_shard_manifest_entry() -> None:
    """The manifest says which shard it is and digests the whole account list."""
    universe = [acct("111111111111"), acct("222222222222")]
    entry = shard_manifest(Shard(0, 2, "r"), universe)
    assert entry["index"] == 0 and entry["count"] == 2 and entry["run_id"] == "r"
    assert entry["accounts_total"] == 2
    assert entry == shard_manifest(Shard(0, 2, "r"), list(reversed(universe)))
    assert (
        entry["accounts_sha256"]
        != shard_manifest(Shard(0, 2, "r"), universe[:1])["accounts_sha256"]
    )


# --- running shards and merging them ---------------------------------------------------------


async def run_shard(settings: Settings, output: Path, shard: Shard, **options: Any) -> None:
    await run_once(settings, output=output, shard=shard, **options)


def at(minute: int) -> Callable[[], datetime]:
    """A clock stopped at 15:<minute> on 2026-11-28 (a run's start, hence its snapshot id)."""
    when = datetime(2026, 11, 28, 15, minute, tzinfo=UTC)
    return lambda: when


def published(output: Path) -> dict[str, bytes]:
    """Every snapshot and change file of the location (not the shards' folders), by path."""
    return {
        p.relative_to(output).as_posix(): p.read_bytes()
        for top in ("snapshots", "changes")
        for p in (output / top).rglob("*")
        if p.is_file()
    }


def chain(output: Path) -> list[str]:
    """Snapshot ids from LATEST back along previous_snapshot_id (stops at a repeat)."""
    rel = (output / "LATEST").read_text().strip()
    ids: list[str] = []
    while rel and len(ids) < 10:
        manifest = manifest_of(output, rel)
        ids.append(manifest["snapshot_id"])
        previous = manifest["previous_snapshot_id"]
        if previous is None or previous in ids:
            break
        rel = f"snapshots/date={previous[:4]}-{previous[4:6]}-{previous[6:8]}/{previous}"
        rel += ".manifest.json"
    return ids


_VOLATILE = re.compile(rb'"(snapshot_id|observed_at|last_seen)":"[^"]*"')


def normalised(path: Path) -> list[bytes]:
    """The data file's lines with the run-specific id and timestamps blanked, bytes kept."""
    return [_VOLATILE.sub(rb'"\1":"-"', line) for line in path.read_bytes().split(b"\n")]


def manifest_of(output: Path, written_rel: str) -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads((output / written_rel).read_bytes())
    return data


async def test_four_shards_merge_to_the_unsharded_snapshot(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """4 shard runs plus merge write the same records, byte for byte, as one unsharded run
    (snapshot id and observation times aside), and the same partition accounting."""
    sb = await make_sandbox(
        accounts=40,
        seed=21,
        regions=("us-east-1", "us-east-2", "eu-west-1", "ap-southeast-2"),
        faults=Faults(deny_list_jobs=frozenset({"200000000007"})),
    )
    settings = make_settings(sb.account_ids, regions=REGIONS)
    single = await run_once(settings, output=tmp_path / "single")
    assert single.status == "partial"  # one account denies ListJobs: a realistic mix

    sharded = tmp_path / "sharded"
    for i in range(4):
        await run_shard(settings, sharded, Shard(i, 4, "run-0001"))
    result = await merge_run(sharded, "run-0001", 4)

    assert not result.already_merged and result.status == "partial" and result.exit_code == 1
    merged_data = sharded / result.written.data_path
    assert normalised(merged_data) == normalised(single.data_path)
    lines = merged_data.read_bytes().splitlines()
    assert len(lines) == single.jobs > 300
    assert all(f'"snapshot_id":"{result.written.snapshot_id}"'.encode() in x for x in lines)
    assert (sharded / "LATEST").read_text().strip() == result.written.manifest_path

    one = orjson.loads(single.manifest_path.read_bytes())
    merged = manifest_of(sharded, result.written.manifest_path)
    for key in (
        "accounts",
        "partitions",
        "failed_partitions",
        "partition_status",
        "jobs",
        "stale_jobs",
        "duplicates_removed",
        "requests",
        "schema_version",
        "status",
    ):
        assert merged[key] == one[key], key
    assert merged["data"]["records"] == single.jobs
    assert merged["sharded"]["run_id"] == "run-0001" and merged["sharded"]["count"] == 4
    assert merged["sharded"]["accounts_consistent"] is True
    assert sum(s["records"] for s in merged["sharded"]["shards"]) == single.jobs
    assert "shard" not in merged


async def test_merging_again_is_a_no_op(make_sandbox: SandboxFactory, tmp_path: Path) -> None:
    """The merged snapshot id comes from the run: a second merge writes nothing."""
    sb = await make_sandbox(accounts=8, seed=2, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    for i in range(2):
        await run_shard(settings, tmp_path, Shard(i, 2, "r1"))
    first = await merge_run(tmp_path, "r1", 2)
    before = (tmp_path / first.written.data_path).stat().st_mtime_ns
    again = await merge_run(tmp_path, "r1", 2)
    assert again.already_merged and again.written == first.written
    assert (tmp_path / first.written.data_path).stat().st_mtime_ns == before
    assert again.status == first.status == "complete"


async def test_merging_after_a_shard_ran_again_writes_a_new_snapshot(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """When shard 1 is run again after the merge (it was partial), merging again writes a new
    snapshot after the first, linked to it, and leaves the first byte for byte; merging once
    more changes nothing."""
    sb = await make_sandbox(accounts=8, seed=2, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    denied = next(a for a in sb.account_ids if shard_of(a, 2) == 1)
    sb.faults = Faults(deny_list_jobs=frozenset({denied}))
    for i in range(2):
        await run_shard(settings, tmp_path, Shard(i, 2, "r1"), now=at(0))
    first = await merge_run(tmp_path, "r1", 2)
    assert first.status == "partial"
    before = published(tmp_path)

    sb.faults = Faults()
    await run_shard(settings, tmp_path, Shard(1, 2, "r1"), now=at(20))
    second = await merge_run(tmp_path, "r1", 2)
    assert not second.already_merged and second.status == "complete"
    assert second.written.snapshot_id > first.written.snapshot_id
    assert {k: v for k, v in published(tmp_path).items() if k in before} == before
    assert chain(tmp_path) == [second.written.snapshot_id, first.written.snapshot_id]
    manifest = manifest_of(tmp_path, second.written.manifest_path)
    jobs = [j for j in sb.truth() if j["account_id"] == denied]
    assert manifest["changes"]["counts"]["job_added"] == manifest["changes"]["events"] == len(jobs)

    third = await merge_run(tmp_path, "r1", 2)
    assert third.already_merged and third.written == second.written


async def test_a_merge_after_a_shard_ran_again_starts_when_that_shard_did(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Shard 1 ran at 15:00, shard 0 at 15:05, merged; a job of shard 0 is deleted and shard 0
    runs again at 15:20. The new merge starts at 15:20 (what it saw anew, it saw then), so its
    removal is observed after the job was last seen (15:05), not at 15:00 before it."""
    sb = await make_sandbox(accounts=6, seed=5, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    await run_shard(settings, tmp_path, Shard(1, 2, "r1"), now=at(0))
    await run_shard(settings, tmp_path, Shard(0, 2, "r1"), now=at(5))
    first = await merge_run(tmp_path, "r1", 2)
    assert manifest_of(tmp_path, first.written.manifest_path)["started_at"].endswith("15:00:00Z")
    job = next(j for j in sb.truth() if shard_of(j["account_id"], 2) == 0)
    sb.remove_job(job["account_id"], job["job_id"])

    await run_shard(settings, tmp_path, Shard(0, 2, "r1"), now=at(20))
    second = await merge_run(tmp_path, "r1", 2)
    assert second.written.snapshot_id.startswith("20261128T152000Z-")
    manifest = manifest_of(tmp_path, second.written.manifest_path)
    assert manifest["started_at"] == "2026-11-28T15:20:00Z"
    assert manifest["changes"]["counts"]["job_removed"] == manifest["changes"]["events"] == 1
    (removed,) = map(orjson.loads, (tmp_path / second.written.changes_path).read_bytes().split())
    assert removed["event"] == "job_removed" and removed["job_id"] == job["job_id"]
    assert removed["previous_observed_at"] == "2026-11-28T15:05:00Z"
    assert removed["observed_at"] == "2026-11-28T15:20:00Z"


async def test_two_merges_of_one_run_at_once_leave_the_published_snapshot_whole(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Two merges of one run at once write the same snapshot id; the one that finds LATEST
    already naming it fails (exit 1) saying so, and leaves the change file the published
    manifest names in place (a loser's change file is withdrawn only when another snapshot
    won)."""
    sb = await make_sandbox(accounts=6, seed=7, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    for i in range(2):
        await run_shard(settings, tmp_path, Shard(i, 2, "r1"), now=at(i))
    results = await asyncio.gather(
        merge_run(tmp_path, "r1", 2), merge_run(tmp_path, "r1", 2), return_exceptions=True
    )
    failed = [r for r in results if isinstance(r, BaseException)]
    assert len(failed) <= 1
    if failed:
        assert "was published meanwhile by another writer of the same snapshot" in str(failed[0])
    manifest = manifest_of(tmp_path, (tmp_path / "LATEST").read_text().strip())
    assert (tmp_path / manifest["changes"]["path"]).is_file()
    assert manifest["changes"]["events"] == len(sb.truth())


async def test_shards_of_two_versions_merge_into_one_version(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """An upgrade rolled out between two shards of a run: the merged manifest's
    `tool_version` is one string, as the schema has it (that of the shard that finished
    last), and each shard's version is kept under `sharded.shards`."""
    sb = await make_sandbox(accounts=6, seed=6, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    await run_shard(settings, tmp_path, Shard(0, 2, "r1"), now=at(0))
    await run_shard(settings, tmp_path, Shard(1, 2, "r1"), now=at(5))
    # Shard 1 ran the newer version (its manifest is not covered by the data's digest).
    (shard_manifest_path,) = (tmp_path / "shards").rglob("shard=1-of-2/**/*.manifest.json")
    shard1 = orjson.loads(shard_manifest_path.read_bytes())
    older = shard1["tool_version"]
    shard_manifest_path.write_bytes(orjson.dumps({**shard1, "tool_version": "99.0.0"}))
    result = await merge_run(tmp_path, "r1", 2)
    merged = manifest_of(tmp_path, result.written.manifest_path)
    assert merged["tool_version"] == "99.0.0"
    assert [s["tool_version"] for s in merged["sharded"]["shards"]] == [older, "99.0.0"]
    schema = load_schema("manifest")
    Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER).validate(
        merged
    )


async def test_shards_run_with_other_regions_are_not_merged(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """The configuration edited between two shards of a run (a ConfigMap mounted live into an
    Indexed Job): merged, the regions one shard left out read as jobs removed, in a
    snapshot "complete" that no unsharded run makes. It is refused, naming the shard and
    both `[regions]`, and nothing is written; shards with the same regions merge."""
    sb = await make_sandbox(accounts=6, seed=6, regions=("eu-west-1", "us-east-1"))
    both = make_settings(sb.account_ids, regions={"names": ["eu-west-1", "us-east-1"]})
    one = make_settings(sb.account_ids, regions={"names": ["us-east-1"]})
    await run_shard(one, tmp_path, Shard(0, 2, "r1"), now=at(0))
    await run_shard(both, tmp_path, Shard(1, 2, "r1"), now=at(5))
    with pytest.raises(ShardError) as info:
        await merge_run(tmp_path, "r1", 2)
    assert str(info.value).startswith(
        'run r1: shard 1/2 was run with other [regions] than shard 0/2 ({"exclude":[],'
        '"names":["eu-west-1","us-east-1"],"us_strategy":"all"} against {"exclude":[],'
        '"names":["us-east-1"],"us_strategy":"all"}'
    ), str(info.value)
    assert not (tmp_path / "LATEST").exists()
    await run_shard(both, tmp_path, Shard(0, 2, "r1"), now=at(10))  # run again, as told
    result = await merge_run(tmp_path, "r1", 2)
    assert result.status == "complete"


async def test_a_shard_that_carried_jobs_from_an_older_snapshot_is_not_merged(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Runs overlap: r2's shard 0 runs (an account failing, its jobs carried forward from r0)
    before r1 is merged. Merging r2 then would drop what r1 holds for that account, with no
    `job_removed`: it is refused, nothing written, until the shard runs again."""
    sb = await make_sandbox(accounts=6, seed=1, regions=("eu-west-1",), max_jobs=5)
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    failing = next(a for a in sb.account_ids if shard_of(a, 2) == 0)
    for i in range(2):
        await run_shard(settings, tmp_path, Shard(i, 2, "r0"), now=at(0))
    await merge_run(tmp_path, "r0", 2)
    job = sb.add_job(failing, "eu-west-1", job_state="New")
    for i in range(2):
        await run_shard(settings, tmp_path, Shard(i, 2, "r1"), now=at(10))
    sb.faults = Faults(deny_assume_role=frozenset({failing}))
    await run_shard(settings, tmp_path, Shard(0, 2, "r2"), now=at(20))
    sb.faults = Faults()
    r1 = await merge_run(tmp_path, "r1", 2)
    await run_shard(settings, tmp_path, Shard(1, 2, "r2"), now=at(20))
    before = published(tmp_path)
    with pytest.raises(ShardError, match=r"^run r2: shard\(s\) 0 had failed or skipped partitions"):
        await merge_run(tmp_path, "r2", 2)
    assert published(tmp_path) == before

    sb.faults = Faults(deny_assume_role=frozenset({failing}))  # still failing, from r1 now
    await run_shard(settings, tmp_path, Shard(0, 2, "r2"), now=at(21))
    sb.faults = Faults()
    r2 = await merge_run(tmp_path, "r2", 2)
    data = (tmp_path / r2.written.data_path).read_bytes()
    assert job.encode() in data  # carried forward from r1, as stale
    assert chain(tmp_path)[:2] == [r2.written.snapshot_id, r1.written.snapshot_id]


async def test_the_merged_status_is_the_unsharded_runs(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Every partition failed: the merge is `failed`, as the unsharded run, even though shards
    without accounts are `complete` on their own."""
    sb = await make_sandbox(accounts=2, seed=1, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    sb.faults = Faults(deny_list_jobs=frozenset(sb.account_ids))
    assert len({shard_of(a, 3) for a in sb.account_ids}) < 3  # a shard without accounts
    for i in range(3):
        await run_shard(settings, tmp_path, Shard(i, 3, "r1"), now=at(0))
    merged = await merge_run(tmp_path, "r1", 3)
    unsharded = await run_once(settings, output=tmp_path / "single", now=at(0))
    assert merged.status == unsharded.status == "failed"


async def test_merging_again_never_moves_latest_back(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Merge r1, then an unsharded run, then shard 1 of r1 again: merging the same shards is a
    no-op, and merging the changed ones is refused (the unsharded snapshot is newer than the
    run); nothing published is rewritten and the chain stays linear."""
    sb = await make_sandbox(accounts=8, seed=2, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    for i in range(2):
        await run_shard(settings, tmp_path, Shard(i, 2, "r1"), now=at(0))
    first = await merge_run(tmp_path, "r1", 2)
    single = await run_once(settings, output=tmp_path, now=at(10))
    again = await merge_run(tmp_path, "r1", 2)
    assert again.already_merged and again.written == first.written
    before = published(tmp_path)

    await run_shard(settings, tmp_path, Shard(1, 2, "r1"), now=at(20))
    with pytest.raises(ShardError) as info:
        await merge_run(tmp_path, "r1", 2)
    assert str(info.value).startswith(
        f"run r1: LATEST names snapshot {single.snapshot_id}, newer than this run"
    )
    assert published(tmp_path) == before
    assert chain(tmp_path) == [single.snapshot_id, first.written.snapshot_id]


async def test_a_merge_that_crashed_before_latest_is_published_by_the_next(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """A merged manifest that a crash left unnamed by LATEST does not count as merged: merging
    again publishes the run (nothing is lost)."""
    sb = await make_sandbox(accounts=8, seed=2, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    older = await run_once(settings, output=tmp_path, now=at(0))
    for i in range(2):
        await run_shard(settings, tmp_path, Shard(i, 2, "r1"), now=at(10))
    latest = (tmp_path / "LATEST").read_bytes()
    first = await merge_run(tmp_path, "r1", 2)
    (tmp_path / "LATEST").write_bytes(latest)  # as if killed just before LATEST moved
    again = await merge_run(tmp_path, "r1", 2)
    assert not again.already_merged and again.written == first.written
    assert chain(tmp_path) == [first.written.snapshot_id, older.snapshot_id]


async def test_merge_into_a_location_that_cannot_be_written_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`merge --output` naming a file (not a directory) is a wrong location, exit 2 at once,
    as for `run`, not a missing shard (exit 1, retried by a Job)."""
    from aggregator.cli import main

    config = tmp_path / "c.toml"
    config.write_text('[accounts]\nids = ["111111111111"]\n')
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    args = ["merge", "--config", str(config), "--run-id", "r1", "--shards", "2"]
    assert await asyncio.to_thread(main, [*args, "--output", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" in err, err
    assert err.startswith(f"error: --output: {blocker}: "), err
    config.write_text(f'[accounts]\nids = ["111111111111"]\n[output]\ndirectory = "{blocker}"\n')
    assert await asyncio.to_thread(main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config}: output.directory: {blocker}: cannot write"), err


@pytest.mark.parametrize(("wait", "code"), [("0", 1), ("0m", 1), ("0s", 1), ("-1m", 2), ("x", 2)])
async def test_merge_wait_takes_no_wait_however_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], wait: str, code: int
) -> None:
    """`--wait 0`, `0s` and `0m` all mean no wait (`0m` was refused as not positive): the
    merge goes straight to naming the missing shards (exit 1); a negative or malformed wait is
    a usage error (exit 2)."""
    from aggregator.cli import main

    config = tmp_path / "c.toml"
    config.write_text(f'[accounts]\nids = ["111111111111"]\n[output]\ndirectory = "{tmp_path}"\n')
    args = ["merge", "--config", str(config), "--run-id", "r1", "--shards", "2", f"--wait={wait}"]
    assert await asyncio.to_thread(main, args) == code
    err = capsys.readouterr().err
    assert ("shard snapshots missing" in err) == (code == 1) and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("wait", "problem"),
    [
        ("1e9", "'1e9' is longer than the maximum of 7 days"),  # 31 years, polled every 5 s
        ("-1", "-1.0: a duration must not be negative"),  # (0 is allowed: not "positive")
    ],
)
def test_merge_wait_is_bounded_like_every_duration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], wait: str, problem: str
) -> None:
    from aggregator.cli import main

    config = tmp_path / "c.toml"
    config.write_text(f'[accounts]\nids = ["111111111111"]\n[output]\ndirectory = "{tmp_path}"\n')
    args = ["merge", "--config", str(config), "--run-id", "r1", "--shards", "2", f"--wait={wait}"]
    assert main(args) == 2
    assert capsys.readouterr().err == f"error: --wait: {problem}\n"


def test_a_negative_shard_is_named_as_a_shard_mistake(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--shard -1/3`: what is wrong with the shard (argparse took "-1/3" for an option and
    said "expected one argument")."""
    from aggregator.cli import main

    config = tmp_path / "c.toml"
    config.write_text(f'[accounts]\nids = ["111111111111"]\n[output]\ndirectory = "{tmp_path}"\n')
    args = ["run", "--config", str(config), "--shard", "-1/3", "--run-id", "r"]
    assert main(args) == 2
    assert (
        capsys.readouterr().err
        == "error: --shard: '-1/3' is not I/N (for example 0/4: the first of 4 shards)\n"
    )


async def test_a_thousand_missing_shards_are_named_in_a_short_line(tmp_path: Path) -> None:
    """Runs of missing shards are ranges and the list stops at 20 items: the line listed
    every one of a thousand (10 KB)."""
    with pytest.raises(ShardError) as info:
        await merge_run(tmp_path, "run-1k", 1000)
    message = str(info.value)
    assert "1000 of 1000 shard snapshots missing: 0/1000 to 999/1000; looked in " in message
    assert len(message) < 300

    from aggregator.shards import _shard_names

    assert _shard_names([*range(0, 60, 2), 61, 62, 63, 64], 70) == (
        ", ".join(f"{k}/70" for k in range(0, 40, 2)) + ", and 11 more"
    )
    assert _shard_names([1, 2, 3, 4, 5, 6, 7, 9, 10], 12) == "1/12 to 7/12, 9/12, 10/12"


async def test_merge_refuses_a_missing_shard(make_sandbox: SandboxFactory, tmp_path: Path) -> None:
    """With shard 2 of 4 absent the merge names it and writes nothing."""
    sb = await make_sandbox(accounts=12, seed=3, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    for i in (0, 1, 3):
        await run_shard(settings, tmp_path, Shard(i, 4, "run-9"))
    with pytest.raises(ShardError) as info:
        await merge_run(tmp_path, "run-9", 4)
    message = str(info.value)
    assert message.startswith("run run-9: 1 of 4 shard snapshots missing: 2/4; looked in ")
    assert not (tmp_path / "LATEST").exists()
    assert not (tmp_path / "snapshots").exists()


async def test_merge_waits_for_late_shards(make_sandbox: SandboxFactory, tmp_path: Path) -> None:
    """--wait polls until the last shard lands, on an injected clock (no real sleeping)."""
    sb = await make_sandbox(accounts=6, seed=4, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    await run_shard(settings, tmp_path, Shard(0, 2, "late"))
    now = [0.0]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds
        if len(waits) == 3:  # the last shard finishes while the merge waits
            await run_shard(settings, tmp_path, Shard(1, 2, "late"))

    result = await merge_run(
        tmp_path, "late", 2, wait=60.0, poll=5.0, clock=lambda: now[0], sleep=sleep
    )
    assert waits == [5.0, 5.0, 5.0]
    assert result.status == "complete"


async def test_merge_wait_runs_out(tmp_path: Path) -> None:
    """When the wait is over the error names every shard still missing."""
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    with pytest.raises(ShardError) as info:
        await merge_run(tmp_path, "gone", 3, wait=12.0, poll=5.0, clock=lambda: now[0], sleep=sleep)
    assert "3 of 3 shard snapshots missing after waiting 12 s: 0/3, 1/3, 2/3" in str(info.value)
    assert now[0] == 12.0


async def test_merge_refuses_another_split(make_sandbox: SandboxFactory, tmp_path: Path) -> None:
    """Shards written for 3 cannot be merged as 4: the error says which split it found."""
    sb = await make_sandbox(accounts=6, seed=5, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    for i in range(3):
        await run_shard(settings, tmp_path, Shard(i, 3, "r3"))
    with pytest.raises(ShardError) as info:
        await merge_run(tmp_path, "r3", 4)
    message = str(info.value)
    assert "4 of 4 shard snapshots missing: 0/4, 1/4, 2/4, 3/4" in message
    assert "found shards of another split: 0/3, 1/3, 2/3" in message


async def _written_shards(
    make_sandbox: SandboxFactory, tmp_path: Path, run_id: str, count: int = 2
) -> None:
    sb = await make_sandbox(accounts=10, seed=6, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    for i in range(count):
        await run_shard(settings, tmp_path, Shard(i, count, run_id))


async def _latest(location: str) -> dict[str, Any]:
    async with open_store(location) as store:
        manifest = await store.latest_manifest()
    assert manifest is not None
    return manifest


async def test_merge_refuses_altered_data(make_sandbox: SandboxFactory, tmp_path: Path) -> None:
    """A shard data file that no longer matches its manifest's sha256 is refused."""
    await _written_shards(make_sandbox, tmp_path, "tamper")
    location = shard_location(tmp_path, Shard(1, 2, "tamper"))
    data = Path(location) / (await _latest(location))["data"]["path"]
    data.write_bytes(data.read_bytes().replace(b'"stale":false', b'"stale":true ', 1))
    with pytest.raises(ShardError, match=r"shard 1/2: .* does not match the sha256"):
        await merge_run(tmp_path, "tamper", 2)
    assert not (tmp_path / "LATEST").exists()
    # A shard manifest that gives no digest to check against is refused too.
    manifest_file = Path(location) / (Path(location) / "LATEST").read_text().strip()
    manifest = orjson.loads(manifest_file.read_bytes())
    del manifest["data"]["sha256"]
    manifest_file.write_bytes(orjson.dumps(manifest))
    with pytest.raises(ShardError, match=r"shard 1/2: its manifest gives no sha256 and size"):
        await merge_run(tmp_path, "tamper", 2)


async def test_merge_refuses_a_shard_of_another_run(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """A snapshot whose manifest names another run or index is not taken for the shard."""
    await _written_shards(make_sandbox, tmp_path, "mine")
    location = shard_location(tmp_path, Shard(0, 2, "mine"))
    manifest = await _latest(location)
    manifest_path = Path(location) / (Path(location) / "LATEST").read_text().strip()
    manifest["shard"]["run_id"] = "theirs"
    manifest_path.write_bytes(orjson.dumps(manifest))
    with pytest.raises(ShardError, match=r"shard 0/2: its snapshot .* is not that shard"):
        await merge_run(tmp_path, "mine", 2)


async def test_merge_refuses_accounts_of_another_shard(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Records of an account that hashes elsewhere (a shard run with the wrong count, say)
    are refused: they could duplicate another shard's."""
    sb = await make_sandbox(accounts=10, seed=7, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    await run_shard(settings, tmp_path, Shard(1, 2, "wrong"))
    # Shard 0's folder gets a snapshot of *every* account, labelled as shard 0.
    full = await run_once(settings, output=tmp_path / "full")
    async with (
        open_store(tmp_path / "full") as src,
        open_store(shard_location(tmp_path, Shard(0, 2, "wrong"))) as dst,
    ):
        manifest = await src.latest_manifest()
        assert manifest is not None
        records = [r async for r in src.read_records(manifest)]
        fields = {"started_at": manifest["started_at"], "finished_at": manifest["finished_at"]}
        fields["shard"] = shard_manifest(Shard(0, 2, "wrong"), [])
        await dst.write(full.snapshot_id, records, fields, previous=None)
    with pytest.raises(ShardError, match=r"shard 0/2: account \d{12} belongs to shard 1/2"):
        await merge_run(tmp_path, "wrong", 2)


def test_merged_requests_add_up_per_operation() -> None:
    """Counters of the shard manifests add up key by key (a sanity check on the combiner)."""
    from aggregator.shards import _combine

    combined = _combine(
        [{"total": 3, "list_jobs": 2, "assume_role": 1}, {"total": 5, "list_jobs": 4}]
    )
    assert combined == {"total": 8, "list_jobs": 6, "assume_role": 1}
    assert _combine([[1], [2, 3]]) == [1, 2, 3]
    assert _combine(["x", "x"]) == "x"


# --- the command line (`run --shard`, `merge`) ------------------------------------------------


async def test_cli_sharded_run_with_discovery_equals_unsharded(
    make_sandbox: SandboxFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`run --shard I/4` (or the Indexed Job variables) over discovered accounts, then
    `merge --shards 4`, equals one `run`; a missing shard makes `merge` exit 1 naming it."""
    import asyncio

    from aggregator.cli import main

    sb = await make_sandbox(accounts=30, suspended=4, seed=8, regions=("us-east-1", "eu-west-1"))
    out = tmp_path / "out"
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        "[accounts.organizations]\nenabled = true\n"
        '[regions]\nnames = ["us-east-1", "eu-west-1"]\n'
        "[limits]\nrequests_per_second = 1000.0\ntimeout_seconds = 5\n"
        f'[output]\ndirectory = "{out}"\n'
        '[logging]\nformat = "json"\nlevel = "warning"\n'
    )

    def cli(*args: str) -> int:
        return main([*args[:1], "--config", str(cfg), *args[1:]])

    assert await asyncio.to_thread(cli, "run", "--output", str(tmp_path / "single")) == 0
    capsys.readouterr()
    for i in (0, 1, 2):
        assert await asyncio.to_thread(cli, "run", "--shard", f"{i}/4", "--run-id", "r1") == 0
    assert await asyncio.to_thread(cli, "merge", "--run-id", "r1", "--shards", "4") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 of 4 shard snapshots missing: 3/4" in err

    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    monkeypatch.setenv("SNOWBALL_SHARD_COUNT", "4")
    monkeypatch.setenv("SNOWBALL_RUN_ID", "r1")
    assert await asyncio.to_thread(cli, "run") == 0
    capsys.readouterr()
    assert await asyncio.to_thread(cli, "merge", "--run-id", "r1", "--shards", "4", "--json") == 0
    result = orjson.loads(capsys.readouterr().out)
    single = orjson.loads(
        ((tmp_path / "single") / (tmp_path / "single/LATEST").read_text().strip()).read_bytes()
    )
    assert normalised(out / result["data"]) == normalised(
        tmp_path / "single" / single["data"]["path"]
    )
    merged = manifest_of(out, result["manifest"])
    # Full names, as `run --json` gives them, not names relative to the output directory.
    assert result["data"] == str(out / merged["data"]["path"])
    assert result["manifest"] == str(
        out / merged["data"]["path"].replace(".jsonl", ".manifest.json")
    )
    assert merged["accounts"] == single["accounts"] == len(sb.active_account_ids)
    assert merged["requests"] != single["requests"]  # each shard discovered the organization
    assert merged["requests"]["organizations"] == 4 * single["requests"]["organizations"]
    # Merged again: nothing written, and the line names the snapshot's data file in full.
    assert await asyncio.to_thread(cli, "merge", "--run-id", "r1", "--shards", "4") == 0
    line = capsys.readouterr().out.strip()
    assert line.endswith(f"; {result['data']} (already merged: nothing written)"), line
