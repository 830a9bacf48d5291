"""Webhooks (``[[webhooks]]``): the event log, POSTed in signed JSON batches, at least once.

The dispatcher does not subscribe to the bus: it reads the JSON-lines event log
(``log.events``), which every worker appends to before its spool commit. So it sees every
worker's events in the order they were written, keeps up or falls behind without slowing
delivery, and survives restarts: per webhook, a persisted cursor says how far the
receiver has acknowledged.

Exactly one process runs it: worker 0 (``relay.worker``). The spool lock
(``relay.supervisor.lock_spool``) admits one relay per spool, and the supervisor restarts
worker 0 only after it has died, so two dispatchers never post the same webhook at once.
Each webhook is one trio task that sends one batch at a time; the log is in order, so
the events of one message (one ``queue_id``) arrive in the order they were written.

Delivery, for one webhook:

* Read complete lines from the cursor on (at most ``READ_CHUNK`` bytes ahead of the
  batch being built), keep the events whose ``type`` is in ``events`` and whose
  ``tenant`` is in ``tenants`` (an empty list matches all; an event without a tenant
  matches only an empty ``tenants``), until the batch has ``batch_size`` events (or
  ``MAX_BATCH_BYTES``), or its first event has waited ``max_batch_age`` seconds.
* POST it (httpx on trio). A 2xx acknowledges it: the cursor moves past it, and is saved
  (``<spool.path>/webhooks/<name>.cursor``: written, fsynced, renamed, directory
  fsynced) at most every ``CURSOR_SAVE_INTERVAL`` seconds and when the webhook stops, so
  a crash posts at most that second's batches again (and the one in flight): receivers
  must tolerate duplicates (``event_id`` tells them). Anything else (a connection
  error, no answer within ``timeout`` seconds, 3xx, 4xx, 5xx) is logged and the same
  batch is posted again after a backoff that doubles from ``retry_min`` to ``retry_max``
  seconds (times a random 0.5..1, so receivers coming back are not hit by every relay at
  once). Nothing is ever dropped: a 4xx is an error of the receiver or the operator, and
  the events wait until it is fixed.
* While the receiver is down, memory stays one batch: the backlog is simply the unread
  part of the log, exported per webhook as ``webhook_backlog_bytes`` and
  ``webhook_backlog_events`` (an estimate from the mean line length) and
  ``webhook_lag_seconds`` (age of the oldest event not yet acknowledged).

The request: ``POST <url>``, ``Content-Type: application/json``, body
``{"events": [EVENT, ...]}`` where each EVENT is the event's record exactly as in the log
(``relay.events.types``: ``type``, ``time``, ``queue_id``, ``tenant``, ...) with one
field added first, ``"event_id": "<inode>:<offset>"`` (the log file's inode number and the
line's byte offset): unique per event within a node's current log files and the same on
every retry, so a receiver can drop duplicates. Headers:

* ``X-Relay-Timestamp``: Unix seconds when this attempt was signed;
* ``X-Relay-Signature``: ``sha256=`` + hex HMAC-SHA256, keyed with the webhook's
  secret, of ``<timestamp> + "." + <body>`` (the timestamp is signed, so a receiver that
  rejects old timestamps defeats replays; ``verify`` checks it);
* ``X-Relay-Webhook``: the webhook's ``name``; ``X-Relay-Batch``: the first event's id
  (the same on every retry of the batch).

Log rotation: rename-and-reopen (logrotate's default ``create``, then ``postrotate``
``kill -USR1`` the supervisor). The dispatcher keeps its descriptor to the renamed file
and finishes it: when the path names another file and the old one has had nothing new
for ``ROTATION_GRACE`` seconds (workers still writing to it until they reopen), it goes
on with the new file from its start. After a restart it finds the cursor's file by its
inode among the log's siblings whose names start with the log's name
(``events.jsonl.1``, ``events.jsonl-20260101``); use ``delaycompress`` (or no
compression), because a compressed file is another file. A cursor whose file is gone is
logged as an error and delivery goes on at the start of the current file. A file
truncated in place (``copytruncate``) is read again from its start, also with an error:
events written between the copy and the truncation may be missing; do not use it (the
relay reopens its logs on SIGUSR1).

A line that does not decode (a write torn by a crash) is logged and skipped; when an
event starts later on it (the next write appended after the torn one), that event is
kept. Lines over ``MAX_LINE`` bytes are skipped likewise.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import random
import time
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import trio

if TYPE_CHECKING:
    import httpx

    from relay.config import Config, WebhookConfig
    from relay.events.metrics import Metrics

__all__ = [
    "HEADER_BATCH",
    "HEADER_SIGNATURE",
    "HEADER_TIMESTAMP",
    "HEADER_WEBHOOK",
    "Batch",
    "Cursor",
    "CursorStore",
    "EventFilter",
    "LogReader",
    "Webhook",
    "WebhookService",
    "backoff",
    "parse_line",
    "sign",
    "verify",
]

log = logging.getLogger("relay.webhooks")

HEADER_SIGNATURE = "X-Relay-Signature"
HEADER_TIMESTAMP = "X-Relay-Timestamp"
HEADER_WEBHOOK = "X-Relay-Webhook"
HEADER_BATCH = "X-Relay-Batch"

#: Bytes read from the log at a time (the read-ahead beyond the batch being built).
READ_CHUNK = 64 * 1024
#: A longer line is skipped (an event is a few hundred bytes; a Reception lists its
#: recipients, 10,000 of them are well under this).
MAX_LINE = 16 * 1024 * 1024
#: A batch is sent when it reaches this many bytes, whatever ``batch_size`` says.
MAX_BATCH_BYTES = 4 * 1024 * 1024
#: How often the end of the log is polled for new lines.
POLL_INTERVAL = 0.05
#: After a rotation, the old file is finished when nothing was added to it for this long.
ROTATION_GRACE = 5.0
#: How often the backlog gauges are updated.
GAUGE_INTERVAL = 1.0
#: The cursor file is written at most this often (and when the webhook stops).
CURSOR_SAVE_INTERVAL = 1.0
#: Bytes of a response body read (and discarded) so the connection can be reused.
MAX_RESPONSE = 64 * 1024
#: Bytes at the start of a log file whose hash is kept in the cursor: tells the file from
#: a later one that got its inode number after it was deleted.
HEAD_BYTES = 128


# -- signing ----------------------------------------------------------------------------

def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The ``X-Relay-Signature`` value: ``sha256=`` + hex HMAC-SHA256 of
    ``b"<timestamp>." + body`` keyed with ``secret``."""
    mac = hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: bytes, timestamp: str, body: bytes, signature: str,
           max_age: float | None = 300.0, now: float | None = None) -> bool:
    """What a receiver checks: ``signature`` is ours for ``timestamp`` and ``body``
    (compared in constant time) and, unless ``max_age`` is None, the timestamp is at
    most ``max_age`` seconds from ``now``."""
    if not timestamp.isascii() or not timestamp.isdigit():
        return False
    ts = int(timestamp)
    if max_age is not None and abs((time.time() if now is None else now) - ts) > max_age:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


