"""snowball-aggregator: one trustworthy, always-current inventory of every AWS Snowball job.

The public surface is what this module exports; everything else may change between versions.
The exports load on first use (PEP 562), so that importing a light module of the package, such
as the command's launcher (launch.py), does not import botocore first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Settings, load_settings
    from .errors import (
        AccessDeniedError,
        AggregatorError,
        AwsError,
        ClientFailureError,
        ConfigError,
        CredentialsExpiredError,
        InvalidNextTokenError,
        OutputError,
        RegionNotEnabledError,
        RetryableError,
        ThrottledError,
        TransientError,
    )
    from .records import SCHEMA_VERSION, JobRecord
    from .service import RunSummary, run_once

__all__ = [
    "SCHEMA_VERSION",
    "AccessDeniedError",
    "AggregatorError",
    "AwsError",
    "ClientFailureError",
    "ConfigError",
    "CredentialsExpiredError",
    "InvalidNextTokenError",
    "JobRecord",
    "OutputError",
    "RegionNotEnabledError",
    "RetryableError",
    "RunSummary",
    "Settings",
    "ThrottledError",
    "TransientError",
    "load_settings",
    "run_once",
]

_HOMES = {
    **dict.fromkeys(("Settings", "load_settings"), "config"),
    **dict.fromkeys(("SCHEMA_VERSION", "JobRecord"), "records"),
    **dict.fromkeys(("RunSummary", "run_once"), "service"),
}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES.get(name, 'errors')}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
