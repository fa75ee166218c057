"""The session's fast paths (proxy/session.py, proxy/resp.py), with no server: runs of
requests that go upstream as they came, and runs of replies that hiredis counts, must
give the same bytes and the same reply order however the stream is split, whatever
the values hold (RESP-looking bytes, `~`, `|`, CRLF), and wherever a read ends: inside
a value, between an aggregate's elements, or on a lone type byte."""

from __future__ import annotations

import itertools
import re

import hiredis
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.resp import _resp2_end, encode_request
from proxy.session import Answer, Forward, Outcome, Session, base_dispatch
from tests.test_resp import BINARY, INLINE_WORD, LINE, SKIPPED, blob, split_points

NEEDLE = b"$fc1$"  # what XMARK's transform waits for (as scripts wait for the header)
# Values that look like RESP, so a wrong guess about where a request ends shows.
RESPISH = st.sampled_from(
    [
        encode_request([b"PING"]),
        encode_request([b"SET", b"k", b"v"])[:-3],
        b"\r\n~2\r\n",
        b"\n|1\r\n",
        b"*3\r\n",
        b"*1",
        b"$",
        b"*99999999\r\n",
        NEEDLE,
    ]
)
VALUE = st.one_of(BINARY, RESPISH, st.tuples(BINARY, RESPISH).map(b"".join))
NAMES = st.sampled_from([b"GET", b"get", b"Set", b"PING", b"ECHO", b"SELECT", b"HELLO"])


@st.composite
def request_streams(draw: st.DrawFn) -> list[tuple[bytes, bytes] | bytes]:
    """Array requests as (bytes, what goes upstream), inline ones, and skipped bytes."""
    items: list[tuple[bytes, bytes] | bytes] = []
    for _ in range(draw(st.integers(1, 24))):
        kind = draw(st.sampled_from(["array"] * 6 + ["inline", "skipped", "aggregate-like"]))
        if kind == "array":
            args = [draw(NAMES), *draw(st.lists(VALUE, max_size=3))]
            request = encode_request(args)
            items.append((request, request))
        elif kind == "inline":
            words = draw(st.lists(INLINE_WORD, max_size=2))
            args = [b"ECHO", *[word.encode() for word in words]]
            items.append((b" ".join(args) + b"\r\n", encode_request(args)))
        elif kind == "aggregate-like":
            # Lines that hiredis would read as one set or attribute of bulk strings, and
            # Redis reads as inline commands, one per line.
            words = draw(st.lists(st.sampled_from([b"PING", b"GET"]), min_size=1, max_size=2))
            head = draw(st.sampled_from([b"~", b"|"])) + b"%d" % len(words)
            lines = [head, *(part for word in words for part in (b"$%d" % len(word), word))]
            items += [(line + b"\r\n", encode_request([line])) for line in lines]
        else:
            items.append(draw(SKIPPED))
    return items


def feed_requests(session: Session, stream: bytes, points: list[int]) -> None:
    for left, right in itertools.pairwise(points):
        session.client_data(stream[left:right])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=request_streams(), data=st.data())
def test_requests_go_upstream_as_they_came_however_split(
    items: list[tuple[bytes, bytes] | bytes], data: st.DataObject
) -> None:
    stream = b"".join(item if isinstance(item, bytes) else item[0] for item in items)
    expected = b"".join(item if isinstance(item, bytes) else item[1] for item in items)
    requests = sum(1 for item in items if not isinstance(item, bytes))
    upstream: list[bytes] = []
    session = Session(base_dispatch(), lambda b: upstream.append(bytes(b)), lambda b: None)
    feed_requests(session, stream, split_points(data, len(stream)))

    assert b"".join(upstream) == expected
    assert session.commands == requests
    assert session.closing is None
    assert not session.requests.pending_bytes()


