"""Inbound timeouts as a client sees them, against a real ``relay serve`` process.

Since the watchdog rewrite (``SessionRegistry.watch`` in relay.inbound.session) the
timeouts are enforced by one task per worker, so these tests also check the neighbours:
a session ending on a timeout must leave the worker, and the other sessions on it, alone.
The relays here run ONE worker so that "another client" is certainly on the same worker
as the misbehaving one.

No test sleeps to synchronise: sockets carry timeouts and waits poll with deadlines.
"""

from __future__ import annotations

import contextlib
import select
import signal
import smtplib
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from relay.inbound.session import FAREWELL_TIMEOUT, WATCH_TICK_MAX
from tests.integration.relayproc import RelayProcess, make_relay, recv_reply, wait_for

#: A hang (e.g. a wait that nothing bounds) fails the test instead of the run.
pytestmark = pytest.mark.timeout(120)

NOOP = b"NOOP\r\n"
#: One NOOP's reply; the flood's replies grow 14/6 as fast as its commands.
NOOP_REPLY = b"250 2.0.0 Ok\r\n"
#: The flood must outgrow the socket buffers, which autotune up to a few MB on loopback
#: (tcp_rmem, tcp_wmem): it runs until the relay stops reading, so it does, and at least
#: this much (about 10 MB of replies on a default Linux).
AT_LEAST = 1024 * 1024


def crashes(relay: RelayProcess) -> list[str]:
    return [line for line in relay.log().splitlines() if "crashed" in line]


def log_after_failure(relay: RelayProcess) -> str:
    """The relay's log for a failure message, once a worker crash (the likely cause of
    a cut connection) had time to be logged."""
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: crashes(relay), 5, "a crash report")
    return relay.log()[-4000:]


def assert_worker_intact(relay: RelayProcess, workers: list[int]) -> None:
    """The worker that served the misbehaving client is the one that started (not
    crashed and restarted) and still takes mail."""
    try:
        send_one_message(relay, "afterwards")
    except (OSError, smtplib.SMTPException) as e:
        failure: BaseException | None = e
    else:
        failure = None
    log_tail = log_after_failure(relay) if failure else relay.log()[-4000:]
    assert crashes(relay) == [], f"a worker crashed:\n{log_tail}"
    assert relay.workers() == workers, f"worker restarted:\n{log_tail}"
    assert failure is None, f"next session failed: {failure!r}\n{log_tail}"


def send_one_message(relay: RelayProcess, subject: str) -> bytes:
    """A complete smtplib session; returns the 250 text of DATA (with the queue id)."""
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        assert client.ehlo("neighbour.test")[0] == 250
        client.mail("a@sender.test")
        assert client.rcpt("b@dest.test")[0] == 250
        code, msg = client.data(f"Subject: {subject}\r\n\r\nbody\r\n".encode())
    assert code == 250, msg
    assert msg.startswith(b"2.0.0 Ok: queued as "), msg
    return msg


#: The flood client calls its writes stalled after this long without progress, checked
#: this often: well under the relay's command_timeout in the test below, which the relay
#: waits (plus a watchdog tick) before it gives up writing and drops the connection.
STALL_AFTER, STALL_POLL = 0.2, 0.05


@dataclass
class Flood:
    """A client that pipelines NOOPs as fast as the relay takes them and never reads.

    Runs in a thread; records when its writes stopped making progress (the relay
    stopped reading: it is blocked writing replies nobody takes) and when the relay
    dropped the connection (a write fails with a reset or broken pipe)."""

    port: int
    deadline: float
    sent: int = 0
    last_progress: float = 0.0
    disconnected_at: float | None = None
    #: The client's receive buffer (autotuned) when the relay stopped reading.
    rcvbuf: int = 0
    error: BaseException | None = None
    stalled: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> Flood:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def join(self, timeout: float) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "flood client still running"

    def _run(self) -> None:
        try:
            self._flood()
        except BaseException as e:  # reported by the test
            self.error = e

    def _flood(self) -> None:
        chunk = NOOP * 10000  # whole commands only, never a split line
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            assert recv_reply(s).startswith(b"220 ")  # never talk before the greeting
            s.setblocking(False)
            view = memoryview(b"")
            self.last_progress = time.monotonic()
            while time.monotonic() < self.deadline:
                if not view:
                    view = memoryview(chunk)
                _, writable, _ = select.select([], [s], [], STALL_POLL)
                if not writable:
                    if time.monotonic() - self.last_progress > STALL_AFTER:
                        self.rcvbuf = s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
                        self.stalled.set()
                    continue
                try:
                    n = s.send(view)
                except BlockingIOError:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    self.disconnected_at = time.monotonic()
                    return
                view = view[n:]
                self.sent += n
                self.last_progress = time.monotonic()


