"""KumoMTA's inject API (``POST /api/inject/v1``): schema and rendering.

``kumo_injection(body, now=..., max_recipients=...)`` decodes an inject request (the
``InjectV1Request`` of KumoMTA's ``crates/kumod/src/http_server/inject_v1.rs``, closed
to unknown fields like KumoMTA's ``deny_unknown_fields``), compiles its templates once
and renders one message per recipient.

Supported as KumoMTA documents it:

- ``envelope_sender`` (MAIL FROM; ``""`` is the null sender);
- ``recipients[]``: ``email``, ``name``, ``substitutions``, ``metadata`` (becomes
  ``RenderedMessage.metadata``);
- ``content`` as a string: a complete RFC 5322 message, templated as a whole, given
  CRLF line endings and ``MIME-Version`` when missing;
- ``content`` as a builder: ``from`` and ``reply_to`` (``{email, name}``),
  ``subject``, ``text_body``, ``html_body`` (HTML autoescape), ``headers`` (an object;
  a ``To`` there replaces the generated one, as in KumoMTA since 2026.03), and
  ``attachments[]`` (``data``, ``content_type``, ``file_name``, ``content_id``: inline
  in multipart/related, ``base64``: ``data`` is base64, else UTF-8 text); templates
  apply to the subject, the bodies, the headers and the from/reply-to names and
  addresses, not to attachments;
- ``substitutions`` (global; a recipient's own win, shallow merge), plus the
  predefined ``email``, ``name`` and ``to_header`` (``"Name" <email>``) which a
  recipient's substitutions may override;
- ``template_dialect``: ``Jinja`` (the default; see ``relay.http.templates`` for how
  Jinja2 stands in for minijinja) and ``Static`` (no templating).

Accepted and ignored: ``deferred_generation`` (we always generate before answering, so
the counts in the answer are real, where KumoMTA answers 0), ``deferred_spool`` (every
message is spooled durably before the answer; nothing is lost by ignoring it),
``trace_headers`` (the relay's intake always writes its own ``Received:``; no
``X-KumoRef`` header is added).

Refused with 422 naming the field: ``template_dialect: "Handlebars"``,
``content.amp_html_body``, any field that is not part of the API (as KumoMTA does).
A builder needs a body (``text_body`` or ``html_body``) and a From (``content.from``
or a ``From`` in ``content.headers``, not both; likewise ``subject``/``reply_to`` and
their headers). ``headers`` may not set what the relay owns
(``compose.FORBIDDEN_HEADERS``: ``Received``, ``Content-Type``, ``MIME-Version``, ...);
their values are unstructured text (a non-ASCII value is RFC 2047-encoded as a whole).
A ``Date`` there is kept, otherwise ``Date`` is ``now``; no ``Message-ID`` is added
here (the intake does, unless ``headers`` has one).

Differences from KumoMTA: string content is not re-encoded (KumoMTA re-builds the MIME
tree; here 8-bit text stays as given), and a recipient's ``to_header`` quotes the name
only when RFC 5322 needs it.
"""

from __future__ import annotations

import datetime
import email.utils
from typing import Any, Literal

import msgspec
from msgspec import UNSET, Struct, UnsetType

from relay.http import compose, templates
from relay.http.payload import (
    Injection,
    PayloadError,
    RecipientFailure,
    RenderedMessage,
    check_address,
    decode_json,
    invalid,
    merged,
    missing,
    unsupported,
)

__all__ = ["InjectV1Request", "kumo_injection"]


class FromHeader(Struct, forbid_unknown_fields=True):
    email: str
    name: str | None = None


class Recipient(Struct, forbid_unknown_fields=True):
    email: str
    name: str | None = None
    substitutions: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class Attachment(Struct, forbid_unknown_fields=True):
    data: str
    content_type: str
    content_id: str | None = None
    file_name: str | None = None
    base64: bool = False


class Builder(Struct, forbid_unknown_fields=True):
    text_body: str | None = None
    html_body: str | None = None
    amp_html_body: str | UnsetType | None = UNSET
    attachments: list[Attachment] | None = None
    headers: dict[str, str] | None = None
    from_: FromHeader | None = msgspec.field(name="from", default=None)
    subject: str | None = None
    reply_to: FromHeader | None = None


class TraceHeaders(Struct, forbid_unknown_fields=True):
    received_header: bool = False
    supplemental_header: bool = True
    header_name: str = "X-KumoRef"
    include_meta_names: list[str] | dict[str, Any] | None = None


class InjectV1Request(Struct, forbid_unknown_fields=True):
    envelope_sender: str
    recipients: list[Recipient]
    content: str | Builder
    substitutions: dict[str, Any] | None = None
    deferred_spool: bool = False
    deferred_generation: bool = False
    trace_headers: TraceHeaders | None = None
    template_dialect: Literal["Jinja", "Static", "Handlebars"] = "Jinja"


def _dialect(request: InjectV1Request) -> str:
    if request.template_dialect == "Handlebars":
        raise unsupported("template_dialect", "Handlebars is not supported (use Jinja)")
    return templates.STATIC if request.template_dialect == "Static" else templates.JINJA


def _check_recipients(request: InjectV1Request, max_recipients: int) -> None:
    if not request.recipients:
        raise PayloadError(422, "no_recipients", "At least one recipient is required",
                           "recipients is empty", "recipients")
    if len(request.recipients) > max_recipients:
        raise PayloadError(422, "too_many_recipients", "Too many recipients",
                           f"recipients has {len(request.recipients)} entries; at most "
                           f"{max_recipients} are accepted per request", "recipients")


