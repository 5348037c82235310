"""Regex filters (prefilters.regex_filter + _core listmatch): a minimum length and,
for `^`-anchored patterns, the possible first bytes, checked in C before RE2
runs. Soundness: whenever the filter rules a text out, RE2 must not match it.
Checked through the C path: a one-regex ListMatcher must answer exactly what
RE2 answers, for random patterns and texts (8-bit bytes, empty text)."""
import random

import pytest

from mailfilter.core import core
from mailfilter.rules.prefilters import regex_filter
from mailfilter.rules.regexes import compile_re2
from tests.support.regex_helpers import CountingRegex

TEMPLATES = [
    "^[0-9]{{{n},}}@", "^[a-z0-9]{{{n},}}@", "^{w}", "^({w}|{v})x", "^[{c}-{d}]+\\.{w}$",
    "{w}[0-9]*$", "^.{{{n}}}$", "^(?:{w})?{v}", "^[^@]{{{n},}}", "^\\d+", "^{W}{n}",
    "^([{c}{d}]|{v}){{2}}", "(?i)^{W}", "^a?b?{w}", "^(|{w}){v}", "[[:digit:]]{{{n}}}",
    # required bytes (rare ones: a 68-byte record)
    "^[^@]*[%!][^@]*@", "{w}[_=]", "({w}[%_])+{v}", "(?:[%!]|{w})x", "[%!]?{w}", "{w}(=|\\+)+",
    "^{w}_", "[^=]{{{n}}}=", "{w}|[%=]", "(_{w})?%",
]


def random_pattern(rng):
    t = rng.choice(TEMPLATES)
    word = lambda: "".join(rng.choice("abkSXz019.-") for _ in range(rng.randint(1, 4)))  # noqa: E731
    c, d = sorted(rng.sample("abcdefxyz", 2))
    return t.format(n=rng.randint(0, 6), w=word().replace(".", "\\."), v=word().replace(".", "\\."),
                    W=word().upper().replace(".", "\\."), c=c, d=d)


def random_text(rng):
    alphabet = b"abcdefkSxyzXZ0123456789.-@_\xe9\xc9\x80\xff%!=+"
    return bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))


def one_regex_matcher(pattern: str, with_filter: bool, regex=None):
    blob = core.listmatch_build([], [], [], [], [7], [b""], [False],
                                [regex_filter(pattern) if with_filter else b""])
    return core.ListMatcher(blob, [regex if regex is not None else compile_re2(pattern)])


def counted(pattern: str):
    """(matcher, counter): a filtered one-regex matcher whose RE2 calls are counted."""
    rx = CountingRegex(pattern)
    return one_regex_matcher(pattern, True, rx), rx


def record_admits(rec: bytes, text: bytes) -> bool:
    """The filter record's documented meaning (listmatch_build), in Python:
    False = the C side must answer "no match" without running the regex."""
    if not rec:
        return True
    if len(text) < int.from_bytes(rec[:4], "little"):
        return False
    if len(rec) >= 36 and (not text or not rec[4 + (text[0] >> 3)] >> (text[0] & 7) & 1):
        return False
    if len(rec) == 68:
        return any(rec[36 + (b >> 3)] >> (b & 7) & 1 for b in text)
    return True


def test_filters_are_sound():
    rng = random.Random(7)
    checked = ruled_out = 0
    for _ in range(400):
        pattern = random_pattern(rng)
        compiled = compile_re2(pattern)
        rec = regex_filter(pattern)
        m, rx = counted(pattern)
        for _ in range(40):
            text = random_text(rng)
            expect = 7 if compiled.search(text) is not None else -1
            before = rx.calls
            assert m.last_match(text, 0) == expect, (pattern, text)
            # RE2 runs exactly when the filter lets the text through
            admits = record_admits(rec, text)
            assert rx.calls - before == (1 if admits else 0), (pattern, text, admits)
            checked += 1
            ruled_out += not admits
    assert checked == 16000
    # the filters do rule things out (else the test proves nothing)
    assert ruled_out > 5000, ruled_out          # 8885 with this seed
    for pattern, text in (("^[0-9]{12,}@", b"alice@example.com"), ("^abc", b"xabc"),
                          ("^abc", b""), ("viagra", b"viagr")):
        assert regex_filter(pattern)
        m, rx = counted(pattern)
        assert m.last_match(text, 0) == -1 and m.first_fire(text) == -1
        assert rx.calls == 0, (pattern, text)          # ruled out in C, RE2 never ran
    # and a text that passes the filter does reach RE2, match or not
    for pattern, text, expect in (("^[0-9]{12,}@", b"123456789012@x", 7),
                                  ("^[0-9]{12,}@", b"1234567890123x", -1), ("^abc", b"abcd", 7)):
        m, rx = counted(pattern)
        assert m.last_match(text, 0) == expect and rx.calls == 1, (pattern, text)


@pytest.mark.parametrize("pattern,text,fires", [
    ("^[0-9]{12,}@", b"123456789012@x", False),   # matches -> a negated entry does not fire
    ("^[0-9]{12,}@", b"short@x", True),           # ruled out by the filter -> fires
    ("^abc", b"", True),
])
def test_negated_entry_uses_filter(pattern, text, fires):
    blob = core.listmatch_build([], [], [], [], [3], [b""], [True], [regex_filter(pattern)])
    m = core.ListMatcher(blob, [compile_re2(pattern)])
    assert m.first_fire(text) == (3 if fires else -1)


@pytest.mark.parametrize("pattern,min_len,anchored", [
    ("^[0-9]{12,}@", 13, True), ("viagra", 6, False), ("[[:alpha:]]x", 2, False),
    ("(?m)^a", 1, False),        # multi-line: `^` is no anchor, the minimum length stays
    ("a|bc", 1, False), ("^(foo|ba)x", 3, True), ("(?x)a", None, False),   # RE2 refuses (?x)
])
def test_filter_records(pattern, min_len, anchored):
    rec = regex_filter(pattern)
    if min_len is None:
        assert rec == b""
    else:
        assert int.from_bytes(rec[:4], "little") == min_len
        assert len(rec) in ((36, 68) if anchored else (4, 68))


@pytest.mark.parametrize("pattern,required", [
    ("^[^@]*[%!][^@]*@", b"!%"), ("x(=|\\+)+y", b"+="), ("[_=]", b"=_"), ("(ab_)+", b"_"),
    ("viagra", None),            # letters: common (and folded to non-ASCII): no record
    ("[%!]?a", None),            # optional: not required
    ("a|_", None),               # top-level alternation
    ("^[0-9]+@", None),          # digits and @ are in every address
])
def test_required_bytes(pattern, required):
    rec = regex_filter(pattern)
    if required is None:
        assert len(rec) != 68
        return
    assert len(rec) == 68
    got = bytes(b for b in range(256) if rec[36 + (b >> 3)] >> (b & 7) & 1)
    assert got == required
    m, rx = counted(pattern)
    assert m.last_match(b"abcdef@example.com", 0) == -1     # none of them: no RE2 call
    assert rx.calls == 0
    # one required byte present (and long enough): the filter lets it through to RE2
    text = b"abcdef@example.com" + bytes([required[0]]) * 8
    assert record_admits(rec, text)
    m.last_match(text, 0)
    assert rx.calls == 1


def test_required_bytes_first_bitmap_is_open_when_unanchored():
    rec = regex_filter("[_=]")
    assert rec[4:36] == b"\xff" * 32


def test_bad_filter_refused():
    with pytest.raises(ValueError, match="regex filter"):
        core.listmatch_build([], [], [], [], [1], [b""], [False], [b"xyz"])
