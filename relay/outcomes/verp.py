"""VERP return paths: which message and recipient a bounce that comes back is about.

With ``[bounces] domain`` set, each recipient of a message leaves in a transaction of its
own whose MAIL FROM is::

    b-<queue id>-<recipient index>-<mac>@<bounce domain>
    b-0kq3v7n8c1a2b3c4d5-0-k4x2m7qpza@bounces.example.com

``mac`` is the first 50 bits of HMAC-SHA256(secret, "verp1:<QUEUE ID>:<index>") in
lower-case base32 (10 characters; the MAC of the unsubscribe tokens,
``relay.intake.unsubscribe``). Everything is lower case, so a server that folds the local
part's case still returns a working address (queue ids are Crockford base32 and read
back in upper case). The local part is at most 2 + 18 + 1 + 7 + 1 + 10 = 39 characters
of atext (RFC 5321 allows 64), so it never needs quoting.

``read`` checks the MAC in constant time (``hmac.compare_digest``) and refuses addresses
older than ``max_age`` (the queue id says when the message arrived), so an address seen
once cannot be used for ever; changing the secret voids every address sent before.

Choices: Momentum and KumoMTA leave the encoding to the operator; this is the classic
qmail/Postfix VERP idea with BATV's signature (an address only we can make), and the
recipient is named by its index because an address can be too long for a local part
(the report itself, or the X-Relay-Ref header, names the address).
"""

from __future__ import annotations

import base64
import functools
import hmac
import re
import time
from typing import NamedTuple

from relay.model import ascii_int
from relay.spool.queueid import QUEUE_ID_LENGTH, queue_id_time
from relay.tokens import mac

__all__ = ["MAX_AGE", "Verp", "VerpLink", "verp_for"]

#: Reports about mail older than this are not taken (their addresses are refused).
MAX_AGE = 90 * 86400.0
_PREFIX = "b-"
_MAC_CHARS = 10
_LOCAL_RE = re.compile(
    rf"^b-([0-9a-z]{{{QUEUE_ID_LENGTH}}})-([0-9]{{1,7}})-([a-z2-7]{{{_MAC_CHARS}}})$")


class VerpLink(NamedTuple):
    """What a VERP address says: the message and the index of its recipient."""

    queue_id: str
    index: int


class Verp:
    """Makes and reads the return paths of one bounce domain (module docstring)."""

    def __init__(self, domain: str, secret: str, *, max_age: float = MAX_AGE) -> None:
        self.domain = domain.lower().rstrip(".")
        self.secret = secret.encode()
        self.max_age = max_age
        self._suffix = "@" + self.domain

    def address(self, queue_id: str, index: int) -> str:
        """The return path of recipient ``index`` of message ``queue_id``."""
        qid = queue_id.upper()
        return f"{_PREFIX}{qid.lower()}-{index}-{self._mac(qid, index)}{self._suffix}"

    def is_ours(self, address: str) -> bool:
        """Whether ``address`` is at the bounce domain (valid or not)."""
        return address.lower().endswith(self._suffix)

    def read(self, address: str, now: float | None = None) -> VerpLink | None:
        """The link of a VERP address this relay made and that is not too old; None for
        anything else (never raises)."""
        local, at, domain = address.lower().rpartition("@")
        if not at or domain.rstrip(".") != self.domain:
            return None
        m = _LOCAL_RE.match(local)
        if m is None:
            return None
        qid, index = m.group(1).upper(), ascii_int(m.group(2))
        if index is None or not hmac.compare_digest(self._mac(qid, index), m.group(3)):
            return None
        try:
            sent = queue_id_time(qid)
        except ValueError:
            return None
        if (time.time() if now is None else now) - sent > self.max_age:
            return None
        return VerpLink(qid, index)

    def _mac(self, queue_id: str, index: int) -> str:
        digest = mac(self.secret, f"verp1:{queue_id}:{index}".encode())
        return base64.b32encode(digest).decode("ascii")[:_MAC_CHARS].lower()


@functools.lru_cache(maxsize=8)
def verp_for(domain: str, secret: str) -> Verp | None:
    """The ``Verp`` of ``[bounces] domain``/``secret`` (None when no domain is set),
    made once per config (the engine asks for every transaction)."""
    return Verp(domain, secret) if domain and secret else None
