"""``relay.wire.Wire`` over real sockets (loopback TCP and Unix socket pairs).

The peer side never goes through ``Wire``: it is a plain stdlib socket or a trio stream,
so a bug in ``Wire`` cannot cancel itself out. Every test is bounded by
``trio.fail_after``; nothing sleeps to synchronise (``wait_all_tasks_blocked`` and events
say when a task is parked).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import ssl
import struct
from collections.abc import Callable, Iterator

import pytest
import trio
import trio.testing
import trustme

from relay.wire import _MAX_STREAK, _TLS_CLOSE_WAIT, Wire, tune_socket

#: A hang (e.g. a wait that nothing bounds) fails the test instead of the run.
pytestmark = pytest.mark.timeout(30)

LOOPBACK = "127.0.0.1"
SMALL_BUFFER = 64 * 1024

Pair = tuple[socket.socket, socket.socket]


def tcp_pair() -> Pair:
    """(ours, peer): an accepted loopback TCP connection, ours tuned like the relay's."""
    with socket.create_server((LOOPBACK, 0)) as listener:
        peer = socket.create_connection(listener.getsockname(), timeout=5)
        ours, _ = listener.accept()
    tune_socket(ours)
    return ours, peer


def unix_pair() -> Pair:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    return ours, peer


@pytest.fixture(params=[tcp_pair, unix_pair], ids=["tcp", "unix"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    make: Callable[[], Pair] = request.param
    ours, peer = make()
    try:
        yield ours, peer
    finally:
        ours.close()
        peer.close()


@pytest.fixture
def tcp() -> Iterator[Pair]:
    ours, peer = tcp_pair()
    try:
        yield ours, peer
    finally:
        ours.close()
        peer.close()


def small_buffers(ours: socket.socket, peer: socket.socket) -> None:
    """Fixed (not autotuned) buffers, so "much larger than the buffers" is certain."""
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_BUFFER)


def fill(sock: socket.socket) -> int:
    """Write into a non-blocking socket until its buffers are full; bytes written."""
    total = 0
    chunk = b"\0" * 65536
    while True:
        try:
            total += sock.send(chunk)
        except BlockingIOError:
            return total


async def fill_until_stuck(sock: socket.socket, quiet: float = 0.3) -> None:
    """``fill`` until the socket stays unwritable for ``quiet`` seconds: right after a
    full buffer, TCP still moves queued bytes into the peer's window for a while."""
    with trio.fail_after(10):
        while True:
            fill(sock)
            with trio.move_on_after(quiet) as scope:
                await trio.lowlevel.wait_writable(sock)
            if scope.cancelled_caught:
                return


# -- recv -------------------------------------------------------------------------------


async def test_recv_returns_data_then_empty_at_eof(pair: Pair) -> None:
    ours, peer = pair
    wire = Wire(ours)
    with trio.fail_after(5):
        peer.sendall(b"EHLO client.test\r\n")
        got = b""
        while len(got) < 18:
            chunk = await wire.recv(1024)
            assert chunk, "EOF before the data"
            got += chunk
        assert got == b"EHLO client.test\r\n"
        peer.shutdown(socket.SHUT_WR)
        assert await wire.recv(1024) == b""
        # EOF is sticky, with or without try_first.
        assert await wire.recv(1024, try_first=True) == b""


@pytest.mark.parametrize("try_first", [False, True])
async def test_recv_on_an_empty_socket_waits_for_data_that_arrives_later(
    pair: Pair, try_first: bool,
) -> None:
    ours, peer = pair
    wire = Wire(ours)
    result: list[bytes] = []

    async def reader() -> None:
        result.append(await wire.recv(1024, try_first=try_first))

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert result == []  # parked, not spinning and not returning b""
            peer.sendall(b"QUIT\r\n")
    assert result == [b"QUIT\r\n"]


async def test_recv_honours_the_size_limit(pair: Pair) -> None:
    ours, peer = pair
    wire = Wire(ours)
    peer.sendall(b"0123456789")
    with trio.fail_after(5):
        assert await wire.recv(4) == b"0123"
        assert await wire.recv(4, try_first=True) == b"4567"
        assert await wire.recv(100, try_first=True) == b"89"


async def test_recv_without_try_first_always_yields(pair: Pair) -> None:
    ours, peer = pair
    wire = Wire(ours)
    peer.sendall(b"x" * 100)
    with trio.fail_after(5):
        for _ in range(5):
            with trio.testing.assert_checkpoints():
                assert await wire.recv(10) == b"x" * 10


async def test_try_first_reads_without_yielding_but_yields_every_max_streak(
    pair: Pair,
) -> None:
    ours, peer = pair
    wire = Wire(ours)
    rounds = 3
    reads = rounds * (_MAX_STREAK + 1)
    peer.sendall(b"y" * reads)
    with trio.fail_after(5):
        for i in range(reads):
            if i % (_MAX_STREAK + 1) == _MAX_STREAK:
                with trio.testing.assert_checkpoints():
                    assert await wire.recv(1, try_first=True) == b"y"
            else:
                with trio.testing.assert_no_checkpoints():
                    assert await wire.recv(1, try_first=True) == b"y"


async def test_a_client_keeping_the_socket_full_cannot_starve_other_tasks(
    pair: Pair,
) -> None:
    """A reader looping ``recv(try_first=True)`` over a socket that is never empty still
    lets a concurrent task run (the ``_MAX_STREAK`` yield)."""
    ours, peer = pair
    wire = Wire(ours)
    reads, size = 900, 16
    payload = os.urandom(reads * size)
    peer.sendall(payload)  # all queued before the first read (fits the default buffers)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    got = bytearray()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.lowlevel.checkpoint()  # let the ticker start
            before = ticks
            while len(got) < len(payload):
                chunk = await wire.recv(size, try_first=True)
                assert chunk
                got += chunk
            progress = ticks - before
            nursery.cancel_scope.cancel()
    assert bytes(got) == payload
    # One yield per _MAX_STREAK + 1 reads: about 100 here. Without the streak limit the
    # ticker would not run at all while the reader finds data.
    expected_yields = reads // (_MAX_STREAK + 1)
    assert progress >= expected_yields // 2, (progress, expected_yields)
    # ...and the fast path is real: far fewer yields than reads.
    assert progress <= reads // 2, (progress, reads)


async def test_recv_on_a_silent_peer_is_cancellable(pair: Pair) -> None:
    ours, peer = pair
    wire = Wire(ours)
    for try_first in (False, True):
        start = trio.current_time()
        with trio.move_on_after(0.2) as scope:
            await wire.recv(1024, try_first=try_first)
        elapsed = trio.current_time() - start
        assert scope.cancelled_caught
        assert elapsed < 2.0, elapsed
    # A cancelled wait consumed nothing: the wire still works.
    peer.sendall(b"still here")
    with trio.fail_after(5):
        assert await wire.recv(1024) == b"still here"


async def test_a_deadline_bounds_only_a_wait_that_happens(pair: Pair) -> None:
    """Data already there is returned (and a small send written) with no deadline
    checked at all, even a passed one; a wait past the deadline raises TooSlowError,
    consuming nothing."""
    ours, peer = pair
    wire = Wire(ours)
    peer.sendall(b"250 ok\r\n")
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(ours)  # the reply is there before recv
        past = trio.current_time() - 1
        assert await wire.recv(1024, deadline=past) == b"250 ok\r\n"
        await wire.send(b"MAIL FROM:<>\r\n", deadline=past)
        peer.settimeout(5)
        assert peer.recv(100) == b"MAIL FROM:<>\r\n"
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            await wire.recv(1024, deadline=start + 0.2)
        assert 0.2 <= trio.current_time() - start < 2.0
        peer.sendall(b"still here")
        assert await wire.recv(1024, deadline=trio.current_time() + 5) == b"still here"


async def test_a_deadline_bounds_a_send_blocked_on_a_full_buffer(pair: Pair) -> None:
    ours, peer = pair
    small_buffers(ours, peer)
    wire = Wire(ours)
    start = trio.current_time()
    with trio.fail_after(5), pytest.raises(trio.TooSlowError):
        await wire.send(b"z" * (4 * 1024 * 1024), deadline=start + 0.2)
    assert 0.2 <= trio.current_time() - start < 2.0


async def test_recv_after_a_reset_raises_connection_error(tcp: Pair) -> None:
    ours, peer = tcp
    wire = Wire(ours)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()  # RST
    with trio.fail_after(5), pytest.raises(ConnectionResetError):
        await wire.recv(1024)


# -- send -------------------------------------------------------------------------------


async def test_send_much_larger_than_the_buffers_arrives_intact(pair: Pair) -> None:
    ours, peer = pair
    small_buffers(ours, peer)
    wire = Wire(ours)
    payload = os.urandom(8 * 1024 * 1024)
    sent = trio.Event()
    received = hashlib.sha256()
    count = 0

    async def sender() -> None:
        await wire.send(payload)
        sent.set()

    peer_stream = trio.SocketStream(trio.socket.from_stdlib_socket(peer))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            # Nobody reads yet: the sender must be parked on a full buffer, not done.
            await trio.testing.wait_all_tasks_blocked()
            assert not sent.is_set()
            while count < len(payload):
                chunk = await peer_stream.receive_some(65536)
                assert chunk, "EOF before the whole payload"
                received.update(chunk)
                count += len(chunk)
        assert sent.is_set()
    assert count == len(payload)
    assert received.digest() == hashlib.sha256(payload).digest()


async def test_send_of_a_small_reply_does_not_wait(pair: Pair) -> None:
    ours, peer = pair
    wire = Wire(ours)
    with trio.fail_after(5):
        with trio.testing.assert_no_checkpoints():
            await wire.send(b"250 2.0.0 Ok\r\n")
        peer.settimeout(5)
        assert peer.recv(100) == b"250 2.0.0 Ok\r\n"


async def test_send_blocked_on_a_full_buffer_is_cancellable(pair: Pair) -> None:
    ours, peer = pair
    small_buffers(ours, peer)
    wire = Wire(ours)
    start = trio.current_time()
    with trio.move_on_after(0.2) as scope:
        await wire.send(b"z" * (4 * 1024 * 1024))
    assert scope.cancelled_caught
    assert trio.current_time() - start < 2.0


async def test_send_to_a_closed_peer_raises_os_error(tcp: Pair) -> None:
    ours, peer = tcp
    wire = Wire(ours)
    peer.close()
    with trio.fail_after(5), pytest.raises(ConnectionError):
        # The first segment draws the RST; the rest of the write must fail, not hang.
        for _ in range(100):
            await wire.send(b"w" * 65536)


# -- aclose -----------------------------------------------------------------------------


async def test_aclose_closes_the_socket_and_is_idempotent(pair: Pair) -> None:
    ours, peer = pair
    wire = Wire(ours)
    with trio.fail_after(5):
        await wire.aclose()
        assert ours.fileno() == -1
        await wire.aclose()
        await wire.aclose(graceful=False)
        assert ours.fileno() == -1
    peer.settimeout(5)
    assert peer.recv(10) == b""  # the peer sees the close


async def test_aclose_wakes_a_task_waiting_in_recv(pair: Pair) -> None:
    ours, _ = pair
    wire = Wire(ours)
    outcome: list[BaseException] = []

    async def reader() -> None:
        try:
            await wire.recv(1024)
        except BaseException as e:
            outcome.append(e)
            if not isinstance(e, trio.ClosedResourceError):
                raise

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            await wire.aclose()
    assert len(outcome) == 1 and isinstance(outcome[0], trio.ClosedResourceError)
    assert ours.fileno() == -1


async def test_aclose_of_a_fresh_wire_tells_trio_only_once_it_waited(
        pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh socket nobody waited on is closed without ``notify_closing`` (the epoll
    unregistration would fail); once the Wire waited on it, trio is told. A fd number
    reused after either close still works (no stale registration)."""
    told: list[int] = []
    real = trio.lowlevel.notify_closing
    monkeypatch.setattr(trio.lowlevel, "notify_closing",
                        lambda sock: (told.append(sock.fileno()), real(sock))[1])
    ours, peer = pair
    wire = Wire(ours, fresh=True)
    with trio.fail_after(5):
        peer.sendall(b"ready")
        assert await wire.recv(16) == b"ready"  # there already: no wait
        await wire.aclose()
        assert told == [] and ours.fileno() == -1

        ours2, peer2 = tcp_pair()
        wire2 = Wire(ours2, fresh=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wire2.recv, 16)  # nothing there: it waits in epoll
            await trio.testing.wait_all_tasks_blocked()
            peer2.sendall(b"late")
        fd = ours2.fileno()
        await wire2.aclose()
        assert told == [fd]

        ours3, peer3 = tcp_pair()  # likely the same fd numbers again
        wire3 = Wire(ours3, fresh=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wire3.recv, 16)
            await trio.testing.wait_all_tasks_blocked()
            peer3.sendall(b"again")
        await wire3.aclose()
    for sock in (peer2, peer3):
        sock.close()


# -- TLS (after STARTTLS) ---------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("relay.test").configure_cert(ctx)
    return ctx


@pytest.fixture
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def start_tls(
    wire: Wire, peer: socket.socket, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> trio.SSLStream[trio.SocketStream]:
    """Handshake both sides the way the session does (SSLStream over transport());
    returns the client's stream."""
    server = trio.SSLStream(wire.transport(), server_ctx, server_side=True)
    client = trio.SSLStream(trio.SocketStream(trio.socket.from_stdlib_socket(peer)),
                            client_ctx, server_hostname="relay.test")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.do_handshake)
        nursery.start_soon(client.do_handshake)
    wire.upgrade(server)
    return client


async def test_tls_round_trip_through_the_wire(
    tcp: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    ours, peer = tcp
    wire = Wire(ours)
    with trio.fail_after(10):
        client = await start_tls(wire, peer, server_ctx, client_ctx)
        await client.send_all(b"EHLO client.test\r\n")
        assert await wire.recv(1024) == b"EHLO client.test\r\n"
        await wire.send(b"250 relay.test\r\n")
        assert await client.receive_some(1024) == b"250 relay.test\r\n"
        # A body bigger than one TLS record and than the buffers, both ways.
        body = os.urandom(1024 * 1024)
        got = bytearray()

        async def read_all() -> None:
            while len(got) < len(body):
                chunk = await wire.recv(65536, try_first=True)
                assert chunk
                got.extend(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await client.send_all(body)
        assert bytes(got) == body
        # EOF through TLS: the client's close_notify ends the stream cleanly.
        await client.aclose()
        assert await wire.recv(1024) == b""
        await wire.aclose()
    assert ours.fileno() == -1


async def test_a_deadline_bounds_a_wait_over_tls(
    tcp: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    ours, peer = tcp
    wire = Wire(ours)
    with trio.fail_after(10):
        client = await start_tls(wire, peer, server_ctx, client_ctx)
        start = trio.current_time()
        with pytest.raises(trio.TooSlowError):
            await wire.recv(1024, deadline=start + 0.2)
        assert trio.current_time() - start >= 0.2
        await client.send_all(b"QUIT\r\n")
        assert await wire.recv(1024, deadline=trio.current_time() + 5) == b"QUIT\r\n"
        await wire.aclose()


async def test_tls_aclose_does_not_hang_when_the_peer_is_gone(
    tcp: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    ours, peer = tcp
    wire = Wire(ours)
    with trio.fail_after(10):
        client = await start_tls(wire, peer, server_ctx, client_ctx)
        await trio.aclose_forcefully(client)  # the client vanishes without close_notify
        assert peer.fileno() == -1
    start = trio.current_time()
    with trio.fail_after(_TLS_CLOSE_WAIT + 2):
        await wire.aclose()
        await wire.aclose()  # twice is fine after TLS too
    assert trio.current_time() - start < _TLS_CLOSE_WAIT + 1
    assert ours.fileno() == -1


async def test_tls_aclose_to_a_stalled_peer_is_bounded(
    tcp: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    """The peer is connected but reads nothing, so close_notify cannot be written:
    ``aclose`` gives up after ``_TLS_CLOSE_WAIT`` and still closes the socket."""
    ours, peer = tcp
    small_buffers(ours, peer)
    wire = Wire(ours)
    with trio.fail_after(10):
        await start_tls(wire, peer, server_ctx, client_ctx)
        # Raw bytes under the TLS layer: the peer never reads them anyway.
        await fill_until_stuck(ours)
    start = trio.current_time()
    with trio.fail_after(_TLS_CLOSE_WAIT + 3):
        await wire.aclose()
    elapsed = trio.current_time() - start
    assert ours.fileno() == -1
    # It did wait for close_notify (the scenario is real), but not longer than allowed.
    assert _TLS_CLOSE_WAIT - 0.1 <= elapsed < _TLS_CLOSE_WAIT + 1.0, elapsed


async def test_tls_aclose_not_graceful_is_immediate(
    tcp: Pair, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext
) -> None:
    ours, peer = tcp
    small_buffers(ours, peer)
    wire = Wire(ours)
    with trio.fail_after(10):
        await start_tls(wire, peer, server_ctx, client_ctx)
        await fill_until_stuck(ours)
    start = trio.current_time()
    with trio.fail_after(2):
        await wire.aclose(graceful=False)
    assert trio.current_time() - start < _TLS_CLOSE_WAIT / 2
    assert ours.fileno() == -1


# -- tune_socket ----------------------------------------------------------------------


def test_tune_socket_makes_a_tcp_socket_non_blocking_without_nagle() -> None:
    with socket.create_server((LOOPBACK, 0)) as listener:
        peer = socket.create_connection(listener.getsockname(), timeout=5)
        sock, _ = listener.accept()
    with sock, peer:
        sock.setblocking(True)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        tune_socket(sock)
        assert sock.getblocking() is False
        assert fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        with pytest.raises(BlockingIOError):
            sock.recv(10)  # nothing sent: a non-blocking read fails at once


def test_tune_socket_accepts_a_unix_socket() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(True)
        tune_socket(a)  # no TCP_NODELAY there: must not raise
        assert a.getblocking() is False
        assert fcntl.fcntl(a.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
