"""The ``webhooks`` scenario, and the local webhook receiver the tests use too.

The issue: "Webhooks keep up with the bench's full end-to-end event rate without a
growing backlog (report events/s delivered to a local receiver, batch sizes, and the
relay's e2e rate with and without webhooks on, same run)."

Contract: ``await run_webhooks(scenario, peer_name, processes, ...)`` returns rows with the
keys of ``bench.scenarios.run_one``'s rows (``msg_s`` = ``e2e_msg_s``, ``cpu_s_per_1000``,
``complete``, ...), each against a fresh server and sink, the same load every time
(``scenario.load``, the ``e2e`` mix):

* ``webhooks off``: the relay (or any peer) end to end, no webhook;
* ``webhooks on`` (relay only): the same with one ``[[webhooks]]`` entry (every event
  type, ``batch_size`` ``BATCH_SIZE`` (100), ``max_batch_age`` 1 s) posting to a
  ``WebhookReceiver`` in its own process (``python -m bench.webhooks``: so its CPU is
  not the bench's trio thread, which runs the sink). Extra keys: ``log_events`` (lines
  of the relay's event log at the end), ``webhook_events`` and ``webhook_posts``
  (received and acknowledged), ``webhook_mean_batch``, ``webhook_events_s`` (events
  received / first to last receipt: it includes the last batch's ``max_batch_age``),
  ``event_rate_s`` (log events when the sink had every recipient / the e2e time: the
  rate the relay produced them), ``webhook_events_s_during_run`` (events received by
  then / the e2e time: the rate they were delivered at), ``webhook_backlog_at_end``
  (log events not received when the sink had every recipient), ``webhook_catch_up_s``
  (seconds from then until the receiver had them all, at most
  ``scenario.drain_timeout``), ``webhook_bad_signatures`` and ``webhook_complete``
  (every event received, every signature good; the row's ``complete`` requires it).
* ``webhooks drain`` (relay only): the same, but the receiver's port is closed while the
  load runs; it starts when the sink has every recipient, so ``webhook_events_s`` is the
  rate the dispatcher sends a backlog at (its ceiling on this machine, with the relay
  idle) and ``webhook_catch_up_s`` how long the whole run's events took (including up
  to ``retry_max``, 2 s, before the dispatcher tries again).

``WebhookReceiver`` (stdlib ``http.server``, a thread per connection, on 127.0.0.1) checks
each POST's signature, answers 200 after ``delay`` seconds (a slow receiver) or
``fail_status`` (500) at once to every ``fail_every``-th POST, can go ``down`` (its port
closed, its connections cut) and ``up`` again on the same port, and keeps what it
acknowledged (``batches``) unless ``keep=False``. ``GET /stats`` answers its counters as
JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.server
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import trio

from bench.peers import PeerError, PeerSetup, RelayPeer, free_port
from bench.scenarios import Scenario, _measure, run_one, run_with_peer
from bench.sink import Sink
from relay.events.webhooks import HEADER_BATCH, HEADER_SIGNATURE, HEADER_TIMESTAMP, verify

__all__ = ["BENCH_SECRET", "ReceivedBatch", "WebhookReceiver", "main", "run_webhooks"]

BENCH_SECRET = "bench-webhook-secret"
#: The webhook's ``batch_size`` in the ``webhooks on`` row (the relay's default).
BATCH_SIZE = 100
ROW_OFF, ROW_ON, ROW_DRAIN = "webhooks off", "webhooks on", "webhooks drain"


@dataclasses.dataclass
class ReceivedBatch:
    """One acknowledged POST: when (``time.monotonic()``), its batch id, its events."""

    time: float
    batch_id: str
    events: list[dict[str, Any]]


class _Body(msgspec.Struct):
    events: list[msgspec.Raw]


_decode_count = msgspec.json.Decoder(_Body).decode


class WebhookReceiver:
    """See the module docstring. Thread-safe; ``wait_for`` blocks until a predicate of
    the receiver holds (no polling sleeps)."""

    def __init__(self, secret: bytes, port: int = 0, keep: bool = True) -> None:
        self.secret = secret
        self.port = port
        self.keep = keep
        #: Seconds to wait before answering each POST (a slow receiver).
        self.delay = 0.0
        #: Answer ``fail_status`` (and keep nothing) to every ``fail_every``-th POST;
        #: 0 = never.
        self.fail_every = 0
        self.fail_status = 500
        self.batches: list[ReceivedBatch] = []
        self.events = 0
        self.posts = 0
        self.failed = 0
        self.bad_signatures = 0
        self.first_at = self.last_at = 0.0
        self._seen = 0
        self._cond = threading.Condition()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def up(self) -> WebhookReceiver:
        """Listen (again, on the same port once it had one)."""
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.daemon_threads = True
        server.receiver = self  # type: ignore[attr-defined]
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def down(self) -> None:
        """Close the port and cut every open connection (the receiver is down)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        with self._cond:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    close = down

    def wait_for(self, predicate: Callable[[WebhookReceiver], bool], timeout: float,
                 what: str = "the webhook receiver") -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self), timeout):
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}")

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"events": self.events, "posts": self.posts, "failed": self.failed,
                    "bad_signatures": self.bad_signatures, "first_at": self.first_at,
                    "last_at": self.last_at}

    # called by the handler threads

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._cond:
            (self._connections.add if add else self._connections.discard)(conn)

    def _answer(self, headers: Any, body: bytes) -> int:
        """The status for one POST (recorded when 200)."""
        ok = verify(self.secret, headers.get(HEADER_TIMESTAMP, ""), body,
                    headers.get(HEADER_SIGNATURE, ""))
        with self._cond:
            self._seen += 1
            if not ok:
                self.bad_signatures += 1
                self._cond.notify_all()
                return 401
            if self.fail_every and self._seen % self.fail_every == 0:
                self.failed += 1
                self._cond.notify_all()
                return self.fail_status
        events: list[Any] = (json.loads(body)["events"] if self.keep
                             else _decode_count(body).events)
        if self.delay:
            threading.Event().wait(self.delay)  # behaving slowly, not synchronising
        now = time.monotonic()
        with self._cond:
            self.posts += 1
            self.events += len(events)
            self.first_at = self.first_at or now
            self.last_at = now
            if self.keep:
                self.batches.append(ReceivedBatch(now, headers.get(HEADER_BATCH, ""), events))
            self._cond.notify_all()
        return 200


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection cut (``down``, a client killed) is expected: no traceback."""


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx uses it

    def setup(self) -> None:
        super().setup()
        # The status line and headers go in one write, the body in another: without
        # this, Nagle's algorithm holds the body until the client's delayed ACK (40 ms).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.receiver._track(self.connection, True)  # type: ignore[attr-defined]

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.receiver._track(self.connection, False)  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: bytes = b"") -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        receiver: WebhookReceiver = self.server.receiver  # type: ignore[attr-defined]
        try:
            status = receiver._answer(self.headers, body)
        except (ValueError, KeyError, TypeError, msgspec.DecodeError):
            status = 400
        self._reply(status, b'{"ok":true}' if status == 200 else b'{"ok":false}')

    def do_GET(self) -> None:
        receiver: WebhookReceiver = self.server.receiver  # type: ignore[attr-defined]
        self._reply(200, json.dumps(receiver.stats()).encode())


# -- the scenario -----------------------------------------------------------------------

class _WebhookRelayPeer(RelayPeer):
    """The relay peer with one ``[[webhooks]]`` entry posting to ``url``."""

    def __init__(self, setup: PeerSetup, url: str, batch_size: int) -> None:
        super().__init__(setup)
        self.url, self.batch_size = url, batch_size

    def config_text(self) -> str:
        return super().config_text() + "\n".join([
            "[[webhooks]]", 'name = "bench"', f'url = "{self.url}"',
            f'secret = "{BENCH_SECRET}"', f"batch_size = {self.batch_size}",
            "max_batch_age = 1.0", "retry_min = 0.2", "retry_max = 2.0", ""])


async def run_webhooks(scenario: Scenario, peer_name: str, processes: int = 2,
                       show_progress: bool = True,
                       log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The scenario's rows against ``peer_name``: see the module docstring."""
    off = dataclasses.replace(scenario, name=ROW_OFF, driver="loadgen",
                              description="e2e, no webhook")
    rows = [await run_one(off, peer_name, processes, show_progress, log)]
    if peer_name != "relay":
        return rows
    for drain in (False, True):
        row = await _run_on(scenario, processes, show_progress, log, drain)
        rows.append(row)
        if log and not row.get("error"):
            log(f"   {row['scenario']}: {row['webhook_events']} of {row['log_events']} "
                f"events received, {row['webhook_events_s_during_run']:.0f} events/s "
                f"during the run ({row['webhook_events_s']:.0f}/s first to last), the "
                f"relay produced {row['event_rate_s']:.0f}/s, mean batch "
                f"{row['webhook_mean_batch']:.1f}, backlog {row['webhook_backlog_at_end']} "
                f"events when the sink had everything, caught up "
                f"{row['webhook_catch_up_s']:.1f}s later; e2e {rows[0].get('msg_s') or 0:.0f} "
                f"msg/s without webhooks, {row.get('msg_s') or 0:.0f} with")
    return rows


