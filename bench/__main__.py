"""``python -m bench``: run the benchmark suite and print/write the report.

    python -m bench                                # relay, default suite (~1-2 min)
    python -m bench --peers postfix                # + a private Postfix, ratios per scenario
    python -m bench --scenarios inject,e2e --duration 5
    python -m bench --quick --target direct        # the bench against its own sink
    python -m bench --scenarios http-inject --peers postfix   # HTTP API vs SMTP, goals
    python -m bench --scenarios dkim --peers postfix+opendkim  # DKIM signing, goals
    python -m bench --scenarios pushback --peers postfix      # hidden rate limit (~8 min)

Exit status: 0 when every run completed (all accepted mail delivered, throttles held,
every message of a signed dkim row signed), 1 otherwise, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from bench.peers import PEERS
from bench.report import (
    compute_ratios,
    dkim_costs,
    format_table,
    goal_ratios,
    round_ratios,
    write_report,
)
from bench.scenarios import DEFAULT_SCENARIOS, SCENARIOS, build_scenarios, run_rows


def _machine() -> dict[str, Any]:
    # The relay runs on this interpreter too (its script sits beside sys.executable), and
    # an optimised build (PGO/LTO) changes its CPU per message by a tenth: record which.
    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version(),
                            "python_executable": os.path.realpath(sys.executable)}
    try:
        with open("/proc/meminfo") as f:
            info["mem_mb"] = int(f.readline().split()[1]) // 1024
    except OSError:
        pass
    if shutil.which("postconf") or Path("/usr/sbin/postconf").exists():
        try:
            out = subprocess.run(["/usr/sbin/postconf", "-d", "-h", "mail_version"],
                                 capture_output=True, text=True, timeout=10)
            info["postfix"] = out.stdout.strip()
        except OSError:
            pass
    if Path("/usr/sbin/opendkim").exists():
        try:
            out = subprocess.run(["/usr/sbin/opendkim", "-V"], capture_output=True, text=True,
                                 timeout=10)
            info["opendkim"] = out.stdout.split("\n", 1)[0].split(" v")[-1].strip()
        except OSError:
            pass
    return info


def _dist(text: str) -> list[tuple[int, float]]:
    """``"2048:0.5,8192:0.5"`` -> [(2048, 0.5), (8192, 0.5)]; a bare value has weight 1."""
    out = []
    for part in text.split(","):
        value, _, weight = part.strip().partition(":")
        try:
            out.append((int(value), float(weight or 1)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad distribution item {part!r}") from None
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS),
                    help=f"comma list from {','.join(SCENARIOS)} (default: all but "
                         "pushback)")
    ap.add_argument("--target", default="relay", choices=list(PEERS),
                    help="the server measured first (default relay)")
    ap.add_argument("--peers", default="",
                    help="comma list of servers to run side by side (postfix, "
                         "postfix+opendkim, postfix+opendkim-unix, haraka)")
    ap.add_argument("--duration", type=float, default=8.0,
                    help="seconds of load per scenario (default 8)")
    ap.add_argument("--sessions", type=int, default=20, help="concurrent SMTP sessions")
    ap.add_argument("--processes", type=int, default=2, help="load generator processes")
    ap.add_argument("--fanout-domains", type=int, default=1000)
    ap.add_argument("--no-pipelining", action="store_true",
                    help="one command per round trip (default: PIPELINING)")
    ap.add_argument("--messages-per-connection", type=int, default=100)
    ap.add_argument("--sizes", type=_dist, default=None, metavar="BYTES:WEIGHT,...",
                    help="message size mix for inject/e2e/defer (default "
                         "2048:0.5,8192:0.35,32768:0.15)")
    ap.add_argument("--recipients", type=_dist, default=None, metavar="N:WEIGHT,...",
                    help="recipients per message (default 1:0.8,2:0.15,5:0.05)")
    ap.add_argument("--domains", type=int, default=20,
                    help="recipient domains for inject/e2e/defer (default 20)")
    ap.add_argument("--quick", action="store_true", help="tiny runs (seconds), for tests")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"),
                    help="directory for the JSON and PNG report (default bench/results)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the whole list N times; ratios are medians over the rounds")
    ap.add_argument("--relay-workers", type=int, default=0,
                    help="the relay's worker processes (default 0: one per CPU)")
    ap.add_argument("--http-clients", type=int, default=8,
                    help="concurrent HTTP clients (keep-alive connections) of http-inject "
                         "(default 8)")
    ap.add_argument("--pushback-seconds", type=float, default=240.0,
                    help="each peer's run against the pushback sink (default 240)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.scenario_list = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in args.scenario_list if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown scenario(s): {', '.join(bad)}")
    args.peer_list = [p.strip() for p in args.peers.split(",") if p.strip()
                      and p.strip() != args.target]
    for p in args.peer_list:
        if p not in PEERS:
            ap.error(f"unknown peer {p!r}")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.http_clients < 1:
        ap.error("--http-clients must be at least 1")
    if args.pushback_seconds <= (10 if args.quick else 60):
        ap.error("--pushback-seconds must be longer than the sink's window (60 s, "
                 "--quick: 10 s): the rate is measured after it")
    return args


async def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    scenarios = build_scenarios(duration=args.duration, quick=args.quick,
                                sessions=args.sessions, fanout_domains=args.fanout_domains,
                                pipelining=not args.no_pipelining,
                                messages_per_connection=args.messages_per_connection,
                                sizes=args.sizes, recipients=args.recipients,
                                domains=args.domains, relay_workers=args.relay_workers,
                                http_clients=args.http_clients,
                                pushback_seconds=args.pushback_seconds)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    doc: dict[str, Any] = {"started": started, "machine": _machine(),
                           "settings": {k: v for k, v in vars(args).items()},
                           "results": []}

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    for round_no in range(1, args.repeat + 1):
        for name in args.scenario_list:
            for peer in [args.target, *args.peer_list]:
                tag = f" (round {round_no}/{args.repeat})" if args.repeat > 1 else ""
                log(f"== {name} / {peer}{tag}: {scenarios[name].description}")
                rows = await run_rows(scenarios[name], peer, processes=args.processes,
                                      show_progress=not args.no_progress, log=log)
                for row in rows:
                    row["round"] = round_no
                    if not row.get("error") and "delivered_recipients" in row:
                        log(f"   {row['accepted']} accepted, {row['delivered_recipients']} "
                            f"recipients delivered, {row['msg_s']:.0f} msg/s")
                doc["results"].extend(rows)
    doc["ratios"] = {p: compute_ratios(doc["results"], args.target, p) for p in args.peer_list}
    doc["ratio_rounds"] = {p: round_ratios(doc["results"], args.target, p)
                           for p in args.peer_list}
    doc["goals"] = goal_ratios(doc["results"])
    if any(r.get("scenario", "").startswith("dkim ") for r in doc["results"]):
        doc["dkim_costs"] = dkim_costs(doc["results"])
    return doc


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    doc = trio.run(run_suite, args)
    paths = write_report(doc, Path(args.out))
    print()
    print(format_table(doc))
    print()
    for kind, p in paths.items():
        print(f"{kind}: {p}")
    ok = all(not r.get("error") and r.get("complete") and r.get("throttle", {}).get("held", True)
             and (r.get("signed") or not r.get("expect_signed")) for r in doc["results"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
