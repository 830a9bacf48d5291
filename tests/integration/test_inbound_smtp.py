"""The relay as a real client sees it: `relay serve` in a subprocess, smtplib and raw
sockets on loopback, the real LMDB spool read back with `relay queue`."""

from __future__ import annotations

import contextlib
import json
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.integration.relayproc import RelayProcess, make_relay, recv_reply, wait_for


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    proc = make_relay(tmp_path).start()
    try:
        yield proc
    finally:
        proc.stop()


def queue_json(relay: RelayProcess, *args: str):  # type: ignore[no-untyped-def]
    result = relay.cli("queue", *args, "--json", "--config", str(relay.config_path))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_smtplib_message_is_queued_with_envelope_and_trace_headers(relay: RelayProcess) -> None:
    body = b"Subject: hello\r\nFrom: a@sender.test\r\n\r\n.leading dot line\r\nbody\r\n"
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        code, _ = client.ehlo("client.test")
        assert code == 250
        for ext in ("pipelining", "size", "8bitmime", "smtputf8", "enhancedstatuscodes",
                    "chunking", "dsn"):
            assert client.has_extn(ext), ext
        refused = client.sendmail(
            "a@sender.test", ["x@one.test", "y@two.test", "z@one.test"], body,
            rcpt_options=["NOTIFY=FAILURE"], mail_options=["RET=HDRS", "ENVID=abc+2Bd"],
        )
        assert refused == {}
        assert client.noop()[0] == 250
    entries = queue_json(relay, "list")
    assert len(entries) == 1
    qid = entries[0]["queue_id"]
    detail = queue_json(relay, "show", qid)
    text = json.dumps(detail)
    for rcpt in ("x@one.test", "y@two.test", "z@one.test"):
        assert rcpt in text
    assert "FAILURE" in text and "abc+d" in text  # NOTIFY and xtext-decoded ENVID stored
    stats = queue_json(relay, "stats")
    assert stats["messages"] == 1


def test_reply_carries_queue_id_and_data_is_byte_identical(relay: RelayProcess) -> None:
    from relay.config import load_config
    from relay.spool import Spool

    body = b"Subject: bytes\r\n\r\n" + bytes(range(32, 127)) + b"\r\n..two dots\r\n"
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("a@sender.test")
        client.rcpt("b@dest.test")
        code, msg = client.data(body)
    assert code == 250
    assert msg.startswith(b"2.0.0 Ok: queued as ")
    qid = msg.rsplit(b" ", 1)[-1].decode()
    cfg = load_config(relay.config_path)
    with Spool(cfg.spool.path, cfg.spool.map_size_bytes()) as spool:
        envelope, data = spool.load(qid)
    assert envelope.sender == "a@sender.test"
    assert [r.address for r in envelope.recipients] == ["b@dest.test"]
    assert envelope.client_ip == "127.0.0.1" and envelope.client_helo == "client.test"
    # smtplib dot-stuffs; the spool holds the original bytes after our trace headers.
    assert data.endswith(body)
    head = data[: len(data) - len(body)].decode()
    assert head.startswith("Received: from client.test ([127.0.0.1])")
    assert f"by relay.test (relay) with ESMTP id {qid}" in head
    assert f"Message-ID: <{qid}@relay.test>" in head


def test_pipelined_group_is_answered_in_one_write(relay: RelayProcess) -> None:
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
        assert recv_reply(s).startswith(b"220 ")
        s.sendall(b"EHLO client.test\r\n")
        assert b"250-PIPELINING" in recv_reply(s)
        s.sendall(
            b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@dest.test>\r\n"
            b"RCPT TO:<c@dest.test>\r\nDATA\r\n"
        )
        s.settimeout(5)
        first = s.recv(65536)  # one write from the server -> one read here
        lines = first.split(b"\r\n")[:-1]
        assert [line[:3] for line in lines] == [b"250", b"250", b"250", b"354"], first
        s.sendall(b"Subject: p\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        rest = recv_reply(s)
        assert b"250 2.0.0 Ok: queued as" in rest
        if b"221" not in rest:
            rest += recv_reply(s)
        assert b"221 2.0.0" in rest


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n", b"\r\n.\r"],
    ids=["LF.LF", "LF.CRLF", "CR.CRLF", "CRLF.LF", "CRLF.CR"],
)
def test_smtp_smuggling_sequences_never_end_data(relay: RelayProcess, smuggle: bytes) -> None:
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
        recv_reply(s)
        s.sendall(b"EHLO client.test\r\n")
        recv_reply(s)
        s.sendall(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@dest.test>\r\nDATA\r\n")
        assert b"354 " in recv_reply(s)
        s.sendall(
            b"Subject: outer\r\n\r\nouter body" + smuggle
            + b"MAIL FROM:<admin@bank.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
        )
        reply = recv_reply(s)
        # The only end of data was the final CRLF.CRLF: one reply, a rejection.
        assert reply.startswith(b"550 5.6.0"), reply
        assert b"354" not in reply and b"queued" not in reply
    assert queue_json(relay, "stats")["messages"] == 0


def test_client_talking_before_greeting_is_refused(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, inbound="greet_pause = 0.5")
    relay.start()
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            s.sendall(b"EHLO eager.test\r\n")
            reply = recv_reply(s)
            assert reply.startswith(b"554 5.5.1"), reply
        # A patient client is served normally.
        with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
            assert client.ehlo("patient.test")[0] == 250
    finally:
        relay.stop()


@pytest.fixture
def tls_relay(tmp_path: Path) -> Iterator[tuple[RelayProcess, ssl.SSLContext]]:
    ca = trustme.CA()
    cert = ca.issue_cert("relay.test", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "relay.pem"))
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    extra = """
[relay]
allow_networks = ["192.0.2.0/24"]
"""
    pem = tmp_path / "relay.pem"
    inbound = f"""tls_cert = "{pem}"
tls_key = "{pem}"
auth_users = [{{ username = "app", password = "plain$s3cret" }}]
"""
    relay = make_relay(tmp_path, inbound=inbound, extra=extra)
    relay.start()
    try:
        yield relay, client_ctx
    finally:
        relay.stop()


