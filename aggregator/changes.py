"""Changes: the events that turn one snapshot into another.

Both snapshots are sorted by (account_id, job_id), so the comparison is one merge pass over two
streams of batches: the older snapshot is read as it goes, never loaded whole. Runs of jobs that
did not change are skipped by comparing slices in C. For each job, in this order:

- `job_added`: in the newer snapshot only (followed by `job_went_stale` if it is already stale,
  which only happens between snapshots that are not consecutive).
- `job_recovered`: stale in the older snapshot, read again in the newer one.
- `state_changed`: `job_state` differs (`from_state` -> `to_state`).
- `job_went_stale`: read in the older snapshot, carried forward as stale in the newer one.
- `job_removed`: in the older snapshot only, and the newer snapshot's answer for the job's
  partition is authoritative: the partition succeeded in both snapshots. A stale record in the
  older snapshot counts as its partition's last successful answer, so a job deleted during an
  outage is removed once its partition answers again. A US job is visible from every US region
  of its account, so any US region of the account that succeeded counts. A failed, skipped or
  no longer planned partition never produces removals.

Every event has `account_id`, `job_id`, `snapshot_id` (the newer snapshot),
`previous_snapshot_id`, `from_state`, `to_state`, `observed_at` (when the newer snapshot
observed the change: the job's `last_seen` there, or, for `job_removed` and `job_went_stale`,
the newer snapshot's `started_at`) and `previous_observed_at` (the job's `last_seen` in the
older snapshot; null for `job_added`). Events depend only on the two snapshots (records and
manifests), so the same pair always yields the same events, in the same order.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from typing import Any, NamedTuple

import orjson

from .plan import US_REGIONS
from .records import JobRecord

__all__ = [
    "EVENT_TYPES",
    "JOB_ADDED",
    "JOB_RECOVERED",
    "JOB_REMOVED",
    "JOB_WENT_STALE",
    "STATE_CHANGED",
    "Batch",
    "ChangeEvent",
    "UnsortedError",
    "batch_of_dicts",
    "batch_of_records",
    "diff",
    "encode_events",
]

JOB_ADDED = "job_added"
JOB_RECOVERED = "job_recovered"
STATE_CHANGED = "state_changed"
JOB_WENT_STALE = "job_went_stale"
JOB_REMOVED = "job_removed"
EVENT_TYPES = (JOB_ADDED, JOB_RECOVERED, STATE_CHANGED, JOB_WENT_STALE, JOB_REMOVED)

_US = frozenset(US_REGIONS)
_BATCH = 4096


class ChangeEvent(NamedTuple):
    """One line of a change file (fields in alphabetical order, as written).

    A NamedTuple rather than a frozen dataclass: the first snapshot of a large fleet has a
    `job_added` per job, and a frozen dataclass costs six times as much to create.
    """

    account_id: str
    event: str
    from_state: str | None
    job_id: str
    observed_at: str
    previous_observed_at: str | None
    previous_snapshot_id: str | None
    snapshot_id: str
    to_state: str | None

    def to_json_dict(self) -> dict[str, Any]:
        """The event as a JSON-ready dict."""
        return dict(zip(self._fields, self, strict=True))


def encode_events(events: Sequence[ChangeEvent]) -> bytes:
    """JSON Lines (keys sorted, one event per line, trailing newline); b"" for no events.

    One orjson call per batch, split at the event boundaries: `},{"account_id":` cannot occur
    inside an event (quotes in strings are escaped; events hold no nested object).
    """
    if not events:
        return b""
    body = orjson.dumps(
        [
            {
                "account_id": e[0],
                "event": e[1],
                "from_state": e[2],
                "job_id": e[3],
                "observed_at": e[4],
                "previous_observed_at": e[5],
                "previous_snapshot_id": e[6],
                "snapshot_id": e[7],
                "to_state": e[8],
            }
            for e in events
        ]
    )
    return body[1:-1].replace(b'},{"account_id":', b'}\n{"account_id":') + b"\n"


# What the comparison needs of a record, whichever form it comes in. Per batch: a list of the
# part compared for every job, `Core` = ((account_id, job_id), job_state, stale), whose slices
# are compared in C to skip runs of unchanged jobs, and a function giving the part only events
# need, `Extra` = (regions, last_seen), for the record at an index (built only for events).
Core = tuple[tuple[str, str], str | None, bool]
Extra = tuple[Sequence[str], str]
Batch = tuple[list[Core], Callable[[int], Extra]]


def batch_of_records(records: Sequence[JobRecord]) -> Batch:
    """The comparison view of in-memory records."""

    def extra(i: int) -> Extra:
        r = records[i]
        return r.regions, r.last_seen

    return [((r.account_id, r.job_id), r.job_state, r.stale) for r in records], extra


def batch_of_dicts(items: Sequence[Mapping[str, Any]]) -> Batch:
    """The comparison view of records parsed from snapshot lines (absent fields, in files not
    written by this tool, take their defaults)."""

    def extra(i: int) -> Extra:
        d = items[i]
        return d.get("regions") or (), d.get("last_seen") or d["observed_at"]

    try:  # every field present: files this tool wrote
        return [((d["account_id"], d["job_id"]), d["job_state"], d["stale"]) for d in items], extra
    except KeyError:
        cores = [
            ((d["account_id"], d["job_id"]), d.get("job_state"), bool(d.get("stale")))
            for d in items
        ]
        return cores, extra


class _Authority:
    """Which (account, region) answers of one manifest are complete listings."""

    __slots__ = ("ok", "us_ok")

    def __init__(self, manifest: Mapping[str, Any] | None) -> None:
        self.ok: set[tuple[str, str]] = set()
        self.us_ok: set[str] = set()
        for p in (manifest or {}).get("partition_status") or ():
            if p.get("status") == "ok":
                self.ok.add((p["account_id"], p["region"]))
                if p["region"] in _US:
                    self.us_ok.add(p["account_id"])

    def covers(self, account_id: str, regions: Sequence[str]) -> bool:
        """True if a region that returned the job gave a complete answer."""
        return any(
            account_id in self.us_ok if r in _US else (account_id, r) in self.ok for r in regions
        )


def _time_of(snapshot_id: str) -> str:
    """The start time encoded in a snapshot id, as ISO 8601 UTC."""
    s = snapshot_id
    return f"{s[0:4]}-{s[4:6]}-{s[6:8]}T{s[9:11]}:{s[11:13]}:{s[13:15]}Z"


def _no_extra(i: int) -> Extra:  # pragma: no cover - never called: its batch is empty
    raise IndexError(i)


class UnsortedError(ValueError):
    """A snapshot's records are not strictly sorted by (account_id, job_id); `side` is
    "older" or "newer"."""

    def __init__(self, side: str, key: tuple[str, str]) -> None:
        self.side = side
        self.key = key
        super().__init__(f"{side} snapshot not sorted by (account_id, job_id) at {key}")


async def diff(
    old: AsyncIterable[Batch],
    new: AsyncIterable[Batch],
    *,
    old_manifest: Mapping[str, Any] | None,
    new_manifest: Mapping[str, Any],
) -> AsyncIterator[list[ChangeEvent]]:
    """The events from the older snapshot to the newer one, in batches.

    `old` and `new` yield `Batch`es in (account_id, job_id) order; where they differ, that
    order is checked (`UnsortedError` names the side). `old_manifest` is None when there is no
    older snapshot (every job is then `job_added`). Manifests need `snapshot_id`,
    `partition_status` and (the newer) `started_at` (default: the time in its snapshot id).
    """
    snapshot_id: str = new_manifest["snapshot_id"]
    previous_id: str | None = old_manifest["snapshot_id"] if old_manifest else None
    started: str = new_manifest.get("started_at") or _time_of(snapshot_id)
    old_auth, new_auth = _Authority(old_manifest), _Authority(new_manifest)
    out: list[ChangeEvent] = []

    def event(
        kind: str,
        key: tuple[str, str],
        frm: str | None,
        to: str | None,
        at: str,
        before: str | None,
    ) -> None:
        out.append(ChangeEvent(key[0], kind, frm, key[1], at, before, previous_id, snapshot_id, to))

    def added(n: Core, ne: Extra) -> None:
        event(JOB_ADDED, n[0], None, n[1], ne[1], None)
        if n[2]:
            event(JOB_WENT_STALE, n[0], n[1], n[1], started, ne[1])

    def gone(o: Core, oe: Extra) -> None:
        account = o[0][0]
        if new_auth.covers(account, oe[0]) and (o[2] or old_auth.covers(account, oe[0])):
            event(JOB_REMOVED, o[0], o[1], None, started, oe[1])

    def changed(o: Core, oe: Extra, n: Core, ne: Extra) -> None:
        key, before = n[0], oe[1]
        if o[2] and not n[2]:
            event(JOB_RECOVERED, key, o[1], n[1], ne[1], before)
        if o[1] != n[1]:
            event(STATE_CHANGED, key, o[1], n[1], ne[1], before)
        if n[2] and not o[2]:
            event(JOB_WENT_STALE, key, o[1], n[1], started, before)

    olds, news = aiter(old), aiter(new)
    oc: list[Core] = []
    nc: list[Core] = []
    oe: Callable[[int], Extra] = _no_extra
    ne: Callable[[int], Extra] = _no_extra
    oi = ni = 0
    o_done = n_done = False
    # The last key merged from each side: the next must be greater ("" sorts first).
    o_last: tuple[str, str] = ("", "")
    n_last: tuple[str, str] = ("", "")
    while True:
        if oi == len(oc) and not o_done:
            batch = await anext(olds, None)
            o_done = batch is None
            oc, oe = batch or ([], _no_extra)
            oi = 0
            continue
        if ni == len(nc) and not n_done:
            batch = await anext(news, None)
            n_done = batch is None
            nc, ne = batch or ([], _no_extra)
            ni = 0
            continue
        if o_done and n_done:
            break
        lo, ln = len(oc), len(nc)
        while oi < lo and ni < ln:
            o = oc[oi]
            n = nc[ni]
            if o == n:
                # A run of unchanged jobs: find where it ends by comparing slices of growing
                # size, then halving the last one; its cost is that of the run, in C.
                m = min(lo - oi, ln - ni)
                run, size = 1, 8
                while run < m:
                    end = min(run + size, m)
                    if oc[oi + run : oi + end] == nc[ni + run : ni + end]:
                        run, size = end, size * 2
                        continue
                    low, high = run, end
                    while high - low > 1:
                        mid = (low + high) // 2
                        if oc[oi + low : oi + mid] == nc[ni + low : ni + mid]:
                            low = mid
                        else:
                            high = mid
                    run = low
                    break
                key = o[0]
                if key <= o_last:
                    raise UnsortedError("older", key)
                if key <= n_last:
                    raise UnsortedError("newer", key)
                oi += run
                ni += run
                o_last = n_last = oc[oi - 1][0]
                continue
            ok = o[0]
            nk = n[0]
            if ok == nk:
                if ok <= o_last:
                    raise UnsortedError("older", ok)
                if nk <= n_last:
                    raise UnsortedError("newer", nk)
                o_last = n_last = ok
                changed(o, oe(oi), n, ne(ni))
                oi += 1
                ni += 1
            elif ok < nk:
                if ok <= o_last:
                    raise UnsortedError("older", ok)
                o_last = ok
                gone(o, oe(oi))
                oi += 1
            else:
                if nk <= n_last:
                    raise UnsortedError("newer", nk)
                n_last = nk
                added(n, ne(ni))
                ni += 1
        # One side is finished for good: the rest of the other is removed or added.
        if n_done:
            while oi < lo:
                o = oc[oi]
                if o[0] <= o_last:
                    raise UnsortedError("older", o[0])
                o_last = o[0]
                gone(o, oe(oi))
                oi += 1
        if o_done:
            while ni < ln:
                n = nc[ni]
                if n[0] <= n_last:
                    raise UnsortedError("newer", n[0])
                n_last = n[0]
                added(n, ne(ni))
                ni += 1
        if len(out) >= _BATCH:
            yield out
            out = []
    if out:
        yield out
