"""Admin commands answered by the proxy itself: AUTH as the admin user, and MIGRATE.

They are handlers in the same command table as everything else. Only an
authorised client may run them: one that sent `AUTH <admin-user> <password>`
to the proxy, or, when no admin password is configured, a loopback client.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from proxy import resp
from proxy.client import ClientError, RedisClient
from proxy.migrate import AlreadyRunning, Migration, Options, Report, run_locked
from proxy.session import Answer, Defer, Forward, Handler, Outcome, Session

WRONGPASS = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
NOPERM = (
    "NOPERM fieldcrypt: admin commands need AUTH <admin-user> <admin-password> "
    "sent to the proxy (or a loopback client when no admin password is configured)"
)


def encode_pairs(session: Session, pairs: list[tuple[str, Any]]) -> bytes:
    """Name/value pairs as a RESP3 map, or a flat RESP2 array, readable in redis-cli."""
    out = [b"%%%d\r\n" % len(pairs) if session.resp3 else b"*%d\r\n" % (2 * len(pairs))]
    for name, value in pairs:
        out.append(resp.bulk(name.encode()))
        _encode_value(value, out)
    return b"".join(out)


def _encode_value(value: Any, out: list[bytes]) -> None:
    if isinstance(value, bool):
        out.append(resp.bulk(b"yes" if value else b"no"))
    elif isinstance(value, int):
        out.append(b":%d\r\n" % value)
    elif isinstance(value, list | tuple):
        out.append(b"*%d\r\n" % len(value))
        for item in value:
            _encode_value(item, out)
    else:
        out.append(resp.bulk(str(value).encode("utf-8", "backslashreplace")))


@dataclass
class AdminConfig:
    """The proxy's own credentials; replaced as a whole on reload, so every AUTH after
    it is judged by the new ones (a client authenticated before stays authenticated)."""

    username: str
    password: str | None
    client_password: str | None = None  # clients must AUTH to the proxy with it


def _same(given: bytes, expected: str | None) -> bool:
    return expected is not None and hmac.compare_digest(given, expected.encode())


class JobRunner(Protocol):
    """What MIGRATE drives: one Redis (Jobs) or every master of a cluster."""

    async def start(self, options: Options) -> Report: ...

    def status(self) -> Report | None: ...

    async def wait(self, timeout: float | None) -> Report | None: ...

    def cancel(self) -> Report | None: ...


class Jobs:
    """The migration job of this proxy (one at a time; the Redis lock covers other proxies)."""

    def __init__(self, connect: Callable[[], Any], get_crypt: Callable[[], Any], db: int) -> None:
        self.connect = connect  # async () -> RedisClient
        self.get_crypt = get_crypt
        self.db = db
        self.migration: Migration | None = None
        self.task: asyncio.Task[Report] | None = None

    async def start(self, options: Options) -> Report:
        if self.task is not None and not self.task.done():
            raise AlreadyRunning(
                f"a migration is already running on this proxy (job {self.migration.report.job_id})"  # type: ignore[union-attr]
            )
        crypt = self.get_crypt()
        if crypt is None or crypt.rules.is_empty:
            raise ValueError("no rules are configured, so there is nothing to migrate")
        options.db = self.db
        client: RedisClient = await self.connect()
        migration = Migration(client, crypt.rules, crypt.keyring, options)
        if not options.dry_run:
            try:
                await migration.acquire_lock()
            except Exception:
                await client.close()
                raise

        async def work() -> Report:
            try:
                return await run_locked(migration, lock_taken=True)
            finally:
                await client.close()

        self.migration = migration
        self.task = asyncio.get_running_loop().create_task(work())
        return migration.report

    def status(self) -> Report | None:
        return self.migration.report if self.migration is not None else None

    async def wait(self, timeout: float | None) -> Report | None:
        if self.task is not None and not self.task.done():
            await asyncio.wait({self.task}, timeout=timeout)
        return self.status()

    def cancel(self) -> Report | None:
        if self.migration is not None and self.task is not None and not self.task.done():
            self.migration.cancelled = True
        return self.status()


def _is_native_migrate(args: list[bytes]) -> bool:
    """Redis's own MIGRATE host port key|"" db timeout [...]."""
    return len(args) >= 6 and args[2].isdigit() and args[4].isdigit() and args[5].isdigit()


