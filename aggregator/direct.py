"""Direct: ListJobs signed and sent by us, through botocore's public `before-call` hook.

Design. botocore does four things per request: build it (parameter validation, endpoint rules,
serialisation, User-Agent), sign it, send it, parse the answer. Building stays botocore's.
What costs most after `wire.py` is the middle: its SigV4 walks an email-style header
object, and its send path emits a dozen events and wraps the request and response twice.
That is most of a page's CPU. So a `before-call.snowball.ListJobs` handler takes the
request botocore has built, at its resolved endpoint (so `AWS_ENDPOINT_URL*`, profiles and
FIPS/dual-stack rules apply as before), and:

1. signs it with SigV4 (`sigv4.py`), with the account credentials bound to the calling task
   (`credentials.bound_frozen_credentials`);
2. sends it through one aiohttp session (shared connection pool, the clients' timeouts,
   `HTTPS_PROXY`/`NO_PROXY` from the environment, read once per host, TLS verified against
   botocore's CA bundle or `AWS_CA_BUNDLE`; no cookies, no `.netrc`, no redirects: a 3xx is
   an error, as after botocore's own send, and the signed headers go to no other host);
3. parses a 200 with `wire.py`'s C-decoder path, and anything else (errors, bodies that path
   does not vouch for) with botocore's own response parser for the protocol, so error codes,
   messages and modeled exceptions are exactly botocore's: botocore raises them from the
   returned `(http, parsed)` pair just as after its own send.

`before-call` is the hook botocore's own `Stubber` answers requests through: a handler's
`(http_response, parsed)` stands for the response. The handler answers only what it can do
exactly (ListJobs, SigV4, a POST with no query string, a client of the shared member session
whose credentials are bound) and returns None for anything else, and botocore then sends as
usual. Transport errors are aiohttp's, which `errors.translate` maps like botocore's.
The stock switch, and `direct=False` on the service, leave the hook unregistered.

Prepared requests. Building a request is the other sixth of a page's CPU: parameter events,
endpoint rules and serialisation run again for every page, and their result only differs in
the body. So `list_jobs(client, params)` goes through botocore for a client's first ListJobs,
and the handler keeps that request (URL, headers, signing region and name) as the client's
*prepared* request if it can vouch for rebuilding it: the JSON protocol, whose body is
botocore's `json.dumps` of the parameters, checked against the body botocore built. Later
pages of any account on that client reuse it: the body is serialised the same way, then
signed, sent and parsed as above, and a non-2xx answer raises the exception class botocore
raises (`client.exceptions.from_code`) with botocore's parse of the error. Parameters are ours
(MaxResults and the NextToken the service gave), so botocore's validation has nothing to
catch; other protocols (CBOR) and clients that never passed the check stay on the hook.

AssumeRole is prepared the same way (`assume_role(sts_client, params, hub)`): a
`before-call.sts.AssumeRole` handler only learns from the first request botocore builds and
sends (the query protocol's form body, checked against botocore's parameters); later calls
sign it with the hub session's own credentials, send it, and read the Credentials element
of a 200 with ElementTree. Anything else (an error status, a document without the four
Credentials fields) goes through botocore's query parser, and errors raise botocore's
exception classes, as for ListJobs.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import re
import ssl
import urllib.request
import weakref
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
from aiobotocore.session import AioSession
from botocore.awsrequest import AWSResponse
from botocore.httpsession import get_cert_path
from botocore.utils import normalize_url_path
from yarl import URL

from . import wire
from .credentials import bound_frozen_credentials
from .errors import remember_secrets
from .fetch import departing
from .records import Page
from .sigv4 import sign

__all__ = ["DirectSender"]

HANDLER_ID = "snowball-aggregator.direct.list-jobs"
STS_HANDLER_ID = "snowball-aggregator.direct.assume-role"
_SIGV4 = frozenset({"v4", "sigv4"})
_STS = "{https://sts.amazonaws.com/doc/2011-06-15/}"
_CREDENTIALS = tuple(
    _STS + name for name in ("AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration")
)
_DECLARED_ENCODING = re.compile(rb"<\?xml[^>]*?encoding\s*=\s*[\"']([^\"']*)[\"']")

# (client, params) of a call going through botocore, for the handler to learn from; one per
# operation (an AssumeRole can run inside a ListJobs call, when its credentials refresh).
_learning: contextvars.ContextVar[tuple[Any, dict[str, Any]] | None] = contextvars.ContextVar(
    "snowball_aggregator_direct_learning", default=None
)
_learning_sts: contextvars.ContextVar[tuple[Any, dict[str, Any]] | None] = contextvars.ContextVar(
    "snowball_aggregator_direct_learning_sts", default=None
)


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A client's ListJobs request as botocore built it; only the body varies per call."""

    model: Any
    url: URL
    host: str
    path: str
    scheme: str
    hostname: str
    headers: dict[str, str]
    region: str
    service: str
    no_retries: bool


