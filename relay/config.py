"""The relay's whole configuration: msgspec Structs and the one place that validates it.

A config file is TOML. Every section has defaults, so an empty file is a valid config
(the embedded default ``conf/relay.toml`` spells the defaults out with comments). Unknown
keys are errors: a typo in a throttle name must not silently fall back to a default.

``load_config(path)`` returns a ``Config`` or raises ``ConfigError`` whose message names the
file and the key as TOML spells it, in plain words (``conf/relay.toml:
inbound.max_recipients: expected an integer, got a string``, ``conf/relay.toml:
outbound.domains."gmail.com".tls: must be one of "off", "opportunistic", "required",
"verify" (got "yes")``), which is what ``relay check-config`` and a failed SIGHUP reload print.

Relative paths in a file (``spool.path``, ``log.events``, ``log.mail_log``,
``inbound.tls_cert``, ``inbound.tls_key``, ``dkim.signers[].key``, ``bounces.rules``,
``bounces.secret_file``, ``outbound.tls_ca_file``, ``password_file``,
``webhooks[].secret_file``) are relative to the
directory of that file, so the queue commands work from any directory: ``load_config``
makes them absolute (and reads the secret and password files).
``decode_config`` has no file and leaves them as they are (relative to the current
directory).

Names and defaults follow Postfix where Postfix has an equivalent (``smtpd_recipient_limit``
-> ``inbound.max_recipients = 1000``, ``message_size_limit`` -> ``inbound.max_message_size``,
``smtpd_timeout`` -> ``inbound.command_timeout = 300``, ``smtpd_hard_error_limit`` ->
``inbound.max_errors = 20``).
"""

from __future__ import annotations

import binascii
import difflib
import ipaddress
import json
import logging
import os
import re
import socket
import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

import msgspec
import msgspec.structs

from relay.model import ascii_int, ip_address
from relay.privileges import lookup_group, lookup_user

__all__ = [
    "AdminConfig",
    "ApiKey",
    "AuthUser",
    "BouncesConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DkimConfig",
    "DkimSigner",
    "HttpConfig",
    "InboundConfig",
    "Limits",
    "LogConfig",
    "OutboundConfig",
    "RelayPolicyConfig",
    "Route",
    "ServerConfig",
    "SmtpAuth",
    "SpoolConfig",
    "SuppressRule",
    "SuppressionConfig",
    "TenantLimits",
    "Throttle",
    "WebhookConfig",
    "check_dkim_name",
    "decode_config",
    "load_config",
    "parse_connection_limit",
    "parse_duration",
    "parse_rate",
    "parse_size",
    "reload_config",
    "split_local",
]


class ConfigError(Exception):
    """A config file that cannot be used; the message names the file and the key."""


_SIZE_RE = re.compile(r"^\s*([0-9]{1,15})\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(value: int | str) -> int:
    """``10485760``, ``"10MiB"``, ``"10M"`` or ``"512KB"`` -> bytes (binary multiples)."""
    if isinstance(value, int):
        if value < 0:
            raise ValueError("size must not be negative")
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"invalid size {value!r} (examples: 10485760, \"10MiB\", \"512KiB\")")
    unit = (m.group(2) or "").lower()[:1]
    return int(m.group(1)) * _SIZE_UNITS[unit]


_RATE_RE = re.compile(
    r"^\s*([0-9]{1,12}(?:\.[0-9]{1,12})?)\s*/\s*([0-9]{0,9})\s*(s|sec|m|min|h|hour|d|day)\s*$",
    re.ASCII,
)
_RATE_SECONDS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hour": 3600, "d": 86400,
                 "day": 86400}


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: str) -> float:
    """``"90"``, ``"30m"``, ``"12h"``, ``"30d"``, ``"2w"`` -> seconds (at least 1)."""
    unit = value[-1:].lower()
    number = ascii_int(value[:-1] if unit in _DURATION_UNITS else value)
    if number is None or number < 1:
        raise ValueError(f"invalid duration {value!r} (examples: \"3600\", \"30m\", "
                         "\"12h\", \"30d\")")
    return float(number * _DURATION_UNITS.get(unit, 1))


def parse_rate(value: str) -> float:
    """``"300/min"``, ``"10/s"``, ``"1000/h"``, ``"5/10s"`` -> events per second."""
    m = _RATE_RE.match(value)
    if not m:
        raise ValueError(f"invalid rate {value!r} (examples: \"300/min\", \"10/s\", \"5/10s\")")
    count = float(m.group(1))
    period = int(m.group(2) or 1) * _RATE_SECONDS[m.group(3)]
    if count <= 0:
        raise ValueError(f"rate {value!r} must be positive")
    if period <= 0:
        raise ValueError(f"rate {value!r} needs a period of at least 1 second")
    return count / period


#: A throttle written ``"local:300/min"`` / ``"local:20"`` is this node's own even when
#: ``[cluster] redis`` shares the others between the nodes (KumoMTA's spelling).
LOCAL_PREFIX = "local:"


def split_local(value: str) -> tuple[str, bool]:
    """``"local:300/min"`` -> ("300/min", True); ``"300/min"`` -> ("300/min", False)."""
    if value.startswith(LOCAL_PREFIX):
        return value[len(LOCAL_PREFIX):].strip(), True
    return value, False


def parse_connection_limit(value: int | str) -> tuple[int, bool]:
    """``max_connections``: ``20`` (cluster-wide with ``[cluster] redis``) or
    ``"local:20"`` (this node's own) -> (20, is local). A string is only for ``local:``."""
    if isinstance(value, int):
        return value, False
    text, local = split_local(value)
    if not local:
        raise ValueError("expected an integer, got a string")
    number = ascii_int(text)
    if number is None or number < 1:
        raise ValueError(f"invalid connection limit {value!r} (examples: 20, \"local:20\")")
    return number, local


def _check_scoped_rate(value: str) -> None:
    """A throttle's rate, ``local:`` or not (the error quotes it as written)."""
    try:
        parse_rate(split_local(value)[0])
    except ValueError as e:
        reason = str(e).replace(repr(split_local(value)[0]), repr(value))
        raise ValueError(reason) from None


class _Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]


class ServerConfig(_Base):
    """Process model and identity."""

    #: Our name in the greeting, EHLO reply and Received headers (Postfix ``myhostname``).
    hostname: str = ""
    #: Worker processes; 0 means one per CPU this process may run on (its affinity
    #: mask, so ``taskset`` and cgroup cpusets are respected).
    workers: NonNegInt = 0
    #: How long SIGTERM waits for open SMTP transactions before workers are killed.
    shutdown_timeout: Seconds = 30.0
    #: Restart backoff for a worker that died: doubles from min to max.
    restart_backoff_min: Seconds = 0.5
    restart_backoff_max: Seconds = 30.0
    #: Run the workers as this user (Postfix mail_owner): the supervisor stays root to
    #: bind ports below 1024 and hands the sockets to the workers, which give root up
    #: before they open the spool or a log (relay.privileges). "" = no change.
    user: str = ""
    #: ... and this group; "" = the user's primary group.
    group: str = ""

    def resolved_hostname(self) -> str:
        return self.hostname or socket.getfqdn()

    def resolved_workers(self) -> int:
        if self.workers:
            return self.workers
        try:
            return len(os.sched_getaffinity(0)) or 1
        except AttributeError:  # not Linux
            return os.cpu_count() or 1


class AuthUser(_Base):
    """One SMTP AUTH account. ``password`` is ``scrypt$N$r$p$salt_b64$hash_b64`` or, for
    tests and quick setups only, ``plain$secret``."""

    username: str
    password: str
    #: The tenant this account sends for (accounting, suppression), as an HTTP API key's.
    tenant: str = ""


class InboundConfig(_Base):
    """The SMTP listener (Postfix smtpd_* equivalents)."""

    listen: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1:2525"])
    #: SIZE advertised and enforced (Postfix message_size_limit).
    max_message_size: int | str = 10240000
    #: Recipients per transaction; RFC 5321 requires at least 100 (smtpd_recipient_limit).
    max_recipients: Annotated[int, msgspec.Meta(ge=100)] = 1000
    #: Longest text line in DATA/BDAT, CRLF excluded (RFC 5321 4.5.3.1.6 says 1000 with CRLF).
    max_line_length: Annotated[int, msgspec.Meta(ge=998)] = 998
    #: Errors (4xx/5xx replies to bad commands) before the session ends with 421.
    max_errors: PositiveInt = 20
    #: Simultaneous sessions per worker, and per client IP per worker.
    max_sessions: PositiveInt = 2000
    max_sessions_per_client: PositiveInt = 500
    #: Seconds to wait before the greeting; a client that talks first is refused with 554
    #: (Postfix postscreen_greet_wait). 0 still refuses what arrived before the greeting.
    greet_pause: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    #: Per-state timeouts (RFC 5321 4.5.3.2): waiting for a command, for DATA/BDAT bytes.
    command_timeout: Seconds = 300.0
    data_timeout: Seconds = 180.0
    #: Minimum DATA/BDAT rate in bytes/s, measured over ``data_rate_window`` seconds; a
    #: slower client (byte trickling) gets 421 4.4.2.
    min_data_rate: NonNegInt = 1024
    data_rate_window: Seconds = 30.0
    #: PEM files for STARTTLS; STARTTLS is advertised only when both are set. Relative
    #: paths are relative to the config file's directory.
    tls_cert: str = ""
    tls_key: str = ""
    #: Offer AUTH on a connection without TLS (Postfix smtpd_tls_auth_only = no).
    allow_plaintext_auth: bool = False
    auth_users: list[AuthUser] = msgspec.field(default_factory=list)
    #: A bare LF (no CR) in a command or in content: "reject" it (500 / 550 5.6.0), or
    #: "normalize" it to CRLF (Postfix 3.9 smtpd_forbid_bare_newline). Either way end of
    #: data is only CRLF.CRLF and a bare CR is refused.
    bare_newline: Literal["reject", "normalize"] = "reject"
    #: Received: plus Delivered-To: headers a message may carry before it is refused as
    #: a mail loop, 554 5.4.6 (RFC 5321 6.3; Postfix hopcount_limit).
    max_hops: PositiveInt = 50
    #: Header fields that tag a message received over SMTP for accounting, like the
    #: HTTP API's tenant and campaign_id (e.g. "X-Tenant", "X-Campaign"); "" = none.
    #: Only clients that may relay send mail at all, so the tags are theirs to set.
    tenant_header: str = ""
    campaign_header: str = ""
    #: Remove those fields before the message is stored (and delivered).
    strip_tag_headers: bool = True

    def max_message_bytes(self) -> int:
        return parse_size(self.max_message_size)


