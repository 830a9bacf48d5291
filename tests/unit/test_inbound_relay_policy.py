"""InboundContext.may_relay: relay.allow_networks, and its per-context memory of answers."""

from __future__ import annotations

from typing import Any

from relay.config import Config, RelayPolicyConfig
from relay.inbound.session import RELAY_VERDICTS_MAX, InboundContext


def _context(networks: list[str]) -> InboundContext:
    config = Config(relay=RelayPolicyConfig(allow_networks=networks))
    stand_in: Any = object()  # the intake: may_relay never touches it
    return InboundContext.build(config, intake=stand_in, new_queue_id=str, ssl_context=None)


def test_addresses_inside_the_networks_may_relay_and_others_may_not() -> None:
    ctx = _context(["192.0.2.0/24", "2001:db8::/32"])
    assert ctx.may_relay("192.0.2.77")
    assert ctx.may_relay("2001:db8::1")
    assert ctx.may_relay("::ffff:192.0.2.5")  # IPv4-mapped: matched as IPv4
    assert not ctx.may_relay("198.51.100.1")
    assert not ctx.may_relay("2001:db9::1")
    assert not ctx.may_relay("not an address")
    # Asked again (now from memory), the answers are the same.
    assert ctx.may_relay("192.0.2.77")
    assert not ctx.may_relay("198.51.100.1")
    assert not ctx.may_relay("not an address")


def test_remembered_answers_are_bounded_and_stay_right_after_the_reset() -> None:
    ctx = _context(["10.0.0.0/8"])
    for i in range(RELAY_VERDICTS_MAX + 10):
        ip = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"
        assert ctx.may_relay(ip), ip
        assert not ctx.may_relay(f"172.16.{i // 256 % 256}.{i % 256}")
        assert len(ctx._relay_verdicts) <= RELAY_VERDICTS_MAX
    assert ctx.may_relay("10.200.0.1")
    assert not ctx.may_relay("11.0.0.1")


def test_a_reloaded_context_answers_from_the_new_networks() -> None:
    old = _context(["192.0.2.0/24"])
    assert old.may_relay("192.0.2.1")
    new = _context(["198.51.100.0/24"])  # what a SIGHUP reload builds
    assert not new.may_relay("192.0.2.1")
    assert new.may_relay("198.51.100.9")
    assert old.may_relay("192.0.2.1")  # sessions still on the old context keep it
