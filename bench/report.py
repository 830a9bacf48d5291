"""The bench report: terminal table, JSON document, PNG chart.

Contract: ``write_report(doc, out_dir)`` writes ``bench-<stamp>.json`` and
``bench-<stamp>.png`` (plus ``latest.json``/``latest.png`` copies) and returns their
paths; ``format_table(doc)`` is the text printed on the terminal. ``doc`` is the dict
built by ``bench.__main__`` (``machine``, ``settings``, ``results``, ``ratios``). With
``--repeat N`` every result row carries its ``round`` (1..N), and a ratio is the median
of the per-round ratios: on a shared box one run's ratio says little.
``goal_ratios(results)`` are the http-inject scenario's two goals (HTTP with
100-recipient requests vs SMTP injection into the relay, and vs Postfix end to end) and
the dkim scenario's two per size (relay signed vs Postfix + OpenDKIM, relay signed vs
relay unsigned), printed under the table and stored in the JSON as ``goals``; under the
dkim goals, what signing cost the relay's CPU per message (``dkim_costs``). Rows of the
dkim scenario add a ``signed`` column: the share of delivered messages the sink found
signed. The pushback scenario's goals are absolute, per peer (``bench.pushback.goal_lines``),
and its chart panel is messages per minute against the hidden limit
(``bench.pushback.draw_panel``).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

__all__ = ["DKIM_GOALS", "GOALS", "HTTP_GOALS", "compute_ratios", "dkim_costs", "format_table",
           "goal_ratios", "round_ratios", "write_chart", "write_report"]

#: The http-inject issue's goals: (name, label, numerator row and key, denominator row
#: and key, goal). A row is (scenario, peer); the ratio pairs rows of the same round.
HTTP_GOALS: tuple[tuple[str, str, tuple[str, str, str], tuple[str, str, str], float], ...] = (
    ("http_accept_vs_smtp", "HTTP 100-rcpt accepted msg/s / relay SMTP-inject accepted msg/s",
     ("http-inject 100", "relay", "inject_msg_s"), ("smtp-inject", "relay", "inject_msg_s"),
     2.0),
    ("http_e2e_vs_postfix", "HTTP 100-rcpt e2e msg/s / Postfix SMTP-inject e2e msg/s",
     ("http-inject 100", "relay", "e2e_msg_s"), ("smtp-inject", "postfix", "e2e_msg_s"),
     3.0),
)

_Goal = tuple[str, str, tuple[str, str, str], tuple[str, str, str], float]


def _dkim_goals(size: str) -> tuple[_Goal, ...]:
    signed = (f"dkim {size} signed", "relay", "e2e_msg_s")
    return (
        (f"dkim_{size}_vs_postfix_opendkim",
         f"dkim {size}: relay signed e2e msg/s / postfix+opendkim e2e msg/s", signed,
         (f"dkim {size} signed", "postfix+opendkim", "e2e_msg_s"), 2.0),
        (f"dkim_{size}_vs_postfix_opendkim_unix",
         f"dkim {size}: relay signed e2e msg/s / postfix+opendkim-unix e2e msg/s", signed,
         (f"dkim {size} signed", "postfix+opendkim-unix", "e2e_msg_s"), 2.0),
        (f"dkim_{size}_signed_vs_unsigned",
         f"dkim {size}: relay signed e2e msg/s / relay unsigned e2e msg/s", signed,
         (f"dkim {size} unsigned", "relay", "e2e_msg_s"), 0.75),
    )


#: The dkim issue's goals, per message size: >= 2x Postfix + OpenDKIM end to end, and
#: signing costs at most 25% of the relay's unsigned end-to-end rate.
DKIM_GOALS: tuple[_Goal, ...] = _dkim_goals("2KB") + _dkim_goals("100KB")
#: Goal tables by the scenario (row name prefix) whose rows they need.
GOALS: dict[str, tuple[_Goal, ...]] = {"http-inject": HTTP_GOALS, "dkim": DKIM_GOALS}
#: Peers whose goals are left out unless the results have rows of theirs (a variant).
_OPTIONAL_PEERS = frozenset({"postfix+opendkim-unix"})


def _fmt(v: Any, nd: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    return str(v)


def round_ratios(results: list[dict[str, Any]], target: str,
                 peer: str) -> dict[str, list[float | None]]:
    """msg/s of ``target`` divided by ``peer``'s, per scenario, one value per round (the
    two rows of a round ran back to back; None where either failed)."""
    by = {(r["scenario"], r["peer"], r.get("round", 1)): r for r in results}
    out: dict[str, list[float | None]] = {}
    for (scen, p, rnd), r in sorted(by.items(), key=lambda kv: kv[0][2]):
        if p != target:
            continue
        other = by.get((scen, peer, rnd))
        a, b = r.get("msg_s"), (other or {}).get("msg_s")
        out.setdefault(scen, []).append((a / b) if a and b else None)
    return out


def compute_ratios(results: list[dict[str, Any]], target: str, peer: str) -> dict[str, Any]:
    """Per scenario, the median over rounds of ``round_ratios`` (None if no round has
    both rows)."""
    out: dict[str, Any] = {}
    for scen, values in round_ratios(results, target, peer).items():
        ok = [v for v in values if v is not None]
        out[scen] = statistics.median(ok) if ok else None
    return out


def goal_ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per entry of the ``GOALS`` tables whose scenario has rows in ``results``:
    ``group`` (the scenario), ``label``, ``goal``, per round ``rounds`` (ratio, None when
    either row is missing, failed, incomplete, or meant to be signed and not every
    message was), ``numerators``/``denominators`` (the msg/s values), ``median`` of the
    rounds' ratios and ``met`` (median >= goal; None without a ratio). Empty when the
    results have no http-inject or dkim row."""
    by = {(r["scenario"], r["peer"], r.get("round", 1)): r for r in results}
    rounds = sorted({r.get("round", 1) for r in results})

    def value(scen: str, peer: str, key: str, rnd: int) -> float | None:
        r = by.get((scen, peer, rnd))
        if r is None or r.get("error") or not r.get("complete"):
            return None
        if r.get("expect_signed") and not r.get("signed"):
            return None
        return r.get(key) or None

    peers = {r.get("peer") for r in results}
    table = [(group, g) for group, goals in GOALS.items()
             if any(r.get("scenario", "").startswith(group) for r in results) for g in goals
             if g[3][1] not in _OPTIONAL_PEERS or g[3][1] in peers]
    out: dict[str, dict[str, Any]] = {}
    for group, (name, label, num, den, goal) in table:
        nums = [value(*num, rnd) for rnd in rounds]
        dens = [value(*den, rnd) for rnd in rounds]
        ratios = [a / b if a and b else None for a, b in zip(nums, dens, strict=True)]
        ok = [v for v in ratios if v is not None]
        median = statistics.median(ok) if ok else None
        out[name] = {"group": group, "label": label, "goal": goal, "rounds": ratios,
                     "numerators": nums, "denominators": dens, "median": median,
                     "met": None if median is None else median >= goal,
                     "needs": ",".join(dict.fromkeys(
                         p for p in (num[1], den[1]) if p not in peers)) or den[1]}
    return out


