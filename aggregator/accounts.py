"""Accounts: the set of member accounts to inventory, each with the role we assume in it.

Sources, merged in this order (a later source never overrides an earlier one for the same id):
`[[accounts.list]]` entries (their own role ARN and external id), `accounts.ids` (role ARN built
from `role_name` and the partition), and Organizations discovery (`[accounts.organizations]`).
`accounts.exclude` removes ids from every source; `organizations.include`, when not empty, keeps
only those discovered ids (explicit ids and list entries still apply).

Discovery runs from the hub principal, which must be in the organization's management account
or a delegated administrator account. Without `ou_ids` it pages through
organizations:ListAccounts; with them it walks each root or OU recursively
(ListOrganizationalUnitsForParent for the children, ListAccountsForParent for the accounts).
Only ACTIVE accounts are kept: suspended, closing, closed and not yet activated accounts cannot
be entered. The client is created the ordinary way from the hub session, so
`AWS_ENDPOINT_URL_ORGANIZATIONS`, `AWS_ENDPOINT_URL` and a profile's `services` section apply.
Every page gets `limits.max_attempts` attempts (throttling and server errors are retried with
full-jitter backoff); a rejected NextToken restarts the listing. Whatever still fails becomes one
`DiscoveryError` whose message says what to check.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import structlog

from .config import AccountsSettings
from .errors import (
    AggregatorError,
    AwsError,
    InvalidNextTokenError,
    RetryableError,
    ThrottledError,
    TransientError,
    translate,
)
from .retry import RetryPolicy

__all__ = [
    "Account",
    "DiscoveryError",
    "discover_accounts",
    "merge_accounts",
    "resolve_accounts",
    "role_arn",
    "static_accounts",
]

log = structlog.get_logger()

# Organizations is a global service with one endpoint per partition, signed for this region.
ORGANIZATIONS_REGION = {
    "aws": "us-east-1",
    "aws-cn": "cn-northwest-1",
    "aws-us-gov": "us-gov-west-1",
}
_PAGE_SIZE = 20  # the API's maximum for all three operations
_HUB = "hub"  # the account field of errors raised for the hub principal's own calls


class DiscoveryError(AggregatorError):
    """Organizations discovery failed; `str()` is one line: the operation, the AWS error code,
    the service's message and what to check. `code` and `operation` are kept as attributes."""

    def __init__(self, *, operation: str, code: str, detail: str = "", hint: str = "") -> None:
        self.operation = operation
        self.code = code
        self.detail = " ".join(detail.split())[:300]
        text = f"Organizations discovery failed: {operation}: {code}"
        if self.detail:
            text += f": {self.detail}"
        if hint:
            text += f" ({hint})"
        super().__init__(text)


@dataclass(frozen=True, slots=True)
class Account:
    """A member account and how to get into it."""

    account_id: str
    role_arn: str
    external_id: str | None = None
    partition: str = "aws"


def role_arn(account_id: str, role_name: str, partition: str = "aws") -> str:
    """`arn:<partition>:iam::<account_id>:role/<role_name>`."""
    return f"arn:{partition}:iam::{account_id}:role/{role_name}"


def _partition_of(arn: str) -> str:
    return arn.split(":", 2)[1]


def static_accounts(settings: AccountsSettings) -> tuple[Account, ...]:
    """The accounts named in the configuration, excluded ids removed, sorted by id."""
    excluded = set(settings.exclude)
    default_external = settings.external_id or None
    found: dict[str, Account] = {}
    for entry in settings.list:
        if entry.id in excluded or entry.id in found:
            continue
        arn = entry.role_arn or role_arn(entry.id, settings.role_name, settings.partition)
        found[entry.id] = Account(
            account_id=entry.id,
            role_arn=arn,
            external_id=entry.external_id if entry.external_id is not None else default_external,
            partition=_partition_of(arn),
        )
    for account_id in settings.ids:
        if account_id in excluded or account_id in found:
            continue
        found[account_id] = Account(
            account_id=account_id,
            role_arn=role_arn(account_id, settings.role_name, settings.partition),
            external_id=default_external,
            partition=settings.partition,
        )
    return tuple(sorted(found.values(), key=lambda a: a.account_id))


