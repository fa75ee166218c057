"""Fixtures: real Redis and Valkey servers, and fieldcrypt in front of them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.servers import EmbeddedServer, ProxyThread, make_state, server_binary

SERVER_KINDS = ["redis", "valkey"]


@pytest.fixture(scope="session", params=SERVER_KINDS)
def upstream(request: pytest.FixtureRequest) -> Iterator[EmbeddedServer]:
    """A real server, once Debian's redis-server and once Valkey 8."""
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
