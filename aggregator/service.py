"""Service: aggregation cycles end to end.

`Aggregator` owns what lives across cycles (the hub session, the credential broker with its
per-account sessions, the client pool and its connections, the global gate) and runs one cycle
per `cycle()` call: accounts -> plan -> (credentials, scheduler, fetch) -> merge -> snapshot.
`run_once` is one cycle in a fresh Aggregator.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import errno
import gc
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

import structlog
from aiobotocore.session import AioSession
from structlog.contextvars import bound_contextvars

from . import wire
from .accounts import resolve_accounts
from .clients import ClientPool
from .config import Settings, output_origin
from .credentials import CredentialBroker
from .direct import DirectSender
from .errors import ConfigError, OutputError, wrong_location
from .fetch import PartitionResult, install_departing
from .gate import Gate
from .gcpolicy import cycle_gc
from .health import HealthState
from .merge import Merger
from .plan import build_plan, expected_pages, longest_first
from .records import SCHEMA_VERSION, JobRecord, iso_seconds
from .retry import RetryPolicy
from .scheduler import Limits, run_plan
from .shards import Shard, select_shard, shard_location, shard_manifest
from .snapshot import Store, new_snapshot_id, open_store, to_the_end
from .transport import SharedPool, shared_session_class

__all__ = ["Aggregator", "CycleObserver", "RunSummary", "run_forever", "run_once"]

log = structlog.get_logger()
RunStatus = Literal["complete", "partial", "failed"]


def _version() -> str:
    try:
        return version("snowball-aggregator")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What one cycle did; `exit_code` is 0 complete, 1 partial or failed."""

    snapshot_id: str
    status: RunStatus
    output: Path | str
    manifest_path: Path | str
    data_path: Path | str
    accounts: int
    partitions: dict[str, int]
    jobs: int
    stale: int
    duplicates: int
    requests: int
    throttles: int
    retries: int
    restarts: int
    wall_seconds: float
    failed: tuple[dict[str, Any], ...] = field(default=())
    assume_role_outcomes: tuple[tuple[str, int], ...] = ()

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "complete" else 1


class CycleObserver(Protocol):
    """Something that watches cycles: metrics, a progress bar, a test.

    It may also have `requests_made(counts)` (a cycle's AssumeRole and Organizations requests
    by (operation, outcome)), `requests_retried(retries, throttles)` (their retries and
    throttling answers), `cycle_failed(reason)` and `cycle_skipped(missed)`; each is called
    only if present.
    """

    def cycle_started(self, snapshot_id: str, partitions: int) -> None: ...
    def partition_done(self, result: PartitionResult) -> None: ...
    def cycle_finished(self, summary: RunSummary, records: Sequence[JobRecord]) -> None: ...


