"""Static routes / smart host precedence and wildcard matching (no DNS needed)."""

from __future__ import annotations

from relay.config import OutboundConfig, Route
from relay.outbound.resolver import Resolver
from relay.outbound.routing import Hop, Router, match_route


def test_match_route_precedence():
    table = {"a.example": ["x"], "*.example": ["w"], "*.b.example": ["wb"], "*": ["any"]}
    assert match_route("a.example", table) == ["x"]
    assert match_route("A.Example.", table) == ["x"]
    assert match_route("c.example", table) == ["w"]
    assert match_route("c.b.example", table) == ["wb"]
    assert match_route("example", table) == ["any"]
    assert match_route("other.org", {"*.example": ["w"]}) is None


def _router(**kw) -> Router:
    return Router(OutboundConfig(**kw), Resolver(["127.0.0.1:9"]))


def test_routes_beat_smart_host():
    r = _router(smtp_port=25, smart_host="smart.example:587",
                routes=[Route(domain="*.corp.example", hosts=["[::1]:2525", "10.0.0.1"])])
    assert r.static_hosts("x.corp.example") == [("::1", 2525), ("10.0.0.1", 25)]
    assert r.static_hosts("gmail.example") == [("smart.example", 587)]


def test_first_route_for_a_key_wins():
    r = _router(routes=[Route(domain="a.example", hosts=["h1"]),
                        Route(domain="a.example", hosts=["h2"])])
    assert r.static_hosts("a.example") == [("h1", 25)]
    assert r.static_hosts("b.example") is None


async def test_static_ip_hops_need_no_dns():
    # The resolver points at a closed port: any lookup would fail; none happens.
    r = _router(smtp_port=2525, routes=[Route(domain="a.example",
                                              hosts=["127.0.0.2", "127.0.0.3:26"])])
    assert await r.hops("a.example") == [Hop("127.0.0.2", "127.0.0.2", 2525),
                                         Hop("127.0.0.3", "127.0.0.3", 26)]
    assert r.resolver.queries == 0


async def test_address_literal_domain():
    r = _router(smtp_port=2525)
    assert await r.hops("[127.0.0.7]") == [Hop("[127.0.0.7]", "127.0.0.7", 2525)]
    assert await r.hops("[IPv6:::1]") == [Hop("[ipv6:::1]", "::1", 2525)]


async def test_destination_key_without_rollup_is_domain():
    r = _router()
    assert await r.destination_key("A.Example.") == "a.example"
    assert r.resolver.queries == 0
