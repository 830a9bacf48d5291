"""The delivery engine end to end: real LMDB spool, real sockets to bench.sink sinks on
127.0.0.2/127.0.0.3, real dnsmasq for MX routing. No sleeps for synchronisation: every
wait is an event/predicate with a deadline (sink.wait_for, _wait_until) or MockClock."""

from __future__ import annotations

import contextlib
import email
import email.policy
import functools
import itertools
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import trio.testing

from bench.sink import Behaviour, Sink
from relay.config import Config, OutboundConfig, Provider, Route, Throttle
from relay.events import (
    Bounce,
    Delivery,
    Event,
    EventBus,
    EventLog,
    Expiration,
    Metrics,
    TransientFailure,
)
from relay.events.types import ShapingChange
from relay.outbound.engine import DeliveryEngine
from relay.outbound.wakeup import Waker
from relay.spool import Envelope, GroupCommitWriter, NewMessage, Recipient, Spool, new_queue_id

try:  # tests/integration may or may not be a package; the fixture module is a sibling.
    from tests.integration import dnsmasq as _dnsmasq
except ImportError:
    import dnsmasq as _dnsmasq  # type: ignore[no-redef]

dnsmasq = _dnsmasq.dnsmasq

FAST = Throttle(retry_interval=60.0, max_retry_interval=200.0, idle_timeout=0.5,
                connect_timeout=5.0, command_timeout=10.0, data_timeout=10.0, tls="off")


def message(rcpts: list[str], sender: str = "alice@sender.test", size: int = 300,
            **env: object) -> NewMessage:
    qid = new_queue_id()
    body = b"x" * max(0, size - 100)
    data = (f"From: {sender}\r\nTo: {rcpts[0]}\r\nSubject: test {qid}\r\n"
            f"Message-ID: <{qid}@relay.test>\r\n\r\n").encode() + body + b"\r\n"
    envelope = Envelope(queue_id=qid, sender=sender,
                        recipients=[Recipient(address=r) for r in rcpts],
                        received_at=time.time(), **env)  # type: ignore[arg-type]
    return NewMessage(envelope=envelope, data=data)


def config(routes: dict[str, list[str]], *, default: Throttle = FAST,
           domains: dict[str, Throttle] | None = None, **outbound: object) -> Config:
    return Config(outbound=OutboundConfig(
        routes=[Route(domain=d, hosts=h) for d, h in routes.items()],
        default=default, domains=domains or {}, **outbound))  # type: ignore[arg-type]


@pytest.fixture
def spool(tmp_path: Path):
    s = Spool(tmp_path / "spool", map_size=1 << 30)
    yield s
    s.close()


