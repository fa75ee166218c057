"""fieldcrypt's settings: defaults < YAML file < environment (and .env) < command-line flags.

Pure apart from reading the files it is pointed at: the config file, `.env` in the given
working directory, and `*_FILE` variables. Every error is one line a person can act on,
`FILE:LINE: problem` or `FIELDCRYPT_X: problem`, and never holds a secret. Keys are
returned as *sources* (where a secret lives); `resolve_secrets` reads them and
`build_keyring` turns them into a `proxy.crypto.KeyRing`.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from functools import cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast
from urllib.parse import unquote, urlsplit

import yaml

from proxy.rules import Glob, GlobError, Rule, RuleSet

if TYPE_CHECKING:
    from proxy.crypto import KeyRing

__all__ = [
    "ENV_PREFIX",
    "ConfigError",
    "KeySource",
    "Script",
    "Settings",
    "TlsSettings",
    "Upstream",
    "UpstreamTlsSettings",
    "build_keyring",
    "explain",
    "flag_key",
    "load_settings",
    "parse_address",
    "parse_upstream",
    "resolve_secrets",
    "secret_flag_warning",
    "url_password_warning",
]

ENV_PREFIX = "FIELDCRYPT_"
SECRET_ENV = "FIELDCRYPT_SECRET"
CONFIG_ENV = "FIELDCRYPT_CONFIG"
WEAK_PASSPHRASE_LENGTH = 32
MiB = 1024 * 1024

LogFormat = Literal["text", "json"]
OnDecryptError = Literal["error", "raw"]
ScriptPolicy = Literal["passthrough", "refuse"]
UpstreamMode = Literal["pooled", "dedicated"]
KeyKind = Literal["env", "file", "literal", "literal-from-env", "literal-from-flag"]

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOTENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*")
_HOST_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_SHA1 = re.compile(r"[0-9a-fA-F]{40}")
_SIZE = re.compile(r"(\d+)\s*([A-Za-z]*)")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1024,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1024**3,
    "gib": 1024**3,
}


class ConfigError(Exception):
    """A setting is wrong. str() is one line naming where and what; it never holds a secret."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split("\n")))


# ---------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Upstream:
    """Where the proxy connects, from a redis:// or rediss:// URL."""

    host: str
    port: int = 6379
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    db: int = 0
    tls: bool = False
    cluster_nodes: tuple[tuple[str, int], ...] = ()  # seed nodes of a redis+cluster:// URL

    @property
    def cluster(self) -> bool:
        return bool(self.cluster_nodes)

    def display(self) -> str:
        """The URL with the password masked as ***."""
        scheme = "rediss" if self.tls else "redis"
        user = self.username or ""
        auth = f"{user}:***@" if self.password is not None else (f"{user}@" if user else "")
        if self.cluster_nodes:
            hosts = ",".join(_host_port(host, port) for host, port in self.cluster_nodes)
            return f"{scheme}+cluster://{auth}{hosts}"
        return f"{scheme}://{auth}{_host_port(self.host, self.port)}/{self.db}"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class TlsSettings:
    """TLS for clients of the proxy; on when cert_file and key_file are set."""

    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    verify_clients: bool = False

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


@dataclass(frozen=True)
class UpstreamTlsSettings:
    """TLS options for a rediss:// upstream."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True
    server_hostname: str | None = None


@dataclass(frozen=True)
class KeySource:
    """Where one key's secret lives; never the secret itself, except for literals.

    kind "env" names an environment variable, "file" a path, "literal" a secret written
    in the config file, "literal-from-env" FIELDCRYPT_SECRET read at load time and
    "literal-from-flag" a secret given on the command line; those three keep the secret
    in `secret`, which no repr or message shows. `location` says where the entry was
    configured, for messages.
    """

    kind: KeyKind
    name_or_path: str
    decrypt_only: bool = False
    line: int | None = None
    location: str = ""
    secret: str | None = field(default=None, repr=False, compare=False)

    def describe(self) -> str:
        if self.kind == "file":
            return f"file {self.name_or_path}"
        if self.kind == "literal":
            return f"secret written in the config file ({self.name_or_path})"
        if self.kind == "literal-from-flag":
            return f"secret given as {self.name_or_path}"
        if self.name_or_path.endswith("_FILE"):
            return f"file named by {self.name_or_path}"
        return f"environment variable {self.name_or_path}"


@dataclass(frozen=True)
class Script:
    """A Lua script or function whose writes to a hash the proxy should encrypt.

    Exactly one of sha1, body_file and function identifies it. `hash_key` is the
    1-based position in KEYS of the hash; `field_values` are 1-based (field, value)
    positions in ARGV; `repeat` (0: none) is every how many ARGV the pattern repeats
    over the rest of ARGV (`repeat: true` in the file: the pattern's span).
    """

    name: str
    hash_key: int
    field_values: tuple[tuple[int, int], ...]
    sha1: str | None = None
    body_file: str | None = None
    function: str | None = None
    repeat: int = 0
    line: int | None = field(default=None, compare=False)
    body: bytes | None = field(default=None, repr=False)  # body_file's bytes, read at load


@dataclass(frozen=True)
class EnvContext:
    """What `resolve_secrets` needs beyond the process environment: the working
    directory (for relative `*_FILE` paths) and the .env values, as (name, value,
    location)."""

    cwd: str
    dotenv: tuple[tuple[str, str, str], ...] = field(default=(), repr=False)


@dataclass(frozen=True, repr=False)
class Settings:
    """Everything fieldcrypt is configured with. Its repr masks every secret."""

    listen: str = "127.0.0.1:6380"
    upstream: str = "redis://127.0.0.1:6379"
    upstream_username: str | None = None
    upstream_password: str | None = None
    embedded: bool = False
    log_format: LogFormat = "text"
    log_level: str = "info"
    drain_timeout: float = 10.0
    connect_timeout: float = 5.0
    max_clients: int = 10000
    max_request_bytes: int = 512 * MiB
    max_client_output_bytes: int = 1024 * MiB
    idle_timeout: float = 0.0
    upstream_mode: UpstreamMode = "pooled"  # clients share connections; "dedicated": one each
    upstream_pool_size: int = 4  # shared connections per db, protocol and user, per worker
    metrics_listen: str | None = None
    workers: int = 1
    admin_username: str = "fieldcrypt-admin"
    admin_password: str | None = None
    client_password: str | None = None
    tls: TlsSettings = TlsSettings()
    upstream_tls: UpstreamTlsSettings = UpstreamTlsSettings()
    cluster_announce_self: bool = False
    keys: tuple[KeySource, ...] = ()
    rules: tuple[Rule, ...] = ()
    on_decrypt_error: OnDecryptError = "error"
    decrypt_cache_entries: int = 10000
    scripts: tuple[Script, ...] = ()
    script_policy: ScriptPolicy = "passthrough"
    warnings: tuple[str, ...] = ()
    config_path: str | None = None
    env_context: EnvContext | None = field(default=None, compare=False)

    @cached_property
    def rule_set(self) -> RuleSet:
        return RuleSet(self.rules)

    @property
    def upstream_target(self) -> Upstream:
        """The upstream URL with upstream_username / upstream_password applied."""
        target = parse_upstream(self.upstream)
        return Upstream(
            host=target.host,
            port=target.port,
            username=self.upstream_username or target.username,
            password=self.upstream_password or target.password,
            db=target.db,
            tls=target.tls,
            cluster_nodes=target.cluster_nodes,
        )

    def __repr__(self) -> str:
        shown = []
        for item in fields(self):
            if item.name == "env_context":
                continue
            value: object = getattr(self, item.name)
            if item.name in _SECRET_OPTIONS and value is not None:
                value = "***"
            elif item.name == "upstream":
                value = _masked_url(self.upstream)
            shown.append(f"{item.name}={value!r}")
        return f"Settings({', '.join(shown)})"


def parse_address(value: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 as [::1]:6380). Raises ValueError saying what is wrong."""
    if value.startswith("["):
        host, closed, rest = value[1:].partition("]")
        if not closed or not rest.startswith(":"):
            raise ValueError("must be HOST:PORT, with an IPv6 address in brackets: [::1]:6380")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"has {host!r} in brackets, which is not an IPv6 address") from None
        port_text = rest[1:]
    else:
        host, colon, port_text = value.rpartition(":")
        if not colon or not host:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:6380")
        if ":" in host:
            raise ValueError("has an IPv6 address without brackets; write it as [::1]:6380")
        if not _HOST_NAME.fullmatch(host):
            raise ValueError(f"has {host!r} as host, which is not a host name or address")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ValueError(f"has {port_text!r} as port; use a number from 0 to 65535")
    return host, int(port_text)


