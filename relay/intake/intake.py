"""``Intake``: the stages, the group commit, the Reception event (package docstring)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import trio

from relay.events import Event, EventBus, Reception, Suppressed, event_tags
from relay.intake.admission import Admission, Refused
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
        """Stages, then the durable commit, then ``Reception`` (emitted by the writer
        right after the commit, see ``GroupCommitWriter.submit``). Raises ``Refused``, or
        the writer's errors (``SpoolError``, ``ValueError``): nothing was stored. A
        message the stages left without recipients (all suppressed) is not stored: it is
        returned with none, and its ``Suppressed`` events are all that is recorded."""
        stored = self.prepare(msg)
        if stored.envelope.recipients:
            started = trio.current_time()
            await self.writer.submit(stored, on_stored=lambda: self.events.emit(
                _reception(msg, stored, trio.current_time() - started)))
        if msg.dropped:
            self.events.emit_many(_suppressed(msg))
        return stored

    def prepare_many(self, msgs: Sequence[Admission]) -> list[NewMessage | Refused]:
        """``prepare`` for each message: the message to store, or the ``Refused`` of
        the stage that refused it."""
        answers: list[NewMessage | Refused] = []
        for msg in msgs:
            try:
                answers.append(self.prepare(msg))
            except Refused as e:
                answers.append(e)
        return answers

    async def commit_many(self, msgs: Sequence[Admission],
                          answers: Sequence[NewMessage | Refused],
                          guard: tuple[bytes, bytes, float] | None = None) -> bytes | None:
        """The prepared ones of ``answers`` (``prepare_many(msgs)``) in ONE durable
        commit, then their ``Reception`` events. ``guard`` makes it idempotent
        (``GroupCommitWriter.submit_many``): when its key was already used, nothing is
        stored and the first request's record is returned. Raises the writer's errors
        (nothing was stored)."""
        stored = [(m, a) for m, a in zip(msgs, answers, strict=True)
                  if isinstance(a, NewMessage) and a.envelope.recipients]
        started = trio.current_time()

        def received() -> None:  # in the writer's task, right after the commit
            seconds = trio.current_time() - started
            events: list[Event] = [_reception(m, a, seconds) for m, a in stored]
            for m in msgs:
                events += _suppressed(m)
            self.events.emit_many(events)

        return await self.writer.submit_many([a for _, a in stored], guard,
                                             on_stored=received)


def _suppressed(msg: Admission) -> list[Suppressed]:
    env = msg.envelope
    return [Suppressed(queue_id=env.queue_id, time=env.received_at, recipient=address,
                       source=source, via=msg.via, **event_tags(env))
            for address, source in msg.dropped]


def _reception(msg: Admission, stored: NewMessage, commit_seconds: float) -> Reception:
    env = stored.envelope
    return Reception(
        queue_id=env.queue_id, time=env.received_at, sender=env.sender,
        recipients=[r.address for r in env.recipients], size=len(stored.data),
        client_ip=env.client_ip, helo=msg.helo, auth_user=env.auth_user, tls=env.tls,
        commit_seconds=round(commit_seconds, 6), via=msg.via, dkim=msg.dkim,
        dkim_reason=msg.dkim_reason, **event_tags(env),
    )