class Recorded(EventBus):
    """The engine's event bus as these tests watch it: the JSON-lines log at ``path``
    (a real subscriber) and a count per event type."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.log = EventLog(path)
        self.counts: Counter[str] = Counter()
        super().__init__([self.log, self._count])

    def _count(self, events: Sequence[Event]) -> None:
        self.counts.update(type(e).__name__ for e in events)


@pytest.fixture
def events(tmp_path: Path):
    bus = Recorded(tmp_path / "events.jsonl")
    yield bus
    bus.log.close()


def read_events(events: Recorded) -> list:
    """The events about messages (shaping changes are read by the shaping tests)."""
    return [e for e in EventLog.read(events.path) if not isinstance(e, ShapingChange)]


async def _wait_until(pred: Callable[[], bool], timeout: float, step: float = 0.01) -> None:
    """Poll a condition with a deadline (for state that has no event to wait on)."""
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(step)


@pytest.fixture
def leap_clock() -> trio.testing.MockClock:
    """Virtual time for retry schedules (pytest-trio runs the test on a Clock fixture).

    Not ``autojump_threshold=0``: LMDB calls run in threads, and while one runs trio sees
    every task blocked, so a zero threshold would leap virtual time on every idle loop
    turn (seconds per fsync). An 80 ms real-time threshold leaps only when the engine
    really waits for its next due job, even on a loaded machine where an fsync can take
    tens of milliseconds (20 ms made the schedule tests flaky under load); the engine's
    poll interval is set long so each retry costs one leap. A thread slower than the
    threshold still lets the clock leap to the nearest deadline, so the tests wait by
    polling in short virtual steps (``_wait_until``), never on one far deadline."""
    return trio.testing.MockClock(autojump_threshold=0.08)


def queue_empty(spool: Spool) -> bool:
    return spool.next_due(0, 1) is None


def make_engine(cfg: Config, spool: Spool, events: EventBus, **kw: object) -> DeliveryEngine:
    """An engine with a group-commit writer of its own, as a worker gives it (the one
    production path: outcomes are committed by that writer); ``running`` runs both."""
    writer = kw.pop("writer", None) or GroupCommitWriter(spool, 0.0, 256)
    return DeliveryEngine(cfg, spool, 0, 1, events, "relay.test",
                          writer=writer, **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def running(engine: DeliveryEngine) -> AsyncIterator[DeliveryEngine]:
    async with trio.open_nursery() as n:
        await n.start(engine.writer.run)
        await n.start(engine.run)
        yield engine
        await engine.writer.aclose()
        n.cancel_scope.cancel()


async def start_sink(nursery: trio.Nursery, host: str = "127.0.0.2", port: int = 0,
                     **kw: object) -> tuple[Sink, int]:
    sink = Sink(**kw)  # type: ignore[arg-type]
    port = await nursery.start(sink.serve, host, port)
    return sink, port


# --------------------------------------------------------------------------- basics


#: The sink with CHUNKING (BDAT: a message is one round trip already) and without it
#: (DATA, like Postfix's smtp-sink: the next transaction rides behind the end of data).
CHUNKING = pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])


@CHUNKING
async def test_delivers_everything_and_empties_the_spool(spool, events, chunking):
    async with trio.open_nursery() as n:
        sink, port = await start_sink(n, keep_messages=True, chunking=chunking)
        msgs = [message([f"u{i}@a.test", f"v{i}@b.test"]) for i in range(20)]
        spool.store_batch(msgs)
        cfg = config({"a.test": [f"127.0.0.2:{port}"], "b.test": [f"127.0.0.2:{port}"]})
        engine = make_engine(cfg, spool, events)
        async with running(engine):
            await sink.wait_for(lambda s: s.total_recipients == 40, timeout=10)
            await _wait_until(lambda: queue_empty(spool), 5)
            # Idle (idle_timeout 0.5 s): connections QUIT, destinations are torn down.
            await sink.wait_for(lambda s: s.current_connections == 0, timeout=5)
            behind = engine.metrics.total("total_transactions_pipelined")
            await _wait_until(lambda: not engine.destinations, 5)
        n.cancel_scope.cancel()
    assert (behind > 0) is not chunking
    # Each message arrived whole, once per domain, with its own recipient.
    got = sorted((rcpts, body) for _, rcpts, body, _ in sink.messages)
    assert got == sorted([([f"u{i}@a.test"], m.data) for i, m in enumerate(msgs)]
                         + [([f"v{i}@b.test"], m.data) for i, m in enumerate(msgs)])
    evs = read_events(events)
    assert sum(isinstance(e, Delivery) for e in evs) == 40
    d = next(e for e in evs if isinstance(e, Delivery))
    assert d.reply.startswith("250") and d.ip == "127.0.0.2" and d.attempt == 1
    assert d.destination in ("a.test", "b.test")


@CHUNKING
async def test_recipients_per_message_and_deliveries_per_connection(spool, events, chunking):
    async with trio.open_nursery() as n:
        sink, port = await start_sink(n, chunking=chunking)
        t = Throttle(max_recipients_per_message=2, max_deliveries_per_connection=3,
                     max_connections=1)
        spool.store_batch([message([f"u{j}-{i}@a.test" for j in range(5)]) for i in range(4)])
        cfg = config({"a.test": [f"127.0.0.2:{port}"]}, domains={"a.test": t})
        async with running(make_engine(cfg, spool, events)):
            await sink.wait_for(lambda s: s.total_recipients == 20, timeout=10)
        n.cancel_scope.cancel()
    # 5 recipients, cap 2 -> transactions of 2, 2, 1; 12 transactions, 3 per connection.
    assert sorted(k for _, _, k in sink.arrivals) == [1] * 4 + [2] * 8
    assert sink.connections_opened == 4
    assert sink.max_concurrent_connections == 1


async def test_a_new_job_wakes_the_most_recently_idle_connection():
    """Idle connections are a stack: under a steady trickle the same connection takes
    every job (the others reach idle_timeout and QUIT) instead of all taking turns."""
    from relay.outbound.destination import Destination
    from relay.spool import DeliveryJob

    owner: Any = type("Owner", (), {"metrics": Metrics()})()  # _next_job needs no more
    limits = msgspec.structs.replace(Config().outbound.throttle_for("a.test"), idle_timeout=30.0)
    dest = Destination(owner, "a.test", limits)
    taken: list[tuple[str, str]] = []

    async def connection(name: str) -> None:
        while (job := await dest._next_job()) is not None:
            taken.append((name, job.queue_id))

    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            for name in ("first", "second", "third"):
                n.start_soon(connection, name)
                await trio.testing.wait_all_tasks_blocked()
            assert dest.idle == 3
            for i in range(3):
                dest.enqueue(DeliveryJob(queue_id=f"Q{i}", domain="a.test", recipients=[0],
                                         due=0.0))
                await trio.testing.wait_all_tasks_blocked()
            n.cancel_scope.cancel()
    assert taken == [("third", "Q0"), ("third", "Q1"), ("third", "Q2")]


async def test_an_idle_connection_ends_once_its_idle_timeout_has_passed(autojump_clock):
    """The manager's tick (``_expire_idlers``) ends the connections idle for longer than
    idle_timeout, and only those; one woken by a job before then takes it."""
    from relay.outbound.destination import Destination
    from relay.spool import DeliveryJob

    owner: Any = type("Owner", (), {"metrics": Metrics()})()
    limits = msgspec.structs.replace(Config().outbound.throttle_for("a.test"), idle_timeout=5.0)
    dest = Destination(owner, "a.test", limits)
    ended: dict[str, float] = {}

    async def connection(name: str) -> None:
        while await dest._next_job() is not None:
            pass
        ended[name] = trio.current_time()

    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            start = trio.current_time()
            n.start_soon(connection, "old")
            await trio.sleep(3.0)
            n.start_soon(connection, "new")
            await trio.sleep(2.5)  # "old" idle 5.5 s, "new" 2.5 s
            dest._expire_idlers()
            await trio.testing.wait_all_tasks_blocked()
            assert ended == {"old": start + 5.5}
            dest.enqueue(DeliveryJob(queue_id="Q", domain="a.test", recipients=[0], due=0.0))
            await trio.testing.wait_all_tasks_blocked()
            assert dest.queue == deque() and dest.idle == 1  # "new" took it, waits again
            await trio.sleep(5.0)
            dest._expire_idlers()
    assert ended["new"] == start + 10.5


# --------------------------------------------------------------------------- throttles


async def test_max_connections_never_exceeded(spool, events):
    async with trio.open_nursery() as n:
        # Each end of data takes 50 ms, so the engine wants many parallel connections.
        sink, port = await start_sink(n, delays={"a.test": 0.05, "b.test": 0.05})
        spool.store_batch([message([f"u{i}@a.test"]) for i in range(60)]
                          + [message([f"u{i}@b.test"]) for i in range(60)])
        cfg = config({"a.test": [f"127.0.0.2:{port}"], "b.test": [f"127.0.0.2:{port}"]},
                     domains={"a.test": Throttle(max_connections=3),
                              "b.test": Throttle(max_connections=5)})
        async with running(make_engine(cfg, spool, events)):
            await sink.wait_for(lambda s: s.total_messages == 120, timeout=20)
        n.cancel_scope.cancel()
    assert sink.stats["a.test"].max_concurrent_connections == 3
    assert sink.stats["b.test"].max_concurrent_connections == 5


@CHUNKING
async def test_message_rate_never_exceeded(spool, events, chunking):
    async with trio.open_nursery() as n:
        sink, port = await start_sink(n, chunking=chunking)
        spool.store_batch([message([f"u{i}@a.test"]) for i in range(40)]
                          + [message([f"u{i}@b.test"]) for i in range(40)])
        cfg = config({"a.test": [f"127.0.0.2:{port}"], "b.test": [f"127.0.0.2:{port}"]},
                     domains={"a.test": Throttle(max_message_rate="20/s", max_connections=4)})
        async with running(make_engine(cfg, spool, events)):
            await sink.wait_for(lambda s: s.total_messages == 80, timeout=20)
        n.cancel_scope.cancel()
    a = [t for t, d, _ in sink.arrivals if d == "a.test"]
    b = [t for t, d, _ in sink.arrivals if d == "b.test"]
    # Burst 1, then 20/s: any 1 s window holds at most 21, any 0.5 s window at most 11.
    assert sink.max_messages_in_window("a.test", 1.0) <= 21
    assert sink.max_messages_in_window("a.test", 0.5) <= 11
    assert (len(a) - 1) / (a[-1] - a[0]) <= 20.5
    # The unthrottled domain is not slowed by the throttled one.
    assert b[-1] - b[0] < (a[-1] - a[0]) / 2


# --------------------------------------------------------------------------- routing


async def test_failing_mx_falls_over_to_the_next(spool, events, dnsmasq):
    async with trio.open_nursery() as n:
        sink, port = await start_sink(n, host="127.0.0.3")
        # Nothing listens on 127.0.0.2:<port>: connection refused -> next MX.
        dns = dnsmasq(mx={"mx.test": [(10, "mx1.mx.test"), (20, "mx2.mx.test")]},
                      hosts={"mx1.mx.test": "127.0.0.2", "mx2.mx.test": "127.0.0.3"})
        spool.store_batch([message([f"u{i}@mx.test"]) for i in range(5)])
        cfg = config({}, resolvers=[dns.nameserver], smtp_port=port)
        async with running(make_engine(cfg, spool, events)):
            await sink.wait_for(lambda s: s.total_messages == 5, timeout=10)
            await _wait_until(lambda: queue_empty(spool), 5)
        n.cancel_scope.cancel()
    ds = [e for e in read_events(events) if isinstance(e, Delivery)]
    assert len(ds) == 5
    assert {(e.mx_host, e.ip) for e in ds} == {("mx2.mx.test", "127.0.0.3")}
    assert not any(isinstance(e, TransientFailure) for e in read_events(events))


async def test_null_mx_and_nxdomain_bounce_at_once(spool, events, dnsmasq):
    async with trio.open_nursery() as n:
        sink, port = await start_sink(n, keep_messages=True)
        dns = dnsmasq(null_mx=["nullmx.test"])
        spool.store_batch([message(["bob@nullmx.test"]), message(["carol@nx.test"])])
        cfg = config({"sender.test": [f"127.0.0.2:{port}"]}, resolvers=[dns.nameserver])
        async with running(make_engine(cfg, spool, events)):
            # Two DSNs reach the sender's sink; nothing else is queued.
            await sink.wait_for(lambda s: s.total_messages == 2, timeout=10)
            await _wait_until(lambda: queue_empty(spool), 5)
        n.cancel_scope.cancel()
    bounces = {e.recipient: e for e in read_events(events) if isinstance(e, Bounce)}
    assert "5.1.10" in bounces["bob@nullmx.test"].reply
    assert "5.1.2" in bounces["carol@nx.test"].reply
    assert all(b.dsn_queue_id and b.attempt == 1 for b in bounces.values())
    for mail_from, rcpts, data, _ in sink.messages:
        assert mail_from == "" and rcpts == ["alice@sender.test"]
        msg = email.message_from_bytes(data, policy=email.policy.default)
        assert msg.get_content_type() == "multipart/report"


# --------------------------------------------------------------------------- outcomes


@CHUNKING
async def test_5xx_bounces_with_a_parseable_dsn_to_the_sender(spool, events, chunking):
    async with trio.open_nursery() as n:
        sink, port = await start_sink(n, behaviours={"reject.test": Behaviour.REJECT},
                                      keep_messages=True, chunking=chunking)
        m = message(["bob@reject.test", "ok@reject-ok.test"])
        spool.store_batch([m])
        cfg = config({"reject.test": [f"127.0.0.2:{port}"],
                      "reject-ok.test": [f"127.0.0.2:{port}"],
                      "sender.test": [f"127.0.0.2:{port}"]})
        async with running(make_engine(cfg, spool, events)):
            await sink.wait_for(
                lambda s: any(mf == "" for mf, *_ in s.messages) and s.total_messages == 2,
                timeout=10)
            await _wait_until(lambda: queue_empty(spool), 5)
        n.cancel_scope.cancel()
    (dsn,) = [x for x in sink.messages if x[0] == ""]
    assert dsn[1] == ["alice@sender.test"]
    msg = email.message_from_bytes(dsn[2], policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert msg["To"] == "<alice@sender.test>" or "alice@sender.test" in msg["To"]
    status = [p for p in msg.walk() if p.get_content_type() == "message/delivery-status"]
    assert status, "DSN has a message/delivery-status part"
    text = dsn[2].decode()
    assert "bob@reject.test" in text and "Action: failed" in text
    assert "ok@reject-ok.test" not in text.split("Content-Type: message/delivery-status")[1]
    evs = read_events(events)
    (bounce,) = [e for e in evs if isinstance(e, Bounce)]
    assert bounce.recipient == "bob@reject.test" and bounce.reply.startswith("550")
    assert bounce.dsn_queue_id and bounce.mx_host == "127.0.0.2"


async def test_a_bounce_is_never_bounced(spool, events):
    """The sender's domain rejects too: the DSN bounces, and that produces nothing."""
    async with trio.open_nursery() as n:
        sink, port = await start_sink(n, behaviours={"reject.test": Behaviour.REJECT,
                                                     "sender.test": Behaviour.REJECT})
        spool.store_batch([message(["bob@reject.test"]),
                           message(["x@reject.test"], sender="")])  # null sender
        cfg = config({"reject.test": [f"127.0.0.2:{port}"],
                      "sender.test": [f"127.0.0.2:{port}"]})
        engine = make_engine(cfg, spool, events)
        async with running(engine):
            await _wait_until(lambda: len([e for e in read_events(events)
                                           if isinstance(e, Bounce)]) == 3, 10)
            await _wait_until(lambda: queue_empty(spool), 5)
        n.cancel_scope.cancel()
    bounces = [e for e in read_events(events) if isinstance(e, Bounce)]
    # bob's bounce -> one DSN; the null-sender message and the DSN itself -> no DSN.
    assert sorted(bool(b.dsn_queue_id) for b in bounces) == [False, False, True]
    assert sink.stats["sender.test"].rejects == 1


