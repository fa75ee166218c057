"""Redis Cluster routing, with no I/O: key slots, the slot map, where each command's
keys are, redirects, and the replies fieldcrypt gives when it announces itself.

The shell (cluster_server.py) asks this module which slot a request belongs to and
which master owns that slot; it never parses a reply to learn the topology itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

SLOTS: Final = 16384
CROSSSLOT: Final = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n"

Address = tuple[str, int]


# --- Key slots ----------------------------------------------------------------------


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


_CRC16: Final = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), as Redis Cluster's keyHashSlot uses it."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16[((crc >> 8) ^ byte) & 0xFF]
    return crc


def key_slot(key: bytes) -> int:
    """The slot of `key`: only the part inside the first non-empty {...} is hashed."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc16(key) % SLOTS


# --- The slot map ---------------------------------------------------------------------


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class SlotMap:
    """Which master serves each slot. `masters` is ordered by the lowest slot each
    serves, so an index into it survives a failover (the promoted replica takes over
    the same slots)."""

    masters: list[Address] = field(default_factory=list)
    owner: list[int] = field(default_factory=lambda: [-1] * SLOTS)  # index into masters

    @classmethod
    def from_ranges(cls, ranges: Iterable[tuple[int, int, Address]]) -> SlotMap:
        first_slot: dict[Address, int] = {}
        listed = []
        for start, end, address in ranges:
            listed.append((start, end, address))
            first_slot[address] = min(first_slot.get(address, SLOTS), start)
        masters = sorted(first_slot, key=first_slot.__getitem__)
        index = {address: number for number, address in enumerate(masters)}
        owner = [-1] * SLOTS
        for start, end, address in listed:
            for slot in range(max(start, 0), min(end, SLOTS - 1) + 1):
                owner[slot] = index[address]
        return cls(masters, owner)

    def node_of(self, slot: int) -> Address | None:
        number = self.owner[slot]
        return self.masters[number] if number >= 0 else None

    def move(self, slot: int, address: Address) -> None:
        """What a MOVED reply says, applied at once (the full map follows)."""
        if address not in self.masters:
            self.masters.append(address)
        self.owner[slot] = self.masters.index(address)

    @property
    def covered(self) -> bool:
        return -1 not in self.owner


def _address(host: Any, port: Any, fallback_host: str) -> Address:
    text = _text(host) if host not in (None, b"", "", b"?") else fallback_host
    return text, int(port)


def parse_cluster_slots(reply: Sequence[Any], fallback_host: str) -> SlotMap:
    """CLUSTER SLOTS: [[start, end, [host, port, id, ...], replicas...], ...]."""
    ranges = []
    for entry in reply:
        start, end, master = int(entry[0]), int(entry[1]), entry[2]
        ranges.append((start, end, _address(master[0], master[1], fallback_host)))
    return SlotMap.from_ranges(ranges)


def _pairs(value: Any) -> dict[str, Any]:
    """A RESP3 map (a dict) or a RESP2 flat list of name/value pairs, as a dict."""
    if isinstance(value, dict):
        return {_text(k): v for k, v in value.items()}
    return {_text(value[i]): value[i + 1] for i in range(0, len(value) - 1, 2)}


def parse_cluster_shards(reply: Sequence[Any], fallback_host: str) -> SlotMap:
    """CLUSTER SHARDS (Redis 7+): each shard's slot ranges and its nodes; the master
    that is online serves them."""
    ranges = []
    for shard in reply:
        fields = _pairs(shard)
        bounds = [int(n) for n in fields.get("slots", [])]
        master: Address | None = None
        for node in fields.get("nodes", []):
            info = _pairs(node)
            if _text(info.get("role", "")) == "master" and _text(info.get("health", "")) in (
                "online",
                "",
            ):
                port = info.get("port") or info.get("tls-port")
                host = info.get("ip") or info.get("endpoint")
                if port is not None:
                    master = _address(host, port, fallback_host)
        if master is None:
            continue
        for i in range(0, len(bounds) - 1, 2):
            ranges.append((bounds[i], bounds[i + 1], master))
    return SlotMap.from_ranges(ranges)


def shard_nodes(reply: Sequence[Any], fallback_host: str) -> list[Address]:
    """Every node CLUSTER SHARDS lists, replicas included: where to ask next time."""
    found = []
    for shard in reply:
        for node in _pairs(shard).get("nodes", []):
            info = _pairs(node)
            port = info.get("port") or info.get("tls-port")
            if port is not None:
                found.append(_address(info.get("ip") or info.get("endpoint"), port, fallback_host))
    return found


