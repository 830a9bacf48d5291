"""An append-only log file that several worker processes write whole lines to.

Contract:

* ``add(data)`` appends ``data`` (whole lines). Every system call is one ``os.write`` on
  an ``O_APPEND`` descriptor, which the kernel appends atomically for regular files, so
  lines of different processes never interleave.
* Outside ``run()`` each ``add`` is written at once. While ``run()`` is running (a trio
  task of the worker), the adds of one scheduler pass are joined and written by that
  task in one write right after the pass: a reception or a delivery costs a list append
  instead of a system call (the file write was 4% of a worker's time per message with a
  connection per message). A batch is written at once when it reaches ``FLUSH_BYTES``;
  leaving ``run()``, ``reopen()`` and ``close()`` write what is pending first. An
  ``add`` from another thread than ``run()``'s is written at once. A batch that cannot
  be written (a full disk) is logged and dropped, as the bus does with a subscriber that
  raises; ``add`` outside a batch raises ``OSError`` to its caller.
* ``flush()`` writes the batch now. The worker's group-commit writer calls it right
  before each commit and right after each commit's callbacks
  (``relay.spool.writer``), so the order the events promise holds with batching: an
  outcome's events are on file before the commit that records it, a message's Reception
  before its 250. What is still only in memory when a ``kill -9`` comes is lines no
  commit depends on yet, of the current pass. The file is never synced either way; the
  spool, not the log, is the durable record.
* ``reopen()`` (SIGUSR1 after logrotate) opens the path afresh with the new descriptor in
  place before the old one is closed; a failed open raises and keeps the old file.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import trio

__all__ = ["FLUSH_BYTES", "Appender"]

log = logging.getLogger("relay.events")

#: A batch this large is written without waiting for the end of the scheduler pass.
FLUSH_BYTES = 256 * 1024


class Appender:
    """See the module docstring."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = self._open()
        self._pending: list[bytes] = []
        self._size = 0
        #: the thread of the running ``run()`` task; None: write every add at once
        self._batching_thread: int | None = None
        self._wake = trio.Event()

    def add(self, data: bytes) -> None:
        if self._fd is None:
            return
        if self._batching_thread != threading.get_ident():
            self._write(data)
            return
        self._pending.append(data)
        self._size += len(data)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif len(self._pending) == 1:
            self._wake.set()

    def flush(self) -> None:
        """Write what is pending now, in one write."""
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._size = 0
        if self._fd is not None:
            self._write(data)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Batch the adds of each scheduler pass until cancelled (see the module docstring)."""
        self._batching_thread = threading.get_ident()
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()
                try:
                    self.flush()
                except OSError:  # as a failing bus subscriber: logged, the batch lost
                    log.exception("%s: cannot write a batch of log lines", self.path)
        finally:
            self._batching_thread = None
            self.flush()

    def reopen(self) -> None:
        if self._fd is None:
            return
        self.flush()
        fd = self._open()
        old, self._fd = self._fd, fd
        os.close(old)

    def close(self) -> None:
        self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def _write(self, data: bytes) -> None:
        fd = self._fd
        assert fd is not None
        written = os.write(fd, data)
        while written < len(data):  # only on a full disk or a signal: rare
            data = data[written:]
            written = os.write(fd, data)
