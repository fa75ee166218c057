"""Lua scripts through fieldcrypt: the cost of the script-reply check and of decryption.

    python -m bench.scripts [--requests 20000] [--rounds 5]
    python -m bench.scripts --in-process    # µs per call through a Session, no sockets

Targets (from the Lua scripts issue), measured in the same run, rounds interleaved:
- EVALSHA of a small script whose reply holds no protected data, through fieldcrypt
  with rules (every script reply is checked for the header), at >= 0.95x of the same
  through fieldcrypt in passthrough;
- an account-listing script returning the HGETALL of 3 protected account hashes,
  decrypted through fieldcrypt with rules, at >= 0.8x of passthrough (which returns
  the stored ciphertext untouched).
redis-benchmark, 50 clients, pipeline 1. Everything on 127.0.0.1. Each proxy gets a
warm-up run per workload first, and the order of the two alternates from round to round.

--in-process feeds the same requests and replies through a Session built as the proxy
builds it, with no sockets: the proxy's own cost per call, steadier than the end-to-end
ratios on a shared machine.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from proxy import resp
from proxy.app import build_state
from proxy.config import load_settings
from proxy.crypto import generate_key
from proxy.embedded import EmbeddedServer, free_port
from proxy.session import Session, base_dispatch

SMALL = "return redis.call('GET', KEYS[1])"
LIST = (
    "local rows = {} for i, key in ipairs(KEYS) do rows[i] = redis.call('HGETALL', key) end "
    "return {#KEYS, 0, rows}"
)
RULES = 'rules:\n  - key: "iad:*"\n    fields: [imap, smtp, oauth2]\n'


def account(i: int) -> dict[str, str]:
    """The hash iad:<i>: three protected fields, three that are not."""
    return {
        "imap": f'{{"auth":{{"user":"u{i}","pass":"imap-secret-{i}"}}}}',
        "smtp": f'{{"auth":{{"user":"u{i}","pass":"smtp-secret-{i}"}}}}',
        "oauth2": f'{{"accessToken":"token-{i}"}}',
        "name": f"Account {i}",
        "email": f"u{i}@example.com",
        "state": "connected",
    }


def start_proxy(
    upstream: int,
    config: Path | None,
    upstream_url: str | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """fieldcrypt on a free port, once it answers PING."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "proxy.cli",
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        upstream_url or f"redis://127.0.0.1:{upstream}",
        "--log-level",
        "warning",
    ]
    if config is not None:
        command += ["--config", str(config)]
    process = subprocess.Popen(command, env=env)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            client.ping()
            return process, port
        except redis.ConnectionError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the proxy did not start")


