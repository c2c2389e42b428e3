"""AWS Signature Version 4, the verifying side: pure computation, no I/O.

The sandbox recomputes the signature of every request it serves from what it received, as AWS
does (IAM User Guide, "Create a signed AWS API request"; botocore ``auth.SigV4Auth`` is the
reference the tests compare with)::

    CanonicalRequest = Method \\n CanonicalURI \\n CanonicalQueryString \\n
                       CanonicalHeaders \\n SignedHeaders \\n HashedPayload
    StringToSign     = "AWS4-HMAC-SHA256" \\n X-Amz-Date \\n Date/Region/Service/aws4_request \\n
                       hex(sha256(CanonicalRequest))
    SigningKey       = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, Date), Region), Service),
                            "aws4_request")
    Signature        = hex(HMAC(SigningKey, StringToSign))

- CanonicalURI: the path as received (still percent-encoded once), dot segments and empty
  segments removed, then URI-encoded again (every service but S3 double-encodes).
- CanonicalQueryString: every ``name=value`` pair decoded (``+`` is a space), re-encoded with
  RFC 3986 unreserved characters kept, sorted by name then value.
- CanonicalHeaders: each header named in ``SignedHeaders`` (lowercase, sorted), its received
  values trimmed, inner runs of whitespace collapsed to one space, and repeated headers joined
  with ``,``.
- HashedPayload: the ``x-amz-content-sha256`` header if the client sent one (what it signed),
  else hex(sha256(body)). Whether that header tells the truth about the body is the caller's
  check (``payload_hash`` below).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote_plus

__all__ = [
    "ALGORITHM",
    "Authorization",
    "SigningKeys",
    "canonical_headers",
    "canonical_query",
    "canonical_request",
    "canonical_uri",
    "parse_authorization",
    "remove_dot_segments",
    "request_timestamp",
    "sign",
    "signatures_match",
    "signing_key",
    "string_to_sign",
]

ALGORITHM = "AWS4-HMAC-SHA256"
_TERMINATOR = "aws4_request"
_UNRESERVED = "-_.~"
_TIMESTAMP = re.compile(r"[0-9]{8}T[0-9]{6}Z")


@dataclass(frozen=True, slots=True)
class Authorization:
    """The parts of an ``Authorization: AWS4-HMAC-SHA256 Credential=..., ...`` header.

    ``signed_headers`` is empty and ``signature`` is ``""`` when the header lacks them; the
    caller refuses such a header as an incomplete signature.
    """

    algorithm: str
    access_key_id: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


def parse_authorization(header: str | None) -> Authorization | None:
    """The parts of an ``Authorization`` header; None if it has no well-formed ``Credential``.

    Plain string operations: this runs once per request.
    """
    if not header:
        return None
    algorithm, _, rest = header.strip().partition(" ")
    fields: dict[str, str] = {}
    for part in rest.split(","):
        name, _, value = part.strip().partition("=")
        fields.setdefault(name, value.strip())
    credential = fields.get("Credential", "").split("/")
    if len(credential) != 5 or credential[4] != _TERMINATOR or not credential[0]:
        return None
    names = fields.get("SignedHeaders", "")
    return Authorization(
        algorithm=algorithm,
        access_key_id=credential[0],
        date=credential[1],
        region=credential[2],
        service=credential[3],
        signed_headers=tuple(names.split(";")) if names else (),
        signature=fields.get("Signature", ""),
    )


def request_timestamp(amz_date: str | None, date: str | None) -> str | None:
    """The ``YYYYMMDD'T'HHMMSS'Z'`` timestamp that was signed: ``X-Amz-Date`` if sent, else the
    RFC 1123 ``Date`` header converted; None when neither is usable."""
    if amz_date is not None:
        # A shape check, not strptime (twenty times dearer): no clock is compared anyway.
        return amz_date if _TIMESTAMP.fullmatch(amz_date) else None
    if date is None:
        return None
    try:
        when = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4, and consecutive slashes collapsed, as AWS services expect."""
    segments: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment and segment != ".":
            segments.append(segment)
    trailing = "/" if path.endswith("/") and segments else ""
    return "/" + "/".join(segments) + trailing


