"""Snapshot: the layout of DESIGN.md, atomic writes in order, gzip, reading back, retention."""

from __future__ import annotations

import asyncio
import collections
import errno
import gzip
import hashlib
import os
import random
import re
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from structlog.testing import capture_logs

from aggregator import snapshot
from aggregator.changes import encode_events
from aggregator.errors import OutputError
from aggregator.records import JobRecord
from aggregator.service import run_once
from aggregator.snapshot import LocalStore, Store, new_snapshot_id, open_store

from .conftest import SandboxFactory, make_settings

A = "111111111111"
PARTITIONS = [{"account_id": A, "region": "eu-west-1", "status": "ok"}]


def sid(n: int) -> str:
    """Snapshot ids one minute apart, in order."""
    return f"20261128T{15 + n // 60:02d}{n % 60:02d}00Z-{n:04x}"


def record(job_id: str, snapshot_id: str = "20261128T150000Z-abcd", **fields: Any) -> JobRecord:
    base = JobRecord.from_json_dict(
        {
            "account_id": A,
            "job_id": job_id,
            "job_state": "New",
            "regions": ["eu-west-1"],
            "snapshot_id": snapshot_id,
            "observed_at": "2026-11-28T15:00:03Z",
        }
    )
    return base._replace(**fields)


def records(snapshot_id: str, states: dict[str, str]) -> list[JobRecord]:
    return [record(j, snapshot_id, job_state=s) for j, s in sorted(states.items())]


async def write(
    store: Store, snapshot_id: str, states: dict[str, str], **manifest: Any
) -> snapshot.WrittenSnapshot:
    """One cycle's write as the service does it: previous = what LATEST names."""
    previous = await store.latest_manifest()
    return await store.write(
        snapshot_id,
        records(snapshot_id, states),
        {"status": "complete", "partition_status": PARTITIONS, **manifest},
        previous=previous,
    )


def tmp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def files_of(root: Path, pattern: str) -> list[Path]:
    return list(root.glob(pattern))


def snapshot_ids(root: Path) -> list[str]:
    return sorted(
        p.name.removesuffix(".manifest.json") for p in root.glob("snapshots/*/*.manifest.json")
    )


async def test_layout_manifest_changes_and_latest(tmp_path: Path) -> None:
    """Data, manifest, change file and LATEST land where DESIGN.md says, with digests."""
    async with LocalStore(tmp_path) as store:
        written = await write(store, "20261128T150000Z-abcd", {"A": "New", "B": "New"})
    folder = tmp_path / "snapshots" / "date=2026-11-28"
    data = folder / "20261128T150000Z-abcd.jsonl"
    manifest_path = folder / "20261128T150000Z-abcd.manifest.json"
    changes = tmp_path / "changes" / "date=2026-11-28" / "20261128T150000Z-abcd.jsonl"
    assert data.is_file() and manifest_path.is_file() and changes.is_file()
    assert (tmp_path / "LATEST").read_text() == written.manifest_path + "\n"
    manifest = orjson.loads(manifest_path.read_bytes())
    assert manifest["snapshot_id"] == written.snapshot_id
    assert manifest["previous_snapshot_id"] is None
    assert manifest["data"] == {
        "path": "snapshots/date=2026-11-28/20261128T150000Z-abcd.jsonl",
        "sha256": hashlib.sha256(data.read_bytes()).hexdigest(),
        "bytes": data.stat().st_size,
        "records": 2,
        "compression": None,
    }
    assert manifest["changes"]["path"] == "changes/date=2026-11-28/20261128T150000Z-abcd.jsonl"
    assert manifest["changes"]["sha256"] == hashlib.sha256(changes.read_bytes()).hexdigest()
    assert manifest["changes"]["events"] == 2 == manifest["changes"]["counts"]["job_added"]
    lines = data.read_bytes().splitlines()
    first = orjson.loads(lines[0])
    assert list(first) == sorted(first)
    assert first == records(written.snapshot_id, {"A": "New"})[0].to_json_dict()
    async with LocalStore(tmp_path) as store:
        assert await store.latest_manifest() == manifest
        assert [r.job_id async for r in store.read_records(manifest)] == ["A", "B"]
    assert not tmp_files(tmp_path)


def test_fast_encoder_is_in_use_and_equals_the_record_dict() -> None:
    """The batch encoder writes exactly `to_json_dict()` with sorted keys, one per line,
    whatever the strings hold (quotes, braces that look like a boundary, newlines)."""
    assert snapshot.FAST_RECORD_ENCODER, "update _RECORD_FIELDS in snapshot.py"
    tricky = [
        record("A", description='},{"account_id":"222222222222"}'),
        record("B", description='line\nbreak "quoted" \\ back\\slash \u2028 \U0001f680'),
        record("C", job_state=None, job_type=None, is_master=None, creation_date=None),
        record("D", regions=("us-east-1", "us-west-2"), stale=True, job_state="Brand-New"),
    ]
    body = snapshot._encode_records(tricky)
    expected = b"".join(
        orjson.dumps(r.to_json_dict(), option=orjson.OPT_SORT_KEYS) + b"\n" for r in tricky
    )
    assert body == expected
    assert [JobRecord.from_json_dict(orjson.loads(line)) for line in body.splitlines()] == tricky
    assert snapshot._encode_records([]) == b""


async def test_gzip_files_round_trip(tmp_path: Path) -> None:
    """compress="gzip" writes .jsonl.gz data and change files whose digest is of the stored
    bytes; records read back unchanged."""
    recs = records("20261128T150000Z-abcd", {f"J{i:05d}": "New" for i in range(20_000)})
    async with LocalStore(tmp_path, compress="gzip") as store:
        written = await store.write(
            "20261128T150000Z-abcd", recs, {"partition_status": PARTITIONS}, previous=None
        )
        manifest = await store.latest_manifest()
        assert manifest is not None
        assert [r async for r in store.read_records(manifest)] == recs
    assert written.data_path.endswith(".jsonl.gz") and manifest["data"]["compression"] == "gzip"
    stored = (tmp_path / written.data_path).read_bytes()
    assert hashlib.sha256(stored).hexdigest() == manifest["data"]["sha256"]
    assert len(stored) == manifest["data"]["bytes"] < len(gzip.decompress(stored)) // 5
    assert gzip.decompress(stored) == snapshot._encode_records(recs)
    changes = (tmp_path / manifest["changes"]["path"]).read_bytes()
    assert len(gzip.decompress(changes).splitlines()) == 20_000


@pytest.mark.parametrize(("before", "after"), [("none", "gzip"), ("gzip", "none")])
async def test_previous_snapshot_is_read_whatever_its_compression(
    tmp_path: Path, before: str, after: str
) -> None:
    """Changing `compress` between runs keeps the changes flowing: the manifest's path says
    how to read the previous data file."""
    async with open_store(tmp_path, compress=before) as store:
        await write(store, sid(0), {"A": "New", "B": "New"})
    async with open_store(tmp_path, compress=after) as store:
        written = await write(store, sid(1), {"A": "Complete", "C": "New"})
    manifest = orjson.loads((tmp_path / written.manifest_path).read_bytes())
    assert manifest["changes"]["counts"] == {
        "job_added": 1,
        "job_recovered": 0,
        "state_changed": 1,
        "job_went_stale": 0,
        "job_removed": 1,
    }


async def test_failure_while_writing_data_leaves_the_previous_snapshot(tmp_path: Path) -> None:
    """An error in the middle of the data file: no new file under a final name, no temp
    file, LATEST unchanged."""
    async with LocalStore(tmp_path) as store:
        await write(store, sid(0), {"A": "New"})
        latest = (tmp_path / "LATEST").read_bytes()
        bad = records(sid(1), {f"J{i:05d}": "New" for i in range(20_000)})
        bad[15_000] = bad[15_000]._replace(description=object())  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await store.write(sid(1), bad, {"partition_status": PARTITIONS}, previous=None)
    assert (tmp_path / "LATEST").read_bytes() == latest
    assert snapshot_ids(tmp_path) == [sid(0)]
    assert not files_of(tmp_path, f"*/*/{sid(1)}*") and not tmp_files(tmp_path)


