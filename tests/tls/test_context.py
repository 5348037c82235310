"""tls/context.py: the server's SSLContext, checked with real handshakes on
127.0.0.1 (Python's ssl client and `openssl s_client`) against a tiny TLS
server using the context under test; every refused certificate or key is
an error naming its file."""
from __future__ import annotations

import argparse
import datetime
import shutil
import ssl
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from mailfilter.tls import NO_TLS
from mailfilter.tls.context import (
    EMBEDDED, TLSConfigError, check_ca_file, load_settings, new_server_context, server_context,
)
from tests.support.certs import (
    cert_pem, key_pem, make_ca, make_cert, mismatched_pair, write_pair,
)
from tests.tls.helpers import TIMEOUT, client_context, connect, peer_key_type

TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3


@pytest.fixture
def ec_pair(tmp_path):
    return write_pair(tmp_path, kind="ecdsa")


@pytest.fixture
def rsa_pair(tmp_path):
    return write_pair(tmp_path, kind="rsa")


# ------------------------------------------------------------------ ECDSA and RSA side by side
@pytest.mark.parametrize("order", ["ec-first", "rsa-first"])
def test_tls12_cipher_suites_choose_the_certificate(tls_server, ec_pair, rsa_pair, order):
    """Both pairs are served from one context; a TLS 1.2 client that can
    only verify ECDSA (ECDHE-ECDSA-* suites) gets the ECDSA certificate, an
    RSA-only one the RSA certificate, one offering both the ECDSA one (the
    server's order: ECDSA first), whatever order the pairs were given in."""
    pairs = [ec_pair, rsa_pair] if order == "ec-first" else [rsa_pair, ec_pair]
    server = tls_server(server_context(pairs).context)
    for ciphers, expected in (("ECDHE-ECDSA-AES128-GCM-SHA256", "EC secp256r1"),
                              ("ECDHE-RSA-AES256-GCM-SHA384", "RSA 2048"),
                              (None, "EC secp256r1")):
        with connect(server.port, client_context(maximum=TLS12, ciphers=ciphers)) as tls:
            assert tls.version() == "TLSv1.2"
            assert peer_key_type(tls) == expected, ciphers
        assert server.result()[0] == "TLSv1.2"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
@pytest.mark.parametrize("sigalg,key_type,bits", [
    ("ecdsa_secp256r1_sha256", "ECDSA", 256),
    ("rsa_pss_rsae_sha256", "RSA-PSS", 2048),
])
def test_tls13_signature_algorithms_choose_the_certificate(tls_server, ec_pair, rsa_pair,
                                                           sigalg, key_type, bits):
    """In TLS 1.3 the suites say nothing about the certificate: the
    client's signature_algorithms choose (RFC 8446 §4.2.3). `openssl
    s_client -sigalgs` offers one algorithm only."""
    server = tls_server(server_context([ec_pair, rsa_pair]).context)
    out = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{server.port}",
                          "-tls1_3", "-sigalgs", sigalg],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT)
    assert server.result()[0] == "TLSv1.3"
    assert f"Peer signature type: {key_type}\n" in out.stdout, out.stdout
    assert f"Server public key is {bits} bit\n" in out.stdout
    pem = out.stdout[out.stdout.index("-----BEGIN CERTIFICATE-----"):
                     out.stdout.index("-----END CERTIFICATE-----") + 25]
    served = x509.load_pem_x509_certificate(pem.encode())
    expected = ec_pair if bits == 256 else rsa_pair
    assert served == expected.certificate


def test_a_ca_signed_leaf_is_served_with_its_chain(tls_server, tmp_path):
    """The certificate file holds the leaf and then the chain: a client
    that trusts only the root verifies the host name."""
    ca = make_ca(tmp_path / "ca")
    root_only = tmp_path / "root.pem"
    root_only.write_bytes(cert_pem(ca.certificate))
    intermediate = make_ca(tmp_path / "int", name="Test Intermediate")
    # the intermediate re-signed by the root
    signed = make_cert(intermediate.private_key, "Test Intermediate", ca=True,
                       issuer=ca.certificate, issuer_key=ca.private_key)
    intermediate.certificate = signed
    leaf = intermediate.issue(tmp_path / "leaf", kind="rsa", host="mx.test")
    leaf.cert.write_bytes(cert_pem(leaf.certificate) + cert_pem(signed))
    server = tls_server(server_context([leaf]).context)
    with connect(server.port, client_context(cafile=root_only), server_hostname="mx.test") as tls:
        assert peer_key_type(tls) == "RSA 2048"
    server.result()
    with pytest.raises(ssl.SSLCertVerificationError):   # and the host name is checked
        connect(server.port, client_context(cafile=root_only), server_hostname="other.test")
    assert isinstance(server.result(), (ssl.SSLError, OSError))


