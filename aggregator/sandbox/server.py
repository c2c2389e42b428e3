"""The fake AWS endpoint: one aiohttp server on loopback for STS, Organizations and Snowball.

Real, unmodified botocore clients talk to it with ``endpoint_url=sandbox.url``. Requests are
routed by what the protocols put on the wire: ``X-Amz-Target`` (JSON 1.1: Snowball and
Organizations), ``/service/<service>/operation/<op>`` (Smithy RPC v2 CBOR: Snowball) and
form-encoded ``Action=`` (STS query). The caller is the access key in the SigV4
``Authorization`` header: the hub's key is the hub principal, keys that AssumeRole issued map to
their account, any other key is refused. Every request's signature is verified against the
secret of its key (see sigv4.py) and a mismatch is refused as AWS refuses it; with
``verify_signatures=False`` nothing is verified and any unknown key is the hub principal.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import datetime as dt
import enum
import hashlib
import itertools
import random
import re
import secrets
import socket
import struct
import time
import types
import urllib.parse
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import orjson
from aiohttp import web

from .faults import FaultKind, Faults, TokenBucket
from .fleet import HUB_ACCOUNT_ID, Fleet, FleetSpec, JobList
from .protocols import (
    CBOR_CONTENT_TYPE,
    CBOR_PATH_PREFIX,
    JSON_CONTENT_TYPE,
    ORGANIZATIONS_TARGET_PREFIX,
    SNOWBALL_TARGET_PREFIX,
    XML_CONTENT_TYPE,
    ApiError,
    assume_role_xml,
    caller_identity_xml,
    cbor_error,
    decode_cbor_params,
    decode_json_params,
    json_error,
    list_accounts_json,
    list_jobs_cbor,
    list_jobs_json,
    sts_error,
)
from .sigv4 import (
    ALGORITHM,
    Authorization,
    SigningKeys,
    canonical_request,
    parse_authorization,
    remove_dot_segments,
    request_timestamp,
    sign,
    signatures_match,
    string_to_sign,
)
from .tokens import PageToken, TokenSigner

__all__ = ["Sandbox", "Stats"]

Key = tuple[str, str]
"""(account_id, region)."""

_DEFAULT_PAGE = 100
_MAX_PAGE = 100
_ORG_DEFAULT_PAGE = 20
_ORG_MAX_PAGE = 20
_ORG_LIST_KEY = "organizations"
_INVALID_TOKEN = "The security token included in the request is invalid."
_EXPIRED_TOKEN = "The security token included in the request is expired"
_REGION = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_SIGNATURE_MISMATCH = (
    "The request signature we calculated does not match the signature you provided. Check your "
    "AWS Secret Access Key and signing method. Consult the service documentation for details."
)


class _Wire(enum.Enum):
    JSON = "json"
    CBOR = "cbor"


@dataclass(frozen=True, slots=True)
class _Principal:
    account_id: str
    arn: str
    user_id: str
    is_hub: bool


@dataclass(frozen=True, slots=True)
class _Issued:
    principal: _Principal
    secret_access_key: str
    session_token: str
    issued_at: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Stats:
    """What the sandbox saw since it started (or since ``reset_stats``).

    Keys of the per-partition maps are (account_id, region) of the caller's credential scope.
      requests: requests per operation, e.g. ``snowball:ListJobs``, ``sts:AssumeRole``.
      list_jobs_requests: ListJobs requests per (account, region).
      peak_in_flight: most requests in progress at once, all operations.
      peak_in_flight_by_region: most ListJobs requests in progress at once per key.
      max_requests_per_second: most ListJobs requests that arrived in any sliding
        1-second window (sandbox clock) per key, throttled ones included.
      throttled: ThrottlingException answers.
      faults: injected faults by kind (``500``, ``503``, ``reset``, ``hang``, ``truncated``,
        ``malformed``, ``throttle``, ``churn``, ``deny_list_jobs``, ``disabled_region``,
        ``deny_assume_role``, ``credential_expired``, ``token_expired``, ``sts_500``,
        ``sts_reset``).
      errors: error answers by error code.
      snowball_protocols: Snowball requests by wire protocol (``json``, ``cbor``).
      signature_mismatch: requests refused because their SigV4 signature did not check out
        (``InvalidSignatureException`` / ``SignatureDoesNotMatch``: wrong signature, tampered
        body or signed header, credential scope of another date, region or service).
      cpu_seconds: ``time.process_time()`` of the serving process when taken.
    """

    requests: Mapping[str, int]
    list_jobs_requests: Mapping[Key, int]
    peak_in_flight: int
    peak_in_flight_by_region: Mapping[Key, int]
    max_requests_per_second: Mapping[Key, int]
    throttled: int
    faults: Mapping[str, int]
    errors: Mapping[str, int]
    snowball_protocols: Mapping[str, int]
    signature_mismatch: int
    cpu_seconds: float

    @property
    def total_requests(self) -> int:
        """Every AWS request, all operations together."""
        return sum(self.requests.values())

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict; (account, region) keys become ``"account/region"``."""

        def keyed(values: Mapping[Key, int]) -> dict[str, int]:
            return {f"{account}/{region}": n for (account, region), n in sorted(values.items())}

        return {
            "requests": dict(sorted(self.requests.items())),
            "total_requests": self.total_requests,
            "list_jobs_requests": keyed(self.list_jobs_requests),
            "peak_in_flight": self.peak_in_flight,
            "peak_in_flight_by_region": keyed(self.peak_in_flight_by_region),
            "max_requests_per_second": keyed(self.max_requests_per_second),
            "throttled": self.throttled,
            "faults": dict(sorted(self.faults.items())),
            "errors": dict(sorted(self.errors.items())),
            "snowball_protocols": dict(sorted(self.snowball_protocols.items())),
            "signature_mismatch": self.signature_mismatch,
            "cpu_seconds": self.cpu_seconds,
        }


