"""Shaping judgement without I/O: reply rules, the closed loop (AIMD), egress choice."""

from __future__ import annotations

import pytest

from relay.config import (
    ConfigError,
    EgressConfig,
    EgressPool,
    EgressSource,
    PoolMember,
    ShapingConfig,
    ShapingRule,
    WarmupStep,
    decode_config,
)
from relay.outbound.egress import Egress
from relay.outcomes.shaping import (
    Adaptive,
    ShapingRules,
    is_pushback,
    load_shaping_rules,
)

PARAMS = ShapingConfig()


# --------------------------------------------------------------------------- pushback


@pytest.mark.parametrize(("code", "enhanced", "expected"), [
    (421, "4.7.28", True), (421, None, True), (451, "4.7.1", True), (450, "4.7.0", True),
    (451, "4.3.0", False), (452, "4.2.2", False), (550, "5.7.1", False), (250, "2.0.0", False),
])
def test_what_counts_as_pushback(code: int, enhanced: str | None, expected: bool) -> None:
    assert is_pushback(code, enhanced) is expected


# --------------------------------------------------------------------------- rules


def rule(**kw: object) -> ShapingRule:
    base: dict[str, object] = {"id": "r", "match_mx": ["*.google.com"], "code": 421}
    base.update(kw)
    return ShapingRule(**base)  # type: ignore[arg-type]


def test_rules_match_scope_code_enhanced_prefix_and_regex_first_wins() -> None:
    rules = ShapingRules([
        rule(id="a", enhanced="4.7.28", regex="unusual rate"),
        rule(id="b", enhanced="4.7."),
        rule(id="c", match_mx=[], domain="example.net", code=None, regex="slow down"),
        rule(id="d", match_mx=[], provider="yahoo", code=None, enhanced="4.7.0"),
    ])
    gmx = "gmail-smtp-in.l.google.com"
    assert rules.match(421, "4.7.28", "Our system has detected an unusual rate of mail",
                       mx_host=gmx)[0] == "a"
    assert rules.match(421, "4.7.28", "something else", mx_host=gmx)[0] == "b"
    assert rules.match(421, "4.7.0", "try later", mx_host=gmx + ".")[0] == "b"
    assert rules.match(421, "4.7.0", "x", mx_host="mx.example.org") is None
    assert rules.match(450, None, "Please SLOW DOWN", domain="example.net")[0] == "c"
    assert rules.match(421, "4.7.0", "[TSS04]", provider="yahoo")[0] == "d"
    assert rules.match(421, "4.7.0", "[TSS04]", provider="google") is None


def test_rule_actions_carry_durations_limits_and_triggers() -> None:
    rules = ShapingRules([rule(trigger="3/h", action="limit", max_message_rate="60/min",
                               max_connections=2, duration="2h")])
    rule_id, trigger, action = rules.match(421, None, "x", mx_host="a.google.com")
    assert (rule_id, trigger) == ("r", 3)
    assert (action.suspend, action.duration, action.max_message_rate,
            action.max_connections) == (False, 7200.0, 1.0, 2)


@pytest.mark.parametrize(("fields", "error"), [
    ({"match_mx": [], "domain": ""}, "exactly one scope"),
    ({"domain": "x.test"}, "exactly one scope"),
    ({"code": None}, "at least one of code"),
    ({"regex": "("}, "regex"),
    ({"trigger": "often"}, "trigger"),
    ({"duration": "soon"}, "invalid duration"),
    ({"action": "limit"}, "needs max_message_rate"),
    ({"enhanced": "4.7.x"}, "enhanced"),
])
def test_bad_rules_are_config_errors_naming_the_rule_and_field(fields, error) -> None:
    r = rule(**fields)
    toml = "[[shaping.rules]]\n" + "".join(
        f"{k} = {_toml(v)}\n" for k, v in {
            "id": r.id, "match_mx": r.match_mx, "domain": r.domain, "code": r.code,
            "enhanced": r.enhanced, "regex": r.regex, "trigger": r.trigger,
            "action": r.action, "duration": r.duration}.items() if v not in (None, ""))
    with pytest.raises(ConfigError, match=r'shaping\.rules\[0\] \(id "r"\): .*' + error):
        decode_config(toml, "relay.toml")


def _toml(value: object) -> str:
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def test_the_operator_rules_file_comes_before_the_shipped_rules(tmp_path) -> None:
    path = tmp_path / "rules.toml"
    path.write_text('[[rules]]\nid = "mine"\nmatch_mx = ["*.google.com"]\ncode = 421\n'
                    'action = "suspend"\nduration = "10m"\n')
    rules = load_shaping_rules(ShapingConfig(rules_file=str(path)))
    assert rules.match(421, "4.7.28", "anything", mx_host="x.google.com")[0] == "mine"
    inline = ShapingConfig(rules=[rule(id="inline")], rules_file=str(path))
    assert load_shaping_rules(inline).match(421, None, "", mx_host="x.google.com")[0] == \
        "inline"


