"""MIME messages for the injection APIs, built with the standard library ``email`` package.

Every message of a request has the same shape: the same parts, the same headers in the
same order, the same attachments; only some header values and the text/HTML bodies
change from one recipient to the next. So a ``MessagePlan`` builds the message tree ONCE
per request from ``email.message.Message`` objects and generates it with
``email.generator.BytesGenerator`` under ``POLICY`` (``compat32`` semantics, CRLF line
endings), with a placeholder wherever per-recipient content goes. Per recipient,
``MessagePlan.render`` only fills the placeholders and joins the pieces:

- a header with ``fold_header`` (``POLICY.fold_binary``; values with CR, LF or NUL are
  refused, and so is a line that cannot be folded under 998 octets). ``POLICY`` is
  ``compat32`` with its folder for text values replaced, because the email package's
  ``Header`` folding costs 20-70 us a header: ASCII is folded before whitespace at 78
  characters, non-ASCII becomes RFC 2047 ``=?utf-8?b?...?=`` words made by
  ``email.base64mime``, split between characters;
- a text or HTML body with ``encode_body``: ``7bit`` when it is ASCII with lines of at
  most 998 octets, otherwise ``quoted-printable`` (``binascii.b2a_qp``, the C encoder);
  its ``Content-Transfer-Encoding`` header is chosen with it.

The MIME structure is not written by hand: boundaries, part headers, parameter quoting,
RFC 2231 file names, Content-IDs all come out of the email package; attachments and
inline images are decoded, checked and base64-encoded once per request. Boundaries carry
a random per-request nonce and ``=_``, which neither quoted-printable nor base64 can
produce; a 7bit body that happens to contain the nonce is sent quoted-printable.

The shape: ``text/plain`` or ``text/html`` alone; ``multipart/alternative`` for both;
inside ``multipart/related`` when there are inline images (Content-ID); inside
``multipart/mixed`` when there are attachments. Headers: those the caller gives
(``From``, ``To``, ``Subject``, ``Date``, ...), then ``MIME-Version`` and the content
headers. No ``Message-ID`` is added (the intake adds one unless the caller gave it).

``finish_rfc822`` is the other way in: a complete message given as text (SparkPost's
``email_rfc822``, KumoMTA's string ``content``) gets CRLF line endings and
``MIME-Version`` when it has none, and must have a header section and lines of at most
998 octets; it is otherwise passed through as rendered (8-bit text stays 8-bit).
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import io
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from email import base64mime
from email.generator import BytesGenerator
from email.message import Message
from email.policy import Compat32
from typing import Any

from relay.http.payload import check_address
from relay.http.templates import Field

__all__ = [
    "FORBIDDEN_HEADERS",
    "POLICY",
    "AddressHeader",
    "Attachment",
    "ComposeError",
    "HeaderTemplate",
    "MailboxHeader",
    "MessagePlan",
    "RecipientHeader",
    "Rfc822Plan",
    "TextHeader",
    "check_header_name",
    "encode_body",
    "finish_rfc822",
    "fold_header",
    "format_address",
    "parse_addresses",
]

MAX_LINE = 998


class ComposeError(Exception):
    """``field`` cannot be made into a message: ``message`` says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


#: RFC 5322's recommended line length; lines may be longer (up to 998) when they must.
FOLD_AT = 78


def _whitespace(line: str, lo: int, hi: int, last: bool) -> int:
    """The last (or first) space or tab in ``line[lo:hi]``, -1 when there is none."""
    if last:
        return max(line.rfind(" ", lo, hi), line.rfind("\t", lo, hi))
    found = [i for i in (line.find(" ", lo, hi), line.find("\t", lo, hi)) if i >= 0]
    return min(found, default=-1)


