"""Shards: split one run's accounts into N stable parts, and merge the N shard snapshots.

A sharded run is N processes (a Kubernetes Indexed Job, or N shells) that share a run id. Shard
`I/N` (0-based, like `JOB_COMPLETION_INDEX`: `0/4` .. `3/4`) inventories the accounts whose id
hashes to I (`shard_of`: SHA-256 of the id, so every process and every Python agrees, and an
account joining the organization never moves the others). It writes an ordinary snapshot into
its own folder, whose manifest says which shard it is:

```
<dir>/shards/run=<run_id>/shard=<I>-of-<N>/snapshots/date=YYYY-MM-DD/<id>.jsonl
<dir>/shards/run=<run_id>/shard=<I>-of-<N>/snapshots/date=YYYY-MM-DD/<id>.manifest.json
<dir>/shards/run=<run_id>/shard=<I>-of-<N>/LATEST
```
(`<dir>` is a directory or an `s3://bucket/prefix`; the stores of snapshot.py read and write
both.)

`merge_run` (the `merge` command) waits, if asked, until all N shard snapshots of the run exist,
checks them (same run id and count; data digest, size and record count as each manifest says;
records sorted, of that snapshot, and each in the shard its account hashes to; one schema
version) and writes one snapshot with the normal layout under `<dir>` (moving `<dir>/LATEST`),
records sorted by (account_id, job_id) and re-stamped with the merged snapshot id, so they are
byte for byte what one unsharded run writes. An incomplete or mismatched set is refused with a
`ShardError` naming what is missing or wrong, and nothing is written. The merged snapshot id is
derived from the shard snapshots (start of the earliest shard, digest of the run id and the
shard snapshot ids), and a merge of exactly the shard snapshots a published snapshot already
merged changes nothing. After a shard is run again, merging again writes a new snapshot with a
new id, never one already written: LATEST only ever moves forward (see `merge_run`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import structlog

from .accounts import Account
from .config import RegionsSettings
from .errors import AggregatorError, ConfigError, OutputError
from .records import JobRecord, iso_seconds
from .snapshot import Store, WrittenSnapshot, manifest_path, open_store

__all__ = [
    "RUN_ID_ENV",
    "SHARD_COUNT_ENV",
    "SHARD_INDEX_ENV",
    "MergeResult",
    "MergedRun",
    "Shard",
    "ShardError",
    "check_run_id",
    "merge_run",
    "merge_shards",
    "parse_shard",
    "resolve_shard",
    "run_location",
    "select_shard",
    "shard_location",
    "shard_manifest",
    "shard_of",
    "wait_for_shards",
]

log = structlog.get_logger()

SHARD_INDEX_ENV = "JOB_COMPLETION_INDEX"  # set by Kubernetes in the pods of an Indexed Job
SHARD_COUNT_ENV = "SNOWBALL_SHARD_COUNT"
RUN_ID_ENV = "SNOWBALL_RUN_ID"
MAX_SHARDS = 1000
# Safe as one path segment and as a Kubernetes label value.
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$")
_SHARD_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$", re.ASCII)
_SHARD_DIR_RE = re.compile(r"^shard=(\d+)-of-(\d+)$", re.ASCII)


class ShardError(AggregatorError):
    """A set of shard snapshots cannot be merged: some are missing, or they do not belong
    together; `str()` is one line naming the run and what is missing or mismatched."""


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard `index` (0-based) of `count`, of the sharded run `run_id`."""

    index: int
    count: int
    run_id: str

    @property
    def label(self) -> str:
        """`I/N`, as `--shard` takes it."""
        return f"{self.index}/{self.count}"


def shard_of(account_id: str, count: int) -> int:
    """The shard (0..count-1) of an account: the first 8 bytes of SHA-256(id) modulo count."""
    digest = hashlib.sha256(account_id.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") % count


def select_shard(accounts: Iterable[Account], index: int, count: int) -> tuple[Account, ...]:
    """The accounts of shard `index` of `count`, in their original order."""
    return tuple(a for a in accounts if shard_of(a.account_id, count) == index)


def parse_shard(text: str) -> tuple[int, int]:
    """`"I/N"` -> (I, N) with 0 <= I < N <= 10000; `ValueError` with a readable message."""
    m = _SHARD_RE.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r} is not I/N (for example 0/4: the first of 4 shards)")
    index, count = int(m.group(1)), int(m.group(2))
    _check_index(index, count)
    return index, count