async def test_failure_before_latest_keeps_latest_and_staged_changes_vanish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the manifest cannot be written, the staged change file is removed and LATEST still
    names the previous snapshot; the data file already in place is deleted at once (it was
    left for a prune that only a later successful write runs: on a nearly full disk, every
    failed run left one, until nothing fitted)."""
    async with LocalStore(tmp_path, debris_age=0) as store:
        await write(store, sid(0), {"A": "New"})
        real_put = store._put

        async def failing_put(rel: str, *args: Any, **kwargs: Any) -> Any:
            if rel.endswith(".manifest.json"):
                raise OutputError("disk full (simulated)")
            return await real_put(rel, *args, **kwargs)

        monkeypatch.setattr(store, "_put", failing_put)
        with pytest.raises(OutputError, match="simulated"):
            await write(store, sid(1), {"A": "Complete"})
        monkeypatch.setattr(store, "_put", real_put)
        assert (tmp_path / "LATEST").read_text().strip().endswith(f"{sid(0)}.manifest.json")
        assert not files_of(tmp_path, f"*/*/{sid(1)}*") and not tmp_files(tmp_path)
        await write(store, sid(2), {"A": "Complete"})
        pruned = await store.prune(5)
    assert pruned.incomplete == ()
    assert snapshot_ids(tmp_path) == [sid(0), sid(2)]


@pytest.mark.parametrize("fails", ["manifest-named", "changes", "LATEST", "cancelled"])
async def test_a_write_that_fails_before_latest_moves_takes_back_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fails: str
) -> None:
    """A change file put in place, then LATEST failing to move (its temporary file does not
    fit), or the write cancelled meanwhile: the data file, manifest and change file are
    deleted. The change file stayed: the next snapshot's repeated its events from the same
    previous snapshot, and a reader of every change file counted them twice."""
    async with LocalStore(tmp_path) as store:
        await write(store, sid(0), {"A": "New"})
        real_put = store._put

        async def failing_put(rel: str, *args: Any, **kwargs: Any) -> Any:
            if rel == "LATEST":
                if fails == "cancelled":
                    raise asyncio.CancelledError
                raise OutputError("No space left on device (simulated)")
            return await real_put(rel, *args, **kwargs)

        if fails in ("changes", "manifest-named"):
            # The change file's own publish fails (the manifest is in), or the manifest's
            # fails once it has its name (its folder's fsync failing after the rename).
            real_publish = snapshot._LocalSink.publish

            async def failing_publish(self: Any) -> None:
                if fails == "manifest-named" and str(self._final).endswith(".manifest.json"):
                    await real_publish(self)
                    raise OutputError("Input/output error (simulated)")
                if fails == "changes" and "changes/" in str(self._final):
                    raise OutputError("No space left on device (simulated)")
                await real_publish(self)

            monkeypatch.setattr(snapshot._LocalSink, "publish", failing_publish)
        else:
            monkeypatch.setattr(store, "_put", failing_put)
        error = asyncio.CancelledError if fails == "cancelled" else OutputError
        with capture_logs() as logs, pytest.raises(error):
            await write(store, sid(1), {"A": "Complete", "B": "New"})
        monkeypatch.undo()
        # (a file is named as soon as its put starts: it may have its name when the put fails)
        assert [e["files"] for e in logs if e["event"] == "snapshot.taken_back"] == [
            2 if fails == "manifest-named" else 3
        ]
        assert not files_of(tmp_path, f"*/*/{sid(1)}*") and not tmp_files(tmp_path)
        assert (tmp_path / "LATEST").read_text().strip().endswith(f"{sid(0)}.manifest.json")
        written = await write(store, sid(2), {"A": "Complete", "B": "New"})
    assert written.changes_path is not None
    events = [
        orjson.loads(line) for line in (tmp_path / written.changes_path).read_bytes().splitlines()
    ]
    assert sorted(e["event"] for e in events) == ["job_added", "state_changed"]
    assert len(files_of(tmp_path, "changes/*/*.jsonl")) == 2  # sid(0)'s and sid(2)'s only


async def test_a_cancelled_write_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelling a write while its writer thread is busy (the shutdown deadline) waits for
    that chunk, then removes the temporary files; LATEST stays."""
    async with LocalStore(tmp_path) as store:
        await write(store, sid(0), {"A": "New"})
        loop = asyncio.get_running_loop()
        started = asyncio.Event()
        release = threading.Event()
        real_write = snapshot._LocalSink.write_blocking

        def slow(self: Any, data: bytes) -> None:
            real_write(self, data)
            loop.call_soon_threadsafe(started.set)
            release.wait(timeout=30)

        monkeypatch.setattr(snapshot._LocalSink, "write_blocking", slow)
        task = asyncio.create_task(write(store, sid(1), {"A": "Complete"}))
        await started.wait()
        assert tmp_files(tmp_path), "the data file is being written"
        task.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert not tmp_files(tmp_path)
    assert snapshot_ids(tmp_path) == [sid(0)]
    assert (tmp_path / "LATEST").read_text().strip().endswith(f"{sid(0)}.manifest.json")


async def test_a_latest_put_that_may_still_land_leaves_the_files(tmp_path: Path) -> None:
    """A store whose failed LATEST write may land afterwards (S3: a PUT whose answer was lost)
    takes nothing back once that write was sent: deleting the files would leave LATEST naming
    a manifest that is gone when the PUT lands. Before it was sent, it takes them back."""

    class Doubtful(LocalStore):
        _latest_may_land_later = True
        fail: str = ""

        async def _put(self, rel: str, *args: Any, **kwargs: Any) -> Any:
            if rel == self.fail:
                raise OutputError("read timeout (simulated)", transient=True)
            return await super()._put(rel, *args, **kwargs)

    async with Doubtful(tmp_path) as store:
        await write(store, sid(0), {"A": "New"})
        store.fail = "LATEST"
        with pytest.raises(OutputError):
            await write(store, sid(1), {"A": "Complete"})
        assert len(files_of(tmp_path, f"*/*/{sid(1)}*")) == 3  # data, manifest, changes: kept
        store.fail = snapshot.manifest_path(sid(2))
        with pytest.raises(OutputError):
            await write(store, sid(2), {"A": "Complete"})
        assert not files_of(tmp_path, f"*/*/{sid(2)}*")  # LATEST never sent: taken back


