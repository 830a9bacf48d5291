"""The layout's promises that an import can break: the protocol core stands alone."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

RELAY = Path(__file__).resolve().parents[2] / "relay"


def relay_imports(path: Path) -> set[str]:
    """Every ``relay...`` module a file imports (including TYPE_CHECKING-only ones)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("relay"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("relay"))
    return out


def test_the_protocol_core_imports_only_the_model() -> None:
    for path in sorted((RELAY / "smtp").glob("*.py")):
        foreign = {m for m in relay_imports(path)
                   if not (m == "relay.model" or m.startswith("relay.smtp"))}
        assert not foreign, f"{path.name} imports {sorted(foreign)}"


def test_the_model_imports_nothing_of_relay() -> None:
    assert relay_imports(RELAY / "model.py") == set()


def test_importing_the_protocol_core_loads_no_trio_and_no_lmdb() -> None:
    code = ("import json, sys, relay.smtp.server, relay.smtp.client; "
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    loaded = set(json.loads(out))
    assert not {m for m in loaded if m.split(".")[0] in ("trio", "lmdb", "dns")}, loaded
    assert {m for m in loaded if m.startswith("relay")} <= {
        "relay", "relay.model", "relay.smtp", "relay.smtp.address", "relay.smtp.client",
        "relay.smtp.events", "relay.smtp.lines", "relay.smtp.replies", "relay.smtp.server"}


def test_the_injection_payload_layer_is_pure() -> None:
    # Decoding, templating and MIME building run in a worker thread for every request:
    # no trio, no spool, no sockets, so they can be tested and fuzzed without either.
    code = ("import json, sys, relay.http.sparkpost, relay.http.kumo; "
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    loaded = set(json.loads(out))
    assert not {m for m in loaded if m.split(".")[0] in ("trio", "lmdb", "dns", "h11")}
    relay_modules = {m for m in loaded if m.startswith("relay")}
    assert relay_modules <= {"relay", "relay.model", "relay.http", "relay.http.payload",
                             "relay.http.templates", "relay.http.compose",
                             "relay.http.sparkpost", "relay.http.kumo"} | {
        m for m in relay_modules if m.startswith("relay.smtp")}, relay_modules
