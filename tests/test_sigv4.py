"""SigV4 verification: the sandbox accepts what botocore (and our other clients) sign, refuses
tampered requests as AWS does, and sigv4.py computes exactly botocore's signatures."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import re
import tempfile
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import botocore.exceptions
import cbor2
import orjson
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given
from hypothesis import strategies as st

from aggregator.sandbox import FleetSpec, Sandbox, cbor_model_path, sigv4
from aggregator.sandbox.protocols import CBOR_CONTENT_TYPE, CBOR_PATH_PREFIX, JSON_CONTENT_TYPE

from .conftest import SandboxFactory

ACCOUNT = "200000000001"
REGIONS = ("us-east-1", "eu-west-1")
NO_RETRY = AioConfig(retries={"total_max_attempts": 1})
MISMATCH = "The request signature we calculated does not match the signature you provided."


def botocore_signed(request: AWSRequest, creds: Credentials, service: str, region: str) -> str:
    """Sign ``request`` in place with botocore's public signer; return its signature."""
    SigV4Auth(creds, service, region).add_auth(request)
    match = re.search(r"Signature=([0-9a-f]{64})$", request.headers["Authorization"])
    assert match is not None
    return match.group(1)


def verifier_signature(request: AWSRequest, secret_key: str) -> str:
    """What the sandbox's sigv4.py computes for ``request`` as it would arrive on the wire."""
    prepared = request.prepare()
    auth = sigv4.parse_authorization(prepared.headers["Authorization"])
    assert auth is not None
    url = urllib.parse.urlsplit(prepared.url)
    values: dict[str, list[str]] = {"host": [url.netloc]}
    for name, value in request.headers.items():
        values.setdefault(name.lower(), []).append(value)
    body = prepared.body or b""
    canonical = sigv4.canonical_request(
        method=prepared.method,
        raw_path=url.path,
        raw_query=url.query,
        signed_headers=auth.signed_headers,
        header_values=values,
        payload_hash=hashlib.sha256(body).hexdigest(),
    )
    timestamp = request.headers["X-Amz-Date"]
    scope = f"{auth.date}/{auth.region}/{auth.service}/aws4_request"
    key = sigv4.signing_key(secret_key, auth.date, auth.region, auth.service)
    return sigv4.sign(key, sigv4.string_to_sign(timestamp, scope, canonical))


# --- (d) the computation matches botocore's -------------------------------------------------


def test_known_answer_from_the_aws_test_suite() -> None:
    """AWS's published "get-vanilla" example, as it arrives on the wire (its date and
    Authorization header), verifies to its published signature."""
    published = "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
    request = AWSRequest(
        method="GET",
        url="https://example.amazonaws.com/",
        headers={
            "X-Amz-Date": "20150830T123600Z",
            "Authorization": "AWS4-HMAC-SHA256 "
            "Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
            f"SignedHeaders=host;x-amz-date, Signature={published}",
        },
    )
    assert verifier_signature(request, "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY") == published


@pytest.mark.parametrize(
    ("method", "url", "params", "headers", "body"),
    [
        pytest.param(
            "POST",
            "http://127.0.0.1:4566/",
            None,
            {"X-Amz-Target": "AWSIESnowballJobManagementService.ListJobs"},
            b'{"MaxResults":5}',
            id="json-target",
        ),
        pytest.param(
            "POST",
            "http://127.0.0.1:4566" + CBOR_PATH_PREFIX + "ListJobs",
            None,
            {"Content-Type": CBOR_CONTENT_TYPE, "smithy-protocol": "rpc-v2-cbor"},
            cbor2.dumps({"MaxResults": 5}),
            id="cbor-path",
        ),
        pytest.param(
            "GET",
            "http://[::1]:8080/a%20b/./c/../d~e//f/",
            [("b", "2"), ("a", "x y"), ("a", "é/~+"), ("c", "")],
            {"X-Note": "  padded    inner   spaces  "},
            b"",
            id="query-path-whitespace",
        ),
        pytest.param(
            "PUT",
            "https://example.amazonaws.com",
            None,
            {"X-Amz-Meta-Empty": ""},
            b"\x00\xffbinary",
            id="empty-path-binary-body",
        ),
    ],
)
def test_signature_matches_botocore(
    method: str, url: str, params: Any, headers: dict[str, str], body: bytes
) -> None:
    """sigv4.py's signature equals botocore SigV4Auth's (for the date botocore signed with,
    read from the request as the verifier reads it), token included."""
    request = AWSRequest(method=method, url=url, params=params, headers=headers, data=body)
    creds = Credentials("ASIAEXAMPLE", "secret/key+value", "session-token-value")
    expected = botocore_signed(request, creds, "snowball", "eu-west-1")
    assert "x-amz-security-token" in request.headers["Authorization"]
    assert verifier_signature(request, creds.secret_key) == expected
    assert verifier_signature(request, "another secret") != expected


