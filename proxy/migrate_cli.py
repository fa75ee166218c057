"""`fieldcrypt migrate`: the migration engine from the command line, like
`emailengine encrypt --service.secret NEW --decrypt OLD`, but online and safe
beside running applications."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from proxy.client import ClientError, RedisClient
from proxy.config import ConfigError, Settings, build_keyring, load_settings, parse_upstream
from proxy.crypto import Key, KeyMaterialError, KeyRing, derive_key
from proxy.migrate import AlreadyRunning, Migration, Options, Report, run_locked
from proxy.server import Target

EXIT_CLEAN, EXIT_UNDECRYPTABLE, EXIT_USAGE = 0, 1, 2


def _keyring(args: argparse.Namespace, settings: Settings) -> KeyRing:
    if args.secret is None and not args.decrypt:
        return build_keyring(settings, os.environ)
    given = [("--secret", args.secret, False)] if args.secret is not None else []
    given += [(f"--decrypt #{n}", old, True) for n, old in enumerate(args.decrypt, start=1)]
    keys: list[Key] = []
    for label, secret, decrypt_only in given:
        try:
            keys.append(Key.from_bytes(derive_key(secret), decrypt_only=decrypt_only))
        except KeyMaterialError as error:
            raise ConfigError(f"{label}: {error}") from None
    try:
        return KeyRing(keys)
    except ValueError as error:
        raise ConfigError(f"--secret/--decrypt: {error}") from None


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


def migrate_command(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config, {}, os.environ, Path.cwd())
        if not settings.rules:
            raise ConfigError(
                "no rules: are configured, so nothing is protected and there is nothing to "
                "migrate; pass --config with the proxy's rules"
            )
        keyring = _keyring(args, settings)
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
        return asyncio.run(_migrate_cluster(seeds, target, settings, keyring, options))
    return asyncio.run(_migrate(target, settings, keyring, options))


async def _migrate_cluster(
    seeds: tuple[tuple[str, int], ...],
    target: Target,
    settings: Settings,
    keyring: KeyRing,
    options: Options,
) -> int:
    """Every master of a cluster in turn, under one lock (see cluster_server.ClusterJobs)."""
    from proxy.cluster_server import ClusterJobs, Topology

    crypt = type("Crypt", (), {"rules": settings.rule_set, "keyring": keyring})()
    jobs = ClusterJobs(Topology(seeds, target), lambda: crypt)
    try:
        await jobs.start(options)
        report = await jobs.wait(None)
    except (AlreadyRunning, ClientError) as error:
        print(f"fieldcrypt migrate: {error}", file=sys.stderr)
        return EXIT_USAGE
    assert report is not None
    return _print_report(report)


async def _migrate(target: Target, settings: Settings, keyring: KeyRing, options: Options) -> int:
    try:
        client = await RedisClient.connect(target)
    except ClientError as error:
        print(f"fieldcrypt migrate: {error}", file=sys.stderr)
        return EXIT_USAGE
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
