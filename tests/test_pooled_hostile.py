"""Pooled mode against what a hostile client, a real application or an unlucky moment
does, through the proxy to real Redis: pushes on shared connections, least-privilege
users, failed and pipelined AUTHs, SELECTs Redis refuses, many routes, pins from db 0,
HELLO and RESET details, connections lost mid-move, password rotation; and pipelines
that must match Redis byte for byte under load, kills, timeouts and restarts.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

import proxy.pooled as pooled
from proxy.pooled import Pools
from proxy.resp import encode_request
from proxy.server import ProxyState, Target
from proxy.session import base_dispatch
from tests.servers import EmbeddedServer, ProxyThread, Wire, make_state, wait_for

# What is under review is the proxy, not the server: one server kind keeps this quick.
UPSTREAM_KINDS = ["redis"]

HOST = "127.0.0.1"
POOL_NAME = "fieldcrypt-pool"
LOST = b"may or may not have run"


@pytest.fixture
def start(upstream: EmbeddedServer) -> Iterator[Callable[..., ProxyThread]]:
    """Start proxies with make_state's keywords (pooled mode); all stopped at the end."""
    redis.Redis(port=upstream.port).flushall()
    started: list[ProxyThread] = []

    def start_proxy(**kwargs: Any) -> ProxyThread:
        handle = ProxyThread(make_state(upstream.port, **kwargs))
        started.append(handle)
        return handle

    yield start_proxy
    for handle in started:
        handle.stop()


@pytest.fixture
def acl(direct: redis.Redis) -> Iterator[Callable[..., None]]:
    """Create ACL users for a test; deleted afterwards."""
    made: list[str] = []

    def make(user: str, password: str, **kwargs: Any) -> None:
        kwargs.setdefault("keys", ["*"])
        kwargs.setdefault("commands", ["+@all"])
        direct.acl_setuser(user, enabled=True, passwords=[f"+{password}"], **kwargs)
        made.append(user)

    yield make
    for user in made:
        direct.acl_deluser(user)


def pools_of(proxy: ProxyThread) -> Pools:
    pools = proxy.state.pools
    assert pools is not None  # pooled mode
    return pools


def pool_connections(direct: redis.Redis) -> list[dict[str, Any]]:
    return [c for c in direct.client_list() if c.get("name") == POOL_NAME]


def shared_id(hello_reply: bytes) -> bytes:
    found = re.search(rb"\$2\r\nid\r\n:(\d+)\r\n", hello_reply)
    assert found, hello_reply
    return found.group(1)


def both(port: int, direct_port: int, requests: list[list[str]], replies: int) -> tuple[Any, Any]:
    """The replies of direct Redis and of the proxy to the same pipeline (the server's
    keys flushed before each), each as a list of frames or the exception it ended in."""
    results: list[Any] = []
    for where in (direct_port, port):
        redis.Redis(port=direct_port).flushall()
        wire = Wire(where)
        try:
            results.append(wire.pipeline(requests, replies))  # type: ignore[arg-type]
        except ConnectionError as error:
            results.append(repr(error))
        finally:
            wire.close()
    return results[0], results[1]


# --- What a hostile client or an unlucky moment must not break ----------------------


def test_a_push_on_a_shared_resp3_connection_is_no_clients_reply(
    start: Callable[..., ProxyThread], direct: redis.Redis
) -> None:
    """HIGH. A RESP3 shared connection's id is in every HELLO reply; CLIENT TRACKING ON
    REDIRECT <that id> (from any connection, here a client of the proxy that pins) makes
    Redis write invalidation pushes to the shared connection. ReplyRouter counts a push
    as a reply, so every reply after it goes to the wrong client: here the attacker's
    ECHO is answered with the victim's secret."""
    proxy = start(pool_size=1, databases=16)
    attacker = Wire(proxy.port, 3)
    victim = Wire(proxy.port, 3)
    tracker = Wire(proxy.port)
    try:
        connection = shared_id(attacker.call("HELLO", "3"))
        assert tracker.call("CLIENT", "TRACKING", "ON", "REDIRECT", connection) == b"+OK\r\n"
        assert tracker.call("GET", "tracked") == b"$-1\r\n"  # tracked for `tracker`
        direct.set("victim:secret", "victim-private")
        # Both clients' requests in one loop turn, as under load: hold the loop a moment.
        proxy.loop.call_soon_threadsafe(time.sleep, 0.3)
        time.sleep(0.05)
        victim.sock.sendall(
            encode_request([b"SET", b"tracked", b"1"]) + encode_request([b"GET", b"victim:secret"])
        )
        attacker.sock.sendall(encode_request([b"ECHO", b"attacker"]))
        (attacker_reply,) = attacker.pipeline([], 1)
        victim_replies = victim.pipeline([], 2)
    finally:
        for wire in (attacker, victim, tracker):
            wire.close()
    assert attacker_reply == b"$8\r\nattacker\r\n"
    assert victim_replies == [b"+OK\r\n", b"$14\r\nvictim-private\r\n"]


