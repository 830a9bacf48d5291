"""Egress pools and traffic shaping against real sinks on several loopback addresses.

The sinks record each client's source address (``Sink.sources``), so these tests prove
which source carried what; a "pushback" sink enforces a limit the relay is not told and
answers ``421 4.7.28`` above it.
"""

from __future__ import annotations

import datetime
import itertools
import time
from pathlib import Path

import msgspec
import pytest
import trio

from bench.sink import Behaviour, Sink
from relay.config import (
    Config,
    EgressConfig,
    EgressPool,
    EgressSource,
    OutboundConfig,
    PoolMember,
    Route,
    ShapingConfig,
    ShapingRule,
    Throttle,
    WarmupStep,
)
from relay.events import EventLog, TransientFailure
from relay.events.types import ShapingChange
from relay.spool import Spool
from relay.spool.shaping import ShapingStore
from tests.integration.test_delivery_engine import (
    FAST,
    Recorded,
    make_engine,
    message,
    running,
)

A, B = "127.0.0.11", "127.0.0.12"


@pytest.fixture
def spool(tmp_path: Path):
    s = Spool(tmp_path / "spool", map_size=1 << 30)
    yield s
    s.close()


@pytest.fixture
def events(tmp_path: Path):
    bus = Recorded(tmp_path / "events.jsonl")
    yield bus
    bus.log.close()


def pooled(port: int, sources: dict[str, EgressSource], weights: dict[str, int], *,
           shaping: ShapingConfig | None = None, default: Throttle = FAST) -> Config:
    return Config(
        outbound=OutboundConfig(routes=[Route(domain="*", hosts=[f"127.0.0.2:{port}"])],
                                default=default),
        egress=EgressConfig(sources=sources, default_pool="p", pools={"p": EgressPool(
            sources=[PoolMember(source=n, weight=w) for n, w in weights.items()])}),
        shaping=shaping or ShapingConfig(default_rules=False))


async def test_a_pool_spreads_mail_over_its_sources_by_weight(spool, events):
    async with trio.open_nursery() as n:
        sink = Sink()
        port = await n.start(sink.serve, "127.0.0.2", 0)
        spool.store_batch([message([f"u{i}@a.test"]) for i in range(40)])
        cfg = pooled(port, {"a": EgressSource(source_address=A, ehlo_domain="mta-a.test"),
                            "b": EgressSource(source_address=B)}, {"a": 3, "b": 1})
        async with running(make_engine(cfg, spool, events)):
            await sink.wait_for(lambda s: s.total_messages == 40, timeout=15)
        n.cancel_scope.cancel()
    assert sink.sources[A].messages == 30
    assert sink.sources[B].messages == 10
    delivered = [e for e in EventLog.read(events.path) if type(e).__name__ == "Delivery"]
    assert {e.destination for e in delivered} == {"a->a.test", "b->a.test"}


async def test_a_source_that_cannot_be_bound_is_left_out_and_the_pool_carries_on(
        spool, events):
    async with trio.open_nursery() as n:
        sink = Sink()
        port = await n.start(sink.serve, "127.0.0.2", 0)
        spool.store_batch([message([f"u{i}@a.test"]) for i in range(20)])
        # 192.0.2.1 (TEST-NET-1) is not an address of this host: bind() fails.
        cfg = pooled(port, {"gone": EgressSource(source_address="192.0.2.1"),
                            "b": EgressSource(source_address=B)}, {"gone": 1, "b": 1})
        async with running(make_engine(cfg, spool, events)):
            await sink.wait_for(lambda s: s.total_messages == 20, timeout=20)
        n.cancel_scope.cancel()
    assert sink.sources[B].messages == 20 and set(sink.sources) == {B}
    changes = [e for e in EventLog.read(events.path) if isinstance(e, ShapingChange)]
    assert [(c.scope, c.rule, c.after) for c in changes] == [
        ("source:gone", "bind", "suspended")]
    assert "cannot send from 192.0.2.1" in changes[0].reason
    # The jobs that met the unbindable source went back without an attempt counted.
    failures = [e for e in EventLog.read(events.path) if isinstance(e, TransientFailure)]
    assert all(e.attempt == 0 or "192.0.2.1" in e.reply for e in failures)


