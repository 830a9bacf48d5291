"""The ``smtp-source`` scenario: the reception side's acceptance measurement, with
Postfix's own C load generator instead of the bench's.

Why: the issue for SMTP reception asks for "accepted messages per second for 2 KB
messages, 20 parallel sessions, with and without connection reuse (``-d``), measured with
``smtp-source`` ... for the relay and for a stock Postfix accepting the same load in the
same run". A C client costs the shared CPUs far less than the Python generator, and it is
the tool Postfix users quote numbers with.

Contract: ``await run_smtp_source(scenario, peer_name, ...)`` returns two result rows
(``smtp-source``: a new connection per message; ``smtp-source -d``: "don't disconnect",
connection reuse), each
with the same keys as the other scenarios' rows (``msg_s``, ``cpu_s_per_1000``,
``peak_rss_mb``, ``complete``...). The peer relays to Postfix's ``smtp-sink`` (the
cheapest sink there is) in its own process; the command run is::

    smtp-source -c [-d] -s SESSIONS -m N -l 2048 -f bench@sender.test \
        -t rcpt@d00.bench.test 127.0.0.1:PORT

``msg/s`` = N / wall-clock time of that command. N is ``scenario.load.messages`` if set,
else sized once per variant from a short probe run against the first peer so that a run
takes about ``scenario.load.duration`` seconds; the next peer reuses that N (the same
load for both). Every run is bounded by a timeout; smtp-source exits non-zero on any
refused command, which makes the row ``complete: false``.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from bench.metrics import sample_tree
from bench.peers import PeerError, PeerSetup, free_port, make_peer, wait_for_220

if TYPE_CHECKING:
    from bench.scenarios import Scenario

__all__ = ["SMTP_SINK", "SMTP_SOURCE", "VARIANTS", "add_load_arguments", "load",
           "run_smtp_source", "source_command"]

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
#: (row name, extra smtp-source flags)
VARIANTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("smtp-source", ()), ("smtp-source -d", ("-d",)))
_PROBE_MESSAGES = 400


def source_command(port: int, messages: int, sessions: int, size: int,
                   flags: tuple[str, ...] = ()) -> list[str]:
    """The exact smtp-source command line of a run (also recorded in the row)."""
    return [SMTP_SOURCE, "-c", *flags, "-s", str(sessions), "-m", str(messages),
            "-l", str(size), "-f", "bench@sender.test", "-t", "rcpt@d00.bench.test",
            f"127.0.0.1:{port}"]


def add_load_arguments(ap: argparse.ArgumentParser) -> None:
    """The smtp-source load of the CPU tools (``bench.profile``, ``bench.floor``)."""
    ap.add_argument("--reuse", action="store_true", help="smtp-source -d (connection reuse)")
    ap.add_argument("--size", type=int, default=2048, help="message body bytes (2048)")
    ap.add_argument("--sessions", type=int, default=20, help="smtp-source sessions (20)")
    ap.add_argument("--messages", type=int, default=20000, help="messages measured (20000)")


async def load(port: int, messages: int, args: argparse.Namespace) -> None:
    """Run smtp-source to the end: ``messages`` to 127.0.0.1:``port`` as ``args`` say."""
    flags = ("-d",) if args.reuse else ()
    await trio.run_process(source_command(port, messages, args.sessions, args.size, flags),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class _SmtpSink:
    """Postfix's ``smtp-sink`` on a free loopback port, counting to a file (``-c``).

    Its counter output goes to a file, not a pipe: a pipe nobody drains would block it.
    ``messages()`` reads the latest ``mesg=`` counter."""

    def __init__(self) -> None:
        self.port = free_port()
        fd, name = tempfile.mkstemp(prefix="bench-smtp-sink-", suffix=".out")
        os.close(fd)
        self.out = Path(name)
        self.proc: subprocess.Popen[bytes] | None = None

    async def __aenter__(self) -> _SmtpSink:
        with open(self.out, "wb") as f:
            self.proc = subprocess.Popen(
                [SMTP_SINK, "-c", "-u", "nobody", f"127.0.0.1:{self.port}", "1024"],
                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            await wait_for_220("127.0.0.1", self.port, time.monotonic() + 15,
                               alive=lambda: self.proc is not None and self.proc.poll() is None)
        except PeerError as e:
            await self.__aexit__()
            raise PeerError(f"smtp-sink: {e}") from None
        return self

    def messages(self) -> int:
        tail = self.out.read_bytes()[-400:].replace(b"\r", b"\n").split(b"mesg=")
        try:
            return int(tail[-1].split()[0]) if len(tail) > 1 else 0
        except (ValueError, IndexError):
            return 0

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(5):
                while self.proc.poll() is None:
                    await trio.sleep(0.02)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.out.unlink(missing_ok=True)


async def _run_source(cmd: list[str], timeout: float,
                      on_count: Any = None) -> tuple[int | None, int, float, float]:
    """Run smtp-source; return (exit status or None on timeout, last counter value,
    start, end) with ``time.monotonic()`` times. ``on_count(n)`` sees the running
    counter (``-c`` prints one number per message; only the latest matters)."""
    t0 = time.monotonic()
    proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    count, tail = 0, b""
    rc: int | None = None
    with trio.move_on_after(timeout):
        while True:
            chunk = await proc.stdout.receive_some(1 << 16)
            if not chunk:
                break
            tail = (tail + chunk)[-256:]
            nums = tail.replace(b"\r", b"\n").split(b"\n")
            for x in reversed(nums[:-1]):
                if x.strip().isdigit():
                    count = int(x)
                    break
            if on_count is not None:
                on_count(count)
        rc = await proc.wait()
    end = time.monotonic()
    if rc is None:
        with trio.CancelScope(shield=True):
            proc.kill()
            await proc.wait()
    last = tail.replace(b"\r", b"\n").split(b"\n")[-1].strip()
    if last.isdigit():
        count = int(last)
    return rc, count, t0, end


async def run_smtp_source(scenario: Scenario, peer_name: str, show_progress: bool = True,
                          log: Any = None) -> list[dict[str, Any]]:
    """Both variants against ``peer_name``: see the module docstring."""
    spec = scenario.load
    size = spec.sizes[0][0]
    suffix = "" if size == 2048 else f" {size // 1024}KB"  # smtp-source-100k's rows
    rows: list[dict[str, Any]] = [
        {"scenario": name + suffix, "peer": peer_name, "description": scenario.description}
        for name, _ in VARIANTS]
    if not (Path(SMTP_SOURCE).exists() and Path(SMTP_SINK).exists()):
        for row in rows:
            row["error"] = f"{SMTP_SOURCE} / {SMTP_SINK} not installed (make sysdeps)"
        return rows
    try:
        async with _SmtpSink() as sink:
            peer = make_peer(peer_name, PeerSetup(sink_port=sink.port,
                                                  workers=scenario.relay_workers))
            async with peer:
                for row, (_name, flags) in zip(rows, VARIANTS, strict=True):
                    await _one_variant(scenario, peer, sink, row, flags, size)
                    if log and not row.get("error"):
                        log(f"   {row['scenario']}: {row['accepted']} in "
                            f"{row['elapsed_s']:.1f}s = {row['msg_s']:.0f} msg/s")
    except PeerError as e:
        for row in rows:
            row.setdefault("error", str(e))
        if log:
            log(f"{scenario.name}/{peer_name}: {e}")
    return rows


async def _one_variant(scenario: Scenario, peer: Any, sink: _SmtpSink, row: dict[str, Any],
                       flags: tuple[str, ...], size: int) -> None:
    spec = scenario.load
    key = " ".join(flags) or "new-connection"
    timeout = max(60.0, 8 * spec.duration)
    n = spec.messages or scenario.sized.get(key, 0)
    if not n:  # size N from a short probe so that the run takes ~duration seconds
        rc, count, t0, t1 = await _run_source(
            source_command(peer.port, _PROBE_MESSAGES, spec.sessions, size, flags), timeout)
        if rc != 0:
            row["error"] = f"smtp-source probe failed (exit {rc}, {count} sent)"
            return
        rate = _PROBE_MESSAGES / max(1e-6, t1 - t0)
        n = int(min(500_000, max(1000, round(rate * spec.duration, -2))))
        scenario.sized[key] = n
    roots = peer.root_pids()
    base = await trio.to_thread.run_sync(sample_tree, roots)
    delivered0 = sink.messages()
    state = {"peak_rss": base.rss_bytes, "count": 0}
    timeline: list[tuple[float, int]] = []
    t_start = time.monotonic()

    def on_count(c: int) -> None:
        state["count"] = c

    async def sampler() -> None:
        while True:
            tree = await trio.to_thread.run_sync(sample_tree, roots)
            state["peak_rss"] = max(state["peak_rss"], tree.rss_bytes)
            timeline.append((round(time.monotonic() - t_start, 3), state["count"]))
            await trio.sleep(0.25)

    cmd = source_command(peer.port, n, spec.sessions, size, flags)
    async with trio.open_nursery() as nursery:
        if roots:
            nursery.start_soon(sampler)
        rc, count, t0, t1 = await _run_source(cmd, timeout, on_count)
        nursery.cancel_scope.cancel()
    end = await trio.to_thread.run_sync(sample_tree, roots)
    elapsed = max(1e-9, t1 - t0)
    accepted = n if rc == 0 else count
    timeline.append((round(t1 - t_start, 3), accepted))
    row.update({
        "command": " ".join(cmd),
        "exit_status": rc,
        "accepted": accepted,
        "recipients_accepted": accepted,
        "failed": 0 if rc == 0 else 1,
        "elapsed_s": elapsed,
        "complete": rc == 0,
        "msg_s": accepted / elapsed,
        "inject_msg_s": accepted / elapsed,
        "e2e_msg_s": None,
        "latency_p50_ms": None,
        "latency_p99_ms": None,
        "cpu_s_per_1000": ((end.cpu_seconds - base.cpu_seconds) / accepted * 1000
                           if roots and accepted else None),
        "peak_rss_mb": state["peak_rss"] / 1e6 if roots else None,
        "spool_bytes_per_msg": None,
        # what the peer had delivered to smtp-sink when smtp-source finished (no waiting)
        "delivered_during_run": sink.messages() - delivered0,
        "mb_sent": accepted * size / 1e6,
        "errors": [] if rc == 0 else [f"smtp-source exit {rc} after {count} messages"
                                      + (" (timeout)" if rc is None else "")],
        "timeline": {"accepted": timeline, "accepted_rcpts": timeline},
    })
    if math.isnan(row["msg_s"]):  # pragma: no cover - defensive
        row["msg_s"] = 0.0
