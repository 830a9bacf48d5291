"""DKIM signing without sockets: signatures, keys, config, the intake stage, keygen.

Signatures are checked by dkimpy (an independent verifier) with the key records handed to
it from memory; tests/integration/test_dkim_verify.py does the same through a real DNS
server, and with OpenDKIM as a second verifier.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from relay.cli import main as cli_main
from relay.config import DKIM_HEADERS, ConfigError, decode_config, load_config
from relay.dkim import (
    KeyProblem,
    Signer,
    author_domain,
    load_private_key,
    load_signers,
    public_key_record,
    sign_message,
)
from relay.events import Reception
from relay.events.types import decode, encode
from relay.intake import Admission, Intake, Refused, default_stages
from relay.intake.intake import _reception
from relay.intake.signing import DkimSign
from relay.model import Envelope, Recipient

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()

MESSAGE = (b"From: Alice <alice@sender.test>\r\nTo: bob@dest.test,\r\n  carol@dest.test\r\n"
           b"Subject:  Hello   there \r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
           b"Resent-From: r1@sender.test\r\nResent-From: r2@sender.test\r\n"
           b"X-Unsigned: whatever\r\n\r\nHi  there \t\r\n.dot line\r\n\r\n\r\n")


def dns_of(records: dict[str, str]) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` answering from ``records`` (name -> TXT text)."""
    table = {k.rstrip(".").lower(): v.encode() for k, v in records.items()}

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return table.get(name.decode().rstrip(".").lower())

    return lookup


def signer(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = RSA_KEY, **kw: object) -> Signer:
    algorithm = "ed25519-sha256" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa-sha256"
    args: dict[str, object] = dict(domain="sender.test", selector="s1", algorithm=algorithm,
                                   key=key, headers=DKIM_HEADERS)
    args.update(kw)
    return Signer(**args)  # type: ignore[arg-type]


def verify(message: bytes, records: dict[str, str]) -> list[bool]:
    """dkimpy's verdict on each signature of ``message``."""
    d = dkim.DKIM(message)
    count = len(re.findall(rb"(?im)^dkim-signature:", message.split(b"\r\n\r\n")[0]))
    return [_verdict(d, i, records) for i in range(count)]


def _verdict(d: dkim.DKIM, idx: int, records: dict[str, str]) -> bool:
    try:
        return bool(d.verify(idx=idx, dnsfunc=dns_of(records)))
    except dkim.ValidationError:  # dkimpy raises for some failures (body hash mismatch)
        return False


def tags(field: bytes) -> dict[str, str]:
    value = re.sub(r"\s+", "", field.decode().partition(":")[2])
    return dict(t.split("=", 1) for t in value.split(";") if t)


# -- signatures ---------------------------------------------------------------------------


@pytest.mark.parametrize("canon", ["relaxed/relaxed", "simple/simple", "relaxed/simple",
                                   "simple/relaxed"])
@pytest.mark.parametrize("key", [RSA_KEY, ED_KEY], ids=["rsa", "ed25519"])
def test_every_canonicalisation_verifies(canon: str, key: object) -> None:
    hc, bc = canon.split("/")
    s = signer(key, header_canon=hc, body_canon=bc)  # type: ignore[arg-type]
    [field] = sign_message([s], MESSAGE, 1_700_000_000)
    records = {"s1._domainkey.sender.test": public_key_record(s.key)}
    assert verify(field + MESSAGE, records) == [True]
    assert tags(field)["c"] == canon
    # A changed body or signed field breaks it; an unsigned field does not.
    assert verify(field + MESSAGE.replace(b".dot", b".Dot"), records) == [False]
    assert verify(field + MESSAGE.replace(b"r2@", b"r3@"), records) == [False]
    assert verify(field + MESSAGE.replace(b"whatever", b"changed"), records) == [True]


