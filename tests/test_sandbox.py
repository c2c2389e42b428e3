"""The sandbox, driven by real aiobotocore clients over loopback HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import botocore.exceptions
import botocore.parsers
import botocore.session
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from hypothesis import given
from hypothesis import strategies as st

from aggregator.sandbox import Faults, FleetSpec, Sandbox, Stats, cbor_model_path
from aggregator.sandbox.command import READY_PREFIX, add_arguments, build
from aggregator.sandbox.fleet import UNKNOWN_JOB_STATES, UNKNOWN_SNOWBALL_TYPES
from aggregator.sandbox.tokens import PageToken, TokenSigner

ACCOUNT = "200000000001"
OTHER = "200000000002"
US = ("us-east-1", "us-east-2", "us-west-1", "us-west-2")
REGIONS = (*US, "eu-west-1", "af-south-1")
NO_RETRY = AioConfig(retries={"total_max_attempts": 1})

Client = Any  # aiobotocore clients are generated at runtime


class FakeClock:
    """A sandbox clock that only moves when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def session() -> AioSession:
    """One botocore session (and its parsed models) for the whole module."""
    return get_session()


@pytest.fixture(scope="module")
def cbor_session() -> Iterator[AioSession]:
    """A session whose snowball model resolves to Smithy RPC v2 CBOR."""
    with tempfile.TemporaryDirectory() as tmp:
        cbor = get_session()
        cbor.set_config_variable("data_path", str(cbor_model_path(tmp)))
        yield cbor


class Aws:
    """Starts sandboxes and opens clients against them; closes everything at teardown."""

    def __init__(self, stack: contextlib.AsyncExitStack, session: AioSession) -> None:
        self.stack = stack
        self.session = session
        self.sb: Sandbox

    async def start(self, **kwargs: Any) -> Sandbox:
        kwargs.setdefault("fleet", FleetSpec(accounts=5, seed=1, regions=REGIONS))
        self.sb = await self.stack.enter_async_context(Sandbox(**kwargs))
        return self.sb

    async def client(
        self,
        service: str,
        region: str = "us-east-1",
        *,
        creds: dict[str, Any] | None = None,
        session: AioSession | None = None,
        config: AioConfig = NO_RETRY,
    ) -> Client:
        if creds is None:
            keys = {
                "aws_access_key_id": self.sb.hub_access_key_id,
                "aws_secret_access_key": self.sb.hub_secret_access_key,
            }
        else:
            keys = {
                "aws_access_key_id": creds["AccessKeyId"],
                "aws_secret_access_key": creds["SecretAccessKey"],
                "aws_session_token": creds["SessionToken"],
            }
        factory = (session or self.session).create_client(
            service, region_name=region, endpoint_url=self.sb.url, config=config, **keys
        )
        return await self.stack.enter_async_context(factory)

    async def assume(self, account_id: str, **kwargs: Any) -> dict[str, Any]:
        sts = await self.client("sts")
        response = await sts.assume_role(
            RoleArn=f"arn:aws:iam::{account_id}:role/SnowballInventoryReader",
            RoleSessionName="sandbox-test",
            **kwargs,
        )
        credentials: dict[str, Any] = response["Credentials"]
        return credentials

    async def snowball(
        self,
        account_id: str,
        region: str = "us-east-1",
        *,
        session: AioSession | None = None,
        config: AioConfig = NO_RETRY,
    ) -> Client:
        creds = await self.assume(account_id)
        return await self.client("snowball", region, creds=creds, session=session, config=config)


@pytest.fixture
async def aws(session: AioSession) -> AsyncIterator[Aws]:
    """A factory for sandboxes and clients, all closed after the test."""
    async with contextlib.AsyncExitStack() as stack:
        yield Aws(stack, session)


async def list_all(client: Client, **kwargs: Any) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    async for page in client.get_paginator("list_jobs").paginate(**kwargs):
        assert "JobListEntries" in page
        entries.extend(page["JobListEntries"])
    return entries