async def test_retries_follow_the_schedule(spool, events, leap_clock):
    """451 at RCPT: retried after 60, 120, 200 (cap), 200 s; then accepted. MockClock
    makes the schedule run instantly; timeouts are set far beyond it."""
    t = Throttle(retry_interval=60.0, max_retry_interval=200.0, idle_timeout=0.5,
                 connect_timeout=1e6, command_timeout=1e6, data_timeout=1e6, tls="off")
    async with trio.open_nursery() as n:
        sink, port = await start_sink(n, behaviours={"t.test": Behaviour.TEMPFAIL})
        spool.store_batch([message(["bob@t.test"])])
        cfg = config({"t.test": [f"127.0.0.2:{port}"]}, default=t)
        engine = make_engine(cfg, spool, events, poll_interval=1000)
        async with running(engine):
            await _wait_until(lambda: events.counts["TransientFailure"] >= 4, 1000, step=10)
            sink.set_behaviour("t.test", Behaviour.ACCEPT)
            # Polls, not sink.wait_for: a lone far deadline is where the mock clock
            # leaps while an LMDB thread runs long on a loaded machine (leap_clock).
            await _wait_until(lambda: sink.total_messages == 1, 1000, step=10)
            await _wait_until(lambda: events.counts["Delivery"] == 1, 100, step=10)
        n.cancel_scope.cancel()
    evs = read_events(events)
    tf = [e for e in evs if isinstance(e, TransientFailure)]
    assert [e.attempt for e in tf[:4]] == [1, 2, 3, 4]
    gaps = [b.time - a.time for a, b in itertools.pairwise(tf)][:3]
    assert gaps == pytest.approx([60, 120, 200], abs=0.5)
    assert all(e.next_attempt - e.time == pytest.approx(d, abs=0.01)
               for e, d in zip(tf, [60, 120, 200, 200], strict=False))
    (d,) = [e for e in evs if isinstance(e, Delivery)]
    assert d.attempt == len(tf) + 1


