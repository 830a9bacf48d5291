"""Limits shared by the relay nodes of a cluster, through Redis (``[cluster] redis``).

Several nodes behind one name send for one sender; a mailbox provider grants that
sender N connections and M messages a minute in total. With ``[cluster] redis`` set,
every ``max_message_rate``, ``max_connection_rate`` and ``max_connections`` not written
``local:`` holds for all the nodes together (KumoMTA's design: a GCRA limiter and
connection leases in Redis). ``Cluster`` is the ``relay.outbound.limits.LimitsFactory``
of such a node; one per worker process, started in the worker's nursery (``run``).

**Rates** (``SharedRate``): one GCRA cell per limit in Redis (the theoretical arrival
time, TAT, in microseconds of Redis's own clock, so the nodes' clocks do not matter),
advanced by one Lua script per decision. Redis is kept off the per-message path: a node
leases a small batch (at most ``lease_batch`` tokens and ``lease_window`` seconds' worth
of the limit, at least 1) and spends it locally; when half of it is gone the next batch
is fetched in the background, so a message waits for Redis only when the cluster is at
its limit. A batch is reserved: Redis grants it valid from the moment it conforms (at
most ``RATE_POLL`` ahead), so at the limit each node asks once per batch and waits for
its turn, instead of all of them asking again and again for the next token. Tokens not
used within ``token_lifetime`` of becoming valid go back (the TAT moves back by their
worth, never before now). The cell's burst is one batch.

*The bound*, which ``tests/integration/test_cluster.py`` checks: in any window of W
seconds the cluster sends at most ``limit * (W + token_lifetime) + batch + 2 * nodes *
batch`` messages. (A token is used within ``token_lifetime`` of becoming valid; the
cell makes at most ``limit * T + batch`` tokens valid in T seconds, net of those given
back; the tokens given back inside the window that were valid before it are at most
what the nodes held then, two batches each.) At 600/min (the default lease: 2 tokens)
and two nodes, that is within 3.4% over a minute; the bench measures how close the
cluster really runs (``bench/cluster.py``).

**Connections** (``SharedSlots``): a sorted set per destination in Redis, one member per
open connection scored by its expiry; a slot is taken by a Lua script that drops expired
members and adds ours only below the limit. A slot whose connection ended is kept for
``SLOT_LINGER`` seconds, so a destination reconnecting (the deliveries cap) takes it
again without a round trip; then its member is removed. Every third of
``connection_lease_ttl`` the node renews all its leases of a destination in one call,
so a node killed with SIGKILL frees its slots within the TTL.

**Redis down or slow** (no answer within ``timeout``): the node falls back to a local
share of every shared limit, ``limit / expected_nodes`` (connections: at least one),
logs it, sets the ``cluster_limits_fallback`` gauge and publishes a ``ShapingChange``
(scope ``cluster``), and tries Redis again every ``retry_interval``; when it answers, the
node re-registers its open connections and the limits are shared again (another
``ShapingChange``). Delivery never waits on Redis longer than ``timeout`` per call. For
connections: on the fall, leases above the share are revoked (those connections end
after their current transaction), and for one TTL the node opens no more than the
limit less what the others held at its last look, so the total never goes over while
they drain; for one TTL after Redis returns the share still caps the node, while every
node re-registers. A node that cannot reach Redis while the others can adds at most its
share to the limit (partial partition).

**Client**: coredis 6, which runs on anyio and so natively on trio: every call is a
plain await on the worker's event loop, no thread per call and none on the hot path
(redis-py's asyncio client cannot run under trio, and its sync client would need a
thread hop per call). No hand-written RESP.

Every node sharing limits must configure the same limits (the GCRA cell and the
connection set are keyed by ``key_prefix`` and the destination key; a node with a
different rate would meter the same cell by its own interval).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import socket
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import coredis
import coredis.exceptions
import trio
from coredis.retry import NoRetryPolicy

from relay.config import ClusterConfig, Limits
from relay.events import EventBus, Metrics
from relay.events.types import ShapingChange
from relay.outbound.limits import (
    ConnectionSlots,
    DestinationLimits,
    Lease,
    LocalSlots,
    RateLimiter,
)
from relay.outbound.throttle import TokenBucket, rate_from_config

__all__ = ["Cluster", "RedisUnavailable", "SharedRate", "SharedSlots"]

log = logging.getLogger("relay.cluster")

T = TypeVar("T")

#: GCRA with a batch, reserved: KEYS[1] holds the TAT (microseconds, Redis's clock);
#: ARGV: the emission interval (us), the burst (tokens), tokens wanted, horizon (us).
#: The batch conforms when its last token does (TAT + n x interval - burst x interval);
#: when that is at most ``horizon`` away it is granted, valid from then, and the TAT
#: moves on: each node asks once per batch and waits for its own turn, instead of every
#: node asking again and again for the same next token. -> {granted, us until it is
#: valid, us to wait before asking again when nothing was granted}.
LEASE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local horizon = tonumber(ARGV[4])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local valid = tat + (want - burst) * interval
if valid < now then valid = now end
if valid - now > horizon then
  return {0, 0, valid - horizon - now}
end
tat = tat + want * interval
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX',
           math.ceil((tat - now) / 1000) + 1000)
return {want, valid - now, 0}
"""