def judging_dispatch(asked: list[bytes]) -> dict[bytes, object]:
    """Handlers that note each request they are asked about (by its last argument) and
    answer by name: WATCHME passes as it came, XPASS passes with its reply rewritten,
    XREWRITE is sent as PING, XLOCAL is answered by the proxy."""

    def note(args: list[bytes]) -> None:
        asked.append(args[-1])

    def watch(session: Session, args: list[bytes]) -> Outcome:
        note(args)
        return None

    def xpass(session: Session, args: list[bytes]) -> Outcome:
        note(args)
        return Forward(transform=lambda _session, _frame: REWRITTEN)

    def xrewrite(session: Session, args: list[bytes]) -> Outcome:
        note(args)
        return Forward(request=encode_request([b"PING"]))

    def xlocal(session: Session, args: list[bytes]) -> Outcome:
        note(args)
        return Answer(b"+LOCAL\r\n")

    return {
        **base_dispatch(),
        b"WATCHME": watch,
        b"XPASS": xpass,
        b"XREWRITE": xrewrite,
        b"XLOCAL": xlocal,
    }


def judged_session() -> tuple[Session, list[bytes], list[bytes], list[bytes]]:
    """A session with judging_dispatch: it, what its handlers were asked about, and what
    went upstream and to the client."""
    asked: list[bytes] = []
    upstream: list[bytes] = []
    client: list[bytes] = []
    session = Session(
        judging_dispatch(asked),  # type: ignore[arg-type]
        lambda b: upstream.append(bytes(b)),
        lambda b: client.append(bytes(b)),
    )
    return session, asked, upstream, client


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    names=st.lists(
        st.sampled_from([b"GET", b"watchme", b"XPASS", b"xrewrite", b"XLOCAL", b"SELECT"]),
        min_size=1,
        max_size=24,
    ),
    values=st.lists(VALUE, min_size=24, max_size=24),
    data=st.data(),
)
def test_handlers_are_asked_once_each_and_their_requests_and_replies_keep_their_order(
    names: list[bytes], values: list[bytes], data: st.DataObject
) -> None:
    # Requests a handler lets pass stay in the read's run; the others are cut out of it.
    # However the stream is split, each handler is asked once per request, in order,
    # what goes upstream is each request as it came or as its handler rewrote it, and
    # every reply comes back in its request's place.
    requests = [
        encode_request([name, b"%d" % i] if name == b"SELECT" else [name, b"%d" % i, value])
        for i, (name, value) in enumerate(zip(names, values, strict=False))
    ]
    session, asked, upstream, client = judged_session()
    stream = b"".join(requests)
    feed_requests(session, stream, split_points(data, len(stream)))

    judged = [(i, name.upper()) for i, name in enumerate(names) if name.upper() != b"GET"]
    assert asked == [values[i] for i, name in judged if name != b"SELECT"]
    sent = [
        encode_request([b"PING"]) if name == b"xrewrite" else request
        for name, request in zip(names, requests, strict=True)
        if name != b"XLOCAL"
    ]
    assert b"".join(upstream) == b"".join(sent)
    assert session.commands == len(names)
    selected = [i for i, name in enumerate(names) if name == b"SELECT"]
    assert session.db == (selected[-1] if selected else 0)  # followed as it was sent

    replies = [b":%d\r\n" % i for i, name in enumerate(names) if name != b"XLOCAL"]
    for left, right in itertools.pairwise(split_points(data, len(b"".join(replies)))):
        session.upstream_data(b"".join(replies)[left:right])
    expected = [
        b"+LOCAL\r\n" if name == b"XLOCAL" else REWRITTEN if name == b"XPASS" else b":%d\r\n" % i
        for i, name in enumerate(names)
    ]
    assert b"".join(client) == b"".join(expected)
    assert not session.pending


def test_requests_a_handler_lets_pass_join_the_plain_run_around_them() -> None:
    # A read of plain and passing requests is one run in the queue (the latency sample
    # included), so their replies are counted by hiredis in one go, not framed in Python.
    session, asked, upstream, _client = judged_session()
    read = b"".join(encode_request([b"GET" if i % 3 else b"WATCHME", b"%d" % i]) for i in range(40))
    session.client_data(read)
    assert upstream == [read]
    assert len(asked) == 14
    assert len(session.pending) == 1
    session.client_data(encode_request([b"XPASS", b"k", b"v"]) + read)
    assert len(session.pending) == 3  # the run, XPASS's transform, the next run


