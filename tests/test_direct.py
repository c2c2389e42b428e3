"""The direct send path: our SigV4 equals botocore's, and ListJobs answered through the
`before-call` hook gives exactly what botocore's own send gives (pages, errors, faults), on
JSON 1.1 and Smithy RPC v2 CBOR, over real aiobotocore clients and the sandbox."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import botocore.exceptions
import botocore.parsers
import botocore.session
import pytest
from aiobotocore.session import AioSession
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import credentials, direct, sigv4, wire
from aggregator.accounts import Account, role_arn
from aggregator.clients import ClientPool
from aggregator.credentials import CredentialBroker
from aggregator.direct import DirectSender
from aggregator.records import JobEntry
from aggregator.sandbox import Faults, cbor_model_path
from aggregator.sigv4 import sign
from aggregator.transport import SharedPool, shared_session_class

from .conftest import SandboxFactory

ACCOUNT = Account("200000000001", role_arn("200000000001", "SnowballInventoryReader"))
BIG = (ACCOUNT.account_id, "eu-west-1")
PROTOCOLS = ("json", "cbor")


# --- SigV4 against botocore's ----------------------------------------------------------


@pytest.mark.parametrize("token", [None, "FwoGZXIvYXdzEJr//////////wEaD"])
@pytest.mark.parametrize("port", ["", ":8443"])
def test_signature_equals_botocores(token: str | None, port: str) -> None:
    """Same request, keys and instant: the same Authorization header as botocore's SigV4Auth
    (with and without a session token, with and without a port in the host)."""
    body = b'{"MaxResults": 100, "NextToken": "a b  c"}'
    headers = {
        "X-Amz-Target": "AWSIESnowballJobManagementService.ListJobs",
        "Content-Type": "application/x-amz-json-1.1",
        "User-Agent": "snowball-aggregator/1 (not signed)",
    }
    url = f"https://snowball.eu-west-1.amazonaws.com{port}/"
    keys = Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", token)
    request = AWSRequest(method="POST", url=url, data=body, headers=dict(headers))
    SigV4Auth(keys, "snowball", "eu-west-1").add_auth(request)
    # Sign at the instant botocore signed at.
    now = datetime.strptime(request.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    ours = sign(
        method="POST",
        host=f"snowball.eu-west-1.amazonaws.com{port}",
        path="/",
        headers=headers,
        body=body,
        access_key=keys.access_key,
        secret_key=keys.secret_key,
        token=token,
        region="eu-west-1",
        service="snowball",
        now=now,
    )
    assert ours["Authorization"] == request.headers["Authorization"]
    assert ours["X-Amz-Date"] == request.headers["X-Amz-Date"]
    assert ours.get("X-Amz-Security-Token") == request.headers.get("X-Amz-Security-Token")


def test_a_different_body_or_key_changes_the_signature() -> None:
    """The signature covers the body and the secret (the check above is not vacuous)."""
    now = datetime(2026, 11, 28, tzinfo=UTC)

    def auth(body: bytes, secret: str) -> str:
        return sign(
            method="POST",
            host="h",
            path="/",
            headers={},
            body=body,
            access_key="AKID",
            secret_key=secret,
            token=None,
            region="eu-west-1",
            service="snowball",
            now=now,
        )["Authorization"]

    assert len({auth(b"{}", "s1"), auth(b"{ }", "s1"), auth(b"{}", "s2")}) == 3


# --- the hook over the wire ------------------------------------------------------------


class Stack:
    """A broker and a shared client pool, with or without the direct path installed."""

    def __init__(self, stack: contextlib.AsyncExitStack, models: Path) -> None:
        self.stack = stack
        self.models = models

    async def open(
        self, protocol: str, *, direct_path: bool, http_session_cls: Any = None
    ) -> tuple[ClientPool, DirectSender]:
        hub = AioSession()
        if protocol == "cbor":
            hub.set_config_variable("data_path", str(self.models))
        sender = await self.stack.enter_async_context(DirectSender(timeout=2))

        def hooks(session: AioSession) -> None:
            wire.install(session)
            if direct_path:
                sender.install(session)

        broker = self.broker = await self.stack.enter_async_context(
            CredentialBroker(hub_session=hub, session_hooks=hooks, timeout=2)
        )
        pool = await self.stack.enter_async_context(
            ClientPool(broker=broker, timeout=2, shared=True, http_session_cls=http_session_cls)
        )
        return pool, sender


@pytest.fixture
async def stacks(make_sandbox: SandboxFactory, tmp_path: Path) -> AsyncIterator[tuple[Any, Stack]]:
    sb = await make_sandbox(
        accounts=3, seed=23, regions=("eu-west-1", "us-east-1", "ap-south-1"), jobs={BIG: 250}
    )
    async with contextlib.AsyncExitStack() as stack:
        yield sb, Stack(stack, cbor_model_path(tmp_path / "models"))


async def pages(pool: ClientPool, region: str = "eu-west-1") -> list[dict[str, Any]]:
    out = []
    kwargs: dict[str, Any] = {"MaxResults": 100}
    while True:
        async with pool.lease(ACCOUNT, region) as client:
            page = await client.list_jobs(**kwargs)
        del page["ResponseMetadata"]
        out.append({**page, "NextToken": "NextToken" in page})  # tokens carry a clock
        if not page.get("NextToken"):
            return out
        kwargs["NextToken"] = page["NextToken"]


async def sender_pages(
    pool: ClientPool, sender: DirectSender, region: str = "eu-west-1"
) -> list[tuple[list[JobEntry], bool]]:
    """(entries, whether a next page follows) of every page, through `sender.list_jobs`
    (prepared requests after the client's first)."""
    out = []
    kwargs: dict[str, Any] = {"MaxResults": 100}
    while True:
        async with pool.lease(ACCOUNT, region) as client:
            page = await sender.list_jobs(client, dict(kwargs), ACCOUNT.account_id)
        assert page is not None
        out.append((page.entries, page.next_token is not None))
        if page.next_token is None:
            return out
        kwargs["NextToken"] = page.next_token


def as_entries(plain: list[dict[str, Any]]) -> list[tuple[list[JobEntry], bool]]:
    """botocore's pages (from `pages`) as `sender_pages` gives them."""
    return [
        ([JobEntry.from_api(ACCOUNT.account_id, e) for e in p["JobListEntries"]], p["NextToken"])
        for p in plain
    ]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_pages_equal_botocores_send(stacks: tuple[Any, Stack], protocol: str) -> None:
    """Every page through the direct path equals botocore's own send and parse, and the
    direct path answered every request (none fell back to botocore)."""
    sb, stack = stacks
    plain_pool, _ = await stack.open(protocol, direct_path=False)
    pool, sender = await stack.open(protocol, direct_path=True)
    plain = await pages(plain_pool)
    ours = await pages(pool)
    assert len(ours) == 3
    assert ours == plain
    assert sum(len(p["JobListEntries"]) for p in ours) == 250
    assert (sender.requests, sender.fallbacks) == (3, 0)
    assert sb.stats().snowball_protocols == {protocol: 6}


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_prepared_requests_equal_botocores_send(
    stacks: tuple[Any, Stack], protocol: str
) -> None:
    """Through `list_jobs`, a client's first page is built by botocore and the later ones
    reuse that request (JSON): the same pages as botocore's own send. CBOR bodies are not
    rebuilt by us, so every CBOR page stays on the hook."""
    sb, stack = stacks
    plain_pool, _ = await stack.open(protocol, direct_path=False)
    pool, sender = await stack.open(protocol, direct_path=True)
    plain = await pages(plain_pool)
    ours = await sender_pages(pool, sender)
    assert ours == as_entries(plain)
    assert sum(len(entries) for entries, _ in ours) == 250
    prepared = 2 if protocol == "json" else 0
    assert (sender.requests, sender.prepared_requests, sender.fallbacks) == (3, prepared, 0)
    assert sb.stats().signature_mismatch == 0


async def test_a_request_botocore_changed_is_not_prepared(stacks: tuple[Any, Stack]) -> None:
    """The prepared request is kept only if our serialisation of the parameters gives the
    body botocore built: a parameter handler that changes them (here MaxResults 100 -> 40)
    keeps every call on botocore's build, and its change applies to every page."""
    _, stack = stacks
    pool, sender = await stack.open("json", direct_path=True)

    def forty(params: dict[str, Any], **_: Any) -> None:
        params["MaxResults"] = 40

    pool_session = stack.broker.member_session
    pool_session.register("provide-client-params.snowball.ListJobs", forty)
    ours = await sender_pages(pool, sender)
    assert [len(entries) for entries, _ in ours] == [40] * 6 + [10]
    assert (sender.prepared_requests, sender.fallbacks) == (0, 0)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("faults", "code", "status"),
    [
        (Faults(deny_list_jobs=frozenset({ACCOUNT.account_id})), "AccessDeniedException", 400),
        (Faults(throttle_rps=0.001, throttle_burst=1), "ThrottlingException", 400),
        (Faults(p_500=1.0), "InternalFailure", 500),
        (Faults(p_503=1.0), "ServiceUnavailable", 503),
    ],
    ids=["denied", "throttled", "500", "503"],
)
@pytest.mark.parametrize("prepared", [False, True], ids=["hook", "prepared"])
async def test_errors_raise_botocores_client_error(
    stacks: tuple[Any, Stack],
    protocol: str,
    faults: Faults,
    code: str,
    status: int,
    prepared: bool,
) -> None:
    """Error answers are parsed by botocore's parser and raised as botocore raises them: the
    same class, code, message and status as after botocore's own send, on the hook and from
    a prepared request."""
    sb, stack = stacks
    seen = []
    for direct_path, region in ((False, "eu-west-1"), (True, "ap-south-1")):
        pool, sender = await stack.open(protocol, direct_path=direct_path)

        async def call(client: Any, sender: DirectSender = sender) -> Any:
            if prepared:
                return await sender.list_jobs(client, {}, ACCOUNT.account_id)
            return await client.list_jobs()

        sb.faults = Faults()
        async with pool.lease(ACCOUNT, region) as client:
            await call(client)  # assume the role (and prepare) before the faults start
        sb.faults = faults
        async with pool.lease(ACCOUNT, region) as client:
            if faults.throttle_rps is not None:
                await call(client)  # the one request the bucket allows
            with pytest.raises(botocore.exceptions.ClientError) as excinfo:
                await call(client)
        error = excinfo.value.response
        assert error["ResponseMetadata"]["HTTPStatusCode"] == status
        seen.append((type(excinfo.value).__name__, error["Error"]["Code"], str(excinfo.value)))
    assert seen[0][1] == code
    assert seen[1] == seen[0]
    assert sender.fallbacks == 0 and sender.requests > 0
    after_first = 1 + (faults.throttle_rps is not None)
    assert sender.prepared_requests == (after_first if prepared and protocol == "json" else 0)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_torn_and_truncated_bodies_raise(stacks: tuple[Any, Stack], protocol: str) -> None:
    """A cut-off 200 body is botocore's ResponseParserError; a body shorter than its
    Content-Length is aiohttp's payload error (both retried by fetch as transient)."""
    sb, stack = stacks
    pool, sender = await stack.open(protocol, direct_path=True)
    async with pool.lease(ACCOUNT, "eu-west-1") as client:
        await sender.list_jobs(client, {}, ACCOUNT.account_id)
        sb.faults = Faults(p_malformed=1.0)
        with pytest.raises(botocore.parsers.ResponseParserError):
            await client.list_jobs()
        with pytest.raises(botocore.parsers.ResponseParserError):
            await sender.list_jobs(client, {}, ACCOUNT.account_id)  # prepared (JSON)
        sb.faults = Faults(p_truncated=1.0)
        with pytest.raises(Exception) as excinfo:
            await sender.list_jobs(client, {}, ACCOUNT.account_id)
    from aggregator.errors import TransientError, translate

    err = translate(excinfo.value, account_id="1", region="eu-west-1", operation="ListJobs")
    assert isinstance(err, TransientError)


