"""Run the real relay (``relay serve``) as a subprocess for integration tests.

The relay gets its own session (process group), a config in a temp dir, a free loopback
port and a spool under the temp dir. ``ready()`` polls the port until it answers 220
(with a deadline), so tests never sleep to synchronise.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.peers import free_port

RELAY = [sys.executable, "-m", "relay.cli"]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


#: Unless a test routes mail itself, everything goes to a closed loopback port, so the
#: relay never looks anything up in DNS or sends anywhere but loopback; mail stays queued.
NOWHERE = """
[outbound]
smart_host = "127.0.0.1:9"
"""


#: Unless a test scrapes /metrics, no admin listener (its default port is one per host).
NO_ADMIN = """
[admin]
listen = []
"""


def relay_config(
    tmp: Path, port: int, *, workers: int = 2, inbound: str = "", extra: str = ""
) -> str:
    """A complete config for a test relay: ``inbound`` lines go into the [inbound] table,
    ``extra`` TOML (other tables) is appended."""
    if "[outbound]" not in extra:
        extra = NOWHERE + extra
    if "[admin]" not in extra:  # no shared 127.0.0.1:8026 between test relays
        extra = NO_ADMIN + extra
    return f"""
[server]
hostname = "relay.test"
workers = {workers}
shutdown_timeout = 10.0
restart_backoff_min = 0.1

[inbound]
listen = ["127.0.0.1:{port}"]
{inbound}

[spool]
path = "{tmp / 'spool'}"
map_size = "1GiB"

[log]
level = "info"
events = "{tmp / 'events.jsonl'}"

{extra}
"""


@dataclass
class RelayProcess:
    tmp: Path
    port: int
    config_path: Path
    proc: subprocess.Popen[bytes] | None = None
    #: Extra environment variables for the relay process.
    env: dict[str, str] = field(default_factory=dict)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.tmp / "relay.log"

    def start(self) -> RelayProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the child)
        self.proc = subprocess.Popen(
            [*RELAY, "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=self.tmp, env={**os.environ, **self.env},
        )
        log.close()
        self.ready()
        return self

    def ready(self, timeout: float = 20.0) -> None:
        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.settimeout(2)
                    return s.recv(512).startswith(b"220 ")
            except OSError:
                return False

        wait_for(answers, timeout, f"relay on port {self.port}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signo: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signo)

    def kill_all(self) -> None:
        """SIGKILL the supervisor and every worker at once (power-loss style)."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise

    def workers(self) -> list[int]:
        """PIDs of the worker processes (children of the supervisor)."""
        assert self.proc is not None
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
            capture_output=True, text=True, check=False,
        ).stdout
        return [int(p) for p in out.split()]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*RELAY, *args], capture_output=True, text=True, timeout=60, cwd=self.tmp,
        )


def make_relay(
    tmp: Path, *, workers: int = 2, inbound: str = "", extra: str = ""
) -> RelayProcess:
    port = free_port()
    config_path = tmp / "relay.toml"
    config_path.write_text(
        relay_config(tmp, port, workers=workers, inbound=inbound, extra=extra)
    )
    return RelayProcess(tmp=tmp, port=port, config_path=config_path)


def recv_reply(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Read until the buffer ends with a complete final reply line ("NNN ...\\r\\n")."""
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
        last = data.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]
        if data.endswith(b"\r\n") and len(last) >= 4 and last[3:4] == b" ":
            return data
