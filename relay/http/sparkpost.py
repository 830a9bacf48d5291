"""SparkPost's Transmissions API (``POST /api/v1/transmissions``): schema and rendering.

``sparkpost_injection(body, now=..., max_recipients=...)`` decodes a transmission (the
JSON that SparkPost's clients, e.g. python-sparkpost's ``transmissions.send()``,
produce), compiles its templates once (``relay.http.templates``, SparkPost dialect) and
renders one message per recipient (``relay.http.compose``).

Supported as SparkPost documents it:

- ``recipients[]``: ``address`` as a string (the email address) or
  ``{email, name, header_to}`` (``To: "name" <header_to>``, or ``header_to`` as given
  when it is a full address, as python-sparkpost sends for cc/bcc copies), ``tags``
  (at most 10 kept, as SparkPost does), ``metadata``, ``substitution_data``;
- ``content``: ``from`` (a string ``Name <a@b>`` or ``{email, name}``), ``subject``,
  ``text``, ``html``, ``reply_to``, ``headers``, ``attachments`` and ``inline_images``
  (``[{name, type, data}]``, base64 ``data``); or ``email_rfc822`` (a complete message,
  templated as a whole); the template language works in all of them except the
  attachments;
- top level: ``substitution_data``, ``metadata``, ``campaign_id``, ``description``,
  ``return_path`` (the envelope sender; default: the From address), ``override``
  (``from``, ``reply_to``, and ``list_id`` as a ``List-Id`` header);
- ``options``: ``sandbox``, ``transactional``, ``ip_pool`` (passed on in the
  ``Injection``), ``perform_substitutions: false`` (no templating of the bodies).

Template data for a recipient, later wins: transmission ``metadata``, transmission
``substitution_data``, recipient ``metadata``, recipient ``substitution_data``, then the
reserved ``address`` (``{email, name, header_to}``), ``email``, ``email_id``,
``env_from`` and ``return_path``. ``RenderedMessage.metadata`` is the transmission's
metadata updated with the recipient's.

Accepted and ignored (they do not change the message we send, only SparkPost's
engagement tracking, which this relay does not do): ``options.open_tracking``,
``options.click_tracking``, ``options.initial_open``, top-level ``tracking_domain``;
``options.start_time`` when it is not in the future (more than 60 s ahead); the
label ``name``; ``options.skip_suppression``, ``options.inline_css`` and
``content.use_draft_template`` when false.

Refused with 422 ``unsupported_field`` naming the field: stored templates
(``content.template_id``, ``use_draft_template: true``), A/B tests
(``content.ab_test_id``), stored recipient lists (``recipients.list_id``), AMP
(``content.amp_html``), scheduling (``options.start_time`` in the future),
``options.skip_suppression: true``, ``options.inline_css: true``, ``options.dkim_key``,
per-recipient ``return_path``; any field that is not part of the API.

Differences from SparkPost worth knowing: ``email_rfc822`` is templated as a whole text
(without HTML escaping) and otherwise passed through; without ``return_path`` its
envelope sender is the address of its (constant) ``From:`` header. The relay does not
rewrite links or add tracking pixels. A ``From`` whose address uses template syntax
needs ``return_path`` (there is one envelope sender per request). ``content.headers``
values are unstructured text: a non-ASCII value is RFC 2047-encoded as a whole, so
address headers such as ``CC`` should be ASCII. ``content.headers`` may not set
``From``, ``To``, ``Subject``, ``Reply-To`` (use the content fields) nor the headers the
relay owns (``compose.FORBIDDEN_HEADERS``); a ``Date`` or ``Message-ID`` given there is
kept (otherwise ``Date`` is ``now`` and the intake adds the ``Message-ID``).
"""

from __future__ import annotations

import datetime
import email.utils
from dataclasses import dataclass
from typing import Any

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

__all__ = ["Transmission", "sparkpost_injection"]

#: SparkPost keeps at most this many tags per recipient.
MAX_TAGS = 10
#: A start_time at most this far ahead is "now".
START_TIME_SLACK = 60.0


class Address(Struct, forbid_unknown_fields=True):
    email: str
    name: str | None = None
    header_to: str | None = None


class Recipient(Struct, forbid_unknown_fields=True):
    address: str | Address
    return_path: str | UnsetType | None = UNSET
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None
    substitution_data: dict[str, Any] | None = None


class StoredRecipients(Struct, forbid_unknown_fields=True):
    list_id: str


class File(Struct, forbid_unknown_fields=True):
    name: str
    type: str
    data: str


