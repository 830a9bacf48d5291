"""HTTP injection end to end: a real `relay serve` with its HTTP listener, real clients
(the `sparkpost` library over HTTPS, curl, httpx), a recording SMTP sink behind it.

Mail injected over HTTP is checked byte for byte where it arrives (rendered bodies,
headers and attachments decoded back with the `email` package), the events carry the
tenant, campaign and metadata, and bad requests get their status codes while nothing
already queued is lost."""

from __future__ import annotations

import base64
import email
import email.policy
import json
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from bench.peers import free_port
from relay.spool import Spool
from tests.integration.relayproc import RelayProcess, make_relay, wait_for
from tests.integration.smtpsink import RecordingSink

KEY = "test-key-acme"
SLOW_KEY = "test-key-slow"
PDF = bytes(range(256)) * 4


def http_extra(http_port: int, sink_port: int, *, tls: bool) -> str:
    return f"""
[outbound]
smart_host = "127.0.0.1:{sink_port}"

[outbound.default]
tls = "off"

[http]
listen = ["127.0.0.1:{http_port}"]
tls = {"true" if tls else "false"}
max_body = "1MiB"
max_recipients = 50

[[http.api_keys]]
key = "plain${KEY}"
tenant = "acme"
name = "tests"

[[http.api_keys]]
key = "plain${SLOW_KEY}"
tenant = "slow"

[http.tenants."slow"]
max_message_rate = "3/h"
"""


class HttpRelay:
    def __init__(self, relay: RelayProcess, base: str, sink: RecordingSink,
                 ca: Path | None) -> None:
        self.relay, self.base, self.sink, self.ca = relay, base, sink, ca

    def client(self, key: str | None = KEY) -> httpx.Client:
        headers = {"Authorization": key} if key else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=20,
                            verify=_verify(self.ca), trust_env=False)

    def events(self) -> list[dict]:
        path = self.relay.tmp / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def delivered(self, marker: bytes, count: int) -> list[email.message.EmailMessage]:
        """The sink's messages containing ``marker``, once there are ``count``."""
        def found() -> list[bytes]:
            with self.sink.lock:
                hits = [b for b in self.sink.bodies if marker in b]
            return hits if len(hits) >= count else []
        bodies = wait_for(found, 30, f"{count} messages with {marker!r} at the sink")
        return [email.message_from_bytes(_unstuff(b), policy=email.policy.default)
                for b in bodies]


def _verify(ca: Path | None) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=str(ca)) if ca else True


def _unstuff(raw: bytes) -> bytes:
    body = raw[: -len(b".\r\n")] if raw.endswith(b"\r\n.\r\n") else raw
    return body.replace(b"\r\n..", b"\r\n.")


def _start(tmp: Path, *, tls: bool) -> Iterator[HttpRelay]:
    sink = RecordingSink()
    http_port = free_port()
    inbound, ca_path = "", None
    if tls:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "cert.pem"))
        ca_path = tmp / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_path))
        inbound = f'tls_cert = "{tmp / "cert.pem"}"\ntls_key = "{tmp / "cert.pem"}"'
    relay = make_relay(tmp, workers=2, inbound=inbound,
                       extra=http_extra(http_port, sink.port, tls=tls))
    relay.start()
    scheme = "https" if tls else "http"
    base = f"{scheme}://127.0.0.1:{http_port}"
    wait_for(lambda: _live(base, ca_path), 20, "the HTTP listener")
    try:
        yield HttpRelay(relay, base, sink, ca_path)
    finally:
        relay.stop()
        sink.close()


def _live(base: str, ca: Path | None) -> bool:
    try:
        return httpx.get(f"{base}/api/check-liveness/v1", timeout=2, verify=_verify(ca),
                         trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def https_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpRelay]:
    yield from _start(tmp_path_factory.mktemp("https"), tls=True)


@pytest.fixture(scope="module")
def http_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpRelay]:
    yield from _start(tmp_path_factory.mktemp("http"), tls=False)


# -- SparkPost ----------------------------------------------------------------------


