"""Faults around the proxy (proxy/server.py, proxy/app.py): an upstream that is gone or
goes away, clients that send garbage, vanish, or never read, a proxy that must stop
cleanly, and logs that must never hold a value. Real servers and real clients only."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from proxy.resp import PROTO_INLINE_MAX_SIZE, encode_request
from tests.servers import (
    EmbeddedServer,
    ProxyThread,
    free_port,
    make_state,
    raw_connect,
    server_binary,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
SERVER_KINDS = ["redis", "valkey"]  # as the `upstream` fixture
UPSTREAM_MODES = ["pooled", "dedicated"]


# --- helpers ---------------------------------------------------------------------------


def read_to_end(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, str]:
    """What the peer sends until it hangs up, and how it ended: eof, reset or timeout."""
    sock.settimeout(timeout)
    data = bytearray()
    while len(data) < 64 * MiB:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(data), "reset"
        except TimeoutError:
            return bytes(data), "timeout"
        if not chunk:
            return bytes(data), "eof"
        data += chunk
    return bytes(data), "too much data"


def reset_close(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN, as a crashed client would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
    except ConnectionRefusedError:
        return True
    return False


def upstream_clients(server_port: int) -> list[dict[str, str]]:
    with redis.Redis(port=server_port) as client:
        return [entry for entry in client.client_list() if entry["id"] != str(client.client_id())]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDCRYPT_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class ProxyProcess:
    """`python -m proxy.cli serve` as a separate process, its output in files."""

    def __init__(self, directory: Path, upstream: str, *extra: str) -> None:
        self.stdout_path = directory / "proxy.stdout"
        self.stderr_path = directory / "proxy.stderr"
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "proxy.cli",
                    "serve",
                    "--listen",
                    "127.0.0.1:0",
                    "--upstream",
                    upstream,
                    *extra,
                ],
                stdout=out,
                stderr=err,
                cwd=directory,
                env=clean_env(),
            )
        self.port = self._wait_listening()

    def _wait_listening(self, timeout: float = 15.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.stderr())
            if found:
                return int(found.group(1))
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"the proxy did not start:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def output(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr()

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert found is not None, status
        return int(found.group(1)) * 1024

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        self.process.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 15.0) -> int:
        """The exit status, once the process ends by itself."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the proxy did not exit within {timeout:.0f}s")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def own_upstream(request: pytest.FixtureRequest) -> Iterator[EmbeddedServer]:
    """A server of the parametrized kind that the test may stop, kill or freeze."""
    server = EmbeddedServer(server_binary(request.param))
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.process.send_signal(signal.SIGCONT)
    server.stop()


own_upstream_kinds = pytest.mark.parametrize("own_upstream", SERVER_KINDS, indirect=True)


@pytest.fixture
def proxy_process(upstream: EmbeddedServer, tmp_path: Path) -> Iterator[ProxyProcess]:
    redis.Redis(port=upstream.port).flushall()
    handle = ProxyProcess(tmp_path, upstream.url)
    yield handle
    handle.kill()


# --- the upstream is gone, or goes ------------------------------------------------------


def test_redis_py_client_sees_upstream_unreachable_error() -> None:
    dead_port = free_port()
    handle = ProxyThread(make_state(dead_port))
    try:
        client = redis.Redis(port=handle.port, socket_timeout=10)
        with pytest.raises(redis.RedisError) as raised:
            client.set("k", "v")
        expected = f"fieldcrypt: upstream 127.0.0.1:{dead_port} unreachable (connection refused)"
        assert expected in str(raised.value)
        client.close()
    finally:
        handle.stop()


def test_raw_client_gets_upstream_unreachable_error_line_then_eof() -> None:
    dead_port = free_port()
    handle = ProxyThread(make_state(dead_port, upstream_mode="dedicated"))
    try:
        sock = raw_connect(handle.port)
        data, ending = read_to_end(sock)
        sock.close()
        assert data == (
            b"-ERR fieldcrypt: upstream 127.0.0.1:%d unreachable (connection refused)\r\n"
            % dead_port
        )
        assert ending == "eof"
        wait_for(lambda: handle.run(lambda: not handle.server.connections), what="no connection")
    finally:
        handle.stop()


