"""``relay``: the operator's command line.

    relay serve --config conf/relay.toml
    relay check-config conf/relay.toml
    relay queue [--config F] stats|list|show ID|retry [ID]|delete ID  [--domain D] [--json]
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

from relay.config import Config, ConfigError, load_config
from relay.model import ascii_int

if TYPE_CHECKING:
    from relay.spool.views import QueueEntry, QueueStats

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


def cmd_hash_password(args: argparse.Namespace) -> int:
    from relay.inbound.auth import hash_password

    password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise CliError("no password on standard input", EX_USAGE)
    print(hash_password(password))
    return 0


# -- suppression list --------------------------------------------------------------------

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(text: str) -> float:
    """``90``, ``30m``, ``12h``, ``30d``, ``2w`` -> seconds."""
    unit = text[-1:].lower()
    number = ascii_int(text[:-1] if unit in _DURATION_UNITS else text)
    if number is None or number < 1:
        raise CliError(f"{text!r} is not a duration (examples: 3600, 30m, 12h, 30d)", EX_USAGE)
    return float(number * _DURATION_UNITS.get(unit, 1))


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

    queue = sub.add_parser("queue", help="inspect and manage the queue")
    queue.add_argument("action", choices=["stats", "list", "show", "retry", "delete"])
    queue.add_argument("queue_id", nargs="?")
    queue.add_argument("--config", default=DEFAULT_CONFIG)
    queue.add_argument("--domain", help="only jobs for this recipient domain")
    queue.add_argument("--limit", type=int, default=1000)
    queue.add_argument("--json", action="store_true", help="machine-readable output")
    queue.set_defaults(func=cmd_queue)

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
