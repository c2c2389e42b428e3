"""Fault injection: what can go wrong between a client and the fake AWS, and how often.

``Faults`` is a value; a live ``Sandbox`` swaps it at runtime (``sb.faults = replace(...)``),
so a test can break one partition on a second run. Random faults draw from the sandbox's
seeded RNG; throttling is a token bucket per (account, region) on the sandbox clock.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = ["FaultKind", "Faults", "TokenBucket"]


class FaultKind(enum.StrEnum):
    """A randomly injected failure of one request."""

    HTTP_500 = "500"
    HTTP_503 = "503"
    RESET = "reset"
    HANG = "hang"
    TRUNCATED = "truncated"
    MALFORMED = "malformed"
    GATEWAY = "gateway"


@dataclass(frozen=True, slots=True, kw_only=True)
class Faults:
    """Failures the sandbox injects; all off by default.

    Random faults apply to Snowball ListJobs, one draw per request (their probabilities must
    add up to at most 1). Options (all keyword-only):
      p_500: answer ``InternalFailure`` (HTTP 500).
      p_503: answer ``ServiceUnavailable`` (HTTP 503).
      p_reset: abort the connection (TCP RST) without a response.
      p_hang: hold the request for ``hang_seconds`` (default 30), then close the connection
        without a response; the wait ends early when the sandbox closes.
      p_truncated: a 200 whose Content-Length exceeds the body, then close.
      p_malformed: a 200 whose body is not valid JSON / CBOR.
      p_gateway: a 502 whose body is JSON but no object (``null``), as a gateway in front of
        the service may answer.
      throttle_rps: token-bucket refill rate per (account, region); None (default) = off.
        Requests over it answer ``ThrottlingException``.
      throttle_burst: bucket size (default None = max(1, ceil(throttle_rps))).
      latency: seconds added to every ListJobs response (default 0).
      token_ttl: NextTokens older than this (sandbox clock) are rejected with
        ``InvalidNextTokenException``; None (default) = never.
      credential_ttl: real lifetime of AssumeRole credentials (sandbox clock); once past it a
        call answers ``ExpiredTokenException`` (STS: ``ExpiredToken``). None (default) =
        never. Checked at use, so changing it affects credentials already issued.
      advertised_credential_ttl: what AssumeRole's Expiration says, in seconds from now
        (default 3600; DurationSeconds, when sent and shorter, wins). Keep it above
        ``credential_ttl`` to model revocation or clock skew.
      churn: probability that a ListJobs request carrying a NextToken finds its list changed
        (a job added or a job's state moved), which invalidates the token.
      churn_max: at most this many churn changes per list (default 3), so runs terminate.
      deny_assume_role: account ids whose AssumeRole answers ``AccessDenied``.
      deny_list_jobs: account ids whose ListJobs answers ``AccessDeniedException``.
      echo_tokens: those denials quote the request's session token back, whole and its first
        40 characters, in words no pattern knows (as a careless service or proxy might).
      disabled_regions: account id -> opt-in regions it has not enabled; ListJobs there
        answers 403 ``UnrecognizedClientException`` as real AWS does.
      p_sts_500: STS answers ``InternalFailure`` (HTTP 500).
      p_sts_reset: STS aborts the connection.
      looping_tokens: account ids whose ListJobs, asked for a later page, answers it with the
        NextToken it was given (a service stuck on one page: the chain never ends).
      assume_role_without_credentials: account ids whose AssumeRole answers 200 with no
        ``Credentials`` element.
      torn_account_pages: how many Organizations ListAccounts requests for a later page (with
        a NextToken) answer 200 with the body cut in half, the first ones.
    """

    p_500: float = 0.0
    p_503: float = 0.0
    p_reset: float = 0.0
    p_hang: float = 0.0
    hang_seconds: float = 30.0
    p_truncated: float = 0.0
    p_malformed: float = 0.0
    p_gateway: float = 0.0
    throttle_rps: float | None = None
    throttle_burst: int | None = None
    latency: float = 0.0
    token_ttl: float | None = None
    credential_ttl: float | None = None
    advertised_credential_ttl: float = 3600.0
    churn: float = 0.0
    churn_max: int = 3
    deny_assume_role: frozenset[str] = frozenset()
    deny_list_jobs: frozenset[str] = frozenset()
    echo_tokens: bool = False
    disabled_regions: Mapping[str, frozenset[str]] = field(default_factory=dict)
    p_sts_500: float = 0.0
    p_sts_reset: float = 0.0
    looping_tokens: frozenset[str] = frozenset()
    assume_role_without_credentials: frozenset[str] = frozenset()
    torn_account_pages: int = 0

    def __post_init__(self) -> None:
        for name in (
            "p_500",
            "p_503",
            "p_reset",
            "p_hang",
            "p_truncated",
            "p_malformed",
            "p_gateway",
            "churn",
            "p_sts_500",
            "p_sts_reset",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if self._random_total() > 1.0 + 1e-9:
            raise ValueError(
                "p_500 + p_503 + p_reset + p_hang + p_truncated + p_malformed + p_gateway > 1"
            )
        if self.p_sts_500 + self.p_sts_reset > 1.0 + 1e-9:
            raise ValueError("p_sts_500 + p_sts_reset > 1")
        if self.throttle_rps is not None and self.throttle_rps <= 0:
            raise ValueError(f"throttle_rps must be > 0, got {self.throttle_rps}")
        if self.throttle_burst is not None and self.throttle_burst < 1:
            raise ValueError(f"throttle_burst must be >= 1, got {self.throttle_burst}")
        for name in ("latency", "hang_seconds", "advertised_credential_ttl"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("token_ttl", "credential_ttl"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None")
        if self.churn_max < 0:
            raise ValueError(f"churn_max must be >= 0, got {self.churn_max}")

    def _random_total(self) -> float:
        return (
            self.p_500
            + self.p_503
            + self.p_reset
            + self.p_hang
            + self.p_truncated
            + self.p_malformed
            + self.p_gateway
        )

    @property
    def burst(self) -> int:
        """The effective throttle bucket size."""
        if self.throttle_burst is not None:
            return self.throttle_burst
        return max(1, math.ceil(self.throttle_rps or 1.0))

    def draw(self, rng: random.Random) -> FaultKind | None:
        """The random fault for one ListJobs request, if any."""
        if self._random_total() == 0.0:
            return None
        u = rng.random()
        for kind, p in (
            (FaultKind.HTTP_500, self.p_500),
            (FaultKind.HTTP_503, self.p_503),
            (FaultKind.RESET, self.p_reset),
            (FaultKind.HANG, self.p_hang),
            (FaultKind.TRUNCATED, self.p_truncated),
            (FaultKind.MALFORMED, self.p_malformed),
            (FaultKind.GATEWAY, self.p_gateway),
        ):
            if u < p:
                return kind
            u -= p
        return None

    def draw_sts(self, rng: random.Random) -> FaultKind | None:
        """The random fault for one STS request, if any."""
        if self.p_sts_500 == 0.0 and self.p_sts_reset == 0.0:
            return None
        u = rng.random()
        if u < self.p_sts_500:
            return FaultKind.HTTP_500
        if u < self.p_sts_500 + self.p_sts_reset:
            return FaultKind.RESET
        return None


class TokenBucket:
    """A token bucket on an external clock: ``take`` spends one token if there is one."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, now: float, burst: int) -> None:
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float, rate: float, burst: int) -> bool:
        tokens = min(float(burst), self.tokens + max(0.0, now - self.stamp) * rate)
        self.stamp = max(self.stamp, now)
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False
