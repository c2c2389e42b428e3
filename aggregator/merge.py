"""Merge: one record per (account_id, job_id), whatever number of regions returned it.

Results are added in the order their partitions finished. When several regions return the same
job (the US regions all return the account's US jobs), the record keeps the union of those
regions and the fields of the latest observation, so a job whose state changed during the run
ends with its newest state. Failed partitions contribute the previous snapshot's records of that
account and region, marked `stale` with their original `last_seen`, so a transient failure never
looks like a deleted job.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass

from .fetch import PartitionResult
from .plan import US_REGIONS
from .records import JobEntry, JobRecord

__all__ = ["MergeStats", "Merger"]

US_GROUP = frozenset(US_REGIONS)


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

    def add(self, result: PartitionResult) -> None:
        """Fold one finished partition in (later results win on field values)."""
        account_id = result.partition.account_id
        if result.status != "ok":
            if result.status == "failed":
                self._failed.add((account_id, result.partition.region))
                self._failed.update((account_id, r) for r in result.partition.fallbacks)
            return
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
                jobs[job_id] = (entry, regions, observed)
        self.duplicates += duplicates

    def records(
        self, *, snapshot_id: str, previous: Iterable[JobRecord] = ()
    ) -> tuple[list[JobRecord], MergeStats]:
        """Sorted records for `snapshot_id`, with stale carry-forward from `previous`."""
        # Built in (account_id, job_id) order. JobEntry's fields are JobRecord's first eight,
        # in order (positional: this runs once per job).
        out: list[JobRecord] = []
        for account_id in sorted(self._accounts):
            jobs = self._accounts[account_id]
            out.extend(
                JobRecord(
                    *e,
                    regions if len(regions) == 1 else tuple(sorted(regions)),
                    snapshot_id,
                    observed,
                    observed,
                    False,
                )
                for e, regions, observed in (jobs[job_id] for job_id in sorted(jobs))
            )
        stale = 0
        if self._failed:
            for old in previous:
                if old.job_id in self._accounts.get(old.account_id, ()):
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