def parse_upstream(url: str) -> Upstream:
    """Parse redis://[user[:password]@]host[:port][/db] or rediss://...; the password is
    percent-decoded. Raises ValueError, whose message never repeats the URL."""
    scheme, separator, _ = url.partition("://")
    if not separator:
        raise ValueError("must be a URL such as redis://127.0.0.1:6379/0 or rediss://host:6380")
    if scheme.lower() in ("redis+cluster", "rediss+cluster"):
        return _parse_cluster_upstream(url, scheme.lower())
    if scheme.lower() not in ("redis", "rediss"):
        shown = f" {scheme!r}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_+]*", scheme) else ""
        raise ValueError(
            f"has scheme{shown}; use redis:// or rediss:// (TLS), or redis+cluster:// for a cluster"
        )
    hint = "; percent-encode special characters in the password (e.g. %40 for @)"
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("is not a valid URL" + hint) from None
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValueError("must not have a query (?...) or fragment (#...)" + hint)
    host = parts.hostname
    if not host:
        raise ValueError("names no host; write redis://HOST:PORT" + hint)
    if not (_HOST_NAME.fullmatch(host) or _is_ipv6(host)):
        raise ValueError("has a host that is not a host name or address" + hint)
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has a port that is not a number from 1 to 65535" + hint) from None
    if port == 0:
        raise ValueError("has port 0; use a number from 1 to 65535")
    path = parts.path
    if path in ("", "/"):
        db = 0
    elif path[1:].isdigit():
        db = int(path[1:])
    else:
        raise ValueError("has a path that is not a database number, e.g. /0" + hint)
    return Upstream(
        host=host,
        port=port or 6379,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        db=db,
        tls=scheme.lower() == "rediss",
    )


def _parse_cluster_upstream(url: str, scheme: str) -> Upstream:
    """redis+cluster://[user[:password]@]host1:port1,host2:port2 (seed nodes of a Redis
    Cluster; rediss+cluster:// for TLS). Each seed is checked as a redis:// URL would be."""
    rest = url.split("://", 1)[1]
    auth, at, hosts = rest.rpartition("@")
    if not at:
        auth = ""
    if not hosts.strip("/"):
        raise ValueError("names no seed node; write redis+cluster://HOST:PORT,HOST:PORT")
    if "/" in hosts:
        hosts, _, path = hosts.partition("/")
        if path not in ("", "0"):
            raise ValueError("has a database number: a Redis Cluster has only database 0")
    nodes: list[tuple[str, int]] = []
    first: Upstream | None = None
    for number, seed in enumerate(hosts.split(","), start=1):
        seed = seed.strip()
        if not seed:
            raise ValueError(f"has an empty seed node (#{number}); separate HOST:PORT with commas")
        try:
            parsed = parse_upstream(f"redis://{auth + '@' if at else ''}{seed}")
        except ValueError as error:
            raise ValueError(f"seed node #{number} {error}") from None
        first = first or parsed
        nodes.append((parsed.host, parsed.port))
    assert first is not None
    return Upstream(
        host=first.host,
        port=first.port,
        username=first.username,
        password=first.password,
        tls=scheme == "rediss+cluster",
        cluster_nodes=tuple(nodes),
    )


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _masked_url(url: str) -> str:
    try:
        return parse_upstream(url).display()
    except ValueError:
        return "(invalid URL)"


# ---------------------------------------------------------------------------- where


@dataclass(frozen=True)
class _Where:
    """Where a value came from, to name it in a message: `location: subject problem`."""

    location: str
    subject: str | None = None

    def error(self, problem: str) -> ConfigError:
        return ConfigError(self.text(problem))

    def text(self, problem: str) -> str:
        if self.subject:
            return f"{self.location}: {self.subject} {problem}"
        return f"{self.location}: {problem}"

    def child(self, subject: str) -> _Where:
        return _Where(self.location, subject)


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------------- converters

_Convert = Callable[[object, _Where], object]


def _to_str(value: object, where: _Where) -> str:
    if not isinstance(value, str) or not value:
        raise where.error(f"must be a non-empty string, got {_shown(value)}")
    return value


def _to_optional_str(value: object, where: _Where) -> str | None:
    if value is None or value == "":
        return None
    return _to_str(value, where)


def _to_secret(value: object, where: _Where) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise where.error("must be a string; put it in quotes")
    if not value:
        raise where.error("is empty; give a value or leave it unset")
    return value


def _to_bool(value: object, where: _Where) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
    raise where.error(f"must be true or false (or yes/no, on/off, 1/0), got {_shown(value)}")


def _int(value: object, where: _Where, minimum: int) -> int:
    number: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            number = None
    if number is None:
        raise where.error(f"must be a whole number, got {_shown(value)}")
    if number < minimum:
        raise where.error(f"must be at least {minimum}, got {number}")
    return number


def _to_count(minimum: int) -> _Convert:
    return lambda value, where: _int(value, where, minimum)


