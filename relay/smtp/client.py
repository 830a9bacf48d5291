"""Sans-I/O SMTP client: the outgoing side of the protocol as a pure state machine.

Why sans-I/O: the delivery path is the relay's hot loop and its hardest protocol code
(pipelining, per-recipient outcomes, 421 at any point). Keeping it free of sockets, trio
and clocks makes every branch unit-testable by feeding reply bytes, and lets the trio
driver (``relay.outbound.session``) stay a thin loop::

    client = SmtpClient("relay.example.net")      # waits for the greeting
    out = client.receive_data(greeting_bytes)     # -> b"EHLO relay.example.net\\r\\n"
    ...
    out = client.begin_transaction(envelope, [0, 1], data)   # one write (PIPELINING)
    while client.awaiting_reply:
        out = client.receive_data(await read())   # may return bytes to send (body, RCPT)
    outcomes = client.take_outcomes()

Contract:

* ``receive_data`` consumes any number of bytes (partial lines, several replies at once)
  and returns the bytes to write next (``b""`` if nothing). It never raises for bad
  remote input: a malformed reply puts the client in ``Phase.FAILED`` and fails every
  in-flight recipient transiently (``4.5.0``), like Postfix's "malformed SMTP response".
* A 421 reply at any point means the server is closing: the phase becomes
  ``Phase.CLOSED`` and all recipients without a final outcome get that 421 (transient).
* ``connection_lost(reply)`` is how the driver reports EOF, a reset or a timeout.
* With PIPELINING, MAIL + every RCPT + DATA go out in one write (RFC 2920) and replies
  are matched in order; without it, commands go one at a time.
* With PIPELINING and CHUNKING, the body goes in that same write as ``BDAT <size> LAST``
  (RFC 3030; Exim's client does the same): one round trip per message instead of two,
  and no dot-stuffing. If MAIL or every RCPT fails, the server discards the chunk and
  answers the BDAT with an error (RFC 3030 section 2 requires servers that pipeline to
  read and discard it), and the next transaction starts with RSET.
* With PIPELINING (and without CHUNKING) the next transaction may be begun while the
  current one waits only for its end-of-data reply (``can_begin_behind``): its MAIL,
  RCPT and DATA then travel right behind the previous message's final dot, and the
  server answers both in one flight. RFC 2920 3.1 allows exactly that ("the RSET/MAIL
  FROM sequence necessary to initiate a new message transaction can be placed in the
  same group as the final transfer of the headers and body of the previous message";
  Exim's client does the same). On a reused connection a message then costs one round
  trip instead of two. Outcomes are collected in the order transactions were begun.
* After a transaction that did not reach the end-of-data reply (MAIL failed, every RCPT
  failed, DATA refused), the server still holds a half-open transaction, so the next
  ``begin_transaction`` starts with RSET (pipelined in the same write when the server
  offers PIPELINING: saves a round trip per failed transaction on bulk sends).

Local decisions, documented because an RFC leaves a choice:

* 8-bit content (``BODY=8BITMIME``/``BINARYMIME`` declared) to a server without
  8BITMIME: if the bytes are in fact ASCII (``bytes.isascii``, C speed) the message is
  sent without ``BODY=``; otherwise it fails permanently with ``554 5.6.3`` (RFC 6152
  allows bouncing instead of downgrading; MIME downgrade is not implemented).
  BINARYMIME (refused by the relay's own server, but a spool may hold it) is sent as
  ``BODY=8BITMIME``.
* Content always leaves as CRLF lines (``crlf_lines``): a bare CR or LF, whatever put it
  in the spool, is turned into CRLF before dot-stuffing, so no end-of-data lookalike
  (``LF . LF``, ``CR LF . LF``, ...) can reach a server that ends data on one (SMTP
  smuggling). The same bytes go out over BDAT, and SIZE counts them.
* SMTPUTF8 is *needed* only when the envelope was received with SMTPUTF8 and an address
  or a header is really non-ASCII (Postfix's autodetect). Needed and not offered:
  permanent ``554 5.6.7``. Offered and the envelope had it: the parameter is sent.
* DSN parameters (RET, ENVID, NOTIFY, ORCPT) are passed only when the server offers DSN;
  an ORCPT that is not ASCII is dropped (xtext cannot carry it without RFC 6533).
* A message larger than the server's announced SIZE fails permanently with
  ``552 5.3.4`` without being sent (SIZE 0 or absent means no limit).
* A body not ending in CRLF gets CRLF appended before the terminating ``.CRLF``.
* A greeting or EHLO reply whose first word is our own HELO name means the mail came
  back to us (RFC 5321 6.3; Postfix: "mail for ... loops back to myself"): the session
  fails with ``554 5.4.6`` and the delivery layer bounces instead of retrying.
* AUTH (RFC 4954, for relaying through a provider's smart host): ``auth(credentials)``
  from READY, only once TLS is active -- over plaintext the client refuses to send the
  credentials at all (``auth_unavailable``, 4.7.11), whatever the driver asks. PLAIN
  (RFC 4616, as an initial response: one round trip) when offered, else LOGIN (the
  username and the password each answer one 334). No AUTH offered, or no mechanism in
  common: nothing is sent (``auth_unavailable``, 4.7.0): with credentials configured
  the server is not the one they were meant for, and mail sent unauthenticated would
  be refused as relaying. The server's refusal (535 ...) is kept in ``auth_refused``
  and the client is READY again; the driver decides (it defers: Postfix's
  ``smtp_sasl_auth_soft_bounce = yes``). The password is held only while its exchange
  runs, and no text the client produces contains it.
"""