def merge_accounts(
    explicit: Iterable[Account], discovered: Iterable[Account]
) -> tuple[Account, ...]:
    """The union by account id, sorted; an explicit account wins over a discovered one."""
    found = {a.account_id: a for a in discovered}
    found.update((a.account_id, a) for a in explicit)
    return tuple(sorted(found.values(), key=lambda a: a.account_id))


def _is_active(entry: dict[str, Any]) -> bool:
    # `State` (ACTIVE, PENDING_ACTIVATION, SUSPENDED, PENDING_CLOSURE, CLOSED) replaces the
    # deprecated `Status`; older endpoints and SDK models send only `Status`.
    state = entry.get("State") or entry.get("Status")
    return state == "ACTIVE"


def _hint(code: str, parent: str | None, partition: str) -> str:
    if code in {"AccessDenied", "AccessDeniedException"}:
        return (
            "the hub must be the management account or a delegated administrator, allowed "
            "organizations:ListAccounts, ListAccountsForParent and ListOrganizationalUnitsForParent"
        )
    if code == "AWSOrganizationsNotInUseException":
        return "the hub account is not a member of an organization"
    if code in {"ParentNotFoundException", "TargetNotFoundException"} and parent:
        return f"accounts.organizations.ou_ids: {parent} is not a root or OU of this organization"
    if code == "ProfileNotFound":
        return f"[partitions.{partition}] profile names a profile the AWS config does not have"
    if code in {"NoCredentials", "UnrecognizedClientException", "InvalidClientTokenId"}:
        return (
            f"no valid hub credentials for partition {partition}: set [partitions.{partition}] "
            "profile or the standard AWS credential variables"
        )
    if code == "InvalidNextToken":
        return "the listing kept changing while it was read"
    return ""


class _TokenRejected(Exception):
    """The service rejected a NextToken: the listing must start again."""