async def test_the_data_is_flushed_to_disk_in_a_thread_while_it_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every `_SYNC_EVERY` bytes a file is flushed (fdatasync) by a thread of its own, one flush
    of a file at a time, and the files are those of a write without flushes."""
    flushes: list[str] = []
    active: collections.Counter[int] = collections.Counter()
    overlapped = False
    real = getattr(os, "fdatasync", os.fsync)

    def flush(fd: int) -> None:
        nonlocal overlapped
        active[fd] += 1
        overlapped = overlapped or active[fd] > 1
        flushes.append(threading.current_thread().name)
        real(fd)
        active[fd] -= 1

    states = {f"J{i:05d}": "New" for i in range(3000)}
    async with LocalStore(tmp_path / "plain") as store:
        plain = await write(store, sid(0), states)
    monkeypatch.setattr(snapshot, "_RECORD_BATCH", 100)
    monkeypatch.setattr(snapshot, "_SYNC_EVERY", 4096)
    monkeypatch.setattr(snapshot, "_fdatasync", flush)
    async with LocalStore(tmp_path / "flushed") as store:
        flushed = await write(store, sid(0), states)
    assert len(flushes) > 10 and all(n.startswith("snapshot-sync") for n in flushes)
    assert not overlapped
    assert flushed == plain
    for rel in (plain.data_path, plain.changes_path, plain.manifest_path, "LATEST"):
        assert rel is not None
        assert (tmp_path / "flushed" / rel).read_bytes() == (tmp_path / "plain" / rel).read_bytes()
    assert not tmp_files(tmp_path)


class _CacheLog:
    """What a write or a read asks of the page cache: ("sync", fd) for each flush and
    ("drop", fd, offset, length) for each `posix_fadvise(DONTNEED)`, in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.lock = threading.Lock()
        real = getattr(os, "fdatasync", os.fsync)

        def flush(fd: int) -> None:
            real(fd)
            with self.lock:
                self.events.append(("sync", fd))

        def advise(fd: int, offset: int, length: int, advice: int) -> None:
            assert advice == os.POSIX_FADV_DONTNEED
            with self.lock:
                self.events.append(("drop", fd, offset, length))

        monkeypatch.setattr(snapshot, "_SYNC_EVERY", 4096)
        monkeypatch.setattr(snapshot, "_fdatasync", flush)
        monkeypatch.setattr(snapshot, "_fadvise", advise)

    def drops(self, *, synced: bool) -> list[list[tuple[int, int]]]:
        """The dropped ranges, file by file (a file's last drop is the one to its end: a
        descriptor may be reused after it); with `synced`, each range must follow a flush of
        its file that came after the previous drop (only clean pages can go)."""
        files: list[list[tuple[int, int]]] = []
        open_: dict[int, list[tuple[int, int]]] = {}
        flushed: set[int] = set()
        for event in self.events:
            if event[0] == "sync":
                flushed.add(event[1])
                continue
            _, fd, offset, length = event
            if synced and length:
                assert fd in flushed, f"range {offset}+{length} dropped before it was flushed"
                flushed.discard(fd)
            if fd not in open_:
                open_[fd] = []
                files.append(open_[fd])
            open_[fd].append((offset, length))
            if not length:
                del open_[fd]
        assert not open_, "every file's pages are dropped to its end"
        return files


def _covers_whole_file(ranges: list[tuple[int, int]]) -> None:
    """Consecutive ranges from 0, the last one to the end of the file (length 0)."""
    at = 0
    for offset, length in ranges[:-1]:
        assert offset == at and length > 0, ranges
        at += length
    assert ranges[-1] == (at, 0), ranges


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise (macOS)")
async def test_the_change_file_leaves_the_page_cache_as_it_is_flushed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The change file's pages are dropped from the page cache range by range as they are
    flushed (so the next range reuses them), the rest once it is sealed; the data file, which
    the next run reads back, and the small files stay cached. The files are those of a write
    that keeps everything cached."""
    states = {f"J{i:05d}": "New" for i in range(3000)}
    async with LocalStore(tmp_path / "cached") as store:
        cached = await write(store, sid(0), states)
    monkeypatch.setattr(snapshot, "_RECORD_BATCH", 100)
    log = _CacheLog(monkeypatch)
    async with LocalStore(tmp_path / "dropped") as store:
        dropped = await write(store, sid(0), states)
    assert dropped == cached
    for rel in (cached.data_path, cached.changes_path, cached.manifest_path, "LATEST"):
        assert rel is not None
        assert (tmp_path / "dropped" / rel).read_bytes() == (tmp_path / "cached" / rel).read_bytes()
    assert sum(event[0] == "sync" for event in log.events) > 10  # both big files were flushed
    (ranges,) = log.drops(synced=True)  # one file: the change file
    _covers_whole_file(ranges)
    assert dropped.changes_path is not None
    size = (tmp_path / "dropped" / dropped.changes_path).stat().st_size
    assert len(ranges) > 3 and size - 4096 < ranges[-1][0] <= size


async def test_an_abort_after_a_cancelled_seal_waits_for_the_flush_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seal cancelled while it waits for the background flush, and again in its cleanup,
    leaves the flush thread running; the abort that follows waits for it before closing the
    file, so the flush never runs on a closed (maybe reused) descriptor."""
    entered, release = threading.Event(), threading.Event()
    seen: list[str] = []
    real = getattr(os, "fdatasync", os.fsync)
    inode = 0

    def blocked(fd: int) -> None:
        entered.set()
        release.wait(timeout=30)
        try:
            same = os.fstat(fd).st_ino == inode
        except OSError:
            same = False
        seen.append("open" if same else "closed")
        real(fd)

    monkeypatch.setattr(snapshot, "_SYNC_EVERY", 4096)
    monkeypatch.setattr(snapshot, "_fdatasync", blocked)
    async with LocalStore(tmp_path) as store:
        sink = await store._open("snapshots/date=2026-11-28/x.jsonl")
        assert isinstance(sink, snapshot._LocalSink) and sink._fh is not None
        inode = os.fstat(sink._fh.fileno()).st_ino
        sink.write_blocking(b"x" * 5000)  # a flush starts in its thread, and blocks there
        await asyncio.to_thread(entered.wait, 30)
        syncer = sink._syncer
        assert syncer is not None
        stopping = threading.Event()
        real_shutdown = syncer.shutdown

        def shutdown(*args: Any, **kwargs: Any) -> None:
            stopping.set()
            real_shutdown(*args, **kwargs)

        monkeypatch.setattr(syncer, "shutdown", shutdown)
        seal = asyncio.create_task(sink.seal())
        await asyncio.sleep(0)  # seal waits for the flush...
        seal.cancel()  # ...and, cancelled, ends the flush thread in its cleanup...
        await asyncio.to_thread(stopping.wait, 30)
        seal.cancel()  # ...which is cancelled too, while the thread waits for the flush
        with pytest.raises(asyncio.CancelledError):
            await seal
        abort = asyncio.create_task(sink.abort())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not abort.done(), "the abort waits for the flush"
        release.set()
        await asyncio.wait_for(abort, 30)
    assert seen == ["open"]
    assert not tmp_files(tmp_path)


async def test_a_failed_flush_fails_the_write_and_keeps_the_previous_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An error of a flush made in the background fails the write with `OutputError`: no
    temporary file is left and LATEST still names the previous snapshot."""
    async with LocalStore(tmp_path) as store:
        await write(store, sid(0), {"A": "New"})

        def failing(fd: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(snapshot, "_SYNC_EVERY", 4096)
        monkeypatch.setattr(snapshot, "_fdatasync", failing)
        with pytest.raises(OutputError, match="Input/output error"):
            await write(store, sid(1), {f"J{i:05d}": "New" for i in range(3000)})
    assert snapshot_ids(tmp_path) == [sid(0)]
    assert (tmp_path / "LATEST").read_text().strip().endswith(f"{sid(0)}.manifest.json")
    assert not files_of(tmp_path, f"*/*/{sid(1)}*") and not tmp_files(tmp_path)


async def test_the_switch_interval_is_short_while_writing_and_restored_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a snapshot is written, the writer threads get the GIL back within 0.5 ms; the
    interpreter's switch interval is restored after the write, also after a failed one."""
    seen: list[float] = []
    real_write = snapshot._LocalSink.write_blocking

    def spy(self: Any, data: bytes) -> None:
        seen.append(sys.getswitchinterval())
        real_write(self, data)

    monkeypatch.setattr(snapshot._LocalSink, "write_blocking", spy)
    before = sys.getswitchinterval()
    assert before > 0.0005
    async with LocalStore(tmp_path) as store:
        await write(store, sid(0), {"A": "New"})
        assert seen and max(seen) <= 0.0005
        assert sys.getswitchinterval() == before
        bad = records(sid(1), {"B": "New"})
        bad[0] = bad[0]._replace(description=object())  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await store.write(sid(1), bad, {"partition_status": PARTITIONS}, previous=None)
    assert sys.getswitchinterval() == before


