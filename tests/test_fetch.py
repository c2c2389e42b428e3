"""fetch_partition's last line of defence: an exception no layer below translated (a bug, a
failure nobody foresaw) fails that partition, or that region of it, and nothing else.

The client source here is a stand-in for the pool (`fetch.ClientSource`, our own interface):
the point is what fetch does with an exception of any type, which the real parts only raise
by accident. Everything on the wire is tested through the sandbox elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from structlog.testing import capture_logs

from aggregator.accounts import Account, role_arn
from aggregator.fetch import fetch_partition
from aggregator.gate import Gate
from aggregator.plan import Partition
from aggregator.records import JobEntry, Page
from aggregator.retry import RetryPolicy

ACCOUNT = Account("111111111111", role_arn("111111111111", "Reader"))
SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


class Unforeseen:
    """Leases fail with a RuntimeError (whose text holds a secret) in `broken` regions."""

    def __init__(self, broken: set[str]) -> None:
        self.broken = broken
        self.leased: list[str] = []

    @contextlib.asynccontextmanager
    async def lease(self, partition: Partition, region: str) -> AsyncIterator[Any]:
        self.leased.append(region)
        if region in self.broken:
            raise RuntimeError(f"a bug nobody foresaw, holding {SECRET}")
        yield region

    async def list_jobs(self, client: Any, params: dict[str, Any], account_id: str) -> Page:
        entry = JobEntry(account_id, f"JID-{client}", "New", "IMPORT", "EDGE", False, None, None)
        return Page([entry], None)

    async def renew(self, partition: Partition, client: Any) -> None:  # pragma: no cover
        raise AssertionError("no credentials expire here")

    async def renew_unrecognized(
        self, partition: Partition, client: Any
    ) -> bool:  # pragma: no cover
        raise AssertionError("no keys are refused here")


class NoPacing:
    async def acquire(self) -> None:
        return None

    def sent(self) -> None:
        return None

    def on_throttle(self) -> None:  # pragma: no cover - nothing throttles here
        return None

    def on_success(self) -> None:
        return None


async def fetch(source: Unforeseen, partition: Partition) -> Any:
    return await fetch_partition(
        partition, clients=source, pacer=NoPacing(), gate=Gate(4), policy=RetryPolicy()
    )


async def test_an_unforeseen_exception_fails_the_partition_without_its_text() -> None:
    """The partition is `failed` with the exception's type as its code, the message says
    "unexpected error" and never the exception's text (it may hold a secret), a warning names
    the type, and the fetch returns instead of raising into the scheduler."""
    source = Unforeseen({"eu-west-1"})
    with capture_logs() as logs:
        result = await fetch(source, Partition(ACCOUNT, "eu-west-1"))
    assert (result.status, result.error_code, result.entries) == ("failed", "RuntimeError", ())
    assert "unexpected error" in (result.error_message or "")
    assert SECRET not in (result.error_message or "") and SECRET not in repr(logs)
    warnings = [e for e in logs if e["event"] == "partition.attempt_failed"]
    assert [(w["log_level"], w["error_type"]) for w in warnings] == [("warning", "RuntimeError")]


async def test_an_unforeseen_exception_moves_on_to_the_fallback_region() -> None:
    """As for an AWS error, the partition's fallback regions are tried in order after it."""
    source = Unforeseen({"us-east-1"})
    result = await fetch(source, Partition(ACCOUNT, "us-east-1", fallbacks=("us-west-2",)))
    assert (result.status, result.region) == ("ok", "us-west-2")
    assert [e.job_id for e in result.entries] == ["JID-us-west-2"]
    assert source.leased == ["us-east-1", "us-west-2"]


class Hanging(Unforeseen):
    """ListJobs never answers (a region that hangs past the partition deadline)."""

    async def list_jobs(self, client: Any, params: dict[str, Any], account_id: str) -> Page:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")  # pragma: no cover


async def test_a_deadline_fails_the_region_where_the_time_ran_out() -> None:
    """With `us_strategy = "one"`, a partition whose first US region hangs past the deadline
    is failed in that region; no fallback is asked once the time is up, and the result names
    the region that was asked, not the last fallback, which never was."""
    source = Hanging(broken=set())
    partition = Partition(ACCOUNT, "us-east-1", fallbacks=("us-east-2", "us-west-2"))
    policy = RetryPolicy(partition_deadline=0.05)
    result = await fetch_partition(
        partition, clients=source, pacer=NoPacing(), gate=Gate(4), policy=policy
    )
    assert result.status == "failed" and result.error_code == "PartitionDeadlineExceeded"
    assert result.region == "us-east-1" and source.leased == ["us-east-1"]
