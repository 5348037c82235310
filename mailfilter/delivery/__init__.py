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
SpooledTemporaryFile (1 MB in memory, then disk). So qmail-queue starts
after the end of data, not before the 354 as in qmail-smtpd (SPEC B §1.11):
the message is checked (size, hops, content) before anything is queued,
and a qmail-queue that cannot run is found at start-up (`check()`).

Specs (`Delivery.from_spec`):

maildir:DIR
    DIR/{tmp,new,cur} are created on first use. Each message is written to
    tmp/<time>.M<usec>P<pid>Q<n>.<host> (cr.yp.to/proto/maildir.html), fsync'ed,
    renamed into new/, then new/ is fsync'ed. The envelope is kept in the file
    as prepended headers: `Return-Path: <sender>` and one
    `X-Envelope-To: <rcpt>` per recipient, before the Received header; each
    address as an RFC 5321 §4.1.2 path (`smtp_path`: the local part quoted
    when it is not a Dot-string, so `<"john smith"@example.org>`; CR, LF and
    NUL in an address would be written as `?`). The qid in
    `250 ok <stamp> qp <qid>` is the M..P..Q.. part of the file name.
    Group commit (see `_Committer`): one committer thread takes every pending
    commit, fsyncs their files in parallel on a small thread pool, renames
    each into new/ and fsyncs new/ ONCE for the batch; each commit resolves
    only after its batch's directory fsync. Any OSError
    (ENOSPC, EFBIG, EACCES, ENOTDIR, ...) -> the tmp file is removed, nothing
    is in new/, 451 store_failed, and the next message first re-checks (and
    remakes) tmp/, new/, cur/. A new/ that vanished under a message in flight
    is made again (fsync'ed into DIR) and the rename retried once. A process
    killed mid-message leaves at most a file in tmp/ (the Maildir spec's
    36-hour tmp/ cleanup removes it).
qmail-queue:PROG [ARGS]
    PROG and its arguments are split on whitespace. The message goes to the
    child's fd 0, the envelope `F<sender>\\0T<rcpt>\\0...\\0` to its fd 1
    (qmail-queue(8)). Exit 0 -> 250 with qid = child pid; other exits map to
    451/554 with qmail.c's texts (SPEC B §1.11 table, `(#x.y.z)` dropped, the
    enhanced code carried up front); killed by a signal -> 451 qq crashed;
    spawn failure -> 451 unable to exec qq; exit 0 after we failed to write
    the message -> 451 qq read error (qmail.c does the same). A PROG that
    does not exist or is not executable is a start-up error (`check()`).
    A child still running after HANDOVER_TIMEOUT (540 s) is killed: 451 qq
    timeout.