async def test_a_gzip_file_of_several_members_is_read_whole(tmp_path: Path) -> None:
    """A data file of several gzip members (`cat a.gz b.gz`, pigz, bgzip), zero padded, is one
    valid gzip file: every record is read back and compared, not only the first member's.
    (Recompressed by a tool that also updates the manifest's digest and size: without that,
    the file is one the manifest does not describe, see the next test.)"""
    async with open_store(tmp_path, compress="gzip") as store:
        first = await write(store, sid(0), {"A": "New", "B": "New", "C": "New"})
    path = tmp_path / first.data_path
    lines = gzip.decompress(path.read_bytes()).splitlines(keepends=True)
    path.write_bytes(gzip.compress(lines[0]) + gzip.compress(b"".join(lines[1:])) + bytes(8))
    _describe(tmp_path / first.manifest_path, path)
    async with open_store(tmp_path, compress="gzip") as store:
        previous = await store.read_manifest(sid(0))
        assert [r.job_id async for r in store.read_records(previous)] == ["A", "B", "C"]
        written = await write(store, sid(1), {"A": "New", "B": "Complete"})
    manifest = orjson.loads((tmp_path / written.manifest_path).read_bytes())
    assert manifest["changes"]["counts"] == {
        "job_added": 0,
        "job_recovered": 0,
        "state_changed": 1,
        "job_went_stale": 0,
        "job_removed": 1,
    }
    path.write_bytes(path.read_bytes() + gzip.compress(b"x")[:12])  # a member cut short
    async with open_store(tmp_path, compress="gzip") as store:
        with pytest.raises(OutputError, match="truncated gzip stream"):
            [r async for r in store.read_records(await store.read_manifest(sid(0)))]


def test_a_gzip_level_zlib_refuses_is_refused_at_once(tmp_path: Path) -> None:
    """`gzip_level` outside 1 to 9 is refused when the store is made, not at its first write
    (`ValueError: Invalid initialization option`) or never (0, -1 with compress = none)."""
    for level in (0, -1, 10, "6", True):
        with pytest.raises(ValueError, match="gzip_level must be an integer from 1 to 9"):
            open_store(tmp_path, compress="gzip", gzip_level=level)  # type: ignore[arg-type]


async def test_a_damaged_gzip_stream_names_its_file_in_diff_too(tmp_path: Path) -> None:
    """A flipped byte inside a gzip data file is an error naming that file, in `diff` as in
    `read_records` (diff said only "cannot compare A and B: Error -3 while decompressing")."""
    async with open_store(tmp_path, compress="gzip") as store:
        await write(store, sid(0), {f"J{i:04d}": "New" for i in range(2000)})
        damaged = await write(store, sid(1), {f"J{i:04d}": "Complete" for i in range(2000)})
    path = tmp_path / damaged.data_path
    body = bytearray(path.read_bytes())
    body[len(body) // 2] ^= 0x55
    path.write_bytes(bytes(body))
    async with open_store(tmp_path) as store:
        for old, new in ((sid(0), sid(1)), (sid(1), sid(0))):
            with pytest.raises(OutputError) as info:
                async for _ in store.diff(old, new):
                    pass
            assert str(info.value).startswith(f"{path}: damaged gzip stream: "), info.value


def _describe(manifest_path: Path, data: Path) -> None:
    """Make the manifest's `data.sha256` and `data.bytes` describe the data file as it is."""
    manifest = orjson.loads(manifest_path.read_bytes())
    body = data.read_bytes()
    manifest["data"] |= {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}
    manifest_path.write_bytes(orjson.dumps(manifest))


@pytest.mark.parametrize("compress", ["none", "gzip"])
async def test_a_data_file_its_manifest_does_not_describe_is_refused(
    tmp_path: Path, compress: str
) -> None:
    """A data file edited by hand (same number of sorted records) is not the one its
    manifest's sha256 and size describe. Reading its records (what a failed partition carries
    forward, `diff`, `merge`) is then an error naming the file, as for a file cut short,
    instead of jobs forged or lost; the next run's comparison checks the size only (the
    digest would cost 15% of its write), and writes no change file rather than invent one."""
    async with open_store(tmp_path, compress=compress) as store:
        first = await write(store, sid(0), {"A": "New", "B": "New", "C": "New"})
    path = tmp_path / first.data_path
    body = path.read_bytes()
    plain = gzip.decompress(body) if compress == "gzip" else body

    def edit(old: bytes, new: bytes) -> None:
        edited = plain.replace(old, new, 1)
        assert edited != plain
        path.write_bytes(gzip.compress(edited, mtime=0) if compress == "gzip" else edited)

    edit(b'"job_id":"B"', b'"job_id":"b"')  # the same size: only the digest tells
    async with open_store(tmp_path, compress=compress) as store:
        previous = await store.read_manifest(sid(0))
        with pytest.raises(OutputError, match="damaged or was edited") as e:
            [r async for r in store.read_records(previous)]
        assert str(e.value).startswith(f"{path}: ")
        if compress == "none":  # (recompressed, the gzip file's size differs anyway)
            assert "does not match the sha256 in its manifest" in str(e.value)
    edit(b'"job_state":"New"', b'"job_state":"Gone"')
    async with open_store(tmp_path, compress=compress) as store:
        with pytest.raises(OutputError, match="bytes do not match the size in its manifest"):
            [r async for r in store.read_records(await store.read_manifest(sid(0)))]
        written = await write(store, sid(1), {"A": "New", "B": "Complete"})
        assert written.changes_path is None
    _describe(tmp_path / first.manifest_path, path)  # what the edit's author should have done
    async with open_store(tmp_path, compress=compress) as store:
        previous = await store.read_manifest(sid(0))
        assert [r.job_state async for r in store.read_records(previous)] == ["Gone", "New", "New"]


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        ({"latest": b"snap\x00shots"}, "LATEST does not name a manifest"),
        ({"latest": b"/etc/passwd"}, "is not a relative path"),
        ({"latest": b"../elsewhere/x.manifest.json"}, "leaves the location"),
        ({"latest": b" \n"}, "LATEST does not name a manifest: it is empty"),
        ({"latest": "\ufeffsnapshots/x.manifest.json".encode()}, "manifest '\\ufeffsnapshots/x"),
        ({"latest": b"snapshots/" + b"a" * 100_000}, "manifest 'snapshots/aaaa"),
        ({"data": {"path": "x.jsonl", "records": -1}}, "data.records -1 is not a number"),
        ({"partition_status": [1]}, "partition_status is not a list"),
        ({"data": None}, "data is not an object"),
        ({"data": {"path": "/dev/zero"}}, "data.path: '/dev/zero' is not a relative path"),
        ({"changes": {"path": 7}}, "changes.path: 7 is not a path"),
        ({"snapshot_id": 5}, "snapshot_id 5 is not a snapshot id"),
        ({"snapshot_id": "20261128T160000Z-0005"}, "named for snapshot 20261128T150000Z-0000 but"),
        (
            {"partition_status": [{"account_id": A, "region": "eu-west-1", "jobs": "eleven"}]},
            "partition_status is not a list",
        ),
        ({"stale_jobs": "x"}, "stale_jobs 'x' is not a number of jobs"),
    ],
    ids=[
        "nul",
        "absolute",
        "dotdot",
        "empty",
        "bom",
        "huge",
        "records",
        "status",
        "data",
        "data-path",
        "changes-path",
        "id",
        "renamed",
        "jobs",
        "stale-jobs",
    ],
)
async def test_a_damaged_latest_or_manifest_is_one_clear_error(
    tmp_path: Path, damage: dict[str, Any], problem: str
) -> None:
    """LATEST or a manifest edited or damaged by hand is an OutputError naming the problem
    (exit 2), for the next write as for reading; never a traceback, never a file outside the
    location read, never a snapshot published without knowing what to carry forward."""
    async with open_store(tmp_path) as store:
        first = await write(store, sid(0), {"A": "New"})
    if "latest" in damage:
        (tmp_path / "LATEST").write_bytes(damage["latest"])
    else:
        path = tmp_path / first.manifest_path
        path.write_bytes(orjson.dumps({**orjson.loads(path.read_bytes()), **damage}))
    async with open_store(tmp_path) as store:
        with pytest.raises(OutputError, match=re.escape(problem)) as info:
            await store.read_manifest("latest")
        assert len(str(info.value)) < 400 + len(str(tmp_path))
        with pytest.raises(OutputError, match=re.escape(problem)):
            await write(store, sid(1), {"A": "New"})
    assert snapshot_ids(tmp_path) == [sid(0)]


