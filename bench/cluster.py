"""The ``cluster`` scenario: what sharing limits between relay nodes through Redis costs,
and how closely a cluster-wide message rate holds (issue 18, "How fast").

The issue: "A bench scenario cluster: two nodes with Redis-shared limits against two
nodes with local limits, same run, same sink. Report the e2e rate (goal: shared limits
cost at most 10%), Redis round trips per 1000 messages, and how closely the combined
delivered rate tracks a cluster-wide message-rate limit (goal: within 5% over a
minute)."

Contract: ``await run_cluster(scenario, peer_name, processes, ...)`` returns three rows
for the relay (other peers have no cluster-wide limits: one row with an ``error``), each
with a fresh ``redis-server`` (``RedisServer``: loopback, no persistence), a fresh
``bench.sink.Sink`` and two fresh ``relay serve`` nodes (``ClusterNode``: the bench's
relay, connections from 127.0.0.2 and 127.0.0.3, one worker each):

The two e2e rows alternate their order from one call to the next (``--repeat``).

* ``cluster local``: every domain of ``scenario.load`` limited per node to half of
  ``E2E_CONNECTIONS`` connections and half of ``E2E_RATE`` (written ``local:``), no
  ``[cluster]``; the ``e2e`` load, half its sessions to each node, at once;
* ``cluster shared``: the same, the whole limits shared through Redis (the same totals
  for the pair, so the rows differ only by the sharing). Keys of both: ``msg_s`` (e2e:
  messages accepted / first message sent to last delivered), ``delivered_messages``,
  ``complete``, ``redis_round_trips_per_1000`` (the relay's calls as Redis counted them,
  ``RedisServer.round_trips``, per 1000 transactions the sink received: a message to
  two domains is two), ``max_concurrent_connections`` (the
  sink's, for the busiest domain); the shared row also ``shared_local_ratio`` (its
  ``msg_s`` / the local row's; goal >= 0.9);
* ``cluster rate``: both nodes shared, a backlog to one domain limited to ``TRACK_RATE``
  per minute and ``TRACK_CONNECTIONS`` connections for the two together; the run lasts
  ``scenario.cluster_seconds`` (60; ``--quick``: 15) after a warm-up of ``WARMUP``
  seconds from the first delivery. Keys: ``tracking`` = {``limit_per_min``,
  ``delivered_per_min`` (in the measured span), ``ratio`` (that / the limit; goal:
  within 5% of 1), ``most_in_any_minute`` (sliding window, whole run),
  ``per_node`` (messages by source address), ``redis_round_trips_per_1000``}.

``E2E_RATE`` is high enough not to bind on this machine, so the e2e rows measure what
the sharing costs (a lease per ``lease_batch`` messages, a slot lease per connection,
renewals) and not the limit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from bench.loadgen import LoadResult, LoadSpec, run_load
from bench.peers import PeerError, PeerSetup, RelayPeer
from bench.scenarios import _cumulative, drained, start_sink
from bench.sink import Sink

if TYPE_CHECKING:
    from bench.scenarios import Scenario

__all__ = ["E2E_CONNECTIONS", "E2E_RATE", "ROW_LOCAL", "ROW_RATE", "ROW_SHARED",
           "TRACK_RATE", "ClusterNode", "RedisServer", "run_cluster"]

ROW_LOCAL, ROW_SHARED, ROW_RATE = "cluster local", "cluster shared", "cluster rate"
#: The e2e rows' limits per domain for the pair of nodes (each local node: half).
E2E_CONNECTIONS = 20
E2E_RATE = 6000  # per second
#: The rate row: one domain, this many per minute and connections for both nodes.
TRACK_DOMAIN = "rate.cluster.test"
TRACK_RATE = 1200
TRACK_CONNECTIONS = 4
#: Seconds after the first delivery before the rate row starts measuring.
WARMUP = 5.0
NODES = 2
_calls = itertools.count()

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class RedisServer:
    """One ``redis-server`` on 127.0.0.1, no snapshot, no append-only file (restartable on
    the same port; the tests use it through ``tests/integration/redisproc.py``).
    Readiness and figures are asked with ``redis-cli`` (no hand-written protocol)."""

    directory: Path
    port: int = dataclasses.field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start (or restart, empty) and wait until it answers PING."""
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / f"redis-{self.port}.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(self.directory),
             "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer in {timeout}s")
            time.sleep(0.02)  # process start-up poll, bounded by the deadline
        return self

    def cli(self, *args: str) -> str:
        """One redis-cli command's output (e.g. ``cli("ZCARD", key)``)."""
        return subprocess.run([REDIS_CLI, "-h", "127.0.0.1", "-p", str(self.port), *args],
                              capture_output=True, text=True, timeout=5, check=True).stdout

    def ping(self) -> bool:
        try:
            return self.cli("PING").strip() == "PONG"
        except (subprocess.SubprocessError, OSError):
            return False

    def round_trips(self) -> int:
        """Calls clients have made of the commands the relay sends (``INFO
        commandstats``: EVALSHA/EVAL, ZREM, PING), so the commands a script runs inside
        Redis, which ``total_commands_processed`` counts too, are left out."""
        calls = 0
        for line in self.cli("INFO", "commandstats").splitlines():
            name, _, stats = line.partition(":")
            if name in ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_zrem", "cmdstat_ping"):
                calls += int(stats.split(",")[0].removeprefix("calls="))
        return calls

    def kill(self) -> None:
        """SIGKILL: Redis is gone at once (its data with it)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: Redis accepts connections but never answers (a slow Redis)."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def log(self) -> str:
        path = self.directory / f"redis-{self.port}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
            self.kill()


class ClusterNode(RelayPeer):
    """The bench's relay as node ``index`` of a pair: connections from 127.0.0.(index+2),
    one worker, ``extra`` TOML (limits, ``[cluster]``) appended."""

    def __init__(self, setup: PeerSetup, index: int, extra: str) -> None:
        super().__init__(dataclasses.replace(setup, workers=1))
        self.source = f"127.0.0.{index + 2}"
        self.extra = extra

    def config_text(self) -> str:
        text = super().config_text()
        if "[outbound]\n" not in text:
            raise PeerError("the relay peer's config has no [outbound] table to change")
        text = text.replace("[outbound]\n", f'[outbound]\nsource_address = "{self.source}"\n',
                            1)
        return text + self.extra


def _limits_toml(domains: list[str], connections: int, rate_per_s: float, *,
                 local: bool) -> str:
    scope = "local:" if local else ""
    conns = f'"local:{connections}"' if local else str(connections)
    return "".join(f'[outbound.domains."{d}"]\nmax_connections = {conns}\n'
                   f'max_message_rate = "{scope}{rate_per_s * 60:g}/min"\n' for d in domains)


def _cluster_toml(redis: RedisServer) -> str:
    return f'[cluster]\nredis = "{redis.url}"\nexpected_nodes = {NODES}\n'


async def run_cluster(scenario: Scenario, peer_name: str, processes: int = 2,
                      show_progress: bool = True,
                      log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The scenario's rows against ``peer_name``: see the module docstring."""
    if peer_name != "relay":
        return [{"scenario": scenario.name, "peer": peer_name,
                 "description": scenario.description,
                 "error": "relay only: the other peers have no cluster-wide limits"}]
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        rows: dict[str, dict[str, Any]] = {}
        # Odd calls (``--repeat``) run the shared row first: a machine that speeds up or
        # slows down during the run favours neither.
        order = [ROW_SHARED, ROW_LOCAL] if next(_calls) % 2 else [ROW_LOCAL, ROW_SHARED]
        for which in order:
            rows[which] = await _e2e_row(scenario, which, tmp / which.replace(" ", "-"),
                                         processes, shared=which == ROW_SHARED)
        local, shared = rows[ROW_LOCAL], rows[ROW_SHARED]
        if local.get("msg_s") and shared.get("msg_s"):
            shared["shared_local_ratio"] = shared["msg_s"] / local["msg_s"]
        rate = await _rate_row(scenario, tmp / "rate", processes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if log:
        for row in (local, shared, rate):
            log(f"   {row['scenario']}: " + _summary(row))
    return [local, shared, rate]


def _row(scenario: Scenario, name: str, description: str) -> dict[str, Any]:
    return {"scenario": scenario.name, "variant": name, "peer": "relay",
            "description": description}


async def _with_nodes(scenario: Scenario, sink: Sink, redis: RedisServer | None,
                      extra: str, body: Callable[[list[ClusterNode]], Any]) -> None:
    """Serve ``sink``, start the two nodes (``extra`` appended to each config), await
    ``body(nodes)``, stop everything."""
    async with trio.open_nursery() as nursery:
        setup = await start_sink(nursery, scenario, sink)
        nodes = [ClusterNode(setup, i, extra + (_cluster_toml(redis) if redis else ""))
                 for i in range(NODES)]
        async with contextlib.AsyncExitStack() as stack:
            for node in nodes:
                await stack.enter_async_context(node)
            await body(nodes)
        nursery.cancel_scope.cancel()


async def _loads(nodes: list[ClusterNode], spec: LoadSpec, processes: int
                 ) -> list[LoadResult]:
    """``spec`` split over the nodes (half the sessions, messages each), at once."""
    results: list[LoadResult] = [LoadResult() for _ in nodes]

    async def one(i: int) -> None:
        part = msgspec.structs.replace(
            spec, port=nodes[i].port, sessions=max(1, spec.sessions // len(nodes)),
            messages=spec.messages // len(nodes), seed=spec.seed + i)
        results[i] = await run_load(part, max(1, processes // len(nodes)))

    async with trio.open_nursery() as nursery:
        for i in range(len(nodes)):
            nursery.start_soon(one, i)
    return results


def _timeline(results: list[LoadResult], sink: Sink, first: float,
              mono: Callable[[float], float]) -> dict[str, list[tuple[float, int]]]:
    """The report's chart series: messages accepted by both nodes together, and
    delivered, cumulative, in seconds since the first message sent."""
    steps: list[tuple[float, int]] = []
    for r in results:
        before = 0
        for t, n in r.timeline:
            steps.append((t, n - before))
            before = n
    accepted, total = [], 0
    for t, n in sorted(steps):
        total += n
        accepted.append((round(t - first, 3), total))
    return {"accepted": accepted,
            "delivered": _cumulative([mono(t) - first for t, _d, _n in sink.arrivals])}


async def _e2e_row(scenario: Scenario, name: str, tmp: Path, processes: int, *,
                   shared: bool) -> dict[str, Any]:
    row = _row(scenario, name, ("e2e, limits shared by 2 nodes through Redis" if shared
                                else "e2e, each of 2 nodes its half of the limits, local"))
    domains = list(scenario.load.domains)
    extra = (_limits_toml(domains, E2E_CONNECTIONS, E2E_RATE, local=False) if shared else
             _limits_toml(domains, E2E_CONNECTIONS // NODES, E2E_RATE / NODES, local=True))
    redis = RedisServer(tmp / "redis").start() if shared else None
    sink = Sink()

    async def body(nodes: list[ClusterNode]) -> None:
        t0_mono, t0_trio = time.monotonic(), trio.current_time()
        trips0 = redis.round_trips() if redis else 0
        results = await _loads(nodes, scenario.load, processes)
        expected = sum(r.recipients_accepted for r in results)
        complete = await drained(sink, expected, scenario.drain_timeout)
        trips = redis.round_trips() - trips0 if redis else 0
        first = min((r.first_send for r in results if r.first_send), default=t0_mono)

        def mono(t_trio: float) -> float:
            return t_trio - t0_trio + t0_mono

        last = mono(sink.arrivals[-1][0]) if sink.arrivals else first
        accepted = sum(r.accepted for r in results)
        row.update({
            "accepted": accepted,
            "complete": complete and not any(r.messages_failed for r in results),
            "delivered_messages": sink.total_messages,
            "msg_s": accepted / max(1e-9, last - first) if accepted else 0.0,
            "redis_round_trips_per_1000": (trips / sink.total_messages * 1000
                                           if sink.total_messages else None),
            "max_concurrent_connections": max(
                (s.max_concurrent_connections for s in sink.stats.values()), default=0),
            "per_node": {ip: s.messages for ip, s in sink.sources.items()},
            "errors": [e for r in results for e in r.errors][:5],
            "timeline": _timeline(results, sink, first, mono),
        })

    try:
        await _with_nodes(scenario, sink, redis, extra, body)
    except PeerError as e:
        row["error"] = str(e)
    finally:
        if redis is not None:
            redis.stop()
    return row


def most_in_window(times: list[float], seconds: float) -> int:
    """Most of ``times`` inside any window of ``seconds`` (half-open)."""
    times = sorted(times)
    best = j = 0
    for i, t in enumerate(times):
        while t - times[j] >= seconds:
            j += 1
        best = max(best, i - j + 1)
    return best


async def _rate_row(scenario: Scenario, tmp: Path, processes: int) -> dict[str, Any]:
    seconds = scenario.cluster_seconds
    row = _row(scenario, ROW_RATE, f"2 nodes, one domain at {TRACK_RATE}/min for both")
    # Each node gets enough to carry the whole limit alone to the end: a node that ran
    # dry would keep its idle connections (and their slots) until idle_timeout.
    backlog = NODES * math.ceil(TRACK_RATE / 60 * (WARMUP + seconds + 10))
    spec = msgspec.structs.replace(scenario.load, domains=[TRACK_DOMAIN], domain_weights=[],
                                   messages=backlog, duration=3600.0, sessions=4,
                                   sizes=[(2048, 1.0)], recipients=[(1, 1.0)])
    extra = _limits_toml([TRACK_DOMAIN], TRACK_CONNECTIONS, TRACK_RATE / 60, local=False)
    redis = RedisServer(tmp / "redis").start()
    sink = Sink()

    async def body(nodes: list[ClusterNode]) -> None:
        t0_mono, t0_trio = time.monotonic(), trio.current_time()
        trips0 = redis.round_trips()
        results = await _loads(nodes, spec, processes)
        await sink.wait_for(lambda s: bool(s.arrivals), timeout=30)
        start = sink.arrivals[0][0] + WARMUP
        await trio.sleep_until(start + seconds)
        trips = redis.round_trips() - trips0
        times = sorted(t for t, d, _n in sink.arrivals if d == TRACK_DOMAIN)
        measured = sum(1 for t in times if start <= t < start + seconds)
        per_min = measured * 60.0 / seconds
        row.update({
            "accepted": len(times), "complete": True, "delivered_messages": len(times),
            "msg_s": per_min / 60.0,
            "max_concurrent_connections": sink.stats[TRACK_DOMAIN].max_concurrent_connections,
            "tracking": {
                "limit_per_min": TRACK_RATE, "seconds": seconds, "warmup": WARMUP,
                "delivered_per_min": per_min, "ratio": per_min / TRACK_RATE,
                "within_5_percent": abs(per_min / TRACK_RATE - 1.0) <= 0.05,
                "most_in_any_minute": most_in_window(times, 60.0),
                "per_node": {ip: s.messages for ip, s in sink.sources.items()},
                "redis_round_trips_per_1000": trips / len(times) * 1000 if times else None,
            },
            "timeline": _timeline(results, sink, min(
                (r.first_send for r in results if r.first_send), default=t0_mono),
                lambda t: t - t0_trio + t0_mono),
        })

    try:
        await _with_nodes(scenario, sink, redis, extra, body)
    except PeerError as e:
        row["error"] = str(e)
    finally:
        redis.stop()
    return row


def _summary(row: dict[str, Any]) -> str:
    """One line of a row's figures (what the log prints)."""
    if row.get("error"):
        return f"error: {row['error'].splitlines()[0]}"
    if "tracking" in row:
        t = row["tracking"]
        return (f"{t['delivered_per_min']:.0f}/min delivered against {t['limit_per_min']}"
                f"/min over {t['seconds']:g} s (ratio {t['ratio']:.3f}, goal within 5%: "
                f"{'met' if t['within_5_percent'] else 'NOT met'}); most in any minute "
                f"{t['most_in_any_minute']}; {t['redis_round_trips_per_1000']:.0f} Redis "
                f"round trips per 1000; by node {t['per_node']}")
    text = (f"e2e {row['msg_s']:.0f} msg/s, {row['delivered_messages']} delivered"
            f"{'' if row['complete'] else ' (INCOMPLETE)'}, at most "
            f"{row['max_concurrent_connections']} connections to a domain")
    if row.get("redis_round_trips_per_1000") is not None:
        text += f", {row['redis_round_trips_per_1000']:.0f} Redis round trips per 1000"
    if "shared_local_ratio" in row:
        ratio = row["shared_local_ratio"]
        text += (f"; shared/local {ratio:.3f} (goal >= 0.9: "
                 f"{'met' if ratio >= 0.9 else 'NOT met'})")
    return text
