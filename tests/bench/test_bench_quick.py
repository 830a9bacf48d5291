"""The bench itself: tiny scenario runs through the real CLI, and the pieces the numbers
depend on (generated peer configs, percentiles, rate series). Each run is bounded by
``--quick`` (2 s of load, 20 s drain deadline) and a subprocess timeout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.metrics import percentile, sample_tree
from bench.peers import BENCH_API_KEY, BENCH_TENANT, PeerSetup, PostfixPeer, RelayPeer
from bench.report import _rate_series, compute_ratios, format_table, goal_ratios, round_ratios
from bench.scenarios import _cumulative, build_scenarios
from relay.config import decode_config

ROOT = Path(__file__).resolve().parents[2]
HAVE_POSTFIX = Path("/usr/sbin/postfix").exists() and os.geteuid() == 0


def _run_bench(tmp_path: Path, *args: str, timeout: float = 150) -> dict:
    out = tmp_path / "results"
    p = subprocess.run([sys.executable, "-m", "bench", "--quick", "--no-progress",
                        "--out", str(out), *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert (out / "latest.json").exists(), p.stdout + p.stderr
    doc = json.loads((out / "latest.json").read_text())
    doc["_stdout"], doc["_rc"] = p.stdout, p.returncode
    assert (out / "latest.png").stat().st_size > 1000  # a chart was drawn
    return doc


def _sane(row: dict) -> None:
    assert not row.get("error"), row.get("error")
    assert row["accepted"] > 0
    assert row["msg_s"] > 0
    assert row["latency_p99_ms"] >= row["latency_p50_ms"] > 0
    assert row["complete"] is True
    assert row["duplicates"] == 0


def test_inject_against_the_sink_counts_match(tmp_path: Path) -> None:
    doc = _run_bench(tmp_path, "--target", "direct", "--scenarios", "inject,e2e")
    assert doc["_rc"] == 0, doc["_stdout"]
    for row in doc["results"]:
        _sane(row)
        # direct: the sink is the server, so what it counted is exactly what was accepted
        assert row["delivered_messages"] == row["accepted"]
        assert row["delivered_recipients"] == row["recipients_accepted"]
        assert row["timeline"]["accepted"][-1][1] == row["accepted"]
        assert row["loadgen_cpu_s_per_1000"] > 0 and row["sink_cpu_s_per_1000"] > 0
    assert "inject" in doc["_stdout"] and "msg/s" in doc["_stdout"]
    assert "bench's own CPU s/1k" in doc["_stdout"]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_POSTFIX, reason="needs postfix and root (make sysdeps)")
def test_relay_and_postfix_e2e_side_by_side(tmp_path: Path) -> None:
    doc = _run_bench(tmp_path, "--target", "relay", "--peers", "postfix",
                     "--scenarios", "e2e,fanout")
    rows = {(r["scenario"], r["peer"]): r for r in doc["results"]}
    assert set(rows) == {("e2e", "relay"), ("e2e", "postfix"), ("fanout", "relay"),
                         ("fanout", "postfix")}
    for (scenario, _peer), row in rows.items():
        _sane(row)
        assert row["delivered_recipients"] == row["recipients_accepted"]
        assert row["cpu_s_per_1000"] > 0
        assert row["peak_rss_mb"] > 0
        if scenario == "fanout":
            assert row["throttle"]["held"], row["throttle"]
            assert row["throttle"]["max_connections_seen"] <= 2
    ratio = doc["ratios"]["postfix"]["e2e"]
    assert ratio == pytest.approx(rows[("e2e", "relay")]["msg_s"]
                                  / rows[("e2e", "postfix")]["msg_s"])
    assert "relay/postfix msg/s ratio" in doc["_stdout"]


def test_generated_relay_config_is_valid_for_every_scenario() -> None:
    for scenario in build_scenarios(quick=True).values():
        setup = PeerSetup(sink_port=2626, domain_throttle=scenario.domain_throttle,
                          routes={d: f"{a}:2626" for d, a in scenario.routes.items()})
        peer = RelayPeer(setup)
        cfg = decode_config(peer.config_text(), "generated")
        assert cfg.inbound.listen == [f"127.0.0.1:{peer.port}"]
        assert cfg.outbound.smart_host == "127.0.0.1:2626"
        assert cfg.http.listen == [f"127.0.0.1:{peer.http_port}"] != cfg.inbound.listen
        assert [(k.key, k.tenant) for k in cfg.http.api_keys] == [
            (f"plain${BENCH_API_KEY}", BENCH_TENANT)]
        for domain in scenario.routes:
            assert cfg.outbound.throttle_for(domain).max_connections == 2
        peer.tmp.rmdir()


def test_postfix_config_mirrors_throttles_in_whole_seconds() -> None:
    peer = PostfixPeer(PeerSetup(sink_port=2626, routes={"a.test": "127.3.0.1:2626"},
                                 domain_throttle={"max_connections": 2,
                                                  "max_message_rate": "90/min"}))
    try:
        cf = dict(line.split(" = ", 1) for line in peer.main_cf().splitlines())
        assert cf["relayhost"] == "[127.0.0.1]:2626"
        assert cf["inet_interfaces"] == "loopback-only"
        assert cf["smtp_destination_concurrency_limit"] == "2"
        assert cf["smtp_destination_rate_delay"] == "1s"  # 0.67 s rounded up, never faster
        assert cf["queue_directory"].startswith(str(peer.tmp))
    finally:
        peer.tmp.rmdir()


def test_helpers() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert percentile([3.0, 1.0, 2.0, 4.0], 99) == 4.0
    assert _cumulative([0.1, 0.3, 0.3, 0.9], step=0.25) == [
        (0.0, 0), (0.25, 1), (0.5, 3), (0.75, 3), (1.0, 4)]
    xs, ys = _rate_series([(0.0, 0), (1.0, 10), (2.0, 30)], bucket=1.0)
    assert xs == [0.5, 1.5] and ys == [10.0, 20.0]
    me = sample_tree([os.getpid()])
    assert me.cpu_seconds > 0 and me.rss_bytes > 0 and me.processes >= 1
    results = [{"scenario": "e2e", "peer": "relay", "msg_s": 300.0},
               {"scenario": "e2e", "peer": "postfix", "msg_s": 200.0},
               {"scenario": "inject", "peer": "relay", "error": "relay: did not start"}]
    ratios = compute_ratios(results, "relay", "postfix")
    assert ratios == {"e2e": 1.5, "inject": None}
    text = format_table({"results": results, "ratios": {"postfix": ratios},
                         "settings": {"target": "relay"}})
    assert "ERROR" in text and "relay: did not start" in text and "1.50x" in text
    # Rounds: each ratio pairs the rows of its own round; the summary is their median.
    rounds = [{"scenario": "e2e", "peer": "relay", "msg_s": m, "round": i}
              for i, m in enumerate([300.0, 900.0, 400.0], 1)]
    rounds += [{"scenario": "e2e", "peer": "postfix", "msg_s": m, "round": i}
               for i, m in enumerate([100.0, 300.0, 400.0], 1)]
    assert round_ratios(rounds, "relay", "postfix") == {"e2e": [3.0, 3.0, 1.0]}
    assert compute_ratios(rounds, "relay", "postfix") == {"e2e": 3.0}
    text = format_table({"results": rounds, "ratios": {"postfix": {"e2e": 3.0}},
                         "ratio_rounds": {"postfix": {"e2e": [3.0, 3.0, 1.0]}},
                         "settings": {"target": "relay", "repeat": 3}})
    assert "e2e #2" in text and "median msg/s ratio over the rounds: e2e 3.00x" in text
    assert "e2e: 3.00x, 3.00x, 1.00x" in text
    # smtp-source rows say how much each peer delivered while the load ran.
    text = format_table({"results": [
        {"scenario": "smtp-source", "peer": "postfix", "msg_s": 476.0, "accepted": 5100,
         "delivered_during_run": 2707}], "settings": {"target": "relay"}})
    assert "smtp-source/postfix: delivered 2,707 to the sink while the load ran (53% of " \
           "5,100 accepted)" in text


@pytest.mark.parametrize("pipelining", [True, False])
async def test_loadgen_counts_match_the_sink(pipelining: bool) -> None:
    import trio

    from bench.loadgen import LoadSpec, run_load
    from bench.sink import Behaviour, Sink

    sink = Sink(behaviours={"no.test": Behaviour.REJECT})
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sink.serve, "127.0.0.1", 0)
        spec = LoadSpec(port=port, sessions=4, messages=60, duration=30, pipelining=pipelining,
                        messages_per_connection=7, domains=["a.test", "b.test", "no.test"],
                        recipients=[(1, 0.5), (3, 0.5)], sizes=[(1000, 0.5), (20000, 0.5)])
        res = await run_load(spec, processes=2)
        nursery.cancel_scope.cancel()
    assert res.accepted + res.messages_failed == 60
    assert res.accepted == sink.total_messages > 0
    assert res.recipients_accepted == sink.total_recipients
    assert res.recipients_refused == sink.stats["no.test"].rejects > 0
    assert res.per_domain.get("a.test", 0) == sink.stats["a.test"].recipients
    assert len(res.latencies) == res.accepted
    assert sink.connections_opened >= 60 // 7
    assert res.cpu_seconds > 0


def test_prebuilt_transactions_follow_the_spec() -> None:
    import random

    from bench.loadgen import LoadSpec, build_shapes

    spec = LoadSpec(sizes=[(2048, 0.75), (8192, 0.25)], recipients=[(1, 0.5), (5, 0.5)],
                    domains=["a.test", "b.test"], domain_weights=[0.9, 0.1])
    shapes = build_shapes(spec, random.Random(1), count=2000)
    for sh in shapes:
        lines = sh.group.split(b"\r\n")[:-1]
        assert lines[0].startswith(b"MAIL FROM:<bench@sender.test> SIZE=")
        assert int(lines[0].rsplit(b"=", 1)[1]) == sh.body_len == len(sh.payload) - 3
        assert lines[-1] == b"DATA" and sh.group == b"".join(sh.commands)
        rcpts = lines[1:-1]
        assert len(rcpts) == len(sh.domains) and len(set(rcpts)) == len(rcpts)  # distinct
        assert [r.rsplit(b"@", 1)[1][:-1].decode() for r in rcpts] == list(sh.domains)
        assert sh.payload.endswith(b"\r\n.\r\n") and b"\r\n." not in sh.payload[:-3]
    small = sum(1 for sh in shapes if sh.body_len < 4096) / len(shapes)
    five = sum(1 for sh in shapes if len(sh.domains) == 5) / len(shapes)
    a = sum(sh.domains.count("a.test") for sh in shapes) / sum(len(sh.domains) for sh in shapes)
    assert 0.7 < small < 0.8 and 0.45 < five < 0.55 and 0.87 < a < 0.93


async def test_loadgen_gives_up_on_a_server_that_stops_answering() -> None:
    import trio

    from bench.loadgen import LoadSpec, run_load
    from bench.sink import Behaviour, Sink

    sink = Sink(behaviours={"stall.test": Behaviour.STALL}, stall_seconds=30)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sink.serve, "127.0.0.1", 0)
        spec = LoadSpec(port=port, sessions=2, messages=4, duration=20, timeout=0.3,
                        domains=["stall.test"])
        with trio.fail_after(15):
            res = await run_load(spec, processes=1)
        nursery.cancel_scope.cancel()
    assert res.accepted == 0 and res.messages_failed == 4
    assert "TooSlowError" in res.errors[0]


async def test_relay_that_cannot_start_is_a_clear_error() -> None:
    from bench.peers import PeerError

    peer = RelayPeer(PeerSetup(sink_port=2626), relay_bin="/bin/false")
    with pytest.raises(PeerError, match="exited during start-up"):
        async with peer:
            pass
    assert not peer.tmp.exists()  # cleaned up


HAVE_SMTP_SOURCE = Path("/usr/sbin/smtp-source").exists() and Path("/usr/sbin/smtp-sink").exists()


def _smtp_source_rows(doc: dict, peers: list[str]) -> dict[tuple[str, str], dict]:
    rows = {(r["scenario"], r["peer"]): r for r in doc["results"]}
    assert set(rows) == {(v, p) for v in ("smtp-source", "smtp-source -d") for p in peers}
    for (variant, _peer), row in rows.items():
        assert not row.get("error"), row.get("error")
        assert row["complete"] is True and row["exit_status"] == 0
        assert row["accepted"] == 200  # --quick: -m 200
        assert row["msg_s"] == pytest.approx(200 / row["elapsed_s"])
        assert row["cpu_s_per_1000"] > 0 and row["peak_rss_mb"] > 0
        cmd = row["command"].split()
        assert cmd[:2] == ["/usr/sbin/smtp-source", "-c"]
        assert ("-d" in cmd) == variant.endswith("-d")
        assert cmd[cmd.index("-s") + 1] == "20" and cmd[cmd.index("-l") + 1] == "2048"
    return rows


@pytest.mark.skipif(not HAVE_SMTP_SOURCE, reason="needs postfix's smtp-source (make sysdeps)")
def test_smtp_source_scenario_against_the_relay(tmp_path: Path) -> None:
    doc = _run_bench(tmp_path, "--target", "relay", "--scenarios", "smtp-source", timeout=60)
    assert doc["_rc"] == 0, doc["_stdout"]
    _smtp_source_rows(doc, ["relay"])
    assert "smtp-source -d" in doc["_stdout"]


@pytest.mark.slow
@pytest.mark.skipif(not (HAVE_SMTP_SOURCE and HAVE_POSTFIX), reason="needs postfix and root")
def test_smtp_source_scenario_relay_and_postfix_ratios(tmp_path: Path) -> None:
    doc = _run_bench(tmp_path, "--target", "relay", "--peers", "postfix",
                     "--scenarios", "smtp-source", timeout=90)
    rows = _smtp_source_rows(doc, ["relay", "postfix"])
    for variant in ("smtp-source", "smtp-source -d"):
        assert doc["ratios"]["postfix"][variant] == pytest.approx(
            rows[(variant, "relay")]["msg_s"] / rows[(variant, "postfix")]["msg_s"])
    assert "relay/postfix msg/s ratio: smtp-source" in doc["_stdout"]


# -- http-inject ------------------------------------------------------------------------

HTTP_ROWS = ("http-inject 1", "http-inject 100", "http-inject 1000")


def _http_inject_rows(doc: dict, peers: list[str]) -> dict[tuple[str, str], dict]:
    """The rows of a --quick http-inject run: HTTP rows for the relay only, the SMTP
    comparison for every peer; all complete, counts matching the sink."""
    rows = {(r["scenario"], r["peer"]): r for r in doc["results"]}
    assert set(rows) == {(h, "relay") for h in HTTP_ROWS} | {("smtp-inject", p) for p in peers}
    for (scenario, _peer), row in rows.items():
        _sane(row)
        assert row["delivered_recipients"] == row["recipients_accepted"]
        assert row["cpu_s_per_1000"] > 0 and row["peak_rss_mb"] > 0
        if scenario == "smtp-inject":
            assert row["accepted"] == 200  # --quick: 200 messages of 1 recipient
            continue
        batch = row["batch"]
        # --quick: 200 recipients in whole requests (1000 -> one request)
        assert row["requests"] == -(-200 // batch)
        assert row["recipients_accepted"] == row["requests"] * batch == row["accepted"]
        assert row["requests_failed"] == row["recipients_failed"] == 0 and not row["errors"]
        assert row["duplicate_queue_ids"] == 0
        assert row["delivered_messages"] == row["recipients_accepted"]  # one per recipient
        # ~2 KB rendered, the size of the SMTP row's message (both as the sink got them)
        smtp_size = rows[("smtp-inject", "relay")]["delivered_bytes_per_msg"]
        assert 2048 < smtp_size < 2400
        assert abs(row["delivered_bytes_per_msg"] - smtp_size) < 0.03 * smtp_size
        assert row["inject_msg_s"] > 0 and row["msg_s"] == row["e2e_msg_s"] > 0
        assert row["timeline"]["accepted_rcpts"][-1][1] == row["recipients_accepted"]
        assert row["timeline"]["delivered_rcpts"][-1][1] == row["delivered_recipients"]
    return rows


def test_http_inject_scenario_against_the_relay(tmp_path: Path) -> None:
    doc = _run_bench(tmp_path, "--target", "relay", "--scenarios", "http-inject", timeout=90)
    assert doc["_rc"] == 0, doc["_stdout"]
    rows = _http_inject_rows(doc, ["relay"])
    accept = doc["goals"]["http_accept_vs_smtp"]
    assert accept["rounds"][0] == pytest.approx(rows[("http-inject 100", "relay")]["inject_msg_s"]
                                                / rows[("smtp-inject", "relay")]["inject_msg_s"])
    assert doc["goals"]["http_e2e_vs_postfix"]["median"] is None  # no postfix in this run
    assert "http-inject goals:" in doc["_stdout"]
    assert "Postfix SMTP-inject e2e msg/s: - (run with --peers postfix)" in doc["_stdout"]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_POSTFIX, reason="needs postfix and root (make sysdeps)")
def test_http_inject_scenario_relay_and_postfix_goals(tmp_path: Path) -> None:
    doc = _run_bench(tmp_path, "--target", "relay", "--peers", "postfix",
                     "--scenarios", "http-inject", timeout=120)
    rows = _http_inject_rows(doc, ["relay", "postfix"])
    e2e = doc["goals"]["http_e2e_vs_postfix"]
    assert e2e["median"] == pytest.approx(rows[("http-inject 100", "relay")]["e2e_msg_s"]
                                          / rows[("smtp-inject", "postfix")]["e2e_msg_s"])
    assert "relay/postfix msg/s ratio: smtp-inject" in doc["_stdout"]
    assert "http-inject 100 -x" not in doc["_stdout"]  # Postfix has no HTTP rows to pair


def test_http_goals_pair_rows_of_the_same_round() -> None:
    def row(scenario: str, peer: str, rnd: int, inject: float, e2e: float,
            complete: bool = True) -> dict:
        return {"scenario": scenario, "peer": peer, "round": rnd, "msg_s": e2e,
                "inject_msg_s": inject, "e2e_msg_s": e2e, "complete": complete}

    results = [row("http-inject 100", "relay", 1, 3000.0, 2900.0),
               row("smtp-inject", "relay", 1, 1000.0, 990.0),
               row("smtp-inject", "postfix", 1, 400.0, 300.0),
               row("http-inject 100", "relay", 2, 1800.0, 1700.0),
               row("smtp-inject", "relay", 2, 1000.0, 990.0),
               row("smtp-inject", "postfix", 2, 400.0, 500.0, complete=False)]
    goals = goal_ratios(results)
    assert goals["http_accept_vs_smtp"]["rounds"] == [3.0, 1.8]
    assert goals["http_accept_vs_smtp"]["median"] == pytest.approx(2.4)
    assert goals["http_accept_vs_smtp"]["met"] is True
    # an incomplete row gives its round no ratio
    assert goals["http_e2e_vs_postfix"]["rounds"][1] is None
    assert goals["http_e2e_vs_postfix"]["median"] == pytest.approx(2900 / 300)
    text = format_table({"results": results, "settings": {"target": "relay", "repeat": 2}})
    assert "http-inject goals (median over 2 rounds):" in text
    assert "relay SMTP-inject accepted msg/s: 2.40x (goal >= 2: met; rounds 3.00x, 1.80x)" in text
    assert "(goal >= 3: met; rounds 9.67x, -x)" in text
    one = [r for r in results if r["round"] == 2 and r["peer"] == "relay"]
    text = format_table({"results": one, "settings": {"target": "relay"}})
    assert "accepted msg/s: 1.80x (goal >= 2: NOT met; 1,800 / 1,000 msg/s)" in text
    assert goal_ratios([row("e2e", "relay", 1, 1.0, 1.0)]) == {}


def test_http_answers_are_checked_recipient_by_recipient() -> None:
    import msgspec

    from bench.http_inject import _Tally, build_content, build_transmission

    body = msgspec.json.decode(build_transmission(40, 1000, ["a.test", "b.test"],
                                                  build_content(2048)))
    rcpts = body["recipients"]
    emails = [r["address"]["email"] for r in rcpts]
    assert len(set(emails)) == 40 and {e.split("@")[1] for e in emails} == {"a.test", "b.test"}
    assert all(set(r["substitution_data"]) == {"first", "code"} for r in rcpts)
    content = body["content"]
    for part in ("text", "html"):
        assert "{{first}}" in content[part] and "{{code}}" in content[part]
    assert 1000 < len(content["text"]) + len(content["html"]) < 2048

    def answer(*qids: str | None) -> bytes:
        return msgspec.json.encode({"results": {
            "total_accepted_recipients": sum(1 for q in qids if q),
            "total_rejected_recipients": 0, "id": "x",
            "recipients": [{"index": i, "address": f"r{i}@a.test", "queue_id": q}
                           for i, q in enumerate(qids)]}})

    t = _Tally()
    t.check(200, answer("Q1", "Q2"), 2, 0.0, 0.1)
    t.check(200, answer("Q3", None), 2, 0.0, 0.2)  # a recipient without a queue id
    t.check(503, b'{"errors": []}', 2, 0.0, 0.3)  # refused as a whole
    t.check(200, answer("Q1"), 1, 0.0, 0.4)  # a queue id seen before
    assert (t.requests_ok, t.requests_failed) == (3, 1)
    assert (t.recipients_accepted, t.recipients_failed) == (4, 3)
    assert t.duplicate_queue_ids == 1 and t.latencies == pytest.approx([0.1, 0.2, 0.4])
    assert t.errors[0].startswith("recipient 1 r1@a.test: no queue_id")
    assert t.errors[1].startswith("HTTP 503")


# -- dkim -------------------------------------------------------------------------------

HAVE_OPENDKIM = HAVE_POSTFIX and Path("/usr/sbin/opendkim").exists()
DKIM_ROWS = ("dkim 2KB signed", "dkim 2KB unsigned", "dkim 100KB signed", "dkim 100KB unsigned")


def _dkim_rows(doc: dict, peers: list[str]) -> dict[tuple[str, str], dict]:
    """The rows of a --quick dkim run: signed and unsigned rows for the relay, signed
    rows for the Postfix + OpenDKIM peers; all complete, the sink's signed counts exact."""
    rows = {(r["scenario"], r["peer"]): r for r in doc["results"]}
    assert set(rows) == ({(n, "relay") for n in DKIM_ROWS if "relay" in peers}
                         | {(n, p) for p in peers if p != "relay"
                            for n in DKIM_ROWS if n.endswith(" signed")})
    for (scenario, _peer), row in rows.items():
        _sane(row)
        size = 2048 if " 2KB " in scenario else 100 * 1024
        # --quick: 100 messages of 2 KB, 20 of 100 KB, one recipient each
        assert row["delivered_messages"] == row["accepted"] == (100 if size == 2048 else 20)
        assert row["delivered_recipients"] == row["recipients_accepted"] == row["accepted"]
        assert row["size_bytes"] == size
        assert size - 100 < row["delivered_bytes_per_msg"] < size + 2000
        assert row["cpu_s_per_1000"] > 0 and row["peak_rss_mb"] > 0
        if scenario.endswith(" signed"):
            assert row["expect_signed"] is True and row["signed"] is True
            assert row["signed_messages"] == row["delivered_messages"]
            assert row["signed_share"] == 1.0
        else:
            assert row["expect_signed"] is False and row["signed"] is False
            assert row["signed_messages"] == 0 and row["signed_share"] == 0.0
    return rows


