"""HashTable (HTAB blob): hand cases, differential vs HashOracle, corrupt
fields (tag, version, truncations and random flips for every structure:
test_blob_corruption.py).

Semantics: _core/README.md "hashtab.pxi"; ASCII-only case folding
(docs/behaviour/control-files.md#case).
"""
import mmap
import random
import struct

import pytest

from mailfilter.core import core as C
from oracles.matchers import HashOracle, fold


def test_basic_lookup_and_case_insensitivity():
    t = C.HashTable(C.hashtab_build([b"Joe@Example.COM", b"@spam.net", b".evil.org"], [3, 7, 11]))
    assert t.get(b"joe@example.com") == 3
    assert t.get(b"JOE@EXAMPLE.COM") == 3
    assert t.get(b"@SPAM.net") == 7
    assert t.get(b".evil.org") == 11
    assert t.get(b"evil.org") == -1
    assert t.get(b"") == -1
    assert len(t) == 3


def test_duplicate_keys_last_wins_after_folding():
    t = C.HashTable(C.hashtab_build([b"a@b", b"x", b"A@B", b"a@b"], [1, 2, 3, 9]))
    assert t.get(b"a@b") == 9
    assert len(t) == 2
    t = C.HashTable(C.hashtab_build([b"Key", b"KEY"], [5, 4]))
    assert t.get(b"key") == 4


def test_eight_bit_bytes_are_not_folded():
    t = C.HashTable(C.hashtab_build([b"\xc4x", b"\xe4x"], [1, 2]))
    assert t.get(b"\xc4X") == 1
    assert t.get(b"\xe4x") == 2
    assert len(t) == 2


def test_empty_key_and_empty_table():
    t = C.HashTable(C.hashtab_build([b""], [0]))
    assert t.get(b"") == 0
    assert t.get(b"a") == -1
    e = C.HashTable(C.hashtab_build([], []))
    assert len(e) == 0 and e.get(b"") == -1 and e.get(b"x") == -1


def test_long_key_uses_heap_fold_buffer():
    k = b"A" * 5000 + b"@x"
    t = C.HashTable(C.hashtab_build([k], [42]))
    assert t.get(k.lower()) == 42
    assert t.get(k[:-1]) == -1


def test_builder_rejects_bad_input():
    with pytest.raises(ValueError):
        C.hashtab_build([b"a"], [-1])
    with pytest.raises(ValueError):
        C.hashtab_build([b"a"], [2 ** 31])
    with pytest.raises(ValueError):
        C.hashtab_build([b"a", b"b"], [1])
    with pytest.raises(TypeError):
        C.hashtab_build(["a"], [1])


def test_fold_bytes_and_hash_helpers():
    assert C.fold_bytes(b"AbZ@[`\xc4\xff") == b"abz@[`\xc4\xff"
    assert C.fold_bytes(bytes(range(256))) == fold(bytes(range(256)))
    assert C.hash64(b"abc") == C.hash64(b"abc")
    assert C.hash64(b"abc") != C.hash64(b"abd")
    assert len({C.hash64(bytes([i]) * j) for i in range(50) for j in range(1, 20)}) == 50 * 19


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_differential_random(seed):
    r = random.Random(seed)
    alphabet = b"abcAB.@-\x80\xe9\xc9"
    keys = [bytes(r.choice(alphabet) for _ in range(r.randint(0, 12))) for _ in range(3000)]
    keys += [r.choice(keys) for _ in range(300)]            # duplicates
    values = [r.randint(0, 2 ** 31 - 1) for _ in keys]
    t = C.HashTable(C.hashtab_build(keys, values))
    o = HashOracle(keys, values)
    assert len(t) == len(o)
    queries = [bytes(r.choice(alphabet) for _ in range(r.randint(0, 12))) for _ in range(3000)]
    queries += [bytes(c ^ 0x20 if r.random() < 0.3 and 97 <= (c | 0x20) <= 122 else c for c in k)
                for k in keys]
    hits = 0
    for q in queries:
        got = t.get(q)
        assert got == o.get(q), q
        hits += got >= 0
    assert hits > 3000


def test_buffers_in_place_mmap_bytearray_and_misaligned(tmp_path):
    keys = [b"k%d" % i for i in range(100)]
    blob = C.hashtab_build(keys, list(range(100)))
    # the same keys with other values: the same layout, only the value fields differ
    other = C.hashtab_build(keys, [1000 + i for i in range(100)])
    assert len(other) == len(blob) and other != blob
    f = tmp_path / "h.blob"
    f.write_bytes(b"\0" * 8 + blob)
    with open(f, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        t = C.HashTable(memoryview(mm)[8:])                 # read-only, 8-byte aligned: in place
        assert t.get(b"K57") == 57
        # the shared mapping shows a write to the file: a table read in place sees it
        with open(f, "r+b") as w:
            w.seek(8)
            w.write(other)
        assert mm[8:] == other
        assert [t.get(k) for k in keys] == [1000 + i for i in range(100)]
        del t
    ba = bytearray(blob)
    t = C.HashTable(ba)                                     # writable: copied
    assert t.get(b"k99") == 99
    ba[:] = other                                           # the caller changes its buffer...
    assert [t.get(k) for k in keys] == list(range(100))     # ...the table keeps its own copy
    ba[:] = bytes(len(ba))
    assert [t.get(k) for k in keys] == list(range(100)) and t.get(b"k100") == -1
    odd = memoryview(b"\0" + blob)[1:]                     # misaligned: copied
    assert C.HashTable(odd).get(b"k3") == 3


def test_garbage_fields_rejected():
    blob = bytearray(C.hashtab_build([b"alpha", b"beta"], [1, 2]))
    nslots = struct.unpack_from("<I", blob, 8)[0]
    bad = bytearray(blob)
    struct.pack_into("<I", bad, 8, nslots - 1)              # not a power of two
    with pytest.raises(ValueError):
        C.HashTable(bytes(bad))
    bad = bytearray(blob)
    struct.pack_into("<Q", bad, 16, 10 ** 12)               # pool larger than buffer
    with pytest.raises(ValueError):
        C.HashTable(bytes(bad))
    # find a used slot and point its key outside the pool
    for i in range(nslots):
        off = 32 + 16 * i
        if struct.unpack_from("<I", blob, off + 8)[0] != 0xFFFFFFFF:
            bad = bytearray(blob)
            struct.pack_into("<I", bad, off + 8, 1 << 20)
            with pytest.raises(ValueError, match="pool"):
                C.HashTable(bytes(bad))
            bad = bytearray(blob)
            struct.pack_into("<i", bad, off + 4, -5)
            with pytest.raises(ValueError, match="negative"):
                C.HashTable(bytes(bad))
            break
    else:
        pytest.fail("no used slot")
