"""Lua scripts and functions through fieldcrypt, against real Redis and Valkey servers.

An application that reads protected hashes through a script (an account listing, a
RESP3 map, a lone HGET) must see plaintext, as it does with plain commands; a script
declared in `scripts:` (by body file or function name) must leave only ciphertext in
the raw store, however it is called; an undeclared script naming a protected key is
recorded for `FIELDCRYPT SCRIPTS`, or refused under `script_policy: refuse`; and a
reply with nothing protected in it must pass through byte for byte. The scripts are
in tests/lua/.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import ResponseError

from proxy.crypto import HEADER_PREFIX, Key, KeyRing
from tests.servers import ALL_SERVER_KINDS, ConfiguredProxy, EmbeddedServer, Wire

UPSTREAM_KINDS = ALL_SERVER_KINDS  # the `upstream` kinds here (tests/conftest.py)
UPSTREAM_MODES = ["pooled", "dedicated"]

HOST = "127.0.0.1"
LUA = Path(__file__).parent / "lua"

# The three shapes of script an application uses, written for these tests.
LIST_ACCOUNTS = (LUA / "list_accounts.lua").read_bytes()  # {total, skip, {HGETALL row, ...}}
LIST_IN_SET = (LUA / "list_accounts_in_set.lua").read_bytes()  # the same, ids from a set
# declared by body_file: the example that config/fieldcrypt.example.yaml declares
SET_IF_MISSING_FILE = (
    Path(__file__).parent.parent / "config" / "lua" / "set-if-missing-with-marker.lua"
)
SET_IF_MISSING = SET_IF_MISSING_FILE.read_bytes()
SET_IF_MISSING_SHA = hashlib.sha1(SET_IF_MISSING).hexdigest()
FCLIB = (LUA / "fclib.lua").read_bytes()  # fcset (declared by function name), fcget

RESP3_HGETALL = b"redis.setresp(3); return redis.call('HGETALL', KEYS[1])"
HGET_IMAP = b"return redis.call('HGET', KEYS[1], 'imap')"
HGET_ARGV = b"return redis.call('HGET', KEYS[1], ARGV[1])"
UNDECLARED_WRITER = b"return redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])"
UNDECLARED_WRITER_SHA = hashlib.sha1(UNDECLARED_WRITER).hexdigest()
# A fixed ARGV[1] (seconds to live), then field/value pairs: declared [[2, 3]], repeat.
HSET_TTL = (
    b"redis.call('HSET', KEYS[1], unpack(ARGV, 2)); return redis.call('EXPIRE', KEYS[1], ARGV[1])"
)
# (field, value, note) records: declared [[1, 2]], repeat: 3.
WITH_NOTES = (
    b"for i = 1, #ARGV, 3 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1], "
    b"ARGV[i] .. 'Note', ARGV[i + 2]) end return #ARGV / 3"
)

IAD_PROTECTED = (b"imap", b"smtp", b"oauth2")
MARKER = b"serviceSecretOrigin"  # the marker the set-if-missing script writes; protected
RULES: list[dict[str, Any]] = [
    {"key": "iad:*", "fields": ["imap", "smtp", "oauth2"]},
    {
        "key": "settings",
        "fields": ["serviceSecret", "*ClientSecret", "smtpServerPassword", MARKER.decode()],
    },
]


def account(number: int) -> dict[bytes, bytes]:
    """The hash iad:<number>: three protected fields, three that are not."""
    return {
        b"imap": b"imap-password-%d" % number,
        b"user": b"user%d@example.com" % number,
        b"smtp": b"smtp-password-%d" % number,
        b"host": b"mail%d.example.com" % number,
        b"oauth2": b"oauth2-refresh-token-%d" % number,
        b"port": b"993",
    }


ACCOUNTS: dict[bytes, dict[bytes, bytes]] = {b"iad:%d" % n: account(n) for n in (1, 2, 3)}
SETTINGS: dict[bytes, bytes] = {
    b"serviceSecret": b"service-secret-value",
    b"googleClientSecret": b"google-client-secret-value",
    b"smtpServerPassword": b"smtp-server-password-value",
    b"theme": b"dark",
}


class Fieldcrypt(ConfiguredProxy):
    """fieldcrypt in front of a real server with the test scripts declared; `restart`
    changes the ring or policy."""

    def restart(
        self,
        *ring: str,
        decrypt_only: Collection[str] = (),
        script_policy: str = "passthrough",
    ) -> None:
        """(Re)start with the secrets of `ring` in order (default: key A alone)."""
        self.start(
            {
                "keys": self.key_entries(ring or (self.key_a,), decrypt_only),
                "rules": RULES,
                "scripts": [
                    {
                        "name": "set-if-missing",
                        "body_file": str(SET_IF_MISSING_FILE),
                        "hash_key": 1,
                        "field_values": [[1, 2], [3, 4]],
                    },
                    {
                        "name": "fclib-set",
                        "function": "fcset",
                        "hash_key": 1,
                        "field_values": [[1, 2]],
                        "repeat": True,
                    },
                    {
                        "name": "hset-with-ttl",
                        "sha1": hashlib.sha1(HSET_TTL).hexdigest(),
                        "hash_key": 1,
                        "field_values": [[2, 3]],
                        "repeat": True,
                    },
                    {
                        "name": "with-notes",
                        "sha1": hashlib.sha1(WITH_NOTES).hexdigest(),
                        "hash_key": 1,
                        "field_values": [[1, 2]],
                        "repeat": 3,
                    },
                ],
                "script_policy": script_policy,
            }
        )

    def seen_scripts(self, client: redis.Redis) -> dict[str, dict[str, Any]]:
        """FIELDCRYPT SCRIPTS, by script ident ("sha1 <hex>" or "function <name>")."""
        rows = [plain_pairs(row) for row in client.execute_command("FIELDCRYPT", "SCRIPTS")]
        return {row["script"]: row for row in rows}


@pytest.fixture(params=[2, 3], ids=["resp2", "resp3"])
def protocol(request: pytest.FixtureRequest) -> int:
    number: int = request.param
    return number


@pytest.fixture
def fc(upstream: EmbeddedServer, tmp_path: Path, upstream_mode: str) -> Iterator[Fieldcrypt]:
    """fieldcrypt with key ring [A] in front of a flushed `upstream` that has fclib loaded."""
    harness = Fieldcrypt(upstream, tmp_path, upstream_mode)
    harness.direct.flushall()
    harness.direct.function_load(FCLIB.decode(), replace=True)
    harness.restart()
    yield harness
    harness.close()
    with redis.Redis(host=HOST, port=upstream.port) as raw:
        raw.function_delete("fclib")


# --- Helpers ------------------------------------------------------------------------


def plain_pairs(reply: Any) -> dict[str, Any]:
    """A map reply (RESP3 dict or RESP2 flat list) as str -> str | int."""
    items = reply.items() if isinstance(reply, dict) else zip(reply[::2], reply[1::2], strict=True)
    return {
        name.decode(): value.decode() if isinstance(value, bytes) else value
        for name, value in items
    }


def as_hash(reply: Any) -> dict[bytes, bytes]:
    """A hash as a script returned it: a RESP3 map or a flat field/value array."""
    if isinstance(reply, dict):
        return dict(reply)
    assert isinstance(reply, list) and len(reply) % 2 == 0, reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


def listing(reply: Any) -> tuple[int, int, list[dict[bytes, bytes]]]:
    """The list script's {total, skip, rows} with each row as a dict."""
    total, skip, rows = reply
    return total, skip, [as_hash(row) for row in rows]


