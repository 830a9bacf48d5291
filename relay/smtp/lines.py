"""Line endings of message content, checked at C speed.

``bare_line_breaks(data)`` tells which bare line breaks ``data`` holds: a CR not followed
by LF, an LF not preceded by CR. Why not ``count``: ``bytes.count`` of a single byte is a
plain loop (about 1.4 ns a byte here), while ``replace`` and ``in`` use the fast search
and ``memchr``. Removing every CRLF leaves exactly the bare CRs and LFs (CRLF pairs never
overlap), so one ``replace`` and two ``memchr`` answer what three counts did, five times
faster on a 100 KB body (measured: 55 us against 330 us).
"""

from __future__ import annotations

__all__ = ["bare_line_breaks"]


def bare_line_breaks(data: bytes | bytearray) -> tuple[bool, bool]:
    """``(has a bare CR, has a bare LF)``."""
    rest = data.replace(b"\r\n", b"")
    return b"\r" in rest, b"\n" in rest
