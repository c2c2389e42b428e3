"""Snapshot: the layout of an output location, and the stores that write and read it.

Layout, under a directory or an S3 prefix (`s3://bucket/prefix`):
```
snapshots/date=YYYY-MM-DD/<snapshot_id>.jsonl[.gz]       records, sorted by (account_id, job_id)
snapshots/date=YYYY-MM-DD/<snapshot_id>.manifest.json    run metadata, digests of the files
changes/date=YYYY-MM-DD/<snapshot_id>.jsonl[.gz]         change events since the previous snapshot
LATEST                                                   path of the newest manifest
```
`Store.write` lands the data file, then the manifest, then the change file, then LATEST, each
atomically: a local file is written to a hidden temporary name in its final folder, fsynced,
renamed and the folder fsynced; an S3 object (single PUT or multipart upload) appears whole or
not at all. The change file is computed and staged before the manifest, so the manifest carries
its digest, and is made visible right after it. Both are written in one pass over the records:
each batch is encoded into the data file, then compared with the previous snapshot's lines. A
reader, or a crash, at any moment sees the previous snapshot complete or the new one complete,
never a torn file under a final name.

`Store.prune(retain)`, called once a snapshot is complete, keeps the newest `retain` published
snapshots (data, manifest and change file together) and never the one LATEST points to. It also
removes what crashed runs left: files of a snapshot that has no manifest (older than LATEST's),
and snapshots whose manifest landed but that LATEST never published (found by following
`previous_snapshot_id` back from LATEST), so the change files always form one chain.

Compression (`compress="gzip"`) applies to data and change files (`.jsonl.gz`); readers decide
by the path the manifest names, so a location may mix both. `LocalStore` is a directory,
`S3Store` (`s3.py`) a bucket prefix; `open_store(location)` picks one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import hashlib
import importlib.resources
import math
import os
import re
import secrets
import sys
import tempfile
import time
import zlib
from abc import ABC, abstractmethod

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows: LATEST is then not locked
    fcntl = None  # type: ignore[assignment]
from collections import defaultdict, deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal, TypeVar

import orjson
import structlog

from .changes import (
    EVENT_TYPES,
    FRAME_END,
    Batch,
    ChangeEvent,
    NewBatch,
    UnreadableLine,
    UnsortedError,
    batch_of_dicts,
    diff,
    diff_lines,
    encode_events,
    frame_lines,
    lines_of,
)
from .errors import OutputError
from .records import SCHEMA_VERSION, JobRecord

T = TypeVar("T")

__all__ = [
    "Compression",
    "LocalStore",
    "NotPublishedError",
    "Pruned",
    "Store",
    "WrittenSnapshot",
    "changes_path",
    "data_path",
    "diff_command",
    "latest_snapshot_id",
    "load_schema",
    "manifest_path",
    "new_snapshot_id",
    "open_store",
    "snapshot_date",
]

log = structlog.get_logger()

Compression = Literal["none", "gzip"]
LATEST = "LATEST"
_OPTS = orjson.OPT_SORT_KEYS
# Records encoded per batch: the batch's lines (~400 bytes a record) stay in the CPU cache
# while they are hashed, written and compared.
_RECORD_BATCH = 2048
READ_CHUNK = 1 << 20
_CHAIN_DEPTH = 16
# A snapshot's files, final or temporary (`.<final name>.<pid>.<random>.tmp`).
ARTIFACT_RE = re.compile(
    r"(?:snapshots|changes)/date=\d{4}-\d{2}-\d{2}/(?P<tmp>\.)?"
    r"(?P<id>\d{8}T\d{6}Z-[0-9a-f]+)\.(?P<kind>manifest\.json|jsonl\.gz|jsonl)(?(tmp)\..+\.tmp)"
)
_SNAPSHOT_ID = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]+")
_SHARD_RUN_RE = re.compile(r"shards/run=(?P<run>[^/]+)/")
_LATEST_ID = re.compile(r"(\d{8}T\d{6}Z-[0-9a-f]+)\.manifest\.json$")


def latest_snapshot_id(text: str | None) -> str | None:
    """The snapshot id in what LATEST holds (a manifest's path, however it is spelled), the
    text itself if it names no manifest, None without LATEST."""
    if text is None:
        return None
    found = _LATEST_ID.search(text)
    return found[1] if found is not None else text


def new_snapshot_id(now: datetime | None = None) -> str:
    """`20261128T150000Z-3f9c`: the start time (UTC) and 4 random hex digits."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def _id_time(snapshot_id: str) -> float:
    """The start time of `snapshot_id` (its `YYYYMMDDTHHMMSSZ` part), in epoch seconds; minus
    infinity (before anything) for an id no writer makes (`20261128T146000Z`, by hand)."""
    try:
        started = datetime.strptime(snapshot_id[:16], "%Y%m%dT%H%M%SZ")
    except ValueError:
        return -math.inf
    return started.replace(tzinfo=UTC).timestamp()


def snapshot_date(snapshot_id: str) -> str:
    """The `date=` partition of a snapshot: its start date, `YYYY-MM-DD` (UTC)."""
    return f"{snapshot_id[0:4]}-{snapshot_id[4:6]}-{snapshot_id[6:8]}"


async def to_the_end(aw: Awaitable[T]) -> T:
    """`await aw` to its end even if the awaiting task is cancelled meanwhile; the cancellation
    is then absorbed, and the task goes on as if it had come after.

    For what follows the moment LATEST starts to move: the run has made its snapshot, so a
    SIGTERM or a shutdown deadline must not report it as cancelled, nor cut the replacement of
    LATEST (or the prune after it) short.
    """
    future = asyncio.ensure_future(aw)
    task = asyncio.current_task()
    absorbed = 0
    try:
        while True:
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                if future.cancelled() or task is None:
                    raise
                absorbed += 1
    finally:
        if task is not None:
            for _ in range(absorbed):
                task.uncancel()


def _quoted(value: object) -> str:
    """`repr(value)` (an invisible byte order mark shows), cut to 200 characters."""
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _path_problem(rel: object) -> str | None:
    """Why `rel` is not a path inside the location, as this tool writes them (None if it is)."""
    if not isinstance(rel, str) or not rel:
        return f"{_quoted(rel)} is not a path"
    if any(ord(c) < 32 for c in rel) or rel.startswith(("/", "\\")):
        return f"{_quoted(rel)} is not a relative path"
    if ".." in rel.replace("\\", "/").split("/"):
        return f"{_quoted(rel)} leaves the location"
    return None


def _manifest_problem(manifest: Mapping[str, Any]) -> str | None:
    """Why `manifest` is not one this tool can read (None if it can): the fields that reading,
    comparing and carrying forward use, with their types."""
    snapshot_id = manifest.get("snapshot_id")
    if not isinstance(snapshot_id, str) or not _SNAPSHOT_ID.fullmatch(snapshot_id):
        return f"snapshot_id {snapshot_id!r} is not a snapshot id"
    previous = manifest.get("previous_snapshot_id")
    if previous is not None and not isinstance(previous, str):
        return f"previous_snapshot_id {previous!r} is not a snapshot id"
    for part in ("data", "changes"):
        entry = manifest.get(part)
        if entry is None and part == "changes":
            continue
        if not isinstance(entry, Mapping):
            return f"{part} is not an object"
        problem = _path_problem(entry.get("path"))
        if problem is not None:
            return f"{part}.path: {problem}"
        if part == "data" and not _count(entry.get("records")):
            return f"data.records {entry.get('records')!r} is not a number of records"
    statuses = manifest.get("partition_status", [])
    if not isinstance(statuses, list) or not all(
        isinstance(p, Mapping)
        and isinstance(p.get("account_id"), str)
        and isinstance(p.get("region"), str)
        and _count(p.get("jobs"))
        for p in statuses
    ):
        return "partition_status is not a list of {account_id, region, status, jobs} objects"
    if not _count(manifest.get("stale_jobs")):
        return f"stale_jobs {manifest.get('stale_jobs')!r} is not a number of jobs"
    return None


def _count(value: object) -> bool:
    """Whether `value` is a count as manifests hold them (absent, or a whole number)."""
    return value is None or (type(value) is int and value >= 0)


def data_path(snapshot_id: str, gz: bool = False) -> str:
    """Where a snapshot's records go, relative to the location."""
    return f"snapshots/date={snapshot_date(snapshot_id)}/{snapshot_id}.jsonl" + (".gz" * gz)


def manifest_path(snapshot_id: str) -> str:
    """Where a snapshot's manifest goes, relative to the location."""
    return f"snapshots/date={snapshot_date(snapshot_id)}/{snapshot_id}.manifest.json"


def changes_path(snapshot_id: str, gz: bool = False) -> str:
    """Where a snapshot's change events go, relative to the location."""
    return f"changes/date={snapshot_date(snapshot_id)}/{snapshot_id}.jsonl" + (".gz" * gz)


def load_schema(name: str) -> dict[str, Any]:
    """A published JSON Schema shipped in the package: `record`, `manifest` or `change`."""
    if name not in ("record", "manifest", "change"):
        raise ValueError(f"no schema named {name!r} (record, manifest, change)")
    resource = importlib.resources.files("aggregator") / "schemas" / f"{name}.schema.json"
    schema: dict[str, Any] = orjson.loads(resource.read_bytes())
    return schema


@dataclass(frozen=True, slots=True)
class WrittenSnapshot:
    """Where a snapshot landed (paths relative to the location), its data digest and size,
    and the number of change events (`changes_path`/`events` are None when the previous
    snapshot could not be read and no change file was written)."""

    snapshot_id: str
    data_path: str
    manifest_path: str
    sha256: str
    bytes: int
    records: int
    changes_path: str | None = None
    events: int | None = None


@dataclass(frozen=True, slots=True)
class Pruned:
    """What `Store.prune` deleted, by snapshot id: `expired` (beyond `retain`), `orphaned`
    (manifest written but never published by LATEST) and `incomplete` (no manifest); and by
    run id, the sharded runs whose shard snapshots went (`shard_runs`)."""

    expired: tuple[str, ...] = ()
    orphaned: tuple[str, ...] = ()
    incomplete: tuple[str, ...] = ()
    kept: int = 0
    shard_runs: tuple[str, ...] = ()  # run ids whose folder under `shards/` went


_Buffer = bytes | memoryview


class Sink(ABC):
    """One object being written (what a `Store` backend provides): bytes in order; `seal`
    makes them durable, `publish` visible under the final name; `abort` leaves nothing.

    A sink whose writes block briefly and release the GIL (a local file) sets `threaded` and
    implements `write_blocking`, which the writer thread calls instead of `write`.
    """

    threaded = False

    def write_blocking(self, data: _Buffer) -> None:
        raise NotImplementedError

    @abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abstractmethod
    async def seal(self) -> None: ...

    @abstractmethod
    async def publish(self) -> None: ...

    @abstractmethod
    async def abort(self) -> None: ...


def _inflate(unzip: Any, data: bytes) -> tuple[Any, bytes]:
    """`data` inflated by the gzip decompressor `unzip`, and the decompressor for what follows.

    A gzip file may hold several members one after the other (`cat a.gz b.gz`, pigz, bgzip),
    and zero bytes may pad it; `gzip.decompress` reads them all, so a snapshot does too: a new
    decompressor takes over at each further member (one would stop at the first, silently).
    """
    out = unzip.decompress(data)
    while unzip.eof:
        tail = unzip.unused_data.lstrip(b"\0")
        if not tail:
            break
        unzip = zlib.decompressobj(31)
        out += unzip.decompress(tail)
    return unzip, out


class _Digest:
    """Size and (with `sha`) sha256 of a file as it is read, hashed in a thread of its own
    (hashlib releases the GIL), so that reading and decoding go on meanwhile; at most a few
    chunks wait for it. A context manager: leaving it drops what is still queued."""

    def __init__(self, *, sha: bool) -> None:
        self._sha = hashlib.sha256() if sha else None
        self.size = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[asyncio.Future[None]] = deque()

    async def update(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self._sha is None:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="snapshot-digest")
        self._pending.append(asyncio.wrap_future(self._pool.submit(self._sha.update, chunk)))
        while len(self._pending) > 8:
            await self._pending.popleft()

    async def result(self) -> tuple[str | None, int]:
        """(sha256 hex or None, bytes) of everything given to `update`."""
        while self._pending:
            await self._pending.popleft()
        return None if self._sha is None else self._sha.hexdigest(), self.size

    def __enter__(self) -> _Digest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class _Writer:
    """Feeds chunks through gzip (optional) and sha256 into a sink.

    Compression, hashing and (for a threaded sink) the write itself run in one worker thread,
    in order; all of them release the GIL, so they overlap with the encoding of the next chunk
    on the event loop. At most two chunks wait for the thread.
    """

    def __init__(self, sink: Sink, *, gzip: bool, level: int = 6) -> None:
        self._sink = sink
        self._zip = zlib.compressobj(level, zlib.DEFLATED, 31) if gzip else None
        self._sha = hashlib.sha256()
        self.size = 0
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="snapshot-writer")
        self._pending: deque[asyncio.Future[bytes]] = deque()

    def _digest(self, parts: tuple[_Buffer, ...]) -> bytes:
        out: list[_Buffer] = []
        for part in parts:
            chunk = self._zip.compress(part) if self._zip is not None else part
            self._sha.update(chunk)
            self.size += len(chunk)
            if self._sink.threaded:
                self._sink.write_blocking(chunk)
            else:
                out.append(chunk)
        return b"".join(out)

    def _flush(self) -> bytes:
        if self._zip is None:
            return b""
        zip_, self._zip = self._zip, None
        return self._digest((zip_.flush(),))

    def _submit(self, fn: Callable[..., bytes], *args: Any) -> None:
        self._pending.append(asyncio.wrap_future(self._pool.submit(fn, *args)))

    async def _drain(self, keep: int) -> None:
        while len(self._pending) > keep or (self._pending and self._pending[0].done()):
            out = await self._pending.popleft()
            if out:
                await self._sink.write(out)

    async def write(self, *parts: _Buffer) -> None:
        """Append `parts` (bytes or buffers, such as memoryviews of a larger object)."""
        self._submit(self._digest, parts)
        await self._drain(keep=2)
        await asyncio.sleep(0)  # encoding runs on the loop: let other tasks in between chunks

    async def write_framed(self, framed: bytes) -> None:
        """Append the lines of `_frame_records`."""
        await self.write(frame_lines(framed))

    async def finish(self) -> tuple[str, int]:
        """Flush, seal the sink; returns (sha256 hex, bytes stored)."""
        try:
            self._submit(self._flush)
            await self._drain(keep=0)
            await self._sink.seal()
        finally:
            self.close()
        return self._sha.hexdigest(), self.size

    def close(self) -> None:
        """Drop what has not started; wait for the chunk in progress (milliseconds), so the
        sink can be aborted safely right after."""
        for fut in self._pending:
            fut.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