def expected_listing(
    keys: Sequence[bytes], skip: int = 0, size: int | None = None
) -> tuple[int, int, list[dict[bytes, bytes]]]:
    end = len(keys) if size is None else skip + size
    return len(keys), skip, [ACCOUNTS[key] for key in keys[skip:end]]


def error_of(call: Callable[[], object]) -> str:
    with pytest.raises(ResponseError) as caught:
        call()
    return str(caught.value)


def seed_accounts(client: redis.Redis) -> None:
    for key, mapping in ACCOUNTS.items():
        client.hset(key, mapping=mapping)
    client.sadd("accounts", *(key.split(b":")[1] for key in ACCOUNTS))


def assert_sealed(
    raw: redis.Redis, expected: Mapping[tuple[bytes, bytes], bytes], secret: str
) -> None:
    """Each value is an envelope under `secret` in the raw store that opens to its
    plaintext, and no plaintext appears in clear (outside an envelope) in those hashes."""
    ring = KeyRing([Key.from_secret(secret)])
    for (key, field_name), plaintext in expected.items():
        stored = raw.hget(key, field_name)
        assert stored is not None, (key, field_name)
        assert stored.startswith(HEADER_PREFIX), (key, field_name, stored)
        assert KeyRing.kid_of(stored) == Key.from_secret(secret).kid, (key, field_name)
        assert ring.decrypt(stored, field_name, key) == plaintext
    for key in {key for key, _ in expected}:
        blobs = [
            b for pair in raw.hgetall(key).items() for b in pair if not b.startswith(HEADER_PREFIX)
        ]
        leaks = [p for p in expected.values() if any(p in blob for blob in blobs)]
        assert leaks == [], key


def protected_of(key: bytes) -> dict[tuple[bytes, bytes], bytes]:
    """The protected values of account `key` (one of ACCOUNTS), by (key, field)."""
    return {(key, name): ACCOUNTS[key][name] for name in IAD_PROTECTED}


# --- Reads: the application sees plaintext -----------------------------------------