# ------------------------------------------------------------------ versions and suites
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
@pytest.mark.parametrize("version", ["TLSv1", "TLSv1_1"])
def test_tls10_and_tls11_are_refused(tls_server, ec_pair, version):
    """The client really speaks the old version: a server that allows it
    completes the handshake with the same client; ours refuses it."""
    v = getattr(ssl.TLSVersion, version)
    old_client = client_context(minimum=v, maximum=v, ciphers="DEFAULT:@SECLEVEL=0")
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    permissive.minimum_version = ssl.TLSVersion.TLSv1
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    permissive.load_cert_chain(ec_pair.cert, ec_pair.key)
    control = tls_server(permissive)
    with connect(control.port, old_client) as tls:
        assert tls.version() == version.replace("_", ".")
    control.result()
    ours = tls_server(server_context([ec_pair]).context)
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        connect(ours.port, old_client)
    err = ours.result()
    assert isinstance(err, ssl.SSLError) and err.reason == "UNSUPPORTED_PROTOCOL"


def test_min_version_tls13_refuses_a_tls12_only_client(tls_server, ec_pair):
    tls12_only = client_context(maximum=TLS12)
    default = tls_server(server_context([ec_pair]).context)
    with connect(default.port, tls12_only) as tls:       # the floor is 1.2 by default
        assert tls.version() == "TLSv1.2"
    default.result()
    strict = tls_server(server_context([ec_pair], min_version="TLSv1.3").context)
    with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
        connect(strict.port, tls12_only)
    assert strict.result().reason == "UNSUPPORTED_PROTOCOL"
    with connect(strict.port, client_context()) as tls:
        assert tls.version() == "TLSv1.3"
    strict.result()


def test_tls12_suites_are_ecdhe_aead_in_the_servers_order(tls_server, ec_pair):
    """Mozilla intermediate: ECDHE with AES-GCM or ChaCha20 only, the
    server's order wins; TLS 1.3 suites are OpenSSL's."""
    ctx = server_context([ec_pair]).context
    suites = {c["name"]: c for c in ctx.get_ciphers()}
    tls12 = [n for n, c in suites.items() if c["protocol"] == "TLSv1.2"]
    assert tls12 and all(n.startswith("ECDHE-") and ("GCM" in n or "CHACHA20" in n) for n in tls12)
    assert {"TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256",
            "TLS_AES_128_GCM_SHA256"} <= set(suites)
    assert ctx.options & ssl.OP_CIPHER_SERVER_PREFERENCE
    assert ctx.options & ssl.OP_NO_COMPRESSION
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert not ctx.options & ssl.OP_NO_TICKET
    server = tls_server(ctx)
    # the client prefers ChaCha20; the server's first choice is AES-128-GCM
    prefers_chacha = client_context(
        maximum=TLS12, ciphers="ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256")
    with connect(server.port, prefers_chacha) as tls:
        assert tls.cipher()[0] == "ECDHE-ECDSA-AES128-GCM-SHA256"
    server.result()
    cbc_only = client_context(maximum=TLS12, ciphers="ECDHE-ECDSA-AES128-SHA256")
    with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE"):
        connect(server.port, cbc_only)
    assert server.result().reason == "NO_SHARED_CIPHER"


@pytest.mark.parametrize("maximum", [TLS12, TLS13], ids=["TLSv1.2", "TLSv1.3"])
def test_sessions_are_resumed(tls_server, ec_pair, maximum):
    """A client reconnecting with its session skips the full handshake
    (TLS 1.2: session cache or ticket; TLS 1.3: ticket)."""
    server = tls_server(server_context([ec_pair]).context)
    client = client_context(maximum=maximum)
    with connect(server.port, client) as first:
        session = first.session         # TLS 1.3: the ticket came with the "ok" line
        assert not first.session_reused
    server.result()
    with connect(server.port, client, session=session) as second:
        assert second.session_reused
    server.result()


def test_no_alpn_is_selected(tls_server, ec_pair):
    server = tls_server(server_context([ec_pair]).context)
    client = client_context()
    client.set_alpn_protocols(["smtp", "h2"])
    with connect(server.port, client) as tls:
        assert tls.selected_alpn_protocol() is None
    server.result()


def test_new_server_context_min_versions():
    assert new_server_context().minimum_version == TLS12
    assert new_server_context("TLSv1.3").minimum_version == TLS13
    with pytest.raises(KeyError):
        new_server_context("TLSv1.1")


# ------------------------------------------------------------------ each error names its file
def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _case_missing_cert(tmp, pair):
    return [(tmp / "missing.crt", pair.key)], "--tls-cert", tmp / "missing.crt", "cannot read it: No such file"


def _case_cert_is_a_directory(tmp, pair):
    (tmp / "dir.crt").mkdir()
    return [(tmp / "dir.crt", pair.key)], "--tls-cert", tmp / "dir.crt", "cannot read it: Is a directory"


