"""Start-up errors are clear and final, and one relay per spool.

``relay check-config`` and ``relay serve`` find a missing certificate, an impossible spool
path or an unusable event log before any worker is forked: one line per problem naming
the file and the key, exit 78, no traceback, no restart loop. ``serve`` also refuses a
spool another relay holds (``<spool>/relay.lock``) and a listening address it cannot
bind; a worker that cannot start (exit 78) stops the relay instead of being restarted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench.peers import free_port
from tests.integration.relayproc import RELAY, RelayProcess, relay_config, wait_for

#: A refused start must come back at once; nothing here waits on a network or a worker.
QUICK = 10.0


def write_config(tmp: Path, text: str) -> Path:
    path = tmp / "relay.toml"
    path.write_text(text)
    return path


def run_cli(tmp: Path, *args: str, timeout: float = 30.0) -> tuple[int, str, str, float]:
    """Run ``relay ARGS`` in its own process group (so a relay that wrongly starts is
    killed whole at the timeout); (exit status, stdout, stderr, seconds taken)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [*RELAY, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL, cwd=tmp, start_new_session=True, text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=10)
        pytest.fail(f"relay {' '.join(args)} did not exit within {timeout}s:\n{err}")
    return proc.returncode, out, err, time.monotonic() - started


def _missing_cert(tmp: Path, config: Path) -> tuple[str, str]:
    inbound = f'tls_cert = "{tmp / "missing.pem"}"\ntls_key = "{tmp / "missing.key"}"'
    config.write_text(relay_config(tmp, free_port(), inbound=inbound))
    # Both files are missing: check-config names both keys; serve too (one line each).
    return (
        f"{config}: inbound.tls_cert: cannot read {tmp / 'missing.pem'}: "
        "No such file or directory",
        f"{config}: inbound.tls_key: cannot read {tmp / 'missing.key'}: "
        "No such file or directory",
    )


def _spool_under_a_file(tmp: Path, config: Path) -> tuple[str, ...]:
    (tmp / "blocker").write_text("a regular file\n")
    text = relay_config(tmp, free_port())
    spool = tmp / "blocker" / "spool"
    config.write_text(text.replace(f'path = "{tmp / "spool"}"', f'path = "{spool}"'))
    return (f"{config}: spool.path: cannot create {spool}: Not a directory",)


def _events_is_a_directory(tmp: Path, config: Path) -> tuple[str, ...]:
    (tmp / "events.jsonl").mkdir()
    config.write_text(relay_config(tmp, free_port()))
    return (f"{config}: log.events: {tmp / 'events.jsonl'} is a directory",)


CASES = {
    "missing-cert": _missing_cert,
    "spool-under-a-file": _spool_under_a_file,
    "events-is-a-directory": _events_is_a_directory,
}


@pytest.mark.parametrize("case", CASES)
def test_check_config_reports_each_problem_with_its_key(tmp_path: Path, case: str) -> None:
    config = tmp_path / "relay.toml"
    expected = CASES[case](tmp_path, config)
    code, out, err, _ = run_cli(tmp_path, "check-config", str(config))
    assert code == 78, (out, err)
    assert "Traceback" not in err
    assert err.splitlines() == [f"relay: {line}" for line in expected]
    assert "OK" not in out


@pytest.mark.parametrize("case", CASES)
def test_serve_refuses_at_once_without_forking(tmp_path: Path, case: str) -> None:
    config = tmp_path / "relay.toml"
    expected = CASES[case](tmp_path, config)
    code, _, err, took = run_cli(tmp_path, "serve", "--config", str(config))
    assert code == 78, err
    assert took < QUICK, f"took {took:.1f}s"
    assert "Traceback" not in err
    assert "worker" not in err  # nothing was forked, nothing logged
    assert err.splitlines() == [f"relay: {line}" for line in expected]


def test_check_config_leaves_no_directories_behind(tmp_path: Path) -> None:
    """A relative spool and event log (relative to the current directory, as at run
    time) are checked by creating their directories, which are removed again."""
    config = write_config(tmp_path, textwrap.dedent("""
        [spool]
        path = "var/spool"
        [log]
        events = "var/log/events.jsonl"
    """))
    code, out, err, _ = run_cli(tmp_path, "check-config", str(config))
    assert code == 0, err
    assert f"{config}: OK" in out
    assert not (tmp_path / "var").exists()


def test_an_existing_event_log_is_not_truncated(tmp_path: Path) -> None:
    config = write_config(tmp_path, relay_config(tmp_path, free_port()))
    (tmp_path / "events.jsonl").write_text('{"type":"Reception"}\n')
    code, _, err, _ = run_cli(tmp_path, "check-config", str(config))
    assert code == 0, err
    assert (tmp_path / "events.jsonl").read_text() == '{"type":"Reception"}\n'


def test_a_spool_under_proc_is_reported(tmp_path: Path) -> None:
    text = relay_config(tmp_path, free_port())
    config = write_config(tmp_path, text.replace(
        f'path = "{tmp_path / "spool"}"', 'path = "/proc/relay-test-spool"'))
    code, _, err, _ = run_cli(tmp_path, "check-config", str(config))
    assert code == 78, err
    assert err.startswith(f"relay: {config}: spool.path: cannot create /proc/relay-test-spool: ")
    assert "Traceback" not in err


