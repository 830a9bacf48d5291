"""The sans-I/O SMTP server: bytes in, typed events and reply bytes out.

Like h11: ``ServerConnection`` never touches a socket, a clock, a thread or a file, so it
can be driven by trio (``relay.inbound``), by unit tests and by a fuzzer alike.

Driving loop (what ``relay.inbound`` does)::

    conn = ServerConnection(settings, tls_active=False)
    conn.start()
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            await stream.send_all(conn.data_to_send())   # one write per pipelined group
            conn.receive_data(await stream.receive_some(65536))   # b"" on EOF
        elif isinstance(ev, RecipientRequested): ... conn.accept_recipient() / reject_recipient()
        elif isinstance(ev, AuthRequested): ... conn.auth_succeeded() / auth_failed()
        elif isinstance(ev, MessageReceived): ... conn.message_stored(qid) / message_failed()
        elif isinstance(ev, StartTLSRequested): flush, handshake, conn.tls_established()
        elif isinstance(ev, ConnectionClosing): flush, close, break

Contract:

* Every reply is appended to an output queue in command order; ``data_to_send()`` drains
  it. Buffered pipelined commands are all processed before ``NEED_DATA`` is returned, so
  one group's replies leave in one write (RFC 2920).
* A decision event stops processing: until the matching method is called ``next_event()``
  returns ``NEED_DATA`` even when more input is buffered. Calling a decision method
  without that decision pending raises ``LocalProtocolError``, except once the
  connection is closing (``abort()``/``shutdown()``/``timeout_expired()`` may have run
  while the I/O layer was deciding): then decision methods do nothing.
* While a RCPT, AUTH or message decision is pending ``phase`` is ``COMMAND`` (the client's
  next move is a command); while STARTTLS is pending it is ``STARTTLS``.
* Bytes fed before ``start()`` (the client talked first) are not kept: ``start()`` then
  queues ``554 5.5.1`` instead of the greeting and the session closes ("pregreet").
* ``ConnectionClosing`` is terminal and sticky: once returned, ``next_event()`` returns the
  very same object for ever; input is ignored from then on.
* Internal buffers are bounded: a partial command line is at most 512 octets (12288 for
  AUTH, RFC 4954); a message in DATA at most ``max_message_size`` unstuffed octets, so
  at most a third more as received (dot-stuffing adds one octet per ``..`` line, and
  the shortest such line is 4 octets), plus a few bytes; the excess is discarded while
  the end of data is still looked for. BDAT holds at most ``max_message_size``. The
  input buffer holds only what the I/O layer fed since the last ``NEED_DATA`` (plus that
  bounded remainder).

SMTP smuggling: end of data is only ``CRLF . CRLF`` (or ``. CRLF`` as the first line). A
bare CR in a command line gets 500 and the line is not executed; in message content the
whole message is rejected at its real end with 550 5.6.0. A bare LF is treated the same
way with ``bare_newline="reject"`` (the default). With ``"normalize"`` (Postfix 3.9's
``smtpd_forbid_bare_newline = normalize``) a command line may end in a bare LF, and a
bare LF in content is stored as CRLF; end of data is still only ``CRLF . CRLF``, and a
line that normalising turns into a lone ``.`` is unstuffed like any other dotted line, so
no end-of-data lookalike survives into the spool.

Choices where the RFCs leave room (the Postfix behaviour unless said otherwise):

* ``MAIL FROM: <a@b>`` (space before the path) is accepted; a path without ``<>`` is not.
* A leading dot is removed from every data line that starts with one (RFC 5321 4.5.2),
  which for a correctly stuffing client is exactly ``..`` -> ``.``.
* The error counter counts every 4xx/5xx reply, including the I/O layer's
  ``reject_recipient``/``auth_failed``/``message_failed`` ones, except ``452 4.5.3`` (too
  many recipients, which is normal pipelining traffic), and is reset when a message is stored,
  so long bulk sessions with an occasional rejected recipient are not cut off.
* After a failed BDAT chunk the transaction stays failed: further chunks are read,
  discarded and answered with the same error until ``BDAT ... LAST`` (or RSET) ends it.
* BDAT messages are held to the same bare CR/LF and line-length rules as DATA: they may
  be relayed with DATA later. ``BODY=BINARYMIME`` is refused on MAIL (555 5.5.4): it is
  not advertised, and RFC 3030 lets a binary message go only to a server that offers
  BINARYMIME, which the relay cannot promise for the next hop.
* HTTP verbs (GET, POST, HEAD, PUT, CONNECT) as commands end the session with 421, like
  Postfix's ``smtpd_forbidden_commands``.
"""

from __future__ import annotations

import binascii
import enum
import functools
import re
from dataclasses import dataclass

from relay.model import Recipient, ascii_int
from relay.smtp import replies as R
from relay.smtp.address import (
    AddressError,
    Mailbox,
    ParamError,
    parse_notify,
    parse_orcpt,
    parse_params,
    parse_path,
    split_path,
    xtext_decode,
)
from relay.smtp.events import (
    NEED_DATA,
    AuthRequested,
    ConnectionClosing,
    Event,
    HeloReceived,
    MessageReceived,
    NeedData,
    RecipientRequested,
    StartTLSRequested,
)
from relay.smtp.lines import bare_line_breaks
from relay.smtp.replies import Reply

