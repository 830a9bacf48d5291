"""One active destination: its own nursery, limits, connections and backoff (principle 5).

A destination is a routing domain, or a provider (``provider:NAME``) shared by many
domains. Its owner (the engine, seen only through ``DestinationOwner``) hands it claimed
``DeliveryJob``s (``enqueue``); it owns them until it has reported what happened to each
(``DestinationOwner.settle``: an ``Attempt``, which ``relay.outcomes`` judges).

Inside its nursery:

- a **manager loop** that opens connections while jobs wait and nobody is free to take
  them, up to ``max_connections``, each paced by the connection-rate bucket (the limits
  are ``relay.outbound.limits`` objects: this node's own, or shared by a cluster of
  nodes through Redis, where a connection also holds a slot lease while it lives);
- **connection tasks**: resolve hops, try them in order (next MX/IP on failure), then take
  jobs from the shared queue, one transaction per job (split by
  ``max_recipients_per_message``), each paced by the message-rate bucket. With a server
  that pipelines, the next transaction rides behind the current one's end of data
  (RFC 2920 3.1, see ``relay.smtp.client``): a message then costs one round trip, and
  recording an outcome (a synced commit) overlaps the next message on the wire. QUIT after
  ``max_deliveries_per_connection`` transactions (the manager reconnects if jobs remain)
  or after ``idle_timeout`` without work;
- **backoff**: when no hop accepts a connection (refused, timeout, 421/5xx greeting) or
  DNS fails transiently, the destination stops connecting until ``backoff_until`` and
  every queued job (and every job that arrives meanwhile) is deferred in the spool to
  that time. A success resets the failure count.

- **shaping** (``relay.outbound.shaping.PathShaping``): each attempt's replies are fed
  back; a rule may suspend the destination (as a backoff) or lower its limits, and the
  closed loop lowers the message rate and connections on pushback, pauses, then lets
  ONE probe connection through, and raises them again after clean intervals. A new
  destination starts with a few connections (slow start).

A destination is one path: an egress source (``path``: its address and EHLO name) and a
destination; with no pools, the default source.

When it has had no job and no connection for ``idle_timeout`` (and no backoff pending)
the manager returns: the destination is torn down. ``closed`` is set synchronously at
that point, so the engine never enqueues into a finished destination.

Nothing here blocks other destinations: all waiting (DNS, connect, SMTP, buckets) happens
in this destination's tasks; spool writes run in worker threads.
"""

from __future__ import annotations

import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import Protocol

import trio

from relay.config import PROVIDER_PREFIX, Limits
from relay.events import Metrics
from relay.model import DeliveryJob, Envelope
from relay.outbound.egress import Path
from relay.outbound.limits import LOCAL_LIMITS, DestinationLimits, Lease
from relay.outbound.resolver import ResolveError
from relay.outbound.routing import Hop, Router
from relay.outbound.session import (
    BindError,
    ClientSession,
    SessionError,
    SessionPolicy,
    open_session,
)
from relay.outbound.shaping import PathShaping
from relay.outbound.throttle import TokenBucket, rate_from_config
from relay.outcomes.judge import Attempt, RetryPolicy, backoff_delay
from relay.smtp.client import LOOP_STATUS, RecipientOutcome


class DestinationOwner(Protocol):
    """What a destination needs from the engine that runs it, and nothing more."""

    router: Router
    #: The worker's counters and gauges (connections by destination, ...).
    metrics: Metrics
    #: Our name in EHLO.
    hostname: str
    client_ssl_context: ssl.SSLContext | None

    @property
    def source_address(self) -> str: ...

    def wall(self, trio_time: float) -> float:
        """Unix time of a ``trio.current_time()`` value."""
        ...

    def is_own_listener(self, ip: str, port: int) -> bool: ...

    def held_by_operator(self, job: DeliveryJob,
                         envelope: Envelope) -> tuple[float, str] | None:
        """An operator's suspension of this job's domain, or its message's tenant or
        campaign: (Unix time it ends, reason), or None."""
        ...

    def source_unusable(self, source: str, reason: str) -> None:
        """``source``'s address cannot be bound: leave it out for a while."""
        ...

    def member_caps(self, domain: str) -> tuple[int | None, str | None]:
        """A domain's own max_connections and max_message_rate, which hold inside a
        provider destination too (``OutboundConfig.member_caps``)."""
        ...

    def return_path(self, envelope: Envelope, recipient_index: int) -> str | None:
        """MAIL FROM for one recipient (a VERP address), or None: the envelope's sender.
        When it is not None, each recipient gets a transaction of its own."""
        ...

    async def load(self, job: DeliveryJob) -> tuple[Envelope, bytes] | None:
        """The job's message, or None when it is gone (the job is then finished)."""
        ...

    async def settle(self, job: DeliveryJob, attempt: Attempt, policy: RetryPolicy,
                     loaded: tuple[Envelope, bytes] | None = None,
                     on_recorded: Callable[[], object] | None = None) -> None:
        """Judge and record what happened to ``job``; it is no longer ours."""
        ...

    def abandon(self, job: DeliveryJob) -> None:
        """Give up ``job`` without an outcome (it comes back with its lease)."""
        ...

