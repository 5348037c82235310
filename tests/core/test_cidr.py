"""CidrTrie (cidr.pxi): hand cases, blob validation, differential tests
(tag, version, truncations and random flips for every structure:
test_blob_corruption.py).

The differential tests compare every lookup with the pure-Python oracle in
tests/oracles/cidr.py (ipaddress, linear scan) on seeded random corpora.
"""
import ipaddress
import mmap
import random
import struct

import pytest

from mailfilter.core import core
from oracles.cidr import CidrOracle

cidr_build = core.cidr_build
CidrTrie = core.CidrTrie


def P(text):
    return ipaddress.ip_address(text).packed


def E(net, rid):
    """'10.0.0.0/8' -> entry tuple (packed, plen, id); host bits kept as given."""
    addr, plen = net.split("/")
    return (P(addr), int(plen), rid)


def trie(entries):
    return CidrTrie(cidr_build(entries))


# ------------------------------------------------------------------ hand cases

def test_empty_trie_matches_nothing():
    t = trie([])
    assert len(t) == 0
    assert t.lookup(P("1.2.3.4")) == -1
    assert t.lookup(P("::")) == -1
    assert t.lookup(P("::ffff:1.2.3.4")) == -1


def test_ipv4_default_route():
    t = trie([E("0.0.0.0/0", 7)])
    assert t.lookup(P("0.0.0.0")) == 7
    assert t.lookup(P("255.255.255.255")) == 7
    assert t.lookup(P("::1")) == -1          # IPv6 has its own trie


def test_ipv6_default_route():
    t = trie([E("::/0", 3)])
    assert t.lookup(P("::")) == 3
    assert t.lookup(P("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")) == 3
    assert t.lookup(P("1.2.3.4")) == -1
    assert t.lookup(P("::ffff:1.2.3.4")) == -1   # mapped -> IPv4 trie


def test_host_routes_32_and_128():
    t = trie([E("192.0.2.1/32", 1), E("2001:db8::1/128", 2)])
    assert t.lookup(P("192.0.2.1")) == 1
    assert t.lookup(P("192.0.2.0")) == -1
    assert t.lookup(P("192.0.2.2")) == -1
    assert t.lookup(P("2001:db8::1")) == 2
    assert t.lookup(P("2001:db8::")) == -1
    assert t.lookup(P("2001:db8::3")) == -1
    assert len(t) == 2


def test_ten_slash_8_versus_ten_one_slash_16():
    t = trie([E("10.1.0.0/16", 2), E("10.0.0.0/8", 1)])
    assert t.lookup(P("10.1.0.0")) == 2
    assert t.lookup(P("10.1.255.255")) == 2
    assert t.lookup(P("10.2.0.0")) == 1
    assert t.lookup(P("10.0.255.255")) == 1
    assert t.lookup(P("10.255.255.255")) == 1
    assert t.lookup(P("11.0.0.0")) == -1
    assert t.lookup(P("9.255.255.255")) == -1


def test_nested_prefixes_pick_the_longest():
    t = trie([E("0.0.0.0/0", 0), E("192.168.0.0/16", 1), E("192.168.1.0/24", 2),
              E("192.168.1.128/25", 3), E("192.168.1.200/32", 4),
              E("::/0", 10), E("2001:db8::/32", 11), E("2001:db8:1::/48", 12),
              E("2001:db8:1:2::/64", 13), E("2001:db8:1:2::8000:0/97", 14)])
    assert t.lookup(P("8.8.8.8")) == 0
    assert t.lookup(P("192.168.2.1")) == 1
    assert t.lookup(P("192.168.1.1")) == 2
    assert t.lookup(P("192.168.1.129")) == 3
    assert t.lookup(P("192.168.1.200")) == 4
    assert t.lookup(P("192.168.1.201")) == 3
    assert t.lookup(P("2001:db9::")) == 10
    assert t.lookup(P("2001:db8:2::")) == 11
    assert t.lookup(P("2001:db8:1:3::")) == 12
    assert t.lookup(P("2001:db8:1:2::1")) == 13
    assert t.lookup(P("2001:db8:1:2::8000:1")) == 14
    assert t.lookup(P("2001:db8:1:2::7fff:ffff")) == 13
    assert len(t) == 10


def test_ipv4_mapped_queries_use_the_ipv4_trie():
    t = trie([E("10.0.0.0/8", 1), E("10.1.2.3/32", 2), E("::/0", 9)])
    assert t.lookup(P("::ffff:10.9.9.9")) == 1
    assert t.lookup(P("::ffff:10.1.2.3")) == 2
    assert t.lookup(P("::ffff:11.0.0.1")) == -1
    # not mapped: ::a01:203 (IPv4-compatible, deprecated) is plain IPv6
    assert t.lookup(P("::10.1.2.3")) == 9
    assert t.lookup(P("::fffe:10.1.2.3")) == 9


