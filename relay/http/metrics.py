"""``GET /metrics`` on the admin listener: the whole node's numbers, Prometheus text format.

Every worker keeps its own ``relay.events.metrics.Metrics`` (bounded labels, no locks, no
shared memory) and, once a second, writes a snapshot of it to
``<spool>/metrics/worker-<index>.msgpack`` (msgspec, written to a temporary file and
renamed into place, so a reader sees a whole snapshot or the previous one). Whichever
worker SO_REUSEPORT hands a scrape to reads the other workers' snapshots, takes its own
registry live, adds counters, gauges and histogram buckets up per (name, labels), and
renders them with ``prometheus_client`` (a custom collector into a private
``CollectorRegistry``, ``generate_latest``). A snapshot older than ``STALE_AFTER`` seconds
(a dead worker's, not yet restarted) is left out; the supervisor writes
``supervisor.msgpack`` (``worker_restarts``) whenever a worker is restarted, read while its
pid is our parent.

Why not ``prometheus_client``'s multiprocess mode: it keeps one mmap file per process and
metric that every ``inc`` writes to, needs ``PROMETHEUS_MULTIPROC_DIR`` set before import,
its gauges need a per-metric aggregation mode and dead processes' files must be cleaned by
hand; and our label bound ("other" past ``max_series``) lives in ``Metrics``. A snapshot a
second costs one small write per worker and nothing on the hot path.

Counters are typed counters; ``prometheus_client`` names their samples ``<name>_total``
(the family keeps KumoMTA's name, ``total_messages_delivered``). Spool gauges
(``scheduled_count``, ``ready_count``, ``spool_messages``, ...) are node-wide facts of the
one shared spool: only worker 0 computes them (``Spool.stats()``, in a thread, at most
every ``SPOOL_STATS_INTERVAL`` seconds and never more than 5% of the time).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from relay.config import AdminConfig
from relay.events.metrics import Metrics, buckets_of
from relay.http.server import Request, Response

__all__ = [
    "AdminApp",
    "Snapshot",
    "allowed",
    "merge",
    "publish_snapshots",
    "read_snapshots",
    "render",
    "snapshot_of",
    "write_snapshot",
    "write_supervisor_snapshot",
]

log = logging.getLogger("relay.http.metrics")

#: How often each worker writes its snapshot.
SNAPSHOT_INTERVAL = 1.0
#: A worker snapshot older than this is a dead worker's: left out.
STALE_AFTER = 5.0
#: The shortest time between two ``Spool.stats()`` scans (worker 0).
SPOOL_STATS_INTERVAL = 5.0

#: Every metric the endpoint serves, with its help text.
HELP = {
    "total_messages_received": "Messages received (every carrier).",
    "total_messages_delivered": "Recipients delivered, by destination.",
    "total_messages_fail": "Recipients failed permanently (bounced or expired).",
    "total_messages_transfail": "Recipients deferred by a transient failure.",
    "total_messages_expired": "Recipients expired in the queue.",
    "total_receptions": "Messages received, by protocol (smtp, http, dsn).",
    "connection_count": "Open outbound connections, by destination.",
    "total_connections_opened": "Outbound connections opened, by destination.",
    "scheduled_count": "Queued jobs waiting for a retry time.",
    "ready_count": "Queued jobs due for delivery now.",
    "in_flight_count": "Queued jobs being delivered now.",
    "spool_messages": "Messages in the spool.",
    "spool_recipients": "Recipients queued in the spool.",
    "spool_message_bytes": "Bytes of message data in the spool.",
    "spool_file_bytes": "Size of the spool's data file.",
    "oldest_message_age_seconds": "Age of the oldest message in the spool.",
    "worker_restarts": "Workers restarted by the supervisor after dying, by worker.",
    "spool_commit_seconds": "Duration of a spool group commit.",
    "spool_commit_batch_size": "Items stored by one spool group commit.",
    "reception_commit_seconds": "End of data to 250: seconds until the message was durable.",
    "webhook_backlog_bytes": "Bytes of the event log not yet acknowledged, by webhook.",
    "webhook_backlog_events": "Events not yet acknowledged (estimated), by webhook.",
    "webhook_lag_seconds": "Age of the oldest event not yet acknowledged, by webhook.",
    "webhook_deliveries_total": "Batches POSTed and acknowledged with a 2xx, by webhook.",
    "webhook_events_total": "Events acknowledged by the receiver, by webhook.",
    "webhook_failures_total": "POSTs that failed (error, timeout, non-2xx), by webhook.",
    "webhook_skipped_lines_total": "Unreadable event log lines skipped, by webhook.",
    "webhook_post_seconds": "Duration of one webhook POST, by webhook.",
    "cluster_limits_fallback": "Workers whose cluster limits are in fallback now (Redis "
                               "unusable: local shares of each limit).",
    "total_redis_round_trips": "Calls to the cluster's Redis, by operation (lease, "
                               "give_back, acquire, renew, release, ping).",
    "total_redis_errors": "Calls to the cluster's Redis that failed or timed out.",
}

_Labels = tuple[tuple[str, str], ...]


class Snapshot(msgspec.Struct, array_like=True):
    """One process's registry at ``time``: counters and gauges as (name, labels, value),
    histograms as (name, labels, bucket counts with +Inf last, sum)."""

    pid: int
    time: float
    counters: list[tuple[str, dict[str, str], float]]
    gauges: list[tuple[str, dict[str, str], float]]
    histograms: list[tuple[str, dict[str, str], list[float], float]] = []


_encode = msgspec.msgpack.Encoder().encode
_decoder = msgspec.msgpack.Decoder(Snapshot)


def snapshot_of(metrics: Metrics) -> Snapshot:
    counters, gauges = [], []
    for name, labels, value in metrics.samples():
        (gauges if metrics.kind(name) == "gauge" else counters).append((name, labels, value))
    return Snapshot(os.getpid(), time.time(), counters, gauges, metrics.histograms())


def write_snapshot(directory: Path, name: str, snapshot: Snapshot) -> None:
    """Write atomically: a whole snapshot or the previous one is what a reader sees."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.msgpack"
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    tmp.write_bytes(_encode(snapshot))
    os.replace(tmp, path)


