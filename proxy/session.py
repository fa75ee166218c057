"""One client's conversation with Redis, as a state machine with no I/O.

The shell (server.py) feeds bytes in with `client_data` and `upstream_data`;
the session writes bytes out through the two callables it was given. In
between it frames every request and every reply, keeps a queue of what each
pending reply must go through, and tracks the connection state that changes
how replies line up with requests: RESP2/RESP3, pub/sub, MULTI, MONITOR,
CLIENT REPLY and RESET.

Commands that need neither state tracking nor a rewrite take the fast path:
their bytes go upstream untouched and their replies come back untouched, with
a counter as their only trace. Everything else is a handler in `dispatch`,
looked up by command name; adding a behaviour is adding a handler, never an
edit here.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Final

from proxy import resp, sharing
from proxy.sharing import Route

Send = Callable[[bytes | bytearray], None]
"""Writes bytes out. A bytearray passed in is a fresh copy, never changed afterwards."""


class ReplyError(Exception):
    """Raised by a transform: the client gets this error (its str) instead of the reply."""


Transform = Callable[["Session", bytes], bytes]
"""Rewrites one complete reply (never an error reply) for the client."""


class Forward:
    """A handler's answer: send the request (rewritten if `request` is given)
    and pass its reply through `transform`."""

    __slots__ = ("entry", "only_with", "request", "transform")

    def __init__(
        self,
        request: bytes | None = None,
        transform: Transform | None = None,
        only_with: bytes | None = None,
    ) -> None:
        self.request = request
        self.transform = transform
        self.only_with = only_with  # the transform is needed only if the reply holds these bytes
        # What the reply goes through outside MULTI (None: nothing), made here, so a Forward
        # handed out again (a remembered decision) costs no new object.
        self.entry = None if transform is None else TransformEntry(transform, only_with)


class Answer:
    """A handler's answer: reply to the client locally; Redis never sees it."""

    __slots__ = ("refusal", "reply")

    def __init__(self, reply: bytes, refusal: bool = False) -> None:
        self.reply = reply
        self.refusal = refusal  # an error that Redis would have given at queue time


class Defer:
    """A handler's answer: the shell runs `job` and gives its result back
    through `Session.resolve`; the reply goes out in its turn."""

    __slots__ = ("entry", "job")

    def __init__(self, job: Callable[[], Awaitable[bytes]]) -> None:
        self.entry = LocalEntry(None)
        self.job = job


Outcome = Forward | Answer | Defer | None


class _Undecided:
    """No handler has been asked yet (None is an answer: forward as is)."""


UNDECIDED: Final = _Undecided()
Handler = Callable[["Session", list[bytes]], Outcome]
"""Called with the request's arguments (name first), which it must leave as they are
(the reader may check the request against them afterwards); None means forward as is."""


# --- What a pending reply goes through ---------------------------------------
# The pending queue holds ints (that many untouched replies) and entries.


class Entry:
    """A request whose reply needs more than forwarding."""

    __slots__ = ()

    def on_reply(self, session: Session, frame: bytes) -> bytes | None:
        """The bytes to send the client for this reply (None: send nothing)."""
        return frame


class TransformEntry(Entry):
    __slots__ = ("only_with", "transform")

    def __init__(self, transform: Transform, only_with: bytes | None = None) -> None:
        self.transform = transform
        self.only_with = only_with  # a reply without these bytes passes as it is

    def on_reply(self, session: Session, frame: bytes) -> bytes | None:
        return _apply(self.transform, session, frame)


def _apply(transform: Transform, session: Session, frame: bytes) -> bytes:
    """A reply through its transform; error replies pass untouched."""
    if frame[0] in resp.ERROR_TYPES:
        return frame
    try:
        return transform(session, frame)
    except ReplyError as error:
        return resp.error_reply(str(error))


class LocalEntry(Entry):
    """A reply the proxy makes itself; consumes nothing from upstream."""

    __slots__ = ("reply",)

    def __init__(self, reply: bytes | None) -> None:
        self.reply = reply  # None until a deferred reply is resolved


class InternalEntry(Entry):
    """A request the proxy sent on its own (AUTH, SELECT); its reply is swallowed."""

    __slots__ = ("what",)

    def __init__(self, what: str) -> None:
        self.what = what

    def on_reply(self, session: Session, frame: bytes) -> bytes | None:
        if frame[0] in resp.ERROR_TYPES:
            message = frame[1:].split(b"\r\n", 1)[0].decode(errors="replace")
            session.failed = f"ERR fieldcrypt: upstream refused the proxy's {self.what}: {message}"
            return resp.error_reply(session.failed)
        return None


class TimedRun(Entry):
    """Requests sent together whose replies pass untouched, sampled: the time until
    the last reply goes to the latency histogram. Like an int in the queue, its
    replies stay in the forwarded run."""

    __slots__ = ("remaining", "started")

    def __init__(self, remaining: int) -> None:
        self.remaining = remaining
        self.started = time.perf_counter()

    def passed(self, session: Session, done: int) -> bool:
        """`done` of its replies went by; True when they all have."""
        self.remaining -= done
        if self.remaining:
            return False
        session.observe_latency(time.perf_counter() - self.started)
        return True


