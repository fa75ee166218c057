"""RESP framing with no server (proxy/resp.py): replies and requests split anywhere in the
byte stream come out as the exact frames that went in, and bad requests are refused
with Redis's own error texts."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.resp import (
    PROTO_INLINE_MAX_SIZE,
    PROTO_MAX_BULK_LEN,
    ProtocolError,
    ReplyReader,
    RequestReader,
    decode,
    encode_request,
    encode_value,
    frame_end,
    request_args,
    split_args,
)

ROOT = Path(__file__).resolve().parent.parent

# --- strategies: RESP2/RESP3 values as their exact bytes ---------------------------------

# Bytes that make framing hard: CRLF, lone CR/LF, type bytes, digits.
TRICKY = st.sampled_from(
    [b"\r\n", b"\r", b"\n", b"$", b"*", b"%", b"|", b">", b"-1", b"0", b"\x00"]
)
BINARY = st.lists(st.one_of(TRICKY, st.binary(max_size=12)), max_size=6).map(b"".join)
LINE = st.binary(max_size=16).map(lambda data: data.replace(b"\r", b"").replace(b"\n", b""))


def blob(kind: bytes, data: bytes) -> bytes:
    return b"%s%d\r\n%s\r\n" % (kind, len(data), data)


def double_text(number: float) -> bytes:
    if number != number:
        return b"nan"
    if number in (float("inf"), float("-inf")):
        return b"inf" if number > 0 else b"-inf"
    return repr(number).encode()


LEAVES = st.one_of(
    LINE.map(lambda text: b"+" + text + b"\r\n"),
    LINE.map(lambda text: b"-ERR " + text + b"\r\n"),
    st.integers(-(2**63), 2**63 - 1).map(lambda n: b":%d\r\n" % n),
    BINARY.map(lambda data: blob(b"$", data)),
    st.just(b"$-1\r\n"),
    st.just(b"*-1\r\n"),
    st.just(b"_\r\n"),
    st.sampled_from([b"#t\r\n", b"#f\r\n"]),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda x: b"," + double_text(x) + b"\r\n"),
    st.integers(-(10**40), 10**40).map(lambda n: b"(%d\r\n" % n),
    st.tuples(st.sampled_from([b"txt", b"mkd"]), BINARY).map(
        lambda fmt_data: blob(b"=", fmt_data[0] + b":" + fmt_data[1])
    ),
    BINARY.map(lambda data: blob(b"!", b"SYNTAX " + data)),
)


def aggregates(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    elements = st.lists(children, max_size=4)
    pairs = st.lists(st.tuples(children, children), max_size=3)
    return st.one_of(
        st.tuples(st.sampled_from([b"*", b"~", b">"]), elements).map(
            lambda kind_items: (
                b"%s%d\r\n" % (kind_items[0], len(kind_items[1])) + b"".join(kind_items[1])
            )
        ),
        pairs.map(lambda items: b"%%%d\r\n" % len(items) + b"".join(k + v for k, v in items)),
        # An attribute: N pairs, then the value it decorates, all one frame.
        st.tuples(pairs, children).map(
            lambda attr: b"|%d\r\n" % len(attr[0]) + b"".join(k + v for k, v in attr[0]) + attr[1]
        ),
    )


VALUES = st.recursive(LEAVES, aggregates, max_leaves=10)


def split_points(data: st.DataObject, size: int) -> list[int]:
    cuts = data.draw(st.lists(st.integers(0, size), max_size=12), label="cuts")
    return sorted({0, size, *cuts})


# --- replies --------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(VALUES, min_size=1, max_size=6), data=st.data())
def test_reply_reader_yields_the_original_frames_however_the_stream_is_split(
    frames: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(frames)
    points = split_points(data, len(stream))
    reader = ReplyReader()
    found: list[bytes] = []
    for left, right in itertools.pairwise(points):
        reader.feed(stream[left:right])
        while True:
            end = reader.next()
            if end < 0:
                break
            found.append(bytes(reader.buffer[reader.pos : end]))
            reader.pos = end
        if data.draw(st.booleans(), label="compact"):
            reader.compact()
    assert found == frames
    assert reader.next() == -1


@settings(max_examples=200, deadline=None)
@given(frame=VALUES)
def test_decode_then_encode_gives_back_the_same_bytes(frame: bytes) -> None:
    value, end = decode(frame)
    assert end == len(frame)
    assert encode_value(value) == frame
    assert frame_end(b"+before\r\n" + frame + b":1\r\n", 9) == 9 + len(frame)


def test_attribute_and_the_value_it_decorates_are_one_frame() -> None:
    attribute = b"|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.1923\r\n"
    reply = b"*2\r\n:2039123\r\n:9543892\r\n"
    reader = ReplyReader()
    reader.feed(attribute + reply + b"+OK\r\n")
    end = reader.next()
    assert bytes(reader.buffer[:end]) == attribute + reply
    reader.pos = end
    assert bytes(reader.buffer[end : reader.next()]) == b"+OK\r\n"


def test_bulk_string_holding_crlf_is_not_cut_at_the_crlf() -> None:
    reader = ReplyReader()
    reader.feed(b"$7\r\na\r\n$1\r\n")  # the CRLF inside looks like a header's end
    assert reader.next() == -1  # the bulk's own CRLF has not come yet
    reader.feed(b"\r\n:1\r\n")
    assert bytes(reader.buffer[: reader.next()]) == b"$7\r\na\r\n$1\r\n\r\n"


def test_reply_with_an_unknown_type_byte_is_a_protocol_error() -> None:
    reader = ReplyReader()
    reader.feed(b"?3\r\n")
    with pytest.raises(ProtocolError, match="unexpected reply type byte"):
        reader.next()


# --- requests -------------------------------------------------------------------------

ARGUMENTS = st.lists(BINARY, min_size=1, max_size=6)
INLINE_WORD = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_-", min_size=1
)
# Bytes between requests that Redis skips without a reply.
SKIPPED = st.sampled_from([b"\r\n", b"\n", b"   \r\n", b"*0\r\n", b"*-1\r\n", b"*-10\r\n"])


@st.composite
def request_streams(draw: st.DrawFn) -> list[tuple[bytes, list[bytes], bool] | bytes]:
    """Requests as (bytes, arguments, inline), with skipped bytes (plain bytes) between."""
    items: list[tuple[bytes, list[bytes], bool] | bytes] = []
    for _ in range(draw(st.integers(1, 10))):
        kind = draw(st.sampled_from(["array", "array", "array", "inline", "skipped"]))
        if kind == "array":
            args = draw(ARGUMENTS)
            items.append((encode_request(args), args, False))
        elif kind == "inline":
            words = draw(st.lists(INLINE_WORD, min_size=1, max_size=4))
            args = [word.encode() for word in words]
            ending = draw(st.sampled_from([b"\r\n", b"\n"]))
            items.append((b" ".join(args) + ending, args, True))
        else:
            items.append(draw(SKIPPED))
    return items


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=request_streams(), data=st.data())
def test_request_reader_yields_each_request_span_name_and_arguments_however_split(
    items: list[tuple[bytes, list[bytes], bool] | bytes], data: st.DataObject
) -> None:
    stream = b"".join(item if isinstance(item, bytes) else item[0] for item in items)
    expected = [item for item in items if not isinstance(item, bytes)]
    points = split_points(data, len(stream))
    reader = RequestReader()
    found: list[tuple[bytes, list[bytes], bool]] = []
    names: list[bytes] = []
    for left, right in itertools.pairwise(points):
        reader.feed(stream[left:right])
        while (request := reader.next()) is not None:
            start, end, name, args = request
            span = bytes(reader.buffer[start:end])
            if not reader.inline:
                assert args == request_args(reader.buffer, start, end)
            found.append((span, args, reader.inline))
            names.append(name)
        reader.compact()
    assert [(args, inline) for _, args, inline in found] == [
        (args, inline) for _, args, inline in expected
    ]
    assert [span for span, _, _ in found] == [span for span, _, _ in expected]
    assert names == [args[0].upper() for _, args, _ in expected]
    assert reader.pending_bytes() == 0


def test_request_name_is_upper_cased_and_arguments_keep_their_case() -> None:
    reader = RequestReader()
    reader.feed(encode_request([b"hSeT", b"Key", b"Field", b"Value"]))
    start, end, name, args = reader.next() or (0, 0, b"", [])
    assert (name, reader.inline) == (b"HSET", False)
    assert args == [b"hSeT", b"Key", b"Field", b"Value"]
    assert request_args(reader.buffer, start, end) == args


def test_request_split_inside_the_command_name_waits_for_the_rest() -> None:
    reader = RequestReader()
    reader.feed(b"*2\r\n$4\r\nPI")
    assert reader.next() is None
    reader.feed(b"NG\r\n$5\r\nhel")
    assert reader.next() is None
    reader.feed(b"lo\r\n")
    request = reader.next()
    assert request is not None
    assert request[2] == b"PING"
    assert bytes(reader.buffer[request[0] : request[1]]) == b"*2\r\n$4\r\nPING\r\n$5\r\nhello\r\n"


# --- Redis's protocol errors ------------------------------------------------------------


def read_all(data: bytes) -> list[bytes]:
    """Every request's bytes in `data`, until a ProtocolError propagates."""
    reader = RequestReader()
    reader.feed(data)
    found = []
    while (request := reader.next()) is not None:
        found.append(bytes(reader.buffer[request[0] : request[1]]))
    return found


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        (b"*20000000000\r\n", "Protocol error: invalid multibulk length"),
        (b"*2147483648\r\n", "Protocol error: invalid multibulk length"),
        (b"*4294967295\r\n", "Protocol error: invalid multibulk length"),
        (b"*x\r\n", "Protocol error: invalid multibulk length"),
        (b"*01\r\n$4\r\nPING\r\n", "Protocol error: invalid multibulk length"),
        (b"*-0\r\n", "Protocol error: invalid multibulk length"),
        (b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\nfooz\r\n", "Protocol error: expected '$', got 'f'"),
        (b"*1\r\n$-10\r\n", "Protocol error: invalid bulk length"),
        (b"*1\r\n$+4\r\nPING\r\n", "Protocol error: invalid bulk length"),
        (b"*1\r\n$04\r\nPING\r\n", "Protocol error: invalid bulk length"),
        (b"*1\r\n$%d\r\n" % (PROTO_MAX_BULK_LEN + 1), "Protocol error: invalid bulk length"),
        (b"x" * (PROTO_INLINE_MAX_SIZE + 1), "Protocol error: too big inline request"),
        (b"*" + b"1" * (PROTO_INLINE_MAX_SIZE + 1), "Protocol error: too big mbulk count string"),
        (
            b"*1\r\n$" + b"1" * (PROTO_INLINE_MAX_SIZE + 1),
            "Protocol error: too big bulk count string",
        ),
        (b'SET "a\r\n', "Protocol error: unbalanced quotes in request"),
        (b"ECHO 'a'b\r\n", "Protocol error: unbalanced quotes in request"),
    ],
)
def test_request_that_redis_rejects_raises_redis_error_text(stream: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as raised:
        read_all(stream)
    assert str(raised.value) == message


def test_requests_before_a_protocol_error_are_still_read() -> None:
    reader = RequestReader()
    reader.feed(b"PING\r\n*1\r\n$4\r\nPING\r\n*x\r\n")
    first = (reader.next(), reader.inline)
    second = (reader.next(), reader.inline)
    assert first == ((0, 6, b"PING", [b"PING"]), True)
    assert second == ((6, 20, b"PING", [b"PING"]), False)
    with pytest.raises(ProtocolError, match="invalid multibulk length"):
        reader.next()


@pytest.mark.parametrize("line", [b"PING\n", b"-\n", b":1\n", b"+x y\n", b"$x\n", b"_\n"])
def test_inline_command_ending_in_lf_is_read_whatever_byte_it_starts_with(line: bytes) -> None:
    # Redis runs `-\n` as the (unknown) command '-'; it must not wait for more bytes.
    reader = RequestReader()
    reader.feed(line)
    request = reader.next()
    assert request is not None
    assert request[:3] == (0, len(line), line.split()[0].upper())
    assert reader.inline


def test_bulk_of_exactly_512mb_is_announced_without_error() -> None:
    reader = RequestReader()
    reader.feed(b"*1\r\n$%d\r\nabc" % PROTO_MAX_BULK_LEN)
    assert reader.next() is None


def test_inline_request_just_under_64kb_without_newline_is_still_awaited() -> None:
    reader = RequestReader()
    reader.feed(b"x" * PROTO_INLINE_MAX_SIZE)
    assert reader.next() is None
    reader.feed(b"\r\n")
    request = reader.next()
    assert request is not None and request[1] == PROTO_INLINE_MAX_SIZE + 2


def test_negative_multibulk_and_empty_lines_are_skipped_like_redis() -> None:
    # Redis answers three PONGs to this and nothing for the rest.
    stream = b"*-10\r\nPING\r\n\r\n*0\r\n\n  \t \r\n*1\r\n$4\r\nPING\r\n*-1\r\nPING\n"
    reader = RequestReader()
    reader.feed(stream)
    names = []
    while (request := reader.next()) is not None:
        names.append(request[2])
    assert names == [b"PING", b"PING", b"PING"]
    assert reader.pending_bytes() == 0


def run_isolated(code: str, timeout: float = 3) -> str:
    """Run `code` in a fresh interpreter, so that a hang is bounded and cannot freeze pytest."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish within {timeout:.0f}s (an endless loop?)")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_inline_request_with_a_nul_byte_waits_like_redis_instead_of_looping() -> None:
    # Redis looks for the newline with strchr, which stops at NUL: it never answers this.
    out = run_isolated(
        """
        from proxy.resp import RequestReader
        reader = RequestReader()
        reader.feed(b"PING\\x00x\\r\\n")
        print(reader.next())
        """
    )
    assert out == "None"


@pytest.mark.parametrize("header", [b"*2147483647\r\n", b"*2147483648\r\n"])
def test_a_huge_array_header_allocates_nothing_up_front(header: bytes) -> None:
    # Redis reserves at most 1024 argument slots until the arguments come. The reader is
    # never freed here (os._exit): freeing billions of slots would take seconds.
    out = run_isolated(
        f"""
        import os, tracemalloc
        from proxy.resp import ProtocolError, RequestReader
        tracemalloc.start()
        reader = RequestReader()
        reader.feed({header!r})
        try:
            reader.next()
        except ProtocolError:
            pass
        print(tracemalloc.get_traced_memory()[1])
        os._exit(0)
        """,
        timeout=20,
    )
    assert int(out) < 16 * 1024 * 1024, f"{int(out) / 2**30:.1f} GiB allocated"


# --- inline commands: Redis's sdssplitargs ------------------------------------------------


@pytest.mark.parametrize(
    ("line", "args"),
    [
        (b"set a b", [b"set", b"a", b"b"]),
        (b"  a   b  ", [b"a", b"b"]),
        (b"a\tb", [b"a", b"b"]),
        (b"\x0ba", [b"a"]),  # isspace() skips \v between arguments...
        (b"a\x0bb", [b"a\x0bb"]),  # ...but inside a word only space, \t, \r, \n end it
        (b"a\x0cb", [b"a\x0cb"]),
        (b"", []),
        (b"   ", []),
        (b'"hello world"', [b"hello world"]),
        (b'"\\x41\\x42"', [b"AB"]),
        (b'"\\x4a\\x4A"', [b"JJ"]),
        (b'"\\x4"', [b"x4"]),  # not two hex digits: the backslash just escapes 'x'
        (b'"\\xZZ"', [b"xZZ"]),
        (b'"a\\nb"', [b"a\nb"]),
        (b'"\\t\\r\\b\\a\\z"', [b"\t\r\x08\x07z"]),
        (b'"\\"q\\""', [b'"q"']),
        (b'"\\\\"', [b"\\"]),
        (b"'it\\'s'", [b"it's"]),
        (b"'a\\nb'", [b"a\\nb"]),  # no escapes in single quotes but \'
        (b'a"b c"', [b"ab c"]),
        (b"x'y z'", [b"xy z"]),
        (b'""', [b""]),
        (b"''", [b""]),
        (b'"" x', [b"", b"x"]),
        (b'"a" "b"', [b"a", b"b"]),
        (b'"a"\x0b', [b"a"]),
        (b"'a'\tb", [b"a", b"b"]),
        (b'"a"b', None),  # a closing quote must be followed by a space
        (b"'a'b", None),
        (b'a"b c"d', None),
        (b'"abc', None),
        (b"'abc", None),
        (b'"a\\', None),
        (b"'\\\\'", None),
    ],
)
def test_split_args_matches_redis_sdssplitargs(line: bytes, args: list[bytes] | None) -> None:
    assert split_args(line) == args


def test_split_args_stops_at_a_nul_byte_like_sdssplitargs() -> None:
    # sdssplitargs reads a C string: NUL ends the line.
    out = run_isolated(
        """
        from proxy.resp import split_args
        print(split_args(b"a\\x00b"), split_args(b'"a\\x00b" c'))
        """
    )
    assert out == "[b'a'] None"