class _Lister:
    """Paginated Organizations calls with retries; one per discovery."""

    def __init__(
        self,
        client: Any,
        partition: str,
        policy: RetryPolicy,
        sleep: Callable[[float], Awaitable[None]],
        rng: random.Random,
        requests: collections.Counter[tuple[str, str]] | None,
        retried: collections.Counter[str] | None,
    ) -> None:
        self._client = client
        self._partition = partition
        self._policy = policy
        self._sleep = sleep
        self._rng = rng
        self._requests = requests
        self._retried = retried

    def _fail(self, err: AwsError, parent: str | None, hint: str = "") -> DiscoveryError:
        return DiscoveryError(
            operation=err.operation,
            code=err.code,
            detail=err.detail,
            hint=hint or _hint(err.code, parent, self._partition),
        )

    async def _call(
        self, operation: str, key: str, parent: str | None, **params: Any
    ) -> dict[str, Any]:
        """One page of `operation`, tried again (within the policy) after a retryable error
        or an answer without its `key` list."""
        method = getattr(self._client, _snake(operation))
        region = str(getattr(getattr(self._client, "meta", None), "region_name", ""))
        for attempt in range(1, self._policy.max_attempts + 1):
            cause: BaseException | None = None
            try:
                response: dict[str, Any] = await method(**params)
            except Exception as exc:
                cause = exc
                err = translate(exc, account_id=_HUB, region=region, operation=operation)
                if "NextToken" in params and (
                    isinstance(err, InvalidNextTokenError) or _token_rejected(exc)
                ):
                    self._count(operation, err.code)
                    raise _TokenRejected from exc
            else:
                if isinstance(response.get(key), list):
                    self._count(operation, "ok")
                    return response
                # botocore reads a 200 body it cannot parse (torn, empty) as a result without
                # the list, which every page of these operations carries: were it taken as an
                # empty last page, the accounts after it would drop out of the run unnoticed.
                err = TransientError(
                    account_id=_HUB,
                    region=region,
                    operation=operation,
                    code="MalformedResponse",
                    detail=f"response without {key}",
                )
            self._count(operation, err.code)
            if isinstance(err, ThrottledError) and self._retried is not None:
                self._retried["throttles"] += 1
            if not isinstance(err, RetryableError):
                raise self._fail(err, parent) from cause
            if attempt == self._policy.max_attempts:
                raise self._fail(err, parent, f"gave up after {attempt} attempts") from cause
            if self._retried is not None:
                self._retried["retries"] += 1
            await self._sleep(self._policy.backoff(attempt, self._rng))
        raise AssertionError("unreachable")  # pragma: no cover - the loop always returns/raises

    def _count(self, operation: str, outcome: str) -> None:
        if self._requests is not None:
            self._requests[operation, outcome] += 1

    async def pages(
        self, operation: str, key: str, parent: str | None = None, **params: Any
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Every page's `key` list; after a rejected NextToken the listing starts over (at
        most `max_restarts` times), and pages already yielded are yielded again (callers
        key their results by id, so repeats are harmless)."""
        for restart in range(self._policy.max_restarts + 1):
            token: str | None = None
            seen: set[str] = set()
            try:
                while True:
                    extra = {"NextToken": token} if token else {}
                    page = await self._call(
                        operation, key, parent, MaxResults=_PAGE_SIZE, **params, **extra
                    )
                    yield list(page[key])
                    token = page.get("NextToken")
                    if not token:
                        return
                    if token in seen:  # the service is stuck on a page: start over
                        raise _TokenRejected
                    seen.add(token)
            except _TokenRejected:
                log.warning("discovery.restarted", operation=operation, restart=restart + 1)
        raise DiscoveryError(
            operation=operation,
            code="InvalidNextToken",
            detail=f"NextToken rejected {self._policy.max_restarts + 1} times",
            hint=_hint("InvalidNextToken", parent, self._partition),
        )


def _snake(operation: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in operation).lstrip("_")


def _token_rejected(exc: BaseException) -> bool:
    """Organizations says "bad NextToken" as InvalidInputException with Reason
    INVALID_NEXT_TOKEN, which `translate` does not single out."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    code = str(response.get("Error", {}).get("Code") or "")
    if code in {"InvalidNextTokenException", "InvalidNextToken"}:
        return True
    return code == "InvalidInputException" and response.get("Reason") == "INVALID_NEXT_TOKEN"


async def _walk(lister: _Lister, roots: Iterable[str]) -> AsyncIterator[list[dict[str, Any]]]:
    """Account pages under each of `roots` and all their descendants, each parent once."""
    queue = collections.deque(dict.fromkeys(roots))
    seen = set(queue)
    while queue:
        parent = queue.popleft()
        async for page in lister.pages(
            "ListAccountsForParent", "Accounts", parent, ParentId=parent
        ):
            yield page
        async for page in lister.pages(
            "ListOrganizationalUnitsForParent", "OrganizationalUnits", parent, ParentId=parent
        ):
            for ou in page:
                child = str(ou["Id"])
                if child not in seen:
                    seen.add(child)
                    queue.append(child)


