"""CHUNKING / BDAT (RFC 3030) in the sans-IO engine (docs/behaviour/smtp.md#chunking).

Every scenario goes through ``run(feed, ...)``: the whole input, one byte at a
time and random fragments, which must all give the same events (DataChunks
joined) and the same output.
"""
from __future__ import annotations

import pytest

from mailfilter.smtp.engine import (
    BDAT, CHUNK, CLOSED, IDLE, RCPT, Anomaly, BdatStart, Closed, DataChunk, DataEnd,
    DataStart, EngineConfig, Noop, Rset,
)
from mailfilter.smtp.replies import REPLIES, reply
from smtp_driver import FEEDS, run

ENV = b"EHLO c\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"
HEAD = ["250 2.1.0 ok", "250 2.1.5 ok"]
QUEUED = "250 2.0.0 ok 1700000000 qp 4711"


@pytest.fixture(params=sorted(FEEDS))
def feed(request):
    return FEEDS[request.param]


def cfg(**kw) -> EngineConfig:
    return EngineConfig(greeting="mx.example.com", **kw)


def after_ehlo(app) -> list[str]:
    """The reply lines after the greeting and the EHLO reply."""
    lines = app.lines
    end = next(i for i, line in enumerate(lines) if line.startswith("250 ") and i > 1)
    return lines[end + 1:]


def bdat(data: bytes, last: bool = False, count: int | None = None) -> bytes:
    n = len(data) if count is None else count
    return b"BDAT %d%s\r\n" % (n, b" LAST" if last else b"") + data


def test_chunks_are_the_message_crlf_to_lf_nothing_unstuffed(feed):
    """Exact octet counts, the chunks' bytes in stored form (CRLF -> LF), dots
    kept as sent (no dot-stuffing, RFC 3030 §2), a CR and its LF in two
    chunks, the next command right after a chunk's last octet."""
    msg = b"Subject: x\r\n\r\n.hidden\r\n..two\r\n.\r\nend\r"
    cut = msg.index(b"\r\n..two") + 1          # between CR and LF
    wire = ENV + bdat(msg[:cut]) + bdat(msg[cut:-1]) + bdat(msg[-1:], last=True) + b"NOOP\r\n"
    app = run(feed, wire, cfg())
    assert after_ehlo(app) == HEAD + [f"250 2.0.0 {cut} octets received",
                                      f"250 2.0.0 {len(msg) - cut - 1} octets received",
                                      QUEUED, "250 2.0.0 ok"]
    assert app.data() == b"Subject: x\n\n.hidden\n..two\n.\nend\r"
    assert app.of(BdatStart) == [BdatStart(cut, False)]
    assert app.of(DataEnd) == [DataEnd(len(app.data()), False, 0, False)]
    assert app.of(DataStart) == [] and app.of(Noop) == [Noop()]
    assert app.conn.state == IDLE


def test_one_chunk_last_and_bdat_0_last(feed):
    """BDAT n LAST is a whole message; BDAT 0 LAST ends one (here after a
    chunk whose last octet is a CR, which then stays a CR)."""
    app = run(feed, ENV + bdat(b"a: b\r\n\r\nbody\r\n", last=True)
              + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"
              + bdat(b"x\r") + b"BDAT 0 LAST\r\n", cfg())
    assert after_ehlo(app) == HEAD + [QUEUED] + HEAD + ["250 2.0.0 2 octets received", QUEUED]
    assert [e.size for e in app.of(DataEnd)] == [11, 2]
    assert app.data() == b"a: b\n\nbody\nx\r"


def test_count_and_last_are_case_and_space_tolerant(feed):
    app = run(feed, ENV + b"bdat 003 last\r\nabc", cfg())
    assert app.of(BdatStart) == [BdatStart(3, True)]
    assert after_ehlo(app) == HEAD + [QUEUED]


def test_no_354_for_bdat_and_the_states(feed):
    """The 354 that lets a BDAT message begin is not sent; BDAT between
    chunks, CHUNK while reading one; `receiving` from the first chunk to the end."""
    app = run(feed, ENV + b"BDAT 4\r\nab", cfg())
    assert "354" not in app.output.decode()
    assert app.conn.state == CHUNK and app.conn.receiving
    app.conn.receive_data(b"cd")
    app.drain()
    assert app.conn.state == BDAT and app.conn.receiving
    assert app.lines[-1] == "250 2.0.0 4 octets received"


