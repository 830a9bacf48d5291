"""Benchmark scenarios and the runner that measures one (scenario, peer) pair.

Every scenario is bounded: the load stops after ``duration`` seconds or a message count,
and waiting for delivery stops at ``drain_timeout`` (the result then says
``complete: false``). Everything is loopback: the sink listens on 127.x addresses and
the peer relays to it.

Scenarios:

``inject``  acceptance rate: messages/s from first MAIL to last 250, latency of the 250.
``e2e``     accept + durable queue + delivery: messages/s from the first injection until
            the sink has received the last recipient.
``fanout``  ~1000 recipient domains, each with its own sink address and throttle
            (``max_connections``, ``max_message_rate``), a few hot domains carrying a
            fifth of the traffic; the sink's records prove no throttle was exceeded.
``large``   100 KB and 1 MB bodies, end to end.
``defer``   a share of the domains answers 451 at RCPT while the load runs, then
            recovers; the queue grows and drains, healthy domains must not slow down.
``smtp-source``  Postfix's C client ``smtp-source``, 2 KB messages, 20 sessions, with
            and without ``-d`` (two rows), the peer relaying to Postfix's ``smtp-sink``
            (``bench/smtp_source.py``).
``smtp-source-100k``  the same with 100 KB messages (rows ``smtp-source 100KB`` and
            ``smtp-source -d 100KB``).
``http-inject``  the HTTP injection API (SparkPost's transmissions): requests of 1, 100
            and 1000 recipients with per-recipient substitution, ~2 KB rendered messages,
            end to end to the sink, next to SMTP injection of 2 KB single-recipient
            messages (``smtp-inject`` row, every peer) (``bench/http_inject.py``).
``dkim``    every message RSA-2048 signed, 2 KB and 100 KB, end to end: the relay signed
            and unsigned (same load, same run), Postfix + OpenDKIM signing with the same
            key; the sink counts the signed messages (``bench/dkim.py``).
``pushback`` a backlog to one domain behind a sink with a hidden limit (50 messages a
            minute per source address, 421 4.7.28 above it) for ``--pushback-seconds``:
            delivered rate vs the limit, refused share, connections per refusal window
            (``bench/pushback.py``). Not in the default list (minutes per peer).
``webhooks`` the ``e2e`` load with and without a webhook POSTing every event to a local
            receiver (relay only; other peers get the ``webhooks off`` row): events/s
            received, mean batch, backlog when the sink had everything, both e2e rates
            (``bench/webhooks.py``).
``observability`` the ``e2e`` load with the mail log and /metrics (scraped every second)
            off and on, same run, alternating which goes first: both e2e rates and their
            ratio (the issue's goal: on costs at most 3%) (``bench/observe.py``).
``cluster`` two relay nodes with limits shared through Redis against two with local
            halves, same sink: e2e rates and their ratio, Redis round trips per 1000
            messages, and a cluster-wide rate limit's tracking over a minute (relay
            only; ``bench/cluster.py``). Not in the default list (about two minutes).
"""

from __future__ import annotations

import importlib
import math
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench.loadgen import LoadResult, LoadSpec, run_load
from bench.metrics import TreeSample, dir_bytes, percentile, sample_tree
from bench.peers import DkimKey, PeerError, PeerSetup, make_peer
from bench.sink import Behaviour, Sink

__all__ = ["DEFAULT_SCENARIOS", "SCENARIOS", "Scenario", "build_scenarios", "run_one",
           "run_rows", "run_with_peer", "sample_server", "start_sink"]


