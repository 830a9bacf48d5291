"""DKIM signing (RFC 6376, Ed25519 by RFC 8463): canonicalisation, signatures, keys.

Since 2024 Gmail and Yahoo want bulk mail DKIM-signed with a domain aligned to From:.
The relay signs in its intake, as the last stage (``relay.intake.signing``), so every
message (SMTP, HTTP, its own DSNs) is signed once over its final bytes, and every retry
and every worker sends those same signed bytes.

- ``canon``: the canonicalisations, bytes only, C-speed operations;
- ``sign``: ``Signer`` (one key and its tags) and ``sign_message``;
- ``author``: the From: domain that chooses the signers;
- ``keys``: loading the ``[[dkim.signers]]`` keys once per config (``load_signers``),
  with ``ConfigError``s naming the file and key, and the DNS record of a key;
- ``keygen``: ``relay dkim keygen``.

This package knows the config (``relay.config``) and nothing of the intake, the worker
or the command line, which use it.
"""

from relay.dkim.author import author_domain
from relay.dkim.keys import (
    KeyProblem,
    SignerTable,
    check_keys,
    load_private_key,
    load_signers,
    public_key_record,
)
from relay.dkim.sign import Signer, sign_message

__all__ = [
    "KeyProblem",
    "Signer",
    "SignerTable",
    "author_domain",
    "check_keys",
    "load_private_key",
    "load_signers",
    "public_key_record",
    "sign_message",
]
