"""No secret leaks: keys and session tokens never appear in logs, output files or errors."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import orjson
import structlog

from aggregator.retry import RetryPolicy
from aggregator.sandbox import Faults
from aggregator.service import run_once

from .conftest import SandboxFactory, make_settings

FAULTS = Faults(p_500=0.2, p_reset=0.05, credential_ttl=1.0)


class Ticking:
    """A sandbox clock that advances 0.4 s per reading: credentials die after a few uses."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.4
        return self.now


def assert_clean(text: str, secrets: tuple[str, ...]) -> None:
    for secret in secrets:
        assert secret not in text, "a secret leaked"
        assert secret[:24] not in text, "part of a secret leaked"


async def test_debug_run_in_a_process_leaks_nothing(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """A `run` at debug level under faults prints no secret key, token or signature."""
    sb = await make_sandbox(accounts=4, seed=51, faults=FAULTS, clock=Ticking())
    a, b = sb.account_ids[:2]
    sb.faults = replace(sb.faults, deny_assume_role=frozenset({a}), deny_list_jobs=frozenset({b}))
    config = tmp_path / "run.toml"
    output = tmp_path / "out"
    config.write_text(
        f"[accounts]\nids = {orjson.dumps(list(sb.account_ids)).decode()}\n"
        '[regions]\nnames = ["us-east-1", "eu-west-1"]\n'
        "[limits]\nrequests_per_second = 1000.0\ntimeout_seconds = 2\n"
        f'[output]\ndirectory = "{output}"\n'
        '[logging]\nlevel = "debug"\nformat = "json"\n'
    )
    env = dict(os.environ)
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "aggregator", "run", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 1  # partial: two accounts are denied
    lines = proc.stderr.splitlines()
    assert any(orjson.loads(line)["level"] == "debug" for line in lines), "debug was on"
    assert sb.stats().faults.get("credential_expired", 0) > 0  # credentials were renewed
    secrets = sb.issued_secrets()
    assert len(secrets) > 4
    assert_clean(proc.stdout + proc.stderr, secrets)
    for path in output.rglob("*"):
        if path.is_file():
            assert_clean(path.read_text(encoding="utf-8"), secrets)


async def test_captured_events_and_errors_leak_nothing(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Every structlog event and every error message of an in-process run is clean."""
    sb = await make_sandbox(accounts=3, seed=52, faults=FAULTS, clock=Ticking())
    sb.faults = replace(sb.faults, deny_list_jobs=frozenset({sb.account_ids[0]}))
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1"]})
    policy = RetryPolicy(max_attempts=6, base_delay=0.001, max_delay=0.01)
    with structlog.testing.capture_logs() as events:
        summary = await run_once(settings, output=tmp_path, policy=policy)
    assert events and summary.failed
    text = repr(events) + repr(summary)
    assert_clean(text, sb.issued_secrets())


async def test_a_token_quoted_back_in_unknown_words_is_masked(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """A service (or a proxy) that quotes the request's session token in words no pattern
    knows ("denied for token '...'", or cut to its first 40 characters): every token this
    process signed with is masked in the manifest, the summary and the logs, on our send path
    and botocore's. They were recorded verbatim in `failed_partitions[].message`."""
    sb = await make_sandbox(accounts=2, seed=53)
    denied = sb.account_ids[0]
    sb.faults = Faults(deny_list_jobs=frozenset({denied}), echo_tokens=True)
    settings = make_settings(sb.account_ids, regions={"names": ["eu-west-1", "us-east-1"]})
    policy = RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.01)
    for direct in (True, False):
        with structlog.testing.capture_logs() as events:
            summary = await run_once(settings, output=tmp_path, policy=policy, direct=direct)
        messages = [f["message"] for f in summary.failed]
        assert len(messages) == 2 and all("denied for token '<redacted>'" in m for m in messages)
        assert all("; secret <redacted>)" in m for m in messages), messages
        text = repr(events) + repr(summary) + summary.manifest_path.read_text()
        assert_clean(text, sb.issued_secrets())
    assert sb.stats().faults["deny_list_jobs"] == 4
