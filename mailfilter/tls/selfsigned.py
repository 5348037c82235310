"""The embedded default certificate: a self-signed ECDSA P-256 certificate
for the server's host name, so STARTTLS works out of the box.

Job: `ensure(hostname)` returns a certificate/key pair under `var/tls/`
(cert.pem, key.pem; relative to the working directory, like the other var/
defaults), made on the first start and reused on later ones. It is made
again when it is missing, unreadable, expired (or about to be), not valid
yet, for another host name, or when the key does not belong to it.

MX-to-MX TLS is opportunistic and unauthenticated (RFC 3207 §4.1, RFC 7435):
a sending MTA encrypts with any certificate, so a self-signed one protects
mail against passive eavesdropping without the operator doing anything.
An operator who wants an authenticated certificate gives --tls-cert.

Invariants:
  - the key is never readable by others: key.pem is created 0600 inside a
    directory created 0700, and written under its final name only by an
    atomic rename of a file that had that mode from its first byte;
  - processes starting together (`--workers N` forks N of them, each
    builds its TLS at start) never see half a pair: the check-and-make runs
    under an exclusive lock on var/tls/.lock, and each file is replaced by
    rename, the key before the certificate;
  - nothing here reads the operator's certificates (tls/context.py does).
"""
from __future__ import annotations

import dataclasses
import datetime
import fcntl
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_DIR = os.path.join("var", "tls")
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
LOCK_FILE = ".lock"
# Ten years, as Debian's ssl-cert "snakeoil" certificate: senders that use
# opportunistic TLS do not check validity dates (RFC 7435 §4), and a
# shorter life would only make a long-running server serve an expired one.
VALIDITY = datetime.timedelta(days=3650)
RENEW_BEFORE = datetime.timedelta(days=30)      # made again at a start this close to expiry
BACKDATE = datetime.timedelta(hours=1)          # a client whose clock is a little behind
CN_MAX = 64                                     # RFC 5280 ub-common-name


@dataclasses.dataclass(frozen=True)
class Embedded:
    """The pair to serve, and whether (and why) it was just made."""
    cert: str
    key: str
    host: str
    fingerprint: str            # SHA-256 of the certificate (DER), AB:CD:... as `openssl x509 -fingerprint`
    made: str | None            # why it was made now ("none yet", "expired", ...); None: reused


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def ensure(hostname: str, directory: str = DEFAULT_DIR, *,
           now: datetime.datetime | None = None) -> Embedded:
    """The embedded pair for `hostname` under `directory`, made if needed.
    OSError when the directory or files cannot be made or written."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    host = _normalise(hostname)
    cert_path = os.path.join(directory, CERT_FILE)
    key_path = os.path.join(directory, KEY_FILE)
    _make_dir(directory)
    lock = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        why = _why_not_reusable(cert_path, key_path, host, now)
        if why is None:
            with open(cert_path, "rb") as fh:
                cert = x509.load_pem_x509_certificate(fh.read())
        else:
            key, cert = _make(host, now)
            _write(key_path, key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()), 0o600)
            _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
            _sync_dir(directory)
    finally:
        os.close(lock)          # releases the lock
    return Embedded(cert_path, key_path, host, fingerprint(cert), why)


def _normalise(hostname: str) -> str:
    """The name as a certificate carries it: no address-literal brackets,
    lower case, IDNA A-labels."""
    host = hostname.strip().strip("[]").rstrip(".").lower() or "localhost"
    if host.startswith("ipv6:"):        # RFC 5321 §4.1.3 IPv6 address literal
        host = host[5:]
    if not host.isascii():
        host = host.encode("idna").decode("ascii")
    return host


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _make_dir(directory: str) -> None:
    try:
        os.makedirs(directory, mode=0o700)
    except FileExistsError:
        return
    os.chmod(directory, 0o700)          # makedirs' mode is masked by the umask


def _why_not_reusable(cert_path: str, key_path: str, host: str,
                      now: datetime.datetime) -> str | None:
    """None when the pair on disk can be served for `host` now; else why not."""
    try:
        with open(cert_path, "rb") as fh:
            cert_data = fh.read()
        with open(key_path, "rb") as fh:
            key_data = fh.read()
    except FileNotFoundError:
        return "none yet"
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    try:
        cert = x509.load_pem_x509_certificate(cert_data)
        key = serialization.load_pem_private_key(key_data, password=None)
    except (ValueError, TypeError):
        return "unreadable"
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        return "its key did not match"
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = []
    wanted = _san(host)
    if wanted not in names:
        held = [str(n.value) for n in names] or ["no name"]
        return f"the old one was for {', '.join(held)}"
    if now < cert.not_valid_before_utc:
        return "the old one was not valid yet"
    if now + RENEW_BEFORE >= cert.not_valid_after_utc:
        return f"the old one expire{'d' if now >= cert.not_valid_after_utc else 's'} " \
               f"{cert.not_valid_after_utc:%Y-%m-%d}"
    return None


def _make(host: str, now: datetime.datetime):
    key = ec.generate_private_key(ec.SECP256R1())
    # RFC 5280 limits the CN to 64 characters; the name that matters is
    # the subjectAltName (RFC 6125 §6.4.4)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)] if len(host) <= CN_MAX else [])
    cert = (x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.SubjectAlternativeName([_san(host)]), critical=not len(subject))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def _write(path: str, data: bytes, mode: int) -> None:
    """`data` under `path` by rename: a reader sees the old file or the
    whole new one; the file has `mode` before it holds a byte."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)             # O_CREAT's mode is masked by the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _sync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
