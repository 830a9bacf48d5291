"""ClientSession over real loopback sockets: against ``bench.sink`` (independent SMTP
code) and, for behaviours the sink does not script, a tiny in-test trio peer.

Every test is bounded by ``trio.fail_after``; timeouts under test are sub-second and no
test sleeps to synchronise.
"""

from __future__ import annotations

import functools
import socket
import ssl
from collections.abc import Callable

import pytest
import trio
import trustme

from bench.sink import Behaviour, Sink
from relay.model import Envelope, Recipient
from relay.outbound.session import (
    ClientSession,
    SessionError,
    SessionPolicy,
    open_session,
)

LOOPBACK = "127.0.0.1"
MX = "mx.test"
BODY = b"Subject: test\r\nFrom: s@src.test\r\n\r\n.leading dot\r\nline\r\n.\r\nlast\r\n"


def policy(**kw: object) -> SessionPolicy:
    base: dict[str, object] = dict(helo_name="relay.test", tls="off", connect_timeout=2.0,
                                   command_timeout=2.0, data_timeout=2.0)
    base.update(kw)
    return SessionPolicy(**base)  # type: ignore[arg-type]


def envelope(*addresses: str) -> Envelope:
    return Envelope(queue_id="Q1", sender="s@src.test",
                    recipients=[Recipient(address=a) for a in addresses], received_at=0.0)


async def start_sink(nursery: trio.Nursery, **kw: object) -> tuple[Sink, int]:
    kw.setdefault("keep_messages", True)
    sink = Sink(**kw)  # type: ignore[arg-type]
    port = await nursery.start(sink.serve, LOOPBACK, 0)
    return sink, port


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(MX).configure_cert(ctx)
    return ctx


@pytest.fixture(scope="module")
def verifying_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(ctx)
    return ctx


# -- delivery against the sink ------------------------------------------------------------


async def test_several_recipients_in_one_transaction(nursery: trio.Nursery) -> None:
    sink, port = await start_sink(nursery)
    with trio.fail_after(10):
        session = await open_session(LOOPBACK, port, MX, policy())
        env = envelope("a@one.test", "b@one.test", "c@two.test")
        outcomes = await session.deliver(env, [0, 1, 2], BODY)
        assert [(o.index, o.kind) for o in outcomes] == [
            (0, "delivered"), (1, "delivered"), (2, "delivered")]
        assert outcomes[0].reply_line.startswith("250 ")
        assert session.deliveries == 1 and session.usable
        await session.aclose()
    [(mail_from, rcpts, data, _peer)] = sink.messages
    assert mail_from == "s@src.test"
    assert rcpts == ["a@one.test", "b@one.test", "c@two.test"]
    assert data == BODY  # dot-stuffing undone by the sink: byte-identical


async def test_connection_reused_for_several_deliveries(nursery: trio.Nursery) -> None:
    sink, port = await start_sink(nursery)
    with trio.fail_after(10):
        async with await open_session(LOOPBACK, port, MX, policy()) as session:
            for i in range(5):
                env = envelope(f"u{i}@one.test")
                [o] = await session.deliver(env, [0], BODY + str(i).encode())
                assert o.kind == "delivered"
            assert session.deliveries == 5
        assert not session.usable
        await session.aclose()  # idempotent
    assert sink.connections_opened == 1
    assert sink.total_messages == 5


async def test_next_transaction_rides_behind_the_end_of_data(nursery: trio.Nursery) -> None:
    """RFC 2920 3.1 against a DATA-only pipelining server (the sink without CHUNKING):
    the second transaction is begun while the first waits for its end-of-data reply,
    both are delivered intact (dot-stuffing included), outcomes come in begin order."""
    sink, port = await start_sink(nursery, chunking=False,
                                  behaviours={"reject.test": Behaviour.REJECT})
    with trio.fail_after(10):
        session = await open_session(LOOPBACK, port, MX, policy())
        assert session.can_begin and not session.transaction_done
        session.begin(envelope("a@one.test"), [0], BODY)
        await session.progress(until_behind=True)
        assert session.can_begin and not session.transaction_done  # only its dot reply owed
        session.begin(envelope("b@two.test", "c@reject.test"), [0, 1], BODY + b"2\r\n")
        assert not session.can_begin
        outcomes = []
        while len(outcomes) < 2:
            if session.transaction_done:
                outcomes.append([(o.index, o.kind) for o in session.take_outcomes()])
            else:
                await session.progress()
        assert outcomes == [[(0, "delivered")], [(0, "delivered"), (1, "permanent")]]
        assert session.usable and session.deliveries == 2
        await session.aclose()
    assert [(m[1], m[2]) for m in sink.messages] == [
        (["a@one.test"], BODY), (["b@two.test"], BODY + b"2\r\n")]


