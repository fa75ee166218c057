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
from functools import partial
from typing import Any, Final

import hiredis

from proxy import resp
from proxy.commands import FieldCrypt, display_name
from proxy.config import Script
from proxy.crypto import DECRYPT_CACHE_MAX_REPLY, HEADER_PREFIX, MODE_KEY, DecryptError
from proxy.session import Answer, Forward, Handler, Outcome, ReplyError, Session, Transform

log = logging.getLogger("fieldcrypt")

MAX_LEARNED: Final = 10_000  # script bodies remembered; a bound, not a working limit
MAX_DECISIONS: Final = 1024  # calls of undeclared scripts remembered
MAX_DECIDED_KEYS: Final = 64  # calls with more KEYS than this are worked out every time
MAX_DECIDED_BYTES: Final = 4096  # ... and so are calls whose body/SHA1 and KEYS are longer
# numkeys as sent -> where ARGV starts in the arguments, for calls that may be remembered
_ARGV_AT: Final = {b"%d" % n: 3 + n for n in range(MAX_DECIDED_KEYS + 1)}
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

    def learn(self, sha1: str, trimmed_body: bytes) -> bool:
        """A body seen with SCRIPT LOAD or EVAL: a declared body file up to surrounding
        white space (a client may trim it) makes its SHA1 match the declaration, however
        many bodies came before. Returns whether that added a SHA1 to the declarations."""
        if len(self.bodies) < MAX_LEARNED:  # a bound: past it, only declared bodies count
            self.bodies[sha1] = trimmed_body
        if sha1 not in self.by_sha1:
            script = self.by_body.get(trimmed_body)
            if script is not None:
                self.by_sha1[sha1] = script
                return True
        return False

    @classmethod
    def from_declarations(cls, scripts: tuple[Script, ...]) -> ScriptBook:
        book = cls()
        for script in scripts:
            if script.sha1:
                book.by_sha1[script.sha1.lower()] = script
            elif script.body is not None:  # read from body_file when the config loaded
                body = script.body
                book.by_sha1[hashlib.sha1(body).hexdigest()] = script
                book.by_body[body.strip()] = script
            elif script.function:  # Redis finds a function by its name in any case
                book.by_function[script.function.lower()] = script
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
    """0-based (field, value) indexes into ARGV of an `argc`-long ARGV. With `repeat`, the
    pattern repeats every `repeat` ARGV (by default its span, so `[[2, 3]]` covers
    (2, 3), (4, 5), ... after a fixed ARGV[1]). Every pair inside ARGV counts, also
    those of a repetition that ARGV ends part-way through."""
    pairs = [(f - 1, v - 1) for f, v in script.field_values]
    if not pairs:
        return []
    stride = script.repeat or argc + 1
    out: list[tuple[int, int]] = []
    for offset in range(0, argc, stride):
        out += [
            (f + offset, v + offset) for f, v in pairs if f + offset < argc and v + offset < argc
        ]
    return out


class _Decision:
    """What a repeated call of an undeclared script comes to: its outcome, and the
    protected key to record it under (None when it names none)."""

    __slots__ = ("ident", "outcome", "record")

    def __init__(self, outcome: Outcome, ident: str, record: bytes | None) -> None:
        self.outcome = outcome
        self.ident = ident
        self.record = record


