"""STARTTLS (RFC 3207) and implicit TLS (RFC 8314) on real sockets, both loops.

The server is the real SMTPProtocol + Session on 127.0.0.1 (tests/support/
server_harness.py) with a certificate made here; the clients are smtplib,
the ssl module over a raw socket (for the byte-exact cases: commands
pipelined after STARTTLS, a broken or stalled handshake), and, when
installed, `openssl s_client -starttls smtp` and swaks.
"""
from __future__ import annotations

import shutil
import smtplib
import socket
import ssl
import subprocess

import pytest

from mailfilter.tls import TLSSettings
from tests.support.certs import make_pair
from tests.support.server_harness import (
    PLAIN, TIMEOUT, RawClient, first, read_new, write_rules,
)

TLS_ONLY = "127.0.0.20"     # UCSPITLS="!": STARTTLS required before MAIL
NO_TLS_CLIENT = "127.0.0.21"  # UCSPITLS="-": no STARTTLS for this client


@pytest.fixture(scope="module")
def cert(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("tls"), "mx.test", "ecdsa")


def server_context(cert, minimum=ssl.TLSVersion.TLSv1_2) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = minimum
    ctx.load_cert_chain(cert.cert, cert.key)
    return ctx


def client_context(**kw) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE     # MX-to-MX TLS is unauthenticated (RFC 7435)
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


@pytest.fixture
def tls_start(start, tmp_path, cert):
    """start() with the test certificate (tls=False: none) and rules with a
    UCSPITLS="!" and a UCSPITLS="-" client."""
    def _start(tls=True, rules=None, handshake_timeout=5.0, **kw):
        rules = rules or write_rules(tmp_path / "tls-rules", {"tcp.smtp": (
            f'{TLS_ONLY}:allow,UCSPITLS="!"\n{NO_TLS_CLIENT}:allow,UCSPITLS="-"\n:allow\n')})
        settings = TLSSettings(server_context(cert), handshake_timeout=handshake_timeout) \
            if tls else TLSSettings()
        return start(rules=rules, tls=settings, **kw)
    return _start


class TLSClient(RawClient):
    """RawClient that can switch its socket to TLS after a 220."""

    def starttls(self, ctx: ssl.SSLContext | None = None) -> None:
        assert self.buf == b"", f"unread bytes before the handshake: {self.buf!r}"
        self.sock = (ctx or client_context()).wrap_socket(self.sock, server_hostname="mx.test")


def ehlo_keywords(c: RawClient, name="client.test") -> list[str]:
    code, lines = c.cmd(f"EHLO {name}")
    assert code == 250
    return [line.split()[0] for line in lines[1:]]


def open_client(port, source=PLAIN) -> TLSClient:
    c = TLSClient(port, source)
    assert c.reply()[0] == 220
    return c


def test_starttls_offered_in_clear_and_gone_inside_tls(tls_start):
    srv = tls_start()
    c = open_client(srv.port)
    assert "STARTTLS" in ehlo_keywords(c)
    assert first(c.cmd("STARTTLS")) == "220 2.0.0 Ready to start TLS"
    c.starttls()
    assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert "STARTTLS" not in ehlo_keywords(c)
    assert first(c.cmd("STARTTLS")) == "503 5.5.1 TLS already active"
    c.close()


def test_smtplib_starttls_delivers_with_esmtps(tls_start, decisions):
    srv = tls_start()
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=TIMEOUT) as s:
        s.ehlo("client.test")
        assert s.has_extn("starttls")
        s.starttls(context=client_context())
        s.ehlo("client.test")
        s.sendmail("a@sender.test", ["user@example.com"], b"Subject: tls\r\n\r\nsecret\r\n")
    [raw] = read_new(srv.maildir)
    received = raw.split(b"\nReceived: ", 1)[1].split(b";", 1)[0]
    assert b" with ESMTPS (TLSv1.3 TLS_" in received or b" with ESMTPS (TLSv1.2 " in received
    lines = [m for m in decisions() if "action=accept stage=DATA" in m]
    assert len(lines) == 1 and " tls=TLSv1." in lines[0]


@pytest.mark.parametrize("after", [b"RSET\r\n", b"MAIL FROM:<a@sender.test>\r\n",
                                   b"NOOP\r\nNOOP\r\nQUIT\r\n"])
