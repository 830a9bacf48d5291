"""Events: published once on a bus, consumed by subscribers (principle 7).

``types`` are the records (Reception, Delivery, TransientFailure, Bounce, Expiration);
``EventBus`` publishes them; ``EventLog`` (JSON lines) and ``Metrics`` (counters and
gauges, per worker) subscribe. Webhooks and a metrics endpoint plug in the same way.
"""

from relay.events.bus import EventBus, Subscriber
from relay.events.log import EventLog
from relay.events.metrics import Metrics
from relay.events.types import (
    Bounce,
    Delivery,
    Event,
    Expiration,
    Reception,
    Suppressed,
    TransientFailure,
    Unsubscribe,
    event_tags,
)

__all__ = [
    "Bounce",
    "Delivery",
    "Event",
    "EventBus",
    "EventLog",
    "Expiration",
    "Metrics",
    "Reception",
    "Subscriber",
    "Suppressed",
    "TransientFailure",
    "Unsubscribe",
    "event_tags",
]