def _case_missing_key(tmp, pair):
    return [(pair.cert, tmp / "missing.key")], "--tls-key", tmp / "missing.key", "cannot read it: No such file"


def _case_cert_not_pem(tmp, pair):
    bad = _write(tmp / "junk.crt", b"hello\n")
    return [(bad, pair.key)], "--tls-cert", bad, "not a PEM certificate"


def _case_cert_holds_a_key(tmp, pair):
    return ([(pair.key, pair.key)], "--tls-cert", pair.key,
            "not a PEM certificate (it holds a private key: --tls-cert and --tls-key swapped?)")


def _case_key_holds_a_cert(tmp, pair):
    return [(pair.cert, pair.cert)], "--tls-key", pair.cert, "not a PEM private key (it holds a certificate"


def _case_key_not_pem(tmp, pair):
    bad = _write(tmp / "junk.key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    return [(pair.cert, bad)], "--tls-key", bad, "not a PEM private key"


def _case_encrypted_key(tmp, pair):
    locked = _write(tmp / "locked.key", key_pem(pair.private_key, b"secret"))
    return [(pair.cert, locked)], "--tls-key", locked, "the private key is encrypted"


def _case_mismatched(tmp, pair):
    bad = mismatched_pair(tmp)
    return [bad], "--tls-key", bad.key, f"does not match the certificate in {bad.cert}"


def _case_pairs_swapped(tmp, pair):
    other = write_pair(tmp, kind="rsa")
    return ([(pair.cert, other.key), (other.cert, pair.key)], "--tls-key", other.key,
            f"belongs to {other.cert}, not to {pair.cert}: --tls-cert and --tls-key pair in the order")


def _case_chain_out_of_order(tmp, pair):
    ca = make_ca(tmp / "ca")
    leaf = ca.issue(tmp, name="leaf")
    _write(leaf.cert, cert_pem(ca.certificate) + cert_pem(leaf.certificate))
    return [leaf], "--tls-cert", leaf.cert, f"the certificate of {leaf.key} is number 2 in this file"


def _case_expired(tmp, pair):
    old = write_pair(tmp, name="old", expired=True)
    return [old], "--tls-cert", old.cert, "the certificate expired on "


def _case_not_yet_valid(tmp, pair):
    new = write_pair(tmp, name="new", not_yet_valid=True)
    return [new], "--tls-cert", new.cert, "the certificate is not valid before "


def _case_two_ecdsa(tmp, pair):
    second = write_pair(tmp, name="second")
    return ([pair, second], "--tls-cert", second.cert,
            f"a second EC certificate ({pair.cert} is one)")


def _case_rsa_too_small(tmp, pair):
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    cert = _write(tmp / "small.crt", cert_pem(make_cert(key)))
    small = _write(tmp / "small.key", key_pem(key))
    return [(cert, small)], "--tls-key", small, "an RSA-1024 key is too small: 2048 bits or more"


ERROR_CASES = {name[6:]: f for name, f in dict(globals()).items() if name.startswith("_case_")}


@pytest.mark.parametrize("case", ERROR_CASES)
def test_each_error_names_its_file(tmp_path, ec_pair, case):
    pairs, option, path, why = ERROR_CASES[case](tmp_path, ec_pair)
    with pytest.raises(TLSConfigError) as err:
        server_context(pairs)
    assert (err.value.option, err.value.path) == (option, str(path))
    assert str(err.value).startswith(f"{path}: {why}"), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["expired", "not_yet_valid"])
def test_allow_expired_serves_it_with_a_warning(tls_server, tmp_path, kind):
    pair = write_pair(tmp_path, **{kind: True})
    loaded = server_context([pair], allow_expired=True)
    [warning] = loaded.warnings
    assert warning.startswith(f"{pair.cert}: the certificate ") and "--tls-allow-expired" in warning
    server = tls_server(loaded.context)
    with connect(server.port, client_context()) as tls:
        assert x509.load_der_x509_certificate(tls.getpeercert(True)) == pair.certificate
    server.result()


def test_dates_are_checked_at_the_given_time(tmp_path, ec_pair):
    """`now` is the moment of the check (a reload a year later finds the
    same file expired)."""
    later = ec_pair.certificate.not_valid_after_utc + datetime.timedelta(seconds=1)
    with pytest.raises(TLSConfigError, match="expired"):
        server_context([ec_pair], now=later)
    [info] = server_context([ec_pair]).certs
    assert (info.key_type, info.slot) == ("ECDSA P-256", "EC")
    assert info.fingerprint == ec_pair.fingerprint
    assert info.describe().startswith(f"{ec_pair.cert}: CN=mx.test (DNS mx.test), ECDSA P-256, "
                                      "valid until ")


