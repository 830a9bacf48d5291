"""`relay queue` beside a running relay: list/show with domain filters, retry, delete;
the human output of stats and list; the spool found from any directory."""

from __future__ import annotations

import json
import re
import smtplib
import subprocess
from pathlib import Path

from relay.cli import fmt_size
from relay.spool import Spool
from tests.integration.relayproc import RELAY, RelayProcess, make_relay, wait_for

#: An age as `relay queue` prints it, e.g. "45s", "5m30s".
AGE = r"(\d+s|\d+m(\d+s)?)"


def _queue(relay: RelayProcess, *args: str) -> str:
    result = relay.cli("queue", *args, "--config", str(relay.config_path))
    assert result.returncode == 0, result.stderr
    return result.stdout


def _list_json(relay: RelayProcess, *args: str) -> list[dict]:  # type: ignore[type-arg]
    return json.loads(_queue(relay, "list", "--json", *args))


def test_queue_commands_against_a_live_relay(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, workers=1).start()  # mail is routed to a closed port
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo("client.test")
            client.sendmail("a@s.test", ["x@one.test", "y@two.test"], b"Subject: 1\r\n\r\n1\r\n")
            client.sendmail("a@s.test", ["z@two.test"], b"Subject: 2\r\n\r\n2\r\n")
        everything = _list_json(relay)
        assert len(everything) == 2
        only_one = _list_json(relay, "--domain", "one.test")
        assert len(only_one) == 1
        qid = only_one[0]["queue_id"]
        detail = json.loads(_queue(relay, "show", qid))
        text = json.dumps(detail)
        assert "x@one.test" in text and "y@two.test" in text and "z@two.test" not in text
        assert "scheduled for immediate retry" in _queue(relay, "retry", "--domain", "two.test")
        assert f"{qid}: deleted" in _queue(relay, "delete", qid)
        remaining = _list_json(relay)
        assert [e["queue_id"] for e in remaining] != [qid] and len(remaining) == 1
        missing = relay.cli("queue", "show", qid, "--config", str(relay.config_path))
        assert missing.returncode != 0 and "no such message" in missing.stderr
        assert "Traceback" not in missing.stderr
    finally:
        assert relay.stop() == 0


def test_human_output_of_list_and_stats(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, workers=1).start()  # mail is routed to a closed port
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo("client.test")
            client.sendmail("a@s.test", ["x@one.test", "y@two.test"], b"Subject: 1\r\n\r\n1\r\n")
            client.sendmail("", ["z@two.test"], b"Subject: 2\r\n\r\n" + b"2" * 70 + b"\r\n")

        # Each job's first attempt meets the closed port; its reply is what list shows.
        def attempted() -> list[dict] | None:  # type: ignore[type-arg]
            entries = _list_json(relay)
            done = all(d.get("last_error") for e in entries for d in e["domains"])
            return entries if done else None

        entries = wait_for(attempted, 30, "a first delivery attempt of every job")
        first, second = entries
        replies = {(e["queue_id"], d["domain"]): d["last_error"]
                   for e in entries for d in e["domains"]}
        assert all(r.startswith("451 4.4.1 ") for r in replies.values()), replies

        out = _queue(relay, "list").splitlines()
        ind = " " * 39
        assert out[0] == "-Queue ID-            --Size--  -Age-  -Sender/Recipient-"
        size = re.escape(fmt_size(first["size"]))
        assert re.fullmatch(rf"{first['queue_id']} +{size} +{AGE}  a@s\.test", out[1]), out
        assert out[2:5] == [
            f"{ind}x@one.test ({replies[first['queue_id'], 'one.test']})",
            f"{ind}y@two.test ({replies[first['queue_id'], 'two.test']})",
            "",
        ]
        size = re.escape(fmt_size(second["size"]))
        assert re.fullmatch(rf"{second['queue_id']} +{size} +{AGE}  <>", out[5]), out
        total_kib = -(-(first["size"] + second["size"]) // 1024)
        assert out[6:] == [f"{ind}z@two.test ({replies[second['queue_id'], 'two.test']})", "",
                           f"-- {total_kib} KiB in 2 messages."]

        stats = _queue(relay, "stats").splitlines()
        size = fmt_size(first["size"] + second["size"])
        assert stats[:3] == [
            f"Messages:       2 ({size})",
            "Recipients:     3 still to deliver",
            "Delivery jobs:  3 (0 due now, 3 deferred, 0 in flight)",
        ]
        assert re.fullmatch(
            rf"Oldest message: {AGE} old \(arrived \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\)", stats[3]
        ), stats
        assert stats[4:] == [
            "",
            "Top domains  Messages  Recipients",
            "two.test            2           2",
            "one.test            1           1",
        ]
        # --json is the machine's: the QueueStats fields, unchanged.
        as_json = json.loads(_queue(relay, "stats", "--json"))
        assert sorted(as_json) == sorted([
            "messages", "recipients", "jobs", "jobs_due", "jobs_deferred", "jobs_in_flight",
            "bytes", "oldest_arrival", "top_domains", "now"])
        assert (as_json["messages"], as_json["recipients"]) == (2, 3)

        assert _queue(relay, "list", "--domain", "nowhere.test") == (
            "No mail for nowhere.test in the queue\n")
        for entry in entries:
            _queue(relay, "delete", entry["queue_id"])
        assert _queue(relay, "list") == "Mail queue is empty\n"
    finally:
        assert relay.stop() == 0


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RELAY, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_queue_finds_a_relative_spool_from_another_directory(tmp_path: Path) -> None:
    """spool.path = "spool" in /x/conf/relay.toml is /x/conf/spool, whatever the current
    directory of `relay queue --config /x/conf/relay.toml`."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "elsewhere").mkdir()
    config = tmp_path / "conf" / "relay.toml"
    config.write_text('[spool]\npath = "spool"\nmap_size = "64MiB"\n[log]\nevents = ""\n')
    Spool(str(tmp_path / "conf" / "spool"), 64 * 1024 * 1024).close()

    stats = _cli(tmp_path / "elsewhere", "queue", "stats", "--config", str(config))
    assert (stats.returncode, stats.stderr) == (0, "")
    assert stats.stdout == (
        "Messages:       0 (0 B)\n"
        "Recipients:     0 still to deliver\n"
        "Delivery jobs:  0 (0 due now, 0 deferred, 0 in flight)\n"
        "Oldest message: -\n"
    )
    listed = _cli(tmp_path / "elsewhere", "queue", "list", "--config", str(config))
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "Mail queue is empty\n", "")
    assert not (tmp_path / "elsewhere" / "spool").exists()


def test_retry_of_an_unknown_queue_id_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'[spool]\npath = "{tmp_path / "spool"}"\nmap_size = "64MiB"\n')
    Spool(str(tmp_path / "spool"), 64 * 1024 * 1024).close()
    for qid in ("1M8STHSKW0H9GZ0DF2", "n\u00e4"):
        for action in ("retry", "show", "delete"):
            result = _cli(tmp_path, "queue", action, qid, "--config", str(config))
            assert (result.returncode, result.stdout, result.stderr) == (
                65, "", f"relay: {qid}: no such message in the queue\n"), action
