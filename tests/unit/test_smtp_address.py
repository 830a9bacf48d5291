"""RFC 5321 path/mailbox parsing, ESMTP parameters, xtext and DSN parameters."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.smtp import (
    AddressError,
    Mailbox,
    ParamError,
    format_orcpt,
    parse_mailbox,
    parse_notify,
    parse_orcpt,
    parse_params,
    parse_path,
    split_path,
    xtext_decode,
    xtext_encode,
)


@pytest.mark.parametrize(
    ("path", "local", "domain"),
    [
        ("<user@example.com>", "user", "example.com"),
        ("<first.last+tag@sub.example.com>", "first.last+tag", "sub.example.com"),
        ("<!#$%&'*+-/=?^_`{|}~@x.example>", "!#$%&'*+-/=?^_`{|}~", "x.example"),
        ('<"john doe"@example.com>', '"john doe"', "example.com"),
        ('<"a\\"b"@example.com>', '"a\\"b"', "example.com"),
        ('<"a>b"@example.com>', '"a>b"', "example.com"),
        ("<user@[192.0.2.1]>", "user", "[192.0.2.1]"),
        ("<user@[IPv6:2001:db8::1]>", "user", "[IPv6:2001:db8::1]"),
        ("<user@[x-tag:whatever]>", "user", "[x-tag:whatever]"),
        ("<u@a-b.c-d.example>", "u", "a-b.c-d.example"),
        ("<u@localhost>", "u", "localhost"),
    ],
)
def test_valid_paths(path: str, local: str, domain: str) -> None:
    mb = parse_path(path)
    assert mb == Mailbox(local, domain)
    assert mb.address == f"{local}@{domain}"
    assert str(mb) == mb.address


@pytest.mark.parametrize(
    "path",
    [
        "user@example.com",
        "<user@example.com",
        "<user>",
        "<@example.com>",
        "<user@>",
        "<user@@example.com>",
        "<us er@example.com>",
        "<.user@example.com>",
        "<user.@example.com>",
        "<us..er@example.com>",
        "<user@-example.com>",
        "<user@example-.com>",
        "<user@example..com>",
        "<user@example.com.>",
        "<user@[300.1.1.1]>",
        "<user@[IPv6:nope]>",
        "<user@[1.2.3]>",
        '<"unterminated@example.com>',
        "<a@b.example> ",
        "<user@exa_mple.com>",
        "<@a.example:user@b.example:x>",
        "<>",
        "<user@" + "a" * 64 + ".example>",  # a label DNS cannot carry
        "<user@" + "abcdefghij." * 23 + "example>",  # 256 octets
    ],
)
def test_invalid_paths(path: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_path(path)
    assert not info.value.non_ascii


def test_null_path_and_postmaster() -> None:
    assert parse_path("<>", allow_null=True) is None
    mb = parse_path("<PostMaster>", allow_postmaster=True)
    assert mb is not None and mb.is_postmaster and mb.address == "PostMaster"
    assert mb.routing_domain == ""
    with pytest.raises(AddressError):
        parse_path("<postmaster>")
    # postmaster@domain is an ordinary mailbox.
    mb = parse_path("<postmaster@x.example>", allow_postmaster=True)
    assert mb is not None and not mb.is_postmaster


def test_source_route_is_stripped() -> None:
    mb = parse_path("<@a.example,@b.example:user@c.example>")
    assert mb is not None
    assert mb.address == "user@c.example"
    assert mb.route == ("a.example", "b.example")
    assert mb.routing_domain == "c.example"


@pytest.mark.parametrize(
    ("path", "domain"),
    [
        ("<user%other.example@relay.example>", "relay.example"),
        ("<other.example!user@relay.example>", "relay.example"),
        ('<"user@other.example"@relay.example>', "relay.example"),
        ('<"user@other.example"@[192.0.2.7]>', "[192.0.2.7]"),
    ],
)
def test_relay_tricks_are_judged_by_final_domain(path: str, domain: str) -> None:
    mb = parse_path(path)
    assert mb is not None
    assert mb.routing_domain == domain
    assert mb.has_routing_chars
    assert not parse_path("<plain@relay.example>").has_routing_chars  # type: ignore[union-attr]


def test_unquoted_local_part() -> None:
    mb = parse_path('<"john \\"j\\" doe"@example.com>')
    assert mb is not None and mb.is_quoted
    assert mb.unquoted_local_part == 'john "j" doe'
    assert mb.local_part == '"john \\"j\\" doe"'


def test_utf8_needs_smtputf8() -> None:
    with pytest.raises(AddressError) as info:
        parse_path("<j\u00f6rg@example.com>")
    assert info.value.non_ascii
    mb = parse_path("<j\u00f6rg@b\u00fccher.example>", smtputf8=True)
    assert mb is not None and mb.domain == "b\u00fccher.example" and not mb.is_ascii
    # Bytes that were not UTF-8 (lone surrogates from surrogateescape) never parse.
    with pytest.raises(AddressError) as info:
        parse_path("<j\udcf6rg@example.com>", smtputf8=True)
    assert not info.value.non_ascii


def test_parse_mailbox() -> None:
    assert parse_mailbox("a@b.example") == Mailbox("a", "b.example")
    with pytest.raises(AddressError):
        parse_mailbox("<a@b.example>")
    with pytest.raises(AddressError):
        parse_mailbox("a@[1.2.3.4.5]")


@pytest.mark.parametrize(
    ("arg", "path", "params"),
    [
        ("<a@b.example>", "<a@b.example>", ""),
        (" <a@b.example> SIZE=10", "<a@b.example>", "SIZE=10"),
        ("<a@b.example>  SIZE=10  BODY=8BITMIME ", "<a@b.example>", "SIZE=10  BODY=8BITMIME"),
        ('<"x> y"@b.example> RET=FULL', '<"x> y"@b.example>', "RET=FULL"),
        ("<>", "<>", ""),
    ],
)
def test_split_path(arg: str, path: str, params: str) -> None:
    assert split_path(arg) == (path, params)


@pytest.mark.parametrize("arg", ["a@b.example", "<a@b.example>SIZE=1", "", "<a@b.example"])
def test_split_path_errors(arg: str) -> None:
    with pytest.raises(AddressError):
        split_path(arg)


def test_parse_params() -> None:
    assert parse_params("size=10 smtputf8 BODY=8BITMIME") == {
        "SIZE": "10",
        "SMTPUTF8": None,
        "BODY": "8BITMIME",
    }
    assert parse_params("") == {}
    with pytest.raises(ParamError) as info:
        parse_params("SIZE=1 size=2")
    assert info.value.duplicate == "SIZE"
    for bad in ["=x", "-X=1", "X=a=b", "X=", "X=\x01"]:
        with pytest.raises(ParamError):
            parse_params(bad)


@pytest.mark.parametrize(
    ("xtext", "text"),
    [
        ("abc", "abc"),
        ("a+2Bb", "a+b"),
        ("a+3Db", "a=b"),
        ("+20lead", " lead"),
        ("a+2bb", "a+b"),
        ("caf+C3+A9", "caf\u00e9"),
        ("", ""),
    ],
)
def test_xtext_decode(xtext: str, text: str) -> None:
    assert xtext_decode(xtext) == text


@pytest.mark.parametrize("bad", ["a+", "a+2", "a+ZZ", "a b", "a=b", "+FF"])
def test_xtext_decode_errors(bad: str) -> None:
    with pytest.raises(ValueError):
        xtext_decode(bad)


@given(st.text())
def test_xtext_round_trip(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return
    encoded = xtext_encode(text)
    assert encoded.isascii() and " " not in encoded and "=" not in encoded
    assert xtext_decode(encoded) == text


def test_notify_and_orcpt() -> None:
    assert parse_notify("never") == ["NEVER"]
    assert parse_notify("Delay,Failure") == ["DELAY", "FAILURE"]
    for bad in [None, "", "NEVER,DELAY", "SUCCESS,SUCCESS", "SOMETIMES", "SUCCESS,"]:
        with pytest.raises(ValueError):
            parse_notify(bad)
    assert parse_orcpt("rfc822;bob+2Bx@example.org") == "rfc822;bob+x@example.org"
    assert format_orcpt("rfc822;bob+x@example.org") == "rfc822;bob+2Bx@example.org"
    for bad in [None, "", "rfc822", "rfc822;", ";a@b", "rfc 822;a@b", "rfc822;a+zz"]:
        with pytest.raises(ValueError):
            parse_orcpt(bad)


def test_longest_label_and_domain_are_accepted() -> None:
    label = "a" * 63
    assert parse_path(f"<u@{label}.example>") is not None
    domain = ("abcdefghi." * 25)[:247] + "example"  # 254 octets
    assert len(domain) <= 255
    assert parse_path(f"<u@{domain}>") is not None
