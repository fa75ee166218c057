"""The fast paths of script calls, through a Session with no sockets: a repeated call of
an undeclared script is answered from what the proxy decided the first time, and a script
reply is opened through the decrypt cache and spliced; what a client, Redis and
`FIELDCRYPT SCRIPTS` see must be what they saw before either existed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy import resp
from proxy.app import build_state
from proxy.config import load_settings
from proxy.crypto import DECRYPT_CACHE_MAX_REPLY, generate_key
from proxy.scripts import (
    MAX_DECIDED_BYTES,
    MAX_DECIDED_KEYS,
    MAX_DECISIONS,
    ScriptBook,
    _ScriptReply,
)
from proxy.server import ProxyState
from proxy.session import Session

SET_IF_MISSING_FILE = (
    Path(__file__).parent.parent / "config" / "lua" / "set-if-missing-with-marker.lua"
)
LIST = b"return {1}"  # the body never runs here: Redis's replies are written by the tests
LIST_SHA = hashlib.sha1(LIST).hexdigest().encode()
PROTECTED = (b"imap", b"smtp", b"oauth2")
SET_IF_MISSING = {  # declared by its body file
    "name": "set-if-missing",
    "body_file": str(SET_IF_MISSING_FILE),
    "hash_key": 1,
    "field_values": [[1, 2], [3, 4]],
}


class Proxy:
    """A session of fieldcrypt built from a YAML config, fed bytes by hand."""

    def __init__(self, directory: Path, **config: Any) -> None:
        (directory / "key").write_text(generate_key() + "\n", encoding="ascii")
        config = {
            "keys": [{"secret_file": "key"}],
            "rules": [{"key": "iad:*", "fields": list(map(bytes.decode, PROTECTED))}],
            **config,
        }
        path = directory / "fieldcrypt.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        settings = load_settings(str(path), {}, {}, directory)
        self.state: ProxyState = build_state(settings, "redis://127.0.0.1:1")
        assert self.state.crypt is not None
        self.crypt = self.state.crypt
        self.upstream: list[bytes] = []
        self.client: list[bytes] = []
        self.session = Session(
            self.state.dispatch,
            lambda data: self.upstream.append(bytes(data)),
            lambda data: self.client.append(bytes(data)),
        )

    @property
    def book(self) -> ScriptBook:
        assert self.state.scripts is not None
        return self.state.scripts

    def send(self, *args: bytes) -> bytes:
        """What the proxy sent upstream for one request (b"" if it answered it)."""
        self.upstream.clear()
        self.session.client_data(resp.encode_request(list(args)))
        return b"".join(self.upstream)

    def reply(self, frame: bytes) -> bytes:
        """What the client got for the reply `frame` (and anything answered before it)."""
        self.session.upstream_data(frame)
        return self.answered()

    def answered(self) -> bytes:
        """What the client got since this was last asked."""
        got = b"".join(self.client)
        self.client.clear()
        return got

    def calls(self, sha: bytes) -> int:
        seen = self.book.seen.get(f"sha1 {sha.decode()}")
        return seen.calls if seen is not None else 0

    def seal(self, value: bytes, field: bytes, key: bytes | None = None) -> bytes:
        return self.crypt.keyring.encrypt(value, field, key)


def bulks(*items: bytes) -> bytes:
    return b"*%d\r\n" % len(items) + b"".join(b"$%d\r\n%s\r\n" % (len(i), i) for i in items)


def account_rows(proxy: Proxy, bound: bool = False) -> tuple[bytes, bytes]:
    """A list-accounts reply ({3, 0, {HGETALL row, ...}}) as Redis sends it, and as the
    client must get it."""
    stored_rows, plain_rows = [], []
    for number in (1, 2, 3):
        key = b"iad:%d" % number
        stored: list[bytes] = []
        plain: list[bytes] = []
        for field in (*PROTECTED, b"name"):
            value = b"%s-secret-%d" % (field, number)
            stored += [field, proxy.seal(value, field, key if bound else None)]
            plain += [field, value]
            if field == b"name":
                stored[-1] = value
        stored_rows.append(bulks(*stored))
        plain_rows.append(bulks(*plain))
    head = b"*3\r\n:3\r\n:0\r\n*3\r\n"
    return head + b"".join(stored_rows), head + b"".join(plain_rows)


# --- Decisions ---------------------------------------------------------------------------


def test_a_repeated_undeclared_call_naming_a_protected_key_is_counted_every_time(
    tmp_path: Path,
) -> None:
    proxy = Proxy(tmp_path)
    request = (b"EVALSHA", LIST_SHA, b"2", b"session:1", b"iad:1", b"x")
    for _ in range(5):
        assert proxy.send(*request) == resp.encode_request(list(request))
    proxy.send(b"evalsha", LIST_SHA, b"1", b"iad:2")  # another spelling, another key

    assert proxy.calls(LIST_SHA) == 6
    assert proxy.book.seen[f"sha1 {LIST_SHA.decode()}"].sample_key == "iad:1"


def test_a_call_naming_no_protected_key_is_not_recorded_however_often(tmp_path: Path) -> None:
    proxy = Proxy(tmp_path)
    for _ in range(3):
        proxy.send(b"EVALSHA", LIST_SHA, b"1", b"session:1")
        proxy.send(b"EVALSHA_RO", LIST_SHA, b"1", b"iad:1")  # read-only: never recorded

    assert proxy.calls(LIST_SHA) == 0


def test_refuse_policy_refuses_and_counts_every_repeated_call(tmp_path: Path) -> None:
    proxy = Proxy(tmp_path, script_policy="refuse")
    for _ in range(3):
        assert proxy.send(b"EVALSHA", LIST_SHA, b"1", b"iad:1") == b""
        refusal = proxy.answered()
        assert refusal.startswith(b"-ERR fieldcrypt: script sha1 ")
        assert b"protected key 'iad:1'" in refusal
    # Only the call naming a protected key is refused, and only in the db the rule covers.
    assert proxy.send(b"EVALSHA", LIST_SHA, b"1", b"session:1") != b""

    assert proxy.calls(LIST_SHA) == 3


def test_a_call_is_decided_again_in_another_db(tmp_path: Path) -> None:
    proxy = Proxy(tmp_path, rules=[{"key": "iad:*", "fields": ["imap"], "db": 0}])
    proxy.send(b"EVALSHA", LIST_SHA, b"1", b"iad:1")
    proxy.send(b"SELECT", b"1")
    proxy.send(b"EVALSHA", LIST_SHA, b"1", b"iad:1")  # no rule covers db 1
    proxy.send(b"SELECT", b"0")
    proxy.send(b"EVALSHA", LIST_SHA, b"1", b"iad:1")

    assert proxy.calls(LIST_SHA) == 2


def test_a_remembered_sha1_becomes_declared_once_script_load_shows_its_body(
    tmp_path: Path,
) -> None:
    proxy = Proxy(tmp_path, scripts=[SET_IF_MISSING])
    body = b"\n" + SET_IF_MISSING_FILE.read_bytes().strip() + b"\n\n"  # another SHA1
    sha = hashlib.sha1(body).hexdigest().encode()
    call = (b"EVALSHA", sha, b"1", b"iad:5", b"imap", b"imap-5", b"imapSetBy", b"me")

    assert proxy.send(*call) == b""  # never seen: NOSCRIPT, once
    assert proxy.answered().startswith(b"-NOSCRIPT")
    for _ in range(2):  # undeclared, forwarded as it is, and remembered so
        assert proxy.send(*call) == resp.encode_request(list(call))
    proxy.send(b"SCRIPT", b"LOAD", body)
    sent = proxy.send(*call)

    assert proxy.calls(sha) == 2
    assert b"imap-5" not in sent and b"$fc1$" in sent  # declared now: sealed
    assert b"imapSetBy" in sent and b"me" in sent


def test_calls_with_many_keys_or_a_long_body_are_decided_every_time_and_never_kept(
    tmp_path: Path,
) -> None:
    proxy = Proxy(tmp_path, script_policy="refuse")
    keys = [b"session:%d" % n for n in range(MAX_DECIDED_KEYS)] + [b"iad:1"]
    long_body = b"return 1 --" + b"x" * MAX_DECIDED_BYTES
    for _ in range(2):
        assert proxy.send(b"EVALSHA", LIST_SHA, b"%d" % len(keys), *keys) == b""
        assert b"protected key 'iad:1'" in proxy.answered()
        assert proxy.send(b"EVAL", long_body, b"1", b"iad:1") == b""
        assert b"protected key 'iad:1'" in proxy.answered()
    scripts = proxy.state.dispatch[b"EVALSHA"].__self__  # type: ignore[attr-defined]

    assert proxy.calls(LIST_SHA) == 2
    assert proxy.calls(hashlib.sha1(long_body).hexdigest().encode()) == 2
    assert scripts.decisions == {}


@pytest.mark.parametrize("numkeys", [b"-1", b"x", b"3", b"1.0", b"99999999999999999999"])
def test_a_numkeys_redis_refuses_goes_up_as_it_came_and_is_not_recorded(
    tmp_path: Path, numkeys: bytes
) -> None:
    proxy = Proxy(tmp_path, script_policy="refuse")
    call = (b"EVALSHA", LIST_SHA, numkeys, b"iad:1", b"iad:2")

    assert proxy.send(*call) == resp.encode_request(list(call))  # Redis answers the error
    assert proxy.calls(LIST_SHA) == 0


def test_a_call_without_numkeys_goes_up_as_it_came(tmp_path: Path) -> None:
    proxy = Proxy(tmp_path, script_policy="refuse")
    for call in ((b"EVALSHA", LIST_SHA), (b"FCALL",)):
        assert proxy.send(*call) == resp.encode_request(list(call))


def test_decisions_stay_bounded(tmp_path: Path) -> None:
    proxy = Proxy(tmp_path)
    for number in range(MAX_DECISIONS + 10):
        proxy.send(b"EVALSHA", b"%040x" % number, b"1", b"session:1")
    scripts = proxy.state.dispatch[b"EVALSHA"].__self__  # type: ignore[attr-defined]

    assert 0 < len(scripts.decisions) <= MAX_DECISIONS


# --- Replies ------------------------------------------------------------------------------


def test_list_accounts_rows_are_opened_every_time_and_counted_exactly(tmp_path: Path) -> None:
    rules = [{"key": "iad:*", "fields": list(map(bytes.decode, PROTECTED))}]
    proxy = Proxy(tmp_path, rules=rules)
    stored, plain = account_rows(proxy)
    for round_number in (1, 2, 3):
        proxy.send(b"EVALSHA", LIST_SHA, b"3", b"iad:1", b"iad:2", b"iad:3")
        assert proxy.reply(stored) == plain
        assert proxy.crypt.counts["decrypted"] == 9 * round_number
    assert not proxy.crypt.failures


def test_key_bound_rows_of_a_call_naming_several_keys_are_never_opened_by_guessing(
    tmp_path: Path,
) -> None:
    # {total, skip, {rows}} doesn't say which key a row is of: a key-bound value is not
    # tried under each key in KEYS (a value planted in iad:1 from iad:2 would open).
    rules = [{"key": "iad:*", "fields": list(map(bytes.decode, PROTECTED)), "bind_key": True}]
    proxy = Proxy(tmp_path, rules=rules)
    stored, _ = account_rows(proxy, bound=True)
    proxy.send(b"EVALSHA", LIST_SHA, b"3", b"iad:1", b"iad:2", b"iad:3")
    got = proxy.reply(stored)
    assert got.startswith(b"-ERR fieldcrypt: cannot decrypt a value in a script reply")
    assert b"secret" not in got


def test_a_ciphertext_twice_in_a_reply_is_opened_in_both_places_and_counted_once(
    tmp_path: Path,
) -> None:
    proxy = Proxy(tmp_path)
    sealed = proxy.seal(b"imap-secret", b"imap")
    proxy.send(b"EVALSHA", LIST_SHA, b"1", b"iad:1")

    got = proxy.reply(b"*2\r\n" + bulks(b"imap", sealed) + bulks(b"imap", sealed))

    assert got == b"*2\r\n" + bulks(b"imap", b"imap-secret") * 2
    assert proxy.crypt.counts["decrypted"] == 1


def test_a_ciphertext_inside_another_value_stays_as_it_is(tmp_path: Path) -> None:
    proxy = Proxy(tmp_path)
    sealed = proxy.seal(b"imap-secret", b"imap")
    proxy.send(b"EVALSHA", LIST_SHA, b"1", b"iad:1")

    got = proxy.reply(bulks(b"imap", sealed, b"note", b"copy:" + sealed))

    assert got == bulks(b"imap", b"imap-secret", b"note", b"copy:" + sealed)


def test_a_value_the_shape_names_opens_under_that_name_only(tmp_path: Path) -> None:
    # smtp's envelope copied into imap: HGET iad:1 imap refuses it, and so does a script
    # reply that shows it as imap (it used to open under the candidate "smtp").
    proxy = Proxy(tmp_path)
    smtp = proxy.seal(b"smtp-secret", b"smtp")
    proxy.send(b"EVALSHA", LIST_SHA, b"1", b"iad:1")
    assert proxy.reply(bulks(b"smtp", smtp)) == bulks(b"smtp", b"smtp-secret")  # cached now

    for _ in range(2):
        proxy.send(b"EVALSHA", LIST_SHA, b"1", b"iad:1")
        got = proxy.reply(bulks(b"imap", smtp))
        assert got.startswith(b"-ERR fieldcrypt: cannot decrypt a value in a script reply")
        assert b"smtp-secret" not in got


def test_a_value_that_opens_under_no_name_is_an_error_every_time(tmp_path: Path) -> None:
    proxy = Proxy(tmp_path)
    other = proxy.seal(b"elsewhere", b"password")  # a field no rule of iad:* names

    for _ in range(2):
        proxy.send(b"EVALSHA", LIST_SHA, b"1", b"iad:1")
        got = proxy.reply(bulks(b"imap", other))
        assert got.startswith(b"-ERR fieldcrypt: cannot decrypt a value in a script reply")
        assert b"elsewhere" not in got


def test_a_ciphertext_written_as_a_bulk_string_inside_another_value_stays_as_it_is(
    tmp_path: Path,
) -> None:
    # The bytes of a whole bulk string, ciphertext and all, inside another value: only
    # the value hiredis read as an element is opened, the copy inside stays byte for byte.
    proxy = Proxy(tmp_path)
    sealed = proxy.seal(b"imap-secret", b"imap")
    inner = b"dump\r\n$%d\r\n%s\r\nend" % (len(sealed), sealed)
    for _ in range(2):
        proxy.send(b"EVALSHA", LIST_SHA, b"1", b"iad:1")
        got = proxy.reply(bulks(b"imap", sealed, b"note", inner))
        assert got == bulks(b"imap", b"imap-secret", b"note", inner)


# --- Whole replies remembered ------------------------------------------------------------


def test_a_repeated_reply_is_answered_whole_from_the_cache_with_exact_counts(
    tmp_path: Path,
) -> None:
    proxy = Proxy(tmp_path)
    stored, plain = account_rows(proxy)
    ring = proxy.crypt.keyring
    for round_number in (1, 2, 3):
        proxy.send(b"EVALSHA", LIST_SHA, b"3", b"iad:1", b"iad:2", b"iad:3")
        assert proxy.reply(stored) == plain
        assert proxy.crypt.counts["decrypted"] == 9 * round_number
    assert ring.recall_reply is not None
    assert len([k for k in ring._replies or () if k[0] == stored]) == 1


def test_a_remembered_reply_opens_only_for_a_call_with_the_same_keys(tmp_path: Path) -> None:
    # Bound to its key, the row opens for the call that names iad:1. The same bytes
    # returned to a call naming another key (a script reading keys it doesn't declare)
    # must fail as a fresh decrypt would, not be answered from the first call's result.
    rules = [{"key": "iad:*", "fields": list(map(bytes.decode, PROTECTED)), "bind_key": True}]
    proxy = Proxy(tmp_path, rules=rules)
    sealed = proxy.seal(b"imap-secret", b"imap", b"iad:1")
    proxy.send(b"EVALSHA", LIST_SHA, b"1", b"iad:1")
    assert proxy.reply(bulks(b"imap", sealed)) == bulks(b"imap", b"imap-secret")

    proxy.send(b"EVALSHA", LIST_SHA, b"1", b"iad:9")
    got = proxy.reply(bulks(b"imap", sealed))
    assert got.startswith(b"-ERR fieldcrypt: cannot decrypt a value in a script reply")
    assert b"secret" not in got


def test_a_reply_with_a_value_left_raw_is_never_remembered(tmp_path: Path) -> None:
    proxy = Proxy(tmp_path, on_decrypt_error="raw")
    other = proxy.seal(b"elsewhere", b"password")  # under "note", no name fits
    imap = proxy.seal(b"imap-secret", b"imap")
    for round_number in (1, 2, 3):
        proxy.send(b"EVALSHA", LIST_SHA, b"1", b"iad:1")
        got = proxy.reply(bulks(b"imap", imap, b"note", other))
        assert got == bulks(b"imap", b"imap-secret", b"note", other)
        assert sum(proxy.crypt.failures.values()) == round_number  # judged every time
    assert not proxy.crypt.keyring._replies


def test_with_the_cache_off_replies_are_opened_every_time(tmp_path: Path) -> None:
    proxy = Proxy(tmp_path, decrypt_cache_entries=0)
    stored, plain = account_rows(proxy)
    for _ in range(2):
        proxy.send(b"EVALSHA", LIST_SHA, b"3", b"iad:1", b"iad:2", b"iad:3")
        assert proxy.reply(stored) == plain
    assert proxy.crypt.keyring.recall_reply is None
    assert proxy.crypt.counts["decrypted"] == 18


# --- Handlers leave their arguments as they came -------------------------------------------


def test_handlers_that_seal_values_leave_the_arguments_they_were_given(tmp_path: Path) -> None:
    # The session checks a request against its arguments after its handler has run.
    proxy = Proxy(tmp_path, scripts=[SET_IF_MISSING])
    dispatch = proxy.state.dispatch
    sha = hashlib.sha1(SET_IF_MISSING_FILE.read_bytes()).hexdigest().encode()
    calls = [
        [b"HSET", b"iad:1", b"imap", b"imap-secret", b"name", b"ada"],
        [b"HMSET", b"iad:1", b"smtp", b"smtp-secret"],
        [b"HSETNX", b"iad:1", b"oauth2", b"token"],
        [b"HSETEX", b"iad:1", b"EX", b"60", b"FIELDS", b"1", b"imap", b"imap-secret"],
        [b"EVALSHA", sha, b"1", b"iad:2", b"imap", b"imap-2", b"imapSetBy", b"me"],
        [b"EVAL", SET_IF_MISSING_FILE.read_bytes(), b"1", b"iad:3", b"imap", b"imap-3", b"m", b"x"],
    ]
    for args in calls:
        given = list(args)
        outcome = dispatch[args[0]](proxy.session, args)
        assert args == given
        assert outcome is not None and outcome.request is not None  # type: ignore[union-attr]
        assert b"$fc1$" in outcome.request  # type: ignore[union-attr]


def test_a_reply_over_the_size_bound_is_opened_every_time_and_never_kept(tmp_path: Path) -> None:
    proxy = Proxy(tmp_path)
    imap = proxy.seal(b"imap-secret", b"imap")
    big = b"n" * (DECRYPT_CACHE_MAX_REPLY + 1)
    for round_number in (1, 2):
        proxy.send(b"EVALSHA", LIST_SHA, b"1", b"iad:1")
        got = proxy.reply(bulks(b"imap", imap, b"notes", big))
        assert got == bulks(b"imap", b"imap-secret", b"notes", big)
        assert proxy.crypt.counts["decrypted"] == round_number
    assert not proxy.crypt.keyring._replies


# --- The splice agrees with the lossless tree ------------------------------------------


def _reply_strategy(envelopes: list[bytes]) -> st.SearchStrategy[resp.Value]:
    """Script replies in RESP2 and RESP3 where envelopes stand as whole bulk strings, inside
    other bulk strings (with a bulk header of their own around them), as status replies,
    as error replies, as verbatim strings and as map keys."""
    names = st.sampled_from([b"imap", b"smtp", b"oauth2", b"note", b"ok"])
    envelope = st.sampled_from(envelopes)
    inside = st.builds(
        lambda e, pre, post: pre + b"$%d\r\n" % len(e) + e + b"\r\n" + post,
        envelope,
        st.sampled_from([b"", b"pre", b"\r\n"]),
        st.sampled_from([b"", b"post", b"\r\n"]),
    )
    text = names | envelope | inside
    leaf = (
        st.builds(lambda d: resp.Blob(36, d), text)
        | st.builds(lambda d: resp.Simple(b"+" + d + b"\r\n"), names | envelope)
        | st.builds(lambda d: resp.Simple(b"-ERR " + d + b"\r\n"), names | envelope)
        | st.builds(lambda d: resp.Blob(61, b"txt:" + d), text)
        | st.just(resp.Simple(b":7\r\n"))
        | st.just(None)
    )

    def aggregates(children: st.SearchStrategy[resp.Value]) -> st.SearchStrategy[resp.Value]:
        pairs = st.lists(st.tuples(leaf, children), max_size=4)
        return st.builds(
            lambda kind, items: resp.Aggregate(kind, items),
            st.sampled_from([42, 126]),
            st.lists(children, max_size=6),
        ) | st.builds(lambda p: resp.Aggregate(37, [x for kv in p for x in kv]), pairs)

    return st.recursive(leaf, aggregates, max_leaves=12)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), keys=st.sampled_from([[b"iad:1"], [b"iad:1", b"iad:2"], []]))
def test_a_spliced_reply_is_the_tree_walks_reply_and_well_formed(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, keys: list[bytes]
) -> None:
    proxy = Proxy(tmp_path_factory.mktemp("splice"), on_decrypt_error="raw")
    envelopes = [
        proxy.seal(b"imap-secret", b"imap"),
        proxy.seal(b"smtp-secret", b"smtp", b"iad:1"),
        proxy.seal(b"oauth2-secret", b"oauth2", b"iad:2"),
    ]
    frame = resp.encode_value(data.draw(_reply_strategy(envelopes)))
    scripts = proxy.state.dispatch[b"EVALSHA"].__self__  # type: ignore[attr-defined]
    reply = _ScriptReply(scripts, 0, None, keys, [])

    got = reply.transform(proxy.session, frame)

    assert got == _ScriptReply(scripts, 0, None, keys, []).through_tree(frame)
    _, end = resp.decode(got)
    assert end == len(got)