class Scripts:
    def __init__(self, crypt: FieldCrypt, book: ScriptBook, policy: str) -> None:
        self.crypt = crypt
        self.book = book
        self.refuse = policy == "refuse"
        self.rules = crypt.rules
        # Field names the rules spell out (no glob): the only names a message may show.
        self.literal_fields = frozenset(
            f.encode() for rule in crypt.rules.rules for f in rule.fields if _is_literal(f)
        )
        # (db, (command, body/SHA1/function, numkeys, *KEYS)) -> its decision, for calls
        # of undeclared scripts: these depend on nothing else (the book only grows, and
        # a learned declaration clears them), so a repeated call is one lookup.
        self.decisions: dict[tuple[int, tuple[bytes, ...]], _Decision] = {}

    def handlers(self) -> dict[bytes, Handler]:
        handlers: dict[bytes, Handler] = dict.fromkeys(SCRIPT_COMMANDS, self.call)
        handlers[b"SCRIPT"] = self.script_load
        return handlers

    def script_load(self, session: Session, args: list[bytes]) -> Outcome:
        """SCRIPT LOAD teaches the proxy a body's SHA1 (as Redis computes it). SCRIPT
        EXISTS answers 0 for a SHA1 whose body this process hasn't seen, while some
        declaration is by body file, so a client that asks before EVALSHA (redis-py's
        pipelines do) loads the body through the proxy."""
        sub = args[1].upper() if len(args) > 1 else b""
        if sub == b"LOAD" and len(args) == 3:
            self._learn(args[2])
        elif sub == b"EXISTS" and self.book.by_body:
            unseen = frozenset(i for i, sha in enumerate(args[2:]) if self._unseen(sha))
            if unseen:
                return Forward(None, partial(_not_loaded, unseen))
        return None

    def _unseen(self, sha: bytes) -> bool:
        """A SHA1 of a body this process hasn't seen (while it has room to remember)."""
        book = self.book
        name = sha.decode("ascii", "replace").lower()
        return (
            name not in book.bodies and name not in book.by_sha1 and len(book.bodies) < MAX_LEARNED
        )

    def _learn(self, body: bytes) -> str:
        sha1 = hashlib.sha1(body).hexdigest()
        book = self.book
        if sha1 not in book.bodies and book.learn(sha1, body.strip()):
            self.decisions.clear()  # a body file's SHA1 as a client spells it
        return sha1

    def call(self, session: Session, args: list[bytes]) -> Outcome:
        size = len(args)
        argv_at = _ARGV_AT.get(args[2]) if size > 2 else None
        if argv_at is None or argv_at > size or len(args[1]) > MAX_DECIDED_BYTES:
            return self._call_unusual(session, args)
        # A call of an undeclared script, seen before: one lookup.
        decision = self.decisions.get(
            (session.db, tuple(args) if argv_at == size else tuple(args[:argv_at]))
        )
        if decision is None:
            return self._decide(session, args, argv_at)
        if decision.record is not None:
            self.book.record(decision.ident, decision.record)
        return decision.outcome

    def _call_unusual(self, session: Session, args: list[bytes]) -> Outcome:
        """A call with many KEYS, a long EVAL body, or numkeys Redis refuses."""
        numkeys = resp.redis_int(args[2]) if len(args) >= 3 else None
        if numkeys is None:
            return None  # Redis answers the error
        argv_at = 3 + numkeys
        if argv_at < 3 or argv_at > len(args):
            return None  # Redis answers the error
        return self._decide(session, args, argv_at)

    def _decide(self, session: Session, args: list[bytes], argv_at: int) -> Outcome:
        """A call's outcome, worked out in full; remembered for undeclared scripts."""
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
            script = self.book.by_function.get(function.lower())
        db = session.db
        keys = args[3:argv_at]
        if script is not None:  # declared: its ARGV changes what goes upstream
            sealed = self._seal(session, script, keys, args, argv_at)
            return Forward(
                None if sealed is None else resp.encode_request(sealed),
                self._reply_transform(db, script, keys, (sealed or args)[argv_at:]),
                HEADER_PREFIX,
            )
        outcome: Outcome = Forward(None, self._reply_transform(db, None, keys, []), HEADER_PREFIX)
        protected: list[bytes] = []
        if not args[0].upper().endswith(b"_RO"):  # Redis lets these write nothing
            protected = [k for k in keys if self.rules.match_key(db, k) is not None]
        if protected:
            if kind == "sha1" and self._nudge(sha1):
                # This process never saw the body: NOSCRIPT makes the client send it with
                # EVAL (as every client does after SCRIPT FLUSH), so a declaration by body
                # file is recognised, then and on every later EVALSHA.
                # Inside MULTI it aborts the transaction, like any error at queue time.
                return Answer(b"-NOSCRIPT No matching script. Please use EVAL.\r\n", refusal=True)
            self.book.record(ident, protected[0])
            refused = self.refuse or any(
                rule.refuse_scripts
                for key in protected
                for rule in self.rules.match_key(db, key).rules  # type: ignore[union-attr]
            )
            if refused:
                outcome = Answer(
                    resp.error_reply(
                        f"ERR fieldcrypt: script {ident} is not declared and names "
                        f"protected key '{display_name(protected[0])}'; declare it in scripts: "
                        "(or set script_policy: passthrough)"
                    ),
                    refusal=True,
                )
        if argv_at - 3 <= MAX_DECIDED_KEYS and sum(map(len, args[1:argv_at])) <= MAX_DECIDED_BYTES:
            decisions = self.decisions
            if len(decisions) >= MAX_DECISIONS:
                decisions.clear()
            decisions[(db, tuple(args[:argv_at]))] = _Decision(
                outcome, ident, protected[0] if protected else None
            )
        return outcome

    def _nudge(self, sha1: str) -> bool:
        """Whether to answer NOSCRIPT: once for each SHA1 of a body this process hasn't
        seen, while some declaration is by body file. Once False for a SHA1 it stays
        False (the book only learns), which lets a decision be remembered."""
        book = self.book
        if not book.by_body or sha1 in book.bodies or sha1 in book.nudged:
            return False
        if len(book.nudged) >= MAX_LEARNED:
            book.nudged.clear()  # a bound: a SHA1 may be nudged once more, never forever
        book.nudged.add(sha1)
        return True

    def _seal(
        self, session: Session, script: Script, keys: list[bytes], args: list[bytes], argv_at: int
    ) -> list[bytes] | None:
        """`args` with the declared values that land in protected fields encrypted (a
        copy: handlers leave their arguments as they came), or None when there are none."""
        if not 1 <= script.hash_key <= len(keys):
            return None
        key = keys[script.hash_key - 1]
        key_rules = self.rules.match_key(session.db, key)
        if key_rules is None:
            return None
        sealed: list[bytes] | None = None
        for f, v in declared_positions(script, len(args) - argv_at):
            name = args[argv_at + f]
            rule = key_rules.field_rule(name)
            if rule is not None:
                if sealed is None:
                    sealed = args[:]
                sealed[argv_at + v] = self.crypt.seal(rule, key, name, args[argv_at + v])
        return sealed

    def _reply_transform(
        self, db: int, script: Script | None, keys: list[bytes], argv: list[bytes]
    ) -> Transform:
        return _ScriptReply(self, db, script, keys, argv).transform

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
                candidates += [f.encode() for f in rule.fields if _is_literal(f)]
        return list(dict.fromkeys(candidates))


