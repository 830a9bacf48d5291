"""``relay report``: exact numbers from a known event log (totals, tables, reasons,
delay percentiles, the time window, per-minute series), the reading of log files, the
command line and its one-line errors, and the chart."""

from __future__ import annotations

import json
import struct
import sys
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from relay.cli import main
from relay.events import (
    Bounce,
    Delivery,
    Event,
    Expiration,
    Reception,
    Suppressed,
    TransientFailure,
    Unsubscribe,
)
from relay.events.types import encode
from relay.report import (
    Aggregator,
    EventReader,
    Reason,
    Row,
    draw_chart,
    format_report,
    normalize_reply,
    parse_when,
    summarize,
)

#: 2024-03-05 06:07:00 UTC, on a minute.
T0 = 1709618820.0
ISO0 = "2024-03-05T06:07:00+00:00"
YAHOO = ("421 4.7.0 [TSS04] Messages from {ip} temporarily deferred due to user complaints"
         " - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes")


def known_log() -> list[Event]:
    """Three receptions (smtp, http, one of our DSNs) and what became of them, plus one
    event before and one after the window [T0, T0 + 3600)."""
    acme = {"tenant": "acme", "campaign_id": "c1"}
    return [
        Delivery(queue_id="OLD", time=T0 - 3600, recipient="o@gmail.com", destination="x"),
        Reception(queue_id="Q1", time=T0, sender="a@s.test", size=1000, client_ip="192.0.2.7",
                  recipients=["r1@gmail.com", "r2@Gmail.com", "r3@yahoo.com"], **acme),
        Delivery(queue_id="Q1", time=T0 + 5, recipient="r1@gmail.com",
                 destination="provider:google", queued_seconds=1.0, **acme),
        Delivery(queue_id="Q1", time=T0 + 5, recipient="r2@Gmail.com",
                 destination="provider:google", queued_seconds=3.0, **acme),
        TransientFailure(queue_id="Q1", time=T0 + 6, recipient="r3@yahoo.com",
                         destination="yahoo.com", reply=YAHOO.format(ip="192.0.2.1"), **acme),
        Reception(queue_id="Q2", time=T0 + 10, sender="b@s.test", size=500, via="http",
                  client_ip="192.0.2.8", recipients=["x@example.org"], tenant="beta"),
        TransientFailure(queue_id="Q1", time=T0 + 66, recipient="r3@yahoo.com",
                         destination="yahoo.com", reply=YAHOO.format(ip="192.0.2.99"), **acme),
        Delivery(queue_id="Q2", time=T0 + 70, recipient="x@example.org",
                 destination="example.org", queued_seconds=2.0, tenant="beta"),
        Bounce(queue_id="Q1", time=T0 + 126, recipient="r3@yahoo.com", destination="yahoo.com",
               reply="554 5.7.9 Message not accepted for policy reasons", dsn_queue_id="Q3",
               **acme),
        Reception(queue_id="Q3", time=T0 + 127, sender="", size=300, via="dsn", client_ip="",
                  recipients=["a@s.test"]),
        Delivery(queue_id="Q3", time=T0 + 131, recipient="a@s.test", destination="s.test",
                 queued_seconds=0.5),
        Bounce(queue_id="Q4", time=T0 + 150, recipient="bob@example.org",
               destination="example.org",
               reply="550 5.1.1 <bob@example.org>: Recipient address rejected: User unknown"),
        Bounce(queue_id="Q4", time=T0 + 170, recipient="carol@example.org",
               destination="example.org",
               reply="550 5.1.1 <carol@example.org>: Recipient address rejected: User unknown"),
        Expiration(queue_id="Q5", time=T0 + 250, recipient="z@example.org",
                   destination="example.org", reply="451 4.4.1 connection refused"),
        Suppressed(queue_id="Q6", time=T0 + 20, recipient="s@example.org", source="manual",
                   tenant="beta"),
        Unsubscribe(queue_id="", time=T0 + 30, recipient="u@example.org", tenant="acme"),
        Delivery(queue_id="LATE", time=T0 + 10000, recipient="l@gmail.com", destination="x"),
    ]


