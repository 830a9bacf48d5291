"""Outbound ``tls = "verify"`` and AUTH to a smart host / route, over real loopback
sockets: bench.sink servers with trustme certificates, a real dnsmasq for the MX and
smart host names, a second real relay (``relay serve``, tests/integration/relayproc.py)
as the upstream provider that demands AUTH, and the recording sink as a plaintext-only
upstream that must never see the credentials.

Every wait is bounded (``trio.fail_after``, polling with a deadline); nothing sleeps to
synchronise.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme

from bench.sink import Sink
from relay.config import Config, ConfigError, load_config
from relay.events import Delivery, EventLog, Reception, TransientFailure
from relay.outbound.engine import DeliveryEngine
from relay.outbound.resolver import Resolver
from relay.outbound.routing import Router
from relay.outbound.session import SessionError, SessionPolicy, open_session
from relay.smtp.client import Credentials
from relay.spool import GroupCommitWriter, Spool
from tests.integration import dnsmasq as _dnsmasq
from tests.integration.relayproc import RelayProcess, make_relay, wait_for
from tests.integration.smtpsink import RecordingSink
from tests.integration.test_delivery_engine import (
    Recorded,
    _wait_until,
    message,
    read_events,
    running,
)

dnsmasq = _dnsmasq.dnsmasq

PASSWORD = "right-pw-7f3a"
BODY = b"Subject: tls\r\nFrom: s@src.test\r\n\r\nhello\r\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def server_context(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    return ctx


def policy(**kw: object) -> SessionPolicy:
    base: dict[str, object] = dict(helo_name="client.test", tls="verify", connect_timeout=5.0,
                                   command_timeout=5.0, data_timeout=5.0)
    base.update(kw)
    return SessionPolicy(**base)  # type: ignore[arg-type]


async def start_sink(nursery: trio.Nursery, host: str, port: int = 0,
                     **kw: object) -> tuple[Sink, int]:
    sink = Sink(keep_messages=True, **kw)  # type: ignore[arg-type]
    return sink, await nursery.start(sink.serve, host, port)


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "spool", map_size=1 << 30)
    yield s
    s.close()


@pytest.fixture
def events(tmp_path: Path) -> Iterator[Recorded]:
    bus = Recorded(tmp_path / "events.jsonl")
    yield bus
    bus.log.close()


def engine(cfg: Config, spool: Spool, events: Recorded) -> DeliveryEngine:
    # Not "relay.test": the upstream relay greets with that name, which would be a loop.
    return DeliveryEngine(cfg, spool, 0, 1, events, "client.test",
                          writer=GroupCommitWriter(spool, 0.0, 256))


def write_config(tmp: Path, text: str) -> Config:
    path = tmp / "relay.toml"
    path.write_text(text)
    return load_config(path)


FAST = """
[outbound.default]
retry_interval = 60.0
idle_timeout = 0.5
connect_timeout = 5.0
command_timeout = 10.0
data_timeout = 10.0
"""


# -- tls = "verify" on one session -----------------------------------------------------


async def test_verify_accepts_a_trusted_certificate_for_the_mx_name(
        nursery: trio.Nursery, ca: trustme.CA, ca_file: str) -> None:
    sink, port = await start_sink(nursery, "127.0.0.1",
                                  ssl_context=server_context(ca, "mx.good.test"))
    with trio.fail_after(10):
        session = await open_session("127.0.0.1", port, "mx.good.test",
                                     policy(ca_file=ca_file))
        assert session.tls is not None and session.tls.startswith("TLS")
        [o] = await session.deliver(message(["r@x.test"]).envelope, [0], BODY)
        assert o.kind == "delivered"
        await session.aclose()
    assert sink.messages[0][2] == BODY


@pytest.mark.parametrize(("cert_names", "mx_host", "why"), [
    (("mx.other.test",), "mx.good.test", "Hostname mismatch"),
    # The certificate names the IP connected to, not the MX host name: the IP never counts.
    (("127.0.0.1",), "mx.good.test", "Hostname mismatch"),
], ids=["wrong-name", "ip-only"])
async def test_verify_refuses_a_certificate_for_another_name(
        nursery: trio.Nursery, ca: trustme.CA, ca_file: str, cert_names: tuple[str, ...],
        mx_host: str, why: str) -> None:
    sink, port = await start_sink(nursery, "127.0.0.1",
                                  ssl_context=server_context(ca, *cert_names))
    with trio.fail_after(10), pytest.raises(SessionError) as info:
        await open_session("127.0.0.1", port, mx_host, policy(ca_file=ca_file))
    e = info.value
    assert e.enhanced == "4.7.5" and not e.permanent
    assert e.text.startswith("certificate verify failed: ") and why in e.text, e.text
    assert f"{mx_host}[127.0.0.1]:{port}" in e.text
    assert sink.connections_opened == 1 and sink.total_messages == 0  # no plaintext retry


async def test_verify_refuses_an_untrusted_ca_and_required_does_not(
        nursery: trio.Nursery, ca_file: str) -> None:
    rogue = trustme.CA()
    _sink, port = await start_sink(nursery, "127.0.0.1",
                                  ssl_context=server_context(rogue, "mx.good.test"))
    with trio.fail_after(10), pytest.raises(SessionError) as info:
        await open_session("127.0.0.1", port, "mx.good.test", policy(ca_file=ca_file))
    assert info.value.enhanced == "4.7.5"
    assert info.value.text.startswith("certificate verify failed: ")
    # "required" is Postfix's "encrypt": TLS, whatever the certificate.
    with trio.fail_after(10):
        session = await open_session("127.0.0.1", port, "mx.good.test",
                                     policy(tls="required", ca_file=ca_file))
        assert session.tls is not None
        await session.aclose()


async def test_verify_with_a_vanished_ca_file_defers(
        nursery: trio.Nursery, ca: trustme.CA, tmp_path: Path) -> None:
    _sink, port = await start_sink(nursery, "127.0.0.1",
                                   ssl_context=server_context(ca, "mx.good.test"))
    with trio.fail_after(10), pytest.raises(SessionError) as info:
        await open_session("127.0.0.1", port, "mx.good.test",
                           policy(ca_file=str(tmp_path / "gone.pem")))
    assert info.value.enhanced == "4.7.5" and not info.value.permanent
    assert "gone.pem" in info.value.text


async def test_verify_without_starttls_defers(nursery: trio.Nursery, ca_file: str) -> None:
    sink, port = await start_sink(nursery, "127.0.0.1")  # no ssl_context: no STARTTLS
    with trio.fail_after(10), pytest.raises(SessionError) as info:
        await open_session("127.0.0.1", port, "mx.good.test", policy(ca_file=ca_file))
    assert info.value.enhanced == "4.7.4" and "TLS is required" in info.value.text
    assert sink.total_messages == 0


# -- tls = "verify" through the engine: next MX, deferral events -------------------------


async def test_engine_tries_the_next_mx_and_defers_with_the_reason(
        nursery: trio.Nursery, ca: trustme.CA, ca_file: str, tmp_path: Path,
        spool: Spool, events: Recorded, dnsmasq) -> None:  # type: ignore[no-untyped-def]
    # 127.0.0.2: a trusted certificate for another name; 127.0.0.3: the right one;
    # 127.0.0.4: the right name, from a CA nobody trusts.
    wrong, port = await start_sink(nursery, "127.0.0.2",
                                   ssl_context=server_context(ca, "wrong.test"))
    right, _ = await start_sink(nursery, "127.0.0.3", port,
                                ssl_context=server_context(ca, "mx2.v.test"))
    rogue, _ = await start_sink(nursery, "127.0.0.4", port,
                                ssl_context=server_context(trustme.CA(), "mx.u.test"))
    dns = dnsmasq(mx={"v.test": [(10, "mx1.v.test"), (20, "mx2.v.test")],
                      "w.test": [(10, "mx1.w.test")], "u.test": [(10, "mx.u.test")]},
                  hosts={"mx1.v.test": "127.0.0.2", "mx2.v.test": "127.0.0.3",
                         "mx1.w.test": "127.0.0.2", "mx.u.test": "127.0.0.4"})
    cfg = write_config(tmp_path, f"""