class RelayPolicyConfig(_Base):
    """Who may relay (Postfix mynetworks + permit_sasl_authenticated)."""

    allow_networks: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.allow_networks]


class SpoolConfig(_Base):
    """The LMDB queue."""

    #: The spool directory; relative paths are relative to the config file's directory.
    path: str = "var/spool"
    #: LMDB map size: the most the spool may grow to (sparse file; set it large).
    map_size: int | str = "32GiB"
    #: Group commit: a commit waits at most this long for more messages to share it. 0 is
    #: best on most disks: messages that arrive during a commit share the next one anyway.
    commit_window: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    #: ... and takes at most this many messages.
    commit_max_messages: PositiveInt = 512

    def map_size_bytes(self) -> int:
        return parse_size(self.map_size)


class LogConfig(_Base):
    """Operator-facing logs."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    #: JSON-lines event log (Reception, Delivery, TransientFailure, Bounce, Expiration).
    #: Relative paths are relative to the config file's directory. "" disables it.
    events: str = "var/log/events.jsonl"
    #: The mail log (relay.events.maillog): a Postfix-style line per reception and per
    #: recipient outcome, which pflogsumm reads. A file path (relative to the config
    #: file's directory), "-" or "stderr" for the process log, "" = none (Postfix
    #: maillog_file).
    mail_log: str = ""
    #: Which of its lines are written: "info" all, "warning" deferrals, bounces and
    #: expirations, "error" bounces and expirations only.
    mail_log_level: Literal["info", "warning", "error"] = "info"


class Throttle(_Base):
    """Delivery limits for one destination. Every field is optional so an override names
    only what it changes; ``OutboundConfig.throttle_for`` merges default <- wildcard <- exact.

    With ``[cluster] redis`` set, ``max_connections``, ``max_message_rate`` and
    ``max_connection_rate`` hold for all the nodes together; written with the ``local:``
    prefix (``"local:20"``, ``"local:300/min"``) a limit stays each node's own.
    """

    #: 20, or "local:20" (see above).
    max_connections: PositiveInt | str | None = None
    max_deliveries_per_connection: PositiveInt | None = None
    max_recipients_per_message: PositiveInt | None = None
    #: e.g. "300/min" (or "local:300/min"); "" means unlimited.
    max_message_rate: str | None = None
    max_connection_rate: str | None = None
    connect_timeout: Seconds | None = None
    command_timeout: Seconds | None = None
    data_timeout: Seconds | None = None
    idle_timeout: Seconds | None = None
    retry_interval: Seconds | None = None
    max_retry_interval: Seconds | None = None
    max_age: Seconds | None = None
    #: "off" | "opportunistic" (Postfix may) | "required" (encrypt: TLS, certificate not
    #: verified) | "verify" (TLS, certificate and host name verified).
    tls: Literal["off", "opportunistic", "required", "verify"] | None = None
    #: A connection lost after the end of data was sent, before its reply: the message
    #: may have been delivered. "retry" (a duplicate is possible) or "delivered" (a loss
    #: is possible); either way the event says ``ambiguous: true``.
    ambiguous: Literal["retry", "delivered"] | None = None


class Limits(_Base):
    """A destination's effective limits: every field resolved (``throttle_for``), so the
    delivery engine never repeats a default. Field meanings as in ``Throttle``, without
    the ``local:`` prefixes (``OutboundConfig.local_limits`` tells which had one)."""

    max_connections: int
    max_deliveries_per_connection: int
    max_recipients_per_message: int
    max_message_rate: str
    max_connection_rate: str
    connect_timeout: float
    command_timeout: float
    data_timeout: float
    idle_timeout: float
    retry_interval: float
    max_retry_interval: float
    max_age: float
    tls: Literal["off", "opportunistic", "required", "verify"]
    ambiguous: Literal["retry", "delivered"]


#: The built-in default throttle, which the ``[outbound.default]`` table overrides: the
#: one place the delivery defaults are written down (conf/relay.toml documents them).
BUILTIN_THROTTLE = Throttle(
    max_connections=20,
    max_deliveries_per_connection=100,
    max_recipients_per_message=100,
    max_message_rate="",
    max_connection_rate="",
    connect_timeout=30.0,
    command_timeout=300.0,
    data_timeout=600.0,
    idle_timeout=5.0,
    retry_interval=300.0,
    max_retry_interval=4000.0,
    max_age=5 * 86400.0,
    tls="opportunistic",
    ambiguous="retry",
)


class Provider(Throttle, kw_only=True):
    """A mailbox provider: every domain whose MX hosts ALL match ``match_mx`` is delivered
    as one destination (``provider:NAME``) under these limits, shared by all of them
    (KumoMTA's provider blocks; all, so that a vanity domain mixing providers matches
    none). Patterns are MX host names or ``*.suffix`` wildcards, case-insensitive."""

    match_mx: Annotated[list[str], msgspec.Meta(min_length=1)]

    def matches(self, mx_hosts: list[str]) -> bool:
        return bool(mx_hosts) and all(
            any(_host_matches(h.lower().rstrip("."), p) for p in self.match_mx)
            for h in mx_hosts)


def _host_matches(host: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:])
    return host == pattern


#: The destination key of a provider's mail (``OutboundConfig.provider_for``).
PROVIDER_PREFIX = "provider:"


class SmtpAuth(_Base):
    """AUTH PLAIN/LOGIN credentials for a smart host or a route (Postfix
    smtp_sasl_password_maps); all empty (the default) = no AUTH. With a username, set
    one of ``password`` and ``password_file`` (better: the secret stays out of the
    config file); ``load_config`` reads the file and puts its first line in
    ``password`` (``decode_config`` reads no file). Used only over TLS: they make the
    hop's TLS at least "required"."""

    username: str = ""
    password: str = ""
    password_file: str = ""

    @property
    def configured(self) -> bool:
        return bool(self.username or self.password or self.password_file)


class Route(_Base):
    """A static route: mail for ``domain`` (exact, or ``*.example.com`` wildcard) goes to
    these hosts, tried in order; ``host`` or ``host:port`` or ``[v6]:port``; ``auth``
    logs in to each of them."""

    domain: str
    hosts: list[str]
    auth: SmtpAuth = msgspec.field(default_factory=SmtpAuth)


class OutboundConfig(_Base):
    """Delivery: routing and throttles."""

    #: DNS servers for MX lookups as "ip" or "ip:port"; empty means /etc/resolv.conf.
    resolvers: list[str] = msgspec.field(default_factory=list)
    #: Port used for MX hosts (25 in production; tests point it at loopback sinks).
    smtp_port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 25
    #: Global smart host ("host[:port]"); static routes still take precedence over it.
    smart_host: str = ""
    #: Credentials for the smart host (``SmtpAuth``), e.g. an upstream provider's.
    smart_host_auth: SmtpAuth = msgspec.field(default_factory=SmtpAuth)
    #: PEM CA certificates that tls = "verify" trusts instead of the system's ("" = the
    #: system's); relative to the config file.
    tls_ca_file: str = ""
    routes: list[Route] = msgspec.field(default_factory=list)
    #: Source address for outgoing connections ("" = kernel's choice).
    source_address: str = ""
    default: Throttle = msgspec.field(default_factory=Throttle)
    #: Per-domain overrides: keys are domains or "*.example.com" wildcards (lower case).
    domains: dict[str, Throttle] = msgspec.field(default_factory=dict)
    #: Providers: limits shared by every domain whose MX hosts match (``Provider``).
    providers: dict[str, Provider] = msgspec.field(default_factory=dict)

    def provider_for(self, mx_hosts: list[str]) -> str | None:
        """The destination key (``provider:NAME``) of a domain with these MX hosts: the
        first provider, in file order, that they all match; None for none."""
        for name, provider in self.providers.items():
            if provider.matches(mx_hosts):
                return PROVIDER_PREFIX + name
        return None

    def layers(self, destination: str, source: str = "",
               egress: EgressSource | None = None) -> list[tuple[str, Throttle]]:
        """Where a destination's limits come from, weakest first, each with the table
        that says it: the built-in defaults, ``[outbound.default]``, the egress source's
        ``limits``, then a provider's block, or a domain's best wildcard and its exact
        entry, then the same for the (source, provider or domain) pair."""
        layers: list[tuple[str, Throttle]] = [("built-in default", BUILTIN_THROTTLE),
                                              ("[outbound.default]", self.default)]
        prefix = ["egress", "sources", source]
        if egress is not None:
            layers.append((f"[{_toml_key([*prefix, 'limits'])}]", egress.limits))
        if destination.startswith(PROVIDER_PREFIX):
            name = destination[len(PROVIDER_PREFIX):]
            if name in self.providers:
                layers.append((f"[{_toml_key(['outbound', 'providers', name])}]",
                               self.providers[name]))
            if egress is not None and name in egress.providers:
                layers.append((f"[{_toml_key([*prefix, 'providers', name])}]",
                               egress.providers[name]))
            return layers
        dest = destination.lower().rstrip(".")
        tables: list[tuple[list[str | int], dict[str, Throttle]]] = [
            (["outbound", "domains"], self.domains)]
        if egress is not None:
            tables.append(([*prefix, "domains"], egress.domains))
        for where, table in tables:
            wildcard = _best_wildcard(dest, table)
            if wildcard is not None:
                layers.append((f"[{_toml_key([*where, wildcard])}]", table[wildcard]))
            if dest in table:
                layers.append((f"[{_toml_key([*where, dest])}]", table[dest]))
        return layers

    def throttle_for(self, destination: str, source: str = "",
                     egress: EgressSource | None = None) -> Limits:
        """Effective limits of a destination (through an egress source): its ``layers``
        merged, strongest last."""
        merged = self._merged(destination, source, egress)
        merged["max_connections"] = parse_connection_limit(merged["max_connections"])[0]
        for name in ("max_message_rate", "max_connection_rate"):
            merged[name] = split_local(merged[name])[0]  # type: ignore[arg-type]
        return Limits(**merged)  # type: ignore[arg-type]

    def local_limits(self, destination: str, source: str = "",
                     egress: EgressSource | None = None) -> frozenset[str]:
        """Which of a destination's cluster-capable limits (``max_connections``,
        ``max_message_rate``, ``max_connection_rate``) are written ``local:``: those stay
        this node's own with ``[cluster] redis`` set."""
        merged = self._merged(destination, source, egress)
        local = {name for name in ("max_message_rate", "max_connection_rate")
                 if split_local(merged[name])[1]}  # type: ignore[arg-type]
        if parse_connection_limit(merged["max_connections"])[1]:  # type: ignore[arg-type]
            local.add("max_connections")
        return frozenset(local)

    def _merged(self, destination: str, source: str,
                egress: EgressSource | None) -> dict[str, object]:
        merged: dict[str, object] = {}
        for _source, layer in self.layers(destination, source, egress):
            for name in Limits.__struct_fields__:
                value = getattr(layer, name)
                if value is not None:
                    merged[name] = value
        return merged

    def member_caps(self, domain: str) -> tuple[int | None, str | None]:
        """A domain's own ``max_connections`` and ``max_message_rate`` (from its exact or
        wildcard ``[outbound.domains]`` entry only), which still cap its share when it is
        delivered as part of a provider: the stricter limit wins."""
        cap: int | None = None
        rate: str | None = None
        for _source, layer in self.layers(domain)[2:]:
            if layer.max_connections is not None:
                cap = parse_connection_limit(layer.max_connections)[0]
            rate = layer.max_message_rate if layer.max_message_rate is not None else rate
        return cap, split_local(rate)[0] if rate else None