def test_the_known_log_gives_exact_numbers() -> None:
    r = summarize(known_log(), since=T0, until=T0 + 3600, per_minute=True)
    assert (r.events, r.first, r.last) == (15, T0, T0 + 250)
    t = r.totals
    assert (t.received, t.received_recipients, t.received_bytes, t.received_via) == (
        3, 5, 1800, {"smtp": 1, "http": 1, "dsn": 1})
    assert (t.delivered, t.deferred, t.bounced, t.expired, t.suppressed, t.unsubscribed) == (
        4, 2, 3, 1, 1, 1)
    assert r.domains == [
        Row(name="example.org", received=1, delivered=1, bounced=2, expired=1, suppressed=1),
        Row(name="gmail.com", received=2, delivered=2),
        Row(name="yahoo.com", received=1, deferred=2, bounced=1),
        Row(name="s.test", received=1, delivered=1),
    ]
    assert r.providers == [Row(name="google", delivered=2)]
    assert r.tenants == [Row(name="acme", received=1, delivered=2, deferred=2, bounced=1),
                         Row(name="beta", received=1, delivered=1, suppressed=1)]
    assert r.campaigns == [Row(name="c1", received=1, delivered=2, deferred=2, bounced=1)]
    assert r.deferral_reasons == [Reason(
        code="4.7.0", count=2, example=YAHOO.format(ip="192.0.2.1"),
        text="# Messages from # temporarily deferred due to user complaints - # see "
             "https://postmaster.yahooinc.com/error-codes")]
    assert r.bounce_reasons == [
        Reason(code="5.1.1", text="<address>: Recipient address rejected: User unknown",
               count=2,
               example="550 5.1.1 <bob@example.org>: Recipient address rejected: User unknown"),
        Reason(code="4.4.1", text="connection refused", count=1,
               example="451 4.4.1 connection refused"),
        Reason(code="5.7.9", text="Message not accepted for policy reasons", count=1,
               example="554 5.7.9 Message not accepted for policy reasons"),
    ]
    # queued_seconds of the deliveries: 0.5, 1, 2, 3 (nearest rank)
    d = r.delivery_delay
    assert (d.count, d.p50, d.p90, d.p99, d.mean, d.max) == (4, 1.0, 3.0, 3.0, 1.625, 3.0)
    assert r.per_minute == [(int(T0), 2, 1, 0), (int(T0) + 60, 1, 1, 0),
                            (int(T0) + 120, 1, 0, 3), (int(T0) + 180, 0, 0, 0),
                            (int(T0) + 240, 0, 0, 1)]


def test_top_cuts_tables_and_reasons_and_the_window_bounds_the_events() -> None:
    r = summarize(known_log(), top=1)
    assert r.events == 17 and r.totals.delivered == 6  # no window: OLD and LATE count
    assert [row.name for row in r.domains] == ["example.org"]
    assert [x.code for x in r.bounce_reasons] == ["5.1.1"]
    assert r.per_minute is None
    everything = summarize(known_log(), top=0)
    assert len(everything.domains) == 4  # gmail.com's OLD/LATE joined its row
    assert summarize(known_log(), since=T0 + 100, until=T0 + 130).totals.bounced == 1
    assert summarize(known_log(), until=T0).events == 1  # until is exclusive
    empty = summarize([])
    assert empty.events == 0 and empty.delivery_delay.p50 is None
    assert "Grand totals" in format_report(empty)


def test_percentiles_are_nearest_rank_and_within_1_percent_past_the_exact_limit() -> None:
    deliveries = [Delivery(queue_id=f"Q{i}", recipient="r@d.test", destination="d.test",
                           time=T0, queued_seconds=float(i)) for i in range(1, 1001)]
    exact = summarize(deliveries).delivery_delay
    assert (exact.p50, exact.p90, exact.p99, exact.max) == (500.0, 900.0, 990.0, 1000.0)
    agg = Aggregator(exact_delays=100)
    for e in deliveries:
        agg.add(e)
    approx = agg.report().delivery_delay
    for got, want in ((approx.p50, 500), (approx.p90, 900), (approx.p99, 990)):
        assert got is not None and abs(got - want) / want < 0.01, (got, want)
    assert approx.max == 1000.0 and approx.count == 1000
    assert approx.mean == pytest.approx(500.5)


