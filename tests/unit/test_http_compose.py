"""MIME building for the injection APIs: header folding and encoding, bodies, the
message plans (shapes, attachments byte for byte) and complete RFC 5322 texts."""

from __future__ import annotations

import email
import email.policy
import random
from email.message import EmailMessage

import pytest

from relay.http import compose
from relay.http.compose import (
    Attachment,
    ComposeError,
    MailboxHeader,
    MessagePlan,
    RecipientHeader,
    Rfc822Plan,
    TextHeader,
    encode_body,
    finish_rfc822,
    fold_header,
    format_address,
)
from relay.http.templates import HEADER, HTML, SPARKPOST, TEXT, Field, compile_field


def field(source: str, name: str = "content.x", mode: str = TEXT) -> Field:
    return compile_field(source, name, dialect=SPARKPOST, mode=mode)


def parse(data: bytes) -> EmailMessage:
    assert b"\n" not in data.replace(b"\r\n", b"") and data.endswith(b"\r\n")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998 and data.isascii()
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage) and msg.defects == []
    return msg


def header_value(line: bytes) -> str:
    msg = email.message_from_bytes(line + b"\r\n", policy=email.policy.default)
    [(_, value)] = msg.items()
    return str(value)


def test_short_ascii_headers_are_written_as_given() -> None:
    assert fold_header("Subject", "Hello  there") == b"Subject: Hello  there\r\n"


def test_long_headers_are_folded_at_whitespace_and_unfold_to_the_value() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        value = "".join(rng.choice("ab cd\t") for _ in range(rng.randint(1, 400)))
        folded = fold_header("X-Test", value)
        lines = folded[:-2].split(b"\r\n")
        assert b"".join(lines) == b"X-Test: " + value.encode()  # unfolding restores it
        assert all(line.strip() for line in lines)  # no whitespace-only line
        if not value[0].isspace():  # never a break right after the colon
            assert len(lines[0]) > len(b"X-Test: ")
    for _ in range(500):  # short words: every line fits in 78
        value = " ".join("w" * rng.randint(1, 12) for _ in range(rng.randint(1, 60)))
        folded = fold_header("Subject", value)
        assert all(len(line) <= 78 for line in folded.split(b"\r\n"))
        assert header_value(folded) == value


def test_non_ascii_headers_become_encoded_words_that_decode_back() -> None:
    for value in ("Grüße", "Ünïcödé " * 20, "日本語のテキスト" * 10, "mixed ascii and é"):
        folded = fold_header("Subject", value)
        assert folded.isascii()
        assert all(len(line) <= 78 for line in folded.split(b"\r\n"))
        assert header_value(folded) == value


def test_header_values_with_line_breaks_or_unfoldable_lines_are_refused() -> None:
    for bad in ("a\r\nBcc: x@y.z", "a\nb", "a\rb", "nul\x00"):
        with pytest.raises(ValueError):
            fold_header("Subject", bad)
    with pytest.raises(ValueError, match="998"):
        fold_header("X-Long", "x" * 1000)


def test_addresses_are_quoted_or_encoded() -> None:
    assert format_address(None, "a@example.org") == "a@example.org"
    assert format_address("Ann Example", "a@example.org") == "Ann Example <a@example.org>"
    assert format_address('Doe, "J"', "j@example.org") == '"Doe, \\"J\\"" <j@example.org>'
    encoded = format_address("José Müller", "j@example.org")
    assert encoded.isascii()
    parsed = email.message_from_bytes(fold_header("To", encoded) + b"\r\n",
                                      policy=email.policy.default)
    [address] = parsed["To"].addresses
    assert (address.display_name, address.addr_spec) == ("José Müller", "j@example.org")
    with pytest.raises(ValueError):
        format_address("Bad\r\nName", "a@example.org")


def test_parse_addresses_checks_every_address() -> None:
    assert compose.parse_addresses("Ann <a@example.org>, b@example.org") == [
        ("Ann", "a@example.org"), ("", "b@example.org")]
    for bad in ("", "not an address", "a@example.org, broken", "x@[192.0.2.1]"):
        with pytest.raises(ValueError):
            compose.parse_addresses(bad)