from __future__ import annotations

import base64
import enum
from collections import deque
from dataclasses import dataclass, field

from relay.model import Envelope, RecipientOutcome, ascii_int
from relay.smtp.address import format_orcpt, xtext_encode
from relay.smtp.lines import bare_line_breaks
from relay.smtp.replies import Reply, ReplyParseError, parse_reply

__all__ = [
    "LOOP_STATUS",
    "Credentials",
    "Phase",
    "RecipientOutcome",
    "SmtpClient",
    "crlf_lines",
    "dot_stuff",
    "parse_ehlo_extensions",
    "reply_line",
    "reply_text",
]

#: The enhanced status of a mail loop (RFC 3463 X.4.6, "routing loop detected").
LOOP_STATUS = "5.4.6"
#: Longest reply line accepted (RFC 5321 says 512 with CRLF; real servers exceed it).
MAX_REPLY_LINE = 8192
#: Most lines in one multi-line reply (EHLO answers have ~15).
MAX_REPLY_LINES = 256
#: Parsed single-line replies by their raw bytes (process-wide, bounded).
_REPLY_CACHE: dict[bytes, Reply] = {}
_REPLY_CACHE_SIZE = 1024

def reply_text(reply: Reply) -> str:
    """The reply's text lines joined with a space: how a remote reply is logged and put
    into DSN Diagnostic-Code fields (one header line)."""
    return " ".join(line for line in reply.lines if line)


def reply_line(reply: Reply) -> str:
    """``"550 5.1.1 No such user"``: a (possibly multi-line) reply as one line."""
    if reply.status:
        return f"{reply.code} {reply.status} {reply_text(reply)}".rstrip()
    return f"{reply.code} {reply_text(reply)}".rstrip()


@dataclass(frozen=True, slots=True)
class Credentials:
    """A username and password for AUTH PLAIN/LOGIN. ``repr`` never shows the password
    (it may end up in a log line or a traceback). They travel base64-encoded, so no
    value can inject a command; the config refuses NUL (PLAIN's separator) and empty
    values before they get here."""

    username: str
    password: str = field(repr=False)


def _b64(text: str) -> bytes:
    return base64.b64encode(text.encode("utf-8"))


class Phase(enum.Enum):
    GREETING = "greeting"  # connected, waiting for 220
    HELLO = "hello"  # EHLO/HELO sent
    READY = "ready"  # may start a transaction or STARTTLS or QUIT
    STARTTLS = "starttls"  # STARTTLS sent, waiting for 220
    TLS = "tls"  # 220 to STARTTLS received: driver must handshake then tls_established()
    AUTH = "auth"  # AUTH sent, the exchange (334 ... 235) under way
    TRANSACTION = "transaction"
    QUIT = "quit"  # QUIT sent
    CLOSED = "closed"  # 421, QUIT answered, or connection lost
    FAILED = "failed"  # greeting/EHLO/HELO refused or a protocol error


def dot_stuff(data: bytes) -> bytes:
    """The DATA payload for ``data``: dot-stuffed and terminated by ``CRLF . CRLF``.

    Bytes operations only (one ``replace`` plus one join), no per-line Python loop. A
    body not ending in CRLF gets one appended so the terminator stays on its own line.
    """
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    head = b"." if stuffed[:1] == b"." else b""
    tail = b".\r\n" if not stuffed or stuffed.endswith(b"\r\n") else b"\r\n.\r\n"
    return b"".join((head, stuffed, tail))


