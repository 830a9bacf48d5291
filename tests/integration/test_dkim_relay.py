"""DKIM end to end: a real ``relay serve`` signs what it receives and the DSNs it writes.

Mail goes in over SMTP (Python's smtplib, which dot-stuffs on its own), is signed by the
intake's last stage, and is delivered through the relay's SMTP client to a recording
sink on loopback that keeps the raw DATA stream. The test checks the stream is
dot-stuffed, unstuffs it (RFC 5321 4.5.2) and gives the result to dkimpy and OpenDKIM
over the tests' dnsmasq (``test_dkim_verify.Verifiers``). A recipient the sink refuses
makes the relay write a DSN from MAILER-DAEMON@relay.test, signed by the relay.test key.
The events say what was signed; ``relay check-config`` reports a key it cannot use; a
SIGHUP reload picks up a new key, and a reload with a broken key keeps the old one.
"""

from __future__ import annotations

import json
import signal
import smtplib
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.dkim import public_key_record
from tests.integration import dnsmasq as _dnsmasq
from tests.integration.dnsmasq import DnsServer
from tests.integration.relayproc import RELAY, RelayProcess, make_relay, wait_for
from tests.integration.smtpsink import RecordingSink
from tests.integration.test_dkim_verify import Verifiers, each_alone

dnsmasq = _dnsmasq.dnsmasq

KEYS = {
    "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ed": ed25519.Ed25519PrivateKey.generate(),
    "host": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "new": ed25519.Ed25519PrivateKey.generate(),
}
RECORDS = {
    "rsa._domainkey.sender.test": public_key_record(KEYS["rsa"]),
    "ed._domainkey.sender.test": public_key_record(KEYS["ed"]),
    "host._domainkey.relay.test": public_key_record(KEYS["host"]),
    "new._domainkey.sender.test": public_key_record(KEYS["new"]),
}


class Sink(RecordingSink):
    """Refuses RCPT for ``reject@...`` with 550 5.1.1, accepts the rest."""

    def rcpt_reply(self, line: bytes) -> bytes:
        if line.lower().startswith(b"rcpt to:<reject@"):
            return b"550 5.1.1 no such user\r\n"
        return b"250 ok\r\n"


def unstuff(raw: bytes) -> bytes:
    """The message from a DATA stream (RFC 5321 4.5.2: a line's leading dot removed)."""
    return (b"\r\n" + raw).replace(b"\r\n.", b"\r\n")[2:]


def write_keys(conf: Path) -> None:
    (conf / "dkim").mkdir(exist_ok=True)
    for name, key in KEYS.items():
        path = conf / "dkim" / f"{name}.pem"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)


def dkim_toml(sender_keys: tuple[str, ...] = ("rsa", "ed")) -> str:
    entries = [("sender.test", k) for k in sender_keys] + [("relay.test", "host")]
    return "".join(
        f'[[dkim.signers]]\ndomain = "{domain}"\nselector = "{name}"\n'
        f'key = "dkim/{name}.pem"\n'
        + ('algorithm = "ed25519-sha256"\n' if isinstance(KEYS[name], ed25519.Ed25519PrivateKey)
           else "")
        for domain, name in entries)


def events(relay: RelayProcess) -> list[dict[str, object]]:
    path = relay.tmp / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.fixture
def setup(tmp_path: Path, dnsmasq: Callable[..., DnsServer]):  # type: ignore[no-untyped-def]
    sink = Sink()
    write_keys(tmp_path)
    relay = make_relay(tmp_path, workers=1, extra=f"""
[outbound]
smart_host = "127.0.0.1:{sink.port}"
[outbound.default]
retry_interval = 1.0
{dkim_toml()}""")
    verifiers = Verifiers(dnsmasq(txt=RECORDS), tmp_path)
    yield relay, sink, verifiers
    relay.stop()
    sink.close()


BODY = (b".leading dot\r\n..two dots\r\n.\r\nGr\xc3\xbc\xc3\x9fe \xe9t\xe9 8-bit\r\n"
        b"trailing blank lines follow\r\n\r\n\r\n")


def message(sender: str, to: str, subject: str) -> bytes:
    return (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
            "Content-Type: text/plain; charset=utf-8\r\n\r\n").encode() + BODY


def send(relay: RelayProcess, sender: str, to: str, subject: str) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.sendmail(sender, [to], message(sender, to, subject),
                        mail_options=["BODY=8BITMIME"])


def delivered(sink: Sink, marker: bytes) -> bytes:
    return wait_for(lambda: sink.find(lambda s, r, raw: marker in raw), 30,
                    f"delivery of {marker!r}")


def verified_by_both(verifiers: Verifiers, data: bytes, signatures: int) -> None:
    assert verifiers.dkimpy(data) == [True] * signatures
    assert verifiers.opendkim(each_alone(data, signatures)) == [(0, "")] * signatures


