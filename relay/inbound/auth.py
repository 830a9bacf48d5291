"""SMTP AUTH credentials: scrypt password hashes and their verification.

Config stores ``scrypt$N$r$p$salt_b64$hash_b64`` (produced by ``relay hash-password``), or
``plain$secret`` for tests. Verification is CPU-heavy on purpose, so callers run it in a
worker thread, and it is constant-time in the comparison.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

from relay.config import AuthUser

__all__ = ["Authenticator", "hash_password", "verify_password"]

_N, _R, _P = 2**14, 8, 1


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(stored: str, password: bytes) -> bool:
    scheme, _, rest = stored.partition("$")
    if scheme == "plain":
        return hmac.compare_digest(rest.encode(), password)
    if scheme != "scrypt":
        return False
    try:
        n, r, p, salt, digest = rest.split("$")
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(
            password, salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
            dklen=len(expected), maxmem=256 * 1024 * 1024,
        )
    except ValueError:
        return False
    return hmac.compare_digest(expected, got)


class Authenticator:
    """Checks AUTH credentials against ``inbound.auth_users``."""

    def __init__(self, users: list[AuthUser]) -> None:
        self._users = {u.username: u.password for u in users}

    @property
    def enabled(self) -> bool:
        return bool(self._users)

    def check(self, username: str, password: bytes) -> bool:
        stored = self._users.get(username)
        if stored is None:
            # Same cost for unknown users, so timing does not reveal which names exist.
            verify_password(f"scrypt${_N}${_R}${_P}$AAAAAAAAAAAAAAAAAAAAAA==$AAAA", password)
            return False
        return verify_password(stored, password)
