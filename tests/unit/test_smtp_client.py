"""The sans-I/O SMTP client: fed reply bytes, checked for the bytes it writes and the
per-recipient outcomes it reports. No sockets."""

from __future__ import annotations

import pytest

from relay.model import Envelope, Recipient
from relay.smtp.client import Phase, SmtpClient, crlf_lines, dot_stuff

EHLO_FULL = (
    b"250-mx.test Hello\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n250-STARTTLS\r\n250-DSN\r\n"
    b"250 ENHANCEDSTATUSCODES\r\n"
)
#: The same plus CHUNKING: the body then rides in the pipelined group as BDAT LAST.
EHLO_CHUNKING = EHLO_FULL.replace(b"250-DSN\r\n", b"250-DSN\r\n250-CHUNKING\r\n")
EHLO_PLAIN = b"250-mx.test\r\n250 8BITMIME\r\n"


def envelope(n: int = 2, **kw: object) -> Envelope:
    rcpts = kw.pop("recipients", None) or [
        Recipient(address=f"r{i}@dst.test") for i in range(n)
    ]
    return Envelope(queue_id="Q1", sender="s@src.test", recipients=rcpts,  # type: ignore[arg-type]
                    received_at=0.0, **kw)  # type: ignore[arg-type]


def ready(ehlo: bytes = EHLO_FULL) -> SmtpClient:
    c = SmtpClient("relay.test")
    assert c.receive_data(b"220 mx.test ESMTP\r\n") == b"EHLO relay.test\r\n"
    assert c.receive_data(ehlo) == b""
    assert c.phase is Phase.READY
    return c


def kinds(c: SmtpClient) -> list[tuple[int, str, int]]:
    return [(o.index, o.kind, o.code) for o in c.take_outcomes()]


# -- replies and handshake -------------------------------------------------------------


def test_greeting_and_ehlo_in_fragments_parse_multiline_extensions() -> None:
    c = SmtpClient("relay.test")
    out = b""
    for i in range(len(b"220 hi\r\n")):
        out += c.receive_data(b"220 hi\r\n"[i:i + 1])
    assert out == b"EHLO relay.test\r\n"
    for i in range(0, len(EHLO_CHUNKING), 7):
        assert c.receive_data(EHLO_CHUNKING[i:i + 7]) == b""
    assert c.usable and c.esmtp
    assert c.size_limit == 1000
    for ext in ("PIPELINING", "8BITMIME", "SMTPUTF8", "STARTTLS", "DSN", "CHUNKING",
                "ENHANCEDSTATUSCODES"):
        assert c.has(ext)


def test_ehlo_refused_falls_back_to_helo() -> None:
    c = SmtpClient("relay.test")
    c.receive_data(b"220 old.test\r\n")
    assert c.receive_data(b"502 5.5.2 what is EHLO\r\n") == b"HELO relay.test\r\n"
    c.receive_data(b"250 old.test\r\n")
    assert c.usable and not c.esmtp and c.extensions == {}


def test_helo_refused_fails_permanently() -> None:
    c = SmtpClient("relay.test")
    c.receive_data(b"220 x\r\n")
    c.receive_data(b"500 no\r\n")
    c.receive_data(b"550 5.7.1 go away\r\n")
    assert c.phase is Phase.FAILED and c.error is not None and c.error.code == 550


@pytest.mark.parametrize("greeting", [b"554 5.7.1 no service\r\n", b"421 busy\r\n"])
def test_refused_greeting(greeting: bytes) -> None:
    c = SmtpClient("relay.test")
    assert c.receive_data(greeting) == b""
    assert not c.usable and not c.awaiting_reply
    assert c.error is not None and c.error.code == int(greeting[:3])


@pytest.mark.parametrize("junk", [b"hello there\r\n", b"25\r\n", b"250x\r\n", b"650 x\r\n"])
def test_malformed_reply_is_a_protocol_error(junk: bytes) -> None:
    c = SmtpClient("relay.test")
    c.receive_data(junk)
    assert c.phase is Phase.FAILED and c.error is not None and c.error.status == "4.5.0"


