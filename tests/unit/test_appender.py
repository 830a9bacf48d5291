"""The log appender: one write per add outside ``run()``, one write per scheduler pass
inside it, nothing pending left behind by cancellation, ``close`` or ``reopen``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from relay.events import appender as appender_mod
from relay.events.appender import FLUSH_BYTES, Appender


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every os.write the appender makes, in order (the write still happens)."""
    seen: list[bytes] = []
    real = os.write

    def counting(fd: int, data: bytes) -> int:
        seen.append(bytes(data))
        return real(fd, data)

    monkeypatch.setattr(appender_mod.os, "write", counting)
    return seen


def test_outside_run_each_add_is_written_at_once(tmp_path: Path, writes: list[bytes]) -> None:
    log = Appender(str(tmp_path / "sub" / "a.log"))
    log.add(b"one\n")
    assert (tmp_path / "sub" / "a.log").read_bytes() == b"one\n"
    log.add(b"two\n")
    assert writes == [b"one\n", b"two\n"]
    log.close()
    log.add(b"after close\n")  # ignored, no error
    assert (tmp_path / "sub" / "a.log").read_bytes() == b"one\ntwo\n"


async def test_adds_of_one_pass_are_one_write(tmp_path: Path, writes: list[bytes]) -> None:
    path = tmp_path / "a.log"
    log = Appender(str(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        log.add(b"a\n")
        log.add(b"b\n")
        assert path.read_bytes() == b""  # still this pass
        await trio.testing.wait_all_tasks_blocked()
        assert path.read_bytes() == b"a\nb\n"
        assert writes == [b"a\nb\n"]
        log.add(b"c\n")
        await trio.testing.wait_all_tasks_blocked()
        assert writes == [b"a\nb\n", b"c\n"]
        nursery.cancel_scope.cancel()


async def test_a_large_batch_is_written_without_waiting(tmp_path: Path,
                                                        writes: list[bytes]) -> None:
    path = tmp_path / "a.log"
    log = Appender(str(path))
    line = b"x" * 1023 + b"\n"
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        for _ in range(FLUSH_BYTES // len(line)):
            log.add(line)
        assert path.stat().st_size == FLUSH_BYTES  # no pass ended, yet written
        assert len(writes) == 1
        nursery.cancel_scope.cancel()


async def test_cancelling_run_writes_what_is_pending(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = Appender(str(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        log.add(b"last words\n")
        nursery.cancel_scope.cancel()
    assert path.read_bytes() == b"last words\n"
    log.add(b"direct again\n")  # run() is over: written at once
    assert path.read_bytes() == b"last words\ndirect again\n"


async def test_close_and_reopen_write_pending_first(tmp_path: Path) -> None:
    path, rotated = tmp_path / "a.log", tmp_path / "a.log.1"
    log = Appender(str(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        log.add(b"before rotation\n")
        path.rename(rotated)
        log.reopen()
        log.add(b"after rotation\n")
        log.close()
        nursery.cancel_scope.cancel()
    assert rotated.read_bytes() == b"before rotation\n"
    assert path.read_bytes() == b"after rotation\n"


async def test_an_add_from_another_thread_is_written_at_once(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = Appender(str(path))
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        log.add(b"pending\n")
        await trio.to_thread.run_sync(log.add, b"from a thread\n")
        # the thread's line is on disk even though the batch of this task is pending
        # or already written: both end up in the file, neither is lost
        assert b"from a thread\n" in path.read_bytes()
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(path.read_bytes().splitlines()) == [b"from a thread", b"pending"]
        nursery.cancel_scope.cancel()


async def test_a_batch_that_cannot_be_written_is_logged_and_run_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "a.log"
    log = Appender(str(path))
    real = os.write

    def full_disk(fd: int, data: bytes) -> int:
        if b"doomed" in data:
            raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(appender_mod.os, "write", full_disk)
    async with trio.open_nursery() as nursery:
        await nursery.start(log.run)
        log.add(b"doomed\n")
        await trio.testing.wait_all_tasks_blocked()
        log.add(b"fine\n")
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert path.read_bytes() == b"fine\n"
    assert "cannot write a batch of log lines" in caplog.text