async def test_a_warming_source_carries_its_daily_cap_and_the_rest_goes_elsewhere(
        spool, events):
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    warming = EgressSource(source_address=A, warmup_start=today,
                           warmup=[WarmupStep(day=1, daily_cap=5)])
    async with trio.open_nursery() as n:
        sink = Sink()
        port = await n.start(sink.serve, "127.0.0.2", 0)
        spool.store_batch([message([f"u{i}@a.test"]) for i in range(30)])
        cfg = pooled(port, {"new": warming, "old": EgressSource(source_address=B)},
                     {"new": 1, "old": 1})
        async with running(make_engine(cfg, spool, events)):
            await sink.wait_for(lambda s: s.total_messages == 30, timeout=15)
        n.cancel_scope.cancel()
    assert sink.sources[A].messages == 5
    assert sink.sources[B].messages == 25


SUSPEND_ON_4728 = ShapingRule(id="test-4.7.28", domain="push.test", enhanced="4.7.28",
                              action="suspend", duration="2h",
                              cite="https://support.google.com/a/answer/3726730")


async def test_a_rule_suspends_the_path_and_a_restart_remembers_it(spool, events):
    shaping = ShapingConfig(rules=[SUSPEND_ON_4728], default_rules=False, adaptive=False)
    async with trio.open_nursery() as n:
        sink = Sink(pushback_rate=5, pushback_window=3600.0)
        port = await n.start(sink.serve, "127.0.0.2", 0)
        spool.store_batch([message([f"u{i}@push.test"]) for i in range(20)])
        cfg = pooled(port, {"a": EgressSource(source_address=A)}, {"a": 1}, shaping=shaping,
                     default=msgspec.structs.replace(FAST, max_connections=1))
        started = time.time()
        async with running(make_engine(cfg, spool, events)):
            await sink.wait_for(lambda s: s.pushback_refusals >= 1, timeout=15)
            with trio.fail_after(10):
                while not [e for e in EventLog.read(events.path)
                           if isinstance(e, ShapingChange)]:
                    await trio.sleep(0.02)
        opened = sink.connections_opened
        [change] = [e for e in EventLog.read(events.path) if isinstance(e, ShapingChange)]
        assert (change.scope, change.rule) == ("a->push.test", "test-4.7.28")
        assert "421 4.7.28" in change.reason
        assert change.until == pytest.approx(started + 7200, abs=30)
        # Kept in the spool, so a new engine (a restarted worker) holds the path too.
        with trio.fail_after(10):
            while not ShapingStore(spool).entries(time.time()):
                await trio.sleep(0.02)
        [entry] = ShapingStore(spool).entries(time.time())
        assert (entry.scope, entry.origin, entry.suspend) == (
            "a->push.test", "rule:test-4.7.28", True)
        spool.retry_now(domain="push.test")  # even an operator's retry of due mail ...
        async with running(make_engine(cfg, spool, Recorded(Path(events.path + ".2")))):
            await trio.sleep(1.0)  # ... opens nothing while suspended (nothing to await)
        n.cancel_scope.cancel()
    assert sink.total_messages == 5
    assert sink.connections_opened == opened


async def test_pushback_cuts_the_rate_and_probes_with_one_connection(spool, events):
    """The hidden limit: 10 messages per 2 s per source address. After a refusal the
    relay pauses and comes back with ONE connection, never a reconnect storm."""
    shaping = ShapingConfig(default_rules=False, pause=0.3, max_pause=2.0, window=2.0,
                            clean_interval=1.0, initial_connections=5)
    async with trio.open_nursery() as n:
        sink = Sink(pushback_rate=10, pushback_window=2.0, record_arrivals=True)
        port = await n.start(sink.serve, "127.0.0.2", 0)
        spool.store_batch([message([f"u{i}@push.test"]) for i in range(40)])
        cfg = pooled(port, {"a": EgressSource(source_address=A)}, {"a": 1}, shaping=shaping,
                     default=msgspec.structs.replace(FAST, max_connections=5,
                                                     retry_interval=1.0))
        async with running(make_engine(cfg, spool, events)):
            await sink.wait_for(lambda s: s.total_messages == 40, timeout=60)
        n.cancel_scope.cancel()
    stats = sink.sources[A]
    windows = stats.refusal_windows()
    assert windows, "the sink never pushed back"
    # At most one connection per refusal window after the first (which may see the
    # connections already open when the first 421 came).
    assert all(w.connections <= 2 for w in windows[1:]), [w.connections for w in windows]
    changes = [e for e in EventLog.read(events.path)
               if isinstance(e, ShapingChange) and e.rule == "adaptive"]
    assert changes and "rate unlimited" in changes[0].before
    assert "/min" in changes[0].after
    # Refusals are few next to deliveries: the loop found the limit.
    assert stats.refusals <= 10
    learned = [e for e in ShapingStore(spool).entries(time.time()) if e.origin == "adaptive"]
    assert learned and learned[0].learned is not None and learned[0].learned.cut


