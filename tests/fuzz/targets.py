"""Fuzz targets: plain functions of one ``bytes`` argument (no atheris needed here).

Each target raises nothing for any input unless an invariant is broken. Broken
invariants raise ``Finding`` (an AssertionError with a short ``key`` naming the
invariant, e.g. ``server:malformed-reply``); an exception that escapes relay code is a
finding too, keyed by its type and the innermost relay frame (``finding_key``).

The input formats are our own, not atheris' FuzzedDataProvider: a few header bytes
choose settings, decisions and chunk boundaries, the rest is the payload (the bytes a
client or server sends). Decoding is ``Reader``, a front-to-back byte reader that reads
zeros past the end, so *every* byte string is a valid input, the repo corpus means the
same thing with or without atheris (and whatever atheris version), and seeds can be
written by hand with the ``*_input`` encoders below (see ``tests/fuzz/seeds.py``).

Chunking (server, client): a header byte ``k`` (low 4 bits) is followed by ``k`` size
bytes; the payload is cut into pieces of ``size + 1`` octets, cycling through the sizes
(``k == 0``: one piece). So the fuzzer controls exactly where reads end.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
import traceback
from collections import deque
from collections.abc import Callable, Iterator

import msgspec

from relay import config as relay_config
from relay.http.kumo import kumo_injection
from relay.http.payload import PayloadError
from relay.http.sparkpost import sparkpost_injection
from relay.inbound.session import server_settings
from relay.model import Envelope, Recipient
from relay.outbound.throttle import rate_from_config
from relay.outcomes.dsn import FailedRecipient, build_dsn, dsn_wanted
from relay.smtp import address as A
from relay.smtp.client import (
    Phase as ClientPhase,
)
from relay.smtp.client import (
    RecipientOutcome,
    SmtpClient,
    parse_ehlo_extensions,
    reply_line,
    reply_text,
)
from relay.smtp.events import (
    NEED_DATA,
    AuthRequested,
    ConnectionClosing,
    HeloReceived,
    MessageReceived,
    RecipientRequested,
    StartTLSRequested,
)
from relay.smtp.replies import Reply, ReplyParseError, parse_reply
from relay.smtp.server import AUTH_LINE_MAX, Phase, ServerConnection, ServerSettings

__all__ = [
    "TARGETS",
    "Finding",
    "Reader",
    "client_input",
    "dsn_input",
    "finding_key",
    "fuzz_address",
    "fuzz_client",
    "fuzz_config",
    "fuzz_dsn",
    "fuzz_replies",
    "fuzz_server",
    "server_input",
]

HOST = "relay.example"


# -- plumbing -----------------------------------------------------------------------------


class Finding(AssertionError):
    """A broken invariant; ``key`` names it (stable, for grouping and muting)."""

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(f"[{key}] {detail}")
        self.key = key


def _fail(key: str, detail: str) -> None:
    raise Finding(key, detail)


_RELAY_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def finding_key(exc: BaseException) -> str:
    """A short, stable name for what went wrong: the Finding's key, or for an exception
    that escaped the code under test ``Type@relay/path.py:function`` of the innermost
    frame under relay/ (the last frame at all if none)."""
    if isinstance(exc, Finding):
        return exc.key
    frames = traceback.extract_tb(exc.__traceback__)
    where = None
    for fr in frames:
        rel = os.path.relpath(fr.filename, _RELAY_DIR)
        if rel.startswith("relay" + os.sep):
            where = f"{rel}:{fr.name}"
    if where is None and frames:
        fr = frames[-1]
        where = f"{os.path.basename(fr.filename)}:{fr.name}"
    return f"{type(exc).__name__}@{where}"


class Reader:
    """Reads a fuzz input front to back; past the end every byte reads as 0."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def byte(self) -> int:
        pos = self._pos
        self._pos = pos + 1
        return self._data[pos] if pos < len(self._data) else 0

    def take(self, n: int) -> bytes:
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def rest(self) -> bytes:
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out

    def sizes(self) -> list[int]:
        """A chunk-size list: count byte (low 4 bits), then that many ``size - 1`` bytes."""
        return [self.byte() + 1 for _ in range(self.byte() & 15)]


def _chunks(payload: bytes, sizes: list[int]) -> Iterator[bytes]:
    if not sizes:
        if payload:
            yield payload
        return
    pos = i = 0
    while pos < len(payload):
        n = sizes[i % len(sizes)]
        yield payload[pos : pos + n]
        pos += n
        i += 1


def _encode_sizes(chunks: list[int]) -> bytes:
    if len(chunks) > 15 or not all(1 <= n <= 256 for n in chunks):
        raise ValueError("at most 15 chunk sizes of 1..256")
    return bytes([len(chunks), *(n - 1 for n in chunks)])


# -- 1. server ----------------------------------------------------------------------------

# flag bits of header byte 0
S_TLS_AVAILABLE = 1
S_AUTH_ENABLED = 2
S_PLAINTEXT_AUTH = 4
S_TLS_ACTIVE = 8  # the connection starts on TLS (a port-465-like listener)
S_PREGREET = 16  # the first chunk arrives before start()
S_LARGE = 32  # max_message_size = 10240000 (else 16 * (byte 1 + 1))
S_TLS_FAIL = 64  # the STARTTLS handshake fails: the I/O layer just closes
S_NORMALIZE = 128  # bare_newline = "normalize" (else "reject")

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])([^\r\n]*)\r\n")
_CLOSE_REASONS = frozenset({"quit", "eof", "too many errors", "timeout", "data rate",
                            "shutdown", "pregreet", "non-smtp command", "aborted"})
