"""One worker process: a single ``trio.run`` that receives mail and delivers its shard.

The supervisor forks N of these. Each one runs as ``server.user`` from its first
instruction (the supervisor's child gives root up before calling ``run_worker``), takes
over the SO_REUSEPORT listening sockets the supervisor bound for it just before the
fork (``relay.inbound.listener.take_listeners``), opens its own LMDB environment, and
runs three things in one nursery: the group-commit writer, the SMTP listener, and the
delivery engine for the domains whose stable hash falls in its shard. Nothing is shared
in memory between workers; mail for another worker's shard reaches it through the spool
plus a datagram wake-up. Worker 0 alone also sends the webhooks (``[[webhooks]]``,
``relay.events.webhooks``): they read the event log all workers share, so exactly one
process posts it.

Signals (delivered by the supervisor):
- SIGTERM/SIGINT: stop accepting, let open transactions finish for up to
  ``server.shutdown_timeout`` (idle sessions get ``421 4.3.2`` at once), flush the
  writer, stop delivery (in-flight deliveries are covered by the spool's claim lease), exit 0.
- SIGHUP: re-read the config file. An invalid file is logged with its key and the running
  config stays. New sessions get the new inbound settings; delivery gets new throttles.
- SIGUSR1: reopen the event log and the mail log (logrotate's postrotate, after it moved
  them); a file that cannot be opened is logged and the old one kept.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import trio

from relay.config import Config, ConfigError, reload_config
from relay.events import EventBus, EventLog, Metrics
from relay.events.maillog import MailLog
from relay.events.suppress_feed import SuppressionFeed
from relay.events.webhooks import WebhookService
from relay.http.api import IDEMPOTENCY_TTL, HttpApi
from relay.http.metrics import AdminApp, publish_snapshots
from relay.http.server import HttpRegistry, serve_http
from relay.inbound.bounces import BounceMailbox
from relay.inbound.listener import serve_listeners, take_listeners
from relay.inbound.session import InboundContext, SessionRegistry, serve_session
from relay.inbound.tls import server_ssl_context
from relay.intake import Admission, Intake, default_stages
from relay.outbound.engine import DeliveryEngine
from relay.outbound.limits import LOCAL_LIMITS
from relay.outbound.wakeup import Waker
from relay.outcomes.classify import RulesError, load_classifier
from relay.outcomes.suppress import SuppressPolicy, parse_policy
from relay.spool import GroupCommitWriter, NewMessage, Spool, new_queue_id, shard_of
from relay.spool.suppression import SuppressionList

__all__ = ["run_worker"]

log = logging.getLogger("relay.worker")


class Worker:
    def __init__(self, config: Config, config_path: str | None, index: int, nworkers: int):
        self.config = config
        self.config_path = config_path
        self.index = index
        self.nworkers = nworkers
        self.registry = SessionRegistry()
        self.http_registry = HttpRegistry()
        self.admin_registry = HttpRegistry()
        self.accepting = trio.CancelScope()

    async def main(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        cfg = self.config
        Path(cfg.spool.path).mkdir(parents=True, exist_ok=True)
        spool = Spool(cfg.spool.path, cfg.spool.map_size_bytes())
        self.spool = spool
        self.suppressions = SuppressionList(spool)
        # Bounces and complaints add suppression entries ([bounces] auto_suppress).
        self.feed = SuppressionFeed(self.suppressions, _suppress_policy(cfg),
                                    purge=self.index == 0)
        # One bus; the JSON-lines log and the counters subscribe (principle 7).
        metrics = Metrics()
        event_log = EventLog(cfg.log.events) if cfg.log.events else None
        try:
            mail_log = (MailLog(cfg.log.mail_log, hostname=cfg.server.resolved_hostname(),
                                level=cfg.log.mail_log_level) if cfg.log.mail_log else None)
        except OSError as e:  # the supervisor stops the relay with this one line
            raise ConfigError(f"{self.config_path or 'config'}: log.mail_log: cannot open "
                              f"{cfg.log.mail_log}: {e.strerror or e}") from None
        self.logs: list[EventLog | MailLog] = [x for x in (event_log, mail_log) if x is not None]
        events = EventBus([s for s in (event_log, mail_log, metrics, self.feed)
                           if s is not None])
        waker = Waker(cfg.spool.path, metrics)
        nworkers = self.nworkers

        # Every commit maps all its recipients' domains to shards: remember the answers
        # (a bulk sender sends to the same domains all day).
        owner = functools.lru_cache(maxsize=16384)(lambda domain: shard_of(domain, nworkers))

        def wake_owners(messages: list[NewMessage]) -> None:
            # Our own shard's jobs were stored claimed for our engine (Claimant) and
            # handed to it after the commit; when it had no room it wakes itself as
            # room frees up. So only the other workers need a datagram.
            owners = {owner(r.domain) for m in messages for r in m.envelope.recipients}
            owners.discard(self.index)
            if owners:
                waker.notify(owners)

        def flush_logs() -> None:
            for log_file in self.logs:
                log_file.flush()

        writer = GroupCommitWriter(
            spool, cfg.spool.commit_window, cfg.spool.commit_max_messages, on_commit=wake_owners,
            metrics=metrics, flush_logs=flush_logs,
        )
        self.writer, self.events = writer, events
        self.ctx = self._context(cfg, server_ssl_context(cfg.inbound, self.config_path or "config"))
        # [cluster] redis: the limits shared with the other nodes (its client lives in
        # this worker's services nursery, started before the engine that uses it;
        # coredis is imported only by a node of a cluster).
        cluster = None
        if cfg.cluster.redis:
            from relay.outbound.cluster import Cluster

            cluster = Cluster(cfg.cluster, metrics=metrics, events=events)
        self.engine = DeliveryEngine(
            cfg, spool, self.index, nworkers, events, self.ctx.hostname, waker=waker,
            writer=writer, metrics=metrics, prepare_dsn=self._prepare_dsn,
            limits=cluster or LOCAL_LIMITS,
        )
        writer.claimant = self.engine
        self.http_app = self._http_app(cfg, self.ctx)
        listeners = take_listeners(cfg.inbound.listen)
        http_listeners = take_listeners(cfg.http.listen)
        metrics_dir = Path(cfg.spool.path) / "metrics"
        self.admin_app = AdminApp(cfg.admin, metrics, metrics_dir, self.index, nworkers)
        admin_listeners = take_listeners(cfg.admin.listen)
        # Webhooks read the shared event log: one process (worker 0) sends them.
        self.webhooks = WebhookService(cfg, metrics) if self.index == 0 else None
        try:
            async with trio.open_nursery() as services:
                for log_file in self.logs:  # one write per scheduler pass
                    await services.start(log_file.run)
                await services.start(writer.run)
                await services.start(self.feed.run)
                if cluster is not None:
                    await services.start(cluster.run)
                await services.start(self.engine.run)
                services.start_soon(self.registry.watch, lambda: self.ctx)
                if self.index == 0 and http_listeners:
                    services.start_soon(_purge_idempotency, spool)
                services.start_soon(publish_snapshots, metrics, metrics_dir, self.index,
                                    spool if self.index == 0 else None)
                if self.webhooks is not None:
                    await services.start(self.webhooks.run)
                async with trio.open_nursery() as sessions:
                    await sessions.start(self._accept, listeners, http_listeners, sessions,
                                         admin_listeners)
                    services.start_soon(self._signals, sessions)
                    task_status.started()
                    log.info("worker %d/%d ready (pid %d) on %s", self.index, nworkers,
                             os.getpid(), ", ".join(cfg.inbound.listen + [
                                 f"http://{a}" for a in cfg.http.listen] + [
                                 f"http://{a}/metrics" for a in cfg.admin.listen]))
                # Sessions are drained: nothing more will be submitted. Commit what was,
                # then stop delivery (in-flight jobs are covered by their claim lease).
                await writer.aclose()
                await self.feed.flushed()
                services.cancel_scope.cancel()
        finally:
            for log_file in self.logs:
                log_file.close()
            spool.close()
        log.info("worker %d stopped", self.index)

    async def _accept(
        self,
        listeners: list[socket.socket],
        http_listeners: list[socket.socket],
        sessions: trio.Nursery,
        admin_listeners: list[socket.socket] | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept SMTP, HTTP and admin connections until ``accepting`` is cancelled; all
        run in ``sessions``, so shutdown drains them alike."""
        ctx_ref: Callable[[], InboundContext] = lambda: self.ctx  # noqa: E731
        app_ref: Callable[[], HttpApi] = lambda: self.http_app  # noqa: E731
        admin_ref: Callable[[], AdminApp] = lambda: self.admin_app  # noqa: E731
        with self.accepting:
            async with trio.open_nursery() as both:
                await both.start(functools.partial(
                    serve_listeners, listeners,
                    lambda sock, peer: serve_session(sock, peer, ctx_ref, self.registry),
                    sessions))
                if http_listeners:
                    await both.start(functools.partial(
                        serve_listeners, http_listeners,
                        lambda sock, peer: serve_http(sock, peer, app_ref, self.http_registry),
                        sessions))
                if admin_listeners:
                    await both.start(functools.partial(
                        serve_listeners, admin_listeners,
                        lambda sock, peer: serve_http(sock, peer, admin_ref,
                                                      self.admin_registry),
                        sessions))
                task_status.started()

    async def _signals(self, sessions: trio.Nursery) -> None:
        """Handle signals for the worker's whole life. A repeated SIGTERM/SIGINT is
        ignored rather than left to the default action: Ctrl-C and systemd's
        control-group kill reach the workers as well as the supervisor, which forwards
        its own, and a second one must not kill a worker that is draining."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                       signal.SIGUSR1) as sigs:
            async for signum in sigs:
                if signum == signal.SIGHUP:
                    self.reload()
                elif signum == signal.SIGUSR1:
                    self.reopen_logs()
                elif not self.registry.draining:
                    log.info("worker %d: shutting down", self.index)
                    self.accepting.cancel()
                    self.registry.drain()
                    self.http_registry.drain()
                    self.admin_registry.drain()
                    sessions.cancel_scope.deadline = (
                        trio.current_time() + self.config.server.shutdown_timeout
                    )

    def reopen_logs(self) -> None:
        """SIGUSR1: every log file of this worker opened afresh (after logrotate)."""
        for log_file in self.logs:
            try:
                log_file.reopen()
            except OSError as e:
                log.error("worker %d: cannot reopen %s, still writing the old file: %s",
                          self.index, log_file.path, e)
        log.info("worker %d: log files reopened", self.index)

    def _context(self, config: Config, ssl_context: ssl.SSLContext | None) -> InboundContext:
        """The sessions' view of this worker for ``config``: its intake stages included."""
        hostname = config.server.resolved_hostname()
        stages = default_stages(config, hostname, self.config_path or "config",
                                self.suppressions)
        intake = Intake(stages, self.writer, self.events)
        return InboundContext.build(config, intake=intake, new_queue_id=new_queue_id,
                                    ssl_context=ssl_context, suppressions=self.suppressions,
                                    bounces=self._bounces(config))

    def _bounces(self, config: Config) -> BounceMailbox | None:
        """What the listener does with mail for ``[bounces] domain`` (None: not set)."""
        if not config.bounces.domain:
            return None
        try:
            classifier = load_classifier(config.bounces.rules)
        except RulesError:  # changed since the config was checked (the engine logs it)
            classifier = load_classifier("")
        return BounceMailbox(config.bounces, events=self.events, classifier=classifier,
                             feed=self.feed)

    def _http_app(self, config: Config, ctx: InboundContext) -> HttpApi:
        """The HTTP endpoints for ``config``, admitting through ``ctx``'s intake."""
        return HttpApi(config, intake=ctx.intake, spool=self.spool,
                       suppressions=self.suppressions, events=self.events,
                       new_queue_id=new_queue_id, nworkers=self.nworkers,
                       draining=lambda: self.registry.draining,
                       ssl_context=ctx.ssl_context)

    def _prepare_dsn(self, dsn: NewMessage) -> NewMessage:
        """A DSN of ours through the current intake's stages (it is stored with the
        outcome that caused it, in one transaction)."""
        return self.ctx.intake.prepare(Admission(envelope=dsn.envelope, data=dsn.data,
                                                 via="dsn"))

    def reload(self) -> None:
        if not self.config_path:
            return
        new = reload_config(self.config_path, log)
        if new is None:
            return
        try:
            ssl_context = server_ssl_context(new.inbound, self.config_path)
        except ConfigError as e:
            log.error("reload failed, keeping the running config: %s", e)
            return
        if (new.inbound.listen != self.config.inbound.listen or new.spool != self.config.spool
                or new.http.listen != self.config.http.listen
                or new.admin.listen != self.config.admin.listen):
            log.warning("reload: inbound.listen, http.listen, admin.listen and [spool] "
                        "changes need a restart")
        if new.log != self.config.log:
            log.warning("reload: [log] changes need a restart")
        if new.cluster != self.config.cluster:
            log.warning("reload: [cluster] changes need a restart")
        try:
            ctx = self._context(new, ssl_context)
            http_app = self._http_app(new, ctx)
        except ConfigError as e:
            log.error("reload failed, keeping the running config: %s", e)
            return
        self.ctx, self.http_app = ctx, http_app
        self.admin_app = AdminApp(new.admin, self.admin_app.metrics, self.admin_app.directory,
                                  self.index, self.nworkers)
        self.engine.apply_config(new)
        self.feed.policy = _suppress_policy(new)
        if self.webhooks is not None:
            self.webhooks.apply_config(new)
        self.config = new
        log.info("worker %d: configuration reloaded", self.index)


def _suppress_policy(config: Config) -> SuppressPolicy | None:
    """The policy the feed applies (checked with the config), None when it is off."""
    bounces = config.bounces
    return parse_policy(bounces.suppress) if bounces.auto_suppress else None


#: How often the worker of index 0 deletes idempotency records past their 24 hours.
IDEMPOTENCY_PURGE_INTERVAL = 3600.0


async def _purge_idempotency(spool: Spool) -> None:
    while True:
        try:
            before = time.time() - IDEMPOTENCY_TTL
            while await trio.to_thread.run_sync(spool.purge_idempotency, before) == 10000:
                pass
        except Exception:
            log.exception("purging idempotency records failed; trying again later")
        await trio.sleep(IDEMPOTENCY_PURGE_INTERVAL)


def run_worker(config: Config, config_path: str | None, index: int, nworkers: int) -> None:
    """Entry point in the forked child: returns when the worker has shut down."""
    trio.run(Worker(config, config_path, index, nworkers).main)
