"""The ``haraka`` bench peer (bench/haraka.py): a real Haraka (``scripts/install-haraka``,
run by ``make test``) relaying from loopback to the bench's in-process sinks. Every wait
is on the sink's own condition with a deadline; every test is bounded in time."""

from __future__ import annotations

import json
import os
import shutil
import smtplib
from pathlib import Path

import pytest
import trio

from bench import haraka
from bench.haraka import HARAKA_BIN, HarakaPeer
from bench.metrics import children
from bench.peers import PEERS, PeerError, PeerSetup, make_peer
from bench.sink import Behaviour, Sink


@pytest.fixture
def installed() -> None:
    """No skipping: ``make test`` installs Haraka; without it a test fails saying so."""
    assert HARAKA_BIN.exists() and shutil.which("node"), (
        "Haraka is not installed: run scripts/install-haraka (make test does)")


needs_haraka = pytest.mark.usefixtures("installed")


def _send(port: int, messages: list[list[str]]) -> None:
    """One SMTP session, one transaction per recipient list; every recipient accepted."""
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        for i, rcpts in enumerate(messages):
            refused = s.sendmail("bench@sender.test", rcpts,
                                 f"Subject: haraka {i}\r\n\r\nbody {i}\r\n".encode())
            assert refused == {}


def _rcpts(sink: Sink, domain: str) -> int:
    st = sink.stats.get(domain)
    return st.recipients if st else 0


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] == "Z"
    except OSError:
        return True


@needs_haraka
@pytest.mark.timeout(90)
async def test_relays_every_recipient_and_honours_routes() -> None:
    """Two domains to the default sink, a third routed to a second sink; the whole
    process tree and the temp dir are gone after the context."""
    main, routed = Sink(), Sink()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(main.serve, "127.0.0.1", 0)
        routed_port = await nursery.start(routed.serve, "127.0.0.1", 0)
        setup = PeerSetup(sink_port=port, routes={"routed.test": f"127.0.0.1:{routed_port}"})
        with trio.fail_after(75):
            peer = make_peer("haraka", setup)
            assert isinstance(peer, HarakaPeer)
            async with peer:
                assert peer.name == "haraka" and peer.http_port is None
                assert peer.spool_dir is not None and peer.spool_dir.is_dir()
                (master,) = peer.root_pids()
                workers = children(master)
                assert len(workers) == peer.workers  # nodes=cpus: one per core
                messages = [[f"a{i}@one.test", f"b{i}@two.test"] for i in range(4)]
                messages += [[f"c{i}@routed.test", f"d{i}@one.test"] for i in range(3)]
                await trio.to_thread.run_sync(_send, peer.port, messages)
                await main.wait_for(lambda s: s.total_recipients >= 11, timeout=30)
                await routed.wait_for(lambda s: s.total_recipients >= 3, timeout=30)
                tmp = peer.tmp
            assert (_rcpts(main, "one.test"), _rcpts(main, "two.test")) == (7, 4)
            assert _rcpts(main, "routed.test") == 0
            assert _rcpts(routed, "routed.test") == 3 and routed.total_recipients == 3
            assert main.total_recipients == 11  # nothing twice
            assert not tmp.exists()
            assert all(_gone(p) for p in [master, *workers])
        nursery.cancel_scope.cancel()


@needs_haraka
@pytest.mark.timeout(90)
async def test_deferred_mail_is_retried_after_recovery() -> None:
    """451 at RCPT while the domain is down, then accepted: Haraka's retry (the
    bench_sink deferred hook, retry_interval 1 s) delivers it within seconds."""
    sink = Sink(behaviours={"down.test": Behaviour.TEMPFAIL})
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sink.serve, "127.0.0.1", 0)
        with trio.fail_after(75):
            async with HarakaPeer(PeerSetup(sink_port=port, retry_interval=1.0)) as peer:
                await trio.to_thread.run_sync(
                    _send, peer.port, [["x@down.test", "y@up.test"], ["z@down.test"]])
                await sink.wait_for(lambda s: _rcpts(s, "up.test") == 1
                                    and s.stats["down.test"].tempfails >= 2, timeout=30)
                sink.set_behaviour("down.test", Behaviour.ACCEPT)
                t0 = trio.current_time()
                await sink.wait_for(lambda s: _rcpts(s, "down.test") == 2, timeout=30)
                assert trio.current_time() - t0 < 10
        nursery.cancel_scope.cancel()


