"""MX and address resolution for delivery (RFC 5321 section 5.1), with a TTL cache.

Contract:

- ``await resolver.mx(domain)`` -> ``list[MXHost]`` in the order to try them: ascending
  preference, shuffled among equal preferences (RFC 5321 5.1: "the client SHOULD randomize
  among equal-preference MXs"). No MX records but an A/AAAA -> one implicit MX, the domain
  itself. The list is freshly shuffled per call; the cached answer is not.
- Errors are ``ResolveError`` with ``permanent`` set: NXDOMAIN -> permanent 5.1.2, null MX
  (RFC 7505: a single ``MX 0 .``) -> permanent 5.1.10, no MX and no address -> permanent
  5.1.2; SERVFAIL, REFUSED, timeouts -> transient 4.4.3 (retry later, never bounce).
- ``await resolver.addresses(host)`` -> IPv4 then IPv6 addresses of an MX host.

Answers (positive and negative) are cached for their TTL, capped at ``max_ttl`` and
floored at ``min_ttl``; transient failures are cached briefly (``error_ttl``) so a broken
DNS server is not hammered by every queued job. Cache time is ``trio.current_time()`` so
MockClock tests can expire entries instantly. The cache is per process (principle 4).

dnspython's async resolver runs on the trio backend. Nameservers come from
``outbound.resolvers`` ("ip" or "ip:port"); empty -> /etc/resolv.conf.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import trio

from relay.config import parse_hostport

__all__ = ["MXHost", "ResolveError", "Resolver"]


@dataclass(frozen=True, slots=True)
class MXHost:
    """One exchange: its name (without trailing dot) and preference."""

    name: str
    preference: int
    #: True when the domain had no MX and its own address is used (RFC 5321 5.1).
    implicit: bool = False


class ResolveError(Exception):
    """Resolution failed. ``permanent`` failures bounce; transient ones retry."""

    def __init__(self, text: str, *, permanent: bool, enhanced: str) -> None:
        super().__init__(text)
        self.text = text
        self.permanent = permanent
        self.enhanced = enhanced

    @property
    def reply_line(self) -> str:
        """A reply-like line for events and DSNs (5xx/4xx plus enhanced code)."""
        code = "550" if self.permanent else "451"
        return f"{code} {self.enhanced} {self.text}"


class _Negative:
    """Cached "no such data" for one (name, type): NODATA (``nxdomain`` False) or NXDOMAIN."""

    __slots__ = ("nxdomain",)

    def __init__(self, nxdomain: bool) -> None:
        self.nxdomain = nxdomain


_Answer = list[tuple[int, str]] | list[str] | _Negative | ResolveError
#: dnspython's errors for a name that cannot be put in a query at all.
_BAD_NAME = (dns.name.NameTooLong, dns.name.LabelTooLong, dns.name.EmptyLabel,
             dns.name.BadEscape, dns.name.IDNAException)


class Resolver:
    """Caching MX/A/AAAA resolver on dnspython's trio backend (see module doc)."""

    def __init__(
        self,
        nameservers: list[str] | None = None,
        *,
        timeout: float = 5.0,
        max_ttl: float = 3600.0,
        min_ttl: float = 0.0,
        negative_ttl: float = 300.0,
        error_ttl: float = 5.0,
        ipv6: bool = True,
    ) -> None:
        if nameservers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            servers: list[dns.nameserver.Nameserver] = []
            for ns in nameservers:
                host, port = parse_hostport(ns, 53)
                servers.append(dns.nameserver.Do53Nameserver(host, port or 53))
            self._resolver.nameservers = servers
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.cache = None  # our own TTL cache, driven by trio's clock
        self._backend = dns.asyncbackend.get_backend("trio")
        self.timeout = timeout
        self.max_ttl = max_ttl
        self.min_ttl = min_ttl
        self.negative_ttl = negative_ttl
        self.error_ttl = error_ttl
        self.ipv6 = ipv6
        self._cache: dict[tuple[str, int], tuple[float, _Answer]] = {}
        #: Queries actually sent (cache misses), for tests and stats.
        self.queries = 0

    def _ttl(self, ttl: float) -> float:
        return max(self.min_ttl, min(self.max_ttl, ttl))

    async def _query(self, name: str, rdtype: int) -> _Answer:
        """One cached lookup: a list of answers, a _Negative, or a transient ResolveError."""
        key = (name.lower().rstrip("."), rdtype)
        now = trio.current_time()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        self.queries += 1
        answer: _Answer
        try:
            ans = await self._resolver.resolve(
                key[0] + ".", rdtype, lifetime=self.timeout, search=False,
                raise_on_no_answer=False, backend=self._backend,
            )
        except dns.resolver.NXDOMAIN:
            answer, ttl = _Negative(nxdomain=True), self.negative_ttl
        except _BAD_NAME as e:
            # A name no DNS query can carry (a label over 63 octets, an empty label, a
            # bad escape in an MX target): no retry will ever resolve it.
            answer = ResolveError(f"{key[0][:300]} is not a valid domain name: "
                                  f"{type(e).__name__}", permanent=True, enhanced="5.1.2")
            ttl = self.negative_ttl
        except dns.exception.DNSException as e:
            # SERVFAIL/REFUSED from every server, timeouts, and whatever else a broken or
            # hostile DNS server can make dnspython raise: worth another try later.
            answer = ResolveError(f"DNS lookup of {key[0][:300]} failed: {type(e).__name__}",
                                  permanent=False, enhanced="4.4.3")
            self._cache[key] = (now + self.error_ttl, answer)
            return answer
        else:
            rrset = ans.rrset
            if rrset is None:
                answer = _Negative(nxdomain=False)
                ttl = self._negative_ttl_of(ans)
            else:
                ttl = rrset.ttl
                if rdtype == dns.rdatatype.MX:
                    answer = [(r.preference, r.exchange.to_text(omit_final_dot=True))
                              for r in rrset]
                else:
                    answer = [r.address for r in rrset]
        self._cache[key] = (now + self._ttl(ttl), answer)
        return answer

    def _negative_ttl_of(self, ans: dns.resolver.Answer) -> float:
        """RFC 2308: negative TTL = min(SOA TTL, SOA minimum); default when no SOA."""
        for rrset in ans.response.authority:
            if rrset.rdtype == dns.rdatatype.SOA:
                return min(rrset.ttl, rrset[0].minimum)
        return self.negative_ttl

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of ``host``; [] when it has none. Transient errors raise
        ResolveError(permanent=False); NXDOMAIN returns []."""
        out: list[str] = []
        types = [dns.rdatatype.A, dns.rdatatype.AAAA] if self.ipv6 else [dns.rdatatype.A]
        error: ResolveError | None = None
        for rdtype in types:
            ans = await self._query(host, rdtype)
            if isinstance(ans, ResolveError):
                error = ans
            elif isinstance(ans, list):
                out.extend(str(a) for a in ans)
        if not out and error is not None:
            raise error
        return out

    async def mx(self, domain: str) -> list[MXHost]:
        """The MX hosts of ``domain`` in the order to try them (see module doc)."""
        domain = domain.lower().rstrip(".")
        ans = await self._query(domain, dns.rdatatype.MX)
        if isinstance(ans, ResolveError):
            raise ans
        if isinstance(ans, _Negative):
            if ans.nxdomain:
                raise ResolveError(f"domain {domain} does not exist (NXDOMAIN)",
                                   permanent=True, enhanced="5.1.2")
            # NODATA: implicit MX (RFC 5321 5.1) if the domain itself has an address.
            if await self.addresses(domain):
                return [MXHost(domain, 0, implicit=True)]
            raise ResolveError(f"domain {domain} has no MX and no address",
                               permanent=True, enhanced="5.1.2")
        records = sorted(ans)  # type: ignore[arg-type]
        if any(name in ("", ".") for _, name in records):
            # RFC 7505: a null MX means the domain accepts no mail at all.
            raise ResolveError(f"domain {domain} does not accept mail (null MX)",
                               permanent=True, enhanced="5.1.10")
        by_pref: dict[int, list[str]] = {}
        for pref, name in records:
            by_pref.setdefault(pref, []).append(name)
        out: list[MXHost] = []
        for pref in sorted(by_pref):
            names = by_pref[pref][:]
            random.shuffle(names)
            out.extend(MXHost(n, pref) for n in names)
        return out

    def clear(self) -> None:
        """Forget every cached answer (tests; a config reload that changes resolvers)."""
        self._cache.clear()
