"""Throwaway server certificates for the TLS benches: ECDSA P-256 and RSA-2048.

`make_pair(kind, directory)` writes a self-signed certificate and its key
(PEM, key mode 0600) for the bench host name into `directory` (a temporary
directory of the caller) and returns a CertPair. Generated with the
`cryptography` package at every run: keys are never checked in.

Invariants: the same CertPair (the same files) is handed to every server of
a cell, so mailfilter, Postfix smtpd and aiosmtpd present the same
certificate; `KINDS` lists the key types the benches compare. The clients
do not verify the certificate (opportunistic MX-to-MX TLS is unauthenticated,
RFC 7435 §4), but they do check which key type the server presented
(`peer_key_kind`), so an ECDSA cell cannot silently run on RSA.
"""
from __future__ import annotations

import dataclasses
import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

KINDS = ("ecdsa", "rsa")
HOSTNAME = "bench.mailfilter.test"


@dataclasses.dataclass(frozen=True)
class CertPair:
    kind: str        # "ecdsa" (P-256) or "rsa" (2048 bits)
    cert: str        # PEM certificate path
    key: str         # PEM private key path (PKCS#8, unencrypted)

    @property
    def label(self) -> str:
        return {"ecdsa": "ECDSA P-256", "rsa": "RSA-2048"}[self.kind]


def _private_key(kind: str):
    if kind == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key kind {kind!r} (one of {KINDS})")


def make_pair(kind: str, directory: str, hostname: str = HOSTNAME) -> CertPair:
    """Write `<kind>.crt` and `<kind>.key` into `directory`; return their paths."""
    key = _private_key(kind)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    os.makedirs(directory, exist_ok=True)
    cert_path = os.path.join(directory, f"{kind}.crt")
    key_path = os.path.join(directory, f"{kind}.key")
    with open(cert_path, "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return CertPair(kind, cert_path, key_path)


def peer_key_kind(der: bytes | None) -> str:
    """'ecdsa-p256', 'rsa-2048', ... for a DER certificate (what the server presented)."""
    if not der:
        return "none"
    pub = x509.load_der_x509_certificate(der).public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return {"secp256r1": "ecdsa-p256"}.get(pub.curve.name, f"ecdsa-{pub.curve.name}")
    if isinstance(pub, rsa.RSAPublicKey):
        return f"rsa-{pub.key_size}"
    return type(pub).__name__


def expected_peer_kind(kind: str) -> str:
    return {"ecdsa": "ecdsa-p256", "rsa": "rsa-2048"}[kind]
