"""What a client's requests may do on an upstream connection shared with other clients.

Pure: no I/O. A session in pooled mode starts on a shared connection (for its db, its
protocol and its credentials: a `Route`). A request either goes there as it is, is
answered by the proxy (the connection-scoped commands every client library sends at
connect: its name, its library, QUIT and RESET), moves the session to another shared
connection (SELECT, HELLO, AUTH), or needs state that a shared connection can't hold
for one client (MULTI, WATCH, blocking reads, pub/sub, MONITOR, CLIENT TRACKING, ...):
then the session moves to a connection of its own for the rest of its life.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final

from proxy import resp

if TYPE_CHECKING:
    from proxy.session import Session


@dataclass(frozen=True, slots=True)
class Route:
    """Where a session's requests go: a shared connection for (db, protocol,
    credentials), or (`dedicated`) one of its own. `auth` holds the client's own AUTH
    arguments ([username,] password); None is the proxy's upstream user."""

    db: int
    resp3: bool = False
    auth: tuple[bytes, ...] | None = None
    dedicated: bool = False
    # What a connection of its own is told besides: the client's name and library.
    name: bytes | None = None
    info: tuple[tuple[bytes, bytes], ...] = ()

    def __repr__(self) -> str:  # never the password
        user = (self.auth[0] if len(self.auth) == 2 else b"default") if self.auth else None
        return f"Route(db={self.db}, resp3={self.resp3}, user={user!r}, dedicated={self.dedicated})"


# Commands that need connection state no shared connection can keep for one client, or
# that bring other than exactly one reply: the session moves to a dedicated connection.
PIN: Final = frozenset(
    {
        b"MULTI",
        b"WATCH",
        b"BLPOP",
        b"BRPOP",
        b"BRPOPLPUSH",
        b"BLMOVE",
        b"BLMPOP",
        b"BZPOPMIN",
        b"BZPOPMAX",
        b"BZMPOP",
        b"WAIT",
        b"WAITAOF",
        b"SUBSCRIBE",
        b"PSUBSCRIBE",
        b"SSUBSCRIBE",
        b"UNSUBSCRIBE",
        b"PUNSUBSCRIBE",
        b"SUNSUBSCRIBE",
        b"MONITOR",
        b"SYNC",
        b"PSYNC",
        b"REPLCONF",
        b"READONLY",
        b"READWRITE",
        b"ASKING",
        b"DEBUG",  # DEBUG SLEEP would hold every client of the connection
    }
)
PIN_WHEN_BLOCKING: Final = frozenset({b"XREAD", b"XREADGROUP"})
# CLIENT subcommands the proxy answers for a shared session (the name, remembered for a
# later pin), those that are harmless there (SETINFO only labels the connection; its
# values are remembered too); every other CLIENT subcommand pins.
CLIENT_HERE: Final = frozenset({b"SETNAME", b"GETNAME"})
CLIENT_SHARED: Final = frozenset({b"HELP", b"SETINFO"})
# The names the session's fast path must stop at while it is shared.
SPECIAL: Final = PIN | PIN_WHEN_BLOCKING | {b"AUTH", b"QUIT", b"RESET", b"SELECT", b"HELLO"}

BAD_NAME: Final = b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"

Decision = bytes | Route | None
"""A reply the proxy gives, a route to move to before the request goes, or None: the
request goes on the current route."""


def decide(session: Session, name: bytes, args: list[bytes], checked: bool = False) -> Decision:
    """What a shared session does with a request that goes upstream. `checked`: the
    proxy itself judged its credentials (client_password): they are not Redis's."""
    if name in PIN or (name in PIN_WHEN_BLOCKING and _blocks(args)):
        return pin(session)
    if name == b"CLIENT":
        return _client(session, args)
    if name == b"SELECT":
        db = session.selectable(args)
        if db is None:
            # One Redis refuses goes where the session is, for Redis's error; one whose
            # fate can't be foreseen (the upstream's `databases` unknown) pins.
            return pin(session) if session.databases is None and _number(args) else None
        return replace(session.route, db=db)
    if name == b"HELLO":
        return _hello(session, args, checked)
    if name == b"AUTH":
        if len(args) not in (2, 3):
            return None  # Redis's arity error, from where the session is
        return replace(session.route, auth=tuple(args[1:]))
    if name == b"QUIT":
        session.closing = "quit"
        return b"+OK\r\n"
    if name == b"RESET":
        session.reset_state()
        return b"+RESET\r\n"
    return None


def pin(session: Session) -> Route:
    """The route to a connection of the session's own, standing where it stands."""
    return replace(
        session.route,
        dedicated=True,
        name=session.client_name,
        info=tuple(session.client_info.items()),
    )


def _blocks(args: list[bytes]) -> bool:
    return any(arg.upper() == b"BLOCK" for arg in args[1:-1])


def _number(args: list[bytes]) -> bool:
    return len(args) == 2 and resp.redis_int(args[1]) is not None


def _client(session: Session, args: list[bytes]) -> Decision:
    sub = args[1].upper() if len(args) > 1 else b""
    if sub == b"SETINFO" and len(args) == 4 and args[2].upper() in (b"LIB-NAME", b"LIB-VER"):
        if _printable(args[3]):  # what Redis accepts, for a connection of its own later
            session.client_info[args[2].upper()] = args[3]
        return None
    if sub == b"MAINT_NOTIFICATIONS":
        # Current client libraries ask at connect and go on when refused. Maintenance
        # pushes on a shared connection would reach the wrong clients: answer as a
        # server without them does.
        return b"-ERR unknown subcommand 'MAINT_NOTIFICATIONS'. Try CLIENT HELP.\r\n"
    if sub in CLIENT_SHARED or len(args) == 1:
        return None
    if sub not in CLIENT_HERE:
        return pin(session)
    if sub == b"GETNAME" and len(args) == 2:
        name = session.client_name
        return resp.bulk(name) if name is not None else (b"_\r\n" if session.resp3 else b"$-1\r\n")
    if sub == b"SETNAME" and len(args) == 3:
        if not _printable(args[2]):
            return BAD_NAME
        session.client_name = args[2] or None
        return b"+OK\r\n"
    return None  # Redis's arity error, from where the session is


def _printable(name: bytes) -> bool:
    """Redis's rule for client names and library info: no byte outside '!'..'~'."""
    return all(33 <= byte <= 126 for byte in name)


def shared_hello(args: list[bytes]) -> bytes:
    """HELLO as it goes to a shared connection: the protocol only. Its AUTH was checked
    by the move to the route, and its SETNAME is the client's, not the connection's."""
    return resp.encode_request(args[:2])


def _hello(session: Session, args: list[bytes], checked: bool) -> Decision:
    if len(args) == 1:
        return None  # the connection's info, no change
    version = resp.redis_int(args[1])
    if version not in (2, 3):
        return None  # Redis's NOPROTO, from where the session is
    route = replace(session.route, resp3=version == 3)
    rest = args[2:]
    i = 0
    while i < len(rest):
        option = rest[i].upper()
        if option == b"AUTH" and i + 2 < len(rest):
            if not checked:
                route = replace(route, auth=(rest[i + 1], rest[i + 2]))
            i += 3
        elif option == b"SETNAME" and i + 1 < len(rest):
            if not _printable(rest[i + 1]):
                return BAD_NAME  # and the connection stays as it was, as in Redis
            session.client_name = rest[i + 1] or None
            i += 2
        else:
            return None  # a syntax error Redis answers, from where the session is
    return route
