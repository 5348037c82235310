r"""Read a regex the way pyre2 + RE2 read it, for analysis only.

Job: give the filters of prefilters.py (compiler) and the expansion check of
regexes.py (compiler and bundle loader) a Python parse tree (re._parser) of
a pattern written in RE2 syntax, so they can derive literals, byte sets and
sizes without ever trusting Python's own reading of RE2 syntax, which differs
(POSIX classes `[[:digit:]]`, `\Q...\E`, `\pN`, `\C`, `{,n}`, octal
escapes, `(?U)`...).

How: `_pyre2_view` replays pyre2's rewrite of the pattern (what RE2 really
compiles), `_re2_to_python` reads that with RE2's grammar and writes a
canonical Python pattern, and `analysis` parses it.

Invariants: the Python pattern's language CONTAINS RE2's (every literal an
escape, every class an explicit byte set, zero-width assertions dropped,
Unicode groups "any byte"), so a condition true of every Python match is
true of every RE2 match; anything not understood with certainty gives None
(no filter: RE2 always runs). The parser never sees raw rule text, so it
never warns. Nothing here matches mail: RE2 is the only matcher.
"""
from __future__ import annotations

import functools
from re import _parser


class _Unsure(Exception):
    """The analysis cannot vouch for its reading: no filter for this pattern."""


_OCT = frozenset(b"01234567")
_HEX = frozenset(b"0123456789abcdefABCDEF")


def _pyre2_view(pattern: bytes) -> bytes:
    r"""The bytes RE2 compiles for `pattern`: pyre2 (compile.pxi
    `_prepare_pattern`, bytes pattern without re.U/X/S/M) rewrites `\b` inside
    what it takes for a bracket to `\010` and `\Z` outside to `\z`, and reads
    the C string's NUL terminator after a trailing backslash. Its refusals
    (`\8`, `\1` without three octal digits, `\x` without two hex digits, an
    unclosed `[`) raise _Unsure; such patterns never compile anyway."""
    out = bytearray()
    n, size = 0, len(pattern)

    def at(i: int) -> int:
        return pattern[i] if i < size else 0

    while n < size:
        this = pattern[n]
        if this == 0x5B:                                  # [
            out.append(this)
            while True:
                n += 1
                if n >= size:
                    raise _Unsure("unclosed [ (pyre2)")
                this = pattern[n]
                if this == 0x5D:                          # ]
                    out.append(this)
                    break
                if this == 0x5C:                          # backslash
                    n += 1
                    that = at(n)
                    if that == 0x62:                      # \b: backspace
                        out += b"\\010"
                    else:
                        out += bytes((this, that))
                else:
                    out.append(this)
        elif this == 0x5C:
            n += 1
            that = at(n)
            if that in (0x38, 0x39):
                raise _Unsure("backreference (pyre2)")
            if that in _OCT:
                if n + 2 < size and pattern[n + 1] in _OCT and pattern[n + 2] in _OCT:
                    out += pattern[n - 1:n + 3]
                    n += 2
                else:
                    raise _Unsure("backreference (pyre2)")
            elif that == 0x78:                            # x
                if n + 2 < size and pattern[n + 1] in _HEX and pattern[n + 2] in _HEX:
                    out += pattern[n - 1:n + 3]
                    n += 2
                else:
                    raise _Unsure("bad \\x (pyre2)")
            elif that == 0x5A:                            # \Z
                out += b"\\z"
            else:
                out += bytes((this, that))
        else:
            out.append(this)
        n += 1
    return bytes(out)


def _ranges(*pairs: tuple[int, int]) -> frozenset[int]:
    return frozenset(b for lo, hi in pairs for b in range(lo, hi + 1))


