"""The mail log: Postfix's line formats (checked with pflogsumm's own patterns), levels,
one line per record whatever a reply holds, whole lines from several processes, reopen
after logrotate (and the event log's), and its cost per event."""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.events import (
    Bounce,
    Delivery,
    EventLog,
    Expiration,
    Reception,
    Suppressed,
    TransientFailure,
)
from relay.events.maillog import MailLog, fmt_seconds, syslog_stamp
from relay.model import DeliveryJob, Envelope, Recipient, RecipientOutcome
from relay.outcomes.judge import Attempt, RetryPolicy, judge

#: 2024-03-05 06:07:08 UTC (the tests run in UTC: see the ``utc`` fixture).
T0 = 1709618828.25

# pflogsumm 1.1.5's patterns (/usr/sbin/pflogsumm), transcribed: its line split, its
# program/queue id split (with --syslog-name=relay), and what it counts.
PFLOG_LINE = re.compile(r"^(...) {1,2}(\d{1,2}) (\d{2}):(\d{2}):(\d{2}) \S+ (.+)$")
PFLOG_CMD = re.compile(r"^(?:postfix|relay)(?:/(?:smtps|submission))?/([^\[:]*).*?: ([^:\s]+)")
PFLOG_CLIENT = re.compile(r"\[\d+\]: \w+: client=(.+?)(,|$)")
PFLOG_FROM = re.compile(r"from=<([^>]*)>, size=(\d+)")
PFLOG_TO = re.compile(r"to=<([^>]*)>, (?:orig_to=<[^>]*>, )?relay=([^,]+), "
                      r"(?:conn_use=[^,]+, )?delay=([^,]+), (?:delays=[^,]+, )?"
                      r"(?:dsn=[^,]+, )?status=(\S+)(.*)$")


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def attempt(kind: type, rcpt: str = "r@d.test", **kw: object) -> object:
    fields: dict[str, object] = dict(
        queue_id="Q1", time=T0 + 2, recipient=rcpt, destination="d.test",
        mx_host="mx.d.test", ip="192.0.2.25", port=25, seconds=0.5, connect_seconds=0.25,
        queued_seconds=2.25, reply="250 2.0.0 Ok: queued as ABC")
    fields.update(kw)
    return kind(**fields)


def reception(**kw: object) -> Reception:
    fields: dict[str, object] = dict(
        queue_id="Q1", time=T0, sender="a@s.test", recipients=["r@d.test", "t@d.test"],
        size=1234, client_ip="192.0.2.7")
    fields.update(kw)
    return Reception(**fields)  # type: ignore[arg-type]


def write(tmp_path: Path, batches: list[list[object]], level: str = "info") -> list[str]:
    log = MailLog(tmp_path / "mail.log", hostname="relay.test", pid=42, level=level)
    for batch in batches:
        log(batch)  # type: ignore[arg-type]
    log.close()
    return (tmp_path / "mail.log").read_text().splitlines()


