"""Pooled mode, against real servers: many clients' requests share a few upstream
connections; what client libraries send at connect keeps them there; a client that
needs a connection's state moves to one of its own with its replies in order; one slow
client or a dropped shared connection costs the others nothing, and a request that was
in flight is never silently sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

from proxy.metrics import info_text
from proxy.pooled import SPARES
from proxy.resp import encode_request
from tests.servers import EmbeddedServer, ProxyThread, Wire, make_state, wait_for

HOST = "127.0.0.1"
POOL_NAME = "fieldcrypt-pool"
APP_USER, APP_PASSWORD = "pooled-app", "pooled-app-pw"


def pool_connections(direct: redis.Redis) -> list[dict[str, Any]]:
    return [c for c in direct.client_list() if c.get("name") == POOL_NAME]


def own_connections(proxy: ProxyThread) -> int:
    return int(proxy.run(lambda: proxy.state.stats.upstream_dedicated))


@pytest.fixture
def app_user(direct: redis.Redis) -> Iterator[tuple[str, str]]:
    direct.acl_setuser(
        APP_USER, enabled=True, passwords=[f"+{APP_PASSWORD}"], keys="*", commands=["+@all"]
    )
    yield APP_USER, APP_PASSWORD
    direct.acl_deluser(APP_USER)


def test_fifty_plain_clients_share_the_pools_connections(
    proxy: ProxyThread, direct: redis.Redis
) -> None:
    clients = [redis.Redis(host=HOST, port=proxy.port) for _ in range(50)]
    try:
        for number, client in enumerate(clients):
            assert client.set(f"shared:{number}", number)
        for number, client in enumerate(clients):
            assert client.get(f"shared:{number}") == str(number).encode()
        assert 1 <= len(pool_connections(direct)) <= proxy.state.pool_size
        # the tests' own connection, the pool and the spares kept for clients that pin
        assert len(direct.client_list()) <= 1 + proxy.state.pool_size + SPARES
        assert own_connections(proxy) == 0
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("credentials", [False, True], ids=["no-auth", "acl-user"])
def test_what_redis_py_sends_at_connect_keeps_a_client_shared(
    proxy: ProxyThread,
    direct: redis.Redis,
    app_user: tuple[str, str],
    protocol: int,
    credentials: bool,
) -> None:
    user, password = app_user if credentials else (None, None)
    client = redis.Redis(
        host=HOST,
        port=proxy.port,
        protocol=protocol,
        db=2,
        client_name="billing-worker",
        username=user,
        password=password,
    )
    try:
        assert client.set("connect:k", "v")
        assert client.get("connect:k") == b"v"
        assert client.client_getname() in ("billing-worker", b"billing-worker")
        assert client.acl_whoami() in ((user or "default"), (user or "default").encode())
        assert (
            redis.Redis(port=direct.connection_pool.connection_kwargs["port"], db=2).get(
                "connect:k"
            )
            == b"v"
        )
        assert own_connections(proxy) == 0
    finally:
        client.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_what_redis_py_asyncio_sends_at_connect_keeps_a_client_shared(
    proxy: ProxyThread, protocol: int
) -> None:
    async def talk() -> list[Any]:
        client = redis.asyncio.Redis(
            host=HOST, port=proxy.port, protocol=protocol, db=1, client_name="async-app"
        )
        try:
            await client.set("async:k", "v")
            return [await client.get("async:k"), await client.client_getname()]
        finally:
            await client.aclose()

    got = asyncio.run(talk())
    assert got[0] == b"v" and got[1] in ("async-app", b"async-app")
    assert own_connections(proxy) == 0


def test_a_client_that_needs_state_moves_to_its_own_connection_with_replies_in_order(
    proxy: ProxyThread,
) -> None:
    wire = Wire(proxy.port)
    try:
        replies = wire.pipeline(
            [
                ["SET", "order:k", "1"],
                ["INCR", "order:k"],
                ["MULTI"],
                ["INCR", "order:k"],
                ["EXEC"],
                ["GET", "order:k"],
            ],
            6,
        )
    finally:
        wire.close()
    assert replies == [
        b"+OK\r\n",
        b":2\r\n",
        b"+OK\r\n",
        b"+QUEUED\r\n",
        b"*1\r\n:3\r\n",
        b"$1\r\n3\r\n",
    ]
    assert proxy.run(lambda: proxy.state.stats.clients_pinned) == 1


@pytest.mark.parametrize(
    "command",
    [
        ["BLPOP", "pin:list", "0.01"],
        ["WATCH", "pin:k"],
        ["CLIENT", "ID"],
        ["CLIENT", "TRACKING", "ON"],
        ["SUBSCRIBE", "pin:channel"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_each_kind_of_state_pins_and_keeps_the_clients_name_and_db(
    proxy: ProxyThread, command: list[str]
) -> None:
    wire = Wire(proxy.port)
    try:
        assert wire.pipeline([["CLIENT", "SETNAME", "pinned-app"], ["SELECT", "4"]], 2) == [
            b"+OK\r\n",
            b"+OK\r\n",
        ]
        wire.call(*command)
        assert proxy.run(lambda: proxy.state.stats.clients_pinned) == 1
        if command[0] == "SUBSCRIBE":
            wire.call("UNSUBSCRIBE")
        info = wire.call("CLIENT", "INFO")  # Redis describes the client's own connection
    finally:
        wire.close()
    assert b" name=pinned-app " in info and b" db=4 " in info


def test_wrong_credentials_get_redis_error_and_right_ones_share_connections_per_user(
    proxy: ProxyThread, direct: redis.Redis, app_user: tuple[str, str]
) -> None:
    user, password = app_user
    wire = Wire(proxy.port)
    try:
        assert wire.call("AUTH", user, "wrong").startswith(b"-WRONGPASS")
        assert wire.call("ACL", "WHOAMI") == b"$7\r\ndefault\r\n"  # still who it was
        assert wire.call("AUTH", user, password) == b"+OK\r\n"
        assert wire.call("ACL", "WHOAMI") == b"$%d\r\n%s\r\n" % (len(user), user.encode())
    finally:
        wire.close()
    users = {c["user"] for c in pool_connections(direct)}
    assert user in users and "default" in users
    assert own_connections(proxy) == 0


def test_a_client_that_stops_reading_is_disconnected_and_delays_no_one(
    upstream: EmbeddedServer, direct: redis.Redis
) -> None:
    direct.set("big", b"x" * 100_000)
    proxy = ProxyThread(make_state(upstream.port, max_client_output=1024 * 1024))
    stuck = socket.create_connection((HOST, proxy.port))
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    busy = redis.Redis(host=HOST, port=proxy.port)
    try:
        stuck.sendall(encode_request([b"GET", b"big"]) * 200)  # 20 MB it never reads
        for number in range(200):  # on the same shared connections, all answered
            assert busy.incr("busy") == number + 1
        wait_for(
            lambda: proxy.run(lambda: proxy.state.stats.connections_open) == 1,
            what="the client that stopped reading to be disconnected",
        )
        assert busy.get("busy") == b"200"
    finally:
        stuck.close()
        busy.close()
        proxy.stop()


def test_a_client_that_sends_but_never_reads_stops_being_read_and_the_pool_flows(
    upstream: EmbeddedServer, direct: redis.Redis
) -> None:
    direct.set("one-k", b"x" * 1000)
    proxy = ProxyThread(make_state(upstream.port))  # max_client_output: 1 GiB
    stuck = socket.create_connection((HOST, proxy.port))
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.settimeout(0.5)
    busy = redis.Redis(host=HOST, port=proxy.port)
    batch = encode_request([b"GET", b"one-k"]) * 2000  # 70 KB asking for 2 MB of replies
    try:
        with contextlib.suppress(TimeoutError):
            for _ in range(12):  # 24 MB of replies it never reads
                stuck.sendall(batch)
        time.sleep(0.3)

        def owed() -> list[int]:
            return [c.transport.get_write_buffer_size() for c in proxy.server.connections]

        held = max(proxy.run(owed))
        assert held < 16 * 1024 * 1024, f"{held} bytes held for a client that never reads"
        assert busy.incr("flowing") == 1  # the shared connections still answer others
    finally:
        stuck.close()
        busy.close()
        proxy.stop()


def test_a_dropped_shared_connection_answers_what_was_in_flight_and_the_client_goes_on(
    proxy: ProxyThread, direct: redis.Redis
) -> None:
    wire = Wire(proxy.port)
    try:
        assert wire.call("PING") == b"+PONG\r\n"
        direct.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
        try:
            wire.sock.sendall(encode_request([b"INCR", b"in-flight"]))
            wait_for(
                lambda: any(c.get("cmd") == "incr" for c in pool_connections(direct)),
                what="the INCR to reach Redis",
            )
            for connection in pool_connections(direct):
                direct.execute_command("CLIENT", "KILL", "ID", connection["id"])
        finally:
            direct.execute_command("CLIENT", "UNPAUSE")
        (reply,) = wire.pipeline([], 1)
        assert reply.startswith(b"-ERR fieldcrypt: the shared upstream connection was lost")
        assert b"may or may not have run" in reply
        assert wire.call("INCR", "after") == b":1\r\n"  # the same client, a new connection
        time.sleep(0.2)
        assert direct.get("in-flight") in (None, b"1")  # never run twice
    finally:
        wire.close()


def test_fieldcrypt_info_shows_the_pool(proxy: ProxyThread) -> None:
    client = redis.Redis(host=HOST, port=proxy.port)
    try:
        client.ping()
        client.pipeline(transaction=True).incr("info:k").execute()  # one client pins
        info = proxy.run(lambda: info_text(proxy.state, "upstream")).decode()
    finally:
        client.close()
    assert "upstream_mode:pooled" in info
    assert "upstream_connections_shared:1" in info
    assert "clients_pinned:1" in info