async def test_a_client_without_bound_credentials_falls_back(
    stacks: tuple[Any, Stack],
) -> None:
    """A client of a session with the hook but whose credentials are its own (not bound)
    goes through botocore's send: the hook answers only what it can sign."""
    sb, _ = stacks
    async with DirectSender(timeout=2) as sender:
        session = AioSession()
        sender.install(session)
        async with session.create_client(
            "snowball",
            region_name="eu-west-1",
            aws_access_key_id=sb.hub_access_key_id,
            aws_secret_access_key=sb.hub_secret_access_key,
        ) as client:
            page = await client.list_jobs()
    assert "JobListEntries" in page
    assert (sender.requests, sender.fallbacks) == (0, 1)


@pytest.mark.parametrize(
    ("env", "host", "expected"),
    [
        ({}, "snowball.eu-west-1.amazonaws.com", None),
        ({"HTTPS_PROXY": "http://proxy:3128"}, "snowball.eu-west-1.amazonaws.com", "http"),
        (
            {"HTTPS_PROXY": "http://proxy:3128", "NO_PROXY": ".amazonaws.com"},
            "snowball.eu-west-1.amazonaws.com",
            None,
        ),
    ],
)
def test_proxies_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], host: str, expected: str | None
) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    direct._proxy_for.cache_clear()
    proxy: Callable[[str, str], str | None] = direct._proxy_for
    got = proxy("https", host)
    direct._proxy_for.cache_clear()
    assert (got and got.split(":")[0]) == expected


