"""Server-level tests: mailfilter.smtp.protocol on real sockets, on BOTH event loops.

Every test here runs twice, once on asyncio's loop and once on uvloop's (the
`loop_kind` fixture: one suite, two loops, as uvloop's _testbase does with its
UVTestCase / AIOTestCase mixins). The server runs in-process on 127.0.0.1:0 in
a background thread (tests/server_harness.py); clients are smtplib or a raw
socket client in the test thread. No sleeps: tests wait on replies, on the
server closing a connection, or on threading.Events set by the server, each
with a bounded timeout.
"""
from __future__ import annotations

import logging
import os
import smtplib
import socket
import struct
import threading
import time

import pytest

from mailfilter.smtp.protocol import Limits, SMTPProtocol
from tests.support.dns_responder import DnsResponder
from tests.support.server_harness import (
    CONTENT, DENIED, HELO_A, HELO_M, MAXRCPT, MFDNS, PLAIN, RELAY, SMALL, SUFFIX,
    TARPIT, TIMEOUT, RawClient, first, maildir_files, read_new,
    write_rules,
)
from mailfilter.policy.dns import Resolver


@pytest.fixture
def server(start):
    return start()


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
    """docs/behaviour/smtp.md#commands, #states command table through a real client;
    docs/behaviour/delivery.md#250-means-stored: the 250 after DATA names the maildir file
    that is in new/."""
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


def _store_one(c: RawClient) -> None:
    """A pipelined a@sender.test -> user@example.com message, stored; then close."""
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    assert [r[0] for r in c.replies(3)] == [250, 250, 354]
    c.send(b"Subject: p\r\n\r\nbody\r\n.\r\n")
    assert c.reply()[0] == 250
    c.close()


@pytest.mark.parametrize("verb,proto", [("HELO", b"SMTP"), ("EHLO", b"ESMTP")])
def test_received_protocol_helo_smtp_ehlo_esmtp(server, verb, proto):
    """docs/behaviour/smtp.md#received-header / RFC 3848: a session that greeted with HELO is `with
    SMTP`, one that used EHLO `with ESMTP` (the last greeting counts)."""
    c = RawClient(server.port)
    assert c.reply()[0] == 220
    other = "EHLO" if verb == "HELO" else "HELO"
    assert c.cmd(f"{other} first.test")[0] == 250
    assert c.cmd(f"{verb} client.test")[0] == 250
    _store_one(c)
    [raw] = read_new(server.maildir)
    assert b"(HELO client.test) (127.0.0.1)\n  by mx.test with " + proto + b"; " in raw


def test_pipelined_commands_answered_in_one_write(server):
    """docs/behaviour/smtp.md#command-lines PIPELINING / docs/architecture.md#design-rules:
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
    """docs/behaviour/smtp.md#commands (VRFY 252, NOOP, RSET, QUIT),
    docs/behaviour/smtp.md#commands HELP multi-line, docs/behaviour/smtp.md#replies codes."""
    c = session(server.port)
    code, lines = c.cmd("HELP")
    assert code == 214 and len(lines) >= 2
    assert lines[0] == "2.0.0 mailfilter 0.1.0"
    assert lines[1].startswith("2.0.0 features: PIPELINING CHUNKING SIZE 8BITMIME ENHANCEDSTATUSCODES")
    assert first(c.cmd("VRFY postmaster")) == "252 2.0.0 send some mail, i'll try my best"
    assert first(c.cmd("NOOP")) == "250 2.0.0 ok"
    assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    assert first(c.cmd("RSET")) == "250 2.0.0 flushed"
    # RSET ended the transaction (docs/behaviour/smtp.md#states)
    assert first(c.cmd("RCPT TO:<user@example.com>")) == "503 5.5.1 MAIL first"
    assert first(c.cmd("QUIT")) == "221 2.0.0 mx.test"
    assert c.at_eof()
    c.close()


def test_unknown_command_502_and_session_continues(server, decisions):
    """docs/behaviour/smtp.md#commands (spamcontrol: unknown verb -> 500, vanilla 502),
    docs/behaviour/smtp.md#replies, docs/behaviour/differences.md#smtp-commands; the
    session goes on."""
    c = session(server.port)
    assert first(c.cmd("EXPN list")) == "500 5.5.1 unimplemented"
    assert first(c.cmd("MAILX FROM:<a@b>")) == "500 5.5.1 unimplemented"
    assert first(c.cmd("NOOP")) == "250 2.0.0 ok"
    assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    c.close()
    assert any("anomaly=" in line and "EXPN" in line for line in decisions())


def test_overlong_line_500_and_session_continues(server):
    """docs/behaviour/differences.md#smtp-commands, docs/behaviour/smtp.md#limits: 512 octets incl.
    CRLF is the limit; 513 -> 500 5.5.2."""
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
    """docs/behaviour/differences.md#smtp-commands / docs/architecture.md#errors-and-logging: after
    max_bad_commands (10) errors, 421 and close."""
    c = session(server.port)
    c.send(b"BOGUS\r\n" * 12)
    replies = c.replies(11)
    assert [r[0] for r in replies[:10]] == [500] * 10
    assert first(replies[10]) == "421 4.7.0 mx.test too many errors, closing connection"
    assert c.at_eof()
    c.close()
    server.wait_lost()
    assert server.state.connections == 0


def test_server_closes_are_logged(server, decisions):
    """Every close the server makes has a line saying why
    (docs/architecture.md#errors-and-logging): the too-many-errors 421 was not logged,
    unlike timeouts; a client's QUIT is not a server decision."""
    c = session(server.port)
    c.send(b"BOGUS\r\n" * 10)
    assert first(c.replies(11)[10]).startswith("421 4.7.0")
    c.close()
    server.wait_lost()
    q = session(server.port)
    q.cmd("QUIT")
    q.close()
    server.wait_lost()
    closes = [l for l in decisions() if l.startswith("action=close")]
    assert len(closes) == 1, closes
    assert closes[0].startswith("action=close reason=too_many_errors client=unknown[127.0.0.1]:")
    assert closes[0].endswith('reply="421 4.7.0 mx.test too many errors, closing connection"')


