"""Field encryption through the proxy, against real Redis and Valkey servers.

Every test drives fieldcrypt with ordinary clients (redis-py, or a bare socket where the
exact reply bytes matter) and then reads the raw store directly on the upstream port:
protected values must be `$fc1$` envelopes there and nowhere in clear, while everything
else is exactly what the same write made directly would have left.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from redis.exceptions import ResponseError

from proxy import resp
from proxy.commands import FieldCrypt
from proxy.crypto import HEADER_PREFIX, Key, KeyRing
from tests.servers import ALL_SERVER_KINDS, ConfiguredProxy, EmbeddedServer, Wire

UPSTREAM_KINDS = ALL_SERVER_KINDS  # the `upstream` kinds here (tests/conftest.py)
UPSTREAM_MODES = ["pooled", "dedicated"]

HOST = "127.0.0.1"

AUTH_FAILED = (
    "authentication failed (wrong key, tampered value, or value moved from another field or key)"
)
MALFORMED = "malformed envelope"

# The hashes the tests write through the proxy. `iad:*` protects imap, smtp and oauth2;
# `settings` (db 0 only) protects serviceSecret, *ClientSecret and smtpServerPassword.
IAD_1: dict[bytes, bytes] = {
    b"imap": b"imap-password-of-iad-1",
    b"smtp": b"smtp-password-of-iad-1",
    b"oauth2": b"oauth2-refresh-token-of-iad-1",
    b"user": b"alice@example.com",
    b"host": b"mail.example.com",
    b"port": b"993",
}
IAD_PROTECTED = frozenset({b"imap", b"smtp", b"oauth2"})
SETTINGS_HASH: dict[bytes, bytes] = {
    b"serviceSecret": b"service-secret-of-settings",
    b"googleClientSecret": b"google-client-secret-of-settings",
    b"azureClientSecret": b"azure-client-secret-of-settings",
    b"smtpServerPassword": b"smtp-server-password-of-settings",
    b"theme": b"dark",
    b"ClientSecretRotatedAt": b"2025-01-01",  # does not end in ClientSecret: not protected
}
SETTINGS_PROTECTED = frozenset(
    {b"serviceSecret", b"googleClientSecret", b"azureClientSecret", b"smtpServerPassword"}
)
# A key no rule names, with a field called like a protected one.
SESSION_1: dict[bytes, bytes] = {
    b"imap": b"not-a-secret-here",
    b"user": b"bob@example.com",
    b"ttl": b"3600",
}
PROTECTED: dict[tuple[bytes, bytes], bytes] = {
    **{(b"iad:1", f): v for f, v in IAD_1.items() if f in IAD_PROTECTED},
    **{(b"settings", f): v for f, v in SETTINGS_HASH.items() if f in SETTINGS_PROTECTED},
}
# Exactly 32 bytes: its envelope's payload is 80 characters, a multiple of 4, so a cut of
# 4 characters still decodes as base64 and reaches the authentication check.
SECRET_32 = b"correct-horse-battery-staple-32b"
# Test vector 1 of docs/format.md: a real envelope under a key in no ring here.
FOREIGN_ENVELOPE = b"$fc1$f$Op0WflhDMWw$AAECAwQFBgcICQoLZ-ppKStG_QN9hN43i_pKT3snLfP4TY4"
SCRIPT = "return redis.call('HGET', KEYS[1], ARGV[1])"


def kid_of_secret(secret: str) -> str:
    return Key.from_secret(secret).kid


def ring_of(*secrets: str) -> KeyRing:
    return KeyRing([Key.from_secret(secret) for secret in secrets])


def envelope_length(plaintext_length: int) -> int:
    """Stored length of an envelope, from docs/format.md."""
    return 19 + math.ceil(4 * (28 + plaintext_length) / 3)


class Fieldcrypt(ConfiguredProxy):
    """fieldcrypt in front of a real server with the EmailEngine-style rules;
    `restart` brings it back with another key ring or other rule options."""

    def restart(
        self,
        *ring: str,
        decrypt_only: Collection[str] = (),
        on_decrypt_error: str = "error",
        bind_key: bool = False,
        require_encrypted: bool = False,
        refuse_scripts: bool = False,
    ) -> None:
        """(Re)start with the secrets of `ring` in order (default: key A alone)."""
        self.start(
            {
                "upstream": f"redis://{HOST}:{self.upstream_port}",
                "keys": self.key_entries(ring or (self.key_a,), decrypt_only),
                "rules": [
                    {
                        "key": "iad:*",
                        "fields": ["imap", "smtp", "oauth2"],
                        "bind_key": bind_key,
                        "require_encrypted": require_encrypted,
                        "refuse_scripts": refuse_scripts,
                    },
                    {
                        "key": "settings",
                        "fields": ["serviceSecret", "*ClientSecret", "smtpServerPassword"],
                        "db": 0,
                    },
                ],
                "on_decrypt_error": on_decrypt_error,
            }
        )

    @property
    def crypt(self) -> FieldCrypt:
        assert self.proxy is not None
        crypt: FieldCrypt = self.proxy.state.crypt
        return crypt

    def counters(self) -> tuple[dict[str, int], dict[str, int]]:
        """(counts, failures) of the running proxy, read on its own loop."""
        assert self.proxy is not None
        crypt = self.crypt
        return self.proxy.run(lambda: (dict(crypt.counts), dict(crypt.failures)))


@pytest.fixture
def fc(upstream: EmbeddedServer, tmp_path: Path, upstream_mode: str) -> Iterator[Fieldcrypt]:
    """fieldcrypt with key ring [A] in front of a flushed `upstream`."""
    harness = Fieldcrypt(upstream, tmp_path, upstream_mode)
    harness.direct.flushall()
    harness.restart()
    yield harness
    harness.close()


@pytest.fixture
def seeded(fc: Fieldcrypt) -> Fieldcrypt:
    """IAD_1, SETTINGS_HASH and SESSION_1 written through the proxy, and the same data
    written directly under `mirror:` names that no rule matches."""
    client = fc.client()
    for key, mapping in (("iad:1", IAD_1), ("settings", SETTINGS_HASH), ("session:1", SESSION_1)):
        client.hset(key, mapping=mapping)
        fc.direct.hset(f"mirror:{key}", mapping=mapping)
    return fc


# --- The raw store ----------------------------------------------------------------


def raw_store(direct: redis.Redis) -> dict[bytes, Any]:
    """Every key of the database as the server holds it."""
    store: dict[bytes, Any] = {}
    for key in direct.scan_iter(count=1000):
        kind = direct.type(key)
        if kind == b"hash":
            store[key] = direct.hgetall(key)
        elif kind == b"string":
            store[key] = direct.get(key)
        elif kind == b"list":
            store[key] = direct.lrange(key, 0, -1)
        else:
            store[key] = direct.dump(key)
    return store


def stored_bytes(store: Mapping[bytes, Any]) -> Iterator[bytes]:
    """Every key name, field name and value in a raw store."""
    for key, value in store.items():
        yield key
        if isinstance(value, dict):
            for field_name, field_value in value.items():
                yield field_name
                yield field_value
        elif isinstance(value, list):
            yield from value
        else:
            yield value


def assert_sealed(
    store: Mapping[bytes, Any],
    ring: KeyRing,
    protected: Mapping[tuple[bytes, bytes], bytes],
) -> None:
    """Each protected value is stored as an envelope that opens to its plaintext, and no
    plaintext of a protected value appears anywhere in the store (but in the `mirror:`
    keys, which tests write in clear on purpose)."""
    for (key, field_name), plaintext in protected.items():
        stored = store[key][field_name]
        assert stored.startswith(HEADER_PREFIX), (key, field_name)
        assert ring.decrypt(stored, field_name, key) == plaintext
    leaks = [
        (plaintext, blob)
        for blob in stored_bytes(
            {key: value for key, value in store.items() if not key.startswith(b"mirror:")}
        )
        for plaintext in protected.values()
        if plaintext in blob
    ]
    assert leaks == []


def without(mapping: Mapping[bytes, bytes], names: Collection[bytes]) -> dict[bytes, bytes]:
    return {name: value for name, value in mapping.items() if name not in names}


def commandstat(direct: redis.Redis, command: str) -> dict[str, Any] | None:
    """Redis's own record of how often it ran `command` (None: never)."""
    stats: dict[str, Any] = direct.info("commandstats")
    found: dict[str, Any] | None = stats.get(f"cmdstat_{command.lower()}")
    return found


