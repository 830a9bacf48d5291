"""GET /metrics end to end: a real `relay serve` with 2 workers and its admin listener,
mail over SMTP to a recording sink, scraped many times over fresh connections (so
SO_REUSEPORT spreads the scrapes over the workers): every scrape shows the whole node's
numbers, equal to the event log's."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.peers import free_port
from relay.http.metrics import HELP as METRIC_HELP
from relay.spool import shard_of
from tests.integration.relayproc import RelayProcess, make_relay, wait_for
from tests.integration.smtpsink import RecordingSink

N = 12
DOMAINS = [f"d{i}.test" for i in range(6)]
# Both workers deliver some of the mail: one worker's numbers cannot pass for the node's.
assert {shard_of(d, 2) for d in DOMAINS} == {0, 1}


class MetricsRelay:
    def __init__(self, relay: RelayProcess, url: str, sink: RecordingSink) -> None:
        self.relay, self.url, self.sink = relay, url, sink
        #: The indexes of the workers that answered a scrape.
        self.answered: set[str] = set()

    def scrape(self) -> dict[str, dict[tuple, float]]:
        """sample name -> labels -> value, from one scrape on a new connection."""
        r = httpx.get(self.url, timeout=10, trust_env=False)
        assert r.status_code == 200, r.text
        self.answered.add(r.headers["x-relay-worker"])
        assert r.headers["content-type"].startswith("text/plain")
        out: dict[str, dict[tuple, float]] = {}
        for fam in text_string_to_metric_families(r.text):
            for s in fam.samples:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return out

    def events(self) -> list[dict]:
        path = self.relay.tmp / "events.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]


def total(scrape: dict[str, dict[tuple, float]], name: str) -> float:
    return sum(scrape.get(name, {}).values())


@pytest.fixture(scope="module")
def metrics_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricsRelay]:
    tmp = tmp_path_factory.mktemp("metrics")
    sink = RecordingSink()
    admin_port = free_port()
    relay = make_relay(tmp, workers=2, extra=f"""
[outbound]
smart_host = "127.0.0.1:{sink.port}"

[outbound.default]
tls = "off"

[admin]
listen = ["127.0.0.1:{admin_port}"]
""")
    relay.start()
    url = f"http://127.0.0.1:{admin_port}/metrics"

    def live() -> bool:
        try:
            return httpx.get(url, timeout=2, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(live, 20, "the admin listener")
    try:
        yield MetricsRelay(relay, url, sink)
    finally:
        relay.stop()
        sink.close()


def send(port: int, count: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as smtp:
        for i in range(count):
            msg = EmailMessage()
            msg["From"] = "sender@example.test"
            msg["To"] = f"user{i}@{DOMAINS[i % len(DOMAINS)]}"
            msg["Subject"] = f"metrics {i}"
            msg.set_content(f"message {i}\n")
            smtp.send_message(msg)


def test_every_scrape_sees_the_whole_node(metrics_relay: MetricsRelay) -> None:
    send(metrics_relay.relay.port, N)

    def delivered() -> list[dict]:
        evs = metrics_relay.events()
        return evs if sum(e["type"] == "Delivery" for e in evs) == N else []

    events = wait_for(delivered, 60, f"{N} deliveries in the event log")
    received = sum(e["type"] == "Reception" for e in events)
    deliveries = sum(e["type"] == "Delivery" for e in events)
    assert (received, deliveries) == (N, N)
    per_destination: dict[tuple, float] = {}
    for e in events:
        if e["type"] == "Delivery":
            key = (("destination", e["destination"]),)
            per_destination[key] = per_destination.get(key, 0) + 1

    # The workers' snapshots are at most a second old: wait for them once, then every
    # scrape, whichever worker answers it, must show the node's totals.
    wait_for(lambda: total(metrics_relay.scrape(), "total_messages_delivered_total") == N,
             15, "the node-wide delivered count")
    # Scrape until both workers have answered (at least 10 times).
    metrics_relay.answered.clear()
    deadline = time.monotonic() + 30
    scrapes = 0
    while scrapes < 10 or len(metrics_relay.answered) < 2:
        assert time.monotonic() < deadline, f"only worker {metrics_relay.answered} answered"
        scrapes += 1
        scrape = metrics_relay.scrape()
        assert total(scrape, "total_messages_received_total") == received
        assert total(scrape, "total_messages_delivered_total") == deliveries
        assert scrape["total_messages_delivered_total"] == per_destination
        assert scrape["total_receptions_total"][(("protocol", "smtp"),)] == N
        assert total(scrape, "reception_commit_seconds_count") == N
        assert total(scrape, "spool_commit_seconds_count") >= 1
        assert total(scrape, "spool_commit_batch_size_sum") >= N
        assert "ready_count" in scrape and "scheduled_count" in scrape
        assert "spool_messages" in scrape and "oldest_message_age_seconds" in scrape
        assert total(scrape, "worker_restarts_total") == 0


def test_worker_restarts_are_counted(metrics_relay: MetricsRelay) -> None:
    pid = metrics_relay.relay.workers()[0]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: len(metrics_relay.relay.workers()) == 2
             and pid not in metrics_relay.relay.workers(), 20, "the worker's restart")

    def restarts() -> float:
        try:
            return total(metrics_relay.scrape(), "worker_restarts_total")
        except httpx.HTTPError:
            return 0.0

    assert wait_for(lambda: restarts() == 1, 15, "worker_restarts == 1") is True
    for _ in range(5):
        assert restarts() == 1


def test_the_path_and_method_are_checked(metrics_relay: MetricsRelay) -> None:
    base = metrics_relay.url.removesuffix("/metrics")
    assert httpx.get(f"{base}/", trust_env=False, timeout=10).status_code == 404
    assert httpx.post(metrics_relay.url, trust_env=False, timeout=10).status_code == 405


def test_the_shipped_dashboard_asks_only_for_series_the_relay_serves(
        metrics_relay: MetricsRelay) -> None:
    """conf/grafana's panels and conf/prometheus's job stay in step with the names: every
    metric a panel's query names is in a real scrape."""
    root = Path(__file__).resolve().parents[2]
    dashboard = json.loads((root / "conf" / "grafana" / "relay-dashboard.json").read_text())
    queries = [re.sub(r"\[[^\]]*\]", "", t["expr"])  # no range selectors ([5m])
               for p in dashboard["panels"] for t in p["targets"]]
    words = {w for q in queries for w in re.findall(r"[a-z_][a-z0-9_]*", q)}
    promql = {"sum", "rate", "by", "topk", "histogram_quantile", "le", "increase",
              "destination", "protocol", "worker"}
    named = words - promql
    assert len(named) >= 15
    send(metrics_relay.relay.port, 1)  # commits and a delivery: histograms, connections

    # A counter shows up with its first increment (no failure happened here): those
    # must at least be metrics the relay defines; everything else must be served.
    def family(sample: str) -> str:
        return re.sub(r"_(total|bucket|sum|count)$", "", sample) if sample not in (
            "connection_count", "scheduled_count", "ready_count", "in_flight_count") else sample

    assert {family(n) for n in named} <= set(METRIC_HELP), sorted(named)
    required = {n for n in named if "fail" not in n}
    deadline = time.monotonic() + 20
    while (missing := required - set(metrics_relay.scrape())) and time.monotonic() < deadline:
        time.sleep(0.2)  # polling a scrape with a deadline: snapshots are once a second
    assert not missing, sorted(missing)
    job = (root / "conf" / "prometheus" / "relay.yml").read_text()
    assert "metrics_path: /metrics" in job and "127.0.0.1:8026" in job
