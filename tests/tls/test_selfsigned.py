"""tls/selfsigned.py: the embedded certificate made on first start, reused
on later starts, made again when it cannot serve; files and modes; several
processes starting at once; a real client that trusts it verifies it."""
from __future__ import annotations

import datetime
import hashlib
import ipaddress
import multiprocessing
import os
import ssl
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mailfilter.tls import selfsigned
from mailfilter.tls.context import server_context
from tests.support.certs import mismatched_pair, write_pair
from tests.tls.helpers import client_context, connect, peer_key_type

NOW = datetime.datetime.now(datetime.timezone.utc)


@pytest.fixture
def tls_dir(tmp_path):
    return str(tmp_path / "var" / "tls")


def _cert(directory) -> x509.Certificate:
    with open(os.path.join(directory, "cert.pem"), "rb") as fh:
        return x509.load_pem_x509_certificate(fh.read())


def _names(cert):
    return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_first_start_makes_a_pair_with_safe_modes(tls_dir):
    old = os.umask(0)           # the modes do not depend on the umask
    try:
        made = selfsigned.ensure("mx.test", tls_dir)
    finally:
        os.umask(old)
    assert made.made == "none yet" and made.host == "mx.test"
    assert (made.cert, made.key) == (os.path.join(tls_dir, "cert.pem"), os.path.join(tls_dir, "key.pem"))
    assert _mode(tls_dir) == 0o700
    assert _mode(made.key) == 0o600
    assert _mode(made.cert) == 0o644
    assert sorted(os.listdir(tls_dir)) == [".lock", "cert.pem", "key.pem"]     # no temporary left
    cert = _cert(tls_dir)
    key = cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp256r1"
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "mx.test"
    assert cert.issuer == cert.subject
    assert _names(cert).get_values_for_type(x509.DNSName) == ["mx.test"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.not_valid_before_utc <= NOW <= cert.not_valid_after_utc
    with open(made.cert, "rb") as fh:       # the fingerprint of the file's DER, computed apart
        der = ssl.PEM_cert_to_DER_cert(fh.read().decode())
    digest = hashlib.sha256(der).hexdigest().upper()
    assert made.fingerprint == ":".join(digest[i:i + 2] for i in range(0, 64, 2))


def test_later_starts_reuse_it(tls_dir):
    first = selfsigned.ensure("mx.test", tls_dir)
    with open(first.key, "rb") as fh:
        key = fh.read()
    again = selfsigned.ensure("MX.test.", tls_dir)         # the same name, spelt otherwise
    assert again.made is None
    assert again.fingerprint == first.fingerprint
    with open(first.key, "rb") as fh:
        assert fh.read() == key


def test_another_host_name_makes_a_new_one(tls_dir):
    first = selfsigned.ensure("a.test", tls_dir)
    second = selfsigned.ensure("b.test", tls_dir)
    assert second.made == "the old one was for a.test"
    assert second.fingerprint != first.fingerprint
    assert _names(_cert(tls_dir)).get_values_for_type(x509.DNSName) == ["b.test"]


def _replace(tls_dir, pair):
    os.replace(pair.cert, os.path.join(tls_dir, "cert.pem"))
    os.replace(pair.key, os.path.join(tls_dir, "key.pem"))


@pytest.mark.parametrize("state,why", [
    ("expired", "the old one expired "),
    ("not_yet_valid", "the old one was not valid yet"),
    ("mismatched", "its key did not match"),
    ("garbage", "unreadable"),
    ("key_missing", "none yet"),
])
def test_a_pair_that_cannot_serve_is_made_again(tmp_path, tls_dir, state, why):
    selfsigned.ensure("mx.test", tls_dir)
    if state in ("expired", "not_yet_valid"):
        _replace(tls_dir, write_pair(tmp_path, host="mx.test", **{state: True}))
    elif state == "mismatched":
        _replace(tls_dir, mismatched_pair(tmp_path, host="mx.test"))
    elif state == "garbage":
        with open(os.path.join(tls_dir, "cert.pem"), "w") as fh:
            fh.write("not a certificate\n")
    else:
        os.unlink(os.path.join(tls_dir, "key.pem"))
    before = open(os.path.join(tls_dir, "cert.pem"), "rb").read()
    again = selfsigned.ensure("mx.test", tls_dir)
    assert again.made.startswith(why), again.made
    assert open(again.cert, "rb").read() != before
    server_context([(again.cert, again.key)])           # and it serves


def test_renewed_shortly_before_expiry(tls_dir):
    first = selfsigned.ensure("mx.test", tls_dir)
    expiry = _cert(tls_dir).not_valid_after_utc
    assert selfsigned.ensure("mx.test", tls_dir, now=expiry - selfsigned.RENEW_BEFORE
                             - datetime.timedelta(days=1)).made is None
    late = selfsigned.ensure("mx.test", tls_dir, now=expiry - datetime.timedelta(days=1))
    assert late.made == f"the old one expires {expiry:%Y-%m-%d}"
    assert late.fingerprint != first.fingerprint


@pytest.mark.parametrize("name,san", [
    ("[192.0.2.1]", x509.IPAddress(ipaddress.ip_address("192.0.2.1"))),
    ("[IPv6:2001:db8::1]", x509.IPAddress(ipaddress.ip_address("2001:db8::1"))),
    ("Mail.Example.COM", x509.DNSName("mail.example.com")),
    ("bücher.example", x509.DNSName("xn--bcher-kva.example")),
])
def test_host_name_forms(tls_dir, name, san):
    selfsigned.ensure(name, tls_dir)
    assert list(_names(_cert(tls_dir))) == [san]
    assert selfsigned.ensure(name, tls_dir).made is None


def test_a_name_longer_than_a_common_name_lives_in_the_alt_name(tls_dir):
    """RFC 5280: a CN has at most 64 characters; with no subject, the
    subjectAltName is critical."""
    long = ".".join(["a" * 60, "b" * 60, "example"])
    selfsigned.ensure(long, tls_dir)
    cert = _cert(tls_dir)
    assert len(cert.subject) == 0
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert ext.critical and ext.value.get_values_for_type(x509.DNSName) == [long]


def test_a_client_that_trusts_it_verifies_host_name_and_chain(tls_server, tls_dir):
    made = selfsigned.ensure("mx.test", tls_dir)
    server = tls_server(server_context([(made.cert, made.key)]).context)
    with connect(server.port, client_context(cafile=made.cert), server_hostname="mx.test") as tls:
        assert peer_key_type(tls) == "EC secp256r1"
    server.result()


def _ensure_after(barrier, directory, results):
    barrier.wait()
    e = selfsigned.ensure("mx.test", directory)
    results.put((e.fingerprint, e.made))


def test_processes_starting_together_share_one_pair(tls_dir):
    """--workers N: each worker builds its TLS at start. Under the lock one
    of them makes the pair and the others reuse it."""
    ctx = multiprocessing.get_context("fork")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_ensure_after, args=(barrier, tls_dir, results)) for _ in range(n)]
    for p in procs:
        p.start()
    got = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len({fp for fp, _ in got}) == 1
    assert sorted(str(made) for _, made in got) == ["None"] * (n - 1) + ["none yet"]
    assert got[0][0] == selfsigned.fingerprint(_cert(tls_dir))


def test_an_unwritable_place_is_an_oserror(tmp_path):
    (tmp_path / "var").write_text("")
    with pytest.raises(NotADirectoryError):
        selfsigned.ensure("mx.test", str(tmp_path / "var" / "tls"))
