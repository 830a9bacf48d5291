"""``bench.floor``: its canned-reply server speaks enough SMTP for real clients, and the
measurement reports a CPU figure for both servers."""

from __future__ import annotations

import smtplib
from pathlib import Path

import pytest
import trio

from bench.floor import main, serve
from bench.peers import free_port
from bench.smtp_source import SMTP_SOURCE


async def test_the_canned_server_takes_messages_from_smtplib() -> None:
    port = free_port()

    def client() -> list[tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            replies = [smtp.ehlo("client.test")]
            for body in (b"", b"one\r\n.\r\n..dot-stuffed\r\nlast", b"x" * 200_000):
                smtp.mail("a@src.test")
                smtp.rcpt("b@dst.test")
                replies.append(smtp.data(body))
            return replies

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve, port)
        with trio.fail_after(20):
            while True:  # until it listens
                try:
                    (await trio.open_tcp_stream("127.0.0.1", port)).socket.close()
                    break
                except OSError:
                    await trio.sleep(0.01)
            replies = await trio.to_thread.run_sync(client)
        nursery.cancel_scope.cancel()
    assert [code for code, _ in replies] == [250, 250, 250, 250]


def test_the_measurement_reports_both_servers(capsys: pytest.CaptureFixture[str]) -> None:
    if not Path(SMTP_SOURCE).exists():
        pytest.fail("smtp-source is not installed: run scripts/install-sysdeps")
    assert main(["--messages", "1000", "--sessions", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("per message")[1].strip() for line in lines] == [
        "smtp-sink (C)", "trio + Wire (Python)"]
    assert all(float(line.split()[0]) > 0 for line in lines)
