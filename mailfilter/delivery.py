"""Delivery: hand an accepted message to the next hop; 250 only when stored.

Job: after DATA the server writes the message into a Sink and awaits
`sink.commit()`; the DeliveryResult carries the one reply to send. This is the
only `await` on the message path (DESIGN.md "Data flow").

Invariant (SPEC A §9 "250 means stored"): `ok=True` / 250 only after the next
hop has the message durably: the fsync'ed Maildir file renamed into new/ with
new/ fsync'ed, qmail-queue exit 0, or the downstream's 250 after DATA. Every
failure is a 4xx (the client retries) unless the next hop itself rejected the
message permanently (5xx from qmail-queue's permanent exits or downstream).
Never a silent accept, never a silently dropped recipient.

Message bytes arrive in qmail storage format (SPEC B §1.11): LF line ends,
already dot-unstuffed; the caller writes the Received header first
(`received_header`, SPEC B §1.12). Bodies are never held whole in memory:
maildir writes straight into tmp/, the other sinks spool to a
SpooledTemporaryFile (1 MB in memory, then disk).

Specs (`Delivery.from_spec`):

maildir:DIR
    DIR/{tmp,new,cur} are created on first use. Each message is written to
    tmp/<time>.M<usec>P<pid>Q<n>.<host> (cr.yp.to/proto/maildir.html), fsync'ed,
    renamed into new/, then new/ is fsync'ed. The envelope is kept in the file
    as prepended headers: `Return-Path: <sender>` and one
    `X-Envelope-To: <rcpt>` per recipient, before the Received header (CR, LF
    and NUL in an address would be written as `?`). The qid in
    `250 ok <stamp> qp <qid>` is the M..P..Q.. part of the file name.
    Group commit (see `_Committer`): one committer thread takes every pending
    commit, fsyncs their files in parallel on a small thread pool, renames
    each into new/ and fsyncs new/ ONCE for the batch; each commit resolves
    only after its batch's directory fsync. Any OSError
    (ENOSPC, EFBIG, EACCES, ENOTDIR, ...) -> the tmp file is removed, nothing
    is in new/, 451 store_failed. A process killed mid-message leaves at most
    a file in tmp/ (the Maildir spec's 36-hour tmp/ cleanup removes it).
qmail-queue:PROG [ARGS]
    PROG and its arguments are split on whitespace. The message goes to the
    child's fd 0, the envelope `F<sender>\\0T<rcpt>\\0...\\0` to its fd 1
    (qmail-queue(8)). Exit 0 -> 250 with qid = child pid; other exits map to
    451/554 with qmail.c's texts (SPEC B §1.11 table, `(#x.y.z)` dropped, the
    enhanced code carried up front); killed by a signal -> 451 qq crashed;
    spawn failure -> 451 unable to exec qq; exit 0 after we failed to write
    the message -> 451 qq read error (qmail.c does the same).
smtp:HOST:PORT, lmtp:HOST:PORT
    One downstream connection per message (EHLO/LHLO, MAIL, RCPT each, DATA;
    LF -> CRLF and dot-stuffing done in bulk). 250 only after the downstream's
    2xx to the end of data. Downstream 4xx, refused/reset connection, protocol
    garbage, timeouts (connect 30 s, command 300 s by default) -> 451. A 5xx to
    MAIL, DATA or the end of data -> 554 with the downstream's text; 5xx at the
    greeting or EHLO says nothing about the message and is 451.
    RCPT: any 4xx -> 451; all 5xx -> 554; some 5xx and some 2xx -> 451 without
    sending DATA (the client retries; a recipient is never silently dropped).
    LMTP (RFC 2033 §4.2): one reply per accepted recipient after DATA, kept in
    `per_recipient` (one downstream reply per envelope recipient, in order).
    All 2xx -> 250; all 5xx -> 554; anything else (any 4xx, or a 2xx/5xx mix)
    -> 451: recipients that were already delivered may then receive a
    duplicate when the client retries, chosen over loss.
discard
    Explicit benchmark sink: commit -> 250, nothing is written anywhere.
"""
from __future__ import annotations

import asyncio
import errno
import itertools
import os
import re
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from mailfilter.received import received_header
from mailfilter.replies import Reply, reply

