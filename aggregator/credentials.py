"""Credentials: one AssumeRole per member account, shared by all its regions, refreshed early.

`CredentialBroker` owns the hub session (standard AWS chain: env, profile, SSO, instance or IRSA
role) and its STS clients. `session_for(account)` returns an aiobotocore session for the member
account whose credentials are aiobotocore refreshable credentials backed by AssumeRole: botocore
refreshes them itself 15 minutes before they expire, so a long run never uses dead keys. The
first AssumeRole of an account is made eagerly so that a denied role is reported as an AssumeRole
failure of that account, once, and not as N confusing ListJobs failures.

Credentials live only inside botocore objects; nothing here logs or formats them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import platform
import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from types import TracebackType
from typing import Any

import aiobotocore
import botocore
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.credentials import (
    AioCredentialResolver,
    AioCredentials,
    AioRefreshableCredentials,
)
from aiobotocore.session import AioSession
from botocore.credentials import CredentialProvider, ReadOnlyCredentials
from botocore.exceptions import NoCredentialsError

from .accounts import Account
from .config import data_loader
from .errors import (
    AwsError,
    RetryableError,
    ThrottledError,
    TransientError,
    remember_secrets,
    translate,
    unsent,
    watch_signed_tokens,
)
from .gate import Gate
from .retry import RetryPolicy

__all__ = [
    "CredentialBroker",
    "bound_credentials",
    "bound_frozen_credentials",
    "client_config",
    "last_signed_credentials",
]

log = structlog.get_logger()

# STS endpoint region per partition (regional endpoints; the hub's own region is preferred).
_STS_REGION = {"aws": "us-east-1", "aws-cn": "cn-north-1", "aws-us-gov": "us-gov-west-1"}


def _user_agent() -> str:
    try:
        ours = version("snowball-aggregator")
    except PackageNotFoundError:  # running from a source tree that was not installed
        ours = "0+unknown"
    return (
        f"snowball-aggregator/{ours} aiobotocore/{aiobotocore.__version__} "
        f"botocore/{botocore.__version__} Python/{platform.python_version()}"
    )


# A fixed User-Agent (botocore's documented `Config(user_agent=...)`): botocore otherwise
# rebuilds its default one (features, config, platform...) on every request, about a sixth of
# the CPU of a ListJobs call.
USER_AGENT = _user_agent()


def client_config(
    *, timeout: float, http_session_cls: Any = None, fixed_user_agent: bool = False
) -> AioConfig:
    """The botocore config of every client: no botocore retries (we own the budget), the
    shared connection pool when one is given (see transport.py), and with `fixed_user_agent`
    our fixed User-Agent instead of botocore's per-request one."""
    extra: dict[str, Any] = {}
    if http_session_cls is not None:
        extra["http_session_cls"] = http_session_cls
    if fixed_user_agent:
        extra["user_agent"] = USER_AGENT
    else:
        extra["user_agent_extra"] = "snowball-aggregator"
    return AioConfig(
        retries={"total_max_attempts": 1, "mode": "standard"},
        connect_timeout=timeout,
        read_timeout=timeout,
        **extra,
    )


Current = Callable[[], AioRefreshableCredentials]
# (sts client, AssumeRole parameters, the hub session the client was made from) -> response
AssumeRole = Callable[[Any, dict[str, Any], AioSession], Awaitable[dict[str, Any]]]
_bound: contextvars.ContextVar[Current | None] = contextvars.ContextVar(
    "snowball_aggregator_bound_credentials", default=None
)
_signed: contextvars.ContextVar[AioRefreshableCredentials | None] = contextvars.ContextVar(
    "snowball_aggregator_signed_credentials", default=None
)


class bound_credentials:
    """`with bound_credentials(current):` requests that this task makes meanwhile through a
    client of the shared member session are signed with `current()` (asked at signing time,
    so a renewal made by another task while this one waited for its turn is used). A class
    rather than a generator: one is entered per request."""

    __slots__ = ("_current", "_token")

    def __init__(self, current: Current) -> None:
        self._current = current
        self._token: contextvars.Token[Current | None] | None = None

    def __enter__(self) -> None:
        self._token = _bound.set(self._current)

    def __exit__(self, *exc: object) -> None:
        if self._token is not None:
            _bound.reset(self._token)
            self._token = None


def last_signed_credentials() -> AioRefreshableCredentials | None:
    """The account credentials that this task's last request was signed with."""
    return _signed.get()


