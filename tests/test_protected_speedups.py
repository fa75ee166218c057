"""The protected read path's decrypt cache and fast reply rewriting.

The key ring remembers the plaintexts of envelopes it has authenticated
(`decrypt_cache_entries`). These tests pin down that a hit is exactly as safe as a
fresh decrypt: same plaintext, tampered or moved values still refused, a reload to a
ring without the old key refuses what the cache had seen, and 0 turns it off. The
proxy tests run against real servers; the bounds are checked on the pure core.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ResponseError

from proxy import crypto
from proxy.config import ConfigError, Settings, build_keyring, explain, load_settings
from proxy.crypto import (
    DECRYPT_CACHE_MAX_REPLIES,
    DECRYPT_CACHE_MAX_REPLY,
    DECRYPT_CACHE_MAX_VALUE,
    HEADER_PREFIX,
    DecryptError,
    Key,
    KeyRing,
    generate_key,
)
from tests.servers import ALL_SERVER_KINDS, ConfiguredProxy, EmbeddedServer, raw_connect

UPSTREAM_KINDS = ALL_SERVER_KINDS  # the `upstream` kinds here (tests/conftest.py)

HOST = "127.0.0.1"
AUTH_FAILED = (
    "authentication failed (wrong key, tampered value, or value moved from another field or key)"
)


class Proxy(ConfiguredProxy):
    """fieldcrypt in front of a real server, with rules for `iad:*` and, bound to their
    key, `vault:*`; `cache` sets decrypt_cache_entries."""

    def config(self, *ring: str, cache: int | None = None) -> dict[str, Any]:
        config: dict[str, Any] = {
            "keys": self.key_entries(ring or (self.key_a,)),
            "rules": [
                {"key": "iad:*", "fields": ["imap", "smtp"]},
                {"key": "vault:*", "fields": ["token"], "bind_key": True},
            ],
        }
        if cache is not None:
            config["decrypt_cache_entries"] = cache
        return config

    def restart(self, *ring: str, cache: int | None = None) -> None:
        self.start(self.config(*ring, cache=cache))

    @property
    def ring(self) -> KeyRing:
        assert self.proxy is not None
        ring: KeyRing = self.proxy.state.crypt.keyring
        return ring

    def cached_count(self) -> int:
        assert self.proxy is not None
        ring = self.ring
        return self.proxy.run(ring.cached_count)

    def counts(self) -> dict[str, int]:
        assert self.proxy is not None
        crypt = self.proxy.state.crypt
        return self.proxy.run(lambda: dict(crypt.counts))


@pytest.fixture
def fc(upstream: EmbeddedServer, tmp_path: Path) -> Iterator[Proxy]:
    harness = Proxy(upstream, tmp_path)
    harness.direct.flushall()
    harness.restart()
    yield harness
    harness.close()


def wire(port: int, *requests: list[bytes]) -> bytes:
    """Send the requests in one write and return the exact reply bytes once `ends` of
    them have come back (the replies end with the PING's +PONG)."""
    sock = raw_connect(port)
    try:
        payload = b"".join(
            b"*%d\r\n" % len(r) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in r)
            for r in [*requests, [b"PING"]]
        )
        sock.sendall(payload)
        data = b""
        while not data.endswith(b"+PONG\r\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data[: -len(b"+PONG\r\n")]
    finally:
        sock.close()


# --- Through the proxy ----------------------------------------------------------------


def test_a_cached_value_reads_back_the_same_plaintext_by_every_command(fc: Proxy) -> None:
    client = fc.client()
    client.hset("iad:1", mapping={"imap": "imap-secret", "smtp": "smtp-secret", "user": "ada"})
    stored = fc.direct.hget("iad:1", "imap")
    assert isinstance(stored, bytes) and stored.startswith(HEADER_PREFIX)
    assert fc.cached_count() == 0

    assert client.hget("iad:1", "imap") == b"imap-secret"  # decrypted, then cached
    assert fc.cached_count() == 1
    for _ in range(3):  # served from the cache
        assert client.hget("iad:1", "imap") == b"imap-secret"
        assert client.hmget("iad:1", ["smtp", "missing", "imap"]) == [
            b"smtp-secret",
            None,
            b"imap-secret",
        ]
        assert client.hgetall("iad:1") == {
            b"imap": b"imap-secret",
            b"smtp": b"smtp-secret",
            b"user": b"ada",
        }
        assert fc.client(protocol=3).hgetall("iad:1") == {
            b"imap": b"imap-secret",
            b"smtp": b"smtp-secret",
            b"user": b"ada",
        }
    assert fc.cached_count() == 2
    # Every value handed out counts as decrypted, from the cache or not.
    assert fc.counts()["decrypted"] == 1 + 3 * (1 + 2 + 2 + 2)


def test_cached_replies_are_byte_for_byte_what_redis_would_send_for_the_plaintext(
    fc: Proxy,
) -> None:
    long_value = b"x" * (DECRYPT_CACHE_MAX_VALUE + 100)  # too long to be cached
    fc.client().hset("iad:2", mapping={"imap": b"short", "smtp": long_value, "user": b"u"})
    fc.direct.hset("mirror:2", mapping={"imap": b"short", "smtp": long_value, "user": b"u"})
    assert fc.proxy is not None
    requests = (
        [b"HGETALL", b"KEY"],
        [b"HMGET", b"KEY", b"imap", b"nope", b"smtp"],
        [b"HGET", b"KEY", b"imap"],
        [b"HGET", b"KEY", b"nope"],
    )
    for _ in range(2):  # the second time, the short value comes from the cache
        through = wire(
            fc.proxy.port, *[[a if a != b"KEY" else b"iad:2" for a in r] for r in requests]
        )
        plain = wire(
            fc.upstream_port, *[[a if a != b"KEY" else b"mirror:2" for a in r] for r in requests]
        )
        assert through == plain
    assert fc.cached_count() == 1  # imap; smtp is over the size limit


def test_a_tampered_ciphertext_is_refused_after_its_original_was_cached(fc: Proxy) -> None:
    client = fc.client()
    client.hset("iad:3", "imap", "imap-secret")
    assert client.hget("iad:3", "imap") == b"imap-secret"  # cached
    stored = fc.direct.hget("iad:3", "imap")
    assert isinstance(stored, bytes)
    last = stored[-3:-2]
    flipped = stored[:-3] + (b"B" if last != b"B" else b"C") + stored[-2:]
    fc.direct.hset("iad:3", "imap", flipped)

    with pytest.raises(ResponseError, match="cannot decrypt field 'imap' of key 'iad:3'"):
        client.hget("iad:3", "imap")
    with pytest.raises(ResponseError, match="authentication failed"):
        client.hgetall("iad:3")

    fc.direct.hset("iad:3", "imap", stored)  # the original is still good
    assert client.hget("iad:3", "imap") == b"imap-secret"


def test_a_cached_value_moved_to_another_field_or_bound_key_is_still_refused(fc: Proxy) -> None:
    client = fc.client()
    client.hset("iad:4", "imap", "imap-secret")
    client.hset("vault:1", "token", "vault-token")
    assert client.hget("iad:4", "imap") == b"imap-secret"
    assert client.hget("vault:1", "token") == b"vault-token"
    imap = fc.direct.hget("iad:4", "imap")
    token = fc.direct.hget("vault:1", "token")
    assert isinstance(imap, bytes) and isinstance(token, bytes)

    fc.direct.hset("iad:4", "smtp", imap)  # same bytes, another field
    fc.direct.hset("vault:2", "token", token)  # same bytes, another key (bind_key)
    with pytest.raises(ResponseError, match=AUTH_FAILED.split(" (")[0]):
        client.hget("iad:4", "smtp")
    with pytest.raises(ResponseError, match="of key 'vault:2'"):
        client.hget("vault:2", "token")
    # Without bind_key the key name is not authenticated, with or without the cache.
    fc.direct.hset("iad:5", "imap", imap)
    assert client.hget("iad:5", "imap") == b"imap-secret"


def test_a_reload_to_a_ring_without_the_old_key_refuses_values_the_cache_had_seen(
    fc: Proxy,
) -> None:
    client = fc.client()
    client.hset("iad:6", mapping={"imap": "imap-secret", "smtp": "smtp-secret"})
    assert client.hgetall("iad:6") == {b"imap": b"imap-secret", b"smtp": b"smtp-secret"}
    assert fc.cached_count() == 2
    old_ring = fc.ring

    fc.write_config(fc.config(fc.key_b))  # key A is gone
    assert client.execute_command("FIELDCRYPT", "RELOAD") in (b"OK", "OK", True)
    assert fc.ring is not old_ring
    assert fc.cached_count() == 0

    later = fc.client()  # sessions opened before a reload keep the old table in ProxyThread
    kid_a = Key.from_secret(fc.key_a).kid
    with pytest.raises(ResponseError, match=f"no key in the ring has id {kid_a}"):
        later.hget("iad:6", "imap")
    with pytest.raises(ResponseError, match=f"no key in the ring has id {kid_a}"):
        later.hgetall("iad:6")
    with pytest.raises(ResponseError, match=f"no key in the ring has id {kid_a}"):
        later.hmget("iad:6", ["smtp"])


LIST_ROWS = (
    "local rows = {} for i, key in ipairs(KEYS) do rows[i] = redis.call('HGETALL', key) end "
    "return {#KEYS, 0, rows}"
)


def test_a_script_reply_seen_before_a_reload_is_not_answered_by_the_new_ring(
    fc: Proxy,
) -> None:
    client = fc.client()
    client.hset("iad:8", mapping={"imap": "imap-secret", "user": "ada"})
    listing = client.script_load(LIST_ROWS)
    for _ in range(2):  # opened, then answered whole from the cache
        total, skip, [row] = client.evalsha(listing, 1, "iad:8")
        assert (total, skip) == (1, 0)
        assert dict(zip(row[::2], row[1::2], strict=True)) == {
            b"imap": b"imap-secret",
            b"user": b"ada",
        }
    assert fc.counts()["decrypted"] == 2

    fc.write_config(fc.config(fc.key_b))  # key A is gone
    assert client.execute_command("FIELDCRYPT", "RELOAD") in (b"OK", "OK", True)
    later = fc.client()
    with pytest.raises(ResponseError, match="cannot decrypt a value in a script reply"):
        later.evalsha(listing, 1, "iad:8")
    assert fc.proxy is not None
    crypt = fc.proxy.state.crypt
    assert fc.proxy.run(lambda: dict(crypt.failures)) == {"no key in the ring": 1}


def test_decrypt_cache_entries_0_turns_the_cache_off(fc: Proxy) -> None:
    fc.restart(cache=0)
    client = fc.client()
    client.hset("iad:7", mapping={"imap": "imap-secret", "smtp": "smtp-secret"})
    for _ in range(3):
        assert client.hget("iad:7", "imap") == b"imap-secret"
        assert client.hgetall("iad:7") == {b"imap": b"imap-secret", b"smtp": b"smtp-secret"}
    assert fc.ring.cached is None
    assert fc.ring.decrypt_cache_entries == 0
    assert fc.cached_count() == 0
    assert fc.counts()["decrypted"] == 3 * 3


# --- The cache on the key ring ---------------------------------------------------------


def cached_ring(entries: int) -> KeyRing:
    return KeyRing([Key.from_secret(generate_key())], decrypt_cache_entries=entries)


def test_the_cache_is_bounded_by_entries_oldest_out_first() -> None:
    ring = cached_ring(3)
    stored = [ring.encrypt(b"value-%d" % i, b"imap") for i in range(5)]
    for value in stored:
        ring.decrypt(value, b"imap", b"iad:1")
    assert ring.cached_count() == 3
    assert ring.cached is not None
    assert [ring.cached((v, b"imap", b"iad:1")) for v in stored] == [
        None,
        None,
        b"value-2",
        b"value-3",
        b"value-4",
    ]
    # Evicted values still decrypt, the slow way.
    assert ring.decrypt(stored[0], b"imap", b"iad:1") == b"value-0"


def test_the_cache_is_bounded_by_bytes_and_skips_large_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ring = cached_ring(1000)
    big = ring.encrypt(b"b" * (DECRYPT_CACHE_MAX_VALUE + 1), b"imap")
    assert ring.decrypt(big, b"imap", b"k") == b"b" * (DECRYPT_CACHE_MAX_VALUE + 1)
    assert ring.cached_count() == 0

    monkeypatch.setattr(crypto, "DECRYPT_CACHE_MAX_BYTES", 1000)
    values = [ring.encrypt(b"v" * 100, b"imap") for _ in range(20)]
    for value in values:
        ring.decrypt(value, b"imap", b"k")
    entry_size = len(values[0]) + len(b"imap") + len(b"k") + 100
    assert ring.cached_count() == 1000 // entry_size
    assert ring.cached is not None
    assert ring.cached((values[-1], b"imap", b"k")) == b"v" * 100


def test_whole_replies_are_bounded_by_count_and_size_within_the_byte_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ring = cached_ring(10)
    assert ring.recall_reply is not None
    for i in range(DECRYPT_CACHE_MAX_REPLIES + 5):
        ring.remember_reply(b"*1\r\n$5\r\n$fc1$%d" % i, b"ctx", b"opened-%d" % i, 1)
    assert ring.recall_reply((b"*1\r\n$5\r\n$fc1$0", b"ctx")) is None  # oldest out
    newest = b"*1\r\n$5\r\n$fc1$%d" % (DECRYPT_CACHE_MAX_REPLIES + 4)
    assert ring.recall_reply((newest, b"ctx")) == (
        b"opened-%d" % (DECRYPT_CACHE_MAX_REPLIES + 4),
        1,
    )
    assert ring.recall_reply((newest, b"another context")) is None
    large = b"x" * (DECRYPT_CACHE_MAX_REPLY + 1)
    ring.remember_reply(large, b"ctx", b"y", 1)
    assert ring.recall_reply((large, b"ctx")) is None

    # Replies and values share the byte bound; replies are evicted first.
    monkeypatch.setattr(crypto, "DECRYPT_CACHE_MAX_BYTES", 2000)
    ring = cached_ring(10)
    value = ring.encrypt(b"v" * 100, b"imap")
    ring.decrypt(value, b"imap", b"k")
    for i in range(10):
        ring.remember_reply(b"r" * 300 + b"%d" % i, b"c", b"o" * 300, 1)
    assert ring.cached is not None and ring.cached((value, b"imap", b"k")) == b"v" * 100
    assert ring.recall_reply is not None
    kept = [i for i in range(10) if ring.recall_reply((b"r" * 300 + b"%d" % i, b"c"))]
    assert kept == [8, 9]  # 2 replies of ~600 bytes fit beside the value, newest last


def test_failures_never_enter_the_cache() -> None:
    ring = cached_ring(10)
    stored = ring.encrypt(b"secret", b"imap")
    tampered = stored[:-1] + (b"A" if stored[-1:] != b"A" else b"Q")
    for _ in range(2):
        with pytest.raises(DecryptError):
            ring.decrypt(tampered, b"imap", b"k")
        with pytest.raises(DecryptError):
            ring.decrypt(stored, b"smtp", b"k")  # another field
    assert ring.cached_count() == 0


def test_a_hit_needs_the_same_field_and_key_name() -> None:
    ring = cached_ring(10)
    field_bound = ring.encrypt(b"secret", b"imap")
    key_bound = ring.encrypt(b"token", b"token", b"vault:1")
    assert ring.decrypt(field_bound, b"imap", b"iad:1") == b"secret"
    assert ring.decrypt(key_bound, b"token", b"vault:1") == b"token"
    with pytest.raises(DecryptError, match="authentication failed"):
        ring.decrypt(field_bound, b"smtp", b"iad:1")
    with pytest.raises(DecryptError, match="authentication failed"):
        ring.decrypt(key_bound, b"token", b"vault:2")
    # Mode f does not authenticate the key name: a fresh decrypt and a hit agree.
    assert ring.decrypt(field_bound, b"imap", b"iad:2") == b"secret"


def test_a_ring_without_the_cache_holds_nothing() -> None:
    ring = KeyRing([Key.from_secret(generate_key())])
    assert ring.decrypt(ring.encrypt(b"secret", b"imap"), b"imap", b"k") == b"secret"
    assert ring.cached is None and ring.cached_count() == 0
    with pytest.raises(ValueError, match="decrypt_cache_entries"):
        KeyRing([Key.from_secret(generate_key())], decrypt_cache_entries=-1)


# --- Configuration ---------------------------------------------------------------------


def load(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Settings:
    (tmp_path / "fieldcrypt.yaml").write_text(text, encoding="utf-8")
    return load_settings("fieldcrypt.yaml", {}, env or {}, tmp_path)


def test_decrypt_cache_entries_defaults_to_10000_and_reaches_the_key_ring(
    tmp_path: Path,
) -> None:
    environ = {"FIELDCRYPT_SECRET": generate_key()}
    settings = load(tmp_path, "rules:\n  - key: 'iad:*'\n    fields: [imap]\n", environ)
    assert settings.decrypt_cache_entries == 10000
    assert build_keyring(settings, environ).decrypt_cache_entries == 10000
    assert "decrypt cache:     up to 10000" in explain(settings)

    settings = load(tmp_path, "decrypt_cache_entries: 50\n", environ)
    assert build_keyring(settings, environ).decrypt_cache_entries == 50
    off = load(tmp_path, "decrypt_cache_entries: 0\n", environ)
    assert build_keyring(off, environ).cached is None
    assert "decrypt cache:     off" in explain(off)
    from_env = load(tmp_path, "{}\n", {"FIELDCRYPT_DECRYPT_CACHE_ENTRIES": "7"})
    assert from_env.decrypt_cache_entries == 7


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("-1", "must be at least 0, got -1"),
        ("lots", "must be a whole number, got 'lots'"),
        ("1.5", "must be a whole number, got 1.5"),
        ("true", "must be a whole number, got True"),
    ],
)
def test_bad_decrypt_cache_entries_names_the_line(tmp_path: Path, value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, f"on_decrypt_error: error\ndecrypt_cache_entries: {value}\n")
    assert str(caught.value) == f"fieldcrypt.yaml:2: decrypt_cache_entries {problem}"


def test_bad_decrypt_cache_entries_in_the_environment_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, "{}\n", {"FIELDCRYPT_DECRYPT_CACHE_ENTRIES": "-5"})
    assert str(caught.value) == "FIELDCRYPT_DECRYPT_CACHE_ENTRIES: must be at least 0, got -5"