_RELAY_DENIED = "Relay access denied"
_STORE_FAILED = Reply(451, "4.3.0", "Error: queue file write error, try again later")
_AUTH_TEMPFAIL = Reply(454, "4.7.0", "Temporary authentication failure")
_RCPT_TEMPFAIL = Reply(450, "4.2.0", "Mailbox temporarily unavailable")
#: What a partial command line may hold at NEED_DATA (an AUTH line is the longest).
_LINE_SLACK = AUTH_LINE_MAX
#: What DATA/BDAT may hold beyond max_message_size (the virtual CRLF, a split terminator).
_DATA_SLACK = 8


def server_input(session: bytes, *, flags: int = S_TLS_AVAILABLE | S_AUTH_ENABLED,
                 size_sel: int = 255, max_recipients: int = 100, max_errors: int = 20,
                 line_sel: int = 0, rcpt_mask: int = 0, auth_mask: int = 0,
                 store_mask: int = 0, drain_at: int = 0, race_at: int = 0,
                 chunks: list[int] | None = None) -> bytes:
    """Encode a ``fuzz_server`` input (see ``fuzz_server`` for the meaning of each)."""
    head = bytes([flags, size_sel, max_recipients - 1, max_errors - 1, line_sel,
                  rcpt_mask, auth_mask, store_mask, drain_at, race_at])
    return head + _encode_sizes(chunks or []) + session


def _check_replies(out: bytes, who: str = "server") -> list[tuple[int, list[bytes]]]:
    """``out`` (one data_to_send()) must be whole replies: ``ddd[ -]text CRLF`` lines,
    code 200-599, one code per multi-line reply, ending with a final line; UTF-8."""
    replies: list[tuple[int, list[bytes]]] = []
    lines: list[bytes] = []
    code = 0
    pos = 0
    while pos < len(out):
        m = _REPLY_LINE.match(out, pos)
        if m is None:
            _fail(f"{who}:malformed-reply", f"bad reply bytes {out[pos:pos + 120]!r}")
        c = int(m[1])
        if lines and c != code:
            _fail(f"{who}:inconsistent-code", f"code {c} inside a {code} reply: {out!r}")
        code = c
        lines.append(m[3])
        if m[2] == b" ":
            replies.append((code, lines))
            lines = []
        pos = m.end()
    if lines:
        _fail(f"{who}:unfinished-reply", f"data_to_send() ends inside a reply: {out[-200:]!r}")
    try:
        out.decode("utf-8")
    except UnicodeDecodeError:
        _fail(f"{who}:reply-not-utf8", f"reply bytes are not UTF-8: {out[:300]!r}")
    return replies


