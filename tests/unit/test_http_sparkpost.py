"""SparkPost's Transmissions API: the documented examples, what python-sparkpost sends,
and the error paths. Sans-I/O: bodies in, Injection out, messages parsed back."""

from __future__ import annotations

import base64
import email
import email.policy
import json
from email.message import EmailMessage
from typing import Any

import pytest
from sparkpost.transmissions import Transmissions

from relay.http.payload import Injection, PayloadError
from relay.http.sparkpost import sparkpost_injection

NOW = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 +0000


def inject(payload: dict[str, Any] | bytes, max_recipients: int = 100) -> Injection:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return sparkpost_injection(body, now=NOW, max_recipients=max_recipients)


def refused(payload: dict[str, Any] | bytes) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        inject(payload)
    return info.value


def parse(data: bytes) -> EmailMessage:
    """Parse a produced message, checking the wire rules on the way."""
    assert b"\n" not in data.replace(b"\r\n", b""), "bare LF"
    assert b"\r" not in data.replace(b"\r\n", b""), "bare CR"
    assert data.endswith(b"\r\n")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert data.isascii(), "not 7-bit clean"
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg.defects == []
    return msg


def body_of(msg: EmailMessage, subtype: str) -> str:
    part = msg.get_body((subtype,))
    assert part is not None, f"no text/{subtype} part"
    return part.get_content()


def simple(**content: Any) -> dict[str, Any]:
    base = {"from": "sender@example.com", "subject": "Hello", "text": "Hi"}
    return {"recipients": [{"address": "rcpt@example.org"}], "content": {**base, **content}}


# The "Send Inline Content" request of developers.sparkpost.com/api/transmissions (its
# sample JSON has a trailing comma after "Platinum", which is not JSON; removed here).
DOC_INLINE = {
    "options": {"open_tracking": True, "click_tracking": True},
    "metadata": {"user_type": "students", "education_level": "college"},
    "substitution_data": {"discount": "25"},
    "recipients": [{
        "address": {"email": "wilma@flintstone.com", "name": "Wilma Flintstone"},
        "substitution_data": {"customer_type": "Platinum"},
    }],
    "content": {
        "from": {"name": "Fred Flintstone", "email": "fred@flintstone.com"},
        "subject": "Big Christmas savings!",
        "reply_to": "Christmas Sales <sales@flintstone.com>",
        "headers": {"X-Customer-Campaign-ID": "christmas_campaign"},
        "html": "<p>Hi {{address.name}} \nSave big this Christmas in your area {{place}}! "
                "\nClick http://www.mysite.com and get a {{discount}}% discount\n</p><p>Hurry,"
                " this offer is only to {{user_type}}\n</p>",
    },
}


def test_the_documented_inline_transmission() -> None:
    inj = inject(DOC_INLINE)
    assert inj.sender == "fred@flintstone.com" and inj.failures == []
    [m] = inj.messages
    assert (m.index, m.address, m.tags) == (0, "wilma@flintstone.com", [])
    assert m.metadata == {"user_type": "students", "education_level": "college"}
    msg = parse(m.data)
    assert msg["From"] == "Fred Flintstone <fred@flintstone.com>"
    assert msg["To"] == "Wilma Flintstone <wilma@flintstone.com>"
    assert msg["Subject"] == "Big Christmas savings!"
    assert msg["Reply-To"] == "Christmas Sales <sales@flintstone.com>"
    assert msg["X-Customer-Campaign-ID"] == "christmas_campaign"
    assert msg["Date"] == "Tue, 14 Nov 2023 22:13:20 +0000"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Message-ID"] is None  # the intake adds <queueid@host>
    assert msg.get_content_type() == "text/html"
    html = body_of(msg, "html")
    assert html.startswith("<p>Hi Wilma Flintstone \r\nSave big this Christmas in your area ! ")
    assert "get a 25% discount" in html and "only to students\r\n" in html


def test_the_documented_sample_with_its_trailing_comma_is_not_json() -> None:
    text = json.dumps(DOC_INLINE).replace('"Platinum"', '"Platinum",')
    err = refused(text.encode())
    assert (err.status, err.code, err.field) == (400, "invalid_json", None)