def _sender(request: InjectV1Request) -> str:
    if not request.envelope_sender:
        return ""
    try:
        return check_address(request.envelope_sender)
    except ValueError as e:
        raise invalid("envelope_sender", str(e)) from None


class _Compiler:
    """Compiles a request's fields in one dialect."""

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect

    def field(self, source: str, field: str, mode: str) -> templates.Field:
        return templates.compile_field(source, field, dialect=self.dialect, mode=mode)

    def mailbox(self, name: str, value: FromHeader, field: str) -> compose.MailboxHeader:
        display = self.field(value.name, f"{field}.name", templates.HEADER) if (
            value.name) else None
        return compose.MailboxHeader(name, display,
                                     self.field(value.email, f"{field}.email", templates.HEADER))


def _headers(c: _Compiler, content: Builder, now: float) -> list[compose.HeaderTemplate]:
    given = content.headers or {}
    lowered = {name.lower(): name for name in given}
    for value, name, field in ((content.from_, "from", "content.from"),
                               (content.subject, "subject", "content.subject"),
                               (content.reply_to, "reply-to", "content.reply_to")):
        if value is not None and name in lowered:
            raise invalid(f"content.headers.{lowered[name]}", f"conflicts with {field}")
    headers: list[compose.HeaderTemplate] = []
    if content.from_ is not None:
        headers.append(c.mailbox("From", content.from_, "content.from"))
    elif "from" not in lowered:
        raise missing("content.from", "(or a From in content.headers) is required")
    if "to" not in lowered:
        headers.append(compose.RecipientHeader("To", "recipients"))
    if content.subject is not None:
        headers.append(compose.TextHeader("Subject", c.field(
            content.subject, "content.subject", templates.HEADER)))
    if "date" not in lowered:
        date = email.utils.format_datetime(datetime.datetime.fromtimestamp(now, datetime.UTC))
        headers.append(compose.TextHeader("Date", templates.compile_field(
            date, "date", dialect=templates.STATIC, mode=templates.HEADER)))
    if content.reply_to is not None:
        headers.append(c.mailbox("Reply-To", content.reply_to, "content.reply_to"))
    for name, value in given.items():
        field = f"content.headers.{name}"
        why = compose.check_header_name(name)
        if why is not None:
            raise invalid(field, f"{name!r} {why}")
        headers.append(compose.TextHeader(name, c.field(value, field, templates.HEADER)))
    return headers


def _attachments(content: Builder) -> list[compose.Attachment]:
    out = []
    for i, a in enumerate(content.attachments or ()):
        field = f"content.attachments[{i}]"
        data = (compose.decode_base64(a.data, f"{field}.data") if a.base64
                else a.data.encode("utf-8"))
        out.append(compose.Attachment(a.content_type, data, a.file_name, a.content_id, field))
    return out


def _plan(request: InjectV1Request, now: float) -> compose.MessagePlan | compose.Rfc822Plan:
    c = _Compiler(_dialect(request))
    content = request.content
    try:
        if isinstance(content, str):
            return compose.Rfc822Plan(c.field(content, "content", templates.TEXT))
        if content.amp_html_body is not UNSET:
            raise unsupported("content.amp_html_body", "(AMP) is not supported")
        if content.text_body is None and content.html_body is None:
            raise missing("content.text_body", "or content.html_body is required")
        headers = _headers(c, content, now)
        text = None if content.text_body is None else c.field(
            content.text_body, "content.text_body", templates.TEXT)
        html = None if content.html_body is None else c.field(
            content.html_body, "content.html_body", templates.HTML)
        return compose.MessagePlan(headers, text=text, html=html,
                                   attachments=_attachments(content))
    except compose.ComposeError as e:
        raise invalid(e.field, e.message) from None


def _recipient(i: int, rcpt: Recipient, plan: compose.MessagePlan | compose.Rfc822Plan,
               base: dict[str, Any]) -> RenderedMessage | RecipientFailure:
    try:
        address = check_address(rcpt.email)
    except ValueError as e:
        return RecipientFailure(i, rcpt.email, "invalid_address", f"recipients[{i}].email: {e}")
    try:
        to = compose.format_address(rcpt.name, address)
    except ValueError as e:
        return RecipientFailure(i, rcpt.email, "invalid_address", f"recipients[{i}].name: {e}")
    ctx = dict(base)
    ctx["email"] = address
    if rcpt.name is not None:
        ctx["name"] = rcpt.name
    ctx["to_header"] = to
    if rcpt.substitutions:
        ctx.update(rcpt.substitutions)
    try:
        data = plan.render(ctx, to=to)
    except templates.RenderError as e:
        return RecipientFailure(i, rcpt.email, "template_error", f"recipients[{i}]: {e}")
    except compose.ComposeError as e:
        return RecipientFailure(i, rcpt.email, "invalid_header", f"recipients[{i}]: {e}")
    return RenderedMessage(i, address, data, dict(rcpt.metadata or {}), [])


def kumo_injection(body: bytes, *, now: float, max_recipients: int) -> Injection:
    """Decode and render a KumoMTA inject request (the module docstring says what is
    supported). Raises ``PayloadError`` for a request that cannot be used at all; a
    recipient that cannot be rendered is a ``RecipientFailure`` and the others still go.
    ``now`` is the Unix time for the Date header."""
    request = decode_json(body, InjectV1Request)
    _check_recipients(request, max_recipients)
    sender = _sender(request)
    plan = _plan(request, now)
    base = merged(request.substitutions or {})
    injection = Injection(sender=sender)
    for i, rcpt in enumerate(request.recipients):
        result = _recipient(i, rcpt, plan, base)
        if isinstance(result, RenderedMessage):
            injection.messages.append(result)
        else:
            injection.failures.append(result)
    return injection
