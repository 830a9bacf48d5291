"""Every command README.md shows is run, in document order, against a real relay.

The convention (so that README edits stay tested): the line before each fenced block
is an HTML comment ``<!-- test: KIND [ARG] -->`` saying how the block runs. A ```sh or
```python block without one, or with a kind not listed here, fails the test; blocks in
other languages (```text for what cannot run here: systemctl, DNS zone lines) are not
run unless they carry a marker.

- ``make``: each line is ``make run [CONFIG=FILE]`` or ``make test``. ``make run`` is run
  as what the Makefile's ``run`` recipe says (``relay serve --config $(CONFIG)``; checked
  against the Makefile): started, waited for on its SMTP port, stopped with SIGTERM,
  exit 0. ``make test`` is what CI runs (``.ci/run``; checked), so it is not run again
  inside the suite.
- ``daemon HOST:PORT``: each line is a long-running process (``make run`` as above):
  started in its own process group, waited for until HOST:PORT accepts connections,
  left running for the blocks after it, and stopped with SIGTERM at the end (exit 0).
- ``run``: the block is one bash script (``set -euo pipefail``): it must exit 0.
- ``eventually``: the same, retried until it exits 0 (for up to ``EVENTUALLY`` seconds:
  what it checks, a delivery, happens just after the command before it returned).
- ``python``: the block runs with the venv's Python; it must exit 0.
- ``file NAME``: the block's text is written to NAME in the scratch directory.
- ``config``: the block must be a valid config by itself (``decode_config``).

Everything runs in a scratch directory: a copy of conf/ (with the absolute paths of the
example configs moved under it, as on a fresh machine, and the unit's ``/opt/relay``
pointing at it), ``.venv`` a link to this checkout's. Ports 2525, 2526, 8025 and 8026,
wherever they appear in a block or a copied file, become free ports, so the test never
meets a relay someone runs with ``make run``. Mail never leaves loopback: ``make run``
on conf/relay.toml is stopped before anything is sent, and try.toml's smart host is the
local sink.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bench.peers import free_port
from relay.config import decode_config
from tests.integration.relayproc import wait_for

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PORTS = (2525, 2526, 8025, 8026)
EVENTUALLY = 20.0
KINDS = ("make", "daemon", "run", "eventually", "python", "file", "config")

_BLOCK_RE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_MARKER_RE = re.compile(r"<!--\s*test:\s*(\S+)\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    line: int
    lang: str
    text: str
    kind: str | None
    arg: str


def readme_blocks(text: str) -> list[Block]:
    blocks = []
    for m in _BLOCK_RE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER_RE.search(before)
        blocks.append(Block(text.count("\n", 0, m.start()) + 1, m.group(1), m.group(2),
                            marker.group(1) if marker else None,
                            marker.group(2) if marker else ""))
    return blocks


@dataclass
class Sandbox:
    dir: Path
    ports: dict[int, int]
    daemons: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def sub(self, text: str) -> str:
        return re.sub(r"\b(2525|2526|8025|8026)\b", lambda m: str(self.ports[int(m[1])]),
                      text)

    def env(self) -> dict[str, str]:
        path = f"{self.dir / '.venv' / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin"
        return {**os.environ, "PATH": path, "HOME": str(self.dir)}

    def bash(self, script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", "-c", "set -euo pipefail\n" + self.sub(script)],
                              cwd=self.dir, env=self.env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def start(self, argv: list[str], address: str, log_name: str) -> subprocess.Popen[bytes]:
        log = open(self.dir / log_name, "ab")  # noqa: SIM115 (kept open for the child)
        proc = subprocess.Popen(argv, cwd=self.dir, env=self.env(), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        host, port = self.sub(address).rsplit(":", 1)

        def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{argv} exited with {proc.returncode}:\n"
                                     + (self.dir / log_name).read_text(errors="replace"))
            with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 1):
                return True
            return False

        wait_for(answers, 30, f"{argv} on {host}:{port}")
        return proc

    def stop(self, proc: subprocess.Popen[bytes], what: str) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
                raise AssertionError(f"{what} did not stop on SIGTERM") from None
        return proc.returncode


def make_sandbox(tmp: Path) -> Sandbox:
    sandbox = Sandbox(tmp, {p: free_port() for p in PORTS})
    shutil.copytree(ROOT / "conf", tmp / "conf")
    (tmp / ".venv").symlink_to(ROOT / ".venv")
    fresh = tmp / "fresh"
    for path in (tmp / "conf").rglob("*"):
        if path.suffix not in (".toml", ".service", ".yml"):
            continue
        text = sandbox.sub(path.read_text())
        if path.parent.name == "examples":  # a fresh machine: /var/..., /etc/... under it
            text = re.sub(r'"(/[^"]*)"', lambda m: f'"{fresh}{m.group(1)}"', text)
        path.write_text(text.replace("/opt/relay", str(tmp)))
    return sandbox


def make_run_argv(line: str) -> list[str]:
    """``make run [CONFIG=FILE]`` as the Makefile's run recipe runs it."""
    makefile = (ROOT / "Makefile").read_text()
    assert "\nrun: setup\n\t$(BIN)/relay serve --config $(CONFIG)\n" in makefile
    default = re.search(r"^CONFIG \?= (\S+)$", makefile, re.MULTILINE)
    assert default is not None
    words = shlex.split(line)
    assert words[:2] == ["make", "run"], line
    config = default.group(1)
    for word in words[2:]:
        name, _, value = word.partition("=")
        assert name == "CONFIG" and value, f"unknown make argument {word!r}"
        config = value
    return [str(ROOT / ".venv" / "bin" / "relay"), "serve", "--config", config]