def error_of(call: Callable[[], object]) -> str:
    """The text of the error reply `call` gets (redis-py drops the leading `ERR `)."""
    with pytest.raises(ResponseError) as caught:
        call()
    return str(caught.value)


def write_hash(client: redis.Redis, command: str, key: str, mapping: Mapping[bytes, bytes]) -> None:
    if command == "HSETNX":
        for field_name, value in mapping.items():
            assert client.execute_command("HSETNX", key, field_name, value) == 1
    else:
        client.execute_command(command, key, *itertools.chain.from_iterable(mapping.items()))


# --- Writes -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["HSET", "HMSET", "HSETNX"])
def test_writes_seal_protected_values_and_leave_the_rest_as_a_direct_write_would(
    fc: Fieldcrypt, command: str
) -> None:
    client = fc.client()
    for key, mapping in (("iad:1", IAD_1), ("settings", SETTINGS_HASH), ("session:1", SESSION_1)):
        write_hash(client, command, key, mapping)
        write_hash(fc.direct, command, f"mirror:{key}", mapping)

    store = raw_store(fc.direct)
    assert_sealed(store, ring_of(fc.key_a), PROTECTED)
    for key, protected in ((b"iad:1", IAD_PROTECTED), (b"settings", SETTINGS_PROTECTED)):
        mirror = store[b"mirror:" + key]
        # Same fields; not the same order: envelopes are longer than hash-max-listpack-value,
        # so the server keeps the encrypted hash as a hash table, not a listpack.
        assert store[key].keys() == mirror.keys()
        assert without(store[key], protected) == without(mirror, protected)
    assert store[b"session:1"] == store[b"mirror:session:1"] == SESSION_1
    assert fc.direct.dump("session:1") == fc.direct.dump("mirror:session:1")

    assert client.hgetall("iad:1") == IAD_1
    assert client.hgetall("settings") == SETTINGS_HASH
    assert client.hgetall("session:1") == SESSION_1


def test_hsetnx_on_an_existing_protected_field_keeps_the_stored_envelope(fc: Fieldcrypt) -> None:
    client = fc.client()
    assert client.hsetnx("iad:1", "imap", "first") == 1
    stored = fc.direct.hget("iad:1", "imap")

    assert client.hsetnx("iad:1", "imap", "second") == 0

    assert fc.direct.hget("iad:1", "imap") == stored
    assert client.hget("iad:1", "imap") == b"first"


def test_settings_rule_applies_only_in_db_0(fc: Fieldcrypt) -> None:
    in_db0, in_db1 = fc.client(db=0), fc.client(db=1)
    in_db0.hset("settings", "serviceSecret", "secret-in-db-0")
    in_db1.hset("settings", "serviceSecret", "secret-in-db-1")
    in_db1.hset("iad:1", "imap", "imap-in-db-1")  # the iad:* rule names no db

    assert fc.direct.hget("settings", "serviceSecret").startswith(HEADER_PREFIX)
    raw_db1 = redis.Redis(host=HOST, port=fc.upstream_port, db=1)
    try:
        assert raw_db1.hget("settings", "serviceSecret") == b"secret-in-db-1"
        assert raw_db1.hget("iad:1", "imap").startswith(HEADER_PREFIX)
    finally:
        raw_db1.close()
    assert in_db0.hget("settings", "serviceSecret") == b"secret-in-db-0"
    assert in_db1.hget("settings", "serviceSecret") == b"secret-in-db-1"
    assert in_db1.hget("iad:1", "imap") == b"imap-in-db-1"


@pytest.mark.parametrize("index", ["99", "16", "01", "1_0", " 1", "-1", "+1"])
def test_a_select_redis_refuses_leaves_the_proxy_on_the_db_in_use(
    fc: Fieldcrypt, index: str
) -> None:
    """Requests behind a SELECT are matched against the db it names before its reply
    comes (or never comes, under CLIENT REPLY OFF): one Redis refuses must not move
    the proxy off db 0, where the settings rule protects these fields."""
    written = {
        b"serviceSecret": b"s-pipelined",
        b"googleClientSecret": b"s-in-multi",
        b"smtpServerPassword": b"s-replies-off",
    }
    (pipelined, in_multi, replies_off) = (["HSET", "settings", f, v] for f, v in written.items())
    conversations: list[tuple[list[list[str | bytes]], int]] = [
        ([["SELECT", index], pipelined], 2),
        ([["MULTI"], ["SELECT", index], in_multi, ["EXEC"]], 4),
        (
            [["CLIENT", "REPLY", "OFF"], ["SELECT", index], ["CLIENT", "REPLY", "ON"], replies_off],
            2,
        ),
    ]
    through = fc.wire()
    try:
        replies = [r for requests, n in conversations for r in through.pipeline(requests, n)]
        read = through.call("HMGET", "settings", *written)
    finally:
        through.close()

    assert replies[0].startswith(b"-ERR") and replies[-2:] == [b"+OK\r\n", b":1\r\n"], replies
    assert read == resp.encode_request(list(written.values()))  # an array of bulks
    assert_sealed(
        raw_store(fc.direct), ring_of(fc.key_a), {(b"settings", f): v for f, v in written.items()}
    )


def test_requests_behind_a_select_keep_the_rules_of_the_db_they_were_sent_in(
    fc: Fieldcrypt,
) -> None:
    """A read's reply is opened under the db it was sent in, though a SELECT pipelined
    behind it has moved on; a write behind SELECT then RESET is in the first db again."""
    fc.client().hset("settings", "serviceSecret", "s-0")
    through = fc.wire()
    try:
        read, _, _, _ = through.pipeline(
            [
                ["HGETALL", "settings"],
                ["SELECT", "1"],
                ["RESET"],
                ["HSET", "settings", "smtpServerPassword", "p-0"],
            ],
            4,
        )
        in_multi = through.pipeline(
            [["MULTI"], ["HGETALL", "settings"], ["SELECT", "1"], ["EXEC"]], 4
        )[-1]
    finally:
        through.close()

    assert b"s-0" in read and HEADER_PREFIX not in read
    assert b"s-0" in in_multi and HEADER_PREFIX not in in_multi
    store = raw_store(fc.direct)
    assert_sealed(store, ring_of(fc.key_a), {(b"settings", b"smtpServerPassword"): b"p-0"})