def _first(form: Mapping[str, list[str]], name: str) -> str | None:
    values = form.get(name)
    return values[0] if values else None


def _key_chars(n: int) -> str:
    """``n`` characters of AWS-key-like random text (A-Z, 2-7)."""
    return base64.b32encode(secrets.token_bytes((n * 5 + 7) // 8)).decode()[:n]


class Sandbox:
    """A fake AWS endpoint on loopback, an async context manager with one owner.

    Options (all keyword-only):
      fleet: the seeded world (default ``FleetSpec()``: 25 accounts, every snowball region).
      faults: failures to inject (default ``Faults()``: none); replace at runtime through the
        ``faults`` property.
      host: address to listen on (default ``127.0.0.1``).
      port: TCP port (default 0: a free port, see ``url``).
      clock: seconds, for token TTL, credential expiry, throttling and rate windows (default
        ``time.monotonic``); inject one so tests never sleep.
      verify_signatures: check every request's SigV4 signature against the secret of its
        access key and refuse unknown keys, as AWS does (default True). False is the old
        trusting mode: the access key alone says who calls, unknown keys are the hub, nothing
        is verified. The signed date is never compared with the clock (no skew check).

    The world (``truth``, ``add_job``...) can be used before the server starts. A sandbox is
    entered once; entering it again is an error.
    """

    hub_account_id = HUB_ACCOUNT_ID

    def __init__(
        self,
        *,
        fleet: FleetSpec | None = None,
        faults: Faults | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
        verify_signatures: bool = True,
    ) -> None:
        spec = fleet if fleet is not None else FleetSpec()
        self._fleet = Fleet(spec)
        self._faults = faults if faults is not None else Faults()
        self._host = host
        self._port = port
        self._clock = clock
        self._verify = verify_signatures
        self._signing_keys = SigningKeys()
        self._signer = TokenSigner()
        self._rng = random.Random(f"{spec.seed}:faults")
        self._credentials: dict[str, _Issued] = {}
        self._issued_secrets: list[str] = []
        partition = spec.partition
        self.hub_access_key_id = "AKIASANDBOXHUB000000"
        self.hub_secret_access_key = "sandbox/hub/secret/access/key/0000000000"
        self._hub = _Principal(
            HUB_ACCOUNT_ID,
            f"arn:{partition}:iam::{HUB_ACCOUNT_ID}:user/sandbox-hub",
            "AIDASANDBOXHUB000000",
            is_hub=True,
        )
        self._instance = secrets.randbits(48)
        self._request_ids = itertools.count(1)
        self._closing = asyncio.Event()
        self._runner: web.ServerRunner | None = None
        self._entered = False
        self._url: str | None = None
        self._in_flight = 0
        self._key_in_flight: dict[Key, int] = collections.defaultdict(int)
        self._windows: dict[Key, collections.deque[float]] = {}
        self._buckets: dict[Key, TokenBucket] = {}
        self.reset_stats()

    # --- public surface -------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        if self._url is None:
            raise RuntimeError("the sandbox is not running")
        return self._url

    @property
    def faults(self) -> Faults:
        """The faults in force; assign a new ``Faults`` to change them on a live sandbox."""
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        if not isinstance(faults, Faults):
            raise TypeError(f"faults must be a Faults, not {type(faults).__name__}")
        self._faults = faults

    @property
    def fleet(self) -> FleetSpec:
        """The fleet's spec."""
        return self._fleet.spec

    @property
    def account_ids(self) -> tuple[str, ...]:
        """Every account of the fleet, active and suspended."""
        return self._fleet.account_ids

    @property
    def active_account_ids(self) -> tuple[str, ...]:
        """The fleet's ACTIVE accounts (those Organizations lists as ACTIVE)."""
        return tuple(a for a in self._fleet.account_ids if a not in self._fleet.suspended)

    @property
    def regions(self) -> tuple[str, ...]:
        """The fleet's regions."""
        return self._fleet.regions

    def env(self) -> dict[str, str]:
        """Environment variables that point any AWS SDK at this sandbox as the hub."""
        region = "us-east-1" if self._fleet.spec.partition == "aws" else self._fleet.regions[0]
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.hub_access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.hub_secret_access_key,
            "AWS_DEFAULT_REGION": region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def truth(self, *, accounts: Collection[str] | None = None) -> list[dict[str, object]]:
        """The expected deduplicated inventory, sorted by (account_id, job_id).

        Each record has account_id, job_id, job_state, job_type, snowball_type, is_master,
        creation_date (ISO 8601 UTC, milliseconds), description (None if absent),
        home_region and regions (every region whose ListJobs returns the job, disabled
        regions excluded). Suspended accounts are left out; ``accounts`` narrows the result.
        """
        return self._fleet.truth(disabled_regions=self._faults.disabled_regions, accounts=accounts)

    def stats(self) -> Stats:
        """A snapshot of the request statistics."""
        return Stats(
            requests=dict(self._requests),
            list_jobs_requests=dict(self._list_jobs_requests),
            peak_in_flight=self._peak_in_flight,
            peak_in_flight_by_region=dict(self._key_peak),
            max_requests_per_second=dict(self._max_rate),
            throttled=self._throttled,
            faults=dict(self._fault_counts),
            errors=dict(self._errors),
            snowball_protocols=dict(self._protocols),
            signature_mismatch=self._signature_mismatch,
            cpu_seconds=time.process_time(),
        )

    def issued_secrets(self) -> tuple[str, ...]:
        """Every secret this sandbox handed out: the hub's secret key, and the secret keys and
        session tokens AssumeRole issued (for tests that prove none of them leaks)."""
        return (self.hub_secret_access_key, *self._issued_secrets)

    def reset_stats(self) -> None:
        """Start counting afresh (requests still in flight keep counting as in flight)."""
        self._requests: collections.Counter[str] = collections.Counter()
        self._list_jobs_requests: collections.Counter[Key] = collections.Counter()
        self._peak_in_flight = self._in_flight
        self._key_peak: dict[Key, int] = {k: n for k, n in self._key_in_flight.items() if n}
        self._max_rate: dict[Key, int] = {}
        self._windows.clear()
        self._throttled = 0
        self._fault_counts: collections.Counter[str] = collections.Counter()
        self._errors: collections.Counter[str] = collections.Counter()
        self._protocols: collections.Counter[str] = collections.Counter()
        self._signature_mismatch = 0

    def add_job(
        self,
        account_id: str,
        region: str,
        *,
        job_id: str | None = None,
        job_state: str = "New",
        job_type: str = "IMPORT",
        snowball_type: str = "EDGE",
        is_master: bool = False,
        creation_date: dt.datetime | None = None,
        description: str | None = None,
    ) -> str:
        """Add a job whose home is ``region`` (default creation date: now); returns its id."""
        return self._fleet.add_job(
            account_id,
            region,
            job_id=job_id,
            job_state=job_state,
            job_type=job_type,
            snowball_type=snowball_type,
            is_master=is_master,
            creation_date=creation_date,
            description=description,
            rng=self._rng,
        )

    def revoke_credentials(self) -> None:
        """Forget every key AssumeRole issued, as an endpoint restarted (or keys revoked) does:
        requests signed with them answer `UnrecognizedClientException` (STS:
        `InvalidClientTokenId`) from now on; new AssumeRoles issue keys that work."""
        self._credentials.clear()

    def set_job_state(self, account_id: str, job_id: str, state: str) -> None:
        """Change a job's JobState (any string: unknown states are allowed)."""
        self._fleet.set_job_state(account_id, job_id, state)

    def remove_job(self, account_id: str, job_id: str) -> None:
        """Delete a job."""
        self._fleet.remove_job(account_id, job_id)

    # --- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Sandbox:
        if self._entered:
            raise RuntimeError("a Sandbox can be entered only once")
        self._entered = True
        server = web.Server(self._handle, access_log=None)
        # Handlers that hang or add latency wake up on close, so shutdown is quick.
        runner = web.ServerRunner(server, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        self._url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self._closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            await asyncio.shield(runner.cleanup())
        self._url = None

    # --- plumbing -------------------------------------------------------------------------

    def _request_id(self) -> str:
        n = next(self._request_ids)
        return f"{n & 0xFFFFFFFF:08x}-5a4d-4b0c-8{n >> 32 & 0xFFF:03x}-{self._instance:012x}"

    def _respond(
        self, status: int, body: bytes, content_type: str, request_id: str | None = None
    ) -> web.Response:
        headers = {
            "Content-Type": content_type,
            "x-amzn-RequestId": request_id or self._request_id(),
        }
        if content_type is CBOR_CONTENT_TYPE:
            headers["smithy-protocol"] = "rpc-v2-cbor"
        return web.Response(status=status, body=body, headers=headers)

    def _error(self, err: ApiError, wire: _Wire) -> web.Response:
        self._errors[err.code] += 1
        if wire is _Wire.CBOR:
            return self._respond(err.status, cbor_error(err.code, err.message), CBOR_CONTENT_TYPE)
        body = json_error(err.code, err.message, err.fields)
        return self._respond(err.status, body, JSON_CONTENT_TYPE)

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up when the sandbox closes."""
        if seconds <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()

    @staticmethod
    def _reset(request: web.BaseRequest) -> web.Response:
        """Abort the connection with a TCP RST; the returned response is never sent."""
        transport = request.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    linger = struct.pack("ii", 1, 0)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            transport.abort()
        return web.Response(status=500)

    @staticmethod
    def _close(request: web.BaseRequest) -> web.Response:
        """Close the connection without answering; the returned response is never sent."""
        transport = request.transport
        if transport is not None:
            transport.close()
        return web.Response(status=500)

    async def _truncated(
        self, request: web.BaseRequest, body: bytes, content_type: str
    ) -> web.StreamResponse:
        """A 200 promising more bytes than it sends, then a closed connection."""
        response = web.StreamResponse(
            status=200,
            headers={"Content-Type": content_type, "x-amzn-RequestId": self._request_id()},
        )
        response.content_length = len(body) + 64
        await response.prepare(request)
        await response.write(body)
        if request.transport is not None:
            request.transport.close()
        return response

    def _authenticate(
        self, request: web.BaseRequest, body: bytes, service: str
    ) -> tuple[_Principal, Authorization]:
        """Who signed ``request``, and its ``Authorization``; ApiError (AWS's) if refused."""
        sts = service == "sts"
        auth = parse_authorization(request.headers.get("Authorization"))
        if auth is None:
            code = "MissingAuthenticationToken" if sts else "MissingAuthenticationTokenException"
            raise ApiError(code, "Missing Authentication Token", 403)
        if auth.service != service:
            message = f"Credential should be scoped to correct service: '{service}'."
            raise self._bad_signature(sts, message, 403)
        token = request.headers.get("X-Amz-Security-Token")
        issued = self._credentials.get(auth.access_key_id)
        if issued is None:
            if self._verify and (auth.access_key_id != self.hub_access_key_id or token):
                code = "InvalidClientTokenId" if sts else "UnrecognizedClientException"
                raise ApiError(code, _INVALID_TOKEN, 403)
            principal, secret = self._hub, self.hub_secret_access_key
        else:
            if token != issued.session_token:
                code = "InvalidClientTokenId" if sts else "UnrecognizedClientException"
                raise ApiError(code, _INVALID_TOKEN, 403)
            principal, secret = issued.principal, issued.secret_access_key
        if self._verify:
            self._verify_signature(request, body, auth, secret, sts)
        if issued is not None:
            ttl = self._faults.credential_ttl
            if ttl is not None and self._clock() - issued.issued_at >= ttl:
                self._fault_counts["credential_expired"] += 1
                code = "ExpiredToken" if sts else "ExpiredTokenException"
                raise ApiError(code, _EXPIRED_TOKEN, 400)
        return principal, auth

    def _bad_signature(self, sts: bool, message: str, status: int | None = None) -> ApiError:
        """The refusal of a request whose signature does not check out, counted."""
        self._signature_mismatch += 1
        if sts:
            return ApiError("SignatureDoesNotMatch", message, status or 403)
        return ApiError("InvalidSignatureException", message, status or 400)

    def _verify_signature(
        self, request: web.BaseRequest, body: bytes, auth: Authorization, secret: str, sts: bool
    ) -> None:
        """Recompute the SigV4 signature of ``request`` from what was received; raise if it is
        not the one the client sent. Neither the secret nor the expected signature is ever part
        of the error."""
        headers = request.headers
        incomplete = "IncompleteSignature" if sts else "IncompleteSignatureException"
        if auth.algorithm != ALGORITHM:
            raise ApiError(incomplete, f"Unsupported AWS 'algorithm': '{auth.algorithm}'.")
        missing = [
            f"Authorization header requires '{name}' parameter."
            for name, value in (
                ("Signature", auth.signature),
                ("SignedHeaders", auth.signed_headers),
            )
            if not value
        ]
        timestamp = request_timestamp(headers.get("X-Amz-Date"), headers.get("Date"))
        if timestamp is None:
            missing.append(
                "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' "
                "header (ISO 8601 basic format for X-Amz-Date)."
            )
        if missing or timestamp is None:
            raise ApiError(incomplete, " ".join(missing))
        if auth.date != timestamp[:8]:
            raise self._bad_signature(
                sts,
                "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
                f"from HTTP: '{auth.date}' != '{timestamp[:8]}', from '{timestamp}'.",
            )
        # One endpoint serves every region, so any well-formed region is "this" region.
        if _REGION.fullmatch(auth.region) is None:
            raise self._bad_signature(sts, "Credential should be scoped to a valid region.")
        names = {name.lower() for name in auth.signed_headers}
        if "host" not in names:
            raise self._bad_signature(
                sts, "'Host' or ':authority' must be a 'SignedHeader' in the AWS Authorization."
            )
        body_hash = hashlib.sha256(body).hexdigest()
        # What the client signed; these services always sign the payload, so anything but the
        # body's hash (UNSIGNED-PAYLOAD included) is a body that is not the one signed.
        claimed = headers.get("X-Amz-Content-SHA256")
        payload_hash = body_hash if claimed is None else claimed
        path, _, query = request.raw_path.partition("?")
        canonical = canonical_request(
            method=request.method,
            raw_path=path,
            raw_query=query.partition("#")[0],
            signed_headers=names,
            header_values={name: headers.getall(name, ()) for name in names},
            payload_hash=payload_hash,
        )
        scope = f"{auth.date}/{auth.region}/{auth.service}/aws4_request"
        key = self._signing_keys.get(secret, auth.date, auth.region, auth.service)
        expected = sign(key, string_to_sign(timestamp, scope, canonical))
        if not signatures_match(expected, auth.signature) or payload_hash != body_hash:
            raise self._bad_signature(sts, _SIGNATURE_MISMATCH)

    # --- routing --------------------------------------------------------------------------

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = remove_dot_segments(request.path)  # routed as AWS routes: `/./` is `/`
        if request.method == "GET":
            return self._admin(request, path)
        if request.method != "POST":
            return web.Response(status=405, text=f"{request.method} is not allowed\n")
        self._in_flight += 1
        if self._in_flight > self._peak_in_flight:
            self._peak_in_flight = self._in_flight
        try:
            if path == "/":
                target = request.headers.get("X-Amz-Target")
                if target is None:
                    return await self._sts(request)
                if target.startswith(SNOWBALL_TARGET_PREFIX):
                    operation = target[len(SNOWBALL_TARGET_PREFIX) :]
                    return await self._snowball(request, operation, _Wire.JSON)
                if target.startswith(ORGANIZATIONS_TARGET_PREFIX):
                    operation = target[len(ORGANIZATIONS_TARGET_PREFIX) :]
                    return await self._organizations(request, operation)
                err = ApiError("UnknownOperationException", f"Unknown target {target}")
                return self._error(err, _Wire.JSON)
            if path.startswith(CBOR_PATH_PREFIX):
                operation = path[len(CBOR_PATH_PREFIX) :]
                return await self._snowball(request, operation, _Wire.CBOR)
            return web.Response(status=404, text=f"no route for POST {path}\n")
        finally:
            self._in_flight -= 1

    def _admin(self, request: web.BaseRequest, path: str) -> web.Response:
        """``GET /_sandbox/truth`` (JSON Lines; ``?account=ID`` repeatable) and ``/stats``."""
        if path == "/_sandbox/truth":
            accounts = request.query.getall("account", []) or None
            lines = b"".join(
                orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
                for record in self.truth(accounts=accounts)
            )
            return web.Response(body=lines, content_type="application/x-ndjson")
        if path == "/_sandbox/stats":
            body = orjson.dumps(self.stats().to_json())
            return web.Response(body=body, content_type="application/json")
        return web.Response(status=404, text=f"no route for GET {path}\n")

    # --- Snowball -------------------------------------------------------------------------

    async def _snowball(
        self, request: web.BaseRequest, operation: str, wire: _Wire
    ) -> web.StreamResponse:
        self._requests["snowball:" + operation] += 1
        self._protocols[wire.value] += 1
        body = await request.read()
        try:
            principal, auth = self._authenticate(request, body, "snowball")
            if operation != "ListJobs":
                raise ApiError("UnknownOperationException", f"{operation} is not supported")
        except ApiError as err:
            return self._error(err, wire)
        key = (principal.account_id, auth.region)
        in_flight = self._key_in_flight
        in_flight[key] += 1
        if in_flight[key] > self._key_peak.get(key, 0):
            self._key_peak[key] = in_flight[key]
        try:
            return await self._list_jobs(request, body, principal, key, wire)
        except ApiError as err:
            return self._error(err, wire)
        finally:
            in_flight[key] -= 1

    def _note_arrival(self, key: Key, now: float) -> None:
        self._list_jobs_requests[key] += 1
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = collections.deque()
        window.append(now)
        while window[0] <= now - 1.0:
            window.popleft()
        if len(window) > self._max_rate.get(key, 0):
            self._max_rate[key] = len(window)

    async def _list_jobs(
        self,
        request: web.BaseRequest,
        body: bytes,
        principal: _Principal,
        key: Key,
        wire: _Wire,
    ) -> web.StreamResponse:
        faults = self._faults
        now = self._clock()
        self._note_arrival(key, now)
        if faults.latency:
            await self._pause(faults.latency)
        account_id, region = key
        disabled = faults.disabled_regions.get(account_id)
        if disabled and region in disabled:
            self._fault_counts["disabled_region"] += 1
            raise ApiError("UnrecognizedClientException", _INVALID_TOKEN, 403)
        if account_id in faults.deny_list_jobs:
            self._fault_counts["deny_list_jobs"] += 1
            message = f"User: {principal.arn} is not authorized to perform: snowball:ListJobs"
            if faults.echo_tokens:
                echoed = request.headers.get("X-Amz-Security-Token", "")
                message += f" (denied for token '{echoed}'; secret {echoed[:40]})"
            raise ApiError("AccessDeniedException", message)

        params = decode_cbor_params(body) if wire is _Wire.CBOR else decode_json_params(body)
        limit = params.get("MaxResults")
        if limit is not None and (type(limit) is not int or not 0 <= limit <= _MAX_PAGE):
            raise ApiError(
                "ValidationException",
                f"1 validation error detected: Value '{limit}' at 'maxResults' failed to "
                f"satisfy constraint: Member must have value between 0 and {_MAX_PAGE}",
            )
        if not limit:  # absent or 0: the default page
            limit = _DEFAULT_PAGE
        next_token = params.get("NextToken")
        if next_token is not None and not isinstance(next_token, str):
            raise ApiError("ValidationException", "NextToken must be a string")

        if faults.throttle_rps is not None:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(now, faults.burst)
            if not bucket.take(now, faults.throttle_rps, faults.burst):
                self._throttled += 1
                self._fault_counts["throttle"] += 1
                raise ApiError("ThrottlingException", "Rate exceeded")

        fault = faults.draw(self._rng)
        if fault is not None:
            self._fault_counts[fault.value] += 1
            if fault is FaultKind.HTTP_500:
                raise ApiError(
                    "InternalFailure",
                    "The request processing has failed because of an unknown error.",
                    500,
                    sender=False,
                )
            if fault is FaultKind.HTTP_503:
                raise ApiError("ServiceUnavailable", "Service is unavailable.", 503, sender=False)
            if fault is FaultKind.GATEWAY:
                return web.Response(status=502, body=b"null", content_type="application/json")
            if fault is FaultKind.RESET:
                return self._reset(request)
            if fault is FaultKind.HANG:
                await self._pause(faults.hang_seconds)
                return self._close(request)

        job_list = self._fleet.job_list(account_id, region)
        offset = 0
        if next_token is not None:
            if (
                job_list is not None
                and faults.churn
                and job_list.churned < faults.churn_max
                and self._rng.random() < faults.churn
            ):
                self._fleet.churn(job_list, region, self._rng)
                self._fault_counts["churn"] += 1
            offset = self._page_offset(next_token, account_id, job_list, now, faults)

        token: str | None = None
        if wire is _Wire.CBOR:
            content_type = CBOR_CONTENT_TYPE
            if job_list is None:
                payload = list_jobs_cbor(b"", 0, None)
            else:
                entries, count = job_list.cbor_page(offset, limit)
                token = self._next_token(account_id, job_list, offset + count, now)
                payload = list_jobs_cbor(entries, count, token)
        else:
            content_type = JSON_CONTENT_TYPE
            if job_list is None:
                payload = list_jobs_json(b"", None)
            else:
                entries, count = job_list.json_page(offset, limit)
                token = self._next_token(account_id, job_list, offset + count, now)
                payload = list_jobs_json(entries, token)

        if next_token is not None and token is not None and account_id in faults.looping_tokens:
            self._fault_counts["looping_token"] += 1
            token = next_token
            payload = (
                list_jobs_cbor(entries, count, token)
                if wire is _Wire.CBOR
                else list_jobs_json(entries, token)
            )
        if fault is FaultKind.TRUNCATED:
            return await self._truncated(request, payload, content_type)
        if fault is FaultKind.MALFORMED:
            payload = payload[: len(payload) // 2]
        return self._respond(200, payload, content_type)

    def _next_token(
        self, account_id: str, job_list: JobList, offset: int, now: float
    ) -> str | None:
        if offset >= len(job_list):
            return None
        token = PageToken(account_id, job_list.key, offset, job_list.version, now)
        return self._signer.issue(token)

    def _page_offset(
        self,
        text: str,
        account_id: str,
        job_list: JobList | None,
        now: float,
        faults: Faults,
    ) -> int:
        token = self._signer.verify(text)
        if (
            token is None
            or token.account_id != account_id
            or job_list is None
            or token.list_key != job_list.key
        ):
            raise ApiError("InvalidNextTokenException", "The NextToken string is invalid.")
        if faults.token_ttl is not None and now - token.issued_at > faults.token_ttl:
            self._fault_counts["token_expired"] += 1
            raise ApiError("InvalidNextTokenException", "The NextToken has expired.")
        if token.version != job_list.version or token.offset > len(job_list):
            raise ApiError(
                "InvalidNextTokenException",
                "The job list changed since this NextToken was issued; start over.",
            )
        return token.offset

    # --- Organizations --------------------------------------------------------------------

    async def _organizations(self, request: web.BaseRequest, operation: str) -> web.Response:
        self._requests["organizations:" + operation] += 1
        body = await request.read()
        try:
            principal, _ = self._authenticate(request, body, "organizations")
            if operation != "ListAccounts":
                raise ApiError("UnknownOperationException", f"{operation} is not supported")
            if not principal.is_hub:
                raise ApiError(
                    "AccessDeniedException", "You don't have permissions to access this resource."
                )
            return self._list_accounts(decode_json_params(body), principal)
        except ApiError as err:
            return self._error(err, _Wire.JSON)

    def _list_accounts(self, params: Mapping[str, object], principal: _Principal) -> web.Response:
        limit = params.get("MaxResults")
        if limit is None:
            limit = _ORG_DEFAULT_PAGE
        elif type(limit) is not int or not 1 <= limit <= _ORG_MAX_PAGE:
            raise ApiError(
                "InvalidInputException",
                f"MaxResults must be between 1 and {_ORG_MAX_PAGE}.",
                fields={"Reason": "MAX_VALUE_EXCEEDED"},
            )
        now = self._clock()
        offset = 0
        text = params.get("NextToken")
        if text is not None:
            token = self._signer.verify(text) if isinstance(text, str) else None
            ttl = self._faults.token_ttl
            if (
                token is None
                or token.account_id != principal.account_id
                or token.list_key != _ORG_LIST_KEY
                or (ttl is not None and now - token.issued_at > ttl)
            ):
                raise ApiError(
                    "InvalidInputException",
                    "The NextToken is invalid.",
                    fields={"Reason": "INVALID_NEXT_TOKEN"},
                )
            offset = token.offset
        accounts = self._fleet.org_accounts
        page = accounts[offset : offset + limit]
        end = offset + len(page)
        next_token = None
        if end < len(accounts):
            next_token = self._signer.issue(
                PageToken(principal.account_id, _ORG_LIST_KEY, end, 0, now)
            )
        payload = list_accounts_json(b",".join(a.entry for a in page), next_token)
        if text is not None and self._fault_counts["torn_account_page"] < (
            self._faults.torn_account_pages
        ):
            self._fault_counts["torn_account_page"] += 1
            payload = payload[: len(payload) // 2]
        return self._respond(200, payload, JSON_CONTENT_TYPE)

    # --- STS ------------------------------------------------------------------------------

    async def _sts(self, request: web.BaseRequest) -> web.Response:
        body = await request.read()
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        action = _first(form, "Action") or ""
        self._requests["sts:" + action] += 1
        request_id = self._request_id()
        try:
            fault = self._faults.draw_sts(self._rng)
            if fault is FaultKind.RESET:
                self._fault_counts["sts_reset"] += 1
                return self._reset(request)
            if fault is FaultKind.HTTP_500:
                self._fault_counts["sts_500"] += 1
                raise ApiError("InternalFailure", "An internal error occurred.", 500, sender=False)
            principal, _ = self._authenticate(request, body, "sts")
            if action == "AssumeRole":
                payload = self._assume_role(principal, form, request_id)
            elif action == "GetCallerIdentity":
                payload = caller_identity_xml(
                    user_id=principal.user_id,
                    account=principal.account_id,
                    arn=principal.arn,
                    request_id=request_id,
                )
            else:
                raise ApiError(
                    "InvalidAction", f"Could not find operation {action} for version 2011-06-15"
                )
        except ApiError as err:
            self._errors[err.code] += 1
            payload = sts_error(err.code, err.message, request_id, sender=err.sender)
            return self._respond(err.status, payload, XML_CONTENT_TYPE, request_id)
        return self._respond(200, payload, XML_CONTENT_TYPE, request_id)

    def _assume_role(
        self, principal: _Principal, form: Mapping[str, list[str]], request_id: str
    ) -> bytes:
        spec = self._fleet.spec
        faults = self._faults
        role_arn = _first(form, "RoleArn")
        session_name = _first(form, "RoleSessionName")
        if not role_arn or not session_name:
            missing = "roleArn" if not role_arn else "roleSessionName"
            raise ApiError(
                "ValidationError",
                f"1 validation error detected: Value null at '{missing}' failed to satisfy "
                "constraint: Member must not be null",
            )
        if not 2 <= len(session_name) <= 64:
            raise ApiError("ValidationError", "RoleSessionName must be 2 to 64 characters long")
        duration_text = _first(form, "DurationSeconds")
        duration: int | None = None
        if duration_text is not None:
            try:
                duration = int(duration_text)
            except ValueError:
                duration = -1
            if not 900 <= duration <= 43200:
                raise ApiError(
                    "ValidationError",
                    f"1 validation error detected: Value '{duration_text}' at "
                    "'durationSeconds' failed to satisfy constraint: Member must have value "
                    "between 900 and 43200",
                )
        parts = role_arn.split(":", 5)
        if (
            len(parts) != 6
            or parts[0] != "arn"
            or parts[2] != "iam"
            or parts[3] != ""
            or len(parts[4]) != 12
            or not parts[4].isdigit()
            or not parts[5].startswith("role/")
            or len(parts[5]) <= len("role/")
        ):
            raise ApiError("ValidationError", f"{role_arn} is invalid")
        partition, account_id, role_name = parts[1], parts[4], parts[5].rsplit("/", 1)[-1]
        denied = ApiError(
            "AccessDenied",
            f"User: {principal.arn} is not authorized to perform: sts:AssumeRole on "
            f"resource: {role_arn}",
            403,
        )
        if (
            partition != spec.partition
            or not self._fleet.has_account(account_id)
            or account_id in self._fleet.suspended
            or (spec.role_name is not None and role_name != spec.role_name)
            or (spec.external_id is not None and _first(form, "ExternalId") != spec.external_id)
        ):
            raise denied
        if account_id in faults.deny_assume_role:
            self._fault_counts["deny_assume_role"] += 1
            raise denied

        access_key_id = "ASIA" + _key_chars(16)
        while access_key_id in self._credentials:
            access_key_id = "ASIA" + _key_chars(16)
        secret_access_key = base64.b64encode(secrets.token_bytes(30)).decode()
        session_token = "IQoJb3JpZ2luX2VjE" + base64.b64encode(secrets.token_bytes(300)).decode()
        role_id = "AROA" + _key_chars(17)
        arn = f"arn:{partition}:sts::{account_id}:assumed-role/{role_name}/{session_name}"
        assumed = _Principal(account_id, arn, f"{role_id}:{session_name}", is_hub=False)
        self._credentials[access_key_id] = _Issued(
            assumed, secret_access_key, session_token, self._clock()
        )
        self._issued_secrets.extend((secret_access_key, session_token))
        lifetime = faults.advertised_credential_ttl
        if duration is not None:
            lifetime = min(lifetime, duration)
        expiration = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=lifetime)
        document = assume_role_xml(
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            session_token=session_token,
            expiration=expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
            assumed_role_id=assumed.user_id,
            arn=arn,
            request_id=request_id,
        )
        if account_id in faults.assume_role_without_credentials:
            self._fault_counts["assume_role_without_credentials"] += 1
            start, end = document.index(b"    <Credentials>"), document.index(b"</Credentials>\n")
            document = document[:start] + document[end + len(b"</Credentials>\n") :]
        return document
