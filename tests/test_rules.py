"""Redis globs and the rule table that says which hash fields are protected."""

from __future__ import annotations

import fnmatch
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.rules import Glob, GlobError, Rule, RuleSet, glob_to_regex


def matches(pattern: bytes, subject: bytes) -> bool:
    by_regex = glob_to_regex(pattern).fullmatch(subject) is not None
    by_glob = Glob(pattern).matches(subject)
    assert by_regex == by_glob, (pattern, subject)
    return by_glob


# Cases from Redis's documentation of KEYS and from stringmatchlen in util.c.
@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        (b"h?llo", b"hello", True),
        (b"h?llo", b"hallo", True),
        (b"h?llo", b"hllo", False),
        (b"h*llo", b"hllo", True),
        (b"h*llo", b"heeeello", True),
        (b"h[ae]llo", b"hello", True),
        (b"h[ae]llo", b"hallo", True),
        (b"h[ae]llo", b"hillo", False),
        (b"h[^e]llo", b"hallo", True),
        (b"h[^e]llo", b"hbllo", True),
        (b"h[^e]llo", b"hello", False),
        (b"h[a-b]llo", b"hallo", True),
        (b"h[a-b]llo", b"hbllo", True),
        (b"h[a-b]llo", b"hcllo", False),
        (b"h[b-a]llo", b"hallo", True),  # a reversed range is swapped
        (b"*", b"", True),
        (b"*", b"anything at all", True),
        (b"**a**", b"xax", True),
        (b"?", b"", False),
        (b"", b"", True),
        (b"", b"a", False),
        (b"user:*", b"user:42", True),
        (b"user:*", b"USER:42", False),  # case-sensitive
        (b"user:*", b"xuser:42", False),  # the whole key must match
        (b"\\*", b"*", True),
        (b"\\*", b"a", False),
        (b"a\\?b", b"a?b", True),
        (b"a\\?b", b"axb", False),
        (b"\\[x]", b"[x]", True),
        (b"[\\]]", b"]", True),
        (b"[\\-a]", b"-", True),
        (b"[\\-a]", b"b", False),
        (b"[a-]b]", b"]b]", False),  # '-' before ']' makes a range ']'..'a'
        (b"[a-]b]", b"^", True),
        (b"[]", b"a", False),  # an empty class matches nothing
        (b"[]a]", b"]a]", False),
        (b"[^]", b"a", True),  # ...and its negation any byte
        (b"*.txt", b"notes.txt", True),
        (b"*.txt", b"notesXtxt", False),  # '.' is literal
        (b"a+b", b"a+b", True),
        (b"a+b", b"aab", False),
        (b"key*", b"key\nwith\nnewlines", True),  # * spans any byte
        (b"?", b"\n", True),
        (b"*\xff", b"\x00\xff", True),  # binary keys
        (b"[\x00-\x10]", b"\x05", True),
        (b"*a*b*c*", b"xxaxxbxxcxx", True),
        (b"*a*b*c*", b"xxaxxcxxbxx", False),
        (b"a*b*c", b"abc", True),
        (b"a*b*c", b"abcc", True),
        (b"a*b*c", b"ac", False),
        (b"a*a*a", b"aa", False),
        (b"a*a*a", b"aaa", True),
        (b"*ClientSecret", b"googleClientSecret", True),
        (b"*ClientSecret", b"ClientSecret", True),
        (b"*ClientSecret", b"ClientSecretX", False),
    ],
)
def test_glob_matches_like_redis(pattern: bytes, subject: bytes, expected: bool) -> None:
    assert matches(pattern, subject) is expected


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        (b"user:[abc", "never closed"),
        (b"[", "never closed"),
        (b"[^", "never closed"),
        (b"[a-]", "never closed"),  # the range eats the ']'
        (b"abc\\", "ends with a lone"),
    ],
)
def test_bad_glob_is_refused_with_its_problem(pattern: bytes, problem: str) -> None:
    with pytest.raises(GlobError, match=problem):
        glob_to_regex(pattern)
    with pytest.raises(GlobError, match=problem):
        Glob(pattern)


@given(
    pattern=st.text(alphabet="ab.*?\n", max_size=8),
    subject=st.text(alphabet="ab.\n", max_size=10),
)
def test_glob_without_brackets_agrees_with_fnmatch(pattern: str, subject: str) -> None:
    expected = fnmatch.fnmatchcase(subject, pattern)
    assert matches(pattern.encode(), subject.encode()) is expected