def benchmark(port: int, requests: int, args: list[str]) -> float:
    done = subprocess.run(
        [
            "redis-benchmark",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-c",
            "50",
            "-n",
            str(requests),
            "--csv",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    text = done.stdout
    header = text.find('"test"')  # --cluster prints the nodes it found first
    rows = list(csv.DictReader(io.StringIO(text[header:] if header >= 0 else "")))
    if not rows:
        raise SystemExit(f"redis-benchmark failed: {done.stderr.strip()[:200]}")
    return float(rows[0]["rps"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="bench/results/scripts.json")
    parser.add_argument(
        "--in-process", action="store_true", help="µs per call through a Session, no sockets"
    )
    args = parser.parse_args()
    if args.in_process:
        return in_process()
    binary = shutil.which("redis-server")
    if not binary or not shutil.which("redis-benchmark"):
        raise SystemExit(
            "redis-server and redis-benchmark are needed: apt-get install redis-server"
        )
    work = Path(tempfile.mkdtemp(prefix="fc-bench-scripts-"))
    (work / "key").write_text(generate_key())
    config = work / "fieldcrypt.yaml"
    config.write_text(f"keys:\n  - secret_file: {work / 'key'}\n" + RULES)
    server = EmbeddedServer(binary)
    server.start()
    proxies: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        proxies["passthrough"] = start_proxy(server.port, None)
        proxies["rules"] = start_proxy(server.port, config)
        through_rules = redis.Redis(port=proxies["rules"][1])
        for i in range(1, 4):  # written through the proxy with rules: stored encrypted
            through_rules.hset(f"iad:{i}", mapping=account(i))  # type: ignore[arg-type]
        through_rules.set("plain", "x" * 64)
        small = through_rules.script_load(SMALL)
        listing = through_rules.script_load(LIST)
        workloads = {
            "EVALSHA small, no protected data": ["evalsha", small, "1", "plain"],
            "EVALSHA list-accounts (3 protected rows)": [
                "evalsha",
                listing,
                "3",
                "iad:1",
                "iad:2",
                "iad:3",
            ],
        }
        ratios: dict[str, list[float]] = {name: [] for name in workloads}
        rates: dict[str, dict[str, list[float]]] = {
            name: {"passthrough": [], "rules": []} for name in workloads
        }
        for command in workloads.values():  # connections, caches and decisions warm
            for _, port in proxies.values():
                benchmark(port, max(args.requests // 10, 1000), command)
        for round_number in range(args.rounds):
            for name, command in workloads.items():
                if round_number % 2:  # rules first every other round: drift cancels out
                    with_rules = benchmark(proxies["rules"][1], args.requests, command)
                    base = benchmark(proxies["passthrough"][1], args.requests, command)
                else:
                    base = benchmark(proxies["passthrough"][1], args.requests, command)
                    with_rules = benchmark(proxies["rules"][1], args.requests, command)
                rates[name]["passthrough"].append(base)
                rates[name]["rules"].append(with_rules)
                ratios[name].append(with_rules / base)
            print(f"round {round_number + 1} done", flush=True)
        targets = {
            "EVALSHA small, no protected data": 0.95,
            "EVALSHA list-accounts (3 protected rows)": 0.8,
        }
        results = {}
        print("| script | passthrough req/s | with rules req/s | ratio | target |")
        print("|---|--:|--:|--:|---|")
        for name in workloads:
            ratio = statistics.median(ratios[name])
            passthrough = statistics.median(rates[name]["passthrough"])
            with_rules = statistics.median(rates[name]["rules"])
            verdict = "met" if ratio >= targets[name] else "not met"
            print(
                f"| {name} | {passthrough:,.0f} | {with_rules:,.0f} | {ratio:.2f}x | "
                f">= {targets[name]}x: {verdict} |"
            )
            results[name] = {
                "passthrough_rps": passthrough,
                "rules_rps": with_rules,
                "ratio": round(ratio, 3),
                "target": targets[name],
                "met": ratio >= targets[name],
                "ratios_by_round": [round(r, 3) for r in ratios[name]],
            }
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    finally:
        for process, _ in proxies.values():
            process.terminate()
            process.wait(10)
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def in_process(calls: int = 200, batches: int = 30) -> int:
    """Each workload's request and reply through a Session with the dispatch the proxy
    builds (rules) or none (passthrough), as Redis would answer; the best of `batches`."""
    work = Path(tempfile.mkdtemp(prefix="fc-bench-scripts-"))
    try:
        (work / "key").write_text(generate_key())
        (work / "fieldcrypt.yaml").write_text(f"keys:\n  - secret_file: {work / 'key'}\n" + RULES)
        settings = load_settings(str(work / "fieldcrypt.yaml"), {}, {}, work)
        state = build_state(settings, "redis://127.0.0.1:1")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert state.crypt is not None
    keyring = state.crypt.keyring
    rows = []
    for i in range(1, 4):
        row = []
        for field, value in account(i).items():
            stored = value.encode()
            if field in ("imap", "smtp", "oauth2"):
                stored = keyring.encrypt(stored, field.encode())
            row += [field.encode(), stored]
        rows.append(resp.encode_request(row))  # an HGETALL row: an array of bulk strings
    small = hashlib.sha1(SMALL.encode()).hexdigest().encode()
    listing = hashlib.sha1(LIST.encode()).hexdigest().encode()
    workloads = {
        "EVALSHA small, no protected data": (
            resp.encode_request([b"evalsha", small, b"1", b"plain"]),
            b"$64\r\n" + b"x" * 64 + b"\r\n",
        ),
        "EVALSHA list-accounts (3 protected rows)": (
            resp.encode_request([b"evalsha", listing, b"3", b"iad:1", b"iad:2", b"iad:3"]),
            b"*3\r\n:3\r\n:0\r\n*3\r\n" + b"".join(rows),
        ),
    }
    logging.getLogger("fieldcrypt").setLevel(logging.ERROR)  # the undeclared-script warning
    print("| script | passthrough µs/call | with rules µs/call | added µs |")
    print("|---|--:|--:|--:|")
    for name, (request, reply) in workloads.items():
        costs = []
        for dispatch in (base_dispatch(), state.dispatch):
            sent: list[bytes | bytearray] = []
            session = Session(dispatch, lambda data: None, sent.append)
            best = float("inf")
            for _ in range(batches):
                started = time.perf_counter()
                for _ in range(calls):
                    session.client_data(request)
                    session.upstream_data(reply)
                best = min(best, (time.perf_counter() - started) / calls)
            costs.append(best * 1e6)
            if dispatch is state.dispatch and b"$fc1$" in reply:
                assert b"$fc1$" not in sent[-1], "the reply was not decrypted"
        print(f"| {name} | {costs[0]:.1f} | {costs[1]:.1f} | {costs[1] - costs[0]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
