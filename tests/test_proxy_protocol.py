"""fieldcrypt between real clients and real servers: framing, connection state, blocking.

Every behaviour is checked the way a user meets it: through the proxy, with a
real client (raw sockets as nc would type, redis-py, redis-cli), and wherever
the server's exact bytes matter, against the same conversation held directly
with the same server.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import hiredis
import pytest
import redis
import redis.asyncio
from redis._parsers import _HiredisParser, _RESP2Parser, _RESP3Parser

from tests.servers import (
    ALL_SERVER_KINDS,
    EmbeddedServer,
    ProxyThread,
    cli_binary,
    free_port,
    make_state,
    raw_connect,
    read_exactly,
    read_until_closed,
    server_binary,
    wait_for,
)

UPSTREAM_KINDS = ALL_SERVER_KINDS  # the `upstream` kinds here (tests/conftest.py)
UPSTREAM_MODES = ["pooled", "dedicated"]

T = TypeVar("T")
Arg = bytes | str | int | float

END = "fieldcrypt-test-end"
END_REPLY = b"$19\r\nfieldcrypt-test-end\r\n"
INCOMPLETE = object()  # what hiredis.Reader.gets() returns when it needs more bytes
MAX_READS = 100_000  # bound on recv() calls while waiting for replies


# --- Talking RESP as bytes ------------------------------------------------------


def command(*args: Arg) -> bytes:
    """One request as client libraries send it: an array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def parse_all(data: bytes) -> list[Any]:
    """Every value in a reply stream, parsed by hiredis (pushes as hiredis.PushNotification)."""
    reader = hiredis.Reader(notEnoughData=INCOMPLETE)
    reader.feed(data)
    values = []
    while (value := reader.gets()) is not INCOMPLETE:
        values.append(value)
    return values


class RawClient:
    """A plain socket that speaks RESP bytes; hiredis only counts the replies."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = raw_connect(port)
        self.sock.settimeout(timeout)
        self.reader = hiredis.Reader(notEnoughData=INCOMPLETE)

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, *requests: bytes) -> None:
        self.sock.sendall(b"".join(requests))

    def read(self, count: int) -> tuple[bytes, list[Any]]:
        """The bytes of the next `count` replies (pushes count too), and their values."""
        data = bytearray()
        values: list[Any] = []
        for _ in range(MAX_READS):
            while len(values) < count and (value := self.reader.gets()) is not INCOMPLETE:
                values.append(value)
            if len(values) >= count:
                return bytes(data), values
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise AssertionError(
                    f"connection closed after {len(values)} of {count} replies: {bytes(data)!r}"
                )
            data += chunk
            self.reader.feed(chunk)
        raise AssertionError(f"gave up after {MAX_READS} reads")

    def call(self, *requests: bytes, replies: int | None = None) -> bytes:
        self.send(*requests)
        return self.read(len(requests) if replies is None else replies)[0]

    def values(self, *requests: bytes, replies: int | None = None) -> list[Any]:
        self.send(*requests)
        return self.read(len(requests) if replies is None else replies)[1]

    def until_end(self, *requests: bytes) -> bytes:
        """Send the requests and an ECHO, and return every byte that comes back before the
        ECHO's reply. Needs no reply count, so it suits attributes and CLIENT REPLY OFF."""
        payload = b"".join(requests) + command("ECHO", END)
        # Send from a thread: a big pipeline must be read while it is being written.
        sender = threading.Thread(target=self.sock.sendall, args=(payload,), daemon=True)
        sender.start()
        data = bytearray()
        for _ in range(MAX_READS):
            if data.endswith(END_REPLY):
                break
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise AssertionError(f"connection closed before the end: {bytes(data[-300:])!r}")
            data += chunk
        else:
            raise AssertionError(f"gave up after {MAX_READS} reads")
        sender.join(30)
        self.reader = hiredis.Reader(notEnoughData=INCOMPLETE)
        return bytes(data[: -len(END_REPLY)])

    def closed_by_peer(self) -> bool:
        """True once the other side has closed the connection (waits up to the timeout)."""
        try:
            return self.sock.recv(65536) == b""
        except ConnectionResetError:
            return True


def assert_same_bytes(through_proxy: bytes, direct: bytes) -> None:
    """Like ==, but a failure on megabytes of replies shows where they part."""
    if through_proxy == direct:
        return
    at = next(
        (i for i, (a, b) in enumerate(zip(through_proxy, direct, strict=False)) if a != b),
        min(len(through_proxy), len(direct)),
    )
    raise AssertionError(
        f"through the proxy: {len(through_proxy)} bytes, directly: {len(direct)} bytes; "
        f"first difference at byte {at}:\n"
        f"  proxy:  {through_proxy[max(at - 60, 0) : at + 100]!r}\n"
        f"  direct: {direct[max(at - 60, 0) : at + 100]!r}"
    )


def without_connection_ids(replies: bytes) -> bytes:
    """HELLO's reply names the connection's id, which differs from connection to connection."""
    return re.sub(rb"\$2\r\nid\r\n:\d+\r\n", b"$2\r\nid\r\n:ID\r\n", replies)


def flush(port: int) -> None:
    with redis.Redis(port=port) as client:
        client.flushall()


def proxied_and_direct(
    upstream: EmbeddedServer, proxy: ProxyThread, conversation: Callable[[int], T]
) -> tuple[T, T]:
    """Hold the same conversation directly and through the proxy, each on an empty server."""
    flush(upstream.port)
    direct = conversation(upstream.port)
    flush(upstream.port)
    through_proxy = conversation(proxy.port)
    return through_proxy, direct


def kind_of(upstream: EmbeddedServer) -> str:
    kind: str = upstream.kind  # type: ignore[attr-defined]
    return kind


def blocked_clients(client: redis.Redis) -> int:
    return int(client.info("clients")["blocked_clients"])


# --- Pipelines ------------------------------------------------------------------