def test_signed_delivered_dot_stuffed_and_verified(setup) -> None:  # type: ignore[no-untyped-def]
    relay, sink, verifiers = setup
    relay.start()
    send(relay, "alice@sender.test", "bob@dest.test", "signed")
    send(relay, "carol@unsigned.test", "bob@dest.test", "unsigned")
    raw = delivered(sink, b"Subject: signed")
    # On the wire every line that starts with a dot got one more; unstuffed, it is the
    # message as sent, with our trace fields and signatures on top.
    assert b"\r\n..leading dot\r\n...two dots\r\n..\r\n" in raw
    data = unstuff(raw)
    assert data.endswith(message("alice@sender.test", "bob@dest.test", "signed"))
    assert data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; "
                           b"d=sender.test; s=rsa;")
    verified_by_both(verifiers, data, 2)
    assert verifiers.dkimpy(data.replace(b"..two dots", b".two dots")) == [False, False]

    unsigned = unstuff(delivered(sink, b"Subject: unsigned"))
    assert b"DKIM-Signature" not in unsigned
    receptions = [e for e in events(relay) if e["type"] == "Reception"]
    signed_event = next(e for e in receptions if e["sender"] == "alice@sender.test")
    assert signed_event["dkim"] == ["d=sender.test s=rsa a=rsa-sha256",
                                    "d=sender.test s=ed a=ed25519-sha256"]
    assert "dkim_reason" not in signed_event
    other = next(e for e in receptions if e["sender"] == "carol@unsigned.test")
    assert "dkim" not in other
    assert other["dkim_reason"] == "no signer for From: domain unsigned.test"


def test_a_dsn_of_ours_is_signed_by_the_hostname_key(setup) -> None:  # type: ignore[no-untyped-def]
    relay, sink, verifiers = setup
    relay.start()
    send(relay, "alice@sender.test", "reject@dest.test", "to bounce")
    dsn = wait_for(lambda: sink.find(lambda s, r, raw: s == b"<>"), 30, "the DSN")
    data = unstuff(dsn)
    assert b"\r\nFrom: Mail Delivery System <MAILER-DAEMON@relay.test>\r\n" in data
    assert b"d=relay.test; s=host;" in data.split(b"\r\n\r\n")[0]
    verified_by_both(verifiers, data, 1)


def test_check_config_names_the_key_it_cannot_use(tmp_path: Path) -> None:
    write_keys(tmp_path)
    relay = make_relay(tmp_path, workers=1, extra=dkim_toml())
    ok = subprocess.run([*RELAY, "check-config", str(relay.config_path)], capture_output=True,
                        text=True, timeout=60, cwd=tmp_path)
    assert (ok.returncode, ok.stderr) == (0, ""), ok.stderr
    (tmp_path / "dkim" / "ed.pem").unlink()
    (tmp_path / "dkim" / "rsa.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nxx\n")
    bad = subprocess.run([*RELAY, "check-config", str(relay.config_path)], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path)
    assert (bad.returncode, bad.stdout) == (78, "")
    cfg = relay.config_path
    assert bad.stderr.splitlines() == [
        f"relay: {cfg}: dkim.signers[0].key: {tmp_path}/dkim/rsa.pem is not a PEM private key",
        f"relay: {cfg}: dkim.signers[1].key: cannot read {tmp_path}/dkim/ed.pem: "
        "No such file or directory",
    ]
    serve = subprocess.run([*RELAY, "serve", "--config", str(cfg)], capture_output=True,
                           text=True, timeout=60, cwd=tmp_path)
    assert serve.returncode == 78 and "dkim.signers[0].key" in serve.stderr
    assert "Traceback" not in serve.stderr


def test_reload_picks_up_a_new_key_and_keeps_the_old_one_if_broken(setup) -> None:  # type: ignore[no-untyped-def]
    relay, sink, verifiers = setup
    relay.start()
    text = relay.config_path.read_text()
    relay.config_path.write_text(text.replace(dkim_toml(), dkim_toml(("new",))))
    relay.signal(signal.SIGHUP)
    wait_for(lambda: relay.log().count("configuration reloaded") >= 1, 20, "the reload")
    send(relay, "alice@sender.test", "bob@dest.test", "after reload")
    data = unstuff(delivered(sink, b"Subject: after reload"))
    head = data.split(b"\r\n\r\n")[0]
    assert b"s=new;" in head and b"s=rsa;" not in head and b"s=ed;" not in head
    verified_by_both(verifiers, data, 1)

    (relay.tmp / "dkim" / "new.pem").write_bytes(b"garbage")
    relay.signal(signal.SIGHUP)
    wait_for(lambda: "reload failed, keeping the running config" in relay.log(), 20,
             "the refused reload")
    assert "dkim.signers[0].key" in relay.log()
    send(relay, "alice@sender.test", "bob@dest.test", "after bad reload")
    data = unstuff(delivered(sink, b"Subject: after bad reload"))
    verified_by_both(verifiers, data, 1)  # still signed with the key loaded before
