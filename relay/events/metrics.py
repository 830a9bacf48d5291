"""The counters and gauges of one worker: a subscriber of the bus, and the registry the
components report their own numbers to (connections, commits, wake-ups).

Names follow KumoMTA's where they overlap (``total_messages_delivered``,
``total_messages_fail``, ``total_messages_transfail``, ``connection_count``). Labels are
bounded: a metric keeps at most ``max_series`` label sets, and the rest are added up
under ``destination="other"``, so a campaign to 100,000 domains cannot grow it without
limit. The metrics endpoint (relay.http.metrics) reads ``samples()``, ``kind()`` and
``histograms()``: a series only ever ``set`` is a gauge, one ``inc``-ed a counter.

Histograms have fixed buckets (``HISTOGRAM_BUCKETS`` by name, else ``SECONDS_BUCKETS``):
``observe(name, value)`` adds one to a bucket, to the sum and to the count.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from relay.events.types import (
    Bounce,
    Delivery,
    Event,
    Expiration,
    Reception,
    Suppressed,
    TransientFailure,
    Unsubscribe,
)

__all__ = ["HISTOGRAM_BUCKETS", "SECONDS_BUCKETS", "Metrics", "buckets_of"]

#: Which counter each event adds to (per destination, where it has one).
_EVENT_COUNTERS: dict[type, tuple[str, ...]] = {
    Reception: ("total_messages_received",),
    Delivery: ("total_messages_delivered",),
    TransientFailure: ("total_messages_transfail",),
    Bounce: ("total_messages_fail",),
    Expiration: ("total_messages_fail", "total_messages_expired"),
    Suppressed: ("total_recipients_suppressed",),
    Unsubscribe: ("total_unsubscribes",),
}

_Labels = tuple[tuple[str, str], ...]

#: Upper bounds (seconds) of the default histogram buckets; +Inf is implied.
SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
#: Buckets of the histograms that do not measure seconds.
HISTOGRAM_BUCKETS: dict[str, tuple[float, ...]] = {
    "spool_commit_batch_size": (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
}


class Metrics:
    """See the module docstring. Not thread-safe: one per worker, used from trio."""

    def __init__(self, max_series: int = 1000) -> None:
        self.max_series = max_series
        self._values: dict[str, dict[_Labels, float]] = {}
        self._gauges: set[str] = set()
        #: name -> labels -> [count of each bucket (non-cumulative, +Inf last)..., sum]
        self._histograms: dict[str, dict[_Labels, list[float]]] = {}

    def _series(self, name: str, labels: dict[str, str]) -> tuple[dict[_Labels, float], _Labels]:
        series = self._values.get(name)
        if series is None:
            series = self._values[name] = {}
        key = _key(labels)
        if key not in series and len(series) >= self.max_series:
            key = tuple((k, "other") for k, _ in key)
        return series, key

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        series, key = self._series(name, labels)
        series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        series, key = self._series(name, labels)
        series[key] = value
        self._gauges.add(name)

    def kind(self, name: str) -> str:
        """"gauge" for a series that is ``set``, else "counter"."""
        return "gauge" if name in self._gauges else "counter"

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Add ``value`` to the histogram ``name`` (its buckets are fixed by name)."""
        series = self._histograms.get(name)
        if series is None:
            series = self._histograms[name] = {}
        key = _key(labels)
        cells = series.get(key)
        if cells is None:
            if len(series) >= self.max_series:
                key = tuple((k, "other") for k, _ in key)
                cells = series.get(key)
            if cells is None:
                cells = series[key] = [0.0] * (len(buckets_of(name)) + 2)
        bounds = buckets_of(name)
        i = bisect.bisect_left(bounds, value)
        cells[i] += 1
        cells[-1] += value

    def histograms(self) -> list[tuple[str, dict[str, str], list[float], float]]:
        """(name, labels, non-cumulative bucket counts with +Inf last, sum) each."""
        return [(name, dict(key), cells[:-1], cells[-1])
                for name, series in self._histograms.items() for key, cells in series.items()]

    def get(self, name: str, **labels: str) -> float:
        """The value of one series (0 when it was never reported)."""
        return self._values.get(name, {}).get(_key(labels), 0.0)

    def total(self, name: str) -> float:
        """The sum over every label set of ``name``."""
        return sum(self._values.get(name, {}).values())

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        return [(name, dict(key), value) for name, series in self._values.items()
                for key, value in series.items()]

    def __call__(self, events: Sequence[Event]) -> None:
        """The bus subscriber: count every event."""
        for event in events:
            if type(event) is Reception:
                self.inc("total_receptions", protocol=event.via)
                self.observe("reception_commit_seconds", event.commit_seconds,
                             protocol=event.via)
            destination = getattr(event, "destination", None)
            for name in _EVENT_COUNTERS.get(type(event), ()):
                if destination is None:
                    self.inc(name)
                else:
                    self.inc(name, destination=destination)


def buckets_of(name: str) -> tuple[float, ...]:
    """The upper bounds of histogram ``name``'s buckets (+Inf implied)."""
    return HISTOGRAM_BUCKETS.get(name, SECONDS_BUCKETS)


def _key(labels: dict[str, str]) -> _Labels:
    """The series key of ``labels``: in name order (no sort for the usual one label: this
    runs for every event)."""
    items = tuple(labels.items())
    return items if len(items) < 2 else tuple(sorted(items))
