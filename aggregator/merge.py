"""Merge: one record per (account_id, job_id), whatever number of regions returned it.

Results are added in the order their partitions finished. When several regions return the same
job (the US regions all return the account's US jobs), the record keeps the union of those
regions and the fields of the latest observation, so a job whose state changed during the run
ends with its newest state; answers that differ within the same second are chosen between by
their content, never by which partition finished last. Failed partitions contribute the
previous snapshot's records of that account and region, marked `stale` with their original
`last_seen`, so a transient failure never looks like a deleted job. So do skipped ones (the
region answered that the account has not enabled it): a region that returned jobs before and
now says so has not shown them deleted.
"""

from __future__ import annotations

import collections
import operator
from collections.abc import Iterable
from dataclasses import dataclass

from .fetch import PartitionResult
from .plan import US_REGIONS, Partition
from .records import JobEntry, JobRecord

__all__ = ["MergeStats", "Merger"]

US_GROUP = frozenset(US_REGIONS)


# Snowball's job states in the order a job goes through them (the API model's enum order).
_PROGRESS: dict[str | None, int] = {
    state: rank
    for rank, state in enumerate(
        (
            "New",
            "PreparingAppliance",
            "PreparingShipment",
            "InTransitToCustomer",
            "WithCustomer",
            "InTransitToAWS",
            "WithAWSSortingFacility",
            "WithAWS",
            "InProgress",
            "Complete",
            "Cancelled",
            "Listing",
            "Pending",
        )
    )
}


def _newer(entry: JobEntry, observed: str, kept: JobEntry, kept_observed: str) -> bool:
    """Whether `entry` (seen at `observed`) replaces `kept`, another region's different answer
    about the same job: the later observation wins; at the same second, the state further on
    in a job's life (a replica behind has not seen the change yet), then the fields' text, so
    that regions that disagree for a while give the same record every run, never the answer
    of whichever partition finished last."""
    if observed != kept_observed:
        return observed > kept_observed
    rank, kept_rank = _PROGRESS.get(entry[2], -1), _PROGRESS.get(kept[2], -1)  # (job_state)
    if rank != kept_rank:
        return rank > kept_rank
    return tuple(map(repr, entry)) > tuple(map(repr, kept))


@dataclass(frozen=True, slots=True)
class MergeStats:
    """What the merge did: `duplicates` removed, `stale` records carried forward."""

    jobs: int
    duplicates: int
    stale: int


_RECORD_KEY = operator.attrgetter("account_id", "job_id")


