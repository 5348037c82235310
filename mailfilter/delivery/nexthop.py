"""The connection to an smtp:/lmtp: next hop: replies in, commands and the
body out, and the STARTTLS upgrade in between.

Job: bytes and replies only; the SMTP/LMTP dialogue is forward.py's. The
connection is an asyncio Protocol of its own, not StreamReader/Writer,
because the upgrade must see what is buffered at the moment it starts
(below), which a StreamReader does not tell.

Invariants:
- A reply is read a line at a time; at most LINE_LIMIT bytes wait without a
  line end (a longer "line" is a protocol error), and reading pauses while
  more than that is buffered, so a next hop that floods us while the body
  goes out costs bounded memory.
- Nothing the next hop sent in clear after its 220 to STARTTLS is ever read
  as a reply: `starttls` refuses when a byte is buffered, and a byte that
  arrives later goes into the TLS layer, where it breaks the handshake. A
  reply read after the upgrade was therefore sent inside TLS (RFC 3207
  §4.2: the client discards what it learnt before TLS; bytes injected
  into the cleartext stream behind the 220 are such knowledge).
- Every failure of the transport is NextHopError (-> 451 upstream);
  a failed handshake is its subclass TLSFailed.
"""
from __future__ import annotations

import asyncio
import re
import ssl

from mailfilter.delivery.base import os_error_text
from mailfilter.delivery.tlsclient import describe, failure_text
from mailfilter.smtp.replies import Reply

__all__ = ["LINE_LIMIT", "NextHopError", "TLSFailed", "Connection"]

# The longest reply line we wait for (RFC 5321 §4.5.3.1.5 allows 512
# octets; generous room for servers that overrun it, as StreamReader's
# default limit gave).
LINE_LIMIT = 1 << 16

_ENH = re.compile(rb"^([245]\.\d{1,3}\.\d{1,3}) ")
_PRINTABLE = bytes(b if 32 <= b < 127 else ord("?") for b in range(256))


class NextHopError(Exception):
    """Transport-level failure talking to the next hop (-> 451)."""


class TLSFailed(NextHopError):
    """The STARTTLS upgrade failed: the handshake, or data injected before it."""