# --- Redirects ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Redirect:
    ask: bool  # ASK: this request only; MOVED: the slot lives there now
    slot: int
    address: Address


def parse_redirect(frame: bytes, fallback_host: str) -> Redirect | None:
    """`-MOVED 3999 127.0.0.1:6381` or `-ASK 3999 127.0.0.1:6381`, else None."""
    if not (frame.startswith(b"-MOVED ") or frame.startswith(b"-ASK ")):
        return None
    words = frame[1:].split(b"\r\n", 1)[0].split()
    if len(words) != 3:
        return None
    host, _, port = words[2].decode(errors="replace").rpartition(":")
    try:
        return Redirect(words[0] == b"ASK", int(words[1]), (host or fallback_host, int(port)))
    except ValueError:
        return None


# --- Where a command's keys are ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeySpec:
    """Legacy key positions from COMMAND: first, last (negative from the end), step."""

    first: int
    last: int
    step: int
    movable: bool = False
    readonly: bool = False  # safe to send again when its outcome is unknown


def _numkeys_at(at: int, skip_before: int = 0) -> Any:
    """Keys counted by the argument at `at`, following it (after `skip_before` more)."""

    def keys(args: Sequence[bytes]) -> list[bytes]:
        count = int(args[at])
        start = at + 1 + skip_before
        return list(args[start : start + count])

    return keys


def _first_then_numkeys(at: int) -> Any:
    """A destination key in args[1], then numkeys at `at` and that many keys."""

    def keys(args: Sequence[bytes]) -> list[bytes]:
        count = int(args[at])
        return [args[1], *args[at + 1 : at + 1 + count]]

    return keys


