"""Supervisor and workers: SO_REUSEPORT workers, restart after a crash, SIGHUP reload
(a bad file keeps the running config), SIGTERM drains and exits 0, and the CLI's errors."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
from pathlib import Path

from tests.integration.relayproc import RELAY, make_relay, wait_for


def send_one(port: int, rcpt: str = "b@dest.test") -> bytes:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("a@sender.test")
        client.rcpt(rcpt)
        code, msg = client.data(b"Subject: x\r\n\r\nbody\r\n")
        assert code == 250, msg
        return msg


def test_workers_share_the_port_and_a_dead_worker_is_restarted(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, workers=2).start()
    try:
        workers = wait_for(lambda: len(relay.workers()) == 2 and relay.workers(), 10, "2 workers")
        # Both workers listen on the same port (SO_REUSEPORT): two distinct listening
        # sockets, one per worker, show up in the kernel's table.
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: victim not in relay.workers() and len(relay.workers()) == 2, 15,
            "a replacement worker",
        )
        assert "killed by SIGKILL; restarting" in relay.log()
        send_one(relay.port)  # still serving
    finally:
        assert relay.stop() == 0


def test_sighup_with_invalid_config_keeps_running_config(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, workers=1).start()
    try:
        good = relay.config_path.read_text()
        relay.config_path.write_text(good.replace("[inbound]\n", "[inbound]\nmax_recipients = 5\n"))
        relay.signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in relay.log(), 10, "the reload error in the log")
        assert "inbound.max_recipients" in relay.log()
        send_one(relay.port)
        # A valid change is applied: with max_recipients lowered to 100, the 101st
        # recipient gets 452 (which proves the workers re-read the file).
        relay.config_path.write_text(
            good.replace("[inbound]\n", "[inbound]\nmax_recipients = 100\n")
        )
        relay.signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded" in relay.log(), 10, "the reload")
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            client.ehlo("client.test")
            client.mail("a@sender.test")
            codes = [client.rcpt(f"r{i}@dest.test")[0] for i in range(101)]
        assert codes[:100] == [250] * 100 and codes[100] == 452
    finally:
        assert relay.stop() == 0


def test_sigterm_lets_an_open_transaction_finish(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, workers=1).start()
    client = smtplib.SMTP("127.0.0.1", relay.port, timeout=10)
    try:
        client.ehlo("client.test")
        client.mail("a@sender.test")
        client.rcpt("b@dest.test")
        relay.signal(signal.SIGTERM)
        # Ctrl-C or systemd's control-group kill also reach the workers, repeatedly:
        # that must not cut the transaction short either.
        for pid in relay.workers():
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGTERM)
        # The listener closes, but the transaction in progress completes with a 250.
        wait_for(lambda: _refused(relay.port), 10, "the listener to close")
        code, msg = client.data(b"Subject: last\r\n\r\nbody\r\n")
        assert code == 250, msg
        code, msg = client.noop()
        assert code == 421, (code, msg)  # then the session is told the service is going
    finally:
        client.close()
    assert relay.proc is not None
    assert relay.proc.wait(timeout=20) == 0


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def test_check_config_cli_reports_key_and_file_without_traceback(tmp_path: Path) -> None:
    relay = make_relay(tmp_path)
    ok = relay.cli("check-config", str(relay.config_path))
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text('[outbound.default]\nmax_message_rate = "lots"\n')
    result = relay.cli("check-config", str(bad))
    assert result.returncode == 78
    assert f"{bad}: outbound.default.max_message_rate: invalid rate" in result.stderr
    assert "Traceback" not in result.stderr
    missing = relay.cli("serve", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 78 and "cannot read config" in missing.stderr
    assert "Traceback" not in missing.stderr
    nospool = relay.cli("queue", "stats", "--config", str(relay.config_path))
    assert nospool.returncode != 0 and "no spool at" in nospool.stderr



def test_workers_0_means_one_per_cpu_of_the_affinity_mask(tmp_path: Path) -> None:
    """``server.workers = 0`` follows the CPUs the relay may run on (taskset, cpusets),
    not the machine's CPU count."""
    config = tmp_path / "auto.toml"
    config.write_text(f'[server]\nworkers = 0\n[spool]\npath = "{tmp_path / "spool"}"\n')
    everywhere = subprocess.run([*RELAY, "check-config", str(config)], capture_output=True,
                                text=True, timeout=60)
    assert everywhere.returncode == 0, everywhere.stderr
    n = len(os.sched_getaffinity(0))
    assert f"({n} worker{'' if n == 1 else 's'}," in everywhere.stdout
    pinned = subprocess.run(["taskset", "-c", str(min(os.sched_getaffinity(0))), *RELAY,
                             "check-config", str(config)], capture_output=True, text=True,
                            timeout=60)
    assert pinned.returncode == 0, pinned.stderr
    assert "(1 worker," in pinned.stdout
