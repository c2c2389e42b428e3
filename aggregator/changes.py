"""Changes: the events that turn one snapshot into another.

Both snapshots are sorted by (account_id, job_id), so the comparison is one merge pass over two
streams of batches: the older snapshot is read as it goes, never loaded whole. Runs of jobs that
did not change are skipped by comparing slices in C; the store's comparison (`diff_lines`) even
compares the older snapshot's lines as bytes with the lines being written, and decodes only the
lines that differ. For each job, in this order:

- `job_added`: in the newer snapshot only (followed by `job_went_stale` if it is already stale,
  which only happens between snapshots that are not consecutive).
- `job_recovered`: stale in the older snapshot, read again in the newer one.
- `state_changed`: `job_state` differs (`from_state` -> `to_state`).
- `job_went_stale`: read in the older snapshot, carried forward as stale in the newer one.
- `job_removed`: in the older snapshot only, and the newer snapshot's answer for the job's
  partition is authoritative: the partition succeeded in both snapshots. A stale record in the
  older snapshot counts as its partition's last successful answer, so a job deleted during an
  outage is removed once its partition answers again. A US job is visible from every US region
  of its account, so any US region of the account that succeeded counts. A failed or skipped
  partition never produces removals (the service carries its jobs forward as stale).
  Also `job_removed`: in the older snapshot only, and no partition of the newer snapshot could
  have returned it (its account or region is no longer queried: it left the organisation or
  the configuration), so that the events of two consecutive snapshots always turn the older
  into the newer. This needs the newer manifest's `partition_status`, the list of every
  partition planned. And between snapshots that are not consecutive (the newer one's
  `previous_snapshot_id` is another), every job in the older snapshot only is `job_removed`:
  the newer one carried forward whatever its own previous snapshot held, so the job was
  removed in between, and a consumer catching up with one `diff` ends up with the newer
  snapshot.

Every event has `account_id`, `job_id`, `snapshot_id` (the newer snapshot),
`previous_snapshot_id`, `from_state`, `to_state`, `observed_at` (when the newer snapshot
observed the change: the job's `last_seen` there, or, for `job_removed` and `job_went_stale`,
the newer snapshot's `started_at`; never before `previous_observed_at`, which it takes if that
is later: a clock stepped back, or an older snapshot published while the newer one started)
and `previous_observed_at` (the job's `last_seen` in the older snapshot; null for
`job_added`). Events depend only on the two snapshots (records and
manifests), so the same pair always yields the same events, in the same order.
"""

from __future__ import annotations

import io
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from itertools import islice, repeat
from operator import attrgetter, indexOf, itemgetter, lt
from typing import Any, NamedTuple

import orjson

from .plan import US_REGIONS
from .records import JobRecord, check_record_types