@dataclass
class Scenario:
    name: str
    description: str
    load: LoadSpec
    e2e: bool = True
    drain_timeout: float = 60.0
    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    #: domain -> sink address ("127.x.y.z"); the sink listens there too.
    routes: dict[str, str] = field(default_factory=dict)
    domain_throttle: dict[str, Any] = field(default_factory=dict)
    #: domains whose behaviour turns to ACCEPT once the load ends (defer scenario).
    recover_after_load: list[str] = field(default_factory=list)
    #: what drives the load: ``loadgen`` (bench/loadgen.py), ``smtp-source``
    #: (bench/smtp_source.py; uses ``load.sessions``, ``load.sizes[0]``, ``load.messages``
    #: and ``load.duration`` only) or ``http-inject`` (bench/http_inject.py: HTTP rows
    #: per ``http_batches``, then ``load`` as the SMTP comparison row).
    driver: str = "loadgen"
    #: smtp-source: messages per variant, sized by the first peer's probe, reused by the
    #: next peers (the same load for every server of the run).
    sized: dict[str, int] = field(default_factory=dict)
    #: The relay peer's ``[server] workers`` (0: its default, one per CPU).
    relay_workers: int = 0
    #: http-inject: recipients per request, one row each.
    http_batches: tuple[int, ...] = ()
    #: http-inject: concurrent HTTP clients (one keep-alive connection each).
    http_clients: int = 8
    #: The key every peer signs with (``PeerSetup.dkim``); None: the relay does not sign.
    dkim: DkimKey | None = None
    #: dkim: (message bytes, messages; 0 = ``load.duration`` seconds), one row group each.
    dkim_sizes: tuple[tuple[int, int], ...] = ()
    #: pushback: the sink's hidden limit (messages per window per source address) and
    #: how long each peer runs against it.
    pushback_rate: int = 0
    pushback_window: float = 60.0
    pushback_seconds: float = 0.0
    #: cluster: how long the rate row measures the cluster-wide limit.
    cluster_seconds: float = 60.0


SCENARIOS = ("inject", "e2e", "fanout", "large", "defer", "smtp-source", "smtp-source-100k",
             "http-inject", "dkim", "pushback", "webhooks", "observability", "cluster")
#: What ``python -m bench`` runs without ``--scenarios``: pushback takes minutes per peer,
#: cluster about two minutes (and a redis-server).
DEFAULT_SCENARIOS = tuple(s for s in SCENARIOS if s not in ("pushback", "cluster"))

_SIZES = [(2048, 0.5), (8192, 0.35), (32768, 0.15)]
_RCPTS = [(1, 0.8), (2, 0.15), (5, 0.05)]


