"""The event bus and its subscribers: published once, seen by each, a failing one
skipped; the counters registry counts with KumoMTA's names and bounded labels."""

from __future__ import annotations

from pathlib import Path

from relay.events import Bounce, Delivery, EventBus, EventLog, Expiration, Metrics, Reception


def delivery(dest: str, kind: type = Delivery) -> Delivery:
    return kind(queue_id="Q", recipient="r@d.test", destination=dest)  # type: ignore[no-any-return]


def test_every_subscriber_sees_every_event_once_and_a_failing_one_is_skipped(
    tmp_path: Path, caplog
) -> None:  # type: ignore[no-untyped-def]
    seen: list[str] = []
    log = EventLog(tmp_path / "events.jsonl")

    def broken(events: object) -> None:
        raise RuntimeError("subscriber bug")

    bus = EventBus([log, broken, lambda events: seen.extend(e.queue_id for e in events)])
    bus.emit(Reception(queue_id="A", sender="s@x", recipients=["r@d.test"], size=1,
                       client_ip="192.0.2.1"))
    bus.emit_many([delivery("d.test"), delivery("d.test", Bounce)])
    log.close()
    assert seen == ["A", "Q", "Q"]
    assert [type(e).__name__ for e in EventLog.read(tmp_path / "events.jsonl")] == [
        "Reception", "Delivery", "Bounce"]
    assert caplog.text.count("RuntimeError: subscriber bug") == 2  # logged per failure


def test_metrics_count_events_by_destination_with_kumomta_names() -> None:
    m = Metrics()
    m([delivery("a.test"), delivery("a.test"), delivery("b.test", Expiration),
       Reception(queue_id="R", sender="", recipients=[], size=0, client_ip="")])
    assert m.get("total_messages_delivered", destination="a.test") == 2
    assert m.get("total_messages_fail", destination="b.test") == 1
    assert m.get("total_messages_expired", destination="b.test") == 1
    assert m.total("total_messages_received") == 1


def test_metric_labels_are_bounded() -> None:
    m = Metrics(max_series=3)
    m([delivery(f"d{i}.test") for i in range(10)])
    assert m.total("total_messages_delivered") == 10
    assert m.get("total_messages_delivered", destination="other") == 7
    assert len([s for s in m.samples() if s[0] == "total_messages_delivered"]) == 4
