"""The LMDB spool: synchronous storage, scheduling and operator views.

Every method here is synchronous and runs one LMDB transaction start to finish in the
calling thread (py-lmdb: a write transaction belongs to the thread that began it). Trio
code calls them through ``trio.to_thread.run_sync``: the group-commit writer commits
receptions and delivery outcomes; the engine claims, reads and hands over jobs. The
schema is described in the package docstring (``relay/spool/__init__.py``).
"""

from __future__ import annotations

import heapq
import os
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import lmdb
import msgspec

from relay.model import Completion, DeliveryJob, Envelope, NewMessage
from relay.spool.queueid import new_queue_id
from relay.spool.views import (
    DomainCount,
    MessageDetail,
    QueueDomain,
    QueueEntry,
    QueueStats,
)

__all__ = [
    "SCHEMA_VERSION",
    "Claimant",
    "Completion",
    "DuplicateQueueId",
    "Guarded",
    "MessageNotFound",
    "Spool",
    "SpoolError",
    "SpoolVersionError",
    "job_hash",
    "pid_alive",
    "shard_hash",
    "shard_of",
]

#: Bumped when the on-disk layout changes incompatibly. Opening a spool written with a
#: newer version fails (``SpoolVersionError``) instead of misreading it.
SCHEMA_VERSION = 1

_DB_META = b"meta"
_DB_MSG = b"msg"
_DB_ENV = b"env"
_DB_JOB = b"job"
_DB_SCHED = b"sched"
_DB_DSCHED = b"dsched"
_DB_IDEM = b"idem"
_META_SCHEMA = b"schema_version"

#: sched key prefix: crc32 of the domain (u32 BE) + due time in milliseconds (u64 BE).
_SCHED = struct.Struct(">IQ")
_SCHED_LEN = _SCHED.size
_HASH = struct.Struct(">I")
#: dsched key: the earliest due time (ms, u64 BE) of a domain hash's jobs + the hash.
_DSCHED = struct.Struct(">QI")
#: idem value prefix: when the record was written (ms, u64 BE).
_IDEM_TIME = struct.Struct(">Q")
_SEP = b"\x00"

_env_encode = msgspec.msgpack.Encoder().encode
_env_decode = msgspec.msgpack.Decoder(Envelope).decode
_job_encoder = msgspec.msgpack.Encoder()
_job_encode = _job_encoder.encode
_job_decode = msgspec.msgpack.Decoder(DeliveryJob).decode


class _EnvHead(msgspec.Struct):
    """The few envelope fields the operator views need (decoding skips the rest)."""

    sender: str
    received_at: float
    recipients: list[_RcptHead]


class _RcptHead(msgspec.Struct):
    address: str


_head_decode = msgspec.msgpack.Decoder(_EnvHead).decode


class SpoolError(Exception):
    """A spool operation failed (the caller answers 451 4.3.0 / retries later)."""


class SpoolVersionError(SpoolError):
    """The spool on disk was written by a newer, incompatible version of the relay."""


class DuplicateQueueId(SpoolError):
    """A queue id that is already stored: the batch was not written."""


class MessageNotFound(SpoolError, KeyError):
    """No such queue id (delivered, bounced or deleted meanwhile)."""


def shard_hash(domain: str) -> int:
    """The stable 32-bit hash of a routing domain (crc32 of its lower-cased UTF-8)."""
    return zlib.crc32(domain.lower().encode("utf-8", "surrogatepass"))


def job_hash(job: DeliveryJob) -> int:
    """The hash a job is indexed (and so owned) by: its ``shard_key`` when a worker handed
    it to the owner of its destination (``Spool.hand_over``), else its domain."""
    return shard_hash(job.shard_key or job.domain)


def shard_of(domain: str, nshards: int) -> int:
    """Which worker (0..nshards-1) delivers ``domain``: ``shard_hash(domain) % nshards``.

    Stable across processes, restarts and Python versions (no ``hash()`` randomisation).
    """
    return shard_hash(domain) % nshards


def _due_ms(due: float) -> int:
    return max(0, int(due * 1000.0))


def _job_key(qid: bytes, domain: str) -> bytes:
    return qid + _SEP + domain.encode("utf-8", "surrogatepass")


def _sched_key(due: float, h: int, job_key: bytes) -> bytes:
    return _SCHED.pack(h, _due_ms(due)) + job_key


class _Index:
    """Keeps ``sched`` and ``dsched`` consistent within one write transaction.

    Every change of a job's index entry goes through ``add``/``remove``; they remember
    the earliest due time each touched domain hash had before, and ``finish`` (called
    once, before commit) moves that hash's single ``dsched`` entry if it changed.
    """

    __slots__ = ("_cur", "_dsched", "_old", "_sched", "_txn")

    def __init__(self, spool: Spool, txn: lmdb.Transaction) -> None:
        self._txn = txn
        self._sched = spool._sched
        self._dsched = spool._dsched
        self._cur = txn.cursor(spool._sched)
        self._old: dict[int, int | None] = {}

    def _first(self, h: int) -> int | None:
        prefix = _HASH.pack(h)
        cur = self._cur
        if cur.set_range(prefix):
            key = cur.key()
            if key[:4] == prefix:
                return _SCHED.unpack_from(key)[1]
        return None

    def touch(self, h: int) -> None:
        if h not in self._old:
            self._old[h] = self._first(h)

    def add(self, h: int, due: float, jk: bytes) -> None:
        self.touch(h)
        self._txn.put(_sched_key(due, h, jk), b"", db=self._sched)

    def remove(self, h: int, due: float, jk: bytes) -> bool:
        return self.remove_key(h, _sched_key(due, h, jk))

    def remove_key(self, h: int, key: bytes) -> bool:
        self.touch(h)
        return self._txn.delete(key, db=self._sched)

    def finish(self) -> None:
        txn, dsched = self._txn, self._dsched
        for h, old in self._old.items():
            new = self._first(h)
            if new != old:
                if old is not None:
                    txn.delete(_DSCHED.pack(old, h), db=dsched)
                if new is not None:
                    txn.put(_DSCHED.pack(new, h), b"", db=dsched)
        self._old.clear()


