"""The asyncio shell for a Redis Cluster upstream. Routing decisions are in cluster.py.

fieldcrypt presents one ordinary (non-cluster) endpoint. Each client connection
opens, lazily, its own connection to each master it needs; every request goes
to the master that owns its key's slot, and replies go back in request order:
each request takes a place in an ordered queue, filled when its node answers,
and the queue is flushed from the front. MOVED and ASK are followed (clients
never see them); when a node stops answering, the slot map is read again from
any node that answers and the request is retried, for up to RETRY_WINDOW
seconds, long enough for a replica to be promoted.

The command table is the one the single-node proxy uses (handlers answering
Forward / Answer / Defer), so encryption behaves identically.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

import hiredis

from proxy import cluster, resp
from proxy.client import ClientError, RedisClient
from proxy.cluster import Address, CommandTable, SlotMap
from proxy.migrate import LOCK_KEY, AlreadyRunning, Migration, Options, Report
from proxy.server import (
    HIGH_WATER,
    LOW_WATER,
    ProxyServer,
    ProxyState,
    Target,
    admit,
    describe_error,
    is_loopback,
    write_to_client,
)
from proxy.session import (
    OPEN_COMMANDS,
    Answer,
    Defer,
    Forward,
    ReplyError,
    Session,
    Transform,
    pubsub_confirmation,
)

log = logging.getLogger("fieldcrypt")

RETRY_WINDOW: Final = 15.0  # seconds a request is retried while its node is unreachable
MAX_REDIRECTS: Final = 16
REFRESH_INTERVAL: Final = 0.1  # at most one slot-map refresh per this many seconds

SPLIT_COMMANDS: Final = frozenset({b"MGET", b"MSET", b"DEL", b"UNLINK", b"EXISTS", b"TOUCH"})
FAN_OUT_FIRST: Final = {  # sent to every master; the reply is the first one (or an error)
    (b"SCRIPT", b"LOAD"),
    (b"SCRIPT", b"FLUSH"),
    (b"FUNCTION", b"LOAD"),
    (b"FUNCTION", b"DELETE"),
    (b"FUNCTION", b"FLUSH"),
    (b"FUNCTION", b"RESTORE"),
}
SUBSCRIBE_KINDS: Final = {
    b"SUBSCRIBE": b"subscribe",
    b"PSUBSCRIBE": b"psubscribe",
    b"SSUBSCRIBE": b"ssubscribe",
    b"UNSUBSCRIBE": b"unsubscribe",
    b"PUNSUBSCRIBE": b"punsubscribe",
    b"SUNSUBSCRIBE": b"sunsubscribe",
}
_FAMILY: Final = {
    b"subscribe": b"channel",
    b"unsubscribe": b"channel",
    b"psubscribe": b"pattern",
    b"punsubscribe": b"pattern",
    b"ssubscribe": b"shard",
    b"sunsubscribe": b"shard",
}


def _unsupported(what: str) -> bytes:
    return resp.error_reply(
        f"ERR fieldcrypt: {what} is not supported with a Redis Cluster upstream"
    )


# --- The topology, shared by every connection ----------------------------------------------


class Topology:
    """The slot map and the command table, learnt from the cluster and refreshed on demand."""

    def __init__(self, seeds: Sequence[Address], template: Target) -> None:
        self.seeds = list(seeds)
        self.template = template  # credentials, TLS and timeouts for every node
        self.map = SlotMap()
        self.nodes: list[Address] = []  # every node seen, replicas included
        self.commands = CommandTable()
        self.ready = False
        self.redirects = 0  # MOVED and ASK followed, by every client
        self.retries = 0  # requests sent again after a node was lost or busy
        self._refresh: asyncio.Task[None] | None = None
        self._last = 0.0

    def target(self, address: Address) -> Target:
        t = self.template
        return Target(
            address[0],
            address[1],
            t.username,
            t.password,
            0,
            t.ssl_context,
            t.server_hostname,
            t.connect_timeout,
        )

    async def refresh(self, force: bool = False) -> None:
        """Read the slot map again (one refresh at a time; callers share it)."""
        if self._refresh is None or self._refresh.done():
            if not force and self.ready and time.monotonic() - self._last < REFRESH_INTERVAL:
                return
            self._refresh = asyncio.get_running_loop().create_task(self._read())
        await asyncio.shield(self._refresh)

    def schedule_refresh(self) -> None:
        if self._refresh is None or self._refresh.done():
            task = asyncio.get_running_loop().create_task(self.refresh())
            task.add_done_callback(_ignore_result)

    async def _read(self) -> None:
        candidates = list(dict.fromkeys([*self.map.masters, *self.nodes, *self.seeds]))
        problems = []
        for address in candidates:
            try:
                client = await RedisClient.connect(self.target(address))
            except ClientError as error:
                problems.append(str(error))
                continue
            try:
                slot_map, nodes = await self._ask(client, address[0])
                if not self.ready:
                    self.commands = CommandTable.from_command_reply(await client.execute("COMMAND"))
            except (hiredis.ReplyError, ClientError, ValueError, IndexError, TypeError) as error:
                problems.append(f"{address[0]}:{address[1]}: {error.__class__.__name__}")
                continue
            finally:
                await client.close()
            if not slot_map.masters:
                problems.append(f"{address[0]}:{address[1]} serves no slots")
                continue
            self.map = slot_map
            self.nodes = nodes
            self.ready = True
            self._last = time.monotonic()
            return
        self._last = time.monotonic()
        raise ClientError("no cluster node answered: " + "; ".join(problems[-3:]))

    @staticmethod
    async def _ask(client: RedisClient, host: str) -> tuple[SlotMap, list[Address]]:
        try:
            shards = await client.execute("CLUSTER", "SHARDS")
        except hiredis.ReplyError:  # before Redis 7: CLUSTER SLOTS
            slots = await client.execute("CLUSTER", "SLOTS")
            slot_map = cluster.parse_cluster_slots(slots, host)
            nodes = [
                (n[0].decode() or host, int(n[1])) for entry in slots for n in entry[2:] if n[0]
            ]
            return slot_map, nodes
        slot_map = cluster.parse_cluster_shards(shards, host)
        return slot_map, cluster.shard_nodes(shards, host)


def _ignore_result(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # refresh failures are retried by whoever needs the map


# --- One request's place in the reply queue ------------------------------------------------


class Pending:
    """A reply owed to the client, in request order; complete when every part is in."""

    __slots__ = ("data", "merge", "missing", "parts")

    def __init__(self, parts: int = 1, merge: Callable[[list[bytes]], bytes] | None = None):
        self.data: bytes | None = None
        self.parts: list[bytes | None] = [None] * parts
        self.missing = parts
        self.merge = merge

    def fill(self, part: int, frame: bytes) -> None:
        if self.parts[part] is None:
            self.missing -= 1
        self.parts[part] = frame
        if self.missing == 0:
            done = cast(list[bytes], self.parts)
            self.data = done[0] if self.merge is None else self.merge(done)


@dataclass(eq=False)
class Sent:
    """A request on its way to a node (or waiting to be retried)."""

    request: bytes
    route: tuple[str, Any]  # ("slot", n) | ("home", None) | ("index", i) | ("addr", address)
    pending: Pending | None = None  # None: an internal request, its reply swallowed
    part: int = 0
    transform: Transform | None = None
    queued: bool = False  # inside MULTI: redirects and retries can't be followed
    subscribe: bytes | None = None  # the confirmation kind it waits for, e.g. b"subscribe"
    remaining: int | None = None  # confirmations still due; None: count when the first comes
    collected: list[bytes] = field(default_factory=list)
    on_success: Callable[[bytes], None] | None = None
    what: str = ""  # an internal request's name, for messages
    attempts: int = 0
    first_failure: float = 0.0
    ask: Address | None = None  # send once to this node, after ASKING
    replayable: bool = False  # read-only: may be sent again if its node is lost mid-flight


# --- One client's connection to one node -------------------------------------------------------


class NodeLink(asyncio.Protocol):
    def __init__(self, client: ClusterClient, address: Address) -> None:
        self.client = client
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []
        self.inflight: deque[Sent] = deque()
        self.replies = resp.ReplyReader()
        self.subscriptions: dict[bytes, set[bytes | None]] = {
            b"channel": set(),
            b"pattern": set(),
            b"shard": set(),
        }
        self.subscribed = False  # RESP2: arrays may be pub/sub messages
        self.closed = False
        self.task: asyncio.Task[None] | None = None

    @property
    def label(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def send(self, data: bytes) -> None:
        if self.transport is None:
            self.early.append(data)
        else:
            self.transport.write(data)

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        if self.early:
            transport.writelines(self.early)
            self.early = []
        if self.client.paused_upstream:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        reader = self.replies
        reader.feed(data)
        client = self.client
        while not self.closed:
            end = reader.next()
            if end < 0:
                break
            start = reader.pos
            reader.pos = end
            client.on_frame(self, bytes(reader.buffer[start:end]))
        reader.compact()
        client.flush()

    def pause_writing(self) -> None:
        self.client.pause_reading(self.label)

    def resume_writing(self) -> None:
        self.client.resume_reading(self.label)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.client.link_lost(self, exc)

    def close(self) -> None:
        self.closed = True
        if self.task is not None:
            self.task.cancel()
        if self.transport is not None:
            self.transport.close()


# --- One client -------------------------------------------------------------------------------


def _is_resp2_pubsub(frame: bytes) -> bool:
    return (
        frame.startswith(b"*3\r\n$7\r\nmessage\r\n")
        or frame.startswith(b"*4\r\n$8\r\npmessage\r\n")
        or frame.startswith(b"*3\r\n$8\r\nsmessage\r\n")
        or (frame.startswith(b"*3\r\n$") and frame.find(b"subscribe\r\n", 0, 24) >= 0)
    )


def _apply(transform: Transform | None, session: Session, frame: bytes) -> bytes:
    if transform is None or frame[0] in resp.ERROR_TYPES:
        return frame
    try:
        return transform(session, frame)
    except ReplyError as error:
        return resp.error_reply(str(error))


def _first_error(frames: list[bytes]) -> bytes | None:
    return next((f for f in frames if f[0] in resp.ERROR_TYPES), None)


def _merge_sum(frames: list[bytes]) -> bytes:
    error = _first_error(frames)
    if error is not None:
        return error
    return b":%d\r\n" % sum(int(f[1:-2]) for f in frames)


def _merge_ok(frames: list[bytes]) -> bytes:
    return _first_error(frames) or b"+OK\r\n"


def _merge_first(frames: list[bytes]) -> bytes:
    return _first_error(frames) or frames[0]


def _merge_concat(frames: list[bytes]) -> bytes:
    error = _first_error(frames)
    if error is not None:
        return error
    items: list[bytes] = []
    for frame in frames:
        _, spans = resp.elements(frame, 0)
        items.extend(frame[s:e] for s, e in spans)
    return b"*%d\r\n" % len(items) + b"".join(items)


def _merge_positions(positions: list[list[int]], total: int) -> Callable[[list[bytes]], bytes]:
    """MGET split by slot: put each part's values back where their keys were."""

    def merge(frames: list[bytes]) -> bytes:
        error = _first_error(frames)
        if error is not None:
            return error
        out: list[bytes] = [b""] * total
        for frame, where in zip(frames, positions, strict=True):
            _, spans = resp.elements(frame, 0)
            for (s, e), at in zip(spans, where, strict=True):
                out[at] = frame[s:e]
        return b"*%d\r\n" % total + b"".join(out)

    return merge


