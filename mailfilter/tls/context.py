"""The server's SSLContext from the operator's certificates, and the
TLSSettings `mailfilter serve` runs with.

Job: `server_context(pairs)` checks each certificate/key pair with
`cryptography` first, so that every error names the file at fault (what
OpenSSL's load_cert_chain says, "[SSL] PEM lib" or "key values mismatch",
names neither), then loads them all into one PROTOCOL_TLS_SERVER context.
`load_settings(opts)` turns serve's options into TLSSettings: NO_TLS with
--no-tls, the operator's pairs with --tls-cert/--tls-key, else the embedded
self-signed certificate (tls/selfsigned.py). It logs what it serves.

Several pairs are served side by side: OpenSSL keeps one certificate per
key type (RSA, EC, Ed25519) in a context, and picks per handshake the one
the client can verify, from its signature_algorithms (RFC 8446 §4.2.3) and,
in TLS 1.2, the cipher suite's authentication (ECDHE-ECDSA-* or
ECDHE-RSA-*). A second pair of the same key type would silently replace the
first, so it is an error.

The context (Mozilla "intermediate" server-side TLS, version 5):
  - TLS 1.2 or 1.3 only (--tls-min-version raises the floor to 1.3);
  - TLS 1.2 suites: ECDHE with AES-GCM or ChaCha20-Poly1305 (forward
    secrecy, AEAD only; no DHE: no DH parameters to manage); TLS 1.3 suites
    are OpenSSL's defaults (all AEAD);
  - the server's order of suites wins (the list is strongest first), no
    TLS compression (CRIME), no renegotiation (a client-initiated one costs
    the server a handshake for nothing);
  - session resumption on: OpenSSL's server-side session cache and
    session tickets (RFC 5077, RFC 8446 §4.6.1) are on by default and kept;
    an SMTP client that opens one connection per message saves the full
    handshake;
  - no ALPN: SMTP does not negotiate an application protocol;
  - no client certificates are asked for.

Invariants: a context is built whole or not at all (TLSConfigError), so a
SIGHUP that finds a bad new pair keeps serving the old context; an expired
or not yet valid certificate is an error unless the operator allows it
(then a warning).
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import ssl

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from mailfilter.tls import NO_TLS, TLSSettings
from mailfilter.tls import selfsigned

logger = logging.getLogger("mailfilter")

MIN_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}

# Mozilla intermediate's TLS 1.2 suites without the DHE ones, in its order
TLS12_CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    # OpenSSL security level 2: no RSA key or DH group under 2048 bits, no
    # SHA-1 signatures (Mozilla intermediate: RSA keys of 2048 bits or more)
    "@SECLEVEL=2",
))

EMBEDDED = "embedded certificate"
MIN_RSA_BITS = 2048         # security level 2 (TLS12_CIPHERS)


class TLSConfigError(Exception):
    """A certificate or key that cannot be served. str(): "FILE: why";
    `option` is the operator's word for the file (--tls-cert, --tls-key,
    "embedded certificate")."""

    def __init__(self, option: str, path: str, why: str):
        super().__init__(f"{path}: {why}")
        self.option = option
        self.path = path
        self.why = why


@dataclasses.dataclass(frozen=True)
class CertInfo:
    """One served certificate, for the start-up log."""
    cert_path: str
    key_path: str
    subject: str
    key_type: str               # "ECDSA P-256", "RSA-2048", "Ed25519"
    slot: str                   # OpenSSL's one-per-type slot: "EC", "RSA", "Ed25519", "Ed448"
    not_before: datetime.datetime
    not_after: datetime.datetime
    fingerprint: str

    def describe(self) -> str:
        return (f"{self.cert_path}: {self.subject}, {self.key_type}, "
                f"valid until {self.not_after:%Y-%m-%d %H:%M} UTC, SHA-256 {self.fingerprint}")


@dataclasses.dataclass(frozen=True)
class Loaded:
    context: ssl.SSLContext
    certs: tuple[CertInfo, ...]
    warnings: tuple[str, ...]   # an expired certificate the operator allowed


# ------------------------------------------------------------------ reading the files
_SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def _public(key) -> bytes:
    return key.public_bytes(*_SPKI)


def _read(option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise TLSConfigError(option, path, f"cannot read it: {exc.strerror or exc}") from None


def _certificates(path: str, data: bytes, option: str = "--tls-cert") -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        why = "not a PEM certificate"
        if b"PRIVATE KEY-----" in data:
            why += " (it holds a private key: --tls-cert and --tls-key swapped?)"
        raise TLSConfigError(option, path, why)
    return certs


def _private_key(path: str, data: bytes):
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:       # cryptography: "Password was not given but private key is encrypted"
        raise TLSConfigError("--tls-key", path, "the private key is encrypted: the server "
                             "starts unattended, give it unencrypted (mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        why = "not a PEM private key"
        if b"-----BEGIN CERTIFICATE-----" in data:
            why += " (it holds a certificate: --tls-cert and --tls-key swapped?)"
        raise TLSConfigError("--tls-key", path, why) from None
    return key


def _key_type(key) -> tuple[str, str]:
    """(description, OpenSSL slot) of a public or private key."""
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return f"RSA-{key.key_size}", "RSA"
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        names = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
        return f"ECDSA {names.get(key.curve.name, key.curve.name)}", "EC"
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return "Ed25519", "Ed25519"
    if isinstance(key, (ed448.Ed448PrivateKey, ed448.Ed448PublicKey)):
        return "Ed448", "Ed448"
    return type(key).__name__, ""


def _subject(cert: x509.Certificate) -> str:
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        alt = ", ".join(str(n.value) for n in names
                        if isinstance(n, (x509.DNSName, x509.IPAddress)))
    except x509.ExtensionNotFound:
        alt = ""
    text = cert.subject.rfc4514_string() or "no subject"
    return f"{text} (DNS {alt})" if alt else text


def _pair(cert_path: str, key_path: str):
    """(certificates in the file, private key) of one pair, each parsed."""
    certs = _certificates(cert_path, _read("--tls-cert", cert_path))
    key = _private_key(key_path, _read("--tls-key", key_path))
    return certs, key


def _check_match(pairs, parsed) -> None:
    """Each key belongs to the first certificate of its file; else say
    which file is wrong as precisely as the files allow."""
    for i, ((cert_path, key_path), (certs, key)) in enumerate(zip(pairs, parsed)):
        mine = _public(key.public_key())
        if _public(certs[0].public_key()) == mine:
            continue
        for n, other in enumerate(certs[1:], start=2):
            if _public(other.public_key()) == mine:
                raise TLSConfigError("--tls-cert", cert_path,
                                     f"the certificate of {key_path} is number {n} in this file: "
                                     "the server's own certificate comes first, then the chain")
        for j, (other_cert, _) in enumerate(pairs):
            if j != i and _public(parsed[j][0][0].public_key()) == mine:
                raise TLSConfigError("--tls-key", key_path,
                                     f"belongs to {other_cert}, not to {cert_path}: "
                                     "--tls-cert and --tls-key pair in the order given")
        raise TLSConfigError("--tls-key", key_path, f"does not match the certificate in {cert_path}")


def _check_dates(cert_path: str, cert: x509.Certificate, now: datetime.datetime,
                 allow_expired: bool, warnings: list[str]) -> None:
    if now > cert.not_valid_after_utc:
        why = f"the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    elif now < cert.not_valid_before_utc:
        why = f"the certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
    else:
        return
    if not allow_expired:
        raise TLSConfigError("--tls-cert", cert_path, why + " (--tls-allow-expired serves it anyway)")
    warnings.append(f"{cert_path}: {why}; serving it anyway (--tls-allow-expired)")


def check_ca_file(path: str, option: str = "--next-hop-tls-ca") -> None:
    """A CA file to verify others with holds at least one PEM certificate;
    TLSConfigError naming it otherwise."""
    _certificates(path, _read(option, path), option)


# ------------------------------------------------------------------ the context
def new_server_context(min_version: str = "TLSv1.2") -> ssl.SSLContext:
    """A server context with this module's settings and no certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSIONS[min_version]
    ctx.set_ciphers(TLS12_CIPHERS)          # TLS 1.2 and below; 1.3 suites stay OpenSSL's
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)      # OpenSSL >= 1.1.0h
    ctx.options &= ~ssl.OP_NO_TICKET        # tickets on (the default, said out loud)
    ctx.verify_mode = ssl.CERT_NONE         # no client certificates
    return ctx


