"""Fixed-window event counting per key (docs/behaviour/limits.md#algorithm).

Job: count events per key in windows of ``window`` seconds, each window
starting at the key's first event after the previous one ended -- the way
Postfix's anvil counts a rate per ``anvil_rate_time_unit`` -- and say how
many events the current window holds. The Redis store runs the same
algorithm in Lua (INCR, then PEXPIRE on the window's first event), so a
limit means the same with either store.

Invariants: pure (the clock is injected); at most ``size`` keys are kept,
the least recently counted goes first; an event is counted whether or not
it is then refused (a client that keeps knocking stays over its limit
until its window ends, as with anvil).
"""
from __future__ import annotations

import time
from collections import OrderedDict

__all__ = ["FixedWindows"]


class FixedWindows:
    """Event counts per key in fixed windows of ``window`` seconds."""

    __slots__ = ("window", "size", "clock", "_counts")

    def __init__(self, window: float, size: int = 100_000, clock=time.monotonic):
        if window <= 0:
            raise ValueError(f"window must be above 0 seconds, not {window!r}")
        if size < 1:
            raise ValueError(f"size must be at least 1, not {size!r}")
        self.window, self.size, self.clock = window, size, clock
        self._counts: OrderedDict[str, list] = OrderedDict()    # key -> [window start, count]

    def hit(self, key: str) -> int:
        """Count one event of `key`; the events in its window, this one included."""
        now = self.clock()
        counts = self._counts
        entry = counts.get(key)
        if entry is not None and now - entry[0] < self.window:
            entry[1] += 1
            counts.move_to_end(key)
            return entry[1]
        if entry is not None:
            del counts[key]
        elif len(counts) >= self.size:
            counts.popitem(last=False)
        counts[key] = [now, 1]
        return 1

    def count(self, key: str) -> int:
        """The events of `key` in its current window (0 once it ended)."""
        entry = self._counts.get(key)
        if entry is None or self.clock() - entry[0] >= self.window:
            return 0
        return entry[1]

    def __len__(self) -> int:
        return len(self._counts)
