"""The bench sink's pushback (a hidden per-source-address rate limit answered with Gmail's
421 4.7.28): the sliding window, the stages, per-address isolation, admissions of
concurrent connections, the greeting variant, and the refusal windows a report reads.

Real loopback sockets; time is trio's ``MockClock``, moved past the window with
``clock.jump`` so a 60-second window is tested in milliseconds. The clock does not
autojump: an autojump clock also leaps while a real socket read is pending, which would
move the very timestamps the window is computed from. Nothing here waits on a timer, so
every test is bounded by the ``timeout`` mark (real seconds).
"""

from __future__ import annotations

import pytest
import trio
from trio.testing import MockClock

from bench.sink import RefusalWindow, Sink, SourceStats, pushback_reply
from tests.bench.test_sink import _Raw

pytestmark = pytest.mark.timeout(60)

WINDOW = 60.0


@pytest.fixture
def clock() -> MockClock:
    return MockClock()


class _Client(_Raw):
    """A raw SMTP client (``_Raw``'s reply reader) with a source address, commands and
    whole transactions."""

    @classmethod
    async def connect(cls, port: int, source: str = "127.0.0.1") -> tuple[_Client, bytes]:
        """Connect from ``source``; return the client and the greeting."""
        stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
        client = cls(stream)
        return client, await client.reply()

    async def command(self, line: bytes) -> bytes:
        await self.stream.send_all(line + b"\r\n")
        return await self.reply()

    async def closed(self) -> bool:
        """True when the server has closed the connection (EOF, nothing left unread)."""
        try:
            return not self.buf and not await self.stream.receive_some(1)
        except trio.BrokenResourceError:
            return True

    async def transaction(self, rcpt: bytes = b"a@gmail.test") -> bytes:
        """MAIL, RCPT, DATA with a tiny body; the first non-2xx/3xx reply, else the 250
        to the end of data."""
        for cmd in (b"MAIL FROM:<s@src.test>", b"RCPT TO:<" + rcpt + b">", b"DATA"):
            reply = await self.command(cmd)
            if reply[:1] not in (b"2", b"3"):
                return reply
        return await self.command(b"Subject: x\r\n\r\nhi\r\n.")

    async def aclose(self) -> None:
        await self.stream.aclose()


async def _serve(nursery: trio.Nursery, sink: Sink) -> int:
    return await nursery.start(sink.serve, "127.0.0.1", 0)


async def _greeted(port: int, source: str = "127.0.0.1") -> _Client:
    client, greeting = await _Client.connect(port, source)
    assert greeting.startswith(b"220"), greeting
    assert (await client.command(b"EHLO client.test")).startswith(b"250")
    return client


def _is_pushback(reply: bytes, ip: str = "127.0.0.1") -> bool:
    return reply == pushback_reply(ip).rstrip(b"\r\n")


async def test_sliding_window_refuses_at_rcpt_then_accepts_when_a_place_frees(
        clock: MockClock) -> None:
    sink = Sink(pushback_rate=3, pushback_window=WINDOW)
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, sink)
        client = await _greeted(port)
        for _ in range(3):  # t = 0: the limit, on one connection
            assert (await client.transaction()).startswith(b"250")
        await client.command(b"MAIL FROM:<s@src.test>")
        reply = await client.command(b"RCPT TO:<a@gmail.test>")
        assert _is_pushback(reply), reply
        assert reply.startswith(b"421-4.7.28 [127.0.0.1] Gmail has detected an unusual rate")
        assert reply.splitlines()[-1].startswith(b"421 4.7.28 ")
        assert await client.closed()  # closed after the 421, as Gmail does

        clock.jump(WINDOW / 2)  # t = 30: all three still inside the window
        client = await _greeted(port)
        await client.command(b"MAIL FROM:<s@src.test>")
        assert _is_pushback(await client.command(b"RCPT TO:<b@gmail.test>"))
        assert await client.closed()

        clock.jump(WINDOW / 2)  # t = 60: the first three places free
        client = await _greeted(port)
        for _ in range(3):
            assert (await client.transaction()).startswith(b"250")
        assert _is_pushback(await client.transaction())
        nursery.cancel_scope.cancel()

    src = sink.sources["127.0.0.1"]
    assert (src.messages, src.refusals, src.connections_opened) == (6, 3, 3)
    assert sink.pushback_refusals == 3
    assert sink.total_messages == 6
    assert src.message_times == [0.0] * 3 + [WINDOW] * 3
    assert src.refusal_times == [0.0, WINDOW / 2, WINDOW]
    assert src.connection_times == [0.0, WINDOW / 2, WINDOW]
    # from the first refusal to the next accepted message: one refusal more, and the two
    # connections opened meanwhile (the refused one at 30 s, the accepted one at 60 s)
    assert src.refusal_windows() == [
        RefusalWindow(start=0.0, end=WINDOW, refusals=2, connections=2),
        RefusalWindow(start=WINDOW, end=None, refusals=1, connections=0)]