# --- Reads ------------------------------------------------------------------------

# Each read, and how to compare its replies: "exact" bytes, or elements whose order is
# the server's hash order ("pairs": field/value pairs, "items": single elements,
# "scan": cursor then pairs). An encrypted hash's values are longer than
# hash-max-listpack-value, so the server keeps it as a hash table, in another order
# than the listpack of the same data in clear; every element is still compared as bytes.
READ_COMMANDS: dict[str, tuple[list[str], str]] = {
    "hget-protected": (["HGET", "{iad}", "oauth2"], "exact"),
    "hget-unprotected": (["HGET", "{iad}", "user"], "exact"),
    "hget-missing": (["HGET", "{iad}", "nope"], "exact"),
    "hmget": (["HMGET", "{iad}", "imap", "user", "nope", "smtp"], "exact"),
    "hgetall": (["HGETALL", "{iad}"], "pairs"),
    "hgetall-settings": (["HGETALL", "{settings}"], "pairs"),
    "hvals": (["HVALS", "{iad}"], "items"),
    "hvals-settings": (["HVALS", "{settings}"], "items"),
    "hscan": (["HSCAN", "{iad}", "0", "COUNT", "100"], "scan"),
    "hscan-match": (["HSCAN", "{iad}", "0", "MATCH", "*m*", "COUNT", "100"], "scan"),
    "hrandfield-whole-hash-withvalues": (["HRANDFIELD", "{iad}", "100", "WITHVALUES"], "pairs"),
    "hrandfield-names-only": (["HRANDFIELD", "{iad}", "100"], "items"),
    "hstrlen-protected": (["HSTRLEN", "{iad}", "imap"], "exact"),
    "hstrlen-unprotected": (["HSTRLEN", "{iad}", "host"], "exact"),
    "hstrlen-missing": (["HSTRLEN", "{iad}", "nope"], "exact"),
    "hkeys": (["HKEYS", "{iad}"], "items"),
    "hlen": (["HLEN", "{iad}"], "exact"),
    "hexists-protected": (["HEXISTS", "{iad}", "smtp"], "exact"),
    "hexists-missing": (["HEXISTS", "{iad}", "nope"], "exact"),
    # a key the rules cover, but missing: the nulls and empty replies of each shape
    "missing-hget": (["HGET", "{iad}:missing", "imap"], "exact"),
    "missing-hmget": (["HMGET", "{iad}:missing", "imap", "user"], "exact"),
    "missing-hgetall": (["HGETALL", "{iad}:missing"], "exact"),
    "missing-hvals": (["HVALS", "{iad}:missing"], "exact"),
    "missing-hscan": (["HSCAN", "{iad}:missing", "0"], "exact"),
    "missing-hrandfield": (["HRANDFIELD", "{iad}:missing", "3", "WITHVALUES"], "exact"),
    "missing-hstrlen": (["HSTRLEN", "{iad}:missing", "imap"], "exact"),
}


def comparable(frame: bytes, shape: str) -> object:
    """A reply with its hash-ordered elements sorted; every element's type and bytes kept."""
    if shape == "exact":
        return frame
    value, end = resp.decode(frame)
    assert end == len(frame) and isinstance(value, resp.Aggregate)
    if shape == "scan":
        cursor, page = value.items
        return value.kind, resp.encode_value(cursor), comparable(resp.encode_value(page), "pairs")
    items = [resp.encode_value(item) for item in value.items]
    nested = bool(items) and items[0].startswith(b"*")  # RESP3 HRANDFIELD: [field, value]s
    if shape == "pairs" and not nested:
        return value.kind, sorted(zip(items[::2], items[1::2], strict=True))
    return value.kind, sorted(items)


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
@pytest.mark.parametrize("read", list(READ_COMMANDS.values()), ids=list(READ_COMMANDS))
def test_read_replies_are_those_of_an_unencrypted_server(
    seeded: Fieldcrypt, read: tuple[list[str], str], protocol: int
) -> None:
    """The reply through the proxy for the encrypted hash is the reply the server gives
    for the same data stored in clear (the `mirror:` copy), element for element."""
    command, shape = read
    via_proxy = seeded.wire(protocol)
    direct = Wire(seeded.upstream_port, protocol)
    try:
        proxied = via_proxy.call(*(a.format(iad="iad:1", settings="settings") for a in command))
        expected = direct.call(
            *(a.format(iad="mirror:iad:1", settings="mirror:settings") for a in command)
        )
    finally:
        via_proxy.close()
        direct.close()
    assert comparable(proxied, shape) == comparable(expected, shape)
    assert raw_store(seeded.direct)[b"iad:1"] != IAD_1  # the proxy did the work


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
def test_reads_return_plaintext_to_redis_py(seeded: Fieldcrypt, protocol: int) -> None:
    client = seeded.client(protocol)

    assert client.hget("iad:1", "imap") == IAD_1[b"imap"]
    assert client.hmget("iad:1", ["smtp", "user", "nope"]) == [
        IAD_1[b"smtp"],
        b"alice@example.com",
        None,
    ]
    assert client.hgetall("iad:1") == IAD_1
    assert client.hgetall("settings") == SETTINGS_HASH
    assert sorted(client.hvals("iad:1")) == sorted(IAD_1.values())
    assert client.hscan("iad:1") == (0, IAD_1)
    assert dict(client.hscan_iter("settings", match="*Secret")) == {
        f: v for f, v in SETTINGS_HASH.items() if f.endswith(b"Secret")
    }
    pairs = client.hrandfield("iad:1", -20, withvalues=True)
    if protocol == 3:
        assert all(isinstance(pair, list) and len(pair) == 2 for pair in pairs)
        drawn = [tuple(pair) for pair in pairs]
    else:
        drawn = list(zip(pairs[::2], pairs[1::2], strict=True))
    assert len(drawn) == 20
    assert set(drawn) <= set(IAD_1.items())


def test_hgetall_resp3_map_values_are_decrypted(seeded: Fieldcrypt) -> None:
    wire = seeded.wire(protocol=3)
    try:
        frame = wire.call("HGETALL", "iad:1")
    finally:
        wire.close()
    reply, end = resp.decode(frame)
    assert end == len(frame)
    assert isinstance(reply, resp.Aggregate) and reply.kind == ord("%")
    items = [item.data for item in reply.items if isinstance(item, resp.Blob)]
    assert dict(zip(items[::2], items[1::2], strict=True)) == IAD_1


def test_hrandfield_withvalues_resp3_pairs_are_decrypted(seeded: Fieldcrypt) -> None:
    wire = seeded.wire(protocol=3)
    try:
        frame = wire.call("HRANDFIELD", "iad:1", "-12", "WITHVALUES")
    finally:
        wire.close()
    reply, _ = resp.decode(frame)
    assert isinstance(reply, resp.Aggregate) and reply.kind == ord("*")
    assert len(reply.items) == 12
    for pair in reply.items:
        assert isinstance(pair, resp.Aggregate) and len(pair.items) == 2
        name, value = pair.items
        assert isinstance(name, resp.Blob) and isinstance(value, resp.Blob)
        assert IAD_1[name.data] == value.data


