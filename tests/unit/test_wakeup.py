"""The cross-worker wake-up datagram (unix sockets in tmp_path; no network)."""

from __future__ import annotations

import trio

from relay.outbound.wakeup import Waker


async def test_notify_wakes_the_listener_and_coalesces(tmp_path):
    waker = Waker(tmp_path / "spool")
    with waker.listen(3) as listener:
        waker.notify({3})
        waker.notify([3, 3])
        with trio.fail_after(5):
            await listener.wait()
        assert listener.received == 3  # one wait() drains every pending datagram
        with trio.move_on_after(0.05) as scope:
            await listener.wait()
        assert scope.cancelled_caught
    waker.close()


def test_notify_without_listener_is_silent(tmp_path):
    waker = Waker(tmp_path / "nowhere")
    waker.notify({0, 1, 2})  # no socket file, no directory: ignored
    assert waker.metrics.get("wakeups_sent") == 0
    waker.close()


async def test_long_spool_paths_use_an_abstract_address(tmp_path):
    deep = tmp_path / ("d" * 100) / "spool"
    waker = Waker(deep)
    assert isinstance(waker.address(0), bytes)
    with waker.listen(0) as listener:
        waker.notify({0})
        with trio.fail_after(5):
            await listener.wait()
    waker.close()


async def test_a_restarted_listener_replaces_a_stale_socket(tmp_path):
    waker = Waker(tmp_path / "spool")
    first = waker.listen(1)
    first._sock.close()  # crashed worker: the socket file is left behind
    with waker.listen(1) as second:
        waker.notify({1})
        with trio.fail_after(5):
            await second.wait()
    waker.close()


def test_addresses_are_stable_per_shard_and_distinct(tmp_path):
    waker = Waker(tmp_path / "spool")
    first = [waker.address(shard) for shard in range(4)]
    assert len(set(first)) == 4
    assert [waker.address(shard) for shard in range(4)] == first
    other = Waker(tmp_path / "spool")  # another process computes the same names
    assert [other.address(shard) for shard in range(4)] == first
    waker.close()
    other.close()
