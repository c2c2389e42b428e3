"""GC policy of a cycle: collect young objects rarely, and never rescan the long-lived heap.

A cycle allocates millions of short-lived objects (requests, pages, entries, records), almost
none of them in reference cycles, while the process holds a large long-lived heap (botocore's
endpoint data and models, clients, credentials). With CPython's default thresholds a young
collection runs every 700 allocations and older ones rescan that heap: measured on the
latency-bound benchmark (200 accounts x every region), 1.0 s of a 4.0 s CPU cycle went to the
collector, which then found about 400 unreachable objects.

So, for the length of a cycle, `cycle_gc()` moves everything alive at its start to the
permanent generation (`gc.freeze()`, the CPython idiom for long-lived heaps) and raises the
young threshold to 100,000 allocations. The collector still runs, so cyclic garbage (failed
requests' tracebacks, say) stays bounded. On leaving, the thresholds are restored and the
frozen objects are handed back to the collector, so nothing frozen outlives the cycle; the
daemon runs a full collection between cycles (service.run_forever), which finds the garbage
cycles made before a cycle (frozen with the rest while it ran).
Reentrant: nested or concurrent cycles in one process change the settings once. A process
that froze its own heap before (a pre-fork server, say) keeps it frozen: the policy then only
raises the threshold, since unfreezing would undo the host's freeze too.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

__all__ = ["YOUNG_THRESHOLD", "cycle_gc"]

YOUNG_THRESHOLD = 100_000

_depth = 0
_saved: tuple[int, int, int] | None = None
_froze = False


@contextlib.contextmanager
def cycle_gc(young: int = YOUNG_THRESHOLD) -> Iterator[None]:
    """Freeze the heap and raise the young-generation threshold while the block runs."""
    global _depth, _saved, _froze
    if _depth == 0:
        _saved = gc.get_threshold()
        _froze = gc.get_freeze_count() == 0
        if _froze:
            gc.freeze()
        gc.set_threshold(max(young, _saved[0]), _saved[1], _saved[2])
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0 and _saved is not None:
            gc.set_threshold(*_saved)
            _saved = None
            if _froze:
                gc.unfreeze()
