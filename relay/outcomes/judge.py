"""The one place that judges delivery outcomes: a pure function, no I/O, no clock.

``judge(job, envelope, data, attempt, policy, now=..., ...)`` turns what happened to one
job in one try into a ``Verdict``: the spool ``Completion`` to commit, the events to
publish, and the DSN owed to the sender. The engine only applies it. Bounce
classification and adaptive shaping hook in here: every ``Bounce`` and
``TransientFailure`` carries ``bounce_class``/``bounce_rule`` from ``classifier``
(``relay.outcomes.classify``; the shipped defaults when None), scoped by the attempt's
destination (a provider's name) and the job's domain; an ``Expiration`` is 24 (Timeout,
rule "expired"), as Momentum classifies expired messages.

Per recipient:

- 2xx -> delivered (``Delivery``);
- 5xx -> bounced (``Bounce``), and a "failed" DSN;
- 4xx, connection or DNS trouble -> deferred to ``now + retry_interval * 2**(n-1)``
  (capped at ``max_retry_interval``, and no earlier than ``attempt.not_before``, e.g. a
  destination backoff) as a ``TransientFailure``; once ``now`` is past
  ``received_at + max_age`` it becomes an ``Expiration`` with a "failed" DSN instead;
- ambiguous (the connection was lost after the end of data: the message may have been
  delivered): with ``policy.ambiguous = "retry"`` (the default) as any transient
  failure, with ``"delivered"`` as delivered; the event says ``ambiguous: true``.

An attempt that was not made (``counted=False``: the destination was backed off) keeps
the attempt count and is due at ``not_before``. No DSN is owed for a null sender or a
DSN itself (``build_dsn`` decides), so a bounce is never bounced: no loops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import msgspec

from relay.events import Bounce, Delivery, Event, Expiration, TransientFailure, event_tags
from relay.model import Completion, DeliveryJob, Envelope, NewMessage, RecipientOutcome
from relay.outcomes.classify import EXPIRED, Classifier, default_classifier, scope_of
from relay.outcomes.dsn import FailedRecipient, build_dsn

__all__ = ["Attempt", "RetryPolicy", "Verdict", "backoff_delay", "judge"]


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """How a destination retries (from its effective throttle)."""

    retry_interval: float
    max_retry_interval: float
    max_age: float
    ambiguous: Literal["retry", "delivered"] = "retry"


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    """What happened to one job in one try: an outcome per recipient of the job."""

    outcomes: list[RecipientOutcome]
    destination: str
    mx_host: str = ""
    ip: str = ""
    #: Seconds the try took (connect or lookup included).
    seconds: float = 0.0
    #: False: not tried (a backed-off destination); the attempt count stays.
    counted: bool = True
    #: Retry no earlier than this (Unix time), e.g. the end of a destination backoff.
    not_before: float | None = None
    #: The server's port, and the part of ``seconds`` spent setting the connection up
    #: (DNS, connect, greeting, EHLO, STARTTLS); 0 = not reported. Copied to the events.
    port: int = 0
    connect_seconds: float = 0.0

    @property
    def remote(self) -> bool:
        """A server was reached: a DSN says ``smtp;`` and names it."""
        return bool(self.mx_host)


class Verdict(msgspec.Struct, kw_only=True):
    completion: Completion
    events: list[Event]
    #: The DSN to store with the completion (None: none owed).
    dsn: NewMessage | None
    #: When the job's remaining recipients are due again.
    retry_at: float
    #: Some recipient stays queued.
    deferred: bool


def backoff_delay(attempts: int, retry_interval: float, max_retry_interval: float) -> float:
    """Delay before the next attempt after ``attempts`` failed attempts (>= 1):
    ``retry_interval * 2**(attempts-1)`` capped at ``max_retry_interval``."""
    attempts = max(1, attempts)
    # Cap the exponent so huge attempt counts cannot overflow a float.
    exp = min(attempts - 1, 60)
    return min(retry_interval * (2.0**exp), max_retry_interval)


def judge(
    job: DeliveryJob,
    envelope: Envelope,
    data: bytes,
    attempt: Attempt,
    policy: RetryPolicy,
    *,
    now: float,
    hostname: str,
    new_queue_id: Callable[[], str],
    classifier: Classifier | None = None,
) -> Verdict:
    """See the module docstring. ``hostname`` is the reporting MTA of a DSN;
    ``new_queue_id`` names it; ``classifier`` classifies the failures."""
    if classifier is None:
        classifier = default_classifier()
    scope = scope_of(attempt.destination, job.domain)
    attempts = job.attempts + 1 if attempt.counted else job.attempts
    first_attempt = job.first_attempt
    if first_attempt is None and attempt.counted:
        first_attempt = now - attempt.seconds
    retry_at = _retry_at(attempts, attempt, policy, now)
    expired = now >= envelope.received_at + policy.max_age
    delivered: list[int] = []
    deferred: list[int] = []
    bounced: list[tuple[RecipientOutcome, bool]] = []  # (outcome, expired?)
    events: list[Event] = []
    last_error: str | None = None
    queued = now - envelope.received_at
    tags = event_tags(envelope)
    for o in attempt.outcomes:
        common: dict[str, Any] = dict(
            queue_id=job.queue_id, time=now, recipient=envelope.recipients[o.index].address,
            destination=attempt.destination, mx_host=attempt.mx_host, ip=attempt.ip,
            reply=o.reply_line, attempt=max(attempts, 1), seconds=attempt.seconds,
            queued_seconds=queued, ambiguous=o.ambiguous, port=attempt.port,
            connect_seconds=attempt.connect_seconds, **tags,
        )
        kind = o.kind
        if kind == "transient" and o.ambiguous and policy.ambiguous == "delivered":
            kind = "delivered"
        if kind == "delivered":
            delivered.append(o.index)
            events.append(Delivery(**common))
        elif kind == "permanent":
            bounced.append((o, False))
            c = classifier.classify_outcome(o.code, o.enhanced, o.text, scope)
            events.append(Bounce(**common, bounce_class=c.bounce_class, bounce_rule=c.rule))
        elif expired:
            bounced.append((o, True))
            events.append(Expiration(**common, bounce_class=EXPIRED.bounce_class,
                                     bounce_rule=EXPIRED.rule))
        else:
            deferred.append(o.index)
            last_error = o.reply_line
            c = classifier.classify_outcome(o.code, o.enhanced, o.text, scope)
            events.append(TransientFailure(**common, next_attempt=retry_at,
                                           bounce_class=c.bounce_class, bounce_rule=c.rule))
    dsn = None
    if bounced:
        dsn = failure_dsn(envelope, data, bounced, attempt, now, hostname, new_queue_id())
    if dsn is not None:
        for e in events:
            if isinstance(e, Bounce | Expiration):
                e.dsn_queue_id = dsn.envelope.queue_id
    completion = Completion(
        queue_id=job.queue_id, domain=job.domain, delivered=delivered,
        failed=[o.index for o, _ in bounced], deferred=deferred, next_due=retry_at,
        attempts=attempts, error=last_error, first_attempt=first_attempt,
        new_messages=[dsn] if dsn is not None else [],
    )
    return Verdict(completion=completion, events=events, dsn=dsn, retry_at=retry_at,
                   deferred=bool(deferred))


def _retry_at(attempts: int, attempt: Attempt, policy: RetryPolicy, now: float) -> float:
    if not attempt.counted:
        return attempt.not_before if attempt.not_before is not None else now
    retry_at = now + backoff_delay(attempts, policy.retry_interval, policy.max_retry_interval)
    if attempt.not_before is not None:
        retry_at = max(retry_at, attempt.not_before)
    return retry_at


def failure_dsn(envelope: Envelope, data: bytes,
                bounced: list[tuple[RecipientOutcome, bool]], attempt: Attempt, now: float,
                hostname: str, queue_id: str) -> NewMessage | None:
    """The "failed" DSN for bounced/expired recipients via ``dsn.build_dsn`` (None when
    none is owed: null sender, a DSN itself, NOTIFY)."""
    failures = []
    for o, expired in bounced:
        # Expired: like Postfix, "Action: failed" with the last transient status
        # (4.4.7 "delivery time expired" when the reply had none).
        fallback = "4.4.7" if expired else ("5.0.0" if o.code >= 500 else "4.0.0")
        failures.append(FailedRecipient(
            index=o.index,
            status=o.enhanced or fallback,
            diagnostic=f"smtp; {o.reply_line}" if attempt.remote else f"x-local; {o.reply_line}",
            remote_mta=f"dns; {attempt.mx_host}" if attempt.remote else "",
            last_attempt=now,
        ))
    return build_dsn(
        envelope=envelope, data=data, failures=failures, action="failed",
        reporting_mta=hostname, queue_id=queue_id, arrival=envelope.received_at, now=now,
    )