# --------------------------------------------------------------------------- AIMD


def test_pushback_cuts_to_a_share_of_what_was_accepted_over_the_last_minute() -> None:
    a = Adaptive(PARAMS, None, 20, now=0.0)
    for i in range(50):  # 50 accepted within a second: 50/min, whatever the burst
        a.delivered(1.0 + i / 100)
    change = a.pushback(2.0, in_use=4)
    assert change is not None and "rate 45.0/min" in change
    assert a.rate == pytest.approx(50 / 60 * 0.9)
    assert a.connections == 1  # probing: one connection until a delivery
    # The pause lasts until 45 of the 50 are all that is left in the minute: the fifth
    # oldest (at 1.04 s) leaves it at 61.04 s. One probe then, not one every 5 s.
    assert a.pause_until == pytest.approx(61.04)
    assert a.paused(61.0) and not a.paused(61.05)


def test_refused_probes_double_the_pause_and_do_not_cut_again() -> None:
    a = Adaptive(PARAMS, None, 20, now=0.0)
    for i in range(60):
        a.delivered(i / 2)
    a.pushback(30.0, in_use=2)
    assert a.pause == pytest.approx(2.5 + 60 - 30)  # the 6th oldest of 60 leaves then
    rate = a.rate
    pauses = []
    t = 30.0
    for _ in range(8):
        t = a.pause_until
        assert a.pushback(t, in_use=1) is None
        pauses.append(a.pause)
    assert a.rate == rate
    assert pauses == [65.0, 130.0, 260.0, 300.0, 300.0, 300.0, 300.0, 300.0]
    a.delivered(a.pause_until)  # the probe after the last pause got through
    assert not a.probing and a.connections >= 1 and a.pause == 0.0


def test_what_was_in_flight_at_the_refusal_neither_doubles_the_pause_nor_is_forgotten():
    a = Adaptive(PARAMS, None, 20, now=0.0)
    for i in range(47):
        a.delivered(i / 100)
    a.pushback(0.5, in_use=4)
    pause, rate = a.pause_until, a.rate
    assert rate == pytest.approx(0.9 * 47 / 60)
    a.pushback(0.55, in_use=3)  # a second 421 from a transaction already under way
    assert a.pause_until == pause
    for t in (0.6, 0.65, 0.7):  # three more had been accepted before the refusal
        a.delivered(t)
    assert a.rate == pytest.approx(0.9 * 50 / 60)
    assert a.probing and a.paused(1.0)


def test_clean_intervals_raise_the_limits_additively_up_to_the_configured_ones() -> None:
    a = Adaptive(PARAMS, 100 / 60, 10, now=0.0)  # configured: 100/min, 10 connections
    for i in range(80):
        a.delivered(i * 0.75)
    a.pushback(60.0, in_use=10)
    first = a.rate
    assert first == pytest.approx(0.9 * 80 / 60, rel=0.02)
    a.delivered(61.0)  # the probe got through
    step = a.learned.step
    assert step == pytest.approx(0.05 * 100 / 60)
    rates = []
    t = 61.0
    for _ in range(12):
        t += PARAMS.clean_interval
        a.delivered(t)
        rates.append(a.rate)
    diffs = {round(b - a_, 9) for a_, b in zip([first, *rates], rates, strict=False)
             if b < 100 / 60}
    assert diffs == {round(step, 9)}  # additive: the same step every clean interval
    assert rates[-1] == pytest.approx(100 / 60)  # back to the configured limit
    assert a.connections == 10


def test_slow_start_opens_one_more_connection_per_message_accepted() -> None:
    a = Adaptive(PARAMS, None, 10, now=0.0)
    assert a.connections == PARAMS.initial_connections
    for i in range(3):
        a.delivered(float(i))
    assert a.connections == PARAMS.initial_connections + 3
    for i in range(10):
        a.delivered(10.0 + i)
    assert a.connections == 10


def test_a_pushback_with_nothing_accepted_falls_to_the_floor() -> None:
    a = Adaptive(PARAMS, None, 10, now=0.0)
    a.pushback(1.0, in_use=1)
    assert a.rate == pytest.approx(6 / 60)
    assert a.pause == PARAMS.pause  # nothing in the window: the shortest pause


# --------------------------------------------------------------------------- egress


def egress(**sources: EgressSource) -> Egress:
    names = list(sources)
    weights = {"a": 3, "b": 1, "c": 1}
    return Egress(EgressConfig(
        sources=sources,
        pools={"p": EgressPool(sources=[PoolMember(source=n, weight=weights[n])
                                        for n in names])},
        default_pool="p"))


def test_weighted_round_robin_follows_the_weights_evenly() -> None:
    e = egress(a=EgressSource(), b=EgressSource())
    picks = [e.choose(None, 0.0, 1, lambda s: True) for _ in range(40)]
    assert picks.count("a") == 30 and picks.count("b") == 10
    # Smooth: in every window of 4 picks, a three times and b once.
    assert all(picks[i:i + 4].count("b") == 1 for i in range(0, 40, 4))


