"""One-click unsubscribe tokens and headers, and the suppression stage (no I/O)."""

from __future__ import annotations

from relay.config import Config, UnsubscribeConfig
from relay.intake import Admission, Intake, default_stages
from relay.intake.unsubscribe import make_token, read_token
from relay.model import Envelope, Recipient
from relay.spool.suppression import Suppression

SECRET = b"0123456789abcdef"
BODY = b"From: news@sender.test\r\nSubject: hi\r\n\r\nbody\r\n"


def test_a_token_reads_back_and_nothing_else_does() -> None:
    token = make_token(SECRET, tenant="acme", campaign="spring", recipient="ann@dest.test")
    read = read_token(SECRET, token)
    assert read is not None
    assert (read.tenant, read.campaign, read.recipient) == ("acme", "spring", "ann@dest.test")
    body, _, mac = token.partition(".")
    assert read_token(b"another-secret-16", token) is None
    assert read_token(SECRET, body + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB")) is None
    assert read_token(SECRET, make_token(SECRET, tenant="x", campaign="", recipient="e@f")
                      .partition(".")[0] + "." + mac) is None
    for junk in ("", ".", "a.b", "%%%.%%%", "x" * 5000):
        assert read_token(SECRET, junk) is None


def intake(lookup: object | None = None) -> Intake:
    config = Config(unsubscribe=UnsubscribeConfig(
        url="https://relay.test/u/", mailto="unsub@relay.test", secret=SECRET.decode(),
        tenants=["acme"]))
    stand_in: object = object()
    return Intake(default_stages(config, "relay.test", suppressions=lookup),  # type: ignore[arg-type]
                  stand_in, stand_in)  # type: ignore[arg-type]


def admission(*rcpts: str, tenant: str | None = "acme", transactional: bool = False,
              data: bytes = BODY) -> Admission:
    env = Envelope(queue_id="Q1", sender="news@sender.test", received_at=1_000_000.0,
                   recipients=[Recipient(address=a) for a in rcpts], tenant=tenant,
                   campaign_id="spring", transactional=transactional)
    return Admission(envelope=env, data=data, via="http")


def test_headers_for_one_recipient_campaign_mail_of_a_covered_tenant() -> None:
    stored = intake().prepare(admission("ann@dest.test"))
    head = stored.data.partition(b"\r\n\r\n")[0].decode()
    [link] = [line for line in head.split("\r\n") if line.startswith("List-Unsubscribe: ")]
    token = link.removeprefix("List-Unsubscribe: <https://relay.test/u/").partition(">")[0]
    read = read_token(SECRET, token)
    assert read is not None and read.recipient == "ann@dest.test"
    assert "\r\n <mailto:unsub@relay.test?subject=unsubscribe>\r\n" in head + "\r\n"
    assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in head


def test_no_headers_where_they_do_not_belong() -> None:
    own = b"List-Unsubscribe: <mailto:x@sender.test>\r\n" + BODY
    for msg in (admission("a@dest.test", "b@dest.test"),
                admission("a@dest.test", transactional=True),
                admission("a@dest.test", tenant="other"),
                admission("a@dest.test", data=own)):
        stored = intake().prepare(msg)
        assert b"List-Unsubscribe-Post" not in stored.data


class Lookup:
    def __init__(self, blocked: dict[str, Suppression]) -> None:
        self.blocked = blocked
        self.asked: list[tuple[str | None, bool]] = []

    def blocking(self, tenant, addresses, *, transactional=False, now=None):  # type: ignore[no-untyped-def]
        self.asked.append((tenant, transactional))
        return {a: self.blocked[a] for a in addresses if a in self.blocked}


def test_suppressed_recipients_leave_the_envelope_and_are_listed() -> None:
    lookup = Lookup({"b@dest.test": Suppression(address="b@dest.test", source="unsubscribe")})
    msg = admission("a@dest.test", "b@dest.test")
    stored = intake(lookup).prepare(msg)
    assert [r.address for r in stored.envelope.recipients] == ["a@dest.test"]
    assert msg.dropped == [("b@dest.test", "unsubscribe")]
    assert lookup.asked == [("acme", False)]
