"""A fast receiving SMTP server (the "sink") for benchmarks and delivery tests.

Why it exists: the relay's SMTP *client* must be tested and benchmarked against a peer
that is independent of the relay's own protocol code, fast enough not to be the
bottleneck, and scriptable (answer 4xx/5xx, drop, stall, greet with 421 for chosen
recipient domains). This module is that peer: a deliberately small ESMTP server in trio.

Contract (used by other engineers' tests, keep it stable)::

    sink = Sink(behaviours={"tempfail.test": Behaviour.TEMPFAIL}, default=Behaviour.ACCEPT,
                keep_messages=True)
    port = await nursery.start(sink.serve, "127.0.0.1", 0)   # returns the bound port
    sink.stats["a.test"].messages / .recipients / .tempfails / .rejects
    sink.total_messages, sink.total_recipients
    sink.signed_messages   # accepted messages with a DKIM-Signature: field in their header
    sink.max_concurrent_connections, sink.current_connections, sink.connections_opened
    sink.listeners[(host, port)]  -> ListenerStats (the same three counters per address)
    sink.arrivals   # [(trio.current_time(), domain, n_recipients)] per accepted message/domain
    sink.messages   # [(mail_from, [rcpts], data, peer)] if keep_messages
    await sink.wait_for(lambda s: s.total_messages >= 10, timeout=5)   # TimeoutError
    sink.sources["127.0.0.1"] -> SourceStats: per client source address, messages,
        refusals (pushback 421s), connections_opened, current/max_concurrent_connections,
        events [(trio.current_time(), "connect" | "accept" | "refuse")] in order (if
        record_arrivals), message_times / refusal_times / connection_times, and
        refusal_windows() (see "Pushback" below)

Behaviours apply per recipient domain (``behaviours`` dict, else ``default``); a listener
can also be given its own ``behaviour`` (e.g. ``GREET_421`` for a busy MX host).

Pushback (a mailbox provider's hidden rate limit, like Gmail's): ``Sink(pushback_rate=50,
pushback_window=60.0)`` accepts at most 50 messages per client source address in any
60-second window (a *sliding* window: a message accepted at t frees its place at t + 60,
so no burst at a window boundary gets more through) and answers every attempt above it
with Gmail's published ``421 4.7.28`` rate-limit reply (``pushback_reply``), then closes
the connection, as Gmail does. ``pushback_stage`` says where: ``"rcpt"`` (the first RCPT
of a transaction, the default), ``"mail"`` or ``"data"`` (end of data). A transaction
admitted at MAIL/RCPT holds its place until it ends, so concurrent connections of one
address cannot overshoot the limit together. ``pushback_greet=True`` also greets with the
421 (and closes) while the address is at its limit. Every source address is counted
whether or not pushback is on (``sink.sources``); ``SourceStats.refusal_windows()``
groups the refusals into windows (from a refusal to the next accepted message) with the
connections the client opened meanwhile: the measure of how it reacted to being told to
slow down.

Speed: input is scanned with ``bytes.find``; replies to pipelined commands are batched
into one send and flushed whenever the input buffer holds no further complete command
(RFC 2920); message bodies are never split into lines in Python (end of data is found
with ``find(b"\\r\\n.\\r\\n")`` and dot-unstuffing is one ``replace``, done only when
messages are kept; otherwise the body is not even copied out of the input buffer). A
plain-TCP session reads with one ``wait_readable`` + ``recv`` and writes with one
``send`` (the relay's own ``relay.wire.Wire``), and a state change creates no wake-up
event unless a task is inside ``wait_for``: about 0.13 ms of CPU per message on the
dev box, most of it in the system calls.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import math
import os
import signal
import socket
import ssl
import sys
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import trio

from relay.inbound.listener import serve_listeners
from relay.wire import Wire

__all__ = ["PUSHBACK_STAGES", "Behaviour", "DomainStats", "ListenerStats", "RefusalWindow",
           "Sink", "SourceStats", "main", "pushback_reply"]


class Behaviour(enum.Enum):
    """What the sink answers for a recipient domain."""

    ACCEPT = "accept"  #: 250 everywhere
    TEMPFAIL = "tempfail"  #: 451 4.3.0 at RCPT
    REJECT = "reject"  #: 550 5.1.1 at RCPT
    TEMPFAIL_DATA = "tempfail_data"  #: 451 4.3.0 at end of data
    REJECT_DATA = "reject_data"  #: 554 5.6.0 at end of data
    DROP = "drop"  #: close the connection without a reply at RCPT
    STALL = "stall"  #: stop answering after RCPT for ``stall_seconds``, then close
    GREET_421 = "greet_421"  #: 421 greeting (listener/default) or 421 + close at RCPT


@dataclass
class DomainStats:
    """Counters for one recipient domain. ``messages`` counts accepted transactions that
    carried at least one recipient of this domain; ``recipients`` the accepted recipients.
    ``tempfails``/``rejects`` count recipients (RCPT or end-of-data refusals)."""

    messages: int = 0
    recipients: int = 0
    tempfails: int = 0
    rejects: int = 0
    drops: int = 0
    stalls: int = 0
    greet_421: int = 0
    bytes: int = 0
    #: connections that named this domain in a RCPT and are still open / the peak of it
    #: (proves a per-domain ``max_connections`` throttle held).
    current_connections: int = 0
    max_concurrent_connections: int = 0


@dataclass
class ListenerStats:
    """Connection counters for one listening address."""

    current_connections: int = 0
    max_concurrent_connections: int = 0
    connections_opened: int = 0


@dataclass
class RefusalWindow:
    """A run of pushback refusals of one source address: from the first refusal until the
    next message accepted from it (``end``; None: none was, up to the last record).
    ``connections``: connections the client opened after that first refusal, up to and
    including the one that carried the accepted message: 1 for a client that waits and
    probes once, 5 for one that reconnects with five sessions at once."""

    start: float
    end: float | None = None
    refusals: int = 0
    connections: int = 0


@dataclass
class SourceStats:
    """What one client source address did: the sender's egress address as the sink
    sees it. ``events`` (kept when the sink records arrivals) are in the order they
    happened, so windows stay exact even when a mock clock gives them equal times."""

    messages: int = 0  #: accepted transactions
    refusals: int = 0  #: pushback 421s (at greeting, MAIL, RCPT or end of data)
    connections_opened: int = 0
    current_connections: int = 0
    max_concurrent_connections: int = 0
    events: list[tuple[float, str]] = field(default_factory=list)

    def times(self, kind: str) -> list[float]:
        """Times of the ``kind`` events (``connect``, ``accept``, ``refuse``)."""
        return [t for t, k in self.events if k == kind]

    @property
    def message_times(self) -> list[float]:
        return self.times("accept")

    @property
    def refusal_times(self) -> list[float]:
        return self.times("refuse")

    @property
    def connection_times(self) -> list[float]:
        return self.times("connect")

    def refusal_windows(self) -> list[RefusalWindow]:
        """The refusals grouped into ``RefusalWindow``s, in order."""
        windows: list[RefusalWindow] = []
        current: RefusalWindow | None = None
        for t, kind in self.events:
            if kind == "refuse":
                if current is None:
                    current = RefusalWindow(start=t)
                    windows.append(current)
                current.refusals += 1
            elif current is None:
                continue
            elif kind == "connect":
                current.connections += 1
            else:  # accept: the window closes
                current.end = t
                current = None
        return windows


#: Where a pushback sink refuses: the first RCPT of a transaction, MAIL, end of data.
PUSHBACK_STAGES = ("rcpt", "mail", "data")


def pushback_reply(ip: str) -> bytes:
    """Gmail's ``421 4.7.28`` for a rate-limited IP address, multi-line as Gmail sends it
    (the text of "Gmail SMTP errors and codes", https://support.google.com/a/answer/3726730,
    with the client's address filled in)."""
    lines = [f"[{ip}] Gmail has detected an unusual rate of email originating from",
             f"your IP address {ip}. To protect our users from spam, email sent from",
             "your IP address has been temporarily rate limited. To review our bulk email",
             "senders guidelines, go to https://support.google.com/mail/?p="
             "UnsolicitedRateLimitError - gsmtp"]
    return ("".join(f"421-4.7.28 {x}\r\n" for x in lines[:-1])
            + f"421 4.7.28 {lines[-1]}\r\n").encode()


@dataclass
class _Limit:
    """A source address's pushback state: accepted messages still inside the window, and
    transactions admitted at MAIL/RCPT that have not ended."""

    recent: deque[float] = field(default_factory=deque)
    inflight: int = 0


_EHLO_KEYWORDS = ("PIPELINING", "8BITMIME", "SMTPUTF8", "CHUNKING", "ENHANCEDSTATUSCODES")
_MAX_COMMAND = 65536


class _Close(Exception):
    """Internal: end the session (after flushing what is queued)."""


@dataclass
class _Session:
    peer: str
    ip: str = ""
    source: SourceStats | None = None
    #: this transaction holds a place under the pushback limit (admitted at MAIL/RCPT)
    slot: bool = False
    domains_seen: set[str] = field(default_factory=set)
    mail_from: str | None = None
    rcpts: list[str] = field(default_factory=list)
    greeted: bool = False
    tls: bool = False
    bdat: bytearray | None = None


class Sink:
    """The receiving SMTP server; see the module docstring for the contract."""

    def __init__(
        self,
        behaviours: dict[str, Behaviour] | None = None,
        default: Behaviour = Behaviour.ACCEPT,
        *,
        keep_messages: bool = False,
        delays: dict[str, float] | None = None,
        stall_seconds: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        max_message_size: int = 100 * 1024 * 1024,
        hostname: str = "sink.test",
        record_arrivals: bool = True,
        chunking: bool = True,
        pushback_rate: int = 0,
        pushback_window: float = 60.0,
        pushback_stage: str = "rcpt",
        pushback_greet: bool = False,
    ) -> None:
        #: recipient domain (lower case) -> behaviour; may be changed while serving.
        self.behaviours: dict[str, Behaviour] = {
            k.lower(): v for k, v in (behaviours or {}).items()
        }
        self.default = default
        self.keep_messages = keep_messages
        #: recipient domain -> seconds to wait before answering end of data.
        self.delays: dict[str, float] = {k.lower(): v for k, v in (delays or {}).items()}
        self.stall_seconds = stall_seconds
        self.ssl_context = ssl_context
        self.max_message_size = max_message_size
        self.hostname = hostname
        self.record_arrivals = record_arrivals
        #: Offer CHUNKING (clients then send BDAT); False: DATA only, like smtp-sink.
        self.ehlo_keywords = tuple(k for k in _EHLO_KEYWORDS if chunking or k != "CHUNKING")
        if pushback_rate < 0 or pushback_window <= 0 or pushback_stage not in PUSHBACK_STAGES:
            raise ValueError(f"pushback: rate {pushback_rate} (>= 0), window {pushback_window}"
                             f" (> 0), stage {pushback_stage!r} (one of {PUSHBACK_STAGES})")
        #: Messages per ``pushback_window`` seconds per source address (0: no limit).
        self.pushback_rate = pushback_rate
        self.pushback_window = pushback_window
        self.pushback_stage = pushback_stage
        self.pushback_greet = pushback_greet

        self.stats: defaultdict[str, DomainStats] = defaultdict(DomainStats)
        self.total_messages = 0
        self.total_recipients = 0
        self.total_bytes = 0
        #: accepted messages whose header section has a ``DKIM-Signature:`` field
        self.signed_messages = 0
        self.current_connections = 0
        self.max_concurrent_connections = 0
        self.connections_opened = 0
        self.listeners: dict[tuple[str, int], ListenerStats] = {}
        #: client source address -> what it did (always counted; events if recorded)
        self.sources: dict[str, SourceStats] = {}
        self.pushback_refusals = 0
        self._limits: defaultdict[str, _Limit] = defaultdict(_Limit)
        self.arrivals: list[tuple[float, str, int]] = []
        self.messages: list[tuple[str, list[str], bytes, str]] = []
        self._changed = trio.Event()
        #: tasks inside ``wait_for``: without any, a state change creates no Event
        self._waiting = 0

    # ------------------------------------------------------------------ public helpers

    def behaviour_for(self, domain: str) -> Behaviour:
        return self.behaviours.get(domain, self.default)

    def set_behaviour(self, domain: str, behaviour: Behaviour) -> None:
        """Change the answer for a domain while serving (e.g. let deferred mail drain)."""
        self.behaviours[domain.lower()] = behaviour

    async def wait_for(self, predicate: Callable[[Sink], bool], timeout: float) -> None:
        """Wait until ``predicate(self)`` is true; re-evaluated on every state change
        (message accepted, refusal, connection opened/closed). Raises ``TimeoutError``."""
        self._waiting += 1
        try:
            with trio.move_on_after(timeout) as scope:
                while not predicate(self):
                    event = self._changed
                    await event.wait()
        finally:
            self._waiting -= 1
        if scope.cancelled_caught and not predicate(self):
            raise TimeoutError(f"sink condition not met within {timeout}s")

    def over_limit(self, ip: str) -> bool:
        """Whether source address ``ip`` is at its pushback limit now: accepted messages in
        the last ``pushback_window`` seconds plus transactions admitted and not ended
        reach ``pushback_rate`` (never, without a limit)."""
        if not self.pushback_rate:
            return False
        limit = self._limits[ip]
        cutoff = trio.current_time() - self.pushback_window
        while limit.recent and limit.recent[0] <= cutoff:
            limit.recent.popleft()
        return len(limit.recent) + limit.inflight >= self.pushback_rate

    def max_messages_in_window(self, domain: str, seconds: float) -> int:
        """Most messages of ``domain`` that arrived within any ``seconds``-long window:
        the proof that a ``max_message_rate`` throttle held."""
        times = [t for t, d, _ in self.arrivals if d == domain]
        best = 0
        j = 0
        for i, t in enumerate(times):
            while t - times[j] >= seconds:
                j += 1
            best = max(best, i - j + 1)
        return best

    def summary(self, per_domain: bool = True) -> dict[str, object]:
        """JSON-able snapshot of the counters."""
        out: dict[str, object] = {
            "total_messages": self.total_messages,
            "total_recipients": self.total_recipients,
            "total_bytes": self.total_bytes,
            "signed_messages": self.signed_messages,
            "current_connections": self.current_connections,
            "max_concurrent_connections": self.max_concurrent_connections,
            "connections_opened": self.connections_opened,
        }
        if per_domain:
            out["domains"] = {d: asdict(s) for d, s in self.stats.items()}
            out["sources"] = {ip: {k: v for k, v in asdict(s).items() if k != "events"}
                              for ip, s in self.sources.items()}
        return out

    # ------------------------------------------------------------------ serving

    async def serve(
        self,
        host: str,
        port: int = 0,
        *,
        behaviour: Behaviour | None = None,
        reuse_port: bool = False,
        sock: socket.socket | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen on ``host:port`` (0 = ephemeral) and serve until cancelled; reports the
        bound port through ``task_status``. ``behaviour`` applies to every connection of
        this listener (only ``GREET_421`` is meaningful there). ``sock`` serves an
        already-bound stdlib socket instead (multi-process CLI)."""
        if sock is None:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
        sock.listen(4096)
        sock.setblocking(False)
        bound = sock.getsockname()
        key = (bound[0], bound[1])
        lstats = self.listeners.setdefault(key, ListenerStats())

        async def handler(conn: socket.socket, peer: tuple[str, int]) -> None:
            await self._connection(Wire(conn), peer, lstats, behaviour)

        async with trio.open_nursery() as nursery:
            await nursery.start(serve_listeners, [sock], handler, nursery)
            task_status.started(bound[1])

    def _notify(self) -> None:
        if self._waiting:
            self._changed.set()
            self._changed = trio.Event()

    async def _connection(
        self, wire: Wire, peer: tuple[str, int], lstats: ListenerStats,
        behaviour: Behaviour | None,
    ) -> None:
        self.current_connections += 1
        self.connections_opened += 1
        self.max_concurrent_connections = max(
            self.max_concurrent_connections, self.current_connections
        )
        lstats.current_connections += 1
        lstats.connections_opened += 1
        lstats.max_concurrent_connections = max(
            lstats.max_concurrent_connections, lstats.current_connections
        )
        source = self._count_source(peer[0])
        self._notify()
        sess = _Session(peer=f"{peer[0]}:{peer[1]}", ip=peer[0], source=source)
        try:
            await self._session(wire, sess, behaviour)
        except (trio.BrokenResourceError, trio.ClosedResourceError, _Close, OSError):
            pass
        except ssl.SSLError:
            pass
        finally:
            self.current_connections -= 1
            lstats.current_connections -= 1
            for d in sess.domains_seen:
                self.stats[d].current_connections -= 1
            source.current_connections -= 1
            self._release(sess)
            self._notify()
            with trio.CancelScope(shield=True):
                await wire.aclose(graceful=False)

    def _count_source(self, ip: str) -> SourceStats:
        """Account a new connection from ``ip``; return its ``SourceStats``."""
        source = self.sources.get(ip)
        if source is None:
            source = self.sources[ip] = SourceStats()
        source.connections_opened += 1
        source.current_connections += 1
        source.max_concurrent_connections = max(source.max_concurrent_connections,
                                                source.current_connections)
        if self.record_arrivals:
            source.events.append((trio.current_time(), "connect"))
        return source

    def _admit(self, sess: _Session) -> bytes | None:
        """Pushback at this stage: the 421 reply (counted) when the session's address is at
        its limit, else None; a MAIL/RCPT admission takes a place until the transaction
        ends (``_release``)."""
        if sess.slot:
            return None
        if self.over_limit(sess.ip):
            return self._refuse(sess)
        if self.pushback_stage != "data":
            sess.slot = True
            self._limits[sess.ip].inflight += 1
        return None

    def _refuse(self, sess: _Session) -> bytes:
        source = sess.source
        assert source is not None
        source.refusals += 1
        self.pushback_refusals += 1
        if self.record_arrivals:
            source.events.append((trio.current_time(), "refuse"))
        self._notify()
        return pushback_reply(sess.ip)

    def _release(self, sess: _Session) -> None:
        """The session's transaction ended (or a new one starts): free its place."""
        if sess.slot:
            sess.slot = False
            self._limits[sess.ip].inflight -= 1

    def _accepted_from(self, sess: _Session, now: float) -> None:
        """A message from the session's address was accepted at ``now``."""
        source = sess.source
        if source is None:
            return
        source.messages += 1
        if self.record_arrivals:
            source.events.append((now, "accept"))
        if self.pushback_rate:
            self._limits[sess.ip].recent.append(now)
            self._release(sess)

    def _ehlo_reply(self, name: str, sess: _Session) -> bytes:
        lines = [f"{self.hostname} hello {name}", f"SIZE {self.max_message_size}"]
        lines += self.ehlo_keywords
        if self.ssl_context is not None and not sess.tls:
            lines.append("STARTTLS")
        out = [f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"]
        return ("\r\n".join(out) + "\r\n").encode()

    async def _session(self, wire: Wire, sess: _Session, behaviour: Behaviour | None) -> None:
        if (behaviour or self.default) is Behaviour.GREET_421:
            self.stats["*"].greet_421 += 1
            await wire.send(b"421 4.3.2 " + self.hostname.encode() + b" busy, try later\r\n")
            return
        if self.pushback_greet and self.over_limit(sess.ip):
            await wire.send(self._refuse(sess))
            return
        await wire.send(b"220 " + self.hostname.encode() + b" ESMTP sink\r\n")
        buf = bytearray()
        out: list[bytes] = []
        while True:
            # Process every complete command in the buffer, batching replies.
            while True:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    if len(buf) > _MAX_COMMAND:
                        out.append(b"500 5.5.2 line too long\r\n")
                        await wire.send(b"".join(out))
                        return
                    break
                line = bytes(buf[:eol])
                del buf[: eol + 2]
                verb = line[:4].upper()
                if verb == b"DATA" and len(line) == 4:
                    if sess.mail_from is None or not sess.rcpts:
                        out.append(b"554 5.5.1 no valid recipients\r\n")
                        continue
                    out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    await wire.send(b"".join(out))
                    out.clear()
                    size, body, buf, signed = await self._read_data(wire, buf)
                    if size < 0:
                        return
                    reply = await self._end_of_data(sess, body, size, stuffed=True,
                                                    signed=signed)
                    out.append(reply)
                    if reply.startswith(b"421"):  # pushback: closing, as Gmail does
                        await wire.send(b"".join(out))
                        return
                    continue
                if verb == b"BDAT":
                    reply = await self._bdat(wire, sess, line, buf)
                    if reply is None:
                        return
                    out.append(reply)
                    if reply.startswith(b"421"):
                        await wire.send(b"".join(out))
                        return
                    continue
                reply = await self._command(wire, sess, line, verb, out)
                if reply is None:
                    continue
                if reply == b"STARTTLS":
                    await wire.send(b"".join(out) + b"220 2.0.0 go ahead\r\n")
                    out.clear()
                    buf.clear()  # RFC 3207: discard anything pipelined after STARTTLS
                    assert self.ssl_context is not None
                    tls = trio.SSLStream(wire.transport(), self.ssl_context, server_side=True)
                    await tls.do_handshake()
                    wire.upgrade(tls)
                    sess.tls = True
                    sess.mail_from, sess.rcpts, sess.greeted = None, [], False
                    continue
                out.append(reply)
                if reply.startswith(b"221") or reply.startswith(b"421"):
                    await wire.send(b"".join(out))
                    return
            if out:
                await wire.send(out[0] if len(out) == 1 else b"".join(out))
                out.clear()
            chunk = await wire.recv(65536)
            if not chunk:
                return
            buf += chunk

    async def _read_data(
        self, wire: Wire, buf: bytearray
    ) -> tuple[int, bytes, bytearray, bool]:
        """Read until CRLF.CRLF; return (size of the stuffed body incl. its final CRLF or
        -1 if the session ended, the body itself if messages are kept else b"", remaining
        input, whether its header has a DKIM-Signature field). Nothing is copied out of
        the input buffer unless the body is kept."""
        start = 0
        first = True
        while True:
            if start == 0 and buf.startswith(b".\r\n"):  # empty body
                return 0, b"", buf[3:], False
            end = buf.find(b"\r\n.\r\n", start)
            if end >= 0:
                body = bytes(buf[: end + 2]) if self.keep_messages else b""
                signed = _signed(buf, end + 2)
                del buf[: end + 5]
                return end + 2, body, buf, signed
            if len(buf) > self.max_message_size + 65536:
                return -1, b"", buf, False
            start = max(0, len(buf) - 4)
            # the first read after 354 waits (the client needed the reply); later reads of
            # the same body usually find data already there
            chunk = await wire.recv(65536, try_first=not first)
            first = False
            if not chunk:
                return -1, b"", buf, False
            buf += chunk

    async def _bdat(
        self, wire: Wire, sess: _Session, line: bytes, buf: bytearray
    ) -> bytes | None:
        parts = line.split()
        try:
            size = int(parts[1])
        except (IndexError, ValueError):
            return b"501 5.5.4 syntax: BDAT size [LAST]\r\n"
        last = len(parts) > 2 and parts[2].upper() == b"LAST"
        while len(buf) < size:
            chunk = await wire.recv(max(262144, size - len(buf)))
            if not chunk:
                return None
            buf += chunk
        data = bytes(buf[:size])
        del buf[:size]
        if sess.mail_from is None or not sess.rcpts:
            return b"554 5.5.1 no valid recipients\r\n"
        if sess.bdat is None:
            sess.bdat = bytearray()
        sess.bdat += data
        if not last:
            return f"250 2.0.0 {size} octets received\r\n".encode()
        body = bytes(sess.bdat)
        sess.bdat = None
        return await self._end_of_data(sess, body, len(body), stuffed=False,
                                       signed=_signed(body, len(body)))

    async def _end_of_data(self, sess: _Session, body: bytes, size: int,
                           stuffed: bool, signed: bool = False) -> bytes:
        """Account one message (``size`` bytes; ``body`` only matters when messages are
        kept; ``signed``: it carries a DKIM signature) and return the end-of-data
        reply."""
        rcpts = sess.rcpts
        mail_from = sess.mail_from or ""
        sess.mail_from, sess.rcpts = None, []
        if len(rcpts) == 1:  # the common case, without a dict
            by_domain = {rcpts[0].rpartition("@")[2].lower(): 1}
        else:
            by_domain = {}
            for r in rcpts:
                d = _domain(r)
                by_domain[d] = by_domain.get(d, 0) + 1
        if self.delays:
            delay = max((self.delays.get(d, 0.0) for d in by_domain), default=0.0)
            if delay:
                await trio.sleep(delay)
        if self.behaviours or self.default is not Behaviour.ACCEPT:
            outcomes = {self.behaviour_for(d) for d in by_domain}
            if Behaviour.REJECT_DATA in outcomes or Behaviour.TEMPFAIL_DATA in outcomes:
                reject = Behaviour.REJECT_DATA in outcomes
                for d, n in by_domain.items():
                    if reject:
                        self.stats[d].rejects += n
                    else:
                        self.stats[d].tempfails += n
                self._notify()
                return (b"554 5.6.0 message refused\r\n" if reject
                        else b"451 4.3.0 try later\r\n")
        if size > self.max_message_size:
            return b"552 5.3.4 message too big\r\n"
        if self.pushback_rate and self.pushback_stage == "data":
            refusal = self._admit(sess)
            if refusal is not None:
                return refusal
        if stuffed and self.keep_messages:
            if body.startswith(b".."):
                body = body[1:]
            body = body.replace(b"\r\n..", b"\r\n.")
            size = len(body)
        now = trio.current_time()
        self.total_messages += 1
        self.total_recipients += len(rcpts)
        self.total_bytes += size
        if signed:
            self.signed_messages += 1
        stats = self.stats
        record = self.arrivals.append if self.record_arrivals else None
        for d, n in by_domain.items():
            st = stats[d]
            st.messages += 1
            st.recipients += n
            st.bytes += size
            if record is not None:
                record((now, d, n))
        if self.keep_messages:
            self.messages.append((mail_from, list(rcpts), body, sess.peer))
        self._accepted_from(sess, now)
        self._notify()
        return b"250 2.0.0 Ok: queued\r\n"

    async def _command(
        self, wire: Wire, sess: _Session, line: bytes, verb: bytes, out: list[bytes]
    ) -> bytes | None:
        """Reply to one command; ``None`` means nothing to append (already handled)."""
        if verb == b"RCPT":
            if sess.mail_from is None:
                return b"503 5.5.1 MAIL first\r\n"
            addr = _path(line, b"TO:")
            if addr is None:
                return b"501 5.1.3 bad recipient syntax\r\n"
            d = _domain(addr)
            st = self.stats[d]
            if d not in sess.domains_seen:
                sess.domains_seen.add(d)
                st.current_connections += 1
                st.max_concurrent_connections = max(
                    st.max_concurrent_connections, st.current_connections
                )
                self._notify()
            if self.pushback_rate and self.pushback_stage == "rcpt":
                refusal = self._admit(sess)
                if refusal is not None:
                    return refusal
            b = self.behaviour_for(d)
            if b is Behaviour.ACCEPT or b is Behaviour.TEMPFAIL_DATA or (
                b is Behaviour.REJECT_DATA
            ):
                sess.rcpts.append(addr)
                return b"250 2.1.5 Ok\r\n"
            if b is Behaviour.TEMPFAIL:
                st.tempfails += 1
                self._notify()
                return b"451 4.3.0 try again later\r\n"
            if b is Behaviour.REJECT:
                st.rejects += 1
                self._notify()
                return b"550 5.1.1 no such user\r\n"
            if b is Behaviour.GREET_421:
                st.greet_421 += 1
                self._notify()
                return b"421 4.3.2 busy, closing\r\n"
            if out:  # replies owed for earlier pipelined commands still go out
                await wire.send(b"".join(out))
                out.clear()
            if b is Behaviour.DROP:
                st.drops += 1
                raise _Close
            st.stalls += 1  # STALL
            self._notify()
            await trio.sleep(self.stall_seconds)
            raise _Close
        if verb == b"MAIL":
            if not sess.greeted:
                return b"503 5.5.1 EHLO first\r\n"
            if sess.mail_from is not None:
                return b"503 5.5.1 nested MAIL\r\n"
            addr = _path(line, b"FROM:")
            if addr is None:
                return b"501 5.1.7 bad sender syntax\r\n"
            upper = line.upper()
            i = upper.find(b" SIZE=")
            if i >= 0:
                try:
                    size = int(upper[i + 6 :].split()[0])
                except (ValueError, IndexError):
                    size = 0
                if size > self.max_message_size:
                    return b"552 5.3.4 message size exceeds limit\r\n"
            self._release(sess)
            if self.pushback_rate and self.pushback_stage == "mail":
                refusal = self._admit(sess)
                if refusal is not None:
                    return refusal
            sess.mail_from = addr
            sess.rcpts = []
            return b"250 2.1.0 Ok\r\n"
        if verb in (b"EHLO", b"HELO"):
            name = line[5:].decode("latin-1").strip() or "unknown"
            sess.greeted = True
            sess.mail_from, sess.rcpts, sess.bdat = None, [], None
            self._release(sess)
            if verb == b"HELO":
                return f"250 {self.hostname}\r\n".encode()
            return self._ehlo_reply(name, sess)
        if verb == b"RSET":
            sess.mail_from, sess.rcpts, sess.bdat = None, [], None
            self._release(sess)
            return b"250 2.0.0 Ok\r\n"
        if verb == b"NOOP":
            return b"250 2.0.0 Ok\r\n"
        if verb == b"QUIT":
            return b"221 2.0.0 Bye\r\n"
        if line.upper() == b"STARTTLS":
            if self.ssl_context is None or sess.tls:
                return b"502 5.5.1 STARTTLS not available\r\n"
            return b"STARTTLS"
        if verb == b"VRFY":
            return b"252 2.0.0 cannot verify\r\n"
        return b"502 5.5.2 command not recognized\r\n"


def _signed(data: bytes | bytearray, end: int) -> bool:
    """Whether the header section of the message in ``data[:end]`` has a
    ``DKIM-Signature:`` field (name as the relay and OpenDKIM write it). Searches the
    header only (up to the first empty line), with C-speed ``find``: about a microsecond
    for a typical header, whatever the body's size."""
    if data.startswith(b"DKIM-Signature:"):
        return True
    head_end = data.find(b"\r\n\r\n", 0, end)
    return data.find(b"\r\nDKIM-Signature:", 0, head_end if head_end >= 0 else end) >= 0


def _path(line: bytes, keyword: bytes) -> str | None:
    """``MAIL FROM:<a@b> SIZE=1`` -> ``a@b`` (None if malformed)."""
    rest = line[5:].lstrip()
    if rest[: len(keyword)].upper() != keyword:
        return None
    rest = rest[len(keyword) :].lstrip()
    if rest.startswith(b"<"):
        end = rest.find(b">")
        if end < 0:
            return None
        return rest[1:end].decode("utf-8", "surrogateescape")
    return rest.split(b" ", 1)[0].decode("utf-8", "surrogateescape") or None


def _domain(addr: str) -> str:
    return addr.rpartition("@")[2].lower()


# ---------------------------------------------------------------------- CLI


def _parse_listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def _build_sink(args: argparse.Namespace) -> Sink:
    behaviours: dict[str, Behaviour] = {}
    for name in ("tempfail", "reject", "tempfail_data", "reject_data", "drop", "stall"):
        for d in getattr(args, f"{name}_domain") or []:
            behaviours[d] = Behaviour(name)
    return Sink(
        behaviours=behaviours,
        default=Behaviour(args.default),
        stall_seconds=args.stall_seconds,
        record_arrivals=False,
    )


async def _child_main(
    args: argparse.Namespace, socks: list[socket.socket], report_fd: int
) -> None:
    """One worker process: serve the shared-port sockets, report totals to the parent."""
    sink = _build_sink(args)
    async with trio.open_nursery() as nursery:
        for s in socks:
            await nursery.start(lambda task_status, s=s: sink.serve(
                "", 0, sock=s, task_status=task_status))

        async def report_loop() -> None:
            while True:
                os.write(report_fd, (json.dumps(sink.summary()) + "\n").encode())
                await trio.sleep(args.interval / 2)

        nursery.start_soon(report_loop)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                break
        os.write(report_fd, (json.dumps(sink.summary()) + "\n").encode())
        nursery.cancel_scope.cancel()


def _merge(parts: list[dict]) -> dict:
    total: dict = {"total_messages": 0, "total_recipients": 0, "total_bytes": 0,
                   "signed_messages": 0, "current_connections": 0,
                   "max_concurrent_connections": 0, "connections_opened": 0, "domains": {}}
    for p in parts:
        for k in ("total_messages", "total_recipients", "total_bytes", "signed_messages",
                  "current_connections", "max_concurrent_connections", "connections_opened"):
            total[k] += p.get(k, 0)
        for d, st in p.get("domains", {}).items():
            agg = total["domains"].setdefault(d, {})
            for k, v in st.items():
                agg[k] = agg.get(k, 0) + v
    return total


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.sink --listen 127.0.0.1:2626 [--processes N] ...``: forks N
    processes that each bind the same port with SO_REUSEPORT; the parent prints the summed
    counters every ``--interval`` seconds and a JSON summary at exit (SIGINT/SIGTERM or
    ``--duration``)."""
    ap = argparse.ArgumentParser(prog="python -m bench.sink", description=main.__doc__)
    ap.add_argument("--listen", action="append", default=[],
                    help="host:port (repeatable); port 0 = ephemeral")
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--default", default="accept", choices=[b.value for b in Behaviour])
    for name in ("tempfail", "reject", "tempfail_data", "reject_data", "drop", "stall"):
        ap.add_argument(f"--{name.replace('_', '-')}-domain", action="append", metavar="DOMAIN")
    ap.add_argument("--stall-seconds", type=float, default=30.0)
    ap.add_argument("--interval", type=float, default=2.0)
    ap.add_argument("--duration", type=float, default=0.0, help="exit after N seconds")
    ap.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    args = ap.parse_args(argv)
    listens = [_parse_listen(x) for x in (args.listen or ["127.0.0.1:2626"])]
    socks: list[socket.socket] = []
    for host, port in listens:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        probe = socket.socket(family, socket.SOCK_STREAM)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind((host, port))
        probe.listen(4096)  # connectable at once; process 0 serves this very socket
        socks.append(probe)
    bound = [s.getsockname()[:2] for s in socks]
    print(json.dumps({"listening": [f"{h}:{p}" for h, p in bound]}), flush=True)

    children: list[tuple[int, int]] = []  # (pid, read fd)
    for i in range(max(1, args.processes)):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            os.close(r)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            mine = socks
            if i > 0:  # every other process binds its own socket in the reuseport group
                mine = []
                for (host, port), s in zip(bound, socks, strict=True):
                    n = socket.socket(s.family, socket.SOCK_STREAM)
                    n.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    n.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    n.bind((host, port))
                    mine.append(n)
            with contextlib.suppress(KeyboardInterrupt):
                trio.run(_child_main, args, mine, w)
            os._exit(0)
        os.close(w)
        children.append((pid, r))
    for s in socks:
        s.close()

    latest: dict[int, dict] = {}
    pending: dict[int, bytes] = {r: b"" for _, r in children}
    stop = {"flag": False}

    def _stop(*_: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    start = last_print = time.monotonic()
    import select

    while not stop["flag"]:
        if args.duration and time.monotonic() - start >= args.duration:
            break
        try:
            ready, _, _ = select.select([r for _, r in children], [], [], 0.2)
        except InterruptedError:
            continue
        for r in ready:
            data = os.read(r, 1 << 20)
            if not data:
                continue
            pending[r] += data
            *lines, pending[r] = pending[r].split(b"\n")
            if lines:
                latest[r] = json.loads(lines[-1])
        if time.monotonic() - last_print >= args.interval:
            last_print = time.monotonic()
            _print(_merge(list(latest.values())), args.json, time.monotonic() - start)
    for pid, _ in children:
        os.kill(pid, signal.SIGTERM)
    for pid, r in children:
        os.waitpid(pid, 0)
        # the child's last line (written on SIGTERM) is still in the pipe: drain it
        while True:
            data = os.read(r, 1 << 20)
            if not data:
                break
            pending[r] += data
        lines = [x for x in pending[r].split(b"\n") if x.strip()]
        if lines:
            latest[r] = json.loads(lines[-1])
        os.close(r)
    summary = _merge(list(latest.values()))
    summary["final"] = True
    print(json.dumps(summary), flush=True)
    return 0


def _print(summary: dict, as_json: bool, elapsed: float) -> None:
    if as_json:
        print(json.dumps({k: v for k, v in summary.items() if k != "domains"}), flush=True)
        return
    rate = summary["total_messages"] / elapsed if elapsed > 0 else math.nan
    print(
        f"[{elapsed:7.1f}s] messages={summary['total_messages']} "
        f"recipients={summary['total_recipients']} conns={summary['current_connections']} "
        f"(max {summary['max_concurrent_connections']}) avg={rate:.0f} msg/s",
        file=sys.stdout,
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
