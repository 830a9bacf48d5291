"""Nothing acknowledged is lost: SIGKILL the whole relay under a multi-connection load,
restart it, and find every message that got 250 in the queue, byte-identical."""

from __future__ import annotations

import hashlib
import smtplib
import threading
from pathlib import Path

from relay.config import load_config
from relay.spool import Spool
from tests.integration.relayproc import make_relay, wait_for

SESSIONS = 12
TARGET_ACKED = 300


def body_for(session: int, n: int) -> bytes:
    """Deterministic, distinct content (2 KB) so the stored bytes can be checked exactly."""
    seed = hashlib.sha256(f"{session}/{n}".encode()).hexdigest()
    line = (seed * 2)[:76].encode()
    return b"Subject: load %d/%d\r\n\r\n" % (session, n) + (line + b"\r\n") * 26


def test_sigkill_under_load_loses_no_acknowledged_message(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, workers=2).start()
    acked: list[tuple[str, bytes]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(session: int) -> None:
        n = 0
        try:
            with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
                smtp.ehlo("load.test")
                while not stop.is_set():
                    body = body_for(session, n)
                    smtp.mail(f"s{session}@sender.test")
                    smtp.rcpt(f"r{n}@dest{n % 3}.test")
                    code, msg = smtp.data(body)
                    if code == 250:
                        qid = msg.rsplit(b" ", 1)[-1].decode()
                        with lock:
                            acked.append((qid, body))
                    n += 1
        except (OSError, smtplib.SMTPException):
            return  # the server died under us: expected

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(SESSIONS)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(acked) >= TARGET_ACKED, 60, f"{TARGET_ACKED} acknowledged messages")
        relay.kill_all()  # supervisor and workers, mid-load
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=15)
    with lock:
        acknowledged = list(acked)
    assert len(acknowledged) >= TARGET_ACKED

    relay.start()  # the queue must open cleanly and the relay serve again
    try:
        cfg = load_config(relay.config_path)
        with Spool(cfg.spool.path, cfg.spool.map_size_bytes()) as spool:
            for qid, body in acknowledged:
                envelope, data = spool.load(qid)
                assert envelope.queue_id == qid
                assert data.endswith(body), qid
            # Every queued message (acknowledged or caught mid-flight) decodes fully.
            entries = spool.list_messages(limit=100_000)
            for entry in entries:
                spool.load(entry.queue_id)
        assert len(entries) >= len(acknowledged)
    finally:
        assert relay.stop() == 0