@own_upstream_kinds
def test_client_blocked_in_blpop_gets_eof_when_its_upstream_connection_is_killed(
    own_upstream: EmbeddedServer,
) -> None:
    handle = ProxyThread(make_state(own_upstream.port, upstream_mode="dedicated"))
    try:
        sock = raw_connect(handle.port)
        sock.sendall(encode_request([b"BLPOP", b"fc:never", b"0"]))
        wait_for(
            lambda: any(c["cmd"] == "blpop" for c in upstream_clients(own_upstream.port)),
            what="BLPOP to reach the server",
        )
        with redis.Redis(port=own_upstream.port) as direct:
            assert direct.client_kill_filter(_type="normal", skipme=True) == 1
        data, ending = read_to_end(sock)
        sock.close()
        assert (data, ending) == (b"", "eof")
        wait_for(lambda: handle.run(lambda: not handle.server.connections), what="no connection")
        assert handle.run(lambda: handle.state.stats.connections_open) == 0
    finally:
        handle.stop()


@own_upstream_kinds
def test_client_gets_eof_when_the_upstream_server_stops_and_new_clients_get_an_error(
    own_upstream: EmbeddedServer,
) -> None:
    handle = ProxyThread(make_state(own_upstream.port, upstream_mode="dedicated"))
    try:
        sock = raw_connect(handle.port)
        sock.sendall(b"PING\r\n")
        assert sock.recv(100) == b"+PONG\r\n"
        own_upstream.stop()
        data, ending = read_to_end(sock)
        sock.close()
        assert (data, ending) == (b"", "eof")
        late = raw_connect(handle.port)
        data, ending = read_to_end(late)
        late.close()
        assert data.startswith(
            b"-ERR fieldcrypt: upstream 127.0.0.1:%d unreachable" % own_upstream.port
        )
        assert ending == "eof"
    finally:
        handle.stop()


# --- clients that send garbage --------------------------------------------------------

MALFORMED = {
    "multibulk length too big": b"*20000000000\r\n",
    "multibulk length over UINT_MAX": b"*4294967295\r\n",
    "not a bulk where one is due": b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\nfooz\r\n",
    "negative bulk length": b"*1\r\n$-10\r\n",
    "bulk over 512MB": b"*1\r\n$536870913\r\n",
    "bulk length with a plus sign": b"*1\r\n$+4\r\nPING\r\n",
    "unbalanced quotes": b'SET k "abc\r\n',
    "inline over 64KB": b"a" * (PROTO_INLINE_MAX_SIZE + 1),
    "pipelined after good requests": b"PING\r\n*1\r\n$4\r\nPING\r\n*-5\r\n\r\nPING\r\n*x\r\n",
    "error after a write": b"*3\r\n$3\r\nSET\r\n$5\r\nfc:pe\r\n$1\r\nv\r\n*1\r\n$-2\r\n",
}


def answer_to(port: int, data: bytes, timeout: float = 3.0) -> tuple[bytes, str]:
    """Everything the server says to `data` until it hangs up (`timeout` bounds the wait:
    Redis answers these at once)."""
    sock = raw_connect(port)
    sock.sendall(data)
    answer = read_to_end(sock, timeout)
    sock.close()
    return answer


def first_reply_line(port: int, data: bytes, timeout: float = 2.0) -> bytes:
    sock = raw_connect(port)
    sock.settimeout(timeout)
    sock.sendall(data)
    line = bytearray()
    try:
        while not line.endswith(b"\r\n") and len(line) < 4096:
            chunk = sock.recv(1)
            if not chunk:
                break
            line += chunk
    except TimeoutError:
        pass  # what came so far is the answer
    finally:
        sock.close()
    return bytes(line)


