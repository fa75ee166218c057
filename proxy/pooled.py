"""The pooled upstream: many clients' requests on a few shared connections.

A client's session starts on a shared connection of the pool for its route (db,
protocol, credentials; see sharing.py). Requests of many clients are written to a
shared connection once per event-loop turn, and its replies are cut by owner
(multiplex.ReplyRouter) and handed to each client's session in order. When the session
moves (SELECT, HELLO, AUTH) or pins (MULTI, blocking, pub/sub...), what it sends after
the move waits until the replies in flight where it was have come back, so that replies
keep their order; then it goes to the new route's connection, or to a connection of the
client's own. A shared connection that drops answers every request in flight on it with
an error saying it may or may not have run; nothing is sent again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final, cast

from proxy import resp
from proxy.multiplex import ReplyRouter
from proxy.resp import CRLF
from proxy.sharing import Route

if TYPE_CHECKING:
    from proxy.server import ClientConnection, Target


def describe_error(error: BaseException) -> str:
    from proxy.server import describe_error as describe  # the shell's, one place

    return describe(error)


log = logging.getLogger("fieldcrypt")

MAX_POOLS: Final = 64  # routes with shared connections; a client past it gets its own
VERDICT_SECONDS: Final = 60.0  # a client's credentials are checked again after this
SPARES: Final = 2  # connections kept ready for clients that pin
SPARE_RETRY_SECONDS: Final = 1.0  # after a spare failed to open
# A client's replies in flight on a shared connection: past this it isn't read, so that
# one that never reads what it is owed can't make the proxy hold more than this many.
INFLIGHT_HIGH_WATER: Final = 1024
INFLIGHT_LOW_WATER: Final = 256
# A client's requests waiting for its route's connection: past this, it isn't read.
QUEUE_HIGH_WATER: Final = 1024 * 1024
QUEUE_LOW_WATER: Final = 256 * 1024


class Refused(Exception):
    """The upstream refused a route's handshake (AUTH, SELECT, HELLO): its reply."""

    def __init__(self, reply: bytes) -> None:
        super().__init__("refused")
        self.reply = reply


class Unreachable(Exception):
    """No connection to the upstream: the reason, without payload."""


class SharedConnection(asyncio.Protocol):
    """One upstream connection that the requests of many clients share."""

    def __init__(self, pool: Pool, handshake: list[Step], resp3: bool) -> None:
        self.pool = pool
        self.router: ReplyRouter[Any] = ReplyRouter(resp3)
        self.transport: asyncio.Transport | None = None
        self.links: set[PooledLink] = set()
        self.closed = False
        self._out: list[bytes | bytearray] = []
        self._flush_due = False
        self._handshake = HandshakeReplies([required for _, required in handshake])
        self._loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = self._loop.create_future()
        if handshake:
            self.send(self, b"".join(resp.encode_request(a) for a, _ in handshake), len(handshake))

    # --- writing: one write per loop turn, however many clients wrote --------------

    def send(self, owner: Any, data: bytes | bytearray, replies: int) -> None:
        self.router.expect(owner, replies)
        self._out.append(data)
        if not self._flush_due and self.transport is not None:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        out, self._out = self._out, []
        if self.transport is not None and out and not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    # --- the protocol ----------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, base)
        if self._handshake.done and not self.ready.done():
            self.ready.set_result(None)  # nothing to say first
        if self._out:
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def data_received(self, data: bytes) -> None:
        try:
            replies = self.router.feed(data)
        except resp.ProtocolError as error:
            log.warning("upstream %s sent bad RESP (%s); closing", self.pool.address, error)
            self.close()
            return
        for owner, chunk, count in replies:
            if owner is self:
                self._handshake_reply(chunk, count)
            else:
                owner.deliver(chunk, count)

    def _handshake_reply(self, chunk: bytes, count: int) -> None:
        _, refusal = self._handshake.take(chunk)
        if self.ready.done():
            return
        if refusal is not None:
            self.ready.set_exception(Refused(refusal))
            self.close()
        elif self._handshake.done:
            self.ready.set_result(None)

    async def ask(self, args: list[bytes]) -> bytes:
        """Send one request of the proxy's own on this connection; its reply."""
        question = _Question()
        self.send(question, resp.encode_request(args), 1)
        return await question.answer

    def pause_writing(self) -> None:  # Redis reads slower than the clients write
        for link in self.links:
            link.client.pause_client_reading("upstream")

    def resume_writing(self) -> None:
        for link in self.links:
            link.client.resume_client_reading("upstream")

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        if not self.ready.done():
            self.ready.set_exception(Unreachable("connection closed during the handshake"))
        cause = "connection lost" if exc is None else f"connection lost ({exc.__class__.__name__})"
        for owner, due in self.router.abandon():
            if owner is not self:
                owner.lost(self, due, cause)

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.transport.close()
        self.closed = True


