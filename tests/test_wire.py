"""wire.install: ListJobs parsed with C decoders gives exactly botocore's result, or botocore's
error, over real aiobotocore clients and the sandbox on JSON 1.1 and Smithy RPC v2 CBOR."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import botocore.exceptions
import botocore.parsers
import botocore.session
import botocore.utils
import cbor2
import orjson
import pytest
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import wire
from aggregator.records import Page
from aggregator.sandbox import Faults, cbor_model_path

from .conftest import SandboxFactory

ACCOUNT = "200000000001"
BIG = (ACCOUNT, "eu-west-1")
NO_RETRY = AioConfig(retries={"total_max_attempts": 1}, read_timeout=2, connect_timeout=2)
PROTOCOLS = ("json", "cbor")


class Clients:
    """Snowball clients for ACCOUNT from plain or wired sessions, JSON or CBOR models."""

    def __init__(self, stack: contextlib.AsyncExitStack, sb: Any, models: Path) -> None:
        self.stack = stack
        self.sb = sb
        self.models = models
        self.fast_paths = 0

    def session(self, protocol: str, *, wired: bool) -> AioSession:
        session = AioSession()
        if protocol == "cbor":
            session.set_config_variable("data_path", str(self.models))
        if wired:
            wire.install(session)
            # Registered after wire's handler, so it sees the body wire left behind.
            session.register("before-parse.snowball.ListJobs", self._count_fast_paths)
        return session

    def _count_fast_paths(self, response_dict: dict[str, Any], **_: Any) -> None:
        if response_dict["status_code"] == 200 and response_dict["body"] in (b"", b"\xa0"):
            self.fast_paths += 1

    async def snowball(self, protocol: str, *, wired: bool, region: str = "eu-west-1") -> Any:
        session = self.session(protocol, wired=wired)
        sts = await self.stack.enter_async_context(
            session.create_client(
                "sts",
                region_name="us-east-1",
                endpoint_url=self.sb.url,
                aws_access_key_id=self.sb.hub_access_key_id,
                aws_secret_access_key=self.sb.hub_secret_access_key,
            )
        )
        creds = (
            await sts.assume_role(
                RoleArn=f"arn:aws:iam::{ACCOUNT}:role/SnowballInventoryReader",
                RoleSessionName="wire-test",
            )
        )["Credentials"]
        return await self.stack.enter_async_context(
            session.create_client(
                "snowball",
                region_name=region,
                endpoint_url=self.sb.url,
                aws_access_key_id=creds["AccessKeyId"],
                aws_secret_access_key=creds["SecretAccessKey"],
                aws_session_token=creds["SessionToken"],
                config=NO_RETRY,
            )
        )


@pytest.fixture
async def clients(make_sandbox: SandboxFactory, tmp_path: Path) -> AsyncIterator[Clients]:
    """A sandbox with one 250-job list (3 pages) and a factory of clients against it."""
    sb = await make_sandbox(
        accounts=3, seed=23, regions=("eu-west-1", "us-east-1", "ap-south-1"), jobs={BIG: 250}
    )
    async with contextlib.AsyncExitStack() as stack:
        yield Clients(stack, sb, cbor_model_path(tmp_path / "models"))


async def all_pages(client: Any) -> list[dict[str, Any]]:
    """Every page of the chain, without the per-request metadata (request ids, dates)."""
    pages = []
    kwargs: dict[str, Any] = {"MaxResults": 100}
    while True:
        page = await client.list_jobs(**kwargs)
        del page["ResponseMetadata"]
        pages.append(page)
        if "NextToken" not in page:
            return pages
        kwargs["NextToken"] = page["NextToken"]


def without_tokens(pages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pages with each NextToken replaced by whether there was one (tokens carry a clock)."""
    return [{**p, "NextToken": "NextToken" in p} for p in pages]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_pages_are_identical_with_and_without_install(
    clients: Clients, protocol: str
) -> None:
    """Every page (entries, their types and timestamps, the token's presence) equals
    botocore's own parse, and the fast path did take every page."""
    plain = await all_pages(await clients.snowball(protocol, wired=False))
    wired = await all_pages(await clients.snowball(protocol, wired=True))
    assert len(plain) == 3
    assert without_tokens(wired) == without_tokens(plain)
    entries = [e for page in wired for e in page["JobListEntries"]]
    assert len(entries) == 250
    assert all(type(e["CreationDate"]) is datetime for e in entries)
    assert all(e["CreationDate"].utcoffset().total_seconds() == 0 for e in entries)
    assert clients.fast_paths == 3
    assert clients.sb.stats().snowball_protocols == {protocol: 6}


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_empty_list_is_identical(clients: Clients, protocol: str) -> None:
    """A region without jobs answers an empty list, the same with and without install."""
    plain = await (await clients.snowball(protocol, wired=False, region="sa-east-1")).list_jobs()
    wired = await (await clients.snowball(protocol, wired=True, region="sa-east-1")).list_jobs()
    for page in (plain, wired):
        del page["ResponseMetadata"]
    assert wired == plain == {"JobListEntries": []}


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_malformed_bodies_raise_a_parser_error(clients: Clients, protocol: str) -> None:
    """A cut-off 200 body raises ResponseParserError (fetch retries it as MalformedResponse)
    on both protocols; without install botocore reads torn JSON as a page without entries."""
    clients.sb.faults = Faults(p_malformed=1.0)
    wired = await clients.snowball(protocol, wired=True)
    with pytest.raises(botocore.parsers.ResponseParserError):
        await wired.list_jobs()
    plain = await clients.snowball(protocol, wired=False)
    if protocol == "cbor":
        with pytest.raises(botocore.parsers.ResponseParserError):
            await plain.list_jobs()
    else:
        # A cut inside a UTF-8 sequence makes botocore fail less helpfully.
        with contextlib.suppress(UnicodeDecodeError):
            assert "JobListEntries" not in await plain.list_jobs()
    assert clients.fast_paths == 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_truncated_bodies_raise(clients: Clients, protocol: str) -> None:
    """A body shorter than its Content-Length is a connection error before any parsing."""
    clients.sb.faults = Faults(p_truncated=1.0)
    client = await clients.snowball(protocol, wired=True)
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        await client.list_jobs()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    ("faults", "code", "status"),
    [
        (Faults(deny_list_jobs=frozenset({ACCOUNT})), "AccessDeniedException", 400),
        (Faults(throttle_rps=0.001, throttle_burst=1), "ThrottlingException", 400),
        (Faults(p_500=1.0), "InternalFailure", 500),
        (Faults(p_503=1.0), "ServiceUnavailable", 503),
    ],
    ids=["denied", "throttled", "500", "503"],
)
async def test_error_responses_raise_the_same_client_error(
    clients: Clients, protocol: str, faults: Faults, code: str, status: int
) -> None:
    """Error answers go through botocore's error parsing: same code, status and message."""
    clients.sb.faults = faults
    seen = []
    for wired in (False, True):
        # One region each: the throttle's bucket is per (account, region).
        region = "ap-south-1" if wired else "eu-west-1"
        client = await clients.snowball(protocol, wired=wired, region=region)
        if faults.throttle_rps is not None:
            await client.list_jobs()  # the one request the bucket allows
        with pytest.raises(botocore.exceptions.ClientError) as excinfo:
            await client.list_jobs()
        error = excinfo.value.response
        seen.append((error["Error"]["Code"], error["Error"]["Message"], status))
        assert error["ResponseMetadata"]["HTTPStatusCode"] == status
    assert seen[0] == seen[1]
    assert seen[1][0] == code


