"""Scale benchmark: 10,000 accounts x 3 regions against the sandbox; peak RSS and wall time.

    python -m tests.scale_bench [--accounts 10000] [--regions us-east-1,eu-west-1,ap-southeast-2]
                                [--seed 1] [--limit-mb 1024] [--output DIR]

`--regions all` is every Snowball region, as `regions.names = ["all"]` reads it.

The sandbox runs as its own process (`tests.benchmarks.sandbox.SandboxProcess`), so its memory
and CPU are not ours. The aggregation runs in a fresh child process: Organizations discovery of
every account (`discover_accounts`, as `[accounts.organizations] enabled = true` does), then
`run_once` with the default limits. The child reports its wall time and its peak RSS
(`getrusage(RUSAGE_SELF).ru_maxrss`: the whole process, interpreter and imports included).
The parent checks the snapshot against the sandbox's truth (`GET /_sandbox/truth`, every
(account_id, job_id) exactly once) and prints one line of figures. Exit code 0 when the
snapshot is complete and equals the truth and the peak RSS stays under `--limit-mb`; else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from tests.benchmarks.sandbox import SandboxProcess

DEFAULT_REGIONS = "us-east-1,eu-west-1,ap-southeast-2"


# --- the child: one aggregation, measured ----------------------------------------------------


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        cache_logger_on_first_use=True,
    )
    from aiobotocore.session import AioSession

    from aggregator.accounts import discover_accounts
    from aggregator.config import AccountsSettings, settings_from_mapping
    from aggregator.service import run_once

    async def main() -> dict[str, Any]:
        started = time.perf_counter()
        accounts = await discover_accounts(
            AioSession(), AccountsSettings.model_validate({"organizations": {"enabled": True}})
        )
        discovered = time.perf_counter()
        settings = settings_from_mapping(
            {
                "accounts": {"ids": [a.account_id for a in accounts]},
                "regions": {"names": spec["regions"]},
            },
            source="<scale-bench>",
            env={},
        )
        summary = await run_once(settings, output=spec["output"])
        return {
            "discovery_s": discovered - started,
            "accounts": summary.accounts,
            "status": summary.status,
            "jobs": summary.jobs,
            "requests": summary.requests,
            "partitions": summary.partitions,
            "data_path": str(summary.data_path),
        }

    wall, cpu = time.perf_counter(), time.process_time()
    result = asyncio.run(main())
    result["wall_s"] = time.perf_counter() - wall
    result["cpu_s"] = time.process_time() - cpu
    result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


# --- the parent: sandbox process, child process, truth ---------------------------------------


def _keys(body: bytes) -> list[tuple[str, str]]:
    """(account_id, job_id) of every JSON line. Lines end with b"\\n" only: descriptions may
    hold U+2028 and friends, which `str.splitlines` would split on."""
    out = []
    for line in body.split(b"\n"):
        if line.strip():
            record = orjson.loads(line)
            out.append((record["account_id"], record["job_id"]))
    return out


def _child_env(sandbox_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SNOWBALL_"))}
    env.update(sandbox_env)
    env["AWS_CONFIG_FILE"] = os.devnull
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return env


def bench(args: argparse.Namespace) -> int:
    regions = [r.strip() for r in args.regions.split(",") if r.strip()]
    if regions == ["all"]:  # as `regions.names = ["all"]` reads it (the sandbox takes names)
        from aggregator.config import snowball_regions

        regions = list(snowball_regions())
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as scratch:
        output = args.output or str(Path(scratch) / "out")
        sandbox_args = [
            "--accounts",
            str(args.accounts),
            "--regions",
            ",".join(regions),
            "--seed",
            str(args.seed),
        ]
        with SandboxProcess(sandbox_args) as sandbox:
            spec = {"regions": regions, "output": output}
            child = subprocess.run(
                [sys.executable, "-m", "tests.scale_bench", "--child", orjson.dumps(spec).decode()],
                env=_child_env(sandbox.env),
                capture_output=True,
                text=True,
                check=False,
            )
            if child.returncode != 0:
                sys.stderr.write(child.stderr)
                print(f"scale: the aggregation process failed (exit code {child.returncode})")
                return 1
            result = orjson.loads(child.stdout.strip().splitlines()[-1])
            truth = _keys(sandbox.get("/_sandbox/truth"))
            served = orjson.loads(sandbox.get("/_sandbox/stats"))
        got = _keys(Path(result["data_path"]).read_bytes())
    exact = got == truth  # both sorted by (account_id, job_id)
    under = result["rss_mb"] < args.limit_mb
    complete = result["status"] == "complete"
    sandbox_requests = sum(served["requests"].values())
    print(
        f"scale: {result['accounts']} accounts x {len(regions)} regions: "
        f"wall {result['wall_s']:.1f} s (discovery {result['discovery_s']:.1f} s), "
        f"CPU {result['cpu_s']:.1f} s, peak RSS {result['rss_mb']:.0f} MB "
        f"(limit {args.limit_mb} MB), requests {result['requests']} "
        f"(+ discovery; sandbox served {sandbox_requests}, sandbox CPU "
        f"{served['cpu_seconds']:.0f} s), jobs {result['jobs']} "
        f"(truth {len(truth)}{', exact' if exact else ', MISMATCH'}), {result['status']}"
    )
    return 0 if exact and under and complete else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.scale_bench", description=__doc__)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--regions", default=DEFAULT_REGIONS)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--limit-mb", type=int, default=1024, help="peak RSS limit (1024)")
    parser.add_argument("--output", help="keep the snapshot here (default: a temporary folder)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        sys.stdout.write(orjson.dumps(_child(orjson.loads(args.child))).decode() + "\n")
        return 0
    return bench(args)


if __name__ == "__main__":
    raise SystemExit(main())
