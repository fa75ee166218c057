"""Loading settings: precedence, .env and *_FILE, every error's one line, and secrets kept out."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

from proxy.config import (
    ConfigError,
    KeySource,
    Settings,
    build_keyring,
    explain,
    load_settings,
    parse_address,
    parse_upstream,
    resolve_secrets,
)
from proxy.crypto import generate_key

REPO = Path(__file__).resolve().parent.parent
SECRET = "correct horse battery staple, but long enough"
RAW_KEY = "base64:" + "A" * 43 + "="  # 32 zero bytes


def write(directory: Path, text: str, name: str = "fieldcrypt.yaml") -> str:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return name


def load(
    tmp_path: Path,
    text: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Settings:
    path = write(tmp_path, text) if text is not None else None
    return load_settings(path, overrides or {}, env or {}, tmp_path)


def load_error(
    tmp_path: Path,
    text: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, env, overrides)
    message = str(caught.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------- precedence


def test_defaults_without_file_or_environment(tmp_path: Path) -> None:
    settings = load(tmp_path)
    assert settings.listen == "127.0.0.1:6380"
    assert settings.upstream == "redis://127.0.0.1:6379"
    assert settings.max_request_bytes == 512 * 1024 * 1024
    assert settings.max_client_output_bytes == 1024 * 1024 * 1024
    assert settings.drain_timeout == 10.0
    assert settings.on_decrypt_error == "error"
    assert settings.script_policy == "passthrough"
    assert settings.keys == ()
    assert settings.rules == ()


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path: Path) -> None:
    text = """
        listen: 127.0.0.1:1001
        max_clients: 11
        log_level: debug
        drain_timeout: 3
    """
    env = {"FIELDCRYPT_LISTEN": "127.0.0.1:1002", "FIELDCRYPT_MAX_CLIENTS": "12"}
    settings = load(tmp_path, text, env, {"listen": "127.0.0.1:1003", "max_clients": None})
    assert settings.listen == "127.0.0.1:1003"  # flag
    assert settings.max_clients == 12  # environment (the flag was not given)
    assert settings.log_level == "debug"  # file
    assert settings.drain_timeout == 3.0  # file
    assert settings.connect_timeout == 5.0  # default


def test_nested_tls_options_come_from_file_and_environment(tmp_path: Path) -> None:
    text = """
        tls:
          cert_file: certs/server.pem
          key_file: /etc/fc/server.key
    """
    env = {"FIELDCRYPT_TLS_KEY_FILE": "/run/server.key"}
    settings = load(tmp_path, text, env)
    # relative paths in the file are relative to the file's directory
    assert settings.tls.cert_file == str(tmp_path / "certs" / "server.pem")
    assert settings.tls.key_file == "/run/server.key"
    assert settings.tls.enabled


def test_unknown_override_is_a_programming_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown setting in overrides: 'lisen'"):
        load(tmp_path, overrides={"lisen": "x"})


def test_config_path_from_environment(tmp_path: Path) -> None:
    write(tmp_path, "max_clients: 7\n", name="other.yaml")
    settings = load_settings(None, {}, {"FIELDCRYPT_CONFIG": "other.yaml"}, tmp_path)
    assert settings.max_clients == 7
    assert settings.config_path == "other.yaml"


# ---------------------------------------------------------------------------- env values


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("1", True),
        ("true", True),
        ("Yes", True),
        ("on", True),
        ("0", False),
        ("FALSE", False),
        ("no", False),
        ("off", False),
    ],
)
def test_bool_environment_values(tmp_path: Path, word: str, expected: bool) -> None:
    assert load(tmp_path, env={"FIELDCRYPT_EMBEDDED": word}).embedded is expected


def test_bad_bool_in_environment_names_the_variable(tmp_path: Path) -> None:
    message = load_error(tmp_path, env={"FIELDCRYPT_EMBEDDED": "maybe"})
    assert message == (
        "FIELDCRYPT_EMBEDDED: must be true or false (or yes/no, on/off, 1/0), got 'maybe'"
    )


def test_bad_number_in_environment_names_the_variable(tmp_path: Path) -> None:
    assert load_error(tmp_path, env={"FIELDCRYPT_MAX_CLIENTS": "lots"}) == (
        "FIELDCRYPT_MAX_CLIENTS: must be a whole number, got 'lots'"
    )
    assert load_error(tmp_path, env={"FIELDCRYPT_MAX_CLIENTS": "0"}) == (
        "FIELDCRYPT_MAX_CLIENTS: must be at least 1, got 0"
    )
    assert load_error(tmp_path, env={"FIELDCRYPT_DRAIN_TIMEOUT": "soon"}) == (
        "FIELDCRYPT_DRAIN_TIMEOUT: must be a number of seconds, got 'soon'"
    )
    assert load_error(tmp_path, env={"FIELDCRYPT_CONNECT_TIMEOUT": "0"}) == (
        "FIELDCRYPT_CONNECT_TIMEOUT: must be more than 0 seconds, got 0"
    )


def test_bad_choice_lists_the_choices(tmp_path: Path) -> None:
    assert load_error(tmp_path, env={"FIELDCRYPT_LOG_FORMAT": "xml"}) == (
        "FIELDCRYPT_LOG_FORMAT: must be one of 'text', 'json', got 'xml'"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1048576", 1048576),
        ("1k", 1000),
        ("1kb", 1024),
        ("512mb", 512 * 1024 * 1024),
        ("512MiB", 512 * 1024 * 1024),
        ("2g", 2_000_000_000),
    ],
)
def test_sizes_accept_redis_units(tmp_path: Path, text: str, expected: int) -> None:
    settings = load(tmp_path, env={"FIELDCRYPT_MAX_REQUEST_BYTES": text})
    assert settings.max_request_bytes == expected


def test_bad_size(tmp_path: Path) -> None:
    message = load_error(tmp_path, "max_client_output_bytes: 12 parsecs\n")
    assert message.startswith("fieldcrypt.yaml:1: max_client_output_bytes must be a size in bytes")


def test_flag_errors_name_the_flag(tmp_path: Path) -> None:
    message = load_error(tmp_path, overrides={"listen": "nowhere"})
    assert message == "--listen: must be HOST:PORT, e.g. 127.0.0.1:6380, got 'nowhere'"


# ---------------------------------------------------------------------------- addresses


def test_listen_accepts_bracketed_ipv6(tmp_path: Path) -> None:
    assert load(tmp_path, env={"FIELDCRYPT_LISTEN": "[::1]:6380"}).listen == "[::1]:6380"
    assert parse_address("[::1]:6380") == ("::1", 6380)
    assert parse_address("0.0.0.0:0") == ("0.0.0.0", 0)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("::1:6380", "IPv6 address without brackets"),
        ("localhost", "must be HOST:PORT"),
        (":6380", "must be HOST:PORT"),
        ("localhost:99999", "as port"),
        ("[nope]:1", "not an IPv6 address"),
    ],
)
def test_bad_listen_addresses(tmp_path: Path, value: str, problem: str) -> None:
    message = load_error(tmp_path, env={"FIELDCRYPT_LISTEN": value})
    assert message.startswith("FIELDCRYPT_LISTEN: ")
    assert problem in message


def test_parse_upstream_reads_every_part() -> None:
    upstream = parse_upstream("rediss://app:p%40ss%2Fw0rd@redis.example:6390/3")
    assert upstream.host == "redis.example"
    assert upstream.port == 6390
    assert upstream.username == "app"
    assert upstream.password == "p@ss/w0rd"
    assert upstream.db == 3
    assert upstream.tls
    assert "p@ss" not in repr(upstream)
    assert upstream.display() == "rediss://app:***@redis.example:6390/3"


def test_parse_upstream_defaults() -> None:
    upstream = parse_upstream("redis://localhost")
    assert (upstream.host, upstream.port, upstream.db, upstream.tls) == (
        "localhost",
        6379,
        0,
        False,
    )
    assert upstream.username is None
    assert upstream.password is None
    assert parse_upstream("redis://:only-password@[::1]:7000/").password == "only-password"
    assert parse_upstream("redis://[::1]:7000").host == "::1"


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("localhost:6379", "must be a URL"),
        ("http://localhost", "use redis:// or rediss://"),
        ("redis://:s3cretpw@", "names no host"),
        ("redis://user:s3cretpw@host:port", "port that is not a number"),
        ("redis://user:s3cretpw@host/zero", "not a database number"),
        ("redis://user:s3cret?pw@host", "query"),
        ("redis://user:s3cret#pw@host", "fragment"),
    ],
)
def test_bad_upstream_url_is_named_without_its_password(
    tmp_path: Path, url: str, problem: str
) -> None:
    text = f"upstream: '{url}'\n"
    message = load_error(tmp_path, text)
    assert message.startswith("fieldcrypt.yaml:1: upstream ")
    assert problem in message
    assert "s3cret" not in message
    with pytest.raises(ValueError, match=problem):
        parse_upstream(url)


def test_upstream_credentials_override_the_url(tmp_path: Path) -> None:
    env = {
        "FIELDCRYPT_UPSTREAM": "redis://old:oldpw@db:6379/1",
        "FIELDCRYPT_UPSTREAM_USERNAME": "new",
        "FIELDCRYPT_UPSTREAM_PASSWORD": "newpw",
    }
    target = load(tmp_path, env=env).upstream_target
    assert (target.username, target.password, target.db) == ("new", "newpw", 1)


# ---------------------------------------------------------------------------- .env


def test_dotenv_fills_the_environment_but_does_not_override_it(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "# comment\n"
        "\n"
        "export FIELDCRYPT_LISTEN=127.0.0.1:7001\n"
        'FIELDCRYPT_LOG_LEVEL="debug"  # trailing comment\n'
        "FIELDCRYPT_ADMIN_USERNAME='ops #1'\n"
        "FIELDCRYPT_MAX_CLIENTS = 33 # spaces around =\n",
        encoding="utf-8",
    )
    settings = load(tmp_path, env={"FIELDCRYPT_MAX_CLIENTS": "44"})
    assert settings.listen == "127.0.0.1:7001"
    assert settings.log_level == "debug"
    assert settings.admin_username == "ops #1"
    assert settings.max_clients == 44


def test_dotenv_errors_name_the_file_and_line(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("FIELDCRYPT_LISTEN=127.0.0.1:1\nthis is not it\n")
    assert load_error(tmp_path) == f"{tmp_path / '.env'}:2: expected NAME=VALUE"


def test_dotenv_value_errors_name_the_file_line_and_variable(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("\nFIELDCRYPT_MAX_CLIENTS=many\n")
    assert load_error(tmp_path) == (
        f"{tmp_path / '.env'}:2: FIELDCRYPT_MAX_CLIENTS: must be a whole number, got 'many'"
    )


def test_dotenv_unclosed_quote_does_not_echo_the_value(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text('FIELDCRYPT_ADMIN_PASSWORD="hunter2\n')
    message = load_error(tmp_path)
    assert "never closed" in message
    assert "hunter2" not in message


# ---------------------------------------------------------------------------- *_FILE


def test_file_variable_reads_the_value_without_its_newline(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret-admin\n")
    settings = load(tmp_path, env={"FIELDCRYPT_ADMIN_PASSWORD_FILE": "pw"})
    assert settings.admin_password == "s3cret-admin"


def test_file_variable_strips_only_one_newline(tmp_path: Path) -> None:
    (tmp_path / "user").write_text("ops\n\n")
    settings = load(tmp_path, env={"FIELDCRYPT_ADMIN_USERNAME_FILE": str(tmp_path / "user")})
    assert settings.admin_username == "ops\n"


def test_value_and_file_variable_together_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("x")
    env = {"FIELDCRYPT_ADMIN_PASSWORD": "y", "FIELDCRYPT_ADMIN_PASSWORD_FILE": "pw"}
    assert load_error(tmp_path, env=env) == (
        "FIELDCRYPT_ADMIN_PASSWORD and FIELDCRYPT_ADMIN_PASSWORD_FILE are both set; keep one"
    )


def test_unreadable_file_variable_names_variable_and_path(tmp_path: Path) -> None:
    env = {"FIELDCRYPT_CLIENT_PASSWORD_FILE": "/nonexistent/pw"}
    assert load_error(tmp_path, env=env) == (
        "FIELDCRYPT_CLIENT_PASSWORD_FILE: cannot read /nonexistent/pw: No such file or directory"
    )


def test_settings_named_like_file_variables_are_settings(tmp_path: Path) -> None:
    env = {"FIELDCRYPT_TLS_CERT_FILE": "/c.pem", "FIELDCRYPT_TLS_KEY_FILE": "/k.pem"}
    settings = load(tmp_path, env=env)
    assert settings.tls.cert_file == "/c.pem"
    assert settings.tls.key_file == "/k.pem"


# ---------------------------------------------------------------------------- YAML errors


def test_unknown_option_names_its_line_and_close_match(tmp_path: Path) -> None:
    text = """
        listen: 127.0.0.1:6380
        # a comment
        max_client: 10
    """
    assert load_error(tmp_path, text) == (
        "fieldcrypt.yaml:3: unknown option 'max_client'; "
        "did you mean 'max_clients' or 'max_client_output_bytes'?"
    )


def test_unknown_option_without_a_close_match_lists_the_options(tmp_path: Path) -> None:
    message = load_error(tmp_path, "zzz: 1\n")
    assert message.startswith("fieldcrypt.yaml:1: unknown option 'zzz'; allowed: listen, ")
    assert "rules" in message


def test_option_given_twice(tmp_path: Path) -> None:
    text = """
        listen: 127.0.0.1:1
        upstream: redis://x
        listen: 127.0.0.1:2
    """
    assert load_error(tmp_path, text) == (
        "fieldcrypt.yaml:3: listen is given twice (first on line 1); keep one"
    )


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    text = """
        listen: 127.0.0.1:6380
        rules:
          - key: a
           fields: [b]
    """
    message = load_error(tmp_path, text)
    assert message.startswith("fieldcrypt.yaml:4: invalid YAML: ")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    assert load_error(tmp_path, "- a\n- b\n").startswith(
        "fieldcrypt.yaml:1: the config file must be a mapping"
    )


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load(tmp_path, "# nothing here\n").listen == "127.0.0.1:6380"


def test_value_error_names_the_value_line(tmp_path: Path) -> None:
    text = """
        listen: 127.0.0.1:6380
        tls:
          cert_file: a.pem
          key_file: b.pem
          verify_clients: sometimes
    """
    assert load_error(tmp_path, text) == (
        "fieldcrypt.yaml:5: tls.verify_clients must be true or false "
        "(or yes/no, on/off, 1/0), got 'sometimes'"
    )


def test_unknown_nested_option_lists_the_allowed(tmp_path: Path) -> None:
    text = """
        upstream_tls:
          verify: true
          ca: /etc/ca.pem
    """
    assert load_error(tmp_path, text) == (
        "fieldcrypt.yaml:3: upstream_tls: unknown option 'ca'; did you mean 'ca_file'?"
    )


def test_unreadable_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings("missing.yaml", {}, {}, tmp_path)
    assert str(caught.value) == (
        "missing.yaml: cannot read the config file: No such file or directory"
    )


# ---------------------------------------------------------------------------- rules


def test_rules_load_in_order_with_their_lines(tmp_path: Path) -> None:
    text = """
        rules:
          - key: "iad:*"
            fields: [imap, smtp, oauth2]
          - key: settings
            fields: [serviceSecret, "*ClientSecret"]
            db: 0
            require_encrypted: true
            bind_key: false
    """
    settings = load(tmp_path, text)
    first, second = settings.rules
    assert (first.key, first.fields, first.db, first.line) == (
        "iad:*",
        ("imap", "smtp", "oauth2"),
        None,
        2,
    )
    assert not first.bind_key and not first.require_encrypted
    assert (second.key, second.db, second.require_encrypted, second.bind_key) == (
        "settings",
        0,
        True,
        False,
    )
    assert second.fields == ("serviceSecret", "*ClientSecret")
    key_rules = settings.rule_set.match_key(0, b"settings")
    assert key_rules is not None
    assert key_rules.field_rule(b"googleClientSecret") is second


def test_rule_fields_must_be_a_list_of_strings(tmp_path: Path) -> None:
    text = """
        rules:
          - key: a
            fields: [x]
          - key: b
            fields: password
    """
    assert load_error(tmp_path, text) == (
        "fieldcrypt.yaml:5: rules[1].fields must be a list of strings, e.g. [password, token]"
    )


def test_rule_fields_items_must_be_strings(tmp_path: Path) -> None:
    text = """
        rules:
          - key: a
            fields:
              - x
              - [y]
    """
    assert load_error(tmp_path, text) == (
        "fieldcrypt.yaml:5: rules[0].fields[1] must be a field name or glob in quotes, got ['y']"
    )


def test_rule_fields_must_not_be_empty(tmp_path: Path) -> None:
    text = """
        rules:
          - key: a
            fields: []
    """
    assert load_error(tmp_path, text) == (
        "fieldcrypt.yaml:3: rules[0].fields lists no field; name at least one"
    )


def test_rule_needs_key_and_fields(tmp_path: Path) -> None:
    assert load_error(tmp_path, "rules:\n  - fields: [a]\n").startswith(
        "fieldcrypt.yaml:2: rules[0] needs key:"
    )
    assert load_error(tmp_path, "rules:\n  - key: a\n").startswith(
        "fieldcrypt.yaml:2: rules[0] needs fields:"
    )


def test_unknown_rule_option_names_it_and_lists_allowed(tmp_path: Path) -> None:
    text = """
        rules:
          - key: a
            fields: [b]
            encrypt: true
    """
    assert load_error(tmp_path, text) == (
        "fieldcrypt.yaml:4: rules[0]: unknown option 'encrypt'; "
        "allowed: key, fields, db, require_encrypted, bind_key, refuse_scripts"
    )


def test_bad_key_glob_names_the_problem(tmp_path: Path) -> None:
    text = """
        rules:
          - key: "user:[0-9"
            fields: [token]
    """
    message = load_error(tmp_path, text)
    assert message.startswith("fieldcrypt.yaml:2: rules[0].key 'user:[0-9' is not a valid glob: ")
    assert "never closed" in message


def test_bad_field_glob_names_the_field_line(tmp_path: Path) -> None:
    text = """
        rules:
          - key: a
            fields:
              - ok
              - 'bad\\'
    """
    message = load_error(tmp_path, text)
    assert message.startswith("fieldcrypt.yaml:5: rules[0].fields[1] 'bad\\\\' is not a valid glob")


def test_rule_db_must_be_a_whole_number_at_least_zero(tmp_path: Path) -> None:
    text = """
        rules:
          - key: a
            fields: [b]
            db: -1
    """
    assert load_error(tmp_path, text) == "fieldcrypt.yaml:4: rules[0].db must be at least 0, got -1"


def test_rules_must_be_a_list(tmp_path: Path) -> None:
    assert load_error(tmp_path, "rules: {key: a}\n") == (
        "fieldcrypt.yaml:1: rules must be a list of rules, each with key: and fields:"
    )


def test_no_rules_warns(tmp_path: Path) -> None:
    settings = load(tmp_path, "listen: 127.0.0.1:6380\n")
    assert any("no rules" in w for w in settings.warnings)


RAW_OVER_REQUIRE_ENCRYPTED = """
    rules:
      - key: "iad:*"
        fields: [imap]
      - key: "settings"
        fields: [serviceSecret]
        require_encrypted: true
    on_decrypt_error: raw