class _Question:
    """The owner of a request the proxy asks on a shared connection."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def deliver(self, chunk: bytes, replies: int) -> None:
        if not self.answer.done():
            self.answer.set_result(chunk)

    def lost(self, connection: SharedConnection, replies: int, cause: str) -> None:
        if not self.answer.done():
            self.answer.set_exception(Unreachable(cause))


Step = tuple[list[bytes], bool]
"""A request the proxy says first on a new connection, and whether it must succeed (a
label such as a connection's name may be refused, by an ACL say, and it goes on)."""


class HandshakeReplies:
    """The replies to what the proxy said first on a connection, taken off the stream
    before anything else comes back on it."""

    def __init__(self, required: list[bool]) -> None:
        self._required = required
        self._reader = resp.ReplyReader()

    @property
    def done(self) -> bool:
        return not self._required

    def take(self, data: bytes) -> tuple[bytes, bytes | None]:
        """What of `data` comes after the handshake's replies, and the first refusal of
        a step that must succeed (None: none yet)."""
        reader = self._reader
        reader.feed(data)
        buf = reader.buffer
        refusal = None
        while self._required and (end := reader.next()) > 0:
            if buf[reader.pos] in resp.ERROR_TYPES and self._required[0] and refusal is None:
                refusal = bytes(buf[reader.pos : end])
            self._required.pop(0)
            reader.pos = end
        if self._required:
            reader.compact()
            return b"", refusal
        return bytes(buf[reader.pos :]), refusal


class Pool:
    """The shared connections of one route, opened as clients need them."""

    def __init__(self, pools: Pools, route: Route, named: bool = True) -> None:
        self.pools = pools
        self.route = route
        self.named = named  # CLIENT SETNAME fieldcrypt-pool (not on spares: a client's own)
        self.connections: list[SharedConnection] = []
        self.verified_until = 0.0
        self._next = 0

    @property
    def address(self) -> str:
        return self.pools.target().address

    async def acquire(self) -> SharedConnection:
        """A ready connection of this pool: a new one while there are fewer than the
        pool size. A client's own credentials are checked against Redis once in
        VERDICT_SECONDS (a new connection's handshake checks them; else an AUTH on a
        shared one, which leaves it as it was whatever the answer)."""
        live = [c for c in self.connections if not c.closed]
        if len(live) < self.pools.size():
            connection = await self._open()
            self.verified_until = time.monotonic() + VERDICT_SECONDS
            return connection
        self._next = (self._next + 1) % len(live)
        connection = live[self._next]
        await asyncio.shield(connection.ready)
        if self.route.auth is not None and time.monotonic() > self.verified_until:
            reply = await connection.ask([b"AUTH", *self.route.auth])
            if reply[:1] in (b"-", b"!"):
                raise Refused(reply)
            self.verified_until = time.monotonic() + VERDICT_SECONDS
        return connection

    async def _open(self) -> SharedConnection:
        target = self.pools.target()
        loop = asyncio.get_running_loop()
        # Said afresh each time: a reload may have changed the proxy's credentials.
        handshake = self.pools.handshake(self.route, self.named)
        connection = SharedConnection(self, handshake, self.route.resp3)
        self.connections.append(connection)
        try:
            async with asyncio.timeout(target.connect_timeout):
                await loop.create_connection(
                    lambda: connection, target.host, target.port, **target.tls_options()
                )
                await connection.ready
        except Refused:
            self.discard(connection)
            raise
        except (OSError, TimeoutError, Unreachable) as error:
            self.discard(connection)
            connection.close()
            cause = describe_error(error)
            self.pools.unreachable(cause)
            raise Unreachable(cause) from None
        self.pools.opened += 1
        return connection

    def discard(self, connection: SharedConnection) -> None:
        if connection in self.connections:
            self.connections.remove(connection)
        if not self.connections:
            self.pools.forget(self)  # a route no connection holds is not kept


class Pools:
    """Every route's pool, shared by all the clients of one worker, and a few spare
    connections, ready for a client that pins: taken at once, so that what it sends
    goes out in the order it came (a SUBSCRIBE before another client's PUBLISH)."""

    def __init__(
        self,
        target: Callable[[], Target],
        size: Callable[[], int],
        stats: Any = None,
    ) -> None:
        self.target = target
        self.size = size
        self.stats = stats  # server.Stats: upstream errors are counted there
        self.pools: dict[tuple[int, bool, bytes | None], Pool] = {}
        self.opened = 0  # connections opened in all
        self.spares: list[SharedConnection] = []
        self._refilling = False
        self._retry_at = 0.0
        self._spare_pool: Pool | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def unreachable(self, cause: str) -> None:
        if self.stats is not None:
            self.stats.upstream_errors += 1
        log.warning("upstream %s unreachable (%s)", self.target().address, cause)

    def take_spare(self) -> SharedConnection | None:
        """A connection ready to be a client's own (the proxy's user, its first db),
        or None; another is opened in its place."""
        spare = None
        while self.spares and spare is None:
            candidate = self.spares.pop()
            if not candidate.closed and candidate.ready.done() and not candidate.router.waiting:
                spare = candidate
        self.refill()
        return spare

    def refill(self) -> None:
        if self._refilling or len(self.spares) >= SPARES or time.monotonic() < self._retry_at:
            return
        self._refilling = True
        task = asyncio.get_running_loop().create_task(self._refill())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refill(self) -> None:
        try:
            while len(self.spares) < SPARES:
                if self._spare_pool is None:
                    base = Route(self.target().db)
                    self._spare_pool = Pool(self, base, named=False)
                try:
                    spare = await self._spare_pool._open()
                except (Refused, Unreachable):
                    # Pinning clients connect on their own until it answers again.
                    self._retry_at = time.monotonic() + SPARE_RETRY_SECONDS
                    return
                self._spare_pool.discard(spare)
                self.spares.append(spare)
        finally:
            self._refilling = False

    def pool(self, route: Route) -> Pool | None:
        """The pool for `route`. Past MAX_POOLS routes an idle pool (no client on it,
        nothing in flight) makes room; None when none is idle."""
        digest = hashlib.sha256(b"\0".join(route.auth)).digest() if route.auth is not None else None
        key = (route.db, route.resp3, digest)
        pool = self.pools.get(key)
        if pool is None:
            if len(self.pools) >= MAX_POOLS and not self._evict_idle():
                return None
            pool = self.pools[key] = Pool(self, route)
        return pool

    def _evict_idle(self) -> bool:
        for key, pool in self.pools.items():
            if all(not c.links and not c.router.waiting for c in pool.connections):
                for connection in list(pool.connections):
                    connection.close()
                del self.pools[key]
                return True
        return False

    def handshake(self, route: Route, named: bool = True) -> list[Step]:
        """What a shared connection of `route` is told first (a spare is told the same
        for the proxy's user and its first db, unnamed)."""
        steps: list[Step] = [(args, True) for args in self._auth(route)]
        if route.db:
            steps.append(([b"SELECT", b"%d" % route.db], True))
        if route.resp3:
            steps.append(([b"HELLO", b"3"], True))
        if named:
            steps.append(([b"CLIENT", b"SETNAME", b"fieldcrypt-pool"], False))
        return steps

    def own_handshake(self, route: Route, spare: bool) -> list[Step]:
        """What a connection of a client's own is told first, so that it stands where
        the client stood: from a spare (the proxy's user, the upstream's first db) or
        from a new connection (Redis's default user, db 0)."""
        steps: list[Step] = []
        if route.auth is not None or not spare:
            steps += [(args, True) for args in self._auth(route)]
        if route.db != (self.target().db if spare else 0):
            steps.append(([b"SELECT", b"%d" % route.db], True))
        if route.resp3:
            steps.append(([b"HELLO", b"3"], True))
        if route.name is not None:
            steps.append(([b"CLIENT", b"SETNAME", route.name], False))
        steps += [([b"CLIENT", b"SETINFO", a, v], False) for a, v in route.info]
        return steps

    def _auth(self, route: Route) -> list[list[bytes]]:
        if route.auth is not None:
            return [[b"AUTH", *route.auth]]
        return [args for what, args in self.target().handshake() if what == "AUTH"]

    def forget(self, pool: Pool) -> None:
        for key, known in list(self.pools.items()):
            if known is pool:
                del self.pools[key]

    def connections(self) -> int:
        """Shared connections open now (spares apart)."""
        return sum(len(p.connections) for p in self.pools.values())

    def close(self) -> None:
        for pool in self.pools.values():
            for connection in list(pool.connections):
                connection.close()
        for spare in self.spares:
            spare.close()
        self.spares = []
        for task in self._tasks:
            task.cancel()


class PooledLink:
    """One client's way to the upstream in pooled mode: the session's `send_upstream`
    and `route_to`."""

    def __init__(self, client: ClientConnection, pools: Pools, route: Route) -> None:
        self.client = client
        self.pools = pools
        self.route = route  # where the requests that aren't queued go
        self.shared: SharedConnection | None = None
        self.inflight = 0  # replies due on `shared`
        # What waits behind a move: (data, replies) and (Route, follows), in order.
        self.queue: deque[tuple[Any, Any]] = deque()
        self.moving = False
        self.forwarded = 0  # the session's count when it last sent
        self.queued = 0  # bytes waiting in `queue`
        self.queued_replies = 0  # and the replies they will bring
        self.closed = False

    # --- from the session ------------------------------------------------------------

    def send(self, data: bytes | bytearray) -> None:
        self.pools.refill()  # spares for the clients that will pin (none before one sends)
        session = self.client.session
        replies = session.forwarded - self.forwarded if session is not None else 0
        if session is not None:
            self.forwarded = session.forwarded
        if self.queue or self.moving or self._here() is None:
            self.queue.append((data, replies))
            self.queued += len(data)
            self.queued_replies += replies
            if self.queued > QUEUE_HIGH_WATER or self.queued_replies > INFLIGHT_HIGH_WATER:
                self.client.pause_client_reading("moving")  # nowhere to send it yet
            self._advance()
            return
        self._write(data, replies)

    def route_to(self, route: Route, follows: bool = True) -> None:
        """What the session sends next goes to `route`; `follows`: the request that
        moved it comes next (and is answered with the route's refusal, if any)."""
        self.queue.append((route, follows))
        self._advance()

    # --- moving ----------------------------------------------------------------------

    def _here(self) -> Any:
        if self.route.dedicated:
            upstream = self.client.upstream
            return upstream if upstream is not None and upstream.transport is not None else None
        shared = self.shared
        return shared if shared is not None and not shared.closed else None

    def _write(self, data: bytes | bytearray, replies: int) -> None:
        if self.route.dedicated:
            upstream = self.client.upstream
            assert upstream is not None and upstream.transport is not None
            upstream.transport.write(data)
            return
        assert self.shared is not None
        self.inflight += replies
        self.shared.send(self, data, replies)
        if self.inflight > INFLIGHT_HIGH_WATER:  # it isn't reading what it is owed
            self.client.pause_client_reading("in flight")

    def _advance(self) -> None:
        while self.queue and not self.moving and not self.closed:
            head = self.queue[0]
            if type(head[0]) is Route:
                if self.inflight:
                    return  # replies in flight where the session is come back first
                self.queue.popleft()
                route, follows = head
                if self.route.dedicated or (route == self.route and self._here() is not None):
                    continue  # where it is already (a connection of its own follows anyway)
                if not route.dedicated and not follows and route.auth in (None, self.route.auth):
                    # Nothing to send there yet (RESET, a move undone), no credentials
                    # to check: connect when something is sent.
                    self._leave_shared()
                    self.route = route
                    continue
                if route.dedicated:
                    spare = self.pools.take_spare()
                    if spare is not None:  # at once: nothing behind it can overtake it
                        self.client.adopt(spare, self.pools.own_handshake(route, spare=True))
                        self._leave_shared()
                        self.route = route
                        continue
                self._move(route, follows)
                return
            if self._here() is None:
                self._move(self.route, False)  # (again) where the session is
                return
            self.queue.popleft()
            data, replies = head
            self.queued -= len(data)
            self.queued_replies -= replies
            self._write(data, replies)
        if self.queued <= QUEUE_LOW_WATER and self.queued_replies <= INFLIGHT_LOW_WATER:
            self.client.resume_client_reading("moving")

    def _move(self, route: Route, follows: bool) -> None:
        self.moving = True
        task = asyncio.get_running_loop().create_task(self._moving(route, follows))
        self.client.server.tasks.add(task)
        task.add_done_callback(self.client.server.tasks.discard)

    async def _moving(self, route: Route, follows: bool) -> None:
        try:
            if route.dedicated:
                await self.client.connect_own(self.pools.own_handshake(route, spare=False))
                self._leave_shared()
            else:
                pool = self.pools.pool(route)
                if pool is None:
                    raise Refused(
                        b"-ERR fieldcrypt: too many distinct users, dbs and protocols in use "
                        b"through this proxy to share a connection; try again later\r\n"
                    )
                shared = await pool.acquire()
                self._leave_shared()
                self.shared = shared
                shared.links.add(self)
            self.route = route
        except Refused as refusal:
            self._refused(route, follows, refusal.reply)
        except Unreachable as error:
            self._fail(
                resp.error_reply(
                    f"ERR fieldcrypt: upstream {self.pools.target().address} unreachable ({error})"
                )
            )
        finally:
            self.moving = False
        self._advance()

    def _refused(self, route: Route, follows: bool, reply: bytes) -> None:
        """`route` can't be had: the request that moved the session there gets the
        refusal, and the session stays where it was."""
        if route.auth != self.route.auth:
            # Credentials the client just gave (AUTH, HELLO AUTH): the moves the session
            # made after it carry them too, and stand where the client still is.
            for i, item in enumerate(self.queue):
                if type(item[0]) is Route and item[0].auth == route.auth:
                    self.queue[i] = (replace(item[0], auth=self.route.auth), item[1])
        elif route.auth is not None:
            # Credentials it proved before no longer open a connection (its password
            # changed): it may go on where it is, but not move.
            said = reply[1:].split(CRLF, 1)[0].decode(errors="replace")
            reply = resp.error_reply(
                "ERR fieldcrypt: the upstream refused this client's credentials on a new "
                f"connection ({said}); AUTH again"
            )
        if route.dedicated or not follows or not self.queue or type(self.queue[0][0]) is Route:
            self._fail(reply)  # a pin, or nothing to answer with it: it can't go on
            return
        data, replies = self.queue.popleft()
        self.queued -= len(data)
        self.queued_replies -= replies
        self._answer(reply * max(replies, 1))

    def _leave_shared(self) -> None:
        if self.shared is not None:
            self.shared.links.discard(self)
            self.shared = None

    # --- from the shared connection --------------------------------------------------

    def deliver(self, chunk: bytes, replies: int) -> None:
        self.inflight -= replies
        if not self.closed:
            self.client.from_upstream(chunk)
            if self.inflight <= INFLIGHT_LOW_WATER:
                self.client.resume_when_read("in flight")
        if not self.inflight and self.queue and not self.moving:
            self._advance()

    def lost(self, connection: SharedConnection, replies: int, cause: str) -> None:
        """`connection` dropped with `replies` of this client's requests in flight."""
        self.inflight -= replies
        if connection is self.shared:
            self.shared = None
        self._answer(
            resp.error_reply(
                f"ERR fieldcrypt: the shared upstream connection was lost ({cause}); "
                "this request may or may not have run"
            )
            * replies
        )
        self._advance()

    def _answer(self, replies: bytes) -> None:
        if replies and not self.closed:
            self.client.from_upstream(replies)

    def _fail(self, reply: bytes) -> None:
        """No route for what is queued: each request gets `reply`, then the client goes."""
        replies = sum(item[1] for item in self.queue if type(item[0]) is not Route)
        self.queue.clear()
        self.queued = self.queued_replies = 0
        self._answer(reply * max(replies, 1))
        self.client.close()

    def close(self) -> None:
        self.closed = True
        self._leave_shared()
        self.queue.clear()
