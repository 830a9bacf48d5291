"""GET /metrics: per-worker snapshots added up and rendered with prometheus_client, the
histograms of ``Metrics``, and the admin listener's network check."""

from __future__ import annotations

import ipaddress
import os
import time
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from relay.config import AdminConfig, decode_config
from relay.events.metrics import SECONDS_BUCKETS, Metrics
from relay.events.types import Reception
from relay.http.metrics import (
    STALE_AFTER,
    AdminApp,
    Snapshot,
    allowed,
    read_snapshots,
    render,
    snapshot_of,
    write_snapshot,
    write_supervisor_snapshot,
)
from relay.http.server import Request


def families(text: bytes) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def value(fams: dict, sample: str, **labels: str) -> float:
    for fam in fams.values():
        for s in fam.samples:
            if s.name == sample and s.labels == labels:
                return s.value
    raise KeyError((sample, labels))


def worker(delivered: dict[str, int], received: int = 0) -> Metrics:
    m = Metrics(max_series=3)
    for dest, n in delivered.items():
        m.inc("total_messages_delivered", n, destination=dest)
    for _ in range(received):
        m([Reception(queue_id="R", sender="", recipients=[], size=0, client_ip="",
                     commit_seconds=0.003, via="smtp")])
    m.set("connection_count", 2, destination="a.test")
    return m


def test_histogram_buckets_sum_and_count() -> None:
    m = Metrics()
    for v in (0.0001, 0.003, 0.003, 100.0):
        m.observe("spool_commit_seconds", v)
    [(name, labels, cells, total)] = m.histograms()
    assert (name, labels) == ("spool_commit_seconds", {})
    assert len(cells) == len(SECONDS_BUCKETS) + 1 and sum(cells) == 4
    assert cells[0] == 1 and cells[SECONDS_BUCKETS.index(0.005)] == 2 and cells[-1] == 1
    assert total == 100.0061


def test_histogram_labels_are_bounded() -> None:
    m = Metrics(max_series=2)
    for i in range(5):
        m.observe("reception_commit_seconds", 0.01, protocol=f"p{i}")
    assert len(m.histograms()) == 3
    assert sum(sum(c) for _, labels, c, _ in m.histograms() if labels["protocol"] == "other") == 3


def test_workers_are_added_up_and_rendered_with_kumomta_names() -> None:
    a = worker({"a.test": 3, "b.test": 1}, received=2)
    b = worker({"a.test": 4, "c.test": 5}, received=3)
    b.observe("spool_commit_batch_size", 7)
    fams = families(render([snapshot_of(a), snapshot_of(b)]))
    assert fams["total_messages_delivered"].type == "counter"
    assert value(fams, "total_messages_delivered_total", destination="a.test") == 7
    assert value(fams, "total_messages_delivered_total", destination="c.test") == 5
    assert value(fams, "total_messages_received_total") == 5
    assert value(fams, "total_receptions_total", protocol="smtp") == 5
    assert fams["connection_count"].type == "gauge"
    assert value(fams, "connection_count", destination="a.test") == 4
    hist = fams["reception_commit_seconds"]
    assert hist.type == "histogram"
    assert value(fams, "reception_commit_seconds_count", protocol="smtp") == 5
    assert value(fams, "reception_commit_seconds_bucket", protocol="smtp", le="0.0025") == 0
    assert value(fams, "reception_commit_seconds_bucket", protocol="smtp", le="0.005") == 5
    assert value(fams, "reception_commit_seconds_bucket", protocol="smtp", le="+Inf") == 5
    assert value(fams, "spool_commit_batch_size_sum") == 7


def test_bounded_labels_survive_the_merge() -> None:
    # Each worker keeps 3 destinations and "other"; the sum keeps "other" too.
    a = worker({f"d{i}.test": 1 for i in range(10)})
    fams = families(render([snapshot_of(a)]))
    samples = [s for s in fams["total_messages_delivered"].samples if s.name.endswith("_total")]
    assert len(samples) == 4
    assert value(fams, "total_messages_delivered_total", destination="other") == 7