# orjson's per-call overhead dominates for small objects, so a batch of records is dumped as
# one JSON array and split into lines at the record boundaries: `},{"account_id":` cannot occur
# anywhere else, because a quote inside a string is always escaped and a record holds no nested
# object. The dict literal lists the fields in sorted order (so no key sorting is needed) and
# takes them from the unpacked tuple (JobRecord is a NamedTuple: one unpacking is 20% cheaper
# than 13 attribute reads); if JobRecord gains or reorders a field, the generic path
# (to_json_dict + sorted keys) takes over until the literal is updated (tests/test_snapshot.py
# pins that the fast path is in use).
_RECORD_FIELDS = (
    "account_id",
    "job_id",
    "job_state",
    "job_type",
    "snowball_type",
    "is_master",
    "creation_date",
    "description",
    "regions",
    "snapshot_id",
    "observed_at",
    "last_seen",
    "stale",
)
FAST_RECORD_ENCODER = JobRecord._fields == _RECORD_FIELDS
_BOUNDARY = b'},{"account_id":'
_NEWLINE_BOUNDARY = b'}\n{"account_id":'


def _frame_records(batch: Sequence[JobRecord]) -> bytes:
    """The records as a JSON array (keys sorted), then `FRAME_END`, with a newline at each
    record boundary: `[{...}\n{...}\n{"account_id":]`, whose `frame_lines` are the lines of
    the data file."""
    items: list[Any]
    if FAST_RECORD_ENCODER:
        items = [
            {
                "account_id": account_id,
                "creation_date": creation_date,
                "description": description,
                "is_master": is_master,
                "job_id": job_id,
                "job_state": job_state,
                "job_type": job_type,
                "last_seen": last_seen,
                "observed_at": observed_at,
                "regions": regions,
                "snapshot_id": snapshot_id,
                "snowball_type": snowball_type,
                "stale": stale,
            }
            for (
                account_id,
                job_id,
                job_state,
                job_type,
                snowball_type,
                is_master,
                creation_date,
                description,
                regions,
                snapshot_id,
                observed_at,
                last_seen,
                stale,
            ) in batch
        ]
        items.append(FRAME_END)
        body = orjson.dumps(items)
    else:  # pragma: no cover - only while JobRecord and _RECORD_FIELDS disagree
        items = [r.to_json_dict() for r in batch]
        items.append(FRAME_END)
        body = orjson.dumps(items, option=_OPTS)
    return body.replace(_BOUNDARY, _NEWLINE_BOUNDARY)