def test_overlong_reply_line_is_a_protocol_error() -> None:
    c = SmtpClient("relay.test")
    c.receive_data(b"220 " + b"x" * 10000)
    assert c.phase is Phase.FAILED


def test_enhanced_status_parsed_and_stripped_from_every_line() -> None:
    c = ready()
    c.begin_transaction(envelope(1), [0], b"x\r\n")
    c.receive_data(b"250 2.1.0 Ok\r\n550-5.1.1 no such\r\n550 5.1.1 user here\r\n"
                   b"554 5.5.1 no valid recipients\r\n")
    [o] = c.take_outcomes()
    assert (o.code, o.enhanced, o.text) == (550, "5.1.1", "no such user here")
    assert o.reply_line == "550 5.1.1 no such user here"
    assert o.kind == "permanent"


def test_starttls_then_reset_extensions_and_ehlo_again() -> None:
    c = ready()
    assert c.starttls() == b"STARTTLS\r\n"
    c.receive_data(b"220 2.0.0 go ahead\r\n")
    assert c.phase is Phase.TLS
    assert c.tls_established() == b"EHLO relay.test\r\n"
    assert c.extensions == {}
    c.receive_data(b"250-mx.test\r\n250 PIPELINING\r\n")
    assert c.usable and c.tls_active and "STARTTLS" not in c.extensions


def test_starttls_refused_stays_plaintext_ready() -> None:
    c = ready()
    c.starttls()
    c.receive_data(b"454 4.7.0 TLS not available\r\n")
    assert c.usable and c.starttls_refused is not None and c.starttls_refused.code == 454


def test_data_injected_after_starttls_220_is_refused() -> None:
    c = ready()
    c.starttls()
    c.receive_data(b"220 go ahead\r\n250 injected\r\n")
    assert c.phase is Phase.FAILED


# -- transactions ------------------------------------------------------------------------


def test_pipelined_group_is_one_write_and_replies_match_in_order() -> None:
    c = ready()
    out = c.begin_transaction(envelope(3), [0, 1, 2], b"Subject: x\r\n\r\nhi\r\n")
    assert out == (
        b"MAIL FROM:<s@src.test> SIZE=18\r\n"
        b"RCPT TO:<r0@dst.test>\r\nRCPT TO:<r1@dst.test>\r\nRCPT TO:<r2@dst.test>\r\n"
        b"DATA\r\n"
    )
    body = c.receive_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n450 4.2.1 busy\r\n"
                          b"550 5.1.1 unknown\r\n354 go\r\n")
    assert body == b"Subject: x\r\n\r\nhi\r\n.\r\n"
    assert c.awaiting_end_of_data
    assert c.receive_data(b"250 2.0.0 queued as X\r\n") == b""
    assert kinds(c) == [(0, "delivered", 250), (1, "transient", 450), (2, "permanent", 550)]
    assert c.usable and c.transactions == 1


def test_pipelined_replies_split_across_reads() -> None:
    c = ready()
    c.begin_transaction(envelope(2), [0, 1], b"x\r\n")
    stream = b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n"
    out = b"".join(c.receive_data(stream[i:i + 3]) for i in range(0, len(stream), 3))
    assert out == b"x\r\n.\r\n"
    c.receive_data(b"250 ok\r\n")
    assert [o.kind for o in c.take_outcomes()] == ["delivered", "delivered"]


def test_without_pipelining_commands_go_one_at_a_time() -> None:
    c = ready(EHLO_PLAIN)
    assert c.begin_transaction(envelope(2), [0, 1], b"x\r\n") == b"MAIL FROM:<s@src.test>\r\n"
    assert c.receive_data(b"250 ok\r\n") == b"RCPT TO:<r0@dst.test>\r\n"
    assert c.receive_data(b"550 no\r\n") == b"RCPT TO:<r1@dst.test>\r\n"
    assert c.receive_data(b"250 ok\r\n") == b"DATA\r\n"
    assert c.receive_data(b"354 go\r\n") == b"x\r\n.\r\n"
    assert c.receive_data(b"250 ok\r\n") == b""
    assert kinds(c) == [(0, "permanent", 550), (1, "delivered", 250)]