def _metadata(seconds: float, n: int) -> dict[str, str]:
    expiry = datetime.now(UTC) + timedelta(seconds=seconds)
    return {
        "access_key": f"ASIA{n}",
        "secret_key": f"secret-{n}",
        "token": f"token-{n}",
        "expiry_time": expiry.isoformat(),
    }


@pytest.mark.parametrize(("lifetime", "refreshes"), [(3600.0, 0), (300.0, 4)])
async def test_assumed_credentials_skip_the_expiry_check_only_far_from_expiry(
    lifetime: float, refreshes: int
) -> None:
    """An hour from expiry the frozen keys are reused without botocore's check; five
    minutes from expiry (inside botocore's refresh window) every call goes to botocore,
    which refreshes."""
    calls: list[int] = []

    async def refresh() -> dict[str, str]:
        calls.append(1)
        return _metadata(lifetime, len(calls))

    keys = credentials._AssumedCredentials.create_from_metadata(
        metadata=_metadata(lifetime, 0), refresh_using=refresh, method="assume-role"
    )
    keys.expires_in(lifetime)
    frozen = [await keys.get_frozen_credentials() for _ in range(4)]
    assert len(calls) == refreshes
    if refreshes:
        assert frozen[-1].access_key == f"ASIA{refreshes}"
    else:
        assert all(f is frozen[0] for f in frozen)


