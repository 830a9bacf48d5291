"""``relay``: the operator's command line.

    relay serve --config conf/relay.toml
    relay check-config conf/relay.toml
    relay queue [--config F] stats|list|show ID|retry [ID]|delete ID  [--domain D] [--json]
    relay queue suspend|resume --domain D|--provider P|--tenant T|--campaign C|--source S
                [--duration 2h] [--reason TEXT]
    relay queue bounce [ID] [--domain D] [--provider P] ... [--reason TEXT]   (no DSN)
    relay shaping status [--config F] [--json]
    relay hash-password            (reads the password from stdin)
    relay dkim keygen --domain D --selector S [--algorithm A] [--bits N] [--out DIR]
    relay report [--config F | --events FILE...] [--since T] [--until T] [--top N] [--json]
                 [--chart FILE.png]
    relay bounce classify TEXT|- [--provider NAME] [--config F | --rules FILE] [--json]

``queue stats`` and ``queue list`` print for people (sizes in KiB/MiB, ages like
``3h12m``; ``list`` looks like Postfix's ``mailq``, ``*`` marking a message with a delivery
in flight); ``--json`` prints the spool's views (relay.spool.views) for programs.

Errors an operator can cause (a bad config, an unknown queue id) print one line on
stderr and exit non-zero; they never show a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from relay.config import Config, ConfigError, load_config, parse_duration

if TYPE_CHECKING:
    from collections.abc import Callable

    from relay.events import EventLog
    from relay.model import DeliveryJob, Envelope
    from relay.spool import Spool
    from relay.spool.shaping import ShapingEntry, ShapingStore
    from relay.spool.views import QueueEntry, QueueStats

    #: A bounce selector: does this job (of this message) match?
    Matcher = Callable[[DeliveryJob, Envelope], bool]

__all__ = ["main"]

DEFAULT_CONFIG = "conf/relay.toml"

EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_CANTCREAT, EX_CONFIG = 64, 65, 66, 73, 78


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s relay[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as e:
        raise CliError(str(e), EX_CONFIG) from None


# -- serve / check-config --------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.preflight import StartupError, preflight
    from relay.supervisor import Supervisor
    from relay.worker import run_worker

    config = _load(args.config)
    # Everything a worker would trip over is found here, before any is forked: one
    # line per problem, no traceback, no restart loop.
    problems = preflight(config, args.config)
    if problems:
        raise CliError("\nrelay: ".join(problems), EX_CONFIG)
    _setup_logging(config.log.level)
    try:
        return Supervisor(config, args.config, run_worker).run()
    except StartupError as e:  # the spool is locked by another relay, a port is taken
        raise CliError("\nrelay: ".join(e.problems), e.code) from None


def cmd_check_config(args: argparse.Namespace) -> int:
    from relay.preflight import preflight

    config = _load(args.path)
    problems = preflight(config, args.path, dry_run=True)
    if problems:
        raise CliError("\nrelay: ".join(problems), EX_CONFIG)
    n = config.server.resolved_workers()
    print(f"{args.path}: OK ({n} worker{'' if n == 1 else 's'}, "
          f"listening on {', '.join(config.inbound.listen)}, spool {config.spool.path})")
    for domain in args.explain or []:
        import trio

        from relay.outbound.explain import explain

        print("\n".join(trio.run(explain, config, domain)))
    return 0


# -- queue -----------------------------------------------------------------------------


def _open_spool(config: Config):  # type: ignore[no-untyped-def]
    from relay.spool import Spool

    path = Path(config.spool.path)
    if not (path / "data.mdb").exists():
        raise CliError(f"no spool at {path} (spool.path in the config)", EX_NOINPUT)
    return Spool(str(path), config.spool.map_size_bytes())


def _print_json(value: object) -> None:
    sys.stdout.write(msgspec.json.format(msgspec.json.encode(value)).decode() + "\n")


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def fmt_size(n: int) -> str:
    """Bytes for people: ``512 B``, ``1.5 KiB``, ``12.3 MiB`` (binary multiples)."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if round(value, 1) < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def fmt_age(seconds: float) -> str:
    """A duration in its two largest units: ``45s``, ``5m30s``, ``3h12m``, ``2d4h``
    (a zero second unit is left out: ``3h``, ``2d``)."""
    s = max(0, int(seconds))
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    for big, big_unit, small, small_unit in (
        (days, "d", hours, "h"), (hours, "h", minutes, "m"), (minutes, "m", s, "s"),
    ):
        if big:
            return f"{big}{big_unit}{small}{small_unit}" if small else f"{big}{big_unit}"
    return f"{s}s"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def format_queue_stats(stats: QueueStats) -> str:
    """``relay queue stats`` for people (``--json`` prints the QueueStats as it is)."""
    lines = [
        f"{'Messages:':<16}{stats.messages} ({fmt_size(stats.bytes)})",
        f"{'Recipients:':<16}{stats.recipients} still to deliver",
        f"{'Delivery jobs:':<16}{stats.jobs} ({stats.jobs_due} due now, {stats.jobs_deferred} "
        f"deferred, {stats.jobs_in_flight} in flight)",
    ]
    if stats.oldest_arrival is None:
        lines.append(f"{'Oldest message:':<16}-")
    else:
        lines.append(f"{'Oldest message:':<16}{fmt_age(stats.now - stats.oldest_arrival)} old "
                     f"(arrived {_fmt_time(stats.oldest_arrival)})")
    if stats.top_domains:
        rows = [("Top domains", "Messages", "Recipients")] + [
            (d.domain, str(d.messages), str(d.recipients)) for d in stats.top_domains
        ]
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        w2 = max(len(r[2]) for r in rows)
        lines.append("")
        lines += [f"{a:<{w0}}  {b:>{w1}}  {c:>{w2}}" for a, b, c in rows]
    return "\n".join(lines) + "\n"