def test_list_script_rows_hold_the_plaintexts_by_eval_evalsha_pipeline_and_multi(
    fc: Fieldcrypt, protocol: int
) -> None:
    client = fc.client(protocol)
    seed_accounts(client)
    keys = list(ACCOUNTS)
    assert_sealed(fc.direct, protected_of(keys[0]), fc.key_a)
    sha = client.script_load(LIST_ACCOUNTS)

    assert listing(client.eval(LIST_ACCOUNTS, 3, *keys)) == expected_listing(keys)
    assert listing(client.evalsha(sha, 3, *keys, 1, 1)) == expected_listing(keys, 1, 1)
    assert listing(client.eval(LIST_IN_SET, 1, "accounts", 1)) == expected_listing(keys, 1)
    assert listing(client.eval_ro(LIST_ACCOUNTS, 3, *keys)) == expected_listing(keys)
    for transaction in (False, True):
        pipe = client.pipeline(transaction=transaction)
        pipe.eval(LIST_ACCOUNTS, 3, *keys, 0, 2)
        pipe.hget(keys[2], "imap")
        pipe.evalsha(sha, 2, keys[2], keys[0])
        pipe.eval(LIST_IN_SET, 1, "accounts")
        first, imap, second, by_set = pipe.execute()
        assert listing(first) == expected_listing(keys, 0, 2)
        assert imap == ACCOUNTS[keys[2]][b"imap"]
        assert listing(second) == expected_listing([keys[2], keys[0]])
        assert listing(by_set) == expected_listing(keys)


def test_resp3_map_returned_by_a_script_is_decrypted_alone_pipelined_and_in_multi(
    fc: Fieldcrypt, protocol: int
) -> None:
    client = fc.client(protocol)
    seed_accounts(client)
    client.hset("settings", mapping=SETTINGS)
    glob_named = (b"settings", b"googleClientSecret")
    assert_sealed(fc.direct, {glob_named: SETTINGS[glob_named[1]]}, fc.key_a)

    reply = client.eval(RESP3_HGETALL, 1, "iad:2")
    assert isinstance(reply, dict) == (protocol == 3)  # a map to RESP3 clients only
    assert as_hash(reply) == ACCOUNTS[b"iad:2"]
    # googleClientSecret matches the glob *ClientSecret: the map key names it.
    assert as_hash(client.eval(RESP3_HGETALL, 1, "settings")) == SETTINGS
    for transaction in (False, True):
        pipe = client.pipeline(transaction=transaction)
        pipe.eval(RESP3_HGETALL, 1, "settings")
        pipe.set("plain", "value")
        pipe.eval(RESP3_HGETALL, 1, "iad:3")
        pipe.hgetall("iad:1")
        settings, ok, iad_3, iad_1 = pipe.execute()
        assert (as_hash(settings), ok, as_hash(iad_3), iad_1) == (
            SETTINGS,
            True,
            ACCOUNTS[b"iad:3"],
            ACCOUNTS[b"iad:1"],
        )


def test_a_lone_protected_value_returned_by_a_script_or_function_is_decrypted(
    fc: Fieldcrypt, protocol: int
) -> None:
    client = fc.client(protocol)
    seed_accounts(client)
    iad_2 = ACCOUNTS[b"iad:2"]

    # The reply is one bulk string: its field name is found among the rules' literal
    # field names for KEYS[1].
    assert client.eval(HGET_IMAP, 1, "iad:2") == iad_2[b"imap"]
    assert client.eval_ro(HGET_ARGV, 1, "iad:2", "oauth2") == iad_2[b"oauth2"]
    assert client.evalsha(client.script_load(HGET_ARGV), 1, "iad:2", "smtp") == iad_2[b"smtp"]
    assert client.fcall("fcget", 1, "iad:2", "smtp") == iad_2[b"smtp"]
    assert client.fcall_ro("fcget", 1, "iad:2", "oauth2") == iad_2[b"oauth2"]
    assert client.fcall_ro("fcget", 1, "iad:2", "user") == iad_2[b"user"]
    pipe = client.pipeline(transaction=True)
    pipe.eval(HGET_IMAP, 1, "iad:3")
    pipe.fcall_ro("fcget", 1, "iad:1", "oauth2")
    assert pipe.execute() == [ACCOUNTS[b"iad:3"][b"imap"], ACCOUNTS[b"iad:1"][b"oauth2"]]


def test_a_lone_value_whose_field_the_proxy_cannot_name_is_an_error_never_ciphertext(
    fc: Fieldcrypt, protocol: int
) -> None:
    client = fc.client(protocol)
    client.hset("settings", mapping=SETTINGS)

    # googleClientSecret is protected by the glob *ClientSecret, which names no field the
    # proxy could try for a bare value.
    error = error_of(lambda: client.eval(HGET_ARGV, 1, "settings", "googleClientSecret"))

    assert "cannot decrypt a value in a script reply" in error
    assert "declare the script's fields in scripts:" in error
    assert "$fc1$" not in error and b"google-client-secret" not in error.encode()
    # The same value is readable when its name comes with it.
    assert client.hget("settings", "googleClientSecret") == SETTINGS[b"googleClientSecret"]


# --- Writes by declared scripts: ciphertext in the raw store -----------------------