async def test_expiry_bounces_after_max_age(spool, events, leap_clock):
    t = Throttle(retry_interval=60.0, max_retry_interval=60.0, max_age=300.0,
                 idle_timeout=0.5, connect_timeout=1e6, command_timeout=1e6,
                 data_timeout=1e6, tls="off")
    async with trio.open_nursery() as n:
        sink, port = await start_sink(n, behaviours={"t.test": Behaviour.TEMPFAIL},
                                      keep_messages=True)
        spool.store_batch([message(["bob@t.test"])])
        cfg = config({"t.test": [f"127.0.0.2:{port}"],
                      "sender.test": [f"127.0.0.2:{port}"]}, default=t)
        engine = make_engine(cfg, spool, events, poll_interval=1000)
        async with running(engine):
            await _wait_until(lambda: events.counts["Expiration"] == 1, 2000, step=10)
            await _wait_until(lambda: sink.total_messages == 1, 100, step=10)
            await _wait_until(lambda: queue_empty(spool), 100, step=10)
        n.cancel_scope.cancel()
    evs = read_events(events)
    (exp,) = [e for e in evs if isinstance(e, Expiration)]
    assert exp.dsn_queue_id and exp.queued_seconds >= 300
    assert sink.messages[0][0] == "" and sink.messages[0][1] == ["alice@sender.test"]


