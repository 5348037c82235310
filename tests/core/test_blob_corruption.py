"""Every compiled structure refuses a blob it cannot trust; none crashes.

The loaders (HTAB, AHOC, LIDX, CIDR, LMAT: _core/README.md) read blobs from bundle
files, which may be truncated or damaged on disk. One table (STRUCTURES)
names each loader with its blobs and queries; each check below runs for every
structure as its own test case:

- a wrong tag and an unknown version are refused with ValueError naming them;
- every truncation of a valid blob is refused (ValueError);
- seeded random byte flips either are refused with ValueError or load a
  structure whose queries answer in range (never a crash, never garbage).

Each check first loads the intact blob and checks one answer (the control:
a loader that refused everything would otherwise pass), and reports every
failing case, not only the first. Checks of single fields (a failure link
pointing deeper, a slot key outside the pool...) stay with each structure's
own tests.
"""
from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import dataclass
from typing import Callable

import pytest
import re2

from mailfilter.core import core as C
from oracles.matchers import MODE_ADDRESS


@dataclass(frozen=True)
class Structure:
    load: Callable[[bytes], object]      # raises ValueError for a bad blob
    blob: bytes                          # for tag, version and truncations
    intact: Callable[[object], bool]     # one known answer of `blob`
    bad_tag: bytes
    bad_version: int
    flip_blob: bytes                     # a larger blob for the random flips
    flip_load: Callable[[bytes], object]
    flip_seed: int
    flip_runs: int
    max_flips: int                       # bytes changed per run: 1..max_flips
    probe: Callable[[object], None]      # queries a flipped blob that loaded


def _aho_probe(a) -> None:
    for t in (b"ushers", b"abcd", b"\xff" * 5, b""):
        assert all(i >= 0 for i in a.find_all(t))
        a.search(t)


_LI_LITS = [b"abcdefghij", b"cdefghijkl", b"zzzzzzzzz", b"%", b"@x", b"0123456789abc"]
_LI_TEXTS = (b"xxabcdefghijklmn", b"0123456789ABCzzzzzzzzzz", b"a%b@x", b"\xff" * 9, b"")


def _litindex_probe(a) -> None:
    for t in _LI_TEXTS:
        assert all(i >= 0 for i in a.find_all(t))


def _hashtab_probe(t) -> None:
    for i in range(0, 50, 7):
        assert t.get(b"key%d" % i) in range(-1, 2 ** 31)


def _packed(text: str) -> bytes:
    return ipaddress.ip_address(text).packed


_CIDR_QUERIES = [_packed(q) for q in ("10.1.2.3", "10.9.9.9", "8.8.8.8", "2001:db8::1",
                                      "::ffff:10.1.0.1", "fe80::1")]


def _cidr_probe(t) -> None:
    for q in _CIDR_QUERIES:
        assert -1 <= t.lookup(q) <= 0x7FFFFFFF


def _listmatch_probe(m) -> None:
    for t in (b"q@xyz", b"a@b.c", b"yaz", b""):
        m.last_match(t, MODE_ADDRESS)
        m.first_fire(t)


def _rx(pat: bytes):
    return re2.compile(pat, re2.IGNORECASE)


def _cidr_blob() -> bytes:
    nets = [("0.0.0.0", 0), ("10.0.0.0", 8), ("10.1.0.0", 16), ("10.1.2.3", 32),
            ("::", 0), ("2001:db8::", 32), ("2001:db8::1", 128)]
    return C.cidr_build([(_packed(addr), plen, rid) for rid, (addr, plen) in enumerate(nets)])


_LM_SMALL = [_rx(b"zz")]
_LM_FLIP = [_rx(b"zz"), _rx(b"^q")]