[outbound]
resolvers = ["{dns.nameserver}"]
smtp_port = {port}
tls_ca_file = "{ca_file}"
{FAST}
tls = "verify"
""")
    spool.store_batch([message(["a@v.test"]), message(["b@w.test"]), message(["c@u.test"])])
    async with running(engine(cfg, spool, events)):
        with trio.fail_after(20):
            await right.wait_for(lambda s: s.total_messages == 1, timeout=15)
            await _wait_until(lambda: events.counts["TransientFailure"] >= 2, 15)
    evs = read_events(events)
    [delivered] = [e for e in evs if isinstance(e, Delivery)]
    assert (delivered.recipient, delivered.mx_host) == ("a@v.test", "mx2.v.test")
    failures = {e.recipient: e for e in evs if isinstance(e, TransientFailure)}
    assert set(failures) == {"b@w.test", "c@u.test"}
    w = failures["b@w.test"].reply
    assert w.startswith("451 4.7.5 certificate verify failed: Hostname mismatch"), w
    assert "mx1.w.test" in w
    assert failures["c@u.test"].reply.startswith("451 4.7.5 certificate verify failed: ")
    # mx1.v.test (and mx1.w.test) were tried, their handshakes failed, nothing was sent.
    assert wrong.connections_opened >= 2 and wrong.total_messages == 0
    assert rogue.connections_opened >= 1 and rogue.total_messages == 0


# -- AUTH through a real upstream relay ---------------------------------------------------


@pytest.fixture(scope="module")
def upstream(ca: trustme.CA,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    """A real relay that relays only for authenticated users ("app"), AUTH only after
    STARTTLS, with a certificate for smtp.upstream.test; its own outbound goes nowhere
    (mail stays in its spool, its events log says what it received)."""
    tmp = tmp_path_factory.mktemp("upstream")
    pem = tmp / "upstream.pem"
    ca.issue_cert("smtp.upstream.test").private_key_and_cert_chain_pem.write_to_path(str(pem))
    relay = make_relay(tmp, workers=1, inbound=f"""tls_cert = "{pem}"
