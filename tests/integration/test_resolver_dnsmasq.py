"""Resolver and router against a real dnsmasq on loopback."""

from __future__ import annotations

import pytest
import trio

from relay.config import OutboundConfig, Route, decode_config
from relay.outbound.resolver import MXHost, ResolveError, Resolver
from relay.outbound.routing import Hop, Router

try:  # tests/integration may or may not be a package; the fixture module is a sibling.
    from tests.integration import dnsmasq as _dnsmasq
except ImportError:
    import dnsmasq as _dnsmasq  # type: ignore[no-redef]

dnsmasq = _dnsmasq.dnsmasq


async def test_mx_order_by_preference(dnsmasq):
    dns = dnsmasq(mx={"a.test": [(20, "mx2.a.test"), (10, "mx1.a.test"), (30, "mx3.a.test")]})
    r = Resolver([dns.nameserver])
    assert await r.mx("a.test") == [
        MXHost("mx1.a.test", 10), MXHost("mx2.a.test", 20), MXHost("mx3.a.test", 30)
    ]


async def test_equal_preference_is_randomised(dnsmasq):
    dns = dnsmasq(mx={"a.test": [(10, "first.a.test"), (20, "x.a.test"), (20, "y.a.test"),
                                 (20, "z.a.test")]})
    r = Resolver([dns.nameserver])
    seen = set()
    for _ in range(60):
        hosts = await r.mx("a.test")
        assert hosts[0].name == "first.a.test"
        assert {h.name for h in hosts[1:]} == {"x.a.test", "y.a.test", "z.a.test"}
        seen.add(tuple(h.name for h in hosts[1:]))
    # 6 permutations; 60 draws missing more than 2 of them has negligible probability.
    assert len(seen) >= 4
    # ... and the shuffling is done on the cached answer: one query only.
    assert dns.count("MX", "a.test") == 1


async def test_implicit_mx(dnsmasq):
    dns = dnsmasq(hosts={"plain.test": "127.0.0.3"})
    r = Resolver([dns.nameserver])
    assert await r.mx("plain.test") == [MXHost("plain.test", 0, implicit=True)]
    router = Router(OutboundConfig(resolvers=[dns.nameserver], smtp_port=2525), r)
    assert await router.hops("plain.test") == [Hop("plain.test", "127.0.0.3", 2525)]


async def test_null_mx_is_permanent(dnsmasq):
    dns = dnsmasq(null_mx=["nullmx.test"])
    r = Resolver([dns.nameserver])
    try:
        await r.mx("nullmx.test")
    except ResolveError as e:
        assert e.permanent and e.enhanced == "5.1.10"
    else:
        raise AssertionError("null MX must raise")


async def test_nxdomain_is_permanent(dnsmasq):
    dns = dnsmasq()
    r = Resolver([dns.nameserver])
    try:
        await r.mx("nope.test")
    except ResolveError as e:
        assert e.permanent and e.enhanced == "5.1.2"
    else:
        raise AssertionError("NXDOMAIN must raise")


async def test_no_mx_no_address_is_permanent(dnsmasq):
    # A name that exists (it has an MX for a sub-name? no: give it only a TXT) but
    # has neither MX nor A/AAAA.
    dns = dnsmasq(extra=["--txt-record=empty.test,hello"])
    r = Resolver([dns.nameserver])
    try:
        await r.mx("empty.test")
    except ResolveError as e:
        assert e.permanent
    else:
        raise AssertionError("no MX, no address must raise")


async def test_refused_is_transient(dnsmasq):
    dns = dnsmasq()  # not authoritative for .example: answers REFUSED
    r = Resolver([dns.nameserver], timeout=2.0)
    try:
        await r.mx("elsewhere.example")
    except ResolveError as e:
        assert not e.permanent and e.enhanced.startswith("4.")
    else:
        raise AssertionError("REFUSED must raise a transient error")


async def test_timeout_is_transient():
    # A UDP socket that never answers: the lookup times out -> transient.
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    r = Resolver([f"127.0.0.1:{port}"], timeout=0.3)
    with trio.fail_after(5):
        try:
            await r.mx("a.test")
        except ResolveError as e:
            assert not e.permanent
        else:
            raise AssertionError("timeout must raise")
    sock.close()


@pytest.mark.parametrize("name", ["a" * 64 + ".test", "a..b.test", ("a" * 60 + ".") * 5 + "test",
                                  "bad\\999escape.test"])