def test_substitution_precedence_of_the_template_language_doc() -> None:
    # developers.sparkpost.com/api/template-language: renders "Hello, New York!"
    inj = inject({
        "metadata": {"city": "San Francisco"},
        "substitution_data": {"city": "Seattle"},
        "recipients": [{"address": "wilma@flintstone.com", "metadata": {"city": "Baltimore"},
                        "substitution_data": {"city": "New York"}}],
        "content": {"from": "fred@flintstone.com", "subject": "Hello",
                    "html": "Hello, {{city}}!"},
    })
    [m] = inj.messages
    assert body_of(parse(m.data), "html") == "Hello, New York!\r\n"
    assert m.metadata == {"city": "Baltimore"}  # recipient metadata wins
    assert parse(m.data)["To"] == "wilma@flintstone.com"


DOC_RFC822 = {
    "description": "Christmas Campaign Email",
    "recipients": [{
        "address": {"email": "wilma@flintstone.com", "name": "Wilma Flintstone"},
        "substitution_data": {"first_name": "Wilma", "customer_type": "Platinum",
                              "year": "Freshman"},
    }],
    "content": {
        "email_rfc822": "Content-Type: text/plain\r\nTo: \"{{address.name}}\" "
                        "<{{address.email}}>\r\n\r\n Hi {{first_name}} \nSave big this "
                        "Christmas in your area {{place}}! \nClick http://www.mysite.com and "
                        "get huge discount\n Hurry, this offer is only to {{customer_type}}\n"
                        " {{sender}}\r\n",
    },
}


def test_the_documented_rfc822_transmission_needs_a_return_path_here() -> None:
    err = refused(DOC_RFC822)
    assert (err.status, err.code, err.field) == (422, "missing_field", "return_path")
    inj = inject({**DOC_RFC822, "return_path": "bounces@flintstone.com"})
    assert inj.sender == "bounces@flintstone.com" and inj.description == (
        "Christmas Campaign Email")
    [m] = inj.messages
    assert m.data.startswith(b'Content-Type: text/plain\r\nTo: "Wilma Flintstone" '
                             b"<wilma@flintstone.com>\r\nMIME-Version: 1.0\r\n\r\n")
    msg = parse(m.data)
    assert msg.get_content() == (" Hi Wilma \r\nSave big this Christmas in your area ! \r\n"
                                 "Click http://www.mysite.com and get huge discount\r\n Hurry,"
                                 " this offer is only to Platinum\r\n \r\n")


def test_an_rfc822_sender_comes_from_its_constant_from_header() -> None:
    inj = inject({"recipients": [{"address": "a@example.org"}],
                  "content": {"email_rfc822": "From: Shop <shop@example.com>\nSubject: x\n\nhi"}})
    assert inj.sender == "shop@example.com"
    assert inj.messages[0].data == (b"From: Shop <shop@example.com>\r\nSubject: x\r\n"
                                    b"MIME-Version: 1.0\r\n\r\nhi\r\n")


def test_rfc822_cannot_be_combined_with_inline_fields_or_lack_a_header_section() -> None:
    err = refused({"recipients": [{"address": "a@example.org"}], "return_path": "b@example.com",
                   "content": {"email_rfc822": "Subject: x\r\n\r\nhi", "subject": "y"}})
    assert (err.code, err.field) == ("invalid_value", "content.subject")
    err = refused({"recipients": [{"address": "a@example.org"}], "return_path": "b@example.com",
                   "content": {"email_rfc822": "just a body"}})
    assert (err.status, err.code, err.field) == (422, "invalid_value", "content.email_rfc822")


class Capture:
    """A python-sparkpost transport that keeps the request instead of sending it."""

    sent: list[dict[str, Any]] = []

    def request(self, method: str, uri: str, headers: dict[str, str], **kwargs: Any) -> Any:
        assert (method, uri) == ("POST", "https://relay.test/api/v1/transmissions")
        assert headers["Content-Type"] == "application/json"
        Capture.sent.append(json.loads(kwargs["data"]))
        return {"id": "1", "total_accepted_recipients": 1, "total_rejected_recipients": 0}


def client_json(**kwargs: Any) -> dict[str, Any]:
    Capture.sent = []
    Transmissions("https://relay.test/api/v1", "KEY", transport_class=Capture).send(**kwargs)
    [payload] = Capture.sent
    return payload


PDF = bytes(range(256)) * 40
PNG = b"\x89PNG\r\n\x1a\n" + bytes(300)