# --------------------------------------------------------------------------- isolation


async def test_destination_answering_421_is_backed_off_as_a_whole(spool, events):
    async with trio.open_nursery() as n:
        busy = Sink()
        bport = await n.start(busy.serve, "127.0.0.3", 0)
        await n.start(busy.serve, "127.0.0.2", bport)
        busy_421 = Sink(default=Behaviour.GREET_421)
        await n.start(busy_421.serve, "127.0.0.4", 0)
        port421 = next(iter(busy_421.listeners))[1]
        spool.store_batch([message([f"u{i}@busy.test"]) for i in range(30)])
        cfg = config({"busy.test": [f"127.0.0.4:{port421}"]},
                     domains={"busy.test": Throttle(max_connections=5,
                                                    retry_interval=100.0)})
        engine = make_engine(cfg, spool, events)
        async with running(engine):
            await _wait_until(lambda: events.counts["TransientFailure"] == 30, 10)
            dest = engine.destinations["busy.test"]
            assert dest.backed_off
        n.cancel_scope.cancel()
    # Not hammered: at most max_connections tries (those already connecting), not 30.
    assert busy_421.connections_opened <= 5
    tf = [e for e in read_events(events) if isinstance(e, TransientFailure)]
    assert all(e.next_attempt - e.time >= 99 for e in tf)
    assert all("421" in e.reply or "suspended" in e.reply for e in tf), [e.reply for e in tf]


async def test_slow_domain_does_not_delay_a_healthy_one(spool, events):
    async with trio.open_nursery() as n:
        sink, port = await start_sink(n, behaviours={"slow.test": Behaviour.STALL},
                                      stall_seconds=30.0)
        slow_first = [message([f"u{i}@slow.test"]) for i in range(50)]
        healthy = [message([f"u{i}@fast.test"]) for i in range(50)]
        spool.store_batch(slow_first)
        spool.store_batch(healthy)
        slow_t = Throttle(command_timeout=30.0, max_connections=10)
        cfg = config({"slow.test": [f"127.0.0.2:{port}"], "fast.test": [f"127.0.0.2:{port}"]},
                     domains={"slow.test": slow_t})
        async with running(make_engine(cfg, spool, events)):
            t0 = trio.current_time()
            await sink.wait_for(lambda s: s.stats["fast.test"].messages == 50, timeout=10)
            elapsed = trio.current_time() - t0
            # The slow domain holds every connection slow start gives it before its
            # first delivery (the last may still be opening when the healthy one is
            # done), and has delivered nothing.
            start = min(10, Config().shaping.initial_connections)
            await sink.wait_for(
                lambda s: s.stats["slow.test"].current_connections == start, timeout=5)
            assert sink.stats["slow.test"].messages == 0
        n.cancel_scope.cancel()
    assert elapsed < 3.0