async def test_a_name_no_query_can_carry_is_permanent(name: str) -> None:
    """A recipient domain (or MX target) that dnspython cannot even encode bounces (5.1.2)
    instead of raising out of the delivery; no query is sent."""
    r = Resolver(["127.0.0.1:9"], timeout=0.3)
    with trio.fail_after(5):
        with pytest.raises(ResolveError) as info:
            await r.mx(name)
        assert info.value.permanent and info.value.enhanced == "5.1.2"


async def test_ttl_cache_counts_queries(dnsmasq, mock_clock):
    """Answers are served from cache until their TTL passes (a MockClock we jump by hand:
    autojump would also fire the lookup timeouts while dnsmasq answers; the server's log
    counts the queries that really went out)."""
    dns = dnsmasq(mx={"c.test": [(10, "mx.c.test")]}, hosts={"mx.c.test": "127.0.0.2"},
                  ttl=30)
    r = Resolver([dns.nameserver])
    for _ in range(5):
        await r.mx("c.test")
        await r.addresses("mx.c.test")
    assert dns.count("MX", "c.test") == 1
    assert dns.count("A", "mx.c.test") == 1
    mock_clock.jump(31)
    await r.mx("c.test")
    assert dns.count("MX", "c.test") == 2


async def test_ttl_cap(dnsmasq, mock_clock):
    dns = dnsmasq(mx={"c.test": [(10, "mx.c.test")]}, ttl=86400)
    r = Resolver([dns.nameserver], max_ttl=60)
    await r.mx("c.test")
    mock_clock.jump(30)
    await r.mx("c.test")
    assert dns.count("MX", "c.test") == 1
    mock_clock.jump(31)
    await r.mx("c.test")
    assert dns.count("MX", "c.test") == 2


async def test_router_hops_follow_mx_order(dnsmasq):
    dns = dnsmasq(
        mx={"d.test": [(10, "mx1.d.test"), (20, "mx2.d.test")]},
        hosts={"mx1.d.test": ["127.0.0.2", "::1"], "mx2.d.test": "127.0.0.3"},
    )
    cfg = OutboundConfig(resolvers=[dns.nameserver], smtp_port=2600)
    router = Router(cfg, Resolver(cfg.resolvers))
    assert await router.hops("d.test") == [
        Hop("mx1.d.test", "127.0.0.2", 2600),
        Hop("mx1.d.test", "::1", 2600),
        Hop("mx2.d.test", "127.0.0.3", 2600),
    ]


async def test_router_static_routes_and_smart_host(dnsmasq):
    dns = dnsmasq(mx={"d.test": [(10, "mx1.d.test")]}, hosts={"relay.test": "127.0.0.5"})
    cfg = OutboundConfig(
        resolvers=[dns.nameserver],
        smtp_port=2600,
        smart_host="127.0.0.9:2700",
        routes=[Route(domain="d.test", hosts=["127.0.0.4:2601", "relay.test"]),
                Route(domain="*.w.test", hosts=["127.0.0.6"])],
    )
    router = Router(cfg, Resolver(cfg.resolvers))
    assert await router.hops("D.test.") == [
        Hop("127.0.0.4", "127.0.0.4", 2601), Hop("relay.test", "127.0.0.5", 2600)
    ]
    assert await router.hops("x.y.w.test") == [Hop("127.0.0.6", "127.0.0.6", 2600)]
    # Everything else goes to the smart host, without any MX lookup.
    assert await router.hops("other.test") == [Hop("127.0.0.9", "127.0.0.9", 2700)]
    assert dns.count("MX", "other.test") == 0


async def test_provider_destination_key(dnsmasq):
    """A domain belongs to a provider when ALL its MX hosts match (KumoMTA's rule): one
    MX of another provider, or none, and it is its own destination."""
    dns = dnsmasq(mx={"one.test": [(10, "mx.provider.test")],
                      "two.test": [(5, "MX.Provider.test"), (10, "b.provider.test")],
                      "mixed.test": [(10, "mx.provider.test"), (20, "mx.other.test")],
                      "solo.test": [(10, "mx.other.test")]})
    cfg = decode_config(f"""
[outbound]
resolvers = ["{dns.nameserver}"]
[outbound.providers.prov]
match_mx = ["*.PROVIDER.test"]
""").outbound
    router = Router(cfg, Resolver(cfg.resolvers))
    assert await router.destination_key("one.test") == "provider:prov"
    assert await router.destination_key("Two.Test") == "provider:prov"
    assert await router.destination_key("mixed.test") == "mixed.test"
    assert await router.destination_key("solo.test") == "solo.test"
    assert await router.destination_key("nx.test") == "nx.test"  # NXDOMAIN: the domain
    assert await router.destination_key("nx.test", "provider:prov") == "provider:prov"
