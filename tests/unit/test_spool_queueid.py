"""Queue ids: format, order, uniqueness across threads and forked processes."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest

from relay.spool.queueid import QUEUE_ID_LENGTH, new_queue_id, queue_id_time

ALPHABET = set("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


def test_format_and_time():
    before = time.time()
    qid = new_queue_id()
    after = time.time()
    assert len(qid) == QUEUE_ID_LENGTH and set(qid) <= ALPHABET
    assert before - 0.001 <= queue_id_time(qid) <= after
    with pytest.raises(ValueError):
        queue_id_time("short")
    with pytest.raises(ValueError):
        queue_id_time("I" * QUEUE_ID_LENGTH)


def test_time_sortable_and_unique_in_process():
    ids = [new_queue_id() for _ in range(50_000)]
    assert len(set(ids)) == len(ids)
    # Roughly time-sortable: the time prefix never goes backwards within a process.
    assert [q[:9] for q in ids] == sorted(q[:9] for q in ids)


def test_unique_across_threads():
    out: list[list[str]] = [[] for _ in range(4)]

    def work(i: int) -> None:
        out[i] = [new_queue_id() for _ in range(10_000)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    ids = [q for chunk in out for q in chunk]
    assert len(ids) == 40_000 == len(set(ids))


def _child(conn) -> None:
    conn.send([new_queue_id() for _ in range(5_000)])
    conn.close()


def test_unique_across_forked_workers():
    new_queue_id()  # parent state exists before the fork
    ctx = multiprocessing.get_context("fork")
    pipes, procs = [], []
    for _ in range(3):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_child, args=(child,))
        p.start()
        pipes.append(parent)
        procs.append(p)
    ids = [new_queue_id() for _ in range(5_000)]
    for parent in pipes:
        ids += parent.recv()
    for p in procs:
        p.join(30)
    assert len(ids) == 20_000 == len(set(ids))
