"""The suppression list: addresses the relay must not send to, per tenant, in the spool.

One LMDB database (``supp``) in the spool's environment, so every worker and the CLI see
the same list and an unsubscribe is durable like a message:

    ``tenant + b"\\0" + address.lower()`` -> msgpack ``Suppression``

The tenant ``""`` means every tenant (an operator-wide entry). An entry says what it
blocks, as SparkPost's list does: ``non_transactional`` mail (campaigns: an unsubscribe
blocks only these), ``transactional`` mail (receipts, password resets), or both (a
manual entry, a hard bounce). It records where it came from (``unsubscribe``,
``manual``, ``import``, ``bounce`` (in-session), ``oob`` (a bounce report that came
later) and ``complaint``), when, and optionally until when it holds (``expires``).

Reads are one short read transaction; writes are synced commits of their own (they are
rare: an unsubscribe, a CLI command, a batch of bounces), outside the group commit.

Entries that feed themselves (``strike``, from bounces and complaints under the policy of
``relay.outcomes.suppress``) count toward "N within D" in a second database,
``supp_count``: ``tenant + b"\\0" + address.lower() + b"\\0" + counter`` -> msgpack
``_Count`` (the times of the strikes still inside the window, and when the newest
leaves it; ``purge_counts`` deletes the ones that have). A strike never weakens an
entry that is there: the scopes are merged, and the longer expiry holds.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence

import lmdb
import msgspec
import msgspec.structs

from relay.spool.store import Spool

__all__ = ["Strike", "Suppression", "SuppressionList"]

_DB = b"supp"
_DB_COUNT = b"supp_count"
_SEP = b"\x00"


class Suppression(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One entry of the list."""

    address: str
    #: "" = every tenant.
    tenant: str = ""
    source: str = "manual"
    time: float = 0.0
    #: Unix time after which the entry no longer holds; None = for ever.
    expires: float | None = None
    transactional: bool = True
    non_transactional: bool = True
    description: str = ""

    def blocks(self, transactional: bool, now: float) -> bool:
        if self.expires is not None and now >= self.expires:
            return False
        return self.transactional if transactional else self.non_transactional


class Strike(msgspec.Struct, frozen=True, kw_only=True):
    """One outcome that counts toward suppressing ``entry.address`` for ``entry.tenant``:
    ``entry`` is added at the ``threshold``-th strike of ``counter`` (a bounce class,
    "complaint") within ``window`` seconds (threshold 1: at once)."""

    entry: Suppression
    counter: str
    threshold: int = 1
    window: float = 0.0


class _Count(msgspec.Struct, array_like=True):
    hits: list[float]
    #: When the newest hit leaves the window (the record is then worthless).
    until: float


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Suppression).decode
_count_decode = msgspec.msgpack.Decoder(_Count).decode


def _key(tenant: str, address: str) -> bytes:
    return tenant.encode() + _SEP + address.lower().encode("utf-8", "surrogateescape")


