"""The bench sink: protocol, behaviours, counters, CLI. Real loopback sockets, no sleeps
for synchronisation (we wait on the sink's own conditions or on socket replies)."""

from __future__ import annotations

import json
import signal
import smtplib
import subprocess
import sys

import pytest
import trio

from bench.sink import Behaviour, Sink


async def _start(nursery: trio.Nursery, sink: Sink, host: str = "127.0.0.1", **kw) -> int:
    return await nursery.start(lambda task_status: sink.serve(host, 0, task_status=task_status,
                                                              **kw))


def _send(port: int, rcpts: list[str], body: bytes, host: str = "127.0.0.1") -> dict:
    with smtplib.SMTP(host, port, timeout=10) as s:
        return s.sendmail("sender@src.test", rcpts, body)


class _Raw:
    """A raw SMTP client for pipelining tests: read replies line by line."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    async def reply(self) -> bytes:
        """One complete (possibly multi-line) reply."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    raise EOFError(self.buf)
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return b"\r\n".join(lines)


async def test_smtplib_roundtrip_dot_unstuffing_and_counters() -> None:
    sink = Sink(keep_messages=True)
    async with trio.open_nursery() as nursery:
        port = await _start(nursery, sink)
        body = b"Subject: x\r\n\r\n.leading dot\r\nline\r\n..two\r\n.\r\nend"
        await trio.to_thread.run_sync(_send, port, ["a@one.test", "b@one.test", "c@two.test"],
                                      body)
        await sink.wait_for(lambda s: s.total_messages == 1, timeout=5)
        mail_from, rcpts, data, peer = sink.messages[0]
        assert mail_from == "sender@src.test"
        assert rcpts == ["a@one.test", "b@one.test", "c@two.test"]
        assert data == body + b"\r\n"  # smtplib adds the final CRLF; stuffing removed
        assert peer.startswith("127.0.0.1:")
        assert sink.stats["one.test"].messages == 1
        assert sink.stats["one.test"].recipients == 2
        assert sink.stats["two.test"].recipients == 1
        assert sink.total_recipients == 3
        assert [(d, n) for _, d, n in sink.arrivals] == [("one.test", 2), ("two.test", 1)]
        await sink.wait_for(lambda s: s.current_connections == 0, timeout=5)
        assert sink.connections_opened == 1
        assert sink.max_concurrent_connections == 1
        assert sink.listeners[("127.0.0.1", port)].connections_opened == 1
        nursery.cancel_scope.cancel()


async def test_rcpt_behaviours() -> None:
    sink = Sink(behaviours={"tempfail.test": Behaviour.TEMPFAIL,
                            "reject.test": Behaviour.REJECT})
    async with trio.open_nursery() as nursery:
        port = await _start(nursery, sink)
        refused = await trio.to_thread.run_sync(
            _send, port, ["x@ok.test", "y@tempfail.test", "z@reject.test"], b"hi\r\n")
        assert refused["y@tempfail.test"][0] == 451
        assert refused["z@reject.test"][0] == 550
        assert sink.stats["ok.test"].messages == 1
        assert sink.stats["tempfail.test"].tempfails == 1
        assert sink.stats["reject.test"].rejects == 1
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            await trio.to_thread.run_sync(_send, port, ["y@tempfail.test"], b"hi\r\n")
        assert sink.total_messages == 1
        nursery.cancel_scope.cancel()


async def test_data_behaviours_and_delay() -> None:
    sink = Sink(behaviours={"td.test": Behaviour.TEMPFAIL_DATA, "rd.test": Behaviour.REJECT_DATA},
                delays={"slow.test": 0.2})
    async with trio.open_nursery() as nursery:
        port = await _start(nursery, sink)
        with pytest.raises(smtplib.SMTPDataError) as e:
            await trio.to_thread.run_sync(_send, port, ["a@td.test"], b"x\r\n")
        assert e.value.smtp_code == 451
        with pytest.raises(smtplib.SMTPDataError) as e:
            await trio.to_thread.run_sync(_send, port, ["a@rd.test", "b@ok.test"], b"x\r\n")
        assert e.value.smtp_code == 554
        assert sink.stats["td.test"].tempfails == 1 and sink.stats["rd.test"].rejects == 1
        assert sink.total_messages == 0
        t0 = trio.current_time()
        await trio.to_thread.run_sync(_send, port, ["a@slow.test"], b"x\r\n")
        assert trio.current_time() - t0 >= 0.2
        assert sink.total_messages == 1
        nursery.cancel_scope.cancel()


