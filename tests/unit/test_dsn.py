"""RFC 3464 DSNs: who gets one, and its structure parsed back with the email package."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

import pytest

from relay.model import Envelope, NewMessage, Recipient
from relay.outcomes.dsn import FailedRecipient, build_dsn, dsn_wanted

HEADERS = b"Received: from x by y; Wed, 25 Nov 2026 10:00:00 +0000\r\n" \
          b"From: Alice <alice@src.test>\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n" \
          b"X-Odd:   spacing   kept\r\n\tand folded\r\n"
DATA = HEADERS + b"\r\nHello\r\n.dot line\r\n"
NOW = 1_795_000_000.0


def envelope(*rcpts: Recipient, **kw: object) -> Envelope:
    kw.setdefault("sender", "alice@src.test")
    return Envelope(queue_id="Q1", recipients=list(rcpts) or [Recipient(address="bob@dst.test")],
                    received_at=NOW - 3600, **kw)  # type: ignore[arg-type]


def failure(index: int = 0, status: str = "5.1.1", **kw: object) -> FailedRecipient:
    kw.setdefault("diagnostic", "smtp; 550 5.1.1 No such user")
    kw.setdefault("remote_mta", "dns; mx.dst.test")
    kw.setdefault("last_attempt", NOW - 10)
    return FailedRecipient(index=index, status=status, **kw)  # type: ignore[arg-type]


def build(env: Envelope, failures: list[FailedRecipient] | None = None,
          action: str = "failed", data: bytes = DATA, **kw: object) -> NewMessage | None:
    return build_dsn(envelope=env, data=data, failures=failures or [failure()],
                     action=action,  # type: ignore[arg-type]
                     reporting_mta="relay.test", queue_id="DSN1", arrival=NOW - 3600,
                     now=NOW, **kw)  # type: ignore[arg-type]


def parse(msg: NewMessage) -> EmailMessage:
    parsed = email.message_from_bytes(msg.data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def parts(parsed: EmailMessage) -> list[EmailMessage]:
    return list(parsed.iter_parts())  # type: ignore[arg-type]


def status_blocks(parsed: EmailMessage) -> list[dict[str, str]]:
    report = parts(parsed)[1]
    assert report.get_content_type() == "message/delivery-status"
    return [dict(block.items()) for block in report.get_payload()]  # type: ignore[union-attr]


def test_failed_dsn_structure_and_fields() -> None:
    env = envelope(Recipient(address="bob@dst.test", orcpt="rfc822;Bob+x@dst.test"),
                   envid="ENV-42")
    msg = build(env)
    assert msg is not None
    # Envelope: null sender, to the original sender, marked as a bounce.
    assert msg.envelope.sender == "" and msg.envelope.is_bounce
    assert [r.address for r in msg.envelope.recipients] == ["alice@src.test"]
    assert msg.envelope.queue_id == "DSN1"
    # CRLF everywhere, no bare LF or CR.
    assert msg.data.count(b"\n") == msg.data.count(b"\r\n")
    assert msg.data.count(b"\r") == msg.data.count(b"\r\n")

    parsed = parse(msg)
    assert parsed.get_content_type() == "multipart/report"
    assert parsed.get_param("report-type") == "delivery-status"
    assert parsed["From"].addresses[0].addr_spec == "MAILER-DAEMON@relay.test"
    assert parsed["To"].addresses[0].addr_spec == "alice@src.test"
    assert parsed["Auto-Submitted"] == "auto-replied"
    assert parsed["Message-ID"] == "<DSN1@relay.test>"
    assert parsed["Date"].datetime.timestamp() == NOW
    assert [p.get_content_type() for p in parts(parsed)] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    human = parts(parsed)[0].get_content()
    assert "bob@dst.test" in human and "550 5.1.1 No such user" in human

    per_msg, per_rcpt = status_blocks(parsed)
    assert per_msg["Reporting-MTA"] == "dns; relay.test"
    assert per_msg["Original-Envelope-Id"] == "ENV-42"
    assert "Arrival-Date" in per_msg
    assert per_rcpt["Original-Recipient"] == "rfc822; Bob+x@dst.test"
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@dst.test"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.dst.test"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert "Last-Attempt-Date" in per_rcpt


def test_original_headers_attached_byte_for_byte() -> None:
    msg = build(envelope())
    assert msg is not None
    assert HEADERS in msg.data
    assert b"Hello" not in msg.data  # headers only by default (RET absent)


def test_ret_hdrs_returns_headers_only() -> None:
    msg = build(envelope(ret="HDRS"))
    assert msg is not None
    assert parts(parse(msg))[2].get_content_type() == "text/rfc822-headers"
    assert b".dot line" not in msg.data


def test_ret_full_returns_whole_message() -> None:
    msg = build(envelope(ret="FULL"))
    assert msg is not None
    returned = parts(parse(msg))[2]
    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_content()
    assert inner["Subject"] == "café"
    assert DATA in msg.data  # byte for byte, not re-encoded


def test_ret_full_over_cap_falls_back_to_headers() -> None:
    big = HEADERS + b"\r\n" + b"x" * 5000 + b"\r\n"
    msg = build(envelope(ret="FULL"), data=big, max_full_return=1000)
    assert msg is not None
    parsed = parse(msg)
    assert parts(parsed)[2].get_content_type() == "text/rfc822-headers"
    assert b"xxxx" not in msg.data
    assert "only its headers" in parts(parsed)[0].get_content()


def test_no_dsn_to_null_sender_or_of_a_bounce() -> None:
    assert build(envelope(sender="")) is None
    assert build(envelope(is_bounce=True)) is None


@pytest.mark.parametrize(
    ("notify", "action", "wanted"),
    [
        (None, "failed", True),
        (None, "delayed", False),  # delay notices off by default
        (["NEVER"], "failed", False),
        (["NEVER"], "delayed", False),
        (["SUCCESS"], "failed", False),
        (["FAILURE"], "failed", True),
        (["FAILURE"], "delayed", False),
        (["DELAY"], "delayed", True),
        (["SUCCESS", "FAILURE", "DELAY"], "delayed", True),
    ],
)
def test_notify(notify: list[str] | None, action: str, wanted: bool) -> None:
    env = envelope(Recipient(address="bob@dst.test", notify=notify))
    msg = build(env, [failure(status="5.1.1" if action == "failed" else "4.4.1")], action)
    assert (msg is not None) is wanted
    assert dsn_wanted(env.recipients[0], action) is wanted  # type: ignore[arg-type]


def test_delay_default_enables_delay_notices_without_notify() -> None:
    msg = build(envelope(), [failure(status="4.4.1")], "delayed", delay_default=True)
    assert msg is not None
    parsed = parse(msg)
    assert "Delayed" in parsed["Subject"]
    assert status_blocks(parsed)[1]["Action"] == "delayed"
    assert "WARNING" in parts(parsed)[0].get_content()


def test_only_recipients_whose_notify_allows_are_reported() -> None:
    env = envelope(Recipient(address="a@dst.test", notify=["NEVER"]),
                   Recipient(address="b@dst.test"),
                   Recipient(address="c@dst.test", notify=["SUCCESS"]),
                   Recipient(address="d@dst.test", notify=["FAILURE"]))
    msg = build(env, [failure(0), failure(1), failure(2), failure(3, "5.7.1")])
    assert msg is not None
    blocks = status_blocks(parse(msg))[1:]
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; b@dst.test", "rfc822; d@dst.test"]
    assert [b["Status"] for b in blocks] == ["5.1.1", "5.7.1"]
    assert "Original-Recipient" not in blocks[0]


def test_local_failure_without_remote_mta() -> None:
    msg = build(envelope(), [FailedRecipient(index=0, status="4.4.7",
                                             diagnostic="", remote_mta="")], "failed")
    assert msg is not None
    block = status_blocks(parse(msg))[1]
    assert "Remote-MTA" not in block and "Diagnostic-Code" not in block
    assert "Last-Attempt-Date" not in block and block["Status"] == "4.4.7"


def test_diagnostic_cannot_inject_headers() -> None:
    evil = failure(diagnostic="smtp; 550 oops\r\nX-Injected: yes")
    msg = build(envelope(), [evil])
    assert msg is not None
    assert b"\r\nX-Injected" not in msg.data


def test_8bit_headers_make_an_8bitmime_dsn() -> None:
    data = "Subject: café\r\n\r\nbody\r\n".encode()
    msg = build(envelope(smtputf8=True), data=data)
    assert msg is not None
    assert msg.envelope.body == "8BITMIME" and msg.envelope.smtputf8
    assert "Subject: café\r\n".encode() in msg.data
    assert parse(msg)["Content-Transfer-Encoding"] == "8bit"


def test_message_without_body_separator() -> None:
    msg = build(envelope(), data=b"Subject: only headers")
    assert msg is not None
    assert b"Subject: only headers\r\n" in msg.data
    assert parts(parse(msg))[2].get_content_type() == "text/rfc822-headers"


def test_the_dsn_is_accounted_to_the_tenant_and_campaign_of_the_original() -> None:
    env = envelope(Recipient(address="gone@dest.test"), tenant="acme", campaign_id="spring")
    dsn = build(env)
    assert dsn is not None
    assert (dsn.envelope.tenant, dsn.envelope.campaign_id) == ("acme", "spring")
