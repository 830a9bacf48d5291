"""The reference headers of bounce handling (relay.intake.reference): X-Relay-Ref on
every message with [bounces] domain set (a client's own removed), Feedback-ID when asked,
both before DKIM signing (Feedback-ID inside the signature), none on our DSNs."""

from __future__ import annotations

import re
from pathlib import Path

import dkim
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from relay.config import BouncesConfig, Config, DkimConfig, DkimSigner
from relay.dkim import public_key_record
from relay.intake import Admission, Intake, default_stages
from relay.intake.reference import ReferenceHeaders, read_ref
from relay.model import Envelope, Recipient

SECRET = "bounce-secret-0123456789"
BODY = b"From: news@sender.test\r\nTo: x@dest.test\r\nSubject: hi\r\n\r\nbody\r\n"


def intake(tmp_path: Path | None = None, feedback_id: str = "") -> Intake:
    dkim_config = DkimConfig()
    if tmp_path is not None:
        key = ed25519.Ed25519PrivateKey.generate()
        (tmp_path / "k.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        dkim_config = DkimConfig(signers=[DkimSigner(
            domain="sender.test", selector="s1", key=str(tmp_path / "k.pem"),
            algorithm="ed25519-sha256")])
    config = Config(bounces=BouncesConfig(domain="bounces.relay.test", secret=SECRET,
                                          feedback_id=feedback_id), dkim=dkim_config)
    stand_in: object = object()
    return Intake(default_stages(config, "relay.test"), stand_in, stand_in)  # type: ignore[arg-type]


def admission(*rcpts: str, data: bytes = BODY, via: str = "smtp",
              transactional: bool = False) -> Admission:
    env = Envelope(queue_id="QID0123456789ABCDE", sender="news@sender.test",
                   received_at=1_000_000.0, recipients=[Recipient(address=a) for a in rcpts],
                   tenant="acme", campaign_id="spring sale", transactional=transactional)
    return Admission(envelope=env, data=data, via=via)  # type: ignore[arg-type]


def header_values(data: bytes, name: str) -> list[str]:
    head = data.partition(b"\r\n\r\n")[0].decode()
    return re.findall(rf"(?im)^{name}: ([^\r\n]*)", head)


def test_every_message_gets_a_reference_to_itself() -> None:
    one = intake().prepare(admission("ann@dest.test"))
    (token,) = header_values(one.data, "X-Relay-Ref")
    ref = read_ref(SECRET.encode(), token)
    assert ref is not None
    assert (ref.queue_id, ref.tenant, ref.campaign, ref.recipient) == (
        "QID0123456789ABCDE", "acme", "spring sale", "ann@dest.test")
    many = intake().prepare(admission("a@dest.test", "b@dest.test"))
    ref = read_ref(SECRET.encode(), header_values(many.data, "X-Relay-Ref")[0])
    assert ref is not None and ref.recipient == ""  # the same header for every recipient


def test_a_clients_own_reference_is_removed() -> None:
    forged = b"X-Relay-Ref: copied.fromelsewhere\r\n" + BODY.replace(
        b"Subject: hi\r\n", b"Subject: hi\r\nx-relay-ref: another\r\n  folded\r\n")
    stored = intake().prepare(admission("ann@dest.test", data=forged))
    (token,) = header_values(stored.data, "X-Relay-Ref")
    assert read_ref(SECRET.encode(), token) is not None
    assert b"copied" not in stored.data and b"folded" not in stored.data


def test_feedback_id_when_asked_and_not_on_dsns() -> None:
    stored = intake(feedback_id="relay").prepare(admission("ann@dest.test"))
    assert header_values(stored.data, "Feedback-ID") == ["spring-sale:acme:bulk:relay"]
    own = b"Feedback-ID: a:b:c:mine\r\n" + BODY
    kept = intake(feedback_id="relay").prepare(admission("ann@dest.test", data=own))
    assert header_values(kept.data, "Feedback-ID") == ["a:b:c:mine"]
    dsn = intake(feedback_id="relay").prepare(admission("ann@dest.test", via="dsn"))
    assert header_values(dsn.data, "X-Relay-Ref") == []
    assert header_values(dsn.data, "Feedback-ID") == []
    assert ReferenceHeaders(SECRET).feedback_sender == ""


def test_the_headers_come_before_signing_and_feedback_id_is_signed(tmp_path: Path) -> None:
    stages = intake(tmp_path, feedback_id="relay").stages
    names = [type(s).__name__ for s in stages]
    assert names.index("ReferenceHeaders") < len(names) - 1
    assert names[-1] == "DkimSign"
    stored = intake(tmp_path, feedback_id="relay").prepare(admission("ann@dest.test"))
    signature = re.sub(rb"\s+", b"", stored.data.partition(b"\r\n\r\n")[0])
    h = re.search(rb";h=([^;]*)", signature).group(1).lower()  # type: ignore[union-attr]
    assert b"feedback-id" in h.split(b":"), stored.data
    key = serialization.load_pem_private_key((tmp_path / "k.pem").read_bytes(), None)
    record = public_key_record(key)  # type: ignore[arg-type]
    lookup = {"s1._domainkey.sender.test": record.encode()}
    assert dkim.DKIM(stored.data).verify(
        dnsfunc=lambda name, timeout=5: lookup.get(name.decode().rstrip(".")))
