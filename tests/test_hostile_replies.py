"""Someone who can write to Redis moves or plants values; a client of the proxy sends
what it likes. Against real servers: script replies keep the field and key binding
HGET keeps, require_encrypted has no side door through scripts or SORT, a reply is
rewritten only where whole values are, and what clients can make the proxy remember or
log stays bounded.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis
import yaml
from redis.exceptions import ResponseError

from proxy import resp
from proxy.crypto import HEADER_PREFIX, generate_key
from proxy.scripts import MAX_SEEN, OTHER
from tests.servers import ConfiguredProxy, EmbeddedServer, ServeProcess, Wire, free_port

HGETALL_ONE = "return redis.call('HGETALL', KEYS[1])"
HGETALL_ONE_RESP3 = "redis.setresp(3); return redis.call('HGETALL', KEYS[1])"
HGETALL_TWO = "return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}"
IAD = ["imap", "smtp", "oauth2"]
MODES = ["alone", "pipelined", "multi"]


@pytest.fixture
def fc(upstream: EmbeddedServer, tmp_path: Path, upstream_mode: str) -> Iterator[ConfiguredProxy]:
    handle = ConfiguredProxy(upstream, tmp_path, upstream_mode)
    handle.direct.flushall()
    yield handle
    handle.close()


def start(fc: ConfiguredProxy, rules: list[dict[str, Any]], **config: Any) -> None:
    fc.start({"keys": fc.key_entries([fc.key_a]), "rules": rules, **config})


def run(client: redis.Redis, mode: str, *command: Any) -> Any:
    """`command`'s reply (or the ResponseError it gave) sent alone, pipelined between
    two other commands, or inside MULTI/EXEC."""
    if mode == "alone":
        try:
            return client.execute_command(*command)
        except ResponseError as error:
            return error
    pipe = client.pipeline(transaction=mode == "multi")
    pipe.ping()
    pipe.execute_command(*command)
    pipe.ping()
    replies = pipe.execute(raise_on_error=False)
    return replies[1]


def refused(reply: Any, *secrets: str) -> bool:
    """An error reply that shows none of `secrets`."""
    return isinstance(reply, ResponseError) and not any(s in str(reply) for s in secrets)


def copy_stored(fc: ConfiguredProxy, source: tuple[str, str], target: tuple[str, str]) -> None:
    """What an attacker with write access to Redis does: move an envelope elsewhere."""
    stored = fc.direct.hget(*source)
    assert stored is not None and stored.startswith(HEADER_PREFIX)
    fc.direct.hset(target[0], target[1], stored)


# --- 1. Script replies keep the field and key binding ------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("protocol", [2, 3])
def test_a_value_moved_to_another_field_is_refused_through_a_script_as_by_hget(
    fc: ConfiguredProxy, protocol: int, mode: str
) -> None:
    start(fc, [{"key": "iad:*", "fields": IAD}])
    client = fc.client(protocol)
    client.hset("iad:9", mapping={"imap": "imap-pass", "oauth2": "oauth2-TOKEN-9", "n": "1"})
    script = HGETALL_ONE_RESP3 if protocol == 3 else HGETALL_ONE
    before = run(client, mode, "EVAL", script, 1, "iad:9")
    assert not isinstance(before, ResponseError), before  # it opens while in place

    copy_stored(fc, ("iad:9", "oauth2"), ("iad:9", "imap"))

    assert refused(run(client, mode, "HGET", "iad:9", "imap"), "oauth2-TOKEN-9")
    assert refused(run(client, mode, "EVAL", script, 1, "iad:9"), "oauth2-TOKEN-9")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("protocol", [2, 3])
def test_a_key_bound_value_moved_to_another_key_is_refused_through_a_script(
    fc: ConfiguredProxy, protocol: int, mode: str
) -> None:
    start(fc, [{"key": "user:*", "fields": ["password"], "bind_key": True}])
    client = fc.client(protocol)
    client.hset("user:1", "password", "password-of-ONE")
    client.hset("user:2", "password", "password-of-TWO")
    before = run(client, mode, "EVAL", HGETALL_TWO, 2, "user:1", "user:2")
    assert not isinstance(before, ResponseError), before  # element i is of KEYS[i]
    assert b"password-of-TWO" in repr(before).encode()

    copy_stored(fc, ("user:2", "password"), ("user:1", "password"))

    assert refused(run(client, mode, "HGET", "user:1", "password"), "password-of-TWO")
    got = run(client, mode, "EVAL", HGETALL_TWO, 2, "user:1", "user:2")
    assert refused(got, "password-of-TWO")
    # ... and the keys swapped in KEYS don't open it either
    assert refused(run(client, mode, "EVAL", HGETALL_TWO, 2, "user:2", "user:1"), "password-of")


# --- 2. require_encrypted has no side doors ----------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("protocol", [2, 3])
@pytest.mark.parametrize("command", ["EVAL", "EVAL_RO"])
def test_cleartext_planted_in_a_require_encrypted_field_is_refused_through_scripts(
    fc: ConfiguredProxy, protocol: int, mode: str, command: str
) -> None:
    start(fc, [{"key": "iad:*", "fields": IAD, "require_encrypted": True}])
    client = fc.client(protocol)
    client.hset("iad:7", mapping={"imap": "imap-pass", "host": "mail.example.com"})
    fc.direct.hset("iad:7", "oauth2", "PLANTED-cleartext")  # no header anywhere in it

    assert refused(run(client, mode, "HGET", "iad:7", "oauth2"), "PLANTED")
    script = HGETALL_ONE_RESP3 if protocol == 3 else HGETALL_ONE
    assert refused(run(client, mode, command, script, 1, "iad:7"), "PLANTED")
    # the same without any envelope in the reply at all
    fc.direct.hdel("iad:7", "imap")
    assert refused(run(client, mode, command, script, 1, "iad:7"), "PLANTED")
    # an unprotected field in clear is no reason to refuse
    fc.direct.hdel("iad:7", "oauth2")
    assert run(client, mode, command, script, 1, "iad:7") in (
        [b"host", b"mail.example.com"],
        {b"host": b"mail.example.com"},
    )


@pytest.mark.parametrize("protocol", [2, 3])
def test_sort_get_opens_under_the_db_its_request_was_sent_in(
    fc: ConfiguredProxy, protocol: int
) -> None:
    rules = [{"key": "iad:*", "fields": ["oauth2"], "db": 2, "require_encrypted": True}]
    start(fc, rules)
    db2 = redis.Redis(port=fc.upstream_port, db=2)
    db2.rpush("ids", "7")
    db2.hset("iad:7", "oauth2", "PLANTED-in-db-2")
    wire = fc.wire(protocol)
    try:
        _, sorted_reply, _ = wire.pipeline(
            [
                ["SELECT", "2"],
                ["SORT", "ids", "BY", "nosort", "GET", "iad:*->oauth2"],
                ["SELECT", "0"],
            ],
            3,
        )
    finally:
        wire.close()
        db2.close()
    assert sorted_reply.startswith(b"-ERR fieldcrypt:")
    assert b"PLANTED" not in sorted_reply


# --- 6. Only whole bulk strings are rewritten ---------------------------------------------


@pytest.mark.parametrize("protocol", [2, 3])
def test_envelopes_inside_other_values_and_in_status_replies_leave_the_reply_as_redis_sent_it(
    fc: ConfiguredProxy, protocol: int
) -> None:
    start(fc, [{"key": "iad:*", "fields": IAD}])
    client = fc.client(protocol)
    client.hset("iad:9", "oauth2", "oauth2-secret")
    envelope = fc.direct.hget("iad:9", "oauth2")
    assert envelope is not None
    inner = b"pre$%d\r\n%s\r\npost" % (len(envelope), envelope)
    script = "return {ARGV[1], {ok = ARGV[2]}}"
    via = fc.wire(protocol)
    direct = Wire(fc.upstream_port, protocol)
    try:
        got = via.call("EVAL", script, "1", "iad:9", inner, envelope)
        expected = direct.call("EVAL", script, "1", "iad:9", inner, envelope)
    finally:
        via.close()
        direct.close()
    assert got == expected
    # and a client's parser reads it
    assert client.eval(script, 1, "iad:9", inner, envelope)[0] == inner


# --- 5. Bounded memory and logs --------------------------------------------------------


def test_refused_eval_bodies_are_not_kept(upstream: EmbeddedServer, tmp_path: Path) -> None:
    (tmp_path / "key").write_text(generate_key())
    (tmp_path / "fieldcrypt.yaml").write_text(
        yaml.safe_dump(
            {
                "upstream": f"redis://127.0.0.1:{upstream.port}",
                "listen": f"127.0.0.1:{free_port()}",
                "keys": [{"secret_file": "key"}],
                "rules": [{"key": "iad:*", "fields": IAD}],
            }
        )
    )
    serve = ServeProcess(tmp_path, "--config", "fieldcrypt.yaml")
    try:
        client = redis.Redis(port=serve.port, socket_timeout=30)
        client.ping()
        for number in range(3):  # warm up: a connection's buffers, allocator pools
            with pytest.raises(ResponseError):
                client.execute_command("EVAL", b"-- %d\n" % number + b"x" * (1 << 20), 1, "iad:1")
        before = serve.rss_kib()
        for number in range(60):  # 1 MiB of Lua Redis refuses, each a new body
            body = b"-- %d\n" % number + b"x" * (1 << 20)
            with pytest.raises(ResponseError):
                client.execute_command("EVAL", body, 1, "iad:1")
        client.close()
        grown = serve.rss_kib() - before
        assert serve.stop() == 0
    finally:
        serve.kill()
    assert grown < 5 * 1024, f"RSS grew by {grown} KiB"


def test_random_function_names_leave_the_scripts_table_within_its_bound(
    fc: ConfiguredProxy, caplog: pytest.LogCaptureFixture
) -> None:
    start(fc, [{"key": "iad:*", "fields": IAD}])
    client = fc.client()
    with caplog.at_level(logging.WARNING, logger="fieldcrypt"):
        pipe = client.pipeline(transaction=False)
        for _ in range(3000):
            pipe.execute_command("FCALL", uuid.uuid4().hex, 1, "iad:1")
        replies = pipe.execute(raise_on_error=False)
    assert all(isinstance(r, ResponseError) for r in replies)  # no such functions
    rows = client.execute_command("FIELDCRYPT", "SCRIPTS")
    assert len(rows) == MAX_SEEN + 1
    other = [row for row in rows if OTHER.encode() in row]
    assert len(other) == 1 and 3000 - MAX_SEEN in other[0]
    lines = [r for r in caplog.records if "undeclared script" in r.getMessage()]
    assert 1 <= len(lines) <= 20


def test_decrypt_failures_are_logged_a_few_times_a_minute_not_once_per_read(
    fc: ConfiguredProxy, caplog: pytest.LogCaptureFixture
) -> None:
    start(fc, [{"key": "iad:*", "fields": IAD}])
    client = fc.client()
    client.hset("iad:1", "oauth2", "token")
    stored = fc.direct.hget("iad:1", "oauth2")
    assert stored is not None
    tampered = stored[:-2] + (b"AA" if not stored.endswith(b"AA") else b"BA")
    for number in range(100):
        fc.direct.hset(f"iad:{number}", "oauth2", tampered)
    with caplog.at_level(logging.WARNING, logger="fieldcrypt"):
        for number in range(100):
            with pytest.raises(ResponseError, match="cannot decrypt"):
                client.hget(f"iad:{number}", "oauth2")
    lines = [r for r in caplog.records if "cannot decrypt" in r.getMessage()]
    assert len(lines) == 1
    assert fc.proxy is not None and fc.proxy.state.crypt.failures["authentication failed"] == 100


def test_a_reload_that_lets_raw_win_over_require_encrypted_is_warned_about(
    fc: ConfiguredProxy, caplog: pytest.LogCaptureFixture
) -> None:
    rules = [{"key": "iad:*", "fields": IAD, "require_encrypted": True}]
    start(fc, rules)
    client = fc.client()
    fc.write_config({"keys": fc.key_entries([fc.key_a]), "rules": rules, "on_decrypt_error": "raw"})
    with caplog.at_level(logging.WARNING, logger="fieldcrypt"):
        assert client.execute_command("FIELDCRYPT", "RELOAD") in (b"OK", "OK", True)
    assert any("raw, which wins over require_encrypted" in r.getMessage() for r in caplog.records)


HVALS_ONE = "return redis.call('HVALS', KEYS[1])"
# One array per key: the proxy reads element i as KEYS[i]'s.
HMGET_PER_KEY = (
    "return {redis.call('HMGET', KEYS[1], 'oauth2'), redis.call('HMGET', KEYS[2], 'pin')}"
)


def stored(fc: ConfiguredProxy, key: str, field: str) -> bytes:
    value = fc.direct.hget(key, field)
    assert value is not None and value.startswith(HEADER_PREFIX)
    return value


def shows(reply: Any, secret: bytes) -> bool:
    """Whether `secret` appears anywhere in a reply (or in an error's text)."""
    return secret in repr(reply).encode() or secret.decode() in str(reply)


def one_reply(frame: bytes) -> Any:
    """hiredis' reading of `frame`; fails unless it is exactly one whole reply."""
    reader = hiredis.Reader()
    reader.feed(frame)
    value = reader.gets()
    assert value is not False, "an incomplete reply"
    assert reader.gets() is False, "bytes left over after the reply"
    return value


# --- Replies a Redis writer or a client shapes to break the binding or the session --------


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_value_of_exactly_the_header_does_not_close_the_connection(
    fc: ConfiguredProxy, protocol: int
) -> None:
    """_Found.string reads item[5] (the mode byte) of a string that is exactly b"$fc1$":
    IndexError, which the session treats as an internal error and closes the client's
    connection. Any client can send it; a Redis writer can plant it in any field a
    script returns, and every call of that script drops the app's connection."""
    start(fc, [{"key": "iad:*", "fields": IAD}])
    fc.direct.hset("iad:1", mapping={"note": "$fc1$", "oauth2": "x"})
    wire = fc.wire(protocol)
    try:
        assert wire.call("EVAL", "return ARGV[1]", "0", "$fc1$") == b"$5\r\n$fc1$\r\n"
        assert wire.call("PING") == b"+PONG\r\n"
    finally:
        wire.close()
    client = fc.client(protocol)
    got = client.eval(HGETALL_ONE, 1, "iad:1")
    assert got in ([b"note", b"$fc1$", b"oauth2", b"x"], {b"note": b"$fc1$", b"oauth2": b"x"})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("protocol", [2, 3])
def test_a_field_named_with_the_header_prefix_does_not_unbind_the_value_after_it(
    fc: ConfiguredProxy, protocol: int, mode: str
) -> None:
    """A string that starts with `$fc1$` gives no name to the element after it
    (_Found.string returns None, _name_of returns None), so the value after it is read
    as a lone value and opened under the candidates (the rules' literal fields). A Redis
    writer copies iad:9's oauth2 envelope to a field named "$fc1$junk": HGET of that
    field returns the envelope as it is, but the script returns the plaintext under
    "$fc1$junk", a field it was never sealed for."""
    start(fc, [{"key": "iad:*", "fields": IAD}])
    client = fc.client(protocol)
    client.hset("iad:9", "oauth2", "oauth2-TOKEN-9")
    fc.direct.hset("iad:9", "$fc1$junk", stored(fc, "iad:9", "oauth2"))
    fc.direct.hdel("iad:9", "oauth2")

    assert not shows(run(client, mode, "HGET", "iad:9", "$fc1$junk"), b"oauth2-TOKEN-9")
    script = HGETALL_ONE_RESP3 if protocol == 3 else HGETALL_ONE
    assert not shows(run(client, mode, "EVAL", script, 1, "iad:9"), b"oauth2-TOKEN-9")


def test_an_envelope_that_is_a_resp3_map_key_is_not_opened(fc: ConfiguredProxy) -> None:
    """A RESP3 map key is a name, never a value, but through_tree walks a map's items
    as a flat list: a key is opened, under the element before it (the previous entry's
    value) or, first in the map, under the candidates. HGETALL never opens a field
    name; a script returning the hash as a map does. (The fast path already refuses to
    splice a map key; the tree should leave it as Redis sent it.)"""
    start(fc, [{"key": "iad:*", "fields": IAD}])
    client = fc.client(3)
    client.hset("iad:9", "oauth2", "oauth2-TOKEN-9")
    envelope = stored(fc, "iad:9", "oauth2")
    fc.direct.delete("iad:9")
    fc.direct.hset("iad:9", envelope, "x")  # the envelope as a field NAME, alone in the hash

    assert client.hgetall("iad:9") == {envelope: b"x"}  # what HGETALL gives
    got = run(client, "alone", "EVAL", HGETALL_ONE_RESP3, 1, "iad:9")
    assert not shows(got, b"oauth2-TOKEN-9")
    # ... nor after another entry whose value spells the sealing field's name
    fc.direct.delete("iad:9")
    fc.direct.hset("iad:9", "note", "oauth2")
    fc.direct.hset("iad:9", envelope, "x")
    got = run(client, "alone", "EVAL", HGETALL_ONE_RESP3, 1, "iad:9")
    assert not shows(got, b"oauth2-TOKEN-9")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("protocol", [2, 3])
def test_cleartext_starting_with_the_header_is_refused_in_a_require_encrypted_field(
    fc: ConfiguredProxy, protocol: int, mode: str
) -> None:
    """Cleartext planted in a require_encrypted field is refused by HGET, also when it
    starts with `$fc1$` (a malformed envelope). Through a script the same bytes are
    "foreign" (keyring.owns is False) and returned as they are, named field or not:
    _ScriptReply.transform (foreign += 1) and walk (`return value`). docs/security.md
    promises the refusal "with or without the header"."""
    start(fc, [{"key": "iad:*", "fields": IAD, "require_encrypted": True}])
    client = fc.client(protocol)
    client.hset("iad:7", "host", "mail.example.com")
    fc.direct.hset("iad:7", "oauth2", "$fc1$PLANTED-attacker-token")

    assert isinstance(run(client, mode, "HGET", "iad:7", "oauth2"), ResponseError)
    script = HGETALL_ONE_RESP3 if protocol == 3 else HGETALL_ONE
    got = run(client, mode, "EVAL", script, 1, "iad:7")
    assert isinstance(got, ResponseError) and "PLANTED" not in str(got), got


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("protocol", [2, 3])
def test_one_hash_per_key_opens_a_lone_value_only_under_its_own_keys_fields(
    fc: ConfiguredProxy, protocol: int, mode: str
) -> None:
    """In a reply of one array per key, element i is KEYS[i]'s, and a lone value in it
    may be opened only under the literal fields of KEYS[i]'s rules (through_tree does
    that). The splice path drops the key of field-bound envelopes
    (`_Found.string`: `key if mode k else None`), so `open` tries the candidates of
    every key in KEYS: iad:2's oauth2 envelope, copied into pin:1's `pin`, comes back
    as pin:1's pin."""
    rules = [{"key": "iad:*", "fields": ["oauth2"]}, {"key": "pin:*", "fields": ["pin"]}]
    start(fc, rules)
    client = fc.client(protocol)
    client.hset("iad:1", "oauth2", "oauth2-of-ONE")
    client.hset("iad:2", "oauth2", "oauth2-of-TWO")
    client.hset("pin:1", "pin", "1234")
    assert run(client, mode, "EVAL", HMGET_PER_KEY, 2, "iad:1", "pin:1") == [
        [b"oauth2-of-ONE"],
        [b"1234"],
    ]

    fc.direct.hset("pin:1", "pin", stored(fc, "iad:2", "oauth2"))

    assert not shows(run(client, mode, "HGET", "pin:1", "pin"), b"oauth2-of-TWO")
    got = run(client, mode, "EVAL", HMGET_PER_KEY, 2, "iad:1", "pin:1")
    assert not shows(got, b"oauth2-of-TWO"), got


@pytest.mark.parametrize("protocol", [2, 3])
def test_a_refusal_under_a_glob_rule_never_shows_another_value_as_the_field_name(
    fc: ConfiguredProxy, protocol: int, caplog: pytest.LogCaptureFixture
) -> None:
    """check_cleartext refuses under the name the shape gives, and FieldCrypt.open puts
    that name in the error and in the log line. Under a glob rule the "name" is any
    string before the value, which in HVALS (or any list of values) is another
    value: a cleartext value not yet migrated is sent to the client and written to the
    log. `refuse` shows only literal rule fields; check_cleartext should do the same."""
    start(fc, [{"key": "vault:*", "fields": ["*"], "require_encrypted": True}])
    fc.direct.hset("vault:1", mapping={"a": "LEGACY-SECRET-VALUE", "b": "other"})
    client = fc.client(protocol)
    with caplog.at_level(logging.WARNING, logger="fieldcrypt"):
        got = run(client, "alone", "EVAL", HVALS_ONE, 1, "vault:1")
    assert isinstance(got, ResponseError)  # cleartext in a require_encrypted hash
    assert "LEGACY-SECRET-VALUE" not in str(got)
    assert not [r for r in caplog.records if "LEGACY-SECRET-VALUE" in r.getMessage()]


@pytest.mark.parametrize("strict", [False, True])
def test_a_deeply_nested_reply_does_not_close_the_connection(
    fc: ConfiguredProxy, strict: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis sends a Lua table nested 1500 deep. hiredis refuses past its nesting limit,
    so the reply goes to through_tree, whose resp.decode / walk / encode recurse once a
    level: RecursionError, the connection is closed and a traceback of about a thousand
    frames is logged, not rate-limited, once per call. A client needs only a header
    inside a string (or, under require_encrypted, nothing) to trigger it."""
    start(fc, [{"key": "iad:*", "fields": IAD, "require_encrypted": strict}])
    body = "local t = ARGV[1]; for i = 1, 1500 do t = {t} end; return t"
    argument = "x" if strict else "x$fc1$"
    direct = Wire(fc.upstream_port)
    expected = direct.call("EVAL", body, "1", "iad:1", argument)
    direct.close()
    wire = fc.wire()
    try:
        with caplog.at_level(logging.ERROR, logger="fieldcrypt"):
            got = wire.call("EVAL", body, "1", "iad:1", argument)
            assert wire.call("PING") == b"+PONG\r\n"
    finally:
        wire.close()
    # Redis's reply as it is, or an error saying why not: never a closed connection.
    assert got == expected or got.startswith(b"-ERR fieldcrypt:")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- Shapes that must pass as Redis sent them, or open only where they belong ----------


@pytest.mark.parametrize(
    ("protocol", "script"),
    [
        (2, "return {{ok=ARGV[1]}, false, {}, ARGV[1]}"),
        (
            3,
            "redis.setresp(3); return {{double=1.5},"
            " {big_number='123456789012345678901234567890'},"
            " {verbatim_string={format='txt', string=ARGV[1]}}, {ok=ARGV[1]}, false, {},"
            " {map={k='v'}}, ARGV[1]}",
        ),
    ],
)
def test_envelopes_outside_bulk_strings_stay_as_sent_and_the_bulk_one_opens(
    fc: ConfiguredProxy, protocol: int, script: str
) -> None:
    """Status replies, verbatim strings, doubles, big numbers, false/null, an empty array
    and a map around an envelope: only the whole bulk string is opened, every other
    byte is Redis's, and the client reads exactly one well-formed reply."""
    start(fc, [{"key": "iad:*", "fields": IAD}])
    client = fc.client(protocol)
    client.hset("iad:9", "oauth2", "oauth2-TOKEN-9")
    envelope = stored(fc, "iad:9", "oauth2")
    direct = Wire(fc.upstream_port, protocol)
    via = fc.wire(protocol)
    try:
        expected = direct.call("EVAL", script, "1", "iad:9", envelope)
        got = via.call("EVAL", script, "1", "iad:9", envelope)
    finally:
        direct.close()
        via.close()
    tail_stored, tail_open = resp.bulk(envelope), resp.bulk(b"oauth2-TOKEN-9")
    assert expected.endswith(tail_stored) and expected.count(HEADER_PREFIX) >= 2
    assert got == expected[: -len(tail_stored)] + tail_open
    one_reply(got)


@pytest.mark.parametrize("protocol", [2, 3])
def test_the_same_envelope_under_two_names_opens_only_under_its_own(
    fc: ConfiguredProxy, protocol: int
) -> None:
    """Duplicates that open differently turn the splice off; the tree refuses the copy
    and the reply never carries the plaintext under the other name."""
    start(fc, [{"key": "iad:*", "fields": IAD}], on_decrypt_error="raw")
    client = fc.client(protocol)
    client.hset("iad:9", "oauth2", "oauth2-TOKEN-9")
    envelope = stored(fc, "iad:9", "oauth2")
    fc.direct.hset("iad:9", "imap", envelope)
    script = HGETALL_ONE_RESP3 if protocol == 3 else HGETALL_ONE
    got = client.eval(script, 1, "iad:9")
    pairs = got if isinstance(got, dict) else dict(zip(got[::2], got[1::2], strict=True))
    assert pairs == {b"oauth2": b"oauth2-TOKEN-9", b"imap": envelope}


@pytest.mark.parametrize("protocol", [2, 3])
def test_select_pipelined_before_a_script_picks_the_rules_of_that_db(
    fc: ConfiguredProxy, protocol: int
) -> None:
    rules = [{"key": "iad:*", "fields": ["oauth2"], "db": 2, "require_encrypted": True}]
    start(fc, rules)
    for db in (0, 2):
        other = redis.Redis(port=fc.upstream_port, db=db)
        other.hset("iad:7", "oauth2", "PLANTED-in-db")
        other.close()
    wire = fc.wire(protocol)
    try:
        replies = wire.pipeline(
            [
                ["SELECT", "2"],
                ["EVAL", HGETALL_ONE, "1", "iad:7"],
                ["SELECT", "0"],
                ["EVAL", HGETALL_ONE, "1", "iad:7"],
            ],
            4,
        )
    finally:
        wire.close()
    assert replies[1].startswith(b"-ERR fieldcrypt:") and b"PLANTED" not in replies[1]
    assert b"PLANTED-in-db" in replies[3]  # no rule in db 0


def test_a_multi_exec_of_scripts_refuses_only_the_moved_value(
    fc: ConfiguredProxy,
) -> None:
    start(fc, [{"key": "user:*", "fields": ["password"], "bind_key": True}])
    client = fc.client()
    client.hset("user:1", "password", "password-of-ONE")
    client.hset("user:2", "password", "password-of-TWO")
    fc.direct.hset("user:3", "password", stored(fc, "user:2", "password"))
    pipe = client.pipeline(transaction=True)
    pipe.eval(HGETALL_ONE, 1, "user:1")
    pipe.eval(HGETALL_ONE, 1, "user:3")
    pipe.eval(
        "return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}",
        2,
        "user:3",
        "user:2",
    )
    one, three, both = pipe.execute(raise_on_error=False)
    assert one == [b"password", b"password-of-ONE"]
    assert isinstance(three, ResponseError) and "password-of" not in str(three)
    assert isinstance(both, ResponseError) and "password-of" not in str(both)


def test_a_key_bound_value_is_not_opened_by_a_script_naming_many_keys(
    fc: ConfiguredProxy,
) -> None:
    """Not one hash per key, no declared hash_key: a key-bound envelope stays shut."""
    start(fc, [{"key": "user:*", "fields": ["password"], "bind_key": True}])
    client = fc.client()
    client.hset("user:1", "password", "password-of-ONE")
    got = run(client, "alone", "EVAL", HGETALL_ONE, 2, "user:1", "user:2")
    assert isinstance(got, ResponseError) and "password-of-ONE" not in str(got)


def test_bytes_that_only_start_like_an_envelope_pass_unprotected_positions(
    fc: ConfiguredProxy,
) -> None:
    start(fc, [{"key": "iad:*", "fields": IAD}])
    client = fc.client()
    fake = b"$fc1$f$not-a-real-envelope"
    assert client.eval("return {ARGV[1], 'n', ARGV[1]}", 1, "iad:1", fake) == [fake, b"n", fake]
