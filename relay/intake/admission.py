"""A message being admitted, as every intake stage sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from relay.intake.headers import lowered_header_section
from relay.model import Envelope
from relay.smtp.replies import Reply

__all__ = ["Admission", "Refused"]


class Refused(Exception):
    """A stage refused the message; ``reply`` says why, as SMTP would."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass
class Admission:
    """One message on its way into the spool.

    ``data`` is the message as received (CRLF lines, unstuffed); stages add lines to
    ``head`` (prepended in order when it is stored) rather than rewrite it, but for
    removing a field meant for the relay only (``replace_data``). ``envelope`` is
    complete (queue id, arrival time, client facts); a stage may replace it (e.g. to
    choose a pool). ``via`` says what carried the message.
    """

    envelope: Envelope
    data: bytes
    via: Literal["smtp", "http", "dsn"]
    #: The SMTP client's HELO (Received: from ...), "" when not SMTP.
    helo: str = ""
    #: Header lines the stages add, CRLF-terminated, in the order they go on top.
    head: list[bytes] = field(default_factory=list)
    #: The DKIM signatures the signing stage added (``d=example.com s=s2024
    #: a=rsa-sha256``), None for none; and why the From: domain got none ("" if it did).
    dkim: list[str] | None = None
    dkim_reason: str = ""
    #: Recipients a stage took out of the envelope (address, why: the suppression
    #: entry's source); the intake records a Suppressed event for each.
    dropped: list[tuple[str, str]] = field(default_factory=list)
    _fields: bytes | None = field(default=None, repr=False)

    @property
    def fields(self) -> bytes:
        """The header section as received, lower-cased, with a CRLF in front, computed
        once for every stage (``headers.lowered_header_section``)."""
        if self._fields is None:
            self._fields = lowered_header_section(self.data)
        return self._fields

    def replace_data(self, data: bytes) -> None:
        """For a stage that must change the message as received (remove a header field
        that is for us, not for the recipient): the rest of the stages see ``data``."""
        self.data = data
        self._fields = None

    @property
    def final(self) -> bytes:
        """The bytes to store: the stages' lines, then the message."""
        return b"".join(self.head) + self.data if self.head else self.data