async def test_unreadable_previous_snapshot_skips_the_change_file(tmp_path: Path) -> None:
    """If the previous data file is gone, the snapshot is still written, with `changes: null`
    and a warning, rather than failing every cycle from then on."""
    async with LocalStore(tmp_path) as store:
        first = await write(store, sid(0), {"A": "New"})
    (tmp_path / first.data_path).unlink()
    async with LocalStore(tmp_path) as store:  # the next run: it must read the file back
        with capture_logs() as logs:
            written = await write(store, sid(1), {"A": "Complete"})
    manifest = orjson.loads((tmp_path / written.manifest_path).read_bytes())
    assert manifest["changes"] is None and written.changes_path is None
    assert not files_of(tmp_path, f"changes/*/{sid(1)}*") and not tmp_files(tmp_path)
    assert [e for e in logs if e["event"] == "changes.skipped"]


async def test_a_previous_snapshot_cut_short_skips_the_change_file(tmp_path: Path) -> None:
    """A previous data file with fewer records than its manifest says is read as damaged: the
    next snapshot has no change file (whose events would claim the missing jobs were added)
    and a warning naming the count; `diff` and `read_records` refuse it too."""
    async with LocalStore(tmp_path) as store:
        first = await write(store, sid(0), {"A": "New", "B": "New", "C": "New"})
    data = tmp_path / first.data_path
    data.write_bytes(b"".join(data.read_bytes().splitlines(keepends=True)[:2]))
    async with LocalStore(tmp_path) as store:
        manifest = await store.read_manifest(sid(0))
        with pytest.raises(OutputError, match="2 records, but its manifest says 3"):
            [r async for r in store.read_records(manifest)]
        with capture_logs() as logs:
            written = await write(store, sid(1), {"A": "New", "B": "New", "C": "New"})
        with pytest.raises(OutputError, match="2 records, but its manifest says 3"):
            [e async for e in store.diff(sid(0), sid(1))]
    assert written.changes_path is None
    skipped = [e for e in logs if e["event"] == "changes.skipped"]
    assert len(skipped) == 1 and "2 records, but its manifest says 3" in skipped[0]["error"]


async def test_a_snapshot_can_be_written_without_change_file(tmp_path: Path) -> None:
    """`changes=False` (a shard's snapshot) writes no change file and says so; the stored
    bytes of any file can be streamed back for checking its digest."""
    async with LocalStore(tmp_path) as store:
        written = await store.write(
            sid(0), records(sid(0), {"A": "New"}), {"partition_status": PARTITIONS}, changes=False
        )
        manifest = await store.latest_manifest()
        assert manifest is not None and manifest["changes"] is None
        stored = b"".join([chunk async for chunk in store.stream(written.data_path)])
    assert hashlib.sha256(stored).hexdigest() == written.sha256
    assert not files_of(tmp_path, "changes/*/*") and not tmp_files(tmp_path)


async def test_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    """A directory we cannot write gives OutputError naming it, before any work."""
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        store = LocalStore(blocker / "out")
    else:  # pragma: no cover - depends on who runs the tests
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        store = LocalStore(ro / "out")
    async with store:
        with pytest.raises(OutputError, match="cannot write"):
            await store.check_writable()


def test_snapshot_ids_sort_by_time() -> None:
    """Snapshot ids start with the UTC start time, so they sort chronologically."""
    a = new_snapshot_id(datetime(2026, 11, 28, 15, 0, 0, tzinfo=UTC))
    b = new_snapshot_id(datetime(2026, 11, 28, 15, 0, 1, tzinfo=UTC))
    assert a.startswith("20261128T150000Z-") and a < b
    assert snapshot.snapshot_date(a) == "2026-11-28"


async def test_a_store_is_entered_once(tmp_path: Path) -> None:
    """Like every resource here, a store has one owner: entering it twice is an error."""
    store = LocalStore(tmp_path)
    async with store:
        with pytest.raises(RuntimeError, match="already open"):
            await store.__aenter__()


async def test_unknown_snapshot_and_bad_ids_are_output_errors(tmp_path: Path) -> None:
    """`diff` with an id that is not there, or not an id, says so in one line."""
    async with LocalStore(tmp_path) as store:
        await write(store, sid(0), {"A": "New"})
        with pytest.raises(OutputError, match="no snapshot 20261128T160000Z-ffff"):
            await store.read_manifest("20261128T160000Z-ffff")
        with pytest.raises(OutputError, match="not a snapshot id"):
            await store.read_manifest("../../etc/passwd")
        assert (await store.read_manifest("LATEST"))["snapshot_id"] == sid(0)


# --- retention ---------------------------------------------------------------------------


async def test_retention_keeps_exactly_the_newest(tmp_path: Path) -> None:
    """After each write and prune, exactly `retain` snapshots remain, the newest ones, each
    with its manifest, data and change file; nothing else is left behind."""
    async with LocalStore(tmp_path) as store:
        for n in range(7):
            await write(store, sid(n), {"A": "New", f"J{n}": "New"})
            pruned = await store.prune(3)
            assert snapshot_ids(tmp_path) == [sid(i) for i in range(max(0, n - 2), n + 1)]
            assert pruned.kept == min(n + 1, 3)
    for n in range(4, 7):
        assert len(files_of(tmp_path, f"*/*/{sid(n)}*")) == 3  # data, manifest, changes
    assert not files_of(tmp_path, f"*/*/{sid(3)}*")
    assert len(files_of(tmp_path, "*/*/*.jsonl")) == 6


async def test_retention_after_a_crash_between_write_and_prune(tmp_path: Path) -> None:
    """Writes whose prune never ran (a crash right after LATEST) are caught up by the next
    prune, which keeps exactly the newest `retain`, LATEST's among them."""
    async with LocalStore(tmp_path) as store:
        for n in range(6):
            await write(store, sid(n), {"A": "New", f"J{n}": "New"})  # no prune: crashes
    async with LocalStore(tmp_path) as store:
        pruned = await store.prune(2)
    assert pruned.expired == tuple(sid(n) for n in range(4))
    assert snapshot_ids(tmp_path) == [sid(4), sid(5)]
    assert (tmp_path / "LATEST").read_text().strip().endswith(f"{sid(5)}.manifest.json")


async def test_retain_one_never_deletes_latest(tmp_path: Path) -> None:
    """With retain = 1 only LATEST's snapshot stays, even when a newer-looking id exists."""
    async with LocalStore(tmp_path) as store:
        await write(store, sid(1), {"A": "New"})
        latest = (tmp_path / "LATEST").read_bytes()
        await write(store, sid(2), {"A": "New"})
        # A write in progress elsewhere (or a clock step back): LATEST names the older one.
        (tmp_path / "LATEST").write_bytes(latest)
        await write(store, sid(0), {"A": "New"})
        (tmp_path / "LATEST").write_bytes(latest)
        pruned = await store.prune(1)
    assert sid(1) in snapshot_ids(tmp_path), "LATEST's snapshot is never deleted"
    assert sid(2) in snapshot_ids(tmp_path), "nothing newer than LATEST is touched"
    assert pruned.expired == (sid(0),)


