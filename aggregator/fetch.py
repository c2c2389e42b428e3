"""Fetch: paginate ListJobs for one partition to the end, with retries and token restarts.

One partition is one NextToken chain, fetched strictly in order. Each request first waits for
the partition's pacer (rate per account-region) and then for a slot of the global gate
(concurrency; a chain's later pages are served before first pages, see gate.py), so a paced
partition never holds a slot while it waits. Retryable errors (throttling, 5xx, resets,
timeouts, torn bodies) are retried up to `RetryPolicy.max_attempts` per page with full-jitter
backoff; a throttle also slows the pacer down. An InvalidNextToken
mid-chain restarts the partition from its first page (at most `max_restarts` times in each
region it tries) and discards the pages read so far, so a result is always one consistent pass
over the list; so does a NextToken the chain has already returned (a service stuck in a loop
would otherwise be paged until the deadline), which fails the attempt as `NextTokenLoop` once
the restarts are spent. Expired credentials are refreshed once per page and the same page is
asked again. `partition_deadline` bounds the whole partition, fallback regions included.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import structlog
from structlog.contextvars import bound_contextvars

from .errors import (
    UNRECOGNIZED_KEYS,
    AccessDeniedError,
    AwsError,
    CredentialsExpiredError,
    InvalidNextTokenError,
    RegionNotEnabledError,
    RetryableError,
    ThrottledError,
    TransientError,
    translate,
)
from .gate import Gate
from .plan import Partition
from .records import JobEntry, Page, iso_seconds
from .retry import RetryPolicy

__all__ = [
    "ClientSource",
    "FetchCounters",
    "Pacer",
    "PartitionResult",
    "departing",
    "fetch_partition",
    "install_departing",
]

log = structlog.get_logger()

PAGE_SIZE = 100
Status = Literal["ok", "failed", "skipped"]


class Pacer(Protocol):
    """Per-partition request pacing (see scheduler.AdaptiveThrottler)."""

    async def acquire(self) -> None: ...
    def sent(self) -> None: ...
    def on_throttle(self) -> None: ...
    def on_success(self) -> None: ...


# The pacer of the ListJobs request this task is making (set around `ClientSource.list_jobs`).
_departing: contextvars.ContextVar[Pacer | None] = contextvars.ContextVar("departing", default=None)
DEPARTING_HANDLER_ID = "snowball-aggregator-departing"


def departing(**_: Any) -> None:
    """A ListJobs request goes on the wire now (credentials resolved, signed): its partition's
    pacer counts it from this moment, not from before an AssumeRole or a client's creation
    that the request's first send waited for. Called as the direct sender's request headers
    are written (an aiohttp trace, direct.py), and registered as botocore's
    `before-send.snowball.ListJobs` handler (`install_departing`; it returns None, so botocore
    sends)."""
    pacer = _departing.get()
    if pacer is not None:
        pacer.sent()


def install_departing(session: Any) -> None:
    """Register `departing` on an aiobotocore session (every mode: pacing is no optimisation)."""
    session.register("before-send.snowball.ListJobs", departing, unique_id=DEPARTING_HANDLER_ID)


class ClientSource(Protocol):
    """Lends a Snowball client for (account, region) and calls ListJobs on it; `renew` after
    expired credentials; `renew_unrecognized` after keys the service did not recognise (True
    if asking again may help)."""

    def lease(
        self, partition: Partition, region: str
    ) -> contextlib.AbstractAsyncContextManager[Any]: ...
    async def list_jobs(
        self, client: Any, params: dict[str, Any], account_id: str
    ) -> Page | None: ...
    async def renew(self, partition: Partition, client: Any) -> None: ...
    async def renew_unrecognized(self, partition: Partition, client: Any) -> bool: ...


@dataclass(slots=True)
class FetchCounters:
    """Mutable tallies of one partition's work (folded into the frozen result)."""

    requests: int = 0
    pages: int = 0
    retries: int = 0
    throttles: int = 0
    restarts: int = 0
    refreshes: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    cut_short: bool = False  # a request in flight was cancelled (no answer to count)


