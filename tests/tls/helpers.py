"""Test helpers for tls/: a tiny TLS server, a real socket on 127.0.0.1
served by a thread with the SSLContext under test. Each connection is
handshaken, answered with one line ("ok") so that a TLS 1.3 client also
reads the session tickets, and closed; what happened is kept per
connection (the negotiated version and cipher, or the error); a client
with the settings a test needs; the key type of the certificate it got."""
from __future__ import annotations

import queue
import socket
import ssl
import threading

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

TIMEOUT = 10.0


class TLSServer:
    def __init__(self, context: ssl.SSLContext):
        self.context = context
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(TIMEOUT)
        self.port = self.sock.getsockname()[1]
        self.results: queue.Queue = queue.Queue()
        self.closing = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.closing:
            try:
                conn, _ = self.sock.accept()
            except OSError:             # closed, or nobody came
                return
            conn.settimeout(TIMEOUT)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self.results.put((tls.version(), tls.cipher()[0]))
                    tls.sendall(b"ok\n")
                    tls.recv(1)         # until the client closes
            except (OSError, ssl.SSLError) as exc:
                self.results.put(exc)
            finally:
                conn.close()

    def result(self):
        """What the next connection's handshake gave: (version, cipher) or the exception."""
        return self.results.get(timeout=TIMEOUT)

    def close(self) -> None:
        self.closing = True
        try:
            # wakes the thread's accept() (a close() alone does not, on Linux)
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(TIMEOUT)


def client_context(*, minimum=None, maximum=None, ciphers=None, cafile=None) -> ssl.SSLContext:
    """A client; without `cafile` it accepts any certificate (as MX-to-MX
    opportunistic TLS does), with it it verifies the chain and host name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cafile is None:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx.load_verify_locations(cafile)
    if ciphers:
        ctx.set_ciphers(ciphers)
    if minimum is not None:
        ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


def connect(port: int, ctx: ssl.SSLContext, server_hostname: str | None = None, session=None):
    """A finished TLS connection (the server's "ok" read), or the handshake's exception."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    try:
        tls = ctx.wrap_socket(raw, server_hostname=server_hostname, session=session)
    except BaseException:
        raw.close()
        raise
    assert tls.recv(16) == b"ok\n"
    return tls


def peer_key_type(tls: ssl.SSLSocket) -> str:
    cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    return type(key).__name__