def test_declared_set_if_missing_script_stores_ciphertext_however_it_is_called(
    fc: Fieldcrypt, protocol: int
) -> None:
    client = fc.client(protocol)
    loaded_sha = client.script_load(SET_IF_MISSING)
    assert loaded_sha == SET_IF_MISSING_SHA

    def argv(how: str) -> list[bytes]:
        return [b"serviceSecret", b"secret-by-" + how.encode(), MARKER, b"origin-" + how.encode()]

    read_back: list[bytes] = []  # what the pipelines read after their script ran

    def by_pipeline(how: str, transaction: bool) -> int:
        pipe = client.pipeline(transaction=transaction)
        pipe.set("unrelated", how)
        pipe.evalsha(SET_IF_MISSING_SHA, 1, "settings", *argv(how))
        pipe.hget("settings", "serviceSecret")
        unrelated, wrote, value = pipe.execute()
        assert unrelated is True
        read_back.append(value)
        return int(wrote)

    calls: dict[str, Callable[[str], int]] = {
        "eval": lambda how: client.eval(SET_IF_MISSING, 1, "settings", *argv(how)),
        "evalsha-after-script-load": lambda how: client.evalsha(
            loaded_sha, 1, "settings", *argv(how)
        ),
        "evalsha-local-sha": lambda how: client.evalsha(
            hashlib.sha1(SET_IF_MISSING_FILE.read_bytes()).hexdigest(), 1, "settings", *argv(how)
        ),
        "pipeline": lambda how: by_pipeline(how, False),
        "multi": lambda how: by_pipeline(how, True),
    }
    for how, call in calls.items():
        fc.direct.delete("settings")
        assert call(how) == 1, how
        secret, origin = argv(how)[1], argv(how)[3]
        assert_sealed(
            fc.direct,
            {(b"settings", b"serviceSecret"): secret, (b"settings", MARKER): origin},
            fc.key_a,
        )
        assert client.hmget("settings", "serviceSecret", MARKER) == [secret, origin], how
        assert call("again") == 0, how  # the field exists: nothing written
        assert client.hget("settings", "serviceSecret") == secret
    assert read_back == [b"secret-by-pipeline"] * 2 + [b"secret-by-multi"] * 2


def test_an_unprotected_marker_is_stored_as_written(fc: Fieldcrypt, protocol: int) -> None:
    client = fc.client(protocol)

    wrote = client.eval(
        SET_IF_MISSING, 1, "iad:7", "oauth2", "token-of-7", "oauth2SetBy", "installer"
    )

    assert wrote == 1
    assert_sealed(fc.direct, {(b"iad:7", b"oauth2"): b"token-of-7"}, fc.key_a)
    assert fc.direct.hget("iad:7", "oauth2SetBy") == b"installer"
    assert client.hgetall("iad:7") == {b"oauth2": b"token-of-7", b"oauth2SetBy": b"installer"}


def test_declared_function_stores_ciphertext_by_fcall_pipelined_and_in_multi(
    fc: Fieldcrypt, protocol: int
) -> None:
    client = fc.client(protocol)

    def pairs(key: bytes) -> list[bytes]:
        return list(itertools.chain.from_iterable(ACCOUNTS[key].items()))

    assert client.fcall("fcset", 1, "iad:1", *pairs(b"iad:1")) == 6
    pipe = client.pipeline(transaction=False)
    pipe.fcall("fcset", 1, "iad:2", *pairs(b"iad:2"))
    pipe.fcall_ro("fcget", 1, "iad:2", "imap")
    assert pipe.execute() == [6, ACCOUNTS[b"iad:2"][b"imap"]]
    multi = client.pipeline(transaction=True)
    multi.fcall("fcset", 1, "iad:3", *pairs(b"iad:3"))
    multi.eval(LIST_ACCOUNTS, 3, *ACCOUNTS)
    added, listed = multi.execute()

    assert added == 6
    assert listing(listed) == expected_listing(list(ACCOUNTS))
    for key, mapping in ACCOUNTS.items():
        assert_sealed(fc.direct, protected_of(key), fc.key_a)
        unprotected = {n: v for n, v in mapping.items() if n not in IAD_PROTECTED}
        assert {n: fc.direct.hget(key, n) for n in unprotected} == unprotected


def test_eval_then_evalsha_of_the_same_script_behave_the_same(
    fc: Fieldcrypt, protocol: int
) -> None:
    client = fc.client(protocol)
    argv = ["oauth2", "same-token", "oauth2SetBy", "same-installer"]

    by_eval = [client.eval(SET_IF_MISSING, 1, "iad:10", *argv) for _ in range(2)]
    by_evalsha = [client.evalsha(SET_IF_MISSING_SHA, 1, "iad:11", *argv) for _ in range(2)]

    assert by_eval == by_evalsha == [1, 0]
    stored = {key: fc.direct.hgetall(key) for key in (b"iad:10", b"iad:11")}
    for key, mapping in stored.items():
        assert mapping.keys() == {b"oauth2", b"oauth2SetBy"}
        assert mapping[b"oauth2SetBy"] == b"same-installer"
        assert_sealed(fc.direct, {(key, b"oauth2"): b"same-token"}, fc.key_a)
    assert client.hgetall("iad:10") == client.hgetall("iad:11")
    assert fc.seen_scripts(client) == {}  # a declared script is not "undeclared"


