"""The `fieldcrypt` command (proxy/cli.py, proxy/app.py, proxy/config.py), run as a user
runs it: `python -m proxy.cli ...` in a fresh process, with its own working directory
and environment."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from proxy.cli import cli_command
from tests.servers import (
    EmbeddedServer,
    ProxyThread,
    free_port,
    make_state,
    server_binary,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
URL_PASSWORD = "Pw-7xQ-never-shown"


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without FIELDCRYPT_* settings, able to import `proxy`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDCRYPT_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def fieldcrypt(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", *args],
        cwd=cwd,
        env=env or clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_to_end(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = fieldcrypt(*args, cwd=cwd, env=env)
    try:
        out, err = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"fieldcrypt {' '.join(args)} did not exit within 30s:\n{err}")
    return process.returncode, out, err


class Serve:
    """A running `fieldcrypt serve`; its stderr (the log) goes to a file we can poll."""

    def __init__(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = cwd / "fieldcrypt.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "serve", *args],
                cwd=cwd,
                env=env or clean_env(),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        self.port = int(self.wait_for_log(r"fieldcrypt listening on 127\.0\.0\.1:(\d+)"))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log())
            if found:
                return found.group(1)
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"no log line matching {pattern!r}:\n{self.log()}")

    def stop(self, timeout: float = 20.0) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"fieldcrypt serve did not exit within {timeout:.0f}s of SIGTERM")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def is_listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def real_upstream() -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(server_binary("redis"))
    server.start()
    yield server
    server.stop()


# --- --embedded ------------------------------------------------------------------------


def test_serve_embedded_answers_commands_and_stops_its_server_on_sigterm(tmp_path: Path) -> None:
    serve = Serve("--embedded", "--listen", f"127.0.0.1:{free_port()}", cwd=tmp_path)
    try:
        logged_port = int(
            serve.wait_for_log(r"embedded server \S+ started on redis://[\d.]+:(\d+)")
        )
        client = redis.Redis(port=serve.port, socket_timeout=10)
        assert client.ping()
        assert client.set("fc:cli", "hello")
        assert client.get("fc:cli") == b"hello"
        info = client.info("server")
        client.close()
        assert info["tcp_port"] == logged_port
        server_pid = int(info["process_id"])
        assert is_listening(logged_port)

        assert serve.stop() == 0
    finally:
        serve.kill()
    assert not is_listening(logged_port)
    wait_for(lambda: not Path(f"/proc/{server_pid}").exists(), what="the embedded server to exit")
    assert "embedded server stopped" in serve.log()


def test_serve_embedded_uses_valkey_when_redis_server_is_not_on_path(tmp_path: Path) -> None:
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = clean_env(PATH=str(empty_bin))
    serve = Serve("--embedded", "--listen", "127.0.0.1:0", cwd=tmp_path, env=env)
    try:
        client = redis.Redis(port=serve.port, socket_timeout=10)
        info = client.info("server")
        client.close()
        assert info.get("server_name") == "valkey" or "valkey_version" in info, info
        assert serve.stop() == 0
    finally:
        serve.kill()
    assert "valkey-server" in serve.log()


# --- arguments -------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"]], ids=["top", "serve"])
def test_help_exits_0_and_prints_usage(tmp_path: Path, args: list[str]) -> None:
    code, out, _ = run_to_end(*args, cwd=tmp_path)
    assert code == 0
    assert out.startswith("usage: fieldcrypt")


HELP_EXAMPLE = re.compile(r"^examples?:\n(  fieldcrypt .+\n)+", re.MULTILINE)


@pytest.mark.parametrize(
    "command", ["", "serve", "check-config", "keygen", "migrate", "cli"], ids=lambda c: c or "top"
)
def test_help_shows_an_example(tmp_path: Path, command: str) -> None:
    code, out, _ = run_to_end(*([command] if command else []), "--help", cwd=tmp_path)
    assert code == 0
    example = HELP_EXAMPLE.search(out)
    assert example is not None, out
    if command:
        assert f"  fieldcrypt {command} " in example.group(0)


def test_dev_py_lists_what_it_can_do(tmp_path: Path) -> None:
    for args, expected_code in ((["--help"], 0), ([], 2)):
        done = subprocess.run(
            [sys.executable, str(ROOT / "dev.py"), *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == expected_code
        listing = done.stdout + done.stderr
        for command in ("serve", "cli", "test", "bench"):
            assert re.search(rf"^  {command} ", listing, re.MULTILINE), listing
        assert "python3 dev.py cli " in listing


def test_serve_help_lists_its_flags(tmp_path: Path) -> None:
    _, out, _ = run_to_end("serve", "--help", cwd=tmp_path)
    for flag in ("--listen", "--upstream", "--config", "--embedded", "--log-level"):
        assert flag in out


@pytest.mark.parametrize("args", [["--bogus"], ["serve", "--bogus"], ["nonsense"]])
def test_unknown_flag_or_command_exits_2(tmp_path: Path, args: list[str]) -> None:
    code, _, err = run_to_end(*args, cwd=tmp_path)
    assert code == 2
    assert "usage: fieldcrypt" in err


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379",
        "127.0.0.1:6379",
        "redis://127.0.0.1:notaport",
        "redis://127.0.0.1:6379/zero",
        f"redis://admin:{URL_PASSWORD}@127.0.0.1:99999",
        f"redis://admin:{URL_PASSWORD}@/0",
    ],
)
def test_wrong_upstream_url_gives_a_one_line_error_and_exit_2(tmp_path: Path, url: str) -> None:
    code, out, err = run_to_end("serve", "--listen", "127.0.0.1:0", "--upstream", url, cwd=tmp_path)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fieldcrypt: --upstream: ")
    assert URL_PASSWORD not in out + err


def test_listen_on_a_port_in_use_gives_a_clear_error_and_nonzero_exit(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run_to_end(
            "serve",
            "--listen",
            f"127.0.0.1:{port}",
            "--upstream",
            f"redis://127.0.0.1:{free_port()}",
            cwd=tmp_path,
        )
    assert code != 0
    assert f"cannot listen on 127.0.0.1:{port}" in err
    assert "address already in use" in err.lower()
    assert "Traceback" not in err


# --- settings from the environment and .env ----------------------------------------------


def write_dotenv(directory: Path, settings: dict[str, str]) -> None:
    lines = [f"{name}={value}" for name, value in settings.items()]
    (directory / ".env").write_text("# written by test_cli\n" + "\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("dotenv", "environment", "flags", "winner"),
    [
        ({"LISTEN": "a", "UPSTREAM": "real"}, {}, {}, "a"),
        ({}, {"LISTEN": "b", "UPSTREAM": "real"}, {}, "b"),
        ({"LISTEN": "a", "UPSTREAM": "dead"}, {"LISTEN": "b", "UPSTREAM": "real"}, {}, "b"),
        (
            {"LISTEN": "a", "UPSTREAM": "dead"},
            {"LISTEN": "b", "UPSTREAM": "dead"},
            {"listen": "c", "upstream": "real"},
            "c",
        ),
    ],
    ids=["dotenv", "environment", "environment-over-dotenv", "flags-over-both"],
)
def test_serve_takes_listen_and_upstream_from_flags_then_environment_then_dotenv(
    tmp_path: Path,
    real_upstream: EmbeddedServer,
    dotenv: dict[str, str],
    environment: dict[str, str],
    flags: dict[str, str],
    winner: str,
) -> None:
    ports = {name: free_port() for name in "abc"}
    values = {
        **{name: f"127.0.0.1:{port}" for name, port in ports.items()},
        "real": real_upstream.url,
        "dead": f"redis://127.0.0.1:{free_port()}",
    }
    write_dotenv(tmp_path, {f"FIELDCRYPT_{k}": values[v] for k, v in dotenv.items()})
    env = clean_env(**{f"FIELDCRYPT_{k}": values[v] for k, v in environment.items()})
    args = [item for name, value in flags.items() for item in (f"--{name}", values[value])]
    serve = Serve(*args, cwd=tmp_path, env=env)
    try:
        assert serve.port == ports[winner]
        assert f"upstream 127.0.0.1:{real_upstream.port}" in serve.log()
        client = redis.Redis(port=serve.port, socket_timeout=10)
        client.set("fc:cli:setting", winner)
        client.close()
        with redis.Redis(port=real_upstream.port) as direct:
            assert direct.get("fc:cli:setting") == winner.encode()
        assert serve.stop() == 0
    finally:
        serve.kill()


def test_an_upstream_that_never_answers_does_not_keep_the_proxy_from_listening(
    tmp_path: Path,
) -> None:
    """The proxy asks its upstream for `databases` at start, in the background: an
    upstream that accepts but never answers the AUTH handshake must not hold it up."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        upstream = f"redis://:secret@127.0.0.1:{silent.getsockname()[1]}"
        serve = Serve("--listen", "127.0.0.1:0", "--upstream", upstream, cwd=tmp_path)
        try:
            assert is_listening(serve.port)
            assert serve.stop() == 0
        finally:
            serve.kill()