class Merger:
    """Accumulates partition results; `records()` produces the sorted snapshot records."""

    def __init__(self) -> None:
        # account_id -> job_id -> (latest entry, regions that returned it, observed_at). Every
        # entry of a result is of the result's account, so the inner key is the job id alone;
        # regions are small tuples (one shared 1-tuple per region for the common case).
        self._accounts: dict[str, dict[str, tuple[JobEntry, tuple[str, ...], str]]] = {}
        self._failed: set[tuple[str, str]] = set()
        self._ok: set[tuple[str, str]] = set()
        self._one_region: dict[str, tuple[str]] = {}
        self.duplicates = 0
        # With `expect`: partitions still to come per account, and the sorted records of the
        # accounts that are complete (their job ids too, once a stale check needs them).
        self._remaining: collections.Counter[str] | None = None
        self._snapshot_id: str | None = None
        self._built: dict[str, list[JobRecord]] = {}
        self._built_ids: dict[str, frozenset[str]] = {}

    def expect(self, plan: Iterable[Partition], *, snapshot_id: str) -> None:
        """Announce the run's partitions: an account's records are then built as soon as its
        last partition is in, during the run (whose tail mostly waits on a few long chains),
        rather than all after the last one. `records` must be asked for `snapshot_id`."""
        self._remaining = collections.Counter(p.account_id for p in plan)
        self._snapshot_id = snapshot_id

    def add(self, result: PartitionResult) -> None:
        """Fold one finished partition in (later results win on field values)."""
        self._fold(result)
        remaining = self._remaining
        if remaining is not None:
            account_id = result.partition.account_id
            remaining[account_id] -= 1
            if remaining[account_id] == 0 and account_id in self._accounts:
                assert self._snapshot_id is not None
                jobs = self._accounts.pop(account_id)
                self._built[account_id] = self._build(jobs, self._snapshot_id)

    def _fold(self, result: PartitionResult) -> None:
        account_id = result.partition.account_id
        if result.status != "ok":  # failed or skipped: no answer about the jobs there
            self._failed.add((account_id, result.partition.region))
            self._failed.update((account_id, r) for r in result.partition.fallbacks)
            return
        if account_id in self._built:  # more results than `expect` announced: fold on
            self._built_ids.pop(account_id, None)
            self._accounts[account_id] = {
                r.job_id: (JobEntry(*r[:8]), r.regions, r.observed_at)
                for r in self._built.pop(account_id)
            }
        region = result.region
        self._ok.add((account_id, region))
        jobs = self._accounts.setdefault(account_id, {})
        only = self._one_region.setdefault(region, (region,))
        observed = result.observed_at
        duplicates = 0
        for entry in result.entries:
            job_id = entry[1]
            seen = jobs.get(job_id)
            if seen is None:
                jobs[job_id] = (entry, only, observed)
            else:
                duplicates += 1
                regions = seen[1]
                if region not in regions:
                    regions = (*regions, region)
                if entry != seen[0] and not _newer(entry, observed, seen[0], seen[2]):
                    entry, observed = seen[0], seen[2]
                jobs[job_id] = (entry, regions, observed)
        self.duplicates += duplicates

    def records(
        self, *, snapshot_id: str, previous: Iterable[JobRecord] = ()
    ) -> tuple[list[JobRecord], MergeStats]:
        """Sorted records for `snapshot_id`, with stale carry-forward from `previous`."""
        if self._built and snapshot_id != self._snapshot_id:
            raise ValueError(f"records for {snapshot_id!r}, expected {self._snapshot_id!r}")
        out: list[JobRecord] = []
        built, accounts = self._built, self._accounts
        for account_id in sorted(built.keys() | accounts.keys()):
            done = built.get(account_id)
            out.extend(done if done is not None else self._build(accounts[account_id], snapshot_id))
        stale = 0
        if self._failed:
            for old in previous:
                if self._has(old.account_id, old.job_id):
                    continue
                if not self._unseen_because_failed(old):
                    continue
                stale += 1
                out.append(
                    JobRecord(
                        account_id=old.account_id,
                        job_id=old.job_id,
                        job_state=old.job_state,
                        job_type=old.job_type,
                        snowball_type=old.snowball_type,
                        is_master=old.is_master,
                        creation_date=old.creation_date,
                        description=old.description,
                        regions=old.regions,
                        snapshot_id=snapshot_id,
                        observed_at=old.observed_at,
                        last_seen=old.last_seen,
                        stale=True,
                    )
                )
        if stale:
            out.sort(key=_RECORD_KEY)
        return out, MergeStats(jobs=len(out), duplicates=self.duplicates, stale=stale)

    @staticmethod
    def _build(
        jobs: dict[str, tuple[JobEntry, tuple[str, ...], str]], snapshot_id: str
    ) -> list[JobRecord]:
        """One account's records, in job_id order. JobEntry's fields are JobRecord's first
        eight, in order (positional: this runs once per job)."""
        return [
            JobRecord(
                *e,
                regions if len(regions) == 1 else tuple(sorted(regions)),
                snapshot_id,
                observed,
                observed,
                False,
            )
            for e, regions, observed in (jobs[job_id] for job_id in sorted(jobs))
        ]

    def _has(self, account_id: str, job_id: str) -> bool:
        """Whether this run read `job_id` of `account_id`."""
        jobs = self._accounts.get(account_id)
        if jobs is not None:
            return job_id in jobs
        built = self._built.get(account_id)
        if built is None:
            return False
        ids = self._built_ids.get(account_id)
        if ids is None:
            ids = self._built_ids[account_id] = frozenset(r.job_id for r in built)
        return job_id in ids

    def _unseen_because_failed(self, old: JobRecord) -> bool:
        """True when no region that could return `old` answered and one of them failed.

        Any US region returns every US job of its account, so for a US job the whole US group
        counts: one US region that answered makes its absence a real removal.
        """
        regions = set(old.regions)
        if regions & US_GROUP:
            regions |= US_GROUP
        account = old.account_id
        if any((account, r) in self._ok for r in regions):
            return False
        return any((account, r) in self._failed for r in regions)
