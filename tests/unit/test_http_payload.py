"""The shared result types and errors of the HTTP injection layer: JSON decoding with
errors mapped to PayloadError (status, code, field path), and the address rules."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from relay.http.kumo import kumo_injection
from relay.http.payload import (
    Injection,
    PayloadError,
    RecipientFailure,
    RenderedMessage,
    check_address,
    decode_json,
    merged,
)
from relay.http.sparkpost import sparkpost_injection


class Inner(msgspec.Struct, forbid_unknown_fields=True):
    email: str
    kind: str = "a"


class Outer(msgspec.Struct, forbid_unknown_fields=True):
    items: list[Inner]
    count: int = 0


def decode_error(body: bytes) -> PayloadError:
    with pytest.raises(PayloadError) as info:
        decode_json(body, Outer)
    return info.value


def test_decode_json_returns_structs() -> None:
    value = decode_json(b'{"items": [{"email": "a@b.c"}], "count": 2}', Outer)
    assert value == Outer(items=[Inner(email="a@b.c")], count=2)


@pytest.mark.parametrize(("body", "status", "code", "field"), [
    (b"", 400, "invalid_json", None),
    (b"{", 400, "invalid_json", None),
    (b"not json", 400, "invalid_json", None),
    (b'{"items": [], "count": 1,}', 400, "invalid_json", None),
    (b"[]", 400, "invalid_type", None),
    (b'{"items": {}}', 400, "invalid_type", "items"),
    (b'{"items": [{"email": 5}]}', 400, "invalid_type", "items[0].email"),
    (b'{"items": [{"email": "x"}, {"email": "y", "kind": []}]}', 400, "invalid_type",
     "items[1].kind"),
    (b'{"count": 1}', 422, "missing_field", "items"),
    (b'{"items": [{"kind": "b"}]}', 422, "missing_field", "items[0].email"),
    (b'{"items": [], "extra": 1}', 422, "unsupported_field", "extra"),
    (b'{"items": [{"email": "x", "mail": 1}]}', 422, "unsupported_field", "items[0].mail"),
])
def test_decode_errors_map_to_status_code_and_path(body: bytes, status: int, code: str,
                                                   field: str | None) -> None:
    err = decode_error(body)
    assert (err.status, err.code, err.field) == (status, code, field)
    assert err.message and err.description
    if field is not None:
        assert field in err.description


def test_payload_error_carries_its_parts() -> None:
    err = PayloadError(422, "template_error", "Invalid template", "content.html: line 1",
                       "content.html")
    assert (err.status, err.code, err.message, err.description, err.field) == (
        422, "template_error", "Invalid template", "content.html: line 1", "content.html")
    assert "content.html: line 1" in str(err)
    assert PayloadError(400, "invalid_json", "m", "d").field is None


@pytest.mark.parametrize("address", [
    "user@example.com", "first.last+tag@sub.example.co.uk", '"quoted"@example.com',
    "user%other@example.com"])
def test_good_addresses(address: str) -> None:
    assert check_address(address) == address


@pytest.mark.parametrize(("address", "why"), [
    ("", "empty"), ("user", "not an email"), ("user@", "not an email"),
    ("@example.com", "not an email"), ("postmaster", "not an email"),
    ("a b@example.com", "whitespace"), ('"a b"@example.com', "whitespace"),
    ("a@example.com\r\n", "whitespace"), ("<a@example.com>", "angle"),
    ("a@[192.0.2.1]", "literal"), ("jörg@example.com", "non-ASCII"),
    ("a@exa_mple.com", "not an email"), ("a@" + "x" * 64 + ".com", "not an email"),
])
def test_bad_addresses(address: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_address(address)


def test_merged_is_shallow_and_later_wins() -> None:
    base = {"a": 1, "n": {"x": 1}}
    out = merged(base, {"a": 2}, {}, {"n": {"y": 2}})
    assert out == {"a": 2, "n": {"y": 2}} and base == {"a": 1, "n": {"x": 1}}


def test_the_result_types() -> None:
    inj = Injection(sender="s@example.com")
    assert (inj.messages, inj.failures, inj.sandbox, inj.transactional) == ([], [], False, False)
    inj.messages.append(RenderedMessage(0, "a@example.org", b"x\r\n", {}, []))
    inj.failures.append(RecipientFailure(1, "", "missing_field", "recipients[1]: ..."))
    assert Injection(sender="").messages == []  # no shared default list


SPARKPOST = {"recipients": [{"address": "a@example.org"}],
             "content": {"from": "s@example.com", "subject": "s", "text": "t"}}
KUMO = {"envelope_sender": "s@example.com", "recipients": [{"email": "a@example.org"}],
        "content": "Subject: s\r\n\r\nt"}


@pytest.mark.parametrize(("inject", "payload"), [(sparkpost_injection, SPARKPOST),
                                                 (kumo_injection, KUMO)])
def test_both_apis_share_the_error_contract(inject: Any, payload: dict[str, Any]) -> None:
    ok = inject(json.dumps(payload).encode(), now=0.0, max_recipients=1)
    assert [m.address for m in ok.messages] == ["a@example.org"]
    assert ok.messages[0].data.endswith(b"\r\n")
    cases = [
        (b"{nope", 400, "invalid_json", None),
        (json.dumps({**payload, "zzz": 1}).encode(), 422, "unsupported_field", "zzz"),
        (json.dumps({**payload, "recipients": [payload["recipients"][0]] * 2}).encode(), 422,
         "too_many_recipients", "recipients"),
        (json.dumps({**payload, "recipients": []}).encode(), 422, "no_recipients",
         "recipients"),
        (json.dumps({**payload, "recipients": 3}).encode(), 400, "invalid_type", "recipients"),
    ]
    for body, status, code, field in cases:
        with pytest.raises(PayloadError) as info:
            inject(body, now=0.0, max_recipients=1)
        assert (info.value.status, info.value.code, info.value.field) == (status, code, field)