def backoff(attempt: int, low: float, high: float, rand: float | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1, 2, ...): ``low``
    doubled per attempt, at most ``high``, times 0.5..1 (``rand`` in [0, 1), random
    when None)."""
    base = min(high, low * 2.0 ** min(attempt - 1, 60))
    return base * (0.5 + 0.5 * (random.random() if rand is None else rand))


# -- lines and batches ------------------------------------------------------------------

class _Head(msgspec.Struct):
    """The fields of an event the dispatcher looks at (the rest is passed on as is)."""

    type: str
    time: float = 0.0
    tenant: str | None = None


_decode_head = msgspec.json.Decoder(_Head).decode
#: How every event record starts (msgspec writes the tag field first).
_EVENT_START = b'{"type":'


def parse_line(line: bytes) -> tuple[int, _Head, bytes] | None:
    """``(start, head, record)`` of one log line (without its newline): ``record`` is the
    JSON object, ``start`` its index in ``line`` (> 0 only after a torn write). A line
    that does not decode as a whole is tried from each later ``{"type":`` on (a write
    torn by a crash, then a whole event appended after it); None when nothing decodes."""
    record = line.strip()
    try:
        return 0, _decode_head(record), record
    except msgspec.DecodeError:
        pass
    cut = line.find(_EVENT_START, 1)
    while cut > 0:
        try:
            return cut, _decode_head(line[cut:]), line[cut:].rstrip()
        except msgspec.DecodeError:
            cut = line.find(_EVENT_START, cut + 1)
    return None


class EventFilter:
    """A webhook's ``events`` and ``tenants``: an empty collection matches all; an event
    without a tenant matches only when ``tenants`` is empty."""

    def __init__(self, types: Collection[str] = (), tenants: Collection[str] = ()) -> None:
        self.types = frozenset(types)
        self.tenants = frozenset(tenants)

    def __call__(self, event_type: str, tenant: str | None) -> bool:
        if self.types and event_type not in self.types:
            return False
        return not self.tenants or tenant in self.tenants


class Cursor(msgspec.Struct, frozen=True):
    """A position in the event log: the file (device, inode, and a hash of its first
    ``head_len`` bytes) and the byte offset of the first line not yet acknowledged."""

    dev: int
    ino: int
    offset: int
    head: str = ""
    head_len: int = 0


class Batch:
    """The events of one POST, as ``{"events": [...]}`` parts; ``end`` is the cursor
    once it is acknowledged."""

    def __init__(self) -> None:
        self.records: list[bytes] = []
        self.bytes = 0
        self.id = ""
        #: The first event's ``time`` (for the lag gauge).
        self.first_time = 0.0
        self.end: Cursor | None = None

    def __len__(self) -> int:
        return len(self.records)

    def add(self, event_id: str, head: _Head, record: bytes) -> None:
        """Add ``record`` (a JSON object) with ``event_id`` spliced in as its first
        field."""
        if not self.records:
            self.id, self.first_time = event_id, head.time
        item = b'{"event_id":"' + event_id.encode() + b'",' + record[1:]
        self.records.append(item)
        self.bytes += len(item) + 1

    def full(self, batch_size: int) -> bool:
        return len(self.records) >= batch_size or self.bytes >= MAX_BATCH_BYTES

    def payload(self) -> bytes:
        return b'{"events":[' + b",".join(self.records) + b"]}"


# -- the cursor file --------------------------------------------------------------------

_encode_cursor = msgspec.json.Encoder().encode
_decode_cursor = msgspec.json.Decoder(Cursor).decode


class CursorStore:
    """One webhook's cursor file; ``save`` is atomic and durable (write, fsync, rename,
    fsync of the directory), so a crash leaves the old cursor or the new one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Cursor | None:
        """The saved cursor, or None when there is none. An unreadable file is logged,
        kept as ``<name>.cursor.bad`` and taken as none (delivery then starts at the
        beginning of the current log file: duplicates rather than losses)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return _decode_cursor(data)
        except msgspec.DecodeError as e:
            bad = self.path.with_name(self.path.name + ".bad")
            log.error("webhook cursor %s is unreadable (%s); kept as %s, starting at the "
                      "beginning of the current event log", self.path, e, bad)
            os.replace(self.path, bad)
            return None

    def save(self, cursor: Cursor) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, _encode_cursor(cursor))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# -- reading the log --------------------------------------------------------------------

class LogReader:
    """Complete lines of the event log from a cursor on, following rotation (see the
    module docstring). ``read_more``, ``follow_rotation``, ``open`` and
    ``backlog_bytes`` do file I/O (call them in a thread); ``next_line`` and
    ``consumed`` only look at what was read."""

    def __init__(self, path: str, name: str = "") -> None:
        self.path = path
        self.name = name
        self._fd: int | None = None
        self._dev = self._ino = 0
        self._head, self._head_len = "", 0
        self._buf = bytearray()
        #: File offset of ``_buf[0]``, and index in ``_buf`` of the first unconsumed byte.
        self._start = self._pos = 0
        self._skipping = False
        self._rotated_at: float | None = None
        #: Lines skipped because they did not decode or were too long.
        self.bad_lines = 0

    # the file

    def open(self, cursor: Cursor | None, backfill: bool = True) -> str:
        """Position at ``cursor`` (its file found by inode), or, without one, at the
        start (``backfill``) or the end of the current file. Returns what was done, for
        the log."""
        self.close()
        if cursor is not None:
            found = self._find(cursor)
            if found is not None:
                fd, size = found
                offset = cursor.offset
                how = f"resuming at offset {offset}"
                if size < offset:
                    log.error("webhook %s: %s is shorter (%d bytes) than its cursor (%d): "
                              "it was truncated in place (copytruncate?); reading it from "
                              "its start", self.name, self.path, size, offset)
                    offset, how = 0, "truncated: from its start"
                self._adopt(fd, offset)
                return how
            log.error("webhook %s: the event log file of its cursor (inode %d, offset %d) "
                      "is gone (rotated and removed or compressed?); going on at the "
                      "start of %s: its undelivered events are lost to this webhook",
                      self.name, cursor.ino, cursor.offset, self.path)
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        offset = 0 if backfill or cursor is not None else _end_of_last_line(fd)
        self._adopt(fd, offset)
        return f"starting at offset {offset} of {self.path}"

    def _find(self, cursor: Cursor) -> tuple[int, int] | None:
        """(descriptor, size) of the file ``cursor`` names: the log itself or one of its
        rotated siblings."""
        log_path = Path(self.path)
        candidates = [log_path]
        with contextlib.suppress(OSError):
            candidates += sorted(p for p in log_path.parent.iterdir()
                                 if p.name.startswith(log_path.name) and p != log_path)
        for path in candidates:
            try:
                st = path.stat()
            except OSError:
                continue
            if (st.st_dev, st.st_ino) != (cursor.dev, cursor.ino):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            if _head_hash(fd, cursor.head_len) == cursor.head:
                return fd, os.fstat(fd).st_size
            os.close(fd)
        return None

    def _adopt(self, fd: int, offset: int) -> None:
        st = os.fstat(fd)
        self._fd, self._dev, self._ino = fd, st.st_dev, st.st_ino
        self._buf.clear()
        self._start, self._pos, self._skipping, self._rotated_at = offset, 0, False, None
        self._head_len = min(HEAD_BYTES, st.st_size)
        self._head = _head_hash(fd, self._head_len)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # reading

    def read_more(self) -> int:
        """Read up to ``READ_CHUNK`` more bytes; how many were read (0 at the end)."""
        assert self._fd is not None
        if self._pos:
            del self._buf[:self._pos]
            self._start += self._pos
            self._pos = 0
        data = os.pread(self._fd, READ_CHUNK, self._start + len(self._buf))
        if data:
            self._buf += data
            self._rotated_at = None
            if self._head_len < HEAD_BYTES:
                self._head_len = min(HEAD_BYTES, self._start + len(self._buf))
                self._head = _head_hash(self._fd, self._head_len)
        return len(data)

    def next_line(self) -> tuple[int, bytes] | None:
        """``(offset, line)`` of the next complete line (without its newline), or None
        until more is read. An over-long line is skipped (``bad_lines``)."""
        while True:
            nl = self._buf.find(b"\n", self._pos)
            if nl < 0:
                if len(self._buf) - self._pos > MAX_LINE:
                    self._skip_partial(f"longer than {MAX_LINE} bytes")
                    self._skipping = True
                return None
            if self._skipping:  # the end of an over-long line
                self._skipping = False
                self._pos = nl + 1
                continue
            if nl - self._pos > MAX_LINE:
                self._skip_partial(f"longer than {MAX_LINE} bytes", nl + 1)
                continue
            offset = self._start + self._pos
            line = bytes(self._buf[self._pos:nl])
            self._pos = nl + 1
            return offset, line

    def _skip_partial(self, why: str, end: int | None = None) -> None:
        """Skip the line at the read position, up to ``end`` (default: all read)."""
        log.error("webhook %s: skipping a line of %s at offset %d: %s", self.name,
                  self.path, self._start + self._pos, why)
        self.bad_lines += 1
        self._pos = len(self._buf) if end is None else end

    def consumed(self) -> Cursor:
        """The cursor just past the last line ``next_line`` returned."""
        return Cursor(self._dev, self._ino, self._start + self._pos, self._head,
                      self._head_len)

    def event_id(self, offset: int) -> str:
        return f"{self._ino}:{offset}"

    def follow_rotation(self, grace: float = ROTATION_GRACE) -> bool:
        """At the end of the file: whether the reader moved on (the old file finished
        after a rotation, or the file was truncated in place and is read from its start
        again). Call it only when ``read_more`` returned 0."""
        assert self._fd is not None
        mine = os.fstat(self._fd)
        if mine.st_size < self._start + len(self._buf):
            log.error("webhook %s: %s was truncated in place (copytruncate?); reading it "
                      "from its start: events written meanwhile may be missing", self.name,
                      self.path)
            self._adopt(self._fd, 0)
            return True
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False  # renamed, the new one not created yet
        if (st.st_dev, st.st_ino) == (self._dev, self._ino):
            self._rotated_at = None
            return False
        now = time.monotonic()
        if self._rotated_at is None:
            self._rotated_at = now
        if now - self._rotated_at < grace:
            return False
        if self._pos < len(self._buf):
            self._skip_partial("a torn write at the end of the rotated file")
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        old = self._fd
        self._adopt(fd, 0)
        os.close(old)
        log.info("webhook %s: finished the rotated event log, now reading %s", self.name,
                 self.path)
        return True

    def backlog_bytes(self) -> int:
        """Bytes of the log not consumed yet (the rest of this file, and the new one
        after a rotation)."""
        if self._fd is None:
            return 0
        behind = max(0, os.fstat(self._fd).st_size - (self._start + self._pos))
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return behind
        if (st.st_dev, st.st_ino) != (self._dev, self._ino):
            behind += st.st_size
        return behind


def _head_hash(fd: int, length: int) -> str:
    return hashlib.sha256(os.pread(fd, length, 0)).hexdigest()


def _end_of_last_line(fd: int) -> int:
    """The offset just past the last newline of the file (0 when it has none in its
    last ``READ_CHUNK`` bytes)."""
    size = os.fstat(fd).st_size
    start = max(0, size - READ_CHUNK)
    tail = os.pread(fd, size - start, start)
    nl = tail.rfind(b"\n")
    return start + nl + 1 if nl >= 0 else 0


# -- one webhook ------------------------------------------------------------------------

class Webhook:
    """The delivery loop of one ``[[webhooks]]`` entry (see the module docstring)."""

    def __init__(self, config: WebhookConfig, events_path: str, state_dir: Path,
                 metrics: Metrics) -> None:
        self.config = config
        self.events_path = events_path
        self.metrics = metrics
        self.store = CursorStore(state_dir / f"{config.name}.cursor")
        self.filter = EventFilter(config.events, config.tenants)
        self.reader = LogReader(events_path, config.name)
        self.shown_url = _without_password(config.url)
        #: Mean bytes per line (the events-behind estimate), smoothed.
        self._line_bytes = 300.0
        #: The cursor past the last acknowledged batch (or skipped events), and the one
        #: last written to the cursor file.
        self._acked: Cursor | None = None
        self._saved: Cursor | None = None
        self._next_save = self._next_gauges = 0.0
        self._batch: Batch | None = None

    async def run(self) -> None:
        """Deliver forever. An unexpected error is logged and the loop starts again
        from the saved cursor after a backoff; it never ends the worker."""
        failures = 0
        while True:
            try:
                await self._run()
            except Exception:
                failures += 1
                delay = backoff(failures, self.config.retry_min, self.config.retry_max)
                log.exception("webhook %s failed; starting again from its cursor in %.1fs",
                              self.config.name, delay)
                await trio.sleep(delay)
            finally:
                await self._save_at_stop()
                self.reader.close()

    async def _save_at_stop(self) -> None:
        """Write the acknowledged cursor when the loop ends, cancelled or failed, so a
        clean stop re-sends nothing; a failure here is only logged."""
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await self._save(force=True)
            except Exception:
                log.exception("webhook %s: cannot save its cursor %s", self.config.name,
                              self.store.path)

    async def _run(self) -> None:
        import httpx  # only the worker that runs webhooks pays for the import

        cfg = self.config
        secret = await trio.to_thread.run_sync(cfg.secret_bytes)
        cursor = await trio.to_thread.run_sync(self.store.load)
        how = await trio.to_thread.run_sync(self.reader.open, cursor, cfg.backfill)
        log.info("webhook %s: POSTing to %s, %s", cfg.name, self.shown_url, how)
        self._acked = self.reader.consumed()
        await self._save(force=True)
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(timeout=cfg.timeout, limits=limits, trust_env=False,
                                     follow_redirects=False) as client:
            while True:
                batch = await self._collect()
                await self._deliver(client, secret, batch)
                self._acked = batch.end
                await self._save()

    async def _save(self, force: bool = False) -> None:
        """Write the acknowledged cursor to its file: at most every
        ``CURSOR_SAVE_INTERVAL`` seconds unless ``force`` (two fsyncs a batch would
        compete with the spool's commits; a crash re-sends at most that much)."""
        cursor, now = self._acked, trio.current_time()
        if cursor is None or cursor == self._saved or (not force and now < self._next_save):
            return
        await trio.to_thread.run_sync(self.store.save, cursor)
        self._saved, self._next_save = cursor, now + CURSOR_SAVE_INTERVAL

    async def _collect(self) -> Batch:
        """The next batch: ``batch_size`` matching events, or fewer once the first has
        waited ``max_batch_age`` seconds."""
        cfg, reader = self.config, self.reader
        batch = self._batch = Batch()
        deadline = 0.0
        while not batch.full(cfg.batch_size):
            item = reader.next_line()
            if item is None:
                if await trio.to_thread.run_sync(reader.read_more):
                    if batch and trio.current_time() >= deadline:
                        break  # far behind, past many filtered-out events
                    continue
                now = trio.current_time()
                if batch and now >= deadline:
                    break
                if await trio.to_thread.run_sync(reader.follow_rotation,
                                                 ROTATION_GRACE):
                    continue
                if not batch:  # past the filtered-out events too
                    self._acked = reader.consumed()
                    await self._save()
                await self._gauges()
                wait = min(POLL_INTERVAL, deadline - now) if batch else POLL_INTERVAL
                await trio.sleep(max(0.0, wait))
                continue
            offset, line = item
            self._line_bytes += (len(line) + 1 - self._line_bytes) / 64
            parsed = parse_line(line)
            if parsed is None:
                self._bad_line(offset, line)
                continue
            start, head, record = parsed
            if start:
                self._bad_line(offset, line[:start])
            if self.filter(head.type, head.tenant):
                if not batch:
                    deadline = trio.current_time() + cfg.max_batch_age
                batch.add(reader.event_id(offset + start), head, record)
        batch.end = reader.consumed()
        return batch

    def _bad_line(self, offset: int, line: bytes) -> None:
        self.reader.bad_lines += 1
        self.metrics.inc("webhook_skipped_lines_total", webhook=self.config.name)
        log.error("webhook %s: skipping an unreadable line of %s at offset %d (%d bytes): "
                  "%r", self.config.name, self.events_path, offset, len(line), line[:120])

    async def _gauges(self, force: bool = False) -> None:
        now = trio.current_time()
        if not force and now < self._next_gauges:
            return
        self._next_gauges = now + GAUGE_INTERVAL
        name = self.config.name
        batch = self._batch
        pending = batch.bytes if batch is not None else 0
        behind = await trio.to_thread.run_sync(self.reader.backlog_bytes) + pending
        self.metrics.set("webhook_backlog_bytes", behind, webhook=name)
        events = len(batch) if batch is not None else 0
        estimate = events + round((behind - pending) / max(1.0, self._line_bytes))
        self.metrics.set("webhook_backlog_events", estimate, webhook=name)
        lag = time.time() - batch.first_time if batch else 0.0
        self.metrics.set("webhook_lag_seconds", max(0.0, lag), webhook=name)

    async def _deliver(self, client: httpx.AsyncClient, secret: bytes, batch: Batch) -> None:
        """POST ``batch`` until a 2xx answers it, backing off between attempts."""
        cfg, name = self.config, self.config.name
        body = batch.payload()
        attempt = 0
        while True:
            attempt += 1
            started = trio.current_time()
            failure = await self._post(client, secret, batch, body)
            self.metrics.observe("webhook_post_seconds", trio.current_time() - started,
                                 webhook=name)
            if failure is None:
                self.metrics.inc("webhook_deliveries_total", webhook=name)
                self.metrics.inc("webhook_events_total", len(batch), webhook=name)
                if attempt > 1:
                    log.info("webhook %s: batch %s of %d events delivered after %d "
                             "attempts", name, batch.id, len(batch), attempt)
                self._batch = None
                await self._gauges()
                return
            self.metrics.inc("webhook_failures_total", webhook=name)
            delay = backoff(attempt, cfg.retry_min, cfg.retry_max)
            log.warning("webhook %s: POST %s failed (%s), attempt %d; %d events held, "
                        "trying again in %.2fs", name, self.shown_url, failure, attempt,
                        len(batch), delay)
            await self._gauges(force=True)
            await trio.sleep(delay)

    async def _post(self, client: httpx.AsyncClient, secret: bytes, batch: Batch,
                    body: bytes) -> str | None:
        """One attempt: None when a 2xx answered, else what went wrong."""
        import httpx

        cfg = self.config
        timestamp = int(time.time())
        headers = {"content-type": "application/json", "user-agent": "relay-webhooks",
                   HEADER_TIMESTAMP: str(timestamp),
                   HEADER_SIGNATURE: sign(secret, timestamp, body),
                   HEADER_WEBHOOK: cfg.name, HEADER_BATCH: batch.id}
        status = 0
        with trio.move_on_after(cfg.timeout) as scope:
            try:
                async with client.stream("POST", cfg.url, content=body,
                                         headers=headers) as response:
                    status = response.status_code
                    await _discard_body(response)
            except (httpx.HTTPError, httpx.InvalidURL, OSError) as e:
                return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if scope.cancelled_caught:
            return f"no answer within {cfg.timeout:g}s"
        if 200 <= status < 300:
            return None
        return f"HTTP {status}"


def _without_password(url: str) -> str:
    """``url`` for the log: a password in it (``https://user:secret@host/``) hidden."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


async def _discard_body(response: Any) -> None:
    """Read up to ``MAX_RESPONSE`` bytes of the answer (then it is dropped with the
    connection): a receiver cannot make us hold a big body."""
    seen = 0
    async for chunk in response.aiter_raw():
        seen += len(chunk)
        if seen > MAX_RESPONSE:
            break


# -- the service in worker 0 ------------------------------------------------------------

class _Task:
    def __init__(self, config: WebhookConfig) -> None:
        self.config = config
        self.scope = trio.CancelScope()
        self.done = trio.Event()


class WebhookService:
    """Every ``[[webhooks]]`` entry of a config, one task each, in one nursery (worker 0
    runs it). ``apply_config`` (SIGHUP) restarts the webhooks whose entry changed, from
    their cursors, starts new ones and stops removed ones; the event log's path is the
    one at start (``[log]`` changes need a restart)."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.events_path = config.log.events
        self.state_dir = Path(config.spool.path) / "webhooks"
        self.metrics = metrics
        self._wanted = list(config.webhooks)
        self._running: dict[str, _Task] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._sync()
            task_status.started()
            await trio.sleep_forever()

    def apply_config(self, config: Config) -> None:
        self._wanted = list(config.webhooks)
        if self._nursery is not None:
            self._sync()

    def _sync(self) -> None:
        assert self._nursery is not None
        wanted = {w.name: w for w in self._wanted}
        stopped: dict[str, _Task] = {}
        for name, task in list(self._running.items()):
            if wanted.get(name) != task.config:
                task.scope.cancel()
                stopped[name] = self._running.pop(name)
        for name, cfg in wanted.items():
            if name not in self._running:
                task = self._running[name] = _Task(cfg)
                self._nursery.start_soon(self._run_task, task, stopped.get(name))

    async def _run_task(self, task: _Task, previous: _Task | None) -> None:
        """Run one webhook; a restarted one waits for its predecessor to stop first, so
        one webhook never posts twice at once."""
        try:
            if previous is not None:
                await previous.done.wait()
            with task.scope:
                webhook = Webhook(task.config, self.events_path, self.state_dir,
                                  self.metrics)
                await webhook.run()
        finally:
            task.done.set()
