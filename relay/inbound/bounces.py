"""Mail for the bounce domain: taken by the SMTP listener for us, never relayed.

With ``[bounces] domain`` set, a RCPT TO at that domain is for this relay, whoever the
client is (a mailbox provider's MTA returning a bounce is not one of our clients): a
VERP address whose MAC verifies (``relay.outcomes.verp``) and the configured
``complaint_addresses`` are accepted; any other address there is refused with 550 5.1.1
(so a forged or stale address costs the forger a refusal, not a parse).

At the end of data the message is not queued: ``parse_report`` reads it (in a worker
thread), each of its bounce-domain recipients makes one ``OOB`` or ``Complaint`` event
(``relay.outcomes.oob``: linked to the original message and recipient), the events are
published, and the suppression writes they cause are committed (``SuppressionFeed``)
before the 250. If that commit fails the client gets 451 4.3.0 and sends it again;
nothing else about a report fails it: mail that cannot be understood or linked is still
taken with 250 (it was for us) and recorded as an event saying why.

A transaction may mix bounce-domain recipients with ordinary ones (a trusted client
writing to both): the ordinary ones are admitted through the intake as any mail (relay
policy was applied to each at RCPT), then the report is recorded; one 250 answers for
both. If the intake refuses, the whole transaction is refused and nothing is recorded
(the client tries again or bounces it). Choice: RCPT cannot refuse the mix without
tracking each transaction's recipients in the session, and the split loses nothing.

The 250 names a queue id of its own (``report_id`` on the events) when nothing was
queued, so a report can be found in the log by what its sender was told.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import trio

from relay.config import BouncesConfig
from relay.events import EventBus
from relay.events.suppress_feed import SuppressionFeed
from relay.events.types import OOB, Complaint
from relay.model import Recipient
from relay.outcomes.classify import Classifier
from relay.outcomes.oob import judge_report, link_report, parse_report
from relay.outcomes.verp import Verp

__all__ = ["BounceMailbox"]

log = logging.getLogger("relay.inbound")


class BounceMailbox:
    """See the module docstring. One per inbound context (rebuilt on reload)."""

    def __init__(self, config: BouncesConfig, *, events: EventBus, classifier: Classifier,
                 feed: SuppressionFeed | None = None) -> None:
        self.verp = Verp(config.domain, config.secret)
        self.secret = config.secret.encode()
        self.complaint_addresses = frozenset(a.lower() for a in config.complaint_addresses)
        self.events = events
        self.classifier = classifier
        self.feed = feed

    def claims(self, address: str) -> bool:
        """Whether ``address`` is for us (at the bounce domain, or a complaint address)."""
        return self.verp.is_ours(address) or address.lower() in self.complaint_addresses

    def accepts(self, address: str) -> bool:
        """Whether RCPT TO ``address`` (one we ``claims``) is taken: a complaint address,
        a return path whose MAC holds, and postmaster (RFC 5321 4.5.1: always; what
        arrives for it is recorded like an unlinked report)."""
        lowered = address.lower()
        return (lowered in self.complaint_addresses
                or lowered.partition("@")[0] == "postmaster"
                or self.verp.read(address) is not None)

    def split(self, recipients: Sequence[Recipient]) -> tuple[list[str], list[Recipient]]:
        """(the addresses that are for us, the recipients to relay)."""
        ours = [r.address for r in recipients if self.claims(r.address)]
        if not ours:
            return [], list(recipients)
        return ours, [r for r in recipients if not self.claims(r.address)]

    async def receive(self, data: bytes, addresses: Sequence[str], *, client_ip: str,
                      report_id: str) -> bool:
        """Record the report ``data`` sent to ``addresses``; False when its suppression
        writes could not be committed (answer 451: the client sends it again)."""
        report = await trio.to_thread.run_sync(parse_report, data)
        now = time.time()
        events: list[OOB | Complaint] = []
        for address in addresses:
            link = link_report(report, address, self.verp, self.secret, now)
            event = judge_report(report, link, classifier=self.classifier,
                                 bounce_address=address, client_ip=client_ip,
                                 report_id=report_id, now=now)
            events.append(event)
            _log(event)
        self.events.emit_many(events)
        return True if self.feed is None else await self.feed.flushed()


def _log(e: OOB | Complaint) -> None:
    what = "complaint" if isinstance(e, Complaint) else f"bounce report ({e.kind})"
    if e.queue_id:
        log.info("%s %s from %s about %s to <%s> (linked by %s)", e.report_id, what,
                 e.client_ip, e.queue_id, e.recipient, e.linked_by)
    else:
        log.warning("%s %s from %s to <%s> not linked to a message of ours: %s",
                    e.report_id, what, e.client_ip, e.bounce_address, e.note)