def _not_loaded(unseen: frozenset[int], session: Session, frame: bytes) -> bytes:
    """A SCRIPT EXISTS reply with 0 for the SHA1s at `unseen`; an error as it came."""
    lines = frame.split(b"\r\n")
    if not frame.startswith(b"*") or len(lines) != int(lines[0][1:]) + 2:
        return frame
    for i in unseen:
        if lines[i + 1][:1] == b":":
            lines[i + 1] = b":0"
    return b"\r\n".join(lines)


def _is_literal(field_glob: str) -> bool:
    """Whether a rule's field glob names exactly one field."""
    return not set(field_glob) & set("*?[\\")


def _sealed_values(frame: bytes) -> tuple[dict[bytes, bytes | None], int] | None:
    """Every value in the reply that carries the header, with the field name its shape
    gives (the element before it, or its map key), and how many such values there are
    (a value may occur more than once), read by hiredis; None when hiredis can't read
    the reply."""
    reader = hiredis.Reader()
    reader.feed(frame)
    found: dict[bytes, bytes | None] = {}
    total = 0
    try:
        while (value := reader.gets()) is not False:  # an attribute comes as its own reply
            total += _collect(value, found)
    except (hiredis.ProtocolError, TypeError):
        return None
    return found, total


def _collect(node: Any, found: dict[bytes, bytes | None]) -> int:
    """Add the values under `node` that carry the header to `found`; returns how many."""
    total = 0
    if type(node) is list:
        previous: bytes | None = None
        for item in node:
            if type(item) is bytes:
                if item.startswith(HEADER_PREFIX):
                    found[item] = previous
                    total += 1
                previous = item
            else:
                if type(item) is list or type(item) is dict:
                    total += _collect(item, found)
                previous = None
    elif type(node) is dict:
        for key, item in node.items():
            if type(item) is bytes:
                if item.startswith(HEADER_PREFIX):
                    found[item] = key if type(key) is bytes else None
                    total += 1
            elif type(item) is list or type(item) is dict:
                total += _collect(item, found)
    elif type(node) is bytes and node.startswith(HEADER_PREFIX):
        found[node] = None
        total = 1
    return total