# A message made ready for storing: everything encoded, so the commit thread only puts.
# (qid, data, envelope msgpack, [(job key, job msgpack, sched key, domain hash)],
#  the jobs stored already claimed for the Claimant)
_Prepared = tuple[bytes, bytes, bytes, list[tuple[bytes, bytes, bytes, int]], list[DeliveryJob]]


class Claimant(Protocol):
    """Who may take delivery jobs straight from the commit that stores them: the
    delivery engine of the worker that received the message, for the domains of its
    own shard. Such a job is written already claimed (``claimed_by`` = this process,
    due at the lease's end, exactly as ``due_jobs`` would have left it), so local mail
    skips the scheduler's synced claim transaction and its read of the message. If
    the process dies before delivering, the claim is released like any other
    (``release_claims`` at restart, or the lease running out)."""

    lease: float
    #: This process's pid (``claimed_by``), read once: ``os.getpid`` is a system call.
    pid: int

    def wants(self, domain_hash: int) -> bool:
        """Claim the job of this domain now (the shard is ours, and there is room)?"""
        ...

    def adopt(self, jobs: list[tuple[DeliveryJob, Envelope, bytes]]) -> None:
        """After the commit: deliver these claimed jobs (message bytes as stored)."""
        ...


def prepare(msg: NewMessage, now: float | None = None,
            claimant: Claimant | None = None) -> _Prepared:
    """Validate and encode one message for ``Spool.write_prepared``.

    Raises ValueError for a message the spool must not accept (no recipients, no queue
    id): such a message would never be delivered nor bounced. Groups the recipients by
    routing domain into one DeliveryJob each, due ``now``; those the ``claimant`` wants
    are stored claimed by this process instead (and listed last in the result).
    """
    env = msg.envelope
    if not env.queue_id or not env.queue_id.isascii() or _SEP.decode() in env.queue_id:
        raise ValueError(f"invalid queue id {env.queue_id!r}")
    if not env.recipients:
        raise ValueError(f"{env.queue_id}: message without recipients")
    due = time.time() if now is None else now
    qid = env.queue_id.encode("ascii")
    by_domain: dict[str, list[int]] = {}
    for i, rcpt in enumerate(env.recipients):
        by_domain.setdefault(rcpt.domain, []).append(i)
    jobs = []
    claimed: list[DeliveryJob] = []
    for domain, idxs in by_domain.items():
        jk = _job_key(qid, domain)
        job = DeliveryJob(queue_id=env.queue_id, domain=domain, recipients=idxs, due=due,
                          pool=env.ip_pool)
        h = shard_hash(domain)
        if claimant is not None and claimant.wants(h):
            job.due = due + claimant.lease
            job.claimed_by = claimant.pid
            claimed.append(job)
        jobs.append((jk, _job_encode(job), _sched_key(job.due, h, jk), h))
    return qid, bytes(msg.data), _env_encode(env), jobs, claimed


_PreparedCompletion = tuple[Completion, list[_Prepared]]


class Guarded:
    """Messages stored only if their idempotency ``key`` is new (``write_prepared``)."""

    __slots__ = ("existing", "fresh_after", "key", "prepared", "record")

    def __init__(self, key: bytes, record: bytes, prepared: list[_Prepared],
                 fresh_after: float) -> None:
        self.key = key
        #: What a retry of the same request gets back (stored with the messages).
        self.record = record
        self.prepared = prepared
        #: Records written before this Unix time have expired.
        self.fresh_after = fresh_after
        #: Set by the commit: the record already stored, when the key was not new.
        self.existing: bytes | None = None


def prepare_completion(c: Completion, claimant: Claimant | None = None) -> _PreparedCompletion:
    """Validate and encode the DSNs of a completion (ValueError for a bad one)."""
    return c, [prepare(m, claimant=claimant) for m in c.new_messages]