@dataclass(frozen=True, slots=True)
class PartitionResult:
    """The outcome of one partition: its entries when `status == "ok"`, else the error."""

    partition: Partition
    status: Status
    region: str
    entries: tuple[JobEntry, ...]
    observed_at: str
    duration: float
    requests: int
    pages: int
    retries: int
    throttles: int
    restarts: int
    error_code: str | None = None
    error_message: str | None = None
    operation: str | None = None
    errors: tuple[tuple[str, int], ...] = ()
    """Failed requests by error code, e.g. `(("ThrottlingException", 3),)`."""


async def fetch_partition(
    partition: Partition,
    *,
    clients: ClientSource,
    pacer: Pacer,
    gate: Gate,
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> PartitionResult:
    """Fetch every page of `partition`, trying its fallback regions in order if it fails.

    Never raises `AwsError`: failures become a `failed` (or `skipped`, for a region the account
    has not enabled) result, so one partition cannot stop the others.
    """
    rng = rng or random.Random()
    counters = FetchCounters()
    started = monotonic()
    regions = (partition.region, *partition.fallbacks)
    error: AwsError | None = None
    deadline = policy.partition_deadline
    ends_at = None if deadline is None else asyncio.get_running_loop().time() + deadline
    for region in regions:
        with bound_contextvars(account_id=partition.account_id, region=region):
            try:
                async with asyncio.timeout_at(ends_at):
                    entries = await _paginate(
                        partition, region, clients, pacer, gate, policy, sleep, rng, counters
                    )
            except AwsError as exc:
                error = exc
                log.info("partition.attempt_failed", code=exc.code, operation=exc.operation)
                continue
            except TimeoutError:
                error = TransientError(
                    account_id=partition.account_id,
                    region=region,
                    operation="ListJobs",
                    code="PartitionDeadlineExceeded",
                    detail=f"partition took longer than {policy.partition_deadline} s",
                )
                if counters.cut_short:  # the request it cut off had no answer: not an "ok"
                    counters.errors[error.code] = counters.errors.get(error.code, 0) + 1
                break  # no time left for a fallback: the failure is this region's
            except Exception as exc:  # one partition never stops the others
                # Anything no layer below translated (a bug, a failure nobody foresaw) fails
                # this partition only; its jobs are carried forward as stale.
                error = translate(
                    exc, account_id=partition.account_id, region=region, operation="ListJobs"
                )
                log.warning(
                    "partition.attempt_failed",
                    code=error.code,
                    operation=error.operation,
                    error_type=type(exc).__name__,
                )
                continue
        return PartitionResult(
            partition=partition,
            status="ok",
            region=region,
            entries=tuple(entries),
            observed_at=iso_seconds(now()),
            duration=monotonic() - started,
            requests=counters.requests,
            pages=counters.pages,
            retries=counters.retries,
            throttles=counters.throttles,
            restarts=counters.restarts,
            errors=tuple(sorted(counters.errors.items())),
        )
    assert error is not None
    status: Status = "skipped" if isinstance(error, RegionNotEnabledError) else "failed"
    return PartitionResult(
        partition=partition,
        status=status,
        region=region,  # the last region asked (an AssumeRole error names STS's)
        entries=(),
        observed_at=iso_seconds(now()),
        duration=monotonic() - started,
        requests=counters.requests,
        pages=counters.pages,
        retries=counters.retries,
        throttles=counters.throttles,
        restarts=counters.restarts,
        error_code=error.code,
        error_message=str(error),
        operation=error.operation,
        errors=tuple(sorted(counters.errors.items())),
    )


async def _paginate(
    partition: Partition,
    region: str,
    clients: ClientSource,
    pacer: Pacer,
    gate: Gate,
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[None]],
    rng: random.Random,
    counters: FetchCounters,
) -> list[JobEntry]:
    entries: list[JobEntry] = []
    token: str | None = None
    seen: set[str] = set()  # the chain's tokens so far
    restarts = 0  # in this region
    while True:
        try:
            page = await _page(
                partition, region, token, clients, pacer, gate, policy, sleep, rng, counters
            )
        except InvalidNextTokenError:
            if token is None or restarts >= policy.max_restarts:
                raise
            page = None
        if page is not None:
            counters.pages += 1
            entries.extend(page.entries)
            token = page.next_token
            if token is None:
                return entries
            if token not in seen:
                seen.add(token)
                continue
            if restarts >= policy.max_restarts:
                raise TransientError(
                    account_id=partition.account_id,
                    region=region,
                    operation="ListJobs",
                    code="NextTokenLoop",
                    detail=f"a NextToken came back after {len(seen)} pages of the same chain",
                )
        restarts += 1
        counters.restarts += 1
        log.info("partition.restarted", restarts=counters.restarts, loop=page is not None)
        entries.clear()
        seen.clear()
        token = None