def test_repeated_headers_are_joined_like_botocore() -> None:
    """A header sent twice is one canonical line, its values joined with commas in order."""
    request = AWSRequest(method="POST", url="http://127.0.0.1/", data=b"{}")
    request.headers["X-Twice"] = "first"
    request.headers["X-Twice"] = " second  value "  # HTTPHeaders appends, it does not replace
    creds = Credentials("AKIAEXAMPLE", "secret")
    expected = botocore_signed(request, creds, "sts", "us-east-1")
    assert verifier_signature(request, creds.secret_key) == expected


@given(
    value=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=30),
    params=st.lists(st.tuples(st.text(min_size=1, max_size=8), st.text(max_size=8)), max_size=4),
)
def test_signature_matches_botocore_for_any_header_and_query(
    value: str, params: list[tuple[str, str]]
) -> None:
    """Any header value and query parameters sign the same in sigv4.py and botocore."""
    request = AWSRequest(
        method="GET", url="http://127.0.0.1:1/x", params=params, headers={"X-Value": value}
    )
    creds = Credentials("AKIAEXAMPLE", "secret")
    expected = botocore_signed(request, creds, "organizations", "us-east-1")
    assert verifier_signature(request, creds.secret_key) == expected


def test_parse_authorization() -> None:
    """Every part of the header is read; a header without a well-formed Credential is None."""
    auth = sigv4.parse_authorization(
        "AWS4-HMAC-SHA256 Credential=AKID/20260314/eu-west-1/snowball/aws4_request, "
        "SignedHeaders=host;x-amz-date,Signature=abc"
    )
    assert auth == sigv4.Authorization(
        algorithm="AWS4-HMAC-SHA256",
        access_key_id="AKID",
        date="20260314",
        region="eu-west-1",
        service="snowball",
        signed_headers=("host", "x-amz-date"),
        signature="abc",
    )
    assert sigv4.parse_authorization("AWS4-HMAC-SHA256 Credential=AKID/2026/x/aws4_request") is None
    assert sigv4.parse_authorization("") is None


def test_request_timestamp() -> None:
    """X-Amz-Date is taken if well-formed; without it the Date header is converted."""
    assert sigv4.request_timestamp("20260314T150926Z", None) == "20260314T150926Z"
    assert sigv4.request_timestamp("2026-03-14T15:09:26Z", "Sat, 14 Mar 2026 15:09:26 GMT") is None
    assert sigv4.request_timestamp(None, "Sat, 14 Mar 2026 15:09:26 GMT") == "20260314T150926Z"
    assert sigv4.request_timestamp(None, "yesterday") is None
    assert sigv4.request_timestamp(None, None) is None


# --- the sandbox, raw requests --------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A request one protocol serves, how to change its body, and how AWS refuses it."""

    service: str
    region: str
    path: str
    headers: dict[str, str]
    body: bytes
    tampered_body: bytes
    member: bool  # signed with AssumeRole credentials (else the hub's keys)
    code: str
    status: int