def test_a_request_rewritten_by_its_handler_is_placed_without_the_strict_parser() -> None:
    # The request as it came is what next() checks (handlers leave their arguments as
    # they are), so the reader stays on hiredis.
    session, asked, upstream, _client = judged_session()
    for i in range(3):
        session.client_data(encode_request([b"XREWRITE", b"k", b"v%d" % i]))
    assert asked == [b"v0", b"v1", b"v2"]
    assert upstream == [encode_request([b"PING"])] * 3
    assert session.requests._fast


@pytest.mark.parametrize("name", [b"WATCHME", b"XPASS", b"XREWRITE", b"XLOCAL"])
@pytest.mark.parametrize("element", [b"+x\r\n", b":1\r\n", b"*1\r\n$1\r\nx\r\n"])
def test_a_handled_request_with_an_element_redis_refuses_is_refused_as_redis_would(
    name: bytes, element: bytes
) -> None:
    # hiredis reads `+x` as b"x" and `:1` as 1 inside a request; Redis answers a protocol
    # error. A request its handler lets pass goes as it came (Redis answers that error
    # itself) or, if its handler never got to see it, is refused by the proxy; one its
    # handler would change or answer is refused by the proxy, never made valid.
    session, asked, upstream, client = judged_session()
    request = b"*3\r\n$%d\r\n%s\r\n$1\r\nk\r\n%s" % (len(name), name, element)
    session.client_data(request)

    refused = b"".join(client).startswith(b"-ERR Protocol error: expected '$', got ")
    if name in (b"XREWRITE", b"XLOCAL") or element != b"+x\r\n":
        assert refused and session.closing == "protocol error"
        assert upstream == []
    else:
        assert asked == [b"x"]
        assert b"".join(upstream) == request and not refused


def test_a_read_ending_between_the_elements_of_a_request_holds_it_back() -> None:
    # hiredis has taken in "*3\r\n$3\r\nSET\r\n" and says it has nothing left unread.
    request = encode_request([b"SET", b"key", b"value"])
    upstream: list[bytes] = []
    session = Session(base_dispatch(), lambda b: upstream.append(bytes(b)), lambda b: None)
    session.client_data(encode_request([b"PING"]) + request[:13])
    assert b"".join(upstream) == encode_request([b"PING"])
    session.client_data(request[13:])
    assert b"".join(upstream) == encode_request([b"PING"]) + request
    assert session.commands == 2


# --- replies -----------------------------------------------------------------------------

RESP2_LEAVES = st.one_of(
    LINE.map(lambda text: b"+" + text + b"\r\n"),
    LINE.map(lambda text: b"-ERR " + text + b"\r\n"),
    st.integers(-(2**63), 2**63 - 1).map(lambda n: b":%d\r\n" % n),
    st.one_of(BINARY, RESPISH).map(lambda data: blob(b"$", data)),
    st.sampled_from([b"$-1\r\n", b"*-1\r\n", b"*0\r\n"]),
)
RESP2_VALUES = st.recursive(
    RESP2_LEAVES,
    lambda children: st.lists(children, max_size=5).map(
        lambda items: b"*%d\r\n" % len(items) + b"".join(items)
    ),
    max_leaves=12,
)
REWRITTEN = b"+rewritten\r\n"


