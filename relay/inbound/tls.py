"""Server-side TLS context for STARTTLS (RFC 3207)."""

from __future__ import annotations

import ssl

from relay.config import ConfigError, InboundConfig

__all__ = ["server_ssl_context"]


def server_ssl_context(inbound: InboundConfig, source: str = "config") -> ssl.SSLContext | None:
    """A context from ``inbound.tls_cert``/``tls_key``, or None when TLS is not configured.

    TLS 1.2 is the floor (what the big mailbox providers accept); client certificates are
    not requested. Raises ConfigError naming the key when the files are unusable.
    """
    if not inbound.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(inbound.tls_cert, inbound.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"{source}: inbound.tls_cert/tls_key: cannot load: {e}") from None
    return ctx