# RE2's POSIX classes ([[:name:]], re2/unicode_groups.cc posix_groups) and
# Perl classes (\d \s \w: ASCII only), as bytes.
_POSIX = {
    "alnum": _ranges((0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A)),
    "alpha": _ranges((0x41, 0x5A), (0x61, 0x7A)),
    "ascii": _ranges((0x00, 0x7F)),
    "blank": _ranges((0x09, 0x09), (0x20, 0x20)),
    "cntrl": _ranges((0x00, 0x1F), (0x7F, 0x7F)),
    "digit": _ranges((0x30, 0x39)),
    "graph": _ranges((0x21, 0x7E)),
    "lower": _ranges((0x61, 0x7A)),
    "print": _ranges((0x20, 0x7E)),
    "punct": _ranges((0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7E)),
    "space": _ranges((0x09, 0x0D), (0x20, 0x20)),
    "upper": _ranges((0x41, 0x5A)),
    "word": _ranges((0x30, 0x39), (0x41, 0x5A), (0x61, 0x7A), (0x5F, 0x5F)),
    "xdigit": _ranges((0x30, 0x39), (0x41, 0x46), (0x61, 0x66)),
}
_PERL = {
    "d": _POSIX["digit"],
    "s": frozenset(b"\t\n\f\r "),                         # no \v in RE2
    "w": _POSIX["word"],
}
_ALL = frozenset(range(256))
_C_ESCAPES = {"a": 7, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11}
_ANY = r"[\x00-\xff]"          # one byte, unknown which (Latin-1: one char = one byte)


def _perl_class(letter: str) -> frozenset[int]:
    base = _PERL[letter.lower()]
    return base if letter.islower() else _ALL - base


def _escape(view: str, i: int) -> tuple[int, int]:
    r"""RE2's ParseEscape at view[i] == backslash, Latin-1 (rune max 0xFF):
    (byte, next index). Anything RE2 would refuse raises _Unsure."""
    if i + 1 >= len(view):
        raise _Unsure("trailing backslash")
    c = view[i + 1]
    j = i + 2
    if c in "01234567":
        if c != "0" and not (j < len(view) and view[j] in "01234567"):
            raise _Unsure("backreference")
        code = int(c)
        for _ in range(2):
            if j < len(view) and view[j] in "01234567":
                code = code * 8 + int(view[j])
                j += 1
        if code > 0xFF:
            raise _Unsure("octal escape above 0xFF")
        return code, j
    if c == "x":
        if view.startswith("{", j):
            end = view.find("}", j + 1)
            digits = view[j + 1:end] if end > 0 else ""
            if not digits or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise _Unsure("bad \\x{...}")
            code, j = int(digits, 16), end + 1
        else:
            digits = view[j:j + 2]
            if len(digits) != 2 or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise _Unsure("bad \\x")
            code, j = int(digits, 16), j + 2
        if code > 0xFF:
            raise _Unsure("hex escape above 0xFF")
        return code, j
    if c in _C_ESCAPES:
        return _C_ESCAPES[c], j
    if ord(c) < 0x80 and not c.isalnum():                 # punctuation (and \_)
        return ord(c), j
    raise _Unsure(f"escape \\{c}")


def _unicode_group(view: str, i: int) -> int:
    r"""Skip `\pX`, `\p{Name}`, `\PX`, `\P{^Name}` at view[i]; next index."""
    if i + 2 >= len(view):
        raise _Unsure("bad \\p")
    if view[i + 2] != "{":
        return i + 3
    end = view.find("}", i + 3)
    if end < 0:
        raise _Unsure("bad \\p{")
    return end + 1


def _class_text(members: frozenset[int], negated: bool) -> str:
    """A Python class of exactly these bytes (`[^...]` when negated)."""
    if not members:
        return _ANY                    # [^everything]: matches nothing; any is a superset
    parts = []
    run = sorted(members)
    start = prev = run[0]
    for b in run[1:] + [None]:
        if b is not None and b == prev + 1:
            prev = b
            continue
        parts.append(f"\\x{start:02x}" if start == prev else f"\\x{start:02x}-\\x{prev:02x}")
        if b is not None:
            start = prev = b
    return ("[^" if negated else "[") + "".join(parts) + "]"


