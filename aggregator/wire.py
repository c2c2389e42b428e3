"""Wire: cheaper ListJobs response handling through botocore's public hooks.

`install(session)` registers, on one aiobotocore session, the handlers that make ListJobs cheap
to parse; every client created from the session afterwards inherits them:

- A `before-parse.snowball.ListJobs` handler decodes a 200 body with orjson (JSON 1.1) or
  cbor2 (Smithy RPC v2 CBOR), both C decoders, and hands the result to botocore through the
  hook's `customized_response_dict`. That is the hook's contract in botocore and aiobotocore
  (`endpoint._do_get_response`): handlers' return values are ignored, the parser always
  runs, and `customized_response_dict` is merged into what it returns. So the handler also
  swaps the body for an empty document, leaving botocore's parser nothing to walk (it walks
  the shape model field by field in Python and converts every timestamp through dateutil:
  most of the CPU of a page).
- The session's response parser factory gets a timestamp parser that converts epoch numbers
  straight to UTC datetimes (`set_parser_defaults(timestamp_parser=...)`), for whatever
  botocore still parses itself.

The result is the same dict botocore builds: only members of the output shape, `null` members
left out, timestamps as aware datetimes (UTC instead of local time: the same instants). The
handler takes the fast path only when it can prove that; a decoded body it does not vouch for
(a member type it does not handle, a value of the wrong kind, a non-200 status) is left
untouched for botocore, so error responses raise botocore's modeled errors as before. One
deliberate difference: a 200 body that does not decode at all raises botocore's
`ResponseParserError` on JSON as on CBOR, where botocore's JSON parser would return an empty
result (or raise `UnicodeDecodeError` when the cut falls inside a UTF-8 sequence) and its CBOR
parser an `AttributeError` on an empty body (a non-empty CBOR body cbor2 cannot decode is left
to botocore's decoder, which raises the same error if it cannot either). Truncated bodies fail
in aiohttp before parsing, as without this module.

CBOR: what cbor2 and botocore's own decoder read differently is left to botocore. That is a
null anywhere (botocore's decoder drops a null as it reads it, so with a repeated key the earlier
value stands, where cbor2 keeps the later null: a page would lose its NextToken), a map key that
is not text, a value JSON cannot carry (see `_plain`), and a body cbor2 cannot decode (botocore
joins the chunks of an indefinite-length string before decoding UTF-8, so it reads a character
split across chunks). A caveat: cbor2 decodes some semantic tags that botocore rejects (tag 0
date strings, bignums, self-described CBOR, shared values, string references) without a trace
in what it returns; a service that sent them would be read rather than refused.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import cbor2
import orjson
from aiobotocore.parsers import AioResponseParserFactory
from aiobotocore.session import AioSession
from botocore.parsers import ResponseParserError
from botocore.utils import parse_timestamp

from .records import JobEntry, Page, epoch_millis

__all__ = [
    "error_body",
    "install",
    "list_jobs_page",
    "parse_success",
    "parse_timestamp_fast",
    "parser_for",
]

HANDLER_ID = "snowball-aggregator.wire.list-jobs"

# Scalar member types whose decoded value botocore passes through unchanged (JSON and CBOR).
_PASS_THROUGH = frozenset({"string", "boolean", "integer", "long", "float", "double"})
# The empty document each protocol's parser reads as "no members", without walking anything.
_EMPTY_BODY = {"json": b"", "smithy-rpc-v2-cbor": b"\xa0"}


# ISO 8601 in UTC as AWS's XML and JSON services write it: `2026-11-28T16:00:03Z`, or with
# up to six fractional digits. `datetime.fromisoformat` reads it 400x faster than dateutil.
_ISO_UTC = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?Z")


def parse_timestamp_fast(value: Any) -> datetime:
    """botocore's timestamp parser with fast paths: epoch numbers and ISO 8601 UTC text
    (`...T16:00:03Z`, STS's Expiration) become UTC datetimes.

    Everything else (other ISO 8601 forms, RFC 822 text, numeric strings) goes to botocore's
    own `parse_timestamp`. botocore returns epoch numbers in local time and `Z` text with
    dateutil's `tzutc`; the instants are the same.
    """
    if type(value) is float or type(value) is int:
        return datetime.fromtimestamp(value, UTC)
    if type(value) is str and _ISO_UTC.fullmatch(value):
        return datetime.fromisoformat(value)
    result: datetime = parse_timestamp(value)
    return result


class _Entries:
    """How to take one list-of-structures member as decoded: its members by kind."""

    __slots__ = ("known", "timestamps")

    def __init__(self, known: frozenset[str], timestamps: tuple[str, ...]) -> None:
        self.known = known
        self.timestamps = timestamps


class _Plan:
    """The output shape of an operation, reduced to what the fast path must do."""

    __slots__ = ("known", "lists", "timestamps")

    def __init__(
        self, known: frozenset[str], timestamps: tuple[str, ...], lists: dict[str, _Entries]
    ) -> None:
        self.known = known
        self.timestamps = timestamps
        self.lists = lists


def _flat_members(shape: Any) -> tuple[frozenset[str], tuple[str, ...]] | None:
    """(member names, timestamp members) of a structure of scalars; None if not that."""
    if shape.type_name != "structure" or shape.is_document_type or shape.is_tagged_union:
        return None
    names: list[str] = []
    timestamps: list[str] = []
    for name, member in shape.members.items():
        if member.serialization.get("name", name) != name:
            return None
        if member.type_name == "timestamp":
            timestamps.append(name)
        elif member.type_name not in _PASS_THROUGH:
            return None
        names.append(name)
    return frozenset(names), tuple(timestamps)


def _plan_for(shape: Any) -> _Plan | None:
    """The fast-path plan of an output shape: scalars, timestamps and lists of flat
    structures at the top level. None (botocore parses) for anything richer."""
    if shape is None or shape.type_name != "structure":
        return None
    if shape.is_document_type or shape.is_tagged_union or shape.event_stream_name:
        return None
    names: list[str] = []
    timestamps: list[str] = []
    lists: dict[str, _Entries] = {}
    for name, member in shape.members.items():
        if member.serialization.get("name", name) != name or member.serialization.get("location"):
            return None
        kind = member.type_name
        if kind == "timestamp":
            timestamps.append(name)
        elif kind == "list":
            flat = _flat_members(member.member)
            if flat is None:
                return None
            lists[name] = _Entries(*flat)
        elif kind not in _PASS_THROUGH:
            return None
        names.append(name)
    return _Plan(frozenset(names), tuple(timestamps), lists)


# Output shapes are built once per client (botocore caches them on its ServiceModel), so
# plans are keyed by the shape object and go away with the clients that made them.
_plans: weakref.WeakKeyDictionary[Any, _Plan | None] = weakref.WeakKeyDictionary()


def _cached_plan(shape: Any) -> _Plan | None:
    try:
        return _plans[shape]
    except KeyError:
        plan = _plans[shape] = _plan_for(shape)
        return plan


def _json_time(value: Any) -> datetime | None:
    # Exact types: a bool (an int subclass) is left to botocore, which decides what it means;
    # so is an instant no datetime holds (botocore raises its own error for it).
    if type(value) is float or type(value) is int:
        try:
            return datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    return None


def _cbor_time(value: Any) -> datetime | None:
    # cbor2 decodes tag 1 (epoch seconds) to an aware UTC datetime, as botocore does; any
    # other representation is left to botocore.
    if type(value) is datetime and value.tzinfo is UTC:
        return value
    return None


# What a JSON document decodes to, but null. CBOR can also carry undefined, byte strings,
# simple values and tags (sets, big numbers, ...), which botocore's CBOR parser drops, converts
# or rejects, and its decoder drops nulls where cbor2 keeps them (see the module docstring): a
# CBOR structure holding any of them (other than a timestamp) is left to botocore.
_PLAIN = frozenset({str, bool, int, float, list, dict})


def _plain(value: Any) -> bool:
    """Whether `value` is what a JSON document without nulls decodes to, all the way down."""
    kind = type(value)
    if kind is list:
        return all(map(_plain, value))
    if kind is dict:
        return all(type(k) is str and _plain(v) for k, v in value.items())
    return kind in _PLAIN


def _clean(
    node: Any,
    known: frozenset[str],
    timestamps: tuple[str, ...],
    to_time: Any,
    lists: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """One decoded structure as botocore's parser returns it; None to give up. `lists` are
    members whose items the caller cleans (as structures) afterwards."""
    if type(node) is not dict:
        return None
    entry: dict[str, Any] = node
    if to_time is _cbor_time:
        if None in entry.values():
            return None
        for name, value in entry.items():
            if type(name) is not str:
                return None
            if name in timestamps or (lists is not None and name in lists):
                continue
            if not _plain(value):
                return None
    if not entry.keys() <= known or None in entry.values():
        # Unknown members are ignored and nulls left out, as botocore's parsers do.
        entry = {k: v for k, v in entry.items() if k in known and v is not None}
    for name in timestamps:
        value = entry.get(name)
        if value is not None:
            converted = to_time(value)
            if converted is None:
                return None
            entry[name] = converted
    return entry


def _shape_result(data: Any, plan: _Plan, to_time: Any) -> dict[str, Any] | None:
    top = _clean(data, plan.known, plan.timestamps, to_time, plan.lists)
    if top is None:
        return None
    for name, entries in plan.lists.items():
        items = top.get(name)
        if items is None:
            continue
        if type(items) is not list:
            return None
        known, timestamps = entries.known, entries.timestamps
        cleaned = []
        for item in items:
            entry = _clean(item, known, timestamps, to_time)
            if entry is None:
                return None
            cleaned.append(entry)
        top[name] = cleaned
    return top


def _decode_json(body: bytes) -> Any:
    return orjson.loads(body)


def _decode_cbor(body: bytes) -> Any:
    return cbor2.loads(body)


_DECODERS = {"json": (_decode_json, _json_time), "smithy-rpc-v2-cbor": (_decode_cbor, _cbor_time)}


# Output shapes whose ListJobs page `list_jobs_page` may build in one pass (see there).
_one_pass: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
_ENTRY_MEMBERS = frozenset(
    {"JobId", "JobState", "IsMaster", "JobType", "SnowballType", "CreationDate", "Description"}
)


def _one_pass_ok(shape: Any) -> bool:
    try:
        return _one_pass[shape]
    except KeyError:
        plan = _cached_plan(shape)
        entries = plan.lists.get("JobListEntries") if plan is not None else None
        ok = _one_pass[shape] = (
            plan is not None
            and "NextToken" in plan.known
            and not plan.timestamps
            and entries is not None
            and entries.known >= _ENTRY_MEMBERS
            and entries.timestamps == ("CreationDate",)
        )
        return ok


def list_jobs_page(operation_model: Any, body: Any, account_id: str) -> Page | None:
    """A 200 ListJobs body on the JSON protocol, straight to the page's entries: what
    `Page.from_response` makes of `parse_success`'s result, without the intermediate
    botocore-shaped dicts and datetimes. None when the body is not the plain shape (no list,
    an entry that is not an object, a CreationDate that is not a number, a JobId or token
    that is not a string...): the caller then takes the general path, which decides.

    Raises botocore's `ResponseParserError` for a body that does not decode at all.
    """
    if (
        operation_model.service_model.resolved_protocol != "json"
        or type(body) is not bytes
        or not _one_pass_ok(operation_model.output_shape)
    ):
        return None
    try:
        data = orjson.loads(body)
    except Exception as exc:
        raise ResponseParserError(
            f"unparseable {operation_model.name} response body ({len(body)} bytes)"
        ) from exc
    if type(data) is not dict:
        return None
    items = data.get("JobListEntries")
    token = data.get("NextToken")
    if type(items) is not list or not (token is None or type(token) is str):
        return None
    entries: list[JobEntry] = []
    append = entries.append
    for item in items:
        if type(item) is not dict:
            return None
        get = item.get
        job_id = get("JobId")
        created = get("CreationDate")
        if type(job_id) is not str:
            return None
        if created is not None:
            if type(created) is not float and type(created) is not int:
                return None
            try:
                created = epoch_millis(created)
            except (OverflowError, OSError, ValueError):
                return None  # an instant no datetime holds: botocore raises its own error
        is_master = get("IsMaster")
        state, kind, device, description = (
            get("JobState"),
            get("JobType"),
            get("SnowballType"),
            get("Description"),
        )
        if (
            (type(state) is not str and state is not None)
            or (type(kind) is not str and kind is not None)
            or (type(device) is not str and device is not None)
            or (type(description) is not str and description is not None)
        ):
            return None  # a string member that holds something else: `from_api` makes it text
        append(
            JobEntry(
                account_id,
                job_id,
                state,
                kind,
                device,
                None if is_master is None else bool(is_master),
                created,
                description,
            )
        )
    return Page(entries, token or None)


def parse_success(operation_model: Any, body: Any) -> dict[str, Any] | None:
    """The parsed result of a 200 `body`, as botocore's parser would return it (without
    `ResponseMetadata`); None when the fast path cannot vouch for it (botocore parses).

    Raises botocore's `ResponseParserError` for a body that does not decode at all.
    """
    protocol = operation_model.service_model.resolved_protocol
    codec = _DECODERS.get(protocol)
    if codec is None or type(body) is not bytes:
        return None
    plan = _cached_plan(operation_model.output_shape)
    if plan is None:
        return None
    decode, to_time = codec
    try:
        data = decode(body)
    except Exception as exc:
        if to_time is _cbor_time and body:
            return None  # botocore's decoder reads some CBOR that cbor2 does not (see above)
        # A 200 ListJobs always carries a document. botocore would read a torn JSON body as
        # an empty result (or fail on a cut UTF-8 sequence), and an empty CBOR body as an
        # AttributeError; say what it is, on both wires.
        raise ResponseParserError(
            f"unparseable {operation_model.name} response body ({len(body)} bytes)"
        ) from exc
    try:
        return _shape_result(data, plan, to_time)
    except RecursionError:  # nesting deeper than Python recurses, or a CBOR shared-value cycle
        return None


_parsers: dict[str, Any] = {}


def parser_for(protocol: str) -> Any:
    """botocore's (aiobotocore's) response parser for `protocol`, with our timestamp parser."""
    parser = _parsers.get(protocol)
    if parser is None:
        factory = AioResponseParserFactory()
        factory.set_parser_defaults(timestamp_parser=parse_timestamp_fast)
        parser = _parsers[protocol] = factory.create_parser(protocol)
    return parser


def error_body(protocol: str, body: bytes) -> bytes:
    """An error response's `body` as botocore's parser for `protocol` can read it.

    botocore's JSON parser takes a body that is not JSON as the error's message, but raises
    AttributeError on one that is JSON and not an object (a gateway's `null`, `[]` or
    `"Service Unavailable"` with a 502 or 503): the error would lose its HTTP status, which
    is what makes a 5xx transient. Such a body becomes an object with its text as `message`;
    any other body is returned as it is."""
    if protocol != "json" or not body or body[:1] == b"{":
        return body
    try:
        decoded = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body  # not JSON: botocore makes it the message itself
    if isinstance(decoded, dict):
        return body
    return orjson.dumps({"message": body.decode("utf-8", "replace")})


def _before_parse(
    operation_model: Any,
    response_dict: dict[str, Any],
    customized_response_dict: dict[str, Any],
    **_: Any,
) -> None:
    """Decode a successful ListJobs body with a C decoder; leave anything else to botocore."""
    if response_dict.get("status_code") != 200:
        # Errors go through botocore's error parsing and modeled exceptions.
        protocol = operation_model.service_model.resolved_protocol
        response_dict["body"] = error_body(protocol, response_dict.get("body") or b"")
        return
    parsed = parse_success(operation_model, response_dict.get("body"))
    if parsed is None:
        return
    customized_response_dict.update(parsed)
    response_dict["body"] = _EMPTY_BODY[operation_model.service_model.resolved_protocol]


def install(session: AioSession) -> None:
    """Register the wire optimisations on `session` (before any client is created from it)."""
    session.register("before-parse.snowball.ListJobs", _before_parse, unique_id=HANDLER_ID)
    factory = session.get_component("response_parser_factory")
    factory.set_parser_defaults(timestamp_parser=parse_timestamp_fast)
