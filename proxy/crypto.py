"""The envelope that keeps one hash field value encrypted, and the key ring that opens it.

Pure: no I/O beyond os.urandom for nonces and keys. The stored format is written down
byte by byte, with test vectors, in docs/format.md; change one only with the other.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import struct
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "DECRYPT_CACHE_MAX_BYTES",
    "DECRYPT_CACHE_MAX_REPLIES",
    "DECRYPT_CACHE_MAX_REPLY",
    "DECRYPT_CACHE_MAX_VALUE",
    "HEADER_PREFIX",
    "DecryptError",
    "Key",
    "KeyMaterialError",
    "KeyRing",
    "derive_key",
    "generate_key",
    "is_encrypted",
    "is_envelope",
    "is_raw_key",
    "passphrase_is_weak",
]

HEADER_PREFIX: Final = b"$fc1$"

MODE_FIELD: Final = b"f"  # bound to the field name
MODE_KEY: Final = b"k"  # bound to the field name and the key name

KEY_SIZE: Final = 32
NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16
KID_LENGTH: Final = 11  # base64url of 8 bytes, unpadded

RAW_BASE64_PREFIX: Final = "base64:"
RAW_HEX_PREFIX: Final = "hex:"
WEAK_PASSPHRASE_LENGTH: Final = 32

SCRYPT_SALT: Final = b"fieldcrypt/v1"
SCRYPT_N: Final = 2**15
SCRYPT_R: Final = 8
SCRYPT_P: Final = 1
_SCRYPT_MAXMEM: Final = 64 * 1024 * 1024  # scrypt needs 128 * r * n = 32 MiB

_KID_LABEL: Final = b"fieldcrypt/key-id/v1"

# The decrypt cache (KeyRing's decrypt_cache_entries): plaintexts longer than this are
# not cached, and the cache holds at most this many bytes of values, names and
# plaintexts all told, whatever its entry count.
DECRYPT_CACHE_MAX_VALUE: Final = 4096
DECRYPT_CACHE_MAX_BYTES: Final = 32 * 1024 * 1024
# Whole replies a caller derived from opened values (see `remember_reply`): at most
# this many, each at most this big, within the same byte bound.
DECRYPT_CACHE_MAX_REPLIES: Final = 256
DECRYPT_CACHE_MAX_REPLY: Final = 64 * 1024

REASON_UNKNOWN_KID: Final = "no key in the ring has id {kid}"
REASON_AUTHENTICATION: Final = (
    "authentication failed (wrong key, tampered value, or value moved from another field or key)"
)
REASON_MALFORMED: Final = "malformed envelope"
REASON_VERSION: Final = "unsupported format version"

_HEADER_LENGTH: Final = len(HEADER_PREFIX) + 1 + 1 + KID_LENGTH + 1  # 19
_MIN_PAYLOAD_CHARS: Final = 38  # unpadded base64 of nonce + tag = 28 bytes
_HEADER = re.compile(rb"\$fc1\$([fk])\$([A-Za-z0-9_-]{11})\$")
_MODE_OFFSET: Final = len(HEADER_PREFIX)  # 5
_KID_OFFSET: Final = _MODE_OFFSET + 2  # 7
_DOLLAR: Final = 0x24
_MODE_BYTES: Final = frozenset(MODE_FIELD + MODE_KEY)
_MODE_FIELD_BYTE: Final = MODE_FIELD[0]
_OTHER_VERSION = re.compile(rb"\$fc[0-9]+\$")
_U32 = struct.Struct(">I")
# urlsafe -> standard alphabet; characters of the standard alphabet and "=" become "*",
# which strict base64 decoding rejects.
_URLSAFE_TO_STD: Final = bytes.maketrans(b"-_+/=", b"+/***")
_STD_TO_URLSAFE: Final = bytes.maketrans(b"+/", b"-_")
_PADDING: Final = (b"", b"===", b"==", b"=")  # by len(payload) % 4
# The last character of unpadded base64 must carry no stray low bits, so that each
# stored value has exactly one spelling.
_CANONICAL_LAST: Final = {
    2: frozenset(b"AQgw"),
    3: frozenset(b"AEIMQUYcgkosw048"),
}


class KeyMaterialError(ValueError):
    """A secret or key cannot be turned into a 256-bit key. The message never holds the secret."""


class DecryptError(Exception):
    """A stored value cannot be decrypted. The message is the reason; never the value or a key."""

    reason: str
    field: bytes | None

    def __init__(self, reason: str, field: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field

    def __str__(self) -> str:
        return self.reason


def is_encrypted(value: bytes) -> bool:
    """True when the value is a version 1 envelope (by its prefix; not authenticated)."""
    return value.startswith(HEADER_PREFIX)


def is_envelope(value: bytes) -> bool:
    """True when the value is a well-formed version 1 envelope: what fieldcrypt may have
    written (not authenticated). Bytes that merely start with the prefix are not."""
    if _HEADER.match(value) is None:
        return False
    try:
        _decode_payload(value, b"")
    except DecryptError:
        return False
    return True


def is_raw_key(secret: str) -> bool:
    """True when the secret names a raw key (``base64:`` or ``hex:``), valid or not."""
    return secret.startswith((RAW_BASE64_PREFIX, RAW_HEX_PREFIX))


def passphrase_is_weak(secret: str) -> bool:
    """True for a passphrase (not a raw key) shorter than 32 characters."""
    return not is_raw_key(secret) and len(secret) < WEAK_PASSPHRASE_LENGTH


def generate_key() -> str:
    """A fresh random key, spelled as a secret: ``base64:`` and 32 random bytes."""
    return RAW_BASE64_PREFIX + base64.b64encode(os.urandom(KEY_SIZE)).decode("ascii")


def derive_key(secret: str) -> bytes:
    """The 256-bit key a secret stands for: a raw key as given, or scrypt of a passphrase.

    Slow for passphrases (scrypt, ~100 ms): derive once at start-up.
    """
    if not secret:
        raise KeyMaterialError("the secret is empty")
    if secret.startswith(RAW_BASE64_PREFIX):
        return _decode_base64_key(secret[len(RAW_BASE64_PREFIX) :])
    if secret.startswith(RAW_HEX_PREFIX):
        return _decode_hex_key(secret[len(RAW_HEX_PREFIX) :])
    try:
        passphrase = secret.encode("utf-8")
    except UnicodeEncodeError:
        # the UnicodeEncodeError itself holds the secret: do not chain it
        raise KeyMaterialError("the passphrase is not valid Unicode text") from None
    return hashlib.scrypt(
        passphrase,
        salt=SCRYPT_SALT,
        n=SCRYPT_N,
        r=SCRYPT_R,
        p=SCRYPT_P,
        maxmem=_SCRYPT_MAXMEM,
        dklen=KEY_SIZE,
    )


def _decode_base64_key(text: str) -> bytes:
    try:
        key = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise KeyMaterialError(
            "the text after 'base64:' is not valid standard base64; "
            "generate a key with 'fieldcrypt keygen'"
        ) from None
    if len(key) != KEY_SIZE:
        raise KeyMaterialError(
            f"a 'base64:' key must decode to exactly {KEY_SIZE} bytes, not {len(key)}"
        )
    return key


def _decode_hex_key(text: str) -> bytes:
    if len(text) != 2 * KEY_SIZE:
        raise KeyMaterialError(
            f"a 'hex:' key must be exactly {2 * KEY_SIZE} hex digits, not {len(text)} characters"
        )
    if not all(c in "0123456789abcdefABCDEF" for c in text):
        raise KeyMaterialError("the text after 'hex:' holds a character that is not a hex digit")
    return bytes.fromhex(text)


def _key_id(key: bytes) -> str:
    digest = hmac.new(key, _KID_LABEL, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:8]).rstrip(b"=").decode("ascii")


class Key:
    """One 256-bit key, known by its key id. Read-only; its repr never shows key bytes."""

    __slots__ = ("_aead", "_decrypt_only", "_header_field", "_header_key", "_kid")

    _aead: AESGCM
    _decrypt_only: bool
    _header_field: bytes
    _header_key: bytes
    _kid: str

    def __init__(self, key: bytes, decrypt_only: bool = False) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_SIZE:
            raise KeyMaterialError(f"a key must be exactly {KEY_SIZE} bytes")
        self._aead = AESGCM(key)
        self._decrypt_only = bool(decrypt_only)
        self._kid = _key_id(key)
        kid = self._kid.encode("ascii")
        self._header_field = HEADER_PREFIX + MODE_FIELD + b"$" + kid + b"$"
        self._header_key = HEADER_PREFIX + MODE_KEY + b"$" + kid + b"$"

    @classmethod
    def from_bytes(cls, key: bytes, decrypt_only: bool = False) -> Key:
        return cls(key, decrypt_only)

    @classmethod
    def from_secret(cls, secret: str, decrypt_only: bool = False) -> Key:
        """The key a configured secret stands for (see derive_key; slow for passphrases)."""
        return cls(derive_key(secret), decrypt_only)

    @property
    def kid(self) -> str:
        return self._kid

    @property
    def decrypt_only(self) -> bool:
        return self._decrypt_only

    def __repr__(self) -> str:
        return f"Key(kid={self._kid!r}, decrypt_only={self._decrypt_only!r})"


class KeyRing:
    """Keys that decrypt, the first non-decrypt-only one of which (the primary) encrypts.

    With ``decrypt_cache_entries`` above 0 it remembers the plaintexts of up to that
    many envelopes it has opened (see `decrypt`), and a few whole replies made of them
    (see `remember_reply`); the cache lives and dies with the ring, so a ring built
    without a key never answers from what that key opened.
    """

    __slots__ = (
        "_by_kid",
        "_cache",
        "_cache_bytes",
        "_cache_entries",
        "_replies",
        "cached",
        "keys",
        "primary",
        "recall_reply",
    )

    keys: tuple[Key, ...]
    primary: Key | None
    cached: Callable[[tuple[bytes, bytes, bytes]], bytes | None] | None
    """The decrypt cache's lookup, for loops over many values (None when it is off):
    given (stored value, field, key name), the plaintext `decrypt` returned for them
    before, or None. Only values that AES-GCM authenticated are ever in it."""
    recall_reply: Callable[[tuple[bytes, bytes]], tuple[bytes, int] | None] | None
    """Given (reply as stored, context), what `remember_reply` was given for them: the
    reply with its values opened, and how many were (None when the cache is off)."""

    def __init__(self, keys: Sequence[Key], decrypt_cache_entries: int = 0) -> None:
        self.keys = tuple(keys)
        if not self.keys:
            raise ValueError("a key ring needs at least one key")
        if decrypt_cache_entries < 0:
            raise ValueError("decrypt_cache_entries must be 0 (off) or more")
        self._by_kid: dict[bytes, Key] = {}
        for position, key in enumerate(self.keys):
            kid = key.kid.encode("ascii")
            if kid in self._by_kid:
                first = self.keys.index(self._by_kid[kid])
                raise ValueError(
                    f"two entries hold the same key (id {key.kid}, "
                    f"entries {first} and {position}); remove one"
                )
            self._by_kid[kid] = key
        self.primary = next((key for key in self.keys if not key.decrypt_only), None)
        # (stored value, field, key name) -> plaintext, oldest first. The stored value
        # holds the header (mode and key id), nonce, ciphertext and tag, so the triple
        # fixes the key and everything the associated data is made of: a hit returns
        # exactly what a fresh decrypt of the same bytes returns.
        self._cache: OrderedDict[tuple[bytes, bytes, bytes], bytes] | None = (
            OrderedDict() if decrypt_cache_entries else None
        )
        self._cache_entries = decrypt_cache_entries
        self.cached = self._cache.get if self._cache is not None else None
        # (reply as stored, context) -> (the reply opened, values opened), oldest first.
        self._replies: OrderedDict[tuple[bytes, bytes], tuple[bytes, int]] | None = (
            OrderedDict() if decrypt_cache_entries else None
        )
        self.recall_reply = self._replies.get if self._replies is not None else None
        self._cache_bytes = 0

    def __repr__(self) -> str:
        return f"KeyRing({list(self.keys)!r})"

    @property
    def decrypt_cache_entries(self) -> int:
        """The decrypt cache's bound on entries; 0 when it is off."""
        return self._cache_entries

    def cached_count(self) -> int:
        """How many plaintexts the decrypt cache holds now."""
        return 0 if self._cache is None else len(self._cache)

    def remember_reply(self, stored: bytes, context: bytes, opened: bytes, count: int) -> None:
        """Keep `opened`, a reply made from `stored` by replacing `count` values with
        what `decrypt` returned for them, so that the same bytes in the same context
        (everything else the result depends on, such as the key names that opened
        them) give it again without a parse. The caller remembers only replies whose
        every value authenticated. Bounded like the values: at most
        DECRYPT_CACHE_MAX_REPLIES of them, none over DECRYPT_CACHE_MAX_REPLY bytes,
        within DECRYPT_CACHE_MAX_BYTES in all."""
        replies = self._replies
        if replies is None or len(stored) > DECRYPT_CACHE_MAX_REPLY:
            return
        cache_key = (stored, context)
        if cache_key in replies:
            return
        replies[cache_key] = (opened, count)
        self._cache_bytes += len(stored) + len(context) + len(opened)
        self._trim()

    def encrypt(self, plaintext: bytes, field: bytes, key: bytes | None = None) -> bytes:
        """Seal a value of hash ``field`` under the primary key; with ``key`` (the Redis
        key name) the value is bound to it too (mode k)."""
        return self._encrypt_with_nonce(plaintext, field, key, os.urandom(NONCE_SIZE))

    def _encrypt_with_nonce(
        self, plaintext: bytes, field: bytes, key: bytes | None, nonce: bytes
    ) -> bytes:
        # Called directly by tests and the documented vectors only: a nonce must never
        # repeat under a key.
        primary = self.primary
        if primary is None:
            raise RuntimeError(
                "the key ring cannot encrypt: every key is decrypt_only; "
                "add a key that is not decrypt_only"
            )
        if key is None:
            header = primary._header_field
            aad = header + _U32.pack(len(field)) + field
        else:
            header = primary._header_key
            aad = header + _U32.pack(len(field)) + field + _U32.pack(len(key)) + key
        sealed = primary._aead.encrypt(nonce, plaintext, aad)
        encoded = binascii.b2a_base64(nonce + sealed, newline=False)
        return header + encoded.translate(_STD_TO_URLSAFE).rstrip(b"=")

    def decrypt(self, value: bytes, field: bytes, key: bytes) -> bytes:
        """Open a stored value of hash ``field`` in Redis key ``key`` (the key name counts
        only for mode k envelopes). Raises DecryptError.

        With the decrypt cache on, a value this ring has opened before for the same
        field and key name is answered from the cache; a value enters it only once
        AES-GCM has authenticated it, and failures are never cached."""
        cache = self._cache
        if cache is not None:
            cache_key = (value, field, key)
            try:
                plain = cache.get(cache_key)
            except TypeError:  # a bytearray or memoryview: not hashable, not cached
                cache = None
            else:
                if plain is not None:
                    return plain
        # The common case by hand; anything unusual goes to _open_checked for its reason.
        ring_key = (
            self._by_kid.get(value[_KID_OFFSET : _HEADER_LENGTH - 1])
            if len(value) > _HEADER_LENGTH
            and value[_HEADER_LENGTH - 1] == _DOLLAR
            and value[_MODE_OFFSET + 1] == _DOLLAR
            and value[_MODE_OFFSET] in _MODE_BYTES
            and value.startswith(HEADER_PREFIX)
            else None
        )
        if ring_key is None:
            ring_key = self._open_checked(value, field)
        sealed = _decode_payload(value, field)
        if value[_MODE_OFFSET] == _MODE_FIELD_BYTE:
            aad = b"%b%b%b" % (value[:_HEADER_LENGTH], _U32.pack(len(field)), field)
        else:
            aad = b"%b%b%b%b%b" % (
                value[:_HEADER_LENGTH],
                _U32.pack(len(field)),
                field,
                _U32.pack(len(key)),
                key,
            )
        view = memoryview(sealed)
        try:
            plain = ring_key._aead.decrypt(view[:NONCE_SIZE], view[NONCE_SIZE:], aad)
        except InvalidTag:
            raise DecryptError(REASON_AUTHENTICATION, field) from None
        if cache is not None and len(plain) <= DECRYPT_CACHE_MAX_VALUE:
            self._remember(cache_key, plain)
        return plain

    def _open_checked(self, value: bytes, field: bytes) -> Key:
        """The ring key for an envelope's header; raises DecryptError saying what is wrong."""
        header = _HEADER.match(value)
        if header is None:
            if _OTHER_VERSION.match(value) and not value.startswith(HEADER_PREFIX):
                raise DecryptError(REASON_VERSION, field)
            raise DecryptError(REASON_MALFORMED, field)
        kid = header.group(2)
        ring_key = self._by_kid.get(kid)
        if ring_key is None:
            raise DecryptError(REASON_UNKNOWN_KID.format(kid=kid.decode("ascii")), field)
        return ring_key

    def _remember(self, cache_key: tuple[bytes, bytes, bytes], plain: bytes) -> None:
        cache = self._cache
        assert cache is not None
        value, field, key = cache_key
        self._cache_bytes += len(value) + len(field) + len(key) + len(plain)
        cache[cache_key] = plain
        self._trim()

    def _trim(self) -> None:
        """Evict, oldest first, until the bounds hold; whole replies go first."""
        cache, replies = self._cache, self._replies
        assert cache is not None and replies is not None
        while replies and (
            len(replies) > DECRYPT_CACHE_MAX_REPLIES or self._cache_bytes > DECRYPT_CACHE_MAX_BYTES
        ):
            (old_stored, old_context), (old_opened, _) = replies.popitem(last=False)
            self._cache_bytes -= len(old_stored) + len(old_context) + len(old_opened)
        while len(cache) > self._cache_entries or self._cache_bytes > DECRYPT_CACHE_MAX_BYTES:
            (old_value, old_field, old_key), old_plain = cache.popitem(last=False)
            self._cache_bytes -= len(old_value) + len(old_field) + len(old_key) + len(old_plain)

    @staticmethod
    def kid_of(value: bytes) -> str | None:
        """The key id in an envelope's header; None when the value is not an envelope."""
        header = _HEADER.match(value)
        return None if header is None else header.group(2).decode("ascii")

    def owns(self, value: bytes) -> bool:
        """Whether the value is fieldcrypt's to open or to report: a version 1 header
        naming a key of this ring (damaged or not), or a whole well-formed envelope (of
        a key the ring lacks). Bytes that only start with the prefix are neither."""
        if (  # the usual answer by slices: a header naming a key of this ring
            value[_KID_OFFSET : _HEADER_LENGTH - 1] in self._by_kid
            and value[_HEADER_LENGTH - 1 : _HEADER_LENGTH] == b"$"
            and value[_MODE_OFFSET + 1 : _MODE_OFFSET + 2] == b"$"
            and value[_MODE_OFFSET : _MODE_OFFSET + 1] in (MODE_FIELD, MODE_KEY)
            and value.startswith(HEADER_PREFIX)
        ):
            return True
        return _HEADER.match(value) is not None and is_envelope(value)  # of a key it lacks

    def needs_rotation(self, value: bytes) -> bool:
        """True for an envelope sealed under a key other than the primary (not for
        plaintext, and never in decrypt-only mode)."""
        kid = self.kid_of(value)
        return kid is not None and self.primary is not None and kid != self.primary.kid


def _decode_payload(value: bytes, field: bytes) -> bytes:
    payload = value[_HEADER_LENGTH:]
    tail = len(payload) % 4
    if len(payload) < _MIN_PAYLOAD_CHARS or tail == 1:
        raise DecryptError(REASON_MALFORMED, field)
    if tail and payload[-1] not in _CANONICAL_LAST[tail]:
        raise DecryptError(REASON_MALFORMED, field)
    padded = payload.translate(_URLSAFE_TO_STD) + _PADDING[tail]
    try:
        return binascii.a2b_base64(padded, strict_mode=True)
    except binascii.Error:
        raise DecryptError(REASON_MALFORMED, field) from None