def _bracket(view: str, i: int) -> tuple[str, int]:
    """RE2's ParseCharClass (Perl flags) at view[i] == "[": (Python class, next index)."""
    n = len(view)
    j = i + 1
    negated = j < n and view[j] == "^"
    if negated:
        j += 1
    members: set[int] = set()
    unicode = False
    first = True
    while True:
        if j >= n:
            raise _Unsure("missing ]")
        c = view[j]
        if c == "]" and not first:
            j += 1
            break
        first = False
        if c == "[" and j + 2 < n and view[j + 1] == ":":
            end = view.find(":]", j + 2)
            if end >= 0:
                name = view[j + 2:end]
                inverted = name.startswith("^")
                cls = _POSIX.get(name[1:] if inverted else name)
                if cls is None:
                    raise _Unsure(f"unknown class [:{name}:]")
                members |= (_ALL - cls) if inverted else cls
                j = end + 2
                continue
        if c == "\\" and j + 1 < n:
            d = view[j + 1]
            if d in "pP":
                j = _unicode_group(view, j)
                unicode = True
                continue
            if d in "dDsSwW":
                members |= _perl_class(d)
                j += 2
                continue
        lo, j = _escape(view, j) if c == "\\" else (ord(c), j + 1)
        hi = lo
        if j + 1 < n and view[j] == "-" and view[j + 1] != "]":
            hi, j = _escape(view, j + 1) if view[j + 1] == "\\" else (ord(view[j + 1]), j + 2)
            if hi < lo:
                raise _Unsure("bad range")
        members.update(range(lo, hi + 1))
    if unicode:
        return _ANY, j                 # \p groups: some character, which is not known
    return _class_text(frozenset(members), negated), j


def _counted(view: str, i: int) -> tuple[int, int, int] | None:
    """RE2's MaybeParseRepeat at view[i] == "{": (lo, hi or -1, next index),
    or None when the brace is a literal (`{,n}`, `{a}`, leading zeros...)."""
    n = len(view)

    def integer(k: int) -> tuple[int, int] | None:
        if k >= n or not view[k].isdigit() or not view[k].isascii():
            return None
        if k + 1 < n and view[k] == "0" and view[k + 1].isdigit() and view[k + 1].isascii():
            return None                # no leading zeros
        e = k
        while e < n and view[e] in "0123456789":
            e += 1
            if e - k > 9:
                return None            # RE2 gives up past 9 digits (then a literal)
        return int(view[k:e]), e

    got = integer(i + 1)
    if got is None:
        return None
    lo, k = got
    hi = lo
    if k < n and view[k] == ",":
        k += 1
        if k < n and view[k] == "}":
            hi = -1
        else:
            got = integer(k)
            if got is None:
                return None
            hi, k = got
    if k >= n or view[k] != "}":
        return None
    return lo, hi, k + 1


