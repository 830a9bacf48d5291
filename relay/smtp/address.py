"""RFC 5321 paths and mailboxes, ESMTP parameters, xtext and the DSN parameters.

Generic: used by the server (parsing what clients send) and the client (formatting what we
send). Everything works on ``str``; the server decodes command lines as UTF-8 with
``surrogateescape``, so bytes that are not UTF-8 show up as lone surrogates, which no
grammar rule here accepts.

Grammar (RFC 5321 4.1.2, extended by RFC 6531 when SMTPUTF8 is in effect)::

    Path          = "<" [ A-d-l ":" ] Mailbox ">"
    A-d-l         = At-domain *( "," At-domain )        ; source route: parsed, then dropped
    Mailbox       = Local-part "@" ( Domain / address-literal )
    Local-part    = Dot-string / Quoted-string
    Domain        = sub-domain *("." sub-domain)
    address-literal = "[" ( IPv4 / "IPv6:" IPv6 / Standardized-tag ":" 1*dcontent ) "]"

Relay tricks are judged by what this parser calls the domain: the part after the last
``@`` that is outside a quoted local part. ``user%other@domain``, ``other!user@domain`` and
``"user@other"@domain`` all have domain ``domain``; ``Mailbox.has_routing_chars`` tells the
relay policy that the local part carries ``@``, ``%`` or ``!`` so it can refuse such
addresses the way Postfix does (``allow_untrusted_routing = no``).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

__all__ = [
    "AddressError",
    "Mailbox",
    "ParamError",
    "format_orcpt",
    "parse_mailbox",
    "parse_notify",
    "parse_orcpt",
    "parse_params",
    "parse_path",
    "split_path",
    "xtext_decode",
    "xtext_encode",
]


class AddressError(ValueError):
    """An address that does not follow RFC 5321 (or RFC 6531 when SMTPUTF8 is in effect).

    ``non_ascii`` is True when the only problem is non-ASCII text without SMTPUTF8, which
    deserves ``553 5.6.7`` rather than a syntax error.
    """

    def __init__(self, message: str, *, non_ascii: bool = False) -> None:
        super().__init__(message)
        self.non_ascii = non_ascii


class ParamError(ValueError):
    """ESMTP parameters that do not follow ``esmtp-param *(SP esmtp-param)``.

    ``duplicate`` names a keyword given twice.
    """

    def __init__(self, message: str, *, duplicate: str | None = None) -> None:
        super().__init__(message)
        self.duplicate = duplicate


# UTF8-non-ascii as code points, excluding the lone surrogates surrogateescape produces.
_U = "\u0080-\ud7ff\ue000-\U0010ffff"
_ATEXT = "A-Za-z0-9!#$%&'*+\\-/=?^_`{|}~" + _U
_ATOM = f"[{_ATEXT}]+"
_DOT_STRING = f"{_ATOM}(?:\\.{_ATOM})*"
_QUOTED = f'"(?:[\\x20\\x21\\x23-\\x5b\\x5d-\\x7e{_U}]|\\\\[\\x20-\\x7e])*"'
_LETDIG = f"A-Za-z0-9{_U}"
_SUBDOMAIN = f"[{_LETDIG}](?:[{_LETDIG}-]*[{_LETDIG}])?"
_DOMAIN = f"{_SUBDOMAIN}(?:\\.{_SUBDOMAIN})*"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_ADL = f"@{_DOMAIN}(?:,@{_DOMAIN})*"

_MAILBOX_RE = re.compile(f"({_DOT_STRING}|{_QUOTED})@({_DOMAIN}|{_LITERAL})")
_PATH_RE = re.compile(f"<(?:({_ADL}):)?({_DOT_STRING}|{_QUOTED})@({_DOMAIN}|{_LITERAL})>")
# The extent of a bracketed path, honouring quoted strings (which may contain ">" or " ").
_PATH_EXTENT_RE = re.compile(r'<(?:[^<>"\\]|"(?:[^"\\]|\\.)*")*>')
_DOT_STRING_RE = re.compile(_DOT_STRING)
_LDH_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_QPAIR_RE = re.compile(r"\\(.)")
_POSTMASTER = "postmaster"


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A parsed mailbox: what a path names once any source route is removed.

    ``local_part`` is exactly as sent (a quoted local part keeps its quotes and escapes);
    ``domain`` is exactly as sent (an address literal keeps its brackets) and is ``""`` only
    for the special recipient ``<postmaster>``. ``route`` holds the source-route domains
    that were stripped (RFC 5321 4.1.1.3, C.: servers SHOULD ignore them).
    """

    local_part: str
    domain: str
    route: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        """Canonical ``local@domain`` (``postmaster`` alone for the bare postmaster)."""
        return f"{self.local_part}@{self.domain}" if self.domain else self.local_part

    def __str__(self) -> str:
        return self.address

    @property
    def routing_domain(self) -> str:
        """The domain mail for this mailbox is routed by: lower-cased; ``""`` for the bare
        postmaster (which always means this host)."""
        return self.domain.lower()

    @property
    def is_address_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def is_quoted(self) -> bool:
        return self.local_part.startswith('"')

    @property
    def unquoted_local_part(self) -> str:
        """The local part with quoting removed: ``"john doe"`` -> ``john doe``."""
        if not self.is_quoted:
            return self.local_part
        return _QPAIR_RE.sub(r"\1", self.local_part[1:-1])

    @property
    def has_routing_chars(self) -> bool:
        """True when the local part contains ``@``, ``%`` or ``!``: the sender-routing
        tricks (``user%other@domain``, ``other!user@domain``, ``"user@other"@domain``)
        that an open-relay test tries. The domain is still the final one; relay policy
        decides whether to refuse such addresses for domains it relays to."""
        local = self.unquoted_local_part
        return "@" in local or "%" in local or "!" in local

    @property
    def is_postmaster(self) -> bool:
        return self.domain == "" and self.local_part.lower() == _POSTMASTER

    @property
    def is_ascii(self) -> bool:
        return self.local_part.isascii() and self.domain.isascii()


