"""Migration benchmark: re-key N protected fields, and application latency during a job.

    python -m bench.migration [--fields 1000000] [--per-hash 10] [--seconds 10]

1. Fills a private redis-server with N protected fields written under key A
   (ciphertext made here with fieldcrypt's own crypto, loaded with pipelines).
2. Times `fieldcrypt migrate --secret B --decrypt A --rate 0` (re-keys all of them).
3. Measures the p50/p99 latency of an application's HGET/HSET traffic through a
   fieldcrypt proxy (ring [B, A]), first alone, then while an admin MIGRATE runs at
   the default rate (re-keying B -> C through a proxy restarted with ring [C, B]).

Everything runs on 127.0.0.1; the loops are bounded by count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis

from bench.scripts import start_proxy
from proxy.crypto import Key, KeyRing, derive_key, generate_key
from proxy.embedded import EmbeddedServer

RULES = 'rules:\n  - key: "acct:*"\n    fields: ["secret*"]\n'


def fill(port: int, fields: int, per_hash: int, secret: str) -> None:
    ring = KeyRing([Key.from_bytes(derive_key(secret))])
    client = redis.Redis(port=port)
    pipe = client.pipeline(transaction=False)
    hashes = fields // per_hash
    for h in range(hashes):
        mapping = {}
        for f in range(per_hash):
            name = f"secret{f}".encode()
            mapping[name] = ring.encrypt(b"value-%d-%d" % (h, f), name)
        pipe.hset(f"acct:{h}", mapping=mapping)
        if h % 1000 == 999:
            pipe.execute()
    pipe.execute()


def latency(port: int, seconds: float, hashes: int) -> dict[str, float]:
    """An application's HGET/HSET loop through the proxy: p50 and p99 in ms."""
    client = redis.Redis(port=port)
    samples: list[float] = []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end and i < 1_000_000:
        key = f"acct:{(i * 7919) % hashes}"
        started = time.perf_counter()
        if i % 4 == 0:
            client.hset(key, "secret0", b"app-%d" % i)
        else:
            client.hget(key, "secret1")
        samples.append((time.perf_counter() - started) * 1000)
        i += 1
    samples.sort()
    return {
        "requests": len(samples),
        "p50_ms": round(statistics.median(samples), 3),
        "p99_ms": round(samples[int(len(samples) * 0.99) - 1], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fields", type=int, default=1_000_000)
    parser.add_argument("--per-hash", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", default="bench/results/migration.json")
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if not binary:
        raise SystemExit("redis-server is missing: apt-get install redis-server")
    work = Path(tempfile.mkdtemp(prefix="fc-bench-migration-"))
    config = work / "fieldcrypt.yaml"
    config.write_text(RULES)
    server = EmbeddedServer(binary)
    server.start()
    results: dict[str, object] = {"fields": args.fields, "per_hash": args.per_hash}
    a, b, c = generate_key(), generate_key(), generate_key()
    try:
        started = time.perf_counter()
        fill(server.port, args.fields, args.per_hash, a)
        results["fill_seconds"] = round(time.perf_counter() - started, 1)
        print(f"filled {args.fields} fields under key A in {results['fill_seconds']} s", flush=True)

        started = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "proxy.cli",
                "migrate",
                "--redis",
                server.url,
                "--config",
                str(config),
                "--secret",
                b,
                "--decrypt",
                a,
                "--rate",
                "0",
            ],
            capture_output=True,
            text=True,
        )
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            print(done.stdout, done.stderr)
            raise SystemExit("migrate failed")
        results["rekey_seconds"] = round(elapsed, 1)
        results["rekey_fields_per_second"] = round(args.fields / elapsed)
        print(
            f"re-keyed {args.fields} fields A -> B in {elapsed:.1f} s "
            f"({args.fields / elapsed:,.0f} fields/s, process start included)",
            flush=True,
        )

        hashes = args.fields // args.per_hash
        (work / "c").write_text(c)
        (work / "b").write_text(b)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FIELDCRYPT_")}
        config.write_text(
            f"keys:\n  - secret_file: {work / 'c'}\n  - secret_file: {work / 'b'}\n"
            "    decrypt_only: true\n" + RULES
        )
        proxy, port = start_proxy(server.port, config, env=env)
        try:
            alone = latency(port, args.seconds, hashes)
            print(f"application alone:       {alone}", flush=True)
            admin = redis.Redis(port=port)
            admin.execute_command("MIGRATE")  # the default rate
            during: dict[str, float] = {}
            runner = threading.Thread(
                target=lambda: during.update(latency(port, args.seconds, hashes))
            )
            runner.start()
            runner.join()
            status = admin.execute_command("MIGRATE", "STATUS")
            admin.execute_command("MIGRATE", "CANCEL")
            print(f"application during job:  {during}", flush=True)
            if isinstance(status, list):
                status = dict(zip(status[::2], status[1::2], strict=True))
            report = {(k.decode() if isinstance(k, bytes) else k): v for k, v in status.items()}
            results.update(
                alone=alone,
                during=during,
                p99_ratio=round(during["p99_ms"] / alone["p99_ms"], 2),
                job_fields_per_second_at_default_rate=str(report.get("fields_per_second", "?")),
            )
            print(f"p99 during / alone: {results['p99_ratio']}x (target at most 2x)")
        finally:
            proxy.terminate()
            proxy.wait(10)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
