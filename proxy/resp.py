"""RESP framing and encoding, with no I/O.

Two incremental readers find message boundaries in a byte stream, so the proxy
can forward every message as its original bytes and rewrite only the ones it
must:

- `RequestReader` reads what clients send: arrays of bulk strings, or inline
  commands typed into nc/telnet. It accepts and rejects exactly what Redis's
  own query parser does, with Redis's error texts.
- `ReplyReader` reads what servers send: any RESP2 or RESP3 value, including
  attributes and pushes. It only finds where each value ends; hiredis loses
  RESP3 types and byte offsets (see shared/NOTES.md), so framing is ours.

`decode` and `encode` turn one framed value into a lossless tree and back,
for the few replies the proxy rewrites.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

PROTO_INLINE_MAX_SIZE: Final = 64 * 1024  # Redis's limit on an unterminated line
PROTO_MAX_BULK_LEN: Final = 512 * 1024 * 1024  # Redis's default proto-max-bulk-len
MULTIBULK_MAX: Final = 2**31 - 1  # Redis 7 accepts up to INT_MAX arguments

CRLF: Final = b"\r\n"


class ProtocolError(Exception):
    """A stream that Redis would reject; str() is the text after `-ERR `."""


# --- Requests -----------------------------------------------------------------


class RequestReader:
    """Splits a client's byte stream into requests.

    `next()` returns `(start, end, name, inline_args)` for each complete request:
    the request's bytes are `buffer[start:end]`, `name` is the upper-cased
    command name, and `inline_args` is the argument list for an inline command
    (which must be re-sent as an array), otherwise None. It returns None when
    more bytes are needed. The caller calls `compact()` once it no longer needs
    the bytes before `pos`.
    """

    __slots__ = ("_argc", "_need", "_scan", "buffer", "max_request", "pos")

    def __init__(self, max_request: int = PROTO_MAX_BULK_LEN + 1024) -> None:
        self.buffer = bytearray()
        self.pos = 0  # start of the next unread request
        self.max_request = max_request
        self._need = 0  # don't rescan until the buffer holds this many bytes
        self._scan = -1  # resume point inside a partly read array request
        self._argc = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def pending_bytes(self) -> int:
        return len(self.buffer) - self.pos

    def compact(self) -> None:
        if self.pos:
            del self.buffer[: self.pos]
            self._need -= self.pos
            if self._scan >= 0:
                self._scan -= self.pos
            self.pos = 0

    def next(self) -> tuple[int, int, bytes, list[bytes] | None] | None:
        buf = self.buffer
        size = len(buf)
        while True:
            start = self.pos
            if start >= size or size < self._need:
                return None
            if buf[start] != 42:  # not '*': an inline command
                result = self._inline(start)
                if result is None or result[3]:
                    return result
                continue  # an empty line: Redis skips it
            result = self._multibulk(start)
            if result is None or result[3] is None:
                return result
            # a multibulk of zero or negative length: Redis ignores it

    def _multibulk(self, start: int) -> tuple[int, int, bytes, list[bytes] | None] | None:
        buf = self.buffer
        size = len(buf)
        if self._scan < 0:
            nl = buf.find(b"\r", start)
            if nl < 0 or nl + 1 >= size:
                if size - start > PROTO_INLINE_MAX_SIZE:
                    raise ProtocolError("Protocol error: too big mbulk count string")
                return None
            argc = _to_int(buf, start + 1, nl)
            if argc is None or argc > MULTIBULK_MAX:
                raise ProtocolError("Protocol error: invalid multibulk length")
            pos = nl + 2
            if argc <= 0:
                self.pos = pos
                return (start, pos, b"", [])
            self._argc = argc
            first = True
        else:
            pos = self._scan
            first = False
        argc = self._argc
        name_start = name_end = 0
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
            length = _to_int(buf, pos + 1, nl)
            if length is None or length < 0 or length > PROTO_MAX_BULK_LEN:
                raise ProtocolError("Protocol error: invalid bulk length")
            end = nl + 2 + length + 2
            if end - start > self.max_request:
                raise ProtocolError(
                    "Protocol error: request larger than fieldcrypt's max_request_bytes"
                )
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
        return (start, pos, bytes(buf[name_start:name_end]).upper(), None)

    def _inline(self, start: int) -> tuple[int, int, bytes, list[bytes] | None] | None:
        buf = self.buffer
        nl = buf.find(b"\n", start)
        if nl < 0:
            if len(buf) - start > PROTO_INLINE_MAX_SIZE:
                raise ProtocolError("Protocol error: too big inline request")
            return None
        line_end = nl - 1 if nl > start and buf[nl - 1] == 13 else nl
        args = split_args(bytes(buf[start:line_end]))
        if args is None:
            raise ProtocolError("Protocol error: unbalanced quotes in request")
        self.pos = nl + 1
        return (start, nl + 1, args[0].upper() if args else b"", args)


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


def _first_bulk(buf: bytearray, start: int) -> tuple[int, int]:
    nl = buf.find(b"\r\n", start)
    nl2 = buf.find(b"\r\n", nl + 2)
    length = int(buf[nl + 3 : nl2])
    return nl2 + 2, nl2 + 2 + length


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
                if c in b" \n\r\t\v\f\0":
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
    which starts at `pos`; the caller then sets `pos` to that end, or calls
    `consume(end)`.
    """

    __slots__ = ("_need", "_scan", "_stack", "buffer", "pos")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.pos = 0
        self._scan = 0  # next header to read, inside the value at `pos`
        self._stack: list[int] = []  # elements still due in each open aggregate
        self._need = 0

    def feed(self, data: bytes) -> None:
        self.buffer += data

    def compact(self) -> None:
        pos = self.pos
        if pos:
            del self.buffer[:pos]
            self._scan -= pos
            self._need -= pos
            self.pos = 0

    def next(self) -> int:
        """The end of the value starting at `pos`, or -1 if it is incomplete."""
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
    reader.buffer = buf  # type: ignore[assignment]  # read-only use
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