def test_dkim_scenario_against_the_relay(tmp_path: Path) -> None:
    doc = _run_bench(tmp_path, "--target", "relay", "--scenarios", "dkim", timeout=90)
    assert doc["_rc"] == 0, doc["_stdout"]
    rows = _dkim_rows(doc, ["relay"])
    goals = doc["goals"]
    for size in ("2KB", "100KB"):
        cost = goals[f"dkim_{size}_signed_vs_unsigned"]
        assert cost["rounds"][0] == pytest.approx(
            rows[(f"dkim {size} signed", "relay")]["e2e_msg_s"]
            / rows[(f"dkim {size} unsigned", "relay")]["e2e_msg_s"])
        assert cost["goal"] == 0.75 and cost["met"] is (cost["median"] >= 0.75)
        assert goals[f"dkim_{size}_vs_postfix_opendkim"]["median"] is None  # not in this run
        assert f"dkim_{size}_vs_postfix_opendkim_unix" not in goals  # a variant, not asked for
    assert set(doc["dkim_costs"]) == {"2KB", "100KB"}
    out = doc["_stdout"]
    assert "dkim goals:" in out
    assert "postfix+opendkim e2e msg/s: - (run with --peers postfix+opendkim)" in out
    header = next(line for line in out.splitlines() if line.startswith("scenario"))
    assert "signed" in header.split()


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_OPENDKIM, reason="needs postfix, opendkim and root (make sysdeps)")
def test_dkim_scenario_relay_and_postfix_opendkim(tmp_path: Path) -> None:
    doc = _run_bench(tmp_path, "--target", "relay", "--peers", "postfix+opendkim",
                     "--scenarios", "dkim", timeout=150)
    assert doc["_rc"] == 0, doc["_stdout"]
    rows = _dkim_rows(doc, ["relay", "postfix+opendkim"])
    for size in ("2KB", "100KB"):
        name = f"dkim {size} signed"
        assert doc["goals"][f"dkim_{size}_vs_postfix_opendkim"]["median"] == pytest.approx(
            rows[(name, "relay")]["e2e_msg_s"] / rows[(name, "postfix+opendkim")]["e2e_msg_s"])
    assert "relay/postfix+opendkim msg/s ratio: dkim 2KB signed" in doc["_stdout"]