async def test_unpublished_snapshot_is_removed_and_the_chain_holds(tmp_path: Path) -> None:
    """A snapshot whose manifest landed but LATEST never named (crash just before LATEST)
    is not published: the next cycle compares with LATEST's snapshot and prune removes it,
    so change files never overlap."""
    async with LocalStore(tmp_path, debris_age=0) as store:
        await write(store, sid(0), {"A": "New"})
        published = (tmp_path / "LATEST").read_bytes()
        await write(store, sid(1), {"A": "Complete"})
        (tmp_path / "LATEST").write_bytes(published)  # the crash: LATEST never moved
        written = await write(store, sid(2), {"A": "Complete"})
        pruned = await store.prune(10)
    assert pruned.orphaned == (sid(1),)
    assert snapshot_ids(tmp_path) == [sid(0), sid(2)]
    assert not files_of(tmp_path, f"*/*/{sid(1)}*")
    manifest = orjson.loads((tmp_path / written.manifest_path).read_bytes())
    assert manifest["previous_snapshot_id"] == sid(0)
    events = (tmp_path / manifest["changes"]["path"]).read_bytes().splitlines()
    assert [orjson.loads(e)["event"] for e in events] == ["state_changed"]


async def test_snapshots_started_in_the_same_second_are_kept_in_publication_order(
    tmp_path: Path,
) -> None:
    """Ids of runs in the same second sort by their random suffix; retention follows the
    chain of previous_snapshot_id instead, so it never drops a newer one."""
    ids = ["20261128T150000Z-ffff", "20261128T150000Z-0000", "20261128T150000Z-8888"]
    async with LocalStore(tmp_path) as store:
        for snapshot_id in ids:
            await write(store, snapshot_id, {"A": "New"})
        pruned = await store.prune(2)
    assert pruned.expired == (ids[0],) and not pruned.orphaned
    assert snapshot_ids(tmp_path) == sorted(ids[1:])


async def test_a_long_chain_out_of_id_order_is_kept_whole(tmp_path: Path) -> None:
    """Ids stop sorting in publication order (21 runs in one second; or the clock stepped
    back an hour after 5 runs): the walk back from LATEST goes on past its usual depth until
    every old manifest among the chain's ids is found on it, so retention keeps all of them,
    where it pruned those it had not walked to as never published."""
    same_second = [f"20261128T150000Z-{random.Random(n).getrandbits(16):04x}" for n in range(21)]
    stepped_back = [sid(n) for n in range(60, 65)] + [sid(n) for n in range(1, 90, 5) if n != 61]
    for name, ids in (("same-second", same_second), ("stepped-back", stepped_back)):
        root = tmp_path / name
        async with LocalStore(root, debris_age=0) as store:
            for snapshot_id in ids:
                await write(store, snapshot_id, {"A": "New"})
            pruned = await store.prune(96)
        assert pruned.orphaned == () and pruned.expired == (), name
        assert snapshot_ids(root) == sorted(ids), name


async def test_prune_without_latest_does_nothing(tmp_path: Path) -> None:
    """With no LATEST nothing is known to be published, so nothing is deleted."""
    async with LocalStore(tmp_path) as store:
        await write(store, sid(0), {"A": "New"})
        await write(store, sid(1), {"A": "New"})
        (tmp_path / "LATEST").unlink()
        assert await store.prune(1) == snapshot.Pruned()
        with pytest.raises(ValueError, match="retain"):
            await store.prune(0)
    assert snapshot_ids(tmp_path) == [sid(0), sid(1)]


async def test_orphaned_temporary_files_of_old_runs_are_removed(tmp_path: Path) -> None:
    """Temporary files a killed process left behind (older than LATEST's) are removed."""
    async with LocalStore(tmp_path, debris_age=0) as store:
        await write(store, sid(1), {"A": "New"})
        folder = tmp_path / "snapshots" / "date=2026-11-28"
        leftover = folder / f".{sid(0)}.jsonl.4242.deadbeef.tmp"
        leftover.write_bytes(b"partial")
        newer = folder / f".{sid(2)}.jsonl.4242.deadbeef.tmp"
        newer.write_bytes(b"in progress elsewhere")
        pruned = await store.prune(5)
    assert pruned.incomplete == (sid(0),)
    assert not leftover.exists() and newer.exists()


async def test_of_two_writers_from_one_snapshot_only_the_first_to_finish_publishes(
    tmp_path: Path,
) -> None:
    """Two writers compare with the same previous snapshot (a manual run while the daemon
    writes). Whichever finishes second, in either start order, finds LATEST moved: its
    snapshot is complete but not published (a transient OutputError says so), LATEST stays
    at the first, and the change files stay one chain: the loser's is withdrawn at once (its
    events overlap the winner's), and prune later removes the rest of it."""
    manifest = {"status": "complete", "partition_status": PARTITIONS}
    for first, second in ((3, 2), (2, 3)):
        root = tmp_path / f"{first}-{second}"
        async with LocalStore(root, debris_age=0) as a, LocalStore(root, debris_age=0) as b:
            await write(a, sid(1), {"A": "New"})
            base = await a.latest_manifest()
            await b.write(sid(first), records(sid(first), {"A": "Done"}), manifest, previous=base)
            with pytest.raises(OutputError, match="not published") as lost:
                await a.write(
                    sid(second), records(sid(second), {"A": "New"}), manifest, previous=base
                )
            assert lost.value.transient
            latest = await a.latest_manifest()
            assert latest is not None and latest["snapshot_id"] == sid(first)
            assert latest["previous_snapshot_id"] == sid(1)
            assert sorted(p.name for p in files_of(root, "changes/*/*.jsonl")) == [
                f"{sid(1)}.jsonl",
                f"{sid(first)}.jsonl",
            ]
            assert files_of(root, f"snapshots/*/{sid(second)}.manifest.json")  # for prune
            pruned = await b.prune(5)
        if second < first:  # off the chain, between published ones: removed
            assert pruned.orphaned == (sid(second),)
            assert snapshot_ids(root) == [sid(1), sid(first)]
        else:  # newer than LATEST: left until a later snapshot passes it
            assert pruned.orphaned == ()
            assert snapshot_ids(root) == [sid(1), sid(first), sid(second)]


async def test_concurrent_writers_race_for_latest_and_exactly_one_wins(tmp_path: Path) -> None:
    """Two writes from the same previous snapshot finishing at the same moment: LATEST is
    read, checked and replaced under a lock, so exactly one publishes and the other fails
    (transient); LATEST names the winner, whose previous is the base."""
    manifest = {"status": "complete", "partition_status": PARTITIONS}
    async with LocalStore(tmp_path) as a, LocalStore(tmp_path) as b:
        await write(a, sid(1), {"A": "New"})
        base = await a.latest_manifest()
        outcomes = await asyncio.gather(
            a.write(sid(2), records(sid(2), {"A": "Done"}), manifest, previous=base),
            b.write(sid(3), records(sid(3), {"A": "Done"}), manifest, previous=base),
            return_exceptions=True,
        )
        latest = await a.latest_manifest()
    won = [o for o in outcomes if isinstance(o, snapshot.WrittenSnapshot)]
    lost = [o for o in outcomes if isinstance(o, OutputError)]
    assert len(won) == 1 and len(lost) == 1 and lost[0].transient
    assert latest is not None and latest["snapshot_id"] == won[0].snapshot_id
    assert latest["previous_snapshot_id"] == sid(1)


async def test_latest_spelled_otherwise_still_moves_on(tmp_path: Path) -> None:
    """LATEST holding the manifest's path spelled another way (`./snapshots/...`, as a person
    might write it) still names that snapshot: the next write is published."""
    async with LocalStore(tmp_path) as store:
        await write(store, sid(1), {"A": "New"})
        latest = tmp_path / "LATEST"
        latest.write_text("./" + latest.read_text())
        await write(store, sid(2), {"A": "Done"})
        assert (await store.latest_manifest() or {})["snapshot_id"] == sid(2)


