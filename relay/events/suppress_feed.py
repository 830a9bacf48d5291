"""The suppression list that feeds itself: a bus subscriber over bounces and complaints.

``[bounces] auto_suppress = true`` subscribes a ``SuppressionFeed`` to the worker's bus.
Each in-session ``Bounce`` and ``Expiration`` (the engine's verdicts), ``OOB`` and
``Complaint`` (``relay.inbound.bounces``) linked to one of our messages is a strike
under the policy of ``[bounces.suppress]`` (``relay.outcomes.suppress``). The subscriber
only queues the strikes (the bus must not block); a background task commits them in
batches, whatever accumulated while the previous commit ran, in ONE synced write
transaction each (``SuppressionList.strike``: the "N within D" counts live in the spool,
so they survive restarts and every worker counts into the same records).

``flushed()`` waits until what is queued now is committed: the listener calls it so a
report's suppression is durable before its 250. At most ``max_pending`` strikes wait;
beyond that new ones are dropped with a warning (their events are still logged, so an
operator can replay them with ``relay suppress``). The worker of index 0 also purges the
count records whose window has passed, once an hour.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import trio

from relay.events.types import Event
from relay.outcomes.suppress import SuppressPolicy, strikes
from relay.spool.suppression import Strike, SuppressionList

__all__ = ["SuppressionFeed"]

log = logging.getLogger("relay.suppress")

PURGE_INTERVAL = 3600.0


class _Batch:
    __slots__ = ("done", "ok", "strikes")

    def __init__(self) -> None:
        self.strikes: list[Strike] = []
        self.done = trio.Event()
        self.ok = False


class SuppressionFeed:
    """See the module docstring. ``policy`` None: subscribed, but nothing counts (the
    switch is off; a reload may turn it on)."""

    def __init__(self, suppressions: SuppressionList, policy: SuppressPolicy | None, *,
                 max_pending: int = 100_000, purge: bool = False) -> None:
        self.suppressions = suppressions
        self.policy = policy
        self.max_pending = max_pending
        self.purge = purge
        self._open = _Batch()
        self._running: _Batch | None = None
        self._wake = trio.Event()
        self.dropped = 0

    def __call__(self, events: Sequence[Event]) -> None:
        """The bus subscriber: queue the strikes ``events`` make; never blocks."""
        if self.policy is None:
            return
        new = strikes(events, self.policy)
        if not new:
            return
        if len(self._open.strikes) + len(new) > self.max_pending:
            self.dropped += len(new)
            log.warning("suppression feed: %d strikes dropped (%d waiting for the spool)",
                        len(new), len(self._open.strikes))
            return
        self._open.strikes += new
        self._wake.set()

    async def flushed(self) -> bool:
        """Wait until the strikes queued so far are committed; whether that worked."""
        batch = self._open if self._open.strikes else self._running
        if batch is None:
            return True
        await batch.done.wait()
        return batch.ok

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Commit batches until cancelled (module docstring)."""
        task_status.started()
        next_purge = trio.current_time() + (PURGE_INTERVAL if self.purge else float("inf"))
        while True:
            with trio.move_on_at(next_purge):
                await self._wake.wait()
            self._wake = trio.Event()
            if self._open.strikes:
                await self._commit()
            if trio.current_time() >= next_purge:
                next_purge = trio.current_time() + PURGE_INTERVAL
                await self._purge()

    async def _commit(self) -> None:
        batch, self._open = self._open, _Batch()
        self._running = batch
        try:
            added = await trio.to_thread.run_sync(self.suppressions.strike, batch.strikes)
            batch.ok = True
        except Exception:
            log.exception("suppression feed: committing %d strikes failed; they are lost "
                          "(their events are in the event log)", len(batch.strikes))
            added = []
        finally:
            self._running = None
            batch.done.set()
        for entry in added:
            log.info("suppressed <%s> for tenant %r (%s): %s", entry.address, entry.tenant,
                     entry.source, entry.description)

    async def _purge(self) -> None:
        try:
            await trio.to_thread.run_sync(self.suppressions.purge_counts)
        except Exception:
            log.exception("suppression feed: purging old counts failed; trying again later")