def test_without_pipelining_all_rcpts_refused_skips_data_and_rsets_next_time() -> None:
    c = ready(EHLO_PLAIN)
    c.begin_transaction(envelope(1), [0], b"x\r\n")
    c.receive_data(b"250 ok\r\n")
    assert c.receive_data(b"550 no\r\n") == b""
    assert not c.awaiting_reply
    assert kinds(c) == [(0, "permanent", 550)]
    assert c.begin_transaction(envelope(1), [0], b"x\r\n") == b"RSET\r\n"
    assert c.receive_data(b"250 ok\r\n") == b"MAIL FROM:<s@src.test>\r\n"


def test_mail_refused_applies_to_all_pipelined() -> None:
    c = ready()
    c.begin_transaction(envelope(2), [0, 1], b"x\r\n")
    assert c.receive_data(b"553 5.7.1 sender rejected\r\n503 5.5.1 need MAIL\r\n"
                          b"503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n") == b""
    assert kinds(c) == [(0, "permanent", 553), (1, "permanent", 553)]
    # The failed transaction is reset, pipelined in front of the next one.
    assert c.begin_transaction(envelope(1), [0], b"x\r\n").startswith(b"RSET\r\nMAIL FROM")


def test_data_refused_applies_to_accepted_recipients_only() -> None:
    c = ready()
    c.begin_transaction(envelope(2), [0, 1], b"x\r\n")
    c.receive_data(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n451 4.3.0 try later\r\n")
    assert kinds(c) == [(0, "transient", 451), (1, "permanent", 550)]


def test_354_after_all_rcpts_failed_sends_lone_dot() -> None:
    c = ready()
    c.begin_transaction(envelope(1), [0], b"secret body\r\n")
    out = c.receive_data(b"250 ok\r\n550 no\r\n354 go ahead\r\n")
    assert out == b".\r\n"
    c.receive_data(b"554 no valid recipients\r\n")
    assert kinds(c) == [(0, "permanent", 550)]
    assert c.usable


def test_end_of_data_rejection_is_permanent_for_accepted() -> None:
    c = ready()
    c.begin_transaction(envelope(2), [0, 1], b"x\r\n")
    c.receive_data(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    c.receive_data(b"554 5.7.1 spam\r\n")
    assert kinds(c) == [(0, "permanent", 554), (1, "permanent", 554)]


def test_421_mid_transaction_makes_in_flight_transient() -> None:
    c = ready()
    c.begin_transaction(envelope(3), [0, 1, 2], b"x\r\n")
    c.receive_data(b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n421 4.3.2 shutting down\r\n")
    assert kinds(c) == [(0, "transient", 421), (1, "permanent", 550), (2, "transient", 421)]
    assert not c.usable and c.phase is Phase.CLOSED


def test_421_after_body_makes_accepted_transient() -> None:
    c = ready()
    c.begin_transaction(envelope(1), [0], b"x\r\n")
    c.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    c.receive_data(b"421 4.4.2 timeout\r\n")
    assert kinds(c) == [(0, "transient", 421)]
    assert not c.usable


def test_connection_lost_mid_transaction() -> None:
    c = ready()
    c.begin_transaction(envelope(2), [0, 1], b"x\r\n")
    c.receive_data(b"250 ok\r\n550 5.1.1 unknown\r\n")
    c.connection_lost(421, "4.4.2", "lost connection while sending RCPT TO")
    outs = c.take_outcomes()
    assert [(o.kind, o.code) for o in outs] == [("permanent", 550), ("transient", 421)]
    assert outs[1].text == "lost connection while sending RCPT TO"
    assert not c.usable and not c.awaiting_reply


def test_unsolicited_421_while_idle_closes() -> None:
    c = ready()
    c.receive_data(b"421 4.4.2 idle timeout\r\n")
    assert c.phase is Phase.CLOSED and not c.usable


def test_quit() -> None:
    c = ready()
    assert c.quit() == b"QUIT\r\n"
    c.receive_data(b"221 2.0.0 bye\r\n")
    assert c.phase is Phase.CLOSED and c.quit() == b""


# -- the next transaction behind the end of data (RFC 2920 3.1) ---------------------------


def _body_sent(c: SmtpClient, n: int = 1, data: bytes = b"a\r\n") -> None:
    """Begin a transaction of ``n`` recipients and answer up to its 354."""
    c.begin_transaction(envelope(n), list(range(n)), data)
    assert c.receive_data(b"250 ok\r\n" * (n + 1) + b"354 go\r\n") == dot_stuff(data)


def test_next_transaction_rides_behind_the_end_of_data() -> None:
    c = ready()
    assert not c.can_begin_behind  # nothing in flight
    c.begin_transaction(envelope(1), [0], b"a\r\n")
    assert not c.can_begin_behind  # its body has not been sent yet
    assert c.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n") == b"a\r\n.\r\n"
    assert c.can_begin_behind
    out = c.begin_transaction(envelope(2), [0, 1], b"b\r\n")
    assert out == (b"MAIL FROM:<s@src.test> SIZE=3\r\n"
                   b"RCPT TO:<r0@dst.test>\r\nRCPT TO:<r1@dst.test>\r\nDATA\r\n")
    assert not c.can_begin_behind  # one behind at most
    assert c.transactions == 2
    # The server answers the first dot and the second group in one flight.
    body = c.receive_data(b"250 2.0.0 queued A\r\n250 ok\r\n250 ok\r\n"
                          b"550 5.1.1 unknown\r\n354 go\r\n")
    assert body == b"b\r\n.\r\n"
    assert c.transaction_done
    assert kinds(c) == [(0, "delivered", 250)]
    assert not c.transaction_done and c.awaiting_end_of_data
    c.receive_data(b"250 2.0.0 queued B\r\n")
    assert kinds(c) == [(0, "delivered", 250), (1, "permanent", 550)]
    assert c.usable and not c.awaiting_reply


@pytest.mark.parametrize(("ehlo", "replies"), [
    (EHLO_PLAIN, [b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"]),  # one at a time
    (EHLO_CHUNKING, [b"250 ok\r\n250 ok\r\n"]),  # BDAT LAST: one round trip already
], ids=["without-pipelining", "with-chunking"])
def test_no_transaction_behind_without_pipelining_or_with_chunking(
        ehlo: bytes, replies: list[bytes]) -> None:
    c = ready(ehlo)
    c.begin_transaction(envelope(1), [0], b"a\r\n")
    for reply in replies:
        c.receive_data(reply)
    assert c.awaiting_end_of_data and c.phase is Phase.TRANSACTION
    assert not c.can_begin_behind
    with pytest.raises(RuntimeError):
        c.begin_transaction(envelope(1), [0], b"b\r\n")


def test_rejected_end_of_data_does_not_disturb_the_transaction_behind() -> None:
    c = ready()
    _body_sent(c)
    c.begin_transaction(envelope(1), [0], b"b\r\n")
    assert c.receive_data(b"554 5.7.1 spam\r\n250 ok\r\n250 ok\r\n354 go\r\n") == \
        b"b\r\n.\r\n"
    c.receive_data(b"250 ok\r\n")
    assert kinds(c) == [(0, "permanent", 554)]
    assert kinds(c) == [(0, "delivered", 250)]
    # No RSET was owed: the next transaction starts with MAIL.
    assert c.begin_transaction(envelope(1), [0], b"c\r\n").startswith(b"MAIL FROM:")


def test_421_or_lost_connection_settles_both_transactions_in_order() -> None:
    c = ready()
    _body_sent(c, 2)
    c.begin_transaction(envelope(1), [0], b"b\r\n")
    c.receive_data(b"421 4.3.2 shutting down\r\n")
    assert kinds(c) == [(0, "transient", 421), (1, "transient", 421)]
    assert kinds(c) == [(0, "transient", 421)]
    assert not c.usable and not c.transaction_done

    c = ready()
    _body_sent(c)
    c.begin_transaction(envelope(1), [0], b"b\r\n")
    c.receive_data(b"250 ok\r\n250 ok\r\n")  # A delivered; B's MAIL accepted
    c.connection_lost(421, "4.4.2", "lost connection")
    assert kinds(c) == [(0, "delivered", 250)]
    assert kinds(c) == [(0, "transient", 421)]


def test_transaction_behind_that_fails_preflight_comes_after_the_current_one() -> None:
    c = ready()  # SIZE 1000
    _body_sent(c)
    assert c.begin_transaction(envelope(1), [0], b"x" * 1001) == b""
    assert not c.transaction_done  # the current one is still waiting for its reply
    c.receive_data(b"250 ok\r\n")
    assert kinds(c) == [(0, "delivered", 250)]
    assert kinds(c) == [(0, "permanent", 552)]
    assert c.phase is Phase.READY and c.transactions == 1


# -- preflight checks and MAIL/RCPT parameters -------------------------------------------


def test_message_bigger_than_server_size_fails_without_sending() -> None:
    c = ready()  # SIZE 1000
    assert c.begin_transaction(envelope(2), [0, 1], b"x" * 1001) == b""
    assert not c.awaiting_reply
    outs = c.take_outcomes()
    assert {(o.code, o.enhanced, o.kind) for o in outs} == {(552, "5.3.4", "permanent")}
    assert c.usable and c.transactions == 0


def test_size_zero_means_unlimited() -> None:
    c = ready(b"250-mx.test\r\n250 SIZE 0\r\n")
    out = c.begin_transaction(envelope(1), [0], b"x" * 5000)
    assert out == b"MAIL FROM:<s@src.test> SIZE=5000\r\n"


def test_8bit_body_param_when_offered() -> None:
    c = ready()
    out = c.begin_transaction(envelope(1, body="8BITMIME"), [0], "é\r\n".encode())
    assert b"MAIL FROM:<s@src.test> SIZE=4 BODY=8BITMIME\r\n" in out


def test_8bit_message_to_server_without_8bitmime_bounces_5_6_3() -> None:
    c = ready(b"250-mx\r\n250 PIPELINING\r\n")
    assert c.begin_transaction(envelope(1, body="8BITMIME"), [0], "é\r\n".encode()) == b""
    [o] = c.take_outcomes()
    assert (o.code, o.enhanced, o.kind) == (554, "5.6.3", "permanent")


def test_declared_8bit_but_ascii_content_is_sent_without_body_param() -> None:
    c = ready(b"250-mx\r\n250 PIPELINING\r\n")
    out = c.begin_transaction(envelope(1, body="8BITMIME"), [0], b"plain\r\n")
    assert out.startswith(b"MAIL FROM:<s@src.test>\r\n")


def test_smtputf8_needed_but_not_offered_fails_5_6_7() -> None:
    c = ready(b"250-mx\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
    env = envelope(recipients=[Recipient(address="jürgen@dst.test")], smtputf8=True)
    assert c.begin_transaction(env, [0], b"x\r\n") == b""
    [o] = c.take_outcomes()
    assert (o.code, o.enhanced, o.kind) == (554, "5.6.7", "permanent")


def test_smtputf8_flag_but_ascii_only_is_sent_without_it() -> None:
    c = ready(b"250-mx\r\n250 PIPELINING\r\n")
    out = c.begin_transaction(envelope(1, smtputf8=True), [0], b"Subject: x\r\n\r\n\xc3\xa9\r\n")
    assert out.startswith(b"MAIL FROM:<s@src.test>\r\n")


def test_smtputf8_param_and_utf8_addresses_when_offered() -> None:
    c = ready()
    env = envelope(recipients=[Recipient(address="jürgen@dst.test")], smtputf8=True)
    out = c.begin_transaction(env, [0], b"x\r\n")
    assert b" SMTPUTF8\r\n" in out
    assert "RCPT TO:<jürgen@dst.test>\r\n".encode() in out


def test_dsn_params_passed_when_offered() -> None:
    c = ready()
    env = envelope(
        recipients=[Recipient(address="a@dst.test", notify=["SUCCESS", "FAILURE"],
                              orcpt="rfc822;a+b=c@dst.test")],
        ret="HDRS", envid="id 1+",
    )
    out = c.begin_transaction(env, [0], b"x\r\n")
    assert b"MAIL FROM:<s@src.test> SIZE=3 RET=HDRS ENVID=id+201+2B\r\n" in out
    assert b"RCPT TO:<a@dst.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a+2Bb+3Dc@dst.test\r\n" in out


def test_dsn_params_dropped_when_not_offered() -> None:
    c = ready(b"250-mx\r\n250 PIPELINING\r\n")
    env = envelope(recipients=[Recipient(address="a@dst.test", notify=["NEVER"],
                                         orcpt="rfc822;a@dst.test")], ret="FULL", envid="x")
    out = c.begin_transaction(env, [0], b"x\r\n")
    assert out == b"MAIL FROM:<s@src.test>\r\nRCPT TO:<a@dst.test>\r\nDATA\r\n"


def test_crlf_in_recipient_is_refused_not_injected() -> None:
    c = ready()
    env = envelope(recipients=[Recipient(address="a@dst.test>\r\nRSET"),
                               Recipient(address="b@dst.test")])
    out = c.begin_transaction(env, [0, 1], b"x\r\n")
    assert b"RSET" not in out and out.count(b"RCPT") == 1
    c.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    c.receive_data(b"250 ok\r\n")
    assert kinds(c) == [(0, "permanent", 553), (1, "delivered", 250)]


def test_only_the_requested_recipients_in_given_order() -> None:
    c = ready()
    out = c.begin_transaction(envelope(4), [3, 1], b"x\r\n")
    assert out.index(b"r3@") < out.index(b"r1@") and b"r0@" not in out
    c.receive_data(b"250 ok\r\n250 ok\r\n550 no\r\n354 go\r\n250 ok\r\n")
    assert kinds(c) == [(3, "delivered", 250), (1, "permanent", 550)]


# -- dot-stuffing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "wire"),
    [
        (b"a\r\n.b\r\n", b"a\r\n..b\r\n.\r\n"),
        (b".leading\r\n", b"..leading\r\n.\r\n"),
        (b"a\r\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"no final crlf", b"no final crlf\r\n.\r\n"),
        (b"ends with dot\r\n.", b"ends with dot\r\n..\r\n.\r\n"),
        (b"", b".\r\n"),
        (b"\r\n", b"\r\n.\r\n"),
        (b"..two\r\n", b"...two\r\n.\r\n"),
    ],
)
def test_dot_stuff(body: bytes, wire: bytes) -> None:
    assert dot_stuff(body) == wire
    # Round trip: the receiver's unstuffing gives the body back (plus a final CRLF).
    received = wire[: -len(b".\r\n")]
    if received.startswith(b"."):
        received = received[1:]
    received = received.replace(b"\r\n..", b"\r\n.")
    assert received == (body if body.endswith(b"\r\n") or not body else body + b"\r\n")


# -- CHUNKING (RFC 3030) -------------------------------------------------------------------


def test_chunking_sends_the_body_as_bdat_last_in_the_pipelined_group() -> None:
    c = ready(EHLO_CHUNKING)
    body = b"Subject: x\r\n\r\n.starts with a dot\r\n"
    out = c.begin_transaction(envelope(2), [0, 1], body)
    assert out == (
        b"MAIL FROM:<s@src.test> SIZE=%d\r\n" % len(body)
        + b"RCPT TO:<r0@dst.test>\r\nRCPT TO:<r1@dst.test>\r\n"
        + b"BDAT %d LAST\r\n" % len(body) + body  # raw: no dot-stuffing, no terminator
    )
    assert c.awaiting_reply and not c.awaiting_end_of_data
    c.receive_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 unknown\r\n")
    assert c.awaiting_end_of_data  # data_timeout applies to the chunk's reply
    assert c.receive_data(b"250 2.0.0 queued as X\r\n") == b""
    assert kinds(c) == [(0, "delivered", 250), (1, "permanent", 550)]
    assert c.usable
    # A successful BDAT LAST ends the transaction cleanly: no RSET before the next one.
    assert c.begin_transaction(envelope(1), [0], b"x\r\n").startswith(b"MAIL FROM:")


def test_chunking_appends_a_final_crlf() -> None:
    c = ready(EHLO_CHUNKING)
    out = c.begin_transaction(envelope(1), [0], b"Subject: x\r\n\r\nno newline")
    assert out.endswith(b"BDAT 26 LAST\r\nSubject: x\r\n\r\nno newline\r\n")


def test_chunking_every_rcpt_refused_keeps_rcpt_outcomes_and_rsets_next() -> None:
    c = ready(EHLO_CHUNKING)
    c.begin_transaction(envelope(2), [0, 1], b"hi\r\n")
    c.receive_data(b"250 2.1.0 Ok\r\n550 5.1.1 no\r\n450 4.2.1 later\r\n"
                   b"554 5.5.1 Error: no valid recipients\r\n")
    assert kinds(c) == [(0, "permanent", 550), (1, "transient", 450)]
    assert c.begin_transaction(envelope(1), [0], b"x\r\n").startswith(b"RSET\r\nMAIL FROM:")


def test_chunking_refused_chunk_fails_the_accepted_recipients() -> None:
    c = ready(EHLO_CHUNKING)
    c.begin_transaction(envelope(2), [0, 1], b"hi\r\n")
    c.receive_data(b"250 Ok\r\n250 Ok\r\n250 Ok\r\n451 4.3.0 queue trouble\r\n")
    assert kinds(c) == [(0, "transient", 451), (1, "transient", 451)]


def test_chunking_mail_refused_settles_everyone_with_the_mail_reply() -> None:
    c = ready(EHLO_CHUNKING)
    c.begin_transaction(envelope(2), [0, 1], b"hi\r\n")
    c.receive_data(b"553 5.1.8 sender rejected\r\n503 5.5.1 need MAIL\r\n"
                   b"503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n")
    assert kinds(c) == [(0, "permanent", 553), (1, "permanent", 553)]


def test_chunking_is_not_used_without_pipelining() -> None:
    c = ready(b"250-mx.test\r\n250 CHUNKING\r\n")
    assert c.begin_transaction(envelope(1), [0], b"hi\r\n") == b"MAIL FROM:<s@src.test>\r\n"


# -- hostile servers and hostile content ---------------------------------------------------


@pytest.mark.parametrize("size", ["²", "١٢٣", "\uff11\uff10", "-5", "1e9", "9" * 40])
def test_size_keyword_that_is_not_ascii_digits_means_no_limit(size: str) -> None:
    """``'²'.isdigit()`` is True and ``int('²')`` raises: a server's EHLO reply must not
    crash the delivering worker; an unreadable SIZE is treated as no limit announced."""
    ehlo = f"250-mx.test\r\n250-PIPELINING\r\n250 SIZE {size}\r\n".encode()
    c = ready(ehlo)
    assert c.size_limit == 0
    out = c.begin_transaction(envelope(1), [0], b"x\r\n")
    assert out.startswith(b"MAIL FROM:<s@src.test> SIZE=3\r\n")


#: Every end-of-data lookalike that some server has honoured (SMTP smuggling, 2023).
LOOKALIKES = [
    b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n", b"\r\n.\r", b"\n.\r",
    b"\r.\n", b"\n\r.\r\n", b"\r\n\n.\n", b"\r\n.\r\r\n", b"\n..\n", b"\r\r\n.\r\r\n",
]


def _data_on_the_wire(c: SmtpClient, data: bytes) -> bytes:
    c.begin_transaction(envelope(1), [0], data)
    return c.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")


@pytest.mark.parametrize("fake_end", LOOKALIKES)
def test_no_end_of_data_lookalike_leaves_over_data(fake_end: bytes) -> None:
    """Whatever the spool holds (an old spool, a future intake path), what goes out
    after 354 is CRLF lines with one terminator, at the end."""
    c = ready()
    wire = _data_on_the_wire(c, b"Subject: x\r\n\r\nbody" + fake_end + b"MAIL FROM:<x@y>\r\n")
    assert wire.endswith(b"\r\n.\r\n")
    assert wire.count(b"\n") == wire.count(b"\r\n") == wire.count(b"\r")
    assert wire.find(b"\r\n.\r\n") == len(wire) - 5
    assert b"\r\nMAIL FROM:<x@y>\r\n" in wire  # content kept, as an ordinary line


@pytest.mark.parametrize("fake_end", LOOKALIKES)
def test_bdat_body_is_sent_as_crlf_lines_and_size_counts_them(fake_end: bytes) -> None:
    c = ready(EHLO_CHUNKING)
    body = b"a" + fake_end + b"b\r\n"
    out = c.begin_transaction(envelope(1), [0], body)
    sent = out.split(b" LAST\r\n", 1)[1]
    assert sent.count(b"\n") == sent.count(b"\r\n") == sent.count(b"\r")
    assert f"BDAT {len(sent)} LAST".encode() in out
    assert f"SIZE={len(sent)}".encode() in out


def test_clean_content_is_not_copied() -> None:
    data = b"Subject: x\r\n\r\nok\r\n"
    assert crlf_lines(data) is data


# -- mail loops (RFC 5321 6.3) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "server",
    [
        b"220 relay.test ESMTP\r\n",
        b"220 RELAY.TEST. ready\r\n",
        b"220 mx.other.test\r\n250-relay.test says hello\r\n250 PIPELINING\r\n",
    ],
)
def test_a_server_that_names_me_is_a_mail_loop(server: bytes) -> None:
    c = SmtpClient("relay.test")
    c.receive_data(server)
    assert c.phase is Phase.FAILED
    assert c.error is not None and (c.error.code, c.error.status) == (554, "5.4.6")
    assert "mail loops back to myself" in c.error.text


def test_a_server_with_a_name_like_mine_is_not_a_loop() -> None:
    c = SmtpClient("relay.test")
    assert c.receive_data(b"220 relay.test.example ESMTP\r\n") == b"EHLO relay.test\r\n"
    c.receive_data(b"250-mx.relay.test\r\n250 PIPELINING\r\n")
    assert c.phase is Phase.READY


# -- ambiguous outcomes (lost after the end of data) ----------------------------------------


@pytest.mark.parametrize(("ehlo", "replies", "ambiguous"), [
    (EHLO_FULL, b"250 ok\r\n250 ok\r\n354 go\r\n", True),     # body sent, dot reply owed
    (EHLO_FULL, b"250 ok\r\n250 ok\r\n", False),              # DATA not even answered
    (EHLO_CHUNKING, b"250 ok\r\n250 ok\r\n", True),           # BDAT LAST reply owed
    (EHLO_CHUNKING, b"250 ok\r\n", False),                    # RCPT reply still owed
])
def test_a_connection_lost_after_the_end_of_data_is_ambiguous(
    ehlo: bytes, replies: bytes, ambiguous: bool
) -> None:
    c = ready(ehlo)
    c.begin_transaction(envelope(1), [0], b"x\r\n")
    c.receive_data(replies)
    c.connection_lost(421, "4.4.2", "lost connection while sending end of data")
    [o] = c.take_outcomes()
    assert (o.kind, o.ambiguous) == ("transient", ambiguous)


def test_a_421_reply_to_the_end_of_data_is_not_ambiguous() -> None:
    c = ready()
    c.begin_transaction(envelope(1), [0], b"x\r\n")
    c.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n421 4.3.0 shutting down\r\n")
    [o] = c.take_outcomes()
    assert (o.code, o.ambiguous) == (421, False)
