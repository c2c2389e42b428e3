"""Accounts: configured sources merge, and Organizations discovery finds exactly the ACTIVE
accounts, through real aiobotocore clients against moto's server and the sandbox on loopback."""

from __future__ import annotations

import collections
import itertools
import logging
import os
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
from aiobotocore.session import AioSession

from aggregator.accounts import (
    Account,
    DiscoveryError,
    discover_accounts,
    merge_accounts,
    resolve_accounts,
    static_accounts,
)
from aggregator.config import AccountsSettings
from aggregator.retry import RetryPolicy

from .conftest import SandboxFactory

FAST = RetryPolicy(max_attempts=3, base_delay=0.0, max_delay=0.0, max_restarts=2)


def by_operation(requests: collections.Counter[tuple[str, str]]) -> dict[str, int]:
    """Discovery's request counts by operation, whatever their outcome."""
    totals: collections.Counter[str] = collections.Counter()
    for (operation, _), n in requests.items():
        totals[operation] += n
    return dict(totals)


def accounts_settings(**values: Any) -> AccountsSettings:
    return AccountsSettings.model_validate(values)


def org_settings(**organizations: Any) -> AccountsSettings:
    return accounts_settings(organizations={"enabled": True, **organizations})


async def no_sleep(seconds: float) -> None:
    return None


# --- configured sources ---------------------------------------------------------------------


def test_static_accounts_merge_sources_and_exclude() -> None:
    """List entries keep their role, ids get role_name's ARN, excluded ids vanish."""
    settings = accounts_settings(
        role_name="Reader",
        external_id="ext",
        ids=("111111111111", "222222222222", "333333333333"),
        exclude=("222222222222",),
        list=(
            {"id": "333333333333", "role_arn": "arn:aws:iam::333333333333:role/Other"},
            {"id": "444444444444", "role_arn": "arn:aws-cn:iam::444444444444:role/Cn"},
        ),
    )
    accounts = {a.account_id: a for a in static_accounts(settings)}
    assert set(accounts) == {"111111111111", "333333333333", "444444444444"}
    assert accounts["111111111111"].role_arn == "arn:aws:iam::111111111111:role/Reader"
    assert accounts["111111111111"].external_id == "ext"
    assert accounts["333333333333"].role_arn.endswith(":role/Other")
    assert accounts["444444444444"].partition == "aws-cn"


def test_ids_take_the_configured_partition() -> None:
    """`accounts.partition` shapes the role ARNs of plain ids (GovCloud, China)."""
    (account,) = static_accounts(accounts_settings(ids=("111111111111",), partition="aws-us-gov"))
    assert account.partition == "aws-us-gov"
    assert account.role_arn == "arn:aws-us-gov:iam::111111111111:role/SnowballInventoryReader"


def test_merge_accounts_explicit_wins() -> None:
    """An explicit account replaces a discovered one with the same id; the union is sorted."""
    discovered = [
        Account("222222222222", "arn:aws:iam::222222222222:role/R"),
        Account("111111111111", "arn:aws:iam::111111111111:role/R"),
    ]
    explicit = [Account("222222222222", "arn:aws:iam::222222222222:role/Own", "x")]
    merged = merge_accounts(explicit, discovered)
    assert [a.account_id for a in merged] == ["111111111111", "222222222222"]
    assert merged[1].role_arn.endswith("/Own") and merged[1].external_id == "x"


async def test_resolve_without_discovery_is_static() -> None:
    """With discovery off no hub is needed and the configured accounts are returned."""
    settings = accounts_settings(ids=("111111111111",))
    assert await resolve_accounts(settings) == static_accounts(settings)


# --- moto: an organisation with nested OUs and suspended accounts ---------------------------