def _check_index(index: int, count: int) -> None:
    if not 1 <= count <= MAX_SHARDS:
        raise ValueError(f"the shard count must be between 1 and {MAX_SHARDS}, got {count}")
    if not 0 <= index < count:
        raise ValueError(
            f"shard index {index} is out of range: shards are numbered 0 to {count - 1} "
            "(0-based, like JOB_COMPLETION_INDEX)"
        )


def check_run_id(value: str) -> str:
    """`value` if it is a valid run id (letters, digits, `.`, `_`, `-`; at most 64), else
    `ValueError`."""
    if not _RUN_ID_RE.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a run id (1 to 64 letters, digits, '.', '_' or '-', "
            "starting and ending with a letter or digit)"
        )
    return value


def resolve_shard(
    cli_value: str | None, run_id: str | None, env: Mapping[str, str]
) -> Shard | None:
    """The shard this process runs, or None for an unsharded run.

    `--shard I/N` (`cli_value`) wins; without it, `JOB_COMPLETION_INDEX` and
    `SNOWBALL_SHARD_COUNT` from `env` are used when both are set (`JOB_COMPLETION_INDEX` alone,
    as in an Indexed Job that is not a sharded run, is ignored). The run id is `run_id`
    (`--run-id`) or `SNOWBALL_RUN_ID`; a sharded run must have one. `--run-id` without a
    shard is refused, and so is `SNOWBALL_RUN_ID` with `JOB_COMPLETION_INDEX` but no count: a
    shard that lost its setting would publish a whole snapshot. Raises `ConfigError` (exit
    code 2) naming the option or variable that is wrong.
    """
    if cli_value is not None:
        source = "--shard"
        try:
            index, count = parse_shard(cli_value)
        except ValueError as exc:
            raise ConfigError(source, "", str(exc)) from None
    else:
        raw_count = (env.get(SHARD_COUNT_ENV) or "").strip()
        raw_index = (env.get(SHARD_INDEX_ENV) or "").strip()
        if not raw_count:
            # A shard that lost its count must never publish a whole snapshot (N of them would).
            if run_id is not None:
                raise ConfigError(
                    "--run-id",
                    "",
                    f"names a sharded run, but there is no --shard I/N (nor {SHARD_INDEX_ENV} "
                    f"and {SHARD_COUNT_ENV})",
                )
            if raw_index and (env.get(RUN_ID_ENV) or "").strip():
                raise ConfigError(
                    f"{SHARD_COUNT_ENV} (environment)",
                    "",
                    f"not set, but {RUN_ID_ENV} and {SHARD_INDEX_ENV} name a shard of a sharded "
                    "run: set it to the run's number of shards",
                )
            if raw_index:
                log.info("shard.not_sharded", reason=f"{SHARD_INDEX_ENV} without {SHARD_COUNT_ENV}")
            return None
        source = f"{SHARD_COUNT_ENV} (environment)"
        if not raw_index:
            raise ConfigError(
                source,
                "",
                f"is set but {SHARD_INDEX_ENV} is not (outside an Indexed Job use --shard I/N)",
            )
        if not raw_count.isdigit():
            raise ConfigError(source, "", f"{raw_count!r} is not a whole number")
        if not raw_index.isdigit():
            raise ConfigError(
                f"{SHARD_INDEX_ENV} (environment)", "", f"{raw_index!r} is not a whole number"
            )
        try:
            index, count = int(raw_index), int(raw_count)
            _check_index(index, count)
        except ValueError as exc:
            raise ConfigError(source, "", str(exc)) from None
    run_id_source = "--run-id" if run_id is not None else f"{RUN_ID_ENV} (environment)"
    run_id = run_id if run_id is not None else env.get(RUN_ID_ENV) or None
    if not run_id:
        raise ConfigError(
            source,
            "",
            f"a sharded run needs the run id its shards share: --run-id ID or {RUN_ID_ENV}",
        )
    try:
        check_run_id(run_id)
    except ValueError as exc:
        raise ConfigError(run_id_source, "", str(exc)) from None
    return Shard(index=index, count=count, run_id=run_id)


