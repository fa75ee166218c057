"""Throughput through fieldcrypt in front of a Redis Cluster, next to direct cluster clients.

    python -m bench.cluster [--requests 100000] [--rounds 3]

Starts a 3-master, 3-replica cluster of Debian redis-server processes, and
fieldcrypt with a redis+cluster:// upstream (passthrough, and with rules that
protect a hash field). Then, per round and back to back: redis-benchmark with
`--cluster` straight at the cluster (a cluster-aware client), and redis-benchmark
at fieldcrypt's single endpoint. 50 clients; SET and GET at pipeline 1 and 16, and
HSET/HGET of a protected field through fieldcrypt with rules. Ratios within a run
are what to read; everything shares this machine's cores. 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from bench.scripts import benchmark, start_proxy
from proxy.crypto import generate_key
from proxy.embedded import free_cluster_ports

HOST = "127.0.0.1"


def cluster_ports(count: int) -> list[int]:
    ports = free_cluster_ports(count, HOST)
    if ports is None:
        raise SystemExit("no free block of ports for the cluster (ports and ports+10000)")
    return ports


def start_cluster(directory: Path, binary: str) -> tuple[list[int], list[subprocess.Popen[bytes]]]:
    ports = cluster_ports(6)
    processes = []
    for port in ports:
        node = directory / str(port)
        node.mkdir()
        processes.append(
            subprocess.Popen(
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    HOST,
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(node / "nodes.conf"),
                    "--cluster-node-timeout",
                    "2000",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(node),
                    "--logfile",
                    str(node / "log"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    for port in ports:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"cluster node {port} did not start") from None
                time.sleep(0.05)
    created = subprocess.run(
        [
            "redis-cli",
            "--cluster",
            "create",
            *(f"{HOST}:{p}" for p in ports),
            "--cluster-replicas",
            "1",
            "--cluster-yes",
        ],
        capture_output=True,
        timeout=60,
    )
    if created.returncode != 0:
        raise SystemExit(created.stdout.decode()[-1000:])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        states = [
            b"cluster_state:ok" in redis.Redis(port=p).execute_command("CLUSTER", "INFO")
            for p in ports
        ]
        if all(states):
            return ports, processes
        time.sleep(0.2)
    raise SystemExit("the cluster did not reach cluster_state:ok")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="bench/results/cluster.json")
    args = parser.parse_args()
    binary = shutil.which("redis-server")
    if not binary or not shutil.which("redis-benchmark"):
        raise SystemExit(
            "redis-server and redis-benchmark are needed: apt-get install redis-server"
        )
    work = Path(tempfile.mkdtemp(prefix="fc-bench-cluster-"))
    (work / "key").write_text(generate_key())
    config = work / "rules.yaml"
    config.write_text(
        f"keys:\n  - secret_file: {work / 'key'}\n"
        'rules:\n  - key: "bench:*"\n    fields: [secret]\n'
    )
    processes: list[subprocess.Popen[bytes]] = []
    proxies: list[subprocess.Popen[bytes]] = []
    try:
        ports, processes = start_cluster(work, binary)
        url = f"redis+cluster://{HOST}:{ports[0]},{HOST}:{ports[1]}"
        plain, plain_port = start_proxy(0, None, upstream_url=url)
        ruled, ruled_port = start_proxy(0, config, upstream_url=url)
        proxies = [plain, ruled]
        runs = {
            "SET": ["set", "key:__rand_int__", "x" * 64],
            "GET": ["get", "key:__rand_int__"],
        }
        hash_runs = {
            "HSET protected": ["hset", "bench:__rand_int__", "secret", "x" * 64],
            "HGET protected": ["hget", "bench:__rand_int__", "secret"],
        }
        rates: dict[str, list[float]] = {}

        def record(name: str, value: float) -> None:
            rates.setdefault(name, []).append(value)

        for round_number in range(args.rounds):
            for pipeline in (1, 16):
                n = args.requests if pipeline > 1 else args.requests // 4
                extra = ["-P", str(pipeline), "-r", "100000"]
                for test, command in runs.items():
                    # With --cluster, redis-benchmark spreads keys over the masters by
                    # swapping {tag} for one that each node owns; fieldcrypt spreads the
                    # untagged keys by their own slots.
                    tagged = [command[0], "{tag}" + command[1], *command[2:]]
                    direct = benchmark(ports[0], n, [*extra, "--cluster", *tagged])
                    through = benchmark(plain_port, n, [*extra, *command])
                    record(f"P{pipeline} {test} direct --cluster", direct)
                    record(f"P{pipeline} {test} fieldcrypt", through)
                    record(f"P{pipeline} {test} ratio", through / direct)
                for test, command in hash_runs.items():
                    through = benchmark(ruled_port, n, [*extra, *command])
                    record(f"P{pipeline} {test} fieldcrypt (rules)", through)
            print(f"round {round_number + 1} done", flush=True)
        results = {name: round(statistics.median(values), 3) for name, values in rates.items()}
        print("| measurement | median |")
        print("|---|--:|")
        for name, value in results.items():
            shown = f"{value:.2f}x" if name.endswith("ratio") else f"{value:,.0f} req/s"
            print(f"| {name} | {shown} |")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    finally:
        for proxy in proxies:
            proxy.terminate()
            proxy.wait(10)
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
