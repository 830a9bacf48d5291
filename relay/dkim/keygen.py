"""``relay dkim keygen``: a new DKIM key, its DNS record and its config lines.

Like ``opendkim-genkey``: the private key is written (PKCS#8 PEM, unencrypted, mode 0600,
never over an existing file) as ``DIR/<domain>.<selector>.pem``, and what to publish is
printed: the TXT record in zone-file syntax, its text split into quoted strings of at
most 255 octets (RFC 1035 3.3.14; an RSA-2048 key needs two), and the
``[[dkim.signers]]`` table to add to the relay's config.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.config import check_dkim_name
from relay.dkim.keys import RSA_BITS, public_key_record
from relay.dkim.sign import Algorithm, PrivateKey

__all__ = ["NewKey", "dns_record", "generate_key", "keygen"]

#: Characters of base64 per quoted string of the printed record (opendkim-genkey's 250).
_CHUNK = 250


@dataclass(frozen=True)
class NewKey:
    """What ``keygen`` made: where the key is and what to print."""

    path: str
    record: str
    snippet: str


def generate_key(algorithm: Algorithm, bits: int | None = None) -> PrivateKey:
    """A fresh key: RSA of ``bits`` (default 2048, 1024..4096) or Ed25519 (no bits)."""
    if algorithm == "ed25519-sha256":
        if bits is not None:
            raise ValueError("--bits is for rsa-sha256 keys (an Ed25519 key has 256 bits)")
        return ed25519.Ed25519PrivateKey.generate()
    bits = 2048 if bits is None else bits
    low, high = RSA_BITS
    if not low <= bits <= high:
        raise ValueError(f"--bits {bits}: DKIM RSA keys have {low} to {high} bits "
                         "(2048 recommended)")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def dns_record(domain: str, selector: str, key: PrivateKey) -> str:
    """The TXT record for ``key`` as opendkim-genkey prints it (zone-file syntax)."""
    text = public_key_record(key)
    head, _, p = text.partition("p=")
    strings = [head] + ["p=" + p[:_CHUNK]] + [p[i:i + _CHUNK] for i in range(_CHUNK, len(p),
                                                                             _CHUNK)]
    quoted = "\n\t".join(f'"{s}"' for s in strings)
    return (f"{selector}._domainkey.{domain}. IN TXT ( {quoted} )"
            f"  ; ----- DKIM key {selector} for {domain}")


def _snippet(domain: str, selector: str, path: str, algorithm: Algorithm) -> str:
    return "\n".join(["[[dkim.signers]]", f'domain = "{domain}"', f'selector = "{selector}"',
                      f'key = "{path}"', f'algorithm = "{algorithm}"'])


def _write_new(path: str, pem: bytes) -> None:
    """Create ``path`` with mode 0600 and write ``pem``; never replaces a file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)


def keygen(domain: str, selector: str, algorithm: Algorithm = "rsa-sha256",
           bits: int | None = None, out_dir: str = ".") -> NewKey:
    """Make a key for ``selector._domainkey.domain`` in ``out_dir``. Raises ValueError
    (a bad name or size), FileExistsError (the key file exists) or OSError."""
    domain = domain.lower().rstrip(".")
    check_dkim_name(domain, "domain")
    check_dkim_name(selector, "selector")
    path = os.path.abspath(os.path.join(out_dir, f"{domain}.{selector}.pem"))
    if os.path.lexists(path):  # checked again, atomically, by O_EXCL
        raise FileExistsError(0, "File exists", path)
    key = generate_key(algorithm, bits)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    _write_new(path, pem)
    return NewKey(path=path, record=dns_record(domain, selector, key),
                  snippet=_snippet(domain, selector, path, algorithm))
