"""Resource measurement of a server process tree, from /proc (Linux only).

Why /proc and not cgroups: the bench runs on a fresh machine without privileges to set up
cgroups for Postfix's daemonised master. The tree of a root pid (relay supervisor, Postfix
master) is found from the ppid links in /proc/*/stat.

CPU seconds: the sum over live processes of the tree of utime+stime+cutime+cstime. A
child that exited and was reaped has its time folded into its parent's cutime/cstime, so
this sum never counts a process twice and never loses a reaped one (Postfix's smtpd and
cleanup processes come and go). Peak RSS: the largest sampled sum over the tree of each
process's PSS (proportional set size: a page shared by n processes counts 1/n in each),
so a hundred Postfix daemons sharing libc are not counted a hundred times; VmRSS is the
fallback where smaps_rollup is unavailable.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TreeSample", "children", "dir_bytes", "percentile", "process_alive", "sample_tree"]

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class TreeSample:
    cpu_seconds: float
    rss_bytes: int
    processes: int


def _read_stat(pid: int) -> tuple[int, float, int] | None:
    """(ppid, cpu seconds incl. reaped children, rss bytes) or None if gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2 :].split()
    # fields[0] is state (field 3); ppid field 4; utime 14, stime 15, cutime 16, cstime 17;
    # rss 24 (pages).
    ppid = int(fields[1])
    ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    rss = int(fields[21]) * _PAGE
    return ppid, ticks / _TICK, rss


def children(pid: int) -> list[int]:
    """The live direct children of ``pid`` (from the ppid links in /proc)."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _read_stat(int(name))
            if st is not None and st[0] == pid:
                found.append(int(name))
    return found


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a zombie is dead for our purposes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _pss(pid: int) -> int:
    """Proportional set size (shared pages divided among their users), 0 if unknown."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def sample_tree(roots: list[int]) -> TreeSample:
    """CPU seconds and RSS of ``roots`` and all their descendants right now."""
    if not roots:
        return TreeSample(0.0, 0, 0)
    stats: dict[int, tuple[int, float, int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _read_stat(int(name))
            if st is not None:
                stats[int(name)] = st
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    cpu, rss, n = 0.0, 0, 0
    todo = [r for r in roots if r in stats]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        _, c, r = stats[pid]
        cpu += c
        rss += _pss(pid) or r
        n += 1
        todo.extend(children.get(pid, []))
    return TreeSample(cpu, rss, n)


def dir_bytes(path: Path | None) -> int:
    """Bytes allocated on disk under ``path`` (st_blocks, so sparse LMDB files count
    only the pages really written)."""
    if path is None or not path.exists():
        return 0
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_blocks * 512
    return total


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; NaN when empty."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]