async def test_drop_stall_and_greet_421() -> None:
    sink = Sink(behaviours={"drop.test": Behaviour.DROP, "stall.test": Behaviour.STALL},
                stall_seconds=0.3)
    async with trio.open_nursery() as nursery:
        port = await _start(nursery, sink)
        busy = await _start(nursery, sink, "127.0.0.2", behaviour=Behaviour.GREET_421)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            await trio.to_thread.run_sync(_send, port, ["a@drop.test"], b"x\r\n")
        assert sink.stats["drop.test"].drops == 1
        with pytest.raises(smtplib.SMTPServerDisconnected):
            await trio.to_thread.run_sync(_send, port, ["a@stall.test"], b"x\r\n")
        assert sink.stats["stall.test"].stalls == 1
        with pytest.raises(smtplib.SMTPConnectError) as e:
            await trio.to_thread.run_sync(_send, busy, ["a@ok.test"], b"x\r\n", "127.0.0.2")
        assert e.value.smtp_code == 421
        assert sink.listeners[("127.0.0.2", busy)].connections_opened == 1
        nursery.cancel_scope.cancel()


async def test_pipelined_batch_data_split_across_reads_and_bdat() -> None:
    sink = Sink(keep_messages=True)
    async with trio.open_nursery() as nursery:
        port = await _start(nursery, sink)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        c = _Raw(stream)
        assert (await c.reply()).startswith(b"220")
        await stream.send_all(b"EHLO me\r\n")
        ehlo = await c.reply()
        for kw in (b"PIPELINING", b"8BITMIME", b"SIZE", b"SMTPUTF8", b"CHUNKING",
                   b"ENHANCEDSTATUSCODES"):
            assert kw in ehlo
        await stream.send_all(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<r@y.test>\r\n"
                              b"RCPT TO:<q@y.test>\r\nDATA\r\n")
        for code in (b"250", b"250", b"250", b"354"):
            assert (await c.reply()).startswith(code)
        # The end-of-data marker split over two sends, then more pipelined commands.
        await stream.send_all(b"line one\r\n..dot\r\n")
        await stream.send_all(b".\r\nRSET\r\nNOOP\r\n")
        for code in (b"250", b"250", b"250"):
            assert (await c.reply()).startswith(code)
        # Empty body, then BDAT in two chunks.
        await stream.send_all(b"MAIL FROM:<>\r\nRCPT TO:<r@y.test>\r\nDATA\r\n")
        for code in (b"250", b"250", b"354"):
            assert (await c.reply()).startswith(code)
        await stream.send_all(b".\r\n")
        assert (await c.reply()).startswith(b"250")
        await stream.send_all(b"MAIL FROM:<s@x.test>\r\nRCPT TO:<r@z.test>\r\n"
                              b"BDAT 5\r\nhello")
        for code in (b"250", b"250", b"250"):
            assert (await c.reply()).startswith(code)
        await stream.send_all(b"BDAT 10 LAST\r\n\r\n.world\r\nQUIT\r\n")
        assert (await c.reply()).startswith(b"250")
        assert (await c.reply()).startswith(b"221")
        await stream.aclose()
        assert [m[2] for m in sink.messages] == [b"line one\r\n.dot\r\n", b"",
                                                  b"hello\r\n.world\r\n"]
        assert sink.stats["y.test"].recipients == 3
        nursery.cancel_scope.cancel()


async def test_wait_for_times_out_and_rate_window() -> None:
    sink = Sink()
    with pytest.raises(TimeoutError):
        await sink.wait_for(lambda s: s.total_messages > 0, timeout=0.05)
    sink.arrivals = [(0.0, "a", 1), (0.5, "a", 1), (0.9, "a", 1), (1.2, "a", 1),
                     (0.95, "b", 1)]
    assert sink.max_messages_in_window("a", 1.0) == 3
    assert sink.max_messages_in_window("b", 1.0) == 1


async def test_per_domain_concurrency() -> None:
    sink = Sink()
    async with trio.open_nursery() as nursery:
        port = await _start(nursery, sink)
        streams = []
        for _ in range(3):
            s = await trio.open_tcp_stream("127.0.0.1", port)
            c = _Raw(s)
            await c.reply()
            await s.send_all(b"EHLO me\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@d.test>\r\n")
            for _ in range(3):
                await c.reply()
            streams.append(s)
        assert sink.stats["d.test"].current_connections == 3
        for s in streams:
            await s.aclose()
        await sink.wait_for(lambda k: k.stats["d.test"].current_connections == 0, timeout=5)
        assert sink.stats["d.test"].max_concurrent_connections == 3
        nursery.cancel_scope.cancel()


def test_cli_multiprocess_counts() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.sink", "--listen", "127.0.0.1:0", "--processes", "2",
         "--json", "--interval", "0.2", "--tempfail-domain", "t.test", "--duration", "60"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        port = int(first["listening"][0].rsplit(":", 1)[1])
        for i in range(6):
            _send(port, [f"u{i}@ok.test"], b"x\r\n")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            _send(port, ["u@t.test"], b"x\r\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    final = json.loads(out.strip().splitlines()[-1])
    assert final["final"] is True
    assert final["total_messages"] == 6
    assert final["domains"]["ok.test"]["recipients"] == 6
    assert final["domains"]["t.test"]["tempfails"] == 1
