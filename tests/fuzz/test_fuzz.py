"""The fuzz targets in the suite (see tests/fuzz/README.md).

(a) Every file of ``tests/fuzz/corpus/<target>/`` and ``tests/fuzz/crashes/<target>/`` is
    replayed through its target without atheris: deterministic regression cases (a
    reproducer stays in crashes/ for ever and fails here until the bug is fixed).
(b) Each target gets a short coverage-guided atheris run in a subprocess (a few seconds,
    new inputs discarded, reproducers into a temporary dir) that fails on any finding.
"""

from __future__ import annotations

import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from tests.fuzz.run import CORPUS, CRASHES, FINDING_PREFIXES, NAMES, ROOT
from tests.fuzz.seeds import write_seeds
from tests.fuzz.targets import TARGETS, finding_key

#: Seconds of fuzzing per target in (b): 7 targets stay well under 40 s together.
SHORT_RUN_SECONDS = 4


def _files(base: Path, name: str) -> list[Path]:
    d = base / name
    return sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")) \
        if d.is_dir() else []


def _replay(files: list[Path], name: str) -> list[str]:
    failures = []
    for f in files:
        try:
            TARGETS[name](f.read_bytes())
        except Exception as e:
            failures.append(f"{f.relative_to(ROOT)}: {finding_key(e)}\n"
                            + "".join(traceback.format_exception(e)[-10:]))
    return failures


def test_every_target_has_a_corpus() -> None:
    assert set(TARGETS) == set(NAMES)
    for name in NAMES:
        assert any(f.name.startswith("seed-") for f in _files(CORPUS, name)), name


def test_seeds_are_in_the_corpus(tmp_path: Path) -> None:
    """The hand-made seeds (tests/fuzz/seeds.py) are committed as they are generated
    (snapshots of conf/ may lag behind it: the config fuzzer reads conf/ itself)."""
    write_seeds(tmp_path)
    for name in NAMES:
        for seed in _files(tmp_path, name):
            if seed.name.startswith("seed-conf-"):
                continue
            kept = CORPUS / name / seed.name
            assert kept.is_file() and kept.read_bytes() == seed.read_bytes(), (
                f"{kept} differs from tests/fuzz/seeds.py: run python -m tests.fuzz --write-seeds")


@pytest.mark.parametrize("name", NAMES)
def test_corpus_replays_cleanly(name: str) -> None:
    files = _files(CORPUS, name)
    failures = _replay(files, name)
    assert not failures, f"{len(failures)} of {len(files)} corpus inputs fail:\n" + "\n".join(
        failures[:5])


@pytest.mark.parametrize("name", NAMES)
def test_crash_reproducers_stay_fixed(name: str) -> None:
    failures = _replay(_files(CRASHES, name), name)
    assert not failures, "reproducers that still fail:\n" + "\n".join(failures)


@pytest.mark.parametrize("name", NAMES)
def test_short_fuzzing_run(name: str, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "tests.fuzz", "--seconds", str(SHORT_RUN_SECONDS),
           "--target", name, "--crash-dir", str(tmp_path / "crashes"),
           "--log-dir", str(tmp_path / "logs")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                       timeout=SHORT_RUN_SECONDS * 3 + 60, check=False)
    found = [f for f in (tmp_path / "crashes" / name).glob("*")
             if f.name.startswith(FINDING_PREFIXES)]
    detail = "\n".join(f"{f}: {f.read_bytes()[:600]!r}" for f in found)
    assert p.returncode == 0 and not found, (
        f"fuzzing {name} found something (keep a reproducer as a regression case: copy it "
        f"to tests/fuzz/crashes/{name}/):\n{detail}\n{p.stdout[-4000:]}\n{p.stderr[-2000:]}")
