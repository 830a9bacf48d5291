"""Trio driver for one outgoing SMTP connection to one MX IP address.

This is the thin I/O shell around ``relay.smtp.client.SmtpClient``: it connects, feeds
the state machine what it reads, writes what it returns, and bounds every wait with the
policy's timeouts. The delivery engine owns sessions (pooling, per-connection delivery
caps, which MX to try); this module owns one conversation.

Contract for the engine:

* ``open_session`` returns a READY session (greeting, EHLO/HELO, STARTTLS per policy
  done) or raises ``SessionError`` -- never anything else for remote trouble.
* ``ClientSession.deliver`` runs ONE transaction and returns one ``RecipientOutcome`` per
  requested recipient, in the order given. It never raises for remote failures: a lost
  connection or a timeout makes every in-flight recipient transient (``421 4.4.2``)
  and ``usable`` False. Only cancellation and programming errors propagate.
* ``aclose`` sends QUIT (bounded wait for the 221) and closes; it is idempotent.
* For bulk sending, transactions may overlap (RFC 2920 3.1, ``SmtpClient``): ``begin``
  one, ``progress(until_behind=True)`` until its body is out and ``can_begin`` says the
  next may ride behind its end of data, ``begin`` that one, and take each finished
  transaction's outcomes (``transaction_done``/``take_outcomes``) in begin order. The
  bytes owed at that moment (the body) wait in the session and go out in ONE write with
  the next transaction's commands; ``flush`` writes them if nothing else is begun.

Postfix-like choices (documented because they are policy):

* ``tls="opportunistic"``: STARTTLS when offered, certificates not verified (Postfix
  ``smtp_tls_security_level = may``). A refused STARTTLS continues in plaintext; a failed
  handshake reconnects once and delivers in plaintext (Postfix does the same retry).
* ``tls="required"``: STARTTLS missing or refused, or a failed handshake -> transient
  ``SessionError`` (4.7.4 / 4.7.5): Postfix defers, it does not bounce. The certificate
  is not verified (Postfix ``encrypt``: protection from passive eavesdropping only),
  unless ``verify_certificates=True``.
* ``tls="verify"`` (Postfix ``verify``): as "required", and the chain must verify
  against the system CAs, or only against ``ca_file`` when one is set (Postfix's
  ``smtp_tls_CAfile`` without ``tls_append_default_CA``), for the host name the mail
  was routed to -- the MX host name, or the route's / smart host's name as configured
  -- never a name derived from the IP. A failure is ``4.7.5 certificate verify failed:
  <why>``, transient: the engine tries the next hop and defers. A given
  ``ssl_context`` replaces all of this: its own settings decide.
* AUTH (``open_session(..., auth=Credentials)``, for a smart host or route that needs
  it): TLS becomes at least "required" for that connection, so credentials never
  cross a plaintext connection (STARTTLS not offered -> 4.7.4 with the reason; the
  client refuses too). AUTH right after the EHLO that follows STARTTLS; a refusal
  (535 ...), no AUTH offered or no mechanism in common -> transient ``SessionError``
  4.7.x with the server's reply (Postfix ``smtp_sasl_auth_soft_bounce = yes``: a
  wrong password is the operator's to fix, the mail waits).
* A 5xx greeting is reported with ``permanent=False`` (Postfix ``smtp_skip_5xx_greeting
  = yes``: try the next MX, defer when none is left); a 5xx to both EHLO and HELO is
  permanent ("refused to talk to me").
* RSET after a failed transaction is sent lazily, pipelined in front of the next
  transaction's MAIL (see ``SmtpClient``), which saves a round trip on bulk sends.
* ``deliveries`` counts transactions that were sent (MAIL issued), for the engine's
  deliveries-per-connection cap.
"""

from __future__ import annotations

import errno
import math
import os
import socket
import ssl
import time
from typing import Literal

import msgspec
import trio

from relay.model import Envelope
from relay.smtp.client import (
    LOOP_STATUS,
    Credentials,
    Phase,
    RecipientOutcome,
    SmtpClient,
    reply_line,
    reply_text,
)
from relay.smtp.replies import Reply
from relay.wire import Wire, tune_socket

__all__ = [
    "BindError",
    "ClientSession",
    "RecipientOutcome",
    "SessionError",
    "SessionPolicy",
    "open_session",
]