class _ServerRun:
    """The driver: answers decisions like relay.inbound.session and checks everything."""

    def __init__(self, conn: ServerConnection, *, rcpt_mask: int, auth_mask: int,
                 store_mask: int, race_at: int, tls_fail: bool) -> None:
        self.conn = conn
        s = conn.settings
        self.settings = s
        self.rcpt_mask, self.auth_mask, self.store_mask = rcpt_mask, auth_mask, store_mask
        self.race_at = race_at
        self.tls_fail = tls_fail
        self.counts = {"rcpt": 0, "auth": 0, "store": 0, "all": 0}
        self.draining = False
        self.closing: ConnectionClosing | None = None
        self.handshake_failed = False

    def _nth(self, kind: str, mask: int) -> bool:
        """Whether this decision of ``kind`` is answered negatively (bit n % 8 of mask)."""
        n = self.counts[kind]
        self.counts[kind] = n + 1
        return bool(mask >> (n % 8) & 1)

    def flush(self) -> list[tuple[int, list[bytes]]]:
        out = self.conn.data_to_send()
        replies = _check_replies(out)
        for code, lines in replies:
            if code == 250 and b"PIPELINING" in lines:
                self._check_ehlo(lines)
        return replies

    def _check_ehlo(self, lines: list[bytes]) -> None:
        conn, s = self.conn, self.settings
        starttls = b"STARTTLS" in lines
        auth = any(line.startswith(b"AUTH ") for line in lines)
        want_starttls = s.tls_available and not conn.tls_active
        want_auth = s.auth_enabled and (conn.tls_active or s.allow_plaintext_auth)
        if starttls != want_starttls or auth != want_auth:
            _fail("server:ehlo-advertisement",
                  f"STARTTLS {starttls} (want {want_starttls}), AUTH {auth} (want "
                  f"{want_auth}) with tls_active={conn.tls_active} {s}")

    def check_bound(self) -> None:
        conn, limit = self.conn, self.settings.max_message_size
        phase = conn.phase
        if phase is Phase.DATA:  # counted unstuffed: up to a third more as received
            bound = limit + limit // 3 + _DATA_SLACK
        elif phase is Phase.BDAT:
            bound = limit + _DATA_SLACK
        else:
            bound = limit + _LINE_SLACK
        if conn.buffered_bytes > bound:
            _fail("server:buffer-bound",
                  f"buffered_bytes {conn.buffered_bytes} > {bound} in phase {phase.value} "
                  f"(max_message_size {limit})")

    def pump(self) -> bool:
        """next_event() until NEED_DATA; True once the session is over."""
        conn = self.conn
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                self.flush()
                self.check_bound()
                if self.draining and not conn.in_transaction:
                    conn.shutdown()  # what a draining session does at a command boundary
                    continue
                return False
            if isinstance(ev, ConnectionClosing):
                self.flush()
                self.closing = ev
                return True
            if isinstance(ev, HeloReceived):
                if not ev.hostname or " " in ev.hostname:
                    _fail("server:bad-helo-event", repr(ev))
                continue
            if isinstance(ev, StartTLSRequested):
                if conn.phase is not Phase.STARTTLS:
                    _fail("server:starttls-phase", f"phase {conn.phase} at StartTLSRequested")
                replies = self.flush()
                if not replies or replies[-1][0] != 220:
                    _fail("server:starttls-reply", f"last reply before TLS: {replies[-1:]}")
                if self.tls_fail:
                    self.handshake_failed = True
                    return True  # relay.inbound closes the socket; nothing more is fed
                conn.tls_established()
                if not conn.tls_active or conn.phase is not Phase.COMMAND or conn.helo:
                    _fail("server:tls-reset", f"after tls_established: phase {conn.phase}")
                continue
            # a decision
            self.counts["all"] += 1
            race = self.counts["all"] == self.race_at
            if race:
                # The watchdog fired while the I/O layer was deciding: the decision
                # that follows must be a no-op.
                conn.timeout_expired()
            if isinstance(ev, RecipientRequested):
                self._check_recipient(ev)
                if self._nth("rcpt", self.rcpt_mask):
                    reply = (Reply(554, "5.7.1", f"<{ev.address}>: {_RELAY_DENIED}")
                             if self.counts["rcpt"] % 2 else _RCPT_TEMPFAIL)
                    conn.reject_recipient(reply)
                else:
                    conn.accept_recipient()
            elif isinstance(ev, AuthRequested):
                if ev.mechanism not in ("PLAIN", "LOGIN") or not isinstance(ev.password, bytes):
                    _fail("server:bad-auth-event", repr(ev))
                if self._nth("auth", self.auth_mask):
                    conn.auth_failed() if self.counts["auth"] % 2 else conn.auth_failed(
                        _AUTH_TEMPFAIL)
                else:
                    conn.auth_succeeded()
            elif isinstance(ev, MessageReceived):
                self._check_message(ev)
                if self._nth("store", self.store_mask):
                    conn.message_failed(_STORE_FAILED)
                else:
                    conn.message_stored("ABC123")
            else:
                _fail("server:unknown-event", repr(ev))
            if race and not conn.closed:
                _fail("server:race", "timeout_expired() during a decision did not close")

    def _check_recipient(self, ev: RecipientRequested) -> None:
        if not ev.address or (ev.mailbox is not None and ev.mailbox.address != ev.address):
            _fail("server:bad-rcpt-event", repr(ev))
        try:
            ev.address.encode("utf-8")
        except UnicodeEncodeError:
            _fail("server:rcpt-not-utf8", repr(ev))

    def _check_message(self, ev: MessageReceived) -> None:
        s = self.settings
        data = ev.data
        if not ev.recipients:
            _fail("server:message-without-recipients", repr(ev)[:300])
        if len(data) > s.max_message_size:
            _fail("server:message-too-big", f"{len(data)} > {s.max_message_size}")
        if ev.declared_size is not None and ev.declared_size > s.max_message_size:
            _fail("server:declared-size", f"SIZE={ev.declared_size} accepted")
        if not ev.chunked and ev.body == "BINARYMIME":
            _fail("server:binarymime-by-data", "BODY=BINARYMIME message came by DATA")
        if ev.body != "BINARYMIME":
            crlf = data.count(b"\r\n")
            if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
                _fail("server:bare-cr-lf-accepted", f"message with bare CR/LF: {data[:200]!r}")
            longest = max(map(len, data.split(b"\r\n")))
            if longest > s.max_line_length:
                _fail("server:long-line-accepted",
                      f"line of {longest} > {s.max_line_length} octets accepted")
        # What relay.inbound.session stores must survive the spool's encoding.
        env = Envelope(queue_id="ABC123", sender=ev.sender, recipients=ev.recipients,
                       received_at=0.0, body=ev.body, smtputf8=ev.smtputf8,
                       declared_size=ev.declared_size, ret=ev.ret, envid=ev.envid)
        try:
            raw = msgspec.msgpack.encode(env)
        except (UnicodeEncodeError, msgspec.EncodeError) as e:
            _fail("server:envelope-not-storable", f"{e}: {env!r}"[:400])
        if msgspec.msgpack.decode(raw, type=Envelope) != env:
            _fail("server:envelope-roundtrip", repr(env)[:400])

    def check_closed(self) -> None:
        """ConnectionClosing is terminal and sticky; input and decisions are ignored."""
        conn, ev = self.conn, self.closing
        assert ev is not None
        if ev.reason not in _CLOSE_REASONS:
            _fail("server:close-reason", repr(ev))
        for _ in range(2):
            if conn.next_event() is not ev:
                _fail("server:closing-not-sticky", "next_event() changed after closing")
        conn.receive_data(b"NOOP\r\nQUIT\r\n")
        conn.receive_data(b"")
        conn.accept_recipient()
        conn.reject_recipient(_RCPT_TEMPFAIL)
        conn.auth_succeeded()
        conn.auth_failed()
        conn.message_stored("ABC123")
        conn.message_failed(_STORE_FAILED)
        conn.tls_established()
        conn.abort(None)
        if conn.next_event() is not ev or not conn.closed or conn.phase is not Phase.CLOSED:
            _fail("server:closing-not-sticky", "state changed after closing")
        out = conn.data_to_send()
        if out:
            _fail("server:output-after-close", f"replies after ConnectionClosing: {out!r}")
        if conn.buffered_bytes:
            _fail("server:buffer-after-close", f"{conn.buffered_bytes} bytes kept")


