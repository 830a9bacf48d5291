"""The ``pushback`` scenario: the peer against a receiver with a rate limit it is not told.

The issue: "A 'pushback' sink enforces a limit the relay is not told (say 50 messages per
minute per source address) and answers 421 4.7.28 above it. Bench scenario pushback: the
relay against that sink and Postfix against the same sink, same run. Goal: after the
first minute the relay delivers at >= 90% of the hidden limit with < 5% of its attempts
refused, and opens at most 2 connections per refusal window; report the same figures for
Postfix (which has no rate adaptation) beside it, and draw the relay's rate over time
against the limit."

Contract: ``await run_pushback(scenario, peer_name, processes, ...)`` returns one row
with the keys of ``bench.scenarios.run_one``'s rows (``msg_s``, ``inject_msg_s``,
``latency_p50_ms``, ``cpu_s_per_1000``, ``peak_rss_mb``, ``accepted``, ``complete``,
``delivered_messages``, ...) plus ``pushback`` (the figures and goals below) and
``pushback_times`` (seconds since the first message was sent: ``accepted``, ``refused``,
``connections`` at the sink, for the chart).

The run, per peer, with a fresh server and a fresh ``bench.sink.Sink(pushback_rate=
scenario.pushback_rate, pushback_window=scenario.pushback_window)`` (50 messages per 60 s
per source address, a sliding window, refused at the first RCPT with Gmail's 421 4.7.28,
connection closed): ``bench.loadgen`` injects a backlog of ``backlog_size(scenario)``
2 KB single-recipient messages to one domain (more than the limit lets through during the
run, so the queue never runs dry), as fast as the peer takes them; then the run lasts
``scenario.pushback_seconds`` (``--pushback-seconds``, 240 by default; ``--quick``: 30 s
against a 10-per-10-s limit) from the first message sent, and the peer is stopped with
what it still holds. The peer relays to the sink as its smart host (``relayhost``), its
connections from 127.0.0.1.

Figures (``pushback_figures``), over every source address the sink saw, "after the
warm-up" meaning the whole windows from one ``pushback_window`` after the first message
to the end of the run (``measured_from``/``measured_to``: 60-240 s of a 240 s run; the
sink's window slides, so any whole window holds at most the limit and a perfect sender
scores exactly 100%, where a part window could show a burst as more):

* ``rate_per_min``: messages the sink accepted after the warm-up, per minute;
  ``rate_ratio`` = that / the hidden limit (per minute, times the source addresses used);
* ``refused_share``: 421s / (accepted + 421s) after the warm-up;
* ``max_connections_per_window`` (and the mean): ``bench.sink.RefusalWindow`` - from a
  refusal until the next accepted message, the connections the peer opened meanwhile (1
  for a sender that waits and probes once; the issue saw 5 at a time);
* totals: delivered, refused, connections opened, the most connections open at once.

The goals (``GOALS``) are judged for every peer; the report prints them under the table
with Postfix's beside the relay's, and ``bench.report`` draws messages accepted per
trailing window over time against the limit line.

``RELAY_PUSHBACK_TOML`` is what the relay peer's generated config gets appended for this
scenario: where the relay's shaping is turned on and tuned.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from bench.loadgen import LoadResult, run_load
from bench.metrics import dir_bytes, percentile, sample_tree
from bench.peers import Peer, PeerSetup, RelayPeer, make_peer
from bench.scenarios import _cumulative, _Progress, run_with_peer, sample_server, server_figures
from bench.sink import RefusalWindow, Sink, SourceStats

if TYPE_CHECKING:
    from bench.scenarios import Scenario

__all__ = ["GOALS", "RELAY_PUSHBACK_TOML", "STAGE", "backlog_size", "draw_panel",
           "goal_lines", "pushback_figures", "run_pushback"]

#: Appended to the relay peer's generated relay.toml (``bench.peers.RelayPeer``) in this
#: scenario only. Nothing yet: the relay runs with its defaults. This is the place to turn
#: shaping on and tune it for the bench (``[shaping]``: adaptive, pause, rules ...; the
#: sink answers from 127.0.0.1, so a Gmail rule needs a scope of its own here).
RELAY_PUSHBACK_TOML = """
# -- bench/pushback.py: RELAY_PUSHBACK_TOML (the pushback scenario's extra relay config) --
"""

#: Where the sink refuses (``bench.sink.PUSHBACK_STAGES``): at RCPT, as the issue's test did.
STAGE = "rcpt"

#: (key in ``pushback_figures``, label, comparison, goal): the issue's three goals.
GOALS: tuple[tuple[str, str, str, float], ...] = (
    ("rate_ratio", "delivered after the warm-up / hidden limit", ">=", 0.9),
    ("refused_share", "share of attempts refused after the warm-up", "<", 0.05),
    ("max_connections_per_window", "connections opened per refusal window (most)", "<=", 2),
)
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda v, g: v >= g, "<": lambda v, g: v < g, "<=": lambda v, g: v <= g}


def backlog_size(scenario: Scenario) -> int:
    """Messages injected: more than a perfect sender could deliver in the run (a full
    window at the start, then the limit per window), so the backlog never runs dry."""
    windows = scenario.pushback_seconds / scenario.pushback_window
    return scenario.pushback_rate * (math.ceil(windows) + 2)


class _PushbackRelay(RelayPeer):
    """The relay peer with ``RELAY_PUSHBACK_TOML`` appended to its config."""

    def config_text(self) -> str:
        return super().config_text() + RELAY_PUSHBACK_TOML


def _make_peer(name: str, setup: PeerSetup) -> Peer:
    return _PushbackRelay(setup) if name == "relay" else make_peer(name, setup)


async def run_pushback(scenario: Scenario, peer_name: str, processes: int = 2,
                       show_progress: bool = True,
                       log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The scenario's row against ``peer_name``: see the module docstring."""
    row: dict[str, Any] = {"scenario": scenario.name, "peer": peer_name,
                           "description": scenario.description}
    sink = Sink(pushback_rate=scenario.pushback_rate, pushback_window=scenario.pushback_window,
                pushback_stage=STAGE)

    async def measure(peer: Any) -> None:
        await _measure(scenario, peer, sink, row, processes, show_progress)

    await run_with_peer(scenario, peer_name, sink, row, measure, log, make=_make_peer)
    if log and not row.get("error"):
        log("   " + _summary(row))
    return [row]


