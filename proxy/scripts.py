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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final

import hiredis

from proxy import resp
from proxy.commands import FieldCrypt, display_name
from proxy.config import Script
from proxy.crypto import DECRYPT_CACHE_MAX_REPLY, HEADER_PREFIX, MODE_KEY, DecryptError
from proxy.loglimit import LogLimiter, suppressed_note
from proxy.rules import Rule
from proxy.session import Answer, Forward, Handler, Outcome, ReplyError, Session

log = logging.getLogger("fieldcrypt")

MAX_LEARNED: Final = 10_000  # SHA1s of bodies seen; a bound, not a working limit
MAX_VARIANTS: Final = 1024  # SHA1s of declared bodies spelt with other white space
MAX_SEEN: Final = 256  # undeclared scripts listed by FIELDCRYPT SCRIPTS; the rest: "other"
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
OTHER: Final = "other"  # the row of undeclared scripts pushed out of the table


@dataclass
class SeenScript:
    """An undeclared script seen touching a protected key."""

    ident: str  # "sha1 <hex>" or "function <name>", or OTHER
    calls: int = 0
    sample_key: str = ""


@dataclass
class ScriptBook:
    """Declared scripts by SHA1 and function name, and what undeclared ones did.

    What traffic teaches it is bounded whatever a client sends: SHA1s, never bodies;
    at most MAX_SEEN undeclared scripts, least recently called first out (their calls
    then count under OTHER); log lines a few a minute."""

    by_sha1: dict[str, Script] = field(default_factory=dict)
    by_function: dict[str, Script] = field(default_factory=dict)
    by_body: dict[bytes, Script] = field(default_factory=dict)  # body files, trimmed
    variants: dict[str, Script] = field(default_factory=dict)  # SHA1 -> declaration
    seen: OrderedDict[str, SeenScript] = field(default_factory=OrderedDict)
    other: SeenScript = field(default_factory=lambda: SeenScript(OTHER))
    sha1s: set[str] = field(default_factory=set)  # of bodies seen (SCRIPT LOAD, EVAL)
    nudged: set[str] = field(default_factory=set)  # SHA1s answered NOSCRIPT once
    log_limit: LogLimiter = field(default_factory=LogLimiter)

    def carry_over(self, old: ScriptBook) -> None:
        """Keep what an earlier book learned from traffic (on reload): the table of
        undeclared scripts, and the SHA1s of declared bodies spelt otherwise that are
        still declared. Other SHA1s seen are not kept: a declaration new in this book
        may match one of their bodies, and a client sends a body again after one
        NOSCRIPT or SCRIPT EXISTS 0."""
        self.seen = old.seen
        self.other = old.other
        self.log_limit = old.log_limit
        for sha1, script in old.variants.items():
            now = self.by_body.get(script.body.strip()) if script.body is not None else None
            if now is not None and self.declared(sha1) is None:
                self.variants[sha1] = now

    def declared(self, sha1: str) -> Script | None:
        return self.by_sha1.get(sha1) or self.variants.get(sha1)

    def learn(self, sha1: str, body: bytes) -> bool:
        """A body seen with SCRIPT LOAD or EVAL: a declared body file up to surrounding
        white space (a client may trim it) makes its SHA1 match the declaration, however
        many bodies came before. Returns whether that added a SHA1 to the declarations."""
        sha1s = self.sha1s
        if len(sha1s) >= MAX_LEARNED:
            sha1s.clear()  # a bound: a SHA1 forgotten costs one NOSCRIPT, never a write
        sha1s.add(sha1)
        if self.by_body and self.declared(sha1) is None:
            script = self.by_body.get(body.strip())
            if script is not None:
                if len(self.variants) >= MAX_VARIANTS:
                    self.variants.clear()
                self.variants[sha1] = script
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
        seen = self.seen
        entry = seen.get(ident)
        if entry is None:
            if len(seen) >= MAX_SEEN:
                _, oldest = seen.popitem(last=False)
                self.other.calls += oldest.calls
            entry = seen[ident] = SeenScript(ident, sample_key=display_name(key))
            held = self.log_limit.allow(ident)
            if held is not None:
                log.warning(
                    "undeclared script %s touches protected key %r; declare it in scripts: "
                    "so its writes are encrypted%s",
                    ident,
                    display_name(key),
                    suppressed_note(held),
                )
        else:
            seen.move_to_end(ident)
        entry.calls += 1

    def listing(self) -> list[SeenScript]:
        """The table, most called first, and the OTHER row when anything was pushed out."""
        rows = sorted(self.seen.values(), key=lambda s: -s.calls)
        return [*rows, self.other] if self.other.calls else rows


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
        """A SHA1 of a body this process hasn't seen."""
        book = self.book
        name = sha.decode("ascii", "replace").lower()
        return name not in book.sha1s and book.declared(name) is None

    def _learn(self, body: bytes) -> str:
        sha1 = hashlib.sha1(body).hexdigest()
        book = self.book
        if sha1 not in book.sha1s and book.learn(sha1, body):
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
            script = self.book.declared(sha1)
        elif kind == "sha1":
            sha1 = args[1].decode("ascii", "replace").lower()
            ident = f"sha1 {sha1}"
            script = self.book.declared(sha1)
        else:
            function = args[1].decode("utf-8", "replace")
            ident = f"function {function}"
            script = self.book.by_function.get(function.lower())
        db = session.db
        keys = args[3:argv_at]
        if script is not None:  # declared: its ARGV changes what goes upstream
            sealed = self._seal(session, script, keys, args, argv_at)
            return self._forward(
                None if sealed is None else resp.encode_request(sealed),
                _ScriptReply(self, db, script, keys, (sealed or args)[argv_at:]),
            )
        outcome: Outcome = self._forward(None, _ScriptReply(self, db, None, keys, []))
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
        if not book.by_body or sha1 in book.sha1s or sha1 in book.nudged:
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

    @staticmethod
    def _forward(request: bytes | None, reply: _ScriptReply) -> Forward:
        """The call as it goes upstream, its reply through `reply`: only a reply that
        carries the header, unless a rule of KEYS requires encryption (then cleartext
        is looked for by shape in every reply)."""
        return Forward(request, reply.transform, None if reply.strict else HEADER_PREFIX)


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


