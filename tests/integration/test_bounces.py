"""Bounce handling end to end with a real relay (``relay serve``) and a recording sink:
VERP return paths at delivery, out-of-band DSNs and ARF complaints sent back to the
relay's SMTP port, the events they make, and the suppression they feed (so the next
message to that address is refused), plus the in-session hard bounce.

The sending application connects from 127.0.0.2 (the only network allowed to relay);
reports come from 127.0.0.1, a client that may not relay: mail for the bounce domain is
for the relay itself."""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.events import EventLog
from relay.events.types import OOB, Bounce, Complaint, Event, Reception, Suppressed
from relay.outcomes.verp import Verp
from relay.spool import new_queue_id
from tests.integration.relayproc import RelayProcess, make_relay, wait_for
from tests.integration.smtpsink import RecordingSink

DOMAIN = "bounces.relay.test"
SECRET = "bounce-secret-0123456789"
FBL = f"fbl@{DOMAIN}"
REPORTS = Path(__file__).resolve().parents[1] / "data" / "reports"
APP = "127.0.0.2"  # the sending application
VERP = Verp(DOMAIN, SECRET)


class Sink(RecordingSink):
    """RCPT ``reject*@`` is refused with 550 5.1.1; the rest accepted."""

    def rcpt_reply(self, line: bytes) -> bytes:
        if line.lower().startswith(b"rcpt to:<reject"):
            return b"550 5.1.1 <rejected>: Recipient address rejected: User unknown\r\n"
        return b"250 2.1.5 ok\r\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RelayProcess, Sink]]:
    sink = Sink()
    relay = make_relay(tmp_path_factory.mktemp("bounces"), workers=2,
                       inbound='tenant_header = "X-Tenant"', extra=f"""
[relay]
allow_networks = ["{APP}/32"]

[outbound]
smart_host = "127.0.0.1:{sink.port}"

[outbound.default]
retry_interval = 3600.0

[bounces]
domain = "{DOMAIN}"
secret = "{SECRET}"
complaint_addresses = ["{FBL}"]
auto_suppress = true
""")
    relay.start()
    try:
        yield relay, sink
    finally:
        relay.stop()
        sink.close()


def events(relay: RelayProcess) -> list[Event]:
    path = relay.tmp / "events.jsonl"
    return EventLog.read(path) if path.exists() else []


def smtp(relay: RelayProcess, source: str) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", relay.port, timeout=15, source_address=(source, 0))
    client.ehlo("client.test")
    return client


def send(relay: RelayProcess, rcpts: list[str], body: bytes, *, source: str = APP,
         sender: str = "sender@src.test") -> tuple[list[int], int, str]:
    """One transaction: each RCPT's code, DATA's code and its reply."""
    with smtp(relay, source) as client:
        client.mail(sender)
        codes = [client.rcpt(r)[0] for r in rcpts]
        if not any(c == 250 for c in codes):
            return codes, 0, ""
        code, reply = client.data(body)
        return codes, code, reply.decode()


def rcpt_codes(relay: RelayProcess, rcpts: list[str]) -> list[int]:
    """What RCPT TO answers for each of ``rcpts`` (the transaction is then reset)."""
    with smtp(relay, APP) as client:
        client.mail("sender@src.test")
        codes = [client.rcpt(r)[0] for r in rcpts]
        client.rset()
        return codes


def message(to: str, *, tenant: str = "") -> bytes:
    tag = f"X-Tenant: {tenant}\r\n" if tenant else ""
    return (f"From: news@src.test\r\nTo: {to}\r\nSubject: March news\r\n{tag}\r\n"
            "Hello\r\n").encode()


def queued(relay: RelayProcess, rcpts: list[str], **kw: str) -> str:
    codes, code, reply = send(relay, rcpts, message(", ".join(rcpts), **kw))
    assert codes == [250] * len(rcpts) and code == 250, (codes, code, reply)
    return reply.rsplit(" ", 1)[-1]


def delivered(sink: Sink, rcpt: str) -> tuple[str, bytes]:
    """The MAIL FROM path and the body the sink got for ``rcpt``."""
    def find() -> tuple[str, bytes] | None:
        with sink.lock:
            for sender, rcpts, raw in sink.messages:
                if rcpts == [f"<{rcpt}>".encode()]:
                    return sender.decode().strip("<>"), raw
        return None
    return wait_for(find, 20, f"delivery to {rcpt}")


def ref_of(raw: bytes) -> str:
    m = re.search(rb"(?im)^X-Relay-Ref: (\S+)", raw)
    assert m, raw[:500]
    return m.group(1).decode()


def report(name: str, *, return_path: str, ref: str, replace: dict[str, str]) -> bytes:
    text = (REPORTS / name).read_text()
    text = text.replace("__RETURN_PATH__", return_path).replace("__REF__", ref)
    text = text.replace("__COMPLAINT_ADDRESS__", FBL)
    for old, new in replace.items():
        text = text.replace(old, new)
    return text.replace("\n", "\r\n").encode()


