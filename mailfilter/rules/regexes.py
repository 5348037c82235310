r"""Rule regexes compiled by RE2, for the compiler and the bundle loader alike.

Job: `compile_re2` turns a rule's pattern into the RE2 object a ListMatcher
calls (`.contains`), or refuses it with RegexError; `gate_part` wraps a
pattern as one branch of a list's gate. The filters the compiler derives
from a pattern live in prefilters.py (compile side only).

Invariants (docs/behaviour/control-files.md#regular-expressions,
docs/architecture.md#the-rule-compiler):
- every regex is compiled by RE2 through pyre2; pyre2's silent fallback to
  Python's backtracking `re` (back-references, look-around) is switched to an
  exception and any non-RE2 object is refused, so a ReDoS-prone pattern is a
  compile error with file:line, never a slow path at SMTP time;
- matching is ASCII case-insensitive and unanchored (qregex semantics,
  docs/behaviour/control-files.md#qregex-dialect);
- a pattern whose counted repeats would expand past MAX_EXPANDED nodes never
  reaches RE2 (RE2 aborts the process on it). The bundle loader compiles
  with the same check, so a bundle holding such a pattern (written before
  the check existed, or by hand) costs a 4xx, not the server process. The
  count needs RE2's reading of the pattern (re2syntax.analysis), which is
  why re2syntax belongs to both sides.
"""
from __future__ import annotations

import re
import re._constants as _c

import re2

from mailfilter.rules.format import MAX_SHOWN, clip
from mailfilter.rules.re2syntax import analysis

# pyre2 keeps a module-level switch; set it once for the whole process.
re2.set_fallback_notification(re2.FALLBACK_EXCEPTION)


class RegexError(ValueError):
    """A pattern RE2 does not accept."""


# RE2's simplifier expands counted repeats (x{n,m} -> up to m copies) and
# dies on a CHECK (abort, not an exception) when one node gets over 65535
# children: `/a{1000}a{1000}.../` kills the process. Patterns whose expansion
# could come near that are refused before RE2 sees them.
MAX_EXPANDED = 50_000
_COUNT = re.compile(r"\{(\d*)(?:,(\d*))?\}")


def _shown(pattern: str) -> str:
    """The pattern for a message: control and 8-bit characters as \\xNN, so a
    diagnostic cannot carry a CR or an escape sequence to the terminal; cut
    to MAX_SHOWN characters (docs/behaviour/control-files.md#limits)."""
    head = pattern[:MAX_SHOWN]
    shown = "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in head)
    return shown + clip(pattern, MAX_SHOWN)[len(head):]


def _expanded(items) -> int:
    """Nodes of a parse tree once counted repeats are expanded (an upper
    bound of what RE2's simplifier builds)."""
    total = 0
    for op, arg in items:
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            lo, hi, sub = arg
            copies = lo + 1 if hi == _c.MAXREPEAT else max(hi, 1)
            total += copies * _expanded(sub)
        elif op is _c.SUBPATTERN:
            total += 1 + _expanded(arg[-1])
        elif op is _c.BRANCH:
            total += 1 + sum(_expanded(alt) for alt in arg[1])
        elif op in (_c.ATOMIC_GROUP, _c.ASSERT, _c.ASSERT_NOT):
            total += 1 + _expanded(arg if op is _c.ATOMIC_GROUP else arg[1])
        else:
            total += 1
        if total > MAX_EXPANDED:
            break
    return total


def expansion(pattern: str) -> int:
    """How big `pattern` gets once its counted repeats are expanded: from
    RE2's own reading (re2syntax) when it is certain, else the product of
    every repeat count in the text (cruder, never smaller)."""
    parsed = analysis(pattern)
    if parsed is not None:
        return _expanded(parsed)
    product = len(pattern)
    for lo, hi in _COUNT.findall(pattern):
        product *= max(int(lo or 0), int(hi or 0), 1)
        if product > MAX_EXPANDED:
            break
    return product


def compile_re2(pattern: str, limit_expansion: bool = True):
    """Compile `pattern` (Latin-1 text) for bytes input, case-insensitive.
    `limit_expansion=False` for a list's gate: an alternation of parts that
    each passed the limit as rules (RE2 aborts on one oversized node, not on
    many alternatives), which a total-size cap would wrongly refuse."""
    trailing = len(pattern) - len(pattern.rstrip("\\"))
    if trailing % 2:
        # RE2 refuses it; pyre2 would hand RE2 the C string's NUL after it
        raise RegexError(f"RE2 cannot compile /{_shown(pattern)}/: trailing backslash")
    if limit_expansion and expansion(pattern) > MAX_EXPANDED:
        raise RegexError(f"RE2 cannot compile /{_shown(pattern)}/: over {MAX_EXPANDED} nodes "
                         "once its counted repeats are expanded (RE2 would abort)")
    try:
        compiled = re2.compile(pattern.encode("latin-1"), re2.IGNORECASE)
    except Exception as exc:  # re2 raises re.error or its own RegexError
        raise RegexError(f"RE2 cannot compile /{_shown(pattern)}/: {_shown(str(exc))}") from None
    if not isinstance(compiled, re2.Pattern):
        raise RegexError(f"RE2 cannot compile /{_shown(pattern)}/ (needs a backtracking engine)")
    return compiled


def gate_part(pattern: str) -> str | None:
    r"""`pattern` as one branch of a list's gate (bundle._LazyGate: one RE2
    alternation `(?:p1)|(?:p2)|...` that must match whenever one of the p
    does), or None when wrapping could change what it means: an unclosed
    `\Q` would swallow the rest of the alternation as literal text (and a
    `\E` in a later branch can close it again, so the gate still compiles),
    a trailing backslash would escape the closing parenthesis."""
    if "\\Q" in pattern or pattern.endswith("\\"):
        return None
    return f"(?:{pattern})"
