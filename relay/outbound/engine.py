"""The delivery engine of one worker: claims its shard's due jobs and delivers them.

API (what ``relay.worker`` calls)::

    engine = DeliveryEngine(config, spool, shard, nshards, events, hostname,
                            writer=writer, waker=waker)
    await nursery.start(engine.run)        # runs until cancelled
    engine.apply_config(new_config)        # SIGHUP: new throttles/routes, nothing dropped

Scheduling. ``run`` claims due jobs of shard ``shard`` (``Spool.due_jobs``, which leases
them for ``lease`` seconds), routes each to its ``Destination`` (one nursery per
active destination, see ``destination.py``) and sleeps until the earliest of: a wake-up
datagram (``wakeup.py``: another worker committed mail for this shard, or we stored a
DSN), the spool's ``next_due``, or ``poll_interval``. At start it releases the claims of
dead processes of this shard (``Spool.release_claims``), so a restarted worker resumes at
once instead of waiting for leases to expire. At most ``max_in_memory`` jobs are held;
beyond that the scheduler stops claiming (backpressure; the rest stay in the spool). One
destination holds at most ``max_per_destination``: a throttled destination with a big
backlog gets the excess handed back to the spool (due when its queue should have
drained), so it can never use up the budget and starve other destinations.

Outcomes. A destination reports each attempt of a job (``settle``); the verdict is
``relay.outcomes.judge``'s (delivered / retry at T / bounce / expire, the events, the
DSN), and the engine applies it: events first, then the completion through the worker's
group-commit writer (not waited for), so a crash between the two duplicates an event,
never loses one. Destinations see the engine only through the narrow ``DestinationOwner``
interface (``destination.py``).

Egress and shaping. With ``[egress]`` pools, each job gets a source of its pool
(``relay.outbound.egress``: weighted round robin, warm-up caps, unbindable sources left
out) and goes to the destination of the path (source, destination), keyed
``SOURCE->DESTINATION``; all paths of a destination live in the worker owning it. The
shaping table in the spool (``relay.spool.shaping``: rule suspensions, learned limits,
the operator's ``relay queue suspend``) is read whenever its version changes, at each
scheduler round; changes made here are written there the next round.

Ownership. A destination spanning domains (a provider) belongs to the worker its key
hashes to; a job claimed elsewhere is handed over through the spool (``Spool.hand_over``)
with a wake-up, so its limits live in one process at any worker count. Its limiters come
from ``limits`` (``relay.outbound.limits``): node-local by default, or shared with the
other nodes of a cluster (``relay.outbound.cluster.Cluster``, ``[cluster] redis``).

Time. Wall time is ``trio.current_time() + offset`` with the offset fixed when ``run``
starts, so under ``trio.testing.MockClock`` retry schedules and backoffs run instantly
while the spool still sees consistent Unix-like times.
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import Any

import trio

from relay.config import Config, Limits, parse_hostport
from relay.events import EventBus, Metrics
from relay.events.types import ShapingChange
from relay.model import ip_address
from relay.outbound.destination import Destination
from relay.outbound.egress import BIND_RETRY, Egress, Path
from relay.outbound.limits import LOCAL_LIMITS, LimitsFactory
from relay.outbound.resolver import Resolver
from relay.outbound.routing import Router
from relay.outbound.shaping import PathShaping
from relay.outbound.wakeup import Waker
from relay.outcomes.classify import Classifier, RulesError, load_classifier
from relay.outcomes.judge import Attempt, RetryPolicy, judge
from relay.outcomes.shaping import ShapingRules, ShapingRulesError, load_shaping_rules
from relay.outcomes.verp import verp_for
from relay.spool import (
    Completion,
    DeliveryJob,
    Envelope,
    GroupCommitWriter,
    MessageNotFound,
    NewMessage,
    Spool,
    SpoolError,
    new_queue_id,
    shard_of,
)
from relay.spool.shaping import ShapingEntry, ShapingStore, UsageStore, path_key

__all__ = ["DeliveryEngine"]

#: ``_shaping_io``'s arguments and answer (version, entries if changed, warm-up counts).
_ShapingRequest = tuple[list[ShapingEntry], str, dict[str, int] | None, bool]
_ShapingResult = tuple[int, list[ShapingEntry] | None,
                       tuple[dict[str, int], dict[str, int]] | None]

log = logging.getLogger("relay.outbound")


class DeliveryEngine:
    """See the module docstring. One per worker process; not thread-safe (trio only)."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        shard: int,
        nshards: int,
        events: EventBus,
        hostname: str,
        *,
        writer: GroupCommitWriter,
        metrics: Metrics | None = None,
        prepare_dsn: Callable[[NewMessage], NewMessage] | None = None,
        waker: Waker | None = None,
        resolver: Resolver | None = None,
        client_ssl_context: ssl.SSLContext | None = None,
        poll_interval: float = 1.0,
        claim_batch: int = 1000,
        max_in_memory: int = 20000,
        max_per_destination: int = 2000,
        lease: float = 600.0,
        release_claims_on_start: bool = True,
        prefetch_bytes: int = 16 * 1024 * 1024,
        limits: LimitsFactory = LOCAL_LIMITS,
    ) -> None:
        self.config = config
        #: Builds each destination's limiters: node-local, or a cluster's (``Cluster``).
        self.limits = limits
        self.spool = spool
        self.shard = shard
        self.nshards = nshards
        self.events = events
        self.hostname = hostname
        self.waker = waker
        #: Outcomes are committed by the worker's group-commit writer: one fsync for the
        #: receptions and the deliveries of the same moment.
        self.writer = writer
        #: The worker's counters and gauges (shared with the writer, the waker, ...).
        self.metrics = metrics if metrics is not None else writer.metrics
        #: The intake's stages for the DSNs we generate (the worker wires the intake in;
        #: they are stored with the outcome that caused them, in one transaction).
        self.prepare_dsn = prepare_dsn
        self.resolver = resolver or Resolver(list(config.outbound.resolvers))
        self.router = Router(config.outbound, self.resolver)
        #: Bounce classification rules ([bounces] rules before the shipped defaults),
        #: compiled once per config (``load_classifier`` reuses what ``load_config``
        #: compiled when it checked the file).
        try:
            self.classifier: Classifier = load_classifier(config.bounces.rules)
        except RulesError as e:  # changed since the config was checked
            log.error("bounce rules not usable, classifying with the defaults only: %s", e)
            self.classifier = load_classifier("")
        self.client_ssl_context = client_ssl_context
        #: Egress sources and pools; shaping rules, and the persisted shaping table
        #: (read again whenever its version changes, see ``_claim``).
        self.egress = Egress(config.egress)
        self.shaping_rules = _shaping_rules(config, ShapingRules([]))
        #: Opened by ``run`` (in the worker, after the spool is).
        self.shaping_store: ShapingStore | None = None
        self.usage: UsageStore | None = None
        self._shaping_version = -1
        self._shaping: dict[str, list[ShapingEntry]] = {}
        self._to_persist: list[ShapingEntry] = []
        self._usage_loaded = ""
        self.poll_interval = poll_interval
        self.claim_batch = claim_batch
        self.max_in_memory = max_in_memory
        self.max_per_destination = max_per_destination
        self.lease = lease
        #: For Claimant: the engine lives in the process that stores its claims.
        self.pid = os.getpid()
        self.release_claims_on_start = release_claims_on_start
        #: Messages read together with their claim (one thread hop and one read
        #: transaction per claim batch instead of one per job), at most about this many
        #: bytes held; jobs beyond it are read when their delivery starts.
        self.prefetch_bytes = prefetch_bytes
        self._prefetched: dict[tuple[str, str], tuple[Envelope, bytes]] = {}
        self._prefetched_bytes = 0
        self.destinations: dict[str, Destination] = {}
        #: (job, destination key) waiting to be handed to the key's owner (``_hand_over``).
        self._handovers: list[tuple[DeliveryJob, str]] = []
        #: The worker (shard) owning a destination key, cached: asked for every job.
        self._owner = functools.lru_cache(maxsize=16384)(
            functools.partial(_owner_of, nshards=nshards))
        #: (queue_id, domain) of jobs held in memory (claimed, not yet completed).
        self._held: set[tuple[str, str]] = set()
        self._offset = time.time()
        self._offset_fixed = False
        self._wake = trio.Event()
        #: Wall time the scheduler plans to look next; an earlier reschedule pokes it.
        self._sleep_until = 0.0
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------------ time

    def now(self) -> float:
        """Wall time (Unix seconds) derived from trio's clock; see module doc."""
        return trio.current_time() + self._offset

    def wall(self, trio_time: float) -> float:
        """Convert a ``trio.current_time()`` value to wall time."""
        return trio_time + self._offset

    # ------------------------------------------------------------------ control

    @property
    def source_address(self) -> str:
        """Where outgoing connections come from ("" = the kernel's choice)."""
        return self.config.outbound.source_address

    def member_caps(self, domain: str) -> tuple[int | None, str | None]:
        return self.config.outbound.member_caps(domain)

    def return_path(self, envelope: Envelope, recipient_index: int) -> str | None:
        """The VERP return path of one recipient (``[bounces] domain``,
        relay.outcomes.verp), or None: the envelope's own sender (no bounce domain, or
        the null sender of a DSN, which stays null)."""
        bounces = self.config.bounces
        verp = verp_for(bounces.domain, bounces.secret)
        if verp is None or not envelope.sender or envelope.is_bounce:
            return None
        return verp.address(envelope.queue_id, recipient_index)

    def is_own_listener(self, ip: str, port: int) -> bool:
        """Whether ``ip:port`` is one of this relay's SMTP listeners (a route, smart host
        or MX pointing back at us: a mail loop). A wildcard listener counts for the
        loopback addresses on its port."""
        return own_listener(tuple(self.config.inbound.listen), ip, port)

    def apply_config(self, config: Config) -> None:
        """Apply a reloaded config: routes, smart host and resolvers for new jobs;
        throttles for running destinations at once. Nothing queued or in flight is
        dropped; a changed destination key (rollup, route) applies to jobs claimed
        from now on."""
        if list(config.outbound.resolvers) != list(self.config.outbound.resolvers):
            self.resolver = Resolver(list(config.outbound.resolvers))
        self.config = config
        self.router = Router(config.outbound, self.resolver)
        self.shaping_rules = _shaping_rules(config, self.shaping_rules)
        self.egress.reconfigure(config.egress)
        try:
            self.classifier = load_classifier(config.bounces.rules)
        except RulesError as e:  # changed since the config was checked: keep the old rules
            log.error("reload: keeping the bounce rules in use: %s", e)
        for dest in self.destinations.values():
            limits = self._limits(dest.path, dest.key)
            dest.apply_throttle(limits, self.limits.refresh(
                dest.key, dest.limiters, limits, self._local_limits(dest.path, dest.key)))
        self.poke()

    def poke(self) -> None:
        """Make the scheduler look at the spool now (same process)."""
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver this shard until cancelled (cancellation leaves claimed jobs to their
        lease / to ``release_claims`` at the next start: nothing is lost)."""
        if not self._offset_fixed:
            self._offset = time.time() - trio.current_time()
            self._offset_fixed = True
        if self.shaping_store is None:
            self.shaping_store = ShapingStore(self.spool)
            self.usage = UsageStore(self.spool) if not self.spool.readonly else None
        if self.release_claims_on_start:
            released = await trio.to_thread.run_sync(
                functools.partial(self.spool.release_claims, self.shard, self.nshards)
            )
            if released:
                log.info("shard %d: resumed %d jobs claimed by dead workers",
                         self.shard, released)
        listener = self.waker.listen(self.shard) if self.waker is not None else None
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if listener is not None:
                    nursery.start_soon(self._wake_loop, listener)
                task_status.started()
                await self._schedule()
        finally:
            self._nursery = None
            if listener is not None:
                listener.close()

    async def _wake_loop(self, listener: Any) -> None:
        while True:
            await listener.wait()
            self._wake.set()

    async def _schedule(self) -> None:
        while True:
            self._wake = trio.Event()
            room = self.max_in_memory - len(self._held)
            nd: float | None = None
            if room > 0:
                limit = min(self.claim_batch, room)
                try:
                    jobs, loaded, nd, shaping = await trio.to_thread.run_sync(
                        self._claim, self.now(), limit,
                        self.prefetch_bytes - self._prefetched_bytes,
                        self._shaping_request(),
                    )
                    self._shaping_apply(shaping)
                except Exception:
                    # A spool that cannot be read now must not end the worker (which
                    # would only crash-loop on it): log, and look again after a while.
                    log.exception("shard %d: claiming due jobs failed", self.shard)
                    jobs, loaded, nd = [], {}, None
                overflow: list[tuple[DeliveryJob, float]] = []
                for job in jobs:
                    self._dispatch(job, overflow, loaded.get(job.queue_id))
                if overflow:
                    # Released jobs are due again soon: next_due must be read after.
                    nd = await trio.to_thread.run_sync(self._release_then_next_due, overflow)
                if len(jobs) >= limit:
                    await trio.lowlevel.checkpoint()
                    continue
            timeout = self.poll_interval
            if nd is not None:
                # A floor keeps a due-but-unclaimable entry from spinning the loop.
                timeout = min(timeout, max(nd - self.now(), 0.005))
            self._sleep_until = self.now() + timeout
            with trio.move_on_after(timeout):
                await self._wake.wait()
            self._sleep_until = 0.0

    def _claim(
        self, now: float, limit: int, prefetch_room: int, shaping: _ShapingRequest
    ) -> tuple[list[DeliveryJob], dict[str, tuple[Envelope, bytes]], float | None,
               _ShapingResult | None]:
        """(Worker thread) One scheduler round's spool work in one thread hop: claim
        up to ``limit`` due jobs, read their messages (up to ``prefetch_room`` bytes),
        and, when the claim did not fill ``limit`` (the scheduler will sleep), the
        shard's next due time; and the shaping table's work (``_shaping_io``)."""
        try:
            shaped = self._shaping_io(*shaping)
        except Exception:
            log.exception("shard %d: reading or writing the shaping table failed", self.shard)
            self._to_persist[:0] = shaping[0]  # (list.insert is atomic) tried next round
            shaped = None
        spool = self.spool
        jobs = spool.due_jobs(now, self.shard, self.nshards, limit, self.lease)
        loaded: dict[str, tuple[Envelope, bytes]] = {}
        if jobs:
            try:
                loaded = spool.load_many([j.queue_id for j in jobs], prefetch_room)
            except Exception:
                # Only an optimisation: each job reads its message when it starts.
                log.exception("prefetching %d messages failed", len(jobs))
        nd = spool.next_due(self.shard, self.nshards) if len(jobs) < limit else None
        return jobs, loaded, nd, shaped

    # -- shaping state and warm-up counts, shared through the spool

    def _shaping_request(self) -> _ShapingRequest:
        """What the next ``_shaping_io`` (in the claim's thread hop) is to do: write the
        shaping changes of the last round, read the table when its version moved (an
        operator, another worker), publish this worker's warm-up counts while reading
        the others' (only when a source has a warm-up schedule)."""
        persist, self._to_persist = self._to_persist, []
        egress = self.egress
        egress.used("", self.now())  # roll the day over
        usage = dict(egress.local) if egress.unpublished else None
        egress.unpublished = False
        load_usage = any(s.warmup for s in egress.config.sources.values())
        return persist, egress.day, usage, load_usage

    def _shaping_apply(self, result: _ShapingResult | None) -> None:
        if result is None:
            return
        version, entries, counts = result
        egress = self.egress
        if counts is not None:
            own, others = counts
            if self._usage_loaded != egress.day:  # a restart today: go on from our count
                self._usage_loaded = egress.day
                for source, n in own.items():
                    egress.local[source] = max(egress.local.get(source, 0), n)
            egress.others = others
        if entries is not None:
            self._shaping_version = version
            by_scope: dict[str, list[ShapingEntry]] = {}
            for entry in entries:
                by_scope.setdefault(entry.scope, []).append(entry)
            self._shaping = by_scope
            self._apply_admin()

    def _shaping_io(self, persist: list[ShapingEntry], day: str, usage: dict[str, int] | None,
                    load_usage: bool) -> _ShapingResult:
        """(Worker thread) See ``_shaping_request``."""
        store = self.shaping_store
        assert store is not None
        if persist and not self.spool.readonly:
            store.put(persist)
        version = store.version()
        entries = store.entries(time.time()) if version != self._shaping_version else None
        counts = None
        if self.usage is not None and load_usage:
            if usage:
                self.usage.publish(day, usage, self.shard)
            counts = self.usage.read(day, self.shard)
        return version, entries, counts

    def _persist(self, entry: ShapingEntry) -> None:
        self._to_persist.append(entry)
        self._wake.set()

    def _publish(self, change: ShapingChange) -> None:
        log.info("shaping %s: %s -> %s (%s%s)", change.scope, change.before, change.after,
                 change.rule, f": {change.reason}" if change.reason else "")
        self.events.emit(change)

    def operator_hold(self, scopes: list[str]) -> tuple[float, str] | None:
        """The operator's suspension over any of ``scopes`` (Unix time it ends, inf for
        until resumed; its reason), or None."""
        now = self.now()
        best: tuple[float, str] | None = None
        for scope in scopes:
            for entry in self._shaping.get(scope, ()):
                if entry.origin == "admin" and entry.suspend and entry.active(now):
                    until = entry.until if entry.until is not None else float("inf")
                    if best is None or until > best[0]:
                        best = (until, entry.reason or f"suspended by the operator ({scope})")
        return best

    def _admin_scopes(self, dest: Destination) -> list[str]:
        path = dest.path
        destination = path.destination if path is not None else dest.key
        scopes = [dest.key]
        if destination.startswith("provider:"):
            scopes.append(destination)
        else:
            scopes.append(f"domain:{destination}")
        if path is not None and path.source:
            scopes.append(f"source:{path.source}")
        return scopes

    def _apply_admin(self) -> None:
        """Operator suspensions onto running destinations; a lifted one lets them go."""
        for dest in self.destinations.values():
            if not self._hold(dest) and dest.backoff_reason.startswith(ADMIN_HOLD):
                dest.lift_backoff()

    def _hold(self, dest: Destination) -> bool:
        """Suspend ``dest`` while an operator holds it (re-checked a day ahead at most:
        a hold until resumed has no end); whether one does."""
        held = self.operator_hold(self._admin_scopes(dest))
        if held is None:
            return False
        until, reason = held
        dest.suspend(min(until - self._offset, trio.current_time() + 86400.0),
                     f"{ADMIN_HOLD}{reason}")
        return True

    def held_by_operator(self, job: DeliveryJob,
                         envelope: Envelope) -> tuple[float, str] | None:
        """An operator's suspension of this job's domain (inside a provider's
        destination, which is held as a whole only by provider), or of its message's
        tenant or campaign: (Unix time, reason), or None."""
        if not self._shaping:
            return None
        scopes = [f"domain:{job.domain}"]
        if envelope.tenant:
            scopes.append(f"tenant:{envelope.tenant}")
        if envelope.campaign_id:
            scopes.append(f"campaign:{envelope.campaign_id}")
        return self.operator_hold(scopes)

    def source_unusable(self, source: str, reason: str) -> None:
        until = self.now() + BIND_RETRY
        if self.egress.unbindable.get(source, 0.0) < self.now():
            self._publish(ShapingChange(queue_id="", scope=f"source:{source}", before="usable",
                                        after="suspended", reason=reason, rule="bind",
                                        until=until))
        self.egress.unbindable[source] = until

    # -- jobs claimed by the inbound commit (relay.spool.Claimant)

    def wants(self, domain_hash: int) -> bool:
        """Store this domain's new job claimed for us? Yes for our shard while we run
        and hold fewer than ``max_in_memory`` jobs (beyond that the scheduler's
        backpressure applies: the job stays due in the spool)."""
        return (
            self._nursery is not None
            and domain_hash % self.nshards == self.shard
            and len(self._held) < self.max_in_memory
        )

    def adopt(self, jobs: list[tuple[DeliveryJob, Envelope, bytes]]) -> None:
        """Deliver jobs that a commit of this worker stored claimed for us; the
        message bytes are kept while the prefetch budget allows (else read later)."""
        if self._nursery is None:
            return  # stopping: the claims are released at the next start
        overflow: list[tuple[DeliveryJob, float]] = []
        for job, envelope, data in jobs:
            room = self._prefetched_bytes + len(data) <= self.prefetch_bytes
            self._dispatch(job, overflow, (envelope, data) if room else None)
        if overflow:
            self._nursery.start_soon(trio.to_thread.run_sync, self._release, overflow)

    # -- placing held jobs

    def _dispatch(self, job: DeliveryJob, overflow: list[tuple[DeliveryJob, float]],
                  prefetched: tuple[Envelope, bytes] | None = None) -> None:
        key = (job.queue_id, job.domain)
        if key in self._held:
            return  # lease expired while we still hold it: ours completes it
        assert self._nursery is not None
        self._held.add(key)
        if prefetched is not None:
            self._prefetched[key] = prefetched
            self._prefetched_bytes += len(prefetched[1])
        if self.router.key_needs_dns(job.domain):
            # Providers: the destination depends on the MX hosts, which takes a lookup. Do it
            # in its own task so a slow DNS answer never holds up the scheduler (and
            # with it every other destination).
            self._nursery.start_soon(self._dispatch_resolved, job)
            return
        self._place(job, job.domain, overflow)

    async def _dispatch_resolved(self, job: DeliveryJob) -> None:
        try:
            dest_key = await self.router.destination_key(job.domain, job.shard_key)
        except Exception:
            log.exception("cannot find the destination of %s; delivering it by its domain",
                          job.domain)
            dest_key = job.domain
        overflow: list[tuple[DeliveryJob, float]] = []
        self._place(job, dest_key, overflow)
        if overflow:
            await trio.to_thread.run_sync(self._release, overflow)

    def _place(self, job: DeliveryJob, dest_key: str,
               overflow: list[tuple[DeliveryJob, float]]) -> None:
        """Hand a held job to its destination (created on demand), or to ``overflow``,
        or, when another worker owns that destination, over to that worker."""
        assert self._nursery is not None
        if self._owner(dest_key) != self.shard:
            self._hand_over(job, dest_key)
            return
        path = self._path(job, dest_key)
        if path is None:
            # No source of its pool can take it now (warm-up caps, unbindable, suspended):
            # back to the spool until one can. Not an attempt, not an event.
            overflow.append((job, self._no_source_until(job)))
            self._held.discard((job.queue_id, job.domain))
            self._drop_prefetched(job)
            return
        dest = self.destinations.get(path.key)
        if dest is not None and not dest.closed and len(dest.queue) >= self.max_per_destination:
            # A backlogged (throttled/slow) destination must not fill the engine's memory
            # budget and starve the others: hand the job back to the spool until the
            # queue we hold has had time to drain. Not an attempt, not an event.
            overflow.append((job, self.now() + dest.drain_seconds()))
            self._held.discard((job.queue_id, job.domain))
            self._drop_prefetched(job)
            return
        if dest is None or dest.closed:
            dest = self._new_destination(path)
            self.destinations[path.key] = dest
            self._nursery.start_soon(self._run_destination, dest)
        elif job.forced and dest.backed_off:
            log.info("operator retry of %s: lifting the backoff of %s", job.queue_id, dest_key)
            dest.lift_backoff()
        dest.enqueue(job)

    def _path(self, job: DeliveryJob, dest_key: str) -> Path | None:
        """The (source, destination) path of a job: a source of its pool (``egress``),
        or the default source when there are no pools; None when no source can take it
        now."""
        egress = self.egress
        if not egress.enabled:
            return Path(dest_key, dest_key, "", self.config.outbound.source_address,
                        self.hostname)

        def path_open(source: str) -> bool:
            dest = self.destinations.get(path_key(source, dest_key))
            return dest is None or dest.shaping is None or \
                dest.shaping.suspended_until <= self.now()

        source = egress.choose(job.pool, self.now(), len(job.recipients), path_open)
        if source is None:
            return None
        src = egress.source(source)
        assert src is not None
        return Path(path_key(source, dest_key), dest_key, source,
                    src.source_address or self.config.outbound.source_address,
                    src.ehlo_domain or self.hostname)

    def _no_source_until(self, job: DeliveryJob) -> float:
        """When to look again for a source for ``job``: the next UTC day when every
        source of its pool is over its warm-up cap, else in half a minute."""
        now = self.now()
        pool = self.egress.config.pools[self.egress.pool_of(job.pool)]
        if all(self.egress.cap(m.source, now) is not None
               and not self.egress.usable(m.source, now, len(job.recipients))
               and self.egress.unbindable.get(m.source, 0.0) <= now
               for m in pool.sources):
            return self.egress.next_day(now)
        return now + 30.0

    def _limits(self, path: Path | None, key: str) -> Limits:
        if path is None or not path.source:
            return self.config.outbound.throttle_for(key if path is None else path.destination)
        return self.config.outbound.throttle_for(path.destination, path.source,
                                                 self.egress.source(path.source))

    def _local_limits(self, path: Path | None, key: str) -> frozenset[str]:
        """The limits of ``_limits`` written ``local:`` (this node's own in a cluster)."""
        if path is None or not path.source:
            return self.config.outbound.local_limits(key if path is None else path.destination)
        return self.config.outbound.local_limits(path.destination, path.source,
                                                 self.egress.source(path.source))

    def _new_destination(self, path: Path) -> Destination:
        limits = self._limits(path, path.key)
        shaping = PathShaping(
            path.key, path.destination, self.config.shaping, self.shaping_rules, limits,
            now=self.now, publish=self._publish, persist=self._persist,
            entries=self._shaping.get(path.key, []))
        limiters = self.limits.make(path.key, limits, self._local_limits(path, path.key))
        dest = Destination(self, path.key, limits, path=path, shaping=shaping,
                           limiters=limiters)
        self._hold(dest)
        dest.reshape()  # a rule's suspension restored from the spool
        return dest

    def _hand_over(self, job: DeliveryJob, dest_key: str) -> None:
        """Queue ``job`` for the worker owning ``dest_key`` (principle 4: a destination's
        limits live in one process). Batched: one spool transaction for every hand-over
        of the moment, then a wake-up datagram to the owners."""
        assert self._nursery is not None
        self._handovers.append((job, dest_key))
        if len(self._handovers) == 1:
            self._nursery.start_soon(self._flush_handovers)

    async def _flush_handovers(self) -> None:
        await trio.lowlevel.checkpoint()  # let the rest of this round join the batch
        moves, self._handovers = self._handovers, []
        try:
            await trio.to_thread.run_sync(self.spool.hand_over, moves, self.now())
        except Exception:
            log.exception("handing %d jobs to their owners failed; they come back with "
                          "their lease", len(moves))
        for job, _key in moves:
            self._finish(job)
        owners = {self._owner(key) for _job, key in moves}
        if self.waker is not None:
            self.waker.notify(owners)

    def _release(self, overflow: list[tuple[DeliveryJob, float]]) -> None:
        """(Worker thread) Put claimed-but-unwanted jobs back, unchanged but for ``due``,
        in one transaction."""
        self.spool.complete_many([
            Completion(queue_id=job.queue_id, domain=job.domain, deferred=job.recipients,
                       next_due=until, attempts=job.attempts, error=job.last_error,
                       first_attempt=job.first_attempt)
            for job, until in overflow
        ])

    def _release_then_next_due(self, overflow: list[tuple[DeliveryJob, float]]) -> float | None:
        """(Worker thread) ``_release``, then the shard's next due time."""
        self._release(overflow)
        return self.spool.next_due(self.shard, self.nshards)

    async def _run_destination(self, dest: Destination) -> None:
        try:
            await dest.run()
        except Exception:
            # The last net under a destination (its connections catch their own faults):
            # the worker goes on; what the destination still held comes back with its
            # claim lease.
            log.exception("destination %s failed; its %d queued jobs wait for their lease",
                          dest.key, len(dest.queue))
            for job in dest.queue:
                self.abandon(job)
            dest.queue.clear()
        finally:
            if self.destinations.get(dest.key) is dest:
                del self.destinations[dest.key]

    def abandon(self, job: DeliveryJob) -> None:
        """Forget a held job without recording an outcome (its outcome could not be
        recorded): it stays claimed in the spool and is delivered again when its lease
        ends, or at the next start."""
        self._finish(job)

    def _finish(self, job: DeliveryJob) -> None:
        self._held.discard((job.queue_id, job.domain))
        self._drop_prefetched(job)
        if len(self._held) == self.max_in_memory - 1:
            self._wake.set()  # room again: claim more

    # ------------------------------------------------------------------ outcomes

    def _drop_prefetched(self, job: DeliveryJob) -> tuple[Envelope, bytes] | None:
        loaded = self._prefetched.pop((job.queue_id, job.domain), None)
        if loaded is not None:
            self._prefetched_bytes -= len(loaded[1])
        return loaded

    async def load(self, job: DeliveryJob) -> tuple[Envelope, bytes] | None:
        """The message of a job, or None (and the job is finished) if it was deleted.

        A message read with the job's claim is used (once) without a thread hop; like a
        delivery already in flight, it may then still go out if an operator deletes it
        meanwhile (its completion then finds no job, which is harmless)."""
        loaded = self._drop_prefetched(job)
        if loaded is not None:
            return loaded
        try:
            return await trio.to_thread.run_sync(self.spool.load, job.queue_id)
        except MessageNotFound:
            self._finish(job)
            return None

    async def settle(self, job: DeliveryJob, attempt: Attempt, policy: RetryPolicy,
                     loaded: tuple[Envelope, bytes] | None = None,
                     on_recorded: Callable[[], object] | None = None) -> None:
        """Apply the verdict on one attempt of ``job`` (``relay.outcomes.judge``): publish
        its events, then commit its completion (and DSN) through the group-commit
        writer, without waiting for the commit. ``on_recorded`` runs once it is
        committed."""
        if loaded is None:
            loaded = await self.load(job)
            if loaded is None:
                return
        envelope, data = loaded
        verdict = judge(job, envelope, data, attempt, policy, now=self.now(),
                        hostname=self.hostname, new_queue_id=new_queue_id,
                        classifier=self.classifier)
        # Events are written BEFORE the commit: they say what happened on the wire, and a
        # kill -9 between the two then leaves an event for an outcome that is retried
        # (logged again: at-least-once accounting) instead of a committed outcome with
        # no event at all.
        dsn = verdict.dsn
        if dsn is not None and self.prepare_dsn is not None:
            dsn = self.prepare_dsn(dsn)
            verdict.completion.new_messages = [dsn]
        self.events.emit_many(verdict.events)

        def after_commit(error: BaseException | None = None) -> None:
            # Runs synchronously right after the commit (in the committing task).
            if error is not None:
                # Shutdown (writer closed) or a failed commit: the job stays claimed and
                # comes back when its lease ends (or at the next start): a possible
                # duplicate delivery, never a loss.
                log.warning("outcome of %s/%s not recorded: %s", job.queue_id, job.domain,
                            error)
                self._finish(job)
                return
            if dsn is not None:
                self._wake_owners(dsn)
            if on_recorded is not None:
                on_recorded()
            if (verdict.deferred and self._sleep_until > 0.0
                    and verdict.retry_at < self._sleep_until):
                # The scheduler sleeps until a later time (e.g. this job's lease expiry,
                # which next_due reported while we held it): make it re-read next_due.
                self._wake.set()
            self._finish(job)

        try:
            # Not waited for: the connection goes on while the writer commits.
            self.writer.submit_completion(verdict.completion, after_commit)
        except SpoolError as e:
            after_commit(e)

    def _wake_owners(self, msg: NewMessage) -> None:
        shards = {shard_of(r.domain, self.nshards) for r in msg.envelope.recipients}
        if self.shard in shards:
            self._wake.set()
            shards.discard(self.shard)
        if shards and self.waker is not None:
            self.waker.notify(shards)


#: The reason of an operator's suspension starts so (``relay queue suspend``).
ADMIN_HOLD = "suspended by the operator: "


def _shaping_rules(config: Config, running: ShapingRules) -> ShapingRules:
    """The config's shaping rules; the running ones when they cannot be read now (the
    file changed since the config was checked)."""
    try:
        return load_shaping_rules(config.shaping)
    except ShapingRulesError as e:
        log.error("shaping rules not usable, keeping the rules in use: %s", e)
        return running


def _owner_of(dest_key: str, nshards: int) -> int:
    return shard_of(dest_key, nshards)


@functools.lru_cache(maxsize=1024)
def own_listener(listen: tuple[str, ...], ip: str, port: int) -> bool:
    """See ``DeliveryEngine.is_own_listener`` (cached: the answer depends only on the
    listen list and the address)."""
    addr = ip_address(ip)
    if addr is None:
        return False
    for spec in listen:
        try:
            host, lport = parse_hostport(spec)
        except ValueError:
            continue
        listener = ip_address(host)
        if listener is None or lport != port:
            continue
        if listener == addr or (listener.is_unspecified and addr.is_loopback):
            return True
    return False