def fuzz_server(data: bytes) -> None:
    """``ServerConnection`` driven like ``relay.inbound.session`` over arbitrary input.

    Header: flags (``S_*``), max_message_size selector, max_recipients - 1,
    max_errors - 1, max_line_length selector (0: 998, else 4 * n), then masks saying
    which RCPT / AUTH / message decisions are refused (bit n % 8 for the n-th), the chunk
    after which the session drains (0: never), the decision during which the watchdog
    fires (0: never), the chunk sizes; then the client's bytes, fed chunk by chunk and
    followed by EOF.

    Invariants: only well-formed replies come out (``ddd[ -]...CRLF`` lines, 2xx-5xx,
    one code per multi-line reply, whole replies per data_to_send(), UTF-8); EHLO
    advertises STARTTLS/AUTH exactly when allowed; no exception (LocalProtocolError
    included) escapes for a driver that follows the contract; ``buffered_bytes`` stays
    within max_message_size plus a small bound at every NEED_DATA; accepted messages
    respect the size, bare CR/LF (none left, also with bare_newline = normalize) and
    line-length rules and their envelope is storable;
    EOF ends the session; ConnectionClosing is sticky and ignores input and decisions.
    """
    r = Reader(data)
    flags = r.byte()
    size_sel, rcpt_sel, err_sel, line_sel = r.byte(), r.byte(), r.byte(), r.byte()
    rcpt_mask, auth_mask, store_mask = r.byte(), r.byte(), r.byte()
    drain_at, race_at = r.byte(), r.byte()
    sizes = r.sizes()
    payload = r.rest()
    settings = ServerSettings(
        hostname=HOST,
        max_message_size=10240000 if flags & S_LARGE else 16 * (size_sel + 1),
        max_recipients=rcpt_sel + 1,
        max_line_length=998 if line_sel == 0 else 4 * line_sel,
        max_errors=err_sel + 1,
        tls_available=bool(flags & S_TLS_AVAILABLE),
        allow_plaintext_auth=bool(flags & S_PLAINTEXT_AUTH),
        auth_enabled=bool(flags & S_AUTH_ENABLED),
        bare_newline="normalize" if flags & S_NORMALIZE else "reject",
    )
    conn = ServerConnection(settings, tls_active=bool(flags & S_TLS_ACTIVE))
    run = _ServerRun(conn, rcpt_mask=rcpt_mask, auth_mask=auth_mask, store_mask=store_mask,
                     race_at=race_at, tls_fail=bool(flags & S_TLS_FAIL))
    chunks = list(_chunks(payload, sizes))
    pregreet = bool(flags & S_PREGREET and chunks)
    if pregreet:
        conn.receive_data(chunks.pop(0))
    conn.start()
    replies = run.flush()
    want = 554 if pregreet else 220
    if [code for code, _ in replies] != [want]:
        _fail("server:greeting", f"start() queued {replies!r}, wanted one {want}")
    done = run.pump()
    for i, chunk in enumerate(chunks, 1):
        if done:
            break
        conn.receive_data(chunk)
        if i == drain_at:
            run.draining = True
        done = run.pump()
    if run.handshake_failed:
        return
    if not done:
        conn.receive_data(b"")
        done = run.pump()
        if not done:
            _fail("server:eof-not-closing", f"EOF fed, phase {conn.phase.value}")
    run.check_closed()


# -- 2. client ----------------------------------------------------------------------------

C_STARTTLS = 1  # STARTTLS when offered (tls = opportunistic)
C_BEHIND = 2  # begin the next transaction behind the current end of data when possible
C_QUIT = 4  # QUIT when all transactions are done
C_TLS_FAIL = 8  # the handshake after 220 fails: connection_lost

_SENDERS = ["sender@example.com", "", "s\u00e9nder@ex\u00e4mple.com", '"quoted sender"@example.com',
            "a\r\nRCPT TO:<evil@example.org>", "bounce+tag=x@[192.0.2.1]",
            "x" * 64 + "@" + "d" * 60 + ".example", "postmaster@example.com"]
_RCPTS = ["rcpt@example.net", "other@example.net", "\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a",
          '"a b"@example.net', "bad\r\n@example.net", "user%host@example.net",
          "z" * 64 + "@example.net", "postmaster"]
_NOTIFY: list[list[str] | None] = [None, ["NEVER"], ["SUCCESS", "FAILURE"], ["DELAY"]]
_ORCPT: list[str | None] = [None, "rfc822;orig@example.org", "rfc822;\u00fcni@example.org",
                            "rfc822;a+b=c d@example.org"]
_BODIES = [None, "7BIT", "8BITMIME", "BINARYMIME"]
_RETS = [None, "FULL", "HDRS", None]
_ENVIDS = [None, "ENV-1", "\u00fcnicode-envid", "a+b=c d", "x" * 100]
_DATAS = [
    b"Subject: hi\r\n\r\nHello\r\n",
    b"",
    b".\r\n..dots\r\n.\r\n.",
    b"Subject: \xc3\xa9t\xc3\xa9\r\n\r\n8bit \xff body\r\n",
    b"no final CRLF",
    b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 60,
    b"Subject: =?utf-8?q?x?=\r\n\r\nline\r\n.\r\n",
    b"\r\n.\r\n",
]


def client_input(replies: bytes, *, flags: int = 0, sender: int = 0, envelope: int = 0,
                 envid: int = 0, data: int = 0, transactions: int = 1,
                 recipients: list[int] | None = None,
                 chunks: list[int] | None = None) -> bytes:
    """Encode a ``fuzz_client`` input (see ``fuzz_client``). ``envelope``: bits 0-1
    body, bit 2 smtputf8, bits 3-4 ret; ``recipients``: selector bytes (bits 0-2
    address, 3-4 notify, 5-6 orcpt)."""
    rcpts = recipients or [0]
    head = bytes([flags, sender, envelope, envid, data, transactions - 1, len(rcpts) - 1,
                  *rcpts])
    return head + _encode_sizes(chunks or []) + replies


