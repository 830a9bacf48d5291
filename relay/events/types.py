"""The events: one record per outcome, so an operator can account for every message.

Every record has ``type`` (Reception, Delivery, TransientFailure, Bounce, Expiration,
Suppressed, Unsubscribe, OOB, Complaint),
``time`` (Unix seconds) and ``queue_id``; the rest depends on the type. Fields are only
added with defaults, so a log written by an older version still decodes.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from relay.model import Envelope

__all__ = [
    "OOB",
    "AdminBounce",
    "Bounce",
    "Complaint",
    "Delivery",
    "Event",
    "Expiration",
    "Reception",
    "ShapingChange",
    "Suppressed",
    "TransientFailure",
    "Unsubscribe",
    "decode",
    "encode",
    "event_tags",
]


class _Event(msgspec.Struct, kw_only=True, omit_defaults=True, tag_field="type"):
    queue_id: str
    time: float = msgspec.field(default_factory=time.time)
    #: The message's accounting tags (``Envelope``): on every event about it, so an
    #: operator can account per tenant and campaign.
    tenant: str | None = None
    campaign_id: str | None = None
    metadata: dict[str, Any] | None = None
    tags: list[str] | None = None


class Reception(_Event, tag="Reception"):
    sender: str
    recipients: list[str]
    size: int
    client_ip: str
    helo: str = ""
    auth_user: str | None = None
    tls: str | None = None
    #: Seconds from the end of data to the durable commit.
    commit_seconds: float = 0.0
    #: What carried it: "smtp", "http", or "dsn" (one of ours).
    via: str = "smtp"
    #: The DKIM signatures added ("d=example.com s=s2024 a=rsa-sha256"); absent when none
    #: was. ``dkim_reason``: why the From: domain got none ("no signer for From: domain
    #: example.org", "no From: field", ...); absent when it got one, or DKIM is not set up.
    dkim: list[str] | None = None
    dkim_reason: str = ""


class _Attempt(_Event):
    """Common fields of a delivery attempt's outcome, one event per recipient."""

    recipient: str
    destination: str
    mx_host: str = ""
    ip: str = ""
    #: The remote reply ("250 2.0.0 Ok") or the local reason ("connection refused").
    reply: str = ""
    attempt: int = 1
    #: Seconds the attempt took (connect to reply) and since arrival.
    seconds: float = 0.0
    queued_seconds: float = 0.0
    #: The connection was lost after the end of data was sent: the message may have
    #: been delivered (a Delivery with this set was judged delivered by policy).
    ambiguous: bool = False
    #: The server's port (0: not reported) and the part of ``seconds`` spent setting the
    #: connection up (DNS, connect, greeting, EHLO, STARTTLS; 0 when this attempt reused
    #: an open connection or the engine did not measure it). The mail log's
    #: ``relay=mx[ip]:port`` and ``delays=a/b/c/d`` (relay.events.maillog).
    port: int = 0
    connect_seconds: float = 0.0


class Delivery(_Attempt, tag="Delivery"):
    pass


class TransientFailure(_Attempt, tag="TransientFailure"):
    #: Unix time of the next attempt.
    next_attempt: float = 0.0
    #: The failure's bounce class (Momentum's codes, relay.outcomes.classify: 21 DNS
    #: Failure, 50 Mail Block, 70 Transient Failure, ...) and the id of the rule that
    #: decided it (None: no rule matched). Also on Bounce and Expiration.
    bounce_class: int | None = None
    bounce_rule: str | None = None


class Bounce(_Attempt, tag="Bounce"):
    #: Queue id of the DSN sent to the sender, "" when none was sent (null sender, NOTIFY).
    dsn_queue_id: str = ""
    bounce_class: int | None = None
    bounce_rule: str | None = None


class Expiration(_Attempt, tag="Expiration"):
    dsn_queue_id: str = ""
    #: 24 (Timeout) and "expired", as Momentum classifies expirations.
    bounce_class: int | None = None
    bounce_rule: str | None = None