def test_hstrlen_gives_the_plaintext_length(fc: Fieldcrypt) -> None:
    client = fc.client()
    client.hset("iad:1", mapping={"imap": "pässwörd", "smtp": "", "user": "alice"})
    fc.direct.hset("iad:1", "oauth2", "legacy-cleartext")  # written before encryption

    assert client.hstrlen("iad:1", "imap") == len("pässwörd".encode()) == 10
    assert fc.direct.hstrlen("iad:1", "imap") == envelope_length(10)
    assert client.hstrlen("iad:1", "smtp") == 0
    assert client.hstrlen("iad:1", "oauth2") == len(b"legacy-cleartext")
    assert client.hstrlen("iad:1", "user") == 5
    assert client.hstrlen("iad:1", "nope") == 0
    assert client.hstrlen("iad:missing", "imap") == 0


def test_field_name_commands_and_hdel_work_as_on_an_unencrypted_server(seeded: Fieldcrypt) -> None:
    client = seeded.client()
    direct = seeded.direct

    assert sorted(client.hkeys("iad:1")) == sorted(direct.hkeys("mirror:iad:1")) == sorted(IAD_1)
    assert client.hlen("iad:1") == direct.hlen("mirror:iad:1") == len(IAD_1)
    assert client.hexists("iad:1", "imap") and client.hexists("iad:1", "user")
    assert not client.hexists("iad:1", "nope")

    assert client.hdel("iad:1", "imap", "user", "nope") == 2
    assert direct.hdel("mirror:iad:1", "imap", "user", "nope") == 2

    remaining = [b"host", b"oauth2", b"port", b"smtp"]
    assert sorted(direct.hkeys("iad:1")) == sorted(direct.hkeys("mirror:iad:1")) == remaining
    assert not client.hexists("iad:1", "imap")
    assert client.hgetall("iad:1") == without(IAD_1, {b"imap", b"user"})


# --- Arithmetic ---------------------------------------------------------------------


@pytest.mark.parametrize(("command", "increment"), [("HINCRBY", "1"), ("HINCRBYFLOAT", "1.5")])
def test_arithmetic_on_a_protected_field_is_refused_before_reaching_redis(
    seeded: Fieldcrypt, command: str, increment: str
) -> None:
    client = seeded.client()
    stored = seeded.direct.hget("iad:1", "imap")
    calls_before = commandstat(seeded.direct, command)

    message = error_of(lambda: client.execute_command(command, "iad:1", "imap", increment))

    assert message == (
        f"fieldcrypt: {command} cannot work on field 'imap' of key 'iad:1': it is stored encrypted"
    )
    assert commandstat(seeded.direct, command) == calls_before
    assert seeded.direct.hget("iad:1", "imap") == stored
    assert client.hget("iad:1", "imap") == IAD_1[b"imap"]


def test_arithmetic_on_unprotected_fields_reaches_redis(seeded: Fieldcrypt) -> None:
    client = seeded.client()
    before = {c: commandstat(seeded.direct, c) for c in ("HINCRBY", "HINCRBYFLOAT")}

    assert client.hincrby("iad:1", "logins", 3) == 3
    assert client.hincrbyfloat("iad:1", "score", 1.5) == 1.5
    assert client.hincrby("session:2", "imap", 2) == 2  # a protected name, but no rule's key
    assert client.hincrbyfloat("session:2", "smtp", 0.5) == 0.5
    for command, stat in before.items():
        after = commandstat(seeded.direct, command)
        assert after is not None
        assert after["calls"] == (0 if stat is None else stat["calls"]) + 2
    assert seeded.direct.hget("iad:1", "logins") == b"3"
    assert seeded.direct.hget("iad:1", "score") == b"1.5"


# --- SORT ---------------------------------------------------------------------------


@pytest.fixture
def sortable(fc: Fieldcrypt) -> Fieldcrypt:
    """ids = 1..4 and iad:1..3 (iad:4 missing) through the proxy; the same in clear under
    mirror-ids and mirror:1..3."""
    client = fc.client()
    for n, rank in ((1, 30), (2, 10), (3, 20)):
        mapping = {"imap": f"imap-secret-{n}", "rank": str(rank), "user": f"user-{n}"}
        client.hset(f"iad:{n}", mapping=mapping)
        fc.direct.hset(f"mirror:{n}", mapping=mapping)
    client.rpush("ids", 1, 2, 3, 4)
    fc.direct.rpush("mirror-ids", 1, 2, 3, 4)
    return fc


SORT_GETS: dict[str, list[str]] = {
    "protected": ["iad:*->imap"],
    "hash-and-protected": ["#", "iad:*->imap"],
    "protected-hash-unprotected": ["iad:*->imap", "#", "iad:*->user"],
    "unprotected-only": ["iad:*->user"],
}


@pytest.mark.parametrize("protocol", [2, 3], ids=["resp2", "resp3"])
@pytest.mark.parametrize("gets", list(SORT_GETS.values()), ids=list(SORT_GETS))
def test_sort_get_protected_field_is_decrypted(
    sortable: Fieldcrypt, gets: list[str], protocol: int
) -> None:
    def request(ids: str, prefix: str) -> list[str]:
        args = ["SORT", ids, "BY", f"{prefix}*->rank"]
        for pattern in gets:
            args += ["GET", pattern.replace("iad:", prefix)]
        return args

    via_proxy = sortable.wire(protocol)
    direct = Wire(sortable.upstream_port, protocol)
    try:
        proxied = via_proxy.call(*request("ids", "iad:"))
        expected = direct.call(*request("mirror-ids", "mirror:"))
    finally:
        via_proxy.close()
        direct.close()
    assert proxied == expected


def test_sort_get_decrypts_in_the_order_sorted_by(sortable: Fieldcrypt) -> None:
    client = sortable.client()
    by_rank = client.sort("ids", by="iad:*->rank", get="iad:*->imap")
    with_ids = client.sort("ids", by="iad:*->rank", get=["#", "iad:*->imap"], groups=True)
    read_only = client.execute_command("SORT_RO", "ids", "BY", "iad:*->rank", "GET", "iad:*->imap")

    # iad:4 is missing: rank 0 sorts first, and its imap is nil
    assert by_rank == [None, b"imap-secret-2", b"imap-secret-3", b"imap-secret-1"]
    assert with_ids == [
        (b"4", None),
        (b"2", b"imap-secret-2"),
        (b"3", b"imap-secret-3"),
        (b"1", b"imap-secret-1"),
    ]
    assert read_only == by_rank


