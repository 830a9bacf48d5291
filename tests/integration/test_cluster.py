"""Cluster-wide limits through a real redis-server (issue 18): relay.outbound.cluster.

First the limiters themselves, several ``Cluster`` objects (one per simulated node) on one
Redis in this process: the stated rate bound holds over every window, connection slots
never exceed the limit in total, Redis killed or stopped puts every node on its local
share at once (within the call timeout) and back when it answers. Then whole nodes: two
and three ``relay serve`` processes, each with its own spool, port and source address,
send to one sink domain limited to 4 connections and 600/min: the sink never sees more in
total (it sees twice as much without the cluster); one node killed with SIGKILL frees its
slots within the lease TTL; Redis killed mid-run and started again; nothing is lost.
"""

from __future__ import annotations

import json
import smtplib
from pathlib import Path

import pytest
import trio

from bench.cluster import most_in_window
from bench.sink import Sink
from relay.config import ClusterConfig
from relay.events import EventBus, Metrics
from relay.events.types import ShapingChange
from relay.outbound.cluster import Cluster, SharedRate, SharedSlots
from tests.integration import redisproc as _redisproc
from tests.integration.relayproc import RelayProcess, make_relay, wait_for

redis_server = _redisproc.redis_server

DOMAIN = "limited.test"
LIMIT_CONNECTIONS = 4
LIMIT_PER_MIN = 600


def rate_bound(limit: float, window: float, config: ClusterConfig, nodes: int,
               batch: int) -> float:
    """The module's stated bound: limit x (W + token_lifetime) + batch + 2 x nodes x batch."""
    return limit * (window + config.token_lifetime) + batch + 2 * nodes * batch


class _Events:
    def __init__(self) -> None:
        self.seen: list[object] = []

    def __call__(self, events: list[object]) -> None:
        self.seen.extend(events)


async def _nodes(nursery: trio.Nursery, config: ClusterConfig, n: int
                 ) -> tuple[list[Cluster], _Events]:
    events = _Events()
    clusters = [Cluster(config, metrics=Metrics(), events=EventBus([events]))
                for _ in range(n)]
    for c in clusters:
        await nursery.start(c.run)
    return clusters, events


# -- the limiters on one real Redis -------------------------------------------------------


async def test_shared_rate_holds_the_stated_bound_across_three_nodes(redis_server) -> None:
    """Three nodes, four senders each, one 40/s limit: over every window the total stays
    within the bound, it is used (not split three ways), and Redis sees about one round
    trip per batch, not one per message."""
    redis = redis_server()
    config = ClusterConfig(redis=redis.url, expected_nodes=3, lease_batch=50,
                           lease_window=0.1)
    limit = 40.0
    stamps: list[float] = []
    async with trio.open_nursery() as nursery:
        clusters, _ = await _nodes(nursery, config, 3)
        rates = [SharedRate(c, "relay:rate:msg:t", limit) for c in clusters]

        async def sender(rate: SharedRate) -> None:
            while True:
                if not rate.try_acquire():
                    await rate.acquire()
                stamps.append(trio.current_time())

        start = trio.current_time()
        with trio.move_on_after(6.0):
            async with trio.open_nursery() as senders:
                for rate in rates:
                    for _ in range(4):
                        senders.start_soon(sender, rate)
        elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    assert all(c.shared for c in clusters)
    batch = rates[0].batch
    assert batch == 4  # 0.1 s worth of 40/s
    for window in (0.5, 1.0, 3.0):
        assert most_in_window(stamps, window) <= rate_bound(limit, window, config, 3, batch)
    # The whole limit is used by the three together (not a third each, not more).
    assert limit * elapsed * 0.9 <= len(stamps) <= limit * elapsed + 1 + 2 * 3 * batch
    trips = sum(c.metrics.total("total_redis_round_trips") for c in clusters)
    assert trips / len(stamps) < 0.7  # batches of 4, some asks answered "wait"