async def bound_frozen_credentials() -> ReadOnlyCredentials | None:
    """The frozen account credentials bound to the calling task (refreshed first if they are
    about to expire); None when nothing is bound."""
    current = _bound.get()
    if current is None:
        return None
    credentials = current()
    _signed.set(credentials)
    frozen: ReadOnlyCredentials = await credentials.get_frozen_credentials()
    return frozen


class _BoundCredentials(AioCredentials):  # type: ignore[misc]
    """The credentials of the shared member session (see `CredentialBroker.member_session`).

    botocore's signer asks its credentials object for frozen credentials on every request;
    this one answers with the account credentials bound to the calling task, so one client per
    (partition, region) serves every account. A request made with nothing bound fails with
    botocore's NoCredentialsError rather than being signed as someone else.
    """

    def __init__(self) -> None:
        super().__init__("", "", None, method="assume-role")

    async def get_frozen_credentials(self) -> ReadOnlyCredentials:
        frozen = await bound_frozen_credentials()
        if frozen is None:
            raise NoCredentialsError()
        return frozen


# botocore refreshes assumed credentials from 15 minutes before they expire; we leave its
# check out until a minute before that, and re-run it at least once a minute regardless.
_REFRESH_LEAD = 16 * 60.0
_RECHECK = 60.0


class _AssumedCredentials(AioRefreshableCredentials):  # type: ignore[misc]
    """AssumeRole credentials whose expiry check is cheap while they are far from expiring.

    botocore checks the expiry on every request, reading the clock in the local time zone
    through dateutil (a fifth of the CPU of the direct send path). While the credentials are
    more than 16 minutes from expiry, the last frozen copy is handed out for up to a minute
    without that check; nearer to expiry every call goes through botocore's refresh logic.
    """

    _expires_at = 0.0  # monotonic seconds
    _checked_at = -_RECHECK
    _frozen: ReadOnlyCredentials | None = None

    def expires_in(self, seconds: float) -> None:
        """Record that the newest assumed keys expire `seconds` from now."""
        self._expires_at = time.monotonic() + seconds
        self._frozen = None

    async def get_frozen_credentials(self) -> ReadOnlyCredentials:
        now = time.monotonic()
        frozen = self._frozen
        if (
            frozen is not None
            and now - self._checked_at < _RECHECK
            and now < self._expires_at - _REFRESH_LEAD
        ):
            return frozen
        frozen = await super().get_frozen_credentials()
        self._frozen, self._checked_at = frozen, now
        return frozen


class _StaticProvider(CredentialProvider):  # type: ignore[misc]
    """Hands a ready credentials object to an aiobotocore session's resolver."""

    METHOD = "assume-role"
    CANONICAL_NAME = None

    def __init__(self, credentials: AioCredentials) -> None:
        super().__init__()
        self._credentials = credentials

    async def load(self) -> AioCredentials:
        return self._credentials


def _complete_credentials(response: Any) -> dict[str, Any] | None:
    """The `Credentials` of an AssumeRole answer if they are usable: the three keys as text
    and an aware `Expiration`; None otherwise."""
    creds = response.get("Credentials") if isinstance(response, dict) else None
    if not isinstance(creds, dict):
        return None
    keys = ("AccessKeyId", "SecretAccessKey", "SessionToken")
    expiration = creds.get("Expiration")
    if not all(isinstance(creds.get(k), str) and creds[k] for k in keys):
        return None
    if not isinstance(expiration, datetime) or expiration.tzinfo is None:
        return None
    return creds


