"""Wires settings into a running proxy: builds the shared state, starts, reloads, drains, stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.admin import Admin, AdminConfig, Jobs
from proxy.client import ClientError, RedisClient
from proxy.cluster_server import ClusterJobs, ClusterServer, Topology
from proxy.commands import FieldCrypt, build_handlers
from proxy.config import ConfigError, Settings, build_keyring, load_settings, parse_upstream
from proxy.embedded import EmbeddedError, EmbeddedServer
from proxy.metrics import Metrics, info_text
from proxy.scripts import ScriptBook, Scripts
from proxy.server import (
    ProxyServer,
    ProxyState,
    Target,
    add_signal_handlers,
    install_uvloop,
    is_loopback,
)
from proxy.session import Handler, base_dispatch
from proxy.tls import client_context, server_context

log = logging.getLogger("fieldcrypt")


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_target(settings: Settings, url: str) -> Target:
    try:
        upstream = parse_upstream(url)
    except ValueError as error:
        raise ConfigError(f"upstream: {error}") from None
    return Target(
        host=upstream.host,
        port=upstream.port,
        username=settings.upstream_username or upstream.username,
        password=settings.upstream_password or upstream.password,
        db=upstream.db,
        ssl_context=client_context(settings.upstream_tls) if upstream.tls else None,
        server_hostname=settings.upstream_tls.server_hostname,
        connect_timeout=settings.connect_timeout,
    )


def build_crypt(settings: Settings) -> FieldCrypt | None:
    """The field encryption engine, or None when nothing is protected and no key is set."""
    if not settings.rules and not settings.keys:
        return None
    warnings: list[str] = []
    keyring = build_keyring(settings, os.environ, warnings)
    for warning in warnings:
        log.warning("%s", warning)
    if keyring.primary is None:
        log.warning(
            "no key can encrypt (all are decrypt_only): protected fields are written in cleartext"
        )
    return FieldCrypt(settings.rule_set, keyring, settings.on_decrypt_error)


@dataclass
class Built:
    """What a configuration makes; swapped in whole on reload."""

    crypt: FieldCrypt | None
    scripts: ScriptBook | None
    handlers: dict[bytes, Handler]


# Settings a reload reads but cannot apply to a running proxy: it logs that they wait
# for a restart.
RESTART_ONLY = (
    "listen",
    "upstream",
    "embedded",
    "workers",
    "metrics_listen",
    "log_format",
    "log_level",
    "drain_timeout",
    "cluster_announce_self",
    "tls",  # the listener's certificate and key too
    "upstream_mode",
)


def admin_config(settings: Settings) -> AdminConfig:
    return AdminConfig(settings.admin_username, settings.admin_password, settings.client_password)


def exposure_warning(settings: Settings, addresses: list[tuple[str, int]]) -> str | None:
    """What is open to other machines when clients needn't authenticate, or None."""
    if settings.client_password is not None or settings.tls.verify_clients:
        return None
    exposed = [f"{host}:{port}" for host, port in addresses if not is_loopback((host, port))]
    if not exposed:
        return None
    return (
        f"client_password is not set and fieldcrypt listens beyond loopback "
        f"({', '.join(exposed)}): every client that reaches the port reads protected fields "
        "in clear and acts with the proxy's upstream credentials; set client_password, "
        "or listen on 127.0.0.1"
    )


def _restart_only_changes(old: Settings, new: Settings) -> list[str]:
    return [name for name in RESTART_ONLY if getattr(old, name) != getattr(new, name)]


def build_handlers_for(settings: Settings) -> Built:
    crypt = build_crypt(settings)
    handlers = dict(build_handlers(crypt))
    book = None
    if crypt is not None and not crypt.rules.is_empty:
        book = ScriptBook.from_declarations(settings.scripts)
        handlers.update(Scripts(crypt, book, settings.script_policy).handlers())
    return Built(crypt, book, handlers)