def _join(output: str | os.PathLike[str], *parts: str) -> str:
    base = os.fspath(output)
    if base.startswith("s3://"):
        return "/".join([base.rstrip("/"), *parts])
    return str(Path(base, *parts))


def run_location(output: str | os.PathLike[str], run_id: str) -> str:
    """`<output>/shards/run=<run_id>`: the folder (or S3 prefix) of one sharded run."""
    return _join(output, "shards", f"run={check_run_id(run_id)}")


def shard_location(output: str | os.PathLike[str], shard: Shard) -> str:
    """`<output>/shards/run=<run_id>/shard=<I>-of-<N>`: where shard `shard` writes its
    snapshot (a normal snapshot layout with its own LATEST; open it with `open_store`)."""
    return _join(run_location(output, shard.run_id), f"shard={shard.index}-of-{shard.count}")


def shard_manifest(
    shard: Shard,
    universe: Sequence[Account],
    *,
    carried_from: str | None = None,
    regions: RegionsSettings | None = None,
) -> dict[str, Any]:
    """The manifest's `shard` entry of a shard snapshot: index, count and run id, the size
    and digest of the whole account list before selection (shards that disagree on it saw
    different organizations; `merge` reports that), `carried_from`, the snapshot LATEST
    named when the shard ran, whose jobs it carries forward for failed partitions (`merge`
    checks it is still LATEST's), and the `[regions]` it was run with (`merge` refuses
    shards that disagree: their union is no unsharded run's, and the regions one of them left
    out would read as jobs removed)."""
    digest = hashlib.sha256()
    for account_id in sorted(a.account_id for a in universe):
        digest.update(account_id.encode("ascii") + b"\n")
    entry: dict[str, Any] = {
        "index": shard.index,
        "count": shard.count,
        "run_id": shard.run_id,
        "accounts_total": len(universe),
        "accounts_sha256": digest.hexdigest(),
        "carried_from": carried_from,
    }
    if regions is not None:
        entry["regions"] = {
            "names": list(regions.names),
            "exclude": list(regions.exclude),
            "us_strategy": regions.us_strategy,
        }
    return entry


# --- merge ------------------------------------------------------------------------------------


async def _latest(location: str, options: Mapping[str, Any]) -> dict[str, Any] | None:
    async with open_store(location, **options) as store:
        return await store.latest_manifest()


async def _missing(
    output: str | os.PathLike[str], run_id: str, count: int, options: Mapping[str, Any]
) -> list[int]:
    missing = []
    for i in range(count):
        try:
            manifest = await _latest(shard_location(output, Shard(i, count, run_id)), options)
        except OutputError:
            manifest = {}  # there, but unreadable: merge_shards says what is wrong with it
        if manifest is None:
            missing.append(i)
    return missing


def _other_splits(output: str | os.PathLike[str], run_id: str, count: int) -> list[str]:
    """Shards of this run written for another shard count (local directories only)."""
    folder = Path(run_location(output, run_id))
    found: list[tuple[int, int]] = []
    if not os.fspath(output).startswith("s3://") and folder.is_dir():
        for entry in folder.iterdir():
            m = _SHARD_DIR_RE.fullmatch(entry.name)
            if m and int(m.group(2)) != count and (entry / "LATEST").is_file():
                found.append((int(m.group(2)), int(m.group(1))))
    return [f"{i}/{n}" for n, i in sorted(found)]


def _shard_names(indexes: Sequence[int], count: int, most: int = 20) -> str:
    """`0/8, 3/8`; beyond 8, runs of more than 2 as `0/1000 to 999/1000`, and no more than
    `most` items (`..., and 480 more`): one line stays readable with a thousand missing."""
    if len(indexes) <= 8:
        return ", ".join(f"{k}/{count}" for k in indexes)
    items: list[str] = []
    i = 0
    while i < len(indexes):
        j = i
        while j + 1 < len(indexes) and indexes[j + 1] == indexes[j] + 1:
            j += 1
        if j - i >= 2:
            items.append(f"{indexes[i]}/{count} to {indexes[j]}/{count}")
        else:
            items.extend(f"{k}/{count}" for k in indexes[i : j + 1])
        i = j + 1
    if len(items) > most:
        items[most:] = [f"and {len(items) - most} more"]
    return ", ".join(items)


