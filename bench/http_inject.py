"""The ``http-inject`` scenario: injection over the relay's HTTP API (SparkPost's
``POST /api/v1/transmissions``), next to SMTP injection of the same size of message.

Why: one HTTP request carries many recipients, and the relay answers it after ONE synced
commit of all their messages (one message per recipient), where SMTP pays a commit per
message. The issue asks: "HTTP with 100-recipient requests accepts at least 2x the
messages/s of SMTP injection and end to end stays at least 3x Postfix's SMTP end to end".

Contract: ``await run_http_inject(scenario, peer_name, processes, ...)`` returns result
rows with the same keys as the other scenarios' rows (``msg_s``, ``inject_msg_s``,
``e2e_msg_s``, ``latency_p50_ms``, ``latency_p99_ms``, ``cpu_s_per_1000``,
``peak_rss_mb``, ``complete``, ``accepted``, ``recipients_accepted``,
``delivered_recipients``, ``errors``, ``timeline``...):

* for a peer with an HTTP API (``peer.http_port``: the relay), one row per batch size in
  ``scenario.http_batches`` (``http-inject 1``, ``http-inject 100``, ``http-inject
  1000``), each against a fresh server and a fresh ``bench.sink.Sink``:
  ``scenario.http_clients`` concurrent clients (httpx on trio, one keep-alive connection
  each) post SparkPost transmissions of that many recipients, spread over
  ``scenario.load.domains``, each with its own ``substitution_data`` (2 substitutions in
  the text and the HTML part; the rendered message is about ``scenario.load.sizes[0]``
  bytes, 2 KB, like the SMTP row's; both as delivered: ``delivered_bytes_per_msg``), for
  ``scenario.load.duration`` seconds, or ``scenario.load.messages`` recipients in all
  when that is set (``--quick``; rounded up to whole requests). Then it waits until the
  sink has every accepted recipient (at most ``scenario.drain_timeout``).
* for every peer, the ``smtp-inject`` row: ``bench.loadgen`` injecting ``scenario.load``
  (2 KB single-recipient messages) over SMTP, end to end, as ``run_one`` measures it.

An HTTP row counts a recipient as accepted when the request got a 200 whose
``results.recipients`` gives it a ``queue_id``; a non-200 answer, a transport error, or
a recipient without a queue id counts as failed (``requests_failed``,
``recipients_failed``; the first few are in ``errors``). ``inject_msg_s`` = accepted
recipients / (last 200 received - first request sent); ``e2e_msg_s`` (= ``msg_s``) =
accepted recipients / (last arrival at the sink - first request sent); latency is per
request, sending it to reading the whole answer, 200s only; ``cpu_s_per_1000`` is the
server tree's CPU per 1000 accepted recipients. ``complete`` means at least one
recipient was accepted, none failed, and the sink received every accepted one in time.
``bench_cpu_s_per_1000``: the bench process's trio thread (the HTTP clients and the sink
share it) per 1000 accepted recipients.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from bench.metrics import dir_bytes, percentile, sample_tree
from bench.peers import PeerError, make_peer
from bench.scenarios import (
    _cumulative,
    _Progress,
    drained,
    run_one,
    sample_server,
    server_figures,
    start_sink,
)
from bench.sink import Sink

if TYPE_CHECKING:
    from bench.scenarios import Scenario

__all__ = ["HTTP_PATH", "HTTP_PEERS", "SMTP_ROW", "build_content", "build_transmission", "row_name",
           "run_http_inject"]

HTTP_PATH = "/api/v1/transmissions"
#: Peers with an HTTP injection API (``peer.http_port`` set): Postfix and ``direct`` get
#: only the SMTP row.
HTTP_PEERS = ("relay",)
#: The SMTP comparison row's scenario name.
SMTP_ROW = "smtp-inject"
#: Bytes a rendered message has besides its text and HTML bodies, as injected: From, To,
#: Subject, Date, MIME-Version, Content-Type and the multipart/alternative structure.
#: Measured against the relay so that the message as rendered, before the relay adds
#: Received and Message-ID, is ``size`` bytes like loadgen's SMTP body of that size: the
#: sink then receives the same size from both rows (2,209 bytes for 2048 in Dec 2026).
_OVERHEAD = 547
#: Distinct pre-built request bodies per batch size (they cycle; recipients within one
#: are distinct, so are all recipients of the pool up to 20,000).
_POOL_RECIPIENTS = 20_000
_POOL_MAX = 64
_FILLER = ("The quick brown fox jumps over the lazy dog while the bench counts every "
           "message twice. ")
#: Errors kept per row.
_MAX_ERRORS = 5


def row_name(batch: int) -> str:
    """The row (``scenario`` field) of an HTTP batch size: ``http-inject 100``."""
    return f"http-inject {batch}"


def build_content(size: int) -> dict[str, str]:
    """SparkPost ``content`` whose rendered message is about ``size`` bytes (before the
    relay's Received and Message-ID fields, as loadgen's ``make_body(size)``): a subject,
    a text and an HTML part with the recipient's ``{{first}}`` and ``{{code}}``
    substitutions (ASCII, short lines: 7bit, nothing to encode)."""
    budget = max(200, size - _OVERHEAD)
    text_len, html_len = budget * 2 // 5, budget - budget * 2 // 5

    def fill(n: int, before: str, after: str, start: str = "", end: str = "") -> str:
        """``before`` + lines of filler (``start`` + text + ``end``) + ``after``, ``n``
        characters in all (the relay sends each newline as CRLF: one more byte)."""
        room = n - len(before) - len(after)
        line = start + _FILLER.strip() + end
        lines = [line] * max(0, room // (len(line) + 2))
        rest = room - len(lines) * (len(line) + 2) - len(start) - len(end) - 2
        if rest > 0:
            lines.append(start + (_FILLER * 2)[:rest].strip() + end)
        return before + "\n".join(lines) + after

    text = fill(text_len, "Dear {{first}},\n\n", "\n\nYour code is {{code}}.\n-- \nbench\n")
    html = fill(html_len, "<html><body><p>Dear {{first}},</p>\n",
                "\n<p>Your code is <b>{{code}}</b>.</p></body></html>\n", "<p>", "</p>")
    return {"from": "bench@sender.test", "subject": "Hi {{first}}, your code",
            "text": text, "html": html}


def build_transmission(batch: int, first: int, domains: list[str],
                       content: dict[str, str]) -> bytes:
    """The JSON body of one SparkPost transmission: ``batch`` recipients numbered from
    ``first`` (``r<n>@<domains[n % len(domains)]>``, distinct), each with its own
    ``substitution_data`` (``first``, ``code``)."""
    recipients = [
        {"address": {"email": f"r{n}@{domains[n % len(domains)]}", "name": f"R {n}"},
         "substitution_data": {"first": f"R{n}", "code": f"{n * 7919 % 1_000_000:06d}"}}
        for n in range(first, first + batch)]
    return msgspec.json.encode({"recipients": recipients, "content": content,
                                "campaign_id": "bench"})


class _Rcpt(msgspec.Struct):
    index: int = -1
    address: str = ""
    queue_id: str | None = None
    error: str | None = None
    message: str | None = None


class _Results(msgspec.Struct):
    total_accepted_recipients: int = 0
    total_rejected_recipients: int = 0
    id: str = ""
    recipients: list[_Rcpt] = msgspec.field(default_factory=list)


class _Answer(msgspec.Struct):
    results: _Results | None = None


_decode_answer = msgspec.json.Decoder(_Answer).decode


@dataclasses.dataclass
class _Tally:
    """What the HTTP clients saw (all times ``time.monotonic()``)."""

    requests: int = 0
    requests_ok: int = 0
    requests_failed: int = 0
    recipients_accepted: int = 0
    recipients_failed: int = 0
    first_send: float = 0.0
    last_ok: float = 0.0
    latencies: list[float] = dataclasses.field(default_factory=list)
    #: (time of a 200, recipients it accepted)
    answers: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    queue_ids: set[str] = dataclasses.field(default_factory=set)
    duplicate_queue_ids: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)

    def error(self, text: str) -> None:
        if len(self.errors) < _MAX_ERRORS:
            self.errors.append(text)

    def check(self, status: int, body: bytes, batch: int, t0: float, t1: float) -> None:
        """Account one answer: a 200 with a queue id per recipient, or a failure."""
        if status != 200:
            self.requests_failed += 1
            self.recipients_failed += batch
            self.error(f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}")
            return
        try:
            results = _decode_answer(body).results
            if results is None:
                self.error(f"HTTP 200 without results: {body[:200]!r}")
        except msgspec.DecodeError as e:
            results = None
            self.error(f"HTTP 200 with an unreadable body ({e}): {body[:200]!r}")
        ok = 0
        if results is not None:
            for r in results.recipients:
                if r.queue_id:
                    ok += 1
                    if r.queue_id in self.queue_ids:
                        self.duplicate_queue_ids += 1
                    self.queue_ids.add(r.queue_id)
                elif len(self.errors) < _MAX_ERRORS:
                    self.error(f"recipient {r.index} {r.address}: no queue_id "
                               f"({r.error}: {r.message})")
            if results.total_accepted_recipients != ok:
                self.error(f"total_accepted_recipients {results.total_accepted_recipients}"
                           f" but {ok} queue ids")
        ok = min(ok, batch)
        self.requests_ok += 1
        self.recipients_accepted += ok
        self.recipients_failed += batch - ok
        if ok < batch and results is not None and len(results.recipients) < batch:
            self.error(f"{batch - len(results.recipients)} recipients missing from the answer")
        self.latencies.append(t1 - t0)
        self.answers.append((t1, ok))
        self.last_ok = max(self.last_ok, t1)


async def run_http_inject(scenario: Scenario, peer_name: str, processes: int = 2,
                          show_progress: bool = True,
                          log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """The scenario's rows against ``peer_name``: see the module docstring."""
    rows: list[dict[str, Any]] = []
    if peer_name in HTTP_PEERS:
        for batch in scenario.http_batches:
            row = await _http_row(scenario, peer_name, batch, show_progress, log)
            if log and not row.get("error"):
                log(f"   {row['scenario']}: {row['recipients_accepted']} recipients in "
                    f"{row['requests']} requests, accepted {row['inject_msg_s']:.0f}/s, "
                    f"delivered {row['delivered_recipients']} "
                    f"({_num(row['e2e_msg_s'])}/s), p50 {_num(row['latency_p50_ms'], 1)} ms")
            rows.append(row)
    smtp = dataclasses.replace(scenario, name=SMTP_ROW, driver="loadgen",
                               description="SMTP injection of 2 KB single-recipient "
                                           "messages (bench loadgen), end to end")
    rows.append(await run_one(smtp, peer_name, processes, show_progress, log))
    return rows


