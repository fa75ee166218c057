"""Lua scripts and functions: decrypt what they return, encrypt what declared ones write.

EVAL, EVALSHA, EVAL_RO, EVALSHA_RO, FCALL and FCALL_RO are entries of the
command table like any other:

- Replies: one cheap check on the raw bytes (does the header occur at all?);
  only then is the reply decoded losslessly and every value carrying the
  header decrypted. The field name comes from the reply's shape (the element
  before the value in a flat field/value array, or the map key), else from the
  call's declared fields.
- Requests: a script declared in `scripts:` (by SHA1, body file or function
  name) has its declared ARGV values encrypted when they land in protected
  fields. An undeclared script naming a protected key in KEYS is recorded for
  `FIELDCRYPT SCRIPTS`, and refused under `script_policy: refuse`.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import hiredis

from proxy import resp
from proxy.commands import FieldCrypt, display_name
from proxy.config import Script
from proxy.crypto import HEADER_PREFIX, DecryptError
from proxy.session import Answer, Forward, Handler, Outcome, ReplyError, Session, Transform

log = logging.getLogger("fieldcrypt")

MAX_LEARNED: Final = 10_000  # script bodies remembered; a bound, not a working limit
SCRIPT_COMMANDS: Final = {
    b"EVAL": "body",
    b"EVAL_RO": "body",
    b"EVALSHA": "sha1",
    b"EVALSHA_RO": "sha1",
    b"FCALL": "function",
    b"FCALL_RO": "function",
}


@dataclass
class SeenScript:
    """An undeclared script seen touching a protected key."""

    ident: str  # "sha1 <hex>" or "function <name>"
    calls: int = 0
    sample_key: str = ""


@dataclass
class ScriptBook:
    """Declared scripts by SHA1 and function name, and what undeclared ones did."""

    by_sha1: dict[str, Script] = field(default_factory=dict)
    by_function: dict[str, Script] = field(default_factory=dict)
    by_body: dict[bytes, Script] = field(default_factory=dict)  # body files, trimmed
    seen: dict[str, SeenScript] = field(default_factory=dict)
    bodies: dict[str, bytes] = field(default_factory=dict)  # SHA1 -> trimmed body, as seen
    nudged: set[str] = field(default_factory=set)  # SHA1s answered NOSCRIPT once

    def carry_over(self, old: ScriptBook) -> None:
        """Keep what an earlier book learned from traffic (on reload)."""
        self.seen = old.seen
        self.nudged = old.nudged
        for sha1, body in old.bodies.items():
            self.learn(sha1, body)

    def learn(self, sha1: str, trimmed_body: bytes) -> None:
        """A body seen with SCRIPT LOAD or EVAL: a declared body file up to surrounding
        white space (a client may trim it) makes its SHA1 match the declaration."""
        self.bodies[sha1] = trimmed_body
        if sha1 not in self.by_sha1:
            script = self.by_body.get(trimmed_body)
            if script is not None:
                self.by_sha1[sha1] = script

    @classmethod
    def from_declarations(cls, scripts: tuple[Script, ...]) -> ScriptBook:
        book = cls()
        for script in scripts:
            if script.sha1:
                book.by_sha1[script.sha1.lower()] = script
            elif script.body_file:
                body = Path(script.body_file).read_bytes()
                book.by_sha1[hashlib.sha1(body).hexdigest()] = script
                book.by_body[body.strip()] = script
            elif script.function:
                book.by_function[script.function] = script
        return book

    def record(self, ident: str, key: bytes) -> None:
        entry = self.seen.get(ident)
        if entry is None:
            entry = self.seen[ident] = SeenScript(ident, sample_key=display_name(key))
            log.warning(
                "undeclared script %s touches protected key %r; declare it in scripts: "
                "so its writes are encrypted",
                ident,
                display_name(key),
            )
        entry.calls += 1


def declared_positions(script: Script, argc: int) -> list[tuple[int, int]]:
    """0-based (field, value) indexes into ARGV, with `repeat` applied."""
    pairs = [(f - 1, v - 1) for f, v in script.field_values]
    if not script.repeat or not pairs:
        return [p for p in pairs if p[0] < argc and p[1] < argc]
    stride = max(max(p) for p in pairs) + 1
    out: list[tuple[int, int]] = []
    offset = 0
    while True:
        step = [(f + offset, v + offset) for f, v in pairs]
        if any(f >= argc or v >= argc for f, v in step):
            return out
        out.extend(step)
        offset += stride


class Scripts:
    def __init__(self, crypt: FieldCrypt, book: ScriptBook, policy: str) -> None:
        self.crypt = crypt
        self.book = book
        self.refuse = policy == "refuse"
        self.rules = crypt.rules

    def handlers(self) -> dict[bytes, Handler]:
        handlers: dict[bytes, Handler] = dict.fromkeys(SCRIPT_COMMANDS, self.call)
        handlers[b"SCRIPT"] = self.script_load
        return handlers

    def script_load(self, session: Session, args: list[bytes]) -> Outcome:
        """SCRIPT LOAD teaches the proxy a body's SHA1 (as Redis computes it)."""
        if len(args) == 3 and args[1].upper() == b"LOAD":
            self._learn(args[2])
        return None

    def _learn(self, body: bytes) -> str:
        sha1 = hashlib.sha1(body).hexdigest()
        if sha1 not in self.book.bodies and len(self.book.bodies) < MAX_LEARNED:
            self.book.learn(sha1, body.strip())
        return sha1

    def call(self, session: Session, args: list[bytes]) -> Outcome:
        if len(args) < 3:
            return None
        try:
            numkeys = int(args[2])
        except ValueError:
            return None
        if numkeys < 0 or 3 + numkeys > len(args):
            return None
        kind = SCRIPT_COMMANDS[args[0].upper()]
        if kind == "body":
            sha1 = self._learn(args[1])
            ident = f"sha1 {sha1}"
            script = self.book.by_sha1.get(sha1)
        elif kind == "sha1":
            sha1 = args[1].decode("ascii", "replace").lower()
            ident = f"sha1 {sha1}"
            script = self.book.by_sha1.get(sha1)
        else:
            function = args[1].decode("utf-8", "replace")
            ident = f"function {function}"
            script = self.book.by_function.get(function)
        keys = args[3 : 3 + numkeys]
        argv_at = 3 + numkeys
        request: bytes | None = None
        read_only = args[0].upper().endswith(b"_RO")  # Redis lets these write nothing
        if script is not None:
            if self._seal(session, script, keys, args, argv_at):
                request = resp.encode_request(args)
        elif not read_only:
            protected = [k for k in keys if self.rules.match_key(session.db, k) is not None]
            if protected and kind == "sha1" and self._nudge(ident[5:]):
                # This process never saw the body: NOSCRIPT makes the client send it with
                # EVAL (as every client does after SCRIPT FLUSH), so a declaration by body
                # file is recognised, then and on every later EVALSHA.
                return Answer(b"-NOSCRIPT No matching script. Please use EVAL.\r\n")
            if protected:
                self.book.record(ident, protected[0])
                refused = self.refuse or any(
                    rule.refuse_scripts
                    for key in protected
                    for rule in self.rules.match_key(session.db, key).rules  # type: ignore[union-attr]
                )
                if refused:
                    return Answer(
                        resp.error_reply(
                            f"ERR fieldcrypt: script {ident} is not declared and names "
                            f"protected key '{display_name(protected[0])}'; declare it in scripts: "
                            "(or set script_policy: passthrough)"
                        ),
                        refusal=True,
                    )
        return Forward(
            request,
            self._reply_transform(session, script, keys, args[argv_at:]),
            only_with=HEADER_PREFIX,
        )

    def _nudge(self, sha1: str) -> bool:
        book = self.book
        if not book.by_body or sha1 in book.bodies or sha1 in book.nudged:
            return False
        if len(book.nudged) < MAX_LEARNED:
            book.nudged.add(sha1)
        return True

    def _seal(
        self, session: Session, script: Script, keys: list[bytes], args: list[bytes], argv_at: int
    ) -> bool:
        """Encrypt the declared values that land in protected fields, in place."""
        if not 1 <= script.hash_key <= len(keys):
            return False
        key = keys[script.hash_key - 1]
        key_rules = self.rules.match_key(session.db, key)
        if key_rules is None:
            return False
        changed = False
        for f, v in declared_positions(script, len(args) - argv_at):
            name = args[argv_at + f]
            rule = key_rules.field_rule(name)
            if rule is not None:
                args[argv_at + v] = self.crypt.seal(rule, key, name, args[argv_at + v])
                changed = True
        return changed

    def _reply_transform(
        self, session: Session, script: Script | None, keys: list[bytes], argv: list[bytes]
    ) -> Transform:
        db = session.db

        def transform(session: Session, frame: bytes) -> bytes:
            if HEADER_PREFIX not in frame:
                return frame  # the common case: nothing protected in this reply
            opener = _Opener(
                self.crypt, list(keys) or [b""], self._candidates(db, script, keys, argv)
            )
            found = _sealed_values(frame)
            if found is None:  # not something hiredis reads: the lossless tree
                value, _ = resp.decode(frame)
                return resp.encode_value(opener.walk(value, None))
            # Each ciphertext is unique (a random nonce), so its encoded bulk string
            # occurs once: splice the plaintext in; every other byte stays as it was.
            for stored, name in found.items():
                plain = opener.open(stored, name)
                frame = frame.replace(
                    b"$%d\r\n%s\r\n" % (len(stored), stored),
                    b"$%d\r\n%s\r\n" % (len(plain), plain),
                )
            return frame

        return transform

    def _candidates(
        self, db: int, script: Script | None, keys: list[bytes], argv: list[bytes]
    ) -> list[bytes]:
        """Field names to try for a value whose name the reply's shape doesn't give: the
        declared ones, then the literal field names of the rules covering KEYS. A wrong
        guess can't pass: the name is authenticated with the value."""
        candidates: list[bytes] = []
        if script is not None:
            candidates = [argv[f] for f, _ in declared_positions(script, len(argv))]
        for key in keys:
            key_rules = self.rules.match_key(db, key)
            for rule in key_rules.rules if key_rules is not None else ():
                candidates += [f.encode() for f in rule.fields if not set(f) & set("*?[\\")]
        return list(dict.fromkeys(candidates))