class ClusterClient(asyncio.Protocol):
    """One client, its connections to the masters it uses, and its reply queue."""

    def __init__(self, server: ClusterServer, number: int) -> None:
        self.server = server
        self.state = server.state
        self.topology = server.topology
        self.number = number
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None
        self.requests = resp.RequestReader(server.state.max_request)
        self.queue: deque[Pending] = deque()
        self.links: dict[Address, NodeLink] = {}
        self.home: Address | None = None
        self.protocol = 2  # what new node connections are switched to (HELLO)
        self.auth: list[bytes] | None = None  # the client's own AUTH, for new connections
        self.in_multi = False
        self.multi_refused = False
        self.multi_slot: int | None = None
        self.multi_address: Address | None = None
        self.held: list[Sent] = []  # MULTI and the keyless commands after it, before a key
        self.exec_transforms: list[Transform | None] = []
        self.watch_slot: int | None = None
        self.watch_address: Address | None = None
        self.closing = False
        self.closed = False
        self.paused_by: set[str] = set()
        self.paused_upstream = False
        self.peer = "?"
        self.tasks: set[asyncio.Task[Any]] = set()

    # --- client side ---------------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = admit(self, base)
        if transport is None:
            return
        peer = transport.get_extra_info("peername")

        def nowhere(data: bytes | bytearray) -> None:
            raise RuntimeError("a cluster session sends through ClusterClient")

        self.session = Session(
            self.state.dispatch,
            nowhere,
            nowhere,
            max_request=self.state.max_request,
            locked=self.state.client_auth,
            command_counts=self.state.command_counts,
            count_unauthenticated=self.state.stats.count_unauthenticated,
        )
        # The session's reader: it reads as Redis reads a client that hasn't authenticated
        # for as long as the session is locked.
        self.requests = self.session.requests
        self.session.loopback = is_loopback(peer)
        if not self.topology.ready:
            self.pause_reading("topology")
            self._spawn(self._first_map())

    async def _first_map(self) -> None:
        try:
            await self.topology.refresh()
        except ClientError as error:
            log.warning("cluster unreachable: %s", error)
            if self.transport is not None and not self.closed:
                self.transport.write(resp.error_reply(f"ERR fieldcrypt: {error}"))
            self.close()
            return
        self.resume_reading("topology")

    def data_received(self, data: bytes) -> None:
        if self.session is None or self.closing:
            return
        self.state.stats.bytes_in += len(data)
        reader = self.requests
        reader.feed(data)
        try:
            while not self.closing:
                request = reader.next()
                if request is None:
                    break
                start, end, name, args = request
                raw = None if reader.inline else bytes(reader.buffer[start:end])
                if self.session.locked:
                    self.session.count_unauthenticated()
                else:
                    resp.count_name(self.state.command_counts, name)
                self._request(name, args, raw)
        except resp.ProtocolError as error:
            self._local(resp.error_reply(f"ERR {error}"))
            self.closing = True
        except Exception:
            log.exception("internal error on a client connection; closing it")
            self.close()
            return
        reader.compact()
        self.flush()

    def pause_writing(self) -> None:
        self.paused_upstream = True
        for link in self.links.values():
            if link.transport is not None:
                link.transport.pause_reading()
        if self.session is not None and self.session.locked:  # replies are the proxy's own
            self.pause_reading("unread replies")

    def resume_writing(self) -> None:
        self.paused_upstream = False
        for link in self.links.values():
            if link.transport is not None:
                link.transport.resume_reading()
        self.resume_reading("unread replies")

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def pause_reading(self, reason: str) -> None:
        if not self.paused_by and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.paused_by.add(reason)

    def resume_reading(self, reason: str) -> None:
        if reason in self.paused_by:
            self.paused_by.discard(reason)
            if not self.paused_by and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    # --- one request ---------------------------------------------------------------------

    def _local(self, reply: bytes) -> Pending:
        pending = Pending()
        pending.fill(0, reply)
        self.queue.append(pending)
        return pending

    def _refuse(self, reply: bytes) -> None:
        if self.in_multi:
            self.multi_refused = True
        self._local(reply)

    def _request(self, name: bytes, args: list[bytes], raw: bytes | None) -> None:
        session = self.session
        assert session is not None
        if session.locked and name not in OPEN_COMMANDS:
            self._local(b"-NOAUTH Authentication required.\r\n")
            return
        handler = session.dispatch.get(name)
        outcome = handler(session, args) if handler is not None else None
        if isinstance(outcome, Answer):
            if outcome.refusal:
                self._refuse(outcome.reply)
            else:
                self._local(outcome.reply)
            return
        if isinstance(outcome, Defer):
            self._defer(outcome)
            return
        transform = None
        request = raw
        if isinstance(outcome, Forward):
            transform = outcome.transform
            if outcome.request is not None:
                request = outcome.request
                args = resp.request_args(request, 0, len(request))
                name = args[0].upper()
        if request is None:
            request = resp.encode_request(args)
        special = self._special(name, args, request, transform)
        if special:
            return
        self._route(name, args, request, transform)

    def _defer(self, deferred: Defer) -> None:
        pending = Pending()
        self.queue.append(pending)

        async def run() -> None:
            try:
                reply = await deferred.job()
            except Exception as error:
                log.exception("admin command failed")
                reply = resp.error_reply(f"ERR fieldcrypt: {error.__class__.__name__}")
            pending.fill(0, reply)
            self.flush()

        self._spawn(run())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _keys(self, args: list[bytes]) -> list[bytes] | None:
        try:
            return self.topology.commands.keys(args)
        except (IndexError, ValueError):
            return []  # malformed: any node answers Redis's own error

    def _special(
        self, name: bytes, args: list[bytes], request: bytes, transform: Transform | None
    ) -> bool:
        """Commands that are not simply routed by their key. True when handled."""
        if name in (b"MULTI", b"EXEC", b"DISCARD", b"WATCH", b"UNWATCH"):
            self._transaction(name, args, request)
            return True
        if self.in_multi:
            return False  # everything else is queued on the transaction's node
        if name == b"CLUSTER" and len(args) == 2 and self.server.announce is not None:
            host, port = self.server.announce
            sub = args[1].upper()
            assert self.session is not None
            if sub == b"SLOTS":
                self._local(cluster.announce_slots(host, port))
                return True
            if sub == b"SHARDS":
                self._local(cluster.announce_shards(host, port, self.session.resp3))
                return True
            if sub == b"NODES":
                self._local(cluster.announce_nodes(host, port))
                return True
        if name in SUBSCRIBE_KINDS:
            self._subscribe(name, args, request)
            return True
        if name == b"RESET":
            self._reset()
            return True
        if name == b"QUIT":
            self._local(b"+OK\r\n")
            self.closing = True
            return True
        if name == b"MONITOR":
            self._local(_unsupported("MONITOR"))
            return True
        if name == b"CLIENT" and len(args) >= 2 and args[1].upper() == b"REPLY":
            self._local(_unsupported("CLIENT REPLY"))
            return True
        if name == b"SELECT":
            db = args[1] if len(args) == 2 else b""
            if db == b"0":
                self._local(b"+OK\r\n")
            else:
                self._local(b"-ERR SELECT is not allowed in cluster mode\r\n")
            return True
        if name == b"HELLO" and len(args) >= 2 and args[1] in (b"2", b"3"):
            version = int(args[1])

            def switched(frame: bytes) -> None:
                self._set_protocol(version)

            self._send_to(Sent(request, ("home", None), self._new(), on_success=switched))
            return True
        if name == b"AUTH" and len(args) in (2, 3):

            def authenticated(frame: bytes) -> None:
                self._set_auth(list(args))

            self._send_to(Sent(request, ("home", None), self._new(), on_success=authenticated))
            return True
        if name == b"SCAN" and len(args) >= 2:
            self._scan(args)
            return True
        if name in (b"KEYS", b"DBSIZE", b"FLUSHALL", b"FLUSHDB", b"RANDOMKEY"):
            merge = {
                b"KEYS": _merge_concat,
                b"DBSIZE": _merge_sum,
                b"FLUSHALL": _merge_ok,
                b"FLUSHDB": _merge_ok,
                b"RANDOMKEY": _merge_random,
            }[name]
            self._fan_out(request, merge)
            return True
        if len(args) >= 2 and (name, args[1].upper()) in FAN_OUT_FIRST:
            self._fan_out(request, _merge_first)
            return True
        if name in SPLIT_COMMANDS and transform is None:
            return self._split(name, args)
        return False

    def _new(self, parts: int = 1, merge: Callable[[list[bytes]], bytes] | None = None) -> Pending:
        pending = Pending(parts, merge)
        self.queue.append(pending)
        return pending

    def _route(
        self, name: bytes, args: list[bytes], request: bytes, transform: Transform | None
    ) -> None:
        keys = self._keys(args)
        slots = cluster.slots_of(keys) if keys else set()
        if len(slots) > 1:
            self._refuse(cluster.CROSSSLOT)
            return
        slot = next(iter(slots)) if slots else None
        if self.in_multi:
            self._queue_in_multi(request, slot, transform)
            return
        route: tuple[str, Any] = ("slot", slot) if slot is not None else ("home", None)
        sent = Sent(request, route, self._new(), transform=transform)
        sent.replayable = self.topology.commands.readonly(name)
        self._send_to(sent)

    # --- multi-key commands, fan-out, SCAN ----------------------------------------------------

    def _split(self, name: bytes, args: list[bytes]) -> bool:
        """MGET/MSET/DEL/UNLINK/EXISTS/TOUCH across slots: one request per slot."""
        step = 2 if name == b"MSET" else 1
        if len(args) < 2 or (len(args) - 1) % step:
            return False  # Redis answers the arity error
        groups: dict[int, list[int]] = {}
        for at in range(1, len(args), step):
            groups.setdefault(cluster.key_slot(args[at]), []).append(at)
        if len(groups) == 1:
            return False
        positions = [[(at - 1) // step for at in ats] for ats in groups.values()]
        merge: Callable[[list[bytes]], bytes]
        if name == b"MGET":
            merge = _merge_positions(positions, len(args) - 1)
        elif name == b"MSET":
            merge = _merge_ok
        else:
            merge = _merge_sum
        pending = self._new(len(groups), merge)
        for part, (slot, ats) in enumerate(groups.items()):
            sub = [args[0]]
            for at in ats:
                sub.extend(args[at : at + step])
            self._send_to(Sent(resp.encode_request(sub), ("slot", slot), pending, part))
        return True

    def _fan_out(self, request: bytes, merge: Callable[[list[bytes]], bytes]) -> None:
        masters = len(self.topology.map.masters)
        pending = self._new(masters, merge)
        for index in range(masters):
            self._send_to(Sent(request, ("index", index), pending, index))

    def _scan(self, args: list[bytes]) -> None:
        try:
            index, node_cursor = cluster.split_cursor(int(args[1]))
        except ValueError:
            self._local(b"-ERR invalid cursor\r\n")
            return
        masters = len(self.topology.map.masters)
        if index >= masters:
            self._local(b"-ERR invalid cursor\r\n")
            return
        request = resp.encode_request([args[0], str(node_cursor).encode(), *args[2:]])

        def recursor(session: Session, frame: bytes) -> bytes:
            value, _ = resp.decode(frame)
            if not isinstance(value, resp.Aggregate) or len(value.items) != 2:
                return frame
            cursor_value = value.items[0]
            if not isinstance(cursor_value, resp.Blob):
                return frame
            node_next = int(cursor_value.data)
            if node_next != 0:
                out = cluster.join_cursor(index, node_next)
            elif index + 1 < len(self.topology.map.masters):
                out = cluster.join_cursor(index + 1, 0)
            else:
                out = 0
            cursor_value.data = str(out).encode()
            return resp.encode_value(value)

        self._send_to(Sent(request, ("index", index), self._new(), transform=recursor))

    # --- transactions --------------------------------------------------------------------

    def _transaction(self, name: bytes, args: list[bytes], request: bytes) -> None:
        if name == b"WATCH":
            if self.in_multi:
                self._local(b"-ERR WATCH inside MULTI is not allowed\r\n")
                return
            keys = args[1:]
            slots = cluster.slots_of(keys)
            if len(slots) > 1 or (
                self.watch_slot is not None and slots and slots != {self.watch_slot}
            ):
                self._local(cluster.CROSSSLOT)
                return
            if not slots:
                self._send_to(Sent(request, ("home", None), self._new()))
                return
            slot = next(iter(slots))
            address = self.topology.map.node_of(slot)
            if address is None:
                self._local(_clusterdown(slot))
                return
            self.watch_slot, self.watch_address = slot, address
            self._send_to(Sent(request, ("addr", address), self._new(), queued=True))
            return
        if name == b"UNWATCH":
            address = self.watch_address
            self.watch_slot = self.watch_address = None
            route: tuple[str, Any] = ("addr", address) if address else ("home", None)
            self._send_to(Sent(request, route, self._new(), queued=True))
            return
        if name == b"MULTI":
            if self.in_multi:
                self._local(b"-ERR MULTI calls can not be nested\r\n")
                return
            self.in_multi = True
            self.multi_refused = False
            self.exec_transforms = []
            multi = Sent(request, ("addr", None), self._new(), queued=True)
            if self.watch_address is not None:
                self.multi_slot, self.multi_address = self.watch_slot, self.watch_address
                multi.route = ("addr", self.multi_address)
                self._send_to(multi)
            else:
                self.multi_slot = self.multi_address = None
                self.held = [multi]
            return
        # EXEC or DISCARD
        if not self.in_multi:
            self._local(b"-ERR %s without MULTI\r\n" % name)
            return
        refused = self.multi_refused
        transforms = self.exec_transforms
        self.in_multi = False
        self.watch_slot = self.watch_address = None
        if self.multi_address is None:
            self._pin(self.topology.map.node_of(0) or self._home_address())
        if name == b"EXEC" and refused:
            request = b"*1\r\n$7\r\nDISCARD\r\n"
        pending = self._new()
        sent = Sent(request, ("addr", self.multi_address), pending, queued=True)
        if name == b"EXEC":
            sent.transform = _exec_transform(transforms, refused)
        self._send_to(sent)
        self.multi_address = self.multi_slot = None

    def _pin(self, address: Address | None) -> None:
        self.multi_address = address
        for sent in self.held:
            sent.route = ("addr", address)
            self._send_to(sent)
        self.held = []

    def _queue_in_multi(
        self, request: bytes, slot: int | None, transform: Transform | None
    ) -> None:
        if slot is not None:
            if self.multi_slot is None:
                address = self.topology.map.node_of(slot)
                if self.multi_address is not None and address != self.multi_address:
                    self._refuse(cluster.CROSSSLOT)
                    return
                self.multi_slot = slot
                if self.multi_address is None:
                    self._pin(address)
            elif slot != self.multi_slot:
                self._refuse(cluster.CROSSSLOT)
                return
        self.exec_transforms.append(transform)
        sent = Sent(request, ("addr", self.multi_address), self._new(), queued=True)
        if self.multi_address is None:
            self.held.append(sent)
        else:
            self._send_to(sent)

    # --- pub/sub -------------------------------------------------------------------------

    def _subscribe(self, name: bytes, args: list[bytes], request: bytes) -> None:
        kind = SUBSCRIBE_KINDS[name]
        channels = args[1:]
        if not channels and not name.endswith(b"UNSUBSCRIBE"):
            self._send_to(Sent(request, ("home", None), self._new()))  # Redis's arity error
            return
        route: tuple[str, Any] = ("home", None)
        if name in (b"SSUBSCRIBE", b"SUNSUBSCRIBE"):
            slots = cluster.slots_of(channels)
            if len(slots) > 1:
                self._local(cluster.CROSSSLOT)
                return
            if slots:
                route = ("slot", next(iter(slots)))
            else:
                shard_links = [link for link in self.links.values() if link.subscriptions[b"shard"]]
                if shard_links:
                    route = ("addr", shard_links[0].address)
        sent = Sent(request, route, self._new(), subscribe=kind)
        sent.remaining = len(channels) or None
        self._send_to(sent)

    def _on_push(self, link: NodeLink, frame: bytes) -> None:
        head = pubsub_confirmation(frame)
        if head is None:
            self._write(frame)  # a message, an invalidation: out of band, as it comes
            return
        kind, channel, count = head
        subscriptions = link.subscriptions[_FAMILY[kind]]
        link.subscribed = count > 0
        if link.inflight and link.inflight[0].subscribe == kind:
            sent = link.inflight[0]
            if sent.remaining is None:
                sent.remaining = max(len(subscriptions), 1)
            sent.remaining -= 1
            sent.collected.append(frame)
            if sent.remaining <= 0:
                link.inflight.popleft()
                self._deliver(sent, b"".join(sent.collected))
        else:
            self._write(frame)
        if kind.endswith(b"unsubscribe"):
            subscriptions.discard(channel)
        else:
            subscriptions.add(channel)

    # --- connection state ----------------------------------------------------------------------

    def _set_protocol(self, version: int) -> None:
        assert self.session is not None
        self.session.resp3 = version == 3
        if version == self.protocol:
            return
        self.protocol = version
        for link in self.links.values():
            if link.address != self._home_address():
                self._internal(link, "HELLO", [b"HELLO", str(version).encode()])

    def _set_auth(self, args: list[bytes]) -> None:
        self.auth = args
        for link in self.links.values():
            if link.address != self._home_address():
                self._internal(link, "AUTH", args)

    def _reset(self) -> None:
        for link in list(self.links.values()):
            link.close()
        self.links.clear()
        self.in_multi = self.multi_refused = False
        self.held = []
        self.multi_slot = self.multi_address = self.watch_slot = self.watch_address = None
        self.protocol = 2
        self.auth = None
        assert self.session is not None
        self.session.reset_state()
        self._local(b"+RESET\r\n")

    # --- sending ---------------------------------------------------------------------------

    def _home_address(self) -> Address | None:
        masters = self.topology.map.masters
        if self.home is None or self.home not in masters:
            if not masters:
                return None
            self.home = masters[self.number % len(masters)]
        return self.home

    def _address_of(self, sent: Sent) -> Address | None:
        if sent.ask is not None:
            return sent.ask
        kind, value = sent.route
        if kind == "slot":
            return self.topology.map.node_of(value)
        if kind == "index":
            masters = self.topology.map.masters
            return masters[value] if value < len(masters) else None
        if kind == "addr":
            return cast(Address | None, value)
        return self._home_address()

    def _send_to(self, sent: Sent) -> None:
        if self.closed:
            return
        if sent.route == ("addr", None):
            self.held.append(sent)
            return
        address = self._address_of(sent)
        if address is None:
            self._retry_later(sent, "no master serves the slot")
            return
        link = self._link(address)
        if sent.ask is not None:
            sent.ask = None
            self._internal(link, "ASKING", [b"ASKING"])
        link.inflight.append(sent)
        link.send(sent.request)

    def _internal(self, link: NodeLink, what: str, args: list[bytes]) -> None:
        link.inflight.append(Sent(resp.encode_request(args), ("addr", link.address), what=what))
        link.send(resp.encode_request(args))

    def _link(self, address: Address) -> NodeLink:
        link = self.links.get(address)
        if link is not None:
            return link
        link = NodeLink(self, address)
        self.links[address] = link
        target = self.topology.target(address)
        for what, args in target.handshake():
            self._internal(link, what, args)
        if self.auth is not None:
            self._internal(link, "AUTH", self.auth)
        if self.protocol == 3:
            self._internal(link, "HELLO", [b"HELLO", b"3"])
        link.task = asyncio.get_running_loop().create_task(self._open(link, target))
        return link

    async def _open(self, link: NodeLink, target: Target) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.create_connection(
                    lambda: link,
                    target.host,
                    target.port,
                    **target.tls_options(),
                ),
                target.connect_timeout,
            )
        except (OSError, TimeoutError, ssl.SSLError) as error:
            if not link.closed:
                link.closed = True
                self.link_lost(link, error)
        finally:
            link.task = None

    # --- replies -----------------------------------------------------------------------------

    def on_frame(self, link: NodeLink, frame: bytes) -> None:
        kind = frame[0]
        if kind == resp.PUSH or (
            kind == 42
            and self.protocol == 2
            and (link.subscribed or (link.inflight and link.inflight[0].subscribe))
            and _is_resp2_pubsub(frame)
        ):
            self._on_push(link, frame)
            return
        if not link.inflight:
            return  # unsolicited
        sent = link.inflight.popleft()
        if sent.pending is None:
            if kind in resp.ERROR_TYPES and sent.what != "ASKING":
                message = frame[1:].split(b"\r\n", 1)[0].decode(errors="replace")
                self._fail(f"ERR fieldcrypt: node {link.label} refused the proxy's {sent.what}: ")
                log.warning("node %s refused %s: %s", link.label, sent.what, message[:80])
            return
        if kind == 45 and not sent.queued:  # '-'
            redirect = cluster.parse_redirect(frame, link.address[0])
            if redirect is not None:
                self._redirect(sent, redirect)
                return
            if frame.startswith((b"-TRYAGAIN", b"-CLUSTERDOWN", b"-LOADING")):
                self._retry_later(sent, frame[1:].split(b" ", 1)[0].decode(errors="replace"))
                return
        elif kind == 45 and frame.startswith((b"-MOVED ", b"-ASK ")):
            self.topology.schedule_refresh()
            frame = resp.error_reply(
                "ERR fieldcrypt: the slot moved during the transaction, so EXEC will "
                "abort; run the transaction again"
            )
        self._deliver(sent, frame)

    def _deliver(self, sent: Sent, frame: bytes) -> None:
        assert sent.pending is not None and self.session is not None
        if sent.on_success is not None and frame[0] not in resp.ERROR_TYPES:
            sent.on_success(frame)
        sent.pending.fill(sent.part, _apply(sent.transform, self.session, frame))

    def _redirect(self, sent: Sent, redirect: cluster.Redirect) -> None:
        sent.attempts += 1
        self.topology.redirects += 1
        if sent.attempts > MAX_REDIRECTS:
            self._deliver(
                sent,
                resp.error_reply(
                    f"ERR fieldcrypt: slot {redirect.slot} was redirected "
                    f"{MAX_REDIRECTS} times; the cluster may be resharding, retry"
                ),
            )
            return
        if redirect.ask:
            sent.ask = redirect.address
        else:
            self.topology.map.move(redirect.slot, redirect.address)
            self.topology.schedule_refresh()
            if sent.route[0] != "slot":
                sent.ask = None
                sent.route = ("addr", redirect.address)
        self._send_to(sent)

    def _retry_later(self, sent: Sent, cause: str) -> None:
        now = time.monotonic()
        if not sent.first_failure:
            sent.first_failure = now
        if sent.queued or now - sent.first_failure > RETRY_WINDOW or sent.pending is None:
            if sent.pending is not None:
                self._deliver(
                    sent,
                    resp.error_reply(
                        f"ERR fieldcrypt: cluster node unreachable ({cause}) and no replica "
                        f"took over within {RETRY_WINDOW:.0f} s; check the cluster, then retry"
                        if not sent.queued
                        else f"ERR fieldcrypt: the transaction's node was lost ({cause})"
                    ),
                )
                self.flush()
            return
        delay = min(0.05 * 2**sent.attempts, 1.0)
        sent.attempts += 1
        self.topology.retries += 1

        async def later() -> None:
            await asyncio.sleep(delay)
            with contextlib.suppress(ClientError):
                await self.topology.refresh(force=True)
            if not self.closed:
                self._send_to(sent)
                self.flush()

        self._spawn(later())

    def link_lost(self, link: NodeLink, exc: BaseException | None) -> None:
        if self.links.get(link.address) is link:
            del self.links[link.address]
        if self.closed:
            return
        cause = describe_error(exc) if exc is not None else "closed by the node"
        self.state.stats.upstream_errors += 1
        log.warning("cluster node %s connection lost (%s)", link.label, cause)
        if link.subscribed or any(link.subscriptions.values()):
            self._fail(
                f"ERR fieldcrypt: the pub/sub connection to {link.label} was lost ({cause}); "
                "reconnect and subscribe again"
            )
            return
        if link.address in (self.multi_address, self.watch_address):
            self.in_multi = False
            self.held = []
            self.multi_address = self.multi_slot = self.watch_address = self.watch_slot = None
        self.topology.schedule_refresh()
        for sent in link.inflight:
            if sent.pending is None:
                continue
            if sent.replayable:
                self._retry_later(sent, cause)
            else:  # it may have run: sending it again could apply a write twice
                self._deliver(
                    sent,
                    resp.error_reply(
                        f"ERR fieldcrypt: the connection to {link.label} was lost ({cause}) "
                        "while this command was in flight; it may or may not have run"
                    ),
                )
        link.inflight.clear()
        self.flush()

    # --- output ------------------------------------------------------------------------------

    def flush(self) -> None:
        queue = self.queue
        out: list[bytes] = []
        while queue and queue[0].data is not None:
            out.append(cast(bytes, queue.popleft().data))
        if out:
            self._write(b"".join(out))
        if self.closing and not queue:
            self.close()

    def _write(self, data: bytes) -> None:
        write_to_client(self, data)

    def _fail(self, message: str) -> None:
        self.flush()
        self._write(resp.error_reply(message))
        self.close()

    @property
    def idle(self) -> bool:
        return not self.queue

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        if self.session is not None:
            self.state.stats.connections_open -= 1
        self.server.connections.discard(self)
        for link in list(self.links.values()):
            link.close()
        self.links.clear()
        for task in list(self.tasks):
            task.cancel()
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
        self.server.on_connection_closed()


def _merge_random(frames: list[bytes]) -> bytes:
    keys = [f for f in frames if f[0] not in resp.ERROR_TYPES and not f.startswith(b"$-1")]
    return keys[0] if keys else (_first_error(frames) or frames[0])


def _clusterdown(slot: int) -> bytes:
    return resp.error_reply(f"CLUSTERDOWN fieldcrypt: no master serves slot {slot} right now")


def _exec_transform(transforms: list[Transform | None], refused: bool) -> Transform:
    def transform(session: Session, frame: bytes) -> bytes:
        if refused:
            return b"-EXECABORT Transaction discarded because of previous errors.\r\n"
        if frame[0] != 42 or frame.startswith(b"*-1") or not any(transforms):
            return frame
        header_end, spans = resp.elements(frame, 0)
        if len(spans) != len(transforms):
            return frame
        parts = [frame[:header_end]]
        for item, (start, end) in zip(transforms, spans, strict=True):
            parts.append(_apply(item, session, frame[start:end]))
        return b"".join(parts)

    return transform


# --- The server ---------------------------------------------------------------------------------


class ClusterServer(ProxyServer):
    """ProxyServer, with a cluster behind it: its client connections route by slot."""

    def __init__(self, state: ProxyState, topology: Topology, announce_self: bool = False):
        super().__init__(state)
        self.topology = topology
        self.announce_self = announce_self
        self.announce: Address | None = None
        self._numbers = 0

    def new_connection(self) -> asyncio.Protocol:
        self._numbers += 1
        return ClusterClient(self, self._numbers)

    async def start(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> list[tuple[str, int]]:
        try:
            await self.topology.refresh()
        except ClientError as error:  # clients retry it when they connect
            log.warning("cluster not reachable yet: %s", error)
        bound = await super().start(host, port, ssl_context, reuse_port)
        if self.announce_self and self.announce is None:
            self.announce = (bound[0][0], bound[0][1])
        return bound


# --- Migration across masters ---------------------------------------------------------------


class ClusterJobs:
    """The admin MIGRATE for a cluster: the engine runs on each master in turn, under one
    lock held on the master that owns the lock key's slot."""

    def __init__(self, topology: Topology, get_crypt: Callable[[], Any]) -> None:
        self.topology = topology
        self.get_crypt = get_crypt
        self.migration: Migration | None = None
        self.report: Report | None = None
        self.task: asyncio.Task[Report] | None = None
        self.cancelled = False

    async def _client(self, address: Address) -> RedisClient:
        return await RedisClient.connect(self.topology.target(address))

    async def start(self, options: Options) -> Report:
        if self.task is not None and not self.task.done():
            assert self.report is not None
            raise AlreadyRunning(
                f"a migration is already running on this proxy (job {self.report.job_id})"
            )
        crypt = self.get_crypt()
        if crypt is None or crypt.rules.is_empty:
            raise ValueError("no rules are configured, so there is nothing to migrate")
        await self.topology.refresh(force=True)
        options.db = 0
        report = Report(job_id=os.urandom(6).hex(), dry_run=options.dry_run)
        lock_node = self.topology.map.node_of(cluster.key_slot(LOCK_KEY))
        if lock_node is None:
            raise ClientError("no master serves the migration lock's slot")
        lock_client = await self._client(lock_node)
        lock = Migration(lock_client, crypt.rules, crypt.keyring, options, report)
        if not options.dry_run:
            try:
                await lock.acquire_lock()
            except Exception:
                await lock_client.close()
                raise
        self.report = report
        self.cancelled = False
        self.task = asyncio.get_running_loop().create_task(self._work(lock, crypt, options))
        return report

    async def _work(self, lock: Migration, crypt: Any, options: Options) -> Report:
        report = lock.report
        renewer: asyncio.Task[None] | None = None
        if not options.dry_run:

            async def renew() -> None:
                while True:
                    await asyncio.sleep(10.0)
                    if not await lock.renew_lock():
                        log.warning("migration %s lost its lock; stopping", report.job_id)
                        self.cancel()
                        return

            renewer = asyncio.get_running_loop().create_task(renew())
        total = 0
        try:
            for address in list(self.topology.map.masters):
                if self.cancelled:
                    report.state = "cancelled"
                    break
                client = await self._client(address)
                try:
                    report.state, report.finished = "running", None
                    self.migration = Migration(client, crypt.rules, crypt.keyring, options, report)
                    await self.migration.run()
                    total += report.total_keys or 0
                finally:
                    await client.close()
                if report.state != "done":
                    break
            report.total_keys = total
        except ClientError as error:
            report.state, report.error = "failed", str(error)
        finally:
            if report.finished is None:
                report.finished = time.monotonic()
            if renewer is not None:
                renewer.cancel()
                with contextlib.suppress(Exception):
                    await lock.release_lock()
            await lock.client.close()
        log.info(
            "migration %s %s across %d masters: %d keys, %d rewritten, %d undecryptable",
            report.job_id,
            report.state,
            len(self.topology.map.masters),
            report.keys_scanned,
            report.rewritten,
            report.undecryptable,
        )
        return report

    def status(self) -> Report | None:
        return self.report

    async def wait(self, timeout: float | None) -> Report | None:
        if self.task is not None and not self.task.done():
            await asyncio.wait({self.task}, timeout=timeout)
        return self.status()

    def cancel(self) -> Report | None:
        self.cancelled = True
        if self.migration is not None:
            self.migration.cancelled = True
        return self.status()