# --- the fast path against botocore's own parser, on bodies the sandbox never sends -----


def _service_model(protocol: str, models: Path) -> Any:
    session = botocore.session.Session()
    if protocol == "cbor":
        session.set_config_variable("data_path", str(models))
    return session.get_service_model("snowball")


def _parse(model: Any, body: bytes, *, wired: bool, status: int = 200) -> dict[str, Any]:
    """What the client would return: wire's handler (if wired), then botocore's parser."""
    operation = model.operation_model("ListJobs")
    response = {
        "status_code": status,
        "headers": {"x-amzn-requestid": "r-1"},
        "body": body,
        "context": {"operation_name": "ListJobs"},
    }
    customized: dict[str, Any] = {}
    if wired:
        wire._before_parse(
            operation_model=operation,
            response_dict=response,
            customized_response_dict=customized,
        )
    parser = botocore.parsers.create_parser(model.resolved_protocol)
    parsed: dict[str, Any] = parser.parse(response, operation.output_shape)
    parsed.update(customized)
    return parsed


def assert_same_outcome(model: Any, body: bytes) -> None:
    """The client gives the same result, or raises the same exception, with wire's handler
    installed and without it."""
    outcomes = []
    for wired in (False, True):
        try:
            outcomes.append(("ok", _parse(model, body, wired=wired)))
        except Exception as exc:
            outcomes.append(("error", type(exc)))
    assert outcomes[0] == outcomes[1]


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12)
ENTRY_VALUES = st.fixed_dictionaries(
    {},
    optional={
        "JobId": TEXT,
        "JobState": st.sampled_from(["New", "Complete", "WithDrone"]) | st.none(),
        "IsMaster": st.booleans() | st.none(),
        "JobType": st.sampled_from(["IMPORT", "EXPORT", "FUTURE_TYPE"]),
        "SnowballType": st.sampled_from(["EDGE", "V9_NEW"]) | st.none(),
        "CreationDate": st.integers(0, 4_000_000_000)
        | st.floats(0, 4e9, allow_nan=False).map(lambda x: round(x, 3))
        | st.none(),
        "Description": TEXT | st.none(),
        "SomethingNew": st.integers(-(2**63), 2**63 - 1) | TEXT,
    },
)
RESULTS = st.fixed_dictionaries(
    {},
    optional={
        "JobListEntries": st.lists(ENTRY_VALUES, max_size=5) | st.none(),
        "NextToken": TEXT | st.none(),
        "Unmodeled": st.booleans(),
    },
)


