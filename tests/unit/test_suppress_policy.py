"""The suppression policy (relay.outcomes.suppress): the shipped defaults, an operator's
table over them, its errors, and which events make which strikes."""

from __future__ import annotations

import pytest

from relay.config import ConfigError, SuppressRule, decode_config
from relay.events.types import OOB, Bounce, Complaint, Delivery, Expiration, TransientFailure
from relay.outcomes.suppress import DEFAULT_POLICY, ClassRule, parse_policy, strikes


def bounce(cls: int | None, **kw: object) -> Bounce:
    fields: dict[str, object] = dict(queue_id="Q1", time=1000.0, recipient="r@dest.test",
                                     destination="dest.test", reply="550 5.1.1 no such user",
                                     bounce_class=cls, bounce_rule="text-user-unknown")
    fields.update(kw)
    return Bounce(**fields)  # type: ignore[arg-type]


def test_shipped_defaults() -> None:
    policy = parse_policy({})
    assert policy.rule("10") == ClassRule(1, 0.0, None)
    assert policy.rule("22") == ClassRule(3, 7 * 86400.0, None)
    assert policy.rule("90") == ClassRule(1, 0.0, None)
    assert policy.rule("complaint") == ClassRule(1, 0.0, None)
    for soft in ("20", "21", "24", "50", "51", "60", "70", "1"):
        assert policy.rule(soft).threshold == 0, soft
    assert set(DEFAULT_POLICY) == {"10", "22", "90", "complaint"}


def test_an_operator_table_replaces_defaults_class_by_class() -> None:
    policy = parse_policy({"Invalid Recipient": "never", "22": SuppressRule(
        when="2/1d", expires="30d"), "soft bounce": "5/2w", "Complaint": "never"})
    assert policy.rule("10").threshold == 0
    assert policy.rule("22") == ClassRule(2, 86400.0, 30 * 86400.0)
    assert policy.rule("20") == ClassRule(5, 14 * 86400.0, None)
    assert policy.rule("complaint").threshold == 0
    assert policy.rule("90").threshold == 1  # untouched default


@pytest.mark.parametrize(("table", "error"), [
    ('"99" = "immediate"', 'bounces.suppress.99: unknown bounce class 99'),
    ('nonsense = "immediate"', 'bounces.suppress.nonsense: unknown bounce class "nonsense"'),
    ('"10" = "sometimes"', 'bounces.suppress.10: "sometimes" is not "immediate", "never"'),
    ('"10" = "0/7d"', 'bounces.suppress.10: "0/7d" is not'),
    ('"22" = "3/soon"', "bounces.suppress.22: invalid duration"),
    ('"22" = { when = "3/7d", expires = "later" }', "bounces.suppress.22: invalid duration"),
    ('"22" = { when = "3/7d", until = "30d" }', "bounces.suppress.22.until: unknown key"),
    ('"22" = "never"\n"Mailbox Full" = "never"',
     'bounces.suppress."Mailbox Full": the same class as "22"'),
])
def test_config_errors_name_the_key(table: str, error: str) -> None:
    with pytest.raises(ConfigError) as e:
        decode_config(f"[bounces.suppress]\n{table}\n", "relay.toml")
    assert str(e.value).startswith(f"relay.toml: {error}"), str(e.value)


def test_which_events_strike() -> None:
    policy = parse_policy({})
    complaint = Complaint(queue_id="Q2", time=1000.0, recipient="c@dest.test",
                          feedback_type="abuse", tenant="acme", reporting_mta="mx.isp.test")
    oob = OOB(queue_id="Q3", time=1000.0, recipient="o@dest.test", bounce_class=10,
              bounce_rule="gmail-no-such-user", reply="550-5.1.1 ...", kind="dsn")
    events = [
        bounce(10, tenant="acme"), complaint, oob,
        bounce(22), bounce(20), bounce(None),  # 22 counts; soft and unclassified do not
        bounce(10, queue_id=""), bounce(10, recipient=""),  # not one of ours / nobody
        OOB(queue_id="", time=1.0, recipient="x@dest.test", bounce_class=10),  # unlinked
        OOB(queue_id="Q9", time=1.0, recipient="w@dest.test", bounce_class=22,
            action="delayed"),  # a warning, not a bounce
        Complaint(queue_id="Q4", time=1.0, recipient="n@dest.test", feedback_type="not-spam"),
        Complaint(queue_id="Q5", time=1.0, recipient="a@dest.test",
                  feedback_type="auth-failure"),
        Expiration(queue_id="Q6", time=1.0, recipient="e@dest.test", destination="d",
                   bounce_class=24, bounce_rule="expired"),
        TransientFailure(queue_id="Q7", time=1.0, recipient="t@dest.test", destination="d",
                         bounce_class=22),
        Delivery(queue_id="Q8", time=1.0, recipient="d@dest.test", destination="d"),
    ]
    got = strikes(events, policy)
    assert [(s.entry.address, s.counter, s.threshold) for s in got] == [
        ("r@dest.test", "10", 1), ("c@dest.test", "complaint", 1), ("o@dest.test", "10", 1),
        ("r@dest.test", "22", 3)]
    hard, comp, out_of_band, full = got
    assert (hard.entry.tenant, hard.entry.source) == ("acme", "bounce")
    assert hard.entry.transactional and hard.entry.non_transactional
    assert hard.entry.description.startswith(
        "message Q1: class 10 Invalid Recipient (rule text-user-unknown): 550 5.1.1")
    # A complaint blocks campaigns only, like an unsubscribe.
    assert (comp.entry.source, comp.entry.transactional, comp.entry.non_transactional) == (
        "complaint", False, True)
    assert "mx.isp.test" in comp.entry.description and comp.entry.tenant == "acme"
    assert out_of_band.entry.source == "oob" and out_of_band.entry.tenant == ""
    assert full.window == 7 * 86400.0 and full.entry.expires is None


def test_expiry_of_an_entry_comes_from_its_rule() -> None:
    policy = parse_policy({"10": SuppressRule(when="immediate", expires="2d")})
    (s,) = strikes([bounce(10)], policy)
    assert s.entry.expires == 1000.0 + 2 * 86400.0