def fuzz_client(data: bytes) -> None:
    """``SmtpClient`` driven like ``relay.outbound.session``/``destination`` against
    arbitrary server replies.

    Header: flags (``C_*``), sender, envelope bits, envid and message selectors, number
    of transactions - 1 (0-3), number of recipients - 1 (0-7) and a selector byte per
    recipient, the chunk sizes; then the server's bytes. Transaction t sends all
    recipients rotated by t (so outcome order is checked). The driver says STARTTLS
    when asked and offered, begins transactions whenever ``usable`` (or
    ``can_begin_behind`` with C_BEHIND), takes outcomes as soon as
    ``transaction_done``, feeds every chunk, then ``connection_lost()``.

    Invariants: begin_transaction/receive_data never raise; every begun transaction
    yields exactly one RecipientOutcome per requested recipient, in the order given,
    with a code 200-599; after connection_lost nothing is awaited, nothing is left to
    take, the phase is CLOSED or FAILED and more input is ignored.
    """
    r = Reader(data)
    flags = r.byte()
    sender = _SENDERS[r.byte() % len(_SENDERS)]
    ebits = r.byte()
    envid = _ENVIDS[r.byte() % len(_ENVIDS)]
    message = _DATAS[r.byte() % len(_DATAS)]
    ntx = r.byte() % 4 + 1
    recipients = []
    for _ in range(r.byte() % 8 + 1):
        b = r.byte()
        recipients.append(Recipient(address=_RCPTS[b & 7], notify=_NOTIFY[b >> 3 & 3],
                                    orcpt=_ORCPT[b >> 5 & 3]))
    sizes = r.sizes()
    payload = r.rest()
    envelope = Envelope(queue_id="ABC123", sender=sender, recipients=recipients,
                        received_at=0.0, body=_BODIES[ebits & 3], smtputf8=bool(ebits & 4),
                        ret=_RETS[ebits >> 3 & 3], envid=envid)
    n = len(recipients)

    client = SmtpClient("relay.example.net")
    begun: deque[list[int]] = deque()
    todo = ntx
    starttls_tried = False

    def take() -> None:
        while client.transaction_done:
            if not begun:
                _fail("client:extra-outcomes", "outcomes of a transaction never begun")
            _check_outcomes(client.take_outcomes(), begun.popleft())

    def act() -> bool:
        """Do what the delivery engine would do now; False once the session is over."""
        nonlocal todo, starttls_tried
        while True:
            take()
            phase = client.phase
            if phase is ClientPhase.TLS:
                if flags & C_TLS_FAIL:
                    client.connection_lost(421, "4.7.5", "TLS handshake failed")
                    return False
                client.tls_established()
                continue
            if (phase is ClientPhase.READY and flags & C_STARTTLS and not starttls_tried
                    and not client.tls_active and client.has("STARTTLS")):
                starttls_tried = True
                client.starttls()
                continue
            if todo and (client.usable or (flags & C_BEHIND and client.can_begin_behind)):
                rcpts = [(ntx - todo + j) % n for j in range(n)]
                todo -= 1
                begun.append(rcpts)
                client.begin_transaction(envelope, rcpts, message)
                continue
            if not todo and flags & C_QUIT and client.usable:
                client.quit()
            return True

    for chunk in _chunks(payload, sizes):
        if not act():
            break
        out = client.receive_data(chunk)
        if not isinstance(out, bytes):
            _fail("client:receive-data-type", repr(out))
    act()
    client.connection_lost()
    take()
    if begun:
        _fail("client:missing-outcomes", f"{len(begun)} transaction(s) without outcomes")
    if client.awaiting_reply or client.transaction_done:
        _fail("client:awaiting-after-lost", f"phase {client.phase}: still awaiting")
    if client.phase not in (ClientPhase.CLOSED, ClientPhase.FAILED):
        _fail("client:phase-after-lost", f"phase {client.phase} after connection_lost")
    if client.receive_data(b"250 2.0.0 Ok\r\n") or client.quit() or client.usable:
        _fail("client:alive-after-lost", "the client still talks after connection_lost")
    _ = client.activity  # must not raise


def _check_outcomes(outcomes: list[RecipientOutcome], rcpts: list[int]) -> None:
    if [o.index for o in outcomes] != rcpts:
        _fail("client:outcome-mismatch",
              f"outcomes for {[o.index for o in outcomes]}, recipients {rcpts}")
    for o in outcomes:
        if not 200 <= o.code <= 599 or not isinstance(o.text, str):
            _fail("client:outcome-code", repr(o))
        _ = o.kind, o.reply_line


# -- 3. address ---------------------------------------------------------------------------

_ADDRESS_ERRORS = (A.AddressError, A.ParamError, ValueError)


