"""Which outcomes put an address on the suppression list: the policy, pure.

``[bounces.suppress]`` maps a bounce class (its code, ``"22"``, or its name, ``"Mailbox
Full"``) or ``complaint`` to when the address is suppressed:

- ``"immediate"``: at the first such outcome;
- ``"never"``;
- ``"N/D"``: at the Nth within the duration D (``"3/7d"``: the third in seven days);

optionally as a table with how long the entry then holds: ``{ when = "3/7d", expires =
"30d" }`` (no ``expires``: until an operator removes it).

The shipped defaults (``DEFAULT_POLICY``), after Momentum/SparkPost: 10 Invalid Recipient
at once, 22 Mailbox Full at the third in seven days, 90 Unsubscribe and complaints at
once; every other class (the soft and transient ones, blocks, DNS failures) never. An
operator's entries replace the defaults class by class.

Scope, as SparkPost's list: a bounce blocks all mail to the address (it does not
exist, whoever sends); a complaint or an unsubscribe blocks only non-transactional
(campaign) mail, as the one-click unsubscribe does. The tenant is the message's.

``strikes(events, policy)`` turns events (in-session ``Bounce``/``Expiration``, ``OOB``,
``Complaint``) into the strikes the spool counts (``SuppressionList.strike``); only
events linked to one of our messages count (an unlinked report could name anybody), and
of the DSNs only "failed" ones (a "delayed" one is a warning: the remote MTA still
tries).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple, Protocol

from relay.config import parse_duration
from relay.events.types import OOB, Bounce, Complaint, Event, Expiration
from relay.model import ascii_int
from relay.outcomes.classify import _parse_class, class_name
from relay.spool.suppression import Strike, Suppression

__all__ = [
    "COMPLAINT",
    "COMPLAINT_TYPES",
    "DEFAULT_POLICY",
    "ClassRule",
    "SuppressPolicy",
    "parse_policy",
    "strikes",
]

#: The policy key of complaints (ARF reports).
COMPLAINT = "complaint"
#: ARF Feedback-Types that are a recipient's complaint (RFC 5965 7.3); "not-spam" and
#: "auth-failure" (RFC 6591, a DMARC failure report) are not.
COMPLAINT_TYPES = frozenset({"abuse", "fraud", "virus", "other", ""})
#: Classes and kinds whose entries block only non-transactional mail.
_CAMPAIGN_ONLY = frozenset({"90", COMPLAINT})
#: Longest reply kept in an entry's description.
_MAX_DESCRIPTION = 300


class ClassRule(NamedTuple):
    """``threshold`` outcomes within ``window`` seconds suppress (0: never; 1: at once);
    the entry then expires after ``expires`` seconds (None: never)."""

    threshold: int
    window: float = 0.0
    expires: float | None = None


NEVER = ClassRule(0)
IMMEDIATE = ClassRule(1)

DEFAULT_POLICY: dict[str, str] = {
    "10": "immediate", "22": "3/7d", "90": "immediate", COMPLAINT: "immediate"}


class _RuleSpec(Protocol):
    """What a table entry of ``[bounces.suppress]`` has (``config.SuppressRule``)."""

    when: str
    expires: str


def parse_when(text: str) -> tuple[int, float]:
    """``"immediate"`` -> (1, 0), ``"never"`` -> (0, 0), ``"3/7d"`` -> (3, 604800)."""
    word = text.strip().lower()
    if word == "immediate":
        return 1, 0.0
    if word == "never":
        return 0, 0.0
    count, sep, period = word.partition("/")
    n = ascii_int(count.strip(), max_digits=6)
    if not sep or n is None or n < 1:
        raise ValueError(f"\"{text}\" is not \"immediate\", \"never\" or \"N/D\" (\"3/7d\": "
                         "the third within seven days)")
    return n, parse_duration(period.strip())


def policy_key(key: str) -> str:
    """A table key as the policy stores it: ``"complaint"``, or a class code as text
    (``"Mailbox Full"`` -> ``"22"``). ValueError for anything else."""
    if key.strip().lower() == COMPLAINT:
        return COMPLAINT
    code = ascii_int(key.strip(), max_digits=3)
    return str(_parse_class(code if code is not None else key))


def parse_rule(value: str | _RuleSpec) -> ClassRule:
    when, expires = (value, "") if isinstance(value, str) else (value.when, value.expires)
    threshold, window = parse_when(when)
    if not threshold:
        return NEVER
    return ClassRule(threshold, window, parse_duration(expires) if expires else None)


class SuppressPolicy:
    """The rule of each class and of complaints (module docstring)."""

    def __init__(self, rules: Mapping[str, ClassRule]) -> None:
        self.rules = dict(rules)

    def rule(self, key: str) -> ClassRule:
        return self.rules.get(key, NEVER)


def parse_policy(table: Mapping[str, str | _RuleSpec]) -> SuppressPolicy:
    """The defaults with ``table``'s entries over them. Raises ValueError("KEY: reason")
    naming the table key as written."""
    rules = {k: parse_rule(v) for k, v in DEFAULT_POLICY.items()}
    seen: dict[str, str] = {}
    for key, value in table.items():
        try:
            norm = policy_key(key)
            if norm in seen:
                raise ValueError(f"the same class as \"{seen[norm]}\"")
            seen[norm] = key
            rules[norm] = parse_rule(value)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
    return SuppressPolicy(rules)


def strikes(events: Iterable[Event], policy: SuppressPolicy) -> list[Strike]:
    """The strikes ``events`` make under ``policy`` (module docstring)."""
    out: list[Strike] = []
    for e in events:
        strike = _strike(e, policy)
        if strike is not None:
            out.append(strike)
    return out


def _strike(e: Event, policy: SuppressPolicy) -> Strike | None:
    if isinstance(e, Complaint):
        if not e.queue_id or not e.recipient or e.feedback_type not in COMPLAINT_TYPES:
            return None
        key, source = COMPLAINT, "complaint"
        why = (f"complaint ({e.feedback_type or 'abuse'}) reported by "
               f"{e.reporting_mta or e.user_agent or 'unknown'}")
    elif isinstance(e, Bounce | Expiration | OOB):
        if e.bounce_class is None or not e.queue_id or not e.recipient:
            return None
        if isinstance(e, OOB) and e.action not in ("failed", ""):
            return None  # a delay warning (or a relayed notice): the MTA still tries
        key = str(e.bounce_class)
        source = "oob" if isinstance(e, OOB) else "bounce"
        rule_id = e.bounce_rule or "no rule"
        why = f"class {key} {class_name(e.bounce_class)} (rule {rule_id}): {e.reply}"
    else:
        return None
    rule = policy.rule(key)
    if not rule.threshold:
        return None
    campaign_only = key in _CAMPAIGN_ONLY
    entry = Suppression(
        address=e.recipient, tenant=e.tenant or "", source=source, time=e.time,
        expires=e.time + rule.expires if rule.expires is not None else None,
        transactional=not campaign_only, non_transactional=True,
        description=f"message {e.queue_id}: {why}"[:_MAX_DESCRIPTION])
    return Strike(entry=entry, counter=key, threshold=rule.threshold, window=rule.window)