class Suppressed(_Event, tag="Suppressed"):
    """A recipient on the suppression list was dropped at intake (nothing sent)."""

    recipient: str
    #: Where the suppression entry came from ("unsubscribe", "manual", ...).
    source: str = ""
    via: str = "smtp"


class Unsubscribe(_Event, tag="Unsubscribe"):
    """A recipient unsubscribed (one-click, RFC 8058); ``queue_id`` is "" (the token
    names tenant, campaign and recipient, not the message)."""

    recipient: str
    client_ip: str = ""
    method: str = "one-click"


class ShapingChange(_Event, tag="ShapingChange"):
    """A path's limits changed (``queue_id`` is ""): a rule fired, the closed loop cut
    or raised them, an operator suspended or resumed, a source could not be bound.
    ``scope`` is the path (``SOURCE->DESTINATION``) or the operator's selector."""

    scope: str
    before: str = ""
    after: str = ""
    #: What caused it: the reply ("421 4.7.28 ..."), "clean interval", "admin", ...
    reason: str = ""
    #: The rule's id ("gmail-rate-4.7.28"), "adaptive", "admin" or "bind".
    rule: str = ""
    #: Unix time it ends (None: until resumed, or not a suspension).
    until: float | None = None


class AdminBounce(_Event, tag="AdminBounce"):
    """An operator bounced a queued recipient (``relay queue bounce``): no DSN."""

    recipient: str
    reason: str = ""
    selector: str = ""


class _Report(_Event):
    """Common fields of a report that came back to the bounce domain
    (relay.inbound.bounces): ``queue_id`` is the ORIGINAL message's ("" when the report
    could not be linked to one of ours), ``recipient`` its recipient it is about ("" when
    the report does not say); the tags are the original message's when known."""

    recipient: str = ""
    #: The address it came to (a VERP return path, a complaint address).
    bounce_address: str = ""
    #: The SMTP client that brought the report, and the id of our 250 to it.
    client_ip: str = ""
    report_id: str = ""
    #: How it was linked: "verp" (the address it came to), "return-path" (a VERP
    #: address in the returned headers), "reference" (the X-Relay-Ref header), "" none.
    linked_by: str = ""
    #: Why it was not linked or not understood ("" when it was).
    note: str = ""


class OOB(_Report, tag="OOB"):
    """An out-of-band bounce: a DSN (RFC 3464), a non-standard bounce, or another reply
    (an auto-reply) that came to the return path after the message was delivered."""

    #: "dsn", "non-standard" (found by flufl.bounce's detectors), "reply" (neither).
    kind: str = ""
    #: The DSN's Action ("failed", "delayed", ...); "" for a mere reply.
    action: str = ""
    #: The Status and the Diagnostic-Code ("5.1.1", "550 5.1.1 user unknown"), or the
    #: words of a non-standard bounce or of a reply.
    status: str = ""
    reply: str = ""
    reporting_mta: str = ""
    remote_mta: str = ""
    bounce_class: int | None = None
    bounce_rule: str | None = None


class Complaint(_Report, tag="Complaint"):
    """A feedback report (ARF, RFC 5965): a recipient reported the message."""

    #: The report's Feedback-Type ("abuse", "fraud", "not-spam", ...), User-Agent,
    #: Reporting-MTA and Source-IP.
    feedback_type: str = ""
    user_agent: str = ""
    reporting_mta: str = ""
    source_ip: str = ""


def event_tags(envelope: Envelope) -> dict[str, Any]:
    """The accounting fields of ``envelope`` that every event about it carries (only the
    ones set, so an untagged message's events stay as small as before)."""
    tags: dict[str, Any] = {}
    if envelope.tenant is not None:
        tags["tenant"] = envelope.tenant
    if envelope.campaign_id is not None:
        tags["campaign_id"] = envelope.campaign_id
    if envelope.metadata:
        tags["metadata"] = envelope.metadata
    if envelope.tags:
        tags["tags"] = envelope.tags
    return tags


Event = (Reception | Delivery | TransientFailure | Bounce | Expiration | Suppressed
         | Unsubscribe | ShapingChange | AdminBounce | OOB | Complaint)

encode = msgspec.json.Encoder().encode
decode = msgspec.json.Decoder(Event).decode