#: Read size per receive; replies are small, one read normally holds a pipelined group's.
_RECEIVE_SIZE = 65536
#: QUIT waits at most this long for the 221 (bounded further by command_timeout).
_QUIT_WAIT = 5.0


class SessionPolicy(msgspec.Struct, kw_only=True):
    """How to talk to one destination (built by the engine from the effective Throttle)."""

    helo_name: str
    tls: Literal["off", "opportunistic", "required", "verify"]
    connect_timeout: float
    command_timeout: float
    data_timeout: float
    source_address: str = ""
    #: None -> a cached default client context (verifying with tls="verify" or
    #: verify_certificates).
    ssl_context: ssl.SSLContext | None = None
    #: With tls="required" and no ssl_context: verify the chain and the MX host name.
    verify_certificates: bool = False
    #: PEM file of the CAs that verification trusts instead of the system's ("" = the
    #: system's); ``outbound.tls_ca_file``.
    ca_file: str = ""

    @property
    def verifies(self) -> bool:
        """The default context checks the certificate chain and the host name."""
        return self.tls == "verify" or self.verify_certificates


class SessionError(Exception):
    """The session could not be opened (or used): connect failure, greeting refused,
    EHLO/HELO refused, TLS required but unavailable, a protocol error.

    ``permanent`` tells the engine whether the failure is final for the recipients
    (bounce) or worth another attempt (defer / next MX).
    """

    def __init__(self, code: int, enhanced: str | None, text: str, *,
                 permanent: bool | None = None) -> None:
        super().__init__(f"{code} {enhanced} {text}" if enhanced else f"{code} {text}")
        self.code = code
        self.enhanced = enhanced
        self.text = text
        self.permanent = (500 <= code < 600) if permanent is None else permanent

    @property
    def reply_line(self) -> str:
        return str(self)

    @property
    def kind(self) -> Literal["transient", "permanent"]:
        return "permanent" if self.permanent else "transient"


# --------------------------------------------------------------------------- TLS

_contexts: dict[tuple[bool, str, tuple[int, int]], ssl.SSLContext] = {}


def _default_context(verify: bool, ca_file: str = "") -> ssl.SSLContext:
    """One shared client context per verification mode and CA file: building one loads
    the CA store (milliseconds), far too slow per connection on a bulk sender. The CA
    file's mtime and size are part of the key, so a replaced file is read again (one
    stat per connection). Raises OSError / ssl.SSLError for an unreadable CA file."""
    ca_file = ca_file if verify else ""
    stat = os.stat(ca_file) if ca_file else None
    key = (verify, ca_file, (stat.st_mtime_ns, stat.st_size) if stat else (0, 0))
    ctx = _contexts.get(key)
    if ctx is None:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file or None)
        if not verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if len(_contexts) >= 16:  # CA files replaced over and over: keep it bounded
            _contexts.clear()
        _contexts[key] = ctx
    return ctx


def _client_context(policy: SessionPolicy, peer: str) -> ssl.SSLContext:
    """The context for a STARTTLS with ``peer``; a CA file that cannot be loaded (gone
    since the config was checked) defers the mail instead of ending the worker."""
    if policy.ssl_context is not None:
        return policy.ssl_context
    try:
        return _default_context(policy.verifies, policy.ca_file)
    except (OSError, ssl.SSLError) as e:
        reason = os.strerror(e.errno) if isinstance(e.errno, int) and e.errno else str(e)
        raise SessionError(421, "4.7.5", f"cannot verify the certificate of {peer}: "
                           f"CA file {policy.ca_file}: {reason}", permanent=False) from None


def _handshake_reason(e: BaseException) -> str:
    """Why a handshake failed; a verification failure says what did not verify
    ("certificate verify failed: Hostname mismatch, certificate is not valid for
    'mx.example.com'.")."""
    cause = e.__cause__ or e.__context__ or e
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {cause.verify_message}"
    return "timed out" if isinstance(e, trio.TooSlowError) else _reason(e)


def _tls_description(stream: trio.SSLStream[trio.abc.Stream]) -> str:
    cipher = stream.cipher()
    version = stream.version()
    return f"{version} {cipher[0]}" if cipher else str(version)