def test_sort_reads_its_patterns_as_redis_does(sortable: Fieldcrypt) -> None:
    client = sortable.client()
    client.hset("iad:x->1", "imap", "arrow-secret")  # a key name that holds `->`
    client.rpush("arrow-ids", 1)

    assert client.sort("arrow-ids", get="iad:x->*->imap") == [b"arrow-secret"]
    # BY without `*` doesn't sort, and GET without `*` reads nothing: nothing to refuse.
    unsorted = client.execute_command("SORT", "ids", "BY", "iad:1->imap", "GET", "#")
    assert unsorted == sortable.direct.sort("ids", by="nosort")
    assert client.sort("ids", by="nosort", get="iad:1->imap") == [None] * 4
    assert sortable.direct.hget("iad:x->1", "imap").startswith(HEADER_PREFIX)


def test_sort_by_a_protected_field_is_refused(sortable: Fieldcrypt) -> None:
    client = sortable.client()
    calls_before = commandstat(sortable.direct, "SORT")

    message = error_of(lambda: client.sort("ids", by="iad:*->imap", get="#"))

    assert message == (
        "fieldcrypt: SORT cannot sort BY 'iad:*->imap': that field is stored encrypted"
    )
    assert commandstat(sortable.direct, "SORT") == calls_before
    assert client.sort("ids", by="iad:*->rank", get="#") == [b"4", b"2", b"3", b"1"]


def test_sort_store_with_a_protected_get_is_refused(sortable: Fieldcrypt) -> None:
    client = sortable.client()

    message = error_of(
        lambda: client.sort("ids", by="iad:*->rank", get=["#", "iad:*->imap"], store="copied")
    )

    assert "SORT ... STORE would copy encrypted field values" in message
    assert not sortable.direct.exists("copied")
    assert client.sort("ids", by="iad:*->rank", get="iad:*->user", store="users") == 4
    assert sortable.direct.lrange("users", 0, -1) == [b"", b"user-2", b"user-3", b"user-1"]


# --- Any value ----------------------------------------------------------------------

ONE_MB = random.Random(1).randbytes(1_000_000)


@hypothesis_settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    value=st.one_of(
        st.binary(max_size=4096),
        st.binary(max_size=200).map(lambda tail: HEADER_PREFIX + tail),
    )
)
@example(value=b"")
@example(value=ONE_MB)
@example(value=b"\x00" * 1_000_000)
@example(value=b"$fc1$" + ONE_MB[:500_000])
@example(value=b"$fc1$")
@example(value=FOREIGN_ENVELOPE)
@example(value=b"$fc2$f$AAAAAAAAAAA$")
@example(value=b"\r\n$-1\r\n*2\r\n:1\r\n_\r\n")
def test_any_binary_value_round_trips(fc: Fieldcrypt, value: bytes) -> None:
    client = fc.client()
    client.hset("iad:any", mapping={"imap": value, "note": value})

    assert client.hget("iad:any", "imap") == value
    assert client.hgetall("iad:any") == {b"imap": value, b"note": value}
    stored = fc.direct.hget("iad:any", "imap")
    assert stored is not None and stored.startswith(HEADER_PREFIX)
    assert len(stored) == envelope_length(len(value))
    assert ring_of(fc.key_a).decrypt(stored, b"imap", b"iad:any") == value
    assert fc.direct.hget("iad:any", "note") == value


# --- Keys: rotation and decrypt-only -------------------------------------------------


@pytest.mark.parametrize("old_key_decrypt_only", [False, True], ids=["old", "old-decrypt-only"])
def test_rotation_reads_old_values_and_seals_new_ones_under_the_first_key(
    fc: Fieldcrypt, old_key_decrypt_only: bool
) -> None:
    kid_a, kid_b = kid_of_secret(fc.key_a), kid_of_secret(fc.key_b)
    fc.client().hset("iad:1", mapping=IAD_1)
    fc.client().hset("settings", mapping=SETTINGS_HASH)

    decrypt_only = {fc.key_a} if old_key_decrypt_only else set()
    fc.restart(fc.key_b, fc.key_a, decrypt_only=decrypt_only)
    client = fc.client()
    assert client.hgetall("iad:1") == IAD_1
    assert client.hgetall("settings") == SETTINGS_HASH
    client.hset("iad:2", mapping={"imap": "written-under-b", "user": "carol"})
    client.hset("settings", "serviceSecret", "rewritten-under-b")

    kid = KeyRing.kid_of
    assert kid(fc.direct.hget("iad:2", "imap")) == kid_b
    assert kid(fc.direct.hget("settings", "serviceSecret")) == kid_b
    assert kid(fc.direct.hget("iad:1", "imap")) == kid_a
    assert kid(fc.direct.hget("settings", "googleClientSecret")) == kid_a
    assert kid(fc.direct.hget("iad:2", "user")) is None
    assert client.hget("iad:2", "imap") == b"written-under-b"
    assert client.hget("settings", "serviceSecret") == b"rewritten-under-b"


def test_ring_without_the_old_key_refuses_old_values_naming_field_key_and_key_id(
    fc: Fieldcrypt,
) -> None:
    kid_a = kid_of_secret(fc.key_a)
    fc.client().hset("iad:1", mapping=IAD_1)
    fc.restart(fc.key_b)
    client = fc.client()
    client.hset("iad:2", "imap", "written-under-b")

    wire = fc.wire()
    try:
        frame = wire.call("HGET", "iad:1", "imap")
    finally:
        wire.close()
    assert frame.startswith(
        b"-ERR fieldcrypt: cannot decrypt field 'imap' of key 'iad:1': "
        b"no key in the ring has id " + kid_a.encode()
    )
    assert re.fullmatch(
        r"fieldcrypt: cannot decrypt field '(imap|smtp|oauth2)' of key 'iad:1': "
        rf"no key in the ring has id {kid_a}; add the old key to keys:",
        error_of(lambda: client.hgetall("iad:1")),
    )
    assert client.hget("iad:1", "user") == IAD_1[b"user"]
    assert client.hget("iad:2", "imap") == b"written-under-b"


def test_on_decrypt_error_raw_returns_the_stored_value_as_is(fc: Fieldcrypt) -> None:
    fc.client().hset("iad:1", mapping=IAD_1)
    stored = fc.direct.hgetall("iad:1")
    fc.restart(fc.key_b, on_decrypt_error="raw")
    client = fc.client()

    assert client.hget("iad:1", "imap") == stored[b"imap"]
    assert client.hgetall("iad:1") == stored
    assert client.hmget("iad:1", ["smtp", "user"]) == [stored[b"smtp"], IAD_1[b"user"]]
    _, failures = fc.counters()
    assert failures == {"no key in the ring": 1 + 3 + 1}


def test_decrypt_only_ring_reads_envelopes_and_writes_cleartext(fc: Fieldcrypt) -> None:
    fc.client().hset("iad:1", mapping=IAD_1)
    fc.restart(fc.key_a, fc.key_b, decrypt_only={fc.key_a, fc.key_b})
    client = fc.client()

    assert client.hgetall("iad:1") == IAD_1
    client.hset("iad:2", mapping={"imap": "stored-in-clear", "user": "dave"})

    assert fc.direct.hgetall("iad:2") == {b"imap": b"stored-in-clear", b"user": b"dave"}
    assert client.hget("iad:2", "imap") == b"stored-in-clear"
    counts, _ = fc.counters()
    assert counts.get("encrypted", 0) == 0


# --- Tampering ------------------------------------------------------------------------