def _json_body(params: dict[str, Any]) -> bytes:
    """The body botocore's JSON serializer makes of `params` (`json.dumps`, UTF-8): built
    from json's own C string encoder for the flat str/int parameters a page has (half the
    cost of `json.dumps`, whose encoder is set up anew on every call)."""
    parts = []
    for key, value in params.items():
        kind = type(value)
        if type(key) is not str or (kind is not str and kind is not int):
            return json.dumps(params).encode("utf-8")
        encoded = _json_str(value) if kind is str else int.__repr__(value)
        parts.append(f"{_json_str(key)}: {encoded}")
    return ("{" + ", ".join(parts) + "}").encode("utf-8")


_json_str = json.encoder.encode_basestring_ascii  # what json.dumps writes strings with


def _query_params(model: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The form fields botocore's query serializer makes of a call with scalar `params`."""
    return {"Action": model.name, "Version": model.metadata["apiVersion"], **params}


def _form_body(fields: dict[str, Any]) -> bytes:
    """The form body botocore's request preparer encodes `fields` into."""
    pairs = [(k.encode(), v.encode() if isinstance(v, str) else v) for k, v in fields.items()]
    return urlencode(pairs, doseq=True).encode("ascii")


def _assumed_credentials(body: bytes) -> dict[str, Any] | None:
    """`{"Credentials": {...}}` of an AssumeRole document, as botocore parses those four
    fields; None for anything else (botocore's parser then reads the document).

    Also None where botocore could read the document otherwise: its parser ignores namespaces
    and always decodes UTF-8, and makes a list of a repeated element. So an element of another
    namespace, a repeated `AssumeRoleResult`, `Credentials` or field, and a declared encoding
    other than UTF-8 are botocore's to read.
    """
    declared = _DECLARED_ENCODING.search(body, 0, 256)
    if declared is not None and declared.group(1).lower() not in (b"utf-8", b"utf8"):
        return None
    try:
        root = ElementTree.fromstring(body)
    except ElementTree.ParseError:
        return None
    if root.tag != f"{_STS}AssumeRoleResponse" or not all(
        element.tag.startswith(_STS) for element in root.iter()
    ):
        return None
    results = root.findall(f"{_STS}AssumeRoleResult")
    nodes = results[0].findall(f"{_STS}Credentials") if len(results) == 1 else []
    if len(nodes) != 1:
        return None
    values = []
    for tag in _CREDENTIALS:
        found = nodes[0].findall(tag)
        if len(found) != 1 or not found[0].text:
            return None
        values.append(found[0].text)
    access_key, secret_key, token, expiration = values
    return {
        "Credentials": {
            "AccessKeyId": access_key,
            "SecretAccessKey": secret_key,
            "SessionToken": token,
            "Expiration": wire.parse_timestamp_fast(expiration),
        }
    }


async def _departed(*_: Any) -> None:
    """aiohttp's `on_request_headers_sent` (see `DirectSender._session`); a no-op outside a
    ListJobs (an AssumeRole that renews credentials inside one is stamped, then the ListJobs
    itself when it leaves)."""
    departing()


class DirectSender:
    """The aiohttp session and the `before-call` handler of the direct path.

    Keyword options: `timeout` (seconds to connect and between reads, like the clients'),
    `limit` (connections open at once). An async context manager: closing it closes the
    connections. `install(session)` registers the handler on an aiobotocore session before
    any client is made from it.
    """

    def __init__(self, *, timeout: float, limit: int = 100) -> None:
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        self._limit = limit
        self._http: aiohttp.ClientSession | None = None
        self._lock = asyncio.Lock()
        self._ca_bundle: str | None = None
        self._open = False
        self._prepared: weakref.WeakKeyDictionary[Any, _Prepared] = weakref.WeakKeyDictionary()
        self.requests = 0
        self.prepared_requests = 0
        self.fallbacks = 0

    async def __aenter__(self) -> DirectSender:
        self._open = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._open = False
        http, self._http = self._http, None
        if http is not None:
            await http.close()

    def install(self, session: AioSession) -> None:
        """Answer ListJobs of clients made from `session` (and sessions sharing its
        emitter) on the direct path."""
        self._ca_bundle = session.get_config_variable("ca_bundle")
        session.register("before-call.snowball.ListJobs", self._before_call, unique_id=HANDLER_ID)
        session.register("before-call.sts.AssumeRole", self._learn_sts, unique_id=STS_HANDLER_ID)

    async def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            async with self._lock:
                if self._http is None:
                    if not self._open:
                        raise RuntimeError("DirectSender is not open")
                    cafile = self._ca_bundle or get_cert_path(True)
                    context = ssl.create_default_context(cafile=cafile)
                    # A ListJobs is counted by its partition's pacer from when its headers
                    # are on the wire: after the connection (and TLS) was made, which a
                    # request on a new connection waits for and one on a pooled one does not.
                    sent = aiohttp.TraceConfig()
                    sent.on_request_headers_sent.append(_departed)
                    self._http = aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=self._limit, ssl=context),
                        timeout=self._timeout,
                        cookie_jar=aiohttp.DummyCookieJar(),
                        skip_auto_headers={"Content-Type"},
                        trace_configs=[sent],
                    )
        return self._http

    async def _before_call(
        self,
        model: Any,
        params: dict[str, Any],
        request_signer: Any,
        context: dict[str, Any],
        **_: Any,
    ) -> tuple[AWSResponse, dict[str, Any]] | None:
        if (
            (context.get("auth_type") or request_signer.signature_version) not in _SIGV4
            or params.get("method") != "POST"
            or params.get("query_string")
            or type(params.get("body")) is not bytes
        ):
            self.fallbacks += 1
            return None
        credentials = await bound_frozen_credentials()
        if credentials is None:
            self.fallbacks += 1
            return None
        prepared = self._prepare(model, params, request_signer, context)
        learning = _learning.get()
        if learning is not None and model.service_model.resolved_protocol == "json":
            client, sent = learning
            if _json_body(sent) == params["body"] and client not in self._prepared:
                self._prepared[client] = prepared
        status, response_headers, raw = await self._send(prepared, params["body"], credentials)
        parsed = await self._parse(prepared, status, response_headers, raw)
        return AWSResponse(params["url"], status, response_headers, None), parsed

    @staticmethod
    def _prepare(
        model: Any, params: dict[str, Any], request_signer: Any, context: dict[str, Any]
    ) -> _Prepared:
        """The request botocore built, less its body, with its signing scope."""
        signing = context.get("signing") or {}
        url: str = params["url"]
        split = urlsplit(url)
        return _Prepared(
            model=model,
            # As botocore builds, sends (as written: aiobotocore's `encoded=True`) and signs it
            # (the path normalised: dot segments and empty segments resolved, as AWS does).
            url=URL(url, encoded=True),
            host=split.netloc,
            path=normalize_url_path(split.path),
            scheme=split.scheme,
            hostname=split.hostname or "",
            headers=dict(params["headers"]),
            region=signing.get("region") or request_signer.region_name,
            service=signing.get("signing_name") or request_signer.signing_name,
            no_retries=_no_retries(context),
        )

    def _learn_sts(
        self,
        model: Any,
        params: dict[str, Any],
        request_signer: Any,
        context: dict[str, Any],
        **_: Any,
    ) -> None:
        """Keep the AssumeRole request botocore built (and sends: returns None) as the STS
        client's prepared request, if our form body of the call's parameters is botocore's."""
        learning = _learning_sts.get()
        if learning is None or learning[0] in self._prepared:
            return
        client, sent = learning
        body = params.get("body")
        if (
            (context.get("auth_type") or request_signer.signature_version) not in _SIGV4
            or params.get("method") != "POST"
            or params.get("query_string")
            or type(body) is not dict
            or list(body.items()) != list(_query_params(model, sent).items())
        ):
            return
        self._prepared[client] = self._prepare(model, params, request_signer, context)

    async def assume_role(self, client: Any, params: dict[str, Any], hub: Any) -> dict[str, Any]:
        """`client.assume_role(**params)` (an STS client made from session `hub`), from its
        prepared request once there is one (see the module docstring): `Credentials` as
        botocore parses them; raises what botocore raises."""
        prepared = self._prepared.get(client)
        if prepared is not None:
            keys = await hub.get_credentials()
            credentials = await keys.get_frozen_credentials() if keys is not None else None
            if credentials is not None:
                remember_secrets(credentials.token)  # as botocore's send path notes it
                self.prepared_requests += 1
                body = _form_body(_query_params(prepared.model, params))
                status, headers, raw = await self._send(prepared, body, credentials)
                if status == 200:
                    result = _assumed_credentials(raw)
                    if result is not None:
                        return result
                parsed = await self._parse(prepared, status, headers, raw)
                if status >= 300:
                    code = parsed.get("Error", {}).get("Code")
                    raise client.exceptions.from_code(code)(parsed, prepared.model.name)
                return parsed
        token = _learning_sts.set((client, params))
        try:
            response: dict[str, Any] = await client.assume_role(**params)
        finally:
            _learning_sts.reset(token)
        return response

    async def list_jobs(self, client: Any, params: dict[str, Any], account_id: str) -> Page | None:
        """The page of `client.list_jobs(**params)` for `account_id` (None for a 200 without
        `JobListEntries`), from the client's prepared request once there is one (see the
        module docstring); raises what botocore raises."""
        prepared = self._prepared.get(client)
        if prepared is not None:
            credentials = await bound_frozen_credentials()
            if credentials is not None:
                self.prepared_requests += 1
                status, headers, raw = await self._send(prepared, _json_body(params), credentials)
                if status == 200:
                    page = wire.list_jobs_page(prepared.model, raw, account_id)
                    if page is not None:
                        return page
                parsed = await self._parse(prepared, status, headers, raw)
                if status >= 300:
                    code = parsed.get("Error", {}).get("Code")
                    raise client.exceptions.from_code(code)(parsed, prepared.model.name)
                return Page.from_response(account_id, parsed)
        token = _learning.set((client, params))
        try:
            response = await client.list_jobs(**params)
        finally:
            _learning.reset(token)
        return Page.from_response(account_id, response)

    async def _send(
        self, prepared: _Prepared, body: bytes, credentials: Any
    ) -> tuple[int, dict[str, str], bytes]:
        """Sign and send one request: (status, response headers, body)."""
        headers = sign(
            method="POST",
            host=prepared.host,
            path=prepared.path,
            headers=prepared.headers,
            body=body,
            access_key=credentials.access_key,
            secret_key=credentials.secret_key,
            token=credentials.token,
            region=prepared.region,
            service=prepared.service,
            now=datetime.now(UTC),
        )
        http = await self._session()
        self.requests += 1
        proxy = _proxy_for(prepared.scheme, prepared.hostname)
        # Never follow a redirect (botocore's send does not either): the 3xx is answered as
        # botocore answers it, and the signed headers (session token included) go to no
        # other host.
        async with http.post(
            prepared.url, data=body, headers=headers, proxy=proxy, allow_redirects=False
        ) as response:
            raw = await response.read()
            status = response.status
            response_headers = {k.lower(): v for k, v in response.headers.items()}
        return status, response_headers, raw

    @staticmethod
    async def _parse(
        prepared: _Prepared, status: int, headers: dict[str, str], raw: bytes
    ) -> dict[str, Any]:
        """The response as botocore's parser returns it, with botocore's ResponseMetadata."""
        model = prepared.model
        parsed = None
        if status == 200:
            parsed = wire.parse_success(model, raw)
        if parsed is None:
            parsed = await _botocore_parse(model, status, headers, raw)
        metadata = parsed.setdefault("ResponseMetadata", {})
        metadata.setdefault("RequestId", headers.get("x-amzn-requestid", ""))
        metadata["HTTPStatusCode"] = status
        metadata["HTTPHeaders"] = headers
        metadata["RetryAttempts"] = 0
        if prepared.no_retries:
            # What botocore's retry handler notes when a client has no retries (errors read
            # "... (reached max retries: 0): ...", as without the direct path).
            metadata["MaxAttemptsReached"] = True
        return parsed


def _no_retries(context: dict[str, Any]) -> bool:
    retries = getattr(context.get("client_config"), "retries", None) or {}
    return bool(retries.get("total_max_attempts") == 1)


@functools.cache
def _proxy_for(scheme: str, host: str) -> str | None:
    """The proxy of `HTTPS_PROXY`/`HTTP_PROXY` for a host that `NO_PROXY` does not exempt,
    read once per (scheme, host): aiohttp's own `trust_env` reads them, and `.netrc`, in a
    thread on every request."""
    proxy = urllib.request.getproxies_environment().get(scheme)
    if proxy is None or urllib.request.proxy_bypass_environment(host):  # type: ignore[attr-defined]
        return None
    return proxy


async def _botocore_parse(
    model: Any, status: int, headers: dict[str, str], body: bytes
) -> dict[str, Any]:
    """What botocore's parser for the service's protocol makes of the response."""
    protocol = model.service_model.resolved_protocol
    parser = wire.parser_for(protocol)
    response = {
        "status_code": status,
        "headers": headers,
        "body": body if status == 200 else wire.error_body(protocol, body),
        "context": {"operation_name": model.name},
    }
    parsed: dict[str, Any] = await parser.parse(response, model.output_shape)
    return parsed