def _to_size(value: object, where: _Where) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        found = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
        unit = found.group(2).lower() if found else ""
        if found is None or unit not in _SIZE_UNITS:
            raise where.error(
                f"must be a size in bytes, e.g. 536870912, 512mb or 512MiB, got {_shown(value)}"
            )
        number = int(found.group(1)) * _SIZE_UNITS[unit]
    if number < 1:
        raise where.error(f"must be at least 1 byte, got {number}")
    return number


def _seconds(value: object, where: _Where, positive: bool) -> float:
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise where.error(f"must be a number of seconds, got {_shown(value)}")
    if positive and number <= 0:
        raise where.error(f"must be more than 0 seconds, got {number:g}")
    if number < 0:
        raise where.error(f"must be 0 or more seconds, got {number:g}")
    return number


def _to_seconds(positive: bool = False) -> _Convert:
    return lambda value, where: _seconds(value, where, positive)


def _to_choice(*choices: str) -> _Convert:
    def convert(value: object, where: _Where) -> str:
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        listed = ", ".join(repr(c) for c in choices)
        raise where.error(f"must be one of {listed}, got {_shown(value)}")

    return convert


def _to_log_level(value: object, where: _Where) -> str:
    if isinstance(value, str) and value.strip().lower() == "warn":
        return "warning"
    return cast(str, _to_choice(*_LOG_LEVELS)(value, where))


def _to_address(value: object, where: _Where) -> str:
    if not isinstance(value, str):
        raise where.error(f"must be HOST:PORT, got {_shown(value)}")
    try:
        parse_address(value.strip())
    except ValueError as exc:
        raise where.error(f"{exc}, got {_shown(value)}") from None
    return value.strip()


def _to_optional_address(value: object, where: _Where) -> str | None:
    if value is None or value == "":
        return None
    return _to_address(value, where)


def _to_upstream(value: object, where: _Where) -> str:
    # The URL may hold a password: no message here repeats it.
    if not isinstance(value, str) or not value.strip():
        raise where.error("must be a URL such as redis://127.0.0.1:6379/0")
    try:
        parse_upstream(value.strip())
    except ValueError as exc:
        raise where.error(str(exc)) from None
    return value.strip()


@dataclass(frozen=True)
class _Option:
    """A setting with one value: a Settings field, or a field of tls / upstream_tls
    spelt flat (tls_cert_file), which is also its override key and env name."""

    name: str
    convert: _Convert
    path: bool = False  # a file path: relative ones are resolved

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def yaml_name(self) -> str:
        for group in ("upstream_tls", "tls"):
            if self.name.startswith(group + "_") and self.name in _GROUP_OPTIONS[group]:
                return f"{group}.{self.name[len(group) + 1 :]}"
        return self.name


_OPTIONS: tuple[_Option, ...] = (
    _Option("listen", _to_address),
    _Option("upstream", _to_upstream),
    _Option("upstream_username", _to_optional_str),
    _Option("upstream_password", _to_secret),
    _Option("embedded", _to_bool),
    _Option("log_format", _to_choice("text", "json")),
    _Option("log_level", _to_log_level),
    _Option("drain_timeout", _to_seconds()),
    _Option("connect_timeout", _to_seconds(positive=True)),
    _Option("max_clients", _to_count(1)),
    _Option("max_request_bytes", _to_size),
    _Option("max_client_output_bytes", _to_size),
    _Option("idle_timeout", _to_seconds()),
    _Option("upstream_mode", _to_choice("pooled", "dedicated")),
    _Option("upstream_pool_size", _to_count(1)),
    _Option("metrics_listen", _to_optional_address),
    _Option("workers", _to_count(1)),
    _Option("admin_username", _to_str),
    _Option("admin_password", _to_secret),
    _Option("client_password", _to_secret),
    _Option("on_decrypt_error", _to_choice("error", "raw")),
    _Option("decrypt_cache_entries", _to_count(0)),
    _Option("script_policy", _to_choice("passthrough", "refuse")),
    _Option("tls_cert_file", _to_optional_str, path=True),
    _Option("tls_key_file", _to_optional_str, path=True),
    _Option("tls_ca_file", _to_optional_str, path=True),
    _Option("tls_verify_clients", _to_bool),
    _Option("upstream_tls_ca_file", _to_optional_str, path=True),
    _Option("upstream_tls_cert_file", _to_optional_str, path=True),
    _Option("upstream_tls_key_file", _to_optional_str, path=True),
    _Option("upstream_tls_verify", _to_bool),
    _Option("upstream_tls_server_hostname", _to_optional_str),
    _Option("cluster_announce_self", _to_bool),
)
_OPTION_BY_NAME = {option.name: option for option in _OPTIONS}
_GROUP_OPTIONS: dict[str, tuple[str, ...]] = {
    "tls": ("tls_cert_file", "tls_key_file", "tls_ca_file", "tls_verify_clients"),
    "upstream_tls": (
        "upstream_tls_ca_file",
        "upstream_tls_cert_file",
        "upstream_tls_key_file",
        "upstream_tls_verify",
        "upstream_tls_server_hostname",
    ),
}
_SECRET_OPTIONS = frozenset({"upstream_password", "admin_password", "client_password"})
_LIST_OPTIONS = ("keys", "rules", "scripts")
_TOP_LEVEL = tuple(
    [o.name for o in _OPTIONS if not o.name.startswith(("tls_", "upstream_tls_"))]
    + list(_GROUP_OPTIONS)
    + list(_LIST_OPTIONS)
)


def _defaults() -> dict[str, object]:
    base = Settings()
    values: dict[str, object] = {}
    for option in _OPTIONS:
        for group in ("upstream_tls", "tls"):
            if option.name in _GROUP_OPTIONS[group]:
                values[option.name] = getattr(getattr(base, group), option.name[len(group) + 1 :])
                break
        else:
            values[option.name] = getattr(base, option.name)
    return values


# ---------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class _EnvValue:
    value: str
    location: str  # "FIELDCRYPT_X", or "/srv/.env:3: FIELDCRYPT_X"


