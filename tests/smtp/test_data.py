"""mailfilter.smtp.data: the DATA byte machine on its own.

The engine tests drive it through SMTPConnection; here it is fed directly, and
a line-by-line reference (what the bulk operations must amount to) is compared
with it on random messages cut into random fragments.
"""
from __future__ import annotations

import random
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
def split_header(stored: bytes) -> tuple[bytes, bytes]:
    """The header block (up to and with the LF before the first empty line), the rest."""
    i = (b"\n" + stored).find(b"\n\n")
    return (stored, b"") if i < 0 else (stored[:i], stored[i:])


def capped(stored: bytes, limit: int) -> bytes:
    """The reference cut: the header block kept to `limit` octets, a cut
    line ending in LF, the body whole."""
    head, body = split_header(stored)
    if len(head) <= limit:
        return stored
    head = head[:limit]
    return (head if head.endswith(b"\n") else head + b"\n") + body


HEADER_PIECES = PIECES + [b"X-Long: " + b"z" * 50, b"\tcontinued " + b"w" * 30, b"Subject: " + b"s" * 9]


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


@pytest.mark.parametrize("seed", range(200))
def test_header_cap_matches_the_reference_however_fed(seed):
    rnd = random.Random(seed)
    lines = [rnd.choice(HEADER_PIECES) for _ in range(rnd.randint(0, 14))]
    lines = [line for line in lines if line != b"."]
    wire = b"".join(line + b"\r\n" for line in lines) + b".\r\n"
    limit = rnd.randint(1, 120)
    stored, hops = reference(lines)
    for pieces in feeds(wire, rnd):
        fed = Fed(header_limit=limit)
        for piece in pieces:
            fed.feed(piece)
        assert fed.stored() == capped(stored, limit), pieces
        # size and hops count what the client sent, not what was kept
        cut = len(split_header(stored)[0]) > limit
        assert fed.ends == [DataEnd(len(stored), False, hops, False, cut)]
        assert fed.reader.header_cut == cut


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
