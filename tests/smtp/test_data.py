"""mailfilter.smtp.data: the DATA byte machine on its own.

The engine tests drive it through SMTPConnection; here it is fed directly, and
a line-by-line reference (what the bulk operations must amount to) is compared
with it on random messages cut into random fragments.
"""
from __future__ import annotations

import random
import re
from collections import deque

import pytest

from mailfilter.smtp.data import HEADER_SIZE_LIMIT, DataReader
from mailfilter.smtp.events import DataChunk, DataEnd


class Fed:
    """A DataReader with its own buffer and queue, fed in fragments."""

    def __init__(self, databytes: int = 0, header_limit: int = HEADER_SIZE_LIMIT) -> None:
        self.buf = bytearray()
        self.events: deque = deque()
        self.reader = DataReader(self.buf, self.events, databytes, header_limit)
        self.ends: list = []

    def feed(self, data: bytes) -> DataEnd | None:
        self.buf += data
        end = self.reader.step()
        if end is not None:
            self.ends.append(end)
        return end

    def stored(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, DataChunk))


def reference(lines: list[bytes]) -> tuple[bytes, int]:
    """Stored form and hop count, a line at a time: CRLF -> LF, one leading dot
    dropped; Received/Delivered lines counted up to the first empty line."""
    stored = [line[1:] if line[:1] == b"." else line for line in lines]
    hops = 0
    for line in stored:
        if not line:
            break
        low = line.lower()
        hops += low.startswith(b"received") or low.startswith(b"delivered")
    return b"".join(line + b"\n" for line in stored), hops


PIECES = [b"Received: x", b"DELIVERED-To: y", b"delivered", b"receive", b"Subject: s", b"",
          b".", b"..", b".Received: z", b"a\rb", b"x\r", b"\r", b"...", b".\r", b"y" * 40]


@pytest.mark.parametrize("seed", range(300))
def test_random_messages_in_random_fragments_match_the_reference(seed):
    rnd = random.Random(seed)
    lines = [rnd.choice(PIECES) for _ in range(rnd.randint(0, 12))]
    lines = [line for line in lines if line != b"."]          # "." alone is the end
    wire = b"".join(line + b"\r\n" for line in lines) + b".\r\n" + b"NOOP\r\n"
    fed = Fed()
    i = 0
    while i < len(wire) and not fed.ends:
        n = rnd.randint(1, 9)
        fed.feed(wire[i:i + n])
        i += n
        assert fed.ends or len(fed.buf) <= 4          # only an end-marker prefix is kept
    stored, hops = reference(lines)
    assert fed.stored() == stored
    assert fed.ends == [DataEnd(len(stored), False, hops, False)]
    assert fed.events[-1] is fed.ends[0]               # the DataEnd comes after its chunks
    assert bytes(fed.buf) + wire[i:] == b"NOOP\r\n"     # what follows is left alone


def test_incomplete_input_returns_none():
    fed = Fed()
    assert fed.feed(b"") is None and fed.feed(b".") is None and fed.feed(b"\r") is None
    assert fed.events == deque() and fed.buf == b".\r"
    assert fed.feed(b"\n") == DataEnd(0, False, 0, False)   # "." first: an empty message


def test_reset_starts_a_new_message():
    """Size, hops, the header state and the first-line rule start over."""
    fed = Fed()
    fed.feed(b"Received: a\r\n\r\nbody\r\n.\r\n")
    assert fed.ends == [DataEnd(18, False, 1, False)]
    fed.reader.reset()
    fed.events.clear()
    fed.feed(b".Received: b\r\nReceived: c\r\n.\r\n")
    assert fed.stored() == b"Received: b\nReceived: c\n"
    assert fed.ends[1] == DataEnd(24, False, 2, False)


def test_databytes_cuts_the_chunks_not_the_count():
    fed = Fed(databytes=5)
    fed.feed(b"abc\r\n")
    fed.feed(b"defgh\r\n.\r\n")
    assert fed.stored() == b"abc\nd"
    assert fed.ends == [DataEnd(10, True, 0, False)]


def test_bare_lf_ends_at_once_and_discards_the_input():
    fed = Fed()
    end = fed.feed(b"good\r\nbad\nMAIL FROM:<x@y>\r\n")
    assert end == DataEnd(8, False, 0, True)
    assert fed.stored() == b"good\nbad"
    assert fed.buf == b""


# --- the header cap (docs/behaviour/smtp.md#data, Postfix header_size_limit) -------------
HEADER_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]{1,997}:")   # RFC 5322 3.6.8, a 998-octet line


def split_header(stored: bytes) -> tuple[bytes, bytes]:
    """The header block and the rest, a line at a time: the block ends at the
    first line that is neither a header field nor a continuation (an empty
    line included), as Postfix ends it."""
    i = 0
    while i < len(stored):
        j = stored.find(b"\n", i)
        line = stored[i:] if j < 0 else stored[i:j]
        if not (HEADER_LINE.match(line) or line[:1] in (b" ", b"\t")):
            break
        i = len(stored) if j < 0 else j + 1
    return stored[:i], stored[i:]


def capped(stored: bytes, limit: int) -> bytes:
    """The reference cut: the header block kept to `limit` octets, a cut
    line ending in LF, the body whole."""
    head, body = split_header(stored)
    if len(head) <= limit:
        return stored
    head = head[:limit]
    return (head if head.endswith(b"\n") else head + b"\n") + body


HEADER_PIECES = [b"Received: x", b"DELIVERED-To: y", b".Received: z", b"X-Long: " + b"z" * 50,
                 b"\tcontinued " + b"w" * 30, b"Subject: " + b"s" * 9, b" folded", b"..dot: d",
                 b"a:", b"!~#: x", b"n" * 997 + b":"]