def _missing_error(
    output: str | os.PathLike[str], run_id: str, count: int, missing: Sequence[int], why: str
) -> ShardError:
    text = f"run {run_id}: {len(missing)} of {count} shard snapshots missing{why}: "
    text += _shard_names(missing, count)
    others = _other_splits(output, run_id, count)
    if others:
        text += (
            f" (found shards of another split: {', '.join(others)}; --shards must equal the "
            f"shard count of the run, {SHARD_COUNT_ENV})"
        )
    return ShardError(f"{text}; looked in {run_location(output, run_id)}")


async def wait_for_shards(
    output: str | os.PathLike[str],
    run_id: str,
    count: int,
    *,
    wait: float = 0.0,
    poll: float = 5.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    store_options: Mapping[str, Any] | None = None,
) -> None:
    """Return once all `count` shard snapshots of `run_id` exist under `output`.

    Keyword options: `wait=0.0` s (how long missing shards are waited for; 0 checks once),
    `poll=5.0` s between checks, `clock=time.monotonic`, `sleep=asyncio.sleep`,
    `store_options` (passed to `open_store`, e.g. the S3 session).
    Raises `ShardError` naming the shards still missing when the wait is over.
    """
    check_run_id(run_id)
    options = dict(store_options or {})
    deadline = clock() + wait
    while True:
        missing = await _missing(output, run_id, count, options)
        if not missing:
            return
        left = deadline - clock()
        if left <= 0:
            why = f" after waiting {wait:g} s" if wait > 0 else ""
            raise _missing_error(output, run_id, count, missing, why)
        log.info("merge.waiting", run_id=run_id, missing=len(missing), seconds_left=round(left))
        await sleep(min(poll, left))


@dataclass(frozen=True, slots=True)
class MergedRun:
    """The checked shard snapshots of one run, merged and ready to be written.

    `snapshot_id` is the merged snapshot's id; `records` are every shard's records sorted by
    (account_id, job_id) and re-stamped with it; `manifest` holds the merged manifest fields
    (`Store.write` adds `snapshot_id`, `previous_snapshot_id`, `data` and `changes`);
    `shard_snapshot_ids` the snapshot id of each shard, in shard order; `carried_from` for each
    shard that carried jobs of failed or skipped partitions forward, the snapshot they came from
    (what LATEST named when the shard ran), by shard index.
    """

    run_id: str
    count: int
    snapshot_id: str
    records: list[JobRecord]
    manifest: dict[str, Any]
    shard_snapshot_ids: tuple[str, ...]
    carried_from: Mapping[int, str | None] = dataclasses.field(default_factory=dict)


_ID_TIME = "%Y%m%dT%H%M%SZ"