def test_ciphertext_copied_to_another_field_fails_authentication(fc: Fieldcrypt) -> None:
    client = fc.client()
    client.hset("iad:1", mapping=IAD_1)
    fc.direct.hset("iad:1", "smtp", fc.direct.hget("iad:1", "imap"))

    assert error_of(lambda: client.hget("iad:1", "smtp")) == (
        f"fieldcrypt: cannot decrypt field 'smtp' of key 'iad:1': {AUTH_FAILED}"
    )
    assert client.hget("iad:1", "imap") == IAD_1[b"imap"]


def test_bind_key_ciphertext_copied_to_another_key_fails_authentication(fc: Fieldcrypt) -> None:
    fc.restart(bind_key=True)
    client = fc.client()
    client.hset("iad:1", mapping=IAD_1)
    stored = fc.direct.hget("iad:1", "imap")
    assert stored.startswith(HEADER_PREFIX + b"k$")
    fc.direct.hset("iad:2", "imap", stored)

    assert error_of(lambda: client.hget("iad:2", "imap")) == (
        f"fieldcrypt: cannot decrypt field 'imap' of key 'iad:2': {AUTH_FAILED}"
    )
    assert client.hget("iad:1", "imap") == IAD_1[b"imap"]


def test_without_bind_key_ciphertext_copied_to_another_key_reads_fine(fc: Fieldcrypt) -> None:
    client = fc.client()
    client.hset("iad:1", mapping=IAD_1)
    stored = fc.direct.hget("iad:1", "imap")
    assert stored.startswith(HEADER_PREFIX + b"f$")
    fc.direct.hset("iad:2", "imap", stored)

    assert client.hget("iad:2", "imap") == IAD_1[b"imap"]


def _replace_char(value: bytes, position: int, new: bytes | None = None) -> bytes:
    """`value` with the character at `position` changed to another base64url one."""
    if new is None:
        new = b"B" if value[position : position + 1] == b"A" else b"A"
    return value[:position] + new + value[position + 1 :]


TAMPERINGS: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "nonce-character-changed": (lambda v: _replace_char(v, 19 + 3), AUTH_FAILED),
    "ciphertext-character-changed": (lambda v: _replace_char(v, 19 + 30), AUTH_FAILED),
    "tag-character-changed": (lambda v: _replace_char(v, len(v) - 5), AUTH_FAILED),
    "mode-f-changed-to-k": (lambda v: _replace_char(v, 5, b"k"), AUTH_FAILED),
    "byte-outside-base64url": (lambda v: _replace_char(v, 19 + 30, b"+"), MALFORMED),
    "last-4-characters-cut": (lambda v: v[:-4], AUTH_FAILED),
    "last-3-characters-cut": (lambda v: v[:-3], MALFORMED),
    "cut-below-the-minimum-payload": (lambda v: v[: 19 + 37], MALFORMED),
    "cut-to-the-header": (lambda v: v[:19], MALFORMED),
    "cut-to-the-prefix": (lambda v: v[:5], MALFORMED),
}


@pytest.mark.parametrize(("tamper", "reason"), list(TAMPERINGS.values()), ids=list(TAMPERINGS))
def test_tampered_envelope_is_refused_with_the_documented_reason(
    fc: Fieldcrypt, tamper: Callable[[bytes], bytes], reason: str
) -> None:
    client = fc.client()
    client.hset("iad:1", mapping={"imap": SECRET_32, "user": "alice"})
    stored = fc.direct.hget("iad:1", "imap")
    assert len(SECRET_32) == 32 and len(stored) == 19 + 80
    tampered = tamper(stored)
    assert tampered != stored
    fc.direct.hset("iad:1", "imap", tampered)

    expected = f"fieldcrypt: cannot decrypt field 'imap' of key 'iad:1': {reason}"
    assert error_of(lambda: client.hget("iad:1", "imap")) == expected
    assert error_of(lambda: client.hgetall("iad:1")) == expected
    assert client.hget("iad:1", "user") == b"alice"


def test_later_format_version_is_not_an_envelope_and_reads_as_stored(fc: Fieldcrypt) -> None:
    """docs/format.md: anything that does not start with `$fc1$` is not an envelope; a
    proxy treats it as a value stored before the field was protected."""
    client = fc.client()
    client.hset("iad:1", "imap", SECRET_32)
    later = b"$fc2$" + fc.direct.hget("iad:1", "imap")[5:]
    fc.direct.hset("iad:1", "imap", later)

    assert client.hget("iad:1", "imap") == later
    fc.restart(require_encrypted=True)
    assert "field 'imap' of key 'iad:1' holds cleartext" in error_of(
        lambda: fc.client().hget("iad:1", "imap")
    )


# --- Cleartext written before encryption ---------------------------------------------


def test_cleartext_written_before_encryption_reads_back_as_is(fc: Fieldcrypt) -> None:
    fc.direct.hset("iad:1", mapping=IAD_1)
    client = fc.client()

    assert client.hget("iad:1", "imap") == IAD_1[b"imap"]
    assert client.hmget("iad:1", ["smtp", "oauth2"]) == [IAD_1[b"smtp"], IAD_1[b"oauth2"]]
    assert client.hgetall("iad:1") == IAD_1

    client.hset("iad:1", "imap", "now-encrypted")
    assert fc.direct.hget("iad:1", "imap").startswith(HEADER_PREFIX)
    assert fc.direct.hget("iad:1", "smtp") == IAD_1[b"smtp"]
    assert client.hgetall("iad:1") == {**IAD_1, b"imap": b"now-encrypted"}


def test_require_encrypted_refuses_cleartext_naming_the_field(fc: Fieldcrypt) -> None:
    fc.restart(require_encrypted=True)
    fc.direct.hset("iad:1", mapping={"imap": "legacy-cleartext", "user": "alice"})
    client = fc.client()
    client.hset("iad:1", "smtp", "sealed-by-the-proxy")

    message = error_of(lambda: client.hget("iad:1", "imap"))
    assert "field 'imap' of key 'iad:1' holds cleartext" in message
    assert "legacy-cleartext" not in message
    assert "field 'imap'" in error_of(lambda: client.hgetall("iad:1"))
    assert client.hget("iad:1", "smtp") == b"sealed-by-the-proxy"
    assert client.hget("iad:1", "user") == b"alice"


# --- Transactions and pipelines ------------------------------------------------------


def _transaction(client: redis.Redis, hash_key: str, string_key: str) -> list[Any]:
    pipe = client.pipeline(transaction=True)
    pipe.set(string_key, "plain-value")
    pipe.hget(hash_key, "imap")
    pipe.hgetall(hash_key)
    pipe.hvals(hash_key)
    pipe.hstrlen(hash_key, "oauth2")
    pipe.get(string_key)
    pipe.hmget(hash_key, ["smtp", "user", "nope"])
    pipe.hset(hash_key, "smtp", "changed-in-multi")
    pipe.hget(hash_key, "smtp")
    pipe.hget(string_key, "imap")  # WRONGTYPE: an error element
    pipe.hget(hash_key, "user")
    replies = pipe.execute(raise_on_error=False)
    replies[3] = sorted(replies[3])  # HVALS comes in hash order (see READ_COMMANDS)
    return [
        ("error", str(reply)) if isinstance(reply, ResponseError) else reply for reply in replies
    ]