def test_denied_client_is_closed_at_once_with_one_line(server, decisions):
    """docs/behaviour/tcp-smtp.md#denied-clients: a `deny` client is closed at
    once, without a byte, as tcpserver does (the default, --deny close); the
    refusal is one decision line naming the rule."""
    c = RawClient(server.port, DENIED)
    assert c.reply() is None            # EOF before any greeting
    c.close()
    server.wait_lost()
    lines = [l for l in decisions() if "stage=CONNECT" in l]
    assert len(lines) == 1
    assert lines[0].startswith("action=refuse stage=CONNECT reason=client_denied rule=tcp.smtp:2 "
                               "client=unknown[127.0.0.3]:")
    assert lines[0].endswith(" detail=closed")
    # the other clients are served as before
    with session(server.port, PLAIN) as ok:
        assert first(ok.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"


def test_denied_client_connect_line_names_the_reply_sent(start, decisions):
    """With --deny rcpt a `deny` client gets 220 and 553 at every RCPT
    (docs/behaviour/tcp-smtp.md#denied-clients): its CONNECT line said reply="553 ..." although
    220 was sent."""
    server = start(deny="rcpt")
    c = RawClient(server.port, DENIED)
    assert c.reply()[0] == 220
    c.close()
    server.wait_lost()
    lines = [l for l in decisions() if "stage=CONNECT" in l]
    assert len(lines) == 1
    assert lines[0].startswith("action=accept stage=CONNECT reason=pending_client_denied rule=tcp.smtp:2 ")
    assert lines[0].endswith('reply="220 mx.test ESMTP"')


def test_decision_lines_name_the_rule_that_accepted_or_refused(server, decisions):
    """README: every decision names its rule. An accepted RCPT names the
    recipients (or rcpthosts) line that let it in; a refusal because no line
    lists the address names the file."""
    c = session(server.port)
    assert first(c.cmd("MAIL FROM:<a@sender.test>"))[:3] == "250"
    assert first(c.cmd("RCPT TO:<u2@example.com>"))[:3] == "250"
    assert first(c.cmd("RCPT TO:<nobody@example.com>"))[:3] == "550"
    assert first(c.cmd("RCPT TO:<x@far.example>"))[:3] == "553"
    c.close()
    server.wait_lost()
    rcpt = [l for l in decisions() if "stage=RCPT" in l]
    assert [l.split(" client=")[0] for l in rcpt] == [
        "action=accept stage=RCPT reason=ok rule=recipients:3",
        "action=reject stage=RCPT reason=no_mailbox rule=recipients",
        "action=reject stage=RCPT reason=rcpthosts rule=rcpthosts",
    ]


def test_log_lines_stay_bounded_with_huge_client_input(server, decisions):
    """A value is cut at log.MAX_VALUE characters with a note of what was
    left out: 300 recipients of 200 octets made one 60 KB DATA line (1000
    made 500 KB, more than a syslog datagram takes)."""
    c = session(server.port)
    assert first(c.cmd("MAIL FROM:<a@sender.test>"))[:3] == "250"
    for i in range(300):
        assert first(c.cmd(f"RCPT TO:<{'r' * 180}{i:03d}@example.net>"))[:3] == "250"
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n")
    assert c.reply()[0] == 250
    c.close()
    server.wait_lost()
    data = [l for l in decisions() if "stage=DATA" in l]
    assert len(data) == 1 and "rcpts=300" in data[0]
    assert len(data[0]) < 2000, len(data[0])
    assert "more]" in data[0]


def test_received_8bit_helo_one_question_mark_per_byte(server):
    """docs/behaviour/smtp.md#received-header: qmail's safeput works per byte, so
    each 8-bit byte of the HELO argument is one `?` in the Received line (c3 a9 74 e9 -> ??t?)."""
    c = RawClient(server.port)
    assert c.reply()[0] == 220
    c.send(b"HELO \xc3\xa9t\xe9\r\n")
    assert c.reply()[0] == 250
    _store_one(c)
    [raw] = read_new(server.maildir)
    assert b"Received: from unknown (HELO ??t?) (127.0.0.1)\n" in raw


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
    ("a@sender.test", "a%b@example.net",       # routing (the percent hack), before badrcptto
     "553 5.7.1 sorry, no routing through this host (% ! @ or a source route)",
     "action=reject stage=RCPT reason=routing rule=routing "),
    ("a@sender.test", "user@elsewhere.test",
     "553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts",
     "action=reject stage=RCPT reason=rcpthosts "),
    ("a@sender.test", "nobody@example.com",
     "550 5.1.1 sorry, no mailbox by that name",
     "action=reject stage=RCPT reason=no_mailbox "),
])
def test_policy_rejections_at_rcpt_with_rule_in_log(server, decisions, sender, rcpt, reply, log):
    """docs/behaviour/smtp.md#rcpt-checks (#9 rcpthosts, #12 recipients, #15 badmailfrom,
    #16 badrcptto), docs/behaviour/smtp.md#pending-verdicts (verdict at MAIL, reported at RCPT),
    docs/behaviour/smtp.md#replies replies, docs/operations.md#decision-lines naming file:line."""
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


HC_EMPTY, HC_BANG, HC_DOT = "127.0.0.12", "127.0.0.13", "127.0.0.14"
HELOCHECK_RULES = {
    "badhelo": "localhost\n.bad.example\n",
    "tcp.smtp": (f'{HC_EMPTY}:allow,HELOCHECK=""\n{HC_BANG}:allow,HELOCHECK="!"\n'
                 f'{HC_DOT}:allow,HELOCHECK="."\n:allow\n'),
}
BAD_HELO = "550 5.7.1 sorry, invalid HELO/EHLO greeting"


@pytest.mark.parametrize("source,helo,expect,reason", [
    (HC_EMPTY, "mx.good.test", "250 2.1.5 ok", None),
    (HC_EMPTY, "localhost", BAD_HELO, "reason=bad_helo rule=badhelo:1 "),
    (HC_EMPTY, "mx.bad.example", BAD_HELO, "reason=bad_helo rule=badhelo:2 "),
    (HC_EMPTY, None, "250 2.1.5 ok", None),                 # "": no HELO is fine
    (HC_BANG, None, BAD_HELO, "reason=helo_missing "),      # "!": HELO required ...
    (HC_BANG, "localhost", "250 2.1.5 ok", None),           # ... but no list check
    (HC_DOT, None, BAD_HELO, "reason=helo_missing "),       # ".": both
    (HC_DOT, "localhost", BAD_HELO, "reason=bad_helo rule=badhelo:1 "),
    (HC_DOT, "mx.good.test", "250 2.1.5 ok", None),
    ("127.0.0.15", "localhost", "250 2.1.5 ok", None),      # HELOCHECK unset: no check
])
def test_helocheck_modes_through_the_server(start, tmp_path, decisions, source, helo, expect, reason):
    """docs/behaviour/tcp-smtp.md#settings HELOCHECK "" (badhelo), "!" (HELO required), "." (both),
    docs/behaviour/smtp.md#pending-verdicts (250 to HELO, the verdict at RCPT),
    docs/behaviour/smtp.md#rcpt-checks #5/#6, with the rule in the log."""
    srv = start(rules=write_rules(tmp_path / "hc", HELOCHECK_RULES))
    c = RawClient(srv.port, source)
    assert c.reply()[0] == 220
    if helo is not None:
        assert c.cmd(f"HELO {helo}")[0] == 250
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\n")
    assert [first(r) for r in c.replies(2)] == ["250 2.1.0 ok", expect]
    c.close()
    if reason is not None:
        [line] = [l for l in decisions() if "stage=RCPT" in l]
        assert line.startswith("action=reject stage=RCPT " + reason), line


@pytest.mark.parametrize("send,reply,tag", [
    (b"NOOP\n", "250 2.0.0 ok", "BARE NEWLINE"),
    (b"NOOP " + b"x" * 600 + b"\r\n", "500 5.5.2 line too long", "COMMAND LENGTH LIMIT"),
])
def test_anomalies_in_the_log(server, decisions, send, reply, tag):
    """smtpconn's anomaly tags reach the log as one key=value line naming
    the client (docs/behaviour/smtp.md#command-lines bare LF,
    docs/behaviour/differences.md#smtp-commands / RFC 5321 line length)."""
    c = session(server.port)
    c.send(send)
    assert first(c.reply()) == reply
    c.close()
    lines = [l for l in decisions() if l.startswith("anomaly=")]
    assert any(l.startswith(f'anomaly="{tag}" client=unknown[127.0.0.1]:') for l in lines), lines


