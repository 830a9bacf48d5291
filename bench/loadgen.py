"""Load generator: many concurrent SMTP sessions spread over several processes.

Why several processes: one Python process tops out at a few thousand messages per
second; the generator must not be what limits the number the bench reports. The
orchestrator (``run_load``) starts ``processes`` copies of ``python -m bench.loadgen``,
each running ``sessions / processes`` sessions on one epoll loop (``_Engine``: no trio in
the children, see its docstring), and merges their reports.

Cheap per message: every transaction is pre-built once per process (``build_shapes``:
the MAIL/RCPT/DATA group as one bytes object, the body with its end-of-data marker as
another), so a message costs two sends (group, payload), the reads of its replies and
two clock readings. Latency is measured from the moment the payload send (body and the
final ``.``) returned to the reading of its reply.

Contract: ``await run_load(spec, processes, on_progress)`` returns a ``LoadResult`` with
the totals, per-message latencies (seconds from the end-of-data marker being sent to its
250 reply), the generator's own CPU seconds and a timeline of cumulative accepted
messages. Times are ``time.monotonic()`` values (CLOCK_MONOTONIC, comparable across processes).

The run stops by itself: after ``spec.messages`` messages (if > 0) or ``spec.duration``
seconds, whichever comes first. Its client is deliberately independent of the relay's
code (the load generator must not share the bugs of what it measures).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import os
import random
import resource
import select
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import msgspec

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
    #: CPU seconds (user + system) the generator processes themselves used, start-up
    #: included: what the bench's own client costs the machine.
    cpu_seconds: float = 0.0


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


class _Shape(NamedTuple):
    """One pre-built transaction: the command group (MAIL, RCPTs, DATA) as one bytes
    object, the commands one by one (no-PIPELINING mode), the recipient domains in RCPT
    order, and the DATA payload (body + end-of-data marker, written in one send)."""

    group: bytes
    commands: tuple[bytes, ...]
    domains: tuple[str, ...]
    payload: bytes
    body_len: int


#: Pre-built transactions per process; messages cycle through them. Enough draws that the
#: size/recipient/domain mix matches the distributions, few enough to build in ~20 ms.
_SHAPES = 2048
#: Distinct local parts per domain; consecutive recipients of a message never repeat one
#: (a server may merge duplicate recipients, which would break the counts).
_LOCAL_PARTS = 64


def build_shapes(spec: LoadSpec, rng: random.Random, count: int = _SHAPES) -> list[_Shape]:
    """Draw ``count`` transactions from the spec's distributions, encoded once: the hot
    loop then only indexes a list (no formatting, no encoding, no random draws)."""
    cum = list(itertools.accumulate(spec.domain_weights)) if spec.domain_weights else None
    if cum is not None and len(cum) != len(spec.domains):
        raise ValueError("domain_weights must have one weight per domain")
    payloads = {size: make_body(size) + b".\r\n" for size, _ in spec.sizes}
    mail = {size: f"MAIL FROM:<{spec.sender}> SIZE={len(p) - 3}\r\n".encode()
            for size, p in payloads.items()}
    sizes = [v for v, _ in spec.sizes]
    size_w = list(itertools.accumulate(w for _, w in spec.sizes))
    nrcpt = [v for v, _ in spec.recipients]
    nrcpt_w = list(itertools.accumulate(w for _, w in spec.recipients))
    local = max(_LOCAL_PARTS, max(nrcpt) + 1)
    base = rng.randrange(1_000_000)
    shapes: list[_Shape] = []
    lp = 0
    for _ in range(count):
        size = rng.choices(sizes, cum_weights=size_w)[0]
        n = rng.choices(nrcpt, cum_weights=nrcpt_w)[0]
        if cum is not None:
            domains = tuple(rng.choices(spec.domains, cum_weights=cum, k=n))
        else:
            domains = tuple(rng.choice(spec.domains) for _ in range(n))
        rcpts = []
        for d in domains:
            rcpts.append(f"RCPT TO:<u{base + lp % local}@{d}>\r\n".encode())
            lp += 1
        cmds = (mail[size], *rcpts, b"DATA\r\n")
        shapes.append(_Shape(b"".join(cmds), cmds, domains, payloads[size],
                             len(payloads[size]) - 3))
    return shapes


# Session states (what the replies being read belong to).
_CONNECTING, _GREETING, _EHLO, _GROUP, _NP_MAIL, _NP_RCPT, _NP_DATA, _DOT, _RSET, _QUIT = range(10)


class _Session:
    """One SMTP client session driven by the event loop (no coroutine, no task)."""

    __slots__ = ("codes", "deadline", "expect", "fd", "in_msg", "payload_pending", "rbuf",
                 "retry_at", "sent_here", "shape", "shape_i", "sock", "state", "t0", "wbuf")

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.fd = -1
        self.state = _CONNECTING
        self.rbuf = bytearray()
        self.wbuf: memoryview | None = None
        self.payload_pending = False
        self.expect = 0
        self.codes: list[int] = []
        self.shape: _Shape | None = None
        self.shape_i = 0
        self.sent_here = 0
        self.t0 = 0.0
        self.deadline = 0.0
        self.retry_at = 0.0
        self.in_msg = False


class _Engine:
    """All sessions of one generator process on one ``select.epoll``.

    Why not trio here: per message the client needs two writes and two reads; trio's
    stream layer (conflict detectors, checkpoints, cancel scopes, task switches) cost
    several times the system calls themselves, and on a 2-core box every microsecond the
    generator spends is taken from the server being measured. The orchestration
    (``run_load``) stays in trio; this engine runs in the ``python -m bench.loadgen``
    child processes only."""

    def __init__(self, spec: LoadSpec, budget: int, deadline: float, shapes: list[_Shape],
                 sessions: int) -> None:
        self.spec = spec
        self.budget = budget
        self.stop_at = deadline
        self.shapes = shapes
        self.shape_ok = [0] * len(shapes)  # messages of shape i with every RCPT accepted
        self.next_shape = 0
        self.started = 0
        self.res = LoadResult()
        self.lat_append = self.res.latencies.append
        self.ep = select.epoll()
        self.by_fd: dict[int, _Session] = {}
        self.sessions = [_Session() for _ in range(max(1, sessions))]
        self.live = 0
        self.pipelining = spec.pipelining

    # ---------------------------------------------------------------- budget

    def may_start(self) -> bool:
        return time.monotonic() < self.stop_at and not (
            self.budget and self.started >= self.budget)

    def _err(self, msg: str) -> None:
        if len(self.res.errors) < 20:
            self.res.errors.append(msg)

    # ---------------------------------------------------------------- connections

    def connect(self, s: _Session, now: float) -> None:
        """Start a non-blocking connect (or retire the session when the run is over)."""
        if not self.may_start():
            s.state = -1
            return
        sock = socket.socket(socket.AF_INET6 if ":" in self.spec.host else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((self.spec.host, self.spec.port))
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.res.connect_errors += 1
            self._err(f"connect: {os.strerror(err)}")
            s.retry_at = now + 0.05
            return
        s.sock, s.fd = sock, sock.fileno()
        s.state, s.rbuf, s.wbuf, s.sent_here = _CONNECTING, bytearray(), None, 0
        s.expect, s.codes, s.in_msg = 0, [], False
        s.deadline = now + self.spec.timeout
        self.by_fd[s.fd] = s
        self.ep.register(s.fd, select.EPOLLOUT)
        self.live += 1

    def close(self, s: _Session, now: float, failed: str | None = None,
              reconnect: bool = True) -> None:
        if failed is not None:
            if s.state == _CONNECTING:
                self.res.connect_errors += 1
                self._err(f"connect: {failed}")
                reconnect_at = now + 0.05
            else:
                self.res.messages_failed += 1
                self._err(f"session: {failed}")
                reconnect_at = now
            if s.in_msg:  # the message in flight is the failed one
                s.in_msg = False
        else:
            reconnect_at = now
        if s.sock is not None:
            self.by_fd.pop(s.fd, None)
            with contextlib.suppress(OSError):
                self.ep.unregister(s.fd)
            s.sock.close()
            s.sock = None
            self.live -= 1
        s.state = -1
        if reconnect and self.may_start():
            s.state = _CONNECTING
            s.retry_at = reconnect_at
            if reconnect_at <= now:
                self.connect(s, now)

    def send(self, s: _Session, data: bytes, payload: bool = False) -> None:
        """Write ``data`` now if the socket takes it all (the common case: one system
        call); otherwise keep the rest and wait for EPOLLOUT. A broken connection ends
        the session (callers return right after sending)."""
        assert s.sock is not None
        try:
            n = s.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as e:
            self.close(s, time.monotonic(), f"{type(e).__name__}: {e}")
            return
        if n == len(data):
            if payload:
                s.t0 = time.monotonic()
            return
        s.wbuf = memoryview(data)[n:]
        s.payload_pending = payload
        self.ep.modify(s.fd, select.EPOLLIN | select.EPOLLOUT)

    # ---------------------------------------------------------------- protocol

    def next_message(self, s: _Session, now: float) -> None:
        """Start the next transaction on this connection, or QUIT."""
        if s.sent_here < self.spec.messages_per_connection and self.may_start():
            self.started += 1
            s.sent_here += 1
            i = self.next_shape
            self.next_shape = i + 1 if i + 1 < len(self.shapes) else 0
            shape = self.shapes[i]
            s.shape, s.shape_i, s.in_msg = shape, i, True
            s.codes = []
            s.deadline = now + self.spec.timeout
            if not self.res.first_send:
                self.res.first_send = now
            if self.pipelining:
                s.state, s.expect = _GROUP, len(shape.commands)
                self.send(s, shape.group)
            else:
                s.state, s.expect = _NP_MAIL, 1
                self.send(s, shape.commands[0])
            return
        s.state, s.expect = _QUIT, 1
        s.deadline = now + 2.0
        self.send(s, b"QUIT\r\n")

    def fail_message(self, s: _Session, now: float) -> None:
        """The transaction was refused before DATA: count it and its recipients that were
        not accepted (all of them when MAIL was refused), RSET, go on."""
        assert s.shape is not None
        self.res.recipients_refused += len(s.shape.domains) - s.codes[1:].count(250)
        self.res.messages_failed += 1
        s.in_msg = False
        s.state, s.expect = _RSET, 1
        self.send(s, b"RSET\r\n")

    def on_replies(self, s: _Session, now: float) -> None:
        """``s.expect`` replies have arrived (codes in ``s.codes``): next step."""
        st = s.state
        codes = s.codes
        if st == _DOT:
            res = self.res
            s.in_msg = False
            shape = s.shape
            assert shape is not None
            res.bytes_sent += shape.body_len
            ok = [d for d, c in zip(shape.domains, codes, strict=False) if c == 250]
            if codes[-1] == 250:
                res.accepted += 1
                self.lat_append(now - s.t0)
                res.last_reply = now
                if len(ok) == len(shape.domains):
                    self.shape_ok[s.shape_i] += 1
                    res.recipients_accepted += len(ok)
                else:
                    res.recipients_accepted += len(ok)
                    pd = res.per_domain
                    for d in ok:
                        pd[d] = pd.get(d, 0) + 1
            else:
                res.messages_failed += 1
                res.recipients_refused += len(ok)
            s.codes = []
            self.next_message(s, now)
            return
        if st in (_GROUP, _NP_DATA):
            shape = s.shape
            assert shape is not None
            if len(codes) < len(shape.commands) or codes[-1] != 354:
                s.codes = codes[:-1]  # MAIL + RCPT replies
                self.fail_message(s, now)
                return
            rcpt_codes = codes[1:1 + len(shape.domains)]
            self.res.recipients_refused += len(rcpt_codes) - rcpt_codes.count(250)
            # keep the RCPT codes (in order) for the end-of-data accounting
            s.codes = rcpt_codes
            s.state, s.expect = _DOT, 1
            self.send(s, shape.payload, payload=True)
            return
        if st in (_NP_MAIL, _NP_RCPT):
            shape = s.shape
            assert shape is not None
            if codes[0] != 250:
                self.fail_message(s, now)
                return
            n_done = len(codes) - 1  # RCPT replies so far
            if n_done < len(shape.domains):
                s.state, s.expect = _NP_RCPT, 1
                self.send(s, shape.commands[1 + n_done])
                return
            if 250 not in codes[1:]:
                self.fail_message(s, now)
                return
            s.state, s.expect = _NP_DATA, 1
            self.send(s, b"DATA\r\n")
            return
        if st == _RSET:
            s.codes = []
            self.next_message(s, now)
            return
        if st == _GREETING:
            if codes[0] != 220:
                self.close(s, now, f"ValueError: greeting {codes[0]}")
                return
            s.codes, s.state, s.expect = [], _EHLO, 1
            self.send(s, b"EHLO loadgen.test\r\n")
            return
        if st == _EHLO:
            if codes[0] != 250:
                self.close(s, now, "ValueError: EHLO refused")
                return
            self.next_message(s, now)
            return
        if st == _QUIT:
            self.close(s, now)
            return

    def on_readable(self, s: _Session, now: float) -> None:
        sock = s.sock
        assert sock is not None
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            self.close(s, now, f"{type(e).__name__}: {e}")
            return
        if not chunk:
            if s.state == _QUIT:
                self.close(s, now)
            else:
                self.close(s, now, "EOFError: connection closed by server")
            return
        buf = s.rbuf
        buf += chunk
        pos = 0
        codes = s.codes
        while s.expect:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            if buf[pos + 3 : pos + 4] != b"-":
                try:
                    codes.append(int(buf[pos : pos + 3]))
                except ValueError:
                    self.close(s, now, f"ValueError: bad reply {bytes(buf[pos:eol])!r}")
                    return
                s.expect -= 1
            pos = eol + 2
            if not s.expect:
                del buf[:pos]
                pos = 0
                self.on_replies(s, now)
                if s.sock is not sock:  # closed (and maybe reconnected): old input is moot
                    return
                buf = s.rbuf
                codes = s.codes
        if pos:
            del buf[:pos]

    def on_writable(self, s: _Session, now: float) -> None:
        assert s.sock is not None
        if s.state == _CONNECTING:
            err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.close(s, now, os.strerror(err))
                return
            s.state, s.expect, s.codes = _GREETING, 1, []
            s.deadline = now + self.spec.timeout
            self.ep.modify(s.fd, select.EPOLLIN)
            return
        if s.wbuf is None:
            self.ep.modify(s.fd, select.EPOLLIN)
            return
        try:
            n = s.sock.send(s.wbuf)
        except BlockingIOError:
            return
        except OSError as e:
            self.close(s, now, f"{type(e).__name__}: {e}")
            return
        if n < len(s.wbuf):
            s.wbuf = s.wbuf[n:]
            return
        s.wbuf = None
        if s.payload_pending:
            s.payload_pending = False
            s.t0 = time.monotonic()
        self.ep.modify(s.fd, select.EPOLLIN)

    # ---------------------------------------------------------------- loop

    def run(self, progress: Callable[[], None], progress_every: float) -> None:
        now = time.monotonic()
        for s in self.sessions:
            self.connect(s, now)
        next_progress = now
        next_sweep = now + 0.1
        poll = self.ep.poll
        by_fd = self.by_fd
        IN, OUT, ERR = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR | select.EPOLLHUP
        while True:
            now = time.monotonic()
            if now >= next_progress:
                progress()
                next_progress = now + progress_every
            if now >= next_sweep:
                next_sweep = now + 0.1
                for s in self.sessions:
                    if s.sock is None:
                        if s.state == _CONNECTING and s.retry_at <= now:
                            self.connect(s, now)
                    elif now > s.deadline:
                        if s.state == _QUIT:  # no 221 in time: not a failure
                            self.close(s, now)
                        else:
                            self.close(s, now, "TooSlowError: no reply in time")
                if self.live == 0 and not any(
                        s.state == _CONNECTING for s in self.sessions):
                    break
            events = poll(min(next_progress, next_sweep) - now + 0.001)
            now = time.monotonic()
            for fd, ev in events:
                s = by_fd.get(fd)
                if s is None:
                    continue
                sock = s.sock
                if ev & OUT or (ev & ERR and s.state == _CONNECTING):
                    self.on_writable(s, now)
                    if s.sock is not sock:
                        continue
                if ev & (IN | ERR):
                    self.on_readable(s, now)
            if self.live == 0:
                next_sweep = now  # reconnects or the end: look at once
        self.ep.close()
        # shapes whose recipients were all accepted: fold into the per-domain counts
        pd = self.res.per_domain
        for shape, n in zip(self.shapes, self.shape_ok, strict=True):
            if n:
                for d in shape.domains:
                    pd[d] = pd.get(d, 0) + n


def _worker_main(spec: LoadSpec, index: int, count: int, progress_every: float) -> None:
    """One generator process: run its share, print progress and a final JSON line."""
    budget = 0
    if spec.messages:
        budget = spec.messages // count + (1 if index < spec.messages % count else 0)
    sessions = spec.sessions // count + (1 if index < spec.sessions % count else 0)
    rng = random.Random(spec.seed * 1000 + index)
    shapes = build_shapes(spec, rng)
    eng = _Engine(spec, budget, time.monotonic() + spec.duration, shapes, sessions)
    out = sys.stdout
    res = eng.res

    def progress() -> None:
        out.write(json.dumps({"t": time.monotonic(), "accepted": res.accepted,
                              "recipients_accepted": res.recipients_accepted,
                              "failed": res.messages_failed}) + "\n")
        out.flush()

    if budget or not spec.messages:
        eng.run(progress, progress_every)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    final = {"final": True, "t": time.monotonic(), **{
        k: getattr(res, k) for k in ("accepted", "recipients_accepted", "recipients_refused",
                                     "messages_failed", "connect_errors", "bytes_sent",
                                     "first_send", "last_reply", "per_domain", "errors")}}
    final["cpu_seconds"] = usage.ru_utime + usage.ru_stime
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
    import trio  # the child processes never import trio (start-up cost)

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
        result.cpu_seconds += f.get("cpu_seconds", 0.0)
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
    _worker_main(spec, args.index, args.count, args.progress_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