def _fold_ascii(name: str, value: str) -> str:
    """``Name: value`` folded before whitespace so that lines keep to 78 characters
    where a break is possible (RFC 5322 2.2.3); unfolding gives the value back. A line
    never ends right after the colon and never consists of whitespace only."""
    line = f"{name}: {value}"
    if len(line) <= FOLD_AT:
        return line + "\r\n"
    lines, start, lo = [], 0, len(name) + 3
    while len(line) - start > FOLD_AT:
        cut = _whitespace(line, lo, start + FOLD_AT + 1, last=True)
        if cut < 0 or not line[start:cut].strip():  # no break in reach: the next one
            cut = _whitespace(line, lo, len(line), last=False)
            while cut >= 0 and not line[start:cut].strip():
                cut = _whitespace(line, cut + 1, len(line), last=False)
        if cut < 0 or not line[cut:].strip():
            break
        lines.append(line[start:cut])
        start = cut
        lo = start + 1
    lines.append(line[start:])
    return "\r\n".join(lines) + "\r\n"


def _encoded_words(text: str, first_budget: int) -> list[str]:
    """``text`` as RFC 2047 ``=?utf-8?b?...?=`` words (``email.base64mime``), each an
    integral number of characters, the first for ``first_budget`` octets of UTF-8 and the
    others for 45 (a 73-character continuation line)."""
    data, words, pos, budget = text.encode("utf-8"), [], 0, max(6, first_budget)
    while pos < len(data):
        end = min(len(data), pos + budget)
        while end < len(data) and data[end] & 0xC0 == 0x80:  # not inside a character
            end -= 1
        words.append(base64mime.header_encode(data[pos:end], "utf-8"))
        pos, budget = end, 45
    return words


