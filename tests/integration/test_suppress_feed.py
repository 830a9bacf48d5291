"""The suppression list that feeds itself, on a real LMDB spool: "N within D" counts that
persist, entries that never weaken what is there, old counts purged, and the bus
subscriber that queues strikes and commits them in batches in a background task."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from relay.events import EventBus
from relay.events.suppress_feed import SuppressionFeed
from relay.events.types import Bounce, Complaint
from relay.outcomes.suppress import parse_policy
from relay.spool import Spool
from relay.spool.suppression import Strike, Suppression, SuppressionList

DAY = 86400.0


@pytest.fixture
def spool(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = Spool(tmp_path / "spool", 1 << 30)
    yield s
    s.close()


def strike(address: str = "full@dest.test", *, threshold: int = 3, window: float = 7 * DAY,
           tenant: str = "acme", transactional: bool = True, expires: float | None = None,
           source: str = "bounce") -> Strike:
    entry = Suppression(address=address, tenant=tenant, source=source, time=0.0,
                        transactional=transactional, expires=expires)
    return Strike(entry=entry, counter="22", threshold=threshold, window=window)


def test_the_third_strike_within_the_window_suppresses_and_counts_persist(
        spool: Spool, tmp_path: Path) -> None:
    supp = SuppressionList(spool)
    assert supp.strike([strike()], now=0.0) == []
    assert supp.strike([strike()], now=1 * DAY) == []
    spool.close()  # a restart in between: the count is in the spool
    reopened = Spool(tmp_path / "spool", 1 << 30)
    supp = SuppressionList(reopened)
    (added,) = supp.strike([strike()], now=2 * DAY)
    assert (added.address, added.tenant, added.source) == ("full@dest.test", "acme", "bounce")
    assert "full@dest.test" in supp.blocking("acme", ["full@dest.test"], now=2 * DAY)
    reopened.close()


def test_strikes_further_apart_than_the_window_never_add_up(spool: Spool) -> None:
    supp = SuppressionList(spool)
    for day in (0, 5, 10, 15, 20):
        assert supp.strike([strike()], now=day * DAY) == [], day
    assert supp.blocking("acme", ["full@dest.test"], now=21 * DAY) == {}
    # Counts are per tenant and address.
    assert supp.strike([strike(tenant="other")], now=21 * DAY) == []


def test_one_batch_can_reach_the_threshold(spool: Spool) -> None:
    supp = SuppressionList(spool)
    added = supp.strike([strike(), strike(), strike(), strike("hard@dest.test", threshold=1)],
                        now=100.0)
    assert sorted(e.address for e in added) == ["full@dest.test", "hard@dest.test"]


def test_a_strike_never_weakens_an_entry(spool: Spool) -> None:
    supp = SuppressionList(spool)
    supp.add([Suppression(address="m@dest.test", tenant="acme", source="manual")])
    complaint = strike("m@dest.test", threshold=1, transactional=False, source="complaint")
    assert supp.strike([complaint], now=10.0) == []
    (kept,) = list(supp.entries("acme"))
    assert (kept.source, kept.transactional, kept.expires) == ("manual", True, None)
    # A campaign-only entry is widened by a hard bounce, and an expiring one made lasting.
    supp.add([Suppression(address="c@dest.test", tenant="acme", source="unsubscribe",
                          transactional=False, expires=1000.0)])
    (widened,) = supp.strike([strike("c@dest.test", threshold=1)], now=20.0)
    assert (widened.transactional, widened.non_transactional, widened.expires) == (
        True, True, None)
    # An expired entry is simply replaced.
    supp.add([Suppression(address="e@dest.test", tenant="acme", expires=5.0)])
    (fresh,) = supp.strike([strike("e@dest.test", threshold=1, expires=500.0)], now=30.0)
    assert fresh.expires == 500.0


def test_purge_deletes_counts_whose_window_passed(spool: Spool) -> None:
    supp = SuppressionList(spool)
    supp.strike([strike("a@dest.test"), strike("b@dest.test", window=100 * DAY)], now=0.0)
    assert supp.purge_counts(now=8 * DAY) == 1
    assert supp.purge_counts(now=8 * DAY) == 0
    # b's count is still there: two more strikes suppress it.
    supp.strike([strike("b@dest.test", window=100 * DAY)], now=9 * DAY)
    assert supp.strike([strike("b@dest.test", window=100 * DAY)], now=10 * DAY) != []


async def test_the_feed_commits_in_the_background_and_flushed_waits(spool: Spool) -> None:
    supp = SuppressionList(spool)
    feed = SuppressionFeed(supp, parse_policy({}))
    bus = EventBus([feed])
    hard = Bounce(queue_id="Q1", recipient="gone@dest.test", destination="dest.test",
                  reply="550 5.1.1 no such user", bounce_class=10, bounce_rule="r",
                  tenant="acme")
    complaint = Complaint(queue_id="Q2", recipient="angry@dest.test", feedback_type="abuse",
                          tenant="acme")
    async with trio.open_nursery() as nursery:
        await nursery.start(feed.run)
        with trio.fail_after(10):
            bus.emit_many([hard, complaint])  # returns at once: the commit is the task's
            assert supp.blocking("acme", ["gone@dest.test"]) == {}
            assert await feed.flushed() is True
        found = supp.blocking("acme", ["gone@dest.test", "angry@dest.test"])
        assert set(found) == {"gone@dest.test", "angry@dest.test"}
        assert found["angry@dest.test"].source == "complaint"
        assert supp.blocking("acme", ["angry@dest.test"], transactional=True) == {}
        assert supp.blocking("acme", ["gone@dest.test"], transactional=True) != {}
        with trio.fail_after(10):
            assert await feed.flushed() is True  # nothing queued: at once
        nursery.cancel_scope.cancel()


async def test_the_feed_is_off_without_a_policy_and_bounded(spool: Spool) -> None:
    supp = SuppressionList(spool)
    feed = SuppressionFeed(supp, None, max_pending=2)
    events = [Bounce(queue_id=f"Q{i}", recipient=f"g{i}@dest.test", destination="d",
                     bounce_class=10) for i in range(3)]
    feed(events)
    with trio.fail_after(5):
        assert await feed.flushed() is True
    feed.policy = parse_policy({})
    feed(events)  # three strikes, room for two: dropped with a warning, never blocking
    assert feed.dropped == 3
    feed(events[:2])
    async with trio.open_nursery() as nursery:
        await nursery.start(feed.run)
        with trio.fail_after(10):
            assert await feed.flushed() is True
        nursery.cancel_scope.cancel()
    assert set(supp.blocking(None, [e.recipient for e in events])) == {
        "g0@dest.test", "g1@dest.test"}
