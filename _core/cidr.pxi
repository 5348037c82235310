# cidr.pxi: longest-prefix match for IPv4 and IPv6 (client rules,
# docs/behaviour/tcp-smtp.md#which-rule-applies).
"""Longest-prefix CIDR trie for IPv4 and IPv6 over a flat, mmap-able blob.

Job: map a client address (packed, 4 or 16 bytes) to the rule id of the
longest prefix that contains it (tcprules-style client rules,
docs/behaviour/tcp-smtp.md#which-rule-applies; prefixes per RFC 4632 / RFC 4291 §2.3), -1
when no prefix does.

Structure: two path-compressed binary tries (Patricia tries), one for IPv4 and
one for IPv6. Every node holds a prefix (key bits + length); a node with
value -1 is a pure branch node created where two prefixes diverge. At most
2n+1 nodes for n prefixes. Lookup walks from the root (always /0), checks that
the query agrees with the node's key on its plen bits, records the node's value
when it has one, and descends on the query bit at position plen.

IPv4-mapped IPv6 (RFC 4291 §2.5.5.2, ::ffff:a.b.c.d): queries are looked up
in the IPv4 trie; by the same rule, a 16-byte entry inside ::ffff:0:0/96 with
prefix length >= 96 is stored in the IPv4 trie as a.b.c.d/(plen - 96).
Shorter IPv6 entries (e.g. ::/0) stay in the IPv6 trie and do not match
mapped queries.

Blob (little-endian, arrays 8-byte aligned), version 1:
    0   char[4]   "CIDR"
    4   uint32    version (1)
    8   uint32    count: distinct prefixes stored (__len__)
    12  uint32    n4: IPv4 nodes (>= 1: node 0 is the /0 root)
    16  uint32    n6: IPv6 nodes (>= 1)
    20  uint32    reserved, 0
    24  CidrNode4[n4]  {uint32 key; int32 child[2]; int32 value; uint32 plen}
        padding to 8
    ..  CidrNode6[n6]  {uint64 hi; uint64 lo; int32 child[2]; int32 value; uint32 plen}
Keys are the address as an unsigned integer (IPv6: high and low 64 bits),
bits past plen zero. Nodes are in depth-first preorder, so a child index is
always greater than its parent's.

Invariants (checked when a CidrTrie is constructed; ValueError otherwise):
tag, version, sizes fit in the buffer, root plen 0, every child index is -1
or in (parent, n), a child's plen exceeds its parent's and is <= 32 / 128,
values are >= -1, and count equals the number of valued nodes. These make
lookup memory-safe and bounded (<= 33 / 129 steps) on any buffer that loads.
Lookup is allocation-free C; the trie keeps a buffer export of the blob.
"""

from libc.stdint cimport int32_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcmp, memcpy, memset
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.bytes cimport (PyBytes_AS_STRING, PyBytes_GET_SIZE,
                            PyBytes_FromStringAndSize)

cdef extern from *:
    """
    static inline int mf_cidr_clz64(unsigned long long x) {
    #if defined(__GNUC__) || defined(__clang__)
        return x ? __builtin_clzll(x) : 64;
    #else
        int n = 0;
        if (!x) return 64;
        while (!(x & 0x8000000000000000ULL)) { x <<= 1; n++; }
        return n;
    #endif
    }
    """
    int mf_cidr_clz64(uint64_t x) nogil

ctypedef struct CidrNode4:
    uint32_t key
    int32_t child[2]
    int32_t value
    uint32_t plen

ctypedef struct CidrNode6:
    uint64_t hi
    uint64_t lo
    int32_t child[2]
    int32_t value
    uint32_t plen

cdef extern from "arpa/inet.h" nogil:
    int _cidr_inet_pton "inet_pton"(int af, const char* src, void* dst)
    enum:
        _CIDR_AF_INET "AF_INET"
        _CIDR_AF_INET6 "AF_INET6"

from cpython.unicode cimport PyUnicode_AsUTF8AndSize

cdef enum:
    _CIDR_HEADER = 24
    _CIDR_TEXT_MAX = 63     # > 45, the longest IPv6 literal with embedded IPv4
