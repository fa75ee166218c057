"""The session core alone: µs of CPU per request, with no sockets and no Redis.

A Session (proxy/session.py) with the dispatch the proxy builds from a config is
fed request bytes and the replies Redis would send, with no-op writers: what is
left is fieldcrypt's own Python per request (framing, bookkeeping, the command
table, AES-GCM). The socket benchmark (`python -m bench`) adds the event loop
and the kernel, and runs with cold caches, which costs about twice as much.

    python -m bench.session                          # the table
    python -m bench.session --profile HGETALL:protected:16   # cProfile of one row
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from proxy import app
from proxy.config import load_settings
from proxy.crypto import generate_key
from proxy.resp import bulk, encode_request
from proxy.session import Session, base_dispatch

VALUE = b"v" * 64
HASHES = 1000  # 10-field hashes, as bench/load.py prefills
BIG_HASHES = 100  # 100-field hashes, for HGETALL
Pair = tuple[bytes, bytes]  # a request and the reply Redis gives it


def dispatch_and_crypt() -> tuple[dict[bytes, Any], Any]:
    """The dispatch for a config that protects every field of keys `bench:*`."""
    work = Path(tempfile.mkdtemp(prefix="fc-bench-session-"))
    config = work / "fieldcrypt.yaml"
    config.write_text(
        f'keys:\n  - secret: "{generate_key()}"\nrules:\n  - key: "bench:*"\n    fields: ["*"]\n'
    )
    built = app.build_handlers_for(load_settings(str(config), {}, {}, work))
    dispatch = base_dispatch()
    dispatch.update(built.handlers)
    return dispatch, built.crypt


def workload(command: str, protected: bool, crypt: Any, count: int) -> list[Pair]:
    prefix = b"bench" if protected else b"plain"
    rng = random.Random(1)

    def stored(field: bytes) -> bytes:
        return crypt.keyring.encrypt(VALUE, field) if protected else VALUE

    if command == "GET":
        return [(encode_request([b"GET", b"k:%d" % i]), bulk(VALUE)) for i in range(count)]
    if command == "SET":
        return [(encode_request([b"SET", b"k:%d" % i, VALUE]), b"+OK\r\n") for i in range(count)]
    if command == "HSET":
        return [
            (
                encode_request(
                    [b"HSET", b"%s:w:%d" % (prefix, rng.randrange(100_000)), b"f1", VALUE]
                ),
                b":1\r\n",
            )
            for _ in range(count)
        ]
    if command in ("HGET", "HMGET"):
        fields = [b"f%d" % n for n in range(1, 11)]
        values = [stored(field) for field in fields]  # the same stored bytes in every hash
        pairs = []
        for _ in range(count):
            key = b"%s:h:%d" % (prefix, rng.randrange(HASHES))
            if command == "HGET":
                pairs.append((encode_request([b"HGET", key, b"f5"]), bulk(values[4])))
            else:
                reply = b"*10\r\n" + b"".join(map(bulk, values))
                pairs.append((encode_request([b"HMGET", key, *fields]), reply))
        return pairs
    if command == "HGETALL":
        fields = [b"f%d" % n for n in range(1, 101)]
        reply = b"*200\r\n" + b"".join(bulk(f) + bulk(stored(f)) for f in fields)
        return [
            (encode_request([b"HGETALL", b"%s:H:%d" % (prefix, rng.randrange(BIG_HASHES))]), reply)
            for _ in range(count)
        ]
    raise ValueError(command)


def cpu_per_request(session: Session, pairs: list[Pair], pipeline: int, rounds: int) -> float:
    """The best of `rounds` passes, in µs of this process's CPU per request."""
    batches = [
        (
            b"".join(r for r, _ in pairs[i : i + pipeline]),
            b"".join(p for _, p in pairs[i : i + pipeline]),
        )
        for i in range(0, len(pairs), pipeline)
    ]
    to_redis, from_redis = session.client_data, session.upstream_data
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time()
        for requests, replies in batches:
            to_redis(requests)
            from_redis(replies)
        best = min(best, time.process_time() - started)
    return best / len(pairs) * 1e6


def row(command: str, protected: bool, pipeline: int, count: int, rounds: int) -> float:
    dispatch, crypt = dispatch_and_crypt()
    pairs = workload(command, protected, crypt, count)
    session = Session(dispatch, lambda data: None, lambda data: None)
    cpu_per_request(session, pairs[:1000], pipeline, 1)  # warm: rule and decrypt caches
    return cpu_per_request(session, pairs, pipeline, rounds)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.session", description=__doc__)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", metavar="CMD:KIND:PIPELINE", help="e.g. HGET:protected:16")
    args = parser.parse_args()
    if args.profile:
        command, kind, pipeline = args.profile.split(":")
        profiler = cProfile.Profile()
        run: Callable[[], float] = lambda: row(  # noqa: E731
            command, kind == "protected", int(pipeline), args.requests, 1
        )
        micros = profiler.runcall(run)
        print(f"{args.profile}: {micros:.2f} µs/request (profiled)")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return 0
    print(
        "| command | pipeline | µs/request, no rule | µs, unprotected field "
        "| µs, protected field | protected vs unprotected |"
    )
    print("|---|--:|--:|--:|--:|--:|")
    for command in ("GET", "SET", "HSET", "HGET", "HMGET", "HGETALL"):
        count = args.requests // (10 if command == "HGETALL" else 1)
        for pipeline in (1, 16):
            if command in ("GET", "SET"):
                plain = row(command, False, pipeline, count, args.rounds)
                print(f"| {command} | {pipeline} | {plain:.2f} | | | |")
                continue
            unprotected = row(command, False, pipeline, count, args.rounds)
            protected = row(command, True, pipeline, count, args.rounds)
            print(
                f"| {command} | {pipeline} | | {unprotected:.2f} | {protected:.2f} | "
                f"{unprotected / protected:.2f}x |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
