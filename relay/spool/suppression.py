"""The suppression list: addresses the relay must not send to, per tenant, in the spool.

One LMDB database (``supp``) in the spool's environment, so every worker and the CLI see
the same list and an unsubscribe is durable like a message:

    ``tenant + b"\\0" + address.lower()`` -> msgpack ``Suppression``

The tenant ``""`` means every tenant (an operator-wide entry). An entry says what it
blocks, as SparkPost's list does: ``non_transactional`` mail (campaigns: an unsubscribe
blocks only these), ``transactional`` mail (receipts, password resets), or both (a
manual entry, a hard bounce). It records where it came from (``unsubscribe``,
``manual``, ``import``, later ``bounce`` and ``complaint``), when, and optionally until
when it holds (``expires``).

Reads are one short read transaction; writes are synced commits of their own (they are
rare: an unsubscribe, a CLI command), outside the group commit.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence

import lmdb
import msgspec

from relay.spool.store import Spool

__all__ = ["Suppression", "SuppressionList"]

_DB = b"supp"
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


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Suppression).decode


def _key(tenant: str, address: str) -> bytes:
    return tenant.encode() + _SEP + address.lower().encode("utf-8", "surrogateescape")


class SuppressionList:
    """The list in ``spool`` (see module docstring). Synchronous: call from a thread
    (or the CLI) for writes; a lookup is cheap enough for the trio thread."""

    def __init__(self, spool: Spool) -> None:
        self._env = spool.env
        try:
            self._db: lmdb._Database | None = self._env.open_db(
                _DB, create=not spool.readonly)
        except lmdb.NotFoundError:  # a read-only spool no worker has opened since
            self._db = None

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