"""


def test_raw_with_require_encrypted_warns_naming_both_lines(tmp_path: Path) -> None:
    settings = load(tmp_path, RAW_OVER_REQUIRE_ENCRYPTED)
    assert (
        "fieldcrypt.yaml:7: on_decrypt_error is raw, which wins over require_encrypted: true "
        "of rules[1] (line 4): a value there that starts with $fc1$ but does not decrypt "
        "reaches the application as stored, so whoever can write to Redis can plant one; "
        "set on_decrypt_error: error to refuse it"
    ) in settings.warnings
    # Either alone is fine.
    for alone in (
        RAW_OVER_REQUIRE_ENCRYPTED.replace("on_decrypt_error: raw", "on_decrypt_error: error"),
        RAW_OVER_REQUIRE_ENCRYPTED.replace("require_encrypted: true", "bind_key: true"),
    ):
        assert not any("on_decrypt_error" in w for w in load(tmp_path, alone).warnings)


def test_raw_from_the_environment_with_require_encrypted_warns_naming_the_variable(
    tmp_path: Path,
) -> None:
    text = RAW_OVER_REQUIRE_ENCRYPTED.replace("on_decrypt_error: raw", "")
    settings = load(tmp_path, text, env={"FIELDCRYPT_ON_DECRYPT_ERROR": "raw"})
    assert any(
        w.startswith("FIELDCRYPT_ON_DECRYPT_ERROR: is raw, which wins over require_encrypted")
        for w in settings.warnings
    ), settings.warnings


def test_explain_says_raw_passes_undecryptable_envelopes_of_a_require_encrypted_rule(
    tmp_path: Path,
) -> None:
    summary = explain(load(tmp_path, RAW_OVER_REQUIRE_ENCRYPTED))
    assert (
        "2. key 'settings' (any db, line 4): encrypts fields serviceSecret; not bound to the "
        "key name; plaintext refused, but a $fc1$ value that does not decrypt is returned "
        "as stored (raw)"
    ) in summary
    assert "warnings:\n  - fieldcrypt.yaml:7: on_decrypt_error is raw" in summary


# ---------------------------------------------------------------------------- scripts


def test_scripts_load(tmp_path: Path) -> None:
    (tmp_path / "lua").mkdir()
    (tmp_path / "lua" / "save.lua").write_bytes(
        b"return redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])\n"
    )
    text = """
        script_policy: refuse
        scripts:
          - name: save
            sha1: 3C2F9A0B1D4E5F60718293A4B5C6D7E8F9A0B1C2
            hash_key: 1
            field_values: [[1, 2], [3, 4]]
            repeat: true
          - name: body
            body_file: lua/save.lua
            hash_key: 2
            field_values: [[2, 3]]
    """
    settings = load(tmp_path, text)
    assert settings.script_policy == "refuse"
    save, body = settings.scripts
    assert save.sha1 == "3c2f9a0b1d4e5f60718293a4b5c6d7e8f9a0b1c2"
    assert save.field_values == ((1, 2), (3, 4))
    assert save.repeat == 4  # true: the pattern's span
    assert body.body_file == str(tmp_path / "lua" / "save.lua")
    assert body.body == (tmp_path / "lua" / "save.lua").read_bytes()  # read at load
    assert save.body is None
    assert body.repeat == 0


def one_script(field_values: str, repeat: str | None = None) -> str:
    """A config declaring one function; `repeat` on line 6 when given."""
    text = f"""
        scripts:
          - name: s
            function: f
            hash_key: 1
            field_values: {field_values}
    """
    return text.rstrip(" ") + (f"            repeat: {repeat}\n" if repeat is not None else "")


def test_repeat_is_the_span_or_a_number_of_argv_at_least_that(tmp_path: Path) -> None:
    def repeat_of(pairs: str, repeat: str) -> int:
        (script,) = load(tmp_path, one_script(pairs, repeat)).scripts
        return script.repeat

    assert repeat_of("[[2, 3]]", "true") == 2
    assert repeat_of("[[1, 2]]", "3") == 3  # (field, value, something else) records
    assert repeat_of("[[1, 2]]", "false") == 0
    message = load_error(tmp_path, one_script("[[1, 2], [3, 4]]", "3"))
    assert "fieldcrypt.yaml:6:" in message and "at least its span, 4" in message


@pytest.mark.parametrize("pairs", ["[[1, 1]]", "[[1, 2], [2, 3]]", "[[1, 2], [3, 1]]"])
def test_a_script_may_not_use_an_argv_position_twice(tmp_path: Path, pairs: str) -> None:
    message = load_error(tmp_path, one_script(pairs))
    assert "fieldcrypt.yaml:5:" in message and "names an ARGV position twice" in message


def test_a_body_file_that_cannot_be_read_names_its_line_and_path(tmp_path: Path) -> None:
    text = """
        scripts:
          - name: ok
            function: f
            hash_key: 1
            field_values: [[1, 2]]
          - name: gone
            body_file: lua/missing.lua
            hash_key: 1
            field_values: [[1, 2]]
    """
    message = load_error(tmp_path, text)
    assert "fieldcrypt.yaml:7:" in message  # the body_file: line
    assert str(tmp_path / "lua" / "missing.lua") in message
    assert "No such file" in message


@pytest.mark.parametrize(
    ("item", "problem"),
    [
        ("{name: s, hash_key: 1, field_values: [[1, 2]]}", "exactly one of sha1:"),
        ("{name: s, sha1: abc, hash_key: 1, field_values: [[1, 2]]}", "must be 40 hex digits"),
        ("{name: s, function: f, hash_key: 0, field_values: [[1, 2]]}", "at least 1"),
        ("{name: s, function: f, hash_key: 1, field_values: [[1]]}", "[field, value]"),
        ("{name: s, function: f, hash_key: 1, field_values: [[0, 1]]}", "[field, value]"),
        ("{name: s, function: f, field_values: [[1, 2]]}", "needs hash_key:"),
        ("{name: s, function: f, hash_key: 1, field_values: [[1, 2]], x: 1}", "unknown option"),
    ],
)
def test_bad_scripts(tmp_path: Path, item: str, problem: str) -> None:
    message = load_error(tmp_path, f"scripts:\n  - {item}\n")
    assert message.startswith("fieldcrypt.yaml:2: scripts[0]")
    assert problem in message


# ---------------------------------------------------------------------------- TLS checks


def test_tls_cert_without_key(tmp_path: Path) -> None:
    assert load_error(tmp_path, "tls:\n  cert_file: c.pem\n") == (
        "fieldcrypt.yaml:2: tls.cert_file is set without tls.key_file; set both to serve TLS"
    )


def test_verify_clients_needs_a_ca(tmp_path: Path) -> None:
    env = {
        "FIELDCRYPT_TLS_CERT_FILE": "/c",
        "FIELDCRYPT_TLS_KEY_FILE": "/k",
        "FIELDCRYPT_TLS_VERIFY_CLIENTS": "yes",
    }
    assert load_error(tmp_path, env=env) == (
        "FIELDCRYPT_TLS_VERIFY_CLIENTS: needs tls.ca_file (the CA that signs client certificates)"
    )


def test_upstream_tls_needs_rediss(tmp_path: Path) -> None:
    text = """
        upstream: redis://db:6379
        upstream_tls:
          ca_file: /etc/ca.pem
    """
    assert load_error(tmp_path, text) == (
        "fieldcrypt.yaml:3: upstream_tls.ca_file is set but upstream is a redis:// URL "
        "(no TLS); use rediss:// to connect with TLS"
    )


def test_unverified_upstream_tls_warns(tmp_path: Path) -> None:
    text = """
        upstream: rediss://db:6380
        upstream_tls:
          verify: false
    """
    warnings = load(tmp_path, text).warnings
    assert "fieldcrypt.yaml:3: upstream_tls.verify is false: " in " ".join(warnings)


# ---------------------------------------------------------------------------- keys


def test_keys_list_gives_sources_with_lines(tmp_path: Path) -> None:
    text = """
        keys:
          - secret_env: FC_KEY_2026
          - secret_file: keys/fc-2025
            decrypt_only: true
    """
    first, second = load(tmp_path, text).keys
    assert first == KeySource("env", "FC_KEY_2026", False, 2, "fieldcrypt.yaml:2: keys[0]")
    assert second.kind == "file"
    assert second.name_or_path == str(tmp_path / "keys" / "fc-2025")
    assert second.decrypt_only
    assert second.line == 3


def test_without_keys_fieldcrypt_secret_is_the_key(tmp_path: Path) -> None:
    (source,) = load(tmp_path, env={"FIELDCRYPT_SECRET": SECRET}).keys
    assert source.kind == "literal-from-env"
    assert SECRET not in repr(source)
    assert resolve_secrets(load(tmp_path, env={"FIELDCRYPT_SECRET": SECRET}), {}) == [
        (source, SECRET)
    ]


def test_fieldcrypt_secret_from_dotenv_and_file(tmp_path: Path) -> None:
    (tmp_path / "key").write_text(SECRET + "\n")
    (tmp_path / ".env").write_text("FIELDCRYPT_SECRET_FILE=key\n")
    settings = load(tmp_path)
    ((_, secret),) = resolve_secrets(settings, {})
    assert secret == SECRET


def test_secret_env_is_read_from_dotenv_at_resolve_time(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"FC_KEY='{SECRET}'\n")
    settings = load(tmp_path, "keys: [{secret_env: FC_KEY}]\nrules: []\n")
    ((_, secret),) = resolve_secrets(settings, {})
    assert secret == SECRET


def test_key_entry_needs_exactly_one_source(tmp_path: Path) -> None:
    text = """
        keys:
          - secret_env: A
            secret_file: /b
    """
    assert load_error(tmp_path, text) == (
        "fieldcrypt.yaml:2: keys[0] has both secret_env: and secret_file:; keep one"
    )
    assert load_error(tmp_path, "keys:\n  - decrypt_only: true\n") == (
        "fieldcrypt.yaml:2: keys[0] needs one of secret_env:, secret_file: or secret:"
    )


def test_secret_env_must_be_a_variable_name_and_is_not_echoed(tmp_path: Path) -> None:
    text = "keys:\n  - secret_env: 'base64:AAAA/+secret=='\n"
    message = load_error(tmp_path, text)
    assert message.startswith("fieldcrypt.yaml:2: keys[0].secret_env must be the name of")
    assert "AAAA" not in message


def test_literal_secret_warns_with_its_line(tmp_path: Path) -> None:
    text = f"""
        rules: []
        keys:
          - secret: "{SECRET}"
    """
    settings = load(tmp_path, text)
    assert (
        "fieldcrypt.yaml:3: keys[0].secret puts a key in the config file; "
        "move it to secret_env: or secret_file:"
    ) in settings.warnings
    assert SECRET not in repr(settings)
    assert SECRET not in explain(settings)


def test_fieldcrypt_secret_ignored_when_keys_do_not_use_it_warns(tmp_path: Path) -> None:
    settings = load(tmp_path, "keys: [{secret_env: OTHER}]\n", env={"FIELDCRYPT_SECRET": SECRET})
    assert any(w.startswith("FIELDCRYPT_SECRET: is set but ignored") for w in settings.warnings)


def test_unset_key_variable(tmp_path: Path) -> None:
    settings = load(tmp_path, "keys: [{secret_env: FC_MISSING}]\n")
    with pytest.raises(ConfigError) as caught:
        resolve_secrets(settings, {})
    assert str(caught.value) == (
        "fieldcrypt.yaml:1: keys[0]: environment variable FC_MISSING is not set; "
        "set it (or put it in .env)"
    )


def test_empty_secret_is_an_error(tmp_path: Path) -> None:
    settings = load(tmp_path, env={"FIELDCRYPT_SECRET": ""})
    with pytest.raises(ConfigError) as caught:
        resolve_secrets(settings, {})
    assert str(caught.value).startswith(
        "FIELDCRYPT_SECRET: the key in environment variable FIELDCRYPT_SECRET is empty"
    )


def test_empty_key_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "k").write_text("\n")
    settings = load(tmp_path, "keys: [{secret_file: k}]\n")
    with pytest.raises(
        ConfigError, match=r"fieldcrypt.yaml:1: keys\[0\]: the key in file .* empty"
    ):
        resolve_secrets(settings, {})


def test_key_file_that_is_a_directory_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    settings = load(tmp_path, "keys: [{secret_file: keys}]\n")
    with pytest.raises(ConfigError) as caught:
        resolve_secrets(settings, {})
    assert str(caught.value) == (
        f"fieldcrypt.yaml:1: keys[0]: cannot read key file {tmp_path / 'keys'}: Is a directory"
    )


def test_missing_key_file_names_the_file(tmp_path: Path) -> None:
    settings = load(tmp_path, "keys:\n  - secret_file: /run/secrets/nope\n")
    with pytest.raises(ConfigError) as caught:
        resolve_secrets(settings, {})
    assert str(caught.value) == (
        "fieldcrypt.yaml:2: keys[0]: cannot read key file /run/secrets/nope: "
        "No such file or directory"
    )


def test_weak_passphrase_warns(tmp_path: Path) -> None:
    settings = load(tmp_path, env={"FIELDCRYPT_SECRET": "hunter2"})
    warnings: list[str] = []
    resolve_secrets(settings, {}, warnings)
    assert warnings == [
        "FIELDCRYPT_SECRET: the passphrase in environment variable FIELDCRYPT_SECRET is "
        "shorter than 32 characters; use a random key from `fieldcrypt keygen`"
    ]
    assert "hunter2" not in warnings[0]


def test_raw_keys_and_long_passphrases_do_not_warn(tmp_path: Path) -> None:
    for secret in (RAW_KEY, SECRET):
        warnings: list[str] = []
        resolve_secrets(load(tmp_path, env={"FIELDCRYPT_SECRET": secret}), {}, warnings)
        assert warnings == []


def test_no_key_configured(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no encryption key is configured"):
        build_keyring(load(tmp_path), {})


def test_keyring_encrypts_with_first_usable_key(tmp_path: Path) -> None:
    new, old = generate_key(), generate_key()
    (tmp_path / "old").write_text(old + "\n")
    text = """
        keys:
          - secret_file: old
            decrypt_only: true
          - secret_env: FC_NEW
    """
    ring = build_keyring(load(tmp_path, text), {"FC_NEW": new})
    assert len(ring.keys) == 2
    assert ring.primary is ring.keys[1]
    assert ring.keys[0].decrypt_only


def test_two_entries_with_the_same_key_name_the_second(tmp_path: Path) -> None:
    key = generate_key()
    (tmp_path / "k").write_text(key)
    text = """
        keys:
          - secret_env: FC_KEY
          # the same key again, from a file
          - secret_file: k
            decrypt_only: true
    """
    with pytest.raises(ConfigError) as caught:
        build_keyring(load(tmp_path, text), {"FC_KEY": key})
    message = str(caught.value)
    assert message == (
        "fieldcrypt.yaml:4: keys[1]: two entries hold the same key (the other is on line 2); "
        "remove one"
    )
    assert key not in message


def test_bad_raw_key_is_named_without_its_value(tmp_path: Path) -> None:
    settings = load(tmp_path, env={"FIELDCRYPT_SECRET": "base64:c2VjcmV0"})
    with pytest.raises(ConfigError) as caught:
        build_keyring(settings, {})
    message = str(caught.value)
    assert message.startswith("FIELDCRYPT_SECRET: a 'base64:' key must decode to exactly 32")
    assert "c2VjcmV0" not in message


def test_all_decrypt_only_warns(tmp_path: Path) -> None:
    settings = load(tmp_path, "keys: [{secret_env: A, decrypt_only: true}]\n")
    assert any("every entry in keys: is decrypt_only" in w for w in settings.warnings)


def test_unknown_fieldcrypt_variable_warns_with_a_suggestion(tmp_path: Path) -> None:
    settings = load(tmp_path, env={"FIELDCRYPT_LISTN": "x", "OTHER_THING": "y"})
    assert (
        "FIELDCRYPT_LISTN: is not a fieldcrypt setting (did you mean FIELDCRYPT_LISTEN?); "
        "it is ignored"
    ) in settings.warnings
    assert not any("OTHER_THING" in w for w in settings.warnings)


# ---------------------------------------------------------------------------- secrets kept out


def test_no_secret_reaches_repr_explain_or_errors(tmp_path: Path) -> None:
    secrets = {
        "FIELDCRYPT_ADMIN_PASSWORD": "adm1n-s3cret",
        "FIELDCRYPT_CLIENT_PASSWORD": "cl1ent-s3cret",
        "FIELDCRYPT_UPSTREAM_PASSWORD": "upstr3am-s3cret",
        "FC_KEY": "k3y-s3cret-that-is-long-enough-to-pass",
    }
    text = """
        upstream: redis://app:url-s3cret@db:6379/0
        keys: [{secret_env: FC_KEY}]
        rules: [{key: "a:*", fields: [b]}]
    """
    settings = load(tmp_path, text, env=secrets)
    shown = repr(settings) + explain(settings)
    for value in [*secrets.values(), "url-s3cret"]:
        assert value not in shown
    assert "redis://app:***@db:6379/0" in explain(settings)
    assert "password required" in explain(settings)


@pytest.mark.parametrize(
    "env",
    [
        {"FIELDCRYPT_ADMIN_PASSWORD": ""},
        {"FIELDCRYPT_UPSTREAM": "redis://u:pw-s3cret@:99999"},
        {"FIELDCRYPT_UPSTREAM": "mysql://u:pw-s3cret@db"},
    ],
)
def test_errors_about_secret_settings_do_not_echo_them(tmp_path: Path, env: dict[str, str]) -> None:
    message = load_error(tmp_path, env=env)
    assert "s3cret" not in message


def test_non_string_password_in_yaml_is_refused_without_echo(tmp_path: Path) -> None:
    assert load_error(tmp_path, "admin_password: 0123456\n") == (
        "fieldcrypt.yaml:1: admin_password must be a string; put it in quotes"
    )


def test_explain_lists_rules_and_key_ring(tmp_path: Path) -> None:
    text = """
        keys:
          - secret_env: FIELDCRYPT_SECRET
          - secret_file: /run/secrets/fc-2025
            decrypt_only: true
        rules:
          - key: "iad:*"
            fields: [imap, smtp]
          - key: settings
            fields: [serviceSecret]
            db: 0
            bind_key: false
    """
    summary = explain(load(tmp_path, text))
    assert "environment variable FIELDCRYPT_SECRET: encrypts and decrypts" in summary
    assert "file /run/secrets/fc-2025: decrypts only" in summary
    assert "1. key 'iad:*' (any db, line 6): encrypts fields imap, smtp" in summary
    assert "2. key 'settings' (db 0, line 8)" in summary
    assert "not bound to the key name" in summary


# ---------------------------------------------------------------------------- the example


def test_example_config_loads(tmp_path: Path) -> None:
    example = REPO / "config" / "fieldcrypt.example.yaml"
    settings = load_settings(str(example), {}, {}, tmp_path)
    assert [k.kind for k in settings.keys] == ["env", "file"]
    assert settings.keys[1].decrypt_only
    assert [r.key for r in settings.rules] == ["iad:*", "settings"]
    assert settings.rules[1].fields == ("serviceSecret", "*ClientSecret", "smtpServerPassword")
    assert settings.rules[1].db == 0
    assert settings.on_decrypt_error == "error"
    (script,) = settings.scripts
    assert script.body_file == str(REPO / "config" / "lua" / "set-if-missing-with-marker.lua")
    assert script.body is not None and b"HEXISTS" in script.body
    assert (script.hash_key, script.field_values) == (1, ((1, 2), (3, 4)))
    assert settings.warnings == ()
    assert explain(settings)


def test_quickstart_config_builds_a_key_ring_from_fieldcrypt_secret(tmp_path: Path) -> None:
    quickstart = REPO / "config" / "quickstart.yaml"
    environ = {"FIELDCRYPT_SECRET": RAW_KEY}
    settings = load_settings(str(quickstart), {}, environ, tmp_path)
    ring = build_keyring(settings, environ)
    assert ring.primary is not None and len(ring.keys) == 1
    assert [r.key for r in settings.rules] == ["iad:*", "settings"]
    assert settings.warnings == ()


def test_example_config_mentions_every_option() -> None:
    from proxy.config import _TOP_LEVEL

    text = (REPO / "config" / "fieldcrypt.example.yaml").read_text()
    for name in _TOP_LEVEL:
        assert f"\n{name}:" in text, name
