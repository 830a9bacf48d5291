"""HTTP API keys: which tenant a request injects for.

Keys are configured hashed (``http.api_keys[].key``, the same ``scrypt$...`` format as
``inbound.auth_users``; ``relay api-key`` makes one). A client sends its key the way its
library does:

* SparkPost's: ``Authorization: <key>``;
* ``Authorization: Bearer <key>``;
* ``Authorization: Basic base64(<key>:)`` (the key as the user name, or as the password
  with any user name, as KumoMTA's and most HTTP clients' basic auth does).

scrypt costs tens of milliseconds on purpose, so a key is verified once, in a thread,
and the answer remembered by the SHA-256 of the key (``ApiKeys`` lives as long as its
config). Unknown keys are remembered too, for a while, and verifications run one at a
time: a client hammering with bad keys costs one core's share, not the worker.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time

import trio

from relay.config import ApiKey
from relay.inbound.auth import verify_password

__all__ = ["ApiKeys", "presented_key"]

#: Remembered answers per worker (emptied when full).
_CACHE_MAX = 4096
#: How long an unknown key stays refused without a new check.
_NEGATIVE_TTL = 60.0


def presented_key(authorization: str | None) -> str | None:
    """The API key in an ``Authorization`` header value, or None."""
    if not authorization:
        return None
    scheme, _, rest = authorization.strip().partition(" ")
    lowered = scheme.lower()
    if lowered == "bearer":
        return rest.strip() or None
    if lowered == "basic":
        try:
            user, _, password = base64.b64decode(rest.strip(), validate=True).decode(
                "utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return user or password or None
    return authorization.strip()


class ApiKeys:
    """Verifies presented keys against the configured ones (see module docstring)."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._keys = list(keys)
        self._known: dict[bytes, ApiKey] = {}
        self._refused: dict[bytes, float] = {}
        self._limiter = trio.CapacityLimiter(1)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    async def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The configured key a request's ``Authorization`` header carries, or None."""
        key = presented_key(authorization)
        if key is None or not self._keys:
            return None
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        known = self._known.get(digest)
        if known is not None:
            return known
        refused_at = self._refused.get(digest)
        if refused_at is not None and time.monotonic() - refused_at < _NEGATIVE_TTL:
            return None
        found = await trio.to_thread.run_sync(self._verify, key.encode(), limiter=self._limiter)
        cache: dict = self._known if found is not None else self._refused
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[digest] = found if found is not None else time.monotonic()
        return found

    def _verify(self, key: bytes) -> ApiKey | None:
        for entry in self._keys:
            if verify_password(entry.key, key):
                return entry
        return None
