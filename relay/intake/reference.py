"""The reference header: what a report that returns the message's headers is about.

With ``[bounces] domain`` set, every message the relay accepts gets::

    X-Relay-Ref: <token>

``token`` is ``base64url(msgpack([version, queue_id, tenant, campaign, recipient]))`` +
``.`` + ``base64url(HMAC-SHA256(secret, "ref:" + payload))`` (the first 16 bytes: the
MAC of the unsubscribe tokens, ``relay.intake.unsubscribe``, keyed by ``[bounces]
secret``). ``recipient`` is set only for a message to one recipient (the header is the
same for every recipient of a message). Feedback reports (ARF) and most bounces return
the original headers, so a complaint whose recipient's address was redacted (Yahoo,
Microsoft) still names our message, its tenant and campaign, and the recipient when
there was one. Only the holder of the secret can make one; a client's own
``X-Relay-Ref`` fields are removed first, so one cannot be copied into other mail.

``[bounces] feedback_id`` (Gmail's feedback loop) adds, to mail without its own,
``Feedback-ID: <campaign>:<tenant>:<bulk|transactional>:<SenderId>`` (colons and blanks in
the values become ``-``). Both come before the signing stage: Feedback-ID is in the
signed fields (Gmail wants it signed).

DSNs of ours get neither: they go to a sender, not to a recipient of ours.
"""

from __future__ import annotations

import re

import msgspec

from relay.intake.admission import Admission
from relay.intake.headers import without_fields
from relay.tokens import seal, unseal_record

__all__ = ["REF_FIELD", "Reference", "ReferenceHeaders", "feedback_id", "make_ref", "read_ref"]

REF_FIELD = "X-Relay-Ref"
_REF_NAME = REF_FIELD.lower().encode()
_VERSION = 1
_SALT = b"ref:"
#: Longest token read (a tenant, a campaign and an address of the longest kind fit).
_MAX_TOKEN = 2048


class Reference(msgspec.Struct, array_like=True):
    """What a token says about the message it was added to."""

    version: int
    queue_id: str
    tenant: str
    campaign: str
    #: The recipient of a single-recipient message; "" for several.
    recipient: str


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Reference).decode


def make_ref(secret: bytes, *, queue_id: str, tenant: str, campaign: str,
             recipient: str) -> str:
    payload = _encode(Reference(_VERSION, queue_id, tenant, campaign, recipient))
    return seal(secret, payload, _SALT)


def read_ref(secret: bytes, token: str) -> Reference | None:
    """The token's content if ``secret`` made it, else None (never raises)."""
    return unseal_record(secret, token, _decode, _VERSION, _SALT, _MAX_TOKEN)


_FEEDBACK_UNSAFE = re.compile(r"[:\s]+")


def feedback_id(campaign: str, tenant: str, transactional: bool, sender_id: str) -> str:
    """Gmail's ``a:b:c:SenderId``: campaign, tenant, mail kind, the sender's id."""
    parts = [campaign, tenant, "transactional" if transactional else "bulk"]
    return ":".join([_FEEDBACK_UNSAFE.sub("-", p) for p in parts] + [sender_id])


class ReferenceHeaders:
    """The stage adding the headers (module docstring)."""

    def __init__(self, secret: str, feedback_sender: str = "") -> None:
        self.secret = secret.encode()
        self.feedback_sender = feedback_sender

    def admit(self, msg: Admission) -> None:
        if msg.via == "dsn":
            return
        if b"\r\n" + _REF_NAME + b":" in msg.fields:
            msg.replace_data(without_fields(msg.data, [_REF_NAME]))
        env = msg.envelope
        token = make_ref(self.secret, queue_id=env.queue_id, tenant=env.tenant or "",
                         campaign=env.campaign_id or "",
                         recipient=env.recipients[0].address if len(env.recipients) == 1
                         else "")
        msg.head.append(f"{REF_FIELD}: {token}\r\n".encode("utf-8", "surrogateescape"))
        if self.feedback_sender and b"\r\nfeedback-id:" not in msg.fields:
            value = feedback_id(env.campaign_id or "", env.tenant or "", env.transactional,
                                self.feedback_sender)
            msg.head.append(f"Feedback-ID: {value}\r\n".encode("utf-8", "surrogateescape"))