def test_an_acl_user_without_connection_commands_authenticates(
    start: Callable[..., ProxyThread], direct: redis.Redis, acl: Callable[..., None]
) -> None:
    """HIGH. A least-privilege ACL user (+@read +@write, no @connection) authenticates
    on Redis; through the proxy its AUTH fails with NOPERM for 'client|setname' (the
    pool's handshake names the connection as that user) and the client stays the
    proxy's upstream user."""
    acl("rw-only", "rw-pw", commands=["+@read", "+@write"])
    proxy = start(databases=16)
    requests = [["AUTH", "rw-only", "rw-pw"], ["SET", "rw:k", "v"], ["GET", "rw:k"]]
    on_redis, on_proxy = both(
        proxy.port, direct.connection_pool.connection_kwargs["port"], requests, 3
    )
    assert on_redis == [b"+OK\r\n", b"+OK\r\n", b"$1\r\nv\r\n"]
    assert on_proxy == on_redis


def test_a_failed_auth_in_a_pipeline_leaves_the_moves_behind_it_as_redis_does(
    start: Callable[..., ProxyThread], direct: redis.Redis
) -> None:
    """MEDIUM. Pipelined AUTH (wrong) + SELECT + SET + a pinning command: on Redis only
    the AUTH fails. Through the proxy the SELECT inherits the refused credentials (it
    gets WRONGPASS, the SET runs in db 0) and the pin's handshake replays the wrong AUTH,
    which disconnects the client."""
    proxy = start(databases=16)
    requests = [
        ["AUTH", "nobody", "wrong"],
        ["SELECT", "2"],
        ["SET", "poison:k", "v"],
        ["MULTI"],
        ["EXEC"],
    ]
    on_redis, on_proxy = both(
        proxy.port, direct.connection_pool.connection_kwargs["port"], requests, 5
    )
    assert on_redis[1:] == [b"+OK\r\n", b"+OK\r\n", b"+OK\r\n", b"*0\r\n"]
    assert on_proxy == on_redis


def test_a_select_redis_refuses_gets_its_error_and_the_client_goes_on(
    proxy: ProxyThread, direct: redis.Redis
) -> None:
    """MEDIUM. When the upstream's `databases` could not be read (CONFIG denied by ACL,
    as on managed Redis; the `proxy` fixture's state), SELECT 99 with nothing in flight
    answers Redis's error and then closes the client: the request behind it gets the
    same error and the connection is gone."""
    on_redis, on_proxy = both(
        proxy.port,
        direct.connection_pool.connection_kwargs["port"],
        [["SELECT", "99"], ["PING"]],
        2,
    )
    assert on_redis == [b"-ERR DB index is out of range\r\n", b"+PONG\r\n"]
    assert on_proxy == on_redis


def test_past_64_routes_an_idle_route_makes_room(
    start: Callable[..., ProxyThread], acl: Callable[..., None]
) -> None:
    """MEDIUM-HIGH (denial of service). One authenticated client fills MAX_POOLS (16 dbs
    x 2 protocols x its own and the proxy's credentials); after that any client whose
    AUTH, SELECT or HELLO needs a new route gets 'unreachable (too many distinct users,
    dbs and protocols to share)' and is disconnected, though Pools.pool promises a
    connection of its own stands in."""
    acl("app-one", "pw-one")
    acl("app-two", "pw-two")
    proxy = start(databases=16, pool_size=1)
    filler = Wire(proxy.port)
    victim = Wire(proxy.port)
    try:
        for auth in ([], [["AUTH", "app-one", "pw-one"]]):
            for protocol in ("2", "3"):
                for db in range(16):
                    requests = [*auth, ["HELLO", protocol], ["SELECT", str(db)]]
                    replies = filler.pipeline(requests, len(requests))  # type: ignore[arg-type]
                    assert not any(r.startswith(b"-") for r in replies), replies
        assert proxy.run(lambda: len(pools_of(proxy).pools)) == pooled.MAX_POOLS
        try:
            replies = victim.pipeline([["AUTH", "app-two", "pw-two"], ["ACL", "WHOAMI"]], 2)
        except ConnectionError as error:
            replies = [repr(error).encode()]
    finally:
        filler.close()
        victim.close()
    assert replies == [b"+OK\r\n", b"$7\r\napp-two\r\n"]


