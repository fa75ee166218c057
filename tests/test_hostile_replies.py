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

import pytest
import redis
import yaml
from redis.exceptions import ResponseError

from proxy.crypto import HEADER_PREFIX, generate_key
from proxy.scripts import MAX_SEEN, OTHER
from tests.servers import ConfiguredProxy, EmbeddedServer, Wire, free_port
from tests.test_cli import Serve, clean_env

HGETALL_ONE = "return redis.call('HGETALL', KEYS[1])"
HGETALL_ONE_RESP3 = "redis.setresp(3); return redis.call('HGETALL', KEYS[1])"
HGETALL_TWO = "return {redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}"
IAD = ["imap", "smtp", "oauth2"]
MODES = ["alone", "pipelined", "multi"]


@pytest.fixture
def fc(upstream: EmbeddedServer, tmp_path: Path) -> Iterator[ConfiguredProxy]:
    handle = ConfiguredProxy(upstream, tmp_path)
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


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


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
    serve = Serve("--config", "fieldcrypt.yaml", cwd=tmp_path, env=clean_env())
    try:
        client = redis.Redis(port=serve.port, socket_timeout=30)
        client.ping()
        for number in range(3):  # warm up: a connection's buffers, allocator pools
            with pytest.raises(ResponseError):
                client.execute_command("EVAL", b"-- %d\n" % number + b"x" * (1 << 20), 1, "iad:1")
        before = rss_kib(serve.process.pid)
        for number in range(60):  # 1 MiB of Lua Redis refuses, each a new body
            body = b"-- %d\n" % number + b"x" * (1 << 20)
            with pytest.raises(ResponseError):
                client.execute_command("EVAL", body, 1, "iad:1")
        client.close()
        grown = rss_kib(serve.process.pid) - before
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
