"""The servers under test: starting them on free loopback ports, reading their
CPU time and memory from /proc, stopping them.

Every process started here is remembered and stopped by its pid (and its
worker processes by theirs) when the benchmark ends, however it ends.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: where `proxy/` lives
HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class ServerError(Exception):
    """A server did not start or did not answer."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def ping(port: int, timeout: float = 2.0) -> bool:
    """True when something on `port` answers PING with +PONG."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")  # twemproxy takes no inline commands
            reply = b""
            while not reply.endswith(b"\r\n"):
                chunk = sock.recv(64)
                if not chunk:
                    return False
                reply += chunk
            return reply.startswith(b"+PONG")
    except OSError:
        return False


# --- /proc --------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...


def descendants(pid: int) -> list[int]:
    """`pid` and every live process below it (fieldcrypt's --workers children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found = [pid]
    index = 0
    while index < len(found):
        found.extend(children.get(found[index], []))
        index += 1
    return found


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes, in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / CLOCK_TICKS


def status_kb(pids: list[int], name: str) -> int:
    """The sum of one /proc/<pid>/status line (VmRSS, VmHWM), in KiB."""
    total = 0
    for pid in pids:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith(name + ":"):
                total += int(line.split()[1])
    return total


def open_fds(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def nofile_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE of a running process."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise ServerError(f"no open-files limit in /proc/{pid}/limits")


# --- processes ------------------------------------------------------------------


@dataclass
class Server:
    """One started server process (for fieldcrypt --workers, the parent of the workers)."""

    name: str
    port: int
    popen: subprocess.Popen[bytes]
    log: Path
    processes: int = 1  # how many processes make it up once it is ready
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        return descendants(self.pid) if self.alive() else []

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def rss_kb(self) -> int:
        return status_kb(self.pids(), "VmRSS")

    def hwm_kb(self) -> int:
        return status_kb(self.pids(), "VmHWM")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerError(
                    f"{self.name} exited with code {self.popen.returncode}:\n{self.log_tail()}"
                )
            if ping(self.port, timeout=1.0) and len(self.pids()) >= self.processes:
                return
            time.sleep(0.1)
        raise ServerError(f"{self.name} did not answer PING within {timeout:.0f}s")

    def stop(self, timeout: float = 15.0) -> None:
        if not self.alive():
            return
        pids = self.pids()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.popen.wait(5)
        for pid in pids[1:]:  # workers that outlived their parent
            if _stat_fields(pid) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


_started: list[Server] = []


def stop_all() -> None:
    while _started:
        _started.pop().stop()


atexit.register(stop_all)


def _spawn(
    name: str,
    port: int,
    command: list[str],
    workdir: Path,
    env: dict[str, str] | None = None,
    processes: int = 1,
) -> Server:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
        )
    server = Server(name, port, popen, log, processes)
    _started.append(server)
    try:
        server.wait_ready()
    except ServerError:
        server.stop()
        raise
    return server


def stop(server: Server) -> None:
    server.stop()
    if server in _started:
        _started.remove(server)


def start_redis(workdir: Path) -> Server:
    port = free_port()
    command = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        HOST,
        "--save",
        "",
        "--appendonly",
        "no",
        "--maxclients",
        "12000",  # the 10,000 idle connections test goes through to Redis
        "--dir",
        str(workdir),
    ]
    return _spawn("redis", port, command, workdir)


