"""The mail log: Postfix-style lines, a subscriber of the bus (``log.mail_log``).

Fed only by events, one line per reception and per recipient outcome, in the format
Postfix's smtpd, qmgr and smtp write, so that people who know Postfix can read it and
``pflogsumm --syslog-name=relay`` summarises it::

    Dec  2 01:02:03 relay.example relay/smtpd[812]: 4Xk2pQ9zR1: client=unknown[192.0.2.7]
    ... relay/qmgr[812]: 4Xk2pQ9zR1: from=<a@b.example>, size=2310, nrcpt=1 (queue active)
    ... relay/smtp[813]: 4Xk2pQ9zR1: to=<r@d.example>, relay=mx.d.example[198.51.100.4]:25,
        delay=1.2, delays=0/0/0/1.2, dsn=2.0.0, status=sent (250 2.0.0 Ok)

(each line of the file is one of these, time stamp, host and program included).

Which line each event makes, and its program name (``relay/NAME[pid]``, the worker's pid):

- ``Reception`` over SMTP: ``smtpd`` ``client=unknown[IP]`` (``, sasl_username=U`` when
  authenticated; the relay does no reverse lookup, so the name is Postfix's ``unknown``),
  then ``qmgr`` ``from=<S>, size=N, nrcpt=N (queue active)``. Over HTTP the first line is
  ``pickup`` ``sender=<S>, client=unknown[IP], via=http`` (Postfix's local submission,
  which pflogsumm counts as received). A DSN of ours (``via="dsn"``) gets the ``qmgr``
  line only, as a Postfix bounce message does, so it is not counted as received.
- ``Delivery`` / ``TransientFailure`` / ``Bounce``: ``smtp`` ``to=<R>, relay=MX[IP]:PORT,
  delay=D, delays=a/b/c/d, dsn=X.Y.Z, status=sent|deferred|bounced (REPLY)``;
  ``relay=none`` when no server was reached, ``:PORT`` left out when the engine did not
  report it. A Bounce whose DSN was queued adds ``bounce`` ``sender non-delivery
  notification: DSNQUEUEID``.
- ``Expiration``: ``qmgr`` ``to=<R>, ..., status=expired, returned to sender (REPLY)``
  (or ``status=expired (REPLY)`` when no DSN was owed), plus the notification line.
- ``Suppressed``: ``qmgr`` ``to=<R>, relay=none, ..., status=suppressed (SOURCE)``;
  ``Unsubscribe``: ``http`` ``NOQUEUE: unsubscribe: to=<R>, client=unknown[IP], ...``.

``dsn=`` is the reply's enhanced status code; without one, the class of the outcome
(2.0.0, 4.0.0, 5.0.0, and 4.4.7 for an expiration), as Postfix does.

``delay`` is ``queued_seconds`` (arrival to this outcome). Postfix splits it into
``delays=a/b/c/d``: a = before the queue manager, b = in the queue, c = connection setup
(DNS, connect, greeting, HELO, TLS), d = transmission. The relay maps them to what it
measures:

- a = 0. The relay's arrival time is the end of data, and the commit that follows is on
  the reception event (``commit_seconds``), not on the outcome events: it is not known
  here, and Postfix writes 0 for a part it does not have.
- c = ``connect_seconds``: the part of the attempt spent opening the connection (0 on a
  reused connection, or when the engine did not measure it; it is then part of b).
- d = ``seconds - connect_seconds``: the attempt on the connection, from taking the job
  to the reply (or, for a connection that failed, the time trying the hosts).
- b = ``delay - c - d`` (never below 0): waiting in the queue, for retries, for a
  connection slot or a rate token.

Numbers are written as Postfix does: 0 below 0.01s, two significant digits below 10s
("0.86", "1.2"), whole seconds above.

``level`` (``log.mail_log_level``) picks the lines: ``info`` all of them, ``warning``
deferrals, bounces and expirations, ``error`` bounces and expirations.

Where the lines go:

- a file path: appended whole lines per write (``relay.events.appender``: the lines of
  one scheduler pass in one ``os.write`` while ``run()`` runs), so lines of several
  workers never interleave. Each line starts with a syslog-style time stamp (local time,
  from the event's ``time``), the host name and the program: what pflogsumm parses.
  ``reopen()`` (SIGUSR1) opens the file afresh after logrotate moved it.
- ``"-"`` or ``"stderr"``: one record per line on the logger ``relay.mail`` of the
  process log, which adds its own time stamp (slower than a file: a logging record each).
  That logger gets ``level`` as its own, so the process log's ``log.level`` does not
  hide the mail log.

The cost is a few microseconds per event (``tests/unit/test_maillog.py`` measures it).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence

import trio

from relay.events.appender import Appender
from relay.events.types import (
    Bounce,
    Delivery,
    Event,
    Expiration,
    Reception,
    Suppressed,
    TransientFailure,
    Unsubscribe,
)

__all__ = ["LEVELS", "MailLog", "fmt_seconds", "syslog_stamp"]

#: ``log.mail_log_level`` names and the level of each kind of line.
LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
           "Dec")

STDERR_TARGETS = ("-", "stderr")


def syslog_stamp(t: float) -> str:
    """``Dec  2 01:02:03``: the traditional syslog time stamp of Unix time ``t`` (local
    time, English month names whatever the locale, the day padded with a space)."""
    tm = time.localtime(t)
    return (f"{_MONTHS[tm.tm_mon - 1]} {tm.tm_mday:2d} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d}")


def fmt_seconds(x: float) -> str:
    """A duration as Postfix writes it: ``0`` below 0.01, two significant digits below
    10 (``0.012``, ``0.86``, ``1.2``), whole seconds from 10 on (``344263``)."""
    if x < 0.01:
        return "0"
    if x < 9.95:
        return "%.2g" % x  # noqa: UP031 (the fastest way)
    return str(int(x + 0.5))


def _dsn(reply: str, default: str) -> str:
    """The enhanced status code of ``reply`` ("250 2.0.0 Ok" -> "2.0.0"), or ``default``
    (no regex: this runs for every outcome)."""
    if len(reply) > 8 and reply[5] == "." and reply[3] in " -" and reply[4] in "245":
        end = reply.find(" ", 6)
        code = reply[4:end] if end > 0 else reply[4:]
        if code.count(".") == 2 and code.replace(".", "").isdigit():
            return code
    return default


def _one_line(text: str) -> str:
    return text.replace("\r\n", " ").replace("\r", " ").replace("\n", " ")


class MailLog:
    """The bus subscriber (see the module docstring). One per worker process: the pid
    in its lines is the process that made it. Not thread-safe (trio, one thread)."""

    def __init__(self, target: str | os.PathLike[str], *, hostname: str,
                 level: str = "info", pid: int | None = None,
                 syslog_name: str = "relay") -> None:
        if level not in LEVELS:
            raise ValueError(f"mail log level {level!r}: not one of {', '.join(LEVELS)}")
        self.path = str(target)
        self.hostname = hostname
        self.pid = os.getpid() if pid is None else pid
        self.syslog_name = syslog_name
        # The level of each kind of line; an event type not named here makes none.
        self._levels = {Reception: logging.INFO, Delivery: logging.INFO,
                        Suppressed: logging.INFO, Unsubscribe: logging.INFO,
                        TransientFailure: logging.WARNING, Bounce: logging.ERROR,
                        Expiration: logging.ERROR}
        self._wanted = {kind: lvl >= LEVELS[level] for kind, lvl in self._levels.items()}
        self._formatters: dict[type, Callable[[Event, list[tuple[str, str]]], None]] = {
            Reception: self._reception,  # type: ignore[dict-item]
            Delivery: self._delivery,  # type: ignore[dict-item]
            TransientFailure: self._deferred,  # type: ignore[dict-item]
            Bounce: self._bounced,  # type: ignore[dict-item]
            Expiration: self._expired,  # type: ignore[dict-item]
            Suppressed: self._suppressed,  # type: ignore[dict-item]
            Unsubscribe: self._unsubscribe,  # type: ignore[dict-item]
        }
        self._stamp_second = -1
        self._head = ""
        self._tail = f"[{self.pid}]: "
        self._logger: logging.Logger | None = None
        self._file: Appender | None = None
        if self.path in STDERR_TARGETS:
            # Its own level, not log.level's: log.level = "warning" keeps the mail log.
            self._logger = logging.getLogger("relay.mail")
            self._logger.setLevel(LEVELS[level])
        else:
            self._file = Appender(self.path)

    # -- the subscriber ----------------------------------------------------------------

    def __call__(self, events: Sequence[Event]) -> None:
        """Format the lines of ``events`` and write them (one write for a file)."""
        if self._file is None and self._logger is None:
            return
        out: list[tuple[str, str]] = []  # (program, "QUEUEID: text")
        levels: list[int] = []
        wanted, formatters = self._wanted, self._formatters
        for event in events:
            kind = type(event)
            if not wanted.get(kind, False):
                continue
            before = len(out)
            formatters[kind](event, out)
            if self._logger is not None:
                levels += [self._levels[kind]] * (len(out) - before)
        if not out:
            return
        if self._logger is not None:
            for (program, text), lvl in zip(out, levels, strict=True):
                self._logger.log(lvl, "%s: %s", program, _one_line(text))
            return
        assert self._file is not None
        self._file.add(self._lines(events, out).encode("utf-8", "backslashreplace"))

    def _lines(self, events: Sequence[Event], out: list[tuple[str, str]]) -> str:
        # One time stamp for the batch: the events of one outcome share their time, and a
        # syslog daemon stamps at arrival too. Cached per second (strftime is slow).
        t = events[-1].time
        second = int(t)
        if second != self._stamp_second:
            self._stamp_second = second
            self._head = f"{syslog_stamp(t)} {self.hostname} {self.syslog_name}/"
        head, tail = self._head, self._tail
        if len(out) == 1:
            program, line = out[0]
            text = f"{head}{program}{tail}{line}\n"
        else:
            text = "\n".join([f"{head}{program}{tail}{line}" for program, line in out]) + "\n"
        if "\r" in text or text.count("\n") != len(out):
            # A reply with a line break in it must not make two lines of one.
            text = "\n".join([f"{head}{program}{tail}{_one_line(line)}"
                              for program, line in out]) + "\n"
        return text

    # -- the lines of each event -------------------------------------------------------

    @staticmethod
    def _reception(e: Reception, out: list[tuple[str, str]]) -> None:
        qid = e.queue_id
        if e.via == "smtp":
            sasl = f", sasl_username={e.auth_user}" if e.auth_user else ""
            out.append(("smtpd", f"{qid}: client=unknown[{e.client_ip}]{sasl}"))
        elif e.via != "dsn":
            out.append(("pickup", f"{qid}: sender=<{e.sender}>, client=unknown[{e.client_ip}],"
                                  f" via={e.via}"))
        out.append(("qmgr", f"{qid}: from=<{e.sender}>, size={e.size}, "
                            f"nrcpt={len(e.recipients)} (queue active)"))

    @staticmethod
    def _attempt(e: Delivery | TransientFailure | Bounce | Expiration, status: str,
                 default_dsn: str) -> str:
        if e.mx_host:
            relay = f"{e.mx_host}[{e.ip}]:{e.port}" if e.port else f"{e.mx_host}[{e.ip}]"
        else:
            relay = "none"
        delay = e.queued_seconds
        c = e.connect_seconds
        d = max(0.0, e.seconds - c)
        b = max(0.0, delay - c - d)
        reply = e.reply
        return (f"{e.queue_id}: to=<{e.recipient}>, relay={relay}, delay={fmt_seconds(delay)},"
                f" delays=0/{fmt_seconds(b)}/{fmt_seconds(c)}/{fmt_seconds(d)}, "
                f"dsn={_dsn(reply, default_dsn)}, status={status} ({reply})")

    def _delivery(self, e: Delivery, out: list[tuple[str, str]]) -> None:
        out.append(("smtp", self._attempt(e, "sent", "2.0.0")))

    def _deferred(self, e: TransientFailure, out: list[tuple[str, str]]) -> None:
        out.append(("smtp", self._attempt(e, "deferred", "4.0.0")))

    def _bounced(self, e: Bounce, out: list[tuple[str, str]]) -> None:
        out.append(("smtp", self._attempt(e, "bounced", "5.0.0")))
        self._notification(e.queue_id, e.dsn_queue_id, out)

    def _expired(self, e: Expiration, out: list[tuple[str, str]]) -> None:
        status = "expired, returned to sender" if e.dsn_queue_id else "expired"
        out.append(("qmgr", self._attempt(e, status, "4.4.7")))
        self._notification(e.queue_id, e.dsn_queue_id, out)

    @staticmethod
    def _notification(qid: str, dsn_qid: str, out: list[tuple[str, str]]) -> None:
        """Postfix's bounce line, once per DSN (one DSN covers every failed recipient
        of an outcome, whose events come in one batch)."""
        if dsn_qid:
            line = f"{qid}: sender non-delivery notification: {dsn_qid}"
            if ("bounce", line) not in out:
                out.append(("bounce", line))

    @staticmethod
    def _suppressed(e: Suppressed, out: list[tuple[str, str]]) -> None:
        out.append(("qmgr", f"{e.queue_id}: to=<{e.recipient}>, relay=none, delay=0, "
                            f"delays=0/0/0/0, dsn=5.7.1, status=suppressed "
                            f"(on the suppression list: {e.source or 'unknown'})"))

    @staticmethod
    def _unsubscribe(e: Unsubscribe, out: list[tuple[str, str]]) -> None:
        out.append(("http", f"{e.queue_id or 'NOQUEUE'}: unsubscribe: to=<{e.recipient}>, "
                            f"client=unknown[{e.client_ip}], method={e.method}"))

    # -- files ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Batch the file writes of each scheduler pass (``Appender.run``); returns at
        once for the process log."""
        if self._file is None:
            task_status.started()
            return
        await self._file.run(task_status=task_status)

    def flush(self) -> None:
        """Write the lines batched so far (``Appender.flush``)."""
        if self._file is not None:
            self._file.flush()

    def reopen(self) -> None:
        """Open the file afresh (SIGUSR1 after logrotate); the new descriptor is in place
        before the old one is closed. A failed open raises and keeps the old file. Nothing
        to do for the process log or a closed log."""
        if self._file is not None:
            self._file.reopen()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._logger = None
