"""Snapshot: write records as JSON Lines plus a manifest, atomically; read the latest back.

Layout under the output directory:
```
snapshots/date=YYYY-MM-DD/<snapshot_id>.jsonl          records, sorted by (account_id, job_id)
snapshots/date=YYYY-MM-DD/<snapshot_id>.manifest.json  run metadata, sha256 of the data file
LATEST                                                 path of the newest manifest
```
Every file is written to a hidden temporary name in its final folder, fsynced, renamed over its
final name, and the folder fsynced. The data file lands first, then the manifest, then LATEST:
a reader (or a crash) at any moment sees the previous snapshot complete or the new one complete,
never a torn file under a final name.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from .errors import OutputError
from .records import JobRecord

__all__ = ["SnapshotStore", "WrittenSnapshot", "new_snapshot_id"]

_OPTS = orjson.OPT_SORT_KEYS


def new_snapshot_id(now: datetime | None = None) -> str:
    """`20261128T150000Z-3f9c`: the start time (UTC) and 4 random hex digits."""
    now = (now or datetime.now(UTC)).astimezone(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def _date_of(snapshot_id: str) -> str:
    return f"{snapshot_id[0:4]}-{snapshot_id[4:6]}-{snapshot_id[6:8]}"


@dataclass(frozen=True, slots=True)
class WrittenSnapshot:
    """Where a snapshot landed: paths relative to the output directory, and its digest."""

    snapshot_id: str
    data_path: str
    manifest_path: str
    sha256: str
    bytes: int
    records: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(final: Path, chunks: Iterable[bytes]) -> tuple[str, int]:
    """Write `chunks` to `final` via temp + fsync + rename; returns (sha256, size)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb", buffering=1 << 20) as fh:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size


def _record_lines(records: Iterable[JobRecord], batch: int = 4096) -> Iterator[bytes]:
    buf: list[bytes] = []
    dumps = orjson.dumps
    for record in records:
        buf.append(dumps(record.to_json_dict(), option=_OPTS))
        if len(buf) >= batch:
            yield b"\n".join(buf) + b"\n"
            buf.clear()
    if buf:
        yield b"\n".join(buf) + b"\n"


class SnapshotStore:
    """A local output directory holding snapshots (see the module docstring for the layout)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.root = Path(directory)

    def _guard(self, action: str, exc: OSError) -> OutputError:
        reason = exc.strerror or type(exc).__name__
        return OutputError(f"{self.root}: cannot {action}: {reason}")

    def write(
        self, snapshot_id: str, records: Iterable[JobRecord], manifest: dict[str, Any]
    ) -> WrittenSnapshot:
        """Write data file, then manifest (with the data file's digest), then LATEST."""
        folder = Path("snapshots") / f"date={_date_of(snapshot_id)}"
        data_rel = folder / f"{snapshot_id}.jsonl"
        manifest_rel = folder / f"{snapshot_id}.manifest.json"
        counted = _Counter(records)
        try:
            sha, size = _atomic_write(self.root / data_rel, _record_lines(counted))
            full = {
                **manifest,
                "snapshot_id": snapshot_id,
                "data": {
                    "path": data_rel.as_posix(),
                    "sha256": sha,
                    "bytes": size,
                    "records": counted.n,
                },
            }
            body = orjson.dumps(full, option=_OPTS | orjson.OPT_INDENT_2) + b"\n"
            _atomic_write(self.root / manifest_rel, [body])
            _atomic_write(self.root / "LATEST", [manifest_rel.as_posix().encode() + b"\n"])
        except OSError as exc:
            raise self._guard("write the snapshot", exc) from exc
        return WrittenSnapshot(
            snapshot_id=snapshot_id,
            data_path=data_rel.as_posix(),
            manifest_path=manifest_rel.as_posix(),
            sha256=sha,
            bytes=size,
            records=counted.n,
        )

    def check_writable(self) -> None:
        """Fail early (before any AWS call) if the output directory cannot be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise self._guard("write to the output directory", exc) from exc

    def latest_manifest(self) -> dict[str, Any] | None:
        """The manifest LATEST points to, or None when there is no snapshot yet."""
        try:
            rel = (self.root / "LATEST").read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise self._guard("read LATEST", exc) from exc
        try:
            manifest: dict[str, Any] = orjson.loads((self.root / rel).read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            raise OutputError(
                f"{self.root}: LATEST points to an unreadable manifest {rel}"
            ) from exc
        return manifest

    def read_records(self, manifest: dict[str, Any]) -> Iterator[JobRecord]:
        """Stream the records of the snapshot described by `manifest`."""
        path = self.root / manifest["data"]["path"]
        try:
            with open(path, "rb") as fh:
                for line in fh:
                    if line.strip():
                        yield JobRecord.from_json_dict(orjson.loads(line))
        except OSError as exc:
            raise self._guard(f"read {manifest['data']['path']}", exc) from exc


class _Counter:
    """Counts records as they stream past on their way to the file."""

    def __init__(self, records: Iterable[JobRecord]) -> None:
        self._records = records
        self.n = 0

    def __iter__(self) -> Iterator[JobRecord]:
        for record in self._records:
            self.n += 1
            yield record
