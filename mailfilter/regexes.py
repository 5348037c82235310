"""Regular expressions for rule lists: RE2 only, plus a literal prefilter.

Invariants (SPEC A §2, DESIGN.md):
- every regex is compiled by RE2 through pyre2; pyre2's silent fallback to
  Python's backtracking `re` (back-references, look-around) is switched to an
  exception and any non-RE2 object is refused, so a ReDoS-prone pattern is a
  compile error with file:line, never a slow path at SMTP time;
- matching is ASCII case-insensitive and unanchored (qregex semantics, B §3.2);
- `required_literal` returns bytes that every match must contain, so the
  Aho-Corasick automaton can decide when a regex needs to run at all. It is
  conservative: when in doubt it returns b"" ("always run").
"""
from __future__ import annotations

import re._constants as _c
import re._parser as _parser

import re2

# pyre2 keeps a module-level switch; set it once for the whole process.
re2.set_fallback_notification(re2.FALLBACK_EXCEPTION)

_LITERAL = _c.LITERAL
# Shorter literals ("@", ".") occur in nearly every address or host name, so
# they filter nothing: such regexes go to the list's gate instead.
MIN_LITERAL = 3


class RegexError(ValueError):
    """A pattern RE2 does not accept."""


def compile_re2(pattern: str):
    """Compile `pattern` (Latin-1 text) for bytes input, case-insensitive."""
    try:
        compiled = re2.compile(pattern.encode("latin-1"), re2.IGNORECASE)
    except Exception as exc:  # re2 raises re.error or its own RegexError
        raise RegexError(f"RE2 cannot compile /{pattern}/: {exc}") from None
    if not isinstance(compiled, re2.Pattern):
        raise RegexError(f"RE2 cannot compile /{pattern}/ (needs a backtracking engine)")
    return compiled


def required_literal(pattern: str) -> bytes:
    """The longest literal run at the top level of `pattern`, ASCII-folded.

    Only consecutive plain literals of the top-level sequence count: anything
    optional, repeated, alternated or a class breaks the run. A pattern Python's
    parser cannot read (RE2-only syntax) gets no literal."""
    try:
        parsed = _parser.parse(pattern)
    except Exception:
        return b""
    if any(op is _c.BRANCH for op, _ in parsed):
        return b""
    best: list[int] = []
    run: list[int] = []
    for op, arg in parsed:
        if op is _LITERAL and arg < 128:
            run.append(arg)
            if len(run) > len(best):
                best = run[:]
        else:
            run = []
    if len(best) < MIN_LITERAL:
        return b""
    return bytes(best).lower()