class _Wire(asyncio.Protocol):
    """The bytes of one connection: a receive buffer, EOF/loss, write flow
    control. Stays the protocol across the TLS upgrade (loop.start_tls
    feeds it the decrypted bytes)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False                  # EOF or connection lost: no more bytes
        self.lost = loop.create_future()  # set when the connection is gone
        self._reading_paused = False
        self._writing_paused = False
        self._wakeup: asyncio.Future | None = None

    # --- asyncio.Protocol -------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > LINE_LIMIT and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False                      # close the transport: we never half-close

    def connection_lost(self, exc) -> None:
        self.eof = True
        self.gone()
        self._wake()

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake()

    # --- for Connection ---------------------------------------------------
    def gone(self) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def wait(self) -> None:
        """Until the next event (bytes, EOF, loss, writable again). One
        waiter at a time: the dialogue either reads or drains, never both."""
        self._wakeup = self.loop.create_future()
        try:
            await self._wakeup
        finally:
            self._wakeup = None

    async def readline(self) -> bytes:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end + 1])
                del self.buffer[:end + 1]
                if self._reading_paused and len(self.buffer) <= LINE_LIMIT:
                    self._reading_paused = False
                    self.transport.resume_reading()
                return line
            if len(self.buffer) > LINE_LIMIT:
                raise NextHopError(f"reply line longer than {LINE_LIMIT} bytes from next hop")
            if self.eof:
                raise NextHopError("connection closed by next hop")
            await self.wait()

    async def drain(self) -> None:
        while self._writing_paused and not self.eof:
            await self.wait()
        if self.eof:
            raise NextHopError("connection closed by next hop")


class Connection:
    """One connection to the next hop. `reply`, `command` and `send` each
    run under `timeout` (the command timeout); `security` says how the
    bytes travel now: `clear` or `TLSv1.3/TLS_AES_256_GCM_SHA384`."""

    def __init__(self, wire: _Wire, timeout: float) -> None:
        self._wire = wire
        self.timeout = timeout
        self.lines: list[bytes] = []     # the texts of the last reply, one per line
        self.tls = False
        self.security = "clear"

    @classmethod
    async def open(cls, host: str, port: int, *, connect_timeout: float,
                   timeout: float) -> "Connection":
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout):
                _, wire = await loop.create_connection(lambda: _Wire(loop), host, port)
        except OSError as exc:           # TimeoutError included
            raise NextHopError(f"connect: {os_error_text(exc)}") from exc
        return cls(wire, timeout)

    async def reply(self) -> Reply:
        """One (possibly multi-line) reply as a Reply: code, enhanced, text;
        the lines' texts stay in `self.lines` (EHLO keywords)."""
        texts = []
        code = None
        async with asyncio.timeout(self.timeout):
            while True:
                line = (await self._wire.readline()).rstrip(b"\r\n")
                # RFC 5321 §4.2: a reply code is 2xx-5xx; anything else is a
                # protocol error (451), never a permanent rejection.
                if (len(line) < 3 or not line[:3].isdigit() or line[:1] not in b"2345"
                        or line[3:4] not in (b"", b" ", b"-")):
                    raise NextHopError("malformed reply from next hop: "
                                       + line[:40].translate(_PRINTABLE).decode("ascii"))
                if code is not None and int(line[:3]) != code:
                    raise NextHopError("inconsistent multi-line reply from next hop")
                code = int(line[:3])
                texts.append(line[4:])
                if line[3:4] != b"-":
                    break
        self.lines = texts
        text = b" ".join(texts)
        m = _ENH.match(text)
        enhanced = m.group(1).decode() if m else ""
        if m:
            text = text[m.end():]
        return Reply(code, enhanced, text[:300].translate(_PRINTABLE).decode("ascii"))

    def _write(self, data: bytes) -> None:
        if self._wire.eof:
            raise NextHopError("connection closed by next hop")
        self._wire.transport.write(data)

    async def command(self, line: bytes) -> Reply:
        self._write(line)
        return await self.reply()

    async def send(self, data: bytes) -> None:
        self._write(data)
        async with asyncio.timeout(self.timeout):
            await self._wire.drain()

    async def starttls(self, context: ssl.SSLContext, server_hostname: str,
                       handshake_timeout: float) -> None:
        """Upgrade to TLS after the next hop's 220 to STARTTLS (RFC 3207 §4).
        TLSFailed when it sent anything behind the 220 (see the module
        docstring) or the handshake fails; the connection is then closed:
        a failed handshake leaves no usable cleartext stream behind it."""
        wire = self._wire
        if wire.buffer:
            raise TLSFailed("next hop sent data after its 220 to STARTTLS "
                            "(injected into the cleartext stream?)")
        if wire.eof:
            raise TLSFailed("connection closed by next hop before the handshake")
        try:
            # our own deadline (a TimeoutError both loops raise alike); the
            # loop's, later, is only a backstop
            async with asyncio.timeout(handshake_timeout):
                transport = await wire.loop.start_tls(
                    wire.transport, wire, context, server_hostname=server_hostname,
                    ssl_handshake_timeout=handshake_timeout + 5)
        except BaseException as exc:
            wire.eof = True
            wire.gone()          # start_tls closed the transport; we get no connection_lost
            if isinstance(exc, (ssl.SSLError, OSError)):  # verification, resets, TimeoutError
                raise TLSFailed(failure_text(exc)) from exc
            raise
        if transport is None:    # the connection went in the handshake's last moment
            wire.eof = True
            wire.gone()
            raise TLSFailed("connection closed by next hop during the handshake")
        wire.transport = transport
        self.tls = True
        self.security = describe(transport.get_extra_info("ssl_object"))

    async def close(self) -> None:
        """Close and wait (briefly) until the connection is gone; a next hop
        that does not finish the TLS close within 1 s is cut off."""
        wire = self._wire
        if wire.lost.done():
            return
        wire.transport.close()
        try:
            async with asyncio.timeout(1.0):
                await asyncio.shield(wire.lost)
        except TimeoutError:
            wire.transport.abort()
            wire.gone()
