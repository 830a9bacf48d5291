"""The author domain of a message: the domain of its ``From:`` address (RFC 5322 3.6.2).

This is what DMARC aligns a DKIM signature with (RFC 7489 3.1), so it is what chooses
the author signers. Read from the bytes with a few regular expressions, not a full
RFC 5322 parser: quoted strings and comments (where an ``@`` may hide) are removed
first, then the address's domain is taken. A message must have exactly one ``From:``
field with addresses in exactly one domain; anything else has no author domain (the
reason says why), as mailbox providers treat such mail as unauthenticatable.
"""

from __future__ import annotations

import re

__all__ = ["author_domain"]

_FROM_RE = re.compile(rb"\r\nfrom[ \t]*:((?:[^\r\n]|\r\n[ \t])*)", re.IGNORECASE)
_QUOTED_RE = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_COMMENT_RE = re.compile(rb"\((?:[^()\\]|\\.)*\)", re.DOTALL)
_DOMAIN_RE = re.compile(rb"@([A-Za-z0-9\x80-\xff._-]+)")


def _ascii_domain(raw: bytes) -> str | None:
    """The lower-case A-label form of a domain as written, None if it is not one."""
    name = raw.rstrip(b".").lower()
    if name.isascii():
        return name.decode("ascii") or None
    try:
        return name.decode("utf-8").encode("idna").decode("ascii")
    except (UnicodeError, ValueError):
        return None


def author_domain(section: bytes) -> tuple[str | None, str]:
    """(domain, "") from a header section's ``From:`` field, or (None, why not)."""
    values = _FROM_RE.findall(section if section.startswith(b"\r\n") else b"\r\n" + section)
    if not values:
        return None, "no From: field"
    if len(values) > 1:
        return None, f"{len(values)} From: fields"
    value = _QUOTED_RE.sub(b"", values[0])
    for _ in range(3):  # comments nest: peel a few levels
        value = _COMMENT_RE.sub(b"", value)
    domains = {_ascii_domain(d) for d in _DOMAIN_RE.findall(value)}
    if not domains:
        return None, "no address in From:"
    if None in domains:
        return None, "From: domain is not a domain name"
    if len(domains) > 1:
        return None, "From: addresses in several domains"
    return domains.pop(), ""