class HelloEntry(Entry):
    __slots__ = ()

    def on_reply(self, session: Session, frame: bytes) -> bytes | None:
        if frame[0] == 37:  # '%': a map, so RESP3
            session.resp3 = True
        elif frame[0] == 42:  # '*': an array, so RESP2
            session.resp3 = False
        return frame


class SelectEntry(Entry):
    __slots__ = ("db_version", "previous")

    def __init__(self, previous: int, db_version: int) -> None:
        self.previous = previous
        self.db_version = db_version

    def on_reply(self, session: Session, frame: bytes) -> bytes | None:
        if frame[0] in resp.ERROR_TYPES:
            session.correct_db(self.previous, self.db_version)
        return frame


class RouteEntry(Entry):
    """AUTH or HELLO of a shared session: where it failed, the session stays where it
    was (the shell answered it from the route it could not take)."""

    __slots__ = ("inner", "previous")

    def __init__(self, previous: Route, inner: int | Entry) -> None:
        self.previous = previous
        self.inner = inner

    def on_reply(self, session: Session, frame: bytes) -> bytes | None:
        if frame[0] in resp.ERROR_TYPES and not session.route.dedicated:
            # Refused, or lost on the way (it may have run there): both stand where
            # the session stood, and what follows goes there.
            session.route = self.previous
            if session.route_to is not None:
                session.route_to(self.previous, False)
        inner = self.inner
        return frame if type(inner) is int else inner.on_reply(session, frame)  # type: ignore[union-attr]


class ResetEntry(Entry):
    __slots__ = ()

    def on_reply(self, session: Session, frame: bytes) -> bytes | None:
        if frame == b"+RESET\r\n":
            session.reset_state()
        return frame


class MonitorEntry(Entry):
    __slots__ = ()

    def on_reply(self, session: Session, frame: bytes) -> bytes | None:
        if frame[0] not in resp.ERROR_TYPES:
            session.monitoring = True
        return frame


Effect = tuple[bytes, int]
"""What a queued command does to the connection when EXEC runs it: (b"SELECT", db) or
(b"HELLO", 0)."""


class QueuedEntry(Entry):
    """A command sent inside MULTI: its real reply comes in EXEC's array."""

    __slots__ = ("effect", "transform")

    def __init__(self, transform: Transform | None, effect: Effect | None = None) -> None:
        self.transform = transform
        self.effect = effect

    def on_reply(self, session: Session, frame: bytes) -> bytes | None:
        if frame == b"+QUEUED\r\n":
            session.queued.append((self.transform, self.effect))
        return frame


class ExecEntry(Entry):
    __slots__ = ("abort", "db_before", "db_version")

    def __init__(self, db_before: int, db_version: int, abort: bool = False) -> None:
        self.db_before = db_before  # the db when MULTI was sent
        self.db_version = db_version  # SELECTs the session had followed when EXEC was sent
        self.abort = abort  # the proxy refused a queued command: EXEC was sent as DISCARD

    def on_reply(self, session: Session, frame: bytes) -> bytes | None:
        queued, session.queued = session.queued, []
        if self.abort:
            return b"-EXECABORT Transaction discarded because of previous errors.\r\n"
        if frame[0] != 42 or frame.startswith(b"*-1"):  # aborted: nothing ran
            session.correct_db(self.db_before, self.db_version)
            return frame
        if not any(transform or effect for transform, effect in queued):
            return frame
        header_end, spans = resp.elements(frame, 0)
        if len(spans) != len(queued):
            return frame
        parts = [frame[:header_end]]
        db = self.db_before
        for (transform, effect), (start, end) in zip(queued, spans, strict=True):
            element = frame[start:end]
            if effect is not None and element[0] not in resp.ERROR_TYPES:
                if effect[0] == b"SELECT":
                    db = effect[1]
                else:  # HELLO: the reply's type tells the protocol
                    session.resp3 = element[0] == 37
            parts.append(element if transform is None else _apply(transform, session, element))
        session.correct_db(db, self.db_version)
        return b"".join(parts)


class DiscardEntry(Entry):
    __slots__ = ()

    def on_reply(self, session: Session, frame: bytes) -> bytes | None:
        session.queued = []
        return frame


SUBSCRIBE_KINDS: Final = {
    b"SUBSCRIBE": b"subscribe",
    b"PSUBSCRIBE": b"psubscribe",
    b"SSUBSCRIBE": b"ssubscribe",
    b"UNSUBSCRIBE": b"unsubscribe",
    b"PUNSUBSCRIBE": b"punsubscribe",
    b"SUNSUBSCRIBE": b"sunsubscribe",
}
_CHANNEL_SET: Final = {
    b"subscribe": "channels",
    b"unsubscribe": "channels",
    b"psubscribe": "patterns",
    b"punsubscribe": "patterns",
    b"ssubscribe": "shard_channels",
    b"sunsubscribe": "shard_channels",
}
MESSAGE_KINDS: Final = frozenset({b"message", b"pmessage", b"smessage"})