def test_what_python_sparkpost_sends_with_cc_bcc_and_attachments() -> None:
    payload = client_json(
        recipients=["someone@somedomain.com"], cc=["carboncopy@somedomain.com"],
        bcc=["blindcarboncopy@somedomain.com"],
        text="Hello {{name}}", html="<p>Hello {{name}} <img src=\"cid:logo.png\"></p>",
        from_email="Test Sender <test@sparkpostbox.com>", subject="Hello from python-sparkpost",
        track_opens=True, track_clicks=True, use_sandbox=True, transactional=True,
        ip_pool="pool-a", campaign="welcome", description="desc", return_path="b@bounce.test",
        metadata={"m": 1}, substitution_data={"name": "Sparky"},
        custom_headers={"X-Tag": "t1"},
        attachments=[{"name": "doc.pdf", "type": "application/pdf",
                      "data": base64.b64encode(PDF).decode()}],
        inline_images=[{"name": "logo.png", "type": "image/png",
                        "data": base64.b64encode(PNG).decode()}])
    inj = inject(payload)
    assert (inj.sender, inj.sandbox, inj.transactional, inj.ip_pool, inj.campaign_id,
            inj.description) == ("b@bounce.test", True, True, "pool-a", "welcome", "desc")
    assert [m.address for m in inj.messages] == [
        "someone@somedomain.com", "carboncopy@somedomain.com", "blindcarboncopy@somedomain.com"]
    for m in inj.messages:
        msg = parse(m.data)
        assert msg["To"] == "someone@somedomain.com"  # header_to for the cc/bcc copies
        assert msg["CC"] == "carboncopy@somedomain.com"
        assert msg["From"] == "Test Sender <test@sparkpostbox.com>"
        assert msg["X-Tag"] == "t1" and m.metadata == {"m": 1}
        assert msg.get_content_type() == "multipart/mixed"
        assert body_of(msg, "plain") == "Hello Sparky\r\n"
        assert body_of(msg, "html") == '<p>Hello Sparky <img src="cid:logo.png"></p>\r\n'
        related = msg.get_payload()[0]
        assert related.get_content_type() == "multipart/related"
        image = related.get_payload()[1]
        assert (image["Content-ID"], image.get_content_disposition()) == ("<logo.png>", "inline")
        assert image.get_content() == PNG
        [attachment] = msg.iter_attachments()
        assert (attachment.get_filename(), attachment.get_content_type()) == (
            "doc.pdf", "application/pdf")
        assert attachment.get_content() == PDF


def test_python_sparkpost_recipient_dicts_tags_and_a_named_to() -> None:
    payload = client_json(
        recipients=[{"address": {"email": "a@example.org", "name": "Ann Example"},
                     "tags": [f"t{i}" for i in range(12)], "metadata": {"k": "rcpt"}}],
        text="x", from_email="s@example.com", subject="s", metadata={"k": "tx", "j": 2})
    [m] = inject(payload).messages
    assert parse(m.data)["To"] == "Ann Example <a@example.org>"
    assert m.tags == [f"t{i}" for i in range(10)]  # SparkPost keeps 10
    assert m.metadata == {"k": "rcpt", "j": 2}


def test_python_sparkpost_stored_template_and_list_are_refused() -> None:
    err = refused(client_json(recipients=["a@example.org"], template="black_friday"))
    assert (err.status, err.code, err.field) == (422, "unsupported_field", "content.template_id")
    err = refused(client_json(recipient_list="all", text="x", from_email="s@example.com",
                              subject="s"))
    assert (err.code, err.field) == ("unsupported_field", "recipients.list_id")


@pytest.mark.parametrize(("options", "field"), [
    ({"start_time": "2030-01-01T08:00:00-04:00"}, "options.start_time"),
    ({"skip_suppression": True}, "options.skip_suppression"),
    ({"inline_css": True}, "options.inline_css"),
    ({"dkim_key": "marketing"}, "options.dkim_key"),
])
def test_options_that_change_what_is_sent_are_refused(options: dict[str, Any],
                                                      field: str) -> None:
    err = refused({**simple(), "options": options})
    assert (err.status, err.code, err.field) == (422, "unsupported_field", field)
    assert field in err.description