SNOWBALL_JSON = Case(
    service="snowball",
    region="eu-west-1",
    path="/",
    headers={
        "Content-Type": JSON_CONTENT_TYPE,
        "X-Amz-Target": "AWSIESnowballJobManagementService.ListJobs",
    },
    body=b'{"MaxResults":5}',
    tampered_body=b'{"MaxResults":6}',
    member=True,
    code="InvalidSignatureException",
    status=400,
)
CASES = {
    "snowball-json": SNOWBALL_JSON,
    "snowball-cbor": replace(
        SNOWBALL_JSON,
        path=CBOR_PATH_PREFIX + "ListJobs",
        headers={
            "Content-Type": CBOR_CONTENT_TYPE,
            "Accept": CBOR_CONTENT_TYPE,
            "smithy-protocol": "rpc-v2-cbor",
        },
        body=cbor2.dumps({"MaxResults": 5}),
        tampered_body=cbor2.dumps({"MaxResults": 6}),
    ),
    "organizations": replace(
        SNOWBALL_JSON,
        service="organizations",
        region="us-east-1",
        headers={
            "Content-Type": JSON_CONTENT_TYPE,
            "X-Amz-Target": "AWSOrganizationsV20161128.ListAccounts",
        },
        member=False,
    ),
    "sts": Case(
        service="sts",
        region="us-east-1",
        path="/",
        headers={"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"},
        body=b"Action=GetCallerIdentity&Version=2011-06-15",
        tampered_body=b"Action=GetCallerIdentity&Version=2011-06-16",
        member=False,
        code="SignatureDoesNotMatch",
        status=403,
    ),
}


@dataclass(frozen=True)
class Answer:
    """What the sandbox answered: status, error code and message (None on success), body."""

    status: int
    code: str | None
    message: str | None
    raw: bytes


def parse_answer(status: int, content_type: str, raw: bytes) -> Answer:
    """Read the error of a JSON 1.1, RPC v2 CBOR or STS XML answer."""
    if status == 200:
        return Answer(status, None, None, raw)
    if content_type == CBOR_CONTENT_TYPE:
        doc = cbor2.loads(raw)
        return Answer(status, doc["__type"].rpartition("#")[2], doc["message"], raw)
    if content_type == JSON_CONTENT_TYPE:
        doc = orjson.loads(raw)
        return Answer(status, doc["__type"], doc["message"], raw)
    text = raw.decode()
    code = re.search(r"<Code>(.*)</Code>", text)
    message = re.search(r"<Message>(.*)</Message>", text)
    assert code is not None and message is not None, text
    return Answer(status, code.group(1), message.group(1), raw)