async def test_a_connection_idle_when_the_pause_begins_sends_nothing_until_it_ends(
        spool, events):
    """Pushback pauses the whole path: a job that comes during the pause waits for its
    end even when a connection of the path sits idle, ready to take it."""
    pause = 1.5
    shaping = ShapingConfig(default_rules=False, pause=pause, max_pause=pause,
                            initial_connections=4)
    async with trio.open_nursery() as n:
        # 4 messages a second per address, then 421 4.7.28
        sink = Sink(pushback_rate=4, pushback_window=1.0, record_arrivals=True)
        port = await n.start(sink.serve, "127.0.0.2", 0)
        spool.store_batch([message([f"u{i}@push.test"]) for i in range(5)])
        cfg = pooled(port, {"a": EgressSource(source_address=A)}, {"a": 1}, shaping=shaping,
                     default=msgspec.structs.replace(FAST, max_connections=4,
                                                     idle_timeout=30.0))
        async with running(make_engine(cfg, spool, events)) as engine:
            await sink.wait_for(lambda s: s.total_messages == 4 and s.pushback_refusals, 10)
            with trio.fail_after(10):
                while not events.counts["ShapingChange"]:
                    await trio.sleep(0.01)
            spool.store_batch([message(["late@push.test"])])
            engine.poke()
            await sink.wait_for(lambda s: s.total_messages == 5, timeout=10)
        n.cancel_scope.cancel()
    stats = sink.sources[A]
    refused = stats.refusal_times[0]
    # The pause began after the refusal reached the relay, so no sooner than this:
    assert stats.message_times[-1] >= refused + pause, (refused, stats.message_times)


async def test_the_pool_header_picks_the_pool_and_never_leaves_the_relay(tmp_path):
    from relay.intake import Admission
    from relay.intake.admission import Refused
    from relay.intake.pools import PoolChoice

    egress = EgressConfig(sources={"a": EgressSource(), "b": EgressSource()},
                          pools={"one": EgressPool(sources=[PoolMember(source="a")]),
                                 "two": EgressPool(sources=[PoolMember(source="b")])},
                          default_pool="one", tenant_pools={"acme": "two"})
    stage = PoolChoice(egress)

    def admitted(data: bytes, **env: object) -> Admission:
        msg = message(["x@a.test"], **env)
        adm = Admission(envelope=msg.envelope, data=data, via="smtp")
        stage.admit(adm)
        return adm

    adm = admitted(b"X-VirtualMTA: two\r\nSubject: hi\r\n\r\nbody\r\n")
    assert adm.envelope.ip_pool == "two" and b"X-VirtualMTA" not in adm.data
    assert admitted(b"Subject: hi\r\n\r\n", tenant="acme").envelope.ip_pool == "two"
    assert admitted(b"Subject: hi\r\n\r\n").envelope.ip_pool == "one"
    with pytest.raises(Refused) as refused:
        admitted(b"X-VirtualMTA: three\r\n\r\n")
    assert (refused.value.reply.code, refused.value.reply.status) == (550, "5.7.1")


def test_a_relay_sends_each_pool_from_its_own_address_and_strips_the_header(tmp_path):
    """The whole relay: SMTP in (the pool named by X-VirtualMTA, or the default), each
    message out from its pool's source address, the header gone."""
    import smtplib

    from tests.integration.relayproc import make_relay, wait_for
    from tests.integration.smtpsink import RecordingSink

    sink = RecordingSink()
    relay = make_relay(tmp_path, extra=f"""
[outbound]
smart_host = "127.0.0.1:{sink.port}"
[outbound.default]
tls = "off"
[egress]
default_pool = "one"
[egress.sources.a]
source_address = "{A}"
[egress.sources.b]
source_address = "{B}"
[egress.pools.one]
sources = [{{ source = "a" }}]
[egress.pools.two]
sources = [{{ source = "b" }}]
""").start()
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.sendmail("s@sender.test", ["x@dest.test"],
                            "Subject: default pool\r\n\r\nhello\r\n")
            client.sendmail("s@sender.test", ["y@dest.test"],
                            "X-VirtualMTA: two\r\nSubject: pool two\r\n\r\nhello\r\n")
            code, _ = client.mail("s@sender.test")
            client.rcpt("z@dest.test")
            code, reply = client.data(b"X-VirtualMTA: nowhere\r\nSubject: x\r\n\r\nx\r\n")
            assert (code, reply[:5]) == (550, b"5.7.1"), reply
        wait_for(lambda: len(sink.messages) == 2, 20, "both messages at the sink")
        with sink.lock:
            by_subject = {raw.split(b"Subject: ")[1].split(b"\r\n")[0]: (peer, raw)
                          for (_, _, raw), peer in zip(sink.messages, sink.peers,
                                                       strict=True)}
        assert by_subject[b"default pool"][0] == A
        assert by_subject[b"pool two"][0] == B
        assert all(b"X-VirtualMTA" not in raw for _, raw in by_subject.values())
    finally:
        relay.stop()
        sink.close()