def test_replies_are_grouped_by_code_and_normalized_text() -> None:
    assert normalize_reply("550-5.1.1 <Bob@X.test>:   user  unknown (id 4f2a9)") == (
        "5.1.1", "<address>: user unknown (id #")
    assert normalize_reply("452 too many recipients for bob@x.test") == (
        "452", "too many recipients for <address>")
    assert normalize_reply("connection refused") == ("", "connection refused")
    assert normalize_reply("421 4.4.2 " + "x" * 500)[1] == "x" * 120
    # The table of reasons is bounded: past max_reasons, new ones are "(other)".
    agg = Aggregator(max_reasons=3)
    for i in range(10):
        agg.add(Bounce(queue_id="Q", recipient="r@d.test", destination="d.test",
                       reply=f"550 5.0.0 reason {'abcdefghij'[i]}"))
    reasons = agg.report(top=0).bounce_reasons
    assert [(x.text, x.count) for x in reasons] == [
        ("(other)", 7), ("reason a", 1), ("reason b", 1), ("reason c", 1)]


def test_times_iso_relative_and_unix() -> None:
    now = T0 + 7200
    assert parse_when(ISO0, now) == T0
    assert parse_when("2024-03-05T06:07:00Z", now) == T0
    assert parse_when("1h", now) == T0 + 3600
    assert parse_when("30m", now) == now - 1800
    assert parse_when("1h30m", now) == now - 5400
    assert parse_when("2d", now) == now - 2 * 86400
    assert parse_when(str(int(T0)), now) == T0
    assert parse_when("now", now) == now
    naive = parse_when("2024-03-05 06:07", now)
    assert naive == datetime(2024, 3, 5, 6, 7).timestamp()  # local time
    with pytest.raises(ValueError, match="not a time"):
        parse_when("yesterday", now)


def test_aggregation_streams_in_bounded_memory() -> None:
    """Events are counted as they come: memory does not grow with their number."""

    def stream(n: int) -> Iterator[Event]:
        for i in range(n):
            yield Delivery(queue_id=f"Q{i}", time=T0 + i, recipient=f"u{i}@d{i % 50}.test",
                           destination=f"d{i % 50}.test", queued_seconds=i % 977 + 0.5)
            yield TransientFailure(queue_id=f"Q{i}", time=T0 + i, recipient="x@y.test",
                                   destination="y.test", reply=f"451 4.3.0 busy {i}")

    def peak(n: int) -> int:
        tracemalloc.start()
        try:
            agg = Aggregator(exact_delays=1000)
            for event in stream(n):
                agg.add(event)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(1000), peak(15000)
    assert large < small + 200_000, (small, large)


def write_log(path: Path, events: list[Event], junk: bool = True) -> Path:
    with open(path, "wb") as f:
        for i, e in enumerate(events):
            f.write(encode(e) + b"\n")
            if junk and i == 3:
                f.write(b'{"type":"FromTheFuture","queue_id":"F","time":1}\n')
                f.write(b"\n")
        if junk:
            f.write(b'{"type":"Delivery","queue_id":"TORN","ti')  # a torn last line
    return path


def test_reader_skips_and_counts_lines_that_are_not_events(tmp_path: Path) -> None:
    import gzip

    path = write_log(tmp_path / "events.jsonl", known_log())
    reader = EventReader([str(path)])
    assert len(list(reader)) == 17 and reader.skipped == 2
    gz = tmp_path / "events.jsonl.1.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    both = EventReader([str(gz), str(path)])
    assert len(list(both)) == 34 and both.skipped == 4