def test_refused_selects_leave_no_pools_behind(
    proxy: ProxyThread,
) -> None:
    """(Same cause as F5, reachable with no credentials.) With `databases` unknown each
    refused SELECT N leaves an empty pool for db N behind (Pool.discard forgets only
    pools with credentials), so SELECT 100..163 exhausts MAX_POOLS for everyone."""
    for db in range(100, 110):
        wire = Wire(proxy.port)
        try:
            wire.pipeline([["SELECT", str(db)]], 1)
        except ConnectionError:
            pass
        finally:
            wire.close()
    time.sleep(0.1)
    assert proxy.run(lambda: len(pools_of(proxy).pools)) <= 1


def test_a_pinned_client_in_db_zero_runs_in_db_zero_whatever_the_upstreams_db(
    upstream: EmbeddedServer, direct: redis.Redis
) -> None:
    """MEDIUM (writes land in the wrong db). With the upstream's db set (redis://h/3), a
    client that SELECTs 0 and then pins on a spare connection (MULTI) runs its
    transaction in db 3: spares stand in the target's db and dedicated_handshake sends
    SELECT only `if route.db` (not for 0)."""
    direct.flushall()
    state = ProxyState(
        target=Target(HOST, upstream.port, db=3, connect_timeout=2.0), dispatch=base_dispatch()
    )
    proxy = ProxyThread(state)
    wire = Wire(proxy.port)
    try:
        assert wire.call("PING") == b"+PONG\r\n"
        wait_for(lambda: proxy.run(lambda: len(pools_of(proxy).spares)) == pooled.SPARES)
        replies = wire.pipeline(
            [["SELECT", "0"], ["SET", "plain", "0"], ["MULTI"], ["SET", "tx", "0"], ["EXEC"]], 5
        )
    finally:
        wire.close()
        proxy.stop()
    assert replies[-1] == b"*1\r\n+OK\r\n"
    assert sorted(redis.Redis(port=upstream.port, db=0).keys()) == [b"plain", b"tx"]


def test_hello_with_a_name_redis_refuses_is_refused_and_changes_nothing(
    start: Callable[..., ProxyThread], direct: redis.Redis
) -> None:
    """LOW-MEDIUM. HELLO 3 SETNAME 'bad name': Redis refuses it and the client stays in
    RESP2; the proxy drops the name, sends HELLO 3 and the client is in RESP3 (a RESP2
    library then misreads every reply)."""
    proxy = start(databases=16)
    requests = [["HELLO", "3", "SETNAME", "bad name"], ["GET", "missing"]]
    on_redis, on_proxy = both(
        proxy.port, direct.connection_pool.connection_kwargs["port"], requests, 2
    )
    assert on_redis == [
        b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n",
        b"$-1\r\n",
    ]
    assert on_proxy == on_redis


def test_reset_forgets_the_client_name(
    start: Callable[..., ProxyThread], direct: redis.Redis
) -> None:
    """LOW. RESET discards the connection's name on Redis; a shared session keeps the
    name the proxy holds for it (Session.reset_state does not clear client_name)."""
    proxy = start(databases=16)
    requests = [["CLIENT", "SETNAME", "before-reset"], ["RESET"], ["CLIENT", "GETNAME"]]
    on_redis, on_proxy = both(
        proxy.port, direct.connection_pool.connection_kwargs["port"], requests, 3
    )
    assert on_redis == [b"+OK\r\n", b"+RESET\r\n", b"$-1\r\n"]
    assert on_proxy == on_redis


