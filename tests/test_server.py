"""Server-level tests: mailfilter.server on real sockets, on BOTH event loops.

Every test here runs twice, once on asyncio's loop and once on uvloop's (the
`loop_kind` fixture: one suite, two loops, as uvloop's _testbase does with its
UVTestCase / AIOTestCase mixins). The server runs in-process on 127.0.0.1:0 in
a background thread (tests/server_harness.py); clients are smtplib or a raw
socket client in the test thread. No sleeps: tests wait on replies, on the
server closing a connection, or on threading.Events set by the server, each
with a bounded timeout.
"""
from __future__ import annotations

import asyncio
import logging
import os
import smtplib
import socket
import struct
import threading

import pytest

from mailfilter.server import Limits, SMTPProtocol
from tests.dns_responder import DnsResponder
from tests.server_harness import (
    CONTENT, DENIED, HELO_A, HELO_M, LOOPS, MAXRCPT, MFDNS, PLAIN, RELAY, SMALL, SUFFIX,
    TARPIT, TIMEOUT, RawClient, ServerThread, first, maildir_files, make_state, read_new,
    write_rules,
)
from mailfilter.dnscheck import Resolver


@pytest.fixture(params=LOOPS)
def loop_kind(request):
    return request.param


@pytest.fixture
def rules_dir(tmp_path):
    return write_rules(tmp_path / "rules")


@pytest.fixture
def start(tmp_path, loop_kind, rules_dir):
    servers = []

    def _start(*, rules=None, deliver=None, limits=None, resolver=None, open_relay=False):
        maildir = str(tmp_path / f"spool{len(servers)}")
        state = make_state(rules or rules_dir, deliver or f"maildir:{maildir}",
                           limits=limits, resolver=resolver, open_relay=open_relay)
        srv = ServerThread(loop_kind, state).start()
        srv.maildir = maildir
        servers.append(srv)
        return srv

    yield _start
    for srv in servers:
        srv.stop()


@pytest.fixture
def server(start):
    return start()


@pytest.fixture
def decisions(caplog):
    """The mailfilter decision log lines (key=value), as they are emitted."""
    logger = logging.getLogger("mailfilter")
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="mailfilter")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "mailfilter"]


def smtp(port: int, source: str = PLAIN) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT, source_address=(source, 0))


def session(port, source=PLAIN, helo="client.test") -> RawClient:
    c = RawClient(port, source)
    assert c.reply()[0] == 220
    assert c.cmd(f"EHLO {helo}")[0] == 250
    return c


MESSAGE = (b"From: a@sender.test\r\nTo: user@example.com\r\nSubject: test\r\n\r\n"
           b"hello\r\n..leading dot\r\n...two dots\r\n.\r\n")


def stored_body(raw: bytes) -> bytes:
    """The message as stored, after our Return-Path/X-Envelope-To/Received."""
    head, sep, rest = raw.partition(b"\nFrom: ")
    assert sep, raw[:300]
    return b"From: " + rest


# ------------------------------------------------------------------ session
def test_full_transaction_smtplib(server):
    """SPEC B §1.4-§1.5 command table through a real client; A §9 "250 means
    stored": the 250 after DATA names the maildir file that is in new/."""
    with smtp(server.port) as s:
        code, _ = s.ehlo("client.test")
        assert code == 250
        assert s.has_extn("pipelining") and s.has_extn("8bitmime")
        assert s.has_extn("enhancedstatuscodes")
        assert s.esmtp_features["size"] == "0"
        assert s.mail("a@sender.test") == (250, b"2.1.0 ok")
        assert s.rcpt("user@example.com") == (250, b"2.1.5 ok")
        code, text = s.data(b"Subject: one\r\n\r\nline\r\n.dot line\r\n")
        assert code == 250
        assert text.startswith(b"2.0.0 ok ")
        qid = text.split(b" qp ")[1].decode()
        assert s.noop()[0] == 250
        assert s.quit()[0] == 221
    [name] = maildir_files(server.maildir)
    assert qid in name
    [raw] = read_new(server.maildir)
    assert raw.startswith(b"Return-Path: <a@sender.test>\nX-Envelope-To: <user@example.com>\nReceived: from ")
    assert b"(HELO client.test) (127.0.0.1)\n  by mx.test with ESMTP; " in raw
    assert raw.endswith(b"Subject: one\n\nline\n.dot line\n")
    assert maildir_files(server.maildir, "tmp") == []


