"""Hash-field expiration through the proxy, on the servers that have it: Redis 8.2 and
Valkey 9.1.

HSETEX, HGETEX and HGETDEL carry values, so protected ones are sealed on the way in and
opened on the way out; the field-TTL commands (HEXPIRE, HTTL, HPERSIST & co.) carry
none and pass through. Each conversation is held once through fieldcrypt on a hash a
rule protects and once directly on the flushed server: the replies must be the same
bytes, in RESP2 and RESP3, one by one, pipelined and in MULTI, and the raw store must
hold the same fields with the same TTLs, the protected values as envelopes that open to
what the direct run stored. Migration must keep each field's own TTL.

Where the two servers differ (Valkey 9's HSETEX also takes NX/XX on the key; error
texts), the proxy follows each, and each is compared with itself.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from proxy.crypto import HEADER_PREFIX, Key, KeyRing
from tests.servers import (
    ALL_SERVER_KINDS,
    FIELD_TTL_SERVER_KINDS,
    ConfiguredProxy,
    EmbeddedServer,
    Wire,
    served_by,
    server_binary,
)

UPSTREAM_KINDS = FIELD_TTL_SERVER_KINDS  # the `upstream` kinds here (tests/conftest.py)

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
KEY = "iad:1"
PROTECTED = frozenset({b"imap", b"smtp", b"oauth2"})
RULES = [{"key": "iad:*", "fields": ["imap", "smtp", "oauth2"]}]
# An absolute time (s) about a day ahead, the same for a test's two runs: TTLs set from
# it must come out to the millisecond; relative ones may differ by the runs' distance.
AT = int(time.time()) + 100_000
RELATIVE_SLACK_MS = 10_000

Request = list[str]
Store = dict[bytes, tuple[bytes, int]]  # field -> (stored value, HPEXPIRETIME)


class Proxy(ConfiguredProxy):
    def begin(self, *ring: str) -> None:
        self.start(
            {
                "upstream": f"redis://{HOST}:{self.upstream_port}",
                "keys": self.key_entries(ring or (self.key_a,)),
                "rules": RULES,
            }
        )

    def ring(self, secret: str | None = None) -> KeyRing:
        return KeyRing([Key.from_secret(secret or self.key_a)])


@pytest.fixture
def fc(upstream: EmbeddedServer, tmp_path: Path) -> Iterator[Proxy]:
    """fieldcrypt with key A, `iad:*` protecting imap, smtp and oauth2, in front of a
    flushed `upstream`; admin commands are open to loopback clients (no admin password)."""
    harness = Proxy(upstream, tmp_path)
    harness.direct.flushall()
    harness.begin()
    yield harness
    harness.close()


def requests(*commands: Sequence[object]) -> list[Request]:
    return [[str(arg) for arg in command] for command in commands]


def conversation(at: int) -> list[Request]:
    """Every hash-field-expiration command with each of its options, on protected and
    unprotected fields of one hash, ending with fields under absolute, relative and no
    TTLs. Comments give replies (the tests compare them with the server's own)."""
    ms = at * 1000

    def v(text: str) -> str:
        # Values longer than hash-max-listpack-value (64), so the hash is a hashtable
        # in the direct run too, as it is behind the proxy (envelopes are longer): its
        # replies list the fields in the same order.
        return text + "." * 64

    return requests(
        [
            "HSETEX",
            KEY,
            "FIELDS",
            3,
            "imap",
            v("imap-1"),
            "user",
            v("ada"),
            "smtp",
            v("smtp-1"),
        ],  # 1
        ["HSETEX", KEY, "FNX", "EXAT", at, "FIELDS", 1, "imap", v("never-stored")],  # 0
        ["HSETEX", KEY, "FNX", "EX", 20_000, "FIELDS", 1, "oauth2", v("oauth2-1")],  # 1
        [
            "HSETEX",
            KEY,
            "FXX",
            "PXAT",
            ms + 250,
            "FIELDS",
            2,
            "imap",
            v("imap-2"),
            "smtp",
            v("smtp-2"),
        ],
        ["HSETEX", KEY, "FXX", "KEEPTTL", "FIELDS", 1, "imap", v("imap-3")],  # keeps ms + 250
        [
            "HSETEX",
            KEY,
            "FXX",
            "FIELDS",
            2,
            "imap",
            v("never-stored"),
            "nope",
            v("never-stored"),
        ],  # 0
        ["HSETEX", KEY, "PX", 30_000_000, "FIELDS", 2, "host", v("mail.example"), "port", v("993")],
        ["HSETEX", KEY, "fields", 1, "port", v("994")],  # no option: the TTL goes, as HSET
        ["HPEXPIRETIME", KEY, "FIELDS", 5, "imap", "smtp", "user", "port", "nope"],
        ["HSTRLEN", KEY, "imap"],
        ["HMGET", KEY, "imap", "smtp", "oauth2", "user"],
        ["HGETEX", KEY, "FIELDS", 5, "imap", "user", "smtp", "nope", "oauth2"],
        ["HGETEX", KEY, "PERSIST", "FIELDS", 2, "imap", "user"],
        ["HEXPIRETIME", KEY, "FIELDS", 2, "imap", "smtp"],  # -1, at
        ["HGETEX", KEY, "EXAT", at + 100, "FIELDS", 1, "imap"],
        ["HGETEX", KEY, "PXAT", ms + 500, "FIELDS", 2, "smtp", "nope"],
        ["HGETEX", KEY, "EX", 40_000, "FIELDS", 1, "oauth2"],
        ["HGETEX", KEY, "PX", 50_000_000, "FIELDS", 1, "user"],
        ["HEXPIRE", KEY, 60_000, "NX", "FIELDS", 3, "imap", "port", "nope"],  # 0 1 -2
        ["HEXPIRE", KEY, 60_000, "GT", "FIELDS", 1, "user"],  # 1
        ["HPEXPIRE", KEY, 70_000_000, "XX", "FIELDS", 1, "oauth2"],  # 1
        ["HEXPIREAT", KEY, at + 200, "LT", "FIELDS", 1, "imap"],  # 0
        ["HPEXPIREAT", KEY, ms + 300_000, "FIELDS", 1, "smtp"],  # 1
        ["HPERSIST", KEY, "FIELDS", 3, "oauth2", "host", "nope"],  # 1 1 -2
        ["HTTL", KEY, "FIELDS", 3, "oauth2", "host", "nope"],  # -1 -1 -2
        ["HPTTL", KEY, "FIELDS", 2, "oauth2", "nope"],  # -1 -2
        ["HGETALL", KEY],
        ["HSCAN", KEY, 0, "COUNT", 100],
        ["HVALS", KEY],
        ["HGETEX", KEY, "FIELDS", 2, "imap", "imap"],  # a field named twice
        ["HGETDEL", KEY, "FIELDS", 4, "oauth2", "nope", "user", "oauth2"],
        ["HSETEX", KEY, "EX", 0, "FIELDS", 1, "smtp", v("smtp-3")],  # stored and expired at once
        ["HGETEX", KEY, "EX", 0, "FIELDS", 2, "host", "imap"],  # read, then expired
        ["HEXPIRE", KEY, 0, "FIELDS", 1, "port"],  # 2: deleted
        ["HGETALL", KEY],  # the hash is gone
        ["HSETEX", KEY, "EXAT", at + 300, "FIELDS", 2, "imap", v("imap-4"), "smtp", v("smtp-4")],
        ["HSETEX", KEY, "PX", 80_000_000, "FIELDS", 2, "user", v("bob"), "oauth2", v("oauth2-2")],
        ["HSETEX", KEY, "KEEPTTL", "FIELDS", 2, "host", v("mail.example"), "host", v("993")],
        ["HSETEX", KEY, "FXX", "FIELDS", 2, "smtp", v("smtp-5"), "smtp", v("smtp-6")],
        ["HGETALL", KEY],
        ["SET", "iad:string", "x"],
        ["HGETEX", "iad:string", "FIELDS", 1, "imap"],  # WRONGTYPE
        ["HSETEX", "iad:string", "FIELDS", 1, "imap", "v"],  # WRONGTYPE
        ["HGETDEL", "iad:string", "FIELDS", 1, "imap"],  # WRONGTYPE
    )


# Requests each server refuses: wrong counts, conflicting or unknown options, bad times.
REFUSED = requests(
    ["HSETEX", KEY, "FIELDS", 2, "imap", "v"],
    ["HSETEX", KEY, "FIELDS", 1, "imap", "v", "smtp"],
    ["HSETEX", KEY, "FIELDS", 0],
    ["HSETEX", KEY, "EX", -1, "FIELDS", 1, "imap", "v"],
    ["HSETEX", KEY, "EX", "ten", "FIELDS", 1, "imap", "v"],
    ["HSETEX", KEY, "PX", 1000, "EX", 5, "FIELDS", 1, "imap", "v"],
    ["HSETEX", KEY, "FNX", "FXX", "FIELDS", 1, "imap", "v"],
    ["HSETEX", KEY, "BOGUS", "FIELDS", 1, "imap", "v"],
    ["HSETEX", KEY, "imap", "v"],
    ["HGETEX", KEY, "FIELDS", 2, "imap"],
    ["HGETEX", KEY, "EX", 50, "PERSIST", "FIELDS", 1, "imap"],
    ["HGETEX", KEY, "FIELDS", 0],
    ["HGETEX", KEY, "imap"],
    ["HGETDEL", KEY, "FIELDS", 2, "imap"],
    ["HGETDEL", KEY, "FIELDS", -1, "imap"],
    ["HEXPIRE", KEY, 10, "FIELDS", 1, "imap", "smtp"],
    ["HEXPIRE", KEY, 10, "NX", "XX", "FIELDS", 1, "imap"],
    ["HEXPIRE", KEY, -5, "FIELDS", 1, "imap"],
    ["HPEXPIREAT", KEY, "soon", "FIELDS", 1, "imap"],
    ["HTTL", KEY, "FIELDS", 3, "imap"],
    ["HPERSIST", KEY, "FIELDS", 0],
)


def hold(port: int, protocol: int, sent: list[Request], mode: str) -> list[bytes]:
    """Send `sent` on a new connection, one by one, in one write, or in one write
    inside MULTI/EXEC; the exact bytes of every reply."""
    wire = Wire(port, protocol)
    try:
        if mode == "one-by-one":
            return [wire.call(*request) for request in sent]
        if mode == "pipelined":
            return wire.pipeline(list(sent), len(sent))
        assert mode == "multi"
        return wire.pipeline([["MULTI"], *sent, ["EXEC"]], len(sent) + 2)
    finally:
        wire.close()


def stored(direct: redis.Redis, key: str = KEY) -> Store:
    """What the server holds in hash `key`: each field's value and its HPEXPIRETIME."""
    fields: dict[bytes, bytes] = direct.hgetall(key)
    if not fields:
        return {}
    names = list(fields)
    expiry = direct.execute_command("HPEXPIRETIME", key, "FIELDS", len(names), *names)
    return {name: (fields[name], at) for name, at in zip(names, expiry, strict=True)}


def assert_same_store(through_proxy: Store, direct: Store, keyring: KeyRing, key: str) -> None:
    """The same fields with the same TTLs (to the millisecond when set from `AT`);
    protected values as envelopes of what the direct run stored, the rest identical."""
    assert through_proxy.keys() == direct.keys()
    absolute_ms = {AT * 1000 + offset for offset in (0, 250, 500, 100_000, 200_000, 300_000)}
    for name, (value, expires) in through_proxy.items():
        plain, direct_expires = direct[name]
        if name in PROTECTED:
            assert value.startswith(HEADER_PREFIX), name
            assert keyring.decrypt(value, name, key.encode()) == plain, name
        else:
            assert value == plain, name
        if direct_expires in absolute_ms or direct_expires < 0:
            assert expires == direct_expires, name
        else:
            assert abs(expires - direct_expires) <= RELATIVE_SLACK_MS, name


def through_and_direct(
    fc: Proxy, protocol: int, sent: list[Request], mode: str, key: str = KEY
) -> tuple[list[bytes], Store, list[bytes], Store]:
    """The replies to `sent` and the hash `key` it leaves, held through the proxy, then
    directly, each on the flushed server."""
    assert fc.proxy is not None
    fc.direct.flushall()
    proxied = hold(fc.proxy.port, protocol, sent, mode)
    proxied_store = stored(fc.direct, key)
    fc.direct.flushall()
    direct = hold(fc.upstream_port, protocol, sent, mode)
    return proxied, proxied_store, direct, stored(fc.direct, key)


MODES = ["one-by-one", "pipelined", "multi"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("protocol", [2, 3])
def test_every_field_expiration_command_replies_as_directly_and_stores_envelopes(
    fc: Proxy, protocol: int, mode: str
) -> None:
    proxied, proxied_store, direct, direct_store = through_and_direct(
        fc, protocol, conversation(AT), mode
    )

    assert b"imap-3" in b"".join(direct)  # the reads returned values: the test covers them
    assert direct_store.keys() == {b"imap", b"smtp", b"user", b"oauth2", b"host"}
    assert proxied == direct
    assert_same_store(proxied_store, direct_store, fc.ring(), KEY)
    secrets = (b"imap-", b"smtp-", b"oauth2-")
    leaks = [
        name for name, (value, _) in proxied_store.items() if any(map(value.__contains__, secrets))
    ]
    assert leaks == []  # no secret in clear in any field


@pytest.mark.parametrize("mode", ["one-by-one", "pipelined"])
@pytest.mark.parametrize("protocol", [2, 3])
def test_refused_requests_get_the_servers_own_errors_and_change_nothing(
    fc: Proxy, protocol: int, mode: str
) -> None:
    seed = requests(["HSETEX", KEY, "PXAT", AT * 1000, "FIELDS", 2, "imap", "imap-1", "user", "u"])
    proxied, proxied_store, direct, direct_store = through_and_direct(
        fc, protocol, seed + REFUSED, mode
    )

    assert all(reply.startswith(b"-") for reply in direct[1:]), direct
    assert proxied == direct
    assert_same_store(proxied_store, direct_store, fc.ring(), KEY)


def test_hsetex_nx_and_xx_on_the_key_follow_the_server(fc: Proxy, upstream: EmbeddedServer) -> None:
    """Valkey 9's HSETEX takes NX/XX (the key must not / must exist); Redis 8's refuses
    them. Through the proxy each server's own answer comes back, and where Valkey
    writes, protected values are sealed."""
    sent = requests(
        ["HSETEX", "iad:2", "XX", "FIELDS", 1, "imap", "imap-x"],
        ["HSETEX", "iad:2", "NX", "EX", 20_000, "FIELDS", 2, "imap", "imap-n", "user", "u"],
        ["HSETEX", "iad:2", "NX", "FIELDS", 1, "imap", "imap-again"],
        ["HSETEX", "iad:2", "XX", "FNX", "FIELDS", 1, "smtp", "smtp-x"],
        ["HGETEX", "iad:2", "FIELDS", 3, "imap", "smtp", "user"],
    )
    proxied, through_proxy, direct, _ = through_and_direct(fc, 3, sent, "pipelined", "iad:2")

    assert proxied == direct
    if upstream.kind == "valkey9":  # type: ignore[attr-defined]
        assert direct[:4] == [b":0\r\n", b":1\r\n", b":0\r\n", b":1\r\n"]
        assert direct[4] == b"*3\r\n$6\r\nimap-n\r\n$6\r\nsmtp-x\r\n$1\r\nu\r\n"
        assert through_proxy.keys() == {b"imap", b"smtp", b"user"}
        assert through_proxy[b"imap"][0].startswith(HEADER_PREFIX)
        assert fc.ring().decrypt(through_proxy[b"smtp"][0], b"smtp", b"iad:2") == b"smtp-x"
        assert through_proxy[b"imap"][1] > 0 > through_proxy[b"smtp"][1]
    else:
        unknown = [b"-ERR unknown argument: %b\r\n" % word for word in (b"XX", b"NX", b"NX", b"XX")]
        assert direct[:4] == unknown
        assert direct[4] == b"*3\r\n_\r\n_\r\n_\r\n"
        assert through_proxy == {}


def test_relative_ttls_land_on_the_envelopes_and_leave_them_as_they_are(fc: Proxy) -> None:
    client = fc.client()
    assert client.hsetex(KEY, mapping={"imap": "imap-1", "user": "ada"}, ex=100) == 1
    sealed = fc.direct.hget(KEY, "imap")
    ttl = fc.direct.execute_command("HTTL", KEY, "FIELDS", 2, "imap", "user")

    assert client.hexpire(KEY, 200, "imap") == [1]
    assert client.hpexpire(KEY, 300_000, "user", gt=True) == [1]
    assert client.httl(KEY, "imap", "user") in ([200, 300], [199, 300], [199, 299], [200, 299])

    assert sealed is not None and sealed.startswith(HEADER_PREFIX)
    assert all(99 <= seconds <= 100 for seconds in ttl), ttl
    assert fc.direct.hget(KEY, "imap") == sealed  # a TTL command never rewrites the value
    assert client.hgetex(KEY, "imap", "user", persist=True) == [b"imap-1", b"ada"]
    assert client.hpttl(KEY, "imap", "user") == [-1, -1]
    assert fc.direct.hget(KEY, "imap") == sealed


def test_a_protected_field_expires_on_time_like_any_other(fc: Proxy) -> None:
    client = fc.client()
    client.hset(KEY, mapping={"imap": "imap-1", "smtp": "smtp-1", "user": "ada"})
    assert client.hpexpire(KEY, 50, "imap", "user") == [1, 1]

    time.sleep(0.3)

    assert client.hgetex(KEY, "imap", "smtp", "user") == [None, b"smtp-1", None]
    assert list(fc.direct.hgetall(KEY)) == [b"smtp"]
    assert client.hgetdel(KEY, "smtp", "imap") == [b"smtp-1", None]
    assert fc.direct.exists(KEY) == 0


@pytest.mark.parametrize("protocol", [2, 3])
def test_redis_py_field_expiration_methods_see_plaintext(fc: Proxy, protocol: int) -> None:
    client = fc.client(protocol)
    pipe = client.pipeline(transaction=True)
    pipe.hsetex(KEY, mapping={"imap": "imap-1", "user": "ada"}, pxat=AT * 1000)
    pipe.hgetex(KEY, "imap", "user", "nope")
    pipe.hpexpiretime(KEY, "imap", "user")
    pipe.hsetex(KEY, "smtp", "smtp-1", keepttl=True)
    pipe.hgetdel(KEY, "smtp")
    pipe.hpersist(KEY, "imap")

    assert pipe.execute() == [
        1,
        [b"imap-1", b"ada", None],
        [AT * 1000, AT * 1000],
        1,
        [b"smtp-1"],
        [1],
    ]
    assert stored(fc.direct).keys() == {b"imap", b"user"}
    assert stored(fc.direct)[b"imap"][0].startswith(HEADER_PREFIX)
    assert client.hgetex(KEY, "imap", exat=AT) == [b"imap-1"]
    assert stored(fc.direct)[b"imap"][1] == AT * 1000


# --- Commands newer than fieldcrypt's table ------------------------------------------

NEWER_COMMANDS = {
    "redis8": requests(
        ["XADD", "iad:stream", "1-1", "f", "v"],
        ["XDELEX", "iad:stream", "IDS", 1, "1-1"],
        ["XACKDEL", "iad:stream", "g", "IDS", 1, "1-1"],
        ["SET", "iad:a", "x"],
        ["SET", "iad:b", "y"],
        ["BITOP", "DIFF", "iad:d", "iad:a", "iad:b"],
        ["VADD", "iad:v", "VALUES", 2, 1, 2, "imap"],
        ["VSIM", "iad:v", "ELE", "imap", "WITHSCORES"],
        ["VCARD", "iad:v"],
        ["VDIM", "iad:v"],
    ),
    "valkey9": requests(
        ["SET", "iad:a", "x"],
        ["DELIFEQ", "iad:a", "x"],
        ["SET", "iad:a", "y", "IFEQ", "y"],
        ["MSETEX", 2, "iad:a", "1", "iad:b", "2", "PX", 100_000],
        ["COMMANDLOG", "LEN", "slow"],
        ["CLIENT", "CAPA", "redirect"],
    ),
}


@pytest.mark.parametrize("protocol", [2, 3])
def test_commands_newer_than_the_table_pass_through_byte_for_byte(
    fc: Proxy, upstream: EmbeddedServer, protocol: int
) -> None:
    sent = NEWER_COMMANDS[upstream.kind]  # type: ignore[attr-defined]
    proxied, _, direct, _ = through_and_direct(fc, protocol, sent, "pipelined")

    assert not any(b"unknown command" in reply for reply in direct), direct
    assert proxied == direct


# --- Migration -------------------------------------------------------------------------


def seed_cleartext_with_ttls(direct: redis.Redis, hashes: int = 20) -> dict[bytes, Store]:
    """Hashes an application wrote before fieldcrypt: imap and oauth2 under TTLs of their
    own (absolute, to the millisecond, different in every field), smtp and user without,
    and a key TTL on the first. Returns what the server holds."""
    pipe = direct.pipeline(transaction=False)
    for i in range(hashes):
        key = f"iad:{i}"
        pipe.execute_command(
            "HSETEX", key, "PXAT", AT * 1000 + 7 * i + 1, "FIELDS", 1, "imap", f"imap-{i}"
        )
        pipe.execute_command(
            "HSETEX", key, "PXAT", AT * 1000 + 5_000 + i, "FIELDS", 1, "oauth2", f"oauth2-{i}"
        )
        pipe.hset(key, mapping={"smtp": f"smtp-{i}", "user": f"user-{i}"})
    pipe.pexpireat("iad:0", AT * 1000 + 999_999)
    pipe.execute()
    return {f"iad:{i}".encode(): stored(direct, f"iad:{i}") for i in range(hashes)}


def assert_migrated(
    direct: redis.Redis, before: dict[bytes, Store], keyring: KeyRing, kid: str
) -> None:
    """Every protected value an envelope under `kid` that opens to the cleartext seeded;
    every field's TTL, the key TTL and every other value exactly as before."""
    after = {key: stored(direct, key.decode()) for key in before}
    assert direct.pexpiretime("iad:0") == AT * 1000 + 999_999
    for key, fields in before.items():
        assert after[key].keys() == fields.keys(), key
        for name, (value, expires) in fields.items():
            now, now_expires = after[key][name]
            assert now_expires == expires, (key, name)
            if name in PROTECTED:
                assert KeyRing.kid_of(now) == kid, (key, name)
                assert keyring.decrypt(now, name, key) == value, (key, name)
            else:
                assert now == value, (key, name)


def report_of(reply: Any) -> dict[str, Any]:
    """A MIGRATE reply (a flat array in RESP2) as a dict of names to values."""
    items = zip(reply[0::2], reply[1::2], strict=True)
    return {name.decode(): value for name, value in items}


def migrate(client: redis.Redis, *options: object) -> dict[str, Any]:
    """Start a job (a dry run too is one) through the proxy; its final report."""
    started = report_of(client.execute_command("MIGRATE", *options))
    final = report_of(client.execute_command("MIGRATE", "WAIT", 60))
    assert final["job"] == started["job"] and final["state"] == b"done", final
    return final


def test_migrate_keeps_each_fields_ttl_and_its_dryrun_counts_fields_with_ttls(
    fc: Proxy,
) -> None:
    before = seed_cleartext_with_ttls(fc.direct)
    client = fc.client()

    dry = migrate(client, "DRYRUN")
    assert stored(fc.direct, "iad:3") == before[b"iad:3"]  # a dry run writes nothing
    final = migrate(client, "RATE", 0)
    again = migrate(client, "DRYRUN")

    assert (dry["fields_checked"], dry["census_cleartext"]) == (60, 60)  # 40 have TTLs
    assert dry["fields_would_be_encrypted"] == 60
    assert final["fields_encrypted"] == 60
    kid = Key.from_secret(fc.key_a).kid
    assert_migrated(fc.direct, before, fc.ring(), kid)
    assert again["census_cleartext"] == 0
    assert again["census_by_key_id"] == [f"{kid}=60".encode()]
    assert client.hgetex("iad:7", "imap", "oauth2", "smtp") == [b"imap-7", b"oauth2-7", b"smtp-7"]


def test_cli_migrate_keeps_each_fields_ttl_through_encryption_and_rotation(
    fc: Proxy, upstream: EmbeddedServer, tmp_path: Path
) -> None:
    fc.stop()  # the CLI works on the server directly
    before = seed_cleartext_with_ttls(fc.direct)
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - key: 'iad:*'\n    fields: [imap, smtp, oauth2]\n")
    url = f"redis://{HOST}:{upstream.port}"

    def migrate(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "proxy.cli", "migrate", "--redis", url]
        return subprocess.run(
            [*command, "--config", str(rules), *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    encrypted = migrate("--secret", fc.key_a)
    assert encrypted.returncode == 0, encrypted.stderr
    assert_migrated(fc.direct, before, fc.ring(), Key.from_secret(fc.key_a).kid)

    rotated = migrate("--secret", fc.key_b, "--decrypt", fc.key_a)
    assert rotated.returncode == 0, rotated.stderr
    assert "fields_rekeyed" in rotated.stdout
    assert_migrated(fc.direct, before, fc.ring(fc.key_b), Key.from_secret(fc.key_b).kid)


# --- The servers ------------------------------------------------------------------------

VERSIONS = {"redis": "7.0.", "valkey": "8.1.", "redis8": "8.2.", "valkey9": "9.1."}


@pytest.mark.parametrize("kind", ALL_SERVER_KINDS)
def test_each_server_kind_is_the_version_the_test_matrix_names(kind: str) -> None:
    banner = subprocess.run(
        [server_binary(kind), "--version"], capture_output=True, text=True, check=True
    ).stdout

    assert f" v={VERSIONS[served_by(kind)]}" in banner, banner
