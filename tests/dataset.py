"""An EmailEngine-shaped data set, for migration tests and for trying fieldcrypt by hand.

EmailEngine keeps its configuration in one hash, `settings`, and each email account
in a hash `iad:<account id>`, indexed by the set `ia:accounts`. Some fields hold
secrets, the ones `emailengine encrypt` covers, beside fields that stay cleartext:

- `settings`: serviceSecret, gmailClientSecret, outlookClientSecret,
  smtpServerPassword and openAiAPIKey are secret; serviceUrl, logs, notifyText
  and the rest are not. Values are JSON text, as EmailEngine stores them.
- `iad:<id>`: imap and smtp (JSON with `auth.pass`) are secret on every account, and
  oauth2 (JSON with an access and a refresh token) on every third one, as on a
  store where some accounts sign in with OAuth2; account, name, email, state,
  notifyFrom and path are cleartext.
- `ia:accounts`: the set of account ids; `ia:stats`: a hash no rule names.

Every secret holds PLAINTEXT_MARKER. Its `~` is outside base64url and outside the
envelope header, so no ciphertext can contain it: a search of the raw store for the
marker finds every secret left in cleartext, wherever it was copied, and nothing else.

The data is a pure function of (accounts, seed). `build` makes it, `load` writes it,
`rules_yaml` is the matching fieldcrypt configuration:

    python -m tests.dataset --redis redis://127.0.0.1:6379 --accounts 10000 \\
        --rules-out fieldcrypt.yaml
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import redis
import yaml

PLAINTEXT_MARKER: Final = "~plain~"

SETTINGS_KEY: Final = b"settings"
ACCOUNT_PREFIX: Final = b"iad:"
ACCOUNT_INDEX: Final = b"ia:accounts"
STATS_KEY: Final = b"ia:stats"

SETTINGS_SECRET_FIELDS: Final = (
    b"serviceSecret",
    b"gmailClientSecret",
    b"outlookClientSecret",
    b"smtpServerPassword",
    b"openAiAPIKey",
)
ACCOUNT_SECRET_FIELDS: Final = (b"imap", b"smtp", b"oauth2")

# The rules as EmailEngine's operator would write them. The settings rule uses a glob
# ("*ClientSecret") so that the migration walks that hash with HSCAN, and the account
# rule names its fields literally so that the migration reads them with HMGET.
RULES: Final[tuple[dict[str, Any], ...]] = (
    {
        "key": "settings",
        "fields": ["serviceSecret", "*ClientSecret", "smtpServerPassword", "openAiAPIKey"],
    },
    {"key": "iad:*", "fields": ["imap", "smtp", "oauth2"]},
)

_FIRST_NAMES: Final = ("Ada", "Jürgen", "Mariña", "Ольга", "Kwame", "Li", "Zoë", "Ravi")
_PROVIDERS: Final = (
    ("gmail", "imap.gmail.com", "smtp.gmail.com"),
    ("outlook", "outlook.office365.com", "smtp.office365.com"),
    ("fastmail", "imap.fastmail.com", "smtp.fastmail.com"),
)


def account_key(account_id: int) -> bytes:
    return ACCOUNT_PREFIX + str(account_id).encode()


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass
class Dataset:
    """What was written: every hash, set and their secrets, for comparison afterwards."""

    accounts: int
    hashes: dict[bytes, dict[bytes, bytes]] = field(default_factory=dict)
    sets: dict[bytes, set[bytes]] = field(default_factory=dict)

    @staticmethod
    def is_protected(key: bytes, field_name: bytes) -> bool:
        if key == SETTINGS_KEY:
            return field_name in SETTINGS_SECRET_FIELDS
        return key.startswith(ACCOUNT_PREFIX) and field_name in ACCOUNT_SECRET_FIELDS

    def protected(self) -> Iterator[tuple[bytes, bytes, bytes]]:
        """(key, field, cleartext value) of every protected value."""
        for key, fields in self.hashes.items():
            for name, value in fields.items():
                if self.is_protected(key, name):
                    yield key, name, value

    @property
    def protected_count(self) -> int:
        return sum(1 for _ in self.protected())

    @property
    def protected_hashes(self) -> int:
        """How many hashes some rule names (the migration's keys_scanned)."""
        return self.accounts + 1

    def account_keys(self) -> list[bytes]:
        return [account_key(i) for i in range(1, self.accounts + 1)]


def _secret(rng: random.Random, prefix: str) -> str:
    return f"{prefix}{PLAINTEXT_MARKER}{rng.randbytes(12).hex()}"


def build(accounts: int = 10_000, seed: int = 0) -> Dataset:
    """The data set: `settings`, `accounts` account hashes `iad:1`..., and their index."""
    rng = random.Random(seed)
    data = Dataset(accounts)
    data.hashes[SETTINGS_KEY] = {
        b"serviceUrl": _json("https://emailengine.example.com"),
        b"serviceSecret": _json(_secret(rng, "svc-")),
        b"gmailClientId": _json("1234-abcd.apps.googleusercontent.com"),
        b"gmailClientSecret": _json(_secret(rng, "GOCSPX-")),
        b"outlookClientId": _json("8c1e2d44-0000-4a5b-9c3d-1e2f3a4b5c6d"),
        b"outlookClientSecret": _json(_secret(rng, "ol-")),
        b"smtpServerPassword": _json(_secret(rng, "smtp-")),
        b"openAiAPIKey": _json(_secret(rng, "sk-")),
        b"logs": _json({"all": False, "maxLogLines": 10000}),
        b"notifyText": _json(True),
    }
    ids: set[bytes] = set()
    for account_id in range(1, accounts + 1):
        provider, imap_host, smtp_host = _PROVIDERS[account_id % len(_PROVIDERS)]
        name = f"{_FIRST_NAMES[account_id % len(_FIRST_NAMES)]} {account_id}"
        email = f"user{account_id}@{provider}.example.com"
        fields: dict[bytes, bytes] = {
            b"account": str(account_id).encode(),
            b"name": name.encode("utf-8"),
            b"email": email.encode(),
            b"state": b"connected" if account_id % 7 else b"authenticationError",
            b"notifyFrom": _json("2025-01-01T00:00:00.000Z"),
            b"path": _json(["INBOX", "[Gmail]/Sent Mail"]),
            b"imap": _json(
                {
                    "host": imap_host,
                    "port": 993,
                    "secure": True,
                    "auth": {"user": email, "pass": _secret(rng, "imap-")},
                }
            ),
            b"smtp": _json(
                {
                    "host": smtp_host,
                    "port": 465,
                    "secure": True,
                    "auth": {"user": email, "pass": _secret(rng, "smtp-")},
                }
            ),
        }
        if account_id % 3 == 0:
            fields[b"oauth2"] = _json(
                {
                    "provider": provider,
                    "auth": {"user": email},
                    "accessToken": _secret(rng, "ya29."),
                    "refreshToken": _secret(rng, "1//"),
                    "expires": "2025-06-01T12:00:00.000Z",
                    "scope": ["https://mail.google.com/"],
                }
            )
        data.hashes[account_key(account_id)] = fields
        ids.add(str(account_id).encode())
    data.hashes[STATS_KEY] = {b"messagesProcessed": b"123456", b"lastRun": b"1735689600"}
    if ids:
        data.sets[ACCOUNT_INDEX] = ids
    return data


def load(client: redis.Redis, data: Dataset, batch: int = 1000) -> None:
    """Write the data set as it is (cleartext) straight into Redis."""
    pipe = client.pipeline(transaction=False)
    queued = 0
    for key, fields in data.hashes.items():
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
        queued += 1
        if queued >= batch:
            pipe.execute()
            queued = 0
    for key, members in data.sets.items():
        ordered = sorted(members)
        for start in range(0, len(ordered), batch):
            pipe.sadd(key, *ordered[start : start + batch])
    pipe.execute()


def rules_yaml(
    keys: Sequence[Mapping[str, object]] = (),
    admin_password: str | None = None,
    admin_username: str | None = None,
) -> str:
    """fieldcrypt's configuration for this data set. `keys` are entries of keys:, e.g.
    [{"secret_file": "/run/secrets/new"}, {"secret_file": "old", "decrypt_only": True}];
    none: the CLI's --secret/--decrypt or FIELDCRYPT_SECRET supply the key ring."""
    document: dict[str, object] = {}
    if keys:
        document["keys"] = [dict(entry) for entry in keys]
    document["rules"] = [dict(rule) for rule in RULES]
    if admin_username is not None:
        document["admin_username"] = admin_username
    if admin_password is not None:
        document["admin_password"] = admin_password
    text: str = yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    return "# EmailEngine's secret fields (see tests/dataset.py)\n" + text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.dataset",
        description="Write an EmailEngine-shaped data set (cleartext) into Redis.",
    )
    parser.add_argument("--redis", required=True, metavar="URL", help="redis://host:port[/db]")
    parser.add_argument("--accounts", type=int, default=10_000, help="account hashes (10000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (0)")
    parser.add_argument("--flush", action="store_true", help="FLUSHDB first")
    parser.add_argument("--rules-out", metavar="FILE", help="write the matching rules YAML here")
    args = parser.parse_args(argv)
    if args.accounts < 0:
        parser.error("--accounts must be 0 or more")
    data = build(args.accounts, args.seed)
    client = redis.Redis.from_url(args.redis)
    try:
        if args.flush:
            client.flushdb()
        load(client, data)
    except redis.RedisError as error:
        print(f"tests.dataset: {args.redis}: {error}", file=sys.stderr)
        return 2
    finally:
        client.close()
    if args.rules_out:
        with open(args.rules_out, "w", encoding="utf-8") as out:
            out.write(rules_yaml())
    print(
        f"wrote {len(data.hashes)} hashes ({data.protected_count} protected values) "
        f"and {len(data.sets)} set(s) to {args.redis}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
