"""One-click unsubscribe (RFC 8058): the headers the relay adds, and their tokens.

A message to one recipient, not transactional, of a tenant ``[unsubscribe] tenants``
covers, and without a ``List-Unsubscribe`` of its own, gets::

    List-Unsubscribe: <https://relay.example.com/u/TOKEN>[, <mailto:ADDR?subject=unsubscribe>]
    List-Unsubscribe-Post: List-Unsubscribe=One-Click

before the signing stage, so both are inside the DKIM signature (RFC 8058 section 4
requires it). A multi-recipient SMTP message gets none: the link must name one address.

``TOKEN`` is ``base64url(msgpack([version, tenant, campaign, recipient]))`` + ``.`` +
``base64url(HMAC-SHA256(secret, payload))`` (the first 16 bytes): it carries what the
endpoint needs, so nothing is stored per message, and only the holder of ``secret``
can make one. Tokens do not expire (an unsubscribe link must work as long as the mail
is read); changing the secret voids them all.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

import msgspec

from relay.intake.admission import Admission

__all__ = ["UnsubscribeHeaders", "UnsubscribeToken", "make_token", "read_token"]

_VERSION = 1
_MAC_BYTES = 16


class UnsubscribeToken(msgspec.Struct, array_like=True):
    """What a token says: who unsubscribes from whose mail."""

    version: int
    tenant: str
    campaign: str
    recipient: str


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(UnsubscribeToken).decode


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, payload: bytes) -> bytes:
    return hmac.new(secret, payload, hashlib.sha256).digest()[:_MAC_BYTES]


def make_token(secret: bytes, *, tenant: str, campaign: str, recipient: str) -> str:
    payload = _encode(UnsubscribeToken(_VERSION, tenant, campaign, recipient))
    return f"{_b64(payload)}.{_b64(_mac(secret, payload))}"


def read_token(secret: bytes, token: str) -> UnsubscribeToken | None:
    """The token's content if ``secret`` made it, else None (never raises)."""
    body, _, mac = token.partition(".")
    if not body or not mac or len(token) > 2048:
        return None
    try:
        payload, got = _unb64(body), _unb64(mac)
        if not hmac.compare_digest(_mac(secret, payload), got):
            return None
        content = _decode(payload)
    except (binascii.Error, ValueError, msgspec.DecodeError):
        return None
    return content if content.version == _VERSION else None


class UnsubscribeHeaders:
    """The stage adding the headers (module docstring)."""

    def __init__(self, url: str, mailto: str, secret: str, tenants: list[str]) -> None:
        self.url = url
        self.mailto = mailto
        self.secret = secret.encode()
        self.tenants = set(tenants)

    def admit(self, msg: Admission) -> None:
        env = msg.envelope
        if (msg.via == "dsn" or env.transactional or len(env.recipients) != 1
                or (self.tenants and env.tenant not in self.tenants)
                or b"\r\nlist-unsubscribe:" in msg.fields):
            return
        token = make_token(self.secret, tenant=env.tenant or "", campaign=env.campaign_id or "",
                           recipient=env.recipients[0].address)
        links = f"<{self.url}{token}>"
        if self.mailto:
            links += f",\r\n <mailto:{self.mailto}?subject=unsubscribe>"
        msg.head.append(f"List-Unsubscribe: {links}\r\n".encode("utf-8", "surrogateescape"))
        msg.head.append(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")