_LIST_HEADER = f"{'-Queue ID-':<19} {'--Size--':>10} {'-Age-':>6}  -Sender/Recipient-"
_RCPT_INDENT = " " * (19 + 1 + 10 + 1 + 6 + 2)


def format_queue_list(entries: Sequence[QueueEntry], now: float, *, more: bool = False) -> str:
    """``relay queue list`` for people, like Postfix's ``mailq``: one entry per message
    (queue id, ``*`` when a delivery is in flight, size, age, sender), each recipient
    still to deliver below it with the last transient reply in parentheses, then
    ``-- N KiB in M messages.`` An empty list is ``Mail queue is empty``."""
    if not entries:
        return "Mail queue is empty\n"
    lines = [_LIST_HEADER]
    total = 0
    for e in entries:
        total += e.size
        flag = "*" if any(d.in_flight for d in e.domains) else ""
        lines.append(f"{e.queue_id + flag:<19} {fmt_size(e.size):>10} "
                     f"{fmt_age(now - e.arrival):>6}  {e.sender or '<>'}")
        for d in e.domains:
            reply = f" ({' '.join(d.last_error.split())})" if d.last_error else ""
            lines += [f"{_RCPT_INDENT}{rcpt}{reply}" for rcpt in d.pending]
        lines.append("")
    kib = -(-total // 1024)
    count = _plural(len(entries), "message")
    if more:
        lines.append(f"-- {kib} KiB in {count} shown; more are queued (raise --limit).")
    else:
        lines.append(f"-- {kib} KiB in {count}.")
    return "\n".join(lines) + "\n"


def cmd_queue(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if args.action in _CONTROL_ACTIONS:
        return _queue_control(config, args)
    for name in _CONTROL_ONLY:
        if getattr(args, name) is not None:
            raise CliError(f"--{name} is for queue suspend|resume|bounce", EX_USAGE)
    spool = _open_spool(config)
    try:
        return _queue_action(spool, args)
    finally:
        spool.close()


def _no_such_message(queue_id: str) -> CliError:
    return CliError(f"{queue_id}: no such message in the queue", EX_DATAERR)


def _queue_action(spool, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    action = args.action
    # Queue ids are ASCII; anything else cannot be in the queue (and must not reach the
    # spool's ASCII key encoding as a traceback).
    if action in ("show", "retry", "delete") and args.queue_id and not args.queue_id.isascii():
        raise _no_such_message(args.queue_id)
    if action == "stats":
        stats = spool.stats()
        if args.json:
            _print_json(stats)
        else:
            sys.stdout.write(format_queue_stats(stats))
        return 0
    if action == "list":
        if args.json:
            _print_json(spool.list_messages(domain=args.domain, limit=args.limit))
            return 0
        if args.limit < 1:
            raise CliError("queue list --limit must be at least 1", EX_USAGE)
        entries = spool.list_messages(domain=args.domain, limit=args.limit + 1)
        more = len(entries) > args.limit
        if not entries and args.domain:
            print(f"No mail for {args.domain} in the queue")
            return 0
        sys.stdout.write(format_queue_list(entries[: args.limit], time.time(), more=more))
        return 0
    if action == "show":
        if not args.queue_id:
            raise CliError("queue show needs a queue id", EX_USAGE)
        entry = spool.show(args.queue_id)
        if entry is None:
            raise _no_such_message(args.queue_id)
        _print_json(entry)
        return 0
    if action == "retry":
        n = spool.retry_now(queue_id=args.queue_id, domain=args.domain)
        if n == 0 and args.queue_id and spool.show(args.queue_id) is None:
            raise _no_such_message(args.queue_id)
        print(f"{n} delivery job(s) scheduled for immediate retry")
        return 0
    if action == "delete":
        if not args.queue_id:
            raise CliError("queue delete needs a queue id", EX_USAGE)
        if not spool.delete(args.queue_id):
            raise _no_such_message(args.queue_id)
        print(f"{args.queue_id}: deleted")
        return 0
    raise CliError(f"unknown queue action {action!r}", EX_USAGE)


# -- queue control: suspend, resume, bounce; shaping status ----------------------------

_CONTROL_ACTIONS = ("suspend", "resume", "bounce")
_SELECTORS = ("domain", "provider", "tenant", "campaign", "source")
#: Options only queue suspend|resume|bounce read (another action would ignore them).
_CONTROL_ONLY = ("provider", "tenant", "campaign", "source", "duration", "reason")
#: sysexits EX_IOERR and EX_TEMPFAIL ("try again later": some mail was being delivered).
EX_IOERR, EX_TEMPFAIL = 74, 75

_QUEUE_EPILOG = """\
suspend|resume take exactly one selector. Suspended mail stays queued, deferred (not
  an attempt), until it is resumed or --duration runs out. The workers re-read the
  shaping table at every scheduler round, so a change takes effect within about a
  second on every worker. --domain D: mail to recipient domain D; --provider P: the
  destinations of [outbound.providers.P]; --source S: deliveries through
  [egress.sources.S]; --tenant T / --campaign C: the messages' tenant or campaign.
bounce takes selectors (all must match) and/or a QUEUE_ID: every recipient still
  queued for that mail fails now WITHOUT a DSN (KumoMTA's admin bounce: the sender is
  not told), one AdminBounce event per recipient in log.events. --provider matches
  the domains whose MX hosts are the provider's now (outbound.resolvers; when DNS
  fails, the provider the mail was last routed to); --source matches the mail of
  every pool that includes the source. Recipients a worker is delivering right now
  are skipped and counted (exit status 75): suspend the selection, bounce again.
"""


def _selectors(config: Config, args: argparse.Namespace) -> list[tuple[str, str]]:
    """The (kind, value) of each selector given, in ``_SELECTORS`` order. A domain is
    normalised like a routing domain; a provider or source must be defined in the
    config, since a typo would otherwise hold or bounce nothing, silently."""
    from relay.config import _toml_key

    defined = {"provider": (["outbound", "providers"], config.outbound.providers),
               "source": (["egress", "sources"], config.egress.sources)}
    chosen = []
    for kind in _SELECTORS:
        value = getattr(args, kind)
        if value is None:
            continue
        value = value.strip()
        if kind == "domain":
            value = value.lower().rstrip(".")
            if "@" in value:
                raise CliError(f"--domain {value}: a domain, not an address", EX_USAGE)
        if not value:
            raise CliError(f"--{kind} needs a value", EX_USAGE)
        if kind in defined and value not in defined[kind][1]:
            table = _toml_key([*defined[kind][0], value])
            raise CliError(f"--{kind} {value}: no [{table}] in {args.config}", EX_USAGE)
        chosen.append((kind, value))
    return chosen


def _one_scope(chosen: list[tuple[str, str]], args: argparse.Namespace) -> str:
    """The shaping-table scope (``domain:D``, ...) of a suspend or resume."""
    if args.queue_id:
        raise CliError(f"queue {args.action} takes no queue id (select with --domain, "
                       "--provider, --tenant, --campaign or --source)", EX_USAGE)
    if len(chosen) != 1:
        raise CliError(f"queue {args.action} needs exactly one of --domain, --provider, "
                       "--tenant, --campaign, --source", EX_USAGE)
    kind, value = chosen[0]
    return f"{kind}:{value}"


def _event_log(config: Config) -> EventLog | None:
    """The config's event log (None when ``log.events`` is ""), opened before anything
    changes, so an unwritable log stops the command while nothing is done yet."""
    from relay.events import EventLog

    if not config.log.events:
        return None
    try:
        return EventLog(config.log.events)
    except OSError as e:
        raise CliError(f"cannot open the event log {config.log.events} (log.events): "
                       f"{e.strerror or e}", EX_CANTCREAT) from None


def _queue_control(config: Config, args: argparse.Namespace) -> int:
    """``relay queue suspend|resume|bounce``: every argument is checked before the spool
    or the event log is touched."""
    if args.duration is not None and args.action != "suspend":
        raise CliError("--duration is for queue suspend", EX_USAGE)
    duration = _duration(args.duration) if args.duration is not None else None
    chosen = _selectors(config, args)
    scope = "" if args.action == "bounce" else _one_scope(chosen, args)
    if args.action == "bounce":
        if not chosen and not args.queue_id:
            raise CliError("queue bounce needs a queue id or a selector (--domain, "
                           "--provider, --tenant, --campaign, --source)", EX_USAGE)
        if args.queue_id and not args.queue_id.isascii():
            raise _no_such_message(args.queue_id)
    spool = _open_spool(config)
    events = None
    try:
        events = _event_log(config)
        if args.action == "bounce":
            return _bounce(config, spool, events, chosen, args)
        from relay.spool.shaping import ShapingStore

        store = ShapingStore(spool)
        if args.action == "suspend":
            return _suspend(store, events, scope, duration, args.reason or "")
        return _resume(store, events, scope, args.reason or "")
    finally:
        if events is not None:
            events.close()
        spool.close()


def _suspend(store: ShapingStore, events: EventLog | None, scope: str,
             duration: float | None, reason: str) -> int:
    """Write the operator's suspension of ``scope`` (replacing an earlier one: a new
    duration or reason) and its ShapingChange event."""
    from relay.events.types import ShapingChange
    from relay.spool.shaping import ShapingEntry

    now = time.time()
    until = now + duration if duration is not None else None
    earlier = [e for e in store.entries(now) if e.scope == scope and e.origin == "admin"]
    store.put([ShapingEntry(scope=scope, origin="admin", suspend=True, until=until,
                            since=now, reason=reason)])
    if events is not None:
        events([ShapingChange(queue_id="", scope=scope,
                              before="suspended" if earlier else "not suspended",
                              after="suspended", reason=reason or "relay queue suspend",
                              rule="admin", until=until)])
    how = ("until resumed" if until is None
           else f"for {fmt_age(until - now)} (until {_fmt_time(until)})")
    print(f"{scope}: suspended {how}{' (replaces the earlier suspension)' if earlier else ''}")
    print("Every worker holds its mail within about a second; it stays queued, not attempted.")
    return 0


def _resume(store: ShapingStore, events: EventLog | None, scope: str, reason: str) -> int:
    """Remove the operator's suspension of ``scope`` (an error when there is none)."""
    from relay.events.types import ShapingChange

    now = time.time()
    removed = [e for e in store.remove(scope, origin="admin") if e.active(now)]
    if not removed:
        raise CliError(f"{scope}: not suspended by an operator (relay shaping status "
                       "lists what is)", EX_DATAERR)
    if events is not None:
        events([ShapingChange(queue_id="", scope=scope, before="suspended",
                              after="not suspended", reason=reason or "relay queue resume",
                              rule="admin")])
    print(f"{scope}: resumed (suspended since {_fmt_time(removed[0].since or None)})")
    print("Every worker delivers its mail again within about a second.")
    return 0


def _bounce(config: Config, spool: Spool, events: EventLog | None,
            chosen: list[tuple[str, str]], args: argparse.Namespace) -> int:
    """Fail the selected recipients now, without a DSN (``Spool.admin_bounce``), with
    one AdminBounce event each, written after each batch's commit."""
    from relay.events.types import AdminBounce, event_tags

    reason = args.reason or "bounced by the operator"
    selector = " ".join([f"{k}:{v}" for k, v in chosen]
                        + ([f"queue:{args.queue_id}"] if args.queue_id else []))
    tests = [_matcher(config, spool, kind, value) for kind, value in chosen]

    def select(job: DeliveryJob, env: Envelope) -> bool:
        return all(test(job, env) for test in tests)

    def log(done: list[tuple[Envelope, list[str]]]) -> None:
        if events is not None:
            events([AdminBounce(queue_id=env.queue_id, recipient=rcpt, reason=reason,
                                selector=selector, **event_tags(env))
                    for env, rcpts in done for rcpt in rcpts])

    try:
        bounced, skipped = spool.admin_bounce(select, queue_id=args.queue_id, committed=log)
    except OSError as e:
        raise CliError(f"cannot write the event log {config.log.events}: {e.strerror or e} "
                       "(the last batch's recipients are bounced; their AdminBounce events "
                       "are missing)", EX_IOERR) from None
    if not bounced and not skipped:
        if args.queue_id and spool.show(args.queue_id) is None:
            raise _no_such_message(args.queue_id)
        print(f"Nothing queued matches {selector}")
        return 0
    messages = len({qid for qid, _ in bounced})
    print(f"{_plural(len(bounced), 'recipient')} of {_plural(messages, 'message')} "
          f"bounced ({selector}; no DSN sent)")
    if skipped:
        print(f"{_plural(skipped, 'recipient')} skipped: a worker is delivering them right "
              "now; suspend the selection, then run the bounce again")
        return EX_TEMPFAIL
    return 0


def _matcher(config: Config, spool: Spool, kind: str, value: str) -> Matcher:
    """``(job, envelope) -> bool`` for one bounce selector (see ``_QUEUE_EPILOG``)."""
    if kind == "domain":
        return lambda job, env: job.domain == value
    if kind == "tenant":
        return lambda job, env: env.tenant == value
    if kind == "campaign":
        return lambda job, env: env.campaign_id == value
    if kind == "source":
        from relay.outbound.egress import Egress

        egress = Egress(config.egress)
        pools = {name for name, pool in config.egress.pools.items()
                 if any(m.source == value for m in pool.sources)}
        return lambda job, env: egress.pool_of(job.pool) in pools
    keys = _destination_keys(config, spool)
    target = f"provider:{value}"
    return lambda job, env: (keys.get(job.domain) or job.shard_key) == target


def _destination_keys(config: Config, spool: Spool) -> dict[str, str | None]:
    """The destination key (``provider:NAME`` or the domain) of every domain with queued
    mail, as the engine would route it now (``Router.destination_key``, MX lookups
    through ``outbound.resolvers``, 32 at a time); None where the lookup failed."""
    import trio

    from relay.outbound.resolver import Resolver
    from relay.outbound.routing import Router

    # Every domain with a job (the stats' per-domain table, uncut).
    domains = [d.domain for d in spool.stats(top=sys.maxsize).top_domains]
    router = Router(config.outbound, Resolver(list(config.outbound.resolvers)))
    failed = "\0"  # a fallback no real key can equal: the lookup failed
    keys: dict[str, str | None] = {}

    async def lookup(domain: str, limiter: trio.CapacityLimiter) -> None:
        async with limiter:
            key = await router.destination_key(domain, failed)
        keys[domain] = None if key == failed else key

    async def lookup_all() -> None:
        limiter = trio.CapacityLimiter(32)
        async with trio.open_nursery() as nursery:
            for domain in domains:
                nursery.start_soon(lookup, domain, limiter)

    trio.run(lookup_all)
    unknown = sum(key is None for key in keys.values())
    if unknown:
        print(f"relay: warning: the MX hosts of {_plural(unknown, 'domain')} could not be "
              "looked up now; their mail matches by the provider it was last routed to",
              file=sys.stderr)
    return keys


def shaping_holds(entry: ShapingEntry) -> str:
    """What a shaping entry holds, for people: ``suspended``, or its limits with the rate
    per minute (``rate 60.0/min, connections 2, 50 deliveries/connection``); a learned
    (adaptive) entry shows its learned limits, ``configured limits`` when it has none."""
    if entry.suspend:
        return "suspended"
    learned = entry.learned
    rate = entry.max_message_rate
    conns = entry.max_connections
    if learned is not None:
        rate = learned.rate if rate is None else rate
        conns = learned.connections if conns is None else conns
    parts = []
    if rate is not None:
        parts.append(f"rate {rate * 60:.1f}/min")
    if conns is not None:
        parts.append(f"connections {conns}")
    if entry.max_deliveries_per_connection is not None:
        parts.append(f"{entry.max_deliveries_per_connection} deliveries/connection")
    return ", ".join(parts) or "configured limits"


def _by_scope(entry: ShapingEntry) -> tuple[str, str]:
    return entry.scope, entry.origin


def format_shaping_status(entries: Sequence[ShapingEntry], now: float) -> str:
    """``relay shaping status`` for people: one row per entry in force, sorted by scope
    (then origin): scope, origin (``admin``, ``rule:ID``, ``adaptive``), what it holds,
    since, expiry (``until resumed``, or the time and what is left), reason; then a
    count. No entry: ``No suspensions or adjusted limits in force``."""
    if not entries:
        return "No suspensions or adjusted limits in force\n"
    rows = [("Scope", "Origin", "Holds", "Since", "Expires", "Reason")]
    for e in sorted(entries, key=_by_scope):
        expires = ("until resumed" if e.until is None
                   else f"{_fmt_time(e.until)} (in {fmt_age(e.until - now)})")
        rows.append((e.scope, e.origin, shaping_holds(e), _fmt_time(e.since or None),
                     expires, " ".join(e.reason.split()) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    lines = ["  ".join(f"{cell:<{w}}" for cell, w in zip(row, widths, strict=False))
             + f"  {row[5]}" for row in rows]
    suspended = sum(e.suspend for e in entries)
    lines += ["", f"-- {suspended} suspended, {len(entries) - suspended} with adjusted limits."]
    return "\n".join(lines) + "\n"


def cmd_shaping_status(args: argparse.Namespace) -> int:
    """``relay shaping status``: every entry of the spool's shaping table in force."""
    from relay.spool.shaping import ShapingStore

    config = _load(args.config)
    spool = _open_spool(config)
    try:
        now = time.time()
        entries = ShapingStore(spool).entries(now)
    finally:
        spool.close()
    if args.json:
        _print_json(sorted(entries, key=_by_scope))
    else:
        sys.stdout.write(format_shaping_status(entries, now))
    return 0


def cmd_hash_password(args: argparse.Namespace) -> int:
    from relay.inbound.auth import hash_password

    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise CliError("no password on standard input", EX_USAGE)
    print(hash_password(password))
    return 0


# -- suppression list --------------------------------------------------------------------

def _duration(text: str) -> float:
    """``90``, ``30m``, ``12h``, ``30d``, ``2w`` -> seconds."""
    try:
        return parse_duration(text)
    except ValueError:
        raise CliError(f"{text!r} is not a duration (examples: 3600, 30m, 12h, 30d)",
                       EX_USAGE) from None


def cmd_suppress(args: argparse.Namespace) -> int:
    """``relay suppress add|remove|list|import``: the suppression list in the spool."""
    from relay.spool import Spool
    from relay.spool.suppression import SuppressionList

    config = _load(args.config)
    if args.action in ("add", "import"):
        Path(config.spool.path).mkdir(parents=True, exist_ok=True)
        spool = Spool(config.spool.path, config.spool.map_size_bytes())
    else:
        spool = _open_spool(config)
    try:
        return _suppress_action(SuppressionList(spool), args)
    finally:
        spool.close()


def _suppress_action(supp, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from relay.spool.suppression import Suppression

    tenant = args.tenant or ""
    if args.action == "list":
        entries = list(supp.entries(args.tenant))
        if args.json:
            _print_json(entries)
            return 0
        for e in entries:
            blocks = "+".join(k for k, on in (("transactional", e.transactional),
                                              ("non_transactional", e.non_transactional)) if on)
            until = f" until {_fmt_time(e.expires)}" if e.expires else ""
            print(f"{e.address}\ttenant={e.tenant or '*'}\t{e.source}\t{blocks}"
                  f"\t{_fmt_time(e.time)}{until}")
        return 0
    if args.action in ("add", "remove") and not args.address:
        raise CliError(f"suppress {args.action} needs an ADDRESS", EX_USAGE)
    if args.action == "remove":
        if not supp.remove(tenant, _checked_address(args.address)):
            raise CliError(f"{args.address}: not on the list of tenant {tenant or '*'}",
                           EX_DATAERR)
        print(f"{args.address}: removed")
        return 0
    now = time.time()
    expires = now + _duration(args.expires) if args.expires else None
    if args.action == "add":
        transactional, non_transactional = _scope(args.type)
        supp.add([Suppression(address=_checked_address(args.address), tenant=tenant,
                              source="manual", time=now, expires=expires,
                              transactional=transactional, non_transactional=non_transactional,
                              description=args.description or "")])
        print(f"{args.address}: suppressed for tenant {tenant or '*'}")
        return 0
    if args.action == "import":
        if not args.address:
            raise CliError("suppress import needs a CSV FILE", EX_USAGE)
        entries = _read_suppression_csv(Path(args.address), tenant, now, expires)
        print(f"{supp.add(entries)} addresses imported for tenant {tenant or '*'}")
        return 0
    raise CliError(f"unknown suppress action {args.action!r}", EX_USAGE)


def _scope(kind: str) -> tuple[bool, bool]:
    """(transactional, non_transactional) for ``--type``/a CSV ``type`` column."""
    scopes = {"all": (True, True), "transactional": (True, False),
              "non_transactional": (False, True)}
    if kind not in scopes:
        raise CliError(f"type {kind!r}: one of all, transactional, non_transactional",
                       EX_USAGE)
    return scopes[kind]


def _checked_address(text: str) -> str:
    from relay.http.payload import check_address
    try:
        return check_address(text.strip())
    except ValueError as e:
        raise CliError(f"{text!r}: {e}", EX_DATAERR) from None


def _read_suppression_csv(path: Path, tenant: str, now: float, expires: float | None
                          ) -> list:
    """A CSV as SparkPost exports its suppression list (a ``recipient`` or ``email``
    column; optional ``type``, ``transactional``/``non_transactional``, ``source``,
    ``description``). Every row is checked first: one bad row imports nothing."""
    import csv

    from relay.spool.suppression import Suppression

    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CliError(f"{path}: cannot read CSV: {e}", EX_DATAERR) from None
    entries, problems = [], []
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        address = row.get("recipient") or row.get("email") or ""
        try:
            if row.get("type"):
                transactional, non_transactional = _scope(row["type"])
            else:
                transactional = row.get("transactional", "true").lower() != "false"
                non_transactional = row.get("non_transactional", "true").lower() != "false"
            entries.append(Suppression(
                address=_checked_address(address), tenant=tenant,
                source=row.get("source") or "import", time=now, expires=expires,
                transactional=transactional, non_transactional=non_transactional,
                description=row.get("description", "")))
        except CliError as e:
            problems.append(f"{path}:{line}: {e}")
    if problems:
        raise CliError("nothing imported:\n" + "\n".join(problems[:10]), EX_DATAERR)
    return entries


def cmd_api_key(args: argparse.Namespace) -> int:
    """A new random API key for the HTTP API, and its config entry (stored hashed)."""
    import secrets

    from relay.inbound.auth import hash_password

    if not args.tenant or any(c in args.tenant for c in '"\\\r\n'):
        raise CliError("api-key needs --tenant NAME (no quotes or backslashes)", EX_USAGE)
    key = secrets.token_urlsafe(32)
    print(f"API key (shown once; give it to the client): {key}")
    print("Add to the config file:")
    print("[[http.api_keys]]")
    print(f'key = "{hash_password(key)}"')
    print(f'tenant = "{args.tenant}"')
    if args.name:
        print(f'name = "{args.name}"')
    return 0


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    """A new DKIM key file (0600, never overwritten), its DNS record, its config lines."""
    from relay.dkim.keygen import keygen

    try:
        made = keygen(args.domain, args.selector, args.algorithm, args.bits, args.out)
    except ValueError as e:
        raise CliError(f"dkim keygen: {e}", EX_USAGE) from None
    except FileExistsError as e:
        raise CliError(f"dkim keygen: {e.filename} exists: not overwritten (remove it, or "
                       "choose another --selector)", EX_CANTCREAT) from None
    except OSError as e:
        raise CliError(f"dkim keygen: cannot write {e.filename or args.out}: "
                       f"{e.strerror or e}", EX_CANTCREAT) from None
    print(f"Private key written to {made.path} (mode 0600; the relay's user must read it)")
    print("\nPublish this DNS record:")
    print(made.record)
    print("\nAdd this to the relay's config:")
    print(made.snippet)
    return 0


# -- report ----------------------------------------------------------------------------

EX_UNAVAILABLE = 69


def cmd_report(args: argparse.Namespace) -> int:
    """A summary of the JSON event log (relay.report), like pflogsumm's of a mail log:
    for people, or ``--json``; ``--chart`` also draws delivered/deferred/bounced per
    minute (needs matplotlib, checked before the log is read)."""
    from relay import report

    now = time.time()
    try:
        since = report.parse_when(args.since, now) if args.since else None
        until = report.parse_when(args.until, now) if args.until else None
    except ValueError as e:
        raise CliError(f"report: {e}", EX_USAGE) from None
    if since is not None and until is not None and since >= until:
        raise CliError("report: --since must be before --until", EX_USAGE)
    if args.top < 0:
        raise CliError("report: --top must be 0 (everything) or more", EX_USAGE)
    if args.events:
        paths = list(args.events)
    else:
        config_path = args.config or DEFAULT_CONFIG
        config = _load(config_path)
        if not config.log.events:
            raise CliError(f'{config_path}: log.events is "" (no event log); name a log '
                           "with --events FILE", EX_CONFIG)
        paths = [config.log.events]
    if args.chart:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("report: --chart needs matplotlib, which is not installed (pip "
                           "install 'relay[bench]')", EX_UNAVAILABLE) from None
    reader = report.EventReader(paths)
    agg = report.Aggregator(since=since, until=until, per_minute=bool(args.chart))
    try:
        for event in reader:
            agg.add(event)
    except (OSError, EOFError) as e:
        name = getattr(e, "filename", None) or ", ".join(paths)
        raise CliError(f"report: cannot read {name}: {getattr(e, 'strerror', None) or e}",
                       EX_NOINPUT) from None
    agg.skipped_lines = reader.skipped
    result = agg.report(args.top)
    if args.chart:
        try:
            report.draw_chart(result, args.chart)
        except OSError as e:
            raise CliError(f"report: cannot write {args.chart}: {e.strerror or e}",
                           EX_CANTCREAT) from None
    if args.json:
        _print_json(result)
    else:
        sys.stdout.write(report.format_report(result))
        if args.chart:
            print(f"\nChart written to {args.chart}")
    return 0


# -- bounce classification -------------------------------------------------------------


def cmd_bounce_classify(args: argparse.Namespace) -> int:
    """The bounce class of a reply as the relay would give it (relay.outcomes.classify):
    ``10 Invalid Recipient (rule gmail-no-such-user)``. Rules: ``--rules FILE`` before
    the defaults, else the config's ``[bounces] rules`` (``--config``, or conf/relay.toml
    when it exists), else the defaults alone. ``-`` reads one reply per line from stdin
    (each verdict then followed by a tab and the reply); ``--json`` prints JSON lines."""
    from relay.outcomes.classify import RulesError, load_classifier, parse_reply_line

    try:
        if args.rules:
            classifier = load_classifier(args.rules)
        elif args.config is None and not Path(DEFAULT_CONFIG).exists():
            classifier = load_classifier("")
        else:
            classifier = load_classifier(_load(args.config or DEFAULT_CONFIG).bounces.rules)
    except RulesError as e:
        raise CliError(str(e), EX_CONFIG) from None
    if args.text == "-":
        texts = [line.strip() for line in sys.stdin if line.strip()]
    else:
        texts = [args.text.strip()]
    if not texts or not texts[0]:
        raise CliError("bounce classify needs a reply, e.g. \"550 5.1.1 user unknown\"",
                       EX_USAGE)
    scope = [p.strip().lower().removeprefix("provider:") for p in args.provider or []]
    for text in texts:
        code, enhanced, rest = parse_reply_line(text)
        verdict = classifier.classify_outcome(code, enhanced, rest, scope)
        if args.json:
            sys.stdout.write(msgspec.json.encode({
                "class": verdict.bounce_class, "name": verdict.name, "rule": verdict.rule,
                "code": code or None, "enhanced": enhanced, "reply": text,
            }).decode() + "\n")
        elif args.text == "-":
            print(f"{verdict}\t{text}")
        else:
            print(verdict)
    return 0


# -- parser ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="High-throughput mail relay")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the relay (supervisor and workers)")
    serve.add_argument("--config", default=DEFAULT_CONFIG)
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("path", nargs="?", default=DEFAULT_CONFIG)
    check.add_argument("--explain", metavar="DOMAIN", action="append",
                       help="also show where mail for DOMAIN goes and the limits that "
                            "apply, with the table each comes from (repeatable)")
    check.set_defaults(func=cmd_check_config)

    queue = sub.add_parser("queue", help="inspect and manage the queue",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog=_QUEUE_EPILOG)
    queue.add_argument("action", choices=["stats", "list", "show", "retry", "delete",
                                          *_CONTROL_ACTIONS])
    queue.add_argument("queue_id", nargs="?")
    queue.add_argument("--config", default=DEFAULT_CONFIG)
    queue.add_argument("--domain", help="only jobs for this recipient domain")
    queue.add_argument("--limit", type=int, default=1000)
    queue.add_argument("--json", action="store_true", help="machine-readable output")
    queue.add_argument("--provider", help="suspend/resume/bounce: the mail of this "
                                          "[outbound.providers] entry")
    queue.add_argument("--tenant", help="suspend/resume/bounce: the mail of this tenant")
    queue.add_argument("--campaign", help="suspend/resume/bounce: the mail of this campaign")
    queue.add_argument("--source", help="suspend/resume/bounce: the mail through this "
                                        "[egress.sources] entry")
    queue.add_argument("--duration", help="suspend: for this long (3600, 30m, 2h, 1d; "
                                          "default: until resumed)")
    queue.add_argument("--reason", help="suspend/resume/bounce: why (shown by relay shaping "
                                        "status, written to the event log)")
    queue.set_defaults(func=cmd_queue)

    shaping = sub.add_parser("shaping", help="traffic shaping: suspensions and limits")
    shaping_sub = shaping.add_subparsers(dest="shaping_command", required=True)
    status = shaping_sub.add_parser("status", help="every suspension and adjusted limit in "
                                                   "force, with its reason and expiry")
    status.add_argument("--config", default=DEFAULT_CONFIG)
    status.add_argument("--json", action="store_true",
                        help="machine-readable output (rates in messages per second)")
    status.set_defaults(func=cmd_shaping_status)

    hp = sub.add_parser("hash-password", help="scrypt hash for inbound.auth_users")
    hp.set_defaults(func=cmd_hash_password)

    sp = sub.add_parser("suppress", help="the suppression list: add, remove, list, import")
    sp.add_argument("action", choices=["add", "remove", "list", "import"])
    sp.add_argument("address", nargs="?", help="the address (add/remove) or CSV file (import)")
    sp.add_argument("--config", default=DEFAULT_CONFIG)
    sp.add_argument("--tenant", help="the tenant whose list (default: every tenant's)")
    sp.add_argument("--type", default="all",
                    choices=["all", "transactional", "non_transactional"],
                    help="what mail the entry blocks (add)")
    sp.add_argument("--expires", help="the entry holds this long (3600, 30m, 12h, 30d)")
    sp.add_argument("--description", help="a note kept with the entry (add)")
    sp.add_argument("--json", action="store_true", help="machine-readable output (list)")
    sp.set_defaults(func=cmd_suppress)

    ak = sub.add_parser("api-key", help="make an HTTP API key and print its http.api_keys entry")
    ak.add_argument("--tenant", required=True, help="who the key injects for")
    ak.add_argument("--name", default="", help="a label for logs")
    ak.set_defaults(func=cmd_api_key)

    dkim = sub.add_parser("dkim", help="DKIM signing keys")
    dkim_sub = dkim.add_subparsers(dest="dkim_command", required=True)
    kg = dkim_sub.add_parser("keygen", help="make a DKIM key and print its DNS record "
                                            "and [[dkim.signers]] entry")
    kg.add_argument("--domain", required=True, help="the signing domain (d=)")
    kg.add_argument("--selector", required=True, help="the selector (s=)")
    kg.add_argument("--algorithm", choices=["rsa-sha256", "ed25519-sha256"],
                    default="rsa-sha256")
    kg.add_argument("--bits", type=int, default=None,
                    help="RSA key size, 1024..4096 (default 2048)")
    kg.add_argument("--out", default=".", help="directory for the key file (default .)")
    kg.set_defaults(func=cmd_dkim_keygen)

    rp = sub.add_parser("report", help="summarise the event log (like pflogsumm)")
    source = rp.add_mutually_exclusive_group()
    source.add_argument("--config", help=f"read the config's log.events (default "
                                         f"{DEFAULT_CONFIG})")
    source.add_argument("--events", metavar="FILE", action="append",
                        help="an event log (JSON lines; .gz, or - for stdin); repeatable")
    rp.add_argument("--since", metavar="TIME",
                    help="only events at or after TIME: ISO 8601 or relative (1h, 30m, 2d)")
    rp.add_argument("--until", metavar="TIME", help="only events before TIME")
    rp.add_argument("--top", type=int, default=10,
                    help="rows per table and reasons per list (default 10; 0 = all)")
    rp.add_argument("--json", action="store_true", help="machine-readable output")
    rp.add_argument("--chart", metavar="FILE.png",
                    help="also draw delivered/deferred/bounced per minute (matplotlib)")
    rp.set_defaults(func=cmd_report)

    bounce = sub.add_parser("bounce", help="bounce classification")
    bounce_sub = bounce.add_subparsers(dest="bounce_command", required=True)
    bc = bounce_sub.add_parser("classify", help="print the bounce class and rule of a reply")
    bc.add_argument("text", metavar="TEXT",
                    help='the reply, e.g. "550 5.1.1 <x@y>: user unknown"; - reads one '
                         "per line from stdin")
    bc.add_argument("--provider", metavar="NAME", action="append",
                    help="delivered as this provider ([outbound.providers.NAME]) or to this "
                         "domain, for rules scoped to one (repeatable)")
    rules = bc.add_mutually_exclusive_group()
    rules.add_argument("--config", help=f"use the config's [bounces] rules (default "
                                        f"{DEFAULT_CONFIG} if it exists)")
    rules.add_argument("--rules", metavar="FILE", help="a rules file to try, before the "
                                                       "defaults")
    bc.add_argument("--json", action="store_true", help="machine-readable output")
    bc.set_defaults(func=cmd_bounce_classify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as e:
        print(f"relay: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
