"""Partitions: a partition's hub credentials come from `[partitions.<name>] profile`."""

from __future__ import annotations

from pathlib import Path

import pytest

from aggregator.accounts import DiscoveryError
from aggregator.service import run_once

from .conftest import SandboxFactory, make_settings


async def test_gov_partition_uses_its_profile(
    make_sandbox: SandboxFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GovCloud accounts are discovered and entered with the profile named for aws-us-gov;
    without it, discovery fails with one line naming the partition."""
    sb = await make_sandbox(accounts=5, suspended=1, partition="aws-us-gov", seed=3)
    env = sb.env()
    profiles = tmp_path / "config"
    profiles.write_text(
        "[profile gov]\n"
        f"aws_access_key_id = {env['AWS_ACCESS_KEY_ID']}\n"
        f"aws_secret_access_key = {env['AWS_SECRET_ACCESS_KEY']}\n"
        "region = us-gov-west-1\n"
    )
    monkeypatch.setenv("AWS_CONFIG_FILE", str(profiles))
    # The default chain has no credentials at all: only the profile can get in.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    settings = make_settings(
        [],
        accounts={"partition": "aws-us-gov", "organizations": {"enabled": True}},
        partitions={"aws-us-gov": {"profile": "gov"}},
    )
    summary = await run_once(settings, output=tmp_path / "out")
    assert summary.status == "complete"
    assert summary.accounts == len(sb.active_account_ids) == 4
    assert summary.jobs == len(sb.truth())

    without = make_settings(
        [], accounts={"partition": "aws-us-gov", "organizations": {"enabled": True}}
    )
    with pytest.raises(DiscoveryError, match="no valid hub credentials for partition aws-us-gov"):
        await run_once(without, output=tmp_path / "out")
