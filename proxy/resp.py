"""RESP framing and encoding, with no I/O.

Two incremental readers find message boundaries in a byte stream, so the proxy
can forward every message as its original bytes and rewrite only the ones it
must:

- `RequestReader` reads what clients send: arrays of bulk strings, or inline
  commands typed into nc/telnet. It accepts and rejects exactly what Redis's
  own query parser does, with Redis's error texts.
- `ReplyReader` reads what servers send: any RESP2 or RESP3 value, including
  attributes and pushes. It only finds where each value ends; hiredis hands back
  parsed values without their byte offsets, reads a set as a list and a verbatim
  string as a plain one, and drops attributes, so framing is ours.

`decode` and `encode` turn one framed value into a lossless tree and back,
for the few replies the proxy rewrites.
"""

from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass
from typing import Any, Final

import hiredis

PROTO_INLINE_MAX_SIZE: Final = 64 * 1024  # Redis's limit on an unterminated line
PROTO_MAX_BULK_LEN: Final = 512 * 1024 * 1024  # Redis's default proto-max-bulk-len
MULTIBULK_MAX: Final = 2**31 - 1  # Redis 7 accepts up to INT_MAX arguments

CRLF: Final = b"\r\n"


_HUGE_COUNT: Final = re.compile(rb"\*[0-9]{8}")  # 10 million elements or more
_TILDE, _PIPE, _STAR = b"~|*"  # as ints, for `in` (see RequestReader.feed)
MAX_COUNTED_NAMES: Final = 512  # distinct command names counted; more are not
# What Redis reads from a client that has not authenticated (since CVE-2021-32675): a
# larger request gets Redis's error and the connection closes, before it is buffered.
UNAUTHENTICATED_MAX_ARGS: Final = 10
UNAUTHENTICATED_MAX_BULK: Final = 16 * 1024

TOO_LARGE: Final = "Protocol error: request larger than fieldcrypt's max_request_bytes"


class ProtocolError(Exception):
    """A stream that Redis would reject; str() is the text after `-ERR `."""


# --- Requests -----------------------------------------------------------------