def _best_wildcard(domain: str, table: dict[str, object]) -> str | None:
    """The most specific ``*.suffix`` key in ``table`` that matches ``domain``."""
    labels = domain.split(".")
    for i in range(1, len(labels)):
        key = "*." + ".".join(labels[i:])
        if key in table:
            return key
    return "*" if "*" in table else None


class ApiKey(_Base):
    """One HTTP API key. ``key`` is stored hashed like ``inbound.auth_users``
    (``scrypt$...`` from ``relay api-key``; ``plain$secret`` for tests only)."""

    key: str
    #: The sender this key injects for: carried into the envelope and every event.
    tenant: str
    #: A label for logs ("ci", "campaign-tool").
    name: str = ""


class TenantLimits(_Base):
    """Injection limits of one tenant over HTTP."""

    #: Messages (recipients) per time a tenant may inject over HTTP, on this node:
    #: "5000/s", "1000000/h". Over it: 429 with Retry-After. "" is unlimited.
    max_message_rate: str = ""


class HttpConfig(_Base):
    """The HTTP listener: injection (SparkPost's and KumoMTA's APIs) and health."""

    #: Addresses to serve HTTP on, every worker (SO_REUSEPORT); empty: no HTTP listener.
    listen: list[str] = msgspec.field(default_factory=list)
    #: Serve HTTPS with ``inbound.tls_cert``/``inbound.tls_key``.
    tls: bool = False
    #: Largest request body (413 above it).
    max_body: int | str = "25MiB"
    #: Recipients per injection request (422 above it).
    max_recipients: PositiveInt = 10000
    #: A request's headers and body must arrive within this many seconds (408 if not).
    request_timeout: Seconds = 60.0
    #: An idle keep-alive connection is closed after this many seconds.
    keepalive_timeout: Seconds = 75.0
    #: Open HTTP connections per worker (503 above it).
    max_connections: PositiveInt = 1000
    api_keys: list[ApiKey] = msgspec.field(default_factory=list)
    tenants: dict[str, TenantLimits] = msgspec.field(default_factory=dict)

    def max_body_bytes(self) -> int:
        return parse_size(self.max_body)


class AdminConfig(_Base):
    """The admin listener: ``GET /metrics`` (Prometheus text format) for the whole node."""

    #: Addresses to serve it on, every worker (SO_REUSEPORT); empty: no admin listener.
    listen: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1:8026"])
    #: Clients allowed to scrape (CIDR); any other gets 403.
    allow_networks: list[str] = msgspec.field(
        default_factory=lambda: ["127.0.0.0/8", "::1/128"])


#: Fields signed by default, when present (``headers``): RFC 6376 5.4.1's list, the
#: one-click unsubscribe and feedback-loop fields mailbox providers ask bulk senders to
#: sign (RFC 8058, Gmail's Feedback-ID), and the fields that say what the body is
#: (Message-ID, Sender, MIME-Version, Content-Type, Content-Transfer-Encoding: dkimpy
#: and OpenDKIM sign them too; unsigned, a replay could re-label the signed body).
DKIM_HEADERS = (
    "From", "Reply-To", "Subject", "Date", "To", "Cc", "Resent-Date", "Resent-From",
    "Resent-To", "Resent-Cc", "In-Reply-To", "References", "List-Id", "List-Help",
    "List-Unsubscribe", "List-Unsubscribe-Post", "List-Subscribe", "List-Post",
    "List-Owner", "List-Archive", "Feedback-ID", "Message-ID", "Sender", "MIME-Version",
    "Content-Type", "Content-Transfer-Encoding",
)


class DkimSigner(_Base):
    """One DKIM signature to add (``[[dkim.signers]]``): a row of OpenDKIM's SigningTable
    and its KeyTable entry in one. ``domain`` is the From: domain it signs for, or
    ``*.example.com`` for that domain's subdomains (signed as d=example.com)."""

    domain: str
    selector: str
    #: PEM private key (PKCS#8 or traditional, unencrypted); relative to the config file.
    key: str
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] = "rsa-sha256"
    #: Field names to sign when present (case-insensitive); must include From.
    headers: list[str] = msgspec.field(default_factory=lambda: list(DKIM_HEADERS))
    #: List each signed name once more than it occurs, so none can be added in transit.
    over_sign: bool = True
    #: header/body canonicalisation (RFC 6376 3.4).
    canonicalization: Literal["relaxed/relaxed", "simple/simple", "relaxed/simple",
                              "simple/relaxed"] = "relaxed/relaxed"
    #: Seconds a signature stays valid (x= tag); 0 = no x=.
    expiration: NonNegInt = 0
    #: Write the signing time (t= tag).
    timestamp: bool = True

    def signing_domain(self) -> str:
        """d=: the domain itself, or the parent of a ``*.`` wildcard."""
        return self.domain.lower().rstrip(".").removeprefix("*.")


class DkimConfig(_Base):
    """DKIM signing, the last intake stage (relay.intake.signing)."""

    #: A message whose From: domain no signer matches: "unsigned" sends it unsigned,
    #: "refuse" refuses it (550 5.7.1). The relay's own DSNs are never refused.
    policy: Literal["unsigned", "refuse"] = "unsigned"
    #: The ``domain`` of signers that sign every message as well (an ESP's own domain).
    always: str = ""
    signers: list[DkimSigner] = msgspec.field(default_factory=list)


class SuppressionConfig(_Base):
    """What happens to mail for an address on the suppression list."""

    #: SMTP: "refuse" it at RCPT (550 5.7.1) where the tenant is known then (the
    #: operator-wide list, an AUTH user's tenant), or "drop" it: accept, store nothing
    #: for it, and record a Suppressed event. Mail whose tenant is only known from its
    #: header is dropped either way (after DATA a single recipient cannot be refused).
    smtp: Literal["refuse", "drop"] = "refuse"


class UnsubscribeConfig(_Base):
    """One-click unsubscribe (RFC 8058) headers the relay adds, and its endpoint."""

    #: Base of the one-click link; the token is appended ("https://relay.example.com/u/",
    #: served by the HTTP listener's POST /u/TOKEN). "" = add no headers.
    url: str = ""
    #: Optional mailto: address offered beside the link (mail to it is delivered as any).
    mailto: str = ""
    #: The HMAC key of the tokens (at least 16 characters); changing it voids old links.
    secret: str = ""
    #: Only mail of these tenants gets the headers; [] = every tenant's.
    tenants: list[str] = msgspec.field(default_factory=list)


class SuppressRule(_Base):
    """When a bounce class (or complaints) suppresses the address (``[bounces.suppress]``,
    relay.outcomes.suppress): ``when`` is "immediate", "never" or "N/D" ("3/7d": the
    third within seven days); the entry then holds for ``expires`` ("30d"; "" = until
    an operator removes it)."""

    when: str = "immediate"
    expires: str = ""


