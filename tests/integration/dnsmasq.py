"""A real dnsmasq on 127.0.0.1:<free port> for resolver/routing/delivery tests.

Use it by re-exporting the fixture in a test module (there is no shared conftest):

    from tests.integration import dnsmasq as _dnsmasq
    dnsmasq = _dnsmasq.dnsmasq

    async def test_x(dnsmasq):
        dns = dnsmasq(mx={"a.test": [(10, "mx1.a.test")]}, hosts={"mx1.a.test": "127.0.0.2"})
        resolver = Resolver([dns.nameserver])

Every name under ``.test`` that is not configured answers NXDOMAIN (``--local=/test/``);
``null_mx`` domains publish ``MX 0 .`` (RFC 7505); ``txt`` records are given as one text
and served as strings of at most 255 octets (RFC 1035 3.3.14; a DKIM RSA-2048 key needs
two), which a DKIM verifier joins again (RFC 6376 3.6.2.2). Queries are logged to a file so tests
can count what actually reached the server (``dns.count("MX", "a.test")``). Each server
is killed when the test ends. Only loopback is ever used.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

__all__ = ["DnsServer", "dnsmasq", "txt_record_arg"]

DNSMASQ = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (dnsmasq binds both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port for dnsmasq")


@dataclass
class DnsServer:
    """A running dnsmasq: where it listens and what it was asked."""

    port: int
    log_path: Path
    process: subprocess.Popen[bytes]
    #: The command line it runs with (to start the same server elsewhere, e.g. on port 53
    #: in a private network namespace for a tool that cannot be given a port).
    args: list[str] = field(default_factory=list)

    @property
    def nameserver(self) -> str:
        """The "ip:port" form ``outbound.resolvers`` takes."""
        return f"127.0.0.1:{self.port}"

    def queries(self) -> list[tuple[str, str]]:
        """(type, name) of every query logged so far."""
        try:
            text = self.log_path.read_text()
        except FileNotFoundError:
            return []
        return re.findall(r"query\[(\w+)\] (\S+) from", text)

    def count(self, rdtype: str, name: str) -> int:
        return sum(1 for t, n in self.queries() if t == rdtype and n == name)


def _wait_ready(port: int, deadline: float) -> None:
    q = dns.message.make_query("ready-probe.test", "A")
    while True:
        try:
            r = dns.query.udp(q, "127.0.0.1", port=port, timeout=0.2)
            if r.rcode() in (dns.rcode.NXDOMAIN, dns.rcode.NOERROR):
                return
        except (OSError, dns.exception.Timeout):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("dnsmasq did not start")
        time.sleep(0.02)  # process start-up poll, bounded by the deadline


def txt_record_arg(name: str, text: str) -> str:
    """``--txt-record=NAME,S1,S2,...``: ``text`` as strings of at most 255 characters
    (dnsmasq separates strings at commas, so the text must hold none)."""
    if "," in text or '"' in text or "\\" in text:
        raise ValueError(f"TXT text with a comma, quote or backslash: {text!r}")
    strings = [text[i:i + 255] for i in range(0, len(text), 255)] or [""]
    return f"--txt-record={name}," + ",".join(strings)


@pytest.fixture
def dnsmasq(tmp_path: Path) -> Iterator[Callable[..., DnsServer]]:
    """Factory: ``dnsmasq(mx=..., hosts=..., null_mx=..., txt=..., ttl=3, extra=[...])``.

    ``mx``: domain -> [(preference, exchange)]; ``hosts``: name -> ip or [ips] (A/AAAA by
    form); ``null_mx``: domains publishing ``MX 0 .``; ``txt``: name -> record text;
    ``ttl``: TTL of every answer.
    """
    started: list[subprocess.Popen[bytes]] = []

    def start(
        *,
        mx: dict[str, list[tuple[int, str]]] | None = None,
        hosts: dict[str, str | list[str]] | None = None,
        null_mx: list[str] | None = None,
        txt: dict[str, str] | None = None,
        ttl: int = 60,
        extra: list[str] | None = None,
    ) -> DnsServer:
        port = _free_port()
        log_path = tmp_path / f"dnsmasq-{port}.log"
        args = [
            DNSMASQ, "--no-resolv", "--no-hosts", "--no-daemon", "--conf-file=/dev/null",
            f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces",
            "--local=/test/", f"--local-ttl={ttl}", "--log-queries",
            f"--log-facility={log_path}", "--cache-size=0", "--user=root",
            "--pid-file=",
        ]
        for domain, records in (mx or {}).items():
            for pref, host in records:
                args.append(f"--mx-host={domain},{host},{pref}")
        for name, ips in (hosts or {}).items():
            for ip in [ips] if isinstance(ips, str) else ips:
                args.append(f"--host-record={name},{ip}")
        for domain in null_mx or []:
            args.append(f"--dns-rr={domain},15,000000")  # MX 0 "." in wire format
        for name, text in (txt or {}).items():
            args.append(txt_record_arg(name, text))
        args.extend(extra or [])
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        started.append(proc)
        try:
            _wait_ready(port, time.monotonic() + 10)
        except RuntimeError:
            proc.kill()
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"dnsmasq did not start: {err}") from None
        return DnsServer(port=port, log_path=log_path, process=proc, args=args)

    try:
        yield start
    finally:
        for proc in started:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            if proc.stderr:
                proc.stderr.close()