class RequestReader:
    """Splits a client's byte stream into requests.

    `next()` returns `(start, end, name, args)` for each complete request: its
    bytes are `buffer[start:end]`, `name` is the upper-cased command name and
    `args` the arguments (name first). `inline` tells whether the last request
    was an inline command (which must be re-sent as an array). It returns None
    when more bytes are needed. The caller calls `compact()` once it no longer
    needs the bytes before `pos`.

    Small, well-formed array requests, nearly all of them, are parsed by
    hiredis in C, and their boundaries follow from their arguments: hiredis
    accepts only canonical lengths, so each request's size is known exactly,
    and two byte checks catch any stream that is not plain bulk strings.
    Everything else (inline commands, large or malformed requests) goes
    through the strict parser below, which accepts and rejects exactly what
    Redis's query parser does, with Redis's error texts.
    """

    __slots__ = (
        "_argc",
        "_fast",
        "_flags",
        "_need",
        "_odd",
        "_reader",
        "_scan",
        "_special",
        "_tail",
        "buffer",
        "held",
        "inline",
        "max_request",
        "pos",
        "unauthenticated",
    )

    def __init__(self, max_request: int = PROTO_MAX_BULK_LEN + 1024) -> None:
        self.buffer: bytes | bytearray = b""
        self.pos = 0  # start of the next unread request
        self.max_request = max_request
        self.inline = False
        self._reader = hiredis.Reader()
        self._fast = True  # hiredis holds exactly the bytes from `pos` on
        # The request take_plain() stopped at, (start, end, name, args) from `pos`, which
        # next() returns next.
        self.held: tuple[int, int, bytes, list[bytes]] | None = None
        self._tail = b""  # the end of the last read, to find a count cut in two
        self._need = 0  # strict parser: don't rescan until the buffer holds this many bytes
        self._scan = -1  # strict parser: resume point inside a partly read array request
        self._argc = 0
        self._odd = False  # a request from `pos` on may start with `~` or `|`
        self._special: Container[bytes] | None = None  # what take_plain's flags are for
        self._flags: dict[bytes, bytes] = {}
        self.unauthenticated = False  # Redis's limits for such clients apply (see limit)

    def limit(self, unauthenticated: bool) -> None:
        """Read as Redis reads a client that has (not) authenticated. Unauthenticated,
        every request goes through the strict parser, which refuses an oversized head
        before buffering what follows it (hiredis would buffer the whole request)."""
        self.unauthenticated = unauthenticated
        if unauthenticated:
            self._fast = False  # the next request is read from `pos` by the strict parser
            self.held = None

    def feed(self, data: bytes) -> None:
        if self.pos >= len(self.buffer):  # nothing pending: read the new bytes in place
            self.buffer = data
            self.pos = self._need = 0
            self._scan = -1
            self._odd = False
            if not self._fast and not self.unauthenticated:  # drained: hiredis again
                self._reader = hiredis.Reader()
                self._fast = True
        else:
            if type(self.buffer) is not bytearray:
                self._rebase(bytearray(self.buffer[self.pos :]))
            self.buffer += data
        tail = self._tail
        # The bytes are looked for as ints first: `b"x" in data` costs CPython 3.11 a
        # TypeError raised and cleared before the search, a memchr for an int.
        if (_TILDE in data or _PIPE in data) and (
            data.find(b"\n~") >= 0
            or data.find(b"\n|") >= 0
            or (data[:1] in (b"~", b"|") and tail.endswith(b"\n"))
        ):
            self._odd = True  # a request may start `~` or `|`: see take_plain
        if self._fast:
            if _HUGE_COUNT.search(data) or (_STAR in tail and _HUGE_COUNT.search(tail + data[:12])):
                self._fast = False  # hiredis would reserve room for every element up front
            else:
                self._reader.feed(data)
        self._tail = data[-11:]

    def _resume_fast(self) -> None:
        """Back to hiredis for what follows a request the strict parser read, when that
        is an array request and little enough to hand over; otherwise the strict parser
        goes on until the buffer drains (a long run of inline commands, from
        `redis-cli --pipe` say, must not be copied once per command)."""
        self._need = 0
        self._scan = -1
        buf = self.buffer
        if (
            len(buf) - self.pos > PROTO_INLINE_MAX_SIZE
            or buf[self.pos : self.pos + 1] != b"*"
            or self.unauthenticated
        ):
            return
        rest = bytes(buf[self.pos :])
        if _HUGE_COUNT.search(rest):
            return  # stay with the strict parser
        self._reader = hiredis.Reader()
        if rest:
            self._reader.feed(rest)
        self._fast = True

    def _rebase(self, remaining: bytearray) -> None:
        """Make `remaining` (the bytes from `pos` on) the buffer."""
        shift = self.pos
        self.buffer = remaining
        self.pos = 0
        self._need -= shift
        if self._scan >= 0:
            self._scan -= shift

    def pending_bytes(self) -> int:
        return len(self.buffer) - self.pos

    def compact(self) -> None:
        if not self.pos:
            return
        if self.pos >= len(self.buffer):
            self.buffer = b""
            self.pos = self._need = 0
            self._scan = -1
        elif type(self.buffer) is bytearray:
            del self.buffer[: self.pos]
            self._rebase(self.buffer)
        else:
            self._rebase(bytearray(self.buffer[self.pos :]))

    def take_plain(self, special: Container[bytes], counts: dict[bytes, int]) -> int:
        """Pass over the complete array requests from `pos` whose names are not in
        `special`, counting their names as sent (any case); returns how many. The
        fast path for pipelines: no tuple or call per request. It stops before
        anything else, which `next()` then returns.

        When these requests fill the buffer to its end, where each one ends does
        not matter: their bytes go upstream together. Only a request that must be
        handled apart, or a partial one at the end, needs each size worked out.
        What Redis would read differently from hiredis is an array whose elements
        are not all bulk strings (Redis answers a protocol error and closes the
        connection, whatever the proxy thinks of it) or a request starting `~` or
        `|` (an inline command to Redis, an aggregate to hiredis), which `feed`
        looks for."""
        if not self._fast or self.held is not None:
            return 0
        if special is not self._special:  # a new dispatch table (a reload)
            self._special = special
            self._flags = {}
        flags = self._flags  # name as sent -> its upper case if in `special`, else b""
        gets = self._reader.gets
        taken: list[list[bytes]] = []
        special_args: Any = None  # the request that stopped the run, if any
        special_name = b""
        while True:
            try:
                args = gets()
            except hiredis.ProtocolError:
                self._fast = False  # next() hands the rest to the strict parser
                break
            if args is False:
                break
            if type(args) is not list or not args or type(args[0]) is not bytes:
                self._fast = False  # null, empty, inline or not RESP: the strict parser judges
                break
            flag = flags.get(args[0])
            if flag is None:
                flag = args[0].upper()
                if flag not in special:
                    flag = b""
                if len(flags) < MAX_COUNTED_NAMES:
                    flags[args[0]] = flag
            if flag:
                special_args = args
                special_name = flag
                break
            taken.append(args)
        buf = self.buffer
        pos = self.pos
        if (
            special_args is None
            and self._fast
            and taken
            and len(buf) - pos <= self.max_request
            and buf[pos] == 42
            and not self._odd
        ):
            if at_value_end(self._reader):
                self.pos = len(buf)
                count_names(counts, taken)
                return len(taken)
            self._fast = False  # a partial request at the end: the strict parser reads it
        limit = self.max_request
        for done, args in enumerate(taken):
            end = _checked_end(buf, pos, args, limit)
            if end < 0:  # this one and those after it: the strict parser reads them
                del taken[done:]
                self._fast = False
                break
            pos = end
        self.pos = pos
        if taken:
            count_names(counts, taken)
        if special_args is not None and self._fast:
            if (
                not self._reader.has_data()  # it ends the buffer: hiredis stops after a value
                and buf[pos] == 42
                and len(buf) - pos <= limit
                and _ONLY_BYTES.issuperset(map(type, special_args))
            ):
                # Its exact size matters only if it doesn't go as it came (see next()).
                self.held = (pos, -1, special_name, special_args)
            else:
                end = _checked_end(buf, pos, special_args, limit)
                if end < 0:
                    self._fast = False
                else:
                    self.held = (pos, end, special_name, special_args)
        return len(taken)

    def pass_held(self) -> None:
        """The held request goes upstream as it came: move past it. Its bytes need no
        check, as Redis reads them itself."""
        held = self.held
        assert held is not None
        self.held = None
        self.pos = held[1] if held[1] >= 0 else len(self.buffer)

    def next(self) -> tuple[int, int, bytes, list[bytes]] | None:
        if self._fast:
            held = self.held
            if held is not None:
                self.held = None
                start, end, name, held_args = held
                if end < 0:  # what Redis would read differently goes to the strict parser
                    end = _checked_end(self.buffer, start, held_args, self.max_request)
                    if end < 0:
                        self._fast = False
                        return self._strict_next()
                    held = (start, end, name, held_args)
                self.inline = False
                self.pos = end
                return held
            try:
                args = self._reader.gets()
            except hiredis.ProtocolError:
                args = None  # not RESP hiredis reads: the strict parser says what Redis would
            else:
                if args is False:
                    if self.pos >= len(self.buffer):
                        return None
                    # A request cut by the end of the read: the strict parser judges it as
                    # it comes in (Redis refuses some heads hiredis would wait on) and
                    # streams large ones; hiredis takes over again after it.
                elif type(args) is list and args and type(args[0]) is bytes:
                    start = self.pos
                    end = _checked_end(self.buffer, start, args, self.max_request)
                    if end > 0:
                        self.pos = end
                        self.inline = False
                        return (start, end, args[0].upper(), args)
                    args = None  # too large, or not plain bulk strings: the strict parser says
                else:
                    args = None  # an empty or null request
            self._fast = False  # from here on, until the stream drains: strict parsing
        return self._strict_next()

    def _strict_next(self) -> tuple[int, int, bytes, list[bytes]] | None:
        buf = self.buffer
        size = len(buf)
        while True:
            start = self.pos
            if start >= size or size < self._need:
                return None
            if buf[start] != 42:  # not '*': an inline command
                result = self._inline(start)
                if result is None or result[3]:
                    self.inline = True
                    if result is not None:
                        self._resume_fast()
                    return result
                continue  # an empty line: Redis skips it
            found = self._multibulk(start)
            if found is None:
                return None
            start, end, name = found
            if end == start:
                continue  # a multibulk of zero or negative length: Redis skips it
            self.inline = False
            self._resume_fast()
            return (start, end, name, request_args(buf, start, end))

    def _multibulk(self, start: int) -> tuple[int, int, bytes] | None:
        buf = self.buffer
        size = len(buf)
        if self._scan < 0:
            nl = buf.find(b"\r", start)
            if nl < 0 or nl + 1 >= size:
                if size - start > PROTO_INLINE_MAX_SIZE:
                    raise ProtocolError("Protocol error: too big mbulk count string")
                return None
            argc = _ARRAY_LENGTHS.get(bytes(buf[start:nl]))
            if argc is None:
                argc = _to_int(buf, start + 1, nl)
                if argc is None or argc > MULTIBULK_MAX:
                    raise ProtocolError("Protocol error: invalid multibulk length")
            if argc > UNAUTHENTICATED_MAX_ARGS and self.unauthenticated:
                raise ProtocolError("Protocol error: unauthenticated multibulk length")
            pos = nl + 2
            if argc <= 0:
                self.pos = pos
                return (start, start, b"")  # Redis skips it
            first = True
        else:
            pos = self._scan
            argc = self._argc
            first = False
        name_start = name_end = 0
        limit = start + self.max_request
        while argc:
            if pos >= size:
                break
            if buf[pos] != 36:  # '$'
                raise ProtocolError(f"Protocol error: expected '$', got '{chr(buf[pos])}'")
            nl = buf.find(b"\r", pos)
            if nl < 0 or nl + 1 >= size:
                if size - pos > PROTO_INLINE_MAX_SIZE:
                    raise ProtocolError("Protocol error: too big bulk count string")
                break
            length = _BULK_LENGTHS.get(bytes(buf[pos:nl]))
            if length is None:
                length = _to_int(buf, pos + 1, nl)
                if length is None or length < 0 or length > PROTO_MAX_BULK_LEN:
                    raise ProtocolError("Protocol error: invalid bulk length")
            if length > UNAUTHENTICATED_MAX_BULK and self.unauthenticated:
                raise ProtocolError("Protocol error: unauthenticated bulk length")
            end = nl + length + 4
            if end > limit:
                raise ProtocolError(TOO_LARGE)
            if end > size:
                self._need = end
                break
            if first:
                name_start, name_end, first = nl + 2, nl + 2 + length, False
            pos = end
            argc -= 1
        if argc:
            if first:  # the command name itself is not complete yet
                self._scan = -1
                return None
            self._scan = pos
            self._argc = argc
            return None
        self._scan = -1
        self.pos = pos
        if name_end == 0:  # resumed: the name is the first argument
            name_start, name_end = _first_bulk(buf, start)
        return (start, pos, bytes(buf[name_start:name_end]).upper())

    def _inline(self, start: int) -> tuple[int, int, bytes, list[bytes]] | None:
        buf = self.buffer
        nl = buf.find(b"\n", start)
        nul = buf.find(b"\0", start, nl if nl >= 0 else len(buf))
        if nl < 0 or nul >= 0:  # Redis looks for the newline with strchr: NUL hides it
            if len(buf) - start > PROTO_INLINE_MAX_SIZE:
                raise ProtocolError("Protocol error: too big inline request")
            return None
        line_end = nl - 1 if nl > start and buf[nl - 1] == 13 else nl
        args = split_args(bytes(buf[start:line_end]))
        if args is None:
            raise ProtocolError("Protocol error: unbalanced quotes in request")
        self.pos = nl + 1
        return (start, nl + 1, args[0].upper() if args else b"", args)


