"""``relay report``: a summary of the JSON event log, like pflogsumm's of a mail log.

Pure functions over an iterable of events (``relay.events.types``), so a report can be
unit-tested without a file, and streaming: ``Aggregator.add`` takes one event at a time
and keeps only counters, so a multi-gigabyte log is never held in memory. What is kept
grows with the number of distinct domains, providers, tenants, campaigns (the tables),
reply texts (capped at ``max_reasons``; the rest are counted as ``(other)``) and, with a
chart, minutes; delivery delays are kept exactly up to ``exact_delays`` of them, then
in a histogram of 1% wide buckets (percentiles then within 1%).

What it counts (every count is of recipients, but ``received``, which is of messages):

- ``received``: Reception events (messages), with ``received_recipients``,
  ``received_bytes`` and ``received_via`` (smtp, http, dsn: our own bounces);
- ``delivered`` / ``deferred`` / ``bounced`` / ``expired``: Delivery, TransientFailure
  (each deferral of a recipient: a recipient deferred three times counts 3, as
  pflogsumm's "deferrals"), Bounce, Expiration events; ``suppressed`` and
  ``unsubscribed``: Suppressed and Unsubscribe events;
- per recipient domain, per provider (the ``destination`` of an attempt, when it is
  ``provider:NAME``), per tenant and per campaign (``tenant``/``campaign_id``): the same
  columns, ordered by volume; a Reception adds its recipients to their domains' and its
  message to its tenant's and campaign's ``received``;
- the top deferral and bounce (bounce and expiration) reasons: replies grouped by their
  enhanced status code (else the basic code) and their text normalised (addresses,
  and words with a digit in them, such as ids, IPs and counts, replaced; spaces
  collapsed; cut at 120 characters), with one reply as an example;
- the delivery delay: p50/p90/p99, mean and max of ``queued_seconds`` over deliveries
  (nearest-rank percentiles).

``since``/``until`` keep the events with ``since <= time < until`` (``parse_when`` reads
ISO 8601 and relative times such as ``1h`` or ``30m``).
"""

from __future__ import annotations

import contextlib
import gzip
import math
import re
import sys
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import IO

import msgspec

from relay.events.types import (
    Bounce,
    Delivery,
    Event,
    Expiration,
    Reception,
    Suppressed,
    TransientFailure,
    Unsubscribe,
    decode,
)

__all__ = [
    "Aggregator",
    "DelayStats",
    "EventReader",
    "Reason",
    "Report",
    "Row",
    "draw_chart",
    "format_report",
    "normalize_reply",
    "parse_when",
    "summarize",
]

# -- times -------------------------------------------------------------------------------

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(text: str, now: float) -> float:
    """Unix time of ``text``: ISO 8601 (``2024-05-01``, ``2024-05-01T10:00``,
    ``2024-05-01 10:00:00+02:00``; local time without an offset), a relative time
    before ``now`` (``90s``, ``30m``, ``1h``, ``2d``, ``1w``, ``1h30m``), ``now``, or
    Unix seconds. Raises ValueError with a message for people."""
    value = text.strip()
    if value == "now":
        return now
    if re.fullmatch(r"(?:\d+(?:\.\d+)?\s*[smhdw]\s*)+", value):
        return now - sum(float(n) * _UNITS[u] for n, u in _RELATIVE.findall(value))
    if re.fullmatch(r"\d{9,}(?:\.\d+)?", value):
        return float(value)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is not a time: use ISO 8601 (2024-05-01T10:00), "
                         "a relative time (30m, 1h, 2d) or Unix seconds") from None
    return when.timestamp()  # naive: local time


# -- reasons -----------------------------------------------------------------------------

_REPLY_CODES = re.compile(r"^(\d{3})(?:[ -]+([245]\.\d{1,3}\.\d{1,3})(?![\d.]))?[ -]*")
_ADDRESS = re.compile(r"<[^<>\s]*@[^<>\s]*>|[^\s<>()\[\];,\"']+@[^\s<>()\[\];,\"']+")
_DIGITS = re.compile(r"\S*\d\S*")
_SPACES = re.compile(r"\s+")
REASON_LENGTH = 120


