"""The JSON-lines event log, a subscriber of the bus (``log.events`` in the config).

Several worker processes append to one file, whole lines per write
(``relay.events.appender``), so lines from different workers never interleave.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from relay.events.appender import Appender
from relay.events.types import Event, decode, encode

__all__ = ["EventLog"]


class EventLog(Appender):
    """Appends events as JSON lines to ``path``; call it with a list of events. ``run()``
    batches the writes of each scheduler pass (``Appender``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(str(path))

    def __call__(self, events: Sequence[Event]) -> None:
        self.add(b"".join([encode(e) + b"\n" for e in events]))

    @staticmethod
    def read(path: str | os.PathLike[str]) -> list[Event]:
        """Parse a log file back (tests, reports)."""
        with open(path, "rb") as f:
            return [decode(line) for line in f if line.strip()]
