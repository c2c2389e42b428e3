"""Child process for test_crash.py: one aggregation that SIGKILLs itself at a chosen point.

Usage: python -m tests.crash_child OUTPUT_DIR ACCOUNTS_JSON POINT
POINT is `fsync:N` (die just before the Nth os.fsync), `replace-before:N` / `replace-after:N`
(die just before / just after the Nth os.replace), or `none`. The hooks wrap the standard
library in this child only; nothing of botocore is touched.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import orjson

from aggregator.config import settings_from_mapping
from aggregator.service import run_once


def _hook(name: str, n: int, after: bool) -> None:
    original: Callable[..., Any] = getattr(os, name)
    calls = 0

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == n and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls == n and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(os, name, wrapped)


def main() -> None:
    output, accounts, point = sys.argv[1], orjson.loads(sys.argv[2]), sys.argv[3]
    if point != "none":
        kind, n = point.split(":")
        name = "fsync" if kind == "fsync" else "replace"
        _hook(name, int(n), after=kind == "replace-after")
    settings = settings_from_mapping(
        {
            "accounts": {"ids": accounts},
            "regions": {"names": ["us-east-1", "eu-west-1"]},
            "limits": {"requests_per_second": 1000.0},
        },
        source="<crash-child>",
        env={},
    )
    summary = asyncio.run(run_once(settings, output=output))
    print(summary.snapshot_id)


if __name__ == "__main__":
    main()