def test_cli_report_json_and_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_log(tmp_path / "events.jsonl", known_log())
    since, until = ISO0, datetime.fromtimestamp(T0 + 3600, UTC).isoformat()
    assert main(["report", "--events", str(path), "--since", since, "--until", until,
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["events"] == 15 and out["skipped_lines"] == 2
    assert {k: out["totals"][k] for k in ("received", "delivered", "deferred", "bounced",
                                          "expired")} == {
        "received": 3, "delivered": 4, "deferred": 2, "bounced": 3, "expired": 1}
    assert out["delivery_delay"]["p90"] == 3.0
    assert [d["name"] for d in out["domains"]] == ["example.org", "gmail.com", "yahoo.com",
                                                   "s.test"]
    assert main(["report", "--events", str(path), "--since", since, "--until", until,
                 "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert "        3  received (dsn 1, http 1, smtp 1; 5 recipients, 1.8 KiB)" in text
    assert "        4  delivered" in text and "        1  expired" in text
    assert "        2  log lines skipped" in text
    assert "p50 1.00s  p90 3.00s  p99 3.00s" in text
    assert "2  5.1.1    <address>: Recipient address rejected: User unknown" in text
    domains = text.split("Per recipient domain")[1].split("Per provider")[0]
    assert "gmail.com" in domains and "s.test" not in domains  # --top 2
    # The config's log.events is read when --events is not given.
    (tmp_path / "relay.toml").write_text('[log]\nevents = "events.jsonl"\n')
    assert main(["report", "--config", str(tmp_path / "relay.toml"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["events"] == 17


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--events", "{tmp}/missing.jsonl"], 66, "relay: report: cannot read {tmp}/missing.jsonl:"
                                              " No such file or directory"),
    (["--events", "{tmp}/e.jsonl", "--since", "yesterday"], 64, "relay: report: 'yesterday' "
                                                                "is not a time"),
    (["--events", "{tmp}/e.jsonl", "--since", "1h", "--until", "2h"], 64,
     "relay: report: --since must be before --until"),
    (["--events", "{tmp}/e.jsonl", "--top", "-1"], 64, "relay: report: --top must be"),
    (["--config", "{tmp}/off.toml"], 78, 'relay: {tmp}/off.toml: log.events is "" (no event '
                                         'log)'),
    (["--config", "{tmp}/nope.toml"], 78, "relay: {tmp}/nope.toml: cannot read config"),
])
def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 args: list[str], code: int, message: str) -> None:
    write_log(tmp_path / "e.jsonl", known_log())
    (tmp_path / "off.toml").write_text('[log]\nevents = ""\n')
    assert main(["report", *(a.format(tmp=tmp_path) for a in args)]) == code
    err = capsys.readouterr().err
    assert err.startswith(message.format(tmp=tmp_path)), err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_chart_without_matplotlib_is_a_one_line_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_log(tmp_path / "e.jsonl", known_log())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    chart = tmp_path / "chart.png"
    assert main(["report", "--events", str(path), "--chart", str(chart)]) == 69
    err = capsys.readouterr().err
    assert err == ("relay: report: --chart needs matplotlib, which is not installed (pip "
                   "install 'relay[bench]')\n")
    assert not chart.exists()
    # ... and the report itself does not need it.
    assert main(["report", "--events", str(path)]) == 0


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_chart_is_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path = write_log(tmp_path / "e.jsonl", known_log())
    chart = tmp_path / "chart.png"
    assert main(["report", "--events", str(path), "--chart", str(chart)]) == 0
    assert f"Chart written to {chart}" in capsys.readouterr().out
    data = chart.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert (width, height) == (1000, 400)
    assert 10_000 < len(data) < 2_000_000
    # Straight from the library too, and an empty report still draws (axes only).
    empty = tmp_path / "empty.png"
    draw_chart(summarize([], per_minute=True), str(empty))
    assert empty.read_bytes()[:8] == PNG_SIGNATURE


def test_the_report_is_json_for_machines() -> None:
    r = summarize(known_log(), since=T0, until=T0 + 3600)
    decoded = msgspec.json.decode(msgspec.json.encode(r))
    assert decoded["totals"]["received_via"] == {"smtp": 1, "http": 1, "dsn": 1}
    assert decoded["providers"] == [{"name": "google", "received": 0, "delivered": 2,
                                     "deferred": 0, "bounced": 0, "expired": 0,
                                     "suppressed": 0}]
