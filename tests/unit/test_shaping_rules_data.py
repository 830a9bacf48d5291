"""The shipped shaping rules (relay/outcomes/shaping_rules.toml) and the operator's example
(conf/shaping-rules.toml): their format, strictly, read with tomllib alone; and the
shipped rules against real provider replies (tests/data/shaping_replies.toml), each of
which must be matched by the rule it names, or by none.

The matcher here is a deliberately tiny restatement of the documented semantics (scope,
then code, enhanced code exact or as a prefix ending in ".", regex searched
case-insensitively, first match wins), so the data is checked independently of the
engine in relay.outcomes.shaping.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from bench.sink import pushback_reply

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "relay" / "outcomes" / "shaping_rules.toml"
OPERATOR = ROOT / "conf" / "shaping-rules.toml"
REPLIES = ROOT / "tests" / "data" / "shaping_replies.toml"

_SCOPES = ("match_mx", "provider", "domain")
_MATCHERS = ("code", "enhanced", "regex")
_LIMITS = ("max_message_rate", "max_connections", "max_deliveries_per_connection")
_KEYS = {"id", *_SCOPES, *_MATCHERS, "trigger", "action", *_LIMITS, "duration", "cite",
         "note"}
_ID = re.compile(r"^[a-z0-9][a-z0-9.-]*[a-z0-9]$")
_TRIGGER = re.compile(r"^(immediate|[1-9][0-9]{0,5}/h)$")
_DURATION = re.compile(r"^[1-9][0-9]*[smhdw]?$")
_RATE = re.compile(r"^[1-9][0-9]*/([0-9]*)(s|sec|m|min|h|hour|d|day)$")
_ENHANCED = re.compile(r"^[245](\.[0-9]{1,3}){0,2}\.?$")
_MX_PATTERN = re.compile(r"^(\*\.)?([a-z0-9-]+\.)+[a-z0-9-]+$")


def _rules(path: Path) -> list[dict[str, Any]]:
    with path.open("rb") as f:
        doc = tomllib.load(f)
    assert set(doc) <= {"rules"}, f"{path.name}: unknown top-level keys {set(doc) - {'rules'}}"
    return doc.get("rules", [])


def _replies() -> list[dict[str, Any]]:
    with REPLIES.open("rb") as f:
        return tomllib.load(f)["replies"]


def _format_errors(rule: dict[str, Any]) -> list[str]:
    """Everything wrong with one rule's fields (empty: it is well formed)."""
    errors = [f"unknown key {k!r}" for k in set(rule) - _KEYS]
    if not _ID.match(str(rule.get("id", ""))):
        errors.append(f"id {rule.get('id')!r}")
    scopes = [k for k in _SCOPES if rule.get(k)]
    if len(scopes) != 1:
        errors.append(f"needs exactly one scope, has {scopes}")
    for pattern in rule.get("match_mx", []):
        if not _MX_PATTERN.match(pattern):
            errors.append(f"match_mx {pattern!r}")
    if not any(k in rule for k in _MATCHERS):
        errors.append("needs a code, enhanced or regex")
    if "code" in rule and not (isinstance(rule["code"], int) and 200 <= rule["code"] <= 599):
        errors.append(f"code {rule['code']!r}")
    if "enhanced" in rule and not _ENHANCED.match(rule["enhanced"]):
        errors.append(f"enhanced {rule['enhanced']!r}")
    if "regex" in rule:
        try:
            re.compile(rule["regex"], re.IGNORECASE)
        except re.error as e:
            errors.append(f"regex: {e}")
    if not _TRIGGER.match(rule.get("trigger", "")):
        errors.append(f"trigger {rule.get('trigger')!r}")
    if not _DURATION.match(rule.get("duration", "")):
        errors.append(f"duration {rule.get('duration')!r}")
    errors += _action_errors(rule)
    cite = urlsplit(rule.get("cite", ""))
    if cite.scheme != "https" or not cite.netloc:
        errors.append(f"cite {rule.get('cite')!r} is not an https URL")
    if not rule.get("note", "").strip():
        errors.append("no note quoting the reply")
    return errors


def _action_errors(rule: dict[str, Any]) -> list[str]:
    limits = [k for k in _LIMITS if k in rule]
    action = rule.get("action")
    if action == "suspend":
        return [f"suspend with limits {limits}"] if limits else []
    if action != "limit":
        return [f"action {action!r}"]
    errors = [] if limits else ["limit without max_message_rate/max_connections/"
                                "max_deliveries_per_connection"]
    rate = rule.get("max_message_rate")
    if rate is not None and not _RATE.match(rate):
        errors.append(f"max_message_rate {rate!r}")
    for k in ("max_connections", "max_deliveries_per_connection"):
        if k in rule and not (isinstance(rule[k], int) and rule[k] >= 1):
            errors.append(f"{k} {rule[k]!r}")
    return errors


