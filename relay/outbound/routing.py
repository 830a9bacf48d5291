"""Where mail for a domain goes: static routes, then the smart host, then MX.

Contract:

- ``Router.static_hosts(domain)`` -> the configured ``(host, port)`` list for a domain or
  None. Static routes (exact domain first, then the most specific ``*.suffix`` wildcard,
  then ``*``) take precedence over ``smart_host``, which takes precedence over MX. Route
  hosts are used as given (like Postfix's ``[host]``: no MX lookup, just A/AAAA).
- ``await Router.hops(domain)`` -> ``list[Hop]``: every (MX host, IP, port) to try, in
  order, at most ``max_hops``. Raises ``ResolveError`` (permanent: NXDOMAIN, null MX;
  transient: DNS trouble, or no MX host has an address).
- ``await Router.destination_key(domain)`` -> the name the throttles and the
  per-destination nursery are keyed by: ``provider:NAME`` when every MX host of the
  domain matches that provider's ``match_mx`` (so the many domains hosted at one
  provider share one set of limits), else the domain itself. Only MX-routed domains can
  belong to a provider, and only when providers are configured (else no lookup).

``Router`` is rebuilt on a config reload; the resolver (and its cache) is kept.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from relay.config import OutboundConfig, parse_hostport
from relay.outbound.resolver import ResolveError, Resolver

__all__ = ["Hop", "Router", "match_route"]


@dataclass(frozen=True, slots=True)
class Hop:
    """One place to connect to: the MX (or route) host name, its IP and the port."""

    mx_host: str
    ip: str
    port: int


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def match_route(domain: str, routes: dict[str, list[str]]) -> list[str] | None:
    """Exact key, then the most specific ``*.suffix`` wildcard, then ``*``.

    ``*.example.com`` matches ``a.example.com`` and ``b.a.example.com`` but not
    ``example.com`` itself (as in the throttle table)."""
    domain = domain.lower().rstrip(".")
    if domain in routes:
        return routes[domain]
    labels = domain.split(".")
    for i in range(1, len(labels)):
        key = "*." + ".".join(labels[i:])
        if key in routes:
            return routes[key]
    return routes.get("*")


_CACHE_MAX = 10000


class Router:
    """Resolves a routing domain to hops (see module doc)."""

    def __init__(self, config: OutboundConfig, resolver: Resolver, *, max_hops: int = 10) -> None:
        self.config = config
        self.resolver = resolver
        self.max_hops = max_hops
        self._routes: dict[str, list[str]] = {}
        for route in config.routes:
            # First route for a key wins, like a first-match transport table.
            self._routes.setdefault(route.domain.lower().rstrip("."), list(route.hosts))
        #: key_needs_dns answers per domain. The engine asks for every claimed job and
        #: the answer (a full throttle merge plus a route match) only changes with the
        #: config, which replaces the Router. Cleared when it gets big.
        self._needs_dns: dict[str, bool] = {}

    def static_hosts(self, domain: str) -> list[tuple[str, int]] | None:
        """Configured hosts for ``domain`` (route, else smart host), or None for MX."""
        hosts = match_route(domain, self._routes)
        if hosts is None and self.config.smart_host:
            hosts = [self.config.smart_host]
        if hosts is None:
            return None
        out = []
        for h in hosts:
            host, port = parse_hostport(h, self.config.smtp_port)
            out.append((host, port or self.config.smtp_port))
        return out

    def key_needs_dns(self, domain: str) -> bool:
        """Whether ``destination_key`` must look up MX records (to match providers)."""
        known = self._needs_dns.get(domain)
        if known is not None:
            return known
        key = domain.lower().rstrip(".")
        needs = bool(self.config.providers) and self.static_hosts(key) is None
        if len(self._needs_dns) >= _CACHE_MAX:
            self._needs_dns.clear()
        self._needs_dns[domain] = needs
        return needs

    async def destination_key(self, domain: str, fallback: str | None = None) -> str:
        """``provider:NAME`` or the domain (module doc). When the MX lookup fails:
        ``fallback`` (the key the job was last sharded by, so a DNS hiccup does not move
        it between workers), else the domain."""
        domain = domain.lower().rstrip(".")
        if not self.key_needs_dns(domain):
            return domain
        try:
            mxs = await self.resolver.mx(domain)
        except ResolveError:
            return fallback or domain
        return self.config.provider_for([m.name for m in mxs]) or domain

    async def hops(self, domain: str) -> list[Hop]:
        """Every (host, ip, port) to try for ``domain``, in order."""
        domain = domain.lower().rstrip(".")
        port = self.config.smtp_port
        if domain.startswith("[") and domain.endswith("]"):
            # Address literal (RFC 5321 4.1.3): deliver to that address directly.
            literal = domain[1:-1]
            if literal.lower().startswith("ipv6:"):
                literal = literal[5:]
            if not _is_ip(literal):
                raise ResolveError(f"bad address literal {domain}", permanent=True,
                                   enhanced="5.1.2")
            return [Hop(domain, literal, port)]
        static = self.static_hosts(domain)
        if static is not None:
            names = [(h, p) for h, p in static]
        else:
            names = [(m.name, port) for m in await self.resolver.mx(domain)]
        hops: list[Hop] = []
        last_error: ResolveError | None = None
        for host, p in names:
            if _is_ip(host):
                hops.append(Hop(host, host, p))
            else:
                try:
                    addrs = await self.resolver.addresses(host)
                except ResolveError as e:
                    last_error = e
                    continue
                hops.extend(Hop(host, ip, p) for ip in addrs)
            if len(hops) >= self.max_hops:
                break
        if not hops:
            if last_error is not None:
                raise last_error
            raise ResolveError(f"no address for any mail exchanger of {domain}",
                               permanent=False, enhanced="4.4.4")
        return hops[: self.max_hops]