def _cbor_body(result: dict[str, Any]) -> bytes:
    def entry(e: dict[str, Any]) -> dict[str, Any]:
        date = e.get("CreationDate")
        return {**e, "CreationDate": cbor2.CBORTag(1, date)} if date is not None else e

    if result.get("JobListEntries"):
        result = {**result, "JobListEntries": [entry(e) for e in result["JobListEntries"]]}
    return bytes(cbor2.dumps(result))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = cbor_model_path(tmp_path_factory.mktemp("models"))
    return {protocol: _service_model(protocol, path) for protocol in PROTOCOLS}


@settings(max_examples=150, deadline=None)
@given(result=RESULTS, protocol=st.sampled_from(PROTOCOLS))
def test_fast_path_equals_botocore_on_any_body(
    models: dict[str, Any], result: dict[str, Any], protocol: str
) -> None:
    """Nulls left out, unknown members ignored, timestamps as the same instants: whatever
    the body, the wired parse equals botocore's."""
    body = orjson.dumps(result) if protocol == "json" else _cbor_body(result)
    model = models[protocol]
    assert _parse(model, body, wired=True) == _parse(model, body, wired=False)


def _page_outcome(make: Any) -> tuple[str, Any]:
    try:
        return ("ok", make())
    except Exception as exc:
        return ("error", type(exc))


