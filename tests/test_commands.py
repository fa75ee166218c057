"""The command table on its own (proxy/commands.py): requests rewritten and replies
decrypted as plain bytes, no server involved.

HSETEX, HGETEX and HGETDEL entries are checked here too: the rewritten request is
parsed back with the proxy's own request reader, and hand-built reply frames go through
the transform the entry registers. tests/test_hash_field_expiration.py drives them end
to end on the servers that have them (Redis 8.2, Valkey 9.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from proxy.commands import FieldCrypt, Table
from proxy.crypto import HEADER_PREFIX, DecryptError, Key, KeyRing, generate_key
from proxy.resp import RequestReader, bulk, request_args
from proxy.rules import Rule, RuleSet
from proxy.session import Answer, Forward, Handler, Outcome, ReplyError

AUTH_FAILED = (
    "authentication failed (wrong key, tampered value, or value moved from another field or key)"
)
RULES = RuleSet(
    [
        Rule(key="iad:*", fields=("imap", "smtp", "oauth2")),
        Rule(key="vault:*", fields=("token",), bind_key=True),
        Rule(key="settings", fields=("*ClientSecret",), db=0),
    ]
)


@dataclass
class StandInSession:
    """What a handler reads from its session: the logical database and the protocol."""

    db: int = 0
    resp3: bool = False


@pytest.fixture
def ring() -> KeyRing:
    return KeyRing([Key.from_secret(generate_key())])


@pytest.fixture
def crypt(ring: KeyRing) -> FieldCrypt:
    return FieldCrypt(RULES, ring)


@pytest.fixture
def handlers(crypt: FieldCrypt) -> dict[bytes, Handler]:
    return Table(crypt).handlers()


def handle(
    handlers: dict[bytes, Handler], *args: str | bytes, session: StandInSession | None = None
) -> Outcome:
    request = [arg.encode() if isinstance(arg, str) else arg for arg in args]
    return handlers[request[0].upper()](session or StandInSession(), request)  # type: ignore[arg-type]


def parse_request(data: bytes) -> list[bytes]:
    """The arguments of the one request in `data`, read as the proxy reads clients."""
    reader = RequestReader()
    reader.feed(data)
    found = reader.next()
    assert found is not None
    start, end = found[0], found[1]
    assert (start, end) == (0, len(data))  # one whole request, nothing left over
    return request_args(reader.buffer, start, end)


def array(*items: bytes | None, resp3: bool = False) -> bytes:
    """A reply array of bulk strings, None standing for the null of the protocol."""
    null = b"_\r\n" if resp3 else b"$-1\r\n"
    return b"*%d\r\n" % len(items) + b"".join(null if i is None else bulk(i) for i in items)


def transform_of(outcome: Outcome) -> Forward:
    assert isinstance(outcome, Forward)
    assert outcome.transform is not None
    return outcome


# --- HSETEX -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [[], ["EX", "60"], ["PX", "1500", "FNX"], ["FXX", "KEEPTTL"], ["EXAT", "4102444800"]],
    ids=["none", "ex", "px-fnx", "fxx-keepttl", "exat"],
)
def test_hsetex_protected_values_are_encrypted_in_the_rewritten_request(
    handlers: dict[bytes, Handler], ring: KeyRing, options: list[str]
) -> None:
    original = [
        "HSETEX",
        "iad:1",
        *options,
        "FIELDS",
        "3",
        "imap",
        "imap-secret",
        "user",
        "alice",
        "smtp",
        "smtp-secret",
    ]

    outcome = handle(handlers, *original)

    assert isinstance(outcome, Forward) and outcome.request is not None
    assert outcome.transform is None  # the reply is a count
    sent = parse_request(outcome.request)
    head = len(original) - 6
    assert sent[:head] == [arg.encode() for arg in original[:head]]
    assert sent[head::2] == [b"imap", b"user", b"smtp"]
    imap, user, smtp = sent[head + 1 :: 2]
    assert imap.startswith(HEADER_PREFIX + b"f$" + ring.keys[0].kid.encode())
    assert ring.decrypt(imap, b"imap", b"iad:1") == b"imap-secret"
    assert ring.decrypt(smtp, b"smtp", b"iad:1") == b"smtp-secret"
    assert user == b"alice"


def test_hsetex_under_bind_key_seals_to_the_key_name(
    handlers: dict[bytes, Handler], ring: KeyRing
) -> None:
    outcome = handle(handlers, "HSETEX", "vault:1", "EX", "60", "FIELDS", "1", "token", "t0k3n")

    assert isinstance(outcome, Forward) and outcome.request is not None
    sealed = parse_request(outcome.request)[-1]
    assert sealed.startswith(HEADER_PREFIX + b"k$")
    assert ring.decrypt(sealed, b"token", b"vault:1") == b"t0k3n"
    with pytest.raises(DecryptError, match="authentication failed"):
        ring.decrypt(sealed, b"token", b"vault:2")


@pytest.mark.parametrize(
    "request_args_",
    [
        ["HSETEX", "session:1", "EX", "60", "FIELDS", "1", "imap", "not-protected-here"],
        ["HSETEX", "iad:1", "EX", "60", "FIELDS", "1", "user", "alice"],
        ["HSETEX", "settings", "FIELDS", "1", "googleClientSecret", "x"],  # db 1 below
    ],
    ids=["key-without-rule", "unprotected-field", "rule-for-another-db"],
)
def test_hsetex_without_protected_values_is_forwarded_untouched(
    handlers: dict[bytes, Handler], request_args_: list[str]
) -> None:
    assert handle(handlers, *request_args_, session=StandInSession(db=1)) is None


def test_hsetex_with_a_decrypt_only_ring_forwards_the_value_in_clear() -> None:
    ring = KeyRing([Key.from_secret(generate_key(), decrypt_only=True)])
    handlers = Table(FieldCrypt(RULES, ring)).handlers()

    original = [b"HSETEX", b"iad:1", b"FIELDS", b"1", b"imap", b"clear"]

    outcome = handle(handlers, *original)

    rewritten = isinstance(outcome, Forward) and outcome.request is not None
    sent = parse_request(outcome.request) if rewritten else original  # type: ignore[union-attr,arg-type]
    assert sent == original


# --- HGETEX and HGETDEL ---------------------------------------------------------------

READS_WITH_FIELDS: dict[str, list[str]] = {
    "hgetex": ["HGETEX", "iad:1", "FIELDS", "4", "imap", "user", "nope", "oauth2"],
    "hgetex-ex": ["HGETEX", "iad:1", "EX", "60", "FIELDS", "4", "imap", "user", "nope", "oauth2"],
    "hgetex-persist": [
        "HGETEX",
        "iad:1",
        "PERSIST",
        "FIELDS",
        "4",
        "imap",
        "user",
        "nope",
        "oauth2",
    ],
    "hgetdel": ["HGETDEL", "iad:1", "FIELDS", "4", "imap", "user", "nope", "oauth2"],
}


@pytest.mark.parametrize("resp3", [False, True], ids=["resp2", "resp3"])
@pytest.mark.parametrize("command", list(READS_WITH_FIELDS.values()), ids=list(READS_WITH_FIELDS))
def test_hgetex_and_hgetdel_replies_are_decrypted(
    handlers: dict[bytes, Handler], ring: KeyRing, command: list[str], resp3: bool
) -> None:
    session = StandInSession(resp3=resp3)
    outcome = transform_of(handle(handlers, *command, session=session))
    assert outcome.request is None  # sent as the client wrote it
    assert outcome.transform is not None
    imap = ring.encrypt(b"imap-secret", b"imap")
    oauth2 = ring.encrypt(b"oauth2-token", b"oauth2")

    reply = outcome.transform(session, array(imap, b"alice", None, oauth2, resp3=resp3))  # type: ignore[arg-type]

    assert reply == array(b"imap-secret", b"alice", None, b"oauth2-token", resp3=resp3)


def test_hgetdel_reply_with_a_moved_value_names_the_field_and_not_the_value(
    handlers: dict[bytes, Handler], ring: KeyRing
) -> None:
    session = StandInSession()
    outcome = transform_of(handle(handlers, "HGETDEL", "iad:1", "FIELDS", "2", "smtp", "imap"))
    assert outcome.transform is not None
    moved = ring.encrypt(b"imap-secret", b"imap")  # sealed for imap, stored in smtp

    with pytest.raises(ReplyError) as caught:
        outcome.transform(session, array(moved, moved))  # type: ignore[arg-type]

    message = str(caught.value)
    assert message == f"ERR fieldcrypt: cannot decrypt field 'smtp' of key 'iad:1': {AUTH_FAILED}"
    assert moved.decode() not in message and "imap-secret" not in message


def test_hgetex_reply_with_cleartext_passes_it_through(
    handlers: dict[bytes, Handler], crypt: FieldCrypt
) -> None:
    session = StandInSession()
    outcome = transform_of(handle(handlers, "HGETEX", "iad:1", "FIELDS", "1", "imap"))
    assert outcome.transform is not None

    reply = outcome.transform(session, array(b"written-before-fieldcrypt"))  # type: ignore[arg-type]

    assert reply == array(b"written-before-fieldcrypt")
    assert crypt.counts["cleartext read"] == 1


@pytest.mark.parametrize(
    "command",
    [
        ["HGETEX", "iad:1", "EX", "60", "FIELDS", "1", "user"],
        ["HGETDEL", "session:1", "FIELDS", "1", "imap"],
        ["HGETDEL", "iad:1", "imap"],  # no FIELDS: Redis answers the syntax error
    ],
    ids=["unprotected-field", "key-without-rule", "no-fields-keyword"],
)
def test_hgetex_and_hgetdel_without_protected_fields_are_forwarded_untouched(
    handlers: dict[bytes, Handler], command: list[str]
) -> None:
    assert handle(handlers, *command) is None


# --- Refusals, for completeness of the pure core ---------------------------------------


def test_hincrby_on_a_protected_field_is_answered_locally(handlers: dict[bytes, Handler]) -> None:
    outcome = handle(handlers, "HINCRBY", "iad:1", "imap", "1")

    assert isinstance(outcome, Answer) and outcome.refusal
    assert outcome.reply == (
        b"-ERR fieldcrypt: HINCRBY cannot work on field 'imap' of key 'iad:1': "
        b"it is stored encrypted\r\n"
    )
    assert handle(handlers, "HINCRBY", "iad:1", "logins", "1") is None


# --- HSCAN and SORT options, read as Redis reads them -------------------------------


def test_hscan_novalues_counts_only_as_an_option(handlers: dict[bytes, Handler]) -> None:
    assert handle(handlers, "HSCAN", "iad:1", "0", "NOVALUES") is None  # names only
    assert handle(handlers, "HSCAN", "iad:1", "0", "COUNT", "5", "novalues") is None
    for pattern in ("novalues", "NOVALUES"):  # a MATCH pattern, not the option
        transform_of(handle(handlers, "HSCAN", "iad:1", "0", "MATCH", pattern))


def test_sort_patterns_are_split_where_redis_splits_them(
    handlers: dict[bytes, Handler], ring: KeyRing
) -> None:
    """The field follows the first `->` after the first `*`, and the key is the rest with
    the element in place of that `*`: here a key name that holds `->` itself, bound."""
    outcome = transform_of(handle(handlers, "SORT", "ids", "GET", "vault:a->*->token"))
    assert outcome.request is not None
    assert parse_request(outcome.request)[-2:] == [b"GET", b"#"]  # the element, to name the key
    sealed = ring.encrypt(b"arrow-secret", b"token", b"vault:a->7")

    assert outcome.transform is not None
    reply = outcome.transform(StandInSession(), array(sealed, b"7"))  # type: ignore[arg-type]

    assert reply == array(b"arrow-secret")


@pytest.mark.parametrize(
    "by",
    ["iad:1->imap", "nosort", "iad:*->", "iad:*"],  # no `*`: no sorting; no field: a string
)
def test_sort_by_a_pattern_that_reads_no_protected_field_is_not_refused(
    handlers: dict[bytes, Handler], by: str
) -> None:
    assert handle(handlers, "SORT", "ids", "BY", by) is None
    refused = handle(handlers, "SORT", "ids", "BY", "iad:*->imap")
    assert isinstance(refused, Answer) and refused.refusal
