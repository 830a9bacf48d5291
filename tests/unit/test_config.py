"""Config decoding: defaults, the embedded file, and errors that name file and key."""

from pathlib import Path

import pytest

from relay.config import ConfigError, decode_config, load_config, parse_rate, parse_size

ROOT = Path(__file__).resolve().parents[2]


def test_embedded_default_config_is_valid_and_matches_builtin_defaults() -> None:
    cfg = load_config(ROOT / "conf" / "relay.toml")
    assert cfg.inbound.listen == ["127.0.0.1:2525"]
    assert cfg.spool.path == "var/spool"
    empty = decode_config(b"")
    # The file documents the defaults: decoding nothing must give the same throttles.
    assert cfg.outbound.throttle_for("x.test") == empty.outbound.throttle_for("x.test")
    assert cfg.inbound == empty.inbound


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (b'[inbound]\nmax_recipients = "x"\n', "x.toml: inbound.max_recipients: Expected `int`"),
        (b"[inbound]\nmax_recipients = 99\n", "inbound.max_recipients: Expected `int` >= 100"),
        (b"[inbound]\nmax_recipientz = 5\n", "x.toml: inbound.max_recipientz: unknown key"),
        (b"bogus = 1\n", "x.toml: bogus: unknown key"),
        (b'[relay]\nallow_networks = ["10.0.0.0/33"]\n', "relay.allow_networks[0]:"),
        (
            b'[outbound.domains."*.example.com"]\nmax_message_rate = "5/fortnight"\n',
            "outbound.domains.'*.example.com'.max_message_rate: invalid rate",
        ),
        (b'[inbound]\ntls_cert = "a.pem"\n', "inbound.tls_cert/tls_key"),
        (b"[inbound\n", "x.toml: not valid TOML"),
        # Unicode digits pass str.isdigit() and \\d: config numbers are ASCII only.
        ('[inbound]\nmax_message_size = "\u00b2MiB"\n'.encode(), "inbound.max_message_size:"),
        ('[inbound]\nmax_message_size = "\u0663"\n'.encode(), "inbound.max_message_size:"),
        ('[inbound]\nlisten = ["127.0.0.1:\u00b25"]\n'.encode(),
         "inbound.listen[0]: invalid port"),
        ('[outbound]\nsmart_host = "mx.test:\u0662\u0665"\n'.encode(),
         "outbound.smart_host: invalid port"),
        ('[outbound.default]\nmax_message_rate = "\u0661\u0660/min"\n'.encode(),
         "outbound.default.max_message_rate: invalid rate"),
        (b'[inbound]\nbare_newline = "fix"\n', "inbound.bare_newline:"),
        (b'[[inbound.auth_users]]\nusername = "a"\npassword = "scrypt$\xc2\xb2$8$1$AA==$AA=="\n',
         "inbound.auth_users[0].password: not a scrypt hash"),
        (b'[[inbound.auth_users]]\nusername = "a"\npassword = "scrypt$16384$8$1$!!$AA=="\n',
         "inbound.auth_users[0].password: salt or hash is not valid base64"),
        (b'[[inbound.auth_users]]\nusername = "a"\npassword = "md5$x"\n',
         "inbound.auth_users[0].password: must start with"),
    ],
)
def test_errors_name_the_file_and_the_key(toml: bytes, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        decode_config(toml, "conf/x.toml")
    assert expected in str(e.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.toml")


def test_throttle_layers_default_wildcard_exact() -> None:
    cfg = decode_config(
        b"[outbound.default]\nmax_connections = 7\n"
        b'[outbound.domains."*.example.com"]\nmax_message_rate = "60/min"\nmax_connections = 3\n'
        b'[outbound.domains."a.example.com"]\nmax_connections = 1\n'
    )
    assert cfg.outbound.throttle_for("other.test").max_connections == 7
    sub = cfg.outbound.throttle_for("b.example.com")
    assert (sub.max_connections, sub.max_message_rate) == (3, "60/min")
    exact = cfg.outbound.throttle_for("A.Example.COM.")
    assert (exact.max_connections, exact.max_message_rate) == (1, "60/min")
    # A wildcard does not match the bare parent domain.
    assert cfg.outbound.throttle_for("example.com").max_connections == 7


def test_size_and_rate_parsing() -> None:
    assert parse_size("10MiB") == 10 * 1024 * 1024
    assert parse_size("512K") == 512 * 1024
    assert parse_size(123) == 123
    assert parse_rate("300/min") == 5.0
    assert parse_rate("5/10s") == 0.5
    with pytest.raises(ValueError):
        parse_size("ten")


@pytest.mark.parametrize("path", sorted((ROOT / "conf" / "examples").glob("*.toml")),
                         ids=lambda p: p.name)
def test_example_configs_decode(path: Path) -> None:
    cfg = load_config(path)
    # Examples must show per-domain throttles that actually resolve through the layers.
    assert cfg.outbound.domains
    for domain in cfg.outbound.domains:
        assert cfg.outbound.throttle_for(domain.lstrip("*.")).max_connections