INT64 = st.integers(-(2**63), 2**63 - 1)  # what JSON numbers orjson writes
ODD_ENTRIES = st.fixed_dictionaries(
    {},
    optional={
        "JobId": TEXT | st.integers(0, 9) | st.none(),
        "IsMaster": st.booleans() | st.integers(0, 2) | st.none(),
        "CreationDate": st.booleans() | TEXT | st.integers(0, 4_000_000_000) | st.none(),
        "JobState": st.integers(0, 3) | TEXT,
        "JobType": st.integers(0, 3) | st.booleans() | TEXT,
        "SnowballType": st.lists(TEXT, max_size=1) | TEXT,
        "Description": st.integers(0, 3) | TEXT | st.none(),
    },
)
PAGES = st.fixed_dictionaries(
    {},
    optional={
        "JobListEntries": st.lists(ENTRY_VALUES | ODD_ENTRIES | INT64, max_size=5)
        | st.none()
        | INT64,
        "NextToken": TEXT | st.none() | INT64,
        "Unmodeled": st.booleans(),
    },
)


@settings(max_examples=300, deadline=None)
@given(result=RESULTS | PAGES)
def test_one_pass_page_equals_botocores_parse(models: dict[str, Any], result: Any) -> None:
    """`list_jobs_page` (the prepared path's one pass from body to entries) gives the page
    that botocore's parse and `Page.from_response` give, or declines (None) and leaves the
    body to that path, which then decides; it never gives a different page."""
    body = orjson.dumps(result)
    operation = models["json"].operation_model("ListJobs")
    fast = _page_outcome(lambda: wire.list_jobs_page(operation, body, "123456789012"))
    slow = _page_outcome(
        lambda: Page.from_response("123456789012", _parse(models["json"], body, wired=False))
    )
    if fast != ("ok", None):
        assert fast == slow


@pytest.mark.parametrize(
    "odd", [{"JobState": 5}, {"JobType": True}, {"SnowballType": ["EDGE"]}, {"Description": 7}]
)
def test_a_string_member_holding_something_else_is_text_on_every_path(
    models: dict[str, Any], odd: dict[str, Any]
) -> None:
    """A service out of its model: the one pass declines the page, and the general path
    makes the member text, so a record never depends on which path read its page (the one
    pass wrote the number itself, and the next run could refuse the snapshot)."""
    body = orjson.dumps({"JobListEntries": [{"JobId": "JID1", **odd}]})
    operation = models["json"].operation_model("ListJobs")
    assert wire.list_jobs_page(operation, body, "123456789012") is None
    page = Page.from_response("123456789012", _parse(models["json"], body, wired=True))
    assert page is not None
    (entry,) = page.entries
    assert all(type(v) is str or v is None for v in entry[2:5] + entry[7:])


def test_one_pass_page_takes_the_plain_shape(models: dict[str, Any]) -> None:
    """The declining above is not the common case: a plain page is built in one pass."""
    result = {
        "JobListEntries": [
            {"JobId": "JID1", "JobState": "New", "CreationDate": 1.7e9, "IsMaster": False},
            {"JobId": "JID2", "CreationDate": 1700000000, "Description": None},
        ],
        "NextToken": "t",
    }
    operation = models["json"].operation_model("ListJobs")
    page = wire.list_jobs_page(operation, orjson.dumps(result), "123456789012")
    assert page is not None
    assert page.next_token == "t"
    assert [e.creation_date for e in page.entries] == [
        "2023-11-14T22:13:20.000Z",
        "2023-11-14T22:13:20.000Z",
    ]
    assert wire.list_jobs_page(models["cbor"].operation_model("ListJobs"), b"", "1") is None


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize(
    "body",
    [
        b'{"JobListEntries": [{"JobId": "a", "CreationDate": "2016-04-14T23:56:26.003Z"}]}',
        b'{"JobListEntries": [{"JobId": "a", "CreationDate": true}]}',
        b'{"JobListEntries": ["not an object"]}',
        b'{"JobListEntries": {"JobId": "a"}}',
        b"[1, 2]",
    ],
    ids=["iso-date", "bool-date", "string-entry", "object-list", "array"],
)
def test_unusual_bodies_are_left_to_botocore(
    models: dict[str, Any], protocol: str, body: bytes
) -> None:
    """Decodable bodies the fast path does not vouch for reach botocore untouched: the same
    result, or the same exception."""
    model = models[protocol]
    if protocol == "cbor":
        body = bytes(cbor2.dumps(orjson.loads(body)))
    assert_same_outcome(model, body)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("cut", [0, 1, 20, -1], ids=["empty", "one-byte", "middle", "last"])
