"""KumoMTA's inject API: the documented examples, the builder, templates and errors.
Sans-I/O: bodies in, Injection out, messages parsed back."""

from __future__ import annotations

import base64
import email
import email.policy
import json
from email.message import EmailMessage
from typing import Any

import pytest

from relay.http.kumo import kumo_injection
from relay.http.payload import Injection, PayloadError

NOW = 1_700_000_000.0
GIF = "R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7"


def inject(payload: dict[str, Any] | bytes, max_recipients: int = 100) -> Injection:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return kumo_injection(body, now=NOW, max_recipients=max_recipients)


def refused(payload: dict[str, Any] | bytes) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        inject(payload)
    return info.value


def parse(data: bytes, seven_bit: bool = True) -> EmailMessage:
    """Parse a produced message, checking the wire rules on the way."""
    assert b"\n" not in data.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in data.replace(b"\r\n", b""), "bare CR"
    assert data.endswith(b"\r\n")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert data.isascii() or not seven_bit, "not 7-bit clean"
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def body_of(msg: EmailMessage, subtype: str) -> str:
    part = msg.get_body((subtype,))
    assert part is not None, f"no text/{subtype} part"
    return part.get_content()


def builder(**content: Any) -> dict[str, Any]:
    base = {"from": {"email": "sender@example.com"}, "subject": "Hello", "text_body": "Hi"}
    return {"envelope_sender": "bounce@example.com",
            "recipients": [{"email": "rcpt@example.org"}], "content": {**base, **content}}


def test_the_basic_documented_example() -> None:
    # docs/reference/http/kumod/api_inject_v1_post.md (minus its trailing comma)
    inj = inject({"envelope_sender": "noreply@example.com",
                  "content": "Subject: hello\n\nHello there",
                  "recipients": [{"email": "recipient@example.com"}]})
    assert inj.sender == "noreply@example.com" and inj.failures == []
    [m] = inj.messages
    assert (m.index, m.address, m.metadata, m.tags) == (0, "recipient@example.com", {}, [])
    assert m.data == b"Subject: hello\r\nMIME-Version: 1.0\r\n\r\nHello there\r\n"


def test_the_documented_example_with_its_trailing_comma_is_not_json() -> None:
    text = ('{"envelope_sender": "noreply@example.com", "content": "Subject: hello\\n\\nHello",'
            ' "recipients": [{"email": "recipient@example.com",}]}')
    err = refused(text.encode())
    assert (err.status, err.code) == (400, "invalid_json")


def test_the_documented_templating_example() -> None:
    inj = inject({"envelope_sender": "noreply@example.com",
                  "content": "To: \"{{ name }}\" <{{ email }}>\nSubject: hello\n\n"
                             "Hello {{ name }}!",
                  "recipients": [{"email": "recipient@example.com", "name": "John Smith"}]})
    [m] = inj.messages
    assert m.data == (b'To: "John Smith" <recipient@example.com>\r\nSubject: hello\r\n'
                      b"MIME-Version: 1.0\r\n\r\nHello John Smith!\r\n")


def test_the_full_documented_request_example() -> None:
    inj = inject({
        "content": "From: user@example.com\nSubject: Hello\n\nHello there",
        "deferred_generation": False, "deferred_spool": False,
        "envelope_sender": "some.id@bounces.sender-example.com",
        "recipients": [{"email": "john.smith@mailbox-example.com",
                        "metadata": {"campaign_id": "promo-2026-q2", "user_segment": "premium"},
                        "name": "John Smith", "substitutions": {"age": 42, "gender": "male"}}],
        "substitutions": {"campaign_title": "Fall Campaign"},
        "template_dialect": "Jinja",
        "trace_headers": {"header_name": "string", "include_meta_names": ["string"],
                          "received_header": False, "supplemental_header": False},
    })
    assert inj.sender == "some.id@bounces.sender-example.com"
    [m] = inj.messages
    assert m.metadata == {"campaign_id": "promo-2026-q2", "user_segment": "premium"}
    msg = parse(m.data)
    assert (msg["From"], msg["Subject"], msg.get_content()) == (
        "user@example.com", "Hello", "Hello there\r\n")