def _first_match(rules: list[dict[str, Any]], reply: dict[str, Any]) -> str:
    """The id of the first rule in scope whose conditions all hold ("" for none)."""
    host = reply.get("mx", "").lower().rstrip(".")
    for rule in rules:
        if "match_mx" in rule:
            if not any(host.endswith(p[1:]) if p.startswith("*.") else host == p
                       for p in rule["match_mx"]):
                continue
        elif "provider" in rule:
            if reply.get("provider") != rule["provider"]:
                continue
        elif reply.get("domain") != rule["domain"]:
            continue
        if "code" in rule and reply["code"] != rule["code"]:
            continue
        have = reply.get("enhanced", "")
        want = rule.get("enhanced", "")
        if want and not (have.startswith(want) if want.endswith(".") else have == want):
            continue
        if "regex" in rule and not re.search(rule["regex"], reply["text"], re.IGNORECASE):
            continue
        return rule["id"]
    return ""


@pytest.mark.parametrize("path", [SHIPPED, OPERATOR], ids=lambda p: p.name)
def test_every_rule_is_well_formed_and_ids_are_unique(path: Path) -> None:
    rules = _rules(path)
    assert rules, f"{path.name} has no rules"
    problems = {r.get("id", f"#{i}"): e for i, r in enumerate(rules) if (e := _format_errors(r))}
    assert not problems
    ids = [r["id"] for r in rules]
    assert len(ids) == len(set(ids)), f"duplicate ids in {path.name}"


def test_the_format_check_catches_what_it_should() -> None:
    """The checker itself refuses each kind of mistake (else the test above proves
    nothing)."""
    good = _rules(SHIPPED)[0]
    assert _format_errors(good) == []
    broken = {
        "two scopes": {**good, "domain": "gmail.com"},
        "no matcher": {k: v for k, v in good.items() if k not in _MATCHERS},
        "bad regex": {**good, "regex": "(unclosed"},
        "bad trigger": {**good, "trigger": "3 per hour"},
        "bad duration": {**good, "duration": "1 hour"},
        "limit without a limit": {**good, "action": "limit"},
        "suspend with a limit": {**good, "max_connections": 2},
        "bad rate": {**good, "action": "limit", "max_message_rate": "fast"},
        "http cite": {**good, "cite": "http://support.google.com/a/answer/3726730"},
        "unknown key": {**good, "mx": ["*.google.com"]},
        "bad enhanced": {**good, "enhanced": "4.7.x"},
    }
    for what, rule in broken.items():
        assert _format_errors(rule), what


def test_every_sample_reply_gets_its_rule_and_every_rule_has_two_samples() -> None:
    rules = _rules(SHIPPED)
    replies = _replies()
    ids = {r["id"] for r in rules}
    wrong = [(r["expect"], got, r["text"][:60]) for r in replies
             if (got := _first_match(rules, r)) != r["expect"]]
    assert not wrong
    assert {r["expect"] for r in replies} - {""} <= ids, "a sample names no shipped rule"
    counts = {i: sum(1 for r in replies if r["expect"] == i) for i in ids}
    assert all(n >= 2 for n in counts.values()), counts
    assert sum(1 for r in replies if r["expect"] == "") >= 5  # the deliberate non-matches
    assert all(r.get("source") for r in replies)


def test_the_bench_sinks_pushback_reply_is_the_gmail_rate_rule() -> None:
    """The pushback sink answers with Gmail's 4.7.28: from a Google MX the shipped rules
    read it as the rate rule, from the bench's loopback sink as nothing (the scenario
    measures the closed loop, not a rule)."""
    lines = pushback_reply("127.0.0.1").decode().splitlines()
    assert all(line.startswith(("421-4.7.28 ", "421 4.7.28 ")) for line in lines)
    text = "\n".join(line[11:] for line in lines)
    rules = _rules(SHIPPED)
    gmail = {"mx": "gmail-smtp-in.l.google.com", "code": 421, "enhanced": "4.7.28",
             "text": text}
    assert _first_match(rules, gmail) == "gmail-rate-4.7.28"
    assert _first_match(rules, {**gmail, "mx": "127.0.0.1"}) == ""


def test_the_relays_loader_reads_both_files() -> None:
    """The lead's loader (relay.outcomes.shaping) ships this very file and accepts both
    files as they are."""
    from relay.outcomes.shaping import SHIPPED_RULES, read_rules_file

    assert Path(SHIPPED_RULES).resolve() == SHIPPED
    assert [r.id for r in read_rules_file(SHIPPED)] == [r["id"] for r in _rules(SHIPPED)]
    assert len(read_rules_file(OPERATOR)) == len(_rules(OPERATOR))
