"""Persisted shaping state: suspensions and adjusted limits, in the spool.

One LMDB database (``shaping``) in the spool's environment, so a restart neither forgets
a 2-hour suspension nor starts again at full speed, and every worker and the CLI see the
operator's ``relay queue suspend``:

    ``scope + b"\\0" + origin`` -> msgpack ``ShapingEntry``

``scope`` says what is held: a path ``SOURCE->DESTINATION`` (the engine's destination
key), or ``domain:D``, ``provider:P``, ``source:S``, ``tenant:T``, ``campaign:C`` (an
operator's selectors). ``origin`` says who set it: ``admin``, ``rule:ID`` or
``adaptive`` (the closed loop's learned limits). A ``version`` counter changes with
every write, so the workers re-read the (small) table only when it changed.

Writes are synced commits of their own (rare: a rule firing, a learned limit moving at
most once per ``clean_interval`` per path, a CLI command).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import lmdb
import msgspec

from relay.model import Learned
from relay.spool.store import Spool

__all__ = ["ShapingEntry", "ShapingStore", "UsageStore", "path_key"]

_DB = b"shaping"
_SEP = b"\x00"
_VERSION = b"\xffversion"


def path_key(source: str, destination: str) -> str:
    """The engine's key of a (source, destination) path; the unnamed source (no pools)
    keeps the destination's own key."""
    return f"{source}->{destination}" if source else destination


class ShapingEntry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One suspension or limit adjustment (see the module docstring)."""

    scope: str
    origin: str
    suspend: bool = False
    #: Unix time it ends; None = until an operator resumes.
    until: float | None = None
    since: float = 0.0
    reason: str = ""
    #: Limits while it holds (messages per second for the rate).
    max_message_rate: float | None = None
    max_connections: int | None = None
    max_deliveries_per_connection: int | None = None
    #: The closed loop's state (origin "adaptive").
    learned: Learned | None = None

    def active(self, now: float) -> bool:
        return self.until is None or now < self.until


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(ShapingEntry).decode


def _key(scope: str, origin: str) -> bytes:
    return scope.encode("utf-8", "surrogateescape") + _SEP + origin.encode()


class ShapingStore:
    """The table in ``spool``. Synchronous: call from a thread (or the CLI)."""

    def __init__(self, spool: Spool) -> None:
        self._env = spool.env
        try:
            self._db: lmdb._Database | None = self._env.open_db(_DB, create=not spool.readonly)
        except lmdb.NotFoundError:  # a read-only spool no worker has opened since
            self._db = None

    def version(self) -> int:
        if self._db is None:
            return 0
        with self._env.begin(db=self._db) as txn:
            raw = txn.get(_VERSION)
        return int(raw) if raw else 0

    def entries(self, now: float | None = None) -> list[ShapingEntry]:
        """Every entry still in force (all of them when ``now`` is None)."""
        if self._db is None:
            return []
        with self._env.begin(db=self._db) as txn:
            found = [_decode(raw) for key, raw in txn.cursor() if key != _VERSION]
        return found if now is None else [e for e in found if e.active(now)]

    def put(self, entries: Iterable[ShapingEntry]) -> None:
        """Add or replace entries (by scope and origin), and drop the expired ones, in
        one synced commit."""
        db = self._writable()
        now = time.time()
        with self._env.begin(write=True, db=db) as txn:
            for entry in entries:
                txn.put(_key(entry.scope, entry.origin), _encode(entry))
            self._purge(txn, now)
            self._bump(txn)

    def remove(self, scope: str, origin: str | None = None) -> list[ShapingEntry]:
        """Delete the entries of ``scope`` (of one ``origin`` only, if given); the ones
        deleted."""
        db = self._writable()
        prefix = scope.encode("utf-8", "surrogateescape") + _SEP
        removed: list[ShapingEntry] = []
        with self._env.begin(write=True, db=db) as txn:
            cursor = txn.cursor()
            keys = []
            if cursor.set_range(prefix):
                for key, raw in cursor:
                    if not key.startswith(prefix):
                        break
                    entry = _decode(raw)
                    if origin is None or entry.origin == origin:
                        keys.append(bytes(key))
                        removed.append(entry)
            for key in keys:
                txn.delete(key)
            self._bump(txn)
        return removed

    def _purge(self, txn: lmdb.Transaction, now: float) -> None:
        stale = [bytes(key) for key, raw in txn.cursor()
                 if key != _VERSION and not _decode(raw).active(now)]
        for key in stale:
            txn.delete(key)

    def _bump(self, txn: lmdb.Transaction) -> None:
        raw = txn.get(_VERSION)
        txn.put(_VERSION, str((int(raw) if raw else 0) + 1).encode())

    def _writable(self) -> lmdb._Database:
        if self._db is None:
            raise OSError("the spool is read-only and has no shaping table yet")
        return self._db


_USAGE_DB = b"egress_usage"


class UsageStore:
    """Messages handed to each egress source per UTC day, per worker (shard), for the
    warm-up caps: ``day \\0 source \\0 shard`` -> count (ASCII digits). Each worker
    writes only its own counts, so no two writers ever race on a key."""

    def __init__(self, spool: Spool) -> None:
        self._env = spool.env
        self._db = self._env.open_db(_USAGE_DB, create=not spool.readonly)

    def publish(self, day: str, counts: dict[str, int], shard: int) -> None:
        with self._env.begin(write=True, db=self._db) as txn:
            for source, n in counts.items():
                txn.put(f"{day}\0{source}\0{shard}".encode(), str(n).encode())
            # Earlier days are of no use: at most one day of rows is kept.
            cursor = txn.cursor()
            stale = [bytes(k) for k, _ in cursor if not k.startswith(day.encode() + b"\0")]
            for key in stale:
                txn.delete(key)

    def read(self, day: str, shard: int) -> tuple[dict[str, int], dict[str, int]]:
        """(this shard's counts, the sum of every other shard's) for ``day``."""
        own: dict[str, int] = {}
        others: dict[str, int] = {}
        prefix = day.encode() + b"\0"
        with self._env.begin(db=self._db) as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix):
                for key, raw in cursor:
                    if not key.startswith(prefix):
                        break
                    _day, source, who = bytes(key).decode().split("\0")
                    into = own if int(who) == shard else others
                    into[source] = into.get(source, 0) + int(raw)
        return own, others