async def discover_accounts(
    source: Any,
    settings: AccountsSettings,
    *,
    partition: str | None = None,
    policy: RetryPolicy | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
    request_timeout: float = 30.0,
    http_session_cls: Any = None,
    requests: collections.Counter[tuple[str, str]] | None = None,
    retried: collections.Counter[str] | None = None,
) -> tuple[Account, ...]:
    """The ACTIVE accounts of the organization, `include`/`exclude` applied, sorted by id.

    `source` is the hub's aiobotocore session (an `organizations` client is created from it in
    the partition's Organizations region, with botocore retries off) or a ready client. Keyword
    options: `partition` (default `settings.partition`: the partition of the role ARNs built
    from `role_name`), `policy=RetryPolicy()` (attempts per page, backoff, restarts after a
    rejected NextToken), `sleep=asyncio.sleep`, `rng=random.Random()`, `request_timeout=30.0` s
    per request, `http_session_cls=None` (the shared pool's class, see transport.py), `requests`
    (a Counter incremented once per HTTP request, by operation name) and `retried` (a Counter
    of the requests tried again, `retries`, and of the throttling answers, `throttles`).

    Raises `DiscoveryError` (one line, with what to check) when a call still fails.
    """
    partition = partition or settings.partition
    policy = policy or RetryPolicy()
    rng = rng or random.Random()
    if hasattr(source, "create_client"):
        from .credentials import client_config  # credentials imports this module

        region = ORGANIZATIONS_REGION.get(partition, "us-east-1")
        async with contextlib.AsyncExitStack() as stack:
            try:
                client = await stack.enter_async_context(
                    source.create_client(
                        "organizations",
                        region_name=region,
                        config=client_config(
                            timeout=request_timeout, http_session_cls=http_session_cls
                        ),
                    )
                )
            except Exception as exc:  # a profile that does not exist, no region...
                err = translate(exc, account_id=_HUB, region=region, operation="ListAccounts")
                raise DiscoveryError(
                    operation="ListAccounts",
                    code=err.code,
                    detail=err.detail,
                    hint=_hint(err.code, None, partition),
                ) from exc
            return await _discover(
                client, settings, partition, policy, sleep, rng, requests, retried
            )
    return await _discover(source, settings, partition, policy, sleep, rng, requests, retried)


async def _discover(
    client: Any,
    settings: AccountsSettings,
    partition: str,
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[None]],
    rng: random.Random,
    requests: collections.Counter[tuple[str, str]] | None,
    retried: collections.Counter[str] | None,
) -> tuple[Account, ...]:
    org = settings.organizations
    lister = _Lister(client, partition, policy, sleep, rng, requests, retried)
    pages = _walk(lister, org.ou_ids) if org.ou_ids else lister.pages("ListAccounts", "Accounts")
    excluded = frozenset(settings.exclude)
    included = frozenset(org.include)
    external_id = settings.external_id or None
    found: dict[str, Account] = {}
    listed = inactive = 0
    async for page in pages:
        for entry in page:
            account_id = str(entry["Id"])
            listed += 1
            if not _is_active(entry):
                inactive += 1
                continue
            if account_id in excluded or (included and account_id not in included):
                continue
            found[account_id] = Account(
                account_id=account_id,
                role_arn=role_arn(account_id, settings.role_name, partition),
                external_id=external_id,
                partition=partition,
            )
    log.info(
        "discovery.done",
        partition=partition,
        listed=listed,
        inactive=inactive,
        accounts=len(found),
        ou_ids=len(org.ou_ids),
    )
    if not found:
        log.warning("discovery.no_accounts", partition=partition, listed=listed, inactive=inactive)
    return tuple(sorted(found.values(), key=lambda a: a.account_id))


async def resolve_accounts(
    settings: AccountsSettings, hub: Any = None, **options: Any
) -> tuple[Account, ...]:
    """Every account to inventory: `static_accounts`, plus Organizations discovery from `hub`
    (a session or client, see `discover_accounts`, which gets `options`) when enabled.

    Explicit entries win over discovered ones for the same id.
    """
    explicit = static_accounts(settings)
    if not settings.organizations.enabled:
        return explicit
    if hub is None:
        raise ValueError("Organizations discovery is enabled but no hub session was given")
    accounts = merge_accounts(explicit, await discover_accounts(hub, settings, **options))
    if not accounts:
        # An empty inventory published as complete would make every job look gone.
        org = settings.organizations
        raise DiscoveryError(
            operation="ListAccountsForParent" if org.ou_ids else "ListAccounts",
            code="NoAccounts",
            detail="discovery kept no ACTIVE account and none is configured explicitly",
            hint="check accounts.organizations.include, ou_ids and accounts.exclude",
        )
    return accounts