def _parse_dotenv(text: str, label: str) -> list[tuple[str, str, int]]:
    """KEY=VALUE lines: `#` comments, optional `export `, optional quotes, one line each."""
    entries: list[tuple[str, str, int]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith(("export ", "export\t")):
            line = line[len("export") :].lstrip()
        name, equals, rest = line.partition("=")
        name = name.strip()
        if not equals or not _DOTENV_NAME.fullmatch(name):
            raise ConfigError(f"{label}:{number}: expected NAME=VALUE")
        entries.append((name, _dotenv_value(rest.strip(), f"{label}:{number}: {name}"), number))
    return entries


def _dotenv_value(text: str, where: str) -> str:
    if not text or text[0] not in "'\"":
        return re.split(r"\s#", text, maxsplit=1)[0].strip()
    quote = text[0]
    chars: list[str] = []
    i = 1
    while i < len(text):
        c = text[i]
        if c == quote:
            rest = text[i + 1 :].strip()
            if rest and not rest.startswith("#"):
                raise ConfigError(f"{where}: unexpected text after the closing quote")
            return "".join(chars)
        if c == "\\" and quote == '"' and i + 1 < len(text):
            i += 1
            chars.append({"n": "\n", "t": "\t", "r": "\r"}.get(text[i], text[i]))
        else:
            chars.append(c)
        i += 1
    raise ConfigError(f"{where}: the quoted value is never closed (a value must fit on one line)")


def _read_dotenv(cwd: Path) -> tuple[tuple[str, str, str], ...]:
    path = cwd / ".env"
    if not path.is_file():
        return ()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {_reason(exc)}") from None
    return tuple(
        (name, value, f"{path}:{number}: {name}")
        for name, value, number in _parse_dotenv(text, str(path))
    )


def _merge_env(
    environ: Mapping[str, str], dotenv: Sequence[tuple[str, str, str]]
) -> dict[str, _EnvValue]:
    merged = {name: _EnvValue(value, location) for name, value, location in dotenv}
    merged.update((name, _EnvValue(value, name)) for name, value in environ.items())
    return merged


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return "it is not UTF-8 text"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _read_value_file(path: Path) -> str:
    """A file's text with one trailing newline removed. Raises OSError/UnicodeDecodeError."""
    text = path.read_text(encoding="utf-8")
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def _lookup_env(name: str, env: Mapping[str, _EnvValue], cwd: Path) -> _EnvValue | None:
    """NAME's value, or the content of the file NAME_FILE points at; None when unset."""
    direct = env.get(name)
    via_file = env.get(name + "_FILE")
    if via_file is not None and direct is not None:
        raise ConfigError(f"{name} and {name}_FILE are both set; keep one")
    if via_file is None:
        return direct
    path = Path(via_file.value)
    if not path.is_absolute():
        path = cwd / path
    location = f"{via_file.location} ({path})"
    try:
        return _EnvValue(_read_value_file(path), location)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{via_file.location}: cannot read {path}: {_reason(exc)}") from None


# ---------------------------------------------------------------------------- YAML


class _Document:
    """A YAML file composed into nodes, so each value can be named by its line."""

    def __init__(self, label: str, text: str) -> None:
        self.label = label
        self._loader = yaml.SafeLoader(text)
        try:
            self.root: yaml.Node | None = self._loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = f":{mark.line + 1}" if mark is not None else ""
            problem = exc.problem or exc.context or "invalid YAML"
            raise ConfigError(f"{label}{line}: invalid YAML: {problem}") from None
        except yaml.YAMLError:
            raise ConfigError(f"{label}: invalid YAML") from None

    def close(self) -> None:
        self._loader.dispose()

    def where(self, node: yaml.Node, subject: str | None = None) -> _Where:
        return _Where(f"{self.label}:{node.start_mark.line + 1}", subject)

    def value(self, node: yaml.Node, subject: str) -> object:
        try:
            return self._loader.construct_object(node, deep=True)
        except yaml.YAMLError:
            raise self.where(node, subject).error("is not a value fieldcrypt can read") from None

    def is_null(self, node: yaml.Node) -> bool:
        return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"

    def entries(
        self, node: yaml.Node, subject: str, shape: str
    ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """A mapping's (key node, value node) by name; repeats and non-text names are errors."""
        if not isinstance(node, yaml.MappingNode):
            raise self.where(node, subject or "the config file").error(
                f"must be a mapping ({shape})"
            )
        found: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            if not (isinstance(key_node, yaml.ScalarNode) and isinstance(key_node.value, str)):
                raise self.where(key_node).error("an option name must be text")
            name = key_node.value
            if name in found:
                first = found[name][0].start_mark.line + 1
                raise self.where(key_node).error(
                    f"{_join(subject, name)} is given twice (first on line {first}); keep one"
                )
            found[name] = (key_node, value_node)
        return found

    def check_names(
        self,
        entries: Mapping[str, tuple[yaml.Node, yaml.Node]],
        allowed: Sequence[str],
        subject: str,
    ) -> None:
        for name, (key_node, _) in entries.items():
            if name not in allowed:
                close = (
                    difflib.get_close_matches(name, allowed, n=3)
                    or [a for a in allowed if a.startswith(name)][:3]
                )
                hint = (
                    f"did you mean {_or_list(close)}?"
                    if close
                    else f"allowed: {', '.join(allowed)}"
                )
                owner = f"{subject}: " if subject else ""
                raise self.where(key_node).error(f"{owner}unknown option {name!r}; {hint}")


def _join(subject: str, name: str) -> str:
    return f"{subject}.{name}" if subject else name


def _or_list(names: Sequence[str]) -> str:
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _resolve_path(value: str, base: Path) -> str:
    path = Path(value)
    return value if path.is_absolute() else os.path.normpath(base / path)


@dataclass(frozen=True)
class _Given:
    value: object
    where: _Where
    base: Path  # relative paths are resolved against it


# ---------------------------------------------------------------------------- lists


def _parse_keys(
    doc: _Document, node: yaml.Node, base: Path, warnings: list[str]
) -> tuple[KeySource, ...]:
    kinds = ("secret_env", "secret_file", "secret")
    allowed = (*kinds, "decrypt_only")
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise doc.where(node, "keys").error(
            "must list at least one key, e.g. [{secret_env: FIELDCRYPT_SECRET}]; "
            "or remove keys: to use FIELDCRYPT_SECRET"
        )
    sources: list[KeySource] = []
    for index, item in enumerate(node.value):
        subject = f"keys[{index}]"
        entries = doc.entries(item, subject, "secret_env:, secret_file: or secret:")
        doc.check_names(entries, allowed, subject)
        given = [kind for kind in kinds if kind in entries]
        where = doc.where(item, subject)
        if not given:
            raise where.error("needs one of secret_env:, secret_file: or secret:")
        if len(given) > 1:
            raise where.error(f"has both {given[0]}: and {given[1]}:; keep one")
        kind_name = given[0]
        value_node = entries[kind_name][1]
        value_where = doc.where(value_node, f"{subject}.{kind_name}")
        value = doc.value(value_node, subject)
        decrypt_only = False
        if "decrypt_only" in entries:
            flag_node = entries["decrypt_only"][1]
            decrypt_only = _to_bool(
                doc.value(flag_node, subject), doc.where(flag_node, f"{subject}.decrypt_only")
            )
        line = item.start_mark.line + 1
        location = f"{doc.label}:{line}: {subject}"
        if kind_name == "secret_env":
            # Not echoed: a secret pasted here by mistake must not reach the log.
            if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
                raise value_where.error(
                    "must be the name of an environment variable (letters, digits and _), "
                    "e.g. FIELDCRYPT_SECRET"
                )
            sources.append(KeySource("env", value, decrypt_only, line, location))
        elif kind_name == "secret_file":
            path = _resolve_path(_to_str(value, value_where), base)
            sources.append(KeySource("file", path, decrypt_only, line, location))
        else:
            if not isinstance(value, str):
                raise value_where.error("must be a string; put it in quotes")
            if not value:
                raise value_where.error("is empty; give a key (see `fieldcrypt keygen`)")
            warnings.append(
                value_where.text(
                    "puts a key in the config file; move it to secret_env: or secret_file:"
                )
            )
            sources.append(
                KeySource("literal", subject, decrypt_only, line, location, secret=value)
            )
    return tuple(sources)


def _glob_problem(pattern: str) -> str | None:
    try:
        Glob(pattern.encode("utf-8", "surrogateescape"))
    except GlobError as exc:
        return str(exc)
    return None


def _parse_rules(doc: _Document, node: yaml.Node) -> tuple[Rule, ...]:
    allowed = ("key", "fields", "db", "require_encrypted", "bind_key", "refuse_scripts")
    if doc.is_null(node):
        return ()
    if not isinstance(node, yaml.SequenceNode):
        raise doc.where(node, "rules").error("must be a list of rules, each with key: and fields:")
    rules: list[Rule] = []
    for index, item in enumerate(node.value):
        subject = f"rules[{index}]"
        entries = doc.entries(item, subject, "key: and fields:")
        doc.check_names(entries, allowed, subject)
        where = doc.where(item, subject)
        if "key" not in entries:
            raise where.error('needs key: (a key name or glob, e.g. "user:*")')
        if "fields" not in entries:
            raise where.error("needs fields: (a list of field names or globs)")
        key_node = entries["key"][1]
        key_where = doc.where(key_node, f"{subject}.key")
        key = doc.value(key_node, subject)
        if not isinstance(key, str) or not key:
            raise key_where.error(f"must be a key name or glob in quotes, got {_shown(key)}")
        problem = _glob_problem(key)
        if problem:
            raise key_where.error(f"{key!r} is not a valid glob: {problem}")
        fields_node = entries["fields"][1]
        fields_where = doc.where(fields_node, f"{subject}.fields")
        if not isinstance(fields_node, yaml.SequenceNode):
            raise fields_where.error("must be a list of strings, e.g. [password, token]")
        if not fields_node.value:
            raise fields_where.error("lists no field; name at least one")
        names: list[str] = []
        for position, field_node in enumerate(fields_node.value):
            field_where = doc.where(field_node, f"{subject}.fields[{position}]")
            name = doc.value(field_node, subject)
            if not isinstance(name, str) or not name:
                raise field_where.error(
                    f"must be a field name or glob in quotes, got {_shown(name)}"
                )
            problem = _glob_problem(name)
            if problem:
                raise field_where.error(f"{name!r} is not a valid glob: {problem}")
            names.append(name)
        db: int | None = None
        flags = {"require_encrypted": False, "bind_key": False, "refuse_scripts": False}
        if "db" in entries:
            db_node = entries["db"][1]
            db_value = doc.value(db_node, subject)
            if db_value is not None:
                db = _int(db_value, doc.where(db_node, f"{subject}.db"), 0)
        for flag in flags:
            if flag in entries:
                flag_node = entries[flag][1]
                flags[flag] = _to_bool(
                    doc.value(flag_node, subject), doc.where(flag_node, f"{subject}.{flag}")
                )
        rules.append(
            Rule(
                key=key,
                fields=tuple(names),
                db=db,
                require_encrypted=flags["require_encrypted"],
                bind_key=flags["bind_key"],
                refuse_scripts=flags["refuse_scripts"],
                line=item.start_mark.line + 1,
            )
        )
    return tuple(rules)


def _member(
    doc: _Document,
    entries: Mapping[str, tuple[yaml.Node, yaml.Node]],
    subject: str,
    name: str,
) -> tuple[object, _Where]:
    """The value of option `name` of a mapping, and where it is."""
    value_node = entries[name][1]
    return doc.value(value_node, subject), doc.where(value_node, f"{subject}.{name}")


def _parse_scripts(doc: _Document, node: yaml.Node, base: Path) -> tuple[Script, ...]:
    ids = ("sha1", "body_file", "function")
    allowed = ("name", *ids, "hash_key", "field_values", "repeat")
    if doc.is_null(node):
        return ()
    if not isinstance(node, yaml.SequenceNode):
        raise doc.where(node, "scripts").error("must be a list of scripts")
    scripts: list[Script] = []
    names: dict[str, int] = {}
    for index, item in enumerate(node.value):
        subject = f"scripts[{index}]"
        entries = doc.entries(item, subject, "name:, hash_key:, field_values: ...")
        doc.check_names(entries, allowed, subject)
        where = doc.where(item, subject)
        line = item.start_mark.line + 1

        value = partial(_member, doc, entries, subject)
        for required in ("name", "hash_key", "field_values"):
            if required not in entries:
                raise where.error(f"needs {required}:")
        name = _to_str(*value("name"))
        if name in names:
            raise where.error(f"repeats the name {name!r} of the script on line {names[name]}")
        names[name] = line
        given = [i for i in ids if i in entries]
        if len(given) != 1:
            raise where.error(
                "needs exactly one of sha1:, body_file: or function:"
                + (f" (has {', '.join(given)})" if given else "")
            )
        sha1 = body_file = function = body = None
        text = _to_str(*value(given[0]))
        if given[0] == "sha1":
            if not _SHA1.fullmatch(text):
                raise value("sha1")[1].error(f"must be 40 hex digits, got {_shown(text)}")
            sha1 = text.lower()
        elif given[0] == "body_file":
            body_file = _resolve_path(text, base)
            try:
                body = Path(body_file).read_bytes()
            except OSError as exc:
                raise value("body_file")[1].error(
                    f"cannot read {body_file}: {_reason(exc)}"
                ) from None
        else:
            function = text
        hash_key = _int(*value("hash_key"), 1)
        pairs_value, pairs_where = value("field_values")
        shape = "must be a list of [field, value] ARGV positions (1 and up), e.g. [[1, 2]]"
        if not isinstance(pairs_value, list):  # [] declares a script that writes no secret
            raise pairs_where.error(shape)
        pairs: list[tuple[int, int]] = []
        for pair in pairs_value:
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in pair)
            ):
                raise pairs_where.error(f"{shape}; {_shown(pair)} is not one")
            pairs.append((pair[0], pair[1]))
        used = [n for pair in pairs for n in pair]
        if len(set(used)) != len(used):
            raise pairs_where.error(f"names an ARGV position twice in {_shown(pairs_value)}")
        repeat = 0
        if "repeat" in entries:
            given_repeat, repeat_where = value("repeat")
            span = max(used) - min(used) + 1 if used else 1
            if isinstance(given_repeat, int) and not isinstance(given_repeat, bool):
                if given_repeat < span:
                    raise repeat_where.error(
                        "must be true, false, or every how many ARGV the pattern repeats "
                        f"(at least its span, {span}), got {given_repeat}"
                    )
                repeat = given_repeat
            elif _to_bool(given_repeat, repeat_where):
                repeat = span
        scripts.append(
            Script(name, hash_key, tuple(pairs), sha1, body_file, function, repeat, line, body)
        )
    return tuple(scripts)


