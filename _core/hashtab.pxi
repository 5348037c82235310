# hashtab.pxi: open-addressing hash table over folded byte keys -> int32.
#
# Job: exact / @domain / .suffix / host lookups of a control file
# (docs/behaviour/control-files.md#which-match-wins stage 2 "exact entries", ASCII
# case-insensitive; docs/behaviour/control-files.md#case).
#
# Blob layout ("HTAB", version 1; little-endian, arrays 8-byte aligned):
#   0   char[4]  tag "HTAB"
#   4   u32      version
#   8   u32      nslots      power of two, >= 8
#   12  u32      nentries    number of distinct keys
#   16  u64      pool_size   bytes of the key pool
#   24  u64      reserved (0)
#   32  slot[nslots]         16 bytes each: u32 hash_hi, i32 value,
#                            u32 key_off (0xFFFFFFFF = empty), u32 key_len
#   ..  u8[pool_size]        folded keys, back to back
# Linear probing from (hash & (nslots-1)); load factor <= 1/2.
#
# Invariants
# - Keys are folded by the builder; lookup() expects an already folded query.
# - A duplicate key (after folding) keeps the value given LAST.
# - Values are non-negative int32; -1 means "absent".
# - Construction checks every slot's key range against the pool and the pool
#   against len(buf); probing is bounded by nslots, so a corrupt blob can give
#   wrong answers at worst, never an out-of-bounds read or an endless loop.

cdef extern from *:
    """
    #define MF_HT_HEADER 32
    #define MF_HT_SLOT 16
    #define MF_HT_EMPTY 0xFFFFFFFFu
    """
    const uint32_t _HT_HEADER "MF_HT_HEADER"
    const uint32_t _HT_SLOT "MF_HT_SLOT"
    const uint32_t _HT_EMPTY "MF_HT_EMPTY"

ctypedef struct _HtSlot:
    uint32_t hhi
    int32_t value
    uint32_t key_off
    uint32_t key_len

ctypedef struct _HtView:
    const _HtSlot* slots
    const unsigned char* pool
    uint32_t mask
    uint32_t nslots
    uint32_t nentries


cdef int _ht_view_init(_HtView* v, const unsigned char* p, Py_ssize_t n) except -1:
    """Validate an HTAB blob at p[0:n] and fill *v (pointers into p)."""
    _mf_check_header(p, n, b"HTAB", 1, _HT_HEADER, "HashTable")
    cdef uint32_t nslots = _mf_rd32(p + 8)
    cdef uint32_t nentries = _mf_rd32(p + 12)
    cdef uint64_t pool_size = _mf_rd64(p + 16)
    if nslots < 8 or (nslots & (nslots - 1)) != 0:
        raise ValueError(f"HashTable: slot count {nslots} is not a power of two >= 8")
    if nentries >= nslots:
        raise ValueError(f"HashTable: {nentries} entries do not fit {nslots} slots")
    cdef uint64_t need = _HT_HEADER + <uint64_t>nslots * _HT_SLOT + _mf_align8(pool_size)
    if pool_size > <uint64_t>n or need > <uint64_t>n:
        raise ValueError(f"HashTable: blob truncated: {n} bytes, sizes declare {need}")
    cdef const _HtSlot* slots = <const _HtSlot*>(p + _HT_HEADER)
    cdef uint32_t i, used = 0
    for i in range(nslots):
        if slots[i].key_off == _HT_EMPTY:
            continue
        used += 1
        if <uint64_t>slots[i].key_off + slots[i].key_len > pool_size:
            raise ValueError(f"HashTable: slot {i} key range outside the key pool")
        if slots[i].value < 0:
            raise ValueError(f"HashTable: slot {i} has a negative value")
    if used != nentries:
        raise ValueError(f"HashTable: header says {nentries} entries, slots hold {used}")
    v.slots = slots
    v.pool = p + _HT_HEADER + <uint64_t>nslots * _HT_SLOT
    v.mask = nslots - 1
    v.nslots = nslots
    v.nentries = nentries
    return 0


cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define MF_PREFETCH(p) __builtin_prefetch((const void*)(p), 0, 1)
    #else
    #define MF_PREFETCH(p) ((void)(p))
    #endif
    """
    void _mf_prefetch "MF_PREFETCH"(const void* p) noexcept nogil


cdef inline uint64_t _ht_prefetch(const _HtView* v, const unsigned char* key,
                                  Py_ssize_t n) noexcept nogil:
    """Hash of the folded key[0:n], for _ht_lookup_hashed; also starts
    loading the key's first slot, so that several lookups (or other work)
    overlap their cache misses instead of waiting for each in turn."""
    cdef uint64_t h = hash_bytes(key, n)
    _mf_prefetch(&v.slots[<uint32_t>h & v.mask])
    return h


cdef inline int32_t _ht_lookup_hashed(const _HtView* v, const unsigned char* key,
                                      Py_ssize_t n, uint64_t h) noexcept nogil:
    """_ht_lookup with h = hash_bytes(key, n) already computed."""
    cdef uint32_t hhi = <uint32_t>(h >> 32)
    cdef uint32_t i = <uint32_t>h & v.mask
    cdef uint32_t probes
    cdef const _HtSlot* s
    for probes in range(v.nslots):
        s = &v.slots[i]
        if s.key_off == _HT_EMPTY:
            return -1
        if s.hhi == hhi and s.key_len == n and memcmp(v.pool + s.key_off, key, n) == 0:
            return s.value
        i = (i + 1) & v.mask
    return -1


cdef inline int32_t _ht_lookup(const _HtView* v, const unsigned char* key,
                               Py_ssize_t n) noexcept nogil:
    """Value of the folded key[0:n], -1 if absent. Allocation-free."""
    return _ht_lookup_hashed(v, key, n, hash_bytes(key, n))


def hashtab_build(keys, values):
    """Build an HTAB blob from parallel lists `keys` (bytes) and `values` (int).

    Keys are ASCII-folded; a duplicate key keeps the value given last. Values
    must be non-negative int32. Returns one flat `bytes` blob.
    """
    if len(keys) != len(values):
        raise ValueError("hashtab_build: keys and values differ in length")
    cdef dict table = {}
    cdef long long val
    for k, value in zip(keys, values):
        if not isinstance(k, bytes):
            raise TypeError(f"hashtab_build: keys must be bytes, got {type(k).__name__}")
        val = value
        if val < 0 or val > INT32_MAX:
            raise ValueError(f"hashtab_build: value {value} is not a non-negative int32")
        fk = fold_bytes(k)
        table.pop(fk, None)          # last wins; keep insertion order of the winner
        table[fk] = val
    cdef uint64_t nentries = len(table)
    cdef uint64_t nslots = 8
    while nslots < 2 * nentries:
        nslots <<= 1
    if nslots > 0x80000000:
        raise ValueError("hashtab_build: too many keys")
    cdef uint64_t pool_size = 0
    for fk in table:
        pool_size += PyBytes_GET_SIZE(fk)
    if pool_size >= _HT_EMPTY:
        raise ValueError("hashtab_build: key pool exceeds 4 GiB")
    cdef uint64_t total = _HT_HEADER + nslots * _HT_SLOT + _mf_align8(pool_size)
    blob = _mf_new_blob(total)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(blob)
    memcpy(p, b"HTAB", 4)
    _mf_wr32(p + 4, 1)
    _mf_wr32(p + 8, <uint32_t>nslots)
    _mf_wr32(p + 12, <uint32_t>nentries)
    _mf_wr64(p + 16, pool_size)
    cdef _HtSlot* slots = <_HtSlot*>(p + _HT_HEADER)
    cdef unsigned char* pool = p + _HT_HEADER + nslots * _HT_SLOT
    cdef uint32_t mask = <uint32_t>(nslots - 1)
    cdef uint64_t i, h, off = 0
    cdef uint32_t j
    cdef Py_ssize_t kn
    cdef const unsigned char* kp
    for i in range(nslots):
        slots[i].key_off = _HT_EMPTY
    for fk, val in table.items():
        kp = <const unsigned char*>PyBytes_AS_STRING(fk)
        kn = PyBytes_GET_SIZE(fk)
        h = hash_bytes(kp, kn)
        j = <uint32_t>h & mask
        while slots[j].key_off != _HT_EMPTY:
            j = (j + 1) & mask
        slots[j].hhi = <uint32_t>(h >> 32)
        slots[j].value = <int32_t>val
        slots[j].key_off = <uint32_t>off
        slots[j].key_len = <uint32_t>kn
        memcpy(pool + off, kp, kn)
        off += kn
    return blob


cdef class HashTable:
    """Read-only view of an HTAB blob (bytes or a memoryview over an mmap).

    get(key) folds the key and returns its int value, -1 if absent.
    """
    cdef _MfBlob _blob
    cdef _HtView v

    def __cinit__(self, buf):
        self._blob = _MfBlob(buf)
        _ht_view_init(&self.v, self._blob.p, self._blob.n)

    cdef int32_t lookup(self, const unsigned char* folded, Py_ssize_t n) noexcept:
        """C-level lookup of an already folded key; -1 if absent."""
        return _ht_lookup(&self.v, folded, n)

    def get(self, bytes key not None):
        """Value stored for `key` (ASCII case-insensitive), -1 if absent."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(key)
        cdef unsigned char stackbuf[256]
        cdef unsigned char* buf = stackbuf
        stackbuf[0] = 0
        cdef int32_t r
        if n > 256:
            buf = <unsigned char*>malloc(n)
            if buf == NULL:
                raise MemoryError()
        fold_into(buf, <const unsigned char*>PyBytes_AS_STRING(key), n)
        r = _ht_lookup(&self.v, buf, n)
        if buf != stackbuf:
            free(buf)
        return r

    def __len__(self):
        """Number of distinct keys."""
        return self.v.nentries