#: Tokens given back: the TAT moves back by their worth, never before now. ARGV: the
#: emission interval (us), tokens.
GIVE_BACK_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat <= now then return 0 end
local back = tat - tonumber(ARGV[2]) * tonumber(ARGV[1])
if back < now then back = now end
redis.call('SET', KEYS[1], string.format('%.0f', back), 'PX',
           math.ceil((back - now) / 1000) + 1000)
return 1
"""

#: A connection slot: KEYS[1] is a sorted set of leases scored by expiry (ms, Redis's
#: clock); ARGV: lease id, TTL (ms), limit. -> {1 taken | 0 full, leases, ms to the
#: first expiry when full}.
ACQUIRE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local count = redis.call('ZCARD', KEYS[1])
if count >= tonumber(ARGV[3]) then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, count, tonumber(first[2]) - now}
end
local ttl = tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return {1, count + 1, 0}
"""

#: Renew (or re-register, after an outage) leases: ARGV: TTL (ms), lease ids...
#: -> leases in the set.
RENEW_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local ttl = tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return redis.call('ZCARD', KEYS[1])
"""

#: The longest a slot request waits before the destination looks at its state again
#: (one of its own connections ending wakes it at once).
SLOT_POLL = 0.5
#: A slot whose connection ended stays this node's this long, for its next connection.
SLOT_LINGER = 0.5
#: How far ahead a batch may be reserved, and the longest a message waits before asking
#: Redis again (the cell says when).
RATE_POLL = 0.5

_REDIS_ERRORS = (coredis.exceptions.RedisError, OSError, trio.TooSlowError)


class RedisUnavailable(Exception):
    """Redis did not answer (in time): the limits are in fallback now."""


def safe_url(url: str) -> str:
    """``url`` without its password, for logs and events."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class Cluster:
    """One worker's view of the cluster: the Redis client, whether the limits are shared
    or in fallback now, and the background work (batches fetched ahead, tokens given
    back, leases renewed and released). See the module docstring."""

    def __init__(self, config: ClusterConfig, *, metrics: Metrics | None = None,
                 events: EventBus | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        self.events = events
        #: Whether the limits are shared through Redis now (else: local shares).
        self.shared = True
        #: trio time of the last fall into fallback / the end of the grace after it.
        self.fell_at = -math.inf
        self.grace_until = -math.inf
        self.reason = ""
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._nursery: trio.Nursery | None = None
        self._fell = trio.Event()
        self._slots: weakref.WeakSet[SharedSlots] = weakref.WeakSet()
        self._rates: weakref.WeakSet[SharedRate] = weakref.WeakSet()
        self._node = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._ids = 0

    # ------------------------------------------------------------------ lifetime

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Connect, then keep the leases renewed, give stale tokens back and watch for
        Redis to come back, until cancelled; on the way out the open leases are removed
        (best effort: they expire with their TTL anyway)."""
        try:
            async with self._new_client() as client, trio.open_nursery() as nursery:
                self._client = client
                self._scripts = {name: client.register_script(text) for name, text in (
                    ("lease", LEASE_SCRIPT), ("give_back", GIVE_BACK_SCRIPT),
                    ("acquire", ACQUIRE_SCRIPT), ("renew", RENEW_SCRIPT))}
                self._nursery = nursery
                self.metrics.set("cluster_limits_fallback", 0)
                try:
                    await self.ping()
                    log.info("cluster limits shared through %s", safe_url(self.config.redis))
                except RedisUnavailable:
                    pass  # logged by the fall
                nursery.start_soon(self._retry_loop)
                nursery.start_soon(self._renew_loop)
                nursery.start_soon(self._expire_loop)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self._client = None
            # The client's own tasks are cancelled with ours: a fresh one, shielded.
            with trio.CancelScope(shield=True), trio.move_on_after(self.config.timeout):
                await self._release_all()

    def _new_client(self) -> Any:
        c = self.config
        return coredis.Redis.from_url(
            c.redis, stream_timeout=c.timeout, connect_timeout=c.timeout,
            retry_policy=NoRetryPolicy(), max_connections=16)

    async def _release_all(self) -> None:
        """Remove this node's open leases from Redis (it is stopping)."""
        held = {slots.key: [*slots.held, *slots.spare, *slots.stale]
                for slots in list(self._slots) if slots.held or slots.spare or slots.stale}
        if not held or not self.shared:
            return
        try:
            async with self._new_client() as client:
                for key, ids in held.items():
                    await client.zrem(key, ids)
        except _REDIS_ERRORS:
            pass  # they expire with their TTL

    def spawn(self, fn: Callable[..., Awaitable[object]], *args: object) -> bool:
        """Run ``fn(*args)`` in the background; False (nothing runs) when not running or
        stopping (a connection ending at shutdown must not raise)."""
        if self._nursery is None:
            return False
        try:
            self._nursery.start_soon(fn, *args)
        except RuntimeError:  # "Nursery is closed to new arrivals": stopping
            return False
        return True

    def new_id(self) -> str:
        self._ids += 1
        return f"{self._node}:{self._ids}"

    # ------------------------------------------------------------------ calls

    async def call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        """One Redis round trip (``fn()``, counted by ``op``), bounded by ``timeout``; a
        failure puts the limits in fallback and raises ``RedisUnavailable``."""
        if self._client is None:
            self._fall("not connected")
            raise RedisUnavailable("not connected")
        self.metrics.inc("total_redis_round_trips", op=op)
        try:
            with trio.fail_after(self.config.timeout):
                return await fn()
        except _REDIS_ERRORS as e:
            if trio.current_effective_deadline() == -math.inf:
                raise RedisUnavailable("stopping") from None  # not Redis's fault
            self.metrics.inc("total_redis_errors")
            why = (f"no answer within {self.config.timeout:g}s"
                   if isinstance(e, trio.TooSlowError) else f"{type(e).__name__}: {e}")
            self._fall(why)
            raise RedisUnavailable(why) from None

    async def script(self, name: str, keys: list[str], args: list[object]) -> Any:
        return await self.call(name, lambda: self._scripts[name](keys=keys, args=args))

    async def delete(self, key: str, members: list[str]) -> None:
        await self.call("release", lambda: self._client.zrem(key, members))

    async def ping(self) -> None:
        await self.call("ping", lambda: self._client.ping())

    # ------------------------------------------------------------------ modes

    def in_grace(self) -> bool:
        """Shared again, but for one TTL still capped by the share (see the module doc)."""
        return trio.current_time() < self.grace_until

    def just_fell(self) -> bool:
        """In fallback for less than one TTL (the others may still drain)."""
        return trio.current_time() < self.fell_at + self.config.connection_lease_ttl

    def _fall(self, why: str) -> None:
        if not self.shared:
            return
        self.shared = False
        self.reason = why
        self.fell_at = trio.current_time()
        share = f"local shares (1/{self.config.expected_nodes} of each limit)"
        log.warning("cluster limits: Redis at %s unusable (%s): %s until it answers",
                    safe_url(self.config.redis), why, share)
        self._change("shared", share, why)
        for slots in list(self._slots):
            slots.fell()
        self._fell.set()

    def _restore(self) -> None:
        self.shared = True
        self.grace_until = trio.current_time() + self.config.connection_lease_ttl
        self._fell = trio.Event()
        log.warning("cluster limits: Redis at %s answers again: limits shared",
                    safe_url(self.config.redis))
        self._change("local shares", "shared", "redis answers again")

    def _change(self, before: str, after: str, why: str) -> None:
        self.metrics.set("cluster_limits_fallback", 0 if self.shared else 1)
        if self.events is not None:
            self.events.emit(ShapingChange(queue_id="", scope="cluster", before=before,
                                           after=after, reason=why, rule="cluster"))

    # ------------------------------------------------------------------ background

    async def _retry_loop(self) -> None:
        while True:
            await self._fell.wait()
            while not self.shared:
                await trio.sleep(self.config.retry_interval)
                try:
                    await self.ping()
                    for slots in list(self._slots):
                        await slots.renew()
                except RedisUnavailable:
                    continue
                self._restore()

    async def _renew_loop(self) -> None:
        while True:
            await trio.sleep(self.config.connection_lease_ttl / 3)
            if not self.shared:
                continue
            for slots in list(self._slots):
                try:
                    await slots.renew()
                except RedisUnavailable:
                    break

    async def _expire_loop(self) -> None:
        while True:
            await trio.sleep(self.config.token_lifetime / 2)
            for rate in list(self._rates):
                rate.expire()

    # ------------------------------------------------------------------ LimitsFactory

    def make(self, key: str, limits: Limits, local: frozenset[str]) -> DestinationLimits:
        return DestinationLimits(
            message=self._rate(key, "msg", limits.max_message_rate,
                               "max_message_rate" in local, 1),
            connection=self._rate(key, "conn", limits.max_connection_rate,
                                  "max_connection_rate" in local, None),
            slots=self._slots_for(key, limits.max_connections, "max_connections" in local))

    def refresh(self, key: str, current: DestinationLimits, limits: Limits,
                local: frozenset[str]) -> DestinationLimits:
        message = self._refresh_rate(key, "msg", current.message, limits.max_message_rate,
                                     "max_message_rate" in local, 1)
        connection = self._refresh_rate(key, "conn", current.connection,
                                        limits.max_connection_rate,
                                        "max_connection_rate" in local, None)
        slots = current.slots
        if isinstance(slots, SharedSlots) == ("max_connections" in local):
            slots = self._slots_for(key, limits.max_connections, "max_connections" in local)
        if (message, connection, slots) == (current.message, current.connection,
                                            current.slots):
            return current
        return DestinationLimits(message=message, connection=connection, slots=slots)

    def _rate(self, key: str, kind: str, value: str, local: bool,
              burst: float | None) -> RateLimiter:
        rate = rate_from_config(value)
        if local or rate is None:
            return TokenBucket(rate, burst)
        return SharedRate(self, f"{self.config.key_prefix}rate:{kind}:{key}", rate)

    def _refresh_rate(self, key: str, kind: str, current: RateLimiter, value: str,
                      local: bool, burst: float | None) -> RateLimiter:
        rate = rate_from_config(value)
        wanted_shared = not local and rate is not None
        if wanted_shared and isinstance(current, SharedRate):
            assert rate is not None
            current.set_limit(rate)
            return current
        if not wanted_shared and not isinstance(current, SharedRate):
            return current  # the destination reconfigures the bucket
        return self._rate(key, kind, value, local, burst)

    def _slots_for(self, key: str, limit: int, local: bool) -> ConnectionSlots:
        if local:
            return LocalSlots()
        return SharedSlots(self, f"{self.config.key_prefix}conns:{key}", limit)


class SharedRate:
    """A rate limit for the whole cluster (a ``RateLimiter``): see the module docstring.
    ``reconfigure`` sets what this node may use (shaping); below the shared limit it
    caps this node with a local bucket of its own."""

    def __init__(self, cluster: Cluster, key: str, limit: float) -> None:
        self.cluster = cluster
        self.key = key
        self.limit = limit
        #: This node's own cap (shaping's rate, when it is below the shared limit).
        self._cap = TokenBucket(None)
        #: What the node uses while Redis is unusable: its share of the limit.
        self._fallback = TokenBucket(limit / cluster.config.expected_nodes, 1)
        #: Leased tokens not used yet, oldest first: [trio time they are valid from,
        #: trio time they go back, count].
        self._stock: deque[list[float]] = deque()
        self._count = 0
        self._lock = trio.Lock()
        self._fetching = False
        #: Set when the batch being fetched in the background has come (or not).
        self._fetched = trio.Event()
        #: trio time before which asking Redis again is pointless (as Redis said).
        self._not_before = 0.0
        cluster._rates.add(self)  # its stale tokens are given back

    @property
    def batch(self) -> int:
        """Tokens leased at once: at most ``lease_batch`` and ``lease_window`` seconds'
        worth of the limit, at least one. It is also the cell's burst."""
        c = self.cluster.config
        return max(1, min(c.lease_batch, int(self.limit * c.lease_window)))

    def set_limit(self, limit: float) -> None:
        """A reloaded shared limit."""
        self.limit = limit
        self._fallback.reconfigure(limit / self.cluster.config.expected_nodes, 1)

    def reconfigure(self, rate: float | None, burst: float | None = None) -> None:
        self._cap.reconfigure(rate if rate is not None and rate < self.limit else None, burst)

    def try_acquire(self, n: float = 1.0) -> bool:
        if not self.cluster.shared:
            if self._fallback.delay_for(n) > 0.0 or not self._cap.try_acquire(n):
                return False
            return self._fallback.try_acquire(n)
        self.expire()
        ready = self._ready_in(n)
        if ready != 0.0:
            if ready is None:  # nothing leased (a batch on its way counts as leased)
                self._fetch_soon()
            return False
        if not self._cap.try_acquire(n):
            return False
        self._take(n)
        return True

    async def acquire(self, n: float = 1.0) -> None:
        async with self._lock:
            await self._cap.acquire(n)
            while True:
                if not self.cluster.shared:
                    await self._fallback.acquire(n)
                    return
                self.expire()
                ready = self._ready_in(n)
                if ready == 0.0:
                    self._take(n)
                    return
                if ready is None and self._fetching:
                    await self._fetched.wait()  # the batch on its way, not another
                    continue
                wait = await self._lease() if ready is None else ready
                if wait > 0.0:
                    await trio.sleep(wait)

    def _ready_in(self, n: float) -> float | None:
        """Seconds until ``n`` leased tokens are valid (0: now); None: not leased."""
        if self._count < n:
            return None
        need = math.ceil(n)
        now = trio.current_time()
        for valid, _expires, count in self._stock:
            need -= int(count)
            if need <= 0:
                return max(0.0, valid - now)
        return None

    def _take(self, n: float) -> None:
        need = math.ceil(n)
        self._count -= need
        while need:
            first = self._stock[0]
            used = min(need, int(first[2]))
            first[2] -= used
            need -= used
            if not first[2]:
                self._stock.popleft()
        if self._count * 2 < self.batch:
            self._fetch_soon()

    def expire(self) -> None:
        """Give back the tokens held longer than ``token_lifetime`` after they became
        valid."""
        now = trio.current_time()
        stale = 0
        while self._stock and self._stock[0][1] <= now:
            stale += int(self._stock.popleft()[2])
        if stale:
            self._count -= stale
            self.cluster.spawn(self._give_back, stale)

    async def _give_back(self, tokens: int) -> None:
        with contextlib.suppress(RedisUnavailable):
            await self.cluster.script("give_back", [self.key], [self._interval(), tokens])

    def _interval(self) -> int:
        return max(1, round(1e6 / self.limit))

    def _fetch_soon(self) -> None:
        """Lease the next batch in the background (not while one is on its way, nor
        before Redis said it is worth asking)."""
        if self._fetching or trio.current_time() < self._not_before:
            return
        self._fetching = True
        self._fetched = trio.Event()
        if not self.cluster.spawn(self._fetch):
            self._fetching = False
            self._fetched.set()

    async def _fetch(self) -> None:
        try:
            await self._lease()
        finally:
            self._fetching = False
            self._fetched.set()

    async def _lease(self) -> float:
        """Lease one batch: the seconds until it is valid (0.0 also when Redis failed:
        the caller then sees the fallback), or until it is worth asking again."""
        batch = self.batch
        try:
            granted, valid_us, wait_us = await self.cluster.script(
                "lease", [self.key],
                [self._interval(), batch, batch, round(RATE_POLL * 1e6)])
        except RedisUnavailable:
            return 0.0
        now = trio.current_time()
        if granted:
            valid = now + int(valid_us) / 1e6
            self._stock.append([valid, valid + self.cluster.config.token_lifetime,
                                int(granted)])
            self._count += int(granted)
            return valid - now
        wait = min(max(int(wait_us) / 1e6, 0.0005), RATE_POLL)
        self._not_before = now + wait
        return wait


class _SharedLease:
    """One connection's member in the destination's Redis set (a ``Lease``)."""

    __slots__ = ("id", "released", "revoked", "slots")

    def __init__(self, slots: SharedSlots, lease_id: str) -> None:
        self.slots = slots
        self.id = lease_id
        self.revoked = False
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.slots.released(self)


class SharedSlots:
    """``max_connections`` for the whole cluster (``ConnectionSlots``): see the module
    docstring."""

    def __init__(self, cluster: Cluster, key: str, limit: int) -> None:
        self.cluster = cluster
        self.key = key
        self.limit = limit
        #: This node's open leases (revoked ones included, until their connection ends).
        self.held: dict[str, _SharedLease] = {}
        #: Leases of the other nodes at the last look (taking a slot or renewing).
        self.others = 0
        #: Ids being removed from Redis (a connection ended, a cancelled request).
        self.stale: set[str] = set()
        #: Leases whose connection ended, kept ``SLOT_LINGER`` for the next connection
        #: (id -> trio time it goes): a destination that reconnects (deliveries cap)
        #: takes one without a round trip.
        self.spare: dict[str, float] = {}
        self._changed = trio.Event()
        cluster._slots.add(self)  # renewed, revoked on a fall

    def reconfigure(self, limit: int) -> None:
        self.limit = limit
        self._changed.set()

    @property
    def share(self) -> int:
        """This node's share while Redis is unusable (at least one)."""
        return max(1, self.limit // self.cluster.config.expected_nodes)

    def _allowance(self) -> int | None:
        """The most leases this node may hold without asking Redis; None: Redis says."""
        c = self.cluster
        if c.shared:
            return self.share if c.in_grace() else None
        if c.just_fell():
            return min(self.share, max(0, self.limit - self.others))
        return self.share

    async def acquire(self) -> Lease | None:
        allowance = self._allowance()
        if allowance is not None and len(self.held) >= allowance:
            await self._wait(SLOT_POLL)
            return None
        if not self.cluster.shared:
            return self._grant(self.cluster.new_id())
        if self.spare:
            return self._grant(self.spare.popitem()[0])
        lease_id = self.cluster.new_id()
        try:
            taken, count, wait_ms = await self.cluster.script(
                "acquire", [self.key],
                [lease_id, int(self.cluster.config.connection_lease_ttl * 1000), self.limit])
        except BaseException as e:  # the slot may be ours in Redis all the same
            self._forget([lease_id])
            if isinstance(e, RedisUnavailable):
                return None  # asked again, in fallback
            raise
        self.others = max(0, int(count) - len(self.held) - len(self.spare)
                          - (1 if taken else 0))
        if taken:
            return self._grant(lease_id)
        await self._wait(min(max(int(wait_ms) / 1000, 0.001), SLOT_POLL))
        return None

    async def _wait(self, seconds: float) -> None:
        """Until one of our connections ends, or ``seconds``."""
        with trio.move_on_after(seconds):
            await self._changed.wait()

    def _grant(self, lease_id: str) -> _SharedLease:
        lease = _SharedLease(self, lease_id)
        self.held[lease_id] = lease
        return lease

    def released(self, lease: _SharedLease) -> None:
        self.held.pop(lease.id, None)
        self._changed.set()
        self._changed = trio.Event()
        if not self.cluster.shared:
            return
        if lease.revoked:
            self._forget([lease.id])
            return
        self.spare[lease.id] = trio.current_time() + SLOT_LINGER
        if not self.cluster.spawn(self._linger, lease.id):
            self.stale.add(lease.id)

    async def _linger(self, lease_id: str) -> None:
        await trio.sleep(SLOT_LINGER)
        until = self.spare.get(lease_id)
        if until is not None and until <= trio.current_time():
            del self.spare[lease_id]
            self._forget([lease_id])

    def _forget(self, ids: list[str]) -> None:
        """Remove ``ids`` from Redis in the background (or at the node's stop)."""
        self.stale.update(ids)
        self.cluster.spawn(self._delete, ids)

    async def _delete(self, ids: list[str]) -> None:
        with contextlib.suppress(RedisUnavailable):  # else it expires with its TTL
            await self.cluster.delete(self.key, ids)
            self.stale.difference_update(ids)

    def fell(self) -> None:
        """Redis became unusable: leases above the share are revoked (newest first)."""
        live = [lease for lease in self.held.values() if not lease.revoked]
        for lease in live[self.share:]:
            lease.revoked = True
        self.stale.update(self.spare)
        self.spare.clear()

    async def renew(self) -> None:
        """Renew (re-register) every open lease in one call; raises RedisUnavailable."""
        if not self.held and not self.spare:
            return
        ids = [*self.held, *self.spare]
        ttl = int(self.cluster.config.connection_lease_ttl * 1000)
        count = await self.cluster.script("renew", [self.key], [ttl, *ids])
        # A connection that ended while the renewal was on its way: its removal may
        # have reached Redis first, and the renewal put it back.
        gone = [lease_id for lease_id in ids
                if lease_id not in self.held and lease_id not in self.spare]
        if gone:
            self._forget(gone)
        self.others = max(0, int(count) - len(self.held) - len(self.spare) - len(gone))
