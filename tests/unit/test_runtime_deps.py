"""`make run` installs only what the relay needs to run; tests and benchmarks are extras.

- Every module of the relay package imports with the test and bench extras' packages
  made unimportable (a ``sys.meta_path`` finder that refuses them, in a subprocess), so
  an install of ``pip install -e .`` alone can run it. (A function-level import of an
  extra, like ``relay report --chart``'s matplotlib, must handle its absence itself.)
- The Makefile's layers (``make -n`` in a copy of the repository's build files): a fresh
  ``make run`` makes the venv and installs ``.`` only; a fresh ``make test`` adds
  ``.[test]`` on top, ``make bench`` ``.[bench]``; ``make run`` after ``make test``
  installs nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

BLOCKED_IMPORTS = """
import importlib, importlib.abc, json, pkgutil, sys
blocked = set(json.loads(sys.argv[1]))

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{name} is a test/bench dependency")
        return None

sys.meta_path.insert(0, Refuse())
import relay
names = [m.name for m in pkgutil.walk_packages(relay.__path__, "relay.")]
for name in names:
    importlib.import_module(name)
print(json.dumps(names))
"""


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def extras_only_modules() -> set[str]:
    """Top-level modules that only the test/bench extras provide."""
    from importlib.metadata import packages_distributions

    runtime = {_name(r) for r in PYPROJECT["project"]["dependencies"]}
    extras = {_name(r) for group in ("test", "bench")
              for r in PYPROJECT["project"]["optional-dependencies"][group]} - runtime
    modules = set()
    for module, dists in packages_distributions().items():
        names = {d.lower().replace("_", "-") for d in dists}
        if names and names <= extras and not module.startswith("_"):
            modules.add(module)
    return modules


def test_the_relay_imports_no_test_or_bench_dependency() -> None:
    blocked = extras_only_modules()
    assert {"pytest", "hypothesis", "trustme", "matplotlib"} <= blocked  # the test bites
    result = subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS, json.dumps(sorted(blocked))],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    imported = json.loads(result.stdout)
    assert {"relay.cli", "relay.worker", "relay.supervisor", "relay.privileges"} <= set(imported)


def build_tree(tmp: Path) -> Path:
    """The files `make` reads, in a fresh directory."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp / name)
    shutil.copytree(ROOT / "scripts", tmp / "scripts")
    return tmp


def make_n(tree: Path, target: str) -> list[str]:
    # Run from `make test` itself, the parent make's MAKELEVEL/MAKEFLAGS would make this
    # one print "make[1]: Entering directory ..." lines (and share its jobserver).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    result = subprocess.run(["make", "--no-print-directory", "-n", target],
                            capture_output=True, text=True, timeout=60, cwd=tree, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def installs(lines: list[str]) -> list[str]:
    return [line.split(" -e ", 1)[1] for line in lines if "pip install -q -e " in line]


def test_a_fresh_make_run_installs_only_the_runtime(tmp_path: Path) -> None:
    tree = build_tree(tmp_path)
    lines = make_n(tree, "run")
    assert any("-m venv" in line for line in lines)
    assert installs(lines) == ["."]
    assert lines[-1].endswith("relay serve --config conf/relay.toml")


def test_a_fresh_make_test_and_make_bench_add_their_extras(tmp_path: Path) -> None:
    tree = build_tree(tmp_path)
    assert installs(make_n(tree, "test")) == [".", "'.[test]'"]
    assert installs(make_n(tree, "bench")) == [".", "'.[bench]'"]


def test_make_run_after_make_test_installs_nothing(tmp_path: Path) -> None:
    tree = build_tree(tmp_path)
    venv_bin = tree / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    # The same interpreter as `make` picks, so the venv counts as made by it.
    picked = subprocess.run(["scripts/pick-python"], capture_output=True, text=True,
                            cwd=tree, check=True).stdout.strip()
    (venv_bin / "python").symlink_to(shutil.which(picked) or picked)
    now = time.time()
    for age, stamp in enumerate(reversed([".made", ".installed", ".installed-test"])):
        path = tree / ".venv" / stamp
        path.touch()
        os.utime(path, (now - age, now - age))  # made, then runtime, then test
    os.utime(tree / "pyproject.toml", (now - 10, now - 10))
    lines = make_n(tree, "run")
    assert lines == [".venv/bin/relay serve --config conf/relay.toml"]
    assert installs(make_n(tree, "test")) == []
    assert installs(make_n(tree, "bench")) == ["'.[bench]'"]
    # A changed pyproject.toml redoes the runtime layer (and the test layer above it).
    os.utime(tree / "pyproject.toml", (now + 5, now + 5))
    assert installs(make_n(tree, "test")) == [".", "'.[test]'"]
