"""fieldcrypt in front of a real Redis Cluster: 3 masters and 3 replicas of the `redis`
kind's server (tests/conftest.py), created with its CLI's --cluster create, on loopback
ports.

fieldcrypt presents one non-cluster endpoint; clients must never see a redirect."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from redis.cluster import RedisCluster
from redis.exceptions import ClusterCrossSlotError

from proxy import app, cluster
from proxy.cluster_server import ClusterServer
from proxy.config import load_settings
from proxy.crypto import HEADER_PREFIX, generate_key
from proxy.embedded import free_cluster_ports
from tests.servers import cli_binary, server_binary, wait_for

HOST = "127.0.0.1"
CREATE_OPTIONS = ("--cluster-replicas", "1", "--cluster-yes")


# --- The cluster ---------------------------------------------------------------------------


def _cluster_ports(count: int) -> list[int]:
    ports = free_cluster_ports(count, HOST)
    if ports is None:
        pytest.fail("no free block of ports for the cluster (ports and ports+10000)")
    return ports


class Cluster:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.binary = server_binary("redis")
        self.cli = cli_binary("redis")
        self.ports = _cluster_ports(6)
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        for port in self.ports:
            node_dir = self.directory / str(port)
            node_dir.mkdir()
            self.processes[port] = subprocess.Popen(
                [
                    self.binary,
                    "--port", str(port),
                    "--bind", HOST,
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(node_dir / "nodes.conf"),
                    "--cluster-node-timeout", "2000",
                    "--save", "",
                    "--appendonly", "no",
                    "--dir", str(node_dir),
                    "--logfile", str(node_dir / "log"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        for port in self.ports:
            wait_for(lambda p=port: self._pings(p), 10, f"redis-server on port {port}")
        created = subprocess.run(
            [self.cli, "--cluster", "create", *self.addresses(), *CREATE_OPTIONS],
            capture_output=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stdout.decode()[-2000:]
        self.wait_ok()

    def addresses(self) -> list[str]:
        return [f"{HOST}:{p}" for p in self.ports]

    def _pings(self, port: int) -> bool:
        try:
            return bool(self.node(port).ping())
        except redis.ConnectionError:
            return False

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(host=HOST, port=port, socket_timeout=5)

    def alive(self) -> list[int]:
        return [p for p, proc in self.processes.items() if proc.poll() is None]

    def wait_ok(self, timeout: float = 30) -> None:
        def ok() -> bool:
            for port in self.alive():
                try:
                    info = self.node(port).execute_command("CLUSTER", "INFO")
                except redis.RedisError:
                    return False
                text = info.decode() if isinstance(info, bytes) else str(info)
                if "cluster_state:ok" not in text:
                    return False
            return True

        wait_for(ok, timeout, "cluster_state:ok on every node")

    def masters(self) -> dict[int, str]:
        """port -> node id of every live master."""
        found = {}
        for port in self.alive():
            role = self.node(port).execute_command("ROLE")[0]
            if role == b"master":
                found[port] = self.node(port).execute_command("CLUSTER", "MYID").decode()
        return found

    def owner(self, key: bytes) -> int:
        """The port of the master serving key's slot, as the cluster itself says."""
        slot = cluster.key_slot(key)
        for entry in self.node(self.alive()[0]).execute_command("CLUSTER", "SLOTS"):
            if entry[0] <= slot <= entry[1]:
                return int(entry[2][1])
        raise AssertionError(f"no node serves slot {slot}")

    def url(self) -> str:
        return f"redis+cluster://{HOST}:{self.ports[0]},{HOST}:{self.ports[1]}"

    def stop(self) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster_ = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster_.start()
        yield cluster_
    finally:
        cluster_.stop()


# --- fieldcrypt in front of it -------------------------------------------------------------