__all__ = ["Destination"]

log = logging.getLogger("relay.outbound")


class _Run:
    """One job on one connection: its message, the recipient chunks not begun yet (one
    transaction each, at most ``max_recipients_per_message`` recipients), how many of
    its transactions are in flight, and the outcomes so far."""

    __slots__ = ("chunks", "connect_seconds", "data", "envelope", "job", "open", "outcomes",
                 "started")

    def __init__(self, job: DeliveryJob, envelope: Envelope, data: bytes, cap: int) -> None:
        self.job = job
        self.envelope = envelope
        self.data = data
        self.started = trio.current_time()
        #: The connection's setup time, for the first job on a new connection.
        self.connect_seconds = 0.0
        rcpts = list(job.recipients)
        self.chunks = deque(rcpts[i:i + cap] for i in range(0, len(rcpts), cap))
        self.open = 0
        self.outcomes: list[RecipientOutcome] = []

    def unsettled(self) -> list[int]:
        """Recipients without an outcome yet."""
        settled = {o.index for o in self.outcomes}
        return [i for i in self.job.recipients if i not in settled]


class _Idler:
    """A connection waiting for a job (``Destination._next_job``) until ``deadline``."""

    __slots__ = ("deadline", "event")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.event = trio.Event()


class _Member:
    """A domain delivered as part of a provider (or of nothing else: then no caps)."""

    __slots__ = ("bucket", "cap", "taken")

    def __init__(self, cap: int | None, rate: str | None) -> None:
        self.cap = cap
        self.bucket = TokenBucket(rate_from_config(rate), 1) if rate else None
        #: Queue ids of its jobs this destination is delivering now.
        self.taken: set[str] = set()


class _Holding:
    """What one connection task has taken off the queue and not recorded yet, so that an
    internal error can still give every one of those jobs an outcome."""

    __slots__ = ("jobs", "lease", "runs")

    def __init__(self, lease: Lease) -> None:
        #: Taken, message not loaded yet.
        self.jobs: list[DeliveryJob] = []
        #: Loaded (being begun, in flight, or waiting to be recorded).
        self.runs: list[_Run] = []
        #: The connection's slot (``relay.outbound.limits``).
        self.lease = lease