cdef uint32_t _CIDR_VERSION = 1

if sizeof(CidrNode4) != 20 or sizeof(CidrNode6) != 32:  # pragma: no cover
    raise ImportError("mailfilter._core: unexpected CIDR node layout")
import sys as _cidr_sys
if _cidr_sys.byteorder != "little":  # pragma: no cover
    raise ImportError("mailfilter._core: CIDR blobs need a little-endian host")


cdef inline uint64_t _cidr_mask64(uint32_t p) noexcept nogil:
    # The p leading one bits of a 64-bit word, 0 <= p <= 64.
    return 0 if p == 0 else (<uint64_t>0xFFFFFFFFFFFFFFFF) << (64 - p)


cdef inline uint32_t _cidr_bit(uint64_t hi, uint64_t lo, uint32_t pos) noexcept nogil:
    # Bit `pos` of a 128-bit key, 0 = most significant.
    if pos < 64:
        return <uint32_t>((hi >> (63 - pos)) & 1)
    return <uint32_t>((lo >> (127 - pos)) & 1)


cdef inline int32_t _cidr_lookup4(const CidrNode4* t, uint32_t q) noexcept nogil:
    cdef int32_t best = -1
    cdef int32_t i = 0
    cdef uint32_t p
    while True:
        p = t[i].plen
        # mask of p leading ones; a 64-bit shift keeps p == 0 defined
        if (q ^ t[i].key) & <uint32_t>((<uint64_t>0xFFFFFFFF) << (32 - p)):
            return best
        if t[i].value >= 0:
            best = t[i].value
        if p >= 32:
            return best
        i = t[i].child[(q >> (31 - p)) & 1]
        if i < 0:
            return best


cdef inline int32_t _cidr_lookup6(const CidrNode6* t, uint64_t qh, uint64_t ql) noexcept nogil:
    cdef int32_t best = -1
    cdef int32_t i = 0
    cdef uint32_t p
    while True:
        p = t[i].plen
        if p <= 64:
            if (qh ^ t[i].hi) & _cidr_mask64(p):
                return best
        elif qh != t[i].hi or ((ql ^ t[i].lo) & _cidr_mask64(p - 64)):
            return best
        if t[i].value >= 0:
            best = t[i].value
        if p >= 128:
            return best
        i = t[i].child[_cidr_bit(qh, ql, p)]
        if i < 0:
            return best


cdef inline uint64_t _cidr_be64(const unsigned char* a) noexcept nogil:
    cdef uint64_t v = 0
    cdef int k
    for k in range(8):
        v = (v << 8) | a[k]
    return v


cdef inline uint32_t _cidr_be32(const unsigned char* a) noexcept nogil:
    return ((<uint32_t>a[0] << 24) | (<uint32_t>a[1] << 16) |
            (<uint32_t>a[2] << 8) | <uint32_t>a[3])


cdef inline bint _cidr_is_v4mapped(const unsigned char* a) noexcept nogil:
    # RFC 4291 §2.5.5.2: 80 zero bits, 16 one bits, then the IPv4 address.
    cdef int k
    for k in range(10):
        if a[k]:
            return False
    return a[10] == 0xFF and a[11] == 0xFF


# ---------------------------------------------------------------- builder

cdef struct _CidrBuild:
    CidrNode6* nodes      # 128-bit keys for both families while building
    int32_t n
    int32_t cap


cdef inline int32_t _cidr_new(_CidrBuild* b, uint64_t hi, uint64_t lo,
                              uint32_t plen, int32_t value) noexcept nogil:
    cdef int32_t j = b.n
    b.nodes[j].hi = hi & _cidr_mask64(plen if plen < 64 else 64)
    b.nodes[j].lo = lo & _cidr_mask64(plen - 64 if plen > 64 else 0)
    b.nodes[j].child[0] = -1
    b.nodes[j].child[1] = -1
    b.nodes[j].value = value
    b.nodes[j].plen = plen
    b.n = j + 1
    return j


