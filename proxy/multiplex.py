"""Many clients' requests on one upstream connection, each reply back to its client.

Pure: no sockets. A shared connection writes the requests of several clients in the
order they come and Redis answers in that order, so each write is noted with its owner
and how many replies it brings (`expect`), and the replies read back are cut where one
owner's end and the next one's begin (`feed`). Only requests that bring exactly one
reply each go on a shared connection (see `session.PIN`), so the count is known when
the request is written.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

from proxy import resp

Owner = TypeVar("Owner")


class _Due(Generic[Owner]):
    __slots__ = ("owner", "replies")

    def __init__(self, owner: Owner, replies: int) -> None:
        self.owner = owner
        self.replies = replies


class ReplyRouter(Generic[Owner]):
    __slots__ = ("_reader", "resp3", "waiting")

    def __init__(self, resp3: bool = False) -> None:
        self.resp3 = resp3
        self._reader = resp.ReplyReader()
        self.waiting: deque[_Due[Owner]] = deque()  # in the order the requests went

    def expect(self, owner: Owner, replies: int) -> None:
        """`owner` wrote requests that bring `replies` replies."""
        if not replies:
            return
        waiting = self.waiting
        if waiting and waiting[-1].owner is owner:
            waiting[-1].replies += replies
        else:
            waiting.append(_Due(owner, replies))

    def due(self, owner: Owner) -> int:
        """How many replies `owner` still waits for on this connection."""
        return sum(d.replies for d in self.waiting if d.owner is owner)

    def feed(self, data: bytes) -> list[tuple[Owner, bytes, int]]:
        """The complete replies in what has been read so far, cut by owner, in order:
        (owner, their bytes, how many replies). Raises resp.ProtocolError on bytes that
        are no RESP."""
        reader = self._reader
        reader.feed(data)
        buf = reader.buffer
        waiting = self.waiting
        out: list[tuple[Owner, bytes, int]] = []
        resp3 = self.resp3
        next_end = reader.next if resp3 else reader.next_resp2
        while reader.pos < len(buf):
            if resp3 and buf[reader.pos] == resp.PUSH:
                # Out of band (an invalidation another client's CLIENT TRACKING REDIRECT
                # sent here): no one's reply, and no one's to read.
                end = next_end()
                if end < 0:
                    break
                reader.pos = end
                continue
            if not waiting:
                # Nothing is owed: a stray reply. No client asked for it.
                end = next_end()
                if end < 0:
                    break
                reader.pos = end
                continue
            head = waiting[0]
            start = reader.pos
            due = head.replies
            while due and not (resp3 and reader.pos < len(buf) and buf[reader.pos] == resp.PUSH):
                end = next_end()
                if end < 0:
                    break
                reader.pos = end
                due -= 1
            if reader.pos > start:
                count = head.replies - due
                if start == 0 and reader.pos == len(buf) and type(buf) is bytes:
                    out.append((head.owner, buf, count))  # the whole read: no copy
                else:
                    out.append((head.owner, bytes(buf[start : reader.pos]), count))
            if due:
                head.replies = due
                if reader.pos == start or reader.pos >= len(buf) or buf[reader.pos] != resp.PUSH:
                    break  # the rest of its replies have not come yet
                continue  # a push among its replies: passed over above
            waiting.popleft()
        reader.compact()
        return out

    def abandon(self) -> list[tuple[Owner, int]]:
        """The connection is gone: each owner with the replies it will never get."""
        lost = [(d.owner, d.replies) for d in self.waiting]
        self.waiting.clear()
        self._reader = resp.ReplyReader()
        return lost