def normalize_reply(reply: str) -> tuple[str, str]:
    """(code, text) that groups ``reply`` with the ones like it: ``code`` is the enhanced
    status code, else the basic code, else ""; ``text`` the rest with addresses replaced
    by ``<address>``, every word holding a digit (ids, IPs, counts) by ``#``, spaces
    collapsed, cut at ``REASON_LENGTH`` characters.

    ``"550 5.1.1 <bob@x.test>: user unknown (id 4f2a9)"`` -> ``("5.1.1", "<address>: user
    unknown (id #")``."""
    m = _REPLY_CODES.match(reply)
    if m:
        code = m.group(2) or m.group(1)
        rest = reply[m.end():]
    else:
        code, rest = "", reply
    rest = _ADDRESS.sub("<address>", rest)
    rest = _DIGITS.sub("#", rest)
    rest = _SPACES.sub(" ", rest).strip()
    return code, rest[:REASON_LENGTH]


# -- the result ----------------------------------------------------------------------------


class Row(msgspec.Struct, kw_only=True):
    """One line of a table (or the totals' columns): counts of recipients, but
    ``received``, which counts messages (for a domain: the recipients received for it)."""

    name: str = ""
    received: int = 0
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    expired: int = 0
    suppressed: int = 0

    def volume(self) -> int:
        return (self.received + self.delivered + self.deferred + self.bounced + self.expired
                + self.suppressed)


class Totals(Row, kw_only=True):
    received_recipients: int = 0
    received_bytes: int = 0
    received_via: dict[str, int] = msgspec.field(default_factory=dict)
    unsubscribed: int = 0


class Reason(msgspec.Struct, kw_only=True):
    code: str
    text: str
    count: int
    #: One reply of the group as it was.
    example: str


class DelayStats(msgspec.Struct, kw_only=True):
    """Seconds from arrival to delivery (``queued_seconds`` of the deliveries)."""

    count: int = 0
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    mean: float | None = None
    max: float | None = None


class Report(msgspec.Struct, kw_only=True):
    since: float | None = None
    until: float | None = None
    #: Times of the first and last event counted.
    first: float | None = None
    last: float | None = None
    events: int = 0
    #: Lines of the log that are not an event this version knows (a torn last line, a
    #: newer event type): skipped, and counted here.
    skipped_lines: int = 0
    totals: Totals = msgspec.field(default_factory=Totals)
    domains: list[Row] = msgspec.field(default_factory=list)
    providers: list[Row] = msgspec.field(default_factory=list)
    tenants: list[Row] = msgspec.field(default_factory=list)
    campaigns: list[Row] = msgspec.field(default_factory=list)
    deferral_reasons: list[Reason] = msgspec.field(default_factory=list)
    bounce_reasons: list[Reason] = msgspec.field(default_factory=list)
    delivery_delay: DelayStats = msgspec.field(default_factory=DelayStats)
    #: With ``per_minute``: [minute (Unix time), delivered, deferred, bounced+expired],
    #: every minute from the first to the last, in order.
    per_minute: list[tuple[int, int, int, int]] | None = None


# -- aggregation ---------------------------------------------------------------------------