class Aggregator:
    """Runs aggregation cycles; an async context manager with one owner.

    Keyword options: `output` (overrides `output.directory`), `hub_session` (an AioSession for
    the hub credentials; default: the standard AWS chain), `policy` (retry policy; default from
    `limits.max_attempts`), `sleep`/`rng`/`now` (injectable for tests; `monotonic`, the clock
    the per-partition pacing reads, goes with `sleep`), `workers` (partitions
    open at once; default 4 x max_concurrency), `pool_capacity` (Snowball clients kept open
    across partitions and cycles; default 2 x workers), `observers` (CycleObserver objects told
    about each cycle, partition and summary), `stock=False` (True: plain aiobotocore clients
    with none of our optimisations, the baseline the benchmarks compare against), `direct=True`
    (False: botocore signs and sends ListJobs itself instead of the direct path, see
    direct.py; to measure what that path buys, or to rule it out), `shard=None`
    (a `Shard`: inventory only the accounts of that shard and write the snapshot to the shard's
    folder, see shards.py), `output_origin=None` (where `output` was given, such as
    `--output`, to start the error of a location that cannot be written with; without
    `output`, it is `output.directory` in the configuration file or its variable).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        output: str | Path | None = None,
        hub_session: AioSession | None = None,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        workers: int | None = None,
        pool_capacity: int | None = None,
        observers: Sequence[CycleObserver] = (),
        stock: bool = False,
        direct: bool = True,
        shard: Shard | None = None,
        output_origin: str | None = None,
    ) -> None:
        self.settings = settings
        self._output_origin = output_origin
        self._direct = direct and not stock
        self._shard = shard
        self._session_cls: Any = None
        self._stock = stock
        self.observers = list(observers)
        self._output = output
        self._hub_session = hub_session
        self._policy = policy
        self._sleep = sleep
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        self._now = now
        self._workers = workers
        self._pool_capacity = pool_capacity
        self._stack: contextlib.AsyncExitStack | None = None
        self._broker: CredentialBroker | None = None
        self._pool: ClientPool | None = None
        self._sender: DirectSender | None = None
        self._store: Store | None = None  # the output location (holds the previous snapshot)
        self._shard_store: Store | None = None  # a shard's own folder below it
        self._gate = Gate(settings.limits.max_concurrency)
        self._output_fresh = False  # check_output passed just now (see run_forever)

    def _limits(self) -> Limits:
        lim = self.settings.limits
        return Limits(
            max_concurrency=lim.max_concurrency,
            requests_per_second=lim.requests_per_second,
            timeout=lim.timeout_seconds,
            workers=self._workers,
        )

    async def __aenter__(self) -> Aggregator:
        if self._stack is not None:
            raise RuntimeError("Aggregator is already open")
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            limits = self._limits()
            # One connection pool for every client (+ headroom for connections being closed).
            shared = await stack.enter_async_context(SharedPool(limit=limits.max_concurrency + 8))
            session_cls = None if self._stock else shared_session_class(shared)
            self._session_cls = session_cls
            self._sender = None
            sender = None
            if self._direct:
                sender = self._sender = await stack.enter_async_context(
                    DirectSender(timeout=limits.timeout, limit=limits.max_concurrency + 8)
                )
            stock = self._stock

            def hooks(session: AioSession) -> None:
                install_departing(session)  # pacing, in every mode
                if not stock:
                    wire.install(session)
                if sender is not None:
                    sender.install(session)

            self._broker = await stack.enter_async_context(
                CredentialBroker(
                    timeout=limits.timeout,
                    policy=self._policy_for(),
                    gate=self._gate,
                    sleep=self._sleep,
                    rng=self._rng,
                    hub_session=self._hub_session,
                    http_session_cls=session_cls,
                    session_hooks=hooks,
                    assume_role=None if self._sender is None else self._sender.assume_role,
                    hub_profiles={
                        name: p.profile for name, p in self.settings.partitions.items() if p.profile
                    },
                )
            )
            workers = limits.workers or 4 * limits.max_concurrency
            self._pool = await stack.enter_async_context(
                ClientPool(
                    broker=self._broker,
                    timeout=limits.timeout,
                    capacity=self._pool_capacity or 2 * workers,
                    http_session_cls=session_cls,
                    shared=not self._stock,
                )
            )
            output = self.settings.output
            location = self._output if self._output is not None else output.directory
            origin = self._output_origin
            if origin is None and self._output is None:
                origin = output_origin(self.settings)
            # The output location is written with the hub credentials of the configured
            # partition (its `[partitions.<name>] profile` when it has one), as the docs say.
            hub = self._broker.hub_session_for(self.settings.accounts.partition)
            options = {"compress": output.compress, "session": hub, "origin": origin}
            self._store = await stack.enter_async_context(open_store(location, **options))
            if self._shard is not None:
                self._shard_store = await stack.enter_async_context(
                    open_store(shard_location(location, self._shard), **options)
                )
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        self._broker = self._pool = self._store = self._shard_store = None
        if stack is not None:
            await asyncio.shield(stack.aclose())

    def _policy_for(self) -> RetryPolicy:
        lim = self.settings.limits
        return self._policy or RetryPolicy(
            max_attempts=lim.max_attempts,
            max_restarts=lim.max_restarts,
            partition_deadline=lim.partition_deadline_seconds,
        )

    async def check_output(self) -> None:
        """Raise `OutputError` if the output location (a shard's own folder, for a shard)
        cannot be written; its message starts with where the location was given."""
        store = self._shard_store or self._store
        if store is None:
            raise RuntimeError("Aggregator is not open")
        await store.check_writable()

    async def cycle(self) -> RunSummary:
        """Run one aggregation cycle and write its snapshot; returns the summary.

        Raises `OutputError` if the output directory is not writable (before any AWS call).
        Partition failures are not errors: they make the snapshot partial.
        """
        if self._broker is None or self._pool is None or self._store is None:
            raise RuntimeError("Aggregator is not open")
        # The AssumeRole and Organizations requests of the cycle, by (operation, outcome),
        # for the observers that count requests: whether the cycle finishes or raises.
        organizations: collections.Counter[tuple[str, str]] = collections.Counter()
        # Their retries and throttling answers too (ListJobs ones are the partitions').
        retried: collections.Counter[str] = collections.Counter()
        outcomes_before = collections.Counter(self._broker.outcomes)
        retried_before = collections.Counter(self._broker.retried)
        try:
            with cycle_gc():
                return await self._cycle(organizations, retried)
        finally:
            made = organizations + collections.Counter(
                {("AssumeRole", k): n for k, n in (self._broker.outcomes - outcomes_before).items()}
            )
            retried += self._broker.retried - retried_before
            for observer in self.observers:
                requests_made = getattr(observer, "requests_made", None)
                if requests_made is not None and made:
                    requests_made(made)
                requests_retried = getattr(observer, "requests_retried", None)
                if requests_retried is not None and retried:
                    requests_retried(retried["retries"], retried["throttles"])

    async def _cycle(
        self,
        organizations: collections.Counter[tuple[str, str]],
        retried: collections.Counter[str],
    ) -> RunSummary:
        assert self._broker is not None and self._pool is not None and self._store is not None
        broker, pool, base = self._broker, self._pool, self._store
        settings = self.settings
        now = self._now
        started_at = now()
        started = time.monotonic()
        snapshot_id = new_snapshot_id(started_at)
        # `base` holds the run's previous snapshot (stale carry-forward reads it); a shard
        # writes into its own folder below it, which `merge` combines.
        shard = self._shard
        store = self._shard_store or base
        if self._output_fresh:  # checked as the daemon opened, just before this cycle
            self._output_fresh = False
        else:
            await self.check_output()
        limits = self._limits()
        policy = self._policy_for()
        with bound_contextvars(snapshot_id=snapshot_id):
            universe = await resolve_accounts(
                settings.accounts,
                broker.hub_session_for(settings.accounts.partition),
                policy=policy,
                sleep=self._sleep,
                rng=self._rng,
                request_timeout=limits.timeout,
                http_session_cls=self._session_cls,
                requests=organizations,
                retried=retried,
            )
        accounts = universe if shard is None else select_shard(universe, shard.index, shard.count)
        # The previous run tells how long each chain is: the longest start first.
        previous_manifest = await base.latest_manifest()
        plan = longest_first(
            build_plan(accounts, settings.regions), expected_pages(previous_manifest)
        )
        merger = Merger()
        merger.expect(plan, snapshot_id=snapshot_id)
        # Results without their entries (the merger holds the jobs, deduplicated), so memory
        # grows with unique jobs only; `jobs` keeps each partition's entry count.
        results: list[PartitionResult] = []
        jobs: dict[str, int] = {}
        broker.reset_failures()
        broker.keep_only({a.account_id for a in accounts})
        assume_before = broker.assume_role_calls
        outcomes_before = collections.Counter(broker.outcomes)
        assume_retried_before = collections.Counter(broker.retried)
        for observer in self.observers:
            observer.cycle_started(snapshot_id, len(plan))

        def on_result(result: PartitionResult) -> None:
            merger.add(result)
            for observer in self.observers:
                observer.partition_done(result)
            jobs[result.partition.key] = len(result.entries)
            results.append(dataclasses.replace(result, entries=()))
            event = "partition.done" if result.status == "ok" else f"partition.{result.status}"
            # A failure is a warning: `logging.level = "warning"` must still show it.
            (log.warning if result.status == "failed" else log.info)(
                event,
                account_id=result.partition.account_id,
                region=result.region,
                jobs=len(result.entries),
                requests=result.requests,
                error_code=result.error_code,
            )

        with bound_contextvars(snapshot_id=snapshot_id):
            log.info("run.started", accounts=len(accounts), partitions=len(plan))
            await run_plan(
                plan,
                broker=broker,
                pool=pool,
                limits=limits,
                policy=policy,
                gate=self._gate,
                on_result=on_result,
                sleep=self._sleep,
                rng=self._rng,
                clock=self._monotonic,
                sender=self._sender,
                now=self._now,
            )
            assume_calls = broker.assume_role_calls - assume_before
            organizations_calls = sum(organizations.values())
            previous: list[JobRecord] = []
            if previous_manifest is not None and _carries_forward(results, previous_manifest):
                previous = [r async for r in base.read_records(previous_manifest)]
            records, stats = merger.records(snapshot_id=snapshot_id, previous=previous)

            counts = {"planned": len(plan), "ok": 0, "failed": 0, "skipped": 0}
            for r in results:
                counts[r.status] += 1
            failed = tuple(
                {
                    "account_id": r.partition.account_id,
                    "region": r.region,
                    "operation": r.operation,
                    "error_code": r.error_code,
                    "message": r.error_message,
                }
                for r in sorted(results, key=lambda r: r.partition.key)
                if r.status == "failed"
            )
            status: RunStatus = (
                "complete" if not counts["failed"] else "partial" if counts["ok"] else "failed"
            )
            requests = sum(r.requests for r in results) + assume_calls + organizations_calls
            finished_at = now()
            # ListJobs' own, and those of the cycle's AssumeRole and Organizations calls.
            elsewhere = retried + (broker.retried - assume_retried_before)
            throttles = sum(r.throttles for r in results) + elsewhere["throttles"]
            retries = sum(r.retries for r in results) + elsewhere["retries"]
            restarts = sum(r.restarts for r in results)
            manifest: dict[str, Any] = {
                "schema_version": SCHEMA_VERSION,
                "tool_version": _version(),
                "previous_snapshot_id": previous_manifest["snapshot_id"]
                if previous_manifest
                else None,
                "started_at": iso_seconds(started_at),
                "finished_at": iso_seconds(finished_at),
                "status": status,
                "accounts": len(accounts),
                "partitions": counts,
                "failed_partitions": list(failed),
                "partition_status": [
                    {
                        "account_id": r.partition.account_id,
                        "region": r.region,
                        "status": r.status,
                        "jobs": jobs[r.partition.key],
                        "requests": r.requests,
                        "error_code": r.error_code,
                        "message": r.error_message,
                    }
                    for r in sorted(results, key=lambda r: r.partition.key)
                ],
                "jobs": stats.jobs,
                "stale_jobs": stats.stale,
                "duplicates_removed": stats.duplicates,
                "requests": {
                    "total": requests,
                    "list_jobs": requests - assume_calls - organizations_calls,
                    "assume_role": assume_calls,
                    "organizations": organizations_calls,
                },
                "throttles": throttles,
                "retries": retries,
                "restarts": restarts,
            }
            if shard is not None:
                manifest["shard"] = shard_manifest(
                    shard,
                    universe,
                    carried_from=previous_manifest["snapshot_id"] if previous_manifest else None,
                    regions=settings.regions,
                )
            if shard is not None:  # `merge` writes the run's change file and prunes
                written = await store.write(snapshot_id, records, manifest, changes=False)
            else:
                try:
                    written = await store.write(
                        snapshot_id, records, manifest, previous=previous_manifest
                    )
                except OutputError as exc:
                    if _disk_full(exc):
                        await _prune_anyway(store, settings.output.retain)
                    raise
                try:  # published: a cancellation now must not report the run as cancelled
                    await to_the_end(store.prune(settings.output.retain))
                except OutputError as exc:  # the snapshot is complete; the next cycle retries
                    log.warning("snapshot.prune_failed", error=str(exc))
            wall = time.monotonic() - started
            log.info(
                "run.finished",
                status=status,
                jobs=stats.jobs,
                stale=stats.stale,
                requests=requests,
                seconds=round(wall, 3),
            )
        summary = RunSummary(
            snapshot_id=snapshot_id,
            status=status,
            output=store.locate(""),
            manifest_path=store.locate(written.manifest_path),
            data_path=store.locate(written.data_path),
            accounts=len(accounts),
            partitions=counts,
            jobs=stats.jobs,
            stale=stats.stale,
            duplicates=stats.duplicates,
            requests=requests,
            throttles=throttles,
            retries=retries,
            restarts=restarts,
            wall_seconds=wall,
            failed=failed,
            assume_role_outcomes=tuple(sorted((broker.outcomes - outcomes_before).items())),
        )
        for observer in self.observers:
            observer.cycle_finished(summary, records)
        return summary


def _disk_full(exc: OutputError) -> bool:
    """Whether the write failed for want of space (or quota) on the output's file system."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cause = cause.__cause__
    return False


async def _prune_anyway(store: Store, retain: int) -> None:
    """Prune after a write that did not fit: prune follows a write that succeeds, so what a
    killed run left (removed once an hour old) would otherwise hold the space for good, and
    every later run fail the same way. Best effort: the write's error is the one to report."""
    try:
        await to_the_end(store.prune(retain))
    except OutputError as exc:
        log.warning("snapshot.prune_failed", error=str(exc))


async def run_once(settings: Settings, **options: Any) -> RunSummary:
    """One cycle: `run_forever(settings, burst=True, ...)` (options as for `Aggregator`)."""
    summary = await run_forever(settings, burst=True, **options)
    assert summary is not None
    return summary


async def _first(*events: asyncio.Event, seconds: float | None) -> None:
    """Wait until any event is set or `seconds` pass."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def run_forever(
    settings: Settings,
    *,
    burst: bool = False,
    stop: asyncio.Event | None = None,
    reload: Callable[[], Settings] | None = None,
    reload_requested: asyncio.Event | None = None,
    adopted: Callable[[Settings], None] | None = None,
    hurry: asyncio.Event | None = None,
    observers: Sequence[CycleObserver] = (),
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    **options: Any,
) -> RunSummary | None:
    """The one loop of batch and daemon modes.

    `burst=True` runs one cycle and returns its summary (errors propagate). Otherwise a cycle
    runs at start and then every `daemon.interval` (plus up to `daemon.jitter` x interval of
    random delay) until `stop` is set; a cycle never overlaps the previous one: slots missed
    while a cycle overran are skipped and counted. When `stop` is set during a cycle, the cycle
    gets `daemon.shutdown_deadline` seconds to finish and write its snapshot, then it is
    cancelled (the previous snapshot stays LATEST; files are never torn); at once if `hurry`
    is set meanwhile (a second SIGTERM or Ctrl-C).

    When `reload_requested` is set, `reload()` is called between cycles (at once when idle)
    and the new settings are tried at once: an Aggregator is opened with them and their
    output location checked, while the old one stays open. Settings that pass are adopted
    (`adopted(settings)`, e.g. to apply their logging, then `config.reloaded`): the next cycle
    is due one new interval after the last one started (at once if that has passed), and the
    health windows follow. A `ConfigError`, or settings the Aggregator cannot open with (an
    output location that is wrong, a profile that does not work), is logged as one line
    (`config.reload_failed`) and nothing changes. A daemon cycle that raises (e.g. the disk is
    full) is logged and counted, and the loop goes on. Only the first opening's failure
    propagates, an output location that is wrong included (one that fails for now, such as
    S3 unreachable, is a warning: see `_output_checked`). Returns the last summary.
    """
    stop = stop or asyncio.Event()
    reload_requested = reload_requested or asyncio.Event()
    hurry = hurry or asyncio.Event()
    rng = rng or random.Random()
    observers = list(observers)
    last: RunSummary | None = None

    async def opened(new: Settings) -> tuple[contextlib.AsyncExitStack, Aggregator] | None:
        """An Aggregator open with `new` (its output checked unless `burst`); None if `stop`
        was set while the output was checked."""
        stack = contextlib.AsyncExitStack()
        try:
            aggregator = await stack.enter_async_context(
                Aggregator(new, rng=rng, observers=observers, **options)
            )
            if not burst and not await _output_checked(aggregator, stop):
                await _close(stack)
                return None
        except BaseException:
            await _close(stack)
            raise
        return stack, aggregator

    if stop.is_set():
        return None
    first = await opened(settings)
    if first is None:
        return None
    stack, aggregator = first
    next_start = clock()
    try:
        while not stop.is_set():
            last_start = clock()
            task = asyncio.create_task(aggregator.cycle())
            if burst:
                return await task
            log.info("cycle.started")
            await _race(task, stop)
            if not task.done():
                deadline = settings.daemon.shutdown_deadline
                log.info("daemon.stopping", deadline_seconds=deadline)
                hurrier = asyncio.ensure_future(hurry.wait())
                try:
                    await asyncio.wait(
                        {task, hurrier}, timeout=deadline, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    hurrier.cancel()
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                if task.cancelled():  # (not once it published: see snapshot.to_the_end)
                    reason = "stopped again" if hurry.is_set() else "shutdown deadline passed"
                    log.warning("cycle.cancelled", reason=reason)
                    break
            try:
                last = task.result()
            except asyncio.CancelledError:
                break
            except Exception as exc:  # the daemon outlives a failed cycle
                _cycle_failed(observers, exc)
            # Between cycles, a full collection: a cycle runs with the heap frozen (see
            # gcpolicy.py), so garbage cycles made before it are only found out here.
            gc.collect()
            if stop.is_set():
                break
            interval = settings.daemon.interval
            next_start += interval
            now = clock()
            if now > next_start:
                missed = int((now - next_start) // interval) + 1
                next_start += missed * interval
                log.warning("cycle.skipped", missed=missed, interval_seconds=interval)
                for observer in observers:
                    skipped = getattr(observer, "cycle_skipped", None)
                    if skipped is not None:
                        skipped(missed)
            spread = rng.uniform(0.0, 1.0)  # this slot's share of the jitter
            while not stop.is_set():
                daemon = settings.daemon
                wake = next_start + spread * daemon.jitter * daemon.interval
                await _first(stop, reload_requested, seconds=max(0.0, wake - clock()))
                if not reload_requested.is_set():
                    break  # time for the next cycle (or stop)
                reload_requested.clear()
                new = _reload(reload, settings)
                if new is settings:
                    continue
                try:
                    reopened = await opened(new)
                except Exception as exc:
                    log.error("config.reload_failed", error=str(exc), error_type=type(exc).__name__)
                    continue
                if reopened is None:
                    break  # stopped while the new output was checked
                old, (stack, aggregator) = stack, reopened  # (closed by `finally` from now)
                await _close(old)
                # One new interval after the last cycle started; now at the latest (a shorter
                # interval whose time has passed: no burst of skipped slots).
                next_start = max(last_start + new.daemon.interval, clock())
                settings = new
                _follow(observers, settings)
                if adopted is not None:
                    adopted(settings)
                log.info("config.reloaded", source=settings.source)
    finally:
        # To its end: a SIGTERM as the clients close must neither cut that short nor, once a
        # `run`'s snapshot is published, turn the finished run into a cancelled one.
        await to_the_end(stack.aclose())
    return last


async def _output_checked(aggregator: Aggregator, stop: asyncio.Event) -> bool:
    """A daemon's output location, checked as it opens; False if `stop` is set first (the
    check is cancelled: S3 behind a dead endpoint takes minutes to give up).

    A location that is wrong (`errors.wrong_location`: a path through a file, no permission,
    no such bucket) raises, so that a daemon started with it stops at once (exit 2) and a
    reload to it is refused. Any other failure (disk full, S3 unreachable, credentials not
    available yet) is a warning, and the cycles try again. A check that passes stands for the
    first cycle's own."""
    check = asyncio.ensure_future(aggregator.check_output())
    try:
        await _race(check, stop)
    finally:
        if not check.done():
            check.cancel()
            await asyncio.wait({check})
    if check.cancelled():
        return False
    exc = check.exception()
    if exc is None:
        aggregator._output_fresh = True
        return True
    if isinstance(exc, OutputError) and not wrong_location(exc):
        log.warning("output.unavailable", error=str(exc))
        return True
    raise exc