# --- fieldcrypt cli ---------------------------------------------------------------------


def test_cli_talks_to_the_proxy(real_upstream: EmbeddedServer, tmp_path: Path) -> None:
    proxy = ProxyThread(make_state(real_upstream.port))
    try:
        pinged = run_to_end("cli", "-p", str(proxy.port), "PING", cwd=tmp_path)
        written = run_to_end(
            "cli", "-p", str(proxy.port), "HSET", "fc:cli:h", "f", "v", cwd=tmp_path
        )
    finally:
        proxy.stop()
    assert pinged == (0, "PONG\n", "")
    assert written[:2] == (0, "1\n")
    with redis.Redis(port=real_upstream.port) as direct:
        assert direct.hget("fc:cli:h", "f") == b"v"


def test_cli_reports_a_proxy_that_is_not_there(tmp_path: Path) -> None:
    code, out, err = run_to_end("cli", "-p", str(free_port()), "PING", cwd=tmp_path)
    assert code != 0
    assert "PONG" not in out
    assert "Could not connect" in out + err


@pytest.mark.parametrize(
    ("arguments", "passed"),
    [
        (["PING"], ["-p", "6380", "PING"]),
        ([], ["-p", "6380"]),
        (["-p", "7000", "PING"], ["-p", "7000", "PING"]),
        (["-h", "127.0.0.2", "PING"], ["-h", "127.0.0.2", "PING"]),
        (["-u", "redis://127.0.0.1:7000", "PING"], ["-u", "redis://127.0.0.1:7000", "PING"]),
        (["-s", "/tmp/redis.sock"], ["-s", "/tmp/redis.sock"]),
        # a -p after the command is the command's argument
        (["-n", "2", "HGET", "k", "-p"], ["-p", "6380", "-n", "2", "HGET", "k", "-p"]),
        (["--", "--help"], ["-p", "6380", "--help"]),
    ],
)
def test_cli_points_at_port_6380_unless_told_where(arguments: list[str], passed: list[str]) -> None:
    command = cli_command(arguments)
    assert Path(command[0]).name in ("valkey-cli", "redis-cli")
    assert command[1:] == passed
