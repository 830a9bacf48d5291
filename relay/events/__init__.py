"""Events: published once on a bus, consumed by subscribers (principle 7).

``types`` are the records (Reception, Delivery, TransientFailure, Bounce, Expiration);
``EventBus`` publishes them; ``EventLog`` (JSON lines) and ``Metrics`` (counters and
gauges, per worker) subscribe. Webhooks (``relay.events.webhooks``, not imported here: it
needs trio) do not subscribe: worker 0 reads the event log from a persisted cursor and
POSTs it, so they survive restarts and never slow the publisher.
"""

from relay.events.bus import EventBus, Subscriber
from relay.events.log import EventLog
from relay.events.metrics import Metrics
from relay.events.types import (
    OOB,
    Bounce,
    Complaint,
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
    "OOB",
    "Bounce",
    "Complaint",
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