# Canonical small lengths, looked up whole: faster than parsing, and exactly as strict.
_ARRAY_LENGTHS: Final = {b"*%d" % n: n for n in range(1, 1025)}
_BULK_LENGTHS: Final = {b"$%d" % n: n for n in range(4097)}


def redis_int(value: bytes) -> int | None:
    """An argument read as a number the way Redis reads one (numkeys, a SELECT index)."""
    return _to_int(value, 0, len(value))


def _to_int(buf: bytearray | bytes, start: int, end: int) -> int | None:
    """Parse a decimal the way Redis's string2ll does: no sign but '-', no leading zeros."""
    text = bytes(buf[start:end])
    if not text or len(text) > 20:
        return None
    digits = text[1:] if text[:1] == b"-" else text
    if not digits.isdigit() or (digits[:1] == b"0" and len(digits) > 1):
        return None
    if text == b"-0":
        return None
    return int(text)


def _first_bulk(buf: bytes | bytearray, start: int) -> tuple[int, int]:
    nl = buf.find(b"\r\n", start)
    nl2 = buf.find(b"\r\n", nl + 2)
    length = int(buf[nl + 3 : nl2])
    return nl2 + 2, nl2 + 2 + length


_DIGITS: Final = [len(str(n)) for n in range(65536)]