__all__ = [
    "EVENT_TYPES",
    "FRAME_END",
    "JOB_ADDED",
    "JOB_RECOVERED",
    "JOB_REMOVED",
    "JOB_WENT_STALE",
    "STATE_CHANGED",
    "Batch",
    "ChangeEvent",
    "NewBatch",
    "UnreadableLine",
    "UnsortedError",
    "batch_of_dicts",
    "batch_of_records",
    "diff",
    "diff_lines",
    "encode_events",
    "frame_lines",
    "lines_of",
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

    try:
        try:  # every field present: files this tool wrote
            cores = [((d["account_id"], d["job_id"]), d["job_state"], d["stale"]) for d in items]
        except KeyError:
            cores = [
                ((d["account_id"], d["job_id"]), d.get("job_state"), bool(d.get("stale")))
                for d in items
            ]
    except (KeyError, TypeError) as exc:  # a line that is no object, or has no key
        raise UnreadableLine(f"not a snapshot record: {exc}") from exc
    if not all(type(a) is str and type(j) is str for (a, j), _, _ in cores):
        raise UnreadableLine("not a snapshot record: account_id and job_id must be strings")
    try:
        for d in items:
            check_record_types(d)
    except ValueError as exc:
        raise UnreadableLine(f"not a snapshot record: {exc}") from exc
    return cores, extra


class _Authority:
    """Which (account, region) answers of one manifest are complete listings, and which
    (account, region) partitions it planned at all."""

    __slots__ = ("listed", "ok", "planned", "us_ok", "us_planned")

    def __init__(self, manifest: Mapping[str, Any] | None) -> None:
        self.ok: set[tuple[str, str]] = set()
        self.us_ok: set[str] = set()
        self.planned: set[tuple[str, str]] = set()
        self.us_planned: set[str] = set()
        statuses = (manifest or {}).get("partition_status")
        self.listed = isinstance(statuses, list)
        for p in statuses or ():
            key = (p["account_id"], p["region"])
            self.planned.add(key)
            if key[1] in _US:
                self.us_planned.add(key[0])
            if p.get("status") == "ok":
                self.ok.add(key)
                if key[1] in _US:
                    self.us_ok.add(key[0])

    def covers(self, account_id: str, regions: Sequence[str]) -> bool:
        """True if a region that returned the job gave a complete answer."""
        return any(
            account_id in self.us_ok if r in _US else (account_id, r) in self.ok for r in regions
        )

    def dropped(self, account_id: str, regions: Sequence[str]) -> bool:
        """True if the manifest lists its partitions and none could return the job: no
        longer queried, not failed."""
        return (
            self.listed
            and bool(regions)
            and not any(
                account_id in self.us_planned if r in _US else (account_id, r) in self.planned
                for r in regions
            )
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


def _rules(
    old_manifest: Mapping[str, Any] | None, new_manifest: Mapping[str, Any], out: list[ChangeEvent]
) -> tuple[
    Callable[[Core, Extra], None],
    Callable[[Core, Extra], None],
    Callable[[Core, Extra, Core, Extra], None],
]:
    """The event rules of the module docstring: `added`, `gone` and `changed`, appending the
    events of one job to `out`."""
    snapshot_id: str = new_manifest["snapshot_id"]
    previous_id: str | None = old_manifest["snapshot_id"] if old_manifest else None
    started: str = new_manifest.get("started_at") or _time_of(snapshot_id)
    old_auth, new_auth = _Authority(old_manifest), _Authority(new_manifest)
    # Between snapshots that are not consecutive (`diff` to catch up), a job that the newer
    # one lacks is gone whatever its partition did there: the newer one carried forward all
    # that its own previous snapshot held, so the job was removed in between.
    # (A manifest without the key, not written by a store, is taken for consecutive.)
    skipping = (
        old_manifest is not None
        and new_manifest.get("previous_snapshot_id", previous_id) != previous_id
    )

    def event(
        kind: str,
        key: tuple[str, str],
        frm: str | None,
        to: str | None,
        at: str,
        before: str | None,
    ) -> None:
        if before is not None and before > at:  # never observed before the last sighting (a
            at = before  # clock stepped back; a snapshot published while this one started)
        out.append(ChangeEvent(key[0], kind, frm, key[1], at, before, previous_id, snapshot_id, to))

    def added(n: Core, ne: Extra) -> None:
        event(JOB_ADDED, n[0], None, n[1], ne[1], None)
        if n[2]:
            event(JOB_WENT_STALE, n[0], n[1], n[1], started, ne[1])

    def gone(o: Core, oe: Extra) -> None:
        account = o[0][0]
        if (
            skipping
            or (new_auth.covers(account, oe[0]) and (o[2] or old_auth.covers(account, oe[0])))
            or new_auth.dropped(account, oe[0])
        ):
            event(JOB_REMOVED, o[0], o[1], None, started, oe[1])

    def changed(o: Core, oe: Extra, n: Core, ne: Extra) -> None:
        key, before = n[0], oe[1]
        if o[2] and not n[2]:
            event(JOB_RECOVERED, key, o[1], n[1], ne[1], before)
        if o[1] != n[1]:
            event(STATE_CHANGED, key, o[1], n[1], ne[1], before)
        if n[2] and not o[2]:
            event(JOB_WENT_STALE, key, o[1], n[1], started, before)

    return added, gone, changed


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
    out: list[ChangeEvent] = []
    added, gone, changed = _rules(old_manifest, new_manifest, out)

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
            yield out[:]  # a copy: the rules keep appending to `out`
            out.clear()
    if out:
        yield out


# --- the store's comparison: lines of the older snapshot against the records being written ---
#
# Whether a job has an event depends on its account_id, job_id, job_state and stale only. A
# record line has its keys sorted, so the first three are in the line's head, the bytes before
# `"job_type":` (with creation_date, description and is_master), and `stale` ends the line;
# what differs from run to run for a job that did not change (last_seen, observed_at,
# snapshot_id) lies in between. An older line that starts with the newer line's head (its
# probe) and ends with the same `,"stale":...}` holds the same job, state and stale: no event,
# and no need to parse it. Inside a JSON string every quote is escaped, so those bytes can only
# be those keys (a line that repeats a key is no record: no JSON library writes one). Lines
# that do not match so (a job added, removed or changed, or written otherwise: other key order,
# spacing, fields) are decoded and merged field by field as `diff` does, with the same events.

_PROBE_END = b'"job_type":'
_FRESH_TAIL = b',"stale":false}\n'
_STALE_TAIL = b',"stale":true}\n'
_NO_PROBE = b"\n"  # starts no line (lines are split after newlines): such a record is decoded
_STALE = attrgetter("stale")
_KEY = attrgetter("account_id", "job_id")
_HEAD = itemgetter(0)
_ADDED_BOUNDARY = (b'},{"account_id":', b'}\n{"account_id":')
# The last item of a framed array (`NewBatch.framed`): orjson then writes the last object as if
# another followed (`},{"account_id":`), so the boundary replacement ends every line, the last
# one too, and the lines are one slice of the array, with no copy (`frame_lines`).
FRAME_END = orjson.Fragment(b'{"account_id":')
_FRAME_END_LEN = len(b'{"account_id":]')


def lines_of(chunk: bytes) -> list[bytes]:
    """The lines of `chunk`, each with its newline (the last one may have none)."""
    return io.BytesIO(chunk).readlines()  # 3x faster than split: it looks with memchr


def frame_lines(framed: bytes) -> memoryview:
    """The lines of a framed array, each with its newline (`{...}\\n{...}\\n`), uncopied."""
    return memoryview(framed)[1:-_FRAME_END_LEN]


class NewBatch(NamedTuple):
    """Records of the newer snapshot, in order, and their lines as the store encoded them:
    the JSON array of the records, then `FRAME_END`, with a newline at each record boundary
    (`[{...}\\n{...}\\n{"account_id":]`; the lines are `frame_lines(framed)`)."""

    records: Sequence[JobRecord]
    framed: bytes


class UnreadableLine(ValueError):
    """A line of the older snapshot is not a record (invalid JSON, not an object, no key)."""


def _probes(framed: bytes) -> list[bytes]:
    """Each line's bytes up to its `"job_type":` key."""
    lines = lines_of(framed)
    lines[0] = lines[0][1:]  # the array's "["
    lines.pop()  # FRAME_END and "]"
    # rpartition: the key is nearer the end, and one call beats find and slice.
    probes: list[bytes] = list(map(_HEAD, map(bytes.rpartition, lines, repeat(_PROBE_END))))
    if b"" in probes:  # pragma: no cover - every record line has the key
        probes = [p or _NO_PROBE for p in probes]
    return probes


def _at(items: list[bytes], index: int) -> Iterator[bytes]:
    """An iterator over `items` from `index` on: unlike a slice, it touches no other item."""
    it = iter(items)
    it.__setstate__(index)  # type: ignore[attr-defined]
    return it


def _matched(flags: Iterable[bool], count: int) -> int:
    """How many of the `count` `flags` are True before the first False (read lazily, in C)."""
    try:
        return indexOf(flags, False)
    except ValueError:
        return count


def _decoded(line: bytes) -> tuple[Core, Extra]:
    """The comparison view of one line of a snapshot (as `batch_of_dicts`)."""
    try:
        d = orjson.loads(line)
        key = (d["account_id"], d["job_id"])
        if type(key[0]) is not str or type(key[1]) is not str:
            raise TypeError("account_id and job_id must be strings")
        check_record_types(d)
        core = (key, d.get("job_state"), bool(d.get("stale")))
        return core, (d.get("regions") or (), d.get("last_seen") or d["observed_at"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UnreadableLine(f"not a snapshot record: {exc}") from exc


def _encode_added(
    records: Sequence[JobRecord], previous_id: str | None, snapshot_id: str
) -> memoryview:
    """`encode_events` of the `job_added` events of fresh `records`, without the events.

    The fields that are the same in every event are written by orjson as two fragments of
    already encoded JSON, and the lines are a slice of orjson's output: per event, a dict of
    six keys and one copy of its line instead of nine keys and three copies.
    """
    kind = orjson.Fragment(b'"job_added","from_state":null')  # "event", then "from_state"
    ids = orjson.Fragment(  # "previous_observed_at", then the snapshot ids
        b'null,"previous_snapshot_id":'
        + orjson.dumps(previous_id)
        + b',"snapshot_id":'
        + orjson.dumps(snapshot_id)
    )
    items: list[Any] = [
        {
            "account_id": r.account_id,
            "event": kind,
            "job_id": r.job_id,
            "observed_at": r.last_seen,
            "previous_observed_at": ids,
            "to_state": r.job_state,
        }
        for r in records
    ]
    items.append(FRAME_END)
    return frame_lines(orjson.dumps(items).replace(*_ADDED_BOUNDARY))


def _first_unsorted(keys: Sequence[tuple[str, str]], last: tuple[str, str]) -> tuple[str, str]:
    for key in keys:
        if key <= last:
            return key
        last = key
    raise AssertionError("sorted")  # pragma: no cover - only called when some key is not


def _counted(events: list[ChangeEvent]) -> tuple[bytes, dict[str, int]]:
    counts = dict.fromkeys(EVENT_TYPES, 0)
    for e in events:
        counts[e[1]] += 1
    return encode_events(events), counts


async def diff_lines(
    old: AsyncIterable[list[bytes]],
    new: AsyncIterable[NewBatch],
    *,
    old_manifest: Mapping[str, Any] | None,
    new_manifest: Mapping[str, Any],
) -> AsyncIterator[tuple[bytes | memoryview, dict[str, int]]]:
    """The events of `diff`, encoded (`encode_events`, as bytes or a memoryview) with their
    counts by type, from the lines of the older snapshot (batches of non-blank lines, each with
    its newline, in file order) and the records of the newer one (`NewBatch`es).

    Same rules, order and `UnsortedError`s as `diff`; a line that has to be decoded and is
    not a record raises `UnreadableLine`.
    """
    out: list[ChangeEvent] = []
    added, gone, changed = _rules(old_manifest, new_manifest, out)
    snapshot_id: str = new_manifest["snapshot_id"]
    previous_id: str | None = old_manifest["snapshot_id"] if old_manifest else None
    startswith, endswith = bytes.startswith, bytes.endswith
    olds, news = aiter(old), aiter(new)
    ol: list[bytes] = []
    records: Sequence[JobRecord] = ()
    framed = b""
    probes: list[bytes] = []
    tails: list[bytes] | None = None  # None: no record of the batch is stale
    stale = False
    oi = ni = 0
    o_done = n_done = False
    o_last: tuple[str, str] = ("", "")
    n_last: tuple[str, str] = ("", "")
    memo_at = -1  # the decoded older line `oi`, kept while its newer partner moves on
    memo: tuple[Core, Extra] = ((("", ""), None, False), ((), ""))
    while True:
        if oi == len(ol) and not o_done:
            lines = await anext(olds, None)
            o_done = lines is None
            ol, oi, memo_at = lines or [], 0, -1
            continue
        if ni == len(records) and not n_done:
            batch = await anext(news, None)
            n_done = batch is None
            records, framed = batch or ((), b"")
            probes, ni = [], 0
            stale = any(map(_STALE, records))
            continue
        if o_done and n_done:
            break
        lo, ln = len(ol), len(records)
        if oi < lo and ni < ln and not probes:
            probes = _probes(framed)
            tails = [_STALE_TAIL if r.stale else _FRESH_TAIL for r in records] if stale else None
        while oi < lo and ni < ln:
            # The run of unchanged jobs that starts here, compared in C (see above) by
            # iterators set to the current lines, so that only the lines compared are touched.
            m = min(lo - oi, ln - ni)
            run = _matched(map(startswith, _at(ol, oi), _at(probes, ni)), m)
            if run:
                ends = _at(tails, ni) if tails is not None else repeat(_FRESH_TAIL)
                run = _matched(map(endswith, islice(_at(ol, oi), run), ends), run)
            if run:
                key = _KEY(records[ni])
                if key <= o_last:
                    raise UnsortedError("older", key)
                if key <= n_last:
                    raise UnsortedError("newer", key)
                oi += run
                ni += run
                o_last = n_last = _KEY(records[ni - 1])
                if run == m:
                    continue
            # Lines that differ: decode the older one and merge as `diff` does.
            if memo_at != oi:
                memo, memo_at = _decoded(ol[oi]), oi
            o, oe = memo
            r = records[ni]
            ok, nk = o[0], (r.account_id, r.job_id)
            if ok == nk:
                if ok <= o_last:
                    raise UnsortedError("older", ok)
                if nk <= n_last:
                    raise UnsortedError("newer", nk)
                o_last = n_last = ok
                changed(o, oe, (nk, r.job_state, r.stale), (r.regions, r.last_seen))
                oi += 1
                ni += 1
            elif ok < nk:
                if ok <= o_last:
                    raise UnsortedError("older", ok)
                o_last = ok
                gone(o, oe)
                oi += 1
            else:
                if nk <= n_last:
                    raise UnsortedError("newer", nk)
                n_last = nk
                added((nk, r.job_state, r.stale), (r.regions, r.last_seen))
                ni += 1
        # One side is finished for good: the rest of the other is removed or added.
        if n_done:
            while oi < lo:
                o, oe = memo if memo_at == oi else _decoded(ol[oi])
                if o[0] <= o_last:
                    raise UnsortedError("older", o[0])
                o_last = o[0]
                gone(o, oe)
                oi += 1
        if o_done and ni < ln:
            rest = records[ni:]
            keys = list(map(_KEY, rest))
            if keys[0] <= n_last or not all(map(lt, keys, islice(keys, 1, None))):
                raise UnsortedError("newer", _first_unsorted(keys, n_last))
            n_last = keys[-1]
            if stale:
                for r, key in zip(rest, keys, strict=True):
                    added((key, r.job_state, r.stale), (r.regions, r.last_seen))
            else:  # the common case (a first snapshot): encoded straight from the records
                if out:
                    yield _counted(out)
                    out.clear()
                yield _encode_added(rest, previous_id, snapshot_id), {JOB_ADDED: len(rest)}
            ni = ln
        if len(out) >= _BATCH:
            yield _counted(out)
            out.clear()
    if out:
        yield _counted(out)
