"""``bench.profile``'s layer table from py-spy raw stacks (the profile run itself needs
ptrace and minutes of load: the bench's job, not the suite's)."""

from __future__ import annotations

from bench.profile import format_layers, layer_shares

ROOT = ("<module> (relay:6);main (relay/cli.py:1011);run_worker (relay/worker.py:334);"
        "run (trio/_core/_run.py:2532);unrolled_run (trio/_core/_run.py:2866)")
SESSION = ROOT + (";serve_session (relay/inbound/session.py:494);"
                  "_Session._converse (relay/inbound/session.py:300)")
DEST = ROOT + ";Destination._serve (relay/outbound/destination.py:690)"


def test_samples_go_to_the_innermost_layer() -> None:
    lines = [
        SESSION + ";_Session._flush (relay/inbound/session.py:350);"
        "Wire.send (relay/wire.py:99);Wire.try_send (relay/wire.py:112) 30",
        SESSION + ";ServerConnection.next_event (relay/smtp/server.py:300) 10",
        SESSION + ";Intake.admit (relay/intake/intake.py:80);"
        "EventBus.emit_many (relay/events/bus.py:40) 5",
        DEST + ";SmtpClient.receive_data (relay/smtp/client.py:630) 7",
        DEST + ";ClientSession.flush (relay/outbound/session.py:200);"
        "Wire.try_send (relay/wire.py:112) 8",
        ROOT + ";Runner.reschedule (trio/_core/_run.py:1650) 4",
        "Thread._bootstrap (threading.py:995);Spool.write_prepared (relay/spool/store.py:500) 20",
        ROOT + ";EpollIOManager.get_events (trio/_core/_io_epoll.py:240) 3",
        "",
    ]
    shares, threads = layer_shares(lines)
    assert threads == 23
    assert shares == {
        "system calls, inbound sockets": 30,
        "SMTP protocol, sans-I/O (server)": 10,
        "events: log and metrics subscribers": 5,
        "SMTP protocol, sans-I/O (client)": 7,
        "system calls, outbound sockets": 8,
        "trio: scheduler, epoll, thread hand-offs": 4,
    }
    table = format_layers(shares, threads, cpu_ms=0.64)
    assert "46.9%    0.300  system calls, inbound sockets" in table  # 30/64 of 0.64 ms
    assert "left out: 23 of worker threads and epoll_wait" in table