async def _measure(scenario: Scenario, peer: Any, sink: Sink, row: dict[str, Any],
                   processes: int, show_progress: bool) -> None:
    roots = peer.root_pids()
    spool = peer.spool_dir
    base = await trio.to_thread.run_sync(sample_tree, roots)
    spool0 = await trio.to_thread.run_sync(dir_bytes, spool)
    t0_mono, t0_trio = time.monotonic(), trio.current_time()
    progress = _Progress(f"{scenario.name}/{peer.name}") if show_progress else None
    state: dict[str, Any] = {"accepted": 0, "rcpts": 0, "peak_rss": base.rss_bytes,
                             "peak_spool": 0, "spool_per_msg": math.nan, "peak_queue": 0}

    def on_progress(accepted: int, failed: int, rcpts: int) -> None:
        state["accepted"], state["rcpts"] = accepted, rcpts

    backlog = backlog_size(scenario)
    spec = msgspec.structs.replace(scenario.load, port=peer.port, messages=backlog)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_server, roots, spool, spool0, sink, state, progress)
        result: LoadResult = await run_load(spec, processes, on_progress)
        first = result.first_send or t0_mono
        # the measurement lasts pushback_seconds from the first message sent
        await trio.sleep(max(0.0, first + scenario.pushback_seconds - time.monotonic()))
        nursery.cancel_scope.cancel()
    if progress is not None:
        progress.done()
    end = await trio.to_thread.run_sync(sample_tree, roots)
    offset = t0_mono - t0_trio - first  # sink time -> seconds since the first message

    figures = pushback_figures(sink.sources, offset, scenario.pushback_seconds,
                               scenario.pushback_rate, scenario.pushback_window)
    figures.update({"backlog": backlog, "seconds": scenario.pushback_seconds,
                    "stage": STAGE})
    inject_secs = max(1e-9, result.last_reply - first) if result.last_reply else math.nan
    accepted = result.accepted
    row.update({
        "accepted": accepted,
        "recipients_accepted": result.recipients_accepted,
        "recipients_refused": result.recipients_refused,
        "failed": result.messages_failed + result.connect_errors,
        "complete": accepted == backlog and not result.messages_failed,
        "inject_msg_s": accepted / inject_secs if accepted else 0.0,
        "msg_s": figures["rate_per_min"] / 60.0,
        "latency_p50_ms": percentile(result.latencies, 50) * 1000,
        "latency_p99_ms": percentile(result.latencies, 99) * 1000,
        **server_figures(sink, state, base, end, roots, spool, accepted),
        "errors": result.errors[:5],
        "pushback": figures,
        "pushback_times": _times(sink.sources, offset),
        "timeline": {"accepted": [(round(t - first, 3), n) for t, n in result.timeline],
                     "delivered": _cumulative(_times(sink.sources, offset)["accepted"],
                                              step=1.0)},
    })