def test_starttls_then_auth_allows_relaying(tls_relay: tuple[RelayProcess, ssl.SSLContext]) -> None:
    relay, ctx = tls_relay
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.has_extn("starttls")
        assert not client.has_extn("auth"), "AUTH must not be offered without TLS"
        # Not in allow_networks and not authenticated: no relaying.
        client.mail("a@sender.test")
        code, msg = client.rcpt("b@dest.test")
        assert (code, msg[:5]) == (554, b"5.7.1")
        client.rset()
        client.starttls(context=ctx)
        client.ehlo("client.test")
        assert not client.has_extn("starttls")
        assert "PLAIN" in client.esmtp_features["auth"]
        with pytest.raises(smtplib.SMTPAuthenticationError) as bad:
            client.login("app", "wrong")
        assert bad.value.smtp_code == 535
        client.login("app", "s3cret")
        assert client.sendmail("a@sender.test", ["b@dest.test"], b"Subject: t\r\n\r\nx\r\n") == {}
    detail = queue_json(relay, "list")
    assert len(detail) == 1


def test_auth_login_mechanism(tls_relay: tuple[RelayProcess, ssl.SSLContext]) -> None:
    relay, ctx = tls_relay
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.starttls(context=ctx)
        client.ehlo("client.test")
        client.user, client.password = "app", "s3cret"
        code, _ = client.auth("LOGIN", client.auth_login)
        assert code == 235


@pytest.mark.parametrize(
    "address",
    [
        "victim%elsewhere.test@relay.test",
        "elsewhere.test!victim@relay.test",
        "@relay.test:victim@elsewhere.test",
        '"victim@elsewhere.test"@relay.test',
        "victim@elsewhere.test",
    ],
)
def test_no_open_relay_for_unauthenticated_outsiders(
    tls_relay: tuple[RelayProcess, ssl.SSLContext], address: str
) -> None:
    relay, _ = tls_relay
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
        recv_reply(s)
        s.sendall(b"EHLO client.test\r\n")
        recv_reply(s)
        s.sendall(b"MAIL FROM:<a@sender.test>\r\n")
        assert recv_reply(s).startswith(b"250")
        s.sendall(f"RCPT TO:<{address}>\r\n".encode())
        assert recv_reply(s).startswith(b"554 5.7.1"), address


def test_plaintext_after_starttls_is_discarded(
    tls_relay: tuple[RelayProcess, ssl.SSLContext],
) -> None:
    relay, ctx = tls_relay
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as raw:
        recv_reply(raw)
        raw.sendall(b"EHLO client.test\r\n")
        recv_reply(raw)
        # Injected plaintext after STARTTLS (CVE-2011-0411 style) must not be executed.
        raw.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        assert recv_reply(raw).startswith(b"220 ")
        tls = ctx.wrap_socket(raw, server_hostname="relay.test")
        tls.sendall(b"RCPT TO:<b@dest.test>\r\n")
        # Had the MAIL been executed, this would be a recipient reply, not a sequence error.
        assert recv_reply(tls).startswith(b"503")
        tls.sendall(b"QUIT\r\n")
        assert recv_reply(tls).startswith(b"221")


def test_idle_client_gets_421_after_command_timeout(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, inbound="command_timeout = 0.5")
    relay.start()
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            recv_reply(s)
            started = time.monotonic()
            reply = recv_reply(s)
            assert reply.startswith(b"421 4.4.2"), reply
            assert time.monotonic() - started < 4
            assert s.recv(10) == b""  # and the connection is closed
    finally:
        relay.stop()


def test_trickling_data_is_cut_off_by_min_data_rate(tmp_path: Path) -> None:
    relay = make_relay(tmp_path, inbound="min_data_rate = 1000\ndata_rate_window = 0.5")
    relay.start()
    try:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            recv_reply(s)
            s.sendall(b"EHLO c.test\r\nMAIL FROM:<a@s.test>\r\nRCPT TO:<b@d.test>\r\n")
            wait_for(lambda: recv_reply(s).count(b"250 ") >= 1, 5, "replies")
            s.sendall(b"DATA\r\n")
            reply = b""
            while b"354" not in reply:
                reply += recv_reply(s)
            s.setblocking(False)
            deadline = time.monotonic() + 8
            got = b""
            # One byte every 50 ms is 20 B/s, far below 1000 B/s.
            while time.monotonic() < deadline and b"421" not in got:
                try:
                    s.send(b"x")
                except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                    break
                with contextlib.suppress(BlockingIOError):
                    got += s.recv(4096)
                time.sleep(0.05)  # the trickle itself (the behaviour under test)
            assert b"421 4.4.2" in got, got
    finally:
        relay.stop()