class SubscribeEntry(Entry):
    """(P|S)(UN)SUBSCRIBE: answered by one confirmation per channel, out of band.

    An error (arity, ACL) answers it as one ordinary reply instead.
    """

    __slots__ = ("kind", "remaining")

    def __init__(self, kind: bytes, remaining: int | None) -> None:
        self.kind = kind  # the confirmation's name, e.g. b"subscribe"
        self.remaining = remaining  # None: "all of them", counted when it's due


def _resp2_push(buf: bytes | bytearray, start: int) -> bool:
    """In RESP2 pub/sub, messages and confirmations are plain arrays."""
    return (
        buf.startswith(b"*3\r\n$7\r\nmessage\r\n", start)
        or buf.startswith(b"*4\r\n$8\r\npmessage\r\n", start)
        or buf.startswith(b"*3\r\n$8\r\nsmessage\r\n", start)
        or (
            buf.startswith(b"*3\r\n$", start) and buf.find(b"subscribe\r\n", start, start + 24) >= 0
        )
    )


# Goes upstream in the place of a request answered locally under CLIENT REPLY SKIP.
_SKIPPED: Final = b"*1\r\n$4\r\nPING\r\n"


def pubsub_confirmation(frame: bytes) -> tuple[bytes, bytes | None, int] | None:
    """(kind, channel, count) of a subscribe-family confirmation, else None."""
    if frame.find(b"subscribe\r\n", 0, 24) < 0:
        return None
    try:
        value, _ = resp.decode(frame)
    except (ValueError, IndexError):
        return None
    if not isinstance(value, resp.Aggregate) or len(value.items) != 3:
        return None
    kind, channel, count = value.items
    if not isinstance(kind, resp.Blob) or kind.data not in _CHANNEL_SET:
        return None
    channel_name = channel.data if isinstance(channel, resp.Blob) else None
    number = int(count.raw[1:-2]) if isinstance(count, resp.Simple) else 0
    return kind.data, channel_name, number


# --- The session ---------------------------------------------------------------