def test_a_hello_lost_with_its_connection_leaves_the_client_on_resp2(
    start: Callable[..., ProxyThread], direct: redis.Redis
) -> None:
    """MEDIUM. The shared connection drops after Redis ran HELLO 3 but before its reply
    came back: the client gets 'may or may not have run' and the session (RouteEntry)
    goes back to RESP2, but PooledLink stays on the RESP3 route, so the RESP2 client
    gets RESP3 replies ('_' for a nil, maps for HGETALL)."""
    proxy = start(pool_size=1, databases=16)
    warm = Wire(proxy.port, 3)  # the RESP3 route's connection, ready
    victim = Wire(proxy.port)
    try:
        assert warm.call("PING") == b"+PONG\r\n"
        assert victim.call("PING") == b"+PONG\r\n"
        time.sleep(0.1)  # (so that the RESP3 connection's last command is PING)

        def resp3_connection() -> Any:
            (found,) = [
                c
                for pool in pools_of(proxy).pools.values()
                if pool.route.resp3
                for c in pool.connections
            ]
            return found

        connection = proxy.run(resp3_connection)
        proxy.run(lambda: connection.transport.pause_reading())  # its reply stays unread
        victim.sock.sendall(encode_request([b"HELLO", b"3"]))
        wait_for(
            lambda: any(c.get("cmd") == "hello" for c in pool_connections(direct)),
            what="HELLO to run",
        )
        proxy.run(lambda: connection.transport.abort())
        (hello,) = victim.pipeline([], 1)
        assert LOST in hello
        missing = victim.call("GET", "missing")
    finally:
        warm.close()
        victim.close()
    assert missing == b"$-1\r\n"  # the session told the client nothing changed: RESP2


def test_an_auth_answered_wrongpass_leaves_the_client_who_it_was(
    start: Callable[..., ProxyThread],
    direct: redis.Redis,
    acl: Callable[..., None],
) -> None:
    """MEDIUM (credentials). Within the documented 60-s verdict, AUTH with a password
    just revoked moves the client to the user's shared connection; Redis then answers
    the AUTH itself WRONGPASS, the session goes back to the default user, but
    PooledLink stays: the client was told it failed and acts as the user, for as long
    as it stays connected (not only for the verdict's 60 s)."""
    acl("rotated", "old-pw")
    proxy = start(pool_size=1, databases=16)
    holder = Wire(proxy.port)
    latecomer = Wire(proxy.port)
    try:
        assert holder.call("AUTH", "rotated", "old-pw") == b"+OK\r\n"
        direct.acl_setuser("rotated", enabled=True, reset_passwords=True, passwords=["+new-pw"])
        auth = latecomer.call("AUTH", "rotated", "old-pw")
        whoami = latecomer.call("ACL", "WHOAMI")
    finally:
        holder.close()
        latecomer.close()
    if auth.startswith(b"-"):
        assert whoami == b"$7\r\ndefault\r\n"  # told it failed: it must not be `rotated`


def test_after_a_password_rotation_a_pooled_client_goes_on_where_it_is_and_is_told_why_it_cant_move(
    start: Callable[..., ProxyThread],
    direct: redis.Redis,
    acl: Callable[..., None],
) -> None:
    """Rotating a password (ACL SETUSER resetpass >new) leaves authenticated connections
    working on Redis. Pooled, the client's shared connections stay logged in, but a new
    connection can't log in with a password Redis no longer takes: a move to another db
    gets an error saying to AUTH again (the client stays where it is), and a pin, whose
    transaction could run nowhere else, closes the client with that error."""
    acl("rotating", "old-pw")
    proxy = start(databases=16)
    on_proxy = Wire(proxy.port)
    try:
        assert on_proxy.call("AUTH", "rotating", "old-pw") == b"+OK\r\n"
        assert on_proxy.call("SET", "rotation:k", "1") == b"+OK\r\n"
        direct.acl_setuser("rotating", enabled=True, reset_passwords=True, passwords=["+new-pw"])
        assert on_proxy.call("GET", "rotation:k") == b"$1\r\n1\r\n"  # where it is
        moved = on_proxy.call("SELECT", "1")
        assert moved.startswith(b"-ERR fieldcrypt: the upstream refused this client's credentials")
        assert b"AUTH again" in moved and b"old-pw" not in moved
        assert on_proxy.call("INCR", "rotation:n") == b":1\r\n"  # still in db 0
        assert on_proxy.call("AUTH", "rotating", "new-pw") == b"+OK\r\n"
        assert on_proxy.call("SELECT", "1") == b"+OK\r\n"
    finally:
        on_proxy.close()
    assert direct.get("rotation:n") == b"1"


# --- Shapes and faults that must behave as against Redis -----------------------------

