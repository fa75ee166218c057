"""Upstream connections of fieldcrypt's pooled and dedicated modes: `FIELDCRYPT INFO
upstream` and Redis's own count, with 1,000 clients idle and under redis-benchmark."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any

from bench import servers
from bench.load import Client, encode, redis_benchmark
from bench.memory import redis_clients
from bench.servers import HOST, Server, ServerError

MANY_CLIENTS = 1000
POOL_SIZE = 4  # fieldcrypt's default upstream_pool_size; the bench sets it explicitly
SAMPLE_EVERY = 0.2
UPSTREAM_KINDS = ("shared", "spare", "dedicated")


def upstream_info(client: Client) -> dict[str, int | str]:
    """`FIELDCRYPT INFO upstream` (answered by the proxy itself; no password from
    loopback), as a dict."""
    reply = client.call("FIELDCRYPT", "INFO", "upstream")
    if not isinstance(reply, bytes):
        raise RuntimeError(f"FIELDCRYPT INFO upstream: unexpected reply {reply!r}")
    out: dict[str, int | str] = {}
    for line in reply.decode().splitlines():
        if ":" in line and not line.startswith("#"):
            key, _, text = line.partition(":")
            out[key] = int(text) if text.isdigit() else text
    return out


def upstream_total(info: dict[str, int | str]) -> int:
    return sum(int(info.get(f"upstream_connections_{kind}", 0)) for kind in UPSTREAM_KINDS)


class Sampler:
    """Polls the proxy's `FIELDCRYPT INFO upstream` (and, given a port, Redis's
    connected_clients) from a thread until stopped; keeps the largest values seen. Its
    own connection to the proxy is one more client (in dedicated mode, one more upstream
    connection)."""

    def __init__(self, proxy_port: int, redis_port: int | None = None) -> None:
        self.proxy_port = proxy_port
        self.redis_port = redis_port
        self.peak: dict[str, int] = {}
        self.samples = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _keep(self, name: str, value: int) -> None:
        self.peak[name] = max(self.peak.get(name, value), value)

    def _run(self) -> None:
        try:
            with Client(self.proxy_port, timeout=10) as proxy:
                while not self._stop.is_set():
                    info = upstream_info(proxy)
                    for kind in UPSTREAM_KINDS:
                        self._keep(kind, int(info.get(f"upstream_connections_{kind}", 0)))
                    self._keep("total", upstream_total(info))
                    if self.redis_port is not None:
                        self._keep("redis_clients", redis_clients(self.redis_port))
                    self.samples += 1
                    self._stop.wait(SAMPLE_EVERY)
        except (OSError, RuntimeError, ConnectionError) as error:
            self.error = f"{error.__class__.__name__}: {error}"


def _snapshot(proxy: Server, redis_port: int, baseline: int) -> dict[str, Any]:
    """Upstream connections now: by the proxy's count and by Redis's (connected_clients
    minus what it had before the proxy started; our INFO connection is in both)."""
    with Client(proxy.port, timeout=10) as client:
        info = upstream_info(client)
    seen = redis_clients(redis_port)
    return {
        **{kind: int(info.get(f"upstream_connections_{kind}", 0)) for kind in UPSTREAM_KINDS},
        "total": upstream_total(info),
        "redis_sees": seen - baseline,
        "rss_mib": round(proxy.rss_kb() / 1024, 1),
    }


def _settle(redis_port: int, seconds: float = 2.0) -> None:
    """Wait until Redis's client count stops moving (at most `seconds` * 5)."""
    deadline = time.monotonic() + seconds * 5
    last = redis_clients(redis_port)
    while time.monotonic() < deadline:
        time.sleep(seconds / 4)
        now = redis_clients(redis_port)
        if now == last:
            return
        last = now


def many_clients(
    mode: str, workdir: Path, redis: Server, requests: int, clients: int = MANY_CLIENTS
) -> dict[str, Any]:
    """A fresh fieldcrypt (passthrough, `mode`, pool size 4, one worker) with `clients`
    client connections: open and silent; then each having sent one PING (answered) and
    gone quiet; then, those closed, `redis-benchmark -c clients` SET, sampled while it
    runs. Redis has no other client than ours meanwhile, so its connected_clients minus
    the count before the proxy started is the proxy's upstream connections."""
    baseline = redis_clients(redis.port)
    proxy = servers.start_fieldcrypt(
        f"fc-{mode}-{clients}", workdir, redis.port, mode=mode, pool_size=POOL_SIZE
    )
    out: dict[str, Any] = {"mode": mode, "clients": clients, "pool_size": POOL_SIZE, "workers": 1}
    socks: list[socket.socket] = []
    try:
        _settle(redis.port, 0.5)
        out["started"] = _snapshot(proxy, redis.port, baseline)
        for _ in range(clients):
            socks.append(socket.create_connection((HOST, proxy.port), timeout=10))
        _settle(redis.port)
        out["idle_silent"] = _snapshot(proxy, redis.port, baseline)
        ping = encode("PING")
        for sock in socks:
            sock.sendall(ping)
        answered = 0
        for sock in socks:
            with contextlib.suppress(OSError):
                answered += sock.recv(64).startswith(b"+PONG")
        _settle(redis.port)
        out["idle_after_ping"] = {**_snapshot(proxy, redis.port, baseline), "pongs": answered}
    finally:
        for sock in socks:
            sock.close()
    try:
        _settle(redis.port)
        with Sampler(proxy.port, redis.port) as sampler:
            result = redis_benchmark(
                proxy.port,
                ["set", "many:__rand_int__", "v" * 64],
                requests,
                1,
                100_000,
                clients=clients,
            )
        out["active"] = {
            **sampler.peak,
            "redis_sees": sampler.peak.get("redis_clients", baseline) - baseline,
            "samples": sampler.samples,
            "sampler_error": sampler.error,
            "rps": result.rps,
            "p99_ms": result.p99_ms,
            "error": result.error,
        }
    finally:
        servers.stop(proxy)
    return out


def connection_tests(workdir: Path, redis: Server, requests: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("pooled", "dedicated"):
        try:
            out[mode] = many_clients(mode, workdir, redis, requests)
        except (OSError, RuntimeError, ConnectionError, ServerError) as error:
            out[mode] = {"error": f"{error.__class__.__name__}: {error}"}
    return out