@dataclass
class Org:
    """What the test organisation holds: ids by where they are, and which are suspended."""

    url: str
    root: str
    ous: dict[str, str] = field(default_factory=dict)
    under: dict[str, list[str]] = field(default_factory=dict)  # parent id -> account ids
    children: dict[str, list[str]] = field(default_factory=dict)  # parent id -> OU ids
    suspended: set[str] = field(default_factory=set)

    def subtree(self, parent: str) -> set[str]:
        """Every account under `parent`, at any depth."""
        found = set(self.under.get(parent, ()))
        for child in self.children.get(parent, ()):
            found |= self.subtree(child)
        return found

    def active(self, ids: set[str]) -> set[str]:
        return ids - self.suspended


# name: (parent name, accounts, of which suspended)
_LAYOUT = {
    "workloads": ("root", 4, 1),
    "prod": ("workloads", 5, 0),
    "prod-eu": ("prod", 12, 2),
    "dev": ("workloads", 3, 0),
    "closed": ("root", 3, 3),
}


def _build_org(url: str) -> Org:
    """Through the Organizations API: OUs three levels deep, 30 member accounts plus the
    management account, 7 of them closed (SUSPENDED)."""
    import boto3

    client = boto3.client("organizations", endpoint_url=url, region_name="us-east-1")
    management = client.create_organization(FeatureSet="ALL")["Organization"]["MasterAccountId"]
    root = client.list_roots()["Roots"][0]["Id"]
    org = Org(url=url, root=root)
    org.under[root] = [management]
    ids = {"root": root}
    serial = itertools.count()

    def add_accounts(parent: str, count: int, closed: int) -> None:
        for k in range(count):
            n = next(serial)
            status = client.create_account(AccountName=f"member-{n}", Email=f"m{n}@example.com")
            account_id = status["CreateAccountStatus"]["AccountId"]
            if parent != root:
                client.move_account(
                    AccountId=account_id, SourceParentId=root, DestinationParentId=parent
                )
            org.under.setdefault(parent, []).append(account_id)
            if k < closed:
                client.close_account(AccountId=account_id)
                org.suspended.add(account_id)

    add_accounts(root, 3, 1)
    for name, (parent_name, count, closed) in _LAYOUT.items():
        parent = ids[parent_name]
        ou = client.create_organizational_unit(ParentId=parent, Name=name)
        ids[name] = org.ous[name] = ou["OrganizationalUnit"]["Id"]
        org.children.setdefault(parent, []).append(ids[name])
        add_accounts(ids[name], count, closed)
    return org


@pytest.fixture(scope="module")
def moto_org() -> Iterator[Org]:
    """moto's server on loopback holding the test organisation (built once per module; the
    tests only read it)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        # moto keeps its state per process: start from an empty world.
        with urllib.request.urlopen(urllib.request.Request(url + "/moto-api/reset", b"")):
            pass
        with pytest.MonkeyPatch.context() as env:
            for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
                env.delenv(name, raising=False)
            env.setenv("AWS_ACCESS_KEY_ID", "testing")
            env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            env.setenv("AWS_CONFIG_FILE", os.devnull)
            env.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
            org = _build_org(url)
        yield org
    finally:
        server.stop()


@pytest.fixture
def org(moto_org: Org, monkeypatch: pytest.MonkeyPatch) -> Org:
    """The test organisation, with the hub's standard SDK settings pointing at moto."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_ORGANIZATIONS", moto_org.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return moto_org


async def discover(settings: AccountsSettings, **options: Any) -> tuple[Account, ...]:
    options.setdefault("policy", FAST)
    options.setdefault("sleep", no_sleep)
    return await discover_accounts(AioSession(), settings, **options)


def ids_of(accounts: tuple[Account, ...]) -> list[str]:
    return [a.account_id for a in accounts]


async def test_list_accounts_finds_exactly_the_active_accounts(org: Org) -> None:
    """ListAccounts, paginated, keeps the ACTIVE accounts (management included), no others."""
    everyone = org.subtree(org.root)
    assert len(everyone) == 31 and len(org.suspended) == 7
    requests: collections.Counter[tuple[str, str]] = collections.Counter()
    found = await discover(org_settings(), requests=requests)
    assert ids_of(found) == sorted(org.active(everyone))
    assert by_operation(requests) == {"ListAccounts": 2}  # 31 accounts, 20 per page
    assert all(
        a.role_arn == f"arn:aws:iam::{a.account_id}:role/SnowballInventoryReader"
        and a.partition == "aws"
        and a.external_id is None
        for a in found
    )