def proxy_env(root: Path = ROOT) -> dict[str, str]:
    """The environment for fieldcrypt: `root`'s proxy/ importable (first on the path, ahead
    of the editable install), no FIELDCRYPT_* leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDCRYPT_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


_fieldcrypt_root = ROOT  # where `fieldcrypt serve` takes proxy/ from


def use_fieldcrypt_from(root: Path) -> None:
    """Run every fieldcrypt started from now on from `root`/proxy (an export_proxy of a
    commit), not from the working tree, which may change while the benchmark runs."""
    global _fieldcrypt_root
    _fieldcrypt_root = root


def export_proxy(ref: str, into: Path) -> Path:
    """proxy/ as it was at git `ref`, extracted under `into` (git archive: the repository
    and its worktree are left as they are); the directory to put on PYTHONPATH."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref, "proxy"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if archive.returncode != 0:
        raise ServerError(f"git archive {ref} proxy: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True, timeout=60)
    return into


def fieldcrypt_supports_workers() -> bool:
    """Whether `fieldcrypt serve` has --workers (it may not, in older checkouts)."""
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", "--help"],
        capture_output=True,
        env=proxy_env(_fieldcrypt_root),
        cwd=_fieldcrypt_root,
        timeout=60,
        check=False,
    )
    return b"--workers" in result.stdout


def keygen() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "keygen"],
        capture_output=True,
        env=proxy_env(_fieldcrypt_root),
        cwd=_fieldcrypt_root,
        timeout=60,
        check=True,
    )
    return result.stdout.decode().strip()


def serve_command(port: int, upstream_url: str) -> list[str]:
    """`fieldcrypt serve` listening on HOST:`port` in front of `upstream_url`."""
    return [
        sys.executable,
        "-m",
        "proxy.cli",
        "serve",
        "--listen",
        f"{HOST}:{port}",
        "--upstream",
        upstream_url,
    ]


def start_fieldcrypt(
    name: str,
    workdir: Path,
    upstream_port: int,
    config: Path | None = None,
    workers: int | None = None,
    mode: str | None = None,
    pool_size: int | None = None,
    root: Path | None = None,
) -> Server:
    """`fieldcrypt serve` on a free port. `mode` ("pooled" or "dedicated") and `pool_size`
    are passed as FIELDCRYPT_UPSTREAM_MODE / FIELDCRYPT_UPSTREAM_POOL_SIZE; None leaves
    fieldcrypt's default."""
    port = free_port()
    command = serve_command(port, f"redis://{HOST}:{upstream_port}")
    if config is not None:
        command += ["--config", str(config)]
    if workers is not None:
        command += ["--workers", str(workers)]
    processes = 1 + workers if workers is not None and workers > 1 else 1
    env = proxy_env(root or _fieldcrypt_root)
    if mode is not None:
        env["FIELDCRYPT_UPSTREAM_MODE"] = mode
    if pool_size is not None:
        env["FIELDCRYPT_UPSTREAM_POOL_SIZE"] = str(pool_size)
    server = _spawn(name, port, command, workdir, env, processes)
    server.extra.update(mode=mode or "default", workers=workers or 1)
    return server


def start_forwarder(workdir: Path, upstream_port: int) -> Server:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "bench.forwarder",
        "--listen",
        f"{HOST}:{port}",
        "--upstream",
        f"{HOST}:{upstream_port}",
    ]
    return _spawn("forwarder", port, command, workdir, proxy_env())


def nutcracker_binary() -> str | None:
    return shutil.which("nutcracker") or next(
        (p for p in ("/usr/sbin/nutcracker", "/usr/bin/nutcracker") if os.access(p, os.X_OK)),
        None,
    )


def start_twemproxy(binary: str, workdir: Path, upstream_port: int) -> Server:
    port = free_port()
    stats_port = free_port()
    config = workdir / "nutcracker.yml"
    config.write_text(
        "bench:\n"
        f"  listen: {HOST}:{port}\n"
        "  redis: true\n"
        "  hash: fnv1a_64\n"
        "  distribution: ketama\n"
        "  servers:\n"
        f"    - {HOST}:{upstream_port}:1\n"
    )
    command = [
        binary,
        "--conf-file",
        str(config),
        "--stats-addr",
        HOST,
        "--stats-port",
        str(stats_port),
        "--output",
        str(workdir / "nutcracker.out"),
    ]
    return _spawn("twemproxy", port, command, workdir)