def _splice(frame: bytes, opened: dict[bytes, bytes]) -> tuple[bytes, int]:
    """`frame` with each bulk string `opened` names replaced by its plaintext, every
    other byte as it was, and how many were replaced. One pass over the header's
    occurrences, one join. Bytes inside another value that merely look like such a
    bulk string are replaced too: the caller compares the count with the values
    hiredis read."""
    parts: list[bytes] = []
    done = 0  # frame[:done] is in parts
    find = frame.find
    at = find(HEADER_PREFIX)
    while at >= 0:
        end = find(b"\r\n", at)
        if end < 0:
            break
        plain = opened.get(frame[at:end])
        if plain is not None:
            length = b"$%d\r\n" % (end - at)
            start = at - len(length)
            if start >= done and frame.startswith(length, start):
                parts += (frame[done:start], b"$%d\r\n" % len(plain), plain)
                done = end  # the value's CRLF stays
                at = find(HEADER_PREFIX, end)
                continue
        at = find(HEADER_PREFIX, at + 1)
    if not parts:
        return frame, 0
    replaced = len(parts) // 3
    parts.append(frame[done:])
    return b"".join(parts), replaced


class _ScriptReply:
    """What the replies of one script call go through: every value carrying the header
    is opened, under the name its shape gives, else a candidate field name."""

    __slots__ = (
        "_context",
        "_fields",
        "argv",
        "call_keys",
        "crypt",
        "db",
        "first_key",
        "keys",
        "script",
        "scripts",
    )

    def __init__(
        self,
        scripts: Scripts,
        db: int,
        script: Script | None,
        keys: list[bytes],
        argv: list[bytes],
    ) -> None:
        self.scripts = scripts
        self.crypt = scripts.crypt
        self.db = db
        self.script = script
        self.call_keys = keys
        self.keys = keys or [b""]
        self.first_key = self.keys[:1]  # enough for an envelope not bound to its key
        self.argv = argv
        self._fields: list[bytes] | None = None
        self._context: bytes | None = None

    def transform(self, session: Session, frame: bytes) -> bytes:
        if frame.find(HEADER_PREFIX) < 0:
            return frame  # the common case: nothing protected in this reply
        crypt = self.crypt
        keyring = crypt.keyring
        recall = keyring.recall_reply
        if recall is not None and len(frame) <= DECRYPT_CACHE_MAX_REPLY:
            # The same reply to the same call, opened before (larger ones are never kept,
            # and hashing them would cost more than it could save).
            known = recall((frame, self.context))
            if known is not None:
                crypt.counts["decrypted"] += known[1]
                return known[0]
        sealed = _sealed_values(frame)
        if sealed is None:  # not something hiredis reads: the lossless tree
            return self._through_tree(frame)
        found, total = sealed
        # A ciphertext is unique (a random nonce): what's opened once is the same wherever
        # it occurs. Only values read as bulk strings are replaced.
        opened: dict[bytes, bytes] = {}
        cached = keyring.cached
        key = self.keys[0]
        refused: list[tuple[bytes, bytes | None]] = []  # what no key and name opened
        foreign = 0  # values that only start like an envelope: not fieldcrypt's, kept as is
        for stored, name in found.items():
            # The decrypt cache holds only what authenticated: a hit is the answer.
            plain = cached((stored, name, key)) if cached is not None and name is not None else None
            if plain is None:
                plain = self.open(stored, name)
                if plain is None:
                    plain = stored  # what `raw` gives; `error` raises below
                    if keyring.owns(stored):
                        refused.append((stored, name))
                    else:
                        foreign += 1
            opened[stored] = plain
        out, replaced = _splice(frame, opened)
        if replaced != total:  # a header inside another value, or not a bulk string
            return self._through_tree(frame)
        opened_count = len(found) - len(refused) - foreign
        crypt.counts["decrypted"] += opened_count
        for stored, name in refused:
            self.refuse(stored, name)  # logs and counts; raises under on_decrypt_error: error
        if not refused:
            keyring.remember_reply(frame, self.context, out, opened_count)
        return out

    def _through_tree(self, frame: bytes) -> bytes:
        """The reply decoded losslessly, each bulk string that carries the header opened."""
        value, _ = resp.decode(frame)
        return resp.encode_value(self.walk(value, None))

    @property
    def context(self) -> bytes:
        """What an opened reply depends on besides its bytes and the key ring: the
        db (its rules), the call's keys, and a declared script with its ARGV (the
        field names to try)."""
        if self._context is None:
            declared = [self.script.name.encode(), *self.argv] if self.script is not None else []
            self._context = resp.encode_request(
                [b"%d" % self.db, *declared, b"KEYS", *self.call_keys]
            )
        return self._context

    @property
    def fields(self) -> list[bytes]:
        """The candidate field names, worked out once, and only when a value needs them."""
        if self._fields is None:
            self._fields = self.scripts._candidates(self.db, self.script, self.call_keys, self.argv)
        return self._fields

    def walk(self, value: resp.Value, name: bytes | None) -> resp.Value:
        if isinstance(value, resp.Blob):
            if value.kind == 36 and value.data.startswith(HEADER_PREFIX):  # '$'
                plain = self.open(value.data, name)
                if plain is None:
                    if not self.crypt.keyring.owns(value.data):
                        return value  # only starts like one: not fieldcrypt's
                    return resp.Blob(36, self.refuse(value.data, name))
                self.crypt.counts["decrypted"] += 1
                return resp.Blob(36, plain)
            return value
        if isinstance(value, resp.Aggregate):
            items = value.items
            previous: bytes | None = None
            for i, item in enumerate(items):
                items[i] = self.walk(item, previous)
                previous = item.data if isinstance(item, resp.Blob) else None  # as stored
        return value

    def open(self, stored: bytes, name: bytes | None) -> bytes | None:
        """The plaintext of `stored`, or None when no key and field name fit: one field
        name (and, for an envelope bound to its key, one key of the call) authenticates
        it, so the order of the guesses changes nothing but their cost: the decrypt
        cache first, then AES for the shape's name, then for the candidates."""
        keys = self.keys if stored[5:6] == MODE_KEY else self.first_key
        keyring = self.crypt.keyring
        cached = keyring.cached
        if cached is not None:
            if name is not None:
                for key in keys:
                    plain = cached((stored, name, key))
                    if plain is not None:
                        return plain
            for field_name in self.fields:
                for key in keys:
                    plain = cached((stored, field_name, key))
                    if plain is not None:
                        return plain
        names = self.fields if name is None else [name, *(f for f in self.fields if f != name)]
        for field_name in names:
            for key in keys:
                try:
                    return keyring.decrypt(stored, field_name, key)
                except DecryptError:
                    continue
        return None

    def refuse(self, stored: bytes, name: bytes | None) -> bytes:
        """What `on_decrypt_error` makes of a value `open` could not open: the stored
        bytes under `raw`, else ReplyError. The name is shown only when a rule names that
        field literally: the element before a value in a reply may be another value."""
        if name not in self.scripts.literal_fields:
            name = None
        shown = display_name(name) if name is not None else "?"
        try:
            # Through the common path: counts, logs and applies on_decrypt_error.
            return self.crypt.open(None, self.keys[0], name or b"?", stored)
        except ReplyError:
            raise ReplyError(
                f"ERR fieldcrypt: cannot decrypt a value in a script reply (field '{shown}'): "
                "no key and field name fit; declare the script's fields in scripts:"
            ) from None