def redis_stringmatchlen(pattern: bytes, string: bytes) -> bool:
    """A line-by-line port of Redis's stringmatchlen (nocase=0), as the reference.

    stringmatchlen itself never matches an empty string; KEYS and SCAN treat a lone `*`
    as match-all, and fieldcrypt lets any run of stars match the empty key too.
    """
    if not string:
        return all(c == ord("*") for c in pattern)
    p, s = 0, 0
    while p < len(pattern) and s < len(string):
        c = pattern[p]
        if c == ord("*"):
            while p + 1 < len(pattern) and pattern[p + 1] == ord("*"):
                p += 1
            if p + 1 == len(pattern):
                return True
            return any(
                redis_stringmatchlen(pattern[p + 1 :], string[i:]) for i in range(s, len(string))
            )
        if c == ord("?"):
            s += 1
        elif c == ord("["):
            p += 1
            negate = p < len(pattern) and pattern[p] == ord("^")
            if negate:
                p += 1
            match = False
            while True:
                left = len(pattern) - p
                if left >= 2 and pattern[p] == ord("\\"):
                    p += 1
                    match |= pattern[p] == string[s]
                elif left == 0:
                    p -= 1
                    break
                elif pattern[p] == ord("]"):
                    break
                elif left >= 3 and pattern[p + 1] == ord("-"):
                    lo, hi = sorted((pattern[p], pattern[p + 2]))
                    match |= lo <= string[s] <= hi
                    p += 2
                else:
                    match |= pattern[p] == string[s]
                p += 1
            if match == negate:
                return False
            s += 1
        else:
            if c == ord("\\") and len(pattern) - p >= 2:
                p += 1
            if pattern[p] != string[s]:
                return False
            s += 1
        p += 1
        if s == len(string):
            while p < len(pattern) and pattern[p] == ord("*"):
                p += 1
            break
    return p == len(pattern) and s == len(string)


PATTERN_BYTES = st.sampled_from([bytes([c]) for c in b"ab*?[]^-\\"])
SUBJECT_BYTES = st.sampled_from([bytes([c]) for c in b"ab]^-\\"])


@given(
    pattern=st.lists(PATTERN_BYTES, max_size=10).map(b"".join),
    subject=st.lists(SUBJECT_BYTES, max_size=8).map(b"".join),
)
def test_glob_agrees_with_redis_stringmatchlen(pattern: bytes, subject: bytes) -> None:
    try:
        glob_to_regex(pattern)
    except GlobError:
        return  # Redis reads these some way; fieldcrypt refuses them
    assert matches(pattern, subject) is redis_stringmatchlen(pattern, subject)


def test_many_stars_do_not_backtrack_for_long() -> None:
    glob = Glob(b"*a*a*a*a*a*a*b")
    started = time.perf_counter()
    assert not glob.matches(b"a" * 20_000)
    assert time.perf_counter() - started < 1.0


def test_literal_glob_is_a_plain_comparison() -> None:
    assert Glob(b"settings").literal == b"settings"
    assert Glob(b"a\\*b").literal == b"a*b"
    assert Glob(b"a*").literal is None


# ---------------------------------------------------------------------------- rule set


def test_key_without_a_rule_is_not_matched() -> None:
    rules = RuleSet([Rule("iad:*", ("imap",))])
    assert rules.match_key(0, b"other:1") is None


def test_field_of_matched_key_is_protected_and_others_are_not() -> None:
    rule = Rule("iad:*", ("imap", "smtp", "oauth2"))
    key_rules = RuleSet([rule]).match_key(0, b"iad:42")
    assert key_rules is not None
    assert key_rules.field_rule(b"imap") is rule
    assert key_rules.field_rule(b"oauth2") is rule
    assert key_rules.field_rule(b"name") is None
    assert key_rules.field_rule(b"IMAP") is None


def test_field_globs_match_fields() -> None:
    rule = Rule("settings", ("serviceSecret", "*ClientSecret"))
    key_rules = RuleSet([rule]).match_key(0, b"settings")
    assert key_rules is not None
    assert key_rules.field_rule(b"googleClientSecret") is rule
    assert key_rules.field_rule(b"serviceSecret") is rule
    assert key_rules.field_rule(b"googleClientId") is None


def test_first_rule_in_config_order_wins() -> None:
    broad = Rule("user:*", ("*token",), bind_key=True)
    narrow = Rule("user:admin", ("apitoken",), bind_key=False)
    key_rules = RuleSet([broad, narrow]).match_key(0, b"user:admin")
    assert key_rules is not None
    assert key_rules.field_rule(b"apitoken") is broad


