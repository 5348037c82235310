"""Spooling: the sink of the hops that hand the message on only after its end
(qmail-queue, smtp, lmtp).

Job: take the message as it streams in, without holding it whole in memory
(a SpooledTemporaryFile: SPOOL_MEMORY bytes in memory, then disk), learn what
the next hop will want to know before the body (SpoolFacts: sizes, 8-bit),
and at commit hand the rewound spool to the hop's `deliver` coroutine.

Invariants: a spool that failed to take a write (ENOSPC, EFBIG rolling over
to disk) is never handed on: the commit is 451 and the next hop never runs;
the spool file is closed (and so removed) once the commit or abort is over.
"""
from __future__ import annotations

import tempfile
from abc import abstractmethod
from dataclasses import dataclass
from typing import Awaitable, Callable

from mailfilter.delivery.base import (
    CHUNK, Delivery, DeliveryResult, Sink, close_quietly, os_error_text, store_failed,
)
from mailfilter.delivery.envelope import Envelope, check_envelope

__all__ = ["SPOOL_MEMORY", "SpoolFacts", "SpoolSink", "SpoolingDelivery", "read_chunks"]

SPOOL_MEMORY = 1 << 20     # SpooledTemporaryFile: bytes kept in memory


@dataclass(frozen=True)
class SpoolFacts:
    """What the spool learnt while the message streamed in (for SIZE=,
    BODY= and SMTPUTF8 downstream): stored bytes, bytes on the wire with
    CRLF line ends, whether any byte is 8-bit, and whether a byte of the
    header block (up to the first empty line) is: an SMTPUTF8 message with
    UTF-8 header fields needs a next hop that offers SMTPUTF8 (RFC 6531
    §3.4, RFC 6532; docs/behaviour/delivery.md#smtputf8)."""
    size: int = 0
    wire_size: int = 0
    eight_bit: bool = False
    header_eight_bit: bool = False


Deliver = Callable[[Envelope, "tempfile.SpooledTemporaryFile", SpoolFacts],
                   Awaitable[DeliveryResult]]


class SpoolSink(Sink):
    """Spools to memory then disk; commit() hands the spool to `deliver`."""
    __slots__ = ("_spool", "_error", "_state", "_deliver", "_env", "size", "_lines", "_eight_bit",
                 "_header", "_header_eight_bit")

    def __init__(self, env: Envelope, deliver: Deliver, max_memory: int,
                 spool_dir: str | None) -> None:
        self._env = env
        self._deliver = deliver
        self._spool = tempfile.SpooledTemporaryFile(max_size=max_memory, dir=spool_dir)
        self._error: BaseException | None = None
        self._state = "open"
        self.size = 0
        self._lines = 0
        self._eight_bit = False
        self._header = b"\n"       # while in the header block: the last byte stored
        self._header_eight_bit = False

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
                if self._header:
                    self._header_eight_bit = not self._header_end(chunk).isascii()
            if self._header:
                self._header = b"" if self._ends_header(chunk) else chunk[-1:]
        except OSError as exc:  # rollover to disk failed: ENOSPC, EFBIG ...
            self._error = exc

    async def commit(self) -> DeliveryResult:
        if self._state != "open":
            raise RuntimeError("commit after commit/abort")
        self._state = "committing"
        try:
            if self._error is not None:
                return store_failed(f"spool {os_error_text(self._error)}")
            try:
                self._spool.seek(0)
            except OSError as exc:
                return store_failed(f"spool {os_error_text(exc)}")
            facts = SpoolFacts(self.size, self.size + self._lines, self._eight_bit,
                               self._header_eight_bit)
            return await self._deliver(self._env, self._spool, facts)
        finally:
            self._state = "done"
            close_quietly(self._spool)

    def _ends_header(self, chunk: bytes) -> bool:
        """The header block ends in `chunk`: the stored text has LF line
        ends, and the block ends at the first empty line (an LF right after
        an LF, maybe the last byte of the chunk before)."""
        return b"\n\n" in chunk or (self._header == b"\n" and chunk[:1] == b"\n")

    def _header_end(self, chunk: bytes) -> bytes:
        """The part of `chunk` that is still header block."""
        if self._header == b"\n" and chunk[:1] == b"\n":
            return b""
        end = chunk.find(b"\n\n")
        return chunk if end < 0 else chunk[:end + 1]

    def abort(self) -> None:
        if self._state == "open":
            self._state = "aborted"
            close_quietly(self._spool)


def read_chunks(spool):
    """Yield the spool in CHUNK pieces (blocking reads of a local file or memory)."""
    while True:
        chunk = spool.read(CHUNK)
        if not chunk:
            return
        yield chunk


class SpoolingDelivery(Delivery):
    """A hop that gets the whole spooled message at commit (`_deliver`).
    Options: `spool_max_memory` (bytes kept in memory), `spool_dir` (where
    a larger message goes; the system's temporary directory by default)."""

    def __init__(self, *, spool_max_memory: int = SPOOL_MEMORY,
                 spool_dir: str | None = None) -> None:
        self.spool_max_memory = spool_max_memory
        self.spool_dir = spool_dir

    def open(self, env: Envelope) -> Sink:
        check_envelope(env)
        return SpoolSink(env, self._deliver, self.spool_max_memory, self.spool_dir)

    @abstractmethod
    async def _deliver(self, env: Envelope, spool, facts: SpoolFacts) -> DeliveryResult: ...
