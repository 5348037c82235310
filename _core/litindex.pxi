# litindex.pxi: which of many fixed literals occur in a short text, by
# independent probes (docs/architecture.md#the-rule-compiler).
#
# Job: ListMatcher's candidate step: the SET of ids whose literal occurs in
# the (folded) text, the answer an Aho-Corasick automaton over the same
# literals gives (aho.pxi), in an order the memory system likes. An
# automaton walk is one dependent chain of state loads: on a large list
# (hundreds of thousands of states, megabytes) every deep state is a cache
# miss the CPU cannot start before the previous one ends. Here every text
# position is probed on its own, so the probes overlap:
#   - each literal of at least 8 bytes is indexed by ONE of its 8-byte
#     windows ("gram"), the one fewest other literals share (fewer false
#     candidates), with its offset in the literal;
#   - a filter bitmap (about 16 bits per indexed literal, two bits set per
#     gram: a Bloom filter, about 1.4 % false positives, small enough to
#     stay in cache) answers "no indexed gram here" for nearly every text
#     position; only positions it passes look in the bucketed records, and a
#     record reports its id only after the whole literal compared equal at
#     the place the window implies (exact, not a superset);
#   - literals shorter than 8 bytes (few in practice: relay-probe wildmats
#     like `*%*`) go to a small Aho-Corasick automaton embedded here.
# A literal occurring in the text contains its indexed window, and the scan
# probes every 8-byte window of the text, so every occurrence is found.
#
# Blob layout ("LIDX", version 1; little-endian, sections 8-byte aligned):
#   0  char[4] tag "LIDX"          4  u32 version
#   8  u32 nrec                    12 u32 bucket_bits (1..31)
#   16 u32 filter_bits (6..34)     20 u32 reserved (0)
#   24 u64 filter_off   32 u64 bucket_off   40 u64 rec_off
#   48 u64 pool_off     56 u64 pool_len     64 u64 aho_off   72 u64 aho_len
#   80 u64 total_size
#   filter   u64[2^filter_bits / 64]: bits (h >> (64 - filter_bits)) and
#            (h2 >> (64 - filter_bits)) set for each record, h = gram *
#            _LI_MULT, h2 = (h ^ (h >> 29)) * _LI_MULT2 (mod 2^64)
#   buckets  u32[2^bucket_bits + 1]: records of bucket b (h >> (64 -
#            bucket_bits)) are rec[buckets[b] .. buckets[b+1])
#   rec[nrec], 24 bytes: u64 gram (the window's 8 bytes, little-endian),
#            i32 id, u32 win (window offset in the literal), u32 lit_off,
#            u32 lit_len (into the pool)
#   pool     folded literals
#   aho      an AHOC blob (aho.pxi) of the literals shorter than 8 bytes
#
# Invariants checked at construction: every section inside the blob; bucket
# starts non-decreasing from 0 to nrec; each record's literal inside the
# pool, at least 8 bytes, its window inside it; ids >= 0. The scan checks a
# literal's placement against the text before comparing, so a corrupt blob
# can give wrong answers at worst, never an out-of-bounds read.

cdef extern from *:
    """
    #define MF_LI_HEADER 88
    #define MF_LI_GRAM 8
    #define MF_LI_MULT 0x9E3779B97F4A7C15ULL
    #define MF_LI_MULT2 0xBF58476D1CE4E5B9ULL
    """
    const uint32_t _LI_HEADER "MF_LI_HEADER"
    enum: _LI_GRAM "MF_LI_GRAM"
    const uint64_t _LI_MULT "MF_LI_MULT"
    const uint64_t _LI_MULT2 "MF_LI_MULT2"

ctypedef struct _LiRec:
    uint64_t gram
    int32_t id
    uint32_t win
    uint32_t lit_off
    uint32_t lit_len

