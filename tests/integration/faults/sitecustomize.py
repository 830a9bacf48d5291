"""Fault injection for tests/integration/test_faults.py, loaded by a relay subprocess
whose PYTHONPATH starts with this directory (Python imports ``sitecustomize`` at start).

It stands for "a bug we have not found yet": any address starting with ``crash-inbound``
makes the inbound session's recipient decision raise, and any recipient starting with
``crash-outbound`` makes the delivery's ``begin`` raise. Nothing here ships in the relay.
"""

from __future__ import annotations


class InjectedFault(RuntimeError):
    pass


def _install() -> None:
    from relay.inbound import session as inbound
    from relay.outbound import session as outbound

    decide = inbound._Session._decide_recipient
    begin = outbound.ClientSession.begin

    def faulty_decide(self, event):  # type: ignore[no-untyped-def]
        if event.address.startswith("crash-inbound"):
            raise InjectedFault(f"injected fault for {event.address}")
        return decide(self, event)

    def faulty_begin(self, envelope, recipients, data, **kw):  # type: ignore[no-untyped-def]
        for i in recipients:
            if envelope.recipients[i].address.startswith("crash-outbound"):
                raise InjectedFault(f"injected fault for {envelope.recipients[i].address}")
        return begin(self, envelope, recipients, data, **kw)

    inbound._Session._decide_recipient = faulty_decide  # type: ignore[method-assign]
    outbound.ClientSession.begin = faulty_begin  # type: ignore[method-assign]


_install()
