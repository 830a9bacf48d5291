"""One-click unsubscribe (RFC 8058) and the suppression list, end to end.

A real `relay serve` signs with DKIM and adds List-Unsubscribe headers to campaign mail
injected over HTTP; the message arrives at a recording sink, its signature (which must
cover both headers) verifies with dkimpy, and a POST to its link puts the recipient on
the tenant's suppression list: the next campaign message to that address is refused
per recipient over HTTP, transactional mail still goes, and SMTP refuses suppressed
addresses at RCPT (550 5.7.1) or drops them after DATA when only the tenant header says
whose mail it is."""

from __future__ import annotations

import json
import re
import smtplib
from collections.abc import Iterator
from pathlib import Path

import dkim
import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bench.peers import free_port
from relay.dkim import public_key_record
from tests.integration.relayproc import RelayProcess, make_relay, wait_for
from tests.integration.smtpsink import RecordingSink
from tests.integration.test_http_api import HttpRelay, _live, _unstuff

KEY = "unsub-test-key"
SECRET = "a-long-enough-secret-for-hmac"
DKIM_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RECORD = public_key_record(DKIM_KEY).encode()


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpRelay]:
    tmp = tmp_path_factory.mktemp("unsub")
    (tmp / "dkim.pem").write_bytes(DKIM_KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    sink = RecordingSink()
    http_port = free_port()
    proc = make_relay(tmp, workers=2, inbound='tenant_header = "X-Tenant"', extra=f"""
[outbound]
smart_host = "127.0.0.1:{sink.port}"
[outbound.default]
tls = "off"

[http]
listen = ["127.0.0.1:{http_port}"]
[[http.api_keys]]
key = "plain${KEY}"
tenant = "acme"

[unsubscribe]
url = "http://127.0.0.1:{http_port}/u/"
secret = "{SECRET}"

[[dkim.signers]]
domain = "sender.test"
selector = "s1"
key = "{tmp / 'dkim.pem'}"
""")
    proc.start()
    base = f"http://127.0.0.1:{http_port}"
    wait_for(lambda: _live(base, None), 20, "the HTTP listener")
    try:
        yield HttpRelay(proc, base, sink, None)
    finally:
        proc.stop()
        sink.close()


def inject(relay: HttpRelay, to: str, marker: str, **options: object) -> dict:
    with relay.client(key=KEY) as c:
        r = c.post("/api/v1/transmissions", json={
            "campaign_id": "spring", "options": options,
            "recipients": [{"address": to}],
            "content": {"from": "news@sender.test", "subject": f"offer [{marker}]",
                        "text": "buy now"}})
    return {"status": r.status_code, **r.json()}


def dns_txt(name: bytes, timeout: int = 5) -> bytes | None:
    return RECORD if name == b"s1._domainkey.sender.test." else None


def test_one_click_unsubscribe_suppresses_campaign_mail_at_once(relay: HttpRelay) -> None:
    first = inject(relay, "ann@dest.test", "unsub-1")
    assert first["status"] == 200
    [message] = relay.delivered(b"unsub-1", 1)
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    link = re.fullmatch(r"<(http://[^>]+/u/[^>]+)>", str(message["List-Unsubscribe"]))
    assert link is not None
    # Both headers are inside the DKIM signature, which verifies.
    signature = str(message["DKIM-Signature"])
    signed = re.search(r"h=([^;]+)", signature.replace("\r\n", "").replace(" ", ""))
    assert signed and {"list-unsubscribe", "list-unsubscribe-post"} <= set(
        signed.group(1).lower().split(":"))
    with relay.sink.lock:
        [raw] = [b for b in relay.sink.bodies if b"unsub-1" in b]
    assert dkim.verify(_unstuff(raw), dnsfunc=dns_txt)

    url = link.group(1)
    with httpx.Client(timeout=10, trust_env=False) as c:
        page = c.get(url)  # a link scanner's GET changes nothing
        assert page.status_code == 200 and b"<form method=post" in page.content
        assert inject(relay, "ann@dest.test", "unsub-still")["status"] == 200
        forged = c.post(url[:-3] + "AAA", content=b"List-Unsubscribe=One-Click",
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert forged.status_code == 400
        done = c.post(url, content=b"List-Unsubscribe=One-Click",
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert done.status_code == 200, done.text
    relay.delivered(b"unsub-still", 1)

    after = inject(relay, "ann@dest.test", "unsub-2")
    assert after["status"] == 422
    assert after["results"]["recipients"][0]["error"] == "suppressed"
    receipt = inject(relay, "ann@dest.test", "unsub-receipt", transactional=True)
    assert receipt["status"] == 200  # an unsubscribe stops campaigns, not receipts
    relay.delivered(b"unsub-receipt", 1)

    events = relay.events()
    unsub = [e for e in events if e["type"] == "Unsubscribe"]
    assert [(e["recipient"], e["tenant"], e["campaign_id"]) for e in unsub] == [
        ("ann@dest.test", "acme", "spring")]
    assert any(e["type"] == "Suppressed" and e["recipient"] == "ann@dest.test"
               and e["source"] == "unsubscribe" for e in events)
    listed = cli(relay.relay, "suppress", "list", "--tenant", "acme", "--json")
    assert [(e["address"], e["source"]) for e in json.loads(listed)] == [
        ("ann@dest.test", "unsubscribe")]
    with relay.sink.lock:
        assert not any(b"unsub-2" in b for b in relay.sink.bodies)


def test_smtp_refuses_suppressed_at_rcpt_and_drops_tenant_entries(relay: HttpRelay) -> None:
    cli(relay.relay, "suppress", "add", "blocked@dest.test")  # every tenant
    cli(relay.relay, "suppress", "add", "bob@dest.test", "--tenant", "acme")
    with smtplib.SMTP("127.0.0.1", relay.relay.port, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("news@sender.test")
        code, text = s.rcpt("blocked@dest.test")
        assert (code, text.split()[0]) == (550, b"5.7.1")
        assert s.rcpt("bob@dest.test")[0] == 250  # whose mail: only the header says
        assert s.rcpt("carl@dest.test")[0] == 250
        s.data(b"X-Tenant: acme\r\nSubject: smtp [smtp-supp]\r\n\r\nhello\r\n")
    [message] = relay.delivered(b"smtp-supp", 1)
    with relay.sink.lock:
        rcpts = [c for c in relay.sink.commands if c.upper().startswith(b"RCPT")]
    assert any(b"carl@dest.test" in c for c in rcpts)
    assert not any(b"bob@dest.test" in c for c in rcpts)
    assert message["X-Tenant"] is None  # strip_tag_headers

    def dropped() -> list[dict]:
        return [e for e in relay.events() if e["type"] == "Suppressed"
                and e["recipient"] == "bob@dest.test"]
    [event] = wait_for(dropped, 10, "the Suppressed event")
    assert event["tenant"] == "acme" and event.get("via", "smtp") == "smtp"


def cli(relay: RelayProcess, *args: str) -> str:
    done = relay.cli(*args, "--config", str(relay.config_path))
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cli_errors_are_one_line(relay: HttpRelay, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("recipient\nnot an address\n")
    for args in (("suppress", "add", "x y"), ("suppress", "import", str(bad)),
                 ("suppress", "remove", "nobody@dest.test")):
        done = relay.relay.cli(*args, "--config", str(relay.relay.config_path))
        assert done.returncode != 0
        assert "Traceback" not in done.stderr and done.stderr.startswith("relay: ")