def _fold_unicode(name: str, value: str) -> str:
    """``Name: =?utf-8?b?...?=`` encoded words, one per line (RFC 2047)."""
    words = _encoded_words(value, (FOLD_AT - len(name) - 2 - 12) // 4 * 3)
    return f"{name}: " + "\r\n ".join(words) + "\r\n"


class _Policy(Compat32):
    """``compat32`` with CRLF line endings and a faster folder for text values (the
    email package's own ``Header`` folding costs 20-70 us a header): ASCII is folded at
    whitespace, non-ASCII becomes base64 encoded words of UTF-8. Other values (bytes
    with surrogates, ``Header`` objects) go to ``compat32``."""

    def fold_binary(self, name: str, value: Any) -> bytes:
        if type(value) is str and "\r" not in value and "\n" not in value:
            if value.isascii():
                return _fold_ascii(name, value).encode("ascii")
            try:
                return _fold_unicode(name, value).encode("ascii")
            except UnicodeEncodeError:  # lone surrogates: bytes that were not UTF-8
                pass
        return super().fold_binary(name, value)

    def fold(self, name: str, value: Any) -> str:
        return self.fold_binary(name, value).decode("ascii", "surrogateescape")


POLICY = _Policy(linesep="\r\n")

#: Headers a caller may not set: the relay writes them (Received, Return-Path), or the
#: MIME structure does, or they would disclose recipients (Bcc).
FORBIDDEN_HEADERS = frozenset({
    "received", "return-path", "mime-version", "content-type", "content-transfer-encoding",
    "content-disposition", "content-id", "bcc",
})
_HEADER_NAME = re.compile(r"[!-9;-~]+")
_BAD_VALUE = re.compile(r"[\r\n\x00]")


def check_header_name(name: str) -> str | None:
    """Why ``name`` may not be a header set by a caller, or None when it may."""
    if not _HEADER_NAME.fullmatch(name):
        return "not a valid header name"
    if name.lower() in FORBIDDEN_HEADERS:
        return "is set by the relay and may not be given"
    return None


def fold_header(name: str, value: str) -> bytes:
    """``Name: value`` CRLF-terminated, RFC 2047-encoded and folded by ``POLICY``.
    Raises ValueError for CR, LF or NUL in the value, or a line over 998 octets."""
    if _BAD_VALUE.search(value):
        raise ValueError("header values may not contain CR, LF or NUL")
    folded = POLICY.fold_binary(name, value)
    if len(folded) > MAX_LINE + 2 and max(map(len, folded.split(b"\r\n"))) > MAX_LINE:
        raise ValueError(f"the header cannot be folded into lines of {MAX_LINE} octets")
    return folded


def format_address(name: str | None, address: str) -> str:
    """A mailbox for an address header: ``"Name" <a@b>`` (RFC 2047 for a non-ASCII
    name) or ``a@b``. The address must already be checked (``check_address``)."""
    if not name:
        return address
    if _BAD_VALUE.search(name):
        raise ValueError("display names may not contain CR, LF or NUL")
    if name.isascii():
        return email.utils.formataddr((name, address))  # quoted as needed
    return " ".join(_encoded_words(name, 45)) + f" <{address}>"


def parse_addresses(text: str) -> list[tuple[str, str]]:
    """``Name <a@b>, c@d`` -> ``[("Name", "a@b"), ("", "c@d")]``, every address checked.
    Raises ValueError."""
    if _BAD_VALUE.search(text):
        raise ValueError("may not contain CR, LF or NUL")
    pairs = email.utils.getaddresses([text])
    if not pairs or any(not addr for _, addr in pairs):
        raise ValueError(f"not an address list: {text[:80]!r}")
    return [(name, check_address(addr)) for name, addr in pairs]


# --- header templates ------------------------------------------------------------------


class HeaderTemplate:
    """A header of the message plan: ``name``, the JSON ``field`` it comes from, its
    ``constant`` value when it is the same for every recipient, and ``value(ctx)`` for a
    recipient (raising ``RenderError`` or ``ValueError``)."""

    name: str
    field: str
    constant: str | None

    def value(self, ctx: dict[str, Any]) -> str:
        raise NotImplementedError


class TextHeader(HeaderTemplate):
    """An unstructured header (Subject, a custom header) from a template field."""

    def __init__(self, name: str, template: Field) -> None:
        self.name, self.field, self.template = name, template.field, template
        self.constant = template.constant

    def value(self, ctx: dict[str, Any]) -> str:
        return self.template.render(ctx)


class MailboxHeader(HeaderTemplate):
    """One mailbox from a display-name template and an address template."""

    def __init__(self, name: str, display: Field | None, address: Field) -> None:
        self.name, self.field = name, address.field
        self.display, self.address = display, address
        self.constant = None
        if address.constant is not None and (display is None or display.constant is not None):
            self.constant = self._format(display.constant if display else None,
                                         address.constant)

    def _format(self, display: str | None, address: str) -> str:
        try:
            checked = check_address(address)
        except ValueError as e:
            raise ComposeError(self.field, str(e)) from None
        try:
            return format_address(display, checked)
        except ValueError as e:
            raise ComposeError(self.display.field if self.display else self.field,
                               str(e)) from None

    def value(self, ctx: dict[str, Any]) -> str:
        display = self.display.render(ctx) if self.display else None
        return self._format(display, self.address.render(ctx))


class AddressHeader(HeaderTemplate):
    """An address list given as one template string (``Name <a@b>, c@d``)."""

    def __init__(self, name: str, template: Field) -> None:
        self.name, self.field, self.template = name, template.field, template
        self.constant = None if template.constant is None else self._format(template.constant)

    def _format(self, text: str) -> str:
        try:
            pairs = parse_addresses(text)
            return ", ".join(format_address(n, a) for n, a in pairs)
        except ValueError as e:
            raise ComposeError(self.field, str(e)) from None

    def value(self, ctx: dict[str, Any]) -> str:
        return self._format(self.template.render(ctx))


class RecipientHeader(HeaderTemplate):
    """A header whose value the caller passes to ``render`` (``To``)."""

    constant = None

    def __init__(self, name: str, field: str) -> None:
        self.name, self.field = name, field


# --- bodies and attachments ------------------------------------------------------------


def _crlf(text: str) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.replace("\n", "\r\n")


def encode_body(text: str, nonce: str = "") -> tuple[str, bytes]:
    """A text body -> (Content-Transfer-Encoding, encoded bytes), CRLF line endings and
    a final CRLF: ``7bit`` when ASCII without NUL, with lines <= 998 octets and without
    ``nonce`` (the boundaries' secret); otherwise ``quoted-printable`` of its UTF-8."""
    text = _crlf(text)
    if not text.endswith("\r\n"):
        text += "\r\n"
    if (text.isascii() and "\x00" not in text and (not nonce or nonce not in text)
            and (len(text) <= MAX_LINE or max(map(len, text.split("\r\n"))) <= MAX_LINE)):
        return "7bit", text.encode("ascii")
    return "quoted-printable", binascii.b2a_qp(text.encode("utf-8"), istext=True)


_CONTENT_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*"
                           r"(?:[ \t]*;[\x20-\x7e]*)?")