# --- prepared AssumeRole -----------------------------------------------------------------


def test_assume_role_document_reads_as_botocore_reads_it() -> None:
    """The four Credentials fields of an AssumeRole document: what botocore's query parser
    (with wire's timestamp parser) makes of them; a document without them is declined."""
    from aggregator.sandbox.protocols import assume_role_xml

    body = assume_role_xml(
        access_key_id="ASIAEXAMPLE",
        secret_access_key="secret/with+chars=",
        session_token="FwoGZXIvYXdzEJr//////////wEaD+abc=",
        expiration="2026-11-28T16:00:03Z",
        assumed_role_id="AROA:s",
        arn="arn:aws:sts::200000000001:assumed-role/R/s",
        request_id="r-1",
    )
    model = botocore.session.get_session().get_service_model("sts").operation_model("AssumeRole")
    parser = botocore.parsers.create_parser("query")
    parsed = parser.parse(
        {"status_code": 200, "headers": {}, "body": body, "context": {}}, model.output_shape
    )
    ours = direct._assumed_credentials(body)
    assert ours is not None
    assert ours["Credentials"] == parsed["Credentials"]
    assert direct._assumed_credentials(body.replace(b"SessionToken", b"Other")) is None
    assert direct._assumed_credentials(b"<not xml") is None