def rewriting_dispatch() -> dict[bytes, object]:
    """XFORM's reply is rewritten, and XMARK's when it holds NEEDLE (never an error
    reply); every other reply passes."""

    def xform(session: Session, args: list[bytes]) -> Outcome:
        return Forward(transform=lambda _session, _frame: REWRITTEN)

    def xmark(session: Session, args: list[bytes]) -> Outcome:
        return Forward(transform=lambda _session, _frame: REWRITTEN, only_with=NEEDLE)

    return {**base_dispatch(), b"XFORM": xform, b"XMARK": xmark}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    replies=st.lists(
        st.tuples(st.sampled_from([b"GET", b"XFORM", b"XMARK"]), RESP2_VALUES),
        min_size=1,
        max_size=30,
    ),
    data=st.data(),
)
def test_replies_pass_or_are_rewritten_in_order_however_split(
    replies: list[tuple[bytes, bytes]], data: st.DataObject
) -> None:
    requests = b"".join(encode_request([name, b"k"]) for name, _ in replies)
    stream = b"".join(reply for _, reply in replies)
    expected = b"".join(
        REWRITTEN
        if not reply.startswith(b"-")
        and (name == b"XFORM" or (name == b"XMARK" and NEEDLE in reply))
        else reply
        for name, reply in replies
    )
    client: list[bytes] = []
    session = Session(
        rewriting_dispatch(),  # type: ignore[arg-type]
        lambda b: None,
        lambda b: client.append(bytes(b)),
    )
    session.client_data(requests)
    for left, right in itertools.pairwise(split_points(data, len(stream))):
        session.upstream_data(stream[left:right])

    assert b"".join(client) == expected
    assert not session.pending


def test_a_read_ending_on_a_lone_type_byte_is_counted_once_the_reply_is_whole() -> None:
    # hiredis takes in the "*" and reports nothing unread: the reply is not over.
    client: list[bytes] = []
    session = Session(base_dispatch(), lambda b: None, lambda b: client.append(bytes(b)))
    session.client_data(encode_request([b"GET", b"a"]) + encode_request([b"LRANGE", b"l"]))
    session.upstream_data(b"$1\r\nx\r\n*")
    assert len(session.pending) == 1
    session.upstream_data(b"2\r\n$1\r\na\r\n")
    assert len(session.pending) == 1
    session.upstream_data(b"$1\r\nb\r\n")
    assert b"".join(client) == b"$1\r\nx\r\n*2\r\n$1\r\na\r\n$1\r\nb\r\n"
    assert not session.pending


@pytest.mark.parametrize("cut", [b"*", b"*2\r\n", b"*2\r\n$1\r\na\r\n"])
def test_a_rewritten_reply_followed_by_part_of_the_next_is_framed_exactly(cut: bytes) -> None:
    # hiredis reads XFORM's reply and takes in the start of the array after it, leaving
    # nothing unread: the probe for "does the buffer end here" goes into that array, so
    # the reader must be started again from the array's first byte.
    client: list[bytes] = []
    session = Session(
        rewriting_dispatch(),  # type: ignore[arg-type]
        lambda b: None,
        lambda b: client.append(bytes(b)),
    )
    session.client_data(encode_request([b"XFORM", b"k"]) + encode_request([b"LRANGE", b"l"]))
    array = b"*2\r\n$1\r\na\r\n$1\r\nb\r\n"
    session.upstream_data(b"*1\r\n$1\r\nx\r\n" + cut)
    assert b"".join(client) == REWRITTEN
    session.upstream_data(array[len(cut) :])
    assert b"".join(client) == REWRITTEN + array
    assert not session.pending


@settings(max_examples=300, deadline=None)
@given(reply=RESP2_VALUES, after=st.sampled_from([b"", b"+OK\r\n", b"*1\r\n$1\r\nx\r\n"]))
def test_a_reply_end_worked_out_from_what_hiredis_read_is_exact_or_not_given(
    reply: bytes, after: bytes
) -> None:
    # The end is given only when certain: never a wrong one, and always for the replies
    # Redis sends most (bulk strings and arrays of them, integers, nulls). Status and
    # error lines inside an array go to the Python framer.
    buf = b"+before\r\n" + reply + after
    reader = hiredis.Reader()
    reader.feed(reply)
    end = _resp2_end(buf, 9, reader.gets())
    assert end in (-1, 9 + len(reply))
    if not re.search(rb"(^|\n)[-+]", reply):  # no status or error line anywhere
        assert end == 9 + len(reply)