def test_a_body_with_other_surrounding_white_space_is_matched_once_script_load_saw_it(
    fc: Fieldcrypt, protocol: int
) -> None:
    client = fc.client(protocol)
    stripped = SET_IF_MISSING.strip()
    padded = b"\n\n  " + stripped + b"  \n\n"
    assert stripped != SET_IF_MISSING  # the file ends with a newline

    stripped_sha = client.script_load(stripped)
    padded_sha = hashlib.sha1(padded).hexdigest()

    assert stripped_sha != SET_IF_MISSING_SHA
    assert (
        client.evalsha(stripped_sha, 1, "settings", "serviceSecret", "secret 1", MARKER, "origin 1")
        == 1
    )
    assert_sealed(
        fc.direct,
        {(b"settings", b"serviceSecret"): b"secret 1", (b"settings", MARKER): b"origin 1"},
        fc.key_a,
    )
    # EVAL with the padded body teaches the proxy its SHA1 too; EVALSHA then matches.
    assert client.eval(padded, 1, "iad:12", "imap", "imap-12", "imapSetBy", "x") == 1
    assert client.evalsha(padded_sha, 1, "iad:13", "smtp", "smtp-13", "smtpSetBy", "y") == 1
    assert_sealed(
        fc.direct, {(b"iad:12", b"imap"): b"imap-12", (b"iad:13", b"smtp"): b"smtp-13"}, fc.key_a
    )
    assert fc.seen_scripts(client) == {}


def test_a_sha1_learned_from_script_load_survives_a_config_reload(
    fc: Fieldcrypt, protocol: int
) -> None:
    client = fc.client(protocol)
    stripped_sha = client.script_load(SET_IF_MISSING.strip())
    assert client.execute_command("FIELDCRYPT", "RELOAD") in (b"OK", "OK", True)

    # A client keeps its SHA1 (redis-py's Script does) and never loads it again: Redis
    # still has the script, so no NOSCRIPT brings the body back through the proxy. (A new
    # connection: sessions opened before a reload keep the old table under ProxyThread.)
    later = fc.client(protocol)
    wrote = later.evalsha(
        stripped_sha, 1, "settings", "serviceSecret", "secret 2", MARKER, "origin 2"
    )

    assert wrote == 1
    assert_sealed(
        fc.direct,
        {(b"settings", b"serviceSecret"): b"secret 2", (b"settings", MARKER): b"origin 2"},
        fc.key_a,
    )


# --- Undeclared scripts ----------------------------------------------------------------


def test_an_undeclared_writer_naming_a_protected_key_is_recorded_and_logged_once(
    fc: Fieldcrypt, protocol: int, caplog: pytest.LogCaptureFixture
) -> None:
    client = fc.client(protocol)
    with caplog.at_level(logging.INFO, logger="fieldcrypt"):
        assert client.eval(UNDECLARED_WRITER, 1, "iad:20", "imap", "undeclared-secret-1") == 1
        sha = client.script_load(UNDECLARED_WRITER)
        assert client.evalsha(sha, 1, "iad:20", "smtp", "undeclared-secret-2") == 1
        pipe = client.pipeline(transaction=False)
        pipe.evalsha(sha, 1, "iad:21", "oauth2", "undeclared-secret-3")
        pipe.evalsha(sha, 1, "session:1", "imap", "not-protected")  # no rule: not recorded
        assert pipe.execute() == [1, 1]
        seen = fc.seen_scripts(client)

    assert sha == UNDECLARED_WRITER_SHA
    entry = seen[f"sha1 {UNDECLARED_WRITER_SHA}"]
    assert entry == {
        "script": f"sha1 {UNDECLARED_WRITER_SHA}",
        "calls": 3,
        "sample_key": "iad:20",
    }
    lines = [r.getMessage() for r in caplog.records if r.name == "fieldcrypt"]
    about_it = [line for line in lines if UNDECLARED_WRITER_SHA in line]
    assert len(about_it) == 1, lines
    assert "iad:20" in about_it[0]
    assert not any(b"undeclared-secret" in line.encode() for line in lines)
    # passthrough: the script ran and wrote what it was given.
    assert fc.direct.hget("iad:20", "imap") == b"undeclared-secret-1"


def test_refuse_policy_refuses_an_undeclared_writer_naming_a_protected_key(
    fc: Fieldcrypt, protocol: int
) -> None:
    fc.restart(script_policy="refuse")
    client = fc.client(protocol)
    sha = client.script_load(UNDECLARED_WRITER)

    refusals = [
        error_of(lambda: client.eval(UNDECLARED_WRITER, 1, "iad:22", "imap", "leak-1")),
        error_of(lambda: client.evalsha(sha, 2, "session:2", "iad:22", "imap", "leak-2")),
    ]
    multi = client.pipeline(transaction=True)
    multi.hset("session:2", "user", "u")
    multi.evalsha(sha, 1, "iad:22", "smtp", "leak-3")
    refusals.append(error_of(multi.execute))

    for refusal in refusals:  # redis-py names the queued command that EXEC aborted on
        assert f"fieldcrypt: script sha1 {UNDECLARED_WRITER_SHA} is not declared" in refusal
        assert "protected key 'iad:22'" in refusal
    assert fc.direct.exists("iad:22", "session:2") == 0  # nothing was written, not even the HSET
    # Unprotected keys and declared scripts still work.
    assert client.evalsha(sha, 1, "session:2", "imap", "fine") == 1
    assert client.eval(SET_IF_MISSING, 1, "iad:23", "imap", "imap-23", "imapSetBy", "x") == 1
    assert client.fcall("fcset", 1, "iad:23", "smtp", "smtp-23") == 1
    assert_sealed(
        fc.direct, {(b"iad:23", b"imap"): b"imap-23", (b"iad:23", b"smtp"): b"smtp-23"}, fc.key_a
    )
    assert fc.seen_scripts(client)[f"sha1 {UNDECLARED_WRITER_SHA}"]["calls"] == 3