# ---------------------------------------------------------------------------- loading


def load_settings(
    path: str | None,
    overrides: Mapping[str, object],
    environ: Mapping[str, str],
    cwd: Path,
) -> Settings:
    """Settings from flags (`overrides`: Settings field names, or flat tls_* and
    upstream_tls_* names; None = not given) > FIELDCRYPT_* environment (.env in `cwd`
    fills what `environ` lacks; FIELDCRYPT_X_FILE reads FIELDCRYPT_X from a file) > the
    YAML file at `path` (or FIELDCRYPT_CONFIG) > defaults. Raises ConfigError."""
    for name in overrides:
        if name not in _OPTION_BY_NAME:
            raise ValueError(f"unknown setting in overrides: {name!r}")
    dotenv = _read_dotenv(cwd)
    env = _merge_env(environ, dotenv)
    warnings: list[str] = []
    if path is None:
        configured = _lookup_env(CONFIG_ENV, env, cwd)
        path = configured.value if configured and configured.value else None

    given: dict[str, _Given] = {}
    lists: dict[str, yaml.Node] = {}
    doc: _Document | None = None
    base = cwd
    if path is not None:
        file_path = Path(path) if Path(path).is_absolute() else cwd / path
        base = file_path.parent
        try:
            text = file_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the config file: {_reason(exc)}") from None
        doc = _Document(path, text)
    try:
        if doc is not None and doc.root is not None and not doc.is_null(doc.root):
            _collect_yaml(doc, doc.root, base, given, lists)
        for option in _OPTIONS:
            found = _lookup_env(option.env, env, cwd)
            if found is not None:
                given[option.name] = _Given(found.value, _Where(found.location), cwd)
        for name, override in overrides.items():
            if override is not None:
                flag = "--" + name.replace("_", "-")
                given[name] = _Given(override, _Where(flag), cwd)
                _warn_of_command_line_secret(name, flag, override, warnings)

        values = _defaults()
        wheres: dict[str, _Where] = {}
        for name, item in given.items():
            option = _OPTION_BY_NAME[name]
            converted = option.convert(item.value, item.where)
            if option.path and isinstance(converted, str):
                converted = _resolve_path(converted, item.base)
            values[name] = converted
            wheres[name] = item.where

        keys = _load_keys(doc, lists, base, env, cwd, warnings)
        rules = _parse_rules(doc, lists["rules"]) if doc and "rules" in lists else ()
        scripts = _parse_scripts(doc, lists["scripts"], base) if doc and "scripts" in lists else ()
    finally:
        if doc is not None:
            doc.close()

    settings = _build(values, keys, rules, scripts, path, cwd, dotenv)
    _cross_check(settings, wheres, warnings)
    _check_unknown_env(env, keys, warnings)
    return _with_warnings(settings, warnings)