class _Quantiles:
    """Nearest-rank percentiles of a stream: exact up to ``exact`` values, then from a
    histogram of buckets ``BUCKET`` (1%) wide in relative terms."""

    BUCKET = 1.01

    def __init__(self, exact: int) -> None:
        self.exact = exact
        self.values: array[float] | None = array("d")
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.sum = 0.0
        self.max = -math.inf
        self._log = math.log(self.BUCKET)

    def add(self, x: float) -> None:
        self.count += 1
        self.sum += x
        if x > self.max:
            self.max = x
        if self.values is not None:
            self.values.append(x)
            if len(self.values) > self.exact:
                for v in self.values:
                    self._bucket(v)
                self.values = None
        else:
            self._bucket(x)

    def _bucket(self, x: float) -> None:
        key = math.floor(math.log(x) / self._log) if x > 1e-6 else -(10**9)
        self.buckets[key] = self.buckets.get(key, 0) + 1

    def percentiles(self, ps: Sequence[float]) -> list[float | None]:
        if not self.count:
            return [None for _ in ps]
        ranks = [max(1, math.ceil(p / 100 * self.count)) for p in ps]
        if self.values is not None:
            ordered = sorted(self.values)
            return [ordered[r - 1] for r in ranks]
        out: list[float | None] = []
        keys = sorted(self.buckets)
        for r in ranks:
            seen = 0
            for k in keys:
                seen += self.buckets[k]
                if seen >= r:
                    mid = 0.0 if k == -(10**9) else self.BUCKET ** (k + 0.5)
                    out.append(min(mid, self.max))
                    break
        return out