def test_ipv4_mapped_entries_are_stored_as_ipv4():
    t = trie([E("::ffff:10.0.0.0/104", 1), E("::ffff:192.0.2.7/128", 2),
              E("::ffff:0:0/96", 3)])
    assert t.lookup(P("10.200.0.1")) == 1
    assert t.lookup(P("::ffff:10.200.0.1")) == 1
    assert t.lookup(P("192.0.2.7")) == 2
    assert t.lookup(P("1.1.1.1")) == 3         # ::ffff:0:0/96 == 0.0.0.0/0
    assert t.lookup(P("::1")) == -1
    # the same prefix written both ways is one prefix: the last id wins
    t = trie([E("10.0.0.0/8", 1), E("::ffff:10.0.0.0/104", 2)])
    assert len(t) == 1
    assert t.lookup(P("10.0.0.1")) == 2


def test_duplicate_prefix_keeps_last_id():
    t = trie([E("10.0.0.0/8", 1), E("10.0.0.0/8", 2), E("2001:db8::/32", 5),
              E("2001:db8::/32", 4), E("0.0.0.0/0", 8), E("0.0.0.0/0", 6)])
    assert len(t) == 3
    assert t.lookup(P("10.0.0.1")) == 2
    assert t.lookup(P("2001:db8::1")) == 4
    assert t.lookup(P("11.0.0.1")) == 6


def test_bits_beyond_the_prefix_are_ignored():
    t = trie([E("10.1.2.3/8", 1), E("10.255.255.255/8", 2),
              E("2001:db8:ffff::ffff/32", 3), E("1.2.3.4/0", 4)])
    assert len(t) == 3                       # 10.x/8 twice -> one prefix
    assert t.lookup(P("10.0.0.0")) == 2
    assert t.lookup(P("2001:db8::")) == 3
    assert t.lookup(P("200.0.0.1")) == 4


def test_split_and_insert_above_existing_nodes():
    # insertion orders that exercise every Patricia insert case
    entries = [E("10.1.2.0/24", 1), E("10.1.3.0/24", 2), E("10.1.0.0/16", 3),
               E("10.1.2.128/25", 4), E("10.0.0.0/7", 5), E("11.0.0.0/8", 6)]
    for order in (entries, entries[::-1], entries[2:] + entries[:2]):
        t = trie(order)
        assert t.lookup(P("10.1.2.1")) == 1
        assert t.lookup(P("10.1.2.200")) == 4
        assert t.lookup(P("10.1.3.1")) == 2
        assert t.lookup(P("10.1.4.1")) == 3
        assert t.lookup(P("10.2.0.0")) == 5
        assert t.lookup(P("11.2.0.0")) == 6
        assert t.lookup(P("12.0.0.0")) == -1


def test_blob_is_deterministic_for_the_same_final_set():
    a = [E("10.0.0.0/8", 1), E("10.1.0.0/16", 2), E("2001:db8::/32", 3)]
    assert cidr_build(a) == cidr_build(a[::-1])
    assert cidr_build(a).startswith(b"CIDR" + struct.pack("<I", 1))


def test_lookup_rejects_bad_lengths():
    t = trie([E("0.0.0.0/0", 1)])
    for bad in (b"", b"\x01\x02\x03", b"\x00" * 5, b"\x00" * 15, b"\x00" * 17):
        with pytest.raises(ValueError):
            t.lookup(bad)


@pytest.mark.parametrize("entry", [
    (b"\x01\x02\x03", 8, 1),                 # 3-byte address
    (P("1.2.3.4"), 33, 1),
    (P("1.2.3.4"), -1, 1),
    (P("::1"), 129, 1),
    (P("1.2.3.4"), 8, -1),                   # ids are non-negative int32
    (P("1.2.3.4"), 8, 2 ** 31),
    (P("1.2.3.4"), 8),                       # not a triple
])
def test_build_rejects_bad_entries(entry):
    with pytest.raises(ValueError):
        cidr_build([entry])


def test_build_rejects_non_bytes_address():
    with pytest.raises((TypeError, ValueError)):
        cidr_build([("10.0.0.0", 8, 1)])


# ------------------------------------------------------------- blob validation