def test_the_documented_builder_example_without_amp() -> None:
    # docs/reference/http/kumod/schemas/Content.md, Option 2
    content = {
        "attachments": [{"base64": True, "content_id": "my-image", "content_type": "image/gif",
                         "data": GIF, "file_name": "pixel.gif"}],
        "from": {"email": "sales@sender-example.com", "name": "Sales"},
        "headers": {"X-Tenant": "MyTenant"},
        "html_body": "<p>This is the <b>HTML</b> part</p>",
        "reply_to": {"email": "sales@sender-example.com", "name": "Sales"},
        "subject": "string",
        "text_body": "This is the plain text part",
    }
    [m] = inject({"envelope_sender": "b@example.com", "content": content,
                  "recipients": [{"email": "u@example.org", "name": "U Ser"}]}).messages
    msg = parse(m.data)
    assert (msg["From"], msg["Reply-To"], msg["To"], msg["Subject"], msg["X-Tenant"]) == (
        "Sales <sales@sender-example.com>", "Sales <sales@sender-example.com>",
        "U Ser <u@example.org>", "string", "MyTenant")
    assert msg.get_content_type() == "multipart/related"
    assert body_of(msg, "plain") == "This is the plain text part\r\n"
    assert body_of(msg, "html") == "<p>This is the <b>HTML</b> part</p>\r\n"
    image = msg.get_payload()[1]
    assert (image["Content-ID"], image.get_filename(), image.get_content_type()) == (
        "<my-image>", "pixel.gif", "image/gif")
    assert image.get_content() == base64.b64decode(GIF)
    err = refused({"envelope_sender": "b@example.com", "recipients": [{"email": "u@x.org"}],
                   "content": {**content, "amp_html_body": "<html amp4email></html>"}})
    assert (err.status, err.code, err.field) == (422, "unsupported_field",
                                                 "content.amp_html_body")


def test_kumomtas_builder_test_message() -> None:
    # inject_v1.rs test_generate_builder
    payload = builder(
        text_body="I am the plain text, {{ name }}. 😀",
        html_body='I am the <b>html</b> text, {{ name }}. 👾 <img src="cid:my-image"/>',
        attachments=[{"data": GIF, "base64": True, "content_type": "image/gif",
                      "content_id": "my-image"}],
        subject="hello {{ name }} 👫")
    payload["recipients"] = [{"email": "user@example.com", "name": "James Smythe"}]
    msg = parse(inject(payload).messages[0].data)
    assert msg["MIME-Version"] == "1.0"
    assert msg["Subject"] == "hello James Smythe 👫"
    assert body_of(msg, "plain") == "I am the plain text, James Smythe. 😀\r\n"
    assert body_of(msg, "html") == ('I am the <b>html</b> text, James Smythe. 👾 '
                                    '<img src="cid:my-image"/>\r\n')
    assert len(list(msg.walk())) == 5  # related(alternative(plain, html), gif)


def test_a_to_header_replaces_the_generated_one() -> None:
    # inject_v1.rs test_builder_to_header and test_builder_to_header_substitution_override
    payload = builder(headers={"To": "{{ to_header }}"})
    payload["recipients"] = [
        {"email": "user@example.com", "name": "James Smythe"},
        {"email": "second@example.com", "name": "Second User",
         "substitutions": {"to_header": "custom.to@example.com"}},
    ]
    inj = inject(payload)
    assert [parse(m.data).get_all("To") for m in inj.messages] == [
        ["James Smythe <user@example.com>"], ["custom.to@example.com"]]
    assert [m.address for m in inj.messages] == ["user@example.com", "second@example.com"]


def test_static_dialect_does_no_templating() -> None:
    payload = builder(text_body="plain, {{ name }}", html_body="<i>{{ name }}</i>",
                      subject="hello {{ name }}")
    payload["template_dialect"] = "Static"
    payload["recipients"] = [{"email": "user@example.com", "name": "James Smythe"}]
    msg = parse(inject(payload).messages[0].data)
    assert msg["Subject"] == "hello {{ name }}"
    assert body_of(msg, "plain") == "plain, {{ name }}\r\n"
    assert body_of(msg, "html") == "<i>{{ name }}</i>\r\n"
    assert msg["To"] == "James Smythe <user@example.com>"


def test_handlebars_is_refused() -> None:
    err = refused({**builder(), "template_dialect": "Handlebars"})
    assert (err.status, err.code, err.field) == (422, "unsupported_field", "template_dialect")
    err = refused({**builder(), "template_dialect": "Mustache"})
    assert (err.status, err.code, err.field) == (422, "invalid_value", "template_dialect")


def test_substitutions_merge_and_recipient_fields_are_predefined() -> None:
    payload = builder(text_body="{{ greeting }} {{ name }} <{{ email }}> {{ n + 1 }} {{ x }}")
    payload["substitutions"] = {"greeting": "Hi", "n": 1, "x": "global"}
    payload["recipients"] = [{"email": "a@example.org", "name": "Ann",
                              "substitutions": {"x": "mine", "n": 41}},
                             {"email": "b@example.org", "substitutions": {"name": "Bo"}}]
    inj = inject(payload)
    texts = [body_of(parse(m.data), "plain") for m in inj.messages]
    assert texts == ["Hi Ann <a@example.org> 42 mine\r\n", "Hi Bo <b@example.org> 2 global\r\n"]


