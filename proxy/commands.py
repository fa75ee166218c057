"""The command table: what field encryption does to each hash command.

Each entry takes a request's arguments and answers with a `session.Forward`
(the request as it goes to Redis, and what its reply goes through), a
`session.Answer` (a refusal Redis never sees), or None (forward untouched).
Requests on keys that no rule names are left alone, so the cost of a
command on unprotected data is one rule lookup.

Field names are never encrypted: HKEYS, HEXISTS, HDEL, HLEN and the field
TTL commands need no entry.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from itertools import repeat
from operator import is_
from typing import Any

import hiredis

from proxy import resp
from proxy.crypto import HEADER_PREFIX, DecryptError, KeyRing
from proxy.loglimit import LogLimiter, suppressed_note
from proxy.rules import Glob, KeyRules, Rule, RuleSet
from proxy.session import Answer, Forward, Handler, Outcome, ReplyError, Session, Transform

log = logging.getLogger("fieldcrypt")

# Bounds of the per-key-rules memo of field names: cleared when full; long names are
# looked up every time, so a client cannot pin large buffers in memory.
_MEMO_LIMIT = 100_000
_MEMO_NAME_LENGTH = 1024


def display_name(raw: bytes) -> str:
    """A key or field name for a message: printable, never a value."""
    return raw.decode("utf-8", "backslashreplace")


class FieldCrypt:
    """Rules, key ring and policy: encrypts and decrypts one field value at a time."""

    def __init__(self, rules: RuleSet, keyring: KeyRing, on_decrypt_error: str = "error") -> None:
        self.rules = rules
        self.keyring = keyring
        self.raw_on_error = on_decrypt_error == "raw"
        # A plain dict, counted per protected value (CPython 3.11 can't specialise lookups
        # on a Counter); failures are rare and keyed by reason.
        self.counts: dict[str, int] = dict.fromkeys(("encrypted", "decrypted", "cleartext read"), 0)
        self.failures: Counter[str] = Counter()
        self._field_globs = [Glob(f.encode()) for rule in rules.rules for f in rule.fields]
        self._field_rule_memo: dict[KeyRules, dict[bytes, Rule | None]] = {}
        # Failures are for anyone who can write to Redis to cause: a few lines a minute.
        self.log_limit = LogLimiter()

    def seal(self, rule: Rule, key: bytes, field: bytes, value: bytes) -> bytes:
        """The stored form of a protected value: ciphertext, or cleartext in decrypt-only mode."""
        if self.keyring.primary is None:
            return value
        self.counts["encrypted"] += 1
        return self.keyring.encrypt(value, field, key if rule.bind_key else None)

    def open(self, rule: Rule | None, key: bytes, field: bytes, value: bytes) -> bytes:
        """The plaintext of a stored value; raises ReplyError where policy says so."""
        if not value.startswith(HEADER_PREFIX):
            if rule is not None and rule.require_encrypted:
                self.failures["cleartext refused"] += 1
                held = self.log_limit.allow((rule.key, field, "cleartext"))
                if held is not None:
                    log.warning(
                        "refused cleartext in field %r of key %r (require_encrypted)%s",
                        display_name(field),
                        display_name(key),
                        suppressed_note(held),
                    )
                raise ReplyError(
                    f"ERR fieldcrypt: field '{display_name(field)}' of key "
                    f"'{display_name(key)}' holds cleartext, but its rule requires "
                    "encryption; run MIGRATE to encrypt it"
                )
            if rule is not None:
                self.counts["cleartext read"] += 1
            return value
        try:
            plain = self.keyring.decrypt(value, field, key)
        except DecryptError as error:
            reason = error.reason
            kind = reason.split(" (", 1)[0].split(" has id", 1)[0]
            self.failures[kind] += 1
            held = self.log_limit.allow((rule.key if rule is not None else None, field, kind))
            if held is not None:
                log.warning(
                    "cannot decrypt field %r of key %r: %s%s",
                    display_name(field),
                    display_name(key),
                    reason,
                    suppressed_note(held),
                )
            if self.raw_on_error:
                return value
            hint = "; add the old key to keys:" if reason.startswith("no key in the ring") else ""
            raise ReplyError(
                f"ERR fieldcrypt: cannot decrypt field '{display_name(field)}' of key "
                f"'{display_name(key)}': {reason}{hint}"
            ) from None
        self.counts["decrypted"] += 1
        return plain

    def open_pairs(self, key_rules: KeyRules, key: bytes, pairs: list[Any]) -> None:
        """Decrypt, in place, the protected values of a flat field/value list of `key`."""
        fields = pairs[0 : len(pairs) - 1 : 2]
        values = pairs[1::2]
        self.open_values(self.field_rules(key_rules, fields), key, fields, values)
        pairs[1::2] = values

    def open_values(
        self, rules: list[Rule | None], key: bytes, fields: list[Any], values: list[Any]
    ) -> None:
        """`open` each values[i] (of fields[i] in `key`) whose rules[i] is set, in place.

        The decrypt cache is asked for every value in one pass (C-level map), so a
        reply of many fields costs a dictionary lookup per value, not a decryption."""
        cached = self.keyring.cached
        plains: list[bytes | None] | None = None
        if cached is not None:
            try:
                plains = list(map(cached, zip(values, fields, repeat(key))))
            except TypeError:  # something unhashable in the reply: no shortcut
                plains = None
        if plains is not None and None not in plains and not any(map(is_, rules, repeat(None))):
            values[:] = plains  # every value protected and in the cache: the usual read
            self.counts["decrypted"] += len(plains)
            return
        hits = 0
        try:
            for i, rule in enumerate(rules):
                if rule is None:
                    continue
                if plains is not None:
                    plain = plains[i]
                    if plain is not None:
                        values[i] = plain
                        hits += 1
                        continue
                value = values[i]
                if value is not None:
                    values[i] = self.open(rule, key, fields[i], value)
        finally:
            if hits:
                self.counts["decrypted"] += hits

    def field_rules(self, key_rules: KeyRules, fields: list[Any]) -> list[Rule | None]:
        """`key_rules.field_rule` of each field, through a memo of names already seen."""
        memo = self._field_rule_memo.get(key_rules)
        if memo is None:
            memo = self._field_rule_memo[key_rules] = {}
        try:
            if not all(map(memo.__contains__, fields)):
                for field in fields:
                    if field not in memo and len(field) <= _MEMO_NAME_LENGTH:
                        if len(memo) >= _MEMO_LIMIT:
                            memo.clear()
                        memo[field] = key_rules.field_rule(field)
            return list(map(memo.__getitem__, fields))
        except (KeyError, TypeError):  # a long or odd name, or the memo just refilled
            return [key_rules.field_rule(field) for field in fields]

    def field_is_protected(self, field: bytes) -> bool:
        """Whether some rule protects a field of this name, for any key."""
        return any(glob.matches(field) for glob in self._field_globs)


# --- Reply shapes -------------------------------------------------------------


def _decode(frame: bytes) -> Any:
    reader = hiredis.Reader()
    reader.feed(frame)
    return reader.gets()


def _null(session: Session) -> bytes:
    return b"_\r\n" if session.resp3 else b"$-1\r\n"


def _encode_flat(session: Session, items: list[Any], out: list[bytes]) -> None:
    for item in items:
        if item is None:
            out.append(_null(session))
        elif isinstance(item, list):
            out.append(b"*%d\r\n" % len(item))
            _encode_flat(session, item, out)
        else:
            out.append(b"$%d\r\n%s\r\n" % (len(item), item))


def _array(session: Session, items: list[Any]) -> bytes:
    return b"*%d\r\n%b" % (len(items), _elements(session, items))


# Bulk string headers for short lengths, each after the CRLF that ends the element
# before it: a reply's elements are then one join of (header, item) pairs, with no
# Python step per element.
_SHORT_BULK = 4096
_BULK_HEADS: tuple[bytes, ...] = tuple(b"\r\n$%d\r\n" % n for n in range(_SHORT_BULK + 1))


def _bulks(items: list[Any]) -> bytes:
    """The RESP encoding of `items`, one bulk string each, without the array header.
    Raises TypeError when an item is not bytes (a null, a nested array, a number)."""
    count = len(items)
    if not count:
        return b""
    parts: list[Any] = [b"\r\n"] * (2 * count + 1)
    try:
        parts[0 : 2 * count : 2] = map(_BULK_HEADS.__getitem__, map(len, items))
    except IndexError:  # an item longer than _SHORT_BULK
        return b"".join([b"$%d\r\n%b\r\n" % (len(item), item) for item in items])
    parts[0] = parts[0][2:]
    parts[1 : 2 * count : 2] = items
    return b"".join(parts)


def _elements(session: Session, items: list[Any]) -> bytes:
    """The RESP encoding of a flat reply's elements, without its header."""
    try:
        return _bulks(items)
    except TypeError:  # nulls or nested arrays: element by element
        out: list[bytes] = []
        _encode_flat(session, items, out)
        return b"".join(out)


