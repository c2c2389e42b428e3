"""SigV4: AWS Signature Version 4 for the direct send path (see direct.py).

A header-signed SigV4 of one request, as the AWS General Reference specifies it and as
botocore's `SigV4Auth` computes it for JSON and CBOR RPC services (no `x-amz-content-sha256`
header; the path as sent is percent-encoded once more). What it signs: `host`, `x-amz-date`,
the session token when there is one, and every header the caller passes except `user-agent`
(botocore leaves that out too, because proxies rewrite it). The derived signing key is
cached per (secret, day, region, service), and the canonical request per header set as a
template of the date, token and payload hash (a client sends the same headers on every page),
so a page costs two SHA-256 digests, one HMAC and no sorting.

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
# 46,000 of them, each used for one chain's pages in a row. 16,384 keys are about 6 MB
# (measured), the cache's entries included; they live in memory only, like the credentials.
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
    amz_date = _AMZ_DATE % (now.year, now.month, now.day, now.hour, now.minute, now.second)
    day = amz_date[:8]
    payload = hashlib.sha256(body).hexdigest()
    prepared = _canonical_template(method, path, host, tuple(headers.items()), bool(token))
    if prepared is not None:
        template, names = prepared
        values = (amz_date, " ".join(token.split()), payload) if token else (amz_date, payload)
        canonical = template % values
    else:
        canonical, names = _canonical(method, path, host, headers, amz_date, token, payload)
    scope = f"{day}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        (_ALGORITHM, amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest())
    )
    key = _signing_key(secret_key, day, region, service)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    out = dict(headers)
    out["Host"] = host
    out["X-Amz-Date"] = amz_date
    if token:
        out["X-Amz-Security-Token"] = token
    out["Authorization"] = (
        f"{_ALGORITHM} Credential={access_key}/{scope}, "
        f"SignedHeaders={names}, Signature={signature}"
    )
    return out


_AMZ_DATE = "%04d%02d%02dT%02d%02d%02dZ"


def _canonical(
    method: str,
    path: str,
    host: str,
    headers: Mapping[str, str],
    amz_date: str,
    token: str | None,
    payload: str,
) -> tuple[str, str]:
    """The canonical request and its signed header names, from scratch."""
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
            payload,
        )
    )
    return canonical, names


_SLOTS = frozenset({"host", "x-amz-date", "x-amz-security-token"})


@functools.lru_cache(maxsize=1024)
def _canonical_template(
    method: str, path: str, host: str, headers: tuple[tuple[str, str], ...], with_token: bool
) -> tuple[str, str] | None:
    """`_canonical` as a %-template of (date, [token,] payload hash), with the signed header
    names: one client's headers are the same for every page, so they are sorted and trimmed
    once. None when a header could collide with the ones the signer adds (then `_canonical`
    does it from scratch)."""
    if any(name.lower() in _SLOTS for name, _ in headers):
        return None
    entries = [
        (name.lower(), " ".join(value.split()))
        for name, value in headers
        if name.lower() not in _UNSIGNED
    ]
    entries.append(("host", " ".join(host.split())))
    slots = ["x-amz-date", *(["x-amz-security-token"] if with_token else [])]
    items: list[tuple[str, str | None]] = [*entries, *((name, None) for name in slots)]
    items.sort(key=lambda item: (item[0], item[1] or ""))  # as `_canonical` sorts them
    lines = [
        f"{name}:%s" if value is None else f"{name}:{value}".replace("%", "%%")
        for name, value in items
    ]
    names = ";".join(name for name, _ in items)
    template = "\n".join(
        (
            method.replace("%", "%%"),
            quote(path or "/", safe="/~").replace("%", "%%"),
            "",  # RPC services carry everything in the body: no query string
            *lines,
            "",
            names.replace("%", "%%"),
            "%s",  # the payload's sha256
        )
    )
    return template, names