def test_sparkpost_library_sends_through_the_relay(https_relay: HttpRelay,
                                                   tmp_path: Path) -> None:
    from sparkpost import SparkPost

    attachment = tmp_path / "report.pdf"
    attachment.write_bytes(PDF)
    sp = SparkPost(KEY, base_uri=https_relay.base.removeprefix("https://"))
    session = sp.transmissions.transport.sess
    session.trust_env = False  # no proxy and no CA bundle from the environment
    session.verify = str(https_relay.ca)
    result = sp.transmissions.send(
        recipients=[
            {"address": {"email": "ann@dest.test", "name": "Ann"},
             "substitution_data": {"first": "Ann"}, "metadata": {"user_id": "u1"}},
            {"address": {"email": "bob@dest.test"}, "substitution_data": {"first": "Bob"}},
        ],
        from_email="News <news@sender.test>",
        subject="Hello {{first}} [lib-marker]",
        text="Dear {{first}}, your code is {{code}}.",
        html="<p>Dear {{first}} &amp; co</p>",
        substitution_data={"code": "X-42"},
        campaign="spring-sale",
        metadata={"list": "customers"},
        attachments=[{"name": "report.pdf", "type": "application/pdf",
                      "filename": str(attachment)}],
    )
    assert result["total_accepted_recipients"] == 2
    assert result["total_rejected_recipients"] == 0
    queue_ids = {r["address"]: r["queue_id"] for r in result["recipients"]}
    assert set(queue_ids) == {"ann@dest.test", "bob@dest.test"}

    messages = https_relay.delivered(b"lib-marker", 2)
    by_to = {str(m["To"]): m for m in messages}
    ann = next(m for to, m in by_to.items() if "ann@dest.test" in to)
    assert str(ann["Subject"]) == "Hello Ann [lib-marker]"
    assert str(ann["From"]) == "News <news@sender.test>"
    assert "Ann" in str(ann["To"])
    assert ann["Message-ID"] and ann["Date"] and ann["MIME-Version"] == "1.0"
    text = ann.get_body(("plain",)).get_content()
    assert "Dear Ann, your code is X-42." in text
    assert "Dear Ann &amp; co" in ann.get_body(("html",)).get_content()
    [pdf] = [p for p in ann.iter_attachments() if p.get_filename() == "report.pdf"]
    assert pdf.get_content_type() == "application/pdf"
    assert pdf.get_content() == PDF
    bob = next(m for to, m in by_to.items() if "bob@dest.test" in to)
    assert "Dear Bob, your code is X-42." in bob.get_body(("plain",)).get_content()

    # Every event about these messages names the tenant and the campaign.
    def delivered_events() -> list[dict]:
        evs = [e for e in https_relay.events() if e.get("queue_id") in queue_ids.values()]
        return evs if sum(e["type"] == "Delivery" for e in evs) == 2 else []
    events = wait_for(delivered_events, 20, "Delivery events")
    for e in events:
        assert e["tenant"] == "acme" and e["campaign_id"] == "spring-sale", e
    receptions = [e for e in events if e["type"] == "Reception"]
    assert {e["via"] for e in receptions} == {"http"}
    ann_rx = next(e for e in receptions if e["queue_id"] == queue_ids["ann@dest.test"])
    assert ann_rx["metadata"] == {"list": "customers", "user_id": "u1"}


def test_curl_with_sparkpost_json_and_per_recipient_results(https_relay: HttpRelay) -> None:
    payload = {
        "recipients": [{"address": "one@dest.test"}, {"address": "not an address"},
                       {"address": {"email": "two@dest.test"}}],
        "content": {"from": "ops@sender.test", "subject": "curl [curl-marker]",
                    "text": "hello"},
    }
    out = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "--cacert", str(https_relay.ca),
         "-H", f"Authorization: {KEY}", "-H", "Content-Type: application/json",
         "--data-binary", json.dumps(payload), "-w", "\n%{http_code}",
         f"{https_relay.base}/api/v1/transmissions"],
        capture_output=True, text=True, timeout=30, check=True).stdout
    body, _, status = out.rpartition("\n")
    assert status == "200"
    results = json.loads(body)["results"]
    assert results["total_accepted_recipients"] == 2
    assert results["total_rejected_recipients"] == 1
    per = results["recipients"]
    assert [r["index"] for r in per] == [0, 1, 2]
    assert per[0]["queue_id"] and per[2]["queue_id"]
    assert "queue_id" not in per[1] and per[1]["error"]
    https_relay.delivered(b"curl-marker", 2)