def write_supervisor_snapshot(spool_path: str, restarts: dict[int, int]) -> None:
    """The supervisor's numbers (``worker_restarts`` by worker); never raises."""
    counters = [("worker_restarts", {"worker": str(i)}, float(n)) for i, n in restarts.items()]
    try:
        write_snapshot(Path(spool_path) / "metrics", "supervisor",
                       Snapshot(os.getpid(), time.time(), counters, []))
    except OSError as e:
        log.warning("cannot write the supervisor's metrics snapshot: %s", e)


def read_snapshots(directory: Path, own_index: int, nworkers: int,
                   now: float | None = None) -> list[Snapshot]:
    """The other workers' fresh snapshots and the supervisor's (if it is our parent)."""
    now = time.time() if now is None else now
    found = []
    for i in range(nworkers):
        if i == own_index:
            continue
        snap = _read(directory / f"worker-{i}.msgpack")
        if snap is not None and now - snap.time <= STALE_AFTER:
            found.append(snap)
    snap = _read(directory / "supervisor.msgpack")
    if snap is not None and snap.pid == os.getppid():
        found.append(snap)
    return found


def _read(path: Path) -> Snapshot | None:
    try:
        return _decoder.decode(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, msgspec.DecodeError) as e:
        log.warning("metrics snapshot %s unreadable: %s", path, e)
        return None


class _Merged(msgspec.Struct):
    counters: dict[str, dict[_Labels, float]]
    gauges: dict[str, dict[_Labels, float]]
    histograms: dict[str, dict[_Labels, list[float]]]


def merge(snapshots: list[Snapshot]) -> _Merged:
    """Everything added up per (name, labels); a histogram's buckets cell by cell."""
    out = _Merged({}, {}, {})
    for snap in snapshots:
        for table, rows in ((out.counters, snap.counters), (out.gauges, snap.gauges)):
            for name, labels, value in rows:
                series = table.setdefault(name, {})
                key = tuple(sorted(labels.items()))
                series[key] = series.get(key, 0.0) + value
        for name, labels, buckets, total in snap.histograms:
            series = out.histograms.setdefault(name, {})
            key = tuple(sorted(labels.items()))
            cells = series.get(key)
            if cells is None:
                series[key] = [*buckets, total]
            elif len(cells) == len(buckets) + 1:
                for j, n in enumerate(buckets):
                    cells[j] += n
                cells[-1] += total
    return out