def test_over_signing_lists_each_present_field_once_more_and_blocks_additions() -> None:
    [field] = sign_message([signer()], MESSAGE, 1_700_000_000)
    h = tags(field)["h"].split(":")
    assert h == ["From", "From", "Subject", "Subject", "Date", "Date", "To", "To",
                 "Resent-From", "Resent-From", "Resent-From"]
    records = {"s1._domainkey.sender.test": public_key_record(RSA_KEY)}
    # A field added on top: the verifier takes instances bottom up, so without
    # over-signing it still finds the original Subject below it and passes.
    added = b"Subject: injected\r\n" + MESSAGE
    assert verify(added[:19] + field + added[19:], records) == [False]
    [plain] = sign_message([signer(over_sign=False)], MESSAGE, 1_700_000_000)
    assert tags(plain)["h"].split(":") == ["From", "Subject", "Date", "To", "Resent-From",
                                           "Resent-From"]
    assert verify(added[:19] + plain + added[19:], records) == [True]  # what over-signing
    # prevents


def test_tags_t_x_and_folding() -> None:
    [field] = sign_message([signer(expiration=3600)], MESSAGE, 1_700_000_000.7)
    t = tags(field)
    assert (t["v"], t["a"], t["d"], t["s"], t["t"], t["x"]) == (
        "1", "rsa-sha256", "sender.test", "s1", "1700000000", "1700003600")
    assert t["bh"] == base64.b64encode(hashlib.sha256(
        b"Hi there\r\n.dot line\r\n").digest()).decode()
    assert all(len(line) <= 78 for line in field.split(b"\r\n"))
    assert field.endswith(b"\r\n") and field.count(b"\r\n") > 4
    [bare] = sign_message([signer(timestamp=False)], MESSAGE, 1_700_000_000)
    assert "t" not in tags(bare) and "x" not in tags(bare)


def test_rsa_prehashed_signature_is_the_plain_pkcs1_signature() -> None:
    """RSA PKCS#1 v1.5 is deterministic: signing our SHA-256 digest (Prehashed) must give
    what signing the header data itself gives."""
    s = signer(header_canon="simple")
    [field] = sign_message([s], MESSAGE, 1_700_000_000)
    prefix, _, b = field.rpartition(b"b=")
    data = _signed_data(s, MESSAGE, prefix + b"b=")
    signature = base64.b64decode(re.sub(rb"\s", b"", b))
    assert signature == RSA_KEY.sign(data, padding.PKCS1v15(), hashes.SHA256())


def _signed_data(s: Signer, message: bytes, own: bytes) -> bytes:
    from relay.dkim.canon import canonical_header, select_fields, split_fields, split_message

    section, _ = split_message(message)
    fields = split_fields(section)
    names = [n.lower().encode() for n in tags(own + b"x")["h"].split(":")]
    return b"".join(canonical_header(f, s.header_canon) for f in select_fields(fields, names)) \
        + own


def test_two_signatures_share_the_body_hash_and_verify_each_alone() -> None:
    both = sign_message([signer(), signer(ED_KEY, selector="ed")], MESSAGE, 1_700_000_000)
    assert tags(both[0])["bh"] == tags(both[1])["bh"]
    records = {"s1._domainkey.sender.test": public_key_record(RSA_KEY),
               "ed._domainkey.sender.test": public_key_record(ED_KEY)}
    assert verify(b"".join(both) + MESSAGE, records) == [True, True]
    assert verify(both[1] + MESSAGE, records) == [True]


def test_no_from_field_no_signature() -> None:
    assert sign_message([signer()], b"Subject: x\r\n\r\nbody\r\n", 0) == []
    assert sign_message([], MESSAGE, 0) == []


def test_ed25519_signs_the_sha256_of_the_header_data() -> None:
    """RFC 8463 3: the Ed25519 signature is over the hash, not the data."""
    s = signer(ED_KEY, header_canon="simple")
    [field] = sign_message([s], MESSAGE, 1_700_000_000)
    prefix, _, b = field.rpartition(b"b=")
    data = _signed_data(s, MESSAGE, prefix + b"b=")
    signature = base64.b64decode(re.sub(rb"\s", b"", b))
    ED_KEY.public_key().verify(signature, hashlib.sha256(data).digest())