MASK_ID = re.compile(rb"id\r\n:\d+")
MASK_CLIENT_INFO = re.compile(rb"\$\d+\r\nid=\d+ addr=[^\r]*\r\n")


def masked(frames: list[bytes]) -> list[bytes]:
    return [MASK_CLIENT_INFO.sub(b"<info>", MASK_ID.sub(b"id:N", f)) for f in frames]


SAME_AS_REDIS = [
    [
        ["SET", "k", "1"],
        ["CLIENT", "SETNAME", "n1"],
        ["SELECT", "1"],
        ["SET", "k", "2"],
        ["HELLO", "3"],
        ["GET", "k"],
        ["CLIENT", "GETNAME"],
        ["HELLO", "2"],
        ["SELECT", "0"],
        ["GET", "k"],
        ["CLIENT", "SETINFO", "LIB-NAME", "x"],
        ["MULTI"],
        ["INCR", "k"],
        ["EXEC"],
        ["GET", "k"],
        ["CLIENT", "GETNAME"],
        ["RESET"],
        ["GET", "k"],
    ],
    [
        ["SET", "a", "1"],
        ["CLIENT", "REPLY", "OFF"],
        ["SET", "b", "2"],
        ["GET", "a"],
        ["CLIENT", "REPLY", "ON"],
        ["GET", "b"],
    ],
    [["SET", "a", "1"], ["CLIENT", "REPLY", "SKIP"], ["GET", "a"], ["GET", "a"], ["PING"]],
    [["GET", "a"], ["READONLY"], ["GET", "a"], ["READWRITE"]],
    [["SET", "a", "1"], ["SUBSCRIBE", "ch"], ["PING"], ["UNSUBSCRIBE"], ["GET", "a"]],
    [
        ["HELLO", "3"],
        ["SET", "a", "1"],
        ["SUBSCRIBE", "ch"],
        ["PING"],
        ["UNSUBSCRIBE"],
        ["GET", "a"],
    ],
    [["SET", "a", "1"], ["WATCH", "a"], ["GET", "a"], ["UNWATCH"]],
    [["PING"], ["QUIT"], ["PING"]],
    [["SELECT", "1"], ["SET", "q", "1"], ["RESET"], ["GET", "q"], ["SELECT", "1"], ["GET", "q"]],
    [["HELLO", "3", "SETNAME", "abc"], ["CLIENT", "GETNAME"], ["HELLO", "2"], ["HELLO", "4"]],
    [["AUTH", "x"], ["AUTH", "default", "x"], ["AUTH"], ["PING"]],
    [
        ["MULTI"],
        ["SELECT", "1"],
        ["SET", "m", "1"],
        ["EXEC"],
        ["GET", "m"],
        ["SELECT", "0"],
        ["GET", "m"],
    ],
    [["FOOBAR"], ["GET"], ["SET", "a"], ["EXEC"], ["DISCARD"], ["PING"]],
    [
        ["CLIENT"],
        ["CLIENT", "SETNAME"],
        ["CLIENT", "GETNAME", "x"],
        ["CLIENT", "SETINFO", "LIB-VER"],
        ["PING"],
    ],
    [
        ["HELLO", "3"],
        ["CLIENT", "TRACKING", "ON"],
        ["SET", "t", "1"],
        ["GET", "t"],
        ["SET", "t", "2"],
        ["PING"],
    ],
    [["XREAD", "BLOCK", "10", "STREAMS", "s", "$"], ["BLPOP", "l", "0.01"], ["PING"]],
    [["EVAL", "redis.call('SELECT', '5') return 1", "0"], ["SET", "ev", "1"], ["DBSIZE"]],
]
REPLIES = [18, 3, 3, 4, 5, 6, 4, 2, 6, 4, 4, 7, 6, 5, 7, 3, 3]


@pytest.mark.parametrize(
    ("requests", "replies"),
    list(zip(SAME_AS_REDIS, REPLIES, strict=True)),
    ids=[" ".join(r[0] for r in reqs)[:60] for reqs in SAME_AS_REDIS],
)
def test_mixed_pipelines_match_redis_byte_for_byte(
    start: Callable[..., ProxyThread],
    direct: redis.Redis,
    requests: list[list[str]],
    replies: int,
) -> None:
    proxy = start(databases=16)
    on_redis, on_proxy = both(
        proxy.port, direct.connection_pool.connection_kwargs["port"], requests, replies
    )
    assert masked(on_proxy) == masked(on_redis)