cdef void _cidr_insert(_CidrBuild* b, uint64_t hi, uint64_t lo, uint32_t p,
                       int32_t value) noexcept nogil:
    # Patricia insert; node 0 is the /0 root, so a split never happens above
    # it. hi/lo are already masked to p bits. Adds at most 2 nodes.
    cdef int32_t parent = -1, side = 0, i = 0, j
    cdef uint32_t c, np, bit
    cdef uint64_t x
    cdef CidrNode6* n
    while True:
        n = &b.nodes[i]
        np = n.plen
        x = hi ^ n.hi
        c = <uint32_t>mf_cidr_clz64(x) if x else 64 + <uint32_t>mf_cidr_clz64(lo ^ n.lo)
        if c > p:
            c = p
        if c >= np:
            # n's prefix contains the new one
            if p == np:
                n.value = value          # duplicate prefix: the last id wins
                return
            bit = _cidr_bit(hi, lo, np)
            if n.child[bit] < 0:
                j = _cidr_new(b, hi, lo, p, value)
                b.nodes[i].child[bit] = j
                return
            parent = i
            side = <int32_t>bit
            i = n.child[bit]
            continue
        # the keys diverge (or the new prefix ends) inside n's edge, at bit c
        if c == p:
            j = _cidr_new(b, hi, lo, p, value)
            b.nodes[j].child[_cidr_bit(b.nodes[i].hi, b.nodes[i].lo, p)] = i
        else:
            j = _cidr_new(b, hi, lo, c, -1)
            b.nodes[j].child[_cidr_bit(hi, lo, c)] = _cidr_new(b, hi, lo, p, value)
            b.nodes[j].child[_cidr_bit(b.nodes[i].hi, b.nodes[i].lo, c)] = i
        b.nodes[parent].child[side] = j
        return


cdef int32_t _cidr_preorder(_CidrBuild* b, int32_t* order, int32_t* newidx) noexcept nogil:
    # Depth-first preorder (child 0 first) from the root; fills order[] with
    # old indexes and newidx[old] with the new index; returns the node count.
    cdef int32_t stack[260]
    cdef int32_t sp = 0, k = 0, i
    stack[sp] = 0
    sp += 1
    while sp:
        sp -= 1
        i = stack[sp]
        newidx[i] = k
        order[k] = i
        k += 1
        if b.nodes[i].child[1] >= 0:
            stack[sp] = b.nodes[i].child[1]
            sp += 1
        if b.nodes[i].child[0] >= 0:
            stack[sp] = b.nodes[i].child[0]
            sp += 1
    return k


