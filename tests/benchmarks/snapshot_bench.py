"""Snapshot writing through the real async store: first write, steady state, data only.

`python -m tests.benchmarks.snapshot_bench [--records N] [--work DIR] [--gzip] [--daemon]`
prints one JSON object (see `run`). The steady state is what every run after the first does
(service.py): read LATEST, write the new snapshot, compare it with the previous one (1% of the
jobs changed state, 0.5% added, 0.5% removed), write the change file, the manifest and LATEST.
The store is opened afresh for the timed write, as a one-shot `run` does, so the previous
snapshot is read back from its file; `--daemon` also times a write through the store that wrote
the previous snapshot (what the daemon does: it compares against the view it kept).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import itertools
import logging
import random
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import structlog

from aggregator.records import JobRecord
from aggregator.snapshot import WrittenSnapshot, open_store

__all__ = ["make_manifest", "make_records", "run"]

PREVIOUS_ID = "20261128T150000Z-3f9c"
CURRENT_ID = "20261128T151500Z-a1b2"
_STATES = ("New", "InProgress", "WithCustomer", "Complete", "Cancelled", "FutureState")
_PER_ACCOUNT = 500


_EU = ("eu-west-1",)
_US = ("us-east-1", "us-east-2")


def _fetched(i: int) -> tuple[str, str, str | None]:
    """The strings a ListJobs entry brings for job number `i`: job id, creation date,
    description."""
    return (
        f"JID{i:08x}-4b0c-4d2e-8f3a-{i * 7919 % 10**12:012d}",
        f"2024-0{1 + i % 9}-1{i % 10}T12:34:56.{i % 1000:03d}Z",
        None if i % 4 == 0 else f"Import Logs {i % 997}",
    )


def _record(
    i: int,
    snapshot_id: str,
    observed_at: str,
    state: str,
    fetched: tuple[str, str, str | None] | None = None,
) -> JobRecord:
    """Job number `i` (as tests/benchmarks/child.py `_records` makes them)."""
    job_id, created, description = fetched or _fetched(i)
    return JobRecord(
        account_id=f"{200000000000 + i // _PER_ACCOUNT}",
        job_id=job_id,
        job_state=state,
        job_type="IMPORT" if i % 3 else "EXPORT",
        snowball_type="EDGE",
        is_master=bool(i % 2),
        creation_date=created,
        description=description,
        regions=_EU if i % 5 else _US,
        snapshot_id=snapshot_id,
        observed_at=observed_at,
        last_seen=observed_at,
        stale=False,
    )


def _universe(n: int) -> int:
    """How many job numbers give `n` current jobs once every 200th is removed."""
    return n + (n + 198) // 199


def make_records(n: int, *, previous: bool = False, merged: bool = False) -> list[JobRecord]:
    """The current snapshot's `n` jobs, sorted; with `previous`, the snapshot before it.

    Of every 200 job numbers, #1 is new (not in the previous snapshot), #3 is gone (only in the
    previous one), and #7 and #107 changed state: 1% changed, 0.5% added, 0.5% removed.

    Everything is made in sorted order, so it lies in memory in the order it is written. With
    `merged`, as in a real run: the strings each job brings from ListJobs (job id, creation
    date, description) are made as they are fetched (account by account in any order, each
    account's jobs in ListJobs' order, here shuffled), and merge.py then builds the records in
    sorted order around them; reading the records in order then jumps around in memory, which
    slows the encoder down (cache misses).
    """
    if previous:
        sid, at = PREVIOUS_ID, "2026-11-28T15:00:03Z"
    else:
        sid, at = CURRENT_ID, "2026-11-28T15:15:03Z"
    numbers = [
        i
        for i in range(_universe(n))
        if not ((i % 200 == 1 and previous) or (i % 200 == 3 and not previous))
    ]
    if not previous:
        numbers = numbers[:n]
    fetched: dict[int, tuple[str, str, str | None]] = {}
    if merged:
        rng = random.Random(n)
        accounts = [list(g) for _, g in itertools.groupby(numbers, lambda i: i // _PER_ACCOUNT)]
        rng.shuffle(accounts)
        for jobs in accounts:
            rng.shuffle(jobs)
            for i in jobs:
                fetched[i] = _fetched(i)
    return [
        _record(
            i, sid, at, _STATES[(i + (i % 100 == 7 and previous)) % len(_STATES)], fetched.get(i)
        )
        for i in numbers
    ]


def make_manifest(n: int, snapshot_id: str, started_at: str) -> dict[str, Any]:
    """A manifest as service.py writes it; every partition the jobs come from answered, so
    removals count (a US job is seen from every US region of its account)."""
    accounts = sorted({f"{200000000000 + i // _PER_ACCOUNT}" for i in range(_universe(n))})
    status = [
        {
            "account_id": a,
            "region": region,
            "status": "ok",
            "jobs": _PER_ACCOUNT,
            "requests": 5,
            "error_code": None,
            "message": None,
        }
        for a in accounts
        for region in ("eu-west-1", "us-east-1", "us-east-2")
    ]
    return {
        "tool_version": "bench",
        "started_at": started_at,
        "finished_at": started_at,
        "status": "complete",
        "accounts": len(accounts),
        "partitions": {"planned": len(status), "ok": len(status), "failed": 0, "skipped": 0},
        "failed_partitions": [],
        "partition_status": status,
        "jobs": n,
        "stale_jobs": 0,
        "duplicates_removed": 0,
    }


def _rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident set, in MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _check(root: Path, written: WrittenSnapshot) -> None:
    """What the timed write left (not timed, and read in chunks so as not to raise the peak
    resident set): LATEST names its manifest, whose digests and sizes are those of the files,
    and the data file has a line per record."""
    manifest = orjson.loads((root / (root / "LATEST").read_text().strip()).read_bytes())
    assert manifest["snapshot_id"] == written.snapshot_id, manifest["snapshot_id"]
    for part in ("data", "changes"):
        if not manifest.get(part):  # a write with changes=False
            continue
        digest, size, lines = hashlib.sha256(), 0, 0
        with open(root / manifest[part]["path"], "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
                lines += chunk.count(b"\n")
        assert size == manifest[part]["bytes"], part
        assert digest.hexdigest() == manifest[part]["sha256"], part
        if part == "data" and not manifest[part]["compression"]:
            assert lines == written.records
    if manifest.get("changes"):
        assert manifest["changes"]["events"] == written.events


async def _timed(fn: Callable[[], Any]) -> tuple[Any, float, float, float]:
    """(result, wall, CPU of every thread, CPU of this thread) of `await fn()`, in seconds.

    This thread runs the event loop, so its CPU is the encoding and the comparison; unlike
    the wall time, it barely moves when another process competes for the cores."""
    gc.collect()
    wall, cpu, main = time.perf_counter(), time.process_time(), time.thread_time()
    result = await fn()
    return (
        result,
        time.perf_counter() - wall,
        time.process_time() - cpu,
        time.thread_time() - main,
    )


async def _main(
    records: int,
    work: Path,
    *,
    compress: str,
    merged: bool,
    remember: bool | None,
    daemon: bool,
) -> dict[str, Any]:
    first_dir, steady_dir, daemon_dir = work / "first", work / "steady", work / "daemon"
    data_dir = work / "data"
    for d in (first_dir, steady_dir, daemon_dir, data_dir):
        shutil.rmtree(d, ignore_errors=True)
    options: dict[str, Any] = {"compress": compress}
    if remember is not None:
        options["remember"] = remember
    old_manifest = make_manifest(records, PREVIOUS_ID, "2026-11-28T15:00:00Z")

    # The previous snapshot (not timed), written by a store that the timed one-shot write
    # does not share: it reads the previous data file back, as `snowball-aggregator run` does.
    old = make_records(records, previous=True, merged=merged)
    async with open_store(steady_dir, **options) as store:
        await store.write(PREVIOUS_ID, old, old_manifest, previous=None)
    del old
    new = make_records(records, merged=merged)
    manifest = make_manifest(records, CURRENT_ID, "2026-11-28T15:15:00Z")
    rss_records = _rss_mb("VmRSS")

    async def first() -> WrittenSnapshot:
        async with open_store(first_dir, **options) as store:
            return await store.write(CURRENT_ID, new, manifest, previous=None)

    async def steady() -> WrittenSnapshot:
        async with open_store(steady_dir, **options) as store:
            previous = await store.latest_manifest()
            return await store.write(CURRENT_ID, new, manifest, previous=previous)

    async def data_only() -> WrittenSnapshot:
        async with open_store(data_dir, **options) as store:
            return await store.write(CURRENT_ID, new, manifest, changes=False)

    written_first, first_wall, first_cpu, first_main = await _timed(first)
    _check(first_dir, written_first)
    shutil.rmtree(first_dir, ignore_errors=True)
    written, wall, cpu, main = await _timed(steady)
    _check(steady_dir, written)
    shutil.rmtree(steady_dir, ignore_errors=True)
    written_data, data_wall, data_cpu, data_main = await _timed(data_only)
    _check(data_dir, written_data)
    shutil.rmtree(data_dir, ignore_errors=True)
    out: dict[str, Any] = {
        "records": written.records,
        "compress": compress,
        "merged": merged,
        "wall": round(wall, 4),
        "cpu": round(cpu, 4),
        "main_cpu": round(main, 4),
        "rate": round(records / wall),
        "cpu_rate": round(records / cpu) if cpu else None,
        "changes": written.events,
        "bytes": written.bytes,
        "first_wall": round(first_wall, 4),
        "first_cpu": round(first_cpu, 4),
        "first_main_cpu": round(first_main, 4),
        "first_rate": round(records / first_wall),
        "first_cpu_rate": round(records / first_cpu) if first_cpu else None,
        "first_changes": written_first.events,
        "data_wall": round(data_wall, 4),
        "data_cpu": round(data_cpu, 4),
        "data_main_cpu": round(data_main, 4),
        "data_rate": round(records / data_wall),
    }
    if daemon:
        # The daemon's next cycle: the store that wrote the previous snapshot writes again
        # (with `remember`, it compares against what it kept instead of the file).
        old = make_records(records, previous=True, merged=merged)
        async with open_store(daemon_dir, **options) as store:
            await store.write(PREVIOUS_ID, old, old_manifest, previous=None)
            del old
            previous = await store.latest_manifest()

            async def again() -> WrittenSnapshot:
                return await store.write(CURRENT_ID, new, manifest, previous=previous)

            written_daemon, d_wall, d_cpu, d_main = await _timed(again)
        _check(daemon_dir, written_daemon)
        shutil.rmtree(daemon_dir, ignore_errors=True)
        assert written_daemon.events == written.events
        out |= {
            "daemon_wall": round(d_wall, 4),
            "daemon_cpu": round(d_cpu, 4),
            "daemon_main_cpu": round(d_main, 4),
            "daemon_rate": round(records / d_wall),
        }
    out["rss_records_mb"] = round(rss_records, 1)
    out["rss_mb"] = round(_rss_mb(), 1)
    return out


def run(
    records: int,
    work: Path,
    *,
    compress: str = "none",
    merged: bool = False,
    remember: bool | None = None,
    daemon: bool = False,
) -> dict[str, Any]:
    """Time a first write and a steady-state write of `records` jobs under `work` (through
    `open_store(...).write`, as service.py calls it), check what they wrote, remove it.

    Returns `records`; `wall`, `cpu` (seconds, CPU of every thread), `main_cpu` (CPU of the
    event loop's thread, which holds the GIL while it encodes and compares: the write's
    critical path, and a steadier figure than `wall` on a busy machine), `rate` (records/s,
    wall) and `cpu_rate` of the steady-state write, its `changes` (events) and `bytes` (data
    file); the same `first_*` figures for a first write (no previous snapshot: a `job_added`
    per job); `data_wall`/`data_cpu`/`data_main_cpu`/`data_rate` for a write without the
    change file (`changes=False`, as a shard writes: the data file and the manifest alone);
    `rss_records_mb` (resident set with the records in memory, before the timed writes)
    and `rss_mb` (peak). With `daemon`, also `daemon_wall`/`daemon_cpu`/`daemon_main_cpu`/
    `daemon_rate`: a write by the store that wrote the previous snapshot.

    Options: `compress` ("none" or "gzip"), `merged` (records laid out in memory as merge.py
    leaves them, see `make_records`; default False: in sorted order, like child.py's),
    `remember` (the store option; default: the store's own default).
    """
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        cache_logger_on_first_use=True,
    )
    work.mkdir(parents=True, exist_ok=True)
    return asyncio.run(
        _main(
            records,
            work,
            compress=compress,
            merged=merged,
            remember=remember,
            daemon=daemon,
        )
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.snapshot_bench")
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--work", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--gzip", action="store_true", help="compress='gzip'")
    parser.add_argument(
        "--merged", action="store_true", help="records laid out in memory as in a real run"
    )
    parser.add_argument(
        "--remember", choices=["yes", "no"], default=None, help="default: the store's default"
    )
    parser.add_argument("--daemon", action="store_true", help="also time the daemon's write")
    args = parser.parse_args(argv)
    options: dict[str, Any] = {
        "compress": "gzip" if args.gzip else "none",
        "merged": args.merged,
        "remember": None if args.remember is None else args.remember == "yes",
        "daemon": args.daemon,
    }
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="snapshot-bench-") as tmp:
            result = run(args.records, Path(tmp), **options)
    else:
        result = run(args.records, args.work, **options)
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