smtp:HOST:PORT, lmtp:HOST:PORT
    One downstream connection per message (EHLO/LHLO, MAIL, RCPT each, DATA;
    LF -> CRLF and dot-stuffing done in bulk). When the next hop's EHLO/LHLO
    lists them, MAIL FROM carries `SIZE=` (RFC 1870: the spooled size with
    CRLF line ends, so a smaller limit downstream refuses at MAIL, not after
    the whole body) and `BODY=8BITMIME` when the message holds an 8-bit byte
    (RFC 6152; decided from the bytes, not from the client's declaration).
    An 8-bit message to a hop without 8BITMIME goes as is (qmail-remote
    does the same; no MIME down-conversion here). MAIL/RCPT carry RFC 5321
    §4.1.2 paths (`smtp_path`): the local part as a Dot-string when it
    is one, else a Quoted-string; `<>` for the null sender. (qmail-queue's
    envelope takes the raw address: no quoting there.) 250 only after the
    downstream's 2xx to the end of data. Downstream 4xx, refused/reset
    connection, protocol garbage (a malformed line, a code outside 200-599),
    timeouts (connect 30 s, command 300 s, the whole hand-over 540 s:
    HANDOVER_TIMEOUT, under a client's 10-minute wait) -> 451. A 5xx to
    MAIL, DATA or the end of data -> 554 with the downstream's text and its
    enhanced code when it gave a valid 5.x.y (else 5.3.0); 5xx at the
    greeting or EHLO says nothing about the message and is 451.
    RCPT: any 4xx -> 451 without sending DATA (the client retries the
    message); all 5xx -> 554; some 5xx and the rest 2xx -> the message goes
    to the accepted ones, and the client's reply is a 554 saying so
    ("delivered to 1 of 2 recipients; next hop rejected <r>: ...", the next
    hop's enhanced code): SMTP has one reply per message, a 250 would drop
    the refused recipient silently, and a 451 (as before) held the good
    recipients' mail until the client's queue expired, then bounced it.
    LMTP (RFC 2033 §4.2): one reply per accepted recipient after DATA, kept in
    `per_recipient` (one downstream reply per envelope recipient, in order).
    All 2xx -> 250; all 5xx -> 554; 2xx and 5xx -> the same 554 "delivered
    to N of M"; any 4xx -> 451: recipients already delivered may then get a
    duplicate when the client retries, chosen over loss (a deferral is
    short-lived; a permanent refusal would have repeated the delivery on
    every retry until the client gave up).
discard
    Explicit benchmark sink: commit -> 250, nothing is written anywhere.
"""
from __future__ import annotations

import errno
import itertools
import os
import re
import tempfile
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

from mailfilter.smtp.received import received_header
from mailfilter.smtp.replies import Reply, reply

__all__ = [
    "Envelope", "DeliveryResult", "Delivery", "Sink", "MaildirDelivery",
    "QmailQueueDelivery", "SmtpDelivery", "LmtpDelivery", "DiscardDelivery",
    "received_header", "smtp_encode", "smtp_path", "QQ_EXITS",
]

SPOOL_MEMORY = 1 << 20     # SpooledTemporaryFile: bytes kept in memory
CHUNK = 1 << 16            # read/write unit when streaming a spool


@dataclass
class Envelope:
    sender: str                 # "" for the null sender <>
    recipients: list[str]
    helo: str                   # as the engine decodes it (Latin-1: one char per byte); "" when none
    client_ip: str
    client_host: str            # "unknown" when there is no PTR name
    auth_user: str | None
    tls: bool
    local_host: str
    esmtp: bool = True          # the session greeted with EHLO (False: HELO)


@dataclass(frozen=True)
class SpoolFacts:
    """What the spool learnt while the message streamed in (for SIZE= and
    BODY= downstream): stored bytes, bytes on the wire with CRLF line ends,
    and whether any byte is 8-bit."""
    size: int = 0
    wire_size: int = 0
    eight_bit: bool = False


@dataclass
class DeliveryResult:
    ok: bool
    reply: Reply                # the final reply to the DATA transaction
    per_recipient: list[Reply] | None = None  # LMTP: downstream replies
    detail: str = ""            # for the log line; never holds a secret


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


_counter = itertools.count(1)
_pid = [os.getpid()]     # getpid() is a system call; refreshed in a forked child
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


def _local_id() -> str:
    """A process-unique id (`P<pid>Q<n>`) for replies of non-maildir hops."""
    return f"P{_pid[0]}Q{next(_counter)}"


# RFC 5321 §4.1.2 atext (RFC 5322 §3.2.3); 8-bit bytes count as atext
# (RFC 6531 UTF8-non-ascii) so an 8-bit local part is passed as written.
_ATEXT = rb"A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\xff-"
_DOT_STRING = re.compile(rb"[" + _ATEXT + rb"]+(?:\.[" + _ATEXT + rb"]+)*\Z")


def smtp_path(addr: str) -> bytes:
    """The RFC 5321 §4.1.2 path for an envelope address as the parser gives
    it (unquoted): `<>` for the null sender; the local part as a Dot-string
    when it is one, else as a Quoted-string with `"` and `\\` escaped; the
    domain (after the last `@`) as is. Used for the smtp/lmtp MAIL and RCPT
    commands and for the maildir Return-Path / X-Envelope-To headers."""
    if not addr:
        return b"<>"
    raw = _b(addr)
    local, at, domain = raw.rpartition(b"@")
    if not at:
        local, domain = raw, b""
    if not _DOT_STRING.match(local):
        local = b'"' + local.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"<" + local + at + domain + b">"


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


# The longest a hand-over to qmail-queue or an smtp:/lmtp: next hop may take:
# under the 10 minutes a client waits for the reply to its final dot (RFC
# 5321 §4.5.3.2.6). Past that it has given up and will send the message
# again, so finishing later only makes a duplicate; at the deadline the
# hand-over is abandoned (qmail-queue killed before it commits) with 451.
HANDOVER_TIMEOUT = 540.0


def _oserr(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return f"{errno.errorcode.get(exc.errno, exc.errno)} {exc.strerror}"
    return type(exc).__name__


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


class Sink(ABC):
    """One message in flight. write() is synchronous and cheap; the message
    is committed once, by commit_now() or else by awaiting commit();
    abort() drops the message and is idempotent."""

    __slots__ = ()

    @abstractmethod
    def write(self, chunk: bytes) -> None: ...

    @abstractmethod
    async def commit(self) -> DeliveryResult: ...

    def commit_now(self) -> DeliveryResult | None:
        """Commit without waiting, when the sink can: the result, or None
        (nothing happened; await commit() instead). Only a sink whose commit
        needs no I/O answers here, so "250 means stored" holds either way;
        the server then skips a Task per message."""
        return None

    @abstractmethod
    def abort(self) -> None: ...


class Delivery(ABC):
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
        if kind in _SPECS and colon:
            return __getattr__(_SPECS[kind]).parse(arg, **options)
        raise ValueError(
            f"bad delivery spec {spec!r}: expected maildir:DIR, "
            "qmail-queue:PROG [ARGS], smtp:HOST:PORT, lmtp:HOST:PORT or discard")

    @abstractmethod
    def open(self, env: Envelope) -> Sink: ...

    def check(self) -> None:
        """At start-up: raise OSError when this hop cannot work at all (an
        unusable spool, a missing qmail-queue program), so the operator sees
        it before any mail is deferred.
        Hops whose trouble is only known per message check nothing here."""
        return None

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
        return self.commit_now()

    def commit_now(self) -> DeliveryResult:
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
# spooled sinks (qmail-queue, smtp, lmtp)
# --------------------------------------------------------------------------

class _SpoolSink(Sink):
    """Spools to memory then disk; commit() hands the spool to `deliver`."""
    __slots__ = ("_spool", "_error", "_state", "_deliver", "_env", "size", "_lines", "_eight_bit")

    def __init__(self, env: Envelope, deliver: Callable, max_memory: int,
                 spool_dir: str | None) -> None:
        self._env = env
        self._deliver = deliver
        self._spool = tempfile.SpooledTemporaryFile(max_size=max_memory, dir=spool_dir)
        self._error: BaseException | None = None
        self._state = "open"
        self.size = 0
        self._lines = 0
        self._eight_bit = False

    def write(self, chunk: bytes) -> None:
        if self._state != "open":
            raise RuntimeError("write after commit/abort")
        if self._error is not None:
            return
        try:
            self._spool.write(chunk)
            self.size += len(chunk)
            # line ends on the wire: every LF, and every (bare) CR (forward.smtp_encode)
            self._lines += chunk.count(b"\n") + chunk.count(b"\r")
            if not self._eight_bit and not chunk.isascii():
                self._eight_bit = True
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
            facts = SpoolFacts(self.size, self.size + self._lines, self._eight_bit)
            return await self._deliver(self._env, self._spool, facts)
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

    @abstractmethod
    async def _deliver(self, env: Envelope, spool, facts: SpoolFacts) -> DeliveryResult: ...


# The next hops live in their own modules, which build on the classes above;
# `mailfilter.delivery` stays the one door to them (PEP 562 lazy re-export,
# so importing a submodule first cannot create an import cycle).
_HOPS = {
    "MaildirDelivery": "mailfilter.delivery.maildir",
    "QmailQueueDelivery": "mailfilter.delivery.qmailqueue",
    "QQ_EXITS": "mailfilter.delivery.qmailqueue",
    "SmtpDelivery": "mailfilter.delivery.forward",
    "LmtpDelivery": "mailfilter.delivery.forward",
    "smtp_encode": "mailfilter.delivery.forward",
}
_SPECS = {"maildir": "MaildirDelivery", "qmail-queue": "QmailQueueDelivery",
          "smtp": "SmtpDelivery", "lmtp": "LmtpDelivery"}


def __getattr__(name: str):
    module = _HOPS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
