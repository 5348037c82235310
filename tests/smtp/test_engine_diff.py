"""The Cython engine against its pure-Python oracle, on random SMTP streams.

``mailfilter.smtp.engine`` (mailfilter._core) and ``tests/support/pyengine``
(the engine as it was in Python) are driven with the same seeded random
streams: good and bad commands, pipelining, AUTH exchanges, STARTTLS, DATA
with dot-stuffing, Received headers, bare LF and bare CR, long lines, 8-bit
bytes, long header blocks under a header limit, sizes past databytes, BDAT
chunks (cut anywhere, CR and LF apart included; good and bad counts, LAST,
BDAT 0 LAST, pipelined, mixed with DATA, without MAIL/RCPT, oversized); fed
whole, in random fragments and one byte at a time. The application's replies
are drawn from a generator seeded per stream, so both engines get the same
answers as long as they produced the same events. Compared after every
event: the event (type and fields, DataChunks included as cut), the state and
the session attributes; after every read: the bytes written.
"""
from __future__ import annotations

import random

import pytest

from mailfilter.smtp import engine as cy
from mailfilter.smtp.replies import REPLIES, reply
from pyengine import engine as py

STREAMS = 3000          # random fragments; whole and byte-by-byte on a third of them
BYTEWISE_EVERY = 3


# --- stream generation ---------------------------------------------------------------

def _addr(rng: random.Random) -> bytes:
    return rng.choice([
        b"<a@example.org>", b"<>", b"<b.c@d.example>", b"< x@y>", b"<@r1,@r2:u@d.example>",
        b'<"q u"@d.example>', b"<a\\>b@d>", b"<\xc3\xa9t\xc3\xa9@d.example>", b"<\xff@d>",
        b"a@b", b"<a@b", b"<a\x01b@c>", b"<" + b"x" * rng.choice([50, 899, 900]) + b"@d>",
        b"<a@b>x", b"<@nocolon>",
        # SMTPUTF8: a C1 control, an overlong form, a surrogate, a 4-byte character
        b"<a\xc2\x85b@d>", b"<\xc0\xaf@d>", b"<\xed\xa0\x80@d>", b"<\xf0\x9f\x93\xa7@d>",
    ])


def _params(rng: random.Random) -> bytes:
    out = b""
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        out += b" " + rng.choice([
            b"SIZE=1000", b"SIZE=99999999", b"size=12", b"SIZE=x", b"BODY=8BITMIME",
            b"BODY=7bit", b"BODY=binary", b"AUTH=<>", b"AUTH=a+2Bb", b"AUTH=a+zz",
            b"SMTPUTF8", b"SMTPUTF8=1", b"FOO=bar", b"X-Y", b"\xc3\xa9=1", b"", b"NOTIFY=NEVER",
        ])
    return out


def _message(rng: random.Random) -> bytes:
    lines = []
    for _ in range(rng.choice([0, 1, 2, 5])):
        lines.append(rng.choice([b"Received: from x", b"DELIVERED-To: y", b"received",
                                 b"Subject: hi", b" continued", b"\tfolded", b"X" * 70 + b": v",
                                 b"NoColonHeader", b"Delivered", b"A" * 1000 + b": long"]))
    if rng.random() < 0.8:
        lines.append(b"")
    for _ in range(rng.choice([0, 1, 3, 8])):
        lines.append(rng.choice([b"body", b".", b"..", b".dot", b"...x", b"", b"a\rb",
                                 b"\xe9t\xe9 8bit", b"x" * rng.choice([10, 600, 2000]),
                                 b"Received: in body", b". ", b"\r"]))
    sep = b"\r\n"
    msg = b"".join(line + sep for line in lines)
    r = rng.random()
    if r < 0.06:        # a bare LF somewhere (the smuggling forms among them)
        msg += rng.choice([b"x\n", b"\n.\r\n", b"\r\n.\n", b"y\nz\r\n"])
    elif r < 0.1:
        msg += b"bare\rCR\r\n"
    return msg + rng.choice([b".\r\n"] * 9 + [b""])