async def _run_on(scenario: Scenario, processes: int, show_progress: bool,
                  log: Callable[[str], None] | None, drain: bool) -> dict[str, Any]:
    """The ``webhooks on`` row, or with ``drain`` the ``webhooks drain`` row: the
    receiver is down (its port closed) during the load and starts when the sink has
    every recipient, so ``webhook_events_s`` is the rate the whole backlog is sent at."""
    name = ROW_DRAIN if drain else ROW_ON
    row: dict[str, Any] = {"scenario": name, "peer": "relay", "description": (
        "e2e with the receiver down, then the backlog sent" if drain
        else "e2e, every event POSTed to a local receiver")}
    variant = dataclasses.replace(scenario, name=name, driver="loadgen")
    sink = Sink(behaviours=dict(scenario.behaviours))
    port = free_port()
    receiver = None if drain else await _ReceiverProcess.start(port)

    def make(peer_name: str, setup: PeerSetup) -> _WebhookRelayPeer:
        return _WebhookRelayPeer(setup, f"http://127.0.0.1:{port}/hook", BATCH_SIZE)

    async def measure(peer: _WebhookRelayPeer) -> None:
        nonlocal receiver
        await _measure(variant, peer, sink, row, processes, show_progress)
        receiver = receiver or await _ReceiverProcess.start(port)
        await _webhook_figures(peer.tmp / "events.jsonl", receiver, row,
                               scenario.drain_timeout)

    try:
        await run_with_peer(variant, "relay", sink, row, measure, log, make)
    finally:
        if receiver is not None:
            receiver.stop()
    return row


