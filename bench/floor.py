"""The CPU floor under the relay's inbound side: ``python -m bench.floor``.

How much of the relay's CPU per message is the conversation itself? Two servers that do
nothing but the conversation are loaded by Postfix's ``smtp-source`` exactly as
``bench.profile`` loads the relay, and the CPU of each is divided by the messages:

* ``smtp-sink``: Postfix's C test server (canned replies, nothing stored): what the
  system calls and the kernel's loopback TCP work cost with no interpreter at all.
* ``trio + Wire``: ``serve`` below, one trio process moving bytes through the relay's
  own ``relay.wire.Wire`` and answering every command with a canned reply (the ends of
  lines and of the data found with ``bytes.find``, nothing parsed, nothing stored):
  what any Python relay on trio pays before its first line of SMTP logic.

The relay's path is that twice (the inbound conversation, then the outbound one to the
next hop), plus parsing, policy, the spool's synced commit and the logs; so twice the
``trio + Wire`` figure is a floor for the relay's CPU per message that no change to the
relay's own code can go below.

    python -m bench.floor                    # connection per message, 2 KB
    python -m bench.floor --reuse            # smtp-source -d
    python -m bench.floor --size 102400      # 100 KB bodies
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

import trio

from bench.metrics import sample_tree
from bench.peers import free_port, wait_for_220
from bench.smtp_source import SMTP_SOURCE, _SmtpSink, add_load_arguments, load
from relay.inbound.listener import bind_listeners, serve_listeners
from relay.wire import Wire

__all__ = ["main", "serve"]

_EHLO = b"250-floor\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 52428800\r\n"
_REPLIES = {b"HELO": b"250 floor\r\n", b"EHLO": _EHLO, b"DATA": b"354 go ahead\r\n",
            b"QUIT": b"221 bye\r\n"}
_OK = b"250 ok\r\n"
_END = b"\r\n.\r\n"


async def _converse(sock: socket.socket) -> None:
    """Canned replies until QUIT or EOF; the replies of one read leave in one send."""
    wire = Wire(sock, fresh=True)
    try:
        await wire.send(b"220 floor ESMTP\r\n")
        buf, in_data = b"", False
        while True:
            data = await wire.recv(65536, try_first=in_data)
            if not data:
                return
            buf += data
            out = []
            while True:
                if in_data:
                    # "\r\n." after DATA's own line end: the body may be empty.
                    end = (b"\r\n" + buf).find(_END)
                    if end < 0:
                        buf = buf[-4:]
                        break
                    buf, in_data = buf[end + 3:], False
                    out.append(_OK)
                    continue
                eol = buf.find(b"\r\n")
                if eol < 0:
                    break
                verb, buf = buf[:4].upper(), buf[eol + 2:]
                out.append(_REPLIES.get(verb, _OK))
                in_data = verb == b"DATA"
                if verb == b"QUIT":
                    await wire.send(b"".join(out))
                    return
            if out:
                await wire.send(b"".join(out))
    except OSError:
        return
    finally:
        await wire.aclose()


async def serve(port: int) -> None:
    """Accept on 127.0.0.1:``port`` with the relay's own listener until cancelled."""
    listeners = bind_listeners([f"127.0.0.1:{port}"])
    async with trio.open_nursery() as sessions:
        await serve_listeners(listeners, lambda sock, _peer: _converse(sock), sessions)


async def _cpu_per_message(pid: int, port: int, args: argparse.Namespace) -> float:
    """CPU ms per message of process ``pid`` over ``args.messages`` (after a warm-up)."""
    await load(port, min(2000, args.messages), args)
    before = sample_tree([pid])
    await load(port, args.messages, args)
    return (sample_tree([pid]).cpu_seconds - before.cpu_seconds) * 1000 / args.messages


async def measure(args: argparse.Namespace) -> dict[str, float]:
    """CPU ms per message of smtp-sink and of ``serve``, measured one after the other."""
    results = {}
    async with _SmtpSink() as sink:
        assert sink.proc is not None
        results["smtp-sink (C)"] = await _cpu_per_message(sink.proc.pid, sink.port, args)
    port = free_port()
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "bench.floor", "--serve", str(port)])
    try:
        await wait_for_220("127.0.0.1", port, time.monotonic() + 15,
                           alive=lambda: proc.returncode is None)
        results["trio + Wire (Python)"] = await _cpu_per_message(proc.pid, port, args)
    finally:
        proc.terminate()
        await proc.wait()
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(ap)
    ap.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve is not None:
        trio.run(serve, args.serve)
        return 0
    if not Path(SMTP_SOURCE).exists():
        raise SystemExit("bench.floor needs smtp-source and smtp-sink (make sysdeps)")
    for name, ms in trio.run(measure, args).items():
        print(f"{ms:7.3f} ms CPU per message  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
