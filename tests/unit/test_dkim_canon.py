"""DKIM canonicalisation against the RFCs' own examples and published signatures.

RFC 6376 3.4.5 gives one message canonicalised both ways; RFC 8463 Appendix A.3 gives a
message signed by someone else (Ed25519 and RSA, relaxed/relaxed) with its keys: if our
canonicalisation of it differs by one octet, their signatures do not verify over it.
"""

from __future__ import annotations

import base64
import hashlib
import re

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from relay.dkim.canon import (
    canonical_body,
    canonical_header,
    field_name,
    relaxed_body,
    relaxed_header,
    select_fields,
    simple_body,
    split_fields,
    split_message,
)

# RFC 6376 3.4.5: "A: <SP> X <CRLF> B <SP> : <SP> Y <HTAB><CRLF> <HTAB> Z <SP><SP><CRLF>
# <CRLF> <SP> C <SP><CRLF> D <SP><HTAB><SP> E <CRLF> <CRLF> <CRLF>"
RFC6376_EXAMPLE = b"A: X\r\nB : Y\t\r\n\tZ  \r\n\r\n C \r\nD \t E\r\n\r\n\r\n"


def test_rfc6376_3_4_5_relaxed() -> None:
    section, body = split_message(RFC6376_EXAMPLE)
    head = b"".join(relaxed_header(f) for f in split_fields(section))
    assert head == b"a:X\r\nb:Y Z\r\n"
    assert relaxed_body(body) == b" C\r\nD E\r\n"


def test_rfc6376_3_4_5_simple() -> None:
    section, body = split_message(RFC6376_EXAMPLE)
    head = b"".join(canonical_header(f, "simple") for f in split_fields(section))
    assert head == b"A: X\r\nB : Y\t\r\n\tZ  \r\n"
    assert simple_body(body) == b" C \r\nD \t E\r\n"


def _b64_sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def test_empty_body_hashes_are_the_well_known_ones() -> None:
    # RFC 6376 3.4.3: simple makes an empty body one CRLF; 3.4.4 (errata 3133): relaxed
    # leaves it empty. These bh= values appear in every DKIM implementation's tests.
    assert _b64_sha256(canonical_body(b"", "simple")) == \
        "frcCV1k9oG9oKj3dpUqdJg1PxRT2RSN/XKdLCPjaYaY="
    assert _b64_sha256(canonical_body(b"", "relaxed")) == \
        "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
    assert canonical_body(b"\r\n\r\n \t\r\n", "relaxed") == b""
    assert canonical_body(b"\r\n\r\n", "simple") == b"\r\n"


@pytest.mark.parametrize(("body", "simple", "relaxed"), [
    (b"a\r\n\r\n\r\n", b"a\r\n", b"a\r\n"),              # trailing empty lines go
    (b"a\r\n \r\n\r\n", b"a\r\n \r\n", b"a\r\n"),       # a blank line is empty only relaxed
    (b"a", b"a\r\n", b"a\r\n"),                          # a last line gets its CRLF
    (b"a \t", b"a \t\r\n", b"a\r\n"),                    # ... relaxed without its WSP
    (b"\r\nx\r\n", b"\r\nx\r\n", b"\r\nx\r\n"),          # leading empty lines stay
    (b"x\r\r\n", b"x\r\r\n", b"x\r\r\n"),                # a lone CR is content
    (b"x\n\r\n\r\n", b"x\n\r\n", b"x\n\r\n"),            # so is a lone LF
    (b"\xff\x00 \x80\t\t\xfe\r\n", b"\xff\x00 \x80\t\t\xfe\r\n", b"\xff\x00 \x80 \xfe\r\n"),
])
def test_body_edge_cases(body: bytes, simple: bytes, relaxed: bytes) -> None:
    assert simple_body(body) == simple
    assert relaxed_body(body) == relaxed


def test_relaxed_header_unfolds_and_lowercases_only_the_name() -> None:
    assert relaxed_header(b"SUBJECT \t:  Hello \r\n\t World\t ") == b"subject:Hello World\r\n"
    assert relaxed_header(b"X-8bit: caf\xc3\xa9  \xc3\x89T\xc3\x89") == \
        b"x-8bit:caf\xc3\xa9 \xc3\x89T\xc3\x89\r\n"
    assert relaxed_header(b"Empty:") == b"empty:\r\n"


