"""`relay check-config --explain DOMAIN` against a real dnsmasq: the destination, every
effective limit and the table it comes from, and a member's own caps in a provider."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

try:  # tests/integration may or may not be a package; the fixture module is a sibling.
    from tests.integration import dnsmasq as _dnsmasq
except ImportError:
    import dnsmasq as _dnsmasq  # type: ignore[no-redef]

dnsmasq = _dnsmasq.dnsmasq


def explain(tmp_path: Path, config: str, *domains: str) -> list[str]:
    path = tmp_path / "relay.toml"
    path.write_text(config)
    args = [a for d in domains for a in ("--explain", d)]
    result = subprocess.run([sys.executable, "-m", "relay.cli", "check-config", str(path),
                             *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()[1:]


def test_a_provider_member_shows_the_shared_limits_and_its_own_share(tmp_path, dnsmasq):
    dns = dnsmasq(mx={"hosted.test": [(10, "aspmx.l.mail.test"), (20, "alt1.mail.test")],
                      "own.test": [(10, "mx.own.test")]})
    out = explain(tmp_path, f"""
[spool]
path = "spool"
[log]
events = ""
[outbound]
resolvers = ["{dns.nameserver}"]
[outbound.default]
max_connections = 7
[outbound.providers."mailco"]
match_mx = ["*.mail.test"]
max_connections = 20
max_message_rate = "3000/min"
[outbound.domains."hosted.test"]
max_message_rate = "60/min"
retry_interval = 60.0
""", "Hosted.Test", "own.test")
    assert out[0] == ("hosted.test: destination provider:mailco, delivered to its MX hosts "
                      "aspmx.l.mail.test, alt1.mail.test")
    assert "  max_connections = 20                  [outbound.providers.mailco]" in out
    assert "  max_message_rate = \"3000/min\"         [outbound.providers.mailco]" in out
    assert "  retry_interval = 300.0                built-in default" in out  # provider's
    assert ("  (every MX host matches [outbound.providers.mailco] match_mx: its limits are "
            "shared by all the provider's domains)") in out
    assert "  hosted.test's own share of provider:mailco (the stricter wins):" in out
    assert "    max_message_rate = \"60/min\"         [outbound.domains.\"hosted.test\"]" in out
    own = out[out.index("own.test: destination own.test, delivered to its MX hosts mx.own.test"):]
    assert "  max_connections = 7                   [outbound.default]" in own
