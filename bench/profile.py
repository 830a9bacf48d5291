"""Where a worker's CPU goes per message, by layer: ``python -m bench.profile``.

The relay peer (``bench.peers.RelayPeer``, one worker by default so one process holds the
whole path) relays to Postfix's ``smtp-sink`` while Postfix's ``smtp-source`` loads it,
as in the ``smtp-source`` scenario. Two measurements, one after the other:

1. CPU per message: the relay's process tree CPU (``bench.metrics.sample_tree``) over
   ``--messages`` messages, from before the load until the sink has every one of them
   (so delivery is included), divided by the count.
2. The profile: ``py-spy record`` (sampling, ``--rate`` Hz, the ``bench`` extra
   installs it) of each worker for ``--seconds`` under the same load, in py-spy's raw
   (collapsed stack) format; the files are kept under ``--out``.

Each sample of a worker's main thread (the trio thread) goes to the first layer that
matches walking from the innermost frame outwards (``LAYERS``); so "system calls" is the
time in ``send``/``recv``/``accept``/``close`` including the kernel's work for loopback
TCP, and "trio" what runs under no relay frame but the worker's root (the scheduler,
epoll, thread hand-offs). Worker-thread samples (the LMDB commit, mostly waiting in
``fdatasync``) and the main thread's samples inside ``epoll_wait`` (asleep, though
py-spy does not always see it) are counted apart and left out of the shares. ``ms/msg`` is a layer's
share times the measured CPU per message: an estimate, as sampling is.

    python -m bench.profile                       # connection per message, 2 KB
    python -m bench.profile --reuse               # smtp-source -d
    python -m bench.profile --size 102400         # 100 KB bodies
    python -m bench.profile --layers FILE.txt     # the table of a kept profile
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import trio

from bench.metrics import children, sample_tree
from bench.peers import PeerSetup, RelayPeer
from bench.smtp_source import SMTP_SOURCE, _SmtpSink, add_load_arguments, load

__all__ = ["LAYERS", "layer_shares", "main"]

#: Frames whose samples are system calls on a socket (the kernel's work included).
_SYSCALL_FRAMES = frozenset({
    "Wire.try_send", "Wire.recv", "Wire.send", "Wire.aclose", "_wait_ready", "socket.accept",
    "socket.close", "socket._real_close", "socket.__init__", "_peek_pregreet",
    "tune_socket", "_connect"})
#: Frames that only start things: what runs under them alone is the scheduler's.
_ROOT_FILES = ("relay/worker.py", "relay/cli.py", "relay/supervisor.py")
#: (path prefix, layer) for the innermost relay frame of a sample.
LAYERS: tuple[tuple[str, str], ...] = (
    ("relay/smtp/", "SMTP protocol, sans-I/O ({side})"),
    ("relay/events/", "events: log and metrics subscribers"),
    ("relay/intake/", "intake stages"),
    ("relay/spool/", "spool: prepare, index, group-commit hand-off"),
    ("relay/outcomes/", "outcomes: judge, shaping feedback"),
    ("relay/outbound/", "outbound: engine, destinations, client session"),
    ("relay/inbound/", "inbound: listener, server session"),
    ("relay/", "other relay code"),
)
_FRAME = re.compile(r"(.*) \((.*):\d+\)$")


def _frame(text: str) -> tuple[str, str]:
    """``"Wire.recv (relay/wire.py:81)"`` -> ``("Wire.recv", "relay/wire.py")``."""
    m = _FRAME.match(text)
    if not m:
        return text, ""
    name, path = m.groups()
    i = path.rfind("relay/")
    return name, path[i:] if i >= 0 and "site-packages" not in path else path


def _layer(frames: list[tuple[str, str]]) -> str:
    if any(name in ("serve_session", "_accept_loop") for name, _ in frames):
        side = "inbound"
    elif any(path.startswith("relay/outbound/") for _, path in frames):
        side = "outbound"
    else:
        side = ""
    for name, path in reversed(frames):
        if path in _ROOT_FILES:
            continue
        if name in _SYSCALL_FRAMES:
            return f"system calls, {side} sockets" if side else "system calls"
        for prefix, layer in LAYERS:
            if path.startswith(prefix):
                return layer.format(side="server" if side == "inbound" else "client")
    return "trio: scheduler, epoll, thread hand-offs"


def layer_shares(lines: Iterable[str]) -> tuple[Counter[str], int]:
    """Main-thread samples per layer of py-spy raw lines, and the samples left out:
    worker threads, and the main thread inside ``epoll_wait`` (py-spy does not always
    see that it sleeps there)."""
    shares: Counter[str] = Counter()
    threads = 0
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack:
            continue
        frames = [_frame(f) for f in stack.split(";")]
        if (any(name == "Thread._bootstrap" for name, _ in frames)
                or frames[-1][0] == "EpollIOManager.get_events"):
            threads += int(count)
        else:
            shares[_layer(frames)] += int(count)
    return shares, threads


def format_layers(shares: Counter[str], threads: int, cpu_ms: float | None) -> str:
    total = sum(shares.values()) or 1
    out = [f"{'share':>6}  {'ms/msg':>7}  layer (main thread: {total} samples; "
           f"left out: {threads} of worker threads and epoll_wait)"]
    for layer, n in shares.most_common():
        ms = f"{cpu_ms * n / total:7.3f}" if cpu_ms is not None else "      -"
        out.append(f"{100 * n / total:5.1f}%  {ms}  {layer}")
    return "\n".join(out)


async def _until_sink_has(sink: _SmtpSink, count: int, timeout: float) -> None:
    with trio.fail_after(timeout):
        while sink.messages() < count:
            await trio.sleep(0.05)


async def profile(args: argparse.Namespace) -> tuple[float, list[Path]]:
    """(CPU ms per message, the py-spy files)."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists() or not Path(SMTP_SOURCE).exists():
        raise SystemExit("bench.profile needs py-spy (the bench extra) and smtp-source "
                         "(make sysdeps)")
    args.out.mkdir(parents=True, exist_ok=True)
    async with _SmtpSink() as sink, RelayPeer(
            PeerSetup(sink_port=sink.port, workers=args.workers)) as peer:
        await load(peer.port, 2000, args)  # warm up: connections, caches, LMDB pages
        await _until_sink_has(sink, 2000, 60)
        before, t0 = sample_tree(peer.root_pids()), time.monotonic()
        await load(peer.port, args.messages, args)
        await _until_sink_has(sink, 2000 + args.messages, 120)
        after, t1 = sample_tree(peer.root_pids()), time.monotonic()
        cpu_ms = (after.cpu_seconds - before.cpu_seconds) * 1000 / args.messages
        print(f"{args.messages} messages in {t1 - t0:.1f} s ({args.messages / (t1 - t0):,.0f}"
              f" msg/s), relay CPU {cpu_ms:.3f} ms per message", flush=True)
        files = []
        async with trio.open_nursery() as nursery:
            nursery.start_soon(load, peer.port, 10_000_000, args)
            await trio.sleep(1)  # the load is up
            procs = []
            for pid in children(peer.root_pids()[0]):  # the workers
                path = args.out / f"{args.label}-worker{pid}.txt"
                files.append(path)
                procs.append(await trio.lowlevel.open_process(
                    [py_spy, "record", "-p", str(pid), "-r", str(args.rate), "-d",
                     str(args.seconds), "-f", "raw", "-o", str(path)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for proc in procs:
                await proc.wait()
            nursery.cancel_scope.cancel()
    return cpu_ms, files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(ap)
    ap.add_argument("--workers", type=int, default=1, help="relay workers (1)")
    ap.add_argument("--seconds", type=int, default=12, help="profile length (12)")
    ap.add_argument("--rate", type=int, default=250, help="samples per second (250)")
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "relay-profile")
    ap.add_argument("--label", default="profile", help="file name prefix of the profiles")
    ap.add_argument("--layers", type=Path, nargs="*", metavar="FILE",
                    help="only print the table of kept py-spy raw files")
    ap.add_argument("--cpu-ms", type=float, help="with --layers: CPU ms/msg to spread")
    args = ap.parse_args(argv)
    if args.layers:
        cpu_ms, files = args.cpu_ms, args.layers
    else:
        cpu_ms, files = trio.run(profile, args)
    lines = [line for f in files for line in f.read_text().splitlines()]
    print(format_layers(*layer_shares(lines), cpu_ms))
    print("profiles:", " ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