class Content(Struct, forbid_unknown_fields=True):
    from_: str | Address | None = msgspec.field(name="from", default=None)
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    amp_html: str | UnsetType | None = UNSET
    reply_to: str | None = None
    headers: dict[str, str] | None = None
    attachments: list[File] | None = None
    inline_images: list[File] | None = None
    email_rfc822: str | None = None
    template_id: str | UnsetType | None = UNSET
    use_draft_template: bool | None = None
    ab_test_id: str | UnsetType | None = UNSET


class Options(Struct, forbid_unknown_fields=True):
    start_time: str | None = None
    open_tracking: bool | None = None
    initial_open: bool | None = None
    click_tracking: bool | None = None
    transactional: bool | None = None
    sandbox: bool | None = None
    skip_suppression: bool | None = None
    ip_pool: str | None = None
    inline_css: bool | None = None
    perform_substitutions: bool | None = None
    dkim_key: str | UnsetType | None = UNSET


class Override(Struct, forbid_unknown_fields=True):
    from_: str | Address | None = msgspec.field(name="from", default=None)
    reply_to: str | None = None
    list_id: str | None = None


class Transmission(Struct, forbid_unknown_fields=True):
    recipients: list[Recipient] | StoredRecipients
    content: Content
    options: Options | None = None
    override: Override | None = None
    campaign_id: str | None = None
    description: str | None = None
    metadata: dict[str, Any] | None = None
    substitution_data: dict[str, Any] | None = None
    return_path: str | None = None
    tracking_domain: str | None = None
    name: str | None = None


# --- whole-request checks ----------------------------------------------------------------


def _start_time_is_now(value: str, now: float) -> bool:
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise invalid("options.start_time", "not a YYYY-MM-DDTHH:MM:SS+HH:MM time") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp() <= now + START_TIME_SLACK


def _check_options(options: Options, now: float) -> None:
    if options.start_time and not _start_time_is_now(options.start_time, now):
        raise unsupported("options.start_time", "(scheduled sending) is not supported")
    if options.skip_suppression:
        raise unsupported("options.skip_suppression", "(true) is not supported")
    if options.inline_css:
        raise unsupported("options.inline_css", "(true) is not supported")
    if options.dkim_key is not UNSET:
        raise unsupported("options.dkim_key")


def _check_content(content: Content) -> None:
    if content.template_id is not UNSET or content.use_draft_template:
        field = "content.template_id" if content.template_id is not UNSET else (
            "content.use_draft_template")
        raise unsupported(field, "(stored templates) is not supported")
    if content.ab_test_id is not UNSET:
        raise unsupported("content.ab_test_id", "(A/B tests) is not supported")
    if content.amp_html is not UNSET:
        raise unsupported("content.amp_html", "(AMP) is not supported")
    if content.email_rfc822 is not None:
        for name in ("from_", "subject", "text", "html", "reply_to", "headers",
                     "attachments", "inline_images"):
            if getattr(content, name) is not None:
                field = f"content.{name.rstrip('_')}"
                raise invalid(field, "cannot be combined with content.email_rfc822")


def _recipient_list(tx: Transmission, max_recipients: int) -> list[Recipient]:
    if isinstance(tx.recipients, StoredRecipients):
        raise unsupported("recipients.list_id", "(stored recipient lists) is not supported")
    if not tx.recipients:
        raise PayloadError(422, "no_recipients", "At least one recipient is required",
                           "recipients is empty", "recipients")
    if len(tx.recipients) > max_recipients:
        raise PayloadError(422, "too_many_recipients", "Too many recipients",
                           f"recipients has {len(tx.recipients)} entries; at most "
                           f"{max_recipients} are accepted per request", "recipients")
    for i, rcpt in enumerate(tx.recipients):
        if rcpt.return_path is not UNSET:
            raise unsupported(f"recipients[{i}].return_path",
                              "(per-recipient return paths) is not supported")
    return tx.recipients


# --- building the plan -------------------------------------------------------------------


def _field(source: str, field: str, mode: str, dialect: str = templates.SPARKPOST
           ) -> templates.Field:
    return templates.compile_field(source, field, dialect=dialect, mode=mode)


def _compose_error(e: compose.ComposeError) -> PayloadError:
    return invalid(e.field, e.message)


def _from_header(value: str | Address, field: str) -> compose.HeaderTemplate:
    if isinstance(value, str):
        return compose.AddressHeader("From", _field(value, field, templates.HEADER))
    display = _field(value.name, f"{field}.name", templates.HEADER) if value.name else None
    return compose.MailboxHeader("From", display,
                                 _field(value.email, f"{field}.email", templates.HEADER))


