"""Micro benchmark of the group-commit path: ``python -m bench.commit``.

N concurrent trio tasks each loop ``await writer.submit(msg)`` (2 KiB messages, one
recipient) against a fresh spool for a fixed time; reports commits/s, messages/s, the
mean batch size and the submit latency (p50/p99) for each concurrency level. Every
commit is a real synced LMDB commit on the filesystem of ``--dir`` (default: a temp
dir under the current directory, not /tmp, which may be tmpfs).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import trio

from relay.model import Envelope, NewMessage, Recipient
from relay.spool.queueid import new_queue_id
from relay.spool.store import Spool
from relay.spool.writer import GroupCommitWriter


async def _run_level(
    spool: Spool, concurrency: int, seconds: float, size: int, window: float, max_batch: int
) -> dict[str, float]:
    writer = GroupCommitWriter(spool, commit_window=window, max_batch=max_batch)
    data = (b"X" * 76 + b"\r\n") * (size // 78) + b"Y" * (size % 78)
    latencies: list[float] = []
    stop_at = 0.0

    async def submitter(i: int) -> None:
        rcpt = [Recipient(address=f"user{i}@domain{i % 50}.example")]
        while time.perf_counter() < stop_at:
            env = Envelope(queue_id=new_queue_id(), sender="bench@example.org",
                           recipients=rcpt, received_at=time.time())
            t0 = time.perf_counter()
            await writer.submit(NewMessage(envelope=env, data=data))
            latencies.append(time.perf_counter() - t0)

    async with trio.open_nursery() as nursery:
        await nursery.start(writer.run)
        start = time.perf_counter()
        stop_at = start + seconds
        async with trio.open_nursery() as sessions:
            for i in range(concurrency):
                sessions.start_soon(submitter, i)
        elapsed = time.perf_counter() - start
        await writer.aclose()
    latencies.sort()
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {
        "concurrency": concurrency,
        "messages": writer.messages,
        "commits": writer.commits,
        "commits_per_s": writer.commits / elapsed,
        "messages_per_s": writer.messages / elapsed,
        "mean_batch": writer.messages / max(writer.commits, 1),
        "p50_ms": q[49] * 1000,
        "p99_ms": q[98] * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 20, 200])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--window", type=float, default=0.002, help="commit_window seconds")
    ap.add_argument("--max-batch", type=int, default=512)
    ap.add_argument("--writemap", action="store_true", help="open with writemap=True")
    ap.add_argument("--dir", default=".", help="where to create the temporary spool")
    args = ap.parse_args(argv)
    print(f"# {args.size} B messages, commit_window={args.window * 1000:g} ms, "
          f"max_batch={args.max_batch}, writemap={args.writemap}, "
          f"{args.seconds:g} s per level")
    print(f"{'conc':>5} {'msgs':>8} {'commits':>8} {'commits/s':>10} {'msgs/s':>10} "
          f"{'batch':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for conc in args.concurrency:
        tmp = tempfile.mkdtemp(prefix="spool-bench-", dir=args.dir)
        try:
            spool = Spool(tmp, 8 * 1024**3, writemap=args.writemap)
            try:
                r = trio.run(_run_level, spool, conc, args.seconds, args.size, args.window,
                             args.max_batch)
            finally:
                spool.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"{conc:>5} {r['messages']:>8.0f} {r['commits']:>8.0f} {r['commits_per_s']:>10.0f} "
              f"{r['messages_per_s']:>10.0f} {r['mean_batch']:>7.1f} {r['p50_ms']:>8.2f} "
              f"{r['p99_ms']:>8.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