async def test_ou_walk_is_recursive(org: Org) -> None:
    """An OU id covers its accounts and those of every OU below it, ACTIVE only."""
    requests: collections.Counter[tuple[str, str]] = collections.Counter()
    found = await discover(org_settings(ou_ids=(org.ous["workloads"],)), requests=requests)
    expected = org.active(org.subtree(org.ous["workloads"]))
    assert len(expected) == 21
    assert ids_of(found) == sorted(expected)
    # workloads, prod, prod-eu, dev: each parent asked once for accounts and once for OUs.
    assert by_operation(requests) == {
        "ListAccountsForParent": 4,
        "ListOrganizationalUnitsForParent": 4,
    }


async def test_root_walk_equals_list_accounts(org: Org) -> None:
    """Walking from the root finds what ListAccounts finds."""
    walked = await discover(org_settings(ou_ids=(org.root,)))
    listed = await discover(org_settings())
    assert walked == listed


async def test_overlapping_ou_ids_are_walked_once(org: Org) -> None:
    """An OU named directly and through its parent is listed once; no duplicates."""
    requests: collections.Counter[tuple[str, str]] = collections.Counter()
    settings = org_settings(ou_ids=(org.ous["prod-eu"], org.ous["workloads"], org.ous["prod"]))
    found = await discover(settings, requests=requests)
    assert ids_of(found) == sorted(org.active(org.subtree(org.ous["workloads"])))
    assert by_operation(requests)["ListAccountsForParent"] == 4


async def test_include_exclude_and_explicit_entries(org: Org) -> None:
    """include keeps only those discovered ids, exclude removes any, explicit entries win."""
    active = sorted(org.active(org.subtree(org.root)))
    kept, dropped, own_role = active[0], active[1], active[2]
    outsider = "999999999999"
    settings = accounts_settings(
        role_name="Reader",
        external_id="ext",
        ids=(outsider, dropped),
        exclude=(dropped,),
        list=({"id": own_role, "role_arn": f"arn:aws:iam::{own_role}:role/Own"},),
        organizations={"enabled": True, "include": (kept, dropped, *sorted(org.suspended))},
    )
    found = {a.account_id: a for a in await resolve_accounts(settings, AioSession(), policy=FAST)}
    # Suspended ids in include stay out; the outsider and the list entry are explicit.
    assert sorted(found) == sorted({kept, own_role, outsider})
    assert found[kept].role_arn == f"arn:aws:iam::{kept}:role/Reader"
    assert found[kept].external_id == "ext"
    assert found[own_role].role_arn.endswith("role/Own")


async def test_unknown_ou_is_a_clear_error(org: Org) -> None:
    """An OU id that is not in the organization names itself in a one-line error."""
    missing = org.ous["dev"][:-4] + "zzzz"
    with pytest.raises(DiscoveryError) as info:
        await discover(org_settings(ou_ids=(missing,)))
    message = str(info.value)
    assert message.startswith("Organizations discovery failed: ListAccountsForParent: ")
    assert "ParentNotFoundException" in message and missing in message
    assert "\n" not in message


async def test_an_inventory_with_no_account_is_an_error(org: Org) -> None:
    """A discovery whose include list matches no ACTIVE account (a typo), with no account
    configured explicitly, fails in one line instead of returning an empty inventory, which
    a run would publish as complete with every job gone. With an explicit account, that one
    is inventoried."""
    with pytest.raises(DiscoveryError) as info:
        await resolve_accounts(
            org_settings(include=("999999999999",)), AioSession(), policy=FAST, sleep=no_sleep
        )
    message = str(info.value)
    assert info.value.code == "NoAccounts"
    assert "include" in message and "\n" not in message
    explicit = accounts_settings(
        ids=("123456789012",), organizations={"enabled": True, "include": ("999999999999",)}
    )
    found = await resolve_accounts(explicit, AioSession(), policy=FAST, sleep=no_sleep)
    assert ids_of(found) == ["123456789012"]


