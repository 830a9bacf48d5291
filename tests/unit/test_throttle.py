"""Token bucket and backoff arithmetic, on trio's MockClock (no sockets)."""

from __future__ import annotations

import pytest
import trio

from relay.outbound.throttle import TokenBucket, rate_from_config
from relay.outcomes.judge import backoff_delay


def test_backoff_doubles_and_caps():
    assert [backoff_delay(a, 300, 4000) for a in range(1, 7)] == [
        300, 600, 1200, 2400, 4000, 4000
    ]
    assert backoff_delay(0, 10, 100) == 10
    assert backoff_delay(10_000, 10, 100) == 100


def test_rate_from_config():
    assert rate_from_config("300/min") == 5.0
    assert rate_from_config("") is None
    assert rate_from_config(None) is None
    with pytest.raises(ValueError):
        rate_from_config("fast")


async def test_rate_never_exceeded_over_any_window(autojump_clock):
    """5/s with burst 5: over any window of T seconds at most 5 + 5*T acquisitions."""
    bucket = TokenBucket(5.0)
    stamps: list[float] = []

    async def taker() -> None:
        for _ in range(25):
            await bucket.acquire()
            stamps.append(trio.current_time())

    start = trio.current_time()
    async with trio.open_nursery() as n:
        for _ in range(4):
            n.start_soon(taker)
    assert len(stamps) == 100
    # 100 tokens, 5 at once, then 5/s: the last one at 19 s.
    assert stamps[-1] - start == pytest.approx(19.0, abs=1e-6)
    for i in range(len(stamps)):
        for j in range(i, len(stamps)):
            window = stamps[j] - stamps[i]
            assert j - i + 1 <= 5 + 5 * window + 1e-9


async def test_unlimited_never_waits(autojump_clock):
    bucket = TokenBucket(None)
    start = trio.current_time()
    for _ in range(1000):
        await bucket.acquire()
    assert trio.current_time() == start


async def test_reconfigure_keeps_earned_tokens_and_changes_rate(autojump_clock):
    bucket = TokenBucket(1.0, burst=1)
    await bucket.acquire()
    assert not bucket.try_acquire()
    bucket.reconfigure(10.0, burst=1)
    assert bucket.delay_for() == pytest.approx(0.1)
    start = trio.current_time()
    for _ in range(10):
        await bucket.acquire()
    assert trio.current_time() - start == pytest.approx(1.0, abs=1e-3)
    bucket.reconfigure(None)
    assert bucket.try_acquire()
    bucket.reconfigure(2.0)
    # Going from unlimited to limited starts with a full burst, not an infinite one.
    assert bucket.try_acquire(2.0) and not bucket.try_acquire()


async def test_fifo_fairness(autojump_clock):
    bucket = TokenBucket(1.0, burst=1)
    await bucket.acquire()
    order: list[int] = []

    async def waiter(i: int) -> None:
        await bucket.acquire()
        order.append(i)

    async with trio.open_nursery() as n:
        for i in range(5):
            n.start_soon(waiter, i)
            await trio.testing.wait_all_tasks_blocked()
    assert order == [0, 1, 2, 3, 4]
