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

import os
import secrets
import threading
import time

__all__ = ["QUEUE_ID_LENGTH", "new_queue_id", "queue_id_time"]

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_DECODE = {c: i for i, c in enumerate(_ALPHABET)}
QUEUE_ID_LENGTH = 18

_lock = threading.Lock()
#: ``pid`` is -1 until the first id of this process (and again in a forked child).
_state = {"pid": -1, "last_ms": 0, "counter": 0}
#: Digits of the current pid (4) and of the last millisecond (9): shared by many ids.
_cache = {"pid": "", "ms": -1, "ms_digits": ""}


def _forget_process() -> None:
    """In a forked child: start over with its own pid, counter and a fresh lock (the
    parent's may have been held by another thread at the fork). Registered with
    ``os.register_at_fork`` so that ``new_queue_id`` needs no ``getpid`` system call."""
    global _lock
    _lock = threading.Lock()
    _state["pid"] = -1


os.register_at_fork(after_in_child=_forget_process)


# Two digits per 10 bits. The three fields are 45, 20 and 25 bits wide, multiples of
# 5, so each maps to its own digits and an id is a few table lookups (base64.b32encode
# is pure Python in 3.11 and cost more than the rest of new_queue_id together).
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]


def _digits(value: int, n: int) -> str:
    """``value`` as ``n`` base32 digits (n odd: a single leading digit, then pairs)."""
    out = [_ALPHABET[(value >> (5 * (n - 1))) & 31]] if n % 2 else []
    for shift in range(10 * (n // 2 - 1), -1, -10):
        out.append(_PAIRS[(value >> shift) & 0x3FF])
    return "".join(out)


def new_queue_id() -> str:
    """A new queue id (see the module docstring for the layout and the guarantees).

    Thread-safe and fork-aware: a forked child gets a fresh counter and its own pid.
    """
    now_ms = time.time_ns() // 1_000_000
    with _lock:
        if _state["pid"] < 0:
            pid = os.getpid()
            _state["pid"] = pid
            _state["counter"] = secrets.randbits(25)
            _state["last_ms"] = 0
            _cache["pid"] = _digits(pid & 0xFFFFF, 4)
        # Monotonic within a process even if the wall clock steps back.
        ms = max(now_ms, _state["last_ms"])
        _state["last_ms"] = ms
        counter = _state["counter"] = (_state["counter"] + 1) & 0x1FFFFFF
        if ms != _cache["ms"]:
            _cache["ms"], _cache["ms_digits"] = ms, _digits(ms, 9)
        # (ms << 45) | (pid << 25) | counter: 90 bits = 18 digits, 9 + 4 + 5.
        return _cache["ms_digits"] + _cache["pid"] + _digits(counter, 5)


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