def test_commands_pipelined_after_starttls_are_discarded(tls_start, after):
    """RFC 3207 §6 (Postfix CVE-2011-0411, aiosmtpd CVE-2024-34083): what
    follows STARTTLS in the same cleartext write is neither answered in
    clear nor executed inside TLS."""
    srv = tls_start()
    c = open_client(srv.port)
    ehlo_keywords(c)
    c.send(b"STARTTLS\r\n" + after)
    assert first(c.reply()) == "220 2.0.0 Ready to start TLS"
    c.starttls()                    # asserts nothing else came in clear
    # inside TLS nothing arrives unasked: the next reply is the NOOP's
    assert first(c.cmd("NOOP")) == "250 2.0.0 ok"
    # the injected MAIL did not open a transaction: RCPT is out of sequence
    assert first(c.cmd("RCPT TO:<user@example.com>")) == "503 5.5.1 MAIL first"
    assert first(c.cmd("QUIT")).startswith("221")
    c.close()


def test_tls_forgets_what_was_said_in_clear(tls_start):
    srv = tls_start()
    c = open_client(srv.port)
    ehlo_keywords(c, "clear.test")
    assert first(c.cmd("STARTTLS")).startswith("220")
    c.starttls()
    assert first(c.cmd("NOOP")) == "250 2.0.0 ok"      # the server has finished its handshake
    proto = srv.connections[-1]
    assert proto.session.policy.helo_name is None and proto.engine.helo is None
    assert proto.engine.tls and proto.session.tls.startswith("TLSv1.")
    ehlo_keywords(c, "inside.test")
    assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    c.close()


def test_starttls_replies_for_bad_uses(tls_start):
    srv = tls_start()
    c = open_client(srv.port)
    ehlo_keywords(c)
    assert first(c.cmd("STARTTLS now")).startswith("501 5.5.4")
    assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    assert first(c.cmd("STARTTLS")) == "503 5.5.1 no STARTTLS during mail transaction"
    assert first(c.cmd("RSET")).startswith("250")
    assert first(c.cmd("STARTTLS")).startswith("220")      # the session went on
    c.starttls()
    assert first(c.cmd("NOOP")) == "250 2.0.0 ok"
    c.close()


def test_without_a_certificate_starttls_is_454_and_not_offered(tls_start):
    srv = tls_start(tls=False)
    c = open_client(srv.port)
    assert "STARTTLS" not in ehlo_keywords(c)
    assert first(c.cmd("STARTTLS")) == "454 4.7.0 TLS not available due to temporary reason"
    assert first(c.cmd("NOOP")) == "250 2.0.0 ok"
    c.close()


def test_ucspitls_dash_turns_starttls_off_for_a_client(tls_start):
    srv = tls_start()
    c = open_client(srv.port, NO_TLS_CLIENT)
    assert "STARTTLS" not in ehlo_keywords(c)
    assert first(c.cmd("STARTTLS")).startswith("454 4.7.0")
    c.close()


def test_ucspitls_bang_requires_tls_before_mail(tls_start, decisions):
    srv = tls_start()
    c = open_client(srv.port, TLS_ONLY)
    ehlo_keywords(c)
    assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "530 5.7.0 Must issue a STARTTLS command first"
    assert first(c.cmd("STARTTLS")).startswith("220")
    c.starttls()
    ehlo_keywords(c)
    assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    c.close()
    [line] = [m for m in decisions() if "reason=tls_required" in m]
    assert "rule=tcp.smtp:1" in line and "tls=-" in line