def iso_ms(value: dt.datetime) -> str:
    utc = value.astimezone(dt.UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def records(account_id: str, by_region: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Merge ListJobs entries per region into truth-shaped records."""
    merged: dict[str, dict[str, Any]] = {}
    for region, entries in by_region.items():
        for entry in entries:
            record = merged.setdefault(
                entry["JobId"],
                {
                    "account_id": account_id,
                    "job_id": entry["JobId"],
                    "job_state": entry["JobState"],
                    "job_type": entry["JobType"],
                    "snowball_type": entry["SnowballType"],
                    "is_master": entry["IsMaster"],
                    "creation_date": iso_ms(entry["CreationDate"]),
                    "description": entry.get("Description"),
                    "regions": [],
                },
            )
            record["regions"].append(region)
    for record in merged.values():
        record["regions"].sort()
    return sorted(merged.values(), key=lambda r: r["job_id"])


def without_home(truth: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: v for k, v in record.items() if k != "home_region"} for record in truth]


def error_code(excinfo: pytest.ExceptionInfo[botocore.exceptions.ClientError]) -> str:
    return str(excinfo.value.response["Error"]["Code"])


def http_status(excinfo: pytest.ExceptionInfo[botocore.exceptions.ClientError]) -> int:
    return int(excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"])


# --- listing ----------------------------------------------------------------------------------


async def test_listing_every_region_equals_truth(aws: Aws) -> None:
    """AssumeRole, then ListJobs paginated in every region, merged, equals the truth."""
    fleet = FleetSpec(
        accounts=3,
        seed=4,
        regions=REGIONS,
        jobs={(ACCOUNT, "us-west-2"): 230, (ACCOUNT, "eu-west-1"): 7},
    )
    sb = await aws.start(fleet=fleet)
    creds = await aws.assume(ACCOUNT)
    by_region = {}
    for region in REGIONS:
        client = await aws.client("snowball", region, creds=creds)
        by_region[region] = await list_all(client)
    assert len(by_region["us-west-2"]) >= 230
    assert records(ACCOUNT, by_region) == without_home(sb.truth(accounts=[ACCOUNT]))
    assert sb.stats().requests["snowball:ListJobs"] > len(REGIONS)


async def test_us_regions_share_one_list(aws: Aws) -> None:
    """ListJobs in any US region returns the same jobs: those of all four US regions."""
    sb = await aws.start()
    creds = await aws.assume(ACCOUNT)
    listings = [await list_all(await aws.client("snowball", r, creds=creds)) for r in US]
    assert all(listing == listings[0] for listing in listings)
    us_truth = [r for r in sb.truth(accounts=[ACCOUNT]) if r["home_region"] in US]
    assert sorted(e["JobId"] for e in listings[0]) == sorted(str(r["job_id"]) for r in us_truth)
    assert all(r["regions"] == sorted(US) for r in us_truth)


async def test_json_and_cbor_return_identical_entries(aws: Aws, cbor_session: AioSession) -> None:
    """The JSON 1.1 and RPC v2 CBOR protocols page through identical entries."""
    await aws.start(
        fleet=FleetSpec(accounts=2, seed=9, regions=REGIONS, jobs={(ACCOUNT, "us-east-1"): 150})
    )
    as_json = await aws.snowball(ACCOUNT)
    as_cbor = await aws.snowball(ACCOUNT, session=cbor_session)
    assert as_json.meta.service_model.resolved_protocol == "json"
    assert as_cbor.meta.service_model.resolved_protocol == "smithy-rpc-v2-cbor"
    json_entries = await list_all(as_json, PaginationConfig={"PageSize": 40})
    cbor_entries = await list_all(as_cbor, PaginationConfig={"PageSize": 40})
    assert len(json_entries) >= 150
    assert json_entries == cbor_entries


async def test_listing_order_is_newest_first(aws: Aws) -> None:
    """Entries come newest CreationDate first, ties broken by JobId."""
    await aws.start(
        fleet=FleetSpec(accounts=2, regions=REGIONS, jobs={(ACCOUNT, "eu-west-1"): 120})
    )
    entries = await list_all(await aws.snowball(ACCOUNT, "eu-west-1"))
    keys = [(-e["CreationDate"].timestamp(), e["JobId"]) for e in entries]
    assert keys == sorted(keys)


async def test_region_outside_the_fleet_lists_nothing(aws: Aws) -> None:
    """A region the fleet does not cover answers an empty list, not an error."""
    await aws.start()
    page = await (await aws.snowball(ACCOUNT, "ap-south-1")).list_jobs()
    assert page["JobListEntries"] == []
    assert "NextToken" not in page


async def test_unknown_enum_values_survive_parsing(aws: Aws, cbor_session: AioSession) -> None:
    """States and device types unknown to botocore's model reach the caller verbatim."""
    sb = await aws.start(
        fleet=FleetSpec(accounts=2, seed=3, regions=REGIONS, jobs={(ACCOUNT, "eu-west-1"): 600})
    )
    job_id = sb.add_job(
        ACCOUNT, "eu-west-1", job_state="FutureState", snowball_type="V9_NEW", job_type="FUTURE"
    )
    for session in (None, cbor_session):
        entries = await list_all(await aws.snowball(ACCOUNT, "eu-west-1", session=session))
        mine = next(e for e in entries if e["JobId"] == job_id)
        assert (mine["JobState"], mine["SnowballType"], mine["JobType"]) == (
            "FutureState",
            "V9_NEW",
            "FUTURE",
        )
        assert {e["JobState"] for e in entries} >= set(UNKNOWN_JOB_STATES)
        assert {e["SnowballType"] for e in entries} >= set(UNKNOWN_SNOWBALL_TYPES)


def test_fleet_covers_every_model_enum_value() -> None:
    """A large list holds every JobState, JobType and SnowballType of botocore's model."""
    model = botocore.session.get_session().get_service_model("snowball")
    truth = Sandbox(
        fleet=FleetSpec(
            accounts=1, regions=("eu-west-1",), jobs={("200000000000", "eu-west-1"): 3000}
        )
    ).truth()
    for shape, field in (
        ("JobState", "job_state"),
        ("JobType", "job_type"),
        ("SnowballType", "snowball_type"),
    ):
        assert set(model.shape_for(shape).enum) <= {r[field] for r in truth}
    descriptions = [r["description"] for r in truth]
    assert None in descriptions
    assert any(isinstance(d, str) and "\n" in d for d in descriptions)
    assert any(isinstance(d, str) and not d.isascii() for d in descriptions)


def test_same_seed_same_truth() -> None:
    """Two fleets from one seed hold the same jobs; another seed holds others."""
    spec = FleetSpec(accounts=30, seed=11, regions=REGIONS)
    first = Sandbox(fleet=spec).truth()
    assert first == Sandbox(fleet=spec).truth()
    assert first != Sandbox(fleet=replace(spec, seed=12)).truth()
    assert len({r["job_id"] for r in first}) == len(first)


def test_jobs_override_sets_exact_counts() -> None:
    """An explicit (account, region) count yields exactly that many jobs in that region."""
    spec = FleetSpec(
        accounts=2, regions=REGIONS, jobs={(ACCOUNT, "us-east-2"): 1234, (ACCOUNT, "af-south-1"): 0}
    )
    truth = Sandbox(fleet=spec).truth(accounts=[ACCOUNT])
    assert sum(r["home_region"] == "us-east-2" for r in truth) == 1234
    assert sum(r["home_region"] == "af-south-1" for r in truth) == 0
    with pytest.raises(ValueError, match="region"):
        Sandbox(fleet=FleetSpec(regions=("eu-west-1",), jobs={("200000000000", "mars-1"): 1}))


# --- pagination tokens ------------------------------------------------------------------------


async def test_altered_or_foreign_token_is_rejected(aws: Aws, cbor_session: AioSession) -> None:
    """A NextToken that was altered, or minted for another account, is InvalidNextToken."""
    await aws.start(
        fleet=FleetSpec(
            accounts=3, regions=REGIONS, jobs={(ACCOUNT, "us-east-1"): 30, (OTHER, "us-east-1"): 30}
        )
    )
    client = await aws.snowball(ACCOUNT)
    other = await aws.snowball(OTHER)
    token = (await client.list_jobs(MaxResults=5))["NextToken"]
    middle = len(token) // 2
    altered = token[:middle] + ("A" if token[middle] != "A" else "B") + token[middle + 1 :]
    for bad_client, bad_token in ((client, altered), (client, token + "x"), (other, token)):
        with pytest.raises(bad_client.exceptions.InvalidNextTokenException):
            await bad_client.list_jobs(NextToken=bad_token)
    cbor = await aws.snowball(ACCOUNT, session=cbor_session)
    with pytest.raises(cbor.exceptions.InvalidNextTokenException):
        await cbor.list_jobs(NextToken=altered)
    assert (await client.list_jobs(NextToken=token))["JobListEntries"]


async def test_token_from_another_sandbox_is_rejected(aws: Aws, session: AioSession) -> None:
    """Each sandbox signs tokens with its own secret."""
    fleet = FleetSpec(accounts=2, regions=REGIONS, jobs={(ACCOUNT, "us-east-1"): 30})
    await aws.start(fleet=fleet)
    token = (await (await aws.snowball(ACCOUNT)).list_jobs(MaxResults=5))["NextToken"]
    second = Aws(aws.stack, session)
    await second.start(fleet=fleet)
    client = await second.snowball(ACCOUNT)
    with pytest.raises(client.exceptions.InvalidNextTokenException):
        await client.list_jobs(NextToken=token)


async def test_max_results_is_validated(aws: Aws, cbor_session: AioSession) -> None:
    """MaxResults above 100 is a ValidationException; 0 and absent mean a page of 100."""
    await aws.start(
        fleet=FleetSpec(accounts=2, regions=REGIONS, jobs={(ACCOUNT, "us-east-1"): 150})
    )
    for session in (None, cbor_session):
        client = await aws.snowball(ACCOUNT, session=session)
        with pytest.raises(botocore.exceptions.ClientError) as excinfo:
            await client.list_jobs(MaxResults=101)
        assert (error_code(excinfo), http_status(excinfo)) == ("ValidationException", 400)
        assert len((await client.list_jobs(MaxResults=0))["JobListEntries"]) == 100
        assert len((await client.list_jobs())["JobListEntries"]) == 100
        assert len((await client.list_jobs(MaxResults=7))["JobListEntries"]) == 7


async def test_token_expires_after_token_ttl(aws: Aws) -> None:
    """A NextToken older than token_ttl on the sandbox clock is InvalidNextToken."""
    clock = FakeClock()
    fleet = FleetSpec(accounts=2, regions=REGIONS, jobs={(ACCOUNT, "us-east-1"): 30})
    sb = await aws.start(fleet=fleet, faults=Faults(token_ttl=60), clock=clock)
    client = await aws.snowball(ACCOUNT)
    token = (await client.list_jobs(MaxResults=5))["NextToken"]
    clock.advance(59)
    token = (await client.list_jobs(MaxResults=5, NextToken=token))["NextToken"]
    clock.advance(61)
    with pytest.raises(client.exceptions.InvalidNextTokenException):
        await client.list_jobs(NextToken=token)
    assert sb.stats().faults["token_expired"] == 1


async def test_list_change_invalidates_tokens(aws: Aws) -> None:
    """Changing a list between pages invalidates its outstanding tokens; a restart is consistent."""
    sb = await aws.start(
        fleet=FleetSpec(accounts=2, regions=REGIONS, jobs={(ACCOUNT, "eu-west-1"): 30})
    )
    client = await aws.snowball(ACCOUNT, "eu-west-1")
    token = (await client.list_jobs(MaxResults=10))["NextToken"]
    created = dt.datetime(2030, 1, 2, 3, 4, 5, 6789, tzinfo=dt.UTC)
    new_id = sb.add_job(ACCOUNT, "eu-west-1", description="late arrival", creation_date=created)
    added = next(r for r in sb.truth(accounts=[ACCOUNT]) if r["job_id"] == new_id)
    assert added["creation_date"] == "2030-01-02T03:04:05.006Z"
    with pytest.raises(ValueError, match="already has"):
        sb.add_job(ACCOUNT, "us-east-1", job_id=new_id)
    with pytest.raises(client.exceptions.InvalidNextTokenException):
        await client.list_jobs(NextToken=token)
    entries = await list_all(client, PaginationConfig={"PageSize": 10})
    assert entries[0]["JobId"] == new_id
    assert len(entries) == 31

    token = (await client.list_jobs(MaxResults=10))["NextToken"]
    sb.set_job_state(ACCOUNT, new_id, "Complete")
    with pytest.raises(client.exceptions.InvalidNextTokenException):
        await client.list_jobs(NextToken=token)
    sb.remove_job(ACCOUNT, new_id)
    assert new_id not in {r["job_id"] for r in sb.truth(accounts=[ACCOUNT])}
    assert len(await list_all(client)) == 30


async def test_churn_is_bounded_and_restarts_converge(aws: Aws) -> None:
    """Churn changes a list mid-chain at most churn_max times; restarting then reads the truth."""
    fleet = FleetSpec(accounts=2, regions=REGIONS, jobs={(ACCOUNT, "eu-west-1"): 45})
    sb = await aws.start(fleet=fleet, faults=Faults(churn=1.0, churn_max=2))
    client = await aws.snowball(ACCOUNT, "eu-west-1")
    restarts = 0
    while True:
        try:
            entries = await list_all(client, PaginationConfig={"PageSize": 20})
            break
        except client.exceptions.InvalidNextTokenException:
            restarts += 1
    assert restarts == 2
    assert sb.stats().faults["churn"] == 2
    truth = sb.truth(accounts=[ACCOUNT])
    assert records(ACCOUNT, {"eu-west-1": entries}) == without_home(
        [r for r in truth if r["home_region"] == "eu-west-1"]
    )


@given(
    account=st.text(alphabet="0123456789", min_size=12, max_size=12),
    offset=st.integers(min_value=0, max_value=10**6),
    version=st.integers(min_value=0, max_value=10**6),
    issued_at=st.floats(min_value=0, max_value=1e9),
    position=st.integers(min_value=0),
    replacement=st.characters(min_codepoint=33, max_codepoint=126),
)
def test_tokens_round_trip_and_detect_any_edit(
    account: str, offset: int, version: int, issued_at: float, position: int, replacement: str
) -> None:
    """A token verifies to what was issued, and any one-character edit is rejected."""
    signer = TokenSigner(secret=b"k" * 32)
    token = PageToken(account, "us", offset, version, issued_at)
    text = signer.issue(token)
    assert signer.verify(text) == token
    index = position % len(text)
    edited = text[:index] + replacement + text[index + 1 :]
    if edited != text:
        assert signer.verify(edited) is None
    assert TokenSigner(secret=b"x" * 32).verify(text) is None


# --- identity and access ----------------------------------------------------------------------


async def test_caller_identity_of_hub_and_assumed_role(aws: Aws) -> None:
    """GetCallerIdentity names the hub for its keys and the role for issued keys."""
    sb = await aws.start()
    hub = await (await aws.client("sts")).get_caller_identity()
    assert (hub["Account"], hub["Arn"]) == (
        "123456789012",
        "arn:aws:iam::123456789012:user/sandbox-hub",
    )
    creds = await aws.assume(ACCOUNT)
    assert creds["AccessKeyId"].startswith("ASIA")
    me = await (await aws.client("sts", creds=creds)).get_caller_identity()
    assert me["Account"] == ACCOUNT
    assert me["Arn"] == f"arn:aws:sts::{ACCOUNT}:assumed-role/SnowballInventoryReader/sandbox-test"
    assert sb.stats().requests["sts:AssumeRole"] == 1


async def test_assume_role_denials(aws: Aws) -> None:
    """Unknown, suspended and denied accounts, bad ARNs and a wrong ExternalId are refused."""
    fleet = FleetSpec(accounts=6, regions=REGIONS, suspended=1, external_id="ext-123")
    sb = await aws.start(fleet=fleet, faults=Faults(deny_assume_role=frozenset({OTHER})))
    suspended = next(a for a in sb.account_ids if a not in sb.active_account_ids)
    sts = await aws.client("sts")

    async def code(role_arn: str, **kwargs: Any) -> tuple[str, int]:
        with pytest.raises(botocore.exceptions.ClientError) as excinfo:
            await sts.assume_role(RoleArn=role_arn, RoleSessionName="denied", **kwargs)
        return error_code(excinfo), http_status(excinfo)

    def arn(account: str) -> str:
        return f"arn:aws:iam::{account}:role/Reader"

    denied = ("AccessDenied", 403)
    assert await code(arn(ACCOUNT)) == denied  # no ExternalId
    assert await code(arn(ACCOUNT), ExternalId="wrong-1") == denied
    assert await code(arn(OTHER), ExternalId="ext-123") == denied
    assert await code(arn(suspended), ExternalId="ext-123") == denied
    assert await code(arn("999999999999"), ExternalId="ext-123") == denied
    assert await code(f"arn:aws-cn:iam::{ACCOUNT}:role/Reader", ExternalId="ext-123") == denied
    assert await code(f"arn:aws:iam::{ACCOUNT}:user/Reader", ExternalId="ext-123") == (
        "ValidationError",
        400,
    )
    ok = await sts.assume_role(RoleArn=arn(ACCOUNT), RoleSessionName="fine", ExternalId="ext-123")
    assert ok["AssumedRoleUser"]["Arn"].endswith(":assumed-role/Reader/fine")
    assert sb.stats().faults["deny_assume_role"] == 1


async def test_role_name_restriction(aws: Aws) -> None:
    """With role_name set, AssumeRole on any other role name is AccessDenied."""
    await aws.start(
        fleet=FleetSpec(accounts=2, regions=REGIONS, role_name="SnowballInventoryReader")
    )
    assert (await aws.assume(ACCOUNT))["AccessKeyId"]
    sts = await aws.client("sts")
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        await sts.assume_role(RoleArn=f"arn:aws:iam::{ACCOUNT}:role/Other", RoleSessionName="x1")
    assert error_code(excinfo) == "AccessDenied"


async def test_list_jobs_denied_and_disabled_regions(aws: Aws, cbor_session: AioSession) -> None:
    """deny_list_jobs is AccessDeniedException; a disabled region is 403 UnrecognizedClient."""
    faults = Faults(
        deny_list_jobs=frozenset({OTHER}),
        disabled_regions={ACCOUNT: frozenset({"af-south-1", "us-west-1"})},
    )
    sb = await aws.start(faults=faults)
    for session in (None, cbor_session):
        denied = await aws.snowball(OTHER, "eu-west-1", session=session)
        with pytest.raises(botocore.exceptions.ClientError) as excinfo:
            await denied.list_jobs()
        assert error_code(excinfo) == "AccessDeniedException"
        disabled = await aws.snowball(ACCOUNT, "af-south-1", session=session)
        with pytest.raises(botocore.exceptions.ClientError) as excinfo:
            await disabled.list_jobs()
        assert (error_code(excinfo), http_status(excinfo)) == ("UnrecognizedClientException", 403)
    truth = sb.truth(accounts=[ACCOUNT])
    regions = {region for r in truth for region in r["regions"]}  # type: ignore[attr-defined]
    assert not regions & {"af-south-1", "us-west-1"}
    assert all(
        r["regions"] == ["us-east-1", "us-east-2", "us-west-2"]
        for r in truth
        if r["home_region"] in US
    )
    sb.faults = replace(sb.faults, deny_list_jobs=frozenset())
    assert "JobListEntries" in await (await aws.snowball(OTHER, "eu-west-1")).list_jobs()


async def test_expired_credentials(aws: Aws) -> None:
    """Past credential_ttl a key is ExpiredToken, though its advertised Expiration is later."""
    clock = FakeClock()
    faults = Faults(credential_ttl=300, advertised_credential_ttl=900)
    sb = await aws.start(faults=faults, clock=clock)
    before = dt.datetime.now(dt.UTC)
    creds = await aws.assume(ACCOUNT)
    assert dt.timedelta(seconds=890) < creds["Expiration"] - before < dt.timedelta(seconds=910)
    snowball = await aws.client("snowball", creds=creds)
    sts = await aws.client("sts", creds=creds)
    await snowball.list_jobs()
    clock.advance(301)
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        await snowball.list_jobs()
    assert (error_code(excinfo), http_status(excinfo)) == ("ExpiredTokenException", 400)
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        await sts.get_caller_identity()
    assert error_code(excinfo) == "ExpiredToken"
    sb.faults = replace(sb.faults, credential_ttl=None)
    await snowball.list_jobs()


async def test_session_token_must_match(aws: Aws) -> None:
    """An issued key presented with another session token is UnrecognizedClientException."""
    await aws.start()
    creds = await aws.assume(ACCOUNT)
    forged = {**creds, "SessionToken": creds["SessionToken"][:-4] + "AAAA"}
    client = await aws.client("snowball", creds=forged)
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        await client.list_jobs()
    assert (error_code(excinfo), http_status(excinfo)) == ("UnrecognizedClientException", 403)


async def test_organizations_list_accounts(aws: Aws) -> None:
    """ListAccounts pages 20 at a time over every account and marks the suspended ones."""
    sb = await aws.start(fleet=FleetSpec(accounts=45, suspended=4, regions=REGIONS))
    org = await aws.client("organizations")
    pages = [page async for page in org.get_paginator("list_accounts").paginate()]
    assert [len(p["Accounts"]) for p in pages] == [20, 20, 5]
    accounts = [a for p in pages for a in p["Accounts"]]
    assert tuple(a["Id"] for a in accounts) == sb.account_ids
    suspended = {a["Id"] for a in accounts if a["Status"] == "SUSPENDED"}
    assert len(suspended) == 4
    assert suspended == set(sb.account_ids) - set(sb.active_account_ids)
    assert all(a["JoinedMethod"] in ("CREATED", "INVITED") for a in accounts)
    assert all(isinstance(a["JoinedTimestamp"], dt.datetime) for a in accounts)
    with pytest.raises(org.exceptions.InvalidInputException):
        await org.list_accounts(NextToken="garbage")
    member = await aws.client("organizations", creds=await aws.assume(ACCOUNT))
    with pytest.raises(member.exceptions.AccessDeniedException):
        await member.list_accounts()
    assert not {r["account_id"] for r in sb.truth()} & suspended


# --- throttling, stats and injected faults ----------------------------------------------------


async def test_throttling_per_account_region(aws: Aws) -> None:
    """Over throttle_rps (burst 2) ListJobs answers ThrottlingException until the bucket refills."""
    clock = FakeClock()
    sb = await aws.start(faults=Faults(throttle_rps=1.0, throttle_burst=2), clock=clock)
    client = await aws.snowball(ACCOUNT)
    other_region = await aws.snowball(ACCOUNT, "eu-west-1")
    await client.list_jobs()
    await client.list_jobs()
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        await client.list_jobs()
    assert (error_code(excinfo), http_status(excinfo)) == ("ThrottlingException", 400)
    await other_region.list_jobs()
    clock.advance(1.0)
    await client.list_jobs()
    stats = sb.stats()
    assert stats.throttled == 1
    assert stats.errors["ThrottlingException"] == 1
    assert stats.list_jobs_requests[(ACCOUNT, "us-east-1")] == 4


async def test_stats_count_requests_and_windowed_rate(aws: Aws) -> None:
    """Stats count requests per operation and key, and the busiest sliding second."""
    clock = FakeClock()
    sb = await aws.start(clock=clock)
    client = await aws.snowball(ACCOUNT)
    sb.reset_stats()
    for delay in (0.0, 0.0, 0.0, 0.5, 0.4, 0.2, 0.9, 0.0):
        clock.advance(delay)
        await client.list_jobs()
    stats = sb.stats()
    assert stats.requests == {"snowball:ListJobs": 8}
    assert stats.list_jobs_requests == {(ACCOUNT, "us-east-1"): 8}
    # Arrivals at 0, 0, 0, .5, .9, 1.1, 2.0, 2.0: the busiest window (0, .9] holds 5.
    assert stats.max_requests_per_second == {(ACCOUNT, "us-east-1"): 5}
    assert stats.peak_in_flight == 1
    assert stats.peak_in_flight_by_region == {(ACCOUNT, "us-east-1"): 1}
    assert stats.total_requests == 8
    assert stats.to_json()["list_jobs_requests"] == {f"{ACCOUNT}/us-east-1": 8}


async def test_peak_in_flight_under_latency(aws: Aws) -> None:
    """Concurrent ListJobs calls held by latency show up as peak in-flight."""
    # A latency no request outlives in this test: the six calls are held until all six have
    # arrived (however slowly a loaded machine sends them), then abandoned; the sandbox wakes
    # their handlers when it closes.
    sb = await aws.start(faults=Faults(latency=600.0))
    client = await aws.snowball(ACCOUNT)
    sb.reset_stats()
    calls = [asyncio.ensure_future(client.list_jobs()) for _ in range(6)]
    try:
        for _ in range(3000):  # at most 30 s: the sandbox has no event to wait on
            if sb.stats().peak_in_flight >= 6:
                break
            await asyncio.sleep(0.01)
        stats = sb.stats()
    finally:
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
    assert stats.peak_in_flight == 6
    assert stats.peak_in_flight_by_region[(ACCOUNT, "us-east-1")] == 6


async def test_server_errors_parse_to_their_codes(aws: Aws, cbor_session: AioSession) -> None:
    """Injected 500 and 503 answers parse to InternalFailure and ServiceUnavailable."""
    sb = await aws.start()
    for session in (None, cbor_session):
        client = await aws.snowball(ACCOUNT, session=session)
        for faults, expected in (
            (Faults(p_500=1.0), ("InternalFailure", 500)),
            (Faults(p_503=1.0), ("ServiceUnavailable", 503)),
        ):
            sb.faults = faults
            with pytest.raises(botocore.exceptions.ClientError) as excinfo:
                await client.list_jobs()
            assert (error_code(excinfo), http_status(excinfo)) == expected
        sb.faults = Faults()
    assert sb.stats().faults == {"500": 2, "503": 2}


async def test_broken_connections(aws: Aws, cbor_session: AioSession) -> None:
    """Resets, truncated bodies and hangs surface as botocore connection errors."""
    sb = await aws.start()
    hasty = AioConfig(retries={"total_max_attempts": 1}, read_timeout=0.2, connect_timeout=1)
    for session in (None, cbor_session):
        client = await aws.snowball(ACCOUNT, session=session, config=hasty)
        for faults, error in (
            (Faults(p_reset=1.0), botocore.exceptions.ConnectionError),
            (Faults(p_truncated=1.0), botocore.exceptions.ConnectionClosedError),
            (Faults(p_hang=1.0, hang_seconds=30), botocore.exceptions.ReadTimeoutError),
        ):
            sb.faults = faults
            with pytest.raises(error):
                await client.list_jobs()
        sb.faults = Faults()
        assert "JobListEntries" in await client.list_jobs()
    assert sb.stats().faults == {"reset": 2, "truncated": 2, "hang": 2}


async def test_malformed_bodies(aws: Aws, cbor_session: AioSession) -> None:
    """A malformed CBOR body fails parsing; botocore reads a malformed JSON body as no entries."""
    await aws.start(faults=Faults(p_malformed=1.0))
    as_cbor = await aws.snowball(ACCOUNT, session=cbor_session)
    with pytest.raises(botocore.parsers.ResponseParserError):
        await as_cbor.list_jobs()
    # botocore's JSON parser swallows invalid JSON: the only tell is the missing member.
    page = await (await aws.snowball(ACCOUNT)).list_jobs()
    assert "JobListEntries" not in page


async def test_sts_faults(aws: Aws) -> None:
    """STS has its own 500 and reset probabilities."""
    sb = await aws.start(faults=Faults(p_sts_500=1.0))
    sts = await aws.client("sts")
    with pytest.raises(botocore.exceptions.ClientError) as excinfo:
        await sts.get_caller_identity()
    assert (error_code(excinfo), http_status(excinfo)) == ("InternalFailure", 500)
    sb.faults = Faults(p_sts_reset=1.0)
    with pytest.raises(botocore.exceptions.ConnectionError):
        await sts.get_caller_identity()


async def test_raw_requests_without_proper_signing(aws: Aws) -> None:
    """Unsigned, wrongly scoped and unknown-operation requests get AWS's error codes (the
    trusting mode: these forged headers carry no real signature; tests/test_sigv4.py covers
    verification)."""
    sb = await aws.start(verify_signatures=False)
    target = {"X-Amz-Target": "AWSIESnowballJobManagementService.ListJobs"}

    def signed(service: str) -> dict[str, str]:
        scope = f"AKIAEXAMPLE/20260101/us-east-1/{service}/aws4_request"
        return {"Authorization": f"AWS4-HMAC-SHA256 Credential={scope}, Signature=00"}

    cases = [
        (target, 403, "MissingAuthenticationTokenException"),
        ({**target, **signed("sts")}, 403, "InvalidSignatureException"),
        ({**target, **signed("snowball")}, 200, None),
        (
            {"X-Amz-Target": "AWSIESnowballJobManagementService.CreateJob", **signed("snowball")},
            400,
            "UnknownOperationException",
        ),
        ({"X-Amz-Target": "Nope.ListJobs", **signed("snowball")}, 400, "UnknownOperationException"),
    ]
    async with aiohttp.ClientSession() as http:
        for headers, status, code in cases:
            async with http.post(sb.url, data=b"{}", headers=headers) as response:
                body = await response.json(content_type=None)
                assert response.status == status
                assert body.get("__type") == code
        async with http.put(sb.url) as response:
            assert response.status == 405


def test_faults_are_validated() -> None:
    """Probabilities outside [0, 1], or adding up past 1, are refused."""
    with pytest.raises(ValueError, match="p_500"):
        Faults(p_500=1.5)
    with pytest.raises(ValueError, match="> 1"):
        Faults(p_500=0.6, p_reset=0.6)
    with pytest.raises(ValueError, match="throttle_rps"):
        Faults(throttle_rps=0)
    assert Faults(throttle_rps=2.5).burst == 3


# --- lifecycle, HTTP endpoints and the command ------------------------------------------------


async def test_env_truth_and_stats_endpoints(aws: Aws) -> None:
    """env() points an SDK at the sandbox; /_sandbox/truth and /stats serve JSON."""
    sb = await aws.start()
    env = sb.env()
    assert env["AWS_ENDPOINT_URL"] == sb.url
    assert env["AWS_ACCESS_KEY_ID"] == sb.hub_access_key_id
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sb.url}/_sandbox/truth", params={"account": ACCOUNT}) as response:
            # split on "\n" only: descriptions hold U+2028, which str.splitlines() splits on.
            lines = (await response.text()).split("\n")[:-1]
        async with http.get(f"{sb.url}/_sandbox/stats") as response:
            stats = await response.json()
    import json

    assert [json.loads(line) for line in lines] == sb.truth(accounts=[ACCOUNT])
    assert (stats["requests"], stats["total_requests"]) == ({}, 0)


async def test_sandbox_is_entered_once(aws: Aws) -> None:
    """Entering a sandbox a second time is an error; its url is gone once it has stopped."""
    sandbox = Sandbox(fleet=FleetSpec(accounts=1, regions=REGIONS))
    async with sandbox:
        with pytest.raises(RuntimeError):
            await sandbox.__aenter__()
    with pytest.raises(RuntimeError):
        assert sandbox.url
    with pytest.raises(RuntimeError):
        async with sandbox:
            pass


def test_command_builds_sandbox_from_flags() -> None:
    """The CLI flags map onto FleetSpec and Faults."""
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--port=0",
            "--accounts=7",
            "--seed=3",
            "--p-503=0.25",
            "--throttle-rps=5",
            "--deny-list-jobs=200000000001,200000000002",
            "--disable-region=200000000001:af-south-1",
            "--disable-region=200000000001:il-central-1",
        ]
    )
    sandbox = build(args)
    assert sandbox.fleet.accounts == 7
    assert sandbox.fleet.seed == 3
    assert sandbox.faults.p_503 == 0.25
    assert sandbox.faults.throttle_rps == 5
    assert sandbox.faults.deny_list_jobs == {ACCOUNT, OTHER}
    assert sandbox.faults.disabled_regions == {ACCOUNT: {"af-south-1", "il-central-1"}}
    with pytest.raises(SystemExit):
        parser.parse_args(["--disable-region=nonsense"])


def test_command_serves_until_sigterm() -> None:
    """``python -m aggregator.sandbox`` prints export lines and its URL, then stops on SIGTERM."""
    process = subprocess.Popen(
        [sys.executable, "-m", "aggregator.sandbox", "--port=0", "--accounts=3"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(6)]
        assert lines[0].startswith("export AWS_ENDPOINT_URL=http://127.0.0.1:")
        assert lines[5].startswith(READY_PREFIX)
        url = lines[5][len(READY_PREFIX) :].strip()
        assert lines[0].strip() == f"export AWS_ENDPOINT_URL={url}"

        async def fetch() -> dict[str, Any]:
            async with aiohttp.ClientSession() as http, http.get(f"{url}/_sandbox/stats") as r:
                body: dict[str, Any] = await r.json()
                return body

        assert asyncio.run(fetch())["total_requests"] == 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def test_stats_type_is_exported() -> None:
    """Stats is part of the public surface next to Sandbox."""
    assert Stats.__name__ == "Stats"
    assert isinstance(Sandbox(fleet=FleetSpec(accounts=1, regions=REGIONS)).stats(), Stats)
