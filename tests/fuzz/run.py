"""Run the atheris fuzz targets: ``python -m tests.fuzz [--seconds N] [--target NAME ...]``
(``tests/fuzz/__main__.py`` calls ``main`` here).

Each target runs in its own subprocess (``--child NAME``, internal), which imports
``relay`` inside ``atheris.instrument_imports()`` and hands libFuzzer:

* a fresh temporary corpus dir (where libFuzzer writes the inputs it finds) followed by
  the repo corpus ``tests/fuzz/corpus/<target>/`` (read only: the seeds; for ``config``
  also ``conf/``, so the shipped files seed it as they are now);
* ``-artifact_prefix=<crash dir>/<target>/`` (default ``tests/fuzz/crashes/``) for
  reproducers, ``-max_len``, ``-timeout``, the dictionary ``tests/fuzz/dicts/<target>.dict``.

With ``--merge`` the new inputs that add coverage are merged into the repo corpus
afterwards (libFuzzer ``-merge=1``), for the developer to commit: that is ``make fuzz``.
Without it the repo corpus is left untouched (``make test``).

Exit status: 0 when no target produced a reproducer, 1 otherwise (the reproducers are
listed with the invariant key and the traceback), 2 on a usage or setup error.

``--mute KEY`` (repeatable) makes the child ignore one known finding (a key as
printed, e.g. ``dsn:bare-cr-lf-original``) so a long run can look for the others while
a fix is pending; ``--write-seeds`` rewrites the hand-written seeds (tests/fuzz/seeds.py);
``--replay FILE...`` runs inputs through a target without atheris and prints what they
raise.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CORPUS = HERE / "corpus"
CRASHES = HERE / "crashes"
DICTS = HERE / "dicts"
NAMES = ("server", "client", "address", "replies", "dsn", "config", "injection")
MUTE_ENV = "RELAY_FUZZ_MUTE"
#: Read-only seed dirs besides the corpus.
EXTRA_SEEDS = {"config": [ROOT / "conf"]}
#: libFuzzer artifact kinds that are findings (slow-unit-* is only a note).
FINDING_PREFIXES = ("crash-", "timeout-", "oom-", "leak-")
KEY_MARK = "relay-fuzz finding: "
#: Seconds one input may take before libFuzzer calls it a hang.
INPUT_TIMEOUT = 20

_STATS_RE = re.compile(
    r"^#(\d+)\s+(?:INITED|NEW|REDUCE|pulse|DONE|RELOAD)\s+(?:cov: (\d+) ft: (\d+) )?"
    r"(?:corp: (\d+)/(\S+) )?.*?exec/s: (\d+)", re.M)


# -- child: one target under atheris --------------------------------------------------------


def child(name: str, libfuzzer_args: list[str]) -> None:
    import atheris  # only the child needs it

    with atheris.instrument_imports(include=["relay"]):
        from tests.fuzz import targets  # imports relay: instrumented

    fn = targets.TARGETS[name]
    mute = frozenset(filter(None, os.environ.get(MUTE_ENV, "").split(",")))

    def one(data: bytes) -> None:
        try:
            fn(data)
        except Exception as e:
            key = targets.finding_key(e)
            if key in mute:
                return
            print(f"\n{KEY_MARK}{key}", file=sys.stderr, flush=True)
            raise

    # argv[0] is what libFuzzer re-executes (through sh) for -merge: this same child.
    argv0 = f"{shlex.quote(sys.executable)} -m tests.fuzz --child {name}"
    atheris.Setup([argv0, *libfuzzer_args], one)
    atheris.Fuzz()


# -- parent -------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    seconds: float = 0.0
    cpu: float = 0.0
    execs: int = 0
    exec_per_s: int = 0
    cov: int = 0
    ft: int = 0
    corpus_files: int = 0
    merged: int = 0
    dropped: int = 0
    unmerged: Path | None = None
    returncode: int = 0
    findings: list[Path] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    log: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.findings and self.returncode == 0


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _child_cmd(name: str) -> list[str]:
    return [sys.executable, "-m", "tests.fuzz", "--child", name]


def _common_flags(name: str) -> list[str]:
    from tests.fuzz.targets import MAX_LEN

    flags = [f"-max_len={MAX_LEN[name]}", f"-timeout={INPUT_TIMEOUT}", "-rss_limit_mb=2048"]
    d = DICTS / f"{name}.dict"
    if d.exists():
        flags.append(f"-dict={d}")
    return flags


def run_target(name: str, seconds: int, *, crash_dir: Path, log_dir: Path, merge: bool,
               mute: list[str]) -> Result:
    res = Result(name)
    corpus = CORPUS / name
    corpus.mkdir(parents=True, exist_ok=True)
    crashes = crash_dir / name
    crashes.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    res.log = log_dir / f"{name}.log"
    env = dict(os.environ)
    env[MUTE_ENV] = ",".join(mute)
    before = {p.name for p in crashes.iterdir()}
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as new:
        cmd = [*_child_cmd(name), *_common_flags(name), f"-max_total_time={seconds}",
               f"-artifact_prefix={crashes}/", "-print_final_stats=1", new, str(corpus),
               *(str(d) for d in EXTRA_SEEDS.get(name, ()))]
        cpu0, t0 = _children_cpu(), time.monotonic()
        with open(res.log, "wb") as log:
            log.write(("$ " + shlex.join(cmd) + "\n").encode())
            log.flush()
            try:
                p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   timeout=seconds * 2 + 120, check=False)
                res.returncode = p.returncode
            except subprocess.TimeoutExpired:
                res.returncode = -1
        res.seconds = time.monotonic() - t0
        res.cpu = _children_cpu() - cpu0
        text = res.log.read_text("utf-8", "replace")
        stats = _STATS_RE.findall(text)
        if stats:
            execs, cov, ft, corp, _size, eps = stats[-1]
            res.execs, res.exec_per_s = int(execs), int(eps)
            res.cov, res.ft = int(cov or 0), int(ft or 0)
            res.corpus_files = int(corp or 0)
        m = re.search(r"^stat::number_of_executed_units: (\d+)", text, re.M)
        if m:
            res.execs = int(m.group(1))
        m = re.search(r"^stat::average_exec_per_sec:\s+(\d+)", text, re.M)
        if m:
            res.exec_per_s = int(m.group(1))
        res.keys = [line.partition(KEY_MARK)[2].strip()
                    for line in text.splitlines() if KEY_MARK in line]
        res.findings = sorted(p for p in crashes.iterdir()
                              if p.name not in before and p.name.startswith(FINDING_PREFIXES))
        if merge:
            kept = {p.name for p in corpus.iterdir()}
            mcmd = [*_child_cmd(name), *_common_flags(name), "-merge=1", str(corpus), new]
            cpu0 = _children_cpu()
            with open(res.log, "ab") as log:
                log.write(("\n$ " + shlex.join(mcmd) + "\n").encode())
                log.flush()
                mp = subprocess.run(mcmd, cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, timeout=seconds + 600, check=False)
            res.cpu += _children_cpu() - cpu0
            if mp.returncode != 0:
                # Keep what was found for another try (-merge=1 CORPUS THAT_DIR).
                res.unmerged = log_dir / f"{name}-unmerged"
                shutil.copytree(new, res.unmerged, dirs_exist_ok=True)
                res.returncode = res.returncode or mp.returncode
            added = [p for p in corpus.iterdir() if p.name not in kept]
            res.dropped = _drop_failing(name, added)
            res.merged = len(added) - res.dropped
    return res


def _drop_failing(name: str, files: list[Path]) -> int:
    """Remove merged inputs that fail their target unmuted (a muted finding lets them
    through the fuzzer and the merge): the repo corpus must replay cleanly."""
    from tests.fuzz.targets import TARGETS

    dropped = 0
    for f in files:
        try:
            TARGETS[name](f.read_bytes())
        except Exception:
            f.unlink()
            dropped += 1
    return dropped


def _traceback_of(log: Path) -> str:
    """The Python traceback libFuzzer's child printed, for the report."""
    text = log.read_text("utf-8", "replace")
    start = text.rfind("=== Uncaught Python exception: ===")
    if start < 0:
        lines = text.splitlines()
        return "\n".join(lines[-30:])
    end = text.find("==", start + 40)
    return text[start: end if end > 0 else start + 6000].strip()


