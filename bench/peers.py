"""The servers under test ("peers"): the relay, a private Postfix instance, or the sink
itself (``direct``: the load generator talks straight to the sink, a calibration of the
bench's own ceiling).

Contract: a peer is an async context manager built from a ``PeerSetup`` (where the sink
listens, throttles to mirror, retry timing); inside it, ``peer.port`` accepts SMTP on
127.0.0.1, ``peer.root_pids()`` names the processes whose tree is measured for CPU and
RSS, and ``peer.spool_dir`` is the directory whose size is the queue's footprint.
``peer.http_port`` is the relay's HTTP injection listener on 127.0.0.1 (SparkPost's and
KumoMTA's APIs, API key ``BENCH_API_KEY`` for tenant ``bench``), None for peers without
an HTTP API (Postfix, ``direct``). Leaving the context stops the server and removes its
temporary files. Everything listens on and connects to loopback only.

DKIM: ``PeerSetup.dkim`` (a ``DkimKey``) makes the relay sign every message at intake
(a ``[[dkim.signers]]`` block with that key); ``postfix+opendkim`` is the Postfix peer
with Debian's ``opendkim`` milter beside it on a loopback TCP socket, signing with
``PeerSetup.dkim`` (or a fresh RSA-2048 key when the setup has none);
``postfix+opendkim-unix`` the same on a unix-domain socket (Debian's default
``Socket local:...``). Each peer writes the key into its own temp dir.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, TextIO

import trio

from bench.metrics import process_alive

__all__ = ["BENCH_API_KEY", "BENCH_TENANT", "PEERS", "DirectPeer", "DkimKey", "Peer",
           "PeerError", "PeerSetup", "PostfixPeer", "RelayPeer", "free_port", "make_peer",
           "wait_for_220"]

#: The relay peer's HTTP API key (configured as ``plain$<key>``: no scrypt cost per
#: connection) and the tenant it injects for.
BENCH_API_KEY = "bench-api-key"
BENCH_TENANT = "bench"


#: Every peer name ``make_peer`` knows.
PEERS = ("relay", "postfix", "postfix+opendkim", "postfix+opendkim-unix", "haraka", "direct")


class PeerError(Exception):
    """A peer could not be started (message says why and where its log is)."""


@dataclass(frozen=True)
class DkimKey:
    """A DKIM signing key every signing peer gets: ``d=domain``, ``s=selector``, the
    unencrypted PEM private key (traditional RSA form, which the relay and OpenDKIM both
    read) and its algorithm."""

    domain: str
    selector: str
    pem: bytes
    algorithm: str = "rsa-sha256"

    @classmethod
    def generate(cls, domain: str = "sender.test", selector: str = "bench",
                 bits: int = 2048) -> DkimKey:
        """A fresh RSA key of ``bits`` (about 0.1-1 s of CPU for 2048 bits)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
        return cls(domain=domain, selector=selector, pem=pem)

    def write(self, path: Path) -> Path:
        """Write the PEM to ``path`` with mode 0600 (both signers want a private file)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(self.pem)
        return path


@dataclass
class PeerSetup:
    """What every peer needs to know to relay to the sink the same way."""

    sink_host: str = "127.0.0.1"
    sink_port: int = 0
    #: Per-domain static routes: domain -> "ip:port" (fanout gives each domain its own
    #: sink address so both peers see one destination per domain).
    routes: dict[str, str] = field(default_factory=dict)
    #: Throttle applied to every routed domain (``max_connections``, ``max_message_rate``
    #: like "120/min"); empty = defaults.
    domain_throttle: dict[str, object] = field(default_factory=dict)
    #: Retry interval for deferred mail (seconds), short so ``defer`` drains in the run.
    retry_interval: float = 1.0
    #: Outbound connections to the smart host (relay max_connections, Postfix
    #: smtp_destination_concurrency_limit).
    max_connections: int = 20
    workers: int = 0
    #: Sign every message with this key (relay: ``[[dkim.signers]]``; the
    #: ``postfix+opendkim`` peer signs whatever this says, with its own key if None).
    dkim: DkimKey | None = None


class Peer(Protocol):
    name: str
    port: int
    #: HTTP injection port on 127.0.0.1, None when the server has no HTTP API.
    http_port: int | None
    spool_dir: Path | None

    def root_pids(self) -> list[int]: ...

    async def __aenter__(self) -> Peer: ...

    async def __aexit__(self, *exc: object) -> None: ...


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port on loopback (bind to 0, read, close)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


async def wait_for_220(host: str, port: int, deadline: float,
                       alive: object = None) -> None:
    """Poll-connect until the server greets with 220; ``PeerError`` at the deadline.
    ``alive`` is an optional callable returning False when the server process died."""
    last = "no answer"
    while time.monotonic() < deadline:
        if callable(alive) and not alive():
            raise PeerError("server process exited during start-up")
        try:
            with trio.fail_after(2):
                stream = await trio.open_tcp_stream(host, port)
                try:
                    data = b""
                    while b"\r\n" not in data:
                        chunk = await stream.receive_some(4096)
                        if not chunk:
                            break
                        data += chunk
                    if data.startswith(b"220"):
                        with trio.move_on_after(1):
                            await stream.send_all(b"QUIT\r\n")
                        return
                    last = data.decode("latin-1").strip() or "closed"
                finally:
                    await trio.aclose_forcefully(stream)
        except (OSError, trio.TooSlowError) as e:
            last = str(e)
        await trio.sleep(0.05)
    raise PeerError(f"{host}:{port} did not answer 220 in time ({last})")


class DirectPeer:
    """No server: the load goes straight to the sink (measures the bench itself)."""

    name = "direct"
    spool_dir: Path | None = None
    http_port: int | None = None

    def __init__(self, setup: PeerSetup) -> None:
        self.port = setup.sink_port

    def root_pids(self) -> list[int]:
        return []

    async def __aenter__(self) -> DirectPeer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


class RelayPeer:
    """The relay under test: ``relay serve --config <generated>`` as a subprocess."""

    name = "relay"

    def __init__(self, setup: PeerSetup, relay_bin: str | None = None) -> None:
        self.setup = setup
        self.port = free_port()
        #: HTTP injection listener (always on; API key ``BENCH_API_KEY``)
        self.http_port: int | None = free_port()
        self.api_key = BENCH_API_KEY
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-relay-"))
        self.spool_dir: Path | None = self.tmp / "spool"
        self.config_path = self.tmp / "relay.toml"
        self.log_path = self.tmp / "relay.log"
        #: where ``setup.dkim``'s key is written (when there is one)
        self.dkim_key_path = self.tmp / "dkim.pem"
        self.relay_bin = relay_bin or str(Path(sys.executable).with_name("relay"))
        self.proc: subprocess.Popen[bytes] | None = None
        #: keep the temp dir (config, log, spool) after stopping, for a post-mortem
        self.keep = False
        if os.environ.get("BENCH_KEEP_TMP"):
            print(f"relay peer files kept in {self.tmp}", file=sys.stderr)

    def config_text(self) -> str:
        """The generated relay config (schema: relay/config.py)."""
        s = self.setup
        lines = [
            "[server]",
            'hostname = "relay.bench.localhost"',
            f"workers = {s.workers}",
            "shutdown_timeout = 5.0",
            "[inbound]",
            f'listen = ["127.0.0.1:{self.port}"]',
            "max_sessions_per_client = 2000",
            "[spool]",
            f"path = {_toml_str(str(self.spool_dir))}",
            'map_size = "8GiB"',
            "[log]",
            'level = "warning"',
            f"events = {_toml_str(str(self.tmp / 'events.jsonl'))}",
            "[http]",
            f'listen = ["127.0.0.1:{self.http_port}"]',
            "[[http.api_keys]]",
            f"key = {_toml_str('plain$' + self.api_key)}",
            f"tenant = {_toml_str(BENCH_TENANT)}",
            'name = "bench"',
            "[admin]",  # no fixed 127.0.0.1:8026: a relay (make run) may be on it
            "listen = []",
            "[outbound]",
            f'smart_host = "{s.sink_host}:{s.sink_port}"',
            "[outbound.default]",
            f"max_connections = {s.max_connections}",
            f"retry_interval = {s.retry_interval}",
            f"max_retry_interval = {max(s.retry_interval, 2.0)}",
            'tls = "off"',
        ]
        for domain, hostport in s.routes.items():
            lines += ["[[outbound.routes]]", f"domain = {_toml_str(domain)}",
                      f"hosts = [{_toml_str(hostport)}]"]
        if s.dkim is not None:  # the relay's defaults otherwise (headers, relaxed/relaxed)
            lines += ["[[dkim.signers]]", f"domain = {_toml_str(s.dkim.domain)}",
                      f"selector = {_toml_str(s.dkim.selector)}",
                      f"key = {_toml_str(str(self.dkim_key_path))}",
                      f"algorithm = {_toml_str(s.dkim.algorithm)}"]
        if s.domain_throttle and s.routes:
            for domain in s.routes:
                lines.append(f"[outbound.domains.{_toml_str(domain)}]")
                for k, v in s.domain_throttle.items():
                    lines.append(f"{k} = {_toml_str(v) if isinstance(v, str) else v}")
        return "\n".join(lines) + "\n"

    def root_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None else []

    async def __aenter__(self) -> RelayPeer:
        if not Path(self.relay_bin).exists():
            raise PeerError(f"{self.relay_bin} not found (pip install -e . first)")
        self.spool_dir.mkdir(parents=True)  # type: ignore[union-attr]
        if self.setup.dkim is not None:
            self.setup.dkim.write(self.dkim_key_path)
        text = self.config_text()
        self.config_path.write_text(text)
        try:  # validate with the relay's own schema for a clear error
            from relay.config import ConfigError, decode_config

            decode_config(text, str(self.config_path))
        except ImportError:
            pass
        except ConfigError as e:
            raise PeerError(f"generated relay config rejected: {e}") from None
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed in __aexit__
        self._log = log
        self.proc = subprocess.Popen(
            [self.relay_bin, "serve", "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp, start_new_session=True)
        try:
            await wait_for_220("127.0.0.1", self.port, time.monotonic() + 30,
                               alive=lambda: self.proc is not None and self.proc.poll() is None)
        except PeerError as e:
            self._log.flush()
            tail = self.log_path.read_text(errors="replace")[-1500:]
            await self.__aexit__()
            raise PeerError(f"relay: {e}; log tail:\n{tail}") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with trio.move_on_after(15):
                while self.proc.poll() is None:
                    await trio.sleep(0.05)
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if hasattr(self, "_log"):
            self._log.close()
        if not (os.environ.get("BENCH_KEEP_TMP") or self.keep):
            shutil.rmtree(self.tmp, ignore_errors=True)


_MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixPeer:
    """A private Postfix instance: own config, queue and data directories in a temp dir,
    smtpd on a free loopback port, relaying everything to the sink. The system's
    /etc/postfix is never modified; the instance is started with ``postfix -c DIR``.

    ``milter="inet"`` (peer ``postfix+opendkim``) or ``"unix"``
    (``postfix+opendkim-unix``): Debian's ``opendkim`` runs beside it in the foreground
    as the bench's user, on a loopback TCP socket or a unix-domain socket in the temp
    dir, with its own config file there (``opendkim_conf``: signing only, ``setup.dkim``'s key, the
    relay's default fields and canonicalisation, no DNS), and Postfix passes every
    message through it (``smtpd_milters``/``non_smtpd_milters``,
    ``milter_default_action = tempfail``: a milter failure refuses with 4xx rather than
    sending unsigned). Its process is measured with Postfix's (``root_pids``)."""

    #: Postfix has no HTTP injection API.
    http_port: int | None = None

    def __init__(self, setup: PeerSetup, milter: Literal["inet", "unix"] | None = None) -> None:
        self.setup = setup
        self.milter = milter
        self.name = {None: "postfix", "inet": "postfix+opendkim",
                     "unix": "postfix+opendkim-unix"}[milter]
        self.dkim: DkimKey | None = (setup.dkim or DkimKey.generate()) if milter else None
        self.milter_port = free_port() if milter == "inet" else 0
        self.opendkim: subprocess.Popen[bytes] | None = None
        self._opendkim_log: TextIO | None = None
        self.port = free_port()
        # /var/tmp-like location owned by root; the queue must be reachable by postfix.
        self.tmp = Path(tempfile.mkdtemp(prefix="bench-postfix-"))
        os.chmod(self.tmp, 0o755)
        self.conf = self.tmp / "etc"
        self.queue = self.tmp / "queue"
        self.data = self.tmp / "data"
        self.spool_dir: Path | None = self.queue
        self.maillog = self.tmp / "maillog"
        self.opendkim_dir = self.tmp / "opendkim"
        self.opendkim_log = self.opendkim_dir / "opendkim.log"
        #: the unix-domain milter socket (``milter="unix"``), in a directory Postfix's
        #: smtpd and cleanup (user postfix) can reach
        self.milter_socket = self.tmp / "milter" / "opendkim.sock"
        self.master_pid: int | None = None
        #: keep the temp dir (config, maillog, queue) after stopping, for a post-mortem
        self.keep = False
        if os.environ.get("BENCH_KEEP_TMP"):
            print(f"postfix peer files kept in {self.tmp}", file=sys.stderr)

    def main_cf(self) -> str:
        s = self.setup
        rate_delay = ""
        conc = s.max_connections
        throttle = s.domain_throttle
        if s.routes and throttle:
            conc = int(throttle.get("max_connections", conc))  # type: ignore[arg-type]
            rate = throttle.get("max_message_rate")
            if rate:
                from relay.config import parse_rate

                # Postfix takes whole seconds only: round up (never faster than asked)
                rate_delay = f"{math.ceil(1.0 / parse_rate(str(rate)) - 1e-9)}s"
        lines = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "command_directory": "/usr/sbin",
            "daemon_directory": "/usr/lib/postfix/sbin",
            "shlib_directory": "/usr/lib/postfix",
            "meta_directory": "/etc/postfix",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "syslog_name": "postfix-bench",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.tmp),
            "myhostname": "postfix.bench.localhost",
            "mydomain": "bench.localhost",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 no local delivery in the bench",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "relayhost": f"[{s.sink_host}]:{s.sink_port}",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "smtp_destination_concurrency_limit": str(conc),
            "smtp_destination_rate_delay": rate_delay or "0s",
            "default_destination_concurrency_limit": str(conc),
            "smtpd_client_connection_count_limit": "0",
            "biff": "no",
            "message_size_limit": str(50 * 1024 * 1024),
            # retry timing for the defer scenario (Postfix minimum granularity is 1s)
            "queue_run_delay": f"{max(1, int(s.retry_interval))}s",
            "minimal_backoff_time": f"{max(1, int(s.retry_interval))}s",
            "maximal_backoff_time": f"{max(2, int(s.retry_interval) * 2)}s",
            "smtp_address_preference": "ipv4",
            "disable_dns_lookups": "yes",
            "smtp_host_lookup": "native",
        }
        if s.routes:
            lines["transport_maps"] = f"texthash:{self.conf / 'transport'}"
        if self.milter:
            milter = (f"inet:127.0.0.1:{self.milter_port}" if self.milter == "inet"
                      else f"unix:{self.milter_socket}")
            lines["smtpd_milters"] = milter
            lines["non_smtpd_milters"] = milter
            lines["milter_default_action"] = "tempfail"
        return "".join(f"{k} = {v}\n" for k, v in lines.items())

    def opendkim_conf(self) -> str:
        """OpenDKIM's config (opendkim.conf(5)): sign (``Mode s``) mail from loopback
        whose From: domain is the key's, relaxed/relaxed, the relay's default field list
        (``relay.config.DKIM_HEADERS``) signed and over-signed (OpenDKIM also lists the
        absent ones once, the relay only those present), t= like the relay, the milter
        socket of ``self.milter``, no DNS (signing needs none), no syslog (errors go to
        ``opendkim.log``)."""
        from relay.config import DKIM_HEADERS

        assert self.dkim is not None
        d = self.opendkim_dir
        headers = ",".join(DKIM_HEADERS)
        lines = {
            "Mode": "s",
            "Domain": self.dkim.domain,
            "Selector": self.dkim.selector,
            "KeyFile": str(d / "dkim.pem"),
            # the key is 0600 in a 0700 dir, but under /tmp (world-writable, sticky):
            # OpenDKIM's path check would refuse it; an operator's key lives in /etc
            "RequireSafeKeys": "no",
            "SignatureAlgorithm": self.dkim.algorithm,
            "Canonicalization": "relaxed/relaxed",
            "SignHeaders": headers,
            "OversignHeaders": headers,
            "InternalHosts": "127.0.0.0/8",
            "Socket": (f"inet:{self.milter_port}@127.0.0.1" if self.milter == "inet"
                       else f"local:{self.milter_socket}"),
            "PidFile": str(d / "opendkim.pid"),
            "TemporaryDirectory": str(d),
            "Background": "no",
            "AutoRestart": "no",
            "Syslog": "no",
            "SoftwareHeader": "no",
            # the unix socket must be writable by Postfix (user postfix)
            "UMask": "007" if self.milter == "inet" else "000",
        }
        return "".join(f"{k} {v}\n" for k, v in lines.items())

    def root_pids(self) -> list[int]:
        pids = [self.master_pid] if self.master_pid else []
        if self.opendkim is not None and self.opendkim.poll() is None:
            pids.append(self.opendkim.pid)
        return pids

    async def _start_opendkim(self) -> None:
        """Start opendkim in the foreground; return once its milter socket accepts a
        connection (``PeerError`` with its log when it exits or stays silent 30 s)."""
        exe = "/usr/sbin/opendkim"
        if not Path(exe).exists():
            raise PeerError("opendkim is not installed (make sysdeps: Debian's opendkim)")
        assert self.dkim is not None
        self.opendkim_dir.mkdir(mode=0o700)
        if self.milter == "unix":
            self.milter_socket.parent.mkdir()
            os.chmod(self.milter_socket.parent, 0o755)
        self.dkim.write(self.opendkim_dir / "dkim.pem")
        conf = self.opendkim_dir / "opendkim.conf"
        conf.write_text(self.opendkim_conf())
        self._opendkim_log = open(self.opendkim_log, "w")  # noqa: SIM115 - closed in __aexit__
        self.opendkim = subprocess.Popen([exe, "-f", "-x", str(conf)], cwd=self.opendkim_dir,
                                         stdout=self._opendkim_log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        last = "no answer"
        while time.monotonic() < deadline:
            if self.opendkim.poll() is not None:
                last = f"exited with status {self.opendkim.returncode}"
                break
            try:
                with trio.fail_after(2):
                    stream = await (
                        trio.open_tcp_stream("127.0.0.1", self.milter_port)
                        if self.milter == "inet" else trio.open_unix_socket(self.milter_socket))
                await trio.aclose_forcefully(stream)
                return
            except (OSError, trio.TooSlowError) as e:
                last = str(e)
            await trio.sleep(0.05)
        self._opendkim_log.flush()
        tail = self.opendkim_log.read_text(errors="replace")[-1500:]
        where = (f"127.0.0.1:{self.milter_port}" if self.milter == "inet"
                 else str(self.milter_socket))
        raise PeerError(f"opendkim on {where}: {last}; log:\n{tail}")

    def _stop_opendkim(self) -> None:
        """SIGTERM opendkim, SIGKILL after 10 s; close its log."""
        p = self.opendkim
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if self._opendkim_log is not None:
            self._opendkim_log.close()
            self._opendkim_log = None

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run(["/usr/sbin/postfix", "-c", str(self.conf), *args],
                           capture_output=True, text=True, timeout=60)
        if check and p.returncode != 0:
            log = self.maillog.read_text(errors="replace")[-1500:] if self.maillog.exists() else ""
            raise PeerError(f"postfix {' '.join(args)} failed: {p.stdout}{p.stderr}\n{log}")
        return p

    async def __aenter__(self) -> PostfixPeer:
        if not Path("/usr/sbin/postfix").exists():
            raise PeerError("postfix is not installed (make sysdeps)")
        self.conf.mkdir()
        self.data.mkdir()
        self.queue.mkdir()
        shutil.chown(self.data, "postfix", "postfix")
        (self.conf / "main.cf").write_text(self.main_cf())
        (self.conf / "master.cf").write_text(_MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        if self.setup.routes:
            (self.conf / "transport").write_text("".join(
                f"{d} smtp:[{h.rsplit(':', 1)[0]}]:{h.rsplit(':', 1)[1]}\n"
                for d, h in self.setup.routes.items()))
        try:
            if self.milter:
                await self._start_opendkim()
            await trio.to_thread.run_sync(lambda: self._run("check"))
            await trio.to_thread.run_sync(lambda: self._run("start"))
        except PeerError:
            await self.__aexit__()
            raise
        pid_file = self.queue / "pid" / "master.pid"
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not self.master_pid:
                if pid_file.exists():
                    text = pid_file.read_text().strip()
                    self.master_pid = int(text) if text else None
                await trio.sleep(0.05)
            await wait_for_220("127.0.0.1", self.port, deadline)
        except PeerError as e:
            await self.__aexit__()
            raise PeerError(f"postfix: {e}") from None
        return self

    async def __aexit__(self, *exc: object) -> None:
        await trio.to_thread.run_sync(lambda: self._run("stop", check=False))
        pid = self.master_pid
        if pid:
            with trio.move_on_after(15):
                while process_alive(pid):
                    await trio.sleep(0.05)
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
        await trio.to_thread.run_sync(self._stop_opendkim)
        if not (os.environ.get("BENCH_KEEP_TMP") or self.keep):
            shutil.rmtree(self.tmp, ignore_errors=True)


def make_peer(name: str, setup: PeerSetup) -> Peer:
    """``relay`` | ``postfix`` | ``postfix+opendkim`` | ``postfix+opendkim-unix`` |
    ``haraka`` (``bench.haraka``) | ``direct`` (``PEERS``)."""
    if name == "relay":
        return RelayPeer(setup)
    if name == "postfix":
        return PostfixPeer(setup)
    if name == "postfix+opendkim":
        return PostfixPeer(setup, milter="inet")
    if name == "postfix+opendkim-unix":
        return PostfixPeer(setup, milter="unix")
    if name == "haraka":
        from bench.haraka import HarakaPeer  # bench.haraka imports this module

        return HarakaPeer(setup)
    if name == "direct":
        return DirectPeer(setup)
    raise ValueError(f"unknown peer {name!r} ({', '.join(PEERS)})")