def test_later_literal_field_does_not_beat_earlier_glob() -> None:
    first = Rule("k", ("*",), require_encrypted=True)
    second = Rule("k", ("password",))
    key_rules = RuleSet([first, second]).match_key(0, b"k")
    assert key_rules is not None
    assert key_rules.field_rule(b"password") is first


def test_earlier_literal_field_beats_later_glob() -> None:
    first = Rule("k", ("password",))
    second = Rule("k*", ("pass*",), require_encrypted=True)
    key_rules = RuleSet([first, second]).match_key(0, b"k")
    assert key_rules is not None
    assert key_rules.field_rule(b"password") is first
    assert key_rules.field_rule(b"passphrase") is second


def test_a_rule_whose_fields_do_not_match_lets_a_later_rule_decide() -> None:
    first = Rule("iad:*", ("imap",))
    second = Rule("iad:1", ("smtp",))
    key_rules = RuleSet([first, second]).match_key(0, b"iad:1")
    assert key_rules is not None
    assert key_rules.field_rule(b"smtp") is second


def test_db_limits_a_rule_to_one_database() -> None:
    rule = Rule("settings", ("serviceSecret",), db=0)
    rules = RuleSet([rule])
    assert rules.match_key(0, b"settings") is not None
    assert rules.match_key(1, b"settings") is None


def test_db_filter_applies_to_glob_keys_too() -> None:
    in_db2 = Rule("s:*", ("a",), db=2)
    anywhere = Rule("s:*", ("b",))
    rules = RuleSet([in_db2, anywhere])
    in_db0 = rules.match_key(0, b"s:1")
    assert in_db0 is not None
    assert in_db0.field_rule(b"a") is None
    assert in_db0.field_rule(b"b") is anywhere
    in_db2_rules = rules.match_key(2, b"s:1")
    assert in_db2_rules is not None
    assert in_db2_rules.field_rule(b"a") is in_db2


def test_cached_answers_stay_right_per_db_and_key() -> None:
    rule = Rule("k:*", ("f",), db=3)
    rules = RuleSet([rule])
    for _ in range(3):
        assert rules.match_key(3, b"k:1") is not None
        assert rules.match_key(4, b"k:1") is None
        assert rules.match_key(3, b"x:1") is None


def test_cache_is_bounded_and_still_correct_when_cleared() -> None:
    rule = Rule("k:*", ("f",))
    rules = RuleSet([rule])
    for n in range(100_050):
        key_rules = rules.match_key(0, b"k:%d" % n)
        assert key_rules is not None
    assert len(rules._cache) <= 100_000
    assert rules.match_key(0, b"k:1") is not None
    assert rules.match_key(0, b"z:1") is None


def test_keys_with_the_same_rules_share_one_key_rules() -> None:
    rules = RuleSet([Rule("a:*", ("f",)), Rule("b", ("g",))])
    assert rules.match_key(0, b"a:1") is rules.match_key(0, b"a:2")
    assert rules.match_key(0, b"a:1") is not rules.match_key(0, b"b")


def test_long_keys_are_matched_but_not_cached() -> None:
    rules = RuleSet([Rule("big:*", ("f",))])
    key = b"big:" + b"x" * 10_000
    assert rules.match_key(0, key) is not None
    assert (0, key) not in rules._cache


def test_empty_rule_set() -> None:
    rules = RuleSet([])
    assert rules.is_empty
    assert rules.match_key(0, b"anything") is None
    assert not RuleSet([Rule("a", ("b",))]).is_empty


def test_protected_key_globs_in_order_without_repeats() -> None:
    rules = RuleSet(
        [
            Rule("iad:*", ("imap",)),
            Rule("settings", ("a",), db=0),
            Rule("iad:*", ("smtp",)),
            Rule("cfg:*", ("b",), db=1),
        ]
    )
    assert rules.protected_key_globs() == ("iad:*", "settings", "cfg:*")
    assert rules.protected_key_globs(db=1) == ("iad:*", "cfg:*")


def test_bad_glob_in_a_rule_names_the_rule_and_pattern() -> None:
    with pytest.raises(GlobError, match=r"rules\[1\]: pattern 'x\[': .*never closed"):
        RuleSet([Rule("ok", ("f",)), Rule("ok", ("x[",))])


def test_rule_defaults() -> None:
    rule = Rule("k", ("f",))
    assert rule.db is None
    assert rule.require_encrypted is False
    assert rule.bind_key is False
    assert rule.refuse_scripts is False