class ClusterProxy:
    """fieldcrypt with a cluster upstream, on its own loop in a thread."""

    def __init__(self, directory: Path, url: str, announce: bool = False) -> None:
        self.directory = directory
        self.key = generate_key()
        (directory / "key.secret").write_text(self.key + "\n", encoding="ascii")
        config = {
            "upstream": url,
            "keys": [{"secret_file": "key.secret"}],
            "rules": [{"key": "iad:*", "fields": ["imap", "smtp", "oauth2"]}],
            "cluster_announce_self": announce,
        }
        path = directory / "fieldcrypt.yaml"
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        settings = load_settings(str(path), {}, {}, directory)
        self.runtime = app.Runtime(settings, url, {})
        assert self.runtime.topology is not None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ClusterServer(self.runtime.state, self.runtime.topology, announce)
        self.runtime.server = self.server
        bound = asyncio.run_coroutine_threadsafe(self.server.start(HOST, 0), self.loop).result(30)
        self.port: int = bound[0][1]
        self.clients: list[Any] = []

    def client(self, **kwargs: Any) -> redis.Redis:
        client = redis.Redis(host=HOST, port=self.port, socket_timeout=30, **kwargs)
        self.clients.append(client)
        return client

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        asyncio.run_coroutine_threadsafe(self.server.drain(1.0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def proxy(redis_cluster: Cluster, tmp_path: Path) -> Iterator[ClusterProxy]:
    for port in redis_cluster.masters():
        redis_cluster.node(port).flushall()
    handle = ClusterProxy(tmp_path, redis_cluster.url())
    yield handle
    handle.stop()


def _keys_on_every_master(redis_cluster: Cluster, prefix: str, count: int) -> list[bytes]:
    keys = [f"{prefix}:{n}".encode() for n in range(count)]
    owners = {redis_cluster.owner(k) for k in keys}
    assert owners == set(redis_cluster.masters()), "the keys should cover every master"
    return keys


# --- Routing ---------------------------------------------------------------------------------


def test_plain_commands_reach_the_master_owning_each_slot(
    proxy: ClusterProxy, redis_cluster: Cluster
) -> None:
    client = proxy.client()
    keys = [f"key:{n}".encode() for n in range(2000)]
    assert len({cluster.key_slot(k) for k in keys}) > 1500
    pipe = client.pipeline(transaction=False)
    for n, key in enumerate(keys):
        pipe.set(key, n)
    assert all(pipe.execute())
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
    assert pipe.execute() == [str(n).encode() for n in range(len(keys))]
    for key in keys[:50]:
        assert redis_cluster.node(redis_cluster.owner(key)).get(key) is not None
    assert client.ping()
    assert client.incr("counter:{a}") == 1


def test_hash_tags_route_like_redis(redis_cluster: Cluster) -> None:
    node = redis_cluster.node(redis_cluster.ports[0])
    for key in [b"foo", b"{user1000}.following", b"foo{}{bar}", b"{}", b"a{b}c{d}", b"{{x}}"]:
        assert cluster.key_slot(key) == node.execute_command("CLUSTER", "KEYSLOT", key)


def test_protected_hset_is_ciphertext_on_the_owning_master(
    proxy: ClusterProxy, redis_cluster: Cluster
) -> None:
    client = proxy.client()
    keys = _keys_on_every_master(redis_cluster, "iad", 30)
    for key in keys:
        client.hset(key, mapping={"imap": b"secret-" + key, "user": "bob"})
    for key in keys:
        stored = redis_cluster.node(redis_cluster.owner(key)).hget(key, "imap")
        assert stored is not None and stored.startswith(HEADER_PREFIX)
        assert redis_cluster.node(redis_cluster.owner(key)).hget(key, "user") == b"bob"
        assert client.hget(key, "imap") == b"secret-" + key
        assert client.hgetall(key) == {b"imap": b"secret-" + key, b"user": b"bob"}
    resp3 = proxy.client(protocol=3)
    assert resp3.hgetall(keys[0]) == {b"imap": b"secret-" + keys[0], b"user": b"bob"}
    assert resp3.hget(keys[1], "imap") == b"secret-" + keys[1]


def test_mget_mset_del_exists_across_slots_are_split_and_merged(
    proxy: ClusterProxy, redis_cluster: Cluster
) -> None:
    client = proxy.client()
    keys = _keys_on_every_master(redis_cluster, "multi", 30)
    assert client.mset({k: b"v-" + k for k in keys}) is True
    for key in keys:
        assert redis_cluster.node(redis_cluster.owner(key)).get(key) == b"v-" + key
    assert client.mget([*keys, b"missing:1"]) == [b"v-" + k for k in keys] + [None]
    assert client.exists(*keys, b"missing:1") == len(keys)
    assert client.touch(*keys) == len(keys)
    assert client.delete(*keys[:10], b"missing:1") == 10
    assert client.unlink(*keys[10:]) == len(keys) - 10
    assert client.mget(keys[:3]) == [None, None, None]
    resp3 = proxy.client(protocol=3)
    resp3.mset({k: b"3-" + k for k in keys})
    assert resp3.mget(keys) == [b"3-" + k for k in keys]


def test_other_commands_across_slots_get_crossslot(proxy: ClusterProxy) -> None:
    client = proxy.client()
    a, b = b"set:a", b"set:b"
    assert cluster.key_slot(a) != cluster.key_slot(b)
    client.sadd(a, 1)
    client.sadd(b, 2)
    with pytest.raises(ClusterCrossSlotError):
        client.sunion(a, b)
    with pytest.raises(ClusterCrossSlotError):
        client.msetnx({a: 1, b: 2})
    client.sadd(b"{s}:a", 1)
    client.sadd(b"{s}:b", 2)
    assert client.sunion(b"{s}:a", b"{s}:b") == {b"1", b"2"}
    assert client.eval("return redis.call('GET', KEYS[1])", 1, b"{s}:none") is None


def test_scan_returns_every_key_exactly_once(proxy: ClusterProxy, redis_cluster: Cluster) -> None:
    client = proxy.client()
    keys = {f"scan:{n}".encode() for n in range(3000)}
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.set(key, 1)
    pipe.execute()
    seen: list[bytes] = []
    cursor = 0
    for _ in range(100000):
        cursor, page = client.scan(cursor, match="scan:*", count=100)
        seen.extend(page)
        if cursor == 0:
            break
    assert len(seen) == len(keys) and set(seen) == keys
    assert sorted(client.keys("scan:*")) == sorted(keys)
    assert client.dbsize() == len(keys)
    assert set(client.scan_iter(match="scan:1*", _type="string", count=500)) == {
        k for k in keys if k.startswith(b"scan:1")
    }
    assert client.flushall() is True
    assert client.dbsize() == 0
    assert all(redis_cluster.node(port).dbsize() == 0 for port in redis_cluster.masters())


def test_multi_exec_on_one_slot(proxy: ClusterProxy, redis_cluster: Cluster) -> None:
    client = proxy.client()
    pipe = client.pipeline(transaction=True)
    pipe.ping()  # no key yet: queued until the first key pins the transaction
    pipe.set("{tx}:a", 1)
    pipe.incr("{tx}:a")
    pipe.hset("iad:{tx}", mapping={"imap": "pw", "user": "u"})
    pipe.hgetall("iad:{tx}")
    assert pipe.execute() == [True, True, 2, 2, {b"imap": b"pw", b"user": b"u"}]
    owner = redis_cluster.node(redis_cluster.owner(b"iad:{tx}"))
    assert owner.hget("iad:{tx}", "imap").startswith(HEADER_PREFIX)
    pipe = client.pipeline(transaction=True)
    pipe.set("{tx}:a", 1)
    pipe.set("{other}:b", 1)
    with pytest.raises(redis.ResponseError):
        pipe.execute()
    assert client.get("{other}:b") is None
    # WATCH pins the transaction too; a concurrent write aborts it.
    with client.pipeline(transaction=True) as pipe:
        pipe.watch("{tx}:a")
        proxy.client().set("{tx}:a", 100)
        pipe.multi()
        pipe.set("{tx}:a", 5)
        with pytest.raises(redis.WatchError):
            pipe.execute()
    assert client.get("{tx}:a") == b"100"


def test_blpop_is_woken_by_another_client(proxy: ClusterProxy) -> None:
    waiting = proxy.client()
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(waiting.blpop(["queue:1"], 20)))
    thread.start()
    writer = proxy.client()
    wait_for(
        lambda: (
            b"cmd=blpop"
            in b"".join(
                redis.Redis(host=HOST, port=p).execute_command("CLIENT", "LIST")
                for p in proxy_masters(proxy)
            )
        ),
        10,
        "the BLPOP to block",
    )
    writer.rpush("queue:1", "job")
    thread.join(20)
    assert results == [(b"queue:1", b"job")]


def proxy_masters(proxy: ClusterProxy) -> list[int]:
    return [port for _, port in proxy.runtime.topology.map.masters]  # type: ignore[union-attr]


def test_pubsub_and_sharded_pubsub(proxy: ClusterProxy) -> None:
    subscriber = proxy.client().pubsub()
    subscriber.subscribe("news")
    subscriber.psubscribe("ne*")
    subscriber.execute_command("SSUBSCRIBE", "shard:{1}")
    confirmations = []
    for _ in range(3):
        message = subscriber.get_message(timeout=5)
        confirmations.append(message and message["type"])
    assert confirmations == ["subscribe", "psubscribe", "ssubscribe"]
    publisher = proxy.client()
    publisher.publish("news", "hello")  # counts receivers on its own node only, as in Redis
    assert publisher.execute_command("SPUBLISH", "shard:{1}", "sharded") == 1
    got: list[tuple[str, bytes]] = []
    deadline = time.monotonic() + 10
    while len(got) < 3 and time.monotonic() < deadline:
        message = subscriber.get_message(timeout=1)
        if message and message["type"] in ("message", "pmessage", "smessage"):
            got.append((message["type"], message["data"]))
    assert sorted(got) == [("message", b"hello"), ("pmessage", b"hello"), ("smessage", b"sharded")]
    subscriber.unsubscribe()
    subscriber.close()


def test_pipelined_requests_across_nodes_come_back_in_order(proxy: ClusterProxy) -> None:
    with socket.create_connection((HOST, proxy.port), 10) as sock:
        sock.settimeout(10)
        requests = b"HELLO 3\r\n" + b"".join(
            b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$1\r\n%d\r\n" % (len(k), k, n % 10)
            for n, k in enumerate(f"p:{n}".encode() for n in range(200))
        )
        requests += b"".join(b"GET p:%d\r\n" % n for n in range(200)) + b"PING\r\n"
        sock.sendall(requests)
        expected_tail = b"".join(b"$1\r\n%d\r\n" % (n % 10) for n in range(200))
        expected_tail = b"+OK\r\n" * 200 + expected_tail + b"+PONG\r\n"
        data = b""
        for _ in range(1000):
            if data.endswith(b"+PONG\r\n"):
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        assert data.startswith(b"%") and data.endswith(expected_tail)


def test_routing_core_parses_redirects_cursors_and_key_positions() -> None:
    moved = cluster.parse_redirect(b"-MOVED 3999 127.0.0.1:6381\r\n", "h")
    assert moved == cluster.Redirect(False, 3999, ("127.0.0.1", 6381))
    asked = cluster.parse_redirect(b"-ASK 1 :7000\r\n", "10.0.0.1")
    assert asked == cluster.Redirect(True, 1, ("10.0.0.1", 7000))
    assert cluster.parse_redirect(b"-ERR wrong\r\n", "h") is None
    for index, node_cursor in [(0, 0), (2, 0), (1, 123456789), (1023, 2**40)]:
        joined = cluster.join_cursor(index, node_cursor)
        assert cluster.split_cursor(joined) == (index, node_cursor)
    table = cluster.CommandTable()
    assert table.keys([b"EVAL", b"s", b"2", b"a", b"b", b"x"]) == [b"a", b"b"]
    assert table.keys([b"ZUNIONSTORE", b"d", b"2", b"a", b"b", b"WEIGHTS", b"1", b"2"]) == [
        b"d", b"a", b"b"
    ]  # fmt: skip
    assert table.keys([b"XREAD", b"COUNT", b"1", b"STREAMS", b"s1", b"s2", b"0", b"0"]) == [
        b"s1", b"s2"
    ]  # fmt: skip
    assert table.keys([b"SORT", b"l", b"BY", b"w_*", b"GET", b"o_*", b"STORE", b"d"]) == [
        b"l", b"d"
    ]  # fmt: skip
    assert table.keys([b"MIGRATE", b"h", b"1", b"", b"0", b"5", b"KEYS", b"a", b"b"]) == [
        b"a", b"b"
    ]  # fmt: skip
    assert table.keys([b"UNKNOWN", b"x"]) is None


def test_migrate_cli_walks_every_master(proxy: ClusterProxy, redis_cluster: Cluster) -> None:
    keys = _keys_on_every_master(redis_cluster, "iad:cli", 30)
    for key in keys:
        redis_cluster.node(redis_cluster.owner(key)).hset(key, "smtp", b"pw-" + key)
    config = proxy.directory / "fieldcrypt.yaml"
    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "migrate", "--config", str(config),
         "--redis", redis_cluster.url()],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=proxy.directory,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"fields_encrypted {len(keys)}" in " ".join(done.stdout.split())
    for key in keys:
        stored = redis_cluster.node(redis_cluster.owner(key)).hget(key, "smtp")
        assert stored is not None and stored.startswith(HEADER_PREFIX)
        assert proxy.client().hget(key, "smtp") == b"pw-" + key