def _encode_records(batch: Sequence[JobRecord]) -> bytes:
    """JSON Lines for `batch` (keys sorted, trailing newline); b"" for an empty batch."""
    return bytes(frame_lines(_frame_records(batch)))


async def _encoded(
    records: Sequence[JobRecord], writer: _Writer, keep: list[bytes] | None
) -> AsyncGenerator[NewBatch, None]:
    """Encode `records` batch by batch into `writer` (the data file), yielding each batch for
    the comparison; with `keep`, also collect the encoded batches there (`_replay`)."""
    for start in range(0, len(records), _RECORD_BATCH):
        batch = records[start : start + _RECORD_BATCH]
        framed = _frame_records(batch)
        await writer.write_framed(framed)
        if keep is not None:
            keep.append(framed)
        yield NewBatch(batch, framed)


async def _replay(kept: list[bytes]) -> AsyncGenerator[list[bytes], None]:
    """The lines of the snapshot that `_encoded` kept, releasing them as they are read."""
    kept.reverse()
    while kept:
        lines = lines_of(kept.pop())
        lines[0] = lines[0][1:]  # the array's "["
        lines.pop()  # FRAME_END and "]"
        yield lines
        await asyncio.sleep(0)  # the comparison runs on the loop: let other tasks in


async def _no_lines() -> AsyncGenerator[list[bytes], None]:
    return
    yield  # pragma: no cover - makes this an async generator


_gc_depth = 0
_gc_was_enabled = False


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while a snapshot is written.

    The caller holds every record in memory; each time the write's short-lived objects (parsed
    lines, comparison tuples) pile up, a full collection walks all of them again, which about
    doubles the cost of computing the changes. Nothing the write allocates forms a cycle, and
    reference counting still frees everything at once. Overlapping pauses nest.
    """
    global _gc_depth, _gc_was_enabled
    if _gc_depth == 0:
        _gc_was_enabled = gc.isenabled()
        gc.disable()
    _gc_depth += 1
    try:
        yield
    finally:
        _gc_depth -= 1
        if _gc_depth == 0 and _gc_was_enabled:
            gc.enable()


_SWITCH_INTERVAL = 0.0005
_switch_depth = 0
_switch_was = 0.0


@contextlib.contextmanager
def _quick_gil_handover() -> Iterator[None]:
    """Shorten the interpreter's switch interval (default 5 ms) while a snapshot is written.

    The encoder holds the GIL on the event loop; the writer threads hash, write and flush
    with it released, but each time one of their calls returns the thread waits for the GIL,
    up to a whole interval: with the default, the writer falls behind the encoder and the
    encoder then waits for it. Overlapping writes nest.
    """
    global _switch_depth, _switch_was
    if _switch_depth == 0:
        _switch_was = sys.getswitchinterval()
        sys.setswitchinterval(min(_switch_was, _SWITCH_INTERVAL))
    _switch_depth += 1
    try:
        yield
    finally:
        _switch_depth -= 1
        if _switch_depth == 0:
            sys.setswitchinterval(_switch_was)


async def _abort(sink: Sink) -> None:
    """Abort, shielded from cancellation: cleaning up must finish even when the cycle is
    being cancelled; a failure to clean up never hides the error that caused it."""
    try:
        await asyncio.shield(sink.abort())
    except (OutputError, OSError) as exc:  # pragma: no cover - double fault
        log.warning("snapshot.abort_failed", error=str(exc))


class NotPublishedError(OutputError):
    """A snapshot was written whole, but LATEST was not moved to it: another writer published
    since it read LATEST (transient: the next run starts from theirs).

    `lost` is True when LATEST was seen naming another snapshot than this one and than the one
    it was compared with, so that this one can no longer become LATEST; False when that is not
    certain (a conditional PUT of ours may still be in flight)."""

    def __init__(self, message: str, *, lost: bool) -> None:
        super().__init__(message, transient=True)
        self.lost = lost


class _UnreadablePrevious(Exception):
    """The previous snapshot's data cannot be read back: no change file this time."""


