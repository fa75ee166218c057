"""Which hash fields of which keys are protected: Redis globs and the rule table.

Pure: no I/O. `RuleSet.match_key` runs once per hash command on the proxy's hot
path, so literal keys and fields are dict lookups, globs are compiled once and
answers are cached.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "Glob",
    "GlobError",
    "KeyRules",
    "Rule",
    "RuleSet",
    "glob_to_regex",
]

_STAR = 0x2A  # *
_QUESTION = 0x3F  # ?
_OPEN = 0x5B  # [
_CLOSE = 0x5D  # ]
_CARET = 0x5E  # ^
_DASH = 0x2D  # -
_BACKSLASH = 0x5C  # \\

# Bounds for the answer caches: cleared wholesale when full, and long names are
# not cached at all so a client cannot pin large buffers in memory.
_CACHE_LIMIT = 100_000
_CACHEABLE_LENGTH = 1024


class GlobError(ValueError):
    """A pattern that is not a valid Redis glob; the message says what is wrong."""


# A token matches exactly one byte (a regex fragment, plus the byte itself when
# it is a literal), or is None for `*`.
_Token = tuple[bytes, int | None] | None


def _class_regex(ranges: list[tuple[int, int]], negate: bool) -> bytes:
    if not ranges:
        # `[]` matches nothing and `[^]` matches any byte, as in Redis.
        return b"." if negate else b"(?!)"
    parts = b"".join(
        b"\\x%02x" % lo if lo == hi else b"\\x%02x-\\x%02x" % (lo, hi) for lo, hi in ranges
    )
    return b"[" + (b"^" if negate else b"") + parts + b"]"


def _tokenize(pattern: bytes) -> list[_Token]:
    """Split a glob into one-byte matchers and stars, following Redis's stringmatchlen."""
    tokens: list[_Token] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == _STAR:
            if not tokens or tokens[-1] is not None:
                tokens.append(None)
        elif c == _QUESTION:
            tokens.append((b".", None))
        elif c == _OPEN:
            start = i
            i += 1
            negate = i < n and pattern[i] == _CARET
            if negate:
                i += 1
            ranges: list[tuple[int, int]] = []
            while True:
                remaining = n - i
                if remaining == 0:
                    raise GlobError(
                        f"the '[' at position {start} is never closed; "
                        "add ']' or write '\\[' for a literal bracket"
                    )
                c = pattern[i]
                if c == _BACKSLASH and remaining >= 2:
                    i += 1
                    ranges.append((pattern[i], pattern[i]))
                elif c == _CLOSE:
                    break
                elif remaining >= 3 and pattern[i + 1] == _DASH:
                    lo, hi = sorted((c, pattern[i + 2]))
                    ranges.append((lo, hi))
                    i += 2
                else:
                    ranges.append((c, c))
                i += 1
            tokens.append((_class_regex(ranges, negate), None))
        elif c == _BACKSLASH:
            if i + 1 >= n:
                raise GlobError("the pattern ends with a lone '\\'; write '\\\\' for a backslash")
            i += 1
            tokens.append((re.escape(pattern[i : i + 1]), pattern[i]))
        else:
            tokens.append((re.escape(pattern[i : i + 1]), c))
        i += 1
    return tokens


def _join(tokens: Iterable[_Token]) -> bytes:
    return b"".join(b".*" if t is None else t[0] for t in tokens)


def glob_to_regex(pattern: bytes) -> re.Pattern[bytes]:
    """Compile a Redis glob (as in KEYS and SCAN MATCH) into a regex; use `.fullmatch`.

    Supports `*`, `?`, `[abc]`, `[^abc]`, `[a-z]` and backslash escapes, case-sensitive.
    Raises GlobError for an unterminated `[` or a trailing backslash, which Redis would
    silently read some other way.
    """
    return re.compile(_join(_tokenize(pattern)), re.DOTALL)


class Glob:
    """A compiled glob that matches whole byte strings without runaway backtracking.

    Literal patterns compare bytes; patterns with at most one `*` use one regex; patterns
    with more stars match their star-free segments leftmost-first, which is linear in
    the subject per segment (the same cure Redis applied for CVE-2022-36021).
    """

    __slots__ = ("_head", "_literal", "_middles", "_regex", "_tail", "_tail_len", "pattern")

    def __init__(self, pattern: bytes) -> None:
        self.pattern = pattern
        tokens = _tokenize(pattern)
        self._literal: bytes | None = None
        self._regex: re.Pattern[bytes] | None = None
        self._head: re.Pattern[bytes] | None = None
        self._tail: re.Pattern[bytes] | None = None
        self._tail_len = 0
        self._middles: tuple[re.Pattern[bytes], ...] = ()
        literal = [t[1] for t in tokens if t is not None]
        if len(literal) == len(tokens) and all(b is not None for b in literal):
            self._literal = bytes(b for b in literal if b is not None)
            return
        stars = tokens.count(None)
        if stars <= 1:
            self._regex = re.compile(_join(tokens), re.DOTALL)
            return
        segments: list[list[_Token]] = [[]]
        for token in tokens:
            if token is None:
                segments.append([])
            else:
                segments[-1].append(token)
        head, *middles, tail = segments
        self._head = re.compile(_join(head), re.DOTALL)
        self._tail = re.compile(_join(tail), re.DOTALL)
        self._tail_len = len(tail)
        self._middles = tuple(re.compile(_join(m), re.DOTALL) for m in middles)

    @property
    def literal(self) -> bytes | None:
        """The exact bytes matched when the pattern has no wildcards, else None."""
        return self._literal

    def matches(self, subject: bytes) -> bool:
        if self._literal is not None:
            return subject == self._literal
        if self._regex is not None:
            return self._regex.fullmatch(subject) is not None
        assert self._head is not None and self._tail is not None
        head = self._head.match(subject)
        if head is None:
            return False
        position = head.end()
        tail_start = len(subject) - self._tail_len
        if tail_start < position or self._tail.fullmatch(subject, tail_start) is None:
            return False
        for middle in self._middles:
            found = middle.search(subject, position, tail_start)
            if found is None:
                return False
            position = found.end()
        return True

    def __repr__(self) -> str:
        return f"Glob({self.pattern!r})"


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Rule:
    """Fields of matching keys that the proxy keeps encrypted.

    `key` and each of `fields` are Redis globs. `db` limits the rule to one logical
    database (None: every database). `require_encrypted` refuses to hand back a value
    that is stored in plaintext; `refuse_scripts` refuses EVAL/FCALL naming such a key in
    KEYS; `bind_key` ties each ciphertext to its key name, so a
    value copied to another key will not decrypt.
    """

    key: str
    fields: tuple[str, ...]
    db: int | None = None
    require_encrypted: bool = False
    bind_key: bool = False
    refuse_scripts: bool = False
    line: int | None = field(default=None, compare=False)