class BouncesConfig(_Base):
    """Bounce classification (relay.outcomes.classify), out-of-band bounces and
    complaints to a bounce domain (relay.inbound.bounces), and the suppression they feed
    (relay.events.suppress_feed)."""

    #: The operator's rules file (TOML, relative to the config file's directory), read
    #: before the shipped defaults (relay/outcomes/bounce_rules.toml); "" = the defaults
    #: only. Checked at load and re-read on SIGHUP.
    rules: str = ""
    #: The bounce domain (its MX must point at this relay): mail leaves with a VERP return
    #: path there, one recipient per transaction, and the listener takes the reports
    #: that come back. "" = off (mail leaves with its own sender).
    domain: str = ""
    #: The HMAC key of the VERP addresses and of the X-Relay-Ref header (at least 16
    #: characters), or a file holding it (relative to the config file); one of them with
    #: ``domain``. Changing it voids the addresses of mail already sent.
    secret: str = ""
    secret_file: str = ""
    #: Addresses that receive feedback reports (ARF) from mailbox providers' feedback
    #: loops; mail to them is parsed, never relayed.
    complaint_addresses: list[str] = msgspec.field(default_factory=list)
    #: The SenderId of a ``Feedback-ID: campaign:tenant:kind:SenderId`` header (Gmail's
    #: feedback loop) added to mail without one; "" = none.
    feedback_id: str = ""
    #: Let bounces (in-session and out-of-band) and complaints add suppression entries
    #: under ``suppress``.
    auto_suppress: bool = True
    #: A bounce class (code or name) or "complaint" -> "immediate", "never", "N/D" or
    #: ``{ when = "3/7d", expires = "30d" }``, over the shipped defaults.
    suppress: dict[str, str | SuppressRule] = msgspec.field(default_factory=dict)


class WarmupStep(_Base):
    """From ``day`` of a source's age (day 1 = its ``warmup_start``) on, at most
    ``daily_cap`` messages a day through it, until the next step's day."""

    day: PositiveInt
    daily_cap: PositiveInt


class EgressSource(_Base):
    """One sending identity (``[egress.sources.NAME]``): a local address to bind and the
    name to say in EHLO (KumoMTA's egress source, PowerMTA's virtual MTA)."""

    #: The local IP outgoing connections are bound to; "" = the kernel's choice.
    source_address: str = ""
    #: Our name in EHLO through this source (its PTR name); "" = ``server.hostname``.
    ehlo_domain: str = ""
    #: Limits for every destination through this source, over ``[outbound.default]``.
    limits: Throttle = msgspec.field(default_factory=Throttle)
    #: Limits per (source, domain) and (source, provider): over everything else.
    domains: dict[str, Throttle] = msgspec.field(default_factory=dict)
    providers: dict[str, Throttle] = msgspec.field(default_factory=dict)
    #: The source's first day of sending ("2026-12-01"); with ``warmup`` its daily caps.
    warmup_start: str = ""
    warmup: list[WarmupStep] = msgspec.field(default_factory=list)

    def daily_cap(self, today: str) -> int | None:
        """The cap of the day ``today`` (ISO date), or None: no cap (no schedule, or
        the schedule is over)."""
        if not self.warmup or not self.warmup_start:
            return None
        import datetime

        age = (datetime.date.fromisoformat(today)
               - datetime.date.fromisoformat(self.warmup_start)).days + 1
        steps = sorted(self.warmup, key=lambda s: s.day)
        if age > steps[-1].day:
            return None
        cap = steps[0].daily_cap
        for step in steps:
            if step.day <= age:
                cap = step.daily_cap
        return cap


class PoolMember(_Base):
    source: str
    weight: PositiveInt = 1


class EgressPool(_Base):
    """Sources that share a sender's traffic, by weighted round robin."""

    sources: Annotated[list[PoolMember], msgspec.Meta(min_length=1)]


class EgressConfig(_Base):
    """Egress sources and pools (relay.outbound.egress). With no pools, mail leaves from
    ``outbound.source_address`` as one unnamed source."""

    sources: dict[str, EgressSource] = msgspec.field(default_factory=dict)
    pools: dict[str, EgressPool] = msgspec.field(default_factory=dict)
    #: The pool of mail that names none (and whose tenant has none); "" = no pools.
    default_pool: str = ""
    #: A header naming the pool (PowerMTA's ``X-VirtualMTA``), removed before delivery;
    #: "" = not read.
    pool_header: str = "X-VirtualMTA"
    #: A tenant's pool, for its mail that names none.
    tenant_pools: dict[str, str] = msgspec.field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.pools)


class ShapingRule(_Base):
    """A rule that reacts to a reply (KumoMTA's shaping automation); see
    relay/outcomes/shaping_rules.toml for the format and the shipped rules."""

    id: str
    match_mx: list[str] = msgspec.field(default_factory=list)
    provider: str = ""
    domain: str = ""
    code: int | None = None
    enhanced: str = ""
    regex: str = ""
    #: "immediate" or "N/h": act at the Nth match within an hour.
    trigger: str = "immediate"
    action: Literal["suspend", "limit"] = "suspend"
    max_message_rate: str = ""
    max_connections: PositiveInt | None = None
    max_deliveries_per_connection: PositiveInt | None = None
    #: How long the action holds ("30m", "2h", "1d", or seconds).
    duration: str = "1h"
    cite: str = ""
    note: str = ""


class ShapingConfig(_Base):
    """Traffic shaping (relay.outcomes.shaping): reply rules, then adaptive limits."""

    #: Rules written here come first, then ``rules_file``'s, then the shipped ones.
    rules: list[ShapingRule] = msgspec.field(default_factory=list)
    #: The operator's rules file (TOML ``[[rules]]``, relative to the config file).
    rules_file: str = ""
    #: Use the shipped rules for Gmail, Yahoo and Microsoft.
    default_rules: bool = True
    #: Closed-loop shaping (AIMD) on pushback: 421s, 4.7.x deferrals, refused connects.
    adaptive: bool = True
    #: On pushback the rate becomes this share of the rate the destination accepted
    #: over the last ``window`` seconds, and the connections this share of those in use.
    decrease: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.9
    #: The window the accepted rate is measured over (providers write their limits per
    #: minute: a burst then counts as what it is per minute).
    window: Seconds = 60.0
    #: After this long without pushback, limits grow by ``increase`` (a share of the
    #: current rate, at least 1/min) and one connection, toward the configured limits.
    clean_interval: Seconds = 60.0
    increase: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.05
    #: Never below this rate, nor below one connection.
    floor_rate: str = "6/min"
    #: A new destination starts with this many connections (at most its limit) and
    #: may open one more per message accepted, until its first pushback (slow start).
    initial_connections: PositiveInt = 4
    #: After pushback, the destination waits until the cut rate fits in the window
    #: (at least this long) before one probe connection; the wait doubles while the
    #: probes are refused, up to ``max_pause``.
    pause: Seconds = 5.0
    max_pause: Seconds = 300.0


class WebhookConfig(_Base):
    """One webhook (``[[webhooks]]``): the event log's events POSTed to ``url`` in
    signed JSON batches, at least once (relay.events.webhooks)."""

    #: Names its cursor file and its metrics: letters, digits, ".", "_", "-".
    name: str
    #: http:// or https:// URL the batches are POSTed to.
    url: str
    #: Event types sent ("Delivery", "Bounce", ...); [] = every type.
    events: list[str] = msgspec.field(default_factory=list)
    #: Only events of these tenants; [] = every event, with a tenant or not.
    tenants: list[str] = msgspec.field(default_factory=list)
    #: Events per POST at most ...
    batch_size: PositiveInt = 100
    #: ... and seconds the first event of a batch waits for more before it is sent.
    max_batch_age: Seconds = 1.0
    #: The HMAC-SHA256 key of X-Relay-Signature; set this or ``secret_file`` (its first
    #: line; relative to the config file's directory).
    secret: str = ""
    secret_file: str = ""
    #: Seconds one POST may take (connect to the end of the answer).
    timeout: Seconds = 10.0
    #: After a failed POST, wait ``retry_min`` seconds, doubling up to ``retry_max``.
    retry_min: Seconds = 1.0
    retry_max: Seconds = 300.0
    #: A webhook without a cursor yet starts at the beginning of the current event log
    #: file (true) or at its end (false).
    backfill: bool = True

    def secret_bytes(self) -> bytes:
        """The key: ``secret``, or the first line of ``secret_file``."""
        if self.secret or not self.secret_file:
            return self.secret.encode()
        lines = Path(self.secret_file).read_text().strip().splitlines()
        return lines[0].strip().encode() if lines else b""


class ClusterConfig(_Base):
    """Limits shared by the relay nodes of a cluster through Redis (``[cluster]``,
    relay.outbound.cluster): message rates, connection rates and ``max_connections`` then
    hold for all the nodes together, except those written ``local:``."""

    #: "redis://host:port/db", "rediss://..." (TLS) or "unix:///path?db=0"; "" = off.
    redis: str = ""
    #: Nodes sharing the limits. Without Redis (down, or slower than ``timeout``) each
    #: node uses this share of every shared limit (limit / expected_nodes).
    expected_nodes: PositiveInt = 2
    #: Most message (or connection-rate) tokens a node leases from Redis at once ...
    lease_batch: PositiveInt = 50
    #: ... and at most ``lease_window`` seconds' worth of the limit (a slow limit leases
    #: one or two at a time, so the cluster's rate stays close to it).
    lease_window: Seconds = 0.25
    #: Leased tokens a node has not used within this are given back.
    token_lifetime: Seconds = 1.0
    #: A connection's lease in Redis lives this long and is renewed every third of it
    #: while the connection is open: a node killed outright frees its slots within it.
    connection_lease_ttl: Seconds = 10.0
    #: A Redis call taking longer than this counts as Redis being unreachable.
    timeout: Seconds = 0.5
    #: While Redis is unreachable, it is tried again this often.
    retry_interval: Seconds = 2.0
    #: The start of every key the relay writes (nodes sharing limits use the same).
    key_prefix: str = "relay:"