async def test_the_limit_is_per_source_address(clock: MockClock) -> None:
    sink = Sink(pushback_rate=1)
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, sink)
        one = await _greeted(port, "127.0.0.1")
        assert (await one.transaction()).startswith(b"250")
        assert _is_pushback(await one.transaction(), "127.0.0.1")
        two = await _greeted(port, "127.0.0.2")
        assert (await two.transaction()).startswith(b"250")
        assert _is_pushback(await two.transaction(), "127.0.0.2")
        nursery.cancel_scope.cancel()
    assert {ip: (s.messages, s.refusals) for ip, s in sink.sources.items()} == {
        "127.0.0.1": (1, 1), "127.0.0.2": (1, 1)}
    assert sink.summary()["sources"]["127.0.0.2"]["refusals"] == 1


@pytest.mark.parametrize("stage", ["mail", "data", "bdat"])
async def test_refusal_at_mail_or_at_end_of_data(clock: MockClock, stage: str) -> None:
    sink = Sink(pushback_rate=1, pushback_stage="mail" if stage == "mail" else "data")
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, sink)
        client = await _greeted(port)
        assert (await client.transaction()).startswith(b"250")
        mail = await client.command(b"MAIL FROM:<s@src.test>")
        if stage == "mail":
            assert _is_pushback(mail)
        else:
            assert mail.startswith(b"250")
            assert (await client.command(b"RCPT TO:<a@gmail.test>")).startswith(b"250")
            if stage == "data":
                assert (await client.command(b"DATA")).startswith(b"354")
                reply = await client.command(b"Subject: x\r\n\r\nhi\r\n.")
            else:
                await client.stream.send_all(b"BDAT 4 LAST\r\nhi\r\n")
                reply = await client.reply()
            assert _is_pushback(reply), reply
        assert await client.closed()
        nursery.cancel_scope.cancel()
    assert (sink.sources["127.0.0.1"].messages, sink.pushback_refusals) == (1, 1)


async def test_concurrent_transactions_cannot_overshoot_together(clock: MockClock) -> None:
    """Places are taken at RCPT: of three connections in the middle of a transaction at
    once, only two get through under a limit of 2; an aborted transaction frees its
    place (RSET) without counting as a message."""
    sink = Sink(pushback_rate=2)
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, sink)
        clients = [await _greeted(port) for _ in range(3)]
        replies = []
        for c in clients:
            await c.command(b"MAIL FROM:<s@src.test>")
            replies.append(await c.command(b"RCPT TO:<a@gmail.test>"))
        assert [r[:3] for r in replies] == [b"250", b"250", b"421"]
        assert sink.over_limit("127.0.0.1")
        assert (await clients[0].command(b"RSET")).startswith(b"250")
        assert not sink.over_limit("127.0.0.1")
        fourth = await _greeted(port)
        assert (await fourth.transaction()).startswith(b"250")
        assert (await clients[1].command(b"DATA")).startswith(b"354")
        assert (await clients[1].command(b"x\r\n.")).startswith(b"250")
        assert sink.over_limit("127.0.0.1")  # two accepted inside the window
        assert _is_pushback(await clients[0].transaction())
        nursery.cancel_scope.cancel()
    src = sink.sources["127.0.0.1"]
    assert (src.messages, src.refusals, src.connections_opened) == (2, 2, 4)


async def test_greeting_421_while_over_the_limit(clock: MockClock) -> None:
    sink = Sink(pushback_rate=1, pushback_greet=True)
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, sink)
        client = await _greeted(port)
        assert (await client.transaction()).startswith(b"250")
        await client.aclose()
        refused, greeting = await _Client.connect(port)
        assert _is_pushback(greeting)
        assert await refused.closed()
        clock.jump(WINDOW)
        client = await _greeted(port)
        assert (await client.transaction()).startswith(b"250")
        nursery.cancel_scope.cancel()
    src = sink.sources["127.0.0.1"]
    assert (src.messages, src.refusals, src.connections_opened) == (2, 1, 3)
    assert src.refusal_windows() == [RefusalWindow(start=0.0, end=WINDOW, refusals=1,
                                                   connections=1)]