class _Found:
    """What one pass over hiredis' reading of a reply finds: each value that carries the
    header, with the field name and key name it is to be opened under, and whether the
    reply can be rewritten by splicing its bytes (see `_ScriptReply.transform`)."""

    __slots__ = ("reply", "spliceable", "strict", "total", "values")

    def __init__(self, reply: _ScriptReply) -> None:
        self.reply = reply
        self.strict = reply.strict
        self.values: dict[bytes, tuple[bytes | None, bytes | None]] = {}
        self.total = 0  # occurrences of such values, duplicates included
        self.spliceable = True

    def top(self, node: Any) -> None:
        keys = self.reply.positional_keys(node, _is_hash) if type(node) is list else None
        if keys is None:
            self.scan(node, self.reply.fixed_key)
            return
        for item, key in zip(node, keys, strict=True):  # element i of KEYS[i]: no names across
            self.scan(item, key)

    def scan(self, node: Any, key: bytes | None) -> None:
        if type(node) is list:
            previous: bytes | None = None  # the string before the next element
            strict = self.strict
            values = self.values
            total = 0
            prefix = HEADER_PREFIX
            for item in node:
                if type(item) is bytes:
                    if item.startswith(prefix):
                        name = (
                            previous
                            if previous is None or not previous.startswith(prefix)
                            else self.name(previous)
                        )
                        if strict:
                            self.envelope(item, name, key)
                        else:  # `envelope`'s common case, inline: a value, once or again
                            where = (name, key)
                            known = values.setdefault(item, where)
                            if known is not where and known != where:
                                self.spliceable = False
                            total += 1
                    elif strict and previous is not None:
                        name = self.name(previous)
                        if name is not None:
                            self.reply.check_cleartext(item, name, key)
                    # (The header inside a string, or twice in one, shows as a count the
                    # values found don't make up: see `transform`.)
                    previous = item
                else:
                    if type(item) is list or type(item) is dict:
                        self.scan(item, key)
                    previous = None
            self.total += total
        elif type(node) is dict:
            for name, item in node.items():
                if type(name) is not bytes:
                    name = None
                elif name.find(HEADER_PREFIX) >= 0:
                    self.spliceable = False  # a map key is a name, never opened
                if type(item) is bytes:
                    if item.startswith(HEADER_PREFIX):
                        self.envelope(item, name, key)
                    elif name is not None and self.reply.strict:
                        self.reply.check_cleartext(item, name, key)
                elif type(item) is list or type(item) is dict:
                    self.scan(item, key)
        elif type(node) is bytes and node.startswith(HEADER_PREFIX):
            self.envelope(node, None, key)

    def name(self, previous: bytes | None) -> bytes | None:
        """The name the string before an element gives it: any string, but an envelope
        of fieldcrypt's (a value, not a name); asked only where it matters."""
        if previous is None or not previous.startswith(HEADER_PREFIX):
            return previous
        return None if self.reply.crypt.keyring.owns(previous) else previous

    def envelope(self, item: bytes, name: bytes | None, key: bytes | None) -> None:
        """Note a string that starts with the header: a value to open under (name, key),
        or, when it isn't fieldcrypt's, cleartext that only looks like one."""
        where = (name, key)
        known = self.values.setdefault(item, where)
        if known is not where and known != where:
            self.spliceable = False  # the same bytes in two places that open differently
        self.total += 1
        if name is not None and self.reply.strict and not self.reply.crypt.keyring.owns(item):
            self.reply.check_cleartext(item, name, key)


