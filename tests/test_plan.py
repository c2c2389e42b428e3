"""Plan: regions expand from botocore's endpoint data and US strategies shape partitions."""

from __future__ import annotations

from aggregator.accounts import Account, static_accounts
from aggregator.config import AccountsSettings, RegionsSettings, snowball_regions
from aggregator.plan import US_REGIONS, build_plan, select_regions


def acct(n: int) -> Account:
    return Account(account_id=f"{n:012d}", role_arn=f"arn:aws:iam::{n:012d}:role/R")


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


def test_static_accounts_merge_sources_and_exclude() -> None:
    """List entries keep their role, ids get role_name's ARN, excluded ids vanish."""
    settings = AccountsSettings.model_validate(
        {
            "role_name": "Reader",
            "external_id": "ext",
            "ids": ("111111111111", "222222222222", "333333333333"),
            "exclude": ("222222222222",),
            "list": (
                {"id": "333333333333", "role_arn": "arn:aws:iam::333333333333:role/Other"},
                {"id": "444444444444", "role_arn": "arn:aws-cn:iam::444444444444:role/Cn"},
            ),
        }
    )
    accounts = {a.account_id: a for a in static_accounts(settings)}
    assert set(accounts) == {"111111111111", "333333333333", "444444444444"}
    assert accounts["111111111111"].role_arn == "arn:aws:iam::111111111111:role/Reader"
    assert accounts["111111111111"].external_id == "ext"
    assert accounts["333333333333"].role_arn.endswith(":role/Other")
    assert accounts["444444444444"].partition == "aws-cn"
