"""The intake stages, in the order they run (``default_stages``).

Each is one small class whose ``admit`` may add header lines, change the envelope, or
raise ``Refused``. The order: the loop check, on the message as it arrived; the tag
headers (tenant, campaign); the suppression list (``relay.intake.suppress``), which needs
the tenant; the trace headers on top; one-click unsubscribe headers
(``relay.intake.unsubscribe``); the reference headers of bounce handling
(``relay.intake.reference``: X-Relay-Ref, Feedback-ID); DKIM signing
(``relay.intake.signing``) last, over the final bytes, so the unsubscribe headers and
Feedback-ID are signed.
"""

from __future__ import annotations

import logging

from relay.config import Config
from relay.intake.admission import Admission, Refused
from relay.intake.headers import (
    field_value,
    has_message_id,
    hop_count,
    received_header,
    without_fields,
)
from relay.intake.intake import Stage
from relay.intake.pools import PoolChoice
from relay.intake.reference import ReferenceHeaders
from relay.intake.signing import signing_stages
from relay.intake.suppress import SuppressionCheck, SuppressionLookup
from relay.intake.unsubscribe import UnsubscribeHeaders
from relay.smtp.replies import Reply

__all__ = ["LoopCheck", "MessageId", "TagHeaders", "TraceHeaders", "default_stages"]

log = logging.getLogger("relay.intake")

#: RFC 5321 6.3: a message that has made too many hops is in a loop (Postfix's text).
TOO_MANY_HOPS = Reply(554, "5.4.6", "Error: too many hops")


class LoopCheck:
    """More than ``max_hops`` Received:/Delivered-To: fields: refused, 554 5.4.6."""

    def __init__(self, max_hops: int) -> None:
        self.max_hops = max_hops

    def admit(self, msg: Admission) -> None:
        hops = hop_count(msg.fields)
        if hops > self.max_hops:
            log.warning("refused a message from %s with %d hops (mail loop?)",
                        msg.envelope.client_ip or msg.via, hops)
            raise Refused(TOO_MANY_HOPS)


class TraceHeaders:
    """The ``Received:`` line of RFC 5321 4.4 on top of every message we receive (not on
    the DSNs we write ourselves)."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname

    def admit(self, msg: Admission) -> None:
        if msg.via == "dsn":
            return
        env = msg.envelope
        msg.head.append(received_header(
            queue_id=env.queue_id, hostname=self.hostname, helo=msg.helo,
            client_ip=env.client_ip, protocol=env.protocol, tls=env.tls,
            recipients=[r.address for r in env.recipients], now=env.received_at))


class MessageId:
    """A ``Message-ID:`` for a message that has none (RFC 5322 3.6.4; Postfix does the
    same for mail it accepts)."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname

    def admit(self, msg: Admission) -> None:
        if not has_message_id(msg.fields):
            msg.head.append(f"Message-ID: <{msg.envelope.queue_id}@{self.hostname}>\r\n"
                            .encode("utf-8", "surrogateescape"))


class TagHeaders:
    """Tenant and campaign of an SMTP message from the configured header fields
    (``inbound.tenant_header``/``campaign_header``), removed unless configured to stay."""

    def __init__(self, tenant_header: str, campaign_header: str, strip: bool) -> None:
        self.tenant = tenant_header.lower().encode() or None
        self.campaign = campaign_header.lower().encode() or None
        self.strip = [n for n in (self.tenant, self.campaign) if n] if strip else []

    def admit(self, msg: Admission) -> None:
        if msg.via != "smtp":
            return
        fields = msg.fields
        if self.tenant and (tenant := field_value(msg.data, fields, self.tenant)):
            msg.envelope.tenant = tenant
        if self.campaign and (campaign := field_value(msg.data, fields, self.campaign)):
            msg.envelope.campaign_id = campaign
        if self.strip and any(b"\r\n" + n + b":" in fields for n in self.strip):
            msg.replace_data(without_fields(msg.data, self.strip))


def default_stages(config: Config, hostname: str, source: str = "config",
                   suppressions: SuppressionLookup | None = None) -> list[Stage]:
    """The stages every message goes through, in order. Building them loads the DKIM
    keys (``ConfigError`` naming ``source``, the config file, if one cannot be used).
    ``suppressions`` is the suppression list to check recipients against (None: none)."""
    inbound = config.inbound
    stages: list[Stage] = [LoopCheck(inbound.max_hops)]
    if inbound.tenant_header or inbound.campaign_header:
        stages.append(TagHeaders(inbound.tenant_header, inbound.campaign_header,
                                 inbound.strip_tag_headers))
    if config.egress.enabled:
        stages.append(PoolChoice(config.egress))  # after the tags: knows the tenant
    if suppressions is not None:
        stages.append(SuppressionCheck(suppressions))  # after the tags: knows the tenant
    stages += [TraceHeaders(hostname), MessageId(hostname)]
    unsub = config.unsubscribe
    if unsub.url:
        stages.append(UnsubscribeHeaders(unsub.url, unsub.mailto, unsub.secret, unsub.tenants))
    bounces = config.bounces
    if bounces.domain:  # what a report that returns the headers is about
        stages.append(ReferenceHeaders(bounces.secret, bounces.feedback_id))
    return [*stages, *signing_stages(config, source)]  # signing last: the final bytes