def _splice(frame: bytes, opened: dict[bytes, bytes]) -> tuple[bytes, int]:
    """`frame` with each bulk string `opened` names replaced by its plaintext, every
    other byte as it was, and how many were replaced. One pass over the header's
    occurrences, one join. Sound only when every occurrence of the header in `frame`
    starts a value hiredis read (see `_ScriptReply.transform`): then a bulk string
    header that gives the value's exact length proves a whole bulk string."""
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


_MODE_AT: Final = len(HEADER_PREFIX)  # the envelope's mode byte
_MODE_KEY_BYTE: Final = MODE_KEY[0]
_NAME_KINDS: Final = frozenset(b"$=+(")  # strings that can name the element after them
_LIST_KINDS: Final = frozenset(b"*~")


def _is_hash(item: Any) -> bool:
    return type(item) is list or type(item) is dict


def _is_hash_value(item: resp.Value) -> bool:
    return type(item) is resp.Aggregate and not item.null


def _text_of(value: resp.Value) -> bytes | None:
    """A string element's text, as hiredis reads it (a verbatim string without its
    format prefix); None for anything else."""
    if type(value) is resp.Blob and value.kind in _NAME_KINDS:
        return value.data[4:] if value.kind == 61 else value.data  # '=': 'txt:' first
    if type(value) is resp.Simple and value.raw[0] in _NAME_KINDS:
        return value.raw[1:-2]
    return None


