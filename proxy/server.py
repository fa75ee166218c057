"""The asyncio shell: sockets, backpressure, lifecycle. All protocol logic is in session.py.

Each client connection gets its own upstream connection, so every stateful
Redis feature keeps its exact semantics. It opens when the client connects, or,
when clients must AUTH to the proxy, when the session first sends upstream
(after the client's AUTH): a client that never authenticates costs Redis nothing.
Both directions use protocol callbacks, not a coroutine per message; when one
side's transport buffer fills, the other side stops being read.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from proxy import resp
from proxy.pooled import (
    INFLIGHT_LOW_WATER,
    HandshakeReplies,
    PooledLink,
    Pools,
    Step,
    Unreachable,
)
from proxy.session import Defer, Handler, Session
from proxy.sharing import Route

log = logging.getLogger("fieldcrypt")

# Pause reading the other side once this much is waiting to be written.
HIGH_WATER = 1024 * 1024
LOW_WATER = 256 * 1024


@dataclass
class Target:
    """Where and how to reach the upstream Redis."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None
    db: int = 0
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None
    connect_timeout: float = 5.0

    def tls_options(self) -> dict[str, Any]:
        """The TLS keywords for opening a connection to this target."""
        if self.ssl_context is None:
            return {}
        return {"ssl": self.ssl_context, "server_hostname": self.server_hostname or self.host}

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def handshake(self) -> list[tuple[str, list[bytes]]]:
        """What the proxy says first on each upstream connection, and again after RESET."""
        steps: list[tuple[str, list[bytes]]] = []
        if self.password is not None:
            auth = [b"AUTH"]
            if self.username:
                auth.append(self.username.encode())
            auth.append(self.password.encode())
            steps.append(("AUTH", auth))
        if self.db:
            steps.append(("SELECT", [b"SELECT", str(self.db).encode()]))
        return steps


@dataclass
class Stats:
    connections_open: int = 0
    connections_total: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_errors: int = 0
    connections_rejected: int = 0
    unauthenticated_commands: int = 0  # requests before AUTH, counted apart from names
    upstream_dedicated: int = 0  # upstream connections of one client's own, open now
    clients_pinned: int = 0  # pooled clients that took a connection of their own, in all

    def count_unauthenticated(self) -> None:
        self.unauthenticated_commands += 1


@dataclass
class ProxyState:
    """What every connection shares; replaced as a whole on reload."""

    target: Target
    dispatch: dict[bytes, Handler]
    max_request: int = resp.PROTO_MAX_BULK_LEN + 1024
    max_clients: int = 10000
    max_client_output: int = 1024 * 1024 * 1024
    idle_timeout: float = 0.0
    crypt: Any = None  # commands.FieldCrypt, when fields are protected
    jobs: Any = None  # admin.Jobs: the migration job
    scripts: Any = None  # scripts.ScriptBook: declared and undeclared scripts seen
    client_auth: bool = False  # clients must AUTH to the proxy
    tls: ssl.SSLContext | None = None  # for clients
    stats: Stats = field(default_factory=Stats)
    command_counts: dict[bytes, int] = field(default_factory=dict)  # names as sent
    observe_latency: Callable[[float], None] | None = None
    databases: int | None = None  # the upstream's `databases` setting, once read
    upstream_mode: str = "pooled"  # or "dedicated": one upstream connection per client
    pool_size: int = 4  # shared connections per route (db, protocol, user)
    pools: Pools | None = None  # pooled mode's shared connections (None: dedicated mode)

    def __post_init__(self) -> None:
        if self.upstream_mode == "pooled" and self.pools is None:
            self.pools = Pools(lambda: self.target, lambda: self.pool_size, self.stats)


def describe_error(error: BaseException) -> str:
    """A short cause for a connection error, without any payload."""
    if isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if isinstance(error, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    if isinstance(error, socket.gaierror):
        return f"name not resolved: {error.strerror}"
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed: {error.verify_message}"
    if isinstance(error, ssl.SSLError):
        return f"TLS error: {error.reason or error.__class__.__name__}"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    return error.__class__.__name__


def is_loopback(peer: object) -> bool:
    if not isinstance(peer, tuple):
        return isinstance(peer, str)  # a Unix socket: same machine
    try:
        return ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return False


def admit(connection: Any, base: asyncio.BaseTransport) -> asyncio.Transport | None:
    """Take in a new client connection, or refuse it past max_clients (then None).
    `connection` has .transport, .peer, .closed, .state and .server, as both the
    single-server and the cluster client connections do."""
    transport = cast(asyncio.Transport, base)  # uvloop's transports are no subclasses
    connection.transport = transport
    stats = connection.state.stats
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple):
        connection.peer = f"{peer[0]}:{peer[1]}"
    if stats.connections_open >= connection.state.max_clients:
        stats.connections_rejected += 1
        transport.write(b"-ERR max number of clients reached\r\n")
        transport.close()
        connection.closed = True
        return None
    stats.connections_open += 1
    stats.connections_total += 1
    connection.server.connections.add(connection)
    transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
    return transport


