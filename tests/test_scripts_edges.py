"""Edges of script calls, through a Session with no sockets: which ARGV positions a
declaration covers, the bounds on what the proxy learns from traffic, and numkeys as
Redis reads it. (What Redis then stores is checked against real servers in
test_scripts.py.)"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from proxy import resp
from proxy.config import Script
from proxy.crypto import Key, KeyRing, generate_key
from proxy.scripts import MAX_LEARNED, declared_positions
from tests.test_scripts_speed_paths import (
    SET_IF_MISSING,
    SET_IF_MISSING_FILE,
    Proxy,
    bulks,
)


def script(pairs: list[tuple[int, int]], repeat: int) -> Script:
    return Script("s", 1, tuple(pairs), function="f", repeat=repeat)


@pytest.mark.parametrize(
    ("pairs", "repeat", "argc", "positions"),
    [
        ([(1, 2)], 0, 4, [(0, 1)]),
        ([(1, 2), (3, 4)], 0, 3, [(0, 1)]),  # a pair past ARGV's end is left out
        ([(1, 2)], 2, 5, [(0, 1), (2, 3)]),  # an HSET-like list with a stray last one
        ([(1, 2), (3, 4)], 4, 6, [(0, 1), (2, 3), (4, 5)]),  # ends part-way: (5, 6) counts
        ([(1, 2), (3, 4)], 4, 8, [(0, 1), (2, 3), (4, 5), (6, 7)]),
        ([(2, 3)], 2, 7, [(1, 2), (3, 4), (5, 6)]),  # a fixed ARGV[1], then pairs
        ([(2, 4), (3, 5)], 4, 9, [(1, 3), (2, 4), (5, 7), (6, 8)]),  # span 4: from 2 to 5
        ([(1, 2)], 3, 8, [(0, 1), (3, 4), (6, 7)]),  # (field, value, other) records
        ([(2, 3)], 3, 7, [(1, 2), (4, 5)]),  # (other, field, value) records
        ([(1, 2)], 2, 0, []),
        ([(1, 2)], 0, 0, []),
        ([], 2, 4, []),
    ],
)
def test_declared_positions(
    pairs: list[tuple[int, int]], repeat: int, argc: int, positions: list[tuple[int, int]]
) -> None:
    assert declared_positions(script(pairs, repeat), argc) == positions


def test_a_declared_body_matches_however_many_bodies_came_before(tmp_path: Path) -> None:
    proxy = Proxy(tmp_path, scripts=[SET_IF_MISSING])
    for number in range(MAX_LEARNED + 5):  # past the bound on bodies remembered
        proxy.send(b"SCRIPT", b"LOAD", b"return %d" % number)
    trimmed = SET_IF_MISSING_FILE.read_bytes().strip()  # another SHA1 than the file's
    sha = hashlib.sha1(trimmed).hexdigest().encode()

    proxy.send(b"SCRIPT", b"LOAD", trimmed)
    sent = proxy.send(b"EVALSHA", sha, b"1", b"iad:5", b"imap", b"imap-5", b"imapSetBy", b"me")

    assert len(proxy.book.sha1s) <= MAX_LEARNED
    assert sent.startswith(b"*8\r\n$7\r\nEVALSHA\r\n") and b"imap-5" not in sent
    assert b"$fc1$" in sent


def test_the_one_off_noscript_is_bounded_but_never_permanent(tmp_path: Path) -> None:
    proxy = Proxy(tmp_path, scripts=[SET_IF_MISSING])
    for number in range(MAX_LEARNED):  # SHA1s of bodies this proxy never saw
        sha = hashlib.sha1(b"unseen %d" % number).hexdigest().encode()
        proxy.send(b"EVALSHA", sha, b"1", b"iad:1")
    proxy.answered()
    unseen = hashlib.sha1(b"one more").hexdigest().encode()
    call = (b"EVALSHA", unseen, b"1", b"iad:1")

    assert proxy.send(*call) == b""
    assert proxy.answered().startswith(b"-NOSCRIPT")
    assert proxy.send(*call) == resp.encode_request(list(call))  # then it goes to Redis
    assert len(proxy.book.nudged) <= MAX_LEARNED


@pytest.mark.parametrize("numkeys", [b"01", b"+1", b" 1", b"1 ", b"-0", b"1.0", b"0x1", b"1_0"])
def test_numkeys_redis_refuses_goes_to_redis_for_its_error(tmp_path: Path, numkeys: bytes) -> None:
    proxy = Proxy(tmp_path, script_policy="refuse")
    call = (b"EVAL", b"return 1", numkeys, b"iad:1", b"iad:2")

    assert proxy.send(*call) == resp.encode_request(list(call))  # not refused by the proxy
    assert proxy.book.seen == {}


def test_a_value_that_cannot_be_opened_is_named_only_by_a_field_a_rule_spells_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The element before a value may be another value, and a rule `fields: ["*"]`
    protects every name: only a literal rule field is shown as the value's name."""
    rules = [
        {"key": "iad:*", "fields": ["imap", "smtp", "oauth2"]},
        {"key": "notes:*", "fields": ["*"]},
    ]
    proxy = Proxy(tmp_path, rules=rules)
    lost = KeyRing([Key.from_secret(generate_key())]).encrypt(b"x", b"imap")  # not our key
    shown: dict[bytes, bytes] = {}
    with caplog.at_level(logging.INFO, logger="fieldcrypt"):
        for before in (b"CLEARTEXT-NOTE-VALUE", b"imap"):
            proxy.send(b"EVAL", b"return 1", b"1", b"notes:1")
            shown[before] = proxy.reply(bulks(before, lost))

    logged = " ".join(r.getMessage() for r in caplog.records if r.name == "fieldcrypt")
    assert b"(field '?')" in shown[b"CLEARTEXT-NOTE-VALUE"]
    assert b"(field 'imap')" in shown[b"imap"]
    assert b"CLEARTEXT" not in b"".join(shown.values()) and "CLEARTEXT" not in logged
    assert "cannot decrypt field '?'" in logged
