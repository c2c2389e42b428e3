"""Change events: the rules of changes.py on hand-made snapshots, a property test against a
reference model, and the exact events of a sandbox driven through changes between runs."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import io
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import snapshot
from aggregator.changes import (
    Batch,
    ChangeEvent,
    NewBatch,
    UnreadableLine,
    UnsortedError,
    batch_of_dicts,
    batch_of_records,
    diff,
    diff_lines,
    encode_events,
)
from aggregator.errors import OutputError
from aggregator.records import JobRecord
from aggregator.sandbox import Faults
from aggregator.service import run_once
from aggregator.snapshot import diff_command, open_store

from .conftest import SandboxFactory, make_settings

A = "111111111111"
B = "222222222222"
OLD_ID = "20261128T150000Z-aaaa"
NEW_ID = "20261128T151500Z-bbbb"
OLD_SEEN = "2026-11-28T15:00:05Z"
NEW_SEEN = "2026-11-28T15:15:05Z"
NEW_STARTED = "2026-11-28T15:15:00Z"


def rec(
    job_id: str,
    state: str | None = "New",
    *,
    account: str = A,
    regions: Sequence[str] = ("eu-west-1",),
    stale: bool = False,
    seen: str = OLD_SEEN,
) -> dict[str, Any]:
    return {
        "account_id": account,
        "job_id": job_id,
        "job_state": state,
        "regions": list(regions),
        "stale": stale,
        "observed_at": seen,
        "last_seen": seen,
    }


def manifest(
    snapshot_id: str,
    *,
    ok: Sequence[tuple[str, str]] = ((A, "eu-west-1"),),
    failed: Sequence[tuple[str, str]] = (),
    skipped: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    status = [(a, r, "ok") for a, r in ok] + [(a, r, "failed") for a, r in failed]
    status += [(a, r, "skipped") for a, r in skipped]
    return {
        "snapshot_id": snapshot_id,
        "started_at": NEW_STARTED if snapshot_id == NEW_ID else "2026-11-28T15:00:00Z",
        "partition_status": [{"account_id": a, "region": r, "status": s} for a, r, s in status],
    }


async def batches(records: Sequence[dict[str, Any]], size: int) -> AsyncIterator[Batch]:
    for start in range(0, len(records), size):
        yield batch_of_dicts(records[start : start + size])


async def events(
    old: Sequence[dict[str, Any]],
    new: Sequence[dict[str, Any]],
    old_manifest: dict[str, Any] | None,
    new_manifest: dict[str, Any],
    *,
    size: int = 1000,
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async for batch in diff(
        batches(old, size),
        batches(new, size),
        old_manifest=old_manifest,
        new_manifest=new_manifest,
    ):
        out.extend(e.to_json_dict() for e in batch)
    return out


def ev(
    event: str,
    job_id: str,
    frm: str | None,
    to: str | None,
    at: str,
    before: str | None,
    *,
    account: str = A,
    previous: str | None = OLD_ID,
) -> dict[str, Any]:
    return {
        "account_id": account,
        "event": event,
        "from_state": frm,
        "job_id": job_id,
        "observed_at": at,
        "previous_observed_at": before,
        "previous_snapshot_id": previous,
        "snapshot_id": NEW_ID,
        "to_state": to,
    }


async def test_an_event_is_never_observed_before_the_last_sighting() -> None:
    """The older snapshot saw the jobs after the newer one started (it was published while the
    newer one discovered accounts, or the clock stepped back): a removal or a job going stale
    is observed at that last sighting, not before it, so ordering a job's events by time
    keeps them in order; a later sighting keeps its own time."""
    late = "2026-11-28T15:16:00Z"  # after NEW_STARTED
    old = [rec("J1", seen=late), rec("J2", seen=late), rec("J3", seen=OLD_SEEN)]
    new_manifest = manifest(NEW_ID, ok=(), failed=[(A, "eu-west-1")])
    stale = [rec("J2", stale=True, seen=late), rec("J3", stale=True, seen=OLD_SEEN)]
    got = await events(old, stale, manifest(OLD_ID), new_manifest)
    assert got == [
        ev("job_went_stale", "J2", "New", "New", late, late),
        ev("job_went_stale", "J3", "New", "New", NEW_STARTED, OLD_SEEN),
    ]
    got = await events(old, [], manifest(OLD_ID), manifest(NEW_ID))
    assert [(e["job_id"], e["observed_at"]) for e in got] == [
        ("J1", late),
        ("J2", late),
        ("J3", NEW_STARTED),
    ]


async def test_first_snapshot_adds_every_job() -> None:
    """With no older snapshot every job is `job_added`, with no previous snapshot id."""
    new = [rec("J1", seen=NEW_SEEN), rec("J2", "Complete", seen=NEW_SEEN)]
    got = await events([], new, None, manifest(NEW_ID))
    assert got == [
        ev("job_added", "J1", None, "New", NEW_SEEN, None, previous=None),
        ev("job_added", "J2", None, "Complete", NEW_SEEN, None, previous=None),
    ]


async def test_each_event_between_adjacent_snapshots() -> None:
    """Added, state changed, removed, went stale; unchanged jobs and jobs of a partition
    that failed now produce no removal."""
    old = [
        rec("J1"),  # unchanged
        rec("J2"),  # state changes
        rec("J3"),  # removed (eu-west-1 ok in both)
        rec("K1", account=B),  # its partition fails: carried forward stale
        rec("K2", account=B),  # its partition fails and it is not carried: no removal
    ]
    new = [
        rec("J1", seen=NEW_SEEN),
        rec("J2", "InTransitToCustomer", seen=NEW_SEEN),
        rec("J4", seen=NEW_SEEN),  # added
        rec("K1", account=B, stale=True),
    ]
    old_m = manifest(OLD_ID, ok=[(A, "eu-west-1"), (B, "eu-west-1")])
    new_m = manifest(NEW_ID, ok=[(A, "eu-west-1")], failed=[(B, "eu-west-1")])
    assert await events(old, new, old_m, new_m) == [
        ev("state_changed", "J2", "New", "InTransitToCustomer", NEW_SEEN, OLD_SEEN),
        ev("job_removed", "J3", "New", None, NEW_STARTED, OLD_SEEN),
        ev("job_added", "J4", None, "New", NEW_SEEN, None),
        ev("job_went_stale", "K1", "New", "New", NEW_STARTED, OLD_SEEN, account=B),
    ]


async def test_recovery_and_a_change_seen_on_recovery() -> None:
    """A stale job read again is `job_recovered`, then `state_changed` if its state moved;
    a stale job gone once its partition answers is `job_removed`."""
    old = [
        rec("J1", stale=True),
        rec("J2", stale=True),
        rec("J3", stale=True),
    ]
    new = [rec("J1", seen=NEW_SEEN), rec("J2", "Complete", seen=NEW_SEEN)]
    old_m = manifest(OLD_ID, ok=[], failed=[(A, "eu-west-1")])
    assert await events(old, new, old_m, manifest(NEW_ID)) == [
        ev("job_recovered", "J1", "New", "New", NEW_SEEN, OLD_SEEN),
        ev("job_recovered", "J2", "New", "Complete", NEW_SEEN, OLD_SEEN),
        ev("state_changed", "J2", "New", "Complete", NEW_SEEN, OLD_SEEN),
        ev("job_removed", "J3", "New", None, NEW_STARTED, OLD_SEEN),
    ]


US = ("us-east-1", "us-west-2")


@pytest.mark.parametrize(
    ("new_status", "removed"),
    [
        ({"ok": [(A, "us-west-2")], "failed": [(A, "us-east-1")]}, True),
        ({"ok": [(A, "us-east-2")], "failed": [(A, "us-east-1"), (A, "us-west-2")]}, True),
        ({"ok": [], "failed": [(A, "us-east-1"), (A, "us-west-2")]}, False),
        ({"ok": [(B, "us-east-1")], "failed": [(A, "us-east-1"), (A, "us-west-2")]}, False),
        ({"ok": [(A, "eu-west-1")], "skipped": [(A, "us-east-1"), (A, "us-west-2")]}, False),
        ({"ok": [(A, "eu-west-1")]}, True),  # US regions no longer queried: out of scope
    ],
    ids=["one-us-ok", "other-us-ok", "all-us-failed", "other-account", "skipped", "unplanned"],
)
async def test_us_jobs_are_removed_when_any_us_region_answered(
    new_status: dict[str, Any], removed: bool
) -> None:
    """Any US region of the account that succeeded makes the US listing authoritative."""
    old = [rec("U1", regions=US)]
    old_m = manifest(OLD_ID, ok=[(A, "us-east-1"), (A, "us-west-2")])
    got = await events(old, [], old_m, manifest(NEW_ID, **new_status))
    assert got == ([ev("job_removed", "U1", "New", None, NEW_STARTED, OLD_SEEN)] if removed else [])


async def test_removal_needs_the_partition_ok_in_the_older_snapshot_too() -> None:
    """A fresh record whose partition the older manifest does not show as ok is not removed."""
    old = [rec("J1")]
    old_m = manifest(OLD_ID, ok=[])
    assert await events(old, [], old_m, manifest(NEW_ID)) == []


async def test_non_adjacent_snapshots_can_add_a_stale_job() -> None:
    """Between distant snapshots a job can appear already stale: added, then went stale."""
    new = [rec("J1", "WithCustomer", stale=True, seen="2026-11-28T15:07:00Z")]
    got = await events([], new, manifest(OLD_ID, ok=[]), manifest(NEW_ID, ok=[]))
    assert got == [
        ev("job_added", "J1", None, "WithCustomer", "2026-11-28T15:07:00Z", None),
        ev(
            "job_went_stale",
            "J1",
            "WithCustomer",
            "WithCustomer",
            NEW_STARTED,
            "2026-11-28T15:07:00Z",
        ),
    ]


async def test_unknown_and_absent_states_are_compared_verbatim() -> None:
    """A state unknown to the SDK, or absent (null), is a state like any other."""
    old = [rec("J1", None), rec("J2", "New")]
    new = [rec("J1", "FutureState", seen=NEW_SEEN), rec("J2", None, seen=NEW_SEEN)]
    assert await events(old, new, manifest(OLD_ID), manifest(NEW_ID)) == [
        ev("state_changed", "J1", None, "FutureState", NEW_SEEN, OLD_SEEN),
        ev("state_changed", "J2", "New", None, NEW_SEEN, OLD_SEEN),
    ]


@pytest.mark.parametrize("side", ["older", "newer"])
async def test_unsorted_input_is_refused_naming_the_side(side: str) -> None:
    """Out-of-order records cannot be merged: UnsortedError says which snapshot."""
    bad = [rec("J2"), rec("J1")]
    good = [rec("J1"), rec("J2")]
    old, new = (bad, good) if side == "older" else (good, bad)
    with pytest.raises(UnsortedError) as info:
        await events(old, new, manifest(OLD_ID), manifest(NEW_ID), size=1)
    assert info.value.side == side


def test_encoded_events_are_sorted_json_lines() -> None:
    """One event per line, keys sorted, strings that look like boundaries kept intact."""
    tricky = 'x"},{"account_id":"y\n\\'
    e = ChangeEvent(A, "state_changed", tricky, "J1", NEW_SEEN, OLD_SEEN, OLD_ID, NEW_ID, "é")
    body = encode_events([e, e._replace(job_id="J2")])
    lines = body.splitlines()
    assert len(lines) == 2 and body.endswith(b"\n")
    first = orjson.loads(lines[0])
    assert list(first) == sorted(first) and first == e.to_json_dict()
    assert encode_events([]) == b""


# Strings that an encoder splitting at `},{"account_id":` could get wrong.
TRICKY = [
    'x"},{"account_id":"y',
    'line\nbreak \\ back\\slash "quoted" },{ \u2028 é \U0001f680',
    "",
    '"previous_observed_at":null,"to_state":',
]


@pytest.mark.parametrize("previous_id", [None, OLD_ID])
async def test_first_snapshot_events_are_encoded_as_encode_events_does(
    previous_id: str | None,
) -> None:
    """The `job_added` events of fresh records, encoded in bulk by `diff_lines`, are byte for
    byte what `encode_events` writes, whatever the strings hold (a None state, no regions)."""
    new = [
        as_record(rec(f"J{i}{text}", state, account=account), NEW_ID, description=text)
        for i, (account, text, state) in enumerate(
            (account, text, state)
            for account in (A, B + TRICKY[0])
            for text in TRICKY
            for state in ("New", None, TRICKY[1])
        )
    ]
    new = sorted(
        (r._replace(regions=()) if i % 2 else r for i, r in enumerate(new)),
        key=lambda r: (r.account_id, r.job_id),
    )
    want = encode_events(
        [
            ChangeEvent(
                r.account_id,
                "job_added",
                None,
                r.job_id,
                r.last_seen,
                None,
                previous_id,
                NEW_ID,
                r.job_state,
            )
            for r in new
        ]
    )
    old_m = None if previous_id is None else manifest(OLD_ID)
    for size in (1, 5, 1000):
        body, counts = await compared([], new, old_m, manifest(NEW_ID), new_size=size)
        assert body == want
        assert counts == {"job_added": len(new)}


# --- a reference model, and a property test against it -------------------------------------

STATES = ["New", "WithCustomer", "Complete", None]
ACCOUNTS = [A, B]
REGIONS = ["eu-west-1", "us-east-1", "us-west-2"]


def reference(
    old: list[dict[str, Any]],
    new: list[dict[str, Any]],
    old_m: dict[str, Any] | None,
    new_m: dict[str, Any],
) -> list[dict[str, Any]]:
    """The rules of changes.py written the obvious way (dicts, no streaming)."""

    def ok(m: dict[str, Any] | None, account: str, regions: list[str]) -> bool:
        good = {
            (p["account_id"], p["region"])
            for p in (m or {}).get("partition_status", [])
            if p["status"] == "ok"
        }
        us = {a for a, r in good if r.startswith("us-")}
        return any(account in us if r.startswith("us-") else (account, r) in good for r in regions)

    def queried(m: dict[str, Any], account: str, regions: list[str]) -> bool:
        planned = {(p["account_id"], p["region"]) for p in m["partition_status"]}
        us = {a for a, r in planned if r.startswith("us-")}
        return any(
            account in us if r.startswith("us-") else (account, r) in planned for r in regions
        )

    prev = old_m["snapshot_id"] if old_m else None
    started = new_m["started_at"]
    olds = {(r["account_id"], r["job_id"]): r for r in old}
    news = {(r["account_id"], r["job_id"]): r for r in new}
    out = []

    def add(kind: str, key: tuple[str, str], frm: Any, to: Any, at: str, before: Any) -> None:
        out.append(
            {
                "account_id": key[0],
                "event": kind,
                "from_state": frm,
                "job_id": key[1],
                "observed_at": max(at, before or at),  # never before the last sighting
                "previous_observed_at": before,
                "previous_snapshot_id": prev,
                "snapshot_id": new_m["snapshot_id"],
                "to_state": to,
            }
        )

    for key in sorted(olds.keys() | news.keys()):
        o, n = olds.get(key), news.get(key)
        if o is None:
            assert n is not None
            add("job_added", key, None, n["job_state"], n["last_seen"], None)
            if n["stale"]:
                add("job_went_stale", key, n["job_state"], n["job_state"], started, n["last_seen"])
        elif n is None:
            authoritative = ok(new_m, key[0], o["regions"]) and (
                o["stale"] or ok(old_m, key[0], o["regions"])
            )
            if authoritative or not queried(new_m, key[0], o["regions"]):
                add("job_removed", key, o["job_state"], None, started, o["last_seen"])
        else:
            frm, to, before = o["job_state"], n["job_state"], o["last_seen"]
            if o["stale"] and not n["stale"]:
                add("job_recovered", key, frm, to, n["last_seen"], before)
            if frm != to:
                add("state_changed", key, frm, to, n["last_seen"], before)
            if n["stale"] and not o["stale"]:
                add("job_went_stale", key, frm, to, started, before)
    return out


job = st.fixed_dictionaries(
    {
        "state": st.sampled_from(STATES),
        "stale": st.booleans(),
        "region": st.sampled_from(REGIONS),
    }
)
side = st.dictionaries(
    st.tuples(st.sampled_from(ACCOUNTS), st.integers(0, 30).map(lambda i: f"J{i:03d}")),
    job,
    max_size=40,
)
status = st.dictionaries(
    st.tuples(st.sampled_from(ACCOUNTS), st.sampled_from(REGIONS)),
    st.sampled_from(["ok", "failed", "skipped"]),
)


def records(jobs: dict[tuple[str, str], dict[str, Any]], seen: str) -> list[dict[str, Any]]:
    return [
        rec(k[1], v["state"], account=k[0], regions=[v["region"]], stale=v["stale"], seen=seen)
        for k, v in sorted(jobs.items())
    ]


def manifest_of(snapshot_id: str, statuses: dict[tuple[str, str], str]) -> dict[str, Any]:
    return {
        "snapshot_id": snapshot_id,
        "started_at": NEW_STARTED,
        "partition_status": [
            {"account_id": a, "region": r, "status": s} for (a, r), s in sorted(statuses.items())
        ],
    }


@settings(max_examples=150, deadline=None)
@given(
    old=side,
    new=side,
    old_status=status,
    new_status=status,
    size=st.sampled_from([1, 2, 3, 7, 16]),
    first=st.booleans(),
)
async def test_streaming_diff_matches_the_reference_model(
    old: dict[tuple[str, str], dict[str, Any]],
    new: dict[tuple[str, str], dict[str, Any]],
    old_status: dict[tuple[str, str], str],
    new_status: dict[tuple[str, str], str],
    size: int,
    first: bool,
) -> None:
    """Whatever the jobs, partitions and batch sizes, the merge gives the reference events,
    and the same pair of snapshots always gives the same events."""
    old_records = [] if first else records(old, OLD_SEEN)
    old_m = None if first else manifest_of(OLD_ID, old_status)
    new_records = records(new, NEW_SEEN)
    new_m = manifest_of(NEW_ID, new_status)
    want = reference(old_records, new_records, old_m, new_m)
    assert await events(old_records, new_records, old_m, new_m, size=size) == want
    assert await events(old_records, new_records, old_m, new_m, size=1000) == want


@settings(max_examples=100, deadline=None)
@given(
    count=st.integers(0, 300),
    edits=st.lists(
        st.tuples(st.integers(0, 299), st.sampled_from(["state", "stale", "remove", "add"])),
        max_size=12,
    ),
    old_size=st.sampled_from([1, 5, 16, 64, 1000]),
    new_size=st.sampled_from([1, 7, 32, 128, 1000]),
)
async def test_long_unchanged_runs_match_the_reference_model(
    count: int, edits: list[tuple[int, str]], old_size: int, new_size: int
) -> None:
    """Mostly unchanged snapshots with a few edits anywhere (the common case, where runs of
    unchanged jobs are skipped in bulk) give the reference events, whatever the batching."""
    fresh = {"state": "New", "stale": False, "region": "eu-west-1"}
    old = {(A, f"J{i:04d}"): dict(fresh) for i in range(count)}
    new = {k: dict(v) for k, v in old.items()}
    for index, edit in edits:
        key = (A, f"J{index:04d}")
        if edit == "add":
            new[(A, f"J{index:04d}x")] = dict(fresh)
        elif key in new:
            if edit == "remove":
                del new[key]
            elif edit == "state":
                new[key]["state"] = "Moved"
            else:
                new[key]["stale"] = True
    statuses = {(A, "eu-west-1"): "ok"}
    old_records = records(old, OLD_SEEN)
    new_records = records(new, NEW_SEEN)
    old_m, new_m = manifest_of(OLD_ID, statuses), manifest_of(NEW_ID, statuses)
    want = reference(old_records, new_records, old_m, new_m)
    got: list[dict[str, Any]] = []
    async for batch in diff(
        batches(old_records, old_size),
        batches(new_records, new_size),
        old_manifest=old_m,
        new_manifest=new_m,
    ):
        got.extend(e.to_json_dict() for e in batch)
    assert got == want


# --- the store's comparison: lines of the older file against the records being written -----

STYLES = ["canonical", "canonical", "canonical", "spaced", "unsorted", "minimal", "crlf"]


def as_record(d: dict[str, Any], snapshot_id: str, description: str | None = None) -> JobRecord:
    record = JobRecord.from_json_dict({**d, "snapshot_id": snapshot_id})
    return record._replace(description=description)


def old_line(d: dict[str, Any], style: str, description: str | None = None) -> bytes:
    """One line of an older data file, as this tool writes it or as another writer might."""
    fields = as_record(d, OLD_ID, description).to_json_dict()
    if style == "canonical":
        return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS) + b"\n"
    if style == "spaced":
        return json.dumps(fields, sort_keys=True).encode() + b"\n"
    if style == "unsorted":
        return orjson.dumps(dict(reversed(fields.items()))) + b"\n"
    if style == "minimal":  # what the comparison needs (defaults for the rest), no newline
        keep = ("account_id", "job_id", "job_state", "observed_at", "regions")
        return orjson.dumps({k: fields[k] for k in keep} | ({"stale": True} if d["stale"] else {}))
    assert style == "crlf"
    return orjson.dumps(fields, option=orjson.OPT_SORT_KEYS) + b"\r\n"


async def old_lines(lines: list[bytes], size: int) -> AsyncIterator[list[bytes]]:
    for start in range(0, len(lines), size):
        yield lines[start : start + size]


async def new_batches(new: list[JobRecord], size: int) -> AsyncIterator[NewBatch]:
    for start in range(0, len(new), size):
        batch = new[start : start + size]
        yield NewBatch(batch, snapshot._frame_records(batch))


async def compared(
    old: list[bytes],
    new: list[JobRecord],
    old_m: dict[str, Any] | None,
    new_m: dict[str, Any],
    *,
    old_size: int = 1000,
    new_size: int = 1000,
) -> tuple[bytes, dict[str, int]]:
    """The change file `diff_lines` gives, and its counts."""
    body, counts = b"", dict.fromkeys(("job_added", "job_removed"), 0)
    async for chunk, found in diff_lines(
        old_lines(old, old_size), new_batches(new, new_size), old_manifest=old_m, new_manifest=new_m
    ):
        body += chunk
        for kind, n in found.items():
            counts[kind] = counts.get(kind, 0) + n
    return body, {k: n for k, n in counts.items() if n}


async def decoded(
    old: list[bytes], new: list[JobRecord], old_m: dict[str, Any] | None, new_m: dict[str, Any]
) -> bytes:
    """The change file `diff` gives from the same snapshots, every line decoded."""

    async def old_batches() -> AsyncIterator[Batch]:
        yield batch_of_dicts([orjson.loads(line) for line in old])

    async def new_records() -> AsyncIterator[Batch]:
        yield batch_of_records(new)

    body = b""
    async for batch in diff(old_batches(), new_records(), old_manifest=old_m, new_manifest=new_m):
        body += encode_events(batch)
    return body


def counted(body: bytes) -> dict[str, int]:
    return dict(collections.Counter(orjson.loads(line)["event"] for line in body.splitlines()))


@settings(max_examples=150, deadline=None)
@given(
    old=side,
    new=side,
    old_status=status,
    new_status=status,
    styles=st.lists(st.sampled_from(STYLES), min_size=40, max_size=40),
    described=st.lists(st.sampled_from([None, "a", "b", 'x","job_type":"y'])),
    old_size=st.sampled_from([1, 2, 7, 1000]),
    new_size=st.sampled_from([1, 3, 16, 1000]),
    first=st.booleans(),
)
async def test_line_comparison_gives_the_events_of_diff(
    old: dict[tuple[str, str], dict[str, Any]],
    new: dict[tuple[str, str], dict[str, Any]],
    old_status: dict[tuple[str, str], str],
    new_status: dict[tuple[str, str], str],
    styles: list[str],
    described: list[str | None],
    old_size: int,
    new_size: int,
    first: bool,
) -> None:
    """Comparing the older file's lines with the records being written gives the bytes that
    decoding every line and `diff` give, whatever the writer of the older lines (key order,
    spacing, missing fields, CRLF), the fields that do not matter (description) and the
    batching; and so the reference events."""
    old_records = [] if first else records(old, OLD_SEEN)
    old_m = None if first else manifest_of(OLD_ID, old_status)
    new_m = manifest_of(NEW_ID, new_status)
    lines = [
        old_line(d, styles[i], described[i] if i < len(described) else None)
        for i, d in enumerate(old_records)
    ]
    new_records = [as_record(d, NEW_ID) for d in records(new, NEW_SEEN)]
    body, counts = await compared(
        lines, new_records, old_m, new_m, old_size=old_size, new_size=new_size
    )
    assert body == await decoded(lines, new_records, old_m, new_m)
    assert [orjson.loads(line) for line in body.splitlines()] == reference(
        old_records, records(new, NEW_SEEN), old_m, new_m
    )
    assert counts == counted(body)


@settings(max_examples=100, deadline=None)
@given(
    count=st.integers(0, 600),
    edits=st.lists(
        st.tuples(
            st.integers(0, 599),
            st.sampled_from(["state", "stale", "recover", "remove", "add", "describe"]),
        ),
        max_size=12,
    ),
    old_size=st.sampled_from([1, 5, 64, 1000]),
    new_size=st.sampled_from([1, 7, 128, 1000]),
)
async def test_line_comparison_over_long_unchanged_runs(
    count: int, edits: list[tuple[int, str]], old_size: int, new_size: int
) -> None:
    """Mostly unchanged snapshots (runs of lines that match their records, found in C) with a
    few edits anywhere give the events of `diff`, whatever the batching."""
    old = {(A, f"J{i:04d}"): {"state": "New", "stale": i % 97 == 5} for i in range(count)}
    new = {k: dict(v) for k, v in old.items()}
    described: dict[tuple[str, str], str] = {}
    for index, edit in edits:
        key = (A, f"J{index:04d}")
        if edit == "add":
            new[(A, f"J{index:04d}x")] = {"state": "New", "stale": False}
        elif key in new:
            if edit == "remove":
                del new[key]
            elif edit == "state":
                new[key]["state"] = "Moved"
            elif edit == "describe":
                described[key] = "changed"
            else:
                new[key]["stale"] = edit == "stale"
    statuses = {(A, "eu-west-1"): "ok"}
    old_m, new_m = manifest_of(OLD_ID, statuses), manifest_of(NEW_ID, statuses)

    def rows(jobs: dict[tuple[str, str], dict[str, Any]], seen: str) -> list[dict[str, Any]]:
        return [
            rec(k[1], v["state"], account=k[0], stale=v["stale"], seen=seen)
            for k, v in sorted(jobs.items())
        ]

    lines = [old_line(d, "canonical") for d in rows(old, OLD_SEEN)]
    new_records = [
        as_record(d, NEW_ID, described.get((d["account_id"], d["job_id"])))
        for d in rows(new, NEW_SEEN)
    ]
    body, counts = await compared(
        lines, new_records, old_m, new_m, old_size=old_size, new_size=new_size
    )
    assert body == await decoded(lines, new_records, old_m, new_m)
    assert counts == counted(body)


@pytest.mark.parametrize("side", ["older", "newer"])
async def test_line_comparison_refuses_unsorted_input_naming_the_side(side: str) -> None:
    """Out-of-order lines or records raise UnsortedError naming the snapshot, in runs of
    matching lines as well as where they differ."""
    jobs = [rec(f"J{i}", seen=NEW_SEEN) for i in range(6)]
    good = [as_record(d, NEW_ID) for d in jobs]
    order = (0, 1, 3, 2, 4, 5)  # lines that match their records, out of order
    bad = [good[i] for i in order]
    lines = [old_line(d, "canonical") for d in jobs]
    old, new = ([lines[i] for i in order], good) if side == "older" else (lines, bad)
    with pytest.raises(UnsortedError) as info:
        await compared(old, new, manifest(OLD_ID), manifest(NEW_ID), old_size=2, new_size=3)
    assert info.value.side == side
    with pytest.raises(UnsortedError) as info:  # every record added: the bulk path
        await compared([], bad if side == "newer" else good[::-1], None, manifest(NEW_ID))
    assert info.value.side == "newer"


@pytest.mark.parametrize("line", [b"not json\n", b"[1, 2]\n", b'{"job_id": "J1"}\n', b"{}\n"])
async def test_a_line_that_is_not_a_record_is_unreadable(line: bytes) -> None:
    """A line that does not match its record and cannot be decoded as one raises
    UnreadableLine (the store then skips the change file)."""
    new = [as_record(rec("J1", seen=NEW_SEEN), NEW_ID)]
    with pytest.raises(UnreadableLine):
        await compared([line], new, manifest(OLD_ID), manifest(NEW_ID))


# --- end to end: the sandbox driven through changes between runs ---------------------------

RUN_REGIONS = ["eu-west-1", "us-east-1", "us-west-2"]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


def read_json(path: Any) -> Any:
    return orjson.loads(Path(path).read_bytes())


def change_file(summary: Any) -> list[dict[str, Any]]:
    manifest = read_json(summary.manifest_path)
    return read_jsonl(Path(summary.output) / manifest["changes"]["path"])


async def test_sandbox_changes_between_runs_give_the_exact_events(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """State changes, additions, removals and a failed account between runs: exactly the
    expected events, no removal while the account fails, and the backlog once it recovers."""
    ok_account, failing = "200000000000", "200000000001"
    counts = {
        (ok_account, "eu-west-1"): 4,
        (ok_account, "us-east-1"): 3,
        (failing, "eu-west-1"): 3,
        (failing, "us-west-2"): 2,
    }
    sb = await make_sandbox(
        accounts=3, seed=21, max_jobs=6, regions=tuple(RUN_REGIONS), jobs=counts
    )
    settings = make_settings(sb.account_ids, regions={"names": RUN_REGIONS})

    first = await run_once(settings, output=tmp_path)
    assert first.status == "complete"
    added = change_file(first)
    assert [e["event"] for e in added] == ["job_added"] * first.jobs
    assert all(e["previous_snapshot_id"] is None for e in added)
    snap1 = {(r["account_id"], r["job_id"]): r for r in read_jsonl(Path(first.data_path))}

    def jobs_of(account: str) -> list[str]:
        return sorted(j for a, j in snap1 if a == account)

    moved, gone = jobs_of(ok_account)[:2]
    us_gone = next(
        j
        for (a, j), r in snap1.items()
        if a == ok_account and "us-east-1" in r["regions"] and j not in (moved, gone)
    )
    f_moved, f_gone = jobs_of(failing)[:2]
    sb.set_job_state(ok_account, moved, "FutureState")
    sb.remove_job(ok_account, gone)
    sb.remove_job(ok_account, us_gone)
    new_job = sb.add_job(ok_account, "us-west-2", job_id="JIDadded-0001", job_state="New")
    sb.set_job_state(failing, f_moved, "Complete")
    sb.remove_job(failing, f_gone)
    sb.faults = dataclasses.replace(sb.faults, deny_list_jobs=frozenset({failing}))

    second = await run_once(settings, output=tmp_path)
    assert second.status == "partial"
    m2 = read_json(second.manifest_path)
    snap2 = {(r["account_id"], r["job_id"]): r for r in read_jsonl(Path(second.data_path))}

    def event(
        kind: str, account: str, job_id: str, frm: Any, to: Any, at: str, before: Any
    ) -> dict[str, Any]:
        return {
            "account_id": account,
            "event": kind,
            "from_state": frm,
            "job_id": job_id,
            "observed_at": at,
            "previous_observed_at": before,
            "previous_snapshot_id": first.snapshot_id,
            "snapshot_id": second.snapshot_id,
            "to_state": to,
        }

    started2 = m2["started_at"]
    expected2 = []
    for key in sorted(snap1.keys() | snap2.keys()):
        account, job_id = key
        old, new = snap1.get(key), snap2.get(key)
        if job_id == moved and account == ok_account:
            assert old and new
            state, seen = old["job_state"], old["last_seen"]
            expected2.append(
                event("state_changed", *key, state, "FutureState", new["last_seen"], seen)
            )
        elif job_id in (gone, us_gone) and account == ok_account:
            assert old and not new
            expected2.append(
                event("job_removed", *key, old["job_state"], None, started2, old["last_seen"])
            )
        elif job_id == new_job:
            assert new and not old
            expected2.append(event("job_added", *key, None, "New", new["last_seen"], None))
        elif account == failing:
            assert old and new and new["stale"], "carried forward, not removed"
            state, seen = old["job_state"], old["last_seen"]
            expected2.append(event("job_went_stale", *key, state, state, started2, seen))
    assert change_file(second) == expected2
    assert m2["changes"]["counts"] == {
        "job_added": 1,
        "job_recovered": 0,
        "state_changed": 1,
        "job_went_stale": len(jobs_of(failing)),
        "job_removed": 2,
    }

    sb.faults = dataclasses.replace(sb.faults, deny_list_jobs=frozenset())
    third = await run_once(settings, output=tmp_path)
    assert third.status == "complete"
    m3 = read_json(third.manifest_path)
    snap3 = {(r["account_id"], r["job_id"]): r for r in read_jsonl(Path(third.data_path))}
    got3 = [(e["event"], e["job_id"], e["from_state"], e["to_state"]) for e in change_file(third)]
    want3 = []
    for job_id in jobs_of(failing):
        old = snap2[(failing, job_id)]
        if job_id == f_gone:
            want3.append(("job_removed", job_id, old["job_state"], None))
            continue
        now = snap3[(failing, job_id)]["job_state"]
        want3.append(("job_recovered", job_id, old["job_state"], now))
        if job_id == f_moved:
            want3.append(("state_changed", job_id, old["job_state"], "Complete"))
    assert got3 == want3
    assert all(e["previous_snapshot_id"] == second.snapshot_id for e in change_file(third))
    assert m3["previous_snapshot_id"] == second.snapshot_id

    # `diff A B` gives the events of the change file for adjacent snapshots, and the same
    # events every time for any pair.
    out = io.BytesIO()
    assert await diff_command(tmp_path, first.snapshot_id, second.snapshot_id, out=out) == 0
    assert read_jsonl_bytes(out.getvalue()) == expected2
    spans = []
    for _ in range(2):
        out = io.BytesIO()
        await diff_command(tmp_path, first.snapshot_id, "latest", out=out)
        spans.append(out.getvalue())
    assert spans[0] == spans[1]
    across = read_jsonl_bytes(spans[0])
    assert {(e["event"], e["job_id"]) for e in across} >= {
        ("state_changed", moved),
        ("job_removed", gone),
        ("job_added", new_job),
        ("state_changed", f_moved),
        ("job_removed", f_gone),
    }
    assert not [e for e in across if e["event"] in ("job_went_stale", "job_recovered")]


def read_jsonl_bytes(body: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in body.splitlines() if line]


async def test_a_diff_that_skips_snapshots_turns_the_older_into_the_newer(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """S1 has job J; J is deleted and S2 (partition ok) removes it; in S3 J's partition fails.
    `diff S1 latest` (a consumer catching up) says J was removed, although S3's partition
    failed: S3 carried forward all S2 held, so J went in between. Without it, the consumer
    kept J for ever (no later diff mentions it). The consecutive S2 -> S3 has no removal."""
    sb = await make_sandbox(accounts=2, seed=12, max_jobs=6, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    first = await run_once(settings, output=tmp_path)
    account, job = next((j["account_id"], j["job_id"]) for j in sb.truth())
    sb.remove_job(account, job)
    second = await run_once(settings, output=tmp_path)
    assert second.status == "complete"
    assert [(e["event"], e["job_id"]) for e in change_file(second)] == [("job_removed", job)]
    sb.faults = dataclasses.replace(sb.faults, deny_list_jobs=frozenset({account}))
    third = await run_once(settings, output=tmp_path)
    assert third.status == "partial"
    assert {e["event"] for e in change_file(third)} == {"job_went_stale"}

    out = io.BytesIO()
    assert await diff_command(tmp_path, first.snapshot_id, "latest", out=out) == 0
    events = read_jsonl_bytes(out.getvalue())
    assert ("job_removed", job) in [(e["event"], e["job_id"]) for e in events]
    # S1 with these events applied is S3: the same jobs, in the same states.
    jobs = {(r["account_id"], r["job_id"]): r["job_state"] for r in read_jsonl(first.data_path)}
    for e in events:
        key = (e["account_id"], e["job_id"])
        if e["event"] == "job_removed":
            del jobs[key]
        else:
            jobs[key] = e["to_state"]
    latest = {(r["account_id"], r["job_id"]): r["job_state"] for r in read_jsonl(third.data_path)}
    assert jobs == latest


async def test_jobs_of_a_region_no_longer_queried_are_removed_and_added_back(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """A region (or account) left out of the plan takes its jobs out of the snapshot with a
    `job_removed` each, and back with a `job_added` each: the events of consecutive snapshots
    always turn the older into the newer."""
    regions = ("ap-southeast-2", "eu-west-1")
    sb = await make_sandbox(accounts=2, seed=11, max_jobs=6, regions=regions)
    both = make_settings(sb.account_ids, regions={"names": list(regions)})
    one = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    dropped = {
        (j["account_id"], j["job_id"]) for j in sb.truth() if "ap-southeast-2" in j["regions"]
    }
    assert dropped
    summaries = [await run_once(s, output=tmp_path) for s in (both, one, both)]
    keys = [
        {(r["account_id"], r["job_id"]) for r in read_jsonl(Path(s.data_path))} for s in summaries
    ]
    assert keys[0] - keys[1] == dropped and keys[2] == keys[0]
    for older, newer, summary in zip(keys[:-1], keys[1:], summaries[1:], strict=True):
        events = change_file(summary)
        removed = {(e["account_id"], e["job_id"]) for e in events if e["event"] == "job_removed"}
        added = {(e["account_id"], e["job_id"]) for e in events if e["event"] == "job_added"}
        assert (older - removed) | added == newer
    assert {e["event"] for e in change_file(summaries[1])} == {"job_removed"}


async def test_a_failed_first_partition_then_recovery_adds_its_jobs(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """An account that fails in the very first run has nothing to carry: its jobs are
    `job_added` when it first answers, never removed or recovered."""
    sb = await make_sandbox(accounts=2, seed=4, max_jobs=5, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    sb.faults = Faults(deny_list_jobs=frozenset({sb.account_ids[1]}))
    first = await run_once(settings, output=tmp_path)
    assert first.status == "partial"
    assert {e["account_id"] for e in change_file(first)} <= {sb.account_ids[0]}
    sb.faults = Faults()
    second = await run_once(settings, output=tmp_path)
    kinds = {(e["account_id"], e["event"]) for e in change_file(second)}
    truth = [j for j in sb.truth() if j["account_id"] == sb.account_ids[1]]
    assert kinds == ({(sb.account_ids[1], "job_added")} if truth else set())
    assert len(change_file(second)) == len(truth)


@pytest.mark.parametrize(
    "line",
    [
        b"null\n",
        b"[1, 2]\n",
        b'{"account_id": "111111111111", "job_id": 7}\n',
        b'{"job_id": "J"}\n',
        # Edited by hand: a state that would reach the feed as a number, regions that would
        # be read one character a region (and decide removals), a stale flag that is no flag.
        b'{"account_id": "111111111111", "job_id": "J", "job_state": 7}\n',
        b'{"account_id": "111111111111", "job_id": "J", "regions": "eu-west-1"}\n',
        b'{"account_id": "111111111111", "job_id": "J", "stale": "no"}\n',
    ],
    ids=["null", "array", "numeric-job-id", "no-account", "numeric-state", "regions", "stale"],
)
async def test_diff_of_a_snapshot_with_a_line_that_is_no_record_is_one_error(
    tmp_path: Path, line: bytes
) -> None:
    """A line that is JSON but no record (not an object, no key, a key that is not a string)
    makes `diff` an OutputError naming it, as it makes the store skip the change file, not a
    TypeError (a traceback at the command line)."""
    manifest = {"status": "complete", "partition_status": []}
    async with open_store(tmp_path) as store:
        first = await store.write("20261128T150000Z-aaaa", [], manifest)
        await store.write(
            "20261128T151500Z-bbbb", [], manifest, previous=await store.latest_manifest()
        )
    (tmp_path / first.data_path).write_bytes(line)
    with pytest.raises(OutputError, match="not a snapshot record") as info:
        await diff_command(tmp_path, "20261128T150000Z-aaaa", "latest", out=io.BytesIO())
    # It names the file and the record, not only "line 1" of the record's JSON.
    assert str(info.value).startswith(f"{tmp_path / first.data_path}: record 1 is not a ")


async def test_diff_to_a_full_disk_is_one_error_and_to_a_closed_pipe_is_quiet(
    tmp_path: Path,
) -> None:
    """Events that cannot be written (the disk is full) are an OutputError (one line, exit 2);
    a reader that went away (`diff ... | head`) ends the command quietly."""
    manifest = {"status": "complete", "partition_status": []}
    job = JobRecord.from_json_dict(
        {"account_id": A, "job_id": "J1", "snapshot_id": OLD_ID, "observed_at": OLD_SEEN}
    )
    async with open_store(tmp_path) as store:
        await store.write(OLD_ID, [], manifest)
        await store.write(NEW_ID, [job], manifest, previous=await store.latest_manifest())

    class Full(io.BytesIO):
        def write(self, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    class Gone(io.BytesIO):
        def write(self, data: Any) -> int:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    with pytest.raises(OutputError, match="cannot write the events: No space left on device"):
        await diff_command(tmp_path, OLD_ID, NEW_ID, out=Full())
    assert await diff_command(tmp_path, OLD_ID, NEW_ID, out=Gone()) == 0


async def test_diff_of_a_snapshot_found_damaged_at_its_end_prints_no_events(
    tmp_path: Path,
) -> None:
    """A data file found damaged only at its end (a last line missing: the record count is
    checked once it is read) makes `diff` an error that prints no events: not thousands of
    them, then the error, a feed cut short that a reader redirecting it would take whole."""
    manifest = {"status": "complete", "partition_status": []}
    jobs = [
        JobRecord.from_json_dict(
            {"account_id": A, "job_id": f"J{i:05d}", "snapshot_id": NEW_ID, "observed_at": NEW_SEEN}
        )
        for i in range(5000)
    ]
    async with open_store(tmp_path) as store:
        await store.write(OLD_ID, [], manifest)
        written = await store.write(NEW_ID, jobs, manifest, previous=await store.latest_manifest())
    whole = io.BytesIO()
    assert await diff_command(tmp_path, OLD_ID, NEW_ID, out=whole) == 0
    assert whole.getvalue().count(b"\n") == 5000
    data = tmp_path / written.data_path
    data.write_bytes(data.read_bytes().rsplit(b"\n", 2)[0] + b"\n")  # the last record gone
    out = io.BytesIO()
    with pytest.raises(OutputError, match="4999 records, but its manifest says 5000"):
        await diff_command(tmp_path, OLD_ID, NEW_ID, out=out)
    assert out.getvalue() == b""


async def test_diff_command_line(
    make_sandbox: SandboxFactory, tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    """`snowball-aggregator diff A B --output DIR` prints the events as JSON Lines (exit 0);
    an unknown snapshot is one line on stderr and exit 2."""
    from aggregator.cli import main

    sb = await make_sandbox(accounts=2, seed=6, max_jobs=4, regions=("eu-west-1",))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    first = await run_once(settings, output=tmp_path)
    job = next(j for j in sb.truth())
    sb.set_job_state(job["account_id"], job["job_id"], "Moved")
    second = await run_once(settings, output=tmp_path)
    capsysbinary.readouterr()
    args = ["diff", first.snapshot_id, second.snapshot_id, "--output", str(tmp_path)]
    assert await asyncio.to_thread(main, args) == 0
    printed = read_jsonl_bytes(capsysbinary.readouterr().out)
    assert printed == change_file(second)
    assert [(e["event"], e["to_state"]) for e in printed] == [("state_changed", "Moved")]
    missing = ["diff", "20260101T000000Z-0000", "latest", "--output", str(tmp_path)]
    assert await asyncio.to_thread(main, missing) == 2
    err = capsysbinary.readouterr().err.decode()
    assert err.startswith("error: ") and "no snapshot 20260101T000000Z-0000" in err
    assert err.count("\n") == 1


def test_diff_at_a_location_that_is_wrong_names_where_it_was_given(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A location that cannot be (a path through a file) is named as `run` names it: the
    configuration file and key, or the flag (diff said only the path)."""
    from aggregator.cli import main

    afile = tmp_path / "afile"
    afile.write_text("")
    config = tmp_path / "prod.toml"
    config.write_text(f'[accounts]\nids = ["111111111111"]\n[output]\ndirectory = "{afile}/x"\n')
    assert main(["diff", "latest", "latest", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert (
        err
        == f"error: {config}: output.directory: {afile}/x: cannot read LATEST: Not a directory\n"
    )
    assert main(["diff", "latest", "latest", "--output", f"{afile}/y"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --output: {afile}/y: cannot read LATEST: Not a directory\n"
