"""Lexical helpers every layer shares (protocol, config, delivery); imports nothing of relay.

Why a helper for something as small as "is this a number": ``str.isdigit()`` and ``int()``
accept far more than ASCII digits. ``"²".isdigit()`` is True yet ``int("²")`` raises, and
``int("٣")`` is 3. Wire protocols and config files only have ASCII digits, so every
number read from outside goes through ``ascii_int``.
"""

from __future__ import annotations

__all__ = ["ascii_int"]


def ascii_int(text: str | bytes | None, *, max_digits: int = 20) -> int | None:
    """The value of ``text`` if it is 1 to ``max_digits`` ASCII digits (no sign, no
    blanks, no underscores), else None. Never raises."""
    if not text or len(text) > max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)
