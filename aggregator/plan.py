"""Plan: accounts x regions -> the partitions (one ListJobs pagination chain each) to fetch.

Regions are per AWS partition: an account is asked in the selected regions of its own partition
(aws, aws-cn or aws-us-gov; "all" expands to every Snowball region botocore lists there), so one
`regions.names` list can name regions of several partitions.

ListJobs in any commercial US region (`US_REGIONS`) returns the jobs of all four of them. With
`us_strategy = "all"` every selected US region is a partition of its own and merge dedupes the
results by (account_id, job_id); with `"one"` an account gets a single US partition that tries
the selected US regions in order until one answers. The GovCloud regions are not part of that
group: each is asked on its own.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from .accounts import Account
from .config import RegionsSettings, select_regions

__all__ = [
    "US_REGIONS",
    "Partition",
    "build_plan",
    "expected_pages",
    "longest_first",
    "select_regions",
]

# In preference order: the region tried first under us_strategy = "one".
US_REGIONS = ("us-east-1", "us-east-2", "us-west-2", "us-west-1")

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class Partition:
    """One (account, region) pagination chain; `fallbacks` are tried in order if it fails."""

    account: Account
    region: str
    fallbacks: tuple[str, ...] = ()

    @property
    def account_id(self) -> str:
        return self.account.account_id

    @property
    def key(self) -> str:
        """`account_id/region`, the name used in logs and manifests."""
        return f"{self.account.account_id}/{self.region}"


def build_plan(accounts: Iterable[Account], settings: RegionsSettings) -> tuple[Partition, ...]:
    """Every partition to fetch, ordered so that accounts interleave (fair start order).

    Accounts of an AWS partition in which none of the configured regions lies get no
    partitions; a warning (`plan.no_regions`) says how many.
    """
    per_account: list[list[Partition]] = []
    region_cache: dict[str, tuple[str, ...]] = {}
    unplanned: collections.Counter[str] = collections.Counter()
    for account in accounts:
        regions = region_cache.get(account.partition)
        if regions is None:
            regions = region_cache[account.partition] = select_regions(settings, account.partition)
        if not regions:
            unplanned[account.partition] += 1
            continue
        parts: list[Partition] = []
        us = [r for r in US_REGIONS if r in regions]
        if settings.us_strategy == "one" and us:
            parts.append(Partition(account, us[0], tuple(us[1:])))
            parts.extend(Partition(account, r) for r in regions if r not in us)
        else:
            parts.extend(Partition(account, r) for r in regions)
        per_account.append(parts)
    for partition, count in sorted(unplanned.items()):
        log.warning(
            "plan.no_regions",
            partition=partition,
            accounts=count,
            reason=f"regions.names selects no region of {partition}",
        )
    # Round-robin across accounts: the first region of every account, then the second, ...
    plan: list[Partition] = []
    depth = max((len(p) for p in per_account), default=0)
    for i in range(depth):
        plan.extend(p[i] for p in per_account if i < len(p))
    return tuple(plan)


PAGE_SIZE = 100


def expected_pages(manifest: Mapping[str, Any] | None) -> dict[tuple[str, str], int]:
    """Pages each (account_id, region) took in a previous run, from its manifest's
    `partition_status` (empty without a manifest)."""
    if not manifest:
        return {}
    out: dict[tuple[str, str], int] = {}
    for entry in manifest.get("partition_status") or ():
        if entry.get("status") == "ok":
            key = (entry["account_id"], entry["region"])
            out[key] = max(1, math.ceil(int(entry.get("jobs") or 0) / PAGE_SIZE))
    return out


def longest_first(
    plan: Sequence[Partition], pages: Mapping[tuple[str, str], int]
) -> tuple[Partition, ...]:
    """`plan` with the longest expected NextToken chains first; equals keep their order.

    A run lasts at least as long as its longest chain, whose pages are fetched one after the
    other at the partition's rate, so those chains must start first rather than whenever
    their turn in the round-robin comes (measured on 200 accounts x every region, 50 ms
    latency, 5 req/s: the 24-page chains started 4.5 s into the run and ended it). `pages` is
    the previous run's (see `expected_pages`); a partition it does not know counts as one
    page, or two in a US region, whose list is the union of all four US regions' jobs, so a
    first run starts the US chains first.
    """

    def weight(partition: Partition) -> int:
        known = pages.get((partition.account_id, partition.region))
        for region in partition.fallbacks:
            if known is not None:
                break
            known = pages.get((partition.account_id, region))
        if known is not None:
            return known
        return 2 if partition.region in US_REGIONS else 1

    return tuple(sorted(plan, key=weight, reverse=True))  # sorted() is stable, reversed too