def mixed_pipeline(count: int) -> bytes:
    """Deterministic commands whose replies are status, bulk, null, integer, array and error."""
    requests = []
    for i in range(count):
        step = i % 8
        if step == 0:
            requests.append(command("SET", f"key:{i}", f"value-{i}"))
        elif step == 1:
            requests.append(command("GET", f"key:{i - 1}"))
        elif step == 2:
            requests.append(command("INCR", "counter"))
        elif step == 3:
            requests.append(command("HSET", f"hash:{i % 97}", f"field:{i}", i))
        elif step == 4:
            requests.append(command("GET", f"missing:{i}"))
        elif step == 5:
            requests.append(command("LPUSH", f"list:{i % 13}", i))
        elif step == 6:
            requests.append(command("LRANGE", f"list:{i % 13}", 0, 2))
        else:
            requests.append(command("INCR", f"key:{i - 7}"))  # not an integer: an error
    return b"".join(requests)


def test_pipeline_of_100000_commands_replies_byte_for_byte_as_directly(
    upstream: EmbeddedServer, proxy: ProxyThread
) -> None:
    pipeline = mixed_pipeline(100_000)

    def conversation(port: int) -> bytes:
        with RawClient(port, timeout=30) as client:
            return client.until_end(pipeline)

    through_proxy, direct = proxied_and_direct(upstream, proxy, conversation)

    assert direct.count(b"-ERR value is not an integer") == 12_500
    assert direct.count(b"$-1\r\n") == 12_500
    assert_same_bytes(through_proxy, direct)


def test_requests_sent_one_byte_at_a_time_reply_as_directly(
    upstream: EmbeddedServer, proxy: ProxyThread
) -> None:
    requests = b"".join(
        [
            command("SET", "a", "x" * 5000),
            b"PING\r\n",
            b"\r\n",
            command("MULTI"),
            command("INCR", "n"),
            command("EXEC"),
            command("CLIENT", "REPLY", "SKIP"),
            command("GET", "a"),
            command("SELECT", 2),
            command("SET", "b", "in db 2"),
            b'GET "b"\r\n',
            command("HELLO", 3),
            command("HSET", "h", "f", "v"),
            command("HGETALL", "h"),
            command("SUBSCRIBE", "news"),
            command("UNSUBSCRIBE", "news"),
            command("HELLO", 2),
            command("SELECT", 0),
            command("GET", "a"),
        ]
    )

    def conversation(port: int) -> bytes:
        with RawClient(port) as client:
            for i in range(len(requests)):
                client.sock.sendall(requests[i : i + 1])
            return without_connection_ids(client.until_end())

    through_proxy, direct = proxied_and_direct(upstream, proxy, conversation)

    assert direct.count(b"x" * 5000) == 1  # the first GET a was skipped
    assert_same_bytes(through_proxy, direct)


def test_redis_cli_pipe_of_100000_commands_reports_no_errors(
    upstream: EmbeddedServer, proxy: ProxyThread, direct: redis.Redis, tmp_path: Path
) -> None:
    commands = tmp_path / "commands.resp"
    with commands.open("wb") as out:
        for i in range(50_000):
            out.write(command("SET", f"pipe:{i}", i))
            out.write(command("INCR", "pipe-counter"))

    with commands.open("rb") as stdin:
        result = subprocess.run(
            [cli_binary(kind_of(upstream)), "-h", "127.0.0.1", "-p", str(proxy.port), "--pipe"],
            stdin=stdin,
            capture_output=True,
            timeout=60,
        )

    assert result.returncode == 0, result.stderr
    assert b"errors: 0, replies: 100000" in result.stdout
    assert direct.get("pipe-counter") == b"50000"
    assert direct.dbsize() == 50_001


def test_redis_cli_pipe_of_300000_inline_commands_reports_no_errors(
    upstream: EmbeddedServer, proxy: ProxyThread, direct: redis.Redis, tmp_path: Path
) -> None:
    # Inline commands, as a text file of `SET k v` lines is piped in: they go through the
    # strict parser, which must stay linear in a buffer holding hundreds of thousands of
    # them (it once copied the rest of the buffer per command and never finished).
    commands = tmp_path / "commands.txt"
    commands.write_bytes(b"".join(b"SET inline:%d %d\n" % (i, i) for i in range(300_000)))

    with commands.open("rb") as stdin:
        result = subprocess.run(
            [cli_binary(kind_of(upstream)), "-h", "127.0.0.1", "-p", str(proxy.port), "--pipe"],
            stdin=stdin,
            capture_output=True,
            timeout=120,  # a bound against a hang, not a speed check
        )

    assert result.returncode == 0, result.stderr
    assert b"errors: 0, replies: 300000" in result.stdout
    assert direct.dbsize() == 300_000
    assert direct.get("inline:299999") == b"299999"


# --- RESP3 reply types ----------------------------------------------------------


def test_resp3_reply_types_from_ordinary_commands_pass_through_byte_for_byte(
    upstream: EmbeddedServer, proxy: ProxyThread
) -> None:
    requests = [
        command("HSET", "profile", "name", "ada", "lang", "en"),
        command("HGETALL", "profile"),  # map
        command("SADD", "tags", "admin"),
        command("SMEMBERS", "tags"),  # set
        command("ZADD", "scores", "1.5", "ada"),
        command("ZSCORE", "scores", "ada"),  # double
        command("ZRANGE", "scores", 0, -1, "WITHSCORES"),  # array of [member, double]
        command("GET", "missing"),  # null
        command("LOLWUT", "VERSION", 1),  # verbatim (bare LOLWUT draws at random on 8.2, 9.1)
        command("EVAL", "return {big_number='123456789012345678901234567890'}", 0),
        command("EVAL", "redis.setresp(3); return true", 0),  # boolean
        command("EVAL", "redis.setresp(3); return false", 0),
        command("EVAL", "return {double=3.5}", 0),
        command("EVAL", "return {map={a=1}}", 0),
        command("EVAL", "return {set={a=true}}", 0),
        command("CONFIG", "GET", "maxmemory-policy"),  # map
        command("INCRBYFLOAT", "float", "0.1"),
        command("HGET", "profile", "missing"),
    ]

    def conversation(port: int) -> bytes:
        with RawClient(port) as client:
            client.call(command("HELLO", 3))  # its reply names the connection id
            return client.until_end(*requests)

    through_proxy, direct = proxied_and_direct(upstream, proxy, conversation)

    for marker in (b"%2\r\n", b"~1\r\n", b",1.5\r\n", b"_\r\n", b"=", b"(1234567890", b"#t\r\n"):
        assert marker in direct, f"the server sent no {marker!r}; the test does not cover it"
    assert_same_bytes(through_proxy, direct)


