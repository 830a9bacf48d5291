"""A bug met by one session or one delivery ends that session or that delivery, never
the worker: faults are injected into a real `relay serve` (tests/integration/faults/
sitecustomize.py), and the other sessions, the deliveries and the worker pid are checked.
"""

from __future__ import annotations

import json
import os
import smtplib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.peers import free_port
from tests.integration.relayproc import RelayProcess, make_relay, recv_reply, wait_for

FAULTS = str(Path(__file__).parent / "faults")
SMTP_SINK = "/usr/sbin/smtp-sink"


def faulty_relay(tmp_path: Path, extra: str = "") -> RelayProcess:
    relay = make_relay(tmp_path, workers=1, extra=extra)
    path = os.environ.get("PYTHONPATH", "")
    relay.env = {"PYTHONPATH": FAULTS + (os.pathsep + path if path else "")}
    return relay


def events(relay: RelayProcess) -> list[dict]:  # type: ignore[type-arg]
    path = relay.tmp / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def sink_port() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([SMTP_SINK, "-u", "nobody", f"127.0.0.1:{port}", "100"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return False
        wait_for(listening, 10, "smtp-sink")
        yield port
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_a_fault_in_one_session_ends_that_session_only(tmp_path: Path) -> None:
    relay = faulty_relay(tmp_path).start()
    try:
        [worker] = relay.workers()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as good:
            good.ehlo("good.test")
            assert good.mail("a@sender.test")[0] == 250
            assert good.rcpt("ok@dest.test")[0] == 250
            with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as bad:
                recv_reply(bad)
                bad.sendall(b"EHLO bad.test\r\n")
                recv_reply(bad)
                bad.sendall(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<crash-inbound@dest.test>\r\n")
                replies = recv_reply(bad)
                while not replies.rstrip().rsplit(b"\r\n", 1)[-1].startswith(b"421"):
                    more = recv_reply(bad)
                    assert more, replies
                    replies += more
                assert replies.endswith(
                    b"421 4.3.0 relay.test Error: internal error, closing connection\r\n")
                assert bad.recv(100) == b""  # the session is over
            code, msg = good.data(b"Subject: still here\r\n\r\nhello\r\n")
            assert code == 250, msg
        assert relay.workers() == [worker]
        log = relay.log()
        assert log.count("Traceback") == 1
        assert "InjectedFault: injected fault for crash-inbound@dest.test" in log
        assert "session with 127.0.0.1 [bad.test] failed" in log
    finally:
        relay.stop()


def test_a_fault_in_one_delivery_is_a_transient_failure_and_delivery_goes_on(
    tmp_path: Path, sink_port: int
) -> None:
    extra = f"""
[outbound]
smart_host = "127.0.0.1:{sink_port}"
[outbound.default]
retry_interval = 3600.0
"""
    relay = faulty_relay(tmp_path, extra).start()
    try:
        [worker] = relay.workers()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            for rcpt in ("first@dest.test", "crash-outbound@dest.test", "second@dest.test"):
                client.sendmail("a@sender.test", [rcpt], f"Subject: to {rcpt}\r\n\r\nx\r\n")

        def outcomes() -> dict[str, dict] | None:  # type: ignore[type-arg]
            seen = {e["recipient"]: e for e in events(relay) if e.get("recipient")}
            return seen if len(seen) == 3 else None

        seen = wait_for(outcomes, 20, "an outcome for every recipient")
        assert seen["first@dest.test"]["type"] == "Delivery"
        assert seen["second@dest.test"]["type"] == "Delivery"
        failed = seen["crash-outbound@dest.test"]
        assert failed["type"] == "TransientFailure"
        assert failed["reply"].startswith("421 4.3.0 internal error: InjectedFault")
        assert relay.workers() == [worker]
        assert "delivery to dest.test failed with an internal error" in relay.log()
        # The worker still accepts and delivers.
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("a@sender.test", ["third@dest.test"], "Subject: 3\r\n\r\nx\r\n")
        wait_for(lambda: any(e.get("recipient") == "third@dest.test"
                             and e["type"] == "Delivery" for e in events(relay)),
                 20, "the next delivery")
    finally:
        relay.stop()