def sample_blob():
    return cidr_build([E("0.0.0.0/0", 0), E("10.0.0.0/8", 1), E("10.1.0.0/16", 2),
                       E("10.1.2.3/32", 3), E("::/0", 4), E("2001:db8::/32", 5),
                       E("2001:db8::1/128", 6)])


def test_trailing_bytes_are_tolerated_and_memoryview_of_mmap_works():
    blob = sample_blob()
    t = CidrTrie(blob + b"\x00" * 8)
    assert t.lookup(P("10.1.9.9")) == 2
    m = mmap.mmap(-1, len(blob) + 8)
    m[8:8 + len(blob)] = blob
    t = CidrTrie(memoryview(m)[8:8 + len(blob)])
    assert t.lookup(P("10.1.2.3")) == 3
    assert t.lookup(P("2001:db8::2")) == 5
    assert len(t) == 7
    with pytest.raises(BufferError):         # the trie holds an export
        m.close()
    del t
    import gc
    gc.collect()
    m.close()


def test_unaligned_buffer_is_copied_not_misread():
    blob = sample_blob()
    raw = b"\x00" + blob
    t = CidrTrie(memoryview(raw)[1:])
    assert t.lookup(P("10.1.2.3")) == 3
    assert t.lookup(P("2001:db8::1")) == 6


def patched(blob, offset, fmt, value):
    b = bytearray(blob)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


HEADER = 24
NODE4 = 20   # key, child0, child1, value, plen


# (tag, version, truncations, random flips: test_blob_corruption.py)
@pytest.mark.parametrize("offset,fmt,value", [
    (8, "<I", 99),                            # count disagrees with nodes
    (12, "<I", 0),                            # no IPv4 root
    (12, "<I", 0xFFFFFFFF),                   # absurd node count
    (16, "<I", 1 << 30),                      # IPv6 nodes past the end
    (20, "<I", 1),                            # reserved
    (HEADER + 4, "<i", 0),                    # root child points to itself
    (HEADER + 4, "<i", 1 << 20),              # child out of range
    (HEADER + 8, "<i", -7),                   # negative child other than -1
    (HEADER + 12, "<i", -2),                  # value below -1
    (HEADER + 16, "<I", 1),                   # root is not /0
    (HEADER + NODE4 + 16, "<I", 33),          # plen > 32
    (HEADER + NODE4 + 16, "<I", 0),           # child plen not above parent
])
def test_corruption_is_refused(offset, fmt, value):
    blob = sample_blob()
    with pytest.raises(ValueError):
        CidrTrie(patched(blob, offset, fmt, value))


def test_wrong_buffer_type():
    with pytest.raises(TypeError):
        CidrTrie("CIDR")


# ------------------------------------------------------ differential (oracle)

def rand_bits(rng, nbits):
    return rng.getrandbits(nbits)


def make_corpus(rng, n):
    """Mixed IPv4/IPv6 prefixes that share bits (nesting, siblings, duplicates)."""
    bases4 = [rand_bits(rng, 32) for _ in range(12)]
    bases6 = [rand_bits(rng, 128) for _ in range(12)]
    entries = []
    for rid in range(n):
        r = rng.random()
        if r < 0.5:
            addr = rng.choice(bases4) ^ (rand_bits(rng, 32) >> rng.randrange(8, 33))
            plen = rng.choice([0, 8, 16, 24, 32, rng.randrange(33), rng.randrange(33)])
            packed = addr.to_bytes(4, "big")
        elif r < 0.9:
            addr = rng.choice(bases6) ^ (rand_bits(rng, 128) >> rng.randrange(16, 129))
            plen = rng.choice([0, 32, 48, 64, 128, rng.randrange(129), rng.randrange(129)])
            packed = addr.to_bytes(16, "big")
        elif r < 0.97:                        # IPv4-mapped IPv6 entries
            addr = (0xFFFF << 32) | (rng.choice(bases4) ^ (rand_bits(rng, 32) >> rng.randrange(8, 33)))
            plen = rng.randrange(80, 129)
            packed = addr.to_bytes(16, "big")
        else:                                 # re-use an earlier prefix: duplicate
            if not entries:
                continue
            packed, plen, _ = rng.choice(entries)
        # random ids (not increasing) so "last wins" is observable
        entries.append((packed, plen, rng.randrange(0, 2 ** 31)))
    return entries


