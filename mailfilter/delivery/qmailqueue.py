"""qmail-queue:PROG -- hand the message to a qmail-queue-compatible program.

Job and invariants: see the package docstring ("qmail-queue:PROG"): message
on the child's fd 0, envelope `F<sender>\0T<rcpt>\0...\0` on fd 1; exit codes
mapped as qmail.c does (docs/behaviour/delivery.md#qmail-queue-exit-codes); 250 only on exit 0.
"""
from __future__ import annotations

import asyncio
import errno
import os

from mailfilter.delivery.base import HANDOVER_TIMEOUT, DeliveryResult, os_error_text, queued
from mailfilter.delivery.envelope import Envelope, text_bytes
from mailfilter.delivery.spool import SpoolingDelivery, read_chunks
from mailfilter.smtp.replies import Reply, reply

__all__ = ["QmailQueueDelivery", "QQ_EXITS", "TIMEOUT", "qq_envelope", "qq_reply"]


def _qq_table() -> dict[int, tuple[str, str]]:
    # docs/behaviour/delivery.md#qmail-queue-exit-codes (qmail.c qmail_close): exit ->
    # (reply name, text).
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
TIMEOUT = HANDOVER_TIMEOUT   # seconds for the whole hand-over (option `timeout`)
_QQ_OTHER = ("queue_temp", "qq temporary problem")


def qq_reply(status: int) -> Reply:
    """Reply for a qmail-queue exit status (non-zero) or -signal."""
    if status < 0:
        return reply("queue_temp", text="qq crashed")
    name, text = QQ_EXITS.get(status, _QQ_OTHER)
    return reply(name, text=text)


def qq_envelope(env: Envelope) -> bytes:
    """qmail-queue(8) envelope: F<sender>\\0 T<rcpt>\\0 ... \\0."""
    parts = [b"F", text_bytes(env.sender), b"\0"]
    for rcpt in env.recipients:
        parts += [b"T", text_bytes(rcpt), b"\0"]
    parts.append(b"\0")
    return b"".join(parts)


class _PipeDone(asyncio.Protocol):
    """Write-pipe protocol: `done` resolves with None or the write error."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done = loop.create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(exc)


def _drop_envelope(transport: asyncio.WriteTransport) -> None:
    """Drop the envelope pipe if it is still open. It was closed right after
    the write, so it ends by itself once the buffer is flushed (or the child
    is gone: EPIPE); only a transport still holding unsent bytes is open, and
    aborting a finished one fails (asyncio: its loop is already None)."""
    if transport.get_write_buffer_size():
        transport.abort()


class QmailQueueDelivery(SpoolingDelivery, kind="qmail-queue", form="qmail-queue:PROG [ARGS]"):
    """qmail-queue:PROG [ARGS] -- the qmail-queue protocol
    (docs/behaviour/delivery.md#qmail-queue).

    `timeout` (seconds, default TIMEOUT): the whole hand-over, from spawn to
    exit; past it the child is killed and the reply is 451 qq timeout."""

    def __init__(self, argv: list[str], *, timeout: float = TIMEOUT, **spool) -> None:
        super().__init__(**spool)
        if not argv:
            raise ValueError("qmail-queue: needs a program, e.g. qmail-queue:/var/qmail/bin/qmail-queue")
        self.argv = list(argv)
        self.timeout = timeout
        self.spec = "qmail-queue:" + " ".join(argv)

    @classmethod
    def parse(cls, arg: str, **options) -> "QmailQueueDelivery":
        return cls(arg.split(), **options)

    def check(self) -> None:
        """PROG resolves as the spawn resolves it (a name with a `/` as is,
        else the first match on PATH: subprocess's rule) to an executable
        file, else OSError naming it: a missing or non-executable qmail-queue
        would otherwise be found only after each whole message was received,
        as one 451 unable to exec qq per message."""
        prog = self.argv[0]
        if os.path.dirname(prog):
            candidates = [prog]
        else:
            candidates = [os.path.join(d, prog) for d in os.get_exec_path()]
        for path in candidates:
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return
        found = [p for p in candidates if os.path.exists(p)]
        if found:
            raise PermissionError(errno.EACCES, "qmail-queue program is not an executable file",
                                  found[0])
        raise FileNotFoundError(errno.ENOENT, "qmail-queue program not found"
                                + ("" if os.path.dirname(prog) else " on PATH"), prog)

    async def _deliver(self, env: Envelope, spool, facts=None) -> DeliveryResult:
        loop = asyncio.get_running_loop()
        # the client's QMAILQUEUE (tcp.smtp) replaces the program, as in qmail
        argv = [env.qmailqueue] if env.qmailqueue else self.argv
        rfd, wfd = os.pipe()   # envelope pipe: the child's fd 1 is rfd
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.PIPE, stdout=rfd)
        except OSError as exc:
            os.close(wfd)
            return DeliveryResult(False, reply("queue_temp", text="unable to exec qq"),
                                  None, f"qmail-queue spawn {argv[0]}: {os_error_text(exc)}")
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
                    for chunk in read_chunks(spool):
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
            _drop_envelope(transport)
            return DeliveryResult(False, reply("queue_temp", text="qq timeout"), None,
                                  f"qmail-queue pid={proc.pid} timeout after {self.timeout}s")
        except asyncio.CancelledError:
            # The client is gone and never saw 250: stop qmail-queue if it
            # has not committed yet (its commit is atomic; a queued copy is a
            # duplicate on retry, never a loss). asyncio reaps the child.
            if proc.returncode is None:
                proc.kill()
            _drop_envelope(transport)
            raise
        detail = f"qmail-queue pid={proc.pid} exit={status}" + (
            f" prog={env.qmailqueue}" if env.qmailqueue else "")
        if status == 0:
            if write_error is None and env_error is None:
                return queued(proc.pid, detail)
            # qmail.c: exit 0 with a write error is "qq read error"
            return DeliveryResult(False, reply("queue_temp", text="qq read error"), None,
                                  f"{detail} write error {os_error_text(write_error or env_error)}")
        return DeliveryResult(False, qq_reply(status), None, detail)
