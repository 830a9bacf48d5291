"""Load generator: many concurrent SMTP sessions spread over several processes.

Why several processes: one Python process tops out at a few thousand messages per
second; the generator must not be what limits the number the bench reports. The
orchestrator (``run_load``) starts ``processes`` copies of ``python -m bench.loadgen``,
each running ``sessions / processes`` trio sessions, and merges their reports.

Contract: ``await run_load(spec, processes, on_progress)`` returns a ``LoadResult`` with
the totals, per-message latencies (seconds from the end-of-data marker being sent to its
250 reply) and a timeline of cumulative accepted messages. Times are
``time.monotonic()`` values (CLOCK_MONOTONIC, comparable across processes).

The run stops by itself: after ``spec.messages`` messages (if > 0) or ``spec.duration``
seconds, whichever comes first. Its client is deliberately independent of the relay's
code (the load generator must not share the bugs of what it measures).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import trio

__all__ = ["LoadResult", "LoadSpec", "make_body", "run_load"]


class LoadSpec(msgspec.Struct, kw_only=True):
    """What to send. Distributions are lists of ``[value, weight]`` pairs."""

    host: str = "127.0.0.1"
    port: int = 2525
    sessions: int = 20
    #: Total messages (0 = unlimited: only ``duration`` stops the run).
    messages: int = 0
    duration: float = 10.0
    messages_per_connection: int = 100
    pipelining: bool = True
    sizes: list[tuple[int, float]] = msgspec.field(default_factory=lambda: [(4096, 1.0)])
    recipients: list[tuple[int, float]] = msgspec.field(default_factory=lambda: [(1, 1.0)])
    #: Recipient domains, drawn uniformly (``domain_weights`` may skew it).
    domains: list[str] = msgspec.field(default_factory=lambda: ["example.test"])
    #: Optional relative weights, one per domain (skewed traffic: a few hot domains).
    domain_weights: list[float] = msgspec.field(default_factory=list)
    sender: str = "bench@sender.test"
    seed: int = 1
    #: Give up on a connection attempt / reply after this many seconds.
    timeout: float = 30.0


@dataclass
class LoadResult:
    """Merged outcome of a load run."""

    accepted: int = 0
    recipients_accepted: int = 0
    recipients_refused: int = 0
    messages_failed: int = 0
    connect_errors: int = 0
    bytes_sent: int = 0
    latencies: list[float] = field(default_factory=list)
    first_send: float = 0.0
    last_reply: float = 0.0
    #: (monotonic time, cumulative accepted messages), one point per progress tick.
    timeline: list[tuple[float, int]] = field(default_factory=list)
    #: the same for accepted recipients.
    timeline_rcpts: list[tuple[float, int]] = field(default_factory=list)
    #: accepted recipients per domain (what the sink must eventually receive).
    per_domain: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def make_body(size: int, n: int = 0) -> bytes:
    """A plain RFC 5322 message of about ``size`` bytes, CRLF lines of 76 characters,
    ending with CRLF; no line starts with '.', so no dot-stuffing is needed."""
    header = (
        f"From: bench <bench@sender.test>\r\nTo: rcpt@example.test\r\n"
        f"Subject: bench message {n}\r\nMessage-ID: <{n}.{size}@bench.test>\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
    ).encode()
    line = b"abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789xyzw\r\n"
    lines = max(1, (size - len(header)) // len(line))
    return header + line * lines


def _pick(rng: random.Random, dist: list[tuple[int, float]]) -> int:
    values = [v for v, _ in dist]
    weights = [w for _, w in dist]
    return rng.choices(values, weights)[0]


class _Conn:
    """Minimal SMTP client connection (buffered reply reader)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def reply(self) -> int:
        """Read one (multi-line) reply, return its code."""
        while True:
            start = 0
            while True:
                eol = self.buf.find(b"\r\n", start)
                if eol < 0:
                    break
                if self.buf[start + 3 : start + 4] != b"-":
                    code = int(self.buf[start : start + 3])
                    del self.buf[: eol + 2]
                    return code
                start = eol + 2
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError("connection closed by server")
            self.buf += chunk