class Session:
    def __init__(
        self,
        dispatch: dict[bytes, Handler],
        send_upstream: Send,
        send_client: Send,
        *,
        db: int = 0,
        handshake: list[tuple[str, list[bytes]]] | None = None,
        max_request: int = resp.PROTO_MAX_BULK_LEN + 1024,
        command_counts: dict[bytes, int] | None = None,
        observe_latency: Callable[[float], None] | None = None,
        locked: bool = False,
        databases: int | None = None,
        count_unauthenticated: Callable[[], None] | None = None,
        route_to: Callable[[Route, bool], None] | None = None,
    ) -> None:
        self.dispatch = dispatch
        self.send_upstream = send_upstream
        # Pooled mode: requests go to a connection shared with other clients (see
        # sharing.py); `route_to` tells the shell where the requests after it go, and
        # whether the request that moved it goes first.
        self.route_to = route_to
        self.route = Route(db, dedicated=route_to is None)
        self.client_name: bytes | None = None  # CLIENT SETNAME, kept while shared
        self.client_info: dict[bytes, bytes] = {}  # CLIENT SETINFO, kept while shared
        self.forwarded = 0  # requests sent upstream, each bringing one reply while shared
        self._next_route: Route | None = None
        self.send_client = send_client
        self.requests = resp.RequestReader(max_request)
        self.replies = resp.ReplyReader()
        self.pending: deque[int | Entry] = deque()
        self.handshake = handshake or []  # what the proxy sends first, and after RESET
        self.initial_db = db
        self.databases = databases  # the upstream's `databases`, when known
        self.db = db
        self.resp3 = False
        self.monitoring = False
        self.in_multi = False
        self.multi_refused = False
        self.queued: list[tuple[Transform | None, Effect | None]] = []
        self.multi_db = db  # the db when MULTI was sent
        self.multi_modes: list[bytes] = []  # CLIENT REPLY modes queued in MULTI
        self.db_version = 0  # bumped by each SELECT followed on the request side
        self.reply_mode = b"ON"  # CLIENT REPLY: ON, OFF or SKIP
        self.channels: set[bytes | None] = set()
        self.patterns: set[bytes | None] = set()
        self.shard_channels: set[bytes | None] = set()
        self.pubsub = False  # subscribed: in RESP2, arrays may be messages
        self.closing: str | None = None  # why the session ends once its replies are out
        self.failed: str | None = None  # an error that ends the session now
        self.commands = 0
        self.command_counts = command_counts if command_counts is not None else {}
        self.observe_latency = observe_latency or (lambda seconds: None)
        self._sample = SAMPLE_EVERY  # time one request in SAMPLE_EVERY
        # Before the client's AUTH nothing is counted by name (anyone can send names,
        # and counted names are capped), and nothing reaches upstream: the proxy's own
        # handshake waits for it, so a silent client costs Redis no connection.
        self.count_unauthenticated = count_unauthenticated or (lambda: None)
        self.requires_auth = locked
        self.locked = locked  # the client must AUTH to the proxy first
        self.offline = locked  # nothing has been sent upstream yet, not even the handshake
        self.jobs: list[Defer] = []  # deferred replies for the shell to produce
        self.admin = False  # authenticated as fieldcrypt's admin user
        self.loopback = False  # the client connects from this machine (set by the shell)
        self._slow = False  # every request goes through _dispatch, not just known names
        self._lock(locked)
        if not self.offline and self.route.dedicated:
            for what, args in self.handshake:
                self._send_internal(what, args)

    # --- client -> upstream -----------------------------------------------

    def client_data(self, data: bytes) -> None:
        if self.closing is not None:
            return  # after a protocol error or QUIT, Redis reads nothing more
        reader = self.requests
        reader.feed(data)
        dispatch = self.dispatch
        counts = self.command_counts
        run = reader.pos  # start of requests forwarded as they are
        decided: Outcome | _Undecided = UNDECIDED  # the handler's answer for the held request
        commands_before = self.commands
        if not self._slow and reader.buffer is data:  # nothing held over from the last read
            # Plain requests, and those whose handler lets them go as they came, stay in
            # one run: when they fill the read, it goes upstream as it came.
            untouched = 0  # replies due that pass untouched, not queued yet (one count
            # for a whole run, so that a sample never splits it)
            while True:
                untouched += reader.take_plain(dispatch, counts)
                held = reader.held
                if (
                    held is None
                    or held[2] in STATEFUL
                    or self._slow
                    or (held[2] in sharing.SPECIAL and not self.route.dedicated)
                ):
                    break
                decided = dispatch[held[2]](self, held[3])
                if decided is None:
                    entry = None
                elif type(decided) is Forward and decided.request is None:
                    entry = decided.entry
                else:
                    break  # answered here, or rewritten: the loop below places it
                decided = UNDECIDED
                reader.pass_held()
                resp.count_name(counts, held[3][0])  # as sent, like take_plain
                if entry is None:
                    untouched += 1
                else:
                    if untouched:
                        self.commands += untouched
                        self._expect_plain(untouched)
                        untouched = 0
                    self.commands += 1
                    self.pending.append(entry)
                if reader.pos == len(data):
                    break
            if untouched:
                self.commands += untouched
                self._expect_plain(untouched)
            if reader.pos == len(data):  # all of it: forward the read as it came
                self.forwarded += self.commands - commands_before
                self.send_upstream(data)
                reader.compact()
                return
        buf = reader.buffer
        count = 0
        sent = self.commands - commands_before  # requests in `out`: the fast path's so far
        out: list[bytes | bytearray] = []  # what goes upstream, in order
        try:
            while reader.pos < len(buf):  # (a held request starts at pos)
                if not self._slow:
                    plain = reader.take_plain(dispatch, counts)
                    if plain:
                        count += plain
                        sent += plain
                        self._expect_plain(plain)
                request = reader.next()
                if request is None:
                    break
                start, end, name, args = request
                count += 1
                if self.locked:
                    self.count_unauthenticated()
                else:
                    resp.count_name(counts, name)
                if not self._slow and name not in dispatch and not reader.inline:
                    sent += 1
                    self._expect_plain(1)
                    continue
                replacement = self._dispatch(name, args, reader.inline, decided)
                decided = UNDECIDED
                route = self._next_route
                if route is not None:
                    # What came before goes where the session was; this request, alone,
                    # goes first where it is going (the shell may answer it from there).
                    self._next_route = None
                    if run < start:
                        out.append(buf[run:start])
                    self._flush(out, sent)
                    out, sent, run = [], 0, start
                    assert self.route_to is not None
                    alone = buf[start:end] if replacement is None else replacement
                    self.route_to(route, bool(alone))  # (RESET moves without a request)
                    if alone:
                        self._flush([alone], 1)
                    run = end
                    continue
                if replacement is not None:  # the request's own bytes don't go upstream
                    if run < start:
                        out.append(buf[run:start])
                    if replacement:
                        out.append(replacement)
                        sent += 1
                    run = end
                else:
                    sent += 1
                if self.quitting:  # QUIT answered here: nothing after it runs
                    reader.pos = run = len(buf)
                    break
        except resp.ProtocolError as error:
            if self.closing is None:  # (not behind a QUIT)
                self._answer(Answer(resp.error_reply(f"ERR {error}")))  # none under REPLY OFF
                self.closing = "protocol error"
        finally:
            self.commands += count
        if run < reader.pos:
            out.append(buf[run : reader.pos])
        self._flush(out, sent)  # one write per read, however many requests it held
        reader.compact()
        self._emit_ready()

    @property
    def quitting(self) -> bool:
        return self.closing is not None

    def _flush(self, out: list[bytes | bytearray], sent: int) -> None:
        if out:
            self.forwarded += sent
            self.send_upstream(out[0] if len(out) == 1 else b"".join(out))

    def _dispatch(
        self,
        name: bytes,
        args: list[bytes],
        inline: bool,
        outcome: Outcome | _Undecided = UNDECIDED,
    ) -> bytes | None:
        """Queue what the reply of a request off the fast path goes through. Returns
        what goes upstream instead of the request's bytes (b"": nothing), or None
        when its bytes go as they are. `outcome` is the handler's answer when it has
        been asked already."""
        if self.locked:
            if self.closing is not None:
                return b""  # behind a QUIT answered here: Redis reads no further
            if name not in OPEN_COMMANDS:
                return self._answer(Answer(b"-NOAUTH Authentication required.\r\n"))
            if self.offline:
                if name in (b"QUIT", b"RESET"):
                    return self._answer(Answer(self._before_upstream(name)))
                if outcome is UNDECIDED:
                    handler = self.dispatch.get(name)
                    outcome = handler(self, args) if handler is not None else None
                if not isinstance(outcome, Answer | Defer):  # it goes upstream: handshake first
                    self._go_upstream()
        if outcome is UNDECIDED:
            handler = self.dispatch.get(name)
            outcome = handler(self, args) if handler is not None else None
        assert not isinstance(outcome, _Undecided)
        if isinstance(outcome, Answer):
            return self._answer(outcome)
        if isinstance(outcome, Defer):
            self.jobs.append(outcome)  # it runs, whether or not CLIENT REPLY lets its reply out
            return self._reply_here(outcome.entry)
        previous = self.route
        if not previous.dedicated:
            checked = outcome is not None and outcome.request is not None  # (admin's HELLO)
            decision = sharing.decide(self, name, args, checked)
            if type(decision) is bytes:
                return self._answer(Answer(decision))
            if type(decision) is Route:
                self._move(decision)
        request = resp.encode_request(args) if inline else None  # arrays go as they came
        transform = None
        if outcome is not None:
            transform = outcome.transform
            if outcome.request is not None:
                request = outcome.request
        entry: int | Entry | None = (
            self._state_entry(name, args, transform) if name in STATEFUL else None
        )
        if entry is None:
            if self.in_multi:
                entry = QueuedEntry(transform)
            else:
                entry = (outcome.entry if outcome is not None else None) or 1
        if type(entry) is ExecEntry and entry.abort:
            request = b"*1\r\n$7\r\nDISCARD\r\n"  # Redis never saw the refused command
        if self._next_route is not None and not self.route.dedicated:
            entry = RouteEntry(previous, entry)  # a move that fails is undone
        self._expect(entry)
        if type(entry) is ExecEntry and self.multi_modes:
            for mode in self.multi_modes:  # CLIENT REPLY ran inside the transaction
                self._client_reply(mode)
            self.multi_modes = []
        if name == b"RESET" and self.handshake:  # the proxy's AUTH/SELECT again, after it
            parts = [request or resp.encode_request(args)]
            for what, internal_args in self.handshake:
                parts.append(resp.encode_request(internal_args))
                self.pending.append(InternalEntry(what))
            return b"".join(parts)
        if self._next_route is not None and name == b"HELLO" and not self.route.dedicated:
            request = sharing.shared_hello(args)
        return request

    def _move(self, route: Route) -> None:
        """Move a shared session to `route` before its current request (client_data
        tells the shell, which tells a connection of the session's own where to stand
        before the request goes there)."""
        self._next_route = route
        self.route = route

    def _expect_plain(self, n: int) -> None:
        """`n` requests whose replies pass untouched; one in SAMPLE_EVERY is timed
        (with those sent along with it), unless many replies are still due: its time
        would be the queue's, and a client that never reads would grow the queue by
        an entry per sample instead of one count."""
        pending = self.pending
        self._sample -= n
        if self._sample <= 0 and len(pending) < SAMPLE_QUEUE_LIMIT:
            self._sample = SAMPLE_EVERY
            pending.append(TimedRun(n))
        elif pending and type(pending[-1]) is int:
            pending[-1] += n
        else:
            pending.append(n)

    def _answer(self, answer: Answer) -> bytes:
        """A local reply; returns what goes upstream in the request's place."""
        if answer.refusal and self.in_multi:
            self.multi_refused = True
        return self._reply_here(LocalEntry(answer.reply))

    def _reply_here(self, entry: LocalEntry) -> bytes:
        """Queue a reply the proxy makes itself, subject to CLIENT REPLY like any reply.
        Returns what goes upstream in the request's place: nothing, except under SKIP,
        where Redis skips the reply to the next command it sees, so one it skips goes."""
        if self.reply_mode == b"ON":
            self.pending.append(entry)
        elif self.reply_mode == b"SKIP":
            self.reply_mode = b"ON"
            self._update_slow()
            return _SKIPPED  # never in MULTI: there CLIENT REPLY is queued, not applied
        return b""

    def _state_entry(
        self, name: bytes, args: list[bytes], transform: Transform | None
    ) -> int | Entry | None:
        """Track a command that changes how replies line up with requests."""
        if self.in_multi and name not in MULTI_CONTROL:
            return self._queued_state(name, args, transform)
        if name == b"MULTI":
            if self.in_multi:
                return 1  # "MULTI calls can not be nested": the transaction goes on
            self.in_multi = True
            self.multi_refused = False
            self.multi_db = self.db
            self.multi_modes = []
            self._update_slow()
            return 1
        if name in (b"EXEC", b"DISCARD"):
            multi, refused = self.in_multi, self.multi_refused
            self.in_multi = self.multi_refused = False
            self._update_slow()
            if not multi:
                return 1
            if name == b"DISCARD" or refused:
                self._follow_db(self.multi_db)  # nothing in the transaction runs
                self.multi_modes = []
            if name == b"DISCARD":
                return DiscardEntry()
            return ExecEntry(self.multi_db, self.db_version, abort=refused)
        if name == b"RESET":
            if self.reply_mode == b"SKIP":  # Redis skips +RESET (under OFF it sends it)
                self.reset_state()
                return 0
            self.in_multi = False
            self.reply_mode = b"ON"
            self._follow_db(self.initial_db)  # for the requests behind it (RESET can't fail)
            self._update_slow()
            return ResetEntry()
        if name == b"SELECT":
            # Followed at once, so that the commands behind it see the right db; one
            # Redis will refuse is not followed (rules are matched per db).
            previous = self.db
            db = self.selectable(args)
            if db is None:
                return None
            self._follow_db(db)
            return SelectEntry(previous, self.db_version)
        if name == b"HELLO":
            return HelloEntry()
        if name == b"MONITOR":
            return MonitorEntry()
        if name in SUBSCRIBE_KINDS:
            channels = len(args) - 1
            subscribing = not name.endswith(b"UNSUBSCRIBE")
            if subscribing and channels == 0:
                return 1  # an arity error, one ordinary reply
            return SubscribeEntry(SUBSCRIBE_KINDS[name], channels or None)
        mode = _client_reply_mode(name, args)
        if mode is not None:
            self._client_reply(mode)
            return 1 if mode == b"ON" else 0
        return None

    def _queued_state(
        self, name: bytes, args: list[bytes], transform: Transform | None
    ) -> QueuedEntry:
        """A state-changing command inside MULTI: its effect comes when EXEC runs it."""
        effect: Effect | None = None
        if name == b"SELECT":
            db = self.selectable(args)
            if db is None:
                db = self.db  # Redis will refuse it when EXEC runs it
            self._follow_db(db)  # the queued commands behind it run in that db
            effect = (b"SELECT", db)
        elif name == b"HELLO":
            effect = (b"HELLO", 0)
        else:
            mode = _client_reply_mode(name, args)
            if mode is not None:
                self.multi_modes.append(mode)
        return QueuedEntry(transform, effect)

    def selectable(self, args: list[bytes]) -> int | None:
        """The db of a SELECT that Redis will accept: a number as Redis reads one, below
        the upstream's `databases` when known; None for one Redis refuses."""
        db = resp.redis_int(args[1]) if len(args) == 2 else None
        if db is None or db < 0:
            return None
        return db if self.databases is None or db < self.databases else None

    def _client_reply(self, mode: bytes) -> None:
        """CLIENT REPLY as Redis applies it: SKIP is ignored while replies are OFF."""
        if mode == b"SKIP" and self.reply_mode == b"OFF":
            return
        self.reply_mode = mode
        self._update_slow()

    def _follow_db(self, db: int) -> None:
        if db != self.db:
            self.db = db
            self.db_version += 1

    def correct_db(self, db: int, version: int) -> None:
        """A reply showed the db is `db`, unless a later SELECT was sent meanwhile."""
        if self.db_version == version:
            self.db = db

    def _expect(self, entry: int | Entry) -> None:
        """Queue what the next reply goes through, unless CLIENT REPLY hides it."""
        mode = self.reply_mode
        if mode != b"ON":
            if entry == 0:
                return  # CLIENT REPLY OFF/SKIP itself has no reply
            if mode == b"SKIP":
                self.reply_mode = b"ON"
                self._update_slow()
            return
        if entry == 0:
            return
        pending = self.pending
        if type(entry) is int:
            if pending and type(pending[-1]) is int:
                pending[-1] += 1
            else:
                pending.append(1)
        else:
            pending.append(entry)

    def _send_internal(self, what: str, args: list[bytes]) -> None:
        self.forwarded += 1
        self.send_upstream(resp.encode_request(args))
        self.pending.append(InternalEntry(what))

    def _update_slow(self) -> None:
        self._slow = self.in_multi or self.reply_mode != b"ON" or self.locked

    def unlock(self) -> None:
        """The client authenticated to the proxy: the handshake goes upstream, if it
        hasn't yet, ahead of the request that authenticated."""
        self._lock(False)
        self._go_upstream()

    def _go_upstream(self) -> None:
        if self.offline:
            self.offline = False
            if self.route.dedicated:  # a shared connection had its handshake already
                for what, args in self.handshake:
                    self._send_internal(what, args)

    def _lock(self, locked: bool) -> None:
        self.locked = locked
        self.requests.limit(unauthenticated=locked)
        self._update_slow()

    def _before_upstream(self, name: bytes) -> bytes:
        """QUIT or RESET from a client that never reached upstream, answered here as
        Redis would answer it."""
        if name == b"QUIT":
            self.closing = "quit"
            return b"+OK\r\n"
        self.reset_state()
        return b"+RESET\r\n"

    def resolve(self, entry: LocalEntry, reply: bytes) -> None:
        """Give a deferred request its reply; it goes out in its turn."""
        entry.reply = reply
        self._emit_ready()
        if self.replies.pos < len(self.replies.buffer):
            self.upstream_data(b"")

    # --- upstream -> client -----------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        reader = self.replies
        if data:
            reader.feed(data)
        buf = reader.buffer
        pending = self.pending
        run = reader.pos  # start of replies forwarded as they are
        out: list[bytes | bytearray] = []  # what goes to the client, in order
        first = pending[0] if pending else None
        if buf is data and first is not None and not (self.resp3 or self.pubsub or self.monitoring):
            # The common cases: a read that starts with replies passing untouched, or with
            # the reply to rewrite (at pipeline 1, the whole read).
            marker = first.only_with if type(first) is TransformEntry else None
            if type(first) is int or (
                # a transform with nothing to do in this read passes like a plain reply
                marker is not None and len(data) <= MARKER_SCAN and data.find(marker) < 0
            ):
                n = first if type(first) is int else 1
                done = reader.count(n)
                if done == n:
                    pending.popleft()
                elif done:
                    pending[0] = n - done
                if reader.pos == len(data) and not (pending and type(pending[0]) is LocalEntry):
                    self.send_client(data)
                    reader.compact()
                    return
            elif type(first) is TransformEntry:
                end = reader.next_resp2()
                if end > 0:
                    pending.popleft()
                    reader.pos = run = end
                    frame = data if end == len(data) else data[:end]
                    if marker is None or frame.find(marker) >= 0:
                        frame = _apply(first.transform, self, frame)
                    if end == len(data) and not (pending and type(pending[0]) is LocalEntry):
                        self.send_client(frame)
                        reader.compact()
                        return
                    out.append(frame)
        while True:
            if pending and type(pending[0]) is LocalEntry:
                if run < reader.pos:
                    out.append(buf[run : reader.pos])
                    run = reader.pos
                self._emit_ready(out)
                if pending and type(pending[0]) is LocalEntry:
                    break  # a deferred reply holds the rest back, in order
            if pending and not self.monitoring:
                due = pending[0]
                if type(due) is int:
                    n = due
                elif type(due) is TimedRun:
                    n = due.remaining
                else:  # a transform with nothing to do in what is here passes like a plain reply
                    n = int(
                        type(due) is TransformEntry
                        and due.only_with is not None
                        and len(buf) - reader.pos <= MARKER_SCAN
                        and buf.find(due.only_with, reader.pos) < 0
                    )
                if n:  # replies that pass untouched
                    # In RESP2 outside pub/sub every value is a reply: hiredis counts them.
                    resp2 = not self.resp3 and not self.pubsub
                    done = reader.count(n) if resp2 else reader.skip(n)
                    if done:
                        if type(due) is TimedRun:
                            if due.passed(self, done):
                                pending.popleft()
                        elif done == n or type(due) is not int:
                            pending.popleft()
                        else:
                            pending[0] = n - done
                        continue
                    if reader.counting:
                        break  # hiredis holds part of the next reply
            if reader.pos >= len(buf):
                break  # all read
            end = reader.next() if self.resp3 else reader.next_resp2()
            if end < 0:
                break
            start = reader.pos
            reader.pos = end
            kind = buf[start]
            # Out-of-band messages answer no request; they go out as they are.
            if kind == resp.PUSH or (
                kind == 42
                and not self.resp3
                and (self.pubsub or (pending and type(pending[0]) is SubscribeEntry))
                and _resp2_push(buf, start)
            ):
                self._on_push(buf, start, end)
                continue
            if self.monitoring:
                if end - start == 8 and buf[start:end] == b"+RESET\r\n":
                    self._leave_monitor()
                continue
            if not pending:
                continue  # unsolicited: forward as it is
            head = pending[0]
            if type(head) is SubscribeEntry:
                # Its confirmations come out of band; an ordinary reply means it failed.
                pending.popleft()
                self._update_pubsub()
                if kind in resp.ERROR_TYPES or not pending:
                    continue
                head = pending[0]
            if type(head) is int:
                if head == 1:
                    pending.popleft()
                else:
                    pending[0] = head - 1
                continue
            if type(head) is TimedRun:
                if head.passed(self, 1):
                    pending.popleft()
                continue
            marker = head.only_with if type(head) is TransformEntry else None
            if marker is not None and buf.find(marker, start, end) < 0:
                pending.popleft()  # nothing for its transform to do: the reply goes as it is
                continue
            if run < start:
                out.append(buf[run:start])
            run = end
            pending.popleft()
            assert isinstance(head, Entry)
            reply = head.on_reply(self, bytes(buf[start:end]))
            if reply is not None:
                out.append(reply)
            if self.failed is not None:
                break
        if run < reader.pos and self.failed is None:
            out.append(buf[run : reader.pos])
        if out:  # one write per read, however many replies it held
            self.send_client(out[0] if len(out) == 1 else b"".join(out))
        reader.compact()

    def _on_push(self, buf: bytes | bytearray, start: int, end: int) -> None:
        """A subscribe-family confirmation settles its request and updates the subscriptions."""
        if buf.find(b"subscribe\r\n", start, min(end, start + 24)) < 0:
            return  # a message, not a confirmation: no need to copy it
        head = pubsub_confirmation(bytes(buf[start:end]))
        if head is None:
            return
        kind, channel, _count = head
        subscriptions: set[bytes | None] = getattr(self, _CHANNEL_SET[kind])
        pending = self.pending
        if pending and type(pending[0]) is SubscribeEntry:
            entry = pending[0]
            assert isinstance(entry, SubscribeEntry)
            if entry.kind == kind:
                if entry.remaining is None:
                    entry.remaining = max(len(subscriptions), 1)
                entry.remaining -= 1
                if entry.remaining <= 0:
                    pending.popleft()
        if kind.endswith(b"unsubscribe"):
            subscriptions.discard(channel)
        else:
            subscriptions.add(channel)
        self._update_pubsub()

    def _update_pubsub(self) -> None:
        self.pubsub = bool(self.channels or self.patterns or self.shard_channels)

    def _leave_monitor(self) -> None:
        """RESET ends MONITOR. Replies before it were mixed into the monitor stream."""
        pending = self.pending
        while pending:
            if type(pending.popleft()) is ResetEntry:
                break
        self.reset_state()

    def _emit_ready(self, out: list[bytes | bytearray] | None = None) -> None:
        """Send (or add to `out`) the local replies that have come to the front of the queue."""
        pending = self.pending
        while pending and type(pending[0]) is LocalEntry:
            entry = pending[0]
            assert isinstance(entry, LocalEntry)
            if entry.reply is None:
                return
            pending.popleft()
            if out is None:
                self.send_client(entry.reply)
            else:
                out.append(entry.reply)

    # --- state ---------------------------------------------------------------

    def reset_state(self) -> None:
        """What RESET does to a connection, as Redis documents it."""
        self.resp3 = False
        self.monitoring = False
        self.in_multi = False
        self.multi_refused = False
        self.queued = []
        self.reply_mode = b"ON"
        self.channels.clear()
        self.patterns.clear()
        self.shard_channels.clear()
        self._update_pubsub()
        self.db = self.initial_db
        if not self.route.dedicated:  # the shared connection it started on
            self.client_name = None  # (RESET clears the name, not the library info)
            self._move(Route(self.initial_db))
        self._lock(self.requires_auth)  # RESET signs the client out, as in Redis

    @property
    def idle(self) -> bool:
        """No reply is owed to the client."""
        return not self.pending and not self.requests.pending_bytes()


