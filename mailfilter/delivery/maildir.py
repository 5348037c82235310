"""maildir:DIR -- fsync'ed Maildir store with group commit.

Job and invariants: see the package docstring ("maildir:DIR"): a message
is acknowledged only after its file is fsync'ed, renamed into new/ and new/ is
fsync'ed; any OSError removes the tmp file and answers 451.
"""
from __future__ import annotations

import asyncio
import errno
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from mailfilter.delivery.base import (
    CHUNK, Delivery, DeliveryResult, FixedResultSink, Sink, close_quietly, local_id,
    os_error_text, queued, store_failed,
)
from mailfilter.delivery.envelope import Envelope, check_envelope, smtp_path
from mailfilter.delivery.tmpsweep import STALE_AFTER, SWEEP_INTERVAL, TmpSweeper

__all__ = ["MaildirDelivery", "envelope_headers"]


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # gone already, or left in tmp/: the 36-hour sweep removes it (tmpsweep.py)


def _hostname_part() -> str:
    # Maildir spec: "/" -> \057 and ":" -> \072 in the host part.
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072")


_HEADER_UNSAFE = bytes.maketrans(b"\r\n\0", b"???")


def envelope_headers(env: Envelope) -> bytes:
    """`Return-Path: <sender>` + one `X-Envelope-To: <rcpt>` per recipient.
    The addresses arrive unquoted (`john smith@example.org`); smtp_path puts
    back the RFC 5321 quoting, else a local part with a space or `>` would
    make an invalid (or misparsed) angle-addr for every MDA reading it."""
    out = [b"Return-Path: ", smtp_path(env.sender).translate(_HEADER_UNSAFE), b"\n"]
    for rcpt in env.recipients:
        out += [b"X-Envelope-To: ", smtp_path(rcpt).translate(_HEADER_UNSAFE), b"\n"]
    return b"".join(out)


class _Job:
    """One maildir message handed from the event loop to the committer."""
    __slots__ = ("file", "tmp", "new", "qid", "error", "loop", "fut", "size", "live")

    def __init__(self, file, tmp: str, new: str, qid: str, live: "_LiveNames") -> None:
        self.file = file
        self.live = live
        self.tmp = tmp
        self.new = new
        self.qid = qid
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fut: asyncio.Future | None = None
        self.size = 0