class Config(_Base):
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    inbound: InboundConfig = msgspec.field(default_factory=InboundConfig)
    relay: RelayPolicyConfig = msgspec.field(default_factory=RelayPolicyConfig)
    spool: SpoolConfig = msgspec.field(default_factory=SpoolConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    outbound: OutboundConfig = msgspec.field(default_factory=OutboundConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    dkim: DkimConfig = msgspec.field(default_factory=DkimConfig)
    suppression: SuppressionConfig = msgspec.field(default_factory=SuppressionConfig)
    unsubscribe: UnsubscribeConfig = msgspec.field(default_factory=UnsubscribeConfig)
    bounces: BouncesConfig = msgspec.field(default_factory=BouncesConfig)
    egress: EgressConfig = msgspec.field(default_factory=EgressConfig)
    shaping: ShapingConfig = msgspec.field(default_factory=ShapingConfig)
    webhooks: list[WebhookConfig] = msgspec.field(default_factory=list)
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)


def _semantic_checks(cfg: Config) -> None:
    """Checks that need more than a type: raise ValueError("dotted.key: reason")."""

    def check(key: str, fn, value) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(value)
        except ValueError as e:
            # The parsers quote the value the Python way ('5/fortnight'): TOML's way here.
            text = str(e).replace(repr(value), _toml_value(value)) if value else str(e)
            raise ValueError(f"{key}: {text}") from None

    if cfg.server.user:
        check("server.user", lookup_user, cfg.server.user)
    if cfg.server.group:
        check("server.group", lookup_group, cfg.server.group)
    for i, addr in enumerate(cfg.inbound.listen):
        check(f"inbound.listen[{i}]", parse_hostport, addr)
    check("inbound.max_message_size", parse_size, cfg.inbound.max_message_size)
    if parse_size(cfg.inbound.max_message_size) < 1:
        raise ValueError("inbound.max_message_size: must be at least 1 byte (there is no "
                         "unlimited: every message is held in memory while it arrives)")
    check("spool.map_size", parse_size, cfg.spool.map_size)
    for i, net in enumerate(cfg.relay.allow_networks):
        check(f"relay.allow_networks[{i}]", lambda n: ipaddress.ip_network(n, strict=False), net)
    if bool(cfg.inbound.tls_cert) != bool(cfg.inbound.tls_key):
        raise ValueError("inbound.tls_cert/tls_key: set both or neither")
    for i, user in enumerate(cfg.inbound.auth_users):
        check(f"inbound.auth_users[{i}].password", _check_password_hash, user.password)
    throttles = {"outbound.default": cfg.outbound.default}
    throttles.update(
        {_toml_key(["outbound", "domains", k]): v for k, v in cfg.outbound.domains.items()}
    )
    throttles.update(
        {_toml_key(["outbound", "providers", k]): v for k, v in cfg.outbound.providers.items()}
    )
    for name, provider in cfg.outbound.providers.items():
        for i, pattern in enumerate(provider.match_mx):
            if not pattern or "*" in pattern.removeprefix("*.") or " " in pattern:
                raise ValueError(f"{_toml_key(['outbound', 'providers', name])}.match_mx[{i}]: "
                                 f"{_toml_str(pattern)} is not a host name or *.suffix")
    for key, t in throttles.items():
        _throttle_checks(key, t, check)
    for i, route in enumerate(cfg.outbound.routes):
        for j, host in enumerate(route.hosts):
            check(f"outbound.routes[{i}].hosts[{j}]", parse_hostport, host)
    if cfg.outbound.smart_host:
        check("outbound.smart_host", parse_hostport, cfg.outbound.smart_host)
    _auth_checks(cfg.outbound)
    for i, r in enumerate(cfg.outbound.resolvers):
        check(f"outbound.resolvers[{i}]", parse_hostport, r)
    _http_checks(cfg, check)
    _egress_checks(cfg.egress, check)
    for i, rule in enumerate(cfg.shaping.rules):
        try:
            check_rule_fields(rule)
        except ValueError as e:
            raise ValueError(f"shaping.rules[{i}] (id {_toml_str(rule.id)}): {e}") from None
    if len({r.id for r in cfg.shaping.rules}) != len(cfg.shaping.rules):
        raise ValueError("shaping.rules: two rules have the same id")
    check("shaping.floor_rate", parse_rate, cfg.shaping.floor_rate)
    unsub = cfg.unsubscribe
    if unsub.url:
        if not unsub.url.startswith("https://") and not unsub.url.startswith("http://"):
            raise ValueError(f"unsubscribe.url: {_toml_str(unsub.url)} must be an http(s) URL "
                             "(Gmail and Yahoo require https)")
        if len(unsub.secret) < 16:
            raise ValueError("unsubscribe.secret: needs at least 16 characters with "
                             "unsubscribe.url set")
    if unsub.mailto and ("@" not in unsub.mailto or any(c in unsub.mailto for c in " <>")):
        raise ValueError(f"unsubscribe.mailto: {_toml_str(unsub.mailto)} is not an address")
    _dkim_checks(cfg.dkim)
    _bounces_checks(cfg.bounces)
    _webhook_checks(cfg)
    _cluster_checks(cfg.cluster)


def _throttle_checks(key: str, t: Throttle, check) -> None:  # type: ignore[no-untyped-def]
    """A throttle table's rates and connection limit (``local:`` or not)."""
    for field in ("max_message_rate", "max_connection_rate"):
        value = getattr(t, field)
        if value:
            check(f"{key}.{field}", _check_scoped_rate, value)
    if t.max_connections is not None:
        check(f"{key}.max_connections", parse_connection_limit, t.max_connections)


def _cluster_checks(cluster: ClusterConfig) -> None:
    from urllib.parse import urlsplit

    if not cluster.redis:
        return
    try:
        url = urlsplit(cluster.redis)
        _ = url.port  # a bad port raises
        ok = ((url.scheme in ("redis", "rediss") and bool(url.hostname))
              or (url.scheme == "unix" and bool(url.path)))
    except ValueError:
        ok = False
    if not ok or any(c in cluster.redis for c in " \t\r\n"):
        raise ValueError(f"cluster.redis: {_toml_str(cluster.redis)} is not a redis://, "
                         "rediss:// or unix:// URL (example: \"redis://127.0.0.1:6379/0\")")
    if cluster.token_lifetime < cluster.lease_window:
        raise ValueError("cluster.token_lifetime: less than cluster.lease_window")


_WEBHOOK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", re.ASCII)


def _webhook_checks(cfg: Config) -> None:
    from urllib.parse import urlsplit

    from relay.events.types import Event

    known = {t.__struct_config__.tag for t in get_args(Event)}
    seen: set[str] = set()
    for i, hook in enumerate(cfg.webhooks):
        key = f"webhooks[{i}]"
        if not _WEBHOOK_NAME_RE.match(hook.name):
            raise ValueError(f"{key}.name: {_toml_str(hook.name)} must be 1-64 letters, "
                             "digits, '.', '_' or '-' (it names a file and a metric label)")
        if hook.name in seen:
            raise ValueError(f"{key}.name: {_toml_str(hook.name)} is used twice")
        seen.add(hook.name)
        try:
            url = urlsplit(hook.url)
            url_ok = url.scheme in ("http", "https") and bool(url.hostname)
            _ = url.port  # a bad port raises
        except ValueError:
            url_ok = False
        if not url_ok or any(c in hook.url for c in " \t\r\n"):
            raise ValueError(f"{key}.url: {_toml_str(hook.url)} is not an http:// or "
                             "https:// URL")
        for j, name in enumerate(hook.events):
            if name not in known:
                raise ValueError(f"{key}.events[{j}]: {_toml_str(name)} is not an event "
                                 f"type (one of {', '.join(sorted(known))})")
        if bool(hook.secret) == bool(hook.secret_file):
            raise ValueError(f"{key}.secret/secret_file: set one of them (the key that "
                             "signs each POST)")
        if hook.retry_min > hook.retry_max:
            raise ValueError(f"{key}.retry_min: more than retry_max")
    if cfg.webhooks and not cfg.log.events:
        raise ValueError("webhooks: need log.events (the webhooks send the event log)")


def _secret_from_file(source: str, key: str, path: str, *, min_length: int = 1,
                      exact: bool = False) -> str:
    """The secret in ``path``: its first line, stripped of blanks (``exact``: as it is,
    for a password); a ConfigError names ``key`` and the file."""
    try:
        text = Path(path).read_text("utf-8")
    except OSError as e:
        raise ConfigError(f"{source}: {key}: cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: {key}: {path} is not UTF-8 text") from None
    if exact:
        secret = text.split("\n", 1)[0].removesuffix("\r")
    else:
        lines = text.strip().splitlines()
        secret = lines[0].strip() if lines else ""
    if not secret:
        raise ConfigError(f"{source}: {key}: {path} is empty (its first line is the secret)")
    if len(secret) < min_length:
        raise ConfigError(f"{source}: {key}: {path} holds fewer than {min_length} characters")
    if "\0" in secret or "\r" in secret:
        raise ConfigError(f"{source}: {key}: {path}: the first line holds a NUL or CR")
    return secret


def _read_webhook_secrets(cfg: Config, source: str) -> Config:
    """Each ``webhooks[].secret_file`` read into its ``secret`` (at every load, so a
    SIGHUP picks up a new key); a ConfigError names the key and the file."""
    hooks = []
    for i, hook in enumerate(cfg.webhooks):
        if hook.secret_file:
            secret = _secret_from_file(source, f"webhooks[{i}].secret_file", hook.secret_file)
            hook = msgspec.structs.replace(hook, secret=secret)
        hooks.append(hook)
    return msgspec.structs.replace(cfg, webhooks=hooks)


def _bounces_checks(bounces: BouncesConfig) -> None:
    from relay.outcomes.suppress import parse_policy

    if bounces.domain:
        try:
            check_dkim_name(bounces.domain)
        except ValueError as e:
            raise ValueError(f"bounces.domain: {e}") from None
        if not bounces.secret and not bounces.secret_file:
            raise ValueError("bounces.secret: needed with bounces.domain set (or "
                             "bounces.secret_file)")
    else:
        for key in ("complaint_addresses", "feedback_id"):
            if getattr(bounces, key):
                raise ValueError(f"bounces.{key}: needs bounces.domain")
    if bounces.secret and bounces.secret_file:
        raise ValueError("bounces.secret/secret_file: set one, not both")
    if bounces.secret and len(bounces.secret) < 16:
        raise ValueError("bounces.secret: needs at least 16 characters")
    for i, addr in enumerate(bounces.complaint_addresses):
        local, at, domain = addr.rpartition("@")
        if not at or not local or not domain or any(c in addr for c in " <>"):
            raise ValueError(f"bounces.complaint_addresses[{i}]: {_toml_str(addr)} is not "
                             "an address")
    if ":" in bounces.feedback_id or any(c.isspace() for c in bounces.feedback_id):
        raise ValueError(f"bounces.feedback_id: {_toml_str(bounces.feedback_id)} must not "
                         "contain a colon or blanks")
    try:
        parse_policy(bounces.suppress)
    except ValueError as e:
        key, _, reason = str(e).partition(": ")
        raise ValueError(f"{_toml_key(['bounces', 'suppress', key])}: {reason}") from None


def _read_bounce_secret(cfg: Config, source: str) -> Config:
    """``bounces.secret_file`` read into ``bounces.secret`` (a ConfigError names the
    file); at least 16 characters, surrounding blanks ignored."""
    path = cfg.bounces.secret_file
    if not path:
        return cfg
    secret = _secret_from_file(source, "bounces.secret_file", path, min_length=16)
    return msgspec.structs.replace(cfg, bounces=msgspec.structs.replace(cfg.bounces,
                                                                        secret=secret))


def _auth_entries(outbound: OutboundConfig) -> list[tuple[str, SmtpAuth]]:
    """Every configured ``SmtpAuth`` with its TOML key."""
    entries = [("outbound.smart_host_auth", outbound.smart_host_auth)]
    entries += [(f"outbound.routes[{i}].auth", r.auth) for i, r in enumerate(outbound.routes)]
    return [(key, auth) for key, auth in entries if auth.configured]


def _auth_checks(outbound: OutboundConfig) -> None:
    if outbound.smart_host_auth.configured and not outbound.smart_host:
        raise ValueError("outbound.smart_host_auth: there is no outbound.smart_host")
    for key, auth in _auth_entries(outbound):
        if not auth.username or any(c in auth.username for c in "\0\r\n"):
            raise ValueError(f"{key}.username: must be non-empty, without NUL, CR or LF")
        if bool(auth.password) == bool(auth.password_file):
            raise ValueError(f"{key}: set one of password, password_file")
        if any(c in auth.password for c in "\0\r\n"):
            raise ValueError(f"{key}.password: must not contain NUL, CR or LF")


def _egress_checks(egress: EgressConfig, check) -> None:  # type: ignore[no-untyped-def]
    import datetime

    for name, src in egress.sources.items():
        key = _toml_key(["egress", "sources", name])
        if src.source_address and ip_address(src.source_address) is None:
            raise ValueError(f"{key}.source_address: {_toml_str(src.source_address)} is not "
                             "an IP address")
        if src.ehlo_domain and not _HOSTNAME_RE.match(src.ehlo_domain):
            raise ValueError(f"{key}.ehlo_domain: {_toml_str(src.ehlo_domain)} is not a "
                             "host name")
        if src.warmup_start:
            check(f"{key}.warmup_start", datetime.date.fromisoformat, src.warmup_start)
        if src.warmup and not src.warmup_start:
            raise ValueError(f"{key}.warmup: needs warmup_start (the source's first day)")
        days = [step.day for step in src.warmup]
        if len(set(days)) != len(days):
            raise ValueError(f"{key}.warmup: a day is listed twice")
        tables = {f"{key}.limits": src.limits}
        tables.update({f"{key}.domains.{_toml_key([d])}": t for d, t in src.domains.items()})
        tables.update({f"{key}.providers.{_toml_key([p])}": t
                       for p, t in src.providers.items()})
        for where, t in tables.items():
            _throttle_checks(where, t, check)
    for name, pool in egress.pools.items():
        for i, member in enumerate(pool.sources):
            if member.source not in egress.sources:
                raise ValueError(f"{_toml_key(['egress', 'pools', name])}.sources[{i}].source: "
                                 f"no [egress.sources.{_toml_key([member.source])}]")
    if egress.pools and egress.default_pool not in egress.pools:
        raise ValueError(f"egress.default_pool: {_toml_str(egress.default_pool)} is not one of "
                         "[egress.pools] (with pools, every message needs one)")
    if not egress.pools and egress.default_pool:
        raise ValueError("egress.default_pool: there are no [egress.pools]")
    for tenant, pool in egress.tenant_pools.items():
        if pool not in egress.pools:
            raise ValueError(f"{_toml_key(['egress', 'tenant_pools', tenant])}: "
                             f"{_toml_str(pool)} is not one of [egress.pools]")


_TRIGGER_RE = re.compile(r"^(immediate|[1-9][0-9]{0,5}/h)$")


def check_rule_fields(rule: ShapingRule) -> None:
    """A shaping rule's fields, beyond their types: ValueError("field: reason")."""
    scopes = [name for name in ("match_mx", "provider", "domain") if getattr(rule, name)]
    if len(scopes) != 1:
        raise ValueError("needs exactly one scope of match_mx, provider, domain"
                         + (f" (has {', '.join(scopes)})" if scopes else ""))
    if rule.code is None and not rule.enhanced and not rule.regex:
        raise ValueError("needs at least one of code, enhanced, regex")
    if rule.code is not None and not 200 <= rule.code <= 599:
        raise ValueError(f"code: {rule.code} is not a reply code")
    if rule.enhanced and not re.match(r"^[245](\.[0-9]{1,3}){0,2}\.?$", rule.enhanced):
        raise ValueError(f"enhanced: {_toml_str(rule.enhanced)} is not an enhanced status "
                         "code (\"4.7.28\") or a prefix of one (\"4.7.\")")
    if rule.regex:
        try:
            re.compile(rule.regex)
        except re.error as e:
            raise ValueError(f"regex: {e}") from None
    if not _TRIGGER_RE.match(rule.trigger):
        raise ValueError(f"trigger: {_toml_str(rule.trigger)} must be \"immediate\" or "
                         "\"N/h\" (e.g. \"3/h\")")
    parse_duration(rule.duration)
    if rule.max_message_rate:
        parse_rate(rule.max_message_rate)
    if rule.action == "limit" and not (rule.max_message_rate or rule.max_connections
                                       or rule.max_deliveries_per_connection):
        raise ValueError("action \"limit\" needs max_message_rate, max_connections or "
                         "max_deliveries_per_connection")


_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                          r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?$")


def _http_checks(cfg: Config, check) -> None:  # type: ignore[no-untyped-def]
    http = cfg.http
    for i, addr in enumerate(http.listen):
        check(f"http.listen[{i}]", parse_hostport, addr)
        if parse_hostport(addr)[1] is None:
            raise ValueError(f"http.listen[{i}]: {_toml_str(addr)} needs a port")
    check("http.max_body", parse_size, http.max_body)
    for i, addr in enumerate(cfg.admin.listen):
        check(f"admin.listen[{i}]", parse_hostport, addr)
        if parse_hostport(addr)[1] is None:
            raise ValueError(f"admin.listen[{i}]: {_toml_str(addr)} needs a port")
    for i, net in enumerate(cfg.admin.allow_networks):
        check(f"admin.allow_networks[{i}]", lambda n: ipaddress.ip_network(n, strict=False), net)
    if http.tls and not cfg.inbound.tls_cert:
        raise ValueError("http.tls: needs inbound.tls_cert and inbound.tls_key")
    for i, key in enumerate(http.api_keys):
        check(f"http.api_keys[{i}].key", _check_password_hash, key.key)
        if not key.tenant:
            raise ValueError(f"http.api_keys[{i}].tenant: must not be empty")
    for name, limits in http.tenants.items():
        if limits.max_message_rate:
            check(_toml_key(["http", "tenants", name]) + ".max_message_rate", parse_rate,
                  limits.max_message_rate)


_DKIM_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DKIM_NAME_RE = re.compile(rf"^{_DKIM_LABEL}(?:\.{_DKIM_LABEL})*$", re.ASCII)
_FIELD_NAME_RE = re.compile(r"^[!-9;-~]+$", re.ASCII)


def check_dkim_name(value: str, what: str = "domain", *, wildcard: bool = False) -> None:
    """A DKIM domain (``*.`` prefix when ``wildcard``) or selector: dot-separated LDH
    labels (RFC 6376 3.1, 3.5), ASCII (an IDN in its xn-- form); ValueError if not."""
    name = value.rstrip(".") if what == "domain" else value
    if wildcard and name.startswith("*."):
        name = name[2:]
    if not _DKIM_NAME_RE.match(name) or len(name) > 253:
        hint = " (an IDN in its xn-- form)" if not value.isascii() else ""
        raise ValueError(f"{_toml_str(value)} is not a valid {what}{hint}")


def _dkim_checks(dkim: DkimConfig) -> None:
    seen: dict[tuple[str, str], int] = {}
    for i, s in enumerate(dkim.signers):
        key = f"dkim.signers[{i}]"
        for field in ("domain", "selector"):
            try:
                check_dkim_name(getattr(s, field), field, wildcard=field == "domain")
            except ValueError as e:
                raise ValueError(f"{key}.{field}: {e}") from None
        if not s.key:
            raise ValueError(f"{key}.key: must name the private key's PEM file")
        bad = [h for h in s.headers if not _FIELD_NAME_RE.match(h)]
        if bad:
            raise ValueError(f"{key}.headers: {_toml_str(bad[0])} is not a field name")
        if "from" not in {h.lower() for h in s.headers}:
            raise ValueError(f"{key}.headers: must include \"From\" (RFC 6376 5.4)")
        ident = (s.domain.lower().rstrip("."), s.selector.lower())
        if ident in seen:
            raise ValueError(f"{key}: the same domain and selector as "
                             f"dkim.signers[{seen[ident]}]")
        seen[ident] = i
    domains = {s.domain.lower().rstrip(".") for s in dkim.signers}
    if dkim.always and dkim.always.lower().rstrip(".") not in domains:
        raise ValueError(f"dkim.always: no [[dkim.signers]] entry has domain = "
                         f"{_toml_str(dkim.always)}")


def _check_password_hash(stored: str) -> None:
    """``plain$secret``, or ``scrypt$N$r$p$salt_b64$hash_b64`` as `relay hash-password`
    writes it (N a power of two; r, p small), so a typo is a config error, not a failure
    at the first AUTH."""
    scheme, _, rest = stored.partition("$")
    if scheme == "plain":
        return
    if scheme != "scrypt":
        raise ValueError("must start with 'scrypt$' or 'plain$'")
    parts = rest.split("$")
    numbers = [ascii_int(p, max_digits=8) for p in parts[:3]]
    n, r, p = (x or 0 for x in numbers) if len(parts) == 5 else (0, 0, 0)
    if not (1 < n <= 2**24 and n & (n - 1) == 0 and 0 < r <= 64 and 0 < p <= 64):
        raise ValueError("not a scrypt hash as `relay hash-password` prints it "
                         "(scrypt$N$r$p$salt$hash)")
    try:
        binascii.a2b_base64(parts[3], strict_mode=True)
        binascii.a2b_base64(parts[4], strict_mode=True)
    except binascii.Error:
        raise ValueError("salt or hash is not valid base64") from None


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int | None]:
    """``"127.0.0.1:2525"``, ``"[::1]:25"``, ``"mx.example.com"`` -> (host, port or default)."""
    value = value.strip()
    if not value:
        raise ValueError("empty address")
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep:
            raise ValueError(f"invalid address {value!r}: missing ']'")
        port_s = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"invalid address {value!r}")
    elif value.count(":") == 1:
        host, _, port_s = value.partition(":")
    else:
        host, port_s = value, ""
    if not host:
        raise ValueError(f"invalid address {value!r}: empty host")
    if not port_s:
        return host, default_port
    port = ascii_int(port_s, max_digits=5)
    if port is None or not 0 < port < 65536:
        raise ValueError(f"invalid port in {value!r}")
    return host, port