class Aggregator:
    """Counts events as they come (see the module docstring); ``report()`` at the end.

    ``since``/``until`` bound the events' ``time``; ``per_minute`` also keeps the
    delivered / deferred / bounced counts of every minute (for a chart)."""

    def __init__(self, *, since: float | None = None, until: float | None = None,
                 per_minute: bool = False, max_reasons: int = 10000,
                 exact_delays: int = 1_000_000) -> None:
        self.since = since
        self.until = until
        self.max_reasons = max_reasons
        self.events = 0
        self.skipped_lines = 0
        self.first: float | None = None
        self.last: float | None = None
        self.totals = Totals()
        self.domains: dict[str, Row] = {}
        self.providers: dict[str, Row] = {}
        self.tenants: dict[str, Row] = {}
        self.campaigns: dict[str, Row] = {}
        self.deferrals: dict[tuple[str, str], list] = {}  # key -> [count, example]
        self.bounces: dict[tuple[str, str], list] = {}
        self.delays = _Quantiles(exact_delays)
        self.minutes: dict[int, list[int]] | None = {} if per_minute else None

    @staticmethod
    def _row(table: dict[str, Row], name: str) -> Row:
        row = table.get(name)
        if row is None:
            row = table[name] = Row(name=name)
        return row

    def _rows(self, event: Event) -> list[Row]:
        """The tenant's and the campaign's rows of ``event`` (when it names them)."""
        rows = []
        if event.tenant is not None:
            rows.append(self._row(self.tenants, event.tenant))
        if event.campaign_id is not None:
            rows.append(self._row(self.campaigns, event.campaign_id))
        return rows

    def _reason(self, table: dict[tuple[str, str], list], reply: str) -> None:
        key = normalize_reply(reply)
        entry = table.get(key)
        if entry is None:
            if len(table) >= self.max_reasons:
                key = ("", "(other)")
                entry = table.get(key)
            if entry is None:
                entry = table[key] = [0, reply]
        entry[0] += 1

    def add(self, event: Event) -> None:
        """Count ``event`` (ignored outside ``since``/``until``, or of a type without a
        column)."""
        t = event.time
        if (self.since is not None and t < self.since) or (
                self.until is not None and t >= self.until):
            return
        self.events += 1
        if self.first is None or t < self.first:
            self.first = t
        if self.last is None or t > self.last:
            self.last = t
        totals = self.totals
        if isinstance(event, Reception):
            totals.received += 1
            totals.received_recipients += len(event.recipients)
            totals.received_bytes += event.size
            totals.received_via[event.via] = totals.received_via.get(event.via, 0) + 1
            for row in self._rows(event):
                row.received += 1
            for rcpt in event.recipients:
                self._row(self.domains, _domain(rcpt)).received += 1
            return
        if isinstance(event, Unsubscribe):
            totals.unsubscribed += 1
            return
        if isinstance(event, Suppressed):
            totals.suppressed += 1
            self._row(self.domains, _domain(event.recipient)).suppressed += 1
            for row in self._rows(event):
                row.suppressed += 1
            return
        if not isinstance(event, Delivery | TransientFailure | Bounce | Expiration):
            return
        rows = self._rows(event)
        rows.append(self._row(self.domains, _domain(event.recipient)))
        if event.destination.startswith("provider:"):
            rows.append(self._row(self.providers, event.destination[9:]))
        column: str
        if isinstance(event, Delivery):
            column, bucket = "delivered", 1
            self.delays.add(event.queued_seconds)
        elif isinstance(event, TransientFailure):
            column, bucket = "deferred", 2
            self._reason(self.deferrals, event.reply)
        else:
            column, bucket = ("bounced" if isinstance(event, Bounce) else "expired"), 3
            self._reason(self.bounces, event.reply)
        setattr(totals, column, getattr(totals, column) + 1)
        for row in rows:
            setattr(row, column, getattr(row, column) + 1)
        if self.minutes is not None:
            minute = int(t // 60) * 60
            counts = self.minutes.get(minute)
            if counts is None:
                counts = self.minutes[minute] = [0, 0, 0, 0]
            counts[bucket] += 1

    def report(self, top: int = 10) -> Report:
        """The result; tables and reasons cut to the ``top`` largest (0: all of them)."""

        def table(rows: dict[str, Row]) -> list[Row]:
            ordered = sorted(rows.values(), key=lambda r: (-r.volume(), r.name))
            return ordered[:top] if top else ordered

        def reasons(entries: dict[tuple[str, str], list]) -> list[Reason]:
            ordered = sorted(entries.items(), key=lambda kv: (-kv[1][0], kv[0]))
            cut = ordered[:top] if top else ordered
            return [Reason(code=k[0], text=k[1], count=v[0], example=v[1]) for k, v in cut]

        p50, p90, p99 = self.delays.percentiles((50, 90, 99))
        delays = DelayStats(count=self.delays.count)
        if self.delays.count:
            delays = DelayStats(count=self.delays.count, p50=p50, p90=p90, p99=p99,
                                mean=self.delays.sum / self.delays.count, max=self.delays.max)
        per_minute = None
        if self.minutes is not None:
            per_minute = []
            if self.minutes:
                first, last = min(self.minutes), max(self.minutes)
                for minute in range(first, last + 60, 60):
                    c = self.minutes.get(minute, [0, 0, 0, 0])
                    per_minute.append((minute, c[1], c[2], c[3]))
        return Report(
            since=self.since, until=self.until, first=self.first, last=self.last,
            events=self.events, skipped_lines=self.skipped_lines, totals=self.totals,
            domains=table(self.domains), providers=table(self.providers),
            tenants=table(self.tenants), campaigns=table(self.campaigns),
            deferral_reasons=reasons(self.deferrals), bounce_reasons=reasons(self.bounces),
            delivery_delay=delays, per_minute=per_minute,
        )


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower() or "(none)"


def summarize(events: Iterable[Event], *, since: float | None = None,
              until: float | None = None, top: int = 10, per_minute: bool = False) -> Report:
    """The report of ``events`` (consumed one at a time)."""
    agg = Aggregator(since=since, until=until, per_minute=per_minute)
    for event in events:
        agg.add(event)
    return agg.report(top)


# -- reading logs --------------------------------------------------------------------------


class EventReader:
    """Iterates over the events of JSON-lines logs, one line at a time: ``paths`` are
    files (``.gz`` ones decompressed as they are read) or ``-`` for standard input.
    Lines that do not decode as an event are skipped and counted in ``skipped``.
    Raises OSError when a file cannot be opened."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)
        self.skipped = 0

    def __iter__(self) -> Iterator[Event]:
        for path in self.paths:
            with _open_log(path) as f:
                for line in f:
                    if not line.strip():
                        continue
                    try:
                        yield decode(line)
                    except msgspec.DecodeError:  # ValidationError included
                        self.skipped += 1


def _open_log(path: str) -> contextlib.AbstractContextManager[IO[bytes]]:
    if path == "-":
        return contextlib.nullcontext(sys.stdin.buffer)
    if path.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


# -- text ----------------------------------------------------------------------------------


def _fmt_time(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _fmt_secs(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 60:
        return f"{x:.2f}s"
    if x < 3600:
        return f"{x / 60:.1f}m"
    if x < 86400:
        return f"{x / 3600:.1f}h"
    return f"{x / 86400:.1f}d"


def _fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


_COLUMNS = ("received", "delivered", "deferred", "bounced", "expired", "suppressed")


def _table(title: str, key: str, rows: list[Row],
           columns: Sequence[str] = _COLUMNS) -> list[str]:
    if not rows:
        return []
    cells = [[key, *columns]] + [[r.name, *(str(getattr(r, c)) for c in columns)]
                                 for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["", f"{title}", "-" * len(title)]
    lines += ["  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in
                                                     zip(row[1:], widths[1:], strict=True)])
              .rstrip() for row in cells]
    return lines


def _reasons(title: str, reasons: list[Reason]) -> list[str]:
    if not reasons:
        return []
    width = max(len(str(r.count)) for r in reasons)
    lines = ["", title, "-" * len(title)]
    for r in reasons:
        lines.append(f"{r.count:>{width}}  {r.code or '-':<7}  {r.text}")
    return lines


def format_report(report: Report) -> str:
    """The report for people, in pflogsumm's spirit: grand totals, the delivery delay,
    the tables, the top reasons."""
    t = report.totals
    span = f"{_fmt_time(report.first)} .. {_fmt_time(report.last)}"
    via = ", ".join(f"{k} {v}" for k, v in sorted(t.received_via.items()))
    lines = [f"Grand totals ({span}, {report.events} events)", "-" * 12,
             f"{t.received:>9}  received ({via or 'none'}; {t.received_recipients} "
             f"recipients, {_fmt_bytes(t.received_bytes)})",
             f"{t.delivered:>9}  delivered",
             f"{t.deferred:>9}  deferred (recipient deferrals)",
             f"{t.bounced:>9}  bounced",
             f"{t.expired:>9}  expired",
             f"{t.suppressed:>9}  suppressed",
             f"{t.unsubscribed:>9}  unsubscribed"]
    if report.skipped_lines:
        lines.append(f"{report.skipped_lines:>9}  log lines skipped (not an event)")
    d = report.delivery_delay
    lines += ["", f"Delivery delay ({d.count} deliveries): p50 {_fmt_secs(d.p50)}  "
                  f"p90 {_fmt_secs(d.p90)}  p99 {_fmt_secs(d.p99)}  "
                  f"mean {_fmt_secs(d.mean)}  max {_fmt_secs(d.max)}"]
    lines += _table("Per recipient domain", "domain", report.domains)
    lines += _table("Per provider", "provider", report.providers, _COLUMNS[1:5])
    lines += _table("Per tenant", "tenant", report.tenants)
    lines += _table("Per campaign", "campaign", report.campaigns)
    lines += _reasons("Deferral reasons", report.deferral_reasons)
    lines += _reasons("Bounce reasons", report.bounce_reasons)
    return "\n".join(lines) + "\n"


# -- chart ---------------------------------------------------------------------------------


def draw_chart(report: Report, path: str) -> None:
    """Delivered / deferred / bounced (expired included) per minute as a PNG at
    ``path`` (matplotlib with the Agg backend; ImportError when it is missing).
    ``report`` must have been made with ``per_minute``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    series = report.per_minute or []
    when = [datetime.fromtimestamp(m) for m, *_ in series]
    fig, ax = plt.subplots(figsize=(10, 4), dpi=100)
    try:
        for i, (label, color) in enumerate((("delivered", "tab:green"),
                                            ("deferred", "tab:orange"),
                                            ("bounced", "tab:red")), start=1):
            ax.plot(when, [row[i] for row in series], label=label, color=color,
                    drawstyle="steps-mid")
        ax.set_ylabel("recipients per minute")
        ax.set_title(f"relay: {_fmt_time(report.first)} .. {_fmt_time(report.last)}")
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d %H:%M"))
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left")
        fig.autofmt_xdate()
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
