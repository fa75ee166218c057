"""The workload: the test matrix, prefilling through the target, and redis-benchmark runs."""

from __future__ import annotations

import csv
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import hiredis

from bench.servers import HOST

CLIENTS = 50
MANY_CLIENTS = 1000  # the "c=1000" tests: redis-benchmark -c 1000 at pipeline 1
GET_KEYS = 10_000  # strings prefilled for GET
HASHES = 1_000  # 10-field hashes prefilled for HGET and HMGET
BIG_HASHES = 100  # 100-field hashes prefilled for HGETALL
SMALL_FIELDS = 10
BIG_FIELDS = 100
WRITE_KEYSPACE = 100_000  # -r for SET and HSET
MIN_REQUESTS = 1_000


def size_label(size: int) -> str:
    return f"{size}B" if size < 1024 else f"{size // 1024}KB"


def value(size: int) -> bytes:
    return b"v" * size


def rand_key(prefix: str, size: int, kind: str) -> str:
    return f"{prefix}:{size_label(size)}:{kind}:__rand_int__"


def fill_key(prefix: str, size: int, kind: str, number: int) -> bytes:
    """The key redis-benchmark makes of __rand_int__ (12 digits, zero-padded)."""
    return f"{prefix}:{size_label(size)}:{kind}:{number:012d}".encode()


@dataclass(frozen=True)
class Test:
    name: str
    keyspace: int  # redis-benchmark -r
    weight: float  # share of --requests at pipeline 16
    prefill: str | None  # the kind of key it reads, prefilled before the runs
    clients: int = CLIENTS  # redis-benchmark -c
    command: str = ""  # the command it runs; "" = its name

    def args(self, prefix: str, size: int) -> list[str]:
        val = value(size).decode()
        name = self.command or self.name
        if name == "SET":
            return ["set", rand_key(prefix, size, "s"), val]
        if name == "GET":
            return ["get", rand_key(prefix, size, "g")]
        if name == "HSET":
            return ["hset", rand_key(prefix, size, "w"), "f1", val]
        if name == "HGET":
            return ["hget", rand_key(prefix, size, "h"), "f5"]
        if name == "HMGET":
            fields = [f"f{i}" for i in range(1, SMALL_FIELDS + 1)]
            return ["hmget", rand_key(prefix, size, "h"), *fields]
        if name == "HGETALL":
            return ["hgetall", rand_key(prefix, size, "H")]
        raise ValueError(self.name)

    def requests(self, base: int, pipeline: int, size: int) -> int:
        """How many requests a run of this test sends (the same for every target)."""
        share = self.weight * (1.0 if pipeline > 1 else 0.25)
        if self.name == "HGETALL" and size >= 1024:
            share /= 5  # 100 values of 1 KB per reply
        return max(MIN_REQUESTS, round(base * share))


TESTS: dict[str, Test] = {
    t.name: t
    for t in (
        Test("SET", WRITE_KEYSPACE, 1.0, None),
        Test("GET", GET_KEYS, 1.0, "g"),
        Test("HSET", WRITE_KEYSPACE, 0.5, None),
        Test("HGET", HASHES, 0.5, "h"),
        Test("HMGET", HASHES, 0.25, "h"),
        Test("HGETALL", BIG_HASHES, 0.05, "H"),
        # 1,000 clients at pipeline 1: twice the 50-client runs' requests, as each
        # client's connection setup is part of the run
        Test("SET c=1000", WRITE_KEYSPACE, 2.0, None, MANY_CLIENTS, "SET"),
        Test("GET c=1000", GET_KEYS, 2.0, "g", MANY_CLIENTS, "GET"),
    )
}
HASH_TESTS = ("HSET", "HGET", "HMGET", "HGETALL")
MANY_TESTS = ("SET c=1000", "GET c=1000")


# --- a tiny RESP client for prefilling and checks ---------------------------------


