"""Webhooks against a real local HTTP receiver (``bench.webhooks.WebhookReceiver``, on
127.0.0.1) that is slow, down (its port closed) and answers 500 or 4xx at times.

In process: the dispatcher (``relay.events.webhooks.Webhook``) reading a real event log
(``EventLog``) and a real cursor in a temp dir, through bad lines and a rotation, and the
service's reload. Then a real ``relay serve`` sending mail to a recording sink, killed
with SIGKILL mid-run and started again: every event of its log reaches the receiver, in
order per message, none lost (duplicates allowed, and counted).
"""

from __future__ import annotations

import contextlib
import json
import os
import smtplib
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from bench.peers import free_port
from bench.webhooks import WebhookReceiver
from relay.config import WebhookConfig, decode_config
from relay.events import Bounce, Delivery, EventLog, Metrics, Reception
from relay.events.webhooks import CursorStore, Webhook, WebhookService
from tests.integration.relayproc import make_relay, wait_for
from tests.integration.smtpsink import RecordingSink

SECRET = "integration-secret"


async def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` (a cheap in-memory check) until true, or fail at ``timeout``."""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
    assert predicate(), what


def hook(receiver: WebhookReceiver, **kw: Any) -> WebhookConfig:
    values: dict[str, Any] = {"name": "t", "url": receiver.url, "secret": SECRET,
                              "batch_size": 10, "max_batch_age": 0.1, "retry_min": 0.05,
                              "retry_max": 0.3, "timeout": 2.0}
    return WebhookConfig(**{**values, **kw})


def log_events(*paths: Path) -> list[tuple[str, dict[str, Any]]]:
    """(event_id, record) of every event line of the log files, in order: the ground
    truth (a line that is not JSON is no event)."""
    out = []
    for path in paths:
        ino, offset = os.stat(path).st_ino, 0
        for line in path.read_bytes().splitlines(keepends=True):
            with contextlib.suppress(ValueError):
                out.append((f"{ino}:{offset}", json.loads(line)))
            offset += len(line)
    return out


def received(receiver: WebhookReceiver) -> list[dict[str, Any]]:
    """Every event the receiver acknowledged, in arrival order (duplicates included)."""
    with receiver._cond:
        return [e for b in receiver.batches for e in b.events]


def check_delivery(truth: list[tuple[str, dict[str, Any]]], got: list[dict[str, Any]]
                   ) -> int:
    """Every event of ``truth`` arrived, as written, each message's in log order; returns
    the number of duplicates."""
    first: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for event in got:
        if event["event_id"] not in first:
            first[event["event_id"]] = event
            order.append(event["event_id"])
    missing = [eid for eid, _ in truth if eid not in first]
    assert not missing, f"{len(missing)} of {len(truth)} events never arrived: {missing[:5]}"
    for eid, record in truth:
        assert first[eid] == {"event_id": eid, **record}
    per_message: dict[str, list[str]] = {}
    for eid in order:
        per_message.setdefault(first[eid]["queue_id"], []).append(eid)
    for queue_id, ids in per_message.items():
        assert ids == [eid for eid, r in truth if r["queue_id"] == queue_id], queue_id
    return len(got) - len(first)


def events_for(i: int) -> list[Reception | Delivery | Bounce]:
    q = f"Q{i:04d}"
    return [Reception(queue_id=q, sender="s@src.test", recipients=["a@d.test", "b@d.test"],
                      size=100, client_ip="127.0.0.1", tenant=f"t{i % 3}"),
            Delivery(queue_id=q, recipient="a@d.test", destination="d.test",
                     tenant=f"t{i % 3}"),
            Bounce(queue_id=q, recipient="b@d.test", destination="d.test",
                   tenant=f"t{i % 3}")]


# -- in process -------------------------------------------------------------------------


async def test_every_event_arrives_through_a_slow_failing_and_down_receiver(
        tmp_path: Path) -> None:
    receiver = WebhookReceiver(SECRET.encode()).up()
    receiver.delay, receiver.fail_every = 0.02, 3
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    metrics = Metrics()
    webhook = Webhook(hook(receiver), str(path), tmp_path / "state", metrics)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(webhook.run)
            # Two "workers" interleave the events of their messages.
            for i in range(0, 60, 2):
                log(events_for(i))
                log(events_for(i + 1))
                await trio.sleep(0)
            await trio.to_thread.run_sync(receiver.wait_for, lambda r: r.events >= 30, 20)
            receiver.down()
            with open(path, "ab") as f:  # a torn write and garbage, between events
                f.write(b'{"type":"Deliv' + b"\x00garbage\n")
            for i in range(60, 100):
                log(events_for(i))
            await until(lambda: metrics.get("webhook_backlog_bytes", webhook="t") > 0
                        and metrics.get("webhook_failures_total", webhook="t") >= 2, 20,
                        "a backlog and failures while the receiver is down")
            assert metrics.get("webhook_lag_seconds", webhook="t") > 0
            receiver.up()
            want = len(log_events(path))
            await trio.to_thread.run_sync(receiver.wait_for, lambda r: r.events >= want, 30)
            await until(lambda: metrics.get("webhook_backlog_bytes", webhook="t") == 0, 10,
                        "the backlog gauge back at 0")
            nursery.cancel_scope.cancel()
    finally:
        receiver.down()
        log.close()
    truth = log_events(path)
    assert len(truth) == 300
    # A 500 is answered before anything is kept; a batch the receiver kept just as it
    # went down (its answer lost) is sent again: at most one batch twice.
    assert check_delivery(truth, received(receiver)) <= 10
    assert receiver.failed >= 1 and receiver.bad_signatures == 0
    assert metrics.get("webhook_skipped_lines_total", webhook="t") == 1
    assert metrics.get("webhook_events_total", webhook="t") == 300
    assert all(len(b.events) <= 10 for b in receiver.batches)
    cursor = CursorStore(tmp_path / "state" / "t.cursor").load()
    assert cursor is not None and cursor.offset == path.stat().st_size


async def test_a_torn_line_is_skipped_and_the_event_after_it_kept(tmp_path: Path) -> None:
    receiver = WebhookReceiver(SECRET.encode()).up()
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    log(events_for(1))
    with open(path, "ab") as f:
        f.write(b"not json\n" + b'{"type":"Deliv')  # ... and the next write appends to it
    log(events_for(2))
    metrics = Metrics()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Webhook(hook(receiver), str(path), tmp_path, metrics).run)
            await trio.to_thread.run_sync(receiver.wait_for, lambda r: r.events >= 6, 20)
            nursery.cancel_scope.cancel()
    finally:
        receiver.down()
        log.close()
    assert [(e["queue_id"], e["type"]) for e in received(receiver)] == [
        (f"Q000{i}", t) for i in (1, 2) for t in ("Reception", "Delivery", "Bounce")]
    assert metrics.get("webhook_skipped_lines_total", webhook="t") == 2


async def test_filters_and_a_4xx_that_is_retried_not_dropped(tmp_path: Path) -> None:
    receiver = WebhookReceiver(SECRET.encode()).up()
    receiver.fail_every, receiver.fail_status = 1, 404  # every POST refused, for now
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    for i in range(12):
        log(events_for(i))
    metrics = Metrics()
    config = hook(receiver, events=["Bounce", "Delivery"], tenants=["t1"])
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Webhook(config, str(path), tmp_path, metrics).run)
            await trio.to_thread.run_sync(receiver.wait_for, lambda r: r.failed >= 3, 20)
            assert receiver.events == 0
            receiver.fail_every = 0
            await trio.to_thread.run_sync(receiver.wait_for, lambda r: r.events >= 8, 20)
            nursery.cancel_scope.cancel()
    finally:
        receiver.down()
        log.close()
    got = [(e["queue_id"], e["type"], e["tenant"]) for e in received(receiver)]
    assert got == [(f"Q{i:04d}", t, "t1") for i in (1, 4, 7, 10) for t in ("Delivery",
                                                                         "Bounce")]


async def test_a_rotated_log_is_finished_before_the_new_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import relay.events.webhooks as webhooks

    monkeypatch.setattr(webhooks, "ROTATION_GRACE", 0.3)
    receiver = WebhookReceiver(SECRET.encode()).up()
    path, old = tmp_path / "events.jsonl", tmp_path / "events.jsonl.1"
    worker_a, worker_b = EventLog(path), EventLog(path)
    metrics = Metrics()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(Webhook(hook(receiver), str(path), tmp_path, metrics).run)
            worker_a(events_for(0))
            await trio.to_thread.run_sync(receiver.wait_for, lambda r: r.events >= 3, 20)
            path.rename(old)  # logrotate's rename; worker a reopens at once, b later
            worker_a.reopen()
            worker_a(events_for(2))
            worker_b(events_for(1))  # still in the old file
            worker_b.reopen()
            worker_b(events_for(3))
            await trio.to_thread.run_sync(receiver.wait_for, lambda r: r.events >= 12, 20)
            nursery.cancel_scope.cancel()
    finally:
        receiver.down()
        worker_a.close()
        worker_b.close()
    truth = log_events(old, path)
    assert check_delivery(truth, received(receiver)) == 0
    assert [e["queue_id"] for e in received(receiver)][::3] == ["Q0000", "Q0001", "Q0002",
                                                                "Q0003"]


async def test_a_reload_restarts_a_changed_webhook_from_its_cursor(tmp_path: Path) -> None:
    first, second = (WebhookReceiver(SECRET.encode()).up() for _ in range(2))
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    base = f'[spool]\npath = "{tmp_path / "spool"}"\n[log]\nevents = "{path}"\n'

    def config(url: str) -> Any:
        return decode_config(base + f'[[webhooks]]\nname = "t"\nurl = "{url}"\n'
                             f'secret = "{SECRET}"\nmax_batch_age = 0.05\n')

    service = WebhookService(config(first.url), Metrics())
    cursors = CursorStore(tmp_path / "spool" / "webhooks" / "t.cursor")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            log(events_for(0))
            await trio.to_thread.run_sync(first.wait_for, lambda r: r.events >= 3, 20)
            size = path.stat().st_size
            await until(lambda: getattr(cursors.load(), "offset", 0) == size, 10,
                        "the cursor saved past the first batch")
            service.apply_config(config(second.url))
            log(events_for(1))
            await trio.to_thread.run_sync(second.wait_for, lambda r: r.events >= 3, 20)
            service.apply_config(decode_config(base))  # removed: it stops
            log(events_for(2))
            with trio.move_on_after(0.5):  # a negative check: nothing may arrive
                await trio.to_thread.run_sync(second.wait_for, lambda r: r.events > 3, 1,
                                              abandon_on_cancel=True)
            nursery.cancel_scope.cancel()
    finally:
        first.down()
        second.down()
        log.close()
    assert [e["queue_id"] for e in received(first)] == ["Q0000"] * 3
    assert [e["queue_id"] for e in received(second)] == ["Q0001"] * 3


# -- a real relay, killed -------------------------------------------------------------------


def send(port: int, n: int, tag: str) -> None:
    """``n`` messages of two recipients each; every one accepted."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        for i in range(n):
            refused = smtp.sendmail("s@src.test", ["a@dest.test", "b@dest.test"],
                                    b"Subject: %s %d\r\n\r\nhello\r\n" % (tag.encode(), i))
            assert refused == {}


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def metric(admin_port: int, name: str) -> float | None:
    """One sample of the relay's /metrics (``name{webhook="t"}``), None when absent."""
    with _NO_PROXY.open(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith(f'{name}{{webhook="t"}} '):
            return float(line.split()[-1])
    return None


def test_every_event_of_a_killed_relay_arrives_in_order(tmp_path: Path) -> None:
    sink = RecordingSink()
    receiver = WebhookReceiver(SECRET.encode()).up()
    receiver.delay = 0.1  # slow: the dispatcher is mid-POST most of the time
    admin = free_port()
    relay = make_relay(tmp_path, workers=2, extra=f"""
[outbound]
smart_host = "127.0.0.1:{sink.port}"

[admin]
listen = ["127.0.0.1:{admin}"]

[[webhooks]]
name = "t"
url = "{receiver.url}"
secret = "{SECRET}"
batch_size = 8
max_batch_age = 0.2
retry_min = 0.05
retry_max = 0.5
timeout = 5.0
""")
    events = tmp_path / "events.jsonl"

    def delivered() -> int:
        return sum(1 for _, e in log_events(events) if e["type"] == "Delivery")

    try:
        relay.start()
        send(relay.port, 15, "one")
        receiver.wait_for(lambda r: r.events >= 5, 30, "the first batches")
        relay.kill_all()  # SIGKILL, every process, while a POST is in flight
        receiver.down()
        relay.start()
        send(relay.port, 15, "two")
        wait_for(lambda: (metric(admin, "webhook_backlog_bytes") or 0) > 0
                 and (metric(admin, "webhook_failures_total") or 0) > 0, 30,
                 "a backlog and failures on /metrics while the receiver is down")
        relay.kill_all()  # ... and again while it is down
        relay.start()
        receiver.delay, receiver.fail_every = 0.0, 4
        receiver.up()
        send(relay.port, 10, "three")
        wait_for(lambda: delivered() >= 80, 60, "every recipient delivered")
        truth = log_events(events)
        receiver.wait_for(lambda r: len({e["event_id"] for e in received(r)})
                          >= len(truth), 60, "every event of the log")
        wait_for(lambda: metric(admin, "webhook_backlog_bytes") == 0, 30,
                 "the backlog gauge back at 0")
        assert relay.stop() == 0
    finally:
        if relay.proc is not None and relay.proc.poll() is None:
            relay.kill_all()
        receiver.down()
        sink.close()
    truth = log_events(events)
    got = received(receiver)
    duplicates = check_delivery(truth, got)
    print(f"{len(truth)} events, {duplicates} duplicates after 2 kills")
    assert {e["type"] for _, e in truth} >= {"Reception", "Delivery"}
    assert receiver.bad_signatures == 0 and receiver.failed > 0
    assert "Traceback" not in relay.log()
    assert msgspec.json.decode((tmp_path / "spool" / "webhooks" / "t.cursor").read_bytes())[
        "offset"] == events.stat().st_size