def test_multi_exec_decrypts_protected_replies_and_leaves_the_others(seeded: Fieldcrypt) -> None:
    proxied = _transaction(seeded.client(), "iad:1", "iad:str")
    expected = _transaction(seeded.direct, "mirror:iad:1", "mirror:iad:str")

    assert proxied == expected
    assert proxied[1] == IAD_1[b"imap"]
    assert proxied[2] == IAD_1
    assert proxied[9][0] == "error" and "WRONGTYPE" in proxied[9][1]
    stored = seeded.direct.hget("iad:1", "smtp")
    assert ring_of(seeded.key_a).decrypt(stored, b"smtp", b"iad:1") == b"changed-in-multi"


def _transaction_with_a_queue_time_error(
    wire: Wire, hash_key: str, error: list[str]
) -> list[bytes]:
    return [
        wire.call("MULTI"),
        wire.call("SET", f"{hash_key}:counter", "1"),
        wire.call(*error),
        wire.call("HSET", hash_key, "user", "changed-in-multi"),
        wire.call("EXEC"),
        wire.call("HGET", hash_key, "imap"),  # the connection goes on, out of MULTI
    ]


def test_refused_command_inside_multi_aborts_exec_like_a_queue_time_error(
    seeded: Fieldcrypt,
) -> None:
    stored = seeded.direct.hgetall("iad:1")
    stats = {c: commandstat(seeded.direct, c) for c in ("SET", "HSET", "HINCRBY", "EXEC")}
    via_proxy = seeded.wire()
    direct = Wire(seeded.upstream_port)
    try:
        proxied = _transaction_with_a_queue_time_error(
            via_proxy, "iad:1", ["HINCRBY", "iad:1", "imap", "1"]
        )
        assert seeded.direct.hgetall("iad:1") == stored
        assert not seeded.direct.exists("iad:1:counter")
        assert {c: commandstat(seeded.direct, c) for c in stats} == stats
        # Redis's own queue-time error (here: wrong arity) for comparison
        expected = _transaction_with_a_queue_time_error(
            direct, "mirror:iad:1", ["HINCRBY", "mirror:iad:1"]
        )
    finally:
        via_proxy.close()
        direct.close()

    assert proxied[2] == (
        b"-ERR fieldcrypt: HINCRBY cannot work on field 'imap' of key 'iad:1': "
        b"it is stored encrypted\r\n"
    )
    assert expected[2].startswith(b"-ERR wrong number of arguments")
    assert (
        proxied[4]
        == expected[4]
        == (b"-EXECABORT Transaction discarded because of previous errors.\r\n")
    )
    assert proxied[:2] + proxied[3:5] == expected[:2] + expected[3:5]
    assert proxied[5] == resp.bulk(IAD_1[b"imap"])


def test_refused_command_inside_a_redis_py_transaction_raises_and_runs_nothing(
    seeded: Fieldcrypt,
) -> None:
    stored = seeded.direct.hgetall("iad:1")
    pipe = seeded.client().pipeline(transaction=True)
    pipe.set("iad:1:counter", "1")
    pipe.hincrby("iad:1", "imap", 1)
    pipe.hset("iad:1", "user", "changed-in-multi")

    # redis-py reads EXECABORT and raises the queued command's own error, as with Redis.
    with pytest.raises(ResponseError) as caught:
        pipe.execute()

    assert str(caught.value) == (
        "Command # 2 (HINCRBY iad:1 imap 1) of pipeline caused error: "
        "fieldcrypt: HINCRBY cannot work on field 'imap' of key 'iad:1': it is stored encrypted"
    )
    assert not seeded.direct.exists("iad:1:counter")
    assert seeded.direct.hgetall("iad:1") == stored


def test_decrypt_failure_inside_exec_is_one_error_element_and_the_others_are_intact(
    fc: Fieldcrypt,
) -> None:
    client = fc.client()
    client.hset("iad:1", mapping=IAD_1)
    fc.direct.hset("iad:1", "smtp", fc.direct.hget("iad:1", "imap"))  # moved: fails
    wire = fc.wire()
    try:
        queued = [
            wire.call("MULTI"),
            wire.call("HGET", "iad:1", "smtp"),
            wire.call("HGET", "iad:1", "imap"),
            wire.call("GET", "no-such-key"),
        ]
        replies = wire.call("EXEC")
    finally:
        wire.close()

    assert queued == [b"+OK\r\n"] + [b"+QUEUED\r\n"] * 3
    failure = f"-ERR fieldcrypt: cannot decrypt field 'smtp' of key 'iad:1': {AUTH_FAILED}\r\n"
    assert replies == b"*3\r\n" + failure.encode() + resp.bulk(IAD_1[b"imap"]) + b"$-1\r\n"


TRANSACTIONS_THAT_DO_NOT_SELECT: dict[str, list[list[str]]] = {
    "refused-command-execabort": [
        ["MULTI"],
        ["SELECT", "1"],
        ["HINCRBY", "iad:1", "imap", "1"],
        ["EXEC"],
    ],
    "discard": [["MULTI"], ["SELECT", "1"], ["DISCARD"]],
    "watched-key-changed": [["WATCH", "watched"], ["MULTI"], ["SELECT", "1"], ["EXEC"]],
    "select-fails-inside-exec": [["MULTI"], ["SELECT", "99999"], ["EXEC"]],
}


@pytest.mark.parametrize(
    "transaction",
    list(TRANSACTIONS_THAT_DO_NOT_SELECT.values()),
    ids=list(TRANSACTIONS_THAT_DO_NOT_SELECT),
)
def test_select_in_a_transaction_that_did_not_run_leaves_the_connection_in_its_db(
    fc: Fieldcrypt, transaction: list[list[str]]
) -> None:
    """`settings` is protected in db 0 only: after a SELECT that never ran, the next write
    still goes to db 0 and must be encrypted there."""
    wire = fc.wire()
    try:
        for command in transaction:
            if command[0] == "EXEC" and ["WATCH", "watched"] in transaction:
                fc.direct.set("watched", "changed by another client")
            wire.call(*command)
        assert wire.call("HSET", "settings", "serviceSecret", "service-secret-value") == b":1\r\n"
    finally:
        wire.close()

    stored = fc.direct.hget("settings", "serviceSecret")
    assert stored is not None, "the write went to db 0"
    assert stored.startswith(HEADER_PREFIX), "db 0's protected field was written in clear"


def test_select_in_a_transaction_that_ran_applies_the_rules_of_the_new_db(fc: Fieldcrypt) -> None:
    wire = fc.wire()
    try:
        for command in (["MULTI"], ["SELECT", "1"], ["EXEC"]):
            wire.call(*command)
        wire.call("HSET", "settings", "serviceSecret", "db-1-is-not-protected")
    finally:
        wire.close()

    raw_db1 = redis.Redis(host=HOST, port=fc.upstream_port, db=1)
    try:
        assert raw_db1.hget("settings", "serviceSecret") == b"db-1-is-not-protected"
    finally:
        raw_db1.close()
    assert not fc.direct.exists("settings")