_STS_NS = "https://sts.amazonaws.com/doc/2011-06-15/"
_STS_FIELDS = (
    "<AccessKeyId>ASIAREAL</AccessKeyId><SecretAccessKey>secret</SecretAccessKey>"
    "<SessionToken>token</SessionToken><Expiration>2026-11-28T16:00:03Z</Expiration>"
)


def _assume_role_document(result: str, prolog: str = "") -> str:
    return (
        f'{prolog}<AssumeRoleResponse xmlns="{_STS_NS}"><AssumeRoleResult>{result}'
        "</AssumeRoleResult><ResponseMetadata><RequestId>r</RequestId></ResponseMetadata>"
        "</AssumeRoleResponse>"
    )


@pytest.mark.parametrize(
    "body",
    [
        _assume_role_document(
            f"<Credentials>{_STS_FIELDS}<AccessKeyId>ASIASECOND</AccessKeyId></Credentials>"
        ).encode(),
        _assume_role_document(
            f"<Credentials>{_STS_FIELDS}<Expiration>2030-01-01T00:00:00Z</Expiration></Credentials>"
        ).encode(),
        _assume_role_document(
            '<Credentials xmlns="urn:other"><AccessKeyId>OTHER</AccessKeyId></Credentials>'
            f"<Credentials>{_STS_FIELDS}</Credentials>"
        ).encode(),
        _assume_role_document(
            "<Credentials>" + _STS_FIELDS.replace("secret", "secr\u00e9t") + "</Credentials>",
            '<?xml version="1.0" encoding="ISO-8859-1"?>',
        ).encode("latin-1"),
    ],
    ids=["repeated-field", "repeated-expiration", "foreign-namespace-first", "latin-1"],
)
def test_assume_role_documents_botocore_reads_otherwise_are_declined(body: bytes) -> None:
    """botocore's query parser ignores namespaces, always decodes UTF-8 and makes a list of a
    repeated element: documents where that reads differently from ElementTree are left to it."""
    assert direct._assumed_credentials(body) is None
    plain = _assume_role_document(f"<Credentials>{_STS_FIELDS}</Credentials>")
    assert direct._assumed_credentials(plain.encode()) is not None
    declared = '<?xml version="1.0" encoding="UTF-8"?>'
    assert (
        direct._assumed_credentials(
            _assume_role_document(f"<Credentials>{_STS_FIELDS}</Credentials>", declared).encode()
        )
        is not None
    )


@pytest.mark.parametrize("extra", [{}, {"ExternalId": "a b+c=d/é&x"}], ids=["plain", "external-id"])
def test_form_body_is_botocores(extra: dict[str, Any]) -> None:
    """Our form body of AssumeRole's fields is the one botocore's request preparer makes."""
    model = botocore.session.get_session().get_service_model("sts").operation_model("AssumeRole")
    fields = direct._query_params(
        model,
        {"RoleArn": "arn:aws:iam::1:role/R", "RoleSessionName": "s", "DurationSeconds": 3600}
        | extra,
    )
    prepared = AWSRequest(method="POST", url="https://sts.amazonaws.com/", data=fields).prepare()
    body = prepared.body
    assert direct._form_body(fields) == (body.encode() if isinstance(body, str) else body)


