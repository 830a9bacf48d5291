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

import msgspec

from relay.intake.admission import Admission
from relay.tokens import seal, unseal_record

__all__ = ["UnsubscribeHeaders", "UnsubscribeToken", "make_token", "read_token"]

_VERSION = 1


class UnsubscribeToken(msgspec.Struct, array_like=True):
    """What a token says: who unsubscribes from whose mail."""

    version: int
    tenant: str
    campaign: str
    recipient: str


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(UnsubscribeToken).decode


def make_token(secret: bytes, *, tenant: str, campaign: str, recipient: str) -> str:
    return seal(secret, _encode(UnsubscribeToken(_VERSION, tenant, campaign, recipient)))


def read_token(secret: bytes, token: str) -> UnsubscribeToken | None:
    """The token's content if ``secret`` made it, else None (never raises)."""
    return unseal_record(secret, token, _decode, _VERSION)


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

