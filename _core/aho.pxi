# aho.pxi: compact Aho-Corasick automaton over bytes -> int32 pattern ids.
#
# Job: find which of many fixed literals occur in a short text, in one pass,
# with cost independent of the number of patterns (docs/architecture.md#the-rule-compiler).
#
# Representation (memory-compact, 16 bytes per state plus 8 per output):
# states are numbered in BFS order, root = 0. In BFS order the children of a
# state are a contiguous, label-sorted range of state ids, so an edge needs no
# target field: state s's children are ids [child_base[s], child_base[s+1])
# and the byte on the edge into child t is stored in t's own record (top 8
# bits of fail_label), so scanning a child range touches the records the
# next step needs anyway. A child is found by linear scan (<= 8 children) or
# binary search. States are limited to 2^24 - 1 (24-bit failure links). The root has a dense 256-entry
# goto table (0 = stay at root). Each state has a failure link and a
# dictionary-suffix link (nearest state on its failure chain with outputs of
# its own), so reporting walks only states that do output.
#
# Blob layout ("AHOC", version 1; little-endian, arrays 8-byte aligned):
#   0     char[4] tag "AHOC"       4  u32 version
#   8     u32 nstates S            12 u32 nout
#   16    u32 flags (bit 0: fold)  20 u32 npatterns (informational)
#   24    u64 reserved (0)
#   32    u32 root[256]
#   1056  state[S+1], 16 bytes: u32 child_base, u32 fail_label (bits 0-23
#         failure link, bits 24-31 byte on the edge into the state), u32
#         out_start, u32 dict_link (entry S is a sentinel: child_base = S,
#         out_start = nout)
#   ..    out[nout], 8 bytes: i32 id, u32 pattern length; sorted by id per state
#
# Invariants checked at construction (so a corrupt blob can never make the
# scanner read out of bounds or loop forever): sizes fit len(buf);
# child_base is non-decreasing from 1 to S; edge labels strictly increase inside
# each child range; fail[s] < s and dict_link[s] < s for s >= 1 (BFS order:
# both point to shallower states, so every chain terminates); out_start is
# non-decreasing and ends at nout; root entries < S; ids >= 0, lengths >= 1.

cdef extern from *:
    """
    #define MF_AHO_HEADER 32
    #define MF_AHO_STATES_OFF (32 + 256 * 4)
    #define MF_AHO_MAX_STATES 0x00FFFFFFu
    """
    const uint32_t _AHO_HEADER "MF_AHO_HEADER"
    const uint32_t _AHO_STATES_OFF "MF_AHO_STATES_OFF"
    const uint32_t _AHO_MAX_STATES "MF_AHO_MAX_STATES"

ctypedef struct _AhoState:
    uint32_t child_base
    uint32_t fail_label
    uint32_t out_start
    uint32_t dict_link

cdef inline uint32_t _aho_fail(const _AhoState* s) noexcept nogil:
    return s.fail_label & 0x00FFFFFF


cdef inline uint8_t _aho_label(const _AhoState* s) noexcept nogil:
    return <uint8_t>(s.fail_label >> 24)


ctypedef struct _AhoOut:
    int32_t id
    uint32_t length

ctypedef struct _AhoView:
    const uint32_t* root
    const _AhoState* st
    const _AhoOut* outs
    uint32_t nstates
    uint32_t nout
    uint32_t npatterns
    bint fold


# ---------------------------------------------------------------------------
# Growable id buffer: starts on the caller's stack, moves to the heap only when
# it holds more distinct ids than half its capacity (it compacts first).

ctypedef struct _IdBuf:
    int32_t* data
    Py_ssize_t n
    Py_ssize_t cap
    int32_t* stack


cdef int _cmp_i32(const void* a, const void* b) noexcept nogil:
    cdef int32_t x = (<const int32_t*>a)[0]
    cdef int32_t y = (<const int32_t*>b)[0]
    return (x > y) - (x < y)


