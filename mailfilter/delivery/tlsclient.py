"""TLS as the client of an smtp:/lmtp: next hop: the SSLContext, and the
words the log uses for a finished or failed handshake.

Job: `client_context` builds the one SSLContext a forwarding Delivery uses
for every message (built once when the hop is configured: loading a CA
store per message would cost a file read and a parse each time);
`describe` and `failure_text` turn a handshake into log text.

Invariants of the context:
- TLS 1.2 at least, Python's default client cipher list, TLS compression
  off (RFC 9325 §3.1.1 and §3.3: no SSL 3.0/TLS 1.0/1.1; compression
  leaks the plaintext's length, CRIME).
- Without verification (the default: MX-to-MX TLS is opportunistic and
  unauthenticated, RFC 3207 §4.1, RFC 7435 §1.3) the context checks neither
  the chain nor the name: a self-signed or expired certificate still gives
  an encrypted hand-over, which beats a clear one.
- With verification (`verify`, or a CA file, which implies it) the chain
  must lead to the CA file's certificates (or the system store without
  one) and the certificate must name the next hop's HOST as given in the
  spec (RFC 6125; an IP address is matched against the iPAddress
  subjectAltName, never a DNS name).
"""
from __future__ import annotations

import ssl

__all__ = ["client_context", "describe", "failure_text"]


def client_context(*, verify: bool = False, cafile: str | None = None) -> ssl.SSLContext:
    """The client SSLContext of one next hop. `cafile` implies `verify`.
    A CA file that cannot be read or holds no certificate is a ValueError
    naming the file (a configuration error, found when the hop is made)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # Python's default client ciphers
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    if cafile is not None:
        try:
            ctx.load_verify_locations(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ValueError(f"tls_ca {cafile}: cannot load CA certificates: {reason}") from None
        if not ctx.get_ca_certs():
            raise ValueError(f"tls_ca {cafile}: no CA certificate in the file")
    elif verify:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        # order matters: check_hostname must be off before CERT_NONE is allowed
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def describe(ssl_object) -> str:
    """`TLSv1.3/TLS_AES_256_GCM_SHA384`: the protocol version and cipher
    of a finished handshake, as the decision lines write them."""
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()}/{cipher[0] if cipher else '?'}"


def failure_text(exc: BaseException) -> str:
    """Why a handshake failed, for the log line: the verification error
    (`certificate verify failed: Hostname mismatch, ...`), OpenSSL's reason
    (`WRONG_VERSION_NUMBER`), or what happened to the connection."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, TimeoutError):
        return "handshake timed out"
    if isinstance(exc, ConnectionError) or isinstance(exc, OSError) and not exc.errno:
        return "connection closed by next hop during the handshake"
    return f"{type(exc).__name__} {exc}"
