"""Streaming content checks during DATA: badmimetypes and badloadertypes.

Job: look at message bytes as they stream (LF line ends, already
dot-unstuffed) and remember the first signature hit, without holding the
message. Semantics (SPEC B §2.8, "Content filters"):
- inside any MIME part whose header says `Content-Transfer-Encoding: base64`,
  the first non-empty body line is checked: if it starts with a badmimetypes
  signature (9 base64 characters) the message is refused;
- with a loader check, every base64 body line is searched for a
  badloadertypes signature (5 characters) anywhere in the line;
- `BADMIMETYPE="!"` also refuses base64 lines that contain whitespace.
Both searches use the bundle's case-sensitive Aho-Corasick automata (base64 is
case-sensitive). Lines are split with bytes.find; a line cut by a chunk
boundary is carried over (at most one line is kept, capped at 8 KB).
"""
from __future__ import annotations

_CTE = b"content-transfer-encoding:"
_MAX_CARRY = 8192


class ContentScanner:
    """Feed chunks with feed(); `hit` is (kind, rule id) after the first match."""

    __slots__ = ("mime", "loader", "strict", "hit", "_carry", "_in_header",
                 "_part_base64", "_in_base64_body", "_first_line_pending", "_last_header")

    def __init__(self, mime=None, loader=None, strict_whitespace: bool = False):
        self.mime = mime          # AhoCorasick over 9-char signatures, or None
        self.loader = loader      # AhoCorasick over 5-char signatures, or None
        self.strict = strict_whitespace
        self.hit: tuple[str, int] | None = None
        self._carry = b""
        self._in_header = True    # message header block first
        self._part_base64 = False
        self._in_base64_body = False
        self._first_line_pending = False
        self._last_header = b""

    @property
    def active(self) -> bool:
        return (self.mime is not None or self.loader is not None) and self.hit is None

    def feed(self, chunk: bytes) -> None:
        if not self.active:
            return
        data = self._carry + chunk if self._carry else chunk
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            self._line(data[start:nl])
            if self.hit is not None:
                self._carry = b""
                return
            start = nl + 1
        rest = data[start:]
        self._carry = rest[-_MAX_CARRY:] if len(rest) > _MAX_CARRY else rest

    def finish(self) -> None:
        if self._carry and self.active:
            self._line(self._carry)
        self._carry = b""

    def _line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._in_header:
            if not line:
                self._in_header = False
                self._in_base64_body = self._part_base64
                self._first_line_pending = self._part_base64
                return
            if line[:1] in (b" ", b"\t"):
                line = self._last_header + line   # folded header continuation
            self._last_header = line
            low = line.lower()
            if low.startswith(_CTE):
                self._part_base64 = low[len(_CTE):].strip() == b"base64"
            return
        if line.startswith(b"--"):
            # A MIME boundary (or something that looks like one): a new part
            # header block follows. Boundaries are never valid base64.
            self._in_header = True
            self._part_base64 = False
            self._in_base64_body = False
            self._last_header = b""
            return
        if not self._in_base64_body or not line:
            return
        if self._first_line_pending:
            self._first_line_pending = False
            if self.mime is not None:
                rid, pos = self.mime.search(line[:9])
                if rid >= 0 and pos == 0:
                    self.hit = ("badmimetypes", rid)
                    return
        if self.strict and (b" " in line or b"\t" in line):
            self.hit = ("badmimetypes", -1)
            return
        if self.loader is not None:
            rid, _ = self.loader.search(line)
            if rid >= 0:
                self.hit = ("badloadertypes", rid)
