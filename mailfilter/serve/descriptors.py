"""File descriptors: the open-file limit at start, and accept() without one.

Job, at start (docs/operations.md#limits-and-timeouts):
  - raise_nofile(): the soft RLIMIT_NOFILE up to the hard one (the soft limit is
    often 1024, which 10,000 sessions cannot fit in), both logged;
  - fit_max_connections(): `--max-connections` against what the limit leaves.
    A session holds up to 2 descriptors (its socket and, during DATA, the spool
    or maildir file), plus its hand-over's (3 pipes to qmail-queue, 1 socket to
    an smtp/lmtp next hop); RESERVE more are kept for what the process opens
    besides sessions (event loop, log socket, user DB, DNS sockets, a reload's
    compile pipes, TLS files), plus the listeners and whatever was already
    open at start. The default is lowered to fit, with a warning naming both
    numbers; a value the operator gave is refused (exit 2): it is a capacity
    they planned for, and lowering it silently would hide that the system
    cannot give it (the fix is one line: the hard limit, or the option).

And while serving: Acceptor accepts on a listening socket for either loop.
Neither loop's own accept copes with EMFILE/ENFILE (measured, see the docs
section): asyncio calls the exception handler once per accept attempt, up to
100 times per wake-up, and schedules as many retries (tens of thousands of
calls in seconds); uvloop (libuv) accepts the waiting clients and closes them
at once, unanswered and unlogged. Acceptor answers each waiting client
`421 4.3.2` on a spare descriptor kept for that (when even the spare cannot
be had, it stops accepting for RETRY seconds and the clients wait in the
listen backlog), and one line `action=refuse reason=no_descriptors` is
logged at most every LOG_INTERVAL seconds with the count since the last one.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import time

from mailfilter import log
from mailfilter.smtp.replies import reply
from mailfilter.serve.config import DEFAULT_MAX_CONNECTIONS, StartupError, listeners

logger = logging.getLogger("mailfilter")

RESERVE = 64                # descriptors kept for what is not a session
PER_SESSION = 2             # its socket + the spool/maildir file during DATA
HAND_OVER = {"qmail-queue": 3, "smtp": 1, "lmtp": 1}   # extra per session handing over
LOG_INTERVAL = 10.0         # seconds between two no_descriptors lines
RETRY = 0.25                # seconds accepting pauses after EMFILE/ENFILE
NO_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def _nr_open() -> int:
    """The kernel's ceiling for a process's descriptors (an unlimited hard
    limit cannot be the soft one)."""
    try:
        with open("/proc/sys/fs/nr_open") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 1 << 20


def raise_nofile() -> int:
    """The soft open-file limit raised to the hard one; the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _nr_open() if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("open files: cannot raise the soft limit %d to %d: %s", soft, target, exc)
            return soft
        logger.info("open files: soft limit raised from %d to the hard limit %d", soft, target)
        return target
    logger.info("open files: limit %d (hard limit %s)", soft,
                "unlimited" if hard == resource.RLIM_INFINITY else hard)
    return soft


def _open_now() -> int:
    """Descriptors open in this process (inherited ones count too)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1     # less listdir's own
    except OSError:
        return 3


def per_session(deliver: str) -> int:
    return PER_SESSION + HAND_OVER.get(deliver.partition(":")[0], 0)


def fit_max_connections(opts, limit: int) -> int:
    """The sessions per process: --max-connections if it fits `limit`, the
    default lowered to fit; StartupError for a given value that does not."""
    reserve = RESERVE + len(listeners(opts)) + _open_now()
    cost = per_session(opts.deliver)
    room = (limit - reserve) // cost
    wanted = opts.max_connections
    if room < 1:
        raise StartupError(f"open-file limit {limit} leaves no room for sessions "
                           f"({reserve} descriptors reserved): raise it (ulimit -n, LimitNOFILE=)")
    if wanted is None:
        if room < DEFAULT_MAX_CONNECTIONS:
            logger.warning("--max-connections lowered from %d to %d: the open-file limit %d "
                           "fits %d sessions at %d descriptors each plus %d reserved; raise "
                           "the hard limit (ulimit -Hn, LimitNOFILE=) for more",
                           DEFAULT_MAX_CONNECTIONS, room, limit, room, cost, reserve)
            return room
        return DEFAULT_MAX_CONNECTIONS
    if wanted > room:
        raise StartupError(f"--max-connections {wanted} needs {wanted * cost + reserve} open "
                           f"files ({cost} per session plus {reserve} reserved), the limit is "
                           f"{limit}: raise the hard limit (ulimit -Hn, LimitNOFILE=) or give "
                           f"--max-connections {room} or less")
    return wanted


class NoDescriptorLog:
    """`action=refuse reason=no_descriptors` at most once per LOG_INTERVAL:
    the first failure at once, the ones after it counted and logged when the
    interval is over (a flood logs one line per interval, not one per try)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, state, clock=time.monotonic):
        self.loop = loop
        self.state = state
        self.clock = clock
        self.count = 0
        self.error: OSError | None = None
        self.last = -LOG_INTERVAL
        self.timer = None

    def note(self, exc: OSError) -> None:
        self.count += 1
        self.error = exc
        m = self.state.metrics
        if m is not None:           # as the line's count=: failed accept attempts
            m.refuse("no_descriptors")
        wait = self.last + LOG_INTERVAL - self.clock()
        if wait <= 0:
            self.flush()
        elif self.timer is None:
            self.timer = self.loop.call_later(wait, self.flush)

    def flush(self) -> None:
        self.timer = None
        if not self.count:
            return
        logger.warning(log.kv(action="refuse", stage="CONNECT", reason="no_descriptors",
                              count=self.count, sessions=self.state.connections,
                              error=errno.errorcode.get(self.error.errno, self.error.errno)))
        self.count = 0
        self.last = self.clock()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.flush()


