"""Reports that come back to the bounce domain: parsed, linked to our mail, judged.

Pure functions, no I/O (the listener runs ``parse_report`` in a worker thread: a report
may be megabytes of returned message):

- ``parse_report(data)`` -> ``Report``; never raises (an unusable message is a report of
  kind "unparseable" saying why). With the ``email`` package (the lenient ``compat32``
  policy, which never raises on a bad header):

  * a feedback report (ARF, RFC 5965: ``multipart/report; report-type=feedback-report``):
    the ``message/feedback-report`` part's Feedback-Type, User-Agent, Reporting-MTA,
    Source-IP, Original-Mail-From and Original-Rcpt-To;
  * a DSN (RFC 3464, and RFC 6533's ``message/global-delivery-status``): each
    per-recipient block's Final-Recipient, Original-Recipient, Action, Status,
    Diagnostic-Code and Remote-MTA, and the Reporting-MTA;
  * anything else goes through ``flufl.bounce``'s detectors (qmail's QSBMF, Exim's
    X-Failed-Recipients, Postfix, Microsoft, Yahoo, ... and heuristics): the addresses
    that failed, permanently or not; the reply is read from the text near each
    address (the first SMTP reply in it, else the words after it);
  * a message that is none of these is a "reply" (an auto-reply, a human answer).

  Of the returned original (``message/rfc822``, ``text/rfc822-headers``, or pasted into
  the text as qmail and many others do) it keeps the Return-Path values, the
  ``X-Relay-Ref`` tokens (``relay.intake.reference``) and the To: addresses.

  At most ``MAX_PARSE`` bytes are read (the report comes first; the rest is the
  returned message), at most ``MAX_PARTS`` MIME parts and ``MAX_FAILURES`` recipients.

- ``link_report(report, address, verp, secret)`` -> ``Link``: the message a report is
  about, by the VERP address it came to, else a VERP address in the returned headers
  (Return-Path, Original-Mail-From), else a verified ``X-Relay-Ref``. The reference
  also gives the tenant, the campaign and (single-recipient mail) the recipient.

- ``judge_report(report, link, ...)`` -> one ``OOB`` or ``Complaint`` event: the report
  about that message and recipient, classified with the bounce rules
  (``relay.outcomes.classify``; a reply without a code is classified by its words:
  auto-replies are 60, challenge-responses 100, "unsubscribe" 90).

The recipient it is about: the reference's (it names the address we sent to), else the
DSN's Original-Recipient or Final-Recipient (the one matching the reference first), the
feedback report's Original-Rcpt-To when it names one (never its returned To:, which
feedback loops redact), and for a reply the returned To: when it names one address, else
its From:. A report that cannot be linked is still an event (``queue_id`` "",
``note`` saying why), which no suppression acts on: anybody can write one.
"""

from __future__ import annotations

import email
import email.header
import email.message
import email.parser
import email.policy
import email.utils
import logging
import re
from collections.abc import Iterator
from typing import Any, NamedTuple

import msgspec
from flufl.bounce import all_failures

from relay.events.types import OOB, Complaint
from relay.intake.reference import REF_FIELD, Reference, read_ref
from relay.outcomes.classify import Classification, Classifier, parse_reply_line
from relay.outcomes.verp import Verp

__all__ = [
    "MAX_PARSE",
    "Failure",
    "Link",
    "Report",
    "judge_report",
    "link_report",
    "parse_report",
]

#: flufl.bounce logs every detector it runs at INFO, and a detector's exception with its
#: traceback before re-raising it: on mail from anybody that is noise (the event and our
#: own log line say what happened).
logging.getLogger("flufl.bounce").setLevel(logging.CRITICAL)

MAX_PARSE = 2 * 1024 * 1024
MAX_PARTS = 200
MAX_FAILURES = 100
#: Longest field value kept, and how much of the text is read for replies.
_MAX_FIELD = 1000
_MAX_TEXT = 20000
_WINDOW = 1500

_HEADER_TYPES = frozenset({"text/rfc822-headers", "message/rfc822-headers",
                           "message/global-headers"})
_MESSAGE_TYPES = frozenset({"message/rfc822", "message/global"})
_STATUS_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status"})
_STATUS_RE = re.compile(r"^[245]\.[0-9]{1,3}\.[0-9]{1,3}$")
#: An SMTP reply in a text; Yahoo writes the code with a colon ("554: delivery error").
_REPLY_RE = re.compile(r"(?<![\d.])([45][0-9][0-9])(?::[ \t]*|[ -])"
                       r"(?:#?[45]\.[0-9]{1,3}\.[0-9]{1,3}\b)?[^\r\n]*")
_PASTED_RE = re.compile(rf"^(return-path|{REF_FIELD.lower()}|original-mail-from):[ \t]*"
                        r"(\S+)", re.IGNORECASE | re.MULTILINE)