cdef inline void _sort_i32(int32_t* a, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, j
    cdef int32_t x
    if n <= 16:
        for i in range(1, n):
            x = a[i]
            j = i - 1
            while j >= 0 and a[j] > x:
                a[j + 1] = a[j]
                j -= 1
            a[j + 1] = x
    else:
        qsort(a, n, sizeof(int32_t), _cmp_i32)


cdef inline Py_ssize_t _sort_unique_i32(int32_t* a, Py_ssize_t n) noexcept nogil:
    """Sort a[0:n] ascending, drop duplicates, return the new length."""
    cdef Py_ssize_t i, m
    if n <= 1:
        return n
    _sort_i32(a, n)
    m = 1
    for i in range(1, n):
        if a[i] != a[m - 1]:
            a[m] = a[i]
            m += 1
    return m


cdef inline void _idbuf_init(_IdBuf* b, int32_t* stack, Py_ssize_t cap) noexcept nogil:
    b.data = stack
    b.stack = stack
    b.n = 0
    b.cap = cap


cdef inline void _idbuf_free(_IdBuf* b) noexcept nogil:
    if b.data != b.stack:
        free(b.data)
    b.data = b.stack


cdef int _idbuf_make_room(_IdBuf* b) noexcept nogil:
    """Called when full: compact, and grow if still more than half full."""
    cdef int32_t* nd
    b.n = _sort_unique_i32(b.data, b.n)
    if b.n * 2 <= b.cap:
        return 0
    if b.data == b.stack:
        nd = <int32_t*>malloc(b.cap * 2 * sizeof(int32_t))
        if nd == NULL:
            return -1
        memcpy(nd, b.data, b.n * sizeof(int32_t))
    else:
        nd = <int32_t*>realloc(b.data, b.cap * 2 * sizeof(int32_t))
        if nd == NULL:
            return -1
    b.data = nd
    b.cap *= 2
    return 0


cdef inline int _idbuf_push(_IdBuf* b, int32_t x) noexcept nogil:
    if b.n == b.cap:
        if _idbuf_make_room(b) < 0:
            return -1
    b.data[b.n] = x
    b.n += 1
    return 0


# ---------------------------------------------------------------------------
# Scanning primitives (allocation-free).

cdef inline uint32_t _aho_child(const _AhoView* v, uint32_t s, uint8_t c) noexcept nogil:
    """Child of non-root state s on byte c, 0 if none."""
    cdef uint32_t lo = v.st[s].child_base
    cdef uint32_t hi = v.st[s + 1].child_base
    cdef uint32_t mid
    cdef uint8_t l
    if hi - lo <= 8:
        while lo < hi:
            l = _aho_label(&v.st[lo])
            if l == c:
                return lo
            if l > c:
                return 0
            lo += 1
        return 0
    while lo < hi:
        mid = lo + ((hi - lo) >> 1)
        l = _aho_label(&v.st[mid])
        if l == c:
            return mid
        if l < c:
            lo = mid + 1
        else:
            hi = mid
    return 0


cdef inline uint32_t _aho_next(const _AhoView* v, uint32_t s, uint8_t c) noexcept nogil:
    """Automaton transition: follow failure links until an edge on c exists."""
    cdef uint32_t t
    while s != 0:
        t = _aho_child(v, s, c)
        if t != 0:
            return t
        s = _aho_fail(&v.st[s])
    return v.root[c]


cdef inline uint32_t _aho_first_output(const _AhoView* v, uint32_t s) noexcept nogil:
    """s itself if it has outputs, else its dictionary-suffix link (0 = none)."""
    if v.st[s + 1].out_start != v.st[s].out_start:
        return s
    return v.st[s].dict_link


cdef int _aho_scan_into(const _AhoView* v, const unsigned char* text, Py_ssize_t n,
                        _IdBuf* out) noexcept nogil:
    """Push the id of every occurrence (with repeats) into out; -1 on OOM."""
    cdef uint32_t s = 0, o, k, e
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(n):
        c = text[i]
        if v.fold:
            c = fold(c)
        s = _aho_next(v, s, c)
        o = _aho_first_output(v, s)
        while o != 0:
            e = v.st[o + 1].out_start
            for k in range(v.st[o].out_start, e):
                if _idbuf_push(out, v.outs[k].id) < 0:
                    return -1
            o = v.st[o].dict_link
    return 0


cdef int _aho_view_init(_AhoView* v, const unsigned char* p, Py_ssize_t n) except -1:
    """Validate an AHOC blob at p[0:n] and fill *v (pointers into p)."""
    _mf_check_header(p, n, b"AHOC", 1, _AHO_STATES_OFF, "AhoCorasick")
    cdef uint32_t S = _mf_rd32(p + 8)
    cdef uint32_t nout = _mf_rd32(p + 12)
    cdef uint32_t flags = _mf_rd32(p + 16)
    if S < 1 or S > _AHO_MAX_STATES:
        raise ValueError(f"AhoCorasick: bad state count {S}")
    if flags > 1:
        raise ValueError(f"AhoCorasick: unknown flags {flags:#x}")
    cdef uint64_t outs_off = _AHO_STATES_OFF + (<uint64_t>S + 1) * sizeof(_AhoState)
    cdef uint64_t need = outs_off + <uint64_t>nout * sizeof(_AhoOut)
    if need > <uint64_t>n:
        raise ValueError(f"AhoCorasick: blob truncated: {n} bytes, sizes declare {need}")
    cdef const uint32_t* root = <const uint32_t*>(p + _AHO_HEADER)
    cdef const _AhoState* st = <const _AhoState*>(p + _AHO_STATES_OFF)
    cdef const _AhoOut* outs = <const _AhoOut*>(p + outs_off)
    cdef uint32_t s, t, c
    for c in range(256):
        if root[c] >= S:
            raise ValueError("AhoCorasick: root table points outside the automaton")
    if st[0].child_base != 1 or st[S].child_base != S:
        raise ValueError("AhoCorasick: bad child ranges")
    if st[0].fail_label != 0 or st[0].dict_link != 0 or st[0].out_start != 0 or st[S].out_start != nout:
        raise ValueError("AhoCorasick: bad root or sentinel state")
    for s in range(S):
        if st[s + 1].child_base < st[s].child_base:
            raise ValueError(f"AhoCorasick: child ranges not monotonic at state {s}")
        if st[s + 1].out_start < st[s].out_start:
            raise ValueError(f"AhoCorasick: output ranges not monotonic at state {s}")
        if s != 0 and (_aho_fail(&st[s]) >= s or st[s].dict_link >= s):
            raise ValueError(f"AhoCorasick: failure/dictionary link of state {s} not to a shallower state")
        for t in range(st[s].child_base + 1, st[s + 1].child_base):
            if _aho_label(&st[t]) <= _aho_label(&st[t - 1]):
                raise ValueError(f"AhoCorasick: edge labels of state {s} not sorted")
    for t in range(nout):
        if outs[t].id < 0 or outs[t].length < 1:
            raise ValueError(f"AhoCorasick: bad output entry {t}")
    v.root = root
    v.st = st
    v.outs = outs
    v.nstates = S
    v.nout = nout
    v.npatterns = _mf_rd32(p + 20)
    v.fold = flags & 1
    return 0


# ---------------------------------------------------------------------------
# Builder.

def aho_build(patterns, ids, bint fold):
    """Build an AHOC blob from parallel lists `patterns` (non-empty bytes) and
    `ids` (non-negative int32). Several patterns may share an id; a pattern may
    be given twice with different ids (both are reported). With fold=True the
    patterns are ASCII-folded here and texts are folded while scanning.
    """
    cdef Py_ssize_t npat = len(patterns)
    if len(ids) != npat:
        raise ValueError("aho_build: patterns and ids differ in length")
    if npat >= 0x7FFFFFFF:
        raise ValueError("aho_build: too many patterns")
    cdef list pats = []
    cdef long long idval
    cdef uint64_t total_chars = 0
    cdef Py_ssize_t maxlen = 0, plen
    cdef int32_t* idv = <int32_t*>malloc((npat + 1) * sizeof(int32_t))
    if idv == NULL:
        raise MemoryError()
    try:
        for i in range(npat):
            pb = patterns[i]
            if not isinstance(pb, bytes):
                raise TypeError(f"aho_build: patterns must be bytes, got {type(pb).__name__}")
            plen = PyBytes_GET_SIZE(pb)
            if plen == 0:
                raise ValueError(f"aho_build: empty pattern at index {i}")
            idval = ids[i]
            if idval < 0 or idval > INT32_MAX:
                raise ValueError(f"aho_build: id {ids[i]} is not a non-negative int32")
            idv[i] = <int32_t>idval
            pats.append(fold_bytes(pb) if fold else pb)
            total_chars += plen
            if plen > maxlen:
                maxlen = plen
        if total_chars + 1 > 0xFFFFFFF0:
            raise ValueError("aho_build: patterns too large")
        order = sorted(range(npat), key=pats.__getitem__)
        return _aho_build_sorted(pats, order, idv, npat, <uint32_t>(total_chars + 1),
                                 maxlen, fold)
    finally:
        free(idv)


cdef bytes _aho_build_sorted(list pats, list order, const int32_t* idv, Py_ssize_t npat,
                             uint32_t max_states, Py_ssize_t maxlen, bint fold):
    # Phase 1: trie from sorted patterns (shared prefix with the previous
    # pattern is reused; children are therefore created in label order).
    cdef uint32_t* par = <uint32_t*>malloc(max_states * sizeof(uint32_t))
    cdef uint32_t* first_child = <uint32_t*>malloc(max_states * sizeof(uint32_t))
    cdef uint32_t* last_child = <uint32_t*>malloc(max_states * sizeof(uint32_t))
    cdef uint32_t* next_sib = <uint32_t*>malloc(max_states * sizeof(uint32_t))
    cdef uint8_t* lab = <uint8_t*>malloc(max_states)
    cdef uint32_t* path = <uint32_t*>malloc((maxlen + 1) * sizeof(uint32_t))
    cdef uint32_t* term = <uint32_t*>malloc((npat + 1) * sizeof(uint32_t))
    cdef uint32_t* bfs = NULL
    cdef uint32_t* newid = NULL
    cdef int32_t* gids = NULL
    cdef uint32_t* ocount = NULL
    cdef uint32_t S = 1, node, newn, head, tail, o, ch, k, f, t, c, r, cnt, g
    cdef Py_ssize_t i, d, lcp, plen, prevlen = 0, m
    cdef const unsigned char* pb
    cdef const unsigned char* prev = NULL
    cdef uint64_t nout = 0, total
    cdef bytes blob
    cdef unsigned char* p
    cdef uint32_t* root
    cdef _AhoState* st
    cdef _AhoOut* outs
    cdef _AhoView v
    try:
        if (par == NULL or first_child == NULL or last_child == NULL or next_sib == NULL
                or lab == NULL or path == NULL or term == NULL):
            raise MemoryError()
        par[0] = 0
        first_child[0] = 0
        next_sib[0] = 0
        lab[0] = 0
        path[0] = 0
        for r in range(npat):
            obj = pats[<Py_ssize_t>order[r]]
            pb = <const unsigned char*>PyBytes_AS_STRING(obj)
            plen = PyBytes_GET_SIZE(obj)
            lcp = 0
            if prev != NULL:
                m = plen if plen < prevlen else prevlen
                while lcp < m and pb[lcp] == prev[lcp]:
                    lcp += 1
            node = path[lcp]
            for d in range(lcp, plen):
                newn = S
                S += 1
                par[newn] = node
                lab[newn] = pb[d]
                first_child[newn] = 0
                next_sib[newn] = 0
                if first_child[node] == 0:
                    first_child[node] = newn
                else:
                    next_sib[last_child[node]] = newn
                last_child[node] = newn
                node = newn
                path[d + 1] = node
            term[r] = node
            prev = pb
            prevlen = plen
        free(last_child); last_child = NULL
        if S > _AHO_MAX_STATES:
            raise ValueError(f"aho_build: {S} states exceed the limit of {_AHO_MAX_STATES}")

        # Phase 2: BFS renumbering; children of a state become a contiguous range.
        bfs = <uint32_t*>malloc(S * sizeof(uint32_t))
        newid = <uint32_t*>malloc(S * sizeof(uint32_t))
        ocount = <uint32_t*>calloc(S + 1, sizeof(uint32_t))
        if bfs == NULL or newid == NULL or ocount == NULL:
            raise MemoryError()

        # Phase 3: outputs, grouped by terminal state (equal patterns are adjacent).
        gids = <int32_t*>malloc((npat + 1) * sizeof(int32_t))
        if gids == NULL:
            raise MemoryError()
        # (ids for each distinct pattern: sorted, unique; counted per old state)
        r = 0
        while r < npat:
            g = r
            while g < npat and term[g] == term[r]:
                gids[g] = idv[<Py_ssize_t>order[g]]
                g += 1
            cnt = <uint32_t>_sort_unique_i32(gids + r, g - r)
            ocount[term[r]] = cnt
            # mark the unused tail of the group
            for k in range(r + cnt, g):
                gids[k] = -1
            nout += cnt
            r = g

        total = (_AHO_STATES_OFF + (<uint64_t>S + 1) * sizeof(_AhoState)
                 + nout * sizeof(_AhoOut))
        blob = _mf_new_blob(total)
        p = <unsigned char*>PyBytes_AS_STRING(blob)
        memcpy(p, b"AHOC", 4)
        _mf_wr32(p + 4, 1)
        _mf_wr32(p + 8, S)
        _mf_wr32(p + 12, <uint32_t>nout)
        _mf_wr32(p + 16, 1 if fold else 0)
        _mf_wr32(p + 20, <uint32_t>npat)
        root = <uint32_t*>(p + _AHO_HEADER)
        st = <_AhoState*>(p + _AHO_STATES_OFF)
        outs = <_AhoOut*>(p + _AHO_STATES_OFF + (<uint64_t>S + 1) * sizeof(_AhoState))

        bfs[0] = 0
        newid[0] = 0
        head = 0
        tail = 1
        while head < tail:
            o = bfs[head]
            st[head].child_base = tail
            ch = first_child[o]
            while ch != 0:
                newid[ch] = tail
                bfs[tail] = ch
                st[tail].fail_label = (<uint32_t>lab[ch]) << 24
                par[ch] = head          # parent, now in new numbering
                tail += 1
                ch = next_sib[ch]
            head += 1
        st[S].child_base = S
        # out_start in new numbering (prefix sums over BFS order)
        cnt = 0
        for k in range(S):
            st[k].out_start = cnt
            cnt += ocount[bfs[k]]
        st[S].out_start = cnt
        # copy the output groups
        r = 0
        while r < npat:
            g = r
            while g < npat and term[g] == term[r]:
                g += 1
            t = newid[term[r]]
            k = st[t].out_start
            for d in range(r, g):
                if gids[d] < 0:
                    break
                outs[k].id = gids[d]
                outs[k].length = <uint32_t>PyBytes_GET_SIZE(pats[<Py_ssize_t>order[r]])
                k += 1
            r = g

        # Phase 4: root table, failure and dictionary links in BFS order.
        v.root = root
        v.st = st
        v.outs = outs
        v.nstates = S
        v.nout = <uint32_t>nout
        v.fold = fold
        for k in range(st[0].child_base, st[1].child_base):
            root[_aho_label(&st[k])] = k
        st[0].fail_label = 0
        st[0].dict_link = 0
        for k in range(1, S):
            ch = bfs[k]
            node = par[ch]          # new id of the parent
            c = _aho_label(&st[k])
            if node == 0:
                pass                    # root children fail to the root
            else:
                f = _aho_fail(&st[node])
                while True:
                    if f == 0:
                        st[k].fail_label |= root[c]
                        break
                    t = _aho_child(&v, f, <uint8_t>c)
                    if t != 0:
                        st[k].fail_label |= t
                        break
                    f = _aho_fail(&st[f])
            f = _aho_fail(&st[k])
            if st[f + 1].out_start != st[f].out_start:
                st[k].dict_link = f
            else:
                st[k].dict_link = st[f].dict_link
        return blob
    finally:
        free(par); free(first_child); free(last_child); free(next_sib); free(lab)
        free(path); free(term); free(bfs); free(newid); free(gids); free(ocount)


# ---------------------------------------------------------------------------
# Runtime class.

cdef class AhoCorasick:
    """Read-only view of an AHOC blob (bytes or a memoryview over an mmap)."""
    cdef _MfBlob _blob
    cdef _AhoView v

    def __cinit__(self, buf):
        self._blob = _MfBlob(buf)
        _aho_view_init(&self.v, self._blob.p, self._blob.n)

    cdef int collect(self, const unsigned char* text, Py_ssize_t n, int32_t* out,
                     int cap) noexcept:
        """Write ids of occurrences in text[0:n] (repeats possible) to out,
        stopping at cap; return the count. Allocation-free."""
        cdef const _AhoView* v = &self.v
        cdef uint32_t s = 0, o, k, e
        cdef Py_ssize_t i
        cdef int cnt = 0
        cdef unsigned char c
        if cap <= 0:
            return 0
        for i in range(n):
            c = text[i]
            if v.fold:
                c = fold(c)
            s = _aho_next(v, s, c)
            o = _aho_first_output(v, s)
            while o != 0:
                e = v.st[o + 1].out_start
                for k in range(v.st[o].out_start, e):
                    out[cnt] = v.outs[k].id
                    cnt += 1
                    if cnt == cap:
                        return cnt
                o = v.st[o].dict_link
        return cnt

    def find_all(self, bytes text not None):
        """Sorted unique ids of all patterns occurring anywhere in `text`."""
        cdef int32_t stack[64]
        cdef _IdBuf b
        cdef Py_ssize_t i
        _idbuf_init(&b, stack, 64)
        try:
            if _aho_scan_into(&self.v, <const unsigned char*>PyBytes_AS_STRING(text),
                              PyBytes_GET_SIZE(text), &b) < 0:
                raise MemoryError()
            b.n = _sort_unique_i32(b.data, b.n)
            return [b.data[i] for i in range(b.n)]
        finally:
            _idbuf_free(&b)

    def search(self, bytes text not None):
        """(id, start) of the occurrence that ends first (ties: the longest
        pattern; equal patterns: the smallest id), (-1, -1) if none."""
        cdef const _AhoView* v = &self.v
        cdef const unsigned char* t = <const unsigned char*>PyBytes_AS_STRING(text)
        cdef Py_ssize_t i, n = PyBytes_GET_SIZE(text)
        cdef uint32_t s = 0, o, k
        cdef unsigned char c
        for i in range(n):
            c = t[i]
            if v.fold:
                c = fold(c)
            s = _aho_next(v, s, c)
            o = _aho_first_output(v, s)
            if o != 0:
                k = v.st[o].out_start
                return (v.outs[k].id, i + 1 - <Py_ssize_t>v.outs[k].length)
        return (-1, -1)

    @property
    def nstates(self):
        """Number of automaton states (root included)."""
        return self.v.nstates

    @property
    def fold(self):
        """True when patterns were folded and texts are folded while scanning."""
        return bool(self.v.fold)
