"""Where a passthrough fieldcrypt spends its time under redis-benchmark: py-spy samples of
the proxy's Python stacks, and its user and system CPU time.

    python -m bench.profile --mode pooled --test GET --pipeline 1
    python -m bench.profile --mode dedicated --test SET --pipeline 16 --native

It starts a redis-server and `fieldcrypt serve` under `py-spy record` (pip install
py-spy; py-spy starts the proxy itself, so no ptrace permission is needed), runs
redis-benchmark once as a warm-up and once measured, and prints the functions with the
most samples: on top of the stack (self) and anywhere in it (inclusive), as a share of
the samples taken while the proxy ran Python (idle time in the event loop is not
sampled). Samples cover the warm-up too. With --native, C frames (uvloop, hiredis,
libpython) are in the stacks as well.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench import servers
from bench.load import TESTS, prefill, redis_benchmark
from bench.servers import HOST, ROOT, Server, _stat_fields

PREFIX = "prof_"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--mode", choices=("pooled", "dedicated"), default="pooled")
    parser.add_argument("--test", choices=("SET", "GET"), default="GET")
    parser.add_argument("--pipeline", type=int, default=1)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument(
        "--proxy-ref", metavar="REF", help="proxy/ as of this git commit, not the working tree"
    )
    parser.add_argument("--size", type=int, default=64, help="value size in bytes")
    parser.add_argument("--native", action="store_true", help="C frames too (py-spy --native)")
    parser.add_argument(
        "--perf",
        action="store_true",
        help="perf record the proxy (kernel included; needs root or perf_event_paranoid <= 1) "
        "during the measured run instead of py-spy: shares by binary (dso) and by symbol",
    )
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw output here")
    return parser.parse_args(argv)


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of these processes."""
    user = system = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            user += int(fields[11])
            system += int(fields[12])
    return user / servers.CLOCK_TICKS, system / servers.CLOCK_TICKS


def frame_name(frame: str) -> str:
    """'function (file.py:123)' -> 'function (file.py)': lines of one function together."""
    name, _, where = frame.rpartition(" (")
    if not name:
        return frame
    return f"{name} ({where.rsplit(':', 1)[0].rstrip(')')})"


def summarize(raw: Path, top: int) -> list[str]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    if not total:
        return ["no samples"]
    lines = [f"{total:,} samples while running Python", "", "self (top of stack):"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in own.most_common(top)]
    lines += ["", "inclusive (anywhere in the stack):"]
    lines += [f"  {n / total:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if args.perf and not shutil.which("perf"):
        print("bench.profile: perf not found: apt-get install linux-perf", file=sys.stderr)
        return 2
    if not args.perf and not os.access(py_spy, os.X_OK):
        print("bench.profile: py-spy not found: pip install py-spy", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="fieldcrypt-profile-"))
    raw = args.raw or workdir / "py-spy.txt"
    try:
        redis = servers.start_redis(workdir)
        port = servers.free_port()
        spy = (
            []
            if args.perf
            else [
                py_spy,
                "record",
                "--format",
                "raw",
                "--rate",
                str(args.rate),
                "--output",
                str(raw),
                *(["--native"] if args.native else []),
                "--",
            ]
        )
        command = [*spy, *servers.serve_command(port, f"redis://{HOST}:{redis.port}")]
        root = (
            servers.export_proxy(args.proxy_ref, workdir / "proxy-ref") if args.proxy_ref else ROOT
        )
        env = servers.proxy_env(root)
        env["FIELDCRYPT_UPSTREAM_MODE"] = args.mode
        log = workdir / "proxy.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=root,
                env=env,
            )
        proxy = Server("fc-profiled", port, popen, log, processes=1 if args.perf else 2)
        servers._started.append(proxy)
        proxy.wait_ready()
        if args.test == "GET":
            prefill(redis.port, PREFIX, args.size, ["g"])
        test = TESTS[args.test]
        bench_args = test.args(PREFIX, args.size)
        warm = redis_benchmark(
            port, bench_args, args.requests // 4, args.pipeline, test.keyspace, args.clients
        )
        pids = proxy.pids() if args.perf else proxy.pids()[1:]  # the proxy, not py-spy
        perf_data = workdir / "perf.data"
        recorder = (
            subprocess.Popen(
                ["perf", "record", "-F", "999", "-o", str(perf_data), "-p", str(pids[0])],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            if args.perf
            else None
        )
        user0, sys0 = cpu_split(pids)
        started = time.monotonic()
        result = redis_benchmark(
            port, bench_args, args.requests, args.pipeline, test.keyspace, args.clients
        )
        seconds = time.monotonic() - started
        user1, sys1 = cpu_split(pids)
        if recorder is not None:
            recorder.send_signal(signal.SIGINT)
            recorder.wait(60)
        # py-spy writes its output when interrupted, then ends the proxy it started
        with contextlib.suppress(ProcessLookupError):
            os.kill(popen.pid, signal.SIGINT)
        try:
            popen.wait(30)
        except subprocess.TimeoutExpired:
            proxy.stop()
        servers.stop(proxy)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        n = args.requests
        print(
            f"fieldcrypt passthrough, upstream_mode {args.mode}: {args.test} {args.size} B, "
            f"-c {args.clients} -P {args.pipeline}, {n:,} requests in {seconds:.1f} s "
            f"({result.rps or 0:,.0f} req/s; warm-up {warm.rps or 0:,.0f}); load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        print(
            f"proxy CPU per request: user {(user1 - user0) / n * 1e6:.1f} µs, "
            f"system {(sys1 - sys0) / n * 1e6:.1f} µs "
            f"(busy {(user1 - user0 + sys1 - sys0) / seconds:.0%} of one core)"
        )
        if result.error:
            print(f"redis-benchmark: {result.error}")
        print()
        if args.perf:
            for sort in ("dso", "dso,sym"):
                report = subprocess.run(
                    ["perf", "report", "-i", str(perf_data), "--sort", sort, "--stdio"],
                    capture_output=True,
                    timeout=120,
                    check=False,
                )
                shown = [
                    line
                    for line in report.stdout.decode(errors="replace").splitlines()
                    if line.strip() and not line.startswith("#")
                ]
                print(f"perf, by {sort}:")
                print("\n".join(shown[: args.top]))
                print()
        else:
            print("\n".join(summarize(raw, args.top)))
    finally:
        servers.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)  # --raw's file is outside it
    return 0


if __name__ == "__main__":
    sys.exit(main())
