"""In-place migration of stored values: encrypt cleartext, re-key, or decrypt back.

One engine serves both front ends (the admin MIGRATE command and `fieldcrypt
migrate`). It walks every hash a rule names (SCAN, then HMGET or HSCAN), decides
per protected field what the value should become (`decide`, pure), and writes
each change with a compare-and-set script, so an application write that lands
between the read and the write is never overwritten. It never deletes or
truncates a value, and one that no key can decrypt is left as it is and
reported. Running it again changes nothing; a run cut short can be run again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import hiredis

from proxy.client import RedisClient
from proxy.crypto import HEADER_PREFIX, DecryptError, KeyRing
from proxy.rules import Rule, RuleSet

log = logging.getLogger("fieldcrypt")

LOCK_KEY: Final = b"fieldcrypt:migrate:lock"
LOCK_TTL_MS: Final = 30_000
LOCK_RENEW_SECONDS: Final = 10.0
DEFAULT_COUNT: Final = 200  # keys per SCAN page
DEFAULT_RATE: Final = 2_000  # fields per second; 0 = unlimited
SETTLE_BATCH: Final = 16  # fields decided and written between two yields to the loop
UNPACED_BATCH: Final = 512  # the same with no rate limit (the CLI's default): fewer round trips
MAX_NAMES: Final = 100
MAX_RETRIES: Final = 5

# Write ARGV[3] into the field only if it still holds ARGV[2]. HSET keeps the key's
# TTL; a per-field TTL (Redis 7.4+ HPEXPIRE) is read first and put back.
CAS_SCRIPT: Final = b"""
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current ~= ARGV[2] then return 0 end
local ok, ttl = pcall(redis.call, 'HPTTL', KEYS[1], 'FIELDS', 1, ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if ok and type(ttl) == 'table' and tonumber(ttl[1]) and tonumber(ttl[1]) > 0 then
  redis.call('HPEXPIRE', KEYS[1], ttl[1], 'FIELDS', 1, ARGV[1])
end
return 1
"""
CAS_SHA: Final = hashlib.sha1(CAS_SCRIPT).hexdigest()

RENEW_SCRIPT: Final = b"""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE_SCRIPT: Final = b"""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# --- What one value becomes (pure) ------------------------------------------------

ENCRYPT: Final = "encrypted"
REKEY: Final = "rekeyed"
DECRYPT: Final = "decrypted"
SKIP: Final = "skipped"  # already as it should be
UNDECRYPTABLE: Final = "undecryptable"


@dataclass(frozen=True, slots=True)
class Decision:
    kind: str
    new_value: bytes | None = None  # what to write; None: write nothing
    census: str = "cleartext"  # "cleartext", or the key id the value was under


def decide(keyring: KeyRing, rule: Rule, key: bytes, field: bytes, value: bytes) -> Decision:
    primary = keyring.primary
    if not value.startswith(HEADER_PREFIX):
        if primary is None:
            return Decision(SKIP)
        bound = key if rule.bind_key else None
        return Decision(ENCRYPT, keyring.encrypt(value, field, bound))
    kid = KeyRing.kid_of(value) or "?"
    try:
        plain = keyring.decrypt(value, field, key)
    except DecryptError:
        return Decision(UNDECRYPTABLE, census=kid)
    if primary is None:
        return Decision(DECRYPT, plain, census=kid)
    mode_bound = value[len(HEADER_PREFIX)] == ord("k")
    if kid == primary.kid and mode_bound == rule.bind_key:
        return Decision(SKIP, census=kid)
    return Decision(REKEY, keyring.encrypt(plain, field, key if rule.bind_key else None), kid)


# --- The report -------------------------------------------------------------------


@dataclass
class Options:
    dry_run: bool = False
    match: bytes | None = None
    count: int = DEFAULT_COUNT
    rate: float = DEFAULT_RATE  # fields per second, 0 = unlimited
    db: int = 0


@dataclass
class Report:
    job_id: str = ""
    state: str = "running"  # running, done, cancelled, failed
    dry_run: bool = False
    keys_seen: int = 0  # every key SCAN returned, for progress against DBSIZE
    keys_scanned: int = 0  # the hashes a rule names
    fields_checked: int = 0
    changed: Counter[str] = field(default_factory=Counter)  # ENCRYPT/REKEY/DECRYPT
    skipped: int = 0
    undecryptable: int = 0
    undecryptable_names: list[str] = field(default_factory=list)
    conflicts: int = 0  # compare-and-set lost to an application write, then retried
    census: Counter[str] = field(default_factory=Counter)
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    total_keys: int | None = None  # DBSIZE at the start, for an ETA

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def rewritten(self) -> int:
        return sum(self.changed.values())

    def rate(self) -> float:
        elapsed = self.elapsed
        return self.fields_checked / elapsed if elapsed > 0 else 0.0

    def pairs(self) -> list[tuple[str, Any]]:
        """The report as (name, value) pairs: a map in RESP3, a flat array in RESP2."""
        verb = "would be " if self.dry_run else ""
        items: list[tuple[str, Any]] = [
            ("job", self.job_id),
            ("state", self.state),
            ("dry_run", "yes" if self.dry_run else "no"),
            ("keys_scanned", self.keys_scanned),
            ("fields_checked", self.fields_checked),
            (f"fields_{verb}encrypted".replace(" ", "_"), self.changed[ENCRYPT]),
            (f"fields_{verb}rekeyed".replace(" ", "_"), self.changed[REKEY]),
            (f"fields_{verb}decrypted".replace(" ", "_"), self.changed[DECRYPT]),
            ("fields_skipped_already_done", self.skipped),
            ("fields_undecryptable", self.undecryptable),
            ("undecryptable_fields", list(self.undecryptable_names)),
            ("write_conflicts_retried", self.conflicts),
            ("census_cleartext", self.census.get("cleartext", 0)),
            (
                "census_by_key_id",
                [f"{kid}={n}" for kid, n in sorted(self.census.items()) if kid != "cleartext"],
            ),
            ("elapsed_seconds", f"{self.elapsed:.3f}"),
            ("fields_per_second", f"{self.rate():.1f}"),
        ]
        if self.error:
            items.append(("error", self.error))
        return items

    def note_undecryptable(self, key: bytes, field_name: bytes) -> None:
        self.undecryptable += 1
        if len(self.undecryptable_names) < MAX_NAMES:
            name = f"{key.decode('utf-8', 'backslashreplace')}/"
            name += field_name.decode("utf-8", "backslashreplace")
            self.undecryptable_names.append(name)


class AlreadyRunning(Exception):
    """Another job holds the lock in this Redis."""


class RateLimiter:
    """Paces work to `rate` units per second (0: no limit); a cancel cuts the wait short."""

    def __init__(self, rate: float, cancelled: Callable[[], bool] = lambda: False) -> None:
        self.rate = rate
        self.cancelled = cancelled
        self.start = time.monotonic()
        self.done = 0

    async def take(self, units: int) -> None:
        self.done += units
        if self.rate <= 0:
            return
        while not self.cancelled():
            ahead = self.done / self.rate - (time.monotonic() - self.start)
            if ahead <= 0:
                return
            await asyncio.sleep(min(ahead, 0.1))


# --- The engine -----------------------------------------------------------------


class Migration:
    """One job against one Redis database."""

    def __init__(
        self,
        client: RedisClient,
        rules: RuleSet,
        keyring: KeyRing,
        options: Options,
        report: Report | None = None,
        on_progress: Callable[[Report], None] | None = None,
    ) -> None:
        self.client = client
        self.rules = rules
        self.keyring = keyring
        self.options = options
        self.report = report or Report(job_id=os.urandom(6).hex(), dry_run=options.dry_run)
        self.on_progress = on_progress
        self.cancelled = False
        self.limiter = RateLimiter(options.rate, lambda: self.cancelled)

    # The lock -------------------------------------------------------------------

    async def acquire_lock(self) -> None:
        job = self.report.job_id.encode()
        taken = await self.client.execute("SET", LOCK_KEY, job, "NX", "PX", LOCK_TTL_MS)
        if taken is None:
            holder = await self.client.execute("GET", LOCK_KEY)
            held_by = holder.decode(errors="replace") if holder else "?"
            raise AlreadyRunning(f"a migration is already running on this Redis (job {held_by})")

    async def renew_lock(self) -> bool:
        renewed = await self.client.execute(
            "EVAL", RENEW_SCRIPT, 1, LOCK_KEY, self.report.job_id, LOCK_TTL_MS
        )
        return bool(renewed)

    async def release_lock(self) -> None:
        await self.client.execute("EVAL", RELEASE_SCRIPT, 1, LOCK_KEY, self.report.job_id)

    # The walk ----------------------------------------------------------------------

    def _scan_match(self) -> bytes | None:
        if self.options.match is not None:
            return self.options.match
        globs = self.rules.protected_key_globs(self.options.db)
        return globs[0].encode("utf-8", "surrogateescape") if len(globs) == 1 else None

    async def run(self) -> Report:
        """Walk the database once. The caller holds the lock (unless dry-run)."""
        report = self.report
        try:
            report.total_keys = int(await self.client.execute("DBSIZE"))
            if not self.options.dry_run and self.keyring.primary is not None:
                await self.client.execute("SCRIPT", "LOAD", CAS_SCRIPT)
            match = self._scan_match()
            cursor = b"0"
            while True:
                command: list[Any] = ["SCAN", cursor, "COUNT", self.options.count, "TYPE", "hash"]
                if match is not None:
                    command[2:2] = ["MATCH", match]
                cursor, keys = await self.client.execute(*command)
                report.keys_seen += len(keys)
                await self._keys(keys)
                if self.on_progress is not None:
                    self.on_progress(report)
                if self.cancelled:
                    report.state = "cancelled"
                    break
                if cursor == b"0":
                    report.state = "done"
                    break
        except Exception as error:
            report.state = "failed"
            report.error = str(error) or error.__class__.__name__
        finally:
            report.finished = time.monotonic()
        return report

    async def _keys(self, keys: list[bytes]) -> None:
        """Read the protected fields of a page of keys, decide, and write the changes."""
        db = self.options.db
        report = self.report
        literal_reads: list[tuple[bytes, Any, list[bytes]]] = []
        scanned: list[tuple[bytes, Any]] = []
        for key in keys:
            key_rules = self.rules.match_key(db, key)
            if key_rules is None:
                continue
            report.keys_scanned += 1
            literal = [
                f.encode("utf-8", "surrogateescape") for r in key_rules.rules for f in r.fields
            ]
            if all(not any(c in f for c in b"*?[\\") for f in literal):
                literal_reads.append((key, key_rules, list(dict.fromkeys(literal))))
            else:
                scanned.append((key, key_rules))
        found: list[tuple[bytes, Rule, bytes, bytes]] = []
        if literal_reads:
            replies = await self.client.pipeline(
                [["HMGET", key, *names] for key, _, names in literal_reads]
            )
            for (key, key_rules, names), values in zip(literal_reads, replies, strict=True):
                if isinstance(values, hiredis.ReplyError):
                    continue  # the key changed type or vanished since SCAN
                for name, value in zip(names, values, strict=True):
                    rule = key_rules.field_rule(name)
                    if value is not None and rule is not None:
                        found.append((key, rule, name, value))
        for key, key_rules in scanned:
            cursor = b"0"
            while True:
                reply = await self.client.pipeline([["HSCAN", key, cursor, "COUNT", 1000]])
                if isinstance(reply[0], hiredis.ReplyError):
                    break
                cursor, flat = reply[0]
                for i in range(0, len(flat), 2):
                    rule = key_rules.field_rule(flat[i])
                    if rule is not None:
                        found.append((key, rule, flat[i], flat[i + 1]))
                if cursor == b"0":
                    break
        # Small batches: each is decided, written and paced before the next, so the
        # proxy's event loop, which also serves the applications, is never held long.
        batch = SETTLE_BATCH if self.options.rate > 0 else UNPACED_BATCH
        for i in range(0, len(found), batch):
            await self._settle(found[i : i + batch])

    async def _settle(
        self, found: list[tuple[bytes, Rule, bytes, bytes]], attempt: int = 0
    ) -> None:
        """Decide each value and compare-and-set the ones that change."""
        report = self.report
        writes: list[tuple[bytes, Rule, bytes, bytes, Decision]] = []
        for key, rule, name, value in found:
            decision = decide(self.keyring, rule, key, name, value)
            if attempt == 0:
                report.fields_checked += 1
                report.census[decision.census] += 1
            if decision.kind == SKIP:
                report.skipped += 1
            elif decision.kind == UNDECRYPTABLE:
                report.note_undecryptable(key, name)
            elif self.options.dry_run:
                report.changed[decision.kind] += 1
            else:
                writes.append((key, rule, name, value, decision))
        if not writes:
            await self.limiter.take(len(found))
            return
        commands: list[list[Any]] = [
            ["EVALSHA", CAS_SHA, 1, key, name, old, d.new_value or b""]
            for key, _, name, old, d in writes
        ]
        replies = await self.client.pipeline(commands)
        if any(
            isinstance(r, hiredis.ReplyError) and str(r).startswith("NOSCRIPT") for r in replies
        ):
            await self.client.execute("SCRIPT", "LOAD", CAS_SCRIPT)  # SCRIPT FLUSH ran meanwhile
            replies = await self.client.pipeline(commands)
        lost: list[tuple[bytes, Rule, bytes]] = []
        for (key, rule, name, _old, decision), reply in zip(writes, replies, strict=True):
            if isinstance(reply, hiredis.ReplyError):
                raise RuntimeError(f"writing field of key {key!r} failed: {reply}")
            if reply == 1:
                report.changed[decision.kind] += 1
            else:
                lost.append((key, rule, name))
        await self.limiter.take(len(found))
        if lost:
            report.conflicts += len(lost)
            if attempt >= MAX_RETRIES:
                raise RuntimeError(f"{len(lost)} fields kept changing under the migration")
            # An application wrote in between: read the new values and decide again.
            values = await self.client.pipeline([["HGET", k, n] for k, _, n in lost])
            again = [
                (k, r, n, v)
                for (k, r, n), v in zip(lost, values, strict=True)
                if isinstance(v, bytes)
            ]
            await self._settle(again, attempt + 1)


async def run_locked(migration: Migration, *, lock_taken: bool = False) -> Report:
    """Run a job under the lock, renewing it while the job runs. Dry runs take no lock."""
    if migration.options.dry_run:
        return await migration.run()
    if not lock_taken:
        await migration.acquire_lock()
    log.info("migration %s started", migration.report.job_id)

    async def renew() -> None:
        while True:
            await asyncio.sleep(LOCK_RENEW_SECONDS)
            if not await migration.renew_lock():
                log.warning("migration %s lost its lock; stopping", migration.report.job_id)
                migration.cancelled = True
                return

    renewer = asyncio.get_running_loop().create_task(renew())
    try:
        report = await migration.run()
    finally:
        renewer.cancel()
        try:
            await migration.release_lock()
        except Exception as error:  # the lock expires on its own
            log.warning(
                "migration %s could not release its lock: %s", migration.report.job_id, error
            )
    report_line = ", ".join(f"{k}={v}" for k, v in report.changed.items()) or "nothing rewritten"
    log.info(
        "migration %s %s: %d keys, %s, %d undecryptable",
        report.job_id,
        report.state,
        report.keys_scanned,
        report_line,
        report.undecryptable,
    )
    return report
