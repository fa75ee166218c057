"""Secrets kept off the command line: `fieldcrypt migrate` takes its keys from files
(--secret-file, --decrypt-file) or FIELDCRYPT_SECRET(_FILE); a secret or a URL password
given as a flag still works but gets a one-line warning on stderr; no output ever
shows a secret. Runs the installed `fieldcrypt` console script in a fresh process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from proxy.crypto import HEADER_PREFIX, Key, KeyRing, derive_key, generate_key
from tests.servers import EmbeddedServer, server_binary

ROOT = Path(__file__).resolve().parent.parent
FIELDCRYPT = Path(sys.executable).parent / "fieldcrypt"
USER, PASSWORD = "migrator", "Url-Pw-9fK2-never-shown"
RULES = 'rules:\n  - key: "acct:*"\n    fields: [token]\n'
ACCOUNTS = {f"acct:{n}".encode(): f"tok-{n}-plaintext".encode() for n in range(1, 6)}
ON_COMMAND_LINE = "puts a secret on the command line"


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without FIELDCRYPT_* settings, importing this tree's `proxy`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDCRYPT_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def fieldcrypt(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    if not FIELDCRYPT.exists():
        pytest.fail(f"{FIELDCRYPT} is missing: run `pip install -e '.[test]'`", pytrace=False)
    return subprocess.run(
        [str(FIELDCRYPT), *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedServer]:
    """A real Redis with an ACL user `migrator` that needs a password."""
    server = EmbeddedServer(server_binary("redis"))
    server.start()
    with redis.Redis(port=server.port) as admin:
        admin.execute_command("ACL", "SETUSER", USER, "on", f">{PASSWORD}", "~*", "&*", "+@all")
    yield server
    server.stop()


@pytest.fixture
def raw(server: EmbeddedServer) -> Iterator[redis.Redis]:
    """The server, read directly, holding cleartext accounts."""
    client = redis.Redis(port=server.port)
    client.flushall()
    for key, token in ACCOUNTS.items():
        client.hset(key, mapping={"token": token, "name": key})
    yield client
    client.close()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "rules.yaml").write_text(RULES, encoding="utf-8")
    return tmp_path


def key_file(directory: Path, name: str, secret: str) -> str:
    (directory / name).write_text(secret + "\n", encoding="ascii")
    return name


def assert_sealed_under(raw: redis.Redis, secret: str) -> None:
    """Every token is an envelope that this key, and this key alone, opens."""
    key = Key.from_bytes(derive_key(secret))
    ring = KeyRing([key])
    for name, token in ACCOUNTS.items():
        stored = raw.hget(name, "token")
        assert stored is not None and stored.startswith(HEADER_PREFIX)
        assert stored[7:18].decode() == key.kid
        assert ring.decrypt(stored, b"token", name) == token
        assert raw.hget(name, "name") == name


def assert_cleartext(raw: redis.Redis) -> None:
    for name, token in ACCOUNTS.items():
        assert raw.hget(name, "token") == token


def assert_shows_none_of(result: subprocess.CompletedProcess[str], *secrets: str) -> None:
    for secret in secrets:
        assert secret not in result.stdout + result.stderr


# --- keys from files and the environment --------------------------------------------------


def test_migrate_rekeys_and_decrypts_with_keys_from_files_without_a_warning(
    raw: redis.Redis, server: EmbeddedServer, workdir: Path
) -> None:
    old, new, unrelated = generate_key(), generate_key(), generate_key()
    url = server.url
    key_file(workdir, "old.key", old)
    key_file(workdir, "new.key", new)
    key_file(workdir, "unrelated.key", unrelated)

    # Encrypt: the key from FIELDCRYPT_SECRET_FILE, as `serve` reads it.
    env = clean_env(FIELDCRYPT_SECRET_FILE=str(workdir / "old.key"))
    encrypted = fieldcrypt(
        "migrate", "--redis", url, "--config", "rules.yaml", cwd=workdir, env=env
    )
    assert encrypted.returncode == 0, encrypted.stderr
    assert_sealed_under(raw, old)

    # Re-key: the new key from --secret-file, old ones from --decrypt-file (repeatable).
    rekeyed = fieldcrypt(
        "migrate", "--redis", url, "--config", "rules.yaml", "--secret-file", "new.key",
        "--decrypt-file", "unrelated.key", "--decrypt-file", "old.key",
        cwd=workdir,
    )  # fmt: skip
    assert rekeyed.returncode == 0, rekeyed.stderr
    assert re.search(r"fields_rekeyed\s+5\b", rekeyed.stdout), rekeyed.stdout
    assert_sealed_under(raw, new)

    # Decrypt back: --decrypt-file alone.
    decrypted = fieldcrypt(
        "migrate", "--redis", url, "--config", "rules.yaml", "--decrypt-file", "new.key",
        cwd=workdir,
    )  # fmt: skip
    assert decrypted.returncode == 0, decrypted.stderr
    assert_cleartext(raw)

    for result in (encrypted, rekeyed, decrypted):
        assert ON_COMMAND_LINE not in result.stderr
        assert_shows_none_of(result, old, new, unrelated)


@pytest.mark.parametrize("flag", ["--secret-file", "--decrypt-file"])
@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot read key file {path}: No such file or directory"),
        ("", "the key in file {path} is empty; `fieldcrypt keygen` prints a new key"),
        (
            "base64:c2VjcmV0LWtleQ==",
            "key file {path}: a 'base64:' key must decode to exactly 32 bytes, not 10",
        ),
    ],
    ids=["missing", "empty", "not-a-key"],
)
def test_a_bad_key_file_gives_one_line_naming_the_file(
    raw: redis.Redis,
    server: EmbeddedServer,
    workdir: Path,
    flag: str,
    content: str | None,
    problem: str,
) -> None:
    path = "keys/fc.key"
    if content is not None:
        (workdir / "keys").mkdir()
        (workdir / path).write_text(content, encoding="ascii")

    result = fieldcrypt(
        "migrate", "--redis", server.url, "--config", "rules.yaml", flag, path, cwd=workdir
    )

    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"fieldcrypt migrate: {flag}: {problem.format(path=path)}"
    ]
    assert_shows_none_of(result, "c2VjcmV0LWtleQ")
    assert_cleartext(raw)


# --- secrets on the command line -----------------------------------------------------------


def test_migrate_warns_of_each_secret_on_the_command_line_without_showing_it(
    raw: redis.Redis, server: EmbeddedServer, workdir: Path
) -> None:
    new, old = generate_key(), generate_key()
    url = f"redis://{USER}:{PASSWORD}@127.0.0.1:{server.port}"

    result = fieldcrypt(
        "migrate", "--redis", url, "--config", "rules.yaml",
        "--secret", new, "--decrypt", old, "--decrypt", generate_key(),
        cwd=workdir,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert_sealed_under(raw, new)  # the flags still work
    warnings = [line for line in result.stderr.splitlines() if ON_COMMAND_LINE in line]
    assert [line.split(":", 3)[2].strip() for line in warnings] == [
        "--secret",
        "--decrypt",
        "--redis",
    ], result.stderr
    assert all(line.startswith("fieldcrypt migrate: warning: ") for line in warnings)
    assert "use --secret-file or FIELDCRYPT_SECRET_FILE" in warnings[0]
    assert "use --decrypt-file" in warnings[1]
    assert "FIELDCRYPT_UPSTREAM_PASSWORD_FILE" in warnings[2]
    assert_shows_none_of(result, new, old, PASSWORD)


def test_migrate_takes_the_password_from_the_environment_without_a_warning(
    raw: redis.Redis, server: EmbeddedServer, workdir: Path
) -> None:
    key_file(workdir, "new.key", secret := generate_key())
    key_file(workdir, "password", PASSWORD)
    env = clean_env(FIELDCRYPT_UPSTREAM_PASSWORD_FILE=str(workdir / "password"))

    result = fieldcrypt(
        "migrate", "--redis", f"redis://{USER}@127.0.0.1:{server.port}",
        "--config", "rules.yaml", "--secret-file", "new.key",
        cwd=workdir, env=env,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert_sealed_under(raw, secret)
    assert result.stderr == ""
    assert_shows_none_of(result, secret, PASSWORD)


def test_serve_warns_of_a_password_in_the_upstream_url_without_showing_it(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    url = f"redis://{USER}:{PASSWORD}@127.0.0.1:{server.port}"
    log_path = tmp_path / "fieldcrypt.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(FIELDCRYPT), "serve", "--listen", "127.0.0.1:0", "--upstream", url],
            cwd=tmp_path,
            env=clean_env(),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 20
        while not (found := re.search(r"listening on 127\.0\.0\.1:(\d+)", log_path.read_text())):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        with redis.Redis(port=int(found.group(1)), socket_timeout=10) as client:
            assert client.set("fc:secrets", "through the proxy")  # the password works
    finally:
        process.terminate()
        process.wait(20)
    text = log_path.read_text()
    warnings = [line for line in text.splitlines() if ON_COMMAND_LINE in line]
    assert len(warnings) == 1, text
    assert "WARNING --upstream: puts a secret on the command line" in warnings[0]
    assert "FIELDCRYPT_UPSTREAM_PASSWORD_FILE" in warnings[0]
    assert PASSWORD not in text
