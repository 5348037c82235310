r"""What the matcher checks before it runs a rule's regex: the compiler's side.

Job: from a pattern's RE2 reading (re2syntax.analysis), derive
- `required_literal`: bytes every match must contain, so the list's
  Aho-Corasick automaton decides when the regex needs to run at all;
- `regex_filter`: a record (minimum length, first-byte and required-byte
  bitmaps) that _core listmatch checks in C before calling RE2.
Both are stored in the bundle: the server never computes them and never
imports this module.

Invariants (docs/behaviour/control-files.md#regular-expressions):
- every filter is a NECESSARY condition for an RE2 match of exactly the
  pattern RE2 runs. Python's `re` parser reads RE2 syntax differently (POSIX
  classes `[[:digit:]]`, `\Q...\E`, `\pN`, `\C`, `{,n}`, octal escapes,
  `(?U)`...), so the filters work on re2syntax.analysis(), RE2's reading of
  the pattern as a Python parse tree whose language contains RE2's; a
  pattern it cannot read gets no filter;
- conservative: when in doubt, b"" ("always run").
"""
from __future__ import annotations

import re._constants as _c

from mailfilter.rules.re2syntax import analysis

_LITERAL = _c.LITERAL
# Shorter literals ("@", ".") occur in nearly every address or host name, so
# they filter nothing: such regexes go to the list's gate instead.
MIN_LITERAL = 3


def required_literal(pattern: str) -> bytes:
    """The longest literal run at the top level of `pattern`, ASCII-folded.

    Only consecutive plain literals of the top-level sequence count: anything
    optional, repeated, alternated or a class breaks the run. A pattern the
    analysis cannot read with certainty (re2syntax.analysis) gets no literal."""
    parsed = analysis(pattern)
    if parsed is None:
        return b""
    if any(op is _c.BRANCH for op, _ in parsed):
        return b""
    best: list[int] = []
    run: list[int] = []
    for op, arg in parsed:
        if op is _LITERAL and arg < 128:
            run.append(arg)
        else:
            if len(run) > len(best):      # compared once per run: linear, not
                best = run                # a copy per byte (quadratic in the run)
            run = []
    if len(run) > len(best):
        best = run
    if len(best) < MIN_LITERAL:
        return b""
    return bytes(best).lower()


# -- cheap necessary conditions, checked in C before any RE2 call ----------

_AT_START = (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING)
_HIGH = range(128, 256)
_REPEATS = (_c.MAX_REPEAT, _c.MIN_REPEAT)


def _byte_set(op, arg) -> set[int] | None:
    """Bytes one LITERAL / IN item can match (ASCII only, both cases), or None."""
    out: set[int] = set()
    if op is _LITERAL:
        items = [(op, arg)]
    elif op is _c.IN:
        items = arg
    else:
        return None
    for iop, iarg in items:
        if iop is _LITERAL and iarg < 128:
            out.add(iarg)
        elif iop is _c.RANGE and iarg[1] < 128:
            out.update(range(iarg[0], iarg[1] + 1))
        else:                         # NEGATE, CATEGORY, non-ASCII: anything
            return None
    letters = [b for b in out if 65 <= b <= 90 or 97 <= b <= 122]
    if letters:                       # case-insensitive match
        out.update(b ^ 0x20 for b in letters)
        # conservative: RE2 case folding may pair a letter with a non-ASCII
        # character in some encodings; never rule those out
        out.update(_HIGH)
    return out


def _first_set(items, i: int = 0) -> set[int] | None:
    """Bytes the item at position i must start with, or None if unknown."""
    if i >= len(items):
        return None
    op, arg = items[i]
    found = _byte_set(op, arg)
    if found is not None:
        return found
    if op in _REPEATS:
        lo, _hi, sub = arg
        return _first_set(list(sub), 0) if lo >= 1 else None
    if op is _c.SUBPATTERN:
        _group, add_flags, del_flags, sub = arg
        return None if (add_flags or del_flags) else _first_set(list(sub), 0)
    if op is _c.BRANCH:
        union: set[int] = set()
        for branch in arg[1]:
            first = _first_set(list(branch), 0)
            if first is None:
                return None
            union |= first
        return union
    return None


# Bytes in nearly every address or host name: a required set containing one
# of them would rule out almost nothing (performance only, never soundness).
_COMMON = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-@")


def _required_set(items) -> set[int] | None:
    """A byte set of which every match of the sequence `items` contains at
    least one byte, chosen to be rare in addresses (no _COMMON byte; the
    smallest such): each LITERAL / class item of the sequence (also inside a
    mandatory group or a repeat of at least one) must match one byte. None
    if no item qualifies."""
    best: set[int] | None = None
    for op, arg in items:
        found = _byte_set(op, arg)
        if found is None and op in _REPEATS and arg[0] >= 1:
            found = _required_set(list(arg[2]))
        elif found is None and op is _c.SUBPATTERN and not (arg[1] or arg[2]):
            found = _required_set(list(arg[3]))
        if found is not None and not (found & _COMMON) and (best is None or len(found) < len(best)):
            best = found
    return best


def _bitmap(byte_set) -> bytes:
    bitmap = bytearray(32)
    for b in byte_set:
        bitmap[b >> 3] |= 1 << (b & 7)
    return bytes(bitmap)


def regex_filter(pattern: str) -> bytes:
    """A record the matcher checks before running the regex (_core listmatch):
    u32 minimum match length; then, for `^`-anchored patterns, a 32-byte
    bitmap of the bytes a match can start with; then, when known, a 32-byte
    bitmap of the bytes of which every match contains one (the first-byte
    bitmap is then all ones if unknown). b"" when nothing is known.

    Derived from the RE2 reading of the pattern (re2syntax.analysis: POSIX
    classes and the other RE2-only syntax are translated, anything unsure
    gets nothing). Byte sets are conservative under RE2's case folding (_byte_set)."""
    parsed = analysis(pattern)
    if parsed is None:
        return b""
    min_len = min(parsed.getwidth()[0], 0xFFFFFFFF)
    items = list(parsed)
    first = None
    if items and items[0][0] is _c.AT and items[0][1] in _AT_START:
        first = _first_set(items, 1)
    required = _required_set(items) if not _has_branch(items) else None
    if required is not None:
        return (min_len.to_bytes(4, "little") + _bitmap(first if first is not None else range(256))
                + _bitmap(required))
    if first is None:
        return min_len.to_bytes(4, "little") if min_len else b""
    return min_len.to_bytes(4, "little") + _bitmap(first)


def _has_branch(items) -> bool:
    """A top-level alternation: its items are not all mandatory."""
    return any(op is _c.BRANCH for op, _ in items)
