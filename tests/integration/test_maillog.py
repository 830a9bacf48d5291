"""The mail log of a real ``relay serve``, read by Debian's pflogsumm, and log rotation.

Two workers deliver to a scripted sink (RCPT ``defer*`` gets 451, ``bounce*`` 550, the
rest 250), so the run has deliveries, deferrals, bounces and the DSNs of the bounces.
Then the logs are rotated as logrotate does (rename, then SIGUSR1 to the supervisor) and
more mail goes through. pflogsumm's counts over both mail logs must equal the counts of
the JSON event logs, and so must ``relay report``'s; every line after the rotation is in
the new files and none before it.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import smtplib
import subprocess
from pathlib import Path

import pytest

from relay.events import Bounce, Delivery, EventLog, Reception, TransientFailure
from tests.integration.relayproc import make_relay, wait_for
from tests.integration.smtpsink import RecordingSink

PFLOGSUMM = shutil.which("pflogsumm") or "/usr/sbin/pflogsumm"


class ScriptedSink(RecordingSink):
    """RCPT answers by the local part: ``defer*`` 451 4.3.0, ``bounce*`` 550, else 250."""

    def __init__(self) -> None:
        super().__init__(extra_keywords=(b"ENHANCEDSTATUSCODES",))

    def rcpt_reply(self, line: bytes) -> bytes:
        local = line.split(b"<", 1)[-1].split(b"@", 1)[0].lower()
        if local.startswith(b"defer"):
            # 4.3.0, not a 4.7.x: a policy deferral is pushback, and the pause it starts
            # would hold the deliveries this test makes after the rotation.
            return b"451 4.3.0 try again later\r\n"
        if local.startswith(b"bounce"):
            return b"550 5.1.1 no such user here\r\n"
        return b"250 2.1.5 ok\r\n"


def send(port: int, recipients: list[str], n: int = 1) -> list[str]:
    """``n`` messages to ``recipients`` in one session; their queue ids."""
    ids = []
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        smtp.ehlo("client.test")
        for i in range(n):
            smtp.mail("sender@src.test")
            for rcpt in recipients:
                code, _ = smtp.rcpt(rcpt)
                assert code == 250, (rcpt, code)
            code, reply = smtp.data(b"Subject: %d\r\n\r\nhello\r\n" % i)
            assert code == 250, reply
            ids.append(reply.decode().rsplit(" ", 1)[-1])
    return ids


def counts(paths: list[Path]) -> dict[str, int]:
    events = [e for p in paths for e in EventLog.read(p)]
    return {
        "received": sum(isinstance(e, Reception) and e.via == "smtp" for e in events),
        "delivered": sum(isinstance(e, Delivery) for e in events),
        "deferred": len({e.queue_id for e in events if isinstance(e, TransientFailure)}),
        "deferrals": sum(isinstance(e, TransientFailure) for e in events),
        "bounced": sum(isinstance(e, Bounce) for e in events),
    }


def pflogsumm_counts(text: str) -> dict[str, int]:
    grand = text.split("Grand Totals", 1)[1].split("Per-", 1)[0]

    def number(label: str) -> int:
        m = re.search(rf"^\s*(\d+)\s+{label}\b", grand, re.M)
        assert m, (label, grand)
        return int(m.group(1))

    deferrals = re.search(r"deferred\s+\((\d+)\s+deferrals\)", grand)
    return {"received": number("received"), "delivered": number("delivered"),
            "deferred": number("deferred"), "deferrals": int(deferrals.group(1)) if deferrals
            else 0, "bounced": number("bounced")}


LINE = re.compile(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d relay\.test "
                  r"relay/(smtpd|qmgr|smtp|bounce)\[(\d+)\]: (\w+): ")


def test_pflogsumm_reads_the_mail_log_and_sigusr1_reopens_the_logs(tmp_path: Path) -> None:
    if not Path(PFLOGSUMM).exists():
        pytest.fail("pflogsumm is not installed: run scripts/install-sysdeps")
    sink = ScriptedSink()
    relay = make_relay(tmp_path, workers=2, extra=f"""
[outbound]
smart_host = "127.0.0.1:{sink.port}"

[outbound.default]
retry_interval = 3600.0

[bounces]
auto_suppress = false    # this test counts bounces of the same address, again and again
""")
    text = relay.config_path.read_text().replace(
        "[log]\n", f'[log]\nmail_log = "{tmp_path / "log" / "mail.log"}"\n')
    relay.config_path.write_text(text)
    mail_log, events_log = tmp_path / "log" / "mail.log", tmp_path / "events.jsonl"
    relay.start()
    try:
        send(relay.port, ["ok@dest.test"], 6)
        send(relay.port, ["ok@dest.test", "defer@dest.test"], 2)
        send(relay.port, ["bounce@other.test"], 2)
        send(relay.port, ["ok@third.test", "bounce@third.test", "defer@third.test"])
        # 9 ok + 3 DSNs (one per message with a bounce, to sender@src.test) delivered
        want = {"received": 11, "delivered": 12, "deferred": 3, "deferrals": 3, "bounced": 3}
        wait_for(lambda: counts([events_log]) == want, 30, "every outcome in the event log")

        # logrotate: move the files, then SIGUSR1 to the supervisor.
        workers = set(relay.workers())
        assert len(workers) == 2
        mail_old, events_old = tmp_path / "mail.log.1", tmp_path / "events.jsonl.1"
        mail_log.rename(mail_old)
        events_log.rename(events_old)
        relay.signal(signal.SIGUSR1)
        wait_for(lambda: all(f"worker {i}: log files reopened" in relay.log()
                             for i in (0, 1)), 10, "both workers reopening their logs")
        assert mail_log.exists() and events_log.exists()
        new_ids = set(send(relay.port, ["ok@dest.test"], 2) + send(relay.port, ["ok@x.test"]))
        wait_for(lambda: counts([events_log])["delivered"] == 3, 30, "the new deliveries")
        assert set(relay.workers()) == workers  # nobody died of the signal
    finally:
        assert relay.stop() == 0
        sink.close()

    old_lines = mail_old.read_text().splitlines()
    new_lines = mail_log.read_text().splitlines()
    for line in old_lines + new_lines:
        m = LINE.match(line)
        assert m and int(m.group(2)) in workers, line
    assert {LINE.match(line).group(3) for line in new_lines} == new_ids  # type: ignore[union-attr]
    assert not [line for line in old_lines if any(f" {q}: " in line for q in new_ids)]
    assert {e.queue_id for e in EventLog.read(events_log)} == new_ids

    # pflogsumm's grand totals over both mail logs = the counts of both event logs.
    expected = counts([events_old, events_log])
    assert expected == {"received": 14, "delivered": 15, "deferred": 3, "deferrals": 3,
                        "bounced": 3}
    summary = subprocess.run(
        [PFLOGSUMM, "--syslog-name=relay", str(mail_old), str(mail_log)],
        capture_output=True, text=True, timeout=60, check=True).stdout
    assert pflogsumm_counts(summary) == expected, summary
    # ... and so do relay report's.
    report = relay.cli("report", "--events", str(events_old), "--events", str(events_log),
                       "--json")
    assert report.returncode == 0, report.stderr
    out = report.stdout
    totals = json.loads(out)["totals"]
    assert totals["received_via"] == {"smtp": 14}  # a DSN is stored with its outcome
    assert (totals["delivered"], totals["deferred"], totals["bounced"]) == (
        expected["delivered"], expected["deferrals"], expected["bounced"])
