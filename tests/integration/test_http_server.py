"""The HTTP/1.1 layer (h11 on trio) over real loopback sockets, with a toy application:
keep-alive, limits and their status codes, 100-continue, faults, draining."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import trio

from bench.peers import free_port
from relay.http.server import HttpRegistry, Request, Response, json_response, serve_http
from relay.inbound.listener import bind_listeners, serve_listeners


@dataclass
class ToyApp:
    max_body: int = 1000
    request_timeout: float = 5.0
    keepalive_timeout: float = 5.0
    max_connections: int = 10
    ssl_context: ssl.SSLContext | None = None
    seen: list[Request] = field(default_factory=list)

    async def handle(self, request: Request) -> Response:
        self.seen.append(request)
        if request.path == "/boom":
            raise RuntimeError("a bug")
        return json_response(200, {"path": request.path, "size": len(request.body),
                                   "query": request.query})


@asynccontextmanager
async def serving(app: ToyApp) -> AsyncIterator[tuple[str, HttpRegistry]]:
    registry = HttpRegistry()
    port = free_port()
    [sock] = bind_listeners([f"127.0.0.1:{port}"])
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_listeners, [sock],
                            lambda s, peer: serve_http(s, peer, lambda: app, registry), nursery)
        yield f"127.0.0.1:{port}", registry
        nursery.cancel_scope.cancel()


async def raw_exchange(addr: str, data: bytes, *, until_close: bool = True) -> bytes:
    host, port = addr.split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    await stream.send_all(data)
    out = b""
    with trio.fail_after(10):
        while True:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            out += chunk
            if not until_close and b"\r\n\r\n" in out:
                break
    await stream.aclose()
    return out


async def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    app = ToyApp()
    async with serving(app) as (addr, _), httpx.AsyncClient(base_url=f"http://{addr}") as c:
        for i in range(3):
            r = await c.post(f"/x?n={i}", content=b"a" * i)
            assert r.status_code == 200
            assert r.json() == {"path": "/x", "size": i, "query": {"n": str(i)}}
    ports = {req.client_ip for req in app.seen}
    assert ports == {"127.0.0.1"} and len(app.seen) == 3


async def test_body_over_the_limit_is_413_before_it_is_read() -> None:
    app = ToyApp(max_body=10)
    async with serving(app) as (addr, _):
        out = await raw_exchange(addr, b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 413 ")
    assert b"connection: close" in out.lower()
    assert app.seen == []


async def test_chunked_body_over_the_limit_is_413() -> None:
    app = ToyApp(max_body=10)
    body = b"8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n"
    async with serving(app) as (addr, _):
        out = await raw_exchange(
            addr, b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    assert out.startswith(b"HTTP/1.1 413 ")
    assert app.seen == []


async def test_malformed_request_is_400_and_huge_header_431() -> None:
    app = ToyApp()
    async with serving(app) as (addr, _):
        bad = await raw_exchange(addr, b"GARBAGE\r\n\r\n")
        huge = await raw_exchange(addr, b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70000
                                  + b"\r\n\r\n")
    assert bad.startswith(b"HTTP/1.1 400 ")
    assert huge.startswith(b"HTTP/1.1 431 ")
    assert app.seen == []


async def test_incomplete_request_gets_408_after_request_timeout() -> None:
    app = ToyApp(request_timeout=0.3)
    async with serving(app) as (addr, _):
        out = await raw_exchange(
            addr, b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
    assert out.startswith(b"HTTP/1.1 408 ")


async def test_idle_keep_alive_connection_is_closed_quietly() -> None:
    app = ToyApp(keepalive_timeout=0.3)
    async with serving(app) as (addr, _):
        out = await raw_exchange(addr, b"")
    assert out == b""


async def test_application_fault_is_500_and_the_connection_goes_on() -> None:
    app = ToyApp()
    async with serving(app) as (addr, _), httpx.AsyncClient(base_url=f"http://{addr}") as c:
        r = await c.get("/boom")
        assert r.status_code == 500
        assert r.json()["errors"][0]["message"] == "Internal error"
        r = await c.get("/fine")
        assert r.status_code == 200


async def test_expect_100_continue_with_curl() -> None:
    app = ToyApp(max_body=100_000)
    async with serving(app) as (addr, _):
        # curl sends Expect: 100-continue for big bodies (over 1 KiB before 8.0, over
        # 1 MiB since) and waits a second for the 100 unless it comes.
        result = await trio.to_thread.run_sync(lambda: subprocess.run(
            ["curl", "-sS", "-v", "--max-time", "10", "-H", "Content-Type: application/json",
             "-H", "Expect: 100-continue", "--expect100-timeout", "8",
             "--data-binary", "@-", f"http://{addr}/up"],
            input=b"x" * 50_000, capture_output=True, timeout=20))
    assert result.returncode == 0, result.stderr
    assert b"Expect: 100-continue" in result.stderr
    assert b"HTTP/1.1 100" in result.stderr
    assert b'"size":50000' in result.stdout


async def test_too_many_connections_get_503() -> None:
    app = ToyApp(max_connections=1)
    async with serving(app) as (addr, _):
        host, port = addr.split(":")
        first = await trio.open_tcp_stream(host, int(port))
        await first.send_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(5):
            assert (await first.receive_some(4096)).startswith(b"HTTP/1.1 200")
        out = await raw_exchange(addr, b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        await first.aclose()
    assert out.startswith(b"HTTP/1.1 503 ")


async def test_drain_closes_idle_connections_and_answers_with_connection_close() -> None:
    app = ToyApp()
    async with serving(app) as (addr, registry):
        host, port = addr.split(":")
        idle = await trio.open_tcp_stream(host, int(port))
        with trio.fail_after(5):
            while not registry.connections:
                await trio.sleep(0.01)
        registry.drain()
        with trio.fail_after(5):
            assert await idle.receive_some(10) == b""
        await idle.aclose()
        out = await raw_exchange(addr, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 503 ")


async def test_head_has_no_body() -> None:
    app = ToyApp()
    async with serving(app) as (addr, _):
        out = await raw_exchange(addr, b"HEAD /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and body == b""

