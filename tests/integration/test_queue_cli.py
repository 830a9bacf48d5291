"""`relay queue` beside a running relay: list/show with domain filters, retry, delete."""

from __future__ import annotations

import json
import smtplib
from pathlib import Path

from tests.integration.relayproc import RelayProcess, make_relay


def _queue(relay: RelayProcess, *args: str) -> str:
    result = relay.cli("queue", *args, "--config", str(relay.config_path))
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_queue_commands_against_a_live_relay(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, workers=1).start()  # mail is routed to a closed port
    try:
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo("client.test")
            client.sendmail("a@s.test", ["x@one.test", "y@two.test"], b"Subject: 1\r\n\r\n1\r\n")
            client.sendmail("a@s.test", ["z@two.test"], b"Subject: 2\r\n\r\n2\r\n")
        everything = json.loads(_queue(relay, "list", "--json"))
        assert len(everything) == 2
        only_one = json.loads(_queue(relay, "list", "--domain", "one.test", "--json"))
        assert len(only_one) == 1
        qid = only_one[0]["queue_id"]
        detail = json.loads(_queue(relay, "show", qid))
        text = json.dumps(detail)
        assert "x@one.test" in text and "y@two.test" in text and "z@two.test" not in text
        assert "scheduled for immediate retry" in _queue(relay, "retry", "--domain", "two.test")
        assert f"{qid}: deleted" in _queue(relay, "delete", qid)
        remaining = json.loads(_queue(relay, "list", "--json"))
        assert [e["queue_id"] for e in remaining] != [qid] and len(remaining) == 1
        missing = relay.cli("queue", "show", qid, "--config", str(relay.config_path))
        assert missing.returncode != 0 and "no such message" in missing.stderr
        assert "Traceback" not in missing.stderr
    finally:
        assert relay.stop() == 0