def test_pipelining_client_that_never_reads_is_disconnected(tmp_path: Path) -> None:
    """Several MB of pipelined NOOPs, replies never read: the relay blocks writing
    replies, the watchdog ends that wait after command_timeout, the farewell 421 is written
    if it still fits (a tail of the socket buffer may take it) and given up after
    FAREWELL_TIMEOUT otherwise, and the connection is dropped. Meanwhile
    and afterwards, the same (single) worker serves other clients normally."""
    command_timeout = 0.5
    relay = make_relay(tmp_path, workers=1, inbound=f"command_timeout = {command_timeout}")
    relay.start()
    try:
        workers = relay.workers()
        assert len(workers) == 1
        flood = Flood(relay.port, deadline=time.monotonic() + 45).start()
        # The relay stops reading the flood only once its replies fill every buffer.
        wait_for(lambda: flood.stalled.is_set() or flood.error or flood.disconnected_at,
                 30, "the relay to stop reading the flood")
        assert flood.error is None, repr(flood.error)
        assert flood.stalled.is_set(), "dropped before the relay stopped reading"
        # While that session is stuck writing, the worker still serves a neighbour.
        started = time.monotonic()
        send_one_message(relay, "during the flood")
        assert time.monotonic() - started < 5
        flood.join(timeout=60)
        assert flood.error is None, repr(flood.error)
        assert flood.disconnected_at is not None, (
            f"still connected after {flood.sent} bytes of NOOPs"
        )
        # The replies the relay owed exceeded what the socket buffers can hold.
        owed = flood.sent // len(NOOP) * len(NOOP_REPLY)
        assert owed > max(flood.rcvbuf, AT_LEAST), (owed, flood.rcvbuf)
        # Dropped in bounded time once the relay had stopped reading: the send-side
        # timeout, one watchdog tick, the farewell's own bound, and slack for a busy box.
        stuck_for = flood.disconnected_at - flood.last_progress
        assert stuck_for < command_timeout + WATCH_TICK_MAX + FAREWELL_TIMEOUT + 3, stuck_for
        # The worker lived through it and serves as before.
        assert_worker_intact(relay, workers)
    finally:
        relay.stop()


