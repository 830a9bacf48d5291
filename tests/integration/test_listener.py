"""``bind_listeners`` + ``serve_listeners`` over real loopback sockets, inside trio.

Clients are real TCP connections; the handler reports what it was given. Every test is
bounded by ``trio.fail_after`` and synchronises with events, never with sleeps.
"""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from relay.inbound.listener import bind_listeners, serve_listeners
from relay.wire import Wire

#: A hang (e.g. a wait that nothing bounds) fails the test instead of the run.
pytestmark = pytest.mark.timeout(30)

LOOPBACK = "127.0.0.1"
Peer = tuple[str, int]


def spec(host: str = LOOPBACK) -> str:
    """A listen address on a currently free port (the listener rejects port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class Recorder:
    """A handler that answers each client with the peer address it was handed (so the
    client can check it is its own), records it, and closes the connection."""

    def __init__(self, label: str = "") -> None:
        self.label = label
        self.peers: list[Peer] = []
        self.blocking: list[bool] = []
        self.changed = trio.Event()

    async def __call__(self, sock: socket.socket, peer: Peer) -> None:
        self.blocking.append(sock.getblocking())
        wire = Wire(sock)
        try:
            await wire.send(f"{self.label}|{peer[0]}|{peer[1]}\n".encode())
        finally:
            await wire.aclose()
        self.peers.append(peer)
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        while len(self.peers) < count:
            await self.changed.wait()


async def client(port: int, host: str = LOOPBACK) -> tuple[Peer, str, Peer]:
    """Connect, read the handler's line to EOF: (our address, label, peer it was given)."""
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        ours = stream.socket.getsockname()[:2]
        data = b""
        while chunk := await stream.receive_some(1024):
            data += chunk
    label, ip, peer_port = data.decode().rstrip("\n").split("|")
    return (ours[0], ours[1]), label, (ip, int(peer_port))