__all__ = ["LocalProtocolError", "Phase", "ServerConnection", "ServerSettings"]

#: RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF.
COMMAND_LINE_MAX = 512
#: RFC 4954 4: AUTH command and response lines may be up to 12288 octets.
AUTH_LINE_MAX = 12288
#: RFC 5321 4.5.3.1.8: at least 100 recipients must be accepted.
MIN_RECIPIENTS = 100
#: RFC 3461 4.4: ENVID is at most 100 characters.
ENVID_MAX = 100

_HTTP_VERBS = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT"})
_BDAT_RE = re.compile(r"([0-9]{1,20})(?: +(LAST))? *", re.IGNORECASE | re.ASCII)
_BODY_TYPES = frozenset({"7BIT", "8BITMIME"})
_AUTH_MECHANISMS = ("PLAIN", "LOGIN")
_LOGIN_USERNAME = Reply(334, None, "VXNlcm5hbWU6")  # base64 "Username:"
_LOGIN_PASSWORD = Reply(334, None, "UGFzc3dvcmQ6")  # base64 "Password:"
_EMPTY_CHALLENGE = Reply(334, None, "")


class LocalProtocolError(RuntimeError):
    """The I/O layer called a method the connection's state does not allow (a decision
    that is not pending, ``start()`` twice): a bug in the caller, not in the peer."""


