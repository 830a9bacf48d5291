"""The limits interface (relay.outbound.limits), the ``local:`` scope in the config, and
what a cluster's limiters do without Redis (their fallback), on trio's MockClock: no
sockets here (the Redis side is tests/integration/test_cluster.py)."""

from __future__ import annotations

import pytest
import trio

from relay.config import ClusterConfig, ConfigError, decode_config
from relay.events import Metrics
from relay.outbound.cluster import Cluster, SharedRate, SharedSlots
from relay.outbound.limits import LOCAL_LIMITS, LocalSlots
from relay.outbound.throttle import TokenBucket

CONFIG = b"""
[cluster]
redis = "redis://127.0.0.1:6379/0"
expected_nodes = 3
[outbound.default]
max_connections = 6
max_message_rate = "600/min"
max_connection_rate = "local:10/s"
[outbound.domains."a.test"]
max_connections = "local:2"
max_message_rate = "local:60/min"
"""


def test_local_prefix_is_the_scope_and_limits_hold_plain_values() -> None:
    cfg = decode_config(CONFIG)
    out = cfg.outbound
    a, b = out.throttle_for("a.test"), out.throttle_for("b.test")
    assert (a.max_connections, a.max_message_rate, a.max_connection_rate) == (2, "60/min",
                                                                              "10/s")
    assert (b.max_connections, b.max_message_rate) == (6, "600/min")
    assert out.local_limits("a.test") == {"max_connections", "max_message_rate",
                                          "max_connection_rate"}
    assert out.local_limits("b.test") == {"max_connection_rate"}
    assert out.member_caps("a.test") == (2, "60/min")
    assert cfg.cluster.expected_nodes == 3


