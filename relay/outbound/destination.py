"""One active destination: its own nursery, limits, connections and backoff (principle 5).

A destination is a routing domain, or (``mx_rollup``) the primary MX host shared by many
domains. The engine hands it claimed ``DeliveryJob``s (``enqueue``); it owns them until
it records their outcome in the spool (then it tells the engine via ``on_done``).

Inside its nursery:

- a **manager loop** that opens connections while jobs wait and nobody is free to take
  them, up to ``max_connections``, each paced by the connection-rate bucket;
- **connection tasks**: resolve hops, try them in order (next MX/IP on failure), then take
  jobs from the shared queue, one transaction per job (split by
  ``max_recipients_per_message``), each paced by the message-rate bucket; QUIT after
  ``max_deliveries_per_connection`` transactions (the manager reconnects if jobs remain)
  or after ``idle_timeout`` without work;
- **backoff**: when no hop accepts a connection (refused, timeout, 421/5xx greeting) or
  DNS fails transiently, the destination stops connecting until ``backoff_until`` and
  every queued job (and every job that arrives meanwhile) is deferred in the spool to
  that time. A success resets the failure count.

When it has had no job and no connection for ``idle_timeout`` (and no backoff pending)
the manager returns: the destination is torn down. ``closed`` is set synchronously at
that point, so the engine never enqueues into a finished destination.

Nothing here blocks other destinations: all waiting (DNS, connect, SMTP, buckets) happens
in this destination's tasks; spool writes run in worker threads.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import trio

from relay.config import Throttle
from relay.outbound.resolver import ResolveError
from relay.outbound.routing import Hop
from relay.outbound.session import ClientSession, SessionError, SessionPolicy, open_session
from relay.outbound.throttle import TokenBucket, backoff_delay, rate_from_config
from relay.smtp.client import RecipientOutcome
from relay.spool.records import DeliveryJob

if TYPE_CHECKING:
    from relay.outbound.engine import DeliveryEngine

__all__ = ["Destination"]


class Destination:
    """See the module docstring."""

    def __init__(self, engine: DeliveryEngine, key: str, throttle: Throttle) -> None:
        self.engine = engine
        self.key = key
        self.throttle = throttle
        self.queue: deque[DeliveryJob] = deque()
        # Burst 1: sends are spread evenly, so no window ever exceeds the rate (+1).
        self.message_bucket = TokenBucket(rate_from_config(throttle.max_message_rate), 1)
        self.connection_bucket = TokenBucket(rate_from_config(throttle.max_connection_rate))
        #: Connection tasks alive / still connecting / waiting for a job.
        self.active = 0
        self.connecting = 0
        self.idle = 0
        #: Consecutive destination failures and the trio time until which we hold off.
        self.failures = 0
        self.backoff_until = 0.0
        self.backoff_reason = ""
        self.closed = False
        self.created = trio.current_time()
        #: Jobs settled (any outcome), for the drain estimate.
        self.done = 0
        #: Counters for tests and stats.
        self.connections_opened = 0
        self.peak_connections = 0
        #: The manager waits in ``_lot`` for any change; connections without work wait
        #: in ``_idle_lot`` for a job. A new job wakes the manager and ONE idle
        #: connection: waking every idle connection per job made each of them run once
        #: per message only to park again.
        self._lot = trio.lowlevel.ParkingLot()
        self._idle_lot = trio.lowlevel.ParkingLot()

    # ------------------------------------------------------------------ engine side

    def enqueue(self, job: DeliveryJob) -> None:
        """Take ownership of a claimed job (never called after ``closed``)."""
        assert not self.closed
        self.queue.append(job)
        self._lot.unpark_all()
        self._idle_lot.unpark()

    def apply_throttle(self, throttle: Throttle) -> None:
        """New limits (SIGHUP): buckets keep their earned tokens; a lower connection limit
        takes effect as connections finish (nothing in flight is dropped)."""
        self.throttle = throttle
        self.message_bucket.reconfigure(rate_from_config(throttle.max_message_rate), 1)
        self.connection_bucket.reconfigure(rate_from_config(throttle.max_connection_rate))
        self._poke()

    def _poke(self) -> None:
        """Something changed (backoff, limits, a connection came or went): everybody
        re-checks."""
        self._lot.unpark_all()
        self._idle_lot.unpark_all()

    def drain_seconds(self) -> float:
        """Rough time to work off the jobs held now: from the configured message rate
        and the throughput observed so far (whichever is lower), 0.5 s .. 600 s."""
        rates = []
        configured = rate_from_config(self.throttle.max_message_rate)
        if configured:
            rates.append(configured)
        elapsed = trio.current_time() - self.created
        if elapsed >= 1.0:
            rates.append(max(self.done / elapsed, 0.01))
        if self.backed_off:
            return min(max(self.backoff_until - trio.current_time(), 0.5), 600.0)
        if not rates:
            return 1.0
        return min(max(len(self.queue) / min(rates), 0.5), 600.0)

    @property
    def backed_off(self) -> bool:
        return self.backoff_until > trio.current_time()

    # ------------------------------------------------------------------ manager

    async def run(self) -> None:
        """The destination's nursery; returns when it has been idle for idle_timeout."""
        try:
            async with trio.open_nursery() as nursery:
                await self._manage(nursery)
        finally:
            self.closed = True

    async def _manage(self, nursery: trio.Nursery) -> None:
        while True:
            t = self.throttle
            if self.backed_off:
                if self.queue:
                    jobs = list(self.queue)
                    self.queue.clear()
                    await self.engine.defer_unattempted(
                        self, jobs, self.engine.wall(self.backoff_until),
                        f"delivery temporarily suspended: {self.backoff_reason}")
                    continue
                with trio.move_on_at(self.backoff_until):
                    await self._lot.park()
                continue
            waiting = len(self.queue) - self.idle - self.connecting
            if waiting > 0 and self.active < (t.max_connections or 1):
                await self.connection_bucket.acquire()
                if self.backed_off or not self.queue:
                    continue
                self.active += 1
                self.connecting += 1
                self.peak_connections = max(self.peak_connections, self.active)
                nursery.start_soon(self._connection)
                continue
            if not self.queue and self.active == 0:
                with trio.move_on_after(t.idle_timeout or 5.0):
                    await self._lot.park()
                if not self.queue and self.active == 0 and not self.backed_off:
                    # Synchronous from the check to the flag: no job can slip in between.
                    self.closed = True
                    return
                continue
            await self._lot.park()

    # ------------------------------------------------------------------ connections

    async def _connection(self) -> None:
        session: ClientSession | None = None
        connected = False
        try:
            opened = await self._open()
            self.connecting -= 1
            connected = True
            self._poke()
            if opened is None:
                return
            session, hop = opened
            await self._serve(session, hop)
        finally:
            if not connected:
                self.connecting -= 1
            self.active -= 1
            self._poke()
            if session is not None:
                await session.aclose()

    def _policy(self) -> SessionPolicy:
        t = self.throttle
        return SessionPolicy(
            helo_name=self.engine.hostname,
            tls=t.tls or "opportunistic",
            connect_timeout=t.connect_timeout or 30.0,
            command_timeout=t.command_timeout or 300.0,
            data_timeout=t.data_timeout or 600.0,
            source_address=self.engine.config.outbound.source_address,
            ssl_context=self.engine.client_ssl_context,
        )

    async def _open(self) -> tuple[ClientSession, Hop] | None:
        """Resolve and connect, trying every hop in order; None if nothing to do or the
        destination failed (then it is backed off / its jobs bounced)."""
        if not self.queue:
            return None
        domain = self.queue[0].domain
        try:
            hops = await self.engine.router.hops(domain)
        except ResolveError as e:
            if e.permanent:
                jobs = [j for j in self.queue if j.domain == domain]
                for j in jobs:
                    self.queue.remove(j)
                await self.engine.fail_unattempted(self, jobs, e.reply_line, e.enhanced)
            else:
                await self._failed(e.reply_line, None)
            return None
        policy = self._policy()
        errors: list[str] = []
        last_hop: Hop | None = None
        for hop in hops:
            if not self.queue or self.backed_off:
                return None
            last_hop = hop
            try:
                session = await open_session(hop.ip, hop.port, hop.mx_host, policy)
            except SessionError as e:
                errors.append(f"{hop.mx_host}[{hop.ip}]:{hop.port}: {e.reply_line}")
                continue
            self.connections_opened += 1
            self.failures = 0
            return session, hop
        await self._failed("; ".join(errors[-3:]) or "no usable host", last_hop)
        return None

    async def _failed(self, reason: str, hop: Hop | None) -> None:
        """No hop worked: back off the whole destination and defer what it holds."""
        t = self.throttle
        self.failures += 1
        delay = backoff_delay(self.failures, t.retry_interval or 300.0,
                              t.max_retry_interval or 4000.0)
        self.backoff_until = max(self.backoff_until, trio.current_time() + delay)
        self.backoff_reason = reason
        jobs = list(self.queue)
        self.queue.clear()
        self._poke()
        # Those jobs were attempted (this connection was opened for them): they count.
        await self.engine.transient_all(self, jobs, reason, hop)

    async def _next_job(self) -> DeliveryJob | None:
        """The next queued job, waiting up to idle_timeout for one (None: go idle)."""
        if self.queue:
            return self.queue.popleft()
        self.idle += 1
        try:
            deadline = trio.current_time() + (self.throttle.idle_timeout or 5.0)
            with trio.CancelScope(deadline=deadline):
                while not self.queue:
                    if self.backed_off:
                        return None
                    await self._idle_lot.park()
        finally:
            self.idle -= 1
        return self.queue.popleft() if self.queue else None

    async def _serve(self, session: ClientSession, hop: Hop) -> None:
        while session.usable:
            cap = self.throttle.max_deliveries_per_connection or 100
            if session.deliveries >= cap:
                return
            job = await self._next_job()
            if job is None:
                return
            await self._deliver(session, hop, job)

    async def _deliver(self, session: ClientSession, hop: Hop, job: DeliveryJob) -> None:
        engine = self.engine
        started = trio.current_time()
        loaded = await engine.load(job)
        if loaded is None:
            return
        envelope, data = loaded
        cap = self.throttle.max_recipients_per_message or 100
        outcomes: list[RecipientOutcome] = []
        pending = list(job.recipients)
        while pending:
            chunk, pending = pending[:cap], pending[cap:]
            if not session.usable:
                outcomes.extend(RecipientOutcome(i, 421, "4.4.2", "connection lost")
                                for i in chunk)
                continue
            await self.message_bucket.acquire()
            outcomes.extend(await session.deliver(envelope, chunk, data))
        await engine.record(self, job, envelope, data, outcomes, hop,
                            trio.current_time() - started)
