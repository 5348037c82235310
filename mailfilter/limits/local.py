"""The in-process state store (docs/behaviour/limits.md#state): the default.

Job: the anvil counts of one process -- client connections open now and
the fixed-window rates (connections, messages, recipients) per client
key -- answered synchronously, without I/O, so a check costs a dict lookup
on the command path. The Redis store keeps one of these as its fallback
and counts into it as well, so the local limits are already in force when
Redis goes away.

Invariants: every table is bounded: the rates by ``size`` keys each (LRU,
windows.FixedWindows), the open connections by the connections open (an
entry goes with the key's last connection).
"""
from __future__ import annotations

import time

from mailfilter.limits.windows import FixedWindows

__all__ = ["RATE_KINDS", "LocalStore"]

# the rates counted per client key (docs/behaviour/limits.md#limits)
RATE_KINDS = ("conn", "msg", "rcpt")


class LocalStore:
    """Connections open and rate windows of one process."""

    shared = False          # the counts are this process's own
    url = "local"

    def __init__(self, window: float = 60.0, size: int = 100_000, clock=time.monotonic):
        self.window = window
        self.rates = {kind: FixedWindows(window, size, clock) for kind in RATE_KINDS}
        self.conns: dict[str, int] = {}

    def hit(self, kind: str, key: str) -> int:
        """Count one `kind` event of `key`; the events in its window."""
        return self.rates[kind].hit(key)

    def connect(self, key: str, limit: int, rate: int) -> tuple[bool, int, int]:
        """A connection of `key`: unless `limit` (0 = none) are open, the
        connection-rate window counts it (when `rate` > 0), and unless that
        is over `rate` it takes a slot. (taken, connections open -- this
        one included if taken --, the window's count or 0)."""
        conns = self.conns
        n = conns.get(key, 0)
        if 0 < limit <= n:
            return False, n, 0
        r = 0
        if rate > 0:
            r = self.rates["conn"].hit(key)
            if r > rate:
                return False, n, r
        conns[key] = n + 1
        return True, n + 1, r

    def disconnect(self, key: str, member: str | None = None) -> None:
        """Give back the slot a taken connect() holds (`member` is the
        Redis store's; here the count is all there is)."""
        n = self.conns.get(key, 0) - 1
        if n > 0:
            self.conns[key] = n
        else:
            self.conns.pop(key, None)

    def close(self) -> None:
        """Nothing to let go (the Redis store's counterpart closes its pool)."""