class Store(ABC):
    """An output location holding snapshots (see the module docstring); an async context
    manager with one owner.

    Keyword options: `compress` ("none" or "gzip"; default "none"), `gzip_level` (1-9,
    default 6), `remember` (default True: keep the lines of the last snapshot this store
    wrote, its data file uncompressed, about 400 bytes a job, so that the next write compares
    against them without reading that snapshot back; used only while it is still the
    previous snapshot), `debris_age` (seconds, default 3600: `prune` leaves the files of an
    unpublished or manifest-less snapshot alone until they are this old, since another writer
    may still be producing them), `clock` (epoch seconds, default `time.time`) and `origin`
    (where the location was given, such as `aggregator.toml: output.directory` or `--output`:
    `check_writable`'s error starts with it, so that a wrong location names its setting).
    """

    location: str

    def __init__(
        self,
        *,
        compress: Compression | None = None,
        gzip_level: int = 6,
        remember: bool = True,
        debris_age: float = 3600.0,
        clock: Callable[[], float] = time.time,
        origin: str | None = None,
    ) -> None:
        if compress not in (None, "none", "gzip"):
            raise ValueError(f"compress must be 'none' or 'gzip', not {compress!r}")
        if type(gzip_level) is not int or not 1 <= gzip_level <= 9:
            raise ValueError(f"gzip_level must be an integer from 1 to 9, not {gzip_level!r}")
        self._debris_age = debris_age
        self._clock = clock
        self.compress: Compression = compress or "none"
        self._level = gzip_level
        self._entered = False
        self._previous_of: dict[str, str | None] = {}
        self._remember = remember
        self._view: tuple[str, list[bytes]] | None = None
        self._origin = origin

    async def __aenter__(self) -> Store:
        if self._entered:
            raise RuntimeError(f"{type(self).__name__} is already open")
        self._entered = True
        await self._open_backend()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.shield(self._close_backend())

    @abstractmethod
    async def _open_backend(self) -> None:
        """Acquire connections (S3); nothing for a directory."""

    @abstractmethod
    async def _close_backend(self) -> None:
        """Release what `_open_backend` acquired."""

    # --- what a backend provides -------------------------------------------------------------

    @abstractmethod
    def locate(self, rel: str) -> Path | str:
        """The full name of `rel` (a path for a directory, an `s3://` URL for S3); "" names
        the location itself."""

    async def check_writable(self) -> None:
        """Raise `OutputError` now (before any AWS call) if the location cannot be written;
        its message starts with the store's `origin`, when it has one."""
        try:
            await self._check_writable()
        except OutputError as exc:
            if self._origin is None:
                raise
            raise OutputError(f"{self._origin}: {exc}", transient=exc.transient) from exc

    @abstractmethod
    async def _check_writable(self) -> None:
        """`check_writable` without the origin."""

    @abstractmethod
    async def _open(self, rel: str, metadata: Mapping[str, str] | None = None) -> Sink:
        """A sink for `rel`; `metadata` is stored with the object where the backend can
        (S3 user metadata), for cheap reads of a manifest's links."""

    @abstractmethod
    async def _read(self, rel: str) -> bytes | None:
        """The whole object, or None if there is none."""

    @abstractmethod
    def _stream(self, rel: str) -> AsyncIterator[bytes]:
        """The object's bytes in chunks; `OutputError` if it is missing."""

    def stream(self, rel: str) -> AsyncIterator[bytes]:
        """The stored bytes of `rel` (a path relative to the location, compressed as stored:
        what a manifest's `sha256` and `bytes` cover), in chunks; `OutputError` if missing."""
        return self._stream(rel)

    @abstractmethod
    async def _list(self) -> dict[str, float]:
        """Every object under `snapshots/` and `changes/` (temporary ones included), with
        the time it was last modified (epoch seconds)."""

    @abstractmethod
    async def _delete(self, rels: Sequence[str]) -> None: ...

    @abstractmethod
    async def _list_shards(self) -> dict[str, float]:
        """Every object under `shards/` (the shard snapshots of sharded runs), with the time
        it was last modified (epoch seconds); a backend with folders also lists each folder
        (its path ending in `/`), so that a run with no file left still shows."""

    async def _delete_shard_run(self, run_id: str, rels: Sequence[str]) -> None:
        """Delete `rels`, the files of one sharded run's folder (each shard's LATEST first:
        a merge that reads the run meanwhile finds the shard missing, never half there)."""
        await self._delete(sorted(rels, key=lambda rel: not rel.endswith(f"/{LATEST}")))

    # --- writing ---------------------------------------------------------------------------

    async def _put(
        self,
        rel: str,
        chunks: Iterable[bytes],
        *,
        gzip: bool = False,
        metadata: Mapping[str, str] | None = None,
    ) -> tuple[str, int]:
        """Write one object atomically; returns (sha256 hex, bytes stored)."""
        sink = await self._open(rel, metadata)
        try:
            writer = _Writer(sink, gzip=gzip, level=self._level)
            try:
                for chunk in chunks:
                    await writer.write(chunk)
            except BaseException:
                writer.close()
                raise
            digest = await writer.finish()
            await sink.publish()
        except BaseException:
            await _abort(sink)
            raise
        return digest

    async def write(
        self,
        snapshot_id: str,
        records: Sequence[JobRecord],
        manifest: Mapping[str, Any],
        *,
        previous: Mapping[str, Any] | None = None,
        changes: bool = True,
        shared_id: bool = False,
    ) -> WrittenSnapshot:
        """Write a snapshot: data, manifest, change file (events since `previous`), LATEST.

        `records` must be sorted by (account_id, job_id). `previous` is the manifest of the
        snapshot the changes are computed from (the one LATEST pointed to when the cycle read
        it), or None for the first snapshot, whose change file has a `job_added` per job. The
        store fills in `snapshot_id`, `previous_snapshot_id`, `data` and `changes` (and
        `schema_version` if missing) of the manifest. If the previous snapshot's data cannot be
        read back, the snapshot is written without change file (`changes: null`) and a warning
        is logged; `changes=False` skips it on purpose (a shard's snapshot, whose run's changes
        `merge` computes). Raises `OutputError` if the location cannot be written, or (with
        `transient`, unless `changes=False`) if LATEST no longer names `previous` when this
        snapshot is complete (another writer published meanwhile: this one is left
        unpublished, for prune); the previous snapshot then stays LATEST.

        A write that fails otherwise (a full disk, S3 failing, cancelled) before LATEST names
        it deletes the files it had put in place, change file first, once LATEST is read back
        and does not name it: on a nearly full disk each failed run would leave a data file
        nothing prunes (prune follows a write that succeeds), until no snapshot fits; and a
        change file left behind would repeat its events in the next one's. Not with
        `shared_id` (two merges of one run write the same names: the files may be the other
        merge's), nor when LATEST cannot be read, nor once a replacement of LATEST that may
        still land was sent (S3: a PUT whose answer was lost): then they stay for prune, as
        after a kill.
        """
        with _gc_paused(), _quick_gil_handover():
            return await self._write(
                snapshot_id, records, manifest, previous, changes, take_back=not shared_id
            )

    async def _write(
        self,
        snapshot_id: str,
        records: Sequence[JobRecord],
        manifest: Mapping[str, Any],
        previous: Mapping[str, Any] | None,
        with_changes: bool,
        *,
        take_back: bool,
    ) -> WrittenSnapshot:
        gz = self.compress == "gzip"
        data_rel = data_path(snapshot_id, gz)
        manifest_rel = manifest_path(snapshot_id)
        changes_rel = changes_path(snapshot_id, gz)
        previous_id: str | None = previous["snapshot_id"] if previous else None
        view, self._view = self._view, None  # consumed (or stale) either way
        kept: list[bytes] | None = [] if self._remember and with_changes else None
        # The data file and the change file are written in one pass over the records: each
        # batch is encoded into the data file, then compared with the previous snapshot.
        data_sink = await self._open(data_rel)
        changes_sink: Sink | None = None
        changes: dict[str, Any] | None = None
        writer: _Writer | None = None
        try:
            writer = _Writer(data_sink, gzip=gz, level=self._level)
            new = _encoded(records, writer, kept)
            try:
                if with_changes:
                    changes_sink = await self._open(changes_rel)
                    head = {**manifest, "snapshot_id": snapshot_id}
                    head["previous_snapshot_id"] = previous_id
                    changes = await self._stage_changes(
                        changes_sink, changes_rel, new, head, previous, view
                    )
                    if changes is None:
                        changes_sink = None  # aborted: nothing staged
                async for _ in new:  # what the comparison did not take (it stopped early)
                    pass
                sha, size = await writer.finish()
            finally:
                await new.aclose()
            await data_sink.publish()
        except BaseException:
            if writer is not None:
                writer.close()
            await _abort(data_sink)
            if changes_sink is not None:
                await _abort(changes_sink)
            raise
        full: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            **manifest,
            "snapshot_id": snapshot_id,
            "previous_snapshot_id": previous_id,
            "data": {
                "path": data_rel,
                "sha256": sha,
                "bytes": size,
                "records": len(records),
                "compression": "gzip" if gz else None,
            },
            "changes": changes,
        }
        # What this write has put in place, or may have (named before each put: a put can
        # fail after its file took its name, as when the folder's fsync fails).
        placed = [data_rel]
        latest_sent = False
        try:
            try:
                body = orjson.dumps(full, option=_OPTS | orjson.OPT_INDENT_2) + b"\n"
                links = {"snapshot-id": snapshot_id, "previous-snapshot-id": previous_id or ""}
                placed.append(manifest_rel)
                await self._put(manifest_rel, [body], metadata=links)
                if changes_sink is not None:
                    placed.append(changes_rel)
                    await changes_sink.publish()
            except BaseException:
                if changes_sink is not None:
                    await _abort(changes_sink)
                raise
            latest = manifest_rel.encode() + b"\n"
            latest_sent = True
            if with_changes:
                try:
                    await self._publish(snapshot_id, previous_id, latest)
                except NotPublishedError as exc:
                    if exc.lost and changes_sink is not None:
                        await self._withdraw(changes_rel)
                    take_back = False  # the race's rules: its data and manifest are prune's
                    raise
            else:  # a snapshot without change file (a shard's) has no chain to keep
                await to_the_end(self._put(LATEST, [latest]))
        except BaseException:
            # Once LATEST's replacement may be in flight (an S3 PUT whose answer did not come),
            # it may still land and name this snapshot: its files then stay, for prune.
            if take_back and not (latest_sent and self._latest_may_land_later):
                await to_the_end(self._take_back(snapshot_id, placed))
            raise
        self._previous_of[snapshot_id] = previous_id
        # The lines of the data file, kept whole whether or not the change file was written.
        self._view = None if kept is None else (snapshot_id, kept)
        log.info(
            "snapshot.written",
            location=str(self.locate(manifest_rel)),
            records=len(records),
            bytes=size,
            events=None if changes is None else changes["events"],
        )
        return WrittenSnapshot(
            snapshot_id=snapshot_id,
            data_path=data_rel,
            manifest_path=manifest_rel,
            sha256=sha,
            bytes=size,
            records=len(records),
            changes_path=None if changes is None else changes_rel,
            events=None if changes is None else changes["events"],
        )

    async def _publish(self, snapshot_id: str, previous_id: str | None, latest: bytes) -> None:
        """Point LATEST at `snapshot_id`, only from the snapshot it was compared with: if
        another writer (a manual run while the daemon writes) published since, this one stays
        off the chain (a later prune removes it), so the change files stay one chain. Raises a
        transient OutputError then. (Ids are not compared: after a clock step back, a newer
        snapshot may have an id that sorts first; its `previous_snapshot_id` still links it.)"""
        async with self._latest_lock():
            current = latest_snapshot_id(await self._latest_rel())
            if current != previous_id:
                raise self._not_published(snapshot_id, previous_id, current)
            await to_the_end(self._put(LATEST, [latest]))

    def _not_published(
        self, snapshot_id: str, previous_id: str | None, current: str | None
    ) -> NotPublishedError:
        if current == snapshot_id:  # a twin (two merges of one run) published the same id
            return NotPublishedError(
                f"{self.location}: snapshot {snapshot_id} was published meanwhile by another "
                "writer of the same snapshot (two merges of one run at once?); nothing more to do",
                lost=False,
            )
        return NotPublishedError(
            f"{self.location}: snapshot {snapshot_id} was written but not published: LATEST "
            f"names {current}, not {previous_id}, which this run was compared with (another "
            "writer published meanwhile); the next run starts from it",
            lost=True,
        )

    # Whether a LATEST write that failed may still land afterwards (S3: a PUT whose answer was
    # lost); a directory's replacement is done or not done when the call returns.
    _latest_may_land_later = True

    async def _take_back(self, snapshot_id: str, placed: Sequence[str]) -> None:
        """Delete `placed`, newest first, the files of a write that failed before LATEST named
        it, once LATEST read back names another snapshot (none names this one: a writer
        publishes only over the snapshot it was compared with). Best effort: LATEST unreadable,
        or a delete failing, leaves them for prune."""
        try:
            if latest_snapshot_id(await self._latest_rel()) == snapshot_id:
                return
            await self._delete(placed[::-1])
        except (OutputError, OSError) as exc:
            log.warning("snapshot.take_back_failed", snapshot_id=snapshot_id, error=str(exc))
            return
        log.info("snapshot.taken_back", snapshot_id=snapshot_id, files=len(placed))

    async def _withdraw(self, changes_rel: str) -> None:
        """Delete the change file of a snapshot that lost the race for LATEST for good (LATEST
        names another snapshot, which a conditional write of ours can no longer replace), at
        once: it holds the events since the snapshot the winner's change file starts from too,
        and readers of every change file (`changes/*/*.jsonl`) would count them twice until
        prune. Its manifest and data stay for prune (the manifest names it still). Best
        effort."""
        try:
            await self._delete([changes_rel])
        except (OutputError, OSError) as exc:
            log.warning("changes.withdraw_failed", path=changes_rel, error=str(exc))

    def _latest_lock(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Held while LATEST is read, checked and replaced (`_publish`): a directory locks it
        against other processes; S3 has no lock (the check and the PUT are a round trip
        apart)."""
        return contextlib.nullcontext()

    async def _stage_changes(
        self,
        sink: Sink,
        rel: str,
        new: AsyncIterator[NewBatch],
        manifest: Mapping[str, Any],
        previous: Mapping[str, Any] | None,
        view: tuple[str, list[bytes]] | None,
    ) -> dict[str, Any] | None:
        """Compare the records `new` yields (while they are written) with the previous
        snapshot, write the events into `sink` and seal it (not yet visible); None if skipped
        (`sink` aborted). `view` is what this store kept of the last snapshot it wrote."""
        writer = _Writer(sink, gzip=self.compress == "gzip", level=self._level)
        counts = dict.fromkeys(EVENT_TYPES, 0)
        old: AsyncGenerator[list[bytes], None]
        if previous is None:
            old = _no_lines()
        elif view is not None and view[0] == previous["snapshot_id"]:
            old = _replay(view[1])
        else:
            old = self._previous_lines(previous)
        try:
            async for body, found in diff_lines(
                old, new, old_manifest=previous, new_manifest=manifest
            ):
                for event, n in found.items():
                    counts[event] += n
                await writer.write(body)
        except (_UnreadablePrevious, UnreadableLine) as exc:
            writer.close()
            await _abort(sink)
            log.warning(
                "changes.skipped",
                previous_snapshot_id=manifest["previous_snapshot_id"],
                error=str(exc.__cause__ or exc),
            )
            return None
        except UnsortedError as exc:
            writer.close()
            if exc.side == "older":
                await _abort(sink)
                log.warning("changes.skipped", error=str(exc))
                return None
            raise
        except BaseException:
            writer.close()
            raise
        finally:
            await old.aclose()
        sha, size = await writer.finish()
        return {
            "path": rel,
            "sha256": sha,
            "bytes": size,
            "events": sum(counts.values()),
            "counts": counts,
        }

    async def _previous_lines(
        self, manifest: Mapping[str, Any]
    ) -> AsyncGenerator[list[bytes], None]:
        try:
            async for lines in self._record_lines(manifest, verify=False):
                yield lines
        except (OutputError, ValueError, KeyError, TypeError, zlib.error) as exc:
            raise _UnreadablePrevious(str(exc)) from exc

    # --- reading ---------------------------------------------------------------------------

    async def _read_json(self, rel: str) -> dict[str, Any] | None:
        body = await self._read(rel)
        if body is None:
            return None
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise OutputError(f"{self.locate(rel)}: not valid JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise OutputError(f"{self.locate(rel)}: not a JSON object")
        return value

    async def _latest_rel(self) -> str | None:
        """What LATEST names (stripped), None without LATEST. An empty LATEST is "": damaged
        (this tool never writes one), not a location without snapshots, from which a run
        would start afresh and drop what failed partitions carry forward."""
        body = await self._read(LATEST)
        if body is None:
            return None
        return body.decode("utf-8", "replace").strip()

    async def latest_manifest(self) -> dict[str, Any] | None:
        """The manifest LATEST points to, or None when there is no snapshot yet.

        Raises `OutputError` if LATEST or the manifest is not what this tool writes (edited or
        damaged by hand): a run from it could not tell which jobs to carry forward."""
        rel = await self._latest_rel()
        if rel is None:
            return None
        problem = _path_problem(rel) if rel else "it is empty"
        if problem is not None:
            raise OutputError(f"{self.location}: LATEST does not name a manifest: {problem}")
        try:
            manifest = await self._read_json(rel)
        except OutputError as exc:
            raise OutputError(
                f"{self.location}: LATEST points to an unreadable manifest {_quoted(rel)}"
            ) from exc
        if manifest is None:
            raise OutputError(
                f"{self.location}: LATEST points to a missing manifest {_quoted(rel)}"
            )
        return self._checked(manifest, rel)

    def _checked(self, manifest: dict[str, Any], rel: str) -> dict[str, Any]:
        problem = _manifest_problem(manifest)
        named = _LATEST_ID.search(rel)
        if problem is None and named is not None and named[1] != manifest["snapshot_id"]:
            # (a manifest copied under another name: runs from it would never publish again)
            problem = f"it is named for snapshot {named[1]} but says {manifest['snapshot_id']}"
        if problem is not None:
            raise OutputError(f"{self.locate(rel)}: not a valid manifest: {problem}")
        return manifest

    async def read_manifest(self, snapshot_id: str) -> dict[str, Any]:
        """The manifest of `snapshot_id` (`latest`: the one LATEST points to)."""
        if snapshot_id.lower() == "latest":
            manifest = await self.latest_manifest()
        elif _SNAPSHOT_ID.fullmatch(snapshot_id):
            rel = manifest_path(snapshot_id)
            manifest = await self._read_json(rel)
            if manifest is not None:
                manifest = self._checked(manifest, rel)
        else:
            raise OutputError(
                f"{snapshot_id!r} is not a snapshot id (like 20261128T150000Z-3f9c) or 'latest'"
            )
        if manifest is None:
            raise OutputError(f"{self.location}: no snapshot {snapshot_id}")
        return manifest

    async def _line_batches(
        self, manifest: Mapping[str, Any], digest: _Digest | None = None
    ) -> AsyncIterator[list[bytes]]:
        """The lines of a snapshot's data file (gzip or not), in batches, each with its newline
        (but for an unterminated last line), blank lines dropped; the file as stored goes
        through `digest` too."""
        rel: str = manifest["data"]["path"]
        unzip = zlib.decompressobj(31) if rel.endswith(".gz") else None
        rest = b""
        async for chunk in self._stream(rel):
            if digest is not None:
                await digest.update(chunk)
            if unzip is not None:
                try:
                    unzip, chunk = _inflate(unzip, chunk)
                except zlib.error as exc:  # named here: `diff` and the comparison see the file
                    raise OutputError(f"{self.locate(rel)}: damaged gzip stream: {exc}") from exc
            lines = lines_of(chunk)
            if not lines:
                continue
            lines[0] = rest + lines[0]
            rest = b"" if lines[-1].endswith(b"\n") else lines.pop()
            if b"\n" in lines:
                lines = [line for line in lines if line != b"\n"]
            if lines:
                yield lines
            await asyncio.sleep(0)  # a local file never makes us wait: let other tasks in
        if unzip is not None:
            rest += unzip.flush()
            if not unzip.eof:
                raise OutputError(f"{self.locate(rel)}: truncated gzip stream")
        if rest.strip():
            yield [line for line in lines_of(rest) if line != b"\n"]

    async def _record_lines(
        self, manifest: Mapping[str, Any], *, verify: bool = True
    ) -> AsyncGenerator[list[bytes], None]:
        """`_line_batches`, then an `OutputError` if there were not as many lines as the
        manifest's `data.records` says, or the file is not the size its `data.bytes` says, or
        (with `verify`) not the file its `data.sha256` describes: a data file cut short,
        damaged or edited would otherwise drop jobs without a word (from what a failed
        partition carries forward, for one), or make up changes. The digest is computed in a
        thread of its own as the lines are read; without `verify` (the comparison of a run
        with the snapshot before it, where it would cost 15% of the write: an edit that keeps
        the file's size then shows as changes) only the size is checked."""
        data = manifest["data"]
        expected = data.get("records")
        where = self.locate(data["path"])
        seen = 0
        with _Digest(sha=verify) as digest:
            async for lines in self._line_batches(manifest, digest):
                seen += len(lines)
                yield lines
            if expected is not None and seen != expected:
                raise OutputError(
                    f"{where}: {seen} records, but its manifest says {expected}: the data file "
                    "is damaged"
                )
            sha, size = await digest.result()
        if data.get("bytes") is not None and size != data["bytes"]:
            raise OutputError(
                f"{where}: {size} bytes do not match the size in its manifest "
                f"({data['bytes']}): the data file is damaged or was edited"
            )
        if sha is not None and data.get("sha256") is not None and sha != data["sha256"]:
            raise OutputError(
                f"{where}: does not match the sha256 in its manifest: the data file is "
                "damaged or was edited"
            )

    async def _batches(self, manifest: Mapping[str, Any]) -> AsyncIterator[Batch]:
        """The comparison view of a snapshot's records, in batches; a line that is not a
        record is an `OutputError` naming the file and the line."""
        loads = orjson.loads
        seen = 0
        async with contextlib.aclosing(self._record_lines(manifest)) as it:
            async for lines in it:
                try:
                    batch = batch_of_dicts(list(map(loads, lines)))
                except ValueError:
                    raise self._unreadable(manifest, lines, seen) from None
                seen += len(lines)
                yield batch

    def _unreadable(
        self, manifest: Mapping[str, Any], lines: list[bytes], seen: int
    ) -> OutputError:
        """The error for the first line of `lines` (after `seen` records) that is no record."""
        for number, line in enumerate(lines, seen + 1):
            try:
                batch_of_dicts([orjson.loads(line)])
            except ValueError as exc:
                reason = str(exc).removeprefix("not a snapshot record: ")
                return OutputError(
                    f"{self.locate(manifest['data']['path'])}: record {number} is not a "
                    f"snapshot record: {reason}"
                )
        raise AssertionError("a line of the batch failed")  # pragma: no cover

    async def read_records(self, manifest: Mapping[str, Any]) -> AsyncIterator[JobRecord]:
        """Stream the records of the snapshot described by `manifest` (gzip or not); raises
        `OutputError` if the file is not the one the manifest describes (`_record_lines`)."""
        rel = manifest["data"]["path"]
        try:
            async with contextlib.aclosing(self._record_lines(manifest)) as it:
                async for lines in it:
                    for line in lines:
                        yield JobRecord.from_json_dict(orjson.loads(line))
        except (ValueError, KeyError, zlib.error) as exc:
            raise OutputError(f"{self.locate(rel)}: not a valid snapshot: {exc}") from exc

    async def diff(self, old: str, new: str) -> AsyncIterator[list[ChangeEvent]]:
        """The change events from snapshot `old` to snapshot `new` (ids, or `latest`)."""
        old_manifest = await self.read_manifest(old)
        new_manifest = await self.read_manifest(new)

        try:
            async for batch in diff(
                self._batches(old_manifest),
                self._batches(new_manifest),
                old_manifest=old_manifest,
                new_manifest=new_manifest,
            ):
                yield batch
        except (ValueError, KeyError, zlib.error) as exc:
            raise OutputError(f"{self.location}: cannot compare {old} and {new}: {exc}") from exc

    # --- retention -------------------------------------------------------------------------

    async def _read_previous_id(self, snapshot_id: str) -> str | None:
        """The `previous_snapshot_id` of a snapshot's manifest (None if unreadable)."""
        try:
            manifest = await self._read_json(manifest_path(snapshot_id))
        except OutputError:
            return None
        return (manifest or {}).get("previous_snapshot_id")

    async def _previous_ids(self, ids: Sequence[str]) -> None:
        """Fill the cache of `previous_snapshot_id` for `ids`, a few reads at a time."""
        missing = [i for i in ids if i not in self._previous_of]
        gate = asyncio.Semaphore(8)

        async def one(snapshot_id: str) -> None:
            async with gate:
                self._previous_of[snapshot_id] = await self._read_previous_id(snapshot_id)

        # gather, not a TaskGroup: a failed read must reach prune's callers as the OutputError
        # it is (a warning once the snapshot is published), not wrapped in an ExceptionGroup.
        outcomes = await asyncio.gather(*map(one, missing), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def prune(self, retain: int) -> Pruned:
        """Delete all but the newest `retain` published snapshots, and crash debris.

        The newest snapshots are found by following `previous_snapshot_id` back from LATEST
        (up to 16 of them, and further while a manifest among them by id is not found on the
        chain; beyond that by snapshot id, which sorts by start time), so runs that started
        in the same second, or after the clock stepped back, are still told apart. A manifest
        off that chain but among its snapshots was never published (a crash before LATEST) and
        goes; so do the files of a snapshot without manifest that is older than LATEST's.
        Never deletes the snapshot LATEST points to nor anything newer than it (a write in
        progress elsewhere), and does nothing when there is no LATEST. A manifest goes before
        its data and change files, so an interrupted prune leaves only files the next prune
        recognises as incomplete. Then the folders of sharded runs that can no longer be merged go
        (`_prune_shard_runs`). Raises `OutputError` if the location cannot be listed or a file
        cannot be deleted.
        """
        if retain < 1:
            raise ValueError(f"retain must be >= 1, got {retain}")
        latest_rel = await self._latest_rel()
        found = ARTIFACT_RE.fullmatch(latest_rel or "")
        if found is None or found["kind"] != "manifest.json":
            return Pruned()
        latest = found["id"]
        files: dict[str, list[str]] = defaultdict(list)
        manifests: set[str] = set()
        young: set[str] = set()  # snapshots with a file modified within `debris_age`
        recent = self._clock() - self._debris_age
        for rel, modified in (await self._list()).items():
            m = ARTIFACT_RE.fullmatch(rel)
            if m is None:
                continue
            files[m["id"]].append(rel)
            if m["kind"] == "manifest.json" and not m["tmp"]:
                manifests.add(m["id"])
            if modified > recent:
                young.add(m["id"])
        if latest not in manifests:
            log.warning("snapshot.prune_skipped", reason="LATEST names a missing manifest")
            return Pruned()

        older = sorted((i for i in manifests if i < latest), reverse=True)
        await self._previous_ids([latest, *older[: _CHAIN_DEPTH - 1]])
        chain = [latest]
        while True:
            prev = self._previous_of.get(chain[-1])
            if prev is None or prev not in manifests or prev in chain:
                break
            chain.append(prev)
            if len(chain) > _CHAIN_DEPTH and not self._unexplained(chain, manifests, young):
                break  # (its previous is published too, but not needed: ids order the rest)
            if prev not in self._previous_of:
                await self._previous_ids([prev])
        lo, hi = min(chain), max(chain)
        on_chain = set(chain)
        # Unpublished or manifest-less snapshots are debris only once they are old: a writer
        # elsewhere may still be producing one (its LATEST not written yet).
        orphaned = sorted(
            i for i in manifests if lo < i < hi and i not in on_chain and i not in young
        )
        rest = sorted((i for i in manifests if i < lo), reverse=True)
        ordered = chain + rest  # newest first; anything above `hi` is left alone
        expired = sorted(ordered[retain:])
        kept = len(ordered) - len(expired)
        incomplete = sorted(i for i in files if i not in manifests and i < hi and i not in young)

        doomed = expired + orphaned
        if doomed or incomplete:
            await self._delete([manifest_path(i) for i in doomed])
            await self._delete(
                [rel for i in doomed + incomplete for rel in files[i] if rel != manifest_path(i)]
            )
            for i in doomed:
                self._previous_of.pop(i, None)
            log.info(
                "snapshot.pruned",
                expired=len(expired),
                orphaned=len(orphaned),
                incomplete=len(incomplete),
                kept=kept,
            )
        shard_runs = await self._prune_shard_runs(_id_time(min(ordered[:retain])))
        return Pruned(
            expired=tuple(expired),
            orphaned=tuple(orphaned),
            incomplete=tuple(incomplete),
            kept=kept,
            shard_runs=shard_runs,
        )

    @staticmethod
    def _unexplained(chain: Sequence[str], manifests: set[str], young: set[str]) -> bool:
        """Whether a manifest whose id sorts among the chain's, off the chain walked so far, is
        old enough to be pruned as never published. Ids sort by start time, so normally none
        is; when they do not (runs in the same second, a clock stepped back), the walk goes on
        until it finds them on the chain, or the chain ends (they are debris then)."""
        lo, hi = min(chain), max(chain)
        on_chain = set(chain)
        return any(lo < i < hi and i not in on_chain and i not in young for i in manifests)

    async def _prune_shard_runs(self, oldest_kept: float) -> tuple[str, ...]:
        """Delete the folders of sharded runs (`shards/run=<id>/`) whose every file is older,
        by `debris_age`, than the start of the oldest snapshot kept; returns their run ids.

        Such a run can no longer be merged: its merged snapshot's id would take the time of
        its first shard, before LATEST's, and `merge` refuses to move LATEST back; the runs
        of the snapshots kept, and runs in progress, have newer files. The margin covers the
        clocks of other hosts (an object store's modification times are its own). Best
        effort: a run that cannot be listed or deleted (shards written by another user) is a
        warning, and the other runs and the rest of the prune go on.
        """
        try:
            listed = await self._list_shards()
        except OutputError as exc:
            log.warning("snapshot.shard_prune_failed", error=str(exc))
            return ()
        runs: dict[str, list[str]] = defaultdict(list)
        newest: dict[str, float] = {}
        for rel, modified in listed.items():
            m = _SHARD_RUN_RE.match(rel)
            if m is None:
                continue
            runs[m["run"]].append(rel)
            newest[m["run"]] = max(modified, newest.get(m["run"], modified))
        cutoff = min(oldest_kept, self._clock()) - self._debris_age
        done: list[str] = []
        for run in sorted(run for run, t in newest.items() if t < cutoff):
            try:
                await self._delete_shard_run(run, runs[run])
            except OutputError as exc:
                log.warning("snapshot.shard_prune_failed", run_id=run, error=str(exc))
                continue
            done.append(run)
        if done:
            log.info("snapshot.pruned", shard_runs=len(done))
        return tuple(done)


# --- a local directory -----------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_EVERY = 32 << 20
_fdatasync = getattr(os, "fdatasync", None)  # not on macOS: the data then waits for seal
_fadvise = getattr(os, "posix_fadvise", None)  # not on macOS: pages then stay cached


def _drop_cached(fd: int, offset: int = 0, length: int = 0) -> None:
    """Let the kernel drop the page cache of a file's range (`length` 0: to the end).

    Used for change files only: the aggregator never reads one back (they are the feed for
    downstream readers), while the data file stays cached on purpose, because the next run or
    cycle reads it back for its comparison (`LocalStore` keeps no copy in memory). Each new
    file needs fresh pages, and on a virtual machine whose freed memory goes back to the host
    fresh pages are dear: a 560 MB file written with a flush every 32 MB took 1.06 s with its
    pages kept and 0.30 s with each flushed range dropped (the next range reuses the pages just
    freed). A first snapshot's change file holds an event per job: the first 1,000,000-record
    write took 2.32-2.40 s, and 1.80-1.92 s with its change file dropped as it is flushed
    (`python -m tests.benchmarks.snapshot_bench`, three runs of each, interleaved). Only clean
    pages go: call it on what has been flushed. Advisory: an error is ignored."""
    if _fadvise is not None:
        with contextlib.suppress(OSError):
            _fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _sync_range(fd: int, start: int, end: int) -> None:
    """Flush the file to disk, then drop the now clean pages of `start:end` (see above)."""
    assert _fdatasync is not None
    _fdatasync(fd)
    _drop_cached(fd, start, end - start)


def _tree(root: Path, top: str) -> dict[str, float]:
    """Everything under `root/top` by path relative to `root`, with its modification time:
    files and links (a link to a folder is not followed), and each folder with a `/` after
    its path."""
    out: dict[str, float] = {}
    for folder, dirs, names in os.walk(root / top):
        rel = Path(folder).relative_to(root).as_posix()
        entries = [(f"{rel}/", folder)]
        for name in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            entries.append((f"{rel}/{name}", os.path.join(folder, name)))
        for key, path in entries:
            with contextlib.suppress(FileNotFoundError):  # just renamed or deleted
                out[key] = os.lstat(path).st_mtime
    return out


def _file_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(READ_CHUNK):
            yield chunk


class _LocalSink(Sink):
    """A hidden temporary file in the final folder, renamed over the final name; written from
    the writer thread. With `uncached`, its pages leave the page cache as they are flushed
    (`_drop_cached`)."""

    threaded = True

    def __init__(self, store: LocalStore, final: Path, *, uncached: bool = False) -> None:
        self._store = store
        self._uncached = uncached and _fadvise is not None
        self._final = final
        self._tmp = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        final.parent.mkdir(parents=True, exist_ok=True)
        self._fh: IO[bytes] | None = open(self._tmp, "wb")  # noqa: SIM115 - closed in seal/abort
        self._unsynced = 0
        self._synced = 0  # bytes flushed (or being flushed) so far
        self._syncer: ThreadPoolExecutor | None = None
        self._syncing: Future[None] | None = None

    def write_blocking(self, data: _Buffer) -> None:
        assert self._fh is not None
        with self._store.guard("write the snapshot"):
            self._fh.write(data)
            self._unsynced += len(data)
            if self._unsynced >= _SYNC_EVERY and _fdatasync is not None:
                # Flush to disk as we go, or seal's fsync has the whole file to write (and,
                # `uncached`, drop what is flushed). In a thread of its own: the writes go on
                # into the page cache meanwhile (waiting here would stall the encoding too);
                # at most one flush at a time.
                self._fh.flush()  # what the flush covers is in the kernel, not in our buffer
                start = self._synced
                self._synced += self._unsynced
                self._unsynced = 0
                self._wait_for_sync()
                if self._syncer is None:
                    self._syncer = ThreadPoolExecutor(1, thread_name_prefix="snapshot-sync")
                fd = self._fh.fileno()
                if self._uncached:
                    self._syncing = self._syncer.submit(_sync_range, fd, start, self._synced)
                else:
                    self._syncing = self._syncer.submit(_fdatasync, fd)

    def _wait_for_sync(self) -> None:
        """Wait for the flush in progress, raising its error."""
        syncing, self._syncing = self._syncing, None
        if syncing is not None:
            syncing.result()

    def _stop_syncing(self) -> None:
        """Wait for the flush in progress (its error is dropped) and end its thread: the file
        may be closed after. The thread is forgotten only once it has ended: `abort`, which
        closes the file, must wait for it even when a cancelled `seal` left this running."""
        syncer = self._syncer
        if syncer is not None:
            syncer.shutdown(wait=True)  # (a second, concurrent shutdown waits as well)
        self._syncer = None
        self._syncing = None

    async def write(self, data: bytes) -> None:
        self.write_blocking(data)

    async def seal(self) -> None:
        fh = self._fh
        assert fh is not None
        with self._store.guard("write the snapshot"):
            if self._syncer is not None:
                try:
                    await asyncio.to_thread(self._wait_for_sync)
                finally:
                    await asyncio.to_thread(self._stop_syncing)
            fh.flush()
            await asyncio.to_thread(os.fsync, fh.fileno())
            if self._uncached:
                _drop_cached(fh.fileno(), self._synced)
            self._fh = None
            fh.close()

    async def publish(self) -> None:
        with self._store.guard("write the snapshot"):
            os.replace(self._tmp, self._final)
            _fsync_dir(self._final.parent)

    async def abort(self) -> None:
        fh, self._fh = self._fh, None
        if self._syncer is not None:  # no fdatasync on a closed (and maybe reused) descriptor
            await asyncio.to_thread(self._stop_syncing)
        if fh is not None:
            with contextlib.suppress(OSError):  # the file goes anyway; the first error matters
                fh.close()
        self._tmp.unlink(missing_ok=True)


_STALE_LATEST_TMP = 60.0
_LOCK_WAIT = 30.0


class LocalStore(Store):
    """Snapshots in a local directory (created on first write).

    Keyword options as for `Store`, except that `remember` defaults to False.
    """

    _latest_may_land_later = False  # os.replace under the lock, to its end (see `_publish`)

    def __init__(self, directory: str | os.PathLike[str], **options: Any) -> None:
        # Reading the previous data file back costs less than keeping it: it is in the page
        # cache, and its lines are split either way.
        options.setdefault("remember", False)
        super().__init__(**options)
        self.root = Path(directory)
        self.location = str(self.root)

    def guard(self, action: str) -> _Guard:
        """Context manager mapping OSError to OutputError naming the directory."""
        return _Guard(self.location, action)

    @contextlib.asynccontextmanager
    async def _latest_lock(self) -> AsyncIterator[None]:
        """An exclusive lock on `.LATEST.lock` in the directory (`flock`: processes of this
        host), taken without blocking the event loop: tried every 10 ms, for at most
        `_LOCK_WAIT` seconds (it is held for the milliseconds of one LATEST replacement)."""
        with self.guard("lock LATEST"):
            self.root.mkdir(parents=True, exist_ok=True)
            # Read-only is enough for flock, and lets writers of other users share the file.
            fd = os.open(self.root / f".{LATEST}.lock", os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            waited = 0.0
            while fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if waited >= _LOCK_WAIT:
                        raise OutputError(
                            f"{self.location}: cannot lock LATEST: another process has "
                            f"held .{LATEST}.lock for {_LOCK_WAIT:.0f} s",
                            transient=True,
                        ) from None
                    await asyncio.sleep(0.01)
                    waited += 0.01
                except OSError as exc:  # no locks on this filesystem (NFS without lockd...)
                    if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                        raise self.guard("lock LATEST").error(exc) from exc
                    log.warning("snapshot.latest_unlocked", reason=exc.strerror)
                    break
            yield
        finally:
            os.close(fd)  # releases the lock

    async def prune(self, retain: int) -> Pruned:
        """`Store.prune`, and the temporary files of LATEST that a process killed while
        replacing it left behind (`.LATEST.<pid>.<random>.tmp`): those older than LATEST by
        more than `_STALE_LATEST_TMP` seconds. A replacement takes milliseconds, so no write
        still in progress has one that old."""
        pruned = await super().prune(retain)
        with self.guard("delete old snapshots"):
            try:
                latest = (self.root / LATEST).stat().st_mtime
            except FileNotFoundError:
                return pruned
            swept = 0
            for entry in os.scandir(self.root):
                if not (entry.name.startswith(f".{LATEST}.") and entry.name.endswith(".tmp")):
                    continue
                with contextlib.suppress(FileNotFoundError):  # renamed meanwhile: not debris
                    if (
                        entry.is_file(follow_symlinks=False)
                        and entry.stat().st_mtime < latest - _STALE_LATEST_TMP
                    ):
                        os.unlink(entry.path)
                        swept += 1
        if swept:
            log.info("snapshot.pruned", latest_temporaries=swept)
        return pruned

    def locate(self, rel: str) -> Path:
        return self.root / rel

    async def _open_backend(self) -> None:
        return None

    async def _close_backend(self) -> None:
        return None

    async def _check_writable(self) -> None:
        with self.guard("write to the output directory"):
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except FileExistsError:  # a file (or a link to one) where the directory goes
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR)) from None
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()

    async def _open(self, rel: str, metadata: Mapping[str, str] | None = None) -> Sink:
        with self.guard("write the snapshot"):
            # A change file is not read back by us (`_drop_cached`); a data file is.
            return _LocalSink(self, self.root / rel, uncached=rel.startswith("changes/"))

    async def _read(self, rel: str) -> bytes | None:
        try:
            return (self.root / rel).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _Guard(self.location, f"read {rel}").error(exc) from exc

    async def _stream(self, rel: str) -> AsyncIterator[bytes]:
        with self.guard(f"read {rel}"):
            for chunk in _file_chunks(self.root / rel):
                yield chunk

    async def _list(self) -> dict[str, float]:
        out: dict[str, float] = {}
        with self.guard("list the output directory"):
            for top in ("snapshots", "changes"):
                try:
                    folders = list(os.scandir(self.root / top))
                except FileNotFoundError:
                    continue
                for folder in folders:
                    if folder.is_dir() and folder.name.startswith("date="):
                        for f in os.scandir(folder.path):
                            if f.is_file():
                                with contextlib.suppress(FileNotFoundError):  # just renamed
                                    out[f"{top}/{folder.name}/{f.name}"] = f.stat().st_mtime
        return out

    async def _delete(self, rels: Sequence[str]) -> None:
        folders = set()
        with self.guard("delete old snapshots"):
            for rel in rels:
                path = self.root / rel
                path.unlink(missing_ok=True)
                folders.add(path.parent)
        for folder in folders:
            with contextlib.suppress(OSError):  # only succeeds once the folder is empty
                folder.rmdir()

    async def _list_shards(self) -> dict[str, float]:
        with self.guard("list the output directory"):
            return _tree(self.root, "shards")

    async def _delete_shard_run(self, run_id: str, rels: Sequence[str]) -> None:
        """`Store._delete_shard_run` for the files (and links), then the run's folders that
        are left empty (a file written there since the listing keeps its folders)."""
        await super()._delete_shard_run(run_id, [r for r in rels if not r.endswith("/")])
        run = self.root / "shards" / f"run={run_id}"
        with self.guard("delete old shard snapshots"):
            for folder, _, _ in sorted(os.walk(run), key=lambda walked: -len(walked[0])):
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(folder)


class _Guard:
    """`with _Guard(location, action):` turns OSError into OutputError."""

    def __init__(self, location: str, action: str) -> None:
        self.location = location
        self.action = action

    def error(self, exc: OSError) -> OutputError:
        reason = exc.strerror or type(exc).__name__
        return OutputError(f"{self.location}: cannot {self.action}: {reason}")

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, OSError):
            raise self.error(exc) from exc


def open_store(location: str | os.PathLike[str], **options: Any) -> Store:
    """The store for `location`: `s3://bucket/prefix` -> `S3Store`, anything else a directory.

    Options: `compress`, `gzip_level` (every store); for S3 also `session` (an AioSession for
    the credentials; default: the standard AWS chain) and the upload options of `S3Store`.
    Use as `async with open_store(...) as store:`.
    """
    text = os.fspath(location)
    if text.startswith("s3://"):
        from .s3 import S3Store

        return S3Store(text, **options)
    options.pop("session", None)
    return LocalStore(text, **options)


async def diff_command(
    location: str | os.PathLike[str], old: str, new: str, *, out: IO[bytes], **options: Any
) -> int:
    """`snowball-aggregator diff OLD NEW`: write the events between two snapshots as JSON
    Lines to `out`; returns the exit code (0). Raises `OutputError` for an unknown snapshot,
    or one found damaged.

    The events reach `out` only once the comparison has finished, so that a snapshot found
    damaged midway (a record count or line that is wrong near its end) prints the error and
    no events, never a feed cut short that looks whole. Meanwhile they wait in memory, up to
    `_DIFF_SPOOL` bytes, then in a temporary file."""
    with tempfile.SpooledTemporaryFile(max_size=_DIFF_SPOOL) as spool:
        async with open_store(location, **options) as store:
            async for batch in store.diff(old, new):
                _emit(spool.write, encode_events(batch))
        spool.seek(0)
        try:
            while chunk := spool.read(READ_CHUNK):
                _emit(out.write, chunk)
            _emit(out.flush)
        except BrokenPipeError:  # `diff ... | head`: the reader has what it wanted
            return 0
    return 0


_DIFF_SPOOL = 32 << 20


def _emit(write: Callable[..., Any], *data: Any) -> None:
    """`write(*data)` to where the events go; a failure there (a full disk) is OutputError."""
    try:
        write(*data)
    except BrokenPipeError:
        raise
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OutputError(f"cannot write the events: {reason}") from None