def cidr_build(entries):
    """Build a CIDR blob from `(packed_address, prefix_len, rule_id)` entries.

    packed_address is 4 bytes (IPv4, prefix 0..32) or 16 bytes (IPv6, prefix
    0..128); bits past the prefix are ignored; a duplicate prefix keeps the
    LAST id; rule ids are 0..2**31-1. IPv4-mapped IPv6 entries with prefix
    >= 96 are stored as IPv4 (see module docstring). Returns bytes.
    """
    cdef list items = list(entries)
    cdef Py_ssize_t m = len(items), k
    cdef _CidrBuild b4, b6
    cdef _CidrBuild* b
    cdef const unsigned char* a
    cdef Py_ssize_t alen
    cdef long long plen_ll, rid_ll
    cdef uint32_t plen
    cdef uint64_t hi, lo
    cdef int32_t* order = NULL
    cdef int32_t* newidx = NULL
    cdef int32_t n4, n6, count, i, old
    cdef Py_ssize_t off6, total
    cdef bytes out
    cdef char* o
    cdef CidrNode4* t4
    cdef CidrNode6* t6
    if m > 0x3FFFFFFF:
        raise ValueError("too many CIDR entries")
    b4.nodes = NULL
    b6.nodes = NULL
    try:
        b4.cap = <int32_t>(2 * m + 1)
        b6.cap = <int32_t>(2 * m + 1)
        b4.nodes = <CidrNode6*>malloc(b4.cap * sizeof(CidrNode6))
        b6.nodes = <CidrNode6*>malloc(b6.cap * sizeof(CidrNode6))
        order = <int32_t*>malloc(b4.cap * sizeof(int32_t))
        newidx = <int32_t*>malloc(b4.cap * sizeof(int32_t))
        if not (b4.nodes and b6.nodes and order and newidx):
            raise MemoryError()
        b4.n = 0
        b6.n = 0
        _cidr_new(&b4, 0, 0, 0, -1)
        _cidr_new(&b6, 0, 0, 0, -1)

        for k in range(m):
            item = items[k]
            try:
                addr, plen_obj, rid_obj = item
            except (TypeError, ValueError):
                raise ValueError("CIDR entry %d: expected (packed, prefix_len, id)" % k) from None
            if not isinstance(addr, bytes):
                raise ValueError("CIDR entry %d: address must be bytes" % k)
            a = <const unsigned char*>PyBytes_AS_STRING(addr)
            alen = PyBytes_GET_SIZE(addr)
            plen_ll = plen_obj
            rid_ll = rid_obj
            if rid_ll < 0 or rid_ll > 0x7FFFFFFF:
                raise ValueError("CIDR entry %d: rule id %d out of range" % (k, rid_ll))
            if alen == 4:
                if plen_ll < 0 or plen_ll > 32:
                    raise ValueError("CIDR entry %d: IPv4 prefix /%d" % (k, plen_ll))
                b = &b4
                hi = (<uint64_t>_cidr_be32(a)) << 32
                lo = 0
                plen = <uint32_t>plen_ll
            elif alen == 16:
                if plen_ll < 0 or plen_ll > 128:
                    raise ValueError("CIDR entry %d: IPv6 prefix /%d" % (k, plen_ll))
                if plen_ll >= 96 and _cidr_is_v4mapped(a):
                    b = &b4
                    hi = (<uint64_t>_cidr_be32(a + 12)) << 32
                    lo = 0
                    plen = <uint32_t>(plen_ll - 96)
                else:
                    b = &b6
                    hi = _cidr_be64(a)
                    lo = _cidr_be64(a + 8)
                    plen = <uint32_t>plen_ll
            else:
                raise ValueError("CIDR entry %d: packed address of %d bytes" % (k, alen))
            hi &= _cidr_mask64(plen if plen < 64 else 64)
            lo &= _cidr_mask64(plen - 64 if plen > 64 else 0)
            _cidr_insert(b, hi, lo, plen, <int32_t>rid_ll)

        count = 0
        for i in range(b4.n):
            count += b4.nodes[i].value >= 0
        for i in range(b6.n):
            count += b6.nodes[i].value >= 0
        n4 = b4.n
        n6 = b6.n
        off6 = (_CIDR_HEADER + n4 * <Py_ssize_t>sizeof(CidrNode4) + 7) & ~(<Py_ssize_t>7)
        total = off6 + n6 * <Py_ssize_t>sizeof(CidrNode6)
        out = PyBytes_FromStringAndSize(NULL, total)
        o = PyBytes_AS_STRING(out)
        memset(o, 0, total)
        memcpy(o, b"CIDR", 4)
        (<uint32_t*>(o + 4))[0] = _CIDR_VERSION
        (<uint32_t*>(o + 8))[0] = <uint32_t>count
        (<uint32_t*>(o + 12))[0] = <uint32_t>n4
        (<uint32_t*>(o + 16))[0] = <uint32_t>n6

        # IPv4 section, renumbered in preorder for locality
        _cidr_preorder(&b4, order, newidx)
        t4 = <CidrNode4*>(o + _CIDR_HEADER)
        for i in range(n4):
            old = order[i]
            t4[i].key = <uint32_t>(b4.nodes[old].hi >> 32)
            t4[i].child[0] = newidx[b4.nodes[old].child[0]] if b4.nodes[old].child[0] >= 0 else -1
            t4[i].child[1] = newidx[b4.nodes[old].child[1]] if b4.nodes[old].child[1] >= 0 else -1
            t4[i].value = b4.nodes[old].value
            t4[i].plen = b4.nodes[old].plen
        _cidr_preorder(&b6, order, newidx)
        t6 = <CidrNode6*>(o + off6)
        for i in range(n6):
            old = order[i]
            t6[i] = b6.nodes[old]
            t6[i].child[0] = newidx[b6.nodes[old].child[0]] if b6.nodes[old].child[0] >= 0 else -1
            t6[i].child[1] = newidx[b6.nodes[old].child[1]] if b6.nodes[old].child[1] >= 0 else -1
        return out
    finally:
        free(b4.nodes)
        free(b6.nodes)
        free(order)
        free(newidx)