_MISSING = object()


class KeyRules:
    """The rules that apply to one key, in config order; asks which one covers a field."""

    __slots__ = ("_cache", "_globs", "_literals", "rules")

    def __init__(self, rules: tuple[Rule, ...], globs: dict[str, Glob]) -> None:
        self.rules = rules
        self._literals: dict[bytes, tuple[int, Rule]] = {}
        self._globs: list[tuple[int, Glob, Rule]] = []
        for order, rule in enumerate(rules):
            for name in rule.fields:
                glob = globs[name]
                if glob.literal is not None:
                    self._literals.setdefault(glob.literal, (order, rule))
                else:
                    self._globs.append((order, glob, rule))
        self._cache: dict[bytes, Rule | None] = {}

    def field_rule(self, field: bytes) -> Rule | None:
        """The first rule, in config order, one of whose field patterns matches `field`."""
        cached = self._cache.get(field, _MISSING)
        if cached is not _MISSING:
            return cached  # type: ignore[return-value]
        best_order, best = self._literals.get(field, (len(self.rules), None))
        for order, glob, rule in self._globs:
            if order >= best_order:
                break
            if glob.matches(field):
                best = rule
                break
        if len(field) <= _CACHEABLE_LENGTH:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[field] = best
        return best

    def __repr__(self) -> str:
        return f"KeyRules({[r.key for r in self.rules]!r})"


class RuleSet:
    """The configured rules, in order; the first rule matching a key and field wins."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self._globs: dict[str, Glob] = {}
        for index, rule in enumerate(self.rules):
            for pattern in (rule.key, *rule.fields):
                if pattern not in self._globs:
                    try:
                        self._globs[pattern] = Glob(_encode(pattern))
                    except GlobError as exc:
                        raise GlobError(f"rules[{index}]: pattern {pattern!r}: {exc}") from None
        self._literal_keys: dict[bytes, list[int]] = {}
        self._glob_keys: list[tuple[int, Glob]] = []
        for index, rule in enumerate(self.rules):
            glob = self._globs[rule.key]
            if glob.literal is not None:
                self._literal_keys.setdefault(glob.literal, []).append(index)
            else:
                self._glob_keys.append((index, glob))
        self._by_indices: dict[tuple[int, ...], KeyRules] = {}
        self._cache: dict[tuple[int, bytes], KeyRules | None] = {}

    @property
    def is_empty(self) -> bool:
        return not self.rules

    def match_key(self, db: int, key: bytes) -> KeyRules | None:
        """The rules covering `key` in database `db`, or None when no rule names the key."""
        cache_key = (db, key)
        cached = self._cache.get(cache_key, _MISSING)
        if cached is not _MISSING:
            return cached  # type: ignore[return-value]
        rules = self.rules
        indices = [
            i for i in self._literal_keys.get(key, ()) if rules[i].db is None or rules[i].db == db
        ]
        for index, glob in self._glob_keys:
            rule_db = rules[index].db
            if (rule_db is None or rule_db == db) and glob.matches(key):
                indices.append(index)
        result: KeyRules | None = None
        if indices:
            indices.sort()
            chosen = tuple(indices)
            result = self._by_indices.get(chosen)
            if result is None:
                result = KeyRules(tuple(rules[i] for i in chosen), self._globs)
                self._by_indices[chosen] = result
        if len(key) <= _CACHEABLE_LENGTH:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[cache_key] = result
        return result

    def protected_key_globs(self, db: int | None = None) -> tuple[str, ...]:
        """Key patterns of the rules (for SCAN MATCH), without repeats, in config order.

        With `db`, only the rules that apply in that database.
        """
        seen: dict[str, None] = {}
        for rule in self.rules:
            if db is None or rule.db is None or rule.db == db:
                seen.setdefault(rule.key, None)
        return tuple(seen)

    def __len__(self) -> int:
        return len(self.rules)

    def __repr__(self) -> str:
        return f"RuleSet({list(self.rules)!r})"