def _encoded_size(args: list[bytes]) -> int | None:
    """The size of `args` as a RESP array of bulk strings in canonical form (the only
    form hiredis accepts), or None when an element is not a bulk string."""
    digits = _DIGITS
    count = len(args)
    size = 3 + (digits[count] if count < 65536 else len(str(count))) + 5 * count
    for arg in args:
        if type(arg) is not bytes:
            return None  # an integer, a nested array, a null...
        n = len(arg)
        size += n + (digits[n] if n < 65536 else len(str(n)))
    return size


def count_name(counts: dict[bytes, int], name: bytes) -> None:
    """Add one request named `name` to `counts`, which keeps at most MAX_COUNTED_NAMES
    names."""
    seen = counts.get(name)
    if seen is not None:
        counts[name] = seen + 1
    elif len(counts) < MAX_COUNTED_NAMES:
        counts[name] = 1


def count_names(counts: dict[bytes, int], requests: list[list[bytes]]) -> None:
    """Add the requests' names (as sent, in any case) to `counts`, which keeps at most
    MAX_COUNTED_NAMES names: a client sending made-up names cannot grow it. (A plain
    dict: CPython 3.11 can't specialise lookups on a Counter, a subclass with a
    __dict__, which made each count cost a third more.)"""
    seen = counts.get
    for args in requests:
        name = args[0]
        counts[name] = seen(name, 0) + 1
    if len(counts) > MAX_COUNTED_NAMES:
        for name in list(counts)[MAX_COUNTED_NAMES:]:
            del counts[name]


def at_value_end(reader: Any) -> bool:
    """Whether a hiredis.Reader, whose complete values have all been taken, ended on
    a value's end. `has_data()` alone cannot tell: hiredis takes in an aggregate's
    header and elements (and a lone type byte) before the aggregate is complete.
    So an empty array is fed as a probe: only at a value's end does it come back
    as a value of its own. When it does not, the reader is spent."""
    if reader.has_data():
        return False
    reader.feed(b"*0\r\n")
    try:
        probe = reader.gets()
    except hiredis.ProtocolError:
        return False
    return type(probe) is list and not probe