_FOUR_BULKS = b"*4\r\n" + b"$%d\r\n%b\r\n" * 4


def _encode_request(args: list[bytes]) -> bytes:
    """A request as an array of bulk strings (what resp.encode_request makes, faster)."""
    if len(args) == 4:  # HSET key field value, the common write
        a, b, c, d = args
        return _FOUR_BULKS % (len(a), a, len(b), b, len(c), c, len(d), d)
    return b"*%d\r\n%b" % (len(args), _bulks(args))


def _bulk_value(frame: bytes) -> bytes | None:
    if frame[0] == 95 or frame.startswith(b"$-1"):  # '_' or $-1: null
        return None
    nl = frame.index(b"\r\n")
    return frame[nl + 2 : -2]


# --- The handlers ---------------------------------------------------------------


class Table:
    """Builds the handlers for one configuration."""

    def __init__(self, crypt: FieldCrypt) -> None:
        self.crypt = crypt
        self.rules = crypt.rules

    def handlers(self) -> dict[bytes, Handler]:
        table: dict[bytes, Handler] = {
            b"HSET": self.hset,
            b"HMSET": self.hset,
            b"HSETNX": self.hset,
            b"HSETEX": self.hsetex,
            b"HGET": self.hget,
            b"HMGET": self.hmget,
            b"HGETALL": self.hgetall,
            b"HVALS": self.hvals,
            b"HSCAN": self.hscan,
            b"HRANDFIELD": self.hrandfield,
            b"HSTRLEN": self.hstrlen,
            b"HGETDEL": self.hget_fields,
            b"HGETEX": self.hget_fields,
            b"HINCRBY": self.refuse_arithmetic,
            b"HINCRBYFLOAT": self.refuse_arithmetic,
            b"SORT": self.sort,
            b"SORT_RO": self.sort,
        }
        return table

    def _rule(self, db: int, key: bytes, field: bytes) -> Rule | None:
        key_rules = self.rules.match_key(db, key)
        return key_rules.field_rule(field) if key_rules is not None else None

    # Writes ----------------------------------------------------------------------

    def _seal_pairs(self, session: Session, args: list[bytes], start: int) -> list[bytes] | None:
        """`args` with the protected values of the field/value pairs from args[start]
        encrypted (a copy: handlers leave their arguments as they came), or None when
        none is protected."""
        key = args[1]
        key_rules = self.rules.match_key(session.db, key)
        if key_rules is None:
            return None
        field_rule = key_rules.field_rule
        seal = self.crypt.seal
        sealed: list[bytes] | None = None
        for i in range(start, len(args) - 1, 2):
            rule = field_rule(args[i])
            if rule is not None:
                if sealed is None:
                    sealed = args[:]
                sealed[i + 1] = seal(rule, key, args[i], args[i + 1])
        return sealed

    def hset(self, session: Session, args: list[bytes]) -> Outcome:
        # HSET/HMSET key field value [field value ...], HSETNX key field value
        if len(args) < 4 or len(args) % 2:
            return None  # Redis answers the arity error
        sealed = self._seal_pairs(session, args, 2)
        return None if sealed is None else Forward(_encode_request(sealed))

    def hsetex(self, session: Session, args: list[bytes]) -> Outcome:
        # HSETEX key [options] FIELDS numfields field value [field value ...]
        start = _fields_start(args)
        if start is None or len(args) < 3:
            return None
        sealed = self._seal_pairs(session, args, start)
        return None if sealed is None else Forward(_encode_request(sealed))

    def refuse_arithmetic(self, session: Session, args: list[bytes]) -> Outcome:
        if len(args) != 4:
            return None
        if self._rule(session.db, args[1], args[2]) is None:
            return None
        return Answer(
            resp.error_reply(
                f"ERR fieldcrypt: {display_name(args[0]).upper()} cannot work on field "
                f"'{display_name(args[2])}' of key '{display_name(args[1])}': "
                "it is stored encrypted"
            ),
            refusal=True,
        )

    # Reads -----------------------------------------------------------------------

    def _one_field(
        self, session: Session, args: list[bytes], reply: Callable[[bytes | None], bytes | None]
    ) -> Transform | None:
        """For `CMD key field` on a protected field: a transform that opens the stored
        value and gives it to `reply` (None for a missing field); None if unprotected."""
        found = self._protected_field(session, args)
        if found is None:
            return None
        key, field, rule = found
        crypt = self.crypt

        def transform(session: Session, frame: bytes) -> bytes:
            value = _bulk_value(frame)
            shaped = reply(None if value is None else crypt.open(rule, key, field, value))
            return frame if shaped is None else shaped

        return transform

    def _protected_field(
        self, session: Session, args: list[bytes]
    ) -> tuple[bytes, bytes, Rule] | None:
        """(key, field, rule) for `CMD key field` on a protected field, else None."""
        if len(args) != 3:
            return None
        key, field = args[1], args[2]
        rule = self._rule(session.db, key, field)
        return None if rule is None else (key, field, rule)

    def hget(self, session: Session, args: list[bytes]) -> Outcome:
        found = self._protected_field(session, args)
        if found is None:
            return None
        key, field, rule = found
        open_value = self.crypt.open

        def transform(session: Session, frame: bytes) -> bytes:
            if frame[0] == 95 or frame.startswith(b"$-1"):  # '_' or $-1: null
                return frame
            value = frame[frame.index(b"\r\n") + 2 : -2]
            plain = open_value(rule, key, field, value)
            if plain is value:  # cleartext passed through: the reply as it came
                return frame
            return b"$%d\r\n%b\r\n" % (len(plain), plain)

        return Forward(transform=transform)

    def _values_for_fields(
        self, session: Session, key: bytes, fields: list[bytes]
    ) -> Transform | None:
        """A transform for a flat array of values answering `fields` in order."""
        key_rules = self.rules.match_key(session.db, key)
        if key_rules is None:
            return None
        protected = self.crypt.field_rules(key_rules, fields)
        if not any(protected):
            return None
        crypt = self.crypt

        def transform(session: Session, frame: bytes) -> bytes:
            values = _decode(frame)
            if not isinstance(values, list) or len(values) != len(fields):
                return frame
            crypt.open_values(protected, key, fields, values)
            return _array(session, values)

        return transform

    def hmget(self, session: Session, args: list[bytes]) -> Outcome:
        if len(args) < 3:
            return None
        transform = self._values_for_fields(session, args[1], args[2:])
        return Forward(transform=transform) if transform else None

    def hget_fields(self, session: Session, args: list[bytes]) -> Outcome:
        # HGETDEL key FIELDS numfields field ...; HGETEX key [options] FIELDS numfields field ...
        start = _fields_start(args)
        if start is None:
            return None
        transform = self._values_for_fields(session, args[1], args[start:])
        return Forward(transform=transform) if transform else None

    def _open_pairs(self, key_rules: KeyRules, key: bytes, pairs: list[Any]) -> list[Any]:
        """Decrypt the values of a flat field/value list, in place, under the rules of the
        db the request was sent in (a SELECT pipelined behind it changes nothing)."""
        self.crypt.open_pairs(key_rules, key, pairs)
        return pairs

    def hgetall(self, session: Session, args: list[bytes]) -> Outcome:
        key_rules = self.rules.match_key(session.db, args[1]) if len(args) == 2 else None
        if key_rules is None:
            return None
        key = args[1]

        def transform(session: Session, frame: bytes) -> bytes:
            reply = _decode(frame)
            if type(reply) is list:
                return _array(session, self._open_pairs(key_rules, key, reply))
            if isinstance(reply, dict):  # RESP3 map
                pairs = [item for pair in reply.items() for item in pair]
                self._open_pairs(key_rules, key, pairs)
                return b"%%%d\r\n%b" % (len(reply), _elements(session, pairs))
            if isinstance(reply, list):
                return _array(session, self._open_pairs(key_rules, key, reply))
            return frame

        return Forward(transform=transform)

    def hvals(self, session: Session, args: list[bytes]) -> Outcome:
        # Values alone can't be decrypted (each is bound to its field name): ask for
        # HGETALL, which reads the same snapshot, and drop the names.
        key_rules = self.rules.match_key(session.db, args[1]) if len(args) == 2 else None
        if key_rules is None:
            return None
        key = args[1]

        def transform(session: Session, frame: bytes) -> bytes:
            reply = _decode(frame)
            if isinstance(reply, dict):
                pairs = [item for pair in reply.items() for item in pair]
            elif isinstance(reply, list):
                pairs = reply
            else:
                return frame
            return _array(session, self._open_pairs(key_rules, key, pairs)[1::2])

        return Forward(resp.encode_request([b"HGETALL", key]), transform)

    def hscan(self, session: Session, args: list[bytes]) -> Outcome:
        # HSCAN key cursor [MATCH pattern] [COUNT count] [NOVALUES]
        key_rules = self.rules.match_key(session.db, args[1]) if len(args) >= 3 else None
        if key_rules is None:
            return None
        if _hscan_novalues(args):
            return None  # field names only
        key = args[1]

        def transform(session: Session, frame: bytes) -> bytes:
            reply = _decode(frame)
            if not (isinstance(reply, list) and len(reply) == 2 and isinstance(reply[1], list)):
                return frame
            self._open_pairs(key_rules, key, reply[1])
            return _array(session, reply)

        return Forward(transform=transform)

    def hrandfield(self, session: Session, args: list[bytes]) -> Outcome:
        # HRANDFIELD key [count [WITHVALUES]]
        if len(args) != 4 or args[3].upper() != b"WITHVALUES":
            return None
        key_rules = self.rules.match_key(session.db, args[1])
        if key_rules is None:
            return None
        key = args[1]

        def transform(session: Session, frame: bytes) -> bytes:
            reply = _decode(frame)
            if not isinstance(reply, list):
                return frame
            if reply and isinstance(reply[0], list):  # RESP3: [[field, value], ...]
                for pair in reply:
                    self._open_pairs(key_rules, key, pair)
            else:
                self._open_pairs(key_rules, key, reply)
            return _array(session, reply)

        return Forward(transform=transform)

    def hstrlen(self, session: Session, args: list[bytes]) -> Outcome:
        # The stored length is the ciphertext's: read the value and measure the plaintext.
        transform = self._one_field(session, args, lambda plain: b":%d\r\n" % len(plain or b""))
        if transform is None:
            return None
        return Forward(resp.encode_request([b"HGET", args[1], args[2]]), transform)

    def sort(self, session: Session, args: list[bytes]) -> Outcome:
        # SORT key [BY pattern] [LIMIT offset count] [GET pattern ...] [ASC|DESC] [ALPHA]
        #      [STORE destination]
        options = _sort_options(args)
        if options is None:
            return None
        by, gets, store = options
        crypt = self.crypt
        sort_by = _hash_pattern(by) if by is not None else None
        if by is not None and sort_by is not None and crypt.field_is_protected(sort_by[2]):
            return Answer(
                resp.error_reply(
                    f"ERR fieldcrypt: SORT cannot sort BY '{display_name(by)}': "
                    "that field is stored encrypted"
                ),
                refusal=True,
            )
        hashed = [_hash_pattern(pattern) for pattern in gets]
        protected = [
            i
            for i, read in enumerate(hashed)
            if read is not None and crypt.field_is_protected(read[2])
        ]
        if not protected:
            return None
        if store:
            return Answer(
                resp.error_reply(
                    "ERR fieldcrypt: SORT ... STORE would copy encrypted field values into "
                    "a list; read them with SORT ... GET without STORE"
                ),
                refusal=True,
            )
        request = args
        element_column: int | None = gets.index(b"#") if b"#" in gets else None
        columns = len(gets)
        if element_column is None:  # the element names the hash: ask for it too
            request = [*args, b"GET", b"#"]
            element_column = columns
            columns += 1
        width = len(gets)
        db = session.db  # the request's: a SELECT pipelined behind it changes session.db

        def transform(session: Session, frame: bytes) -> bytes:
            rows = _decode(frame)
            if not isinstance(rows, list) or len(rows) % columns:
                return frame
            out: list[Any] = []
            for row in range(0, len(rows), columns):
                element = rows[row + element_column]
                for i in range(width):
                    value = rows[row + i]
                    read = hashed[i]
                    if i in protected and value is not None and element is not None:
                        assert read is not None
                        prefix, suffix, field = read
                        key = prefix + element + suffix
                        value = crypt.open(self._rule(db, key, field), key, field, value)
                    out.append(value)
            return _array(session, out)

        return Forward(resp.encode_request(request) if request is not args else None, transform)


