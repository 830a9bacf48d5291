"""``Intake``: the stages, the group commit, the Reception event (package docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import trio

from relay.events import EventBus, Reception, event_tags
from relay.intake.admission import Admission
from relay.model import NewMessage
from relay.spool import GroupCommitWriter

__all__ = ["Intake", "Stage"]


class Stage(Protocol):
    """One step of admission: may add ``head`` lines, replace the envelope, or raise
    ``Refused``. Must be quick and do no I/O (it runs for every message)."""

    def admit(self, msg: Admission) -> None: ...


class Intake:
    """The one way into the spool (one per worker; rebuilt on reload with new stages)."""

    def __init__(self, stages: Sequence[Stage], writer: GroupCommitWriter,
                 events: EventBus) -> None:
        self.stages = list(stages)
        self.writer = writer
        self.events = events

    def prepare(self, msg: Admission) -> NewMessage:
        """Run every stage (``Refused`` propagates); the message as it will be stored."""
        for stage in self.stages:
            stage.admit(msg)
        return NewMessage(envelope=msg.envelope, data=msg.final)

    async def admit(self, msg: Admission) -> NewMessage:
        """Stages, then the durable commit, then ``Reception``. Raises ``Refused``, or
        the writer's errors (``SpoolError``, ``ValueError``): nothing was stored."""
        stored = self.prepare(msg)
        started = trio.current_time()
        await self.writer.submit(stored)
        env = stored.envelope
        self.events.emit(Reception(
            queue_id=env.queue_id, time=env.received_at, sender=env.sender,
            recipients=[r.address for r in env.recipients], size=len(stored.data),
            client_ip=env.client_ip, helo=msg.helo, auth_user=env.auth_user, tls=env.tls,
            commit_seconds=round(trio.current_time() - started, 6), **event_tags(env),
        ))
        return stored
