"""Test certificates made with `cryptography`: never checked in.

make_pair(dir, host, kind) writes a self-signed leaf for `host` (DNS and, for
an address, IP SAN) with an ECDSA P-256 or RSA-2048 key and returns its
paths; `expired=True` makes one whose validity ended yesterday.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Pair:
    cert: str
    key: str


def new_key(kind: str):
    if kind == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(kind)


def make_pair(directory, host: str, kind: str = "ecdsa", *, expired: bool = False) -> Pair:
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    key = new_key(kind)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = (now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)) if expired \
        else (now - datetime.timedelta(days=1), now + datetime.timedelta(days=30))
    try:
        san = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .sign(key, hashes.SHA256()))
    stem = os.path.join(directory, f"{host}-{kind}{'-expired' if expired else ''}")
    with open(stem + ".crt", "wb") as fh:
        fh.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(stem + ".key", "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    os.chmod(stem + ".key", 0o600)
    return Pair(stem + ".crt", stem + ".key")
