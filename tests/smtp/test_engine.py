"""mailfilter.smtp.engine: the sans-IO SMTP engine.

Every scenario goes through ``run(feed, ...)`` with ``feed`` parametrized over the
whole input, one byte at a time and random fragments; ``run`` also asserts that the
fragmented feeds give exactly the events (DataChunks joined) and output of the whole
feed (docs/architecture.md#tests-and-benches).
"""
from __future__ import annotations

import pytest

from mailfilter.smtp import engine
from mailfilter.smtp.replies import Reply, reply
from mailfilter.smtp.engine import (
    AUTH, CLOSED, DATA, IDLE, MAIL, NEED_DATA, PAUSED, RCPT, Anomaly, AuthResponse,
    AuthStart, Closed, DataChunk, DataEnd, DataStart, EngineConfig, EngineError, Helo,
    Help, Mail, MultiReply, Noop, Quit, Rcpt, Rset, SMTPConnection, Vrfy,
)
from mailfilter.smtp import events
from smtp_driver import CFG, FEEDS, App, feed_whole, run

GREETING = "220 mx.example.com ESMTP"
EHLO = [
    "250-mx.example.com",
    "250-PIPELINING",
    "250-CHUNKING",
    "250-SIZE 0",
    "250-8BITMIME",
    "250 ENHANCEDSTATUSCODES",
]


@pytest.fixture(params=list(FEEDS), ids=list(FEEDS))
def feed(request):
    return FEEDS[request.param]


def cfg(**kw) -> EngineConfig:
    base = dict(greeting="mx.example.com")
    base.update(kw)
    return EngineConfig(**base)


def tx(body: bytes, rcpts: int = 1, sender: bytes = b"<a@example.org>") -> bytes:
    """MAIL/RCPT/DATA + body (body must carry its own end of data)."""
    out = b"MAIL FROM:" + sender + b"\r\n"
    for i in range(rcpts):
        out += b"RCPT TO:<r%d@example.com>\r\n" % i
    return out + b"DATA\r\n" + body


def data_end(app: App) -> DataEnd:
    (ev,) = app.of(DataEnd)
    return ev


# --- greeting, HELO, EHLO (docs/behaviour/smtp.md#commands, #greeting-and-ehlo) ------------------

def test_greeting_is_first_output():
    app = App(CFG)
    assert app.output == b"220 mx.example.com ESMTP\r\n"
    assert app.conn.state == IDLE
    assert app.conn.next_event() is NEED_DATA


def test_ehlo_lines_exact(feed):
    """EHLO: greeting, PIPELINING, CHUNKING, SIZE n, 8BITMIME, ENHANCEDSTATUSCODES, extras
    (docs/behaviour/smtp.md#replies)."""
    c = cfg(databytes=10485760, extra_ehlo=["AUTH PLAIN LOGIN CRAM-MD5"])
    app = run(feed, b"EHLO client.example.org\r\n", c)
    assert app.lines == [
        GREETING,
        "250-mx.example.com",
        "250-PIPELINING",
        "250-CHUNKING",
        "250-SIZE 10485760",
        "250-8BITMIME",
        "250-ENHANCEDSTATUSCODES",
        "250 AUTH PLAIN LOGIN CRAM-MD5",
    ]
    assert app.merged() == [Helo("EHLO", "client.example.org")]
    assert app.conn.helo == "client.example.org"
    assert app.conn.esmtp is True


def test_ehlo_per_session_extras_and_smtputf8():
    """The AUTH offer is per session (docs/behaviour/auth.md#modes); SMTPUTF8 advertised when
    enabled (docs/behaviour/smtp.md#greeting-and-ehlo)."""
    conn = SMTPConnection(cfg(smtputf8=True, extra_ehlo=["AUTH CRAM-MD5"]))
    conn.set_extra_ehlo(["AUTH PLAIN LOGIN"])
    assert conn.ehlo_reply("mx2").line() == (
        b"250-mx2\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-SIZE 0\r\n250-8BITMIME\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250 AUTH PLAIN LOGIN\r\n")
    other = SMTPConnection(cfg(extra_ehlo=["AUTH CRAM-MD5"]))
    assert other.ehlo_reply().line().endswith(b"250 AUTH CRAM-MD5\r\n")


def test_helo(feed):
    """HELO gets `250 <greeting>` without enhanced code (RFC 2034 §3,
    docs/behaviour/smtp.md#commands)."""
    app = run(feed, b"helo client.example.org\r\n", cfg())
    assert app.lines == [GREETING, "250 mx.example.com"]
    assert app.merged() == [Helo("HELO", "client.example.org")]
    assert app.conn.helo == "client.example.org"
    assert app.conn.esmtp is False


def test_helo_without_name_is_501(feed):
    app = run(feed, b"HELO\r\nEHLO   \r\n", cfg())
    assert app.lines == [GREETING] + ["501 5.5.4 syntax error, HELO/EHLO needs a domain"] * 2
    assert app.merged() == [Anomaly("SYNTAX", "HELO"), Anomaly("SYNTAX", "EHLO")]
    assert app.conn.bad_commands == 2
    assert app.conn.helo is None


def test_helo_eightbit_reported(feed):
    app = run(feed, "HELO hôte.example\r\n".encode(), cfg())
    assert app.merged() == [Anomaly("EIGHTBIT", "HELO"), Helo("HELO", "hôte.example".encode().decode("latin-1"))]
    assert app.lines[1:] == ["250 mx.example.com"]


