"""The one way into the spool: ordered stages, then the group commit, then Reception.

Whatever carried a message (SMTP today, the HTTP API next, a DSN of ours), it enters as
an ``Admission`` and goes through the same ``Intake``:

1. each ``Stage`` in order looks at it and may add header lines, change its envelope,
   or refuse it with an SMTP reply (``Refused``; the carrier turns that into its own
   error: the SMTP reply itself, an HTTP status);
2. the final bytes (the stages' header lines in front of the message as received) are
   committed by the worker's ``GroupCommitWriter`` (durable before the caller answers);
3. a ``Reception`` event is published.

A stage is one small class with one method, ``admit(admission)``; adding one is that
class and one line in ``default_stages``. Signing must come last, so that it signs the
final bytes once. Generated messages (DSNs) are committed together with the outcome that
caused them (one transaction), so they go through ``Intake.prepare`` (the stages only)
and the engine stores them with the completion.
"""

from relay.intake.admission import Admission, Refused
from relay.intake.intake import Intake, Stage
from relay.intake.stages import LoopCheck, MessageId, TraceHeaders, default_stages

__all__ = [
    "Admission",
    "Intake",
    "LoopCheck",
    "MessageId",
    "Refused",
    "Stage",
    "TraceHeaders",
    "default_stages",
]