def crlf_lines(data: bytes) -> bytes:
    """``data`` with every line ending CRLF: a bare CR or bare LF becomes CRLF. One
    C-speed check (``bare_line_breaks``) for the usual, already clean message; the copy
    only when needed."""
    if bare_line_breaks(data) == (False, False):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def parse_ehlo_extensions(reply: Reply) -> dict[str, str]:
    """EHLO reply lines after the first -> ``{"SIZE": "10240000", "PIPELINING": ""}``."""
    ext: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            ext[keyword.upper()] = params.strip()
    return ext


def _headers_of(data: bytes) -> bytes:
    end = data.find(b"\r\n\r\n")
    return data if end < 0 else data[:end]


class _Transaction:
    """Bookkeeping of one MAIL transaction."""

    __slots__ = (
        "accepted",
        "body",
        "envelope",
        "mail_cmd",
        "mail_ok",
        "mail_sent",
        "outcomes",
        "pending_rcpts",
        "pipelined",
        "recipients",
        "settled",
    )

    def __init__(self, envelope: Envelope, recipients: list[int], pipelined: bool) -> None:
        self.envelope = envelope
        self.recipients = recipients
        self.pipelined = pipelined
        self.accepted: list[int] = []
        self.outcomes: dict[int, RecipientOutcome] = {}
        self.body = b""
        self.mail_cmd = b""
        self.mail_sent = False
        self.pending_rcpts: deque[tuple[int, bytes]] = deque()
        self.mail_ok = False
        #: Every recipient got its outcome without anything being sent (preflight).
        self.settled = False

    def settle(self, indexes: list[int], code: int, enhanced: str | None, text: str,
               ambiguous: bool = False) -> None:
        for i in indexes:
            if i not in self.outcomes:
                self.outcomes[i] = RecipientOutcome(i, code, enhanced, text, ambiguous)

    def settle_rest(self, code: int, enhanced: str | None, text: str,
                    ambiguous: bool = False) -> None:
        self.settle(self.recipients, code, enhanced, text, ambiguous)

    def outcome_list(self) -> list[RecipientOutcome]:
        return [self.outcomes[i] for i in self.recipients]


# Expected-reply tags, in the order commands were written.
(_GREETING, _EHLO, _HELO, _STARTTLS, _RSET, _MAIL, _RCPT, _DATA, _DOT, _DOT_DISCARD, _QUIT,
 _BDAT_LAST, _AUTH) = range(13)
_ACTIVITY = {
    _GREETING: "receiving the initial server greeting",
    _EHLO: "receiving the EHLO reply",
    _HELO: "receiving the HELO reply",
    _STARTTLS: "receiving the STARTTLS reply",
    _RSET: "sending RSET",
    _MAIL: "sending MAIL FROM",
    _RCPT: "sending RCPT TO",
    _DATA: "sending DATA command",
    _DOT: "sending end of data -- message may be sent more than once",
    _DOT_DISCARD: "sending end of data",
    _QUIT: "sending QUIT",
    _BDAT_LAST: "sending message body -- message may be sent more than once",
    _AUTH: "sending AUTH",
}


