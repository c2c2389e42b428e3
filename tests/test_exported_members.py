"""The public surface of the package is exactly what `__all__` promises."""

import aggregator


def test_all_names_are_exported() -> None:
    """Every name in `__all__` is importable from the package root."""
    for name in aggregator.__all__:
        assert hasattr(aggregator, name), name


def test_public_surface_is_pinned() -> None:
    """Adding or removing a public name is a deliberate change to this list."""
    assert set(aggregator.__all__) == {
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
    }