def _chunks(rng: random.Random, msg: bytes) -> bytes:
    """`msg` (CRLF lines, not dot-stuffed) as BDAT chunks cut at random
    places, pipelined; now and then a count that is off, a malformed BDAT, a
    DATA or RCPT in the middle, or no LAST."""
    cuts = sorted(rng.sample(range(len(msg) + 1), min(len(msg) + 1, rng.choice([0, 1, 2, 5]))))
    parts = [msg[a:b] for a, b in zip([0, *cuts], [*cuts, len(msg)])]
    out = b""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        r = rng.random()
        if r < 0.03:
            out += rng.choice([b"DATA\r\n", b"RCPT TO:<x@y>\r\n", b"MAIL FROM:<a@b>\r\n",
                               b"NOOP\r\n", b"RSET\r\n"])
        elif r < 0.05:
            out += rng.choice([b"BDAT %d X\r\n", b"BDAT %d LAST LAST\r\n", b"BDAT %dx\r\n",
                               b"BDAT\r\n", b"BDAT -%d\r\n"]).replace(b"%d", b"%d" % len(part)) + part
            continue
        n = len(part) + (rng.choice([-1, 1]) if part and rng.random() < 0.03 else 0)
        verb = rng.choice([b"BDAT", b"BDAT", b"bdat"])
        end = rng.choice([b" LAST", b" last", b"  LAST "]) if last and rng.random() < 0.95 else b""
        out += verb + b" %d" % n + end + b"\r\n" + part
    if rng.random() < 0.1:
        out += b"BDAT 0 LAST\r\n"
    return out


def _bdat(rng: random.Random) -> bytes:
    """A BDAT, anywhere: in or out of a transaction; with a stray count."""
    r = rng.random()
    if r < 0.7:
        return _chunks(rng, _message(rng).removesuffix(b".\r\n"))
    return rng.choice([b"BDAT 0 LAST\r\n", b"BDAT 3\r\nabc", b"BDAT 5 LAST\r\nab\r\nc",
                       b"BDAT 0000000000000000001\r\nx", b"BDAT 99999999999999999999\r\n",
                       b"BDAT 2 LAST\r\n\r\n", b"BDAT 4 FOO\r\nNOOP"])


