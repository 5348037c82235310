"""Streaming content checks during DATA: badmimetypes and badloadertypes.

Job: look at message bytes as they stream (LF line ends, already
dot-unstuffed) and remember the first signature hit, without holding the
message. Semantics (docs/behaviour/smtp.md#content-checks, "Content filters"):
- inside any MIME part whose header has a `Content-Transfer-Encoding:` value
  starting with `base64` (spamcontrol compares the line's start, so
  `base64 (comment)` and `base64;` count), the first non-empty body line is
  checked: if it starts with a badmimetypes signature (9 base64 characters)
  the message is refused;
- with a loader check, every base64 body line is searched for a
  badloadertypes signature (5 characters); `BADLOADERTYPE=c` looks only at
  windows that begin with `c`, as spamcontrol does, `+` at every window;
- `BADMIMETYPE="!"` also refuses base64 lines that contain whitespace, with
  or without signature lists.
The first hit in message order is the one reported: the mime signature of a
first line before anything else in it, then whichever of a loader signature
and whitespace comes first, so the named rule does not depend on how the
data was split into chunks.
A `message/rfc822` (or `message/global`) part's body is a message: its
header block is read like the top-level one, so a base64 attachment of a
forwarded message is checked too. A `--` line met while reading a header
block starts a new part (spamcontrol forgets base64 at such a line), so a
part with headers but no body cannot pass its encoding to the next part.
Both searches use the bundle's case-sensitive Aho-Corasick automata (base64 is
case-sensitive).

How (bulk, not per line): header blocks (the message header, and each part
header after a `--boundary` line) are read line by line; bodies are skipped
with one bytes.find for the next line starting with `--`, and a base64 body is
checked with one automaton search and one whitespace search per region. A
signature never spans lines (it contains no LF), so searching a region of
whole lines finds exactly what a per-line search finds. Only the incomplete
last line is carried to the next chunk (capped: an over-long base64 line is
searched before its middle is dropped; its head, which decides whether it is
a boundary or starts with a mime signature, and its tail are kept).
"""
from __future__ import annotations

_CTE = b"content-transfer-encoding:"
_CTYPE = b"content-type:"
_MESSAGE_TYPES = (b"message/rfc822", b"message/global")   # a message inside a part
_MAX_CARRY = 8192
_KEEP = 64                      # head and tail kept of an over-long carried line

HEADER, BODY, B64_FIRST, B64 = range(4)


def _blank_line(data: bytes, pos: int, end: int) -> int:
    """Start of the first empty line ("" or a lone CR) in the whole lines
    data[pos:end], or end if there is none."""
    if data.startswith(b"\n", pos) or data.startswith(b"\r\n", pos):
        return pos
    best = end
    for sep in (b"\n\n", b"\n\r\n"):
        i = data.find(sep, pos, end)
        if 0 <= i < best - 1:
            best = i + 1
    return best