__all__ = [
    "Envelope", "DeliveryResult", "Delivery", "Sink", "MaildirDelivery",
    "QmailQueueDelivery", "SmtpDelivery", "LmtpDelivery", "DiscardDelivery",
    "received_header", "smtp_encode", "QQ_EXITS",
]

SPOOL_MEMORY = 1 << 20     # SpooledTemporaryFile: bytes kept in memory
CHUNK = 1 << 16            # read/write unit when streaming a spool


@dataclass
class Envelope:
    sender: str                 # "" for the null sender <>
    recipients: list[str]
    helo: str                   # "" when the client gave none
    client_ip: str
    client_host: str            # "unknown" when there is no PTR name
    auth_user: str | None
    tls: bool
    local_host: str


@dataclass
class DeliveryResult:
    ok: bool
    reply: Reply                # the final reply to the DATA transaction
    per_recipient: list[Reply] | None = None  # LMTP: downstream replies
    detail: str = ""            # for the log line; never holds a secret


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


_counter = itertools.count(1)


def _local_id() -> str:
    """A process-unique id (`P<pid>Q<n>`) for replies of non-maildir hops."""
    return f"P{os.getpid()}Q{next(_counter)}"


_ADDR_FORBIDDEN = re.compile(r"[\r\n\0]")


def _check_env(env: Envelope) -> None:
    """Caller bugs, refused loudly: no recipients (qmail-queue would accept
    and deliver to nobody, a silent loss, SPEC A §9), or CR/LF/NUL in an
    address (SMTP command injection downstream; NUL splits the qmail-queue
    envelope). The SMTP parser never produces either."""
    if not env.recipients:
        raise ValueError("delivery: envelope has no recipients")
    for addr in (env.sender, *env.recipients):
        if _ADDR_FORBIDDEN.search(addr):
            raise ValueError(f"delivery: CR, LF or NUL in envelope address {addr!r}")


def _queued(qid: object, detail: str) -> DeliveryResult:
    return DeliveryResult(True, reply("queued", stamp=int(time.time()), qid=qid),
                          None, detail)


def _store_failed(detail: str) -> DeliveryResult:
    return DeliveryResult(False, reply("store_failed"), None, detail)