# --- Replies with nothing protected: byte for byte --------------------------------------

PASS_THROUGH_SCRIPTS: list[tuple[bytes, list[bytes]]] = [
    (b"return {1, 'two', {3, 'four', {}}, redis.call('HGET', KEYS[1], 'user')}", [b"iad:1"]),
    (HGET_IMAP, [b"session:1"]),  # a field named like a protected one, under no rule
    (RESP3_HGETALL, [b"session:1"]),
    (RESP3_HGETALL, [b"iad:9"]),  # a protected key holding no protected field
    (b"redis.setresp(3); return {double=3.5}", []),
    (b"redis.setresp(3); return {double=0.1}", []),
    (b"redis.setresp(3); return {map={total=3, note='see $fc1$ in docs'}}", []),
    (b"redis.setresp(3); return {set={a=true, b=true}}", []),
    (
        b"redis.setresp(3); return {1, {double=2.5}, {map={x={set={y=true}}}}, "
        b"'tag $fc1$ mid-string', {big_number='123456789012345678901234567890'}, true, false}",
        [],
    ),
    (b"return {'a $fc1$ inside ' .. KEYS[1], redis.call('HLEN', KEYS[1])}", [b"iad:1"]),
    (b"return redis.error_reply('bad $fc1$ thing')", []),
    (b"return redis.call('HGET', KEYS[1], 'imap')", [b"iad:404"]),  # nil
]


def test_script_replies_without_protected_data_pass_through_byte_identical(
    fc: Fieldcrypt, protocol: int
) -> None:
    client = fc.client(protocol)
    client.hset("iad:1", mapping=ACCOUNTS[b"iad:1"])
    client.hset("iad:9", mapping={"user": "nobody", "host": "h"})
    fc.direct.hset("session:1", mapping={"imap": "not-a-secret-here", "ttl": "3600"})
    assert fc.proxy is not None
    through, direct = Wire(fc.proxy.port, protocol), Wire(fc.upstream_port, protocol)
    try:
        for body, keys in PASS_THROUGH_SCRIPTS:
            request = [b"EVAL", body, b"%d" % len(keys), *keys]
            expected = direct.call(*request)
            assert through.call(*request) == expected, body
            sha = hashlib.sha1(body).hexdigest().encode()
            assert through.call(b"EVALSHA", sha, *request[2:]) == expected, body
    finally:
        through.close()
        direct.close()


# --- Order -------------------------------------------------------------------------------


def test_a_mixed_pipeline_of_scripts_and_commands_keeps_its_order(
    fc: Fieldcrypt, protocol: int
) -> None:
    def run(client: redis.Redis) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        pipe.hset("iad:1", mapping=ACCOUNTS[b"iad:1"])
        pipe.eval(LIST_ACCOUNTS, 1, "iad:1")
        pipe.incr("counter")
        pipe.fcall("fcset", 1, "iad:2", *itertools.chain.from_iterable(ACCOUNTS[b"iad:2"].items()))
        pipe.evalsha(
            SET_IF_MISSING_SHA, 1, "settings", "serviceSecret", "secret p", MARKER, "origin p"
        )
        pipe.hget("settings", "serviceSecret")
        pipe.eval(RESP3_HGETALL, 1, "iad:2")
        pipe.set("plain", "v")
        pipe.eval(HGET_IMAP, 1, "iad:1")
        pipe.evalsha("0" * 40, 0)
        pipe.hgetall("iad:2")
        pipe.fcall_ro("fcget", 1, "iad:2", "oauth2")
        pipe.incr("counter")
        pipe.eval(LIST_ACCOUNTS, 2, "iad:2", "iad:1", 1)
        replies = [str(r) if isinstance(r, Exception) else r for r in pipe.execute(False)]
        # A hash's field order is the server's (ciphertext is longer than 64 bytes, so a
        # protected hash is no listpack): compare hashes as dicts.
        replies[1], replies[13] = listing(replies[1]), listing(replies[13])
        replies[6] = as_hash(replies[6])
        return replies

    fc.direct.script_load(SET_IF_MISSING)
    direct = redis.Redis(host=HOST, port=fc.upstream_port, protocol=protocol)
    try:
        expected = run(direct)
    finally:
        direct.close()
    fc.direct.flushall()

    assert run(fc.client(protocol)) == expected
    assert_sealed(fc.direct, protected_of(b"iad:2"), fc.key_a)
    assert_sealed(
        fc.direct,
        {(b"settings", b"serviceSecret"): b"secret p", (b"settings", MARKER): b"origin p"},
        fc.key_a,
    )


# --- Migration ---------------------------------------------------------------------------