def test_lines_are_postfix_lines(tmp_path: Path) -> None:
    lines = write(tmp_path, [
        [reception()],
        [attempt(Delivery),
         attempt(TransientFailure, "t@d.test", reply="451 4.7.1 try later",
                 next_attempt=T0 + 300)],
        [attempt(Bounce, "t@d.test", time=T0 + 400, reply="550 5.1.1 no such user",
                 queued_seconds=400.4, dsn_queue_id="Q2"),
         attempt(Bounce, "u@d.test", time=T0 + 400, reply="550 no", queued_seconds=400.4,
                 dsn_queue_id="Q2")],
        [reception(queue_id="Q2", time=T0 + 400, sender="", recipients=["a@s.test"],
                   size=3000, client_ip="", via="dsn")],
        [attempt(Expiration, queue_id="Q3", mx_host="", ip="", port=0, seconds=0,
                 connect_seconds=0, queued_seconds=432000.2, time=T0 + 432000,
                 reply="451 4.4.1 connection refused", dsn_queue_id="Q4")],
        [reception(queue_id="Q5", via="http", auth_user=None)],
        [reception(queue_id="Q6", auth_user="app1", recipients=["x@d.test"])],
        [Suppressed(queue_id="Q6", time=T0, recipient="y@d.test", source="unsubscribe")],
    ])
    p = "relay.test relay/"
    assert lines == [
        f"Mar  5 06:07:08 {p}smtpd[42]: Q1: client=unknown[192.0.2.7]",
        f"Mar  5 06:07:08 {p}qmgr[42]: Q1: from=<a@s.test>, size=1234, nrcpt=2 (queue active)",
        # delay 2.25 = a 0 + b 1.75 + c 0.25 (connect) + d 0.25 (0.5 - 0.25)
        f"Mar  5 06:07:10 {p}smtp[42]: Q1: to=<r@d.test>, relay=mx.d.test[192.0.2.25]:25, "
        "delay=2.2, delays=0/1.8/0.25/0.25, dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as "
        "ABC)",
        f"Mar  5 06:07:10 {p}smtp[42]: Q1: to=<t@d.test>, relay=mx.d.test[192.0.2.25]:25, "
        "delay=2.2, delays=0/1.8/0.25/0.25, dsn=4.7.1, status=deferred (451 4.7.1 try later)",
        f"Mar  5 06:13:48 {p}smtp[42]: Q1: to=<t@d.test>, relay=mx.d.test[192.0.2.25]:25, "
        "delay=400, delays=0/400/0.25/0.25, dsn=5.1.1, status=bounced (550 5.1.1 no such "
        "user)",
        f"Mar  5 06:13:48 {p}bounce[42]: Q1: sender non-delivery notification: Q2",
        # no enhanced code in the reply: the class of the outcome; one notification per DSN
        f"Mar  5 06:13:48 {p}smtp[42]: Q1: to=<u@d.test>, relay=mx.d.test[192.0.2.25]:25, "
        "delay=400, delays=0/400/0.25/0.25, dsn=5.0.0, status=bounced (550 no)",
        f"Mar  5 06:13:48 {p}qmgr[42]: Q2: from=<>, size=3000, nrcpt=1 (queue active)",
        f"Mar 10 06:07:08 {p}qmgr[42]: Q3: to=<r@d.test>, relay=none, delay=432000, "
        "delays=0/432000/0/0, dsn=4.4.1, status=expired, returned to sender (451 4.4.1 "
        "connection refused)",
        f"Mar 10 06:07:08 {p}bounce[42]: Q3: sender non-delivery notification: Q4",
        f"Mar  5 06:07:08 {p}pickup[42]: Q5: sender=<a@s.test>, client=unknown[192.0.2.7], "
        "via=http",
        f"Mar  5 06:07:08 {p}qmgr[42]: Q5: from=<a@s.test>, size=1234, nrcpt=2 (queue active)",
        f"Mar  5 06:07:08 {p}smtpd[42]: Q6: client=unknown[192.0.2.7], sasl_username=app1",
        f"Mar  5 06:07:08 {p}qmgr[42]: Q6: from=<a@s.test>, size=1234, nrcpt=1 (queue active)",
        f"Mar  5 06:07:08 {p}qmgr[42]: Q6: to=<y@d.test>, relay=none, delay=0, "
        "delays=0/0/0/0, dsn=5.7.1, status=suppressed (on the suppression list: unsubscribe)",
    ]
    # ... and what pflogsumm makes of them.
    counted = {"received": 0, "sizes": 0, "sent": 0, "deferred": 0, "bounced": 0}
    for line in lines:
        m = PFLOG_LINE.match(line)
        assert m, line
        rest = m.group(6)
        cmd = PFLOG_CMD.match(rest)
        assert cmd, line
        if cmd.group(1) == "smtpd":
            counted["received"] += bool(PFLOG_CLIENT.search(rest))
        elif cmd.group(1) == "pickup":
            counted["received"] += bool(re.search(r": (sender|uid)=", rest))
        elif PFLOG_FROM.search(rest):
            counted["sizes"] += 1
        elif to := PFLOG_TO.search(rest):
            float(to.group(3))  # pflogsumm adds the delays up
            counted[to.group(4)] = counted.get(to.group(4), 0) + 1
    assert counted == {"received": 3, "sizes": 4, "sent": 1, "deferred": 1, "bounced": 2,
                       "expired,": 1, "suppressed": 1}