def test_helo_ends_transaction(feed):
    """HELO/EHLO end any transaction (docs/behaviour/smtp.md#states)."""
    app = run(feed, b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nEHLO x\r\nRCPT TO:<g@h.i>\r\n", cfg())
    assert app.lines[-1] == "503 5.5.1 MAIL first"
    assert app.conn.state == IDLE and app.conn.rcpt_count == 0
    assert app.of(Rcpt) == [Rcpt("d@e.f", {})]


# --- pipelining (RFC 2920, docs/behaviour/smtp.md#command-lines) ---------------------------------

def test_pipelined_group_answered_in_one_write():
    app = App(cfg())
    app.writes.clear()
    app.conn.receive_data(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"
                          b"RCPT TO:<c@example.com>\r\nDATA\r\n")
    app.drain()
    assert app.writes == [b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n"]
    assert app.merged() == [Mail("a@example.org", {}), Rcpt("b@example.com", {}),
                            Rcpt("c@example.com", {}), DataStart()]
    assert app.conn.state == DATA
    assert app.conn.rcpt_count == 2


def test_pipelined_transaction(feed):
    app = run(feed, b"EHLO c\r\n" + tx(b"Subject: hi\r\n\r\nbody\r\n.\r\n", rcpts=2) + b"QUIT\r\n",
              cfg())
    assert app.lines == [GREETING] + EHLO + [
        "250 2.1.0 ok", "250 2.1.5 ok", "250 2.1.5 ok", "354 go ahead",
        "250 2.0.0 ok 1700000000 qp 4711", "221 2.0.0 mx.example.com"]
    assert app.merged() == [
        Helo("EHLO", "c"), Mail("a@example.org", {}), Rcpt("r0@example.com", {}),
        Rcpt("r1@example.com", {}), DataStart(), DataChunk(b"Subject: hi\n\nbody\n"),
        DataEnd(18, False, 0, False), Quit(), Closed("quit")]


def test_commands_after_data_wait_for_dataend_reply():
    """Pipelined commands after the end of data wait for the DataEnd reply (PAUSED)."""
    app = App(cfg(), manual=True)
    conn = app.conn
    conn.receive_data(tx(b"x\r\n.\r\nNOOP\r\n"))
    app.drain()
    assert app.events == [Mail("a@example.org", {})]
    assert conn.next_event() is PAUSED
    conn.send(reply("mail_ok"))
    assert conn.next_event() == Rcpt("r0@example.com", {})
    conn.send(reply("rcpt_ok"))
    assert conn.next_event() == DataStart()
    assert conn.next_event() is PAUSED
    conn.send(reply("data_go"))
    assert conn.next_event() == DataChunk(b"x\n")
    assert conn.next_event() == DataEnd(2, False, 0, False)
    assert conn.next_event() is PAUSED
    assert conn.data_to_send() == b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n"
    conn.send(reply("queued", stamp="1", qid="2"))
    assert conn.next_event() == Noop()
    assert conn.data_to_send() == b"250 2.0.0 ok 1 qp 2\r\n250 2.0.0 ok\r\n"
    assert conn.next_event() is NEED_DATA


def test_send_without_pending_event_is_an_error():
    conn = SMTPConnection(cfg())
    with pytest.raises(EngineError):
        conn.send(reply("ok"))


# --- DATA byte machine (docs/behaviour/smtp.md#data) -----------------------------------------

def test_dot_unstuffing(feed):
    """`..x` -> `.x`; qmail also drops a lone leading dot (`.y` -> `y`), first line too."""
    app = run(feed, tx(b"..first\r\nline\r\n..x\r\n...\r\n.y\r\n.\r\n"), cfg())
    assert app.data() == b".first\nline\n.x\n..\ny\n"
    assert data_end(app) == DataEnd(20, False, 0, False)


def test_empty_message(feed):
    """A "." first line right after 354 is an empty message (docs/behaviour/smtp.md#data)."""
    app = run(feed, tx(b".\r\nNOOP\r\n"), cfg())
    assert app.of(DataChunk) == []
    assert data_end(app) == DataEnd(0, False, 0, False)
    assert app.lines[-2:] == ["250 2.0.0 ok 1700000000 qp 4711", "250 2.0.0 ok"]
    assert app.conn.state == IDLE and app.conn.rcpt_count == 0


def test_empty_line_message(feed):
    app = run(feed, tx(b"\r\n.\r\n"), cfg())
    assert app.data() == b"\n"
    assert data_end(app) == DataEnd(1, False, 0, False)


MSG = b"Subject: t\r\n\r\nline one\r\n..dot\r\nlast\r\n.\r\n"


@pytest.mark.parametrize("cut", range(len(MSG) + 1))
def test_message_split_at_every_boundary(cut):
    """Two fragments, split anywhere (incl. inside CRLF . CRLF): same message."""
    app = App(cfg())
    app.conn.receive_data(tx(b""))
    app.drain()
    for part in (MSG[:cut], MSG[cut:] + b"NOOP\r\n"):
        if part:                      # b"" would mean EOF
            app.conn.receive_data(part)
            app.drain()
    assert app.data() == b"Subject: t\n\nline one\n.dot\nlast\n"
    assert data_end(app) == DataEnd(31, False, 0, False)
    assert app.lines[-1] == "250 2.0.0 ok"
    # only a short tail is ever kept across fragments
    assert len(app.conn._buf) == 0


def test_crlf_to_lf_and_bare_cr_kept(feed):
    """Stored with LF; a CR not followed by LF is kept as is (docs/behaviour/smtp.md#data)."""
    app = run(feed, tx(b"a\rb\r\nc\r\r\n\r\r\n.\r\n"), cfg())
    assert app.data() == b"a\rb\nc\r\n\r\n"
    assert data_end(app) == DataEnd(9, False, 0, False)


def test_bare_cr_dot_is_not_end_of_data(feed):
    """`\\r.\\r\\n` is not an end of data (SMTP smuggling, docs/behaviour/smtp.md#data)."""
    app = run(feed, tx(b"a\r\n\r.\r\nb\r\n.\r\n"), cfg())
    assert app.data() == b"a\n\r.\nb\n"
    assert data_end(app) == DataEnd(7, False, 0, False)
    assert app.conn.state == IDLE


def test_bare_lf_in_data(feed):
    """Any bare LF -> DataEnd(bare_lf) at once, 451, session dropped (docs/behaviour/smtp.md#data,
    docs/behaviour/differences.md#smtp-commands)."""
    app = run(feed, tx(b"ok line\r\nbad\nmore\r\n.\r\nNOOP\r\n"), cfg())
    assert app.data() == b"ok line\nbad"
    assert data_end(app) == DataEnd(11, False, 0, True)
    assert app.lines[-1] == "451 4.5.2 See https://cr.yp.to/docs/smtplf.html."
    assert app.merged()[-1] == Closed("bare lf")
    assert app.conn.closing and app.conn.state == CLOSED


@pytest.mark.parametrize("form", [b"\n.\r\n", b"\r\n.\n", b"\n.\n", b"\n"],
                         ids=["LF.CRLF", "CRLF.LF", "LF.LF", "LF"])
def test_smuggling_forms_are_bare_lf(feed, form):
    """`<LF>.<CRLF>`, `<CRLF>.<LF>`: never an end of data, always bare LF
    (docs/behaviour/smtp.md#data)."""
    smuggled = b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<v@example.com>\r\nDATA\r\nx\r\n"
    app = run(feed, tx(b"hello" + form + smuggled + b".\r\n"), cfg())
    ev = data_end(app)
    assert ev.bare_lf is True
    assert app.of(Mail) == [Mail("a@example.org", {})]  # the smuggled MAIL never parsed
    assert app.merged()[-1] == Closed("bare lf")


def test_first_line_bare_lf(feed):
    app = run(feed, tx(b".\nx\r\n.\r\n"), cfg())
    assert data_end(app) == DataEnd(0, False, 0, True)
    assert app.data() == b""


def test_databytes_exact_limit_accepted(feed):
    """Size counted as stored (LF, unstuffed); exactly databytes is fine
    (docs/behaviour/smtp.md#data)."""
    body = b"0123456789\r\n..abcdefg\r\n"          # stored: 11 + 9 = 20 bytes
    app = run(feed, tx(body + b".\r\n"), cfg(databytes=20))
    assert data_end(app) == DataEnd(20, False, 0, False)
    assert app.data() == b"0123456789\n.abcdefg\n"
    assert app.lines[-1] == "250 2.0.0 ok 1700000000 qp 4711"


def test_databytes_plus_one_oversized(feed):
    body = b"0123456789\r\n..abcdefgh\r\nmore data after the limit\r\n"
    app = run(feed, tx(body + b".\r\nNOOP\r\n"), cfg(databytes=20))
    ev = data_end(app)
    assert ev == DataEnd(47, True, 0, False)
    assert app.data() == b"0123456789\n.abcdefgh"   # delivery stops at databytes
    assert app.lines[-2:] == [
        "552 5.3.4 sorry, that message size exceeds my databytes limit", "250 2.0.0 ok"]
    assert app.conn.state == IDLE


def test_size_param_too_big_at_mail(feed):
    """`MAIL ... SIZE=n` with n > databytes -> 552 5.3.4 at MAIL (RFC 1870,
    docs/behaviour/smtp.md#mail-parameters)."""
    app = run(feed, b"MAIL FROM:<a@b.c> SIZE=1001\r\nMAIL FROM:<a@b.c> SIZE=1000\r\n",
              cfg(databytes=1000))
    assert app.lines[1:] == ["552 5.3.4 sorry, that message size exceeds my databytes limit",
                             "250 2.1.0 ok"]
    assert app.merged() == [Mail("a@b.c", {"SIZE": 1000})]
    assert app.conn.bad_commands == 0


def test_size_param_syntax(feed):
    app = run(feed, b"MAIL FROM:<a@b.c> SIZE=ten\r\nMAIL FROM:<a@b.c> SIZE=10 BODY=8bitmime\r\n",
              cfg())
    assert app.lines[1:] == ["501 5.5.4 syntax error in parameters or arguments", "250 2.1.0 ok"]
    assert app.of(Mail) == [Mail("a@b.c", {"SIZE": 10, "BODY": "8BITMIME"})]


HEADERS = (b"Received: from a by b\r\n"
           b"DELIVERED-TO: x@y\r\n"
           b"received-spf: pass\r\n"
           b"X-Received: not counted\r\n"
           b"Subject: Received is not at the start\r\n"
           b"Received: " + b"x" * 300 + b"\r\n"
           b"\tReceived: folded continuation, not counted\r\n"
           b"Delivered\r\n"               # first 9 chars match: counts
           b"\r\n"
           b"Received: in the body, not counted\r\n"
           b"Delivered-To: body\r\n")


def test_hop_count(feed):
    """Received/Delivered lines of the header block only (docs/behaviour/smtp.md#data)."""
    app = run(feed, tx(HEADERS + b".\r\n"), cfg())
    assert data_end(app).hops == 5


@pytest.mark.parametrize("cut", range(0, len(HEADERS), 3))
def test_hop_count_header_split_across_chunks(cut):
    app = App(cfg())
    app.conn.receive_data(tx(b""))
    app.drain()
    for part in (HEADERS[:cut], HEADERS[cut:], b".\r\n"):
        if part:                      # b"" would mean EOF
            app.conn.receive_data(part)
            app.drain()
    assert data_end(app).hops == 5


def test_hop_count_blank_first_line(feed):
    app = run(feed, tx(b"\r\nReceived: x\r\n.\r\n"), cfg())
    assert data_end(app).hops == 0


def test_hop_limit_reply(feed):
    """hops >= max_hops -> 554 5.4.6 (docs/behaviour/smtp.md#end-of-data)."""
    app = run(feed, tx(b"Received: x\r\n" * 3 + b"\r\nbody\r\n.\r\n"), cfg(max_hops=3))
    assert data_end(app).hops == 3
    assert app.lines[-1] == "554 5.4.6 too many hops, this message is looping"


def test_large_message_streams_with_small_tail():
    """The engine never buffers the message: at most the end-marker prefix is kept."""
    app = App(cfg())
    app.conn.receive_data(tx(b""))
    app.drain()
    line = b"x" * 75 + b"\r\n"
    for _ in range(200):
        app.conn.receive_data(line * 50 + b"ab\r")
        app.drain()
        assert len(app.conn._buf) <= 4
        app.conn.receive_data(b"\n")
        app.drain()
    app.conn.receive_data(b".\r\n")
    app.drain()
    assert data_end(app) == DataEnd(200 * (50 * 76 + 3), False, 0, False)


# --- line length, bad commands (RFC 5321 §4.5.3.1, docs/behaviour/differences.md#smtp-commands) ---

def test_line_512_ok_513_too_long(feed):
    ok = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    long = b"NOOP " + b"x" * (513 - 7) + b"\r\n"
    assert len(ok) == 512 and len(long) == 513
    app = run(feed, ok + long + b"NOOP\r\n", cfg())
    assert app.lines[1:] == ["250 2.0.0 ok", "500 5.5.2 line too long", "250 2.0.0 ok"]
    assert app.merged() == [Noop(), Anomaly("COMMAND LENGTH LIMIT", None), Noop()]
    assert app.conn.bad_commands == 1


def test_very_long_line_discarded_then_session_continues(feed):
    app = run(feed, b"MAIL FROM:<" + b"a" * 5000 + b"@b>\r\nQUIT\r\n", cfg())
    assert app.lines[1:] == ["500 5.5.2 line too long", "221 2.0.0 mx.example.com"]
    assert app.merged()[-2:] == [Quit(), Closed("quit")]


def test_bad_commands_limit_421(feed):
    """Ten bad commands -> each answered, then 421 4.7.0 and close
    (docs/behaviour/differences.md#smtp-commands)."""
    app = run(feed, b"XYZZY\r\n" * 9 + b"\r\nNOOP\r\nNOOP\r\n", cfg())
    assert app.lines[1:] == ["500 5.5.1 unimplemented"] * 10 + [
        "421 4.7.0 mx.example.com too many errors, closing connection"]
    # unknown words are logged by length only: they may be secrets (see below)
    assert app.merged()[0] == Anomaly("UNKNOWN COMMAND", "<5 bytes>")
    assert app.merged()[9] == Anomaly("UNKNOWN COMMAND", "<0 bytes>")
    assert app.merged()[-1] == Closed("too many errors")
    assert app.conn.bad_commands == 10
    assert app.of(Noop) == []


def test_bad_command_limit_configurable(feed):
    app = run(feed, b"EXPN x\r\nRCPT TO:<a@b>\r\nNOOP\r\n", cfg(max_bad_commands=2))
    assert app.lines[1:] == ["500 5.5.1 unimplemented", "503 5.5.1 MAIL first",
                             "421 4.7.0 mx.example.com too many errors, closing connection"]
    assert app.conn.closing


def test_bare_newline_command(feed):
    """A command ending in bare LF is accepted (qmail, docs/behaviour/smtp.md#command-lines)
    and reported."""
    app = run(feed, b"NOOP\nnoop\r\n", cfg())
    assert app.lines[1:] == ["250 2.0.0 ok", "250 2.0.0 ok"]
    assert app.merged() == [Anomaly("BARE NEWLINE", "NOOP"), Noop(), Noop()]


def test_anomalies_never_carry_secrets(feed):
    """docs/architecture.md#design-rules: a bare-LF AUTH response and a password
    pipelined after a refused AUTH (it arrives as an unknown "verb") are
    reported without their text; known verbs are still named."""
    secret = b"V1JPTkdQQVNTMw=="                  # base64 of a password
    letters = b"YWJjZGVm"                         # base64 that looks like a word
    app = run(feed, b"AUTH LOGIN\r\n" + secret + b"\n" + letters + b"\r\nEXPN x\n", cfg())
    details = [ev.detail for ev in app.merged() if isinstance(ev, Anomaly)]
    assert details and not any(isinstance(d, bytes) for d in details)
    text = repr(details)
    assert "V1JPTkdQ" not in text and "YWJj" not in text, text
    assert "EXPN" in text
    assert any(d == "AUTH response" or d.startswith("<") for d in details)


# --- sequence (docs/behaviour/differences.md#smtp-commands, docs/behaviour/smtp.md#states, RFC 5321 §3.3) ---

def test_nested_mail_503(feed):
    app = run(feed, b"MAIL FROM:<a@b.c>\r\nMAIL FROM:<d@e.f>\r\n", cfg())
    assert app.lines[1:] == ["250 2.1.0 ok", "503 5.5.1 nested MAIL command"]
    assert app.conn.state == MAIL
    assert app.merged() == [Mail("a@b.c", {}), Anomaly("BAD SEQUENCE", "MAIL")]


def test_rcpt_before_mail(feed):
    app = run(feed, b"RCPT TO:<a@b.c>\r\n", cfg())
    assert app.lines[1:] == ["503 5.5.1 MAIL first"]
    assert app.merged() == [Anomaly("BAD SEQUENCE", "RCPT")]


def test_data_before_mail_and_before_rcpt(feed):
    app = run(feed, b"DATA\r\nMAIL FROM:<a@b.c>\r\nDATA\r\n", cfg())
    assert app.lines[1:] == ["503 5.5.1 MAIL first", "250 2.1.0 ok", "503 5.5.1 RCPT first"]
    assert app.conn.state == MAIL
    assert app.conn.bad_commands == 2


def test_data_with_argument_is_501(feed):
    """RFC 5321 §4.1.1.4: DATA takes no argument (docs/behaviour/differences.md#smtp-commands: RFC
    5321 where qmail is lax)."""
    app = run(feed, tx(b"")[:-2] + b" now\r\n", cfg())
    assert app.lines[-1] == "501 5.5.4 syntax error in parameters or arguments"
    assert app.conn.state == RCPT and app.conn.bad_commands == 1


def test_states_through_a_transaction():
    """The state table of the module docstring, step by step (docs/behaviour/smtp.md#states)."""
    app = App(cfg(), manual=True)
    conn = app.conn
    seen = [(conn.state, conn.rcpt_count)]
    conn.receive_data(tx(b"x\r\n.\r\n"))
    for r in (reply("mail_ok"), reply("rcpt_ok"), reply("data_go")):
        assert conn.next_event().owes_reply
        conn.send(r)
        seen.append((conn.state, conn.rcpt_count))
    assert conn.next_event() == DataChunk(b"x\n")
    assert isinstance(conn.next_event(), DataEnd)
    seen.append((conn.state, conn.rcpt_count))
    conn.send(reply("queued", stamp="1", qid="2"))
    seen.append((conn.state, conn.rcpt_count))
    assert seen == [(IDLE, 0), (MAIL, 0), (RCPT, 1), (DATA, 1), (DATA, 1), (IDLE, 0)]


def test_rejected_mail_and_rcpt_do_not_open_or_count():
    """A policy rejection leaves the state as is (docs/behaviour/smtp.md#rcpt-checks)."""
    script = {Mail: [reply("badmailfrom"), reply("mail_ok")],
              Rcpt: [reply("rcpthosts"), reply("rcpt_ok")]}
    app = run(feed_whole, b"MAIL FROM:<x@spam>\r\nRCPT TO:<a@b>\r\nMAIL FROM:<y@ok>\r\n"
              b"RCPT TO:<a@elsewhere>\r\nDATA\r\nRCPT TO:<a@b>\r\n", cfg(), script)
    assert app.lines[1:] == [
        "553 5.7.1 sorry, your envelope sender is in my badmailfrom list",
        "503 5.5.1 MAIL first", "250 2.1.0 ok",
        "553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts",
        "503 5.5.1 RCPT first", "250 2.1.5 ok"]
    assert app.of(Mail) == [Mail("x@spam", {}), Mail("y@ok", {})]
    assert app.of(Rcpt) == [Rcpt("a@elsewhere", {}), Rcpt("a@b", {})]
    assert app.conn.state == RCPT and app.conn.rcpt_count == 1


def test_data_refused_ends_transaction():
    """A non-354 answer to DATA ends the transaction (qmail clears seenmail first)."""
    app = run(feed_whole, tx(b"") + b"RCPT TO:<x@y>\r\n", cfg(),
              {DataStart: reply("store_failed")})
    assert app.lines[-2:] == ["451 4.3.0 temporary failure storing message",
                              "503 5.5.1 MAIL first"]
    assert app.conn.state == IDLE


def test_rset(feed):
    app = run(feed, b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nRSET\r\nRCPT TO:<d@e.f>\r\n", cfg())
    assert app.lines[1:] == ["250 2.1.0 ok", "250 2.1.5 ok", "250 2.0.0 flushed",
                             "503 5.5.1 MAIL first"]
    assert app.merged()[2] == Rset()
    assert app.conn.state == IDLE and app.conn.rcpt_count == 0


def test_max_recipients_hard_cap(feed):
    app = run(feed, tx(b"", rcpts=3)[:-len(b"DATA\r\n")], cfg(max_recipients=2))
    assert app.lines[-1] == "452 4.5.3 sorry, too many recipients"
    assert app.of(Rcpt) == [Rcpt("r0@example.com", {}), Rcpt("r1@example.com", {})]
    assert app.conn.rcpt_count == 2 and app.conn.state == RCPT
    assert app.conn.bad_commands == 0


def test_noop_vrfy_help(feed):
    app = run(feed, b"NOOP\r\nVRFY postmaster\r\nHELP\r\n",
              cfg(features=["spamcontrol-compat"], help_url="https://example.org/mailfilter"))
    assert app.lines[1:] == [
        "250 2.0.0 ok",
        "252 2.0.0 send some mail, i'll try my best",
        "214-2.0.0 mailfilter 0.1.0",
        "214-2.0.0 features: PIPELINING CHUNKING SIZE 8BITMIME ENHANCEDSTATUSCODES spamcontrol-compat",
        "214 2.0.0 https://example.org/mailfilter",
    ]
    assert app.merged() == [Noop(), Vrfy("postmaster"), Help()]


def test_case_insensitive_verbs(feed):
    app = run(feed, b"mail from:<a@b.c>\r\nRcPt To:<d@e.f>\r\ndata\r\n.\r\nquit\r\n", cfg())
    assert [type(e).__name__ for e in app.merged()] == [
        "Mail", "Rcpt", "DataStart", "DataEnd", "Quit", "Closed"]


# --- address and parameter parsing (docs/behaviour/smtp.md#addresses, #rcpt-checks, #mail-parameters) ---

@pytest.mark.parametrize("line,address", [
    (b"MAIL FROM:<a@b.c>", "a@b.c"),
    (b"MAIL FROM: <A@B.C>", "A@B.C"),
    (b"MAIL FROM:<>", ""),
    (b"MAIL FROM:<@a,@b:u@c>", "u@c"),
    (b'MAIL FROM:<"x y"@d>', "x y@d"),
    (b'MAIL FROM:<"a>b"@d>', "a>b@d"),
    (b"MAIL FROM:<a\\>b@d>", "a>b@d"),
])
def test_mail_address_forms(feed, line, address):
    app = run(feed, line + b"\r\n", cfg())
    assert app.merged() == [Mail(address, {})]
    assert app.conn.state == MAIL


@pytest.mark.parametrize("line,expected", [
    (b"MAIL FROM:a@b.c", "555 5.5.4 syntax error"),           # brackets required
                                                              # (docs/behaviour/smtp.md#addresses)
    (b"MAIL <a@b.c>", "555 5.5.4 syntax error"),              # FROM: required
    (b"MAIL FROM:<a@b.c", "555 5.5.4 syntax error"),
    (b"MAIL FROM:<a@b.c>SIZE=1", "555 5.5.4 syntax error"),
    (b"MAIL FROM:<@a,@b>", "555 5.5.4 syntax error"),
    (b"MAIL", "555 5.5.4 syntax error"),
    (b"MAIL FROM:<a@b.c> FOO=bar", "555 5.5.4 unsupported parameter FOO"),
    (b"MAIL FROM:<a@b.c> SMTPUTF8", "555 5.5.4 unsupported parameter SMTPUTF8"),
    (b"MAIL FROM:<a@b.c> BODY=BINARYMIME", "501 5.5.4 syntax error in parameters or arguments"),
    (b"MAIL FROM:<a@b.c> SIZE=1 SIZE=2", "501 5.5.4 syntax error in parameters or arguments"),
    (b"MAIL FROM:<a@b.c> AUTH=x+zz", "501 5.5.4 syntax error in parameters or arguments"),
    # xtext is ASCII (RFC 3461 §4): an 8-bit AUTH= used to raise UnicodeDecodeError (421)
    (b"MAIL FROM:<a@b.c> AUTH=\xff", "501 5.5.4 syntax error in parameters or arguments"),
    # a name that is no esmtp-keyword is not echoed (RFC 5321 §4.2 textstring, 512 octets)
    (b"MAIL FROM:<a@b.c> X\x00\x1b=1", "501 5.5.4 syntax error in parameters or arguments"),
    (b"MAIL FROM:<> " + b"\xff" * 490, "501 5.5.4 syntax error in parameters or arguments"),
    (b"MAIL FROM:<a@b.c> " + b"A" * 65 + b"=1", "501 5.5.4 syntax error in parameters or arguments"),
    (b"MAIL FROM:<a@b.c> " + b"A" * 64 + b"=1", "555 5.5.4 unsupported parameter " + "A" * 64),
])
def test_mail_syntax_errors(feed, line, expected):
    app = run(feed, line + b"\r\n", cfg())
    assert app.lines[1:] == [expected]
    assert app.conn.state == IDLE and app.conn.bad_commands == 1
    assert app.of(Mail) == []
    assert isinstance(app.merged()[0], Anomaly)


def test_rcpt_syntax_and_params(feed):
    app = run(feed, b"MAIL FROM:<a@b.c>\r\nRCPT TO:<>\r\nRCPT TO:d@e.f\r\n"
              b"RCPT TO:<d@e.f> NOTIFY=NEVER\r\nRCPT TO:<@r:d@e.f>\r\nRCPT TO:<Postmaster>\r\n",
              cfg())
    assert app.lines[1:] == ["250 2.1.0 ok", "555 5.5.4 syntax error", "555 5.5.4 syntax error",
                             "555 5.5.4 unsupported parameter NOTIFY", "250 2.1.5 ok",
                             "250 2.1.5 ok"]
    # the source route is dropped from the address and said (the policy decides)
    assert app.of(Rcpt) == [Rcpt("d@e.f", {}, True), Rcpt("Postmaster", {})]
    assert app.conn.rcpt_count == 2


@pytest.mark.parametrize("tail", [b" \t", b" \x0b", b" \x0c", b" \r", b"\x20\x20"])
def test_rcpt_whitespace_after_the_path_is_no_parameter(feed, tail):
    """Only whitespace after the path: no parameter, as at MAIL (it used to
    raise IndexError: strip(b" ") kept it, split() found nothing -> 421)."""
    app = run(feed, b"MAIL FROM:<a@b.c>" + tail + b"\r\nRCPT TO:<d@e.f>" + tail + b"\r\n", cfg())
    assert app.lines[1:] == ["250 2.1.0 ok", "250 2.1.5 ok"]
    assert app.of(Rcpt) == [Rcpt("d@e.f", {})] and app.conn.rcpt_count == 1


def test_rcpt_unknown_parameter_names_are_not_echoed_raw(feed):
    app = run(feed, b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f> \xffX=1\r\nRCPT TO:<d@e.f> ORCPT=rfc822;d@e.f\r\n",
              cfg())
    assert app.lines[1:] == ["250 2.1.0 ok", "501 5.5.4 syntax error in parameters or arguments",
                             "555 5.5.4 unsupported parameter ORCPT"]


def test_send_close_hangs_up_after_that_reply():
    """send(r, close=True) (spamcontrol's notorious-session 503, docs/behaviour/smtp.md#data):
    nothing pipelined after it is parsed; the next event is Closed."""
    conn = SMTPConnection(cfg())
    conn.greet()
    conn.data_to_send()
    conn.receive_data(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nRSET\r\nMAIL FROM:<x@y.z>\r\n")
    for want, answer in ((Mail, reply("mail_ok")), (Rcpt, reply("rcpt_ok"))):
        assert type(conn.next_event()) is want
        conn.send(answer)
    assert type(conn.next_event()) is DataStart
    conn.send(reply("notorious_data"), close=True)
    assert type(conn.next_event()) is Closed and conn.closing
    assert conn.data_to_send() == (b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n"
                                   b"503 5.5.1 DATA command not accepted at this time\r\n")


def test_auth_param_decoded_never_grants(feed):
    """AUTH= is xtext-decoded and reported; it never authenticates
    (docs/behaviour/auth.md#dialogue)."""
    app = run(feed, b"MAIL FROM:<a@b.c> AUTH=u+2Bx@b.c BODY=7bit\r\n", cfg())
    assert app.merged() == [Mail("a@b.c", {"AUTH": "u+x@b.c", "BODY": "7BIT"})]
    assert app.conn.authenticated is False


def test_eightbit_address_without_smtputf8(feed):
    """Non-ASCII envelope without SMTPUTF8 -> 553 5.6.7 (docs/behaviour/smtp.md#addresses)."""
    addr = "jö@example.org".encode()
    app = run(feed, b"MAIL FROM:<" + addr + b">\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<" + addr + b">\r\n",
              cfg())
    assert app.lines[1:] == ["553 5.6.7 non-ASCII address needs SMTPUTF8", "250 2.1.0 ok",
                             "553 5.6.7 non-ASCII address needs SMTPUTF8"]
    assert app.of(Anomaly) == [Anomaly("EIGHTBIT", "address")] * 2


@pytest.mark.parametrize("ctl", [b"\x00", b"\r", b"\x1b", b"\x7f", b"\t"])
def test_control_character_in_address_refused(feed, ctl):
    """CR, NUL and other controls inside <...> are refused at MAIL/RCPT with
    553 5.1.3, not accepted and then failed at DATA (envelope headers and
    qmail-queue's NUL-separated envelope cannot carry them); the session goes on."""
    bad = b"y" + ctl + b"X-Evil: 1@example.com"
    app = run(feed, b"MAIL FROM:<" + bad + b">\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<" + bad
              + b">\r\nRCPT TO:<u@example.com>\r\n", cfg())
    assert app.lines[1:] == ["553 5.1.3 syntax error in mailbox address", "250 2.1.0 ok",
                             "553 5.1.3 syntax error in mailbox address", "250 2.1.5 ok"]
    assert app.of(Rcpt) == [Rcpt("u@example.com", {})]


def test_eightbit_address_with_smtputf8(feed):
    addr = "jö@example.org".encode()
    app = run(feed, b"MAIL FROM:<" + addr + b"> SMTPUTF8\r\nRCPT TO:<" + addr + b">\r\n",
              cfg(smtputf8=True))
    assert app.merged() == [Mail("jö@example.org", {"SMTPUTF8": True}), Rcpt("jö@example.org", {})]


@pytest.mark.parametrize("bad", [
    b"\xc0\xaf",              # overlong "/" (RFC 3629 §3: must not be decoded)
    b"\xe0\x80\xaf",          # overlong, three bytes
    b"\xed\xa0\x80",          # a UTF-16 surrogate (U+D800)
    b"\xf4\x90\x80\x80",      # above U+10FFFF
    b"\xc3",                  # truncated sequence
    b"\x80",                  # lone continuation byte
    b"\xfe",                  # never in UTF-8
    b"\xc2\x85",              # NEL, a C1 control (RFC 5198 §2: MUST NOT appear)
    b"\xc2\x9f",              # the last C1 control
])
def test_smtputf8_address_must_be_utf8_without_controls(feed, bad):
    """Under SMTPUTF8 an 8-bit address must be RFC 3629 UTF-8 without C1
    controls: 553 5.1.3, at MAIL and at RCPT, the session goes on
    (docs/behaviour/smtp.md#addresses step 8)."""
    addr = b"j" + bad + b"rg@example.org"
    app = run(feed, b"MAIL FROM:<" + addr + b"> SMTPUTF8\r\nMAIL FROM:<a@b.c> SMTPUTF8\r\n"
              b"RCPT TO:<" + addr + b">\r\nRCPT TO:<\xc2\xa0\xf0\x9f\x93\xa7@example.org>\r\n",
              cfg(smtputf8=True))
    assert app.lines[1:] == ["553 5.1.3 syntax error in mailbox address", "250 2.1.0 ok",
                             "553 5.1.3 syntax error in mailbox address", "250 2.1.5 ok"]
    # U+00A0 (the first character after the C1 block) and a 4-byte character pass
    assert app.of(Rcpt) == [Rcpt("\u00a0\U0001f4e7@example.org", {})]


def test_smtputf8_is_per_transaction(feed):
    """RCPT addresses are decoded by the SMTPUTF8 of the MAIL that opened this
    transaction, not of an earlier one (RFC 6531 §3.4)."""
    addr = "jö@example.org".encode()
    app = run(feed, b"MAIL FROM:<a@b.c> SMTPUTF8\r\nRCPT TO:<" + addr + b">\r\nRSET\r\n"
              b"MAIL FROM:<a@b.c>\r\nRCPT TO:<" + addr + b">\r\n", cfg(smtputf8=True))
    assert app.lines[1:] == ["250 2.1.0 ok", "250 2.1.5 ok", "250 2.0.0 flushed", "250 2.1.0 ok",
                             "553 5.6.7 non-ASCII address needs SMTPUTF8"]
    assert app.of(Rcpt) == [Rcpt("jö@example.org", {})]
    assert app.conn.mail_smtputf8 is False and app.conn.rcpt_count == 0


# --- AUTH framing (docs/behaviour/auth.md#dialogue) ----------------------------------------------

def auth_script(*replies):
    return {AuthStart: replies[0], AuthResponse: list(replies[1:])}


def test_auth_login_exchange(feed):
    script = auth_script(reply("auth_challenge", data="VXNlcm5hbWU6"),
                         reply("auth_challenge", data="UGFzc3dvcmQ6"), reply("auth_ok"))
    app = run(feed, b"EHLO c\r\nAUTH LOGIN\r\ndXNlcg==\r\ncGFzcw==\r\nMAIL FROM:<a@b.c>\r\n",
              cfg(), script)
    assert app.lines[7:] == ["334 VXNlcm5hbWU6", "334 UGFzc3dvcmQ6", "235 2.7.0 ok, go ahead",
                             "250 2.1.0 ok"]
    assert app.merged()[1:] == [AuthStart("LOGIN", None), AuthResponse(b"dXNlcg=="),
                                AuthResponse(b"cGFzcw=="), Mail("a@b.c", {})]
    assert app.conn.authenticated is True


def test_auth_plain_initial_and_empty_challenge(feed):
    script = auth_script(reply("auth_challenge", data=""), reply("auth_failed"))
    app = run(feed, b"auth plain =\r\nAGEAYg==\r\nNOOP\r\n", cfg(), script)
    assert app.output.split(b"\r\n")[1:-1] == [
        b"334 ", b"535 5.7.8 authentication failed", b"250 2.0.0 ok"]
    assert app.merged() == [AuthStart("PLAIN", ""), AuthResponse(b"AGEAYg=="), Noop()]
    assert app.conn.authenticated is False and app.conn.state == IDLE


def test_auth_cancel_line_and_command_lookalike_are_responses(feed):
    """Inside the exchange every line is an AuthResponse, even `*` or `QUIT`."""
    script = auth_script(reply("auth_challenge", data="PDEyMz4="),
                         reply("auth_challenge", data="x"), reply("auth_cancelled"))
    app = run(feed, b"AUTH CRAM-MD5\r\nQUIT\r\n*\r\nQUIT\r\n", cfg(), script)
    assert app.merged() == [AuthStart("CRAM-MD5", None), AuthResponse(b"QUIT"),
                            AuthResponse(b"*"), Quit(), Closed("quit")]
    assert app.lines[-2:] == ["501 5.0.0 auth exchange cancelled", "221 2.0.0 mx.example.com"]


def test_auth_long_line(feed):
    """Continuation lines up to max_auth_line (12288); longer -> 500 5.5.6 (RFC 4954 §4)."""
    script = auth_script(reply("auth_challenge", data=""), reply("auth_challenge", data=""),
                         reply("auth_failed"))
    ok = b"A" * (12288 - 2)
    app = run(feed, b"AUTH PLAIN\r\n" + ok + b"\r\n" + b"B" * 12289 + b"\r\nNOOP\r\n", cfg(),
              script)
    assert app.of(AuthResponse) == [AuthResponse(ok)]
    assert app.lines[1:] == ["334 ", "334 ", "500 5.5.6 authentication exchange line is too long",
                             "250 2.0.0 ok"]
    assert app.conn.state == IDLE and app.conn.bad_commands == 1


def test_auth_sequence_errors(feed):
    """AUTH in a transaction or after success -> 503 (RFC 4954 §4,
    docs/behaviour/auth.md#dialogue)."""
    script = {AuthStart: reply("auth_ok")}
    app = run(feed, b"MAIL FROM:<a@b.c>\r\nAUTH PLAIN AGEAYg==\r\nRSET\r\n"
              b"AUTH PLAIN AGEAYg==\r\nRSET\r\nAUTH PLAIN AGEAYg==\r\nAUTH\r\n", cfg(), script)
    # authentication survives RSET (RFC 4954, docs/behaviour/auth.md#after-success)
    assert app.lines[1:] == ["250 2.1.0 ok", "503 5.5.1 no auth during mail transaction",
                             "250 2.0.0 flushed", "235 2.7.0 ok, go ahead", "250 2.0.0 flushed",
                             "503 5.5.1 you're already authenticated",
                             "503 5.5.1 you're already authenticated"]
    assert app.of(AuthStart) == [AuthStart("PLAIN", "AGEAYg==")]
    assert app.conn.authenticated is True


def test_auth_state_during_exchange():
    app = App(cfg(), manual=True)
    app.conn.receive_data(b"AUTH LOGIN\r\n")
    app.drain()
    app.conn.send(reply("auth_challenge", data="VXNlcm5hbWU6"))
    assert app.conn.state == AUTH
    assert app.conn.next_event() is NEED_DATA


# --- QUIT, EOF, closing ---------------------------------------------------------------

def test_quit_ignores_further_input(feed):
    app = run(feed, b"QUIT\r\nNOOP\r\nMAIL FROM:<a@b.c>\r\n", cfg())
    assert app.lines == [GREETING, "221 2.0.0 mx.example.com"]
    assert app.merged() == [Quit(), Closed("quit")]
    assert app.conn.closing and app.conn.state == CLOSED
    app.conn.receive_data(b"NOOP\r\n")
    assert app.conn.next_event() == Closed("quit")
    assert app.conn.data_to_send() == b""


def test_eof(feed):
    app = run(feed, b"NOOP\r\nNOO", cfg(), eof=True)
    assert app.merged() == [Noop(), Closed("eof")]
    assert app.lines[1:] == ["250 2.0.0 ok"]


def test_eof_in_data(feed):
    app = run(feed, tx(b"partial message\r\n"), cfg(), eof=True)
    assert app.merged()[-2:] == [DataChunk(b"partial message"), Closed("eof")]
    assert app.of(DataEnd) == []


def test_app_421_closes():
    app = run(feed_whole, b"MAIL FROM:<a@b.c>\r\nNOOP\r\n", cfg(),
              {Mail: reply("internal_error", host="mx.example.com")})
    assert app.lines[1:] == ["421 4.3.0 mx.example.com internal error, closing connection"]
    assert app.merged() == [Mail("a@b.c", {}), Closed("421")]


def test_abort_timeout():
    conn = SMTPConnection(cfg())
    conn.abort(reply("timeout", host="mx.example.com"))
    assert conn.data_to_send() == b"421 4.4.2 mx.example.com timeout, closing connection\r\n"
    assert conn.next_event() == Closed("421")


def test_ehlo_reply_cached_per_greeting_and_keywords():
    """The EHLO answer is built once per (greeting, keywords), never shared
    across different offers (the AUTH keyword differs by client)."""
    a, b = SMTPConnection(EngineConfig(greeting="mx.a")), SMTPConnection(EngineConfig(greeting="mx.a"))
    b.set_extra_ehlo(["AUTH LOGIN PLAIN"])
    assert a.ehlo_reply() is SMTPConnection(EngineConfig(greeting="mx.a")).ehlo_reply()
    assert b"AUTH" not in a.ehlo_reply().line()
    assert b.ehlo_reply().line().endswith(b"250 AUTH LOGIN PLAIN\r\n")
    assert SMTPConnection(EngineConfig(greeting="mx.b")).ehlo_reply().line().startswith(b"250-mx.b\r\n")
    assert repr(MultiReply(250, ["x", "y"])) == "MultiReply(250, ('x', 'y'), '')"


# --- the transition table is the docstring's (h11 _state.py pattern) ----------------

def docstring_transitions(doc: str) -> tuple[dict, set]:
    """The theory-of-operation table of ``doc`` as {(state, event, class): (new,
    effect)}, and the effect names its "Effects:" list describes."""
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == ["state", "event", "reply"])
    assert set(lines[start + 1].split()) == {"-----", "------------", "-------", "------"}
    table: dict = {}
    for line in lines[start + 2:]:
        if not line.strip():
            break
        words = line.split()
        arrow = words.index("->")
        state, event, classes = words[0], words[1], words[2:arrow]
        new, effect = words[arrow + 1], (words[arrow + 2:] or [None])
        assert len(effect) == 1, line
        assert state in events.STATES and new in events.STATES, line
        for c in classes:
            key = (state, getattr(events, event), int(c))
            assert key not in table, f"row twice: {line}"
            table[key] = (new, effect[0])
    described = set()
    for line in lines[lines.index("Effects:") + 1:]:
        if line.startswith("* "):
            described.add(line[2:].split(":")[0])
        elif line.strip() and not line.startswith("  "):
            break                     # the list ended
    return table, described


def test_docstring_table_is_the_table_send_runs():
    documented, described = docstring_transitions(engine.__doc__)
    assert len(documented) >= 30
    missing = set(engine.TRANSITIONS) - set(documented)
    undocumented = set(documented) - set(engine.TRANSITIONS)
    assert not missing and not undocumented, (missing, undocumented)
    assert documented == engine.TRANSITIONS
    used = {effect for _, effect in engine.TRANSITIONS.values()} - {None}
    assert used == set(engine.EFFECTS) == described


def test_docstring_parser_sees_a_changed_row():
    """The comparison above can fail: a row changed in the text is found."""
    doc = engine.__doc__.replace("MAIL   Rcpt          2        -> RCPT   count",
                                 "MAIL   Rcpt          2        -> MAIL   count")
    assert doc != engine.__doc__
    documented, _ = docstring_transitions(doc)
    assert documented != engine.TRANSITIONS
    assert documented[(MAIL, Rcpt, 2)] == (MAIL, "count")


def test_every_pending_event_has_a_row_for_every_reply_class():
    """2xx to 5xx all lead somewhere: send() never meets a hole for a reply of the table."""
    pairs = {(state, event) for state, event, _ in engine.TRANSITIONS}
    assert {event for _, event in pairs} == {Helo, Mail, Rcpt, DataStart, DataEnd,
                                             AuthStart, AuthResponse, engine.StartTLS,
                                             engine.BdatStart}
    for state, event in pairs:
        assert all((state, event, c) in engine.TRANSITIONS for c in (2, 3, 4, 5)), (state, event)


def test_reply_outside_the_table_is_an_engine_error():
    conn = SMTPConnection(cfg())
    conn.receive_data(b"MAIL FROM:<a@b.c>\r\n")
    assert isinstance(conn.next_event(), Mail)
    with pytest.raises(EngineError):
        conn.send(Reply(199, "", "no such class"))


# ------------------------------------------------------------------ STARTTLS
def test_starttls_220_discards_what_was_pipelined_after_it():
    """RFC 3207 §6: after the 220 nothing buffered in clear is parsed; input
    is ignored until tls_started(), which forgets HELO and AUTH (§4.2)."""
    conn = engine.SMTPConnection(engine.EngineConfig(greeting="mx.test"))
    conn.receive_data(b"EHLO c\r\n")
    ev = conn.next_event()
    conn.send(conn.ehlo_reply())
    conn.receive_data(b"STARTTLS\r\nMAIL FROM:<a@b>\r\nRSET\r\n")
    assert type(conn.next_event()) is engine.StartTLS
    assert conn.next_event() is engine.PAUSED
    conn.send(engine.REPLIES["starttls_go"])
    assert conn.data_to_send().endswith(b"220 2.0.0 Ready to start TLS\r\n")
    assert conn.next_event() is engine.NEED_DATA        # MAIL and RSET are gone
    conn.receive_data(b"NOOP\r\n")                     # cleartext during the handshake: ignored
    assert conn.next_event() is engine.NEED_DATA
    assert conn.helo == "c" and conn.esmtp and not conn.tls
    conn.tls_started()
    assert conn.tls and conn.helo is None and not conn.esmtp and conn.state == IDLE
    conn.receive_data(b"RCPT TO:<x@y>\r\nSTARTTLS\r\n")
    assert type(conn.next_event()) is engine.Anomaly     # 503 MAIL first: the MAIL never ran
    assert type(conn.next_event()) is engine.Anomaly     # 503 TLS already active
    assert conn.data_to_send() == b"503 5.5.1 MAIL first\r\n503 5.5.1 TLS already active\r\n"


def test_starttls_454_leaves_the_session_in_clear():
    conn = engine.SMTPConnection(engine.EngineConfig(greeting="mx.test"))
    conn.receive_data(b"STARTTLS\r\nNOOP\r\n")
    assert type(conn.next_event()) is engine.StartTLS
    conn.send(engine.REPLIES["tls_unavailable"])
    assert type(conn.next_event()) is engine.Noop        # input goes on in clear
    assert not conn.tls


def test_header_limit_from_the_config_cuts_and_says_so():
    """EngineConfig.header_limit reaches the DATA byte machine; DataEnd
    reports the cut (the session's accept line names it)."""
    conn = engine.SMTPConnection(engine.EngineConfig(greeting="mx.test", header_limit=64))
    conn.receive_data(b"MAIL FROM:<a@b>\r\n")
    conn.next_event()
    conn.send(reply("mail_ok"))
    conn.receive_data(b"RCPT TO:<c@d>\r\n")
    conn.next_event()
    conn.send(reply("rcpt_ok"))
    conn.receive_data(b"DATA\r\n")
    conn.next_event()
    conn.send(reply("data_go"))
    conn.receive_data(b"Subject: " + b"x" * 200 + b"\r\n\r\nbody\r\n.\r\n")
    chunks, end = [], None
    while end is None:
        ev = conn.next_event()
        if type(ev) is engine.DataChunk:
            chunks.append(ev.data)
        elif type(ev) is engine.DataEnd:
            end = ev
    stored = b"".join(chunks)
    assert end.header_cut and stored.endswith(b"\n\nbody\n")
    assert len(stored.split(b"\n\n", 1)[0]) <= 64
    whole = engine.SMTPConnection(engine.EngineConfig(greeting="mx.test"))   # default: off
    assert whole.config.header_limit == 0
