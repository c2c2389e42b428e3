"""SigV4: AWS Signature Version 4 for the direct send path (see direct.py).

A header-signed SigV4 of one request, as the AWS General Reference specifies it and as
botocore's `SigV4Auth` computes it for JSON and CBOR RPC services (no `x-amz-content-sha256`
header; the path as sent is percent-encoded once more). What it signs: `host`, `x-amz-date`,
the session token when there is one, and every header the caller passes except `user-agent`
(botocore leaves that out too, because proxies rewrite it). The derived signing key is
cached per (secret, day, region, service), so a page costs two SHA-256 digests and one HMAC.

`tests/test_direct.py` checks the result against botocore's `SigV4Auth` for the same request
and instant, and the sandbox verifies every signature it receives.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime
from urllib.parse import quote

__all__ = ["sign"]

_ALGORITHM = "AWS4-HMAC-SHA256"
_UNSIGNED = frozenset({"user-agent", "expect", "x-amzn-trace-id", "authorization"})
# Keys are per (account keys, day, region): a cycle over 2,000 accounts x 23 regions needs
# 46,000 of them, each used for one chain's pages in a row. 16,384 keys are about 3 MB.
_KEY_CACHE_SIZE = 16_384


@functools.lru_cache(maxsize=_KEY_CACHE_SIZE)
def _signing_key(secret_key: str, day: str, region: str, service: str) -> bytes:
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return key


def sign(
    *,
    method: str,
    host: str,
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    access_key: str,
    secret_key: str,
    token: str | None,
    region: str,
    service: str,
    now: datetime,
) -> dict[str, str]:
    """The headers to send: `headers` plus `Host`, `X-Amz-Date`, `X-Amz-Security-Token` (with
    a token) and `Authorization`. `now` must be UTC; `path` as it goes on the wire."""
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    out = dict(headers)
    out["Host"] = host
    out["X-Amz-Date"] = amz_date
    if token:
        out["X-Amz-Security-Token"] = token
    signed = sorted(
        (name.lower(), " ".join(value.split()))
        for name, value in out.items()
        if name.lower() not in _UNSIGNED
    )
    names = ";".join(name for name, _ in signed)
    canonical = "\n".join(
        (
            method,
            quote(path or "/", safe="/~"),
            "",  # RPC services carry everything in the body: no query string
            *(f"{name}:{value}" for name, value in signed),
            "",
            names,
            hashlib.sha256(body).hexdigest(),
        )
    )
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        (_ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest())
    )
    key = _signing_key(secret_key, day, region, service)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out["Authorization"] = (
        f"{_ALGORITHM} Credential={access_key}/{scope}, "
        f"SignedHeaders={names}, Signature={signature}"
    )
    return out
