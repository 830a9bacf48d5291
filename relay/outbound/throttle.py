"""Per-destination limits: token buckets for rates.

Why a token bucket: ``max_message_rate = "300/min"`` must hold over *any* window, not on
average over an hour, so bursts are bounded by the bucket's capacity. The capacity
(``burst``) defaults to one second's worth of tokens (at least 1): a fresh destination may
send that many at once, then exactly ``rate`` per second. Over a window of ``T`` seconds
at most ``burst + rate * T`` acquisitions succeed; that bound is what the tests check.

All time comes from ``trio.current_time()`` so ``trio.testing.MockClock`` drives it.
The buckets are per-process objects (principle 4: a destination lives in exactly one
worker), never shared across processes.
"""

from __future__ import annotations

import math

import trio

from relay.config import parse_rate

__all__ = ["TokenBucket", "rate_from_config"]


def rate_from_config(value: str | None) -> float | None:
    """``"300/min"`` -> 5.0 per second; ``""``/None -> None (unlimited)."""
    if not value:
        return None
    return parse_rate(value)


class TokenBucket:
    """A token bucket refilled continuously at ``rate`` tokens/s up to ``burst`` tokens.

    ``rate=None`` means unlimited: ``acquire`` only checkpoints. ``reconfigure`` changes
    rate and burst in place (SIGHUP) and keeps the tokens already earned (clamped to the
    new burst), so a reload neither grants a fresh burst nor stalls senders.

    Waiters are served FIFO: ``acquire`` is guarded by a ``trio.Lock`` (which is fair), so
    one connection cannot starve the others of tokens.
    """

    def __init__(self, rate: float | None, burst: float | None = None) -> None:
        self._lock = trio.Lock()
        self.rate: float | None = None
        self.burst = 1.0
        self._tokens = 0.0
        self._stamp = trio.current_time()
        self.reconfigure(rate, burst, initial=True)

    def reconfigure(self, rate: float | None, burst: float | None = None, *,
                    initial: bool = False) -> None:
        """Apply a new rate (None = unlimited); ``burst`` defaults to max(1, rate)."""
        self._refill()
        self.rate = rate
        if rate is None:
            self.burst = math.inf
            self._tokens = math.inf
            return
        self.burst = float(burst) if burst is not None else max(1.0, rate)
        if initial or math.isinf(self._tokens):
            self._tokens = self.burst
        self._tokens = min(self._tokens, self.burst)

    def _refill(self) -> None:
        now = trio.current_time()
        if self.rate is not None and not math.isinf(self._tokens):
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def try_acquire(self, n: float = 1.0) -> bool:
        """Take ``n`` tokens if they are there now; never blocks."""
        self._refill()
        if self._tokens >= n:
            self._tokens -= n
            return True
        return False

    def take_or_wait(self, n: float) -> float:
        """Take ``n`` tokens now and return 0 if at least ``min(n, burst)`` are there (a
        request bigger than the burst runs the bucket into debt, repaid before the next
        one); else take nothing and return the seconds until that many are there."""
        need = min(n, self.burst)
        wait = self.delay_for(need)
        if wait == 0.0:
            self._tokens -= n
        return wait

    def delay_for(self, n: float = 1.0) -> float:
        """Seconds until ``n`` tokens will be available (0 if now)."""
        self._refill()
        if self.rate is None or self._tokens >= n:
            return 0.0
        return (n - self._tokens) / self.rate

    async def acquire(self, n: float = 1.0) -> None:
        """Wait (FIFO among waiters) until ``n`` tokens are available, then take them."""
        if self.rate is None:
            # Unlimited (the common case): nobody ever waits, so there is no order to
            # keep; one checkpoint instead of the lock's two and a third after it.
            await trio.lowlevel.checkpoint()
            return
        async with self._lock:
            while True:
                if self.try_acquire(n):
                    break
                # A reconfigure during the sleep is picked up on the next loop turn.
                await trio.sleep(max(self.delay_for(n), 1e-6))
        await trio.lowlevel.checkpoint()
