"""Crash safety for real: writer processes are SIGKILLed mid-run, then the spool is
reopened and every queue id they reported as committed must be there, byte-identical.

The children print a queue id only after the call that commits it returned (store_batch,
or GroupCommitWriter.submit in the trio variant), and flush stdout each time: what the
parent read is exactly what an SMTP client would have received a 250 for.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from relay.spool import Spool

MAP = 1 << 32

CHILD_COMMON = textwrap.dedent(
    """
    import hashlib, os, sys, time
    from relay.spool import Envelope, NewMessage, Recipient, Spool, new_queue_id

    def content(qid):
        seed = hashlib.sha256(qid.encode()).digest()
        size = 100 + int.from_bytes(seed[:4], "big") % 300_000
        return (seed * (size // 32 + 1))[:size]

    def message():
        qid = new_queue_id()
        rcpts = [Recipient(address=f"u{i}@d{i % 3}.example") for i in range(1 + len(qid) % 4)]
        env = Envelope(queue_id=qid, sender="s@example.org", recipients=rcpts,
                       received_at=time.time())
        return NewMessage(envelope=env, data=content(qid))

    spool = Spool(sys.argv[1], int(sys.argv[2]))
    print("ready", flush=True)
    """
)

CHILD_BATCH = CHILD_COMMON + textwrap.dedent(
    """
    n = 0
    while True:
        n += 1
        batch = [message() for _ in range(1 + n % 7)]
        spool.store_batch(batch)
        sys.stdout.write("".join(m.envelope.queue_id + "\\n" for m in batch))
        sys.stdout.flush()
    """
)

CHILD_TRIO = CHILD_COMMON + textwrap.dedent(
    """
    import trio
    from relay.spool import GroupCommitWriter

    async def session(writer):
        while True:
            m = message()
            await writer.submit(m)
            sys.stdout.write(m.envelope.queue_id + "\\n")
            sys.stdout.flush()

    async def main():
        writer = GroupCommitWriter(spool, commit_window=0.001, max_batch=64)
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for _ in range(16):
                nursery.start_soon(session, writer)

    trio.run(main)
    """
)


def content(qid: str) -> bytes:
    seed = hashlib.sha256(qid.encode()).digest()
    size = 100 + int.from_bytes(seed[:4], "big") % 300_000
    return (seed * (size // 32 + 1))[:size]


def run_and_kill(script: str, path: Path, min_lines: int, deadline: float) -> list[str]:
    """Start a writer, wait until it reported ``min_lines`` commits, SIGKILL it while it
    keeps writing, and return every complete qid line it printed."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(path), str(MAP)],
        stdout=subprocess.PIPE,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    lines: list[bytes] = []
    try:
        assert proc.stdout.readline() == b"ready\n"
        while len(lines) < min_lines:
            assert time.monotonic() < deadline, "writer too slow"
            line = proc.stdout.readline()
            assert line, f"writer exited early: {proc.poll()}"
            lines.append(line)
        proc.send_signal(signal.SIGKILL)
        rest = proc.stdout.read()  # whatever it printed before dying
        lines.extend(rest.splitlines(keepends=True))
    finally:
        proc.kill()
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    return [ln.decode().strip() for ln in lines if ln.endswith(b"\n")]


@pytest.mark.parametrize("script", [CHILD_BATCH, CHILD_TRIO], ids=["store_batch", "group_commit"])
def test_kill_9_loses_nothing_acknowledged(tmp_path, script):
    path = tmp_path / "spool"
    deadline = time.monotonic() + 120
    acknowledged: list[str] = []
    for _ in range(3):  # crash, reopen, crash again: recovery is repeatable
        acknowledged += run_and_kill(script, path, min_lines=150, deadline=deadline)
        with Spool(path, MAP) as spool:  # opens cleanly after the crash
            assert spool.verify() == []
            for qid in acknowledged:
                env, data = spool.load(qid)
                assert env.queue_id == qid
                assert data == content(qid), qid
            stats = spool.stats()
            assert stats.messages >= len(acknowledged)
    assert len(set(acknowledged)) == len(acknowledged) >= 450
