"""The pure-Python DATA byte machine: the test oracle of _core/smtp_data.pxi
(tests/smtp/test_engine_diff.py). Its contract is mailfilter/smtp/data.py's
docstring; never imported by the package.
"""
from __future__ import annotations

import re
from collections import deque

from .events import DataChunk, DataEnd

__all__ = ["DataReader", "HEADER_SIZE_LIMIT"]

HEADER_SIZE_LIMIT = 102_400     # Postfix's header_size_limit, the usual value of --header-size-limit

_END = b"\r\n.\r\n"
_CRLF = b"\r\n"
_LF = b"\n"
_LFDOT = b"\n."
_HDR_END = b"\n\n"
# RFC 5322 section 3.6.8: a field name is printable ASCII but ':'; section 2.1.1:
# a line is at most 998 octets, so a name has at most 997 (and its ':')
_NAME = rb"\x21-\x39\x3b-\x7e"
_MAX_NAME = 997
_NAME_RUN = re.compile(rb"[" + _NAME + rb"]*")
# a LF starting a body line: an empty line, a first octet that neither starts a
# name nor a continuation, a name not followed by ':', or a name too long
_BODY_LINE = re.compile(rb"\n(?:[^" + _NAME + rb" \t]|[" + _NAME + rb"]{1,997}+[^" + _NAME
                        + rb":]|[" + _NAME + rb"]{998})")
_RECEIVED = b"\nreceived"
_DELIVERED = b"\ndelivered"


