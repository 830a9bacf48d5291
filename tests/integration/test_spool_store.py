"""The spool's synchronous API against a real LMDB environment in tmp_path."""

from __future__ import annotations

import multiprocessing
import time
import zlib
from pathlib import Path

import lmdb
import msgspec
import pytest

from relay.spool import (
    SCHEMA_VERSION,
    DuplicateQueueId,
    Envelope,
    MessageNotFound,
    NewMessage,
    QueueStats,
    Recipient,
    Spool,
    SpoolVersionError,
    new_queue_id,
    shard_hash,
    shard_of,
)

MAP = 1 << 30


def make_msg(*addrs: str, data: bytes | None = None, qid: str | None = None) -> NewMessage:
    qid = qid or new_queue_id()
    env = Envelope(
        queue_id=qid,
        sender="sender@example.org",
        recipients=[Recipient(address=a) for a in addrs],
        received_at=time.time(),
    )
    body = data if data is not None else b"Subject: " + qid.encode() + b"\r\n\r\nhello\r\n"
    return NewMessage(envelope=env, data=body)


@pytest.fixture
def spool(tmp_path):
    s = Spool(tmp_path / "spool", MAP)
    yield s
    s.close()


def test_store_and_load_roundtrip(spool):
    big = bytes(range(256)) * 40_000  # 10 MB: overflow pages
    m1 = make_msg("a@x.example", "b@X.example.", "c@y.example")
    m2 = make_msg("d@z.example", data=big)
    spool.store_batch([m1, m2])
    env, data = spool.load(m1.envelope.queue_id)
    assert env == m1.envelope
    assert data == m1.data
    assert spool.load(m2.envelope.queue_id)[1] == big
    detail = spool.show(m1.envelope.queue_id)
    assert {j.domain: j.recipients for j in detail.jobs} == {"x.example": [0, 1], "y.example": [2]}
    assert detail.headers.startswith("Subject: ")
    with pytest.raises(MessageNotFound):
        spool.load("NOPE")


def test_load_many_reads_in_order_within_budget(spool):
    ms = [make_msg("a@x.example", data=bytes([65 + i]) * 1000) for i in range(4)]
    spool.store_batch(ms)
    qids = [m.envelope.queue_id for m in ms]
    got = spool.load_many(["NOPE", qids[0], qids[1], qids[0], qids[2], qids[3]], 2500)
    assert list(got) == qids[:2]  # gone ids skipped, duplicates once, stops before 3000
    assert got[qids[1]] == (ms[1].envelope, ms[1].data)
    assert spool.load_many(qids, 0) == {}
    assert list(spool.load_many(qids, 10**6)) == qids


def test_rejects_bad_messages_atomically(spool):
    good = make_msg("a@x.example")
    with pytest.raises(ValueError):
        spool.store_batch([good, make_msg()])  # no recipients
    with pytest.raises(MessageNotFound):
        spool.load(good.envelope.queue_id)
    spool.store_batch([good])
    with pytest.raises(DuplicateQueueId):
        spool.store_batch([make_msg("b@x.example", qid=good.envelope.queue_id)])
    assert spool.load(good.envelope.queue_id)[1] == good.data


def test_schema_version(tmp_path):
    path = tmp_path / "spool"
    Spool(path, MAP).close()
    Spool(path, MAP).close()  # reopen: same version is fine
    env = lmdb.open(str(path), map_size=MAP, max_dbs=8)
    meta = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        assert txn.get(b"schema_version", db=meta) == str(SCHEMA_VERSION).encode()
        txn.put(b"schema_version", str(SCHEMA_VERSION + 1).encode(), db=meta)
    env.close()
    with pytest.raises(SpoolVersionError, match="newer"):
        Spool(path, MAP)


def test_shard_of_is_stable():
    assert shard_hash("Example.COM") == zlib.crc32(b"example.com")
    assert shard_of("example.com", 4) == zlib.crc32(b"example.com") % 4
    assert all(0 <= shard_of(f"d{i}.example", 3) < 3 for i in range(50))


