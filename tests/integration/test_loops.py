"""Mail loops (RFC 5321 6.3) against a real `relay serve`: too many hops is refused at
the end of data, and a route that leads back to the relay itself bounces once (5.4.6)
instead of re-queueing the message for ever."""

from __future__ import annotations

import contextlib
import json
import smtplib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.relayproc import RelayProcess, make_relay, wait_for


def events(relay: RelayProcess) -> list[dict]:  # type: ignore[type-arg]
    path = relay.tmp / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def received_headers(n: int) -> bytes:
    return b"".join(b"Received: from hop%d.test by hop%d.test; Tue, 1 Dec 2026 00:00:00 +0000"
                    b"\r\n" % (i, i + 1) for i in range(n))


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    proc = make_relay(tmp_path, workers=1, inbound="max_hops = 5").start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.mark.parametrize(("received", "delivered_to", "code"),
                         [(5, 0, 250), (6, 0, 554), (3, 3, 554), (0, 5, 250)])
def test_too_many_hops_is_refused_at_end_of_data(
    relay: RelayProcess, received: int, delivered_to: int, code: int
) -> None:
    head = received_headers(received) + b"Delivered-To: x@dest.test\r\n" * delivered_to
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("a@sender.test")
        client.rcpt("b@dest.test")
        reply_code, text = client.data(head + b"Subject: loop?\r\n\r\nbody\r\n")
        assert reply_code == code, text
        if code == 554:
            assert text == b"5.4.6 Error: too many hops"
            assert client.noop()[0] == 250  # the session goes on


def test_a_route_to_my_own_listener_bounces_once(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, workers=2)
    relay.config_path.write_text(relay.config_path.read_text() + f"""
[[outbound.routes]]
domain = "loop.test"
hosts = ["127.0.0.1:{relay.port}"]
""")
    relay.start()
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("a@sender.test", ["x@loop.test"], b"Subject: me\r\n\r\nx\r\n")
        bounce = wait_for(lambda: next((e for e in events(relay) if e["type"] == "Bounce"),
                                       None), 20, "the bounce")
        assert bounce["recipient"] == "x@loop.test"
        assert bounce["reply"].startswith("554 5.4.6 ")
        assert "loops back to myself" in bounce["reply"]
        assert bounce["dsn_queue_id"]  # the sender hears of it
        receptions = [e for e in events(relay) if e["type"] == "Reception"]
        assert len(receptions) == 1  # never re-accepted from itself
    finally:
        relay.stop()


class _Mirror:
    """A peer on another port that greets with the relay's own name: a second listener of
    the same host, or an MX record pointing at us under another address."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.greeted = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"220 relay.test ESMTP\r\n")
                self.greeted += 1
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(1024)

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def test_a_host_greeting_with_my_name_bounces_as_a_loop(tmp_path: Path) -> None:
    mirror = _Mirror()
    relay = make_relay(tmp_path, workers=1, extra=f"""
[outbound]
smart_host = "127.0.0.1:{mirror.port}"
""")
    relay.start()
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("a@sender.test", ["x@far.test"], b"Subject: me\r\n\r\nx\r\n")
        bounce = wait_for(lambda: next((e for e in events(relay) if e["type"] == "Bounce"
                                        and e["recipient"] == "x@far.test"), None),
                          20, "the bounce")
        assert bounce["reply"].startswith("554 5.4.6 ")
        assert "names my own hostname relay.test: mail loops back to myself" in bounce["reply"]
        assert not [e for e in events(relay) if e["type"] == "TransientFailure"
                    and e["recipient"] == "x@far.test"]
    finally:
        relay.stop()
        mirror.close()
