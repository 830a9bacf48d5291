"""Delivery Status Notifications (RFC 3464 / RFC 6522): the bounces the relay owes.

A 250 after DATA makes the relay responsible for the message (RFC 5321 6.1): every later
permanent failure, expiry (and, when asked, delay) becomes a DSN from the null sender to
the original sender. ``build_dsn`` turns the failures of one message into a ready-to-spool
``NewMessage``, or ``None`` when no DSN is owed.

Why bytes and not ``email.message``: the original headers must be returned byte for byte
(an ``email`` round trip re-folds and re-encodes them), and the result must have CRLF line
endings, ready for the spool. The structure is simple enough to write directly; the tests
parse it back with ``email.message_from_bytes(..., policy=email.policy.default)``.

Choices (documented because the RFCs leave them open):

* No DSN to the null sender, of a DSN (``envelope.is_bounce``), or for a recipient whose
  NOTIFY excludes the action (NEVER, or no FAILURE / no DELAY).
* NOTIFY absent: RFC 3461 says FAILURE and maybe DELAY. Failed notices are sent; delay
  notices are *off* by default (Postfix ``delay_warning_time = 0``), ``delay_default=True``
  turns them on for recipients without NOTIFY. An explicit NOTIFY=DELAY is always honoured.
* RET absent returns headers only (``text/rfc822-headers``), as Postfix does with
  ``bounce_size_limit`` pressure; RET=FULL returns ``message/rfc822`` unless the message
  is larger than ``max_full_return`` (1 MB), in which case headers are returned and the
  text part says so.
* ENVID and ORCPT are reported xtext-decoded (as stored in the envelope), like Postfix.
  A non-ASCII final or original recipient uses the ``utf-8`` address type (RFC 6533)
  and the DSN is then flagged SMTPUTF8; 8-bit original headers make the DSN 8BITMIME.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Literal

import msgspec

from relay.model import Envelope, NewMessage, Recipient
from relay.smtp.client import crlf_lines

__all__ = ["MAX_FULL_RETURN", "FailedRecipient", "build_dsn", "dsn_wanted"]

#: Largest original returned whole with RET=FULL; larger ones get headers only.
MAX_FULL_RETURN = 1024 * 1024
#: Longest Diagnostic-Code text kept (header lines must stay under 998 octets).
_MAX_DIAGNOSTIC = 900
#: RFC 5322 2.1.1: a line is at most 998 octets, CRLF excluded.
LINE_MAX = 998


class FailedRecipient(msgspec.Struct, kw_only=True, frozen=True):
    """One recipient's failure, as the engine saw it."""

    #: Index into Envelope.recipients.
    index: int
    #: RFC 3463 status, e.g. "5.1.1" (failed) or "4.4.1" (delayed).
    status: str
    #: "smtp; 550 5.1.1 No such user" (type; text) -- "" when there is none.
    diagnostic: str = ""
    #: "dns; mx.example.com" -- "" when no server was reached.
    remote_mta: str = ""
    #: Unix time of the last attempt (0 = unknown: the field is left out).
    last_attempt: float = 0.0


def dsn_wanted(recipient: Recipient, action: Literal["failed", "delayed"], *,
               delay_default: bool = False) -> bool:
    """Whether ``recipient``'s NOTIFY asks for a DSN with this action."""
    notify = recipient.notify
    if notify is None:
        return action == "failed" or delay_default
    if "NEVER" in notify:
        return False
    return ("FAILURE" if action == "failed" else "DELAY") in notify


def _date(t: float) -> str:
    return format_datetime(datetime.fromtimestamp(t, UTC))


def _clean(text: str) -> str:
    """One header-safe line: no CR/LF/controls, at most ``_MAX_DIAGNOSTIC`` octets."""
    out = "".join(c if c >= " " and c != "\x7f" else " " for c in text).strip()
    return _clip(out, _MAX_DIAGNOSTIC)


def _clip(text: str, octets: int) -> str:
    """``text`` cut to at most ``octets`` UTF-8 octets (never inside a character)."""
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) <= octets:
        return text
    return raw[:octets].decode("utf-8", "ignore")


def _fit_lines(data: bytes, limit: int = LINE_MAX) -> bytes:
    """``data`` as CRLF lines of at most ``limit`` octets (RFC 5322 2.1.1): whatever the
    spool holds, a returned original must not make the DSN itself malformed. Longer
    lines are cut (the DSN says what happened; the original is the sender's anyway)."""
    data = crlf_lines(data)
    if all(len(line) <= limit for line in data.split(b"\r\n")):
        return data
    return b"\r\n".join(line[:limit] for line in data.split(b"\r\n"))


def _address_field(address: str) -> str:
    return f"rfc822; {address}" if address.isascii() else f"utf-8; {address}"