class _ScriptReply:
    """What the replies of one script call go through.

    A value is opened only under the field name and key name the call and the reply's
    shape give it (see docs/security.md, "Script replies"):
    - the field name is the string element just before the value (in a flat
      field/value array) or its map key; only that name is tried. Where the shape gives
      no name (a lone value, or one after another value), the names tried are the
      declared script's fields and the literal field names of the rules covering the
      value's key (or, where that key isn't known, KEYS): never a glob, never a name
      the shape gives to something else;
    - the key name, which counts for envelopes bound to their key, is the declared
      script's hash key; else the only key in KEYS; else, for a reply that is an array
      of one element per key, KEYS[i] for everything in element i. Otherwise a
      key-bound envelope is not opened.
    A value that doesn't open follows `on_decrypt_error`. Under `require_encrypted`,
    a string the shape names as such a field that is not an envelope is refused, as
    HGET refuses it, whether or not the reply carries the header.
    """

    __slots__ = (
        "_candidates",
        "_context",
        "argv",
        "call_keys",
        "crypt",
        "db",
        "fixed_key",
        "key_rules",
        "script",
        "scripts",
        "strict",
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
        self.argv = argv
        match_key = scripts.rules.match_key
        self.key_rules = [match_key(db, key) for key in keys]
        self.fixed_key: bytes | None = None  # the key every value is of, when known
        if script is not None and 1 <= script.hash_key <= len(keys):
            self.fixed_key = keys[script.hash_key - 1]
        elif len(keys) == 1:
            self.fixed_key = keys[0]
        self.strict = any(
            rule.require_encrypted for rules in self.key_rules if rules for rule in rules.rules
        )
        self._candidates: dict[bytes | None, list[bytes]] = {}
        self._context: bytes | None = None

    def positional_keys(
        self, items: list[Any], is_hash: Callable[[Any], bool]
    ) -> list[bytes] | None:
        """KEYS, when a reply's top-level `items` read as one hash per key, as
        `{HGETALL KEYS[1], ...}` builds them: as many arrays or maps as KEYS (two or more)."""
        keys = self.call_keys
        if (
            self.fixed_key is None
            and len(keys) > 1
            and len(items) == len(keys)
            and all(map(is_hash, items))
        ):
            return keys
        return None

    def transform(self, session: Session, frame: bytes) -> bytes:
        if frame.find(HEADER_PREFIX) < 0:
            if self.strict:  # cleartext where an envelope must be: refused by shape
                self._check_tree(frame)
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
        found = self._find(frame)
        # The splice is sound only when every occurrence of the header starts a value
        # hiredis read (none inside another string, an error or a map key), and each
        # value opens one way wherever it occurs; else the lossless tree decides.
        if found is None or not found.spliceable or found.total != frame.count(HEADER_PREFIX):
            return self.through_tree(frame)
        opened: dict[bytes, bytes] = {}
        refused: list[tuple[bytes, bytes | None, bytes | None]] = []  # opened by no name
        foreign = 0  # values that only start like an envelope: not fieldcrypt's, kept as is
        cached = keyring.cached
        for stored, (name, key) in found.values.items():
            # The decrypt cache holds only what authenticated: a hit is the answer. (A
            # key-bound value under no known key is never looked up: `open` refuses it.)
            plain = (
                cached((stored, name, key or b""))
                if cached is not None
                and name is not None
                and (key is not None or stored[_MODE_AT : _MODE_AT + 1] != MODE_KEY)
                else None
            )
            if plain is None:
                plain = self.open(stored, name, key)
            if plain is None:
                plain = stored  # what `raw` gives; `error` raises below
                if keyring.owns(stored):
                    refused.append((stored, name, key))
                else:
                    foreign += 1
            opened[stored] = plain
        out, replaced = _splice(frame, opened)
        if replaced != found.total:  # a status reply or verbatim string: not a value
            return self.through_tree(frame)
        opened_count = len(found.values) - len(refused) - foreign
        crypt.counts["decrypted"] += opened_count
        for stored, name, key in refused:
            self.refuse(stored, name, key)  # logs and counts; raises under on_decrypt_error
        if not refused:
            keyring.remember_reply(frame, self.context, out, opened_count)
        return out

    def _find(self, frame: bytes) -> _Found | None:
        """The values in `frame` that carry the header, read by hiredis (None when it
        can't read the reply). Raises ReplyError for cleartext under require_encrypted."""
        reader = hiredis.Reader()
        reader.feed(frame)
        found = _Found(self)
        try:
            while (value := reader.gets()) is not False:  # an attribute comes as its own reply
                found.top(value)
        except (hiredis.ProtocolError, TypeError):
            return None
        return found

    def _check_tree(self, frame: bytes) -> None:
        """Refuse cleartext in a require_encrypted field, in a reply without the header."""
        if self._find(frame) is None:  # not something hiredis reads: the lossless tree
            self.through_tree(frame)

    def through_tree(self, frame: bytes) -> bytes:
        """The reply decoded losslessly, each bulk string that carries the header opened."""
        try:
            return self._tree(frame)
        except RecursionError:
            raise ReplyError(
                "ERR fieldcrypt: a script reply nested too deeply to check for protected values"
            ) from None

    def _tree(self, frame: bytes) -> bytes:
        value, _ = resp.decode(frame)
        if type(value) is resp.Aggregate and value.kind in _LIST_KINDS and not value.null:
            keys = self.positional_keys(value.items, _is_hash_value)
            if keys is not None:  # element i of KEYS[i]: no names across elements
                value.items = [
                    self.walk(item, None, key) for item, key in zip(value.items, keys, strict=True)
                ]
                return resp.encode_value(value)
        return resp.encode_value(self.walk(value, None, self.fixed_key))

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

    def candidates(self, key: bytes | None) -> list[bytes]:
        """The field names to try for a value whose name the reply's shape doesn't give:
        the declared ones, then the literal field names of the rules covering `key` (or,
        when the key isn't known, KEYS). A wrong guess can't pass: the name is
        authenticated with the value. Worked out once per key, when a value needs them."""
        found = self._candidates.get(key)
        if found is None:
            names: list[bytes] = []
            if self.script is not None:
                names = [self.argv[f] for f, _ in declared_positions(self.script, len(self.argv))]
            if key is None:
                covering = self.key_rules
            else:
                covering = [self.scripts.rules.match_key(self.db, key)]
            for key_rules in covering:
                for rule in key_rules.rules if key_rules is not None else ():
                    names += [f.encode() for f in rule.fields if _is_literal(f)]
            found = self._candidates[key] = list(dict.fromkeys(names))
        return found

    def rule_of(self, name: bytes, key: bytes | None) -> Rule | None:
        """The rule protecting field `name` of `key` (of some key in KEYS, when the key
        isn't known)."""
        if key is not None:
            key_rules = self.scripts.rules.match_key(self.db, key)
            return key_rules.field_rule(name) if key_rules is not None else None
        for key_rules in self.key_rules:
            rule = key_rules.field_rule(name) if key_rules is not None else None
            if rule is not None:
                return rule
        return None

    def check_cleartext(self, value: bytes, name: bytes, key: bytes | None) -> None:
        """Refuse `value`, not an envelope, as the shape's field `name`, if that field
        must be stored encrypted (the same refusal as HGET's)."""
        rule = self.rule_of(name, key)
        if rule is not None and rule.require_encrypted:
            # The name is shown only when a rule spells it out: under a glob, the element
            # before a value may be another value.
            shown = name if name in self.scripts.literal_fields else b"?"
            self.crypt.open(rule, key if key is not None else self.call_keys[0], shown, value)

    def walk(self, value: resp.Value, name: bytes | None, key: bytes | None) -> resp.Value:
        if isinstance(value, resp.Blob):
            data = value.data
            if value.kind != 36:  # '$': only bulk strings are values
                return value
            if data.startswith(HEADER_PREFIX):
                plain = self.open(data, name, key)
                if plain is None:
                    if not self.crypt.keyring.owns(data):  # only starts like one
                        if name is not None and self.strict:
                            self.check_cleartext(data, name, key)
                        return value
                    return resp.Blob(36, self.refuse(data, name, key))
                self.crypt.counts["decrypted"] += 1
                return resp.Blob(36, plain)
            if name is not None and self.strict:
                self.check_cleartext(data, name, key)
            return value
        if isinstance(value, resp.Aggregate):
            items = value.items
            if value.kind in resp.PAIR_TYPES or value.kind == resp.ATTRIBUTE:
                # Keys are names, never values; each value is named by its key only.
                for i in range(1, len(items) - (value.kind == resp.ATTRIBUTE), 2):
                    items[i] = self.walk(items[i], self.name_of(items[i - 1]), key)
                if value.kind == resp.ATTRIBUTE:
                    items[-1] = self.walk(items[-1], None, key)
                return value
            previous: bytes | None = None
            for i, item in enumerate(items):
                items[i] = self.walk(item, previous, key)
                previous = self.name_of(item)  # as stored
        return value

    def name_of(self, value: resp.Value) -> bytes | None:
        """The name an element gives the element after it: its text, unless it is no
        string or it is fieldcrypt's envelope (a value, not a name)."""
        text = _text_of(value)
        if text is None or (text.startswith(HEADER_PREFIX) and self.crypt.keyring.owns(text)):
            return None
        return text

    def open(self, stored: bytes, name: bytes | None, key: bytes | None) -> bytes | None:
        """The plaintext of `stored`, or None when it doesn't open under the name and key
        it is read under: the shape's name alone when there is one, else the candidates;
        a key-bound envelope only under a known key."""
        if stored[_MODE_AT : _MODE_AT + 1] == MODE_KEY:
            if key is None:
                return None
            bound = key
        else:
            bound = key or b""  # not part of a field-bound envelope's authentication
        keyring = self.crypt.keyring
        names = [name] if name is not None else self.candidates(key)
        cached = keyring.cached
        if cached is not None:
            for field_name in names:
                plain = cached((stored, field_name, bound))
                if plain is not None:
                    return plain
        for field_name in names:
            try:
                return keyring.decrypt(stored, field_name, bound)
            except DecryptError:
                continue
        return None

    def refuse(self, stored: bytes, name: bytes | None, key: bytes | None) -> bytes:
        """What `on_decrypt_error` makes of a value `open` could not open: the stored
        bytes under `raw`, else ReplyError. The name is shown only when a rule names that
        field literally: the element before a value in a reply may be another value."""
        if name not in self.scripts.literal_fields:
            name = None
        shown = display_name(name) if name is not None else "?"
        if key is None and stored[_MODE_AT : _MODE_AT + 1] == MODE_KEY:
            why = "it is bound to a key the call doesn't name alone; declare the script"
        else:
            why = "no key and field name fit; declare the script's fields in scripts:"
        try:
            # Through the common path: counts, logs and applies on_decrypt_error.
            return self.crypt.open(None, key or b"?", name or b"?", stored)
        except ReplyError:
            raise ReplyError(
                f"ERR fieldcrypt: cannot decrypt a value in a script reply (field '{shown}'): "
                + why
            ) from None