def command_lines(text: str) -> list[str]:
    return [line.split("  #", 1)[0].strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def run_make(sandbox: Sandbox, block: Block) -> None:
    for line in command_lines(block.text):
        if line == "make test":
            assert "make test" in (ROOT / ".ci" / "run").read_text()  # CI runs it
            continue
        proc = sandbox.start(make_run_argv(line), "127.0.0.1:2525", "make-run.log")
        assert sandbox.stop(proc, line) == 0, (sandbox.dir / "make-run.log").read_text()


def run_daemons(sandbox: Sandbox, block: Block) -> None:
    for line in command_lines(block.text):
        argv = (make_run_argv(line) if line.startswith("make ")
                else shlex.split(sandbox.sub(line)))
        name = f"daemon-{len(sandbox.daemons)}.log"
        sandbox.daemons.append((line, sandbox.start(argv, block.arg, name)))


def run_block(sandbox: Sandbox, block: Block) -> None:
    where = f"README.md line {block.line}"
    if block.kind == "make":
        run_make(sandbox, block)
    elif block.kind == "daemon":
        run_daemons(sandbox, block)
    elif block.kind == "run":
        result = sandbox.bash(block.text)
        assert result.returncode == 0, f"{where}:\n{result.stdout}\n{result.stderr}"
    elif block.kind == "eventually":
        deadline = time.monotonic() + EVENTUALLY
        while (result := sandbox.bash(block.text)).returncode != 0:
            assert time.monotonic() < deadline, f"{where}:\n{result.stdout}\n{result.stderr}"
            time.sleep(0.2)  # polling the relay's logs and queue, with a deadline
    elif block.kind == "python":
        result = subprocess.run([sys.executable, "-c", sandbox.sub(block.text)],
                                cwd=sandbox.dir, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{where}:\n{result.stderr}"
    elif block.kind == "file":
        (sandbox.dir / block.arg).write_text(sandbox.sub(block.text))
    elif block.kind == "config":
        decode_config(block.text, where)
    else:
        pytest.fail(f"{where}: unknown test kind {block.kind!r} (known: {', '.join(KINDS)})")


def test_every_sh_and_python_block_has_a_known_marker() -> None:
    blocks = readme_blocks(README.read_text())
    unmarked = [b.line for b in blocks if b.lang in ("sh", "python") and b.kind is None]
    assert unmarked == [], f"README.md blocks without a test marker at lines {unmarked}"
    unknown = [(b.line, b.kind) for b in blocks if b.kind and b.kind not in KINDS]
    assert unknown == []
    assert sum(1 for b in blocks if b.kind) >= 10  # the markers are being read


def test_every_command_in_the_readme_runs(tmp_path: Path) -> None:
    sandbox = make_sandbox(tmp_path)
    try:
        for block in readme_blocks(README.read_text()):
            if block.kind is not None:
                run_block(sandbox, block)
    finally:
        codes = [(line, sandbox.stop(proc, line)) for line, proc in reversed(sandbox.daemons)]
    assert all(code == 0 for _, code in codes), codes
    # (The blocks check what they show themselves: the "eventually" block that the
    # messages were delivered, the Observe block that the metrics counted them.)
    relay_logs = [p.read_text(errors="replace") for p in tmp_path.glob("daemon-*.log")]
    assert not any("Traceback" in text for text in relay_logs), relay_logs