ctypedef struct _LiView:
    const uint64_t* filter
    const uint32_t* buckets
    const _LiRec* recs
    const unsigned char* pool
    uint32_t nrec
    int fshift              # 64 - filter_bits
    int bshift              # 64 - bucket_bits
    _AhoView aho            # the short literals
    bint has_short          # aho has a pattern (more than the root state)


cdef inline uint64_t _li_h2(uint64_t h) noexcept nogil:
    """The filter's second bit position (from the top bits of the result)."""
    return (h ^ (h >> 29)) * _LI_MULT2


cdef inline uint32_t _li_bits(uint64_t n) noexcept nogil:
    """ceil(log2(n)), at least 1."""
    cdef uint32_t b = 1
    while (<uint64_t>1 << b) < n:
        b += 1
    return b


def litindex_build(literals, ids):
    """An LIDX blob for literals[i] (bytes, non-empty; folded here) with
    ids[i] (non-negative int32). The same literal may come with several ids;
    scanning reports each id whose literal occurs."""
    cdef Py_ssize_t n = len(literals), i, j, m
    if len(ids) != n:
        raise ValueError("litindex_build: literals and ids differ in length")
    longs = []          # (folded literal, id)
    short_lits = []
    short_ids = []
    cdef long long idv
    for i in range(n):
        lit = literals[i]
        if not isinstance(lit, bytes) or not lit:
            raise ValueError("litindex_build: literals must be non-empty bytes")
        idv = ids[i]
        if idv < 0 or idv > INT32_MAX:
            raise ValueError(f"litindex_build: id {idv} is not a non-negative int32")
        fl = fold_bytes(lit)
        if len(fl) >= _LI_GRAM:
            longs.append((fl, idv))
        else:
            short_lits.append(fl)
            short_ids.append(idv)
    # how many distinct literals contain each gram: a literal is indexed by
    # its rarest window (ties: the first), so buckets stay short
    seen = {}
    for fl, _ in longs:
        for w in {fl[j:j + _LI_GRAM] for j in range(len(fl) - _LI_GRAM + 1)}:
            seen[w] = seen.get(w, 0) + 1
    pool_index = {}
    pool_parts = []
    cdef uint64_t pool_len = 0
    recs = []           # (bucket, gram, id, win, lit_off, lit_len)
    cdef uint32_t nrec = len(longs)
    cdef uint32_t bucket_bits = _li_bits(nrec)
    cdef uint32_t filter_bits = max(6, min(34, bucket_bits + 4))
    cdef uint64_t h, gram
    for fl, idv in longs:
        m = len(fl) - _LI_GRAM + 1
        best = 0
        for j in range(1, m):
            if seen[fl[j:j + _LI_GRAM]] < seen[fl[best:best + _LI_GRAM]]:
                best = j
        off = pool_index.get(fl)
        if off is None:
            off = pool_index[fl] = pool_len
            pool_parts.append(fl)
            pool_len += len(fl)
        gram = int.from_bytes(fl[best:best + _LI_GRAM], "little")
        h = gram * _LI_MULT
        recs.append((h >> (64 - bucket_bits), gram, idv, best, off, len(fl)))
    if pool_len >= 0xFFFFFFFF:
        raise ValueError("litindex_build: literals exceed 4 GiB")
    recs.sort()
    aho = aho_build(short_lits, short_ids, True)
    cdef uint64_t nfilter = (<uint64_t>1 << filter_bits) // 64
    cdef uint64_t nbuckets = <uint64_t>1 << bucket_bits
    cdef uint64_t off8 = _LI_HEADER
    cdef uint64_t filter_off = off8
    off8 = _mf_align8(off8 + nfilter * 8)
    cdef uint64_t bucket_off = off8
    off8 = _mf_align8(off8 + (nbuckets + 1) * 4)
    cdef uint64_t rec_off = off8
    off8 = _mf_align8(off8 + <uint64_t>nrec * sizeof(_LiRec))
    cdef uint64_t pool_off = off8
    off8 = _mf_align8(off8 + pool_len)
    cdef uint64_t aho_off = off8
    off8 = _mf_align8(off8 + len(aho))
    blob = _mf_new_blob(off8)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(blob)
    memcpy(p, b"LIDX", 4)
    _mf_wr32(p + 4, 1)
    _mf_wr32(p + 8, nrec)
    _mf_wr32(p + 12, bucket_bits)
    _mf_wr32(p + 16, filter_bits)
    _mf_wr64(p + 24, filter_off)
    _mf_wr64(p + 32, bucket_off)
    _mf_wr64(p + 40, rec_off)
    _mf_wr64(p + 48, pool_off)
    _mf_wr64(p + 56, pool_len)
    _mf_wr64(p + 64, aho_off)
    _mf_wr64(p + 72, len(aho))
    _mf_wr64(p + 80, off8)
    cdef uint64_t* filt = <uint64_t*>(p + filter_off)
    cdef uint32_t* buckets = <uint32_t*>(p + bucket_off)
    cdef _LiRec* rec = <_LiRec*>(p + rec_off)
    cdef uint64_t b = 0, fi
    cdef uint32_t r = 0
    for r in range(nrec):
        bk, gram, idv, win, off, ln = recs[r]
        while b <= <uint64_t>bk:        # buckets up to this one start here or earlier
            buckets[b] = r
            b += 1
        rec[r].gram = gram
        rec[r].id = <int32_t>idv
        rec[r].win = <uint32_t>win
        rec[r].lit_off = <uint32_t>off
        rec[r].lit_len = <uint32_t>ln
        h = gram * _LI_MULT
        fi = h >> (64 - filter_bits)
        filt[fi >> 6] |= <uint64_t>1 << (fi & 63)
        fi = _li_h2(h) >> (64 - filter_bits)
        filt[fi >> 6] |= <uint64_t>1 << (fi & 63)
    while b <= nbuckets:
        buckets[b] = nrec
        b += 1
    cdef uint64_t pos = pool_off
    for part in pool_parts:
        memcpy(p + pos, PyBytes_AS_STRING(part), len(part))
        pos += len(part)
    memcpy(p + aho_off, PyBytes_AS_STRING(aho), len(aho))
    return blob