SCALAR_TYPES = ["string", "integer", "double", "bignum", "null", "verbatim", "true", "false"]
DEBUG_TYPES = [*SCALAR_TYPES, "array", "set", "map", "attrib", "push"]


@dataclass
class DebugTarget:
    """A server of the same kind as `upstream`, but one that allows DEBUG, and a proxy to it."""

    port: int
    proxy: ProxyThread


def answers_ping(port: int) -> bool:
    try:
        with raw_connect(port) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="module")
def debug_target(
    upstream: EmbeddedServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DebugTarget]:
    """The shared servers refuse DEBUG (enable-debug-command is immutable at run time)."""
    port = free_port()
    directory = tmp_path_factory.mktemp("debug-server")
    options = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    options += ["--dir", str(directory), "--enable-debug-command", "yes"]
    process = subprocess.Popen(
        [server_binary(kind_of(upstream)), *options],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: answers_ping(port), what="the DEBUG-enabled server to answer")
        handle = ProxyThread(make_state(port))
        try:
            yield DebugTarget(port, handle)
        finally:
            handle.stop()
    finally:
        process.terminate()
        process.wait(10)


def debug_conversation(port: int, protocol: int, types: list[str]) -> bytes:
    with RawClient(port) as client:
        if protocol == 3:
            client.call(command("HELLO", 3))
        requests = [command("DEBUG", "PROTOCOL", name) for name in types]
        return client.until_end(*requests, command("PING"))


@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("reply_type", DEBUG_TYPES)
def test_debug_protocol_reply_type_passes_through_byte_for_byte(
    debug_target: DebugTarget, reply_type: str, protocol: int
) -> None:
    direct = debug_conversation(debug_target.port, protocol, [reply_type])
    through_proxy = debug_conversation(debug_target.proxy.port, protocol, [reply_type])

    assert direct.endswith(b"+PONG\r\n")
    assert_same_bytes(through_proxy, direct)


def test_debug_protocol_every_resp3_type_in_one_pipeline_passes_through_byte_for_byte(
    debug_target: DebugTarget,
) -> None:
    types = DEBUG_TYPES * 3
    direct = debug_conversation(debug_target.port, 3, types)
    through_proxy = debug_conversation(debug_target.proxy.port, 3, types)

    assert direct.count(b"|1\r\n$14\r\nkey-popularity") == 3
    assert_same_bytes(through_proxy, direct)


# --- Pub/sub --------------------------------------------------------------------


def pubsub_conversation(port: int, publisher: redis.Redis, protocol: int) -> list[bytes]:
    """Subscribe in all three ways, receive, ping, unsubscribe, then use the connection."""
    with RawClient(port) as client:
        if protocol == 3:
            client.call(command("HELLO", 3))
        steps = [
            client.call(command("SUBSCRIBE", "news", "sport"), replies=2),
            client.call(command("PSUBSCRIBE", "n*")),
            client.call(command("SSUBSCRIBE", "shard")),
        ]
        publisher.publish("news", "hello")  # a message and a pmessage
        publisher.execute_command("SPUBLISH", "shard", "to the shard")
        steps.append(client.read(3)[0])
        steps.append(client.call(command("PING"), command("PING", "while subscribed")))
        # RESP2: refused while subscribed; RESP3: served.
        steps.append(client.call(command("SET", "k", "v"), command("GET", "k")))
        steps.append(client.call(command("UNSUBSCRIBE"), replies=2))
        steps.append(client.call(command("PUNSUBSCRIBE"), command("SUNSUBSCRIBE")))
        steps.append(
            client.call(command("SET", "k", "after"), command("GET", "k"), command("PING"))
        )
        publisher.publish("news", "nobody listens")
        steps.append(client.call(command("ECHO", "no message came in between")))
        return steps


@pytest.mark.parametrize("protocol", [2, 3])
def test_pubsub_conversation_is_byte_for_byte_as_directly(
    upstream: EmbeddedServer, proxy: ProxyThread, direct: redis.Redis, protocol: int
) -> None:
    through_proxy, direct_steps = proxied_and_direct(
        upstream, proxy, lambda port: pubsub_conversation(port, direct, protocol)
    )

    assert b"smessage" in direct_steps[3]
    assert through_proxy == direct_steps


@pytest.mark.parametrize("protocol", [2, 3])
def test_redis_py_pubsub_receives_channel_pattern_and_shard_messages(
    proxy: ProxyThread, direct: redis.Redis, protocol: int
) -> None:
    client = redis.Redis(port=proxy.port, protocol=protocol)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("news")
    pubsub.psubscribe("n*")
    pubsub.ssubscribe("shard")
    for _ in range(50):  # read the three confirmations
        pubsub.get_message(timeout=0.1)
        if pubsub.subscribed and len(pubsub.shard_channels) == 1:
            break
    wait_for(
        lambda: direct.pubsub_numsub("news") == [(b"news", 1)] and direct.pubsub_numpat() == 1,
        what="the subscriptions to reach the server",
    )

    direct.publish("news", "hello")
    direct.execute_command("SPUBLISH", "shard", "to the shard")
    received = []
    for _ in range(100):
        message = pubsub.get_message(timeout=0.1)
        if message is None:
            message = pubsub.get_sharded_message(timeout=0.1)
        if message is not None:
            received.append((message["type"], message["pattern"], message["channel"]))
        if len(received) == 3:
            break

    assert sorted(received, key=repr) == sorted(
        [
            ("message", None, b"news"),
            ("pmessage", b"n*", b"news"),
            ("smessage", None, b"shard"),
        ],
        key=repr,
    )

    pubsub.unsubscribe()
    pubsub.punsubscribe()
    pubsub.sunsubscribe()
    for _ in range(50):
        pubsub.get_message(timeout=0.1)
        if not pubsub.subscribed:
            break
    assert not pubsub.subscribed
    # The same connection serves ordinary commands again.
    connection = pubsub.connection
    assert connection is not None
    connection.send_command("SET", "after-pubsub", "yes")
    assert connection.read_response() == b"OK"
    connection.send_command("GET", "after-pubsub")
    assert connection.read_response() == b"yes"
    pubsub.close()
    client.close()