def test_numbers_and_stamps_as_postfix_and_syslog_write_them() -> None:
    assert [fmt_seconds(x) for x in (0, 0.004, 0.0123, 0.86, 1.25, 9.96, 344263.4)] == [
        "0", "0", "0.012", "0.86", "1.2", "10", "344263"]
    assert syslog_stamp(T0) == "Mar  5 06:07:08"
    assert syslog_stamp(T0 + 86400 * 10) == "Mar 15 06:07:08"


def test_levels_pick_the_lines(tmp_path: Path) -> None:
    batches: list[list[object]] = [
        [reception()], [attempt(Delivery)], [attempt(TransientFailure, reply="451 x")],
        [attempt(Bounce, reply="550 x", dsn_queue_id="Q2")], [attempt(Expiration, reply="451 y")],
    ]
    statuses = {}
    for level in ("info", "warning", "error"):
        lines = write(tmp_path / level, batches, level)
        statuses[level] = [re.sub(r"^.*?relay/(\w+)\[42\]: Q1: (?:.*status=(\w+).*)?.*$",
                                  r"\1 \2", line).strip() for line in lines]
    assert statuses == {
        "info": ["smtpd", "qmgr", "smtp sent", "smtp deferred", "smtp bounced", "bounce",
                 "qmgr expired"],
        "warning": ["smtp deferred", "smtp bounced", "bounce", "qmgr expired"],
        "error": ["smtp bounced", "bounce", "qmgr expired"],
    }
    with pytest.raises(ValueError, match="debug"):
        MailLog(tmp_path / "x.log", hostname="h", level="debug")


def test_a_reply_with_line_breaks_stays_one_line(tmp_path: Path) -> None:
    lines = write(tmp_path, [[attempt(TransientFailure, reply="451 4.3.0 a\r\nb\nc\rd"),
                              attempt(Delivery, rcpt="ünï@d.test")]])
    assert len(lines) == 2
    assert lines[0].endswith("status=deferred (451 4.3.0 a b c d)")
    assert "to=<ünï@d.test>" in lines[1]


