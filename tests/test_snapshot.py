"""Snapshot: the layout of DESIGN.md, sorted lines, a manifest whose sha256 matches."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import orjson
import pytest

from aggregator.errors import OutputError
from aggregator.records import JobRecord
from aggregator.snapshot import SnapshotStore, new_snapshot_id


def record(job_id: str, account_id: str = "111111111111") -> JobRecord:
    return JobRecord.from_json_dict(
        {
            "account_id": account_id,
            "job_id": job_id,
            "regions": ["eu-west-1"],
            "snapshot_id": "20261128T150000Z-abcd",
            "observed_at": "2026-11-28T15:00:03Z",
        }
    )


def test_layout_manifest_and_latest(tmp_path: Path) -> None:
    """Data, manifest and LATEST land where DESIGN.md says, with a matching digest."""
    store = SnapshotStore(tmp_path)
    written = store.write("20261128T150000Z-abcd", [record("A"), record("B")], {"status": "x"})
    data = tmp_path / "snapshots" / "date=2026-11-28" / "20261128T150000Z-abcd.jsonl"
    manifest_path = data.with_name("20261128T150000Z-abcd.manifest.json")
    assert data.is_file() and manifest_path.is_file()
    assert (tmp_path / "LATEST").read_text().strip() == written.manifest_path
    manifest = orjson.loads(manifest_path.read_bytes())
    assert manifest["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert manifest["data"]["bytes"] == data.stat().st_size
    assert manifest["data"]["records"] == 2
    lines = data.read_bytes().splitlines()
    first = orjson.loads(lines[0])
    assert list(first) == sorted(first)  # keys sorted
    assert store.latest_manifest() == manifest
    assert [r.job_id for r in store.read_records(manifest)] == ["A", "B"]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_unwritable_directory_is_a_clear_error(tmp_path: Path) -> None:
    """A directory we cannot write gives OutputError naming it, before any work."""
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("not a directory")
        store = SnapshotStore(blocker / "out")
    else:  # pragma: no cover - depends on who runs the tests
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        store = SnapshotStore(ro / "out")
    with pytest.raises(OutputError, match="cannot write"):
        store.check_writable()


def test_snapshot_ids_sort_by_time() -> None:
    """Snapshot ids start with the UTC start time, so they sort chronologically."""
    from datetime import UTC, datetime

    a = new_snapshot_id(datetime(2026, 11, 28, 15, 0, 0, tzinfo=UTC))
    b = new_snapshot_id(datetime(2026, 11, 28, 15, 0, 1, tzinfo=UTC))
    assert a.startswith("20261128T150000Z-") and a < b
