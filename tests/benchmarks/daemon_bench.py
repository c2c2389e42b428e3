"""Daemon benchmark: does memory stay flat from one cycle to the next?

    python -m tests.benchmarks.daemon_bench [--accounts 2000] [--cycles 12] [--warmup 3]
        [--regions us-east-1,eu-west-1,ap-southeast-2] [--max-jobs 2500] [--seed 3]

A daemon keeps its clients, credentials, connections and the lines of its last snapshot from
one cycle to the next (clients.py, credentials.py, snapshot.py's `remember`), so what it holds
must be bounded: a daemon that runs for months must not grow with the number of cycles. This
runs one `Aggregator` (as `snowball-aggregator daemon` does, without the interval's wait) for
`--cycles` cycles against a sandbox in its own process, and after each cycle records the
resident set (VmRSS, after a full collection, as the daemon does between cycles), the open file
descriptors and the threads; the aggregator has the daemon's observers (metrics, health).
The first cycles fill the caches (clients, signing keys, the previous snapshot's lines), so the
comparison starts at `--warmup` (3): the target is that no later cycle's resident set exceeds
that cycle's by more than 5% (or 10 MB, whichever is larger), and that descriptors and threads
do not grow at all after it. Every cycle's snapshot must be complete
with the sandbox's number of jobs.

Prints one line per cycle and a verdict; exit code 0 when the targets hold, else 1.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from .sandbox import SandboxProcess

__all__ = ["main"]

GROWTH_SHARE = 0.05
GROWTH_FLOOR_MB = 10.0


def _vm(field: str) -> float:
    """This process's `field` of /proc/self/status (VmRSS, VmHWM), in MB."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(spec: dict[str, Any]) -> None:
    """The daemon's cycles, one JSON line of figures per cycle on stdout."""
    import structlog

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        cache_logger_on_first_use=True,
    )
    from aggregator.config import settings_from_mapping
    from aggregator.health import HealthState
    from aggregator.metrics import Metrics
    from aggregator.service import Aggregator

    settings = settings_from_mapping(
        {
            "accounts": {"ids": spec["accounts"]},
            "regions": {"names": spec["regions"]},
            "limits": {"requests_per_second": 1000.0},
            "output": {"retain": 4},
        },
        source="<daemon-bench>",
        env={},
    )

    async def main() -> None:
        # With the daemon's observers: its metrics and health state live as long as it does.
        observers = [Metrics(), HealthState(interval=settings.daemon.interval)]
        async with Aggregator(settings, output=spec["output"], observers=observers) as aggregator:
            for cycle in range(1, spec["cycles"] + 1):
                wall, cpu = time.perf_counter(), time.process_time()
                summary = await aggregator.cycle()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                gc.collect()  # as run_forever does between cycles
                figures = {
                    "cycle": cycle,
                    "status": summary.status,
                    "jobs": summary.jobs,
                    "requests": summary.requests,
                    "wall_s": round(wall, 3),
                    "cpu_s": round(cpu, 3),
                    "rss_mb": round(_vm("VmRSS"), 1),
                    "fds": len(os.listdir("/proc/self/fd")),
                    "threads": threading.active_count(),
                }
                sys.stdout.write(orjson.dumps(figures).decode() + "\n")
                sys.stdout.flush()

    asyncio.run(main())


def _env(sandbox_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "SNOWBALL_"))}
    env.update(sandbox_env)
    env["AWS_CONFIG_FILE"] = env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    return env