async def test_files_another_writer_may_still_be_producing_survive_prune(tmp_path: Path) -> None:
    """A snapshot whose manifest landed but whose writer has not moved LATEST yet, and a data
    file still without manifest, look like crash debris; while they are younger than
    `debris_age` prune leaves them (a writer elsewhere may be about to publish), and once they
    are older it removes them."""
    later = [time.time()]
    async with LocalStore(tmp_path, clock=lambda: later[0]) as store:
        await write(store, sid(1), {"A": "New"})
        base = await store.latest_manifest()
        manifest = {"status": "complete", "partition_status": PARTITIONS}
        real_put = store._put

        async def no_latest(rel: str, *args: Any, **kwargs: Any) -> Any:
            if rel == "LATEST":
                raise OutputError("paused before LATEST (simulated)")
            return await real_put(rel, *args, **kwargs)

        store._put = no_latest  # type: ignore[method-assign]
        with pytest.raises(OutputError):  # (shared_id: left in place, as by a writer elsewhere)
            await store.write(
                sid(2), records(sid(2), {"A": "Done"}), manifest, previous=base, shared_id=True
            )
        store._put = real_put  # type: ignore[method-assign]
        folder = tmp_path / "snapshots" / "date=2026-11-28"
        (folder / f"{sid(3)}.jsonl").write_bytes(b"written, manifest to come\n")
        await write(store, sid(4), {"A": "Done"})
        assert await store.prune(5) == snapshot.Pruned(kept=2)
        assert snapshot_ids(tmp_path) == [sid(1), sid(2), sid(4)]
        later[0] += 3601
        pruned = await store.prune(5)
    assert (pruned.orphaned, pruned.incomplete) == ((sid(2),), (sid(3),))
    assert snapshot_ids(tmp_path) == [sid(1), sid(4)]


async def test_prune_removes_the_shard_folders_of_runs_that_can_no_longer_be_merged(
    tmp_path: Path,
) -> None:
    """A sharded run's folder (`shards/run=<id>/`) goes once everything in it is older, by
    `debris_age`, than the start of the oldest snapshot kept (its merge, if any, was pruned,
    and `merge` would refuse it now): files, links (not what they point to) and folders, also
    a run with no file left (a prune killed halfway). The folders of the runs kept, of a run
    within the margin, of a run in progress (one young file), and anything else under
    `shards/` stay."""
    async with LocalStore(tmp_path) as store:
        for n in range(4):
            await write(store, sid(n), {"A": "New", f"J{n}": "New"})
        oldest_kept = datetime(2026, 11, 28, 15, 2, tzinfo=UTC).timestamp()  # sid(2), retain 2
        shard = "shard=0-of-2/snapshots/date=2026-11-28"
        target = tmp_path / "elsewhere"
        (target / "folder").mkdir(parents=True)
        runs = {
            "gone": [(f"{shard}/{sid(0)}.jsonl", -3601), ("shard=0-of-2/LATEST", -3601)],
            "also-gone": [("shard=1-of-2/LATEST", -7200), ("shard=1-of-2/link", -7200)],
            "folders-only": [("shard=0-of-2/snapshots/date=2026-11-28/", -7200)],
            "within-margin": [("shard=0-of-2/LATEST", -3599)],
            "kept-run": [(f"{shard}/{sid(2)}.jsonl", 5)],
            "in-progress": [("shard=0-of-2/LATEST", -7200), ("shard=1-of-2/LATEST", None)],
        }
        for run, files in runs.items():
            top = tmp_path / "shards" / f"run={run}"
            for rel, _ in files:
                path = top / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                if rel.endswith("/"):
                    path.mkdir(exist_ok=True)
                elif rel.endswith("link"):
                    path.symlink_to(target / "folder", target_is_directory=True)
                else:
                    path.write_bytes(b"x\n")
            ages = [age for _, age in files if age is not None]
            for path in [*sorted(top.rglob("*"), reverse=True), top]:  # files, then folders
                age = max(ages) if path.is_dir() and not path.is_symlink() else None
                rel = path.relative_to(top).as_posix()
                age = next((a for r, a in files if r.rstrip("/") == rel), age)
                if age is not None:
                    t = oldest_kept + age
                    os.utime(path, (t, t), follow_symlinks=False)
        other = tmp_path / "shards" / "notes.txt"
        other.write_bytes(b"not a run\n")
        os.utime(other, (0, 0))
        pruned = await store.prune(2)
    assert pruned.expired == (sid(0), sid(1))
    assert pruned.shard_runs == ("also-gone", "folders-only", "gone")
    left = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert left == ["notes.txt", "run=in-progress", "run=kept-run", "run=within-margin"]
    assert (tmp_path / "shards" / "run=in-progress" / "shard=0-of-2" / "LATEST").exists()
    assert (target / "folder").is_dir()


async def test_a_shard_run_that_cannot_be_deleted_is_a_warning(tmp_path: Path) -> None:
    """Deleting shard runs is best effort: one that cannot go (written by another user) is a
    warning naming it; the other runs, the snapshots and the rest of the prune still go, and
    the prune returns what it did."""
    old = datetime(2026, 11, 28, 12, 0, tzinfo=UTC).timestamp()
    for run in ("a-stuck", "b-old"):
        path = tmp_path / "shards" / f"run={run}" / "shard=0-of-1" / "LATEST"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x\n")
        for p in (path, path.parent, path.parent.parent):
            os.utime(p, (old, old))
    async with LocalStore(tmp_path) as store:
        for n in range(3):
            await write(store, sid(n), {"A": "New"})
        killed = tmp_path / ".LATEST.4242.deadbeef.tmp"
        killed.write_bytes(b"x\n")
        os.utime(killed, (old, old))
        real = store._delete_shard_run

        async def stuck(run_id: str, rels: Any) -> None:
            if run_id == "a-stuck":
                raise OutputError(f"{tmp_path}: cannot delete old snapshots: Permission denied")
            await real(run_id, rels)

        store._delete_shard_run = stuck  # type: ignore[method-assign]
        with capture_logs() as logs:
            pruned = await store.prune(1)
    assert (pruned.expired, pruned.shard_runs) == ((sid(0), sid(1)), ("b-old",))
    failed = [e for e in logs if e["event"] == "snapshot.shard_prune_failed"]
    assert [(e["log_level"], e["run_id"]) for e in failed] == [("warning", "a-stuck")]
    assert not killed.exists() and (tmp_path / "shards" / "run=a-stuck").exists()