async def test_without_a_limit_sources_are_counted_and_nothing_is_refused() -> None:
    sink = Sink()
    async with trio.open_nursery() as nursery:
        port = await _serve(nursery, sink)
        client = await _greeted(port, "127.0.0.3")
        for _ in range(5):
            assert (await client.transaction()).startswith(b"250")
        nursery.cancel_scope.cancel()
    src = sink.sources["127.0.0.3"]
    assert (src.messages, src.refusals, src.connections_opened) == (5, 0, 1)
    assert not sink.over_limit("127.0.0.3")
    assert src.refusal_windows() == []


def test_refusal_windows_count_only_connections_opened_after_the_first_refusal() -> None:
    src = SourceStats(events=[
        (0.0, "connect"), (0.1, "connect"), (1.0, "accept"),
        (2.0, "refuse"), (2.0, "refuse"),           # two sessions refused at once
        (7.0, "connect"), (7.0, "connect"), (7.0, "connect"),  # reconnecting with three
        (7.1, "refuse"), (7.1, "refuse"), (7.2, "accept"), (7.3, "accept"),
        (9.0, "connect"), (9.5, "refuse")])
    assert src.refusal_windows() == [
        RefusalWindow(start=2.0, end=7.2, refusals=4, connections=3),
        RefusalWindow(start=9.5, end=None, refusals=1, connections=0)]
    assert src.message_times == [1.0, 7.2, 7.3]


def test_bad_pushback_settings_are_refused() -> None:
    for kw in ({"pushback_stage": "helo"}, {"pushback_rate": -1}, {"pushback_window": 0}):
        with pytest.raises(ValueError, match="pushback"):
            Sink(**kw)  # type: ignore[arg-type]


def test_scenario_figures_and_goals_from_the_sinks_records() -> None:
    """bench.pushback's figures: after the warm-up window, 50 accepted and 1 refused in a
    minute against 50/min; one refusal window with one connection."""
    from bench.pushback import pushback_figures

    accepted = [(61.0 + 1.2 * i, "accept") for i in range(50)]
    src = SourceStats(events=[(0.0, "connect"), *[(0.5, "accept")] * 50,
                              (30.0, "refuse"), (60.5, "connect"), *accepted,
                              (110.0, "refuse")])
    f = pushback_figures({"127.0.0.1": src}, offset=0.0, seconds=120.0, rate=50,
                         window=60.0)
    assert (f["delivered"], f["refused"], f["delivered_after_warmup"]) == (100, 2, 50)
    assert f["rate_per_min"] == pytest.approx(50.0)
    assert f["rate_ratio"] == pytest.approx(1.0)
    assert f["refused_share"] == pytest.approx(1 / 51)
    assert (f["refusal_windows"], f["max_connections_per_window"]) == (2, 1)
    assert {k: g["met"] for k, g in f["goals"].items()} == {
        "rate_ratio": True, "refused_share": True, "max_connections_per_window": True}
    # a part window is not measured: a burst as the window frees again at 120 s would
    # read as more than the limit
    src.events += [(120.0, "accept")] * 50
    f = pushback_figures({"127.0.0.1": src}, 0.0, 150.0, 50, 60.0)
    assert (f["measured_from"], f["measured_to"], f["rate_ratio"]) == (60.0, 120.0, 1.0)
    burst = SourceStats(events=[(0.0, "refuse"), *[(1.0, "connect")] * 5, (2.0, "accept")])
    g = pushback_figures({"127.0.0.1": burst}, 0.0, 120.0, 50, 60.0)["goals"]
    assert not g["max_connections_per_window"]["met"]
    assert not g["rate_ratio"]["met"]


def test_the_relay_peers_pushback_config_is_valid() -> None:
    from bench.peers import PeerSetup
    from bench.pushback import RELAY_PUSHBACK_TOML, _PushbackRelay
    from relay.config import decode_config

    peer = _PushbackRelay(PeerSetup(sink_port=2626))
    try:
        text = peer.config_text()
        assert text.endswith(RELAY_PUSHBACK_TOML)
        assert decode_config(text, "generated").outbound.smart_host == "127.0.0.1:2626"
    finally:
        peer.tmp.rmdir()