def test_harmless_options_and_a_past_start_time_are_accepted() -> None:
    inj = inject({**simple(), "options": {
        "open_tracking": True, "click_tracking": False, "initial_open": True,
        "start_time": "2023-11-14T17:00:00-05:00", "skip_suppression": False,
        "inline_css": False}, "tracking_domain": "t.example.com"})
    assert len(inj.messages) == 1 and inj.ip_pool is None and not inj.sandbox


@pytest.mark.parametrize(("content", "field"), [
    ({"amp_html": "<html amp4email></html>"}, "content.amp_html"),
    ({"ab_test_id": "password_reset"}, "content.ab_test_id"),
    ({"use_draft_template": True}, "content.use_draft_template"),
])
def test_content_that_is_not_implemented_is_refused(content: dict[str, Any],
                                                    field: str) -> None:
    err = refused(simple(**content))
    assert (err.status, err.code, err.field) == (422, "unsupported_field", field)


def test_a_per_recipient_return_path_is_refused() -> None:
    payload = simple()
    payload["recipients"] = [{"address": "a@example.org"},
                             {"address": "b@example.org", "return_path": "v@bounce.test"}]
    err = refused(payload)
    assert (err.code, err.field) == ("unsupported_field", "recipients[1].return_path")


def test_unknown_fields_are_refused_with_their_path() -> None:
    err = refused({**simple(), "bogus": 1})
    assert (err.status, err.code, err.field) == (422, "unsupported_field", "bogus")
    err = refused(simple(attachment=[]))
    assert err.field == "content.attachment"
    payload = simple()
    payload["recipients"] = [{"address": {"email": "a@example.org", "nmae": "typo"}}]
    assert refused(payload).field == "recipients[0].address.nmae"


def test_wrong_types_are_400_with_the_path() -> None:
    payload = simple()
    payload["recipients"] = [{"address": "a@example.org"}, {"address": {"email": 7}}]
    err = refused(payload)
    assert (err.status, err.code, err.field) == (400, "invalid_type", "recipients[1].address.email")
    err = refused([1, 2])  # type: ignore[arg-type]
    assert (err.status, err.code, err.field) == (400, "invalid_type", None)
    err = refused(simple(subject=["x"]))
    assert (err.status, err.field) == (400, "content.subject")


def test_missing_fields_are_422_with_the_path() -> None:
    err = refused({"recipients": [{"address": "a@example.org"}]})
    assert (err.status, err.code, err.field) == (422, "missing_field", "content")
    assert refused({"recipients": [{}], "content": {}}).field == "recipients[0].address"
    content = {"from": "s@example.com", "text": "x"}
    err = refused({"recipients": [{"address": "a@example.org"}], "content": content})
    assert (err.code, err.field) == ("missing_field", "content.subject")
    err = refused(simple(text=None))
    assert (err.code, err.field) == ("missing_field", "content.html")
    err = refused(simple(**{"from": None}))
    assert (err.code, err.field) == ("missing_field", "content.from")


def test_recipient_counts() -> None:
    payload = simple()
    payload["recipients"] = [{"address": f"r{i}@example.org"} for i in range(5)]
    with pytest.raises(PayloadError) as info:
        inject(payload, max_recipients=4)
    assert (info.value.status, info.value.code, info.value.field) == (
        422, "too_many_recipients", "recipients")
    assert len(inject(payload, max_recipients=5).messages) == 5
    payload["recipients"] = []
    assert refused(payload).code == "no_recipients"


def test_bad_recipients_fail_alone() -> None:
    payload = simple(text="Hi {{ 1 + n }}")
    payload["recipients"] = [
        {"address": "ok@example.org", "substitution_data": {"n": 1}},
        {"address": "no-domain"},
        {"address": {"email": "x@example.org\r\nBcc: evil@example.net"}},
        {"address": {"email": "t@example.org"}, "substitution_data": {"n": "text"}},
        {"address": "<a@example.org>"},
        {"address": "q@[192.0.2.1]"},
        {"address": "user@exämple.org"},
    ]
    inj = inject(payload)
    assert [m.address for m in inj.messages] == ["ok@example.org"]
    assert body_of(parse(inj.messages[0].data), "plain") == "Hi 2\r\n"
    codes = {f.index: (f.code, f.address) for f in inj.failures}
    assert codes == {
        1: ("invalid_address", "no-domain"),
        2: ("invalid_address", "x@example.org\r\nBcc: evil@example.net"),
        3: ("template_error", "t@example.org"),
        4: ("invalid_address", "<a@example.org>"),
        5: ("invalid_address", "q@[192.0.2.1]"),
        6: ("invalid_address", "user@exämple.org"),
    }
    messages = {f.index: f.message for f in inj.failures}
    assert messages[1].startswith("recipients[1].address: ")
    assert messages[2].startswith("recipients[2].address.email: ")
    assert "content.text" in messages[3] and "line 1" in messages[3]


