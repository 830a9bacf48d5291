"""The event bus: every event is published once; each consumer subscribes.

Subscribers are called in the publishing task, in order, with the events of one outcome
at a time (a list). They must be quick and must not block: the JSON-lines log writes
with one system call, the metrics registry adds numbers. A consumer that has slow work
to do (webhooks) keeps its own queue (and, if it must not lose events, a persisted
cursor) and returns at once. A subscriber that raises is logged and skipped: it never
stops delivery, nor the other subscribers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from relay.events.types import Event

__all__ = ["EventBus", "Subscriber"]

log = logging.getLogger("relay.events")

Subscriber = Callable[[Sequence[Event]], object]


class EventBus:
    """One per worker; see the module docstring."""

    def __init__(self, subscribers: Sequence[Subscriber] = ()) -> None:
        self._subscribers: list[Subscriber] = list(subscribers)

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def emit(self, event: Event) -> None:
        self.emit_many([event])

    def emit_many(self, events: Sequence[Event]) -> None:
        if not events:
            return
        for subscriber in self._subscribers:
            try:
                subscriber(events)
            except Exception:
                log.exception("event subscriber %r failed; %d events not seen by it",
                              subscriber, len(events))