@dataclass
class _Worker:
    spec: LoadSpec
    budget: int  # messages this process may send (0 = unlimited)
    deadline: float
    rng: random.Random
    bodies: dict[int, bytes]
    cum_weights: list[float] | None = None
    started: int = 0
    res: LoadResult = field(default_factory=LoadResult)

    def take(self) -> bool:
        if time.monotonic() >= self.deadline:
            return False
        if self.budget and self.started >= self.budget:
            return False
        self.started += 1
        return True

    async def session(self, idx: int) -> None:
        spec = self.spec
        while self.take():
            self.started -= 1  # re-taken per message below
            try:
                with trio.fail_after(spec.timeout):
                    stream = await trio.open_tcp_stream(spec.host, spec.port)
            except (OSError, trio.TooSlowError) as e:
                self.res.connect_errors += 1
                self._err(f"connect: {e}")
                await trio.sleep(0.05)
                continue
            try:
                await self._run_connection(stream)
            except (OSError, EOFError, trio.BrokenResourceError, trio.TooSlowError,
                    ValueError) as e:
                self.res.messages_failed += 1
                self._err(f"session: {type(e).__name__}: {e}")
            finally:
                await trio.aclose_forcefully(stream)

    def _err(self, msg: str) -> None:
        if len(self.res.errors) < 20:
            self.res.errors.append(msg)

    async def _run_connection(self, stream: trio.SocketStream) -> None:
        spec = self.spec
        conn = _Conn(stream)
        with trio.fail_after(spec.timeout):
            code = await conn.reply()
            if code != 220:
                raise ValueError(f"greeting {code}")
            await stream.send_all(b"EHLO loadgen.test\r\n")
            if await conn.reply() != 250:
                raise ValueError("EHLO refused")
        sent_here = 0
        while sent_here < spec.messages_per_connection and self.take():
            sent_here += 1
            size = _pick(self.rng, spec.sizes)
            n_rcpt = _pick(self.rng, spec.recipients)
            if self.cum_weights:
                domains = self.rng.choices(spec.domains, cum_weights=self.cum_weights,
                                           k=n_rcpt)
            else:
                domains = [self.rng.choice(spec.domains) for _ in range(n_rcpt)]
            rcpts = [f"u{self.rng.randrange(1_000_000)}@{d}" for d in domains]
            body = self.bodies[size]
            cmds = [f"MAIL FROM:<{spec.sender}> SIZE={len(body)}\r\n".encode()]
            cmds += [f"RCPT TO:<{r}>\r\n".encode() for r in rcpts]
            cmds.append(b"DATA\r\n")
            with trio.fail_after(spec.timeout):
                if self.res.first_send == 0.0:
                    self.res.first_send = time.monotonic()
                codes = []
                if spec.pipelining:
                    await stream.send_all(b"".join(cmds))
                    for _ in cmds:
                        codes.append(await conn.reply())
                else:
                    await stream.send_all(cmds[0])
                    codes.append(await conn.reply())
                    if codes[0] == 250:
                        for c in cmds[1:-1]:
                            await stream.send_all(c)
                            codes.append(await conn.reply())
                        if 250 in codes[1:]:
                            await stream.send_all(cmds[-1])
                            codes.append(await conn.reply())
                rcpt_codes = codes[1 : 1 + len(rcpts)]
                ok_domains = [d for d, c in zip(domains, rcpt_codes, strict=False) if c == 250]
                self.res.recipients_refused += len(rcpts) - len(ok_domains)
                if len(codes) < len(cmds) or codes[-1] != 354:
                    self.res.messages_failed += 1
                    await stream.send_all(b"RSET\r\n")
                    await conn.reply()
                    continue
                await stream.send_all(body)
                t0 = time.monotonic()
                await stream.send_all(b".\r\n")
                code = await conn.reply()
                t1 = time.monotonic()
            self.res.bytes_sent += len(body)
            if code == 250:
                self.res.accepted += 1
                self.res.recipients_accepted += len(ok_domains)
                self.res.latencies.append(t1 - t0)
                self.res.last_reply = t1
                for d in ok_domains:
                    self.res.per_domain[d] = self.res.per_domain.get(d, 0) + 1
            else:
                self.res.messages_failed += 1
                self.res.recipients_refused += len(ok_domains)
        with trio.move_on_after(2):
            await stream.send_all(b"QUIT\r\n")
            await conn.reply()


