"""``server.user``: a real ``relay serve`` started as root on a port below 1024.

The supervisor stays root and binds each worker's SO_REUSEPORT socket just before the
fork; the workers give root up first thing. Checked from the outside: /proc/<pid>/status
(uids, gids, groups, capabilities), the kernel's socket table (/proc/net/tcp and each
process's descriptors: who listens, who holds which connection), file owners in the
spool and of the logs, mail accepted and delivered to a sink, and a worker killed with
SIGKILL coming back bound and unprivileged. The files live in a directory of their own
under /tmp (pytest's tmp_path is under a 0700 directory the user could not enter).

conf/systemd/relay.service: ``systemd-analyze verify`` accepts it (pointed at this
checkout), its ExecStart is a command line whose config ``relay check-config`` accepts,
its stop timeout covers the drain, and the relay runs under exactly its hardening
(``setpriv`` with the unit's CapabilityBoundingSet and NoNewPrivileges, as systemd
would start it) with the user drop.

Runs as root (as the suite does here and in CI); the user is Debian's ``nobody``/
``nogroup``, present on every Debian and Ubuntu system.
"""

from __future__ import annotations

import configparser
import os
import pwd
import random
import re
import shlex
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.config import load_config
from relay.supervisor import KILL_MARGIN
from tests.integration.relayproc import RELAY, RelayProcess, relay_config, wait_for
from tests.integration.smtpsink import RecordingSink

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")

USER = "nobody"
NOBODY = pwd.getpwnam(USER)


@pytest.fixture
def home() -> Iterator[Path]:
    """A directory every user may enter, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="relay-privileges-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def privileged_port() -> int:
    """A free TCP port below 1024 on 127.0.0.1."""
    for port in random.sample(range(600, 1024), 424):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 1024")


def status(pid: int) -> dict[str, list[str]]:
    """/proc/<pid>/status as {field: its values}."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return fields


def tcp_sockets(port: int) -> dict[int, str]:
    """Socket inode -> state ("0A" listening, "01" established) of every IPv4 TCP socket
    whose local port is ``port``."""
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        if int(parts[1].rsplit(":", 1)[1], 16) == port:
            found[int(parts[9])] = parts[3]
    return found


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def held(pid: int, port: int, state: str) -> int:
    """How many sockets on ``port`` in ``state`` process ``pid`` holds."""
    sockets = tcp_sockets(port)
    return sum(1 for inode in socket_inodes(pid) if sockets.get(inode) == state)


def assert_unprivileged(pid: int) -> None:
    st = status(pid)
    assert st["Uid"] == [str(NOBODY.pw_uid)] * 4, st["Uid"]  # real, effective, saved, fs
    assert st["Gid"] == [str(NOBODY.pw_gid)] * 4, st["Gid"]
    assert set(st["Groups"]) <= {str(g) for g in os.getgrouplist(USER, NOBODY.pw_gid)}
    assert "0" not in st["Groups"]
    assert int(st["CapEff"][0], 16) == 0 and int(st["CapPrm"][0], 16) == 0


def start_relay(home: Path, port: int, sink: RecordingSink, *, user: str = USER,
                workers: int = 2) -> RelayProcess:
    text = relay_config(home, port, workers=workers, extra=f"""
[outbound]
smart_host = "127.0.0.1:{sink.port}"
[outbound.default]
tls = "off"
retry_interval = 1.0
""")
    text = text.replace("[server]\n", f'[server]\nuser = "{user}"\n', 1)
    text = text.replace("[log]\n", f'[log]\nmail_log = "{home / "log" / "mail.log"}"\n', 1)
    config = home / "relay.toml"
    config.write_text(text)
    return RelayProcess(tmp=home, port=port, config_path=config)