class Failure(msgspec.Struct, kw_only=True):
    """One recipient a bounce reports."""

    recipient: str = ""
    original: str = ""
    #: "failed", "delayed", "delivered", "relayed", "expanded" (lower case).
    action: str = "failed"
    status: str = ""
    #: The reply or the words of the failure, without the DSN's "smtp;" type.
    diagnostic: str = ""
    remote_mta: str = ""


class Report(msgspec.Struct, kw_only=True):
    """What a message to the bounce domain says (module docstring)."""

    kind: str
    failures: list[Failure] = []
    reporting_mta: str = ""
    subject: str = ""
    #: Its From: address, and the start of its first text part.
    sender: str = ""
    text: str = ""
    # -- a feedback report
    feedback_type: str = ""
    user_agent: str = ""
    source_ip: str = ""
    original_mail_from: str = ""
    original_rcpt_to: list[str] = []
    # -- the returned original
    return_paths: list[str] = []
    refs: list[str] = []
    original_to: list[str] = []
    #: Why it is "unparseable", or what went wrong on the way.
    error: str = ""


class Link(NamedTuple):
    """Our message a report is about: its queue id, the recipient's index when a VERP
    address said it, the verified reference (tags, recipient), and how it was found."""

    queue_id: str
    index: int | None
    ref: Reference | None
    by: str


# --------------------------------------------------------------------------- parsing


def parse_report(data: bytes) -> Report:
    """See the module docstring; never raises."""
    try:
        return _parse(data[:MAX_PARSE])
    except Exception as e:  # mail from anybody: no input may end a worker
        return Report(kind="unparseable", error=f"{type(e).__name__}: {e}"[:300])


def _parse(data: bytes) -> Report:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    report = Report(kind="reply", subject=_field(msg, "subject"),
                    sender=_address(_field(msg, "from")))
    feedback: email.message.Message | None = None
    for part in _parts(msg):
        ctype = part.get_content_type()
        if ctype in _STATUS_TYPES:
            _read_status(part, report)
        elif ctype == "message/feedback-report" and feedback is None:
            feedback = next(iter(_blocks(part)), None)
        elif ctype in _MESSAGE_TYPES or ctype in _HEADER_TYPES:
            _read_original(part, report)
        elif ctype == "text/plain" and not report.text:
            report.text = _text(part)
    if not report.text and not msg.is_multipart():
        report.text = _text(msg)
    _read_pasted(report.text, report)
    if feedback is not None:
        _read_feedback(feedback, report)
        report.kind = "arf"
    elif report.failures:
        report.kind = "dsn"
    else:
        _detect(msg, report)
    return report


def _parts(msg: email.message.Message) -> Iterator[email.message.Message]:
    """The MIME parts, depth first, not descending into ``message/*`` parts (a returned
    message's parts are not the report's; a status part's blocks are read by
    ``_blocks``), at most ``MAX_PARTS``."""
    stack, seen = [msg], 0
    while stack and seen < MAX_PARTS:
        part = stack.pop()
        seen += 1
        yield part
        if part.is_multipart() and part.get_content_maintype() != "message":
            children = [p for p in part.get_payload() if isinstance(p, email.message.Message)]
            stack.extend(reversed(children))


def _field(block: email.message.Message, name: str) -> str:
    """A field's value, unfolded; 8-bit bytes read as UTF-8 (RFC 6533's utf-8
    addresses: compat32 hands them over as an "unknown-8bit" Header)."""
    value = block.get(name)
    if value is None:
        return ""
    if isinstance(value, email.header.Header):
        value = "".join(b.decode("utf-8", "replace") if isinstance(b, bytes) else b
                        for b, _ in email.header.decode_header(value))
    return " ".join(str(value).split())[:_MAX_FIELD]


def _typed(value: str) -> str:
    """``"rfc822; a@b"`` -> ``"a@b"``; ``"smtp; 550 ..."`` -> ``"550 ..."``."""
    kind, sep, rest = value.partition(";")
    return rest.strip() if sep and kind.strip() and " " not in kind.strip() else value.strip()


def _address(value: str) -> str:
    """The address of a field value (``"Name <a@b>"``, ``"<a@b>"``, ``"rfc822;a@b"``)."""
    addr = email.utils.parseaddr(_typed(value))[1]
    return addr if "@" in addr else ""


