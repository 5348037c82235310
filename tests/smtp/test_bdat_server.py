"""CHUNKING / BDAT on real sockets, on both event loops (docs/behaviour/smtp.md#chunking).

smtplib has no BDAT, so the client is tests/support/server_harness.py's
RawClient on a blocking socket: chunks written as raw bytes, replies read
line by line, each wait bounded by the client's timeout. The server runs
in-process (the `start` fixture, both event loops) with a real maildir, and
once as a spawned `mailfilter serve`.
"""
from __future__ import annotations

import random

from mailfilter.smtp.protocol import Limits
from tests.smtp.test_slow_clients import dribble
from tests.support.server_harness import (
    PLAIN, SMALL, RawClient, first, maildir_files, read_new, spawn_serve, write_rules,
)

ENVELOPE = b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\n"


def connect(port: int, source: str = PLAIN) -> RawClient:
    c = RawClient(port, source)
    assert c.reply()[0] == 220
    code, texts = c.cmd("EHLO client.test")
    assert code == 250 and texts[1:3] == ["PIPELINING", "CHUNKING"]
    assert "BINARYMIME" not in texts
    return c


def big_message(size: int, seed: int) -> bytes:
    """About `size` octets of CRLF lines: headers, then lines of every length
    up to 998, dots first, 8-bit bytes, a bare CR now and then."""
    rng = random.Random(seed)
    out = [b"From: a@sender.test\r\nTo: user@example.com\r\nSubject: big\r\n\r\n"]
    n = len(out[0])
    while n < size:
        line = bytes(rng.randrange(32, 256) for _ in range(rng.choice([0, 1, 60, 76, 998])))
        if rng.random() < 0.05:
            line = b"." + line[1:]
        if rng.random() < 0.01:
            line += b"\r"
        out.append(line + b"\r\n")
        n += len(line) + 2
    return b"".join(out)


def chunks(msg: bytes, rng: random.Random) -> list[bytes]:
    """`msg` cut into chunks of varied sizes (1 octet to 200 KB)."""
    out, i = [], 0
    while i < len(msg):
        n = rng.choice([1, 2, 999, 4096, 65536, 200_000])
        out.append(msg[i:i + n])
        i += n
    return out


def test_a_1mb_message_in_chunks_is_stored_as_data_stores_it(start):
    """The same 1 MB message by DATA (dot-stuffed) and by BDAT in chunks of
    varied sizes, each chunk answered before the next is sent: the same
    stored bytes apart from the Received header's date."""
    srv = start()
    msg = big_message(1_000_000, seed=3)
    c = connect(srv.port)
    c.send(ENVELOPE + b"DATA\r\n")
    assert [r[0] for r in c.replies(3)] == [250, 250, 354]
    c.send(msg.replace(b"\r\n.", b"\r\n..") + b".\r\n")
    assert first(c.reply()).startswith("250 2.0.0 ok")
    c.send(ENVELOPE)
    assert [r[0] for r in c.replies(2)] == [250, 250]
    parts = chunks(msg, random.Random(4))
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        c.send(b"BDAT %d%s\r\n" % (len(part), b" LAST" if last else b"") + part)
        r = first(c.reply())
        assert r.startswith("250 2.0.0 ok") if last else r == f"250 2.0.0 {len(part)} octets received"
    assert c.cmd("QUIT")[0] == 221
    c.close()
    by_data, by_bdat = read_new(srv.maildir)      # file names sort by time
    head_d, _, body_d = by_data.partition(b"\nFrom: a@sender.test\n")
    head_b, _, body_b = by_bdat.partition(b"\nFrom: a@sender.test\n")
    assert body_d == body_b == msg.replace(b"\r\n", b"\n")[len(b"From: a@sender.test\n"):]
    assert head_d.split(b"; ")[0] == head_b.split(b"; ")[0]
    assert maildir_files(srv.maildir, "tmp") == []


