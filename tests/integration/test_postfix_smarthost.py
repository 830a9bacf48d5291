"""A real Postfix uses the relay as its smart host (``relayhost = [127.0.0.1]:PORT``), the
way an operator would set it up, and mail given to Postfix's ``sendmail`` command ends up
in our spool with its envelope intact."""

from __future__ import annotations

import subprocess
from pathlib import Path

import trio

from bench.peers import PeerSetup, PostfixPeer
from relay.config import load_config
from relay.spool import Spool
from tests.integration.relayproc import make_relay


async def test_postfix_sendmail_through_relay_as_smart_host(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, workers=2)
    await trio.to_thread.run_sync(relay.start)
    try:
        async with PostfixPeer(PeerSetup(sink_port=relay.port)) as postfix:
            messages = {
                f"<pf-{i}@client.test>": f"rcpt{i}@dest{i % 2}.test" for i in range(5)
            }
            for message_id, rcpt in messages.items():
                text = (
                    f"From: app@client.test\nTo: {rcpt}\nSubject: via postfix\n"
                    f"Message-ID: {message_id}\n\nhello from sendmail\n.leading dot\n"
                )
                result = await trio.to_thread.run_sync(lambda t=text, r=rcpt: subprocess.run(
                    ["/usr/sbin/sendmail", "-C", str(postfix.conf), "-f", "app@client.test",
                     "-i", r],
                    input=t, text=True, capture_output=True, timeout=30,
                ))
                assert result.returncode == 0, result.stderr

            cfg = load_config(relay.config_path)
            found: dict[str, tuple[str, list[str], bytes]] = {}
            with trio.fail_after(60):
                while len(found) < len(messages):
                    found = await trio.to_thread.run_sync(_queued, cfg)
                    await trio.sleep(0.1)  # polling the spool, bounded by fail_after
    finally:
        await trio.to_thread.run_sync(relay.stop)

    for message_id, rcpt in messages.items():
        sender, rcpts, data = found[message_id]
        assert sender == "app@client.test"
        assert rcpts == [rcpt]
        # Postfix speaks ESMTP to us from loopback and its own Received line is kept
        # below ours; the body arrives with CRLF and the leading dot unstuffed.
        assert data.startswith(b"Received: from postfix.bench.localhost ([127.0.0.1])")
        assert b"\r\nReceived: by postfix.bench.localhost" in data
        assert data.endswith(b"\r\n\r\nhello from sendmail\r\n.leading dot\r\n")


def _queued(cfg) -> dict[str, tuple[str, list[str], bytes]]:  # type: ignore[no-untyped-def]
    """Message-ID -> (sender, recipients, bytes) for everything in the spool."""
    out: dict[str, tuple[str, list[str], bytes]] = {}
    if not (Path(cfg.spool.path) / "data.mdb").exists():
        return out
    with Spool(cfg.spool.path, cfg.spool.map_size_bytes()) as spool:
        for entry in spool.list_messages(limit=1000):
            envelope, data = spool.load(entry.queue_id)
            for line in data.split(b"\r\n"):
                if line.lower().startswith(b"message-id:"):
                    key = line.split(b":", 1)[1].strip().decode()
                    out[key] = (envelope.sender, [r.address for r in envelope.recipients], data)
                    break
    return out