def _collect_yaml(
    doc: _Document,
    root: yaml.Node,
    base: Path,
    given: dict[str, _Given],
    lists: dict[str, yaml.Node],
) -> None:
    entries = doc.entries(root, "", "option: value lines such as listen: 127.0.0.1:6380")
    doc.check_names(entries, _TOP_LEVEL, "")
    for name, (_, value_node) in entries.items():
        if name in _LIST_OPTIONS:
            lists[name] = value_node
        elif name in _GROUP_OPTIONS:
            if doc.is_null(value_node):
                continue
            members = {o[len(name) + 1 :]: o for o in _GROUP_OPTIONS[name]}
            group = doc.entries(value_node, name, ", ".join(f"{m}:" for m in members))
            doc.check_names(group, tuple(members), name)
            for member, (_, member_node) in group.items():
                subject = f"{name}.{member}"
                given[members[member]] = _Given(
                    doc.value(member_node, subject), doc.where(member_node, subject), base
                )
        else:
            given[name] = _Given(doc.value(value_node, name), doc.where(value_node, name), base)


def _load_keys(
    doc: _Document | None,
    lists: Mapping[str, yaml.Node],
    base: Path,
    env: Mapping[str, _EnvValue],
    cwd: Path,
    warnings: list[str],
) -> tuple[KeySource, ...]:
    if doc is not None and "keys" in lists:
        keys = _parse_keys(doc, lists["keys"], base, warnings)
        used = {k.name_or_path for k in keys if k.kind == "env"}
        for name in (SECRET_ENV, SECRET_ENV + "_FILE"):
            if name in env and SECRET_ENV not in used:
                warnings.append(
                    f"{env[name].location}: is set but ignored, because keys: in {doc.label} "
                    f"does not use it; add {{secret_env: {SECRET_ENV}}} to keys: or unset it"
                )
        if all(k.decrypt_only for k in keys):
            warnings.append(
                f"{doc.label}: every entry in keys: is decrypt_only, so the proxy can read "
                "protected fields but refuses to write them"
            )
        return keys
    found = _lookup_env(SECRET_ENV, env, cwd)
    if found is None:
        return ()
    name = SECRET_ENV + "_FILE" if SECRET_ENV + "_FILE" in env else SECRET_ENV
    return (
        KeySource(
            "literal-from-env", name, False, None, location=found.location, secret=found.value
        ),
    )


def _build(
    values: Mapping[str, object],
    keys: tuple[KeySource, ...],
    rules: tuple[Rule, ...],
    scripts: tuple[Script, ...],
    path: str | None,
    cwd: Path,
    dotenv: tuple[tuple[str, str, str], ...],
) -> Settings:
    plain: dict[str, Any] = {
        o.name: values[o.name]
        for o in _OPTIONS
        if not any(o.name in members for members in _GROUP_OPTIONS.values())
    }
    groups: dict[str, dict[str, Any]] = {
        group: {name[len(group) + 1 :]: values[name] for name in members}
        for group, members in _GROUP_OPTIONS.items()
    }
    return Settings(
        **plain,
        tls=TlsSettings(**groups["tls"]),
        upstream_tls=UpstreamTlsSettings(**groups["upstream_tls"]),
        keys=keys,
        rules=rules,
        scripts=scripts,
        config_path=path,
        env_context=EnvContext(str(cwd), dotenv),
    )