def test_redis_py_cluster_client_works_through_the_announce_option(
    redis_cluster: Cluster, tmp_path: Path
) -> None:
    handle = ClusterProxy(tmp_path, redis_cluster.url(), announce=True)
    try:
        client = RedisCluster(host=HOST, port=handle.port, socket_timeout=30)
        try:
            nodes = client.get_nodes()
            assert [(n.host, n.port) for n in nodes] == [(HOST, handle.port)]
            keys = _keys_on_every_master(redis_cluster, "rc", 40)
            for key in keys:
                client.set(key, key)
            assert client.mget_nonatomic(keys) == keys
            client.hset("iad:rc", mapping={"imap": "pw"})
            assert client.hget("iad:rc", "imap") == b"pw"
            owner = redis_cluster.node(redis_cluster.owner(b"iad:rc"))
            assert owner.hget("iad:rc", "imap").startswith(HEADER_PREFIX)
            shards = redis.Redis(host=HOST, port=handle.port).execute_command("CLUSTER", "SHARDS")
            assert len(shards) == 1
            assert shards[0][b"slots"] == [0, 16383]  # redis-py reads it as a dict
        finally:
            client.close()
    finally:
        handle.stop()


def test_migration_encrypts_cleartext_on_every_master(
    proxy: ClusterProxy, redis_cluster: Cluster
) -> None:
    keys = _keys_on_every_master(redis_cluster, "iad:old", 60)
    for key in keys:  # written before encryption was switched on: cleartext
        redis_cluster.node(redis_cluster.owner(key)).hset(
            key, mapping={"imap": b"pw-" + key, "user": "u"}
        )
    admin = proxy.client()
    assert "job" in _report(admin.execute_command("MIGRATE"))
    fields = _report(admin.execute_command("MIGRATE", "WAIT", "60"))
    assert fields["state"] == b"done"
    assert fields["fields_encrypted"] == len(keys)
    assert fields["fields_undecryptable"] == 0
    for key in keys:
        stored = redis_cluster.node(redis_cluster.owner(key)).hget(key, "imap")
        assert stored is not None and stored.startswith(HEADER_PREFIX)
        assert admin.hget(key, "imap") == b"pw-" + key
    assert "job" in _report(admin.execute_command("MIGRATE"))
    fields = _report(admin.execute_command("MIGRATE", "WAIT", "60"))
    assert fields["state"] == b"done" and fields["fields_encrypted"] == 0
    assert fields["fields_skipped_already_done"] == len(keys)
    lock_owner = redis_cluster.node(redis_cluster.owner(b"fieldcrypt:migrate:lock"))
    assert lock_owner.get("fieldcrypt:migrate:lock") is None  # released