class SuppressionList:
    """The list in ``spool`` (see module docstring). Synchronous: call from a thread
    (or the CLI) for writes; a lookup is cheap enough for the trio thread."""

    def __init__(self, spool: Spool) -> None:
        self._env = spool.env
        self._readonly = spool.readonly
        try:
            self._db: lmdb._Database | None = self._env.open_db(
                _DB, create=not spool.readonly)
        except lmdb.NotFoundError:  # a read-only spool no worker has opened since
            self._db = None
        try:
            self._counts: lmdb._Database | None = self._env.open_db(
                _DB_COUNT, create=not spool.readonly)
        except lmdb.NotFoundError:
            self._counts = None

    def blocking(self, tenant: str | None, addresses: Sequence[str], *,
                 transactional: bool = False, now: float | None = None
                 ) -> dict[str, Suppression]:
        """The entries that block mail to ``addresses`` from ``tenant`` (its own and
        the operator-wide ones), by address as given."""
        if self._db is None or not addresses:
            return {}
        now = time.time() if now is None else now
        found: dict[str, Suppression] = {}
        tenants = ("",) if not tenant else ("", tenant)
        with self._env.begin(db=self._db) as txn:
            for address in addresses:
                for t in tenants:
                    raw = txn.get(_key(t, address))
                    if raw is not None:
                        entry = _decode(raw)
                        if entry.blocks(transactional, now):
                            found[address] = entry
                            break
        return found

    def add(self, entries: Iterable[Suppression]) -> int:
        """Add or replace entries in one synced commit; how many."""
        db = self._writable()
        items = [(_key(e.tenant, e.address), _encode(e)) for e in entries]
        with self._env.begin(write=True, db=db) as txn:
            txn.cursor().putmulti(items)
        return len(items)

    def strike(self, strikes: Sequence[Strike], now: float | None = None) -> list[Suppression]:
        """Count ``strikes`` and add the entries whose threshold they reach, in one
        synced commit; the entries added (module docstring: merged with what is there)."""
        db, counts = self._writable(), self._counts
        if counts is None:
            raise OSError("the spool is read-only and has no suppression counts yet")
        now = time.time() if now is None else now
        added: list[Suppression] = []
        with self._env.begin(write=True) as txn:
            for s in strikes:
                if s.threshold > 1 and not _counted(txn, counts, s, now):
                    continue
                entry = _merged(txn, db, s.entry, now)
                if entry is not None:
                    txn.put(_key(entry.tenant, entry.address), _encode(entry), db=db)
                    added.append(entry)
        return added

    def purge_counts(self, now: float | None = None, limit: int = 10000) -> int:
        """Delete up to ``limit`` count records whose window has passed; how many."""
        if self._counts is None or self._readonly:
            return 0
        now = time.time() if now is None else now
        gone = 0
        with self._env.begin(write=True, db=self._counts) as txn:
            cursor = txn.cursor()
            for key, raw in cursor:
                if gone >= limit:
                    break
                if _count_decode(raw).until < now:
                    txn.delete(bytes(key))
                    gone += 1
        return gone

    def remove(self, tenant: str, address: str) -> bool:
        """Delete one entry; whether it was there."""
        db = self._writable()
        with self._env.begin(write=True, db=db) as txn:
            return bool(txn.delete(_key(tenant, address)))

    def entries(self, tenant: str | None = None) -> Iterator[Suppression]:
        """Every entry (of ``tenant`` only, if given), in key order. Reads in pages so a
        long list does not hold one read transaction open."""
        if self._db is None:
            return
        prefix = b"" if tenant is None else tenant.encode() + _SEP
        after = prefix
        while True:
            with self._env.begin(db=self._db) as txn:
                cursor = txn.cursor()
                if not cursor.set_range(after):
                    return
                page = []
                for key, raw in cursor:
                    if not key.startswith(prefix):
                        break
                    page.append((bytes(key), _decode(raw)))
                    if len(page) >= 1000:
                        break
            yield from (entry for key, entry in page if key != after or after == prefix)
            if len(page) < 1000:
                return
            after = page[-1][0]

    def _writable(self) -> lmdb._Database:
        if self._db is None:
            raise OSError("the spool is read-only and has no suppression list yet")
        return self._db


def _counted(txn: lmdb.Transaction, counts: lmdb._Database, s: Strike, now: float) -> bool:
    """Record one strike; whether it is the ``threshold``-th inside the window (the
    count then starts over)."""
    key = _key(s.entry.tenant, s.entry.address) + _SEP + s.counter.encode()
    raw = txn.get(key, db=counts)
    hits = [t for t in (_count_decode(raw).hits if raw is not None else [])
            if t > now - s.window]
    hits = [*hits, now][-s.threshold:]
    if len(hits) >= s.threshold:
        txn.delete(key, db=counts)
        return True
    txn.put(key, _encode(_Count(hits, max(hits) + s.window)), db=counts)
    return False


def _merged(txn: lmdb.Transaction, db: lmdb._Database, new: Suppression,
            now: float) -> Suppression | None:
    """``new`` widened by the entry already there (None: that one covers it already)."""
    raw = txn.get(_key(new.tenant, new.address), db=db)
    old = _decode(raw) if raw is not None else None
    if old is None or (old.expires is not None and old.expires <= now):
        return new
    longer = old.expires is None or (new.expires is not None and old.expires >= new.expires)
    if (longer and old.transactional >= new.transactional
            and old.non_transactional >= new.non_transactional):
        return None
    return msgspec.structs.replace(
        new, transactional=old.transactional or new.transactional,
        non_transactional=old.non_transactional or new.non_transactional,
        expires=None if old.expires is None or new.expires is None
        else max(old.expires, new.expires))
