"""HTTP/1.1 serving on trio with h11: one task per connection, keep-alive, bounded.

The protocol is h11's (sans-I/O, python-hyper): this module only moves bytes, enforces
the limits and turns each complete request into one ``await app.handle(request)``. The
application sees whole requests (headers and body read, at most ``max_body`` bytes) and
answers with a whole ``Response``; nothing here knows what the endpoints do.

Limits, and what the client gets when it passes one:

* header section over ``MAX_HEADER_BYTES``: 431; malformed HTTP: 400 (h11's verdict);
* a body over ``max_body`` (by ``Content-Length`` before reading it, or while reading a
  chunked one): 413, and the connection is closed (its body is not read);
* a request not complete within ``request_timeout`` from its first byte: 408 and close;
  a keep-alive connection idle for ``keepalive_timeout``: closed quietly;
* more than ``max_connections`` open on this worker: 503 and close;
* ``Expect: 100-continue`` gets its ``100 Continue`` only once the request has passed
  the size check (curl sends it for bodies over 1 KiB and would otherwise wait 1 s).

A fault in the application is a 500 with a JSON error for that request (logged with its
traceback); the connection and the worker go on. Draining (shutdown) closes idle
connections at once and answers in-flight requests with ``Connection: close``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import parse_qsl, urlsplit

import h11
import msgspec
import trio

__all__ = [
    "HttpApp",
    "HttpRegistry",
    "Request",
    "Response",
    "error_detail",
    "error_response",
    "json_response",
    "serve_http",
]

log = logging.getLogger("relay.http")

MAX_HEADER_BYTES = 64 * 1024
RECV_SIZE = 64 * 1024
TLS_HANDSHAKE_TIMEOUT = 30.0
#: How long a farewell (408, 413, 503) may take to leave.
FAREWELL_TIMEOUT = 5.0
#: Lingering close: how long, and how much, of what a client still sends is read.
LINGER_SECONDS = 2.0
LINGER_BYTES = 4 * 1024 * 1024
_json_encode = msgspec.json.Encoder().encode


@dataclass
class Request:
    """One complete HTTP request as the application sees it."""

    method: str
    #: The path, without the query string.
    path: str
    query: dict[str, str]
    #: Header names lower-cased; a repeated header's values joined with ", ".
    headers: dict[str, str]
    body: bytes
    client_ip: str
    tls: bool


@dataclass
class Response:
    """One whole answer; ``body`` is sent with a Content-Length."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)


def json_response(status: int, payload: object,
                  headers: list[tuple[str, str]] | None = None) -> Response:
    """A JSON response (msgspec-encoded)."""
    return Response(status, _json_encode(payload), headers=headers or [])


def error_detail(message: str, code: str, description: str | None = None,
                 field: str | None = None) -> dict[str, str]:
    """One error in SparkPost's shape (``message``, ``code``, and ``description`` and the
    JSON path ``field`` when there are), which every endpoint of ours answers with."""
    detail = {"message": message, "code": code}
    if description is not None:
        detail["description"] = description
    if field is not None:
        detail["field"] = field
    return detail


def error_response(status: int, message: str, code: str, description: str | None = None, *,
                   field: str | None = None,
                   headers: list[tuple[str, str]] | None = None) -> Response:
    """``{"errors": [error_detail(...)]}`` with ``status``."""
    return json_response(status, {"errors": [error_detail(message, code, description, field)]},
                         headers)


def _error(status: int, message: str) -> Response:
    """An error of the HTTP layer itself (its code is the status)."""
    return error_response(status, message, str(status))


class HttpApp(Protocol):
    """What ``serve_http`` serves: limits, an optional TLS context, and the handler."""

    max_body: int
    request_timeout: float
    keepalive_timeout: float
    max_connections: int
    ssl_context: ssl.SSLContext | None

    async def handle(self, request: Request) -> Response: ...


@dataclass
class HttpRegistry:
    """The open HTTP connections of a worker, so shutdown can drain them."""

    connections: set[_Connection] = field(default_factory=set)
    draining: bool = False

    def drain(self) -> None:
        self.draining = True
        for conn in list(self.connections):
            if conn.idle:
                conn.scope.cancel()


class _TooBig(Exception):
    pass


