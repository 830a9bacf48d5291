"""Signed tokens: a payload with an HMAC-SHA256 tag, so that what the relay hands out
(one-click unsubscribe links, the ``X-Relay-Ref`` header, VERP return paths) comes back
unforged. Standard library and msgspec only; every layer may use it.

``seal(secret, payload)`` is ``base64url(payload) "." base64url(mac)``; ``unseal`` gives
the payload back only if the tag holds (compared in constant time), and never raises.
A ``salt`` keeps the tokens of one use from being valid for another.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Callable
from typing import TypeVar

import msgspec

T = TypeVar("T")

__all__ = ["mac", "seal", "unseal", "unseal_record"]

#: Tag length: 128 bits.
MAC_BYTES = 16


def mac(secret: bytes, payload: bytes) -> bytes:
    """The tag of ``payload`` (HMAC-SHA256, truncated to ``MAC_BYTES``)."""
    return hmac.new(secret, payload, hashlib.sha256).digest()[:MAC_BYTES]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def seal(secret: bytes, payload: bytes, salt: bytes = b"") -> str:
    return f"{_b64(payload)}.{_b64(mac(secret, salt + payload))}"


def unseal(secret: bytes, token: str, salt: bytes = b"", max_length: int = 2048
           ) -> bytes | None:
    """The payload of a token ``seal`` made with ``secret`` and ``salt``, else None."""
    body, _, tag = token.strip().partition(".")
    if not body or not tag or len(token) > max_length:
        return None
    try:
        payload, got = _unb64(body), _unb64(tag)
    except (binascii.Error, ValueError):
        return None
    return payload if hmac.compare_digest(mac(secret, salt + payload), got) else None


def unseal_record(secret: bytes, token: str, decode: Callable[[bytes], T], version: int,
                  salt: bytes = b"", max_length: int = 2048) -> T | None:
    """The record (msgpack, with a ``version`` field) in a token ``seal`` made, decoded
    by ``decode``; None when the tag does not hold, it does not decode, or its version
    is not ``version``."""
    payload = unseal(secret, token, salt, max_length)
    if payload is None:
        return None
    try:
        record = decode(payload)
    except (ValueError, msgspec.DecodeError):
        return None
    return record if getattr(record, "version", None) == version else None