def _times(sources: dict[str, SourceStats], offset: float) -> dict[str, list[float]]:
    """Accepted, refused and connection times of every source, in seconds since the
    first message (``offset`` converts the sink's clock), sorted."""
    out: dict[str, list[float]] = {"accepted": [], "refused": [], "connections": []}
    names = {"accept": "accepted", "refuse": "refused", "connect": "connections"}
    for source in sources.values():
        for t, kind in source.events:
            out[names[kind]].append(round(t + offset, 3))
    return {k: sorted(v) for k, v in out.items()}


def pushback_figures(sources: dict[str, SourceStats], offset: float, seconds: float,
                     rate: int, window: float) -> dict[str, Any]:
    """The scenario's figures (module docstring) from the sink's per-source records:
    ``offset`` turns the sink's clock into seconds since the first message, ``seconds``
    is where the run ended, ``rate`` per ``window`` the hidden limit."""
    times = _times(sources, offset)
    warmup = window
    whole = math.floor((seconds - warmup) / window)
    until = warmup + whole * window if whole > 0 else seconds
    span = max(1e-9, until - warmup)
    after = sum(1 for t in times["accepted"] if warmup <= t < until)
    refused_after = sum(1 for t in times["refused"] if warmup <= t < until)
    used = sum(1 for s in sources.values() if s.messages or s.refusals) or 1
    limit_per_min = rate * 60.0 / window
    windows: list[RefusalWindow] = [w for s in sources.values() for w in s.refusal_windows()]
    conns = [w.connections for w in windows]
    figures: dict[str, Any] = {
        "limit_per_min": limit_per_min, "window_s": window, "sources_used": used,
        "measured_from": warmup, "measured_to": until,
        "delivered": len(times["accepted"]), "refused": len(times["refused"]),
        "delivered_after_warmup": after, "refused_after_warmup": refused_after,
        "rate_per_min": after / span * 60.0,
        "rate_ratio": after / span * 60.0 / (limit_per_min * used),
        "refused_share": (refused_after / (after + refused_after)
                          if after + refused_after else 0.0),
        "connections_opened": sum(s.connections_opened for s in sources.values()),
        "max_concurrent_connections": max((s.max_concurrent_connections
                                           for s in sources.values()), default=0),
        "refusal_windows": len(windows),
        "max_connections_per_window": max(conns, default=0),
        "mean_connections_per_window": statistics.fmean(conns) if conns else 0.0,
    }
    figures["goals"] = {key: {"label": label, "goal": goal, "compare": cmp,
                              "value": figures[key],
                              "met": _COMPARE[cmp](figures[key], goal)}
                        for key, label, cmp, goal in GOALS}
    return figures