def test_snapshots_round_trip_and_stale_ones_are_left_out(tmp_path: Path) -> None:
    write_snapshot(tmp_path, "worker-1", snapshot_of(worker({"a.test": 2})))
    old = snapshot_of(worker({"a.test": 100}))
    old.time = time.time() - STALE_AFTER - 1
    write_snapshot(tmp_path, "worker-2", old)
    write_snapshot(tmp_path, "worker-0", snapshot_of(worker({"a.test": 50})))  # our own
    (tmp_path / "worker-3.msgpack").write_bytes(b"garbage")
    snaps = read_snapshots(tmp_path, own_index=0, nworkers=4)
    assert [s.counters for s in snaps] == [[("total_messages_delivered",
                                             {"destination": "a.test"}, 2.0)]]
    assert not list(tmp_path.glob("*.tmp"))


def test_the_supervisor_snapshot_counts_while_it_is_our_parent(tmp_path: Path) -> None:
    write_supervisor_snapshot(str(tmp_path), {0: 2, 1: 0})
    # Written by this process, which is not our parent: left out.
    assert read_snapshots(tmp_path / "metrics", 0, 1) == []
    snap = Snapshot(os.getppid(), time.time(), [("worker_restarts", {"worker": "0"}, 2.0)], [])
    write_snapshot(tmp_path / "metrics", "supervisor", snap)
    fams = families(render(read_snapshots(tmp_path / "metrics", 0, 1)))
    assert value(fams, "worker_restarts_total", worker="0") == 2


def nets(*specs: str) -> list:
    return [ipaddress.ip_network(s) for s in specs]


def test_the_network_check() -> None:
    default = nets(*AdminConfig().allow_networks)
    assert allowed("127.0.0.1", default) and allowed("127.8.9.10", default)
    assert allowed("::1", default) and allowed("::ffff:127.0.0.1", default)
    assert not allowed("10.0.0.1", default) and not allowed("::2", default)
    assert not allowed("192.0.2.1", default) and not allowed("not-an-ip", default)
    assert allowed("10.1.2.3", nets("10.0.0.0/8")) and not allowed("11.0.0.1", nets("10.0.0.0/8"))
    assert allowed("fe80::1%eth0", nets("fe80::/10"))


def request(ip: str, path: str = "/metrics", method: str = "GET") -> Request:
    return Request(method=method, path=path, query={}, headers={}, body=b"", client_ip=ip,
                   tls=False)


async def test_the_admin_app_refuses_other_networks_and_serves_metrics(
        tmp_path: Path) -> None:
    m = worker({"a.test": 1})
    write_snapshot(tmp_path, "worker-1", snapshot_of(worker({"a.test": 2})))
    app = AdminApp(AdminConfig(), m, tmp_path, index=0, nworkers=2)
    assert (await app.handle(request("192.0.2.7"))).status == 403
    assert (await app.handle(request("127.0.0.1", "/other"))).status == 404
    assert (await app.handle(request("127.0.0.1", method="POST"))).status == 405
    ok = await app.handle(request("127.0.0.1"))
    assert ok.status == 200 and ok.content_type == CONTENT_TYPE_LATEST
    assert value(families(ok.body), "total_messages_delivered_total",
                 destination="a.test") == 3


def test_admin_config_defaults_and_checks() -> None:
    cfg = decode_config(b"")
    assert cfg.admin.listen == ["127.0.0.1:8026"]
    assert cfg.admin.allow_networks == ["127.0.0.0/8", "::1/128"]
    import pytest

    from relay.config import ConfigError
    with pytest.raises(ConfigError, match=r"admin.allow_networks\[0\]"):
        decode_config(b'[admin]\nallow_networks = ["10.0.0.0/33"]\n')
    with pytest.raises(ConfigError, match=r"admin.listen\[0\].*needs a port"):
        decode_config(b'[admin]\nlisten = ["127.0.0.1"]\n')
