"""LiteralIndex (LIDX blob, _core/litindex.pxi): which literals occur in a
text. Its answers are those of naive substring search (the AhoOracle of
tests/support/oracles) and of the Aho-Corasick automaton it replaced in
ListMatcher, on hand cases and seeded random literal sets chosen to share
8-byte windows; plus the checks of single fields of the blob (corrupt blobs
in general: test_blob_corruption.py)."""
import random
import struct

import pytest

from mailfilter.core import core as C
from oracles.matchers import AhoOracle

HEADER = 88


def build(lits, ids=None):
    ids = list(range(len(lits))) if ids is None else ids
    return C.LiteralIndex(C.litindex_build(lits, ids)), AhoOracle(lits, ids, True)


def test_long_and_short_literals_case_insensitive():
    li, _ = build([b"pilfinDEAL891710", b"%", b"@x", b"deal891710.top", b"abcdefgh"])
    assert li.find_all(b"mx5.PilFinDeal891710.top") == [0, 3]
    assert li.find_all(b"a%b@X") == [1, 2]
    assert li.find_all(b"abcdefg") == []            # one byte short of the literal
    assert li.find_all(b"abcdefgh") == [4]          # the whole text
    assert li.find_all(b"") == []
    assert li.counts() == {"indexed": 3, "short_states": 4}


def test_one_literal_many_ids_and_repeats():
    li, _ = build([b"samewindow", b"samewindow", b"xsamewindowx"], [7, 3, 9])
    assert li.find_all(b"..samewindow..samewindow") == [3, 7]
    assert li.find_all(b"xsamewindowx") == [3, 7, 9]


def test_literal_at_the_text_edges():
    # the indexed window may sit anywhere in the literal: the literal must
    # still be found at the very start and the very end of a text
    lits = [b"0123456789abcdef", b"ghijklmnopqrst"]
    li, _ = build(lits)
    for lit in lits:
        assert li.find_all(lit) == [lits.index(lit)]
        assert li.find_all(lit + b"!") == [lits.index(lit)]
        assert li.find_all(b"!" + lit) == [lits.index(lit)]
        assert li.find_all(lit[1:]) == []
        assert li.find_all(lit[:-1]) == []


def test_empty_index():
    li, _ = build([])
    assert li.find_all(b"anything at all") == []
    assert li.counts() == {"indexed": 0, "short_states": 1}


def test_builder_refuses_bad_input():
    with pytest.raises(ValueError):
        C.litindex_build([b""], [1])
    with pytest.raises(ValueError):
        C.litindex_build([b"abcdefghij"], [-1])
    with pytest.raises(ValueError):
        C.litindex_build([b"abcdefghij"], [1, 2])


@pytest.mark.parametrize("seed", range(6))
def test_random_against_substring_search_and_the_automaton(seed):
    r = random.Random(seed)
    alphabet = b"abcAB.-@0"          # small: literals share windows, texts hit them
    lits = []
    for _ in range(r.choice((5, 40, 300))):
        ln = r.choice((1, 2, 5, 7, 8, 9, 12, 20))
        lits.append(bytes(r.choice(alphabet) for _ in range(ln)))
    ids = [r.randrange(50) for _ in lits]
    li, oracle = build(lits, ids)
    aho = C.AhoCorasick(C.aho_build(lits, ids, True))
    for _ in range(300):
        parts = [bytes(r.choice(alphabet) for _ in range(r.randrange(6)))]
        for _ in range(r.randrange(3)):
            parts.append(r.choice(lits))
            parts.append(bytes(r.choice(alphabet) for _ in range(r.randrange(4))))
        text = b"".join(parts).swapcase() if r.random() < 0.3 else b"".join(parts)
        want = oracle.find_all(text)
        assert li.find_all(text) == want, (lits, text)
        assert aho.find_all(text) == want


def _blob_with(blob: bytes, at: int, fmt: str, value) -> bytes:
    b = bytearray(blob)
    struct.pack_into(fmt, b, at, value)
    return bytes(b)


def test_corrupt_fields_are_refused():
    blob = C.litindex_build([b"abcdefghij", b"klmnopqrstu"], [1, 2])
    C.LiteralIndex(blob)
    rec_off = struct.unpack_from("<Q", blob, 40)[0]
    bucket_off = struct.unpack_from("<Q", blob, 32)[0]
    bad = [
        _blob_with(blob, 12, "<I", 0),               # bucket bits
        _blob_with(blob, 16, "<I", 40),              # filter bits
        _blob_with(blob, 24, "<Q", 3),               # unaligned section
        _blob_with(blob, 48, "<Q", len(blob) + 8),   # pool outside the blob
        _blob_with(blob, bucket_off, "<I", 1),       # bucket starts must begin at 0
        _blob_with(blob, rec_off + 8, "<i", -5),     # negative id
        _blob_with(blob, rec_off + 12, "<I", 9),     # window past the literal's end
        _blob_with(blob, rec_off + 20, "<I", 4),     # literal shorter than a window
        _blob_with(blob, rec_off + 16, "<I", 1000),  # literal outside the pool
    ]
    for b in bad:
        with pytest.raises(ValueError):
            C.LiteralIndex(b)


def test_listmatcher_refuses_literal_ids_outside_its_entries():
    # a wildmat with a long literal: entry 0; an LIDX record naming entry 5
    # (patched in the embedded blob) must be refused by ListMatcher
    blob = C.listmatch_build([], [], [b"*longliteral*"], [4], [], [], [])
    m = C.ListMatcher(blob, [])
    assert m.last_match(b"a longliteral b", 0) == 4
    lidx_off = struct.unpack_from("<Q", blob, 40)[0]
    rec_off = lidx_off + struct.unpack_from("<Q", blob, lidx_off + 40)[0]
    with pytest.raises(ValueError):
        C.ListMatcher(_blob_with(blob, rec_off + 8, "<i", 5), [])