@pytest.mark.parametrize("stream", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_request_gets_redis_exact_protocol_error_then_close(
    upstream: EmbeddedServer, proxy: ProxyThread, stream: bytes
) -> None:
    bystander = redis.Redis(port=proxy.port, socket_timeout=10)
    assert bystander.ping()
    direct_answer = answer_to(upstream.port, stream)
    assert direct_answer[0].endswith(b"\r\n") and b"-ERR Protocol error: " in direct_answer[0]
    assert direct_answer[1] == "eof"
    proxied_answer = answer_to(proxy.port, stream)
    assert proxied_answer == direct_answer
    assert bystander.set("fc:after", "still working")
    assert bystander.get("fc:after") == b"still working"
    assert redis.Redis(port=proxy.port, socket_timeout=10).ping()
    bystander.close()


@pytest.mark.parametrize("line", [b"PING\n", b"ECHO -\n", b"-\n", b":1\n", b"_\n"])
def test_inline_command_ending_in_lf_gets_the_same_reply_as_from_redis(
    upstream: EmbeddedServer, proxy: ProxyThread, line: bytes
) -> None:
    # nc and telnet users type these; a word may start with a RESP type byte.
    direct = first_reply_line(upstream.port, line)
    assert direct.endswith(b"\r\n")
    assert first_reply_line(proxy.port, line) == direct


@pytest.mark.parametrize("own_upstream", ["redis"], indirect=True)
def test_inline_command_with_a_nul_byte_does_not_freeze_the_proxy(
    own_upstream: EmbeddedServer, tmp_path: Path
) -> None:
    # A separate process: a proxy that loops forever must not take pytest with it.
    proxy_process = ProxyProcess(tmp_path, own_upstream.url)
    sender = raw_connect(proxy_process.port)
    sender.sendall(b"PING\x00x\r\n")
    other = raw_connect(proxy_process.port)
    other.settimeout(5)  # a bound: the proxy answers PING at once unless it is stuck
    try:
        other.sendall(b"PING\r\n")
        try:
            answer = other.recv(100)
        except TimeoutError:
            pytest.fail("after a NUL byte from one client, the proxy answered no other client")
        assert answer == b"+PONG\r\n"
    finally:
        other.close()
        sender.close()
        proxy_process.kill()


@pytest.mark.parametrize("own_upstream", ["redis"], indirect=True)
def test_a_huge_array_header_does_not_stall_other_clients(
    own_upstream: EmbeddedServer, tmp_path: Path
) -> None:
    # 2147483648 > INT_MAX: Redis refuses it at once, with nothing allocated.
    proxy_process = ProxyProcess(tmp_path, own_upstream.url)
    other = raw_connect(proxy_process.port)
    other.settimeout(5)  # a bound: the proxy answers PING at once unless it is stuck
    try:
        other.sendall(b"PING\r\n")
        assert other.recv(100) == b"+PONG\r\n"
        attacker = raw_connect(proxy_process.port)
        attacker.sendall(b"*2147483648\r\n")
        assert attacker.recv(100) == b"-ERR Protocol error: invalid multibulk length\r\n"
        other.sendall(b"PING\r\n")
        try:
            answer = other.recv(100)
        except TimeoutError:
            pytest.fail("after one client's huge array header, the proxy answered no other client")
        assert answer == b"+PONG\r\n"
        attacker.close()
    finally:
        other.close()
        proxy_process.kill()


# --- clients that vanish ----------------------------------------------------------------


def proxy_upstream_address(handle: ProxyThread) -> str:
    """host:port of the single upstream connection the proxy holds, as CLIENT LIST shows it."""

    def find() -> str | None:
        for connection in handle.server.connections:
            upstream = connection.upstream
            if upstream is not None and upstream.transport is not None:
                host, port = upstream.transport.get_extra_info("sockname")[:2]
                return f"{host}:{port}"
        return None

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        address = handle.run(find)
        if address is not None:
            return address
        time.sleep(0.02)
    raise AssertionError("the proxy opened no upstream connection")


@pytest.mark.parametrize("hang_up", ["rst", "fin"])
def test_client_vanishing_mid_pipeline_leaves_no_connection_task_or_upstream_behind(
    upstream: EmbeddedServer, dedicated_proxy: ProxyThread, hang_up: str
) -> None:
    tasks_before = dedicated_proxy.run(lambda: len(asyncio.all_tasks(dedicated_proxy.loop)))
    value = b"v" * 100
    pipeline = b"".join(
        encode_request([b"SET", b"fc:vanish:%d" % (i % 100), value]) for i in range(10_000)
    )
    half = b"*3\r\n$3\r\nSET\r\n$5\r\nfc:xx\r\n$100\r\nvvvvv"
    sock = raw_connect(dedicated_proxy.port)
    sock.sendall(pipeline + half)
    address = proxy_upstream_address(dedicated_proxy)
    assert any(c["addr"] == address for c in upstream_clients(upstream.port))
    with redis.Redis(port=upstream.port) as direct:
        wait_for(lambda: direct.dbsize() > 0, what="the pipeline to reach the server")
    if hang_up == "rst":
        reset_close(sock)
    else:
        sock.close()

    wait_for(
        lambda: dedicated_proxy.run(lambda: not dedicated_proxy.server.connections),
        what="no connection",
    )
    assert dedicated_proxy.run(lambda: dedicated_proxy.state.stats.connections_open) == 0
    assert dedicated_proxy.run(lambda: len(asyncio.all_tasks(dedicated_proxy.loop))) == tasks_before
    wait_for(
        lambda: all(c["addr"] != address for c in upstream_clients(upstream.port)),
        what="the upstream connection to close",
    )


# --- clients that never read: memory stays bounded --------------------------------------

RSS_BOUND = 150 * MiB
PIPELINE_TOTAL = 200 * MiB


def pipeline_without_reading(handle: ProxyProcess, total: int) -> tuple[int, int]:
    """Write SETs with 1 KB values until `total` bytes are out or the socket stays blocked
    for 2 s; never read. Returns (bytes written, the proxy's largest RSS seen)."""
    value = b"x" * 1024
    chunk = memoryview(
        b"".join(encode_request([b"SET", b"fc:mem:%d" % (i % 16), value]) for i in range(64))
    )
    sock = raw_connect(handle.port)
    sock.setblocking(False)
    written = offset = 0
    largest = handle.rss_bytes()
    next_sample = 0
    deadline = time.monotonic() + 90  # a bound on the loop, not an expectation
    blocked_since: float | None = None
    try:
        while written < total and time.monotonic() < deadline:
            try:
                sent = sock.send(chunk[offset:])
            except BlockingIOError:
                sent = 0
            if sent:
                blocked_since = None
                written += sent
                offset = (offset + sent) % len(chunk)
            else:
                now = time.monotonic()
                blocked_since = blocked_since or now
                if now - blocked_since > 2:
                    break
                select.select([], [sock], [], 0.2)
            if written >= next_sample or not sent:
                largest = max(largest, handle.rss_bytes())
                next_sample = written + 4 * MiB
        largest = max(largest, handle.rss_bytes())
    finally:
        reset_close(sock)
    return written, largest


# One server kind: 200 MB through the proxy is the slow part, and the bound is the proxy's.
@pytest.mark.parametrize("own_upstream", ["redis"], indirect=True)
def test_proxy_memory_stays_bounded_while_a_client_pipelines_200mb_and_never_reads(
    own_upstream: EmbeddedServer, tmp_path: Path
) -> None:
    handle = ProxyProcess(tmp_path, own_upstream.url)
    try:
        written, largest = pipeline_without_reading(handle, PIPELINE_TOTAL)
        # Either all 200 MB went through, or the proxy pushed back: both within the bound.
        assert written > 0
        assert largest < RSS_BOUND, f"proxy RSS reached {largest / MiB:.0f} MiB"
        assert redis.Redis(port=handle.port, socket_timeout=10).ping()
    finally:
        handle.kill()


@own_upstream_kinds
def test_proxy_stops_reading_a_client_while_the_upstream_is_frozen(
    own_upstream: EmbeddedServer, tmp_path: Path
) -> None:
    handle = ProxyProcess(tmp_path, own_upstream.url)
    try:
        assert redis.Redis(port=handle.port, socket_timeout=10).ping()
        assert own_upstream.process is not None
        own_upstream.process.send_signal(signal.SIGSTOP)
        try:
            written, largest = pipeline_without_reading(handle, PIPELINE_TOTAL)
        finally:
            own_upstream.process.send_signal(signal.SIGCONT)
        assert written < PIPELINE_TOTAL, "the proxy kept reading with nowhere to send"
        assert largest < RSS_BOUND, f"proxy RSS reached {largest / MiB:.0f} MiB"
    finally:
        handle.kill()


# --- logs never hold values -----------------------------------------------------------

SECRET = "Zq9-s3cr3t-value-7Hk"


@own_upstream_kinds
def test_proxy_never_logs_command_arguments_or_values(
    own_upstream: EmbeddedServer, tmp_path: Path
) -> None:
    handle = ProxyProcess(tmp_path, own_upstream.url, "--log-level", "debug")
    secret = SECRET.encode()
    try:
        client = redis.Redis(port=handle.port, socket_timeout=10)
        client.set(f"fc:{SECRET}", SECRET)
        client.hset("fc:h", mapping={"token": SECRET, SECRET: "x"})
        assert client.get(f"fc:{SECRET}") == secret
        auth = raw_connect(handle.port)
        auth.sendall(encode_request([b"AUTH", b"fc-user", secret]))
        assert auth.recv(1000).startswith(b"-WRONGPASS")
        auth.close()
        for garbage in (
            b'SET k "' + secret + b"\r\n",
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n" + secret + b"\r\n",
            b"*2\r\n$3\r\nGET\r\n$-" + secret + b"\r\n",
            b"*1\r\n$" + secret + b"\r\n",
        ):
            assert answer_to(handle.port, garbage)[0].startswith(b"-ERR")
        half = raw_connect(handle.port)
        half.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$100\r\n" + secret)
        reset_close(half)
        blocked = raw_connect(handle.port)
        blocked.sendall(encode_request([b"BLPOP", secret, b"0"]))
        wait_for(
            lambda: any(c["cmd"] == "blpop" for c in upstream_clients(own_upstream.port)),
            what="BLPOP to reach the server",
        )
        own_upstream.stop()
        read_to_end(blocked)
        blocked.close()
        client.close()
        with contextlib.suppress(redis.RedisError):
            redis.Redis(port=handle.port, socket_timeout=10).set(SECRET, SECRET)
        assert handle.stop() == 0
    finally:
        handle.kill()
    output = handle.output()
    assert "fieldcrypt listening on" in output and "fieldcrypt stopped" in output
    assert SECRET.lower() not in output.lower()


@own_upstream_kinds
def test_upstream_password_is_never_logged_nor_sent_to_clients(
    own_upstream: EmbeddedServer, tmp_path: Path
) -> None:
    url = f"redis://fc-user:{SECRET}@127.0.0.1:{own_upstream.port}"
    handle = ProxyProcess(tmp_path, url, "--log-level", "debug")
    try:
        answer, ending = answer_to(handle.port, b"PING\r\n")
        assert answer.startswith(b"-")  # the server has no such user
        assert ending == "eof"
        assert SECRET.encode() not in answer
        assert handle.stop() == 0
    finally:
        handle.kill()
    assert SECRET not in handle.output()


# --- stopping -------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_accepting_lets_the_blocked_reply_finish_and_exits_0(
    upstream: EmbeddedServer, proxy_process: ProxyProcess, sig: int
) -> None:
    key = b"fc:queue:%d" % sig
    blocked = raw_connect(proxy_process.port)
    blocked.sendall(encode_request([b"BLPOP", key, b"8"]))
    idle = raw_connect(proxy_process.port)
    idle.sendall(b"PING\r\n")
    assert idle.recv(100) == b"+PONG\r\n"
    wait_for(
        lambda: any(c["cmd"] == "blpop" for c in upstream_clients(upstream.port)),
        what="BLPOP to reach the server",
    )

    proxy_process.process.send_signal(sig)
    wait_for(lambda: refuses_connections(proxy_process.port), what="the listener to close")
    assert read_to_end(idle) == (b"", "eof")
    with redis.Redis(port=upstream.port) as direct:
        assert direct.lpush(key, b"job") == 1
    reply, ending = read_to_end(blocked)
    assert reply == b"*2\r\n$%d\r\n%s\r\n$3\r\njob\r\n" % (len(key), key)
    assert ending == "eof"
    assert proxy_process.wait() == 0

    log = proxy_process.stderr()
    assert len(re.findall(r"fieldcrypt listening on ", log)) == 1, log
    assert len(re.findall(r"fieldcrypt stopped", log)) == 1, log
    assert "Traceback" not in log
