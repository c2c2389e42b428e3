"""Crash safety: SIGKILL at any point leaves LATEST on a complete, checksummed snapshot."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson

from .conftest import SandboxFactory

ROOT = Path(__file__).resolve().parent.parent


def check_output_dir(output: Path) -> str:
    """Assert LATEST names a complete snapshot and no final-named file is torn; return LATEST."""
    latest = (output / "LATEST").read_text().strip()
    manifest = orjson.loads((output / latest).read_bytes())
    data = (output / manifest["data"]["path"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == manifest["data"]["sha256"]
    assert len(data.split(b"\n")) - 1 == manifest["data"]["records"]
    for path in output.rglob("*.manifest.json"):
        other = orjson.loads(path.read_bytes())  # a torn manifest would not parse
        body = (output / other["data"]["path"]).read_bytes()
        assert hashlib.sha256(body).hexdigest() == other["data"]["sha256"], path
    for path in output.rglob("*.jsonl"):
        for line in path.read_bytes().split(b"\n")[:-1]:
            orjson.loads(line)  # every line of a visible data file is whole
        assert path.read_bytes().endswith(b"\n")
    return latest


def run_child(output: Path, accounts: list[str], point: str, env: dict[str, str]) -> int:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.crash_child", str(output), orjson.dumps(accounts), point],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode in (0, -signal.SIGKILL), proc.stderr.decode()[-2000:]
    return proc.returncode


async def test_sigkill_at_every_write_step_keeps_latest_complete(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Kill the writer before every fsync and around every rename; LATEST stays consistent."""
    sb = await make_sandbox(accounts=4, seed=41, jobs={("200000000000", "eu-west-1"): 3000})
    accounts = list(sb.account_ids)
    env = {k: v for k, v in os.environ.items()}
    output = tmp_path / "out"
    assert await asyncio.to_thread(run_child, output, accounts, "none", env) == 0
    first = check_output_dir(output)
    points: list[str] = []
    for kind in ("fsync", "replace-before", "replace-after"):
        n = 1
        while True:
            sb.add_job(accounts[1], "eu-west-1", description=f"{kind}-{n}")  # a new snapshot
            code = await asyncio.to_thread(run_child, output, accounts, f"{kind}:{n}", env)
            latest = check_output_dir(output)
            if code == 0:
                break  # past the last call of that kind: the run completed
            points.append(f"{kind}:{n}")
            n += 1
            assert n < 30
    assert len(points) >= 9  # at least data, manifest and LATEST at each of three points
    assert latest != first  # the last, unkilled run moved LATEST forward


async def test_sigkill_during_fetch_leaves_previous_snapshot(
    make_sandbox: SandboxFactory, tmp_path: Path
) -> None:
    """Killing a run mid-fetch leaves the previous snapshot as LATEST, untouched."""
    from aggregator.sandbox import Faults

    sb = await make_sandbox(accounts=3, seed=42)
    accounts = list(sb.account_ids)
    env = {k: v for k, v in os.environ.items()}
    output = tmp_path / "out"
    assert await asyncio.to_thread(run_child, output, accounts, "none", env) == 0
    before = check_output_dir(output)
    sb.faults = Faults(latency=2.0)
    asked = sb.stats().requests.get("snowball:ListJobs", 0)

    def list_jobs_requests() -> int:
        with urllib.request.urlopen(f"{sb.url}/_sandbox/stats", timeout=5) as answer:
            return int(orjson.loads(answer.read())["requests"].get("snowball:ListJobs", 0))

    def killed_mid_fetch() -> int:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.crash_child",
                str(output),
                orjson.dumps(accounts),
                "none",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # Kill once the child's first ListJobs has reached the sandbox (answers take 2 s),
        # however long its start took on a loaded machine.
        deadline = time.monotonic() + 60
        while list_jobs_requests() == asked and proc.poll() is None:
            assert time.monotonic() < deadline, "the child never asked for a page"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=30)

    assert await asyncio.to_thread(killed_mid_fetch) == -signal.SIGKILL
    assert sb.stats().total_requests > 0  # it really was fetching
    assert check_output_dir(output) == before