async def test_a_hub_profile_that_does_not_exist_is_a_clear_error(org: Org) -> None:
    """The hub session's profile is missing from the AWS config: a one-line DiscoveryError
    naming it, not botocore's exception escaping."""
    with pytest.raises(DiscoveryError) as info:
        await discover_accounts(AioSession(profile="no-such-profile"), org_settings(), policy=FAST)
    message = str(info.value)
    assert info.value.code == "ProfileNotFound"
    assert "no-such-profile" in message and "[partitions.aws] profile" in message
    assert "\n" not in message


def _answer_error(code: str, calls: int) -> Any:
    """A botocore `before-call` handler answering error `code` to the first `calls` calls
    (what the service says when it throttles us or the hub is in no organization)."""
    seen = collections.Counter[str]()

    class _Http:
        status_code = 400
        headers: ClassVar[dict[str, str]] = {}

    def handler(model: Any, **_: Any) -> Any:
        seen["calls"] += 1
        if seen["calls"] > calls:
            return None
        return _Http(), {
            "Error": {"Code": code, "Message": f"{code} (injected)"},
            "ResponseMetadata": {"HTTPStatusCode": 400},
        }

    return handler


async def test_no_organization_is_a_clear_error(org: Org) -> None:
    """A hub outside any organization gets an error saying so."""
    session = AioSession()
    session.register(
        "before-call.organizations.ListAccounts",
        _answer_error("AWSOrganizationsNotInUseException", 1),
    )
    with pytest.raises(DiscoveryError) as info:
        await discover_accounts(session, org_settings(), policy=FAST, sleep=no_sleep)
    assert info.value.code == "AWSOrganizationsNotInUseException"
    assert "not a member of an organization" in str(info.value)


async def test_throttling_is_retried_with_backoff(org: Org) -> None:
    """TooManyRequestsException is retried within the attempt budget, with backoff waits."""
    session = AioSession()
    session.register(
        "before-call.organizations.ListAccounts", _answer_error("TooManyRequestsException", 2)
    )
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    requests: collections.Counter[tuple[str, str]] = collections.Counter()
    policy = RetryPolicy(max_attempts=3, base_delay=0.5, max_delay=1.0)
    found = await discover_accounts(
        session, org_settings(), policy=policy, sleep=sleep, requests=requests
    )
    assert ids_of(found) == sorted(org.active(org.subtree(org.root)))
    assert len(waits) == 2 and all(0 <= w <= 1.0 for w in waits)
    assert requests == {("ListAccounts", "TooManyRequestsException"): 2, ("ListAccounts", "ok"): 2}


async def test_throttling_gives_up_after_the_budget(org: Org) -> None:
    """Past `max_attempts` the throttle becomes a DiscoveryError saying how often it tried."""
    session = AioSession()
    session.register(
        "before-call.organizations.ListAccounts", _answer_error("TooManyRequestsException", 100)
    )
    with pytest.raises(DiscoveryError) as info:
        await discover_accounts(session, org_settings(), policy=FAST, sleep=no_sleep)
    assert info.value.code == "TooManyRequestsException"
    assert "gave up after 3 attempts" in str(info.value)


# --- the sandbox: flat ListAccounts with suspended accounts, denials, token expiry ----------


async def test_sandbox_flat_listing_skips_suspended(make_sandbox: SandboxFactory) -> None:
    """45 accounts of which 7 SUSPENDED: the 38 ACTIVE ones, in 3 pages."""
    sb = await make_sandbox(accounts=45, suspended=7, seed=4)
    requests: collections.Counter[tuple[str, str]] = collections.Counter()
    found = await discover(org_settings(), requests=requests)
    assert ids_of(found) == sorted(sb.active_account_ids)
    assert len(found) == 38
    assert by_operation(requests) == {"ListAccounts": 3}


