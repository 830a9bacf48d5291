"""``DkimSign``: the last intake stage, which DKIM-signs the final bytes once.

It runs after every stage that adds header lines, over exactly the bytes the spool will
store (the stages' lines on top of the message as received), so every delivery attempt,
by whichever worker, sends the same signed message (a message to be signed that lacks its
final CRLF, or the empty line after its header, gets it first: the SMTP client would add
it on the way out anyway). What it signs with is chosen by the
From: domain (``relay.dkim.keys.SignerTable``): that domain's author signers, then the
``dkim.always`` signers. The signatures go on top of the message.

A message whose From: domain has no signer (or that has no usable From:) goes out
unsigned, or is refused with 550 5.7.1 when ``dkim.policy = "refuse"``; the relay's own
DSNs are never refused (a 250 made the relay responsible for telling the sender, RFC
5321 6.1), only signed when a signer matches their ``MAILER-DAEMON@<hostname>``.

Accounting: ``Admission.dkim`` lists the signatures added (``d=example.com s=s2024
a=rsa-sha256``), ``Admission.dkim_reason`` says why the author domain got none; the
Reception event carries both. Keys are loaded when the stage is built (once per config,
``signing_stages``), never per message.
"""

from __future__ import annotations

from relay.config import Config
from relay.dkim import SignerTable, author_domain, load_signers, sign_message
from relay.intake.admission import Admission, Refused
from relay.smtp.replies import Reply

__all__ = ["DkimSign", "signing_stages"]


class DkimSign:
    """Sign with the From: domain's signers and the ``always`` signers."""

    def __init__(self, table: SignerTable, refuse_unsigned: bool = False) -> None:
        self.table = table
        self.refuse_unsigned = refuse_unsigned

    def admit(self, msg: Admission) -> None:
        domain, why = author_domain(msg.fields)
        author = self.table.for_author(domain) if domain else ()
        if not author:
            why = why or f"no signer for From: domain {domain}"
            if self.refuse_unsigned and msg.via != "dsn":
                raise Refused(_refusal(domain, why))
            msg.dkim_reason = why
        signers = author + tuple(s for s in self.table.always if s not in author)
        if not signers:
            return
        complete = _complete(msg.data)
        if complete is not msg.data:
            msg.replace_data(complete)
        head = b"".join(msg.head)
        signatures = sign_message(signers, msg.data, msg.envelope.received_at, prefix=head)
        if signatures:
            msg.head[:0] = signatures
            msg.dkim = [s.label for s in signers]


def _complete(data: bytes) -> bytes:
    """``data`` ending in CRLF and with the empty line that ends its header section, as
    the relay's SMTP client would send it anyway (``relay.smtp.client``: a CRLF is added
    to a last line without one): signed in that form, so that no verifier has to guess
    (OpenDKIM and dkimpy disagree about a header section with no empty line after it).
    The same object when nothing is missing (no copy)."""
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if b"\r\n\r\n" not in data and not data.startswith(b"\r\n"):
        data += b"\r\n"
    return data


def _refusal(domain: str | None, why: str) -> Reply:
    if domain:
        return Reply(550, "5.7.1", f"Message rejected: no DKIM signing key for {domain}")
    return Reply(550, "5.7.1", f"Message rejected: cannot DKIM-sign it: {why}")


def signing_stages(config: Config, source: str = "config") -> list[DkimSign]:
    """The signing stage for ``config`` (its keys loaded: ``ConfigError`` naming
    ``source`` if one cannot be used), or none when DKIM is not configured."""
    dkim = config.dkim
    if not dkim.signers and dkim.policy != "refuse":
        return []
    return [DkimSign(load_signers(dkim, source), refuse_unsigned=dkim.policy == "refuse")]