_CONTENT_ID = re.compile(r"[\x21-\x3b\x3d\x3f-\x7e]+")  # printable, no < > or space


@dataclass(frozen=True)
class Attachment:
    """An attachment (or, with ``content_id``, an inline image in multipart/related),
    decoded. ``field`` is its JSON path, for errors."""

    content_type: str
    data: bytes
    filename: str | None = None
    content_id: str | None = None
    field: str = "attachment"


def decode_base64(data: str, field: str) -> bytes:
    """Strict base64 (whitespace and line breaks tolerated). Raises ComposeError."""
    data = "".join(data.split())
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ComposeError(field, "not valid base64") from None


def _attachment_part(att: Attachment) -> tuple[Message, bytes]:
    """The email package part for an attachment (payload left to the caller) and its
    base64 body, CRLF-terminated lines of 76 characters."""
    if not _CONTENT_TYPE.fullmatch(att.content_type):
        raise ComposeError(att.field, f"not a MIME type: {att.content_type[:80]!r}")
    if att.content_type.split("/", 1)[0].lower() in ("multipart", "message"):
        raise ComposeError(att.field, "multipart and message types cannot be attached")
    part = Message(policy=POLICY)
    part["Content-Type"] = att.content_type
    disposition = "attachment"
    if att.content_id is not None:
        if not _CONTENT_ID.fullmatch(att.content_id):
            raise ComposeError(att.field, f"not a usable Content-ID: {att.content_id[:80]!r}")
        disposition = "inline"
    if att.filename is not None:
        if _BAD_VALUE.search(att.filename) or not att.filename:
            raise ComposeError(att.field, "file names may not be empty or contain CR, LF, NUL")
        name: str | tuple[str, str, str] = att.filename
        if not att.filename.isascii():
            name = ("utf-8", "", att.filename)
        part.set_param("name", name)
        part.add_header("Content-Disposition", disposition, filename=name)
    else:
        part["Content-Disposition"] = disposition
    if att.content_id is not None:
        part["Content-ID"] = f"<{att.content_id}>"
    part["Content-Transfer-Encoding"] = "base64"
    return part, base64.encodebytes(att.data).replace(b"\n", b"\r\n")


# --- the plan --------------------------------------------------------------------------

_SLOT = re.compile(rb"\x00(\d+)\x00")
_HEADER, _BODY_CTE, _BODY, _FIXED = "header", "cte", "body", "fixed"