def boundary_queries(rng, entries, k):
    """Addresses at, just inside and just outside prefix edges, mapped forms too."""
    out = []
    for _ in range(k):
        packed, plen, _ = rng.choice(entries)
        width = len(packed) * 8
        a = int.from_bytes(packed, "big")
        host = width - plen
        net = (a >> host) << host if host < width else 0
        last = net | ((1 << host) - 1)
        cands = [net, last, net - 1, last + 1, net | rand_bits(rng, host) if host else net,
                 a ^ (1 << (host - 1)) if host else a, a ^ (1 << host) if host < width else a]
        for c in cands:
            c &= (1 << width) - 1
            out.append(c.to_bytes(width // 8, "big"))
            if width == 32 and rng.random() < 0.3:
                out.append(((0xFFFF << 32) | c).to_bytes(16, "big"))
    out += [rand_bits(rng, 32).to_bytes(4, "big") for _ in range(k // 4)]
    out += [rand_bits(rng, 128).to_bytes(16, "big") for _ in range(k // 4)]
    return out


@pytest.mark.parametrize("seed", range(8))
def test_differential_against_oracle(seed):
    rng = random.Random(seed)
    entries = make_corpus(rng, rng.choice([1, 5, 50, 400, 800]))
    t = trie(entries)
    o = CidrOracle(entries)
    assert len(t) == len(o)
    queries = boundary_queries(rng, entries, 300)
    got = [t.lookup(q) for q in queries]
    want = [o.lookup(q) for q in queries]
    assert got == want
    assert any(g >= 0 for g in got)


def test_differential_40k_prefixes():
    rng = random.Random(40000)
    entries = make_corpus(rng, 40000)
    blob = cidr_build(entries)
    t = CidrTrie(blob)
    o = CidrOracle(entries)
    assert len(t) == len(o)
    # compact: path compression keeps it to <= 2n+2 nodes of 20/32 bytes
    assert len(blob) <= 24 + 8 + (2 * len(entries) + 2) * 32
    queries = boundary_queries(rng, entries, 40)
    assert [t.lookup(q) for q in queries] == [o.lookup(q) for q in queries]


# ------------------------------------------------- lookup_text (address text)

def text_forms(rng, packed):
    """Ways a peer address can be written, valid and not."""
    ip = ipaddress.ip_address(packed)
    out = [str(ip), ip.exploded]
    if ip.version == 6:
        out += [str(ip) + "%eth0", str(ip).upper(), "[" + str(ip) + "]", str(ip) + "%",
                str(ip) + "%zone\0x"]
        if ip.ipv4_mapped is not None:
            out.append("::ffff:" + str(ip.ipv4_mapped))
    else:
        out += [str(ip) + " ", " " + str(ip), str(ip) + "%eth0", str(ip) + ".1",
                "::ffff:" + str(ip), str(ip).replace(".", ",", 1)]
    return out


ODD_TEXTS = ["", "unknown", "localhost", "1.2.3", "1.2.3.4.5", "256.1.1.1", "01.2.3.4", "1.2.3.04",
             ":::", "::", "::1", "1::2::3", "fe80::1%", "%eth0", "::ffff:1.2.3.4", "a" * 200,
             "1" * 70 + ":", "ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255", "1.2.3.4\u00e9",
             "\u0661.2.3.4", "0.0.0.0", "255.255.255.255", "::ffff:0:0", "1:2:3:4:5:6:7:8:9"]


def pack_ip_reference(text):
    """lookup_text's contract, in Python (policy.pack_ip)."""
    from mailfilter.policy.engine import pack_ip
    return pack_ip(text)


@pytest.mark.parametrize("seed", range(4))
def test_lookup_text_equals_pack_ip_then_lookup(seed):
    rng = random.Random(seed)
    entries = make_corpus(rng, 300)
    t = trie(entries)
    texts = list(ODD_TEXTS)
    for q in boundary_queries(rng, entries, 100):
        texts += text_forms(rng, q)
    hits = 0
    for text in texts:
        try:
            packed = pack_ip_reference(text)
        except ValueError:                     # embedded NUL: both refuse
            with pytest.raises(ValueError):
                t.lookup_text(text)
            continue
        want = t.lookup(packed) if packed is not None else -1
        assert t.lookup_text(text) == want, text
        hits += want >= 0
    assert hits > 50


def test_lookup_text_nul_rules():
    t = trie([E("0.0.0.0/0", 1), E("::/0", 2)])
    for text in ("1.2.3.4\0", "::1\0", "\0"):
        with pytest.raises(ValueError):
            t.lookup_text(text)
    assert t.lookup_text("fe80::1%eth\0") == 2     # the zone is never parsed
    assert t.lookup_text("1.2.3.4") == 1 and t.lookup_text("::ffff:1.2.3.4") == 1
    with pytest.raises(TypeError):
        t.lookup_text(b"1.2.3.4")