def test_due_jobs_claims_by_shard_and_lease(spool):
    domains = [f"d{i}.example" for i in range(12)]
    msgs = [make_msg(f"u@{d}") for d in domains]
    spool.store_batch(msgs)
    now = time.time() + 0.01
    nshards = 3
    seen = []
    for shard in range(nshards):
        nd = spool.next_due(shard, nshards)
        jobs = spool.due_jobs(now, shard, nshards, limit=100, lease=30)
        assert all(shard_of(j.domain, nshards) == shard for j in jobs)
        if jobs:
            assert nd is not None and nd <= now
        for j in jobs:
            assert j.due == pytest.approx(now + 30)
            assert j.claimed_by is not None
        seen += [(j.queue_id, j.domain) for j in jobs]
        # Claimed: not handed out twice before the lease expires...
        assert spool.due_jobs(now, shard, nshards, 100, lease=30) == []
        # ... the next due time of the shard is the lease expiry.
        if jobs:
            assert spool.next_due(shard, nshards) == pytest.approx(now + 30, abs=0.002)
    expected = [(m.envelope.queue_id, d) for m, d in zip(msgs, domains, strict=True)]
    assert sorted(seen) == sorted(expected)
    # After the lease, a crashed worker's jobs are due again (nothing lost).
    again = []
    for shard in range(nshards):
        again += spool.due_jobs(now + 31, shard, nshards, 100)
    assert len(again) == len(domains)


def test_due_jobs_limit_and_order(spool):
    early = make_msg("a@one.example")
    late = make_msg("b@one.example")
    spool.store_batch([early])
    spool.store_batch([late])
    jobs = spool.due_jobs(time.time() + 1, 0, 1, limit=1)
    assert [j.queue_id for j in jobs] == [early.envelope.queue_id]
    assert spool.due_jobs(time.time() - 100, 0, 1, limit=10) == []  # nothing due yet then


def test_complete_partial_then_full(spool):
    m = make_msg("a@x.example", "b@x.example", "c@x.example", "d@y.example")
    qid = m.envelope.queue_id
    spool.store_batch([m])
    claimed = spool.due_jobs(time.time() + 1, 0, 1, 10)
    assert {j.domain for j in claimed} == {"x.example", "y.example"}
    t0 = time.time()
    spool.complete(qid, "x.example", delivered=[0], failed=[1], deferred=[2],
                   next_due=t0 + 100, attempts=1, error="451 4.7.1 later", first_attempt=t0)
    (j,) = [j for j in spool.show(qid).jobs if j.domain == "x.example"]
    assert j.recipients == [2] and j.attempts == 1 and j.last_error == "451 4.7.1 later"
    assert j.claimed_by is None and j.due == t0 + 100 and j.first_attempt == t0
    assert spool.due_jobs(t0 + 99, 0, 1, 10) == []  # y.example was claimed, x deferred
    assert [j.domain for j in spool.due_jobs(t0 + 101, 0, 1, 10)] == ["x.example"]
    spool.complete(qid, "x.example", delivered=[2], next_due=None, attempts=2, error=None,
                   first_attempt=t0)
    assert spool.load(qid)  # y.example still pending
    spool.complete(qid, "y.example", delivered=[3])
    assert spool.show(qid) is None
    with pytest.raises(MessageNotFound):
        spool.load(qid)
    st = spool.stats()
    assert (st.messages, st.jobs, st.bytes) == (0, 0, 0)
    # Index is empty too.
    with spool.env.begin() as txn:
        for name in (b"sched", b"job", b"msg", b"env"):
            assert txn.stat(spool.env.open_db(name, txn=txn))["entries"] == 0


