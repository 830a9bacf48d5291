"""The event log: one JSON line per outcome, so an operator can account for every message.

Every record has ``type`` (Reception, Delivery, TransientFailure, Bounce, Expiration),
``time`` (Unix seconds) and ``queue_id``; the rest depends on the type. Counters are
derived from the same records (``EventLog.counts``), so a number on a dashboard and a
line in the log can never disagree.

Several worker processes append to one file. Each record is written with a single
``os.write`` on an ``O_APPEND`` descriptor, which the kernel appends atomically for
regular files, so lines from different workers never interleave.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import msgspec

__all__ = [
    "Bounce",
    "Delivery",
    "Event",
    "EventLog",
    "Expiration",
    "Reception",
    "TransientFailure",
]


class _Event(msgspec.Struct, kw_only=True, omit_defaults=True, tag_field="type"):
    queue_id: str
    time: float = msgspec.field(default_factory=time.time)


class Reception(_Event, tag="Reception"):
    sender: str
    recipients: list[str]
    size: int
    client_ip: str
    helo: str = ""
    auth_user: str | None = None
    tls: str | None = None
    #: Seconds from the end of data to the durable commit.
    commit_seconds: float = 0.0


class _Attempt(_Event):
    """Common fields of a delivery attempt's outcome, one event per recipient."""

    recipient: str
    destination: str
    mx_host: str = ""
    ip: str = ""
    #: The remote reply ("250 2.0.0 Ok") or the local reason ("connection refused").
    reply: str = ""
    attempt: int = 1
    #: Seconds the attempt took (connect to reply) and since arrival.
    seconds: float = 0.0
    queued_seconds: float = 0.0
    #: The connection was lost after the end of data was sent: the message may have
    #: been delivered (a Delivery with this set was judged delivered by policy).
    ambiguous: bool = False


class Delivery(_Attempt, tag="Delivery"):
    pass


class TransientFailure(_Attempt, tag="TransientFailure"):
    #: Unix time of the next attempt.
    next_attempt: float = 0.0


class Bounce(_Attempt, tag="Bounce"):
    #: Queue id of the DSN sent to the sender, "" when none was sent (null sender, NOTIFY).
    dsn_queue_id: str = ""


class Expiration(_Attempt, tag="Expiration"):
    dsn_queue_id: str = ""


Event = Reception | Delivery | TransientFailure | Bounce | Expiration

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Event)


class EventLog:
    """Appends events as JSON lines; ``path=""`` keeps only the in-memory counters."""

    def __init__(self, path: str | os.PathLike[str] = "") -> None:
        self.path = str(path)
        self.counts: Counter[str] = Counter()
        self._fd: int | None = None
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def emit(self, event: Event) -> None:
        self.counts[type(event).__name__] += 1
        if self._fd is not None:
            os.write(self._fd, _encoder.encode(event) + b"\n")

    def emit_many(self, events: list[Event]) -> None:
        """Several events in one write (still whole lines: one O_APPEND write)."""
        if not events:
            return
        for event in events:
            self.counts[type(event).__name__] += 1
        if self._fd is not None:
            os.write(self._fd, b"".join(_encoder.encode(e) + b"\n" for e in events))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def read(path: str | os.PathLike[str]) -> list[Event]:
        """Parse a log file back (tests, `relay queue` tooling)."""
        with open(path, "rb") as f:
            return [_decoder.decode(line) for line in f if line.strip()]