def test_check_ca_file(tmp_path):
    ca = make_ca(tmp_path)
    check_ca_file(str(ca.cert))
    with pytest.raises(TLSConfigError) as err:
        check_ca_file(str(tmp_path / "none.pem"))
    assert (err.value.option, str(err.value)) == (
        "--next-hop-tls-ca", f"{tmp_path / 'none.pem'}: cannot read it: No such file or directory")
    with pytest.raises(TLSConfigError, match=f"^{ca.key}: not a PEM certificate"):
        check_ca_file(str(ca.key))


# ------------------------------------------------------------------ load_settings
def _opts(**kw):
    base = dict(no_tls=False, tls_cert=None, tls_key=None, tls_min_version="TLSv1.2",
                tls_allow_expired=False, require_tls=False, auth_plaintext=False,
                tls_handshake_timeout=30.0)
    return argparse.Namespace(**dict(base, **kw))


def test_load_settings_no_tls(tmp_path):
    assert load_settings(_opts(no_tls=True), "mx.test", str(tmp_path / "tls")) is NO_TLS
    assert not (tmp_path / "tls").exists()          # no embedded certificate made either


def test_load_settings_from_the_pairs(tls_server, tmp_path, ec_pair, rsa_pair, caplog):
    caplog.set_level("INFO", logger="mailfilter")
    settings = load_settings(_opts(tls_cert=[str(ec_pair.cert), str(rsa_pair.cert)],
                                   tls_key=[str(ec_pair.key), str(rsa_pair.key)],
                                   tls_min_version="TLSv1.3", require_tls=True,
                                   auth_plaintext=True, tls_handshake_timeout=7.5),
                             "ignored.test", str(tmp_path / "tls"))
    assert settings.available
    assert (settings.required, settings.plaintext_auth, settings.handshake_timeout) == (True, True, 7.5)
    assert settings.context.minimum_version == TLS13
    assert not (tmp_path / "tls").exists()
    logged = [r.getMessage() for r in caplog.records]
    assert f"TLS certificate {ec_pair.cert}: CN=mx.test (DNS mx.test), ECDSA P-256, " \
           f"valid until {ec_pair.certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, " \
           f"SHA-256 {ec_pair.fingerprint}" in logged
    assert any(m.startswith(f"TLS certificate {rsa_pair.cert}: CN=mx.test (DNS mx.test), RSA-2048, ")
               for m in logged)
    server = tls_server(settings.context)
    with connect(server.port, client_context(maximum=TLS13, ciphers=None)) as tls:
        assert tls.version() == "TLSv1.3"
    server.result()


def test_load_settings_warns_about_an_allowed_expired_certificate(tmp_path, caplog):
    old = write_pair(tmp_path, expired=True)
    opts = _opts(tls_cert=[str(old.cert)], tls_key=[str(old.key)])
    with pytest.raises(TLSConfigError, match="expired"):
        load_settings(opts)
    opts.tls_allow_expired = True
    assert load_settings(opts).available
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warning.getMessage().startswith(f"TLS certificate {old.cert}: the certificate expired on ")


def test_load_settings_embedded_certificate(tls_server, tmp_path, caplog):
    """Without --tls-cert: the embedded certificate for the host name,
    verifiable by a client that trusts it, logged in one line."""
    caplog.set_level("INFO", logger="mailfilter")
    directory = tmp_path / "var" / "tls"
    settings = load_settings(_opts(), "mx.test", str(directory))
    [line] = [r.getMessage() for r in caplog.records]
    cert = x509.load_pem_x509_certificate((directory / "cert.pem").read_bytes())
    from cryptography.hazmat.primitives import hashes
    fingerprint = cert.fingerprint(hashes.SHA256()).hex(":").upper()
    assert line.startswith(f"TLS: made a self-signed certificate (none yet) for mx.test: "
                           f"{directory / 'cert.pem'}: CN=mx.test (DNS mx.test), ECDSA P-256, ")
    assert line.endswith(f"SHA-256 {fingerprint}")
    server = tls_server(settings.context)
    trusting = client_context(cafile=directory / "cert.pem")
    with connect(server.port, trusting, server_hostname="mx.test") as tls:
        assert peer_key_type(tls) == "EC secp256r1"
    server.result()
    caplog.clear()
    load_settings(_opts(), "mx.test", str(directory))
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"TLS: using the self-signed certificate for mx.test: {directory / 'cert.pem'}: ")
    assert line.endswith(f"SHA-256 {fingerprint}")


def test_load_settings_embedded_certificate_cannot_be_made(tmp_path):
    (tmp_path / "var").write_text("a file, not a directory\n")
    with pytest.raises(TLSConfigError) as err:
        load_settings(_opts(), "mx.test", str(tmp_path / "var" / "tls"))
    assert err.value.option == EMBEDDED
    assert str(err.value) == f"{tmp_path / 'var' / 'tls'}: Not a directory"