def _oserr(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return f"{errno.errorcode.get(exc.errno, exc.errno)} {exc.strerror}"
    return type(exc).__name__


class Sink:
    """One message in flight. write() is synchronous and cheap; commit() is
    awaited once; abort() drops the message and is idempotent."""

    def write(self, chunk: bytes) -> None:
        raise NotImplementedError

    async def commit(self) -> DeliveryResult:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError


class Delivery:
    """A configured next hop. open(env) -> Sink per message."""

    spec: str = ""

    @staticmethod
    def from_spec(spec: str, **options) -> "Delivery":
        """Parse `maildir:DIR`, `qmail-queue:PROG [ARGS]`, `smtp:HOST:PORT`,
        `lmtp:HOST:PORT` or `discard`. Options go to the class (timeouts...).
        A malformed spec raises ValueError naming the accepted forms."""
        if not isinstance(spec, str):
            raise ValueError(f"delivery spec must be a string, not {type(spec).__name__}")
        kind, colon, arg = spec.strip().partition(":")
        if kind == "discard" and not colon:
            return DiscardDelivery(**options)
        if kind in _CLASSES and colon:
            return _CLASSES[kind].parse(arg, **options)
        raise ValueError(
            f"bad delivery spec {spec!r}: expected maildir:DIR, "
            "qmail-queue:PROG [ARGS], smtp:HOST:PORT, lmtp:HOST:PORT or discard")

    def open(self, env: Envelope) -> Sink:
        raise NotImplementedError

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"


# --------------------------------------------------------------------------
# discard
# --------------------------------------------------------------------------

class _FixedResultSink(Sink):
    """A sink that stores nothing and answers one fixed result at commit."""
    __slots__ = ("_result", "_done")

    def __init__(self, result) -> None:
        self._result = result          # callable -> DeliveryResult
        self._done = False

    def write(self, chunk: bytes) -> None:
        if self._done:
            raise RuntimeError("write after commit/abort")

    async def commit(self) -> DeliveryResult:
        if self._done:
            raise RuntimeError("commit after commit/abort")
        self._done = True
        return self._result()

    def abort(self) -> None:
        self._done = True


def _discard_sink() -> Sink:
    return _FixedResultSink(lambda: _queued(_local_id(), "discard"))


class DiscardDelivery(Delivery):
    """Benchmark sink: always 250, stores nothing. Never a production hop."""

    spec = "discard"

    def open(self, env: Envelope) -> Sink:
        _check_env(env)
        return _discard_sink()


# --------------------------------------------------------------------------
# maildir with group commit
# --------------------------------------------------------------------------

def _hostname_part() -> str:
    # Maildir spec: "/" -> \057 and ":" -> \072 in the host part.
    return socket.gethostname().replace("/", r"\057").replace(":", r"\072")


_HEADER_UNSAFE = bytes.maketrans(b"\r\n\0", b"???")


def envelope_headers(env: Envelope) -> bytes:
    """`Return-Path: <sender>` + one `X-Envelope-To: <rcpt>` per recipient."""
    out = [b"Return-Path: <", _b(env.sender).translate(_HEADER_UNSAFE), b">\n"]
    for rcpt in env.recipients:
        out += [b"X-Envelope-To: <", _b(rcpt).translate(_HEADER_UNSAFE), b">\n"]
    return b"".join(out)


class _Job:
    """One maildir message handed from the event loop to the committer."""
    __slots__ = ("file", "tmp", "new", "qid", "error", "loop", "fut", "size")

    def __init__(self, file, tmp: str, new: str, qid: str) -> None:
        self.file = file
        self.tmp = tmp
        self.new = new
        self.qid = qid
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.fut: asyncio.Future | None = None
        self.size = 0


def _close_quietly(f) -> None:
    try:
        f.close()
    except OSError:
        pass  # a failed final flush; the file is being discarded anyway


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass  # left in tmp/: the Maildir 36-hour cleanup removes it


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
            _close_quietly(job.file)
            _unlink_quietly(job.tmp)

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
                    _close_quietly(job.file)
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
                os.rename(job.tmp, job.new)
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
        if job.error is None:
            res = _queued(job.qid, f"maildir new/{os.path.basename(job.new)} size={job.size}")
        else:
            res = _store_failed(f"maildir {_oserr(job.error)}")
        try:
            job.loop.call_soon_threadsafe(_set_result, job.fut, res)
        except RuntimeError:
            pass  # loop closed: nobody is waiting any more

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
        return res

    def abort(self) -> None:
        if self._state != "open":
            return  # committing/committed mail is not ours to remove
        self._state = "aborted"
        _close_quietly(self._job.file)
        _unlink_quietly(self._job.tmp)


def _failed_sink(detail: str) -> Sink:
    """Stands in when the store cannot even open a file: commit -> 451."""
    return _FixedResultSink(lambda: _store_failed(detail))


class MaildirDelivery(Delivery):
    """maildir:DIR -- see the module docstring for layout and durability."""

    def __init__(self, path: str, *, sync_threads: int = 16, file_mode: int = 0o600) -> None:
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

    def _committer_for(self) -> _Committer:
        if self._committer is None:
            self._committer = _Committer(self._new, self.sync_threads)
        return self._committer

    def open(self, env: Envelope) -> Sink:
        _check_env(env)
        try:
            if not self._dirs_ok:
                self._ensure_dirs()
            now = time.time()
            sec = int(now)
            qid = f"M{int((now - sec) * 1e6)}P{os.getpid()}Q{next(_counter)}"
            name = f"{sec}.{qid}.{self._host}"
            tmp = os.path.join(self._tmp, name)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                         self.file_mode)
        except OSError as exc:
            self._dirs_ok = False  # re-check the layout next time
            return _failed_sink(f"maildir {_oserr(exc)}")
        job = _Job(open(fd, "wb", buffering=CHUNK), tmp, os.path.join(self._new, name), qid)
        sink = _MaildirSink(self, job)
        sink.write(envelope_headers(env))
        return sink

    async def close(self) -> None:
        if self._committer is not None:
            c, self._committer = self._committer, None
            await asyncio.get_running_loop().run_in_executor(None, c.close)


