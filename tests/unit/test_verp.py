"""VERP return paths and X-Relay-Ref tokens: only the holder of the secret makes one, a
forged or altered one is refused, and they survive what mail servers do to addresses."""

from __future__ import annotations

import re
import time

import pytest

from relay.intake.reference import make_ref, read_ref
from relay.outcomes.verp import MAX_AGE, Verp, VerpLink, verp_for
from relay.spool import new_queue_id

SECRET = "0123456789abcdef-secret"
#: RFC 5322 atext without quoting, as every MTA passes it on.
ATEXT = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")


@pytest.fixture
def verp() -> Verp:
    return Verp("Bounces.Example.COM.", SECRET)


def test_an_address_names_the_message_and_recipient_and_reads_back(verp: Verp) -> None:
    qid = new_queue_id()
    for index in (0, 1, 999, 9_999_999):
        address = verp.address(qid, index)
        local, _, domain = address.partition("@")
        assert domain == "bounces.example.com"
        assert len(local) <= 64 and ATEXT.match(local), address
        assert address == address.lower()
        assert verp.read(address) == VerpLink(qid, index)
        # Servers that fold the case of a local part still give it back usable.
        assert verp.read(address.upper()) == VerpLink(qid, index)
    assert verp.is_ours("anything@BOUNCES.example.com")
    assert not verp.is_ours("someone@example.com")


def test_forged_and_altered_addresses_are_refused(verp: Verp) -> None:
    qid = new_queue_id()
    good = verp.address(qid, 2)
    local, domain = good.split("@")
    prefix, _, mac = local.rpartition("-")
    other_qid = new_queue_id()
    forged = [
        f"{prefix}-{'a' if mac[0] != 'a' else 'b'}{mac[1:]}@{domain}",  # one MAC character
        good.replace("-2-", "-3-"),  # another recipient, same MAC
        good.replace(qid.lower(), other_qid.lower()),  # another message, same MAC
        Verp("bounces.example.com", "another-secret-0123").address(qid, 2),
        good.replace("bounces.example.com", "bounces.example.org"),
        f"{prefix}-{mac[:-1]}@{domain}",  # truncated MAC
        f"x{local}@{domain}",
        "postmaster@bounces.example.com",
        "b-@bounces.example.com",
        "",
        "@",
    ]
    for address in forged:
        assert verp.read(address) is None, address
    assert verp.read(good) == VerpLink(qid, 2)


def test_an_address_older_than_max_age_is_refused(verp: Verp) -> None:
    qid = new_queue_id()
    address = verp.address(qid, 0)
    assert verp.read(address, now=time.time() + MAX_AGE - 60) is not None
    assert verp.read(address, now=time.time() + MAX_AGE + 60) is None


def test_verification_is_constant_time_compare(monkeypatch: pytest.MonkeyPatch,
                                               verp: Verp) -> None:
    import relay.outcomes.verp as module

    calls: list[tuple[str, str]] = []
    real = module.hmac.compare_digest

    def spy(a: str, b: str) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(module.hmac, "compare_digest", spy)
    address = verp.address(new_queue_id(), 5)
    assert verp.read(address) is not None
    assert len(calls) == 1 and calls[0][0] == calls[0][1]


def test_verp_for_is_none_without_a_domain() -> None:
    assert verp_for("", SECRET) is None
    assert verp_for("bounces.example.com", SECRET) is verp_for("bounces.example.com", SECRET)


def test_reference_tokens_carry_the_message_and_refuse_forgery() -> None:
    secret = SECRET.encode()
    token = make_ref(secret, queue_id="QID1", tenant="acme", campaign="spring",
                     recipient="bob@example.com")
    ref = read_ref(secret, token)
    assert ref is not None
    assert (ref.queue_id, ref.tenant, ref.campaign, ref.recipient) == (
        "QID1", "acme", "spring", "bob@example.com")
    body, mac = token.split(".")
    other = make_ref(secret, queue_id="QID2", tenant="acme", campaign="spring",
                     recipient="bob@example.com")
    for bad in [f"{other.split('.')[0]}.{mac}", f"{body}.{other.split('.')[1]}",
                f"{body[:-2]}.{mac}", token.replace(".", ""), "", ".", "x" * 5000]:
        assert read_ref(secret, bad) is None, bad
    assert read_ref(b"another-secret-0123", token) is None
