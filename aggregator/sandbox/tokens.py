"""Pagination tokens: opaque to clients, HMAC-signed with a secret per sandbox instance.

A token carries the account, the job list, the offset of the next page, the list version the
chain started from and when it was issued (sandbox clock). The server rejects a token that was
altered, minted by another sandbox, too old, or whose list has changed since.
"""

from __future__ import annotations

import base64
import hmac
import secrets
from dataclasses import dataclass

__all__ = ["PageToken", "TokenSigner"]

_MAC_BYTES = 16


@dataclass(frozen=True, slots=True)
class PageToken:
    """What a NextToken says: where the next page of which list starts."""

    account_id: str
    list_key: str
    offset: int
    version: int
    issued_at: float


class TokenSigner:
    """Issues and verifies tokens with one secret.

    Options (keyword-only):
      secret: the HMAC key (default: 32 random bytes, so every sandbox rejects the tokens of
        every other one).
    """

    __slots__ = ("_secret",)

    def __init__(self, *, secret: bytes | None = None) -> None:
        self._secret = secret if secret is not None else secrets.token_bytes(32)

    def _mac(self, body: bytes) -> bytes:
        return hmac.digest(self._secret, body, "sha256")[:_MAC_BYTES]

    def issue(self, token: PageToken) -> str:
        """Encode and sign ``token``."""
        payload = (
            f"{token.account_id}|{token.list_key}|{token.offset}|{token.version}|"
            f"{token.issued_at!r}"
        )
        body = base64.urlsafe_b64encode(payload.encode()).rstrip(b"=")
        mac = base64.urlsafe_b64encode(self._mac(body)).rstrip(b"=")
        return (body + b"." + mac).decode()

    def verify(self, text: str) -> PageToken | None:
        """The token ``text`` encodes, or None if it is malformed, altered or foreign."""
        body_text, dot, mac_text = text.rpartition(".")
        if not dot or not text.isascii():
            return None
        body = body_text.encode()
        # Compare the MAC's text, not its decoded bytes: base64 decoding ignores the spare
        # bits of a last character, so two spellings would otherwise pass.
        expected = base64.urlsafe_b64encode(self._mac(body)).rstrip(b"=")
        if not hmac.compare_digest(mac_text.encode(), expected):
            return None
        try:
            payload = base64.urlsafe_b64decode(body + b"=" * (-len(body) % 4)).decode()
            account_id, list_key, offset, version, issued_at = payload.split("|")
            return PageToken(account_id, list_key, int(offset), int(version), float(issued_at))
        except ValueError:  # binascii.Error and UnicodeDecodeError included
            return None