def _parse_start(args: list[bytes]) -> Options | str:
    options = Options()
    i = 1
    try:
        while i < len(args):
            word = args[i].upper()
            if word == b"DRYRUN":
                options.dry_run = True
                i += 1
            elif word == b"MATCH":
                options.match = args[i + 1]
                i += 2
            elif word == b"COUNT":
                options.count = int(args[i + 1])
                if options.count < 1:
                    return "COUNT must be a positive integer"
                i += 2
            elif word == b"RATE":
                options.rate = float(args[i + 1])
                if options.rate < 0:
                    return "RATE must be 0 (no limit) or a positive number of fields per second"
                i += 2
            else:
                return (
                    f"unknown MIGRATE option '{args[i].decode(errors='replace')}'; use "
                    "MIGRATE [DRYRUN] [MATCH glob] [COUNT n] [RATE fields-per-second], "
                    "MIGRATE STATUS, MIGRATE WAIT [seconds] or MIGRATE CANCEL"
                )
    except (IndexError, ValueError):
        return "syntax error; use MIGRATE [DRYRUN] [MATCH glob] [COUNT n] [RATE n]"
    return options


class Admin:
    def __init__(
        self,
        config: AdminConfig,
        jobs: JobRunner,
        info: Callable[[str | None], bytes] | None = None,
        reload: Callable[[], Awaitable[str | None]] | None = None,
        scripts: Callable[[], Any] | None = None,
    ) -> None:
        self.config = config
        self.jobs = jobs
        self.info = info
        self.reload = reload
        self.scripts = scripts

    def handlers(self) -> dict[bytes, Handler]:
        handlers: dict[bytes, Handler] = {
            b"AUTH": self.auth,
            b"MIGRATE": self.migrate,
            b"FIELDCRYPT": self.fieldcrypt,
        }
        if self.config.password is not None or self.config.client_password is not None:
            handlers[b"HELLO"] = self.hello
        return handlers

    def allowed(self, session: Session) -> bool:
        return session.admin or (self.config.password is None and session.loopback)

    def _check(self, session: Session, user: bytes | None, password: bytes) -> bool | None:
        """Credentials the proxy answers itself: True/False, or None for Redis to judge."""
        config = self.config
        if user is not None and user == config.username.encode() and config.password:
            if _same(password, config.password):
                session.admin = True
                session.unlock()
                return True
            return False
        if config.client_password is None:
            if session.locked:  # connected while a reload-since-dropped password was required
                session.unlock()
            return None
        if user in (None, b"default") and _same(password, config.client_password):
            session.unlock()
            return True
        return False

    def auth(self, session: Session, args: list[bytes]) -> Outcome:
        # AUTH password | AUTH username password
        if len(args) not in (2, 3):
            return None
        user = args[1] if len(args) == 3 else None
        verdict = self._check(session, user, args[-1])
        if verdict is None:
            return None  # an ordinary AUTH, for Redis to answer
        return Answer(b"+OK\r\n" if verdict else WRONGPASS)

    def hello(self, session: Session, args: list[bytes]) -> Outcome:
        # HELLO [protover [AUTH username password] [SETNAME clientname]]
        upper = [a.upper() for a in args]
        if b"AUTH" in upper[2:]:
            at = upper.index(b"AUTH", 2)
            if at + 2 >= len(args):
                return None  # Redis answers the syntax error
            verdict = self._check(session, args[at + 1], args[at + 2])
            if verdict is None:
                return None
            if not verdict:
                return Answer(WRONGPASS)
            # Redis gets the HELLO without the credentials the proxy has checked.
            return Forward(resp.encode_request(args[:at] + args[at + 3 :]))
        if session.locked:
            return Answer(
                b"-NOAUTH HELLO must be called with the client already authenticated, "
                b"otherwise the HELLO <proto> AUTH <user> <pass> option can be used to "
                b"authenticate the client and select the RESP protocol version at the same "
                b"time\r\n"
            )
        return None

    def migrate(self, session: Session, args: list[bytes]) -> Outcome:
        if _is_native_migrate(args):
            return None
        if not self.allowed(session):
            return Answer(resp.error_reply(NOPERM))
        verb = args[1].upper() if len(args) > 1 else b""
        jobs = self.jobs
        if verb == b"STATUS" and len(args) == 2:
            return self._report(session, jobs.status())
        if verb == b"CANCEL" and len(args) == 2:
            return self._report(session, jobs.cancel())
        if verb == b"WAIT" and len(args) <= 3:
            try:
                timeout = float(args[2]) if len(args) == 3 else None
            except ValueError:
                return Answer(
                    resp.error_reply("ERR fieldcrypt: MIGRATE WAIT takes a timeout in seconds")
                )
            if timeout == 0:
                timeout = None

            async def wait() -> bytes:
                return self._encode_report(session, await jobs.wait(timeout))

            return Defer(wait)
        options = _parse_start(args)
        if isinstance(options, str):
            return Answer(resp.error_reply(f"ERR fieldcrypt: {options}"))

        async def start() -> bytes:
            try:
                report = await jobs.start(options)
            except (AlreadyRunning, ClientError, ValueError) as error:
                return resp.error_reply(f"ERR fieldcrypt: {error}")
            return encode_pairs(session, [("job", report.job_id), ("state", report.state)])

        return Defer(start)

    def fieldcrypt(self, session: Session, args: list[bytes]) -> Outcome:
        """FIELDCRYPT INFO [section] | RELOAD | SCRIPTS"""
        if not self.allowed(session):
            return Answer(resp.error_reply(NOPERM))
        verb = args[1].upper() if len(args) > 1 else b""
        if verb == b"INFO" and len(args) <= 3 and self.info is not None:
            text = self.info(args[2].decode(errors="replace") if len(args) == 3 else None)
            if session.resp3:  # a verbatim string, as Redis's INFO answers in RESP3
                return Answer(b"=%d\r\ntxt:%s\r\n" % (len(text) + 4, text))
            return Answer(resp.bulk(text))
        if verb == b"RELOAD" and len(args) == 2 and self.reload is not None:
            reload = self.reload

            async def run_reload() -> bytes:
                problem = await reload()
                if problem is None:
                    return b"+OK\r\n"
                return resp.error_reply(
                    f"ERR fieldcrypt: reload rejected, old config kept: {problem}"
                )

            return Defer(run_reload)
        if verb == b"SCRIPTS" and len(args) == 2:
            book = self.scripts() if self.scripts is not None else None
            seen = book.listing() if book is not None else []
            rows = [
                [("script", s.ident), ("calls", s.calls), ("sample_key", s.sample_key)]
                for s in seen
            ]
            out = [b"*%d\r\n" % len(rows)]
            out.extend(encode_pairs(session, row) for row in rows)
            return Answer(b"".join(out))
        return Answer(
            resp.error_reply(
                "ERR fieldcrypt: unknown subcommand; use FIELDCRYPT INFO [section], "
                "FIELDCRYPT RELOAD or FIELDCRYPT SCRIPTS"
            )
        )

    def _report(self, session: Session, report: Report | None) -> Answer:
        return Answer(self._encode_report(session, report))

    @staticmethod
    def _encode_report(session: Session, report: Report | None) -> bytes:
        if report is None:
            return encode_pairs(session, [("state", "none")])
        return encode_pairs(session, report.pairs())