def _command(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.1:
        return rng.choice([b"EHLO client.example", b"HELO client.example", b"ehlo  x ",
                           b"HELO", b"EHLO \xe9x", b"helo " + b"h" * 30]) + b"\r\n"
    if r < 0.3:
        return b"MAIL " + rng.choice([b"FROM:", b"from: ", b"FROM", b"TO:"]) + _addr(rng) \
            + _params(rng) + b"\r\n"
    if r < 0.5:
        return b"RCPT " + rng.choice([b"TO:", b"to:", b"FROM:"]) + _addr(rng) \
            + rng.choice([b"", b"", b" NOTIFY=NEVER", b"  "]) + b"\r\n"
    if r < 0.62:
        return rng.choice([b"DATA", b"data", b"DATA x"]) + b"\r\n" + _message(rng)
    if r < 0.7:
        auth = rng.choice([b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH PLAIN dGVzdA==", b"AUTH",
                           b"AUTH PLAIN =", b"AUTH a b c", b"auth cram-md5", b"AUTH \xe9"])
        return auth + b"\r\n" + rng.choice([b"", b"dGVzdA==\r\n", b"*\r\n",
                                            b"x" * 40 + b"\n", b"y" * 200 + b"\r\n"])
    if r < 0.74:
        return rng.choice([b"STARTTLS", b"starttls", b"STARTTLS now"]) + b"\r\n"
    if r < 0.82:
        return rng.choice([b"RSET", b"NOOP", b"VRFY someone", b"HELP", b"noop x",
                           b"VRFY \xe9"]) + b"\r\n"
    if r < 0.86:
        return _bdat(rng)
    if r < 0.9:
        return rng.choice([b"BDAT 10", b"GET / HTTP/1.0", b"XYZZY", b"", b" MAIL FROM:<a@b>",
                           b"MAIL\tFROM:<a@b>", b"\x00\xff", b"PASS secret"]) + b"\r\n"
    if r < 0.95:
        return rng.choice([b"NOOP\n", b"RSET\r\r\n", b"EHLO x\n", b"\n", b"QUIT\r"])
    if r < 0.98:
        return b"NOOP " + b"z" * rng.choice([100, 510, 600, 3000]) + b"\r\n"
    return b"QUIT\r\n"


def _transaction(rng: random.Random) -> bytes:
    """A well-formed transaction, pipelined (RFC 2920): most streams carry some."""
    out = b"MAIL FROM:<s@example.org>" + rng.choice([b"", b" SIZE=300", b" BODY=8BITMIME"]) + b"\r\n"
    for i in range(rng.choice([1, 1, 2, 3])):
        out += b"RCPT TO:<r%d@example.com>\r\n" % i
    if rng.random() < 0.4:      # the message by CHUNKING (RFC 3030)
        return out + _chunks(rng, _message(rng).removesuffix(b".\r\n"))
    return out + b"DATA\r\n" + _message(rng)


def stream(rng: random.Random) -> bytes:
    parts = [rng.choice([b"EHLO client.example\r\n", b"HELO c\r\n", b""])]
    for _ in range(rng.randint(1, 10)):
        parts.append(_transaction(rng) if rng.random() < 0.4 else _command(rng))
    return b"".join(parts)


def config(mod, rng: random.Random):
    return mod.EngineConfig(
        greeting="mx.example.com",
        max_line=rng.choice([512, 512, 80]),
        max_auth_line=rng.choice([12288, 100]),
        databytes=rng.choice([0, 0, 100, 2500]),
        header_limit=rng.choice([0, 102_400, 30, 200]),
        max_bad_commands=rng.choice([10, 100, 100, 3]),
        max_recipients=rng.choice([1000, 2]),
        smtputf8=rng.random() < 0.5,
        extra_ehlo=rng.choice([[], ["AUTH PLAIN LOGIN"]]),
    )


# --- driving ------------------------------------------------------------------------

def _answer(conn, ev, mod, rng: random.Random):
    """The application's reply: random, but the same draws for the same events."""
    t = type(ev).__name__
    x = rng.random()
    if t == "Helo":
        return conn.ehlo_reply() if ev.verb == "EHLO" else conn.helo_reply()
    if t == "Mail":
        return reply("mail_ok") if x < 0.9 else REPLIES["badmailfrom"]
    if t == "Rcpt":
        return reply("rcpt_ok") if x < 0.9 else REPLIES[rng.choice(["no_mailbox", "no_mailbox_450"])]
    if t in ("DataStart", "BdatStart"):
        return reply("data_go") if x < 0.9 else REPLIES["no_mailbox"]
    if t == "DataEnd":
        return conn.data_end_check(ev) or reply("queued", stamp="1", qid="2")
    if t in ("AuthStart", "AuthResponse"):
        if x < 0.4:
            return reply("auth_challenge", data="VXNlcm5hbWU6")
        return REPLIES[rng.choice(["auth_ok", "auth_failed", "auth_unavailable", "auth_temp"])]
    if t == "StartTLS":
        return REPLIES["starttls_go"] if x < 0.6 else REPLIES["tls_unavailable"]
    raise AssertionError(f"no reply for {ev!r}")


def _value(ev):
    names = type(ev)._fields if hasattr(type(ev), "_fields") else ev.__slots__
    return (type(ev).__name__,) + tuple(getattr(ev, n) for n in names)


def _session(conn):
    return (conn.state, conn.rcpt_count, conn.helo, conn.esmtp, conn.authenticated,
            conn.bad_commands, conn.tls, conn.mail_smtputf8, conn.closing,
            conn.close_reply and conn.close_reply.line(), len(conn._buf), conn.bdat_failed,
            conn.receiving)


def drive(mod, cfg, auth_offered, fragments, seed: int) -> list:
    """Feed `fragments` then EOF; the trace of events, session states and writes."""
    rng = random.Random(seed)
    conn = mod.SMTPConnection(cfg)
    conn.auth_offered = auth_offered
    conn.greet()
    trace: list = [("out", conn.data_to_send())]
    for data in [*fragments, b""]:
        conn.receive_data(data)
        while True:
            ev = conn.next_event()
            if ev is mod.NEED_DATA:
                break
            assert ev is not mod.PAUSED
            trace.append(_value(ev))
            if type(ev).__name__ == "Closed":
                break
            if ev.owes_reply:
                r = _answer(conn, ev, mod, rng)
                conn.send(r, close=rng.random() < 0.01)
                if type(ev).__name__ == "StartTLS" and r.code == 220:
                    conn.tls_started()
            trace.append(_session(conn))
        trace.append(("out", conn.data_to_send()))
        if conn.closing:
            break
    return trace


def fragments(data: bytes, rng: random.Random) -> list[bytes]:
    out, i = [], 0
    while i < len(data):
        n = rng.choice([1, 2, 3, 5, 8, 17, 64, 500, 4096])
        out.append(data[i:i + n])
        i += n
    return out


def _case(seed: int):
    rng = random.Random(seed)
    data = stream(rng)
    cfg_seed = rng.random()
    auth_offered = rng.choice([None, True, False])
    return rng, data, cfg_seed, auth_offered


def _compare(seed: int, feed) -> None:
    rng, data, cfg_seed, auth_offered = _case(seed)
    frags = feed(data, rng)
    got = drive(cy, config(cy, random.Random(cfg_seed)), auth_offered, frags, seed)
    want = drive(py, config(py, random.Random(cfg_seed)), auth_offered, frags, seed)
    if got != want:
        for i, (g, w) in enumerate(zip(got, want)):
            assert g == w, (seed, i, data[:300])
        assert len(got) == len(want), (seed, data[:300])


@pytest.mark.parametrize("block", range(10))
def test_random_fragments(block):
    for seed in range(block, STREAMS, 10):
        _compare(seed, fragments)


@pytest.mark.parametrize("block", range(4))
def test_whole_and_byte_by_byte(block):
    for seed in range(block, STREAMS, 4 * BYTEWISE_EVERY):
        _compare(seed, lambda data, rng: [data])
        _compare(seed, lambda data, rng: [data[i:i + 1] for i in range(len(data))])


def test_streams_exercise_the_engine():
    """The generator reaches what it claims to: every event type, bare LF ends,
    header cuts, oversized messages, closes by errors and by QUIT."""
    seen = set()
    for seed in range(300):
        rng, data, cfg_seed, auth_offered = _case(seed)
        bdat = False
        for item in drive(cy, config(cy, random.Random(cfg_seed)), auth_offered, [data], seed):
            if item[0] in ("DataStart", "BdatStart"):
                bdat = item[0] == "BdatStart"
            if item[0] == "DataEnd":
                seen.add("DataEnd")
                flags = {k for k, v in zip(("oversized", "hops", "bare_lf", "header_cut",
                                            "bad_bdat"), item[2:]) if v}
                seen.update(flags)
                if bdat:
                    seen.update("BDAT " + k for k in flags)
            elif item[0] == "out":
                seen.update(w for w in (b"octets received", b"BDAT after a failed",
                                        b"DATA after BDAT", b"BDAT without a chunk")
                            if w in item[1])
            elif item[0] == "Closed":
                seen.add("Closed " + item[1])
            elif isinstance(item[0], str) and item[0] not in ("out",) and item[0].isalpha():
                seen.add(item[0])
    for name in ("Helo", "Mail", "Rcpt", "DataStart", "DataChunk", "DataEnd", "AuthStart",
                 "AuthResponse", "StartTLS", "Rset", "Noop", "Vrfy", "Help", "Quit", "Anomaly",
                 "oversized", "hops", "bare_lf", "header_cut", "Closed quit", "Closed eof",
                 "Closed too many errors", "Closed bare lf", "BdatStart", "bad_bdat",
                 "Closed bdat count", b"octets received", b"BDAT after a failed",
                 b"DATA after BDAT", b"BDAT without a chunk", "BDAT oversized", "BDAT hops",
                 "BDAT bare_lf", "BDAT header_cut"):
        assert name in seen, name


# --- the DATA byte machine alone, on header blocks near the header limit ---------------

def _header_message(rng: random.Random) -> bytes:
    """Header lines of every kind the Postfix header-end rule tells apart
    (names of 1 to 999 octets, continuations, lines with no colon, an empty
    line or none), then a short body, dot-stuffed, CRLF.CRLF-terminated."""
    lines = []
    for _ in range(rng.randint(0, 12)):
        k = rng.random()
        if k < 0.5:
            name = b"N" * rng.choice([1, 5, 40, 996, 997, 998, 999])
            lines.append(name + b":" + b"v" * rng.choice([0, 3, 50, 300]))
        elif k < 0.65:
            lines.append(rng.choice([b" ", b"\t"]) + b"c" * rng.choice([0, 10, 200]))
        elif k < 0.75:
            lines.append(rng.choice([b"Received: a", b"delivered-to: b", b"RECEIVEDX"]))
        elif k < 0.85:
            lines.append(b"x" * rng.choice([1, 30, 997, 998]))
        else:
            lines.append(rng.choice([b":colon first", b".dotted: v", b"\xe9: v", b"a b: v"]))
    if rng.random() < 0.7:
        lines.append(b"")
    lines += [rng.choice([b"body", b"..x", b"", b"y" * 100]) for _ in range(rng.randint(0, 4))]
    body = b"".join((b"." + ln if ln[:1] == b"." else ln) + b"\r\n" for ln in lines)
    if rng.random() < 0.05:
        body += b"bare\nlf"
    return body + b".\r\nNOOP\r\n"


def _read(mod, data_mod, msg: bytes, frags: list, databytes: int, limit: int) -> list:
    from collections import deque
    buf, events = bytearray(), deque()
    reader = data_mod.DataReader(buf, events, databytes, limit)
    out = []
    for frag in frags:
        buf += frag
        if reader.step() is not None:
            break
    out = [_value(ev) for ev in events]
    return out + [bytes(buf), reader.header_cut]


def test_data_reader_header_limit():
    from mailfilter.smtp import data as cy_data
    from pyengine import data as py_data
    for seed in range(1500):
        rng = random.Random(seed)
        msg = _header_message(rng)
        limit = rng.choice([0, 1, 2, 10, 50, 300, 1000, 1100, 2000])
        databytes = rng.choice([0, 0, 0, 100, 1500])
        frags = fragments(msg, rng) if seed % 3 else [msg[i:i + 1] for i in range(len(msg))]
        got = _read(cy, cy_data, msg, frags, databytes, limit)
        want = _read(py, py_data, msg, frags, databytes, limit)
        assert got == want, (seed, limit, databytes, msg[:200])
