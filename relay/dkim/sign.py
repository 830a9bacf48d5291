"""DKIM signatures (RFC 6376 section 5; Ed25519 by RFC 8463) over a message's bytes.

``Signer`` is one loaded key with its settings (d=, s=, algorithm, signed fields,
canonicalisation, t=/x=); ``sign_message(signers, data, now)`` returns the
``DKIM-Signature:`` fields to put on top of ``data``, one per signer, computed over the
same bytes: the body is canonicalised and hashed once per body canonicalisation, the
header fields are parsed once. Signatures are independent of each other (none signs
another's field), so a verifier may check any one alone.

The signature field is written folded (lines under 80 octets): tags joined by ``; ``,
``h=`` folded at its colons, ``b=`` folded in chunks. What is hashed is exactly what is
written, with an empty ``b=`` value, canonicalised the same way as the other fields, as
RFC 6376 3.7 has the verifier rebuild it.

The crypto is OpenSSL's through ``cryptography``: RSA PKCS#1 v1.5 over the SHA-256 hash
we computed (``Prehashed``, so the header data is hashed once), and Ed25519 over that
same 32-byte hash (RFC 8463 3: "the SHA-256 hash of the canonicalized data" is what
Ed25519 signs, not the data).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from relay.dkim.canon import (
    Canon,
    canonical_body,
    canonical_header,
    index_fields,
    relaxed_header,
    select_indexed,
    split_fields,
    split_message,
)

__all__ = ["Algorithm", "PrivateKey", "Signer", "sign_message"]

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

_PKCS1 = padding.PKCS1v15()
_PREHASHED = Prehashed(hashes.SHA256())
#: Longest line of the folded signature field, CRLF excluded.
_WIDTH = 78


@dataclass(frozen=True)
class Signer:
    """One signature to add: the key and every tag it decides."""

    domain: str
    selector: str
    algorithm: Algorithm
    key: PrivateKey
    #: Field names to sign, in ``h=`` order as configured (case kept for ``h=``).
    headers: tuple[str, ...]
    over_sign: bool = True
    header_canon: Canon = "relaxed"
    body_canon: Canon = "relaxed"
    #: x= is t= plus this many seconds; 0 writes no x=.
    expiration: int = 0
    timestamp: bool = True
    #: ``headers`` lower-cased, as bytes (computed once, for matching fields).
    _names: tuple[bytes, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_names", tuple(h.lower().encode("ascii")
                                                 for h in self.headers))

    @property
    def label(self) -> str:
        """How accounting names it: ``d=example.com s=s2024 a=rsa-sha256``."""
        return f"d={self.domain} s={self.selector} a={self.algorithm}"

    def h_names(self, by_name: dict[bytes, list[bytes]]) -> tuple[list[str], list[bytes]]:
        """``h=`` (as written, and lower-cased): each configured name that is present, as
        often as it occurs (plus once more when over-signing, so no instance can be added
        in transit)."""
        names: list[str] = []
        lowered: list[bytes] = []
        extra = 1 if self.over_sign else 0
        for name, low in zip(self.headers, self._names, strict=True):
            instances = by_name.get(low)
            if instances:
                n = len(instances) + extra
                names += [name] * n
                lowered += [low] * n
        return names, lowered

    def sign(self, by_name: dict[bytes, list[bytes]], body_hash: bytes, now: float) -> bytes:
        """The ``DKIM-Signature:`` field (CRLF-terminated) over the header fields
        ``by_name`` (``canon.index_fields``)."""
        h, lowered = self.h_names(by_name)
        prefix = self._unsigned_field(h, base64.b64encode(body_hash).decode("ascii"), now)
        data = b"".join(canonical_header(f, self.header_canon)
                        for f in select_indexed(by_name, lowered))
        own = relaxed_header(prefix) if self.header_canon == "relaxed" else prefix + b"\r\n"
        digest = hashlib.sha256(data + own[:-2]).digest()
        if isinstance(self.key, rsa.RSAPrivateKey):
            b = self.key.sign(digest, _PKCS1, _PREHASHED)
        else:
            b = self.key.sign(digest)
        return prefix + _fold_value(base64.b64encode(b)) + b"\r\n"

    def _unsigned_field(self, h: list[str], bh: str, now: float) -> bytes:
        """The signature field up to and including ``b=`` (folded), as it is hashed."""
        tags = [f"v=1; a={self.algorithm}; c={self.header_canon}/{self.body_canon};",
                f"d={self.domain};", f"s={self.selector};"]
        if self.timestamp:
            tags.append(f"t={int(now)};")
            if self.expiration:
                tags.append(f"x={int(now) + self.expiration};")
        elif self.expiration:  # x= without t=: still relative to now
            tags.append(f"x={int(now) + self.expiration};")
        lines = _fill("DKIM-Signature:", tags)
        lines += _fill("\th=", [f"{n}:" for n in h[:-1]] + [f"{h[-1]};"], sep="")
        lines.append(f"\tbh={bh};")
        return ("\r\n".join(lines) + "\r\n\tb=").encode("ascii")


def _fill(first: str, words: list[str], sep: str = " ") -> list[str]:
    """``words`` after ``first`` joined by ``sep``, wrapped into lines of at most
    ``_WIDTH`` octets; a continuation line starts with a tab (folding whitespace, which
    the verifier's parsing ignores)."""
    lines = [first]
    for word in words:
        if lines[-1] != first and len(lines[-1]) + len(sep) + len(word) > _WIDTH:
            lines.append("\t" + word)
        else:
            lines[-1] += sep + word
    return lines


def _fold_value(b64: bytes, first: int = 60, width: int = 72) -> bytes:
    """The ``b=`` value in chunks on tab-indented lines (folding inside a base64 value is
    allowed: the verifier removes whitespace, RFC 6376 3.5)."""
    chunks = [b64[:first]] + [b64[i:i + width] for i in range(first, len(b64), width)]
    return b"\r\n\t".join(c for c in chunks if c)


def sign_message(signers: Sequence[Signer], data: bytes, now: float, *,
                 prefix: bytes = b"") -> list[bytes]:
    """One ``DKIM-Signature:`` field per signer over ``prefix + data`` (a CRLF message,
    exactly as it will be stored and sent; ``prefix`` is header lines to go on top, kept
    apart so the body is not copied), in ``signers`` order; none for a message without a
    ``From:`` field (RFC 6376 5.4: it must be signed). ``now`` is t=."""
    section, body = split_message(data)
    by_name = index_fields(split_fields(prefix + section))
    if not signers or b"from" not in by_name:  # RFC 6376 5.4: From must be signed
        return []
    hashes_: dict[Canon, bytes] = {}
    out = []
    for signer in signers:
        bh = hashes_.get(signer.body_canon)
        if bh is None:
            bh = hashes_[signer.body_canon] = hashlib.sha256(
                canonical_body(body, signer.body_canon)).digest()
        out.append(signer.sign(by_name, bh, now))
    return out
