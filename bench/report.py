"""The bench report: terminal table, JSON document, PNG chart.

Contract: ``write_report(doc, out_dir)`` writes ``bench-<stamp>.json`` and
``bench-<stamp>.png`` (plus ``latest.json``/``latest.png`` copies) and returns their
paths; ``format_table(doc)`` is the text printed on the terminal. ``doc`` is the dict
built by ``bench.__main__`` (``machine``, ``settings``, ``results``, ``ratios``). With
``--repeat N`` every result row carries its ``round`` (1..N), and a ratio is the median
of the per-round ratios: on a shared box one run's ratio says little.
``goal_ratios(results)`` are the http-inject scenario's two goals (HTTP with
100-recipient requests vs SMTP injection into the relay, and vs Postfix end to end),
printed under the table and stored in the JSON as ``goals``.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

__all__ = ["HTTP_GOALS", "compute_ratios", "format_table", "goal_ratios", "round_ratios",
           "write_chart", "write_report"]

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
    """Per ``HTTP_GOALS`` entry: ``label``, ``goal``, per round ``rounds`` (ratio, None
    when either row is missing, failed or incomplete), ``numerators``/``denominators``
    (the msg/s values), ``median`` of the rounds' ratios and ``met`` (median >= goal;
    None without a ratio). Empty when the results have no http-inject row."""
    if not any(r.get("scenario", "").startswith("http-inject") for r in results):
        return {}
    by = {(r["scenario"], r["peer"], r.get("round", 1)): r for r in results}
    rounds = sorted({r.get("round", 1) for r in results})

    def value(scen: str, peer: str, key: str, rnd: int) -> float | None:
        r = by.get((scen, peer, rnd))
        if r is None or r.get("error") or not r.get("complete"):
            return None
        return r.get(key) or None

    out: dict[str, dict[str, Any]] = {}
    for name, label, num, den, goal in HTTP_GOALS:
        nums = [value(*num, rnd) for rnd in rounds]
        dens = [value(*den, rnd) for rnd in rounds]
        ratios = [a / b if a and b else None for a, b in zip(nums, dens, strict=True)]
        ok = [v for v in ratios if v is not None]
        median = statistics.median(ok) if ok else None
        out[name] = {"label": label, "goal": goal, "rounds": ratios, "numerators": nums,
                     "denominators": dens, "median": median,
                     "met": None if median is None else median >= goal,
                     "needs": den[1]}
    return out


def _goal_lines(results: list[dict[str, Any]]) -> list[str]:
    goals = goal_ratios(results)
    if not goals:
        return []
    n = len(next(iter(goals.values()))["rounds"])
    lines = ["\nhttp-inject goals" + (f" (median over {n} rounds):" if n > 1 else ":")]
    for g in goals.values():
        if g["median"] is None:
            hint = (f" (run with --peers {g['needs']})"
                    if not any(r.get("peer") == g["needs"] for r in results) else "")
            lines.append(f"  {g['label']}: -{hint} (goal >= {g['goal']:g})")
            continue
        verdict = "met" if g["met"] else "NOT met"
        if n > 1:
            detail = "rounds " + ", ".join(f"{_fmt(v, 2)}x" for v in g["rounds"])
        else:
            detail = f"{_fmt(g['numerators'][0])} / {_fmt(g['denominators'][0])} msg/s"
        lines.append(f"  {g['label']}: {g['median']:.2f}x (goal >= {g['goal']:g}: {verdict};"
                     f" {detail})")
    return lines


def format_table(doc: dict[str, Any]) -> str:
    cols = [("scenario", "scenario", 0), ("peer", "peer", 0), ("msg/s", "msg_s", 0),
            ("inject/s", "inject_msg_s", 0), ("p50 ms", "latency_p50_ms", 1),
            ("p99 ms", "latency_p99_ms", 1), ("CPU s/1k", "cpu_s_per_1000", 2),
            ("RSS MB", "peak_rss_mb", 0), ("spool B/msg", "spool_bytes_per_msg", 0),
            ("msgs", "accepted", 0), ("ok", "complete", 0)]
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
    colours = {"relay": "tab:blue", "postfix": "tab:orange", "direct": "tab:green"}
    for ax, scen in zip(axes[:, 0], scenarios, strict=True):
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
