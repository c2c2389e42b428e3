"""Retries: how many attempts a call gets and how long to wait between them.

botocore's own retries are switched off on every client we create (`total_max_attempts = 1`),
so `limits.max_attempts` is the whole budget of one call: 8 means at most 8 HTTP requests for
that page, never 8 x botocore's 5. Waits are exponential with full jitter (a uniform draw from
0 to min(cap, base x 2^(attempt - 1))), which spreads retries of many partitions apart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["RetryPolicy"]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Keyword options, defaults: `max_attempts=8`, `base_delay=0.25` s, `max_delay=20.0` s.

    `max_restarts=3` bounds how often one partition restarts from its first page after
    InvalidNextTokenException. `partition_deadline=None` (seconds) bounds one partition's
    total time, retries included.
    """

    max_attempts: int = 8
    base_delay: float = 0.25
    max_delay: float = 20.0
    max_restarts: int = 3
    partition_deadline: float | None = None

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based): full jitter."""
        ceiling = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return rng.uniform(0.0, ceiling)