def test_pipelined_commands_answered_in_one_write(server):
    """SPEC B §7.3 PIPELINING / DESIGN "answered in one transport.write":
    MAIL, RCPT, RCPT, DATA in one packet -> four replies in ONE write."""
    c = session(server.port)
    proto = server.connections[-1]
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\n"
           b"RCPT TO:<u2@example.com>\r\nDATA\r\n")
    replies = c.replies(4)
    assert [first(r) for r in replies] == [
        "250 2.1.0 ok", "250 2.1.5 ok", "250 2.1.5 ok", "354 go ahead"]
    expected = (b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n")
    assert expected in proto.writes
    # the end of data and QUIT pipelined too: 250 then 221, then EOF
    c.send(b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    r1, r2 = c.replies(2)
    assert r1[0] == 250 and r1[1][0].startswith("2.0.0 ok ")
    assert first(r2) == "221 2.0.0 mx.test"
    assert c.at_eof()
    c.close()
    [raw] = read_new(server.maildir)
    assert b"X-Envelope-To: <user@example.com>\nX-Envelope-To: <u2@example.com>\n" in raw
    assert raw.endswith(b"\n\nbody\n")


def test_help_vrfy_noop_rset_quit(server):
    """SPEC B §1.4 (VRFY 252, NOOP, RSET, QUIT), §2.15 HELP multi-line, §7.2 codes."""
    c = session(server.port)
    code, lines = c.cmd("HELP")
    assert code == 214 and len(lines) >= 2
    assert lines[0] == "2.0.0 mailfilter 0.1.0"
    assert lines[1].startswith("2.0.0 features: PIPELINING SIZE 8BITMIME ENHANCEDSTATUSCODES")
    assert first(c.cmd("VRFY postmaster")) == "252 2.1.5 send some mail, i'll try my best"
    assert first(c.cmd("NOOP")) == "250 2.0.0 ok"
    assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    assert first(c.cmd("RSET")) == "250 2.0.0 flushed"
    # RSET ended the transaction (B §1.5)
    assert first(c.cmd("RCPT TO:<user@example.com>")) == "503 5.5.1 MAIL first"
    assert first(c.cmd("QUIT")) == "221 2.0.0 mx.test"
    assert c.at_eof()
    c.close()


def test_unknown_command_502_and_session_continues(server, decisions):
    """SPEC B §1.4 (unknown verb -> 502), A §6; the session goes on."""
    c = session(server.port)
    assert first(c.cmd("EXPN list")) == "502 5.5.2 unimplemented"
    assert first(c.cmd("MAILX FROM:<a@b>")) == "502 5.5.2 unimplemented"
    assert first(c.cmd("NOOP")) == "250 2.0.0 ok"
    assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    c.close()
    assert any("anomaly=" in line and "EXPN" in line for line in decisions())


def test_overlong_line_500_and_session_continues(server):
    """SPEC A §6, B §7.1: 512 octets incl. CRLF is the limit; 513 -> 500 5.5.2."""
    c = session(server.port)
    ok = "NOOP " + "x" * (512 - 2 - 5)
    assert len(ok) + 2 == 512
    assert first(c.cmd(ok)) == "250 2.0.0 ok"
    long = "NOOP " + "x" * (513 - 2 - 5)
    assert len(long) + 2 == 513
    assert first(c.cmd(long)) == "500 5.5.2 line too long"
    assert first(c.cmd("NOOP")) == "250 2.0.0 ok"
    # a much longer line arriving in pieces: one 500, the rest discarded
    c.send(b"MAIL FROM:<" + b"a" * 5000)
    c.send(b"a" * 5000 + b">\r\nNOOP\r\n")
    assert first(c.reply()) == "500 5.5.2 line too long"
    assert first(c.reply()) == "250 2.0.0 ok"
    c.close()


def test_too_many_bad_commands_421_and_close(server):
    """SPEC A §6 / DESIGN Errors: after max_bad_commands (10) errors, 421 and close."""
    c = session(server.port)
    c.send(b"BOGUS\r\n" * 12)
    replies = c.replies(11)
    assert [r[0] for r in replies[:10]] == [502] * 10
    assert first(replies[10]) == "421 4.7.0 mx.test too many errors, closing connection"
    assert c.at_eof()
    c.close()
    server.wait_lost()
    assert server.state.connections == 0


# ------------------------------------------------------------------ policy
@pytest.mark.parametrize("sender,rcpt,reply,log", [
    ("spammer@example.org", "user@example.com",
     "553 5.7.1 sorry, your envelope sender is in my badmailfrom list",
     "action=reject stage=RCPT reason=badmailfrom rule=badmailfrom:2 "),
    ("x@host.invalid", "user@example.com",
     "553 5.7.1 sorry, your envelope sender is in my badmailfrom list",
     "action=reject stage=RCPT reason=badmailfrom rule=badmailfrom:4 "),
    ("a@sender.test", "noreply@example.net",
     "553 5.7.1 sorry, your envelope recipient is in my badrcptto list",
     "action=reject stage=RCPT reason=badrcptto rule=badrcptto:3 "),
    ("a@sender.test", "a%b@example.net",
     "553 5.7.1 sorry, your envelope recipient is in my badrcptto list",
     "action=reject stage=RCPT reason=badrcptto rule=badrcptto:2 "),
    ("a@sender.test", "user@elsewhere.test",
     "553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts",
     "action=reject stage=RCPT reason=rcpthosts "),
    ("a@sender.test", "nobody@example.com",
     "550 5.1.1 sorry, no mailbox by that name",
     "action=reject stage=RCPT reason=no_mailbox "),
])
def test_policy_rejections_at_rcpt_with_rule_in_log(server, decisions, sender, rcpt, reply, log):
    """SPEC B §2.8 RCPT table (#9 rcpthosts, #12 recipients, #15 badmailfrom,
    #16 badrcptto), B §1.10 (verdict at MAIL, reported at RCPT), A §5 replies,
    DESIGN "one decision line per verdict" naming file:line."""
    c = session(server.port)
    assert first(c.cmd(f"MAIL FROM:<{sender}>")) == "250 2.1.0 ok"
    assert first(c.cmd(f"RCPT TO:<{rcpt}>")) == reply
    # the session is still usable; a good recipient is still refused with a bad sender
    assert first(c.cmd("DATA"))[:3] == "503"
    c.close()
    lines = [line for line in decisions() if "stage=RCPT" in line]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(log), line
    assert "client=unknown[127.0.0.1]:" in line
    assert f"helo=<client.test> from=<{sender}> to=<{rcpt}> reply=\"{reply}\"" in line


def test_tcp_smtp_deny_553_at_rcpt(server, decisions):
    """SPEC A §3 / rules README: a `deny` client is refused at every RCPT, 553 5.7.1."""
    c = session(server.port, DENIED)
    assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    assert first(c.cmd("RCPT TO:<user@example.com>")) == "553 5.7.1 sorry, your client address is not allowed here"
    assert first(c.cmd("RCPT TO:<postmaster@example.com>"))[:3] == "553"
    c.close()
    rc = [line for line in decisions() if "stage=RCPT" in line]
    assert len(rc) == 2
    assert all("reason=client_denied rule=tcp.smtp:2 " in line for line in rc), rc


def test_relayclient_relays_and_badmailfrom_still_applies(server):
    """SPEC B §1.9 RELAYCLIENT: rcpthosts and recipients skipped, badmailfrom kept."""
    c = session(server.port, RELAY)
    assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    assert first(c.cmd("RCPT TO:<someone@elsewhere.test>")) == "250 2.1.5 ok"
    c.send(b"DATA\r\n")
    assert c.reply()[0] == 354
    c.send(b"Subject: relay\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0] == 250
    assert first(c.cmd("MAIL FROM:<spammer@example.org>")) == "250 2.1.0 ok"
    assert first(c.cmd("RCPT TO:<someone@elsewhere.test>")).startswith("553 5.7.1 sorry, your envelope sender")
    c.close()
    [raw] = read_new(server.maildir)
    assert b"X-Envelope-To: <someone@elsewhere.test>\n" in raw


def test_relayclient_suffix_appended(server):
    """SPEC B §1.9: RELAYCLIENT="@fixme" turns u@d into u@d@fixme for delivery."""
    c = session(server.port, SUFFIX)
    assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    assert first(c.cmd("RCPT TO:<u@elsewhere.test>")) == "250 2.1.5 ok"
    c.send(b"DATA\r\nSubject: s\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0] == 354 and c.reply()[0] == 250
    c.close()
    [raw] = read_new(server.maildir)
    assert b"X-Envelope-To: <u@elsewhere.test@fixme>\n" in raw


def test_maxrecipients_452(server):
    """SPEC B §2.4 MAXRECIPIENTS, §2.8 #18: 452 4.5.3 beyond the limit; the
    message goes to the accepted recipients only."""
    c = session(server.port, MAXRCPT)
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\n"
           b"RCPT TO:<u2@example.com>\r\nRCPT TO:<u3@example.com>\r\nDATA\r\n")
    got = [first(r) for r in c.replies(5)]
    assert got == ["250 2.1.0 ok", "250 2.1.5 ok", "250 2.1.5 ok",
                   "452 4.5.3 sorry, too many recipients", "354 go ahead"]
    c.send(b"Subject: m\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0] == 250
    c.close()
    [raw] = read_new(server.maildir)
    assert raw.count(b"X-Envelope-To:") == 2 and b"u3@" not in raw