def test_undefined_values_render_empty_and_none_true_false_as_minijinja() -> None:
    payload = builder(text_body="[{{ missing }}] {{ nothing }} {{ yes }} {{ no }}")
    payload["substitutions"] = {"nothing": None, "yes": True, "no": False}
    text = body_of(parse(inject(payload).messages[0].data), "plain")
    assert text == "[] none true false\r\n"


def test_html_is_autoescaped_and_text_is_not() -> None:
    payload = builder(text_body="{{ v }}", html_body="<p>{{ v }}</p>", subject="{{ v }}")
    payload["substitutions"] = {"v": "<b>&'\"</b>"}
    msg = parse(inject(payload).messages[0].data)
    assert body_of(msg, "plain") == "<b>&'\"</b>\r\n"
    assert body_of(msg, "html") == "<p>&lt;b&gt;&amp;&#39;&#34;&lt;/b&gt;</p>\r\n"
    assert msg["Subject"] == "<b>&'\"</b>"


def test_the_sandbox_refuses_attribute_escapes() -> None:
    payload = builder(text_body="a{{ ''.__class__ }}b")
    payload["recipients"] = [{"email": "a@example.org"}]
    assert body_of(parse(inject(payload).messages[0].data), "plain") == "ab\r\n"
    payload = builder(text_body="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    inj = inject(payload)
    assert inj.messages == []
    [failure] = inj.failures
    assert failure.code == "template_error" and "SecurityError" in failure.message
    assert "content.text_body" in failure.message


@pytest.mark.parametrize("expr", ["'a' * 100000000", "(2 ** 100000) > 1",
                                  "range(200000) | list | length"])
def test_the_sandbox_refuses_huge_results(expr: str) -> None:
    [failure] = inject(builder(text_body="{{ " + expr + " }}")).failures
    assert failure.code == "template_error"


def test_a_render_error_names_the_field_and_line() -> None:
    payload = builder(text_body="line one\n{{ user.name }}")
    payload["recipients"] = [{"email": "a@example.org", "substitutions": {"user": {"name": "A"}}},
                             {"email": "b@example.org"}]
    inj = inject(payload)
    assert body_of(parse(inj.messages[0].data), "plain") == "line one\r\nA\r\n"
    [failure] = inj.failures
    assert failure.index == 1
    assert failure.message.startswith("recipients[1]: content.text_body: line 2: ")


def test_a_syntax_error_is_a_422_naming_the_field_and_line() -> None:
    err = refused(builder(html_body="<p>\n\n{% if x %}never closed"))
    assert (err.status, err.code, err.field) == (422, "template_error", "content.html_body")
    assert "line 3" in err.description
    err = refused(builder(subject="{{ x | nosuchfilter }}"))
    assert (err.code, err.field) == ("template_error", "content.subject")
    err = refused({**builder(), "content": "Subject: {{ x\n\nbody"})
    assert (err.code, err.field) == ("template_error", "content")


def test_attachments_text_and_base64_byte_for_byte() -> None:
    binary = bytes(range(256)) * 3
    payload = builder(attachments=[
        {"data": "plain text, été\n", "content_type": "text/plain; charset=utf-8",
         "file_name": "notes.txt"},
        {"data": base64.encodebytes(binary).decode(), "base64": True,
         "content_type": "application/octet-stream", "file_name": "données.bin"},
    ])
    msg = parse(inject(payload).messages[0].data)
    assert msg.get_content_type() == "multipart/mixed"
    notes, blob = msg.iter_attachments()
    assert notes.get_filename() == "notes.txt"
    assert notes.get_content() == "plain text, été\n"
    assert blob.get_filename() == "données.bin"
    assert blob.get_content() == binary
    err = refused(builder(attachments=[{"data": "@@@", "base64": True,
                                        "content_type": "image/gif"}]))
    assert (err.code, err.field) == ("invalid_value", "content.attachments[0].data")
    err = refused(builder(attachments=[{"data": "x", "content_type": "no type"}]))
    assert err.field == "content.attachments[0]"


def test_envelope_sender_rules() -> None:
    assert inject({**builder(), "envelope_sender": ""}).sender == ""  # the null sender
    err = refused({**builder(), "envelope_sender": "not an address"})
    assert (err.code, err.field) == ("invalid_value", "envelope_sender")
    err = refused({k: v for k, v in builder().items() if k != "envelope_sender"})
    assert (err.code, err.field) == ("missing_field", "envelope_sender")


def test_unknown_and_mistyped_fields() -> None:
    err = refused({**builder(), "extra": True})
    assert (err.status, err.code, err.field) == (422, "unsupported_field", "extra")
    payload = builder()
    payload["recipients"] = [{"email": "a@example.org", "nmae": "x"}]
    assert refused(payload).field == "recipients[0].nmae"
    err = refused(builder(text_body=5))
    assert (err.status, err.code) == (400, "invalid_type")
    err = refused({**builder(), "content": 5})
    assert (err.status, err.code, err.field) == (400, "invalid_type", "content")


def test_builder_rules() -> None:
    err = refused(builder(text_body=None))
    assert (err.code, err.field) == ("missing_field", "content.text_body")
    err = refused(builder(**{"from": None}))
    assert (err.code, err.field) == ("missing_field", "content.from")
    [m] = inject(builder(**{"from": None}, headers={"From": "Raw <raw@example.com>"})).messages
    assert parse(m.data)["From"] == "Raw <raw@example.com>"
    err = refused(builder(headers={"From": "x@example.com"}))
    assert err.field == "content.headers.From"
    err = refused(builder(headers={"Content-Type": "text/html"}))
    assert (err.code, err.field) == ("invalid_value", "content.headers.Content-Type")
    err = refused(builder(**{"from": {"email": "bad"}}))
    assert (err.code, err.field) == ("invalid_value", "content.from.email")


def test_a_given_date_is_kept_and_none_is_added() -> None:
    msg = parse(inject(builder(headers={"Date": "Mon, 13 Nov 2023 10:00:00 +0100"})
                       ).messages[0].data)
    assert msg.get_all("Date") == ["Mon, 13 Nov 2023 10:00:00 +0100"]
    assert parse(inject(builder()).messages[0].data)["Date"] == (
        "Tue, 14 Nov 2023 22:13:20 +0000")


def test_string_content_failures() -> None:
    err = refused({**builder(), "content": "no header section here"})
    assert (err.status, err.code, err.field) == (422, "invalid_value", "content")
    payload = {**builder(), "content": "{{ head }}\n\nbody"}
    payload["recipients"] = [{"email": "a@example.org", "substitutions": {"head": "X-A: 1"}},
                             {"email": "b@example.org", "substitutions": {"head": "oops"}}]
    inj = inject(payload)
    assert [m.address for m in inj.messages] == ["a@example.org"]
    assert [(f.index, f.code) for f in inj.failures] == [(1, "invalid_header")]


def test_string_content_is_passed_through_with_8bit_text() -> None:
    inj = inject({**builder(), "content": "Subject: caf\u00e9\r\nMIME-Version: 1.0\r\n\r\n"
                                          "d\u00e9j\u00e0 vu\n"})
    data = inj.messages[0].data
    assert data == "Subject: café\r\nMIME-Version: 1.0\r\n\r\ndéjà vu\r\n".encode()
    assert parse(data, seven_bit=False)["Subject"] == "café"


def test_recipient_limits_and_bad_recipients() -> None:
    payload = builder()
    payload["recipients"] = [{"email": "ok@example.org"}, {"email": "nope"},
                             {"email": "n@example.org", "name": "Bad\nName"}]
    inj = inject(payload)
    assert [m.address for m in inj.messages] == ["ok@example.org"]
    assert [(f.index, f.code, f.address) for f in inj.failures] == [
        (1, "invalid_address", "nope"), (2, "invalid_address", "n@example.org")]
    assert inj.failures[0].message.startswith("recipients[1].email: ")
    assert inj.failures[1].message.startswith("recipients[2].name: ")
    with pytest.raises(PayloadError) as info:
        inject(payload, max_recipients=2)
    assert info.value.code == "too_many_recipients"
    payload["recipients"] = []
    assert refused(payload).code == "no_recipients"


@pytest.mark.parametrize(("content", "field"), [
    ({"subject": "a", "headers": {"Subject": "b"}}, "content.headers.Subject"),
    ({"reply_to": {"email": "r@example.com"}, "headers": {"reply-to": "x@example.com"}},
     "content.headers.reply-to"),
])
def test_structured_fields_and_headers_may_not_both_set_a_header(content: dict[str, Any],
                                                                 field: str) -> None:
    err = refused(builder(**content))
    assert (err.code, err.field) == ("invalid_value", field)


def test_deeply_nested_templates_are_a_syntax_error() -> None:
    err = refused(builder(text_body="{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}"))
    assert (err.code, err.field) == ("template_error", "content.text_body")
