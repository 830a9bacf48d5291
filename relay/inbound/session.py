"""One inbound SMTP session: the trio driver around the sans-I/O ``ServerConnection``.

The core decides every reply; this module only moves bytes and answers the core's
decision events (relay policy, AUTH, durable storage, STARTTLS). Replies queued while
processing one read are written with one ``send_all`` when the input is exhausted, which
is exactly the RFC 2920 rule (a pipelined group's replies leave together, and nothing is
held back once the client is waiting).

Timeouts are per state (RFC 5321 4.5.3.2): ``command_timeout`` for a whole command line
from its first byte (or for a client to take our reply), ``data_timeout`` while waiting
for DATA/BDAT bytes, and a minimum transfer rate inside DATA/BDAT so a client cannot
hold a session by trickling one byte at a time.

They are enforced by one watchdog per worker (``SessionRegistry.watch``), not by a cancel
scope per read: a session only writes down when its current wait must end, and the
watchdog, ticking a few times per the shortest timeout (at most once a second), cancels
the waits that are overdue. A deadline-carrying cancel scope per read cost more than the
read itself, and a session does several reads per message. A timeout may therefore fire
up to one tick late, which RFC 5321's "at least" timeouts allow.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import trio

from relay.config import Config, InboundConfig
from relay.inbound.auth import Authenticator
from relay.inbound.bounces import BounceMailbox
from relay.intake import Admission, Intake, Refused
from relay.intake.suppress import SuppressionLookup
from relay.model import Envelope, Recipient, ip_address
from relay.smtp import (
    NEED_DATA,
    AuthRequested,
    ConnectionClosing,
    HeloReceived,
    MessageReceived,
    Phase,
    RecipientRequested,
    Reply,
    ServerConnection,
    ServerSettings,
    StartTLSRequested,
)
from relay.smtp.replies import internal_error
from relay.wire import Wire

__all__ = ["InboundContext", "SessionRegistry", "serve_session", "server_settings"]

log = logging.getLogger("relay.inbound")

#: Bytes per receive. 64 KiB, like trio's own default: CPython allocates the full size
#: for every ``recv`` and shrinks it afterwards, and above glibc's mmap threshold
#: (128 KiB) that is an mmap/mremap/munmap per read. The kernel rarely hands out more
#: than this from one read of a loopback or LAN socket anyway.
RECV_SIZE = 64 * 1024
TLS_HANDSHAKE_TIMEOUT = 30.0
#: How long the farewell 421 of a stopped session (timeout, too slow, shutdown) may take.
FAREWELL_TIMEOUT = 5.0
#: Watchdog tick: a fifth of the shortest timeout, within these bounds.
WATCH_TICK_MIN, WATCH_TICK_MAX = 0.05, 1.0

RELAY_DENIED = "Relay access denied"
SUPPRESSED = "Recipient address is on the suppression list"
NOT_A_BOUNCE_ADDRESS = "Recipient address rejected: not a valid bounce address"
#: Client addresses whose relay verdict a context remembers (InboundContext.may_relay).
RELAY_VERDICTS_MAX = 4096
STORE_FAILED = Reply(451, "4.3.0", "Error: queue file write error, try again later")


@dataclass
class InboundContext:
    """Everything a session needs from its worker; rebuilt on config reload so new
    sessions see new settings while running ones finish with the old."""

    config: Config
    settings: ServerSettings
    #: The one way into the spool (stages, group commit, Reception).
    intake: Intake
    new_queue_id: Callable[[], str]
    authenticator: Authenticator
    ssl_context: ssl.SSLContext | None
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
    hostname: str
    #: Seconds between two watchdog passes over the sessions (see the module docstring).
    watch_tick: float = WATCH_TICK_MAX
    #: The suppression list checked at RCPT (``[suppression] smtp = "refuse"``), or None.
    suppressions: SuppressionLookup | None = None
    #: AUTH users' tenants (``inbound.auth_users[].tenant``).
    tenants: dict[str, str] = field(default_factory=dict)
    #: Mail for the bounce domain (``[bounces] domain``; relay.inbound.bounces), or None.
    bounces: BounceMailbox | None = None
    #: may_relay's answers by client address: a bulk relay hears from a few sending
    #: hosts all day, and parsing the address and matching the networks cost as much
    #: as the rest of a RCPT. Emptied when full; a reload builds a new context.
    _relay_verdicts: dict[str, bool] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        config: Config,
        *,
        intake: Intake,
        new_queue_id: Callable[[], str],
        ssl_context: ssl.SSLContext | None,
        suppressions: SuppressionLookup | None = None,
        bounces: BounceMailbox | None = None,
    ) -> InboundContext:
        hostname = config.server.resolved_hostname()
        settings = server_settings(
            config.inbound, hostname=hostname, tls_available=ssl_context is not None
        )
        return cls(
            config=config,
            settings=settings,
            intake=intake,
            new_queue_id=new_queue_id,
            authenticator=Authenticator(config.inbound.auth_users),
            ssl_context=ssl_context,
            networks=config.relay.networks(),
            hostname=hostname,
            watch_tick=_watch_tick(config),
            suppressions=suppressions if config.suppression.smtp == "refuse" else None,
            tenants={u.username: u.tenant for u in config.inbound.auth_users if u.tenant},
            bounces=bounces,
        )

    def may_relay(self, client_ip: str) -> bool:
        """Whether ``client_ip`` is in ``relay.allow_networks``."""
        verdict = self._relay_verdicts.get(client_ip)
        if verdict is None:
            verdict = self._match_networks(client_ip)
            if len(self._relay_verdicts) >= RELAY_VERDICTS_MAX:
                self._relay_verdicts.clear()
            self._relay_verdicts[client_ip] = verdict
        return verdict

    def _match_networks(self, client_ip: str) -> bool:
        ip = ip_address(client_ip)
        return ip is not None and any(ip in net for net in self.networks)


def server_settings(config: InboundConfig, *, hostname: str,
                    tls_available: bool) -> ServerSettings:
    """The protocol core's settings from the ``[inbound]`` config section. AUTH is enabled
    when accounts are configured; ``tls_available`` is for the caller to say (cert and
    key loaded)."""
    return ServerSettings(
        hostname=hostname,
        max_message_size=config.max_message_bytes(),
        max_recipients=config.max_recipients,
        max_line_length=config.max_line_length,
        max_errors=config.max_errors,
        tls_available=tls_available,
        allow_plaintext_auth=config.allow_plaintext_auth,
        auth_enabled=bool(config.auth_users),
        bare_newline=config.bare_newline,
    )


def _watch_tick(config: Config) -> float:
    inbound = config.inbound
    shortest = min(inbound.command_timeout, inbound.data_timeout,
                   inbound.data_rate_window if inbound.min_data_rate else math.inf)
    return min(max(shortest / 5, WATCH_TICK_MIN), WATCH_TICK_MAX)


@dataclass
class SessionRegistry:
    """Open sessions of a worker, so shutdown can drain them and limits can be enforced."""

    sessions: set[_Session] = field(default_factory=set)
    per_client: dict[str, int] = field(default_factory=dict)
    draining: bool = False

    def drain(self) -> None:
        """Stop every session at its next command boundary (idle ones at once)."""
        self.draining = True
        for session in list(self.sessions):
            session.drain()

    async def watch(self, ctx_ref: Callable[[], InboundContext]) -> None:
        """The worker's session watchdog: ends the waits that are past their deadline or
        too slow (module docstring). Runs until cancelled."""
        while True:
            await trio.sleep(ctx_ref().watch_tick)
            now = trio.current_time()
            for session in list(self.sessions):
                session.check(now)


_Stop = Literal["timeout", "slow", "drain", "error"]
#: How a client leaving shows up in I/O: not a fault of ours, ended quietly.
_CLIENT_GONE = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class _Stopped(Exception):
    """A wait returned normally just as the watchdog stopped it: stop anyway, before the
    session does anything more (the scope's pending cancel must not land elsewhere,
    e.g. in the middle of storing a message)."""


class _Session:
    def __init__(self, wire: Wire, ctx: InboundContext, peer: tuple[str, int]):
        self.wire = wire
        self.ctx = ctx
        self.client_ip, self.client_port = peer[0], peer[1]
        self.conn = ServerConnection(ctx.settings, tls_active=False)
        self.tls_info: str | None = None
        self.draining = False
        #: What the session is blocked on, and until when (trio time), for the watchdog.
        self.waiting: Literal["recv", "send"] | None = None
        self.wait_until = math.inf
        #: When the command line being received must be complete (trio time).
        self.command_deadline = math.inf
        #: The current min_data_rate window inside DATA/BDAT (None outside).
        self.window_start: float | None = None
        self.window_bytes = 0
        #: Cancelled by the watchdog (or a drain) to end a wait; ``stopped`` says why.
        self.scope = trio.CancelScope()
        self.stopped: _Stop | None = None

    def drain(self) -> None:
        self.draining = True
        if self.waiting == "recv" and not self.conn.in_transaction:
            self._stop("drain")

    def check(self, now: float) -> None:
        """The watchdog's look at a session blocked in I/O (module docstring)."""
        if self.waiting is None or self.stopped is not None:
            return  # running, storing or authenticating: not a client wait
        if now >= self.wait_until:
            self._stop("timeout")
        elif self.window_start is not None:
            inbound = self.ctx.config.inbound
            if now - self.window_start >= inbound.data_rate_window:
                if self.window_bytes < inbound.min_data_rate * inbound.data_rate_window:
                    log.info("client %s too slow in DATA: %d bytes in %.0fs",
                             self.client_ip, self.window_bytes, now - self.window_start)
                    self._stop("slow")
                else:
                    self.window_start, self.window_bytes = now, 0

    def _stop(self, why: _Stop) -> None:
        self.stopped = why
        self.scope.cancel()

    # -- the loop ---------------------------------------------------------------------

    async def run(self, pregreet: bytes) -> None:
        conn = self.conn
        if pregreet:
            conn.receive_data(pregreet)
        conn.start()
        try:
            with self.scope:
                await self._converse()
                return
        except _Stopped:
            pass
        except _CLIENT_GONE:
            raise
        except Exception:
            # A bug met by this session's input: this session ends, the worker and every
            # other session go on. A message already committed stays queued (the client
            # may send it again: a duplicate, never a loss).
            log.exception("session with %s [%s] failed; closing it with 421 4.3.0",
                          self.client_ip, self.conn.helo or "no HELO")
            self.stopped = "error"
        # The watchdog (or a fault) ended the conversation: the core queues its 421,
        # which gets a bounded try.
        if self.stopped == "timeout":
            conn.timeout_expired()
        elif self.stopped == "slow":
            conn.data_rate_too_low()
        elif self.stopped == "error":
            conn.abort(internal_error(self.ctx.hostname), "internal error")
        else:
            conn.shutdown()
        out = conn.data_to_send()
        if out:  # not _flush: the watchdog is done with this session
            with trio.move_on_after(FAREWELL_TIMEOUT):
                await self.wire.send(out)

    async def _converse(self) -> None:
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                await self._flush()
                if self.draining and not conn.in_transaction:
                    conn.shutdown()
                    continue
                conn.receive_data(await self._receive())
            elif isinstance(event, RecipientRequested):
                self._decide_recipient(event)
            elif isinstance(event, MessageReceived):
                await self._store(event)
            elif isinstance(event, AuthRequested):
                await self._authenticate(event)
            elif isinstance(event, StartTLSRequested):
                if not await self._start_tls():
                    return
            elif isinstance(event, ConnectionClosing):
                await self._flush()
                return
            elif isinstance(event, HeloReceived):
                pass

    async def _flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.wait_until = trio.current_time() + self.ctx.config.inbound.command_timeout
            self.waiting = "send"
            try:
                await self.wire.send(out)
            finally:
                self.waiting = None
            if self.stopped is not None:
                raise _Stopped

    async def _receive(self) -> bytes:
        """Next bytes from the client (b"" is EOF). The wait's deadline depends on the
        phase; inside DATA/BDAT the bytes also count toward the rate window."""
        inbound = self.ctx.config.inbound
        in_data = self.conn.phase in (Phase.DATA, Phase.BDAT)
        now = trio.current_time()
        if in_data:
            self.wait_until = now + inbound.data_timeout
            if self.window_start is None and inbound.min_data_rate > 0:
                self.window_start, self.window_bytes = now, 0
        else:
            # The whole command line within command_timeout, not each of its bytes.
            if not self.conn.partial_command:
                self.command_deadline = now + inbound.command_timeout
            self.wait_until = self.command_deadline
            self.window_start = None
        self.waiting = "recv"
        try:
            # Inside DATA the rest of the body is probably queued already: read first.
            data = await self.wire.recv(RECV_SIZE, try_first=in_data)
        finally:
            self.waiting = None
        if self.stopped is not None:
            raise _Stopped
        self.window_bytes += len(data)
        return data

    # -- decisions --------------------------------------------------------------------

    def _decide_recipient(self, event: RecipientRequested) -> None:
        ctx = self.ctx
        user = self.conn.authenticated_user
        if ctx.bounces is not None and ctx.bounces.claims(event.address):
            # For us, from anybody (relay.inbound.bounces): not relaying.
            if ctx.bounces.accepts(event.address):
                self.conn.accept_recipient()
            else:
                self.conn.reject_recipient(Reply(550, "5.1.1", f"<{event.address}>: "
                                                 f"{NOT_A_BOUNCE_ADDRESS}"))
        elif user is None and not ctx.may_relay(self.client_ip):
            self.conn.reject_recipient(Reply(554, "5.7.1", f"<{event.address}>: {RELAY_DENIED}"))
        elif ctx.suppressions is not None and ctx.suppressions.blocking(
                ctx.tenants.get(user) if user else None, [event.address]):
            self.conn.reject_recipient(Reply(550, "5.7.1", f"<{event.address}>: {SUPPRESSED}"))
        else:
            self.conn.accept_recipient()

    async def _authenticate(self, event: AuthRequested) -> None:
        ok = await trio.to_thread.run_sync(
            self.ctx.authenticator.check, event.username, event.password
        )
        if ok:
            self.conn.auth_succeeded()
        else:
            log.warning("AUTH %s failed for %r from %s", event.mechanism, event.username,
                        self.client_ip)
            self.conn.auth_failed()

    async def _store(self, event: MessageReceived) -> None:
        """Admit the message through the intake; 250 only once it is committed. Its
        recipients at the bounce domain are a report, recorded instead (after the
        others are committed: relay.inbound.bounces)."""
        ctx, conn = self.ctx, self.conn
        reports, recipients = (ctx.bounces.split(event.recipients) if ctx.bounces is not None
                               else ([], event.recipients))
        queue_id = ctx.new_queue_id()
        if recipients and not await self._admit(event, list(recipients), queue_id):
            return
        if reports and ctx.bounces is not None and not await ctx.bounces.receive(
                event.data, reports, client_ip=self.client_ip, report_id=queue_id):
            if not recipients:
                conn.message_failed(STORE_FAILED)
                return
            log.error("%s: stored, but the suppression of its report could not be "
                      "committed", queue_id)
        conn.message_stored(queue_id)

    async def _admit(self, event: MessageReceived, recipients: list[Recipient],
                     queue_id: str) -> bool:
        """The intake's part of ``_store``: False when the message was refused or could
        not be stored (its reply is queued)."""
        ctx, conn = self.ctx, self.conn
        protocol = "ESMTP" if conn.esmtp else "SMTP"
        if conn.esmtp:
            protocol += ("S" if self.tls_info else "") + ("A" if conn.authenticated_user else "")
        envelope = Envelope(
            queue_id=queue_id, sender=event.sender,
            recipients=recipients, received_at=time.time(), body=event.body,
            smtputf8=event.smtputf8, declared_size=event.declared_size, ret=event.ret,
            envid=event.envid, client_ip=self.client_ip, client_port=self.client_port,
            client_helo=conn.helo or "", auth_user=conn.authenticated_user, tls=self.tls_info,
            protocol=protocol, tenant=ctx.tenants.get(conn.authenticated_user or ""),
        )
        admission = Admission(envelope=envelope, data=event.data, via="smtp",
                              helo=conn.helo or "")
        try:
            await ctx.intake.admit(admission)
        except Refused as e:
            conn.message_failed(e.reply)
            return False
        except Exception:
            log.exception("spool commit failed for %s from %s", envelope.queue_id,
                          self.client_ip)
            conn.message_failed(STORE_FAILED)
            return False
        return True

    async def _start_tls(self) -> bool:
        """Handshake after the core's 220; False when the handshake failed (session over)."""
        assert self.ctx.ssl_context is not None
        await self._flush()
        tls_stream = trio.SSLStream(self.wire.transport(), self.ctx.ssl_context,
                                    server_side=True)
        try:
            with trio.fail_after(TLS_HANDSHAKE_TIMEOUT):
                await tls_stream.do_handshake()
        except (trio.BrokenResourceError, trio.TooSlowError, ssl.SSLError) as e:
            log.info("TLS handshake with %s failed: %s", self.client_ip, e)
            return False
        self.wire.upgrade(tls_stream)
        ssl_object = tls_stream._ssl_object
        cipher = ssl_object.cipher()
        self.tls_info = f"{ssl_object.version()} with cipher {cipher[0] if cipher else '?'}"
        self.conn.tls_established()
        return True