async def test_prepared_assume_role_works_and_fails_like_botocore(
    make_sandbox: SandboxFactory,
) -> None:
    """Through the broker, AssumeRole after an STS client's first goes out prepared (with the
    ExternalId the sandbox requires): the credentials sign ListJobs the sandbox accepts, and a
    denied role raises botocore's error, with its code and message, as on botocore's path."""
    external_id = "ext id+/=é&"  # form-encoded on the prepared path as botocore encodes it
    sb = await make_sandbox(accounts=4, seed=5, regions=("eu-west-1",), external_id=external_id)
    accounts = [
        Account(a, role_arn(a, "SnowballInventoryReader"), external_id=external_id)
        for a in sb.account_ids
    ]
    errors = []
    for use_sender in (False, True):
        async with contextlib.AsyncExitStack() as stack:
            sender = await stack.enter_async_context(DirectSender(timeout=2))

            def hooks(session: AioSession, sender: DirectSender = sender) -> None:
                wire.install(session)
                sender.install(session)

            broker = await stack.enter_async_context(
                CredentialBroker(
                    session_hooks=hooks,
                    timeout=2,
                    assume_role=sender.assume_role if use_sender else None,
                )
            )
            pool = await stack.enter_async_context(
                ClientPool(broker=broker, timeout=2, shared=True)
            )
            for account in accounts[:3]:
                async with pool.lease(account, "eu-west-1") as client:
                    page = await sender.list_jobs(client, {}, account.account_id)
                assert page is not None
            assert sender.prepared_requests == (2 if use_sender else 0) + 2
            sb.faults = Faults(deny_assume_role=frozenset({accounts[3].account_id}))
            with pytest.raises(Exception) as excinfo:
                await broker.credentials_for(accounts[3])
            sb.faults = Faults()
            cause = excinfo.value.__cause__
            assert isinstance(cause, botocore.exceptions.ClientError)
            errors.append((type(cause).__name__, str(cause)))
    assert errors[0] == errors[1]
    assert "AccessDenied" in errors[0][1]
    assert sb.stats().signature_mismatch == 0


@settings(max_examples=200, deadline=None)
@given(
    headers=st.dictionaries(
        st.sampled_from(["X-Amz-Target", "Content-Type", "content-type", "User-Agent", "X-A"]),
        st.text(alphabet="ab %\t:;=", max_size=8),
        max_size=4,
    ),
    token=st.sampled_from([None, "", "to ken", "a%sb"]),
    path=st.sampled_from(["/", "", "/a b/%7e"]),
)
def test_cached_canonical_template_equals_the_canonical_request(
    headers: dict[str, str], token: str | None, path: str
) -> None:
    """sign() fills a cached template of the canonical request per header set; it is the
    canonical request computed from scratch (trimmed values, sorted names, `%` kept)."""
    prepared = sigv4._canonical_template("POST", path, "h:1", tuple(headers.items()), bool(token))
    assert prepared is not None
    template, names = prepared
    date, payload = "20261128T150003Z", "p" * 64
    values = (date, " ".join(token.split()), payload) if token else (date, payload)
    expected = sigv4._canonical("POST", path, "h:1", headers, date, token, payload)
    assert (template % values, names) == expected


@settings(max_examples=300, deadline=None)
@given(
    params=st.dictionaries(
        st.text(max_size=6),
        st.text() | st.integers() | st.booleans() | st.none() | st.floats(allow_nan=False),
        max_size=4,
    )
)
def test_json_body_is_json_dumps(params: dict[str, Any]) -> None:
    """The prepared request's body is byte for byte `json.dumps`, as botocore serialises
    (any text, bools and other kinds included, which take json.dumps itself)."""
    assert direct._json_body(params) == json.dumps(params).encode("utf-8")