def _sealed_values(frame: bytes) -> dict[bytes, bytes | None] | None:
    """Every value in the reply that carries the header, with the field name its shape
    gives (the element before it, or its map key), read by hiredis; None when hiredis
    can't read the reply."""
    reader = hiredis.Reader()
    reader.feed(frame)
    found: dict[bytes, bytes | None] = {}
    try:
        while (value := reader.gets()) is not False:  # an attribute comes as its own reply
            _collect(value, found)
    except (hiredis.ProtocolError, TypeError):
        return None
    return found


def _collect(node: Any, found: dict[bytes, bytes | None]) -> None:
    if type(node) is list:
        previous: bytes | None = None
        for item in node:
            if type(item) is bytes:
                if item.startswith(HEADER_PREFIX):
                    found[item] = previous
                previous = item
            else:
                if type(item) is list or type(item) is dict:
                    _collect(item, found)
                previous = None
    elif type(node) is dict:
        for key, item in node.items():
            if type(item) is bytes:
                if item.startswith(HEADER_PREFIX):
                    found[item] = key if type(key) is bytes else None
            elif type(item) is list or type(item) is dict:
                _collect(item, found)
    elif type(node) is bytes and node.startswith(HEADER_PREFIX):
        found[node] = None


class _Opener:
    """Walks a decoded reply, decrypting every blob that carries the header."""

    def __init__(self, crypt: FieldCrypt, keys: list[bytes], fields: list[bytes]) -> None:
        self.crypt = crypt
        self.keys = keys
        self.fields = fields

    def walk(self, value: resp.Value, name: bytes | None) -> resp.Value:
        if isinstance(value, resp.Blob):
            if value.kind == 36 and value.data.startswith(HEADER_PREFIX):  # '$'
                return resp.Blob(36, self.open(value.data, name))
            return value
        if isinstance(value, resp.Aggregate):
            items = value.items
            for i, item in enumerate(items):
                before = items[i - 1] if i else None
                previous = before.data if isinstance(before, resp.Blob) else None
                items[i] = self.walk(item, previous)
        return value

    def open(self, stored: bytes, name: bytes | None) -> bytes:
        names = ([name] if name is not None else []) + [f for f in self.fields if f != name]
        for field_name in names:
            for key in self.keys:
                try:
                    plain = self.crypt.keyring.decrypt(stored, field_name, key)
                except DecryptError:
                    continue
                self.crypt.counts["decrypted"] += 1
                return plain
        shown = display_name(name) if name is not None else "?"
        try:
            # Through the common path: counts, logs and applies on_decrypt_error.
            return self.crypt.open(None, self.keys[0], name or b"?", stored)
        except ReplyError:
            raise ReplyError(
                f"ERR fieldcrypt: cannot decrypt a value in a script reply (field '{shown}'): "
                "no key and field name fit; declare the script's fields in scripts:"
            ) from None