def _from_address(value: str | Address, field: str) -> str | None:
    """The From address when it is constant (for the envelope sender), else None."""
    if isinstance(value, Address):
        return None if "{{" in value.email else value.email
    if "{{" in value:
        return None
    pairs = email.utils.getaddresses([value])
    if len(pairs) != 1 or not pairs[0][1]:
        raise invalid(field, "must be one address")
    return pairs[0][1]


def _custom_headers(headers: dict[str, str]) -> list[compose.HeaderTemplate]:
    out: list[compose.HeaderTemplate] = []
    for name, value in headers.items():
        field = f"content.headers.{name}"
        why = compose.check_header_name(name)
        if why is None and name.lower() in ("from", "to", "subject", "reply-to"):
            why = "is set from the content and recipient fields"
        if why is not None:
            raise invalid(field, f"{name!r} {why}")
        out.append(compose.TextHeader(name, _field(value, field, templates.HEADER)))
    return out


def _files(files: list[File] | None, field: str, inline: bool) -> list[compose.Attachment]:
    out = []
    for i, f in enumerate(files or ()):
        where = f"{field}[{i}]"
        data = compose.decode_base64(f.data, f"{where}.data")
        out.append(compose.Attachment(f.type, data, f.name, f.name if inline else None, where))
    return out


@dataclass
class _Plan:
    """What a transmission renders with: the message plan and the envelope sender."""

    message: compose.MessagePlan | compose.Rfc822Plan
    sender: str


def _rfc822_plan(tx: Transmission, dialect: str) -> _Plan:
    source = tx.content.email_rfc822 or ""
    plan = compose.Rfc822Plan(_field(source, "content.email_rfc822", templates.TEXT, dialect))
    sender = tx.return_path
    if not sender:
        head = source.replace("\r\n", "\n").split("\n\n", 1)[0]
        found = [v for k, v in _header_lines(head) if k == "from"]
        if not found or "{{" in found[0]:
            raise missing("return_path", "is required when email_rfc822 has no constant "
                          "From address")
        sender = _from_address(found[0], "content.email_rfc822")
    return _Plan(plan, sender or "")


def _header_lines(head: str) -> list[tuple[str, str]]:
    """(lower-cased name, unfolded value) of each field of a header section."""
    fields: list[tuple[str, str]] = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + line)
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append((name.strip().lower(), value.strip()))
    return fields


def _inline_plan(tx: Transmission, now: float, dialect: str) -> _Plan:
    content = tx.content
    override = tx.override or Override()
    from_value = override.from_ or content.from_
    from_field = "override.from" if override.from_ else "content.from"
    if from_value is None:
        raise missing("content.from")
    if content.subject is None:
        raise missing("content.subject")
    if content.text is None and content.html is None:
        raise missing("content.html", "or content.text is required")
    sender = tx.return_path or _from_address(from_value, from_field)
    if not sender:
        raise missing("return_path", f"is required when {from_field} uses template syntax")
    headers = [
        _from_header(from_value, from_field),
        compose.RecipientHeader("To", "recipients.address"),
        compose.TextHeader("Subject", _field(content.subject, "content.subject",
                                             templates.HEADER)),
    ]
    if not any(name.lower() == "date" for name in content.headers or {}):
        date = email.utils.format_datetime(datetime.datetime.fromtimestamp(now, datetime.UTC))
        headers.append(compose.TextHeader("Date", _field(date, "date", templates.HEADER,
                                                         templates.STATIC)))
    reply_to, reply_field = override.reply_to or content.reply_to, (
        "override.reply_to" if override.reply_to else "content.reply_to")
    if reply_to:
        headers.append(compose.AddressHeader("Reply-To", _field(reply_to, reply_field,
                                                                templates.HEADER)))
    if override.list_id:
        headers.append(compose.TextHeader("List-Id", _field(
            override.list_id, "override.list_id", templates.HEADER, templates.STATIC)))
    headers.extend(_custom_headers(content.headers or {}))
    text = _field(content.text, "content.text", templates.TEXT, dialect) if (
        content.text is not None) else None
    html = _field(content.html, "content.html", templates.HTML, dialect) if (
        content.html is not None) else None
    files = (_files(content.inline_images, "content.inline_images", inline=True)
             + _files(content.attachments, "content.attachments", inline=False))
    plan = compose.MessagePlan(headers, text=text, html=html, attachments=files)
    return _Plan(plan, sender)