def test_undecodable_bodies_raise_a_parser_error(
    models: dict[str, Any], protocol: str, cut: int
) -> None:
    """A 200 body cut anywhere (even inside a UTF-8 sequence) raises ResponseParserError."""
    result = {"JobListEntries": [{"JobId": "a", "Description": "東京データセンター移行 🚚"}]}
    body = orjson.dumps(result) if protocol == "json" else bytes(cbor2.dumps(result))
    with pytest.raises(botocore.parsers.ResponseParserError):
        _parse(models[protocol], body[:cut], wired=True)


def test_error_statuses_are_left_to_botocore(models: dict[str, Any]) -> None:
    """A non-200 answer is never touched, even when its body would decode."""
    body = orjson.dumps({"__type": "ThrottlingException", "message": "Rate exceeded"})
    parsed = _parse(models["json"], body, wired=True, status=400)
    assert parsed["Error"] == {"Code": "ThrottlingException", "Message": "Rate exceeded"}


def test_timestamp_parser() -> None:
    """Epoch numbers become UTC datetimes; text goes through botocore's parser."""
    assert wire.parse_timestamp_fast(1460678186.003) == datetime(
        2016, 4, 14, 23, 56, 26, 3000, tzinfo=UTC
    )
    assert wire.parse_timestamp_fast(0) == datetime(1970, 1, 1, tzinfo=UTC)
    assert wire.parse_timestamp_fast("2016-04-14T23:56:26.003Z") == datetime(
        2016, 4, 14, 23, 56, 26, 3000, tzinfo=UTC
    )
    # Digits other than ASCII ones (here full-width) are not the fast path's: botocore reads them.
    wide = "\uff12\uff10\uff11\uff16-04-14T23:56:26.003Z"
    assert wire.parse_timestamp_fast(wide) == botocore.utils.parse_timestamp(wide)


@settings(max_examples=300, deadline=None)
@given(
    instant=st.datetimes(
        min_value=datetime(1000, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)
    ),
    digits=st.integers(0, 7),
    offset=st.sampled_from(["Z", "+00:00", "+05:30", ""]),
)
def test_text_timestamps_equal_botocores(instant: datetime, digits: int, offset: str) -> None:
    """ISO 8601 text, whether it takes the fast path (UTC `Z`, up to six fractional digits)
    or botocore's, gives the instant botocore's own parser gives."""
    text = instant.strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        text += "." + f"{instant.microsecond:06d}{instant.microsecond % 10}"[:digits]
    text += offset
    assert wire.parse_timestamp_fast(text) == botocore.utils.parse_timestamp(text)


@pytest.mark.parametrize(
    "value",
    [
        cbor2.undefined,
        cbor2.CBORTag(258, ["a", "b"]),  # a set
        cbor2.CBORTag(4242, "x"),  # a tag neither side knows
        b"raw bytes",
        cbor2.CBORSimpleValue(99),
    ],
    ids=["undefined", "set", "unknown-tag", "bytes", "simple-value"],
)
@pytest.mark.parametrize("where", ["entry", "top", "unknown-member", "nested-in-unknown"])
def test_cbor_values_beyond_json_are_left_to_botocore(
    models: dict[str, Any], value: Any, where: str
) -> None:
    """CBOR can carry values JSON cannot (undefined, tags, byte strings, simple values):
    the fast path never passes one through, so botocore's parser decides (the same result,
    or the same exception) and no such value reaches a record."""
    entry: dict[str, Any] = {"JobId": "a", "JobState": "New"}
    result: dict[str, Any] = {"JobListEntries": [entry]}
    if where == "entry":
        entry["Description"] = value
    elif where == "top":
        result["NextToken"] = value
    elif where == "unknown-member":
        entry["SomethingNew"] = value
    else:
        entry["SomethingNew"] = {"deeper": [1, value]}
    body = bytes(cbor2.dumps(result))
    assert_same_outcome(models["cbor"], body)


