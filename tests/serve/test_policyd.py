"""`mailfilter policyd` (docs/behaviour/policyd.md): the rules answering
Postfix's SMTPD policy protocol, as a spawned process on a real socket, and
behind a real Postfix smtpd (`check_policy_service`)."""
from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import subprocess
import sys

import pytest

from tests.support import postfix
from tests.support.server_harness import (
    TIMEOUT, LogReader, child_env, free_port, write_rules,
)

RULES = {
    "tcp.smtp": '127.0.0.2:allow,RELAYCLIENT=""\n192.0.2.0/24:deny\n:allow\n',
}

BANNED = "action=553 5.7.1 sorry, your envelope sender is in my badmailfrom list"


class Policyd:
    def __init__(self, *args, listen=None):
        self.port = free_port()
        self.listen = listen or f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailfilter", "policyd", *args, "--listen", self.listen],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
        self.log = LogReader(self.proc.stderr)
        self.log.wait_for(r"policyd: listening on ", timeout=30)

    def connect(self) -> socket.socket:
        if self.listen.startswith("unix:"):
            s = socket.socket(socket.AF_UNIX)
            s.connect(self.listen[5:])
        else:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        s.settimeout(TIMEOUT)
        return s

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def request(**attrs) -> bytes:
    base = {"request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
            "client_address": "198.51.100.7", "client_name": "mx.far.example",
            "helo_name": "mx.far.example", "sender": "a@far.example",
            "recipient": "user@example.com", "instance": "123.456.7"}
    base.update(attrs)
    return b"".join(f"{k}={v}\n".encode() for k, v in base.items() if v is not None) + b"\n"


def answers(s: socket.socket, n: int) -> list[str]:
    data = b""
    while data.count(b"\n\n") < n:
        chunk = s.recv(4096)
        assert chunk, data
        data += chunk
    return [a.decode() for a in data.split(b"\n\n")[:n]]


@pytest.fixture
def rules(tmp_path):
    return write_rules(tmp_path / "rules", RULES)


@pytest.fixture
def policyd(rules):
    started = []

    def _start(*args, **kw):
        p = Policyd("--rules", rules, *args, **kw)
        started.append(p)
        return p

    yield _start
    for p in started:
        p.stop()


CASES = [
    (dict(), "action=DUNNO"),                                            # a local recipient
    (dict(sender="spammer@example.org"), BANNED),                        # badmailfrom at RCPT
    (dict(sender="spammer@example.org", protocol_state="MAIL", recipient=None),
     "action=DUNNO"),                                                    # pending at MAIL
    (dict(recipient="x@elsewhere.test"),
     "action=553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts"),
    (dict(recipient="x@elsewhere.test", sasl_username="alice"), "action=DUNNO"),  # AUTH: relays
    (dict(recipient="x@elsewhere.test", client_address="127.0.0.2"), "action=DUNNO"),  # RELAYCLIENT
    (dict(client_address="192.0.2.9", protocol_state="CONNECT", sender=None, recipient=None),
     "action=553 5.7.1 sorry, your client address is not allowed here"),  # tcp.smtp deny
    (dict(recipient="u%elsewhere.test@example.com"),
     "action=553 5.7.1 sorry, no routing through this host (% ! @ or a source route)"),
    (dict(recipient="noreply@example.net"),
     "action=553 5.7.1 sorry, your envelope recipient is in my badrcptto list"),
    (dict(protocol_state="DATA"), "action=DUNNO"),
    (dict(request="smtpd_something_else"), "action=DUNNO"),              # not ours: no verdict
]


def test_requests_on_one_persistent_connection(policyd):
    """Every case on one connection, pipelined, answered in order; the
    refusals are the server's reply texts and their decision lines name
    the rule."""
    p = policyd()
    with p.connect() as s:
        s.sendall(b"".join(request(**attrs) for attrs, _ in CASES))
        assert answers(s, len(CASES)) == [expected for _, expected in CASES]
        # the connection stays open for the next request, fed byte by byte
        for b in request(sender="spammer@example.org"):
            s.send(bytes([b]))
        assert answers(s, 1) == [BANNED]
    p.log.wait_for(r"action=reject stage=RCPT reason=badmailfrom rule=badmailfrom:2 "
                   r"client=mx\.far\.example\[198\.51\.100\.7\] .*detail=policyd")


def test_a_malformed_request_gets_dunno_and_the_connection_goes_on(policyd):
    p = policyd()
    with p.connect() as s:
        s.sendall(b"request=smtpd_access_policy\nthis line has no equals sign\n\n"
                  + request(sender="spammer@example.org"))
        assert answers(s, 2) == ["action=DUNNO", BANNED]
    p.log.wait_for(r"reason=bad_request")


def test_unix_socket_and_sighup_reload(policyd, rules, tmp_path):
    p = policyd(listen=f"unix:{tmp_path}/policy.sock")
    with p.connect() as s:
        s.sendall(request(sender="new@spam.test"))
        assert answers(s, 1) == ["action=DUNNO"]
    with open(os.path.join(rules, "badmailfrom"), "a") as fh:
        fh.write("new@spam.test\n")
    p.proc.send_signal(signal.SIGHUP)
    p.log.wait_for(r"policyd: reload ok: \d+ rules from ")
    with p.connect() as s:
        s.sendall(request(sender="new@spam.test"))
        assert answers(s, 1) == [BANNED]
    assert p.stop() == 0


def test_rules_without_rcpthosts_do_not_start(tmp_path):
    rules = write_rules(tmp_path / "rules", remove=("rcpthosts",))
    r = subprocess.run([sys.executable, "-m", "mailfilter", "policyd", "--rules", rules,
                        "--listen", f"127.0.0.1:{free_port()}"], capture_output=True, text=True,
                       timeout=60, env=child_env())
    assert r.returncode == 2 and "no rcpthosts" in r.stderr


@pytest.mark.skipif(postfix.unavailable() is not None, reason=str(postfix.unavailable()))
def test_behind_a_real_postfix_smtpd(policyd):
    """A throwaway Postfix whose smtpd asks policyd at RCPT
    (check_policy_service inet:...): the spamcontrol verdicts reach the
    client through Postfix, the rest is Postfix's own."""
    p = policyd()
    pf = postfix.PostfixInstance.start(
        smtpd_recipient_restrictions=f"check_policy_service inet:127.0.0.1:{p.port}, "
                                     "permit_mynetworks, reject_unauth_destination",
        relayhost=f"[127.0.0.1]:{free_port()}")
    try:
        with smtplib.SMTP("127.0.0.1", pf.port, timeout=TIMEOUT) as s:
            s.ehlo("mx.far.example")
            assert s.mail("spammer@example.org")[0] == 250        # pending, as in spamcontrol
            # Postfix puts its own "<rcpt>: Recipient address rejected:" before the text
            code, text = s.rcpt("user@example.com")
            assert code == 553 and text.decode() == ("5.7.1 <user@example.com>: Recipient address "
                                                     "rejected: sorry, your envelope sender is in "
                                                     "my badmailfrom list")
            s.rset()
            assert s.mail("a@far.example")[0] == 250
            assert s.rcpt("user@example.com")[0] == 250           # DUNNO, then Postfix's permit
            code, text = s.rcpt("noreply@example.net")
            assert code == 553 and text.decode().endswith(
                "Recipient address rejected: sorry, your envelope recipient is in my badrcptto list")
        lines = p.log.wait_for(r"action=reject stage=RCPT reason=(\w+) .*detail=policyd", count=2)
        assert [m.group(1) for m in lines[:2]] == ["badmailfrom", "badrcptto"]
    finally:
        pf.stop()