def test_a_rendered_header_with_a_line_break_fails_only_that_recipient() -> None:
    payload = simple(subject="Hello {{name}}")
    payload["recipients"] = [
        {"address": "a@example.org", "substitution_data": {"name": "Ann"}},
        {"address": "b@example.org", "substitution_data": {"name": "Bob\r\nBcc: x@y.z"}},
    ]
    inj = inject(payload)
    assert parse(inj.messages[0].data)["Subject"] == "Hello Ann"
    [failure] = inj.failures
    assert (failure.index, failure.code) == (1, "invalid_header")
    assert "content.subject" in failure.message


def test_a_template_syntax_error_names_the_field_line_and_column() -> None:
    err = refused(simple(html="<p>\n  {{ if x }}never closed"))
    assert (err.status, err.code, err.field) == (422, "template_error", "content.html")
    assert "line 2, column 3" in err.description
    err = refused(simple(headers={"X-A": "{{ a $ b }}"}))
    assert (err.code, err.field) == ("template_error", "content.headers.X-A")


@pytest.mark.parametrize("name", ["Content-Type", "content-transfer-encoding", "MIME-Version",
                                  "Received", "Bcc", "To", "Subject", "Bad Name", "Bad:Name"])
def test_headers_the_relay_owns_or_that_are_malformed_are_refused(name: str) -> None:
    err = refused(simple(headers={name: "x"}))
    assert (err.status, err.code, err.field) == (422, "invalid_value", f"content.headers.{name}")


def test_constant_header_values_with_line_breaks_are_refused() -> None:
    err = refused(simple(headers={"X-Evil": "a\r\nBcc: victim@example.net"}))
    assert (err.code, err.field) == ("invalid_value", "content.headers.X-Evil")
    err = refused(simple(subject="a\nb"))
    assert err.field == "content.subject"


def test_a_given_message_id_and_date_are_kept_once() -> None:
    date = "Mon, 13 Nov 2023 10:00:00 +0100"
    [m] = inject(simple(headers={"Message-ID": "<abc@example.com>", "Date": date})).messages
    msg = parse(m.data)
    assert msg.get_all("Message-ID") == ["<abc@example.com>"]
    assert msg.get_all("Date") == [date]


def test_header_to_replaces_the_address_in_to() -> None:
    payload = simple()
    payload["recipients"] = [
        {"address": {"email": "bcc@example.org", "name": "Main", "header_to": "main@example.org"}},
        {"address": {"email": "c@example.org", "header_to": '"Main Name" <main@example.org>'}},
        {"address": {"email": "d@example.org", "header_to": "not an address"}},
    ]
    inj = inject(payload)
    assert [parse(m.data)["To"] for m in inj.messages] == [
        "Main <main@example.org>", "Main Name <main@example.org>"]
    assert inj.messages[0].address == "bcc@example.org"
    [failure] = inj.failures
    assert failure.message.startswith("recipients[2].address.header_to: ")


def test_non_ascii_headers_and_bodies_are_encoded_and_decode_back() -> None:
    payload = simple(subject="Grüße, {{name}} — ✓", text="Straße {{name}}\n" + "é" * 300,
                     html="<p>Ünïcode {{name}}</p>", reply_to="Zoë <zoe@example.com>")
    payload["content"]["from"] = {"email": "s@example.com", "name": "Société Générale"}
    payload["recipients"] = [{"address": {"email": "a@example.org", "name": "Jürgen Groß"},
                              "substitution_data": {"name": "Jürgen"}}]
    [m] = inject(payload).messages
    msg = parse(m.data)
    assert msg["Subject"] == "Grüße, Jürgen — ✓"
    assert msg["From"] == "Société Générale <s@example.com>"
    assert msg["To"].addresses[0].display_name == "Jürgen Groß"
    assert msg["Reply-To"].addresses[0].display_name == "Zoë"
    assert body_of(msg, "plain") == "Straße Jürgen\r\n" + "é" * 300 + "\r\n"
    assert body_of(msg, "html") == "<p>Ünïcode Jürgen</p>\r\n"
    assert msg.get_body(("plain",))["Content-Transfer-Encoding"] == "quoted-printable"


