"""Every shipped example passes `relay check-config` on a fresh machine.

A fresh machine is simulated by moving the example's absolute paths (/etc/..., /var/...)
under a temp dir that holds nothing yet, so the check creates (and removes again) the
spool and log directories there, never under the real /var.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import trustme

from relay.config import load_config
from tests.integration.relayproc import RELAY

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "conf" / "examples").glob("*.toml"))


def _fresh_machine(text: str, root: Path) -> str:
    """The config with every absolute path moved under ``root``."""
    return re.sub(r'"(/[^"]*)"', lambda m: f'"{root}{m.group(1)}"', text)


def _check_config(tmp: Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RELAY, "check-config", str(config)], capture_output=True,
                          text=True, timeout=60, cwd=tmp)


def _ok_line(config: Path) -> str:
    cfg = load_config(config)
    n = cfg.server.resolved_workers()
    return (f"{config}: OK ({n} worker{'' if n == 1 else 's'}, listening on "
            f"{', '.join(cfg.inbound.listen)}, spool {cfg.spool.path})\n")


def test_there_are_examples() -> None:
    assert "bulk-sender.toml" in [p.name for p in EXAMPLES]  # the glob is not empty


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_check_config_as_shipped(tmp_path: Path, example: Path) -> None:
    root = tmp_path / "fresh"
    root.mkdir()
    config = tmp_path / example.name
    config.write_text(_fresh_machine(example.read_text(), root))
    result = _check_config(tmp_path, config)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == _ok_line(config)
    assert list(root.iterdir()) == []  # the check left nothing behind


def test_bulk_sender_tls_lines_work_once_the_certificate_is_there(tmp_path: Path) -> None:
    """The example ships its STARTTLS lines commented out, because check-config refuses
    TLS files that cannot be read; uncommented, they need only the files."""
    root = tmp_path / "fresh"
    root.mkdir()
    text = _fresh_machine((ROOT / "conf" / "examples" / "bulk-sender.toml").read_text(), root)
    enabled, n = re.subn(r"^# (tls_cert|tls_key) = ", r"\1 = ", text, flags=re.MULTILINE)
    assert n == 2
    config = tmp_path / "bulk-sender.toml"
    config.write_text(enabled)
    pem, key = root / "etc/relay/tls/mta1.pem", root / "etc/relay/tls/mta1.key"

    without_files = _check_config(tmp_path, config)
    assert (without_files.returncode, without_files.stdout) == (78, "")
    assert without_files.stderr.splitlines() == [
        f"relay: {config}: inbound.tls_cert: cannot read {pem}: No such file or directory",
        f"relay: {config}: inbound.tls_key: cannot read {key}: No such file or directory",
    ]

    pem.parent.mkdir(parents=True)
    cert = trustme.CA().issue_cert("mta1.mail.example.com")
    cert.cert_chain_pems[0].write_to_path(str(pem))
    cert.private_key_pem.write_to_path(str(key))
    with_files = _check_config(tmp_path, config)
    assert (with_files.returncode, with_files.stderr) == (0, "")
    assert with_files.stdout == _ok_line(config)