def _check_ascii(text: str, smtputf8: bool) -> None:
    if not smtputf8 and not text.isascii():
        raise AddressError("non-ASCII address without SMTPUTF8", non_ascii=True)


def _check_literal(literal: str) -> None:
    """Validate an address literal ``[...]`` (RFC 5321 4.1.3)."""
    inner = literal[1:-1]
    if inner[:5].lower() == "ipv6:":
        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            raise AddressError(f"invalid IPv6 address literal {literal!r}") from None
        return
    if ":" in inner:
        tag = inner.partition(":")[0]
        if not _LDH_RE.fullmatch(tag):
            raise AddressError(f"invalid address literal {literal!r}")
        return
    try:
        ipaddress.IPv4Address(inner)
    except ValueError:
        raise AddressError(f"invalid IPv4 address literal {literal!r}") from None


#: RFC 1035 2.3.4 / RFC 5321 4.5.3.1.2: a label at most 63 octets, a domain at most 255.
LABEL_MAX, DOMAIN_MAX = 63, 255


def _check_domain(domain: str) -> None:
    """An address literal's syntax, or a domain's sizes: a name DNS cannot carry is
    refused here rather than bounced later."""
    if domain.startswith("["):
        _check_literal(domain)
        return
    raw = domain.encode("utf-8", "surrogateescape")
    if len(raw) > DOMAIN_MAX or any(len(label) > LABEL_MAX for label in raw.split(b".")):
        raise AddressError(f"domain too long for DNS {domain[:80]!r}")


def parse_mailbox(text: str, *, smtputf8: bool = False) -> Mailbox:
    """Parse a bare ``local@domain`` (no brackets, no route)."""
    _check_ascii(text, smtputf8)
    m = _MAILBOX_RE.fullmatch(text)
    if not m:
        raise AddressError(f"invalid mailbox {text!r}")
    local, domain = m.group(1), m.group(2)
    _check_domain(domain)
    return Mailbox(local, domain)


def parse_path(
    text: str,
    *,
    smtputf8: bool = False,
    allow_null: bool = False,
    allow_postmaster: bool = False,
) -> Mailbox | None:
    """Parse a bracketed path (``<...>``, brackets included).

    Returns None for the null path ``<>`` when ``allow_null`` (MAIL FROM only). With
    ``allow_postmaster`` the bare ``<postmaster>`` (any case) is accepted (RCPT TO only,
    RFC 5321 4.1.1.3) as ``Mailbox("postmaster", "")``. A source route is accepted and
    removed; the mailbox keeps it in ``route`` for logging only.

    Raises AddressError; ``non_ascii`` is set when the address is non-ASCII and
    ``smtputf8`` is False.
    """
    if text == "<>":
        if allow_null:
            return None
        raise AddressError("null path not allowed here")
    _check_ascii(text, smtputf8)
    if (
        allow_postmaster
        and text[1:-1].lower() == _POSTMASTER
        and text.startswith("<")
        and text.endswith(">")
    ):
        return Mailbox(text[1:-1], "")
    m = _PATH_RE.fullmatch(text)
    if not m:
        raise AddressError(f"invalid path {text!r}")
    adl, local, domain = m.group(1), m.group(2), m.group(3)
    _check_domain(domain)
    route = tuple(d[1:] for d in adl.split(",")) if adl else ()
    return Mailbox(local, domain, route)


