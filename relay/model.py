"""The records every layer shares, and the lexical basics they are read with.

The bottom of the dependency graph: it imports nothing else of ``relay``, so the
protocol core (``relay.smtp``), the spool, the outcome judgement and the delivery engine
can all speak in these terms without importing each other.

The spool stores ``Envelope`` and ``DeliveryJob`` as msgpack: fields are only ever added
with defaults (never renamed or retyped), so a spool written by an older version still
decodes after an upgrade.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

import msgspec

__all__ = [
    "Completion",
    "DeliveryJob",
    "Envelope",
    "Learned",
    "NewMessage",
    "Recipient",
    "RecipientOutcome",
    "ascii_int",
    "ip_address",
]


def ascii_int(text: str | bytes | None, *, max_digits: int = 20) -> int | None:
    """The value of ``text`` if it is 1 to ``max_digits`` ASCII digits (no sign, no
    blanks, no underscores), else None. Never raises.

    ``str.isdigit()`` and ``int()`` accept far more than ASCII digits (``"²".isdigit()``
    is True yet ``int("²")`` raises; ``int("٣")`` is 3). Wire protocols and config files
    only have ASCII digits, so every number read from outside goes through this."""
    if not text or len(text) > max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


class Recipient(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One RCPT TO with its DSN parameters (RFC 3461), as the client gave them."""

    #: The forward path without angle brackets; the local part keeps its quoting.
    address: str
    #: NOTIFY keywords upper-cased ("NEVER" or a subset of SUCCESS, FAILURE, DELAY);
    #: None when the client sent no NOTIFY (the DSN default: FAILURE and DELAY).
    notify: list[str] | None = None
    #: ORCPT as "addr-type;xtext-decoded address", e.g. "rfc822;bob@example.com".
    orcpt: str | None = None

    @property
    def domain(self) -> str:
        """Routing domain: the part after the last '@', lower-cased, without a trailing dot."""
        return self.address.rpartition("@")[2].lower().rstrip(".")


class Envelope(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Everything about a message except its bytes."""

    queue_id: str
    #: Reverse path without brackets; "" is the null sender (a bounce: never bounced).
    sender: str
    recipients: list[Recipient]
    #: Unix time the 250 was sent for (arrival).
    received_at: float
    #: MAIL FROM parameters.
    body: str | None = None  # "7BIT" | "8BITMIME" | "BINARYMIME"
    smtputf8: bool = False
    declared_size: int | None = None
    ret: str | None = None  # "FULL" | "HDRS"
    envid: str | None = None
    #: Where it came from (for Received, the event log and abuse handling).
    client_ip: str = ""
    client_port: int = 0
    client_helo: str = ""
    auth_user: str | None = None
    #: e.g. "TLSv1.3 TLS_AES_256_GCM_SHA384"; None for plaintext.
    tls: str | None = None
    #: SMTP/ESMTP/ESMTPS/ESMTPA/ESMTPSA (RFC 3848), as written in Received.
    protocol: str = "ESMTP"
    #: Set on DSNs the relay generated itself, so they are never bounced again.
    is_bounce: bool = False
    #: Who sent it, for accounting: the tenant of the HTTP API key, or of the SMTP
    #: tenant header (``inbound.tenant_header``); None when unknown.
    tenant: str | None = None
    #: The sender's campaign (SparkPost ``campaign_id``, or ``inbound.campaign_header``).
    campaign_id: str | None = None
    #: The sender's own data about this message (SparkPost ``metadata``), carried into
    #: every event about it.
    metadata: dict[str, Any] | None = None
    tags: list[str] | None = None
    #: The egress pool asked for (SparkPost ``options.ip_pool``).
    ip_pool: str | None = None
    #: Sent as transactional (SparkPost ``options.transactional``): not bulk mail.
    transactional: bool = False


class NewMessage(msgspec.Struct, kw_only=True):
    """What inbound hands the spool's group-commit writer: envelope plus final bytes
    (Received and Message-ID already added, CRLF line endings, dot-unstuffed)."""

    envelope: Envelope
    data: bytes


class DeliveryJob(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The recipients of one message that share a routing domain: the unit the scheduler
    hands to outbound. A message with recipients in three domains has three jobs."""

    queue_id: str
    domain: str
    #: Indexes into Envelope.recipients still to be delivered for this domain.
    recipients: list[int]
    #: Unix time of the next attempt.
    due: float
    attempts: int = 0
    #: Unix time of the first attempt (None before the first).
    first_attempt: float | None = None
    #: Last transient error, for `relay queue show` and the event log.
    last_error: str | None = None
    #: PID of the worker holding the delivery lease (set by ``Spool.due_jobs``, cleared by
    #: ``Spool.complete``). While set, ``due`` is the lease expiry, not a retry time.
    claimed_by: int | None = None
    #: The destination key the job is sharded by when it is not its domain (a provider
    #: rollup): set by ``Spool.hand_over``, so the one worker owning that destination
    #: delivers it and that destination's limits hold at any worker count.
    shard_key: str | None = None
    #: An operator asked for this job to be retried now (``relay queue retry``): it is
    #: tried even if its destination is backed off (which lifts the backoff, as
    #: Postfix's ``postqueue -f`` does). Cleared by the next outcome.
    forced: bool = False
    #: The egress pool its message was given at intake (``Envelope.ip_pool``); None =
    #: no pools configured then (the default source).
    pool: str | None = None


class Learned(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A path's limits learned by the closed loop (``relay.outcomes.shaping``), kept over a
    restart in the spool (``relay.spool.shaping``)."""

    #: Messages per second the path may send; None = its configured limit.
    rate: float | None = None
    connections: int | None = None
    #: Additive step of the rate (per ``clean_interval``), fixed at the last cut.
    step: float = 0.0
    #: Unix time of the last change.
    changed: float = 0.0
    #: The path has seen pushback since it started (slow start is over).
    cut: bool = False


def ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an IP address, an IPv4-mapped IPv6 one (``::ffff:192.0.2.1``) as the
    IPv4 address it stands for; None when it is not an address."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class RecipientOutcome(msgspec.Struct, frozen=True):
    """What happened to one recipient in one transaction.

    ``index`` points into ``Envelope.recipients``. ``code``/``enhanced``/``text`` are the
    remote reply that decided it, or a local one (``421 4.4.2 lost connection ...``,
    ``552 5.3.4 message too big ...``) when the failure never reached the server.
    ``ambiguous``: the connection was lost after the end of data was sent and before
    its reply came: the message may have been delivered.
    """

    index: int
    code: int
    enhanced: str | None
    text: str
    ambiguous: bool = False

    @property
    def kind(self) -> Literal["delivered", "transient", "permanent"]:
        if 200 <= self.code < 300:
            return "delivered"
        if 500 <= self.code < 600:
            return "permanent"
        return "transient"

    @property
    def reply_line(self) -> str:
        if self.enhanced:
            return f"{self.code} {self.enhanced} {self.text}".rstrip()
        return f"{self.code} {self.text}".rstrip()


class Completion(msgspec.Struct, kw_only=True):
    """The outcome of one delivery attempt of job (queue_id, domain); see
    ``Spool.complete`` for the meaning of each field. Batched by ``Spool.complete_many``
    and ``GroupCommitWriter.submit_completion`` (many completions, one fsync)."""

    queue_id: str
    domain: str
    delivered: list[int] = []
    failed: list[int] = []
    deferred: list[int] = []
    next_due: float | None = None
    attempts: int = 0
    error: str | None = None
    first_attempt: float | None = None
    new_messages: list[NewMessage] = []
