"""The counters and gauges of one worker: a subscriber of the bus, and the registry the
components report their own numbers to (connections, commits, wake-ups).

Names follow KumoMTA's where they overlap (``total_messages_delivered``,
``total_messages_fail``, ``total_messages_transfail``, ``connection_count``). Labels are
bounded: a metric keeps at most ``max_series`` label sets, and the rest are added up
under ``destination="other"``, so a campaign to 100,000 domains cannot grow it without
limit. A metrics endpoint (to come) reads ``samples()``.
"""

from __future__ import annotations

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

__all__ = ["Metrics"]

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


class Metrics:
    """See the module docstring. Not thread-safe: one per worker, used from trio."""

    def __init__(self, max_series: int = 1000) -> None:
        self.max_series = max_series
        self._values: dict[str, dict[_Labels, float]] = {}

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
            destination = getattr(event, "destination", None)
            for name in _EVENT_COUNTERS.get(type(event), ()):
                if destination is None:
                    self.inc(name)
                else:
                    self.inc(name, destination=destination)


def _key(labels: dict[str, str]) -> _Labels:
    """The series key of ``labels``: in name order (no sort for the usual one label: this
    runs for every event)."""
    items = tuple(labels.items())
    return items if len(items) < 2 else tuple(sorted(items))
