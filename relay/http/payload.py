"""What an injection API request turns into, and how it is refused.

Both injection APIs (``relay.http.sparkpost``, ``relay.http.kumo``) decode a request body
into an ``Injection``: the envelope sender, one ``RenderedMessage`` per recipient that
could be rendered, and one ``RecipientFailure`` per recipient that could not. A request
that cannot be used at all raises ``PayloadError``, which carries the HTTP status and the
JSON path of the offending field; the endpoint turns it into the API's error body.

Everything here is pure: no I/O, no clock (the caller passes ``now``).

Also here, because both APIs share them: ``decode_json`` (msgspec decoding with errors
mapped to ``PayloadError``) and ``check_address`` (the address rules for envelope
recipients and senders).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from relay.smtp.address import AddressError, parse_mailbox

__all__ = [
    "Injection",
    "PayloadError",
    "RecipientFailure",
    "RenderedMessage",
    "check_address",
    "decode_json",
    "merged",
]

T = TypeVar("T")


class PayloadError(Exception):
    """The request as a whole is refused.

    ``status`` is 400 when the body is not JSON or a value has the wrong JSON type, 422
    when it is valid JSON but unusable (missing or unsupported field, template error, no
    valid recipient, ...). ``code`` is machine-readable (``invalid_json``,
    ``invalid_type``, ``missing_field``, ``unsupported_field``, ``invalid_value``,
    ``template_error``, ``too_many_recipients``, ``no_recipients``); ``message`` is short
    (SparkPost's ``message``); ``description`` is longer text naming the field; ``field``
    is the JSON path (``recipients[3].address.email``, ``content.subject``) or None.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        description: str,
        field: str | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {description}")
        self.status = status
        self.code = code
        self.message = message
        self.description = description
        self.field = field


def unsupported(field: str, why: str = "is not supported by this relay") -> PayloadError:
    """422 ``unsupported_field`` naming ``field``."""
    return PayloadError(422, "unsupported_field", "Unsupported field", f"{field} {why}", field)


def invalid(field: str, why: str) -> PayloadError:
    """422 ``invalid_value`` naming ``field``."""
    return PayloadError(422, "invalid_value", "Invalid data", f"{field}: {why}", field)


def missing(field: str, why: str = "is required") -> PayloadError:
    """422 ``missing_field`` naming ``field``."""
    return PayloadError(422, "missing_field", "Required field is missing", f"{field} {why}",
                        field)


@dataclass
class RenderedMessage:
    """One message ready for the intake: ``data`` is complete (CRLF line endings)."""

    index: int                # position in recipients[]
    address: str              # the envelope recipient (validated local@domain)
    data: bytes
    metadata: dict[str, Any]  # top-level metadata merged with the recipient's (recipient wins)
    tags: list[str]


@dataclass
class RecipientFailure:
    """A recipient that was not rendered; the others still go."""

    index: int
    address: str              # as given ("" when missing)
    code: str                 # "invalid_address", "template_error", "invalid_header", ...
    message: str              # names the field: "recipients[2].address.email: ..."


@dataclass
class Injection:
    """A decoded, rendered request. ``sender`` is the envelope sender ("" = null sender)."""

    sender: str
    messages: list[RenderedMessage] = field(default_factory=list)
    failures: list[RecipientFailure] = field(default_factory=list)
    campaign_id: str | None = None
    ip_pool: str | None = None
    sandbox: bool = False
    transactional: bool = False
    description: str | None = None


_AT_PATH = re.compile(r" - at `\$(.*)`$")
_FIELD_NAME = re.compile(r"field `([^`]*)`")


def _json_path(path: str, name: str | None) -> str | None:
    """``.a[0].b`` (msgspec's path without ``$``) plus a field name -> ``a[0].b.name``."""
    path = path[1:] if path.startswith(".") else path
    if name is not None:
        path = f"{path}.{name}" if path else name
    return path or None


def _validation_error(error: msgspec.ValidationError) -> PayloadError:
    text = str(error)
    at = _AT_PATH.search(text)
    path = at.group(1) if at else ""
    what = text[: at.start()] if at else text
    name = _FIELD_NAME.search(what)
    if what.startswith("Object missing required field"):
        field_path = _json_path(path, name.group(1) if name else None)
        return missing(field_path or "body")
    if what.startswith("Object contains unknown field"):
        field_path = _json_path(path, name.group(1) if name else None)
        return unsupported(field_path or "body", "is not a field of this API")
    field_path = _json_path(path, None)
    where = field_path or "the request body"
    if what.startswith("Expected"):
        return PayloadError(400, "invalid_type", "Invalid data format/type",
                            f"{where}: {what}", field_path)
    return PayloadError(422, "invalid_value", "Invalid data", f"{where}: {what}", field_path)


def decode_json(body: bytes, type: type[T]) -> T:
    """Decode ``body`` into ``type`` (msgspec Structs). Not JSON -> 400 ``invalid_json``;
    a wrong type at a path -> 400 ``invalid_type``; a missing field -> 422
    ``missing_field``; an unknown field -> 422 ``unsupported_field``; another bad value
    -> 422 ``invalid_value``. ``field`` is the path without msgspec's ``$.`` prefix."""
    try:
        return msgspec.json.decode(body, type=type)
    except msgspec.ValidationError as e:
        raise _validation_error(e) from None
    except msgspec.DecodeError as e:
        raise PayloadError(400, "invalid_json", "Invalid JSON",
                           f"the request body is not valid JSON: {e}") from None


def merged(base: dict[str, Any], *layers: dict[str, Any]) -> dict[str, Any]:
    """A shallow merge: later layers win. ``base`` is not modified."""
    out = dict(base)
    for layer in layers:
        if layer:
            out.update(layer)
    return out


_WHITESPACE = re.compile(r"[\s<>]")


def check_address(text: str) -> str:
    """Validate an envelope address (``local@domain``) and return it.

    The rules: RFC 5321 mailbox syntax (``relay.smtp.address.parse_mailbox``), a domain
    (no bare ``postmaster``), ASCII only (SMTPUTF8 addresses are not accepted over HTTP),
    no whitespace, CR/LF or angle brackets anywhere, no address literals (``[1.2.3.4]``).
    Raises ValueError with a short reason.
    """
    if not text:
        raise ValueError("empty address")
    if _WHITESPACE.search(text):
        raise ValueError("not an email address (whitespace or angle brackets)")
    if not text.isascii():
        raise ValueError("non-ASCII addresses are not supported")
    try:
        mailbox = parse_mailbox(text)
    except AddressError:
        raise ValueError("not an email address") from None
    if mailbox.is_address_literal:
        raise ValueError("address literals are not accepted")
    return mailbox.address
