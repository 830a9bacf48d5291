"""Reports that come back to the bounce domain (relay.outcomes.oob), on the corpus in
tests/data/reports: DSNs (RFC 3464, Gmail, Microsoft, Postfix, RFC 6533), non-standard
bounces (qmail, Exim, Yahoo), feedback reports (RFC 5965, Yahoo), replies; linking by the
VERP address, the returned Return-Path and the X-Relay-Ref header; and random input."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.events.types import OOB, Complaint, decode, encode
from relay.intake.reference import make_ref
from relay.outcomes.classify import default_classifier
from relay.outcomes.oob import Report, judge_report, link_report, parse_report
from relay.outcomes.verp import Verp
from relay.spool import new_queue_id

REPORTS = Path(__file__).resolve().parents[1] / "data" / "reports"
SECRET = "bounce-secret-0123456789"
VERP = Verp("bounces.relay.test", SECRET)


def sample(name: str, *, return_path: str = "nobody@nowhere.test", ref: str = "none.none",
           complaint: str = "fbl@bounces.relay.test") -> bytes:
    """A corpus file as it arrives over SMTP (CRLF), placeholders filled in."""
    text = (REPORTS / name).read_bytes()
    for key, value in ((b"__RETURN_PATH__", return_path), (b"__REF__", ref),
                       (b"__COMPLAINT_ADDRESS__", complaint)):
        text = text.replace(key, value.encode())
    return text.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def judged(report: Report, address: str = "x@bounces.relay.test") -> OOB | Complaint:
    link = link_report(report, address, VERP, SECRET.encode())
    return judge_report(report, link, classifier=default_classifier(), bounce_address=address,
                        client_ip="192.0.2.9", report_id="R1", now=1000.0)


# file, kind, recipient, action, status, bounce class (None: a complaint)
CORPUS = [
    ("rfc3464-simple.eml", "dsn", "louisl@larry.slip.umd.edu", "failed", "4.0.0", 70),
    ("rfc3464-multi.eml", "dsn", "arathib@vnet.ibm.com", "failed", "5.0.0", 1),
    ("gmail-nosuchuser.eml", "dsn", "nosuchuser@gmail.com", "failed", "5.1.1", 10),
    ("microsoft-undeliverable.eml", "dsn", "gone@outlook.com", "failed", "5.5.0", 10),
    ("postfix-delayed.eml", "dsn", "slow@example.com", "delayed", "4.4.1", 24),
    ("global-dsn.eml", "dsn", "jörg@example.com", "failed", "5.1.1", 10),
    ("qmail.eml", "non-standard", "nobody@example.net", "failed", "", 10),
    ("exim.eml", "non-standard", "quota@example.org", "failed", "", 22),
    ("yahoo-failure.eml", "non-standard", "fullbox@yahoo.com", "failed", "", 22),
    ("auto-reply.eml", "reply", "away@example.org", "", "", 60),
]


@pytest.mark.parametrize(("name", "kind", "recipient", "action", "status", "bounce_class"),
                         CORPUS)
def test_bounces_of_the_corpus(name: str, kind: str, recipient: str, action: str,
                               status: str, bounce_class: int) -> None:
    report = parse_report(sample(name))
    assert report.kind == kind, report
    event = judged(report)
    assert isinstance(event, OOB)
    assert (event.kind, event.recipient, event.action, event.status) == (
        kind, recipient, action, status)
    assert event.bounce_class == bounce_class, event
    assert event.bounce_rule
    # Not linked (no VERP address, no valid reference): an event nobody acts on.
    assert event.queue_id == "" and event.linked_by == "" and "not linked" in event.note


def test_the_reply_and_remote_mta_are_read_from_the_dsn() -> None:
    event = judged(parse_report(sample("gmail-nosuchuser.eml")))
    assert isinstance(event, OOB)
    assert event.reply.startswith("550-5.1.1 The email account that you tried to reach")
    assert "NoSuchUser" in event.reply
    assert event.reporting_mta == "googlemail.com"
    assert event.remote_mta.startswith("gmail-smtp-in.l.google.com")
    assert event.bounce_rule == "gmail-no-such-user"


def test_non_standard_bounces_give_the_reply_near_the_address() -> None:
    qmail = judged(parse_report(sample("qmail.eml")))
    assert isinstance(qmail, OOB)
    assert qmail.reply.startswith("550 5.1.1 <nobody@example.net>: Recipient address rejected")
    yahoo = judged(parse_report(sample("yahoo-failure.eml")))
    assert isinstance(yahoo, OOB) and yahoo.reply.startswith("552 5.2.2 Mailbox full")


@pytest.mark.parametrize(("name", "feedback_type", "recipient", "reporting_mta"), [
    ("arf-rfc5965.eml", "abuse", "user@example.com", "mail.example.com"),
    ("arf-yahoo.eml", "abuse", "", "mta1001.mail.gq1.yahoo.com"),
    ("arf-not-spam.eml", "not-spam", "happy@example.net", ""),
])
def test_feedback_reports(name: str, feedback_type: str, recipient: str,
                          reporting_mta: str) -> None:
    report = parse_report(sample(name))
    assert report.kind == "arf"
    event = judged(report)
    assert isinstance(event, Complaint)
    assert (event.feedback_type, event.recipient, event.reporting_mta) == (
        feedback_type, recipient, reporting_mta)


def test_arf_fields_of_rfc5965() -> None:
    report = parse_report(sample("arf-rfc5965.eml"))
    assert report.user_agent == "SomeGenerator/1.0"
    assert report.source_ip == "192.0.2.1"
    assert report.original_rcpt_to == ["user@example.com"]
    event = judged(report)
    assert isinstance(event, Complaint) and event.source_ip == "192.0.2.1"


# -- linking


def test_a_dsn_to_a_verp_address_is_linked_to_message_and_recipient() -> None:
    qid = new_queue_id()
    address = VERP.address(qid, 3)
    ref = make_ref(SECRET.encode(), queue_id=qid, tenant="acme", campaign="march",
                   recipient="nosuchuser@gmail.com")
    event = judged(parse_report(sample("gmail-nosuchuser.eml", return_path=address, ref=ref)),
                   address)
    assert isinstance(event, OOB)
    assert (event.queue_id, event.recipient, event.linked_by) == (
        qid, "nosuchuser@gmail.com", "verp")
    assert (event.tenant, event.campaign_id, event.bounce_class) == ("acme", "march", 10)
    assert (event.bounce_address, event.client_ip, event.report_id) == (
        address, "192.0.2.9", "R1")
    # An event like the others in the log: tagged, and read back the same.
    assert encode(event).startswith(b'{"type":"OOB"')
    assert decode(encode(event)) == event


def test_a_reference_of_another_message_gives_no_tags() -> None:
    qid = new_queue_id()
    address = VERP.address(qid, 0)
    other = make_ref(SECRET.encode(), queue_id=new_queue_id(), tenant="evil", campaign="",
                     recipient="victim@example.com")
    event = judged(parse_report(sample("qmail.eml", ref=other)), address)
    assert (event.queue_id, event.tenant, event.recipient) == (qid, None, "nobody@example.net")


def test_a_complaint_is_linked_by_the_returned_return_path_and_the_reference() -> None:
    qid = new_queue_id()
    ref = make_ref(SECRET.encode(), queue_id=qid, tenant="acme", campaign="march",
                   recipient="reader@yahoo.com")
    report = parse_report(sample("arf-yahoo.eml", return_path=VERP.address(qid, 0), ref=ref))
    event = judged(report, "fbl@bounces.relay.test")
    assert isinstance(event, Complaint)
    # Yahoo redacts the recipient; the reference names it.
    assert (event.queue_id, event.linked_by, event.recipient, event.tenant) == (
        qid, "return-path", "reader@yahoo.com", "acme")
    assert decode(encode(event)) == event
    only_ref = judged(parse_report(sample("arf-yahoo.eml", ref=ref)), "fbl@bounces.relay.test")
    assert (only_ref.queue_id, only_ref.linked_by, only_ref.recipient) == (
        qid, "reference", "reader@yahoo.com")


def test_pasted_headers_of_a_non_standard_bounce_link_it() -> None:
    qid = new_queue_id()
    ref = make_ref(SECRET.encode(), queue_id=qid, tenant="", campaign="", recipient="")
    event = judged(parse_report(sample("exim.eml", return_path=VERP.address(qid, 1), ref=ref)),
                   "fbl@bounces.relay.test")
    assert (event.queue_id, event.linked_by, event.recipient) == (
        qid, "return-path", "quota@example.org")


def test_forged_links_are_not_links() -> None:
    qid = new_queue_id()
    forger = Verp("bounces.relay.test", "not-the-secret-000000")
    forged_ref = make_ref(b"not-the-secret-000000", queue_id=qid, tenant="acme", campaign="",
                          recipient="victim@example.com")
    report = parse_report(sample("arf-rfc5965.eml", return_path=forger.address(qid, 0),
                                 ref=forged_ref))
    event = judged(report, "fbl@bounces.relay.test")
    assert event.queue_id == "" and event.tenant is None and "not linked" in event.note


def test_unparseable_mail_is_an_event_saying_so() -> None:
    qid = new_queue_id()
    address = VERP.address(qid, 0)
    report = parse_report(b"\x00\xff garbage")
    event = judged(report, address)
    assert isinstance(event, OOB)
    assert event.queue_id == qid and event.bounce_class in (None, 1)


# -- anything at all


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4000))
def test_random_bytes_never_raise(data: bytes) -> None:
    report = parse_report(data)
    assert isinstance(report, Report)
    event = judged(report, VERP.address(new_queue_id(), 0))
    assert isinstance(event, OOB | Complaint)


CORPUS_FILES = sorted(p.name for p in REPORTS.glob("*.eml"))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(CORPUS_FILES), st.data())
def test_damaged_reports_never_raise(name: str, data: st.DataObject) -> None:
    raw = bytearray(sample(name))
    for _ in range(data.draw(st.integers(1, 20))):
        at = data.draw(st.integers(0, len(raw)))
        action = data.draw(st.sampled_from(["insert", "delete", "flip"]))
        if action == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=40))
        elif at < len(raw):
            if action == "delete":
                del raw[at:at + data.draw(st.integers(1, 200))]
            else:
                raw[at] ^= data.draw(st.integers(1, 255))
    report = parse_report(bytes(raw))
    event = judged(report, "fbl@bounces.relay.test")
    assert isinstance(event, OOB | Complaint)


def test_a_huge_report_is_read_only_so_far() -> None:
    data = sample("gmail-nosuchuser.eml") + b"x" * (5 * 1024 * 1024)
    report = parse_report(data)
    assert report.kind == "dsn" and report.failures[0].status == "5.1.1"


def test_a_mime_nesting_bomb_is_unparseable_not_a_crash() -> None:
    bomb = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
                    for i in range(3000))
    report = parse_report(bomb)
    assert report.kind == "unparseable" and "RecursionError" in report.error
    event = judged(report, VERP.address(new_queue_id(), 0))
    assert isinstance(event, OOB) and "unparseable" in event.note
