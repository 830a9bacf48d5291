"""End-to-end delivery rate of one ``DeliveryEngine`` from a pre-filled spool to bench.sink.

    python -m bench.delivery_rate [--messages 10000] [--size 2048] [--domains 20]
                                  [--connections 20] [--sink-processes 2] [--handoff]

What it measures: a spool (real LMDB, synced commits) is filled with ``--messages``
single-recipient messages spread over ``--domains`` domains; then one engine (one worker,
shard 0 of 1) delivers them to a sink running in separate processes on 127.0.0.2 (static
route, TLS off), writing the event log as in production. The rate is messages/s from
engine start to the last ``Spool.complete``.

``--handoff``: afterwards, a *second process* (the "owner worker") runs the engine while
this process plays the accepting worker: it submits messages through a GroupCommitWriter
whose on_commit sends the wake-up datagram, at ``--handoff-rate`` per second (optionally
behind a ``--handoff-backlog`` of queued mail), and reports the latency from the durable
commit (``submit`` returning) to the Delivery event (p50/p99/max): hand-off plus delivery,
while the owner delivers at that rate.

Loopback only. Prints one JSON object per phase.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from relay.config import Config, OutboundConfig, Route, Throttle
from relay.events import Delivery, EventBus, EventLog, Metrics
from relay.outbound.engine import DeliveryEngine
from relay.outbound.wakeup import Waker
from relay.spool import Envelope, GroupCommitWriter, NewMessage, Recipient, Spool, new_queue_id


def _message(i: int, size: int, domains: int) -> NewMessage:
    qid = new_queue_id()
    rcpt = f"user{i}@d{i % domains}.bench.test"
    head = (f"From: sender@bench.test\r\nTo: {rcpt}\r\nSubject: bench {i}\r\n"
            f"Message-ID: <{qid}@bench.test>\r\n\r\n").encode()
    body = (b"x" * 76 + b"\r\n") * max(0, (size - len(head)) // 78)
    env = Envelope(queue_id=qid, sender="sender@bench.test",
                   recipients=[Recipient(address=rcpt)], received_at=time.time())
    return NewMessage(envelope=env, data=head + body)


def _config(port: int, connections: int) -> Config:
    return Config(outbound=OutboundConfig(
        routes=[Route(domain="*.bench.test", hosts=[f"127.0.0.2:{port}"])],
        default=Throttle(max_connections=connections, tls="off", idle_timeout=2.0,
                         max_deliveries_per_connection=1000),
    ))


def _start_sink(processes: int) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.sink", "--listen", "127.0.0.2:0", "--processes",
         str(processes), "--json", "--interval", "3600"],
        stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())
    port = int(first["listening"][0].rsplit(":", 1)[1])
    return proc, port


def _stop_sink(proc: subprocess.Popen[str]) -> dict:
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    lines = [json.loads(x) for x in out.splitlines() if x.strip()]
    return lines[-1] if lines else {}


def _bus(path: Path) -> tuple[EventBus, EventLog, Metrics]:
    """The bus a worker has: the JSON-lines log and the counters."""
    log, metrics = EventLog(path), Metrics()
    return EventBus([log, metrics]), log, metrics


def _engine(cfg: Config, spool: Spool, events: EventBus, metrics: Metrics,
            **kw: object) -> DeliveryEngine:
    """An engine as a worker runs it: outcomes through a group-commit writer."""
    writer = GroupCommitWriter(spool, 0.0, 512, metrics=metrics)
    return DeliveryEngine(cfg, spool, 0, 1, events, "bench.test", writer=writer,
                          metrics=metrics, **kw)  # type: ignore[arg-type]


async def _deliver_all(spool: Spool, cfg: Config, events: EventBus, metrics: Metrics,
                       total: int) -> float:
    engine = _engine(cfg, spool, events, metrics, poll_interval=0.2)
    async with trio.open_nursery() as n:
        t0 = time.perf_counter()
        await n.start(engine.writer.run)
        await n.start(engine.run)
        while metrics.total("spool_completions_committed") < total:
            await trio.sleep(0.01)
        elapsed = time.perf_counter() - t0
        n.cancel_scope.cancel()
    return elapsed


def phase_rate(args: argparse.Namespace, workdir: Path, port: int) -> dict:
    spool = Spool(workdir / "spool-rate", map_size=8 << 30)
    t = time.perf_counter()
    for start in range(0, args.messages, 1000):
        spool.store_batch([_message(i, args.size, args.domains)
                           for i in range(start, min(args.messages, start + 1000))])
    fill = time.perf_counter() - t
    events, log, metrics = _bus(workdir / "events-rate.jsonl")
    elapsed = trio.run(_deliver_all, spool, _config(port, args.connections), events, metrics,
                       args.messages)
    left = spool.next_due(0, 1)
    spool.close()
    log.close()
    return {
        "phase": "delivery_rate", "messages": args.messages, "size": args.size,
        "domains": args.domains, "max_connections": args.connections,
        "prefill_seconds": round(fill, 3), "deliver_seconds": round(elapsed, 3),
        "messages_per_second": round(args.messages / elapsed, 1),
        "deliveries_logged": int(metrics.total("total_messages_delivered")),
        "queue_empty": left is None,
    }


def _owner_worker(spool_path: str, port: int, connections: int, events_path: str,
                  ready: multiprocessing.synchronize.Event) -> None:  # type: ignore[name-defined]
    """The owning worker process: one engine on the shared spool, until terminated."""
    spool = Spool(spool_path, map_size=8 << 30)
    events, _log, metrics = _bus(Path(events_path))

    async def main() -> None:
        engine = _engine(_config(port, connections), spool, events, metrics,
                         waker=Waker(spool_path, metrics), poll_interval=1.0)
        async with trio.open_nursery() as n:
            await n.start(engine.writer.run)
            await n.start(engine.run)
            ready.set()
            await trio.sleep_forever()

    trio.run(main)


def phase_handoff(args: argparse.Namespace, workdir: Path, port: int) -> dict:
    path = workdir / "spool-handoff"
    backlog = args.handoff_backlog
    events_path = workdir / "events-handoff.jsonl"
    # Fork the owner first: an LMDB environment must never cross a fork.
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_owner_worker, args=(str(path), port, args.connections,
                                                    str(events_path), ready))
    child.start()
    ready.wait(30)
    spool = Spool(path, map_size=8 << 30)
    for start in range(0, backlog, 1000):
        spool.store_batch([_message(i, args.size, args.domains)
                           for i in range(start, min(backlog, start + 1000))])
    committed: dict[str, float] = {}
    waker = Waker(path)

    async def produce() -> None:
        writer = GroupCommitWriter(spool, 0.002, 512, on_commit=lambda m: waker.notify({0}))
        async with trio.open_nursery() as n:
            await n.start(writer.run)
            interval = 1.0 / args.handoff_rate
            for i in range(args.handoff_messages):
                msg = _message(backlog + i, args.size, args.domains)

                async def one(m: NewMessage = msg) -> None:
                    await writer.submit(m)
                    committed[m.envelope.queue_id] = time.time()

                n.start_soon(one)
                await trio.sleep(interval)
            await writer.aclose()

    t0 = time.perf_counter()
    trio.run(produce)
    # Wait (bounded) until every submitted message has a Delivery event.
    deadline = time.monotonic() + 120
    delivered: dict[str, float] = {}
    while time.monotonic() < deadline:
        delivered = {e.queue_id: e.time for e in EventLog.read(events_path)
                     if isinstance(e, Delivery) and e.queue_id in committed}
        if len(delivered) == len(committed):
            break
        time.sleep(0.2)
    elapsed = time.perf_counter() - t0
    child.terminate()
    child.join(10)
    spool.close()
    lat = sorted(delivered[q] - committed[q] for q in delivered)
    return {
        "phase": "handoff", "backlog": backlog, "submitted": len(committed),
        "rate_per_second": args.handoff_rate, "delivered": len(delivered),
        "seconds": round(elapsed, 2),
        "commit_to_delivered_p50_ms": round(statistics.median(lat) * 1000, 1) if lat else None,
        "commit_to_delivered_p99_ms": (round(lat[int(len(lat) * 0.99) - 1] * 1000, 1)
                                       if lat else None),
        "commit_to_delivered_max_ms": round(lat[-1] * 1000, 1) if lat else None,
        "wakeups_sent": int(waker.metrics.get("wakeups_sent")),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.delivery_rate", description=__doc__)
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--domains", type=int, default=20)
    ap.add_argument("--connections", type=int, default=20, help="max_connections per domain")
    ap.add_argument("--sink-processes", type=int, default=2)
    ap.add_argument("--handoff", action="store_true")
    ap.add_argument("--handoff-rate", type=float, default=200.0)
    ap.add_argument("--handoff-messages", type=int, default=1000)
    ap.add_argument("--handoff-backlog", type=int, default=0,
                    help="messages queued ahead of the measured ones (FIFO: they add "
                         "queueing delay on top of the hand-off)")
    args = ap.parse_args(argv)
    sink, port = _start_sink(args.sink_processes)
    try:
        with tempfile.TemporaryDirectory(prefix="relay-bench-", dir=os.environ.get("TMPDIR")) as d:
            print(json.dumps(phase_rate(args, Path(d), port)), flush=True)
            if args.handoff:
                print(json.dumps(phase_handoff(args, Path(d), port)), flush=True)
    finally:
        summary = _stop_sink(sink)
        print(json.dumps({"sink_total_messages": summary.get("total_messages"),
                          "sink_max_concurrent_connections":
                              summary.get("max_concurrent_connections")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
