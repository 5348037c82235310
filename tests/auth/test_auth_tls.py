"""AUTH and TLS (RFC 4954 §4, docs/behaviour/auth.md): with TLS available,
PLAIN and LOGIN are offered and accepted only inside TLS (538 before it);
CRAM-MD5 stays available in clear; --auth-plaintext restores PLAIN/LOGIN in
clear; on an implicit-TLS listener everything is offered at once; without a
certificate (no TLS to be had) PLAIN/LOGIN stay in clear as before.

Real server (tests/support/server_harness.py) on both loops, real user
database, smtplib and swaks as clients.
"""
from __future__ import annotations

import base64
import shutil
import smtplib
import ssl
import subprocess

import pytest

from mailfilter.auth.session import AuthConfig, AuthService
from mailfilter.auth.verify import DBVerifier
from mailfilter.tls import TLSSettings
from tests.support.auth_helpers import USERS, make_userdb
from tests.support.certs import make_pair
from tests.support.server_harness import LOOPS, TIMEOUT, RawClient, first, read_new, start_server, write_rules

CRAM_ONLY_OFF = '127.0.0.1:allow,SMTPAUTH="+cram"\n:allow,SMTPAUTH="+cram"\n'


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("tls"), "mx.test", "ecdsa")


@pytest.fixture(scope="module")
def userdb(tmp_path_factory):
    return make_userdb(tmp_path_factory.mktemp("db") / "users.db")


def client_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.fixture(params=LOOPS)
def start(request, tmp_path, cert, userdb):
    servers = []

    def _start(tls=True, plaintext_auth=False):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert.cert, cert.key)
        settings = TLSSettings(ctx, plaintext_auth=plaintext_auth) if tls else TLSSettings()
        rules = write_rules(tmp_path / "rules", {"tcp.smtp": CRAM_ONLY_OFF})
        auth = AuthService(AuthConfig(fail_delay=0.0), verifier=DBVerifier(userdb))
        srv = start_server(request.param, rules, str(tmp_path / "md"), tls=settings, auth=auth,
                           implicit_tls=True)
        servers.append(srv)
        return srv
    yield _start
    for srv in servers:
        srv.stop()
        srv.state.auth.close()


def plain(user: str) -> str:
    return base64.b64encode(f"\0{user}\0{USERS[user]}".encode()).decode()


def auth_line(c: RawClient) -> list[str]:
    code, lines = c.cmd("EHLO client.test")
    assert code == 250
    return [line for line in lines if line.startswith("AUTH")]


def test_plain_refused_in_clear_and_accepted_inside_tls(start):
    srv = start()
    c = RawClient(srv.port)
    c.reply()
    assert auth_line(c) == ["AUTH CRAM-MD5"]            # PLAIN/LOGIN not offered in clear
    assert first(c.cmd(f"AUTH PLAIN {plain('tim')}")) == \
        "538 5.7.11 encryption required for requested authentication mechanism"
    assert first(c.cmd("AUTH LOGIN")).startswith("538 5.7.11")
    c.close()
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=TIMEOUT) as s:
        s.starttls(context=client_context())
        s.ehlo("client.test")
        assert s.esmtp_features["auth"].split() == ["LOGIN", "PLAIN", "CRAM-MD5"]
        assert s.login("tim", USERS["tim"])[0] == 235
        s.sendmail("a@sender.test", ["x@far.test"], b"Subject: relayed\r\n\r\nx\r\n")
    [raw] = read_new(srv.maildir)
    assert b"(tim@127.0.0.1)" in raw and b" with ESMTPSA (TLSv1." in raw


def test_cram_md5_stays_available_in_clear(start):
    srv = start()
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=TIMEOUT) as s:
        s.ehlo("client.test")
        assert s.esmtp_features["auth"].split() == ["CRAM-MD5"]
        assert s.login("alice", USERS["alice"])[0] == 235      # smtplib picks CRAM-MD5


@pytest.mark.parametrize("settings", [dict(plaintext_auth=True), dict(tls=False)],
                         ids=["auth-plaintext", "no-tls"])
def test_plain_in_clear_with_auth_plaintext_or_without_tls(start, settings):
    """--auth-plaintext offers PLAIN/LOGIN in clear; so does a server with no
    TLS to offer (there is no other way to AUTH there)."""
    srv = start(**settings)
    c = RawClient(srv.port)
    c.reply()
    assert auth_line(c) == ["AUTH LOGIN PLAIN CRAM-MD5"]
    assert first(c.cmd(f"AUTH PLAIN {plain('bob')}")).startswith("235")
    c.close()


def test_implicit_tls_offers_everything_at_once(start):
    srv = start()
    with smtplib.SMTP_SSL("127.0.0.1", srv.tls_port, timeout=TIMEOUT, context=client_context()) as s:
        s.ehlo("client.test")
        assert s.esmtp_features["auth"].split() == ["LOGIN", "PLAIN", "CRAM-MD5"]
        s.user, s.password = "tim", USERS["tim"]
        assert s.auth("PLAIN", s.auth_plain)[0] == 235


def test_auth_in_clear_is_forgotten_by_starttls(start):
    """RFC 3207 §4.2: a CRAM-MD5 login made in clear does not survive the
    handshake; the client authenticates again inside TLS."""
    srv = start()
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=TIMEOUT) as s:
        s.ehlo("client.test")
        assert s.login("alice", USERS["alice"])[0] == 235
        s.starttls(context=client_context())
        s.ehlo("client.test")
        code, _ = s.docmd("MAIL FROM:<a@sender.test>")
        assert code == 250
        code, _ = s.docmd("RCPT TO:<x@far.test>")
        assert code == 553                      # not a relay client any more
    assert srv.connections[-1].session.policy.authenticated is None


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed (apt-get install swaks; see .ci/run)")
@pytest.mark.parametrize("flag,mech", [("--tls", "PLAIN"), ("--tls", "LOGIN"), ("--tls", "CRAM-MD5"),
                                       ("--tlsc", "PLAIN")])
def test_swaks_auth_over_tls(start, flag, mech):
    """swaks with STARTTLS (--tls) and on the implicit-TLS port (--tlsc)."""
    srv = start()
    port = srv.tls_port if flag == "--tlsc" else srv.port
    p = subprocess.run(["swaks", "--server", f"127.0.0.1:{port}", flag, "--auth", mech,
                        "--auth-user", "tim", "--auth-password", USERS["tim"], "--to", "x@far.test",
                        "--from", "a@sender.test", "--helo", "client.test", "--timeout", "20"],
                       capture_output=True, timeout=60)
    assert p.returncode == 0, p.stdout.decode()[-2000:]
    [raw] = read_new(srv.maildir)
    assert b" with ESMTPSA (" in raw and b"(tim@127.0.0.1)" in raw