def write_to_client(connection: Any, data: bytes | bytearray) -> None:
    """Send to a client (see `admit` for what `connection` has); one that reads too
    slowly for what it is owed is disconnected at max_client_output_bytes."""
    transport = connection.transport
    if connection.closed or transport is None:
        return
    connection.state.stats.bytes_out += len(data)
    transport.write(data)
    if transport.get_write_buffer_size() > connection.state.max_client_output:
        log.warning(
            "client %s disconnected: it reads too slowly (output over max_client_output_bytes)",
            connection.peer,
        )
        connection.close(abort=True)


class UpstreamProtocol(asyncio.Protocol):
    def __init__(self, client: ClientConnection, handshake: HandshakeReplies | None = None) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.handshake = handshake  # replies to what the proxy said first, taken off
        if handshake is None or handshake.done:
            # Replies go straight to the client connection: one Python call per read.
            self.data_received = client.from_upstream  # type: ignore[method-assign]

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, base)  # uvloop's transports are no subclasses
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        self.client.state.stats.upstream_dedicated += 1

    def data_received(self, data: bytes) -> None:
        handshake = self.handshake
        if handshake is None:
            self.client.from_upstream(data)
            return
        rest, refusal = handshake.take(data)
        if refusal is not None:
            said = refusal[1:].split(resp.CRLF, 1)[0].decode(errors="replace")
            self.client.refuse(f"the upstream refused this client's own connection ({said})")
            return
        if handshake.done:
            self.handshake = None
            self.data_received = self.client.from_upstream  # type: ignore[method-assign]
            if rest:
                self.client.from_upstream(rest)

    def pause_writing(self) -> None:
        self.client.pause_client_reading("upstream")

    def resume_writing(self) -> None:
        self.client.resume_client_reading("upstream")

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.state.stats.upstream_dedicated -= 1
        self.client.upstream_lost(exc)


