"""Property tests for the sans-I/O server: chunking independence and robustness.

* A valid session (EHLO, transactions by DATA and BDAT with bodies full of dot lines,
  RSET, NOOP, QUIT) gives identical events and identical reply bytes whether it arrives in
  one piece or split at arbitrary byte boundaries, and every message arrives intact.
* Arbitrary bytes (random, and random mixes of protocol fragments) never raise out of the
  core, always produce well-formed replies, and never grow the internal buffers beyond
  a fixed bound.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.smtp import NEED_DATA, MessageReceived, Reply, ServerConnection, ServerSettings
from relay.smtp.server import AUTH_LINE_MAX, _has_long_run
from tests.unit.test_smtp_server import Driver

HOST = "relay.example"
FAST = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# -- valid sessions -----------------------------------------------------------------------

_line_chars = st.sampled_from(
    [b"a", b"Z", b"0", b" ", b".", b":", b"-", b"\t", b"\xc3\xa9", b"\xff", b"="]
)
_line = st.lists(_line_chars, max_size=40).map(b"".join)
_body_lines = st.lists(
    st.one_of(_line, st.just(b"."), st.just(b".."), _line.map(lambda s: b"." + s)),
    max_size=12,
)
_local = st.from_regex(r"[a-z0-9][a-z0-9.+_-]{0,10}[a-z0-9]", fullmatch=True).filter(
    lambda s: ".." not in s
)
_address = st.builds(lambda lp, d: f"{lp}@{d}.example", _local, st.sampled_from(["a", "b", "c"]))


@st.composite
def transactions(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    """One MAIL/RCPT/body transaction: (wire bytes, expected message data)."""
    sender = draw(st.one_of(st.just(""), _address))
    rcpts = draw(st.lists(_address, min_size=1, max_size=4))
    lines = draw(_body_lines)
    body = b"".join(line + b"\r\n" for line in lines)
    wire = f"MAIL FROM:<{sender}>\r\n".encode()
    wire += b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in rcpts)
    if draw(st.booleans()):
        stuffed = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
        wire += b"DATA\r\n" + stuffed + b".\r\n"
    else:
        cuts = sorted(draw(st.sets(st.integers(0, len(body)), max_size=4)))
        pieces = [body[i:j] for i, j in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        explicit_empty_last = draw(st.booleans())
        for n, piece in enumerate(pieces):
            last = n == len(pieces) - 1 and not explicit_empty_last
            wire += b"BDAT %d%s\r\n" % (len(piece), b" LAST" if last else b"") + piece
        if explicit_empty_last:
            wire += b"BDAT 0 LAST\r\n"
    if draw(st.integers(0, 5)) == 0:  # abandoned before the end
        cut = wire.index(b"\r\n") + 2
        return wire[:cut] + b"RSET\r\n", None
    return wire, body


@st.composite
def sessions(draw: st.DrawFn) -> tuple[bytes, list[bytes]]:
    wire = b"EHLO client.example\r\n"
    expected: list[bytes] = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["tx", "tx", "tx", "noop", "rset", "ehlo"]))
        if kind == "tx":
            tx, data = draw(transactions())
            wire += tx
            if data is not None:
                expected.append(data)
        elif kind == "noop":
            wire += b"NOOP\r\n"
        elif kind == "rset":
            wire += b"RSET\r\n"
        else:
            wire += b"EHLO again.example\r\n"
    return wire + b"QUIT\r\n", expected


def _settings() -> ServerSettings:
    return ServerSettings(
        hostname=HOST, max_message_size=1 << 20, tls_available=True, auth_enabled=True
    )


def run(pieces: list[bytes], server_settings: ServerSettings | None = None) -> Driver:
    d = Driver(ServerConnection(server_settings or _settings()))
    d.conn.start()
    d.pump()
    for piece in pieces:
        d.conn.receive_data(piece)
        d.pump()
    return d


def split(data: bytes, cuts: set[int]) -> list[bytes]:
    points = sorted(c for c in cuts if 0 < c < len(data))
    return [data[i:j] for i, j in zip([0, *points], [*points, len(data)], strict=True)]


@FAST
@given(sessions(), st.data())
def test_session_is_independent_of_how_bytes_are_split(
    session: tuple[bytes, list[bytes]], data: st.DataObject
) -> None:
    wire, expected = session
    cuts = data.draw(st.sets(st.integers(1, max(1, len(wire) - 1)), max_size=60))
    whole = run([wire])
    pieces = run(split(wire, cuts))
    bytewise = run([wire[i : i + 1] for i in range(len(wire))]) if len(wire) < 1500 else pieces
    assert whole.events == pieces.events == bytewise.events
    assert whole.out == pieces.out == bytewise.out
    assert [m.data for m in whole.events if isinstance(m, MessageReceived)] == expected
    assert whole.out.endswith(b"221 2.0.0 Bye\r\n")
    assert b" 5." not in whole.out and b" 4." not in whole.out


# -- robustness -----------------------------------------------------------------------

_REPLY_LINE = re.compile(rb"^[2-5][0-9][0-9][ -]")
_fragments = st.sampled_from(
    [
        b"EHLO x\r\n",
        b"HELO x\r\n",
        b"MAIL FROM:<a@b.example>\r\n",
        b"MAIL FROM:<a@b.example> BODY=8BITMIME SMTPUTF8\r\n",
        b"MAIL FROM:<a@b.example> BODY=BINARYMIME SMTPUTF8\r\n",
        b"RCPT TO:<c@d.example>\r\n",
        b"RCPT TO:<\xc3\xa9@d.example> NOTIFY=NEVER\r\n",
        b"DATA\r\n",
        b"BDAT 5\r\n",
        b"BDAT 3 LAST\r\n",
        b"BDAT 99999999\r\n",
        b"AUTH PLAIN\r\n",
        b"AUTH LOGIN\r\n",
        b"AUTH PLAIN AHUAcA==\r\n",
        b"STARTTLS\r\n",
        b"RSET\r\n",
        b"QUIT\r\n",
        b"\r\n.\r\n",
        b".\r\n",
        b"\n.\n",
        b"\r",
        b"\n",
        b".",
        b"..",
        b"x" * 700,
        b"\x00\xff",
        b"*\r\n",
        b"dXNlcg==\r\n",
    ]
)
_chunks = st.lists(st.one_of(_fragments, st.binary(max_size=64)), max_size=40)


def _fuzz_settings() -> ServerSettings:
    return ServerSettings(
        hostname=HOST,
        max_message_size=2000,
        max_errors=10_000,
        tls_available=True,
        allow_plaintext_auth=True,
        auth_enabled=True,
    )


def _check_bounded_and_well_formed(chunks: list[bytes], flip: bool) -> None:
    d = Driver(ServerConnection(_fuzz_settings()))
    if flip:  # refuse every other decision, to walk the failure paths too
        toggle = [False]

        def decide(_: object) -> Reply | None:
            toggle[0] = not toggle[0]
            return None if toggle[0] else Reply(550, "5.7.1", "refused")

        d.rcpt = decide
        d.store = decide
        d.auth = lambda ev: decide(ev) is None
    d.conn.start()
    d.pump()
    bound = 2000 + AUTH_LINE_MAX + 8
    for chunk in chunks:
        d.conn.receive_data(chunk)
        d.pump()
        assert d.conn.buffered_bytes <= bound + len(chunk)
        # With nothing pending the leftover is at most one partial line or chunk bound.
        if d.conn.next_event() is NEED_DATA:
            assert d.conn.buffered_bytes <= bound
    d.conn.receive_data(b"")
    d.pump()
    assert d.conn.closed
    lines = bytes(d.out).split(b"\r\n")
    assert lines[-1] == b""
    for line in lines[:-1]:
        assert _REPLY_LINE.match(line), line


@settings(max_examples=300, deadline=None)
@given(_chunks, st.booleans())
def test_arbitrary_input_never_raises_and_stays_bounded(chunks: list[bytes], flip: bool) -> None:
    _check_bounded_and_well_formed(chunks, flip)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=3000), st.sets(st.integers(1, 2999), max_size=30))
def test_random_bytes_after_valid_start(noise: bytes, cuts: set[int]) -> None:
    prefix = b"EHLO x\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"
    _check_bounded_and_well_formed([prefix, *split(noise, cuts)], False)


# -- the windowed long-line scan agrees with the obvious per-line computation --------------


def _naive_long_run(data: bytes, run_max: int) -> bool:
    return max(map(len, data.split(b"\n"))) > run_max


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 40), st.sampled_from([b"\n", b"\r\n", b""])), max_size=30),
    st.integers(1, 25),
)
def test_long_run_scan_matches_naive(lines: list[tuple[int, bytes]], run_max: int) -> None:
    data = b"".join(b"x" * n + end for n, end in lines)
    assert _has_long_run(data, run_max) == _naive_long_run(data, run_max)
    assert _has_long_run(bytearray(data), run_max) == _naive_long_run(data, run_max)
