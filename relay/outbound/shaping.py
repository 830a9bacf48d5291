"""A path's traffic shaping, as one destination applies it (``PathShaping``).

The judgement is pure (``relay.outcomes.shaping``: rules, AIMD); this object holds one
path's state in Unix time and says what the path may do now: its connections, message
rate and deliveries per connection, whether it is paused (waiting to probe after
pushback) or suspended (a rule or an operator). Every change is published as a
``ShapingChange`` event and handed to ``persist`` (the engine writes it to the spool,
so a restart keeps it).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from relay.config import Limits, ShapingConfig
from relay.events.types import ShapingChange
from relay.model import Learned
from relay.outbound.throttle import rate_from_config
from relay.outcomes.shaping import Adaptive, RuleAction, ShapingRules, is_pushback
from relay.spool.shaping import ShapingEntry

__all__ = ["PathShaping"]


class PathShaping:
    """See the module docstring. ``now`` is a callable returning Unix time."""

    def __init__(self, key: str, destination: str, params: ShapingConfig,
                 rules: ShapingRules, limits: Limits, *, now: Callable[[], float],
                 publish: Callable[[ShapingChange], None],
                 persist: Callable[[ShapingEntry], None],
                 entries: list[ShapingEntry] = ()) -> None:  # type: ignore[assignment]
        self.key = key
        self.destination = destination
        self.rules = rules
        self.now = now
        self.publish = publish
        self.persist = persist
        self._counts: dict[str, deque[float]] = {}
        #: A rule's (or an operator's) suspension and limit action in force.
        self.suspended_until = 0.0
        self.suspend_reason = ""
        self.action: RuleAction | None = None
        self.action_until = 0.0
        learned: Learned | None = None
        t = now()
        for entry in entries:
            if entry.learned is not None:
                learned = entry.learned
            elif entry.active(t):
                self._restore(entry)
        self.adaptive = (Adaptive(params, rate_from_config(limits.max_message_rate),
                                  limits.max_connections, t, learned)
                         if params.adaptive else None)

    def _restore(self, entry: ShapingEntry) -> None:
        until = entry.until if entry.until is not None else float("inf")
        if entry.suspend:
            self.suspended_until = max(self.suspended_until, until)
            self.suspend_reason = entry.reason
        else:
            self.action = RuleAction(
                rule=entry.origin.removeprefix("rule:"), suspend=False, duration=0.0,
                max_message_rate=entry.max_message_rate, max_connections=entry.max_connections,
                max_deliveries_per_connection=entry.max_deliveries_per_connection)
            self.action_until = until

    def reconfigure(self, limits: Limits) -> None:
        if self.adaptive is not None:
            self.adaptive.reconfigure(rate_from_config(limits.max_message_rate),
                                      limits.max_connections)

    # ------------------------------------------------------------------ what it may do

    def _limit(self) -> RuleAction | None:
        if self.action is not None and self.now() >= self.action_until:
            self.action = None
        return self.action

    def max_connections(self, configured: int) -> int:
        n = configured
        if self.adaptive is not None:
            n = min(n, self.adaptive.connections)
        action = self._limit()
        if action is not None and action.max_connections:
            n = min(n, action.max_connections)
        return max(1, n)

    def message_rate(self, configured: float | None) -> float | None:
        rates = [r for r in (configured,
                             self.adaptive.rate if self.adaptive is not None else None)
                 if r is not None]
        action = self._limit()
        if action is not None and action.max_message_rate:
            rates.append(action.max_message_rate)
        return min(rates) if rates else None

    def deliveries_per_connection(self, configured: int) -> int:
        action = self._limit()
        if action is not None and action.max_deliveries_per_connection:
            return min(configured, action.max_deliveries_per_connection)
        return configured

    def paused_until(self) -> float:
        """Unix time until which no connection may be opened nor job begun (after
        pushback, before the probe); 0 when not paused."""
        if self.adaptive is not None and self.adaptive.paused(self.now()):
            return self.adaptive.pause_until
        return 0.0

    @property
    def probing(self) -> bool:
        return self.adaptive is not None and self.adaptive.probing

    # ------------------------------------------------------------------ feedback

    def delivered(self) -> bool:
        """A message was accepted; True when the limits changed."""
        adaptive = self.adaptive
        if adaptive is None:
            return False
        before = adaptive.connections
        change = adaptive.delivered(self.now())
        if change is not None:
            self._adaptive_changed(change, "clean interval")
            return True
        return adaptive.connections != before  # slow start: not worth an event each

    def refused(self, code: int, enhanced: str | None, text: str, *, mx_host: str,
                provider: str, in_use: int, connection: bool = False) -> bool:
        """A reply that was not a success (or a failed connection: ``connection``);
        True when the limits or the suspension changed."""
        changed = False
        matched = self.rules.match(code, enhanced, text, mx_host=mx_host, provider=provider,
                                   domain=self.destination) if len(self.rules) else None
        reply = f"{code} {enhanced or ''} {text}".replace("  ", " ").strip()
        if matched is not None:
            rule_id, trigger, action = matched
            if self._triggered(rule_id, trigger):
                self._fire(action, reply)
                changed = True
        if self.adaptive is not None and (connection or is_pushback(code, enhanced)):
            change = self.adaptive.pushback(self.now(), in_use)
            if change is not None:
                self._adaptive_changed(change, reply)
            changed = True
        return changed

    def _triggered(self, rule_id: str, trigger: int) -> bool:
        now = self.now()
        seen = self._counts.setdefault(rule_id, deque())
        seen.append(now)
        while seen and seen[0] <= now - 3600.0:
            seen.popleft()
        if len(seen) >= trigger:
            seen.clear()
            return True
        return False

    def _fire(self, action: RuleAction, reply: str) -> None:
        now = self.now()
        until = now + action.duration
        before = self.describe()
        if action.suspend:
            self.suspended_until = max(self.suspended_until, until)
            self.suspend_reason = f"{action.rule}: {reply}"
        else:
            self.action, self.action_until = action, until
        self.publish(ShapingChange(queue_id="", scope=self.key, before=before,
                                   after=self.describe(), reason=reply, rule=action.rule,
                                   until=until))
        self.persist(ShapingEntry(
            scope=self.key, origin=f"rule:{action.rule}", suspend=action.suspend, until=until,
            since=now, reason=reply, max_message_rate=action.max_message_rate,
            max_connections=action.max_connections,
            max_deliveries_per_connection=action.max_deliveries_per_connection))

    def _adaptive_changed(self, change: str, reason: str) -> None:
        assert self.adaptive is not None
        before, _, after = change.partition(" -> ")
        self.publish(ShapingChange(queue_id="", scope=self.key, before=before, after=after,
                                   reason=reason, rule="adaptive"))
        self.persist(ShapingEntry(scope=self.key, origin="adaptive", since=self.now(),
                                  reason=reason, learned=self.adaptive.learned,
                                  until=self.now() + 7 * 86400.0))

    def describe(self) -> str:
        parts = []
        if self.suspended_until > self.now():
            parts.append("suspended")
        if self.adaptive is not None:
            parts.append(self.adaptive.describe())
        action = self._limit()
        if action is not None:
            parts.append(f"rule {action.rule} limits")
        return ", ".join(parts) or "configured limits"