def test_migration_rekeys_values_written_by_declared_scripts(fc: Fieldcrypt, protocol: int) -> None:
    client = fc.client(protocol)
    for key, mapping in ACCOUNTS.items():
        client.fcall("fcset", 1, key, *itertools.chain.from_iterable(mapping.items()))
    client.eval(SET_IF_MISSING, 1, "settings", "serviceSecret", "secret m", MARKER, "origin m")
    written = {
        (b"settings", b"serviceSecret"): b"secret m",
        (b"settings", MARKER): b"origin m",
    }
    for key in ACCOUNTS:
        written.update(protected_of(key))
    assert_sealed(fc.direct, written, fc.key_a)

    fc.restart(fc.key_b, fc.key_a, decrypt_only={fc.key_a})
    client = fc.client(protocol)
    started = plain_pairs(client.execute_command("MIGRATE"))
    assert started["state"] == "running", started
    final = plain_pairs(client.execute_command("MIGRATE", "WAIT", "60"))

    assert (final["job"], final["state"]) == (started["job"], "done"), final
    assert_sealed(fc.direct, written, fc.key_b)
    keys = list(ACCOUNTS)
    assert listing(client.eval(LIST_ACCOUNTS, 3, *keys)) == expected_listing(keys)
    assert client.hmget("settings", "serviceSecret", MARKER) == [b"secret m", b"origin m"]


# --- Edges: function names, repeated patterns, CLIENT REPLY, MULTI, odd values ---------


def test_fcall_finds_a_declared_function_by_its_name_in_any_case(
    fc: Fieldcrypt, protocol: int
) -> None:
    client = fc.client(protocol)  # Redis finds a function by its name in any case

    assert client.execute_command("FCALL", "FCSET", 1, "iad:30", "imap", "imap-30") == 1
    assert client.execute_command("fcall", "FcSet", 1, "iad:30", "smtp", "smtp-30") == 1

    assert_sealed(
        fc.direct, {(b"iad:30", b"imap"): b"imap-30", (b"iad:30", b"smtp"): b"smtp-30"}, fc.key_a
    )
    assert fc.seen_scripts(client) == {}


def test_a_repeated_pattern_after_a_fixed_argument_seals_every_pair(
    fc: Fieldcrypt, protocol: int
) -> None:
    client = fc.client(protocol)
    pairs = [x for name in IAD_PROTECTED for x in (name, name + b"-31")]

    assert client.eval(HSET_TTL, 1, "iad:31", 3600, *pairs) == 1

    assert_sealed(fc.direct, {(b"iad:31", n): n + b"-31" for n in IAD_PROTECTED}, fc.key_a)
    assert fc.direct.ttl("iad:31") > 0
    assert client.hgetall("iad:31") == {n: n + b"-31" for n in IAD_PROTECTED}


def test_records_of_three_with_a_pair_in_each_are_sealed_with_repeat_3(
    fc: Fieldcrypt, protocol: int
) -> None:
    client = fc.client(protocol)
    records = [x for n in IAD_PROTECTED for x in (n, n + b"-34", b"set by " + n)]

    assert client.eval(WITH_NOTES, 1, "iad:34", *records) == 3

    assert_sealed(fc.direct, {(b"iad:34", n): n + b"-34" for n in IAD_PROTECTED}, fc.key_a)
    assert fc.direct.hget("iad:34", "smtpNote") == b"set by smtp"  # no rule: as written


def test_a_redis_py_pipeline_loads_a_body_redis_has_but_the_proxy_never_saw(
    fc: Fieldcrypt, protocol: int
) -> None:
    """redis-py asks SCRIPT EXISTS before a pipeline's EVALSHA and loads only what is
    missing: the proxy answers 0 for a body it hasn't seen, so it sees it."""
    trimmed = SET_IF_MISSING.strip()  # a body-file declaration, as a client may send it
    fc.direct.script_load(trimmed)  # Redis has it from before this proxy started
    script = fc.client(protocol).register_script(trimmed)
    pipe = fc.client(protocol).pipeline(transaction=True)
    script(keys=["iad:35"], args=["imap", "imap-35", "imapSetBy", "p"], client=pipe)

    assert pipe.execute() == [1]
    assert_sealed(fc.direct, {(b"iad:35", b"imap"): b"imap-35"}, fc.key_a)
    assert fc.client(protocol).script_exists(hashlib.sha1(trimmed).hexdigest()) == [True]


def test_a_damaged_envelope_in_a_script_reply_follows_on_decrypt_error(
    fc: Fieldcrypt, protocol: int
) -> None:
    client = fc.client(protocol)
    client.hset("iad:36", "imap", "imap-36")
    stored = fc.direct.hget("iad:36", "imap")
    assert stored is not None
    damaged = stored[:40] + b"." + stored[41:]  # not base64url: malformed, under our key
    fc.direct.hset("iad:36", "imap", damaged)

    assert "malformed envelope" in error_of(lambda: client.hget("iad:36", "imap"))
    assert "cannot decrypt" in error_of(lambda: client.eval(HGET_IMAP, 1, "iad:36"))
    listed = b"return redis.call('HGETALL', KEYS[1])"
    assert "cannot decrypt" in error_of(lambda: client.eval(listed, 1, "iad:36"))