def test_bodies_are_7bit_when_they_can_be_and_quoted_printable_otherwise() -> None:
    assert encode_body("a\nb\r\nc\rd") == ("7bit", b"a\r\nb\r\nc\r\nd\r\n")
    assert encode_body("ends\n") == ("7bit", b"ends\r\n")
    for text in ("caf\u00e9", "x" * 999, "nul\x00", "has the secret nonce inside"):
        cte, data = encode_body(text, nonce="secret nonce")
        assert cte == "quoted-printable" and data.endswith(b"\r\n")
        assert max(len(line) for line in data.split(b"\r\n")) <= 76
        part = email.message_from_bytes(
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: "
            b"quoted-printable\r\n\r\n" + data, policy=email.policy.default)
        assert part.get_content() == text + "\r\n"


def plan(*, text: str | None = "Hi {{name}}", html: str | None = None,
         attachments: tuple[Attachment, ...] = ()) -> MessagePlan:
    headers = [
        MailboxHeader("From", field("Shop", "content.from.name", HEADER),
                      field("shop@example.com", "content.from.email", HEADER)),
        RecipientHeader("To", "recipients"),
        TextHeader("Subject", field("Hello {{name}}", "content.subject", HEADER)),
    ]
    return MessagePlan(headers, text=None if text is None else field(text, "content.text"),
                       html=None if html is None else field(html, "content.html", HTML),
                       attachments=attachments)


def test_a_text_only_message() -> None:
    data = plan().render({"name": "Ann"}, to="Ann <a@example.org>")
    assert data == (b"From: Shop <shop@example.com>\r\nTo: Ann <a@example.org>\r\n"
                    b"Subject: Hello Ann\r\nMIME-Version: 1.0\r\n"
                    b'Content-Type: text/plain; charset="utf-8"\r\n'
                    b"Content-Transfer-Encoding: 7bit\r\n\r\nHi Ann\r\n")


def test_each_recipient_gets_its_own_values_and_encodings() -> None:
    p = plan(html="<p>{{name}}</p>")
    first = parse(p.render({"name": "Ann"}, to="a@example.org"))
    second = parse(p.render({"name": "Zoë <z>"}, to="z@example.org"))
    assert (first["Subject"], first["To"]) == ("Hello Ann", "a@example.org")
    assert (second["Subject"], second["To"]) == ("Hello Zoë <z>", "z@example.org")
    assert first.get_body(("plain",))["Content-Transfer-Encoding"] == "7bit"
    assert second.get_body(("plain",))["Content-Transfer-Encoding"] == "quoted-printable"
    assert second.get_body(("plain",)).get_content() == "Hi Zoë <z>\r\n"
    assert second.get_body(("html",)).get_content() == "<p>Zoë &lt;z&gt;</p>\r\n"
    assert second.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in second.iter_parts()] == ["text/plain", "text/html"]


def test_a_body_containing_the_boundary_is_quoted_printable() -> None:
    p = plan(text="Hi\n{{body}}", html="<p>x</p>")
    body = f"--=_{p.nonce}_alt--\n"
    msg = parse(p.render({"name": "Ann", "body": body}, to="a@example.org"))
    assert msg.get_body(("plain",)).get_content() == f"Hi\r\n--=_{p.nonce}_alt--\r\n"
    assert msg.get_body(("plain",))["Content-Transfer-Encoding"] == "quoted-printable"
    assert len(list(msg.iter_parts())) == 2