# --------------------------------------------------------------------------- hand-off


async def test_wakeup_hands_off_between_workers_promptly(tmp_path, spool, events):
    """A message committed by 'another worker' (a GroupCommitWriter whose on_commit pokes
    the owner) is picked up well before the engine's (here 60 s) poll interval."""
    waker = Waker(tmp_path / "spool")
    async with trio.open_nursery() as n:
        sink, port = await start_sink(n)
        cfg = config({"a.test": [f"127.0.0.2:{port}"]})
        engine = make_engine(cfg, spool, events, waker=waker,
                                poll_interval=60.0)
        writer = GroupCommitWriter(spool, 0.001, 64, on_commit=lambda msgs: waker.notify({0}))
        await n.start(writer.run)
        async with running(engine):
            # Let the engine reach its idle wait (nothing due, poll 60 s).
            await _wait_until(
                lambda: not engine._held and waker.metrics.get("wakeups_sent") == 0, 1)
            latencies = []
            for i in range(5):
                t0 = trio.current_time()
                await writer.submit(message([f"u{i}@a.test"]))
                await sink.wait_for(lambda s, k=i + 1: s.total_messages == k, timeout=5)
                latencies.append(trio.current_time() - t0)
        await writer.aclose()
        n.cancel_scope.cancel()
    waker.close()
    assert max(latencies) < 1.0


async def test_own_shard_mail_goes_from_the_commit_to_delivery_without_a_claim(
        spool, events, monkeypatch):
    """With the engine as the writer's claimant, a message for its shard is stored
    already claimed and handed over in memory: delivered promptly with no wake-up, no
    poll (60 s) and no claim by the scheduler; the spool ends empty."""
    scheduler_claims: list[str] = []
    due_jobs = spool.due_jobs

    def spy(*a: object, **k: object) -> list:
        jobs = due_jobs(*a, **k)
        scheduler_claims.extend(j.queue_id for j in jobs)
        return jobs

    monkeypatch.setattr(spool, "due_jobs", spy)
    async with trio.open_nursery() as n:
        sink, port = await start_sink(n)
        cfg = config({"a.test": [f"127.0.0.2:{port}"]})
        writer = GroupCommitWriter(spool, 0.0, 64)
        engine = make_engine(cfg, spool, events, writer=writer, poll_interval=60.0)
        writer.claimant = engine
        async with running(engine):
            for i in range(5):
                await writer.submit(message([f"u{i}@a.test", f"v{i}@a.test"]))
            await sink.wait_for(lambda s: s.total_messages == 5, timeout=5)
            await _wait_until(lambda: queue_empty(spool), 5)
        n.cancel_scope.cancel()
    assert scheduler_claims == []
    assert events.counts["Delivery"] == 10


async def test_apply_config_changes_a_running_destination(spool, events):
    async with trio.open_nursery() as n:
        sink, port = await start_sink(n)
        spool.store_batch([message([f"u{i}@a.test"]) for i in range(30)])
        routes = {"a.test": [f"127.0.0.2:{port}"]}
        cfg = config(routes, domains={"a.test": Throttle(max_message_rate="5/s")})
        engine = make_engine(cfg, spool, events)
        async with running(engine):
            await sink.wait_for(lambda s: s.total_messages >= 3, timeout=10)
            engine.apply_config(config(routes, domains={"a.test": Throttle()}))
            t0 = trio.current_time()
            await sink.wait_for(lambda s: s.total_messages == 30, timeout=10)
            assert trio.current_time() - t0 < 2.0  # 27 more at 5/s would take 5 s
            await _wait_until(lambda: queue_empty(spool), 5)
        n.cancel_scope.cancel()
    assert events.counts["Delivery"] == 30


