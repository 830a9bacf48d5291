"""One commit per request, and idempotent requests: a key's messages are stored once,
with the answer a retry gets, inside the same transaction (real LMDB)."""

from __future__ import annotations

import time

import pytest
import trio

from relay.spool import GroupCommitWriter, Spool
from tests.integration.test_spool_writer import MAP, make_msg


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool", MAP)
    yield s
    s.close()


async def run_writer(spool: Spool, nursery: trio.Nursery, **kw) -> GroupCommitWriter:
    writer = GroupCommitWriter(spool, commit_window=0.0, **kw)
    await nursery.start(writer.run)
    return writer


async def test_submit_many_is_one_commit_even_past_max_batch(spool):
    sizes: list[int] = []
    async with trio.open_nursery() as nursery:
        writer = await run_writer(spool, nursery, max_batch=8,
                                  on_commit=lambda msgs: sizes.append(len(msgs)))
        await writer.submit_many([make_msg() for _ in range(50)])
        nursery.cancel_scope.cancel()
    assert sizes == [50]
    assert spool.stats().messages == 50


async def test_a_guarded_request_is_stored_once_and_its_record_returned(spool):
    key, fresh = b"acme\0req-1", time.time() - 3600
    async with trio.open_nursery() as nursery:
        writer = await run_writer(spool, nursery)
        first = await writer.submit_many([make_msg(), make_msg()], (key, b"answer-1", fresh))
        again = await writer.submit_many([make_msg(), make_msg()], (key, b"answer-2", fresh))
        other = await writer.submit_many([make_msg()], (b"acme\0req-2", b"answer-3", fresh))
        nursery.cancel_scope.cancel()
    assert first is None
    assert again == b"answer-1"
    assert other is None
    assert spool.stats().messages == 3
    assert spool.idempotent_record(key, fresh) == b"answer-1"


async def test_an_expired_record_no_longer_guards_and_is_purged(spool):
    key = b"acme\0old"
    async with trio.open_nursery() as nursery:
        writer = await run_writer(spool, nursery)
        await writer.submit_many([make_msg()], (key, b"old", 0.0))
        # Everything written before "now + 1" has expired for this request.
        later = time.time() + 1
        assert await writer.submit_many([make_msg()], (key, b"new", later)) is None
        nursery.cancel_scope.cancel()
    assert spool.stats().messages == 2
    assert spool.idempotent_record(key, 0.0) == b"new"
    assert spool.purge_idempotency(time.time() - 3600) == 0
    assert spool.purge_idempotency(time.time() + 10) == 1
    assert spool.idempotent_record(key, 0.0) is None


async def test_two_writers_racing_with_one_key_store_the_messages_once(spool):
    # Two workers get the same retried request at the same moment; each has its own
    # writer (and commit thread): the check inside the commit lets one of them store.
    key, fresh = b"acme\0race", time.time() - 60
    answers: list[bytes | None] = []
    async with trio.open_nursery() as nursery:
        wa = await run_writer(spool, nursery)
        wb = await run_writer(spool, nursery)

        async def send(writer: GroupCommitWriter, record: bytes) -> None:
            answers.append(await writer.submit_many([make_msg(), make_msg()],
                                                    (key, record, fresh)))

        async with trio.open_nursery() as both:
            both.start_soon(send, wa, b"from-a")
            both.start_soon(send, wb, b"from-b")
        nursery.cancel_scope.cancel()
    assert len(answers) == 2 and answers.count(None) == 1
    winner = spool.idempotent_record(key, fresh)
    assert winner in (b"from-a", b"from-b") and winner in answers
    assert spool.stats().messages == 2


async def test_a_message_the_spool_refuses_stores_none_of_the_request(spool):
    bad = make_msg()
    bad.envelope.recipients = []
    async with trio.open_nursery() as nursery:
        writer = await run_writer(spool, nursery)
        with pytest.raises(ValueError):
            await writer.submit_many([make_msg(), bad])
        nursery.cancel_scope.cancel()
    assert spool.stats().messages == 0
