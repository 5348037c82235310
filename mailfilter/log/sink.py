"""Where log lines go: a bounded buffer written once per event-loop turn.

Job: `Sink.write(levelno, message)` formats one record (time stamp text made
once per second) and appends it to a buffer. The first line of a loop turn
schedules one flush with loop.call_soon, so every line of that turn leaves
in one write(2) (a file or stderr: `StreamSink`) or in one burst of
datagrams (syslog: `SyslogSink`, one datagram per line) at the end of the
turn. Outside a running loop (start-up, the --workers supervisor, another
thread) the line is written at once, after whatever was buffered.

Slow or missing sinks (docs/operations.md#when-the-log-cannot-keep-up):
  - the buffer holds at most `cap` characters; a file or stderr that is
    slower than the traffic BLOCKS the process (a full buffer is written at
    once and the write waits): nothing is dropped while the disk takes it;
  - syslog never blocks the loop: the socket is non-blocking; a line that
    finds the buffer full and the socket not taking datagrams is DROPPED and
    counted; when lines are taken again a line `action=log_gap dropped=N`
    (level warning) stands where the gap is. A socket that fails (syslog
    daemon restarted) is closed and re-opened with a growing delay
    (RECONNECT_MIN .. RECONNECT_MAX s); the lines meanwhile are buffered up
    to `cap`, then dropped and counted; stderr hears of it at most once per
    STDERR_INTERVAL s;
  - a write that fails (disk full, a closed pipe) drops its lines, counted
    the same way.
`flush(wait)` at a clean stop writes everything out; syslog may wait up to
`wait` seconds for a slow receiver, and what it still cannot take is
written to stderr rather than lost.

Invariants: lines leave in the order they were written, the gap line where
the gap was; one lock guards the buffer (logging calls from worker threads);
after fork() the child starts with an empty buffer, its own pid and a new
lock (`after_fork`).
"""
from __future__ import annotations

import errno
import os
import select
import socket
import sys
import threading
import time
from abc import ABC, abstractmethod
from asyncio import _get_running_loop

from mailfilter.log import syslog as syslog_mod

DEFAULT_CAP = 256 * 1024            # characters buffered at most (--log-buffer)
RECONNECT_MIN = 0.1                 # seconds before the first attempt to re-open syslog
RECONNECT_MAX = 30.0                # ... doubling up to this
RETRY_FULL = 0.05                   # seconds before sending again to a full syslog socket
STDERR_INTERVAL = 60.0              # at most one "syslog unreachable" line on stderr per this
_LEVEL_NAMES = {10: "DEBUG", 20: "INFO", 30: "WARNING", 40: "ERROR", 50: "CRITICAL"}
GAP_LEVEL = 30


class Sink(ABC):
    """The buffer and its flush schedule; subclasses format and send."""

    def __init__(self, level: int, cap: int = DEFAULT_CAP):
        self.level = level
        self.cap = cap
        self.dropped = 0                # lines lost since the last gap line
        self.told = 0                   # lines lost and told by gap lines, all added up
        self._lines: list = []
        self._size = 0
        self._loop = None               # the loop a flush is scheduled on
        self._lock = threading.Lock()

    @property
    def dropped_total(self) -> int:
        """Lines lost since start (told by a gap line or not yet): the metric."""
        return self.told + self.dropped

    @property
    def pending(self) -> int:
        """Lines buffered, not yet written."""
        return len(self._lines)

    # --- the hot path -------------------------------------------------------------
    def write(self, levelno: int, message: str, now: float | None = None) -> None:
        line = self.format(levelno, message, time.time() if now is None else now)
        with self._lock:
            # (an empty buffer takes any line: a long traceback is not dropped for its size)
            if self._size and self._size + len(line) > self.cap:
                self._flush_locked(0.0)
                if self._size and self._size + len(line) > self.cap:   # syslog not taking lines
                    self.dropped += 1
                    return
            if self.dropped:
                self._add_gap()
            self._lines.append(line)
            self._size += len(line)
            loop = _get_running_loop()
            if loop is None:
                self._flush_locked(0.0)
            elif self._loop is not loop:
                self._loop = loop
                loop.call_soon(self.flush)

    def _add_gap(self) -> None:
        gap = self.format(GAP_LEVEL, f"action=log_gap dropped={self.dropped}", time.time())
        self.told += self.dropped
        self.dropped = 0
        self._lines.append(gap)
        self._size += len(gap)

    # --- flushing -----------------------------------------------------------------
    def flush(self, wait: float = 0.0) -> None:
        """Write out what is buffered (a syslog receiver may be waited for up to `wait` s)."""
        with self._lock:
            self._flush_locked(wait)

    def after_fork(self) -> None:
        """In a forked child: the parent writes its own lines."""
        self._lock = threading.Lock()
        self._lines = []
        self._size = 0
        self._loop = None

    def close(self) -> None:
        pass

    @abstractmethod
    def format(self, levelno: int, message: str, now: float) -> str:
        """One line as this sink writes it (time stamp, pid, level, or a syslog frame)."""

    @abstractmethod
    def _flush_locked(self, wait: float) -> None:
        """Write the buffered lines out (the lock is held)."""