def _checked_end(buf: bytes | bytearray, pos: int, args: list[bytes], limit: int) -> int:
    """Where the request hiredis read as `args` ends, if it starts at `pos`, is all
    bulk strings in canonical form and is within `limit` bytes; else -1."""
    size = _encoded_size(args)
    if not size or size > limit:
        return -1
    end = pos + size
    if buf[pos] != 42 or buf[end - 2 : end] != CRLF:
        return -1
    return end


def request_args(buf: bytes | bytearray, start: int, end: int) -> list[bytes]:
    """The arguments of one complete array request at `buf[start:end]`."""
    nl = buf.find(b"\r\n", start)
    argc = int(buf[start + 1 : nl])
    pos = nl + 2
    args = []
    for _ in range(argc):
        nl = buf.find(b"\r\n", pos)
        length = int(buf[pos + 1 : nl])
        pos = nl + 2
        args.append(bytes(buf[pos : pos + length]))
        pos += length + 2
    return args


_ESCAPES: Final = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}
_HEX: Final = b"0123456789abcdefABCDEF"


def split_args(line: bytes) -> list[bytes] | None:
    """Split an inline command like Redis's sdssplitargs; None for unbalanced quotes."""
    args: list[bytes] = []
    line = line.split(b"\0", 1)[0]  # Redis reads the line as a C string: NUL ends it
    i, n = 0, len(line)
    while True:
        while i < n and line[i] in b" \n\r\t\v\f":
            i += 1
        if i >= n:
            return args
        current = bytearray()
        in_double = in_single = False
        while True:
            if in_double:
                if i >= n:
                    return None
                c = line[i]
                if (
                    c == 92
                    and i + 3 < n
                    and line[i + 1] == ord("x")
                    and line[i + 2] in _HEX
                    and line[i + 3] in _HEX
                ):
                    current.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif c == 92 and i + 1 < n:
                    i += 1
                    current.append(_ESCAPES.get(line[i], line[i]))
                elif c == 34:
                    if i + 1 < n and line[i + 1] not in b" \n\r\t\v\f":
                        return None
                    in_double = False
                    i += 1
                    break
                else:
                    current.append(c)
            elif in_single:
                if i >= n:
                    return None
                c = line[i]
                if c == 92 and i + 1 < n and line[i + 1] == 39:
                    i += 1
                    current.append(39)
                elif c == 39:
                    if i + 1 < n and line[i + 1] not in b" \n\r\t\v\f":
                        return None
                    in_single = False
                    i += 1
                    break
                else:
                    current.append(c)
            else:
                if i >= n:
                    break
                c = line[i]
                if c in b" \n\r\t":
                    break
                if c == 34:
                    in_double = True
                elif c == 39:
                    in_single = True
                else:
                    current.append(c)
            i += 1
        args.append(bytes(current))


