"""Merge: one record per (account_id, job_id), whatever number of regions returned it.

Results are added in the order their partitions finished. When several regions return the same
job (the US regions all return the account's US jobs), the record keeps the union of those
regions and the fields of the latest observation, so a job whose state changed during the run
ends with its newest state. Failed partitions contribute the previous snapshot's records of that
account and region, marked `stale` with their original `last_seen`, so a transient failure never
looks like a deleted job.
"""

from __future__ import annotations

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


class Merger:
    """Accumulates partition results; `records()` produces the sorted snapshot records."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], tuple[JobEntry, set[str], str]] = {}
        self._failed: set[tuple[str, str]] = set()
        self._ok: set[tuple[str, str]] = set()
        self.duplicates = 0

    def add(self, result: PartitionResult) -> None:
        """Fold one finished partition in (later results win on field values)."""
        if result.status != "ok":
            if result.status == "failed":
                self._failed.add((result.partition.account_id, result.partition.region))
                self._failed.update(
                    (result.partition.account_id, r) for r in result.partition.fallbacks
                )
            return
        region = result.region
        self._ok.add((result.partition.account_id, region))
        entries = self._entries
        for entry in result.entries:
            key = (entry.account_id, entry.job_id)
            seen = entries.get(key)
            if seen is None:
                entries[key] = (entry, {region}, result.observed_at)
            else:
                self.duplicates += 1
                seen[1].add(region)
                entries[key] = (entry, seen[1], result.observed_at)

    def records(
        self, *, snapshot_id: str, previous: Iterable[JobRecord] = ()
    ) -> tuple[list[JobRecord], MergeStats]:
        """Sorted records for `snapshot_id`, with stale carry-forward from `previous`."""
        out: list[JobRecord] = [
            JobRecord(
                account_id=e.account_id,
                job_id=e.job_id,
                job_state=e.job_state,
                job_type=e.job_type,
                snowball_type=e.snowball_type,
                is_master=e.is_master,
                creation_date=e.creation_date,
                description=e.description,
                regions=tuple(sorted(regions)),
                snapshot_id=snapshot_id,
                observed_at=observed,
                last_seen=observed,
                stale=False,
            )
            for e, regions, observed in self._entries.values()
        ]
        stale = 0
        if self._failed:
            for old in previous:
                if (old.account_id, old.job_id) in self._entries:
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
        out.sort(key=lambda r: (r.account_id, r.job_id))
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