def test_pipelined_bdat_stream_answered_in_order(start, decisions):
    """RFC 2920 / RFC 3030 §4.2: envelope and every chunk in one write, the
    replies in order and in one write up to the first delivery; a second
    transaction behind the first."""
    srv = start()
    c = connect(srv.port)
    proto = srv.connections[-1]
    one = b"Subject: p\r\n\r\nline one\r\n"
    c.send(ENVELOPE + b"BDAT 5\r\n" + one[:5] + b"BDAT %d\r\n" % (len(one) - 5) + one[5:]
           + b"BDAT 0 LAST\r\n" + ENVELOPE + b"BDAT 8 LAST\r\nx: y\r\n\r\nNOOP\r\n")
    replies = [first(c.reply()) for _ in range(9)]
    assert replies[:4] == ["250 2.1.0 ok", "250 2.1.5 ok", "250 2.0.0 5 octets received",
                           f"250 2.0.0 {len(one) - 5} octets received"]
    assert replies[4].startswith("250 2.0.0 ok ") and replies[7].startswith("250 2.0.0 ok ")
    assert replies[8] == "250 2.0.0 ok"         # the NOOP
    assert replies[5:7] == ["250 2.1.0 ok", "250 2.1.5 ok"]
    # the replies before the first delivery's wait left in one write
    assert ("\r\n".join(replies[:4]) + "\r\n").encode() in proto.writes
    c.close()
    srv.wait_lost()
    stored = read_new(srv.maildir)
    assert len(stored) == 2 and stored[0].endswith(b"Subject: p\n\nline one\n")
    lines = [line for line in decisions() if "stage=DATA" in line]
    assert len(lines) == 2 and all(" body=bdat " in line for line in lines)


def test_oversize_bdat_is_refused_its_octets_discarded_the_session_usable(start, decisions):
    """DATABYTES=2000: a 5000-octet chunk is read to its end, 552; the chunk
    pipelined after it is 503 and discarded (its text is never a command);
    then a new transaction is stored."""
    srv = start()
    c = connect(srv.port, SMALL)
    c.send(ENVELOPE + b"BDAT 5000\r\n" + b"y" * 4998 + b"\r\n"
           + b"BDAT 6 LAST\r\nQUIT\r\n" + b"NOOP\r\n")
    assert [first(c.reply()) for _ in range(5)] == [
        "250 2.1.0 ok", "250 2.1.5 ok",
        "552 5.3.4 sorry, that message size exceeds my databytes limit",
        "503 5.5.1 BDAT after a failed BDAT, chunk discarded", "250 2.0.0 ok"]
    c.send(ENVELOPE + b"BDAT 15 LAST\r\nSubject: ok\r\n\r\n")
    assert [r[0] for r in c.replies(3)] == [250, 250, 250]
    c.close()
    srv.wait_lost()
    [raw] = read_new(srv.maildir)
    assert raw.endswith(b"Subject: ok\n\n")
    assert maildir_files(srv.maildir, "tmp") == []
    [refused] = [line for line in decisions() if "action=reject stage=DATA" in line]
    assert "reason=size_exceeded" in refused and " body=bdat " in refused


def test_data_after_bdat_and_bdat_without_count(start):
    srv = start()
    c = connect(srv.port)
    c.send(ENVELOPE + b"BDAT 3\r\nabcDATA\r\nRSET\r\nBDAT x\r\n")
    assert [first(c.reply()) for _ in range(7)] == [
        "250 2.1.0 ok", "250 2.1.5 ok", "250 2.0.0 3 octets received",
        "503 5.5.1 DATA after BDAT", "250 2.0.0 flushed",
        "501 5.5.4 syntax: BDAT count [LAST]",
        "421 4.5.2 mx.test BDAT without a chunk size, closing connection"]
    assert c.at_eof()
    c.close()
    srv.wait_lost()
    assert read_new(srv.maildir) == [] and maildir_files(srv.maildir, "tmp") == []


def test_a_slow_chunk_meets_the_data_rate_minimum(start, decisions):
    """The data-rate limit holds inside BDAT chunks as in DATA: 100 bytes/s
    against 1,000 bytes/s over 1 s windows is closed, nothing stored."""
    srv = start(limits=Limits(idle_timeout=5, session_deadline=60, data_min_rate=1000,
                              data_rate_window=1.0))
    c = connect(srv.port)
    c.send(ENVELOPE + b"BDAT 100000 LAST\r\n")
    assert [r[0] for r in c.replies(2)] == [250, 250]
    sent, r = dribble(c, [b"x" * 8 + b"\r\n"] * 200)
    assert sent < 200
    assert first(r) == "421 4.4.2 mx.test message data too slow, closing connection"
    assert c.at_eof()
    c.close()
    srv.wait_lost()
    assert maildir_files(srv.maildir) == [] and maildir_files(srv.maildir, "tmp") == []
    assert any("action=close reason=data_too_slow" in line for line in decisions())