async def run_clients(count: int, port: int, host: str = LOOPBACK) -> list[tuple[Peer, str, Peer]]:
    """``count`` clients at once."""
    results: list[tuple[Peer, str, Peer]] = []

    async def one() -> None:
        results.append(await client(port, host))

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)
    return results


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def assert_refused(port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((LOOPBACK, port), timeout=2).close()


Handler = Callable[[socket.socket, Peer], Awaitable[None]]


async def test_many_simultaneous_clients_each_reach_the_handler_with_their_address() -> None:
    listeners = bind_listeners([spec()])
    port = port_of(listeners[0])
    handler = Recorder()
    with trio.fail_after(20):
        async with trio.open_nursery() as handlers:
            await handlers.start(serve_listeners, listeners, handler, handlers)
            results = await run_clients(50, port)
            await handler.wait_for(50)
            handlers.cancel_scope.cancel()
    assert len(results) == 50
    for ours, _, given in results:
        assert given == ours  # the handler got this client's own address
    assert sorted(handler.peers) == sorted(ours for ours, _, _ in results)
    assert len(set(handler.peers)) == 50
    assert handler.blocking == [False] * 50  # handed over non-blocking (tune_socket)


async def test_a_backlog_queued_before_serving_is_drained() -> None:
    """Connections the kernel completed while nobody accepted are all handed over."""
    listeners = bind_listeners([spec()])
    port = port_of(listeners[0])
    handler = Recorder()
    waiting = [socket.create_connection((LOOPBACK, port), timeout=5) for _ in range(40)]
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as handlers:
                await handlers.start(serve_listeners, listeners, handler, handlers)
                await handler.wait_for(40)
                handlers.cancel_scope.cancel()
        assert sorted(handler.peers) == sorted(s.getsockname()[:2] for s in waiting)
        for s in waiting:
            s.settimeout(5)
            line = b""
            while chunk := s.recv(1024):
                line += chunk
            assert line.endswith(f"|{s.getsockname()[1]}\n".encode())
    finally:
        for s in waiting:
            s.close()


async def test_cancelling_serve_closes_the_listeners_but_not_the_sessions() -> None:
    listeners = bind_listeners([spec()])
    port = port_of(listeners[0])
    started, release = trio.Event(), trio.Event()
    finished: list[Peer] = []

    async def session(sock: socket.socket, peer: Peer) -> None:
        wire = Wire(sock)
        try:
            started.set()
            await release.wait()
            await wire.send(b"bye\n")
            finished.append(peer)
        finally:
            await wire.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as accepting:
                await accepting.start(serve_listeners, listeners, session, handlers)
                stream = await trio.open_tcp_stream(LOOPBACK, port)
                await started.wait()
                accepting.cancel_scope.cancel()
            # serve_listeners has returned: the listening socket is gone...
            assert listeners[0].fileno() == -1
            assert_refused(port)
            # ...while the running session goes on undisturbed.
            assert finished == []
            release.set()
            assert await stream.receive_some(1024) == b"bye\n"
            await stream.aclose()
    assert len(finished) == 1


async def test_serve_closes_the_listeners_when_its_nursery_fails() -> None:
    listeners = bind_listeners([spec(), spec()])
    ports = [port_of(s) for s in listeners]

    class Boom(Exception):
        pass

    async def bad_handler(sock: socket.socket, peer: Peer) -> None:
        sock.close()
        raise Boom

    with trio.fail_after(10), pytest.RaisesGroup(Boom, flatten_subgroups=True):
        async with trio.open_nursery() as handlers:
            await handlers.start(serve_listeners, listeners, bad_handler, handlers)
            socket.create_connection((LOOPBACK, ports[0]), timeout=5).close()
    assert [s.fileno() for s in listeners] == [-1, -1]
    for port in ports:
        assert_refused(port)


async def test_every_listener_of_a_list_is_served() -> None:
    listeners = bind_listeners([spec(), spec()])
    ports = [port_of(s) for s in listeners]
    assert ports[0] != ports[1]
    handler = Recorder()
    with trio.fail_after(20):
        async with trio.open_nursery() as handlers:
            await handlers.start(serve_listeners, listeners, handler, handlers)
            for port in ports:
                ours, _, given = await client(port)
                assert given == ours
            handlers.cancel_scope.cancel()
    assert len(handler.peers) == 2


async def test_two_sockets_on_one_port_share_connections_via_reuseport() -> None:
    """Two workers' sockets on the same address: the kernel spreads clients over both,
    and when one stops serving, the other gets every new connection."""
    (first,) = bind_listeners([spec()])
    port = port_of(first)
    (second,) = bind_listeners([f"{LOOPBACK}:{port}"])  # would be EADDRINUSE without it
    for sock in (first, second):
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    a, b = Recorder("a"), Recorder("b")
    with trio.fail_after(30):
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as serving_a:
                await serving_a.start(serve_listeners, [first], a, handlers)
                await handlers.start(serve_listeners, [second], b, handlers)
                results = await run_clients(64, port)
                await a.wait_for(1)
                await b.wait_for(1)
                serving_a.cancel_scope.cancel()
            labels = Counter(label for _, label, _ in results)
            # 64 connections hashed over two sockets: both get some (all on one side
            # would have probability 2**-63).
            assert labels["a"] >= 1 and labels["b"] >= 1, labels
            assert labels["a"] + labels["b"] == 64
            for ours, _, given in results:
                assert given == ours
            # "a" is closed: no new connection is lost or refused, all go to "b".
            assert first.fileno() == -1
            later = await run_clients(20, port)
            assert Counter(label for _, label, _ in later) == {"b": 20}
            handlers.cancel_scope.cancel()
    assert len(a.peers) == labels["a"]
    assert len(b.peers) == labels["b"] + 20


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback")
async def test_ipv6_listener() -> None:
    listeners = bind_listeners([spec("::1")])
    port = port_of(listeners[0])
    assert listeners[0].getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    handler = Recorder()
    with trio.fail_after(10):
        async with trio.open_nursery() as handlers:
            await handlers.start(serve_listeners, listeners, handler, handlers)
            ours, _, given = await client(port, "::1")
            handlers.cancel_scope.cancel()
    assert given == ours and ours[0] == "::1"


def test_bind_listeners_needs_a_port() -> None:
    with pytest.raises(ValueError, match="needs a port"):
        bind_listeners([LOOPBACK])
