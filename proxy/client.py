"""A small asyncio Redis client for fieldcrypt's own work (migration, health checks).

Pipelined request/reply over one connection, parsed by hiredis. It speaks only
RESP2 and never sees application traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import hiredis

from proxy import resp
from proxy.server import Target, describe_error

Arg = bytes | str | int | float


class ClientError(Exception):
    """The connection failed; str() names the upstream and the cause."""


def _encode(args: Sequence[Any]) -> bytes:
    return resp.encode_request([a if isinstance(a, bytes) else str(a).encode() for a in args])


class RedisClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str):
        self._reader = reader
        self._writer = writer
        self._parser = hiredis.Reader()
        self._lock = asyncio.Lock()
        self.address = address

    @classmethod
    async def connect(cls, target: Target) -> RedisClient:
        try:
            # asyncio.timeout, not wait_for: CPython 3.11's wait_for can swallow a
            # cancellation that arrives as the connection fails, so a retrying task
            # would never stop.
            async with asyncio.timeout(target.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    target.host,
                    target.port,
                    **target.tls_options(),
                    limit=2**20,
                )
        except (OSError, TimeoutError) as error:
            raise ClientError(
                f"upstream {target.address} unreachable ({describe_error(error)})"
            ) from None
        client = cls(reader, writer, target.address)
        for what, args in target.handshake():
            reply = (await client.pipeline([args]))[0]
            if isinstance(reply, hiredis.ReplyError):
                await client.close()
                raise ClientError(f"upstream {target.address} refused {what}: {reply}")
        return client

    async def execute(self, *args: Arg) -> Any:
        """One command; an error reply is raised as hiredis.ReplyError."""
        reply = (await self.pipeline([args]))[0]
        if isinstance(reply, hiredis.ReplyError):
            raise reply
        return reply

    async def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send all, then read all; error replies come back as hiredis.ReplyError values."""
        async with self._lock:
            self._writer.write(b"".join(_encode(c) for c in commands))
            replies: list[Any] = []
            try:
                await self._writer.drain()
                while len(replies) < len(commands):
                    reply = self._parser.gets()
                    if reply is False:
                        data = await self._reader.read(2**18)
                        if not data:
                            raise ConnectionError("connection closed")
                        self._parser.feed(data)
                        continue
                    replies.append(reply)
            except (OSError, ConnectionError) as error:
                raise ClientError(
                    f"upstream {self.address} connection lost ({describe_error(error)})"
                ) from None
            return replies

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await self._writer.wait_closed()