class MessagePlan:
    """The MIME shape of a request's messages, generated once by the email package.

    ``headers`` in order (the caller has checked their names); ``text``/``html`` the
    body fields (None when absent); ``attachments`` decoded. Raises ``ComposeError`` for
    constant content that cannot be used (a bad constant header, attachment, ...).
    ``render(ctx, to=...)`` makes one recipient's message.
    """

    def __init__(
        self,
        headers: Sequence[HeaderTemplate],
        *,
        text: Field | None,
        html: Field | None,
        attachments: Sequence[Attachment] = (),
    ) -> None:
        if text is None and html is None:
            raise ComposeError("content", "a text or an HTML body is needed")
        self.nonce = secrets.token_hex(12)
        self._slots: list[tuple[str, Any]] = []  # (kind, what) by slot number
        self._fixed: list[bytes] = []
        self._headers = list(headers)
        self._bodies = [b for b in ((text, "plain"), (html, "html")) if b[0] is not None]
        root = Message(policy=POLICY)
        for header in self._headers:
            if not _HEADER_NAME.fullmatch(header.name):
                raise ComposeError(header.field, f"not a valid header name: {header.name!r}")
            root[header.name] = self._header_value(header)
        root["MIME-Version"] = "1.0"
        parts = [(self._attachment(a), a) for a in attachments]
        self._fill(root, [p for p, a in parts if a.content_id is not None],
                   [p for p, a in parts if a.content_id is None])
        self._pieces, self._positions = self._split(root)

    def _slot(self, kind: str, what: Any) -> str:
        self._slots.append((kind, what))
        return f"\x00{len(self._slots) - 1}\x00"

    def _header_value(self, header: HeaderTemplate) -> str:
        """A constant value (checked; the generator folds it) or a placeholder."""
        if header.constant is None:
            return self._slot(_HEADER, header)
        try:
            fold_header(header.name, header.constant)
        except ValueError as e:
            raise ComposeError(header.field, str(e)) from None
        return header.constant

    def _attachment(self, att: Attachment) -> Message:
        part, body = _attachment_part(att)
        self._fixed.append(body)
        part.set_payload(self._slot(_FIXED, len(self._fixed) - 1))
        return part

    def _multipart(self, msg: Message, subtype: str, parts: list[Message], **params: str
                   ) -> None:
        msg.add_header("Content-Type", f"multipart/{subtype}", **params,
                       boundary=f"=_{self.nonce}_{subtype[:3]}")
        for part in parts:
            msg.attach(part)

    def _fill(self, msg: Message, inline: list[Message], attached: list[Message]) -> None:
        """Make ``msg`` the body tree: mixed > related > alternative > text parts."""
        if attached:
            inner = Message(policy=POLICY)
            self._fill(inner, inline, [])
            self._multipart(msg, "mixed", [inner, *attached])
        elif inline:
            inner = Message(policy=POLICY)
            self._fill(inner, [], [])
            self._multipart(msg, "related", [inner, *inline], type=inner.get_content_type())
        elif len(self._bodies) == 2:
            parts = [Message(policy=POLICY) for _ in self._bodies]
            for part, (field, subtype) in zip(parts, self._bodies, strict=True):
                self._body_part(part, field, subtype)
            self._multipart(msg, "alternative", parts)
        else:
            field, subtype = self._bodies[0]
            self._body_part(msg, field, subtype)

    def _body_part(self, part: Message, field: Field, subtype: str) -> None:
        part.add_header("Content-Type", f"text/{subtype}", charset="utf-8")
        if field.constant is None:
            part["Content-Transfer-Encoding"] = self._slot(_BODY_CTE, field)
            part.set_payload(self._slot(_BODY, field))
            return
        cte, data = encode_body(field.constant, self.nonce)
        part["Content-Transfer-Encoding"] = cte
        self._fixed.append(data)
        part.set_payload(self._slot(_FIXED, len(self._fixed) - 1))

    def _split(self, root: Message) -> tuple[list[bytes], list[tuple[int, str, Any]]]:
        """Generate the tree and cut it at the placeholders: constant pieces, plus the
        (position, kind, what) of each per-recipient piece."""
        out = io.BytesIO()
        BytesGenerator(out, mangle_from_=False, policy=POLICY).flatten(root)
        chunks = _SLOT.split(out.getvalue())
        pieces: list[bytes] = [chunks[0]]
        positions: list[tuple[int, str, Any]] = []
        for number, text in zip(chunks[1::2], chunks[2::2], strict=True):
            kind, what = self._slots[int(number)]
            if kind in (_HEADER, _BODY_CTE):  # the piece is the whole folded line
                name = what.name if kind == _HEADER else "Content-Transfer-Encoding"
                prefix = f"{name}: ".encode("ascii")
                if not (pieces[-1].endswith(prefix) and text.startswith(b"\r\n")):
                    raise RuntimeError(f"unexpected generator output around {name}")
                pieces[-1] = pieces[-1][: -len(prefix)]
                text = text[2:]
            if kind == _FIXED:
                pieces.append(self._fixed[what])
            else:
                positions.append((len(pieces), kind, what))
                pieces.append(b"")
            pieces.append(text)
        if pieces[-1] and not pieces[-1].endswith(b"\r\n"):  # bodies end with CRLF
            pieces.append(b"\r\n")
        return pieces, positions

    def render(self, ctx: dict[str, Any], *, to: str | None = None) -> bytes:
        """One recipient's message. ``to`` is the value for a ``RecipientHeader``.
        Raises ``RenderError`` (a template failed) or ``ComposeError`` (a value that
        cannot go into a message)."""
        pieces = self._pieces.copy()
        bodies: dict[int, tuple[str, bytes]] = {}
        for pos, kind, what in self._positions:
            if kind == _HEADER:
                pieces[pos] = self._header(what, ctx, to)
            else:
                encoded = bodies.get(id(what))
                if encoded is None:
                    encoded = bodies[id(what)] = encode_body(what.render(ctx), self.nonce)
                pieces[pos] = (_CTE_LINES[encoded[0]] if kind == _BODY_CTE else encoded[1])
        return b"".join(pieces)

    @staticmethod
    def _header(header: HeaderTemplate, ctx: dict[str, Any], to: str | None) -> bytes:
        try:
            value = to if isinstance(header, RecipientHeader) else header.value(ctx)
            if value is None:
                raise ValueError("no value")
            return fold_header(header.name, value)
        except ValueError as e:
            raise ComposeError(header.field, str(e)) from None