# ---------------------------------------------------------------- runtime

cdef class CidrTrie:
    """Longest-prefix matcher over a blob from cidr_build (used in place).

    CidrTrie(buf): buf is bytes or any read-only contiguous buffer (e.g. a
    memoryview slice of an mmap). The trie holds a buffer export for its
    lifetime; the export (Py_buffer.obj) is the only reference it keeps, so
    the garbage collector's tp_clear never drops an exporter while it is
    still exported. A buffer whose address is not 8-byte aligned is copied once.
    """
    cdef Py_buffer _view
    cdef bint _has_view
    cdef const CidrNode4* _t4
    cdef const CidrNode6* _t6
    cdef uint32_t _count

    def __cinit__(self, buf):
        self._has_view = False
        PyObject_GetBuffer(buf, &self._view, PyBUF_SIMPLE)
        self._has_view = True
        if (<uintptr_t>self._view.buf) & 7:
            # Node arrays must be aligned: fall back to an aligned private copy.
            copy = PyBytes_FromStringAndSize(<char*>self._view.buf, self._view.len)
            PyBuffer_Release(&self._view)
            self._has_view = False
            PyObject_GetBuffer(copy, &self._view, PyBUF_SIMPLE)
            self._has_view = True
        self._load(<const unsigned char*>self._view.buf, self._view.len)

    def __dealloc__(self):
        if self._has_view:
            PyBuffer_Release(&self._view)
            self._has_view = False

    cdef int _load(self, const unsigned char* p, Py_ssize_t size) except -1:
        cdef uint32_t version, count, n4, n6, valued, i, c, k
        cdef Py_ssize_t off6, total
        cdef const CidrNode4* t4
        cdef const CidrNode6* t6
        if size < _CIDR_HEADER:
            raise ValueError("CIDR blob truncated: %d bytes, header needs %d"
                             % (size, _CIDR_HEADER))
        if memcmp(p, b"CIDR", 4) != 0:
            raise ValueError("not a CIDR blob (bad tag)")
        version = (<const uint32_t*>(p + 4))[0]
        if version != _CIDR_VERSION:
            raise ValueError("CIDR blob version %d, expected %d" % (version, _CIDR_VERSION))
        count = (<const uint32_t*>(p + 8))[0]
        n4 = (<const uint32_t*>(p + 12))[0]
        n6 = (<const uint32_t*>(p + 16))[0]
        if (<const uint32_t*>(p + 20))[0] != 0:
            raise ValueError("corrupt CIDR blob: reserved field is not 0")
        if n4 < 1 or n6 < 1 or n4 > 0x7FFFFFFF or n6 > 0x7FFFFFFF:
            raise ValueError("corrupt CIDR blob: node counts %d/%d" % (n4, n6))
        off6 = (_CIDR_HEADER + <Py_ssize_t>n4 * <Py_ssize_t>sizeof(CidrNode4) + 7) & ~(<Py_ssize_t>7)
        total = off6 + <Py_ssize_t>n6 * <Py_ssize_t>sizeof(CidrNode6)
        if size < total:
            raise ValueError("CIDR blob truncated: %d bytes, sizes declare %d" % (size, total))
        t4 = <const CidrNode4*>(p + _CIDR_HEADER)
        t6 = <const CidrNode6*>(p + off6)
        valued = 0
        if t4[0].plen != 0 or t6[0].plen != 0:
            raise ValueError("corrupt CIDR blob: root is not /0")
        for i in range(n4):
            if t4[i].plen > 32 or t4[i].value < -1:
                raise ValueError("corrupt CIDR blob: IPv4 node %d" % i)
            valued += t4[i].value >= 0
            for k in range(2):
                c = <uint32_t>t4[i].child[k]
                if t4[i].child[k] == -1:
                    continue
                if t4[i].child[k] < 0 or c <= i or c >= n4 or t4[c].plen <= t4[i].plen:
                    raise ValueError("corrupt CIDR blob: IPv4 node %d child %d" % (i, k))
        for i in range(n6):
            if t6[i].plen > 128 or t6[i].value < -1:
                raise ValueError("corrupt CIDR blob: IPv6 node %d" % i)
            valued += t6[i].value >= 0
            for k in range(2):
                c = <uint32_t>t6[i].child[k]
                if t6[i].child[k] == -1:
                    continue
                if t6[i].child[k] < 0 or c <= i or c >= n6 or t6[c].plen <= t6[i].plen:
                    raise ValueError("corrupt CIDR blob: IPv6 node %d child %d" % (i, k))
        if valued != count:
            raise ValueError("corrupt CIDR blob: count %d, %d valued nodes" % (count, valued))
        self._t4 = t4
        self._t6 = t6
        self._count = count
        return 0

    cdef int32_t lookup_v4(self, uint32_t addr) noexcept nogil:
        """IPv4 address as a host-order integer -> rule id or -1."""
        return _cidr_lookup4(self._t4, addr)

    cdef int32_t lookup_v6(self, uint64_t hi, uint64_t lo) noexcept nogil:
        """IPv6 address as two host-order 64-bit halves -> rule id or -1."""
        return _cidr_lookup6(self._t6, hi, lo)

    cdef int32_t lookup_packed(self, const unsigned char* a, Py_ssize_t n) noexcept nogil:
        """Packed 4- or 16-byte address -> rule id; -1 also for other lengths."""
        if n == 4:
            return _cidr_lookup4(self._t4, _cidr_be32(a))
        if n == 16:
            if _cidr_is_v4mapped(a):
                return _cidr_lookup4(self._t4, _cidr_be32(a + 12))
            return _cidr_lookup6(self._t6, _cidr_be64(a), _cidr_be64(a + 8))
        return -1

    def lookup(self, bytes packed not None):
        """Rule id of the longest prefix containing `packed` (4 or 16 bytes), -1 if none."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(packed)
        if n != 4 and n != 16:
            raise ValueError("packed address must be 4 or 16 bytes, got %d" % n)
        return self.lookup_packed(<const unsigned char*>PyBytes_AS_STRING(packed), n)

    def lookup_text(self, str ip not None):
        """Rule id of the longest prefix containing the address literal `ip`
        (dotted IPv4, or IPv6 with an optional `%zone`, which is ignored),
        -1 if none matches or `ip` is not an address literal. Same answer as
        policy.pack_ip + lookup, parsed by the libc inet_pton that Python's
        socket.inet_pton calls, in one C call (the address of every
        connection goes through here). ValueError on an embedded NUL, as
        socket.inet_pton."""
        cdef Py_ssize_t n, i, end
        cdef const char* s = PyUnicode_AsUTF8AndSize(ip, &n)
        cdef char text[_CIDR_TEXT_MAX + 1]
        cdef unsigned char packed[16]
        cdef bint v6 = False
        end = n
        for i in range(n):
            if s[i] == b':':
                v6 = True
                break
        if v6:
            for i in range(n):
                if s[i] == b'%':          # zone index: not part of the address
                    end = i
                    break
        for i in range(end):
            if s[i] == 0:
                raise ValueError("embedded null character")
        if end > _CIDR_TEXT_MAX:          # longer than any address literal
            return -1
        memcpy(text, s, end)
        text[end] = 0
        if v6:
            if _cidr_inet_pton(_CIDR_AF_INET6, text, packed) != 1:
                return -1
            return self.lookup_packed(packed, 16)
        if _cidr_inet_pton(_CIDR_AF_INET, text, packed) != 1:
            return -1
        return self.lookup_packed(packed, 4)

    def __len__(self):
        return self._count