# -- author domain ------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "expected"), [
    (b"From: a@Example.COM\r\n", ("example.com", "")),
    (b"From: \"Bob @ home\" <bob@b.test> (c@comment.test)\r\n", ("b.test", "")),
    (b"FROM :\r\n Bob\r\n <bob@folded.test.>\r\n", ("folded.test", "")),
    (b"From: x@a.test, y@a.test\r\n", ("a.test", "")),
    (b"From: x@a.test, y@b.test\r\n", (None, "From: addresses in several domains")),
    (b"From: a@a.test\r\nFrom: b@a.test\r\n", (None, "2 From: fields")),
    (b"Subject: x\r\n", (None, "no From: field")),
    (b"From: undisclosed:;\r\n", (None, "no address in From:")),
    ("From: a@b\u00fccher.test\r\n".encode(), ("xn--bcher-kva.test", "")),
    (b"From: a@\xff\xfe.test\r\n", (None, "From: domain is not a domain name")),
])
def test_author_domain(header: bytes, expected: tuple[str | None, str]) -> None:
    assert author_domain(header) == expected
    # The stage passes the lower-cased section with a CRLF in front (Admission.fields).
    assert author_domain(b"\r\n" + header.lower()) == expected


# -- keys ---------------------------------------------------------------------------------


def pem(key: object) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                             serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def small_rsa_key(bits: int) -> rsa.RSAPrivateKey:
    """An RSA key below what ``generate_private_key`` makes (it refuses < 1024)."""
    def prime(n_bits: int) -> int:
        while True:
            n = secrets.randbits(n_bits) | (3 << (n_bits - 2)) | 1
            if all(pow(a, n - 1, n) == 1 for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31)):
                return n
    p, q, e = prime(bits // 2), prime(bits // 2), 65537
    d = pow(e, -1, (p - 1) * (q - 1))
    return rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q),
                                 rsa.rsa_crt_iqmp(p, q),
                                 rsa.RSAPublicNumbers(e, p * q)).private_key()


