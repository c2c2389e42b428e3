"""snowball-aggregator: one trustworthy, always-current inventory of every AWS Snowball job.

The public surface is what this module exports; everything else may change between versions.
"""

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
