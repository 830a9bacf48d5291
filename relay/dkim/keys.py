"""DKIM keys and the table of signers, loaded once per config.

``load_signers(config.dkim, source)`` reads and parses every ``[[dkim.signers]]`` key
(PEM, unencrypted, as OpenDKIM and KumoMTA take them) and returns the ``SignerTable``
the intake's signing stage consults for each message. It runs whenever the intake's
stages are built (``relay.intake.default_stages``: at worker start and on every SIGHUP
reload, so a replaced key file is picked up by a reload), never per message.

A key that cannot be used is a ``ConfigError`` naming the config file, the key and the
PEM file (``relay.toml: dkim.signers[0].key: cannot read /etc/relay/dkim/a.pem: No such
file or directory``): a missing or unreadable file, one that is not an unencrypted PEM
private key, a key of another type than ``algorithm``, an RSA key outside 1024..4096
bits (RFC 8301: signers must use at least 1024, verifiers need not go past 4096).
``check_keys`` reports every such problem, one line each, for ``relay check-config``
and the start-up checks (``relay.preflight``).

Which signers sign a message: the author signers of its From: domain (every entry with
that exact ``domain``, or else those of the most specific ``*.`` wildcard that matches),
then the ``dkim.always`` signers (skipped when they are the author signers already).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relay.config import Config, ConfigError, DkimConfig, DkimSigner
from relay.dkim.sign import Algorithm, PrivateKey, Signer

__all__ = [
    "RSA_BITS",
    "KeyProblem",
    "SignerTable",
    "check_keys",
    "load_private_key",
    "load_signers",
    "public_key_record",
]

#: RSA key sizes a DKIM key may have (RFC 8301 3.2, RFC 6376 3.3.3).
RSA_BITS = (1024, 4096)
#: A PEM private key is a few KiB; a bigger file is not one (and is not read whole).
_MAX_PEM = 64 * 1024


class KeyProblem(ValueError):
    """A key file that cannot be used; the text names the file."""


def _describe(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "an RSA key"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "an Ed25519 key"
    kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "")
    kind = {"EllipticCurve": "EC"}.get(kind, kind)
    return f"{'an' if kind[:1] in 'AEIOU' else 'a'} {kind} key"


def _parse(path: str, pem: bytes) -> object:
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise KeyProblem(f"{path} is encrypted (DKIM keys are read without a "
                         "passphrase; protect the file with mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyProblem(f"{path} is not a PEM private key") from None


def load_private_key(path: str, algorithm: Algorithm) -> PrivateKey:
    """The private key in PEM file ``path`` for ``algorithm``; ``KeyProblem`` if it
    cannot be read, parsed, or used for that algorithm."""
    try:
        with open(path, "rb") as f:
            pem = f.read(_MAX_PEM + 1)
    except OSError as e:
        raise KeyProblem(f"cannot read {path}: {e.strerror or e}") from None
    if len(pem) > _MAX_PEM:
        raise KeyProblem(f"{path} is not a PEM private key (larger than 64 KiB)")
    key = _parse(path, pem)
    if algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise KeyProblem(f"{path} holds {_describe(key)}, but algorithm "
                             f"\"{algorithm}\" needs an RSA key")
        low, high = RSA_BITS
        if not low <= key.key_size <= high:
            raise KeyProblem(f"{path} is an RSA key of {key.key_size} bits: DKIM needs "
                             f"{low} to {high} (2048 recommended)")
        return key
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyProblem(f"{path} holds {_describe(key)}, but algorithm "
                         f"\"{algorithm}\" needs an Ed25519 key")
    return key


def public_key_record(key: PrivateKey) -> str:
    """The DNS TXT record that publishes ``key`` (RFC 6376 3.6.1; RFC 8463 4: the raw
    32-byte Ed25519 key, RSA as DER SubjectPublicKeyInfo, as opendkim-genkey writes)."""
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode("ascii")
    der = public.public_bytes(serialization.Encoding.DER,
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")


def _signer(entry: DkimSigner, key: PrivateKey) -> Signer:
    header_canon, body_canon = entry.canonicalization.split("/")
    names: dict[str, str] = {}
    for name in entry.headers:
        names.setdefault(name.lower(), name)
    return Signer(
        domain=entry.signing_domain(), selector=entry.selector, algorithm=entry.algorithm,
        key=key, headers=tuple(names.values()), over_sign=entry.over_sign,
        header_canon=header_canon,  # type: ignore[arg-type]
        body_canon=body_canon,  # type: ignore[arg-type]
        expiration=entry.expiration, timestamp=entry.timestamp,
    )


@dataclass(frozen=True)
class SignerTable:
    """The loaded signers of one config, by the From: domains they sign for."""

    #: domain -> its signers; wildcard entries under their suffix ("*.a.test" -> "a.test").
    exact: dict[str, tuple[Signer, ...]] = field(default_factory=dict)
    wildcard: dict[str, tuple[Signer, ...]] = field(default_factory=dict)
    always: tuple[Signer, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.exact or self.wildcard)

    def for_author(self, domain: str) -> tuple[Signer, ...]:
        """The signers for From: ``domain`` (lower case): exact, else the most specific
        ``*.`` wildcard (``*.a.test`` matches ``x.a.test``, not ``a.test``), else ()."""
        found = self.exact.get(domain)
        if found:
            return found
        labels = domain.split(".")
        for i in range(1, len(labels)):
            found = self.wildcard.get(".".join(labels[i:]))
            if found:
                return found
        return ()


def _table(dkim: DkimConfig, signers: Sequence[tuple[DkimSigner, Signer]]) -> SignerTable:
    exact: dict[str, list[Signer]] = {}
    wildcard: dict[str, list[Signer]] = {}
    always: list[Signer] = []
    wanted = dkim.always.lower().rstrip(".")
    for entry, signer in signers:
        domain = entry.domain.lower().rstrip(".")
        if domain.startswith("*."):
            wildcard.setdefault(domain[2:], []).append(signer)
        else:
            exact.setdefault(domain, []).append(signer)
        if wanted and domain == wanted:
            always.append(signer)
    return SignerTable(exact={k: tuple(v) for k, v in exact.items()},
                       wildcard={k: tuple(v) for k, v in wildcard.items()},
                       always=tuple(always))


def _load_all(dkim: DkimConfig, source: str) -> tuple[list[tuple[DkimSigner, Signer]],
                                                       list[str]]:
    loaded, problems = [], []
    for i, entry in enumerate(dkim.signers):
        try:
            loaded.append((entry, _signer(entry, load_private_key(entry.key, entry.algorithm))))
        except KeyProblem as e:
            problems.append(f"{source}: dkim.signers[{i}].key: {e}")
    return loaded, problems


def load_signers(dkim: DkimConfig, source: str = "config") -> SignerTable:
    """Every signer of ``dkim`` with its key loaded; ``ConfigError`` (the first problem)
    if any key cannot be used."""
    loaded, problems = _load_all(dkim, source)
    if problems:
        raise ConfigError(problems[0])
    return _table(dkim, loaded)


def check_keys(config: Config, source: str) -> list[str]:
    """Every DKIM key problem of ``config``, one line each (``relay.preflight``)."""
    return _load_all(config.dkim, source)[1]
