"""Clients that have not authenticated to the proxy (client_password set) cost next to
nothing: no upstream connection, Redis's own limits on what they may send, no counter
by command name; and a reload applies new admin, client and upstream passwords.

Everything runs for real: the `redis` kind's server requiring a password (which is also the
reference for what an unauthenticated client is answered), fieldcrypt in a thread of
the test process or as the `fieldcrypt serve` subprocess, bare sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client import generate_latest

from proxy import resp
from proxy.app import Runtime, exposure_warning
from proxy.cluster_server import ClusterServer
from proxy.config import Settings, load_settings
from proxy.metrics import Metrics, command_totals
from proxy.pooled import SPARES
from tests.servers import (
    EmbeddedServer,
    ProxyThread,
    ServeProcess,
    raw_connect,
    read_exactly,
    server_binary,
    wait_for,
)
from tests.test_cluster import Cluster

HOST = "127.0.0.1"
UPSTREAM_PW = "upstream-secret-7f1c"
CLIENT_PW = "client-secret-0b9e"
ADMIN_PW = "admin-secret-55d2"
NOAUTH = b"-NOAUTH Authentication required.\r\n"
WRONGPASS = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
SILENCE = 0.4  # seconds without a byte from a socket that stays open


@pytest.fixture(scope="module")
def locked_redis() -> Iterator[EmbeddedServer]:
    """The `redis` kind's server requiring UPSTREAM_PW: the proxy's upstream, and the
    reference for how Redis answers a client that has not authenticated."""
    server = EmbeddedServer(server_binary("redis"))
    server.start()
    with redis.Redis(host=HOST, port=server.port) as client:
        client.config_set("requirepass", UPSTREAM_PW)
    yield server
    server.stop()


def upstream_url(server: EmbeddedServer) -> str:
    return f"redis://:{UPSTREAM_PW}@{HOST}:{server.port}"


def admin_redis(server: EmbeddedServer) -> redis.Redis:
    return redis.Redis(host=HOST, port=server.port, password=UPSTREAM_PW)


@pytest.fixture(params=["pooled", "dedicated"])
def gated(
    locked_redis: EmbeddedServer, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[ProxyThread]:
    """fieldcrypt as `fieldcrypt serve` builds it, with client_password, in a thread, in
    each upstream mode."""
    url = upstream_url(locked_redis)
    path = tmp_path / "fieldcrypt.yaml"
    config = {"upstream": url, "client_password": CLIENT_PW, "upstream_mode": request.param}
    path.write_text(yaml.safe_dump(config))
    settings = load_settings(str(path), {}, {}, tmp_path)
    proxy = ProxyThread(Runtime(settings, url, {}).state)
    yield proxy
    proxy.stop()


def exchange(port: int, data: bytes) -> bytes:
    """What a server answers `data` with, then b"<closed>" if it closed the connection
    or b"<open>" if it kept it open and said nothing more for SILENCE seconds."""
    sock = raw_connect(port)
    try:
        sock.sendall(data)
        sock.settimeout(SILENCE)
        answer = bytearray()
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return bytes(answer) + b"<open>"
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return bytes(answer) + b"<closed>"
            answer += chunk
    finally:
        sock.close()


def request(*args: str | bytes) -> bytes:
    return resp.encode_request([a.encode() if isinstance(a, str) else a for a in args])


def connected_clients(server: EmbeddedServer) -> int:
    with admin_redis(server) as client:
        return int(client.info("clients")["connected_clients"])


# --- No upstream connection before AUTH ---------------------------------------------------


def test_silent_unauthenticated_clients_open_no_upstream_connection(
    locked_redis: EmbeddedServer, gated: ProxyThread
) -> None:
    before = connected_clients(locked_redis)
    silent = [raw_connect(gated.port) for _ in range(20)]
    try:
        wait_for(lambda: gated.state.stats.connections_open == 20, what="20 clients admitted")
        time.sleep(SILENCE)  # what an eager proxy would have connected by now
        assert connected_clients(locked_redis) == before

        refused = silent[0]
        refused.sendall(request("GET", "k") + request("AUTH", "not-it") + request("PING"))
        expected = NOAUTH + WRONGPASS + NOAUTH
        assert read_exactly(refused, len(expected)) == expected
        assert connected_clients(locked_redis) == before

        signed_in = silent[1]
        signed_in.sendall(request("AUTH", CLIENT_PW) + request("PING"))
        assert read_exactly(signed_in, 12) == b"+OK\r\n+PONG\r\n"
        # Opened by what came after the AUTH: its own connection (dedicated), or a shared
        # one and the spares kept for clients that pin (pooled).
        opened = 1 if gated.state.pools is None else 1 + SPARES
        wait_for(lambda: connected_clients(locked_redis) == before + opened, what="connections")
    finally:
        for sock in silent:
            sock.close()


def test_quit_and_reset_before_auth_are_answered_like_redis_without_reaching_it(
    locked_redis: EmbeddedServer, gated: ProxyThread
) -> None:
    before = connected_clients(locked_redis)
    for data in (
        request("QUIT"),
        request("RESET") + request("GET", "k"),
        request("QUIT") + request("GET", "k"),
        request("RESET") + request("QUIT"),
    ):
        assert exchange(gated.port, data) == exchange(locked_redis.port, data), data
    assert connected_clients(locked_redis) == before


# --- Redis's limits on what an unauthenticated client may send -------------------------------

# Each is sent as it is, to Redis requiring a password and to the proxy requiring one;
# {pw} is the password of the one it is sent to.
PROBES = [
    b"*11\r\n",  # more than 10 arguments
    b"*11\r\n$3\r\nGET\r\n",
    b"*2\r\n$3\r\nGET\r\n$16385\r\n",  # a bulk string over 16 KiB
    b"*2\r\n$16385\r\n",
    b"*2\r\n$3\r\nSET\r\n$20971520\r\n" + b"x" * 65536,  # the head of 20 MiB
    b"*10\r\n$3\r\nGET\r\n",  # at the limits: read on
    b"*2\r\n$3\r\nGET\r\n$16384\r\n",
    b"*3\r\n$3\r\nGET\r\n$16384\r\n" + b"x" * 16384 + b"\r\n$1\r\n",
    b"*1\r\n$4\r\nPING\r\n*11\r\n",  # answered in turn, then refused
    b"PING\r\n*2\r\n$3\r\nGET\r\n$100000\r\n",
    b"*2147483648\r\n",  # Redis's own checks come first
    b"*2\r\n$3\r\nGET\r\n$-1\r\n",
    b"*2\r\n$4\r\nAUTH\r\n$5\r\nwrong\r\n*11\r\n",
    b"*2\r\n$4\r\nAUTH\r\n${n}\r\n{pw}\r\n*11\r\n",  # after AUTH the limits are gone
    b"*2\r\n$4\r\nAUTH\r\n${n}\r\n{pw}\r\n*2\r\n$3\r\nGET\r\n$16385\r\n",
]


def _with_password(probe: bytes, password: str) -> bytes:
    return probe.replace(b"{n}", str(len(password)).encode()).replace(b"{pw}", password.encode())


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: repr(p[:40]))
def test_unauthenticated_requests_meet_redis_own_limits_and_errors(
    locked_redis: EmbeddedServer, gated: ProxyThread, probe: bytes
) -> None:
    expected = exchange(locked_redis.port, _with_password(probe, UPSTREAM_PW))
    assert exchange(gated.port, _with_password(probe, CLIENT_PW)) == expected


def test_command_names_sent_before_auth_are_not_counted(gated: ProxyThread) -> None:
    sock = raw_connect(gated.port)
    try:
        junk = [f"junk-{i}-</script>" for i in range(600)]
        sock.sendall(b"".join(request(name, "x") for name in junk))
        assert read_exactly(sock, 600 * len(NOAUTH)) == NOAUTH * 600
        sock.sendall(request("AUTH", CLIENT_PW) + request("GET", "k"))
        assert read_exactly(sock, 10) == b"+OK\r\n$-1\r\n"
    finally:
        sock.close()

    assert command_totals(gated.state) == {"get": 1}
    assert gated.state.stats.unauthenticated_commands == 601  # the AUTH too
    scraped = generate_latest(Metrics(lambda: gated.state).registry).decode()
    assert "junk" not in scraped
    assert 'fieldcrypt_commands_total{command="get"} 1.0' in scraped
    assert "fieldcrypt_unauthenticated_commands_total 601.0" in scraped


# --- The same through the cluster path ---------------------------------------------------------


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


class GatedClusterProxy:
    """fieldcrypt with client_password in front of a cluster, on a loop in a thread."""

    def __init__(self, directory: Path, url: str) -> None:
        path = directory / "fieldcrypt.yaml"
        path.write_text(yaml.safe_dump({"upstream": url, "client_password": CLIENT_PW}))
        self.runtime = Runtime(load_settings(str(path), {}, {}, directory), url, {})
        assert self.runtime.topology is not None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ClusterServer(self.runtime.state, self.runtime.topology)
        self.runtime.server = self.server
        self.port: int = self._call(self.server.start(HOST, 0))[0][1]
        self._call(self.runtime.topology.refresh())

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        self._call(self.server.drain(1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_cluster_path_applies_the_same_rules_before_auth(
    redis_cluster: Cluster, tmp_path: Path
) -> None:
    proxy = GatedClusterProxy(tmp_path, redis_cluster.url())
    try:
        nodes = [redis_cluster.node(port) for port in redis_cluster.masters()]

        def clients_per_node() -> list[int]:
            return [int(node.info("clients")["connected_clients"]) for node in nodes]

        before = clients_per_node()

        silent = [raw_connect(proxy.port) for _ in range(20)]
        wait_for(lambda: proxy.runtime.state.stats.connections_open == 20, what="20 clients")
        for sock in silent:
            sock.sendall(request("GET", "k") + request("not-a-command-</script>"))
        for sock in silent:
            assert read_exactly(sock, 2 * len(NOAUTH)) == NOAUTH * 2
        assert clients_per_node() == before
        for sock in silent:
            sock.close()

        assert exchange(proxy.port, b"*11\r\n") == (
            b"-ERR Protocol error: unauthenticated multibulk length\r\n<closed>"
        )
        head = b"*2\r\n$3\r\nSET\r\n$20971520\r\n" + b"x" * 65536
        assert exchange(proxy.port, head) == (
            b"-ERR Protocol error: unauthenticated bulk length\r\n<closed>"
        )
        signed_in = _with_password(b"*2\r\n$4\r\nAUTH\r\n${n}\r\n{pw}\r\n", CLIENT_PW)
        big = request("SET", "cluster:big", b"v" * 20000) + request("GET", "cluster:big")
        assert exchange(proxy.port, signed_in + big).startswith(b"+OK\r\n+OK\r\n$20000\r\n")

        assert command_totals(proxy.runtime.state) == {"get": 1, "set": 1}
        # (the two refused heads never became requests; the AUTH is one)
        assert proxy.runtime.state.stats.unauthenticated_commands == 20 * 2 + 1
    finally:
        proxy.stop()


# --- Memory: what a client that never authenticates can make the proxy hold ---------------


@pytest.fixture
def serve_processes() -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for process in started:
        process.stop()


def _push(sock: socket.socket, data: bytes, seconds: float) -> None:
    """Send `data` until it is all sent, the proxy closes, or it stops reading for `seconds`."""
    sock.settimeout(seconds)
    view = memoryview(data)
    try:
        while view:
            view = view[sock.send(view[: 1 << 20]) :]
    except (TimeoutError, BrokenPipeError, ConnectionResetError):
        pass


def test_unauthenticated_clients_cannot_make_the_proxy_buffer_megabytes(
    locked_redis: EmbeddedServer, tmp_path: Path, serve_processes: list[ServeProcess]
) -> None:
    proxy = ServeProcess(
        tmp_path,
        "--upstream",
        upstream_url(locked_redis),
        env={"FIELDCRYPT_CLIENT_PASSWORD": CLIENT_PW},
    )
    serve_processes.append(proxy)
    warm = raw_connect(proxy.port)  # the code paths of a whole conversation, loaded
    warm.sendall(request("GET", "k") + request("AUTH", CLIENT_PW) + request("GET", "k"))
    assert read_exactly(warm, len(NOAUTH) + 10) == NOAUTH + b"+OK\r\n$-1\r\n"
    warm.close()
    before = proxy.rss_kib()

    mib = 1 << 20
    partial = b"*2\r\n$3\r\nSET\r\n$20971520\r\n" + b"x" * (20 * mib - 1)  # never finished
    junk = request("JUNK") * (20 * mib // len(request("JUNK")))  # replies never read
    clients = [raw_connect(proxy.port) for _ in range(4)]
    try:
        for sock in clients[:3]:
            _push(sock, partial, 2.0)
        _push(clients[3], junk, 2.0)
        time.sleep(0.5)  # for the proxy to read what it was sent
        grown = proxy.rss_kib() - before
    finally:
        for sock in clients:
            sock.close()
    assert grown < 5 * 1024, f"the proxy's RSS grew by {grown} KiB"


# --- Reload applies every secret -----------------------------------------------------------


def test_reload_applies_new_admin_client_and_upstream_passwords(
    locked_redis: EmbeddedServer, tmp_path: Path, serve_processes: list[ServeProcess]
) -> None:
    def write(name: str, text: str) -> None:
        (tmp_path / name).write_text(text + "\n", encoding="utf-8")

    write("admin.pw", ADMIN_PW)
    write("client.pw", CLIENT_PW)
    write("upstream.pw", UPSTREAM_PW)
    config = {"drain_timeout": 10}
    (tmp_path / "fieldcrypt.yaml").write_text(yaml.safe_dump(config))
    proxy = ServeProcess(
        tmp_path,
        "--config",
        "fieldcrypt.yaml",
        "--upstream",
        f"redis://{HOST}:{locked_redis.port}",
        env={
            "FIELDCRYPT_ADMIN_PASSWORD_FILE": "admin.pw",
            "FIELDCRYPT_CLIENT_PASSWORD_FILE": "client.pw",
            "FIELDCRYPT_UPSTREAM_PASSWORD_FILE": "upstream.pw",
        },
    )
    serve_processes.append(proxy)

    def signed_in(user: str | None, password: str) -> redis.Redis:
        client = redis.Redis(host=HOST, port=proxy.port, username=user, password=password)
        client.ping()
        return client

    def refused(user: str | None, password: str) -> None:
        with pytest.raises(redis.AuthenticationError):
            signed_in(user, password)

    old_admin = signed_in("fieldcrypt-admin", ADMIN_PW)
    old_client = signed_in(None, CLIENT_PW)

    new_admin_pw, new_client_pw, new_upstream_pw = "admin-2-a8e0", "client-2-14cd", "up-2-93b7"
    write("admin.pw", new_admin_pw)
    write("client.pw", new_client_pw)
    write("upstream.pw", new_upstream_pw)
    (tmp_path / "fieldcrypt.yaml").write_text(yaml.safe_dump({"drain_timeout": 3}))
    with admin_redis(locked_redis) as direct:  # Redis's connections already open stay so
        direct.config_set("requirepass", new_upstream_pw)
    try:
        assert old_admin.execute_command("FIELDCRYPT", "RELOAD") == b"OK"

        refused("fieldcrypt-admin", ADMIN_PW)
        refused(None, CLIENT_PW)
        admin = signed_in("fieldcrypt-admin", new_admin_pw)
        assert b"connected_clients" in admin.execute_command("FIELDCRYPT", "INFO")
        client = signed_in(None, new_client_pw)  # through a new upstream connection
        client.set("rotated", "yes")
        assert client.get("rotated") == b"yes"
        # Those authenticated before stay so.
        assert b"connected_clients" in old_admin.execute_command("FIELDCRYPT", "INFO")
        assert old_client.get("rotated") == b"yes"
        proxy.wait_for_log("drain_timeout changed; that takes a restart")

        # SIGHUP does the same.
        write("client.pw", "client-3-77aa")
        proxy.process.send_signal(signal.SIGHUP)
        proxy.wait_for_log("config reloaded", count=2)
        refused(None, new_client_pw)
        assert signed_in(None, "client-3-77aa").get("rotated") == b"yes"
        for client_ in (old_admin, old_client, admin, client):
            client_.close()
    finally:
        with redis.Redis(host=HOST, port=locked_redis.port, password=new_upstream_pw) as direct:
            direct.config_set("requirepass", UPSTREAM_PW)
    for secret in (ADMIN_PW, CLIENT_PW, UPSTREAM_PW, new_admin_pw, new_client_pw):
        assert secret not in proxy.log


# --- A warning when anyone may connect ---------------------------------------------------


def test_listening_beyond_loopback_without_client_password_is_warned_about() -> None:
    open_settings = Settings()
    warning = exposure_warning(open_settings, [("0.0.0.0", 6380)])
    assert warning is not None
    assert "client_password is not set" in warning and "0.0.0.0:6380" in warning
    assert exposure_warning(open_settings, [("127.0.0.1", 6380), ("::1", 6380)]) is None
    gated = dataclasses.replace(open_settings, client_password=CLIENT_PW)
    assert exposure_warning(gated, [("0.0.0.0", 6380)]) is None