class Raw:
    """Signs requests with botocore's SigV4Auth, lets a test change them, sends them."""

    def __init__(self, sb: Sandbox, http: aiohttp.ClientSession, member: Credentials) -> None:
        self.sb = sb
        self.http = http
        self.member = member
        self.hub = Credentials(sb.hub_access_key_id, sb.hub_secret_access_key)

    def sign(
        self, case: Case, *, creds: Credentials | None = None, headers: dict[str, str] | None = None
    ) -> AWSRequest:
        if creds is None:
            creds = self.member if case.member else self.hub
        request = AWSRequest(
            method="POST",
            url=self.sb.url + case.path,
            headers={**case.headers, **(headers or {})},
            data=case.body,
        )
        SigV4Auth(creds, case.service, case.region).add_auth(request)
        return request

    async def send(
        self,
        request: AWSRequest,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        sent = {**dict(request.headers.items()), **(headers or {})}
        data = request.body if body is None else body
        async with self.http.post(request.url, data=data, headers=sent) as response:
            raw = await response.read()
            return parse_answer(response.status, response.content_type, raw)


@pytest.fixture
async def raw(make_sandbox: SandboxFactory) -> AsyncIterator[Raw]:
    """A verifying sandbox (the default), member credentials for ACCOUNT, a plain HTTP client."""
    sb = await make_sandbox(accounts=3, seed=1, regions=REGIONS)
    async with AioSession().create_client(
        "sts", region_name="us-east-1", endpoint_url=sb.url, config=NO_RETRY
    ) as sts:
        answer = await sts.assume_role(
            RoleArn=f"arn:aws:iam::{ACCOUNT}:role/SnowballInventoryReader",
            RoleSessionName="sigv4-test",
        )
    c = answer["Credentials"]
    member = Credentials(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"])
    async with aiohttp.ClientSession() as http:
        yield Raw(sb, http, member)


def changed(signature: str) -> str:
    """``signature`` with its last character replaced by another hex digit."""
    return signature[:-1] + ("0" if signature[-1] != "0" else "1")


def assert_refused(answer: Answer, case: Case, raw: Raw, *, message: str = MISMATCH) -> None:
    assert (answer.status, answer.code) == (case.status, case.code)
    assert answer.message is not None and answer.message.startswith(message)
    for secret in raw.sb.issued_secrets():
        assert secret.encode() not in answer.raw


@pytest.mark.parametrize("name", CASES)
async def test_changed_signature_is_refused(raw: Raw, name: str) -> None:
    """The botocore-signed request is served; with one signature byte changed it is refused
    with the protocol's error, which shows neither a secret nor the expected signature."""
    case = CASES[name]
    request = raw.sign(case)
    assert (await raw.send(request)).status == 200

    authorization = request.headers["Authorization"]
    signature = authorization.rpartition("Signature=")[2]
    forged = authorization.replace(signature, changed(signature))
    answer = await raw.send(request, headers={"Authorization": forged})
    assert_refused(answer, case, raw)
    assert signature.encode() not in answer.raw
    assert raw.sb.stats().signature_mismatch == 1


@pytest.mark.parametrize("name", CASES)
async def test_body_changed_after_signing_is_refused(raw: Raw, name: str) -> None:
    """A body that is not the one signed (still well-formed) is refused."""
    case = CASES[name]
    answer = await raw.send(raw.sign(case), body=case.tampered_body)
    assert_refused(answer, case, raw)


async def test_signed_headers_are_compared_after_trimming(raw: Raw) -> None:
    """Whitespace around and inside a signed header's value does not matter; its text does."""
    request = raw.sign(SNOWBALL_JSON, headers={"X-Note": "one two"})
    assert (await raw.send(request, headers={"X-Note": "  one  \t two "})).status == 200
    answer = await raw.send(request, headers={"X-Note": "one two three"})
    assert_refused(answer, SNOWBALL_JSON, raw)


async def test_unsigned_headers_may_change(raw: Raw) -> None:
    """Headers left out of SignedHeaders (User-Agent, as botocore does) are not checked."""
    request = raw.sign(SNOWBALL_JSON)
    assert "user-agent" not in request.headers["Authorization"]
    assert (await raw.send(request, headers={"User-Agent": "something else"})).status == 200


@pytest.mark.parametrize("name", ["snowball-json", "sts"])
async def test_date_and_scope_are_checked(raw: Raw, name: str) -> None:
    """Another X-Amz-Date (same day or not), or a credential scope naming another region, is
    refused: the date must be the scope's day, and both are signed."""
    case = CASES[name]
    request = raw.sign(case)
    timestamp = request.headers["X-Amz-Date"]
    day = dt.datetime.strptime(timestamp, "%Y%m%dT%H%M%SZ")
    for other in (day + dt.timedelta(seconds=1), day + dt.timedelta(days=1)):
        headers = {"X-Amz-Date": other.strftime("%Y%m%dT%H%M%SZ")}
        answer = await raw.send(request, headers=headers)
        expected = MISMATCH if other.date() == day.date() else "Date in Credential scope"
        assert_refused(answer, case, raw, message=expected)
    forged = request.headers["Authorization"].replace(f"/{case.region}/", "/us-west-2/")
    assert_refused(await raw.send(request, headers={"Authorization": forged}), case, raw)
    assert raw.sb.stats().signature_mismatch == 3


async def test_host_must_be_signed(raw: Raw) -> None:
    """A signature that leaves out Host is refused, however it was computed."""
    request = raw.sign(SNOWBALL_JSON)
    authorization = request.headers["Authorization"]
    names = re.search(r"SignedHeaders=([^,]*)", authorization)
    assert names is not None and "host" in names.group(1).split(";")
    without_host = ";".join(n for n in names.group(1).split(";") if n != "host")
    forged = authorization.replace(names.group(0), f"SignedHeaders={without_host}")
    answer = await raw.send(request, headers={"Authorization": forged})
    assert_refused(answer, SNOWBALL_JSON, raw, message="'Host' or ':authority' must be")


@pytest.mark.parametrize("name", ["snowball-json", "sts"])
async def test_incomplete_authorization_is_refused(raw: Raw, name: str) -> None:
    """An Authorization without Signature or SignedHeaders is an incomplete signature."""
    case = CASES[name]
    request = raw.sign(case)
    stripped = request.headers["Authorization"].partition(", SignedHeaders=")[0]
    answer = await raw.send(request, headers={"Authorization": stripped})
    code = "IncompleteSignature" if name == "sts" else "IncompleteSignatureException"
    assert (answer.status, answer.code) == (400, code)
    assert answer.message is not None and "'Signature'" in answer.message


async def test_content_sha256_header_must_be_the_body_hash(raw: Raw) -> None:
    """x-amz-content-sha256, when signed, must hash the body: UNSIGNED-PAYLOAD is refused."""
    body_hash = hashlib.sha256(SNOWBALL_JSON.body).hexdigest()
    ok = raw.sign(SNOWBALL_JSON, headers={"X-Amz-Content-SHA256": body_hash})
    assert (await raw.send(ok)).status == 200
    unsigned = raw.sign(SNOWBALL_JSON, headers={"X-Amz-Content-SHA256": "UNSIGNED-PAYLOAD"})
    assert_refused(await raw.send(unsigned), SNOWBALL_JSON, raw)


@pytest.mark.parametrize("name", ["snowball-json", "sts"])
async def test_wrong_credentials_are_refused(raw: Raw, name: str) -> None:
    """An unknown key, a known key signed with another secret, a member key without its session
    token and the hub key with a token are all refused, as AWS refuses them."""
    case = CASES[name]
    sts = name == "sts"
    invalid = ("InvalidClientTokenId" if sts else "UnrecognizedClientException", 403)
    keys = raw.member if case.member else raw.hub

    unknown = raw.sign(case, creds=Credentials("AKIAUNKNOWN000000000", "whatever"))
    assert (await raw.send(unknown)).code == invalid[0]
    wrong_secret = raw.sign(case, creds=Credentials(keys.access_key, "not-the-secret", keys.token))
    assert_refused(await raw.send(wrong_secret), case, raw)
    member_without_token = raw.sign(
        case, creds=Credentials(raw.member.access_key, raw.member.secret_key)
    )
    answer = await raw.send(member_without_token)
    assert (answer.code, answer.status) == invalid
    hub_with_token = raw.sign(
        case, creds=Credentials(raw.hub.access_key, raw.hub.secret_key, "a-token")
    )
    answer = await raw.send(hub_with_token)
    assert (answer.code, answer.status) == invalid


async def test_signature_mismatch_is_in_the_stats_endpoint(raw: Raw) -> None:
    """/_sandbox/stats reports how many requests were refused for their signature."""
    request = raw.sign(SNOWBALL_JSON)
    await raw.send(request, body=SNOWBALL_JSON.tampered_body)
    await raw.send(request, body=SNOWBALL_JSON.tampered_body)
    async with raw.http.get(f"{raw.sb.url}/_sandbox/stats") as response:
        stats = await response.json()
    assert stats["signature_mismatch"] == 2
    assert stats["errors"] == {"InvalidSignatureException": 2}


async def test_verification_can_be_turned_off() -> None:
    """With verify_signatures=False a forged signature and an unknown key are served as the
    hub (the trusting mode of old), and nothing counts as a mismatch."""
    case = CASES["sts"]
    async with (
        Sandbox(fleet=FleetSpec(accounts=1, regions=REGIONS), verify_signatures=False) as sb,
        aiohttp.ClientSession() as http,
    ):
        client = Raw(sb, http, Credentials("unused", "unused"))
        request = client.sign(case, creds=Credentials("AKIAUNKNOWN000000000", "whatever"))
        answer = await client.send(request, body=case.tampered_body)
        assert answer.status == 200
        assert f"<Account>{sb.hub_account_id}</Account>".encode() in answer.raw
        assert sb.stats().signature_mismatch == 0


# --- the sandbox, real clients --------------------------------------------------------------


async def test_botocore_clients_are_accepted(make_sandbox: SandboxFactory) -> None:
    """Real aiobotocore clients (STS, Organizations, Snowball over JSON 1.1 and RPC v2 CBOR)
    are served, and the sandbox records no signature mismatch."""
    sb = await make_sandbox(accounts=3, seed=1, regions=REGIONS)
    expected = {r["job_id"] for r in sb.truth(accounts=[ACCOUNT]) if "eu-west-1" in r["regions"]}
    assert expected
    with tempfile.TemporaryDirectory() as tmp:
        cbor = AioSession()
        cbor.set_config_variable("data_path", str(cbor_model_path(tmp)))
        async with contextlib.AsyncExitStack() as stack:

            async def client(service: str, session: AioSession, **keys: Any) -> Any:
                factory = session.create_client(
                    service, region_name="eu-west-1", endpoint_url=sb.url, config=NO_RETRY, **keys
                )
                return await stack.enter_async_context(factory)

            sts = await client("sts", AioSession())
            assert (await sts.get_caller_identity())["Account"] == sb.hub_account_id
            org = await client("organizations", AioSession())
            pages = org.get_paginator("list_accounts").paginate()
            accounts = [a["Id"] async for page in pages for a in page["Accounts"]]
            assert ACCOUNT in accounts
            answer = await sts.assume_role(
                RoleArn=f"arn:aws:iam::{ACCOUNT}:role/SnowballInventoryReader",
                RoleSessionName="sigv4-test",
            )
            c = answer["Credentials"]
            keys = {
                "aws_access_key_id": c["AccessKeyId"],
                "aws_secret_access_key": c["SecretAccessKey"],
                "aws_session_token": c["SessionToken"],
            }
            for session in (AioSession(), cbor):
                snowball = await client("snowball", session, **keys)
                pages = snowball.get_paginator("list_jobs").paginate(MaxResults=7)
                jobs = {j["JobId"] async for page in pages for j in page["JobListEntries"]}
                assert jobs == expected
    stats = sb.stats()
    assert set(stats.snowball_protocols) == {"json", "cbor"}
    assert (stats.signature_mismatch, stats.errors) == (0, {})


async def test_botocore_client_with_a_wrong_secret_is_refused(make_sandbox: SandboxFactory) -> None:
    """A real client whose secret is not the key's gets InvalidSignatureException."""
    sb = await make_sandbox(accounts=1, seed=1, regions=REGIONS)
    async with AioSession().create_client(
        "snowball",
        region_name="eu-west-1",
        endpoint_url=sb.url,
        config=NO_RETRY,
        aws_access_key_id=sb.hub_access_key_id,
        aws_secret_access_key=sb.hub_secret_access_key + "x",
    ) as snowball:
        with pytest.raises(botocore.exceptions.ClientError) as excinfo:
            await snowball.list_jobs()
    error = excinfo.value.response
    assert error["Error"]["Code"] == "InvalidSignatureException"
    assert error["ResponseMetadata"]["HTTPStatusCode"] == 400


async def test_benchmark_clients_are_accepted(make_sandbox: SandboxFactory, tmp_path: Path) -> None:
    """The benchmarks' own clients sign correctly: the floor's hand-written signer and the
    boto3 user script both read the whole inventory."""
    from tests.benchmarks import userscript
    from tests.benchmarks.floor import Floor

    sb = await make_sandbox(accounts=2, seed=3, regions=REGIONS)
    accounts = sb.active_account_ids
    truth = {(r["account_id"], r["job_id"]) for r in sb.truth()}
    env = sb.env()
    floor = Floor(
        url=sb.url,
        hub_keys=(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]),
        role_name="SnowballInventoryReader",
        max_concurrency=4,
        requests_per_second=1000.0,
    )
    async with floor:
        await floor.run(accounts, REGIONS)
    assert floor.jobs == truth

    output = tmp_path / "inventory.jsonl"
    await asyncio.to_thread(userscript.run, accounts, REGIONS, output, workers=2)
    lines = output.read_text(encoding="utf-8").splitlines()
    assert {(r["account_id"], r["job_id"]) for r in map(orjson.loads, lines)} == truth
    assert sb.stats().signature_mismatch == 0