def _peek_pregreet(sock: socket.socket) -> bytes:
    """Bytes the client sent before our greeting (without consuming them): a client that
    talks first is not speaking SMTP (or is a spam bot), RFC 5321 3.1."""
    try:
        return sock.recv(512, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError, ConnectionError):
        return b""


async def serve_session(
    sock: socket.socket, peer: tuple[str, int], ctx_ref: Callable[[], InboundContext],
    registry: SessionRegistry,
) -> None:
    """Handle one accepted connection (a non-blocking socket) to the end; never raises
    for client misbehaviour."""
    ctx = ctx_ref()
    session = _Session(Wire(sock, fresh=True), ctx, peer)
    ip = session.client_ip
    inbound = ctx.config.inbound
    try:
        if registry.draining:
            return
        if (
            len(registry.sessions) >= inbound.max_sessions
            or registry.per_client.get(ip, 0) >= inbound.max_sessions_per_client
        ):
            await session.wire.send(
                f"421 4.7.0 {ctx.hostname} Error: too many connections\r\n".encode()
            )
            return
        registry.sessions.add(session)
        registry.per_client[ip] = registry.per_client.get(ip, 0) + 1
        try:
            if inbound.greet_pause:
                await trio.sleep(inbound.greet_pause)
            await session.run(_peek_pregreet(sock))
        finally:
            registry.sessions.discard(session)
            left = registry.per_client.pop(ip, 1) - 1
            if left:
                registry.per_client[ip] = left
    except _CLIENT_GONE as e:
        log.debug("session with %s ended: %s", ip, e)
    finally:
        await session.wire.aclose()