def server_context(pairs, *, min_version: str = "TLSv1.2", allow_expired: bool = False,
                   now: datetime.datetime | None = None, option: str | None = None) -> Loaded:
    """The context serving every (cert file, key file) in `pairs`;
    TLSConfigError naming the first file at fault. `option` replaces the
    files' option names in errors (the embedded certificate)."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    pairs = [(str(c), str(k)) for c, k in pairs]
    if not pairs:
        raise ValueError("server_context needs at least one certificate and key")
    try:
        parsed = [_pair(c, k) for c, k in pairs]
        _check_match(pairs, parsed)
        warnings: list[str] = []
        infos: list[CertInfo] = []
        taken: dict[str, str] = {}
        for (cert_path, key_path), (certs, key) in zip(pairs, parsed):
            leaf = certs[0]
            _check_dates(cert_path, leaf, now, allow_expired, warnings)
            key_type, slot = _key_type(key)
            if slot == "RSA" and key.key_size < MIN_RSA_BITS:   # OpenSSL would say EE_KEY_TOO_SMALL
                raise TLSConfigError("--tls-key", key_path, f"an {key_type} key is too small: "
                                     f"{MIN_RSA_BITS} bits or more")
            if slot in taken:
                raise TLSConfigError("--tls-cert", cert_path,
                                     f"a second {slot} certificate ({taken[slot]} is one): the "
                                     "server holds one certificate per key type (one ECDSA, "
                                     "one RSA), the client's signature algorithms choose")
            taken[slot] = cert_path
            infos.append(CertInfo(cert_path, key_path, _subject(leaf), key_type, slot,
                                  leaf.not_valid_before_utc, leaf.not_valid_after_utc,
                                  leaf.fingerprint(hashes.SHA256()).hex(":").upper()))
        ctx = new_server_context(min_version)
        for cert_path, key_path in pairs:
            try:
                ctx.load_cert_chain(cert_path, key_path)
            except ssl.SSLError as exc:     # e.g. a key too small for OpenSSL's security level
                raise TLSConfigError("--tls-cert", cert_path,
                                     f"OpenSSL refused it: {exc.reason or exc}") from None
            except OSError as exc:          # replaced or removed since it was read
                raise TLSConfigError("--tls-cert", cert_path,
                                     f"cannot read it: {exc.strerror or exc}") from None
    except TLSConfigError as exc:
        if option is not None:
            raise TLSConfigError(option, exc.path, exc.why) from None
        raise
    return Loaded(ctx, tuple(infos), tuple(warnings))


# ------------------------------------------------------------------ serve's options
def load_settings(opts, hostname: str = "localhost",
                  directory: str = selfsigned.DEFAULT_DIR) -> TLSSettings:
    """TLSSettings from serve's options (ServeOptions): NO_TLS with
    --no-tls; else a context from --tls-cert/--tls-key, or from the
    embedded certificate for `hostname` (made under `directory` if need
    be). Logs the certificates served; TLSConfigError on a bad one."""
    if opts.no_tls:
        return NO_TLS
    if opts.tls_cert:
        loaded = server_context(zip(opts.tls_cert, opts.tls_key or []),
                                min_version=opts.tls_min_version,
                                allow_expired=opts.tls_allow_expired)
        for info in loaded.certs:
            logger.info("TLS certificate %s", info.describe())
        for warning in loaded.warnings:
            logger.warning("TLS certificate %s", warning)
    else:
        try:
            embedded = selfsigned.ensure(hostname, directory)
        except OSError as exc:
            where = exc.filename or directory
            raise TLSConfigError(EMBEDDED, where, exc.strerror or str(exc)) from None
        # ensure() made it valid for now: no date to allow
        loaded = server_context([(embedded.cert, embedded.key)], min_version=opts.tls_min_version,
                                option=EMBEDDED)
        how = f"made a self-signed certificate ({embedded.made})" if embedded.made else \
            "using the self-signed certificate"
        logger.info("TLS: %s for %s: %s", how, embedded.host, loaded.certs[0].describe())
    return TLSSettings(context=loaded.context, required=opts.require_tls,
                       plaintext_auth=opts.auth_plaintext,
                       handshake_timeout=opts.tls_handshake_timeout)