class StreamSink(Sink):
    """A file or stderr: `YYYY-mm-dd HH:MM:SS,mmm [pid] LEVEL message`, as the
    logging format `%(asctime)s [%(process)d] %(levelname)s %(message)s`."""

    def __init__(self, fd: int, level: int, cap: int = DEFAULT_CAP):
        super().__init__(level, cap)
        self.fd = fd
        self._second = -1
        self._stamp = ""
        self._tails: dict[int, str] = {}
        self.after_fork()

    def after_fork(self) -> None:
        super().after_fork()
        pid = os.getpid()
        self._tails = {n: f" [{pid}] {name} " for n, name in _LEVEL_NAMES.items()}

    def format(self, levelno: int, message: str, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        tail = self._tails.get(levelno)
        if tail is None:
            tail = f" [{os.getpid()}] Level {levelno} "
        return f"{self._stamp},{int((now - second) * 1000):03d}{tail}{message}\n"

    def _flush_locked(self, wait: float) -> None:
        self._loop = None
        lines = self._lines
        if not lines:
            return
        data = "".join(lines).encode("utf-8", "backslashreplace")
        n = len(lines)
        self._lines = []
        self._size = 0
        try:
            _write_all(self.fd, data)
        except OSError:
            self.dropped += n


def _write_all(fd: int, data: bytes) -> None:
    """All of `data` to `fd`, waiting when it is non-blocking and full (the
    documented policy for files and stderr: block rather than drop)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


class SyslogSink(Sink):
    """Datagrams to a syslog socket (unix or UDP), framed by syslog.Framer."""

    def __init__(self, address: str, level: int, cap: int = DEFAULT_CAP, fmt: str = "rfc3164",
                 facility: str = "mail", ident: str = "mailfilter"):
        super().__init__(level, cap)
        self.address = address
        # OSError or ValueError here: a start-up error
        self.family, self._target = syslog_mod.resolve(*syslog_mod.parse_address(address))
        self.framer = syslog_mod.Framer(fmt, facility, ident,
                                        remote=self.family != socket.AF_UNIX)
        self.sock = syslog_mod.open_socket(self.family, self._target)
        self._backoff = 0.0
        self._next_try = 0.0            # monotonic time of the next re-open
        self._timer = None              # (loop, call_later handle) of a retry
        self._told = -STDERR_INTERVAL   # monotonic time stderr last heard of trouble

    def format(self, levelno: int, message: str, now: float) -> str:
        return self.framer.frame(levelno, message, now)

    def after_fork(self) -> None:
        super().after_fork()
        self.framer.after_fork()
        self._timer = None

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _flush_locked(self, wait: float) -> None:
        self._loop = None
        lines = self._lines
        if not lines:
            return
        deadline = time.monotonic() + wait
        sent = 0
        failures = 0
        try:
            while sent < len(lines):
                if self.sock is None and not self._reopen(wait > 0):
                    break
                try:
                    self._send(lines[sent].encode("utf-8", "backslashreplace"))
                except BlockingIOError:     # the receiver's queue is full
                    if time.monotonic() < deadline:
                        select.select([], [self.sock], [], max(0.0, deadline - time.monotonic()))
                        continue
                    self._retry(RETRY_FULL)
                    break
                except OSError as exc:      # gone: the daemon restarted, or nobody at a UDP port
                    self._lost(exc)
                    failures += 1
                    if failures < 3 and time.monotonic() < deadline:
                        continue            # a clean stop: re-open at once, a few times
                    break
                self._backoff = 0.0
                sent += 1
                if sent == len(lines) and self.dropped:
                    self._add_gap()         # taking lines again: the gap is told, after them
        finally:
            if sent:
                del lines[:sent]
                self._size = sum(map(len, lines))
        if lines and wait > 0:
            # a clean stop and syslog still not taking them: stderr rather than nothing
            self._to_stderr(f"{len(lines)} log line(s) syslog {self.address} did not take at exit:\n"
                            + "\n".join(lines))
            lines.clear()
            self._size = 0

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                raise
            self.sock.send(data[:2048])     # RFC 3164 §4.1 / RFC 5424 §6.1: 480-2048 octets are safe

    def _reopen(self, now_anyway: bool) -> bool:
        t = time.monotonic()
        if t < self._next_try and not now_anyway:
            self._retry(self._next_try - t)
            return False
        try:
            self.sock = syslog_mod.open_socket(self.family, self._target)
        except OSError as exc:
            self._lost(exc)
            return False
        return True

    def _lost(self, exc: OSError) -> None:
        """The socket failed: close it, try again later (backoff), tell stderr rarely."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._backoff = min(RECONNECT_MAX, max(RECONNECT_MIN, self._backoff * 2))
        t = time.monotonic()
        self._next_try = t + self._backoff
        if t - self._told >= STDERR_INTERVAL:
            self._told = t
            self._to_stderr(f"syslog {self.address}: {exc.strerror or exc}; lines are held (up to "
                            f"{self.cap} characters), then dropped and counted, until it answers")
        self._retry(self._backoff)

    def _retry(self, delay: float) -> None:
        """A flush later, when a loop runs here (without one, the next line flushes)."""
        loop = _get_running_loop()
        if loop is None or (self._timer is not None and self._timer[0] is loop):
            return                      # no loop, or one retry is already due on it
        self._timer = (loop, loop.call_later(delay, self._timed_flush))

    def _timed_flush(self) -> None:
        self._timer = None
        self.flush()

    @staticmethod
    def _to_stderr(text: str) -> None:
        try:
            os.write(sys.stderr.fileno(), f"mailfilter: {text}\n".encode("utf-8", "backslashreplace"))
        except (OSError, ValueError):
            pass