@needs_haraka
@pytest.mark.timeout(90)
async def test_domain_max_connections_is_held() -> None:
    """``domain_throttle.max_connections`` on a routed domain: a slow sink (0.2 s per
    message) never sees more connections at once for it than the limit (unthrottled,
    Haraka opens as many at once as its ``concurrency_max`` lets it)."""
    sink = Sink(delays={"slow.test": 0.2})
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sink.serve, "127.0.0.1", 0)
        setup = PeerSetup(sink_port=port, routes={"slow.test": f"127.0.0.1:{port}"},
                          domain_throttle={"max_connections": 2})
        with trio.fail_after(75):
            async with HarakaPeer(setup) as peer:
                await trio.to_thread.run_sync(
                    _send, peer.port, [[f"r{i}@slow.test"] for i in range(6)])
                await sink.wait_for(lambda s: _rcpts(s, "slow.test") == 6, timeout=60)
        assert 1 <= sink.stats["slow.test"].max_concurrent_connections <= 2
        nursery.cancel_scope.cancel()


def test_config_mirrors_the_setup(tmp_path: Path) -> None:
    """The generated files (no Haraka needed): loopback listener, a worker per core,
    plain outbound, the per-worker concurrency, relaying for 127.0.0.0/8 only, no DNS
    plugin, the sink/route/retry/throttle settings of the plugin."""
    assert "haraka" in PEERS
    setup = PeerSetup(sink_port=2626, routes={"a.test": "127.3.0.1:2626"},
                      domain_throttle={"max_connections": 2, "max_message_rate": "60/min"},
                      retry_interval=1.0, max_connections=20)
    peer = HarakaPeer(setup)
    try:
        files = peer.config_files()
    finally:
        peer.tmp.rmdir()
    smtp = files["config/smtp.ini"]
    assert f"listen=127.0.0.1:{peer.port}" in smtp and "nodes=cpus" in smtp
    assert "daemonize=false" in smtp
    outbound = files["config/outbound.ini"]
    assert "enable_tls=false" in outbound
    assert f"concurrency_max={-(-20 // (os.cpu_count() or 1))}" in outbound
    assert files["config/plugins"].split() == ["relay", "bench_sink"]
    assert "acl=true" in files["config/relay.ini"]
    assert files["config/relay_acl_allow"].strip() == "127.0.0.0/8"
    assert "level=notice" in files["config/log.ini"]
    settings = json.loads(files["config/bench_sink.json"])
    assert settings == {"sink": "127.0.0.1:2626", "routes": {"a.test": "127.3.0.1:2626"},
                        "retry_s": 1, "throttle": {"domains": ["a.test"], "max_connections": 2,
                                                   "rate_per_s": 1.0}}
    # no throttle without routes (as the relay: it applies to the routed domains)
    bare = HarakaPeer(PeerSetup(sink_port=1, domain_throttle={"max_connections": 2}))
    try:
        assert bare.plugin_settings()["throttle"] == {}
    finally:
        bare.tmp.rmdir()


async def test_missing_install_says_how_to_install(monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    monkeypatch.setattr(haraka, "HARAKA_BIN", tmp_path / "nope" / "haraka")
    peer = HarakaPeer(PeerSetup(sink_port=1))
    with pytest.raises(PeerError, match="scripts/install-haraka"):
        async with peer:
            pass
    assert not peer.tmp.exists()  # the temp dir is removed with the error