def test_tcp_smtp_deny_553_at_rcpt(start, decisions):
    """docs/behaviour/tcp-smtp.md#denied-clients: with --deny rcpt a `deny` client is refused
    at every RCPT, 553 5.7.1."""
    server = start(deny="rcpt")
    c = session(server.port, DENIED)
    assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    assert first(c.cmd("RCPT TO:<user@example.com>")) == "553 5.7.1 sorry, your client address is not allowed here"
    assert first(c.cmd("RCPT TO:<postmaster@example.com>"))[:3] == "553"
    c.close()
    rc = [line for line in decisions() if "stage=RCPT" in line]
    assert len(rc) == 2
    assert all("reason=client_denied rule=tcp.smtp:2 " in line for line in rc), rc


def test_relayclient_relays_and_badmailfrom_still_applies(server):
    """docs/behaviour/tcp-smtp.md#settings RELAYCLIENT: rcpthosts and recipients skipped,
    badmailfrom kept."""
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
    """docs/behaviour/tcp-smtp.md#settings: RELAYCLIENT="@fixme" turns u@d into u@d@fixme
    for delivery."""
    c = session(server.port, SUFFIX)
    assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    assert first(c.cmd("RCPT TO:<u@elsewhere.test>")) == "250 2.1.5 ok"
    c.send(b"DATA\r\nSubject: s\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0] == 354 and c.reply()[0] == 250
    c.close()
    [raw] = read_new(server.maildir)
    # as an RFC 5321 path (the smtp: hop's RCPT TO too): the local part holds an @
    assert b'X-Envelope-To: <"u@elsewhere.test"@fixme>\n' in raw


def test_maxrecipients_452(server):
    """docs/behaviour/tcp-smtp.md#settings MAXRECIPIENTS, docs/behaviour/smtp.md#rcpt-checks #18:
    452 4.5.3 beyond the limit; the message goes to the accepted recipients only."""
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


def test_tarpit_does_not_block_the_loop(server, monkeypatch):
    """docs/behaviour/tcp-smtp.md#settings TARPITCOUNT/TARPITDELAY,
    docs/behaviour/smtp.md#rcpt-checks #11; docs/architecture.md#design-rules: while session 1 sits
    in its tarpit (2 s), session 2 runs a whole transaction. Ordering is checked via events,
    not by timing."""
    in_tarpit = threading.Event()
    real = SMTPProtocol._sleep

    async def spy(self, seconds):
        assert seconds == self.session.policy.profile.tarpit_delay > 0   # the client's TARPITDELAY
        in_tarpit.set()
        return await real(self, seconds)

    monkeypatch.setattr(SMTPProtocol, "_sleep", spy)
    order = []
    c1 = session(server.port, TARPIT)
    assert first(c1.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    assert first(c1.cmd("RCPT TO:<user@example.com>")) == "250 2.1.5 ok"   # count 1: no delay
    c1.send(b"RCPT TO:<u2@example.com>\r\n")
    assert in_tarpit.wait(TIMEOUT)

    # session 2 from a client without tarpit: its replies come while c1 waits
    with smtp(server.port) as s:
        s.ehlo("two.test")
        assert s.mail("b@sender.test")[0] == 250
        assert s.rcpt("user@example.com")[0] == 250
        assert s.data(b"Subject: 2\r\n\r\nsecond\r\n")[0] == 250
    order.append("session 2 done")
    r = c1.reply()
    order.append("session 1 tarpit reply")
    assert first(r) == "250 2.1.5 ok"
    assert order == ["session 2 done", "session 1 tarpit reply"]
    c1.close()
    assert len(read_new(server.maildir)) == 1


# ------------------------------------------------------------------ DNS
DNS_TABLE = {
    ("ok.test", "MX"): ["10 mx.ok.test."],
    ("ok.test", "A"): ["192.0.2.10"],
    ("mxonly.test", "MX"): ["10 mx.elsewhere.test."],
    ("aonly.test", "A"): ["192.0.2.11"],
    ("nullmx.test", "MX"): ["0 ."],
    ("nullmx.test", "A"): ["192.0.2.12"],
    "nx.test": "NXDOMAIN",
    "fail.test": "SERVFAIL",
    ("nodata.test", "TXT"): ['"v=spf1 -all"'],
}


@pytest.fixture
def dns_server(start):
    with DnsResponder(DNS_TABLE) as dns:
        srv = start(resolver=Resolver(dns.address, timeout=3.0))
        srv.dns = dns
        yield srv


@pytest.mark.parametrize("domain,expect", [
    ("ok.test", "250 2.1.5 ok"),
    ("aonly.test", "250 2.1.5 ok"),                     # implicit MX (RFC 5321 §5.1)
    ("nx.test", "553 5.1.8 sorry, your envelope sender must exist"),
    # RFC 7505 §4.2: the domain exists but takes no mail
    ("nullmx.test", "550 5.7.27 sorry, your envelope sender domain takes no mail (null MX)"),
    ("nodata.test", "553 5.1.8 sorry, your envelope sender must exist"),
    ("fail.test", "451 4.4.3 DNS temporary failure"),
])
def test_mfdnscheck(dns_server, decisions, domain, expect):
    """docs/behaviour/tcp-smtp.md#settings MFDNSCHECK, docs/behaviour/smtp.md#rcpt-checks #8,
    docs/behaviour/smtp.md#replies (5.1.8 / 4.4.3): the MX lookup is
    started at MAIL and decided at RCPT, via the server's dnspython resolver."""
    c = session(dns_server.port, MFDNS)
    c.send(f"MAIL FROM:<someone@{domain}>\r\nRCPT TO:<user@example.com>\r\n".encode())
    assert first(c.reply()) == "250 2.1.0 ok"
    assert first(c.reply()) == expect
    assert first(c.cmd("NOOP")) == "250 2.0.0 ok"
    c.close()
    assert (domain, "MX") in dns_server.dns.queries
    if expect[0] != "2":
        [line] = [l for l in decisions() if "stage=RCPT" in l]
        reason = {"451": "mf_dns_temp", "550": "mf_dns_null_mx", "553": "mf_dns"}[expect[:3]]
        assert f"reason={reason} rule=tcp.smtp:" in line


def test_mfdnscheck_not_for_other_clients(dns_server):
    """MFDNSCHECK is a per-client setting (docs/behaviour/tcp-smtp.md#settings): no
    lookup without it."""
    c = session(dns_server.port, PLAIN)
    c.send(b"MAIL FROM:<someone@nx.test>\r\nRCPT TO:<user@example.com>\r\n")
    assert [first(r) for r in c.replies(2)] == ["250 2.1.0 ok", "250 2.1.5 ok"]
    c.close()
    assert dns_server.dns.queries == []


@pytest.mark.parametrize("source,helo,expect,query", [
    (HELO_A, "ok.test", "250 2.1.5 ok", ("ok.test", "A")),
    (HELO_A, "aonly.test", "250 2.1.5 ok", ("aonly.test", "A")),
    (HELO_A, "nx.test", "550 5.7.1 sorry, invalid HELO/EHLO greeting", ("nx.test", "A")),
    (HELO_A, "mxonly.test", "550 5.7.1 sorry, invalid HELO/EHLO greeting", ("mxonly.test", "AAAA")),
    (HELO_A, "fail.test", "451 4.4.3 DNS temporary failure", ("fail.test", "A")),
    (HELO_M, "mxonly.test", "250 2.1.5 ok", ("mxonly.test", "MX")),
    # qmail's dns_mxip: an A record stands in for a missing MX (spamcontrol
    # dnsq(helohost, "M")); outbound hosts rarely have an MX of their own
    (HELO_M, "aonly.test", "250 2.1.5 ok", ("aonly.test", "A")),
    (HELO_M, "nullmx.test", "550 5.7.1 sorry, invalid HELO/EHLO greeting", ("nullmx.test", "MX")),
    (HELO_M, "nx.test", "550 5.7.1 sorry, invalid HELO/EHLO greeting", ("nx.test", "MX")),
])
def test_helocheck_a_and_m(dns_server, source, helo, expect, query):
    """docs/behaviour/tcp-smtp.md#settings HELOCHECK A/M, docs/behaviour/tcp-smtp.md#settings (DNS
    hard failure -> reject at RCPT, soft failure -> 451), docs/behaviour/smtp.md#rcpt-checks #7."""
    c = session(dns_server.port, source, helo=helo)
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\n")
    assert first(c.reply()) == "250 2.1.0 ok"
    assert first(c.reply()) == expect
    c.close()
    assert query in dns_server.dns.queries


@pytest.mark.parametrize("source,helo,sender,expect", [
    (MFDNS, "client.test", "a@[192.0.2.1]", "250 2.1.5 ok"),
    (MFDNS, "client.test", "a@[IPv6:2001:db8::1]", "250 2.1.5 ok"),
    (MFDNS, "client.test", "a@[999.0.0.1]", "553 5.1.8 sorry, your envelope sender must exist"),
    (HELO_A, "[192.0.2.1]", "a@sender.test", "250 2.1.5 ok"),
    (HELO_M, "[IPv6:2001:db8::1]", "a@sender.test", "250 2.1.5 ok"),
    (HELO_A, "[1.2.3]", "a@sender.test", "550 5.7.1 sorry, invalid HELO/EHLO greeting"),
])
def test_address_literals_need_no_dns(dns_server, source, helo, sender, expect):
    """RFC 5321 §4.1.3/§4.1.4: address literals in the sender or the HELO are
    judged without a lookup (qmail's ip_scanbracket); they used to be sent
    to DNS as names, got NXDOMAIN and a permanent refusal."""
    c = session(dns_server.port, source, helo=helo)
    c.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<user@example.com>\r\n".encode())
    assert first(c.reply()) == "250 2.1.0 ok"
    assert first(c.reply()) == expect
    c.close()
    assert dns_server.dns.queries == []


def test_dns_unreachable_resolver_is_temporary(start):
    """docs/behaviour/tcp-smtp.md#settings / dnscheck: a resolver that never answers ->
    451, not 5xx."""
    with DnsResponder({"x.test": "DROP"}) as dns:
        srv = start(resolver=Resolver(dns.address, timeout=0.5))
        c = session(srv.port, MFDNS)
        c.send(b"MAIL FROM:<a@x.test>\r\nRCPT TO:<user@example.com>\r\n")
        assert [first(r) for r in c.replies(2)] == ["250 2.1.0 ok", "451 4.4.3 DNS temporary failure"]
        c.close()


# ------------------------------------------------------------------ DATA
def test_dot_stuffing_round_trip(server):
    """docs/behaviour/smtp.md#data transparency: `..x` -> `.x`, CRLF -> LF, a lone CR kept."""
    c = session(server.port)
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    assert [r[0] for r in c.replies(3)] == [250, 250, 354]
    c.send(MESSAGE)
    assert c.reply()[0] == 250
    c.close()
    [raw] = read_new(server.maildir)
    assert stored_body(raw) == (b"From: a@sender.test\nTo: user@example.com\nSubject: test\n\n"
                                b"hello\n.leading dot\n..two dots\n")


def test_dot_stuffing_round_trip_smtplib(server):
    """smtplib stuffs, the server unstuffs: what was sent is what is stored."""
    body = "Subject: dots\r\n\r\n.\r\n..\r\n.x\r\nend.\r\n"
    with smtp(server.port) as s:
        s.ehlo("c.test")
        assert s.sendmail("a@sender.test", ["user@example.com"], body) == {}
    [raw] = read_new(server.maildir)
    assert raw.endswith(b"Subject: dots\n\n.\n..\n.x\nend.\n")


@pytest.mark.parametrize("payload", [
    b"Subject: s\r\n\r\nhello\n.\r\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n",
    b"Subject: s\r\n\r\nhello\r\n.\nMAIL FROM:<evil@x.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\nsmuggled\r\n.\r\n",
    b"Subject: s\r\n\r\nbare\nlf\r\n.\r\n",
], ids=["LF.CRLF", "CRLF.LF", "bare-LF"])
def test_smuggling_and_bare_lf_451_close_nothing_stored(server, payload):
    """docs/behaviour/differences.md#smtp-commands, docs/behaviour/smtp.md#data (SMTP smuggling): a
    bare LF in DATA -> 451 and the connection is dropped; nothing reaches new/, nothing is
    left in tmp/."""
    c = session(server.port)
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    assert [r[0] for r in c.replies(3)] == [250, 250, 354]
    c.send(payload)
    assert first(c.reply()) == "451 4.5.2 See https://cr.yp.to/docs/smtplf.html."
    assert c.at_eof()           # no reply to any smuggled command
    assert c.buf == b""
    c.close()
    server.wait_lost()
    assert maildir_files(server.maildir) == []
    assert maildir_files(server.maildir, "tmp") == []


def test_databytes_exceeded_streamed_552(server):
    """docs/behaviour/smtp.md#data databytes (per-client DATABYTES,
    docs/behaviour/tcp-smtp.md#settings), docs/behaviour/smtp.md#replies 552 5.3.4: a
    message far larger than the limit is streamed; 552 after the end of data,
    nothing stored, the session goes on. EHLO advertises SIZE 2000
    (docs/behaviour/smtp.md#greeting-and-ehlo)."""
    c = RawClient(server.port, SMALL)
    assert c.reply()[0] == 220
    code, lines = c.cmd("EHLO big.test")
    assert "SIZE 2000" in lines
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    assert [r[0] for r in c.replies(3)] == [250, 250, 354]
    c.send(b"Subject: big\r\n\r\n")
    line = b"x" * 998 + b"\r\n"
    for _ in range(1000):            # ~1 MB, 500x the limit
        c.send(line * 1)
    c.send(b".\r\n")
    assert first(c.reply()) == "552 5.3.4 sorry, that message size exceeds my databytes limit"
    assert first(c.cmd("NOOP")) == "250 2.0.0 ok"
    c.close()
    server.wait_lost()
    assert maildir_files(server.maildir) == []
    assert maildir_files(server.maildir, "tmp") == []


def test_a_9_mb_header_line_is_cut_at_the_header_limit(start):
    """docs/behaviour/smtp.md#data header size (Postfix header_size_limit): a
    9 MB header line over a real socket is stored as the header block's first
    102,400 octets and a LF; the rest of the header is dropped, the body kept,
    the message accepted (--header-size-limit 102400, serve's default)."""
    server = start(limits=Limits(header_size_limit=102_400))
    c = session(server.port)
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    assert [r[0] for r in c.replies(3)] == [250, 250, 354]
    c.send(b"Subject: huge\r\nX-Huge: ")
    chunk = b"h" * (1 << 20)
    for _ in range(9):
        c.send(chunk)
    c.send(b"\r\nTo: user@example.com\r\n\r\nthe body\r\n.\r\n")
    assert c.reply()[0] == 250
    c.close()
    [raw] = read_new(server.maildir)
    head, sep, body = stored_body_from(raw, b"\nSubject: huge").partition(b"\n\n")
    assert sep and body == b"the body\n"
    assert len(head) == 102_400 and head.endswith(b"hhh")


def stored_body_from(raw: bytes, marker: bytes) -> bytes:
    """The message as the client sent it: from `marker` (after our headers) on."""
    i = raw.index(marker)
    return raw[i + 1:]


def test_databytes_exact_limit_accepted(server):
    """docs/behaviour/smtp.md#data: exactly databytes octets (as stored) are accepted."""
    c = session(server.port, SMALL)
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    assert [r[0] for r in c.replies(3)] == [250, 250, 354]
    body = b"S: x\n\n" + b"y" * (2000 - 6 - 1) + b"\n"
    assert len(body) == 2000
    c.send(body.replace(b"\n", b"\r\n") + b".\r\n")
    assert c.reply()[0] == 250
    c.close()
    [raw] = read_new(server.maildir)
    assert raw.endswith(body)


def test_size_parameter_too_big_552_at_mail(server):
    """docs/behaviour/smtp.md#mail-parameters SIZE (RFC 1870): MAIL ... SIZE=m with m > databytes
    -> 552 5.3.4."""
    c = session(server.port, SMALL)
    assert first(c.cmd("MAIL FROM:<a@sender.test> SIZE=2001")) == \
        "552 5.3.4 sorry, that message size exceeds my databytes limit"
    assert first(c.cmd("MAIL FROM:<a@sender.test> SIZE=2000")) == "250 2.1.0 ok"
    c.close()


@pytest.mark.parametrize("hops,expect", [(99, 250), (100, 554)])
def test_hop_count(server, hops, expect):
    """docs/behaviour/smtp.md#data hop counting: >= 100 Received/Delivered lines -> 554 5.4.6."""
    c = session(server.port)
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    assert [r[0] for r in c.replies(3)] == [250, 250, 354]
    head = b"".join(b"Received: from h%d by h%d\r\n" % (i, i + 1) for i in range(hops))
    c.send(head + b"Subject: loop\r\n\r\nbody\r\n.\r\n")
    r = c.reply()
    assert r[0] == expect
    if expect == 554:
        assert first(r) == "554 5.4.6 too many hops, this message is looping"
    c.close()
    server.wait_lost()
    assert len(maildir_files(server.maildir)) == (1 if expect == 250 else 0)
    assert maildir_files(server.maildir, "tmp") == []


EXE_B64 = (b"TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\n"
           b"AAAAgAAAAA4fug4AtAnNIbgBTM0hVGhpcyBwcm9ncmFtIGNhbm5vdCBiZSBydW4gaW4gRE9TIG1v\r\n")


def mime_message(b64: bytes) -> bytes:
    return (b"Subject: invoice\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n"
            b"--XX\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n"
            b"--XX\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + b64 + b"--XX--\r\n.\r\n")


@pytest.mark.parametrize("source,b64,expect,rule", [
    (CONTENT, EXE_B64, 554, "rule=badmimetypes:1 "),
    (CONTENT, b"AAAAMi5kbGwAAAAA\r\n", 554, "rule=badloadertypes:1 "),
    (CONTENT, b"SGVsbG8gd29ybGQK\r\n", 250, None),
    (PLAIN, EXE_B64, 250, None),            # BADMIMETYPE not set for this client
])
def test_badmimetypes_badloadertypes(server, decisions, source, b64, expect, rule):
    """docs/behaviour/tcp-smtp.md#settings BADMIMETYPE/BADLOADERTYPE,
    docs/behaviour/smtp.md#content-checks content filters: an MZ attachment -> 554 5.3.2 and
    nothing stored, the rule in the log line."""
    c = session(server.port, source)
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    assert [r[0] for r in c.replies(3)] == [250, 250, 354]
    c.send(mime_message(b64))
    r = c.reply()
    assert r[0] == expect
    c.close()
    server.wait_lost()
    if expect == 554:
        assert first(r) == "554 5.3.2 sorry, invalid message content"
        assert maildir_files(server.maildir) == []
        [line] = [l for l in decisions() if "stage=DATA" in l]
        assert line.startswith("action=reject stage=DATA " + rule), line
    else:
        assert len(maildir_files(server.maildir)) == 1
    assert maildir_files(server.maildir, "tmp") == []


@pytest.mark.parametrize("setting,body,expect,rule", [
    # docs/behaviour/tcp-smtp.md#settings: "!" rejects whitespace in base64 lines even with no
    # signature file at all (it used to make no scanner: the check was off)
    ('BADMIMETYPE="!"', b"AAAA AAAA\r\n", 554, "rule=tcp.smtp:1 "),   # the setting's line
    ('BADMIMETYPE="!"', b"AAAAAAAA\r\n", 250, None),
    # docs/behaviour/smtp.md#content-checks: BADLOADERTYPE=c looks only at windows starting with c
    ('BADLOADERTYPE="T"', b"AAAAMi5kbGwAAAAA\r\n", 250, None),
    ('BADLOADERTYPE="M"', b"AAAAMi5kbGwAAAAA\r\n", 554, "rule=badloadertypes:1 "),
])
def test_content_settings_without_a_mime_list(start, tmp_path, decisions, setting, body, expect, rule):
    rules = write_rules(tmp_path / "nolists", {"tcp.smtp": f"127.0.0.1:allow,{setting}\n:allow\n"},
                        remove=["badmimetypes"])
    srv = start(rules=rules)
    c = session(srv.port)
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    assert [r[0] for r in c.replies(3)] == [250, 250, 354]
    c.send(mime_message(body))
    r = c.reply()
    assert r[0] == expect, r
    c.close()
    srv.wait_lost()
    if expect == 554:
        assert first(r) == "554 5.3.2 sorry, invalid message content"
        [line] = [l for l in decisions() if "stage=DATA" in l]
        assert line.startswith("action=reject stage=DATA " + rule), line
    assert len(maildir_files(srv.maildir)) == (expect == 250)


@pytest.mark.parametrize("how", ["close", "reset"])
def test_connection_lost_in_data_leaves_nothing(server, how):
    """docs/behaviour/delivery.md#250-means-stored: a client that goes away mid-message
    gets nothing stored; the aborted tmp/ file is removed (no leftovers)."""
    c = session(server.port)
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    assert [r[0] for r in c.replies(3)] == [250, 250, 354]
    c.send(b"Subject: cut\r\n\r\n" + b"z" * 200_000 + b"\r\nmore")
    if how == "reset":
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    server.wait_lost()
    assert maildir_files(server.maildir) == []
    assert maildir_files(server.maildir, "tmp") == []
    assert server.state.connections == 0 and not server.state.per_ip


# ------------------------------------------------------------------ delivery failures
def _one_message(port, source=PLAIN) -> tuple[int, list[str]]:
    c = session(port, source)
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    assert [r[0] for r in c.replies(3)] == [250, 250, 354]
    c.send(b"Subject: fwd\r\n\r\n..dot\r\nbody\r\n.\r\n")
    r = c.reply()
    assert first(c.cmd("NOOP")) == "250 2.0.0 ok"      # the session survives
    c.close()
    return r


def test_discard_commit_answers_at_once_and_pipelined_input_goes_on(start, monkeypatch):
    """A sink that needs no I/O (discard) is committed inside data_received
    (Sink.commit_now): its 250 and the replies to commands pipelined after
    the end of data leave together, and commit() is never awaited."""
    from mailfilter import delivery

    async def awaited(self):
        raise AssertionError("commit() awaited although commit_now() answered")

    monkeypatch.setattr(delivery.base.FixedResultSink, "commit", awaited)
    srv = start(deliver="discard")
    c = session(srv.port)
    txn = b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n"
    c.send(txn)
    assert [r[0] for r in c.replies(3)] == [250, 250, 354]
    c.send(b"Subject: one\r\n\r\nbody\r\n.\r\n" + txn)
    got = c.replies(4)
    assert [r[0] for r in got] == [250, 250, 250, 354]
    assert first(got[0]).startswith("250 2.0.0 ok ")
    c.send(b"Subject: two\r\n\r\nbody\r\n.\r\n")
    assert c.reply()[0] == 250
    assert first(c.cmd("QUIT")).startswith("221")
    c.close()


def test_commit_now_failure_is_451_and_the_session_goes_on(start, monkeypatch):
    """docs/behaviour/delivery.md#250-means-stored: a commit that raises, even one answered
    without waiting, is 451 (never 250), and the session stays usable."""
    from mailfilter import delivery

    def boom(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(delivery.base.FixedResultSink, "commit_now", boom)
    srv = start(deliver="discard")
    assert first(_one_message(srv.port)) == "451 4.3.0 temporary failure storing message"


def test_sink_commit_now_contract(tmp_path):
    """commit_now(): discard answers once; a sink that needs I/O says None
    (the server then awaits commit()); spooled sinks are untouched by it."""
    import asyncio

    from mailfilter.delivery import Delivery, Envelope
    env = Envelope("a@b.test", ["c@d.test"], "h", "127.0.0.1", "unknown", None, False, "mx")
    sink = Delivery.from_spec("discard").open(env)
    result = sink.commit_now()
    assert result.ok and result.reply.code == 250
    with pytest.raises(RuntimeError):
        sink.commit_now()
    md = Delivery.from_spec(f"maildir:{tmp_path}/md").open(env)
    md.write(b"Subject: x\n\nbody\n")
    assert md.commit_now() is None
    assert asyncio.run(md.commit()).ok
    assert len(os.listdir(tmp_path / "md" / "new")) == 1


@pytest.mark.parametrize("script,expect", [
    ({}, "250"),
    ({"eod": "451 4.3.0 try later"}, "451"),
    ({"mail": "421 4.3.2 shutting down"}, "451"),
    ({"greeting": "drop"}, "451"),
    ({"eod": "554 5.7.1 spam"}, "554"),
])
def test_downstream_smtp_replies(start, script, expect):
    """docs/behaviour/delivery.md#250-means-stored: forwarding to a downstream MTA answers
    250 only after its 250; a downstream temp failure (or a dropped connection) -> 451, so the
    client retries; a downstream 5xx for the message -> 554."""
    from tests.support.smtp_peer import Peer
    peer = Peer(script=script)
    probe = start(deliver="discard")           # a loop to run the peer on
    probe.call(peer.__aenter__())
    try:
        srv = start(deliver=f"smtp:127.0.0.1:{peer.port}")
        r = _one_message(srv.port)
        assert str(r[0]) == expect, r
        if expect == "250":
            assert peer.sessions[0].message.endswith(b"Subject: fwd\n\n.dot\nbody\n")
            assert peer.sessions[0].wire.endswith(b"Subject: fwd\r\n\r\n..dot\r\nbody\r\n.\r\n")
            assert "MAIL FROM:<a@sender.test>" in peer.sessions[0].commands
        elif expect == "451":
            assert r[1][-1].startswith("4.")
    finally:
        probe.call(peer.__aexit__(None, None, None))


def test_unwritable_spool_451(start, tmp_path):
    """docs/behaviour/delivery.md#250-means-stored / docs/behaviour/delivery.md#maildir: a maildir
    that cannot be written (its parent is a regular file) -> 451 after DATA; never 250."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory\n")
    srv = start(deliver=f"maildir:{blocker}/spool")
    r = _one_message(srv.port)
    assert first(r) == "451 4.3.0 temporary failure storing message"
    assert blocker.read_text() == "not a directory\n"


def test_internal_error_421_on_that_connection_only(start, monkeypatch):
    """docs/architecture.md#errors-and-logging: an internal error -> traceback logged,
    421 4.3.0 on that connection only; the next connection is served normally."""
    srv = start()
    real = srv.state.delivery.open
    calls = []

    def boom(env):
        calls.append(env)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return real(env)

    monkeypatch.setattr(srv.state.delivery, "open", boom)
    c = session(srv.port)
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    assert [r[0] for r in c.replies(2)] == [250, 250]
    assert first(c.reply()) == "421 4.3.0 mx.test internal error, closing connection"
    assert c.at_eof()
    c.close()
    assert _one_message(srv.port)[0] == 250
    assert len(read_new(srv.maildir)) == 1


# ------------------------------------------------------------------ timeouts
def test_idle_timeout_421(start, decisions):
    """docs/operations.md#limits-and-timeouts server timeouts (configurable; qmail
    timeoutsmtpd): a silent client gets 421 4.4.2 and is disconnected."""
    srv = start(limits=Limits(idle_timeout=0.5))
    c = session(srv.port)
    assert first(c.cmd("NOOP")) == "250 2.0.0 ok"
    assert first(c.reply()) == "421 4.4.2 mx.test timeout, closing connection"
    assert c.at_eof()
    c.close()
    srv.wait_lost()
    assert any("action=close reason=timeout" in l for l in decisions())


def test_idle_timeout_in_data_removes_tmp(start):
    """An idle timeout in the middle of DATA leaves nothing in new/ or tmp/."""
    srv = start(limits=Limits(idle_timeout=0.5))
    c = session(srv.port)
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n")
    assert [r[0] for r in c.replies(3)] == [250, 250, 354]
    c.send(b"Subject: slow\r\n\r\npartial")
    assert first(c.reply()) == "421 4.4.2 mx.test timeout, closing connection"
    assert c.at_eof()
    c.close()
    srv.wait_lost()
    assert maildir_files(srv.maildir) == [] and maildir_files(srv.maildir, "tmp") == []


def test_session_deadline_421(start, decisions):
    """A session that stays busy still ends at the total deadline: 421 4.4.2."""
    srv = start(limits=Limits(idle_timeout=60, session_deadline=0.5))
    c = session(srv.port)
    assert first(c.reply()) == "421 4.4.2 mx.test session too long, closing connection"
    assert c.at_eof()
    c.close()
    assert any("action=close reason=session_deadline" in l for l in decisions())


# ------------------------------------------------------------------ connection caps
def test_session_deadline_421_while_the_client_keeps_busy(start, decisions):
    """The idle timer and the deadline share one timer: activity keeps
    re-arming the idle check, yet the deadline still ends the session."""
    srv = start(limits=Limits(idle_timeout=0.4, session_deadline=1.0))
    c = session(srv.port)
    replies = []
    for _ in range(40):                      # bounded: ~0.1 s apart, 4 s at most
        r = c.cmd("NOOP")
        replies.append(first(r))
        if r[0] != 250:
            break
        threading.Event().wait(0.1)
    assert replies[-1] == "421 4.4.2 mx.test session too long, closing connection"
    assert all(r == "250 2.0.0 ok" for r in replies[:-1]) and len(replies) > 4
    assert c.at_eof()
    c.close()
    assert any("action=close reason=session_deadline" in l for l in decisions())
    assert not any("reason=timeout" in l for l in decisions())


def test_notorious_session_processes_nothing_after_its_503(start, tmp_path, decisions):
    """docs/behaviour/smtp.md#data: TARPITDELAY=999 -> DATA gets 503 and the session ends.
    Commands pipelined behind DATA are neither answered nor run through the
    policy (they used to produce decision lines for replies never sent)."""
    rules = write_rules(tmp_path / "notorious",
                        {"tcp.smtp": '127.0.0.1:allow,TARPITCOUNT="1",TARPITDELAY="999"\n:allow\n'})
    srv = start(rules=rules)
    c = session(srv.port)
    c.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<user@example.com>\r\n"
           b"RCPT TO:<nobody@example.com>\r\nRCPT TO:<x@example.com>\r\nDATA\r\n"
           b"MAIL FROM:<after-close@example.org>\r\nRCPT TO:<u2@example.com>\r\n")
    replies = c.replies(5)
    assert first(replies[-1]) == "503 5.5.1 DATA command not accepted at this time"
    assert c.at_eof()
    c.close()
    srv.wait_lost()
    assert not [line for line in decisions() if "after-close" in line or "u2@" in line]


def test_a_client_that_never_reads_loses_its_slot(start):
    """A client that pipelines and never reads fills the server's buffers;
    close() alone would wait for them to drain forever and the connection
    would keep its max_per_ip slot. After the idle timeout (421) it gets one
    more idle timeout to read, then the connection is aborted."""
    srv = start(limits=Limits(idle_timeout=0.5, session_deadline=60, max_per_ip=1))
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", srv.port))
    s.setblocking(False)
    chunk = b"NOOP\r\n" * 2000
    blocked_since = None
    deadline = time.monotonic() + 20                  # bounded
    while time.monotonic() < deadline:
        try:
            s.send(chunk)
            blocked_since = None
        except BlockingIOError:                       # the server stopped reading
            blocked_since = blocked_since or time.monotonic()
            if time.monotonic() - blocked_since > 0.3:
                break
            threading.Event().wait(0.02)
    assert blocked_since is not None, "the server never pushed back"
    srv.wait_lost(timeout=10)                         # 0.5 s idle + 0.5 s grace, with margin
    with RawClient(srv.port) as c:                    # the per-IP slot is free again
        assert c.reply()[0] == 220
    s.close()


def test_back_pressure_survives_an_async_reply(start):
    """A delivery (async commit) finishing used to resume reading although
    the write side was still paused, and the transport never paused it again:
    a client that pipelines transactions and HELPs and never reads made the
    server buffer replies without limit (127 MB in 30 s). Reading now stays
    paused while the write buffer is full: the buffer stays near its
    high-water mark, the client is pushed back, the idle timeout ends it."""
    srv = start(limits=Limits(idle_timeout=1.0, session_deadline=60, max_per_ip=1))
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)       # never read
    s.connect(("127.0.0.1", srv.port))
    s.setblocking(False)
    txn = (b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\nDATA\r\n"
           b"Subject: x\r\n\r\nhi\r\n.\r\n")
    mixed, helps = (txn + b"HELP\r\n" * 400) * 20, b"HELP\r\n" * 20000
    peak, blocked_since, pending = 0, None, b""
    t0 = time.monotonic()
    while time.monotonic() - t0 < 15:                            # bounded
        if not pending:
            pending = mixed if time.monotonic() - t0 < 3 else helps
        try:
            pending = pending[s.send(pending):]
            blocked_since = None
        except BlockingIOError:
            blocked_since = blocked_since or time.monotonic()
            if time.monotonic() - t0 > 3 and time.monotonic() - blocked_since > 0.5:
                break
            threading.Event().wait(0.005)
        except ConnectionError:
            break                                                # closed by the idle timeout
        if srv.connections and srv.connections[-1].transport is not None:
            peak = max(peak, srv.connections[-1].transport.get_write_buffer_size())
    assert peak < 8 << 20, f"server buffered {peak} bytes of replies"
    srv.wait_lost(timeout=10)
    s.close()


def test_a_new_helo_cancels_the_previous_lookup(dns_server):
    """One HELOCHECK lookup per session at a time: 50 pipelined EHLOs used
    to leave 49 queries running after the session was gone."""
    c = session(dns_server.port, HELO_A, helo="fail.test")
    c.send(b"".join(b"EHLO h%d.fail.test\r\n" % i for i in range(50)) + b"QUIT\r\n")
    replies = c.replies(51)
    assert replies[-1][0] == 221
    c.close()
    dns_server.wait_lost()
    assert dns_server.call(_live_lookups()) == 0


async def _live_lookups() -> int:
    import asyncio
    await asyncio.sleep(0)
    return sum(1 for t in asyncio.all_tasks()
               if "Resolver.check" in repr(t.get_coro()) and not t.done())


def test_swapped_limits_apply_to_new_sessions_only(start, rules_dir):
    """SIGHUP reload (ServerState.swap_policy with the Limits made from the
    new rules): a new session gets the new idle timeout, a session in
    flight keeps the one it started with."""
    from tests.support.server_harness import policy_for

    srv = start(limits=Limits(idle_timeout=60))
    old = session(srv.port)

    async def swap():
        srv.state.swap_policy(policy_for(rules_dir), Limits(idle_timeout=0.3))

    srv.call(swap())
    new = session(srv.port)
    assert first(new.reply()) == "421 4.4.2 mx.test timeout, closing connection"
    new.close()
    assert first(old.cmd("NOOP")) == "250 2.0.0 ok"
    assert srv.state.limits.idle_timeout == 0.3 and srv.connections[0].limits.idle_timeout == 60
    old.close()


def test_global_connection_cap_421(start, decisions):
    """docs/operations.md#limits-and-timeouts: over max_connections -> 421 4.7.0 at connect."""
    srv = start(limits=Limits(max_connections=2))
    a, b = session(srv.port), session(srv.port, RELAY)
    c = RawClient(srv.port, MAXRCPT)
    assert first(c.reply()) == "421 4.7.0 mx.test too many connections, try again later"
    assert c.at_eof()
    c.close()
    a.close()
    srv.wait_lost(2)     # the refused one and `a`
    d = session(srv.port)            # a slot is free again
    assert first(d.cmd("NOOP")) == "250 2.0.0 ok"
    for x in (b, d):
        x.close()
    assert any("action=refuse stage=CONNECT reason=max_connections" in l for l in decisions())


def test_per_ip_connection_cap_421(start):
    """Over max_per_ip from one address -> 421 4.7.0; other addresses are served."""
    srv = start(limits=Limits(max_per_ip=1))
    a = session(srv.port)
    c = RawClient(srv.port)
    assert first(c.reply()) == "421 4.7.0 mx.test too many connections from your address, try again later"
    assert c.at_eof()
    c.close()
    b = session(srv.port, RELAY)
    assert first(b.cmd("NOOP")) == "250 2.0.0 ok"
    a.close()
    b.close()
    srv.wait_lost(3)
    assert srv.state.connections == 0 and dict(srv.state.per_ip) == {}


def test_idle_timeout_fires_on_time_after_activity(start):
    """The idle timer is re-armed lazily after reads; it must still fire at
    last read + idle_timeout. Checked by ordering two server timers, not by
    timing: idle 0.5 s after a NOOP must beat the 1.2 s session deadline
    (a re-arm with a 1 s floor fired at ~1.5 s, after the deadline)."""
    srv = start(limits=Limits(idle_timeout=0.5, session_deadline=1.2))
    c = session(srv.port)
    assert first(c.cmd("NOOP")) == "250 2.0.0 ok"
    assert first(c.reply()) == "421 4.4.2 mx.test timeout, closing connection"
    c.close()


# ------------------------------------------------------------------ real third-party clients
import shutil
import subprocess

SWAKS = shutil.which("swaks")
SMTP_SOURCE = "/usr/sbin/smtp-source" if os.access("/usr/sbin/smtp-source", os.X_OK) else None


@pytest.mark.skipif(SWAKS is None, reason="swaks not installed (apt-get install swaks; see .ci/run)")
@pytest.mark.parametrize("pipelining", [False, True])
def test_swaks(server, pipelining):
    """docs/architecture.md#tests-and-benches: a real client (swaks), with and without PIPELINING
    (docs/behaviour/smtp.md#command-lines)."""
    args = [SWAKS, "--server", f"127.0.0.1:{server.port}", "--ehlo", "swaks.test",
            "--from", "a@sender.test", "--to", "user@example.com,u2@example.com",
            "--header", "Subject: swaks test", "--body", "hello from swaks\n.dot line\n",
            "--timeout", "10"]
    if pipelining:
        args.append("--pipeline")
    r = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "<-  250 2.0.0 ok " in r.stdout
    assert "<-  221 2.0.0 mx.test" in r.stdout
    [raw] = read_new(server.maildir)
    assert b"X-Envelope-To: <user@example.com>\nX-Envelope-To: <u2@example.com>\n" in raw
    assert b"Subject: swaks test\n" in raw and b"\n\nhello from swaks\n.dot line\n" in raw
    # a policy rejection seen by swaks: exit code 24 = "RCPT TO" failed
    r = subprocess.run([SWAKS, "--server", f"127.0.0.1:{server.port}", "--from", "spammer@example.org",
                        "--to", "user@example.com", "--timeout", "10"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 24, r.stdout
    assert "<** 553 5.7.1 sorry, your envelope sender is in my badmailfrom list" in r.stdout


@pytest.mark.skipif(SMTP_SOURCE is None, reason="Postfix smtp-source not installed (apt-get install postfix; see .ci/run)")
@pytest.mark.parametrize("reuse", [False, True])
def test_postfix_smtp_source(server, reuse):
    """PEERS.md load generator as a functional client: 40 messages over 4
    concurrent sessions (-d: several messages per connection), all stored."""
    args = [SMTP_SOURCE, "-c", "-s", "4", "-m", "40", "-l", "2048", "-M", "source.test",
            "-f", "a@sender.test", "-t", "user@example.com"]
    if reuse:
        args.append("-d")
    r = subprocess.run(args + [f"127.0.0.1:{server.port}"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    files = maildir_files(server.maildir)
    assert len(files) == 40
    assert maildir_files(server.maildir, "tmp") == []
    raw = read_new(server.maildir)[0]
    assert b"(HELO source.test) (127.0.0.1)" in raw


# ------------------------------------------------------------------ DATA decision lines
def _data_line(decisions) -> str:
    [line] = [l for l in decisions() if "stage=DATA" in l]
    return line


def _send_message(port, source, body: bytes, rcpts=("user@example.com",), helo="client.test"):
    c = session(port, source, helo=helo)
    c.send(b"MAIL FROM:<a@sender.test>\r\n"
           + b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in rcpts) + b"DATA\r\n")
    assert [r[0] for r in c.replies(len(rcpts) + 2)] == [250] * (len(rcpts) + 1) + [354]
    c.send(body)
    r = c.reply()
    c.close()
    return r


def test_data_accept_line_names_helo_from_and_every_recipient(server, decisions):
    """docs/architecture.md#errors-and-logging: the DATA decision line names helo, from
    and to (all accepted recipients, one line per message)."""
    r = _send_message(server.port, PLAIN, b"Subject: x\r\n\r\nhi\r\n.\r\n",
                      rcpts=("user@example.com", "u2@example.com"))
    assert r[0] == 250
    server.wait_lost()
    line = _data_line(decisions)
    assert line.startswith("action=accept stage=DATA client=unknown[127.0.0.1]:"), line
    assert (" helo=<client.test> from=<a@sender.test> "
            'to="<user@example.com>,<u2@example.com>" size=') in line, line
    assert "rcpts=2 " in line


def test_data_size_reject_names_the_databytes_source(start, tmp_path, decisions):
    # DATABYTES from the client's tcp.smtp line -> that line; else the control file.
    srv = start()
    body = b"Subject: big\r\n\r\n" + b"x" * 3000 + b"\r\n.\r\n"
    assert _send_message(srv.port, SMALL, body)[0] == 552
    srv.wait_lost()
    line = _data_line(decisions)
    assert line.startswith("action=reject stage=DATA rule=tcp.smtp:9 reason=size_exceeded "), line
    assert " helo=<client.test> from=<a@sender.test> to=<user@example.com> " in line
    rules = write_rules(tmp_path / "rules500", {"databytes": "500\n"})
    srv = start(rules=rules)
    assert _send_message(srv.port, PLAIN, body)[0] == 552
    srv.wait_lost()
    line = [l for l in decisions() if "stage=DATA" in l][-1]
    assert line.startswith("action=reject stage=DATA rule=databytes reason=size_exceeded "), line
    assert " from=<a@sender.test> to=<user@example.com> " in line


def test_data_hops_and_bare_lf_lines(server, decisions):
    head = b"".join(b"Received: from h%d by h%d\r\n" % (i, i + 1) for i in range(100))
    assert _send_message(server.port, PLAIN, head + b"\r\nbody\r\n.\r\n")[0] == 554
    assert _send_message(server.port, PLAIN, b"Subject: x\n\nbare\n.\r\n")[0] == 451
    server.wait_lost(2)
    hops, bare = [l for l in decisions() if "stage=DATA" in l]
    assert hops.startswith("action=reject stage=DATA rule=maxhops reason=too_many_hops "), hops
    assert bare.startswith("action=tempfail stage=DATA reason=bare_lf "), bare   # a 451
    for line in (hops, bare):
        assert " helo=<client.test> from=<a@sender.test> to=<user@example.com> " in line
    # the server hangs up after the bare-LF 451, and says so with the reply it closed on
    (close,) = [l for l in decisions() if l.startswith("action=close")]
    assert close.startswith("action=close reason=bare_lf client=unknown[127.0.0.1]:"), close
    assert close.endswith('reply="451 4.5.2 See https://cr.yp.to/docs/smtplf.html."'), close


def test_commit_failure_line_names_the_transaction(start, monkeypatch, decisions):
    from mailfilter import delivery

    def boom(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(delivery.base.FixedResultSink, "commit_now", boom)
    srv = start(deliver="discard")
    assert first(_one_message(srv.port)) == "451 4.3.0 temporary failure storing message"
    srv.wait_lost()
    line = _data_line(decisions)
    assert line.startswith("action=tempfail stage=DATA reason=delivery_error client="), line
    assert " helo=<client.test> from=<a@sender.test> to=<user@example.com> " in line