_CTE_LINES = {cte: fold_header("Content-Transfer-Encoding", cte)
              for cte in ("7bit", "quoted-printable")}


# --- complete messages -----------------------------------------------------------------

#: RFC 5322 fields; not the obsolete blank before the colon (obs-optional), which a new
#: message must not use and which the ``email`` package itself reads as the body's start.
_HEADER_SECTION = re.compile(rb"(?:[!-9;-~]+:[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*)+")
_MIME_VERSION = re.compile(rb"(?:^|\r\n)mime-version[ \t]*:", re.I)


def finish_rfc822(text: str) -> bytes:
    """A complete message given as text -> its bytes: CRLF line endings (and a final
    CRLF), and ``MIME-Version: 1.0`` added at the end of the header section when
    missing. Raises ValueError when there is no header section, a header line is not a
    field, or a line is longer than 998 octets."""
    data = _crlf(text).encode("utf-8")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 2]
    if not _HEADER_SECTION.fullmatch(head):
        raise ValueError("the message does not start with a valid header section")
    if len(data) > MAX_LINE and max(map(len, data.split(b"\r\n"))) > MAX_LINE:
        raise ValueError(f"the message has a line longer than {MAX_LINE} octets")
    if not _MIME_VERSION.search(head):
        data = head + b"MIME-Version: 1.0\r\n" + data[len(head):]
    return data


class Rfc822Plan:
    """A complete message from one template field (rendered, then ``finish_rfc822``).
    A constant message is finished once; a problem with it raises ``ComposeError``."""

    def __init__(self, template: Field) -> None:
        self.template = template
        self.constant: bytes | None = None
        if template.constant is not None:
            self.constant = self._finish(template.constant)

    def _finish(self, text: str) -> bytes:
        try:
            return finish_rfc822(text)
        except ValueError as e:
            raise ComposeError(self.template.field, str(e)) from None

    def render(self, ctx: dict[str, Any], *, to: str | None = None) -> bytes:
        """One recipient's message (``to`` is ignored: the text has its own headers)."""
        if self.constant is not None:
            return self.constant
        return self._finish(self.template.render(ctx))
