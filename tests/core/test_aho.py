"""AhoCorasick (AHOC blob): hand cases, differential vs naive substring search,
corrupt fields (tag, version, truncations and random flips for every
structure: test_blob_corruption.py). Semantics: _core/README.md "aho.pxi"."""
import random
import struct

import pytest

from mailfilter.core import core as C
from oracles.matchers import AhoOracle, fold

STATES_OFF = 32 + 256 * 4


def build(pats, ids=None, fold_case=True):
    ids = list(range(len(pats))) if ids is None else ids
    return C.AhoCorasick(C.aho_build(pats, ids, fold_case)), AhoOracle(pats, ids, fold_case)


def test_classic_overlapping_he_she_hers():
    a, _ = build([b"he", b"she", b"his", b"hers"])
    assert a.find_all(b"ushers") == [0, 1, 3]
    assert a.find_all(b"ahishers") == [0, 1, 2, 3]
    assert a.find_all(b"xyz") == []
    assert a.find_all(b"") == []
    # "she" and "he" both end at index 3: the longest wins
    assert a.search(b"ushers") == (1, 1)
    assert a.search(b"his") == (2, 0)
    assert a.search(b"nothing") == (-1, -1)
    assert a.search(b"") == (-1, -1)
    # trie: root + h,he,hi,his,her,hers + s,sh,she
    assert a.nstates == 10


def test_search_reports_first_end_not_first_start():
    a, _ = build([b"abcdef", b"cd"])
    assert a.search(b"abcdef") == (1, 2)
    a, _ = build([b"bc", b"abc"])
    assert a.search(b"xabc") == (1, 1)


def test_prefix_patterns_and_shared_ids():
    a, _ = build([b"a", b"ab", b"abc", b"abcd"], [4, 4, 2, 9])
    assert a.find_all(b"zabcz") == [2, 4]
    assert a.find_all(b"abcd") == [2, 4, 9]
    assert a.search(b"abcd") == (4, 0)


def test_same_pattern_twice_reports_both_ids():
    a, _ = build([b"spam", b"SPAM", b"spam"], [5, 3, 5])
    assert a.find_all(b"xSpAmx") == [3, 5]
    assert a.search(b"xSpAmx") == (3, 1)        # equal patterns: smallest id


def test_fold_flag():
    a, _ = build([b"Viagra", b"\xc9t\xc9"], fold_case=True)
    assert a.find_all(b"buy VIAGRA now") == [0]
    assert a.find_all(b"\xc9T\xc9") == [1]
    assert a.find_all(b"\xe9t\xe9") == []           # 8-bit bytes are not folded
    assert a.fold is True
    b, _ = build([b"Viagra", b"abc"], fold_case=False)
    assert b.find_all(b"viagra") == []
    assert b.find_all(b"Viagra ABC abc") == [0, 1]
    assert b.fold is False


def test_eight_bit_and_nul_bytes():
    a, _ = build([b"\x00\xff", b"\xff", b"\x80\x81\x82"])
    assert a.find_all(b"a\x00\xffb") == [0, 1]
    assert a.find_all(b"\x80\x81\x82") == [2]
    assert a.search(b"\x00\xff") == (0, 0)


def test_no_patterns():
    a = C.AhoCorasick(C.aho_build([], [], True))
    assert a.nstates == 1
    assert a.find_all(b"anything") == []
    assert a.search(b"anything") == (-1, -1)


def test_builder_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        C.aho_build([b"a", b""], [1, 2], True)
    with pytest.raises(ValueError):
        C.aho_build([b"a"], [-1], True)
    with pytest.raises(ValueError):
        C.aho_build([b"a"], [1, 2], True)
    with pytest.raises(TypeError):
        C.aho_build(["a"], [1], True)


def test_many_children_use_binary_search():
    pats = [bytes([ord("q"), c]) for c in range(256)] + [b"q"]
    a, o = build(pats, fold_case=False)
    r = random.Random(5)
    for _ in range(300):
        t = bytes(r.choice([ord("q"), r.randrange(256)]) for _ in range(r.randint(0, 10)))
        assert a.find_all(t) == o.find_all(t)
        assert a.search(t) == o.search(t)


@pytest.mark.parametrize("seed,fold_case", [(1, True), (2, False), (3, True), (4, False)])
def test_differential_random(seed, fold_case):
    r = random.Random(seed)
    alphabet = b"abAB\xe9\xc9.\x00"
    noise = b"xyzQ-@\x01\xff"                                  # in texts, in no pattern
    # patterns of 2+ bytes: a single-byte pattern for every alphabet byte would
    # make every search a hit at offset 0 (no misses, start == end)
    pats = [bytes(r.choice(alphabet) for _ in range(r.randint(2, 6))) for _ in range(400)]
    ids = [r.randrange(300) for _ in pats]                      # shared ids
    pats += pats[:20]                                           # same pattern, new ids
    ids += [r.randrange(300, 600) for _ in range(20)]
    a, o = build(pats, ids, fold_case)
    nonempty = misses = later = 0
    for _ in range(500):
        t = bytes(r.choice(alphabet + noise) for _ in range(r.randint(0, 30)))
        got = a.find_all(t)
        assert got == o.find_all(t), t
        first = a.search(t)
        assert first == o.search(t), t
        nonempty += bool(got)
        misses += first == (-1, -1)
        later += first[1] > 0
    # hits, misses and first matches after the text's start all occur
    # (seeds 1-4: 354-396 hits, 104-146 misses, 277-294 starts > 0)
    assert nonempty > 250 and misses > 50 and later > 150, (nonempty, misses, later)


def test_trie_state_count_matches_distinct_prefixes():
    r = random.Random(11)
    pats = [bytes(r.choice(b"abcXYZ") for _ in range(r.randint(1, 8))) for _ in range(500)]
    a = C.AhoCorasick(C.aho_build(pats, list(range(500)), True))
    prefixes = {fold(p)[:k] for p in pats for k in range(1, len(p) + 1)}
    assert a.nstates == len(prefixes) + 1


def test_larger_corpus_against_oracle():
    r = random.Random(12)
    words = [bytes(r.choice(b"abcdefghij") for _ in range(r.randint(3, 9))) for _ in range(5000)]
    a, o = build(words)
    for _ in range(100):
        t = b"".join(r.choice(words) if r.random() < 0.3 else bytes([r.choice(b"abcdefghij.@")])
                     for _ in range(8))
        assert a.find_all(t) == o.find_all(t)
        assert a.search(t) == o.search(t)


def test_forward_failure_link_rejected():
    blob = bytearray(C.aho_build([b"he", b"she", b"hers"], [1, 2, 3], True))
    nstates = struct.unpack_from("<I", blob, 8)[0]
    s = 2
    off = STATES_OFF + 16 * s + 4                   # fail_label: label << 24 | fail
    label = struct.unpack_from("<I", blob, off)[0] >> 24
    struct.pack_into("<I", blob, off, label << 24 | (nstates - 1))   # fail -> deeper state
    with pytest.raises(ValueError, match="shallower"):
        C.AhoCorasick(bytes(blob))


def test_root_table_out_of_range_rejected():
    blob = bytearray(C.aho_build([b"he"], [1], True))
    struct.pack_into("<I", blob, 32 + 4 * ord("h"), 1000)
    with pytest.raises(ValueError, match="root"):
        C.AhoCorasick(bytes(blob))
