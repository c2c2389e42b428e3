"""The sandbox in its own process, for benchmarks.

`python -m tests.benchmarks.sandbox [options]` serves `aggregator.sandbox.Sandbox` like the
`snowball-aggregator sandbox` command (same `export ...` lines, same ready line) and adds what
the scenarios need beyond that command: `--job ACCOUNT:REGION:N` fixes a list's size.
`SandboxProcess` starts it, reads the environment it announces and talks to its admin routes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from types import TracebackType
from typing import Any

from aggregator.sandbox import Faults, FleetSpec, Sandbox
from aggregator.sandbox.command import READY_PREFIX

__all__ = ["SandboxProcess", "main"]


def _job(text: str) -> tuple[tuple[str, str], int]:
    account_id, region, count = text.split(":")
    return (account_id, region), int(count)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.sandbox")
    parser.add_argument("--accounts", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-jobs", type=int, default=2500)
    parser.add_argument("--regions", default=None, help="comma-separated (default: all)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per ListJobs")
    parser.add_argument("--throttle-rps", type=float, default=None, help="per account-region")
    parser.add_argument("--job", type=_job, action="append", default=[], help="ACCOUNT:REGION:N")
    return parser


async def _serve(sandbox: Sandbox) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with sandbox:
        for name, value in sandbox.env().items():
            print(f"export {name}={shlex.quote(value)}")
        print(f"{READY_PREFIX}{sandbox.url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    regions = tuple(args.regions.split(",")) if args.regions else None
    fleet = FleetSpec(
        accounts=args.accounts,
        seed=args.seed,
        regions=regions,
        max_jobs=args.max_jobs,
        jobs=dict(args.job),
    )
    faults = Faults(latency=args.latency, throttle_rps=args.throttle_rps)
    asyncio.run(_serve(Sandbox(fleet=fleet, faults=faults)))
    return 0


class SandboxProcess:
    """A sandbox subprocess; a context manager that stops it on exit.

    `args` are `python -m tests.benchmarks.sandbox` options. After entering, `env` holds the
    variables it announced (endpoint and hub keys) and `url` its address.
    """

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.env: dict[str, str] = {}
        self.url = ""
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> SandboxProcess:
        process = subprocess.Popen(
            [sys.executable, "-m", "tests.benchmarks.sandbox", *self.args],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._process = process
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("export "):
                name, _, value = line[len("export ") :].strip().partition("=")
                self.env[name] = shlex.split(value)[0]
            elif line.startswith(READY_PREFIX):
                self.url = line[len(READY_PREFIX) :].strip()
                break
        if not self.url:
            process.kill()
            raise RuntimeError(f"the sandbox did not start: exit code {process.wait()}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        process, self._process = self._process, None
        if process is not None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _get(self, path: str) -> Any:
        return urllib.request.urlopen(self.url + path, timeout=600)

    def get(self, path: str) -> bytes:
        """The whole body of `GET path` (an admin route such as `/_sandbox/truth`)."""
        with self._get(path) as response:
            body: bytes = response.read()
            return body

    def stats(self) -> dict[str, Any]:
        """`GET /_sandbox/stats` (cumulative since start; `cpu_seconds` of the process)."""
        with self._get("/_sandbox/stats") as response:
            stats: dict[str, Any] = json.loads(response.read())
            return stats

    def truth(self) -> Iterator[dict[str, Any]]:
        """`GET /_sandbox/truth`, streamed: records sorted by (account_id, job_id)."""
        with self._get("/_sandbox/truth") as response:
            for line in response:
                if line.strip():
                    yield json.loads(line)


if __name__ == "__main__":
    raise SystemExit(main())