class CredentialBroker:
    """Per-account AssumeRole sessions for one run (or one daemon lifetime).

    Keyword options: `session_name="snowball-aggregator"` (RoleSessionName, visible in the
    member account's CloudTrail), `duration_seconds=3600`, `timeout=30.0` s per STS call,
    `policy=RetryPolicy()`, `gate=None` (the run's Gate, shared with ListJobs so STS calls
    count against the global concurrency cap), `sleep=asyncio.sleep`, `rng=random.Random()`,
    `hub_session=None` (a fresh AioSession from the standard chain), `http_session_cls=None`
    (aiobotocore's default, or the shared pool's class from transport.py), `session_hooks=None`
    (the optimised mode: called with each new account session, and with the hub sessions the
    broker makes itself, before any client is made from them, see wire.py; the STS clients
    then also send the fixed User-Agent),
    `hub_profiles=None` (partition -> AWS profile of that partition's hub, from
    `[partitions.<name>] profile`; partitions not named use `hub_session`), `assume_role=None`
    (what makes the AssumeRole call instead of `sts.assume_role(**params)`: the direct path's
    prepared request, `DirectSender.assume_role`).
    """

    def __init__(
        self,
        *,
        session_name: str = "snowball-aggregator",
        duration_seconds: int = 3600,
        timeout: float = 30.0,
        policy: RetryPolicy | None = None,
        gate: Gate | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        hub_session: AioSession | None = None,
        http_session_cls: Any = None,
        session_hooks: Callable[[AioSession], None] | None = None,
        hub_profiles: Mapping[str, str] | None = None,
        assume_role: AssumeRole | None = None,
    ) -> None:
        self._hub_profiles = dict(hub_profiles or {})
        self._hubs: dict[str, AioSession] = {}
        self._http_session_cls = http_session_cls
        self._session_hooks = session_hooks
        self._assume_role = assume_role
        self._session_name = session_name
        self._duration = duration_seconds
        self._timeout = timeout
        self._policy = policy or RetryPolicy()
        self._gate = gate or Gate(1_000_000)
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._hub = hub_session
        self._template: AioSession | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._sts: dict[str, Any] = {}
        self._sts_lock = asyncio.Lock()
        self._sessions: dict[str, asyncio.Task[AioSession]] = {}
        self._credentials: dict[str, asyncio.Task[AioRefreshableCredentials]] = {}
        self._member: AioSession | None = None
        self.assume_role_calls = 0
        self.retried: collections.Counter[str] = collections.Counter()  # retries, throttles
        self._refused: dict[str, AwsError] = {}  # renewals refused this cycle, by account
        self._unrecognized: set[str] = set()  # accounts whose keys were refused this cycle
        self.outcomes: collections.Counter[str] = collections.Counter()

    async def __aenter__(self) -> CredentialBroker:
        if self._stack is not None:
            raise RuntimeError("CredentialBroker is already open")
        self._stack = contextlib.AsyncExitStack()
        if self._hub is None:
            self._hub = AioSession()
            self._hub.register_component("data_loader", data_loader(self._hub))
            if self._session_hooks is not None:
                self._session_hooks(self._hub)  # STS's parser gets the fast timestamps
        watch_signed_tokens(self._hub)  # its session token, if it has one, is masked too
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        for task in [*self._sessions.values(), *self._credentials.values()]:
            task.cancel()
        self._sessions.clear()
        self._credentials.clear()
        self._member = None
        self._sts.clear()
        self._hubs.clear()
        if stack is not None:
            await asyncio.shield(stack.aclose())

    @property
    def hub_session(self) -> AioSession:
        if self._hub is None:
            raise RuntimeError("CredentialBroker is not open")
        return self._hub

    def hub_session_for(self, partition: str) -> AioSession:
        """The hub session of an AWS partition: one for its `hub_profiles` profile when it has
        one (aws-cn and aws-us-gov are separate worlds with their own credentials), else
        `hub_session`."""
        profile = self._hub_profiles.get(partition)
        if not profile:
            return self.hub_session
        hub = self._hubs.get(partition)
        if hub is None:
            hub = self._hubs[partition] = AioSession(profile=profile)
            hub.register_component("data_loader", self.hub_session.get_component("data_loader"))
            watch_signed_tokens(hub)
            if self._session_hooks is not None:
                self._session_hooks(hub)
        return hub

    async def _sts_client(self, partition: str) -> Any:
        async with self._sts_lock:
            client = self._sts.get(partition)
            if client is None:
                if self._stack is None:
                    raise RuntimeError("CredentialBroker is not open")
                hub = self.hub_session_for(partition)
                region = hub.get_config_variable("region")
                if region is None or not _region_in_partition(region, partition):
                    region = _STS_REGION.get(partition, "us-east-1")
                client = await self._stack.enter_async_context(
                    hub.create_client(
                        "sts",
                        region_name=region,
                        config=client_config(
                            timeout=self._timeout,
                            http_session_cls=self._http_session_cls,
                            fixed_user_agent=self._session_hooks is not None,
                        ),
                    )
                )
                self._sts[partition] = client
            return client

    async def _assume(self, account: Account) -> tuple[dict[str, Any], float]:
        """One AssumeRole with retries; returns botocore refresh metadata and the seconds
        until the keys expire."""
        try:
            sts = await self._sts_client(account.partition)
        except Exception as exc:  # a hub profile that does not exist, a bad STS endpoint...
            region = _STS_REGION.get(account.partition, "us-east-1")
            err = translate(
                exc, account_id=account.account_id, region=region, operation="AssumeRole"
            )
            if not unsent(exc):
                self.outcomes[err.code] += 1
            raise err from exc
        kwargs: dict[str, Any] = {
            "RoleArn": account.role_arn,
            "RoleSessionName": self._session_name,
            "DurationSeconds": self._duration,
        }
        if account.external_id:
            kwargs["ExternalId"] = account.external_id
        region = sts.meta.region_name
        for attempt in range(1, self._policy.max_attempts + 1):
            try:
                # A renewal that botocore starts while signing a ListJobs that holds a slot
                # goes in that slot: waiting for another one could deadlock (gate.py).
                async with self._gate.slot():
                    self.assume_role_calls += 1
                    if self._assume_role is not None:
                        hub = self.hub_session_for(account.partition)
                        response = await self._assume_role(sts, kwargs, hub)
                    else:
                        response = await sts.assume_role(**kwargs)
                creds = _complete_credentials(response)
                if creds is None:  # a 200 that botocore parsed but that holds no usable keys
                    raise TransientError(
                        account_id=account.account_id,
                        region=region,
                        operation="AssumeRole",
                        code="MalformedResponse",
                        detail="the answer holds no complete Credentials",
                    )
                self.outcomes["ok"] += 1
                break
            except Exception as exc:
                err = translate(
                    exc, account_id=account.account_id, region=region, operation="AssumeRole"
                )
                if unsent(exc):  # refused before it was signed: no request to count
                    self.assume_role_calls -= 1
                else:
                    self.outcomes[err.code] += 1
                if isinstance(err, ThrottledError):
                    self.retried["throttles"] += 1
                if not isinstance(err, RetryableError) or attempt == self._policy.max_attempts:
                    raise err from exc
                self.retried["retries"] += 1
                await self._sleep(self._policy.backoff(attempt, self._rng))
        assert creds is not None  # the loop breaks only with complete credentials
        log.debug("credentials.assumed", account_id=account.account_id)
        # Masked wherever an error message quotes them, in whatever words (errors.redact)
        remember_secrets(creds["SecretAccessKey"], creds["SessionToken"])
        expiration: datetime = creds["Expiration"]
        metadata = {
            "access_key": creds["AccessKeyId"],
            "secret_key": creds["SecretAccessKey"],
            "token": creds["SessionToken"],
            "expiry_time": expiration.isoformat(),
        }
        return metadata, (expiration - datetime.now(UTC)).total_seconds()

    async def _open_credentials(self, account: Account) -> AioRefreshableCredentials:
        made: list[_AssumedCredentials] = []

        async def refresh() -> dict[str, Any]:
            # botocore renews while it signs a request, once per request in the last minutes
            # of the keys: a renewal refused for good (AccessDenied: the trust policy changed)
            # is not asked again this cycle, by any partition of the account.
            refused = self._refused.get(account.account_id)
            if refused is not None:  # (its traceback dropped: it would grow with each raise)
                raise refused.with_traceback(None)
            try:
                metadata, expires_in = await self._assume(account)
            except AwsError as err:
                if not isinstance(err, RetryableError):
                    self._refused[account.account_id] = err
                raise
            for credentials in made:
                credentials.expires_in(expires_in)
            return metadata

        metadata, expires_in = await self._assume(account)
        credentials: _AssumedCredentials = _AssumedCredentials.create_from_metadata(
            metadata=metadata, refresh_using=refresh, method="assume-role"
        )
        credentials.expires_in(expires_in)
        made.append(credentials)
        return credentials

    async def _open_session(self, account: Account) -> AioSession:
        return self._new_session(await self._open_credentials(account))

    def _new_session(self, credentials: AioCredentials) -> AioSession:
        template = self._member_template()
        # Account sessions share the template's event emitter (its builtin handlers are
        # registered once, not once per account: that costs 9 ms and 130 KB per session) and
        # its model loader (each JSON model read once). Clients copy the emitter when created,
        # so nothing registered on one client reaches another.
        session = AioSession(
            event_hooks=template.get_component("event_emitter"), include_builtin_handlers=False
        )
        session.register_component("data_loader", template.get_component("data_loader"))
        session.register_component(
            "credential_provider", AioCredentialResolver(providers=[_StaticProvider(credentials)])
        )
        return session  # the session hooks ran once, on the template's shared emitter

    def _member_template(self) -> AioSession:
        """The session whose emitter and loader every account session shares."""
        if self._template is None:
            template = AioSession()
            template.register_component(
                "data_loader", self.hub_session.get_component("data_loader")
            )
            if self._session_hooks is not None:
                self._session_hooks(template)
            watch_signed_tokens(template)  # (botocore's send path; direct.py signs our keys)
            self._template = template
        return self._template

    async def session_for(self, account: Account) -> AioSession:
        """The account's session; the first call assumes the role, later calls share it.

        Raises the translated `AwsError` of AssumeRole (the same one for every caller).
        """
        task = self._sessions.get(account.account_id)
        if task is None:
            task = asyncio.ensure_future(self._open_session(account))
            self._sessions[account.account_id] = task
        return await asyncio.shield(task)

    @property
    def member_session(self) -> AioSession:
        """The one session that clients serving every account come from: it signs each
        request with the account credentials bound to the calling task (`bound_credentials`).
        """
        if self._member is None:
            self._member = self._new_session(_BoundCredentials())
        return self._member

    async def credentials_for(self, account: Account) -> AioRefreshableCredentials:
        """The account's refreshable credentials; the first call assumes the role, later calls
        share them.

        Raises the translated `AwsError` of AssumeRole (the same one for every caller).
        """
        task = self._credentials.get(account.account_id)
        if task is None:
            task = asyncio.ensure_future(self._open_credentials(account))
            self._credentials[account.account_id] = task
        return await asyncio.shield(task)

    def current_credentials(
        self, account: Account, fallback: AioRefreshableCredentials
    ) -> AioRefreshableCredentials:
        """The account's newest assumed credentials, or `fallback` while none is ready."""
        task = self._credentials.get(account.account_id)
        if task is not None and task.done() and not task.cancelled() and not task.exception():
            return task.result()
        return fallback

    def forget_credentials(
        self, account: Account, credentials: AioRefreshableCredentials | None
    ) -> None:
        """Drop the account's credentials if they are still `credentials` (the ones that just
        expired), so partitions that met the expiry together assume the role once."""
        task = self._credentials.get(account.account_id)
        if task is None or not task.done() or task.cancelled() or task.exception():
            return
        if credentials is None or task.result() is credentials:
            del self._credentials[account.account_id]

    def still_current(
        self, account: Account, credentials: AioRefreshableCredentials | None
    ) -> bool:
        """Whether `credentials` are still the account's (no renewal dropped them since)."""
        task = self._credentials.get(account.account_id)
        return (
            task is not None
            and task.done()
            and not task.cancelled()
            and task.exception() is None
            and task.result() is credentials
        )

    def first_unrecognized(self, account: Account) -> bool:
        """True the first time this cycle the service did not recognise the account's keys
        (they are renewed then, once: see fetch.py); False after that."""
        if account.account_id in self._unrecognized:
            return False
        self._unrecognized.add(account.account_id)
        return True

    def reset_failures(self) -> None:
        """Forget failed AssumeRoles, so a new cycle tries those accounts again."""
        _drop_failed(self._sessions)
        _drop_failed(self._credentials)
        self._refused.clear()
        self._unrecognized.clear()

    def keep_only(self, account_ids: Collection[str]) -> None:
        """Forget the sessions and credentials of every account not in `account_ids` (at the
        start of a cycle, the accounts it plans): a daemon whose organisation churns keeps
        only what it uses, and no expired keys of accounts long gone."""
        for tasks in (self._sessions, self._credentials):
            for account_id in [a for a in tasks if a not in account_ids]:
                tasks.pop(account_id).cancel()  # (a no-op on a finished task)

    def forget(self, account: Account, session: AioSession | None = None) -> None:
        """Drop the account's session so the next `session_for` assumes the role again.

        With `session`, drop it only if it is still the cached one (a concurrent caller may
        already have renewed it).
        """
        task = self._sessions.get(account.account_id)
        if task is None:
            return
        if session is not None and not (
            task.done()
            and not task.cancelled()
            and task.exception() is None
            and task.result() is session
        ):
            return
        del self._sessions[account.account_id]
        if not task.done():
            task.cancel()


def _drop_failed(tasks: dict[str, asyncio.Task[Any]]) -> None:
    for account_id, task in list(tasks.items()):
        if task.done() and (task.cancelled() or task.exception() is not None):
            del tasks[account_id]


def _region_in_partition(region: str, partition: str) -> bool:
    if partition == "aws-cn":
        return region.startswith("cn-")
    if partition == "aws-us-gov":
        return region.startswith("us-gov-")
    return not region.startswith(("cn-", "us-gov-"))