def open_data(sock: socket.socket) -> None:
    """Greeting, EHLO, one envelope, up to the 354 of DATA."""
    assert recv_reply(sock).startswith(b"220 ")
    sock.sendall(b"EHLO idle.test\r\n")
    assert recv_reply(sock).startswith(b"250")
    sock.sendall(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
    replies = b""
    while b"354 " not in replies:
        chunk = recv_reply(sock)
        assert chunk, replies
        replies += chunk
    assert replies.count(b"250 ") == 2, replies


def test_client_idle_in_the_middle_of_data_gets_421_after_data_timeout(
    tmp_path: Path,
) -> None:
    """data_timeout (not the shorter command_timeout) governs the wait inside DATA; when
    it passes, the core's timeout reply is sent and the connection closed."""
    command_timeout, data_timeout = 0.5, 2.0
    relay = make_relay(
        tmp_path, workers=1,
        inbound=f"command_timeout = {command_timeout}\ndata_timeout = {data_timeout}\n"
                "min_data_rate = 0",
    )
    relay.start()
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            open_data(s)
            s.sendall(b"Subject: half\r\n\r\nthe first half of the body\r\n")
            started = time.monotonic()
            reply = recv_reply(s, timeout=data_timeout + 10)
            elapsed = time.monotonic() - started
            assert reply == b"421 4.4.2 relay.test Error: timeout exceeded\r\n", reply
            assert elapsed >= data_timeout - 0.1, elapsed  # RFC 5321: "at least"
            assert elapsed < data_timeout + 3, elapsed
            s.settimeout(5)
            assert s.recv(10) == b""  # and the connection is closed
    finally:
        relay.stop()
    # Nothing half-received was queued.
    assert "queued as" not in relay.log()


def test_a_session_timing_out_in_data_leaves_its_neighbours_alone(tmp_path: Path) -> None:
    """Another session on the same worker, open across the timeout, still works after
    it; the worker is not restarted."""
    relay = make_relay(tmp_path, workers=1,
                       inbound="command_timeout = 30\ndata_timeout = 0.5\nmin_data_rate = 0")
    relay.start()
    try:
        workers = relay.workers()
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as neighbour:
            assert neighbour.ehlo("neighbour.test")[0] == 250
            with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
                open_data(s)
                reply = recv_reply(s, timeout=10)
                assert reply.startswith(b"421 4.4.2 "), reply
                s.settimeout(5)
                assert s.recv(10) == b""
            # The neighbour's session is intact.
            try:
                assert neighbour.noop()[0] == 250
                assert neighbour.sendmail("a@sender.test", ["b@dest.test"],
                                          b"Subject: n\r\n\r\nx\r\n") == {}
            except smtplib.SMTPServerDisconnected as e:
                raise AssertionError(
                    f"the neighbour's session was cut: {e}\n{log_after_failure(relay)}"
                ) from e
        assert_worker_intact(relay, workers)
    finally:
        relay.stop()


def test_a_command_timeout_does_not_restart_the_worker(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, workers=1, inbound="command_timeout = 0.5")
    relay.start()
    try:
        workers = relay.workers()
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            assert recv_reply(s).startswith(b"220 ")
            assert recv_reply(s) == b"421 4.4.2 relay.test Error: timeout exceeded\r\n"
            s.settimeout(5)
            assert s.recv(10) == b""
        assert_worker_intact(relay, workers)
    finally:
        relay.stop()


def trickle_until_reply(sock: socket.socket, data: bytes, gap: float,
                        give_up: float) -> tuple[bytes, float]:
    """Send ``data`` one byte per ``gap`` seconds (cycling) until the server answers;
    returns what it sent and when (monotonic), or raises after ``give_up`` seconds."""
    sock.setblocking(False)
    deadline = time.monotonic() + give_up
    i = 0
    while time.monotonic() < deadline:
        sock.send(data[i % len(data) : i % len(data) + 1])
        i += 1
        readable, _, _ = select.select([sock], [], [], gap)
        if readable:
            sock.settimeout(5)
            return recv_reply(sock), time.monotonic()
    raise AssertionError(f"no reply after {give_up}s of trickling {i} bytes")


def test_a_command_trickled_byte_by_byte_times_out_as_a_whole(tmp_path: Path) -> None:
    """command_timeout bounds a whole command line, not each byte of it: a client
    sending a byte every 0.2 s (each well inside the 1 s timeout) is cut off about 1 s
    after the line began."""
    relay = make_relay(tmp_path, workers=1, inbound="command_timeout = 1.0")
    relay.start()
    try:
        workers = relay.workers()
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            assert recv_reply(s).startswith(b"220 ")
            started = time.monotonic()
            reply, at = trickle_until_reply(s, b"NOOP ", gap=0.2, give_up=8.0)
            assert reply == b"421 4.4.2 relay.test Error: timeout exceeded\r\n"
            assert 1.0 <= at - started < 1.0 + 2 * WATCH_TICK_MAX
        assert_worker_intact(relay, workers)
    finally:
        relay.stop()


def test_shutdown_of_an_idle_session_lets_a_transaction_on_the_same_worker_finish(
    tmp_path: Path,
) -> None:
    """SIGTERM stops idle sessions through the same path as a timeout (the session's
    scope is cancelled, then a farewell 421): that must not cut the open transaction of
    another session on the same worker, which may finish its message."""
    relay = make_relay(tmp_path, workers=1)
    relay.start()
    busy = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
    try:
        busy.ehlo("busy.test")
        busy.mail("a@sender.test")
        assert busy.rcpt("b@dest.test")[0] == 250
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as idle:
            assert recv_reply(idle).startswith(b"220 ")
            relay.signal(signal.SIGTERM)
            assert recv_reply(idle, timeout=10) == (
                b"421 4.3.2 relay.test Service shutting down\r\n"
            )
            idle.settimeout(5)
            assert idle.recv(10) == b""
        try:
            code, msg = busy.data(b"Subject: last\r\n\r\nbody\r\n")
        except smtplib.SMTPServerDisconnected as e:
            raise AssertionError(
                f"the open transaction was cut: {e}\n{log_after_failure(relay)}"
            ) from e
        assert code == 250, msg
        assert busy.noop()[0] == 421
    finally:
        busy.close()
        relay.stop()
    assert crashes(relay) == [], relay.log()[-4000:]
