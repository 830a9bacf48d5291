"""Listening sockets shared by all workers through SO_REUSEPORT.

``trio.open_tcp_listeners`` sets only SO_REUSEADDR, so each worker builds its socket by
hand: every worker binds the same address after the fork and the kernel spreads incoming
connections across them. There is no accept lock and nothing shared between workers.
"""

from __future__ import annotations

import socket

import trio

from relay.config import parse_hostport

__all__ = ["bind_listeners", "listen_address"]

#: Kernel backlog per worker socket; bulk injectors open many connections at once.
BACKLOG = 4096


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


def bind_listeners(specs: list[str]) -> list[trio.SocketListener]:
    """Bind every configured address with SO_REUSEPORT (call inside trio.run, per worker)."""
    listeners: list[trio.SocketListener] = []
    try:
        for spec in specs:
            host, port = listen_address(spec)
            sock = trio.socket.from_stdlib_socket(_reuseport_socket(host, port))
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners
