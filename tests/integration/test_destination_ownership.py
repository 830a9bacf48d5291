"""A destination's limits hold at any worker count (principle 4).

Eight domains share one MX and so one provider destination (``[outbound.providers]``)
with ``max_connections = 2`` and a message rate. The domains hash to different workers;
the worker that owns the destination key delivers all of them (the others hand their
jobs over through the spool), so the receiving server never sees more than 2
connections nor more messages per second than allowed, with 1, 2 or 3 workers. One
member domain keeps its own stricter rate inside the provider.
"""

from __future__ import annotations

import json
import smtplib
from pathlib import Path

import pytest
import trio

from bench.sink import Sink
from tests.integration.relayproc import make_relay

try:  # tests/integration may or may not be a package; the fixture module is a sibling.
    from tests.integration import dnsmasq as _dnsmasq
except ImportError:
    import dnsmasq as _dnsmasq  # type: ignore[no-redef]

dnsmasq = _dnsmasq.dnsmasq

MX_IP = "127.0.0.5"
DOMAINS = [f"d{i}.test" for i in range(8)]
PER_DOMAIN = 8
RATE = 25  # messages per second for the whole destination
SLOW = 3  # ... and for d0.test's share of it


def most_in_window(times: list[float], seconds: float) -> int:
    times = sorted(times)
    best = j = 0
    for i, t in enumerate(times):
        while t - times[j] >= seconds:
            j += 1
        best = max(best, i - j + 1)
    return best


def send_all(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as client:
        for domain in DOMAINS:
            for i in range(PER_DOMAIN):
                client.sendmail("a@sender.test", [f"u{i}@{domain}"],
                                f"Subject: {i}\r\n\r\nto {domain}\r\n")


@pytest.mark.parametrize("workers", [1, 2, 3])
async def test_rollup_limits_hold_at_any_worker_count(
    tmp_path: Path, dnsmasq, workers: int  # type: ignore[no-untyped-def]
) -> None:
    dns = dnsmasq(mx={d: [(10, "mx.shared.test")] for d in DOMAINS},
                  hosts={"mx.shared.test": MX_IP})
    async with trio.open_nursery() as nursery:
        sink = Sink(delays={d: 0.05 for d in DOMAINS})
        port = await nursery.start(sink.serve, MX_IP, 0)
        relay = make_relay(tmp_path, workers=workers, extra=f"""
[outbound]
resolvers = ["{dns.nameserver}"]
smtp_port = {port}
[outbound.default]
tls = "off"
idle_timeout = 0.5
[outbound.providers.shared]
match_mx = ["*.shared.test"]
max_connections = 2
max_message_rate = "{RATE}/s"
[outbound.domains."d0.test"]
max_message_rate = "{SLOW}/s"
""")
        await trio.to_thread.run_sync(relay.start)
        try:
            await trio.to_thread.run_sync(send_all, relay.port)
            total = len(DOMAINS) * PER_DOMAIN
            await sink.wait_for(lambda s: s.total_messages == total, timeout=40)
        finally:
            await trio.to_thread.run_sync(relay.stop)
        nursery.cancel_scope.cancel()
    listener = sink.listeners[(MX_IP, port)]
    assert listener.max_concurrent_connections == 2, listener
    assert most_in_window([t for t, _d, _n in sink.arrivals], 1.0) <= RATE + 1
    assert sink.max_messages_in_window("d0.test", 1.0) <= SLOW + 1
    deliveries = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text()
                  .splitlines() if '"Delivery"' in line]
    assert len(deliveries) == total
    assert {d["destination"] for d in deliveries} == {"provider:shared"}