def _text(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload[:_MAX_TEXT].decode(charset, "replace")
    except LookupError:  # an unknown charset name
        return payload[:_MAX_TEXT].decode("utf-8", "replace")


def _blocks(part: email.message.Message) -> list[email.message.Message]:
    """The field blocks of a ``message/delivery-status``-like part. The email package
    splits ``message/delivery-status`` into blocks itself; any other ``message/*`` is
    parsed as one message whose body holds the blocks after the first."""
    payload = part.get_payload()
    if isinstance(payload, str):
        raw = part.get_payload(decode=True)
        return _split_blocks(raw.decode("utf-8", "replace") if isinstance(raw, bytes) else "")
    blocks: list[email.message.Message] = []
    for block in payload:
        if not isinstance(block, email.message.Message):
            continue
        blocks.append(block)
        rest = block.get_payload(decode=True)  # bytes: its 8-bit text read as UTF-8 below
        if isinstance(rest, bytes) and rest.strip():
            blocks += _split_blocks(rest.decode("utf-8", "replace"))
    return blocks


def _split_blocks(text: str) -> list[email.message.Message]:
    parser = email.parser.HeaderParser(policy=email.policy.compat32)
    chunks = re.split(r"\r?\n[ \t]*\r?\n", text.strip())
    return [parser.parsestr(chunk) for chunk in chunks[:MAX_FAILURES + 1] if chunk.strip()]


def _read_status(part: email.message.Message, report: Report) -> None:
    blocks = _blocks(part)
    for block in blocks:
        if block.get("reporting-mta") is not None and not report.reporting_mta:
            report.reporting_mta = _typed(_field(block, "reporting-mta"))
        final, original = _field(block, "final-recipient"), _field(block, "original-recipient")
        if not (final or original) or len(report.failures) >= MAX_FAILURES:
            continue
        report.failures.append(Failure(
            recipient=_address(final), original=_address(original),
            action=_field(block, "action").lower() or "failed",
            status=_field(block, "status").split(" ")[0],
            diagnostic=_typed(_field(block, "diagnostic-code")),
            remote_mta=_typed(_field(block, "remote-mta"))))


def _read_original(part: email.message.Message, report: Report) -> None:
    if part.get_content_type() in _MESSAGE_TYPES:
        payload = part.get_payload()
        original = payload[0] if isinstance(payload, list) and payload else None
    else:
        raw = part.get_payload(decode=True)
        original = email.parser.HeaderParser(policy=email.policy.compat32).parsestr(
            raw[:MAX_PARSE].decode("utf-8", "replace")) if isinstance(raw, bytes) else None
    if not isinstance(original, email.message.Message):
        return
    report.return_paths += [_address(str(v)) for v in original.get_all("return-path", [])]
    report.refs += [" ".join(str(v).split()) for v in original.get_all(REF_FIELD, [])]
    report.original_to += [a for _, a in email.utils.getaddresses(
        [str(v) for v in original.get_all("to", [])]) if "@" in a]


def _read_pasted(text: str, report: Report) -> None:
    """Headers of the original pasted into the text (qmail's "Below this line is a copy
    of the message", Exim's "------ This is a copy of the message")."""
    for m in _PASTED_RE.finditer(text):
        name, value = m.group(1).lower(), m.group(2)
        if name == REF_FIELD.lower():
            report.refs.append(value)
        else:
            report.return_paths.append(_address(value))


def _read_feedback(block: email.message.Message, report: Report) -> None:
    report.feedback_type = _field(block, "feedback-type").lower()
    report.user_agent = _field(block, "user-agent")
    report.reporting_mta = _typed(_field(block, "reporting-mta"))
    report.source_ip = _field(block, "source-ip")
    report.original_mail_from = _address(_field(block, "original-mail-from"))
    report.original_rcpt_to = [a for v in block.get_all("original-rcpt-to", [])
                               if (a := _address(str(v)))][:MAX_FAILURES]


def _detect(msg: email.message.Message, report: Report) -> None:
    """A non-standard bounce, by flufl.bounce's detectors."""
    try:
        temporary, permanent = all_failures(msg)
    except Exception as e:  # a detector met input it did not expect
        report.error = f"bounce detectors failed: {type(e).__name__}: {e}"[:300]
        return
    found = [(a, "failed") for a in sorted(permanent)] + [
        (a, "delayed") for a in sorted(temporary - permanent)]
    for raw, action in found[:MAX_FAILURES]:
        address = raw.decode("utf-8", "replace")
        report.failures.append(Failure(recipient=address, action=action,
                                       diagnostic=_diagnostic_near(report.text, address)))
    if report.failures:
        report.kind = "non-standard"


def _diagnostic_near(text: str, address: str) -> str:
    """The first SMTP reply after ``address`` in ``text``, else the words after it."""
    at = text.lower().find(address.lower())
    window = text[at + len(address): at + len(address) + _WINDOW] if at >= 0 else text[:_WINDOW]
    m = _REPLY_RE.search(window)
    if m is not None:
        reply = m.group(1) + " " + m.group(0)[len(m.group(1)):].lstrip(": \t-")
        return " ".join(reply.split())[:_MAX_FIELD]
    return " ".join(window.split())[:300]


# --------------------------------------------------------------------------- linking


def link_report(report: Report, address: str, verp: Verp, secret: bytes,
                now: float | None = None) -> Link | None:
    """The message ``report`` (which came to ``address``) is about, or None."""
    ref = next((r for t in report.refs if (r := read_ref(secret, t)) is not None), None)
    found = verp.read(address, now)
    by = "verp"
    if found is None:
        by = "return-path"
        found = next((v for a in [*report.return_paths, report.original_mail_from]
                      if a and (v := verp.read(a, now)) is not None), None)
    if found is not None:
        return Link(found.queue_id, found.index,
                    ref if ref is not None and ref.queue_id == found.queue_id else None, by)
    return Link(ref.queue_id, None, ref, "reference") if ref is not None else None


# --------------------------------------------------------------------------- judging


def judge_report(report: Report, link: Link | None, *, classifier: Classifier,
                 bounce_address: str, client_ip: str = "", report_id: str = "",
                 now: float) -> OOB | Complaint:
    """The event ``report`` makes (module docstring)."""
    common = _common(link, time=now, bounce_address=bounce_address, client_ip=client_ip,
                     report_id=report_id)
    ref_rcpt = link.ref.recipient if link is not None and link.ref is not None else ""
    if report.kind == "arf":
        # Not the returned To: feedback loops redact it (Yahoo, Microsoft's JMRP).
        return Complaint(**common, recipient=ref_rcpt or _one(report.original_rcpt_to),
                         feedback_type=report.feedback_type, user_agent=report.user_agent,
                         reporting_mta=report.reporting_mta, source_ip=report.source_ip)
    if report.kind == "unparseable":
        common["note"] = f"{common.get('note', '')} unparseable: {report.error}".strip()
        return OOB(**common, recipient=ref_rcpt, kind=report.kind)
    failure = _chosen(report.failures, ref_rcpt)
    if failure is None:
        verdict, words = _classify_reply(report, classifier)
        return OOB(**common, recipient=ref_rcpt or _one(report.original_to) or report.sender,
                   kind="reply", reply=words, reporting_mta=report.reporting_mta,
                   bounce_class=verdict.bounce_class, bounce_rule=verdict.rule)
    recipient = ref_rcpt or failure.original or failure.recipient
    verdict = _classify_failure(failure, recipient, classifier)
    return OOB(**common, recipient=recipient, kind=report.kind, action=failure.action,
               status=failure.status, reply=failure.diagnostic,
               reporting_mta=report.reporting_mta, remote_mta=failure.remote_mta,
               bounce_class=verdict.bounce_class, bounce_rule=verdict.rule)


def _common(link: Link | None, **fields: Any) -> dict[str, Any]:
    """The fields every event of a report has: ``fields``, the link and its tags."""
    if link is None:
        return {**fields, "queue_id": "", "note": "not linked: no VERP address nor "
                "X-Relay-Ref of ours in the report"}
    fields.update(queue_id=link.queue_id, linked_by=link.by)
    if link.ref is not None and link.ref.tenant:
        fields["tenant"] = link.ref.tenant
    if link.ref is not None and link.ref.campaign:
        fields["campaign_id"] = link.ref.campaign
    return fields


def _one(addresses: list[str]) -> str:
    return addresses[0] if len(addresses) == 1 else ""


def _chosen(failures: list[Failure], recipient: str) -> Failure | None:
    """The failure about ``recipient`` if one names it, else the first that failed."""
    want = recipient.lower()
    for f in failures:
        if want and want in (f.recipient.lower(), f.original.lower()):
            return f
    return next((f for f in failures if f.action == "failed"), failures[0] if failures
                else None)


def _classify_failure(f: Failure, recipient: str, classifier: Classifier) -> Classification:
    """By the diagnostic's reply code, else by the Status (5.x.x as a 550, 4.x.x a 450),
    scoped by the recipient's domain."""
    code, enhanced, text = parse_reply_line(f.diagnostic)
    status = f.status if _STATUS_RE.match(f.status) else None
    if not code and status:
        code = 550 if status[0] == "5" else 450 if status[0] == "4" else 0
    domain = recipient.rpartition("@")[2].lower()
    return classifier.classify(code, enhanced or status, text, (domain,) if domain else ())


def _classify_reply(report: Report, classifier: Classifier) -> tuple[Classification, str]:
    """A reply without a code: by its subject, else by the start of its text."""
    verdict = classifier.classify(0, None, report.subject)
    if verdict.bounce_class != 1 or not report.text.strip():
        return verdict, report.subject
    words = " ".join(report.text.split())[:300]
    return classifier.classify(0, None, words), report.subject or words
