"""The suppression stage: recipients on the suppression list are dropped at intake.

Each recipient of a message is looked up for the message's tenant (its own entries and
the operator-wide ones; ``relay.spool.suppression``), for transactional or campaign mail
as the envelope says. A blocked recipient is taken out of the envelope and listed in
``Admission.dropped``; the intake records a ``Suppressed`` event for it and stores the
message for the others only. A message left with no recipient is not stored at all
(the carrier still answers as for an accepted message: SMTP cannot refuse one recipient
after DATA; the HTTP API reports the recipient as ``suppressed``). SMTP refuses what it
can already at RCPT (``[suppression] smtp``): this stage catches what only the message
tells, its tenant header.

DSNs are not checked: they go to the sender of a message we accepted.
"""

from __future__ import annotations

from typing import Protocol

from relay.intake.admission import Admission

__all__ = ["SuppressionCheck", "SuppressionLookup"]


class SuppressionLookup(Protocol):
    """What the stage needs of the list (``SuppressionList.blocking``)."""

    def blocking(self, tenant: str | None, addresses: list[str], *,
                 transactional: bool = False, now: float | None = None) -> dict: ...


class SuppressionCheck:
    def __init__(self, lookup: SuppressionLookup) -> None:
        self.lookup = lookup

    def admit(self, msg: Admission) -> None:
        if msg.via == "dsn":
            return
        env = msg.envelope
        blocked = self.lookup.blocking(env.tenant, [r.address for r in env.recipients],
                                       transactional=env.transactional, now=env.received_at)
        if not blocked:
            return
        msg.dropped.extend((a, blocked[a].source) for a in blocked)
        env.recipients = [r for r in env.recipients if r.address not in blocked]