class _Committer:
    """Group commit for one maildir, off the event loop.

    One committer thread loops: take ALL commits submitted so far (the batch),
    flush + fsync + close their files in parallel on a small thread pool
    (`sync_threads`; concurrent fsyncs share ext4/xfs journal commits; a batch
    of one is synced inline, no extra hop), rename each durable tmp/X into
    new/X, fsync new/ ONCE for the whole batch, then resolve every future of
    the batch. So a resolved commit is either in a durable new/ entry (ok) or
    gone from tmp/ and new/ (error), and the order "file durable before its
    name in new/" always holds.
    While one batch is being made durable the next accumulates, so the batch
    size follows the load: 1 at c=1 (no added latency), about c under load,
    and the fsync count per message falls as load rises.
    pause()/resume()/wait_ready() exist so tests can build an exact batch.
    """

    def __init__(self, newdir: str, sync_threads: int) -> None:
        self.newdir = newdir
        self._pool = ThreadPoolExecutor(sync_threads, thread_name_prefix="maildir-fsync")
        self._cond = threading.Condition()
        self._ready: list[_Job] = []
        self._closing = False
        self.paused = False        # test hook: hold batches back (see pause())
        self.batches = 0           # statistics, for tests and benches
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._run, name="maildir-commit", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        with self._cond:
            self._ready.append(job)
            self._cond.notify_all()

    @staticmethod
    def _sync_file(job: _Job) -> None:
        if job.error is None:
            try:
                job.file.flush()
                os.fsync(job.file.fileno())
                job.file.close()
            except OSError as exc:
                job.error = exc
        if job.error is not None:
            close_quietly(job.file)
            _unlink_quietly(job.tmp)

    def _rename(self, job: _Job) -> None:
        """tmp/X -> new/X. When new/ itself has vanished (removed by hand or
        a cleanup script) while tmp/X is still there, new/ is made again and
        the rename tried once more: otherwise every message would get 451
        until an operator recreated it. The new/ entry is made durable (fsync
        of the maildir) here; the rename itself by the batch's fsync of new/,
        as always, before any 250."""
        try:
            os.rename(job.tmp, job.new)
            return
        except FileNotFoundError:
            if os.path.lexists(self.newdir) or not os.path.lexists(job.tmp):
                raise  # not a missing new/ (tmp/X gone, or new/ is something else)
        try:
            os.mkdir(self.newdir, 0o700)
        except FileExistsError:
            pass  # made meanwhile (MaildirDelivery._ensure_dirs): still fsync below
        fd = os.open(os.path.dirname(self.newdir), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(job.tmp, job.new)

    def _run(self) -> None:
        while True:
            with self._cond:
                while (not self._ready or self.paused) and not self._closing:
                    self._cond.wait()
                if not self._ready:
                    return
                batch, self._ready = self._ready, []
            try:
                self._commit_batch(batch)
            except BaseException as exc:  # a bug here must not hang every commit
                for job in batch:
                    job.error = job.error or exc
                    close_quietly(job.file)
                    self._resolve(job)     # a second resolution is ignored

    def _commit_batch(self, batch: list[_Job]) -> None:
        if len(batch) == 1:
            self._sync_file(batch[0])
        else:
            for _ in self._pool.map(self._sync_file, batch):
                pass
        renamed = []
        for job in batch:
            if job.error is not None:
                continue  # stage 1 failed: tmp file already removed
            try:
                self._rename(job)
                renamed.append(job)
            except OSError as exc:
                job.error = exc
                _unlink_quietly(job.tmp)
        if renamed:
            try:
                fd = os.open(self.newdir, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)  # makes the renames durable
                finally:
                    os.close(fd)
            except OSError as exc:
                # Not durable: take the files back out of new/ and say 451.
                # Should the unlink fail to persist, the retry duplicates the
                # message rather than losing it.
                for job in renamed:
                    job.error = exc
                    _unlink_quietly(job.new)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        for job in batch:
            self._resolve(job)

    @staticmethod
    def _resolve(job: _Job) -> None:
        job.live.discard(job.tmp)   # renamed or removed by now: no longer in tmp/
        if job.error is None:
            res = queued(job.qid, f"maildir new/{os.path.basename(job.new)} size={job.size}")
        else:
            res = store_failed(f"maildir {os_error_text(job.error)}")
        try:
            job.loop.call_soon_threadsafe(_set_result, job.fut, res)
        except RuntimeError:
            pass  # loop closed: nobody is waiting any more

    def run_aside(self, fn) -> None:
        """Run fn on the fsync pool (the periodic tmp/ sweep): the event loop
        must not scan a directory, and a pass needs no thread of its own."""
        self._pool.submit(fn)

    def pause(self) -> None:
        """Hold durable files back from stage 2 (tests: build a known batch)."""
        with self._cond:
            self.paused = True

    def resume(self) -> None:
        with self._cond:
            self.paused = False
            self._cond.notify_all()

    def wait_ready(self, n: int, timeout: float) -> bool:
        """Block until n jobs wait for stage 2 (a thread, never the loop)."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self._ready) >= n, timeout)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join()   # drains every submitted commit first
        self._pool.shutdown(wait=True)


def _set_result(fut: asyncio.Future, res: DeliveryResult) -> None:
    if not fut.done():
        fut.set_result(res)


class _MaildirSink(Sink):
    __slots__ = ("_d", "_job", "_state")

    def __init__(self, d: "MaildirDelivery", job: _Job) -> None:
        self._d = d
        self._job = job
        self._state = "open"

    def write(self, chunk: bytes) -> None:
        if self._state != "open":
            raise RuntimeError("write after commit/abort")
        job = self._job
        if job.error is not None:
            return  # already failed; commit() reports 451
        try:
            job.file.write(chunk)
            job.size += len(chunk)
        except OSError as exc:   # EFBIG, ENOSPC, EIO ...
            job.error = exc

    async def commit(self) -> DeliveryResult:
        if self._state != "open":
            raise RuntimeError("commit after commit/abort")
        self._state = "committing"
        job = self._job
        job.loop = asyncio.get_running_loop()
        job.fut = job.loop.create_future()
        self._d._committer_for().submit(job)
        # Cancellation of the caller does not stop the commit: the message
        # may still land (the client never saw 250 and retries: a duplicate,
        # never a loss).
        res = await asyncio.shield(job.fut)
        self._state = "done"
        if not res.ok:
            # As for a failed open(): re-check (and remake) tmp/, new/, cur/
            # before the next message, else a layout broken after this
            # message was opened (tmp/ removed) fails the next one too.
            self._d._dirs_ok = False
        return res

    def abort(self) -> None:
        if self._state != "open":
            return  # committing/committed mail is not ours to remove
        self._state = "aborted"
        close_quietly(self._job.file)
        _unlink_quietly(self._job.tmp)
        self._job.live.discard(self._job.tmp)


class _LiveNames:
    """Names in tmp/ this process has open (being written or committed): the
    tmp/ sweep never removes them. A name is added before its file is created
    and dropped after the file has left tmp/, so a listed file of ours is
    always in the set. Touched from the loop, the committer and the pool."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: set[str] = set()

    def add(self, path: str) -> None:
        with self._lock:
            self._names.add(os.path.basename(path))

    def discard(self, path: str) -> None:
        with self._lock:
            self._names.discard(os.path.basename(path))

    def snapshot(self) -> set[str]:
        with self._lock:
            return set(self._names)


def _failed_sink(detail: str) -> Sink:
    """Stands in when the store cannot even open a file: commit -> 451."""
    return FixedResultSink(lambda: store_failed(detail))


class MaildirDelivery(Delivery, kind="maildir", form="maildir:DIR"):
    """maildir:DIR -- see the module docstring for layout and durability."""

    def __init__(self, path: str, *, sync_threads: int = 16, file_mode: int = 0o600,
                 clock=time.time, stale_after: float = STALE_AFTER,
                 sweep_interval: float = SWEEP_INTERVAL) -> None:
        if not path:
            raise ValueError("maildir: needs a directory, e.g. maildir:/var/mail/inbox")
        self.path = os.path.abspath(path)
        self.spec = f"maildir:{self.path}"
        self.sync_threads = sync_threads
        self.file_mode = file_mode
        self._tmp = os.path.join(self.path, "tmp")
        self._new = os.path.join(self.path, "new")
        self._dirs_ok = False
        self._committer: _Committer | None = None
        self._host = _hostname_part()
        self._live = _LiveNames()
        # crash leftovers in tmp/: at check() (start), then hourly from open()
        self.sweeper = TmpSweeper(self._tmp, self._live.snapshot, clock=clock,
                                  stale_after=stale_after, interval=sweep_interval)

    @classmethod
    def parse(cls, arg: str, **options) -> "MaildirDelivery":
        return cls(arg, **options)

    def _ensure_dirs(self) -> None:
        created = False
        for sub in ("tmp", "new", "cur"):
            try:
                os.makedirs(os.path.join(self.path, sub), mode=0o700)
                created = True
            except FileExistsError:
                if not os.path.isdir(os.path.join(self.path, sub)):
                    raise NotADirectoryError(errno.ENOTDIR, "not a directory",
                                             os.path.join(self.path, sub))
        if created:  # make the new directory entries durable once
            for d in (self.path, os.path.dirname(self.path)):
                fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        self._dirs_ok = True

    def check(self) -> None:
        """tmp/, new/, cur/ exist (made if missing) and a file can be
        created, written and removed in tmp/ (the real path of every
        message), else OSError: ENOTDIR, EACCES, EROFS, ENOSPC...
        Then removes the stale files a killed server left in tmp/
        (tmpsweep.py); serve runs this before it accepts, so synchronously."""
        self._ensure_dirs()
        probe = os.path.join(self._tmp, f".check.P{os.getpid()}.{self._host}")
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.file_mode)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
        self.sweeper.due()          # starts the hourly period now
        self.sweeper.sweep()

    def _committer_for(self) -> _Committer:
        if self._committer is None:
            self._committer = _Committer(self._new, self.sync_threads)
        return self._committer

    def open(self, env: Envelope) -> Sink:
        check_envelope(env)
        tmp = ""
        try:
            if not self._dirs_ok:
                self._ensure_dirs()
            now = time.time()
            sec = int(now)
            qid = f"M{int((now - sec) * 1e6)}{local_id()}"     # M<usec>P<pid>Q<n>
            name = f"{sec}.{qid}.{self._host}"
            tmp = os.path.join(self._tmp, name)
            self._live.add(tmp)     # before the file exists: the sweep must never see it unclaimed
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         self.file_mode)
        except OSError as exc:
            self._dirs_ok = False  # re-check the layout next time
            if tmp:
                self._live.discard(tmp)
            return _failed_sink(f"maildir {os_error_text(exc)}")
        if self.sweeper.due():
            self._committer_for().run_aside(self.sweeper.sweep)
        job = _Job(open(fd, "wb", buffering=CHUNK), tmp, os.path.join(self._new, name), qid,
                   self._live)
        sink = _MaildirSink(self, job)
        sink.write(envelope_headers(env))
        return sink

    async def close(self) -> None:
        if self._committer is not None:
            c, self._committer = self._committer, None
            await asyncio.get_running_loop().run_in_executor(None, c.close)