class ClientConnection(asyncio.Protocol):
    """One client, its upstream connection, and the session between them."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.state = server.state
        self.transport: asyncio.Transport | None = None
        self.upstream: UpstreamProtocol | None = None
        self.session: Session | None = None
        self.early: list[bytes | bytearray] = []  # bytes for upstream while it is still connecting
        self.paused_by: set[str] = set()
        self.upstream_paused = False
        self.closed = False
        self.connect_task: asyncio.Task[None] | None = None
        self.link: PooledLink | None = None  # pooled mode: the way to shared connections
        self.reaching = False  # the upstream connection has been asked for
        self.idle_handle: asyncio.TimerHandle | None = None
        self.last_active = 0.0
        self.timed = self.state.idle_timeout > 0  # idle connections are closed
        self.peer = "?"

    # --- client side ----------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport = admit(self, base)
        if transport is None:
            return
        peer = transport.get_extra_info("peername")
        target = self.state.target
        pools = self.state.pools
        if pools is not None:  # pooled: shared connections until the session pins
            self.link = PooledLink(self, pools, Route(target.db))
        self.session = Session(
            self.state.dispatch,
            self._to_upstream_early if self.link is None else self.link.send,
            functools.partial(write_to_client, self),
            db=target.db,
            handshake=target.handshake(),
            max_request=self.state.max_request,
            command_counts=self.state.command_counts,
            observe_latency=self.state.observe_latency,
            locked=self.state.client_auth,
            databases=self.state.databases,
            count_unauthenticated=self.state.stats.count_unauthenticated,
            route_to=None if self.link is None else self.link.route_to,
        )
        self.session.loopback = is_loopback(peer)
        if not self.session.offline and self.link is None:
            self._reach_upstream()
        self._touch()

    def adopt(self, spare: Any, handshake: list[Step]) -> None:
        """Make a ready upstream connection (a pooled.SharedConnection kept spare) this
        client's own, told `handshake` first."""
        transport = spare.transport
        protocol = UpstreamProtocol(self, HandshakeReplies([r for _, r in handshake]))
        if handshake:
            transport.write(b"".join(resp.encode_request(args) for args, _ in handshake))
        self.state.stats.clients_pinned += 1
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        self.upstream = protocol
        if self.upstream_paused:
            transport.pause_reading()

    async def connect_own(self, handshake: list[Step]) -> None:
        """A connection of this client's own, for a pooled session that pins, told
        `handshake` first; raises pooled.Unreachable."""
        target = self.state.target
        loop = asyncio.get_running_loop()
        replies = HandshakeReplies([required for _, required in handshake])
        try:
            async with asyncio.timeout(target.connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: UpstreamProtocol(self, replies),
                    target.host,
                    target.port,
                    **target.tls_options(),
                )
        except (OSError, TimeoutError, ssl.SSLError) as error:
            self.state.stats.upstream_errors += 1
            raise Unreachable(describe_error(error)) from None
        if self.closed:
            protocol.transport.close()  # type: ignore[union-attr]
            raise Unreachable("the client left")
        self.state.stats.clients_pinned += 1
        self.upstream = protocol
        if handshake:
            protocol.transport.write(  # type: ignore[union-attr]
                b"".join(resp.encode_request(args) for args, _ in handshake)
            )
        if self.upstream_paused:
            protocol.transport.pause_reading()  # type: ignore[union-attr]

    def refuse(self, why: str) -> None:
        """The upstream refused what this client's own connection was told first: the
        client can't go on (its transaction or subscription would run elsewhere)."""
        log.warning("client %s closed: %s", self.peer, why)
        if not self.closed and self.transport is not None:
            self.transport.write(resp.error_reply(f"ERR fieldcrypt: {why}"))
        self.close()

    def _reach_upstream(self) -> None:
        if not self.reaching:
            self.reaching = True
            self.connect_task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        target = self.state.target
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(
                    lambda: UpstreamProtocol(self),
                    target.host,
                    target.port,
                    **target.tls_options(),
                ),
                target.connect_timeout,
            )
        except (OSError, TimeoutError, ssl.SSLError) as error:
            cause = describe_error(error)
            self.state.stats.upstream_errors += 1
            log.warning("upstream %s unreachable (%s)", target.address, cause)
            if not self.closed and self.transport is not None:
                self.transport.write(
                    resp.error_reply(
                        f"ERR fieldcrypt: upstream {target.address} unreachable ({cause})"
                    )
                )
                self.close()
            return
        finally:
            self.connect_task = None
        if self.closed:
            protocol.transport.close()  # type: ignore[union-attr]
            return
        self.upstream = protocol
        assert protocol.transport is not None and self.session is not None
        self.session.databases = self.state.databases  # read since the session began, maybe
        if self.early:
            protocol.transport.writelines(self.early)
            self.early = []
        self.session.send_upstream = protocol.transport.write
        self.resume_client_reading("connecting")
        if self.upstream_paused:
            protocol.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is None:
            return
        self.state.stats.bytes_in += len(data)
        if self.timed:
            self._touch()
        try:
            session.client_data(data)
        except Exception:
            log.exception("internal error on a client connection; closing it")
            self.close()
            return
        while session.jobs:
            task = asyncio.get_running_loop().create_task(
                self._run_job(session, session.jobs.pop(0))
            )
            self.server.tasks.add(task)  # the loop only keeps weak references to tasks
            task.add_done_callback(self.server.tasks.discard)
        if session.closing is not None or self.server.draining:
            self._check_closing()

    async def _run_job(self, session: Session, deferred: Defer) -> None:
        """Produce a deferred reply (an admin command) and send it in its turn."""
        try:
            reply = await deferred.job()
        except Exception as error:
            log.exception("admin command failed")
            reply = resp.error_reply(f"ERR fieldcrypt: {error.__class__.__name__}")
        if self.session is session and not self.closed:
            session.resolve(deferred.entry, reply)
            self._check_closing()

    def pause_writing(self) -> None:
        """The client reads slower than Redis answers: stop reading Redis. Before AUTH
        every reply is the proxy's own, and a shared connection is never stopped for
        one client: then stop reading the client, so that what it is owed stays what
        it has in flight."""
        self.upstream_paused = True
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()
        if (self.session is not None and self.session.locked) or (
            self.link is not None and self.upstream is None
        ):
            self.pause_client_reading("unread replies")

    def resume_writing(self) -> None:
        self.upstream_paused = False
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()
        self.resume_client_reading("unread replies")
        if self.link is not None and self.link.inflight <= INFLIGHT_LOW_WATER:
            self.resume_client_reading("in flight")

    def resume_when_read(self, reason: str) -> None:
        """Read the client again, unless what it is owed already waits in this process
        (the kernel's buffer for it is full): then when it has read that."""
        if self.transport is None or not self.transport.get_write_buffer_size():
            self.resume_client_reading(reason)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    # --- upstream side --------------------------------------------------------

    def _to_upstream_early(self, data: bytes | bytearray) -> None:
        self._reach_upstream()
        self.early.append(data)
        if sum(map(len, self.early)) > HIGH_WATER:
            self.pause_client_reading("connecting")

    def from_upstream(self, data: bytes) -> None:
        session = self.session
        if session is None or self.closed:
            return
        if self.timed:
            self._touch()
        try:
            session.upstream_data(data)
        except resp.ProtocolError as error:
            log.warning("upstream %s sent bad RESP (%s); closing", self.state.target.address, error)
            self.close()
            return
        except Exception:
            log.exception("internal error on a client connection; closing it")
            self.close()
            return
        if session.failed is not None:
            log.warning("client %s closed: %s", self.peer, session.failed)
            self.close()
            return
        if session.closing is not None or self.server.draining:
            self._check_closing()

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        if exc is not None:
            self.state.stats.upstream_errors += 1
            log.warning(
                "upstream %s connection lost (%s)", self.state.target.address, describe_error(exc)
            )
        self.close()

    def pause_client_reading(self, reason: str) -> None:
        if not self.paused_by and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.paused_by.add(reason)

    def resume_client_reading(self, reason: str) -> None:
        if reason not in self.paused_by:
            return
        self.paused_by.discard(reason)
        if not self.paused_by and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # --- lifecycle -------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """No reply is owed to the client."""
        return self.session is None or self.session.idle

    def _check_closing(self) -> None:
        session = self.session
        if (session is not None and session.closing is not None and not session.pending) or (
            self.server.draining and session is not None and session.idle
        ):
            self.close()

    def _touch(self) -> None:
        """Note activity; one timer per connection checks it, instead of one per read."""
        timeout = self.state.idle_timeout
        if timeout <= 0 or self.closed:
            return
        loop = asyncio.get_running_loop()
        self.last_active = loop.time()
        if self.idle_handle is None:
            self.idle_handle = loop.call_later(timeout, self._idle_check)

    def _idle_check(self) -> None:
        self.idle_handle = None
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        timeout = self.state.idle_timeout
        session = self.session
        if session is not None and (session.pending or session.pubsub or session.monitoring):
            self.last_active = loop.time()  # waiting on Redis (blocking command, pub/sub)
        remaining = self.last_active + timeout - loop.time()
        if remaining > 0:
            self.idle_handle = loop.call_later(remaining, self._idle_check)
            return
        log.info("client %s closed after the idle timeout", self.peer)
        self.close()

    def close(self, abort: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        self.state.stats.connections_open -= 1
        self.server.connections.discard(self)
        if self.idle_handle is not None:
            self.idle_handle.cancel()
        if self.connect_task is not None:
            self.connect_task.cancel()
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.close()
        if self.link is not None:
            self.link.close()
        self.session = None
        self.early = []
        self.server.on_connection_closed()


class ProxyServer:
    """Listens, accepts client connections, and drains them on stop. The cluster
    server is this with another kind of client connection."""

    def __init__(self, state: ProxyState) -> None:
        self.state = state
        self.connections: set[Any] = set()  # ClientConnection, or the cluster's ClusterClient
        self.servers: list[asyncio.AbstractServer] = []
        self.draining = False
        self._drained: asyncio.Event | None = None
        self.tasks: set[asyncio.Task[None]] = set()  # deferred replies being produced

    def new_connection(self) -> asyncio.Protocol:
        return ClientConnection(self)

    async def start(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            self.new_connection,
            host,
            port,
            ssl=ssl_context or self.state.tls,
            reuse_port=reuse_port or None,
            backlog=4096,
        )
        self.servers.append(server)
        return [sock.getsockname()[:2] for sock in server.sockets]

    def on_connection_closed(self) -> None:
        if self._drained is not None and not self.connections:
            self._drained.set()

    async def drain(self, timeout: float) -> None:
        """Stop accepting, let in-flight replies finish (up to `timeout`), then close all."""
        self.draining = True
        for server in self.servers:
            server.close()
        self._drained = asyncio.Event()
        for connection in list(self.connections):
            if connection.idle:
                connection.close()
        if self.connections:
            try:
                await asyncio.wait_for(self._drained.wait(), timeout)
            except TimeoutError:
                log.warning("drain timeout: closing %d connections", len(self.connections))
        for connection in list(self.connections):
            connection.close()
        if self.state.pools is not None:
            self.state.pools.close()
        for server in self.servers:
            await server.wait_closed()


def install_uvloop() -> str:
    """Use uvloop where it loads; asyncio's own loop otherwise."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def add_signal_handlers(stop: Callable[[], Any], reload: Callable[[], Any] | None = None) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    if reload is not None and hasattr(signal, "SIGHUP"):
        loop.add_signal_handler(signal.SIGHUP, reload)


def pid() -> int:
    return os.getpid()
