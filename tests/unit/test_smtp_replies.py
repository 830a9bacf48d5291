"""Reply formatting and parsing."""

from __future__ import annotations

import pytest

from relay.smtp import Reply, ReplyParseError, parse_reply
from relay.smtp import replies as R


def test_single_and_multi_line_formatting() -> None:
    assert Reply(250, "2.0.0", "Ok").to_bytes() == b"250 2.0.0 Ok\r\n"
    assert Reply(250, None, ["host", "PIPELINING", "SIZE 10"]).to_bytes() == (
        b"250-host\r\n250-PIPELINING\r\n250 SIZE 10\r\n"
    )
    assert Reply(214, "2.0.0", ["a", "b"]).to_bytes() == b"214-2.0.0 a\r\n214 2.0.0 b\r\n"
    assert Reply(334, None, "").to_bytes() == b"334 \r\n"
    assert Reply(250, "2.1.5", "caf\u00e9").to_bytes() == "250 2.1.5 caf\u00e9\r\n".encode()


def test_reply_text_cannot_inject_lines() -> None:
    r = Reply(550, "5.1.1", "bad <a@b>\r\n250 2.0.0 fake")
    assert r.to_bytes() == b"550 5.1.1 bad <a@b>  250 2.0.0 fake\r\n"


def test_reply_value_semantics_and_classes() -> None:
    a, b = Reply(421, "4.4.2", "x"), Reply(421, "4.4.2", ("x",))
    assert a == b and hash(a) == hash(b) and a != Reply(421, None, "x")
    assert a.is_transient and a.is_error and not a.is_permanent and not a.is_success
    assert R.OK.is_success and R.START_DATA.is_intermediate and R.AUTH_FAILED.is_permanent
    assert str(R.AUTH_FAILED) == "535 5.7.8 Authentication credentials invalid"
    assert a.with_text("y", "z") == Reply(421, "4.4.2", ["y", "z"])
    with pytest.raises(AttributeError):
        a.code = 250  # type: ignore[misc]
    with pytest.raises(ValueError):
        Reply(99, None, "x")


def test_standard_replies_carry_enhanced_codes() -> None:
    for name in R.__all__:
        value = getattr(R, name)
        if isinstance(value, Reply) and value.code not in (334, 354):
            assert value.status is not None, name
            assert value.status[0] == str(value.code)[0], name
    assert R.too_many_errors("h").to_bytes() == b"421 4.7.0 h Error: too many errors\r\n"
    assert R.timeout_exceeded("h").to_bytes() == b"421 4.4.2 h Error: timeout exceeded\r\n"
    assert R.shutting_down("h").to_bytes() == b"421 4.3.2 h Service shutting down\r\n"
    assert R.greeting("h").to_bytes() == b"220 h ESMTP\r\n"
    assert R.message_queued("ABC").to_bytes() == b"250 2.0.0 Ok: queued as ABC\r\n"


def test_parse_reply_round_trip() -> None:
    for reply in [
        R.OK,
        R.HELP,
        Reply(250, None, ["host", "PIPELINING", "SIZE 10"]),
        Reply(550, "5.7.1", ["one", "two"]),
        R.START_DATA,
    ]:
        lines = reply.to_bytes().split(b"\r\n")[:-1]
        assert parse_reply(lines) == reply
    # A 2.x.x status on a 5xx reply is just text.
    assert parse_reply([b"550 2.0.0 odd"]) == Reply(550, None, "2.0.0 odd")
    assert parse_reply([b"250"]) == Reply(250, None, "")
    assert parse_reply([b"250 2.0.0 Ok"], enhanced=False) == Reply(250, None, "2.0.0 Ok")


@pytest.mark.parametrize(
    "lines",
    [[], [b"25 ok"], [b"250-a"], [b"250 a", b"250 b"], [b"250-a", b"251 b"], [b"250xa"],
     [b"999 x"]],
)
def test_parse_reply_errors(lines: list[bytes]) -> None:
    with pytest.raises(ReplyParseError):
        parse_reply(lines)
