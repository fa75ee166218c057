"""The `fieldcrypt` command: serve, check-config, keygen."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from proxy import __version__

log = logging.getLogger("fieldcrypt")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(fmt: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="fieldcrypt",
        description="A Redis proxy that keeps configured hash fields encrypted at rest.",
    )
    top.add_argument("--version", action="version", version=f"fieldcrypt {__version__}")
    commands = top.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the proxy")
    serve.add_argument(
        "--listen", metavar="HOST:PORT", help="where clients connect (127.0.0.1:6380)"
    )
    serve.add_argument(
        "--upstream",
        metavar="URL",
        help="redis://[user@]host:port[/db]; the password is better in "
        "FIELDCRYPT_UPSTREAM_PASSWORD_FILE",
    )
    serve.add_argument("--config", metavar="FILE", help="YAML configuration file")
    serve.add_argument(
        "--embedded",
        action="store_true",
        default=None,
        help="start a private Redis-compatible server as the upstream",
    )
    serve.add_argument(
        "--workers", type=int, metavar="N", help="N processes sharing the port (SO_REUSEPORT)"
    )
    serve.add_argument("--metrics-listen", metavar="HOST:PORT", help="/metrics, /healthz, /readyz")
    serve.add_argument("--log-format", choices=["text", "json"])
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    check = commands.add_parser("check-config", help="validate a configuration and explain it")
    check.add_argument("file", nargs="?", help="YAML configuration file")

    commands.add_parser("keygen", help="print a new random 256-bit key")

    migrate = commands.add_parser(
        "migrate",
        help="rewrite stored values: encrypt cleartext, re-key, or decrypt back",
        description="A new key alone encrypts cleartext; a new key with old keys re-keys "
        "(each old key is tried); old keys alone decrypt back to cleartext. Without any "
        "of these flags, the key ring comes from the config file or FIELDCRYPT_SECRET "
        "(or FIELDCRYPT_SECRET_FILE). Prefer the -file flags: a secret on the command "
        "line is visible in the process list and shell history. Exit code: 0 when "
        "nothing was left undecryptable, 1 otherwise, 2 for usage or connection errors.",
    )
    migrate.add_argument(
        "--redis",
        metavar="URL",
        help="redis://[user@]host:port[/db]; the password is better in "
        "FIELDCRYPT_UPSTREAM_PASSWORD_FILE",
    )
    new_key = migrate.add_mutually_exclusive_group()
    new_key.add_argument("--secret-file", metavar="FILE", help="a file holding the new key")
    new_key.add_argument("--secret", help="the new key (visible in ps; prefer --secret-file)")
    migrate.add_argument(
        "--decrypt-file",
        action="append",
        default=[],
        metavar="FILE",
        help="a file holding an old key (repeatable)",
    )
    migrate.add_argument(
        "--decrypt",
        action="append",
        default=[],
        metavar="OLD",
        help="an old key (repeatable; visible in ps; prefer --decrypt-file)",
    )
    migrate.add_argument("--config", metavar="FILE", help="YAML configuration with rules:")
    migrate.add_argument("--dry-run", action="store_true", help="change nothing; report and count")
    migrate.add_argument("--match", metavar="GLOB", help="only keys matching this glob")
    migrate.add_argument("--count", type=int, default=200, help="keys per SCAN page (200)")
    migrate.add_argument(
        "--rate", type=float, default=0, help="fields per second, 0 = no limit (default)"
    )
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "keygen":
        from proxy.crypto import generate_key

        print(generate_key())
        return 0
    if args.command == "check-config":
        return check_config(args.file)
    if args.command == "migrate":
        from proxy.migrate_cli import migrate_command

        return migrate_command(args)
    return serve(args)


def _load(path: str | None, overrides: dict[str, object]) -> Any:
    from proxy.config import load_settings

    return load_settings(path, overrides, os.environ, Path.cwd())


def check_config(path: str | None) -> int:
    from proxy.config import ConfigError, build_keyring, explain

    try:
        settings = _load(path, {})
        build_keyring(settings, os.environ)
    except ConfigError as error:
        print(f"fieldcrypt: {error}", file=sys.stderr)
        return 2
    print(explain(settings))
    return 0


def serve(args: argparse.Namespace) -> int:
    from proxy.config import ConfigError

    overrides: dict[str, object] = {
        "listen": args.listen,
        "upstream": args.upstream,
        "embedded": args.embedded,
        "log_format": args.log_format,
        "log_level": args.log_level,
        "workers": args.workers,
        "metrics_listen": args.metrics_listen,
    }
    try:
        settings = _load(args.config, overrides)
    except ConfigError as error:
        print(f"fieldcrypt: {error}", file=sys.stderr)
        return 2
    setup_logging(settings.log_format, settings.log_level)
    for warning in settings.warnings:
        log.warning("%s", warning)
    from proxy.app import run

    try:
        return run(settings, overrides)
    except ConfigError as error:
        log.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