async def test_connection_slots_hold_for_the_cluster(redis_server) -> None:
    """Two nodes grab slots of a 4-connection limit as fast as they can: never more than
    4 held in total, all 4 used, and a slot given back is taken by the other node."""
    redis = redis_server()
    config = ClusterConfig(redis=redis.url, connection_lease_ttl=3.0)
    peak = 0
    async with trio.open_nursery() as nursery:
        clusters, _ = await _nodes(nursery, config, 2)
        slots = [SharedSlots(c, "relay:conns:t", LIMIT_CONNECTIONS) for c in clusters]
        held: list[list[object]] = [[], []]

        async def grab(i: int) -> None:
            nonlocal peak
            while True:
                lease = await slots[i].acquire()
                if lease is not None:
                    held[i].append(lease)
                    peak = max(peak, len(held[0]) + len(held[1]))

        with trio.move_on_after(1.0):
            async with trio.open_nursery() as grabbers:
                grabbers.start_soon(grab, 0)
                grabbers.start_soon(grab, 1)
        assert peak == LIMIT_CONNECTIONS
        assert int(redis.cli("ZCARD", "relay:conns:t")) == LIMIT_CONNECTIONS
        # One node gives one back: the other gets it (within its poll).
        owner = 0 if held[0] else 1
        held[owner].pop().release()  # type: ignore[attr-defined]
        other = 1 - owner
        before = len(held[other])
        with trio.fail_after(2.0):
            while True:
                lease = await slots[other].acquire()
                if lease is not None:
                    held[other].append(lease)
                    break
        assert len(held[other]) == before + 1
        assert len(held[0]) + len(held[1]) == LIMIT_CONNECTIONS
        nursery.cancel_scope.cancel()
    # A node that stops removes its leases (SIGTERM); SIGKILL is the node test below.
    assert int(redis.cli("ZCARD", "relay:conns:t")) == 0


async def test_redis_killed_then_back_falls_back_and_returns(redis_server) -> None:
    """Redis killed: the next call fails at once, the node takes its share (600/min over
    2 nodes: 5/s), the gauge and a ShapingChange say so; Redis started again (empty):
    within retry_interval the limits are shared again and the open leases are in Redis
    again."""
    redis = redis_server()
    config = ClusterConfig(redis=redis.url, expected_nodes=2, retry_interval=0.3,
                           connection_lease_ttl=3.0, timeout=0.3)
    async with trio.open_nursery() as nursery:
        (cluster,), events = await _nodes(nursery, config, 1)
        rate = SharedRate(cluster, "relay:rate:msg:t", 10.0)
        slots = SharedSlots(cluster, "relay:conns:t", 4)
        lease = await slots.acquire()
        assert lease is not None and cluster.shared
        redis.kill()
        t0 = trio.current_time()
        await rate.acquire()
        await rate.acquire()
        assert not cluster.shared
        assert trio.current_time() - t0 < config.timeout + 0.5
        assert cluster.metrics.get("cluster_limits_fallback") == 1
        # The share: 5/s (burst 1) for two seconds.
        sent = 0
        with trio.move_on_after(2.0):
            while True:
                await rate.acquire()
                sent += 1
        assert 8 <= sent <= 11
        redis.start()
        with trio.fail_after(3.0):
            while not cluster.shared:
                await trio.sleep(0.05)
        assert cluster.metrics.get("cluster_limits_fallback") == 0
        assert int(redis.cli("ZCARD", "relay:conns:t")) == 1  # re-registered
        nursery.cancel_scope.cancel()
    changes = [e for e in events.seen if isinstance(e, ShapingChange)]
    assert [(c.scope, c.before, c.after) for c in changes] == [
        ("cluster", "shared", "local shares (1/2 of each limit)"),
        ("cluster", "local shares", "shared")]