@pytest.mark.parametrize(("headers", "status"), [
    ({}, 401),
    ({"Authorization": "wrong-key"}, 401),
    ({"Authorization": f"Bearer {KEY}"}, 200),
    ({"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()}, 200),
])
def test_api_keys_as_sparkpost_bearer_or_basic(https_relay: HttpRelay,
                                               headers: dict, status: int) -> None:
    with https_relay.client(key=None) as c:
        r = c.post("/api/v1/transmissions", headers=headers, json={
            "recipients": [{"address": "auth@dest.test"}],
            "content": {"from": "a@sender.test", "subject": "auth", "text": "x"}})
    assert r.status_code == status, r.text
    if status == 401:
        assert r.json()["errors"][0]["code"] == "unauthorized"


def test_bad_requests_get_precise_errors_and_lose_nothing(https_relay: HttpRelay) -> None:
    workers = https_relay.relay.workers()
    ok = {"recipients": [{"address": "keep@dest.test"}],
          "content": {"from": "a@sender.test", "subject": "kept [kept-marker]", "text": "x"}}
    with https_relay.client() as c:
        assert c.post("/api/v1/transmissions", json=ok).status_code == 200
        bad_json = c.post("/api/v1/transmissions", content=b'{"recipients": [',
                          headers={"Content-Type": "application/json"})
        assert bad_json.status_code == 400
        wrong_type = c.post("/api/v1/transmissions", json={**ok, "recipients": "x@y"})
        assert wrong_type.status_code in (400, 422)
        assert "recipients" in wrong_type.json()["errors"][0].get("field", "")
        unknown = c.post("/api/v1/transmissions", json={**ok, "frobnicate": 1})
        assert unknown.status_code == 422
        assert "frobnicate" in json.dumps(unknown.json())
        too_many = c.post("/api/v1/transmissions", json={
            **ok, "recipients": [{"address": f"r{i}@dest.test"} for i in range(51)]})
        assert too_many.status_code == 422
        too_big = c.post("/api/v1/transmissions", content=b"x" * (1024 * 1024 + 1),
                         headers={"Content-Type": "application/json"})
        assert too_big.status_code == 413
        template = c.post("/api/v1/transmissions", json={
            **ok, "content": {**ok["content"], "text": "{{if}} unclosed"}})
        assert template.status_code == 422
        assert "content.text" in json.dumps(template.json())
        assert c.get("/api/v1/transmissions").status_code == 405
        assert c.get("/nowhere").status_code == 404
    https_relay.delivered(b"kept-marker", 1)
    assert https_relay.relay.workers() == workers  # no worker died


def test_idempotency_key_replays_the_first_answer_and_sends_once(
        https_relay: HttpRelay) -> None:
    payload = {"recipients": [{"address": "idem@dest.test"}], "campaign_id": "idem-campaign",
               "content": {"from": "a@sender.test", "subject": "idem [idem-marker]",
                           "text": "once"}}
    with https_relay.client() as c:
        first = c.post("/api/v1/transmissions", json=payload,
                       headers={"Idempotency-Key": "order-1001"})
        again = c.post("/api/v1/transmissions", json=payload,
                       headers={"Idempotency-Key": "order-1001"})
        changed = c.post("/api/v1/transmissions", json={**payload, "campaign_id": "other"},
                         headers={"Idempotency-Key": "order-1001"})
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert changed.status_code == 422
    https_relay.delivered(b"idem-marker", 1)
    receptions = [e for e in https_relay.events()
                  if e["type"] == "Reception" and e.get("campaign_id") == "idem-campaign"]
    assert len(receptions) == 1


def test_tenant_over_its_rate_gets_429_with_retry_after(https_relay: HttpRelay) -> None:
    payload = {"recipients": [{"address": "r1@dest.test"}, {"address": "r2@dest.test"}],
               "content": {"from": "a@sender.test", "subject": "rate", "text": "x"}}
    statuses = []
    with https_relay.client(key=SLOW_KEY) as c:
        for _ in range(4):
            r = c.post("/api/v1/transmissions", json=payload)
            statuses.append(r.status_code)
            if r.status_code == 429:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["errors"][0]["code"] == "rate_limited"
    # 3/h per node, split over two workers; SO_REUSEPORT picks the worker: at most one
    # request per worker fits before the rate says no.
    assert statuses[0] == 200 and 429 in statuses


def test_sandbox_renders_and_stores_nothing(https_relay: HttpRelay) -> None:
    with https_relay.client() as c:
        r = c.post("/api/v1/transmissions", json={
            "options": {"sandbox": True}, "recipients": [{"address": "dry@dest.test"}],
            "content": {"from": "a@sender.test", "subject": "dry", "text": "x"}})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert results["total_accepted_recipients"] == 1 and results["sandbox"] is True
    assert results["recipients"][0]["queue_id"] is None


def test_health_endpoints(https_relay: HttpRelay) -> None:
    with https_relay.client(key=None) as c:
        assert c.get("/api/check-liveness/v1").status_code == 200
        assert c.get("/api/check-readiness/v1").status_code == 200


# -- KumoMTA ------------------------------------------------------------------------


def test_kumo_inject_with_a_complete_message(http_relay: HttpRelay) -> None:
    # The example of KumoMTA's inject API reference: content as a complete message,
    # templated per recipient.
    payload = {
        "envelope_sender": "noreply@example.com",
        "content": "Subject: hello {{ name }} [kumo-string]\r\n\r\nHello {{ name }}!\r\n",
        "recipients": [
            {"email": "first@dest.test", "substitutions": {"name": "First"}},
            {"email": "second@dest.test", "substitutions": {"name": "Second"}},
        ],
    }
    with http_relay.client() as c:
        r = c.post("/api/inject/v1", json=payload)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success_count"] == 2 and body["fail_count"] == 0
    assert body["failed_recipients"] == [] and body["errors"] == []
    assert [x["address"] for x in body["results"]] == ["first@dest.test", "second@dest.test"]
    messages = http_relay.delivered(b"kumo-string", 2)
    subjects = sorted(str(m["Subject"]) for m in messages)
    assert subjects == ["hello First [kumo-string]", "hello Second [kumo-string]"]
    assert all(m.get_content().strip() in ("Hello First!", "Hello Second!")
               for m in messages)


def test_kumo_inject_builder_with_attachment_and_a_bad_recipient(
        http_relay: HttpRelay) -> None:
    payload = {
        "envelope_sender": "noreply@example.com",
        "content": {
            "from": {"email": "news@example.com", "name": "News"},
            "subject": "Builder {{ name }} [kumo-builder]",
            "text_body": "Plain {{ name }}",
            "html_body": "<b>{{ name }}</b>",
            "attachments": [{"data": base64.b64encode(PDF).decode(), "base64": True,
                             "content_type": "application/pdf", "file_name": "a.pdf"}],
        },
        "recipients": [{"email": "ok@dest.test", "name": "Ok", "substitutions": {"name": "Ok"}},
                       {"email": "broken"}],
    }
    with http_relay.client() as c:
        r = c.post("/api/inject/v1", json=payload)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success_count"] == 1 and body["fail_count"] == 1
    assert body["failed_recipients"] == ["broken"]
    [msg] = http_relay.delivered(b"kumo-builder", 1)
    assert str(msg["Subject"]) == "Builder Ok [kumo-builder]"
    assert msg.get_body(("plain",)).get_content().strip() == "Plain Ok"
    assert msg.get_body(("html",)).get_content().strip() == "<b>Ok</b>"
    [att] = list(msg.iter_attachments())
    assert att.get_filename() == "a.pdf" and att.get_content() == PDF


def test_accepted_means_durable_even_after_kill_9(tmp_path: Path) -> None:
    http_port = free_port()
    relay = make_relay(tmp_path, workers=1, extra=f"""
[http]
listen = ["127.0.0.1:{http_port}"]
[[http.api_keys]]
key = "plain${KEY}"
tenant = "acme"
""")
    relay.start()
    try:
        base = f"http://127.0.0.1:{http_port}"
        wait_for(lambda: _live(base, None), 20, "the HTTP listener")
        r = httpx.post(f"{base}/api/inject/v1", headers={"Authorization": KEY}, timeout=20,
                       trust_env=False,
                       json={"envelope_sender": "a@sender.test",
                             "content": "Subject: durable\r\n\r\nbody\r\n",
                             "recipients": [{"email": f"d{i}@dest.test"} for i in range(20)]})
        assert r.status_code == 200
        queue_ids = [x["queue_id"] for x in r.json()["results"]]
    finally:
        relay.kill_all()
    spool = Spool(tmp_path / "spool", 1 << 30)
    try:
        for qid in queue_ids:
            envelope, data = spool.load(qid)
            assert envelope.tenant == "acme" and b"Subject: durable" in data
    finally:
        spool.close()