def test_sources_that_cannot_take_a_job_are_skipped() -> None:
    e = egress(a=EgressSource(), b=EgressSource())
    e.unbindable["a"] = 100.0
    assert {e.choose("p", 50.0, 1, lambda s: True) for _ in range(5)} == {"b"}
    assert e.choose("p", 50.0, 1, lambda s: s != "b") is None
    assert e.choose("p", 101.0, 1, lambda s: s != "b") == "a"


def test_warmup_caps_by_age_and_utc_day() -> None:
    day1 = 1764547200.0  # 2025-12-01T00:00:00Z
    src = EgressSource(warmup_start="2025-12-01",
                       warmup=[WarmupStep(day=1, daily_cap=5), WarmupStep(day=3, daily_cap=8)])
    e = egress(a=src, b=EgressSource())
    picks = [e.choose(None, day1 + 10, 1, lambda s: True) for _ in range(40)]
    assert picks.count("a") == 5
    assert e.used("a", day1 + 10) == 5
    assert e.next_day(day1 + 10) == day1 + 86400
    # Day 2: the cap is still 5, counted afresh; day 3: 8; day 4 onwards: none.
    assert e.cap("a", day1 + 86400 + 1) == 5 and e.used("a", day1 + 86400 + 1) == 0
    assert e.cap("a", day1 + 2 * 86400) == 8
    assert e.cap("a", day1 + 3 * 86400) is None
    assert e.usable("a", day1 + 2 * 86400 + 5)
    e.others["a"] = 8  # another worker used today's cap
    assert not e.usable("a", day1 + 2 * 86400 + 5)


def test_egress_config_errors_name_the_key() -> None:
    cases = {
        '[egress.sources.a]\nsource_address = "nope"\n': 'egress.sources.a.source_address',
        '[egress.pools.p]\nsources = [{source = "x"}]\n[egress]\ndefault_pool = "p"\n':
            r"egress.pools.p.sources\[0\].source: no \[egress.sources.x\]",
        '[egress.sources.a]\n[egress.pools.p]\nsources = [{source = "a"}]\n':
            "egress.default_pool",
        '[egress.sources.a]\nwarmup = [{day = 1, daily_cap = 5}]\n': "needs warmup_start",
        '[egress.sources.a]\nwarmup_start = "yesterday"\n': "warmup_start",
        '[egress]\ntenant_pools = { t = "zz" }\n': "egress.tenant_pools.t",
    }
    for text, error in cases.items():
        with pytest.raises(ConfigError, match=error):
            decode_config(text, "relay.toml")


def test_a_path_restores_its_suspension_and_learned_limits_from_the_spool() -> None:
    from relay.config import Config
    from relay.model import Learned
    from relay.outbound.shaping import PathShaping
    from relay.spool.shaping import ShapingEntry

    limits = Config().outbound.throttle_for("a.test")
    published, persisted = [], []
    entries = [
        ShapingEntry(scope="s->a.test", origin="rule:r", suspend=True, until=5000.0,
                     reason="421 4.7.28 slow down"),
        ShapingEntry(scope="s->a.test", origin="adaptive", until=9000.0,
                     learned=Learned(rate=0.5, connections=3, step=0.05, cut=True)),
    ]
    shaping = PathShaping("s->a.test", "a.test", PARAMS, ShapingRules([]), limits,
                          now=lambda: 1000.0, publish=published.append,
                          persist=persisted.append, entries=entries)
    assert shaping.suspended_until == 5000.0
    assert shaping.message_rate(None) == 0.5
    assert shaping.max_connections(limits.max_connections) == 3
    # An expired suspension is not restored.
    later = PathShaping("s->a.test", "a.test", PARAMS, ShapingRules([]), limits,
                        now=lambda: 6000.0, publish=published.append,
                        persist=persisted.append, entries=entries)
    assert later.suspended_until == 0.0 and later.message_rate(None) == 0.5
    assert published == [] and persisted == []


async def test_explain_shows_the_limits_each_egress_source_changes() -> None:
    from relay.outbound.explain import explain

    cfg = decode_config('''
[outbound]
smart_host = "127.0.0.1:9"
[egress]
default_pool = "p"
[egress.sources.a]
source_address = "127.0.0.11"
[egress.sources.a.limits]
max_connections = 3
[egress.sources.a.domains."example.com"]
max_message_rate = "10/min"
[egress.sources.b]
[egress.pools.p]
sources = [{ source = "a" }, { source = "b" }]
''')
    lines = await explain(cfg, "example.com")
    at = lines.index("  through egress source a (127.0.0.11):")
    assert lines[at + 1].split() == ["max_connections", "=", "3", "[egress.sources.a.limits]"]
    assert lines[at + 2].split() == ["max_message_rate", "=", '"10/min"',
                                     '[egress.sources.a.domains."example.com"]']
    assert not any("source b" in line for line in lines)  # b changes nothing