def _gone(pid: int) -> bool:
    """Exited (a zombie has closed its descriptors too)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def test_one_relay_per_spool_and_a_stale_lock_file_blocks_nothing(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, relay_config(tmp_path, port, workers=2))
    lock = tmp_path / "spool" / "relay.lock"
    first = RelayProcess(tmp=tmp_path, port=port, config_path=config).start()
    second: RelayProcess | None = None
    try:
        assert first.proc is not None
        workers = wait_for(lambda: len(first.workers()) == 2 and first.workers(), 10,
                           "2 workers")
        code, _, err, took = run_cli(tmp_path, "serve", "--config", str(config))
        assert code != 0
        assert took < QUICK, f"took {took:.1f}s"
        assert err == (f"relay: spool {tmp_path / 'spool'} is in use by another relay "
                       f"(pid {first.proc.pid})\n")
        # The operator's queue commands do not take the lock.
        stats = first.cli("queue", "stats", "--config", str(config))
        assert stats.returncode == 0, stats.stderr
        first.ready()  # the first relay is untouched

        first.kill_all()
        wait_for(lambda: all(_gone(pid) for pid in workers), 10, "the workers to die")
        assert lock.read_text() == f"{first.proc.pid}\n"  # the stale file is still there
        second = RelayProcess(tmp=tmp_path, port=port, config_path=config).start()
        assert second.proc is not None
        assert lock.read_text() == f"{second.proc.pid}\n"
    finally:
        first.stop()
        if second is not None:
            assert second.stop() == 0


def test_the_lock_is_held_while_any_worker_lives(tmp_path: Path) -> None:
    """Only the supervisor is killed: its workers go on serving from the spool, so a new
    relay must not open it (it waits a moment in case they are dying, then refuses)."""
    port = free_port()
    config = write_config(tmp_path, relay_config(tmp_path, port, workers=1))
    first = RelayProcess(tmp=tmp_path, port=port, config_path=config).start()
    try:
        assert first.proc is not None
        wait_for(lambda: len(first.workers()) == 1, 10, "the worker")
        os.kill(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=10)
        code, _, err, took = run_cli(tmp_path, "serve", "--config", str(config))
        assert code != 0
        assert err == (f"relay: spool {tmp_path / 'spool'} is in use by another relay "
                       f"(pid {first.proc.pid}, which has exited; its workers still run)\n")
        assert took < QUICK + 5, f"took {took:.1f}s"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.settimeout(5)
            assert s.recv(512).startswith(b"220 ")  # the orphaned worker still serves
    finally:
        first.kill_all()  # the process group: the orphaned worker too


def test_a_port_taken_without_reuseport_is_reported(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        config = write_config(tmp_path, relay_config(tmp_path, port))
        code, _, err, took = run_cli(tmp_path, "serve", "--config", str(config))
    assert code == 78, err
    assert took < QUICK, f"took {took:.1f}s"
    assert err == (f"relay: {config}: inbound.listen[0]: cannot listen on "
                   f"127.0.0.1:{port}: Address already in use\n")
    assert "worker" not in err


#: A supervisor with stand-in workers: argv is the config file and the mode.
SUPERVISE = """
import logging, os, signal, sys
from pathlib import Path
from relay.config import ConfigError, load_config
from relay.supervisor import Supervisor

config_path, mode = sys.argv[1], sys.argv[2]
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(levelname)s %(name)s: %(message)s")

def worker(config, path, index, nworkers):
    if mode == "config-error":
        if index < 2:  # two of the three cannot start, for the same reason
            raise ConfigError(f"{path}: inbound.tls_cert/tls_key: cannot load: stand-in")
        signal.pause()  # until the supervisor stops it
    else:  # crash on the first start; once restarted, stop the relay
        marker = Path(config.spool.path) / "crashed-once"
        if not marker.exists():
            marker.touch()
            raise RuntimeError("stand-in crash")
        os.kill(os.getppid(), signal.SIGTERM)
        signal.pause()

sys.exit(Supervisor(load_config(config_path), config_path, worker).run())
"""


def _supervise(tmp: Path, mode: str, workers: int) -> tuple[int, str]:
    config = write_config(tmp, relay_config(tmp, free_port(), workers=workers))
    (tmp / "spool").mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-c", SUPERVISE, str(config), mode], stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, cwd=tmp,
        start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"the supervisor did not exit:\n{err}")
    return proc.returncode, err


def test_a_worker_that_cannot_start_stops_the_relay(tmp_path: Path) -> None:
    code, err = _supervise(tmp_path, "config-error", workers=3)
    assert code == 78, err
    assert err.count("cannot load: stand-in") == 1, err  # logged once
    assert "could not start" in err
    assert "restarting" not in err
    assert "Traceback" not in err


def test_a_worker_that_crashes_otherwise_is_still_restarted(tmp_path: Path) -> None:
    code, err = _supervise(tmp_path, "crash", workers=1)
    assert code == 0, err
    assert "worker 0 crashed" in err
    assert "exited with status 70; restarting in" in err