class DataReader:
    """One DATA byte machine, bound to the engine's input buffer and event
    queue; ``reset()`` before each message, ``step()`` whenever bytes arrived."""

    __slots__ = ("_buf", "_events", "_databytes", "_size", "_oversized", "_hops",
                 "_in_headers", "_hcarry", "_hskip", "_first",
                 "_header_limit", "_hpos", "_hname", "_hheld", "_hkept_lf", "header_cut",
                 "chunk_size", "chunk_left", "_last", "_cr", "_discard", "_bad")

    def __init__(self, buf: bytearray, events: deque, databytes: int,
                 header_limit: int = 0) -> None:
        self._buf = buf
        self._events = events
        self._databytes = databytes     # 0 = unlimited
        self._header_limit = header_limit   # 0 = unlimited
        self.reset()

    def reset(self) -> None:
        """Start a new message (the 354 was sent)."""
        self._size = 0
        self._oversized = False
        self._hops = 0
        self._in_headers = True
        self._hcarry = b""
        self._hskip = False
        self._first = True
        # the header cap: stored octets seen so far (None once the header block ended)
        self._hpos: int | None = 0 if self._header_limit else None
        self._hname: int | None = 0   # name octets of the undecided line start; None: mid-line
        self._hheld = bytearray()   # that line's octets past the limit, held back
        self._hkept_lf = True       # what was kept below the limit ends at a line start
        self.header_cut = False     # this message's header block was cut
        self.chunk_size = 0         # BDAT: octets of the current chunk
        self.chunk_left = 0         # of them not yet read
        self._last = False          # the current chunk is the LAST one
        self._cr = False            # a CR ended the chunk before, not stored yet
        self._discard = False       # a bare LF or a malformed BDAT: the rest is not stored
        self._bad = False           # a malformed BDAT's chunk was discarded

    def chunk(self, size: int, last: bool, bad: bool = False) -> None:
        """The next BDAT chunk: `size` octets follow in the buffer (RFC 3030
        section 2); `bad`: a malformed BDAT, its octets discarded, the message
        ends with it."""
        if self._first:     # the first chunk: the hop count starts at a line start
            self._first = False
            self._hcarry = _LF
        self.chunk_size = self.chunk_left = size
        self._last = last or bad
        if bad:
            self._bad = self._discard = True

    def step_chunk(self) -> DataEnd | None:
        """Consume what is buffered of the current chunk (never past it) in
        stored form: CRLF -> LF, nothing unstuffed, a CR last held for the
        next chunk. The DataEnd when the message ended, else None."""
        buf = self._buf
        n = min(self.chunk_left, len(buf))
        end = n == self.chunk_left
        if not end and n == 0:
            return None
        final = end and self._last
        region = bytes(buf[:n])
        del buf[:n]
        self.chunk_left -= n
        if not self._discard:
            if self._cr:
                region = b"\r" + region
                self._cr = False
            if not final and region.endswith(b"\r"):
                region = region[:-1]
                self._cr = True
            out = region.replace(_CRLF, _LF)
            if region.count(_LF) != len(region) - len(out):
                self._discard = True
                self._cr = False
                region = region[:_first_bare_lf(region)]
                out = region.replace(_CRLF, _LF)
            if out:
                self._store(out)
        if not end:
            return None
        if final or self._discard or self._oversized:
            return self._end(self._discard and not self._bad)
        return None

    def step(self) -> DataEnd | None:
        """Consume what is buffered; queue its chunks. Returns the DataEnd
        (also queued, after the chunks) when the message ended, else None."""
        buf = self._buf
        first = self._first
        if first:
            # the virtual CRLF before the first line: "." alone is an empty message
            head = bytes(buf[:3])
            if head == b".\r\n":
                del buf[:3]
                self._store(_LF)
                return self._end(False)
            if head in (b"", b".", b".\r"):
                return None
        end = buf.find(_END)
        if end >= 0:
            cut, consume, final = end + 2, end + 5, True
        else:
            if buf.endswith(b"\r"):
                hold = 4 if buf.endswith(b"\r\n.\r") else 1
            elif buf.endswith(b"\r\n"):
                hold = 2
            elif buf.endswith(b"\r\n."):
                hold = 3
            else:
                hold = 0
            cut = consume = len(buf) - hold
            if cut <= 0:
                return None
            final = False
        with memoryview(buf) as mv:
            region = mv[:cut].tobytes()
        del buf[:consume]
        if first:
            region = _CRLF + region
        out = region.replace(_CRLF, _LF)
        # every LF came from a CRLF iff the LF count equals the CRLFs replaced
        bare = region.count(_LF) != len(region) - len(out)
        if bare:
            region = region[:_first_bare_lf(region)]
            out = region.replace(_CRLF, _LF)
        self._store(out.replace(_LFDOT, _LF))
        if bare:
            buf.clear()
            return self._end(True)
        if final:
            return self._end(False)
        return None

    def _end(self, bare_lf: bool) -> DataEnd:
        if self.header_cut and self._hpos is not None and not self._hkept_lf \
                and not self._oversized:
            self._events.append(DataChunk(_LF))     # a cut header with no body: its last LF
        ev = DataEnd(self._size, self._oversized, self._hops, bare_lf, self.header_cut, self._bad)
        self._events.append(ev)
        return ev

    def _store(self, out: bytes) -> None:
        """Count a region in stored form and queue it as a DataChunk."""
        if self._in_headers:
            self._count_hops(out)
        if self._first:
            self._first = False
            out = out[1:]              # the virtual line start
        before = self._size
        self._size = before + len(out)
        if self._oversized:
            return
        db = self._databytes
        if db and self._size > db:
            self._oversized = True
            out = out[:db - before]
        if self._hpos is not None and out:
            out = self._cap_header(out)
        if out:
            self._events.append(DataChunk(out))

    def _cap_header(self, out: bytes) -> bytes:
        """What is kept of `out` (stored form) under the header cap: header
        octets beyond header_limit are dropped up to the first body line; a cut
        line gets its LF back (docs/behaviour/smtp.md#data)."""
        pos, limit = self._hpos, self._header_limit
        end = pos + len(out)
        self._hpos = end
        if end <= limit and not self._in_headers:
            # the common case, without a search: the hop count has just seen
            # the empty line below the limit, so the block ended there or before
            self._hpos = None
            return out
        body = self._body_start(out, pos)
        if pos < limit:
            self._hkept_lf = out[min(limit, end) - pos - 1] == 10
        if end <= limit:
            if body is not None:
                self._hpos = None
            return out
        keep = out[:max(0, limit - pos)]
        held = self._hheld
        if body is not None:
            self._hpos = None               # the block ended: the body passes whole
            if body <= limit:               # below the limit: nothing was cut
                return bytes(held) + out
            self.header_cut = True
            first = pos - len(held)         # the stream position of held[0]
            rest = held[body - first:] + out if body < pos else out[body - pos:]
            return keep + (b"" if self._hkept_lf else _LF) + rest
        name = self._hname
        if name is None:
            held.clear()
        else:
            start = end - name              # the undecided line's first octet
            if start > pos:
                held.clear()                # it began in this region
            held += out[max(limit, start, pos) - pos:]
        if end - limit > len(held):
            self.header_cut = True          # header octets past the limit were dropped
        return keep

    def _body_start(self, out: bytes, pos: int) -> int | None:
        """The stream position where the first body line starts, if `out`
        (at stream position `pos`) decides it; else None, with the undecided
        line start at its end noted (RFC 5322 section 3.6.8; Postfix ends the
        header block at such a line)."""
        name = self._hname
        if name is not None:
            # the line start carried from the region before: decide it first
            n = _NAME_RUN.match(out, 0, _MAX_NAME + 1 - name).end()
            total = name + n
            if total > _MAX_NAME:
                return pos - name           # too long for a field name
            if n == len(out):
                self._hname = total
                return None
            c = out[n]
            if not ((c == 58 and total) or (c in (32, 9) and not total)):
                return pos - name
        m = _BODY_LINE.search(out)
        if m is not None:
            return pos + m.start() + 1
        last = out.rfind(_LF)
        if last < 0:
            self._hname = None              # inside a header line
        else:
            tail = len(out) - last - 1
            undecided = tail <= _MAX_NAME and _NAME_RUN.match(out, last + 1).end() == len(out)
            self._hname = tail if undecided else None
        return None

    def _count_hops(self, out: bytes) -> None:
        """Count Received/Delivered lines of the header block (docs/behaviour/smtp.md#data)."""
        if self._hskip:
            i = out.find(_LF)
            if i < 0:
                return
            out = out[i:]
            self._hskip = False
        s = self._hcarry + out
        end = s.find(_HDR_END)
        if end >= 0:
            block = s[:end + 1]
            self._in_headers = False
            self._hcarry = b""
        else:
            last = s.rfind(_LF)      # s always starts with a line start LF
            block = s[:last]
            self._hcarry = s[last:last + 10]
            self._hskip = len(s) - last > 10
        if block:
            low = block.lower()
            self._hops += low.count(_RECEIVED) + low.count(_DELIVERED)


def _first_bare_lf(region: bytes) -> int:
    """Index of the first LF not preceded by CR (caller knows there is one)."""
    i = region.find(_LF)
    while i > 0 and region[i - 1] == 13:
        i = region.find(_LF, i + 1)
    return i