def report(results: list[Result]) -> None:
    print("\ntarget    cpu s  execs      exec/s  cov    ft     corpus  merged  result")
    for r in results:
        status = "ok" if r.ok else (f"FOUND {len(r.findings)}" if r.findings
                                    else f"exit {r.returncode}")
        print(f"{r.name:<9} {r.cpu:6.1f}  {r.execs:<10} {r.exec_per_s:<7} {r.cov:<6} {r.ft:<6} "
              f"{r.corpus_files:<7} {r.merged:<7} {status}")
    for r in results:
        if r.ok:
            continue
        print(f"\n== {r.name}: {', '.join(sorted(set(r.keys))) or 'see log'} (log {r.log})")
        if r.unmerged is not None:
            print(f"merge failed: the new inputs are kept in {r.unmerged}")
        for f in r.findings:
            print(f"reproducer: {f}")
        if r.log is not None:
            print(_traceback_of(r.log))


def replay(name: str, files: list[str]) -> int:
    import traceback

    from tests.fuzz.targets import TARGETS, finding_key

    bad = 0
    for f in files:
        try:
            TARGETS[name](Path(f).read_bytes())
        except Exception as e:
            bad += 1
            print(f"{f}: {finding_key(e)}")
            traceback.print_exc()
        else:
            print(f"{f}: ok")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--child"]:
        child(args[1], args[2:])
        return 0
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=10, help="per target (default 10)")
    ap.add_argument("--target", action="append", default=[],
                    help=f"one of {', '.join(NAMES)} (repeatable or comma-separated; "
                         "default: all)")
    ap.add_argument("--merge", action="store_true",
                    help="merge new coverage into tests/fuzz/corpus/<target>/")
    ap.add_argument("--crash-dir", type=Path, default=CRASHES,
                    help="where reproducers go, per target (default tests/fuzz/crashes)")
    ap.add_argument("--log-dir", type=Path, default=ROOT / "var" / "fuzz",
                    help="libFuzzer output per target (default var/fuzz)")
    ap.add_argument("--mute", action="append", default=[], metavar="KEY",
                    help="ignore a known finding by its key (repeatable)")
    ap.add_argument("--write-seeds", action="store_true",
                    help="(re)write the hand-made seeds into the corpus and exit")
    ap.add_argument("--replay", nargs="+", metavar="FILE",
                    help="run FILEs through --target (one) without atheris and exit")
    opts = ap.parse_args(args)
    names = [n for t in opts.target for n in t.split(",") if n] or list(NAMES)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        ap.error(f"unknown target(s) {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    if opts.write_seeds:
        from tests.fuzz.seeds import write_seeds

        for name, n in write_seeds(CORPUS).items():
            print(f"{name}: {n} seeds")
        return 0
    if opts.replay:
        if len(names) != 1:
            ap.error("--replay needs exactly one --target")
        return replay(names[0], opts.replay)
    try:
        import atheris  # noqa: F401
    except ImportError as e:
        print(f"atheris is not installed ({e}): pip install 'atheris>=2.3'", file=sys.stderr)
        return 2
    results = []
    for name in names:
        print(f"fuzzing {name} for {opts.seconds}s ...", flush=True)
        results.append(run_target(name, opts.seconds, crash_dir=opts.crash_dir.resolve(),
                                  log_dir=opts.log_dir.resolve(), merge=opts.merge,
                                  mute=opts.mute))
    report(results)
    return 0 if all(r.ok for r in results) else 1