def _plan(tx: Transmission, now: float) -> _Plan:
    options = tx.options or Options()
    dialect = templates.STATIC if options.perform_substitutions is False else (
        templates.SPARKPOST)
    try:
        if tx.content.email_rfc822 is not None:
            plan = _rfc822_plan(tx, dialect)
        else:
            plan = _inline_plan(tx, now, dialect)
    except compose.ComposeError as e:
        raise _compose_error(e) from None
    if plan.sender:
        try:
            plan.sender = check_address(plan.sender)
        except ValueError as e:
            field = "return_path" if tx.return_path else "content.from"
            raise invalid(field, f"{e} (the envelope sender)") from None
    return plan


# --- per recipient -----------------------------------------------------------------------


def _address(rcpt: Recipient, i: int) -> tuple[str, str | None, str | None, str]:
    """(email, name, header_to, the field path of the email)."""
    if isinstance(rcpt.address, str):
        return rcpt.address, None, None, f"recipients[{i}].address"
    a = rcpt.address
    return a.email, a.name, a.header_to, f"recipients[{i}].address.email"


def _to_header(email_addr: str, name: str | None, header_to: str | None) -> str:
    """SparkPost's To: ``"name" <email>``, with ``header_to`` replacing the address (or
    the whole value when it is itself a full address)."""
    if header_to:
        pairs = compose.parse_addresses(header_to)
        if len(pairs) == 1 and not pairs[0][0] and "<" not in header_to:
            return compose.format_address(name, pairs[0][1])
        return ", ".join(compose.format_address(n, a) for n, a in pairs)
    return compose.format_address(name, email_addr)


class _Renderer:
    """Renders the recipients of one transmission."""

    def __init__(self, tx: Transmission, plan: _Plan) -> None:
        self.plan = plan
        self.metadata = tx.metadata or {}
        self.base = merged(self.metadata, tx.substitution_data or {})

    def recipient(self, i: int, rcpt: Recipient) -> RenderedMessage | RecipientFailure:
        given, name, header_to, field = _address(rcpt, i)
        try:
            address = check_address(given)
        except ValueError as e:
            return RecipientFailure(i, given, "invalid_address", f"{field}: {e}")
        try:
            to = _to_header(address, name, header_to)
        except ValueError as e:
            where = f"recipients[{i}].address." + ("header_to" if header_to else "name")
            return RecipientFailure(i, given, "invalid_address", f"{where}: {e}")
        sender = self.plan.sender
        ctx = merged(self.base, rcpt.metadata or {}, rcpt.substitution_data or {})
        ctx["address"] = {"email": address, "name": name, "header_to": header_to}
        ctx["email"] = ctx["email_id"] = address
        ctx["env_from"] = ctx["return_path"] = sender
        try:
            data = self.plan.message.render(ctx, to=to)
        except templates.RenderError as e:
            return RecipientFailure(i, given, "template_error", f"recipients[{i}]: {e}")
        except compose.ComposeError as e:
            return RecipientFailure(i, given, "invalid_header", f"recipients[{i}]: {e}")
        metadata = merged(self.metadata, rcpt.metadata or {})
        return RenderedMessage(i, address, data, metadata, list((rcpt.tags or [])[:MAX_TAGS]))


def sparkpost_injection(body: bytes, *, now: float, max_recipients: int) -> Injection:
    """Decode and render a SparkPost transmission (the module docstring says what is
    supported). Raises ``PayloadError`` for a request that cannot be used at all; a
    recipient that cannot be rendered is a ``RecipientFailure`` and the others still go.
    ``now`` is the Unix time for the Date header."""
    tx = decode_json(body, Transmission)
    options = tx.options or Options()
    _check_options(options, now)
    _check_content(tx.content)
    recipients = _recipient_list(tx, max_recipients)
    if tx.campaign_id is not None and len(tx.campaign_id.encode()) > 64:
        raise invalid("campaign_id", "is longer than 64 bytes")
    plan = _plan(tx, now)
    renderer = _Renderer(tx, plan)
    injection = Injection(
        sender=plan.sender, campaign_id=tx.campaign_id, ip_pool=options.ip_pool,
        sandbox=bool(options.sandbox), transactional=bool(options.transactional),
        description=tx.description)
    for i, rcpt in enumerate(recipients):
        result = renderer.recipient(i, rcpt)
        if isinstance(result, RenderedMessage):
            injection.messages.append(result)
        else:
            injection.failures.append(result)
    return injection