def _streams(args: Sequence[bytes]) -> list[bytes]:
    upper = [a.upper() for a in args]
    at = upper.index(b"STREAMS")
    rest = args[at + 1 :]
    return list(rest[: len(rest) // 2])


def _sort(args: Sequence[bytes]) -> list[bytes]:
    """SORT key [BY pattern] [GET pattern]... [STORE dest]: patterns are not keys."""
    keys = [args[1]]
    upper = [a.upper() for a in args]
    for i in range(2, len(args) - 1):
        if upper[i] == b"STORE":
            keys.append(args[i + 1])
    return keys


def _migrate(args: Sequence[bytes]) -> list[bytes]:
    """MIGRATE host port key|"" db timeout [COPY] [REPLACE] [AUTH..] [KEYS k...]."""
    if args[3]:
        return [args[3]]
    upper = [a.upper() for a in args]
    return list(args[upper.index(b"KEYS") + 1 :]) if b"KEYS" in upper else []


def _georadius(first: int) -> Any:
    def keys(args: Sequence[bytes]) -> list[bytes]:
        found = [args[1]]
        upper = [a.upper() for a in args]
        for i in range(first, len(args) - 1):
            if upper[i] in (b"STORE", b"STOREDIST"):
                found.append(args[i + 1])
        return found

    return keys


# Commands whose keys COMMAND cannot describe with first/last/step (movablekeys).
MOVABLE: Final[dict[bytes, Any]] = {
    b"EVAL": _numkeys_at(2),
    b"EVALSHA": _numkeys_at(2),
    b"EVAL_RO": _numkeys_at(2),
    b"EVALSHA_RO": _numkeys_at(2),
    b"FCALL": _numkeys_at(2),
    b"FCALL_RO": _numkeys_at(2),
    b"ZUNIONSTORE": _first_then_numkeys(2),
    b"ZINTERSTORE": _first_then_numkeys(2),
    b"ZDIFFSTORE": _first_then_numkeys(2),
    b"ZUNION": _numkeys_at(1),
    b"ZINTER": _numkeys_at(1),
    b"ZDIFF": _numkeys_at(1),
    b"ZINTERCARD": _numkeys_at(1),
    b"SINTERCARD": _numkeys_at(1),
    b"LMPOP": _numkeys_at(1),
    b"ZMPOP": _numkeys_at(1),
    b"BLMPOP": _numkeys_at(2),
    b"BZMPOP": _numkeys_at(2),
    b"XREAD": _streams,
    b"XREADGROUP": _streams,
    b"SORT": _sort,
    b"SORT_RO": _sort,
    b"MIGRATE": _migrate,
    b"GEORADIUS": _georadius(6),
    b"GEORADIUSBYMEMBER": _georadius(5),
}


class CommandTable:
    """Key positions of every command the cluster knows, learnt from its COMMAND reply."""

    def __init__(self, specs: dict[bytes, KeySpec] | None = None) -> None:
        self.specs = specs or {}

    @classmethod
    def from_command_reply(cls, reply: Sequence[Any]) -> CommandTable:
        specs: dict[bytes, KeySpec] = {}

        def learn(entry: Sequence[Any]) -> None:
            name = entry[0].upper() if isinstance(entry[0], bytes) else str(entry[0]).upper()
            name_bytes = name if isinstance(name, bytes) else name.encode()
            flags = {f.lower() if isinstance(f, bytes) else str(f).encode() for f in entry[2]}
            specs[name_bytes] = KeySpec(
                int(entry[3]),
                int(entry[4]),
                int(entry[5]),
                b"movablekeys" in flags,
                b"readonly" in flags,
            )
            if len(entry) > 9 and entry[9]:
                for sub in entry[9]:
                    learn(sub)

        for entry in reply:
            learn(entry)
        return cls(specs)

    def readonly(self, name: bytes) -> bool:
        spec = self.specs.get(name.upper())
        return spec is not None and spec.readonly

    def keys(self, args: Sequence[bytes]) -> list[bytes] | None:
        """The keys of a request (name first), [] for none, None when it is unknown.
        Raises IndexError/ValueError for a malformed request (Redis answers it)."""
        name = args[0].upper()
        movable = MOVABLE.get(name)
        if movable is not None:
            return list(movable(args))
        spec = None
        if len(args) > 1:
            spec = self.specs.get(name + b"|" + args[1].lower()) or self.specs.get(
                name + b"|" + args[1].upper()
            )
        if spec is None:
            spec = self.specs.get(name) or self.specs.get(name.lower())
        if spec is None:
            return None
        if spec.first <= 0:
            return []
        last = spec.last if spec.last >= 0 else len(args) + spec.last
        last = min(last, len(args) - 1)
        step = max(spec.step, 1)
        return [args[i] for i in range(spec.first, last + 1, step)]


def slots_of(keys: Iterable[bytes]) -> set[int]:
    return {key_slot(key) for key in keys}


# --- SCAN across masters -----------------------------------------------------------------

SCAN_NODE_BITS: Final = 10  # up to 1024 masters
"""fieldcrypt's SCAN cursor is `node_cursor * 1024 + master_index`: the low 10 bits name
the master (in slot order) being walked, the rest is that master's own cursor. Cursor 0
starts at the first master; fieldcrypt returns 0 only after the last master is done."""


def split_cursor(cursor: int) -> tuple[int, int]:
    """(master index, that master's cursor)."""
    return cursor & ((1 << SCAN_NODE_BITS) - 1), cursor >> SCAN_NODE_BITS


def join_cursor(index: int, node_cursor: int) -> int:
    return (node_cursor << SCAN_NODE_BITS) | index


# --- Announcing fieldcrypt as a one-node cluster -------------------------------------------


def self_node_id(host: str, port: int) -> bytes:
    return hashlib.sha1(f"fieldcrypt {host}:{port}".encode()).hexdigest().encode()


def _bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def announce_slots(host: str, port: int) -> bytes:
    """CLUSTER SLOTS: fieldcrypt serves slots 0-16383."""
    node = b"*3\r\n" + _bulk(host.encode()) + b":%d\r\n" % port + _bulk(self_node_id(host, port))
    return b"*1\r\n*3\r\n:0\r\n:16383\r\n" + node


def announce_shards(host: str, port: int, resp3: bool) -> bytes:
    """CLUSTER SHARDS: one shard, one master, every slot."""

    def pairs(items: list[tuple[bytes, bytes]]) -> bytes:
        head = b"%%%d\r\n" % len(items) if resp3 else b"*%d\r\n" % (2 * len(items))
        return head + b"".join(_bulk(name) + value for name, value in items)

    node = pairs(
        [
            (b"id", _bulk(self_node_id(host, port))),
            (b"port", b":%d\r\n" % port),
            (b"ip", _bulk(host.encode())),
            (b"endpoint", _bulk(host.encode())),
            (b"role", _bulk(b"master")),
            (b"replication-offset", b":0\r\n"),
            (b"health", _bulk(b"online")),
        ]
    )
    shard = pairs([(b"slots", b"*2\r\n:0\r\n:16383\r\n"), (b"nodes", b"*1\r\n" + node)])
    return b"*1\r\n" + shard


def announce_nodes(host: str, port: int) -> bytes:
    """CLUSTER NODES: one line, this node, every slot."""
    line = b"%s %s:%d@%d myself,master - 0 0 1 connected 0-16383\n" % (
        self_node_id(host, port),
        host.encode(),
        port,
        port + 10000,
    )
    return _bulk(line)