def build_scenarios(duration: float = 8.0, quick: bool = False, sessions: int = 20,
                    fanout_domains: int = 1000, pipelining: bool = True,
                    messages_per_connection: int = 100,
                    sizes: list[tuple[int, float]] | None = None,
                    recipients: list[tuple[int, float]] | None = None,
                    domains: int = 20, relay_workers: int = 0,
                    http_clients: int = 8, pushback_seconds: float = 240.0,
                    ) -> dict[str, Scenario]:
    """The suite. ``quick`` shrinks everything to a few seconds (tests, smoke runs).
    ``sizes``/``recipients``/``domains`` set the mix of inject, e2e and defer (fanout,
    large, smtp-source and http-inject have their own). ``http_clients``: concurrent HTTP
    clients of http-inject. ``pushback_seconds``: each peer's run against the pushback
    sink (``quick``: at most 30 s, against 10 messages per 10 s)."""
    if quick:
        duration = min(duration, 2.0)
        fanout_domains = min(fanout_domains, 40)
    drain = 20.0 if quick else 60.0
    common: dict[str, Any] = {"sessions": sessions, "sizes": sizes or _SIZES,
                              "recipients": recipients or _RCPTS}
    plain_domains = [f"d{i:02d}.bench.test" for i in range(max(1, domains))]
    out: dict[str, Scenario] = {}
    out["inject"] = Scenario(
        "inject", "acceptance rate (250 after durable queueing)",
        LoadSpec(duration=duration, domains=plain_domains, **common), e2e=False)
    out["e2e"] = Scenario(
        "e2e", "accept + queue + deliver, until the sink has every recipient",
        LoadSpec(duration=duration, domains=plain_domains, **common), drain_timeout=drain)
    # fanout: one sink address per domain so each domain is its own destination on both
    # peers; ten hot domains get 3% of the traffic, so their 1/s rate limit binds (~12
    # messages each) while the long tail measures parallelism over many destinations.
    # The rate is a whole number of seconds per message because Postfix's
    # smtp_destination_rate_delay only takes whole seconds.
    fan = [f"f{i:04d}.fanout.test" for i in range(fanout_domains)]
    hot = min(10, max(1, fanout_domains // 10))
    weights = [0.03 / hot] * hot + [0.97 / max(1, fanout_domains - hot)] * (fanout_domains - hot)
    routes = {d: f"127.3.{i // 250}.{i % 250 + 1}" for i, d in enumerate(fan)}
    out["fanout"] = Scenario(
        "fanout", f"{fanout_domains} domains, per-domain max_connections/max_message_rate",
        LoadSpec(duration=duration, messages=40 if quick else 4000, domains=fan,
                 domain_weights=weights, sessions=sessions, sizes=[(4096, 1.0)],
                 recipients=[(1, 1.0)]),
        drain_timeout=drain, routes=routes,
        domain_throttle={"max_connections": 2, "max_message_rate": "60/min"})
    out["large"] = Scenario(
        "large", "100 KB and 1 MB bodies, end to end",
        LoadSpec(duration=duration, messages=40 if quick else 0, domains=plain_domains,
                 sessions=max(2, sessions // 2), sizes=[(100 * 1024, 0.7), (1024 * 1024, 0.3)],
                 recipients=[(1, 1.0)]), drain_timeout=drain)
    deferred = plain_domains[: max(1, len(plain_domains) // 5)]  # 20% answer 451
    out["defer"] = Scenario(
        "defer", "20% of domains answer 451 during the load, then recover",
        LoadSpec(duration=duration, domains=plain_domains, **common), drain_timeout=drain,
        behaviours={d: Behaviour.TEMPFAIL for d in deferred}, recover_after_load=deferred)
    out["smtp-source"] = Scenario(
        "smtp-source", "smtp-source -s 20 -l 2048, with and without -d, relaying to smtp-sink",
        LoadSpec(duration=duration, messages=200 if quick else 0, sessions=sessions,
                 sizes=[(2048, 1.0)]), e2e=False, driver="smtp-source")
    out["smtp-source-100k"] = Scenario(
        "smtp-source-100k",
        "smtp-source -s 20 -l 102400, with and without -d, relaying to smtp-sink",
        LoadSpec(duration=duration, messages=100 if quick else 0, sessions=sessions,
                 sizes=[(100 * 1024, 1.0)]), e2e=False, driver="smtp-source")
    # http-inject: ``load`` is the SMTP comparison (2 KB, 1 recipient); the HTTP rows take
    # their size, domains, duration and (quick) recipient count from it too.
    out["http-inject"] = Scenario(
        "http-inject", "HTTP injection, 1/100/1000 recipients a request, vs SMTP, end to end",
        LoadSpec(duration=duration, messages=200 if quick else 0, domains=plain_domains,
                 sessions=sessions, sizes=[(2048, 1.0)], recipients=[(1, 1.0)]),
        drain_timeout=drain, driver="http-inject", http_batches=(1, 100, 1000),
        http_clients=http_clients)
    # dkim: ``load`` is the template (1 recipient, 20 domains); each size replaces its
    # sizes and count (bench/dkim.py). --quick: 100 messages of 2 KB, 20 of 100 KB.
    out["dkim"] = Scenario(
        "dkim", "RSA-2048 DKIM signing, 2 KB and 100 KB, end to end (relay signed/unsigned, "
                "Postfix + OpenDKIM)",
        LoadSpec(duration=duration, domains=plain_domains, sessions=sessions,
                 sizes=[(2048, 1.0)], recipients=[(1, 1.0)]),
        drain_timeout=drain, driver="dkim",
        dkim_sizes=((2048, 100 if quick else 0), (100 * 1024, 20 if quick else 0)))
    # pushback: one domain, 2 KB single-recipient messages; the backlog's size follows
    # from the limit and the run's length (bench/pushback.py).
    out["pushback"] = Scenario(
        "pushback", "a hidden per-source rate limit answered with 421 4.7.28",
        LoadSpec(duration=duration, domains=["gmail.pushback.test"], sessions=4,
                 sizes=[(2048, 1.0)], recipients=[(1, 1.0)]),
        driver="pushback", pushback_rate=10 if quick else 50,
        pushback_window=10.0 if quick else 60.0,
        pushback_seconds=min(pushback_seconds, 30.0) if quick else pushback_seconds)
    out["webhooks"] = Scenario(
        "webhooks", "e2e with and without a webhook receiving every event",
        LoadSpec(duration=duration, domains=plain_domains, **common), drain_timeout=drain,
        driver="webhooks")
    out["observability"] = Scenario(
        "observability", "e2e with the mail log and /metrics off and on",
        LoadSpec(duration=duration, domains=plain_domains, **common), drain_timeout=drain,
        driver="observability")
    out["cluster"] = Scenario(
        "cluster", "two nodes, limits shared through Redis vs local halves",
        LoadSpec(duration=duration, domains=plain_domains, **common), drain_timeout=drain,
        driver="cluster", cluster_seconds=15.0 if quick else 60.0)
    for sc in out.values():
        sc.relay_workers = relay_workers
        sc.load.pipelining = pipelining
        sc.load.messages_per_connection = messages_per_connection
    return out


class _Progress:
    """The live progress line (carriage-return updates on a terminal)."""

    def __init__(self, label: str, stream: Any = None) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.monotonic()
        self.last_line = 0.0

    def update(self, accepted: int, delivered: int, queued: int, rss: int) -> None:
        el = time.monotonic() - self.t0
        text = (f"[{self.label}] {el:5.1f}s accepted {accepted} "
                f"({accepted / el if el else 0:.0f}/s) delivered {delivered} "
                f"queue~{queued} rss {rss / 1e6:.0f}MB")
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            self.stream.flush()
        elif el - self.last_line >= 5:
            self.last_line = el
            self.stream.write(text + "\n")
            self.stream.flush()

    def done(self) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


#: The scenarios with a runner of their own (``module:function``, called like ``run_one``
#: and returning the rows); ``smtp-source`` takes no load generator processes.
_DRIVERS = {
    "http-inject": "bench.http_inject:run_http_inject",
    "dkim": "bench.dkim:run_dkim",
    "pushback": "bench.pushback:run_pushback",
    "webhooks": "bench.webhooks:run_webhooks",
    "observability": "bench.observe:run_observe",
    "cluster": "bench.cluster:run_cluster",
}


async def run_rows(scenario: Scenario, peer_name: str, processes: int = 2,
                   show_progress: bool = True,
                   log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The result rows of ``scenario`` against ``peer_name``: one for loadgen scenarios,
    one per variant for ``smtp-source``, one per batch size plus ``smtp-inject`` for
    ``http-inject``, signed/unsigned rows per size for ``dkim``, one for ``pushback``."""
    if scenario.driver == "smtp-source":
        from bench.smtp_source import run_smtp_source

        return await run_smtp_source(scenario, peer_name, show_progress, log)
    driver = _DRIVERS.get(scenario.driver)
    if driver is not None:  # imported when used: each pulls in what only it needs
        module, function = driver.split(":")
        run = getattr(importlib.import_module(module), function)
        return await run(scenario, peer_name, processes, show_progress, log)
    return [await run_one(scenario, peer_name, processes, show_progress, log)]


async def start_sink(nursery: trio.Nursery, scenario: Scenario, sink: Sink) -> PeerSetup:
    """Serve ``sink`` in ``nursery`` on 127.0.0.1 (ephemeral port) and on every route
    address of ``scenario``; return the ``PeerSetup`` that makes a peer relay to it
    (routes, throttles, relay workers, the DKIM key). The sink stops when the nursery is
    cancelled."""
    sink_port = await nursery.start(sink.serve, "127.0.0.1", 0)
    routes: dict[str, str] = {}
    for domain, addr in scenario.routes.items():
        # every route address listens on the same port number when possible
        try:
            await nursery.start(sink.serve, addr, sink_port)
        except OSError:
            port = await nursery.start(sink.serve, addr, 0)
            routes[domain] = f"{addr}:{port}"
            continue
        routes[domain] = f"{addr}:{sink_port}"
    return PeerSetup(sink_port=sink_port, routes=routes,
                     domain_throttle=scenario.domain_throttle,
                     workers=scenario.relay_workers, dkim=scenario.dkim)


async def run_one(scenario: Scenario, peer_name: str, processes: int = 2,
                  show_progress: bool = True,
                  log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run ``scenario`` against ``peer_name`` with a fresh sink; return the result row."""
    row: dict[str, Any] = {"scenario": scenario.name, "peer": peer_name,
                           "description": scenario.description}
    sink = Sink(behaviours=dict(scenario.behaviours))

    async def measure(peer: Any) -> None:
        await _measure(scenario, peer, sink, row, processes, show_progress)

    await run_with_peer(scenario, peer_name, sink, row, measure, log)
    return row


async def run_with_peer(scenario: Scenario, peer_name: str, sink: Sink, row: dict[str, Any],
                        measure: Callable[[Any], Awaitable[None]],
                        log: Callable[[str], None] | None = None,
                        make: Callable[[str, PeerSetup], Any] = make_peer) -> None:
    """Serve ``sink`` for ``scenario`` (``start_sink``), start ``peer_name`` relaying to
    it (``make(peer_name, setup)``) and await ``measure(peer)``; a peer that cannot start
    becomes the row's ``error``. The sink stops when this returns."""
    async with trio.open_nursery() as nursery:
        setup = await start_sink(nursery, scenario, sink)
        try:
            peer = make(peer_name, setup)
            async with peer:
                await measure(peer)
        except PeerError as e:
            row["error"] = str(e)
            if log:
                log(f"{row['scenario']}/{peer_name}: {e}")
        nursery.cancel_scope.cancel()


async def _measure(scenario: Scenario, peer: Any, sink: Sink, row: dict[str, Any],
                   processes: int, show_progress: bool) -> None:
    roots = peer.root_pids()
    spool = peer.spool_dir
    base = await trio.to_thread.run_sync(sample_tree, roots)
    spool0 = await trio.to_thread.run_sync(dir_bytes, spool)
    t0_mono, t0_trio = time.monotonic(), trio.current_time()
    # The sink runs on this (trio) thread: its CPU, plus the orchestrator's bookkeeping,
    # is this thread's CPU time during the run (the /proc sampler runs in other threads).
    bench_cpu0 = time.thread_time()
    progress = _Progress(f"{scenario.name}/{peer.name}") if show_progress else None
    state: dict[str, Any] = {"accepted": 0, "rcpts": 0, "peak_rss": base.rss_bytes, "peak_spool": 0,
                             "spool_per_msg": math.nan, "peak_queue": 0}

    def on_progress(accepted: int, failed: int, rcpts: int) -> None:
        state["accepted"] = accepted
        state["rcpts"] = rcpts

    spec = scenario.load
    spec = type(spec)(**{**{f: getattr(spec, f) for f in spec.__struct_fields__},
                         "port": peer.port})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample_server, roots, spool, spool0, sink, state, progress)
        result: LoadResult = await run_load(spec, processes, on_progress)
        state["accepted"] = result.accepted
        load_end = time.monotonic()
        for d in scenario.recover_after_load:
            sink.set_behaviour(d, Behaviour.ACCEPT)
        complete = True
        if scenario.e2e and peer.name != "direct":
            complete = await drained(sink, result.recipients_accepted, scenario.drain_timeout)
        nursery.cancel_scope.cancel()
    bench_cpu = time.thread_time() - bench_cpu0
    if progress is not None:
        progress.done()
    end = await trio.to_thread.run_sync(sample_tree, roots)

    def mono(t_trio: float) -> float:
        return t_trio - t0_trio + t0_mono

    first = result.first_send or t0_mono
    last_arrival = mono(sink.arrivals[-1][0]) if sink.arrivals else load_end
    accepted = result.accepted
    inject_secs = max(1e-9, result.last_reply - first) if result.last_reply else math.nan
    e2e_secs = max(1e-9, last_arrival - first)
    is_e2e = scenario.e2e and peer.name != "direct"
    row.update({
        "accepted": accepted,
        "recipients_accepted": result.recipients_accepted,
        "recipients_refused": result.recipients_refused,
        "failed": result.messages_failed + result.connect_errors,
        # messages the sink received with a DKIM-Signature: field
        "signed_messages": sink.signed_messages,
        "complete": (complete and sink.total_recipients >= result.recipients_accepted
                     if is_e2e else accepted > 0 and not result.messages_failed),
        "duplicates": max(0, sink.total_recipients - result.recipients_accepted),
        "inject_msg_s": accepted / inject_secs if accepted else 0.0,
        "e2e_msg_s": (accepted / e2e_secs) if is_e2e and accepted else None,
        "latency_p50_ms": percentile(result.latencies, 50) * 1000,
        "latency_p99_ms": percentile(result.latencies, 99) * 1000,
        **server_figures(sink, state, base, end, roots, spool, accepted),
        "mb_sent": result.bytes_sent / 1e6,
        # what the bench itself cost the shared CPUs (not charged to the server)
        "loadgen_cpu_s_per_1000": (result.cpu_seconds / accepted * 1000) if accepted else None,
        "sink_cpu_s_per_1000": (bench_cpu / sink.total_messages * 1000
                                if sink.total_messages else None),
        "errors": result.errors[:5],
        "timeline": {
            "accepted": [(round(t - first, 3), n) for t, n in result.timeline],
            "delivered": _cumulative([mono(t) - first for t, _, _ in sink.arrivals]),
            "accepted_rcpts": [(round(t - first, 3), n) for t, n in result.timeline_rcpts],
            "delivered_rcpts": _cumulative([mono(t) - first for t, _, _ in sink.arrivals],
                                           weights=[n for _, _, n in sink.arrivals]),
        },
    })
    row["msg_s"] = row["e2e_msg_s"] if is_e2e else row["inject_msg_s"]
    if not row["complete"] and hasattr(peer, "keep"):
        peer.keep = True  # an incomplete run keeps the server's files for a post-mortem
        row["kept_files"] = str(peer.tmp)
    if scenario.domain_throttle:
        row["throttle"] = _throttle_check(scenario, sink)
    if scenario.recover_after_load:
        row["defer"] = _defer_check(scenario, sink, first, load_end, mono)


async def drained(sink: Sink, expected: int, timeout: float) -> bool:
    """Wait until the sink has received ``expected`` recipients; False if ``timeout``
    seconds passed first (the row is then ``complete: false``)."""
    try:
        await sink.wait_for(lambda s: s.total_recipients >= expected, timeout=timeout)
    except TimeoutError:
        return False
    return True


def server_figures(sink: Sink, state: dict[str, Any], base: TreeSample, end: TreeSample,
                   roots: list[int], spool: Path | None, accepted: int) -> dict[str, Any]:
    """A row's figures of the server under test and of what reached the sink: CPU per
    1000 ``accepted`` (from the tree samples ``base`` and ``end``), peak RSS and spool
    growth (``sample_server``'s ``state``), deliveries."""
    return {
        "delivered_messages": sink.total_messages,
        "delivered_recipients": sink.total_recipients,
        "delivered_bytes_per_msg": (sink.total_bytes / sink.total_messages
                                    if sink.total_messages else None),
        "cpu_s_per_1000": ((end.cpu_seconds - base.cpu_seconds) / accepted * 1000
                           if roots and accepted else None),
        "peak_rss_mb": state["peak_rss"] / 1e6 if roots else None,
        "spool_bytes_per_msg": (None if spool is None or math.isnan(state["spool_per_msg"])
                                else state["spool_per_msg"]),
        "peak_spool_mb": state["peak_spool"] / 1e6 if spool is not None else None,
        "peak_queue_estimate": state["peak_queue"],
    }


async def sample_server(roots: list[int], spool: Path | None, spool0: int, sink: Sink,
                        state: dict[str, Any], progress: _Progress | None) -> None:
    """Every 0.25 s until cancelled: the server tree's PSS into ``state["peak_rss"]``
    (max), and every 0.5 s the spool's growth over ``spool0`` bytes into
    ``state["peak_spool"]`` (max) and, when the estimated queue is at its largest (>= 20
    messages), ``state["peak_queue"]`` and ``state["spool_per_msg"]``. The driver keeps
    ``state["accepted"]`` (messages) and ``state["rcpts"]`` (their recipients) current;
    the queue is estimated from those and the sink's recipients. Updates ``progress``."""
    n = 0
    while True:
        tree = await trio.to_thread.run_sync(sample_tree, roots)
        state["peak_rss"] = max(state["peak_rss"], tree.rss_bytes)
        delivered = sink.total_messages
        # Queued messages, estimated from recipients (a peer may split a message
        # per destination, so the sink's message count can exceed ours).
        queued_rcpts = max(0, state["rcpts"] - sink.total_recipients)
        per_msg = state["accepted"] / state["rcpts"] if state["rcpts"] else 1.0
        queued = round(queued_rcpts * per_msg)
        if n % 2 == 0 and spool is not None:
            size = await trio.to_thread.run_sync(dir_bytes, spool) - spool0
            state["peak_spool"] = max(state["peak_spool"], size)
            if queued >= max(20, state["peak_queue"]):
                state["peak_queue"] = queued
                state["spool_per_msg"] = size / queued
        if progress is not None:
            progress.update(state["accepted"], delivered, queued, tree.rss_bytes)
        n += 1
        await trio.sleep(0.25)


def _cumulative(times: list[float], step: float = 0.25,
                weights: list[int] | None = None) -> list[tuple[float, int]]:
    """Exact arrival times (each counting ``weights[i]``, default 1) -> cumulative count
    sampled every ``step`` seconds."""
    if not times:
        return []
    pairs = sorted(zip(times, weights or [1] * len(times), strict=True))
    out: list[tuple[float, int]] = [(0.0, 0)]
    j, total, t = 0, 0, step
    while j < len(pairs):
        while j < len(pairs) and pairs[j][0] <= t:
            total += pairs[j][1]
            j += 1
        out.append((round(t, 3), total))
        t += step
    return out


def _throttle_check(scenario: Scenario, sink: Sink) -> dict[str, Any]:
    """Did any domain see more connections or messages than its throttle allows?"""
    from relay.config import parse_rate

    limit_conn = int(scenario.domain_throttle.get("max_connections", 0)) or None
    rate = scenario.domain_throttle.get("max_message_rate")
    per_s = parse_rate(rate) if rate else None
    window = 5.0
    worst_conn, worst_rate, worst_domain = 0, 0.0, ""
    for d in scenario.routes:
        st = sink.stats.get(d)
        if st is None:
            continue
        worst_conn = max(worst_conn, st.max_concurrent_connections)
        if per_s:
            n = sink.max_messages_in_window(d, window)
            if n / window > worst_rate:
                worst_rate, worst_domain = n / window, d
    allowed_in_window = (per_s * window + 1) if per_s else None  # +1: a token bucket's burst
    held = (limit_conn is None or worst_conn <= limit_conn) and (
        allowed_in_window is None or worst_rate * window <= allowed_in_window)
    return {"max_connections_limit": limit_conn, "max_connections_seen": worst_conn,
            "rate_limit_per_s": per_s, "max_rate_seen_per_s": worst_rate,
            "max_in_window": round(worst_rate * window), "allowed_in_window": allowed_in_window,
            "rate_window_s": window, "busiest_domain": worst_domain, "held": held,
            "domains_delivered": sum(1 for d in scenario.routes if d in sink.stats
                                     and sink.stats[d].messages)}


def _defer_check(scenario: Scenario, sink: Sink, first: float, load_end: float,
                 mono: Callable[[float], float]) -> dict[str, Any]:
    """How healthy domains fared while others deferred, and how fast the queue drained."""
    deferred = set(scenario.recover_after_load)
    healthy_times = [mono(t) for t, d, _ in sink.arrivals if d not in deferred]
    deferred_times = [mono(t) for t, d, _ in sink.arrivals if d in deferred]
    healthy_during = sum(1 for t in healthy_times if t <= load_end)
    return {
        "deferred_domains": sorted(deferred),
        "tempfails_answered": sum(sink.stats[d].tempfails for d in deferred if d in sink.stats),
        "healthy_delivered": len(healthy_times),
        "healthy_msg_s_during_load": healthy_during / max(1e-9, load_end - first),
        "healthy_done_after_s": (max(healthy_times) - first) if healthy_times else None,
        "deferred_delivered": len(deferred_times),
        "drain_after_recovery_s": (max(deferred_times) - load_end) if deferred_times else None,
    }