def dkim_costs(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per dkim message size (``2KB``, ``100KB``) with relay signed and unsigned rows:
    the medians over rounds of their ``cpu_s_per_1000`` (= ms of the relay's CPU per
    message, end to end), ``ms_per_signature`` (signed - unsigned: what signing added
    per message) and ``signatures_per_core_s`` (1000 / that; None unless positive)."""
    def cpu(name: str) -> float | None:
        vals = [x["cpu_s_per_1000"] for x in results
                if x.get("scenario") == name and x.get("peer") == "relay"
                and not x.get("error") and x.get("cpu_s_per_1000")]
        return statistics.median(vals) if vals else None

    out: dict[str, dict[str, Any]] = {}
    for r in results:
        scen = r.get("scenario", "")
        if not (scen.startswith("dkim ") and scen.endswith(" signed")) or r["peer"] != "relay":
            continue
        size = scen.split()[1]
        if size in out:
            continue
        signed, unsigned = cpu(f"dkim {size} signed"), cpu(f"dkim {size} unsigned")
        delta = signed - unsigned if signed is not None and unsigned is not None else None
        out[size] = {"signed_ms_per_msg": signed, "unsigned_ms_per_msg": unsigned,
                     "ms_per_signature": delta,
                     "signatures_per_core_s": 1000 / delta if delta and delta > 0 else None}
    return out


def _goal_lines(results: list[dict[str, Any]]) -> list[str]:
    goals = goal_ratios(results)
    if not goals:
        return []
    n = len(next(iter(goals.values()))["rounds"])
    lines: list[str] = []
    for group in GOALS:
        lines += _group_lines(group, [g for g in goals.values() if g["group"] == group], n,
                              results)
    return lines


def _group_lines(group: str, goals: list[dict[str, Any]], n: int,
                 results: list[dict[str, Any]]) -> list[str]:
    if not goals:
        return []
    lines = [f"\n{group} goals" + (f" (median over {n} rounds):" if n > 1 else ":")]
    for g in goals:
        if g["median"] is None:
            hint = (f" (run with --peers {g['needs']})"
                    if not all(any(r.get("peer") == p for r in results)
                               for p in g["needs"].split(",")) else "")
            lines.append(f"  {g['label']}: -{hint} (goal >= {g['goal']:g})")
            continue
        verdict = "met" if g["met"] else "NOT met"
        if n > 1:
            detail = "rounds " + ", ".join(f"{_fmt(v, 2)}x" for v in g["rounds"])
        else:
            detail = f"{_fmt(g['numerators'][0])} / {_fmt(g['denominators'][0])} msg/s"
        lines.append(f"  {g['label']}: {g['median']:.2f}x (goal >= {g['goal']:g}: {verdict};"
                     f" {detail})")
    if group == "dkim":
        for size, c in dkim_costs(results).items():
            if c["ms_per_signature"] is None:
                continue
            per_core = c["signatures_per_core_s"]
            lines.append(
                f"  dkim {size}: relay CPU {c['signed_ms_per_msg']:.2f} ms/msg signed vs "
                f"{c['unsigned_ms_per_msg']:.2f} unsigned: signing adds "
                f"{c['ms_per_signature']:.2f} ms per message"
                + (f" (~{per_core:,.0f} signatures/s per core)" if per_core else ""))
    return lines


def format_table(doc: dict[str, Any]) -> str:
    cols = [("scenario", "scenario", 0), ("peer", "peer", 0), ("msg/s", "msg_s", 0),
            ("inject/s", "inject_msg_s", 0), ("p50 ms", "latency_p50_ms", 1),
            ("p99 ms", "latency_p99_ms", 1), ("CPU s/1k", "cpu_s_per_1000", 2),
            ("RSS MB", "peak_rss_mb", 0), ("spool B/msg", "spool_bytes_per_msg", 0),
            ("msgs", "accepted", 0), ("ok", "complete", 0)]
    if any("expect_signed" in r for r in doc["results"]):  # dkim rows: signed at the sink
        cols.insert(-2, ("signed", "signed_share", 0))
    rows = [[c[0] for c in cols]]
    notes: list[str] = []
    rounds = doc.get("settings", {}).get("repeat", 1) > 1
    for r in doc["results"]:
        if rounds:
            r = {**r, "scenario": f"{r['scenario']} #{r.get('round', 1)}"}
        if r.get("error"):
            rows.append([r["scenario"], r["peer"], "ERROR"] + [""] * (len(cols) - 3))
            notes.append(f"{r['scenario']}/{r['peer']}: {r['error'].splitlines()[0]}")
            continue
        line = []
        for _, key, nd in cols:
            v = r.get(key)
            if key == "complete":
                v = "yes" if v else "NO"
            elif key == "signed_share" and v is not None:
                v = f"{100 * v:.0f}%"
            line.append(_fmt(v, nd))
        rows.append(line)
        if "throttle" in r:
            t = r["throttle"]
            notes.append(
                f"{r['scenario']}/{r['peer']}: throttles {'held' if t['held'] else 'EXCEEDED'}"
                f" (busiest domain: {t['max_connections_seen']} connections at once, limit "
                f"{t['max_connections_limit']}; {t.get('max_in_window', '-')} messages in a "
                f"{t['rate_window_s']:.0f}s window, limit {_fmt(t.get('allowed_in_window'))}"
                f" incl. 1 burst; {t['domains_delivered']} domains delivered)")
        if "defer" in r:
            d = r["defer"]
            notes.append(
                f"{r['scenario']}/{r['peer']}: healthy domains "
                f"{_fmt(d['healthy_msg_s_during_load'])} msg/s during the load, "
                f"deferred mail drained "
                f"{_fmt(d['drain_after_recovery_s'], 1)}s after recovery "
                f"({d['tempfails_answered']} 451s answered)")
        if r.get("delivered_during_run") is not None and r.get("accepted"):
            # Delivery runs during the acceptance measurement on every peer: how much of
            # it each did within the window says how much of its CPU went to delivery.
            done = r["delivered_during_run"]
            notes.append(f"{r['scenario']}/{r['peer']}: delivered {done:,} to the sink while"
                         f" the load ran ({100 * done / r['accepted']:.0f}% of"
                         f" {r['accepted']:,} accepted)")
        if r.get("expect_signed") and not r.get("signed"):
            notes.append(f"{r['scenario']}/{r['peer']}: NOT every delivered message signed "
                         f"({r.get('signed_messages', 0)} of "
                         f"{r.get('delivered_messages', 0)})")
        if r.get("kept_files"):
            notes.append(f"{r['scenario']}/{r['peer']}: incomplete; server files kept in "
                         f"{r['kept_files']}")
        if r.get("errors"):
            notes.append(f"{r['scenario']}/{r['peer']}: client errors: {r['errors'][0]}")
    costs = [f"{r['scenario']}/{r['peer']} {_fmt(r['loadgen_cpu_s_per_1000'], 2)}"
             f"+{_fmt(r.get('sink_cpu_s_per_1000'), 2)}"
             for r in doc["results"] if r.get("loadgen_cpu_s_per_1000") is not None]
    if costs:
        notes.append("bench's own CPU s/1k (load generator + sink): " + ", ".join(costs))
    http_costs = [f"{r['scenario']}/{r['peer']} {_fmt(r['bench_cpu_s_per_1000'], 2)}"
                  for r in doc["results"] if r.get("bench_cpu_s_per_1000") is not None]
    if http_costs:
        notes.append("bench's own CPU s/1k (HTTP clients + sink, one thread): "
                     + ", ".join(http_costs))
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("  ".join(v.rjust(w) if j >= 2 else v.ljust(w)
                               for j, (v, w) in enumerate(zip(row, widths, strict=True))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    # a scenario row the peer never has (Postfix has no HTTP API) gets no ratio entry
    present = {(r["scenario"], r["peer"]) for r in doc["results"]}
    for peer, ratios in doc.get("ratios", {}).items():
        parts = [f"{s} {_fmt(v, 2)}x" for s, v in ratios.items() if (s, peer) in present]
        label = "median msg/s ratio over the rounds" if rounds else "msg/s ratio"
        lines.append(f"\n{doc['settings']['target']}/{peer} {label}: " + ", ".join(parts))
        if rounds:
            for s, values in doc.get("ratio_rounds", {}).get(peer, {}).items():
                if (s, peer) in present:
                    lines.append(f"  {s}: " + ", ".join(f"{_fmt(v, 2)}x" for v in values))
    lines += _goal_lines(doc["results"])
    from bench.pushback import goal_lines as pushback_goal_lines

    lines += pushback_goal_lines(doc["results"])
    if notes:
        lines.append("")
        lines += notes
    return "\n".join(lines)


def _rate_series(points: list[list[float]] | list[tuple[float, int]],
                 bucket: float = 1.0) -> tuple[list[float], list[float]]:
    """Cumulative (t, n) samples -> per-bucket rate (msg/s) at bucket midpoints."""
    if not points:
        return [], []
    end = points[-1][0]
    nb = max(1, math.ceil(end / bucket))
    cum = [0.0] * (nb + 1)
    j = 0
    for b in range(nb + 1):
        t = b * bucket
        while j + 1 < len(points) and points[j + 1][0] <= t:
            j += 1
        cum[b] = points[j][1] if points[j][0] <= t else 0
    xs = [(b + 0.5) * bucket for b in range(nb)]
    ys = [(cum[b + 1] - cum[b]) / bucket for b in range(nb)]
    return xs, ys


def write_chart(doc: dict[str, Any], path: Path) -> Path | None:
    """One subplot per scenario: accepted and delivered recipients/s over time, every
    peer. Recipients, not messages: a server may split a message per destination, so
    delivered transactions would not compare with accepted messages."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    # Only the first round: more would overlay lines of the same peer.
    results = [r for r in doc["results"] if not r.get("error") and r.get("round", 1) == 1]
    scenarios = list(dict.fromkeys(r["scenario"] for r in results))
    if not scenarios:
        return None
    fig, axes = plt.subplots(len(scenarios), 1, figsize=(10, 3.2 * len(scenarios)),
                             squeeze=False)
    colours = {"relay": "tab:blue", "postfix": "tab:orange", "direct": "tab:green",
               "postfix+opendkim": "tab:red", "haraka": "tab:purple"}
    for ax, scen in zip(axes[:, 0], scenarios, strict=True):
        if scen == "pushback":
            from bench.pushback import draw_panel

            draw_panel(ax, [r for r in results if r["scenario"] == scen], colours)
            continue
        for r in results:
            if r["scenario"] != scen:
                continue
            c = colours.get(r["peer"])
            tl = r["timeline"]
            xs, ys = _rate_series(tl.get("accepted_rcpts") or tl["accepted"])
            ax.plot(xs, ys, color=c, linestyle="--", label=f"{r['peer']} accepted")
            if r["peer"] != "direct" and (tl.get("delivered_rcpts") or tl.get("delivered")):
                xs, ys = _rate_series(tl.get("delivered_rcpts") or tl["delivered"])
                ax.plot(xs, ys, color=c, label=f"{r['peer']} delivered")
        ax.set_title(f"{scen}")
        ax.set_xlabel("seconds since first message")
        ax.set_ylabel("recipients/s (1 s bins)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize="small")
    m = doc["machine"]
    fig.suptitle(f"bench {doc['started']}  ({m['cpus']} CPUs, {m['platform']}, "
                 f"Python {m.get('python', '?')})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(doc: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = doc["started"].replace(":", "").replace("-", "")
    paths: dict[str, Path] = {}
    jpath = out_dir / f"bench-{stamp}.json"
    jpath.write_text(json.dumps(doc, indent=1, default=str))
    shutil.copyfile(jpath, out_dir / "latest.json")
    paths["json"] = jpath
    png = write_chart(doc, out_dir / f"bench-{stamp}.png")
    if png is not None:
        shutil.copyfile(png, out_dir / "latest.png")
        paths["png"] = png
    return paths