def _re2_to_python(view: str) -> str:
    r"""A Python `re` pattern whose language contains RE2's language for the
    pattern `view` (RE2 syntax, Perl flags, Latin-1: one character per byte).

    Every literal becomes `\xHH`, every class an explicit byte set, `.` and
    `\C` and Unicode groups "any byte"; `^` (outside multi-line mode) and
    `\A` stay anchors, the other zero-width assertions are dropped (dropping
    a condition only adds matches); flags are dropped (case folding is the
    filters' own business, greediness changes no language). Raises _Unsure
    wherever RE2's grammar is not followed exactly."""
    out: list[str] = []
    saved: list[bool] = []           # multi-line flag of each open group
    multiline = False
    last = None                      # None (no operand), "atom", "assert", "repeat"
    i, n = 0, len(view)

    def repeat(text: str, k: int) -> int:
        nonlocal last
        if last is None or last == "repeat":
            raise _Unsure("repetition without operand")
        if last == "assert":
            out[-1] = ""               # a repeated assertion: dropped with its repeat
        else:
            out.append(text)
        last = "repeat"
        return k + 1 if k < n and view[k] == "?" else k   # non-greedy: same language

    while i < n:
        c = view[i]
        if c == "\\":
            d = view[i + 1] if i + 1 < n else ""
            if d == "Q":               # \Q...\E: literals up to \E or the end
                i += 2
                while i < n and not view.startswith("\\E", i):
                    out.append(f"\\x{ord(view[i]):02x}")
                    last = "atom"
                    i += 1
                i += 2
            elif d == "A":
                out.append(r"\A")
                last = "assert"
                i += 2
            elif d in ("b", "B", "z"):
                out.append("")
                last = "assert"
                i += 2
            elif d == "C":
                out.append(_ANY)
                last = "atom"
                i += 2
            elif d in ("p", "P"):
                i = _unicode_group(view, i)
                out.append(_ANY)
                last = "atom"
            elif d and d in "dDsSwW":
                out.append(_class_text(_perl_class(d), False))
                last = "atom"
                i += 2
            else:
                code, i = _escape(view, i)
                out.append(f"\\x{code:02x}")
                last = "atom"
        elif c == "[":
            text, i = _bracket(view, i)
            out.append(text)
            last = "atom"
        elif c == "(":
            if view.startswith("(?P<", i):
                end = view.find(">", i + 4)
                if end <= i + 4:
                    raise _Unsure("bad group name")
                saved.append(multiline)
                out.append("(")
                last = None
                i = end + 1
            elif view.startswith("(?", i):
                j = i + 2
                negate = seen = False
                new_multiline = multiline
                while True:
                    if j >= n:
                        raise _Unsure("unclosed (?")
                    f = view[j]
                    j += 1
                    if f in "imsU":
                        seen = True
                        if f == "m":
                            new_multiline = not negate
                    elif f == "-" and not negate:
                        negate, seen = True, False
                    elif f in ":)":
                        if negate and not seen:
                            raise _Unsure("(?-)")
                        break
                    else:
                        raise _Unsure(f"group (?{f}")
                if f == ":":
                    saved.append(multiline)
                    out.append("(?:")
                    last = None
                # "(?flags)": flags for the rest of the group; no operand pushed
                multiline = new_multiline
                i = j
            else:
                saved.append(multiline)
                out.append("(")
                last = None
                i += 1
        elif c == ")":
            if not saved:
                raise _Unsure("unbalanced )")
            multiline = saved.pop()
            out.append(")")
            last = "atom"
            i += 1
        elif c == "|":
            out.append("|")
            last = None
            i += 1
        elif c in "*+?":
            i = repeat(c, i + 1)
        elif c == "{" and (counted := _counted(view, i)) is not None:
            lo, hi, k = counted
            if lo > 1000 or hi > 1000 or (hi >= 0 and lo > hi):
                raise _Unsure("bad repetition size")
            i = repeat(f"{{{lo}}}" if hi == lo else f"{{{lo},}}" if hi < 0 else f"{{{lo},{hi}}}", k)
        elif c == "^":
            out.append("" if multiline else r"\A")
            last = "assert"
            i += 1
        elif c == "$":
            out.append("")
            last = "assert"
            i += 1
        elif c == ".":
            out.append(_ANY)
            last = "atom"
            i += 1
        else:
            out.append(f"\\x{ord(c):02x}")
            last = "atom"
            i += 1
    if saved:
        raise _Unsure("missing )")
    return "".join(out)


@functools.lru_cache(maxsize=256)
def analysis(pattern: str):
    """The Python parse of `_re2_to_python(_pyre2_view(pattern))`, or None
    when the pattern cannot be read with certainty (then: no filters)."""
    try:
        view = _pyre2_view(pattern.encode("latin-1")).decode("latin-1")
        translated = _re2_to_python(view)
    except (_Unsure, UnicodeError):
        return None
    # Every byte of the translation is a `\xHH` escape, so Python's parser
    # has nothing to warn about ("Possible nested set" needs a raw `[` or
    # `--` in a set); no warnings.catch_warnings(), which would change the
    # process-wide filters under a server thread (compile runs in an executor).
    try:
        return _parser.parse(translated)
    except Exception:  # re.error, RecursionError, OverflowError...: no filter, RE2 runs
        return None