def send(port: int, rcpt: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("a@sender.test")
        client.rcpt(rcpt)
        code, msg = client.data(b"Subject: privileges\r\n\r\nbody\r\n")
        assert code == 250, msg


def delivered(sink: RecordingSink, rcpt: str) -> bool:
    return sink.find(lambda s, rcpts, raw: any(rcpt.encode() in r for r in rcpts)) is not None


def serve_fails(relay: RelayProcess, sink: RecordingSink) -> subprocess.CompletedProcess[str]:
    """``relay serve`` that must refuse to start (exit 78, no traceback)."""
    try:
        result = subprocess.run([*RELAY, "serve", "--config", str(relay.config_path)],
                                capture_output=True, text=True, timeout=60, cwd=relay.tmp)
    finally:
        sink.close()
    assert result.returncode == 78, result.stderr
    assert "Traceback" not in result.stderr
    return result


def test_workers_run_as_the_user_and_the_supervisor_keeps_port_25(home: Path) -> None:
    sink = RecordingSink()
    port = privileged_port()
    relay = start_relay(home, port, sink).start()
    try:
        assert status(relay.proc.pid)["Uid"] == ["0"] * 4  # type: ignore[union-attr]
        workers = wait_for(lambda: len(relay.workers()) == 2 and relay.workers(), 10,
                           "two workers")
        for pid in workers:
            assert_unprivileged(pid)
            assert held(pid, port, "0A") == 1  # its own SO_REUSEPORT socket
        assert held(relay.proc.pid, port, "0A") == 0  # type: ignore[union-attr]

        send(port, "first@dest.test")
        wait_for(lambda: delivered(sink, "first@dest.test"), 20, "the first delivery")
        # The files the workers write are the user's.
        for path in [home / "spool", home / "spool" / "data.mdb", home / "spool" / "metrics",
                     home / "events.jsonl", home / "log" / "mail.log"]:
            assert path.stat().st_uid == NOBODY.pw_uid, path
        assert "first@dest.test" in (home / "log" / "mail.log").read_text()

        # The kernel spreads connections over both workers' sockets (SO_REUSEPORT).
        clients = [socket.create_connection(("127.0.0.1", port), timeout=5)
                   for _ in range(40)]
        try:
            for c in clients:
                assert c.recv(512).startswith(b"220 ")
            shares = [held(pid, port, "01") for pid in workers]
            assert sum(shares) == 40 and min(shares) > 0, shares
        finally:
            for c in clients:
                c.close()

        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        new = wait_for(lambda: [p for p in relay.workers() if p not in workers]
                       if len(relay.workers()) == 2 else None, 15, "a replacement worker")
        (replacement,) = new
        wait_for(lambda: held(replacement, port, "0A") == 1, 10, "the replacement's listener")
        assert_unprivileged(replacement)
        assert held(relay.proc.pid, port, "0A") == 0  # type: ignore[union-attr]
        for i in range(4):  # at least some land on the replacement; all must be delivered
            send(port, f"after{i}@dest.test")
        wait_for(lambda: all(delivered(sink, f"after{i}@dest.test") for i in range(4)), 20,
                 "deliveries after the restart")
    finally:
        code = relay.stop()
        sink.close()
    assert code == 0, relay.log()
    assert "Traceback" not in relay.log()


def test_a_spool_the_user_cannot_reach_names_the_path_and_the_user(home: Path) -> None:
    sink = RecordingSink()
    private = home / "private"
    private.mkdir(mode=0o700)
    result = serve_fails(start_relay(private, privileged_port(), sink), sink)
    assert f"spool.path: cannot create {private / 'spool'}: Permission denied" in result.stderr
    assert f'(as server.user "{USER}" (uid {NOBODY.pw_uid}' in result.stderr


def test_a_spool_file_of_another_user_is_refused_naming_it(home: Path) -> None:
    sink = RecordingSink()
    relay = start_relay(home, privileged_port(), sink)
    stray = home / "spool" / "data.mdb"
    stray.parent.mkdir()
    stray.touch()
    os.chown(stray, 12345, 12345)  # root-owned entries are given to the user; not this
    result = serve_fails(relay, sink)
    assert (f"spool.path: {stray} belongs to uid 12345, not to server.user \"{USER}\""
            in result.stderr)
    assert stray.stat().st_uid == 12345


def test_a_port_taken_while_a_worker_is_down_is_retried(home: Path) -> None:
    """The supervisor binds a restarted worker's socket: when it cannot (someone took
    the port meanwhile), it says so and tries again later instead of dying."""
    sink = RecordingSink()
    port = privileged_port()
    relay = start_relay(home, port, sink, workers=1)
    relay.config_path.write_text(relay.config_path.read_text().replace(
        "restart_backoff_min = 0.1", "restart_backoff_min = 1.0"))
    relay.start()
    try:
        (worker,) = wait_for(lambda: relay.workers(), 10, "the worker")
        os.kill(worker, signal.SIGKILL)
        with socket.socket() as squatter:  # no SO_REUSEPORT: the worker's bind must fail
            # Free once the killed worker's socket is gone (the backoff is 1 s).
            wait_for(lambda: _try_bind(squatter, port), 5, "the port free")
            squatter.listen(1)
            wait_for(lambda: "cannot listen: Address already in use" in relay.log(), 15,
                     "the supervisor's complaint")
        new = wait_for(lambda: [p for p in relay.workers() if p != worker], 20,
                       "the worker back")
        wait_for(lambda: held(new[0], port, "0A") == 1, 10, "its listener")
        assert_unprivileged(new[0])
        send(port, "back@dest.test")
    finally:
        code = relay.stop()
        sink.close()
    assert code == 0, relay.log()


def _try_bind(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True


def test_unknown_user_is_a_config_error_naming_the_key(home: Path) -> None:
    config = home / "relay.toml"
    config.write_text('[server]\nuser = "no-such-relay-user"\n')
    result = subprocess.run([*RELAY, "check-config", str(config)], capture_output=True,
                            text=True, timeout=60, cwd=home)
    assert result.returncode == 78
    assert result.stderr.strip().endswith(
        f'{config}: server.user: no such user "no-such-relay-user" on this machine '
        "(see getent passwd)")
    config.write_text('[server]\ngroup = "no-such-relay-group"\n')
    result = subprocess.run([*RELAY, "check-config", str(config)], capture_output=True,
                            text=True, timeout=60, cwd=home)
    assert result.returncode == 78
    assert "server.group: no such group" in result.stderr


def test_not_root_refuses_another_user_and_is_a_noop_for_itself(home: Path) -> None:
    sink = RecordingSink()
    os.chown(home, NOBODY.pw_uid, NOBODY.pw_gid)
    as_nobody = {"user": USER, "group": NOBODY.pw_gid, "extra_groups": []}
    try:
        relay = start_relay(home, privileged_port(), sink, user="root")
        result = subprocess.run([*RELAY, "serve", "--config", str(relay.config_path)],
                                capture_output=True, text=True, timeout=60, cwd=home,
                                **as_nobody)
        assert result.returncode == 78, result.stderr
        assert (f"server.user: the relay runs as uid {NOBODY.pw_uid} ({USER}), not as root, "
                'so it cannot switch to server.user "root"') in result.stderr

        # Already that user (systemd User=relay with AmbientCapabilities): nothing to do.
        from bench.peers import free_port

        relay = start_relay(home, free_port(), sink, workers=1)
        proc = subprocess.Popen([*RELAY, "serve", "--config", str(relay.config_path)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True, cwd=home, **as_nobody)
        relay.proc = proc
        try:
            relay.ready()
            assert_unprivileged(proc.pid)
            send(relay.port, "self@dest.test")
            wait_for(lambda: delivered(sink, "self@dest.test"), 20, "the delivery")
        finally:
            assert relay.stop() == 0
    finally:
        sink.close()


ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "conf" / "systemd" / "relay.service"
#: Where the unit expects the checkout and the config (README.md, Deploy).
INSTALLED, ETC_CONFIG = "/opt/relay", "/etc/relay/relay.toml"


def unit_service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None, strict=True,
                                       comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys keep case
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def deployed_config(home: Path) -> Path:
    """conf/examples/bulk-sender.toml as /etc/relay/relay.toml on a fresh machine: its
    absolute paths moved under ``home``."""
    text = (ROOT / "conf" / "examples" / "bulk-sender.toml").read_text()
    config = home / "relay.toml"
    config.write_text(re.sub(r'"(/[^"]*)"', lambda m: f'"{home}{m.group(1)}"', text))
    return config


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze (scripts/install-sysdeps installs systemd)")
def test_systemd_analyze_verifies_the_unit(home: Path) -> None:
    unit = home / "relay.service"
    unit.write_text(UNIT.read_text().replace(f"{INSTALLED}/.venv/bin/relay",
                                             str(Path(sys.executable).with_name("relay"))))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")


def test_the_unit_starts_a_command_check_config_accepts_and_waits_for_the_drain(
        home: Path) -> None:
    service = unit_service()
    argv = shlex.split(service["ExecStart"])
    assert argv == [f"{INSTALLED}/.venv/bin/relay", "serve", "--config", ETC_CONFIG]
    relay_bin = ROOT / Path(argv[0]).relative_to(INSTALLED)
    assert relay_bin.name == "relay" and Path(sys.executable).with_name("relay").exists()
    config = deployed_config(home)
    result = subprocess.run([*RELAY, "check-config", str(config)], capture_output=True,
                            text=True, timeout=60, cwd=home)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    shutdown = load_config(config).server.shutdown_timeout
    assert float(service["TimeoutStopSec"]) > shutdown + KILL_MARGIN
    assert service["KillSignal"] == "SIGTERM" and service["ExecReload"].endswith("-HUP $MAINPID")
    assert service["Type"] == "simple" and service["Restart"] == "on-failure"
    assert int(service["LimitNOFILE"]) >= 65536
    assert "78" in service["RestartPreventExitStatus"].split()
    # The alternative is there, commented out.
    text = UNIT.read_text()
    assert "#AmbientCapabilities=CAP_NET_BIND_SERVICE" in text and "#User=relay" in text


def test_the_relay_runs_under_the_units_hardening(home: Path) -> None:
    service = unit_service()
    assert service["NoNewPrivileges"] == "yes"
    caps = ",".join("+" + c.lower().removeprefix("cap_")
                    for c in service["CapabilityBoundingSet"].split())
    sink = RecordingSink()
    port = privileged_port()
    relay = start_relay(home, port, sink)
    relay.proc = subprocess.Popen(
        ["setpriv", "--nnp", f"--bounding-set=-all,{caps}", *RELAY, "serve", "--config",
         str(relay.config_path)],
        stdout=open(relay.log_path, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
        stdin=subprocess.DEVNULL, start_new_session=True, cwd=home)
    try:
        relay.ready()
        workers = wait_for(lambda: len(relay.workers()) == 2 and relay.workers(), 10,
                           "two workers")
        send(port, "hardened@dest.test")
        wait_for(lambda: delivered(sink, "hardened@dest.test"), 20, "the delivery")
        os.kill(workers[0], signal.SIGKILL)  # re-binding port 25 needs only those caps
        wait_for(lambda: len([p for p in relay.workers() if p not in workers]) == 1
                 and all(held(p, port, "0A") == 1 for p in relay.workers()), 15,
                 "a replacement worker listening")
        wait_for(lambda: relay.log().count(" ready (pid ") == 3, 15, "the replacement ready")
        for pid in relay.workers():
            assert_unprivileged(pid)
        relay.signal(signal.SIGUSR1)  # reopening the logs works as the user
        relay.signal(signal.SIGHUP)
        wait_for(lambda: relay.log().count("configuration reloaded") == 2, 10, "the reload")
        assert "cannot reopen" not in relay.log()
    finally:
        code = relay.stop()
        sink.close()
    assert code == 0, relay.log()
    assert "Traceback" not in relay.log()
