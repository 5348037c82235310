"""Test certificates, made with `cryptography` in the test's tmp dir (no key
is ever checked in): ECDSA P-256 and RSA-2048 leafs, self-signed or signed
by a throwaway CA, expired or not yet valid ones, and pairs whose key does
not belong to their certificate.

    pair = write_pair(tmp_path, kind="ecdsa", host="mx.test")  # Pair(cert=..., key=...)
    ca = make_ca(tmp_path)                                      # a CA for chains and verification
    leaf = ca.issue(tmp_path, kind="rsa", host="mx.test", chain=True)
    ctx.load_cert_chain(leaf.cert, leaf.key)
    client_ctx.load_verify_locations(ca.cert)
    pair = make_pair(tmp_path, "mx.test", "rsa")                # the short form

Every file is PEM; keys are unencrypted PKCS#8 (what the server reads).
"""
from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KINDS = ("ecdsa", "rsa")


def new_key(kind: str = "ecdsa"):
    """A fresh private key: "ecdsa" = ECDSA P-256, "rsa" = RSA-2048."""
    if kind == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")


def key_pem(key, password: bytes | None = None) -> bytes:
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _san(host) -> x509.GeneralName:
    """An IP address SAN for an address, else a DNS name; a GeneralName as is
    (a test that wants an address written as a DNS name says so)."""
    if isinstance(host, x509.GeneralName):
        return host
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_cert(key, host: str = "mx.test", *, issuer_key=None, issuer: x509.Certificate | None = None,
              not_before: datetime.datetime | None = None,
              not_after: datetime.datetime | None = None, ca: bool = False,
              alt_names: tuple = ()) -> x509.Certificate:
    """A certificate for `key`'s public half, subject CN=host (and the host
    plus `alt_names` (DNS names or IP addresses) as subjectAltName unless
    `ca`); self-signed unless issuer/issuer_key."""
    now = _now()
    not_before = not_before or now - datetime.timedelta(hours=1)
    not_after = not_after or now + datetime.timedelta(days=30)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    builder = (x509.CertificateBuilder()
               .subject_name(subject)
               .issuer_name(issuer.subject if issuer is not None else subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(not_before)
               .not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = (builder
                   .add_extension(x509.SubjectAlternativeName([_san(h) for h in (host, *alt_names)]),
                                  critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False))
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                                    critical=False)
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()), critical=False)
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


@dataclasses.dataclass
class Pair:
    """A certificate file and its key file (and the objects they hold)."""
    cert: Path
    key: Path
    certificate: x509.Certificate
    private_key: object
    kind: str

    @property
    def fingerprint(self) -> str:
        return self.certificate.fingerprint(hashes.SHA256()).hex(":").upper()

    def __iter__(self):         # cert, key = pair
        return iter((self.cert, self.key))


def _write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    return path


def write_pair(directory, *, kind: str = "ecdsa", host: str = "mx.test", name: str | None = None,
               expired: bool = False, not_yet_valid: bool = False, issuer: "CA | None" = None,
               chain: bool = False, password: bytes | None = None,
               alt_names: tuple = ()) -> Pair:
    """NAME.crt and NAME.key under `directory` (NAME: kind-host by default).
    expired: valid until yesterday; not_yet_valid: from tomorrow on;
    issuer: signed by that CA (chain: the CA certificate follows the leaf in
    the file); password: the key is encrypted with it."""
    directory = Path(directory)
    name = name or f"{kind}-{host}"
    key = new_key(kind)
    now = _now()
    window = {}
    if expired:
        window = dict(not_before=now - datetime.timedelta(days=30),
                      not_after=now - datetime.timedelta(days=1))
    elif not_yet_valid:
        window = dict(not_before=now + datetime.timedelta(days=1),
                      not_after=now + datetime.timedelta(days=30))
    if issuer is not None:
        cert = make_cert(key, host, issuer=issuer.certificate, issuer_key=issuer.private_key,
                         alt_names=alt_names, **window)
    else:
        cert = make_cert(key, host, alt_names=alt_names, **window)
    pem = cert_pem(cert) + (cert_pem(issuer.certificate) if chain and issuer is not None else b"")
    return Pair(_write(directory / f"{name}.crt", pem, 0o644),
                _write(directory / f"{name}.key", key_pem(key, password)), cert, key, kind)


def mismatched_pair(directory, *, kind: str = "ecdsa", host: str = "mx.test",
                    name: str | None = None) -> Pair:
    """A certificate and a key file that do not belong together (the key is
    another key of the same kind)."""
    pair = write_pair(directory, kind=kind, host=host, name=name or f"mismatched-{kind}")
    other = new_key(kind)
    _write(pair.key, key_pem(other))
    return dataclasses.replace(pair, private_key=other)


@dataclasses.dataclass
class CA:
    """A throwaway certificate authority: `cert` is its PEM file (for
    load_verify_locations or --next-hop-tls-ca)."""
    cert: Path
    key: Path
    certificate: x509.Certificate
    private_key: object

    def issue(self, directory, **kw) -> Pair:
        """A leaf signed by this CA (write_pair's keywords)."""
        return write_pair(directory, issuer=self, **kw)


def make_ca(directory, *, name: str = "Test CA", kind: str = "ecdsa") -> CA:
    directory = Path(directory)
    key = new_key(kind)
    now = _now()
    cert = make_cert(key, name, ca=True, not_after=now + datetime.timedelta(days=365))
    stem = name.lower().replace(" ", "-")
    return CA(_write(directory / f"{stem}.crt", cert_pem(cert), 0o644),
              _write(directory / f"{stem}.key", key_pem(key)), cert, key)


def make_pair(directory, host: str, kind: str = "ecdsa", *, expired: bool = False) -> Pair:
    """A self-signed pair for `host` in HOST-KIND.crt/.key (HOST-KIND-expired
    when `expired`): write_pair's short form."""
    return write_pair(directory, kind=kind, host=host, expired=expired,
                      name=f"{host}-{kind}{'-expired' if expired else ''}")