# --- RESP3 client-side tracking --------------------------------------------------


def tracking_conversation(port: int, writer: redis.Redis) -> list[bytes]:
    with RawClient(port) as client:
        client.call(command("HELLO", 3))
        steps = [
            client.call(
                command("SET", "tracked", "v1"),
                command("CLIENT", "TRACKING", "ON"),
                command("GET", "tracked"),
            )
        ]
        writer.set("tracked", "changed by another client")
        # The invalidation push, then the replies to these two requests, in order.
        steps.append(client.call(command("GET", "tracked"), command("ECHO", "after"), replies=3))
        # The connection's own writes invalidate its own reads, between its replies.
        steps.append(
            client.until_end(
                command("GET", "own"),
                command("SET", "own", "x"),
                command("GET", "own"),
                command("SET", "own", "y"),
                command("GET", "own"),
            )
        )
        return steps


def test_resp3_tracking_invalidation_push_arrives_and_replies_stay_matched(
    upstream: EmbeddedServer, proxy: ProxyThread, direct: redis.Redis
) -> None:
    through_proxy, direct_steps = proxied_and_direct(
        upstream, proxy, lambda port: tracking_conversation(port, direct)
    )

    assert through_proxy == direct_steps
    values = parse_all(through_proxy[1])
    pushes = [value for value in values if isinstance(value, hiredis.PushNotification)]
    replies = [value for value in values if not isinstance(value, hiredis.PushNotification)]
    assert pushes == [[b"invalidate", [b"tracked"]]]
    assert replies == [b"changed by another client", b"after"]
    own = parse_all(through_proxy[2])
    own_replies = [value for value in own if not isinstance(value, hiredis.PushNotification)]
    assert own_replies == [None, b"OK", b"x", b"OK", b"y"]
    assert [b"invalidate", [b"own"]] in own


# --- Blocking commands ------------------------------------------------------------