class _Collector:
    def __init__(self, merged: _Merged) -> None:
        self.merged = merged

    def collect(self) -> Iterator[Any]:
        m = self.merged
        for name in sorted(m.counters):
            fam = CounterMetricFamily(name, HELP.get(name, name),
                                      labels=_label_names(m.counters[name]))
            for key, value in sorted(m.counters[name].items()):
                fam.add_metric([v for _, v in key], value)
            yield fam
        for name in sorted(m.gauges):
            if name in m.counters:
                continue
            fam = GaugeMetricFamily(name, HELP.get(name, name),
                                    labels=_label_names(m.gauges[name]))
            for key, value in sorted(m.gauges[name].items()):
                fam.add_metric([v for _, v in key], value)
            yield fam
        for name in sorted(m.histograms):
            bounds = buckets_of(name)
            fam = HistogramMetricFamily(name, HELP.get(name, name),
                                        labels=_label_names(m.histograms[name]))
            for key, cells in sorted(m.histograms[name].items()):
                if len(cells) != len(bounds) + 2:
                    continue  # a snapshot of another version's buckets
                cumulative, running = [], 0.0
                for bound, n in zip([*map(_le, bounds), "+Inf"], cells[:-1], strict=True):
                    running += n
                    cumulative.append((bound, running))
                fam.add_metric([v for _, v in key], cumulative, sum_value=cells[-1])
            yield fam


def _le(bound: float) -> str:
    return str(float(bound))


def _label_names(series: dict[_Labels, Any]) -> list[str]:
    """The label names of a metric: every series of one metric has the same."""
    return [k for k, _ in next(iter(series))] if series else []


def render(snapshots: list[Snapshot]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(merge(snapshots)))  # type: ignore[arg-type]
    return generate_latest(registry)


def allowed(client_ip: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
            ) -> bool:
    """Whether ``client_ip`` (an IPv4-mapped IPv6 address counts as its IPv4) is in one of
    ``networks``."""
    try:
        ip = ipaddress.ip_address(client_ip.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


class AdminApp:
    """The admin listener's HTTP application (an ``HttpApp``): ``GET /metrics``."""

    max_body: int = 0
    request_timeout: float = 10.0
    keepalive_timeout: float = 30.0
    #: Per worker, apart from the HTTP listener's connections.
    max_connections: int = 64
    ssl_context: ssl.SSLContext | None = None

    def __init__(self, config: AdminConfig, metrics: Metrics, directory: Path, index: int,
                 nworkers: int) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in config.allow_networks]
        self.metrics = metrics
        self.directory = directory
        self.index = index
        self.nworkers = nworkers

    async def handle(self, request: Request) -> Response:
        if not allowed(request.client_ip, self.networks):
            return Response(403, b"forbidden\n", "text/plain")
        if request.path != "/metrics":
            return Response(404, b"not found: try /metrics\n", "text/plain")
        if request.method not in ("GET", "HEAD"):
            return Response(405, b"GET /metrics\n", "text/plain", [("allow", "GET, HEAD")])
        own = snapshot_of(self.metrics)
        others = await trio.to_thread.run_sync(read_snapshots, self.directory, self.index,
                                               self.nworkers)
        body = await trio.to_thread.run_sync(render, [own, *others])
        return Response(200, body, CONTENT_TYPE_LATEST, [("x-relay-worker", str(self.index))])


async def publish_snapshots(metrics: Metrics, directory: Path, index: int,
                            spool: Any = None) -> None:
    """Write this worker's snapshot every ``SNAPSHOT_INTERVAL`` seconds, forever; with
    ``spool`` (worker 0), keep the spool gauges up to date too."""
    next_stats = 0.0
    name = f"worker-{index}"
    while True:
        if spool is not None and trio.current_time() >= next_stats:
            took = await _spool_gauges(metrics, spool)
            next_stats = trio.current_time() + max(SPOOL_STATS_INTERVAL, 20 * took)
        try:
            await trio.to_thread.run_sync(write_snapshot, directory, name,
                                          snapshot_of(metrics))
        except OSError as e:
            log.warning("cannot write the metrics snapshot %s: %s", name, e)
        await trio.sleep(SNAPSHOT_INTERVAL)


async def _spool_gauges(metrics: Metrics, spool: Any) -> float:
    """Set the spool gauges from one ``Spool.stats()`` scan; returns how long it took."""
    started = trio.current_time()
    try:
        stats = await trio.to_thread.run_sync(spool.stats, 0)
    except Exception:
        log.exception("reading the spool's stats for the metrics failed")
        return trio.current_time() - started
    metrics.set("scheduled_count", stats.jobs_deferred)
    metrics.set("ready_count", stats.jobs_due)
    metrics.set("in_flight_count", stats.jobs_in_flight)
    metrics.set("spool_messages", stats.messages)
    metrics.set("spool_recipients", stats.recipients)
    metrics.set("spool_message_bytes", stats.bytes)
    metrics.set("oldest_message_age_seconds",
                max(0.0, stats.now - stats.oldest_arrival) if stats.oldest_arrival else 0.0)
    with contextlib.suppress(OSError):
        metrics.set("spool_file_bytes", os.stat(Path(spool.path) / "data.mdb").st_size)
    return trio.current_time() - started