def fuzz_address(data: bytes) -> None:
    """``relay.smtp.address`` on arbitrary text (the bytes decoded UTF-8 with
    surrogateescape, as the server decodes command lines).

    Invariants: only AddressError/ParamError/ValueError come out;
    ``xtext_decode(xtext_encode(s)) == s`` for every s that is valid UTF-8, and
    xtext_encode gives printable ASCII; what parses re-parses to the same thing
    (a mailbox from its ``address``, a path from ``<address>``, params, NOTIFY and
    ORCPT from their canonical forms); Mailbox properties never raise.
    """
    text = data.decode("utf-8", "surrogateescape")
    try:
        text.encode("utf-8")
        valid = True
    except UnicodeEncodeError:
        valid = False

    # xtext round trip
    if valid:
        enc = A.xtext_encode(text)
        if not (enc.isascii() and all(33 <= ord(c) <= 126 for c in enc)):
            _fail("address:xtext-encode-charset", f"{text!r} -> {enc!r}")
        try:
            dec = A.xtext_decode(enc)
        except ValueError as e:
            _fail("address:xtext-roundtrip", f"{text!r} -> {enc!r} -> {e}")
        if dec != text:
            _fail("address:xtext-roundtrip", f"{text!r} -> {enc!r} -> {dec!r}")
    try:
        decoded = A.xtext_decode(text)
    except ValueError:
        pass
    else:
        if A.xtext_decode(A.xtext_encode(decoded)) != decoded:
            _fail("address:xtext-roundtrip", f"{text!r} -> {decoded!r} does not round-trip")

    # paths and mailboxes
    for smtputf8 in (False, True):
        try:
            mb = A.parse_mailbox(text, smtputf8=smtputf8)
        except _ADDRESS_ERRORS:
            pass
        else:
            _touch_mailbox(mb)
            again = A.parse_mailbox(mb.address, smtputf8=smtputf8)
            if again != mb:
                _fail("address:mailbox-reparse", f"{text!r}: {mb!r} then {again!r}")
        for allow_null in (False, True):
            for allow_postmaster in (False, True):
                try:
                    p = A.parse_path(text, smtputf8=smtputf8, allow_null=allow_null,
                                     allow_postmaster=allow_postmaster)
                except _ADDRESS_ERRORS:
                    continue
                if p is None:
                    if text != "<>" or not allow_null:
                        _fail("address:null-path", f"{text!r} parsed as the null path")
                    continue
                _touch_mailbox(p)
                again = A.parse_path(f"<{p.address}>", smtputf8=smtputf8,
                                     allow_postmaster=allow_postmaster)
                if again is None or (again.local_part, again.domain) != (p.local_part,
                                                                           p.domain):
                    _fail("address:path-reparse", f"{text!r}: {p!r} then {again!r}")

    try:
        path, rest = A.split_path(text)
    except _ADDRESS_ERRORS:
        pass
    else:
        if not (path.startswith("<") and path.endswith(">")) or rest != rest.strip(" "):
            _fail("address:split-path", f"{text!r} -> {path!r}, {rest!r}")

    try:
        params = A.parse_params(text)
    except _ADDRESS_ERRORS:
        pass
    else:
        canon = " ".join(k if v is None else f"{k}={v}" for k, v in params.items())
        if A.parse_params(canon) != params or any(k != k.upper() for k in params):
            _fail("address:params-reparse", f"{text!r} -> {params!r}")

    try:
        notify = A.parse_notify(text)
    except _ADDRESS_ERRORS:
        pass
    else:
        if A.parse_notify(",".join(notify)) != notify:
            _fail("address:notify-reparse", f"{text!r} -> {notify!r}")

    try:
        orcpt = A.parse_orcpt(text)
    except _ADDRESS_ERRORS:
        pass
    else:
        try:
            again_orcpt = A.parse_orcpt(A.format_orcpt(orcpt))
        except ValueError as e:
            _fail("address:orcpt-roundtrip", f"{text!r} -> {orcpt!r} -> {e}")
        if again_orcpt != orcpt:
            _fail("address:orcpt-roundtrip", f"{text!r} -> {orcpt!r} -> {again_orcpt!r}")


def _touch_mailbox(mb: A.Mailbox) -> None:
    for prop in ("address", "routing_domain", "is_address_literal", "is_quoted",
                 "unquoted_local_part", "has_routing_chars", "is_postmaster", "is_ascii"):
        getattr(mb, prop)
    str(mb)


# -- 4. replies ---------------------------------------------------------------------------


def fuzz_replies(data: bytes) -> None:
    """``relay.smtp.replies.parse_reply`` on arbitrary lists of lines.

    Byte 0: bit 0 ``enhanced``, bit 1 split on NUL instead of LF (so lines may hold CR
    and LF inside). The rest is split into the lines.

    Invariants: only ReplyParseError comes out; a parsed Reply's ``to_bytes()`` is
    well-formed and parses back (same ``enhanced``) to an equal Reply; the helpers the
    client applies to replies (``reply_line``, ``reply_text``, EHLO extensions, str)
    never raise and stay on one line.
    """
    r = Reader(data)
    mode = r.byte()
    enhanced = bool(mode & 1)
    sep = b"\0" if mode & 2 else b"\n"
    lines = r.rest().split(sep)
    try:
        reply = parse_reply(lines, enhanced=enhanced)
    except ReplyParseError:
        return
    wire = reply.to_bytes()
    if len(_check_replies(wire, "replies")) != 1:
        _fail("replies:not-one-reply", f"{lines!r} -> {wire!r}")
    again = parse_reply(wire.split(b"\r\n")[:-1], enhanced=enhanced)
    if again != reply:
        inner = any(b"\r" in ln.rstrip(b"\r\n") or b"\n" in ln.rstrip(b"\r\n") for ln in lines)
        _fail("replies:roundtrip-inner-cr-lf" if inner else "replies:roundtrip",
              f"{lines!r} -> {reply!r} -> {wire!r} -> {again!r}")
    for text in (reply_line(reply), reply_text(reply), str(reply)):
        if "\r" in text or "\n" in text:
            _fail("replies:multiline-text", f"{text!r}")
    parse_ehlo_extensions(reply)
    _ = reply.text, hash(reply)


# -- 5. dsn -------------------------------------------------------------------------------