async def _race(task: asyncio.Future[Any], event: asyncio.Event) -> None:
    """Wait until `task` is done or `event` is set, whichever comes first."""
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()


async def _close(stack: contextlib.AsyncExitStack) -> None:
    """Close an Aggregator's stack; an error while closing is logged, not raised (the error
    that made us close it is the one to report)."""
    try:
        await stack.aclose()
    except Exception as exc:
        log.warning("aggregator.close_failed", error=str(exc), error_type=type(exc).__name__)


def _cycle_failed(observers: Sequence[CycleObserver], exc: Exception) -> None:
    """Log a cycle that raised and tell the observers that count failed cycles."""
    log.error("cycle.failed", error=str(exc), error_type=type(exc).__name__)
    for observer in observers:
        failed = getattr(observer, "cycle_failed", None)
        if failed is not None:
            failed(str(exc))


def _follow(observers: Sequence[CycleObserver], settings: Settings) -> None:
    """Point the health state at `settings`' interval and deadline (after a reload)."""
    for observer in observers:
        if isinstance(observer, HealthState):
            observer.reconfigure(
                settings.daemon.interval, settings.limits.partition_deadline_seconds
            )


def _reload(reload: Callable[[], Settings] | None, current: Settings) -> Settings:
    """The settings `reload()` reads, or `current` if there is nothing to reload or they are
    refused (`config.reload_failed`)."""
    if reload is None:
        return current
    try:
        return reload()
    except ConfigError as exc:
        log.error("config.reload_failed", error=str(exc))
        return current


def _carries_forward(results: Iterable[PartitionResult], manifest: Mapping[str, Any]) -> bool:
    """Whether the previous snapshot may hold jobs this run must carry forward as stale: a
    partition failed, or one was skipped (its region not enabled) that had jobs before, or
    failed before, or may have carried stale jobs (the previous snapshot has some)."""
    skipped: set[tuple[str, str]] = set()
    for r in results:
        if r.status == "failed":
            return True
        if r.status == "skipped":
            for region in (r.partition.region, *r.partition.fallbacks):
                skipped.add((r.partition.account_id, region))
    if not skipped:
        return False
    if int(manifest.get("stale_jobs") or 0) > 0:
        return True
    return any(
        (entry.get("account_id"), entry.get("region")) in skipped
        and (entry.get("status") == "failed" or int(entry.get("jobs") or 0) > 0)
        for entry in manifest.get("partition_status") or ()
    )