# --------------------------------------------------------------------------- session


class _Lost(Exception):
    """Internal: the connection broke or timed out; carries the local reason."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


class ClientSession:
    """One open SMTP connection in the READY state (see the module docstring)."""

    def __init__(self, wire: Wire, client: SmtpClient, *, ip: str, port: int,
                 mx_host: str, policy: SessionPolicy) -> None:
        self._wire = wire
        self._client = client
        self.ip = ip
        self.port = port
        self.mx_host = mx_host
        self.policy = policy
        #: "TLSv1.3 TLS_AES_256_GCM_SHA384" when STARTTLS succeeded, else None.
        self.tls: str | None = None
        #: Monotonic time the session last finished something (for the engine's idle cap).
        self.idle_since = time.monotonic()
        #: Seconds spent setting this connection up (DNS, connect, greeting, EHLO, TLS),
        #: set by whoever opened it; reported with its first delivery.
        self.setup_seconds = 0.0
        self._closed = False
        #: Bytes the client owes the server, held back to share a write (``begin``).
        self._unsent: list[bytes] = []
        #: trio time by which the reply being read must be complete (see ``_converse``)
        self._reply_deadline = math.inf

    # -- what the engine may look at

    @property
    def deliveries(self) -> int:
        """Transactions sent on this connection (for max_deliveries_per_connection)."""
        return self._client.transactions

    @property
    def usable(self) -> bool:
        """False after 421, a lost connection, a timeout, a protocol error, or aclose."""
        return not self._closed and self._client.usable

    @property
    def can_begin(self) -> bool:
        """``begin`` may be called now: READY with nothing in flight, or the current
        transaction waits only for its end-of-data reply and the server pipelines."""
        return not self._closed and (self._client.usable or self._client.can_begin_behind)

    @property
    def transaction_done(self) -> bool:
        """A begun transaction has finished; ``take_outcomes`` returns its outcomes."""
        return self._client.transaction_done

    @property
    def extensions(self) -> dict[str, str]:
        """The server's EHLO keywords (upper-case) -> parameters."""
        return self._client.extensions

    @property
    def dsn(self) -> bool:
        """The server offers DSN (else NOTIFY=SUCCESS owes a "relayed" notice locally)."""
        return "DSN" in self._client.extensions

    @property
    def peer(self) -> str:
        return f"{self.mx_host}[{self.ip}]:{self.port}"

    @property
    def last_error(self) -> Reply | None:
        """Why the session stopped being usable (a 421, a local reason), if it did."""
        return self._client.error

    def __repr__(self) -> str:
        return f"<ClientSession {self.peer} tls={self.tls!r} deliveries={self.deliveries}>"

    # -- I/O helpers

    def _timed_out(self) -> _Lost:
        return _Lost(f"conversation with {self.mx_host}[{self.ip}] timed out while "
                     f"{self._client.activity}")

    def _broken(self, e: BaseException | None) -> _Lost:
        why = f": {_reason(e)}" if e is not None else ""
        return _Lost(f"lost connection with {self.mx_host}[{self.ip}] while "
                     f"{self._client.activity}{why}")

    async def _converse(self, out: bytes = b"", *, until_behind: bool = False,
                        send_only: bool = False) -> None:
        """Write what is owed (held bytes, then ``out``), then read, writing whatever the
        client asks to send (the body after 354, commands without PIPELINING), until a
        begun transaction has finished or no reply is owed. With ``until_behind`` it
        also stops as soon as the client can begin a transaction behind the current
        one; the bytes owed at that moment stay held for the next write. ``send_only``
        writes what is owed and returns without reading. A broken or
        timed-out connection closes the client (every open recipient transient).

        Every send and every reply has its own timeout (``data_timeout`` for the body
        and its reply, ``command_timeout`` otherwise), handed to the Wire as a deadline
        (``relay.wire``: a cancel scope only around a wait that really happens, not on
        each of a message's round trips). A whole reply must arrive within it: while part
        of a reply is in (``reply_in_progress``) its deadline stays where it was, so a
        server that trickles its greeting or a reply byte by byte is cut off at the
        timeout.
        """
        client = self._client
        command_timeout = self.policy.command_timeout
        data_timeout = self.policy.data_timeout
        wire = self._wire
        if self._unsent:
            self._unsent.append(out)
            out = b"".join(self._unsent)
            self._unsent.clear()
        try:
            while True:
                if until_behind and client.can_begin_behind:
                    if out:
                        self._unsent.append(out)
                    return
                if out:
                    # The body is the only large write: data timeout.
                    timeout = (data_timeout if len(out) > 4096 or client.awaiting_end_of_data
                               else command_timeout)
                    await wire.send(out, deadline=trio.current_time() + timeout)
                if send_only or client.transaction_done or not client.awaiting_reply:
                    return
                if not client.reply_in_progress:
                    self._reply_deadline = trio.current_time() + (
                        data_timeout if client.awaiting_end_of_data else command_timeout)
                data = await wire.recv(_RECEIVE_SIZE, deadline=self._reply_deadline)
                if not data:
                    raise self._broken(None)
                out = client.receive_data(data)
        except trio.TooSlowError:
            await self._lose(self._timed_out().text)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            await self._lose(self._broken(e).text)
        except _Lost as e:
            await self._lose(e.text)

    async def _lose(self, why: str) -> None:
        """The conversation is over: every open recipient gets ``421 4.4.2 why``
        (transient), and the connection is dropped."""
        self._unsent.clear()
        self._client.connection_lost(421, "4.4.2", why)
        await self._abort()

    async def _abort(self) -> None:
        self._closed = True
        await self._wire.aclose(graceful=False)

    # -- the engine's API

    async def deliver(self, envelope: Envelope, recipients: list[int],
                      data: bytes) -> list[RecipientOutcome]:
        """ONE transaction for ``recipients`` (indexes into ``envelope.recipients``), with
        nothing else in flight.

        Per-recipient outcomes come from the RCPT replies; recipients accepted at RCPT
        get the end-of-data reply; a MAIL or DATA failure applies to all; a lost
        connection or a timeout makes every unsettled recipient transient and the
        session unusable. ``data`` is the message as spooled (CRLF, not dot-stuffed).
        """
        if not self.usable:
            why = reply_line(self._client.error) if self._client.error else "session closed"
            return [RecipientOutcome(i, 421, "4.4.2", f"session not usable: {why}")
                    for i in recipients]
        self.begin(envelope, recipients, data)
        while not self.transaction_done:
            await self.progress()
        return self.take_outcomes()

    def begin(self, envelope: Envelope, recipients: list[int], data: bytes, *,
              sender: str | None = None) -> None:
        """Begin a transaction (only while ``can_begin``); its commands are written by
        the next ``progress`` or ``flush``. If the message cannot be offered to this
        server at all (SIZE, 8BITMIME, SMTPUTF8), it is finished at once. ``sender``
        replaces the envelope's in MAIL FROM (a VERP return path); the envelope itself
        is not changed (our own DSNs still go to its sender)."""
        if sender is not None:
            envelope = msgspec.structs.replace(envelope, sender=sender)
        out = self._client.begin_transaction(envelope, recipients, data)
        if out:
            self._unsent.append(out)

    async def progress(self, *, until_behind: bool = False, send_only: bool = False) -> None:
        """Write what is owed and read until a begun transaction has finished (or, with
        ``until_behind``, until ``can_begin`` allows one behind the current one; with
        ``send_only``, not at all). Never raises for remote failures (see ``deliver``)."""
        client = self._client
        try:
            await self._converse(until_behind=until_behind, send_only=send_only)
        except BaseException:
            # Cancelled (or a bug) mid-conversation: the protocol state is unknown.
            if client.awaiting_reply:
                await self._lose("delivery cancelled")
            raise
        if client.phase in (Phase.CLOSED, Phase.FAILED) and not self._closed:
            await self._abort()  # 421 or protocol error: the server is (or should be) gone

    async def flush(self) -> None:
        """Write the bytes held back for the next write, if any (without reading). They
        nearly always fit in the socket buffer: then no timeout needs arming."""
        if not self._unsent or self._closed:
            return
        out = b"".join(self._unsent)
        self._unsent.clear()
        try:
            sent = self._wire.try_send(out)
        except OSError as e:
            await self._lose(self._broken(e).text)
            return
        if sent < len(out):
            self._unsent.append(out[sent:])
            await self.progress(send_only=True)

    def take_outcomes(self) -> list[RecipientOutcome]:
        """The outcomes of the oldest finished transaction (see ``transaction_done``)."""
        self.idle_since = time.monotonic()
        return self._client.take_outcomes()

    async def aclose(self) -> None:
        """QUIT (waiting at most a few seconds for the 221), then close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        client = self._client
        try:
            out = client.quit()
            if out:
                with trio.move_on_after(min(self.policy.command_timeout, _QUIT_WAIT)):
                    try:
                        await self._wire.send(out)
                        while client.awaiting_reply:
                            data = await self._wire.recv(_RECEIVE_SIZE)
                            if not data:
                                break
                            client.receive_data(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        pass
        finally:
            await self._wire.aclose()

    async def __aenter__(self) -> ClientSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _reason(e: BaseException) -> str:
    cause = e.__cause__ or e.__context__ or e
    if isinstance(cause, OSError) and cause.errno:
        return os.strerror(cause.errno)
    return str(cause) or type(cause).__name__


# --------------------------------------------------------------------------- open


async def open_session(ip: str, port: int, mx_host: str, policy: SessionPolicy, *,
                       auth: Credentials | None = None) -> ClientSession:
    """Connect to ``ip:port`` (the MX ``mx_host``), read the greeting, EHLO (HELO
    fallback), STARTTLS per ``policy.tls`` (EHLO again after it), then AUTH with
    ``auth`` when given (which makes TLS required, see the module docstring). Raises
    SessionError."""
    if auth is not None and policy.tls in ("off", "opportunistic"):
        policy = msgspec.structs.replace(policy, tls="required")
    try:
        return await _open(ip, port, mx_host, policy, allow_tls=True, auth=auth)
    except _TlsHandshakeFailed as e:
        if policy.tls != "opportunistic":
            raise SessionError(421, "4.7.5", e.text, permanent=False) from None
        # Opportunistic: like Postfix, try once more without TLS.
        return await _open(ip, port, mx_host, policy, allow_tls=False, auth=None)


class BindError(SessionError):
    """The source address could not be bound (not configured on this host, or taken):
    a fault of this egress source, not of the destination."""


class _TlsHandshakeFailed(Exception):
    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


async def _connect(ip: str, port: int, mx_host: str, policy: SessionPolicy) -> Wire:
    where = f"{mx_host}[{ip}]:{port}"
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        tune_socket(sock)
        if policy.source_address:
            try:
                sock.bind((policy.source_address, 0))
            except OSError as e:
                raise BindError(421, "4.4.1", f"cannot send from {policy.source_address}: "
                                f"{os.strerror(e.errno) if e.errno else e}",
                                permanent=False) from None
        with trio.fail_after(policy.connect_timeout):
            err = sock.connect_ex((ip, port))
            if err in (errno.EINPROGRESS, errno.EAGAIN):
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BindError:
        sock.close()
        raise
    except trio.TooSlowError:
        sock.close()
        raise SessionError(421, "4.4.1", f"connect to {where}: Connection timed out",
                           permanent=False) from None
    except OSError as e:
        sock.close()
        text = "Connection timed out" if e.errno == errno.ETIMEDOUT else (
            os.strerror(e.errno) if e.errno else str(e))
        raise SessionError(421, "4.4.1", f"connect to {where}: {text}",
                           permanent=False) from None
    except BaseException:
        sock.close()
        raise
    return Wire(sock)


async def _open(ip: str, port: int, mx_host: str, policy: SessionPolicy, *,
                allow_tls: bool, auth: Credentials | None) -> ClientSession:
    wire = await _connect(ip, port, mx_host, policy)
    client = SmtpClient(policy.helo_name)
    session = ClientSession(wire, client, ip=ip, port=port, mx_host=mx_host, policy=policy)
    ok = False
    try:
        await session._converse(b"")  # greeting, then EHLO (and HELO) inside the pump
        _check_ready(session, client, "the initial greeting or EHLO/HELO")
        if policy.tls != "off" and allow_tls:
            await _start_tls(session, client, wire, policy, auth)
        if auth is not None:
            await _authenticate(session, client, auth)
        ok = True
        session.idle_since = time.monotonic()
        return session
    finally:
        if not ok:
            await session.aclose()


async def _start_tls(session: ClientSession, client: SmtpClient, wire: Wire,
                     policy: SessionPolicy, auth: Credentials | None) -> None:
    """STARTTLS, the handshake and the EHLO after it; without TLS on offer (or refused)
    a SessionError unless ``policy.tls`` is "opportunistic"."""
    must = policy.tls != "opportunistic"
    why = " (credentials are configured for it: no AUTH without TLS)" if auth else ""
    if "STARTTLS" not in client.extensions:
        if must:
            raise SessionError(
                421, "4.7.4", f"TLS is required, but was not offered by host "
                f"{session.peer}{why}", permanent=False)
        return
    await session._converse(client.starttls())
    if client.phase is not Phase.TLS:
        _check_ready(session, client, "STARTTLS")
        if must:
            refused = client.starttls_refused
            raise SessionError(
                421, "4.7.4", f"TLS is required, but host {session.peer} refused to start "
                f"TLS: {reply_line(refused) if refused else ''}".rstrip() + why,
                permanent=False)
        return
    ctx = _client_context(policy, session.peer)
    tls_stream = trio.SSLStream(wire.transport(), ctx, server_hostname=session.mx_host)
    try:
        with trio.fail_after(policy.command_timeout):
            await tls_stream.do_handshake()
    except (trio.TooSlowError, trio.BrokenResourceError, OSError) as e:
        await wire.aclose(graceful=False)
        session._closed = True
        reason = _handshake_reason(e)
        if reason.startswith("certificate verify failed"):
            raise _TlsHandshakeFailed(f"{reason} (host {session.peer})") from None
        raise _TlsHandshakeFailed(
            f"TLS handshake with {session.peer} failed: {reason}") from None
    wire.upgrade(tls_stream)
    session.tls = _tls_description(tls_stream)
    await session._converse(client.tls_established())
    _check_ready(session, client, "EHLO after STARTTLS")


async def _authenticate(session: ClientSession, client: SmtpClient,
                        auth: Credentials) -> None:
    """AUTH on a READY, encrypted session; any failure is a transient SessionError
    4.7.x whose text says why (the server's own reply when it refused), never the
    password."""
    out = client.auth(auth)
    if out:
        await session._converse(out)
    if client.authenticated:
        return
    _check_ready(session, client, "AUTH")  # 421, lost connection, timeout
    unavailable = client.auth_unavailable
    if unavailable is not None:
        raise SessionError(unavailable.code, unavailable.status,
                           f"cannot authenticate to {session.peer} as {auth.username}: "
                           f"{reply_text(unavailable)}", permanent=False)
    refused = client.auth_refused
    assert refused is not None
    status = refused.status
    # 535 5.7.8 -> 4.7.8: the server's detail, in the class of a deferral.
    enhanced = f"4.{status[2:]}" if status and status[1:4] == ".7." else "4.7.0"
    raise SessionError(454 if refused.code >= 500 else refused.code, enhanced,
                       f"SASL authentication failed for {auth.username}; server "
                       f"{session.peer} said: {reply_line(refused)}", permanent=False)


def _check_ready(session: ClientSession, client: SmtpClient, stage: str) -> None:
    if client.phase is Phase.READY:
        return
    err = client.error
    if err is None:
        raise SessionError(421, "4.5.0", f"{session.peer}: unexpected state after {stage}",
                           permanent=False)
    if client.greeting is None:  # lost or timed out before any greeting
        raise SessionError(err.code, err.status, reply_text(err), permanent=False)
    if client.greeting.code != 220:
        # Refused greeting: Postfix skips 5xx greeters and defers (smtp_skip_5xx_greeting).
        raise SessionError(err.code, err.status,
                           f"host {session.peer} refused to talk to me: {reply_line(err)}",
                           permanent=False)
    if err.status == LOOP_STATUS:
        raise SessionError(err.code, err.status, f"host {session.peer}: {reply_text(err)}",
                           permanent=True)
    if client.phase is Phase.CLOSED or err.status == "4.5.0":
        # 421, a lost connection or a timeout (the text names the peer), a protocol error
        raise SessionError(err.code, err.status, reply_text(err), permanent=False)
    raise SessionError(err.code, err.status,
                       f"host {session.peer} refused to talk to me: {reply_line(err)}")
