"""Merge: dedupe by (account_id, job_id), latest observation wins, failures carry forward."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.accounts import Account
from aggregator.fetch import PartitionResult
from aggregator.merge import Merger
from aggregator.plan import Partition
from aggregator.records import JobEntry, JobRecord

ACCOUNT = Account(account_id="111111111111", role_arn="arn:aws:iam::111111111111:role/R")


def entry(job_id: str, state: str = "New") -> JobEntry:
    return JobEntry(
        account_id=ACCOUNT.account_id,
        job_id=job_id,
        job_state=state,
        job_type="IMPORT",
        snowball_type="EDGE",
        is_master=False,
        creation_date=None,
        description=None,
    )


def result(region: str, *entries: JobEntry, status: str = "ok", at: str = "T1") -> PartitionResult:
    return PartitionResult(
        partition=Partition(ACCOUNT, region),
        status=status,  # type: ignore[arg-type]
        region=region,
        entries=entries,
        observed_at=at,
        duration=0.0,
        requests=1,
        pages=1,
        retries=0,
        throttles=0,
        restarts=0,
        error_code=None if status == "ok" else "InternalFailure",
    )


def test_us_duplicates_collapse_with_regions_union() -> None:
    """The same job from two US regions is one record listing both regions."""
    m = Merger()
    m.add(result("us-east-1", entry("A"), entry("B")))
    m.add(result("us-west-2", entry("A"), entry("B")))
    records, stats = m.records(snapshot_id="S")
    assert [r.job_id for r in records] == ["A", "B"]
    assert records[0].regions == ("us-east-1", "us-west-2")
    assert stats.duplicates == 2


def test_latest_observation_wins() -> None:
    """A state that changed between two regions' chains ends with the later one."""
    m = Merger()
    m.add(result("us-east-1", entry("A", "New"), at="T1"))
    m.add(result("us-east-2", entry("A", "Complete"), at="T2"))
    records, _ = m.records(snapshot_id="S")
    assert records[0].job_state == "Complete"
    assert records[0].observed_at == "T2"


def test_regions_that_disagree_in_the_same_second_give_one_answer_in_any_order() -> None:
    """Three US regions answer differently about one job in the same second (a replica
    behind): the record is the same whichever partition finished last (the state furthest on
    in a job's life), where it was the last one's, so the job's state flapped between runs."""
    answers = [
        result("us-east-1", entry("A", "InTransitToAWS")),
        result("us-east-2", entry("A", "Complete")),
        result("us-west-2", entry("A", "WithAWS")),
    ]
    seen = set()
    for order in ((0, 1, 2), (2, 1, 0), (1, 2, 0), (2, 0, 1)):
        m = Merger()
        for i in order:
            m.add(answers[i])
        (record,), _ = m.records(snapshot_id="S")
        assert record.regions == ("us-east-1", "us-east-2", "us-west-2")
        seen.add(record.job_state)
    assert seen == {"Complete"}  # the furthest on in a job's life


def test_failed_partition_carries_previous_records_forward_as_stale() -> None:
    """Jobs of a failed partition stay in the snapshot, marked stale with last_seen kept."""
    previous = [
        JobRecord.from_json_dict(
            {
                "account_id": ACCOUNT.account_id,
                "job_id": job_id,
                "regions": [region],
                "snapshot_id": "OLD",
                "observed_at": "T0",
                "last_seen": "T0",
            }
        )
        for job_id, region in (("X", "eu-west-1"), ("Y", "eu-west-2"))
    ]
    m = Merger()
    m.add(result("eu-west-1", status="failed"))
    m.add(result("eu-west-2"))  # succeeded, and Y is gone: a real removal
    records, stats = m.records(snapshot_id="NEW", previous=previous)
    assert [(r.job_id, r.stale, r.last_seen, r.snapshot_id) for r in records] == [
        ("X", True, "T0", "NEW")
    ]
    assert stats.stale == 1


def us_record(job_id: str, regions: list[str]) -> JobRecord:
    return JobRecord.from_json_dict(
        {
            "account_id": ACCOUNT.account_id,
            "job_id": job_id,
            "regions": regions,
            "snapshot_id": "OLD",
            "observed_at": "T0",
        }
    )


def test_one_answering_us_region_makes_us_absence_a_removal() -> None:
    """A US job seen before from us-east-1 is removed, not stale, if us-east-2 answered now."""
    m = Merger()
    m.add(result("us-east-1", status="failed"))
    m.add(result("us-east-2"))
    records, stats = m.records(snapshot_id="NEW", previous=[us_record("U", ["us-east-1"])])
    assert records == [] and stats.stale == 0


