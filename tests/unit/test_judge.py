"""The outcome judgement as a pure function: outcomes in, completion/events/DSN out."""

from __future__ import annotations

import pytest

from relay.events import Bounce, Delivery, Expiration, TransientFailure
from relay.model import DeliveryJob, Envelope, Recipient, RecipientOutcome
from relay.outcomes import Attempt, RetryPolicy, judge

NOW = 1_000_000.0
POLICY = RetryPolicy(retry_interval=60.0, max_retry_interval=200.0, max_age=3600.0)
DATA = b"Subject: x\r\nFrom: a@sender.test\r\n\r\nbody\r\n"


def envelope(n: int = 3, sender: str = "a@sender.test", age: float = 10.0) -> Envelope:
    return Envelope(queue_id="Q1", sender=sender, received_at=NOW - age,
                    recipients=[Recipient(address=f"r{i}@d.test") for i in range(n)])


def job(n: int = 3, attempts: int = 0) -> DeliveryJob:
    return DeliveryJob(queue_id="Q1", domain="d.test", recipients=list(range(n)),
                       due=NOW, attempts=attempts)


def attempt(*outcomes: RecipientOutcome, **kw: object) -> Attempt:
    kw.setdefault("mx_host", "mx.d.test")
    kw.setdefault("ip", "127.0.0.9")
    return Attempt(outcomes=list(outcomes), destination="d.test", **kw)  # type: ignore[arg-type]


def run(j: DeliveryJob, a: Attempt, env: Envelope | None = None,
        policy: RetryPolicy = POLICY):  # type: ignore[no-untyped-def]
    return judge(j, env or envelope(len(j.recipients)), DATA, a, policy, now=NOW,
                 hostname="relay.test", new_queue_id=lambda: "DSN1")


def test_mixed_outcomes_of_one_transaction() -> None:
    v = run(job(attempts=1), attempt(RecipientOutcome(0, 250, "2.0.0", "ok"),
                                     RecipientOutcome(1, 550, "5.1.1", "no such user"),
                                     RecipientOutcome(2, 451, "4.3.0", "try later")))
    assert [type(e) for e in v.events] == [Delivery, Bounce, TransientFailure]
    c = v.completion
    assert (c.delivered, c.failed, c.deferred, c.attempts) == ([0], [1], [2], 2)
    assert c.next_due == v.retry_at == NOW + 120  # second failure: 60 * 2
    assert v.events[2].next_attempt == NOW + 120 and v.events[2].attempt == 2
    assert v.dsn is not None and c.new_messages == [v.dsn]
    assert v.events[1].dsn_queue_id == "DSN1"
    assert b"5.1.1" in v.dsn.data and v.dsn.envelope.recipients[0].address == "a@sender.test"


def test_backoff_end_and_unattempted_deferral() -> None:
    deferred = RecipientOutcome(0, 451, "4.4.1", "connect failed")
    v = run(job(1), attempt(deferred, not_before=NOW + 500))
    assert v.retry_at == NOW + 500 and v.completion.attempts == 1
    assert v.completion.first_attempt == NOW
    v = run(job(1, attempts=3), attempt(deferred, counted=False, not_before=NOW + 30))
    assert v.retry_at == NOW + 30 and v.completion.attempts == 3
    assert v.completion.first_attempt is None  # not tried: no first attempt yet


def test_a_transient_failure_past_max_age_expires_with_a_dsn() -> None:
    v = run(job(1), attempt(RecipientOutcome(0, 451, None, "still busy")),
            env=envelope(1, age=3601.0))
    [e] = v.events
    assert isinstance(e, Expiration) and e.dsn_queue_id == "DSN1"
    assert v.completion.failed == [0] and not v.deferred
    assert v.dsn is not None and b"4.4.7" in v.dsn.data  # no status in the reply


def test_no_dsn_for_a_null_sender() -> None:
    v = run(job(1), attempt(RecipientOutcome(0, 550, "5.1.1", "no")), env=envelope(1, sender=""))
    assert v.dsn is None and v.completion.new_messages == [] and v.completion.failed == [0]
    assert v.events[0].dsn_queue_id == ""


@pytest.mark.parametrize(("policy", "kind"), [("retry", TransientFailure),
                                              ("delivered", Delivery)])
def test_ambiguous_outcomes_follow_the_policy(policy: str, kind: type) -> None:
    lost = RecipientOutcome(0, 421, "4.4.2", "lost after the dot", ambiguous=True)
    v = run(job(1), attempt(lost), policy=RetryPolicy(
        retry_interval=60, max_retry_interval=200, max_age=3600, ambiguous=policy))
    [e] = v.events
    assert type(e) is kind and e.ambiguous
    assert (v.completion.delivered == [0]) == (policy == "delivered")


def test_a_local_failure_is_an_x_local_diagnostic() -> None:
    v = run(job(1), attempt(RecipientOutcome(0, 550, "5.1.2", "domain does not exist"),
                            mx_host="", ip=""))
    assert v.dsn is not None and b"x-local; 550 5.1.2" in v.dsn.data
    assert b"Remote-MTA" not in v.dsn.data