def test_require_tls_for_everyone(tls_start):
    srv = tls_start()
    srv.state.swap_tls(TLSSettings(srv.state.tls.context, required=True))
    c = open_client(srv.port)
    ehlo_keywords(c)
    assert first(c.cmd("MAIL FROM:<a@sender.test>")).startswith("530 5.7.0")
    c.close()
    d = open_client(srv.port, NO_TLS_CLIENT)      # UCSPITLS="-" wins: no TLS to be had
    ehlo_keywords(d)
    assert first(d.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    d.close()


def test_implicit_tls_greets_inside_tls(tls_start):
    srv = tls_start(implicit_tls=True)
    with smtplib.SMTP_SSL("127.0.0.1", srv.tls_port, timeout=TIMEOUT, context=client_context()) as s:
        code, _ = s.ehlo("client.test")
        assert code == 250 and not s.has_extn("starttls")
        s.sendmail("a@sender.test", ["user@example.com"], b"Subject: 465\r\n\r\nx\r\n")
    [raw] = read_new(srv.maildir)
    assert b" with ESMTPS (TLSv1." in raw


def _tls_fails(decisions, reason=None) -> list[str]:
    return [m for m in decisions()
            if "action=tls_fail" in m and (reason is None or f"reason={reason}" in m)]


def test_garbage_instead_of_a_client_hello_closes_once_logged(tls_start, decisions):
    srv = tls_start()
    c = open_client(srv.port)
    assert first(c.cmd("STARTTLS")).startswith("220")
    c.send(b"EHLO this is not TLS\r\n")
    assert c.at_eof()
    srv.wait_lost()
    [line] = _tls_fails(decisions)
    assert "stage=STARTTLS" in line


def test_half_a_client_hello_then_eof(tls_start, decisions):
    srv = tls_start()
    c = open_client(srv.port)
    assert first(c.cmd("STARTTLS")).startswith("220")
    c.send(bytes.fromhex("16030100c8010000c40303"))     # a ClientHello's first bytes
    c.sock.shutdown(socket.SHUT_WR)
    assert c.at_eof()
    srv.wait_lost()
    assert len(_tls_fails(decisions, "eof")) == 1


def test_a_stalled_handshake_is_closed_at_its_timeout(tls_start, decisions):
    srv = tls_start(handshake_timeout=0.3)
    c = open_client(srv.port)
    assert first(c.cmd("STARTTLS")).startswith("220")
    assert c.at_eof()               # the server hung up: no idle timeout (1200 s) waited for
    srv.wait_lost()
    assert len(_tls_fails(decisions, "timeout")) == 1
    assert srv.state.connections == 0


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_tls_1_1_is_refused(tls_start, decisions):
    srv = tls_start()
    c = open_client(srv.port)
    assert first(c.cmd("STARTTLS")).startswith("220")
    old = client_context(minimum_version=ssl.TLSVersion.MINIMUM_SUPPORTED,
                         maximum_version=ssl.TLSVersion.TLSv1_1)
    try:
        old.set_ciphers("ALL:@SECLEVEL=0")
    except ssl.SSLError:
        pass
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        c.starttls(old)
    srv.wait_lost()
    assert len(_tls_fails(decisions)) == 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
def test_openssl_s_client_starttls_smtp(tls_start):
    srv = tls_start()
    p = subprocess.run(
        ["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{srv.port}",
         "-servername", "mx.test", "-quiet", "-ign_eof"],
        input=b"EHLO client.test\r\nNOOP\r\nQUIT\r\n", capture_output=True, timeout=30)
    out = p.stdout.decode()
    assert "250 2.0.0 ok" in out and "221 " in out, (out, p.stderr.decode()[-500:])
    assert "STARTTLS" not in out.split("250 2.0.0 ok")[0].split("250-")[-1]


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks not installed (apt-get install swaks; see .ci/run)")
def test_swaks_tls(tls_start):
    srv = tls_start()
    p = subprocess.run(["swaks", "--server", f"127.0.0.1:{srv.port}", "--tls", "--to", "user@example.com",
                        "--from", "a@sender.test", "--helo", "client.test", "--timeout", "20"],
                       capture_output=True, timeout=60)
    assert p.returncode == 0, p.stdout.decode()[-2000:]
    assert b"TLS started" in p.stdout
    [raw] = read_new(srv.maildir)
    assert b" with ESMTPS (" in raw


def test_check_tls_names_what_a_tls_session_is_offered(tmp_path):
    """`mailfilter check --tls` drives the same Session inside TLS: PLAIN and
    LOGIN appear only there, STARTTLS only in clear."""
    from tests.support.server_harness import run_cli
    rules = write_rules(tmp_path / "rules", {"tcp.smtp": ':allow,SMTPAUTH=""\n'})
    args = ["check", "--rules", rules, "--helo", "c.test", "--from", "a@sender.test",
            "--rcpt", "user@example.com"]
    inside = run_cli(*args, "--tls")
    assert inside.returncode == 0, inside.stderr
    connect = inside.stdout.splitlines()[0]
    assert "inside TLS; EHLO offers PIPELINING" in connect and "AUTH LOGIN PLAIN" in connect
    assert "STARTTLS" not in connect
    clear = run_cli(*args)
    assert clear.returncode == 0 and "inside TLS" not in clear.stdout