tls_key = "{pem}"
auth_users = [{{ username = "app", password = "plain${PASSWORD}" }}]
""", extra="\n[relay]\nallow_networks = []\n")
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()


def receptions(relay: RelayProcess) -> list[Reception]:
    path = relay.tmp / "events.jsonl"
    if not path.exists():
        return []
    return [e for e in EventLog.read(path) if isinstance(e, Reception)]


def smart_host_config(tmp: Path, relay: RelayProcess, dns_server: str, ca_file: str,
                      auth: str) -> Config:
    return write_config(tmp, f"""
[outbound]
resolvers = ["{dns_server}"]
smart_host = "smtp.upstream.test:{relay.port}"
tls_ca_file = "{ca_file}"
smart_host_auth = {auth}
{FAST}
tls = "verify"
""")


async def test_relays_through_an_upstream_that_demands_auth(
        upstream: RelayProcess, ca_file: str, tmp_path: Path, spool: Spool,
        events: Recorded, dnsmasq) -> None:  # type: ignore[no-untyped-def]
    dns = dnsmasq(hosts={"smtp.upstream.test": "127.0.0.1"})
    (tmp_path / "smarthost.pw").write_text(PASSWORD + "\n")
    # password_file relative to the config file; read by load_config.
    cfg = smart_host_config(tmp_path, upstream, dns.nameserver, ca_file,
                            '{ username = "app", password_file = "smarthost.pw" }')
    assert cfg.outbound.smart_host_auth.password == PASSWORD
    msg = message(["dest@far.test"], sender="app@client.test")
    spool.store_batch([msg])
    async with running(engine(cfg, spool, events)):
        with trio.fail_after(20):
            await _wait_until(lambda: events.counts["Delivery"] == 1, 15)
    [d] = [e for e in read_events(events) if isinstance(e, Delivery)]
    assert d.mx_host == "smtp.upstream.test" and d.reply.startswith("250")
    got = await trio.to_thread.run_sync(lambda: wait_for(
        lambda: [r for r in receptions(upstream) if r.recipients == ["dest@far.test"]],
        10, "the upstream's Reception event"))
    assert got[0].auth_user == "app" and got[0].tls is not None
    assert got[0].sender == "app@client.test"


async def test_a_wrong_password_defers_with_the_servers_reply(
        upstream: RelayProcess, ca_file: str, tmp_path: Path, spool: Spool,
        events: Recorded, dnsmasq) -> None:  # type: ignore[no-untyped-def]
    dns = dnsmasq(hosts={"smtp.upstream.test": "127.0.0.1"})
    cfg = smart_host_config(tmp_path, upstream, dns.nameserver, ca_file,
                            '{ username = "app", password = "not-the-password" }')
    spool.store_batch([message(["wrongpw@far.test"])])
    async with running(engine(cfg, spool, events)):
        with trio.fail_after(20):
            await _wait_until(lambda: events.counts["TransientFailure"] == 1, 15)
    [t] = [e for e in read_events(events) if isinstance(e, TransientFailure)]
    # Postfix's smtp_sasl_auth_soft_bounce: 535 5.7.8 becomes a deferral, 4.7.8.
    assert t.reply.startswith(
        "451 4.7.8 SASL authentication failed for app; server "
        f"smtp.upstream.test[127.0.0.1]:{upstream.port} said: 535 5.7.8"), t.reply
    assert "not-the-password" not in t.reply
    assert not [r for r in receptions(upstream) if r.recipients == ["wrongpw@far.test"]]


async def test_a_plaintext_only_upstream_never_sees_the_credentials(
        tmp_path: Path, spool: Spool, events: Recorded) -> None:
    sink = RecordingSink(extra_keywords=(b"AUTH PLAIN LOGIN",))  # AUTH, but no STARTTLS
    try:
        # tls = "off" everywhere: the route's credentials still make TLS required.
        cfg = write_config(tmp_path, f"""
