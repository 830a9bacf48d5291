"""``relay check-config --explain DOMAIN``: which destination a domain's mail goes to, its
effective limits, and which table each limit comes from (the operator's view of
``OutboundConfig.layers``, ``Router.destination_key`` and ``member_caps``)."""

from __future__ import annotations

from relay.config import PROVIDER_PREFIX, Config, Limits, Throttle
from relay.outbound.resolver import ResolveError, Resolver
from relay.outbound.routing import Router

__all__ = ["explain"]


async def explain(config: Config, domain: str) -> list[str]:
    """Lines describing how mail for ``domain`` is delivered (looks up its MX hosts
    through ``outbound.resolvers`` when providers are configured)."""
    outbound = config.outbound
    domain = domain.lower().rstrip(".")
    router = Router(outbound, Resolver(list(outbound.resolvers)))
    static = router.static_hosts(domain)
    if static is not None:
        hosts = ", ".join(f"{h}:{p}" for h, p in static)
        how = f"a static route / the smart host ({hosts})"
    elif not outbound.providers:
        how = "its MX hosts (no providers are configured)"
    else:
        try:
            mxs = [m.name for m in await router.resolver.mx(domain)]
        except ResolveError as e:
            mxs, how = [], f"its MX hosts, which cannot be looked up now: {e.reply_line}"
        else:
            how = "its MX hosts " + ", ".join(mxs)
    key = await router.destination_key(domain)
    lines = [f"{domain}: destination {key}, delivered to {how}"]
    if key.startswith(PROVIDER_PREFIX):
        table = outbound.layers(key)[-1][0]
        lines.append(f"  (every MX host matches {table} match_mx: its limits are shared by "
                     "all the provider's domains)")
    limits = outbound.throttle_for(key)
    sources = _sources(outbound.layers(key))
    lines += [_line(name, getattr(limits, name), sources[name])
              for name in Limits.__struct_fields__]
    for name, src in config.egress.sources.items():
        layers = outbound.layers(key, name, src)
        through = outbound.throttle_for(key, name, src)
        own = {f: t for f, t in _sources(layers).items() if t.startswith("[egress.")}
        if own:
            lines.append(f"  through egress source {name} ({src.source_address or 'any'}):")
            lines += [_line(f, getattr(through, f), t, indent=4) for f, t in own.items()]
    if key != domain:
        cap, rate = outbound.member_caps(domain)
        own = _sources(outbound.layers(domain)[2:])
        if cap is not None or rate is not None:
            lines.append(f"  {domain}'s own share of {key} (the stricter wins):")
        if cap is not None:
            lines.append(_line("max_connections", cap, own["max_connections"], indent=4))
        if rate is not None:
            lines.append(_line("max_message_rate", rate, own["max_message_rate"], indent=4))
    return lines


def _line(name: str, value: object, source: str, indent: int = 2) -> str:
    shown = f'"{value}"' if isinstance(value, str) else str(value)
    return f"{' ' * indent}{name} = {shown:<{36 - len(name) - indent}} {source}"


def _sources(layers: list[tuple[str, Throttle]]) -> dict[str, str]:
    """For each limit, the table of the strongest layer that sets it."""
    found: dict[str, str] = {}
    for source, layer in layers:
        for name in Limits.__struct_fields__:
            if getattr(layer, name) is not None:
                found[name] = source
    return found