class Destination:
    """See the module docstring."""

    def __init__(self, owner: DestinationOwner, key: str, throttle: Limits, *,
                 path: Path | None = None, shaping: PathShaping | None = None,
                 limiters: DestinationLimits | None = None) -> None:
        self.owner = owner
        self.key = key
        #: Where it leaves from: the egress source (None: the default, from the owner).
        self.path = path
        #: Its traffic shaping (rules, closed loop, suspensions); None: none.
        self.shaping = shaping
        self.throttle = throttle
        self.retry_policy = _retry_policy(throttle)
        self.queue: deque[DeliveryJob] = deque()
        #: Its message rate, connection rate and connection slots (relay.outbound.limits:
        #: this node's own, or shared by a cluster): only ever used through them.
        self._use(limiters or LOCAL_LIMITS.make(key, throttle, frozenset()))
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
        self.metrics = owner.metrics
        #: The manager waits in ``_lot`` for any change. Connections without work wait
        #: on an Event each in ``_idlers``, most recently idle last; a new job wakes the
        #: LAST one (and the manager only if more jobs wait than idle connections could
        #: take). So under a steady flow the same few connections stay busy, and take
        #: jobs behind each other's end of data, while the rest reach idle_timeout and
        #: QUIT; waking them in turn cost every connection a wake-up per message.
        #: Their idle_timeout is enforced by the manager, which wakes a few times per
        #: idle_timeout while connections are open (``_expire_idlers``), not by a
        #: cancel scope per wait: a connection waits for its next job once per message.
        self._lot = trio.lowlevel.ParkingLot()
        self._idlers: list[_Idler] = []
        #: Per member domain of a provider: its own caps and the jobs it has taken.
        self._members: dict[str, _Member] = {}
        #: Several domains share this destination (a provider): their caps apply.
        self._shared = key.startswith(PROVIDER_PREFIX)

    # ------------------------------------------------------------------ engine side

    def enqueue(self, job: DeliveryJob) -> None:
        """Take ownership of a claimed job (never called after ``closed``)."""
        assert not self.closed
        self.queue.append(job)
        if self._idlers:
            self._idlers.pop().event.set()
        if len(self.queue) > self.idle:
            self._lot.unpark_all()

    def _use(self, limiters: DestinationLimits) -> None:
        self.limiters = limiters
        self.message_bucket = limiters.message
        self.connection_bucket = limiters.connection
        self.slots = limiters.slots
        # Burst 1: sends are spread evenly, so no window ever exceeds the rate (+1).
        self.message_bucket.reconfigure(self._message_rate(), 1)

    def apply_throttle(self, throttle: Limits,
                       limiters: DestinationLimits | None = None) -> None:
        """New limits (SIGHUP), and the limiters for them when they changed: buckets keep
        their earned tokens; a lower connection limit takes effect as connections finish
        (nothing in flight is dropped)."""
        self.throttle = throttle
        self.retry_policy = _retry_policy(throttle)
        if self.shaping is not None:
            self.shaping.reconfigure(throttle)
        if limiters is not None and limiters is not self.limiters:
            self._use(limiters)
        self.message_bucket.reconfigure(self._message_rate(), 1)
        self.connection_bucket.reconfigure(rate_from_config(throttle.max_connection_rate))
        self.slots.reconfigure(throttle.max_connections)
        # Member caps are read again as each domain's next job comes; what they have
        # taken still counts.
        old, self._members = self._members, {}
        for domain, member in old.items():
            self._member(domain).taken = member.taken
        self._poke()

    # ------------------------------------------------------------------ shaping

    def _message_rate(self) -> float | None:
        configured = rate_from_config(self.throttle.max_message_rate)
        return configured if self.shaping is None else self.shaping.message_rate(configured)

    def _max_connections(self) -> int:
        configured = self.throttle.max_connections
        return configured if self.shaping is None else self.shaping.max_connections(configured)

    def _paused_until(self) -> float:
        """trio time until which nothing is sent (after pushback, before the probe)."""
        if self.shaping is None:
            return 0.0
        until = self.shaping.paused_until()
        return until - self.owner.wall(0.0) if until else 0.0

    def reshape(self) -> None:
        """The shaping state changed (or was restored): new rate, suspension, pause;
        everybody re-checks."""
        assert self.shaping is not None
        self.message_bucket.reconfigure(self._message_rate(), 1)
        suspended = self.shaping.suspended_until - self.owner.wall(0.0)
        if suspended > self.backoff_until:
            self.suspend(suspended, f"suspended by shaping rule "
                                    f"{self.shaping.suspend_reason}")
        self._poke()

    def suspend(self, until: float, reason: str) -> None:
        """Hold the destination until trio time ``until`` (a rule, an operator): what it
        holds, and what comes, is deferred to then."""
        if until > self.backoff_until:
            self.backoff_until = until
            self.backoff_reason = reason
        self._poke()

    def _provider(self) -> str:
        """The provider's name when this is a provider's destination, else ""."""
        dest = self.path.destination if self.path is not None else self.key
        return dest.removeprefix(PROVIDER_PREFIX) if dest.startswith(PROVIDER_PREFIX) else ""

    def _feedback(self, outcomes: list[RecipientOutcome], hop: Hop | None) -> None:
        shaping = self.shaping
        if shaping is None:
            return
        # One message: one delivery for the closed loop, and its first refusal (the
        # reply that decided the transaction) for the rules.
        changed = False
        refusal = next((o for o in outcomes if not 200 <= o.code < 300
                        and not o.text.startswith("internal error")), None)
        if refusal is not None:
            changed = shaping.refused(
                refusal.code, refusal.enhanced, refusal.text,
                mx_host=hop.mx_host if hop else "", provider=self._provider(),
                in_use=self.active)
        elif outcomes:
            changed = shaping.delivered()
        if changed:
            self.reshape()

    def _poke(self) -> None:
        """Something changed (backoff, limits, a connection came or went): everybody
        re-checks."""
        self._lot.unpark_all()
        idlers, self._idlers = self._idlers, []
        for idler in idlers:
            idler.event.set()

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

    def lift_backoff(self) -> None:
        """Try again now (an operator's retry): the backoff and the failure count go."""
        self.backoff_until = 0.0
        self.failures = 0
        self._poke()

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
            paused = self._paused_until()
            if paused > trio.current_time() and not self.backed_off:
                with trio.move_on_at(paused):
                    await self._lot.park()
                continue
            if self.backed_off:
                if self.queue:
                    jobs = list(self.queue)
                    self.queue.clear()
                    await self._settle_all(
                        jobs, 451, "4.4.1",
                        f"delivery temporarily suspended: {self.backoff_reason}",
                        counted=False, not_before=self.owner.wall(self.backoff_until))
                    continue
                with trio.move_on_at(self.backoff_until):
                    await self._lot.park()
                continue
            waiting = len(self.queue) - self.idle - self.connecting
            if waiting > 0 and self.active < self._max_connections():
                # A slot first (with a cluster, one of max_connections for all nodes),
                # then the connection-rate token; the slot is held until it closes.
                lease = await self.slots.acquire()
                if lease is None:
                    continue  # none free yet: look at the state again, then ask again
                await self.connection_bucket.acquire()
                if self.backed_off or not self.queue:
                    lease.release()
                    continue
                self.active += 1
                self.connecting += 1
                self.metrics.set("connection_count", self.active, destination=self.key)
                nursery.start_soon(self._connection, lease)
                continue
            if not self.queue and self.active == 0:
                with trio.move_on_after(t.idle_timeout):
                    await self._lot.park()
                if not self.queue and self.active == 0 and not self.backed_off:
                    # Synchronous from the check to the flag: no job can slip in between.
                    self.closed = True
                    return
                continue
            with trio.move_on_after(min(1.0, t.idle_timeout / 4)):
                await self._lot.park()
            self._expire_idlers()

    def _expire_idlers(self) -> None:
        """Wake the idle connections whose idle_timeout has passed: they end."""
        now = trio.current_time()
        waiting = []
        for idler in self._idlers:
            if idler.deadline <= now:
                idler.event.set()
            else:
                waiting.append(idler)
        self._idlers = waiting

    # ------------------------------------------------------------------ connections

    async def _connection(self, lease: Lease) -> None:
        session: ClientSession | None = None
        hop: Hop | None = None
        connected = False
        holding = _Holding(lease)
        try:
            opened = await self._open()
            self.connecting -= 1
            connected = True
            self._poke()
            if opened is None:
                return
            session, hop = opened
            await self._serve(session, hop, holding)
        except Exception as e:
            # A bug met by this delivery: this connection ends, its jobs get a transient
            # outcome, and the destination, the engine and the worker go on.
            log.exception("delivery to %s failed with an internal error", self.key)
            await self._internal_error(holding, hop, f"{type(e).__name__}: {e}"[:200],
                                       before_connect=not connected)
        finally:
            lease.release()
            if not connected:
                self.connecting -= 1
            self.active -= 1
            self.metrics.set("connection_count", self.active, destination=self.key)
            self._poke()
            if session is not None:
                await session.aclose()

    async def _internal_error(self, holding: _Holding, hop: Hop | None, why: str, *,
                              before_connect: bool) -> None:
        """Every job the failed connection held is retried (421 4.3.0, an attempt); a
        failure before connecting backs the destination off like a failed connect, so a
        bug that fires every time cannot spin. If even recording fails, the jobs are
        left to their claim lease (they come back later; nothing is lost)."""
        reason = f"internal error: {why}"
        try:
            for run in holding.runs:
                run.outcomes.extend(RecipientOutcome(i, 421, "4.3.0", reason)
                                    for i in run.unsettled())
                run.chunks.clear()
                await self._record(run, hop)
            for job in holding.jobs:
                self._release(job)
            if holding.jobs:
                await self._settle_all(holding.jobs, 421, "4.3.0", reason, hop=hop)
            if before_connect:
                await self._failed(421, "4.3.0", reason, hop)
        except Exception:
            log.exception("cannot record the outcome of jobs for %s; leaving them to their "
                          "lease", self.key)
            for job in [*holding.jobs, *(r.job for r in holding.runs)]:
                self.owner.abandon(job)

    def _policy(self) -> SessionPolicy:
        t = self.throttle
        path = self.path
        return SessionPolicy(
            helo_name=path.helo_name if path is not None else self.owner.hostname,
            tls=t.tls,
            connect_timeout=t.connect_timeout,
            command_timeout=t.command_timeout,
            data_timeout=t.data_timeout,
            source_address=(path.source_address if path is not None
                            else self.owner.source_address),
            ssl_context=self.owner.client_ssl_context,
            ca_file=self.owner.router.config.tls_ca_file,
        )

    async def _open(self) -> tuple[ClientSession, Hop] | None:
        """Resolve and connect, trying every hop in order; None if nothing to do or the
        destination failed (then it is backed off / its jobs bounced)."""
        if not self.queue:
            return None
        domain = self.queue[0].domain
        started = trio.current_time()
        try:
            hops = await self.owner.router.hops(domain)
        except ResolveError as e:
            if e.permanent:
                await self._bounce_domain(domain, 550, e.enhanced, e.text)
            else:
                await self._failed(451, e.enhanced, e.text, None,
                                   trio.current_time() - started)
            return None
        policy = self._policy()
        errors: list[SessionError] = []
        last_hop: Hop | None = None
        for hop in hops:
            if not self.queue or self.backed_off:
                return None
            last_hop = hop
            if self.owner.is_own_listener(hop.ip, hop.port):
                await self._bounce_domain(
                    domain, 554, LOOP_STATUS, f"{hop.mx_host}[{hop.ip}]:{hop.port} is one "
                    f"of my own listeners: mail for {domain} loops back to myself")
                return None
            try:
                session = await open_session(hop.ip, hop.port, hop.mx_host, policy,
                                             auth=hop.auth)
            except BindError as e:
                await self._unbindable(e)
                return None
            except SessionError as e:
                if e.enhanced == LOOP_STATUS:
                    await self._bounce_domain(domain, e.code, LOOP_STATUS, e.text)
                    return None
                errors.append(e)
                continue
            self.metrics.inc("total_connections_opened", destination=self.key)
            self.failures = 0
            session.setup_seconds = trio.current_time() - started
            return session, hop
        # Postfix's deferral: the last hosts' own reasons, one status for all of them.
        text = "; ".join(e.text for e in errors[-3:]) or "no usable host"
        enhanced = next((e.enhanced for e in reversed(errors)
                         if e.enhanced and e.enhanced.startswith("4.")), "4.4.1")
        await self._failed(451, enhanced, text, last_hop, trio.current_time() - started,
                           connection=True)
        return None

    async def _unbindable(self, error: BindError) -> None:
        """Our source address cannot be bound: the source is left out, and every job
        held here goes back to the spool (not an attempt) to be sent from another."""
        if self.path is not None:
            self.owner.source_unusable(self.path.source, error.text)
        jobs = list(self.queue)
        self.queue.clear()
        self.backoff_until = trio.current_time() + 1.0
        self.backoff_reason = error.text
        self._poke()
        await self._settle_all(jobs, error.code, error.enhanced or "4.4.1", error.text,
                               counted=False, not_before=self.owner.wall(self.backoff_until))

    async def _bounce_domain(self, domain: str, code: int, enhanced: str, text: str) -> None:
        """A permanent routing failure (NXDOMAIN, null MX, a mail loop): every queued
        job for ``domain`` bounces without an attempt."""
        jobs = [j for j in self.queue if j.domain == domain]
        for j in jobs:
            self.queue.remove(j)
        await self._settle_all(jobs, code, enhanced, text)

    async def _failed(self, code: int, enhanced: str, text: str, hop: Hop | None,
                      seconds: float = 0.0, *, connection: bool = False) -> None:
        """No hop worked: back off the whole destination and defer what it holds (those
        jobs were attempted: this connection was opened for them, so they count)."""
        self.failures += 1
        delay = backoff_delay(self.failures, self.retry_policy.retry_interval,
                              self.retry_policy.max_retry_interval)
        if self.shaping is not None and connection:
            # A refused or failed connection: the closed loop cuts and, after the
            # backoff, sends one probe connection instead of a reconnect storm.
            self.shaping.refused(code, enhanced, text, mx_host=hop.mx_host if hop else "",
                                 provider=self._provider(), in_use=self.active,
                                 connection=True)
            self.reshape()
        self.backoff_until = max(self.backoff_until, trio.current_time() + delay)
        self.backoff_reason = text
        jobs = list(self.queue)
        self.queue.clear()
        self._poke()
        await self._settle_all(jobs, code, enhanced, text, hop=hop, seconds=seconds,
                               not_before=self.owner.wall(self.backoff_until))

    async def _settle_all(self, jobs: list[DeliveryJob], code: int, enhanced: str, text: str,
                          *, hop: Hop | None = None, seconds: float = 0.0,
                          counted: bool = True, not_before: float | None = None) -> None:
        """Report the same outcome for every recipient of ``jobs`` (the destination, not
        one transaction, decided it)."""
        for job in jobs:
            attempt = Attempt(
                outcomes=[RecipientOutcome(i, code, enhanced, text) for i in job.recipients],
                destination=self.key, mx_host=hop.mx_host if hop else "",
                ip=hop.ip if hop else "", port=hop.port if hop else 0, seconds=seconds,
                counted=counted, not_before=not_before)
            await self.owner.settle(job, attempt, self.retry_policy, None, self._recorded)

    def _recorded(self) -> None:
        self.done += 1

    async def _next_job(self) -> DeliveryJob | None:
        """The next job we may take, waiting up to idle_timeout for one (None: go idle, or
        the destination was backed off or paused meanwhile: every idle connection is woken
        then, and ends)."""
        job = self._take()
        if job is not None:
            return job
        self.idle += 1
        try:
            deadline = trio.current_time() + self.throttle.idle_timeout
            while job is None:
                now = trio.current_time()
                if self.backed_off or self._paused_until() > now or now >= deadline:
                    return None  # a pause (pushback) ends idle connections too
                idler = _Idler(deadline)
                self._idlers.append(idler)
                try:
                    await idler.event.wait()
                finally:
                    if not idler.event.is_set():  # cancelled
                        self._idlers.remove(idler)
                job = self._take()
        finally:
            self.idle -= 1
        return job

    # -- member domains of a provider: their own caps still hold (the stricter wins)

    def _take(self) -> DeliveryJob | None:
        """The next queued job: FIFO for a domain's own destination; in a provider's, the
        first whose domain is under its own connection cap."""
        queue = self.queue
        if not queue:
            return None
        if not self._shared:
            return queue.popleft()
        for i, job in enumerate(queue):
            member = self._member(job.domain)
            if member.cap is None or len(member.taken) < member.cap:
                del queue[i]
                member.taken.add(job.queue_id)
                return job
        return None

    def _member(self, domain: str) -> _Member:
        member = self._members.get(domain)
        if member is None:
            member = self._members[domain] = _Member(*self.owner.member_caps(domain))
        return member

    def _release(self, job: DeliveryJob) -> None:
        """``job`` no longer counts against its domain's cap."""
        member = self._members.get(job.domain)
        if member is not None and job.queue_id in member.taken:
            member.taken.discard(job.queue_id)
            self._poke()

    async def _serve(self, session: ClientSession, hop: Hop, holding: _Holding) -> None:
        """Deliver over one connection until it is no longer usable, the deliveries cap
        is reached, or no job comes within ``idle_timeout``.

        At most two transactions are in flight: the current one and, once its body is
        out, the next one behind its end of data (when the server pipelines and a job
        is at hand without waiting, and the message-rate bucket has a token now).
        Outcomes are taken in begin order; a job is recorded once every chunk of it has
        its outcomes.
        """
        in_flight: deque[_Run] = deque()  # the job of each begun transaction, in order
        run: _Run | None = None  # the job whose chunks are being begun
        behind_ok = True  # worth reading only until one may be begun behind
        while True:
            finished: list[_Run] = []
            while session.transaction_done:
                done = in_flight.popleft()
                done.outcomes.extend(session.take_outcomes())
                done.open -= 1
                if not done.open and not done.chunks:
                    finished.append(done)
                behind_ok = True
            began = False
            if session.can_begin and (behind_ok or not in_flight):
                # Wait for a job (or a token) only when there is nothing else to do.
                wait = not in_flight and not finished
                if run is None or not run.chunks:
                    run = await self._next_run(session, wait, holding)
                if run is not None and run.chunks and await self._paced(run.job.domain, wait):
                    chunk = run.chunks.popleft()
                    session.begin(run.envelope, chunk, run.data,
                                  sender=self.owner.return_path(run.envelope, chunk[0]))
                    run.open += 1
                    in_flight.append(run)
                    if len(in_flight) > 1:  # behind another's end of data (RFC 2920 3.1)
                        self.metrics.inc("total_transactions_pipelined", destination=self.key)
                    began = True
                elif in_flight:
                    behind_ok = False  # nothing to begin behind it now: read its reply
            # What was just begun goes out before the outcomes are recorded: the server
            # works on the next message while we wait for the commit.
            await session.flush()
            for done in finished:
                await self._record(done, hop)
                holding.runs.remove(done)
            if began or finished:
                continue
            if in_flight:
                await session.progress(until_behind=behind_ok)
                continue
            if run is not None and run.chunks and not session.can_begin:
                # The connection went away in the middle of a job.
                run.outcomes.extend(RecipientOutcome(i, 421, "4.4.2", "connection lost")
                                    for chunk in run.chunks for i in chunk)
                run.chunks.clear()
                await self._record(run, hop)
                holding.runs.remove(run)
            return

    async def _next_run(self, session: ClientSession, wait: bool,
                        holding: _Holding) -> _Run | None:
        """The next job with its message, or None: the connection's deliveries cap is
        reached, or no job is queued (``wait``: none came within ``idle_timeout``)."""
        cap = self.throttle.max_deliveries_per_connection
        if self.shaping is not None:
            cap = self.shaping.deliveries_per_connection(cap)
        while session.deliveries < cap:
            if self._paused_until() > trio.current_time():
                return None  # pushback: this connection ends; the probe comes later
            if holding.lease.revoked:
                return None  # over this node's share of a cluster's connections
            job = await self._next_job() if wait else self._take()
            if job is None:
                return None
            holding.jobs.append(job)
            loaded = await self.owner.load(job)
            holding.jobs.remove(job)
            if loaded is None:
                self._release(job)
            elif (held := self.owner.held_by_operator(job, loaded[0])) is not None:
                self._release(job)
                until = min(held[0], self.owner.wall(trio.current_time()) + 86400.0)
                attempt = Attempt(
                    outcomes=[RecipientOutcome(i, 451, "4.4.1", held[1])
                              for i in job.recipients],
                    destination=self.key, counted=False, not_before=until)
                await self.owner.settle(job, attempt, self.retry_policy, loaded, self._recorded)
            else:
                envelope, data = loaded
                verp = self.owner.return_path(envelope, job.recipients[0]) is not None
                run = _Run(job, envelope, data,
                           1 if verp else self.throttle.max_recipients_per_message)
                run.connect_seconds, session.setup_seconds = session.setup_seconds, 0.0
                holding.runs.append(run)
                return run
        return None

    async def _paced(self, domain: str, wait: bool) -> bool:
        """Take a token from the message-rate bucket, and from the domain's own when it
        has one (``wait``: sleeping for them)."""
        own = self._member(domain).bucket if self._shared else None
        if wait:
            if own is not None:
                await own.acquire()
            await self.message_bucket.acquire()
            return True
        if own is not None and not own.try_acquire():
            return False
        return self.message_bucket.try_acquire()

    async def _record(self, run: _Run, hop: Hop | None) -> None:
        self._release(run.job)
        self._feedback(run.outcomes, hop)
        attempt = Attempt(outcomes=run.outcomes, destination=self.key,
                          mx_host=hop.mx_host if hop else "", ip=hop.ip if hop else "",
                          port=hop.port if hop else 0, connect_seconds=run.connect_seconds,
                          seconds=trio.current_time() - run.started + run.connect_seconds)
        await self.owner.settle(run.job, attempt, self.retry_policy, (run.envelope, run.data),
                                self._recorded)


def _retry_policy(t: Limits) -> RetryPolicy:
    return RetryPolicy(retry_interval=t.retry_interval, max_retry_interval=t.max_retry_interval,
                       max_age=t.max_age, ambiguous=t.ambiguous)
