"""Header facts and trace fields for the intake stages (bytes in, bytes out).

RFC 5321 4.4 requires a ``Received:`` line at the top of the message; RFC 5322 3.6.4
wants a ``Message-ID:``, which a relay adds when the client did not (Postfix does the same
for mail it accepts). Both are prepended so the original bytes stay untouched.
"""

from __future__ import annotations

import email.utils

__all__ = [
    "field_value",
    "has_message_id",
    "hop_count",
    "lowered_header_section",
    "received_header",
    "without_fields",
]


def lowered_header_section(data: bytes) -> bytes:
    """The header section (up to the first empty line) lower-cased, with a CRLF in front,
    so that every field starts at ``b"\\r\\n<name>:"``; computed once per message for
    the checks below."""
    end = data.find(b"\r\n\r\n")
    return b"\r\n" + (data if end < 0 else data[: end + 2]).lower()


def _field_span(data: bytes, fields: bytes, name: bytes) -> tuple[int, int] | None:
    """(start, end) in ``data`` of the first field ``name`` (lower-case, no colon): from
    its name to the CRLF that ends it, folded continuation lines included."""
    at = fields.find(b"\r\n" + name + b":")
    if at < 0:
        return None
    start = at  # fields has a CRLF in front: offsets are data's + 2, the field's is at
    end = data.find(b"\r\n", start)
    while end >= 0 and data[end + 2: end + 3] in (b" ", b"\t"):
        end = data.find(b"\r\n", end + 2)
    return start, (len(data) if end < 0 else end + 2)


def field_value(data: bytes, fields: bytes, name: bytes) -> str | None:
    """The unfolded, stripped value of the first header field ``name`` (lower-case, no
    colon) of ``data``, whose ``lowered_header_section`` is ``fields``; None if absent."""
    span = _field_span(data, fields, name)
    if span is None:
        return None
    raw = data[span[0] + len(name) + 1: span[1]]
    return b" ".join(raw.split()).decode("utf-8", "replace")


def without_fields(data: bytes, names: list[bytes]) -> bytes:
    """``data`` with every header field named in ``names`` (lower-case, no colon)
    removed, folded lines and repeats included; the body is untouched."""
    for name in names:
        while True:
            span = _field_span(data, lowered_header_section(data), name)
            if span is None:
                break
            data = data[: span[0]] + data[span[1]:]
    return data


def has_message_id(head: bytes) -> bool:
    """True when the header section (``lowered_header_section``) has a Message-ID."""
    return b"\r\nmessage-id:" in head


def hop_count(head: bytes) -> int:
    """``Received:`` plus ``Delivered-To:`` fields of a header section
    (``lowered_header_section``): how many hops a message has made (RFC 5321 6.3 loop
    detection; Postfix counts the same for ``hopcount_limit``)."""
    return head.count(b"\r\nreceived:") + head.count(b"\r\ndelivered-to:")


#: (whole second, its RFC 5322 date)
_last_date: tuple[int, str] = (-1, "")


def _rfc5322_date(now: float) -> str:
    """``email.utils.formatdate(now)``, computed once per second (every message of that
    second shares it; formatdate builds a datetime and formats it field by field)."""
    global _last_date
    second = int(now)
    if now - second >= 0.999999:
        # fromtimestamp rounds to the microsecond: this may already be the next second.
        return email.utils.formatdate(now, localtime=False)
    if _last_date[0] != second:
        _last_date = (second, email.utils.formatdate(second, localtime=False))
    return _last_date[1]


def received_header(
    *,
    queue_id: str,
    hostname: str,
    helo: str,
    client_ip: str,
    protocol: str,
    tls: str | None,
    recipients: list[str],
    now: float,
) -> bytes:
    """The ``Received:`` field (CRLF-terminated, folded) to put on top of a message.

    It follows RFC 5321 4.4 and Postfix's layout; ``for <rcpt>`` is only written for a
    single recipient so a message to many never discloses the others.
    """
    date = _rfc5322_date(now)
    ip_literal = f"[IPv6:{client_ip}]" if ":" in client_ip else f"[{client_ip}]"
    lines = [f"Received: from {helo or 'unknown'} ({ip_literal})"]
    if tls:
        lines.append(f"\t(using {tls})")
    lines.append(f"\tby {hostname} (relay) with {protocol} id {queue_id}")
    if len(recipients) == 1:
        lines.append(f"\tfor <{recipients[0]}>; {date}")
    else:
        lines[-1] += f"; {date}"
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")
