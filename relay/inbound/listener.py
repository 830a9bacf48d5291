"""Listening sockets shared by all workers through SO_REUSEPORT.

``trio.open_tcp_listeners`` sets only SO_REUSEADDR, so each worker builds its socket by
hand: every worker binds the same address after the fork and the kernel spreads incoming
connections across them. There is no accept lock and nothing shared between workers.

The supervisor binds them (``bind_listeners``, as root when it is) just before it forks
each worker and closes its own copies right after, and the child takes them over
(``hand_over`` in the child, ``take_listeners`` in the worker): a worker that has given
root up (``server.user``) and is restarted after a crash still gets its port-25 socket.
Each worker still has its own SO_REUSEPORT socket in the group, so the kernel spreads
connections over them as before, and a dead worker's socket is gone with it (its share
goes to the others until it is back), as when each worker bound its own.

``serve_listeners`` is the accept loop. It drains the whole backlog per wake-up (a bulk
injector connects in bursts) and hands each connection to the session handler as a plain
non-blocking socket (see ``relay.wire``); running out of file descriptors pauses
accepting briefly instead of failing, as trio's own loop does.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable

import trio

from relay.config import parse_hostport
from relay.wire import tune_socket

__all__ = ["bind_listeners", "hand_over", "listen_address", "serve_listeners",
           "take_listeners"]

log = logging.getLogger("relay.inbound")

#: Kernel backlog per worker socket; bulk injectors open many connections at once.
BACKLOG = 4096
#: accept() errors that mean "out of resources": wait a little, the backlog keeps the
#: connections (trio.serve_listeners does the same).
_CAPACITY_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_CAPACITY_PAUSE = 0.1
#: accept() errors that belong to one pending connection (accept(2), "Error handling"):
#: skip it and go on with the next.
_CONNECTION_ERRORS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN,
                      errno.ENOPROTOOPT, errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH,
                      errno.EOPNOTSUPP, errno.ENETUNREACH}

Handler = Callable[[socket.socket, tuple[str, int]], Awaitable[None]]


def listen_address(spec: str) -> tuple[str, int]:
    """``"127.0.0.1:2525"`` / ``"[::1]:2525"`` -> (host, port); a port is required."""
    host, port = parse_hostport(spec)
    if port is None:
        raise ValueError(f"listen address {spec!r} needs a port")
    return host, port


def _reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_listeners(specs: list[str]) -> list[socket.socket]:
    """Bind every configured address with SO_REUSEPORT (per worker, after the fork)."""
    listeners: list[socket.socket] = []
    try:
        for spec in specs:
            host, port = listen_address(spec)
            listeners.append(_reuseport_socket(host, port))
    except BaseException:
        for sock in listeners:
            sock.close()
        raise
    return listeners


#: The sockets this process's parent bound for it, by listen spec (see the docstring).
_handed_over: dict[str, list[socket.socket]] = {}


def hand_over(sockets: dict[str, list[socket.socket]]) -> None:
    """In a freshly forked worker: the listening sockets its supervisor bound for it."""
    for spec, socks in sockets.items():
        _handed_over.setdefault(spec, []).extend(socks)


def take_listeners(specs: list[str]) -> list[socket.socket]:
    """The listeners for ``specs``: the handed-over socket of each, else one bound now
    (a worker run without a supervisor)."""
    taken: list[socket.socket] = []
    try:
        for spec in specs:
            pending = _handed_over.get(spec)
            taken.append(pending.pop(0) if pending else bind_listeners([spec])[0])
    except BaseException:
        for sock in taken:
            sock.close()
        raise
    return taken


async def serve_listeners(listeners: list[socket.socket], handler: Handler,
                          handler_nursery: trio.Nursery, *,
                          task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                          ) -> None:
    """Accept on every listener until cancelled, starting ``handler(sock, peer)`` in
    ``handler_nursery`` for each connection. The listening sockets are closed when this
    returns, so a draining worker's share of new connections is refused, not left in a
    backlog nobody reads."""
    try:
        async with trio.open_nursery() as nursery:
            for sock in listeners:
                nursery.start_soon(_accept_loop, sock, handler, handler_nursery)
            task_status.started()
    finally:
        for sock in listeners:
            trio.lowlevel.notify_closing(sock)
            sock.close()


async def _accept_loop(listener: socket.socket, handler: Handler,
                       handler_nursery: trio.Nursery) -> None:
    while True:
        await trio.lowlevel.wait_readable(listener)
        while True:
            try:
                sock, peer = listener.accept()
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in _CAPACITY_ERRORS:
                    log.error("accept on %s: %s; pausing %.1fs", listener.getsockname(),
                              e.strerror, _CAPACITY_PAUSE)
                    await trio.sleep(_CAPACITY_PAUSE)
                    break
                if e.errno in _CONNECTION_ERRORS:
                    continue
                raise
            try:
                tune_socket(sock)
            except OSError:  # reset between accept and setsockopt: nothing to serve
                sock.close()
                continue
            handler_nursery.start_soon(handler, sock, peer)
