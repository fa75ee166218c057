"""Log lines that a client or a Redis writer can trigger at will, kept to a trickle.

A line of a given kind is logged at most once a window (a minute by default), and at
most `burst` lines of any kinds are logged a window; what is held back is counted, and
the next line of that kind says how many like it were suppressed. Memory is bounded by
`burst`, whatever the kinds: kinds past it are only counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Final

WINDOW_SECONDS: Final = 60.0
BURST: Final = 20


class LogLimiter:
    def __init__(
        self,
        window: float = WINDOW_SECONDS,
        burst: int = BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.burst = burst
        self.clock = clock
        self._started = -window  # the current window's start
        self._logged: dict[Hashable, int] = {}  # kinds logged this window -> lines held back
        self._held: dict[Hashable, int] = {}  # lines held back last window, by kind
        self._dropped = 0  # lines held back because a window's burst was spent

    def allow(self, kind: Hashable) -> int | None:
        """None: hold this line back. Otherwise log it, saying that this many lines were
        held back before it (of its kind, and of any kind past a window's burst)."""
        now = self.clock()
        if now - self._started >= self.window:
            self._started = now
            self._held = {k: n for k, n in self._logged.items() if n}
            self._logged = {}
        logged = self._logged
        if kind in logged:
            logged[kind] += 1
            return None
        if len(logged) >= self.burst:
            self._dropped += 1
            return None
        logged[kind] = 0
        dropped, self._dropped = self._dropped, 0
        return self._held.pop(kind, 0) + dropped


def suppressed_note(count: int) -> str:
    """The tail of a logged line that follows `count` held-back ones."""
    return f" ({count} similar lines suppressed before this one)" if count else ""