def test_concurrent_large_pipelines_resp2_and_resp3_with_moves(
    start: Callable[..., ProxyThread],
) -> None:
    """8 clients (RESP2 and RESP3) x 10,000 requests at once on 2 shared connections per
    route, with SELECTs inside: every reply comes back to its owner, in order."""
    proxy = start(pool_size=2, databases=16)
    errors: list[Any] = []

    def client(number: int) -> None:
        wire = Wire(proxy.port, 2 + number % 2)
        try:
            requests: list[list[str | bytes]] = []
            expected: list[bytes] = []
            for i in range(10_000):
                if i % 997 == 0:
                    requests.append(["SELECT", str(i % 4)])
                    expected.append(b"+OK\r\n")
                else:
                    tag = f"{number}:{i}".encode()
                    requests.append(["ECHO", tag])
                    expected.append(b"$%d\r\n%s\r\n" % (len(tag), tag))
            got = wire.pipeline(requests, len(requests))
            if got != expected:
                at = next(i for i, (g, e) in enumerate(zip(got, expected, strict=True)) if g != e)
                errors.append((number, at, got[at], expected[at]))
        except Exception as error:  # reported below
            errors.append((number, repr(error)))
        finally:
            wire.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []


def test_inline_commands_and_a_request_split_across_reads(
    start: Callable[..., ProxyThread],
) -> None:
    proxy = start(databases=16)
    wire = Wire(proxy.port)
    sock = wire.sock
    try:
        sock.sendall(b"PING\r\n\r\nECHO hi\r\nSET in line\r\n*2\r\n$3\r\nGET\r\n$2\r\n")
        time.sleep(0.1)
        sock.sendall(b"in\r\n")
        assert wire.pipeline([], 4) == [
            b"+PONG\r\n",
            b"$2\r\nhi\r\n",
            b"+OK\r\n",
            b"$4\r\nline\r\n",
        ]
        sock.sendall(b"select 2\r\nmulti\r\nset x 1\r\nexec\r\nclient info\r\n")
        replies = wire.pipeline([], 5)
    finally:
        sock.close()
    assert replies[:4] == [b"+OK\r\n", b"+OK\r\n", b"+QUEUED\r\n", b"*1\r\n+OK\r\n"]
    assert b" db=2 " in replies[4]


def test_killing_shared_connections_under_load_never_replays(
    start: Callable[..., ProxyThread], direct: redis.Redis
) -> None:
    """8 clients INCR their own counter in pipelines while the shared connections are
    killed again and again: every reply is a count or 'may or may not have run', no
    client is dropped, and each counter is between the counts acknowledged and those
    plus the uncertain ones (nothing is silently sent twice)."""
    proxy = start(pool_size=2, databases=16)
    results: dict[int, tuple[int, int, list[bytes], str | None]] = {}
    stop = threading.Event()

    def client(number: int) -> None:
        wire = Wire(proxy.port)  # RESP2: a HELLO itself could be the request lost
        ok = maybe = 0
        other: list[bytes] = []
        closed = None
        try:
            for _ in range(40):
                for reply in wire.pipeline([["INCR", f"kill:{number}"]] * 50, 50):
                    if reply.startswith(b":"):
                        ok += 1
                    elif LOST in reply:
                        maybe += 1
                    else:
                        other.append(reply)
        except Exception as error:
            closed = repr(error)
        finally:
            wire.close()
        results[number] = (ok, maybe, other, closed)

    def killer() -> None:
        while not stop.is_set():
            for connection in pool_connections(direct):
                with contextlib.suppress(redis.ResponseError):
                    direct.client_kill_filter(_id=connection["id"])
            time.sleep(0.01)

    kill = threading.Thread(target=killer)
    kill.start()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    stop.set()
    kill.join(10)
    for number, (ok, maybe, other, closed) in results.items():
        assert closed is None and other == []
        value = int(direct.get(f"kill:{number}") or 0)
        assert ok <= value <= ok + maybe, (number, ok, maybe, value)
    assert len(results) == 8


def test_redis_timeout_closing_idle_shared_connections_costs_nothing(
    start: Callable[..., ProxyThread], direct: redis.Redis
) -> None:
    proxy = start(databases=16)
    wire = Wire(proxy.port, 3)
    direct.config_set("timeout", "1")
    try:
        assert wire.call("SET", "idle:k", "v") == b"+OK\r\n"
        wait_for(lambda: not pool_connections(direct), 15, "Redis to close idle connections")
        assert wire.call("GET", "idle:k") == b"$1\r\nv\r\n"
        assert wire.call("GET", "missing") == b"_\r\n"  # still RESP3 on a new connection
    finally:
        direct.config_set("timeout", "0")
        wire.close()