class Phase(enum.Enum):
    """What the connection is waiting for; the I/O layer picks its timeout from it
    (``DATA``/``BDAT``: data_timeout; anything else: command_timeout)."""

    #: Created, ``start()`` not called yet.
    GREETING = "greeting"
    #: Waiting for a command line (also while a RCPT/AUTH/message decision is pending).
    COMMAND = "command"
    #: Reading message content after 354.
    DATA = "data"
    #: Reading the octets of a BDAT chunk.
    BDAT = "bdat"
    #: Waiting for an AUTH continuation line (after a 334).
    AUTH = "auth"
    #: 220 to STARTTLS queued; waiting for ``tls_established()``.
    STARTTLS = "starttls"
    #: ConnectionClosing was decided; nothing more will be read.
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Per-listener protocol settings (``relay.inbound.session.server_settings`` builds
    them from the ``[inbound]`` config section)."""

    hostname: str
    max_message_size: int = 10240000
    max_recipients: int = 1000
    max_line_length: int = 998
    max_errors: int = 20
    tls_available: bool = False
    allow_plaintext_auth: bool = False
    auth_enabled: bool = False
    #: "reject" bare LF in commands and content, or "normalize" it to CRLF (module doc).
    bare_newline: str = "reject"

    def __post_init__(self) -> None:
        if self.max_message_size <= 0:
            raise ValueError("max_message_size must be positive")
        if self.max_line_length < 1 or self.max_errors < 1 or self.max_recipients < 1:
            raise ValueError("limits must be positive")
        if self.bare_newline not in ("reject", "normalize"):
            raise ValueError("bare_newline must be 'reject' or 'normalize'")



class _Decision(enum.Enum):
    RCPT = "rcpt"
    AUTH = "auth"
    MESSAGE = "message"
    TLS = "tls"


class _More:
    """Internal: a step could not progress without more input."""

    __slots__ = ()


_MORE = _More()


class ServerConnection:
    """One SMTP server session as a state machine (see the module docstring)."""

    def __init__(self, settings: ServerSettings, *, tls_active: bool = False) -> None:
        self.settings = settings
        #: True once TLS is up (constructed on a TLS-wrapped port, or after STARTTLS).
        self.tls_active = tls_active
        #: The username of a successful AUTH, else None.
        self.authenticated_user: str | None = None
        #: The HELO/EHLO argument, None before HELO/EHLO (and after STARTTLS).
        self.helo: str | None = None
        #: True after EHLO (False after HELO).
        self.esmtp = False
        self._phase = Phase.GREETING
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._eof = False
        self._pregreet = False
        self._closing: ConnectionClosing | None = None
        self._pending: _Decision | None = None
        self._errors = 0
        self._discarding_line = False
        self._recipient_limit = max(settings.max_recipients, MIN_RECIPIENTS)
        self._normalize = settings.bare_newline == "normalize"
        # AUTH exchange
        self._auth_mechanism = ""
        self._auth_step = ""
        self._auth_login_user = ""
        self._auth_username = ""
        # transaction
        self._reset_transaction()

    # -- public API ---------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def closed(self) -> bool:
        """True once ConnectionClosing has been decided."""
        return self._closing is not None

    @property
    def in_transaction(self) -> bool:
        """True between an accepted MAIL and the end of its transaction."""
        return self._in_transaction

    @property
    def buffered_bytes(self) -> int:
        """Bytes held internally (input plus message under construction), for monitoring
        and for the boundedness tests."""
        return len(self._buf) + len(self._msg)

    @property
    def partial_command(self) -> bool:
        """Part of the next command line has arrived (or an overlong one is being
        discarded): the I/O layer's command timeout then runs from the line's start, so
        a client cannot hold a session by trickling a command."""
        return bool(self._buf) or self._discarding_line

    @property
    def error_count(self) -> int:
        return self._errors

    def start(self) -> None:
        """Queue the greeting. If the client sent anything before (pregreet: spambots,
        smuggling probes), queue ``554 5.5.1`` instead and close."""
        if self._phase is not Phase.GREETING:
            raise LocalProtocolError("start() called twice")
        self._phase = Phase.COMMAND
        if self._pregreet:
            self._close("pregreet", R.pregreet(self.settings.hostname))
            return
        self._send(_greeting(self.settings.hostname))

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes read from the socket; ``b""`` means EOF. Ignored once closing; bytes
        that arrive while STARTTLS is pending are plaintext after STARTTLS and are
        dropped."""
        if self._closing is not None or self._eof:
            return
        if not data:
            self._eof = True
            return
        phase = self._phase
        if phase is Phase.GREETING:
            self._pregreet = True
        elif phase is not Phase.STARTTLS:
            self._buf += data

    def next_event(self) -> Event | NeedData:
        """Process buffered input; return the next event or NEED_DATA (see the module
        docstring for the contract)."""
        if self._closing is not None:
            return self._closing
        if self._pending is not None or self._phase is Phase.GREETING:
            return NEED_DATA
        while True:
            phase = self._phase
            if phase is Phase.COMMAND or phase is Phase.AUTH:
                result = self._step_line()
            elif phase is Phase.DATA:
                result = self._step_data()
            elif phase is Phase.BDAT:
                result = self._step_bdat()
            else:  # STARTTLS without a pending decision cannot happen; be safe
                return NEED_DATA
            if self._closing is not None:
                return self._closing
            if result is _MORE:
                if self._eof:
                    return self._close("eof")
                return NEED_DATA
            if result is not None:
                return result  # type: ignore[return-value]

    def data_to_send(self) -> bytes:
        """All reply bytes queued since the last call, joined (one write)."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    # decisions

    def accept_recipient(self) -> None:
        """Accept the pending RecipientRequested: ``250 2.1.5 Ok``."""
        if not self._expect(_Decision.RCPT):
            return
        self._recipients.append(self._pending_recipient)  # type: ignore[arg-type]
        self._pending_recipient = None
        self._send(R.RCPT_OK)

    def reject_recipient(self, reply: Reply) -> None:
        """Refuse the pending RecipientRequested with ``reply`` (e.g. ``554 5.7.1 Relay
        access denied``); counts as an error when 4xx/5xx."""
        if not self._expect(_Decision.RCPT):
            return
        self._pending_recipient = None
        self._error_or_send(reply)

    def auth_succeeded(self) -> None:
        """Accept the pending AuthRequested: ``235 2.7.0``; sets ``authenticated_user``."""
        if not self._expect(_Decision.AUTH):
            return
        self.authenticated_user = self._auth_username
        self._send(R.AUTH_OK)

    def auth_failed(self, reply: Reply = R.AUTH_FAILED) -> None:
        """Refuse the pending AuthRequested (default ``535 5.7.8``; pass ``454 4.7.0`` for a
        temporary backend failure). Counts as an error."""
        if not self._expect(_Decision.AUTH):
            return
        self._error_or_send(reply)

    def message_stored(self, queue_id: str) -> None:
        """The pending MessageReceived is durably stored: ``250 2.0.0 Ok: queued as <id>``.
        Ends the transaction and resets the error counter."""
        if not self._expect(_Decision.MESSAGE):
            return
        self._reset_transaction()
        self._errors = 0
        if queue_id.isalnum() and queue_id.isascii():
            self._out.append(b"250 2.0.0 Ok: queued as %s\r\n" % queue_id.encode())
        else:
            self._send(R.message_queued(queue_id))

    def message_failed(self, reply: Reply) -> None:
        """The pending MessageReceived was not stored (or is refused by content policy):
        send ``reply`` (e.g. ``451 4.3.0``). Ends the transaction."""
        if not self._expect(_Decision.MESSAGE):
            return
        self._reset_transaction()
        self._error_or_send(reply)

    def tls_established(self) -> None:
        """The TLS handshake after StartTLSRequested succeeded. Resets the session to its
        just-connected state (RFC 3207 4.2): no HELO, no transaction, not authenticated;
        STARTTLS is no longer offered."""
        if not self._expect(_Decision.TLS):
            return
        self.tls_active = True
        self.helo = None
        self.esmtp = False
        self.authenticated_user = None
        self._reset_transaction()
        self._buf.clear()
        self._phase = Phase.COMMAND

    # I/O-layer initiated endings

    def timeout_expired(self) -> None:
        """``421 4.4.2 <host> Error: timeout exceeded`` and close."""
        self.abort(R.timeout_exceeded(self.settings.hostname), "timeout")

    def data_rate_too_low(self) -> None:
        """``421 4.4.2 <host> Error: data rate too low`` and close (byte trickling)."""
        self.abort(R.data_rate_too_low(self.settings.hostname), "data rate")

    def shutdown(self) -> None:
        """``421 4.3.2 <host> Service shutting down`` and close."""
        self.abort(R.shutting_down(self.settings.hostname), "shutdown")

    def abort(self, reply: Reply | None, reason: str = "aborted") -> None:
        """Queue ``reply`` (if any) and close; any pending decision is dropped. No effect
        once closing."""
        if self._closing is None:
            self._close(reason, reply)

    # -- internals ------------------------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        self._out.append(reply.to_bytes())

    def _error(self, reply: Reply) -> None:
        """Queue an error reply and count it; too many -> 421 and close."""
        self._out.append(reply.to_bytes())
        self._errors += 1
        if self._errors >= self.settings.max_errors:
            self._close("too many errors", R.too_many_errors(self.settings.hostname))

    def _error_or_send(self, reply: Reply) -> None:
        if reply.is_error:
            self._error(reply)
        else:
            self._send(reply)

    def _close(self, reason: str, reply: Reply | None = None) -> ConnectionClosing:
        if reply is not None:
            self._send(reply)
        self._closing = ConnectionClosing(reason)
        self._phase = Phase.CLOSED
        self._pending = None
        self._buf = bytearray()
        self._msg = bytearray()
        return self._closing

    def _expect(self, decision: _Decision) -> bool:
        """Consume the pending decision. False (ignore the call) once the connection is
        closing, since abort()/shutdown() may race with a decision in the I/O layer."""
        if self._closing is not None:
            return False
        if self._pending is not decision:
            raise LocalProtocolError(
                f"no {decision.value} decision pending (pending: "
                f"{self._pending.value if self._pending else None})"
            )
        self._pending = None
        return True

    def _reset_transaction(self) -> None:
        self._in_transaction = False
        self._sender = ""
        self._sender_mailbox: Mailbox | None = None
        self._body: str | None = None
        self._smtputf8 = False
        self._declared_size: int | None = None
        self._ret: str | None = None
        self._envid: str | None = None
        self._recipients: list[Recipient] = []
        self._pending_recipient: Recipient | None = None
        self._rcpt_attempted = False
        self._msg = bytearray()
        # DATA scanning state
        self._dot_scan = 0
        self._dots = 0
        self._too_big = False
        # BDAT state
        self._chunking = False
        self._bdat_remaining = self._bdat_size = 0
        self._bdat_last = False
        self._bdat_error: Reply | None = None
        self._bdat_failed: Reply | None = None

    # -- command lines ------------------------------------------------------------------

    def _step_line(self) -> Event | _More | None:
        buf = self._buf
        if self._discarding_line:
            idx = buf.find(b"\n")
            if idx < 0:
                buf.clear()
                return _MORE
            del buf[: idx + 1]
            self._discarding_line = False
            return None
        idx = buf.find(b"\n", 0, COMMAND_LINE_MAX)
        if idx < 0:
            limit = COMMAND_LINE_MAX
            if self._phase is Phase.AUTH or buf[:5].upper() == b"AUTH ":
                limit = AUTH_LINE_MAX
                idx = buf.find(b"\n", 0, limit)
            if idx < 0:
                if len(buf) < limit:
                    return _MORE
                # Overlong: answer now, then drop everything up to the next LF.
                del buf[:limit]
                self._discarding_line = True
                if self._phase is Phase.AUTH:
                    self._phase = Phase.COMMAND
                    self._error(R.AUTH_LINE_TOO_LONG)
                else:
                    self._error(R.LINE_TOO_LONG)
                return None
        end = idx - 1 if idx and buf[idx - 1] == 13 else idx  # where the text ends
        if buf.find(b"\r", 0, end) >= 0 or (end == idx and not self._normalize):
            del buf[: idx + 1]
            if self._phase is Phase.AUTH:
                self._phase = Phase.COMMAND
            self._error(R.BARE_CR_LF_IN_COMMAND)
            return None
        text = buf[:end].decode("utf-8", "surrogateescape")
        del buf[: idx + 1]
        if self._phase is Phase.AUTH:
            return self._auth_response(text)
        verb, _, arg = text.partition(" ")
        handler = _COMMANDS.get(verb.upper())
        if handler is None:
            if verb.upper() in _HTTP_VERBS:
                self._close("non-smtp command", R.non_smtp_command(self.settings.hostname))
                return None
            self._error(R.UNKNOWN_COMMAND if verb else R.SYNTAX_ERROR)
            return None
        return handler(self, arg)

    def _cmd_ehlo(self, arg: str) -> Event | None:
        return self._helo(arg, esmtp=True)

    def _cmd_helo(self, arg: str) -> Event | None:
        return self._helo(arg, esmtp=False)

    def _helo(self, arg: str, *, esmtp: bool) -> Event | None:
        host = arg.strip(" ")
        if not host or " " in host or not host.isprintable() or not _is_utf8(host):
            self._error(R.syntax("EHLO hostname" if esmtp else "HELO hostname"))
            return None
        self._reset_transaction()
        self.helo = host
        self.esmtp = esmtp
        s = self.settings
        if esmtp:
            starttls = s.tls_available and not self.tls_active
            self._send(_ehlo_reply(s.hostname, s.max_message_size, starttls,
                                   self._auth_allowed))
        else:
            self._send(_helo_reply(s.hostname))
        return HeloReceived(host, esmtp)

    @property
    def _auth_allowed(self) -> bool:
        s = self.settings
        return s.auth_enabled and (self.tls_active or s.allow_plaintext_auth)

    def _cmd_mail(self, arg: str) -> Event | None:
        if self.helo is None:
            self._error(R.SEND_HELO_FIRST)
            return None
        if self._in_transaction:
            self._error(R.NESTED_MAIL)
            return None
        if arg[:5].upper() != "FROM:":
            self._error(R.syntax("MAIL FROM:<address>"))
            return None
        try:
            path, ptext = split_path(arg[5:])
        except AddressError:
            self._error(R.BAD_SENDER)
            return None
        body = ret = envid = None
        size: int | None = None
        smtputf8 = False
        if ptext:
            if not self.esmtp:
                self._error(R.PARAMS_NEED_EHLO)
                return None
            try:
                params = parse_params(ptext)
            except ParamError as e:
                self._error(R.DUPLICATE_PARAMETER if e.duplicate else R.syntax(
                    "MAIL FROM:<address> [parameters]"))
                return None
            for key, value in params.items():
                if key == "SIZE":
                    size = ascii_int(value, max_digits=20)
                    if size is None:
                        self._error(R.syntax("SIZE=<number>"))
                        return None
                elif key == "BODY":
                    body = (value or "").upper()
                    if body == "BINARYMIME":
                        self._error(R.BINARYMIME_NOT_SUPPORTED)
                        return None
                    if body not in _BODY_TYPES:
                        self._error(R.syntax("BODY=7BIT|8BITMIME"))
                        return None
                elif key == "SMTPUTF8":
                    if value is not None:
                        self._error(R.syntax("SMTPUTF8 takes no value"))
                        return None
                    smtputf8 = True
                elif key == "RET":
                    ret = (value or "").upper()
                    if ret not in ("FULL", "HDRS"):
                        self._error(R.syntax("RET=FULL|HDRS"))
                        return None
                elif key == "ENVID":
                    try:
                        envid = xtext_decode(value or "")
                    except ValueError:
                        envid = None
                    if not envid or len(envid) > ENVID_MAX:
                        self._error(R.syntax("ENVID=<xtext, at most 100 characters>"))
                        return None
                elif key == "AUTH":
                    if value is None:
                        self._error(R.syntax("AUTH=<mailbox>|<>"))
                        return None
                else:
                    self._error(R.unsupported_parameter(key))
                    return None
        try:
            mailbox = parse_path(path, smtputf8=smtputf8, allow_null=True)
        except AddressError as e:
            self._error(R.NON_ASCII_ADDRESS if e.non_ascii else R.BAD_SENDER)
            return None
        if size is not None and size > self.settings.max_message_size:
            self._error(R.MESSAGE_TOO_BIG)
            return None
        self._in_transaction = True
        self._sender_mailbox = mailbox
        self._sender = mailbox.address if mailbox is not None else ""
        self._body = body
        self._smtputf8 = smtputf8
        self._declared_size = size
        self._ret = ret
        self._envid = envid
        self._send(R.MAIL_OK)
        return None

    def _cmd_rcpt(self, arg: str) -> Event | None:
        if not self._in_transaction:
            self._error(R.NEED_MAIL)
            return None
        if self._chunking:
            self._error(R.BDAT_MIXED_WITH_DATA.with_text("Error: RCPT after BDAT"))
            return None
        if arg[:3].upper() != "TO:":
            self._error(R.syntax("RCPT TO:<address>"))
            return None
        self._rcpt_attempted = True
        try:
            path, ptext = split_path(arg[3:])
        except AddressError:
            self._error(R.BAD_RECIPIENT)
            return None
        notify: list[str] | None = None
        orcpt: str | None = None
        params: dict[str, str | None] = {}
        if ptext:
            if not self.esmtp:
                self._error(R.PARAMS_NEED_EHLO)
                return None
            try:
                params = parse_params(ptext)
            except ParamError as e:
                self._error(R.DUPLICATE_PARAMETER if e.duplicate else R.syntax(
                    "RCPT TO:<address> [parameters]"))
                return None
            for key, value in params.items():
                try:
                    if key == "NOTIFY":
                        notify = parse_notify(value)
                    elif key == "ORCPT":
                        orcpt = parse_orcpt(value)
                    else:
                        self._error(R.unsupported_parameter(key))
                        return None
                except ValueError:
                    self._error(R.syntax(f"{key}=" + (
                        "NEVER|SUCCESS,FAILURE,DELAY" if key == "NOTIFY" else "type;xtext")))
                    return None
        try:
            mailbox = parse_path(path, smtputf8=self._smtputf8, allow_postmaster=True)
        except AddressError as e:
            self._error(R.NON_ASCII_ADDRESS if e.non_ascii else R.BAD_RECIPIENT)
            return None
        assert mailbox is not None
        if len(self._recipients) >= self._recipient_limit:
            self._send(R.TOO_MANY_RECIPIENTS)  # not counted: normal with pipelining
            return None
        address = mailbox.address
        self._pending_recipient = Recipient(address=address, notify=notify, orcpt=orcpt)
        self._pending = _Decision.RCPT
        return RecipientRequested(address, notify, orcpt, params, mailbox)

    def _transaction_ready_error(self) -> Reply | None:
        """Why DATA/BDAT cannot start now, or None."""
        if not self._in_transaction:
            return R.NEED_MAIL
        if not self._recipients:
            return R.NO_VALID_RECIPIENTS if self._rcpt_attempted else R.NEED_RCPT
        return None

    def _cmd_data(self, arg: str) -> Event | None:
        if arg.strip(" "):
            self._error(R.syntax("DATA"))
            return None
        err = self._transaction_ready_error()
        if err is None and self._chunking:
            err = R.BDAT_MIXED_WITH_DATA
        if err is not None:
            self._error(err)
            return None
        self._send(R.START_DATA)
        self._phase = Phase.DATA
        self._msg = bytearray(b"\r\n")  # so the first line is found like every other line
        self._dot_scan = self._dots = 0
        self._too_big = False
        return None

    def _cmd_bdat(self, arg: str) -> Event | None:
        m = _BDAT_RE.fullmatch(arg)
        if not m:
            self._error(R.BAD_BDAT_SYNTAX)
            return None
        size = int(m.group(1))
        last = m.group(2) is not None
        # From here on the chunk's octets follow whatever we answer: read them all.
        err: Reply | None
        if self.helo is None:
            err = R.SEND_HELO_FIRST
        else:
            err = self._transaction_ready_error() or self._bdat_failed
        if err is None and len(self._msg) + size > self.settings.max_message_size:
            err = self._bdat_failed = R.MESSAGE_TOO_BIG
            self._msg = bytearray()
        if self._in_transaction:
            self._chunking = True
        self._bdat_error = err
        self._bdat_remaining = self._bdat_size = size
        self._bdat_last = last
        self._phase = Phase.BDAT
        return None

    def _step_bdat(self) -> Event | _More | None:
        remaining = self._bdat_remaining
        if remaining:
            buf = self._buf
            if not buf:
                return _MORE
            n = min(len(buf), remaining)
            if self._bdat_error is None:
                if n == len(buf):
                    self._msg += buf
                else:
                    self._msg += buf[:n]
            if n == len(buf):
                buf.clear()
            else:
                del buf[:n]
            remaining = self._bdat_remaining = remaining - n
            if remaining:
                return _MORE
        # chunk complete
        self._phase = Phase.COMMAND
        err = self._bdat_error
        if err is not None:
            if self._bdat_last and self._bdat_failed is not None:
                self._reset_transaction()
            self._error(err)
            return None
        if not self._bdat_last:
            self._send(Reply(250, "2.0.0", f"Ok: {self._bdat_size} octets received"))
            return None
        checked = self._checked_content(self._msg)
        if isinstance(checked, Reply):
            self._reset_transaction()
            self._error(checked)
            return None
        if len(checked) > self.settings.max_message_size:  # grown by normalising
            self._reset_transaction()
            self._error(R.MESSAGE_TOO_BIG)
            return None
        return self._message_received(bytes(checked), chunked=True)

    def _checked_content(self, content: bytearray) -> bytearray | Reply:
        """Bare CR/LF and line-length checks over a whole message, at C speed: the
        error reply, or the content (a normalised copy when bare LFs were normalised)."""
        bare_cr, bare_lf = bare_line_breaks(content)
        if bare_cr:
            return R.BARE_CR_LF_IN_DATA
        if bare_lf:
            if not self._normalize:
                return R.BARE_CR_LF_IN_DATA
            content = bytearray(content.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        # Without bare CRs, a line of more than max_line_length octets plus its CR is a
        # run of more than max_line_length + 1 octets without LF; the last line of a BDAT
        # body may have no line ending at all, so it has no CR to allow for.
        limit = self.settings.max_line_length
        if _has_long_run(content, limit + 1):
            return R.LINE_TOO_LONG_IN_DATA
        if len(content) - content.rfind(b"\n") - 1 > limit:  # the octets after the last LF
            return R.LINE_TOO_LONG_IN_DATA
        return content

    def _message_received(self, data: bytes, *, chunked: bool) -> MessageReceived:
        self._msg = bytearray()
        self._pending = _Decision.MESSAGE
        return MessageReceived(
            sender=self._sender,
            recipients=list(self._recipients),
            data=data,
            body=self._body,
            smtputf8=self._smtputf8,
            declared_size=self._declared_size,
            ret=self._ret,
            envid=self._envid,
            sender_mailbox=self._sender_mailbox,
            chunked=chunked,
        )

    def _step_data(self) -> Event | _More | None:
        """Move new input into the message, looking for CRLF . CRLF.

        ``_msg`` starts with a virtual CRLF so that ``. CRLF`` as the first line is found by
        the same search and a dot-stuffed first line is unstuffed by the same replace. The
        terminator may straddle the old and new bytes, so the last 4 old bytes are probed
        together with the first 4 new ones; everything else is searched once, in place,
        without copying the rest of a pipelined input buffer around.
        """
        msg = self._msg
        buf = self._buf
        if not buf:
            return _MORE
        old = len(msg)
        probe = bytes(msg[-4:]) + bytes(buf[:4])
        j = probe.find(b"\r\n.\r\n")
        if j >= 0:
            end = old - min(old, 4) + j  # terminator position in msg + buf coordinates
        else:
            k = buf.find(b"\r\n.\r\n")
            end = old + k if k >= 0 else -1
        if end < 0:
            msg += buf
            buf.clear()
            if not self._too_big:
                new_end = len(msg)
                self._dots += msg.count(b"\r\n.", self._dot_scan, new_end)
                self._dot_scan = max(new_end - 2, self._dot_scan)
                if new_end - 2 - self._dots > self.settings.max_message_size:
                    self._too_big = True
            if self._too_big and len(msg) > 4:
                del msg[:-4]  # keep only what may start the terminator
            return _MORE
        # End of data at `end`; what follows it is the next pipelined command group.
        content_end = end + 2
        if content_end <= old:
            del msg[content_end:]
        else:
            msg += buf[: content_end - old]
        del buf[: end + 5 - old]
        self._phase = Phase.COMMAND
        if self._too_big:
            return self._reject_message(R.MESSAGE_TOO_BIG)
        checked = self._checked_content(msg)
        if isinstance(checked, Reply):
            return self._reject_message(checked)
        if checked is msg:
            dots = self._dots + msg.count(b"\r\n.", self._dot_scan)
        else:  # normalised: lines after a bare LF may start with a dot too
            msg = checked
            dots = msg.count(b"\r\n.")
        del msg[:2]  # the virtual CRLF (O(1) at the front of a bytearray)
        if msg[:1] == b".":
            del msg[:1]
        data = bytes(msg)
        if dots:
            data = data.replace(b"\r\n.", b"\r\n")
        self._msg = bytearray()
        if len(data) > self.settings.max_message_size:
            return self._reject_message(R.MESSAGE_TOO_BIG)
        return self._message_received(data, chunked=False)

    def _reject_message(self, reply: Reply) -> None:
        self._reset_transaction()
        self._error(reply)
        return None

    def _cmd_rset(self, arg: str) -> Event | None:
        if arg.strip(" "):
            self._error(R.syntax("RSET"))
            return None
        self._reset_transaction()
        self._send(R.OK)
        return None

    def _cmd_noop(self, arg: str) -> Event | None:
        self._send(R.OK)
        return None

    def _cmd_quit(self, arg: str) -> Event | None:
        self._close("quit", R.BYE)
        return None

    def _cmd_vrfy(self, arg: str) -> Event | None:
        if not arg.strip(" "):
            self._error(R.syntax("VRFY address"))
            return None
        self._send(R.VRFY_REPLY)
        return None

    def _cmd_expn(self, arg: str) -> Event | None:
        self._error(R.COMMAND_NOT_IMPLEMENTED)
        return None

    def _cmd_help(self, arg: str) -> Event | None:
        self._send(R.HELP)
        return None

    def _cmd_starttls(self, arg: str) -> Event | None:
        if arg.strip(" "):
            self._error(R.syntax("STARTTLS"))
            return None
        if self.tls_active:
            self._error(R.TLS_ALREADY_ACTIVE)
            return None
        if not self.settings.tls_available:
            self._error(R.COMMAND_NOT_IMPLEMENTED)
            return None
        if self._in_transaction:
            self._error(R.NOT_ALLOWED_DURING_TRANSACTION)
            return None
        self._send(R.START_TLS)
        # RFC 3207 5 / CVE-2011-0411: nothing pipelined after STARTTLS may survive.
        self._buf.clear()
        self._phase = Phase.STARTTLS
        self._pending = _Decision.TLS
        return StartTLSRequested()

    # -- AUTH -----------------------------------------------------------------------------

    def _cmd_auth(self, arg: str) -> Event | None:
        s = self.settings
        if not s.auth_enabled:
            self._error(R.AUTH_NOT_ENABLED)
            return None
        if not self._auth_allowed:
            self._error(R.AUTH_ENCRYPTION_REQUIRED)
            return None
        if not self.esmtp:
            self._error(R.SEND_HELO_FIRST)
            return None
        if self.authenticated_user is not None:
            self._error(R.AUTH_ALREADY)
            return None
        if self._in_transaction:
            self._error(R.NOT_ALLOWED_DURING_TRANSACTION)
            return None
        parts = arg.strip(" ").split(" ")
        if not parts[0] or len(parts) > 2:
            self._error(R.syntax("AUTH mechanism [initial-response]"))
            return None
        mechanism = parts[0].upper()
        if mechanism not in _AUTH_MECHANISMS:
            self._error(R.AUTH_UNKNOWN_MECHANISM)
            return None
        self._auth_mechanism = mechanism
        self._auth_step = "plain" if mechanism == "PLAIN" else "login_user"
        initial = parts[1] if len(parts) == 2 else None
        if initial is None:
            self._phase = Phase.AUTH
            self._send(_EMPTY_CHALLENGE if mechanism == "PLAIN" else _LOGIN_USERNAME)
            return None
        if initial == "*":
            self._error(R.AUTH_ABORTED)
            return None
        # RFC 4954 4: "=" is an initial response of zero length.
        return self._auth_data("" if initial == "=" else initial)

    def _auth_response(self, text: str) -> Event | None:
        """A continuation line while Phase.AUTH; "*" cancels (RFC 4954 4)."""
        self._phase = Phase.COMMAND
        if text == "*":
            self._error(R.AUTH_ABORTED)
            return None
        return self._auth_data(text)

    def _auth_data(self, b64: str) -> Event | None:
        """One base64 response of the exchange, interpreted by the current step."""
        try:
            raw = binascii.a2b_base64(b64, strict_mode=True) if b64 else b""
        except (binascii.Error, ValueError):
            self._error(R.AUTH_BAD_BASE64)
            return None
        step = self._auth_step
        if step == "plain":
            # RFC 4616: [authzid] NUL authcid NUL passwd
            parts = raw.split(b"\0")
            if len(parts) != 3:
                self._error(R.AUTH_BAD_BASE64)
                return None
            try:
                authzid, username = parts[0].decode("utf-8"), parts[1].decode("utf-8")
            except UnicodeDecodeError:
                self._error(R.AUTH_BAD_BASE64)
                return None
            return self._auth_requested(authzid, username, parts[2])
        if step == "login_user":
            try:
                self._auth_login_user = raw.decode("utf-8")
            except UnicodeDecodeError:
                self._error(R.AUTH_BAD_BASE64)
                return None
            self._auth_step = "login_pass"
            self._phase = Phase.AUTH
            self._send(_LOGIN_PASSWORD)
            return None
        return self._auth_requested("", self._auth_login_user, raw)

    def _auth_requested(self, authzid: str, username: str, password: bytes) -> AuthRequested:
        self._auth_username = username
        self._pending = _Decision.AUTH
        return AuthRequested(self._auth_mechanism, authzid, username, password)


def _has_long_run(data: bytearray | bytes, run_max: int) -> bool:
    """True if ``data`` holds more than ``run_max`` consecutive octets without LF.

    Not a per-line loop: from the start of a run, the last LF within the next
    ``run_max + 1`` octets (one C-level ``rfind``) ends every run in that window, so each
    probe moves on by nearly ``run_max``; a window without LF is a run too long. Ordinary
    text costs about ``len(data) / run_max`` probes (~10 for a 10 kB message).
    """
    n = len(data)
    rfind = data.rfind
    p = 0  # where the current run starts; every run before it is short enough
    while n - p > run_max:
        q = rfind(b"\n", p, p + run_max + 1)
        if q < 0:
            return True
        p = q + 1
    return False


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_COMMANDS = {
    "EHLO": ServerConnection._cmd_ehlo,
    "HELO": ServerConnection._cmd_helo,
    "MAIL": ServerConnection._cmd_mail,
    "RCPT": ServerConnection._cmd_rcpt,
    "DATA": ServerConnection._cmd_data,
    "BDAT": ServerConnection._cmd_bdat,
    "RSET": ServerConnection._cmd_rset,
    "NOOP": ServerConnection._cmd_noop,
    "QUIT": ServerConnection._cmd_quit,
    "VRFY": ServerConnection._cmd_vrfy,
    "EXPN": ServerConnection._cmd_expn,
    "HELP": ServerConnection._cmd_help,
    "STARTTLS": ServerConnection._cmd_starttls,
    "AUTH": ServerConnection._cmd_auth,
}


# The replies every connection gets, built once per distinct settings: formatting them
# per connection was a tenth of a short session's cost.


@functools.lru_cache(maxsize=64)
def _greeting(hostname: str) -> Reply:
    return R.greeting(hostname)


@functools.lru_cache(maxsize=64)
def _helo_reply(hostname: str) -> Reply:
    return Reply(250, None, hostname)


@functools.lru_cache(maxsize=64)
def _ehlo_reply(hostname: str, max_size: int, starttls: bool, auth: bool) -> Reply:
    lines = [hostname, "PIPELINING", f"SIZE {max_size}"]
    if starttls:
        lines.append("STARTTLS")
    if auth:
        lines.append("AUTH PLAIN LOGIN")
    lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8", "CHUNKING"]
    return Reply(250, None, lines)
