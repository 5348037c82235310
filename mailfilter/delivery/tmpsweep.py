"""Removal of stale files from a maildir's tmp/ (crash leftovers).

Job: a server killed mid-message (kill -9, power loss) leaves its
half-written file in tmp/; nothing else ever removes it
(docs/behaviour/delivery.md#maildir). The Maildir protocol
(cr.yp.to/proto/maildir.html) lets a reader remove tmp/ files not accessed for
36 hours, and qmail-send cleans its own tmp/ after the same time, so:

  - a file is stale only when BOTH its mtime and its ctime are older than
    STALE_AFTER (36 h). A live delivery writes its file (mtime) within its
    session deadline, far shorter than 36 h, so a file that old belongs to a
    dead writer, whichever process (another worker, another MDA) made it;
    ctime too, so a file restored or touched back (utime sets mtime, never
    ctime) is not taken for old;
  - a name the caller reports live (a file this process has open: being
    written or being committed) is never removed, however old it looks;
  - only regular files: a directory or symlink in tmp/ is not ours to judge.

When: `sweep()` at start (MaildirDelivery.check(), which serve runs before
accepting), then at most once per SWEEP_INTERVAL (1 h), triggered from the
delivery path (`due()` is one clock comparison per message) and run on the
committer's existing fsync pool, so the event loop never scans a directory
and no thread is added. Each pass that removes something logs one line.
"""
from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable

__all__ = ["STALE_AFTER", "SWEEP_INTERVAL", "TmpSweeper"]

logger = logging.getLogger("mailfilter")

STALE_AFTER = 36 * 3600     # seconds: the Maildir spec's and qmail-send's tmp/ cleanup age
SWEEP_INTERVAL = 3600       # seconds: at most one pass an hour after the one at start


class TmpSweeper:
    """Stale-file removal for one tmp/ directory. `live()` returns the names
    (not paths) this process has open in tmp/; `clock` is the wall clock the
    file times are compared with (injected by tests)."""

    def __init__(self, tmpdir: str, live: Callable[[], set[str]], *,
                 clock: Callable[[], float] = time.time,
                 stale_after: float = STALE_AFTER, interval: float = SWEEP_INTERVAL) -> None:
        self.tmpdir = tmpdir
        self.live = live
        self.clock = clock
        self.stale_after = stale_after
        self.interval = interval
        self._lock = threading.Lock()
        self._last: float | None = None     # clock() when the last pass was started
        self.passes = 0                     # statistics, for tests

    def due(self) -> bool:
        """True once per interval (and at first): the caller then runs
        sweep(). A clock that went back also counts as due, else a wall-clock
        step back would postpone the next pass by the size of the step."""
        now = self.clock()
        with self._lock:
            last = self._last
            if last is not None and last <= now < last + self.interval:
                return False
            self._last = now
            return True

    def sweep(self) -> tuple[int, float]:
        """One pass: remove stale files; (count removed, oldest age in s)."""
        with self._lock:
            if self._last is None:
                self._last = self.clock()
        self.passes += 1
        now = self.clock()
        try:
            entries = list(os.scandir(self.tmpdir))
        except OSError as exc:
            logger.warning("maildir %s: cannot list for stale files: %s", self.tmpdir, exc)
            return 0, 0.0
        removed, oldest, failed = self._remove_stale(entries, now)
        if removed or failed:
            logger.info("maildir %s: removed %d stale file(s) older than %d h "
                        "(oldest %.1f h)%s", self.tmpdir, removed, self.stale_after // 3600,
                        oldest / 3600, f"; {failed} could not be removed" if failed else "")
        return removed, oldest

    def _remove_stale(self, entries: list[os.DirEntry], now: float) -> tuple[int, float, int]:
        removed = failed = 0
        oldest = 0.0
        for entry in entries:
            age = self._stale_age(entry, now)
            # live() is asked per file, after the listing: a name of ours that
            # was listed is in the live set until it has left tmp/ (added
            # before the file is created, dropped after its rename/unlink)
            if age is None or entry.name in self.live():
                continue
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue        # removed meanwhile (renamed by its owner, or another sweeper)
            except OSError:
                failed += 1
                continue
            removed += 1
            oldest = max(oldest, age)
        return removed, oldest, failed

    def _stale_age(self, entry: os.DirEntry, now: float) -> float | None:
        """The file's age when it is a regular file whose mtime and ctime are
        both older than stale_after, else None."""
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        age = now - max(st.st_mtime, st.st_ctime)
        return age if age > self.stale_after else None
