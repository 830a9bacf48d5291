"""Webhooks without a network: signing, filters, batches, log lines, the cursor and the
log reader (real files in a temp dir), and the ``[[webhooks]]`` config checks."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

import pytest

from relay.config import ConfigError, decode_config, load_config
from relay.events import Bounce, Delivery, EventLog, Reception
from relay.events.types import encode
from relay.events.webhooks import (
    MAX_BATCH_BYTES,
    Batch,
    Cursor,
    CursorStore,
    EventFilter,
    LogReader,
    backoff,
    parse_line,
    sign,
    verify,
)

# -- signing ----------------------------------------------------------------------------


def test_the_signature_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"events":[]}'
    expected = hmac.new(b"key", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(b"key", 1700000000, body) == "sha256=" + expected


def test_verify_accepts_ours_and_refuses_tampering_and_old_timestamps() -> None:
    body, ts = b'{"events":[{"type":"Delivery"}]}', 1700000000
    good = sign(b"key", ts, body)
    assert verify(b"key", str(ts), body, good, now=ts + 10)
    assert not verify(b"key", str(ts), body + b" ", good, now=ts)
    assert not verify(b"other", str(ts), body, good, now=ts)
    assert not verify(b"key", str(ts + 1), body, good, now=ts)  # the timestamp is signed
    assert not verify(b"key", str(ts), body, good, now=ts + 301)  # too old: a replay
    assert verify(b"key", str(ts), body, good, max_age=None, now=ts + 10**6)
    assert not verify(b"key", "12a", body, good)
    assert not verify(b"key", "", body, good)


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    assert [backoff(n, 1.0, 300.0, rand=0.999999) for n in (1, 2, 3, 4)] == pytest.approx(
        [1.0, 2.0, 4.0, 8.0], rel=1e-5)
    assert backoff(30, 1.0, 300.0, rand=0.0) == 150.0  # capped, then halved at most
    assert backoff(10**6, 1.0, 300.0, rand=0.5) == 225.0  # no overflow
    for n in range(1, 20):
        assert 0.5 * min(300, 2 ** (n - 1)) <= backoff(n, 1.0, 300.0) <= min(300, 2 ** (n - 1))


def test_a_password_in_the_url_is_not_logged() -> None:
    from relay.events.webhooks import _without_password

    assert _without_password("https://u:s3cret@h.test:8443/x?y=1") == "https://u:***@h.test:8443/x?y=1"
    assert _without_password("https://h.test/x") == "https://h.test/x"


# -- filters, lines, batches -----------------------------------------------------------


def test_filter_by_type_and_tenant() -> None:
    every = EventFilter()
    assert every("Delivery", None) and every("Bounce", "acme")
    bounces = EventFilter(types=["Bounce", "Expiration"])
    assert bounces("Bounce", None) and not bounces("Delivery", "acme")
    acme = EventFilter(tenants=["acme"])
    assert acme("Delivery", "acme") and not acme("Delivery", "other")
    assert not acme("ShapingChange", None)  # no tenant: only an empty list matches it
    both = EventFilter(["Delivery"], ["acme"])
    assert both("Delivery", "acme") and not both("Bounce", "acme")


def _delivery(queue_id: str, tenant: str | None = None) -> Delivery:
    return Delivery(queue_id=queue_id, recipient="r@d.test", destination="d.test",
                    tenant=tenant, time=1700000000.5)


def test_parse_line_reads_the_head_and_keeps_the_record() -> None:
    line = encode(_delivery("Q1", "acme"))
    start, head, record = parse_line(line)  # type: ignore[misc]
    assert (start, head.type, head.tenant, head.time) == (0, "Delivery", "acme", 1700000000.5)
    assert record == line


def test_parse_line_recovers_the_event_after_a_torn_write() -> None:
    whole = encode(_delivery("Q2"))
    torn = encode(_delivery("Q1"))[:37] + whole
    start, head, record = parse_line(torn)  # type: ignore[misc]
    assert (start, head.type, record) == (37, "Delivery", whole)
    assert parse_line(b'{"type":"Deliv') is None
    assert parse_line(b"not json at all") is None
    assert parse_line(b'{"no_type": 1}') is None
    # a nested {"type": ...} (metadata) that does not decode on its own is passed over
    meta = encode(Delivery(queue_id="Q3", recipient="r", destination="d",
                           metadata={"x": {"type": "y"}}))
    start, head, record = parse_line(b'{"type":"Rec' + meta)  # type: ignore[misc]
    assert record == meta and head.type == "Delivery"


def test_a_batch_is_the_log_records_with_an_event_id_first() -> None:
    batch = Batch()
    events = [_delivery("Q1"), Bounce(queue_id="Q1", recipient="r", destination="d")]
    for i, e in enumerate(events):
        line = encode(e)
        _, head, record = parse_line(line)  # type: ignore[misc]
        batch.add(f"7:{i * 100}", head, record)
    doc = json.loads(batch.payload())
    assert [e["event_id"] for e in doc["events"]] == ["7:0", "7:100"]
    assert [e["type"] for e in doc["events"]] == ["Delivery", "Bounce"]
    assert doc["events"][0] == {"event_id": "7:0", **json.loads(encode(events[0]))}
    assert (batch.id, batch.first_time, len(batch)) == ("7:0", 1700000000.5, 2)
    assert batch.full(2) and not batch.full(3)


def test_a_batch_is_full_at_max_batch_bytes_whatever_its_size() -> None:
    batch = Batch()
    big = encode(Reception(queue_id="Q", sender="s", recipients=["r" * 1000] * 100, size=1,
                           client_ip="127.0.0.1"))
    _, head, record = parse_line(big)  # type: ignore[misc]
    while not batch.full(10**6):
        batch.add("1:0", head, record)
    assert MAX_BATCH_BYTES <= batch.bytes < MAX_BATCH_BYTES + len(big) + 100
    assert len(batch.payload()) < MAX_BATCH_BYTES + len(big) + 100


# -- the cursor file -------------------------------------------------------------------


def test_the_cursor_is_saved_atomically_and_read_back(tmp_path: Path) -> None:
    store = CursorStore(tmp_path / "webhooks" / "a.cursor")
    assert store.load() is None
    store.save(Cursor(1, 2, 3, "h", 4))
    store.save(Cursor(1, 2, 30, "h", 4))
    assert store.load() == Cursor(1, 2, 30, "h", 4)
    assert sorted(p.name for p in (tmp_path / "webhooks").iterdir()) == ["a.cursor"]


def test_an_unreadable_cursor_is_kept_aside_and_taken_as_none(tmp_path: Path) -> None:
    path = tmp_path / "a.cursor"
    path.write_bytes(b"\0garbage")
    assert CursorStore(path).load() is None
    assert (tmp_path / "a.cursor.bad").read_bytes() == b"\0garbage"
    assert not path.exists()


# -- reading the log --------------------------------------------------------------------


def _lines(reader: LogReader) -> list[tuple[int, bytes]]:
    """Every complete line the reader can get now."""
    out = []
    while True:
        item = reader.next_line()
        if item is None:
            if reader.read_more():
                continue
            return out
        out.append(item)


def _write(path: Path, *events: Delivery) -> None:
    log = EventLog(path)
    log(list(events))
    log.close()


def test_the_reader_returns_complete_lines_only(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    first = encode(_delivery("Q1"))
    path.write_bytes(first + b"\n" + b'{"type":"Deliv')
    reader = LogReader(str(path))
    reader.open(None)
    assert _lines(reader) == [(0, first)]
    assert reader.consumed().offset == len(first) + 1
    with open(path, "ab") as f:  # the rest of the write arrives
        f.write(b'ery"}\n')
    assert _lines(reader) == [(len(first) + 1, b'{"type":"Delivery"}')]


def test_without_backfill_a_new_reader_starts_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    _write(path, _delivery("Q1"), _delivery("Q2"))
    reader = LogReader(str(path))
    reader.open(None, backfill=False)
    assert _lines(reader) == []
    _write(path, _delivery("Q3"))
    assert [parse_line(line)[2] for _, line in _lines(reader)] == [  # type: ignore[index]
        encode(_delivery("Q3"))]


def test_the_reader_resumes_at_its_cursor_in_a_rotated_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    _write(path, _delivery("Q1"), _delivery("Q2"))
    reader = LogReader(str(path))
    reader.open(None)
    reader.read_more()
    reader.next_line()
    cursor = reader.consumed()
    reader.close()
    path.rename(tmp_path / "events.jsonl.1")  # logrotate, while the relay was down
    _write(path, _delivery("Q3"))
    reader = LogReader(str(path))
    assert reader.open(cursor).startswith("resuming")
    got = [line for _, line in _lines(reader)]
    assert got == [encode(_delivery("Q2"))]
    assert reader.backlog_bytes() == path.stat().st_size  # the new file is still to read
    assert not reader.follow_rotation(grace=3600)  # the old file may still grow
    assert reader.follow_rotation(grace=0)
    assert [line for _, line in _lines(reader)] == [encode(_delivery("Q3"))]
    assert reader.consumed().ino == path.stat().st_ino


def test_a_file_with_the_cursors_inode_but_other_content_is_not_taken(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    _write(path, _delivery("Q1"))
    st = path.stat()
    wrong = Cursor(st.st_dev, st.st_ino, 5, hashlib.sha256(b"else").hexdigest(), 4)
    reader = LogReader(str(path), "w")
    assert reader.open(wrong).startswith("starting at offset 0")
    assert _lines(reader)[0][0] == 0


def test_a_gone_cursor_file_goes_on_at_the_start_of_the_current_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "events.jsonl"
    _write(path, _delivery("Q1"))
    reader = LogReader(str(path), "w")
    assert reader.open(Cursor(1, 999999999, 50), backfill=False).startswith("starting at "
                                                                           "offset 0")
    assert "is gone" in caplog.text
    assert len(_lines(reader)) == 1


def test_a_file_truncated_in_place_is_read_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    _write(path, _delivery("Q1"), _delivery("Q2"))
    reader = LogReader(str(path))
    reader.open(None)
    assert len(_lines(reader)) == 2
    os.truncate(path, 0)  # copytruncate
    _write(path, _delivery("Q3"))
    assert reader.read_more() == 0 or _lines(reader) == []
    assert reader.follow_rotation()
    assert [line for _, line in _lines(reader)] == [encode(_delivery("Q3"))]


def test_an_overlong_line_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import relay.events.webhooks as webhooks

    monkeypatch.setattr(webhooks, "MAX_LINE", 200)
    path = tmp_path / "events.jsonl"
    ok = encode(_delivery("Q2"))
    path.write_bytes(b"x" * 1000 + b"\n" + ok + b"\n")
    reader = LogReader(str(path))
    reader.open(None)
    assert [line for _, line in _lines(reader)] == [ok]  # read whole, then skipped
    assert reader.bad_lines == 1
    # ... and one that arrives in pieces, longer than MAX_LINE before its end is read
    with open(path, "ab") as f:
        f.write(b"y" * 300)
    assert _lines(reader) == []
    with open(path, "ab") as f:
        f.write(b"y" * 300 + b"\n" + ok + b"\n")
    assert [line for _, line in _lines(reader)] == [ok]
    assert reader.bad_lines == 2


# -- config -----------------------------------------------------------------------------

HOOK = '[[webhooks]]\nname = "crm"\nurl = "https://hooks.example.com/relay"\n'


def test_a_webhook_config_with_its_defaults() -> None:
    cfg = decode_config(HOOK + 'secret = "k"\n')
    (hook,) = cfg.webhooks
    assert (hook.batch_size, hook.max_batch_age, hook.timeout, hook.events,
            hook.tenants, hook.backfill) == (100, 1.0, 10.0, [], [], True)
    assert hook.secret_bytes() == b"k"
    assert decode_config(b"").webhooks == []


@pytest.mark.parametrize(("extra", "error"), [
    ('secret = "k"\nevents = ["Delivery", "Bounced"]\n',
     'webhooks[0].events[1]: "Bounced" is not an event type (one of '),
    ("", "webhooks[0].secret/secret_file: set one of them"),
    ('secret = "k"\nsecret_file = "k.txt"\n', "webhooks[0].secret/secret_file: set one"),
    ('secret = "k"\nretry_min = 10.0\nretry_max = 5.0\n', "webhooks[0].retry_min: more than"),
    ('secret = "k"\nbatch_size = 0\n', "webhooks[0].batch_size: must be at least 1"),
    ('secret = "k"\nmax_batch_age = 0\n', "webhooks[0].max_batch_age: must be greater"),
    ('secret = "k"\n' + HOOK + 'secret = "k"\n', 'webhooks[1].name: "crm" is used twice'),
])
def test_webhook_config_errors_name_the_key(extra: str, error: str) -> None:
    with pytest.raises(ConfigError) as e:
        decode_config(HOOK + extra, "relay.toml")
    assert str(e.value).startswith("relay.toml: " + error), str(e.value)


@pytest.mark.parametrize("url", ["ftp://x.test/", "hooks.example.com", "http://", "http://x:0x/",
                                 "http://x.test/a b"])
def test_webhook_urls_must_be_http(url: str) -> None:
    with pytest.raises(ConfigError) as e:
        decode_config(f'[[webhooks]]\nname = "a"\nurl = "{url}"\nsecret = "k"\n', "r.toml")
    assert "r.toml: webhooks[0].url: " in str(e.value)


def test_webhook_names_are_file_names() -> None:
    with pytest.raises(ConfigError) as e:
        decode_config('[[webhooks]]\nname = "../x"\nurl = "http://x.test"\nsecret = "k"\n')
    assert "webhooks[0].name: \"../x\" must be 1-64 letters" in str(e.value)


def test_webhooks_need_the_event_log() -> None:
    with pytest.raises(ConfigError) as e:
        decode_config('[log]\nevents = ""\n' + HOOK + 'secret = "k"\n', "relay.toml")
    assert str(e.value) == ("relay.toml: webhooks: need log.events (the webhooks send the "
                            "event log)")


def test_secret_file_is_relative_to_the_config_and_read_at_load(tmp_path: Path) -> None:
    (tmp_path / "hook.key").write_text("s3cret\n")
    (tmp_path / "relay.toml").write_text(HOOK + 'secret_file = "hook.key"\n')
    hook = load_config(tmp_path / "relay.toml").webhooks[0]
    assert (hook.secret_file, hook.secret) == (str(tmp_path / "hook.key"), "s3cret")
    assert hook.secret_bytes() == b"s3cret"
    (tmp_path / "hook.key").write_text("\n")
    with pytest.raises(ConfigError, match=r"relay.toml: webhooks\[0\].secret_file: .* is "
                                          "empty"):
        load_config(tmp_path / "relay.toml")
    (tmp_path / "hook.key").unlink()
    with pytest.raises(ConfigError, match=r"webhooks\[0\].secret_file: cannot read"):
        load_config(tmp_path / "relay.toml")