def test_attachments_and_inline_images_byte_for_byte() -> None:
    rng = random.Random(3)
    blob = bytes(rng.randrange(256) for _ in range(10_000))
    image = bytes(rng.randrange(256) for _ in range(700))
    p = plan(html='<img src="cid:logo">', attachments=(
        Attachment("image/png", image, "logo.png", "logo"),
        Attachment("application/octet-stream", blob, "données.bin"),
        Attachment("text/csv; charset=utf-8", b"a,b\r\n1,2\r\n"),
        Attachment("application/pdf", b""),
    ))
    msg = parse(p.render({"name": "Ann"}, to="a@example.org"))
    assert msg.get_content_type() == "multipart/mixed"
    related = msg.get_payload()[0]
    assert related.get_content_type() == "multipart/related"
    assert related.get_param("type") == "multipart/alternative"
    logo = related.get_payload()[1]
    assert (logo["Content-ID"], logo.get_content_disposition(), logo.get_filename()) == (
        "<logo>", "inline", "logo.png")
    assert logo.get_content() == image
    attached = list(msg.iter_attachments())
    assert [a.get_filename() for a in attached] == ["données.bin", None, None]
    assert attached[0].get_content() == blob
    assert attached[1].get_content_type() == "text/csv"
    assert attached[1].get_content() == "a,b\r\n1,2\r\n"
    assert attached[2].get_content() == b""


@pytest.mark.parametrize(("attachment", "why"), [
    (Attachment("not a type", b"x", field="f"), "MIME type"),
    (Attachment("multipart/mixed", b"x", field="f"), "multipart"),
    (Attachment("image/png", b"x", "a\nb", field="f"), "file name"),
    (Attachment("image/png", b"x", None, "<bad id>", field="f"), "Content-ID"),
])
def test_bad_attachments_are_refused(attachment: Attachment, why: str) -> None:
    with pytest.raises(ComposeError, match=why) as info:
        plan(attachments=(attachment,))
    assert info.value.field == "f"


def test_constant_problems_are_found_when_the_plan_is_built() -> None:
    with pytest.raises(ComposeError) as info:
        MessagePlan([TextHeader("X-A", field("bad\nvalue", "content.headers.X-A", HEADER))],
                    text=field("x"), html=None)
    assert info.value.field == "content.headers.X-A"
    with pytest.raises(ComposeError) as info:
        MessagePlan([MailboxHeader("From", None, field("nope", "content.from.email", HEADER))],
                    text=field("x"), html=None)
    assert info.value.field == "content.from.email"
    with pytest.raises(ComposeError):
        MessagePlan([], text=None, html=None)


def test_per_recipient_header_problems_raise_compose_errors() -> None:
    p = plan()
    with pytest.raises(ComposeError) as info:
        p.render({"name": "a\r\nBcc: x@y.z"}, to="a@example.org")
    assert info.value.field == "content.subject"
    from_plan = MessagePlan([MailboxHeader("From", None, field("{{f}}", "content.from.email",
                                                                HEADER))],
                            text=field("x"), html=None)
    assert parse(from_plan.render({"f": "ok@example.com"}))["From"] == "ok@example.com"
    with pytest.raises(ComposeError):
        from_plan.render({"f": "not-an-address"})


def test_finish_rfc822_normalises_and_checks() -> None:
    assert finish_rfc822("Subject: x\nX-A: 1\n\nbody\rmore") == (
        b"Subject: x\r\nX-A: 1\r\nMIME-Version: 1.0\r\n\r\nbody\r\nmore\r\n")
    kept = "Mime-Version: 1.0\r\nSubject: x\r\n folded\r\n\r\nb\r\n"
    assert finish_rfc822(kept) == kept.encode()
    assert finish_rfc822("Subject: only headers") == (
        b"Subject: only headers\r\nMIME-Version: 1.0\r\n")
    for bad in ("", "\r\nbody", "no colon here\r\n\r\nb", " starts folded: x\r\n\r\nb",
                "Subject: x\r\n\r\n" + "y" * 999):
        with pytest.raises(ValueError):
            finish_rfc822(bad)


def test_rfc822_plans_finish_constants_once() -> None:
    constant = Rfc822Plan(field("Subject: hi\n\nbody"))
    assert constant.render({}) is constant.render({"x": 1})
    with pytest.raises(ComposeError) as info:
        Rfc822Plan(field("no header", "content.email_rfc822"))
    assert info.value.field == "content.email_rfc822"
    templated = Rfc822Plan(field("Subject: {{s}}\n\nbody"))
    assert templated.render({"s": "one"}) == b"Subject: one\r\nMIME-Version: 1.0\r\n\r\nbody\r\n"
    with pytest.raises(ComposeError):
        templated.render({"s": "x\nnot a header line"})