async def test_lost_connection_with_a_transaction_behind(nursery: trio.Nursery) -> None:
    """The server closes after the first message's 250: the first is delivered, the one
    behind it gets a transient 421 and the session is unusable."""
    mails = 0

    def answer(line: bytes) -> bytes | None:
        nonlocal mails
        verb = line[:4].upper()
        if verb == b"EHLO":
            return b"250-peer.test\r\n250 PIPELINING\r\n"
        if verb == b"MAIL":
            mails += 1
            return b"250 ok\r\n" if mails == 1 else None
        return b"354 go\r\n" if verb == b"DATA" else b"250 ok\r\n"

    port = await start_peer(nursery, b"220 peer.test\r\n", answer)
    with trio.fail_after(10):
        session = await open_session(LOOPBACK, port, MX, policy())
        session.begin(envelope("a@one.test"), [0], BODY)
        await session.progress(until_behind=True)
        session.begin(envelope("b@two.test"), [0], BODY)
        await session.progress()
        [first] = session.take_outcomes()
        while not session.transaction_done:
            await session.progress()
        [second] = session.take_outcomes()
    assert first.kind == "delivered"
    assert (second.kind, second.code) == ("transient", 421)
    assert "lost connection" in second.text
    assert not session.usable and not session.can_begin


async def test_per_recipient_outcomes(nursery: trio.Nursery) -> None:
    sink, port = await start_sink(nursery, behaviours={"temp.test": Behaviour.TEMPFAIL,
                                                       "bad.test": Behaviour.REJECT})
    with trio.fail_after(10):
        session = await open_session(LOOPBACK, port, MX, policy())
        env = envelope("ok@one.test", "x@temp.test", "y@bad.test")
        outcomes = await session.deliver(env, [0, 1, 2], BODY)
        assert [(o.kind, o.code // 100) for o in outcomes] == [
            ("delivered", 2), ("transient", 4), ("permanent", 5)]
        assert outcomes[2].enhanced and outcomes[2].enhanced.startswith("5.")
        # All refused: nothing sent, transaction reset, session still usable.
        outcomes = await session.deliver(envelope("y@bad.test"), [0], BODY)
        assert [o.kind for o in outcomes] == ["permanent"]
        [o] = await session.deliver(envelope("ok@one.test"), [0], BODY)
        assert o.kind == "delivered" and session.usable
        await session.aclose()
    assert sink.total_messages == 2


@pytest.mark.parametrize(("behaviour", "kind"), [(Behaviour.TEMPFAIL_DATA, "transient"),
                                                 (Behaviour.REJECT_DATA, "permanent")])
async def test_end_of_data_failure_applies_to_accepted(
        nursery: trio.Nursery, behaviour: Behaviour, kind: str) -> None:
    _sink, port = await start_sink(nursery, behaviours={"d.test": behaviour})
    with trio.fail_after(10):
        session = await open_session(LOOPBACK, port, MX, policy())
        outcomes = await session.deliver(envelope("a@d.test", "b@d.test"), [0, 1], BODY)
        assert [o.kind for o in outcomes] == [kind, kind]
        assert session.usable
        await session.aclose()


async def test_drop_is_transient_and_unusable(nursery: trio.Nursery) -> None:
    _sink, port = await start_sink(nursery, behaviours={"drop.test": Behaviour.DROP})
    with trio.fail_after(10):
        session = await open_session(LOOPBACK, port, MX, policy())
        outcomes = await session.deliver(envelope("a@one.test", "b@drop.test"), [0, 1], BODY)
        assert [o.kind for o in outcomes] == ["transient", "transient"]
        assert "lost connection" in outcomes[1].text
        assert not session.usable
        # A further deliver on a dead session answers transient without raising.
        [o] = await session.deliver(envelope("a@one.test"), [0], BODY)
        assert o.kind == "transient"
        await session.aclose()


async def test_stall_hits_command_timeout(nursery: trio.Nursery) -> None:
    _sink, port = await start_sink(nursery, behaviours={"slow.test": Behaviour.STALL},
                                   stall_seconds=30.0)
    with trio.fail_after(5):
        session = await open_session(LOOPBACK, port, MX, policy(command_timeout=0.3))
        start = trio.current_time()
        outcomes = await session.deliver(envelope("a@slow.test"), [0], BODY)
        assert trio.current_time() - start < 3
        assert [o.kind for o in outcomes] == ["transient"]
        assert "timed out" in outcomes[0].text
        assert not session.usable
        await session.aclose()


async def test_greeting_421_is_transient_session_error(nursery: trio.Nursery) -> None:
    _sink, port = await start_sink(nursery, default=Behaviour.GREET_421)
    with trio.fail_after(5), pytest.raises(SessionError) as info:
        await open_session(LOOPBACK, port, MX, policy())
    assert info.value.code == 421 and not info.value.permanent


async def test_421_at_rcpt_closes_session(nursery: trio.Nursery) -> None:
    _sink, port = await start_sink(nursery, behaviours={"busy.test": Behaviour.GREET_421})
    with trio.fail_after(5):
        session = await open_session(LOOPBACK, port, MX, policy())
        outcomes = await session.deliver(envelope("a@one.test", "b@busy.test"), [0, 1], BODY)
        assert [(o.kind, o.code) for o in outcomes] == [("transient", 421), ("transient", 421)]
        assert not session.usable
        await session.aclose()


async def test_message_over_server_size_fails_without_sending(nursery: trio.Nursery) -> None:
    sink, port = await start_sink(nursery, max_message_size=100)
    with trio.fail_after(5):
        session = await open_session(LOOPBACK, port, MX, policy())
        [o] = await session.deliver(envelope("a@one.test"), [0], b"x" * 200 + b"\r\n")
        assert (o.code, o.enhanced, o.kind) == (552, "5.3.4", "permanent")
        assert session.usable
        [o] = await session.deliver(envelope("a@one.test"), [0], b"small\r\n")
        assert o.kind == "delivered"
        await session.aclose()
    assert sink.total_messages == 1


async def test_connect_refused_is_transient() -> None:
    s = socket.socket()
    s.bind((LOOPBACK, 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with trio.fail_after(5), pytest.raises(SessionError) as info:
        await open_session(LOOPBACK, port, MX, policy())
    assert info.value.enhanced == "4.4.1" and not info.value.permanent
    assert "refused" in info.value.text.lower()


# -- TLS ---------------------------------------------------------------------------------


async def test_opportunistic_tls_without_verification(
        nursery: trio.Nursery, server_ctx: ssl.SSLContext) -> None:
    sink, port = await start_sink(nursery, ssl_context=server_ctx)
    with trio.fail_after(10):
        session = await open_session(LOOPBACK, port, MX, policy(tls="opportunistic"))
        assert session.tls is not None and session.tls.startswith("TLS")
        assert "STARTTLS" not in session.extensions
        [o] = await session.deliver(envelope("a@one.test"), [0], BODY)
        assert o.kind == "delivered"
        await session.aclose()
    assert sink.messages[0][2] == BODY


async def test_opportunistic_without_starttls_stays_plaintext(nursery: trio.Nursery) -> None:
    _sink, port = await start_sink(nursery)
    with trio.fail_after(5):
        session = await open_session(LOOPBACK, port, MX, policy(tls="opportunistic"))
        assert session.tls is None and session.usable
        await session.aclose()


async def test_required_tls_with_verification(
        nursery: trio.Nursery, server_ctx: ssl.SSLContext,
        verifying_ctx: ssl.SSLContext) -> None:
    _sink, port = await start_sink(nursery, ssl_context=server_ctx)
    with trio.fail_after(10):
        session = await open_session(LOOPBACK, port, MX,
                                     policy(tls="required", ssl_context=verifying_ctx))
        assert session.tls is not None
        [o] = await session.deliver(envelope("a@one.test"), [0], BODY)
        assert o.kind == "delivered"
        await session.aclose()


async def test_required_tls_bad_certificate_name_defers(
        nursery: trio.Nursery, server_ctx: ssl.SSLContext,
        verifying_ctx: ssl.SSLContext) -> None:
    _sink, port = await start_sink(nursery, ssl_context=server_ctx)
    with trio.fail_after(10), pytest.raises(SessionError) as info:
        await open_session(LOOPBACK, port, "other.test",
                           policy(tls="required", ssl_context=verifying_ctx))
    assert info.value.enhanced == "4.7.5" and not info.value.permanent


async def test_required_tls_not_offered_defers(nursery: trio.Nursery) -> None:
    sink, port = await start_sink(nursery)
    with trio.fail_after(5), pytest.raises(SessionError) as info:
        await open_session(LOOPBACK, port, MX, policy(tls="required"))
    assert info.value.enhanced == "4.7.4" and not info.value.permanent
    assert "TLS is required" in info.value.text
    assert sink.total_messages == 0


async def test_opportunistic_handshake_failure_retries_in_plaintext(
        nursery: trio.Nursery, server_ctx: ssl.SSLContext) -> None:
    # Server demands TLS 1.3, client offers at most 1.2: the handshake cannot succeed.
    strict = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    strict.minimum_version = ssl.TLSVersion.TLSv1_3
    trustme.CA().issue_cert(MX).configure_cert(strict)
    old = ssl.create_default_context()
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    sink, port = await start_sink(nursery, ssl_context=strict)
    with trio.fail_after(10):
        session = await open_session(LOOPBACK, port, MX,
                                     policy(tls="opportunistic", ssl_context=old))
        assert session.tls is None
        [o] = await session.deliver(envelope("a@one.test"), [0], BODY)
        assert o.kind == "delivered"
        await session.aclose()
    assert sink.connections_opened == 2
    with trio.fail_after(10), pytest.raises(SessionError) as info:
        await open_session(LOOPBACK, port, MX, policy(tls="required", ssl_context=old))
    assert info.value.enhanced == "4.7.5"


# -- scripted peer for what the sink does not do --------------------------------------------

async def start_peer(nursery: trio.Nursery, greeting: bytes,
                     answer: Callable[[bytes], bytes | None]) -> int:
    """A line-based SMTP peer: ``answer(line)`` -> reply bytes, or None to close.
    DATA bodies are read up to CRLF.CRLF and answered with 250."""

    async def handler(stream: trio.SocketStream) -> None:
        buf = bytearray()
        try:
            await stream.send_all(greeting)
            in_data = False
            while True:
                if in_data:
                    end = buf.find(b"\r\n.\r\n")
                    if end >= 0:
                        del buf[: end + 5]
                        in_data = False
                        await stream.send_all(b"250 2.0.0 queued\r\n")
                        continue
                else:
                    eol = buf.find(b"\r\n")
                    if eol >= 0:
                        line = bytes(buf[:eol])
                        del buf[: eol + 2]
                        reply = answer(line)
                        if reply is None:
                            return
                        await stream.send_all(reply)
                        in_data = reply.startswith(b"354")
                        continue
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, host=LOOPBACK), handler, 0)
    return listeners[0].socket.getsockname()[1]


def old_server(line: bytes) -> bytes | None:
    """RFC 821-only: no EHLO, no PIPELINING."""
    verb = line[:4].upper()
    if verb == b"EHLO":
        return b"502 command not implemented\r\n"
    if verb == b"QUIT":
        return None
    return {b"HELO": b"250 old.test\r\n", b"MAIL": b"250 ok\r\n", b"RSET": b"250 ok\r\n",
            b"DATA": b"354 go\r\n"}.get(verb) or (
        b"550 unknown\r\n" if b"nobody" in line else b"250 ok\r\n")


async def test_helo_fallback_and_one_command_at_a_time(nursery: trio.Nursery) -> None:
    port = await start_peer(nursery, b"220 old.test\r\n", old_server)
    with trio.fail_after(5):
        session = await open_session(LOOPBACK, port, MX, policy(tls="opportunistic"))
        assert session.extensions == {}
        outcomes = await session.deliver(envelope("a@x.test", "nobody@x.test"), [0, 1], BODY)
        assert [o.kind for o in outcomes] == ["delivered", "permanent"]
        outcomes = await session.deliver(envelope("nobody@x.test"), [0], BODY)
        assert [o.kind for o in outcomes] == ["permanent"]
        [o] = await session.deliver(envelope("b@x.test"), [0], BODY)  # RSET first
        assert o.kind == "delivered" and session.usable
        await session.aclose()


async def test_5xx_greeting_is_not_permanent(nursery: trio.Nursery) -> None:
    port = await start_peer(nursery, b"554 5.7.1 no service for you\r\n", lambda _l: None)
    with trio.fail_after(5), pytest.raises(SessionError) as info:
        await open_session(LOOPBACK, port, MX, policy())
    assert info.value.code == 554 and not info.value.permanent


async def test_ehlo_and_helo_refused_is_permanent(nursery: trio.Nursery) -> None:
    port = await start_peer(nursery, b"220 x\r\n", lambda _l: b"550 5.7.1 not you\r\n")
    with trio.fail_after(5), pytest.raises(SessionError) as info:
        await open_session(LOOPBACK, port, MX, policy())
    assert info.value.code == 550 and info.value.permanent


async def test_silent_greeting_times_out(nursery: trio.Nursery) -> None:
    port = await start_peer(nursery, b"", lambda _l: None)
    with trio.fail_after(5), pytest.raises(SessionError) as info:
        await open_session(LOOPBACK, port, MX, policy(command_timeout=0.2))
    assert not info.value.permanent and "timed out" in info.value.text


async def test_session_is_a_context_manager_and_reports_itself(nursery: trio.Nursery) -> None:
    _sink, port = await start_sink(nursery)
    with trio.fail_after(5):
        async with await open_session(LOOPBACK, port, MX, policy()) as session:
            assert isinstance(session, ClientSession)
            assert (session.mx_host, session.ip, session.port) == (MX, LOOPBACK, port)
            assert session.dsn in (True, False)
            assert MX in repr(session)


async def test_source_address_is_used(nursery: trio.Nursery) -> None:
    sink, port = await start_sink(nursery)
    with trio.fail_after(5):
        session = await open_session(LOOPBACK, port, MX, policy(source_address=LOOPBACK))
        [o] = await session.deliver(envelope("a@one.test"), [0], BODY)
        assert o.kind == "delivered"
        await session.aclose()
    assert sink.messages[0][3].startswith(LOOPBACK + ":")


async def test_cancelled_delivery_leaves_session_unusable(nursery: trio.Nursery) -> None:
    _sink, port = await start_sink(nursery, behaviours={"slow.test": Behaviour.STALL},
                                   stall_seconds=30.0)
    with trio.fail_after(5):
        session = await open_session(LOOPBACK, port, MX, policy(command_timeout=10.0))
        with trio.move_on_after(0.2) as scope:
            await session.deliver(envelope("a@slow.test"), [0], BODY)
        assert scope.cancelled_caught
        assert not session.usable
        await session.aclose()


async def test_server_421_while_idle_fails_next_delivery_transiently(
        nursery: trio.Nursery) -> None:
    sent_421 = trio.Event()

    def answer(line: bytes) -> bytes | None:
        verb = line[:4].upper()
        if verb == b"EHLO":
            return b"250-idle.test\r\n250 PIPELINING\r\n"
        if verb == b"NOOP":  # our cue: the "idle timeout" fires now
            sent_421.set()
            return b"421 4.4.2 idle timeout\r\n"
        return b"250 ok\r\n"

    port = await start_peer(nursery, b"220 idle.test\r\n", answer)
    with trio.fail_after(5):
        session = await open_session(LOOPBACK, port, MX, policy())
        await session._wire.send(b"NOOP\r\n")  # provoke the unsolicited 421
        await sent_421.wait()
        [o] = await session.deliver(envelope("a@x.test"), [0], BODY)
        assert o.kind == "transient"
        assert not session.usable
        await session.aclose()


# -- a server that trickles: every reply is bounded as a whole ------------------------------


async def start_trickler(nursery: trio.Nursery, greeting: bytes, ehlo_lines: int) -> int:
    """Sends ``greeting`` one byte per 20 ms; if that completes, answers EHLO with
    ``ehlo_lines`` continuation lines, one per 20 ms, and never the last line."""

    async def handler(stream: trio.SocketStream) -> None:
        try:
            for i in range(len(greeting)):
                await stream.send_all(greeting[i:i + 1])
                await trio.sleep(0.02)
            await stream.receive_some(1024)
            for _ in range(ehlo_lines):
                await stream.send_all(b"250-STILL-TALKING\r\n")
                await trio.sleep(0.02)
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, host=LOOPBACK), handler, 0)
    return listeners[0].socket.getsockname()[1]


@pytest.mark.parametrize(
    ("greeting", "ehlo_lines", "activity"),
    [
        (b"220 " + b"x" * 1000 + b"\r\n", 0, "receiving the initial server greeting"),
        (b"220 mx.test\r\n", 1000, "receiving the EHLO reply"),
    ],
)
async def test_a_trickled_reply_times_out_as_a_whole(
    nursery: trio.Nursery, greeting: bytes, ehlo_lines: int, activity: str
) -> None:
    """Each byte (or line) comes well inside command_timeout, the whole reply never:
    the session gives up one command_timeout after the reply began, not never."""
    port = await start_trickler(nursery, greeting, ehlo_lines)
    started = trio.current_time()
    with trio.fail_after(5), pytest.raises(SessionError) as info:
        await open_session(LOOPBACK, port, MX, policy(command_timeout=0.3))
    assert trio.current_time() - started < 1.0
    assert not info.value.permanent
    assert info.value.text.endswith(f"timed out while {activity}")