[[outbound.routes]]
domain = "p.test"
hosts = ["127.0.0.1:{sink.port}"]
auth = {{ username = "app", password = "{PASSWORD}" }}
{FAST}
tls = "off"
""")
        spool.store_batch([message(["x@p.test"])])
        async with running(engine(cfg, spool, events)):
            with trio.fail_after(20):
                await _wait_until(lambda: events.counts["TransientFailure"] == 1, 15)
        [t] = [e for e in read_events(events) if isinstance(e, TransientFailure)]
        assert t.reply.startswith("451 4.7.4 TLS is required, but was not offered by host "
                                  f"127.0.0.1[127.0.0.1]:{sink.port} (credentials are "
                                  "configured for it"), t.reply
        with sink.lock:
            commands = list(sink.commands)
    finally:
        sink.close()
    assert commands and commands[0].startswith(b"EHLO ")
    assert not any(c.upper().startswith((b"AUTH", b"MAIL")) for c in commands), commands
    wire = b"\n".join(commands)
    for secret in (PASSWORD.encode(), base64.b64encode(PASSWORD.encode()),
                   base64.b64encode(f"\0app\0{PASSWORD}".encode())):
        assert secret not in wire


async def test_session_auth_forces_tls_even_when_policy_is_off(ca_file: str) -> None:
    sink = RecordingSink(extra_keywords=(b"AUTH PLAIN",))
    try:
        with trio.fail_after(10), pytest.raises(SessionError) as info:
            await open_session("127.0.0.1", sink.port, "smtp.plain.test",
                               policy(tls="off"), auth=Credentials("app", PASSWORD))
    finally:
        sink.close()
    assert info.value.enhanced == "4.7.4" and not info.value.permanent
    assert not any(c.upper().startswith(b"AUTH") for c in sink.commands)


async def test_a_tls_server_without_auth_defers_without_sending_mail(
        nursery: trio.Nursery, ca: trustme.CA, ca_file: str) -> None:
    sink, port = await start_sink(nursery, "127.0.0.1",
                                  ssl_context=server_context(ca, "mx.good.test"))
    with trio.fail_after(10), pytest.raises(SessionError) as info:
        await open_session("127.0.0.1", port, "mx.good.test", policy(ca_file=ca_file),
                           auth=Credentials("app", PASSWORD))
    e = info.value
    assert (e.enhanced, e.permanent) == ("4.7.0", False)
    assert "as app: the server offers no AUTH" in e.text and PASSWORD not in e.text
    assert sink.total_messages == 0


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(("toml", "error"), [
    ('[outbound]\nsmart_host = "h.test"\n[outbound.smart_host_auth]\nusername = "a"\n'
     'password_file = "missing.pw"\n',
     "outbound.smart_host_auth.password_file: cannot read {tmp}/missing.pw: "
     "No such file or directory"),
    ('[[outbound.routes]]\ndomain = "a.test"\nhosts = ["h.test"]\n'
     'auth = { username = "a", password = "x", password_file = "p" }\n',
     "outbound.routes[0].auth: set one of password, password_file"),
    ('[[outbound.routes]]\ndomain = "a.test"\nhosts = ["h.test"]\n'
     'auth = { password = "x" }\n',
     "outbound.routes[0].auth.username: must be non-empty, without NUL, CR or LF"),
    ('[outbound.smart_host_auth]\nusername = "a"\npassword = "x"\n',
     "outbound.smart_host_auth: there is no outbound.smart_host"),
    ('[outbound]\ntls_ca_file = "nope.pem"\n',
     "outbound.tls_ca_file: cannot load {tmp}/nope.pem: No such file or directory"),
    ('[outbound]\ntls_ca_file = "relay.toml"\n',  # a file that holds no certificate
     "outbound.tls_ca_file: cannot load {tmp}/relay.toml: "),
], ids=["missing-password-file", "password-and-file", "no-username", "no-smart-host",
        "missing-ca-file", "not-a-ca-file"])
def test_config_errors_name_the_key_and_the_file(tmp_path: Path, toml: str,
                                                 error: str) -> None:
    with pytest.raises(ConfigError) as info:
        write_config(tmp_path, toml)
    assert str(info.value).startswith(f"{tmp_path}/relay.toml: "
                                      + error.format(tmp=tmp_path)), str(info.value)


async def test_credentials_reach_the_hops_of_their_route_only(tmp_path: Path) -> None:
    (tmp_path / "r.pw").write_text("route-pw\r\nignored second line\n")
    cfg = write_config(tmp_path, """
[outbound]
smart_host = "smart.test:587"
smart_host_auth = { username = "smart", password = "smart-pw" }
[[outbound.routes]]
domain = "*.r.test"
hosts = ["127.0.0.5:2525"]
auth = { username = "route", password_file = "r.pw" }
[[outbound.routes]]
domain = "open.test"
hosts = ["127.0.0.6"]
""")
    router = Router(cfg.outbound, Resolver(["127.0.0.1:9"]))
    assert router.credentials("a.r.test") == Credentials("route", "route-pw")
    assert router.credentials("open.test") is None  # a route without auth: none
    assert router.credentials("else.test") == Credentials("smart", "smart-pw")
    assert "route-pw" not in repr(router.credentials("a.r.test"))
    with trio.fail_after(5):  # IP hosts: no DNS (the resolver points at a closed port)
        [hop] = await router.hops("a.r.test")
        [plain] = await router.hops("open.test")
    assert (hop.ip, hop.port, hop.auth) == ("127.0.0.5", 2525, Credentials("route", "route-pw"))
    assert "route-pw" not in repr(hop)
    assert plain.auth is None