def _text(value: str) -> bytes:
    """A short CBOR text string (under 24 bytes), written by hand."""
    data = value.encode()
    assert len(data) < 24
    return bytes([0x60 | len(data)]) + data


_ENTRIES, _JOB_ID, _NEXT = _text("JobListEntries"), _text("JobId"), _text("NextToken")


@pytest.mark.parametrize(
    "body",
    [
        # {"JobListEntries": [{"JobId": "J1"}], "NextToken": "tok", "NextToken": null}: botocore
        # keeps "tok" (its decoder drops the null), cbor2 the null (a page lost its token).
        b"\xa3"
        + _ENTRIES
        + b"\x81\xa1"
        + _JOB_ID
        + _text("J1")
        + _NEXT
        + _text("tok")
        + _NEXT
        + b"\xf6",
        # {"JobListEntries": [{"JobId": "J1", "JobId": null}]}
        b"\xa1" + _ENTRIES + b"\x81\xa2" + _JOB_ID + _text("J1") + _JOB_ID + b"\xf6",
        # a null nested in a member: botocore drops it, at any depth
        b"\xa1"
        + _ENTRIES
        + b"\x81\xa2"
        + _JOB_ID
        + _text("J1")
        + _text("Description")
        + b"\xa2"
        + _text("a")
        + b"\xf6"
        + _text("b")
        + b"\x01",
        # an indefinite-length text whose chunks split "é": botocore joins before decoding
        b"\xa1"
        + _ENTRIES
        + b"\x81\xa2"
        + _JOB_ID
        + _text("J1")
        + _text("Description")
        + b"\x7f\x61\xc3\x61\xa9\xff",
        # an array as a key, at the top and in an entry (botocore: TypeError)
        b"\xa2" + _ENTRIES + b"\x80\x80\x01",
        b"\xa1" + _ENTRIES + b"\x81\xa2" + _JOB_ID + _text("J1") + b"\x80\x01",
        # a shared value that contains itself (tags 28 and 29)
        b"\xd8\x1c\xa2" + _ENTRIES + b"\x80" + _text("Unmodeled") + b"\xd8\x1d\x00",
    ],
    ids=[
        "repeated-token-then-null",
        "repeated-job-id-then-null",
        "nested-null",
        "text-chunks-split-a-character",
        "array-key-at-top",
        "array-key-in-entry",
        "shared-value-cycle",
    ],
)
def test_cbor_botocore_decodes_otherwise_is_left_to_botocore(
    models: dict[str, Any], body: bytes
) -> None:
    """CBOR that cbor2 and botocore's decoder read differently (nulls, which botocore drops as
    it reads them; chunked text; keys that are not text; shared values) reaches botocore: the
    same result, or the same exception."""
    assert_same_outcome(models["cbor"], body)


@pytest.mark.parametrize("created", [b"1e17", b"1e20", b"9223372036854775808"])
def test_epochs_no_datetime_holds_are_left_to_botocore(
    models: dict[str, Any], created: bytes
) -> None:
    """An epoch CreationDate beyond any datetime fails as botocore fails it (its error, so the
    partition's error code), on the general path and the one-pass page alike."""
    body = b'{"JobListEntries": [{"JobId": "J1", "CreationDate": %b}]}' % created
    with pytest.raises(Exception) as stock:
        _parse(models["json"], body, wired=False)
    with pytest.raises(Exception) as ours:
        _parse(models["json"], body, wired=True)
    assert type(ours.value) is type(stock.value)
    operation = models["json"].operation_model("ListJobs")
    assert wire.list_jobs_page(operation, body, "123456789012") is None