async def test_a_latest_lock_held_too_long_elsewhere_is_a_transient_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another process holds `.LATEST.lock` past the wait, the write fails with a
    transient OutputError naming the lock, LATEST still names the previous snapshot, and the
    next write, once the lock is free, publishes."""
    import fcntl

    monkeypatch.setattr(snapshot, "_LOCK_WAIT", 0.05)
    async with LocalStore(tmp_path) as store:
        await write(store, sid(1), {"A": "New"})
        other = os.open(tmp_path / ".LATEST.lock", os.O_RDONLY)  # its own open file: a rival
        try:
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(
                OutputError, match=r"another process has held \.LATEST\.lock"
            ) as info:
                await write(store, sid(2), {"A": "Done"})
            assert info.value.transient
            assert (await store.latest_manifest() or {})["snapshot_id"] == sid(1)
        finally:
            os.close(other)
        await write(store, sid(3), {"A": "Done"})
        assert (await store.latest_manifest() or {})["snapshot_id"] == sid(3)


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EIO])
async def test_a_filesystem_without_locks_still_publishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """Where the filesystem has no locks (NFS without lockd: ENOLCK, EOPNOTSUPP, EINVAL),
    LATEST is replaced unlocked with a warning; any other failure to lock is an OutputError
    naming the directory, and LATEST stays."""

    class NoLocks:
        LOCK_EX, LOCK_NB = 2, 4

        @staticmethod
        def flock(fd: int, operation: int) -> None:
            raise OSError(code, os.strerror(code))

    async with LocalStore(tmp_path) as store:
        await write(store, sid(1), {"A": "New"})
        monkeypatch.setattr(snapshot, "fcntl", NoLocks)
        with capture_logs() as logs:
            if code == errno.ENOLCK:
                await write(store, sid(2), {"A": "Done"})
            else:
                with pytest.raises(OutputError, match=r": cannot lock LATEST: Input/output error"):
                    await write(store, sid(2), {"A": "Done"})
        published = (await store.latest_manifest() or {})["snapshot_id"]
    if code == errno.ENOLCK:
        assert published == sid(2)
        assert [e["reason"] for e in logs if e["event"] == "snapshot.latest_unlocked"] == [
            os.strerror(code)
        ]
    else:
        assert published == sid(1)


async def test_a_latest_temporary_left_by_a_kill_is_removed(tmp_path: Path) -> None:
    """A `.LATEST...tmp` left by a process killed while replacing LATEST is removed once it
    is older than LATEST by more than a minute; a younger one (a replacement that may still
    be in progress) and anything else in the directory stay."""
    async with LocalStore(tmp_path) as store:
        await write(store, sid(1), {"A": "New"})
        latest = (tmp_path / "LATEST").stat().st_mtime
        killed = tmp_path / ".LATEST.4242.deadbeef.tmp"
        recent = tmp_path / ".LATEST.4243.cafef00d.tmp"
        other = tmp_path / ".LATEST.notes"
        for path, age in ((killed, 61.0), (recent, 59.0), (other, 3600.0)):
            path.write_bytes(b"snapshots/date=2026-11-28/x.manifest.json\n")
            os.utime(path, (latest - age, latest - age))
        await store.prune(5)
    assert not killed.exists()
    assert recent.exists() and other.exists()
    assert (tmp_path / "LATEST").exists()


async def test_the_service_keeps_output_retain_snapshots(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """End to end: cycles with `output.retain = 2` leave exactly the two newest snapshots,
    LATEST's the newest."""
    sb = await make_sandbox(accounts=2, seed=3, max_jobs=3, regions=("eu-west-1",))
    settings = make_settings(
        sb.account_ids,
        regions={"names": ["eu-west-1"]},
        output={"directory": str(tmp_path), "retain": 2},
    )
    ids = [(await run_once(settings)).snapshot_id for _ in range(4)]
    assert snapshot_ids(tmp_path) == sorted(ids[2:])
    assert (tmp_path / "LATEST").read_text().strip().endswith(f"{ids[3]}.manifest.json")
    assert len(files_of(tmp_path, "changes/*/*.jsonl")) == 2


async def test_a_run_that_does_not_fit_prunes_what_a_killed_run_left(
    make_sandbox: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk full of what a killed run left (a data file nothing names, over an hour old):
    the run that does not fit prunes it anyway (prune followed only a write that succeeded,
    so every later run failed the same way, for good), and still fails, LATEST unchanged."""
    sb = await make_sandbox(accounts=2, seed=3, max_jobs=3, regions=("eu-west-1",))
    settings = make_settings(
        sb.account_ids, regions={"names": ["eu-west-1"]}, output={"directory": str(tmp_path)}
    )
    first = await run_once(settings)
    latest = (tmp_path / "LATEST").read_bytes()
    debris = tmp_path / "snapshots" / "date=2026-11-28" / f"{sid(9)}.jsonl"
    debris.parent.mkdir(parents=True, exist_ok=True)
    debris.write_bytes(b"x" * 1000)
    os.utime(debris, (time.time() - 7200, time.time() - 7200))
    real_put = LocalStore._put

    async def no_space(self: LocalStore, rel: str, *args: Any, **kwargs: Any) -> Any:
        if rel.endswith(".manifest.json"):
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as exc:
                raise OutputError(f"{self.location}: cannot write: {exc.strerror}") from exc
        return await real_put(self, rel, *args, **kwargs)

    monkeypatch.setattr(LocalStore, "_put", no_space)
    with pytest.raises(OutputError, match="No space left"):
        await run_once(settings)
    assert not debris.exists()
    assert (tmp_path / "LATEST").read_bytes() == latest
    assert snapshot_ids(tmp_path) == [first.snapshot_id]


async def test_a_store_remembers_its_last_snapshot_for_the_next_comparison(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing again with the same store compares against what it remembers of its last
    snapshot instead of reading the data file back, with byte-identical change files."""
    states = [
        {f"J{i:04d}": "New" for i in range(3000)},
        {**{f"J{i:04d}": "New" for i in range(1, 3000)}, "J0007": "Done", "K": "New"},
        {f"J{i:04d}": "Done" for i in range(0, 3000, 2)},
    ]

    def unreachable(manifest: Any) -> Any:
        raise AssertionError("the previous snapshot was read back")

    fresh = []
    for n, jobs in enumerate(states):  # a new store each time: it reads the previous file
        async with LocalStore(tmp_path / "fresh") as store:
            written = await write(store, sid(n), jobs)
        fresh.append((tmp_path / "fresh" / str(written.changes_path)).read_bytes())
    kept = []
    async with LocalStore(tmp_path / "kept", remember=True) as store:
        for n, jobs in enumerate(states):
            written = await write(store, sid(n), jobs)
            monkeypatch.setattr(store, "_previous_lines", unreachable)
            kept.append((tmp_path / "kept" / str(written.changes_path)).read_bytes())
    assert kept == fresh
    assert [len(body.splitlines()) for body in kept] == [3000, 3, 3001]


@pytest.mark.parametrize("compress", ["none", "gzip"])
async def test_the_change_file_equals_diff_of_the_two_snapshots(
    tmp_path: Path, compress: str
) -> None:
    """The change file, computed while the data file is written by comparing the previous
    file's lines as bytes, is byte for byte what decoding both stored snapshots and `diff`
    give: over several batches, with added, removed, changed, stale and recovered jobs, and
    fields that change without an event."""
    n = 3 * snapshot._RECORD_BATCH + 17
    before = [
        record(f"J{i:05d}", sid(0), stale=i % 211 == 3, description=f"d{i % 7}") for i in range(n)
    ]
    after = [
        r._replace(
            snapshot_id=sid(1),
            observed_at="2026-11-28T15:01:03Z",
            last_seen=r.last_seen if i % 97 == 5 else "2026-11-28T15:01:03Z",
            stale=i % 97 == 5,
            job_state="Done" if i % 53 == 0 else r.job_state,
            description="other" if i % 61 == 0 else r.description,
            regions=("eu-west-1", "us-east-1") if i % 71 == 0 else r.regions,
        )
        for i, r in enumerate(before)
        if i % 89 != 1
    ]
    after += [record(f"J{i:05d}x", sid(1)) for i in range(0, n, 101)]
    after.sort(key=lambda r: r.job_id)
    manifest = {"status": "complete", "partition_status": PARTITIONS}
    async with open_store(tmp_path, compress=compress) as store:
        await store.write(sid(0), before, manifest)
    async with open_store(tmp_path, compress=compress) as store:  # reads sid(0) back
        written = await store.write(sid(1), after, manifest, previous=await store.latest_manifest())
        expected = b"".join([encode_events(batch) async for batch in store.diff(sid(0), sid(1))])
    body = (tmp_path / str(written.changes_path)).read_bytes()
    assert (gzip.decompress(body) if compress == "gzip" else body) == expected
    kinds = {orjson.loads(line)["event"] for line in expected.splitlines()}
    assert kinds == {"job_added", "job_removed", "state_changed", "job_went_stale", "job_recovered"}