class Runtime:
    """The running proxy's shared state, and how it changes on reload."""

    def __init__(self, settings: Settings, url: str, overrides: dict[str, object]) -> None:
        self.settings = settings
        self.started_with = settings  # what the restart-only settings still are
        self.overrides = overrides
        self.url = url  # the upstream's address is kept until a restart
        self.listening: list[tuple[str, int]] = []  # where the server is bound, once it is
        target = build_target(settings, url)
        built = build_handlers_for(settings)
        self.state = ProxyState(
            target=target,
            dispatch={},
            crypt=built.crypt,
            scripts=built.scripts,
            max_request=settings.max_request_bytes,
            max_clients=settings.max_clients,
            max_client_output=settings.max_client_output_bytes,
            idle_timeout=settings.idle_timeout,
            client_auth=settings.client_password is not None,
            tls=server_context(settings.tls),
            upstream_mode=settings.upstream_mode,
            pool_size=settings.upstream_pool_size,
        )
        self.metrics = Metrics(lambda: self.state)
        self.state.observe_latency = self.metrics.observe
        self.metrics.ready_check = self.ready_problem
        self.jobs: Jobs | ClusterJobs = Jobs(self._connect, lambda: self.state.crypt, target.db)
        self.topology: Topology | None = None
        seeds = parse_upstream(url).cluster_nodes
        if seeds:  # a redis+cluster:// upstream
            self.topology = Topology(seeds, target)
            self.jobs = ClusterJobs(self.topology, lambda: self.state.crypt)
        self.state.jobs = self.jobs
        self.admin = Admin(
            admin_config(settings),
            self.jobs,
            info=lambda section: info_text(self.state, section),
            reload=self.reload,
            scripts=lambda: self.state.scripts,
        )
        self.state.dispatch = self._dispatch(built)
        self.server: ProxyServer | ClusterServer | None = None

    async def _connect(self) -> RedisClient:
        return await RedisClient.connect(self.state.target)

    def _dispatch(self, built: Built) -> dict[bytes, Handler]:
        dispatch = base_dispatch()
        dispatch.update(built.handlers)
        dispatch.update(self.admin.handlers())
        return dispatch

    async def ready_problem(self) -> str | None:
        """Why the proxy is not ready (upstream unreachable), or None."""
        if self.state.crypt is None and self.settings.rules:
            return "key ring not loaded"
        try:
            client = await RedisClient.connect(self.state.target)
        except ClientError as error:
            return str(error)
        try:
            await asyncio.wait_for(client.execute("PING"), 2.0)
        except Exception as error:
            return f"upstream does not answer PING ({error.__class__.__name__})"
        finally:
            await client.close()
        return None

    async def reload(self) -> str | None:
        """Re-read the config and the secrets. Returns the problem, or None when it took.

        Every secret is applied: keys, the admin and client passwords (each AUTH after
        this is judged by the new ones; a client authenticated before stays so), the
        upstream credentials and upstream_tls files (for connections opened after it).
        What can't change without a restart (RESTART_ONLY) is logged and left as it was."""
        path = self.settings.config_path
        old_settings = self.settings

        def load() -> tuple[Settings, Built, Target]:
            settings = load_settings(path, self.overrides, os.environ, Path.cwd())
            return settings, build_handlers_for(settings), build_target(settings, self.url)

        try:
            # Files (the config, key files, script bodies) and scrypt on passphrases take
            # a while, or block on a FIFO: the loop keeps serving meanwhile.
            settings, built, target = await asyncio.get_running_loop().run_in_executor(None, load)
        except ConfigError as error:
            log.error("config reload rejected, the old configuration keeps running: %s", error)
            return str(error)
        old = self.state.crypt
        state = self.state
        if state.scripts is not None and built.scripts is not None:
            built.scripts.carry_over(state.scripts)
        state.crypt = built.crypt
        state.scripts = built.scripts
        self.admin.config = admin_config(settings)  # before the table: HELLO depends on it
        state.client_auth = settings.client_password is not None
        state.dispatch = self._dispatch(built)
        state.target = target
        if self.topology is not None:
            self.topology.template = target
        state.max_clients = settings.max_clients
        state.max_request = settings.max_request_bytes
        state.max_client_output = settings.max_client_output_bytes
        state.idle_timeout = settings.idle_timeout
        state.pool_size = settings.upstream_pool_size
        if self.server is not None:
            for connection in self.server.connections:
                session = connection.session
                if session is not None:
                    session.dispatch = state.dispatch
                    session.requires_auth = state.client_auth  # after a RESET
                    if self.topology is None:  # the handshake sent again after a RESET
                        session.handshake = target.handshake()
        self.settings = settings
        log.info("config reloaded: %d rules", len(settings.rules))
        for config_warning in settings.warnings:  # as at start (cli.py logs them there)
            log.warning("%s", config_warning)
        restart = _restart_only_changes(self.started_with, settings)
        if restart:
            log.warning(
                "config reload: %s changed; that takes a restart, the old value is kept",
                ", ".join(restart),
            )
        warning = exposure_warning(settings, self.listening)
        if warning is not None and exposure_warning(old_settings, self.listening) is None:
            log.warning("%s", warning)
        old_ring = [k.kid for k in old.keyring.keys] if old is not None else []
        new_ring = [k.kid for k in built.crypt.keyring.keys] if built.crypt is not None else []
        if old_ring != new_ring:
            primary = built.crypt.keyring.primary if built.crypt is not None else None
            log.info(
                "key ring changed: keys %s, primary %s",
                ", ".join(new_ring) or "none",
                primary.kid if primary else "none (decrypt-only)",
            )
        return None


