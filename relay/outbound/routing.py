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
- ``Router.credentials(domain)`` -> the AUTH ``Credentials`` of the route (or smart host)
  the domain's mail goes to, or None; the hops of that route carry them (``Hop.auth``).
  MX hops never do: credentials are for the host they were configured for.

``Router`` is rebuilt on a config reload; the resolver (and its cache) is kept.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TypeVar

from relay.config import OutboundConfig, Route, SmtpAuth, parse_hostport
from relay.outbound.resolver import ResolveError, Resolver
from relay.smtp.client import Credentials

__all__ = ["Hop", "Router", "match_route"]


@dataclass(frozen=True, slots=True)
class Hop:
    """One place to connect to: the MX (or route) host name, its IP and the port, and
    the credentials to log in with there (a route's or the smart host's)."""

    mx_host: str
    ip: str
    port: int
    auth: Credentials | None = None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_T = TypeVar("_T")


def match_route(domain: str, routes: dict[str, _T]) -> _T | None:
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
        self._routes: dict[str, Route] = {}
        for route in config.routes:
            # First route for a key wins, like a first-match transport table.
            self._routes.setdefault(route.domain.lower().rstrip("."), route)
        #: key_needs_dns answers per domain. The engine asks for every claimed job and
        #: the answer (a full throttle merge plus a route match) only changes with the
        #: config, which replaces the Router. Cleared when it gets big.
        self._needs_dns: dict[str, bool] = {}

    def static_hosts(self, domain: str) -> list[tuple[str, int]] | None:
        """Configured hosts for ``domain`` (route, else smart host), or None for MX."""
        route = match_route(domain, self._routes)
        hosts = route.hosts if route is not None else None
        if hosts is None and self.config.smart_host:
            hosts = [self.config.smart_host]
        if hosts is None:
            return None
        out = []
        for h in hosts:
            host, port = parse_hostport(h, self.config.smtp_port)
            out.append((host, port or self.config.smtp_port))
        return out

    def credentials(self, domain: str) -> Credentials | None:
        """AUTH credentials for ``domain``'s route, else for the smart host when that is
        where its mail goes; None for MX delivery and routes without ``auth``."""
        route = match_route(domain, self._routes)
        if route is not None:
            return _credentials(route.auth)
        return _credentials(self.config.smart_host_auth) if self.config.smart_host else None

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
        auth = None
        if static is not None:
            names = [(h, p) for h, p in static]
            auth = self.credentials(domain)
        else:
            names = [(m.name, port) for m in await self.resolver.mx(domain)]
        hops: list[Hop] = []
        last_error: ResolveError | None = None
        for host, p in names:
            if _is_ip(host):
                hops.append(Hop(host, host, p, auth))
            else:
                try:
                    addrs = await self.resolver.addresses(host)
                except ResolveError as e:
                    last_error = e
                    continue
                hops.extend(Hop(host, ip, p, auth) for ip in addrs)
            if len(hops) >= self.max_hops:
                break
        if not hops:
            if last_error is not None:
                raise last_error
            raise ResolveError(f"no address for any mail exchanger of {domain}",
                               permanent=False, enhanced="4.4.4")
        return hops[: self.max_hops]


def _credentials(auth: SmtpAuth) -> Credentials | None:
    """The configured ``SmtpAuth`` as the client's Credentials (its password already read
    from ``password_file`` by ``load_config``), None when none is configured."""
    return Credentials(auth.username, auth.password) if auth.configured else None