def encode(*args: bytes | str) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg.encode() if isinstance(arg, str) else arg
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class Client:
    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.reader = hiredis.Reader()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> object:
        while True:
            reply = self.reader.gets()
            if reply is not False:
                return reply
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("connection closed")
            self.reader.feed(chunk)

    def pipeline(self, commands: Iterable[bytes], batch: int = 200) -> list[object]:
        """Send the commands in batches; their replies. Error replies raise."""
        replies: list[object] = []
        pending: list[bytes] = []

        def flush() -> None:
            self.sock.sendall(b"".join(pending))
            for _ in pending:
                reply = self._read()
                if isinstance(reply, hiredis.ReplyError):
                    raise RuntimeError(f"error reply while prefilling: {reply}")
                replies.append(reply)
            pending.clear()

        for command in commands:
            pending.append(command)
            if len(pending) >= batch:
                flush()
        if pending:
            flush()
        return replies

    def call(self, *args: bytes | str) -> object:
        return self.pipeline([encode(*args)])[0]


def prefill(port: int, prefix: str, size: int, kinds: Iterable[str]) -> None:
    """Fill the keys that the read tests read, through the server on `port`."""
    val = value(size)
    with Client(port) as client:
        for kind in sorted(set(kinds)):
            if kind == "g":
                client.pipeline(
                    encode(b"SET", fill_key(prefix, size, "g", i), val) for i in range(GET_KEYS)
                )
            elif kind in ("h", "H"):
                count, fields = (HASHES, SMALL_FIELDS) if kind == "h" else (BIG_HASHES, BIG_FIELDS)
                pairs: list[bytes] = []
                for i in range(1, fields + 1):
                    pairs += [b"f%d" % i, val]
                client.pipeline(
                    (
                        encode(b"HSET", fill_key(prefix, size, kind, i), *pairs)
                        for i in range(count)
                    ),
                    batch=max(1, 2000 // fields),
                )


# --- redis-benchmark ------------------------------------------------------------------


@dataclass
class Result:
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    seconds: float = 0.0
    error: str | None = None


def _float(row: dict[str, str], column: str) -> float | None:
    text = row.get(column)
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def parse_csv(output: str) -> Result:
    """redis-benchmark --csv: a header line, then one line per test."""
    lines = [line for line in output.splitlines() if line.startswith('"')]
    rows = list(csv.reader(lines))
    header_index = next((i for i, row in enumerate(rows) if "rps" in row), None)
    if header_index is None or header_index + 1 >= len(rows):
        return Result(error="no CSV result in redis-benchmark's output")
    header = rows[header_index]
    row = dict(zip(header, rows[header_index + 1], strict=False))
    return Result(
        rps=_float(row, "rps"),
        p50_ms=_float(row, "p50_latency_ms"),
        p99_ms=_float(row, "p99_latency_ms"),
    )


def redis_benchmark(
    port: int,
    args: Sequence[str],
    requests: int,
    pipeline: int,
    keyspace: int,
    clients: int = CLIENTS,
) -> Result:
    command = [
        "redis-benchmark",
        "-h",
        HOST,
        "-p",
        str(port),
        "-c",
        str(clients),
        "-n",
        str(requests),
        "-P",
        str(pipeline),
        "-r",
        str(keyspace),
        "--csv",
        *args,
    ]
    # redis-benchmark spins forever when it cannot connect: always bounded.
    timeout = 120.0 + requests / 500
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return Result(error=f"redis-benchmark timed out after {timeout:.0f}s")
    seconds = time.monotonic() - started
    output = done.stdout.decode(errors="replace")
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    if done.returncode != 0 or errors:
        detail = errors[0] if errors else done.stderr.decode(errors="replace").strip()[-200:]
        return Result(seconds=seconds, error=f"redis-benchmark exit {done.returncode}: {detail}")
    result = parse_csv(output)
    result.seconds = seconds
    return result


def redis_benchmark_version() -> str:
    try:
        done = subprocess.run(
            ["redis-benchmark", "--version"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.decode(errors="replace").strip()
