"""Shared fixtures: an isolated AWS environment, sandbox and settings factories."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
import structlog

from aggregator.config import Settings, settings_from_mapping


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's AWS profile, credentials or overrides."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "SNOWBALL_AGGREGATOR_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(autouse=True)
def _quiet_structlog() -> Iterator[None]:
    """Every log call is rendered (so rendering bugs surface) but nothing is printed, and
    context bound by one test never leaks into the next."""
    structlog.contextvars.clear_contextvars()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=False,
    )
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


SandboxFactory = Callable[..., Awaitable[Any]]


@pytest.fixture
async def make_sandbox(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[SandboxFactory]:
    """Factory: start a sandbox on loopback and point the standard AWS variables at it."""
    from aggregator.sandbox import Faults, FleetSpec, Sandbox

    async with AsyncExitStack() as stack:

        async def make(faults: Any = None, clock: Any = None, **fleet: Any) -> Any:
            options = {"clock": clock} if clock is not None else {}
            sb = await stack.enter_async_context(
                Sandbox(fleet=FleetSpec(**fleet), faults=faults or Faults(), **options)
            )
            for name, value in sb.env().items():
                monkeypatch.setenv(name, value)
            return sb

        yield make


def make_settings(account_ids: Any, **sections: dict[str, Any]) -> Settings:
    """Settings for tests: the given accounts plus section overrides, fast limits by default."""
    doc: dict[str, Any] = {
        "accounts": {"ids": list(account_ids)},
        "limits": {"max_concurrency": 32, "requests_per_second": 1000.0, "timeout_seconds": 5},
    }
    for name, values in sections.items():
        doc[name] = {**doc.get(name, {}), **values}
    return settings_from_mapping(doc, source="<test>", env={})