D_DELAYED = 1
D_DELAY_DEFAULT = 2
D_SMTPUTF8 = 4
D_BOUNCE = 8
D_HOP = 16  # reached an MX: "smtp; ..." and Remote-MTA (else "x-local; ...")
D_SMALL_FULL = 32  # max_full_return = 64 (else the default 1 MiB)
D_RETS = [None, "FULL", "HDRS", "FULL"]
_DSN_CLASSES = (2, 4, 5, 0)
_DSN_SENDERS = ["sender@example.com", "", "s\u00e9nder@ex\u00e4mple.com",
                '"quoted sender"@example.com', "x" * 64 + "@" + "d" * 180 + ".example",
                "bounce+tag=x@[192.0.2.1]", '"a\\"b c"@example.com', "u@xn--bcher-kva.example"]
_DSN_RCPTS = ["rcpt@example.net", "\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a", '"a b"@example.net',
              "z" * 64 + "@" + "e" * 200 + ".example", "user%host@example.net", "postmaster",
              "r\u00e9@example.net", "o'brien@example.net"]
_DSN_MTAS = ["mx.example.net", "mx1." + "m" * 240 + ".example", "[192.0.2.25]",
             "mx.\u00e9xample.net"]


def dsn_input(original: bytes, *, flags: int = D_HOP, ret: int = 0, sender: int = 0,
              recipients: list[int] | None = None,
              failures: list[tuple[int, int, int, int]] | None = None,
              diagnostic: bytes = b"550 5.1.1 No such user", mta: int = 0,
              envid: int = 0) -> bytes:
    """Encode a ``fuzz_dsn`` input. ``failures``: (recipient index, status class 2/4/5
    or 0 for none, subject, detail) per failure; ``diagnostic`` at most 1020 bytes."""
    rcpts = recipients or [0]
    fails = failures if failures is not None else [(0, 5, 1, 1)]
    if len(diagnostic) > 1020:
        raise ValueError("diagnostic too long")
    diag = diagnostic + b" " * (-len(diagnostic) % 4)
    head = bytes([flags, ret, sender, mta, envid, len(rcpts) - 1, *rcpts, len(fails)])
    for index, cls, subject, detail in fails:
        head += bytes([index, _DSN_CLASSES.index(cls), subject, detail])
    return head + bytes([len(diag) // 4]) + diag + original


def _dsn_bare(text: bytes) -> bool:
    crlf = text.count(b"\r\n")
    return text.count(b"\r") != crlf or text.count(b"\n") != crlf


def fuzz_dsn(data: bytes) -> None:
    """``relay.outcomes.dsn.build_dsn`` with arguments as ``relay.outcomes.judge.failure_dsn``
    makes them, over an arbitrary original message, diagnostic text and statuses.

    Header: flags (``D_*``), RET selector, sender, remote MTA and ENVID selectors,
    number of recipients - 1 (0-3) and a selector byte per recipient (bits 0-2 address,
    3-4 NOTIFY, 5-6 ORCPT), number of failures (0-7) and four bytes per failure
    (recipient index, which may be out of range; status class 2/4/5/none by n % 4,
    subject, detail), then the diagnostic text's length / 4 and the text (decoded as a remote
    reply is, UTF-8 with replacement); the rest is the original message.

    Invariants: build_dsn raises nothing; it returns None exactly when no DSN is owed
    (null sender, a DSN itself, NOTIFY); otherwise the data has CRLF line endings only
    and no line over 998 octets, ``email.message_from_bytes(policy=default)`` parses it
    as a multipart/report with a message/delivery-status part and readable headers,
    and the DSN envelope (null sender, to the original sender, is_bounce) is storable.
    Keys name where a bad line comes from (``-original``: a line of the original, else
    the field: ``dsn:line-too-long:Diagnostic-Code``, ``...:recipient`` for the text part).
    """
    r = Reader(data)
    flags = r.byte()
    ret = D_RETS[r.byte() % 4]
    sender = _DSN_SENDERS[r.byte() % len(_DSN_SENDERS)]
    mta = _DSN_MTAS[r.byte() % len(_DSN_MTAS)]
    envid = _ENVIDS[r.byte() % len(_ENVIDS)]
    recipients = []
    for _ in range(r.byte() % 4 + 1):
        b = r.byte()
        recipients.append(Recipient(address=_DSN_RCPTS[b & 7], notify=_NOTIFY[b >> 3 & 3],
                                    orcpt=_ORCPT[b >> 5 & 3]))
    specs = [(r.byte(), r.byte(), r.byte(), r.byte()) for _ in range(r.byte() % 8)]
    diag_text = r.take(r.byte() * 4).decode("utf-8", "replace")
    original = r.rest()
    now = 1_790_000_000.0
    envelope = Envelope(queue_id="ORIG123", sender=sender, recipients=recipients,
                        received_at=now - 3600, ret=ret, envid=envid,
                        smtputf8=bool(flags & D_SMTPUTF8), is_bounce=bool(flags & D_BOUNCE))
    hop = bool(flags & D_HOP)
    failures = []
    for index, cls_b, subject, detail in specs:
        cls = _DSN_CLASSES[cls_b % 4]
        enhanced = f"{cls}.{subject % 8}.{detail}" if cls else None
        code = (cls or (4, 5)[cls_b >> 2 & 1]) * 100 + 50 + detail % 10
        o = RecipientOutcome(index % (len(recipients) + 1), code, enhanced, diag_text)
        fallback = "4.4.7" if flags & D_DELAYED else ("5.0.0" if o.code >= 500 else "4.0.0")
        failures.append(FailedRecipient(
            index=o.index, status=o.enhanced or fallback,
            diagnostic=f"smtp; {o.reply_line}" if hop else f"x-local; {o.reply_line}",
            remote_mta=f"dns; {mta}" if hop else "", last_attempt=now))
    action = "delayed" if flags & D_DELAYED else "failed"
    msg = build_dsn(envelope=envelope, data=original, failures=failures, action=action,
                    reporting_mta=HOST, queue_id="DSN456", arrival=envelope.received_at,
                    now=now, delay_default=bool(flags & D_DELAY_DEFAULT),
                    max_full_return=64 if flags & D_SMALL_FULL else 1024 * 1024)
    owed = (bool(sender) and not envelope.is_bounce and any(
        0 <= f.index < len(recipients)
        and dsn_wanted(recipients[f.index], action, delay_default=bool(flags & D_DELAY_DEFAULT))
        for f in failures))
    if (msg is not None) != owed:
        _fail("dsn:owed-mismatch", f"build_dsn returned {type(msg).__name__}, owed={owed}")
    if msg is None:
        return
    out = msg.data
    orig_lines = set(original.split(b"\r\n"))
    if _dsn_bare(out):
        key = "dsn:bare-cr-lf-original" if _dsn_bare(original) else "dsn:bare-cr-lf"
        _fail(key, f"DSN has bare CR/LF (original {original[:80]!r})")
    for line in out.split(b"\r\n"):
        if len(line) > 998:
            if line in orig_lines:
                key = "dsn:line-too-long-original"
            else:
                m = re.match(rb"([A-Za-z-]{1,40}):", line)
                where = "recipient" if line.startswith(b"<") else (
                    m.group(1).decode() if m else "text")
                key = f"dsn:line-too-long:{where}"
            _fail(key, f"line of {len(line)} octets: {line[:120]!r}...")
    parsed = email.message_from_bytes(out, policy=email.policy.default)
    if parsed.get_content_type() != "multipart/report" or not parsed.is_multipart():
        _fail("dsn:not-multipart-report", f"content type {parsed.get_content_type()}")
    parts = parsed.get_payload()
    if len(parts) != 3 or parts[1].get_content_type() != "message/delivery-status":
        _fail("dsn:parts", f"parts: {[p.get_content_type() for p in parts]}")
    if parsed.defects:
        _fail("dsn:defects", f"top-level defects {parsed.defects}")
    for _name, value in parsed.items():
        _ = str(value)
    env = msg.envelope
    if env.sender or [x.address for x in env.recipients] != [sender] or not env.is_bounce:
        _fail("dsn:envelope", repr(env))
    msgspec.msgpack.encode(env)


# -- 6. config ----------------------------------------------------------------------------


def fuzz_config(data: bytes) -> None:
    """``relay.config.decode_config`` on arbitrary bytes (seeded with conf/*.toml).

    Invariants: only ConfigError comes out; and a Config it returns is usable: what the
    worker derives from it at start-up and per destination (sizes, networks, the
    ServerSettings of the listener, every effective throttle and its rates, host:port
    values) raises nothing.
    """
    try:
        cfg = relay_config.decode_config(data, "fuzz.toml")
    except relay_config.ConfigError:
        return
    cfg.inbound.max_message_bytes()
    cfg.spool.map_size_bytes()
    cfg.relay.networks()
    cfg.server.resolved_workers()
    server_settings(cfg.inbound, hostname=cfg.server.hostname or HOST,
                    tls_available=bool(cfg.inbound.tls_cert))
    for dest in ["example.com", "sub.example.com", *cfg.outbound.domains]:
        t = cfg.outbound.throttle_for(dest)
        rate_from_config(t.max_message_rate)
        rate_from_config(t.max_connection_rate)
    for hostport in [*cfg.inbound.listen, *cfg.outbound.resolvers,
                     *(h for route in cfg.outbound.routes for h in route.hosts)]:
        relay_config.parse_hostport(hostport)
    if cfg.outbound.smart_host:
        relay_config.parse_hostport(cfg.outbound.smart_host)


# -- 7. HTTP injection payloads -------------------------------------------------------------


def fuzz_injection(data: bytes) -> None:
    """SparkPost's (first byte even) or KumoMTA's (odd) payload decoding, templating and
    MIME building on arbitrary bytes (``relay.http.sparkpost`` / ``relay.http.kumo``).

    Invariants: only PayloadError comes out; every rendered message is CRLF-only with
    lines of at most 998 octets and a header section the ``email`` package parses with
    the same number of header fields, and its envelope recipient is a valid address.
    """
    if not data:
        return
    render = sparkpost_injection if data[0] % 2 == 0 else kumo_injection
    try:
        injection = render(data[1:], now=1_800_000_000.0, max_recipients=50)
    except PayloadError:
        return
    for msg in injection.messages:
        raw = msg.data
        if raw.replace(b"\r\n", b"").count(b"\n") or raw.replace(b"\r\n", b"").count(b"\r"):
            _fail("injection:bare-newline", repr(raw[:200]))
        if any(len(line) > 998 for line in raw.split(b"\r\n")):
            _fail("injection:long-line", repr(raw[:200]))
        if "@" not in msg.address or any(c in msg.address for c in " <>\r\n"):
            _fail("injection:bad-address", repr(msg.address))
        head = raw.partition(b"\r\n\r\n")[0]
        parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
        fields = sum(1 for line in head.split(b"\r\n") if line and line[:1] not in b" \t")
        if len(parsed.keys()) != fields or parsed.defects:
            _fail("injection:header-section", repr(head[:300]))


TARGETS: dict[str, Callable[[bytes], None]] = {
    "server": fuzz_server,
    "client": fuzz_client,
    "address": fuzz_address,
    "replies": fuzz_replies,
    "dsn": fuzz_dsn,
    "config": fuzz_config,
    "injection": fuzz_injection,
}

#: libFuzzer -max_len per target: long enough for real sessions and the shipped config.
MAX_LEN = {"server": 8192, "client": 4096, "address": 1024, "replies": 4096, "dsn": 8192,
           "config": 16384, "injection": 8192}