@pytest.mark.parametrize(("toml", "message"), [
    (b'[outbound.default]\nmax_connections = "local:none"\n',
     'outbound.default.max_connections: invalid connection limit "local:none" '
     '(examples: 20, "local:20")'),
    (b'[outbound.default]\nmax_connections = "20"\n',
     "outbound.default.max_connections: expected an integer, got a string"),
    (b'[outbound.default]\nmax_message_rate = "local:5/fortnight"\n',
     'outbound.default.max_message_rate: invalid rate "local:5/fortnight" (examples: '
     '"300/min", "10/s", "5/10s")'),
    (b'[egress.sources.s1]\nsource_address = "127.0.0.2"\n'
     b'[egress.sources.s1.limits]\nmax_connections = "locale:3"\n',
     'egress.sources.s1.limits.max_connections: expected an integer, got a string'),
    (b'[cluster]\nredis = "127.0.0.1:6379"\n',
     'cluster.redis: "127.0.0.1:6379" is not a redis://, rediss:// or unix:// URL '
     '(example: "redis://127.0.0.1:6379/0")'),
    (b'[cluster]\nredis = "redis://r.example:6379"\nexpected_nodes = 0\n',
     "cluster.expected_nodes: must be at least 1 (got 0)"),
    (b'[cluster]\nredis = "redis://r:6379"\nlease_window = 2.0\ntoken_lifetime = 1.0\n',
     "cluster.token_lifetime: less than cluster.lease_window"),
])
def test_bad_cluster_config_names_key_and_file(toml: bytes, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        decode_config(toml, "conf/x.toml")
    assert str(e.value) == f"conf/x.toml: {message}"


async def test_local_limits_are_todays_buckets(autojump_clock) -> None:
    """No cluster: the rate limiters ARE token buckets (nothing wraps the per-message
    path) and the connection slots grant at once; a reload keeps the same objects."""
    limits = decode_config(CONFIG).outbound.throttle_for("b.test")
    made = LOCAL_LIMITS.make("b.test", limits, frozenset())
    assert type(made.message) is TokenBucket and made.message.rate == 10.0
    assert type(made.connection) is TokenBucket and made.connection.rate == 10.0
    assert isinstance(made.slots, LocalSlots)
    start = trio.current_time()
    leases = [await made.slots.acquire() for _ in range(100)]
    assert trio.current_time() == start
    assert all(lease is not None and not lease.revoked for lease in leases)
    leases[0].release()
    leases[0].release()  # idempotent
    assert LOCAL_LIMITS.refresh("b.test", made, limits, frozenset()) is made


def _cluster(**kw: object) -> Cluster:
    """A cluster that never connected: every call fails, so it is in fallback."""
    return Cluster(ClusterConfig(redis="redis://127.0.0.1:9/0", **kw), metrics=Metrics())


async def test_cluster_factory_shares_only_what_is_not_local(autojump_clock) -> None:
    cfg = decode_config(CONFIG)
    cluster = _cluster(expected_nodes=3)
    b = cluster.make("b.test", cfg.outbound.throttle_for("b.test"),
                     cfg.outbound.local_limits("b.test"))
    assert isinstance(b.message, SharedRate) and b.message.limit == 10.0
    assert type(b.connection) is TokenBucket  # local:10/s
    assert isinstance(b.slots, SharedSlots) and b.slots.limit == 6
    a = cluster.make("a.test", cfg.outbound.throttle_for("a.test"),
                     cfg.outbound.local_limits("a.test"))
    assert type(a.message) is TokenBucket and isinstance(a.slots, LocalSlots)
    # A reload that makes b.test's connections local swaps only the slots.
    local = cfg.outbound.local_limits("b.test") | {"max_connections"}
    again = cluster.refresh("b.test", b, cfg.outbound.throttle_for("b.test"), local)
    assert again.message is b.message and isinstance(again.slots, LocalSlots)
    assert cluster.refresh("b.test", b, cfg.outbound.throttle_for("b.test"),
                           cfg.outbound.local_limits("b.test")) is b


async def test_rate_without_redis_is_the_local_share(autojump_clock) -> None:
    """Redis unusable: 600/min over 3 nodes is 200/min here (burst 1): over 30 s at most
    1 + 100 messages, and the fall is shown."""
    cluster = _cluster(expected_nodes=3)
    rate = SharedRate(cluster, "relay:rate:msg:x", 10.0)
    rate.reconfigure(10.0, 1)
    start = trio.current_time()
    sent = 0
    with trio.move_on_after(30.1):
        while True:
            await rate.acquire()
            sent += 1
    assert not cluster.shared
    assert sent == 1 + 100  # at 0, 0.3, ..., 30.0 s
    assert trio.current_time() - start == pytest.approx(30.1)
    assert cluster.metrics.get("cluster_limits_fallback") == 1
    assert cluster.reason == "not connected"


async def test_shaping_caps_a_shared_rate_below_the_share(autojump_clock) -> None:
    """What this node may use (shaping's rate) caps it under the shared limit."""
    cluster = _cluster(expected_nodes=2)
    rate = SharedRate(cluster, "relay:rate:msg:x", 10.0)
    rate.reconfigure(1.0, 1)  # shaping lowered this node to 1/s; the share is 5/s
    sent = 0
    with trio.move_on_after(10.0):
        while True:
            await rate.acquire()
            sent += 1
    assert sent == 10  # at 0, 1, ..., 9 s: shaping's 1/s, not the share's 5/s
    assert rate.try_acquire()  # the one due at 10 s
    assert not rate.try_acquire()


async def test_slots_without_redis_hold_the_share_and_revoke_above_it(autojump_clock):
    cluster = _cluster(expected_nodes=2, connection_lease_ttl=3.0)
    slots = SharedSlots(cluster, "relay:conns:x", 5)
    # While shared, this node held 4 leases (the others 1).
    leases = [slots._grant(cluster.new_id()) for _ in range(4)]
    slots.others = 1
    assert await slots.acquire() is None  # the call fails: fallback now
    assert not cluster.shared
    # Above the share (5 // 2 = 2): the newest two end after their transaction.
    assert [lease.revoked for lease in leases] == [False, False, True, True]
    # No new slot while the node holds its share or more, nor (for one TTL) beyond
    # what the others left free at the last look.
    for lease in leases[1:]:
        lease.release()
    assert len(slots.held) == 1
    slots.others = 4
    assert await slots.acquire() is None
    await trio.sleep(3.0)  # the TTL after the fall: the others drained to their share
    got = await slots.acquire()
    assert got is not None and not got.revoked
    assert await slots.acquire() is None  # 2 held = the share
    got.release()
    assert len(slots.held) == 1