def canonical_uri(raw_path: str) -> str:
    """The CanonicalURI of a path as it was received (percent-encoded once)."""
    return quote(remove_dot_segments(raw_path), safe="/~")


def canonical_query(raw_query: str) -> str:
    """The CanonicalQueryString of a query string as it was received (without ``?``)."""
    if not raw_query:
        return ""
    pairs = []
    for part in raw_query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        # "+" is a space, as in forms: botocore sends spaces in params as "+" (urlencode) but
        # signs them as "%20", and AWS accepts that.
        pairs.append(
            (
                quote(unquote_plus(name), safe=_UNRESERVED),
                quote(unquote_plus(value), safe=_UNRESERVED),
            )
        )
    pairs.sort()
    return "&".join(f"{name}={value}" for name, value in pairs)


def canonical_headers(names: Iterable[str], values: Mapping[str, Sequence[str]]) -> str:
    """CanonicalHeaders (one ``name:value\n`` line per name) for lowercase, sorted ``names``;
    ``values`` maps each name to its received values, in order (absent: no values)."""
    lines = []
    for name in names:
        found = values.get(name, ())
        if len(found) == 1:  # the usual case, without a generator
            value = " ".join(found[0].split())
        else:
            value = ",".join(" ".join(v.split()) for v in found)
        lines.append(f"{name}:{value}\n")
    return "".join(lines)


def canonical_request(
    *,
    method: str,
    raw_path: str,
    raw_query: str,
    signed_headers: Iterable[str],
    header_values: Mapping[str, Sequence[str]],
    payload_hash: str,
) -> str:
    """The CanonicalRequest. ``signed_headers`` are the names of ``SignedHeaders`` as sent; they
    are lowercased, deduplicated and sorted here, as the spec defines them."""
    names = sorted({name.lower() for name in signed_headers})
    return "\n".join(
        (
            method.upper(),
            canonical_uri(raw_path),
            canonical_query(raw_query),
            canonical_headers(names, header_values),
            ";".join(names),
            payload_hash,
        )
    )


def string_to_sign(timestamp: str, scope: str, canonical: str) -> str:
    """The StringToSign; ``scope`` is ``date/region/service/aws4_request``."""
    digest = hashlib.sha256(canonical.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{ALGORITHM}\n{timestamp}\n{scope}\n{digest}"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()


def signing_key(secret_key: str, date: str, region: str, service: str) -> bytes:
    """The derived signing key of a credential scope."""
    key = _hmac(("AWS4" + secret_key).encode(), date)
    return _hmac(_hmac(_hmac(key, region), service), _TERMINATOR)


def sign(key: bytes, text: str) -> str:
    """hex(HMAC-SHA256(signing key, StringToSign)): the signature."""
    return hmac.new(key, text.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


def signatures_match(expected: str, provided: str) -> bool:
    """Constant-time comparison; ``provided`` may hold any characters a header can carry."""
    return hmac.compare_digest(expected.encode(), provided.encode("utf-8", "replace"))


class SigningKeys:
    """Derived signing keys, cached per (secret, date, region, service): deriving one is four
    HMACs, and a client signs thousands of requests with the same scope. Bounded: the cache
    starts afresh when it holds ``capacity`` keys."""

    def __init__(self, capacity: int = 16384) -> None:
        self._capacity = capacity
        self._keys: dict[tuple[str, str, str, str], bytes] = {}

    def get(self, secret_key: str, date: str, region: str, service: str) -> bytes:
        """The signing key of ``secret_key`` for the scope, derived once."""
        cache_key = (secret_key, date, region, service)
        key = self._keys.get(cache_key)
        if key is None:
            if len(self._keys) >= self._capacity:
                self._keys.clear()
            key = self._keys[cache_key] = signing_key(secret_key, date, region, service)
        return key
