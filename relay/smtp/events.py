"""Events the server state machine returns from ``ServerConnection.next_event()``.

Two kinds:

* informational: the reply is already queued; the I/O layer may log it and go on
  (``HeloReceived``);
* decisions: the connection waits (``next_event()`` returns ``NEED_DATA`` even if input is
  buffered) until the I/O layer calls the matching method on the connection
  (``RecipientRequested`` -> ``accept_recipient()`` / ``reject_recipient()``,
  ``AuthRequested`` -> ``auth_succeeded()`` / ``auth_failed()``, ``MessageReceived`` ->
  ``message_stored()`` / ``message_failed()``, ``StartTLSRequested`` ->
  ``tls_established()``).

``ConnectionClosing`` is terminal: once returned, ``next_event()`` returns the same object
for ever.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from relay.model import Recipient
from relay.smtp.address import Mailbox

__all__ = [
    "NEED_DATA",
    "AuthRequested",
    "ConnectionClosing",
    "Event",
    "HeloReceived",
    "MessageReceived",
    "NeedData",
    "RecipientRequested",
    "StartTLSRequested",
]


class NeedData:
    """Type of the ``NEED_DATA`` sentinel: feed more bytes (or make the pending decision)
    before asking for the next event. Flush ``data_to_send()`` when you see it."""

    __slots__ = ()
    _instance: NeedData | None = None

    def __new__(cls) -> NeedData:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_DATA"

    def __reduce__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


class Event:
    """Base class of all events (for isinstance checks and type hints)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class HeloReceived(Event):
    """HELO or EHLO was accepted (the 250 reply is queued). ``esmtp`` is True for EHLO."""

    hostname: str
    esmtp: bool


@dataclass(frozen=True, slots=True)
class RecipientRequested(Event):
    """DECISION: RCPT TO passed syntax and limits; apply relay policy, then call
    ``accept_recipient()`` or ``reject_recipient(reply)``.

    ``address`` is the canonical forward path without brackets (source route removed,
    quoted local part preserved); ``"postmaster"`` alone for ``<postmaster>``.
    ``mailbox`` is the parsed form: ``mailbox.routing_domain`` is the domain after the
    last unquoted ``@`` (what relay policy must judge), ``mailbox.has_routing_chars`` flags
    ``%``/``!``/``@`` in the local part, ``mailbox.route`` the stripped source route.
    ``params`` are all RCPT parameters as sent (keys upper-cased).
    """

    address: str
    notify: list[str] | None
    orcpt: str | None
    params: dict[str, str | None]
    mailbox: Mailbox | None = None


@dataclass(frozen=True, slots=True)
class AuthRequested(Event):
    """DECISION: the client completed an AUTH exchange; check the credentials, then call
    ``auth_succeeded()`` or ``auth_failed()``. ``mechanism`` is ``"PLAIN"`` or ``"LOGIN"``;
    ``authzid`` is ``""`` unless PLAIN carried one."""

    mechanism: str
    authzid: str
    username: str
    password: bytes


@dataclass(frozen=True, slots=True)
class MessageReceived(Event):
    """DECISION: end of DATA (or BDAT LAST) with an acceptable message. Store it durably,
    then call ``message_stored(queue_id)`` or ``message_failed(reply)``.

    ``data`` is the message exactly as received, dot-unstuffed (DATA) or as chunked (BDAT),
    with CRLF line endings. ``sender`` is ``""`` for the null reverse path. ``body`` is
    the BODY= value upper-cased or None, ``declared_size`` the SIZE= value, ``ret`` the
    RET= value upper-cased, ``envid`` the xtext-decoded ENVID=. ``sender_mailbox`` is the
    parsed reverse path (None for ``<>``) and ``chunked`` tells BDAT from DATA.
    """

    sender: str
    recipients: list[Recipient]
    data: bytes
    body: str | None
    smtputf8: bool
    declared_size: int | None
    ret: str | None
    envid: str | None
    sender_mailbox: Mailbox | None = None
    chunked: bool = False


@dataclass(frozen=True, slots=True)
class StartTLSRequested(Event):
    """DECISION-ish: ``220 2.0.0 Ready to start TLS`` is queued and every byte that was
    buffered after the STARTTLS line has been discarded (RFC 3207 section 5, CVE-2011-0411).
    Flush ``data_to_send()``, do the TLS handshake, call ``tls_established()``, and only
    then feed decrypted bytes to ``receive_data()``. If the handshake fails, close."""


@dataclass(frozen=True, slots=True)
class ConnectionClosing(Event):
    """Terminal: flush ``data_to_send()`` and close the socket.

    ``reason`` is one of: ``"quit"``, ``"eof"``, ``"too many errors"``, ``"timeout"``,
    ``"data rate"``, ``"shutdown"``, ``"pregreet"``, ``"non-smtp command"``, ``"aborted"``.
    """

    reason: str
