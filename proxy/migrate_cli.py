"""`fieldcrypt migrate`: the migration engine from the command line, like
`emailengine encrypt --service.secret NEW --decrypt OLD`, but online and safe
beside running applications."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from proxy.client import ClientError, RedisClient
from proxy.config import (
    ENV_PREFIX,
    ConfigError,
    KeySource,
    Settings,
    build_keyring,
    flag_key,
    load_settings,
    parse_upstream,
    secret_flag_warning,
    url_password_warning,
)
from proxy.crypto import KeyRing
from proxy.migrate import AlreadyRunning, Migration, Options, Report, run_locked
from proxy.server import Target

EXIT_CLEAN, EXIT_UNDECRYPTABLE, EXIT_USAGE = 0, 1, 2


def _flag_keys(args: argparse.Namespace) -> tuple[KeySource, ...]:
    """The key ring the flags give, new key first; () when they give none."""
    keys: list[KeySource] = []
    if args.secret is not None:
        keys.append(flag_key("--secret", args.secret, False, from_file=False))
    if args.secret_file is not None:
        keys.append(flag_key("--secret-file", args.secret_file, False, from_file=True))
    for flag, values, from_file in (
        ("--decrypt", args.decrypt, False),
        ("--decrypt-file", args.decrypt_file, True),
    ):
        for number, value in enumerate(values, start=1):
            label = f"{flag} #{number}" if len(values) > 1 else flag
            keys.append(flag_key(label, value, True, from_file))
    return tuple(keys)


def _keyring(args: argparse.Namespace, settings: Settings, warnings: list[str]) -> KeyRing:
    """The flags' keys when any is given, else the config's keys: or FIELDCRYPT_SECRET
    (or FIELDCRYPT_SECRET_FILE), as `serve` reads them."""
    keys = _flag_keys(args)
    if keys:
        settings = replace(settings, keys=keys)
    return build_keyring(settings, os.environ, warnings)


def command_line_secrets(args: argparse.Namespace) -> list[str]:
    """A warning for each flag that puts a secret on the command line."""
    warnings: list[str] = []
    if args.secret is not None:
        warnings.append(
            secret_flag_warning("--secret", f"use --secret-file or {ENV_PREFIX}SECRET_FILE")
        )
    if args.decrypt:
        warnings.append(secret_flag_warning("--decrypt", "use --decrypt-file"))
    if args.redis is not None:
        warning = url_password_warning("--redis", args.redis)
        if warning is not None:
            warnings.append(warning)
    return warnings


class Progress:
    """A progress bar on a terminal (tqdm); nothing otherwise."""

    def __init__(self) -> None:
        self.bar: Any = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=None, unit=" keys", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, report: Report) -> None:
        if self.bar is None:
            return
        if report.total_keys and self.bar.total is None:
            self.bar.total = report.total_keys
        self.bar.n = report.keys_seen
        self.bar.set_postfix(
            hashes=report.keys_scanned,
            rewritten=report.rewritten,
            fields_s=f"{report.rate():.0f}",
            refresh=False,
        )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _warn(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"fieldcrypt migrate: warning: {warning}", file=sys.stderr)


def migrate_command(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config, {}, os.environ, Path.cwd())
        if not settings.rules:
            raise ConfigError(
                "no rules: are configured, so nothing is protected and there is nothing to "
                "migrate; pass --config with the proxy's rules"
            )
        warnings = command_line_secrets(args) + list(settings.warnings)
        keyring = _keyring(args, settings, warnings)
        url = args.redis or settings.upstream
        try:
            upstream = parse_upstream(url)
        except ValueError as error:
            raise ConfigError(f"--redis: {error}") from None
    except ConfigError as error:
        print(f"fieldcrypt migrate: {error}", file=sys.stderr)
        return EXIT_USAGE
    target = Target(
        upstream.host,
        upstream.port,
        settings.upstream_username or upstream.username,
        settings.upstream_password or upstream.password,
        upstream.db,
    )
    options = Options(
        dry_run=args.dry_run,
        match=args.match.encode() if args.match else None,
        count=max(1, args.count),
        rate=max(0.0, args.rate),
        db=upstream.db,
    )
    if upstream.cluster:
        seeds = upstream.cluster_nodes
        return asyncio.run(_migrate_cluster(seeds, target, settings, keyring, options, warnings))
    return asyncio.run(_migrate(target, settings, keyring, options, warnings))


async def _migrate_cluster(
    seeds: tuple[tuple[str, int], ...],
    target: Target,
    settings: Settings,
    keyring: KeyRing,
    options: Options,
    warnings: list[str],
) -> int:
    """Every master of a cluster in turn, under one lock (see cluster_server.ClusterJobs).
    Warnings are printed once the job starts: a usage or connection error is one line."""
    from proxy.cluster_server import ClusterJobs, Topology

    crypt = type("Crypt", (), {"rules": settings.rule_set, "keyring": keyring})()
    jobs = ClusterJobs(Topology(seeds, target), lambda: crypt)
    try:
        await jobs.start(options)
        _warn(warnings)
        report = await jobs.wait(None)
    except (AlreadyRunning, ClientError) as error:
        print(f"fieldcrypt migrate: {error}", file=sys.stderr)
        return EXIT_USAGE
    assert report is not None
    return _print_report(report)


async def _migrate(
    target: Target, settings: Settings, keyring: KeyRing, options: Options, warnings: list[str]
) -> int:
    """One Redis. Warnings are printed once it answers: a usage or connection error is
    one line."""
    try:
        client = await RedisClient.connect(target)
    except ClientError as error:
        print(f"fieldcrypt migrate: {error}", file=sys.stderr)
        return EXIT_USAGE
    _warn(warnings)
    progress = Progress()
    migration = Migration(client, settings.rule_set, keyring, options, on_progress=progress)
    try:
        report = await run_locked(migration)
    except (AlreadyRunning, ClientError) as error:
        progress.close()
        print(f"fieldcrypt migrate: {error}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        await client.close()
    progress.close()
    return _print_report(report)


def _print_report(report: Report) -> int:
    width = max(len(name) for name, _ in report.pairs())
    for name, value in report.pairs():
        shown = ", ".join(value) if isinstance(value, list) else value
        print(f"{name.ljust(width)}  {shown}")
    if report.state == "failed":
        return EXIT_USAGE
    return EXIT_UNDECRYPTABLE if report.undecryptable else EXIT_CLEAN
