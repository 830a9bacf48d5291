"""Queue ids: short, unique, roughly time-sortable ASCII names for queued messages.

Inbound asks for the id *before* the message is stored because it goes into the
``Received:`` header (``... with ESMTP id 0KQ3V7N8C1A2B3C4D5``), exactly like Postfix's long
queue ids. Layout, 18 characters of Crockford base32 (``0-9A-Z`` without ``I L O U``; the
alphabet is in ASCII order so string order is numeric order):

======  =====  ===========================================================
chars   bits   meaning
======  =====  ===========================================================
0-8     45     Unix time in milliseconds (good until the year 3084)
9-12    20     process id (mod 2**20; Linux pid_max is at most 2**22)
13-17   25     per-process counter, starting at a random value
======  =====  ===========================================================

Uniqueness: two live processes never share a pid, and within one process the
(millisecond, counter) pair never repeats because the millisecond part is made
monotonic and the counter advances on every call (2**25 ids before it could wrap, far
more than one process makes in a millisecond). The random counter start guards against
a restarted worker that re-uses a pid within the same millisecond. As a last line of
defence ``Spool.store_batch`` refuses to overwrite an existing id (``DuplicateQueueId``).
Sorting ids sorts messages by arrival time (to the millisecond, across processes),
which is what the spool's key order and ``relay queue list`` rely on.
"""

from __future__ import annotations

import base64
import os
import secrets
import threading
import time

__all__ = ["QUEUE_ID_LENGTH", "new_queue_id", "queue_id_time"]

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {c: i for i, c in enumerate(_ALPHABET)}
QUEUE_ID_LENGTH = 18

_lock = threading.Lock()
_state = {"pid": -1, "last_ms": 0, "counter": 0}


# base64.b32encode (C speed) with its alphabet translated to ours, value for value.
_TO_CROCKFORD = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", _ALPHABET.encode())


def new_queue_id() -> str:
    """A new queue id (see the module docstring for the layout and the guarantees).

    Thread-safe and fork-aware: a forked child gets a fresh counter and its own pid.
    """
    now_ms = time.time_ns() // 1_000_000
    with _lock:
        pid = os.getpid()
        if pid != _state["pid"]:
            _state["pid"] = pid
            _state["counter"] = secrets.randbits(25)
            _state["last_ms"] = 0
        # Monotonic within a process even if the wall clock steps back.
        ms = max(now_ms, _state["last_ms"])
        _state["last_ms"] = ms
        counter = _state["counter"] = (_state["counter"] + 1) & 0x1FFFFFF
    value = (ms << 45) | ((pid & 0xFFFFF) << 25) | counter  # 90 bits = 18 digits
    raw = base64.b32encode((value << 6).to_bytes(12, "big"))
    return raw[:QUEUE_ID_LENGTH].translate(_TO_CROCKFORD).decode("ascii")


def queue_id_time(queue_id: str) -> float:
    """Creation time (Unix seconds) encoded in a queue id; ValueError if it is not one."""
    if len(queue_id) != QUEUE_ID_LENGTH:
        raise ValueError(f"not a queue id: {queue_id!r}")
    ms = 0
    try:
        for c in queue_id[:9]:
            ms = ms * 32 + _DECODE[c]
    except KeyError:
        raise ValueError(f"not a queue id: {queue_id!r}") from None
    return ms / 1000.0