async def test_sandbox_partition_shapes_role_arns(make_sandbox: SandboxFactory) -> None:
    """Discovery in GovCloud builds aws-us-gov role ARNs."""
    sb = await make_sandbox(accounts=3, partition="aws-us-gov", regions=("us-gov-west-1",))
    settings = accounts_settings(
        partition="aws-us-gov", role_name="R", organizations={"enabled": True}
    )
    found = await discover(settings)
    assert [a.role_arn for a in found] == [
        f"arn:aws-us-gov:iam::{i}:role/R" for i in sorted(sb.active_account_ids)
    ]
    assert {a.partition for a in found} == {"aws-us-gov"}


async def test_member_principal_is_denied_with_a_hint(make_sandbox: SandboxFactory) -> None:
    """A principal outside the management account gets AccessDenied and what to check."""
    sb = await make_sandbox(accounts=2)
    member = sb.account_ids[0]
    async with AioSession().create_client("sts", region_name="us-east-1") as sts:
        creds = (
            await sts.assume_role(
                RoleArn=f"arn:aws:iam::{member}:role/SnowballInventoryReader",
                RoleSessionName="test",
            )
        )["Credentials"]
    session = AioSession()
    session.set_credentials(creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"])
    with pytest.raises(DiscoveryError) as info:
        await discover_accounts(session, org_settings(), policy=FAST, sleep=no_sleep)
    message = str(info.value)
    assert "ListAccounts: AccessDeniedException" in message
    assert "management account or a delegated administrator" in message
    assert creds["SecretAccessKey"] not in message and creds["SessionToken"] not in message


async def test_expired_next_token_restarts_the_listing(make_sandbox: SandboxFactory) -> None:
    """A NextToken rejected as expired restarts ListAccounts from the first page."""
    from aggregator.sandbox import Faults

    # The sandbox reads its clock once per ListAccounts: page 2 of the first pass arrives
    # "100 s" after page 1 (token expired), everything after is instantaneous.
    times = iter([0.0, 100.0])
    sb = await make_sandbox(
        faults=Faults(token_ttl=10.0), clock=lambda: next(times, 100.0), accounts=45
    )
    requests: collections.Counter[tuple[str, str]] = collections.Counter()
    found = await discover(org_settings(), requests=requests)
    assert ids_of(found) == sorted(sb.active_account_ids)
    assert by_operation(requests) == {"ListAccounts": 2 + 3}


async def test_token_that_never_holds_gives_up(make_sandbox: SandboxFactory) -> None:
    """When every NextToken is rejected, discovery stops after `max_restarts` restarts."""
    from aggregator.sandbox import Faults

    ticks = itertools.count(step=100.0)
    await make_sandbox(faults=Faults(token_ttl=10.0), clock=lambda: next(ticks), accounts=45)
    requests: collections.Counter[tuple[str, str]] = collections.Counter()
    with pytest.raises(DiscoveryError) as info:
        await discover(org_settings(), requests=requests)
    assert info.value.code == "InvalidNextToken"
    assert by_operation(requests) == {"ListAccounts": 2 * (FAST.max_restarts + 1)}


@pytest.mark.parametrize("torn", [2, 100])
async def test_a_torn_account_page_is_asked_again_never_taken_as_the_last(
    make_sandbox: SandboxFactory, torn: int
) -> None:
    """A 200 ListAccounts whose body is torn (botocore reads it as a result without
    `Accounts`) is asked again within the budget, or discovery fails; it is never taken as an
    empty last page, which dropped every later account from the run (their jobs became
    `job_removed`, in a run called complete)."""
    from aggregator.sandbox import Faults

    sb = await make_sandbox(accounts=45, seed=4, faults=Faults(torn_account_pages=torn))
    requests: collections.Counter[tuple[str, str]] = collections.Counter()
    if torn == 2:
        found = await discover(org_settings(), requests=requests)
        assert ids_of(found) == sorted(sb.active_account_ids)
        assert requests == {("ListAccounts", "ok"): 3, ("ListAccounts", "MalformedResponse"): 2}
    else:
        with pytest.raises(DiscoveryError) as info:
            await discover(org_settings(), requests=requests)
        assert info.value.code == "MalformedResponse"
        assert "gave up after 3 attempts" in str(info.value)