def decode_config(data: bytes | str, source: str = "<config>") -> Config:
    """Decode and validate TOML text; errors name ``source`` and the key, in plain words.

    ``decode_config(b'[outbound.default]\\ntls = "yes"\\n', "relay.toml")`` raises
    ``ConfigError('relay.toml: outbound.default.tls: must be one of "off",
    "opportunistic", "required", "verify" (got "yes")')``. Paths are returned as written.
    """
    try:
        cfg = msgspec.toml.decode(data, type=Config)
    except msgspec.ValidationError as e:
        try:
            reason = _explain_validation_error(data, str(e))
        except Exception:  # a bug in the wording must not hide the error (or raise another)
            reason = str(e)
        raise ConfigError(f"{source}: {reason}") from None
    except msgspec.DecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}{_toml_syntax_hint(data, str(e))}"
                          ) from None
    try:
        cfg = _normalized(cfg)
        _semantic_checks(cfg)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def _normalized(cfg: Config) -> Config:
    """Domain keys and MX patterns are case-insensitive: stored lower-case, without a
    trailing dot; two keys that differ only so are an error."""
    domains: dict[str, Throttle] = {}
    for key, throttle in cfg.outbound.domains.items():
        norm = key.lower().rstrip(".")
        if norm in domains:
            raise ValueError(f"{_toml_key(['outbound', 'domains', key])}: the same domain "
                             f"as {_toml_key(['outbound', 'domains', norm])} (domain names "
                             "are case-insensitive)")
        domains[norm] = throttle
    providers = {
        name: msgspec.structs.replace(p, match_mx=[m.lower().rstrip(".") for m in p.match_mx])
        for name, p in cfg.outbound.providers.items()
    }
    outbound = msgspec.structs.replace(cfg.outbound, domains=domains, providers=providers)
    return msgspec.structs.replace(cfg, outbound=outbound)