BODY_PIECES = [b"", b"This is body", b"no colon", b"Bad Name: x", b":x", b"X\x80: y", b"a\rb",
               b"x\r", b"\r", b"...", b"y" * 40, b"Subject : s", b"delivered", b"n" * 998 + b":"]


def random_lines(rnd: random.Random) -> list[bytes]:
    """Header fields and continuations, with now and then a line that ends the block."""
    return [rnd.choice(BODY_PIECES if rnd.random() < 0.15 else HEADER_PIECES)
            for _ in range(rnd.randint(0, 20))]


def feeds(wire: bytes, rnd: random.Random):
    """The same input whole, byte by byte, and in random fragments."""
    yield [wire]
    yield [wire[i:i + 1] for i in range(len(wire))]
    cuts, i = [], 0
    while i < len(wire):
        n = rnd.randint(1, 40)
        cuts.append(wire[i:i + n])
        i += n
    yield cuts


@pytest.mark.parametrize("seed", range(300))
def test_header_cap_matches_the_reference_however_fed(seed):
    rnd = random.Random(seed)
    lines = random_lines(rnd)
    wire = b"".join(line + b"\r\n" for line in lines) + b".\r\n"
    limit = rnd.choice([rnd.randint(1, 120), rnd.randint(1, 2500)])
    stored, hops = reference(lines)
    for pieces in feeds(wire, rnd):
        fed = Fed(header_limit=limit)
        for piece in pieces:
            fed.feed(piece)
        assert fed.stored() == capped(stored, limit), (limit, len(pieces))
        # size and hops count what the client sent, not what was kept
        cut = len(split_header(stored)[0]) > limit
        assert fed.ends == [DataEnd(len(stored), False, hops, False, cut)]
        assert fed.reader.header_cut == cut


def test_the_header_block_ends_at_the_first_line_that_is_not_a_header_field():
    """Postfix's rule: a non-header line and all after it are body, never cut."""
    fed = Fed(header_limit=12)
    fed.feed(b"Subject: a long subject\r\n folded on\r\nnot a header\r\n"
             b"X-Later: " + b"x" * 50 + b"\r\n.\r\n")
    assert fed.stored() == b"Subject: a l\nnot a header\nX-Later: " + b"x" * 50 + b"\n"
    assert fed.reader.header_cut


def test_a_line_start_split_across_reads_is_judged_whole():
    """"Subj" + "ect: ..." is a header field, "Thi" + "s is body" is body."""
    for first, second, kept in [(b"Subj", b"ect: " + b"s" * 30, b""),
                                (b"Thi", b"s is body", b"This is body\n")]:
        fed = Fed(header_limit=10)
        fed.feed(b"X: 1234567\r\n" + first)
        fed.feed(second + b"\r\n.\r\n")
        assert fed.stored() == b"X: 1234567\n" + kept


@pytest.mark.parametrize("limit", [1, 100, HEADER_SIZE_LIMIT, 500_000])
def test_760_kb_of_body_lines_without_an_empty_line_are_stored_whole(limit):
    """A script's output submitted as is (no header, no empty line) loses nothing."""
    body = b"".join(b"line %d of the nightly report, status ok\r\n" % i for i in range(18_000))
    assert len(body) > 760_000
    rnd = random.Random(limit)
    for pieces in list(feeds(body + b".\r\n", rnd))[::2]:      # whole, random fragments
        fed = Fed(header_limit=limit)
        for piece in pieces:
            fed.feed(piece)
        assert fed.stored() == body.replace(b"\r\n", b"\n")
        assert not fed.reader.header_cut


def test_a_9_mb_header_field_without_an_empty_line_is_cut_and_the_body_kept():
    wire = b"Subject: hi\r\nX-Huge: " + b"h" * (9 << 20) + b"\r\n\tmore\r\nreport line\r\n.\r\n"
    fed = Fed()
    for i in range(0, len(wire), 65536):
        fed.feed(wire[i:i + 65536])
    stored = fed.stored()
    assert len(stored) == HEADER_SIZE_LIMIT + len(b"\nreport line\n")
    assert stored.startswith(b"Subject: hi\nX-Huge: hhh") and stored.endswith(b"h\nreport line\n")
    assert fed.reader.header_cut


def test_a_9_mb_header_line_is_cut_to_the_limit_and_the_body_kept():
    """The 9 MB header line is stored as its first 102,400 octets and a LF;
    the empty line and the body follow; fed whole, in bulk."""
    wire = (b"Subject: hi\r\nX-Huge: " + b"h" * (9 << 20) + b"\r\nTo: a@b\r\n\r\nbody\r\n.\r\n")
    fed = Fed()
    fed.feed(wire)
    stored = fed.stored()
    head, sep, body = stored.partition(b"\n\n")
    assert sep and body == b"body\n"
    assert len(head) == HEADER_SIZE_LIMIT and head.startswith(b"Subject: hi\nX-Huge: hhh")
    assert fed.reader.header_cut
    assert fed.ends[0].size == len(wire.replace(b"\r\n", b"\n")) - len(b".\n")


def test_the_cap_is_per_message_and_zero_means_none():
    fed = Fed(header_limit=8)
    fed.feed(b"Subject: long\r\n\r\nSubject: body is not header\r\n.\r\n")
    assert fed.stored() == b"Subject:\n\nSubject: body is not header\n"
    fed.reader.reset()
    fed.events.clear()
    fed.feed(b"A: 1\r\n\r\nb\r\n.\r\n")
    assert fed.stored() == b"A: 1\n\nb\n" and not fed.reader.header_cut
    unlimited = Fed(header_limit=0)
    unlimited.feed(b"X: " + b"x" * 200_000 + b"\r\n.\r\n")
    assert unlimited.stored() == b"X: " + b"x" * 200_000 + b"\n"
