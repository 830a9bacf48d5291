"""Shaping feedback: what a receiver's replies say about how fast to send (pure).

Two mechanisms, both per path (egress source, destination), both without I/O or clocks
(the caller passes ``now``), so the delivery engine only applies their answers:

- **Rules** (``ShapingRules``, KumoMTA's shaping automation): a reply that matches a
  rule (scope by the answering MX host, provider or domain; reply code, enhanced code,
  regex of the text) counts toward the rule's trigger ("immediate" or "N/h"); when it
  fires, the path is suspended or gets lower limits for the rule's duration. The
  operator's rules come first, then the shipped ones (``shaping_rules.toml``, each citing
  the provider's published reply); the first rule that matches a reply wins.
- **Closed loop** (``Adaptive``, AIMD): pushback (a 421 at any stage, a 4.7.x deferral, a
  refused or reset connection) cuts the path's message rate to ``decrease`` times what
  it accepted over the last ``window`` (a minute) and its connections likewise, then
  pauses it; probes (one connection) follow after ``pause``, doubling while they are
  refused. After each ``clean_interval`` without pushback the limits grow by a
  constant step toward the configured ones. A new path starts at
  ``initial_connections`` and opens one more for each message accepted until its first
  pushback (slow start, as TCP's window grows).
"""

from __future__ import annotations

import re
import tomllib
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import msgspec

from relay.config import (
    ShapingConfig,
    ShapingRule,
    check_rule_fields,
    parse_duration,
    parse_rate,
)
from relay.model import Learned

__all__ = [
    "SHIPPED_RULES",
    "Adaptive",
    "Learned",
    "RuleAction",
    "ShapingRules",
    "ShapingRulesError",
    "is_pushback",
    "load_shaping_rules",
]

SHIPPED_RULES = Path(__file__).with_name("shaping_rules.toml")
#: Trigger counts are kept over this window ("N/h").
_TRIGGER_WINDOW = 3600.0


class ShapingRulesError(ValueError):
    """A rule that cannot be used: names the file, the rule and the field."""


def is_pushback(code: int, enhanced: str | None) -> bool:
    """A reply that asks the sender to slow down: 421 (at any stage: the server is
    closing on us), or a 4xx whose enhanced code is 4.7.x (policy: rate, reputation)."""
    if code == 421:
        return True
    return 400 <= code < 500 and bool(enhanced) and enhanced.startswith("4.7.")  # type: ignore[union-attr]


class RuleAction(msgspec.Struct, frozen=True, kw_only=True):
    """What a fired rule does to a path, for ``duration`` seconds."""

    rule: str
    suspend: bool
    duration: float
    max_message_rate: float | None = None
    max_connections: int | None = None
    max_deliveries_per_connection: int | None = None
    note: str = ""


class _Compiled:
    __slots__ = ("action", "code", "domain", "enhanced", "id", "match_mx", "provider",
                 "regex", "trigger")

    def __init__(self, rule: ShapingRule) -> None:
        self.id = rule.id
        self.match_mx = tuple(m.lower().rstrip(".") for m in rule.match_mx)
        self.provider = rule.provider
        self.domain = rule.domain.lower().rstrip(".")
        self.code = rule.code
        self.enhanced = rule.enhanced
        self.regex = re.compile(rule.regex, re.IGNORECASE) if rule.regex else None
        self.trigger = 1 if rule.trigger == "immediate" else int(rule.trigger.split("/")[0])
        self.action = RuleAction(
            rule=rule.id, suspend=rule.action == "suspend",
            duration=parse_duration(rule.duration),
            max_message_rate=parse_rate(rule.max_message_rate) if rule.max_message_rate
            else None,
            max_connections=rule.max_connections,
            max_deliveries_per_connection=rule.max_deliveries_per_connection,
            note=rule.note)

    def in_scope(self, mx_host: str, provider: str, domain: str) -> bool:
        if self.match_mx:
            host = mx_host.lower().rstrip(".")
            return any(host.endswith(p[1:]) if p.startswith("*.") else host == p
                       for p in self.match_mx)
        if self.provider:
            return provider == self.provider
        return domain == self.domain

    def matches(self, code: int, enhanced: str | None, text: str) -> bool:
        if self.code is not None and code != self.code:
            return False
        if self.enhanced:
            have = enhanced or ""
            if self.enhanced.endswith("."):
                if not have.startswith(self.enhanced):
                    return False
            elif have != self.enhanced:
                return False
        return self.regex is None or self.regex.search(text) is not None