class Spool:
    """The durable queue in one LMDB environment (directory ``path``).

    Open one ``Spool`` per process, after ``fork()``; every worker process opens the same
    directory and LMDB serialises their write transactions (robust process-shared mutex,
    so a writer killed mid-transaction does not wedge the others). Commits are synced
    (``sync=True, metasync=True``): when a write method returns, the data survives
    ``kill -9`` and power loss. Reads never block writes and vice versa.

    ``map_size`` is the most the spool may grow to; the file is sparse, so set it large.
    All processes must use the same ``map_size`` (a process whose map is smaller than the
    file's gets ``MapResizedError``). A full map raises ``lmdb.MapFullError`` from the
    write (wrapped in ``SpoolError`` by the group-commit writer): inbound answers 452/451.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        map_size: int = 32 * 1024**3,
        *,
        writemap: bool = False,
        max_readers: int = 1024,
        readonly: bool = False,
    ) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if not readonly:
            self.path.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(
            str(self.path),
            map_size=map_size,
            subdir=True,
            max_dbs=16,
            max_readers=max_readers,
            # Durability: a commit returns only after fdatasync of data and meta pages.
            sync=True,
            metasync=True,
            # writemap stays off by default: with it LMDB ftruncates data.mdb to the
            # whole map_size (a 32 GiB sparse file) and writes through the mmap, so a
            # full disk becomes SIGBUS in the middle of a commit instead of ENOSPC ->
            # a clean 451. It measured no faster here (`python -m bench.commit --writemap`).
            # All processes opening the spool must use the same setting.
            writemap=writemap and not readonly,
            # A big spool is read randomly (message bytes by qid): readahead only evicts.
            readahead=False,
            # Several worker processes open the environment: LMDB locking is required.
            lock=True,
            readonly=readonly,
            create=not readonly,
            mode=0o700,
        )
        try:
            # Reader slots of a crashed worker would otherwise pin old pages forever.
            self.stale_readers_cleared = self._env.reader_check()
            if readonly:
                # Named DB handles opened inside a read transaction die with it: let
                # py-lmdb open them in its own committed transaction.
                self._open_dbs(None, create=False)
                with self._env.begin() as txn:
                    self._check_schema(txn, write=False)
            else:
                with self._env.begin(write=True) as txn:
                    self._open_dbs(txn, create=True)
                    self._check_schema(txn, write=True)
        except BaseException:
            self._env.close()
            raise
        self._pid = os.getpid()

    def _open_dbs(self, txn: lmdb.Transaction | None, create: bool) -> None:
        env = self._env
        try:
            self._meta = env.open_db(_DB_META, txn=txn, create=create)
            self._msg = env.open_db(_DB_MSG, txn=txn, create=create)
            self._envdb = env.open_db(_DB_ENV, txn=txn, create=create)
            self._job = env.open_db(_DB_JOB, txn=txn, create=create)
            self._sched = env.open_db(_DB_SCHED, txn=txn, create=create)
            self._dsched = env.open_db(_DB_DSCHED, txn=txn, create=create)
        except lmdb.NotFoundError:
            raise SpoolError(f"{self.path}: not a relay spool (missing databases)") from None
        try:  # added later than the others: a spool no worker has opened since may lack it
            self._idem: lmdb._Database | None = env.open_db(_DB_IDEM, txn=txn, create=create)
        except lmdb.NotFoundError:
            self._idem = None

    def _check_schema(self, txn: lmdb.Transaction, write: bool) -> None:
        raw = txn.get(_META_SCHEMA, db=self._meta)
        if raw is None:
            if write:
                txn.put(_META_SCHEMA, str(SCHEMA_VERSION).encode(), db=self._meta)
            return
        try:
            version = int(bytes(raw))
        except ValueError:
            raise SpoolError(f"{self.path}: corrupt schema version {bytes(raw)!r}") from None
        if version > SCHEMA_VERSION:
            raise SpoolVersionError(
                f"{self.path}: spool schema version {version} is newer than this relay "
                f"supports ({SCHEMA_VERSION}); run the newer relay or move the spool aside"
            )

    @property
    def env(self) -> lmdb.Environment:
        """The LMDB environment (for tests and tools; don't write behind the schema)."""
        return self._env

    def close(self) -> None:
        """Close the environment. Idempotent. No transaction may be in progress."""
        self._env.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    new_queue_id = staticmethod(new_queue_id)

    # ------------------------------------------------------------------ inbound

    def store_batch(self, messages: Sequence[NewMessage]) -> None:
        """Store messages in ONE synced write transaction: all of them, or none.

        Each gets its bytes, its envelope, one DeliveryJob per routing domain (due now)
        and the scheduler index entries. Must run start to finish in one thread.
        Raises ValueError (bad message, nothing written), DuplicateQueueId, lmdb.Error.
        """
        now = time.time()
        self.write_prepared([prepare(m, now) for m in messages])

    def write_prepared(
        self,
        prepared: Sequence[_Prepared],
        completions: Sequence[_PreparedCompletion] = (),
        guarded: Sequence[Guarded] = (),
    ) -> None:
        """Store prepared messages and apply prepared completions in ONE synced write
        transaction (what the group-commit writer runs in its thread).

        Each ``Guarded`` group's messages are stored only if its idempotency key has no
        record younger than its ``fresh_after`` yet: then its record is written in the
        same transaction; else its ``existing`` is set to the stored record and none of
        its messages are written (a retried request, answered as the first time)."""
        if not prepared and not completions and not guarded:
            return
        with self._env.begin(write=True) as txn:
            idx = _Index(self, txn)
            new = list(prepared)
            for _, dsns in completions:
                new += dsns
            for g in guarded:
                g.existing = self._idempotent(txn, g.key, g.fresh_after)
                if g.existing is None:
                    txn.put(g.key, _IDEM_TIME.pack(int(time.time() * 1000)) + g.record,
                            db=self._idem_db())
                    new += g.prepared
            if new:
                self._put_prepared(txn, new, idx)
            for c, _ in completions:
                self._apply_completion(txn, idx, c)
            idx.finish()

    # ------------------------------------------------------------------ idempotency

    def _idem_db(self) -> lmdb._Database:
        if self._idem is None:
            raise SpoolError(f"{self.path}: spool has no idempotency database (read-only)")
        return self._idem

    def _idempotent(self, txn: lmdb.Transaction, key: bytes, fresh_after: float
                    ) -> bytes | None:
        if self._idem is None:
            return None
        raw = txn.get(key, db=self._idem)
        if raw is None or _IDEM_TIME.unpack_from(raw)[0] < fresh_after * 1000:
            return None
        return bytes(raw[_IDEM_TIME.size:])

    def idempotent_record(self, key: bytes, fresh_after: float) -> bytes | None:
        """The record stored for an idempotency ``key`` after ``fresh_after`` (Unix
        time), or None."""
        with self._env.begin() as txn:
            return self._idempotent(txn, key, fresh_after)

    def purge_idempotency(self, before: float, limit: int = 10000) -> int:
        """Delete up to ``limit`` idempotency records written before ``before``; how many
        were deleted (call again while it returns ``limit``)."""
        if self._idem is None:
            return 0
        cutoff = before * 1000
        with self._env.begin(write=True) as txn:
            cursor = txn.cursor(self._idem)
            stale = [bytes(k) for k, v in cursor
                     if _IDEM_TIME.unpack_from(v)[0] < cutoff][:limit]
            for key in stale:
                txn.delete(key, db=self._idem)
        return len(stale)

    def _put_prepared(
        self, txn: lmdb.Transaction, prepared: Sequence[_Prepared], idx: _Index | None = None
    ) -> None:
        msgs = [(p[0], p[1]) for p in prepared]
        envs = [(p[0], p[2]) for p in prepared]
        jobs = [(j[0], j[1]) for p in prepared for j in p[3]]
        sched = [(j[2], b"") for p in prepared for j in p[3]]
        _, added = txn.cursor(self._msg).putmulti(msgs, overwrite=False)
        if added != len(msgs):
            dup = [q.decode() for q, _ in msgs if txn.get(q, db=self._msg) is not None]
            raise DuplicateQueueId(f"queue id already in the spool: {dup[:5]}")
        txn.cursor(self._envdb).putmulti(envs)
        txn.cursor(self._job).putmulti(jobs)
        own = idx is None
        if idx is None:
            idx = _Index(self, txn)
        for h in {j[3] for p in prepared for j in p[3]}:
            idx.touch(h)
        txn.cursor(self._sched).putmulti(sched)
        if own:
            idx.finish()

    # ------------------------------------------------------------------ outbound

    def due_jobs(
        self, now: float, shard: int, nshards: int, limit: int, lease: float = 600.0
    ) -> list[DeliveryJob]:
        """Claim up to ``limit`` jobs of this shard that are due at ``now``.

        Order: round robin over the shard's domains that have due jobs (the domain whose
        oldest due job is oldest first), each domain's jobs in due order, like Postfix's
        qmgr round robin over destination queues: a backlog of 50 000 jobs for one big
        domain gets one job per round, not the whole ``limit``, so small domains are not
        starved behind it. Callers that want more of a big domain call again (or ask
        for a larger ``limit``).

        Claiming moves a job's due time to ``now + lease`` and records our pid in
        ``claimed_by``, in one synced write transaction, so two workers never get the same
        job, and a worker that dies mid-delivery loses nothing: its jobs become due
        again when the lease runs out (only deliveries in flight at the crash can be
        duplicated). The returned jobs carry attempts, first_attempt, last_error; their
        ``due`` is the lease expiry. Finish each with ``complete`` before the lease ends
        (a longer delivery may be claimed again by the scheduler: a duplicate, not loss).

        The scan runs in a read transaction, so a large backlog of other shards' due
        jobs never holds LMDB's writer lock (which inbound commits wait on); the claim
        transaction only touches the candidates and skips any that changed meanwhile.
        """
        if limit <= 0:
            return []
        now_ms = _due_ms(now)
        cands: list[bytes] = []
        with self._env.begin() as txn:
            # Domains of this shard with something due, earliest first (one dsched entry
            # per domain hash, so other shards' backlogs cost one step per domain).
            streams = []
            for key in txn.cursor(self._dsched).iternext(values=False):
                due_ms, h = _DSCHED.unpack(key)
                if due_ms > now_ms:
                    break
                if h % nshards == shard:
                    cur = txn.cursor(self._sched)
                    prefix = _HASH.pack(h)
                    if cur.set_range(prefix):
                        streams.append((prefix, cur.iternext(values=False)))
                    if len(streams) >= limit:
                        break
            # Round robin over those domains, each in due order: a huge backlog of one
            # domain cannot starve the others of this shard.
            while streams and len(cands) < limit:
                alive = []
                for prefix, it in streams:
                    key = next(it, None)
                    if key is None or key[:4] != prefix or _SCHED.unpack_from(key)[1] > now_ms:
                        continue
                    cands.append(key)
                    alive.append((prefix, it))
                    if len(cands) >= limit:
                        break
                streams = alive
        if not cands:
            return []
        until = now + lease
        pid = os.getpid()
        claimed: list[DeliveryJob] = []
        with self._env.begin(write=True) as txn:
            idx = _Index(self, txn)
            for sk in cands:
                h = _HASH.unpack_from(sk)[0]
                if not idx.remove_key(h, sk):
                    continue  # claimed, completed or rescheduled since the scan
                jk = sk[_SCHED_LEN:]
                raw = txn.get(jk, db=self._job)
                if raw is None:
                    continue  # dangling index entry (deleted job): dropped above
                job = _job_decode(raw)
                job.due = until
                job.claimed_by = pid
                txn.put(jk, _job_encode(job), db=self._job)
                idx.add(h, until, jk)
                claimed.append(job)
            idx.finish()
        return claimed

    def next_due(self, shard: int, nshards: int) -> float | None:
        """Earliest due time (Unix seconds, ms resolution) of this shard's jobs, or None.

        Includes lease expiries of claimed jobs (they become due then). A value <= now
        means ``due_jobs`` has work right away.
        """
        with self._env.begin() as txn:
            for key in txn.cursor(self._dsched).iternext(values=False):
                due_ms, h = _DSCHED.unpack(key)
                if h % nshards == shard:
                    return due_ms / 1000.0
        return None

    def load(self, queue_id: str) -> tuple[Envelope, bytes]:
        """The envelope and bytes of a queued message; MessageNotFound if it is gone."""
        qid = queue_id.encode("ascii")
        with self._env.begin() as txn:
            raw_env = txn.get(qid, db=self._envdb)
            data = txn.get(qid, db=self._msg)
        if raw_env is None or data is None:
            raise MessageNotFound(queue_id)
        return _env_decode(raw_env), data

    def load_many(
        self, queue_ids: Iterable[str], max_bytes: int
    ) -> dict[str, tuple[Envelope, bytes]]:
        """Envelopes and bytes of several messages in one read transaction, in the
        given order, stopping before the total size would exceed ``max_bytes``. Gone
        messages are skipped (``load`` reports them). For the delivery engine, which
        reads the messages of a claim batch together instead of one thread hop each."""
        out: dict[str, tuple[Envelope, bytes]] = {}
        if max_bytes <= 0:
            return out
        total = 0
        with self._env.begin() as txn:
            for queue_id in queue_ids:
                if queue_id in out:
                    continue
                qid = queue_id.encode("ascii")
                data = txn.get(qid, db=self._msg)
                raw_env = txn.get(qid, db=self._envdb)
                if data is None or raw_env is None:
                    continue
                total += len(data)
                if total > max_bytes:
                    break
                out[queue_id] = (_env_decode(raw_env), data)
        return out

    def complete(
        self,
        queue_id: str,
        domain: str,
        *,
        delivered: Iterable[int] = (),
        failed: Iterable[int] = (),
        deferred: Iterable[int] = (),
        next_due: float | None = None,
        attempts: int = 0,
        error: str | None = None,
        first_attempt: float | None = None,
        new_messages: Sequence[NewMessage] = (),
    ) -> None:
        """Record the outcome of a delivery attempt of job (queue_id, domain), atomically.

        Recipients (indexes into ``Envelope.recipients``) in ``delivered`` or ``failed``
        leave the job. If recipients remain, the job is rescheduled at ``next_due``
        (``None``: now, e.g. recipients not attempted because of a per-message
        recipient limit) with ``attempts``, ``last_error=error``, ``first_attempt``, and
        its claim is released. Otherwise the job and its index entry go, and when the
        message has no job left its bytes and envelope go too. ``deferred`` is what the
        caller deferred; it is informational (the remaining set is authoritative).

        ``new_messages`` (DSNs) are stored in the SAME transaction, so a bounce and the
        removal of the recipient it reports are one atomic step: never both, never
        neither. If the job no longer exists (operator deleted the message meanwhile),
        only ``new_messages`` are stored.
        """
        c = Completion(
            queue_id=queue_id,
            domain=domain,
            delivered=list(delivered),
            failed=list(failed),
            deferred=list(deferred),
            next_due=next_due,
            attempts=attempts,
            error=error,
            first_attempt=first_attempt,
            new_messages=list(new_messages),
        )
        self.write_prepared((), [prepare_completion(c)])

    def complete_many(self, completions: Sequence[Completion]) -> None:
        """Several ``complete`` calls in ONE synced transaction (all or nothing)."""
        self.write_prepared((), [prepare_completion(c) for c in completions])

    def _apply_completion(self, txn: lmdb.Transaction, idx: _Index, c: Completion) -> None:
        qid = c.queue_id.encode("ascii")
        jk = _job_key(qid, c.domain)
        raw = txn.get(jk, db=self._job)
        if raw is None:
            return  # deleted by the operator meanwhile (or completed twice)
        done = set(c.delivered)
        done.update(c.failed)
        job = _job_decode(raw)
        h = job_hash(job)
        idx.remove(h, job.due, jk)
        remaining = [i for i in job.recipients if i not in done]
        if remaining:
            job.recipients = remaining
            job.due = time.time() if c.next_due is None else c.next_due
            job.attempts = c.attempts
            job.last_error = c.error
            job.first_attempt = c.first_attempt
            job.claimed_by = None
            job.forced = False
            txn.put(jk, _job_encode(job), db=self._job)
            idx.add(h, job.due, jk)
        else:
            txn.delete(jk, db=self._job)
            if not self._has_jobs(txn, qid):
                txn.delete(qid, db=self._msg)
                txn.delete(qid, db=self._envdb)

    def _has_jobs(self, txn: lmdb.Transaction, qid: bytes) -> bool:
        cur = txn.cursor(self._job)
        prefix = qid + _SEP
        return cur.set_range(prefix) and bytes(cur.key()).startswith(prefix)

    def _jobs_of(self, txn: lmdb.Transaction, qid: bytes) -> list[tuple[bytes, DeliveryJob]]:
        cur = txn.cursor(self._job)
        prefix = qid + _SEP
        out = []
        if cur.set_range(prefix):
            for k, v in cur.iternext():
                if not bytes(k).startswith(prefix):
                    break
                out.append((bytes(k), _job_decode(v)))
        return out

    def retry_now(self, queue_id: str | None = None, domain: str | None = None) -> int:
        """Make matching jobs due now (``relay queue flush``); returns how many.

        None matches everything. Jobs claimed by a live delivery (lease not expired) are
        left alone: rescheduling them would duplicate a delivery in flight.
        """
        now = time.time()
        dom = domain.lower().rstrip(".") if domain is not None else None
        count = 0
        with self._env.begin(write=True) as txn:
            idx = _Index(self, txn)
            if queue_id is not None:
                items = self._jobs_of(txn, queue_id.encode("ascii"))
            else:
                items = [(bytes(k), _job_decode(v)) for k, v in txn.cursor(self._job)]
            for jk, job in items:
                if dom is not None and job.domain != dom:
                    continue
                if job.claimed_by is not None and job.due > now:
                    continue
                if job.due <= now:
                    continue
                job.forced = True
                self._make_due(txn, idx, jk, job, job_hash(job), now)
                count += 1
            idx.finish()
        return count

    def hand_over(self, moves: Sequence[tuple[DeliveryJob, str]], now: float | None = None
                  ) -> int:
        """Give claimed jobs to the worker that owns their destination: each job is
        re-indexed under ``shard_hash(key)`` (its ``shard_key``), due ``now``, unclaimed,
        in one synced transaction. Not an attempt. Jobs that changed since the caller
        claimed them (completed, deleted, re-claimed) are skipped; returns how many moved.
        """
        due = time.time() if now is None else now
        moved = 0
        with self._env.begin(write=True) as txn:
            idx = _Index(self, txn)
            for claimed, key in moves:
                jk = _job_key(claimed.queue_id.encode("ascii"), claimed.domain)
                raw = txn.get(jk, db=self._job)
                if raw is None:
                    continue
                job = _job_decode(raw)
                if job.claimed_by != claimed.claimed_by or job.due != claimed.due:
                    continue
                idx.remove(job_hash(job), job.due, jk)
                job.shard_key = None if key == job.domain else key
                job.due = due
                job.claimed_by = None
                txn.put(jk, _job_encode(job), db=self._job)
                idx.add(job_hash(job), due, jk)
                moved += 1
            idx.finish()
        return moved

    def _make_due(self, txn: lmdb.Transaction, idx: _Index, jk: bytes, job: DeliveryJob,
                  h: int, due: float) -> None:
        """Make ``job`` due at ``due`` and drop its claim; its record and its index entry
        change together, in the caller's write transaction."""
        idx.remove(h, job.due, jk)
        job.due = due
        job.claimed_by = None
        txn.put(jk, _job_encode(job), db=self._job)
        idx.add(h, due, jk)

    def delete(self, queue_id: str) -> bool:
        """Operator delete: drop the message, its envelope and all its jobs, no DSN.

        Returns False if there was no such message. A delivery in flight finishes and its
        ``complete`` then finds no job (harmless).
        """
        qid = queue_id.encode("ascii")
        with self._env.begin(write=True) as txn:
            idx = _Index(self, txn)
            jobs = self._jobs_of(txn, qid)
            for jk, job in jobs:
                idx.remove(job_hash(job), job.due, jk)
                txn.delete(jk, db=self._job)
            idx.finish()
            had_msg = txn.delete(qid, db=self._msg)
            had_env = txn.delete(qid, db=self._envdb)
        return bool(jobs) or had_msg or had_env

    def admin_bounce(
        self,
        select: Callable[[DeliveryJob, Envelope], bool],
        *,
        queue_id: str | None = None,
        batch: int = 500,
        committed: Callable[[list[tuple[Envelope, list[str]]]], None] | None = None,
    ) -> tuple[list[tuple[str, str]], int]:
        """Operator bounce (``relay queue bounce``, KumoMTA's admin bounce): every
        recipient still queued in a job that ``select(job, envelope)`` accepts fails now,
        WITHOUT a DSN. Its job goes like ``delete`` removes jobs, and a message left
        with no job goes too. Returns ((queue id, recipient) of every bounced recipient,
        how many recipients were skipped).

        Only ``queue_id``'s jobs are looked at when given. Jobs claimed by a live worker
        whose lease has not run out are being delivered right now: they are skipped
        (counted, left as they are) rather than pulled from under the delivery, which
        would then finish to a job that is gone; suspend the selection first, then
        bounce again. The queue is scanned in a read transaction (the writer lock is
        not held while O(queue) work runs), then ``batch`` messages at a time are
        bounced in one synced write transaction each, ``select`` asked again there
        (a job may have been claimed or handed over since). ``committed`` is called
        after each commit with each message's envelope and the recipients it lost, so
        the caller's events match what is durably gone even if it is stopped midway.
        """
        candidates: dict[bytes, list[bytes]] = {}
        with self._env.begin() as txn:
            if queue_id is not None:
                jobs = iter(self._jobs_of(txn, queue_id.encode("ascii")))
            else:
                jobs = ((bytes(k), _job_decode(v)) for k, v in txn.cursor(self._job))
            qid, env = b"", None
            for jk, job in jobs:
                if jk.partition(_SEP)[0] != qid:
                    qid = jk.partition(_SEP)[0]
                    raw_env = txn.get(qid, db=self._envdb)
                    env = _env_decode(raw_env) if raw_env is not None else None
                if env is not None and select(job, env):
                    candidates.setdefault(qid, []).append(jk)
        bounced: list[tuple[str, str]] = []
        skipped = 0
        qids = list(candidates)
        for start in range(0, len(qids), max(1, batch)):
            done, n = self._admin_bounce_batch(
                select, {q: candidates[q] for q in qids[start:start + max(1, batch)]})
            skipped += n
            bounced += [(env.queue_id, rcpt) for env, rcpts in done for rcpt in rcpts]
            if done and committed is not None:
                committed(done)
        return bounced, skipped

    def _admin_bounce_batch(
        self, select: Callable[[DeliveryJob, Envelope], bool], batch: dict[bytes, list[bytes]]
    ) -> tuple[list[tuple[Envelope, list[str]]], int]:
        """One synced transaction of ``admin_bounce``: (envelope, recipients bounced) per
        message, recipients skipped (in flight)."""
        now = time.time()
        done: list[tuple[Envelope, list[str]]] = []
        skipped = 0
        with self._env.begin(write=True) as txn:
            idx = _Index(self, txn)
            for qid, keys in batch.items():
                raw_env = txn.get(qid, db=self._envdb)
                if raw_env is None:
                    continue  # delivered, bounced or deleted since the scan
                env = _env_decode(raw_env)
                addrs = [r.address for r in env.recipients]
                rcpts: list[str] = []
                for jk in keys:
                    raw = txn.get(jk, db=self._job)
                    if raw is None:
                        continue
                    job = _job_decode(raw)
                    if not select(job, env):
                        continue
                    if job.claimed_by is not None and job.due > now and pid_alive(
                            job.claimed_by):
                        skipped += len(job.recipients)
                        continue
                    idx.remove(job_hash(job), job.due, jk)
                    txn.delete(jk, db=self._job)
                    rcpts += [addrs[i] if i < len(addrs) else f"#{i}" for i in job.recipients]
                if not rcpts:
                    continue
                if not self._has_jobs(txn, qid):
                    txn.delete(qid, db=self._msg)
                    txn.delete(qid, db=self._envdb)
                done.append((env, rcpts))
            idx.finish()
        return done, skipped

    def release_claims(
        self, shard: int | None = None, nshards: int = 1, *, only_dead: bool = True
    ) -> int:
        """Make claimed jobs due now; returns how many. Optional, for faster restarts.

        The lease already guarantees that a crashed worker's jobs come back (after
        ``lease`` seconds), so nothing is ever lost without this. A restarted worker
        may call it to resume its shard immediately: with ``only_dead`` (the default)
        only claims whose pid is no longer running are released, so claims of a live
        worker (e.g. one still on the old shard count during a reload) are kept and no
        delivery in flight gets duplicated. Scans all jobs: start-up only.
        """
        now = time.time()
        count = 0
        with self._env.begin(write=True) as txn:
            idx = _Index(self, txn)
            for k, v in list(txn.cursor(self._job)):
                job = _job_decode(v)
                if job.claimed_by is None:
                    continue
                h = job_hash(job)
                if shard is not None and h % nshards != shard:
                    continue
                if only_dead and pid_alive(job.claimed_by):
                    continue
                self._make_due(txn, idx, bytes(k), job, h, now)
                count += 1
            idx.finish()
        return count

    def verify(self) -> list[str]:
        """Cross-check the databases in one read transaction; returns the problems found.

        Invariants: every message has an envelope and at least one job; every job's
        message exists and its recipients index the envelope; every job has exactly the
        index entry derived from its ``due``, and every index entry has its job. An empty
        list means consistent. O(queue): for tests, ``relay queue check`` and after crashes.
        """
        problems: list[str] = []
        with self._env.begin() as txn:
            msgs = {bytes(k) for k in txn.cursor(self._msg).iternext(values=False)}
            envs = {}
            for k, v in txn.cursor(self._envdb):
                envs[bytes(k)] = len(_head_decode(v).recipients)
            expected_sched = set()
            first_due: dict[int, int] = {}
            with_jobs = set()
            for k, v in txn.cursor(self._job):
                jk = bytes(k)
                qid = jk.partition(_SEP)[0]
                job = _job_decode(v)
                with_jobs.add(qid)
                if qid not in msgs or qid not in envs:
                    problems.append(f"job {jk!r}: message or envelope missing")
                elif not job.recipients or max(job.recipients) >= envs[qid]:
                    problems.append(f"job {jk!r}: bad recipient indexes {job.recipients}")
                h = job_hash(job)
                expected_sched.add(_sched_key(job.due, h, jk))
                first_due[h] = min(first_due.get(h, _due_ms(job.due)), _due_ms(job.due))
            sched = {bytes(k) for k in txn.cursor(self._sched).iternext(values=False)}
            dsched = {bytes(k) for k in txn.cursor(self._dsched).iternext(values=False)}
        expected_dsched = {_DSCHED.pack(d, h) for h, d in first_due.items()}
        for qid in sorted(msgs ^ set(envs)):
            problems.append(f"message {qid!r}: bytes and envelope not both present")
        for qid in sorted(msgs - with_jobs):
            problems.append(f"message {qid!r}: no delivery job")
        for sk in sorted(expected_sched - sched):
            problems.append(f"job {sk[_SCHED_LEN:]!r}: no scheduler entry")
        for sk in sorted(sched - expected_sched):
            problems.append(f"scheduler entry {sk!r}: no matching job")
        for dk in sorted(expected_dsched ^ dsched):
            problems.append(f"domain scheduler entry {_DSCHED.unpack(dk)} wrong or missing")
        return problems

    # ------------------------------------------------------------------ operator views

    def stats(self, top: int = 10) -> QueueStats:
        """Queue summary in one read transaction (scans jobs and envelopes: O(queue))."""
        now = time.time()
        now_ms = _due_ms(now)
        jobs = due = deferred = in_flight = recipients = 0
        per_domain: dict[str, list[int]] = {}
        with self._env.begin(buffers=True) as txn:
            for _, v in txn.cursor(self._job):
                job = _job_decode(v)
                jobs += 1
                n = len(job.recipients)
                recipients += n
                if job.claimed_by is not None and job.due > now:
                    in_flight += 1
                elif _due_ms(job.due) <= now_ms:
                    due += 1
                else:
                    deferred += 1
                d = per_domain.get(job.domain)
                if d is None:
                    per_domain[job.domain] = [1, n]
                else:
                    d[0] += 1
                    d[1] += n
            messages = 0
            size = 0
            for _, v in txn.cursor(self._msg):
                messages += 1
                size += len(v)
            oldest: float | None = None
            for _, v in txn.cursor(self._envdb):
                t = _head_decode(v).received_at
                if oldest is None or t < oldest:
                    oldest = t
        best = heapq.nlargest(top, per_domain.items(), key=lambda kv: kv[1][1])
        return QueueStats(
            messages=messages,
            recipients=recipients,
            jobs=jobs,
            jobs_due=due,
            jobs_deferred=deferred,
            jobs_in_flight=in_flight,
            bytes=size,
            oldest_arrival=oldest,
            top_domains=[DomainCount(domain=d, messages=c[0], recipients=c[1]) for d, c in best],
            now=now,
        )

    def list_messages(
        self, domain: str | None = None, limit: int = 1000, after: str | None = None
    ) -> list[QueueEntry]:
        """Queued messages in queue-id (≈ arrival) order, like ``mailq``.

        ``domain`` keeps only messages with pending recipients there (and shows only that
        domain's job); ``after`` continues a listing after that queue id (paging).
        """
        now = time.time()
        dom = domain.lower().rstrip(".") if domain is not None else None
        out: list[QueueEntry] = []
        with self._env.begin(buffers=True) as txn:
            cur = txn.cursor(self._job)
            ok = cur.set_range(after.encode("ascii") + b"\x01") if after else cur.first()
            current: bytes | None = None
            doms: list[DeliveryJob] = []

            def flush() -> None:
                if current is None or not doms:
                    return
                raw_env = txn.get(current, db=self._envdb)
                data = txn.get(current, db=self._msg)
                head = _head_decode(raw_env) if raw_env is not None else None
                addrs = [r.address for r in head.recipients] if head else []
                out.append(
                    QueueEntry(
                        queue_id=current.decode(),
                        sender=head.sender if head else "",
                        arrival=head.received_at if head else 0.0,
                        size=len(data) if data is not None else 0,
                        pending=sum(len(j.recipients) for j in doms),
                        domains=[_queue_domain(j, addrs, now) for j in doms],
                    )
                )

            while ok:
                k = bytes(cur.key())
                qid = k.partition(_SEP)[0]
                if qid != current:
                    flush()
                    current, doms = qid, []
                    if len(out) >= limit:
                        current = None
                        break
                job = _job_decode(cur.value())
                if dom is None or job.domain == dom:
                    doms.append(job)
                ok = cur.next()
            flush()
        return out[:limit]

    def show(self, queue_id: str) -> MessageDetail | None:
        """Everything about one message, or None if it is not queued."""
        qid = queue_id.encode("ascii")
        with self._env.begin() as txn:
            raw_env = txn.get(qid, db=self._envdb)
            data = txn.get(qid, db=self._msg, default=None)
            if raw_env is None:
                return None
            jobs = [j for _, j in self._jobs_of(txn, qid)]
            size = len(data) if data is not None else 0
            head = bytes(data[: 64 * 1024]) if data is not None else b""
        end = head.find(b"\r\n\r\n")
        if end >= 0:
            head = head[: end + 2]
        return MessageDetail(
            queue_id=queue_id,
            envelope=_env_decode(raw_env),
            size=size,
            jobs=jobs,
            headers=head.decode("utf-8", "replace"),
        )


def _queue_domain(job: DeliveryJob, addrs: list[str], now: float) -> QueueDomain:
    return QueueDomain(
        domain=job.domain,
        pending=[addrs[i] if i < len(addrs) else f"#{i}" for i in job.recipients],
        attempts=job.attempts,
        next_due=job.due,
        in_flight=job.claimed_by is not None and job.due > now,
        first_attempt=job.first_attempt,
        last_error=job.last_error,
    )


def pid_alive(pid: int) -> bool:
    """Is the claiming process still running? A zombie is dead: after ``kill -9`` of a
    whole relay its workers are orphans, and where nothing reaps orphans (PID 1 in a
    container) they stay zombies that ``kill(pid, 0)`` still finds."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return True  # no /proc: trust kill(0)
    return state not in (b"Z", b"X")
    return True