def _spare() -> int | None:
    """A descriptor held back to answer one client when none is left."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class Acceptor:
    """accept() on a listening socket, sessions made by `factory`. On
    EMFILE/ENFILE each waiting client is answered `421 4.3.2` on a spare
    descriptor held for that (closed for one accept, opened again after) and
    noted in the NoDescriptorLog; without a spare (ENFILE: the system has
    none either) accepting pauses for RETRY seconds, the clients waiting in
    the listen backlog."""

    BATCH = 64      # accepts per wake-up, so one listener does not starve the loop

    def __init__(self, loop, sock: socket.socket, factory, no_fd: NoDescriptorLog):
        self.loop = loop
        self.sock = sock
        self.factory = factory
        self.no_fd = no_fd
        self.retry = None
        self.tasks: set[asyncio.Task] = set()
        self.closed = False
        self.spare = _spare()
        loop.add_reader(sock.fileno(), self._ready)

    def _ready(self) -> None:
        for _ in range(self.BATCH):
            try:
                conn, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:      # the client left while queued
                continue
            except OSError as exc:
                if exc.errno not in NO_DESCRIPTORS:
                    raise                       # the loop logs it and keeps the reader
                self.no_fd.note(exc)
                if self._refuse_one():
                    continue                    # the next waiting client, if any
                self._pause()
                return
            conn.setblocking(False)
            task = self.loop.create_task(self._start(conn))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _start(self, conn: socket.socket) -> None:
        """The session on an accepted socket (the loop's transport, then
        the protocol's connection_made)."""
        try:
            await self.loop.connect_accepted_socket(self.factory, conn)
        except OSError as exc:
            conn.close()
            if exc.errno in NO_DESCRIPTORS:     # the transport needed one too: counted alike
                self.no_fd.note(exc)
            else:
                logger.error("accepting a connection failed: %s", exc)

    def _refuse_one(self) -> bool:
        """Answer one waiting client `421 4.3.2` on the spare descriptor and
        close it (libuv's reserve-descriptor technique): the client learns to
        retry instead of waiting unanswered. False without a spare or client."""
        spare, self.spare = self.spare, None
        if spare is None:
            return False
        os.close(spare)
        try:
            try:
                conn, _addr = self.sock.accept()
            except OSError:
                return False
            with conn:
                try:
                    conn.setblocking(False)
                    conn.send(reply("no_descriptors", host=self.no_fd.state.host).line())
                except OSError:
                    pass                        # it left: nothing to answer
            return True
        finally:
            self.spare = _spare()

    def _pause(self) -> None:
        """Linux keeps reporting the listener readable: stop watching it."""
        self.loop.remove_reader(self.sock.fileno())
        self.retry = self.loop.call_later(RETRY, self._resume)

    def _resume(self) -> None:
        self.retry = None
        if not self.closed:
            self.loop.add_reader(self.sock.fileno(), self._ready)

    def getsockname(self):
        return self.sock.getsockname()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.spare is not None:
            os.close(self.spare)
            self.spare = None
        if self.retry is not None:
            self.retry.cancel()
        else:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()

    async def wait_closed(self) -> None:
        if self.tasks:
            await asyncio.wait(set(self.tasks))
