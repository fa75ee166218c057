"""Memory tests of the passthrough proxy: idle connections, and a client that never reads."""

from __future__ import annotations

import contextlib
import resource
import select
import socket
import time
from typing import Any

from bench.load import Client, encode
from bench.servers import HOST, Server, nofile_limit, open_fds

MiB = 1024 * 1024
NONREADING_STALL = 5.0  # seconds of blocked writes that end the non-reading client test
SAMPLE_EVERY = 0.25
RECEIVE_BUFFER = 64 * 1024  # the non-reading client's SO_RCVBUF


def raise_nofile() -> tuple[int, int]:
    """Raise our soft RLIMIT_NOFILE to the hard limit; the (soft, hard) we end up with.
    Processes started afterwards inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def redis_clients(redis_port: int) -> int:
    with Client(redis_port, timeout=10) as client:
        info = client.call("INFO", "clients")
    assert isinstance(info, bytes)
    for line in info.decode().splitlines():
        if line.startswith("connected_clients:"):
            return int(line.split(":")[1])
    raise RuntimeError("no connected_clients in INFO")


def idle_connections(proxy: Server, redis_port: int, counts: list[int]) -> dict[str, Any]:
    """The proxy's RSS with `counts` idle client connections open (each one also has its
    upstream connection to Redis). Counts are capped by the open-file limits: the proxy
    needs two descriptors per client."""
    own_soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    proxy_soft = nofile_limit(proxy.pid)
    cap = min((proxy_soft - 64) // 2, own_soft - 64)
    time.sleep(0.5)
    baseline_rss = proxy.rss_kb()
    baseline_clients = redis_clients(redis_port)
    socks: list[socket.socket] = []
    points: list[dict[str, Any]] = []
    try:
        for wanted in counts:
            reach = min(wanted, cap)
            while len(socks) < reach:
                batch = min(250, reach - len(socks))
                for _ in range(batch):
                    socks.append(socket.create_connection((HOST, proxy.port), timeout=10))
                _wait_clients(redis_port, baseline_clients + len(socks), timeout=30)
            connected = _wait_clients(redis_port, baseline_clients + len(socks), timeout=30)
            time.sleep(1.0)  # let the proxy settle
            alive = _ping_through(socks[-1]) if socks else False
            rss = proxy.rss_kb()
            points.append(
                {
                    "requested": wanted,
                    "opened": len(socks),
                    "upstream_connections": connected - baseline_clients,
                    "capped_by_fd_limit": reach < wanted,
                    "rss_kb": rss,
                    "rss_mib": round(rss / 1024, 1),
                    "per_connection_kb": round((rss - baseline_rss) / max(1, len(socks)), 2),
                    "proxy_fds": open_fds(proxy.pids()),
                    "last_connection_answers_ping": alive,
                }
            )
    finally:
        for sock in socks:
            sock.close()
    return {
        "baseline_rss_kb": baseline_rss,
        "baseline_rss_mib": round(baseline_rss / 1024, 1),
        "nofile_soft_bench": own_soft,
        "nofile_soft_proxy": proxy_soft,
        "points": points,
    }


def _wait_clients(redis_port: int, wanted: int, timeout: float) -> int:
    """Wait until Redis sees `wanted` clients (or stops gaining); how many it sees."""
    deadline = time.monotonic() + timeout
    seen = redis_clients(redis_port)
    while seen < wanted and time.monotonic() < deadline:
        time.sleep(0.1)
        seen = redis_clients(redis_port)
    return seen


def _ping_through(sock: socket.socket) -> bool:
    try:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def nonreading_client(
    proxy: Server, redis_port: int, limit_bytes: int, value_size: int = 100
) -> dict[str, Any]:
    """One client pipelines SET commands (`value_size` bytes each) as fast as the proxy takes
    them and never reads a reply; with 100-byte values 1 GiB is some 7 million commands, and
    their replies far exceed the socket buffers. Stops at `limit_bytes` written, or when
    writes have blocked for 5 s. Records the proxy's RSS over time: it must not grow with
    the bytes written."""
    payload = b"x" * value_size
    chunk = b"".join(encode(b"SET", b"nonreading:%d" % i, payload) for i in range(1024))
    before = proxy.rss_kb()
    samples: list[dict[str, Any]] = []
    written = 0
    stalled = False
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small fixed receive buffer: the client's kernel must not absorb the replies
    # (receive autotuning could grow it to tcp_rmem's maximum).
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    receive_buffer = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    sock.settimeout(10)
    sock.connect((HOST, proxy.port))
    sock.setblocking(False)
    started = time.monotonic()
    last_progress = started
    next_sample = started
    view = memoryview(chunk)
    offset = 0
    try:
        while written < limit_bytes:
            now = time.monotonic()
            if now >= next_sample:
                samples.append(_sample(proxy, now - started, written))
                next_sample = now + SAMPLE_EVERY
            if now - last_progress >= NONREADING_STALL:
                stalled = True
                break
            _, writable, _ = select.select([], [sock], [], SAMPLE_EVERY)
            if not writable:
                continue
            try:
                sent = sock.send(
                    view[offset : offset + min(len(chunk) - offset, limit_bytes - written)]
                )
            except BlockingIOError:
                continue
            if sent:
                written += sent
                offset = (offset + sent) % len(chunk)
                last_progress = time.monotonic()
        elapsed = time.monotonic() - started
        samples.append(_sample(proxy, elapsed, written))
        time.sleep(1.0)
        samples.append(_sample(proxy, time.monotonic() - started, written))
        held_by_redis = redis_output_buffers(redis_port)
    finally:
        sock.close()
    time.sleep(2.0)
    after_close = proxy.rss_kb()
    alive = proxy.alive()
    answers = False
    if alive:
        with contextlib.suppress(OSError, ConnectionError), Client(proxy.port, timeout=10) as c:
            answers = c.call("PING") == b"PONG"
    return {
        "limit_bytes": limit_bytes,
        "bytes_written": written,
        "seconds": round(elapsed, 2),
        "stopped_because": "writes blocked for 5 s" if stalled else "limit reached",
        "rss_before_kb": before,
        "rss_peak_kb": max(s["rss_kb"] for s in samples),
        "rss_after_close_kb": after_close,
        "value_size": value_size,
        "redis_output_buffer_bytes": held_by_redis,
        "client_receive_buffer": receive_buffer,
        "proxy_alive_after": alive,
        "proxy_answers_after": answers,
        "samples": samples,
        **judge_bounded(before, samples, written),
    }


def redis_output_buffers(redis_port: int) -> int:
    """The largest client output buffer in Redis (CLIENT LIST omem): the replies Redis
    holds because the proxy stopped reading them, i.e. backpressure reached Redis."""
    with Client(redis_port, timeout=10) as client:
        listing = client.call("CLIENT", "LIST")
    assert isinstance(listing, bytes)
    largest = 0
    for line in listing.decode().splitlines():
        for item in line.split():
            if item.startswith("omem="):
                largest = max(largest, int(item[5:]))
    return largest


def _sample(proxy: Server, seconds: float, written: int) -> dict[str, Any]:
    return {"t": round(seconds, 2), "bytes_written": written, "rss_kb": proxy.rss_kb()}


def judge_bounded(before_kb: int, samples: list[dict[str, Any]], written: int) -> dict[str, Any]:
    """Bounded: RSS over the second half of the bytes written rose by at most 16 MiB over
    the first half's peak, and the whole run grew it by at most 128 MiB."""
    half = written / 2
    first = [s["rss_kb"] for s in samples if s["bytes_written"] <= half] or [before_kb]
    second = [s["rss_kb"] for s in samples if s["bytes_written"] > half] or first
    growth_second_half = max(second) - max(first)
    growth_total = max(s["rss_kb"] for s in samples) - before_kb
    return {
        "rss_growth_second_half_kb": growth_second_half,
        "rss_growth_total_kb": growth_total,
        "bounded": growth_second_half <= 16 * 1024 and growth_total <= 128 * 1024,
    }
