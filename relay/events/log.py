"""The JSON-lines event log, a subscriber of the bus (``log.events`` in the config).

Several worker processes append to one file. The events of one outcome are written with
a single ``os.write`` on an ``O_APPEND`` descriptor, which the kernel appends atomically
for regular files, so lines from different workers never interleave.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from relay.events.types import Event, decode, encode

__all__ = ["EventLog"]


class EventLog:
    """Appends events as JSON lines to ``path``; call it with a list of events."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                                       0o640)

    def __call__(self, events: Sequence[Event]) -> None:
        if self._fd is not None:
            os.write(self._fd, b"".join(encode(e) + b"\n" for e in events))

    def reopen(self) -> None:
        """Open ``path`` afresh and write there from now on (``SIGUSR1``, after logrotate
        renamed the file). The new descriptor is in place before the old one is closed,
        so no event is lost; when the open fails, the error is raised and the old file is
        kept. A closed log stays closed."""
        if self._fd is None:
            return
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        old, self._fd = self._fd, fd
        os.close(old)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def read(path: str | os.PathLike[str]) -> list[Event]:
        """Parse a log file back (tests, reports)."""
        with open(path, "rb") as f:
            return [decode(line) for line in f if line.strip()]