def _summary(row: dict[str, Any]) -> str:
    """One line of a row's figures and goals: what the log and the report print."""
    f = row["pushback"]
    g = f["goals"]

    def verdict(key: str) -> str:
        return "met" if g[key]["met"] else "NOT met"

    return (f"{f['rate_per_min']:.1f} msg/min from {f['measured_from']:.0f} to "
            f"{f['measured_to']:.0f} s = "
            f"{100 * f['rate_ratio']:.0f}% of the hidden {f['limit_per_min']:.0f}/min "
            f"(goal >= 90%: {verdict('rate_ratio')}); {100 * f['refused_share']:.1f}% of "
            f"attempts refused (goal < 5%: {verdict('refused_share')}); at most "
            f"{f['max_connections_per_window']} connections per refusal window (mean "
            f"{f['mean_connections_per_window']:.1f} over {f['refusal_windows']} windows; "
            f"goal <= 2: {verdict('max_connections_per_window')}); {f['delivered']} "
            f"delivered, {f['refused']} refused, {f['connections_opened']} connections "
            f"(at most {f['max_concurrent_connections']} at once)")


def goal_lines(results: list[dict[str, Any]]) -> list[str]:
    """The report's pushback section: every peer's figures against the issue's goals."""
    rows = [r for r in results if r.get("scenario") == "pushback" and "pushback" in r
            and not r.get("error")]
    if not rows:
        return []
    f = rows[0]["pushback"]
    lines = [f"\npushback goals (hidden limit {f['limit_per_min']:.0f}/min per source "
             f"address, sliding {f['window_s']:.0f} s window, 421 4.7.28 at {f['stage']}; "
             f"{f['seconds']:.0f} s runs):"]
    for r in rows:
        rnd = f" #{r['round']}" if r.get("round", 1) > 1 else ""
        note = "" if r["peer"] == "relay" else " (no rate adaptation)"
        lines.append(f"  {r['peer']}{rnd}{note}: {_summary(r)}")
    return lines


def draw_panel(ax: Any, rows: list[dict[str, Any]], colours: dict[str, str]) -> None:
    """Messages accepted per minute over time (trailing window, what the limit counts),
    every peer, against the hidden limit; their 421s per minute dashed, on the right-hand
    axis (a sender without adaptation draws thousands, which would flatten the rest)."""
    limit = rows[0]["pushback"]["limit_per_min"]
    window = rows[0]["pushback"]["window_s"]
    refusals = ax.twinx()
    for r in rows:
        times = r["pushback_times"]
        c = colours.get(r["peer"])
        end = r["pushback"]["seconds"]
        xs = [x / 2 for x in range(int(end * 2) + 1)]
        scale = 60.0 / window
        ax.plot(xs, _trailing(times["accepted"], xs, window, scale), color=c,
                label=f"{r['peer']} delivered")
        refusals.plot(xs, _trailing(times["refused"], xs, window, scale), color=c,
                      linestyle="--", linewidth=0.8, label=f"{r['peer']} 421s (right)")
    ax.axhline(limit, color="black", linewidth=1, label=f"hidden limit {limit:.0f}/min")
    ax.axvline(window, color="grey", linewidth=0.8, linestyle=":")
    ax.set_ylim(0, limit * 1.5)
    refusals.set_ylim(bottom=0)
    ax.set_title(f"pushback: delivered per minute (trailing {window:.0f} s) against a hidden "
                 f"{limit:.0f}/min limit; 421s per minute dashed")
    ax.set_xlabel("seconds since the first message")
    ax.set_ylabel("delivered per minute")
    refusals.set_ylabel("421s per minute")
    ax.grid(alpha=0.3)
    handles = ax.get_legend_handles_labels()
    extra = refusals.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], loc="upper right",
              fontsize="small")


def _trailing(times: list[float], xs: list[float], window: float, scale: float) -> list[float]:
    """For each x: events in (x - window, x], times ``scale`` (sorted ``times``)."""
    out, lo, hi = [], 0, 0
    for x in xs:
        while hi < len(times) and times[hi] <= x:
            hi += 1
        while lo < hi and times[lo] <= x - window:
            lo += 1
        out.append((hi - lo) * scale)
    return out