def test_split_message_edges() -> None:
    assert split_message(b"A: 1\r\n\r\nbody\r\n\r\n") == (b"A: 1\r\n", b"body\r\n\r\n")
    assert split_message(b"A: 1\r\n") == (b"A: 1\r\n", b"")
    assert split_message(b"\r\nbody\r\n\r\nmore") == (b"", b"body\r\n\r\nmore")
    assert split_fields(b"A: 1\r\n\tcont\r\nB: 2\r\n") == [b"A: 1\r\n\tcont", b"B: 2"]


def test_fields_are_selected_bottom_up_and_over_signed_names_add_nothing() -> None:
    fields = [b"Received: 1", b"From: a@x", b"RECEIVED: 2", b"To: b@y"]
    assert field_name(b"Subject : x") == b"subject"
    picked = select_fields(fields, [b"received", b"received", b"received", b"from", b"cc"])
    assert picked == [b"RECEIVED: 2", b"Received: 1", b"From: a@x"]


# -- RFC 8463 Appendix A: someone else's signatures, byte for byte -------------------------

RFC8463_SIGNED = b"".join(line + b"\r\n" for line in [
    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;",
    b" d=football.example.com; i=@football.example.com;",
    b" q=dns/txt; s=brisbane; t=1528637909; h=from : to :",
    b" subject : date : message-id : from : subject : date;",
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;",
    b" b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus",
    b" Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==",
    b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;",
    b" d=football.example.com; i=@football.example.com;",
    b" q=dns/txt; s=test; t=1528637909; h=from : to : subject :",
    b" date : message-id : from : subject : date;",
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;",
    b" b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3",
    b" DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz",
    b" dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=",
    b"From: Joe SixPack <joe@football.example.com>",
    b"To: Suzie Q <suzie@shopping.example.net>",
    b"Subject: Is dinner ready?",
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)",
    b"Message-ID: <20030712040037.46341.5F8J@football.example.com>",
    b"",
    b"Hi.",
    b"",
    b"We lost the game.  Are you hungry yet?",
    b"",
    b"Joe.",
    b"",
])
RFC8463_ED25519_PUBLIC = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
RFC8463_RSA_PUBLIC = (
    "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQi"
    "Y/J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZy"
    "VYLzBfO2EeC3Ip3G+2kryOTIKT+l/K4w3QIDAQAB")


def _hashed_header_data(signed: bytes, index: int) -> tuple[bytes, bytes]:
    """(what signature ``index`` signs, its b= value), rebuilt with our functions."""
    section, _ = split_message(signed)
    fields = split_fields(section)
    signature = [f for f in fields if field_name(f) == b"dkim-signature"][index]
    tags = dict(re.findall(rb"(\w+)=([^;]*)", re.sub(rb"\s+", b"", signature.partition(b":")[2])))
    names = tags[b"h"].lower().split(b":")
    data = b"".join(relaxed_header(f) for f in select_fields(fields, names))
    unsigned = re.sub(rb"(\sb=)[^;]*", rb"\1", signature)
    return data + relaxed_header(unsigned)[:-2], base64.b64decode(tags[b"b"])


def test_rfc8463_body_hash() -> None:
    _, body = split_message(RFC8463_SIGNED)
    assert _b64_sha256(relaxed_body(body)) == "2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8="


def test_rfc8463_ed25519_signature_verifies_over_our_canonical_headers() -> None:
    data, b = _hashed_header_data(RFC8463_SIGNED, 0)
    public = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(RFC8463_ED25519_PUBLIC))
    public.verify(b, hashlib.sha256(data).digest())  # RFC 8463: Ed25519 over the SHA-256
    with pytest.raises(InvalidSignature):
        public.verify(b, hashlib.sha256(data.replace(b"dinner", b"Dinner")).digest())


def test_rfc8463_rsa_signature_verifies_over_our_canonical_headers() -> None:
    data, b = _hashed_header_data(RFC8463_SIGNED, 1)
    public = serialization.load_der_public_key(base64.b64decode(RFC8463_RSA_PUBLIC))
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(b, data, padding.PKCS1v15(), hashes.SHA256())