def _fields_start(args: list[bytes]) -> int | None:
    """Index of the first field after `FIELDS numfields` (HSETEX, HGETEX, HGETDEL)."""
    for i in range(2, len(args) - 1):
        if args[i].upper() == b"FIELDS":
            return i + 2
    return None


def _hscan_novalues(args: list[bytes]) -> bool:
    """Whether HSCAN key cursor [MATCH pattern] [COUNT count] [NOVALUES] has NOVALUES
    as an option (a MATCH pattern may be the word too)."""
    i = 3
    while i < len(args):
        word = args[i].upper()
        if word == b"NOVALUES":
            return True
        i += 2 if word in (b"MATCH", b"COUNT") else 1
    return False


def _hash_pattern(pattern: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(key prefix, key suffix, field) of a SORT BY/GET pattern that reads a hash field,
    as Redis reads it: the key is the pattern up to `->` with its first `*` replaced by
    the element, and the `->` is the first after that `*`. None for a pattern that
    reads no hash field (no `*`, no `->` after it, or nothing after the `->`)."""
    star = pattern.find(b"*")
    if star < 0:
        return None
    arrow = pattern.find(b"->", star + 1)
    if arrow < 0 or arrow + 2 == len(pattern):
        return None
    return pattern[:star], pattern[star + 1 : arrow], pattern[arrow + 2 :]


def _sort_options(args: list[bytes]) -> tuple[bytes | None, list[bytes], bool] | None:
    """(BY pattern, GET patterns, has STORE) of a SORT request; None if it won't parse."""
    by: bytes | None = None
    gets: list[bytes] = []
    store = False
    i = 2
    try:
        while i < len(args):
            word = args[i].upper()
            if word == b"BY":
                by = args[i + 1]
                i += 2
            elif word == b"GET":
                gets.append(args[i + 1])
                i += 2
            elif word == b"LIMIT":
                i += 3
            elif word == b"STORE":
                store = True
                i += 2
            else:
                i += 1
    except IndexError:
        return None
    return by, gets, store


def build_handlers(crypt: FieldCrypt | None) -> dict[bytes, Handler]:
    if crypt is None or crypt.rules.is_empty:
        return {}
    return Table(crypt).handlers()
