"""kill -9 during delivery loses nothing: the relay is SIGKILLed while it delivers to a
(deliberately slow) sink, restarted, and every accepted message reaches the sink.

Duplicates are allowed only for transactions in flight at the kill: a message the sink
had already accepted whose completion was not yet committed is delivered again after the
restart (at-least-once, the same window every MTA has, RFC 1047). The test bounds them by
what can be in flight: ``max_connections`` transactions plus the outcomes waiting for
their group commit.
"""

from __future__ import annotations

import smtplib
from collections import Counter
from pathlib import Path

import trio

from bench.sink import Sink
from relay.events import Delivery, EventLog
from tests.integration.relayproc import make_relay

MESSAGES = 150
MAX_CONNECTIONS = 4


def _inject(port: int) -> list[str]:
    subjects = []
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("app.test")
        for i in range(MESSAGES):
            subject = f"durable-{i}"
            body = f"Subject: {subject}\r\nMessage-ID: <{subject}@app.test>\r\n\r\nx\r\n"
            refused = client.sendmail("app@sender.test", [f"r{i}@dest.test"], body.encode())
            assert refused == {}
            subjects.append(subject)
    return subjects


def _subject(data: bytes) -> str:
    start = data.index(b"Subject: ") + 9
    return data[start : data.index(b"\r\n", start)].decode()


async def test_sigkill_during_delivery_then_restart_delivers_everything(tmp_path: Path) -> None:
    sink = Sink(keep_messages=True, delays={"dest.test": 0.02})
    async with trio.open_nursery() as nursery:
        sink_port = await nursery.start(sink.serve, "127.0.0.1", 0)
        relay = make_relay(tmp_path, workers=2, extra=f"""
[outbound]
smart_host = "127.0.0.1:{sink_port}"
[outbound.default]
max_connections = {MAX_CONNECTIONS}
retry_interval = 1.0
""")
        await trio.to_thread.run_sync(relay.start)
        try:
            subjects = await trio.to_thread.run_sync(_inject, relay.port)
            # Let part of the queue go out, then pull the plug mid-delivery.
            await sink.wait_for(lambda s: s.total_messages >= 30, timeout=30)
            await trio.to_thread.run_sync(relay.kill_all)
            delivered_before = sink.total_messages
            assert delivered_before < MESSAGES, "the kill must happen mid-delivery"

            await trio.to_thread.run_sync(relay.start)
            await sink.wait_for(
                lambda s: {_subject(m[2]) for m in s.messages} >= set(subjects), timeout=60
            )
        finally:
            await trio.to_thread.run_sync(relay.stop)
            nursery.cancel_scope.cancel()

    counts = Counter(_subject(m[2]) for m in sink.messages)
    assert set(counts) == set(subjects)
    duplicates = sum(n - 1 for n in counts.values())
    assert duplicates <= MAX_CONNECTIONS * 2, counts.most_common(5)
    # The event log accounts for every recipient: one Delivery each, at least.
    delivered = Counter(
        e.recipient for e in EventLog.read(tmp_path / "events.jsonl") if isinstance(e, Delivery)
    )
    assert set(delivered) == {f"r{i}@dest.test" for i in range(MESSAGES)}