def test_verp_delivery_then_an_oob_dsn_suppresses_the_invalid_recipient(
        setup: tuple[RelayProcess, Sink]) -> None:
    relay, sink = setup
    qid = queued(relay, ["gone@dest.test", "kept@dest.test"])
    # One transaction per recipient, each with its own signed return path.
    paths = {}
    for index, rcpt in enumerate(["gone@dest.test", "kept@dest.test"]):
        mail_from, raw = delivered(sink, rcpt)
        assert VERP.read(mail_from) == (qid, index), mail_from
        paths[rcpt] = (mail_from, ref_of(raw))
    return_path, ref = paths["gone@dest.test"]
    dsn = report("gmail-nosuchuser.eml", return_path=return_path, ref=ref,
                 replace={"nosuchuser@gmail.com": "gone@dest.test"})
    codes, code, reply = send(relay, [return_path], dsn, source="127.0.0.1", sender="")
    assert codes == [250] and code == 250, (codes, code, reply)
    (oob,) = wait_for(lambda: [e for e in events(relay) if isinstance(e, OOB)
                               and e.queue_id == qid], 20, "the OOB event")
    assert (oob.recipient, oob.bounce_class, oob.bounce_rule, oob.linked_by, oob.status) == (
        "gone@dest.test", 10, "gmail-no-such-user", "verp", "5.1.1")
    assert oob.report_id == reply.rsplit(" ", 1)[-1] and oob.client_ip == "127.0.0.1"
    # Committed before that 250: the next message to it is refused at once.
    assert rcpt_codes(relay, ["gone@dest.test", "kept@dest.test"]) == [550, 250]


def test_forged_and_unknown_bounce_addresses_are_refused_and_nothing_is_relayed(
        setup: tuple[RelayProcess, Sink]) -> None:
    relay, _ = setup
    good = VERP.address(new_queue_id(), 0)
    forged = Verp(DOMAIN, "not-the-secret-0000000").address(new_queue_id(), 0)
    with smtp(relay, "127.0.0.1") as client:
        client.mail("")
        assert client.rcpt(forged)[0] == 550
        assert client.rcpt(f"postmaster@{DOMAIN}")[0] == 250  # RFC 5321 4.5.1: always
        code, text = client.rcpt(f"random@{DOMAIN}")
        assert (code, text[:5]) == (550, b"5.1.1")
        assert client.rcpt("someone@dest.test")[0] == 554  # not a client of ours: no relay
        assert client.rcpt(good)[0] == 250
        code, reply = client.data(b"\xff\xfe garbage that is no report at all\r\n")
        assert code == 250, reply
    (oob,) = wait_for(lambda: [e for e in events(relay) if isinstance(e, OOB)
                               and e.bounce_address == good], 20, "the garbage's event")
    assert oob.recipient == "" and oob.queue_id


def test_an_arf_complaint_is_linked_and_suppresses_the_tenants_campaign_mail(
        setup: tuple[RelayProcess, Sink]) -> None:
    relay, sink = setup
    qid = queued(relay, ["angry@dest.test"], tenant="acme")
    return_path, raw = delivered(sink, "angry@dest.test")
    arf = report("arf-yahoo.eml", return_path=return_path, ref=ref_of(raw), replace={})
    codes, code, _ = send(relay, [FBL], arf, source="127.0.0.1", sender="")
    assert codes == [250] and code == 250
    (complaint,) = wait_for(lambda: [e for e in events(relay) if isinstance(e, Complaint)
                                     and e.queue_id == qid], 20, "the Complaint event")
    assert (complaint.recipient, complaint.tenant, complaint.feedback_type,
            complaint.user_agent) == ("angry@dest.test", "acme", "abuse",
                                      "Yahoo!-Mail-Feedback/2.0")
    # The tenant is only known from the header: the next message is taken, and the
    # intake drops the suppressed recipient.
    again = queued(relay, ["angry@dest.test"], tenant="acme")
    (dropped,) = wait_for(lambda: [e for e in events(relay) if isinstance(e, Suppressed)
                                   and e.queue_id == again], 20, "the Suppressed event")
    assert (dropped.recipient, dropped.source) == ("angry@dest.test", "complaint")


def test_an_in_session_hard_bounce_suppresses_and_the_dsn_goes_to_the_real_sender(
        setup: tuple[RelayProcess, Sink]) -> None:
    relay, sink = setup
    qid = queued(relay, ["reject-me@dest.test"])
    (bounce,) = wait_for(lambda: [e for e in events(relay) if isinstance(e, Bounce)
                                  and e.queue_id == qid], 20, "the Bounce event")
    assert bounce.bounce_class == 10
    # It was offered with its VERP return path ...
    with sink.lock:
        paths = [c.partition(b"<")[2].partition(b">")[0].decode() for c in sink.commands
                 if c.upper().startswith(b"MAIL FROM:")]
    assert any(VERP.read(p) == (qid, 0) for p in paths), paths
    # ... but our own DSN of it goes to the envelope's sender, from the null sender.
    sender, _ = delivered(sink, "sender@src.test")
    assert sender == ""
    # The feed commits in the background: the refusal comes within moments.
    wait_for(lambda: rcpt_codes(relay, ["reject-me@dest.test"]) == [550], 20,
             "the refusal of the suppressed address")


def test_bounce_and_ordinary_recipients_in_one_transaction(
        setup: tuple[RelayProcess, Sink]) -> None:
    relay, _ = setup
    address = VERP.address(new_queue_id(), 0)
    codes, code, reply = send(relay, [address, "mixed@dest.test"],
                              message("mixed@dest.test"))
    assert codes == [250, 250] and code == 250, reply
    qid = reply.rsplit(" ", 1)[-1]
    (reception,) = wait_for(lambda: [e for e in events(relay) if isinstance(e, Reception)
                                     and e.queue_id == qid], 20, "the Reception")
    assert reception.recipients == ["mixed@dest.test"]
    wait_for(lambda: [e for e in events(relay) if isinstance(e, OOB)
                      and e.report_id == qid and e.bounce_address == address], 20,
             "the report's event")
