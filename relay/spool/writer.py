"""Group commit: many SMTP sessions share one synced LMDB commit.

A synced commit costs about one fsync whatever it holds, so the writer commits the
messages of every session that finished DATA at about the same time together:

* ``submit(msg)`` encodes the message (errors go to that caller only), appends it to
  the open batch and waits for that batch's commit.
* ``run()`` waits for a non-empty batch, then up to ``commit_window`` seconds more for it
  to fill (it stops waiting as soon as it holds ``max_batch`` messages, or when no new
  message came for a quarter of the window: the burst is over), closes it and
  commits it in ONE ``trio.to_thread.run_sync`` call (begin, puts, synced commit all in
  that thread, as py-lmdb requires). Submissions arriving meanwhile go into the next
  batch, so under load batches grow by themselves to whatever arrives during one fsync,
  and at low load a message waits about ``commit_window`` + one fsync.
* After the commit, every waiter of the batch wakes at once (one ``trio.Event`` per
  batch), the ``claimant`` (the worker's own delivery engine, see ``Claimant``) gets
  the jobs it asked to have stored claimed, and ``on_commit(messages)`` runs in the
  trio thread (e.g. to wake the worker that owns the recipients' shard).

Outbound completions (``submit_completion``: delivered/failed/deferred recipients and
their DSNs) ride in the same batches: a delivery outcome needs a synced commit too
(else a crash re-delivers), and LMDB has one writer lock for all processes, so one
fsync per completion would cap the whole machine at ~1/fsync-latency deliveries/s.
A completion does not make its submitter wait: ``on_done`` is called from the commit
instead, so a delivery connection goes on with its next message meanwhile.

Logs (``flush_logs``, the worker's event and mail logs, which batch their writes per
scheduler pass): flushed right before each commit, so the events of the outcomes a
commit records are on file first (a kill -9 between the two leaves an event for an
outcome that is retried, never a recorded outcome without one), and right after the
``on_stored``/``on_done`` callbacks, so the Reception lines of a batch are on file in
one write before any of its sessions answers 250.

Shutdown: ``await writer.aclose()`` refuses new submissions (``SpoolClosed``), commits
everything already submitted, and makes ``run`` return; then cancel the nursery as
usual. If ``run`` is cancelled instead, a commit already in its thread still finishes
(and its waiters get their answer), and every batch not yet committed fails its
waiters with ``SpoolClosed``: a session then answers 451, never 250, never hangs.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence

import trio

from relay.events.metrics import Metrics
from relay.model import DeliveryJob, Envelope, NewMessage
from relay.spool.store import (
    Claimant,
    Completion,
    Guarded,
    Spool,
    SpoolError,
    _Prepared,
    prepare,
    prepare_completion,
)

__all__ = ["GroupCommitWriter", "SpoolClosed"]

log = logging.getLogger(__name__)


class SpoolClosed(SpoolError):
    """The writer is shutting down or stopped: the message was not stored."""


class _Batch:
    __slots__ = ("claimed", "completions", "done", "error", "guarded", "messages", "on_done",
                 "prepared", "size")

    def __init__(self) -> None:
        #: Every message this commit stores: inbound ones and DSNs from completions.
        self.messages: list[NewMessage] = []
        self.prepared: list = []
        self.completions: list = []
        #: One per completion: called with None once committed, else with the error.
        self.on_done: list[Callable[[BaseException | None], object]] = []
        #: Jobs stored claimed for the claimant, with their message.
        self.claimed: list[tuple[DeliveryJob, Envelope, bytes]] = []
        #: Idempotent groups (``submit_many`` with a guard): stored only if their key is new.
        self.guarded: list[tuple[Guarded, Sequence[NewMessage]]] = []
        self.size = 0
        self.done = trio.Event()
        self.error: BaseException | None = None

    def remember(self, msg: NewMessage, prepared: _Prepared) -> None:
        """``msg`` is stored by this commit: for ``on_commit``, and the jobs ``prepare``
        stored claimed for the claimant."""
        self.messages.append(msg)
        self.claimed.extend((job, msg.envelope, prepared[1]) for job in prepared[4])

    def stored_guarded(self) -> None:
        """After the commit: the guarded groups that were stored count as stored."""
        for g, msgs in self.guarded:
            if g.existing is None:
                for msg, p in zip(msgs, g.prepared, strict=True):
                    self.remember(msg, p)


class GroupCommitWriter:
    """Batches ``submit``ted messages into shared synced commits (see module docstring).

    One writer per worker process, running in that process's trio nursery::

        writer = GroupCommitWriter(spool, cfg.spool.commit_window,
                                   cfg.spool.commit_max_messages, on_commit=wake)
        await nursery.start(writer.run)
        ...
        await writer.submit(NewMessage(envelope=env, data=data))   # then send 250
        ...
        await writer.aclose()

    Outbound records delivery outcomes through the same writer
    (``submit_completion``), so deliveries and receptions share fsyncs too.
    ``on_commit(messages)`` gets every message the commit stored, DSNs included.

    It reports to ``metrics`` (the worker's registry): ``spool_commits``,
    ``spool_messages_committed`` (inbound), ``spool_completions_committed`` and
    ``spool_commits_failed``, and the histograms ``spool_commit_seconds`` and
    ``spool_commit_batch_size``.
    """

    def __init__(
        self,
        spool: Spool,
        commit_window: float = 0.002,
        max_batch: int = 512,
        on_commit: Callable[[Sequence[NewMessage]], object] | None = None,
        claimant: Claimant | None = None,
        metrics: Metrics | None = None,
        flush_logs: Callable[[], object] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.spool = spool
        self.commit_window = commit_window
        self.max_batch = max_batch
        self.on_commit = on_commit
        #: May be set after construction (the engine is built with the writer).
        self.claimant = claimant
        self._batches: deque[_Batch] = deque()
        self._pending = trio.Event()  # set when _batches is non-empty
        self._full = trio.Event()  # set when the head batch holds max_batch messages
        self._closing = False
        self._stopped = trio.Event()
        self.metrics = metrics if metrics is not None else Metrics()
        self.flush_logs = flush_logs
        # Our own thread slot: outbound threads blocked on LMDB's writer lock must never
        # keep the commit from getting a thread.
        self._limiter = trio.CapacityLimiter(1)

    async def submit(self, msg: NewMessage,
                     on_stored: Callable[[], object] | None = None) -> None:
        """Return once ``msg`` is in a synced, committed transaction. ``on_stored()``
        runs in the writer's task right after that commit (not if it failed), before
        any waiter of the batch runs: the place for the Reception event.

        Raises ValueError for a message the spool refuses (no recipients, bad queue id),
        SpoolClosed during shutdown, SpoolError if the commit failed (disk full, map
        full, I/O error): then the caller answers 451 4.3.0. If the caller is cancelled
        while waiting, the message may still be committed (and delivered); that is the
        ordinary SMTP duplicate window (RFC 1047), never a loss.
        """
        if self._closing:
            raise SpoolClosed("spool writer is shutting down")
        prepared = prepare(msg, claimant=self.claimant)
        batch = self._enqueue()
        batch.prepared.append(prepared)
        batch.remember(msg, prepared)
        if on_stored is not None:
            batch.on_done.append(lambda error: error is None and on_stored())
        await self._wait(batch)

    async def submit_many(self, msgs: Sequence[NewMessage],
                          guard: tuple[bytes, bytes, float] | None = None,
                          on_stored: Callable[[], object] | None = None) -> bytes | None:
        """``submit`` for several messages that must share one commit (an HTTP request's
        recipients: one fsync for the request, and its answer covers all of them). They
        all go into the open batch, even past ``max_batch``. Every message is encoded
        before any is queued, so a ValueError stores none of them.

        ``guard`` = (idempotency key, record, fresh_after) stores the messages only if
        the key has no record since ``fresh_after``, together with ``record``; when it
        has one, nothing is stored and that record is returned (``Spool.write_prepared``).
        The check is inside the commit, so two workers racing with the same key store
        the messages once. ``on_stored()`` as for ``submit`` (at once when there is
        nothing to store; not when the guard's key was used)."""
        if self._closing:
            raise SpoolClosed("spool writer is shutting down")
        if not msgs and guard is None:
            if on_stored is not None:
                on_stored()
            return None
        prepared = [prepare(msg, claimant=self.claimant) for msg in msgs]
        batch = self._enqueue(max(len(msgs), 1))
        if guard is None:
            batch.prepared.extend(prepared)
            for msg, p in zip(msgs, prepared, strict=True):
                batch.remember(msg, p)
            if on_stored is not None:
                batch.on_done.append(lambda error: error is None and on_stored())
            await self._wait(batch)
            return None
        guarded = Guarded(guard[0], guard[1], prepared, guard[2])
        batch.guarded.append((guarded, msgs))
        if on_stored is not None:
            batch.on_done.append(
                lambda error: error is None and guarded.existing is None and on_stored())
        await self._wait(batch)
        return guarded.existing

    def submit_completion(self, completion: Completion,
                          on_done: Callable[[BaseException | None], object]) -> None:
        """``Spool.complete`` through the group commit, without waiting: the outcome (and
        its DSNs, atomically with it) goes into the open batch, and ``on_done(None)`` runs
        in the writer's task right after that batch's commit; ``on_done(error)`` if the
        commit failed or the writer stopped first (the job then stays claimed until its
        lease ends: a possible duplicate delivery, never a loss). Completions and inbound
        messages of the same moment share one fsync. Raises SpoolClosed during shutdown
        and ValueError for a record the spool refuses, like ``submit``.
        """
        if self._closing:
            raise SpoolClosed("spool writer is shutting down")
        prepared = prepare_completion(completion, self.claimant)
        batch = self._enqueue()
        batch.completions.append(prepared)
        batch.on_done.append(on_done)
        for msg, p in zip(completion.new_messages, prepared[1], strict=True):
            batch.remember(msg, p)

    def _enqueue(self, count: int = 1) -> _Batch:
        batches = self._batches
        if not batches or batches[-1].size >= self.max_batch:
            batches.append(_Batch())
        batch = batches[-1]
        batch.size += count
        self._pending.set()
        if batch.size >= self.max_batch or len(batches) > 1:
            self._full.set()
        return batch

    async def _wait(self, batch: _Batch) -> None:
        await batch.done.wait()
        if batch.error is not None:
            if isinstance(batch.error, SpoolError):
                raise batch.error
            raise SpoolError(f"spool commit failed: {batch.error!r}") from batch.error

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The commit loop; returns after ``aclose()`` once everything is committed."""
        task_status.started()
        try:
            while True:
                if not self._batches:
                    if self._closing:
                        return
                    self._pending = trio.Event()
                    await self._pending.wait()
                    continue
                head = self._batches[0]
                if self.commit_window > 0:
                    await self._linger(head)
                self._batches.popleft()
                await self._commit(head)
        finally:
            err = SpoolClosed("spool writer stopped before this message was committed")
            while self._batches:
                b = self._batches.popleft()
                b.error = err
                b.done.set()
                self._call_on_done(b)
            self._closing = True
            self._stopped.set()

    async def _linger(self, head: _Batch) -> None:
        """Wait up to ``commit_window`` for ``head`` to fill, but stop early when it is
        full, when shutdown starts, or when a quarter of the window passes without a new
        submission: waiting longer for a burst that has ended only adds latency (and in
        a closed loop, where every client is already in the batch, halves throughput).
        """
        deadline = trio.current_time() + self.commit_window
        gap = self.commit_window / 4
        while (
            head.size < self.max_batch
            and len(self._batches) == 1
            and not self._closing
        ):
            before = head.size
            self._full = trio.Event()
            with trio.move_on_at(min(deadline, trio.current_time() + gap)):
                await self._full.wait()
            if head.size == before or trio.current_time() >= deadline:
                return

    async def _commit(self, batch: _Batch) -> None:
        started = trio.current_time()
        self._flush_logs()  # the events of these outcomes are written before their commit
        try:
            await trio.to_thread.run_sync(
                self.spool.write_prepared, batch.prepared, batch.completions,
                [g for g, _ in batch.guarded], limiter=self._limiter,
            )
        except BaseException as e:
            # A Cancelled cannot reach here mid-commit (the thread is not abandoned), so
            # any exception is the commit's own failure: nothing was written.
            batch.error = e
            self.metrics.inc("spool_commits_failed")
            batch.done.set()
            self._call_on_done(batch)
            self._flush_logs()
            if isinstance(e, Exception):
                log.error("spool commit of %d items failed: %r", batch.size, e)
                return
            raise
        batch.stored_guarded()
        self.metrics.observe("spool_commit_seconds", trio.current_time() - started)
        self.metrics.observe("spool_commit_batch_size", batch.size)
        self.metrics.inc("spool_commits")
        self.metrics.inc("spool_messages_committed", len(batch.prepared) + sum(
            len(g.prepared) for g, _ in batch.guarded if g.existing is None))
        self.metrics.inc("spool_completions_committed", len(batch.completions))
        batch.done.set()
        self._call_on_done(batch)
        self._flush_logs()  # the Reception lines of the batch, before any 250 goes out
        if self.claimant is not None and batch.claimed:
            try:
                self.claimant.adopt(batch.claimed)
            except Exception:
                # The jobs stay claimed in the spool: their lease brings them back.
                log.exception("handing %d claimed jobs to delivery failed", len(batch.claimed))
        if self.on_commit is not None and batch.messages:
            try:
                self.on_commit(batch.messages)
            except Exception:
                log.exception("spool on_commit callback failed")

    def _flush_logs(self) -> None:
        if self.flush_logs is not None:
            try:
                self.flush_logs()
            except Exception:
                log.exception("writing the event logs failed")

    @staticmethod
    def _call_on_done(batch: _Batch) -> None:
        for on_done in batch.on_done:
            try:
                on_done(batch.error)
            except Exception:
                log.exception("completion callback failed")

    async def aclose(self) -> None:
        """Stop accepting, commit what was submitted, wait for ``run`` to return."""
        self._closing = True
        self._pending.set()
        self._full.set()
        await self._stopped.wait()