def _num(v: float | None, nd: int = 0) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.{nd}f}"


async def _http_row(scenario: Scenario, peer_name: str, batch: int, show_progress: bool,
                    log: Callable[[str], None] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"scenario": row_name(batch), "peer": peer_name,
                           "description": f"HTTP injection, {batch} recipients a request, "
                                          "end to end", "batch": batch}
    sink = Sink()
    async with trio.open_nursery() as nursery:
        setup = await start_sink(nursery, scenario, sink)
        try:
            peer = make_peer(peer_name, setup)
            async with peer:
                await _measure(scenario, peer, sink, batch, row, show_progress)
        except PeerError as e:
            row["error"] = str(e)
            if log:
                log(f"{row['scenario']}/{peer_name}: {e}")
        nursery.cancel_scope.cancel()
    return row


async def _wait_ready(client: Any, deadline: float) -> None:
    """Until the HTTP listener answers the readiness check with 200 (``PeerError`` at
    ``deadline``)."""
    import httpx

    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = await client.get("/api/check-readiness/v1")
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = repr(e)
        await trio.sleep(0.05)
    raise PeerError(f"HTTP listener not ready in time ({last})")


async def _measure(scenario: Scenario, peer: Any, sink: Sink, batch: int,
                   row: dict[str, Any], show_progress: bool) -> None:
    import httpx

    spec = scenario.load
    clients = max(1, scenario.http_clients)
    content = build_content(spec.sizes[0][0])
    pool_n = max(1, min(_POOL_MAX, _POOL_RECIPIENTS // batch))
    pool = [build_transmission(batch, i * batch, spec.domains, content) for i in range(pool_n)]
    # fixed mode: ``messages`` recipients in whole requests; else ``duration`` seconds
    n_requests = math.ceil(spec.messages / batch) if spec.messages else 0
    tickets = itertools.count()
    headers = {"Authorization": peer.api_key, "Content-Type": "application/json"}
    roots = peer.root_pids()
    spool = peer.spool_dir
    tally = _Tally()
    state: dict[str, Any] = {"accepted": 0, "rcpts": 0, "peak_rss": 0, "peak_spool": 0,
                             "spool_per_msg": math.nan, "peak_queue": 0}
    progress = _Progress(f"{row['scenario']}/{peer.name}") if show_progress else None
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    timeout = httpx.Timeout(max(60.0, scenario.drain_timeout))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{peer.http_port}",
                                 limits=limits, timeout=timeout) as client:
        await _wait_ready(client, time.monotonic() + 30)
        base = await trio.to_thread.run_sync(sample_tree, roots)
        state["peak_rss"] = base.rss_bytes
        spool0 = await trio.to_thread.run_sync(dir_bytes, spool)
        t0_mono, t0_trio = time.monotonic(), trio.current_time()
        bench_cpu0 = time.thread_time()
        deadline = t0_mono + spec.duration

        async def one_client() -> None:
            while True:
                k = next(tickets)
                if (n_requests and k >= n_requests) or (
                        not n_requests and time.monotonic() >= deadline):
                    return
                body = pool[k % pool_n]
                t0 = time.monotonic()
                if not tally.first_send:
                    tally.first_send = t0
                tally.requests += 1
                try:
                    r = await client.post(HTTP_PATH, content=body, headers=headers)
                except httpx.HTTPError as e:
                    tally.requests_failed += 1
                    tally.recipients_failed += batch
                    tally.error(f"{type(e).__name__}: {e}")
                    await trio.sleep(0.05)  # a dead server must not make this spin
                    continue
                tally.check(r.status_code, r.content, batch, t0, time.monotonic())
                state["accepted"] = state["rcpts"] = tally.recipients_accepted

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample_server, roots, spool, spool0, sink, state, progress)
            async with trio.open_nursery() as load:
                for _ in range(clients):
                    load.start_soon(one_client)
            load_end = time.monotonic()
            complete = await drained(sink, tally.recipients_accepted,
                                     scenario.drain_timeout)
            nursery.cancel_scope.cancel()
    bench_cpu = time.thread_time() - bench_cpu0
    if progress is not None:
        progress.done()
    end = await trio.to_thread.run_sync(sample_tree, roots)

    def mono(t_trio: float) -> float:
        return t_trio - t0_trio + t0_mono

    first = tally.first_send or t0_mono
    accepted = tally.recipients_accepted
    last_arrival = mono(sink.arrivals[-1][0]) if sink.arrivals else load_end
    inject_secs = max(1e-9, tally.last_ok - first) if tally.last_ok else math.nan
    e2e_secs = max(1e-9, last_arrival - first)
    arrivals = [mono(t) - first for t, _, _ in sink.arrivals]
    accepted_tl = _cumulative([t - first for t, _ in tally.answers],
                              weights=[n for _, n in tally.answers])
    row.update({
        "batch": batch,
        "http_clients": clients,
        "requests": tally.requests,
        "requests_failed": tally.requests_failed,
        "accepted": accepted,
        "recipients_accepted": accepted,
        "recipients_failed": tally.recipients_failed,
        "failed": tally.recipients_failed,
        "duplicate_queue_ids": tally.duplicate_queue_ids,
        "complete": (complete and accepted > 0 and not tally.recipients_failed
                     and sink.total_recipients >= accepted),
        "duplicates": max(0, sink.total_recipients - accepted),
        "inject_msg_s": accepted / inject_secs if accepted else 0.0,
        "e2e_msg_s": accepted / e2e_secs if accepted else None,
        "latency_p50_ms": percentile(tally.latencies, 50) * 1000,
        "latency_p99_ms": percentile(tally.latencies, 99) * 1000,
        **server_figures(sink, state, base, end, roots, spool, accepted),
        "mb_sent": sum(len(pool[k % pool_n]) for k in range(tally.requests)) / 1e6,
        # the HTTP clients and the sink share the bench's trio thread
        "bench_cpu_s_per_1000": bench_cpu / accepted * 1000 if accepted else None,
        "errors": tally.errors,
        "timeline": {"accepted": accepted_tl, "accepted_rcpts": accepted_tl,
                     "delivered": _cumulative(arrivals),
                     "delivered_rcpts": _cumulative(
                         arrivals, weights=[n for _, _, n in sink.arrivals])},
    })
    row["msg_s"] = row["e2e_msg_s"]
    if not row["complete"] and hasattr(peer, "keep"):
        peer.keep = True  # an incomplete run keeps the server's files for a post-mortem
        row["kept_files"] = str(peer.tmp)