def _cross_check(settings: Settings, wheres: Mapping[str, _Where], warnings: list[str]) -> None:
    # A YAML location names the option as its subject; an environment variable or a
    # flag is its own name.
    def problem(name: str, text: str) -> ConfigError:
        return wheres[name].error(text)

    tls = settings.tls
    if (tls.cert_file is None) != (tls.key_file is None):
        missing, present = (
            ("tls_key_file", "tls_cert_file")
            if tls.key_file is None
            else ("tls_cert_file", "tls_key_file")
        )
        raise problem(
            present, f"is set without {_OPTION_BY_NAME[missing].yaml_name}; set both to serve TLS"
        )
    if tls.verify_clients and tls.ca_file is None:
        raise problem(
            "tls_verify_clients",
            "needs tls.ca_file (the CA that signs client certificates)",
        )
    if (tls.verify_clients or tls.ca_file) and not tls.enabled:
        name = "tls_verify_clients" if tls.verify_clients else "tls_ca_file"
        raise problem(name, "needs tls.cert_file and tls.key_file (TLS for clients)")
    upstream_tls = settings.upstream_tls
    if (upstream_tls.cert_file is None) != (upstream_tls.key_file is None):
        present = (
            "upstream_tls_cert_file" if upstream_tls.key_file is None else "upstream_tls_key_file"
        )
        raise problem(
            present,
            "needs both upstream_tls.cert_file and upstream_tls.key_file (client certificate)",
        )
    unset = UpstreamTlsSettings()
    tls_given = [
        name
        for name in _GROUP_OPTIONS["upstream_tls"]
        if name in wheres
        and getattr(upstream_tls, name[len("upstream_tls_") :])
        != getattr(unset, name[len("upstream_tls_") :])
    ]
    if tls_given and not settings.embedded and not parse_upstream(settings.upstream).tls:
        raise problem(
            tls_given[0],
            "is set but upstream is a redis:// URL (no TLS); use rediss:// to connect with TLS",
        )
    if not upstream_tls.verify and parse_upstream(settings.upstream).tls:
        warnings.append(
            wheres["upstream_tls_verify"].text(
                "is false: the proxy will not check the Redis server's certificate"
            )
        )
    metrics = parse_address(settings.metrics_listen) if settings.metrics_listen else None
    if metrics is not None and metrics[1] != 0 and metrics == parse_address(settings.listen):
        raise problem("metrics_listen", "is the same address as listen; pick another port")
    if not settings.rules:
        where = settings.config_path or "no config file"
        warnings.append(f"{where}: no rules: given, so every field passes through unencrypted")
    strict = [
        f"rules[{index}]" + (f" (line {rule.line})" if rule.line is not None else "")
        for index, rule in enumerate(settings.rules)
        if rule.require_encrypted
    ]
    if settings.on_decrypt_error == "raw" and strict:
        # FieldCrypt.open: require_encrypted refuses what lacks the header; raw then
        # returns whatever has it and does not decrypt.
        warnings.append(
            wheres["on_decrypt_error"].text(
                f"is raw, which wins over require_encrypted: true of {', '.join(strict)}: "
                "a value there that starts with $fc1$ but does not decrypt reaches the "
                "application as stored, so whoever can write to Redis can plant one; set "
                "on_decrypt_error: error to refuse it"
            )
        )


def _warn_of_command_line_secret(name: str, flag: str, value: object, warnings: list[str]) -> None:
    if name == "upstream" and isinstance(value, str):
        warning = url_password_warning(flag, value.strip())
        if warning is not None:
            warnings.append(warning)
    elif name in _SECRET_OPTIONS:
        env = _OPTION_BY_NAME[name].env
        warnings.append(secret_flag_warning(flag, f"set {env}_FILE instead"))


def _check_unknown_env(
    env: Mapping[str, _EnvValue], keys: Sequence[KeySource], warnings: list[str]
) -> None:
    known = {o.env for o in _OPTIONS} | {SECRET_ENV, CONFIG_ENV}
    known |= {k.name_or_path for k in keys if k.kind == "env"}
    known |= {name + "_FILE" for name in known}
    for name, entry in env.items():
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            text = f"is not a fieldcrypt setting{hint}; it is ignored"
            warnings.append(f"{entry.location}: {text}")


def _with_warnings(settings: Settings, warnings: Sequence[str]) -> Settings:
    return replace(settings, warnings=tuple(warnings))


# ---------------------------------------------------------------------------- keys


def _read_key_file(source: KeySource) -> str:
    try:
        return _read_value_file(Path(source.name_or_path))
    except (OSError, UnicodeDecodeError) as exc:
        reason = _reason(exc)
        if isinstance(exc, UnicodeDecodeError):
            reason += "; write the key as text, e.g. from `fieldcrypt keygen`"
        raise ConfigError(
            f"{source.location}: cannot read key file {source.name_or_path}: {reason}"
        ) from None


def flag_key(label: str, value: str, decrypt_only: bool, from_file: bool) -> KeySource:
    """A key given on the command line: a secret (`--secret X`), or the path of a file
    holding one (`--secret-file PATH`). `label` names the flag in messages."""
    if from_file:
        return KeySource("file", value, decrypt_only, location=label)
    return KeySource("literal-from-flag", label, decrypt_only, location=label, secret=value)


def secret_flag_warning(flag: str, instead: str) -> str:
    """The one-line warning for a secret given on the command line; never the secret."""
    return (
        f"{flag}: puts a secret on the command line, where other users of the machine "
        f"can read it (ps, /proc) and the shell history keeps it; {instead}"
    )


def url_password_warning(flag: str, url: str) -> str | None:
    """secret_flag_warning for an upstream URL given as `flag` when it holds a password."""
    try:
        password = parse_upstream(url).password
    except ValueError:
        return None  # the URL's own error comes first
    if password is None:
        return None
    return secret_flag_warning(
        flag,
        f"leave the password out of the URL and set {ENV_PREFIX}UPSTREAM_PASSWORD_FILE "
        "(or upstream_password: in the config file)",
    )


def resolve_secrets(
    settings: Settings,
    environ: Mapping[str, str],
    warnings: list[str] | None = None,
) -> list[tuple[KeySource, str]]:
    """Each key source with its secret, read from the environment (and .env, and
    NAME_FILE) or a file. Warnings (weak passphrases) are appended to `warnings`.
    Raises ConfigError, naming the entry and never the secret."""
    from proxy.crypto import passphrase_is_weak

    if not settings.keys:
        raise ConfigError(
            f"no encryption key is configured: set {SECRET_ENV} (or {SECRET_ENV}_FILE), "
            "or list keys: in the config file; `fieldcrypt keygen` prints a new key"
        )
    context = settings.env_context or EnvContext(str(Path.cwd()))
    env = _merge_env(environ, context.dotenv)
    resolved: list[tuple[KeySource, str]] = []
    for source in settings.keys:
        if source.kind == "env":
            found = _lookup_env(source.name_or_path, env, Path(context.cwd))
            if found is None:
                raise ConfigError(
                    f"{source.location}: environment variable {source.name_or_path} is not set; "
                    "set it (or put it in .env)"
                )
            secret = found.value
        elif source.kind == "file":
            secret = _read_key_file(source)
        else:
            secret = source.secret or ""
        if not secret:
            raise ConfigError(
                f"{source.location}: the key in {source.describe()} is empty; "
                "`fieldcrypt keygen` prints a new key"
            )
        if warnings is not None and passphrase_is_weak(secret):
            warnings.append(
                f"{source.location}: the passphrase in {source.describe()} is shorter than "
                f"{WEAK_PASSPHRASE_LENGTH} characters; use a random key from `fieldcrypt keygen`"
            )
        resolved.append((source, secret))
    return resolved