async def test_backlogged_destination_does_not_starve_others(spool, events):
    """A throttled domain with a big backlog is capped in memory; the excess goes back to
    the spool, so jobs of other domains are still claimed and delivered at once."""
    async with trio.open_nursery() as n:
        sink, port = await start_sink(n)
        spool.store_batch([message([f"u{i}@throttled.test"]) for i in range(300)])
        spool.store_batch([message([f"u{i}@fast.test"]) for i in range(50)])
        cfg = config({"throttled.test": [f"127.0.0.2:{port}"],
                      "fast.test": [f"127.0.0.2:{port}"]},
                     domains={"throttled.test": Throttle(max_message_rate="5/s")})
        engine = make_engine(cfg, spool, events, claim_batch=40,
                                max_in_memory=60, max_per_destination=20)
        async with running(engine):
            t0 = trio.current_time()
            await sink.wait_for(lambda s: s.stats["fast.test"].messages == 50, timeout=10)
            elapsed = trio.current_time() - t0
            assert len(engine.destinations["throttled.test"].queue) <= 20
        n.cancel_scope.cancel()
    assert elapsed < 5.0
    assert sink.stats["throttled.test"].messages < 40
    # Nothing was lost or counted as an attempt: the rest is still queued, untouched.
    assert events.counts["TransientFailure"] == 0


async def test_a_provider_shares_one_connection_limit(spool, events, dnsmasq):
    """Domains hosted at one provider: one destination, one connection limit (the
    provider's block), and a member's own stricter connection cap holds inside it
    (counted as its transactions in flight, which bound its connections)."""
    async with trio.open_nursery() as n:
        sink, port = await start_sink(n, delays={"one.test": 0.1, "two.test": 0.1})
        dns = dnsmasq(mx={"one.test": [(10, "mx.provider.test")],
                          "two.test": [(10, "mx.provider.test")]},
                      hosts={"mx.provider.test": "127.0.0.2"})
        spool.store_batch([message([f"u{i}@one.test"]) for i in range(30)]
                          + [message([f"u{i}@two.test"]) for i in range(30)])
        cfg = config({}, resolvers=[dns.nameserver], smtp_port=port,
                     providers={"prov": Provider(match_mx=["*.provider.test"],
                                                 max_connections=3)},
                     domains={"two.test": Throttle(max_connections=1)})
        engine = make_engine(cfg, spool, events)
        async with running(engine):
            await sink.wait_for(lambda s: s.total_messages == 60, timeout=20)
            assert set(engine.destinations) == {"provider:prov"}
        n.cancel_scope.cancel()
    assert sink.max_concurrent_connections == 3
    # Each message takes 0.1 s at the sink: two arrivals of a domain within 0.09 s were
    # delivered at the same time. two.test never had two in flight; one.test did.
    two = sorted(t for t, d, _n in sink.arrivals if d == "two.test")
    assert sink.max_messages_in_window("two.test", 0.09) == 1, [
        round(b - a, 4) for a, b in itertools.pairwise(two)]
    assert sink.max_messages_in_window("one.test", 0.09) >= 2
    assert {e.destination for e in read_events(events)} == {"provider:prov"}


