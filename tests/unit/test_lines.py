"""``bare_line_breaks`` answers what the three counts it replaced answered, on any bytes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from relay.smtp.lines import bare_line_breaks


def by_counting(data: bytes) -> tuple[bool, bool]:
    crlf = data.count(b"\r\n")
    return data.count(b"\r") != crlf, data.count(b"\n") != crlf


@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b".", b"\n\r"]), max_size=40))
def test_same_answer_as_counting(parts: list[bytes]) -> None:
    data = b"".join(parts)
    assert bare_line_breaks(data) == by_counting(data)
    assert bare_line_breaks(bytearray(data)) == by_counting(data)


def test_examples() -> None:
    assert bare_line_breaks(b"a\r\nb\r\n") == (False, False)
    assert bare_line_breaks(b"a\rb\r\n") == (True, False)
    assert bare_line_breaks(b"a\nb\r\n") == (False, True)
    assert bare_line_breaks(b"\r\r\n\n") == (True, True)
    assert bare_line_breaks(b"") == (False, False)
