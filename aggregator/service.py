"""Service: aggregation cycles end to end.

`Aggregator` owns what lives across cycles (the hub session, the credential broker with its
per-account sessions, the client pool and its connections, the global gate) and runs one cycle
per `cycle()` call: accounts -> plan -> (credentials, scheduler, fetch) -> merge -> snapshot.
`run_once` is one cycle in a fresh Aggregator.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import structlog
from aiobotocore.session import AioSession
from structlog.contextvars import bound_contextvars

from .accounts import static_accounts
from .clients import ClientPool
from .config import Settings
from .credentials import CredentialBroker
from .fetch import PartitionResult
from .merge import Merger
from .plan import build_plan
from .records import SCHEMA_VERSION, JobRecord, iso_seconds
from .retry import RetryPolicy
from .scheduler import Limits, run_plan
from .snapshot import SnapshotStore, new_snapshot_id

__all__ = ["Aggregator", "RunSummary", "run_once"]

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
    output: Path
    manifest_path: Path
    data_path: Path
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

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "complete" else 1


class Aggregator:
    """Runs aggregation cycles; an async context manager with one owner.

    Keyword options: `output` (overrides `output.directory`), `hub_session` (an AioSession for
    the hub credentials; default: the standard AWS chain), `policy` (retry policy; default from
    `limits.max_attempts`), `sleep`/`rng`/`now` (injectable for tests), `workers` (partitions
    open at once; default 4 x max_concurrency), `pool_capacity` (Snowball clients kept open
    across partitions and cycles; default 2 x workers).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        output: str | Path | None = None,
        hub_session: AioSession | None = None,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        workers: int | None = None,
        pool_capacity: int | None = None,
    ) -> None:
        self.settings = settings
        self._output = output
        self._hub_session = hub_session
        self._policy = policy
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._now = now
        self._workers = workers
        self._pool_capacity = pool_capacity
        self._stack: contextlib.AsyncExitStack | None = None
        self._broker: CredentialBroker | None = None
        self._pool: ClientPool | None = None
        self._gate = asyncio.Semaphore(settings.limits.max_concurrency)

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
            self._broker = await stack.enter_async_context(
                CredentialBroker(
                    timeout=limits.timeout,
                    policy=self._policy_for(),
                    gate=self._gate,
                    sleep=self._sleep,
                    rng=self._rng,
                    hub_session=self._hub_session,
                )
            )
            workers = limits.workers or 4 * limits.max_concurrency
            self._pool = await stack.enter_async_context(
                ClientPool(
                    broker=self._broker,
                    timeout=limits.timeout,
                    capacity=self._pool_capacity or 2 * workers,
                )
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
        self._broker = self._pool = None
        if stack is not None:
            await asyncio.shield(stack.aclose())

    def _policy_for(self) -> RetryPolicy:
        return self._policy or RetryPolicy(max_attempts=self.settings.limits.max_attempts)

    async def cycle(self) -> RunSummary:
        """Run one aggregation cycle and write its snapshot; returns the summary.

        Raises `OutputError` if the output directory is not writable (before any AWS call).
        Partition failures are not errors: they make the snapshot partial.
        """
        if self._broker is None or self._pool is None:
            raise RuntimeError("Aggregator is not open")
        broker, pool = self._broker, self._pool
        settings = self.settings
        now = self._now
        started_at = now()
        started = time.monotonic()
        snapshot_id = new_snapshot_id(started_at)
        store = SnapshotStore(
            self._output if self._output is not None else settings.output.directory
        )
        store.check_writable()
        limits = self._limits()
        policy = self._policy_for()
        accounts = static_accounts(settings.accounts)
        plan = build_plan(accounts, settings.regions)
        merger = Merger()
        results: list[PartitionResult] = []
        broker.reset_failures()
        assume_before = broker.assume_role_calls

        def on_result(result: PartitionResult) -> None:
            results.append(result)
            merger.add(result)
            event = "partition.done" if result.status == "ok" else f"partition.{result.status}"
            log.info(
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
            )
            assume_calls = broker.assume_role_calls - assume_before
            previous_manifest = store.latest_manifest()
            previous: list[JobRecord] = []
            if previous_manifest is not None and any(r.status == "failed" for r in results):
                previous = list(store.read_records(previous_manifest))
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
            requests = sum(r.requests for r in results) + assume_calls
            finished_at = now()
            throttles = sum(r.throttles for r in results)
            retries = sum(r.retries for r in results)
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
                        "jobs": len(r.entries),
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
                    "list_jobs": requests - assume_calls,
                    "assume_role": assume_calls,
                },
                "throttles": throttles,
                "retries": retries,
                "restarts": restarts,
            }
            written = store.write(snapshot_id, records, manifest)
            wall = time.monotonic() - started
            log.info(
                "run.finished",
                status=status,
                jobs=stats.jobs,
                stale=stats.stale,
                requests=requests,
                seconds=round(wall, 3),
            )
        return RunSummary(
            snapshot_id=snapshot_id,
            status=status,
            output=store.root,
            manifest_path=store.root / written.manifest_path,
            data_path=store.root / written.data_path,
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
        )


async def run_once(settings: Settings, **options: Any) -> RunSummary:
    """One cycle in a fresh `Aggregator` (options as for `Aggregator`)."""
    async with Aggregator(settings, **options) as aggregator:
        return await aggregator.cycle()