# -- plain-words errors ----------------------------------------------------------------
#
# msgspec reports ``Expected `int | null`, got `str` - at `$.outbound.domains[...].tls```:
# library type names, and ``[...]`` for a key of a dict. The helpers below find the key
# (by converting each entry of that dict on its own), read the annotation of the failing
# field (Literal values, constraints) and say it the way the TOML file spells it.

_BARE_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$", re.ASCII)
_PATH_TOKEN_RE = re.compile(r"\.([^.\[]+)|\[(\d+)\]|\[\.\.\.\]")
_ANY_KEY = object()  # msgspec's ``[...]``: some key of a dict

#: msgspec's type names -> what a TOML file calls them ("null" has no TOML spelling).
_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "array": "an array",
    "object": "a table",
    "datetime": "a date-time",
    "date": "a date",
    "time": "a time",
    "null": "nothing",
}
_BOUND_WORDS = {">=": "at least", ">": "greater than", "<=": "at most", "<": "less than"}

_EXPECTED_GOT_RE = re.compile(r"^Expected `([^`]+)`, got `([^`]+)`$")
_BOUND_RE = re.compile(r"^Expected `([^`]+)` (>=|>|<=|<) (\S+)$")
_LENGTH_RE = re.compile(r"^Expected `([^`]+)` of length (>=|<=) (\d+)$")
_PATTERN_RE = re.compile(r"^Expected `([^`]+)` matching regex (.*)$")
_ENUM_RE = re.compile(r"^Invalid enum value ")
_UNKNOWN_RE = re.compile(r"^Object contains unknown field `(.*)`$")
_MISSING_RE = re.compile(r"^Object missing required field `(.*)`$")


