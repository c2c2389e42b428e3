"""Plan: regions expand from botocore's endpoint data and US strategies shape partitions."""

from __future__ import annotations

from structlog.testing import capture_logs

from aggregator.accounts import Account
from aggregator.config import RegionsSettings, snowball_regions
from aggregator.plan import US_REGIONS, build_plan, expected_pages, longest_first, select_regions


def acct(n: int, partition: str = "aws") -> Account:
    return Account(
        account_id=f"{n:012d}",
        role_arn=f"arn:{partition}:iam::{n:012d}:role/R",
        partition=partition,
    )


def test_all_means_every_snowball_region_minus_exclude() -> None:
    """`all` is botocore's region list for snowball; `exclude` removes regions."""
    regions = select_regions(RegionsSettings(names=("all",), exclude=("eu-west-1",)))
    assert set(regions) == set(snowball_regions("aws")) - {"eu-west-1"}
    assert "us-east-1" in regions and "eu-west-1" not in regions


def test_us_strategy_all_queries_every_us_region() -> None:
    """With "all", each US region is its own partition."""
    plan = build_plan([acct(1)], RegionsSettings(names=("all",)))
    assert {p.region for p in plan} >= set(US_REGIONS)
    assert len(plan) == len(snowball_regions("aws"))


def test_us_strategy_one_queries_one_us_region_with_fallbacks() -> None:
    """With "one", an account has one US partition that falls back through the others."""
    plan = build_plan([acct(1)], RegionsSettings(names=("all",), us_strategy="one"))
    us = [p for p in plan if p.region in US_REGIONS]
    assert len(us) == 1
    assert us[0].region == "us-east-1"
    assert us[0].fallbacks == ("us-east-2", "us-west-2", "us-west-1")
    assert len(plan) == len(snowball_regions("aws")) - 3


def test_plan_interleaves_accounts() -> None:
    """Partitions are ordered round-robin across accounts, so no account goes last."""
    plan = build_plan([acct(1), acct(2)], RegionsSettings(names=("eu-west-1", "us-east-1")))
    assert [p.key for p in plan] == [
        "000000000001/eu-west-1",
        "000000000002/eu-west-1",
        "000000000001/us-east-1",
        "000000000002/us-east-1",
    ]


def test_regions_are_per_partition() -> None:
    """One region list serves every partition: each account gets its own partition's regions."""
    settings = RegionsSettings(names=("us-east-1", "eu-west-1", "cn-north-1", "us-gov-west-1"))
    plan = build_plan([acct(1), acct(2, "aws-cn"), acct(3, "aws-us-gov")], settings)
    by_account: dict[str, set[str]] = {}
    for p in plan:
        by_account.setdefault(p.account_id, set()).add(p.region)
    assert by_account == {
        "000000000001": {"us-east-1", "eu-west-1"},
        "000000000002": {"cn-north-1"},
        "000000000003": {"us-gov-west-1"},
    }


def test_all_expands_within_each_partition() -> None:
    """`all` means botocore's Snowball regions of the account's own partition."""
    for partition in ("aws-cn", "aws-us-gov"):
        plan = build_plan([acct(1, partition)], RegionsSettings(names=("all",)))
        assert tuple(sorted(p.region for p in plan)) == snowball_regions(partition)
        assert select_regions(RegionsSettings(), partition) == snowball_regions(partition)


def test_us_group_is_commercial_only() -> None:
    """us_strategy "one" folds the commercial US regions; GovCloud regions stay separate."""
    settings = RegionsSettings(names=("all",), us_strategy="one")
    gov = build_plan([acct(1, "aws-us-gov")], settings)
    assert sorted((p.region, p.fallbacks) for p in gov) == [
        ("us-gov-east-1", ()),
        ("us-gov-west-1", ()),
    ]
    assert not set(US_REGIONS) & set(snowball_regions("aws-us-gov"))


def test_partition_without_selected_regions_is_reported() -> None:
    """Accounts of a partition none of whose regions is selected get no partitions, and a
    warning says so."""
    with capture_logs() as logs:
        plan = build_plan(
            [acct(1), acct(2, "aws-cn"), acct(3, "aws-cn")], RegionsSettings(names=("eu-west-1",))
        )
    assert [p.key for p in plan] == ["000000000001/eu-west-1"]
    assert [e for e in logs if e["event"] == "plan.no_regions"] == [
        {
            "event": "plan.no_regions",
            "log_level": "warning",
            "partition": "aws-cn",
            "accounts": 2,
            "reason": "regions.names selects no region of aws-cn",
        }
    ]


def test_longest_chains_start_first() -> None:
    """Known chains by previous pages (longest first); unknown ones count as one page, two
    in a US region; equals keep the round-robin order."""
    accounts = [Account(f"11111111111{i}", f"arn:aws:iam::11111111111{i}:role/r") for i in (1, 2)]
    settings = RegionsSettings(names=("eu-west-1", "us-east-1", "ap-south-1"))
    plan = build_plan(accounts, settings)
    manifest = {
        "partition_status": [
            {"account_id": "111111111112", "region": "ap-south-1", "status": "ok", "jobs": 250},
            {"account_id": "111111111111", "region": "eu-west-1", "status": "ok", "jobs": 101},
            {"account_id": "111111111111", "region": "ap-south-1", "status": "ok", "jobs": 0},
            {"account_id": "111111111112", "region": "eu-west-1", "status": "failed", "jobs": 0},
        ]
    }
    pages = expected_pages(manifest)
    assert pages == {
        ("111111111112", "ap-south-1"): 3,
        ("111111111111", "eu-west-1"): 2,
        ("111111111111", "ap-south-1"): 1,
    }
    ordered = [p.key for p in longest_first(plan, pages)]
    assert ordered == [
        "111111111112/ap-south-1",
        "111111111111/eu-west-1",
        "111111111111/us-east-1",
        "111111111112/us-east-1",
        "111111111111/ap-south-1",
        "111111111112/eu-west-1",
    ]
    # Without history: US first, otherwise the round-robin order.
    assert [p.region for p in longest_first(plan, {})][:2] == ["us-east-1", "us-east-1"]
    rest = [p for p in longest_first(plan, {}) if p.region != "us-east-1"]
    assert rest == [p for p in plan if p.region != "us-east-1"]
    assert expected_pages(None) == {}


def test_history_found_under_a_fallback_region_orders_the_chain() -> None:
    """With `us_strategy = "one"` the manifest records the US region that answered, which
    may be a fallback: that history still makes the account's US chain start first."""
    settings = RegionsSettings(names=("us-east-1", "us-east-2", "eu-west-1"), us_strategy="one")
    plan = build_plan([acct(1), acct(2)], settings)
    answered_by_fallback = {(acct(2).account_id, "us-east-2"): 30}
    first = longest_first(plan, answered_by_fallback)[0]
    assert (first.account_id, first.region) == (acct(2).account_id, "us-east-1")
    assert "us-east-2" in first.fallbacks
