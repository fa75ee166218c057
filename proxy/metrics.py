"""Observability: Prometheus metrics, health endpoints, and `FIELDCRYPT INFO`.

The hot path only bumps plain counters (ints in Stats, a dict of command
names); a collector turns them into Prometheus metrics when scraped. The
latency histogram is fed by one request in SAMPLE_EVERY (session.py).
The HTTP listener is a few lines of asyncio on the proxy's own loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("fieldcrypt")

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1)


def numbers(state: Any) -> dict[str, dict[str, Any]]:
    """Every number the proxy reports, by section: one source for /metrics and INFO."""
    stats = state.stats
    crypt = state.crypt
    counts = crypt.counts if crypt is not None else {}
    failures = crypt.failures if crypt is not None else {}
    report = state.jobs.status() if state.jobs is not None else None
    migration: dict[str, Any] = {"state": report.state if report else "none"}
    if report is not None:
        migration.update(
            job=report.job_id,
            keys_scanned=report.keys_scanned,
            fields_checked=report.fields_checked,
            fields_encrypted=report.changed.get("encrypted", 0),
            fields_rekeyed=report.changed.get("rekeyed", 0),
            fields_decrypted=report.changed.get("decrypted", 0),
            fields_undecryptable=report.undecryptable,
        )
    return {
        "clients": {
            "connected_clients": stats.connections_open,
            "total_connections_received": stats.connections_total,
            "rejected_connections": stats.connections_rejected,
        },
        "stats": {
            "total_net_input_bytes": stats.bytes_in,
            "total_net_output_bytes": stats.bytes_out,
            "upstream_errors": stats.upstream_errors,
            "total_commands_processed": sum(state.command_counts.values()),
            "unauthenticated_commands": stats.unauthenticated_commands,
        },
        "encryption": {
            "values_encrypted": counts.get("encrypted", 0),
            "values_decrypted": counts.get("decrypted", 0),
            "cleartext_reads": counts.get("cleartext read", 0),
            "decrypt_failures": sum(failures.values()),
            **{f"decrypt_failures_{k.replace(' ', '_')}": v for k, v in sorted(failures.items())},
            "keyring_keys": len(crypt.keyring.keys) if crypt is not None else 0,
            "primary_key_id": (
                crypt.keyring.primary.kid if crypt is not None and crypt.keyring.primary else "none"
            ),
            "rules": len(crypt.rules) if crypt is not None else 0,
        },
        "upstream": upstream_numbers(state),
        "migration": migration,
        "commandstats": {
            f"cmdstat_{name}": f"calls={n}" for name, n in command_totals(state).items()
        },
    }


def upstream_numbers(state: Any) -> dict[str, Any]:
    """How the proxy reaches Redis: its mode and the upstream connections by kind."""
    pools = state.pools
    return {
        "upstream_mode": state.upstream_mode,
        "upstream_pool_size": state.pool_size,
        "upstream_routes": len(pools.pools) if pools is not None else 0,
        "upstream_connections_shared": pools.connections() if pools is not None else 0,
        "upstream_connections_spare": len(pools.spares) if pools is not None else 0,
        "upstream_connections_dedicated": state.stats.upstream_dedicated,
        "clients_pinned": state.stats.clients_pinned,
    }


def command_totals(state: Any) -> dict[str, int]:
    """Commands received, by lower-case name, sorted. Counts are kept by the name as
    each client sent it (GET, get...), which is cheaper to count."""
    totals: dict[str, int] = {}
    for name, n in state.command_counts.items():
        key = name.decode("ascii", "replace").lower()
        totals[key] = totals.get(key, 0) + n
    return dict(sorted(totals.items()))


def info_text(state: Any, section: str | None = None) -> bytes:
    """`FIELDCRYPT INFO [section]`, in the style of Redis's INFO."""
    lines: list[str] = []
    for name, values in numbers(state).items():
        if section and section.lower() not in (name, "all", "everything"):
            continue
        lines.append(f"# {name.capitalize()}")
        lines.extend(f"{key}:{value}" for key, value in values.items())
        lines.append("")
    return "\r\n".join(lines).encode()


