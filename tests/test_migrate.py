"""Migration of stored values, admin MIGRATE and `fieldcrypt migrate`, against real servers.

Every test builds an EmailEngine-shaped store (tests/dataset.py), migrates it, and then
reads the raw store on the upstream's own port, value by value: which key id each
protected value is under, that it opens to what the application wrote, that nothing
else changed (unprotected fields, sets, TTLs), and that no secret is left in cleartext.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import itertools
import json
import random
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import hiredis
import pytest
import redis

from proxy.admin import NOPERM, Admin, AdminConfig, Jobs
from proxy.app import build_state
from proxy.client import RedisClient
from proxy.config import load_settings
from proxy.crypto import HEADER_PREFIX, Key, KeyRing
from proxy.migrate import CAS_SCRIPT, ENCRYPT, LOCK_KEY, LOCK_TTL_MS, Migration, Options, Report
from proxy.server import Target
from proxy.session import Session
from tests import dataset
from tests.dataset import ACCOUNT_SECRET_FIELDS, PLAINTEXT_MARKER, Dataset
from tests.servers import (
    ALL_SERVER_KINDS,
    EmbeddedServer,
    ProxyThread,
    cli_binary,
    free_port,
    raw_connect,
    server_binary,
    wait_for,
)

UPSTREAM_KINDS = ALL_SERVER_KINDS  # the `upstream` kinds here (tests/conftest.py)

REPO = Path(__file__).resolve().parent.parent


def _raw_key(byte: int) -> str:
    return "base64:" + base64.b64encode(bytes([byte]) * 32).decode("ascii")


KEY_A = _raw_key(0xA1)  # the first key a store is encrypted with
KEY_B = _raw_key(0xB2)  # the key it is rotated to
KEY_C = _raw_key(0xC3)  # a key some accounts were wrongly encrypted with
KEY_D = _raw_key(0xD4)  # a key nobody has any more
ADMIN_USER = "fieldcrypt-admin"
ADMIN_PASSWORD = "admin password, long enough to be taken seriously"
HOUR_MS = 3_600_000
MARKER = PLAINTEXT_MARKER.encode()

# (key, field) -> the plaintext the application should read there
Expected = dict[tuple[bytes, bytes], bytes]
# key -> (type, content, PEXPIRETIME); a content is a dict (hash), set, bytes or list
Snapshot = dict[bytes, tuple[bytes, Any, int]]
StartProxy = Callable[..., ProxyThread]


def kid(secret: str) -> str:
    return Key.from_secret(secret).kid


def ring(secret: str) -> KeyRing:
    return KeyRing([Key.from_secret(secret)])


# --- Fixtures ----------------------------------------------------------------------


@pytest.fixture
def raw(upstream: EmbeddedServer) -> Iterator[redis.Redis]:
    """The upstream seen directly, bypassing the proxy; flushed for each test."""
    client = redis.Redis(port=upstream.port)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def start_proxy(upstream: EmbeddedServer, tmp_path: Path) -> Iterator[StartProxy]:
    """Starts fieldcrypt (the real config loader and app wiring) in front of `upstream`
    with the data set's rules and the key ring given as [(secret, decrypt_only), ...]."""
    started: list[ProxyThread] = []
    numbers = itertools.count()

    def start(keys: Sequence[tuple[str, bool]], admin_password: str | None = None) -> ProxyThread:
        directory = tmp_path / f"proxy-{next(numbers)}"
        directory.mkdir()
        entries: list[dict[str, object]] = []
        for position, (secret, decrypt_only) in enumerate(keys):
            (directory / f"key-{position}").write_text(secret + "\n", encoding="utf-8")
            entries.append({"secret_file": f"key-{position}", "decrypt_only": decrypt_only})
        (directory / "fieldcrypt.yaml").write_text(
            dataset.rules_yaml(entries, admin_password=admin_password), encoding="utf-8"
        )
        settings = load_settings("fieldcrypt.yaml", {}, {}, directory)
        handle = ProxyThread(build_state(settings, f"redis://127.0.0.1:{upstream.port}"))
        started.append(handle)
        return handle

    yield start
    for handle in started:
        if handle.thread.is_alive():
            handle.stop()


@pytest.fixture
def rules_file(tmp_path: Path) -> str:
    """The data set's rules with no keys: the CLI takes them from --secret/--decrypt."""
    path = tmp_path / "rules.yaml"
    path.write_text(dataset.rules_yaml(), encoding="utf-8")
    return str(path)


def client_of(proxy: ProxyThread, **kwargs: Any) -> redis.Redis:
    return redis.Redis(port=proxy.port, **kwargs)


# --- Helpers: the admin command ----------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def report_of(reply: Any) -> dict[str, Any]:
    """A MIGRATE reply (RESP3 map or RESP2 flat pairs) as a dict of str -> str/int/list."""
    items = reply.items() if isinstance(reply, dict) else zip(reply[0::2], reply[1::2], strict=True)
    return {_plain(name): _plain(value) for name, value in items}