def test_the_process_log_gets_one_record_per_line(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # log.level = "warning" (the root logger's) must not hide the mail log's info lines.
    monkeypatch.setattr(logging.getLogger(), "level", logging.WARNING)
    monkeypatch.setattr(logging.getLogger("relay.mail"), "level", logging.NOTSET)
    log = MailLog("-", hostname="relay.test")
    log([reception(), attempt(TransientFailure, reply="451 4.7.1 later\r\nmore")])
    log([attempt(Bounce, reply="550 5.1.1 gone")])
    records = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
    assert [r[:2] for r in records] == [("relay.mail", "INFO")] * 2 + [
        ("relay.mail", "WARNING"), ("relay.mail", "ERROR")]
    assert records[0][2] == "smtpd: Q1: client=unknown[192.0.2.7]"
    assert records[2][2].endswith("status=deferred (451 4.7.1 later more)")
    log.reopen()  # nothing to reopen: still logging
    log([attempt(Delivery)])
    assert "status=sent" in caplog.records[-1].getMessage()


def _append_lines(path: str, worker: int, batches: int) -> None:
    log = MailLog(path, hostname="relay.test", pid=1000 + worker)
    # Long lines, many per write: a torn write would show up as a mangled line.
    batch = [attempt(TransientFailure, rcpt=f"w{worker}-{i}@d.test", reply="451 " + "x" * 900)
             for i in range(8)]
    for _ in range(batches):
        log(batch)  # type: ignore[arg-type]
    log.close()


def test_processes_appending_to_one_file_never_interleave(tmp_path: Path) -> None:
    path = str(tmp_path / "mail.log")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_lines, args=(path, w, 200)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    lines = Path(path).read_text().splitlines()
    assert len(lines) == 3 * 200 * 8
    pattern = re.compile(r"^Mar  5 06:07:10 relay\.test relay/smtp\[(100[0-2])\]: Q1: "
                         r"to=<w(\d)-\d@d\.test>, .*status=deferred \(451 x{900}\)$")
    for line in lines:
        m = pattern.match(line)
        assert m and int(m.group(1)) - 1000 == int(m.group(2)), line[:120]


def test_reopen_writes_to_the_new_file(tmp_path: Path) -> None:
    mail_path, events_path = tmp_path / "log" / "mail.log", tmp_path / "log" / "events.jsonl"
    mail = MailLog(mail_path, hostname="relay.test", pid=42)
    events = EventLog(events_path)
    for sub in (mail, events):
        sub([reception(queue_id="OLD")])
    os.rename(mail_path, tmp_path / "mail.log.1")
    os.rename(events_path, tmp_path / "events.jsonl.1")
    for sub in (mail, events):
        sub([reception(queue_id="STILL")])  # logrotate moved it; not reopened yet
        sub.reopen()
        sub([reception(queue_id="NEW")])
        sub.close()
        sub.reopen()  # closed stays closed
    assert "OLD:" in (old := (tmp_path / "mail.log.1").read_text()) and "STILL:" in old
    assert "NEW" not in old
    new = mail_path.read_text()
    assert "NEW: client=" in new and "OLD" not in new and "STILL" not in new
    assert [e.queue_id for e in EventLog.read(tmp_path / "events.jsonl.1")] == ["OLD", "STILL"]
    assert [e.queue_id for e in EventLog.read(events_path)] == ["NEW"]


def test_reopen_that_fails_keeps_the_old_file(tmp_path: Path) -> None:
    directory = tmp_path / "log"
    mail = MailLog(directory / "mail.log", hostname="relay.test", pid=42)
    os.rename(directory / "mail.log", tmp_path / "moved.log")
    directory.rmdir()
    directory.write_text("not a directory now")
    with pytest.raises(OSError):
        mail.reopen()
    mail([reception(queue_id="KEPT")])
    mail.close()
    assert "KEPT: client=" in (tmp_path / "moved.log").read_text()


def test_the_judge_puts_port_and_connect_time_on_the_events() -> None:
    env = Envelope(queue_id="Q1", sender="a@s.test", recipients=[Recipient(address="r@d.test")],
                   received_at=T0)
    job = DeliveryJob(queue_id="Q1", domain="d.test", recipients=[0], due=T0)
    verdict = judge(job, env, b"", Attempt(
        outcomes=[RecipientOutcome(0, 250, "2.0.0", "ok")], destination="d.test",
        mx_host="mx.d.test", ip="192.0.2.25", port=2525, seconds=0.5, connect_seconds=0.2),
        RetryPolicy(retry_interval=60, max_retry_interval=600, max_age=3600),
        now=T0 + 1, hostname="relay.test", new_queue_id=lambda: "DSN")
    [event] = verdict.events
    assert isinstance(event, Delivery)
    assert (event.port, event.connect_seconds, event.seconds) == (2525, 0.2, 0.5)


def test_cost_per_event(tmp_path: Path) -> None:
    """The mail log runs for every event: measure it (printed with -s), and fail only when
    it is grossly slower than the few microseconds it costs."""
    log = MailLog(tmp_path / "mail.log", hostname="relay.test")
    events = [attempt(Delivery, rcpt=f"user{i}@gmail.com", destination="provider:google",
                      reply="250 2.0.0 OK  1709618828 d2e1a72fcca58-6b1a2f1e3besi12pfb.1 - "
                            "gsmtp") for i in range(2000)]
    results = {}
    for size in (1, 10):
        batches = [events[i:i + size] for i in range(0, len(events), size)]
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for batch in batches:
                log(batch)  # type: ignore[arg-type]
            best = min(best, (time.perf_counter() - started) / len(events))
        results[size] = best * 1e6
    log.close()
    print(f"\nmail log: {results[1]:.1f} us/event one at a time, "
          f"{results[10]:.1f} us/event in batches of 10")
    assert len((tmp_path / "mail.log").read_text().splitlines()) == 2 * 3 * len(events)
    assert results[1] < 100 and results[10] < 100
