"""No end-of-data lookalike leaves the relay over DATA (SMTP smuggling, downstream).

A real `relay serve` with ``bare_newline = "normalize"`` takes messages whose bodies hold
every lookalike we know (over DATA and over BDAT), and delivers them to a recording sink
that offers PIPELINING but not CHUNKING, so every body goes out as DATA. The sink keeps
the raw bytes: each message must arrive as CRLF lines ending in one terminator, and the
"MAIL FROM" hidden in each body must never be seen as a command.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from tests.integration.relayproc import make_relay, recv_reply, wait_for
from tests.integration.smtpsink import RecordingSink
from tests.unit.test_smtp_client import LOOKALIKES

HIDDEN = b"MAIL FROM:<smuggled@evil.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\n"


def send_raw(port: int, commands: bytes, messages: int) -> bytes:
    """One pipelined session: send ``commands``, read until ``messages`` end-of-data
    replies (or any 5xx) have come back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        recv_reply(s)
        s.sendall(b"EHLO client.test\r\n")
        recv_reply(s)
        s.sendall(commands)
        replies = b""
        while replies.count(b"queued as") < messages and b"\r\n5" not in b"\r\n" + replies:
            more = recv_reply(s)
            assert more, replies
            replies += more
        s.sendall(b"QUIT\r\n")
        return replies


def test_every_lookalike_leaves_as_ordinary_lines(tmp_path: Path) -> None:
    sink = RecordingSink()
    relay = make_relay(tmp_path, workers=1, inbound='bare_newline = "normalize"', extra=f"""
[outbound]
smart_host = "127.0.0.1:{sink.port}"
""")
    relay.start()
    try:
        group = b""
        for i, fake in enumerate(LOOKALIKES):
            body = b"Subject: %d\r\n\r\nbody" % i + fake + HIDDEN + b"end\r\n"
            # A bare CR cannot be normalised: such content is refused at intake (550).
            if b"\r" in fake.replace(b"\r\n", b""):
                continue
            envelope = b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<r%d@dest.test>\r\n" % i
            if i % 2:
                group += envelope + b"BDAT %d LAST\r\n" % len(body) + body
            else:
                group += envelope + b"DATA\r\n" + body + b".\r\n"
        expected = group.count(b"MAIL FROM:<a@sender.test>")
        assert expected >= 5
        replies = send_raw(relay.port, group, expected)
        assert replies.count(b"250 2.0.0 Ok: queued as") == expected, replies

        def delivered() -> bool:
            with sink.lock:
                return len(sink.bodies) >= expected
        wait_for(delivered, 20, "every message at the sink")
        with sink.lock:
            bodies, commands = list(sink.bodies), list(sink.commands)
        for raw in bodies:
            assert raw.count(b"\n") == raw.count(b"\r\n") == raw.count(b"\r"), raw
            assert raw.find(b"\r\n.\r\n") == len(raw) - 5, raw
            assert HIDDEN.split(b"\r\n")[0] in raw  # kept, as content
        assert not [c for c in commands if b"smuggled@evil.test" in c], commands
        assert sum(c.startswith(b"MAIL FROM:<a@sender.test>") for c in commands) == expected

        def outcomes() -> list[dict]:  # the relay logs each after the sink's reply
            return [json.loads(line) for line in (tmp_path / "events.jsonl").read_text()
                    .splitlines() if '"Delivery"' in line]
        wait_for(lambda: len(outcomes()) >= expected, 20, "every delivery in the event log")
        assert len(outcomes()) == expected
    finally:
        relay.stop()
        sink.close()
