"""Cross-worker wake-up: one unix datagram socket per shard.

Why: mail accepted by worker A for a domain of worker B's shard is handed over through
LMDB (principle 4). B would find it on its next poll anyway; the datagram only makes B
look *now*. It is a hint, never the truth: a lost datagram costs at most one poll
interval, so ``notify`` never blocks and ignores every "nobody listening" error.

Addresses: ``<spool>/wake/<shard>.sock`` when that path fits in ``sun_path`` (108 bytes),
else a Linux abstract-namespace name derived from the spool path's hash (pytest's deep
tmp paths), computed the same way by every process, so both sides always agree.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import socket
from collections.abc import Iterable
from pathlib import Path

import trio

from relay.events.metrics import Metrics

__all__ = ["WakeListener", "Waker"]

_MAX_SUN_PATH = 107
_IGNORED = {errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN, errno.EWOULDBLOCK,
            errno.ENOBUFS, errno.ENOTDIR}


class Waker:
    """Sends wake-ups to shards (any process) and opens this process's listener."""

    def __init__(self, spool_path: str | os.PathLike[str],
                 metrics: Metrics | None = None) -> None:
        self.dir = Path(spool_path).resolve() / "wake"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        #: The worker's registry: ``wakeups_sent``.
        self.metrics = metrics if metrics is not None else Metrics()
        #: address() by shard: notify runs after every commit, the shards never change.
        self._addresses: dict[int, str | bytes] = {}

    def address(self, shard: int) -> str | bytes:
        """The socket address of ``shard`` (filesystem path or abstract name)."""
        addr = self._addresses.get(shard)
        if addr is None:
            addr = self._addresses[shard] = self._address(shard)
        return addr

    def _address(self, shard: int) -> str | bytes:
        path = str(self.dir / f"{shard}.sock")
        if len(path.encode()) <= _MAX_SUN_PATH:
            return path
        digest = hashlib.sha1(str(self.dir).encode()).hexdigest()[:16]
        return f"\0relay-wake-{digest}-{shard}".encode()

    def notify(self, shards: Iterable[int]) -> None:
        """Non-blocking: poke each shard's engine; a shard with no listener is skipped."""
        for shard in shards:
            try:
                self._sock.sendto(b"!", self.address(shard))
                self.metrics.inc("wakeups_sent")
            except OSError as e:
                if e.errno not in _IGNORED:
                    raise

    def listen(self, shard: int) -> WakeListener:
        """Bind ``shard``'s socket (replacing a stale one). Use as a context manager."""
        return WakeListener(self.address(shard), self.dir)

    def close(self) -> None:
        self._sock.close()


class WakeListener:
    """The receiving end for one shard: ``await wait()`` returns on a datagram."""

    def __init__(self, address: str | bytes, directory: Path) -> None:
        self.address = address
        self._sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if isinstance(address, str):
            directory.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address)
        # Bind is instant for unix sockets; do it synchronously.
        self._sock._sock.bind(address)  # type: ignore[attr-defined]
        self.received = 0

    async def wait(self) -> None:
        """Wait for at least one datagram, then drain the rest (they coalesce)."""
        await self._sock.recv(16)
        self.received += 1
        while True:
            try:
                self._sock._sock.recv(16)  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            self.received += 1

    def close(self) -> None:
        self._sock.close()
        if isinstance(self.address, str):
            with contextlib.suppress(OSError):
                os.unlink(self.address)

    def __enter__(self) -> WakeListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
