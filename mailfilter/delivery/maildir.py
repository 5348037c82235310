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
    CHUNK, Delivery, DeliveryResult, FixedResultSink, Sink, local_id, os_error_text, queued,
    store_failed,
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


# Parts a sink holds before it writes them (writev(2) takes at most IOV_MAX,
# 1024 on Linux, per call); the engine hands over one part per read, so a
# message normally is 3 parts: envelope headers, Received, the body.
_MAX_PARTS = 64


def _write_parts(fd: int, parts: list, size: int) -> None:
    """Write `parts` (`size` bytes) with one writev(2); a short write (the
    file size limit reached, a signal) is finished with write(2), which
    then raises the error (EFBIG, ENOSPC ...)."""
    n = os.writev(fd, parts)
    if n < size:
        rest = memoryview(b"".join(parts))[n:]
        while rest:
            n = os.write(fd, rest)
            if n == 0:      # no progress and no error: never loop on it
                raise OSError(errno.EIO, "short write")
            rest = rest[n:]


class _Job:
    """One maildir message: filled on the event loop, committed by the
    committer. The message bytes are held as the parts the server wrote
    (no copy) until CHUNK bytes or _MAX_PARTS parts are pending; only then
    is the tmp/ file created and the parts written with one writev, so a
    large message streams into tmp/. A message that ends before that (most
    mail) is created, written, fsync'ed and closed at commit, on the
    committer's threads: the event loop makes no system call for it. That
    matters beyond the call's CPU: on ext4 creating a file (and writing one:
    its mtime) joins the running journal transaction, and waits while the
    fsyncs of the batch before are committing it."""
    __slots__ = ("d", "fd", "parts", "pending", "size", "name", "qid", "error", "loop", "fut",
                 "result")

    def __init__(self, d: "MaildirDelivery", name: str, qid: str) -> None:
        self.d = d
        self.fd = -1                 # the tmp/ file once created, until closed
        self.parts: list[bytes] = []
        self.pending = 0             # bytes in parts
        self.size = 0                # bytes written or pending
        self.name = name             # the same in tmp/ and new/
        self.qid = qid
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fut: asyncio.Future | None = None
        self.result: DeliveryResult | None = None

    def create(self) -> None:
        """Create the tmp/ file (OSError: ENOENT for a tmp/ removed
        meanwhile, ENOSPC, EACCES ...)."""
        self.fd = os.open(self.d._tmp_slash + self.name,
                          os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, self.d.file_mode)

    def write_pending(self) -> None:
        """Create the tmp/ file if not yet done, write what is pending.
        Raises OSError (see create(); EFBIG, ENOSPC, EIO ...)."""
        if self.fd < 0:
            self.create()
        parts, size = self.parts, self.pending
        self.parts, self.pending = [], 0
        if size:
            _write_parts(self.fd, parts, size)

    def close(self) -> None:
        """Close the file, once; a failed close of a file being discarded
        changes nothing."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


class _Committer:
    """Group commit for one maildir, off the event loop.

    One committer thread loops: take ALL commits submitted so far (the batch),
    create the tmp/ files not made yet (one after the other: see
    _commit_batch), write their pending bytes, fsync and close them in
    parallel (the batch cut into at most `sync_threads` slices: the committer
    syncs one slice itself, the thread pool the others; concurrent fsyncs
    share ext4/xfs journal commits; a batch of one is synced inline, no
    extra hop),
    rename each durable tmp/X into new/X, fsync new/ ONCE for the whole
    batch, then resolve every future of the batch with ONE wake-up of its
    event loop (call_soon_threadsafe per batch, not per message). So a
    resolved commit is either in a durable new/ entry (ok) or gone from tmp/
    and new/ (error), and the order "file durable before its name in new/"
    always holds.
    While one batch is being made durable the next accumulates, so the batch
    size follows the load: 1 at c=1 (no added latency), about c under load,
    and the fsync count per message falls as load rises.
    pause()/resume()/wait_ready() exist so tests can build an exact batch.
    """

    def __init__(self, d: "MaildirDelivery", sync_threads: int) -> None:
        self._d = d
        self.tmpdir = d._tmp_slash
        self.newdir = d._new
        self._newdir_slash = d._new + "/"
        self.sync_threads = max(1, sync_threads)
        self._pool = ThreadPoolExecutor(self.sync_threads, thread_name_prefix="maildir-fsync")
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
            if len(self._ready) == 1 or self.paused:
                self._cond.notify_all()     # the committer waits only for an empty list

    def _sync_file(self, job: _Job) -> None:
        """Stage 1: the pending bytes written, the file fsync'ed and closed
        (docs/behaviour/delivery.md#250-means-stored); on any error the tmp
        file is removed."""
        if job.error is None:
            try:
                job.write_pending()
                os.fsync(job.fd)
                fd, job.fd = job.fd, -1
                os.close(fd)
            except OSError as exc:
                job.error = exc
        if job.error is not None:
            job.parts = []
            job.close()
            _unlink_quietly(self.tmpdir + job.name)   # if it was created at all

    def _sync_slice(self, jobs: list[_Job]) -> None:
        for job in jobs:
            self._sync_file(job)

    def _rename(self, job: _Job) -> None:
        """tmp/X -> new/X. When new/ itself has vanished (removed by hand or
        a cleanup script) while tmp/X is still there, new/ is made again and
        the rename tried once more: otherwise every message would get 451
        until an operator recreated it. The new/ entry is made durable (fsync
        of the maildir) here; the rename itself by the batch's fsync of new/,
        as always, before any 250."""
        tmp, new = self.tmpdir + job.name, self._newdir_slash + job.name
        try:
            os.rename(tmp, new)
            return
        except FileNotFoundError:
            if os.path.lexists(self.newdir) or not os.path.lexists(tmp):
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
        os.rename(tmp, new)

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
                    if job.result is None:
                        job.error = job.error or exc
                        job.close()
                        self._settle(job)
                self._wake(batch)         # a second resolution is ignored

    def _commit_batch(self, batch: list[_Job]) -> None:
        n = len(batch)
        if n == 1:
            self._sync_file(batch[0])
        else:
            # Files are created here, one after the other: creates in one
            # directory take its lock in turn anyway, and from many threads
            # at once they spin on it (CPU for nothing). Writing, fsync and
            # close then run in parallel.
            for job in batch:
                if job.fd < 0 and job.error is None:
                    try:
                        job.create()
                    except OSError as exc:
                        job.error = exc
            k = min(n, self.sync_threads)
            slices = [batch[i::k] for i in range(k)]
            futures = [self._pool.submit(self._sync_slice, sl) for sl in slices[1:]]
            self._sync_slice(slices[0])
            for f in futures:
                f.result()
        renamed = []
        for job in batch:
            if job.error is not None:
                continue  # stage 1 failed: tmp file already removed
            try:
                self._rename(job)
                renamed.append(job)
            except OSError as exc:
                job.error = exc
                _unlink_quietly(self.tmpdir + job.name)
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
                    _unlink_quietly(self._newdir_slash + job.name)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, n)
        for job in batch:
            self._settle(job)
        self._wake(batch)

    def _settle(self, job: _Job) -> None:
        """The job's result, made here (off the loop); its name leaves the
        live set (renamed or removed by now: no longer in tmp/)."""
        d = self._d
        d._live.discard(job.name)
        if job.error is None:
            job.result = queued(job.qid, f"maildir new/{job.name} size={job.size}")
        else:
            job.result = store_failed(f"maildir {os_error_text(job.error)}")
            # As for a failed open(): re-check (and remake) tmp/, new/, cur/
            # before the next message, else a layout broken after this
            # message was opened (tmp/ removed) fails the next one too.
            d._dirs_ok = False

    @staticmethod
    def _wake(batch: list[_Job]) -> None:
        """One call_soon_threadsafe per event loop for the whole batch (one
        loop per process in serve; tests may have several)."""
        loop = batch[0].loop
        if all(job.loop is loop for job in batch):
            groups = {loop: batch}
        else:
            groups = {}
            for job in batch:
                groups.setdefault(job.loop, []).append(job)
        for loop, jobs in groups.items():
            try:
                loop.call_soon_threadsafe(_resolve_all, jobs)
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


def _resolve_all(jobs: list[_Job]) -> None:
    """On the event loop: hand each job's result to its waiting commit()
    (a commit whose caller was cancelled has a done future: skipped)."""
    for job in jobs:
        fut = job.fut
        if not fut.done():
            fut.set_result(job.result)


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
        if type(chunk) is not bytes:
            chunk = bytes(chunk)    # held until written: must not change meanwhile
        job.parts.append(chunk)
        job.pending += len(chunk)
        job.size += len(chunk)
        if job.pending >= CHUNK or len(job.parts) >= _MAX_PARTS:
            try:
                job.write_pending()     # a large message streams into tmp/
            except OSError as exc:      # ENOENT (tmp/ gone), EFBIG, ENOSPC, EIO ...
                job.error = exc

    async def commit(self) -> DeliveryResult:
        if self._state != "open":
            raise RuntimeError("commit after commit/abort")
        self._state = "committing"
        job = self._job
        job.loop = loop = asyncio.get_running_loop()
        job.fut = fut = loop.create_future()
        self._d._committer_for().submit(job)
        # Cancellation of the caller cancels only this future, never the
        # commit: the committer finishes it and skips the done future (the
        # message may still land; the client never saw 250 and retries: a
        # duplicate, never a loss).
        res = await fut
        self._state = "done"
        return res

    def abort(self) -> None:
        if self._state != "open":
            return  # committing/committed mail is not ours to remove
        self._state = "aborted"
        job = self._job
        job.parts = []
        if job.fd >= 0:             # the file was created (a large message)
            job.close()
            _unlink_quietly(self._d._tmp_slash + job.name)
        self._d._live.discard(job.name)


class _LiveNames:
    """Names in tmp/ this process has open (being written or committed): the
    tmp/ sweep never removes them. A name is added before its file is created
    and dropped after the file has left tmp/, so a listed file of ours is
    always in the set. Touched from the loop, the committer and the pool."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: set[str] = set()

    def add(self, name: str) -> None:
        with self._lock:
            self._names.add(name)

    def discard(self, name: str) -> None:
        with self._lock:
            self._names.discard(name)

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
        self._tmp_slash = self._tmp + "/"
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
            self._committer = _Committer(self, self.sync_threads)
        return self._committer

    def open(self, env: Envelope) -> Sink:
        """A sink for one message. Only a name is chosen here: the tmp/
        file is created once CHUNK bytes are pending or at commit (_Job)."""
        check_envelope(env)
        if not self._dirs_ok:
            try:
                self._ensure_dirs()
            except OSError as exc:
                return _failed_sink(f"maildir {os_error_text(exc)}")   # re-checked next time
        now = time.time()
        sec = int(now)
        qid = f"M{int((now - sec) * 1e6)}{local_id()}"     # M<usec>P<pid>Q<n>
        name = f"{sec}.{qid}.{self._host}"
        self._live.add(name)    # before the file exists: the sweep must never see it unclaimed
        if self.sweeper.due():
            self._committer_for().run_aside(self.sweeper.sweep)
        sink = _MaildirSink(self, _Job(self, name, qid))
        sink.write(envelope_headers(env))
        return sink

    async def close(self) -> None:
        if self._committer is not None:
            c, self._committer = self._committer, None
            await asyncio.get_running_loop().run_in_executor(None, c.close)