@pytest.mark.parametrize("peer_name", [
    "relay",
    pytest.param("postfix+opendkim", marks=[pytest.mark.slow, pytest.mark.skipif(
        not HAVE_OPENDKIM, reason="needs postfix, opendkim and root (make sysdeps)")]),
    pytest.param("postfix+opendkim-unix", marks=[pytest.mark.slow, pytest.mark.skipif(
        not HAVE_OPENDKIM, reason="needs postfix, opendkim and root (make sysdeps)")]),
])
async def test_peer_signs_what_dkimpy_verifies_with_the_bench_key(peer_name: str) -> None:
    """The bench's message through the peer: the sink counts it signed, and dkimpy
    verifies the signature against the public half of the bench key (d=sender.test)."""
    import smtplib

    import dkim
    import trio
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    from bench.dkim import DKIM_DOMAIN, DKIM_SELECTOR, bench_key
    from bench.loadgen import LoadSpec, make_body
    from bench.peers import make_peer
    from bench.scenarios import Scenario, start_sink
    from bench.sink import Sink
    from relay.dkim import public_key_record

    key = bench_key()
    record = public_key_record(load_pem_private_key(key.pem, None)).encode()
    body = make_body(2048, 7)

    def send(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.sendmail("bench@sender.test", ["a@d00.bench.test"], body)

    sink = Sink(keep_messages=True)
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            setup = await start_sink(nursery, Scenario("dkim", "", LoadSpec(), dkim=key), sink)
            async with make_peer(peer_name, setup) as peer:
                await trio.to_thread.run_sync(send, peer.port)
                await sink.wait_for(lambda s: s.total_messages >= 1, timeout=30)
            nursery.cancel_scope.cancel()
    assert sink.signed_messages == sink.total_messages == 1
    data = sink.messages[0][2]
    assert data.startswith(b"DKIM-Signature:")
    asked = []

    def dns(name: bytes, timeout: int = 5) -> bytes:
        asked.append(name)
        return record

    assert dkim.verify(data, dnsfunc=dns)
    # d= and s= are the bench's: the verifier looked up that key, and only that one
    assert asked == [f"{DKIM_SELECTOR}._domainkey.{DKIM_DOMAIN}.".encode()]


def test_generated_configs_sign_with_the_bench_key() -> None:
    from bench.dkim import DKIM_DOMAIN, DKIM_SELECTOR, bench_key
    from bench.loadgen import make_body
    from relay.config import DKIM_HEADERS

    # the key signs the From: domain of every message the load generator sends
    assert f"\r\nFrom: bench <bench@{DKIM_DOMAIN}>\r\n".encode() in b"\r\n" + make_body(2048)
    key = bench_key()
    assert key is bench_key() and b"BEGIN RSA PRIVATE KEY" in key.pem  # one per run
    relay = RelayPeer(PeerSetup(sink_port=2626, dkim=key))
    unsigned = RelayPeer(PeerSetup(sink_port=2626))
    inet = PostfixPeer(PeerSetup(sink_port=2626, dkim=key), milter="inet")
    unix = PostfixPeer(PeerSetup(sink_port=2626, dkim=key), milter="unix")
    plain = PostfixPeer(PeerSetup(sink_port=2626, dkim=key))
    try:
        cfg = decode_config(relay.config_text(), "generated")
        [signer] = cfg.dkim.signers
        assert (signer.domain, signer.selector, signer.key, signer.algorithm) == (
            DKIM_DOMAIN, DKIM_SELECTOR, str(relay.dkim_key_path), "rsa-sha256")
        assert signer.canonicalization == "relaxed/relaxed" and signer.over_sign
        assert decode_config(unsigned.config_text(), "generated").dkim.signers == []
        assert (inet.name, unix.name, plain.name) == (
            "postfix+opendkim", "postfix+opendkim-unix", "postfix")
        for peer, milter, socket in (
                (inet, f"inet:127.0.0.1:{inet.milter_port}",
                 f"inet:{inet.milter_port}@127.0.0.1"),
                (unix, f"unix:{unix.milter_socket}", f"local:{unix.milter_socket}")):
            cf = dict(line.split(" = ", 1) for line in peer.main_cf().splitlines())
            assert cf["smtpd_milters"] == cf["non_smtpd_milters"] == milter
            assert cf["milter_default_action"] == "tempfail"
            conf = dict(line.split(" ", 1) for line in peer.opendkim_conf().splitlines())
            assert conf["Socket"] == socket
            assert (conf["Mode"], conf["Domain"], conf["Selector"]) == (
                "s", DKIM_DOMAIN, DKIM_SELECTOR)
            assert conf["KeyFile"] == str(peer.opendkim_dir / "dkim.pem")
            assert conf["Canonicalization"] == "relaxed/relaxed"
            assert conf["SignHeaders"] == conf["OversignHeaders"] == ",".join(DKIM_HEADERS)
            assert conf["Background"] == "no" and conf["Syslog"] == "no"
            assert peer.dkim is key
        assert "smtpd_milters" not in plain.main_cf() and plain.dkim is None
    finally:
        for peer in (relay, unsigned, inet, unix, plain):
            peer.tmp.rmdir()


async def test_sink_counts_signed_messages() -> None:
    import smtplib

    import trio

    from bench.sink import Sink, _signed

    sig = b"DKIM-Signature: v=1; a=rsa-sha256; d=x.test\r\n"
    head = b"From: a@x.test\r\nSubject: s\r\n"
    assert _signed(sig + head + b"\r\nbody\r\n", 100)
    assert _signed(head + sig + b"\r\nbody\r\n", 100)
    assert not _signed(head + b"\r\n" + sig, 100)  # in the body only
    assert not _signed(head + b"X-DKIM-Signature: no\r\n\r\nbody\r\n", 100)
    assert not _signed(head + sig, 10)  # beyond the end of the message
    sink = Sink()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(sink.serve, "127.0.0.1", 0)

        def send() -> None:
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.sendmail("a@x.test", ["b@y.test"], sig + head + b"\r\nbody\r\n")
                s.sendmail("a@x.test", ["b@y.test"], head + b"\r\n" + sig)

        await trio.to_thread.run_sync(send)
        await sink.wait_for(lambda s: s.total_messages >= 2, timeout=5)
        nursery.cancel_scope.cancel()
    assert (sink.total_messages, sink.signed_messages) == (2, 1)
    assert sink.summary(per_domain=False)["signed_messages"] == 1


def test_dkim_goals_pair_rows_of_the_same_round_and_need_signatures() -> None:
    from bench.report import dkim_costs

    def row(scenario: str, peer: str, rnd: int, e2e: float, cpu: float,
            signed: bool | None = None) -> dict:
        expect = scenario.endswith(" signed")
        return {"scenario": scenario, "peer": peer, "round": rnd, "msg_s": e2e,
                "e2e_msg_s": e2e, "cpu_s_per_1000": cpu, "complete": True,
                "expect_signed": expect, "signed": expect if signed is None else signed,
                "signed_share": 1.0 if (expect if signed is None else signed) else 0.0,
                "signed_messages": 10, "delivered_messages": 10}

    results = []
    for rnd in (1, 2):
        results += [row("dkim 2KB signed", "relay", rnd, 900.0, 1.3),
                    row("dkim 2KB unsigned", "relay", rnd, 1000.0, 1.0),
                    row("dkim 2KB signed", "postfix+opendkim", rnd, 300.0 * rnd, 5.0,
                        signed=rnd == 1)]
    goals = goal_ratios(results)
    vs = goals["dkim_2KB_vs_postfix_opendkim"]
    assert vs["rounds"] == [3.0, None]  # round 2's Postfix row was not signed: no ratio
    assert vs["median"] == 3.0 and vs["met"] is True and vs["group"] == "dkim"
    cost = goals["dkim_2KB_signed_vs_unsigned"]
    assert cost["rounds"] == [0.9, 0.9] and cost["met"] is True
    assert goals["dkim_100KB_signed_vs_unsigned"]["median"] is None
    assert "dkim_2KB_vs_postfix_opendkim_unix" not in goals
    costs = dkim_costs(results)
    assert costs["2KB"]["ms_per_signature"] == pytest.approx(0.3)
    assert costs["2KB"]["signatures_per_core_s"] == pytest.approx(1000 / 0.3)
    text = format_table({"results": results, "settings": {"target": "relay", "repeat": 2}})
    assert "dkim goals (median over 2 rounds):" in text
    assert ("dkim 2KB: relay signed e2e msg/s / postfix+opendkim e2e msg/s: 3.00x "
            "(goal >= 2: met; rounds 3.00x, -x)") in text
    assert "relay unsigned e2e msg/s: 0.90x (goal >= 0.75: met; rounds 0.90x, 0.90x)" in text
    assert "signing adds 0.30 ms per message (~3,333 signatures/s per core)" in text
    assert "dkim 2KB signed #2/postfix+opendkim: NOT every delivered message signed" in text
    lines = text.splitlines()
    assert lines[0].split()[-3:] == ["signed", "msgs", "ok"]
    assert lines[2].split()[-3] == "100%" and lines[3].split()[-3] == "0%"
