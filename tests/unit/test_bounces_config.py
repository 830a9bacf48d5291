"""[bounces]: the bounce domain, its secret (inline or a file next to the config),
complaint addresses and Feedback-ID; errors name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import ConfigError, decode_config, load_config

SECRET = "0123456789abcdef"


@pytest.mark.parametrize(("toml", "error"), [
    ('domain = "bounces.example.com"', "bounces.secret: needed with bounces.domain set"),
    (f'domain = "bad domain"\nsecret = "{SECRET}"', 'bounces.domain: "bad domain" is not'),
    ('domain = "b.example.com"\nsecret = "short"', "bounces.secret: needs at least 16"),
    (f'domain = "b.example.com"\nsecret = "{SECRET}"\nsecret_file = "s"',
     "bounces.secret/secret_file: set one, not both"),
    ('complaint_addresses = ["fbl@b.example.com"]',
     "bounces.complaint_addresses: needs bounces.domain"),
    (f'domain = "b.example.com"\nsecret = "{SECRET}"\ncomplaint_addresses = ["fbl"]',
     'bounces.complaint_addresses[0]: "fbl" is not an address'),
    (f'domain = "b.example.com"\nsecret = "{SECRET}"\nfeedback_id = "a:b"',
     'bounces.feedback_id: "a:b" must not contain a colon'),
    ('auto_suppress = "yes"', "bounces.auto_suppress: expected"),
])
def test_errors_name_the_key(toml: str, error: str) -> None:
    with pytest.raises(ConfigError) as e:
        decode_config(f"[bounces]\n{toml}\n", "relay.toml")
    assert str(e.value).startswith(f"relay.toml: {error}"), str(e.value)


def test_a_complete_section() -> None:
    cfg = decode_config(f"""
[bounces]
domain = "Bounces.Example.com"
secret = "{SECRET}"
complaint_addresses = ["fbl@bounces.example.com"]
feedback_id = "relay1"
auto_suppress = true
[bounces.suppress]
"Mailbox Full" = {{ when = "2/1d", expires = "30d" }}
complaint = "never"
""", "relay.toml")
    b = cfg.bounces
    assert (b.domain, b.secret, b.auto_suppress, b.feedback_id) == (
        "Bounces.Example.com", SECRET, True, "relay1")
    assert b.suppress["complaint"] == "never"


def test_the_secret_file_is_read_relative_to_the_config(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "bounce.secret").write_text(f"  {SECRET}-from-file\n")
    path = conf / "relay.toml"
    path.write_text('[bounces]\ndomain = "b.example.com"\nsecret_file = "bounce.secret"\n')
    cfg = load_config(path)
    assert cfg.bounces.secret == f"{SECRET}-from-file"
    assert cfg.bounces.secret_file == str(conf / "bounce.secret")
    (conf / "bounce.secret").write_text("short\n")
    with pytest.raises(ConfigError, match=r"bounces.secret_file: .* fewer than 16"):
        load_config(path)
    (conf / "bounce.secret").unlink()
    with pytest.raises(ConfigError, match=r"relay.toml: bounces.secret_file: cannot read .*"
                                          r"bounce.secret: No such file"):
        load_config(path)
