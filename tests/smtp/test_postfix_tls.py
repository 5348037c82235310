"""A real Postfix relaying to mailfilter over STARTTLS (RFC 3207), both loops.

Postfix (the Debian package, a throwaway instance: tests/support/postfix.py)
takes a message on its own smtpd and relays it with its smtp client to
`relayhost = [127.0.0.1]:PORT`, mailfilter's in-process server
(tests/support/server_harness.py) delivering to a maildir:

- `smtp_tls_security_level = encrypt` (mandatory TLS, RFC 3207 §4: a client
  that requires TLS must not send the message in clear): with a certificate
  the message arrives `with ESMTPS (TLSv1.x ...)` and Postfix logs the TLS
  connection and `status=sent`; without one (STARTTLS not offered) Postfix
  keeps the message deferred and mailfilter receives nothing, and once
  mailfilter has a certificate a queue flush delivers it over TLS.
- `smtp_tls_security_level = may` (opportunistic TLS, RFC 7435): TLS when
  mailfilter offers STARTTLS, clear text (`with ESMTP`) when it does not.

Every wait is on an event with a deadline: a file in the maildir, a line in
Postfix's log, mailfilter seeing the connection close. Needs root and
/usr/sbin/postfix (skipped otherwise, as the other peer tests).
"""
from __future__ import annotations

import re
import ssl
import time

import pytest

from mailfilter.tls import TLSSettings
from tests.support import postfix
from tests.support.certs import make_pair
from tests.support.server_harness import read_new

pytestmark = pytest.mark.skipif(postfix.unavailable() is not None,
                                reason=postfix.unavailable() or "")

SENDER = "a@sender.test"
RCPT = "user@example.com"           # in the harness' rcpthosts and recipients
TLS_UP = r"(?:Trusted|Untrusted|Anonymous|Verified) TLS connection established to " \
         r"127\.0\.0\.1\[127\.0\.0\.1\]:{port}: (TLSv1\.[23]) with cipher (\S+)"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pf-tls")
    return {kind: make_pair(d, "mx.test", kind) for kind in ("ecdsa", "rsa")}


def tls_settings(pair) -> TLSSettings:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(pair.cert, pair.key)
    return TLSSettings(ctx)


@pytest.fixture
def mailfilter(start):
    """mailfilter on the loop under test; TLS settings given per test."""
    return lambda tls: start(tls=tls)


@pytest.fixture
def relay():
    """A Postfix instance relaying everything to mailfilter's port."""
    instances = []

    def _start(port: int, level: str):
        inst = postfix.PostfixInstance.start(
            relayhost=f"[127.0.0.1]:{port}", smtp_tls_security_level=level, smtp_tls_loglevel="1")
        instances.append(inst)
        return inst
    yield _start
    for inst in instances:
        inst.stop()


def wait_maildir(path, count: int = 1, timeout: float = 20.0) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while len(msgs := read_new(path)) < count:
        assert time.monotonic() < deadline, f"{len(msgs)} of {count} messages in {path} after {timeout} s"
        time.sleep(0.05)
    return msgs


def first_received(raw: bytes) -> str:
    """The topmost Received header (mailfilter's), unfolded, up to its date."""
    head = raw.split(b"\nReceived: ", 1)[1].split(b";", 1)[0]
    return " ".join(head.decode().split())


def message(subject: str) -> bytes:
    return f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: {subject}\r\n\r\nover TLS or not at all\r\n".encode()


def sent(pf, qid: str, port: int) -> None:
    """Postfix logged the delivery to mailfilter and then removed the message
    (qmgr logs `removed` once the queue file is gone)."""
    pf.wait_log(rf"{qid}: to=<{re.escape(RCPT)}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{port}, "
                rf".* status=sent \(250 ")
    pf.wait_log(rf"{qid}: removed$")


def test_encrypt_delivers_over_tls(mailfilter, relay, certs, decisions):
    srv = mailfilter(tls_settings(certs["ecdsa"]))
    pf = relay(srv.port, "encrypt")
    qid = pf.submit(SENDER, [RCPT], message("encrypt"))
    [raw] = wait_maildir(srv.maildir)
    received = first_received(raw)
    assert "(HELO postfix.test)" in received and " by mx.test with ESMTPS (TLSv1." in received, received
    sent(pf, qid, srv.port)
    version, cipher = pf.wait_log(TLS_UP.format(port=srv.port)).groups()
    # both ends name the same protocol version and cipher
    assert f"with ESMTPS ({version} {cipher})" in received, (received, version, cipher)
    assert pf.queue() == []
    [line] = [m for m in decisions() if "action=accept stage=DATA" in m]
    assert f" tls={version}" in line, line


def test_encrypt_without_a_certificate_stays_deferred(mailfilter, relay, certs):
    srv = mailfilter(TLSSettings())        # no certificate: STARTTLS is not offered
    pf = relay(srv.port, "encrypt")
    qid = pf.submit(SENDER, [RCPT], message("must not go in clear"))
    pf.wait_log(rf"{qid}: to=<{re.escape(RCPT)}>, .* status=deferred \(TLS is required, but was not "
                rf"offered by host 127\.0\.0\.1\[127\.0\.0\.1\]\)")
    # Postfix had its EHLO answered, then gave up; once mailfilter saw the
    # connection close nothing more can arrive through it
    srv.wait_lost()
    assert read_new(srv.maildir) == []
    queued = pf.wait_queued(qid, "deferred")
    assert len(pf.queue()) == 1
    [rcpt] = queued["recipients"]
    assert rcpt["address"] == RCPT and "TLS is required" in rcpt["delay_reason"]
    assert "TLS connection established" not in pf.log()

    # the message was held, not lost: with a certificate a flush delivers it over TLS
    srv.state.swap_tls(tls_settings(certs["ecdsa"]))
    pf.flush()
    [raw] = wait_maildir(srv.maildir)
    assert " with ESMTPS (TLSv1." in first_received(raw)
    assert b"Subject: must not go in clear" in raw
    sent(pf, qid, srv.port)
    assert pf.queue() == []


@pytest.mark.parametrize("cert", ["rsa", None])
def test_may_uses_tls_when_offered(mailfilter, relay, certs, cert):
    srv = mailfilter(tls_settings(certs[cert]) if cert else TLSSettings())
    pf = relay(srv.port, "may")
    qid = pf.submit(SENDER, [RCPT], message("opportunistic"))
    [raw] = wait_maildir(srv.maildir)
    received = first_received(raw)
    sent(pf, qid, srv.port)
    if cert:
        assert " by mx.test with ESMTPS (TLSv1." in received, received
        pf.wait_log(TLS_UP.format(port=srv.port))
    else:
        # no STARTTLS offered: `may` falls back to clear text, and says so honestly
        assert received.endswith(" by mx.test with ESMTP"), received
        assert "TLS connection established" not in pf.log()
