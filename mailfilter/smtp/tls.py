"""TLS on one server connection: an SSLObject between two MemoryBIOs.

Job: turn the ciphertext a transport delivers into plaintext for the SMTP
engine and the engine's replies into ciphertext for the transport, for
STARTTLS (RFC 3207) and implicit TLS (RFC 8314). smtp/protocol.py owns the
transport, the timers and the decision of when TLS starts; this module only
does the record layer, without I/O of its own.

Why not loop.start_tls: asyncio's and uvloop's SSLProtocol keep a 256 KiB
read buffer per connection for as long as it lives, which alone is ten times
the idle budget of a held TLS session; here plaintext is read in pieces of
READ_CHUNK and nothing is kept between reads (the ssl module sets OpenSSL's
SSL_MODE_RELEASE_BUFFERS, so an idle connection holds no record buffers
either).

Invariants:
- ``feed()`` takes every ciphertext byte received and returns the plaintext
  it completed (maybe b""); ``data_to_send()`` returns the ciphertext to
  write (handshake messages, alerts, encrypted replies) and must be called
  after each ``feed()`` / ``send()``;
- the handshake runs inside ``feed()``: ``handshaken`` turns True once, and
  a handshake that fails raises ``TLSFailed`` with a short reason for the
  log (the ssl library's reason code, e.g. "WRONG_VERSION_NUMBER");
- ``eof``: the client closed TLS (close_notify); plaintext before it is
  still returned.
"""
from __future__ import annotations

import ssl

__all__ = ["TLSLayer", "TLSFailed", "READ_CHUNK", "describe"]

READ_CHUNK = 16 * 1024      # one TLS record's worth of plaintext per read() call


class TLSFailed(Exception):
    """The handshake (or the record layer) failed; str() is the reason."""


def _reason(exc: BaseException) -> str:
    """A short, log-safe reason for an ssl error: the library's reason code
    when there is one ("UNSUPPORTED_PROTOCOL", "WRONG_VERSION_NUMBER", ...)."""
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason)
    return type(exc).__name__


def describe(obj: ssl.SSLObject) -> str:
    """`TLSv1.3/TLS_AES_256_GCM_SHA384`: the version and cipher of a session,
    as decision lines and the Received header name them."""
    cipher = obj.cipher()
    return f"{obj.version()}/{cipher[0] if cipher else '?'}"


class TLSLayer:
    """Server side of one TLS session over memory BIOs. See the module docstring."""

    __slots__ = ("_in", "_out", "_obj", "handshaken", "eof", "info")

    def __init__(self, context: ssl.SSLContext) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=True)
        self.handshaken = False
        self.eof = False
        self.info: str | None = None      # describe() once handshaken

    def feed(self, data: bytes) -> bytes:
        """Ciphertext in; the plaintext it completed out."""
        if data:
            self._in.write(data)
        obj = self._obj
        if not self.handshaken:
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            except ssl.SSLError as exc:
                raise TLSFailed(_reason(exc)) from None
            self.handshaken = True
            self.info = describe(obj)
        if not self._in.pending and not obj.pending():
            return b""                      # nothing to decrypt: no read, no exception
        parts = []
        while True:
            try:
                chunk = obj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:      # close_notify: the client ended TLS
                self.eof = True
                break
            except ssl.SSLError as exc:
                raise TLSFailed(_reason(exc)) from None
            if not chunk:
                self.eof = True
                break
            parts.append(chunk)
        return b"".join(parts)

    def send(self, plaintext: bytes) -> None:
        """Queue plaintext for the client (encrypted into data_to_send())."""
        self._obj.write(plaintext)

    def data_to_send(self) -> bytes:
        """Ciphertext waiting for the transport."""
        return self._out.read() if self._out.pending else b""

    def close(self) -> None:
        """Send close_notify (best effort: the connection is ending anyway)."""
        try:
            self._obj.unwrap()
        except (ssl.SSLError, ValueError):
            pass
