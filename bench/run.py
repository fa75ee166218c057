"""The benchmark: servers up, prefill, interleaved rounds of redis-benchmark, memory tests,
report. See bench/README.md."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import memory, pooling, report, servers
from bench.load import (
    CLIENTS,
    HASH_TESTS,
    MANY_TESTS,
    TESTS,
    Client,
    fill_key,
    prefill,
    redis_benchmark,
    size_label,
    value,
)
from bench.load import redis_benchmark_version as rb_version
from bench.servers import Server, ServerError

HERE = Path(__file__).resolve().parent
GiB = 1 << 30
MiB = 1 << 20


@dataclass
class Target:
    """What redis-benchmark is pointed at: a server, a key prefix, and which tests."""

    name: str
    server: str  # key into the servers dict
    prefix: str  # 5 characters, so every target's keys have the same length
    tests: tuple[str, ...]
    pipelines: tuple[int, ...]
    proxy: bool = True  # False for Redis itself: no proxy CPU to report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark fieldcrypt against direct Redis, twemproxy and a byte forwarder.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: one round, fewer requests, 64 B only, no 10,000-connection "
        "or 1 GiB tests (under 2 minutes)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (3; --quick: 1)")
    parser.add_argument(
        "--requests",
        type=int,
        help="requests per SET and GET run at pipeline 16 (100000; --quick: 30000); other "
        "runs scale from it, the same for every target: pipeline 1 a quarter; HSET and HGET "
        "a half, HMGET a quarter, HGETALL a twentieth (a hundredth with 1 KB values); "
        "at least 1000",
    )
    parser.add_argument(
        "--proxy-ref",
        metavar="REF",
        help="run fieldcrypt's proxy/ as of this git commit (e.g. HEAD: what is committed) "
        "instead of the working tree, which someone may be editing while the benchmark runs",
    )
    parser.add_argument(
        "--before",
        metavar="REF",
        help="also run fieldcrypt's proxy/ as of this git commit, passthrough, as target "
        "fc-before (SET and GET), e.g. db3755a^ for the last one before pooled mode",
    )
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.requests is None:
        args.requests = 30_000 if args.quick else 100_000
    if args.rounds < 1 or args.requests < 1:
        parser.error("--rounds and --requests must be positive")
    return args


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [tool for tool in ("redis-server", "redis-benchmark") if not shutil.which(tool)]
    if missing:
        log(
            f"bench: {', '.join(missing)} not found: "
            "apt-get install redis-server redis-tools (Debian's packages)"
        )
        return 2

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    workdir = Path(tempfile.mkdtemp(prefix="fieldcrypt-bench-"))
    keep = False
    try:
        result = run(args, workdir)
    except ServerError as error:
        log(f"bench: {error}\nbench: logs kept in {workdir}")
        keep = True
        return 1
    finally:
        servers.stop_all()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / "latest.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    chart_path = args.out / "latest.png"
    skipped = report.chart(result, chart_path)
    text = report.markdown(result)
    (args.out / "latest.md").write_text(text + "\n")
    print(text)
    log(f"results: {json_path}")
    log(f"chart: {chart_path}" if skipped is None else f"chart skipped: {skipped}")
    return 0


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    started = time.time()
    quick: bool = args.quick
    sizes = [64] if quick else [64, 1024]
    soft, hard = memory.raise_nofile()  # before starting anything: children inherit it
    log(f"bench: work directory {workdir}; open-file limit {soft} (hard {hard})")
    meta: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "quick": quick,
        "rounds": args.rounds,
        "requests": args.requests,
        "sizes": sizes,
        "clients": 50,
        "cpus": os.cpu_count(),
        "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": sys.version.split()[0],
        "redis_benchmark": rb_version(),
        "redis_server": tool_version(["redis-server", "--version"]),
        "nutcracker": tool_version([servers.nutcracker_binary() or "nutcracker", "-V"]),
    }
    targets_info: dict[str, dict[str, Any]] = {}
    procs: dict[str, Server] = {}
    meta["proxy"] = proxy_source(args.proxy_ref, workdir)
    log(f"bench: fieldcrypt from {meta['proxy']}")

    redis = servers.start_redis(workdir)
    procs["redis"] = redis
    log(f"bench: redis-server on {redis.port}")

    twemproxy_binary = servers.nutcracker_binary()
    if twemproxy_binary is None:
        log("bench: nutcracker not found: apt-get install nutcracker; twemproxy rows skipped")
        targets_info["twemproxy"] = {
            "skipped": "nutcracker not installed (apt-get install nutcracker)"
        }
    else:
        procs["twemproxy"] = servers.start_twemproxy(twemproxy_binary, workdir, redis.port)
    procs["forwarder"] = servers.start_forwarder(workdir, redis.port)
    procs["fc-passthrough"] = servers.start_fieldcrypt(
        "fc-passthrough", workdir, redis.port, mode="pooled", pool_size=pooling.POOL_SIZE
    )
    procs["fc-dedicated"] = servers.start_fieldcrypt(
        "fc-dedicated", workdir, redis.port, mode="dedicated"
    )
    if args.before:
        before_root = servers.export_proxy(args.before, workdir / "before")
        meta["before"] = tool_version(
            ["git", "-C", str(servers.ROOT), "log", "-1", "--format=%h (%cs)", args.before]
        )
        procs["fc-before"] = servers.start_fieldcrypt(
            "fc-before", workdir, redis.port, root=before_root
        )
        log(f"bench: fc-before is proxy/ at {meta['before']}")
    config = workdir / "protected.yaml"
    config.write_text(
        f'keys:\n  - secret: "{servers.keygen()}"\nrules:\n  - key: "bench:*"\n    fields: ["*"]\n'
    )
    procs["fc-rules"] = servers.start_fieldcrypt("fc-rules", workdir, redis.port, config)

    workers_note: str | None = None
    if servers.fieldcrypt_supports_workers():
        for n in (1, 2):
            try:
                procs[f"fc-workers-{n}"] = servers.start_fieldcrypt(
                    f"fc-workers-{n}", workdir, redis.port, workers=n
                )
            except ServerError as error:
                workers_note = f"fieldcrypt serve --workers {n} failed to start: {error}"
                break
    else:
        workers_note = "fieldcrypt serve has no --workers option in this checkout"
    if workers_note is not None:
        log(f"bench: --workers scaling not run: {workers_note}")
        for n in (1, 2):
            stale = procs.pop(f"fc-workers-{n}", None)
            if stale is not None:
                servers.stop(stale)
            targets_info[f"fc-workers-{n}"] = {"skipped": workers_note}

    all_tests = tuple(TESTS)
    fifty = tuple(t for t in TESTS if t not in MANY_TESTS)
    targets = [
        Target("redis", "redis", "redis", all_tests, (1, 16), proxy=False),
        Target("twemproxy", "twemproxy", "twemp", all_tests, (1, 16)),
        Target("forwarder", "forwarder", "fwder", all_tests, (1, 16)),
        Target("fc-passthrough", "fc-passthrough", "fcpas", all_tests, (1, 16)),
        Target("fc-dedicated", "fc-dedicated", "fcded", ("SET", "GET", *MANY_TESTS), (1, 16)),
        Target("fc-before", "fc-before", "fcbef", ("SET", "GET", *MANY_TESTS), (1, 16)),
        Target("fc-protected", "fc-rules", "bench", fifty, (1, 16)),
        Target("fc-unprotected", "fc-rules", "plain", HASH_TESTS, (1, 16)),
        Target("fc-workers-1", "fc-workers-1", "fcw1x", ("SET", "GET"), (16,)),
        Target("fc-workers-2", "fc-workers-2", "fcw2x", ("SET", "GET"), (16,)),
    ]
    target_order = [t.name for t in targets]
    targets = [t for t in targets if t.server in procs]

    log("bench: prefilling the keys the read tests read, through each target")
    for target in targets:
        port = procs[target.server].port
        for size in sizes:
            kinds = [k for k in (TESTS[t].prefill for t in target.tests) if k is not None]
            prefill(port, target.prefix, size, kinds)
    checks = verify_encryption(procs["fc-rules"].port, redis.port, sizes)
    if not checks["ok"]:
        log(f"bench: WARNING: the protected target does not behave as expected: {checks}")

    runs = throughput(args, targets, procs, sizes)

    for name, proc in procs.items():
        info = targets_info.setdefault(name, {})
        info["pids"] = " ".join(map(str, proc.pids()))
        info["peak_rss_kb"] = proc.hwm_kb()
        info["port"] = proc.port
    for name in list(procs):
        if name != "redis":
            servers.stop(procs.pop(name))

    log(f"bench: {pooling.MANY_CLIENTS} clients on fresh pooled and dedicated proxies")
    connections = pooling.connection_tests(workdir, redis, args.requests // 2)
    memory_result = memory_tests(quick, workdir, redis)
    summary = report.summarize(runs, target_order)
    workers = workers_summary(runs, summary, sizes, workers_note)
    result: dict[str, Any] = {
        "meta": meta,
        "target_order": target_order,
        "targets": targets_info,
        "encryption_check": checks,
        "summary": summary,
        "workers": workers,
        "memory": memory_result,
        "connections": connections,
        "goals": report.goals(runs, sizes, memory_result, connections),
        "runs": runs,
    }
    servers.stop(redis)
    meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    meta["duration_s"] = round(time.time() - started, 1)
    return result


def proxy_source(ref: str | None, workdir: Path) -> str:
    """Where the fieldcrypt under test comes from: `ref` exported (and used from now on),
    or the working tree (said dirty when proxy/ has uncommitted changes)."""
    git = ["git", "-C", str(servers.ROOT)]
    if ref is not None:
        servers.use_fieldcrypt_from(servers.export_proxy(ref, workdir / "proxy-ref"))
        return f"{ref} = {tool_version([*git, 'log', '-1', '--format=%h (%cs)', ref])}"
    head = tool_version([*git, "log", "-1", "--format=%h (%cs)"])
    try:
        status = subprocess.run(
            [*git, "status", "--porcelain", "--", "proxy"],
            capture_output=True,
            timeout=30,
            check=False,
        ).stdout.decode()
    except (OSError, subprocess.TimeoutExpired):
        status = "?"
    dirty = ", proxy/ with uncommitted changes" if status.strip() else ""
    return f"the working tree at {head}{dirty}"


def tool_version(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (done.stdout or done.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else "unknown"


def verify_encryption(proxy_port: int, redis_port: int, sizes: list[int]) -> dict[str, Any]:
    """Protected fields are ciphertext in Redis and plaintext through the proxy;
    unprotected ones are plaintext in both."""
    checks: dict[str, Any] = {}
    with Client(proxy_port) as through, Client(redis_port) as direct:
        for size in sizes:
            label = size_label(size)
            protected = fill_key("bench", size, "h", 0)
            plain = fill_key("plain", size, "h", 0)
            stored = direct.call("HGET", protected, "f5")
            checks[f"{label} protected stored encrypted"] = isinstance(
                stored, bytes
            ) and stored.startswith(b"$fc1$")
            checks[f"{label} protected read back"] = through.call("HGET", protected, "f5") == value(
                size
            )
            checks[f"{label} unprotected stored in clear"] = direct.call(
                "HGET", plain, "f5"
            ) == value(size)
    checks["ok"] = all(checks.values())
    return checks


def throughput(
    args: argparse.Namespace, targets: list[Target], procs: dict[str, Server], sizes: list[int]
) -> list[dict[str, Any]]:
    """Every (test, pipeline, size) on every target, `args.rounds` times, interleaved: each
    round runs every target once per configuration, the target order rotating per round."""
    configs = [
        (test, pipeline, size)
        for size in sizes
        for pipeline in (1, 16)
        for test in TESTS
        if any(test in t.tests and pipeline in t.pipelines for t in targets)
        # the 1,000-client tests: pipeline 1 and 64 B only
        and (TESTS[test].clients == CLIENTS or (pipeline == 1 and size == 64))
    ]
    total = args.rounds * sum(
        1 for c in configs for t in targets if c[0] in t.tests and c[1] in t.pipelines
    )
    runs: list[dict[str, Any]] = []
    broken: dict[str, str] = {}
    redis = procs["redis"]
    done = 0
    for round_number in range(1, args.rounds + 1):
        shift = (round_number - 1) % len(targets)
        order = targets[shift:] + targets[:shift]
        for test_name, pipeline, size in configs:
            test = TESTS[test_name]
            requests = test.requests(args.requests, pipeline, size)
            for target in order:
                if test_name not in target.tests or pipeline not in target.pipelines:
                    continue
                done += 1
                proc = procs[target.server]
                row: dict[str, Any] = {
                    "round": round_number,
                    "target": target.name,
                    "test": test_name,
                    "pipeline": pipeline,
                    "size": size,
                    "clients": test.clients,
                    "requests": requests,
                    "rps": None,
                    "p50_ms": None,
                    "p99_ms": None,
                    "seconds": None,
                    "cpu_s": None,
                    "redis_cpu_s": None,
                    "error": broken.get(target.server),
                }
                runs.append(row)
                if row["error"] is not None:
                    continue
                if not servers.ping(proc.port, timeout=5):
                    broken[target.server] = f"{proc.name} stopped answering:\n{proc.log_tail()}"
                    row["error"] = broken[target.server]
                    log(f"bench: {row['error']}")
                    continue
                # fieldcrypt under many clients: its upstream connections, sampled
                sampler = (
                    pooling.Sampler(proc.port)
                    if target.name in ("fc-passthrough", "fc-dedicated") and test.clients != CLIENTS
                    else contextlib.nullcontext()
                )
                cpu_before, redis_before = proc.cpu(), redis.cpu()
                with sampler:
                    result = redis_benchmark(
                        proc.port,
                        test.args(target.prefix, size),
                        requests,
                        pipeline,
                        test.keyspace,
                        clients=test.clients,
                    )
                cpu_after, redis_after = proc.cpu(), redis.cpu()
                if isinstance(sampler, pooling.Sampler):
                    row["upstream_peak"] = dict(sampler.peak, sampler_error=sampler.error)
                row.update(
                    rps=result.rps,
                    p50_ms=result.p50_ms,
                    p99_ms=result.p99_ms,
                    seconds=round(result.seconds, 3),
                    cpu_s=round(cpu_after - cpu_before, 3) if target.proxy else None,
                    redis_cpu_s=round(redis_after - redis_before, 3),
                    error=result.error,
                )
                shown = f"{result.rps:,.0f} req/s" if result.rps else f"ERROR {result.error}"
                log(
                    f"[round {round_number}/{args.rounds} {done}/{total}] {target.name} "
                    f"{test_name} P{pipeline} {size_label(size)}: {shown}"
                )
    return runs


def memory_tests(quick: bool, workdir: Path, redis: Server) -> dict[str, Any]:
    out: dict[str, Any] = {}
    counts = [1000] if quick else [1000, 10_000]
    log(f"bench: idle connections {counts} to a fresh dedicated-mode passthrough proxy")
    # dedicated: each client's upstream connection is part of what is measured (and waited
    # for); pooled mode's RSS with 1,000 clients is in the connection tests
    out["idle"] = on_fresh_proxy(
        "fc-idle",
        "dedicated",
        workdir,
        redis,
        lambda p: memory.idle_connections(p, redis.port, counts),
    )
    limit = 128 * MiB if quick else GiB
    log(f"bench: a client writes {limit // MiB} MiB of SETs without reading, fresh proxy")
    out["nonreading"] = on_fresh_proxy(
        "fc-nonreading",
        "pooled",
        workdir,
        redis,
        lambda p: memory.nonreading_client(p, redis.port, limit),
    )
    return out


def on_fresh_proxy(
    name: str,
    mode: str,
    workdir: Path,
    redis: Server,
    test: Callable[[Server], dict[str, Any]],
) -> dict[str, Any]:
    """`test` on a fresh passthrough fieldcrypt; {"error": ...} if it fails or the proxy
    does not start."""
    try:
        proxy = servers.start_fieldcrypt(name, workdir, redis.port, mode=mode)
    except ServerError as error:
        return {"error": f"fieldcrypt did not start: {error}"}
    try:
        return test(proxy)
    except (OSError, RuntimeError, ServerError) as error:
        return {"error": f"{error.__class__.__name__}: {error}"}
    finally:
        servers.stop(proxy)


def workers_summary(
    runs: list[dict[str, Any]], summary: list[dict[str, Any]], sizes: list[int], note: str | None
) -> dict[str, Any]:
    if note is not None:
        return {"skipped": note}
    rows = []
    for size in sizes:
        for test in ("SET", "GET"):
            w1 = report.find(summary, "fc-workers-1", test, 16, size)
            w2 = report.find(summary, "fc-workers-2", test, 16, size)
            one = w1["rps"] if w1 else None
            two = w2["rps"] if w2 else None
            rows.append(
                {
                    "test": test,
                    "size": size,
                    "w1_rps": one,
                    "w2_rps": two,
                    "w2_over_w1": report.median_or_none(
                        report.paired(
                            runs, ("fc-workers-2", test, 16, size), ("fc-workers-1", test, 16, size)
                        )
                    ),
                }
            )
    return {"rows": rows}