SAMPLE_EVERY: Final = 16  # one request in this many is timed for the latency histogram
MARKER_SCAN: Final = 64 * 1024  # most bytes searched at once for a transform's marker
SAMPLE_QUEUE_LIMIT: Final = 16  # none is timed while this many replies or runs are due
OPEN_COMMANDS: Final = frozenset({b"AUTH", b"HELLO", b"QUIT", b"RESET"})  # allowed before AUTH

MULTI_CONTROL: Final = frozenset({b"MULTI", b"EXEC", b"DISCARD", b"WATCH", b"RESET", b"QUIT"})


def _client_reply_mode(name: bytes, args: list[bytes]) -> bytes | None:
    if name == b"CLIENT" and len(args) == 3 and args[1].upper() == b"REPLY":
        mode = args[2].upper()
        if mode in (b"ON", b"OFF", b"SKIP"):
            return mode
    return None


STATEFUL: Final = frozenset(
    {b"MULTI", b"EXEC", b"DISCARD", b"RESET", b"HELLO", b"SELECT", b"MONITOR", b"CLIENT"}
    | set(SUBSCRIBE_KINDS)
)


def base_dispatch() -> dict[bytes, Handler]:
    """The commands every session must see, for their effect on the connection."""

    def passthrough(session: Session, args: list[bytes]) -> Outcome:
        return None

    return dict.fromkeys(STATEFUL | sharing.SPECIAL, passthrough)
