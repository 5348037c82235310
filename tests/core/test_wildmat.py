"""wildmat (docs/behaviour/control-files.md#wildmat, INN/spamcontrol), ASCII case-insensitive
(docs/behaviour/control-files.md#case).

Hand cases name the docs/behaviour/control-files.md#wildmat row they exercise; the differential
tests compare with the recursive oracle in tests/oracles/matchers.py.
"""
import random

import pytest
from oracles import matchers as O

from mailfilter.core import core as C

M = C.wildmat_match

CASES = [
    # docs/behaviour/control-files.md#wildmat row `*`: any sequence, including empty
    (b"*", b"", True),
    (b"*", b"anything@at.all", True),
    (b"*@example.com", b"joe@example.com", True),
    (b"*@example.com", b"@example.com", True),
    (b"*@example.com", b"joe@example.comx", False),
    (b"joe@*", b"joe@", True),
    (b"a*b*c", b"abc", True),
    (b"a*b*c", b"axxbyyc", True),
    (b"a*b*c", b"axxbyy", False),
    # docs/behaviour/control-files.md#wildmat row `*`: consecutive `*` act as one
    (b"a***b", b"ab", True),
    (b"a***b", b"a-x-b", True),
    (b"**", b"", True),
    (b"***x", b"yyx", True),
    # docs/behaviour/control-files.md#wildmat row `?`: exactly one character (not "zero or one")
    (b"a?c", b"abc", True),
    (b"a?c", b"ac", False),
    (b"a?c", b"abbc", False),
    (b"?", b"", False),
    (b"??", b"\xff\x00", True),
    # docs/behaviour/control-files.md#wildmat row `[abc]`, `[a-z]`
    (b"[abc]x", b"bx", True),
    (b"[abc]x", b"dx", False),
    (b"user[0-9]@x", b"user7@x", True),
    (b"user[0-9]@x", b"usera@x", False),
    (b"[z-a]", b"m", False),                    # empty range
    # docs/behaviour/control-files.md#wildmat row `[^…]`: negated set; `!` is NOT the
    # negation character
    (b"[^abc]", b"d", True),
    (b"[^abc]", b"a", False),
    (b"[^a-z]x", b"9x", True),
    (b"[^a-z]x", b"qx", False),
    (b"[!a]", b"!", True),
    (b"[!a]", b"b", False),
    # `]` directly after `[` or `[^` is literal; `-` first or last is literal
    (b"[]]", b"]", True),
    (b"[]a]", b"a", True),
    (b"[]a]", b"b", False),
    (b"[^]]", b"]", False),
    (b"[^]]", b"x", True),
    (b"[-a]", b"-", True),
    (b"[a-]", b"-", True),
    (b"[a-]", b"b", False),
    (b"[]-a]", b"^", True),                     # range ']'..'a' contains '^'
    # docs/behaviour/control-files.md#wildmat row `\x`: literal x
    (b"\\*", b"*", True),
    (b"\\*", b"a", False),
    (b"\\?", b"?", True),
    (b"\\?", b"x", False),
    (b"a\\[b", b"a[b", True),
    (b"\\\\", b"\\", True),
    # docs/behaviour/control-files.md#wildmat row "other": literal, whole string must match
    (b"abc", b"abc", True),
    (b"abc", b"abcd", False),
    (b"abc", b"xabc", False),
    (b"", b"", True),
    (b"", b"a", False),
    # docs/behaviour/control-files.md#case: ASCII case-insensitive everywhere; 8-bit
    # bytes compared as is
    (b"*@EXAMPLE.com", b"Joe@example.COM", True),
    (b"[A-C]z", b"bZ", True),
    (b"\\A", b"a", True),
    (b"\xc9*", b"\xc9t\xe9", True),
    (b"\xc9*", b"\xe9t\xe9", False),
    # ranges are case-insensitive without folding their bounds: [0-Z] is
    # digits, ':'..'@' and letters, never '_' or the other bytes of [0-z]
    (b"[0-Z]", b"_", False),
    (b"[0-Z]", b"`", False),
    (b"[0-Z]", b"q", True),
    (b"[0-Z]", b"Q", True),
    (b"[0-Z]", b"@", True),
    (b"[A-z]", b"_", True),          # '_' lies between 'Z' and 'a' as written
    (b"[^0-Z]", b"_", True),
    (b"[^0-Z]", b"k", False),
    (b"[Z-a]", b"z", True),          # 'Z' is in the range
    (b"[Z-a]", b"y", False),
    (b"[_-a]", b"A", True),          # 'a' is in the range
    (b"[_-a]", b"B", False),
    (b"[a-Z]", b"m", False),         # lo > hi: empty, in either case
    # inside a set a backslash is an ordinary byte (Salz's wildmat)
    (b"[a\\]@x", b"\\@x", True),
    (b"[a\\]@x", b"a@x", True),
    (b"[\\]]@x", b"\\]@x", True),
    (b"[\\]]@x", b"]@x", False),
    (b"[]a]", b"]", True),
    # malformed patterns never match
    (b"[abc", b"a", False),
    (b"*[", b"x[", False),
    (b"abc\\", b"abc\\", False),
    (b"abc\\", b"abc", False),
]