def verdict(rows: list[dict[str, Any]], warmup: int, truth: int) -> tuple[bool, list[str]]:
    """Whether the figures meet the targets (see the module docstring), and why, line by
    line."""
    base, after = rows[warmup - 1], rows[warmup - 1 :]
    top = max(after, key=lambda r: r["rss_mb"])
    growth = top["rss_mb"] - base["rss_mb"]
    allowed = max(GROWTH_FLOOR_MB, GROWTH_SHARE * base["rss_mb"])
    checks = [
        (
            growth <= allowed,
            f"resident set at most {top['rss_mb']:.1f} MB (cycle {top['cycle']}) vs "
            f"{base['rss_mb']:.1f} MB after cycle {base['cycle']}: {growth:+.1f} MB "
            f"(allowed {allowed:.1f} MB); after the last cycle {rows[-1]['rss_mb']:.1f} MB",
        ),
        (
            max(r["fds"] for r in rows[warmup - 1 :]) <= base["fds"],
            f"open descriptors {base['fds']} after cycle {base['cycle']}, at most "
            f"{max(r['fds'] for r in rows[warmup - 1 :])} after",
        ),
        (
            max(r["threads"] for r in rows[warmup - 1 :]) <= base["threads"],
            f"threads {base['threads']} after cycle {base['cycle']}, at most "
            f"{max(r['threads'] for r in rows[warmup - 1 :])} after",
        ),
        (
            all(r["status"] == "complete" and r["jobs"] == truth for r in rows),
            f"every cycle complete with the sandbox's {truth:,} jobs",
        ),
    ]
    return all(ok for ok, _ in checks), [
        f"  [{'PASS' if ok else 'FAIL'}] {text}" for ok, text in checks
    ]


def bench(args: argparse.Namespace) -> int:
    regions = [r.strip() for r in args.regions.split(",") if r.strip()]
    accounts = [str(200_000_000_000 + i) for i in range(args.accounts)]
    sandbox_args = ["--accounts", str(args.accounts), "--seed", str(args.seed)]
    sandbox_args += ["--max-jobs", str(args.max_jobs), "--regions", ",".join(regions)]
    with tempfile.TemporaryDirectory(prefix="daemon-bench-") as scratch:
        spec = {
            "accounts": accounts,
            "regions": regions,
            "cycles": args.cycles,
            "output": str(Path(scratch) / "out"),
        }
        with SandboxProcess(sandbox_args) as sandbox:
            truth = sum(1 for line in sandbox.get("/_sandbox/truth").split(b"\n") if line.strip())
            print(
                f"daemon: {args.accounts} accounts x {len(regions)} regions, {truth:,} jobs, "
                f"{args.cycles} cycles of one Aggregator"
            )
            print("cycle  wall s  CPU s  requests  jobs      RSS MB  fds  threads")
            child = subprocess.Popen(
                [sys.executable, "-m", "tests.benchmarks.daemon_bench", "--child"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=_env(sandbox.env),
                text=True,
            )
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(orjson.dumps(spec).decode())
            child.stdin.close()
            rows: list[dict[str, Any]] = []
            for line in child.stdout:
                row = orjson.loads(line)
                rows.append(row)
                print(
                    f"{row['cycle']:>5}  {row['wall_s']:>6.2f}  {row['cpu_s']:>5.2f}  "
                    f"{row['requests']:>8}  {row['jobs']:<8}  {row['rss_mb']:>6.1f}  "
                    f"{row['fds']:>3}  {row['threads']:>7}",
                    flush=True,
                )
            if child.wait() != 0 or len(rows) != args.cycles:
                print(f"daemon: the aggregation process failed (exit code {child.returncode})")
                return 1
    ok, lines = verdict(rows, args.warmup, truth)
    print("targets:")
    print("\n".join(lines))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks.daemon_bench")
    parser.add_argument("--accounts", type=int, default=2000)
    parser.add_argument("--regions", default="us-east-1,eu-west-1,ap-southeast-2")
    parser.add_argument("--cycles", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="cycles that fill the caches")
    parser.add_argument("--max-jobs", type=int, default=2500, help="per account (sandbox)")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(orjson.loads(sys.stdin.read()))
        return 0
    if not 1 <= args.warmup <= args.cycles:
        parser.error("--warmup must be between 1 and --cycles")
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