async def test_a_destination_refusing_at_the_greeting_is_probed_with_one_connection(
        spool, events):
    """No reconnect storm: after the first round (the connections slow start opened at
    once) every round after a backoff is a single probe connection."""
    async with trio.open_nursery() as n:
        sink = Sink(default=Behaviour.GREET_421, record_arrivals=True)
        port = await n.start(sink.serve, "127.0.0.2", 0)
        spool.store_batch([message([f"u{i}@busy.test"]) for i in range(30)])
        cfg = Config(outbound=OutboundConfig(
            routes=[Route(domain="*", hosts=[f"127.0.0.2:{port}"])],
            default=msgspec.structs.replace(FAST, retry_interval=0.3, max_retry_interval=0.6,
                                            max_connections=10)),
            shaping=ShapingConfig(default_rules=False, pause=0.3, max_pause=0.6))
        engine = make_engine(cfg, spool, events, poll_interval=0.05)
        async with running(engine):
            await sink.wait_for(lambda s: s.connections_opened >= 8, timeout=20)
        n.cancel_scope.cancel()
    times = sorted(t for s in sink.sources.values() for t in s.connection_times)
    first = [t for t in times if t - times[0] < 0.2]
    assert len(first) <= ShapingConfig().initial_connections
    later = times[len(first):]
    gaps = [b - a for a, b in itertools.pairwise(later)]
    assert gaps and min(gaps) >= 0.25, gaps  # one probe per backoff, never a burst


@pytest.mark.parametrize("scope", ["domain:held.test", "tenant:acme", "campaign:spring"])
async def test_an_operator_suspension_holds_mail_until_it_is_resumed(spool, events, scope):
    """What `relay queue suspend` writes (an admin entry in the spool's shaping table) is
    seen by a running engine within a scheduler round, and `resume` lets the mail go."""
    from relay.spool.shaping import ShapingEntry

    store = ShapingStore(spool)
    store.put([ShapingEntry(scope=scope, origin="admin", suspend=True,
                            reason=f"held by the test ({scope})")])
    async with trio.open_nursery() as n:
        sink = Sink()
        port = await n.start(sink.serve, "127.0.0.2", 0)
        spool.store_batch([message([f"u{i}@held.test"], tenant="acme", campaign_id="spring")
                           for i in range(5)])
        spool.store_batch([message([f"u{i}@free.test"]) for i in range(5)])
        cfg = Config(outbound=OutboundConfig(
            routes=[Route(domain="*", hosts=[f"127.0.0.2:{port}"])], default=FAST),
            shaping=ShapingConfig(default_rules=False))
        async with running(make_engine(cfg, spool, events, poll_interval=0.05)):
            await sink.wait_for(lambda s: s.stats["free.test"].messages == 5, timeout=10)
            with trio.fail_after(10):  # the held mail was looked at, and deferred
                while not [e for e in EventLog.read(events.path)
                           if isinstance(e, TransientFailure) and "held by the test" in e.reply]:
                    await trio.sleep(0.02)
            assert sink.stats["held.test"].messages == 0
            store.remove(scope, "admin")
            # A deferral's event comes before its commit, and retry_now leaves a job
            # still claimed alone: flush until all five were made due.
            flushed = 0
            with trio.fail_after(10):
                while (flushed := flushed + spool.retry_now(domain="held.test")) < 5:
                    await trio.sleep(0.02)
            await sink.wait_for(lambda s: s.stats["held.test"].messages == 5, timeout=10)
        n.cancel_scope.cancel()
    # Being held was not an attempt: the delivery after the resume is the first one.
    delivered = [e for e in EventLog.read(events.path) if type(e).__name__ == "Delivery"
                 and e.recipient.endswith("@held.test")]
    assert len(delivered) == 5 and {e.attempt for e in delivered} == {1}