def test_hops_and_bare_lf_see_across_chunk_boundaries(feed):
    """Line checks see the message a DATA would deliver: Received lines cut
    by chunks count; a LF that is not after a CR (the CR in the chunk
    before counts) fails the message, the rest of the chunk is read, the
    session goes on (chunk framing is exact, nothing can be smuggled)."""
    hops = b"Received: a\r\n" * 3
    app = run(feed, ENV + bdat(hops[:5]) + bdat(hops[5:20]) + bdat(hops[20:] + b"\r\n", last=True),
              cfg(max_hops=3))
    assert app.of(DataEnd)[0].hops == 3
    assert after_ehlo(app)[-1] == "554 5.4.6 too many hops, this message is looping"

    app = run(feed, ENV + bdat(b"a\r\nb\nc", last=False) + bdat(b"more", last=True)
              + b"NOOP\r\n", cfg())
    assert app.of(DataEnd) == [DataEnd(3, False, 0, True)]
    assert app.data() == b"a\nb"       # what came before the bare LF (never delivered)
    assert after_ehlo(app) == HEAD + [str(REPLIES["bare_lf"]),
                                      str(REPLIES["bdat_failed"]), "250 2.0.0 ok"]
    assert app.conn.state == IDLE and not app.conn.closing


def test_oversize_is_refused_when_its_chunk_is_read(feed):
    """Past databytes the chunk is still read to its end, nothing past the
    limit stored, then 552; the BDATs pipelined after it: 503, their octets
    discarded; a new MAIL starts over."""
    big = b"x" * 40 + b"\r\n"
    wire = (ENV + bdat(big) + bdat(big) + bdat(big, last=True)
            + b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n" + bdat(b"ok\r\n", last=True))
    app = run(feed, wire, cfg(databytes=60))
    assert after_ehlo(app) == HEAD + ["250 2.0.0 42 octets received",
                                      str(REPLIES["size_exceeded"]), str(REPLIES["bdat_failed"])] \
        + HEAD + [QUEUED]
    first = app.of(DataEnd)[0]
    assert first.oversized and first.size == 82
    assert len(app.data()) == 60 + 3
    assert not app.conn.bdat_failed and app.conn.bad_commands == 0


def test_bdat_outside_a_transaction_reads_and_drops_its_octets(feed):
    """503 before MAIL and before RCPT, after a completed BDAT LAST; the
    octets are never parsed as commands."""
    app = run(feed, b"EHLO c\r\n" + bdat(b"QUIT\r\n") + b"MAIL FROM:<a@b.example>\r\n"
              + bdat(b"QUIT\r\n", last=True) + b"RCPT TO:<c@d.example>\r\n"
              + bdat(b"z", last=True) + bdat(b"QUIT\r\n", last=True) + b"NOOP\r\n", cfg())
    assert after_ehlo(app) == [str(REPLIES["mail_first"]), "250 2.1.0 ok",
                               str(REPLIES["rcpt_first"]), "250 2.1.5 ok", QUEUED,
                               str(REPLIES["mail_first"]), "250 2.0.0 ok"]
    assert app.conn.bad_commands == 3
    assert not any(isinstance(e, Closed) for e in app.events)


def test_data_and_rcpt_after_bdat_are_503_and_the_message_goes_on(feed):
    app = run(feed, ENV + bdat(b"a: b\r\n") + b"DATA\r\nRCPT TO:<x@example.com>\r\n"
              + b"MAIL FROM:<x@example.com>\r\n" + bdat(b"\r\nbody\r\n", last=True), cfg())
    assert after_ehlo(app) == HEAD + ["250 2.0.0 6 octets received",
                                      str(REPLIES["data_after_bdat"]),
                                      str(REPLIES["rcpt_after_bdat"]),
                                      str(REPLIES["nested_mail"]), QUEUED]
    assert app.data() == b"a: b\n\nbody\n"


def test_rset_ends_a_bdat_message(feed):
    app = run(feed, ENV + bdat(b"part") + b"RSET\r\n" + bdat(b"x", last=True), cfg())
    assert after_ehlo(app) == HEAD + ["250 2.0.0 4 octets received", "250 2.0.0 flushed",
                                      str(REPLIES["mail_first"])]
    assert app.of(Rset) == [Rset()] and app.of(DataEnd) == []


def test_refused_first_bdat_discards_the_chunk(feed):
    """The application refuses the message (a notorious session's 503, say):
    the reply, the chunk discarded, every BDAT of the transaction 503."""
    app = run(feed, ENV + bdat(b"NOOP\r\n") + bdat(b"more", last=True) + b"NOOP\r\n", cfg(),
              script={BdatStart: REPLIES["no_mailbox"]})
    assert after_ehlo(app) == HEAD + [str(REPLIES["no_mailbox"]), str(REPLIES["bdat_failed"]),
                                      "250 2.0.0 ok"]
    assert app.of(Noop) == [Noop()]


def test_malformed_bdat_with_a_count(feed):
    """A bad argument after a readable count: 501, the octets discarded (the
    client sent them as a chunk), the transaction fails; inside a message
    the message ends refused with the same 501 (DataEnd.bad_bdat)."""
    app = run(feed, ENV + b"BDAT 6 NOW\r\nNOOP\r\n" + bdat(b"x", last=True) + b"NOOP\r\n", cfg())
    assert after_ehlo(app) == HEAD + [str(REPLIES["bdat_syntax"]), str(REPLIES["bdat_failed"]),
                                      "250 2.0.0 ok"]
    assert app.conn.state == IDLE and app.conn.bad_commands == 1

    app = run(feed, ENV + bdat(b"a\r\n") + b"BDAT 6 LAST X\r\nNOOP\r\n" + b"NOOP\r\n", cfg())
    assert after_ehlo(app) == HEAD + ["250 2.0.0 3 octets received",
                                      str(REPLIES["bdat_syntax"]), "250 2.0.0 ok"]
    assert app.of(DataEnd) == [DataEnd(2, False, 0, False, False, True)]
    assert Anomaly("SYNTAX", "BDAT") in app.events


@pytest.mark.parametrize("line", [b"BDAT", b"BDAT x", b"BDAT -1", b"BDAT 1e3",
                                  b"BDAT " + b"9" * 19 + b" LAST"])
def test_unreadable_count_closes(feed, line):
    """Without a chunk size the octets after the line cannot be told from
    commands: 501, then 421 and the connection closes."""
    app = run(feed, ENV + line + b"\r\nQUIT\r\n", cfg())
    assert after_ehlo(app) == HEAD + [str(REPLIES["bdat_syntax"]),
                                      "421 4.5.2 mx.example.com BDAT without a chunk size, "
                                      "closing connection"]
    assert app.conn.state == CLOSED and app.events[-1] == Closed("bdat count")


def test_a_big_count_is_read_in_pieces(feed):
    """The buffer never holds a chunk: each read is consumed (at most a CR
    held), whatever the count."""
    app = run(feed, ENV + b"BDAT 100000000000000000\r\n" + b"x\r\n" * 50, cfg())
    assert len(app.conn._buf) == 0
    assert app.conn.state == CHUNK
    assert app.data() == b"x\n" * 50


def test_eof_inside_a_chunk_closes(feed):
    app = run(feed, ENV + b"BDAT 10\r\nabc", cfg(), eof=True)
    assert app.events[-1] == Closed("eof")
    assert app.of(DataEnd) == []


def test_body_binarymime_is_refused_at_mail(feed):
    """BINARYMIME is not offered (RFC 3030 §3): BODY=BINARYMIME is a bad
    parameter value, 501 5.5.4, as any other BODY value than 7BIT/8BITMIME."""
    app = run(feed, b"EHLO c\r\nMAIL FROM:<a@b.example> BODY=BINARYMIME\r\n", cfg())
    assert after_ehlo(app) == [str(REPLIES["syntax_args"])]
    assert "BINARYMIME" not in app.output.decode()


def test_ehlo_and_help_offer_chunking(feed):
    app = run(feed, b"EHLO c\r\nHELP\r\n", cfg())
    assert app.lines[1:4] == ["250-mx.example.com", "250-PIPELINING", "250-CHUNKING"]
    assert any("features: PIPELINING CHUNKING SIZE" in line for line in app.lines)


def test_bdat_after_helo_works_and_the_session_state(feed):
    """CHUNKING is offered in the EHLO reply; a HELO client's BDAT is taken
    all the same (as DATA), and the transaction state is the RCPT one until
    the first chunk."""
    app = run(feed, b"HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n", cfg())
    assert app.conn.state == RCPT
    app.conn.receive_data(bdat(b"hi\r\n", last=True))
    app.drain()
    assert app.lines[-1] == QUEUED and app.data() == b"hi\n"


def test_reply_text_lives_in_the_table():
    assert reply("bdat_ok", octets=5).line() == b"250 2.0.0 5 octets received\r\n"