def admin(client: redis.Redis, *args: object) -> dict[str, Any]:
    return report_of(client.execute_command("MIGRATE", *args))


def migrate(client: redis.Redis, *options: object) -> dict[str, Any]:
    """Start a job through the proxy and wait for its final report."""
    started = admin(client, *options)
    assert started["state"] == "running", started
    final = admin(client, "WAIT", "60")
    assert final["job"] == started["job"]
    assert final["state"] == "done", final
    return final


# --- Helpers: the CLI --------------------------------------------------------------


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy.cli", "migrate", *args]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(*args), cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


def cli_report(stdout: str) -> dict[str, str]:
    """`fieldcrypt migrate`'s report: one `name  value` line per item."""
    report: dict[str, str] = {}
    for line in stdout.splitlines():
        name, _, value = line.partition(" ")
        report[name] = value.strip()
    return report


def redis_url(upstream: EmbeddedServer) -> str:
    return f"redis://127.0.0.1:{upstream.port}"


# --- Helpers: the raw store ----------------------------------------------------------


def snapshot(client: redis.Redis) -> Snapshot:
    """Everything the upstream holds, read directly: type, content and expiry of every key."""
    keys = sorted(client.scan_iter(count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
    types: list[bytes] = pipe.execute()
    readers = {
        b"hash": pipe.hgetall,
        b"set": pipe.smembers,
        b"string": pipe.get,
        b"list": lambda key: pipe.lrange(key, 0, -1),
    }
    for key, kind in zip(keys, types, strict=True):
        assert kind in readers, f"unexpected {kind!r} key {key!r}"
        readers[kind](key)
        pipe.execute_command("PEXPIRETIME", key)
    replies = pipe.execute()
    return {
        key: (kind, replies[2 * i], replies[2 * i + 1])
        for i, (key, kind) in enumerate(zip(keys, types, strict=True))
    }


def original_snapshot(data: Dataset) -> Snapshot:
    """What `dataset.load` writes, as `snapshot` would read it (no expiry)."""
    content: Snapshot = {key: (b"hash", dict(fields), -1) for key, fields in data.hashes.items()}
    content.update({key: (b"set", set(members), -1) for key, members in data.sets.items()})
    return content


def protected_expectation(data: Dataset) -> Expected:
    return {(key, name): value for key, name, value in data.protected()}


def assert_all_under(snap: Snapshot, expected: Expected, secret: str) -> None:
    """Each protected value is an envelope under `secret`'s key id and opens to `expected`."""
    keyring, key_id = ring(secret), kid(secret)
    wrong: list[str] = []
    for (key, name), plaintext in expected.items():
        stored = snap[key][1].get(name)
        if stored is None or not stored.startswith(HEADER_PREFIX):
            wrong.append(f"{key!r}/{name!r}: not encrypted")
        elif KeyRing.kid_of(stored) != key_id:
            wrong.append(f"{key!r}/{name!r}: under key id {KeyRing.kid_of(stored)}")
        elif keyring.decrypt(stored, name, key) != plaintext:
            wrong.append(f"{key!r}/{name!r}: opens to another value")
    assert not wrong, f"{len(wrong)} protected values are wrong, e.g. {wrong[:5]}"


def assert_no_plaintext(snap: Snapshot) -> None:
    """No secret in cleartext anywhere: in any value, member or key name."""
    found: list[bytes] = []
    for key, (_, content, _) in snap.items():
        if isinstance(content, dict):
            blobs = [*content, *content.values()]
        elif isinstance(content, set | list):
            blobs = list(content)
        else:
            blobs = [content]
        if any(MARKER in blob for blob in [key, *blobs]):
            found.append(key)
    assert not found, f"cleartext secrets left in {len(found)} keys, e.g. {found[:5]}"


def assert_only_protected_changed(before: Snapshot, after: Snapshot, data: Dataset) -> None:
    """The same keys, types and expiries; in hashes the same fields, and every unprotected
    field and every set byte-identical."""
    assert after.keys() == before.keys()
    changed: list[str] = []
    for key, (kind, content, expires) in before.items():
        after_kind, after_content, after_expires = after[key]
        if (after_kind, after_expires) != (kind, expires):
            changed.append(f"{key!r}: type or expiry")
        elif kind != b"hash":
            if after_content != content:
                changed.append(f"{key!r}: content")
        elif after_content.keys() != content.keys():
            changed.append(f"{key!r}: fields")
        else:
            changed.extend(
                f"{key!r}/{name!r}"
                for name, value in content.items()
                if not data.is_protected(key, name) and after_content[name] != value
            )
    assert not changed, f"{len(changed)} things changed that should not, e.g. {changed[:5]}"


def count_envelopes(snap: Snapshot, data: Dataset) -> int:
    return sum(snap[key][1][name].startswith(HEADER_PREFIX) for key, name, _ in data.protected())


def app_view(client: redis.Redis, keys: Sequence[bytes]) -> dict[bytes, dict[bytes, bytes]]:
    """What the application reads through the proxy: HGETALL of each hash."""
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hgetall(key)
    return dict(zip(keys, pipe.execute(), strict=True))


def seal_directly(
    client: redis.Redis, data: Dataset, secret_of: Callable[[bytes], str | None]
) -> Expected:
    """Encrypt protected values straight into the store, each under the key that
    `secret_of(key)` names (None: leave cleartext), as a proxy with that key would.
    Returns the plaintexts."""
    rings: dict[str, KeyRing] = {}
    pipe = client.pipeline(transaction=False)
    for key, name, value in data.protected():
        secret = secret_of(key)
        if secret is not None:
            keyring = rings.setdefault(secret, ring(secret))
            pipe.hset(key, name, keyring.encrypt(value, name))
    pipe.execute()
    return protected_expectation(data)


def account_number(key: bytes) -> int:
    return int(key.split(b":", 1)[1]) if key.startswith(dataset.ACCOUNT_PREFIX) else 0


def command_stat(client: redis.Redis, command: str) -> int:
    """How many times the server ran `command` (INFO commandstats), failed calls included."""
    stats = client.info("commandstats").get(f"cmdstat_{command}", {})
    return sum(int(stats.get(name, 0)) for name in ("calls", "rejected_calls"))


def send(sock: Any, *args: str) -> bytes:
    """One command on a raw socket; the reply's exact bytes."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        encoded = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(encoded), encoded))
    sock.sendall(b"".join(parts))
    reader, received = hiredis.Reader(), b""
    while True:
        chunk = sock.recv(65536)
        assert chunk, "the proxy closed the connection"
        received += chunk
        reader.feed(chunk)
        if reader.gets() is not False:
            return bytes(received)


# --- Encrypting a cleartext store ----------------------------------------------------


def test_migrate_encrypts_10000_accounts_in_place_and_the_application_sees_no_change(
    raw: redis.Redis, start_proxy: StartProxy
) -> None:
    data = dataset.build(10_000)
    dataset.load(raw, data)
    expiring = data.account_keys()[::50]
    pipe = raw.pipeline(transaction=False)
    for key in expiring:
        pipe.pexpire(key, HOUR_MS)
    pipe.execute()
    proxy = start_proxy([(KEY_A, False)])
    app = client_of(proxy)
    hashes = list(data.hashes)
    view_before = app_view(app, hashes)
    assert view_before == data.hashes
    before = snapshot(raw)

    report = migrate(app, "RATE", "0")

    after = snapshot(raw)
    total = data.protected_count
    assert report["keys_scanned"] == data.protected_hashes
    assert report["fields_checked"] == total
    assert report["fields_encrypted"] == total
    assert report["census_cleartext"] == total
    assert (report["fields_rekeyed"], report["fields_undecryptable"]) == (0, 0)
    assert_all_under(after, protected_expectation(data), KEY_A)
    assert_no_plaintext(after)
    assert_only_protected_changed(before, after, data)  # expiries: the same PEXPIRETIME
    assert all(after[key][2] > 0 for key in expiring)
    assert LOCK_KEY not in after
    assert app_view(app, hashes) == view_before
    print(f"\n10,000 accounts: {total} fields at {report['fields_per_second']} fields/s")


# --- Re-keying and decrypting back ----------------------------------------------------


def test_rekey_after_restart_with_the_new_key_first_and_the_old_one_decrypt_only(
    raw: redis.Redis, start_proxy: StartProxy
) -> None:
    data = dataset.build(300)
    dataset.load(raw, data)
    cleartext = snapshot(raw)
    expected = protected_expectation(data)
    first = start_proxy([(KEY_A, False)])
    migrate(client_of(first), "RATE", "0")
    assert_all_under(snapshot(raw), expected, KEY_A)
    first.stop()

    rotated = start_proxy([(KEY_B, False), (KEY_A, True)])
    report = migrate(client_of(rotated), "RATE", "0")

    after = snapshot(raw)
    assert report["fields_rekeyed"] == len(expected)
    assert report["fields_encrypted"] == 0
    assert report["census_by_key_id"] == [f"{kid(KEY_A)}={len(expected)}"]
    assert_all_under(after, expected, KEY_B)
    assert_only_protected_changed(cleartext, after, data)
    assert app_view(client_of(rotated), list(data.hashes)) == data.hashes
    rotated.stop()

    # Back to cleartext: a proxy whose every key is decrypt_only.
    reader = start_proxy([(KEY_B, True)])
    report = migrate(client_of(reader), "RATE", "0")

    assert report["fields_decrypted"] == len(expected)
    assert snapshot(raw) == cleartext


def test_cli_rekeys_a_store_left_under_several_old_keys_then_decrypts_it_back(
    raw: redis.Redis, upstream: EmbeddedServer, rules_file: str
) -> None:
    # A botched migration: some accounts under A, some under C, some still cleartext.
    data = dataset.build(300)
    dataset.load(raw, data)
    cleartext = snapshot(raw)

    def botched(key: bytes) -> str | None:
        number = account_number(key)
        return None if number % 10 == 1 else KEY_A if number % 2 else KEY_C

    expected = seal_directly(raw, data, botched)
    under = {KEY_A: 0, KEY_C: 0, None: 0}
    for key, _ in expected:
        under[botched(key)] += 1
    assert min(under.values()) > 0

    rekeyed = run_cli(
        "--redis", redis_url(upstream), "--config", rules_file,
        "--secret", KEY_B, "--decrypt", KEY_A, "--decrypt", KEY_C,
    )  # fmt: skip

    assert rekeyed.returncode == 0, rekeyed.stderr
    report = cli_report(rekeyed.stdout)
    assert report["fields_rekeyed"] == str(under[KEY_A] + under[KEY_C])
    assert report["fields_encrypted"] == str(under[None])
    census = sorted([f"{kid(KEY_A)}={under[KEY_A]}", f"{kid(KEY_C)}={under[KEY_C]}"])
    assert report["census_by_key_id"] == ", ".join(census)
    after = snapshot(raw)
    assert_all_under(after, expected, KEY_B)
    assert_no_plaintext(after)
    assert_only_protected_changed(cleartext, after, data)

    decrypted = run_cli("--redis", redis_url(upstream), "--config", rules_file, "--decrypt", KEY_B)

    assert decrypted.returncode == 0, decrypted.stderr
    assert cli_report(decrypted.stdout)["fields_decrypted"] == str(len(expected))
    assert snapshot(raw) == cleartext


# --- Dry run ---------------------------------------------------------------------------


def test_dryrun_writes_nothing_and_reports_what_would_change_with_a_census_by_key_id(
    raw: redis.Redis, upstream: EmbeddedServer, start_proxy: StartProxy, rules_file: str
) -> None:
    data = dataset.build(200)
    dataset.load(raw, data)

    def mixed(key: bytes) -> str | None:
        number = account_number(key)
        return KEY_A if number <= 50 else KEY_C if number <= 80 else None

    expected = seal_directly(raw, data, mixed)
    counts = {KEY_A: 0, KEY_C: 0, None: 0}
    for key, _ in expected:
        counts[mixed(key)] += 1
    before = snapshot(raw)
    proxy = start_proxy([(KEY_B, False), (KEY_A, True)])  # C is in nobody's ring

    report = migrate(client_of(proxy), "DRYRUN")

    assert snapshot(raw) == before
    assert report["dry_run"] == "yes"
    assert report["fields_would_be_encrypted"] == counts[None]
    assert report["fields_would_be_rekeyed"] == counts[KEY_A]
    assert report["fields_undecryptable"] == counts[KEY_C]
    assert report["fields_checked"] == len(expected)
    assert report["census_cleartext"] == counts[None]
    assert report["census_by_key_id"] == sorted(
        [f"{kid(KEY_A)}={counts[KEY_A]}", f"{kid(KEY_C)}={counts[KEY_C]}"]
    )

    from_cli = run_cli(
        "--redis", redis_url(upstream), "--config", rules_file,
        "--secret", KEY_B, "--decrypt", KEY_A, "--dry-run",
    )  # fmt: skip

    assert from_cli.returncode == 1, from_cli.stderr  # C's values would stay undecryptable
    assert cli_report(from_cli.stdout)["fields_would_be_rekeyed"] == str(counts[KEY_A])
    assert snapshot(raw) == before


# --- Applications keep working during a migration -------------------------------------


def test_application_writes_during_a_migration_are_never_lost(
    raw: redis.Redis, start_proxy: StartProxy
) -> None:
    data = dataset.build(5_000)
    dataset.load(raw, data)
    proxy = start_proxy([(KEY_A, False)])
    writers = 4
    max_writes = 100_000  # per writer: the loop ends even if the job never does
    stop = threading.Event()
    writes = [0] * writers
    latest: list[Expected] = [{} for _ in range(writers)]
    problems: list[str] = []

    def write(number: int) -> None:
        # Each writer owns the accounts whose id is `number` modulo `writers`, so the
        # last value it wrote to a field is the value that field must end with.
        rng = random.Random(number)
        owned = [key for key in data.account_keys() if account_number(key) % writers == number]
        app = client_of(proxy)
        try:
            for i in range(max_writes):
                if stop.is_set():
                    return
                key = rng.choice(owned)
                name = rng.choice(ACCOUNT_SECRET_FIELDS)
                value = json.dumps({"pass": f"w{number}-{i}-{PLAINTEXT_MARKER}"}).encode()
                app.hset(key, name, value)
                latest[number][key, name] = value
                if app.hget(key, name) != value:
                    problems.append(f"{key!r}/{name!r} did not read back what was written")
                if i % 16 == 0:
                    seen = app.hgetall(key)
                    wanted = dict(data.hashes[key])
                    wanted.update({n: v for (k, n), v in latest[number].items() if k == key})
                    if seen != wanted:
                        problems.append(f"HGETALL {key!r} differs from what was written")
                writes[number] = i + 1
        except Exception as error:  # reported to the test below
            problems.append(f"writer {number}: {error!r}")
        finally:
            app.close()

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for thread in threads:
        thread.start()
    try:
        app = client_of(proxy)
        started = admin(app, "RATE", "2000")
        assert started["state"] == "running"
        at_start = sum(writes)
        wait_for(lambda: sum(writes) >= at_start + 500, 30, "application writes")
        assert admin(app, "STATUS")["state"] == "running"  # so they overlapped the job
        report = admin(app, "WAIT", "60")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)

    assert not problems, problems[:5]
    assert report["state"] == "done", report
    assert isinstance(report["write_conflicts_retried"], int)
    assert report["write_conflicts_retried"] >= 0
    expected = protected_expectation(data)
    final_hashes = {key: dict(fields) for key, fields in data.hashes.items()}
    for written in latest:
        expected.update(written)
        for (key, name), value in written.items():
            final_hashes[key][name] = value
    after = snapshot(raw)
    assert_all_under(after, expected, KEY_A)
    assert_no_plaintext(after)
    assert app_view(client_of(proxy), list(final_hashes)) == final_hashes


def test_a_value_changed_between_the_read_and_the_write_is_retried_not_overwritten(
    raw: redis.Redis, upstream: EmbeddedServer, start_proxy: StartProxy
) -> None:
    # The engine reads a page, decides, then compare-and-sets each change. To put an
    # application write between its read and its write without relying on timing, the
    # test hands the engine's settle step values "read" before the application wrote.
    data = dataset.build(3)
    dataset.load(raw, data)
    proxy = start_proxy([(KEY_A, False)])
    app = client_of(proxy)
    rules = proxy.state.crypt.rules
    through_proxy, behind_proxy = (b"iad:1", b"imap"), (b"iad:2", b"smtp")
    # What the engine read: the cleartext values, before the application wrote.
    stale = [(key, name, data.hashes[key][name]) for key, name in (through_proxy, behind_proxy)]
    app.hset(*through_proxy, b"written through the proxy")
    raw.hset(*behind_proxy, b"written behind the proxy, in cleartext")
    stored_by_proxy = raw.hget(*through_proxy)

    async def settle() -> Report:
        client = await RedisClient.connect(Target("127.0.0.1", upstream.port))
        try:
            migration = Migration(client, rules, ring(KEY_A), Options(rate=0))
            await client.execute("SCRIPT", "LOAD", CAS_SCRIPT)
            found = []
            for key, name, value in stale:
                key_rules = rules.match_key(0, key)
                assert key_rules is not None
                rule = key_rules.field_rule(name)
                assert rule is not None
                found.append((key, rule, name, value))
            await migration._settle(found)
            return migration.report
        finally:
            await client.close()

    report = asyncio.run(settle())

    assert report.conflicts == 2
    assert raw.hget(*through_proxy) == stored_by_proxy  # already under A: left as it is
    rewritten = raw.hget(*behind_proxy)
    assert isinstance(rewritten, bytes)
    assert ring(KEY_A).decrypt(rewritten, *reversed(behind_proxy)) == (
        b"written behind the proxy, in cleartext"
    )
    assert report.changed[ENCRYPT] == 1
    assert app.hget(*through_proxy) == b"written through the proxy"


# --- Values no key opens -----------------------------------------------------------------


def test_undecryptable_values_are_left_byte_identical_and_named_and_the_cli_exits_1(
    raw: redis.Redis, upstream: EmbeddedServer, start_proxy: StartProxy, rules_file: str
) -> None:
    data = dataset.build(120)
    dataset.load(raw, data)
    lost = data.account_keys()[:75]
    pipe = raw.pipeline(transaction=False)
    old = ring(KEY_D)
    for key in lost:
        for name in (b"imap", b"smtp"):
            pipe.hset(key, name, old.encrypt(data.hashes[key][name], name))
    pipe.execute()
    before = snapshot(raw)
    unreadable = {f"{key.decode()}/{name}" for key in lost for name in ("imap", "smtp")}
    readable = {
        (key, name): value
        for key, name, value in data.protected()
        if f"{key.decode()}/{name.decode()}" not in unreadable
    }
    proxy = start_proxy([(KEY_A, False)])

    report = migrate(client_of(proxy), "RATE", "0")

    after = snapshot(raw)
    assert report["fields_undecryptable"] == len(unreadable) == 150
    assert len(report["undecryptable_fields"]) == 100
    assert set(report["undecryptable_fields"]) <= unreadable
    assert report["fields_encrypted"] == len(readable)
    for key in lost:
        for name in (b"imap", b"smtp"):
            assert after[key][1][name] == before[key][1][name]
    assert_all_under(after, readable, KEY_A)

    from_cli = run_cli("--redis", redis_url(upstream), "--config", rules_file, "--secret", KEY_A)

    assert from_cli.returncode == 1, from_cli.stderr
    cli = cli_report(from_cli.stdout)
    assert cli["fields_undecryptable"] == "150"
    assert cli["fields_encrypted"] == "0"
    named = cli["undecryptable_fields"].split(", ")
    assert len(named) == 100 and set(named) <= unreadable
    assert snapshot(raw) == after


# --- The CLI's exit codes ------------------------------------------------------------


def test_cli_exits_0_when_clean_and_a_second_run_changes_nothing(
    raw: redis.Redis, upstream: EmbeddedServer, rules_file: str
) -> None:
    data = dataset.build(100)
    dataset.load(raw, data)
    before = snapshot(raw)
    args = ("--redis", redis_url(upstream), "--config", rules_file, "--secret", KEY_A)

    first = run_cli(*args)

    assert first.returncode == 0, first.stderr
    assert cli_report(first.stdout)["fields_encrypted"] == str(data.protected_count)
    after_first = snapshot(raw)
    assert_all_under(after_first, protected_expectation(data), KEY_A)
    assert_only_protected_changed(before, after_first, data)

    second = run_cli(*args)

    assert second.returncode == 0, second.stderr
    report = cli_report(second.stdout)
    assert report["fields_encrypted"] == "0"
    assert report["fields_skipped_already_done"] == str(data.protected_count)
    assert snapshot(raw) == after_first


def test_cli_exits_2_for_a_bad_url_an_unreachable_redis_a_bad_secret_or_no_rules(
    raw: redis.Redis, upstream: EmbeddedServer, rules_file: str, tmp_path: Path
) -> None:
    data = dataset.build(10)
    dataset.load(raw, data)
    before = snapshot(raw)
    bad_secret = "base64:this-is-not-a-key"
    no_rules = tmp_path / "empty.yaml"
    no_rules.write_text("admin_username: someone\n", encoding="utf-8")
    cases = {
        "bad URL": ("--redis", "http://127.0.0.1:6379", "--config", rules_file),
        "unreachable": ("--redis", f"redis://127.0.0.1:{free_port()}", "--config", rules_file),
        "bad secret": ("--redis", redis_url(upstream), "--config", rules_file),
        "no rules": ("--redis", redis_url(upstream), "--config", str(no_rules)),
    }
    wanted = {
        "bad URL": "--redis",
        "unreachable": "unreachable",
        "bad secret": "--secret",
        "no rules": "no rules",
    }
    for case, args in cases.items():
        secret = bad_secret if case == "bad secret" else KEY_A
        result = run_cli(*args, "--secret", secret)
        assert result.returncode == 2, (case, result.stdout, result.stderr)
        assert wanted[case] in result.stderr, (case, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, (case, result.stderr)
        assert bad_secret not in result.stderr and KEY_A not in result.stderr
    assert snapshot(raw) == before


# --- Who may run admin commands --------------------------------------------------------


def test_admin_commands_need_the_admin_auth_which_the_proxy_never_forwards(
    raw: redis.Redis, start_proxy: StartProxy
) -> None:
    proxy = start_proxy([(KEY_A, False)], admin_password=ADMIN_PASSWORD)
    auth_before = command_stat(raw, "auth")
    sock = raw_connect(proxy.port)
    try:
        refused = send(sock, "MIGRATE", "STATUS")
        wrong = send(sock, "AUTH", ADMIN_USER, "not the password")
        still_refused = send(sock, "MIGRATE", "STATUS")
        accepted = send(sock, "AUTH", ADMIN_USER, ADMIN_PASSWORD)
        status = send(sock, "MIGRATE", "STATUS")
        auth_after_admin = command_stat(raw, "auth")
        # The same counter does see an AUTH that the proxy forwards.
        forwarded = send(sock, "AUTH", "some-redis-user", "some password")
    finally:
        sock.close()

    assert refused == b"-" + NOPERM.encode() + b"\r\n"
    assert wrong.startswith(b"-WRONGPASS ")
    assert still_refused == refused
    assert accepted == b"+OK\r\n"
    assert status == b"*2\r\n$5\r\nstate\r\n$4\r\nnone\r\n"
    assert auth_after_admin == auth_before
    assert forwarded.startswith(b"-")
    assert command_stat(raw, "auth") == auth_before + 1


def test_without_an_admin_password_only_loopback_clients_may_run_migrate() -> None:
    def never_connects() -> Any:
        raise AssertionError("no job may start")

    admin_commands = Admin(AdminConfig(ADMIN_USER, None), Jobs(never_connects, lambda: None, 0))

    def talk(loopback: bool, request: bytes) -> tuple[bytes, bytes]:
        to_upstream: list[bytes | bytearray] = []
        to_client: list[bytes | bytearray] = []
        session = Session(admin_commands.handlers(), to_upstream.append, to_client.append)
        session.loopback = loopback
        session.client_data(request)
        return b"".join(to_client), b"".join(to_upstream)

    for request in (
        b"*2\r\n$7\r\nMIGRATE\r\n$6\r\nSTATUS\r\n",
        b"*1\r\n$7\r\nMIGRATE\r\n",
        b"*2\r\n$7\r\nMIGRATE\r\n$6\r\nDRYRUN\r\n",
        b"*2\r\n$7\r\nMIGRATE\r\n$6\r\nCANCEL\r\n",
    ):
        assert talk(False, request) == (b"-" + NOPERM.encode() + b"\r\n", b"")
    assert talk(True, b"*2\r\n$7\r\nMIGRATE\r\n$6\r\nSTATUS\r\n") == (
        b"*2\r\n$5\r\nstate\r\n$4\r\nnone\r\n",
        b"",
    )
    # With no admin password there is no admin user to log in as: AUTH goes to Redis.
    auth = b"*3\r\n$4\r\nAUTH\r\n$16\r\nfieldcrypt-admin\r\n$1\r\nx\r\n"
    assert talk(False, auth) == (b"", auth)


def test_native_migrate_passes_through_and_moves_the_key_to_another_server(
    raw: redis.Redis, upstream: EmbeddedServer, start_proxy: StartProxy
) -> None:
    other = EmbeddedServer(server_binary(upstream.kind))  # type: ignore[attr-defined]
    other.start()
    try:
        proxy = start_proxy([(KEY_A, False)], admin_password=ADMIN_PASSWORD)
        app = client_of(proxy)  # not the admin: Redis's MIGRATE is not an admin command
        app.hset("iad:1", mapping={"imap": "secret settings", "name": "Ada"})
        stored = raw.hgetall("iad:1")
        assert isinstance(stored[b"imap"], bytes) and stored[b"imap"].startswith(HEADER_PREFIX)

        reply = app.execute_command("MIGRATE", "127.0.0.1", other.port, "iad:1", 0, 5000)

        assert reply == b"OK"
        assert raw.exists("iad:1") == 0
        with redis.Redis(port=other.port) as moved_to:
            assert moved_to.hgetall("iad:1") == stored
    finally:
        other.stop()


# --- One job at a time -------------------------------------------------------------------


def test_two_proxies_asked_at_once_run_one_job_and_the_other_says_one_is_running(
    raw: redis.Redis, start_proxy: StartProxy
) -> None:
    dataset.load(raw, dataset.build(500))
    proxies = [start_proxy([(KEY_A, False)]), start_proxy([(KEY_A, False)])]
    clients = [client_of(proxy) for proxy in proxies]
    barrier = threading.Barrier(2)
    answers: list[Any] = [None, None]

    def ask(number: int) -> None:
        barrier.wait(10)
        try:
            # Slow, so that the job is still running when the other proxy asks.
            answers[number] = admin(clients[number], "COUNT", "10", "RATE", "50")
        except redis.ResponseError as error:
            answers[number] = error

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    started = [n for n in range(2) if isinstance(answers[n], dict)]
    assert len(started) == 1, [str(a) for a in answers]
    winner, loser = started[0], 1 - started[0]
    assert isinstance(answers[loser], redis.ResponseError)
    assert "a migration is already running on this Redis" in str(answers[loser])
    assert raw.get(LOCK_KEY) == answers[winner]["job"].encode()
    with pytest.raises(redis.ResponseError, match="already running on this proxy"):
        admin(clients[winner], "RATE", "0")
    assert admin(clients[loser], "STATUS") == {"state": "none"}

    admin(clients[winner], "CANCEL")
    final = admin(clients[winner], "WAIT", "30")

    assert final["state"] == "cancelled"
    assert raw.exists(LOCK_KEY) == 0


def test_a_migrate_start_is_answered_even_if_the_garbage_collector_runs_meanwhile(
    raw: redis.Redis, start_proxy: StartProxy
) -> None:
    # Any Python thread may run the cyclic garbage collector at any moment (here one
    # does so in a loop). A job being started is a task awaiting Redis; if nothing holds
    # that task strongly, the collector can destroy it mid-way.
    dataset.load(raw, dataset.build(5))
    proxy = start_proxy([(KEY_A, False)])
    app = client_of(proxy, socket_timeout=5)  # a reply that never comes fails the test
    stop = threading.Event()

    def collect() -> None:
        for _ in range(100_000):
            if stop.is_set():
                return
            gc.collect()

    collector = threading.Thread(target=collect)
    collector.start()
    answers: list[str] = []
    try:
        for _ in range(50):
            try:
                answers.append(admin(app, "RATE", "0")["state"])
            except redis.RedisError as error:
                answers.append(str(error))
                break
            admin(app, "WAIT", "10")
    finally:
        stop.set()
        collector.join(60)

    assert answers == ["running"] * 50


# --- Stopping and resuming -----------------------------------------------------------------


def test_a_cli_job_killed_midway_is_finished_by_the_next_run(
    raw: redis.Redis, upstream: EmbeddedServer, rules_file: str
) -> None:
    data = dataset.build(5_000)
    dataset.load(raw, data)
    before = snapshot(raw)
    args = ("--redis", redis_url(upstream), "--config", rules_file, "--secret", KEY_A)
    writes_before = command_stat(raw, "evalsha")
    job = subprocess.Popen(
        cli_command(*args, "--rate", "2000"),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: command_stat(raw, "evalsha") >= writes_before + 1000 or job.poll() is not None,
            30,
            "the CLI to rewrite some fields",
        )
        assert job.poll() is None, "the job ended before it could be killed"
        job.kill()  # SIGKILL: no clean-up, the lock stays behind
    finally:
        if job.poll() is None:
            job.kill()
        job.wait(10)
    midway = snapshot(raw)
    done_before = count_envelopes(midway, data)
    assert 0 < done_before < data.protected_count
    assert 0 < raw.pttl(LOCK_KEY) <= LOCK_TTL_MS

    blocked = run_cli(*args)

    assert blocked.returncode == 2
    assert "already running" in blocked.stderr
    assert snapshot(raw) == midway

    # The killed job's lock expires LOCK_TTL_MS (30 s) after its last renewal. Rather
    # than sit out those 30 s, do what an operator who knows the job is dead does:
    # delete the lock. The resumed run must not depend on how the lock went away.
    raw.delete(LOCK_KEY)
    resumed = run_cli(*args)

    assert resumed.returncode == 0, resumed.stderr
    report = cli_report(resumed.stdout)
    assert report["fields_encrypted"] == str(data.protected_count - done_before)
    assert report["fields_skipped_already_done"] == str(done_before)
    after = snapshot(raw)
    assert_all_under(after, protected_expectation(data), KEY_A)
    assert_no_plaintext(after)
    assert_only_protected_changed(before, after, data)


def test_cancel_stops_a_running_job_and_a_later_migrate_finishes_the_rest(
    raw: redis.Redis, start_proxy: StartProxy
) -> None:
    data = dataset.build(1_000)
    dataset.load(raw, data)
    before = snapshot(raw)
    proxy = start_proxy([(KEY_A, False)])
    app = client_of(proxy)
    started = admin(app, "COUNT", "20", "RATE", "200")
    wait_for(lambda: admin(app, "STATUS")["fields_encrypted"] > 0, 30, "the first rewrites")

    admin(app, "CANCEL")
    cancelled = admin(app, "WAIT", "30")

    assert cancelled["job"] == started["job"]
    assert cancelled["state"] == "cancelled"
    assert raw.exists(LOCK_KEY) == 0
    midway = snapshot(raw)
    done_before = count_envelopes(midway, data)
    assert done_before == cancelled["fields_encrypted"]
    assert 0 < done_before < data.protected_count

    rest = migrate(app, "RATE", "0")

    assert rest["fields_encrypted"] == data.protected_count - done_before
    assert rest["fields_skipped_already_done"] == done_before
    after = snapshot(raw)
    assert_all_under(after, protected_expectation(data), KEY_A)
    assert_only_protected_changed(before, after, data)


# --- The report as people read it ----------------------------------------------------------


def test_status_is_flat_pairs_in_redis_cli_over_resp2_and_a_map_over_resp3(
    raw: redis.Redis, start_proxy: StartProxy
) -> None:
    data = dataset.build(20)
    dataset.load(raw, data)
    proxy = start_proxy([(KEY_A, False)])
    report = migrate(client_of(proxy), "RATE", "0")
    cli = cli_binary("redis")

    def redis_cli(*args: str) -> str:
        result = subprocess.run(
            [cli, "-h", "127.0.0.1", "-p", str(proxy.port), "--no-raw", *args,
             "MIGRATE", "STATUS"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        return result.stdout

    resp2 = re.findall(r"^\s*(\d+)\) (.*)$", redis_cli(), re.MULTILINE)
    resp3 = re.findall(r'^\s*(\d+)# "([^"]*)" => (.*)$', redis_cli("-3"), re.MULTILINE)

    names = list(report)
    assert [int(number) for number, _ in resp2] == list(range(1, 2 * len(names) + 1))
    assert [text for _, text in resp2[0::2]] == [f'"{name}"' for name in names]
    pairs2 = {name: text for name, (_, text) in zip(names, resp2[1::2], strict=True)}
    assert pairs2["state"] == '"done"'
    assert pairs2["fields_encrypted"] == f"(integer) {data.protected_count}"
    assert pairs2["undecryptable_fields"] == "(empty array)"
    assert [int(number) for number, _, _ in resp3] == list(range(1, len(names) + 1))
    assert [name for _, name, _ in resp3] == names
    pairs3 = {name: text for _, name, text in resp3}
    assert pairs3["state"] == '"done"'
    assert pairs3["fields_encrypted"] == f"(integer) {data.protected_count}"