def build_dsn(
    *,
    envelope: Envelope,
    data: bytes,
    failures: list[FailedRecipient],
    action: Literal["failed", "delayed"],
    reporting_mta: str,
    queue_id: str,
    arrival: float,
    now: float,
    delay_default: bool = False,
    max_full_return: int = MAX_FULL_RETURN,
) -> NewMessage | None:
    """The DSN for ``failures`` of one message, or None when none is owed.

    ``queue_id`` is the new message's id (also used in its Message-ID); ``arrival`` is
    when the original was received; ``now`` dates the DSN. Only failures whose
    recipient's NOTIFY allows ``action`` are reported; if none is left, None.
    """
    if not envelope.sender or envelope.is_bounce:
        return None
    reported = [
        f for f in failures
        if 0 <= f.index < len(envelope.recipients)
        and dsn_wanted(envelope.recipients[f.index], action, delay_default=delay_default)
    ]
    if not reported:
        return None

    sep = data.find(b"\r\n\r\n")
    headers = data[: sep + 2] if sep >= 0 else (data if data.endswith(b"\r\n") else data + b"\r\n")
    full = envelope.ret == "FULL" and len(data) <= max_full_return
    truncated = envelope.ret == "FULL" and not full
    returned = _fit_lines(data if full else headers)
    eight_bit = not returned.isascii()
    boundary = f"{queue_id}.{int(now)}.{os.urandom(6).hex()}/{reporting_mta}"

    # -- top-level headers
    failed = action == "failed"
    subject = ("Undelivered Mail Returned to Sender" if failed
               else "Delayed Mail (still being retried)")
    top = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{envelope.sender}>",
        f"Subject: {subject}",
        f"Date: {_date(now)}",
        f"Message-ID: <{queue_id}@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "Content-Transfer-Encoding: {cte}",
        "",
        "This is a MIME-encapsulated message.",
        "",
    ]

    # -- human-readable part
    rcpts = envelope.recipients
    if failed:
        intro = [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "I'm sorry to have to inform you that your message could not",
            "be delivered to one or more recipients. It's attached below.",
            "",
            "The mail system",
        ]
    else:
        intro = [
            f"This is the mail system at host {reporting_mta}.",
            "",
            "####################################################################",
            "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
            "####################################################################",
            "",
            "Your message could not be delivered yet to the recipients below.",
            "The mail system will keep trying; you will be notified if it gives up.",
            "",
            "The mail system",
        ]
    human = [
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: {cte}",
        "",
        *intro,
    ]
    for f in reported:
        why = _clean(f.diagnostic.partition(";")[2] or f.diagnostic) or f"status {f.status}"
        host = f.remote_mta.partition(";")[2].strip()
        human.append("")
        human.append(_clip(f"<{rcpts[f.index].address}>: "
                           + (f"host {host} said: {why}" if host else why), LINE_MAX))
    if truncated:
        human += ["", f"The message was larger than {max_full_return} bytes; only its "
                      "headers are returned."]
    human.append("")

    # -- machine-readable part
    status = [
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        f"Reporting-MTA: dns; {reporting_mta}",
    ]
    if envelope.envid:
        status.append(f"Original-Envelope-Id: {_clean(envelope.envid)}")
    status.append(f"Arrival-Date: {_date(arrival)}")
    for f in reported:
        rcpt = rcpts[f.index]
        status.append("")
        if rcpt.orcpt:
            addr_type, _, orig = rcpt.orcpt.partition(";")
            status.append(f"Original-Recipient: {_clean(addr_type)}; {_clean(orig)}")
        status.append(f"Final-Recipient: {_address_field(rcpt.address)}")
        status.append(f"Action: {action}")
        status.append(f"Status: {f.status}")
        if f.remote_mta:
            status.append(f"Remote-MTA: {_clean(f.remote_mta)}")
        if f.diagnostic:
            status.append(f"Diagnostic-Code: {_clean(f.diagnostic)}")
        if f.last_attempt:
            status.append(f"Last-Attempt-Date: {_date(f.last_attempt)}")
    status.append("")

    # -- the original (headers or whole), attached byte for byte
    if full:
        part = [f"--{boundary}", "Content-Description: Undelivered Message",
                "Content-Type: message/rfc822"]
    else:
        part = [f"--{boundary}", "Content-Description: Undelivered Message Headers",
                "Content-Type: text/rfc822-headers"]
    if eight_bit:
        part.append("Content-Transfer-Encoding: 8bit")
    part += ["", ""]

    human_text = "\r\n".join(human)
    human_text = human_text.replace("{cte}", "7bit" if human_text.isascii() else "8bit", 1)
    rest = "\r\n".join(status + part)
    eight_bit_any = eight_bit or not human_text.isascii() or not rest.isascii()
    head = "\r\n".join(top).replace("{cte}", "8bit" if eight_bit_any else "7bit", 1)
    text = "\r\n".join((head, human_text, rest)).encode("utf-8")
    tail = b"" if returned.endswith(b"\r\n") else b"\r\n"
    message = b"".join((text, returned, tail, f"\r\n--{boundary}--\r\n".encode()))

    smtputf8 = (not envelope.sender.isascii()
                or any(not rcpts[f.index].address.isascii() for f in reported)
                or (envelope.smtputf8 and eight_bit))
    dsn_envelope = Envelope(
        queue_id=queue_id,
        sender="",
        recipients=[Recipient(address=envelope.sender)],
        received_at=now,
        body="8BITMIME" if eight_bit_any else None,
        smtputf8=smtputf8,
        protocol="local",
        is_bounce=True,
        # The bounce is accounted to whoever sent the original.
        tenant=envelope.tenant,
        campaign_id=envelope.campaign_id,
    )
    return NewMessage(envelope=dsn_envelope, data=message)