@pytest.mark.parametrize("pattern,text,expected", CASES)
def test_table(pattern, text, expected):
    assert M(pattern, text) is expected
    assert O.wildmat_match(pattern, text) is expected


def test_only_star_line_matches_everything():
    # docs/behaviour/control-files.md#wildmat: "A line consisting only of `*` matches everything"
    r = random.Random(1)
    for _ in range(100):
        t = bytes(r.randrange(256) for _ in range(r.randint(0, 40)))
        assert M(b"*", t)


def test_no_exponential_backtracking():
    # 31 stars against 20000 bytes: a backtracking matcher would not finish in
    # our lifetime; the iterative one answers both at once (no timing assert:
    # finishing is the proof).
    p = b"*a" * 30 + b"*b"
    t = b"a" * 20000
    assert M(p, t) is False
    assert M(p, t + b"b") is True


@pytest.mark.parametrize("pattern,literal", [
    (b"*@Spam[0-9].COM", b"@spam"),
    (b"ab?cde*f", b"cde"),
    (b"abc", b"abc"),
    (b"*", b""),
    (b"?[a]*", b""),
    (b"x\\*yz*", b"x*yz"),
    (b"ab*cd", b"ab"),                  # first on ties
    (b"[abc", b""),                     # malformed
    (b"abc\\", b""),
])
def test_wildmat_literal(pattern, literal):
    assert C.wildmat_literal(pattern) == literal
    assert O.wildmat_literal(pattern) == literal


ALPHA = b"abAB*?[]^-\\.\xe9"


def _rand_pattern(r):
    return bytes(r.choice(ALPHA) for _ in range(r.randint(0, 8)))


def _text_from(r, pattern):
    """A text likely to match `pattern` (expand tokens at random)."""
    toks = O._wm_tokens(pattern)
    if toks is None:
        return bytes(r.choice(b"ab") for _ in range(3))
    out = bytearray()
    for tok in toks:
        if tok[0] == "*":
            out += bytes(r.choice(b"abAB.") for _ in range(r.randint(0, 3)))
        elif tok[0] == "?":
            out.append(r.choice(b"ab.\xe9"))
        elif tok[0] == "lit":
            c = tok[1]
            out.append(c - 32 if 97 <= c <= 122 and r.random() < 0.5 else c)
        else:
            lo, hi = r.choice(tok[2])
            out.append(r.randint(lo, hi) if lo <= hi else lo)
    return bytes(out)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_differential_random(seed):
    r = random.Random(seed)
    matched = 0
    for _ in range(1500):
        p = _rand_pattern(r)
        texts = [_text_from(r, p), bytes(r.choice(b"abAB.^-]\xe9") for _ in range(r.randint(0, 8)))]
        for t in texts:
            exp = O.wildmat_match(p, t)
            assert M(p, t) is exp, (p, t)
            matched += exp
        lit = C.wildmat_literal(p)
        assert lit == O.wildmat_literal(p), p
        # every matching text contains the required literal (folded)
        for t in texts:
            if M(p, t):
                assert lit in O.fold(t), (p, t, lit)
    assert matched > 500


RANGE_ALPHA = b"0@AZ[_`az{-^]*?\\"


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_differential_case_folded_ranges(seed):
    """Ranges whose bounds cross the letters ([0-Z], [A-z], [Z-a], [_-a]):
    the matcher and the oracle agree, and case-insensitivity holds (a text
    and its swapped-case twin match the same patterns)."""
    r = random.Random(seed)
    texts = [bytes([c]) for c in range(0x20, 0x7f)]
    for _ in range(600):
        body = bytes(r.choice(b"0@AZ[_`az{") for _ in range(r.randint(1, 3)))
        lo, hi = r.choice(b"0@AZ[_`az{"), r.choice(b"0@AZ[_`az{")
        p = b"[" + (b"^" if r.random() < 0.3 else b"") + bytes([lo]) + b"-" + bytes([hi]) + body + b"]"
        for t in texts:
            exp = O.wildmat_match(p, t)
            assert M(p, t) is exp, (p, t)
            assert M(p, t.swapcase()) is exp, (p, t)
        q = bytes(r.choice(RANGE_ALPHA) for _ in range(r.randint(0, 7)))
        for t in (bytes(r.choice(b"0@AZ[_`az{]\\") for _ in range(r.randint(0, 5))) for _ in range(4)):
            assert M(q, t) is O.wildmat_match(q, t), (q, t)


@pytest.mark.parametrize("seed", [8, 9])
def test_compile_check_agrees_with_matcher(seed):
    """compiler.wildmat_problem() refuses exactly the patterns the matcher
    treats as malformed (the matcher is the reference)."""
    from mailfilter.rules.compiler import wildmat_problem
    r = random.Random(seed)
    for p in [b"[a\\]@x.org", b"[\\]]@x", b"[]]", b"[^]]", b"[]", b"[^]", b"[a-]", b"[\\"] + [
            bytes(r.choice(b"a[]^-\\*") for _ in range(r.randint(0, 7))) for _ in range(3000)]:
        malformed = O._wm_tokens(p) is None
        assert (wildmat_problem(p.decode("latin-1")) is not None) is malformed, p