def test_key_problems_name_the_file(tmp_path: Path) -> None:
    cases: dict[str, tuple[bytes | None, str, str]] = {
        "missing.pem": (None, "rsa-sha256", "cannot read {p}: No such file or directory"),
        "junk.pem": (b"not a key", "rsa-sha256", "{p} is not a PEM private key"),
        "public.pem": (RSA_KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            "rsa-sha256", "{p} is not a PEM private key"),
        "locked.pem": (RSA_KEY.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw")), "rsa-sha256", "{p} is encrypted"),
        "ed.pem": (pem(ED_KEY), "rsa-sha256",
                   '{p} holds an Ed25519 key, but algorithm "rsa-sha256" needs an RSA key'),
        "rsa.pem": (pem(RSA_KEY), "ed25519-sha256",
                    '{p} holds an RSA key, but algorithm "ed25519-sha256" needs an Ed25519'),
        "ec.pem": (pem(ec.generate_private_key(ec.SECP256R1())), "rsa-sha256",
                   '{p} holds an EC key, but algorithm "rsa-sha256" needs an RSA key'),
        "small.pem": (pem(small_rsa_key(768)), "rsa-sha256",
                      "{p} is an RSA key of 768 bits: DKIM needs 1024 to 4096"),
    }
    for name, (data, algorithm, message) in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(KeyProblem) as e:
            load_private_key(str(path), algorithm)  # type: ignore[arg-type]
        assert message.format(p=path) in str(e.value), name
    with pytest.raises(KeyProblem, match=r"cannot read .*: Is a directory"):
        load_private_key(str(tmp_path), "rsa-sha256")
    (tmp_path / "ok.pem").write_bytes(pem(RSA_KEY))
    assert load_private_key(str(tmp_path / "ok.pem"), "rsa-sha256").key_size == 2048


def test_too_large_rsa_key_is_refused(tmp_path: Path) -> None:
    big = rsa.generate_private_key(public_exponent=65537, key_size=4160)
    (tmp_path / "big.pem").write_bytes(pem(big))
    with pytest.raises(KeyProblem, match="of 4160 bits"):
        load_private_key(str(tmp_path / "big.pem"), "rsa-sha256")


def test_public_key_records() -> None:
    ed = public_key_record(ED_KEY)
    assert ed.startswith("v=DKIM1; k=ed25519; p=") and len(ed.partition("p=")[2]) == 44
    der = base64.b64decode(public_key_record(RSA_KEY).partition("p=")[2])
    assert serialization.load_der_public_key(der) == RSA_KEY.public_key()


# -- config -------------------------------------------------------------------------------


def signer_toml(domain: str = "sender.test", selector: str = "s1", key: str = "k.pem",
                extra: str = "") -> str:
    return (f'[[dkim.signers]]\ndomain = "{domain}"\nselector = "{selector}"\n'
            f'key = "{key}"\n{extra}')


@pytest.mark.parametrize(("toml", "expected"), [
    (signer_toml(selector="bad_sel"), 'dkim.signers[0].selector: "bad_sel" is not a valid'),
    (signer_toml(domain="*"), 'dkim.signers[0].domain: "*" is not a valid domain'),
    (signer_toml(domain="b\u00fccher.test"), "(an IDN in its xn-- form)"),
    (signer_toml(key=""), "dkim.signers[0].key: must name the private key's PEM file"),
    (signer_toml(extra='headers = ["To", "Subject"]\n'),
     'dkim.signers[0].headers: must include "From"'),
    (signer_toml(extra='headers = ["From", "Bad Name"]\n'),
     'dkim.signers[0].headers: "Bad Name" is not a field name'),
    (signer_toml(extra='algorithm = "rsa-sha1"\n'),
     'dkim.signers[0].algorithm: must be one of "rsa-sha256", "ed25519-sha256" '
     '(got "rsa-sha1")'),
    (signer_toml(extra='canonicalization = "relaxed"\n'),
     "dkim.signers[0].canonicalization: must be one of"),
    (signer_toml(extra="expiration = -1\n"), "dkim.signers[0].expiration: must be at least 0"),
    (signer_toml() + signer_toml(domain="Sender.test."),
     "dkim.signers[1]: the same domain and selector as dkim.signers[0]"),
    ('[dkim]\nalways = "esp.test"\n' + signer_toml(),
     'dkim.always: no [[dkim.signers]] entry has domain = "esp.test"'),
    ('[dkim]\npolicy = "strict"\n', 'dkim.policy: must be one of "unsigned", "refuse"'),
])
def test_dkim_config_errors_name_the_key(toml: str, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        decode_config(toml.encode(), "x.toml")
    assert str(e.value).startswith("x.toml: ") and expected in str(e.value)


def test_key_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "etc" / "dkim").mkdir(parents=True)
    (tmp_path / "etc" / "relay.toml").write_text(signer_toml(key="dkim/a.pem"))
    cfg = load_config(tmp_path / "etc" / "relay.toml")
    assert cfg.dkim.signers[0].key == str(tmp_path / "etc" / "dkim" / "a.pem")
    with pytest.raises(ConfigError) as e:
        load_signers(cfg.dkim, "etc/relay.toml")
    assert str(e.value) == (f"etc/relay.toml: dkim.signers[0].key: cannot read "
                            f"{tmp_path}/etc/dkim/a.pem: No such file or directory")


# -- the intake stage ---------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    """PEM files: "rsa" and "ed" for sender.test, "esp" for esp.test, "host" for the
    relay's hostname, "sub" for *.sub.test."""
    out = {}
    for name, key in (("rsa", RSA_KEY), ("ed", ED_KEY), ("esp", ED_KEY), ("host", RSA_KEY),
                      ("sub", ED_KEY)):
        path = tmp_path / f"{name}.pem"
        path.write_bytes(pem(key))
        out[name] = str(path)
    return out


RECORDS = {"rsa._domainkey.sender.test": public_key_record(RSA_KEY),
           "ed._domainkey.sender.test": public_key_record(ED_KEY),
           "esp._domainkey.esp.test": public_key_record(ED_KEY),
           "host._domainkey.relay.test": public_key_record(RSA_KEY),
           "sub._domainkey.sub.test": public_key_record(ED_KEY)}


def dkim_config(keys: dict[str, str], head: str = "") -> str:
    ed = 'algorithm = "ed25519-sha256"\n'
    return head + "".join(signer_toml(d, s, keys[s], a) for d, s, a in (
        ("sender.test", "rsa", ""), ("sender.test", "ed", ed), ("esp.test", "esp", ed),
        ("relay.test", "host", ""), ("*.sub.test", "sub", ed)))


def intake_for(toml: str) -> Intake:
    stand_in: object = object()
    stages = default_stages(decode_config(toml.encode()), "relay.test")
    return Intake(stages, stand_in, stand_in)  # type: ignore[arg-type]


def admission(data: bytes, via: str = "smtp") -> Admission:
    env = Envelope(queue_id="QID1", sender="a@sender.test", received_at=1_700_000_000.0,
                   recipients=[Recipient(address="b@dest.test")], client_ip="192.0.2.7")
    return Admission(envelope=env, data=data, via=via, helo="client.test")  # type: ignore[arg-type]


def test_signing_is_the_last_stage_and_covers_the_trace_headers(keys: dict[str, str]) -> None:
    pipeline = intake_for(dkim_config(keys))
    assert isinstance(pipeline.stages[-1], DkimSign)
    msg = admission(MESSAGE)
    stored = pipeline.prepare(msg)
    assert stored.data.startswith(b"DKIM-Signature: ")
    assert verify(stored.data, RECORDS) == [True, True]
    assert msg.dkim == ["d=sender.test s=rsa a=rsa-sha256", "d=sender.test s=ed a=ed25519-sha256"]
    assert msg.dkim_reason == ""
    # Received: and the Message-ID the stages added are signed, and come after the
    # signatures; the message as received follows untouched.
    head = stored.data[: stored.data.index(MESSAGE)]
    assert head.index(b"\r\nReceived: ") < head.index(b"\r\nMessage-ID: <QID1@relay.test>")
    assert "Message-ID" in tags(stored.data.split(b"\r\nDKIM-Signature")[0])["h"]
    tampered = stored.data.replace(b"id QID1", b"id QID2")
    assert verify(tampered, RECORDS) == [True, True]  # Received is not signed (RFC 6376 5.4)
    assert verify(stored.data.replace(b"<QID1@", b"<QID2@"), RECORDS) == [False, False]


def test_wildcard_always_and_the_reception_event(keys: dict[str, str]) -> None:
    pipeline = intake_for(dkim_config(keys, '[dkim]\nalways = "esp.test"\n'))
    msg = admission(MESSAGE.replace(b"alice@sender.test", b"alice@news.sub.test"))
    stored = pipeline.prepare(msg)
    assert msg.dkim == ["d=sub.test s=sub a=ed25519-sha256", "d=esp.test s=esp a=ed25519-sha256"]
    assert verify(stored.data, RECORDS) == [True, True]
    event = decode(encode(_reception(msg, stored, 0.001)))
    assert isinstance(event, Reception) and event.dkim == msg.dkim and event.dkim_reason == ""
    # An unknown domain is signed by the ESP only, and the event says why not aligned.
    other = admission(MESSAGE.replace(b"alice@sender.test", b"alice@sub.test"))
    stored = pipeline.prepare(other)
    assert other.dkim == ["d=esp.test s=esp a=ed25519-sha256"]
    assert other.dkim_reason == "no signer for From: domain sub.test"
    event = decode(encode(_reception(other, stored, 0.0)))
    assert (event.dkim, event.dkim_reason) == (other.dkim, other.dkim_reason)  # type: ignore[union-attr]


def test_unsigned_by_default_refused_by_policy_but_never_a_dsn(keys: dict[str, str]) -> None:
    data = MESSAGE.replace(b"alice@sender.test", b"alice@elsewhere.test")
    msg = admission(data)
    stored = intake_for(dkim_config(keys)).prepare(msg)
    assert b"DKIM-Signature" not in stored.data
    assert (msg.dkim, msg.dkim_reason) == (None, "no signer for From: domain elsewhere.test")
    assert b'"dkim"' not in encode(_reception(msg, stored, 0.0))

    strict = intake_for(dkim_config(keys, '[dkim]\npolicy = "refuse"\n'))
    with pytest.raises(Refused) as e:
        strict.prepare(admission(data))
    assert str(e.value.reply) == ("550 5.7.1 Message rejected: no DKIM signing key for "
                                  "elsewhere.test")
    with pytest.raises(Refused) as e:
        strict.prepare(admission(b"Subject: no from\r\n\r\nx\r\n"))
    assert str(e.value.reply) == "550 5.7.1 Message rejected: cannot DKIM-sign it: no From: field"
    dsn = admission(data, via="dsn")
    assert b"DKIM-Signature" not in strict.prepare(dsn).data
    assert dsn.dkim_reason == "no signer for From: domain elsewhere.test"


def test_a_dsn_of_ours_is_signed_for_the_hostname(keys: dict[str, str]) -> None:
    from relay.outcomes.dsn import FailedRecipient, build_dsn

    env = Envelope(queue_id="QORIG", sender="a@sender.test", received_at=1_700_000_000.0,
                   recipients=[Recipient(address="b@dest.test")])
    failed = [FailedRecipient(index=0, status="5.1.1", diagnostic="smtp; 550 5.1.1 no")]
    dsn = build_dsn(envelope=env, data=MESSAGE, failures=failed, action="failed",
                    reporting_mta="relay.test", queue_id="QDSN", arrival=env.received_at,
                    now=1_700_000_100.0)
    assert dsn is not None and b"From: Mail Delivery System <MAILER-DAEMON@relay.test>" in dsn.data
    msg = Admission(envelope=dsn.envelope, data=dsn.data, via="dsn")
    stored = intake_for(dkim_config(keys)).prepare(msg)
    assert msg.dkim == ["d=relay.test s=host a=rsa-sha256"]
    assert verify(stored.data, RECORDS) == [True]


def test_no_dkim_config_no_stage() -> None:
    assert not any(isinstance(s, DkimSign) for s in default_stages(decode_config(b""), "h"))
    stages = default_stages(decode_config(b'[dkim]\npolicy = "refuse"\n'), "h")
    assert isinstance(stages[-1], DkimSign)  # refuses everything: nothing can be signed


def test_a_bad_key_stops_the_stages_from_being_built(keys: dict[str, str]) -> None:
    toml = signer_toml("sender.test", "rsa", keys["ed"])
    with pytest.raises(ConfigError) as e:
        default_stages(decode_config(toml.encode()), "relay.test", "conf/x.toml")
    assert str(e.value).startswith(f"conf/x.toml: dkim.signers[0].key: {keys['ed']} holds an "
                                   "Ed25519 key")


# -- relay dkim keygen --------------------------------------------------------------------


def test_keygen_writes_a_private_key_and_prints_its_record(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["dkim", "keygen", "--domain", "Sender.TEST", "--selector", "s2024",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    path = tmp_path / "sender.test.s2024.pem"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    key = load_private_key(str(path), "rsa-sha256")
    assert key.key_size == 2048
    record = re.search(r'(?s)s2024\._domainkey\.sender\.test\. IN TXT \( (.*) \)', out)
    assert record is not None
    strings = re.findall(r'"([^"]*)"', record.group(1))
    assert len(strings) >= 3 and all(len(s) <= 255 for s in strings)
    assert "".join(strings) == public_key_record(key)
    snippet = out[out.index("[[dkim.signers]]"):]
    cfg = decode_config(snippet.encode())
    assert (cfg.dkim.signers[0].domain, cfg.dkim.signers[0].key) == ("sender.test", str(path))

    before = path.read_bytes()
    assert cli_main(["dkim", "keygen", "--domain", "sender.test", "--selector", "s2024",
                     "--out", str(tmp_path)]) == 73
    assert path.read_bytes() == before
    err = capsys.readouterr().err
    assert err == (f"relay: dkim keygen: {path} exists: not overwritten (remove it, or "
                   "choose another --selector)\n")


@pytest.mark.parametrize(("args", "code", "error"), [
    (["--algorithm", "ed25519-sha256", "--bits", "2048"], 64, "--bits is for rsa-sha256"),
    (["--bits", "512"], 64, "--bits 512: DKIM RSA keys have 1024 to 4096 bits"),
    (["--selector", "a b"], 64, '"a b" is not a valid selector'),
    (["--out", "/nonexistent-dir"], 73, "cannot write /nonexistent-dir/sender.test.x.pem: "
                                        "No such file or directory"),
])
def test_keygen_errors_are_one_line(args: list[str], code: int, error: str,
                                    capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    base = {"--domain": "sender.test", "--selector": "x", "--out": str(tmp_path)}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    argv = ["dkim", "keygen", *[a for kv in base.items() for a in kv]]
    assert cli_main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and error in err and "Traceback" not in err


def test_keygen_ed25519(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["dkim", "keygen", "--domain", "sender.test", "--selector", "ed",
                     "--algorithm", "ed25519-sha256", "--out", str(tmp_path)]) == 0
    key = load_private_key(str(tmp_path / "sender.test.ed.pem"), "ed25519-sha256")
    out = capsys.readouterr().out
    assert f'"{public_key_record(key).partition("p=")[2]}"' in out.replace('"p=', '"')
    assert 'algorithm = "ed25519-sha256"' in out