@pytest.mark.parametrize("direct_path", [True, False], ids=["direct", "botocore-send"])
async def test_a_redirect_is_an_error_and_is_not_followed(
    stacks: tuple[Any, Stack], monkeypatch: pytest.MonkeyPatch, direct_path: bool
) -> None:
    """An endpoint that answers 307 (to another host) gets botocore's error for the 3xx, as
    botocore's own send does: on the hook, from a prepared request, and through botocore's
    send over the shared transport (aiohttp's default would follow). The signed request
    (session token included) is never sent to the address the redirect names."""
    _, stack = stacks
    elsewhere: list[dict[str, str]] = []

    async def other_host(request: web.Request) -> web.Response:
        elsewhere.append(dict(request.headers))
        return web.json_response({"JobListEntries": []})

    async def redirector(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(f"{other}/")

    async with contextlib.AsyncExitStack() as servers:
        urls = []
        for handler in (other_host, redirector):
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handler)
            runner = web.AppRunner(app)
            await runner.setup()
            servers.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            urls.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
        other, moved = urls
        monkeypatch.setenv("AWS_ENDPOINT_URL_SNOWBALL", moved)  # STS stays on the sandbox
        shared = await servers.enter_async_context(SharedPool())
        pool, sender = await stack.open(
            "json", direct_path=direct_path, http_session_cls=shared_session_class(shared)
        )
        statuses = []
        async with pool.lease(ACCOUNT, "eu-west-1") as client:
            for call in (
                client.list_jobs(),  # the hook
                # botocore's build through the hook, kept as the client's prepared request
                sender.list_jobs(client, {"MaxResults": 100}, ACCOUNT.account_id),
                sender.list_jobs(client, {"MaxResults": 100}, ACCOUNT.account_id),  # prepared
            ):
                with pytest.raises(botocore.exceptions.ClientError) as excinfo:
                    await call
                statuses.append(excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"])
    assert statuses == [307, 307, 307]
    counts = (3, 1, 0) if direct_path else (0, 0, 0)
    assert (sender.requests, sender.prepared_requests, sender.fallbacks) == counts
    assert elsewhere == []


@pytest.mark.parametrize("suffix", ["/./", "/a/../"], ids=["dot", "dot-dot"])
async def test_an_endpoint_path_with_dot_segments_signs_as_botocore_does(
    stacks: tuple[Any, Stack], monkeypatch: pytest.MonkeyPatch, suffix: str
) -> None:
    """An endpoint URL whose path holds dot segments is sent as botocore sends it (as
    written) and signed as botocore signs it (normalised), so
    the sandbox, which checks signatures as AWS does, accepts every page: on the hook and
    from prepared requests."""
    sb, stack = stacks
    monkeypatch.setenv("AWS_ENDPOINT_URL_SNOWBALL", sb.url + suffix)
    pool, sender = await stack.open("json", direct_path=True)
    ours = await sender_pages(pool, sender)
    assert sum(len(entries) for entries, _ in ours) == 250
    assert (sender.requests, sender.prepared_requests, sender.fallbacks) == (3, 2, 0)
    assert sb.stats().signature_mismatch == 0


async def test_the_broker_forgets_accounts_no_longer_planned(make_sandbox: SandboxFactory) -> None:
    """`keep_only` (each cycle, with the accounts it plans) drops the cached credentials of
    every other account: a churning organisation does not grow the cache, and an account that
    comes back assumes its role afresh."""
    sb = await make_sandbox(accounts=3, seed=5, regions=("eu-west-1",))
    accounts = [Account(a, role_arn(a, "SnowballInventoryReader")) for a in sb.account_ids]
    async with CredentialBroker(timeout=2) as broker:
        for account in accounts:
            await broker.credentials_for(account)
            await broker.session_for(account)
        calls = broker.assume_role_calls
        broker.keep_only({accounts[0].account_id})
        await broker.credentials_for(accounts[0])
        await broker.session_for(accounts[0])
        assert broker.assume_role_calls == calls  # still cached
        await broker.credentials_for(accounts[1])
        assert broker.assume_role_calls == calls + 1  # forgotten: assumed again
        fallback = await broker.credentials_for(accounts[0])
        assert broker.current_credentials(accounts[2], fallback) is fallback  # none held


async def test_two_renewals_of_one_account_at_once_close_its_clients_once(
    make_sandbox: SandboxFactory,
) -> None:
    """Stock usage (a client per account and region): two partitions of one account whose
    credentials expire together both forget the account's session; the second, running while
    the first closes a client, must not fail on a client the first already took out (it did,
    with a KeyError, failing a healthy partition)."""
    regions = ("eu-west-1", "us-east-1", "ap-south-1")
    sb = await make_sandbox(accounts=1, seed=5, regions=regions)
    account = Account(sb.account_ids[0], role_arn(sb.account_ids[0], "SnowballInventoryReader"))
    async with (
        CredentialBroker(timeout=2) as broker,
        ClientPool(broker=broker, timeout=2, shared=False) as pool,
    ):
        clients = []
        for region in regions:
            async with pool.lease(account, region) as client:
                await client.list_jobs(MaxResults=1)  # a connection to close
                clients.append(client)
        session = pool.session_of(clients[0])
        assert session is not None and len(pool) == 3
        await asyncio.gather(pool.forget_session(session), pool.forget_session(session))
        assert len(pool) == 0 and all(pool.session_of(c) is None for c in clients)