def test_redis_restart_the_client_goes_on(upstream: EmbeddedServer) -> None:
    server = EmbeddedServer(upstream.binary)
    server.start()
    proxy = ProxyThread(make_state(server.port, databases=16))
    wire = Wire(proxy.port)
    try:
        assert wire.call("SET", "restart:k", "v") == b"+OK\r\n"
        server.stop()
        server = EmbeddedServer(upstream.binary, port=server.port)
        server.start()
        time.sleep(0.2)
        assert wire.call("GET", "restart:k") == b"$-1\r\n"  # no persistence: a new server
        assert wire.call("PING") == b"+PONG\r\n"
    finally:
        wire.close()
        proxy.stop()
        server.stop()


def test_acl_user_with_restricted_keys_stays_restricted(
    start: Callable[..., ProxyThread], direct: redis.Redis, acl: Callable[..., None]
) -> None:
    acl("keys-app", "keys-pw", keys=["app:*"])
    proxy = start(databases=16)
    direct.set("other:secret", "s")
    restricted = Wire(proxy.port)
    free = Wire(proxy.port)
    try:
        assert restricted.call("AUTH", "keys-app", "keys-pw") == b"+OK\r\n"
        # another client of the same proxy user, interleaved on the same connections
        for _ in range(20):
            assert free.call("GET", "other:secret") == b"$1\r\ns\r\n"
            assert restricted.call("GET", "other:secret").startswith(b"-NOPERM")
            assert restricted.call("SET", "app:k", "1") == b"+OK\r\n"
        assert restricted.call("SELECT", "1") == b"+OK\r\n"
        assert restricted.call("GET", "other:secret").startswith(b"-NOPERM")
        assert restricted.call("MULTI") == b"+OK\r\n"  # pinned: still the same user
        assert restricted.call("GET", "other:secret").startswith(b"-NOPERM")
    finally:
        restricted.close()
        free.close()


def test_revoked_password_is_refused_once_the_verdict_expires(
    start: Callable[..., ProxyThread],
    direct: redis.Redis,
    acl: Callable[..., None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pooled, "VERDICT_SECONDS", 0.3)
    acl("verdict", "old-pw")
    proxy = start(pool_size=1, databases=16)
    holder = Wire(proxy.port)
    late = Wire(proxy.port)
    try:
        assert holder.call("AUTH", "verdict", "old-pw") == b"+OK\r\n"
        direct.acl_setuser("verdict", enabled=True, reset_passwords=True, passwords=["+new-pw"])
        time.sleep(0.5)
        assert late.call("AUTH", "verdict", "old-pw").startswith(b"-WRONGPASS")
        assert late.call("ACL", "WHOAMI") == b"$7\r\ndefault\r\n"
        assert late.call("AUTH", "verdict", "new-pw") == b"+OK\r\n"
        assert late.call("ACL", "WHOAMI") == b"$7\r\nverdict\r\n"
    finally:
        holder.close()
        late.close()


def test_no_pool_leak_from_failed_auths_and_bounded_connections(
    start: Callable[..., ProxyThread], direct: redis.Redis
) -> None:
    """100 clients each AUTH with a different wrong password, then SELECT every db and
    both protocols: pools with refused credentials are forgotten, and the upstream
    connections stay bounded by routes x pool size + spares."""
    proxy = start(pool_size=2, databases=16)
    for number in range(100):
        wire = Wire(proxy.port)
        try:
            assert wire.call("AUTH", "ghost", f"wrong-{number}").startswith(b"-WRONGPASS")
            assert wire.call("PING") == b"+PONG\r\n"
        finally:
            wire.close()
    assert proxy.run(lambda: len(pools_of(proxy).pools)) <= 1
    wires = [Wire(proxy.port) for _ in range(10)]
    try:
        for wire in wires:
            for db in range(16):
                assert wire.pipeline([["SELECT", str(db)], ["PING"]], 2)[1] == b"+PONG\r\n"
        assert len(direct.client_list()) <= 1 + 16 * 2 + pooled.SPARES
    finally:
        for wire in wires:
            wire.close()