class _Connection:
    def __init__(self, stream: trio.abc.Stream, app: HttpApp, peer: tuple[str, int],
                 tls: bool, registry: HttpRegistry) -> None:
        self.stream = stream
        self.app = app
        self.client_ip = peer[0]
        self.tls = tls
        self.registry = registry
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        #: Waiting for the next request with nothing of it received (drain closes it).
        self.idle = True
        self.scope = trio.CancelScope()

    async def run(self) -> None:
        with self.scope:
            while await self._one_exchange():
                self.h11.start_next_cycle()

    async def _one_exchange(self) -> bool:
        """Serve one request; False when the connection is to be closed."""
        first = self.h11.their_state is h11.IDLE and not self.h11.trailing_data[0]
        self.idle = first
        wait = self.app.keepalive_timeout if first else self.app.request_timeout
        try:
            with trio.fail_after(wait):
                event = await self._next_event()
            if isinstance(event, h11.ConnectionClosed):
                return False
            assert isinstance(event, h11.Request)
            with trio.fail_after(self.app.request_timeout):
                request = await self._read_request(event)
        except trio.TooSlowError:
            if self.h11.their_state is h11.IDLE and self.idle:
                return False  # an idle keep-alive connection: close quietly
            await self._farewell(_error(408, "Request Timeout"))
            return False
        except _TooBig:
            await self._farewell(_error(413, "Request body too large"))
            return False
        except h11.RemoteProtocolError as e:
            status = e.error_status_hint
            if status == 400 and "exceed" in str(e):
                status = 431  # h11: an incomplete head already over the limit
            await self._farewell(_error(status, f"Bad request: {e}"))
            return False
        response = await self._answer(request)
        close = self.registry.draining or self.h11.their_state is not h11.DONE
        await self._send(response, close=close, head_only=request.method == "HEAD")
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def _next_event(self) -> h11.Event | type[h11.PAUSED]:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.stream.receive_some(RECV_SIZE)
            self.idle = False
            self.h11.receive_data(data)

    async def _read_request(self, head: h11.Request) -> Request:
        if sum(len(n) + len(v) + 4 for n, v in head.headers) > MAX_HEADER_BYTES:
            raise h11.RemoteProtocolError("header section exceeds the limit", 431)
        headers: dict[str, str] = {}
        for name, value in head.headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {text}" if key in headers else text
        declared = headers.get("content-length")
        if declared is not None and int(declared) > self.app.max_body:
            raise _TooBig
        if self.h11.they_are_waiting_for_100_continue:
            await self.stream.send_all(self.h11.send(h11.InformationalResponse(
                status_code=100, headers=[])) or b"")
        body = bytearray()
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.app.max_body:
                    raise _TooBig
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # ConnectionClosed mid-body
                raise h11.RemoteProtocolError("connection closed in the request body", 400)
        target = urlsplit(head.target.decode("latin-1"))
        return Request(
            method=head.method.decode("ascii"), path=target.path,
            query=dict(parse_qsl(target.query)), headers=headers, body=bytes(body),
            client_ip=self.client_ip, tls=self.tls,
        )

    async def _answer(self, request: Request) -> Response:
        try:
            return await self.app.handle(request)
        except Exception:
            log.exception("HTTP %s %s from %s failed", request.method, request.path,
                          self.client_ip)
            return _error(500, "Internal error")

    async def _send(self, response: Response, *, close: bool, head_only: bool = False) -> None:
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            *response.headers,
        ]
        if close:
            headers.append(("connection", "close"))
        out = self.h11.send(h11.Response(status_code=response.status, headers=headers)) or b""
        if response.body and not head_only:
            out += self.h11.send(h11.Data(data=response.body)) or b""
        out += self.h11.send(h11.EndOfMessage()) or b""
        await self.stream.send_all(out)

    async def _farewell(self, response: Response) -> None:
        """A last answer on a connection that is then closed; bounded, never raises."""
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        with trio.move_on_after(FAREWELL_TIMEOUT), contextlib.suppress(
                h11.LocalProtocolError, trio.BrokenResourceError, OSError):
            await self._send(response, close=True)


async def serve_http(sock: socket.socket, peer: tuple[str, int],
                     app_ref: Callable[[], HttpApp], registry: HttpRegistry) -> None:
    """Handle one accepted HTTP connection (a non-blocking socket) to the end; never
    raises for client misbehaviour."""
    app = app_ref()
    stream: trio.abc.Stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    try:
        if registry.draining or len(registry.connections) >= app.max_connections:
            conn = _Connection(stream, app, peer, False, registry)
            await conn._farewell(_error(503, "Service Unavailable: too many connections"
                                        if not registry.draining else
                                        "Service Unavailable: shutting down"))
            return
        if app.ssl_context is not None:
            stream = await _handshake(stream, app.ssl_context, peer)
            if stream is None:
                return
        conn = _Connection(stream, app, peer, app.ssl_context is not None, registry)
        registry.connections.add(conn)
        try:
            await conn.run()
        finally:
            registry.connections.discard(conn)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
        log.debug("HTTP connection from %s ended: %s", peer[0], e)
    finally:
        with trio.move_on_after(LINGER_SECONDS + 1.0) as scope:
            scope.shield = True
            await _close(stream)


async def _handshake(stream: trio.abc.Stream, context: ssl.SSLContext,
                     peer: tuple[str, int]) -> trio.SSLStream | None:
    tls = trio.SSLStream(stream, context, server_side=True)
    try:
        with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
            await tls.do_handshake()
    except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as e:
        log.info("HTTPS handshake with %s failed: %s", peer[0], e)
        await trio.aclose_forcefully(stream)
        return None
    return tls


async def _close(stream: trio.abc.Stream) -> None:
    """Close the connection. On plain TCP, a lingering close: our side is shut first and
    what the client still sends is read and dropped for up to ``LINGER_SECONDS`` (a
    client whose request body we did not read would otherwise get a reset that
    destroys our 413/503 before it reads it; Apache and nginx linger the same way)."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                             ssl.SSLError):
        if isinstance(stream, trio.SocketStream):
            await stream.send_eof()
            with trio.move_on_after(LINGER_SECONDS):
                drained = 0
                while drained < LINGER_BYTES:
                    chunk = await stream.receive_some(RECV_SIZE)
                    if not chunk:
                        break
                    drained += len(chunk)
        await stream.aclose()

