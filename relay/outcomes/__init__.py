"""Pure judgement of delivery outcomes: retry, bounce, expire, the events they imply and
the DSN owed (RFC 3464). No I/O: the delivery engine applies what ``judge`` decides.
Imports only ``relay.model`` and the event records."""

from relay.outcomes.judge import Attempt, RetryPolicy, Verdict, backoff_delay, judge

__all__ = ["Attempt", "RetryPolicy", "Verdict", "backoff_delay", "judge"]
