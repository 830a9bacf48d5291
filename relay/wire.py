"""The byte pipe under every SMTP conversation: reads and writes as cheap as trio allows.

Why not ``trio.SocketStream``: an SMTP session is many tiny round trips (a new-connection
client costs seven per message), and per operation ``SocketStream`` adds a conflict
detector, an error-translating generator context manager and two checkpoints (one of
them a full pass through the scheduler) on top of the system call. On a loaded 2-core
box that overhead costs more than the system calls themselves. ``Wire`` does the
``recv``/``send`` call and, only when the socket is not ready, one
``wait_readable``/``wait_writable`` trap (``recv`` yields once before, see below);
nothing else.

Contract:

* ``recv(n)`` returns up to ``n`` bytes, ``b""`` at end of input. It first yields to the
  scheduler (the peer is still answering what we just wrote; the other tasks run
  meanwhile), then reads, and only when nothing has come registers with epoll and
  waits. Under load the answer is usually there by then, which saves the epoll
  registration and its wake-up: measured, 5% less CPU per message with a connection
  per message. ``try_first`` (more input is probably queued: the rest of a body) reads
  without yielding, but still yields at least every ``_MAX_STREAK`` reads, so a client
  that keeps the socket full cannot starve the other tasks.
* ``send(data)`` writes everything, waiting only while the socket buffer is full.
* Both take an optional ``deadline`` (trio time): a wait that would outlast it raises
  ``trio.TooSlowError``. The cancel scope that costs is opened only around a wait that
  really happens, so a caller that bounds every wait pays for its timeouts only when
  the peer is slow, not on the many round trips whose answer is already there.
* ``try_send(data)`` writes what the socket takes at once and returns how many bytes
  that was (0 over TLS: only ``send`` writes there). It never waits, so a caller whose
  write nearly always fits needs no timeout around it.
* Both raise ``OSError`` (``ConnectionError`` for resets and broken pipes) when the
  connection fails, and are cancellation points while they wait.
* ``upgrade(stream)`` moves the conversation onto a trio stream (``SSLStream`` after
  STARTTLS, built over ``transport()``); reads and writes then go through that stream,
  whose trio errors (``BrokenResourceError``...) propagate unchanged.
* ``aclose()`` closes the connection: at once on plain TCP, after at most
  ``_TLS_CLOSE_WAIT`` seconds of TLS close_notify otherwise (none with
  ``graceful=False``, for a connection given up on). It never raises. It tells trio the
  socket is closing (``notify_closing``: an epoll unregistration) only when the socket
  may be registered with trio: ``Wire(sock, fresh=True)`` says nobody waited on it
  before, and the Wire knows when it waited itself or handed the socket to a stream.
  Most inbound connections never wait, so this saves a failing system call each.
"""

from __future__ import annotations

import contextlib
import math
import socket
import ssl
from collections.abc import Awaitable, Callable

import trio

__all__ = ["Wire", "tune_socket"]

#: Reads in a row that may return without yielding to the scheduler.
_MAX_STREAK = 8
#: A TLS close_notify to a dead or stalled peer must not hold the task.
_TLS_CLOSE_WAIT = 1.0


def tune_socket(sock: socket.socket) -> None:
    """Prepare an accepted or outgoing TCP socket for a Wire: non-blocking, with Nagle off
    (a reply or a pipelined group must leave at once, not wait for an ACK)."""
    sock.setblocking(False)
    with contextlib.suppress(OSError):  # not TCP (a Unix socket): nothing to tune
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _wait_ready(wait: Callable[[socket.socket], Awaitable[None]],
                      sock: socket.socket, deadline: float) -> None:
    """``await wait(sock)``; ``trio.TooSlowError`` past ``deadline`` (a bare cancel scope,
    not ``trio.fail_at``, whose generator context manager costs twice as much)."""
    if deadline == math.inf:
        await wait(sock)
        return
    with trio.CancelScope(deadline=deadline) as scope:
        await wait(sock)
    if scope.cancelled_caught:
        raise trio.TooSlowError


class Wire:
    """See the module docstring."""

    __slots__ = ("_registered", "_streak", "sock", "stream")

    def __init__(self, sock: socket.socket, *, fresh: bool = False) -> None:
        self.sock = sock
        self.stream: trio.abc.Stream | None = None
        self._streak = 0
        #: may trio's epoll registry know this socket (see ``aclose``)
        self._registered = not fresh

    def transport(self) -> trio.SocketStream:
        """A trio stream over the same socket, for ``trio.SSLStream`` to wrap."""
        self._registered = True
        return trio.SocketStream(trio.socket.from_stdlib_socket(self.sock))

    def upgrade(self, stream: trio.abc.Stream) -> None:
        self.stream = stream

    async def recv(self, n: int, try_first: bool = False, *, deadline: float = math.inf,
                   ) -> bytes:
        if self.stream is not None:  # TLS: not the hot path
            with trio.fail_at(deadline):
                return await self.stream.receive_some(n)
        sock = self.sock
        yielded = not try_first or self._streak >= _MAX_STREAK
        if yielded:
            await trio.lowlevel.checkpoint()
        while True:
            try:
                data = sock.recv(n)
            except BlockingIOError:
                self._registered = True
                await _wait_ready(trio.lowlevel.wait_readable, sock, deadline)
                yielded = True
                continue
            self._streak = 0 if yielded else self._streak + 1
            return data

    async def send(self, data: bytes, *, deadline: float = math.inf) -> None:
        if self.stream is not None:
            with trio.fail_at(deadline):
                await self.stream.send_all(data)
            return
        view = memoryview(data)
        while True:
            sent = self.try_send(view)
            if sent == len(view):
                return
            view = view[sent:]
            self._registered = True
            await _wait_ready(trio.lowlevel.wait_writable, self.sock, deadline)

    def try_send(self, data: bytes | memoryview) -> int:
        if self.stream is not None:
            return 0
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0

    async def aclose(self, *, graceful: bool = True) -> None:
        if self.stream is not None and not graceful:
            await trio.aclose_forcefully(self.stream)
        elif self.stream is not None:
            with trio.move_on_after(_TLS_CLOSE_WAIT) as scope:
                scope.shield = True
                with contextlib.suppress(trio.BrokenResourceError,
                                         trio.ClosedResourceError, OSError, ssl.SSLError):
                    await self.stream.aclose()
        if self.sock.fileno() >= 0:
            if self._registered:
                trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