def _toml_str(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(value, ensure_ascii=False)


def _toml_key(parts: list[str | int]) -> str:
    """``["outbound", "domains", "gmail.com", "tls"]`` -> ``outbound.domains."gmail.com".tls``;
    list indices as ``[0]``."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if _BARE_KEY_RE.match(part) else _toml_str(part)
            out += f".{key}" if out else key
    return out


def _toml_value(value: object) -> str:
    """A scalar as TOML writes it: ``"yes"``, ``3``, ``true``; a table or array by kind."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


def _number(text: str) -> str:
    """``0.0`` -> ``0``, ``2.5`` -> ``2.5``, ``100`` -> ``100``."""
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else text


def _type_words(spec: str, *, got: bool = False) -> str:
    """``int | str | null`` -> ``an integer or a string``."""
    names = [n.strip() for n in spec.split("|")]
    words = [("a boolean" if got and n == "bool" else _TYPE_WORDS.get(n, f"`{n}`"))
             for n in names if n != "null"] or ["nothing"]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _unwrap(tp: Any) -> tuple[Any, list[Any]]:
    """Strip ``Annotated`` and ``None`` from an annotation: (the type, or a list of the
    union's arms when several remain)."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    if get_origin(tp) in (Union, types.UnionType):
        arms = [_unwrap(a)[0] for a in get_args(tp) if a is not type(None)]
        if len(arms) == 1:
            return arms[0], arms
        return tp, arms
    return tp, [tp]


def _field_types(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, include_extras=True)


def _child_type(tp: Any, token: object) -> Any:
    """The annotation one step down: a Struct's field, a list's item, a dict's value."""
    tp, _ = _unwrap(tp)
    origin = get_origin(tp)
    if isinstance(token, str) and isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return _field_types(tp).get(token)
    if isinstance(token, int) and origin is list:
        return get_args(tp)[0]
    if token is _ANY_KEY and origin is dict:
        return get_args(tp)[1]
    return None


def _child_value(raw: object, token: object) -> object:
    if isinstance(token, str) and isinstance(raw, dict):
        return raw.get(token)
    if isinstance(token, int) and isinstance(raw, list) and token < len(raw):
        return raw[token]
    return None


def _split_error(message: str) -> tuple[str, list[object]]:
    """``Expected ... - at `$.a[0][...].b``` -> ("Expected ...", ["a", 0, _ANY_KEY, "b"])."""
    text, sep, where = message.rpartition(" - at ")
    if not sep:
        return message, []
    tokens: list[object] = []
    for m in _PATH_TOKEN_RE.finditer(where.strip("`").removeprefix("$")):
        if m.group(1) is not None:
            tokens.append(m.group(1))
        elif m.group(2) is not None:
            tokens.append(int(m.group(2)))
        else:
            tokens.append(_ANY_KEY)
    return text, tokens


def _locate(tp: Any, raw: object, text: str, tokens: list[object]
            ) -> tuple[list[str | int], str, Any, object]:
    """Follow msgspec's path through the raw TOML: (keys, msgspec's text, the failing
    annotation, the value found there). A ``[...]`` is resolved by converting each entry
    of that dict alone: the first that fails is the culprit (TOML tables keep file
    order, and msgspec stops at the first error)."""
    keys: list[str | int] = []
    for token in tokens:
        if token is _ANY_KEY:
            value_tp = _child_type(tp, token)
            if value_tp is not None and isinstance(raw, dict):
                for key, value in raw.items():
                    try:
                        msgspec.convert(value, value_tp)
                    except msgspec.ValidationError as e:
                        sub_text, sub_tokens = _split_error(str(e))
                        sub = _locate(value_tp, value, sub_text, sub_tokens)
                        return [*keys, key, *sub[0]], *sub[1:]
                    except Exception:  # a type convert cannot take: no better key than ...
                        break
            keys.append("...")
            tp, raw = value_tp, None
            continue
        keys.append(token)  # type: ignore[arg-type]
        tp, raw = _child_type(tp, token), _child_value(raw, token)
    return keys, text, tp, raw


def _explain_validation_error(data: bytes | str, message: str) -> str:
    """``key: reason`` in plain words for msgspec's ValidationError ``message``."""
    try:
        raw: object = msgspec.toml.decode(data)
    except msgspec.DecodeError:  # cannot happen: the typed decode parsed it
        raw = None
    text, tokens = _split_error(message)
    keys, text, tp, value = _locate(Config, raw, text, tokens)
    _, arms = _unwrap(tp)
    literals = [v for a in arms if get_origin(a) is Literal for v in get_args(a)]

    if m := _UNKNOWN_RE.match(text):
        keys.append(m.group(1))
        reason = "unknown key"
        if m.group(1) == "mx_rollup":
            reason += ('; mx_rollup was replaced by provider blocks: '
                       '[outbound.providers.NAME] with match_mx = ["*.mx.example.net"] '
                       'and the shared limits (see conf/relay.toml)')
        base, _ = _unwrap(tp)
        if isinstance(base, type) and issubclass(base, msgspec.Struct):
            close = difflib.get_close_matches(m.group(1), base.__struct_fields__, n=1,
                                              cutoff=0.8)
            if close:
                reason += f" (did you mean {close[0]}?)"
    elif m := _MISSING_RE.match(text):
        keys.append(m.group(1))
        reason = "missing (required)"
    elif literals and (_ENUM_RE.match(text) or _EXPECTED_GOT_RE.match(text)):
        allowed = ", ".join(_toml_value(v) for v in literals)
        reason = f"must be one of {allowed} (got {_toml_value(value)})"
    elif m := _EXPECTED_GOT_RE.match(text):
        reason = f"expected {_type_words(m.group(1))}, got {_type_words(m.group(2), got=True)}"
    elif m := _BOUND_RE.match(text):
        reason = f"must be {_BOUND_WORDS[m.group(2)]} {_number(m.group(3))}"
        if value is not None:
            reason += f" (got {_toml_value(value)})"
    elif m := _LENGTH_RE.match(text):
        unit = "characters" if m.group(1) == "str" else "entries"
        least = "at least" if m.group(2) == ">=" else "at most"
        reason = f"must have {least} {m.group(3)} {unit}"
    elif m := _PATTERN_RE.match(text):
        reason = f"must match the pattern {m.group(2)}"
    else:
        reason = text[:1].lower() + text[1:]
    hint = _dotted_domain_hint(raw, keys)
    return f"{_toml_key(keys)}: {reason}{hint}" if keys else f"{reason}{hint}"


def _dotted_domain_hint(raw: object, keys: list[str | int]) -> str:
    """``[outbound.domains.gmail.com]`` is the table ``gmail`` holding a table ``com``:
    when the error is inside such a nested table, suggest the quoted domain."""
    if keys[:2] != ["outbound", "domains"] or len(keys) < 4:
        return ""
    domains = _child_value(_child_value(raw, "outbound"), "domains")
    node = _child_value(domains, keys[2])
    if not isinstance(keys[2], str) or not isinstance(_child_value(node, keys[3]), dict):
        return ""
    # Follow the error's path while it names tables, then any nested table (co -> uk).
    labels: list[str] = [keys[2]]
    rest = [k for k in keys[3:] if isinstance(k, str)]
    while isinstance(node, dict):
        if rest and isinstance(node.get(rest[0]), dict):
            step: str | None = rest.pop(0)
        else:
            rest = []
            step = next((k for k, v in node.items() if isinstance(v, dict)), None)
        if step is None:
            break
        labels.append(step)
        node = node[step]
    domain = ".".join(labels)
    return (f"; did you mean [{_toml_key(['outbound', 'domains', domain])}]? "
            "(quote a domain that contains dots)")


_AT_LINE_RE = re.compile(r"\(at line (\d+), column \d+\)")
_UNQUOTED_DOMAIN_RE = re.compile(
    r"^\s*\[\s*outbound\s*\.\s*domains\s*\.\s*([^\"'\]\s][^\]]*?)\s*\]"
)


def _toml_syntax_hint(data: bytes | str, message: str) -> str:
    """``[outbound.domains.*.example.com]`` is a TOML syntax error (``*`` cannot start a
    bare key): suggest the quoted form."""
    m = _AT_LINE_RE.search(message)
    if not m:
        return ""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    lines = text.splitlines()
    n = int(m.group(1))
    if not 0 < n <= len(lines):
        return ""
    table = _UNQUOTED_DOMAIN_RE.match(lines[n - 1])
    if not table:
        return ""
    return (f"; did you mean [{_toml_key(['outbound', 'domains', table.group(1)])}]? "
            "(quote a domain that contains dots)")


def reload_config(path: str | os.PathLike[str], log: logging.Logger) -> Config | None:
    """Re-read a config for SIGHUP: the new Config, or None after logging why the file
    was refused (the caller then keeps running on the config it has)."""
    try:
        return load_config(path)
    except ConfigError as e:
        log.error("reload failed, keeping the running config: %s", e)
        return None
    except Exception:
        # A file no check foresaw must not take a running relay down on SIGHUP.
        log.exception("reload failed, keeping the running config: cannot read %s", path)
        return None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file. Raises ConfigError (never a traceback-worthy error).

    Relative ``spool.path``, ``log.events``, ``log.mail_log`` (not "-"/"stderr"),
    ``inbound.tls_cert`` and ``inbound.tls_key`` are made absolute against the directory
    of ``path`` (not the current directory), so
    ``relay queue --config /etc/relay/relay.toml`` finds the same spool from anywhere.
    """
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config: {e.strerror}") from None
    cfg = _resolve_paths(decode_config(data, str(p)), Path(os.path.abspath(p)).parent)
    cfg = _read_outbound_files(cfg, str(p))
    _check_rules_files(cfg, str(p))
    return _read_webhook_secrets(_read_bounce_secret(cfg, str(p)), str(p))


def _read_outbound_files(cfg: Config, source: str) -> Config:
    """``outbound.tls_ca_file`` must load as CA certificates; the first line of each
    ``password_file`` becomes that entry's ``password`` (read at every load, so a
    SIGHUP picks up a rotated password). Errors name the key and the file."""
    import ssl

    outbound = cfg.outbound
    if outbound.tls_ca_file:
        try:
            ssl.create_default_context(cafile=outbound.tls_ca_file)
        except OSError as e:  # ssl.SSLError included: not PEM, no certificate in it
            raise ConfigError(f"{source}: outbound.tls_ca_file: cannot load "
                              f"{outbound.tls_ca_file}: {e.strerror or e}") from None
    passwords = {key: _read_password(source, key, auth)
                 for key, auth in _auth_entries(outbound) if auth.password_file}
    if not passwords:
        return cfg
    replace = msgspec.structs.replace

    def filled(key: str, auth: SmtpAuth) -> SmtpAuth:
        return replace(auth, password=passwords[key]) if key in passwords else auth

    return replace(cfg, outbound=replace(
        outbound, smart_host_auth=filled("outbound.smart_host_auth", outbound.smart_host_auth),
        routes=[replace(r, auth=filled(f"outbound.routes[{i}].auth", r.auth))
                for i, r in enumerate(outbound.routes)]))


def _read_password(source: str, key: str, auth: SmtpAuth) -> str:
    return _secret_from_file(source, f"{key}.password_file", auth.password_file, exact=True)


def _check_rules_files(cfg: Config, source: str) -> None:
    """``bounces.rules`` and ``shaping.rules_file`` must name readable, valid rules files:
    ``relay.toml: bounces.rules: my-rules.toml: rules[2] (id "acme"): regex: ...``. The
    compiled classifier is kept (``load_classifier``), so the engine does not compile it
    again."""
    from relay.outcomes.classify import RulesError, load_classifier
    from relay.outcomes.shaping import ShapingRulesError, read_rules_file

    for key, path, read in (("bounces.rules", cfg.bounces.rules, load_classifier),
                            ("shaping.rules_file", cfg.shaping.rules_file, read_rules_file)):
        if path:
            try:
                read(path)
            except (RulesError, ShapingRulesError) as e:
                raise ConfigError(f"{source}: {key}: {e}") from None


def _resolve_paths(cfg: Config, base: Path) -> Config:
    """``cfg`` with its relative file paths made absolute against ``base``; "" (unset)
    stays ""."""

    def absolute(value: str) -> str:
        if not value or os.path.isabs(value):
            return value
        return os.path.normpath(os.path.join(base, value))

    replace = msgspec.structs.replace
    return replace(
        cfg,
        spool=replace(cfg.spool, path=absolute(cfg.spool.path)),
        log=replace(cfg.log, events=absolute(cfg.log.events),
                    mail_log=cfg.log.mail_log if cfg.log.mail_log in ("-", "stderr")
                    else absolute(cfg.log.mail_log)),
        inbound=replace(cfg.inbound, tls_cert=absolute(cfg.inbound.tls_cert),
                        tls_key=absolute(cfg.inbound.tls_key)),
        dkim=replace(cfg.dkim, signers=[replace(s, key=absolute(s.key))
                                        for s in cfg.dkim.signers]),
        bounces=replace(cfg.bounces, rules=absolute(cfg.bounces.rules),
                        secret_file=absolute(cfg.bounces.secret_file)),
        shaping=replace(cfg.shaping, rules_file=absolute(cfg.shaping.rules_file)),
        outbound=_outbound_paths(cfg.outbound, absolute),
        webhooks=[replace(w, secret_file=absolute(w.secret_file)) for w in cfg.webhooks],
    )


def _outbound_paths(outbound: OutboundConfig, absolute: Callable[[str], str]) -> OutboundConfig:
    replace = msgspec.structs.replace

    def auth(a: SmtpAuth) -> SmtpAuth:
        return replace(a, password_file=absolute(a.password_file))

    return replace(outbound, tls_ca_file=absolute(outbound.tls_ca_file),
                   smart_host_auth=auth(outbound.smart_host_auth),
                   routes=[replace(r, auth=auth(r.auth)) for r in outbound.routes])
