"""SMTP replies: one immutable type for both sides of the protocol.

A ``Reply`` is a three-digit code, an optional enhanced status code (RFC 2034 / RFC 3463,
``"2.1.5"``) and one or more text lines. ``to_bytes()`` gives the wire form: every line but
the last is ``CODE-`` continued, the last is ``CODE `` (RFC 5321 4.2.1), and when there is
an enhanced status it is repeated on every line (RFC 2034 section 4). ``parse_reply()`` does
the reverse for the client side.

Text lines never contain CR or LF: they are replaced by spaces when the reply is built, so a
reply built from client-supplied text (an address in a rejection) cannot inject lines.

Replies that do not depend on the server's hostname are module constants; the 421/554
replies that name the host are built by small functions.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "AUTH_ABORTED",
    "AUTH_ALREADY",
    "AUTH_BAD_BASE64",
    "AUTH_ENCRYPTION_REQUIRED",
    "AUTH_FAILED",
    "AUTH_LINE_TOO_LONG",
    "AUTH_NOT_ENABLED",
    "AUTH_OK",
    "AUTH_UNKNOWN_MECHANISM",
    "BAD_BDAT_SYNTAX",
    "BAD_RECIPIENT",
    "BAD_SENDER",
    "BARE_CR_LF_IN_COMMAND",
    "BARE_CR_LF_IN_DATA",
    "BDAT_MIXED_WITH_DATA",
    "BINARYMIME_NOT_SUPPORTED",
    "BYE",
    "COMMAND_NOT_IMPLEMENTED",
    "DUPLICATE_PARAMETER",
    "HELP",
    "LINE_TOO_LONG",
    "LINE_TOO_LONG_IN_DATA",
    "MAIL_OK",
    "MESSAGE_TOO_BIG",
    "NEED_MAIL",
    "NEED_RCPT",
    "NESTED_MAIL",
    "NON_ASCII_ADDRESS",
    "NOT_ALLOWED_DURING_TRANSACTION",
    "NO_VALID_RECIPIENTS",
    "OK",
    "PARAMS_NEED_EHLO",
    "RCPT_OK",
    "SEND_HELO_FIRST",
    "START_DATA",
    "START_TLS",
    "SYNTAX_ERROR",
    "TLS_ALREADY_ACTIVE",
    "TOO_MANY_RECIPIENTS",
    "UNKNOWN_COMMAND",
    "VRFY_REPLY",
    "Reply",
    "ReplyParseError",
    "data_rate_too_low",
    "greeting",
    "internal_error",
    "message_queued",
    "non_smtp_command",
    "parse_reply",
    "pregreet",
    "shutting_down",
    "syntax",
    "timeout_exceeded",
    "too_many_errors",
    "unsupported_parameter",
]

_CRLF_RE = re.compile(r"[\r\n]")
_STATUS_RE = re.compile(r"^([245])\.([0-9]{1,3})\.([0-9]{1,3})(?: |$)")


class Reply:
    """An SMTP reply; immutable, hashable, compares by value.

    ``Reply(250, "2.0.0", "Ok")`` or ``Reply(250, None, ["relay.example", "PIPELINING"])``.
    ``status`` is the enhanced status code without the code, or None (greeting, EHLO,
    354 and 334 replies carry none, RFC 2034 section 3).
    """

    __slots__ = ("_wire", "code", "lines", "status")

    code: int
    status: str | None
    lines: tuple[str, ...]
    _wire: bytes

    def __init__(self, code: int, status: str | None, lines: str | Iterable[str]) -> None:
        if not 200 <= code <= 599:
            raise ValueError(f"reply code out of range: {code}")
        text = (lines,) if isinstance(lines, str) else tuple(lines)
        if not text:
            text = ("",)
        text = tuple(_CRLF_RE.sub(" ", t) if "\r" in t or "\n" in t else t for t in text)
        object.__setattr__(self, "code", code)
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "lines", text)
        object.__setattr__(self, "_wire", _format(code, status, text))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Reply is immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reply):
            return NotImplemented
        return (self.code, self.status, self.lines) == (other.code, other.status, other.lines)

    def __hash__(self) -> int:
        return hash((self.code, self.status, self.lines))

    def __repr__(self) -> str:
        return f"Reply({self.code!r}, {self.status!r}, {list(self.lines)!r})"

    def __str__(self) -> str:
        """The first line as it would appear on the wire, without CRLF (for logs)."""
        return self._wire.split(b"\r\n", 1)[0].decode("utf-8", "replace")

    @property
    def text(self) -> str:
        """All text lines joined with newlines (without codes)."""
        return "\n".join(self.lines)

    @property
    def is_success(self) -> bool:
        return 200 <= self.code < 300

    @property
    def is_intermediate(self) -> bool:
        return 300 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    @property
    def is_error(self) -> bool:
        return self.code >= 400

    def to_bytes(self) -> bytes:
        """The reply as sent: CRLF-terminated lines, ``-`` continuations, UTF-8 text."""
        return self._wire

    def with_text(self, *lines: str) -> Reply:
        """The same code and status with other text."""
        return Reply(self.code, self.status, lines)


def _format(code: int, status: str | None, lines: tuple[str, ...]) -> bytes:
    prefix = f"{code} {status} " if status else f"{code} "
    cont = f"{code}-{status} " if status else f"{code}-"
    out = [cont + line for line in lines[:-1]]
    out.append(prefix + lines[-1])
    return ("\r\n".join(out) + "\r\n").encode("utf-8", "surrogateescape")


class ReplyParseError(ValueError):
    """Reply lines that are not a valid SMTP reply."""


def parse_reply(lines: Sequence[bytes], *, enhanced: bool = True) -> Reply:
    """Build a Reply from the wire lines of one reply (CRLF already stripped or not).

    Every line must carry the same code; all but the last have ``-`` after it. With
    ``enhanced`` the enhanced status code is taken from the first line when its class
    matches the code's first digit, and stripped from every line that repeats it.
    """
    if not lines:
        raise ReplyParseError("empty reply")
    code: int | None = None
    texts: list[str] = []
    for i, raw in enumerate(lines):
        line = raw.rstrip(b"\r\n")
        if len(line) < 3 or not line[:3].isdigit():
            raise ReplyParseError(f"bad reply line {raw!r}")
        c = int(line[:3])
        if code is None:
            code = c
        elif c != code:
            raise ReplyParseError(f"inconsistent codes in reply: {code} then {c}")
        sep = line[3:4]
        last = i == len(lines) - 1
        if sep == b"-" and last:
            raise ReplyParseError("reply ends with a continuation line")
        if sep not in (b"-", b" ", b""):
            raise ReplyParseError(f"bad reply line {raw!r}")
        if sep in (b" ", b"") and not last:
            raise ReplyParseError("final reply line before the end")
        text = line[4:].decode("utf-8", "replace")
        # As Reply() will: a CR or LF inside a line is a space (read the status likewise).
        texts.append(_CRLF_RE.sub(" ", text) if "\r" in text or "\n" in text else text)
    assert code is not None
    if not 200 <= code <= 599:
        raise ReplyParseError(f"reply code out of range: {code}")
    status: str | None = None
    if enhanced:
        m = _STATUS_RE.match(texts[0])
        if m and m.group(1) == str(code)[0]:
            status = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
            texts = [_strip_status(t, status) for t in texts]
    return Reply(code, status, texts)


def _strip_status(text: str, status: str) -> str:
    if text == status:
        return ""
    if text.startswith(status + " "):
        return text[len(status) + 1 :]
    return text


# -- standard replies ---------------------------------------------------------------------

OK = Reply(250, "2.0.0", "Ok")
MAIL_OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
BYE = Reply(221, "2.0.0", "Bye")
VRFY_REPLY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(
    214,
    "2.0.0",
    [
        "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH",
        "See RFC 5321",
    ],
)
START_TLS = Reply(220, "2.0.0", "Ready to start TLS")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")

UNKNOWN_COMMAND = Reply(500, "5.5.2", "Error: command not recognized")
SYNTAX_ERROR = Reply(500, "5.5.2", "Error: bad syntax")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BARE_CR_LF_IN_COMMAND = Reply(500, "5.5.2", "Syntax error: bare <LF> or <CR> in command")
AUTH_LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication Exchange line is too long")
COMMAND_NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
SEND_HELO_FIRST = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "Error: no valid recipients")
NOT_ALLOWED_DURING_TRANSACTION = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
BDAT_MIXED_WITH_DATA = Reply(503, "5.5.1", "Error: DATA and BDAT cannot be mixed")
BINARYMIME_NOT_SUPPORTED = Reply(555, "5.5.4", "Unsupported option: BODY=BINARYMIME")
BAD_BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT count [LAST]")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "Error: TLS already active")
PARAMS_NEED_EHLO = Reply(555, "5.5.4", "Error: ESMTP parameters require EHLO")
DUPLICATE_PARAMETER = Reply(501, "5.5.4", "Error: duplicate parameter")
BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(501, "5.1.3", "Bad recipient address syntax")
NON_ASCII_ADDRESS = Reply(
    553, "5.6.7", "Non-ASCII addresses not permitted without SMTPUTF8"
)
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
LINE_TOO_LONG_IN_DATA = Reply(550, "5.5.2", "Message contains a line that is too long")
BARE_CR_LF_IN_DATA = Reply(
    550, "5.6.0", "Message contains bare <CR> or <LF> (RFC 5321 2.3.8)"
)

AUTH_NOT_ENABLED = Reply(503, "5.5.1", "Error: authentication not enabled")
AUTH_ALREADY = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_ENCRYPTION_REQUIRED = Reply(
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")


def syntax(usage: str) -> Reply:
    """``501 5.5.4 Syntax: <usage>`` for a command with bad arguments."""
    return Reply(501, "5.5.4", f"Syntax: {usage}")


def unsupported_parameter(name: str) -> Reply:
    """``555 5.5.4`` for an ESMTP parameter we do not implement (RFC 5321 4.1.1.11)."""
    return Reply(555, "5.5.4", f"Unsupported option: {name}")


def message_queued(queue_id: str) -> Reply:
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def greeting(hostname: str) -> Reply:
    return Reply(220, None, f"{hostname} ESMTP")


def pregreet(hostname: str) -> Reply:
    return Reply(554, "5.5.1", f"{hostname} Error: SMTP protocol synchronization")


def too_many_errors(hostname: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: too many errors")


def timeout_exceeded(hostname: str) -> Reply:
    return Reply(421, "4.4.2", f"{hostname} Error: timeout exceeded")


def data_rate_too_low(hostname: str) -> Reply:
    return Reply(421, "4.4.2", f"{hostname} Error: data rate too low")


def internal_error(hostname: str) -> Reply:
    """A fault of ours while serving this session (logged); the session ends."""
    return Reply(421, "4.3.0", f"{hostname} Error: internal error, closing connection")


def shutting_down(hostname: str) -> Reply:
    return Reply(421, "4.3.2", f"{hostname} Service shutting down")


def non_smtp_command(hostname: str) -> Reply:
    return Reply(421, "4.7.0", f"{hostname} Error: non-SMTP command")