def test_spawned_serve_takes_a_chunked_message(tmp_path):
    """`mailfilter serve` as an operator starts it: CHUNKING offered, a
    message in pipelined chunks (one cut between CR and LF) stored, one
    DATA-stage decision line with body=bdat."""
    rules = write_rules(tmp_path / "rules")
    sp = spawn_serve("--rules", rules, "--deliver", f"maildir:{tmp_path}/spool")
    try:
        c = connect(sp.port)
        msg = b"Subject: spawned\r\n\r\n.first\r\nsecond\r\n"
        cut = msg.index(b"\r\nsecond") + 1
        c.send(ENVELOPE + b"BDAT %d\r\n" % cut + msg[:cut]
               + b"BDAT %d LAST\r\n" % (len(msg) - cut) + msg[cut:] + b"QUIT\r\n")
        replies = [first(c.reply()) for _ in range(5)]
        assert replies[:3] == ["250 2.1.0 ok", "250 2.1.5 ok", f"250 2.0.0 {cut} octets received"]
        assert replies[3].startswith("250 2.0.0 ok ") and replies[4].startswith("221 ")
        c.close()
        [line] = [m.group(0) for m in sp.log.wait_for(r"action=accept stage=DATA .*")]
        assert " body=bdat " in line and f" size={len(msg) - 4} " in line, line
        [raw] = read_new(tmp_path / "spool")
        assert raw.endswith(b"Subject: spawned\n\n.first\nsecond\n")
    finally:
        assert sp.stop() == 0


def test_notorious_session_first_bdat_is_503_and_closed(start, tmp_path, decisions):
    """TARPITDELAY=999: the first BDAT is answered as DATA would be, 503 and
    the session ends; its chunk and what follows are never run."""
    rules = write_rules(tmp_path / "notorious",
                        {"tcp.smtp": '127.0.0.1:allow,TARPITCOUNT="1",TARPITDELAY="999"\n:allow\n'})
    srv = start(rules=rules)
    c = connect(srv.port)
    c.send(ENVELOPE + b"RCPT TO:<nobody@example.com>\r\nRCPT TO:<x@example.com>\r\n"
           b"BDAT 4 LAST\r\nab\r\nMAIL FROM:<after-close@example.org>\r\n")
    replies = [first(c.reply()) for _ in range(5)]
    assert replies[-1] == "503 5.5.1 DATA command not accepted at this time"
    assert c.at_eof()
    c.close()
    srv.wait_lost()
    assert read_new(srv.maildir) == []
    assert not [line for line in decisions() if "after-close" in line]


def test_content_checks_see_a_chunked_attachment(start, decisions):
    """BADMIMETYPE: an MZ attachment sent in 3-octet chunks is refused at
    LAST as it is after DATA, 554 5.3.2, nothing stored."""
    from tests.smtp.test_server import EXE_B64, mime_message
    from tests.support.server_harness import CONTENT
    srv = start()
    c = connect(srv.port, CONTENT)
    msg = mime_message(EXE_B64).removesuffix(b".\r\n")
    parts = [msg[i:i + 3] for i in range(0, len(msg), 3)]
    c.send(ENVELOPE + b"".join(b"BDAT %d\r\n" % len(p) + p for p in parts) + b"BDAT 0 LAST\r\n")
    replies = [first(c.reply()) for _ in range(len(parts) + 3)]
    assert replies[2:-1] == ["250 2.0.0 3 octets received"] * (len(parts) - 1) \
        + [f"250 2.0.0 {len(parts[-1])} octets received"]
    assert replies[-1] == "554 5.3.2 sorry, invalid message content"
    c.close()
    srv.wait_lost()
    assert read_new(srv.maildir) == [] and maildir_files(srv.maildir, "tmp") == []
    [line] = [line for line in decisions() if "stage=DATA" in line]
    assert "rule=badmimetypes:1 " in line and " body=bdat " in line