def _report(reply: Any) -> dict[str, Any]:
    """A MIGRATE reply (a RESP3 map, or RESP2 pairs, which redis-py may read as a dict)."""
    items = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in items}


def _writer(proxy: ClusterProxy, name: str, rounds: int, stop: threading.Event,
            acked: dict[bytes, bytes], errors: list[str]) -> None:  # fmt: skip
    """Write and read back through fieldcrypt in a bounded loop, until `stop`."""
    client = proxy.client()
    for n in range(rounds):
        if stop.is_set() and n > 50:
            return
        key = f"{name}:{n}".encode()
        value = b"v%d" % n
        try:
            if n % 3 == 0:
                client.hset(b"iad:" + key, mapping={"imap": value})
                acked[b"iad:" + key] = value
                got = client.hget(b"iad:" + key, "imap")
                if got != value:
                    errors.append(f"read back {got!r} for a protected field")
            else:
                client.set(key, value)
                acked[key] = value
                got = client.get(key)
                if got != value:
                    errors.append(f"read back {got!r}")
            if n % 10 == 0:
                client.mget([key, b"other:" + key])
        except redis.RedisError as error:
            errors.append(f"{error.__class__.__name__}: {error}")


def test_resharding_under_load_shows_clients_no_redirect(
    proxy: ClusterProxy, redis_cluster: Cluster
) -> None:
    masters = redis_cluster.masters()
    source, target = sorted(masters)[:2]
    pipe = proxy.client().pipeline(transaction=False)
    for n in range(20000):  # keys in the moving slots make the move take a while (ASK)
        pipe.set(f"fill:{n}", n)
    pipe.execute()
    stop = threading.Event()
    acked: list[dict[bytes, bytes]] = [{} for _ in range(3)]
    errors: list[str] = []
    threads = [
        threading.Thread(target=_writer, args=(proxy, f"rs{i}", 20000, stop, acked[i], errors))
        for i in range(3)
    ]
    for thread in threads:
        thread.start()
    reshard = subprocess.run(
        [redis_cluster.cli, "--cluster", "reshard", f"{HOST}:{source}",
         "--cluster-from", masters[source], "--cluster-to", masters[target],
         "--cluster-slots", "500", "--cluster-yes"],
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    stop.set()
    for thread in threads:
        thread.join(120)
    assert reshard.returncode == 0, reshard.stdout.decode()[-2000:]
    assert errors == []
    topology = proxy.runtime.topology
    assert topology is not None and topology.redirects > 0, "the writers saw no resharding"
    print(f"writes {sum(map(len, acked))}, redirects followed {topology.redirects}")
    client = proxy.client()
    for written in acked:
        assert written
        for key, value in written.items():
            if key.startswith(b"iad:"):
                assert client.hget(key, "imap") == value
            else:
                assert client.get(key) == value
    redis_cluster.wait_ok()


def test_failover_of_a_master_is_survived(proxy: ClusterProxy, redis_cluster: Cluster) -> None:
    client = proxy.client()
    keys = _keys_on_every_master(redis_cluster, "fo", 60)
    for key in keys:
        client.set(key, key)
    for port in redis_cluster.masters():  # replicated before the crash
        redis_cluster.node(port).execute_command("WAIT", 1, 5000)
    victim = redis_cluster.owner(keys[0])
    os.kill(redis_cluster.processes[victim].pid, signal.SIGKILL)
    redis_cluster.processes[victim].wait(10)
    # Through fieldcrypt, the first request to the lost slots waits for the promotion.
    assert client.get(keys[0]) == keys[0]
    assert victim not in redis_cluster.masters()
    topology = proxy.runtime.topology
    assert topology is not None and topology.retries > 0
    print(f"retries {topology.retries}")
    for key in keys:
        assert client.get(key) == key
    for key in keys:
        client.set(key, b"after-" + key)
    assert client.mget(keys) == [b"after-" + k for k in keys]
    redis_cluster.wait_ok()
