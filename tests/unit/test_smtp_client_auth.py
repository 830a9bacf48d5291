"""The sans-I/O client's AUTH exchange (RFC 4954): PLAIN as an initial response, LOGIN
over two challenges, refusals, and the cases where nothing may be sent at all (no TLS,
no AUTH offered, no mechanism in common). Fed reply bytes; no sockets."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.model import Envelope, Recipient
from relay.smtp.client import Credentials, Phase, SmtpClient

ALICE = Credentials("alice@example.test", "s3cret pässword")
B64_PASSWORD = base64.b64encode("s3cret pässword".encode())


def ehlo(*auth_lines: bytes) -> bytes:
    lines = [b"250-smtp.provider.test", b"250-PIPELINING", *auth_lines, b"250 8BITMIME"]
    return b"\r\n".join(lines) + b"\r\n"


def encrypted(ehlo_after_tls: bytes) -> SmtpClient:
    """A client READY after STARTTLS, knowing only what the encrypted EHLO said."""
    c = SmtpClient("relay.test")
    c.receive_data(b"220 smtp.provider.test ESMTP\r\n")
    c.receive_data(ehlo(b"250-STARTTLS"))
    assert c.starttls() == b"STARTTLS\r\n"
    c.receive_data(b"220 2.0.0 go ahead\r\n")
    assert c.tls_established() == b"EHLO relay.test\r\n"
    c.receive_data(ehlo_after_tls)
    assert c.phase is Phase.READY and c.tls_active
    return c


def envelope() -> Envelope:
    return Envelope(queue_id="Q1", sender="s@src.test",
                    recipients=[Recipient(address="r@dst.test")], received_at=0.0)


def test_plain_is_one_initial_response_and_235_authenticates() -> None:
    c = encrypted(ehlo(b"250-AUTH LOGIN PLAIN CRAM-MD5"))
    out = c.auth(ALICE)
    assert out.startswith(b"AUTH PLAIN ") and out.endswith(b"\r\n")
    assert base64.b64decode(out[11:-2]) == "\0alice@example.test\0s3cret pässword".encode()
    assert c.phase is Phase.AUTH and c.awaiting_reply and not c.usable
    assert c.receive_data(b"235 2.7.0 Authentication successful\r\n") == b""
    assert c.authenticated and c.auth_refused is None and c.phase is Phase.READY
    # Mail may follow on the authenticated connection.
    assert c.begin_transaction(envelope(), [0], b"Subject: x\r\n\r\nbody\r\n").startswith(
        b"MAIL FROM:<s@src.test>")


def test_login_answers_each_challenge_in_turn() -> None:
    c = encrypted(ehlo(b"250-AUTH LOGIN"))
    assert c.auth(ALICE) == b"AUTH LOGIN\r\n"
    assert c.receive_data(b"334 VXNlcm5hbWU6\r\n") == (
        base64.b64encode(b"alice@example.test") + b"\r\n")
    assert c.phase is Phase.AUTH
    assert c.receive_data(b"334 UGFzc3dvcmQ6\r\n") == B64_PASSWORD + b"\r\n"
    assert c.receive_data(b"235 2.7.0 ok\r\n") == b""
    assert c.authenticated and c.usable


def test_a_challenge_beyond_the_mechanism_cancels_it() -> None:
    c = encrypted(ehlo(b"250-AUTH LOGIN"))
    c.auth(ALICE)
    c.receive_data(b"334 VXNlcm5hbWU6\r\n")
    c.receive_data(b"334 UGFzc3dvcmQ6\r\n")
    assert c.receive_data(b"334 bW9yZT8=\r\n") == b"*\r\n"  # RFC 4954 4: cancel
    c.receive_data(b"501 5.7.0 Authentication aborted\r\n")
    assert not c.authenticated and c.auth_refused is not None
    assert c.auth_refused.code == 501 and c.usable


def test_pre_rfc_auth_equals_form_is_understood() -> None:
    c = encrypted(ehlo(b"250-AUTH=LOGIN"))
    assert c.auth_mechanisms == {"LOGIN"}
    assert c.auth(ALICE) == b"AUTH LOGIN\r\n"


def test_535_is_kept_and_the_client_is_ready_again() -> None:
    c = encrypted(ehlo(b"250-AUTH PLAIN LOGIN"))
    c.auth(ALICE)
    assert c.receive_data(b"535 5.7.8 Error: authentication failed\r\n") == b""
    assert not c.authenticated and c.phase is Phase.READY
    refused = c.auth_refused
    assert refused is not None and (refused.code, refused.status) == (535, "5.7.8")
    assert c.quit() == b"QUIT\r\n"  # the driver may still end the session politely


def test_421_during_auth_closes_the_session() -> None:
    c = encrypted(ehlo(b"250-AUTH PLAIN"))
    c.auth(ALICE)
    c.receive_data(b"421 4.3.2 shutting down\r\n")
    assert c.phase is Phase.CLOSED and not c.authenticated
    assert c.error is not None and c.error.code == 421


def test_no_auth_offered_sends_nothing() -> None:
    c = encrypted(ehlo())
    assert c.auth(ALICE) == b""
    assert c.auth_unavailable is not None and c.auth_unavailable.status == "4.7.0"
    assert "offers no AUTH" in c.auth_unavailable.lines[0]
    assert c.phase is Phase.READY and not c.awaiting_reply and not c.authenticated


def test_no_mechanism_in_common_sends_nothing() -> None:
    c = encrypted(ehlo(b"250-AUTH CRAM-MD5 XOAUTH2"))
    assert c.auth(ALICE) == b""
    unavailable = c.auth_unavailable
    assert unavailable is not None and unavailable.status == "4.7.0"
    assert "CRAM-MD5 XOAUTH2" in unavailable.lines[0]


def test_never_over_plaintext_even_if_offered() -> None:
    c = SmtpClient("relay.test")
    c.receive_data(b"220 smtp.provider.test ESMTP\r\n")
    c.receive_data(ehlo(b"250-AUTH PLAIN LOGIN"))  # a server offering AUTH in plaintext
    assert c.usable and not c.tls_active
    assert c.auth(ALICE) == b""
    assert c.auth_unavailable is not None and c.auth_unavailable.status == "4.7.11"
    assert not c.awaiting_reply


def test_auth_needs_a_ready_client() -> None:
    c = SmtpClient("relay.test")  # still waiting for the greeting
    with pytest.raises(RuntimeError):
        c.auth(ALICE)


def test_the_password_is_in_no_text_and_not_kept_after_a_refusal() -> None:
    assert "s3cret" not in repr(ALICE)
    c = encrypted(ehlo(b"250-AUTH LOGIN"))
    c.auth(ALICE)
    c.receive_data(b"334 VXNlcm5hbWU6\r\n")
    # Refused after the username: the password was never sent, and is not held either.
    c.receive_data(b"535 5.7.8 no such user\r\n")
    assert c.auth_refused is not None and not c._auth_responses
    assert c.quit() == b"QUIT\r\n"
    c.connection_lost(421, "4.4.2", "lost connection")
    for text in (repr(c.error), repr(c.auth_refused), c.activity):
        assert "s3cret" not in text and B64_PASSWORD.decode() not in text


_REPLIES = st.sampled_from([
    b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n", b"334 \r\n", b"235 2.7.0 ok\r\n",
    b"535 5.7.8 bad\r\n", b"454 4.7.0 try later\r\n", b"421 4.3.2 bye\r\n",
    b"250-multi\r\n", b"250 line\r\n", b"999 nonsense\r\n", b"hello\r\n", b"\r\n",
])


@settings(max_examples=200, deadline=None)
@given(mechanism=st.sampled_from([b"250-AUTH PLAIN", b"250-AUTH LOGIN"]),
       replies=st.lists(_REPLIES, max_size=6), cut=st.integers(0, 40))
def test_any_server_replies_end_the_exchange_cleanly(mechanism: bytes, replies: list[bytes],
                                                     cut: int) -> None:
    """Whatever the server answers (and however it is split), receive_data never raises,
    the exchange ends in a known state, and the password shows in no reply kept."""
    c = encrypted(ehlo(mechanism))
    sent = [c.auth(ALICE)]
    stream = b"".join(replies)
    for piece in (stream[:cut], stream[cut:]):
        sent.append(c.receive_data(piece))
    assert all(isinstance(s, bytes) for s in sent)
    assert c.phase in (Phase.READY, Phase.AUTH, Phase.CLOSED, Phase.FAILED)
    if c.phase is Phase.READY:
        assert c.authenticated != (c.auth_refused is not None)
    if c.phase is not Phase.AUTH:
        assert not c._auth_responses  # no password held once the exchange is over
    c.connection_lost()
    assert c.phase in (Phase.CLOSED, Phase.FAILED) and not c.awaiting_reply
    for kept in (c.error, c.auth_refused):
        assert kept is None or "s3cret" not in repr(kept)