def test_requests_the_proxy_answers_itself_keep_client_reply_in_step(
    fc: Fieldcrypt, protocol: int
) -> None:
    """A request the proxy answers itself (a refusal, the one-off NOSCRIPT, FIELDCRYPT
    RELOAD once it's done) never reaches Redis: under SKIP one that Redis skips goes in
    its place, under OFF nothing shows. RESET's reply Redis skips itself (not under OFF)."""
    fc.client(protocol).hset("iad:32", "imap", "imap-32")
    read = ["HGET", "iad:32", "imap"]
    plain = b"$7\r\nimap-32\r\n"
    sha = fc.direct.script_load(UNDECLARED_WRITER)
    cases: list[tuple[str, list[str], bytes]] = [  # policy, request, its reply under OFF
        ("refuse", ["EVAL", UNDECLARED_WRITER.decode(), "1", "iad:32", "imap", "leak"], b""),
        ("passthrough", ["EVALSHA", sha, "1", "iad:32", "imap", "leak"], b""),  # NOSCRIPT
        ("passthrough", ["FIELDCRYPT", "RELOAD"], b""),
        ("passthrough", ["RESET"], b"+RESET\r\n"),
    ]
    for policy, answered_here, under_off in cases:
        for mode in ("SKIP", "OFF"):
            fc.restart(script_policy=policy)  # a proxy that never saw the script's body
            assert fc.proxy is not None
            through = Wire(fc.proxy.port, protocol)
            try:
                requests: list[list[str | bytes]] = [["CLIENT", "REPLY", mode], [*answered_here]]
                requests.append(read)
                if mode == "OFF":
                    requests.append(["CLIENT", "REPLY", "ON"])
                requests.append(read)
                expected = [plain, plain] if mode == "SKIP" else [b"+OK\r\n", plain]
                if mode == "OFF" and under_off:
                    expected = [under_off, plain, *expected]
                got = through.pipeline(requests, len(expected))
                assert got == expected, (answered_here[0], mode)
                assert through.call("PING", "end") == b"$3\r\nend\r\n"
            finally:
                through.close()
    assert_sealed(fc.direct, {(b"iad:32", b"imap"): b"imap-32"}, fc.key_a)


def test_the_one_off_noscript_inside_multi_aborts_the_transaction(
    fc: Fieldcrypt, protocol: int
) -> None:
    """Redis has the script, this proxy never saw its body: NOSCRIPT makes the client send
    it. Inside MULTI that is an error at queue time, so EXEC runs nothing (never half)."""
    sha = fc.direct.script_load(UNDECLARED_WRITER)
    client = fc.client(protocol)
    multi = client.pipeline(transaction=True)
    multi.incr("counter")
    multi.evalsha(sha, 1, "iad:33", "user", "u33")

    with pytest.raises(redis.exceptions.NoScriptError):
        multi.execute()
    assert fc.direct.exists("counter", "iad:33") == 0
    assert client.eval(UNDECLARED_WRITER, 1, "iad:33", "user", "u33") == 1  # the body, then
    multi.incr("counter")
    multi.evalsha(sha, 1, "iad:33", "host", "h33")
    assert multi.execute() == [1, 1]
    assert client.hgetall("iad:33") == {b"user": b"u33", b"host": b"h33"}


def test_values_that_only_start_like_an_envelope_come_back_as_stored(
    fc: Fieldcrypt, protocol: int
) -> None:
    odd = {b"bio": b"$fc1$f$AAAAAAAAAAA$ just text", b"imap": b"$fc1$ also text"}
    fc.direct.hset("profile:1", mapping=odd)  # no rule covers profile:*
    client = fc.client(protocol)

    assert client.hgetall("profile:1") == odd
    assert as_hash(client.eval(b"return redis.call('HGETALL', KEYS[1])", 1, "profile:1")) == odd
    assert client.eval(HGET_IMAP, 1, "profile:1") == odd[b"imap"]
    assert fc.direct.hgetall("profile:1") == odd


def test_a_value_that_cannot_be_opened_is_never_named_by_the_value_before_it(
    fc: Fieldcrypt, protocol: int, caplog: pytest.LogCaptureFixture
) -> None:
    """In an HMGET-shaped reply the element before a value is another value: it must not
    appear as the field's name in the error or the log, opened or not."""
    client = fc.client(protocol)
    client.hset("settings", mapping={"theme": "dark", "serviceSecret": "service-secret-value"})
    other = KeyRing([Key.from_secret(fc.key_b)])  # not in the proxy's ring
    fc.direct.hset("settings", "googleClientSecret", other.encrypt(b"g", b"googleClientSecret"))
    hmget = b"redis.call('HMGET', KEYS[1], 'theme', 'googleClientSecret', 'serviceSecret', "
    hmget += b"'googleClientSecret')"
    spliced = b"return " + hmget
    through_tree = b"return {" + hmget + b", {ok='$fc1$ a status'}}"  # not a bulk: the tree

    with caplog.at_level(logging.INFO, logger="fieldcrypt"):
        errors = [
            error_of(lambda b=body: client.eval(b, 1, "settings"))
            for body in (spliced, through_tree)
        ]

    lines = [r.getMessage() for r in caplog.records if r.name == "fieldcrypt"]
    assert len(lines) >= 2
    for text in (*errors, *lines):
        assert "dark" not in text and "service-secret-value" not in text, text
    assert all("cannot decrypt a value in a script reply (field '?')" in e for e in errors)
