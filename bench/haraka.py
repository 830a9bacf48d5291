"""Haraka (Node.js, npm package ``Haraka``) as a bench peer: the ``haraka`` peer.

Installed by the project itself: ``bench/haraka/package.json`` pins ``Haraka`` 3.3.4 and
``haraka-plugin-relay`` 1.0.2, and ``scripts/install-haraka`` runs ``npm ci`` there from the
committed ``package-lock.json`` (``make bench``, ``make setup-bench`` and ``make test`` call
it; a no-op while the lock file is unchanged).

``HarakaPeer`` writes a Haraka home in a temp dir (Haraka's shipped ``config/`` copied as
``haraka -i DIR`` would, then the bench's own files over it) and starts
``node bench/haraka/node_modules/Haraka/bin/haraka -c DIR`` in the foreground:

* ``config/smtp.ini``: listen on 127.0.0.1:PORT, ``nodes=cpus`` (Node's cluster: one
  worker process per core, each accepting and delivering its own mail), no daemon (the
  pid file setting only applies to a daemon: the master is the bench's child).
* ``config/plugins``: ``relay`` (``haraka-plugin-relay``: ``acl`` with
  ``relay_acl_allow`` = 127.0.0.0/8, so every recipient domain is accepted from loopback
  and queued to Haraka's outbound disk queue ``DIR/queue``, the peer's ``spool_dir``)
  and ``bench_sink`` (``bench/haraka/bench_sink.js``, copied to ``DIR/plugins/``). No
  SPF, DNSBL, rDNS or other plugin that looks anything up.
* ``bench_sink`` (settings in ``config/bench_sink.json``): ``get_mx`` names the sink for
  every domain, ``setup.routes[domain]`` ("ip:port") when present, else
  ``setup.sink_host:setup.sink_port``, so outbound never asks DNS; ``lookup_rdns`` names
  the client ``localhost`` (Haraka core would ``dns.reverse`` every connection,
  ``connection.js:766``); ``deferred`` sets the retry delay; ``send_email`` holds the
  per-domain throttle (below). An strace of a run shows no connect() but to the sink.
* ``config/outbound.ini``: ``enable_tls=false`` (plain SMTP to the sink),
  ``concurrency_max`` = ceil(``setup.max_connections`` / workers) (the cap is per
  worker), ``temp_fail_intervals=5s*10000`` (a deferral never bounces within a run; the
  actual delay comes from ``bench_sink``: ``setup.retry_interval``).
* ``config/log.ini``: level ``notice`` (Haraka's per-transaction lines: sender,
  recipients, queued, disconnect; about as much as Postfix's maillog), to stdout, which
  goes to ``DIR/haraka.log``.

Ready when every worker has logged ``worker N listening`` (the master's notice lines) and
the port answers 220; stopped with SIGTERM to the master (its cluster workers exit when
their IPC channel closes), SIGKILL to the process group after 10 s. ``root_pids()`` is
the master: its workers are its children, measured as its tree.

Durability (checked in the 3.3.4 source and with strace): Haraka fsyncs every queue file
before it answers 250, but not the directory. Each delivery (one file per recipient
domain of the message) is written through haraka-utils' ``FsyncWriteStream``
(``Haraka/outbound/index.js:285``, ``process_delivery``), whose ``_destroy`` calls
``fs.fsync(fd)`` before the fd is closed (``haraka-utils/lib/fsync_writestream.js:16``,
haraka-utils 2.2.1); the temp file is then renamed into place (``index.js:292``) and the
250 goes out once every file of the message is renamed. Neither that rename nor a
deferral's (``hmail.js:1374``) is followed by an fsync of the queue directory, so a
power cut can lose a queued file's name although its data is on disk; a message to two
domains costs two fsyncs.

What the peer cannot mirror from ``PeerSetup``:

* ``retry_interval``: whole seconds, at least 1 (``DENYSOFT, seconds`` goes through
  ``parseInt``, ``hmail.js:1364``), and Haraka's retry timer queue fires once a second
  (``TimerQueue(1000)``, ``outbound/queue.js:105``): a deferred delivery is retried 1-2 s
  after the failure at the default 1 s.
* ``max_connections``: Haraka caps concurrent *deliveries* per worker
  (``concurrency_max``), so the total is rounded up to a multiple of the workers; it
  has no connection reuse (a new connection per delivery), and a delivery's slot is
  freed before its QUIT is sent (``hmail.js:653``, ``669``), so a few closing
  connections can exceed the cap for a moment.
* ``domain_throttle`` (applied to the domains in ``routes``, as the relay does): Haraka
  core has no per-destination limits. ``bench_sink`` enforces them the way
  ``haraka-plugin-limit``'s ``[outbound]``/``[rate_outbound]`` do (``send_email`` answers
  DELAY while a domain is at its limit), but in each worker's memory instead of Redis,
  so each worker gets a share: ``max_connections`` split over the workers, at least 1
  each (a limit below the number of workers cannot be held), ``max_message_rate``
  divided evenly, as one delivery per ``workers / rate`` seconds (a worker holding all of
  a domain's mail sends it at its share only). A delayed delivery waits for the 1 s
  timer, and a freed connection slot is reused 250 ms later (the QUIT in flight), so a
  domain at its connection limit is slower than on the relay or Postfix.
* ``workers`` (the relay's worker count) is not used: ``nodes=cpus`` as the issue asks.
* ``dkim``: Haraka does not sign here (its dkim plugin is not loaded), like ``postfix``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from bench.metrics import children, process_alive
from bench.peers import PeerError, PeerSetup, free_port, wait_for_220

__all__ = ["HARAKA_BIN", "HARAKA_HOME", "HarakaPeer"]

#: The npm project the install script populates (package.json, package-lock.json).
HARAKA_HOME = Path(__file__).with_name("haraka")
#: Haraka's own launcher inside it.
HARAKA_BIN = HARAKA_HOME / "node_modules" / "Haraka" / "bin" / "haraka"
#: Haraka's shipped defaults (connection.ini, outbound.bounce_message, ...), copied under
#: the instance's own files as ``haraka -i`` would.
HARAKA_DEFAULT_CONFIG = HARAKA_HOME / "node_modules" / "Haraka" / "config"
#: The bench's get_mx / retry / throttle plugin (copied into the instance's plugins/).
PLUGIN_SRC = HARAKA_HOME / "bench_sink.js"


class HarakaPeer:
    """A private Haraka instance relaying everything to the sink (module docstring)."""

    name = "haraka"
    #: Haraka has no HTTP injection API (its HTTP listener is off).
    http_port: int | None = None

    def __init__(self, setup: PeerSetup, node: str | None = None) -> None:
        self.setup = setup
        self.node = node or shutil.which("node") or "/usr/bin/node"
        self.port = free_port()
        self.workers = os.cpu_count() or 1  # what nodes=cpus forks (Node's os.cpus())
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-haraka-"))
        self.conf = self.tmp / "config"
        self.plugins_dir = self.tmp / "plugins"
        self.queue = self.tmp / "queue"
        self.spool_dir: Path | None = self.queue
        self.log_path = self.tmp / "haraka.log"
        self.pid_file = self.tmp / "haraka.pid"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = None
        #: keep the temp dir (config, haraka.log, queue) after stopping, for a post-mortem
        self.keep = False
        if os.environ.get("BENCH_KEEP_TMP"):
            print(f"haraka peer files kept in {self.tmp}", file=sys.stderr)

    def plugin_settings(self) -> dict[str, object]:
        """``config/bench_sink.json``: the sink, the routes, retry delay and throttle."""
        s = self.setup
        throttle: dict[str, object] = {}
        if s.domain_throttle and s.routes:
            throttle["domains"] = sorted(s.routes)
            if s.domain_throttle.get("max_connections"):
                throttle["max_connections"] = int(s.domain_throttle["max_connections"])  # type: ignore[call-overload]
            rate = s.domain_throttle.get("max_message_rate")
            if rate:
                from relay.config import parse_rate

                throttle["rate_per_s"] = parse_rate(str(rate))
        return {"sink": f"{s.sink_host}:{s.sink_port}", "routes": dict(s.routes),
                "retry_s": max(1, math.ceil(s.retry_interval - 1e-9)), "throttle": throttle}

    def config_files(self) -> dict[str, str]:
        """Path (relative to the temp dir) -> text of every config file written."""
        s = self.setup
        per_worker = max(1, math.ceil(s.max_connections / self.workers))
        return {
            "config/smtp.ini": "\n".join([
                "[main]",
                f"listen=127.0.0.1:{self.port}",
                "nodes=cpus",
                "daemonize=false",
                # only used when daemonized; the bench knows the master from Popen
                f"daemon_pid_file={self.pid_file}",
                f"daemon_log_file={self.log_path}",
                "force_shutdown_timeout=5",
                "inactivity_timeout=60",
            ]) + "\n",
            "config/me": "haraka.bench.localhost\n",
            "config/plugins": "relay\nbench_sink\n",
            "config/relay.ini": "[relay]\nacl=true\nforce_routing=false\n"
                                "dest_domains=false\nall=false\n",
            "config/relay_acl_allow": "127.0.0.0/8\n",
            "config/outbound.ini": "\n".join([
                "[main]",
                "enable_tls=false",
                f"concurrency_max={per_worker}",
                "temp_fail_intervals=5s*10000",
                "connect_timeout=10",
                "inet_prefer=v4",
            ]) + "\n",
            "config/log.ini": "[main]\nlevel=notice\ntimestamps=true\nformat=default\n",
            "config/bench_sink.json": json.dumps(self.plugin_settings(), indent=1) + "\n",
        }

    def _listening(self) -> set[str]:
        """Worker ids the master has logged as listening (``worker N listening on``)."""
        self._log.flush()  # type: ignore[union-attr]
        text = self.log_path.read_text(errors="replace")
        return set(re.findall(r"\[server\] worker (\d+) listening on", text))

    def root_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    async def __aenter__(self) -> HarakaPeer:
        missing = None
        if not HARAKA_BIN.exists():
            missing = (f"Haraka is not installed ({HARAKA_BIN} missing): run make bench or "
                       "scripts/install-haraka")
        elif not Path(self.node).exists():
            missing = "node is not installed (Haraka needs Node.js >= 20)"
        if missing:
            await self.__aexit__()
            raise PeerError(missing)
        self.queue.mkdir()
        self.plugins_dir.mkdir()
        shutil.copytree(HARAKA_DEFAULT_CONFIG, self.conf)
        for rel, text in self.config_files().items():
            (self.tmp / rel).write_text(text)
        shutil.copyfile(PLUGIN_SRC, self.plugins_dir / "bench_sink.js")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in __aexit__
        self.proc = subprocess.Popen(
            [self.node, str(HARAKA_BIN), "-c", str(self.tmp)],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            cwd=self.tmp, start_new_session=True)
        deadline = time.monotonic() + 30
        try:
            await wait_for_220("127.0.0.1", self.port, deadline,
                               alive=lambda: self.proc is not None and self.proc.poll() is None)
            # the first worker answers; the load starts once every worker listens
            while len(self._listening()) < self.workers:
                if time.monotonic() > deadline:
                    raise PeerError(f"{len(self._listening())} of {self.workers} workers "
                                    "listening after 30 s")
                await trio.sleep(0.05)
        except PeerError as e:
            self._log.flush()
            tail = self.log_path.read_text(errors="replace")[-1500:]
            await self.__aexit__()
            raise PeerError(f"haraka: {e}; log tail:\n{tail}") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is not None:
            workers = children(proc.pid) if proc.poll() is None else []
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

            def running() -> bool:
                return proc.poll() is None or any(process_alive(p) for p in workers)

            with trio.move_on_after(10):
                while running():
                    await trio.sleep(0.05)
            if running():
                for pid in [proc.pid, *workers]:  # the session's group, then stragglers
                    with contextlib.suppress(ProcessLookupError):
                        if pid == proc.pid:
                            os.killpg(pid, signal.SIGKILL)
                        elif process_alive(pid):
                            os.kill(pid, signal.SIGKILL)
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if not (os.environ.get("BENCH_KEEP_TMP") or self.keep):
            shutil.rmtree(self.tmp, ignore_errors=True)