class ProxyCollector(Collector):
    def __init__(self, state_getter: Callable[[], Any]) -> None:
        self.state_getter = state_getter

    def collect(self) -> Iterator[Metric]:
        state = self.state_getter()
        stats = state.stats
        yield GaugeMetricFamily(
            "fieldcrypt_connections_open", "Client connections open", stats.connections_open
        )
        upstream = upstream_numbers(state)
        connections = GaugeMetricFamily(
            "fieldcrypt_upstream_connections",
            "Upstream connections open, by kind: shared (pooled), spare (ready for a client "
            "that pins), dedicated (one client's own)",
            labels=["kind"],
        )
        for kind in ("shared", "spare", "dedicated"):
            connections.add_metric([kind], upstream[f"upstream_connections_{kind}"])
        yield connections
        yield CounterMetricFamily(
            "fieldcrypt_clients_pinned",
            "Pooled clients that took an upstream connection of their own",
            stats.clients_pinned,
        )
        yield CounterMetricFamily(
            "fieldcrypt_connections", "Client connections accepted", stats.connections_total
        )
        yield CounterMetricFamily(
            "fieldcrypt_connections_rejected",
            "Client connections refused (max_clients)",
            stats.connections_rejected,
        )
        commands = CounterMetricFamily(
            "fieldcrypt_commands", "Commands received, by name", labels=["command"]
        )
        for name, n in command_totals(state).items():
            commands.add_metric([name], n)
        yield commands
        yield CounterMetricFamily(
            "fieldcrypt_unauthenticated_commands",
            "Requests from clients that had not authenticated to the proxy (not counted by name)",
            stats.unauthenticated_commands,
        )
        yield CounterMetricFamily("fieldcrypt_bytes_in", "Bytes read from clients", stats.bytes_in)
        yield CounterMetricFamily(
            "fieldcrypt_bytes_out", "Bytes written to clients", stats.bytes_out
        )
        yield CounterMetricFamily(
            "fieldcrypt_upstream_errors", "Upstream connection failures", stats.upstream_errors
        )
        crypt = state.crypt
        counts = crypt.counts if crypt is not None else {}
        yield CounterMetricFamily(
            "fieldcrypt_values_encrypted", "Protected values encrypted", counts.get("encrypted", 0)
        )
        yield CounterMetricFamily(
            "fieldcrypt_values_decrypted", "Protected values decrypted", counts.get("decrypted", 0)
        )
        yield CounterMetricFamily(
            "fieldcrypt_cleartext_reads",
            "Cleartext values read from protected fields",
            counts.get("cleartext read", 0),
        )
        failures = CounterMetricFamily(
            "fieldcrypt_decrypt_failures", "Protected values that failed", labels=["reason"]
        )
        for reason, n in sorted((crypt.failures if crypt is not None else {}).items()):
            failures.add_metric([reason], n)
        yield failures
        migration = numbers(state)["migration"]
        progress = GaugeMetricFamily(
            "fieldcrypt_migration", "Progress of the last migration job", labels=["what"]
        )
        for what, value in migration.items():
            if isinstance(value, int):
                progress.add_metric([what], value)
        yield progress
        running = 1 if migration["state"] == "running" else 0
        yield GaugeMetricFamily("fieldcrypt_migration_running", "A migration job runs", running)


class Metrics:
    """The registry, the latency histogram, and the HTTP listener."""

    def __init__(self, state_getter: Callable[[], Any]) -> None:
        self.state_getter = state_getter
        self.registry = CollectorRegistry()
        self.registry.register(ProxyCollector(state_getter))
        self.latency = Histogram(
            "fieldcrypt_command_latency_seconds",
            "Time from a request's arrival to its reply, sampled",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ready_check: Callable[[], Any] | None = None  # async () -> str | None (a problem)
        self._ready_cache: tuple[float, str | None] = (0.0, "not checked yet")
        self.server: asyncio.AbstractServer | None = None

    def observe(self, seconds: float) -> None:
        self.latency.observe(seconds)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, host, port)
        address: tuple[str, int] = self.server.sockets[0].getsockname()[:2]
        return address

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _ready(self) -> str | None:
        checked, problem = self._ready_cache
        if time.monotonic() - checked < 1.0:
            return problem
        problem = await self.ready_check() if self.ready_check is not None else None
        self._ready_cache = (time.monotonic(), problem)
        return problem

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            parts = request.split(b"\r\n", 1)[0].split()
            method, path = (parts[0], parts[1].split(b"?")[0]) if len(parts) >= 2 else (b"", b"")
            if method not in (b"GET", b"HEAD"):
                status, body, kind = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path == b"/metrics":
                status, body = "200 OK", generate_latest(self.registry)
                kind = "text/plain; version=0.0.4; charset=utf-8"
            elif path == b"/healthz":
                status, body, kind = "200 OK", b"ok\n", "text/plain"
            elif path == b"/readyz":
                problem = await self._ready()
                if problem is None:
                    status, body, kind = "200 OK", b"ready\n", "text/plain"
                else:
                    status, body = "503 Service Unavailable", f"not ready: {problem}\n".encode()
                    kind = "text/plain"
            else:
                status, body, kind = (
                    "404 Not Found",
                    b"try /metrics, /healthz or /readyz\n",
                    "text/plain",
                )
            head = (
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
            writer.write(head if method == b"HEAD" else head + body)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()