def encode_request(args: list[bytes]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n" % len(arg))
        parts.append(arg)
        parts.append(CRLF)
    return b"".join(parts)


# --- Replies ------------------------------------------------------------------

# Type bytes, as ints for comparing with buf[i].
BLOB_TYPES: Final = frozenset(b"$=!")  # length-prefixed: bulk, verbatim, blob error
SIMPLE_TYPES: Final = frozenset(b"+-:_,#(")  # one line
ARRAY_TYPES: Final = frozenset(b"*~>")  # N elements: array, set, push
PAIR_TYPES: Final = frozenset(b"%")  # N pairs: map
ATTRIBUTE: Final = ord("|")  # N pairs, then the value they decorate
PUSH: Final = ord(">")
ERROR_TYPES: Final = frozenset(b"-!")


class ReplyReader:
    """Finds where each reply ends in a server's byte stream.

    Resumable: a value that arrives in many pieces is scanned once, not once
    per piece. `next()` returns the end offset of the next complete value,
    which starts at `pos`; the caller then sets `pos` to that end. `skip(n)`
    passes over up to n simple replies at once, for the common case.

    `count(n)` passes over up to n RESP2 replies of any shape, parsed by hiredis
    in C, for runs of replies that go out untouched. hiredis gives no offsets,
    so while it holds part of a reply, `pos` stays where it started (at the
    first reply it has not finished) and `counting` is true; when it has read
    to the end of the buffer, `pos` moves there. Where a run ends inside the
    buffer, or hiredis has held more than `COUNT_WINDOW` bytes, the Python
    framer walks the replies hiredis counted to find the offset (`_settle`).
    """

    __slots__ = ("_ahead", "_counter", "_need", "_scan", "_spare", "_stack", "buffer", "pos")

    def __init__(self) -> None:
        self.buffer: bytes | bytearray = b""
        self.pos = 0
        self._scan = 0  # next header to read, inside the value at `pos`
        self._stack: list[int] = []  # elements still due in each open aggregate
        self._need = 0
        self._counter: Any = None  # a hiredis.Reader holding the bytes from `pos` on
        self._spare: Any = None  # an empty hiredis.Reader, for the next run
        self._ahead = 0  # complete replies it has returned from them

    @property
    def counting(self) -> bool:
        """hiredis holds a partial reply: only more bytes can finish it."""
        return self._counter is not None

    def feed(self, data: bytes) -> None:
        if self.pos >= len(self.buffer):  # nothing pending: read the new bytes in place
            self.buffer = data
            self.pos = self._scan = self._need = 0
            self._counter = None  # (hiredis never holds bytes before `pos`)
            return
        if type(self.buffer) is not bytearray:
            self.buffer = bytearray(self.buffer)
        self.buffer += data
        if self._counter is not None:
            self._counter.feed(data)

    def count(self, limit: int) -> int:
        """Pass over up to `limit` complete replies from `pos`; returns how many.
        Only for RESP2 streams outside pub/sub, where every value is a reply."""
        counter = self._counter if self._counter is not None else self._start_counter()
        if counter is None:
            return 0
        gets = counter.gets
        done = 0
        try:
            while done < limit and gets() is not False:
                done += 1
        except hiredis.ProtocolError:
            self._ahead += done
            self._settle()  # the Python framer reads on, and says what is wrong
            return done
        partial = counter.has_data()
        if not partial and at_value_end(counter):  # the buffer ends at a reply's end
            self._counter = None
            self._ahead = 0
            self._spare = counter  # empty, so it can count the next run
            self.pos = self._scan = len(self.buffer)
            self._need = 0
            return done
        self._ahead += done
        if not partial:  # the probe went into a partial reply: read the bytes again
            counter = self._counter = hiredis.Reader()
            counter.feed(self.buffer[self.pos :])  # type: ignore[arg-type]  # any buffer
            for _ in range(self._ahead):
                counter.gets()
        if done == limit or len(self.buffer) - self.pos > COUNT_WINDOW:
            self._settle()
        return done

    def _start_counter(self) -> Any:
        """A hiredis.Reader holding the bytes from `pos` on; None when there are none,
        or the Python framer is inside a value."""
        buf = self.buffer
        pos = self.pos
        if pos >= len(buf) or self._stack or self._scan > pos or self._need > len(buf):
            return None
        counter = self._counter = self._spare or hiredis.Reader()
        self._spare = None
        self._ahead = 0
        counter.feed(buf if pos == 0 else buf[pos:])  # type: ignore[arg-type]  # any buffer
        return counter

    def next_resp2(self) -> int:
        """`next()` for RESP2 streams: hiredis reads the value in C and its end follows
        from what it read (RESP2 is written in one canonical way). When hiredis has
        nothing left unread after the value (the last reply of a read), the value ends
        the buffer and no size is worked out. Otherwise, where the size is
        not certain (an array: `+x` and `$1 x` read the same), a second hiredis pass
        over exactly those bytes must find exactly one value; anything else, and any
        type RESP2 does not have, goes to the Python framer."""
        counter = self._counter
        if counter is not None and self._ahead:
            self._settle()
            counter = None
        buf = self.buffer
        pos = self.pos
        if counter is None:
            counter = self._start_counter()
            if counter is None:
                return self.next()
        try:
            value = counter.gets()
        except hiredis.ProtocolError:
            value = None
            end = -1
        else:
            if value is False:  # not all here yet: hiredis keeps what it has read
                if len(buf) - pos > COUNT_WINDOW:
                    self._settle()
                    return self.next()
                return -1
            if not counter.has_data():
                # hiredis stops at the end of each value it returns, so the value
                # ends the buffer (a partial value after it would stay unread).
                self._counter = None
                self._spare = counter
                return len(buf)
            end = _resp2_end(buf, pos, value)
        if end < 0:
            self._counter = None  # the Python framer reads it
            self._scan = pos
            self._stack = []
            self._need = 0
            return self.next()
        return end  # before the buffer's end: hiredis holds the bytes after it

    def _settle(self) -> None:
        """Leave counting: move `pos` past the replies hiredis counted."""
        ahead = self._ahead
        self._counter = None
        self._ahead = 0
        self._scan = self.pos
        self._stack = []
        self._need = 0
        for _ in range(ahead):
            end = self.next()
            if end < 0:
                raise ProtocolError("Protocol error: reply framing disagrees with hiredis")
            self.pos = end

    def compact(self) -> None:
        pos = self.pos
        if not pos:
            return
        if pos >= len(self.buffer):
            self.buffer = b""
            self.pos = self._scan = self._need = 0
            return
        if type(self.buffer) is bytearray:
            del self.buffer[:pos]
        else:
            self.buffer = bytearray(self.buffer[pos:])
        self._scan -= pos
        self._need -= pos
        self.pos = 0

    def skip(self, limit: int) -> int:
        """Pass over up to `limit` complete simple replies (+, -, :, $) from `pos`;
        returns how many. It stops at anything else (aggregates, pushes, a partial
        reply), which `next()` then reads."""
        if self._counter is not None:
            self._settle()
        if self._stack or self._scan > self.pos:
            return 0  # in the middle of a value
        buf = self.buffer
        size = len(buf)
        pos = self.pos
        done = 0
        while done < limit and pos < size:
            kind = buf[pos]
            if kind == 36:  # '$'
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    break
                length = _BULK_LENGTHS.get(bytes(buf[pos:nl]))
                if length is None:
                    length = _reply_int(buf, pos, nl)
                end = nl + length + 4 if length >= 0 else nl + 2
                if end > size:
                    break
                pos = end
            elif kind == 43 or kind == 58 or kind == 45:  # '+', ':', '-'
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    break
                pos = nl + 2
            else:
                break
            done += 1
        self.pos = self._scan = pos
        return done

    def next(self) -> int:
        """The end of the value starting at `pos`, or -1 if it is incomplete."""
        if self._counter is not None:
            self._settle()
        buf = self.buffer
        size = len(buf)
        if size < self._need:
            return -1
        stack = self._stack
        scan = max(self._scan, self.pos)
        while True:
            if scan >= size:
                self._scan = scan
                return -1
            kind = buf[scan]
            nl = buf.find(b"\r\n", scan)
            if nl < 0:
                self._scan = scan
                return -1
            if kind in BLOB_TYPES:
                length = _reply_int(buf, scan, nl)
                if length < 0:
                    scan = nl + 2
                else:
                    end = nl + length + 4
                    if end > size:
                        self._scan = scan
                        self._need = end
                        return -1
                    scan = end
            elif kind in SIMPLE_TYPES:
                scan = nl + 2
            else:
                count = _reply_int(buf, scan, nl)
                scan = nl + 2
                if kind in ARRAY_TYPES:
                    pass
                elif kind in PAIR_TYPES:
                    count *= 2
                elif kind == ATTRIBUTE:
                    count = count * 2 + 1
                else:
                    raise ProtocolError(f"Protocol error: unexpected reply type byte {kind!r}")
                if count > 0:
                    # Most aggregates hold only bulk strings (HGETALL, MGET...): pass
                    # over those in a tight loop, and fall back to the stack for the rest.
                    scan, count = _skip_bulks(buf, scan, count, size)
                    if count:
                        stack.append(count)
                        continue
            # One value is complete; close every aggregate it completes.
            while stack:
                stack[-1] -= 1
                if stack[-1]:
                    break
                stack.pop()
            else:
                self._scan = scan
                return scan


COUNT_WINDOW: Final = 1024 * 1024  # most bytes `count` holds back before it settles


def _resp2_end(buf: bytes | bytearray, pos: int, value: Any) -> int:
    """Where the RESP2 value hiredis read as `value` from `buf[pos:]` ends, or -1 when
    that is not certain."""
    kind = buf[pos]
    if type(value) is bytes:
        n = len(value)
        if kind == 36:  # '$'
            end = pos + n + (_DIGITS[n] if n < 65536 else len(str(n))) + 5
        elif kind == 43:  # '+'
            end = pos + n + 3
        else:
            return -1
    elif value is None and (kind == 36 or kind == 42):  # $-1 or *-1
        end = pos + 5
    elif type(value) is int and kind == 58:  # ':'
        end = pos + len(str(value)) + 3
    elif type(value) is list and kind == 42:  # '*': checked by a second pass
        size = _array_size(value)
        end = pos + size if size else -1
        if end < 0 or end > len(buf) or not _one_value(buf[pos:end]):
            return -1
        return end
    else:
        return -1  # an error reply, or a type RESP2 does not have
    if end > len(buf) or buf[end - 2 : end] != CRLF:
        return -1
    return end


def _array_size(items: list[Any]) -> int | None:
    """The size of `items` as a RESP2 array, taking every string for a bulk string."""
    count = len(items)
    size = 3 + (_DIGITS[count] if count < 65536 else len(str(count)))
    if _ONLY_BYTES.issuperset(map(type, items)):  # most often: counted in C
        lengths = list(map(len, items))
        try:
            return size + sum(lengths) + 5 * count + sum(map(_DIGITS.__getitem__, lengths))
        except IndexError:  # a string of 64 KiB or more
            pass
    for item in items:
        if type(item) is bytes:
            n = len(item)
            size += n + len(str(n)) + 5
        elif item is None:
            size += 5
        elif type(item) is int:
            size += len(str(item)) + 3
        elif type(item) is list:
            inner = _array_size(item)
            if inner is None:
                return None
            size += inner
        else:
            return None
    return size


_ONLY_BYTES: Final = frozenset({bytes})


def _one_value(frame: bytes | bytearray) -> bool:
    """Whether hiredis reads `frame` as exactly one value."""
    reader = hiredis.Reader()
    reader.feed(frame)  # type: ignore[arg-type]  # any buffer
    try:
        return reader.gets() is not False and at_value_end(reader)
    except hiredis.ProtocolError:
        return False


def _skip_bulks(buf: bytes | bytearray, pos: int, count: int, size: int) -> tuple[int, int]:
    """Pass over up to `count` complete bulk strings from `pos`: (new pos, how many are left)."""
    find = buf.find
    lengths = _BULK_LENGTHS
    while count and pos < size and buf[pos] == 36:  # '$'
        nl = find(b"\r\n", pos)
        if nl < 0:
            break
        length = lengths.get(bytes(buf[pos:nl]))
        if length is None:
            length = _reply_int(buf, pos, nl)
            if length < 0:
                pos = nl + 2
                count -= 1
                continue
        end = nl + length + 4
        if end > size:
            break
        pos = end
        count -= 1
    return pos, count


def _reply_int(buf: bytearray | bytes, start: int, nl: int) -> int:
    try:
        return int(buf[start + 1 : nl])
    except ValueError:
        raise ProtocolError(
            f"Protocol error: bad length in reply ({bytes(buf[start : start + 1])!r})"
        ) from None


def frame_end(buf: bytes | bytearray, pos: int) -> int:
    """The end of the complete value at `buf[pos:]` (which must hold it whole)."""
    reader = ReplyReader()
    reader.buffer = buf  # read-only use
    reader.pos = pos
    end = reader.next()
    if end < 0:
        raise ProtocolError("Protocol error: truncated value")
    return end


def elements(buf: bytes | bytearray, start: int) -> tuple[int, list[tuple[int, int]]]:
    """For the aggregate at `buf[start:]`: the end of its header and each element's span.

    Map pairs come as two consecutive spans. An attribute's decoration is not
    skipped: callers that need it handle `|` themselves.
    """
    nl = buf.find(b"\r\n", start)
    count = int(buf[start + 1 : nl])
    if buf[start] in PAIR_TYPES:
        count *= 2
    spans = []
    pos = nl + 2
    for _ in range(max(count, 0)):
        end = frame_end(buf, pos)
        spans.append((pos, end))
        pos = end
    return nl + 2, spans


# --- A lossless tree, for replies the proxy rewrites --------------------------


@dataclass(slots=True)
class Aggregate:
    kind: int  # the type byte: * ~ > % |
    items: list[Value]
    null: bool = False  # `*-1` in RESP2


@dataclass(slots=True)
class Blob:
    kind: int  # $ = !
    data: bytes  # for '=' includes the 'txt:' format prefix


@dataclass(slots=True)
class Simple:
    raw: bytes  # the whole line, type byte and CRLF included


Value = Aggregate | Blob | Simple | None  # None: the RESP2 null bulk `$-1`


def decode(buf: bytes | bytearray, pos: int = 0) -> tuple[Value, int]:
    """Decode one complete value at `buf[pos:]`; returns it and its end."""
    kind = buf[pos]
    nl = buf.find(b"\r\n", pos)
    if kind in BLOB_TYPES:
        length = int(buf[pos + 1 : nl])
        if length < 0:
            return None, nl + 2
        return Blob(kind, bytes(buf[nl + 2 : nl + 2 + length])), nl + length + 4
    if kind in SIMPLE_TYPES:
        return Simple(bytes(buf[pos : nl + 2])), nl + 2
    count = int(buf[pos + 1 : nl])
    if count < 0:
        return Aggregate(kind, [], null=True), nl + 2
    if kind in PAIR_TYPES:
        count *= 2
    elif kind == ATTRIBUTE:
        count = count * 2 + 1
    items: list[Value] = []
    end = nl + 2
    for _ in range(count):
        item, end = decode(buf, end)
        items.append(item)
    return Aggregate(kind, items), end


def encode(value: Value, out: list[bytes]) -> None:
    if value is None:
        out.append(b"$-1\r\n")
    elif type(value) is Blob:
        out.append(b"%c%d\r\n" % (value.kind, len(value.data)))
        out.append(value.data)
        out.append(CRLF)
    elif type(value) is Simple:
        out.append(value.raw)
    else:
        assert type(value) is Aggregate
        if value.null:
            out.append(b"%c-1\r\n" % value.kind)
            return
        count = len(value.items)
        if value.kind in PAIR_TYPES:
            count //= 2
        elif value.kind == ATTRIBUTE:
            count = (count - 1) // 2
        out.append(b"%c%d\r\n" % (value.kind, count))
        for item in value.items:
            encode(item, out)


def encode_value(value: Value) -> bytes:
    out: list[bytes] = []
    encode(value, out)
    return b"".join(out)


def error_reply(message: str) -> bytes:
    """A RESP error line; the message must hold no CR or LF."""
    return b"-" + message.replace("\r", " ").replace("\n", " ").encode() + CRLF


def bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)
