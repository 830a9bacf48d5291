"""``relay``: the operator's command line.

    relay serve --config conf/relay.toml
    relay check-config conf/relay.toml
    relay queue [--config F] stats|list|show ID|retry [ID]|delete ID  [--domain D] [--json]
    relay hash-password            (reads the password from stdin)

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

import msgspec

from relay.config import Config, ConfigError, load_config

__all__ = ["main"]

DEFAULT_CONFIG = "conf/relay.toml"

EX_USAGE, EX_DATAERR, EX_NOINPUT, EX_CONFIG = 64, 65, 66, 78


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


def cmd_queue(args: argparse.Namespace) -> int:
    config = _load(args.config)
    spool = _open_spool(config)
    try:
        return _queue_action(spool, args)
    finally:
        spool.close()


def _queue_action(spool, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    action = args.action
    if action == "stats":
        stats = spool.stats()
        if args.json:
            _print_json(stats)
        else:
            for name in stats.__struct_fields__:
                value = getattr(stats, name)
                if isinstance(value, (list, dict)):
                    continue
                print(f"{name:>20}: {value}")
            top = getattr(stats, "top_domains", None)
            if top:
                print("         top domains:")
                for item in top:
                    print(f"    {item}")
        return 0
    if action == "list":
        entries = spool.list_messages(domain=args.domain, limit=args.limit)
        if args.json:
            _print_json(entries)
            return 0
        for e in entries:
            print(msgspec.json.encode(e).decode())
        return 0
    if action == "show":
        if not args.queue_id:
            raise CliError("queue show needs a queue id", EX_USAGE)
        entry = spool.show(args.queue_id)
        if entry is None:
            raise CliError(f"{args.queue_id}: no such message in the queue", EX_DATAERR)
        _print_json(entry)
        return 0
    if action == "retry":
        n = spool.retry_now(queue_id=args.queue_id, domain=args.domain)
        print(f"{n} delivery job(s) scheduled for immediate retry")
        return 0
    if action == "delete":
        if not args.queue_id:
            raise CliError("queue delete needs a queue id", EX_USAGE)
        if not spool.delete(args.queue_id):
            raise CliError(f"{args.queue_id}: no such message in the queue", EX_DATAERR)
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


# -- parser ----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="High-throughput mail relay")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the relay (supervisor and workers)")
    serve.add_argument("--config", default=DEFAULT_CONFIG)
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("path", nargs="?", default=DEFAULT_CONFIG)
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
