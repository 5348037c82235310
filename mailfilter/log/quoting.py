"""Values of a key=value log line: `quote` and `kv`.

Job: write any value so that it cannot break the line it is in
(docs/operations.md#values): a value made only of letters, digits and
`.-_@:[]<>+/=%!` stands as it is; any other is double-quoted, `"` and `\\`
escaped, every character outside printable ASCII written \\xNN, \\uNNNN or
\\UNNNNNNNN by its code point (\\x is always two digits: one reading), and
cut once its quoted form passes MAX_VALUE characters, with a note of how
many characters were left out.

Invariants: the output is printable ASCII without CR/LF whatever the input;
the work is done by the regex engine and str.translate over the whole value
(a per-character Python loop only for a value long enough to be cut).
"""
from __future__ import annotations

import re

from mailfilter.core import core

_core_kv_line = core.log_kv_line

# A value whose quoted form would pass this many characters is cut (a client
# controls most of them: a HELO, an AUTH user name, the DATA line's list of
# 1000 recipients) and says how much was left out, so a line stays readable
# and fits one syslog datagram.
MAX_VALUE = 512

_BARE = re.compile(r"[a-zA-Z0-9.\-_@:\[\]<>+/=%!]+").fullmatch


def _escape(n: int) -> str:
    if n < 0x100:
        return f"\\x{n:02x}"
    return f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


class _Escapes(dict):
    """str.translate table: code point -> its form inside quotes. Latin-1 is
    filled in; other code points are computed on first sight and kept while
    the table is small (a client could otherwise make it grow without end)."""

    def __missing__(self, n: int) -> str:
        text = _escape(n)
        if len(self) < 4096:
            self[n] = text
        return text


_TABLE = _Escapes((n, chr(n) if 0x20 <= n <= 0x7e else _escape(n)) for n in range(0x100))
_TABLE[ord('"')] = '\\"'
_TABLE[ord("\\")] = "\\\\"


def quote(value) -> str:
    """`value` as it stands, or double-quoted with `"` and `\\` escaped and
    every other character outside printable ASCII written \\xNN, \\uNNNN or
    \\UNNNNNNNN by its code point (one reading: \\x is always two digits)."""
    text = value if type(value) is str else str(value)
    if len(text) <= MAX_VALUE and _BARE(text):
        return text
    escaped = text.translate(_TABLE)
    if len(escaped) <= MAX_VALUE:
        return f'"{escaped}"'
    # cut: keep the characters whose escaped forms fit (each is at least one
    # character long, so they are among the first MAX_VALUE + 1)
    out = []
    size = 0
    for i, c in enumerate(text[:MAX_VALUE + 1]):
        e = _TABLE[ord(c)]
        size += len(e)
        if size > MAX_VALUE:
            out.append(f"...[{len(text) - i} more]")
            break
        out.append(e)
    return '"' + "".join(out) + '"'


def kv(**fields) -> str:
    """`key=value` pairs (values quoted) in the order given; None leaves a key out."""
    return kv_line(fields)


def kv_line(fields: dict) -> str:
    """kv() of a dict the caller already has (no second one made per line):
    _core's log_kv_line (logline.pxi: the bare check in C), the same output
    as kv_line_py, which stays as its reference."""
    return _core_kv_line(fields, MAX_VALUE, quote)


def kv_line_py(fields: dict) -> str:
    """kv_line in Python: the reference the C one is tested against."""
    parts = []
    for k, v in fields.items():
        if v is None:
            continue
        if type(v) is not str:
            v = str(v)
        # quote() inlined for the common case: a bare value (this runs per logged field)
        parts.append(f"{k}={v}" if len(v) <= MAX_VALUE and _BARE(v) else f"{k}={quote(v)}")
    return " ".join(parts)