def merged_snapshot_id(
    run_id: str, started_at: str, shard_snapshot_ids: Sequence[str], *, after: str | None = None
) -> str:
    """`<start of the earliest shard>-<4 hex digits of SHA-256(run id, shard snapshot ids)>`:
    the same id however often the same shard snapshots are merged, another one once a shard
    has been run again.

    `after=None`: an id the result must sort after (the one LATEST names, when that is an
    earlier merge of this run); if it would not, its time is that id's plus one second.
    """
    when = datetime.strptime(started_at, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    suffix = hashlib.sha256("\n".join([run_id, *shard_snapshot_ids]).encode()).hexdigest()[:4]
    snapshot_id = f"{when:{_ID_TIME}}-{suffix}"
    if after is not None and snapshot_id <= after:
        then = datetime.strptime(after[:16], _ID_TIME) + timedelta(seconds=1)
        snapshot_id = f"{then:{_ID_TIME}}-{suffix}"
    return snapshot_id


async def _load(
    store: Store, output: str | os.PathLike[str], run_id: str, index: int, count: int
) -> dict[str, Any]:
    label = f"run {run_id}: shard {index}/{count}"
    try:
        manifest = await store.latest_manifest()
    except OutputError as exc:
        raise ShardError(f"{label}: {exc}") from exc
    if manifest is None:
        raise _missing_error(output, run_id, count, [index], "")
    want = {"index": index, "count": count, "run_id": run_id}
    got = manifest.get("shard")
    if not isinstance(got, dict) or {k: got.get(k) for k in want} != want:
        shown = {k: got.get(k) for k in want} if isinstance(got, dict) else got
        raise ShardError(
            f"{label}: its snapshot {manifest.get('snapshot_id')} is not that shard "
            f"(its manifest says shard {shown})"
        )
    return manifest


async def _read_shard(
    store: Store,
    label: str,
    manifest: Mapping[str, Any],
    index: int,
    count: int,
    into: list[JobRecord],
    snapshot_id: str,
) -> None:
    """Append the shard's records, re-stamped, to `into`, checking each one on the way, and
    the data file against the sha256 and size in its manifest (which must give them)."""
    data = manifest.get("data") or {}
    rel = str(data.get("path"))
    if not isinstance(data.get("sha256"), str) or data.get("bytes") is None:
        raise ShardError(f"{label}: its manifest gives no sha256 and size of {rel}")
    own_id = manifest.get("snapshot_id")
    start = len(into)
    previous: tuple[str, str] | None = None
    account, account_ok = "", True
    try:
        async for record in store.read_records(manifest):
            key = (record.account_id, record.job_id)
            if previous is not None and key <= previous:
                raise ShardError(
                    f"{label}: {store.locate(rel)} is not sorted by (account_id, job_id)"
                )
            previous = key
            if key[0] != account:
                account = key[0]
                account_ok = shard_of(account, count) == index
            if not account_ok:
                owner = shard_of(account, count)
                raise ShardError(f"{label}: account {account} belongs to shard {owner}/{count}")
            if record.snapshot_id != own_id:
                raise ShardError(f"{label}: {store.locate(rel)} holds records of another snapshot")
            into.append(record._replace(snapshot_id=snapshot_id))
    except OutputError as exc:
        raise ShardError(f"{label}: {exc}") from exc
    records = len(into) - start
    if records != (manifest.get("data") or {}).get("records"):
        raise ShardError(
            f"{label}: {store.locate(rel)} has {records} records, its manifest says "
            f"{(manifest.get('data') or {}).get('records')}"
        )


_SPECIAL = frozenset(
    {
        "snapshot_id",
        "previous_snapshot_id",
        "data",
        "changes",
        "shard",
        "status",
        "started_at",
        "finished_at",
        "schema_version",
        "tool_version",
    }
)
_PARTITION_LISTS = frozenset({"failed_partitions", "partition_status"})


def _combine(values: list[Any]) -> Any:
    """Numbers add up, tables add up key by key, lists join, equal values stay."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return sum(values)
    if all(isinstance(v, dict) for v in values):
        keys = dict.fromkeys(k for v in values for k in v)
        return {k: _combine([v[k] for v in values if k in v]) for k in keys}
    if all(isinstance(v, list) for v in values):
        return [item for v in values for item in v]
    return values[0] if all(v == values[0] for v in values) else values


def _status(statuses: Sequence[str], partitions: Any) -> str:
    """The merged status: an unsharded run's rule on the combined partition counts (a shard
    with no account, complete on its own, does not make failed partitions partial)."""
    if isinstance(partitions, Mapping) and all(
        isinstance(partitions.get(k), int) for k in ("ok", "failed")
    ):
        if not partitions["failed"]:
            return "complete"
        return "partial" if partitions["ok"] else "failed"
    if all(s == "complete" for s in statuses):
        return "complete"
    if all(s == "failed" for s in statuses):
        return "failed"
    return "partial"


def _merged_manifest(
    run_id: str, count: int, manifests: Sequence[dict[str, Any]], now: datetime
) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for key in dict.fromkeys(k for m in manifests for k in m):
        if key in _SPECIAL:
            continue
        combined = _combine([m[key] for m in manifests if key in m])
        if key in _PARTITION_LISTS and isinstance(combined, list):
            # The order of an unsharded run: by "account_id/region".
            combined.sort(key=lambda p: f"{p.get('account_id')}/{p.get('region')}")
        fields[key] = combined
    universes = {
        (m["shard"].get("accounts_total"), m["shard"].get("accounts_sha256")) for m in manifests
    }
    if len(universes) > 1:
        log.warning(
            "merge.accounts_differ",
            run_id=run_id,
            reason="the shards listed different accounts (the organization changed during the run)",
        )
    # One version, as the schema has it: the shards' own, or (an upgrade rolled out between
    # them) that of the shard that finished last; each shard's is in `sharded.shards`.
    newest = max(manifests, key=lambda m: str(m["finished_at"]))
    return {
        **fields,
        "schema_version": manifests[0].get("schema_version"),
        "tool_version": newest.get("tool_version"),
        "started_at": min(str(m["started_at"]) for m in manifests),
        "finished_at": max(str(m["finished_at"]) for m in manifests),
        "status": _status([str(m.get("status")) for m in manifests], fields.get("partitions")),
        "sharded": {
            "run_id": run_id,
            "count": count,
            "merged_at": iso_seconds(now),
            "accounts_consistent": len(universes) == 1,
            "shards": [
                {
                    "index": i,
                    "snapshot_id": m["snapshot_id"],
                    "status": m.get("status"),
                    "tool_version": m.get("tool_version"),
                    "records": m["data"]["records"],
                    "sha256": m["data"]["sha256"],
                }
                for i, m in enumerate(manifests)
            ],
        },
    }


async def merge_shards(
    output: str | os.PathLike[str],
    run_id: str,
    count: int,
    *,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    store_options: Mapping[str, Any] | None = None,
) -> MergedRun:
    """Load, check and merge the `count` shard snapshots of `run_id` under `output`.

    Raises `ShardError` when one is missing, belongs to another run or split, or its data does
    not match its manifest (digest, size, record count, order, snapshot id, or an account that
    hashes to another shard). Nothing is written.
    """
    check_run_id(run_id)
    if not 1 <= count <= MAX_SHARDS:
        raise ShardError(f"run {run_id}: the shard count must be between 1 and {MAX_SHARDS}")
    options = dict(store_options or {})
    missing = await _missing(output, run_id, count, options)
    if missing:
        raise _missing_error(output, run_id, count, missing, "")
    manifests: list[dict[str, Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        stores: list[Store] = []
        for i in range(count):
            store = await stack.enter_async_context(
                open_store(shard_location(output, Shard(i, count, run_id)), **options)
            )
            stores.append(store)
            manifests.append(await _load(store, output, run_id, i, count))
        versions = sorted({str(m.get("schema_version")) for m in manifests})
        if len(versions) > 1:
            raise ShardError(f"run {run_id}: the shards have different schema versions {versions}")
        _check_same_regions(run_id, count, manifests)
        snapshot_id = merged_snapshot_id(
            run_id,
            min(str(m["started_at"]) for m in manifests),
            [str(m["snapshot_id"]) for m in manifests],
        )
        records: list[JobRecord] = []
        for i, (store, manifest) in enumerate(zip(stores, manifests, strict=True)):
            label = f"run {run_id}: shard {i}/{count}"
            await _read_shard(store, label, manifest, i, count, records, snapshot_id)
    # Each shard is sorted and the shards hold disjoint accounts: the sort merges N runs.
    records.sort(key=lambda r: (r.account_id, r.job_id))
    return MergedRun(
        run_id=run_id,
        count=count,
        snapshot_id=snapshot_id,
        records=records,
        manifest=_merged_manifest(run_id, count, manifests, now()),
        shard_snapshot_ids=tuple(str(m["snapshot_id"]) for m in manifests),
        carried_from={
            i: m["shard"]["carried_from"]
            for i, m in enumerate(manifests)
            if "carried_from" in (m.get("shard") or {})  # (not in shards of older versions)
            and any(p.get("status") != "ok" for p in m.get("partition_status") or ())
        },
    )


@dataclass(frozen=True, slots=True)
class MergeResult:
    """What `merge_run` did: the merged snapshot (`written`), its `status` (complete, partial,
    failed) and `already_merged` (these shard snapshots were merged before: nothing written);
    `data_location` and `manifest_location` are the full names of its files (a path under
    the output directory or an `s3://` URL, as `run` reports them)."""

    written: WrittenSnapshot
    status: str
    already_merged: bool
    data_location: str
    manifest_location: str

    @property
    def exit_code(self) -> int:
        """0 complete, 1 partial or failed (as for `run`)."""
        return 0 if self.status == "complete" else 1


def _check_same_regions(run_id: str, count: int, manifests: Sequence[Mapping[str, Any]]) -> None:
    """Refuse shards run with different `[regions]` (the configuration edited between two
    shards of an Indexed Job): merged, the regions one left out would read as jobs removed.
    Shards written before the shard entry said (no `regions`) are not compared."""
    scopes = [m["shard"].get("regions") for m in manifests]
    if any(scope is None for scope in scopes) or all(scope == scopes[0] for scope in scopes):
        return
    odd = next(i for i, scope in enumerate(scopes) if scope != scopes[0])
    raise ShardError(
        f"run {run_id}: shard {odd}/{count} was run with other [regions] than shard 0/{count} "
        f"({_json(scopes[odd])} against {_json(scopes[0])}; the configuration "
        "changed between them?): run the shards again with one configuration; nothing written"
    )


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _check_carried_from(
    merged: MergedRun, latest_manifest: Mapping[str, Any] | None, latest: str | None
) -> None:
    """Refuse a merge whose shards carried jobs of failed partitions forward from another
    snapshot than LATEST (another run was published between the shard and the merge): the
    merged snapshot would lose what LATEST holds for those partitions, and its change file,
    computed against LATEST, would not say so. A shard is fine if LATEST is a merge of this
    run that holds that very shard snapshot (its carried jobs are already LATEST's)."""
    run, in_latest = _merged_shards(latest_manifest or {})
    stale = [
        i
        for i, base in sorted(merged.carried_from.items())
        if base != latest
        and not (run == merged.run_id and merged.shard_snapshot_ids[i] in in_latest)
    ]
    if stale:
        base = merged.carried_from[stale[0]]
        raise ShardError(
            f"run {merged.run_id}: shard(s) {', '.join(map(str, stale))} had failed or skipped "
            "partitions, whose jobs come from the snapshot LATEST named when they ran ("
            f"{base or 'none yet'}), but LATEST names {latest} now (published after they ran): "
            "run those shards again; nothing written"
        )


def _merged_shards(manifest: Mapping[str, Any]) -> tuple[str | None, tuple[Any, ...]]:
    """(run id, shard snapshot ids) of a merged snapshot's manifest; (None, ()) for others."""
    sharded = manifest.get("sharded")
    if not isinstance(sharded, dict):
        return None, ()
    shards = sharded.get("shards") or []
    return sharded.get("run_id"), tuple(s.get("snapshot_id") for s in shards)


async def _merged_before(
    store: Store, merged: MergedRun, latest: dict[str, Any] | None
) -> WrittenSnapshot | None:
    """The published snapshot that merged exactly these shard snapshots, if there is one.

    Published means on the chain back from LATEST (a manifest that a crash left unnamed does
    not count: merging again publishes it). The walk stops at the first snapshot older than
    the run's earliest shard, where no merge of it can be."""
    oldest = merged.snapshot_id[:16]
    want = (merged.run_id, merged.shard_snapshot_ids)
    manifest = latest
    seen: set[str] = set()
    while manifest is not None:
        snapshot_id = str(manifest.get("snapshot_id"))
        if snapshot_id[:16] < oldest or snapshot_id in seen:
            return None
        seen.add(snapshot_id)
        if _merged_shards(manifest) == want:
            data = manifest["data"]
            changes = manifest.get("changes") or {}
            return WrittenSnapshot(
                snapshot_id=snapshot_id,
                data_path=data["path"],
                manifest_path=manifest_path(snapshot_id),
                sha256=data["sha256"],
                bytes=data["bytes"],
                records=data["records"],
                changes_path=changes.get("path"),
                events=changes.get("events"),
            )
        previous = manifest.get("previous_snapshot_id")
        if not previous:
            return None
        try:
            manifest = await store.read_manifest(str(previous))
        except OutputError:  # pruned or unreadable: the chain ends here
            return None
    return None


def _remerged(merged: MergedRun, merged_before: Sequence[Any], latest: str | None) -> MergedRun:
    """`merged` as the snapshot after this run's earlier merge (LATEST, `latest`), which
    joined the shard snapshots `merged_before`: it starts when the earliest shard run again
    since did, not with the shards both share (what it saw anew, a removal among them, was
    seen after everything in LATEST), and its id sorts after LATEST's."""
    again = [i for i in merged.shard_snapshot_ids if i not in merged_before]
    started_at = str(merged.manifest["started_at"])
    if again:
        started_at = max(started_at, iso_seconds(datetime.strptime(min(again)[:16], _ID_TIME)))
    snapshot_id = merged_snapshot_id(
        merged.run_id, started_at, merged.shard_snapshot_ids, after=latest
    )
    manifest = {**merged.manifest, "started_at": started_at}
    records = merged.records
    if snapshot_id != merged.snapshot_id:
        records = [r._replace(snapshot_id=snapshot_id) for r in records]
    return dataclasses.replace(merged, snapshot_id=snapshot_id, records=records, manifest=manifest)


async def merge_run(
    output: str | os.PathLike[str],
    run_id: str,
    count: int,
    *,
    wait: float = 0.0,
    poll: float = 5.0,
    retain: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    store_options: Mapping[str, Any] | None = None,
) -> MergeResult:
    """`snowball-aggregator merge`: wait for the shards (`wait_for_shards`), check and merge
    them (`merge_shards`), and write the merged snapshot under `output` with the normal layout
    (change file against the snapshot LATEST named before, LATEST moved, then `prune(retain)`
    when `retain` is given; a prune that fails is a warning, as in `run`: the snapshot is
    complete and the next prune catches up).

    Nothing is written, and `already_merged` is set, when a published snapshot (on the chain
    back from LATEST) merged exactly these shard snapshots. Otherwise the merged snapshot gets
    a new id, after the one LATEST names: when LATEST is an earlier merge of this run (a shard
    was run again since), the id's time moves past LATEST's if need be; when LATEST is a newer
    snapshot of something else, the merge is refused. A snapshot is never written again under
    an id that LATEST, or the chain behind it, names.

    Keyword options as for `wait_for_shards` and `merge_shards`, plus `retain=None`.
    Raises `ShardError` (missing or mismatched shards, or LATEST newer than the run: nothing
    written) or `OutputError`.
    """
    options = dict(store_options or {})
    async with open_store(output, **options) as store:
        await store.check_writable()  # a wrong location (a file, no permission) fails first: 2
    await wait_for_shards(
        output, run_id, count, wait=wait, poll=poll, clock=clock, sleep=sleep, store_options=options
    )
    merged = await merge_shards(output, run_id, count, now=now, store_options=options)
    status = str(merged.manifest["status"])
    async with open_store(output, **options) as store:
        previous = await store.latest_manifest()
        before = await _merged_before(store, merged, previous)
        if before is not None:
            log.info("merge.already_merged", run_id=run_id, snapshot_id=before.snapshot_id)
            return _result(store, before, status, already_merged=True)
        latest = None if previous is None else str(previous.get("snapshot_id"))
        if previous is not None and _merged_shards(previous)[0] == run_id:
            # A shard was run again since this run's last merge: a new snapshot replaces it.
            merged = _remerged(merged, _merged_shards(previous)[1], latest)
        _check_carried_from(merged, previous, latest)
        if latest is not None and merged.snapshot_id <= latest:
            raise ShardError(
                f"run {run_id}: LATEST names snapshot {latest}, newer than this run (merged "
                f"snapshot {merged.snapshot_id}): merging it would move LATEST back; nothing "
                "written"
            )
        await store.check_writable()
        written = await store.write(
            merged.snapshot_id, merged.records, merged.manifest, previous=previous, shared_id=True
        )
        if retain is not None:
            try:
                await store.prune(retain)
            except OutputError as exc:  # the snapshot is complete; the next prune catches up
                log.warning("snapshot.prune_failed", error=str(exc))
    log.info(
        "merge.finished",
        run_id=run_id,
        shards=count,
        snapshot_id=merged.snapshot_id,
        records=written.records,
        status=status,
    )
    return _result(store, written, status, already_merged=False)


def _result(
    store: Store, written: WrittenSnapshot, status: str, *, already_merged: bool
) -> MergeResult:
    return MergeResult(
        written=written,
        status=status,
        already_merged=already_merged,
        data_location=str(store.locate(written.data_path)),
        manifest_location=str(store.locate(written.manifest_path)),
    )