def _mixed_commands(count: int) -> list[list[bytes | str]]:
    rng = random.Random(20250601)
    commands: list[list[bytes | str]] = []
    for _ in range(count):
        n = rng.randrange(40)
        value = rng.randbytes(rng.randrange(48))
        kind = rng.randrange(11)
        if kind == 0:
            commands.append(["HSET", f"iad:{n}", "imap", value, "user", f"user-{n}"])
        elif kind == 1:
            commands.append(["HSET", f"iad:{n}", rng.choice(["smtp", "oauth2", "host"]), value])
        elif kind == 2:
            commands.append(["HSET", "settings", f"app{n}ClientSecret", value, f"app{n}Name", "x"])
        elif kind == 3:
            commands.append(["HGET", f"iad:{n}", rng.choice(["imap", "smtp", "user", "nope"])])
        elif kind == 4:
            commands.append(["HGETALL", f"iad:{n}"])
        elif kind == 5:
            commands.append(["HGETALL", "settings"])
        elif kind == 6:
            commands.append(["SET", f"str:{n}", value])
        elif kind == 7:
            commands.append(["GET", f"str:{n}"])
        elif kind == 8:
            commands.append(["HSET", f"plain:{n}", "imap", value])
        elif kind == 9:
            commands.append(["HGET", f"plain:{n}", "imap"])
        else:
            commands.append(["HMGET", f"iad:{n}", "imap", "user", "oauth2"])
    return commands


def _run_pipeline(client: redis.Redis, commands: Sequence[Sequence[bytes | str]]) -> list[Any]:
    pipe = client.pipeline(transaction=False)
    for command in commands:
        pipe.execute_command(*command)
    return pipe.execute()


def test_pipeline_of_10000_mixed_commands_matches_a_direct_connection(fc: Fieldcrypt) -> None:
    commands = _mixed_commands(10_000)
    in_clear = redis.Redis(host=HOST, port=fc.upstream_port, db=1)
    try:
        proxied = _run_pipeline(fc.client(), commands)
        expected = _run_pipeline(in_clear, commands)

        assert len(proxied) == 10_000
        assert proxied == expected
        for key in in_clear.scan_iter(match="iad:*"):
            stored = fc.direct.hgetall(key)
            assert stored.keys() == in_clear.hgetall(key).keys()
            for field_name in stored.keys() & IAD_PROTECTED:
                assert stored[field_name].startswith(HEADER_PREFIX)
    finally:
        in_clear.close()


def test_hscan_over_10000_protected_fields_returns_each_plaintext_once(fc: Fieldcrypt) -> None:
    client = fc.client()
    expected = {
        f"app{i:05}ClientSecret".encode(): f"client-secret-{i:05}".encode() for i in range(10_000)
    }
    items = list(expected.items())
    for start in range(0, len(items), 1000):
        client.hset("settings", mapping=dict(items[start : start + 1000]))

    seen = Counter(client.hscan_iter("settings", count=250))

    assert set(seen) == set(expected.items())
    assert sum(seen.values()) == 10_000
    assert client.hgetall("settings") == expected
    stored = fc.direct.hgetall("settings")
    assert len(stored) == 10_000
    assert all(value.startswith(HEADER_PREFIX) for value in stored.values())
    assert not any(b"client-secret-" in value for value in stored.values())


# --- Scripts --------------------------------------------------------------------------


def test_refuse_scripts_refuses_scripts_naming_a_protected_key(fc: Fieldcrypt) -> None:
    fc.restart(refuse_scripts=True)
    client = fc.client()
    client.hset("iad:1", mapping=IAD_1)
    fc.direct.hset("session:1", mapping=SESSION_1)
    sha = client.script_load(SCRIPT)
    stats = {c: commandstat(fc.direct, c) for c in ("EVAL", "EVALSHA")}

    for refused in (
        error_of(lambda: client.eval(SCRIPT, 1, "iad:1", "imap")),
        error_of(lambda: client.evalsha(sha, 2, "session:1", "iad:1", "imap")),
    ):
        assert refused.startswith("fieldcrypt: ")
        assert "protected key 'iad:1'" in refused
    assert {c: commandstat(fc.direct, c) for c in stats} == stats

    assert client.eval(SCRIPT, 1, "session:1", "imap") == SESSION_1[b"imap"]
    assert client.evalsha(sha, 1, "session:1", "user") == SESSION_1[b"user"]
    after = commandstat(fc.direct, "EVAL")
    assert after is not None
    assert after["calls"] == (0 if stats["EVAL"] is None else stats["EVAL"]["calls"]) + 1


# --- Counters and logs ------------------------------------------------------------------


def test_counters_follow_the_traffic(fc: Fieldcrypt) -> None:
    client = fc.client()
    client.hset("iad:1", mapping={"imap": "p1", "smtp": "p2", "user": "u"})  # 2 encrypted
    client.hset("session:1", mapping=SESSION_1)  # no rule: nothing
    assert client.hget("iad:1", "imap") == b"p1"  # 1 decrypted
    assert client.hgetall("iad:1")  # 2 decrypted
    assert client.hstrlen("iad:1", "smtp") == 2  # 1 decrypted
    assert client.hget("iad:1", "user") == b"u"  # unprotected: nothing
    assert client.hget("session:1", "imap") == SESSION_1[b"imap"]  # no rule: nothing
    fc.direct.hset("iad:2", "imap", "legacy")
    assert client.hget("iad:2", "imap") == b"legacy"  # 1 cleartext read
    fc.direct.hset("iad:1", "oauth2", fc.direct.hget("iad:1", "imap"))
    error_of(lambda: client.hget("iad:1", "oauth2"))  # 1 authentication failure

    counts, failures = fc.counters()
    assert counts == {"encrypted": 2, "decrypted": 4, "cleartext read": 1}
    assert failures == {"authentication failed": 1}


def test_decrypt_failure_log_names_key_and_field_but_never_the_value(
    fc: Fieldcrypt, caplog: pytest.LogCaptureFixture
) -> None:
    client = fc.client()
    with caplog.at_level(logging.DEBUG, logger="fieldcrypt"):
        client.hset("iad:1", mapping=IAD_1)
        stored = fc.direct.hget("iad:1", "imap")
        fc.direct.hset("iad:1", "smtp", stored)
        error_of(lambda: client.hget("iad:1", "smtp"))
        error_of(lambda: client.hgetall("iad:1"))

    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "fieldcrypt")
    assert "cannot decrypt field 'smtp' of key 'iad:1'" in logged
    for secret in (stored, *IAD_1.values()):
        assert secret.decode() not in logged
    assert b"$fc1$".decode() not in logged


def test_cleartext_refusal_log_names_the_field_but_never_the_value(
    fc: Fieldcrypt, caplog: pytest.LogCaptureFixture
) -> None:
    fc.restart(require_encrypted=True)
    fc.direct.hset("iad:1", "imap", "legacy-cleartext-password")
    client = fc.client()
    with caplog.at_level(logging.DEBUG, logger="fieldcrypt"):
        error_of(lambda: client.hget("iad:1", "imap"))

    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "fieldcrypt")
    assert "'imap'" in logged and "'iad:1'" in logged
    assert "legacy-cleartext-password" not in logged