def build_keyring(
    settings: Settings,
    environ: Mapping[str, str],
    warnings: list[str] | None = None,
) -> KeyRing:
    """The key ring of the configured keys, in config order (the first key that is not
    decrypt_only encrypts). Slow for passphrases (scrypt). Raises ConfigError."""
    from proxy.crypto import Key, KeyMaterialError, KeyRing, derive_key

    keys: list[Key] = []
    seen: dict[str, KeySource] = {}
    for source, secret in resolve_secrets(settings, environ, warnings):
        try:
            key = Key.from_bytes(derive_key(secret), decrypt_only=source.decrypt_only)
        except KeyMaterialError as exc:
            reason = str(exc) if secret not in str(exc) else "it is not a usable key"
            if source.kind == "file":
                reason = f"key file {source.name_or_path}: {reason}"
            raise ConfigError(f"{source.location}: {reason}") from None
        first = seen.get(key.kid)
        if first is not None:
            earlier = f"line {first.line}" if first.line is not None else first.location
            raise ConfigError(
                f"{source.location}: two entries hold the same key (the other is on {earlier}); "
                "remove one"
            )
        seen[key.kid] = source
        keys.append(key)
    try:
        return KeyRing(keys, decrypt_cache_entries=settings.decrypt_cache_entries)
    except ValueError as exc:
        raise ConfigError(f"{settings.config_path or 'keys'}: {exc}") from None


# ---------------------------------------------------------------------------- explain


def _size(number: int) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", MiB), ("KiB", 1024)):
        if number >= scale and number % scale == 0:
            return f"{number // scale} {unit}"
    return f"{number} bytes"


def _seconds_text(value: float) -> str:
    return f"{value:g}s"


def explain(settings: Settings) -> str:
    """A summary for `fieldcrypt check-config`; passwords are masked, secrets never read."""
    lines: list[str] = []
    add = lines.append
    add(f"config file:       {settings.config_path or '(none: defaults and environment)'}")
    tls = settings.tls
    listen = settings.listen
    if tls.enabled:
        listen += f" (TLS: cert {tls.cert_file}, key {tls.key_file}"
        if tls.verify_clients:
            listen += f"; client certificates checked against {tls.ca_file}"
        listen += ")"
    add(f"listen:            {listen}")
    if settings.embedded:
        add("upstream:          embedded server started by fieldcrypt")
    else:
        target = settings.upstream_target
        upstream = target.display()
        if target.tls:
            up_tls = settings.upstream_tls
            checks = "certificate checked" if up_tls.verify else "certificate NOT checked"
            if up_tls.ca_file:
                checks += f" against {up_tls.ca_file}"
            upstream += f" (TLS, {checks})"
        add(f"upstream:          {upstream}")
    add(
        "client auth:       "
        + ("password required" if settings.client_password else "none at the proxy")
    )
    add(
        f"admin:             user {settings.admin_username}, "
        + ("password set" if settings.admin_password else "no password set")
    )
    add(
        "connections:       "
        + (
            f"pooled, {settings.upstream_pool_size} shared upstream connections per db, "
            "protocol and user; a client needing its own (MULTI, blocking, pub/sub...) gets one"
            if settings.upstream_mode == "pooled"
            else "dedicated, one upstream connection per client"
        )
    )
    add(f"metrics:           {settings.metrics_listen or 'off'}")
    add(f"logging:           {settings.log_format}, level {settings.log_level}")
    add(
        f"limits:            {settings.max_clients} clients, requests up to "
        f"{_size(settings.max_request_bytes)}, client output up to "
        f"{_size(settings.max_client_output_bytes)}"
    )
    idle = _seconds_text(settings.idle_timeout) if settings.idle_timeout else "off"
    add(
        f"timeouts:          connect {_seconds_text(settings.connect_timeout)}, "
        f"drain {_seconds_text(settings.drain_timeout)}, idle {idle}"
    )
    on_error = {
        "error": "reply with an error",
        "raw": "return the stored bytes unchanged",
    }[settings.on_decrypt_error]
    add(f"on decrypt error:  {settings.on_decrypt_error} ({on_error})")
    cache = settings.decrypt_cache_entries
    add(
        "decrypt cache:     "
        + (
            f"up to {cache} recently read plaintexts kept in memory"
            if cache
            else "off (every read is decrypted)"
        )
    )
    add("key ring:")
    if not settings.keys:
        add(f"  no key configured (set {SECRET_ENV} or keys:)")
    encrypting = next((k for k in settings.keys if not k.decrypt_only), None)
    for source in settings.keys:
        role = (
            "encrypts and decrypts"
            if source is encrypting
            else "decrypts only"
            if source.decrypt_only
            else "decrypts (an older key)"
        )
        where = f", line {source.line}" if source.line is not None else ""
        add(f"  - {source.describe()}: {role}{where}")
    add("rules (first match wins):")
    if not settings.rules:
        add("  none: every field passes through unencrypted")
    for number, rule in enumerate(settings.rules, start=1):
        db = "any db" if rule.db is None else f"db {rule.db}"
        strict = "plaintext refused"
        if settings.on_decrypt_error == "raw":
            strict += ", but a $fc1$ value that does not decrypt is returned as stored (raw)"
        notes = [
            "bound to the key name" if rule.bind_key else "not bound to the key name",
            strict if rule.require_encrypted else "plaintext passes through",
        ]
        if rule.refuse_scripts:
            notes.append("scripts naming its keys refused")
        where = f", line {rule.line}" if rule.line is not None else ""
        add(
            f"  {number}. key {rule.key!r} ({db}{where}): encrypts fields "
            f"{', '.join(rule.fields)}; {'; '.join(notes)}"
        )
    add(f"scripts:           policy {settings.script_policy}, {len(settings.scripts)} declared")
    for script in settings.scripts:
        ident = script.sha1 or script.body_file or f"function {script.function}"
        add(f"  - {script.name} ({ident}): hash is KEYS[{script.hash_key}]")
    if settings.warnings:
        add("warnings:")
        lines.extend(f"  - {warning}" for warning in settings.warnings)
    return "\n".join(lines)