class ShapingRules:
    """Compiled rules, first match wins (``load_shaping_rules``)."""

    def __init__(self, rules: Sequence[ShapingRule]) -> None:
        self._rules = [_Compiled(r) for r in rules]

    def __len__(self) -> int:
        return len(self._rules)

    def match(self, code: int, enhanced: str | None, text: str, *, mx_host: str = "",
              provider: str = "", domain: str = "") -> tuple[str, int, RuleAction] | None:
        """The first rule for this reply from this scope: (id, trigger count, action)."""
        for rule in self._rules:
            if rule.in_scope(mx_host, provider, domain) and rule.matches(code, enhanced, text):
                return rule.id, rule.trigger, rule.action
        return None


class _RulesFile(msgspec.Struct, forbid_unknown_fields=True):
    rules: list[ShapingRule] = msgspec.field(default_factory=list)


def read_rules_file(path: str | Path) -> list[ShapingRule]:
    """The ``[[rules]]`` of a TOML file, checked (``ShapingRulesError`` names the file,
    the rule and the field)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ShapingRulesError(f"{path}: cannot read: {e.strerror}") from None
    try:
        tomllib.loads(data.decode("utf-8"))
        rules = msgspec.toml.decode(data, type=_RulesFile).rules
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, msgspec.DecodeError) as e:
        raise ShapingRulesError(f"{path}: not valid TOML: {e}") from None
    except msgspec.ValidationError as e:
        raise ShapingRulesError(f"{path}: {e}") from None
    check_rules(rules, str(path))
    return rules


def check_rules(rules: Sequence[ShapingRule], where: str) -> None:
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        label = f"{where}: rules[{i}] (id {rule.id!r})"
        if rule.id in seen:
            raise ShapingRulesError(f"{label}: id: used twice")
        seen.add(rule.id)
        try:
            check_rule_fields(rule)
        except ValueError as e:
            raise ShapingRulesError(f"{label}: {e}") from None


def load_shaping_rules(cfg: ShapingConfig) -> ShapingRules:
    """``[[shaping.rules]]``, then ``rules_file``'s, then (``default_rules``) the shipped
    ones."""
    rules = list(cfg.rules)
    if cfg.rules_file:
        rules += read_rules_file(cfg.rules_file)
    if cfg.default_rules:
        rules += read_rules_file(SHIPPED_RULES) if SHIPPED_RULES.exists() else []
    return ShapingRules(rules)


class Adaptive:
    """AIMD over one path's rate and connections; see the module docstring.

    ``limits()`` are what the path may use now, never above the configured ones.
    ``pushback(now)`` / ``delivered(now)`` feed it; both return a description of the
    change ("rate 50.0/min -> 42.5/min") when the limits moved, else None.
    """

    def __init__(self, params: ShapingConfig, rate: float | None, connections: int,
                 now: float, learned: Learned | None = None) -> None:
        self.params = params
        self.configured_rate = rate
        self.configured_connections = connections
        self.floor = parse_rate(params.floor_rate)
        self.learned = learned if learned is not None else Learned(changed=now)
        if learned is None:
            self.learned.connections = min(connections, params.initial_connections)
        self._accepted: deque[float] = deque()
        #: Pushback since the last cut and no delivery since: probing, do not cut again.
        self.probing = False
        self.pause = 0.0
        self.pause_until = 0.0

    def reconfigure(self, rate: float | None, connections: int) -> None:
        self.configured_rate = rate
        self.configured_connections = connections

    # -- what the path may do

    @property
    def rate(self) -> float | None:
        """Messages per second now (None: unlimited)."""
        learned = self.learned.rate
        if learned is None:
            return self.configured_rate
        if self.configured_rate is None:
            return learned
        return min(learned, self.configured_rate)

    @property
    def connections(self) -> int:
        if self.probing:
            return 1
        learned = self.learned.connections or self.configured_connections
        return max(1, min(learned, self.configured_connections))

    def paused(self, now: float) -> bool:
        return now < self.pause_until

    # -- feedback

    def accepted_per_second(self, now: float) -> float:
        """Deliveries over the last ``window`` seconds, per second."""
        self._expire(now)
        return len(self._accepted) / self.params.window

    def _expire(self, now: float) -> None:
        while self._accepted and self._accepted[0] <= now - self.params.window:
            self._accepted.popleft()

    def delivered(self, now: float) -> str | None:
        self._accepted.append(now)
        self._expire(now)
        if self.probing and now < self.pause_until:
            # A transaction in flight when the refusal came was accepted after all: the
            # receiver took more than we had counted, and the cut rate says so.
            learned = self.learned
            if learned.rate is not None:
                learned.rate = max(learned.rate,
                                   self.params.decrease * self.accepted_per_second(now))
            return None
        if self.probing:
            self.probing = False
            self.pause = 0.0
        return self._grow(now)

    def pushback(self, now: float, in_use: int) -> str | None:
        """A refusal that asks us to slow down; ``in_use``: connections open now.

        The first refusal cuts, and pauses until enough of what was accepted has left
        the window for the cut rate to fit under the receiver's limit (a receiver that
        took 50 in a burst and counts per minute takes more only a minute later: one
        probe then, not one every few seconds). A refused probe doubles the pause."""
        if self.probing:
            if now >= self.pause_until:  # a refused probe: still over the limit
                self.pause = min(self.pause * 2, self.params.max_pause)
                self.pause_until = now + self.pause
            return None  # (or one more in flight when the first came): cut once
        before = self.describe()
        self.probing = True
        self.pause = min(max(self._room_after(now), self.params.pause), self.params.max_pause)
        self.pause_until = now + self.pause
        accepted = self.accepted_per_second(now)
        current = self.rate if self.rate is not None else accepted
        base = min(current, accepted) if accepted > 0 else current
        rate = max(self.floor, self.params.decrease * base) if base > 0 else self.floor
        conns = max(1, int(max(in_use, 1) * self.params.decrease))
        self.learned = Learned(rate=rate, connections=conns, cut=True, changed=now,
                               step=max(1 / 60, self.params.increase
                                        * max(rate, self.configured_rate or 0.0)))
        after = self.describe()
        return f"{before} -> {after}" if after != before else None

    def _room_after(self, now: float) -> float:
        """Seconds until at most ``decrease`` times the messages in the window now are
        still in it (the oldest left first)."""
        self._expire(now)
        n = len(self._accepted)
        keep = int(self.params.decrease * n)
        if n == 0 or keep >= n:
            return 0.0
        return self._accepted[n - keep - 1] + self.params.window - now

    def _grow(self, now: float) -> str | None:
        learned = self.learned
        if not learned.cut:
            # Slow start (TCP's): one more connection per message accepted, so a new
            # destination doubles its connections with each round of deliveries.
            if learned.connections is not None:
                learned.connections += 1
                if learned.connections >= self.configured_connections:
                    learned.connections = None
            return None
        if now - learned.changed < self.params.clean_interval:
            return None
        before = self.describe()
        learned.changed = now
        if learned.rate is not None:
            learned.rate += learned.step
            if self.configured_rate is not None and learned.rate >= self.configured_rate:
                learned.rate = None
        if learned.connections is not None:
            learned.connections += 1
            if learned.connections >= self.configured_connections:
                learned.connections = None
        after = self.describe()
        return f"{before} -> {after}" if after != before else None

    def describe(self) -> str:
        rate = self.rate
        text = "rate unlimited" if rate is None else f"rate {rate * 60:.1f}/min"
        return f"{text}, connections {self.connections}"