async def test_slow_redis_never_blocks_longer_than_the_timeout(redis_server) -> None:
    """Redis stopped (SIGSTOP: connected, never answering): a message waits at most the
    call timeout, then goes out on the local share; SIGCONT: shared again."""
    redis = redis_server()
    config = ClusterConfig(redis=redis.url, timeout=0.3, retry_interval=0.3)
    async with trio.open_nursery() as nursery:
        (cluster,), _ = await _nodes(nursery, config, 1)
        rate = SharedRate(cluster, "relay:rate:msg:t", 100.0)
        await rate.acquire()
        redis.pause()
        try:
            longest = 0.0
            for _ in range(100):  # past the leased batches: a lease hangs
                t0 = trio.current_time()
                await rate.acquire()
                longest = max(longest, trio.current_time() - t0)
                if not cluster.shared:
                    break
            assert not cluster.shared
            assert longest < config.timeout + 0.2
            assert cluster.metrics.get("total_redis_errors") >= 1
        finally:
            redis.resume()
        with trio.fail_after(3.0):
            while not cluster.shared:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


# -- whole relay nodes ----------------------------------------------------------------------


def _node(tmp: Path, n: int, sink_port: int, redis_url: str, nodes: int,
          extra: str = "") -> RelayProcess:
    """Node ``n``: its own spool and port, connections from 127.0.0.(n + 1)."""
    cluster = f"""
[cluster]
redis = "{redis_url}"
expected_nodes = {nodes}
connection_lease_ttl = 3.0
timeout = 0.3
retry_interval = 0.5
""" if redis_url else ""
    (tmp / f"node{n}").mkdir(parents=True, exist_ok=True)
    return make_relay(tmp / f"node{n}", workers=1, extra=f"""
[outbound]
smart_host = "127.0.0.1:{sink_port}"
source_address = "127.0.0.{n + 1}"
[outbound.default]
tls = "off"
idle_timeout = 2.0
retry_interval = 1.0
max_retry_interval = 2.0
[outbound.domains."{DOMAIN}"]
max_connections = {LIMIT_CONNECTIONS}
max_message_rate = "{LIMIT_PER_MIN}/min"
{cluster}{extra}""")


def _send(port: int, node: int, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        for i in range(count):
            client.sendmail("a@sender.test", [f"n{node}-{i}@{DOMAIN}"],
                            f"Subject: {node}/{i}\r\n\r\nbody\r\n")


def _delivered(sink: Sink) -> set[str]:
    return {r for _f, rcpts, _d, _p in sink.messages for r in rcpts}


async def _start_nodes(tmp: Path, count: int, sink_port: int, redis_url: str
                       ) -> list[RelayProcess]:
    nodes = [_node(tmp, n, sink_port, redis_url, count) for n in range(1, count + 1)]
    for node in nodes:
        await trio.to_thread.run_sync(node.start)
    return nodes


async def _stop(nodes: list[RelayProcess]) -> None:
    for node in nodes:
        await trio.to_thread.run_sync(node.stop)


async def _run_two_nodes(tmp: Path, redis_url: str, per_node: int) -> Sink:
    sink = Sink(delays={DOMAIN: 0.02}, keep_messages=True)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sink.serve, "127.0.0.1", 0)
        nodes = await _start_nodes(tmp, 2, port, redis_url)
        try:
            async with trio.open_nursery() as senders:
                for i, node in enumerate(nodes, 1):
                    senders.start_soon(trio.to_thread.run_sync, _send, node.port, i, per_node)
            await sink.wait_for(lambda s: s.total_messages >= 2 * per_node, timeout=60)
        finally:
            await _stop(nodes)
        nursery.cancel_scope.cancel()
    return sink


@pytest.mark.slow
async def test_two_nodes_share_connections_and_rate(tmp_path: Path, redis_server) -> None:
    """Two nodes, each limited to 4 connections and 600/min for the domain: together
    they never open more than 4 and never send more than the stated bound in any window;
    without the cluster the same two nodes open 8 and send twice the rate."""
    redis = redis_server()
    per_node = 60
    sink = await _run_two_nodes(tmp_path / "shared", redis.url, per_node)
    assert sink.max_concurrent_connections <= LIMIT_CONNECTIONS
    assert {ip for ip, s in sink.sources.items() if s.messages} == {"127.0.0.2", "127.0.0.3"}
    times = [t for t, _d, _n in sink.arrivals]
    config = ClusterConfig(redis=redis.url)  # the nodes' lease settings: the defaults
    batch = max(1, min(config.lease_batch, int(10.0 * config.lease_window)))
    for window in (1.0, 5.0):
        assert most_in_window(times, window) <= rate_bound(10.0, window, config, 2, batch)
    assert _delivered(sink) == {f"n{n}-{i}@{DOMAIN}" for n in (1, 2) for i in range(per_node)}
    # The same without [cluster]: each node has the whole limit to itself.
    alone = await _run_two_nodes(tmp_path / "alone", "", per_node)
    assert alone.max_concurrent_connections > LIMIT_CONNECTIONS
    assert most_in_window([t for t, _d, _n in alone.arrivals], 5.0) > rate_bound(
        10.0, 5.0, config, 2, batch)