def run_while_blocked(
    direct: redis.Redis, blocking: Callable[[], T], wake: Callable[[], object]
) -> T:
    """Start `blocking` (through the proxy), wait until the server has it blocked, `wake` it."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(blocking)
        wait_for(lambda: blocked_clients(direct) == 1, what="the command to block on the server")
        wake()
        return future.result(timeout=15)


def test_blpop_is_woken_by_another_clients_lpush(via: redis.Redis, direct: redis.Redis) -> None:
    popped = run_while_blocked(
        direct, lambda: via.blpop(["jobs"], timeout=10), lambda: direct.lpush("jobs", "job-1")
    )

    assert popped == (b"jobs", b"job-1")
    assert direct.llen("jobs") == 0


def test_blmove_is_woken_by_another_clients_push(via: redis.Redis, direct: redis.Redis) -> None:
    moved = run_while_blocked(
        direct,
        lambda: via.blmove("incoming", "working", 10, "LEFT", "RIGHT"),
        lambda: direct.rpush("incoming", "task"),
    )

    assert moved == b"task"
    assert direct.lrange("working", 0, -1) == [b"task"]


def test_bzpopmin_is_woken_by_another_clients_zadd(via: redis.Redis, direct: redis.Redis) -> None:
    popped = run_while_blocked(
        direct, lambda: via.bzpopmin(["queue"], timeout=10), lambda: direct.zadd("queue", {"m": 2})
    )

    assert popped == (b"queue", b"m", 2.0)


def test_xread_block_is_woken_by_another_clients_xadd(
    via: redis.Redis, direct: redis.Redis
) -> None:
    read = run_while_blocked(
        direct,
        lambda: via.xread({"events": "$"}, block=10_000),
        lambda: direct.xadd("events", {"kind": "login"}, id="5-1"),
    )

    assert read == [[b"events", [(b"5-1", {b"kind": b"login"})]]]


@pytest.mark.parametrize("protocol", [2, 3])
def test_blocking_commands_that_time_out_reply_as_directly(
    upstream: EmbeddedServer, proxy: ProxyThread, protocol: int
) -> None:
    def conversation(port: int) -> bytes:
        with RawClient(port) as client:
            if protocol == 3:
                client.call(command("HELLO", 3))
            return client.until_end(
                command("BLPOP", "nothing", "0.01"),
                command("BZPOPMIN", "nothing", "0.01"),
                command("XREAD", "BLOCK", 10, "STREAMS", "nothing", "$"),
                command("WAIT", 0, 0),
            )

    through_proxy, direct = proxied_and_direct(upstream, proxy, conversation)

    assert direct.endswith(b":0\r\n")  # WAIT: no replica acknowledged
    assert_same_bytes(through_proxy, direct)


def test_wait_0_0_returns_no_replicas(via: redis.Redis) -> None:
    via.set("k", "v")

    assert via.wait(0, 0) == 0


# --- Transactions -----------------------------------------------------------------


def test_watch_then_a_change_by_another_client_aborts_exec(
    via: redis.Redis, direct: redis.Redis
) -> None:
    direct.set("balance", "100")
    with via.pipeline() as pipe:
        pipe.watch("balance")
        assert pipe.get("balance") == b"100"
        direct.set("balance", "changed elsewhere")
        pipe.multi()
        pipe.set("balance", "mine")
        with pytest.raises(redis.WatchError):
            pipe.execute()

    assert direct.get("balance") == b"changed elsewhere"


def test_multi_exec_runs_every_queued_command(via: redis.Redis, direct: redis.Redis) -> None:
    with via.pipeline(transaction=True) as pipe:
        pipe.set("a", 1).incr("a").lpush("l", "x", "y").hset("h", "f", "v").get("a")
        results = pipe.execute()

    assert results == [True, 2, 2, 1, b"2"]
    assert direct.lrange("l", 0, -1) == [b"y", b"x"]


def transaction_conversation(port: int, other: redis.Redis) -> bytes:
    with RawClient(port) as client:
        client.call(command("WATCH", "watched"))
        other.set("watched", "changed")
        return client.until_end(
            command("MULTI"),
            command("SET", "watched", "mine"),
            command("EXEC"),  # aborted: null
            command("MULTI"),
            command("SET", "discarded", "1"),
            command("DISCARD"),
            command("GET", "discarded"),
            command("MULTI"),
            command("NOSUCHCMD"),
            command("SET", "aborted", "1"),
            command("EXEC"),  # EXECABORT
            command("GET", "aborted"),
            command("MULTI"),
            command("SET", "text", "abc"),
            command("INCR", "text"),  # fails inside EXEC's array
            command("GET", "text"),
            command("EXEC"),
            command("EXEC"),  # without MULTI
            command("DISCARD"),  # without MULTI
        )


def test_transactions_watch_discard_and_errors_reply_as_directly(
    upstream: EmbeddedServer, proxy: ProxyThread, direct: redis.Redis
) -> None:
    through_proxy, direct_bytes = proxied_and_direct(
        upstream, proxy, lambda port: transaction_conversation(port, direct)
    )

    assert b"*-1\r\n" in direct_bytes
    assert b"-EXECABORT" in direct_bytes
    assert_same_bytes(through_proxy, direct_bytes)
    assert direct.get("discarded") is None


# --- Databases and users ----------------------------------------------------------


def test_clients_in_different_databases_do_not_see_each_others_keys(
    proxy: ProxyThread, upstream: EmbeddedServer
) -> None:
    one = redis.Redis(port=proxy.port, db=1)
    two = redis.Redis(port=proxy.port, db=2)
    zero = redis.Redis(port=proxy.port)

    one.set("shared-name", "in db one")
    two.set("shared-name", "in db two")

    assert one.get("shared-name") == b"in db one"
    assert two.get("shared-name") == b"in db two"
    assert zero.get("shared-name") is None
    with redis.Redis(port=upstream.port, db=1) as direct_db_one:
        assert direct_db_one.get("shared-name") == b"in db one"
    for client in (one, two, zero):
        client.close()


def test_select_in_a_pipeline_applies_to_the_commands_behind_it(
    upstream: EmbeddedServer, proxy: ProxyThread
) -> None:
    def conversation(port: int) -> bytes:
        with RawClient(port) as client:
            return client.until_end(
                command("SELECT", 3),
                command("SET", "where", "three"),
                command("SELECT", 99),  # out of range: stays in 3
                command("GET", "where"),
                command("SELECT", 0),
                command("GET", "where"),
            )

    through_proxy, direct = proxied_and_direct(upstream, proxy, conversation)

    assert direct.endswith(b"$5\r\nthree\r\n+OK\r\n$-1\r\n")
    assert_same_bytes(through_proxy, direct)


@pytest.fixture
def acl_user(upstream: EmbeddedServer) -> Iterator[tuple[str, str]]:
    name, password = "fc-alice", "s3cret-alice"
    with redis.Redis(port=upstream.port) as admin:
        admin.execute_command("ACL", "SETUSER", name, "on", f">{password}", "~*", "&*", "+@all")
        try:
            yield name, password
        finally:
            admin.execute_command("ACL", "DELUSER", name)


def test_auth_as_an_acl_user_through_the_proxy_makes_the_connection_that_user(
    proxy: ProxyThread, acl_user: tuple[str, str]
) -> None:
    name, password = acl_user
    with RawClient(proxy.port) as client:
        assert client.values(command("ACL", "WHOAMI")) == [b"default"]
        assert client.call(command("AUTH", name, password), command("ACL", "WHOAMI")) == (
            b"+OK\r\n$%d\r\n%s\r\n" % (len(name), name.encode())
        )

    with redis.Redis(port=proxy.port, username=name, password=password) as client:
        assert client.acl_whoami() == name


def test_wrong_passwords_give_the_same_errors_as_directly(
    upstream: EmbeddedServer, proxy: ProxyThread, acl_user: tuple[str, str]
) -> None:
    name, _ = acl_user

    def conversation(port: int) -> bytes:
        # One at a time: Redis 8.2 drops the replies of some failed AUTHs pipelined
        # behind another (directly, too).
        with RawClient(port) as client:
            return b"".join(
                client.until_end(request)
                for request in (
                    command("AUTH", name, "wrong"),
                    command("AUTH", "nosuchuser", "wrong"),
                    command("AUTH", "wrong"),  # the default user has no password
                    command("HELLO", 3, "AUTH", name, "wrong"),
                    command("ACL", "WHOAMI"),
                )
            )

    through_proxy, direct = proxied_and_direct(upstream, proxy, conversation)

    assert direct.startswith(b"-WRONGPASS")
    assert_same_bytes(through_proxy, direct)


# --- CLIENT -----------------------------------------------------------------------


def test_client_setname_getname_id_and_info_describe_the_clients_own_connection(
    via: redis.Redis, direct: redis.Redis
) -> None:
    via.client_setname("reporting-job")
    client_id = via.client_id()
    info = via.client_info()

    assert via.client_getname() == "reporting-job"
    assert info["name"] == "reporting-job"
    assert int(info["id"]) == client_id
    seen_by_server = [entry for entry in direct.client_list() if entry["name"] == "reporting-job"]
    assert [int(entry["id"]) for entry in seen_by_server] == [client_id]


def test_client_kill_of_another_clients_connection_closes_that_client(
    proxy: ProxyThread, via: redis.Redis
) -> None:
    with RawClient(proxy.port) as victim:
        ok, victim_id = victim.values(
            command("CLIENT", "SETNAME", "victim"), command("CLIENT", "ID")
        )
        assert ok == b"OK"

        assert via.client_kill_filter(_id=victim_id) == 1

        assert victim.closed_by_peer()
    assert via.ping() is True
    assert "victim" not in [entry["name"] for entry in via.client_list()]


# --- MONITOR, RESET, QUIT -------------------------------------------------------


def test_monitor_sees_another_clients_commands_and_reset_ends_it(proxy: ProxyThread) -> None:
    writer = redis.Redis(port=proxy.port)
    with RawClient(proxy.port) as monitor:
        assert monitor.values(command("MONITOR")) == [b"OK"]
        writer.set("monitored-key", "v")
        lines = []
        for _ in range(50):
            lines += monitor.read(1)[1]
            if b'"monitored-key"' in lines[-1]:
                break
        assert b'"SET" "monitored-key" "v"' in lines[-1]

        monitor.send(command("RESET"))
        for _ in range(50):
            (value,) = monitor.read(1)[1]
            if value == b"RESET":
                break
        else:
            raise AssertionError("RESET got no +RESET")
        writer.set("after-reset", "v")
        assert monitor.values(command("PING")) == [b"PONG"]
    writer.close()


def test_reset_returns_to_db_0_and_resp2(upstream: EmbeddedServer, proxy: ProxyThread) -> None:
    def conversation(port: int) -> list[bytes]:
        with RawClient(port) as client:
            steps = [
                client.call(command("HSET", "h", "f", "in db 0")),
                client.call(command("SELECT", 3), command("SET", "where", "three")),
            ]
            hello = client.call(command("HELLO", 3))
            steps.append(hello[:1])  # a map; the rest names the connection id
            steps.append(client.call(command("HGETALL", "h"), command("GET", "where")))
            steps.append(client.call(command("RESET")))
            steps.append(
                client.call(command("GET", "where"), command("HGETALL", "h"), command("PING"))
            )
            steps.append(client.call(command("SUBSCRIBE", "after-reset")))
            with redis.Redis(port=port) as publisher:
                publisher.publish("after-reset", "resp2 message")
            steps.append(client.read(1)[0])
            steps.append(client.call(command("UNSUBSCRIBE"), command("GET", "where")))
            return steps

    through_proxy, direct = proxied_and_direct(upstream, proxy, conversation)

    assert direct[2] == b"%"
    assert direct[4] == b"+RESET\r\n"
    assert direct[5] == b"$-1\r\n*2\r\n$1\r\nf\r\n$7\r\nin db 0\r\n+PONG\r\n"
    assert through_proxy == direct


def test_quit_replies_ok_closes_and_runs_nothing_after_it(
    proxy: ProxyThread, direct: redis.Redis
) -> None:
    with RawClient(proxy.port) as client:
        client.send(command("SET", "before-quit", 1), command("QUIT"), command("SET", "after", 1))
        assert read_until_closed(client.sock) == b"+OK\r\n+OK\r\n"

    assert direct.get("before-quit") == b"1"
    assert direct.get("after") is None


# --- CLIENT REPLY -----------------------------------------------------------------


def test_client_reply_off_skip_on_suppress_replies_as_directly(
    upstream: EmbeddedServer, proxy: ProxyThread
) -> None:
    def conversation(port: int) -> list[bytes]:
        with RawClient(port) as client:
            pipelined = client.until_end(
                command("SET", "a", 1),
                command("CLIENT", "REPLY", "OFF"),
                command("SET", "b", 2),
                command("GET", "a"),
                command("NOSUCHCMD"),
                command("CLIENT", "REPLY", "ON"),
                command("GET", "b"),
                command("CLIENT", "REPLY", "SKIP"),
                command("GET", "a"),
                command("GET", "b"),
                command("client", "reply", "skip"),
                command("NOSUCHCMD"),
                command("CLIENT", "REPLY", "SKIP"),
                command("CLIENT", "REPLY", "ON"),  # clears the skip before it replies
                command("INCR", "a"),
            )
            # The same, one request per write, as a user types it.
            typed = []
            for request in (
                b"CLIENT REPLY OFF\r\n",
                b"SET typed 1\r\n",
                b"CLIENT REPLY ON\r\n",
                b"GET typed\r\n",
            ):
                client.send(request)
                if request.startswith(b"CLIENT REPLY ON") or request.startswith(b"GET"):
                    typed.append(client.read(1)[0])
            return [pipelined, *typed]

    through_proxy, direct = proxied_and_direct(upstream, proxy, conversation)

    assert direct[0] == b"+OK\r\n+OK\r\n$1\r\n2\r\n$1\r\n2\r\n+OK\r\n:2\r\n"
    assert through_proxy == direct


def test_client_reply_skip_while_off_keeps_replies_off_as_directly(
    upstream: EmbeddedServer, proxy: ProxyThread
) -> None:
    # Redis ignores SKIP while OFF: the commands after it stay silent, up to ON.
    def conversation(port: int) -> bytes:
        with RawClient(port) as client:
            return client.until_end(
                command("CLIENT", "REPLY", "OFF"),
                command("CLIENT", "REPLY", "SKIP"),
                command("SET", "x", 1),
                command("GET", "x"),
                command("CLIENT", "REPLY", "ON"),
                command("GET", "x"),
            )

    through_proxy, direct = proxied_and_direct(upstream, proxy, conversation)

    assert direct == b"+OK\r\n$1\r\n1\r\n"
    assert_same_bytes(through_proxy, direct)


MALFORMED = b"*1\r\n$x\r\n"  # a bulk length that is not a number


def protocol_error_conversation(port: int, *before: bytes, timeout: float = 2.0) -> bytes:
    """Requests, then a malformed one: all the client gets until the connection ends
    (or until `timeout` seconds of silence)."""
    with RawClient(port, timeout=timeout) as client:
        client.send(*before, MALFORMED)
        received = read_until_closed(client.sock)
    return without_connection_ids(received)


# Redis answers a malformed request after the replies to every request before it, then
# closes. The proxy can only do the same if it kept count of those replies: each case
# below is a way for the count to drift from what Redis really sends.
BEFORE_MALFORMED = [
    pytest.param([command("SET", "a", 1), command("PING")], id="plain"),
    pytest.param(
        [
            command("CLIENT", "REPLY", "OFF"),
            command("CLIENT", "REPLY", "SKIP"),  # Redis ignores SKIP while OFF
            command("GET", "a"),
            command("PING"),  # so this is silent too
            command("CLIENT", "REPLY", "ON"),
            command("PING"),
        ],
        id="client-reply-skip-while-off",
    ),
    pytest.param(
        [
            command("RPUSH", "chat", "message", "from", "ada"),
            command("LRANGE", "chat", 0, -1),  # an array that looks like a RESP2 message
            command("SUBSCRIBE", "news"),
            command("UNSUBSCRIBE"),
            command("PING"),
        ],
        id="reply-like-a-message-before-subscribe",
    ),
    pytest.param(
        [
            command("RPUSH", "chat", "message", "from", "ada"),
            command("MULTI"),
            command("HELLO", 3),  # queued; the connection is RESP3 after EXEC
            command("EXEC"),
            command("SUBSCRIBE", "news"),
            command("LRANGE", "chat", 0, -1),
            command("PING"),
        ],
        id="hello-3-inside-multi-then-subscribe",
    ),
]


@pytest.mark.parametrize("before", BEFORE_MALFORMED)
def test_malformed_request_is_answered_after_every_earlier_reply_then_closes(
    upstream: EmbeddedServer, proxy: ProxyThread, before: list[bytes]
) -> None:
    through_proxy, direct = proxied_and_direct(
        upstream, proxy, lambda port: protocol_error_conversation(port, *before)
    )

    assert direct.endswith(b"+PONG\r\n-ERR Protocol error: invalid bulk length\r\n")
    assert_same_bytes(through_proxy, direct)


def test_protocol_error_under_client_reply_off_gets_no_reply(
    upstream: EmbeddedServer, proxy: ProxyThread
) -> None:
    # Redis stays silent (and leaves the connection open): read for a second of silence.
    off = [command("CLIENT", "REPLY", "OFF"), command("SET", "x", 1)]
    through_proxy, direct = proxied_and_direct(
        upstream, proxy, lambda port: protocol_error_conversation(port, *off, timeout=1.0)
    )

    assert direct == b""
    assert_same_bytes(through_proxy, direct)


# --- Scripts and functions --------------------------------------------------------

LIBRARY = """#!lua name=fieldcrypt_test_lib
redis.register_function('fc_echo', function(keys, args) return args[1] end)
redis.register_function{function_name='fc_get', callback=function(keys, args)
  return redis.call('GET', keys[1]) end, flags={'no-writes'}}