class ContentScanner:
    """Feed chunks with feed(), then finish(); `hit` is (list, rule id) after
    the first match (rule id -1 for the whitespace rule)."""

    __slots__ = ("mime", "loader", "loader_first", "strict", "hit", "_carry", "_mode",
                 "_part_base64", "_part_message", "_last_header")

    def __init__(self, mime=None, loader=None, strict_whitespace: bool = False,
                 loader_first: int | None = None):
        self.mime = mime          # AhoCorasick over 9-char signatures, or None
        self.loader = loader      # AhoCorasick over 5-char signatures, or None
        self.loader_first = loader_first   # BADLOADERTYPE=c: only windows starting with c
        self.strict = strict_whitespace
        self.hit: tuple[str, int] | None = None
        self._carry = b""
        self._mode = HEADER       # the message header block comes first
        self._part_base64 = False
        self._part_message = False
        self._last_header = b""

    @property
    def active(self) -> bool:
        return ((self.mime is not None or self.loader is not None or self.strict)
                and self.hit is None)

    def feed(self, chunk: bytes) -> None:
        if not self.active:
            return
        data = self._carry + chunk if self._carry else chunk
        end = data.rfind(b"\n") + 1          # only whole lines are scanned
        if end:
            self._scan(data, end)
        rest = data[end:]
        if len(rest) > _MAX_CARRY:
            if self._mode in (B64, B64_FIRST) and not rest.startswith(b"--"):
                self._base64_region(rest, 0, len(rest))   # before its middle is dropped
            rest = rest[:_KEEP] + b"\r" + rest[-_KEEP:]   # CR: never base64, never a boundary
        self._carry = rest if self.hit is None else b""

    def finish(self) -> None:
        if self._carry and self.active:
            data = self._carry + b"\n"
            self._scan(data, len(data))
        self._carry = b""

    # -- internals
    def _scan(self, data: bytes, end: int) -> None:
        """Scan data[:end], which ends at a line boundary."""
        pos = 0
        while pos < end and self.hit is None:
            mode = self._mode
            if mode == HEADER:
                pos = self._header_block(data, pos, end)
                continue
            if data.startswith(b"--", pos):              # a boundary: part header follows
                self._mode = HEADER
                self._new_part()
                pos = data.find(b"\n", pos, end) + 1
                continue
            nxt = data.find(b"\n--", pos, end)
            stop = end if nxt < 0 else nxt + 1         # the region: whole lines before it
            if mode == B64_FIRST:
                pos = self._first_line(data, pos, stop)
                if self._mode == B64_FIRST:
                    pos = stop                          # only empty lines so far
                    continue
            if self._mode == B64 and pos < stop and self.hit is None:
                self._base64_region(data, pos, stop)
            pos = stop

    def _header_block(self, data: bytes, pos: int, end: int) -> int:
        """Header lines from data[pos:end] up to and including the empty line
        that ends the block (if it is there); returns where scanning goes on.
        Only a Content-Transfer-Encoding line (or a continuation of the line
        before) changes anything, so a block with neither is passed in bulk,
        remembering just its last line for a continuation in the next chunk;
        otherwise line by line. Either way the result equals _header_line
        applied to every line."""
        stop = _blank_line(data, pos, end)       # start of the empty line, or end
        if stop > pos:
            block = data[pos:stop]
            low = block.lower()
            # line by line when the block could change state: a CTE line, a
            # message/ type, a boundary, a continuation, or (after a message/
            # type) any Content-Type, which may turn it back off
            if (block[:1] in (b" ", b"\t") or _CTE in low or b"message/" in low
                    or block.startswith(b"--") or b"\n--" in block
                    or (self._part_message and _CTYPE in low)):
                while pos < stop:
                    nl = data.find(b"\n", pos, stop)
                    self._header_line(data[pos:nl])
                    pos = nl + 1
            else:
                last = block[block.rfind(b"\n", 0, -1) + 1:-1]
                self._last_header = last[:-1] if last.endswith(b"\r") else last
                pos = stop
        if stop < end:                           # the empty line: the block ends
            self._header_line(b"")
            pos = data.find(b"\n", stop, end) + 1
        return pos

    def _header_line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:                                    # the header block ends
            if self._part_base64:
                self._mode = B64_FIRST
            elif self._part_message:                    # the body is a message: its header
                self._new_part()
            else:
                self._mode = BODY
            return
        if line.startswith(b"--"):                      # a boundary: a new part header
            self._new_part()
            return
        if line[:1] in (b" ", b"\t"):
            line = self._last_header + line             # folded header continuation
        self._last_header = line
        low = line.lower()
        if low.startswith(_CTE):
            self._part_base64 = _value(low, len(_CTE)).startswith(b"base64")
        elif low.startswith(_CTYPE):
            self._part_message = _value(low, len(_CTYPE)).startswith(_MESSAGE_TYPES)

    def _new_part(self) -> None:
        """A header block starts: nothing of the previous one carries over."""
        self._part_base64 = self._part_message = False
        self._last_header = b""

    def _first_line(self, data: bytes, pos: int, stop: int) -> int:
        """Skip empty lines; check the first base64 line against badmimetypes."""
        while pos < stop:
            nl = data.find(b"\n", pos, stop)
            line = data[pos:nl]
            if line.endswith(b"\r"):
                line = line[:-1]
            if line:
                self._mode = B64
                if self.mime is not None:
                    rid, start = self.mime.search(line[:9])
                    if rid >= 0 and start == 0:
                        self.hit = ("badmimetypes", rid)
                return pos                               # this line is base64 too
            pos = nl + 1
        return pos

    def _base64_region(self, data: bytes, pos: int, stop: int) -> None:
        region = data[pos:stop]
        space = -1
        if self.strict:
            space = min((i for i in (region.find(b" "), region.find(b"\t")) if i >= 0), default=-1)
        if self.loader is not None:
            rid = self._loader_hit(region, space if space >= 0 else len(region))
            if rid >= 0:
                self.hit = ("badloadertypes", rid)
                return
        if space >= 0:
            self.hit = ("badmimetypes", -1)

    def _loader_hit(self, region: bytes, limit: int) -> int:
        """Rule id of the first loader signature starting before `limit` (and
        with the BADLOADERTYPE character, when one is set), else -1."""
        first = self.loader_first
        off = 0
        while True:
            rid, start = self.loader.search(region[off:] if off else region)
            if rid < 0 or off + start >= limit:
                return -1
            if first is None or region[off + start] == first:
                return rid
            off += start + 1                    # spamcontrol never looks at this window


def _value(low: bytes, skip: int) -> bytes:
    """A header's value: after the name, blanks and leading (comments)
    stripped (RFC 2045 §5.1 allows comments anywhere)."""
    value = low[skip:].strip()
    while value.startswith(b"("):
        end = value.find(b")")
        if end < 0:
            return b""
        value = value[end + 1:].lstrip()
    return value
