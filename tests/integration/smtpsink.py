"""A recording ESMTP sink on loopback for the integration tests, one thread per connection.

It keeps every command line and every message as it came off the wire (the raw DATA
stream, still dot-stuffed), so tests can check what the relay really sent. It offers
PIPELINING and 8BITMIME (plus ``extra_keywords``), never CHUNKING, so every body
arrives as DATA. ``rcpt_reply(line)`` decides each RCPT (250 by default); DATA after
only refused recipients is refused (RFC 2920 3.1).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

__all__ = ["RecordingSink"]


class RecordingSink:
    def __init__(self, extra_keywords: tuple[bytes, ...] = ()) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        keywords = (b"PIPELINING", *extra_keywords, b"8BITMIME")
        self.ehlo = b"250-sink.test\r\n" + b"".join(
            b"250-" + k + b"\r\n" for k in keywords[:-1]) + b"250 " + keywords[-1] + b"\r\n"
        #: Every command line received, in order.
        self.commands: list[bytes] = []
        #: (MAIL FROM path, accepted RCPT paths, raw DATA stream up to its final CRLF).
        self.messages: list[tuple[bytes, list[bytes], bytes]] = []
        #: The client's (source) address of each message, in the same order.
        self.peers: list[str] = []
        self.lock = threading.RLock()  # re-entrant: callers hold it around ``bodies``
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def bodies(self) -> list[bytes]:
        """Each message's raw DATA stream with its terminator (``.\\r\\n``)."""
        with self.lock:
            return [raw + b".\r\n" for _, _, raw in self.messages]

    def rcpt_reply(self, line: bytes) -> bytes:
        return b"250 ok\r\n"

    def find(self, predicate: Callable[[bytes, list[bytes], bytes], bool]) -> bytes | None:
        """The raw DATA stream of the first message ``predicate(sender, rcpts, raw)``."""
        with self.lock:
            return next((raw for s, r, raw in self.messages if predicate(s, r, raw)), None)

    def close(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, addr = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn, addr[0]), daemon=True).start()

    def _reply(self, line: bytes, txn: dict) -> bytes:
        verb = line[:4].upper()
        if verb == b"EHLO":
            return self.ehlo
        if verb == b"MAIL":
            txn.update(sender=line.partition(b":")[2].split(b" ")[0], rcpts=[])
        elif verb == b"RCPT":
            reply = self.rcpt_reply(line)
            if reply.startswith(b"2"):
                txn.setdefault("rcpts", []).append(line.partition(b":")[2])
            return reply
        elif verb == b"DATA":
            return b"354 go ahead\r\n" if txn.get("rcpts") else b"554 5.5.1 no recipients\r\n"
        elif verb == b"QUIT":
            return b"221 bye\r\n"
        return b"250 ok\r\n"

    def _serve(self, conn: socket.socket, peer: str) -> None:
        # A client that goes away mid-reply (a worker killed by a test) ends the session
        # quietly, as it does when it goes away mid-read.
        with contextlib.suppress(OSError):
            self._converse(conn, peer)

    def _converse(self, conn: socket.socket, peer: str) -> None:
        buf, in_data, txn = b"", False, {}
        with conn:
            conn.settimeout(20)
            conn.sendall(b"220 sink.test ESMTP\r\n")
            while True:
                # The terminator's CRLF ends the message's last line; an empty message
                # is a lone dot.
                if in_data and (end := (b"\r\n" + buf).find(b"\r\n.\r\n")) >= 0:
                    with self.lock:
                        self.messages.append((txn.get("sender", b""), txn["rcpts"], buf[:end]))
                        self.peers.append(peer)
                    buf, in_data = buf[end + 3:], False
                    conn.sendall(b"250 2.0.0 queued\r\n")
                    continue
                if not in_data and b"\r\n" in buf:
                    line, buf = buf.split(b"\r\n", 1)
                    with self.lock:
                        self.commands.append(line)
                    reply = self._reply(line, txn)
                    conn.sendall(reply)
                    in_data = reply.startswith(b"354")
                    if reply.startswith(b"221"):
                        return
                    continue
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += data
