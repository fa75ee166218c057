"""Wires settings into a running proxy: builds the shared state, starts, drains, stops."""

from __future__ import annotations

import asyncio
import logging
import os

from proxy.admin import Admin, AdminConfig, Jobs
from proxy.client import RedisClient
from proxy.commands import FieldCrypt, build_handlers
from proxy.config import ConfigError, Settings, build_keyring, parse_upstream
from proxy.embedded import EmbeddedError, EmbeddedServer
from proxy.scripts import ScriptBook, Scripts
from proxy.server import ProxyServer, ProxyState, Target, add_signal_handlers, install_uvloop
from proxy.session import Handler, base_dispatch

log = logging.getLogger("fieldcrypt")


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_target(settings: Settings, url: str) -> Target:
    upstream = parse_upstream(url)
    return Target(
        host=upstream.host,
        port=upstream.port,
        username=settings.upstream_username or upstream.username,
        password=settings.upstream_password or upstream.password,
        db=upstream.db,
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


def build_dispatch(
    settings: Settings, crypt: FieldCrypt | None, admin: Admin
) -> dict[bytes, Handler]:
    dispatch = base_dispatch()
    dispatch.update(build_handlers(crypt))
    if crypt is not None and not crypt.rules.is_empty:
        try:
            book = ScriptBook.from_declarations(settings.scripts)
        except OSError as error:
            raise ConfigError(f"scripts: cannot read a body_file: {error}") from None
        dispatch.update(Scripts(crypt, book, settings.script_policy).handlers())
    dispatch.update(admin.handlers())
    return dispatch


def build_state(settings: Settings, url: str) -> ProxyState:
    crypt = build_crypt(settings)
    target = build_target(settings, url)
    state = ProxyState(
        target=target,
        dispatch={},
        crypt=crypt,
        max_request=settings.max_request_bytes,
        max_clients=settings.max_clients,
        max_client_output=settings.max_client_output_bytes,
        idle_timeout=settings.idle_timeout,
    )
    jobs = Jobs(lambda: RedisClient.connect(state.target), lambda: state.crypt, target.db)
    admin = Admin(AdminConfig(settings.admin_username, settings.admin_password), jobs)
    state.dispatch = build_dispatch(settings, crypt, admin)
    state.jobs = jobs
    return state


def run(settings: Settings) -> int:
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
        state = build_state(settings, url)
        return asyncio.run(_serve(settings, state, loop_name))
    finally:
        if embedded is not None:
            embedded.stop()
            log.info("embedded server stopped")


async def _serve(settings: Settings, state: ProxyState, loop_name: str) -> int:
    server = ProxyServer(state)
    host, port = split_listen(settings.listen)
    try:
        addresses = await server.start(host, port)
    except OSError as error:
        log.error("cannot listen on %s: %s", settings.listen, error.strerror or error)
        return 1
    stop = asyncio.Event()
    add_signal_handlers(stop.set)
    bound = ", ".join(f"{a[0]}:{a[1]}" for a in addresses)
    log.info(
        "fieldcrypt listening on %s, upstream %s (%s, pid %d)",
        bound,
        state.target.address,
        loop_name,
        os.getpid(),
    )
    await stop.wait()
    log.info("stopping: draining %d connections", len(server.connections))
    await server.drain(settings.drain_timeout)
    log.info("fieldcrypt stopped")
    return 0