def test_complete_stores_bounce_atomically(spool):
    m = make_msg("a@x.example")
    spool.store_batch([m])
    bounce = make_msg("sender@example.org")
    bounce.envelope.sender = ""
    bounce.envelope.is_bounce = True
    spool.complete(m.envelope.queue_id, "x.example", failed=[0], new_messages=[bounce])
    assert spool.show(m.envelope.queue_id) is None
    env, _ = spool.load(bounce.envelope.queue_id)
    assert env.is_bounce and env.sender == ""
    jobs = spool.due_jobs(time.time() + 1, 0, 1, 10)
    assert [(j.queue_id, j.domain) for j in jobs] == [(bounce.envelope.queue_id, "example.org")]
    # A failing bounce (bad message) rolls back the whole completion.
    m2 = make_msg("a@x.example")
    spool.store_batch([m2])
    with pytest.raises(ValueError):
        spool.complete(m2.envelope.queue_id, "x.example", failed=[0], new_messages=[make_msg()])
    assert spool.show(m2.envelope.queue_id).jobs[0].recipients == [0]
    assert spool.verify() == []


def test_complete_after_operator_delete(spool):
    m = make_msg("a@x.example")
    spool.store_batch([m])
    spool.due_jobs(time.time() + 1, 0, 1, 10)
    assert spool.delete(m.envelope.queue_id) is True
    assert spool.delete(m.envelope.queue_id) is False
    spool.complete(m.envelope.queue_id, "x.example", delivered=[0])  # no error
    assert spool.stats().jobs == 0
    assert spool.verify() == []


def test_retry_now_and_release_claims(spool):
    a = make_msg("a@x.example", "b@y.example")
    spool.store_batch([a])
    qid = a.envelope.queue_id
    now = time.time()
    for j in spool.due_jobs(now + 1, 0, 1, 10):
        spool.complete(qid, j.domain, deferred=j.recipients, next_due=now + 3600, attempts=1,
                       error="421", first_attempt=now)
    assert spool.due_jobs(time.time(), 0, 1, 10) == []
    assert spool.retry_now(qid, "y.example") == 1
    assert [j.domain for j in spool.due_jobs(time.time(), 0, 1, 10)] == ["y.example"]
    # y.example is now claimed by us (alive): retry_now and release_claims leave it alone.
    assert spool.retry_now() == 1  # x.example only
    assert spool.release_claims() == 0
    assert spool.release_claims(only_dead=False) == 1
    assert {j.domain for j in spool.due_jobs(time.time(), 0, 1, 10)} == {"x.example", "y.example"}
    assert spool.verify() == []


def _claim_in_child(path: str, conn) -> None:
    s = Spool(path, MAP)
    conn.send(len(s.due_jobs(time.time() + 1, 0, 1, 100)))
    s.close()


def test_release_claims_of_dead_worker(tmp_path):
    path = tmp_path / "spool"
    with Spool(path, MAP) as s:
        s.store_batch([make_msg("a@x.example")])
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_claim_in_child, args=(str(path), child))
    p.start()
    assert parent.recv() == 1
    p.join(30)
    with Spool(path, MAP) as s:
        assert s.stats().jobs_in_flight == 1
        assert s.due_jobs(time.time(), 0, 1, 10) == []
        assert s.release_claims(0, 1) == 1
        assert len(s.due_jobs(time.time(), 0, 1, 10)) == 1


def test_release_claims_of_a_zombie_worker(tmp_path):
    """A worker killed with the whole relay may linger as an unreaped zombie (PID 1 in
    a container reaps nothing): its pid still answers kill(0) but its claims are dead."""
    path = tmp_path / "spool"
    with Spool(path, MAP) as s:
        s.store_batch([make_msg("a@x.example")])
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_claim_in_child, args=(str(path), child))
    p.start()
    assert parent.recv() == 1
    deadline = time.monotonic() + 30
    stat = Path(f"/proc/{p.pid}/stat")
    while stat.read_bytes().rpartition(b")")[2].split()[0] != b"Z":
        assert time.monotonic() < deadline, "child did not exit"
        time.sleep(0.01)  # polling the child's state, bounded by the deadline
    try:
        with Spool(path, MAP) as s:
            assert s.release_claims(0, 1) == 1
    finally:
        p.join(30)  # reap it only now


def _store_in_child(path: str, n: int, tag: str) -> None:
    s = Spool(path, MAP)
    for i in range(n):
        s.store_batch([make_msg(f"r{i}@{tag}.example", data=f"{tag}-{i}".encode())])
    s.close()


