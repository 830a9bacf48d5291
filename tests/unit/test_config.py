"""Config decoding: defaults, the embedded file, and errors that name file and key."""

import re
import typing
from pathlib import Path

import msgspec
import pytest

from relay.config import (
    BUILTIN_THROTTLE,
    Config,
    ConfigError,
    Throttle,
    decode_config,
    load_config,
    parse_rate,
    parse_size,
)

ROOT = Path(__file__).resolve().parents[2]
EMBEDDED = ROOT / "conf" / "relay.toml"


#: Where conf/relay.toml's values differ from the built-in defaults, on purpose: ``make
#: run`` greets as relay.localhost and keeps its spool and event log in the repository's
#: var/ (the paths are relative to conf/), writes a mail log there, and serves the HTTP API
#: on loopback.
NOT_DEFAULTS = {
    "server.hostname": "relay.localhost",
    "spool.path": "../var/spool",
    "log.events": "../var/log/events.jsonl",
    "log.mail_log": "../var/log/mail.log",
    "http.listen": ["127.0.0.1:8025"],
}


def test_embedded_default_config_is_valid_and_matches_builtin_defaults() -> None:
    written = decode_config(EMBEDDED.read_bytes(), "relay.toml")
    empty = decode_config(b"")
    # The file documents the defaults: decoding nothing must give the same values, but for
    # NOT_DEFAULTS and [outbound.default], which spells out the built-in throttle.
    differ = {}
    for table in Config.__struct_fields__:
        if table == "outbound":
            continue
        if not isinstance(getattr(empty, table), msgspec.Struct):  # [[webhooks]]: a list
            assert getattr(written, table) == getattr(empty, table), table
            continue
        for key in getattr(empty, table).__struct_fields__:
            value = getattr(getattr(written, table), key)
            if value != getattr(getattr(empty, table), key):
                differ[f"{table}.{key}"] = value
    assert differ == NOT_DEFAULTS
    assert written.outbound.default == BUILTIN_THROTTLE
    assert msgspec.structs.replace(written.outbound, default=Throttle()) == empty.outbound
    assert written.outbound.throttle_for("x.test") == empty.outbound.throttle_for("x.test")
    # ... and `make run` (relay serve --config conf/relay.toml, from the repository root)
    # keeps the spool in var/, as the README says, from whatever directory.
    cfg = load_config(EMBEDDED)
    assert cfg.spool.path == str(ROOT / "var" / "spool")
    assert cfg.log.events == str(ROOT / "var" / "log" / "events.jsonl")


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (b'[inbound]\nmax_recipients = "x"\n',
         "x.toml: inbound.max_recipients: expected an integer, got a string"),
        (b"[inbound]\nmax_recipients = 99\n", "inbound.max_recipients: must be at least 100"),
        (b"[inbound]\nmax_recipientz = 5\n", "x.toml: inbound.max_recipientz: unknown key"),
        (b"bogus = 1\n", "x.toml: bogus: unknown key"),
        (b'[relay]\nallow_networks = ["10.0.0.0/33"]\n', "relay.allow_networks[0]:"),
        (
            b'[outbound.domains."*.example.com"]\nmax_message_rate = "5/fortnight"\n',
            'outbound.domains."*.example.com".max_message_rate: invalid rate "5/fortnight"',
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


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        # The key of a dict of tables is named (msgspec says `outbound.domains[...]`), in
        # TOML's quotes.
        (b'[outbound.domains."gmail.com"]\nmax_connections = 0\n',
         'outbound.domains."gmail.com".max_connections: must be at least 1 (got 0)'),
        (b'[outbound.domains.a]\nmax_connections = 1\n'
         b'[outbound.domains."b.test"]\nmax_connections = "9"\n',
         'outbound.domains."b.test".max_connections: expected an integer, got a string'),
        (b'[outbound]\ndomains = {"a.test" = 3}\n',
         'outbound.domains."a.test": expected a table, got an integer'),
        (b'[outbound.domains."*.example.com"]\nmax_message_rate = "5/fortnight"\n',
         'outbound.domains."*.example.com".max_message_rate: invalid rate "5/fortnight" '
         '(examples: "300/min", "10/s", "5/10s")'),
        # Plain words for msgspec's type names and constraints.
        (b"[inbound]\ntls_cert = 5\n", "inbound.tls_cert: expected a string, got an integer"),
        (b'[inbound]\nlisten = "127.0.0.1:25"\n',
         "inbound.listen: expected an array, got a string"),
        (b'[inbound]\nallow_plaintext_auth = "yes"\n',
         "inbound.allow_plaintext_auth: expected true or false, got a string"),
        (b"[inbound]\nmax_message_size = 1.5\n",
         "inbound.max_message_size: expected an integer or a string, got a number"),
        (b"[outbound.default]\nconnect_timeout = true\n",
         "outbound.default.connect_timeout: expected a number, got a boolean"),
        (b"[inbound]\ncommand_timeout = 0\n",
         "inbound.command_timeout: must be greater than 0 (got 0)"),
        (b"[inbound]\ngreet_pause = -1.5\n", "inbound.greet_pause: must be at least 0 (got -1.5)"),
        (b"[outbound]\nsmtp_port = 70000\n",
         "outbound.smtp_port: must be at most 65535 (got 70000)"),
        # Enums list what is allowed, whatever was given.
        (b'[outbound.default]\ntls = "yes"\n',
         'outbound.default.tls: must be one of "off", "opportunistic", "required", "verify" '
         '(got "yes")'),
        (b'[outbound.domains."*.example.com"]\ntls = 1\n',
         'outbound.domains."*.example.com".tls: must be one of "off", "opportunistic", '
         '"required", "verify" (got 1)'),
        (b'[log]\nlevel = "verbose"\n',
         'log.level: must be one of "debug", "info", "warning", "error" (got "verbose")'),
        (b'[inbound]\nbare_newline = "fix"\n',
         'inbound.bare_newline: must be one of "reject", "normalize" (got "fix")'),
        # Unknown and missing keys.
        (b"[inbound]\nmax_recipientz = 5\n",
         "inbound.max_recipientz: unknown key (did you mean max_recipients?)"),
        (b'[outbound.domains."gmail.com"]\nmax_conections = 5\n',
         'outbound.domains."gmail.com".max_conections: unknown key '
         "(did you mean max_connections?)"),
        (b"[server]\nfrobnicate = 1\n", "server.frobnicate: unknown key"),
        (b'[[outbound.routes]]\ndomain = "a.test"\n',
         "outbound.routes[0].hosts: missing (required)"),
        (b'[[outbound.routes]]\ndomain = "a.test"\nhosts = ["mx.a.test"]\n'
         b'[[outbound.routes]]\ndomain = "b.test"\nhosts = [25]\n',
         "outbound.routes[1].hosts[0]: expected a string, got an integer"),
        # A domain whose quotes were forgotten is a nest of tables: say so.
        (b"[outbound.domains.gmail.com]\nmax_connections = 10\n",
         'outbound.domains.gmail.com: unknown key; did you mean [outbound.domains."gmail.com"]? '
         "(quote a domain that contains dots)"),
        (b"[outbound.domains.mail.yahoo.co.uk]\nmax_connections = 2\n",
         "outbound.domains.mail.yahoo: unknown key; did you mean "
         '[outbound.domains."mail.yahoo.co.uk"]? (quote a domain that contains dots)'),
        (b"[outbound.domains.gmail]\ncom = 3\n", "outbound.domains.gmail.com: unknown key"),
        (b"[outbound.domains.*.example.com]\nmax_connections = 1\n",
         "not valid TOML: Invalid initial character for a key part (at line 1, column 19); "
         'did you mean [outbound.domains."*.example.com"]? (quote a domain that contains dots)'),
    ],
)
def test_errors_read_well(toml: bytes, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        decode_config(toml, "conf/x.toml")
    assert str(e.value) == f"conf/x.toml: {message}"


def test_relative_paths_are_relative_to_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = tmp_path.resolve()
    (tmp / "etc").mkdir()
    (tmp / "elsewhere").mkdir()
    text = (
        '[inbound]\ntls_cert = "tls/cert.pem"\ntls_key = "/srv/tls/key.pem"\n'
        '[spool]\npath = "../spool"\n[log]\nevents = "log/events.jsonl"\n'
    )
    (tmp / "etc" / "relay.toml").write_text(text)
    monkeypatch.chdir(tmp / "elsewhere")
    cfg = load_config(Path("..") / "etc" / "relay.toml")
    assert (cfg.spool.path, cfg.log.events, cfg.inbound.tls_cert, cfg.inbound.tls_key) == (
        str(tmp / "spool"),
        str(tmp / "etc" / "log" / "events.jsonl"),
        str(tmp / "etc" / "tls" / "cert.pem"),
        "/srv/tls/key.pem",
    )
    # decode_config has no file: the paths stay as written.
    written = decode_config(text)
    assert (written.spool.path, written.log.events, written.inbound.tls_cert) == (
        "../spool", "log/events.jsonl", "tls/cert.pem")


def test_unset_paths_stay_unset(tmp_path: Path) -> None:
    (tmp_path / "relay.toml").write_text('[log]\nevents = ""\n')
    cfg = load_config(tmp_path / "relay.toml")
    assert (cfg.log.events, cfg.inbound.tls_cert, cfg.inbound.tls_key) == ("", "", "")
    assert cfg.spool.path == str(tmp_path.resolve() / "var" / "spool")


_TABLE_RE = re.compile(r"^\[\[?\s*([A-Za-z0-9_.]+)\s*\]\]?")
_KEY_RE = re.compile(r"^([A-Za-z0-9_]+)\s*=")
_COMMENTED_TABLE_RE = re.compile(r"^#\s*(\[\[?\s*[A-Za-z0-9_.]+[^\]]*\]\]?)")
_COMMENTED_KEY_RE = re.compile(r"^#\s*([A-Za-z0-9_]+)\s*=")


def _documented(text: str) -> tuple[dict[str, dict[str, bool]], dict[str, set[str]]]:
    """conf/relay.toml read line by line: {table: {live key: has a comment}} and, for each
    commented-out table header (``# [[inbound.auth_users]]``), the keys commented out
    below it."""
    live: dict[str, dict[str, bool]] = {"": {}}
    commented: dict[str, set[str]] = {}
    table, example, previous = "", None, ""
    for line in text.splitlines():
        if m := _TABLE_RE.match(line):
            table, example = m.group(1), None
            live.setdefault(table, {})
        elif m := _KEY_RE.match(line):
            has_comment = bool(re.search(r"\s#\s", line)) or previous.startswith("#")
            live[table][m.group(1)] = has_comment
            example = None
        elif m := _COMMENTED_TABLE_RE.match(line):
            example = m.group(1)
            commented.setdefault(example, set())
        elif (m := _COMMENTED_KEY_RE.match(line)) and example is not None:
            commented[example].add(m.group(1))
        elif not line.startswith("#"):
            example = None
        previous = line
    return live, commented


def _struct_of(tp: object) -> type | None:
    return tp if isinstance(tp, type) and issubclass(tp, msgspec.Struct) else None


def test_embedded_config_documents_every_key() -> None:
    """Every field of every Struct is in conf/relay.toml, in its table, with a comment;
    tables of tables (auth users, routes, per-domain throttles) as a commented example."""
    live, commented = _documented(EMBEDDED.read_text())
    missing = []

    def walk(cls: type, table: str) -> None:
        for f in msgspec.structs.fields(cls):
            key = f"{table}.{f.name}" if table else f.name
            origin, args = typing.get_origin(f.type), typing.get_args(f.type)
            if _struct_of(f.type):
                walk(f.type, key)
            elif origin is list and _struct_of(args[0]):
                fields = commented.get(f"[[{key}]]")
                wanted = {g.name for g in msgspec.structs.fields(args[0])}
                if fields is None or not wanted <= fields:
                    missing.append(f"# [[{key}]] with {sorted(wanted)}")
            elif origin is dict and _struct_of(args[1]):
                if not any(h.startswith(f'[{key}."') for h in commented):
                    missing.append(f'# [{key}."..."]')
            elif f.name not in live.get(table, {}):
                missing.append(key)
            elif not live[table][f.name]:
                missing.append(f"{key} (no comment)")

    walk(Config, "")
    assert missing == []


# -- providers and case-insensitive domain keys -------------------------------------------


def test_domain_keys_are_case_insensitive() -> None:
    cfg = decode_config(b'[outbound.domains."Gmail.COM."]\nmax_connections = 3\n')
    assert cfg.outbound.throttle_for("gmail.com").max_connections == 3
    with pytest.raises(ConfigError) as e:
        decode_config(b'[outbound.domains."a.test"]\nmax_connections = 1\n'
                      b'[outbound.domains."A.test"]\nmax_connections = 2\n', "x.toml")
    assert 'outbound.domains."A.test": the same domain as outbound.domains."a.test"' in str(e.value)


def test_a_provider_needs_every_mx_host_to_match() -> None:
    cfg = decode_config(b'[outbound.providers.g]\nmatch_mx = ["*.Google.com", "mx.g.test"]\n'
                        b'max_connections = 20\n')
    out = cfg.outbound
    assert out.provider_for(["alt1.aspmx.l.google.com", "MX.G.TEST."]) == "provider:g"
    assert out.provider_for(["alt1.aspmx.l.google.com", "mx.other.test"]) is None
    assert out.provider_for(["google.com"]) is None  # "*.google.com" means subdomains
    assert out.provider_for([]) is None
    assert out.throttle_for("provider:g").max_connections == 20


@pytest.mark.parametrize(("toml", "expected"), [
    (b'[outbound.default]\nmx_rollup = true\n',
     "outbound.default.mx_rollup: unknown key; mx_rollup was replaced by provider blocks"),
    (b'[outbound.providers.g]\nmatch_mx = ["mx.*.test"]\n',
     'outbound.providers.g.match_mx[0]: "mx.*.test" is not a host name or *.suffix'),
    (b'[outbound.providers.g]\nmatch_mx = []\n', "outbound.providers.g.match_mx: must have"),
    (b'[outbound.providers.g]\nmax_connections = 2\n',
     "outbound.providers.g.match_mx: missing (required)"),
])
def test_provider_errors(toml: bytes, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        decode_config(toml, "x.toml")
    assert expected in str(e.value)


@pytest.mark.parametrize(("toml", "expected"), [
    # Found by the config fuzz target (tests/fuzz/crashes/config/).
    (b'[outbound.default]\nmax_message_rate = "1/0s"\n',
     "outbound.default.max_message_rate: rate \"1/0s\" needs a period of at least 1 second"),
    (b"[inbound]\nmax_message_size = 0\n", "inbound.max_message_size: must be at least 1"),
])
def test_values_that_would_stop_a_worker_are_config_errors(toml: bytes, expected: str) -> None:
    with pytest.raises(ConfigError) as e:
        decode_config(toml, "x.toml")
    assert expected in str(e.value)
