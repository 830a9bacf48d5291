"""The durable queue: one LMDB environment shared by all worker processes.

Inbound stores each accepted message with a synced commit before it answers 250
(``GroupCommitWriter.submit``, many sessions per commit). Outbound claims due delivery
jobs of its shard (``Spool.due_jobs``), loads the message (``Spool.load``) and records
the outcome, bounces included, atomically (``Spool.complete`` in a thread, or better
``GroupCommitWriter.submit_completion``, which shares the inbound commits' fsync).
Every LMDB write transaction is synced and LMDB has ONE writer lock for all processes,
so the number of write transactions per second is the budget to spend carefully.

Process model
-------------
Every worker opens its own ``Spool`` after ``fork()`` (``lock=True``, ``sync=True``,
``metasync=True``, ``writemap=False`` (see ``Spool``), ``readahead=False``,
``max_dbs=16``, a large ``map_size``) and calls ``reader_check()`` on open to free reader
slots of crashed workers. LMDB serialises write transactions across processes with a
robust mutex, so any worker may write at any time. Nothing is shared in memory; a
wake-up after commit (``on_commit``) is only a hint, the LMDB scheduler index is the
truth.

Schema (version ``SCHEMA_VERSION`` = 1), named databases
--------------------------------------------------------
Keys are bytes; ``qid`` is the ASCII queue id (18 chars, time-sortable, see
``relay.spool.queueid``); ``domain`` is the lower-cased routing domain in UTF-8.

``meta``
    ``b"schema_version"`` -> ASCII integer. Opening a spool with a newer version raises
    ``SpoolVersionError``; an older one is upgraded in place (none exists yet).
``msg``
    ``qid`` -> message bytes exactly as received (Received header added, CRLF, dot-
    unstuffed). Big values live in LMDB overflow pages.
``env``
    ``qid`` -> msgspec msgpack of ``Envelope`` (sender, recipients with DSN
    parameters, client info).
``job``
    ``qid + b"\\0" + domain`` -> msgspec msgpack of ``DeliveryJob``: the indexes of the
    envelope recipients in that routing domain still to deliver, ``due``, ``attempts``,
    ``first_attempt``, ``last_error``, ``claimed_by``. One job per (message, domain);
    the jobs of a message are adjacent (prefix ``qid + b"\\0"``), which is how
    ``complete`` sees that a message is finished (no job left -> delete ``msg``/``env``).
``sched``
    ``u32be(crc32(key)) + u64be(due in ms) + qid + b"\\0" + domain`` -> ``b""``, where
    ``key`` is the job's ``shard_key`` if set, else its domain (``job_hash``).
    The scheduler index: per hash, the jobs in due order. Every job has exactly
    one entry, derived from its stored ``due`` (always recomputed from the job record).
``dsched``
    ``u64be(earliest due in ms) + u32be(crc32(domain))`` -> ``b""``: one entry per
    domain hash that has jobs, ordered by that domain's earliest due time (claimed jobs
    count with their lease expiry). Kept exact inside every write transaction.
``idem``
    idempotency key (the HTTP API's ``Idempotency-Key`` scoped by tenant) ->
    ``u64be(written, ms)`` + the answer to repeat. Written in the same transaction as
    the messages of the request (``Guarded``), so a retried request is either answered
    from here or stored for the first time, never both; old records are purged.
``supp``
    ``tenant + b"\\0" + address.lower()`` -> msgpack ``Suppression``: the suppression
    list (``relay.spool.suppression``); tenant ``""`` is every tenant.

    A worker of ``shard`` out of ``nshards`` walks ``dsched`` from the start while the
    due time is <= now, keeps hashes with ``hash % nshards == shard`` (``shard_of``),
    and reads each such domain's due jobs from ``sched``, round robin across domains.
    The hash is stored, not the shard number, so a changed worker count needs no
    migration; and a huge due backlog of one domain (a throttled big provider) costs
    the other workers one ``dsched`` step, not one step per job. ``next_due`` is the
    first ``dsched`` entry of the shard.

    A destination that spans domains (a provider rollup) is owned by the worker of its
    key's hash: the worker that claims such a job elsewhere hands it over
    (``hand_over``: ``shard_key`` = the destination key, re-indexed, due now), so each
    destination's limits live in exactly one process.

Leases instead of locks
-----------------------
``due_jobs`` claims a job by moving its ``due`` to ``now + lease`` and setting
``claimed_by`` (pid), in one synced transaction. If the worker dies the job simply
becomes due again when the lease expires: at-least-once delivery, duplicates only for
transactions in flight at the crash. ``release_claims`` (optional, start-up) hands the
claims of dead pids back immediately. A job of the receiving worker's own shard is
usually stored already claimed by the group commit that stores it (``Claimant``), and
handed to that worker's engine in memory: same record, no second transaction.
``complete`` removes delivered/failed recipients, reschedules deferred ones, stores DSNs
in the same transaction, and clears the claim.
"""

from relay.model import DeliveryJob, Envelope, NewMessage, Recipient
from relay.spool.queueid import QUEUE_ID_LENGTH, new_queue_id, queue_id_time
from relay.spool.store import (
    SCHEMA_VERSION,
    Claimant,
    Completion,
    DuplicateQueueId,
    MessageNotFound,
    Spool,
    SpoolError,
    SpoolVersionError,
    job_hash,
    pid_alive,
    shard_hash,
    shard_of,
)
from relay.spool.views import DomainCount, MessageDetail, QueueDomain, QueueEntry, QueueStats
from relay.spool.writer import GroupCommitWriter, SpoolClosed

__all__ = [
    "QUEUE_ID_LENGTH",
    "SCHEMA_VERSION",
    "Claimant",
    "Completion",
    "DeliveryJob",
    "DomainCount",
    "DuplicateQueueId",
    "Envelope",
    "GroupCommitWriter",
    "MessageDetail",
    "MessageNotFound",
    "NewMessage",
    "QueueDomain",
    "QueueEntry",
    "QueueStats",
    "Recipient",
    "Spool",
    "SpoolClosed",
    "SpoolError",
    "SpoolVersionError",
    "job_hash",
    "new_queue_id",
    "pid_alive",
    "queue_id_time",
    "shard_hash",
    "shard_of",
]