def test_concurrent_writer_processes(tmp_path):
    path = str(tmp_path / "spool")
    Spool(path, MAP).close()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_store_in_child, args=(path, 50, f"p{k}")) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with Spool(path, MAP) as s:
        st = s.stats()
        assert (st.messages, st.jobs, st.recipients) == (200, 200, 200)
        entries = s.list_messages(limit=1000)
        assert len({e.queue_id for e in entries}) == 200


def test_operator_views(spool):
    msgs = [make_msg("a@big.example", "b@big.example", "c@small.example") for _ in range(5)]
    spool.store_batch(msgs)
    spool.due_jobs(time.time() + 1, shard_of("small.example", 1), 1, limit=1)
    st = spool.stats()
    assert isinstance(st, QueueStats)
    assert st.messages == 5 and st.jobs == 10 and st.recipients == 15
    assert st.jobs_in_flight == 1 and st.jobs_due == 9 and st.jobs_deferred == 0
    assert st.bytes == sum(len(m.data) for m in msgs)
    assert st.oldest_arrival == min(m.envelope.received_at for m in msgs)
    assert [d.domain for d in st.top_domains] == ["big.example", "small.example"]
    assert st.top_domains[0].recipients == 10
    entries = spool.list_messages()
    assert [e.queue_id for e in entries] == sorted(m.envelope.queue_id for m in msgs)
    assert entries[0].pending == 3 and entries[0].sender == "sender@example.org"
    small = spool.list_messages(domain="SMALL.example", limit=2)
    assert len(small) == 2 and all(len(e.domains) == 1 for e in small)
    assert small[0].domains[0].pending == ["c@small.example"]
    rest = spool.list_messages(after=small[-1].queue_id)
    assert [e.queue_id for e in rest] == [e.queue_id for e in entries[2:]]
    # --json is just msgspec.json.encode.
    assert msgspec.json.decode(msgspec.json.encode(st), type=QueueStats) == st
    assert b'"queue_id"' in msgspec.json.encode(spool.show(msgs[0].envelope.queue_id))


def test_verify_detects_inconsistency(spool):
    m = make_msg("a@x.example", "b@y.example")
    spool.store_batch([m])
    spool.due_jobs(time.time() + 1, 0, 1, 1)
    assert spool.verify() == []
    sched = spool.env.open_db(b"sched")
    with spool.env.begin(write=True) as txn:
        key = next(iter(txn.cursor(sched).iternext(values=False)))
        txn.delete(key, db=sched)
    problems = spool.verify()
    assert len(problems) == 1 and "no scheduler entry" in problems[0]


def test_due_jobs_round_robin_across_domains(spool):
    # A big backlog of one domain must not starve the other domains of the shard.
    spool.store_batch([make_msg("u@big.example") for _ in range(50)])
    spool.store_batch([make_msg("u@small1.example"), make_msg("u@small2.example")])
    jobs = spool.due_jobs(time.time() + 1, 0, 1, limit=6)
    domains = [j.domain for j in jobs]
    assert domains.count("small1.example") == 1 and domains.count("small2.example") == 1
    assert domains.count("big.example") == 4
    assert spool.verify() == []


def test_other_shards_backlog_is_skipped_per_domain(spool):
    # 2000 due jobs of one domain in the other shard: our shard's query walks one
    # domain entry for them, not 2000 index entries (checked via the result, and fast).
    mine = next(f"m{i}.example" for i in range(100) if shard_of(f"m{i}.example", 2) == 0)
    other = next(f"o{i}.example" for i in range(100) if shard_of(f"o{i}.example", 2) == 1)
    spool.store_batch([make_msg(f"u@{other}") for _ in range(2000)])
    spool.store_batch([make_msg(f"u@{mine}")])
    t0 = time.perf_counter()
    for _ in range(100):
        assert spool.next_due(0, 2) is not None
        assert spool.due_jobs(time.time() - 3600, 0, 2, 10) == []  # nothing due yet
    assert time.perf_counter() - t0 < 1.0
    assert [j.domain for j in spool.due_jobs(time.time() + 1, 0, 2, 10)] == [mine]