def split_path(arg: str) -> tuple[str, str]:
    """Split ``<path> params`` (the text after ``FROM:`` / ``TO:``) into the bracketed path
    and the parameter text. Spaces before the path are tolerated (``MAIL FROM: <a@b>``,
    common and harmless); the path must be bracketed. Raises AddressError."""
    arg = arg.lstrip(" ")
    m = _PATH_EXTENT_RE.match(arg)
    if not m:
        raise AddressError("path must be enclosed in <>")
    path, rest = m.group(0), arg[m.end() :]
    if rest and rest[0] != " ":
        raise AddressError("garbage after path")
    return path, rest.strip(" ")


_KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE_RE = re.compile(f"[\\x21-\\x3c\\x3e-\\x7e{_U}]+")


def parse_params(text: str) -> dict[str, str | None]:
    """Parse ``esmtp-param *(SP esmtp-param)`` (RFC 5321 4.1.2) into an ordered dict.

    Keywords are upper-cased; a keyword without ``=value`` maps to None. Values are returned
    as sent (xtext is decoded by the parameter's own parser). Raises ParamError on bad
    syntax and on a keyword given twice (``duplicate`` set).
    """
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _KEYWORD_RE.fullmatch(key):
            raise ParamError(f"invalid parameter keyword {key!r}")
        if eq and not _VALUE_RE.fullmatch(value):
            raise ParamError(f"invalid value for parameter {key!r}")
        key = key.upper()
        if key in params:
            raise ParamError(f"duplicate parameter {key}", duplicate=key)
        params[key] = value if eq else None
    return params


_XTEXT_RE = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*")
_HEXCHAR_RE = re.compile(r"\+([0-9A-Fa-f]{2})")


def xtext_decode(text: str) -> str:
    """Decode RFC 3461 xtext (``+HH`` escapes; lower-case hex is tolerated).

    The decoded bytes must be UTF-8 (which covers the US-ASCII of RFC 3461). Raises
    ValueError."""
    if not _XTEXT_RE.fullmatch(text):
        raise ValueError(f"invalid xtext {text!r}")
    if "+" not in text:
        return text
    raw = _HEXCHAR_RE.sub(lambda m: chr(int(m.group(1), 16)), text)
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise ValueError(f"xtext {text!r} does not decode to UTF-8") from None


def xtext_encode(text: str) -> str:
    """Encode text as xtext: ``+``, ``=``, controls, space and non-ASCII as ``+HH``."""
    out = []
    for byte in text.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (43, 61):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


_NOTIFY_KEYWORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def parse_notify(value: str | None) -> list[str]:
    """RCPT ``NOTIFY=`` (RFC 3461 4.1): ``NEVER`` alone, or a comma-separated subset of
    SUCCESS, FAILURE, DELAY (each once). Returns the upper-cased keywords in the order
    given. Raises ValueError."""
    if not value:
        raise ValueError("NOTIFY needs a value")
    words = value.upper().split(",")
    if words == ["NEVER"]:
        return words
    if len(set(words)) != len(words) or not set(words) <= _NOTIFY_KEYWORDS:
        raise ValueError(f"invalid NOTIFY value {value!r}")
    return words


_ADDR_TYPE_RE = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")


def parse_orcpt(value: str | None) -> str:
    """RCPT ``ORCPT=addr-type;xtext`` (RFC 3461 4.2) -> ``"addr-type;decoded"``.
    Raises ValueError."""
    if not value:
        raise ValueError("ORCPT needs a value")
    addr_type, sep, xtext = value.partition(";")
    if not sep or not _ADDR_TYPE_RE.fullmatch(addr_type) or not xtext:
        raise ValueError(f"invalid ORCPT value {value!r}")
    return f"{addr_type};{xtext_decode(xtext)}"


def format_orcpt(orcpt: str) -> str:
    """The reverse of parse_orcpt: ``"rfc822;a+b@c"`` -> ``"rfc822;a+2Bb@c"``."""
    addr_type, _, address = orcpt.partition(";")
    return f"{addr_type};{xtext_encode(address)}"
