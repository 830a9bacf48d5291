"""Group commit: shared commits, durability before submit returns, shutdown, failures."""

from __future__ import annotations

import os
import time

import msgspec
import pytest
import trio
import trio.testing

from relay.spool import (
    Completion,
    DeliveryJob,
    Envelope,
    GroupCommitWriter,
    NewMessage,
    Recipient,
    Spool,
    SpoolClosed,
    SpoolError,
    new_queue_id,
    shard_hash,
)

MAP = 1 << 30


def make_msg(addr: str = "rcpt@example.com", size: int = 2048) -> NewMessage:
    qid = new_queue_id()
    env = Envelope(queue_id=qid, sender="s@example.org",
                   recipients=[Recipient(address=addr)], received_at=time.time())
    return NewMessage(envelope=env, data=(qid.encode() * (size // len(qid) + 1))[:size])


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool", MAP)
    yield s
    s.close()


async def test_group_commit_shares_commits_and_is_durable_on_return(spool):
    committed_batches: list[int] = []
    writer = GroupCommitWriter(spool, commit_window=0.005, max_batch=64,
                               on_commit=lambda msgs: committed_batches.append(len(msgs)))
    n = 200
    msgs = [make_msg() for _ in range(n)]
    not_visible: list[str] = []

    async def one(m: NewMessage) -> None:
        await writer.submit(m)
        # Fresh read transaction right after submit returned: the commit is there.
        with spool.env.begin() as txn:
            if txn.get(m.envelope.queue_id.encode(), db=spool._msg) != m.data:
                not_visible.append(m.envelope.queue_id)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            async with trio.open_nursery() as sessions:
                for m in msgs:
                    sessions.start_soon(one, m)
            await writer.aclose()
    assert not_visible == []
    assert writer.metrics.get("spool_messages_committed") == n
    assert sum(committed_batches) == n
    assert writer.metrics.get("spool_commits") == len(committed_batches) < n // 4  # really shared
    assert max(committed_batches) <= 64
    for m in msgs:
        assert spool.load(m.envelope.queue_id)[1] == m.data


async def test_single_submitter_latency_is_one_commit(spool):
    writer = GroupCommitWriter(spool, commit_window=0.0, max_batch=16)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for _ in range(5):
                await writer.submit(make_msg())
            await writer.aclose()
    assert writer.metrics.get("spool_commits") == 5


async def test_bad_message_fails_only_its_submitter(spool):
    writer = GroupCommitWriter(spool, commit_window=0.01, max_batch=16)
    good = make_msg()
    bad = make_msg()
    bad.envelope.recipients = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            with pytest.raises(ValueError):
                await writer.submit(bad)
            await writer.submit(good)
            await writer.aclose()
    assert spool.load(good.envelope.queue_id)[1] == good.data


async def test_commit_failure_raises_in_every_waiter(spool, monkeypatch):
    writer = GroupCommitWriter(spool, commit_window=0.01, max_batch=16)

    def boom(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool, "write_prepared", boom)
    errors: list[BaseException] = []

    async def one() -> None:
        try:
            await writer.submit(make_msg())
        except SpoolError as e:
            errors.append(e)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            async with trio.open_nursery() as sessions:
                for _ in range(10):
                    sessions.start_soon(one)
            await writer.aclose()
    assert len(errors) == 10 and writer.metrics.get("spool_commits_failed") >= 1
    assert spool.stats().messages == 0


async def test_logs_are_flushed_before_each_commit_and_on_stored_runs_before_the_waiters(
        spool, monkeypatch):
    """The order the event log promises: what was logged before a submission is flushed
    before its commit starts, and every ``on_stored`` of a batch runs (and is flushed)
    after the commit and before any of its submitters goes on (sends its 250)."""
    order: list[str] = []
    real = spool.write_prepared

    def write_prepared(*args, **kwargs):  # type: ignore[no-untyped-def]
        order.append("commit")
        return real(*args, **kwargs)

    monkeypatch.setattr(spool, "write_prepared", write_prepared)
    writer = GroupCommitWriter(spool, commit_window=0.01, max_batch=16,
                               flush_logs=lambda: order.append("flush"))
    msgs = [make_msg() for _ in range(3)]

    async def one(i: int, m: NewMessage) -> None:
        await writer.submit(m, on_stored=lambda: order.append(f"stored {i}"))
        order.append(f"returned {i}")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            async with trio.open_nursery() as sessions:
                for i, m in enumerate(msgs):
                    sessions.start_soon(one, i, m)
            await writer.aclose()
    assert order[:2] == ["flush", "commit"]
    stored = [x for x in order if x.startswith("stored")]
    returned = [x for x in order if x.startswith("returned")]
    assert len(stored) == len(returned) == 3
    # all stored callbacks, then a flush, then the first submitter runs
    first_return = order.index(returned[0])
    assert max(order.index(x) for x in stored) < order.index("flush", 2) < first_return


async def test_on_stored_is_not_called_for_a_failed_commit_or_a_used_guard(
        spool, monkeypatch):
    writer = GroupCommitWriter(spool, commit_window=0.0, max_batch=16)
    called: list[str] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            guard = (b"key-1", b"record", 0.0)
            assert await writer.submit_many([make_msg()], guard,
                                            on_stored=lambda: called.append("first")) is None
            assert await writer.submit_many([make_msg()], guard,
                                            on_stored=lambda: called.append("again")) == b"record"
            assert await writer.submit_many([], None,
                                            on_stored=lambda: called.append("nothing")) is None

            def boom(*args):  # type: ignore[no-untyped-def]
                raise OSError(28, "No space left on device")

            monkeypatch.setattr(spool, "write_prepared", boom)
            with pytest.raises(SpoolError):
                await writer.submit(make_msg(), on_stored=lambda: called.append("failed"))
            await writer.aclose()
    assert called == ["first", "nothing"]


async def test_aclose_flushes_pending_then_refuses(spool):
    writer = GroupCommitWriter(spool, commit_window=5.0, max_batch=1000)  # long window
    msgs = [make_msg() for _ in range(20)]
    done: list[str] = []

    async def one(m: NewMessage) -> None:
        await writer.submit(m)
        done.append(m.envelope.queue_id)

    with trio.fail_after(10):  # aclose must cut the 5 s window short
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            async with trio.open_nursery() as sessions:
                for m in msgs:
                    sessions.start_soon(one, m)
                await trio.testing.wait_all_tasks_blocked()
                await writer.aclose()
    assert len(done) == 20
    with pytest.raises(SpoolClosed):
        await writer.submit(make_msg())


async def test_cancelled_writer_fails_waiters_instead_of_hanging(spool):
    writer = GroupCommitWriter(spool, commit_window=60.0, max_batch=1000)
    outcome: list[str] = []

    async def one() -> None:
        try:
            await writer.submit(make_msg())
            outcome.append("stored")
        except SpoolClosed:
            outcome.append("closed")

    with trio.fail_after(10):
        async with trio.open_nursery() as sessions, trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for _ in range(3):
                sessions.start_soon(one)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert outcome == ["closed"] * 3


async def test_completion_callbacks_hear_of_failed_commits_and_a_stopped_writer(
        spool, monkeypatch):
    """A completion's submitter does not wait, so its callback must always be called:
    with the error when the commit fails, SpoolClosed when the writer stops first."""
    spool.store_batch([make_msg(f"u{i}@example.com") for i in range(2)])
    a, b = spool.due_jobs(time.time() + 1, 0, 1, 10)
    heard: list[BaseException | None] = []

    def completion(j: DeliveryJob) -> Completion:
        return Completion(queue_id=j.queue_id, domain=j.domain, delivered=j.recipients)

    def boom(*args):
        raise OSError(5, "Input/output error")

    with trio.fail_after(10):
        writer = GroupCommitWriter(spool, commit_window=0.0)
        with monkeypatch.context() as m:
            m.setattr(spool, "write_prepared", boom)
            async with trio.open_nursery() as nursery:
                await nursery.start(writer.run)
                writer.submit_completion(completion(a), heard.append)
                await writer.aclose()
        assert len(heard) == 1 and isinstance(heard[0], OSError)

        writer = GroupCommitWriter(spool, commit_window=60.0)  # it would linger
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            writer.submit_completion(completion(b), heard.append)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        assert len(heard) == 2 and isinstance(heard[1], SpoolClosed)
        with pytest.raises(SpoolClosed):
            writer.submit_completion(completion(b), heard.append)
    assert len(heard) == 2
    assert spool.stats().messages == 2  # nothing was recorded: both still queued


async def test_completions_share_commits_with_inbound(spool):
    stored: list[str] = []
    writer = GroupCommitWriter(spool, commit_window=0.005, max_batch=1000,
                               on_commit=lambda msgs: stored.extend(m.envelope.queue_id
                                                                    for m in msgs))
    first = [make_msg(f"u{i}@d{i % 5}.example") for i in range(30)]
    spool.store_batch(first)
    jobs = spool.due_jobs(time.time() + 1, 0, 1, 100)
    assert len(jobs) == 30
    second = [make_msg() for _ in range(30)]
    bounce = make_msg("s@example.org")
    bounce.envelope.sender = ""

    committed: list[str] = []

    async def complete(j) -> None:
        failed = j.queue_id == jobs[0].queue_id

        def on_done(error: BaseException | None) -> None:
            assert error is None
            assert spool.show(j.queue_id) is None  # committed when told so
            committed.append(j.queue_id)

        writer.submit_completion(Completion(
            queue_id=j.queue_id, domain=j.domain, delivered=[] if failed else j.recipients,
            failed=j.recipients if failed else [], new_messages=[bounce] if failed else []),
            on_done)
        await trio.lowlevel.checkpoint()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            async with trio.open_nursery() as work:
                for j in jobs:
                    work.start_soon(complete, j)
                for m in second:
                    work.start_soon(writer.submit, m)
            await writer.aclose()
    assert sorted(committed) == sorted(j.queue_id for j in jobs)
    assert writer.metrics.get("spool_completions_committed") == 30
    assert writer.metrics.get("spool_messages_committed") == 30
    assert writer.metrics.get("spool_commits") < 10
    assert sorted(stored) == sorted([m.envelope.queue_id for m in second]
                                    + [bounce.envelope.queue_id])
    st = spool.stats()
    assert st.messages == 31 and spool.verify() == []


# --------------------------------------------------------------------------- claimant


class _Claimant:
    """Wants the jobs of ``domains``; records what it is handed."""

    lease = 600.0
    pid = os.getpid()

    def __init__(self, domains: set[str]) -> None:
        self.hashes = {shard_hash(d) for d in domains}
        self.adopted: list[tuple[DeliveryJob, Envelope, bytes]] = []

    def wants(self, domain_hash: int) -> bool:
        return domain_hash in self.hashes

    def adopt(self, jobs: list[tuple[DeliveryJob, Envelope, bytes]]) -> None:
        self.adopted.extend(jobs)


async def test_claimant_jobs_are_stored_claimed_and_handed_over_after_the_commit(spool):
    claimant = _Claimant({"mine.test"})
    writer = GroupCommitWriter(spool, 0.0, 64, claimant=claimant)
    msg = make_msg("a@mine.test")
    msg.envelope.recipients.append(Recipient(address="b@theirs.test"))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            t0 = time.time()
            await writer.submit(msg)
            await writer.aclose()
    # Handed over: only our domain's job, with the message exactly as stored.
    assert [(j.domain, j.recipients) for j, _, _ in claimant.adopted] == [("mine.test", [0])]
    job, env, data = claimant.adopted[0]
    assert env.queue_id == msg.envelope.queue_id and data == msg.data
    assert job.claimed_by == os.getpid() and job.due >= t0 + claimant.lease
    # Stored claimed: the scheduler's own claim finds only the other domain's job ...
    due = spool.due_jobs(time.time() + 1, 0, 1, 100)
    assert [j.domain for j in due] == ["theirs.test"]
    # ... and the claim is a real one: released for a dead pid like any other.
    with spool.env.begin(write=True) as txn:  # pretend the claiming process died
        key = msg.envelope.queue_id.encode() + b"\x00mine.test"
        stored = msgspec.msgpack.decode(txn.get(key, db=spool._job), type=DeliveryJob)
        assert stored.claimed_by == os.getpid()
        stored.claimed_by = 2**22 + 12345  # above pid_max: never alive
        txn.put(key, msgspec.msgpack.encode(stored), db=spool._job)
    assert spool.release_claims() == 1
    assert [j.domain for j in spool.due_jobs(time.time() + 1, 0, 1, 100)] == ["mine.test"]


async def test_claimant_gets_nothing_from_a_failed_commit(spool, monkeypatch):
    claimant = _Claimant({"mine.test"})
    writer = GroupCommitWriter(spool, 0.0, 64, claimant=claimant)

    def boom(*a: object, **k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool, "write_prepared", boom)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            with pytest.raises(SpoolError):
                await writer.submit(make_msg("a@mine.test"))
            nursery.cancel_scope.cancel()
    assert claimant.adopted == []