def test_random_operations_keep_indexes_consistent(spool):
    import random

    rnd = random.Random(1234)
    domains = [f"d{i}.example" for i in range(7)]
    live: list[NewMessage] = []
    clock = time.time()
    for step in range(300):
        op = rnd.random()
        clock += rnd.random() * 5
        if op < 0.3 or not live:
            batch = [make_msg(*(f"u{k}@{rnd.choice(domains)}" for k in range(rnd.randint(1, 4))))
                     for _ in range(rnd.randint(1, 5))]
            spool.store_batch(batch)
            live += batch
        elif op < 0.6:
            for j in spool.due_jobs(clock, rnd.randrange(2), 2, rnd.randint(1, 8), lease=30):
                rs = list(j.recipients)
                rnd.shuffle(rs)
                cut1, cut2 = sorted(rnd.randint(0, len(rs)) for _ in range(2))
                bounce = [make_msg("s@example.org")] if cut1 < cut2 and rnd.random() < 0.3 else []
                spool.complete(j.queue_id, j.domain, delivered=rs[:cut1], failed=rs[cut1:cut2],
                               deferred=rs[cut2:], next_due=clock + rnd.random() * 20,
                               attempts=j.attempts + 1, error="4xx", first_attempt=clock,
                               new_messages=bounce)
        elif op < 0.7:
            spool.retry_now(domain=rnd.choice(domains))
        elif op < 0.8:
            spool.delete(rnd.choice(live).envelope.queue_id)
        elif op < 0.9:
            spool.release_claims(only_dead=False)
        else:
            nd = spool.next_due(rnd.randrange(3), 3)
            assert nd is None or nd > 0
        assert spool.verify() == [], step
    st = spool.stats()
    assert st.jobs == st.jobs_due + st.jobs_deferred + st.jobs_in_flight


def _readonly_stats(path: str, conn) -> None:
    s = Spool(path, MAP, readonly=True)  # what `relay queue stats` does beside a server
    conn.send((s.stats().messages, [e.queue_id for e in s.list_messages()], s.verify()))
    s.close()


def test_readonly_view_beside_a_running_writer(tmp_path):
    path = tmp_path / "spool"
    with Spool(path, MAP) as s:
        msgs = [make_msg("a@x.example") for _ in range(3)]
        s.store_batch(msgs)
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_readonly_stats, args=(str(path), child))
        p.start()
        assert parent.poll(60)
        assert parent.recv() == (3, sorted(m.envelope.queue_id for m in msgs), [])
        p.join(30)
        s.store_batch([make_msg("b@x.example")])  # the writer is unaffected


def test_hand_over_moves_a_job_to_the_owner_of_its_destination(spool):
    """A claimed job handed over to destination key K is due at once for the shard that
    owns K (and for no other), keeps that shard through retries, and a job that changed
    since it was claimed is not moved."""
    nshards = 3
    domain = next(f"d{i}.example" for i in range(50) if shard_of(f"d{i}.example", 3) == 0)
    key = next(f"mx{i}.example" for i in range(50) if shard_of(f"mx{i}.example", 3) == 2)
    spool.store_batch([make_msg(f"a@{domain}"), make_msg(f"b@{domain}")])
    now = time.time() + 0.01
    first, second = spool.due_jobs(now, 0, nshards, limit=10)
    spool.complete(second.queue_id, second.domain, deferred=[0], next_due=now)  # changed
    assert spool.hand_over([(first, key), (second, key)], now) == 1
    # The changed one stayed with shard 0; the moved one is shard 2's alone.
    assert [j.queue_id for j in spool.due_jobs(now, 0, nshards, 10)] == [second.queue_id]
    assert spool.due_jobs(now, 1, nshards, 10) == []
    [moved] = spool.due_jobs(now, 2, nshards, 10)
    assert (moved.queue_id, moved.shard_key, moved.attempts) == (first.queue_id, key, 0)
    spool.complete(moved.queue_id, moved.domain, deferred=[0], next_due=now + 5,
                   attempts=1)
    assert [j.queue_id for j in spool.due_jobs(now + 6, 2, nshards, 10)] == [first.queue_id]
    assert spool.verify() == []
