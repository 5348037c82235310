"""`serve --bundle FILE`: a bundle replaced on disk is loaded as SIGHUP loads it.

Job: the fleet workflow (docs/operations.md#shipping-rules): compile once,
ship the bundle to every node, and let each node notice. The file is
polled (os.stat every INTERVAL seconds; the stdlib has no inotify, and one
stat a second costs nothing); a change of inode, size or modification time
starts the same reload SIGHUP does, once the file has stayed the same for
one more interval, so a copy written in place is read when it is whole.

Invariants: a missing file (between an unlink and a rename) is no change;
the reload itself keeps the rules in force when the new file does not load
(a truncated or corrupt bundle fails its CRC: "reload refused"); the watch
never raises into the loop.
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger("mailfilter")

INTERVAL = 1.0      # seconds between two looks at the file


def _signature(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class BundleWatch:
    """Calls `on_change()` when the file at `path` was replaced and is stable."""

    def __init__(self, loop, path: str, on_change, interval: float = INTERVAL):
        self.loop = loop
        self.path = path
        self.on_change = on_change
        self.interval = interval
        self.current = _signature(path)     # what is loaded now
        self.pending = None                 # a new signature seen once, not yet stable
        self.handle = loop.call_later(interval, self._tick)

    def _tick(self) -> None:
        self.handle = self.loop.call_later(self.interval, self._tick)
        sig = _signature(self.path)
        if sig is None or sig == self.current:
            self.pending = None
            return
        if sig != self.pending:             # changed since the last look: wait for it to settle
            self.pending = sig
            return
        self.current, self.pending = sig, None
        logger.info("bundle %s replaced: reloading", self.path)
        try:
            self.on_change()
        except Exception:
            logger.exception("bundle watch")

    def close(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None