class SmtpClient:
    """The state machine of one outgoing SMTP connection (see the module docstring)."""

    def __init__(self, helo_name: str) -> None:
        if not helo_name or not helo_name.isascii() or any(c in helo_name for c in " \r\n"):
            raise ValueError(f"invalid HELO name {helo_name!r}")
        self.helo_name = helo_name
        self.phase = Phase.GREETING
        self.greeting: Reply | None = None
        #: The reply (or local reason) that made the session FAILED/CLOSED.
        self.error: Reply | None = None
        #: The refusal of STARTTLS (non-220), if the server refused it.
        self.starttls_refused: Reply | None = None
        self.esmtp = False
        self.extensions: dict[str, str] = {}
        self.transactions = 0
        self.tls_active = False
        #: AUTH succeeded (235) on this connection.
        self.authenticated = False
        #: The server's refusal of AUTH (535, 454, ...), if it refused.
        self.auth_refused: Reply | None = None
        #: Why ``auth`` sent nothing (no TLS, no AUTH offered, no mechanism in common).
        self.auth_unavailable: Reply | None = None
        #: The responses still to send to the server's 334 challenges (base64 lines).
        self._auth_responses: deque[bytes] = deque()
        self._buf = bytearray()
        self._lines: list[bytes] = []
        self._pending: deque[int] = deque([_GREETING])
        self._txn: _Transaction | None = None
        #: A transaction begun behind ``_txn``'s end of data (``can_begin_behind``).
        self._behind: _Transaction | None = None
        self._needs_rset = False
        #: Outcomes of finished transactions not yet taken, oldest first.
        self._done: deque[list[RecipientOutcome]] = deque()

    # ------------------------------------------------------------------ properties

    @property
    def awaiting_reply(self) -> bool:
        """True while a reply is owed: the driver must keep reading."""
        return bool(self._pending) and self.phase not in (Phase.CLOSED, Phase.FAILED)

    @property
    def usable(self) -> bool:
        """Whether another transaction may be started on this connection."""
        return self.phase is Phase.READY

    @property
    def can_begin_behind(self) -> bool:
        """Whether ``begin_transaction`` may start the next transaction now, while the
        current one waits for its end-of-data reply (see the module docstring): the
        server offers PIPELINING and not CHUNKING, the current body has been handed out,
        only its end-of-data reply is owed, and no transaction is waiting behind it."""
        pending = self._pending
        return (
            self.phase is Phase.TRANSACTION
            and self._behind is None
            and len(pending) == 1
            and pending[0] in (_DOT, _DOT_DISCARD)
            and "PIPELINING" in self.extensions
            and "CHUNKING" not in self.extensions
        )

    @property
    def reply_in_progress(self) -> bool:
        """Part of a reply has arrived (a partial line, or the first lines of a multi-line
        reply): the driver's timeout for this reply keeps running, so a server cannot
        hold a connection by trickling it."""
        return bool(self._buf) or bool(self._lines)

    @property
    def awaiting_end_of_data(self) -> bool:
        """The next owed reply is the one to end-of-data (the driver's data_timeout)."""
        return bool(self._pending) and self._pending[0] in (_DOT, _DOT_DISCARD, _BDAT_LAST)

    @property
    def activity(self) -> str:
        """What the client is waiting for, for error texts ("while sending RCPT TO")."""
        if self._pending:
            return _ACTIVITY[self._pending[0]]
        return "idle"

    def has(self, extension: str) -> bool:
        return extension in self.extensions

    @property
    def auth_mechanisms(self) -> set[str]:
        """The SASL mechanisms the server offers (upper-case): ``AUTH PLAIN LOGIN``, and
        the pre-RFC ``AUTH=LOGIN PLAIN`` that old servers (and Outlook-era clients'
        servers) still advertise."""
        mechanisms = self.extensions.get("AUTH", "").split()
        for keyword, params in self.extensions.items():
            if keyword.startswith("AUTH="):
                mechanisms += [keyword[5:], *params.split()]
        return {m.upper() for m in mechanisms if m}

    @property
    def size_limit(self) -> int:
        """The server's SIZE (0 = none announced or unlimited)."""
        return ascii_int(self.extensions.get("SIZE"), max_digits=18) or 0

    # ------------------------------------------------------------------ commands

    def _ehlo(self) -> bytes:
        self._pending.append(_EHLO)
        self.phase = Phase.HELLO
        return b"EHLO " + self.helo_name.encode("ascii") + b"\r\n"

    def starttls(self) -> bytes:
        """STARTTLS; after the 220 (``phase is Phase.TLS``) the driver does the handshake
        and calls ``tls_established``. A refusal returns to READY with
        ``starttls_refused`` set."""
        self._require(Phase.READY)
        self.phase = Phase.STARTTLS
        self._pending.append(_STARTTLS)
        return b"STARTTLS\r\n"

    def tls_established(self) -> bytes:
        """The handshake succeeded: forget everything learnt in plaintext (RFC 3207 4.2)
        and say EHLO again."""
        self._require(Phase.TLS)
        self.tls_active = True
        self.extensions = {}
        self.esmtp = False
        return self._ehlo()

    def auth(self, credentials: Credentials) -> bytes:
        """AUTH with ``credentials`` (see the module docstring): the bytes to send, or
        ``b""`` with ``auth_unavailable`` set when nothing may be sent. The exchange
        ends READY, with ``authenticated`` or ``auth_refused`` set (or CLOSED on 421)."""
        self._require(Phase.READY)
        self.auth_refused = self.auth_unavailable = None
        if self.authenticated:
            return b""
        if not self.tls_active:
            self.auth_unavailable = Reply(454, "4.7.11", "refusing to send credentials "
                                          "over a connection without TLS")
            return b""
        offered = self.auth_mechanisms
        if "PLAIN" in offered:
            # RFC 4616: authzid (empty: the identity is the username) NUL authcid NUL passwd
            initial = _b64(f"\0{credentials.username}\0{credentials.password}")
            line = b"AUTH PLAIN " + initial + b"\r\n"
        elif "LOGIN" in offered:
            self._auth_responses.extend((_b64(credentials.username),
                                         _b64(credentials.password)))
            line = b"AUTH LOGIN\r\n"
        else:
            why = ("offers no AUTH" if not offered else
                   f"offers AUTH {' '.join(sorted(offered))}, none of PLAIN, LOGIN")
            self.auth_unavailable = Reply(454, "4.7.0", f"the server {why}, but "
                                          "credentials are configured for it")
            return b""
        self.phase = Phase.AUTH
        self._pending.append(_AUTH)
        return line

    def quit(self) -> bytes:
        """QUIT, if the connection is still open for commands; else ``b""``."""
        if self.phase is not Phase.READY:
            return b""
        self.phase = Phase.QUIT
        self._pending.append(_QUIT)
        return b"QUIT\r\n"

    def _require(self, phase: Phase) -> None:
        if self.phase is not phase:
            raise RuntimeError(f"SMTP client is in phase {self.phase.value}, not {phase.value}")

    def begin_transaction(self, envelope: Envelope, recipients: list[int], data: bytes) -> bytes:
        """Start one transaction for ``recipients`` (indexes into envelope.recipients).

        Returns the bytes to write. When the message cannot be offered to this server at
        all (SIZE, 8BITMIME, SMTPUTF8) it returns ``b""`` and the outcomes are ready at
        once (``awaiting_reply`` is False); nothing is sent.

        From READY, outcomes not taken yet are discarded. While ``can_begin_behind``, the
        transaction is begun behind the current one; its outcomes (even immediate ones)
        come after the current one's from ``take_outcomes``.
        """
        behind = self.phase is Phase.TRANSACTION
        if behind:
            if not self.can_begin_behind:
                raise RuntimeError("SMTP client cannot begin a transaction behind this one")
        else:
            self._require(Phase.READY)
            self._done.clear()
        if not recipients:
            raise ValueError("a transaction needs at least one recipient")
        pipelined = "PIPELINING" in self.extensions
        txn = _Transaction(envelope, list(recipients), pipelined)
        data = crlf_lines(data)

        failure = self._preflight(envelope, recipients, data)
        if failure is not None:
            code, enhanced, text = failure
            txn.settle_rest(code, enhanced, text)
            return self._settled_at_once(txn, behind)

        try:
            mail = self._mail_command(envelope, data)
        except ValueError:
            txn.settle_rest(553, "5.1.7", "bad sender address syntax")
            return self._settled_at_once(txn, behind)
        dsn = "DSN" in self.extensions
        for i in txn.recipients:
            try:
                txn.pending_rcpts.append((i, self._rcpt_command(envelope, i, dsn)))
            except ValueError:
                txn.settle([i], 553, "5.1.3", "bad recipient address syntax")
        if not txn.pending_rcpts:
            return self._settled_at_once(txn, behind)
        if behind:
            self._behind = txn
        else:
            self._txn = txn
        self.phase = Phase.TRANSACTION
        self.transactions += 1
        txn.body = data
        txn.mail_cmd = mail
        out: list[bytes] = []
        if self._needs_rset:
            self._needs_rset = False
            self._pending.append(_RSET)
            out.append(b"RSET\r\n")
            if not pipelined:
                return out[0]  # MAIL follows the RSET reply
        txn.mail_sent = True
        out.append(mail)
        self._pending.append(_MAIL)
        if pipelined:
            # RFC 2920: the whole group in one write; replies come back in this order.
            out.extend(cmd for _i, cmd in txn.pending_rcpts)
            self._pending.extend([_RCPT] * len(txn.pending_rcpts))
            if "CHUNKING" in self.extensions:
                body, txn.body = data, b""
                if not body.endswith(b"\r\n"):
                    body += b"\r\n"
                out.append(b"BDAT %d LAST\r\n" % len(body))
                out.append(body)
                self._pending.append(_BDAT_LAST)
            else:
                out.append(b"DATA\r\n")
                self._pending.append(_DATA)
        return b"".join(out)

    def _settled_at_once(self, txn: _Transaction, behind: bool) -> bytes:
        """A transaction whose every recipient failed before anything was sent."""
        if behind:
            txn.settled = True
            self._behind = txn  # its outcomes queue up behind the current transaction's
        else:
            self._done.append(txn.outcome_list())
        return b""

    def _preflight(
        self, envelope: Envelope, recipients: list[int], data: bytes
    ) -> tuple[int, str, str] | None:
        limit = self.size_limit
        if limit and len(data) > limit:
            return (552, "5.3.4", f"message size {len(data)} exceeds size limit {limit} of server")
        if (envelope.body in ("8BITMIME", "BINARYMIME") and "8BITMIME" not in self.extensions
                and not data.isascii()):
            return (554, "5.6.3", "message is 8-bit but the server does not support 8BITMIME")
        if "SMTPUTF8" not in self.extensions and self._needs_smtputf8(envelope, recipients, data):
            return (554, "5.6.7", "SMTPUTF8 is required, but was not offered by host")
        return None

    @staticmethod
    def _needs_smtputf8(envelope: Envelope, recipients: list[int], data: bytes) -> bool:
        if not envelope.sender.isascii():
            return True
        if any(not envelope.recipients[i].address.isascii() for i in recipients):
            return True
        return envelope.smtputf8 and not _headers_of(data).isascii()

    def _mail_command(self, envelope: Envelope, data: bytes) -> bytes:
        params = []
        if "SIZE" in self.extensions:
            params.append(f"SIZE={len(data)}")
        if envelope.body in ("8BITMIME", "BINARYMIME") and "8BITMIME" in self.extensions:
            params.append("BODY=8BITMIME")
        if envelope.smtputf8 and "SMTPUTF8" in self.extensions:
            params.append("SMTPUTF8")
        if "DSN" in self.extensions:
            if envelope.ret:
                params.append(f"RET={envelope.ret}")
            if envelope.envid:
                params.append(f"ENVID={xtext_encode(envelope.envid)}")
        line = f"MAIL FROM:<{envelope.sender}>"
        if params:
            line += " " + " ".join(params)
        return _command(line)

    @staticmethod
    def _rcpt_command(envelope: Envelope, index: int, dsn: bool) -> bytes:
        rcpt = envelope.recipients[index]
        line = f"RCPT TO:<{rcpt.address}>"
        if dsn:
            if rcpt.notify:
                line += " NOTIFY=" + ",".join(rcpt.notify)
            if rcpt.orcpt and rcpt.orcpt.isascii():
                line += " ORCPT=" + format_orcpt(rcpt.orcpt)
        return _command(line)

    # ------------------------------------------------------------------ results

    def take_outcomes(self) -> list[RecipientOutcome]:
        """The outcomes of the oldest finished transaction not taken yet, in the order
        its recipients were given."""
        if not self._done:
            raise RuntimeError("no finished transaction")
        return self._done.popleft()

    @property
    def transaction_done(self) -> bool:
        """A finished transaction's outcomes are waiting for ``take_outcomes``."""
        return bool(self._done)

    def _finish(self, rset: bool) -> None:
        txn = self._txn
        assert txn is not None
        self._txn = None
        self._needs_rset = rset
        txn.settle_rest(451, "4.3.0", "internal error: transaction ended without an outcome")
        self._done.append(txn.outcome_list())
        behind, self._behind = self._behind, None
        if behind is not None:
            # Only an end-of-data reply can finish a transaction with one behind it, and
            # that never needs an RSET: the next one's MAIL is already on its way.
            assert not rset
            if not behind.settled:
                self._txn = behind
                return
            self._done.append(behind.outcome_list())
        if self.phase is Phase.TRANSACTION:
            self.phase = Phase.READY

    # ------------------------------------------------------------------ input

    def connection_lost(self, code: int = 421, enhanced: str | None = "4.4.2",
                        text: str = "lost connection") -> None:
        """EOF, reset or timeout: every recipient without an outcome gets this (transient)
        and the client is CLOSED. If only the end-of-data reply was owed, the message
        may have been delivered: those outcomes are ``ambiguous``."""
        pending = self._pending
        ambiguous = bool(pending) and pending[0] in (_DOT, _BDAT_LAST)
        self._close(Phase.CLOSED, Reply(code, enhanced, text), ambiguous=ambiguous)

    def _close(self, phase: Phase, reply: Reply, *, ambiguous: bool = False) -> None:
        if self.phase in (Phase.CLOSED, Phase.FAILED):
            return
        self.phase = phase
        self.error = reply
        self._pending.clear()
        self._auth_responses.clear()  # the password is not kept past its exchange
        if self._txn is not None:
            behind, self._behind = self._behind, None
            self._txn.settle_rest(reply.code, reply.status, reply_text(reply), ambiguous)
            self._finish(False)
            if behind is not None:
                behind.settle_rest(reply.code, reply.status, reply_text(reply))
                self._done.append(behind.outcome_list())
            self.phase = phase

    def _protocol_error(self, why: str) -> None:
        self._close(Phase.FAILED, Reply(421, "4.5.0", f"protocol error: {why}"))

    def receive_data(self, data: bytes) -> bytes:
        """Feed bytes read from the server; returns bytes to write next (maybe ``b""``)."""
        if self.phase in (Phase.CLOSED, Phase.FAILED):
            return b""
        buf = self._buf
        buf += data
        out: list[bytes] = []
        start = 0
        while self.phase not in (Phase.CLOSED, Phase.FAILED):
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            raw = bytes(buf[start:nl])
            start = nl + 1
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            reply = self._parse_line(raw)
            if reply is not None:
                more = self._on_reply(reply, leftover=len(buf) > start)
                if more:
                    out.append(more)
        del buf[:start]
        if len(buf) > MAX_REPLY_LINE and self.phase not in (Phase.CLOSED, Phase.FAILED):
            self._protocol_error("reply line too long")
        return b"".join(out)

    def _parse_line(self, raw: bytes) -> Reply | None:
        """Collect one line; at a reply's last line, parse the whole reply (shared
        ``parse_reply``: code consistency, enhanced status stripped from every line)."""
        if len(raw) > MAX_REPLY_LINE:
            self._protocol_error("reply line too long")
            return None
        sep = raw[3:4]
        if not raw[:3].isdigit() or raw[:1] not in b"2345" or sep not in (b" ", b"-", b""):
            self._protocol_error(f"malformed SMTP reply {raw[:80]!r}")
            return None
        self._lines.append(raw)
        if sep == b"-":
            if len(self._lines) > MAX_REPLY_LINES:
                self._protocol_error("too many reply lines")
            return None
        lines, self._lines = self._lines, []
        if len(lines) == 1:
            # Bulk sending sees the same few replies ("250 2.1.5 Ok") millions of times:
            # parse each distinct single-line reply once (Reply is immutable).
            cached = _REPLY_CACHE.get(raw)
            if cached is not None:
                return cached
        try:
            reply = parse_reply(lines)
        except ReplyParseError as e:
            self._protocol_error(str(e)[:120])
            return None
        if len(lines) == 1:
            if len(_REPLY_CACHE) >= _REPLY_CACHE_SIZE:
                _REPLY_CACHE.clear()  # unique "queued as" ids must not grow it forever
            _REPLY_CACHE[raw] = reply
        return reply

    def _on_reply(self, reply: Reply, leftover: bool) -> bytes:
        if not self._pending:
            if reply.code == 421:
                self._close(Phase.CLOSED, reply)
            else:
                self._protocol_error(f"unexpected reply {reply_line(reply)[:80]!r}")
            return b""
        tag = self._pending.popleft()
        if tag == _GREETING:
            self.greeting = reply
        if reply.code == 421 and tag != _QUIT:
            self._close(Phase.CLOSED, reply)
            return b""
        handler = self._handlers[tag]
        return handler(self, reply, leftover)

    # -- handlers: (self, reply, leftover bytes after this reply?) -> bytes to send

    def _names_me(self, reply: Reply, what: str) -> bool:
        """RFC 5321 6.3 loop detection, as Postfix does it: a server that greets us (or
        answers EHLO) with our own name is ourselves. Fails the session with 5.4.6."""
        words = reply.lines[0].split(None, 1)
        if not words or words[0].lower().rstrip(".") != self.helo_name.lower():
            return False
        self._close(Phase.FAILED, Reply(554, LOOP_STATUS, (
            f"{what} names my own hostname {self.helo_name}: mail loops back to myself")))
        return True

    def _on_greeting(self, reply: Reply, leftover: bool) -> bytes:
        self.greeting = reply
        if reply.code != 220:
            self._close(Phase.FAILED, reply)
            return b""
        if self._names_me(reply, "the greeting"):
            return b""
        return self._ehlo()

    def _on_ehlo(self, reply: Reply, leftover: bool) -> bytes:
        if reply.is_success and self._names_me(reply, "the EHLO reply"):
            return b""
        if reply.is_success:
            self.esmtp = True
            self.extensions = parse_ehlo_extensions(reply)
            self.phase = Phase.READY
            return b""
        if 500 <= reply.code < 600:
            # RFC 5321 3.2: a server that does not do ESMTP refuses EHLO; try HELO.
            self._pending.append(_HELO)
            return b"HELO " + self.helo_name.encode("ascii") + b"\r\n"
        self._close(Phase.FAILED, reply)
        return b""

    def _on_helo(self, reply: Reply, leftover: bool) -> bytes:
        if reply.is_success:
            self.esmtp = False
            self.extensions = {}
            self.phase = Phase.READY
        else:
            self._close(Phase.FAILED, reply)
        return b""

    def _on_starttls(self, reply: Reply, leftover: bool) -> bytes:
        if reply.code == 220:
            if leftover:
                # Plaintext after the 220 would be read as if it came over TLS
                # (response injection, cf. CVE-2011-0411): refuse the connection.
                self._protocol_error("data pipelined after the STARTTLS reply")
                return b""
            self.phase = Phase.TLS
        else:
            self.starttls_refused = reply
            self.phase = Phase.READY
        return b""

    def _on_auth(self, reply: Reply, leftover: bool) -> bytes:
        if reply.code == 334:
            # The next response of the exchange; a challenge beyond what the mechanism
            # needs cancels it (RFC 4954 4: "*"), and the server answers 501.
            self._pending.append(_AUTH)
            response = self._auth_responses.popleft() if self._auth_responses else b"*"
            return response + b"\r\n"
        self._auth_responses.clear()
        self.phase = Phase.READY
        if reply.is_success:
            self.authenticated = True
        else:
            self.auth_refused = reply
        return b""

    def _on_rset(self, reply: Reply, leftover: bool) -> bytes:
        txn = self._txn
        if txn is not None and not txn.mail_sent:
            txn.mail_sent = True
            self._pending.append(_MAIL)
            return txn.mail_cmd
        return b""

    def _on_mail(self, reply: Reply, leftover: bool) -> bytes:
        txn = self._txn
        assert txn is not None
        if reply.is_success:
            txn.mail_ok = True
            if not txn.pipelined:
                return self._next_rcpt(txn)
            return b""
        txn.settle_rest(reply.code, reply.status, reply_text(reply))
        if not txn.pipelined:
            self._finish(rset=True)
        return b""

    def _next_rcpt(self, txn: _Transaction) -> bytes:
        _i, cmd = txn.pending_rcpts[0]
        self._pending.append(_RCPT)
        return cmd

    def _on_rcpt(self, reply: Reply, leftover: bool) -> bytes:
        txn = self._txn
        assert txn is not None
        index, _cmd = txn.pending_rcpts.popleft()
        if txn.mail_ok:
            if reply.is_success:
                txn.accepted.append(index)
            else:
                txn.settle([index], reply.code, reply.status, reply_text(reply))
        if txn.pipelined:
            return b""
        if txn.pending_rcpts:
            return self._next_rcpt(txn)
        if txn.accepted:
            self._pending.append(_DATA)
            return b"DATA\r\n"
        self._finish(rset=True)
        return b""

    def _on_data(self, reply: Reply, leftover: bool) -> bytes:
        txn = self._txn
        assert txn is not None
        if reply.code == 354:
            if txn.mail_ok and txn.accepted:
                self._pending.append(_DOT)
                body, txn.body = txn.body, b""
                return dot_stuff(body)
            # RFC 2920 3.1: DATA accepted although no recipient was: send an empty
            # message's terminator; the server must not deliver it.
            self._pending.append(_DOT_DISCARD)
            return b".\r\n"
        if reply.code // 100 in (4, 5):
            if txn.mail_ok:
                txn.settle(txn.accepted, reply.code, reply.status, reply_text(reply))
        elif txn.mail_ok and txn.accepted:
            self._protocol_error(f"unexpected reply to DATA {reply_line(reply)[:80]!r}")
            return b""
        self._finish(rset=True)
        return b""

    def _on_dot(self, reply: Reply, leftover: bool) -> bytes:
        txn = self._txn
        assert txn is not None
        txn.settle(txn.accepted, reply.code, reply.status, reply_text(reply))
        self._finish(rset=False)
        return b""

    def _on_bdat_last(self, reply: Reply, leftover: bool) -> bytes:
        txn = self._txn
        assert txn is not None
        if txn.mail_ok:
            # Recipients refused at RCPT keep that outcome (settle skips them).
            txn.settle(txn.accepted, reply.code, reply.status, reply_text(reply))
        # A refused chunk (or one sent after a refused MAIL/RCPT) may leave the server
        # with a half-open transaction: RSET before the next one, as after DATA.
        self._finish(rset=not reply.is_success)
        return b""

    def _on_dot_discard(self, reply: Reply, leftover: bool) -> bytes:
        # Everyone already has a RCPT (or MAIL) failure; the server's answer is moot.
        self._finish(rset=False)
        return b""

    def _on_quit(self, reply: Reply, leftover: bool) -> bytes:
        self.phase = Phase.CLOSED
        return b""

    _handlers = {
        _GREETING: _on_greeting,
        _EHLO: _on_ehlo,
        _HELO: _on_helo,
        _STARTTLS: _on_starttls,
        _RSET: _on_rset,
        _MAIL: _on_mail,
        _RCPT: _on_rcpt,
        _DATA: _on_data,
        _DOT: _on_dot,
        _DOT_DISCARD: _on_dot_discard,
        _QUIT: _on_quit,
        _BDAT_LAST: _on_bdat_last,
        _AUTH: _on_auth,
    }


def _command(line: str) -> bytes:
    """Encode one command line; CR/LF inside it would inject commands, so refuse."""
    if "\r" in line or "\n" in line:
        raise ValueError(f"CR/LF in SMTP command {line[:80]!r}")
    return line.encode("utf-8") + b"\r\n"