async def read_databases(state: ProxyState) -> bool:
    """Read the upstream's `databases` setting into `state`, so that a SELECT Redis will
    refuse is not followed; False while the upstream can't be reached. Until it is
    known, a SELECT is followed as sent."""
    try:
        async with asyncio.timeout(state.target.connect_timeout + 2.0):  # the handshake too
            client = await RedisClient.connect(state.target)
    except (ClientError, TimeoutError):
        return False
    try:
        async with asyncio.timeout(2.0):
            reply = await client.execute("CONFIG", "GET", "databases")
        state.databases = int(dict(zip(reply[::2], reply[1::2], strict=True))[b"databases"])
    except Exception as error:  # refused by ACL, renamed, not a number
        log.info("cannot read the upstream's databases setting (%s)", error.__class__.__name__)
    finally:
        await client.close()
    return True  # known, or asking again would not help


def build_state(settings: Settings, url: str) -> ProxyState:
    """The shared state for `settings`, with `url` as the upstream (tests, embedding)."""
    return Runtime(settings, url, {}).state


def run(settings: Settings, overrides: dict[str, object] | None = None) -> int:
    loop_name = install_uvloop()
    embedded: EmbeddedServer | None = None
    url = settings.upstream
    if settings.embedded:
        try:
            embedded = EmbeddedServer()
            embedded.start()
        except EmbeddedError as error:
            raise ConfigError(f"--embedded: {error}") from None
        url = embedded.url
        log.info("embedded server %s started on %s", os.path.basename(embedded.binary), url)
    try:
        runtime = Runtime(settings, url, overrides or {})
        if settings.workers > 1:
            return _run_workers(runtime, loop_name, settings.workers)
        return asyncio.run(_serve(runtime, loop_name))
    finally:
        if embedded is not None:
            embedded.stop()
            log.info("embedded server stopped")


def _run_workers(runtime: Runtime, loop_name: str, workers: int) -> int:
    """Fork `workers` processes that share the listening port (SO_REUSEPORT); the
    parent passes SIGTERM/SIGINT/SIGHUP on and exits when they have all exited."""
    children: list[int] = []
    for number in range(workers):
        pid = os.fork()
        if pid == 0:  # a worker
            code = 1
            try:
                code = asyncio.run(_serve(runtime, loop_name, reuse_port=True, worker=number))
            finally:
                os._exit(code)
        children.append(pid)
    log.info("started %d workers: pids %s", workers, ", ".join(map(str, children)))

    def forward(signum: int, _frame: object) -> None:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    worst = 0
    for child in children:
        while True:
            try:
                _, status = os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
        worst = max(worst, os.waitstatus_to_exitcode(status))
    return worst


async def _serve(
    runtime: Runtime, loop_name: str, reuse_port: bool = False, worker: int = 0
) -> int:
    settings = runtime.settings
    server: ProxyServer | ClusterServer = ProxyServer(runtime.state)
    if runtime.topology is not None:
        server = ClusterServer(runtime.state, runtime.topology, settings.cluster_announce_self)
    runtime.server = server
    tasks: set[asyncio.Task[Any]] = set()
    if runtime.topology is None:  # never in the way of listening

        async def read_until_known() -> None:  # the upstream may start after the proxy
            while not await read_databases(runtime.state):
                await asyncio.sleep(5)

        task = asyncio.get_running_loop().create_task(read_until_known())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    host, port = split_listen(settings.listen)
    try:
        addresses = await server.start(host, port, reuse_port=reuse_port)
    except OSError as error:
        log.error("cannot listen on %s: %s", settings.listen, error.strerror or error)
        return 1
    if settings.metrics_listen and worker == 0:
        metrics_host, metrics_port = split_listen(settings.metrics_listen)
        try:
            bound_metrics = await runtime.metrics.start(metrics_host, metrics_port)
        except OSError as error:
            log.error("cannot listen on %s: %s", settings.metrics_listen, error.strerror or error)
            return 1
        log.info("metrics on http://%s:%d/metrics", *bound_metrics)
    stop = asyncio.Event()

    def reload() -> None:
        task = asyncio.get_running_loop().create_task(runtime.reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    add_signal_handlers(stop.set, reload)
    runtime.listening = [(a[0], a[1]) for a in addresses]
    warning = exposure_warning(settings, runtime.listening)
    if warning is not None and worker == 0:
        log.warning("%s", warning)
    bound = ", ".join(f"{a[0]}:{a[1]}" for a in addresses)
    log.info(
        "fieldcrypt listening on %s%s, upstream %s (%s, pid %d)",
        bound,
        " (TLS)" if runtime.state.tls else "",
        runtime.state.target.address,
        loop_name,
        os.getpid(),
    )
    await stop.wait()
    log.info("stopping: draining %d connections", len(server.connections))
    await server.drain(settings.drain_timeout)
    await runtime.metrics.close()
    log.info("fieldcrypt stopped")
    return 0