# --------------------------------------------------------------------------
# spooled sinks (qmail-queue, smtp, lmtp)
# --------------------------------------------------------------------------

class _SpoolSink(Sink):
    """Spools to memory then disk; commit() hands the spool to `deliver`."""
    __slots__ = ("_spool", "_error", "_state", "_deliver", "_env", "size")

    def __init__(self, env: Envelope, deliver: Callable, max_memory: int,
                 spool_dir: str | None) -> None:
        self._env = env
        self._deliver = deliver
        self._spool = tempfile.SpooledTemporaryFile(max_size=max_memory, dir=spool_dir)
        self._error: BaseException | None = None
        self._state = "open"
        self.size = 0

    def write(self, chunk: bytes) -> None:
        if self._state != "open":
            raise RuntimeError("write after commit/abort")
        if self._error is not None:
            return
        try:
            self._spool.write(chunk)
            self.size += len(chunk)
        except OSError as exc:  # rollover to disk failed: ENOSPC, EFBIG ...
            self._error = exc

    async def commit(self) -> DeliveryResult:
        if self._state != "open":
            raise RuntimeError("commit after commit/abort")
        self._state = "committing"
        try:
            if self._error is not None:
                return _store_failed(f"spool {_oserr(self._error)}")
            try:
                self._spool.seek(0)
            except OSError as exc:
                return _store_failed(f"spool {_oserr(exc)}")
            return await self._deliver(self._env, self._spool)
        finally:
            self._state = "done"
            _close_quietly(self._spool)

    def abort(self) -> None:
        if self._state == "open":
            self._state = "aborted"
            _close_quietly(self._spool)


def _read_chunks(spool):
    """Yield the spool in CHUNK pieces (blocking reads of a local file or memory)."""
    while True:
        chunk = spool.read(CHUNK)
        if not chunk:
            return
        yield chunk


class _SpoolingDelivery(Delivery):
    def __init__(self, *, spool_max_memory: int = SPOOL_MEMORY,
                 spool_dir: str | None = None) -> None:
        self.spool_max_memory = spool_max_memory
        self.spool_dir = spool_dir

    def open(self, env: Envelope) -> Sink:
        _check_env(env)
        return _SpoolSink(env, self._deliver, self.spool_max_memory, self.spool_dir)

    async def _deliver(self, env: Envelope, spool) -> DeliveryResult:
        raise NotImplementedError


# --------------------------------------------------------------------------
# qmail-queue
# --------------------------------------------------------------------------

def _qq_table() -> dict[int, tuple[str, str]]:
    # SPEC B §1.11 (qmail.c qmail_close): exit -> (reply name, text).
    t: dict[int, tuple[str, str]] = {}
    for code in range(11, 41):
        t[code] = ("queue_perm", "qq permanent problem")
    t[11] = t[115] = ("queue_perm_addr", "envelope address too long for qq")
    t[31] = ("queue_perm", "mail server permanently rejected message")
    t[51] = ("queue_temp", "qq out of memory")
    t[52] = ("queue_temp", "qq timeout")
    t[53] = ("queue_temp", "qq write error or disk full")
    t[54] = ("queue_temp", "qq read error")
    t[55] = ("queue_temp", "qq unable to read configuration")
    t[56] = ("queue_temp", "qq trouble making network connection")
    t[61] = ("queue_temp", "qq trouble in home directory")
    for code in range(62, 67):
        t[code] = ("queue_temp", "qq trouble creating files in queue")
    t[71] = ("queue_temp", "mail server temporarily rejected message")
    t[72] = ("queue_temp_net", "connection to mail server timed out")
    t[73] = ("queue_temp_net", "connection to mail server rejected")
    t[74] = ("queue_temp_comm", "communication with mail server failed")
    t[81] = t[91] = ("queue_temp", "qq internal bug")
    t[120] = ("queue_temp", "unable to exec qq")
    return t


QQ_EXITS = _qq_table()
_QQ_OTHER = ("queue_temp", "qq temporary problem")


def qq_reply(status: int) -> Reply:
    """Reply for a qmail-queue exit status (non-zero) or -signal."""
    if status < 0:
        return reply("queue_temp", text="qq crashed")
    name, text = QQ_EXITS.get(status, _QQ_OTHER)
    return reply(name, text=text)


