"""One (scenario, tool) run in a fresh process, so that peak RSS and CPU are its own.

`python -m tests.benchmarks.child SPEC_JSON` with the sandbox's variables in the environment;
prints one JSON line: wall and CPU seconds of the run, peak RSS, and where the output went.
Tools: `ours` (run_once), `ours-warm` (two cycles of one open Aggregator, as the daemon runs
them, the second timed: a daemon's steady state, with the clients and credentials of the first
cycle and a plan ordered by its manifest), `botocore-send`
(run_once with direct=False: every optimisation but the direct send path), `stock` (run_once
with stock=True), `user` (the boto3 script),
`floor` (raw aiohttp + orjson), `snapshot` (snapshot_bench: the store's first and steady-state
writes of 1,000,000 records).
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import structlog

ROLE_NAME = "SnowballInventoryReader"


def _quiet() -> None:
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR),
        cache_logger_on_first_use=True,
    )


def _settings(spec: dict[str, Any]) -> Any:
    from aggregator.config import settings_from_mapping

    return settings_from_mapping(
        {
            "accounts": {"ids": spec["accounts"], "role_name": ROLE_NAME},
            "regions": {"names": spec["regions"]},
            "limits": {
                "max_concurrency": spec["max_concurrency"],
                "requests_per_second": spec["requests_per_second"],
                "timeout_seconds": 60,
            },
        },
        source="<bench>",
        env={},
    )


def _ours(spec: dict[str, Any], *, stock: bool, direct: bool = True) -> dict[str, Any]:
    from aggregator.service import run_once

    settings = _settings(spec)
    summary = asyncio.run(run_once(settings, stock=stock, direct=direct, output=spec["output"]))
    return {"data_path": str(summary.data_path), "status": summary.status}


def _ours_warm(spec: dict[str, Any], clock: dict[str, float]) -> dict[str, Any]:
    """The daemon's second cycle: the first cycle untimed, then the clock, then the next."""
    from aggregator.service import Aggregator

    settings = _settings(spec)

    async def main() -> dict[str, Any]:
        async with Aggregator(settings, output=spec["output"]) as aggregator:
            await aggregator.cycle()
            await asyncio.sleep(1.1)  # a daemon's interval: the sandbox's token buckets refill
            before = await asyncio.to_thread(_sandbox_stats)
            clock["wall"], clock["cpu"] = time.perf_counter(), time.process_time()
            summary = await aggregator.cycle()
        return {
            "data_path": str(summary.data_path),
            "status": summary.status,
            "sandbox_before": before,
        }

    return asyncio.run(main())


def _user(spec: dict[str, Any]) -> dict[str, Any]:
    from .userscript import run

    regions = spec["regions"]
    if regions == ["all"]:
        import boto3

        regions = boto3.session.Session().get_available_regions("snowball")
    path = Path(spec["output"]) / "user.jsonl"
    run(spec["accounts"], regions, path, role_name=ROLE_NAME, workers=spec["threads"])
    return {"data_path": str(path), "status": "complete"}


def _floor(spec: dict[str, Any], clock: dict[str, float]) -> dict[str, Any]:
    from aggregator.config import snowball_regions

    from .floor import Floor

    regions = list(snowball_regions()) if spec["regions"] == ["all"] else spec["regions"]

    async def main() -> dict[str, Any]:
        async with Floor(
            url=os.environ["AWS_ENDPOINT_URL"],
            hub_keys=(os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]),
            role_name=ROLE_NAME,
            max_concurrency=spec["max_concurrency"],
            requests_per_second=spec["requests_per_second"],
        ) as floor:
            account_id, region, n = spec["calibrate"]
            rtt = max(0.0, await floor.round_trip(account_id, region, n) - spec["latency"])
            await asyncio.sleep(1.1)  # let the sandbox's token bucket refill
            floor.requests = 0
            clock["wall"], clock["cpu"] = time.perf_counter(), time.process_time()
            await floor.run(spec["accounts"], regions)
            return {
                "round_trip": rtt,
                "jobs": len(floor.jobs),
                "tool_requests": floor.requests,
                "tool_pages": floor.pages,
                "status": "complete",
            }

    return asyncio.run(main())


def _sandbox_stats() -> dict[str, Any]:
    """The sandbox's counters (`/_sandbox/stats` at the endpoint the tools use)."""
    import urllib.request

    with urllib.request.urlopen(os.environ["AWS_ENDPOINT_URL"] + "/_sandbox/stats") as response:
        stats: dict[str, Any] = orjson.loads(response.read())
        return stats


def _preload(tool: str) -> None:
    """Import what the tool needs before the clock starts: interpreter start and module
    imports are not part of any tool's run (they cost the same every run)."""
    if tool in ("ours", "ours-warm", "stock", "botocore-send"):
        import aggregator.config
        import aggregator.service
    elif tool == "user":
        import boto3  # noqa: F401
    elif tool == "floor":
        import aiohttp  # noqa: F401

        import aggregator.config  # noqa: F401

        from . import floor  # noqa: F401


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM). ru_maxrss would do, except that Linux carries
    it over from the parent across fork and exec, so a child would report its parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str]) -> int:
    spec: dict[str, Any] = orjson.loads(argv[0])
    _quiet()
    tool = spec["tool"]
    Path(spec["output"]).mkdir(parents=True, exist_ok=True)
    clock: dict[str, float] = {}
    if tool == "snapshot":
        from .snapshot_bench import run

        # Its own clock: the previous snapshot and the records are prepared untimed.
        bench = run(spec["records"], Path(spec["output"]))
        result: dict[str, Any] = {"jobs": bench["records"], "status": "complete", **bench}
        result["rss_mb"] = peak_rss_mb()
        sys.stdout.write(orjson.dumps(result).decode() + "\n")
        return 0
    _preload(tool)
    clock["wall"], clock["cpu"] = time.perf_counter(), time.process_time()
    if tool == "ours-warm":
        result = _ours_warm(spec, clock)
    elif tool in ("ours", "stock", "botocore-send"):
        result = _ours(spec, stock=tool == "stock", direct=tool == "ours")
    elif tool == "user":
        result = _user(spec)
    elif tool == "floor":
        result = _floor(spec, clock)
    else:
        raise SystemExit(f"unknown tool {tool!r}")
    result["wall"] = time.perf_counter() - clock["wall"]
    result["cpu"] = time.process_time() - clock["cpu"]
    result["rss_mb"] = peak_rss_mb()
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