def test_us_job_is_stale_when_every_us_region_failed() -> None:
    """With no US region answering, the account's US jobs are carried forward as stale."""
    m = Merger()
    for region in ("us-east-1", "us-east-2"):
        m.add(result(region, status="failed"))
    m.add(result("eu-west-1"))
    records, _ = m.records(snapshot_id="NEW", previous=[us_record("U", ["us-east-1"])])
    assert [(r.job_id, r.stale) for r in records] == [("U", True)]


def test_skipped_region_keeps_its_previous_jobs_as_stale() -> None:
    """A region that now answers that the account has not enabled it (skipped) has not shown
    its jobs deleted: they are carried forward, stale, as for a failure."""
    m = Merger()
    m.add(result("af-south-1", status="skipped"))
    records, stats = m.records(snapshot_id="NEW", previous=[us_record("Z", ["af-south-1"])])
    assert [(r.job_id, r.stale, r.snapshot_id) for r in records] == [("Z", True, "NEW")]
    assert stats.stale == 1


_ACCOUNTS = tuple(
    Account(account_id=f"11111111111{i}", role_arn=f"arn:aws:iam::11111111111{i}:role/R")
    for i in range(3)
)
_REGIONS = ("eu-west-1", "us-east-1", "us-east-2")


@st.composite
def _runs(draw: st.DrawFn) -> tuple[list[PartitionResult], list[JobRecord], int]:
    """Every (account, region) partition of three accounts x three regions, each ok (with a
    few of six jobs, in random states), failed or skipped, in a random finishing order; a
    previous snapshot of random jobs; and how many of the partitions `expect` is told of."""
    jobs = [f"J{i}" for i in range(6)]
    results = []
    for account in _ACCOUNTS:
        for region in _REGIONS:
            status = draw(st.sampled_from(["ok", "ok", "failed", "skipped"]))
            picked = draw(st.lists(st.sampled_from(jobs), unique=True)) if status == "ok" else []
            entries = tuple(
                JobEntry(
                    account.account_id,
                    j,
                    draw(st.sampled_from(["New", "Complete"])),
                    "IMPORT",
                    "EDGE",
                    False,
                    None,
                    None,
                )
                for j in picked
            )
            results.append(
                PartitionResult(
                    partition=Partition(account, region),
                    status=status,
                    region=region,
                    entries=entries,
                    observed_at=draw(st.sampled_from(["T1", "T2"])),
                    duration=0.0,
                    requests=1,
                    pages=1,
                    retries=0,
                    throttles=0,
                    restarts=0,
                )
            )
    order = draw(st.permutations(results))
    previous = sorted(
        {
            (a.account_id, j): JobRecord.from_json_dict(
                {
                    "account_id": a.account_id,
                    "job_id": j,
                    "regions": [r],
                    "snapshot_id": "OLD",
                    "observed_at": "T0",
                    "last_seen": "T0",
                }
            )
            for a, j, r in draw(
                st.lists(
                    st.tuples(
                        st.sampled_from(_ACCOUNTS), st.sampled_from(jobs), st.sampled_from(_REGIONS)
                    )
                )
            )
        }.values(),
        key=lambda r: (r.account_id, r.job_id),
    )
    return list(order), previous, draw(st.integers(len(results) - 3, len(results)))


@settings(max_examples=200, deadline=None)
@given(_runs())
def test_records_built_as_accounts_complete_equal_records_built_at_the_end(
    run: tuple[list[PartitionResult], list[JobRecord], int],
) -> None:
    """`expect` only moves work earlier: the same records and stats, stale carry-forward
    included, even when it was told of fewer partitions than arrive."""
    results, previous, told = run
    plain, early = Merger(), Merger()
    early.expect([r.partition for r in results][:told], snapshot_id="NEW")
    for r in results:
        plain.add(r)
        early.add(r)
    assert early.records(snapshot_id="NEW", previous=previous) == plain.records(
        snapshot_id="NEW", previous=previous
    )


def test_records_for_another_snapshot_than_expected_is_an_error() -> None:
    m = Merger()
    m.expect([Partition(ACCOUNT, "eu-west-1")], snapshot_id="NEW")
    m.add(result("eu-west-1", entry("A")))
    with pytest.raises(ValueError, match="expected 'NEW'"):
        m.records(snapshot_id="OTHER")