async def _worker_main(spec: LoadSpec, index: int, count: int, progress_every: float) -> None:
    """One generator process: run its share, print progress and a final JSON line."""
    budget = 0
    if spec.messages:
        budget = spec.messages // count + (1 if index < spec.messages % count else 0)
    sessions = spec.sessions // count + (1 if index < spec.sessions % count else 0)
    rng = random.Random(spec.seed * 1000 + index)
    bodies = {size: make_body(size) for size, _ in spec.sizes}
    w = _Worker(spec, budget, time.monotonic() + spec.duration, rng, bodies)
    if spec.domain_weights:
        if len(spec.domain_weights) != len(spec.domains):
            raise ValueError("domain_weights must have one weight per domain")
        w.cum_weights = list(itertools.accumulate(spec.domain_weights))
    out = sys.stdout

    async def progress() -> None:
        while True:
            out.write(json.dumps({"t": time.monotonic(), "accepted": w.res.accepted,
                                  "recipients_accepted": w.res.recipients_accepted,
                                  "failed": w.res.messages_failed}) + "\n")
            out.flush()
            await trio.sleep(progress_every)

    if budget or not spec.messages:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(progress)
            async with trio.open_nursery() as inner:
                for i in range(max(1, sessions)):
                    inner.start_soon(w.session, i)
            nursery.cancel_scope.cancel()
    res = w.res
    final = {"final": True, "t": time.monotonic(), **{
        k: getattr(res, k) for k in ("accepted", "recipients_accepted", "recipients_refused",
                                     "messages_failed", "connect_errors", "bytes_sent",
                                     "first_send", "last_reply", "per_domain", "errors")}}
    final["latencies"] = [round(x, 6) for x in res.latencies]
    out.write(json.dumps(final) + "\n")
    out.flush()


async def run_load(
    spec: LoadSpec,
    processes: int = 2,
    on_progress: Callable[[int, int, int], None] | None = None,
    progress_every: float = 0.25,
) -> LoadResult:
    """Run the load in ``processes`` subprocesses; ``on_progress(accepted, failed,
    recipients_accepted)`` is called as progress arrives. Returns the merged result."""
    processes = max(1, min(processes, spec.sessions))
    latest: dict[int, dict] = {}
    finals: dict[int, dict] = {}
    result = LoadResult()
    encoded = msgspec.json.encode(spec).decode()

    async def one(i: int) -> None:
        cmd = [sys.executable, "-m", "bench.loadgen", "--spec", encoded, "--index", str(i),
               "--count", str(processes), "--progress-every", str(progress_every)]
        proc = await trio.lowlevel.open_process(cmd, stdout=-1)
        assert proc.stdout is not None
        buf = b""
        try:
            while True:
                chunk = await proc.stdout.receive_some(1 << 20)
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    msg = json.loads(line)
                    if msg.get("final"):
                        finals[i] = msg
                    latest[i] = msg
                accepted = sum(m["accepted"] for m in latest.values())
                failed = sum(m.get("failed", m.get("messages_failed", 0))
                             for m in latest.values())
                now = time.monotonic()
                rcpts = sum(m["recipients_accepted"] for m in latest.values())
                if not result.timeline or result.timeline[-1][1] != accepted or (
                        now - result.timeline[-1][0] > progress_every):
                    result.timeline.append((now, accepted))
                    result.timeline_rcpts.append((now, rcpts))
                if on_progress is not None:
                    on_progress(accepted, failed, rcpts)
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()

    async with trio.open_nursery() as nursery:
        for i in range(processes):
            nursery.start_soon(one, i)
    if len(finals) != processes:
        raise RuntimeError(f"load generator: {processes - len(finals)} process(es) failed")
    for f in finals.values():
        result.accepted += f["accepted"]
        result.recipients_accepted += f["recipients_accepted"]
        result.recipients_refused += f["recipients_refused"]
        result.messages_failed += f["messages_failed"]
        result.connect_errors += f["connect_errors"]
        result.bytes_sent += f["bytes_sent"]
        result.latencies.extend(f["latencies"])
        result.errors.extend(f["errors"])
        for d, n in f["per_domain"].items():
            result.per_domain[d] = result.per_domain.get(d, 0) + n
    firsts = [f["first_send"] for f in finals.values() if f["first_send"]]
    lasts = [f["last_reply"] for f in finals.values() if f["last_reply"]]
    result.first_send = min(firsts) if firsts else 0.0
    result.last_reply = max(lasts) if lasts else 0.0
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.loadgen")
    ap.add_argument("--spec", required=True, help="LoadSpec as JSON")
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--progress-every", type=float, default=0.25)
    args = ap.parse_args(argv)
    spec = msgspec.json.decode(args.spec, type=LoadSpec)
    trio.run(_worker_main, spec, args.index, args.count, args.progress_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
