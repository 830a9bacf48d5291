"""`relay queue suspend|resume|bounce` and `relay shaping status` against a real spool in
a tmp dir, `relay` run as a subprocess beside this process's open Spool (as beside a
worker): the shaping entries written and removed, the ShapingChange and AdminBounce
events, exactly the selected recipients bounced (no DSN), jobs being delivered skipped,
and bad selectors refused with one line and an exit code, nothing changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.events import EventLog
from relay.events.types import AdminBounce, Bounce, ShapingChange
from relay.model import Envelope, NewMessage, Recipient
from relay.spool import Spool
from relay.spool.shaping import ShapingEntry, ShapingStore
from relay.spool.store import prepare, shard_hash

try:  # tests/integration may or may not be a package; the fixture module is a sibling.
    from tests.integration import dnsmasq as _dnsmasq
except ImportError:
    import dnsmasq as _dnsmasq  # type: ignore[no-redef]

dnsmasq = _dnsmasq.dnsmasq

BASE_CONFIG = """\
[spool]
path = "{spool}"
[log]
events = "{events}"
[outbound]
resolvers = [{resolvers}]
[outbound.providers."mailco"]
match_mx = ["*.mail.test"]
[egress]
default_pool = "shared"
[egress.sources."ip-a"]
source_address = "127.0.0.1"
[egress.sources."ip-b"]
source_address = "127.0.0.2"
[egress.sources."ip-spare"]
source_address = "127.0.0.3"
[egress.pools."shared"]
sources = [{{source = "ip-a"}}, {{source = "ip-b"}}]
[egress.pools."vip"]
sources = [{{source = "ip-b"}}]
"""


@dataclass
class Setup:
    tmp: Path
    config: Path
    spool: Spool
    events: Path

    def relay(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "relay.cli", *args, "--config",
                               str(self.config)], capture_output=True, text=True,
                              timeout=60, cwd=self.tmp)

    def ok(self, *args: str) -> str:
        result = self.relay(*args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def logged(self) -> list:  # type: ignore[type-arg]
        return EventLog.read(self.events) if self.events.exists() else []

    def shaping(self) -> list[ShapingEntry]:
        return ShapingStore(self.spool).entries(time.time())

    def pending(self) -> dict[str, list[str]]:
        """Queue id -> the recipients still queued, from the spool itself."""
        out: dict[str, list[str]] = {}
        for entry in self.spool.list_messages():
            out[entry.queue_id] = sorted(r for d in entry.domains for r in d.pending)
        return out


def make_setup(tmp_path: Path, resolvers: str = "") -> Setup:
    spool_dir, events = tmp_path / "spool", tmp_path / "events.jsonl"
    config = tmp_path / "relay.toml"
    config.write_text(BASE_CONFIG.format(spool=spool_dir, events=events, resolvers=resolvers))
    return Setup(tmp_path, config, Spool(spool_dir, 1 << 30), events)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = make_setup(tmp_path)
    try:
        yield s
    finally:
        s.spool.close()


def message(*rcpts: str, tenant: str | None = None, campaign: str | None = None,
            pool: str | None = "shared") -> NewMessage:
    env = Envelope(queue_id=Spool.new_queue_id(), sender="s@sender.test",
                   recipients=[Recipient(address=r) for r in rcpts], received_at=time.time(),
                   tenant=tenant, campaign_id=campaign, ip_pool=pool)
    return NewMessage(envelope=env, data=b"Subject: t\r\n\r\nbody\r\n")


def store(spool: Spool, *msgs: NewMessage) -> list[str]:
    spool.store_batch(list(msgs))
    return [m.envelope.queue_id for m in msgs]


class ClaimAs:
    """Stores the jobs of ``domain`` claimed by ``pid`` (as the receiving worker's
    engine does), lease not yet run out."""

    lease = 600.0

    def __init__(self, domain: str, pid: int) -> None:
        self.pid = pid
        self._hash = shard_hash(domain)

    def wants(self, domain_hash: int) -> bool:
        return domain_hash == self._hash

    def adopt(self, jobs: object) -> None:
        pass


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    return child.pid


# -- suspend / resume / status ---------------------------------------------------------


def test_suspend_writes_an_admin_entry_resume_removes_it(setup: Setup) -> None:
    before = time.time()
    out = setup.ok("queue", "suspend", "--domain", "Example.TEST.", "--duration", "2h",
                   "--reason", "maintenance at the receiver")
    assert out.splitlines()[0].startswith("domain:example.test: suspended for 2h (until ")
    assert "within about a second" in out
    [entry] = setup.shaping()
    assert (entry.scope, entry.origin, entry.suspend) == ("domain:example.test", "admin", True)
    assert entry.reason == "maintenance at the receiver"
    assert entry.until is not None and before + 7200 <= entry.until <= time.time() + 7200
    [change] = setup.logged()
    assert isinstance(change, ShapingChange)
    assert (change.scope, change.rule, change.before, change.after, change.until) == (
        "domain:example.test", "admin", "not suspended", "suspended", entry.until)

    status = setup.ok("shaping", "status").splitlines()
    assert status[0].split() == ["Scope", "Origin", "Holds", "Since", "Expires", "Reason"]
    row = status[1]
    assert row.startswith("domain:example.test  admin   suspended  ")
    assert "(in 1h59m" in row or "(in 2h)" in row
    assert row.endswith("maintenance at the receiver")
    assert status[-1] == "-- 1 suspended, 0 with adjusted limits."
    [as_json] = json.loads(setup.ok("shaping", "status", "--json"))
    assert as_json["scope"] == "domain:example.test" and as_json["until"] == entry.until

    out = setup.ok("queue", "resume", "--domain", "example.test", "--reason", "fixed")
    assert out.startswith("domain:example.test: resumed (suspended since ")
    assert setup.shaping() == []
    resumed = setup.logged()[-1]
    assert isinstance(resumed, ShapingChange)
    assert (resumed.before, resumed.after, resumed.reason, resumed.until) == (
        "suspended", "not suspended", "fixed", None)
    assert setup.ok("shaping", "status") == "No suspensions or adjusted limits in force\n"

    again = setup.relay("queue", "resume", "--domain", "example.test")
    assert again.returncode == 65
    assert again.stderr == ("relay: domain:example.test: not suspended by an operator "
                            "(relay shaping status lists what is)\n")
    assert len(setup.logged()) == 2  # a refused resume logs nothing


def test_every_selector_writes_its_scope_until_resumed(setup: Setup) -> None:
    for option, value in (("--provider", "mailco"), ("--tenant", "acme"),
                          ("--campaign", "spring-sale"), ("--source", "ip-b")):
        out = setup.ok("queue", "suspend", option, value)
        assert out.startswith(f"{option[2:]}:{value}: suspended until resumed\n")
    entries = {e.scope: e for e in setup.shaping()}
    assert set(entries) == {"provider:mailco", "tenant:acme", "campaign:spring-sale",
                            "source:ip-b"}
    assert all(e.until is None and e.suspend and e.origin == "admin" and e.reason == ""
               for e in entries.values())
    status = setup.ok("shaping", "status").splitlines()
    scopes = [line.split()[0] for line in status[1:5]]
    assert scopes == sorted(scopes)
    assert all("until resumed" in line and line.endswith("  -") for line in status[1:5])
    # A second suspend replaces the first (new duration), and says so.
    out = setup.ok("queue", "suspend", "--tenant", "acme", "--duration", "30m")
    assert "(replaces the earlier suspension)" in out
    assert {e.scope: e for e in setup.shaping()}["tenant:acme"].until is not None
    assert setup.logged()[-1].before == "suspended"  # type: ignore[union-attr]


def test_status_shows_rule_and_adaptive_entries_beside_the_operators(setup: Setup) -> None:
    now = time.time()
    ShapingStore(setup.spool).put([
        ShapingEntry(scope="ip-a->provider:gmail", origin="rule:gmail-rate", until=now + 3600,
                     since=now, reason="421 4.7.28 Our system has detected an unusual rate",
                     max_message_rate=0.5, max_connections=2),
        ShapingEntry(scope="ip-a->provider:gmail", origin="rule:old", until=now - 1,
                     since=now - 100, max_connections=1),  # expired: not shown
    ])
    setup.ok("queue", "suspend", "--domain", "b.test")
    lines = setup.ok("shaping", "status").splitlines()
    assert len(lines) == 5
    assert lines[1].startswith("domain:b.test ")
    assert lines[2].startswith("ip-a->provider:gmail  rule:gmail-rate  rate 30.0/min, "
                               "connections 2  ")
    assert lines[2].endswith("  421 4.7.28 Our system has detected an unusual rate")
    assert lines[4] == "-- 1 suspended, 1 with adjusted limits."


@pytest.mark.parametrize(("args", "code", "error"), [
    (["queue", "suspend"], 64, "queue suspend needs exactly one of --domain, --provider, "
                               "--tenant, --campaign, --source"),
    (["queue", "suspend", "--domain", "a.test", "--tenant", "t"], 64,
     "queue suspend needs exactly one of"),
    (["queue", "suspend", "--provider", "nope"], 64,
     "--provider nope: no [outbound.providers.nope] in "),
    (["queue", "resume", "--source", "10.0.0.1"], 64,
     '--source 10.0.0.1: no [egress.sources."10.0.0.1"] in '),
    (["queue", "suspend", "--domain", "a.test", "--duration", "soon"], 64,
     "'soon' is not a duration"),
    (["queue", "suspend", "--domain", "x@a.test"], 64, "a domain, not an address"),
    (["queue", "suspend", "--tenant", " "], 64, "--tenant needs a value"),
    (["queue", "suspend", "QID", "--domain", "a.test"], 64, "takes no queue id"),
    (["queue", "bounce"], 64, "queue bounce needs a queue id or a selector"),
    (["queue", "bounce", "--domain", "a.test", "--duration", "1h"], 64,
     "--duration is for queue suspend"),
    (["queue", "bounce", "--provider", "Mailco"], 64, "no [outbound.providers.Mailco]"),
    (["queue", "list", "--tenant", "acme"], 64, "--tenant is for queue suspend|resume|bounce"),
    (["queue", "bounce", "NO-SUCH-ID"], 65, "NO-SUCH-ID: no such message in the queue"),
    (["queue", "resume", "--campaign", "never"], 65, "campaign:never: not suspended"),
])
def test_bad_selectors_are_one_line_errors_and_change_nothing(
        setup: Setup, args: list[str], code: int, error: str) -> None:
    [qid] = store(setup.spool, message("a@a.test"))
    result = setup.relay(*args)
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith("relay: ") and error in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    if "no [" in error:  # the config file the definition is missing from
        assert result.stderr.endswith(f"] in {setup.config}\n")
    assert setup.shaping() == [] and setup.logged() == []
    assert setup.pending() == {qid: ["a@a.test"]}


def test_a_missing_spool_is_an_error_not_a_new_spool(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(BASE_CONFIG.format(spool=tmp_path / "nowhere", events="", resolvers=""))
    result = subprocess.run([sys.executable, "-m", "relay.cli", "queue", "suspend",
                             "--domain", "a.test", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 66
    nowhere = tmp_path / "nowhere"
    assert result.stderr == f"relay: no spool at {nowhere} (spool.path in the config)\n"
    assert not (tmp_path / "nowhere").exists()


# -- bounce ----------------------------------------------------------------------------


def test_bounce_by_domain_fails_exactly_those_recipients_without_dsn(setup: Setup) -> None:
    both, only, other = store(
        setup.spool,
        message("a@one.test", "b@two.test", tenant="acme", campaign="c1"),
        message("c@ONE.test", "d@one.test"),
        message("e@three.test"))
    out = setup.ok("queue", "bounce", "--domain", "one.test", "--reason", "list cleanup")
    assert out == "3 recipients of 2 messages bounced (domain:one.test; no DSN sent)\n"
    assert setup.pending() == {both: ["b@two.test"], other: ["e@three.test"]}
    assert setup.spool.show(only) is None  # nothing left: the message itself is gone
    assert setup.spool.verify() == []
    assert setup.spool.stats().messages == 2  # no DSN was queued
    events = setup.logged()
    assert all(isinstance(e, AdminBounce) for e in events)
    assert sorted((e.queue_id, e.recipient) for e in events) == sorted(
        [(both, "a@one.test"), (only, "c@ONE.test"), (only, "d@one.test")])
    assert {(e.reason, e.selector) for e in events} == {("list cleanup", "domain:one.test")}
    tagged = next(e for e in events if e.queue_id == both)
    assert (tagged.tenant, tagged.campaign_id) == ("acme", "c1")
    assert not any(isinstance(e, Bounce) for e in events)
    again = setup.ok("queue", "bounce", "--domain", "one.test")
    assert again == "Nothing queued matches domain:one.test\n"


def test_bounce_selectors_combine_and_a_queue_id_narrows(setup: Setup) -> None:
    a1, a2, b1 = store(
        setup.spool,
        message("x@one.test", "y@two.test", tenant="acme", campaign="spring"),
        message("z@one.test", tenant="acme", campaign="autumn"),
        message("w@one.test", tenant="bolt", campaign="spring"))
    out = setup.ok("queue", "bounce", "--tenant", "acme", "--campaign", "spring")
    assert out == "2 recipients of 1 message bounced (tenant:acme campaign:spring; no DSN sent)\n"
    assert setup.spool.show(a1) is None
    out = setup.ok("queue", "bounce", b1, "--domain", "two.test")
    assert out == f"Nothing queued matches domain:two.test queue:{b1}\n"
    out = setup.ok("queue", "bounce", a2)
    assert out == "1 recipient of 1 message bounced (queue:" + a2 + "; no DSN sent)\n"
    assert setup.pending() == {b1: ["w@one.test"]}
    assert [e.selector for e in setup.logged()] == [  # type: ignore[union-attr]
        "tenant:acme campaign:spring", "tenant:acme campaign:spring", f"queue:{a2}"]


def test_bounce_by_source_takes_the_mail_of_the_pools_holding_it(setup: Setup) -> None:
    shared, vip, default = store(
        setup.spool,
        message("a@one.test", pool="shared"),
        message("b@one.test", pool="vip"),
        message("c@one.test", pool=None))  # stored before pools: the default pool's
    assert setup.ok("queue", "bounce", "--source", "ip-spare").startswith("Nothing queued")
    out = setup.ok("queue", "bounce", "--source", "ip-a")
    assert out.startswith("2 recipients of 2 messages bounced")
    assert setup.pending() == {vip: ["b@one.test"]}
    assert {e.queue_id for e in setup.logged()} == {shared, default}


def test_bounce_by_provider_follows_the_mx_hosts(tmp_path: Path, dnsmasq) -> None:  # type: ignore[no-untyped-def]
    dns = dnsmasq(mx={"hosted.test": [(10, "aspmx.mail.test")],
                      "vanity.test": [(10, "alt.mail.test")],
                      "own.test": [(10, "mx.own.test")]})
    setup = make_setup(tmp_path, resolvers=f'"{dns.nameserver}"')
    try:
        hosted, own, vanity, gone = store(
            setup.spool, message("a@hosted.test", "b@own.test"), message("c@own.test"),
            message("d@vanity.test"), message("e@nxdomain.test"))
        # A job handed to the provider's worker earlier carries its key; its domain no
        # longer resolves: it matches by that key.
        job = setup.spool.due_jobs(time.time(), 0, 1, 10)
        moves = [(j, "provider:mailco") for j in job if j.domain == "nxdomain.test"]
        assert setup.spool.hand_over(moves) == 1
        setup.spool.release_claims(only_dead=False)
        result = setup.relay("queue", "bounce", "--provider", "mailco")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("3 recipients of 3 messages bounced (provider:mailco")
        assert "1 domain could not be looked up" in result.stderr
        assert setup.pending() == {hosted: ["b@own.test"], own: ["c@own.test"]}
        assert {e.queue_id for e in setup.logged()} == {hosted, vanity, gone}
    finally:
        setup.spool.close()


def test_jobs_being_delivered_are_skipped_and_counted(setup: Setup) -> None:
    free = store(setup.spool, message("a@busy.test", "b@free.test"))[0]
    # Stored already claimed by a live worker (this process), and by one that died.
    busy = message("c@busy.test", "d@busy.test")
    setup.spool.write_prepared([prepare(busy, claimant=ClaimAs("busy.test", os.getpid()))])
    orphan = message("e@busy.test")
    setup.spool.write_prepared([prepare(orphan, claimant=ClaimAs("busy.test", dead_pid()))])
    assert setup.spool.stats().jobs_in_flight == 2

    result = setup.relay("queue", "suspend", "--domain", "busy.test")
    assert result.returncode == 0
    result = setup.relay("queue", "bounce", "--domain", "busy.test")
    assert result.returncode == 75, result.stderr
    assert result.stdout.splitlines() == [
        "2 recipients of 2 messages bounced (domain:busy.test; no DSN sent)",
        "2 recipients skipped: a worker is delivering them right now; suspend the "
        "selection, then run the bounce again"]
    qid = busy.envelope.queue_id
    assert setup.pending() == {free: ["b@free.test"], qid: ["c@busy.test", "d@busy.test"]}
    assert {e.recipient for e in setup.logged() if isinstance(e, AdminBounce)} == {
        "a@busy.test", "e@busy.test"}
    assert setup.spool.verify() == []
    # The delivery ends (its claim released): the next run takes them.
    setup.spool.release_claims(only_dead=False)
    assert setup.ok("queue", "bounce", "--domain", "busy.test").startswith(
        "2 recipients of 1 message bounced")
    assert setup.pending() == {free: ["b@free.test"]}


def test_admin_bounce_commits_in_batches_and_reports_each(tmp_path: Path) -> None:
    with Spool(tmp_path / "spool", 1 << 30) as spool:
        qids = store(spool, *(message(f"u{i}@one.test", f"v{i}@two.test") for i in range(5)))
        batches: list[list[tuple[str, list[str]]]] = []

        def committed(done: list[tuple[Envelope, list[str]]]) -> None:
            # Called after the commit: what it reports is gone from the spool already.
            assert all(spool.show(env.queue_id) is None for env, _ in done)
            batches.append([(env.queue_id, rcpts) for env, rcpts in done])

        bounced, skipped = spool.admin_bounce(lambda job, env: True, batch=2,
                                              committed=committed)
        assert skipped == 0
        assert [len(b) for b in batches] == [2, 2, 1]
        assert [q for b in batches for q, _ in b] == qids
        assert all(sorted(r) == [f"u{i}@one.test", f"v{i}@two.test"]
                   for i, (_, r) in enumerate(x for b in batches for x in b))
        assert len(bounced) == 10 and spool.stats().messages == 0
        assert spool.verify() == []