def qq_envelope(env: Envelope) -> bytes:
    """qmail-queue(8) envelope: F<sender>\\0 T<rcpt>\\0 ... \\0."""
    parts = [b"F", _b(env.sender), b"\0"]
    for rcpt in env.recipients:
        parts += [b"T", _b(rcpt), b"\0"]
    parts.append(b"\0")
    return b"".join(parts)


class _PipeDone(asyncio.Protocol):
    """Write-pipe protocol: `done` resolves with None or the write error."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done = loop.create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(exc)


class QmailQueueDelivery(_SpoolingDelivery):
    """qmail-queue:PROG [ARGS] -- the qmail-queue protocol (SPEC B §1.11)."""

    def __init__(self, argv: list[str], *, timeout: float = 1200.0, **spool) -> None:
        super().__init__(**spool)
        if not argv:
            raise ValueError("qmail-queue: needs a program, e.g. qmail-queue:/var/qmail/bin/qmail-queue")
        self.argv = list(argv)
        self.timeout = timeout
        self.spec = "qmail-queue:" + " ".join(argv)

    @classmethod
    def parse(cls, arg: str, **options) -> "QmailQueueDelivery":
        return cls(arg.split(), **options)

    async def _deliver(self, env: Envelope, spool) -> DeliveryResult:
        loop = asyncio.get_running_loop()
        rfd, wfd = os.pipe()   # envelope pipe: the child's fd 1 is rfd
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.PIPE, stdout=rfd)
        except OSError as exc:
            os.close(wfd)
            return DeliveryResult(False, reply("queue_temp", text="unable to exec qq"),
                                  None, f"qmail-queue spawn {self.argv[0]}: {_oserr(exc)}")
        finally:
            os.close(rfd)
        wfile = open(wfd, "wb", buffering=0)
        transport, proto = await loop.connect_write_pipe(lambda: _PipeDone(loop), wfile)
        # qmail-queue reads all of fd 0, then fd 1; the envelope is buffered
        # by the transport so a big envelope cannot deadlock against fd 0.
        transport.write(qq_envelope(env))
        transport.close()
        write_error: BaseException | None = None
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    for chunk in _read_chunks(spool):
                        proc.stdin.write(chunk)
                        await proc.stdin.drain()
                    proc.stdin.close()
                    await proc.stdin.wait_closed()
                except (BrokenPipeError, ConnectionResetError) as exc:
                    write_error = exc  # the child stopped reading; its exit tells why
                    proc.stdin.close()
                except OSError as exc:  # reading our own spool failed
                    write_error = exc
                    proc.kill()
                status = await proc.wait()
                env_error = await proto.done
        except TimeoutError:
            proc.kill()
            await proc.wait()
            transport.abort()
            return DeliveryResult(False, reply("queue_temp", text="qq timeout"), None,
                                  f"qmail-queue pid={proc.pid} timeout after {self.timeout}s")
        except asyncio.CancelledError:
            # The client is gone and never saw 250: stop qmail-queue if it
            # has not committed yet (its commit is atomic; a queued copy is a
            # duplicate on retry, never a loss). asyncio reaps the child.
            if proc.returncode is None:
                proc.kill()
            transport.abort()
            raise
        detail = f"qmail-queue pid={proc.pid} exit={status}"
        if status == 0:
            if write_error is None and env_error is None:
                return _queued(proc.pid, detail)
            # qmail.c: exit 0 with a write error is "qq read error"
            return DeliveryResult(False, reply("queue_temp", text="qq read error"), None,
                                  f"{detail} write error {_oserr(write_error or env_error)}")
        return DeliveryResult(False, qq_reply(status), None, detail)


# --------------------------------------------------------------------------
# smtp / lmtp forwarding
# --------------------------------------------------------------------------

def smtp_encode(chunk: bytes, at_bol: bool) -> tuple[bytes, bool]:
    """Stored LF text -> SMTP DATA wire form: dot-stuff (RFC 5321 §4.5.2) and
    LF -> CRLF, in bulk. `at_bol`: the previous chunk ended a line. Returns
    the wire bytes and the new `at_bol`."""
    if not chunk:
        return b"", at_bol
    out = chunk.replace(b"\n.", b"\n..").replace(b"\n", b"\r\n")
    if at_bol and chunk[:1] == b".":
        out = b"." + out
    return out, chunk[-1:] == b"\n"


_ENH = re.compile(rb"^([245]\.\d{1,3}\.\d{1,3}) ")
_PRINTABLE = bytes(b if 32 <= b < 127 else ord("?") for b in range(256))


class _Downstream(Exception):
    """Transport-level failure talking to the next hop (-> 451)."""


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout

    async def reply(self) -> Reply:
        """One (possibly multi-line) reply as a Reply: code, enhanced, text."""
        texts = []
        code = None
        async with asyncio.timeout(self.timeout):
            while True:
                line = await self.reader.readline()
                if not line.endswith(b"\n"):
                    raise _Downstream("connection closed by next hop")
                line = line.rstrip(b"\r\n")
                if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                    raise _Downstream("malformed reply from next hop")
                if code is not None and int(line[:3]) != code:
                    raise _Downstream("inconsistent multi-line reply from next hop")
                code = int(line[:3])
                texts.append(line[4:])
                if line[3:4] != b"-":
                    break
        text = b" ".join(texts)
        m = _ENH.match(text)
        enhanced = m.group(1).decode() if m else ""
        if m:
            text = text[m.end():]
        return Reply(code, enhanced, text[:300].translate(_PRINTABLE).decode("ascii"))

    async def command(self, line: bytes) -> Reply:
        self.writer.write(line)
        return await self.reply()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        async with asyncio.timeout(self.timeout):
            await self.writer.drain()


def _rcpt_verdict(rcpts: list[str], replies: list[Reply], stage: str) -> DeliveryResult | None:
    """None when every recipient got 2xx; else the message's 451/554 result.

    Any 4xx -> 451; all 5xx -> 554; a 2xx/5xx mix -> 451 (never silently drop
    a recipient; the client retries)."""
    temp = [(r, x) for r, x in zip(rcpts, replies) if x.code // 100 != 2 and x.code < 500]
    perm = [(r, x) for r, x in zip(rcpts, replies) if x.code >= 500]
    if not temp and not perm:
        return None
    if temp:
        r, x = temp[0]
        return DeliveryResult(False, reply("downstream_rcpt_temp",
                                           text=f"next hop deferred <{r}>: {x.text}"),
                              None, f"{stage} {x.code} <{r}>")
    r, x = perm[0]
    if len(perm) == len(replies):
        return DeliveryResult(False, reply("downstream_rejected", text=x.text), None,
                              f"{stage} {x.code} <{r}> all recipients rejected")
    return DeliveryResult(False, reply("downstream_rcpt_temp",
                                       text=f"next hop rejected <{r}>: {x.text}; try again later"),
                          None, f"{stage} {x.code} <{r}> partial rejection")


class SmtpDelivery(_SpoolingDelivery):
    """smtp:HOST:PORT -- forward with 250 only after the downstream's 250."""

    lmtp = False

    def __init__(self, host: str, port: int, *, connect_timeout: float = 30.0,
                 command_timeout: float = 300.0, helo_name: str | None = None,
                 **spool) -> None:
        super().__init__(**spool)
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.helo_name = helo_name
        kind = "lmtp" if self.lmtp else "smtp"
        self.spec = f"{kind}:{host}:{port}" if ":" not in host else f"{kind}:[{host}]:{port}"

    @classmethod
    def parse(cls, arg: str, **options) -> "SmtpDelivery":
        kind = "lmtp" if cls.lmtp else "smtp"
        host, colon, port = arg.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad delivery spec {kind}:{arg!r}: expected {kind}:HOST:PORT "
                             "with PORT 1-65535 (IPv6 as [addr]:PORT)")
        return cls(host, int(port), **options)

    def _where(self) -> str:
        return f"{'lmtp' if self.lmtp else 'smtp'} {self.host}:{self.port}"

    async def _deliver(self, env: Envelope, spool) -> DeliveryResult:
        where = self._where()
        writer = None
        try:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    reader, writer = await asyncio.open_connection(self.host, self.port)
            except (OSError, TimeoutError) as exc:
                raise _Downstream(f"connect: {_oserr(exc)}") from exc
            conn = _Conn(reader, writer, self.command_timeout)
            res = await self._transaction(conn, env, spool)
            res.detail = f"{where} {res.detail}"
            return res
        except (_Downstream, OSError, TimeoutError, ValueError) as exc:
            # ValueError: StreamReader line limit exceeded by a runaway reply
            why = str(exc) if isinstance(exc, _Downstream) else _oserr(exc)
            return DeliveryResult(False, reply("downstream_temp"), None, f"{where} {why}")
        finally:
            if writer is not None:
                writer.close()
                try:
                    async with asyncio.timeout(1.0):
                        await writer.wait_closed()
                except (OSError, TimeoutError):
                    pass

    async def _transaction(self, conn: _Conn, env: Envelope, spool) -> DeliveryResult:
        def temp(stage: str, r: Reply) -> DeliveryResult:
            return DeliveryResult(False, reply("downstream_temp"), None,
                                  f"{stage} {r.code} {r.text}")

        def perm(stage: str, r: Reply) -> DeliveryResult:
            return DeliveryResult(False, reply("downstream_rejected", text=r.text), None,
                                  f"{stage} {r.code} {r.text}")

        greet = await conn.reply()
        if greet.code != 220:
            return temp("greeting", greet)  # 5xx here is not about the message
        name = _b(self.helo_name or env.local_host or "localhost")
        if self.lmtp:
            r = await conn.command(b"LHLO " + name + b"\r\n")
        else:
            r = await conn.command(b"EHLO " + name + b"\r\n")
            if r.code >= 500:  # RFC 5321 §3.2: fall back to HELO
                r = await conn.command(b"HELO " + name + b"\r\n")
        if r.code != 250:
            return temp("ehlo", r)
        r = await conn.command(b"MAIL FROM:<" + _b(env.sender) + b">\r\n")
        if r.code // 100 != 2:
            await self._quit(conn)
            return perm("mail", r) if r.code >= 500 else temp("mail", r)
        rcpt_replies = []
        for rcpt in env.recipients:
            rcpt_replies.append(await conn.command(b"RCPT TO:<" + _b(rcpt) + b">\r\n"))
        verdict = _rcpt_verdict(env.recipients, rcpt_replies, "rcpt")
        if verdict is not None:
            if self.lmtp:
                verdict.per_recipient = rcpt_replies
            await self._quit(conn)
            return verdict
        r = await conn.command(b"DATA\r\n")
        if r.code != 354:
            await self._quit(conn)
            return perm("data", r) if r.code >= 500 else temp("data", r)
        at_bol = True
        for chunk in _read_chunks(spool):
            wire, at_bol = smtp_encode(chunk, at_bol)
            await conn.send(wire)
        await conn.send(b".\r\n" if at_bol else b"\r\n.\r\n")
        if self.lmtp:  # RFC 2033 §4.2: one reply per accepted recipient
            finals = [await conn.reply() for _ in env.recipients]
            await self._quit(conn)
            verdict = _rcpt_verdict(env.recipients, finals, "eod")
            if verdict is None:
                return DeliveryResult(True, _queued(_local_id(), "").reply, finals,
                                      f"eod {finals[0].code} x{len(finals)}")
            verdict.per_recipient = finals
            return verdict
        r = await conn.reply()
        await self._quit(conn)
        if r.code // 100 == 2:
            res = _queued(_local_id(), f"eod {r.code} {r.text}")
            return res
        return perm("eod", r) if r.code >= 500 else temp("eod", r)

    @staticmethod
    async def _quit(conn: _Conn) -> None:
        """QUIT and wait (briefly) for the 221, so the downstream logs a clean
        session end. Politeness only: the outcome is already decided."""
        conn.timeout = min(conn.timeout, 5.0)
        try:
            await conn.command(b"QUIT\r\n")
        except (_Downstream, OSError, TimeoutError, ValueError):
            pass


class LmtpDelivery(SmtpDelivery):
    """lmtp:HOST:PORT -- RFC 2033, per-recipient replies after DATA."""

    lmtp = True


_CLASSES: dict[str, type] = {
    "maildir": MaildirDelivery,
    "qmail-queue": QmailQueueDelivery,
    "smtp": SmtpDelivery,
    "lmtp": LmtpDelivery,
}