async def test_restart_resumes_jobs_claimed_by_a_dead_worker(tmp_path, spool, events):
    """A worker claimed jobs (600 s lease) and died: the restarted engine releases the
    dead pid's claims at start and delivers at once, not after the lease."""
    import subprocess
    import sys

    spool.store_batch([message([f"u{i}@a.test"]) for i in range(10)])
    claim = ("import sys, time; from relay.spool import Spool; "
             "s = Spool(sys.argv[1], map_size=1 << 30); "
             "print(len(s.due_jobs(time.time() + 1, 0, 1, 100, lease=600.0)))")
    out = subprocess.run([sys.executable, "-c", claim, str(tmp_path / "spool")],
                         capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "10"  # claimed by a process that has now exited
    assert spool.next_due(0, 1) > time.time() + 500
    async with trio.open_nursery() as n:
        sink, port = await start_sink(n)
        cfg = config({"a.test": [f"127.0.0.2:{port}"]})
        async with running(make_engine(cfg, spool, events)):
            await sink.wait_for(lambda s: s.total_messages == 10, timeout=10)
            await _wait_until(lambda: queue_empty(spool), 5)
        n.cancel_scope.cancel()


async def test_outcomes_through_the_workers_writer(spool, events):
    """With ``writer=``, outcomes share the inbound group commit (one fsync for both)."""
    async with trio.open_nursery() as n:
        sink, port = await start_sink(n, behaviours={"reject.test": Behaviour.REJECT})
        writer = GroupCommitWriter(spool, 0.001, 256)
        spool.store_batch([message([f"u{i}@a.test"]) for i in range(20)]
                          + [message(["bob@reject.test"])])
        cfg = config({"a.test": [f"127.0.0.2:{port}"], "reject.test": [f"127.0.0.2:{port}"],
                      "sender.test": [f"127.0.0.2:{port}"]})
        engine = make_engine(cfg, spool, events, writer=writer)
        async with running(engine):
            # 20 deliveries + the DSN for bob (stored through the writer, then delivered).
            await sink.wait_for(lambda s: s.total_messages == 21, timeout=10)
            await _wait_until(lambda: queue_empty(spool), 5)
        n.cancel_scope.cancel()
    assert writer.metrics.get("spool_commits") < 21 + 1  # shared commits
    assert events.counts["Delivery"] == 21 and events.counts["Bounce"] == 1


async def test_connection_rate_is_paced(spool, events):
    async with trio.open_nursery() as n:
        sink, port = await start_sink(n)
        spool.store_batch([message([f"u{i}@a.test"]) for i in range(12)])
        t = Throttle(max_connection_rate="4/s", max_deliveries_per_connection=1,
                     max_connections=20)
        cfg = config({"a.test": [f"127.0.0.2:{port}"]}, domains={"a.test": t})
        async with running(make_engine(cfg, spool, events)):
            t0 = trio.current_time()
            await sink.wait_for(lambda s: s.total_messages == 12, timeout=10)
            elapsed = trio.current_time() - t0
        n.cancel_scope.cancel()
    assert sink.connections_opened == 12
    # Burst of 4, then 4/s: the 12th connection opens no earlier than 2 s in.
    assert elapsed >= 1.9


async def test_an_operator_retry_lifts_the_destination_backoff(spool, events):
    """`relay queue retry`: a job of a backed-off destination (nobody listened, backoff
    100 s) is tried at once, not re-deferred with "delivery temporarily suspended"."""
    from bench.peers import free_port

    port = free_port()
    msg = message(["bob@late.test"])
    spool.store_batch([msg])
    cfg = config({"late.test": [f"127.0.0.2:{port}"]},
                 default=msgspec.structs.replace(FAST, retry_interval=100.0))
    engine = make_engine(cfg, spool, events)
    async with trio.open_nursery() as n, running(engine):
        await _wait_until(lambda: events.counts["TransientFailure"] == 1, 10)
        assert engine.destinations["late.test"].backed_off
        sink = Sink()
        await n.start(sink.serve, "127.0.0.2", port)
        assert spool.retry_now(queue_id=msg.envelope.queue_id) == 1
        engine.poke()
        await sink.wait_for(lambda s: s.total_messages == 1, timeout=5)
        await _wait_until(lambda: events.counts["Delivery"] == 1, 5)
        n.cancel_scope.cancel()
    delivered = [e for e in read_events(events) if isinstance(e, Delivery)]
    assert delivered[0].attempt == 2
    assert not [e for e in read_events(events) if "suspended" in getattr(e, "reply", "")]


async def _swallow_the_dot(stream: trio.SocketStream) -> None:
    """A server that takes a whole message and hangs up before answering the dot."""
    buf = b""
    replies = [b"220 mx.test\r\n", b"250-mx.test\r\n250 PIPELINING\r\n", b"250 ok\r\n",
               b"250 ok\r\n", b"354 go\r\n"]
    with contextlib.suppress(trio.BrokenResourceError):
        await stream.send_all(replies.pop(0))
        while b"\r\n.\r\n" not in buf:
            data = await stream.receive_some(65536)
            if not data:
                return
            buf += data
            while replies and buf.count(b"\r\n") >= 5 - len(replies):
                await stream.send_all(replies.pop(0))
    await stream.aclose()


@pytest.mark.parametrize(("policy", "kind"), [("retry", TransientFailure),
                                              ("delivered", Delivery)])
async def test_a_connection_lost_after_the_dot_is_ambiguous(spool, events, policy, kind):
    async with trio.open_nursery() as n:
        listeners = await n.start(functools.partial(trio.serve_tcp, host="127.0.0.2"),
                                  _swallow_the_dot, 0)
        port = listeners[0].socket.getsockname()[1]
        spool.store_batch([message(["bob@maybe.test"])])
        cfg = config({"maybe.test": [f"127.0.0.2:{port}"]},
                     domains={"maybe.test": Throttle(ambiguous=policy)})
        async with running(make_engine(cfg, spool, events)):
            await _wait_until(lambda: events.counts[kind.__name__] == 1, 10)
        n.cancel_scope.cancel()
    [event] = [e for e in read_events(events) if e.recipient == "bob@maybe.test"]
    assert isinstance(event, kind) and event.ambiguous
    assert "may be sent more than once" in event.reply
    assert queue_empty(spool) == (policy == "delivered")


async def test_a_dns_timeout_is_one_deferral_with_its_time_and_one_status(spool, events):
    """The deferral reply names the DNS failure once (not "451 4.4.1 451 4.4.3 ...") and
    the event counts the time the lookup took."""
    from relay.outbound.resolver import Resolver

    silent = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await silent.bind(("127.0.0.1", 0))
    dns = f"127.0.0.1:{silent.getsockname()[1]}"
    spool.store_batch([message(["bob@slowdns.test"])])
    cfg = config({}, resolvers=[dns])
    engine = make_engine(cfg, spool, events, resolver=Resolver([dns], timeout=0.3))
    async with running(engine):
        await _wait_until(lambda: events.counts["TransientFailure"] == 1, 10)
    silent.close()
    [tf] = [e for e in read_events(events) if isinstance(e, TransientFailure)]
    assert tf.reply == "451 4.4.3 DNS lookup of slowdns.test failed: LifetimeTimeout"
    assert tf.seconds >= 0.3
