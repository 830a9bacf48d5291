"""Every signature the relay makes verifies with two independent verifiers over real DNS.

The public keys are TXT records (``<selector>._domainkey.<domain>``) served by the real
dnsmasq the other tests use (an RSA-2048 key is two strings, RSA-4096 three). The
verifiers:

- dkimpy, its ``dnsfunc`` querying that dnsmasq on 127.0.0.1:<port> with dnspython;
- OpenDKIM's ``opendkim-testmsg`` (libopendkim 2.11). It has no resolver option: it
  asks the libc resolver, which reads /etc/resolv.conf and only knows port 53. So it
  runs in a private network and mount namespace (``unshare``; its own loopback, not the
  machine's) where /etc/resolv.conf is bind-mounted to name 127.0.0.1 and the same
  dnsmasq command line serves the same records on port 53. All DNS stays on loopback,
  nothing of the machine's network or files changes, and the namespace's processes die
  with it (``--pid --fork --kill-child``). It verifies (exit 0) when a signature passes,
  so each signature is given to it alone; its strict header checks also want one Date:,
  one From:, at most one To:/Subject:, which the messages here respect.

Negative controls (a changed body, a changed signed field, an unpublished selector)
must fail in both, or the passes would mean nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim
import dns.message
import dns.query
import dns.rdatatype
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.config import decode_config
from relay.dkim import public_key_record
from relay.intake import Admission, Intake, default_stages
from relay.model import Envelope, Recipient
from tests.integration import dnsmasq as _dnsmasq
from tests.integration.dnsmasq import DnsServer

dnsmasq = _dnsmasq.dnsmasq

OPENDKIM_TESTMSG = "/usr/sbin/opendkim-testmsg"

# -- the verifiers --------------------------------------------------------------------------

_NETNS_SCRIPT = r"""
import fcntl, json, socket, struct, subprocess, sys, time
import dns.exception, dns.message, dns.query
spec = json.load(open(sys.argv[1]))
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # ip link set lo up
ifreq = struct.pack("16sH22x", b"lo", 0)
flags = struct.unpack("16sH22x", fcntl.ioctl(sock, 0x8913, ifreq))[1]  # SIOCGIFFLAGS
fcntl.ioctl(sock, 0x8914, struct.pack("16sH22x", b"lo", flags | 1))  # SIOCSIFFLAGS IFF_UP
subprocess.run(["mount", "--bind", spec["resolv"], "/etc/resolv.conf"], check=True)
server = subprocess.Popen(spec["dnsmasq"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
deadline = time.monotonic() + 10
probe = dns.message.make_query("ready-probe.test", "A")
while True:
    try:
        dns.query.udp(probe, "127.0.0.1", port=53, timeout=0.2)
        break
    except (OSError, dns.exception.Timeout):
        if time.monotonic() > deadline or server.poll() is not None:
            sys.exit("dnsmasq did not start in the namespace")
        time.sleep(0.02)  # start-up poll, bounded by the deadline
results = []
for path in spec["messages"]:
    with open(path, "rb") as f:
        run = subprocess.run([spec["opendkim"]], stdin=f, capture_output=True, timeout=30)
    results.append([run.returncode, (run.stdout + run.stderr).decode("utf-8", "replace")])
server.kill()
server.wait()
print(json.dumps(results))
"""


class Verifiers:
    """dkimpy and opendkim-testmsg, both resolving through ``dns`` (see the docstring)."""

    def __init__(self, dns: DnsServer, tmp: Path) -> None:
        self.dns = dns
        self.tmp = tmp
        self.runs = 0

    def txt(self, name: bytes, timeout: int = 5) -> bytes | None:
        """dkimpy's ``dnsfunc``: the TXT record's strings joined, from the dnsmasq (over
        TCP when the answer is truncated: an RSA-4096 record does not fit 512 octets)."""
        query = dns.message.make_query(name.decode().rstrip("."), "TXT")
        answer, _ = dns.query.udp_with_fallback(query, "127.0.0.1", port=self.dns.port,
                                                timeout=timeout)
        for rrset in answer.answer:
            if rrset.rdtype == dns.rdatatype.TXT:
                return b"".join(next(iter(rrset)).strings)
        return None

    def dkimpy(self, message: bytes) -> list[bool]:
        """dkimpy's verdict on each DKIM-Signature of ``message``, in order."""
        d = dkim.DKIM(message)
        count = len(re.findall(rb"(?im)^dkim-signature:", message.split(b"\r\n\r\n")[0]))
        verdicts = []
        for i in range(count):
            try:
                verdicts.append(bool(d.verify(idx=i, dnsfunc=self.txt)))
            except dkim.ValidationError:  # e.g. a body hash mismatch is raised
                verdicts.append(False)
        return verdicts

    def opendkim(self, messages: list[bytes]) -> list[tuple[int, str]]:
        """(exit status, output) of opendkim-testmsg for each message, in one namespace."""
        self.runs += 1
        work = self.tmp / f"opendkim-{self.runs}"
        work.mkdir()
        paths = []
        for i, message in enumerate(messages):
            paths.append(str(work / f"{i}.eml"))
            Path(paths[-1]).write_bytes(message)
        (work / "resolv.conf").write_text("nameserver 127.0.0.1\noptions attempts:1 timeout:2\n")
        args = [a if not a.startswith("--port=") else "--port=53" for a in self.dns.args]
        args = [a if not a.startswith("--log-facility=") else
                f"--log-facility={work / 'dnsmasq.log'}" for a in args]
        spec = {"dnsmasq": args, "resolv": str(work / "resolv.conf"), "messages": paths,
                "opendkim": OPENDKIM_TESTMSG}
        (work / "spec.json").write_text(json.dumps(spec))
        run = subprocess.run(
            ["unshare", "--mount", "--net", "--pid", "--fork", "--kill-child",
             sys.executable, "-c", _NETNS_SCRIPT, str(work / "spec.json")],
            capture_output=True, timeout=120, check=False)
        assert run.returncode == 0, run.stderr.decode(errors="replace")
        return [(code, out) for code, out in json.loads(run.stdout)]

    def netns_queries(self) -> list[str]:
        """TXT names the namespace's dnsmasq was asked for, over every opendkim run."""
        names = []
        for log in self.tmp.glob("opendkim-*/dnsmasq.log"):
            names += re.findall(r"query\[TXT\] (\S+) from 127\.0\.0\.1", log.read_text())
        return names


def each_alone(message: bytes, signatures: int) -> list[bytes]:
    """The message once per signature, with only that one of its leading signatures."""
    fields = re.findall(rb"DKIM-Signature:.*?\r\n(?![ \t])", message, re.DOTALL)[:signatures]
    rest = message[sum(len(f) for f in fields):]
    assert b"".join(fields) + rest == message
    return [f + rest for f in fields]


# -- keys, records, signing through the intake -----------------------------------------------

KEYS = {
    "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "ed": ed25519.Ed25519PrivateKey.generate(),
    "big": rsa.generate_private_key(public_exponent=65537, key_size=4096),
}
ALGORITHM = {"rsa": "rsa-sha256", "ed": "ed25519-sha256", "big": "rsa-sha256"}
CANONS = ["relaxed/relaxed", "simple/simple", "relaxed/simple", "simple/relaxed"]


def records() -> dict[str, str]:
    """TXT records: selector <key>-<n> of <n>.sender.test for each canonicalisation n."""
    out = {}
    for n in range(len(CANONS)):
        for name, key in KEYS.items():
            out[f"{name}._domainkey.c{n}.sender.test"] = public_key_record(key)
    return out


@pytest.fixture
def verifiers(dnsmasq: Callable[..., DnsServer], tmp_path: Path) -> Iterator[Verifiers]:
    yield Verifiers(dnsmasq(txt=records()), tmp_path)


def write_keys(tmp: Path) -> dict[str, Path]:
    paths = {}
    for name, key in KEYS.items():
        paths[name] = tmp / f"{name}.pem"
        paths[name].write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
    return paths


def signing_intake(tmp: Path, n: int, names: tuple[str, ...] = ("rsa", "ed")) -> Intake:
    """The relay's own stages, configured to sign c<n>.sender.test mail with ``names``."""
    paths = write_keys(tmp)
    toml = "".join(
        f'[[dkim.signers]]\ndomain = "c{n}.sender.test"\nselector = "{name}"\n'
        f'key = "{paths[name]}"\nalgorithm = "{ALGORITHM[name]}"\n'
        f'canonicalization = "{CANONS[n]}"\n'
        for name in names)
    stand_in: object = object()
    return Intake(default_stages(decode_config(toml.encode()), "relay.test"),
                  stand_in, stand_in)  # type: ignore[arg-type]


def signed(intake: Intake, data: bytes) -> bytes:
    """The message as the intake stores it (and the relay sends it)."""
    env = Envelope(queue_id="QDKIM1", sender="a@sender.test", received_at=1_700_000_000.0,
                   recipients=[Recipient(address="b@dest.test")], client_ip="127.0.0.1")
    stored = intake.prepare(Admission(envelope=env, data=data, via="smtp", helo="c.test")).data
    assert stored.endswith(b"\r\n") and b"\r\n\r\n" in stored  # completed for signing
    return stored


def header(sender: str, extra: bytes = b"") -> bytes:
    return (f"From: Alice <{sender}>\r\nTo: bob@dest.test\r\n"
            "Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nSubject: test\r\n").encode() + extra


#: (name, header extra, body): every shape of message the RFC treats specially.
CORPUS: list[tuple[str, bytes, bytes]] = [
    ("plain", b"", b"Hello.\r\n"),
    ("folded and repeated headers",
     b"Cc: one@dest.test,\r\n\t  two@dest.test ,\r\n   three@dest.test\r\n"
     b"Resent-From:  r1@sender.test  \r\nResent-Date: Tue, 2 Jan 2024 00:00:00 +0000\r\n"
     b"Resent-From:\tr2@sender.test\r\nResent-Date: Wed, 3 Jan 2024 00:00:00 +0000\r\n"
     b"List-Unsubscribe: <https://sender.test/u/1>,\r\n <mailto:u@sender.test>\r\n"
     b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\nFeedback-ID: c1:tenant:mail\r\n",
     b"Body  with \t runs   of blanks \t\r\n\tand a tab first\r\n"),
    ("8-bit", "Content-Type: text/plain; charset=utf-8\r\n"
              "Content-Transfer-Encoding: 8bit\r\nX-Name: Zoë Ünïcode\r\n".encode(),
     "Grüße, ça va? 日本語\r\n\xe9t\xe9 in latin-1 bytes: ".encode() + b"\xe9t\xe9\r\n"),
    ("binary-ish", b"Content-Transfer-Encoding: binary\r\n",
     bytes(b for b in range(1, 256) if b not in (10, 13)) + b"\r\n\x00\x00 \x00\r\n"),
    ("empty body", b"", b""),
    ("header only, no empty line", b"", None),  # type: ignore[list-item]
    ("trailing blank lines", b"", b"last words\r\n\r\n \r\n\t\r\n\r\n"),
    ("no final CRLF", b"", b"ends without a line end "),
    ("dot lines", b"", b".starts with a dot\r\n..two dots\r\n.\r\nmiddle . dot\r\n.\r\n"),
    ("long lines", b"X-Long: " + b"h" * 900 + b"\r\n", b"b" * 998 + b"\r\n" + b" " * 500 + b"\r\n"),
]


def corpus_message(extra: bytes, body: bytes | None, n: int) -> bytes:
    head = header(f"alice@c{n}.sender.test", extra)
    return head if body is None else head + b"\r\n" + body


@pytest.mark.parametrize("n", range(len(CANONS)), ids=CANONS)
def test_corpus_verifies_with_dkimpy_and_opendkim(verifiers: Verifiers, tmp_path: Path,
                                                  n: int) -> None:
    intake = signing_intake(tmp_path, n)
    messages = [signed(intake, corpus_message(extra, body, n)) for _, extra, body in CORPUS]
    for (name, _, _), message in zip(CORPUS, messages, strict=True):
        assert verifiers.dkimpy(message) == [True, True], name  # RSA and Ed25519 together
    alone = [m for message in messages for m in each_alone(message, 2)]
    results = verifiers.opendkim(alone)
    for i, (code, out) in enumerate(results):
        name = CORPUS[i // 2][0]
        assert (code, out) == (0, ""), f"{name} {['rsa', 'ed25519'][i % 2]}: {out}"
    # Both verifiers asked the DNS for both keys.
    for selector in ("rsa", "ed"):
        name = f"{selector}._domainkey.c{n}.sender.test"
        assert verifiers.dns.count("TXT", name) >= len(CORPUS)
        assert verifiers.netns_queries().count(name) >= len(CORPUS)


def test_tampering_fails_in_both_verifiers(verifiers: Verifiers, tmp_path: Path) -> None:
    message = signed(signing_intake(tmp_path, 0), corpus_message(*CORPUS[1][1:], 0))
    assert verifiers.dkimpy(message) == [True, True]
    body_changed = message.replace(b"and a tab first", b"and a tab First")
    field_changed = message.replace(b"Resent-From:\tr2@", b"Resent-From:\tr3@")
    added = message.replace(b"Resent-From:  r1@", b"Subject: added\r\nResent-From:  r1@")
    for bad in (body_changed, field_changed, added):
        assert verifiers.dkimpy(bad) == [False, False]
    results = verifiers.opendkim([m for bad in (body_changed, field_changed, added)
                                  for m in each_alone(bad, 2)])
    # "added" breaks opendkim's strict one-Subject rule as well as the over-signed h=.
    assert [code for code, _ in results] == [70] * 6
    assert all("Bad signature" in out or "Syntax error" in out for _, out in results), results


def test_an_unpublished_selector_does_not_verify(verifiers: Verifiers, tmp_path: Path) -> None:
    message = signed(signing_intake(tmp_path, 0), corpus_message(b"", b"x\r\n", 0))
    unpublished = message.replace(b"s=rsa;", b"s=gone;", 1)
    assert verifiers.dkimpy(unpublished) == [False, True]
    rsa_alone, ed_alone = each_alone(unpublished, 2)
    assert verifiers.opendkim([rsa_alone, ed_alone]) == [
        (70, "opendkim-testmsg: dkim_eom(): Key retrieval failed\n"), (0, "")]
    assert verifiers.dns.count("TXT", "gone._domainkey.c0.sender.test") >= 1


def test_rsa_4096_key_in_three_txt_strings(verifiers: Verifiers, tmp_path: Path) -> None:
    record = verifiers.txt(b"big._domainkey.c2.sender.test")
    assert record == public_key_record(KEYS["big"]).encode() and len(record) > 510
    message = signed(signing_intake(tmp_path, 2, ("big",)),
                     corpus_message(*CORPUS[2][1:], 2))
    assert verifiers.dkimpy(message) == [True]
    assert verifiers.opendkim([message]) == [(0, "")]