def test_perform_substitutions_false_keeps_the_bodies_literal() -> None:
    payload = simple(subject="Hi {{name}}", text="Hi {{name}}", html="<p>{{name}}</p>")
    payload["recipients"] = [{"address": "a@example.org", "substitution_data": {"name": "Ann"}}]
    payload["options"] = {"perform_substitutions": False}
    msg = parse(inject(payload).messages[0].data)
    assert msg["Subject"] == "Hi Ann"  # headers are still templated, as SparkPost does
    assert body_of(msg, "plain") == "Hi {{name}}\r\n"
    assert body_of(msg, "html") == "<p>{{name}}</p>\r\n"


def test_override_from_reply_to_and_list_id() -> None:
    payload = simple(reply_to="r@example.com")
    payload["override"] = {"from": {"name": "Fred", "email": "fred@flintstone.com"},
                           "reply_to": "Sales <sales@flintstone.com>",
                           "list_id": "<marketing@flintstone.com>"}
    inj = inject(payload)
    msg = parse(inj.messages[0].data)
    assert inj.sender == "fred@flintstone.com"
    assert (msg["From"], msg["Reply-To"], msg["List-Id"]) == (
        "Fred <fred@flintstone.com>", "Sales <sales@flintstone.com>",
        "<marketing@flintstone.com>")


def test_a_templated_from_needs_a_return_path() -> None:
    payload = simple(**{"from": "{{sender}}"})
    payload["substitution_data"] = {"sender": "news@example.com"}
    err = refused(payload)
    assert (err.code, err.field) == ("missing_field", "return_path")
    payload["return_path"] = "bounce@example.com"
    payload["recipients"].append({"address": "b@example.org",
                                  "substitution_data": {"sender": "broken"}})
    inj = inject(payload)
    assert parse(inj.messages[0].data)["From"] == "news@example.com"
    assert [(f.index, f.code) for f in inj.failures] == [(1, "invalid_header")]


def test_bad_senders_and_attachments_are_refused() -> None:
    err = refused({**simple(), "return_path": "not-an-address"})
    assert (err.code, err.field) == ("invalid_value", "return_path")
    err = refused(simple(**{"from": "two@example.com, addresses@example.com"}))
    assert err.field == "content.from"
    bad = {"name": "x.bin", "type": "application/octet-stream", "data": "!!not base64!!"}
    err = refused(simple(attachments=[bad]))
    assert (err.code, err.field) == ("invalid_value", "content.attachments[0].data")
    err = refused(simple(attachments=[{**bad, "data": "AAAA", "type": "multipart/mixed"}]))
    assert err.field == "content.attachments[0]"
    err = refused({**simple(), "campaign_id": "c" * 65})
    assert err.field == "campaign_id"


def test_reserved_variables_are_available() -> None:
    payload = simple(text="{{email}} {{email_id}} {{address.email}} {{address.name}} "
                          "{{env_from}} {{return_path}}")
    payload["return_path"] = "bounce@example.com"
    payload["recipients"] = [{"address": {"email": "a@example.org", "name": "Ann"},
                              "substitution_data": {"email": "overridden?"}}]
    text = body_of(parse(inject(payload).messages[0].data), "plain")
    assert text == ("a@example.org a@example.org a@example.org Ann bounce@example.com "
                    "bounce@example.com\r\n")


def test_constant_and_templated_parts_mix() -> None:
    payload = simple(text="constant text é", html="<p>{{n}}</p>", attachments=[
        {"name": "x.txt", "type": "text/plain", "data": "aGVsbG8="}])
    payload["recipients"] = [{"address": "a@example.org", "substitution_data": {"n": "Ann"}},
                             {"address": "b@example.org", "substitution_data": {"n": "Bo"}}]
    first, second = (parse(m.data) for m in inject(payload).messages)
    for msg, name in ((first, "Ann"), (second, "Bo")):
        assert body_of(msg, "plain") == "constant text é\r\n"
        assert body_of(msg, "html") == f"<p>{name}</p>\r\n"
        assert [a.get_content() for a in msg.iter_attachments()] == ["hello"]