def _lease_holders(redis: _redisproc.RedisServer) -> set[str]:
    """The pids of the processes holding connection leases (``host:pid:token:n``)."""
    members = redis.cli("ZRANGE", f"relay:conns:{DOMAIN}", "0", "-1").split()
    return {m.split(":")[1] for m in members}


@pytest.mark.slow
async def test_three_nodes_survive_a_killed_node_and_a_killed_redis(
        tmp_path: Path, redis_server) -> None:
    """Three nodes on one Redis, 4 connections and 600/min for all: one node killed with
    SIGKILL mid-run frees its slots within the lease TTL (the other two then hold all 4);
    Redis killed mid-run: every node falls back to its share and the sink still never
    sees more than 4 connections nor more than the stated rate bound; Redis back, the
    killed node restarted on its spool: every message is delivered (none lost)."""
    redis = redis_server()
    per_node = 70
    sink = Sink(delays={DOMAIN: 0.05}, keep_messages=True)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sink.serve, "127.0.0.1", 0)
        nodes = await _start_nodes(tmp_path, 3, port, redis.url)
        try:
            for i, node in enumerate(nodes, 1):
                await trio.to_thread.run_sync(_send, node.port, i, per_node)
            await sink.wait_for(lambda s: s.total_messages >= 40, timeout=30)
            # The victim: a node holding slots now.
            victim, pids = await trio.to_thread.run_sync(wait_for, lambda: next(
                ((node, pids) for node in nodes
                 if (pids := {str(p) for p in node.workers()}) & _lease_holders(redis)),
                None), 10.0, "a node holding a slot")
            await trio.to_thread.run_sync(victim.kill_all)
            killed_at = trio.current_time()
            # Its leases go within the TTL; the two others then take all 4 slots.
            await trio.to_thread.run_sync(wait_for, lambda: not pids & _lease_holders(redis),
                                          5.0, "the killed node's leases to expire")
            assert trio.current_time() - killed_at <= 3.0 + 1.0
            await sink.wait_for(lambda s: s.current_connections == LIMIT_CONNECTIONS,
                                timeout=5)
            # Redis killed mid-run: the nodes go on with their shares.
            before = sink.total_messages
            redis.kill()
            await sink.wait_for(lambda s: s.total_messages >= before + 15, timeout=20)
            redis.start()
            await trio.to_thread.run_sync(victim.start)
            everyone = {f"n{n}-{i}@{DOMAIN}" for n in (1, 2, 3) for i in range(per_node)}
            await sink.wait_for(lambda s: _delivered(s) >= everyone, timeout=90)
        finally:
            await _stop(nodes)
        nursery.cancel_scope.cancel()
    assert sink.max_concurrent_connections <= LIMIT_CONNECTIONS
    config = ClusterConfig(redis=redis.url)
    batch = max(1, min(config.lease_batch, int(10.0 * config.lease_window)))
    times = [t for t, _d, _n in sink.arrivals]
    for window in (1.0, 5.0):  # through the kill, the fall and the return
        assert most_in_window(times, window) <= rate_bound(10.0, window, config, 3, batch)
    assert _delivered(sink) == everyone
    changes = [json.loads(line) for n in (1, 2) for line in
               (tmp_path / f"node{n}" / "events.jsonl").read_text().splitlines()
               if '"ShapingChange"' in line and '"cluster"' in line]
    assert {c["after"] for c in changes} >= {"local shares (1/3 of each limit)", "shared"}