async def _page(
    partition: Partition,
    region: str,
    token: str | None,
    clients: ClientSource,
    pacer: Pacer,
    gate: Gate,
    policy: RetryPolicy,
    sleep: Callable[[float], Awaitable[None]],
    rng: random.Random,
    counters: FetchCounters,
) -> Page:
    """One page, with the retry budget of one call."""
    kwargs: dict[str, Any] = {"MaxResults": PAGE_SIZE}
    if token is not None:
        kwargs["NextToken"] = token
    refreshed = False
    attempt = 0
    while True:
        attempt += 1
        async with clients.lease(partition, region) as client:
            await pacer.acquire()
            async with gate if token is None else gate.next_page():
                pacer.sent()
                counters.requests += 1
                try:
                    departure = _departing.set(pacer)
                    try:
                        page = await clients.list_jobs(client, kwargs, partition.account_id)
                    except asyncio.CancelledError:
                        counters.cut_short = True  # (the partition deadline, or a shutdown)
                        raise
                    finally:
                        _departing.reset(departure)
                except Exception as exc:
                    err = translate(
                        exc, account_id=partition.account_id, region=region, operation="ListJobs"
                    )
                    if err.operation == "AssumeRole":
                        # botocore renewed the account's credentials while signing, and the
                        # AssumeRole failed (counted, and retried, as AssumeRole): no ListJobs
                        # went out, and asking again would only assume the role again.
                        counters.requests -= 1
                        raise err from exc
                else:
                    if page is not None:
                        pacer.on_success()
                        return page
                    # botocore's JSON parser turns an unparseable 200 body into an empty
                    # result; ListJobs always carries JobListEntries, so this is a torn body.
                    err = TransientError(
                        account_id=partition.account_id,
                        region=region,
                        operation="ListJobs",
                        code="MalformedResponse",
                        detail="response without JobListEntries",
                    )
            counters.errors[err.code] = counters.errors.get(err.code, 0) + 1
            if isinstance(err, CredentialsExpiredError) and (
                not refreshed or attempt < policy.max_attempts
            ):
                # Renew the account's credentials and ask for the same page again. The first
                # renewal is free, whatever the budget (with max_attempts = 1 the expired keys
                # were kept, and every later cycle failed); more on the same page (a session
                # renewed by another partition can expire again before our turn) spend it.
                counters.refreshes += 1
                await clients.renew(partition, client)
                if not refreshed:
                    refreshed = True
                    attempt -= 1
                continue
            if (
                isinstance(err, AccessDeniedError)
                and err.code in UNRECOGNIZED_KEYS
                and not refreshed
                and await clients.renew_unrecognized(partition, client)
            ):
                # Keys the service does not recognise (a daemon's, kept from an earlier cycle,
                # revoked meanwhile): the account's role is assumed again, once a cycle, as
                # for expired keys; keys refused after that are a denial (a region that needs
                # an opt-in our list does not know of would renew them on every page).
                counters.refreshes += 1
                refreshed = True
                attempt -= 1
                continue
        if isinstance(err, ThrottledError):  # (the last attempt's throttle counts too)
            counters.throttles += 1
            pacer.on_throttle()
        if not isinstance(err, RetryableError) or attempt >= policy.max_attempts:
            raise err
        counters.retries += 1
        log.debug("request.retry", code=err.code, attempt=attempt)
        await sleep(policy.backoff(attempt, rng))
