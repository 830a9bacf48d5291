"""`relay queue stats | list` and `relay shaping status` for people: readable sizes and
ages, a mailq-like listing, the shaping table sorted by scope with rates per minute."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest

from relay.cli import (
    fmt_age,
    fmt_size,
    format_queue_list,
    format_queue_stats,
    format_shaping_status,
    shaping_holds,
)
from relay.model import Learned
from relay.spool.shaping import ShapingEntry
from relay.spool.views import DomainCount, QueueDomain, QueueEntry, QueueStats

NOW = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC


@pytest.fixture
def utc() -> Iterator[None]:
    """Arrival times are printed in local time: make local time UTC for the test."""
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    try:
        yield
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(-3, "0s"), (0, "0s"), (45.9, "45s"), (60, "1m"), (330, "5m30s"), (3600, "1h"),
     (3 * 3600 + 12 * 60 + 59, "3h12m"), (86400, "1d"), (2 * 86400 + 4 * 3600 + 59, "2d4h"),
     (400 * 86400, "400d")],
)
def test_ages_are_durations_in_their_two_largest_units(seconds: float, text: str) -> None:
    assert fmt_age(seconds) == text


@pytest.mark.parametrize(
    ("size", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"),
     (12_897_485, "12.3 MiB"), (1024**2 - 1, "1.0 MiB"), (5 * 1024**3, "5.0 GiB"),
     (3 * 1024**5, "3072.0 TiB")],
)
def test_sizes_are_in_binary_units(size: int, text: str) -> None:
    assert fmt_size(size) == text


def test_stats_for_people(utc: None) -> None:
    stats = QueueStats(
        messages=1234, recipients=5678, jobs=2000, jobs_due=12, jobs_deferred=1980,
        jobs_in_flight=8, bytes=12_897_485, oldest_arrival=NOW - (2 * 86400 + 4 * 3600 + 5),
        top_domains=[
            DomainCount(domain="gmail.com", messages=900, recipients=4000),
            DomainCount(domain="t-online.de", messages=12, recipients=12),
        ],
        now=NOW,
    )
    assert format_queue_stats(stats) == (
        "Messages:       1234 (12.3 MiB)\n"
        "Recipients:     5678 still to deliver\n"
        "Delivery jobs:  2000 (12 due now, 1980 deferred, 8 in flight)\n"
        "Oldest message: 2d4h old (arrived 2027-01-13 03:59:55)\n"
        "\n"
        "Top domains  Messages  Recipients\n"
        "gmail.com         900        4000\n"
        "t-online.de        12          12\n"
    )


def test_stats_of_an_empty_queue() -> None:
    stats = QueueStats(messages=0, recipients=0, jobs=0, jobs_due=0, jobs_deferred=0,
                       jobs_in_flight=0, bytes=0, oldest_arrival=None, top_domains=[], now=NOW)
    assert format_queue_stats(stats) == (
        "Messages:       0 (0 B)\n"
        "Recipients:     0 still to deliver\n"
        "Delivery jobs:  0 (0 due now, 0 deferred, 0 in flight)\n"
        "Oldest message: -\n"
    )


ENTRIES = [
    QueueEntry(
        queue_id="1M8STHSKW0H9GZ0DF2", sender="news@sender.test", arrival=NOW - 11_520,
        size=2_300, pending=3,
        domains=[
            QueueDomain(domain="one.test", pending=["x@one.test", "y@one.test"], attempts=2,
                        last_error="451 4.7.1 Try again\n later"),
            QueueDomain(domain="two.test", pending=["z@two.test"]),
        ],
    ),
    QueueEntry(
        queue_id="1M8STHSKY0H9GZ0DF3", sender="", arrival=NOW - 42, size=700, pending=1,
        domains=[QueueDomain(domain="two.test", pending=["bounce@two.test"], in_flight=True)],
    ),
]


def test_list_is_like_mailq() -> None:
    assert format_queue_list(ENTRIES, NOW) == (
        "-Queue ID-            --Size--  -Age-  -Sender/Recipient-\n"
        "1M8STHSKW0H9GZ0DF2     2.2 KiB  3h12m  news@sender.test\n"
        "                                       x@one.test (451 4.7.1 Try again later)\n"
        "                                       y@one.test (451 4.7.1 Try again later)\n"
        "                                       z@two.test\n"
        "\n"
        "1M8STHSKY0H9GZ0DF3*      700 B    42s  <>\n"
        "                                       bounce@two.test\n"
        "\n"
        "-- 3 KiB in 2 messages.\n"
    )


def test_list_says_when_it_stopped_at_the_limit() -> None:
    assert format_queue_list(ENTRIES[1:], NOW, more=True).splitlines()[-1] == (
        "-- 1 KiB in 1 message shown; more are queued (raise --limit)."
    )


def test_an_empty_list() -> None:
    assert format_queue_list([], NOW) == "Mail queue is empty\n"


# -- relay shaping status


@pytest.mark.parametrize(("entry", "text"), [
    (ShapingEntry(scope="s", origin="admin", suspend=True, max_connections=3), "suspended"),
    (ShapingEntry(scope="s", origin="rule:r", max_message_rate=0.5), "rate 30.0/min"),
    (ShapingEntry(scope="s", origin="rule:r", max_message_rate=10.0, max_connections=2,
                  max_deliveries_per_connection=50),
     "rate 600.0/min, connections 2, 50 deliveries/connection"),
    (ShapingEntry(scope="s", origin="adaptive", learned=Learned(rate=0.1, connections=1)),
     "rate 6.0/min, connections 1"),
    (ShapingEntry(scope="s", origin="adaptive", learned=Learned()), "configured limits"),
])
def test_what_an_entry_holds(entry: ShapingEntry, text: str) -> None:
    assert shaping_holds(entry) == text


def test_the_table_is_sorted_by_scope_with_aligned_columns(utc: None) -> None:
    entries = [
        ShapingEntry(scope="ip-a->provider:gmail", origin="rule:gmail-rate",
                     until=NOW + 5400, since=NOW - 600, max_message_rate=1.0,
                     reason="421 4.7.28  Our system has\r\n detected an unusual rate"),
        ShapingEntry(scope="domain:b.test", origin="admin", suspend=True, since=NOW - 60,
                     reason="maintenance"),
        ShapingEntry(scope="ip-a->provider:gmail", origin="adaptive",
                     until=NOW + 7 * 86400, since=NOW - 30,
                     learned=Learned(rate=0.25, connections=3)),
    ]
    assert format_shaping_status(entries, NOW).splitlines() == [
        "Scope                 Origin           Holds                         Since        "
        "        Expires                         Reason",
        "domain:b.test         admin            suspended                     2027-01-15 07"
        ":59:00  until resumed                   maintenance",
        "ip-a->provider:gmail  adaptive         rate 15.0/min, connections 3  2027-01-15 07"
        ":59:30  2027-01-22 08:00:00 (in 7d)     -",
        "ip-a->provider:gmail  rule:gmail-rate  rate 60.0/min                 2027-01-15 07"
        ":50:00  2027-01-15 09:30:00 (in 1h30m)  421 4.7.28 Our system has detected an "
        "unusual rate",
        "",
        "-- 1 suspended, 2 with adjusted limits.",
    ]


def test_an_unknown_start_and_an_empty_table(utc: None) -> None:
    row = format_shaping_status([ShapingEntry(scope="tenant:t", origin="admin",
                                              suspend=True)], NOW).splitlines()[1]
    assert row.split() == ["tenant:t", "admin", "suspended", "-", "until", "resumed", "-"]
    assert format_shaping_status([], NOW) == "No suspensions or adjusted limits in force\n"
