"""Operator views of the queue (``relay queue stats | list | show``).

Plain msgspec Structs so ``--json`` is just ``msgspec.json.encode(view)``. They are
snapshots taken in one read transaction; the queue keeps moving underneath.
"""

from __future__ import annotations

import msgspec

from relay.model import DeliveryJob, Envelope

__all__ = ["DomainCount", "MessageDetail", "QueueDomain", "QueueEntry", "QueueStats"]


class DomainCount(msgspec.Struct, kw_only=True):
    """Pending work for one routing domain."""

    domain: str
    #: Messages (= jobs) still queued for this domain.
    messages: int
    #: Recipients still to deliver in this domain.
    recipients: int


class QueueStats(msgspec.Struct, kw_only=True):
    """Whole-queue summary (``relay queue stats``)."""

    #: Messages in the spool (bytes + envelope stored).
    messages: int
    #: Recipients not yet delivered or bounced, over all jobs.
    recipients: int
    #: Delivery jobs (one per message and routing domain).
    jobs: int
    #: Jobs whose due time has passed and nobody has claimed (waiting for a worker).
    jobs_due: int
    #: Jobs waiting for a retry time in the future (not claimed).
    jobs_deferred: int
    #: Jobs claimed by a worker (delivery in flight, or its lease not yet expired).
    jobs_in_flight: int
    #: Sum of the stored message sizes.
    bytes: int
    #: Arrival time (Unix seconds) of the oldest message, None for an empty queue.
    oldest_arrival: float | None
    #: Domains with the most pending recipients, largest first.
    top_domains: list[DomainCount]
    #: When the snapshot was taken.
    now: float


class QueueDomain(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One message's state for one routing domain (one delivery job)."""

    domain: str
    #: Addresses still to deliver in this domain.
    pending: list[str]
    attempts: int = 0
    #: Next attempt (or lease expiry while in flight).
    next_due: float = 0.0
    in_flight: bool = False
    first_attempt: float | None = None
    last_error: str | None = None


class QueueEntry(msgspec.Struct, kw_only=True):
    """One line of ``relay queue list``."""

    queue_id: str
    sender: str
    arrival: float
    size: int
    #: Recipients still pending, over all domains.
    pending: int
    domains: list[QueueDomain]


class MessageDetail(msgspec.Struct, kw_only=True):
    """``relay queue show QID``: everything the spool knows about one message."""

    queue_id: str
    envelope: Envelope
    size: int
    jobs: list[DeliveryJob]
    #: The header section (up to 64 KiB), decoded as UTF-8 with replacement.
    headers: str