STRUCTURES = {
    "aho": Structure(
        load=C.AhoCorasick,
        blob=C.aho_build([b"he", b"she", b"hers"], [1, 2, 3], True),
        intact=lambda a: a.find_all(b"ushers") == [1, 2, 3],
        bad_tag=b"HTAB", bad_version=9,
        flip_blob=C.aho_build([b"he", b"she", b"hers", b"his", b"abc", b"bcd"],
                              [1, 2, 3, 4, 5, 6], True),
        flip_load=C.AhoCorasick, flip_seed=9, flip_runs=3000, max_flips=3, probe=_aho_probe),
    "litindex": Structure(
        load=C.LiteralIndex,
        blob=C.litindex_build([b"abcdefghij", b"%"], [1, 2]),
        intact=lambda a: a.find_all(b"xABCDEFGHIJ%") == [1, 2],
        bad_tag=b"LIDY", bad_version=2,
        flip_blob=C.litindex_build(_LI_LITS, list(range(len(_LI_LITS)))),
        flip_load=C.LiteralIndex, flip_seed=11, flip_runs=3000, max_flips=3,
        probe=_litindex_probe),
    "hashtab": Structure(
        load=C.HashTable,
        blob=C.hashtab_build([b"alpha", b"beta", b"gamma"], [1, 2, 3]),
        intact=lambda t: t.get(b"GAMMA") == 3,
        bad_tag=b"XTAB", bad_version=2,
        flip_blob=C.hashtab_build([b"key%d" % i for i in range(50)], list(range(50))),
        flip_load=C.HashTable, flip_seed=7, flip_runs=2000, max_flips=4, probe=_hashtab_probe),
    "cidr": Structure(
        load=C.CidrTrie,
        blob=_cidr_blob(),
        intact=lambda t: t.lookup(_packed("10.1.9.9")) == 2 and len(t) == 7,
        bad_tag=b"CIDX", bad_version=2,
        flip_blob=_cidr_blob(),
        flip_load=C.CidrTrie, flip_seed=20260, flip_runs=3000, max_flips=3, probe=_cidr_probe),
    "listmatch": Structure(
        load=lambda b: C.ListMatcher(b, _LM_SMALL),
        blob=C.listmatch_build([b"a@b.c"], [1], [b"*@x*"], [2], [3], [b"zz"], [True]),
        intact=lambda m: m.last_match(b"q@xy", MODE_ADDRESS) == 2,
        bad_tag=b"LMAX", bad_version=0,
        flip_blob=C.listmatch_build([b"a@b.c", b".d"], [1, 5],
                                    [b"*@x*", b"y?z", b"*q@xyzlongliteral*"], [2, 4, 7],
                                    [3, 6], [b"zz", b""], [True, False]),
        flip_load=lambda b: C.ListMatcher(b, _LM_FLIP),
        flip_seed=3, flip_runs=2000, max_flips=3, probe=_listmatch_probe),
}


def byte_flips(blob: bytes, seed: int, runs: int, max_flips: int):
    """`runs` copies of `blob`, each with 1..max_flips bytes set to random
    values (seeded: the same cases every run)."""
    r = random.Random(seed)
    for _ in range(runs):
        bad = bytearray(blob)
        for _ in range(r.randint(1, max_flips)):
            i = r.randrange(len(bad))
            bad[i] = r.randrange(256)
        yield bytes(bad)


def _refused(load, blob: bytes) -> bool:
    try:
        load(blob)
    except ValueError:
        return True
    return False


@pytest.fixture(params=sorted(STRUCTURES))
def s(request) -> Structure:
    s = STRUCTURES[request.param]
    assert s.intact(s.load(s.blob))
    return s


def test_wrong_tag_is_refused(s):
    with pytest.raises(ValueError, match="tag"):
        s.load(s.bad_tag + s.blob[4:])


def test_unknown_version_is_refused(s):
    with pytest.raises(ValueError, match="version"):
        s.load(s.blob[:4] + struct.pack("<I", s.bad_version) + s.blob[8:])


def test_every_truncation_is_refused(s):
    loaded = [cut for cut in range(len(s.blob)) if not _refused(s.load, s.blob[:cut])]
    assert loaded == [], f"truncated blobs accepted at these lengths: {loaded}"


def test_random_byte_flips_never_crash(s):
    loaded = refused = 0
    for bad in byte_flips(s.flip_blob, s.flip_seed, s.flip_runs, s.max_flips):
        try:
            obj = s.flip_load(bad)
        except ValueError:
            refused += 1
            continue
        loaded += 1
        s.probe(obj)
    # both outcomes occur, so both the checks and the queries were exercised
    assert loaded > 0 and refused > 0, (loaded, refused)