cdef int _li_view_init(_LiView* v, const unsigned char* p, Py_ssize_t n) except -1:
    """Validate an LIDX blob at p[0:n] and fill *v (pointers into p)."""
    _mf_check_header(p, n, b"LIDX", 1, _LI_HEADER, "LiteralIndex")
    cdef uint32_t nrec = _mf_rd32(p + 8)
    cdef uint32_t bucket_bits = _mf_rd32(p + 12)
    cdef uint32_t filter_bits = _mf_rd32(p + 16)
    if bucket_bits < 1 or bucket_bits > 31 or filter_bits < 6 or filter_bits > 34:
        raise ValueError("LiteralIndex: bad bucket or filter size")
    cdef uint64_t nbuckets = <uint64_t>1 << bucket_bits
    cdef uint64_t pool_len = _mf_rd64(p + 56)
    cdef uint64_t[5] offs
    cdef uint64_t[5] lens
    offs[0] = _mf_rd64(p + 24); lens[0] = ((<uint64_t>1 << filter_bits) // 64) * 8
    offs[1] = _mf_rd64(p + 32); lens[1] = (nbuckets + 1) * 4
    offs[2] = _mf_rd64(p + 40); lens[2] = <uint64_t>nrec * sizeof(_LiRec)
    offs[3] = _mf_rd64(p + 48); lens[3] = pool_len
    offs[4] = _mf_rd64(p + 64); lens[4] = _mf_rd64(p + 72)
    cdef int k
    for k in range(5):
        if (offs[k] & 7 or offs[k] < _LI_HEADER or offs[k] > <uint64_t>n
                or lens[k] > <uint64_t>n - offs[k]):
            raise ValueError(f"LiteralIndex: section {k} outside the blob")
    v.filter = <const uint64_t*>(p + offs[0])
    v.buckets = <const uint32_t*>(p + offs[1])
    v.recs = <const _LiRec*>(p + offs[2])
    v.pool = p + offs[3]
    v.nrec = nrec
    v.fshift = 64 - filter_bits
    v.bshift = 64 - bucket_bits
    cdef uint64_t b
    if v.buckets[0] != 0 or v.buckets[nbuckets] != nrec:
        raise ValueError("LiteralIndex: bad bucket starts")
    for b in range(nbuckets):
        if v.buckets[b + 1] < v.buckets[b]:
            raise ValueError("LiteralIndex: bucket starts not monotonic")
    cdef uint32_t r
    cdef const _LiRec* rec
    for r in range(nrec):
        rec = &v.recs[r]
        if (rec.id < 0 or rec.lit_len < _LI_GRAM or <uint64_t>rec.win + _LI_GRAM > rec.lit_len
                or <uint64_t>rec.lit_off + rec.lit_len > pool_len):
            raise ValueError(f"LiteralIndex: bad record {r}")
    _aho_view_init(&v.aho, p + offs[4], <Py_ssize_t>lens[4])
    v.has_short = v.aho.nstates > 1
    return 0


cdef int _li_scan_into(const _LiView* v, const unsigned char* t, Py_ssize_t n,
                       _IdBuf* out) noexcept nogil:
    """Push the id of every literal occurring in the folded t[0:n] (repeats
    possible) into out; -1 on OOM."""
    cdef Py_ssize_t pos, s
    cdef uint64_t g, h, fi
    cdef uint32_t r, e
    cdef const _LiRec* rec
    if v.has_short and _aho_scan_into(&v.aho, t, n, out) < 0:
        return -1
    if v.nrec == 0:
        return 0
    for pos in range(n - _LI_GRAM + 1):
        g = _mf_le64(t + pos)
        h = g * _LI_MULT
        fi = h >> v.fshift
        if not (v.filter[fi >> 6] >> (fi & 63)) & 1:
            continue
        fi = _li_h2(h) >> v.fshift
        if not (v.filter[fi >> 6] >> (fi & 63)) & 1:
            continue
        r = v.buckets[h >> v.bshift]
        e = v.buckets[(h >> v.bshift) + 1]
        while r < e:
            rec = &v.recs[r]
            r += 1
            if rec.gram != g or <uint64_t>pos < rec.win:
                continue
            s = pos - rec.win
            if <uint64_t>s + rec.lit_len > <uint64_t>n:
                continue
            if memcmp(t + s, v.pool + rec.lit_off, rec.lit_len) == 0:
                if _idbuf_push(out, rec.id) < 0:
                    return -1
    return 0


cdef class LiteralIndex:
    """Standalone view of an LIDX blob (tests, benches): find_all(text) is
    the sorted distinct ids whose literal occurs in `text` (folded first)."""
    cdef _MfBlob _blob
    cdef _LiView v

    def __cinit__(self, buf):
        self._blob = _MfBlob(buf)
        _li_view_init(&self.v, self._blob.p, self._blob.n)

    def find_all(self, bytes text not None):
        cdef Py_ssize_t n = PyBytes_GET_SIZE(text)
        cdef int32_t stack[64]
        cdef _IdBuf b
        cdef unsigned char* t = <unsigned char*>malloc(n + 1)
        if t == NULL:
            raise MemoryError()
        _idbuf_init(&b, stack, 64)
        try:
            fold_into(t, <const unsigned char*>PyBytes_AS_STRING(text), n)
            if _li_scan_into(&self.v, t, n, &b) < 0:
                raise MemoryError()
            b.n = _sort_unique_i32(b.data, b.n)
            return [b.data[i] for i in range(b.n)]
        finally:
            _idbuf_free(&b)
            free(t)

    def counts(self):
        """Literals indexed by a window, states of the short-literal automaton."""
        return {"indexed": self.v.nrec, "short_states": self.v.aho.nstates}
