"""The envelope format, the key ring, and keys from secrets (proxy/crypto.py, docs/format.md)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import re
import string
import struct
import traceback
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.crypto import (
    HEADER_PREFIX,
    DecryptError,
    Key,
    KeyMaterialError,
    KeyRing,
    derive_key,
    generate_key,
    is_encrypted,
    is_envelope,
    is_raw_key,
    passphrase_is_weak,
)

FORMAT_DOC = Path(__file__).resolve().parent.parent / "docs" / "format.md"

AUTH_FAILED = (
    "authentication failed (wrong key, tampered value, or value moved from another field or key)"
)
MALFORMED = "malformed envelope"
UNSUPPORTED = "unsupported format version"
BASE64URL = set(string.ascii_letters + string.digits + "-_")

KEY_A = hashlib.sha256(b"test key A").digest()
KEY_B = hashlib.sha256(b"test key B").digest()
KEY_C = hashlib.sha256(b"test key C").digest()


def ring_of(*keys: bytes) -> KeyRing:
    return KeyRing([Key.from_bytes(key) for key in keys])


def decrypt_reason(ring: KeyRing, value: bytes, field: bytes, key: bytes) -> str:
    with pytest.raises(DecryptError) as caught:
        ring.decrypt(value, field, key)
    assert caught.value.reason == str(caught.value)
    return caught.value.reason


def with_payload(value: bytes, payload: bytes) -> bytes:
    return value[:19] + payload


def encode_payload(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def decode_payload(payload: bytes) -> bytes:
    return base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4))


# --- test vectors in docs/format.md -------------------------------------------------


def load_vectors() -> list[dict[str, Any]]:
    text = FORMAT_DOC.read_text(encoding="utf-8")
    section = text.split("\n## Test vectors\n", 1)[1]
    block = re.search(r"```json\n(.*?)\n```", section, re.DOTALL)
    assert block is not None, "docs/format.md has no json block under 'Test vectors'"
    vectors: list[dict[str, Any]] = json.loads(block.group(1))
    return vectors


VECTORS = load_vectors()


def independent_derive_key(secret: str) -> bytes:
    """docs/format.md, "Keys from secrets", without proxy.crypto."""
    if secret.startswith("base64:"):
        key = base64.b64decode(secret[len("base64:") :], validate=True)
    elif secret.startswith("hex:"):
        key = bytes.fromhex(secret[len("hex:") :])
    else:
        key = hashlib.scrypt(
            secret.encode("utf-8"),
            salt=b"fieldcrypt/v1",
            n=2**15,
            r=8,
            p=1,
            dklen=32,
            maxmem=64 * 1024 * 1024,
        )
    assert len(key) == 32
    return key


def independent_decrypt(stored: bytes, key: bytes, field: bytes, key_name: bytes) -> bytes:
    """docs/format.md, "Stored value" and "Associated data", without proxy.crypto."""
    header, payload = stored[:19], stored[19:]
    assert header[:5] == b"$fc1$" and header[6:7] == b"$" and header[18:19] == b"$"
    mode, kid = header[5:6], header[7:18]
    expected_kid = hmac.new(key, b"fieldcrypt/key-id/v1", hashlib.sha256).digest()[:8]
    assert kid == base64.urlsafe_b64encode(expected_kid).rstrip(b"=")
    raw = base64.urlsafe_b64decode(payload + b"=" * (-len(payload) % 4))
    nonce, sealed = raw[:12], raw[12:]
    aad = header + struct.pack(">I", len(field)) + field
    if mode == b"k":
        aad += struct.pack(">I", len(key_name)) + key_name
    else:
        assert mode == b"f"
    return AESGCM(key).decrypt(nonce, sealed, aad)


def test_docs_vectors_cover_a_passphrase_a_base64_key_and_mode_k() -> None:
    assert len(VECTORS) >= 3
    assert any(not is_raw_key(v["secret"]) for v in VECTORS)
    assert any(v["secret"].startswith("base64:") for v in VECTORS)
    assert any(v["mode"] == "k" for v in VECTORS)


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{v['mode']}-{v['field']}")
def test_docs_vector_is_reproduced_by_the_code(vector: dict[str, Any]) -> None:
    key_bytes = derive_key(vector["secret"])
    assert key_bytes.hex() == vector["key_hex"]
    key = Key.from_bytes(key_bytes)
    assert key.kid == vector["kid"]
    ring = KeyRing([key])
    field = vector["field"].encode()
    key_name = None if vector["key_name"] is None else vector["key_name"].encode()
    assert (vector["mode"] == "k") == (key_name is not None)
    plaintext = vector["plaintext"].encode()

    stored = ring._encrypt_with_nonce(
        plaintext, field, key_name, bytes.fromhex(vector["nonce_hex"])
    )

    assert stored == vector["stored"].encode("ascii")
    assert ring.decrypt(stored, field, key_name or b"any:key") == plaintext
    assert KeyRing.kid_of(stored) == vector["kid"]


@pytest.mark.parametrize("vector", VECTORS, ids=lambda v: f"{v['mode']}-{v['field']}")
def test_docs_vector_opens_with_an_independent_decoder(vector: dict[str, Any]) -> None:
    key = independent_derive_key(vector["secret"])
    assert key.hex() == vector["key_hex"]
    stored = vector["stored"].encode("ascii")
    assert stored[5:6] == vector["mode"].encode()
    assert stored[19:31] == encode_payload(bytes.fromhex(vector["nonce_hex"]))[:12]
    key_name = (vector["key_name"] or "").encode()

    plaintext = independent_decrypt(stored, key, vector["field"].encode(), key_name)

    assert plaintext == vector["plaintext"].encode()


# --- round trips ---------------------------------------------------------------------


def _seeded_bytes(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


plaintexts = st.one_of(
    st.binary(max_size=1 << 20),
    st.binary(max_size=256).map(lambda tail: HEADER_PREFIX + tail),
    st.builds(_seeded_bytes, st.integers(0, 1 << 20), st.integers(0, 2**32)),
)
names = st.binary(max_size=64)


@settings(deadline=None)
@given(plaintext=plaintexts, field=names, key_name=st.none() | names)
@example(plaintext=b"", field=b"", key_name=None)
@example(plaintext=b"", field=b"", key_name=b"")
@example(plaintext=bytes(1 << 20), field=b"big", key_name=None)
@example(plaintext=_seeded_bytes(1 << 20, 1), field=b"big", key_name=b"user:1")
@example(plaintext=_seeded_bytes((1 << 20) - 1, 2), field=b"big", key_name=None)
@example(plaintext=b"$fc1$f$Op0WflhDMWw$AAECAwQFBgcICQoL", field=b"f", key_name=b"k")
def test_round_trip_in_both_modes(plaintext: bytes, field: bytes, key_name: bytes | None) -> None:
    ring = ring_of(KEY_A)

    stored = ring.encrypt(plaintext, field, key_name)

    assert is_encrypted(stored) and is_envelope(stored)
    assert stored[5:6] == (b"f" if key_name is None else b"k")
    assert set(stored[19:].decode("ascii")) <= BASE64URL
    assert len(stored) == 19 + -(-4 * (28 + len(plaintext)) // 3)
    assert ring.decrypt(stored, field, key_name if key_name is not None else b"ignored") == (
        plaintext
    )


def test_stored_value_is_printable_ascii_header_then_base64url() -> None:
    stored = ring_of(KEY_A).encrypt(b"secret value", b"password", b"user:1")

    assert re.fullmatch(rb"\$fc1\$k\$[A-Za-z0-9_-]{11}\$[A-Za-z0-9_-]+", stored)
    assert stored[7:18].decode() == Key.from_bytes(KEY_A).kid


def test_same_plaintext_encrypts_to_different_values() -> None:
    ring = ring_of(KEY_A)

    assert ring.encrypt(b"same", b"f") != ring.encrypt(b"same", b"f")


def test_mode_f_value_decrypts_under_any_key_name() -> None:
    ring = ring_of(KEY_A)
    stored = ring.encrypt(b"token", b"oauth2")

    assert ring.decrypt(stored, b"oauth2", b"user:1") == b"token"
    assert ring.decrypt(stored, b"oauth2", b"user:2") == b"token"


def test_encrypting_an_envelope_wraps_it_again() -> None:
    ring = ring_of(KEY_A)
    inner = ring.encrypt(b"x", b"f")

    outer = ring.encrypt(inner, b"f")

    assert ring.decrypt(outer, b"f", b"k") == inner


# --- rotation ------------------------------------------------------------------------


def test_new_key_first_encrypts_with_new_and_decrypts_old() -> None:
    old_value = ring_of(KEY_A).encrypt(b"v", b"f", b"k")
    ring = ring_of(KEY_B, KEY_A)

    new_value = ring.encrypt(b"v", b"f", b"k")

    assert ring.decrypt(old_value, b"f", b"k") == b"v"
    assert KeyRing.kid_of(new_value) == Key.from_bytes(KEY_B).kid
    assert ring.needs_rotation(old_value)
    assert not ring.needs_rotation(new_value)
    assert not ring.needs_rotation(b"plain value")


def test_ring_without_the_old_key_names_the_missing_key_id() -> None:
    old_value = ring_of(KEY_A).encrypt(b"v", b"f")
    old_kid = Key.from_bytes(KEY_A).kid

    reason = decrypt_reason(ring_of(KEY_B), old_value, b"f", b"k")

    assert reason == f"no key in the ring has id {old_kid}"


def test_primary_is_the_first_key_that_is_not_decrypt_only() -> None:
    old = Key.from_bytes(KEY_A, decrypt_only=True)
    new = Key.from_bytes(KEY_B)
    ring = KeyRing([old, new])

    assert ring.primary is new
    assert ring.keys == (old, new)
    assert KeyRing.kid_of(ring.encrypt(b"v", b"f")) == new.kid


def test_ring_of_decrypt_only_keys_decrypts_but_refuses_to_encrypt() -> None:
    value = ring_of(KEY_A).encrypt(b"v", b"f")
    ring = KeyRing([Key.from_bytes(KEY_A, decrypt_only=True)])

    assert ring.primary is None
    assert ring.decrypt(value, b"f", b"k") == b"v"
    assert not ring.needs_rotation(value)
    with pytest.raises(RuntimeError, match="decrypt_only"):
        ring.encrypt(b"v", b"f")


def test_two_entries_with_the_same_key_are_rejected() -> None:
    with pytest.raises(ValueError, match="two entries hold the same key"):
        KeyRing([Key.from_bytes(KEY_A), Key.from_bytes(KEY_B), Key.from_bytes(KEY_A, True)])


def test_empty_ring_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        KeyRing([])


# --- tampering -----------------------------------------------------------------------


@given(data=st.data(), plaintext=st.binary(max_size=100))
def test_any_flipped_bit_in_the_payload_fails_authentication(
    data: st.DataObject, plaintext: bytes
) -> None:
    ring = ring_of(KEY_A)
    stored = ring.encrypt(plaintext, b"f", b"k")
    raw = bytearray(decode_payload(stored[19:]))
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)

    tampered = with_payload(stored, encode_payload(bytes(raw)))

    assert decrypt_reason(ring, tampered, b"f", b"k") == AUTH_FAILED


def test_replaced_payload_character_fails_authentication() -> None:
    ring = ring_of(KEY_A)
    stored = ring.encrypt(b"secret", b"f")
    position = 25
    replacement = b"B" if stored[position : position + 1] != b"B" else b"C"

    tampered = stored[:position] + replacement + stored[position + 1 :]

    assert decrypt_reason(ring, tampered, b"f", b"k") == AUTH_FAILED


def test_a_ring_owns_what_names_one_of_its_keys_or_is_a_whole_envelope() -> None:
    ring = ring_of(KEY_A)
    stored = ring.encrypt(b"v", b"f")
    lost = ring_of(KEY_B).encrypt(b"v", b"f")  # under a key this ring lacks

    assert ring.owns(stored) and ring.owns(stored[:30])  # damaged: still one to report
    assert ring.owns(lost) and not ring.owns(lost[:30])
    assert not ring.owns(b"$fc1$f$AAAAAAAAAAA$ just text")
    assert not ring.owns(b"$fc1$ text") and not ring.owns(b"plain")


def test_truncated_value_is_rejected() -> None:
    ring = ring_of(KEY_A)
    stored = ring.encrypt(b"some secret value", b"f")

    assert decrypt_reason(ring, stored[:-4], b"f", b"k") == AUTH_FAILED
    assert decrypt_reason(ring, stored[:40], b"f", b"k") == MALFORMED
    assert decrypt_reason(ring, stored[:19], b"f", b"k") == MALFORMED
    assert is_envelope(stored[:-4]) and not is_envelope(stored[:40])
    assert decrypt_reason(ring, stored[:10], b"f", b"k") == MALFORMED


def test_value_moved_to_another_field_fails_authentication() -> None:
    ring = ring_of(KEY_A)

    for key_name in (None, b"user:1"):
        stored = ring.encrypt(b"secret", b"password", key_name)
        assert decrypt_reason(ring, stored, b"password2", b"user:1") == AUTH_FAILED


def test_mode_k_value_moved_to_another_key_fails_authentication() -> None:
    ring = ring_of(KEY_A)
    stored = ring.encrypt(b"secret", b"password", b"user:1")

    assert decrypt_reason(ring, stored, b"password", b"user:2") == AUTH_FAILED


def test_field_and_key_boundaries_are_unambiguous() -> None:
    ring = ring_of(KEY_A)
    stored = ring.encrypt(b"secret", b"ab", b"c")

    assert decrypt_reason(ring, stored, b"a", b"bc") == AUTH_FAILED


def test_changed_mode_fails_authentication() -> None:
    ring = ring_of(KEY_A)
    stored = ring.encrypt(b"secret", b"f", b"k")

    assert decrypt_reason(ring, b"$fc1$f" + stored[6:], b"f", b"k") == AUTH_FAILED


def test_changed_key_id_is_reported_as_missing_or_fails_authentication() -> None:
    ring = ring_of(KEY_A, KEY_B)
    stored = ring.encrypt(b"secret", b"f")
    kid_b = Key.from_bytes(KEY_B).kid.encode()
    kid_c = Key.from_bytes(KEY_C).kid.encode()

    to_unknown = stored[:7] + kid_c + stored[18:]
    to_other_ring_key = stored[:7] + kid_b + stored[18:]

    assert decrypt_reason(ring, to_unknown, b"f", b"k") == (
        f"no key in the ring has id {kid_c.decode()}"
    )
    assert decrypt_reason(ring, to_other_ring_key, b"f", b"k") == AUTH_FAILED


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"plain value",
        b"$fc1$",
        b"$fc$f$AAAAAAAAAAA$",
        b"$fc1$x$AAAAAAAAAAA$" + b"A" * 40,
        b"$fc1$f$AAAAAAAAAA$" + b"A" * 40,
        b"$fc1$f$AAAAAAAA.AA$" + b"A" * 40,
        b"$fc1$fAAAAAAAAAAA$$" + b"A" * 40,
    ],
)
def test_broken_structure_is_malformed(value: bytes) -> None:
    assert decrypt_reason(ring_of(KEY_A), value, b"f", b"k") == MALFORMED
    assert not is_envelope(value)


@pytest.mark.parametrize(
    "suffix",
    [b"=", b"==", b"\n", b" ", b"$", b"AAA"],
    ids=["pad1", "pad2", "newline", "space", "dollar", "length-1-mod-4"],
)
def test_payload_with_extra_characters_is_malformed(suffix: bytes) -> None:
    ring = ring_of(KEY_A)
    stored = ring.encrypt(b"", b"f")  # 28 bytes -> 38 characters, length 2 mod 4

    assert decrypt_reason(ring, stored + suffix, b"f", b"k") == MALFORMED


def test_standard_base64_alphabet_in_payload_is_malformed() -> None:
    ring = ring_of(KEY_A)
    stored = ring._encrypt_with_nonce(b"", b"f", None, b"\xff" * 12)
    assert b"_" in stored[19:]

    standard = stored[:19] + stored[19:].replace(b"_", b"/")

    assert decrypt_reason(ring, standard, b"f", b"k") == MALFORMED


def test_non_canonical_last_character_is_malformed() -> None:
    ring = ring_of(KEY_A)
    stored = ring.encrypt(b"", b"f")  # the last of 38 characters holds 4 unused bits
    last = stored[-1:]
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    sibling = alphabet[alphabet.index(last.decode()) + 1].encode()  # same data, low bit set

    assert decrypt_reason(ring, stored[:-1] + sibling, b"f", b"k") == MALFORMED


@pytest.mark.parametrize("prefix", [b"$fc2$", b"$fc0$", b"$fc10$", b"$fc01$"])
def test_other_format_versions_are_unsupported(prefix: bytes) -> None:
    value = prefix + b"f$AAAAAAAAAAA$" + b"A" * 40

    assert not is_encrypted(value)
    assert KeyRing.kid_of(value) is None
    assert decrypt_reason(ring_of(KEY_A), value, b"f", b"k") == UNSUPPORTED


def test_kid_of_and_is_encrypted() -> None:
    stored = ring_of(KEY_A).encrypt(b"v", b"f")

    assert is_encrypted(stored)
    assert KeyRing.kid_of(stored) == Key.from_bytes(KEY_A).kid
    assert not is_encrypted(b"plain")
    assert KeyRing.kid_of(b"plain") is None
    assert KeyRing.kid_of(b"$fc1$f$short$") is None


# --- nothing secret in errors or reprs -----------------------------------------------


def _everything_shown(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + str(exc)


def test_decrypt_errors_never_show_the_value_or_plaintext() -> None:
    plaintext = b"PLAINTEXT-MARKER-0123456789"
    ring = ring_of(KEY_A)
    stored = ring.encrypt(plaintext, b"password", b"user:1")
    payload = stored[19:].decode()
    attempts = [
        (stored, b"password", b"user:2"),
        (stored[:-4], b"password", b"user:1"),
        (stored + b"=", b"password", b"user:1"),
        (b"$fc9$" + plaintext, b"password", b"user:1"),
        (plaintext, b"password", b"user:1"),
    ]

    for value, field, key_name in attempts:
        with pytest.raises(DecryptError) as caught:
            ring.decrypt(value, field, key_name)
        shown = _everything_shown(caught.value)
        assert "PLAINTEXT-MARKER" not in shown
        assert payload[:20] not in shown
        assert caught.value.__cause__ is None
        assert caught.value.field == b"password"


def test_key_repr_never_shows_key_bytes() -> None:
    key = Key.from_bytes(KEY_A)
    ring = KeyRing([key])
    forms = [
        KEY_A.hex(),
        KEY_A.hex().upper(),
        base64.b64encode(KEY_A).decode()[:20],
        base64.urlsafe_b64encode(KEY_A).decode()[:20],
        repr(KEY_A)[2:30],
    ]

    for shown in (repr(key), str(key), repr(ring), str(ring)):
        assert key.kid in shown
        for form in forms:
            assert form not in shown


def test_key_is_read_only() -> None:
    key = Key.from_bytes(KEY_A)

    with pytest.raises(AttributeError):
        key.kid = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        key.decrypt_only = True  # type: ignore[misc]
    with pytest.raises(AttributeError):
        key.extra = 1  # type: ignore[attr-defined]


BASE64_MESSAGES = re.compile(
    r"the text after 'base64:' is not valid standard base64; "
    r"generate a key with 'fieldcrypt keygen'"
    r"|a 'base64:' key must decode to exactly 32 bytes, not \d+"
)
HEX_MESSAGES = re.compile(
    r"a 'hex:' key must be exactly 64 hex digits, not \d+ characters"
    r"|the text after 'hex:' holds a character that is not a hex digit"
)


@given(rest=st.text(max_size=80))
@example(rest="S3CRET-MARKER")
@example(rest="-_-_" * 11)
@example(rest=base64.b64encode(b"S3CRET-MARKER" * 3).decode())
def test_bad_base64_key_errors_depend_on_nothing_but_its_length(rest: str) -> None:
    secret = "base64:" + rest
    try:
        key = derive_key(secret)
    except KeyMaterialError as caught:
        assert BASE64_MESSAGES.fullmatch(str(caught))
        assert "S3CRET" not in _everything_shown(caught)
    else:
        assert len(key) == 32 and base64.b64decode(rest) == key


@given(rest=st.text(max_size=80))
@example(rest="S3CRET-MARKER")
@example(rest="S3CRET" + "0" * 58)
@example(rest="0" * 63 + " ")
def test_bad_hex_key_errors_depend_on_nothing_but_its_length(rest: str) -> None:
    secret = "hex:" + rest
    try:
        key = derive_key(secret)
    except KeyMaterialError as caught:
        assert HEX_MESSAGES.fullmatch(str(caught))
        assert "S3CRET" not in _everything_shown(caught)
    else:
        assert key.hex() == rest.lower()


def test_passphrase_that_is_not_encodable_is_rejected_without_showing_it() -> None:
    secret = "S3CRET-MARKER-\ud800"

    with pytest.raises(KeyMaterialError) as caught:
        derive_key(secret)

    assert "S3CRET" not in _everything_shown(caught.value)
    assert caught.value.__context__ is None or caught.value.__suppress_context__


# --- keys from secrets ---------------------------------------------------------------


def test_empty_secret_is_rejected() -> None:
    with pytest.raises(KeyMaterialError, match="the secret is empty"):
        derive_key("")


@pytest.mark.parametrize(
    ("secret", "message"),
    [
        ("base64:", "exactly 32 bytes, not 0"),
        ("base64:" + base64.b64encode(bytes(31)).decode(), "exactly 32 bytes, not 31"),
        ("base64:" + base64.b64encode(bytes(33)).decode(), "exactly 32 bytes, not 33"),
        ("base64:" + base64.b64encode(bytes(32)).decode().rstrip("="), "not valid"),
        ("base64:" + base64.urlsafe_b64encode(b"\xff" * 32).decode(), "not valid"),
        ("base64:" + base64.b64encode(bytes(32)).decode() + "\n", "not valid"),
        ("base64:é", "not valid"),
        ("hex:" + "0" * 63, "exactly 64 hex digits, not 63 characters"),
        ("hex:" + "0" * 65, "exactly 64 hex digits, not 65 characters"),
        ("hex:" + "0" * 63 + "g", "not a hex digit"),
        ("hex:" + "0" * 62 + " 0", "not a hex digit"),
    ],
)
def test_bad_raw_key_is_rejected(secret: str, message: str) -> None:
    with pytest.raises(KeyMaterialError, match=re.escape(message)):
        derive_key(secret)


def test_raw_keys_decode_to_their_bytes() -> None:
    assert derive_key("base64:" + base64.b64encode(KEY_A).decode()) == KEY_A
    assert derive_key("hex:" + KEY_A.hex()) == KEY_A
    assert derive_key("hex:" + KEY_A.hex().upper()) == KEY_A


def test_passphrase_is_scrypt_with_the_fixed_salt() -> None:
    passphrase = "a long passphrase with enough words in it"

    key = derive_key(passphrase)

    assert key == hashlib.scrypt(
        passphrase.encode(), salt=b"fieldcrypt/v1", n=2**15, r=8, p=1, dklen=32, maxmem=2**26
    )
    assert Key.from_secret(passphrase).kid == Key.from_bytes(key).kid


def test_raw_key_prefixes_are_recognised_whether_valid_or_not() -> None:
    assert is_raw_key("base64:" + base64.b64encode(KEY_A).decode())
    assert is_raw_key("hex:zz")
    assert not is_raw_key("Base64:" + base64.b64encode(KEY_A).decode())
    assert not is_raw_key("a passphrase")


def test_short_passphrases_are_weak_and_raw_keys_never() -> None:
    assert passphrase_is_weak("hunter2")
    assert passphrase_is_weak("x" * 31)
    assert not passphrase_is_weak("x" * 32)
    assert not passphrase_is_weak("é" * 32)
    assert not passphrase_is_weak("hex:00")
    assert not passphrase_is_weak("base64:AA==")


def test_generated_key_is_a_valid_raw_key() -> None:
    secret = generate_key()

    assert secret.startswith("base64:")
    assert is_raw_key(secret) and not passphrase_is_weak(secret)
    assert len(derive_key(secret)) == 32
    assert generate_key() != secret


@pytest.mark.parametrize("bad", [b"", bytes(16), bytes(31), bytes(33), bytes(64)])
def test_key_from_bytes_needs_exactly_32_bytes(bad: bytes) -> None:
    with pytest.raises(KeyMaterialError, match="exactly 32 bytes"):
        Key.from_bytes(bad)