"""


def test_eval_evalsha_script_load_and_fcall_pass_through(
    via: redis.Redis, direct: redis.Redis
) -> None:
    script = "return {KEYS[1], ARGV[1], redis.call('INCR', KEYS[1])}"

    assert via.eval(script, 1, "counter", "arg") == [b"counter", b"arg", 1]
    sha = via.script_load(script)
    assert sha == direct.script_load(script)
    assert via.evalsha(sha, 1, "counter", "again") == [b"counter", b"again", 2]
    assert via.script_exists(sha) == [True]
    with pytest.raises(redis.ResponseError, match=r"(?i)unknown (redis )?command"):
        via.eval("return redis.call('NOSUCHCMD')", 0)

    try:
        assert via.function_load(LIBRARY, replace=True) == b"fieldcrypt_test_lib"
        direct.set("plain", "value")
        assert via.fcall("fc_echo", 0, "hello") == b"hello"
        assert via.fcall_ro("fc_get", 1, "plain") == b"value"
    finally:
        direct.function_delete("fieldcrypt_test_lib")


def test_script_errors_reply_as_directly(upstream: EmbeddedServer, proxy: ProxyThread) -> None:
    def conversation(port: int) -> bytes:
        with RawClient(port) as client:
            return client.until_end(
                command("EVAL", "return redis.call('NOSUCHCMD')", 0),
                command("EVAL", "return {err='My Error'}", 0),
                command("EVALSHA", "0" * 40, 0),
                command("FCALL", "no_such_function", 0),
                command("EVAL", "return 1 +", 0),
            )

    through_proxy, direct = proxied_and_direct(upstream, proxy, conversation)

    assert direct.count(b"-") >= 5
    assert_same_bytes(through_proxy, direct)


# --- Inline commands, unknown and newer commands -----------------------------------


def test_inline_commands_typed_as_nc_would_reply_as_directly(
    upstream: EmbeddedServer, proxy: ProxyThread
) -> None:
    def conversation(port: int) -> list[bytes]:
        with RawClient(port) as client:
            together = client.call(b'PING\r\nSET a "hello world"\r\nGET a\n', replies=3)
            typed = [
                client.call(line)
                for line in (
                    b"PING\r\n",
                    b"SET b 'single quoted'\r\n",
                    b"GET b\n",
                    b'\r\nECHO "escaped\\x41\\n"\r\n',  # an empty line is skipped
                    b"   hset   h  f  v  \r\n",
                    b"HGETALL h\r\n",
                )
            ]
            return [together, *typed]

    through_proxy, direct = proxied_and_direct(upstream, proxy, conversation)

    assert direct[0] == b"+PONG\r\n+OK\r\n$11\r\nhello world\r\n"
    assert through_proxy == direct


def test_inline_command_with_unbalanced_quotes_is_refused_as_directly(
    upstream: EmbeddedServer, proxy: ProxyThread
) -> None:
    def conversation(port: int) -> bytes:
        with RawClient(port, timeout=3) as client:
            client.send(b'PING\r\nSET a "unbalanced\r\nPING\r\n')
            return read_until_closed(client.sock)

    through_proxy, direct = proxied_and_direct(upstream, proxy, conversation)

    assert direct == b"+PONG\r\n-ERR Protocol error: unbalanced quotes in request\r\n"
    assert_same_bytes(through_proxy, direct)


def test_unknown_and_newer_commands_reply_as_directly(
    upstream: EmbeddedServer, proxy: ProxyThread
) -> None:
    def conversation(port: int) -> bytes:
        with RawClient(port) as client:
            return client.until_end(
                command("NOSUCHCMD", "x"),
                b"nosuchcmd x y\r\n",
                command("RPUSH", "l", "a", "b", "c", "b"),
                command("LPOS", "l", "b", "RANK", 2),
                command("LMPOP", 1, "l", "RIGHT", "COUNT", 2),
                command("SET", "o", "v"),
                command("OBJECT", "FREQ", "o"),  # needs an LFU policy: an error either way
                command("OBJECT", "ENCODING", "o"),
                command("COMMAND", "DOCS", "GET", "LPOS"),
                command("COMMAND", "INFO", "LPOS"),
                command("COMMAND", "COUNT"),
                command("CLIENT", "NOSUCHSUBCOMMAND"),
            )

    through_proxy, direct = proxied_and_direct(upstream, proxy, conversation)

    assert direct.startswith(b"-ERR unknown command 'NOSUCHCMD', with args beginning with: 'x'")
    assert_same_bytes(through_proxy, direct)


# --- redis-py: asyncio, RESP2/RESP3, pure-Python and hiredis parsers ---------------


async def async_conversation(port: int, protocol: int) -> list[Any]:
    client = redis.asyncio.Redis(port=port, protocol=protocol)
    try:
        results: list[Any] = [
            await client.set("name", "ada"),
            await client.get("name"),
            await client.hset("profile", mapping={"lang": "en", "city": "London"}),
            await client.hgetall("profile"),
            await client.zadd("scores", {"ada": 1.5}),
            await client.zrange("scores", 0, -1, withscores=True),
            await client.incrbyfloat("float", 0.25),
        ]
        async with client.pipeline(transaction=True) as pipe:
            pipe.incr("counter").incr("counter").get("counter")
            results.append(await pipe.execute())
        # Many coroutines at once, over several proxied connections.
        await asyncio.gather(*(client.incr("concurrent") for _ in range(50)))
        results.append(await client.get("concurrent"))
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe("async-news")
        await client.publish("async-news", "hello")
        message = None
        for _ in range(50):
            message = await pubsub.get_message(timeout=0.2)
            if message is not None:
                break
        results.append(message)
        await pubsub.aclose()
        return results
    finally:
        await client.aclose()


@pytest.mark.parametrize("protocol", [2, 3])
def test_redis_py_asyncio_client_gets_the_same_results_as_directly(
    upstream: EmbeddedServer, proxy: ProxyThread, protocol: int
) -> None:
    through_proxy, direct = proxied_and_direct(
        upstream, proxy, lambda port: asyncio.run(async_conversation(port, protocol))
    )

    assert direct[-1]["data"] == b"hello"
    assert direct[-2] == b"50"
    assert through_proxy == direct


def sync_conversation(port: int, protocol: int, parser: type) -> list[Any]:
    pool = redis.ConnectionPool(port=port, protocol=protocol, parser_class=parser)
    client = redis.Redis(connection_pool=pool, single_connection_client=True)
    try:
        assert client.connection is not None
        assert type(client.connection._parser) is parser
        big = bytes(range(256)) * 4096
        return [
            client.set("name", "ada"),
            client.get("name"),
            client.get("missing"),
            client.hset("profile", mapping={"lang": "en", "city": "London"}),
            client.hgetall("profile"),
            client.sadd("tags", "a", "b"),
            client.smembers("tags"),
            client.zadd("scores", {"ada": 1.5, "bob": 2}),
            client.zrange("scores", 0, -1, withscores=True),
            client.zscore("scores", "ada"),
            client.incrbyfloat("float", 0.25),
            client.set("big", big),
            client.get("big") == big,
            client.pipeline(transaction=False)
            .incr("n")
            .lpush("l", 1, 2)
            .lrange("l", 0, -1)
            .execute(),
            client.config_get("maxmemory-policy"),
        ]
    finally:
        client.close()
        pool.disconnect()


@pytest.mark.parametrize(
    ("protocol", "parser"),
    [
        pytest.param(2, _RESP2Parser, id="resp2-python"),
        pytest.param(3, _RESP3Parser, id="resp3-python"),
        pytest.param(2, _HiredisParser, id="resp2-hiredis"),
        pytest.param(3, _HiredisParser, id="resp3-hiredis"),
    ],
)
def test_redis_py_parsers_get_the_same_results_as_directly(
    upstream: EmbeddedServer, proxy: ProxyThread, protocol: int, parser: type
) -> None:
    through_proxy, direct = proxied_and_direct(
        upstream, proxy, lambda port: sync_conversation(port, protocol, parser)
    )

    assert direct[12] is True
    assert through_proxy == direct


# --- redis-cli --------------------------------------------------------------------


def redis_cli(upstream: EmbeddedServer, port: int, *args: str) -> str:
    result = subprocess.run(
        [cli_binary(kind_of(upstream)), "-h", "127.0.0.1", "-p", str(port), *args],
        capture_output=True,
        timeout=30,
        check=True,
    )
    return result.stdout.decode()


def test_redis_cli_commands_through_the_proxy(
    upstream: EmbeddedServer, proxy: ProxyThread, direct: redis.Redis
) -> None:
    assert redis_cli(upstream, proxy.port, "set", "k", "v") == "OK\n"
    assert redis_cli(upstream, proxy.port, "get", "k") == "v\n"
    assert direct.get("k") == b"v"
    direct.hset("h", mapping={"f1": "v1", "f2": "v2"})

    through_proxy = redis_cli(upstream, proxy.port, "-3", "hgetall", "h")

    assert through_proxy == redis_cli(upstream, upstream.port, "-3", "hgetall", "h")
    assert sorted(through_proxy.split()) == ["f1", "f2", "v1", "v2"]
    assert redis_cli(upstream, proxy.port, "-3", "--no-raw", "hgetall", "h") == redis_cli(
        upstream, upstream.port, "-3", "--no-raw", "hgetall", "h"
    )


# --- Large values -----------------------------------------------------------------


def test_64_mb_value_set_and_get_round_trip_byte_for_byte(
    proxy: ProxyThread, direct: redis.Redis
) -> None:
    value = bytes(range(256)) * (64 * 1024 * 1024 // 256)
    value = value[:-5] + b"\r\n$-1"  # RESP-looking bytes inside the value

    with RawClient(proxy.port, timeout=60) as client:
        assert client.until_end(command("SET", "big", value)) == b"+OK\r\n"
        client.send(command("GET", "big"))
        expected = b"$%d\r\n%s\r\n" % (len(value), value)
        reply = read_exactly(client.sock, len(expected))

    assert_same_bytes(reply, expected)
    assert direct.strlen("big") == len(value)