async def _webhook_figures(events_path: Path, receiver: _ReceiverProcess,
                           row: dict[str, Any], timeout: float) -> None:
    """Add the webhook keys to ``row`` (right after the e2e run ended)."""
    def log_events() -> int:
        with open(events_path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))

    at_end = await trio.to_thread.run_sync(log_events)
    stats = await receiver.stats()
    received_at_end = stats["events"]
    backlog = at_end - received_at_end
    ended = time.monotonic()
    with trio.move_on_after(timeout):
        while stats["events"] < await trio.to_thread.run_sync(log_events):
            await trio.sleep(0.1)  # polling another process's counters, with a deadline
            stats = await receiver.stats()
    total = await trio.to_thread.run_sync(log_events)
    span = stats["last_at"] - stats["first_at"]
    e2e_secs = row["accepted"] / row["e2e_msg_s"] if row.get("e2e_msg_s") else 0.0
    row.update({
        "log_events": total,
        "webhook_events": stats["events"],
        "webhook_posts": stats["posts"],
        "webhook_mean_batch": stats["events"] / stats["posts"] if stats["posts"] else 0.0,
        "webhook_events_s": stats["events"] / span if span > 0 else 0.0,
        "event_rate_s": at_end / e2e_secs if e2e_secs else 0.0,
        "webhook_events_s_during_run": received_at_end / e2e_secs if e2e_secs else 0.0,
        "webhook_backlog_at_end": max(0, backlog),
        "webhook_catch_up_s": time.monotonic() - ended if backlog > 0 else 0.0,
        "webhook_bad_signatures": stats["bad_signatures"],
    })
    row["webhook_complete"] = stats["events"] >= total and not stats["bad_signatures"]
    row["complete"] = bool(row.get("complete")) and row["webhook_complete"]


class _ReceiverProcess:
    """``python -m bench.webhooks`` on a free loopback port, its counters over HTTP."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc, self.port = proc, port
        self.url = f"http://127.0.0.1:{port}/hook"

    @classmethod
    async def start(cls, port: int) -> _ReceiverProcess:
        proc = subprocess.Popen([sys.executable, "-m", "bench.webhooks", "--port", str(port),
                                 "--secret", BENCH_SECRET], stdin=subprocess.DEVNULL)
        self = cls(proc, port)
        with trio.fail_after(20):
            while True:
                try:
                    await self.stats()
                    return self
                except OSError:
                    if proc.poll() is not None:
                        raise PeerError("the webhook receiver exited") from None
                    await trio.sleep(0.05)  # waiting for another process to listen

    async def stats(self) -> dict[str, Any]:
        import httpx

        async with httpx.AsyncClient(trust_env=False) as client:
            try:
                return (await client.get(f"http://127.0.0.1:{self.port}/stats")).json()
            except httpx.TransportError as e:
                raise OSError(str(e)) from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.webhooks --port N --secret S``: serve a receiver until SIGTERM."""
    ap = argparse.ArgumentParser(prog="python -m bench.webhooks")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--secret", required=True)
    args = ap.parse_args(argv)
    receiver = WebhookReceiver(args.secret.encode(), args.port, keep=False).up()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    receiver.down()
    print(json.dumps(receiver.stats()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
