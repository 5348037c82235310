# listmatch.pxi: one control file's matcher (hash + wildmat + RE2 regex).
#
# Job: answer "which rule of this file decides for this text" in time that
# does not grow with the number of rules:
#   - exact / @domain / .suffix / host keys: one HTAB hash table, a handful of
#     probes chosen by the lookup mode (docs/behaviour/control-files.md#which-match-wins stage 2,
#     docs/behaviour/control-files.md#rcpthosts);
#   - wildmat and regex entries ("pattern entries"): one LIDX literal index
#     (litindex.pxi) over their required literals yields the candidates;
#     entries without a literal are always candidates; only candidates are
#     evaluated.
# Two dialects:
#   - last_match (spamcontrol, docs/behaviour/control-files.md#which-match-wins "last matching
#     line decides"): the
#     LARGEST rule id among matching hash keys, wildmat entries and
#     non-negated regexes; candidates are tried in descending id order and
#     the first match (or reaching the best hash hit) ends the search.
#   - first_fire (qregex, docs/behaviour/control-files.md#qregex-dialect "first line that
#     fires decides"): over
#     regex entries only, the SMALLEST id that fires; a `!` (negated) entry
#     fires when its regex does NOT match, and an absent required literal
#     proves "no match" without running the regex.
#
# Blob layout ("LMAT", version 4; little-endian, sections 8-byte aligned;
# 2 added the regex filter records, 3 the required-byte bitmap, 4 replaced
# the AHOC automaton by an LIDX literal index, same place in the header):
#   0   char[4] tag "LMAT"      4   u32 version
#   8   u32 n_wild              12  u32 n_regex
#   16  u32 n_nolit             20  u32 n_neglit
#   24  u64 htab_off, 32 u64 htab_len       embedded HTAB blob
#   40  u64 lidx_off, 48 u64 lidx_len       embedded LIDX blob (ids = entry index)
#   56  u64 ent_off                         entry[n_wild + n_regex], 16 bytes:
#         i32 rule_id, u32 kind_index (bit 31 regex, bit 30 negated,
#         bits 0-29 index into wild patterns / regexes), u32 pat_off, u32 pat_len
#         (a regex entry's pat_off/pat_len locate its filter record, 0, 4, 36
#         or 68 bytes, see _lm_may_match)
#   64  u64 nolit_off                       u32[n_nolit]  entries without literal
#   72  u64 neglit_off                      u32[n_neglit] negated regexes with literal
#   80  u64 pool_off, 88 u64 pool_len       wildmat patterns (wm_fold_pattern)
#   96  u64 total_size                      whole blob, padding included
# Entries are sorted by rule id (ascending, distinct), so "descending id" is
# "descending entry index"; nolit and neglit hold ascending entry indices.
#
# Invariants: everything above is validated at construction (offsets and
# lengths against len(buf), entry indices and pattern ranges, automaton
# literal ids < number of entries); lookups never allocate unless the text is
# longer than the stack buffer or yields very many distinct candidates.
# Regex entries are run on the ORIGINAL text (compiled case-insensitive);
# literals and wildmat run on the ASCII-folded text. Required regex literals
# must be ASCII-safe under the regex's case folding (the compiler's job).

from cpython.unicode cimport (PyUnicode_GET_LENGTH, PyUnicode_KIND, PyUnicode_1BYTE_KIND,
                              PyUnicode_DATA)

cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)

cdef extern from *:
    """
    #define MF_LM_HEADER 104
    #define MF_LM_REGEX 0x80000000u
    #define MF_LM_NEG 0x40000000u
    #define MF_LM_INDEX 0x3FFFFFFFu
    #define MF_LM_STACK_TEXT 512
    #define MF_LM_STACK_IDS 128
    #define MF_LM_MAX_KEYS 16
    """
    const uint32_t _LM_HEADER "MF_LM_HEADER"
    const uint32_t _LM_REGEX "MF_LM_REGEX"
    const uint32_t _LM_NEG "MF_LM_NEG"
    const uint32_t _LM_INDEX "MF_LM_INDEX"
    enum: _LM_STACK_TEXT "MF_LM_STACK_TEXT"
    enum: _LM_STACK_IDS "MF_LM_STACK_IDS"
    enum: _LM_MAX_KEYS "MF_LM_MAX_KEYS"

MODE_EXACT = 0
MODE_ADDRESS = 1
MODE_HOST = 2

ctypedef struct _LmEntry:
    int32_t rule_id
    uint32_t kind_index
    uint32_t pat_off
    uint32_t pat_len


def listmatch_build(hash_keys, hash_ids, wild_patterns, wild_ids,
                    regex_ids, regex_literals, regex_negated, regex_filters=None):
    """Build an LMAT blob for one control file.

    hash_keys/hash_ids: exact keys (folded here too) and their rule ids;
    wild_patterns/wild_ids: wildmat patterns (literal via wildmat_literal);
    regex_ids/regex_literals/regex_negated: per regex entry i its rule id,
    required literal (b"" = none) and qregex `!` flag. Regex texts are not
    stored. Wildmat and regex ids must be distinct non-negative int32.
    regex_filters (optional): per regex entry b"" or a filter record (u32
    minimum match length, then optionally a 32-byte bitmap of the bytes a
    match can start with, then optionally a 32-byte bitmap of which every
    match contains at least one byte), checked on the raw text before the
    regex runs: a failed check proves "no match" without calling RE2.
    """
    cdef Py_ssize_t nw = len(wild_patterns), nr = len(regex_ids)
    if len(hash_keys) != len(hash_ids):
        raise ValueError("listmatch_build: hash_keys and hash_ids differ in length")
    if len(wild_ids) != nw:
        raise ValueError("listmatch_build: wild_patterns and wild_ids differ in length")
    if len(regex_literals) != nr or len(regex_negated) != nr:
        raise ValueError("listmatch_build: regex_ids, regex_literals, regex_negated differ in length")
    if regex_filters is None:
        regex_filters = [b""] * nr
    if len(regex_filters) != nr:
        raise ValueError("listmatch_build: regex_filters has the wrong length")
    if nw + nr >= <Py_ssize_t>_LM_INDEX:
        raise ValueError("listmatch_build: too many pattern entries")
    htab = hashtab_build(hash_keys, hash_ids)

    # (rule_id, kind_index, folded pattern or None, folded literal)
    cdef list ents = []
    cdef long long rid
    for i in range(nw):
        pat = wild_patterns[i]
        if not isinstance(pat, bytes):
            raise TypeError("listmatch_build: wild patterns must be bytes")
        rid = wild_ids[i]
        if rid < 0 or rid > INT32_MAX:
            raise ValueError(f"listmatch_build: id {rid} is not a non-negative int32")
        ents.append((rid, <uint32_t>i, wm_fold_pattern(pat), wildmat_literal(pat)))
    for i in range(nr):
        lit = regex_literals[i]
        if not isinstance(lit, bytes):
            raise TypeError("listmatch_build: regex literals must be bytes")
        rid = regex_ids[i]
        if rid < 0 or rid > INT32_MAX:
            raise ValueError(f"listmatch_build: id {rid} is not a non-negative int32")
        filt = regex_filters[i]
        if not isinstance(filt, bytes) or len(filt) not in (0, 4, 36, 68):
            raise ValueError("listmatch_build: a regex filter is b'' or 4, 36 or 68 bytes")
        ents.append((rid, _LM_REGEX | (_LM_NEG if regex_negated[i] else 0) | <uint32_t>i,
                     filt or None, fold_bytes(lit)))
    ents.sort(key=lambda e: e[0])
    for i in range(1, len(ents)):
        if ents[i][0] == ents[i - 1][0]:
            raise ValueError(f"listmatch_build: duplicate pattern rule id {ents[i][0]}")

    cdef Py_ssize_t npat = len(ents)
    lits = []
    lit_ids = []
    nolit = []
    neglit = []
    pool_parts = []
    cdef uint64_t pool_len = 0
    for i in range(npat):
        rid_, ki, pat, lit = ents[i]
        if lit:
            lits.append(lit)
            lit_ids.append(i)
            if ki & _LM_NEG:
                neglit.append(i)
        else:
            nolit.append(i)
        if pat is not None:
            pool_parts.append(pat)
            pool_len += len(pat)
    if pool_len >= 0xFFFFFFFF:
        raise ValueError("listmatch_build: patterns exceed 4 GiB")
    lidx = litindex_build(lits, lit_ids)
    pool = b"".join(pool_parts)

    cdef uint64_t off = _LM_HEADER
    cdef uint64_t htab_off = off
    off = _mf_align8(off + len(htab))
    cdef uint64_t lidx_off = off
    off = _mf_align8(off + len(lidx))
    cdef uint64_t ent_off = off
    off = _mf_align8(off + <uint64_t>npat * sizeof(_LmEntry))
    cdef uint64_t nolit_off = off
    off = _mf_align8(off + <uint64_t>len(nolit) * 4)
    cdef uint64_t neglit_off = off
    off = _mf_align8(off + <uint64_t>len(neglit) * 4)
    cdef uint64_t pool_off = off
    off = _mf_align8(off + pool_len)

    blob = _mf_new_blob(off)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(blob)
    memcpy(p, b"LMAT", 4)
    _mf_wr32(p + 4, 4)
    _mf_wr32(p + 8, <uint32_t>nw)
    _mf_wr32(p + 12, <uint32_t>nr)
    _mf_wr32(p + 16, <uint32_t>len(nolit))
    _mf_wr32(p + 20, <uint32_t>len(neglit))
    _mf_wr64(p + 24, htab_off); _mf_wr64(p + 32, len(htab))
    _mf_wr64(p + 40, lidx_off); _mf_wr64(p + 48, len(lidx))
    _mf_wr64(p + 56, ent_off)
    _mf_wr64(p + 64, nolit_off)
    _mf_wr64(p + 72, neglit_off)
    _mf_wr64(p + 80, pool_off); _mf_wr64(p + 88, pool_len)
    _mf_wr64(p + 96, off)
    memcpy(p + htab_off, PyBytes_AS_STRING(htab), len(htab))
    memcpy(p + lidx_off, PyBytes_AS_STRING(lidx), len(lidx))
    memcpy(p + pool_off, PyBytes_AS_STRING(pool), pool_len)
    cdef _LmEntry* ent = <_LmEntry*>(p + ent_off)
    cdef uint32_t* u32
    cdef uint32_t poff = 0
    for i in range(npat):
        rid_, ki, pat, lit = ents[i]
        ent[i].rule_id = <int32_t>rid_
        ent[i].kind_index = ki
        if pat is not None:
            ent[i].pat_off = poff
            ent[i].pat_len = <uint32_t>len(pat)
            poff += <uint32_t>len(pat)
    u32 = <uint32_t*>(p + nolit_off)
    for i in range(len(nolit)):
        u32[i] = nolit[i]
    u32 = <uint32_t*>(p + neglit_off)
    for i in range(len(neglit)):
        u32[i] = neglit[i]
    return blob


cdef inline bint _lm_may_match(const unsigned char* rec, uint32_t rec_len,
                               const unsigned char* raw, Py_ssize_t n) noexcept nogil:
    """A regex entry's filter record against the raw text: False proves the
    regex cannot match (too short, a `^`-anchored pattern whose first byte
    is impossible, or none of the bytes every match contains occurs); True
    means "run the regex". Record: u32 minimum length; 36 and 68 bytes add
    the first-byte bitmap (all ones when unknown); 68 adds the
    required-byte bitmap (regexes.regex_filter)."""
    cdef uint32_t min_len
    cdef const unsigned char* req
    cdef Py_ssize_t i
    if rec_len == 0:
        return True
    memcpy(&min_len, rec, 4)            # records sit unaligned in the pool
    if <uint64_t>n < min_len:
        return False
    if rec_len >= 36:
        if n == 0 or not (rec[4 + (raw[0] >> 3)] >> (raw[0] & 7)) & 1:
            return False
    if rec_len == 68:
        req = rec + 36
        for i in range(n):
            if (req[raw[i] >> 3] >> (raw[i] & 7)) & 1:
                return True
        return False
    return True


cdef inline int32_t _lm_max(int32_t a, int32_t b) noexcept nogil:
    return a if a > b else b


cdef inline int _lm_hash_plan(const _HtView* ht, const unsigned char* t, Py_ssize_t n,
                              int mode, Py_ssize_t* starts, uint64_t* hashes) noexcept nogil:
    """The keys `mode` derives from the folded t, as ListMatcher._hash_best
    probes them: each is a suffix t[starts[k]:] (the text, `@domain`,
    `.suffix`...), hashes[k] its hash; their first slots start loading now
    (_ht_prefetch), so the probes after the literal scan rarely wait for
    memory. Returns the count, or -1 if there are more than _LM_MAX_KEYS
    (then ListMatcher._hash_best probes them one by one)."""
    cdef int k = 0
    cdef Py_ssize_t i, at = -1
    starts[k] = 0
    k += 1
    if mode == 1:                       # MODE_ADDRESS
        i = n - 1
        while i >= 0:
            if t[i] == b'@':
                at = i
                break
            i -= 1
        if at >= 0:                     # no @: the address only
            starts[k] = at
            k += 1
            for i in range(at + 1, n):
                if t[i] == b'.':
                    if k == _LM_MAX_KEYS:
                        return -1
                    starts[k] = i
                    k += 1
    elif mode == 2:                     # MODE_HOST
        for i in range(n):
            if t[i] == b'.':
                if k == _LM_MAX_KEYS:
                    return -1
                starts[k] = i
                k += 1
    for i in range(k):
        hashes[i] = _ht_prefetch(ht, t + starts[i], n - starts[i])
    return k


cdef inline int32_t _lm_hash_planned(const _HtView* ht, const unsigned char* t, Py_ssize_t n,
                                     const Py_ssize_t* starts, const uint64_t* hashes,
                                     int k) noexcept nogil:
    """Largest hash-table id among the k planned keys (_lm_hash_plan)."""
    cdef int32_t best = -1
    cdef int i
    for i in range(k):
        best = _lm_max(best, _ht_lookup_hashed(ht, t + starts[i], n - starts[i], hashes[i]))
    return best


cdef class ListMatcher:
    """Matcher for one control file over an LMAT blob plus its compiled regexes.

    `regexes[i]` is the compiled RE2 pattern of regex entry i, in builder
    order; only its `.contains(bytes) -> bool` is used (a lookup needs "does
    it match", never the match itself: no Match object is built).
    """
    cdef _MfBlob _blob
    cdef _HtView ht
    cdef _LiView lidx
    cdef const _LmEntry* ent
    cdef const uint32_t* nolit
    cdef const uint32_t* neglit
    cdef const unsigned char* pool
    cdef uint32_t n_wild, n_regex, n_pat, n_nolit, n_neglit
    cdef list _contains        # per regex entry: contains(text) -> bool
    cdef object _gate          # contains of one RE2 alternation of the gated regexes, or None
    cdef object _words_ref     # keeps the rule words of set_rule_flags alive
    cdef const uint32_t* _words
    cdef Py_ssize_t _nwords
    cdef uint32_t _exc_mask

    def __cinit__(self, buf, regexes):
        self._blob = _MfBlob(buf)
        cdef const unsigned char* p = self._blob.p
        cdef Py_ssize_t n = self._blob.n
        _mf_check_header(p, n, b"LMAT", 4, _LM_HEADER, "ListMatcher")
        if _mf_rd64(p + 96) > <uint64_t>n:
            raise ValueError(f"ListMatcher: blob truncated: {n} bytes, "
                             f"header declares {_mf_rd64(p + 96)}")
        self.n_wild = _mf_rd32(p + 8)
        self.n_regex = _mf_rd32(p + 12)
        self.n_nolit = _mf_rd32(p + 16)
        self.n_neglit = _mf_rd32(p + 20)
        if <uint64_t>self.n_wild + self.n_regex >= _LM_INDEX:
            raise ValueError("ListMatcher: bad entry counts")
        self.n_pat = self.n_wild + self.n_regex
        cdef uint64_t htab_off = _lm_section(p, n, 24, 32, 0, "hash table")
        cdef uint64_t lidx_off = _lm_section(p, n, 40, 48, 0, "literal index")
        cdef uint64_t ent_off = _lm_section(p, n, 56, 0, <uint64_t>self.n_pat * sizeof(_LmEntry), "entries")
        cdef uint64_t nolit_off = _lm_section(p, n, 64, 0, <uint64_t>self.n_nolit * 4, "no-literal list")
        cdef uint64_t neglit_off = _lm_section(p, n, 72, 0, <uint64_t>self.n_neglit * 4, "negated list")
        cdef uint64_t pool_off = _lm_section(p, n, 80, 88, 0, "pattern pool")
        cdef uint64_t pool_len = _mf_rd64(p + 88)
        _ht_view_init(&self.ht, p + htab_off, <Py_ssize_t>_mf_rd64(p + 32))
        _li_view_init(&self.lidx, p + lidx_off, <Py_ssize_t>_mf_rd64(p + 48))
        self.ent = <const _LmEntry*>(p + ent_off)
        self.nolit = <const uint32_t*>(p + nolit_off)
        self.neglit = <const uint32_t*>(p + neglit_off)
        self.pool = p + pool_off
        cdef uint32_t i, idx
        cdef const _LmEntry* e
        for i in range(self.n_pat):
            e = &self.ent[i]
            if e.rule_id < 0 or (i > 0 and e.rule_id <= self.ent[i - 1].rule_id):
                raise ValueError(f"ListMatcher: entry {i}: rule ids not ascending")
            idx = e.kind_index & _LM_INDEX
            if e.kind_index & _LM_REGEX:
                if idx >= self.n_regex:
                    raise ValueError(f"ListMatcher: entry {i}: regex index out of range")
                if (e.pat_len not in (0, 4, 36, 68)
                        or <uint64_t>e.pat_off + e.pat_len > pool_len):
                    raise ValueError(f"ListMatcher: entry {i}: bad regex filter")
            else:
                if idx >= self.n_wild or (e.kind_index & _LM_NEG):
                    raise ValueError(f"ListMatcher: entry {i}: wildmat index out of range")
                if <uint64_t>e.pat_off + e.pat_len > pool_len:
                    raise ValueError(f"ListMatcher: entry {i}: pattern outside the pool")
        for i in range(self.n_nolit):
            if self.nolit[i] >= self.n_pat or (i > 0 and self.nolit[i] <= self.nolit[i - 1]):
                raise ValueError("ListMatcher: bad no-literal list")
        for i in range(self.n_neglit):
            if (self.neglit[i] >= self.n_pat or (i > 0 and self.neglit[i] <= self.neglit[i - 1])
                    or (self.ent[self.neglit[i]].kind_index & _LM_NEG) == 0):
                raise ValueError("ListMatcher: bad negated-literal list")
        for i in range(self.lidx.aho.nout):
            if <uint32_t>self.lidx.aho.outs[i].id >= self.n_pat:
                raise ValueError("ListMatcher: literal id outside the entries")
        for i in range(self.lidx.nrec):
            if <uint32_t>self.lidx.recs[i].id >= self.n_pat:
                raise ValueError("ListMatcher: literal id outside the entries")
        if len(regexes) != self.n_regex:
            raise ValueError(f"ListMatcher: blob has {self.n_regex} regex entries, "
                             f"{len(regexes)} regexes given")
        self._contains = [r.contains for r in regexes]
        self._gate = None

    cdef int32_t _hash_best(self, const unsigned char* t, Py_ssize_t n, int mode) noexcept:
        """Largest hash-table id among the keys `mode` derives from t (folded)."""
        cdef int32_t best = _ht_lookup(&self.ht, t, n)
        cdef Py_ssize_t i, at = -1
        if mode == 1:                       # MODE_ADDRESS
            i = n - 1
            while i >= 0:
                if t[i] == b'@':
                    at = i
                    break
                i -= 1
            if at < 0:
                return best                 # no @: the address only
            best = _lm_max(best, _ht_lookup(&self.ht, t + at, n - at))     # @domain
            for i in range(at + 1, n):
                if t[i] == b'.':
                    best = _lm_max(best, _ht_lookup(&self.ht, t + i, n - i))
        elif mode == 2:                     # MODE_HOST
            for i in range(n):
                if t[i] == b'.':
                    best = _lm_max(best, _ht_lookup(&self.ht, t + i, n - i))
        return best

    def set_contains(self, Py_ssize_t i, contains):
        """Replace regex entry i's contains callable (text -> bool; lazy
        compilation: the bundle hands in a stub that compiles on first use,
        then swaps itself out through this method so later calls go straight
        to RE2)."""
        if not 0 <= i < self.n_regex:
            raise IndexError(i)
        self._contains[i] = contains

    def gated_regexes(self):
        """Indexes of the non-negated regex entries without a literal: the
        ones every lookup would otherwise run. The bundle combines them into
        one RE2 alternation, the gate (set_gate)."""
        cdef uint32_t i
        cdef const _LmEntry* en
        out = []
        for i in range(self.n_nolit):
            en = &self.ent[self.nolit[i]]
            if (en.kind_index & _LM_REGEX) and not (en.kind_index & _LM_NEG):
                out.append(en.kind_index & _LM_INDEX)
        return out

    def set_gate(self, gate):
        """gate(text) -> bool; False must imply that none of gated_regexes()
        matches text; then a lookup runs one RE2 call instead of one per
        regex. None: no gate (every gated regex runs)."""
        self._gate = gate

    cdef inline bint _gate_open(self, bytes text, int* state) except -1:
        """Lazily evaluated once per lookup: state -1 unknown, 0 closed, 1 open."""
        if state[0] < 0:
            state[0] = 1 if self._gate is None or self._gate(text) else 0
        return state[0] == 1

    def last_match(self, bytes text not None, int mode):
        """spamcontrol dialect (docs/behaviour/control-files.md#which-match-wins): the largest rule
        id of all entries matching `text` (hash keys per `mode`, wildmat, non-negated regexes),
        -1 if none."""
        if mode < 0 or mode > 2:
            raise ValueError(f"last_match: unknown mode {mode}")
        return self._last(<const unsigned char*>PyBytes_AS_STRING(text), PyBytes_GET_SIZE(text),
                          mode, text)

    def set_rule_flags(self, words, uint32_t exception_mask):
        """The bundle's rule words (3 u32 per rule id, the first holding the
        flags; any buffer of them) and the flag bit of an `!` exception line:
        what listed() needs to tell an exception from a listing."""
        cdef const unsigned char[::1] mv = memoryview(words).cast("B")
        self._words_ref = mv
        self._words = <const uint32_t*>&mv[0] if mv.shape[0] else NULL
        self._nwords = mv.shape[0] // 4
        self._exc_mask = exception_mask

    def last_match_str(self, str text not None, int mode, Py_ssize_t start=0, bint utf8=False):
        """last_match(text[start:].encode("latin-1", "replace"), mode)
        without building the slice or the bytes when every character of
        `text` is Latin-1 (the bytes are then the string's own). `utf8`:
        `text` is an address, read as its UTF-8 bytes when it is not ASCII
        (an SMTPUTF8 address meets a rule file's UTF-8 entry byte for byte,
        docs/behaviour/control-files.md#case); ASCII is the same either way."""
        if mode < 0 or mode > 2:
            raise ValueError(f"last_match_str: unknown mode {mode}")
        cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text)
        if start < 0 or start > n:
            raise IndexError("last_match_str: start outside the text")
        if utf8 and not PyUnicode_IS_ASCII(text):
            return self.last_match(text[start:].encode("utf-8", "surrogateescape"), mode)
        if PyUnicode_KIND(text) != PyUnicode_1BYTE_KIND:
            return self.last_match(text[start:].encode("latin-1", "replace"), mode)
        return self._last(<const unsigned char*>PyUnicode_DATA(text) + start, n - start, mode,
                          None)

    def listed(self, str text not None, int mode, bint lower=False, bint utf8=False):
        """spamcontrol's "is it listed" (docs/behaviour/control-files.md#which-match-wins: the
        last matching line decides, an `!` line is an exception): last_match of
        `text` (lower-cased first if `lower`) as Latin-1 bytes ("replace": one
        `?` per other character), -1 if that rule is an exception. Same answer
        as last_match((text.lower() if lower else text).encode("latin-1",
        "replace"), mode) followed by the rule's exception flag
        (set_rule_flags), in one call and without the bytes when `text` is
        Latin-1 (ASCII when lower-casing: str.lower() of ASCII is the fold).
        `utf8`: `text` is an address, read as its UTF-8 bytes when it is not
        ASCII (`lower` then folds A-Z only, bytes.lower()), as last_match_str."""
        if mode < 0 or mode > 2:
            raise ValueError(f"listed: unknown mode {mode}")
        if self._words_ref is None:
            raise ValueError("listed: set_rule_flags() was not called")
        cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text)
        cdef int32_t rid
        cdef unsigned char stack_text[_LM_STACK_TEXT]
        cdef unsigned char* low
        cdef const unsigned char* raw
        if utf8 and not PyUnicode_IS_ASCII(text):
            b = text.encode("utf-8", "surrogateescape")
            if lower:
                b = b.lower()
            rid = self._last(<const unsigned char*>PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b),
                             mode, b)
        elif PyUnicode_KIND(text) != PyUnicode_1BYTE_KIND or (lower and not PyUnicode_IS_ASCII(text)):
            b = (text.lower() if lower else text).encode("latin-1", "replace")
            rid = self._last(<const unsigned char*>PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b),
                             mode, b)
        elif lower:
            raw = <const unsigned char*>PyUnicode_DATA(text)
            low = stack_text
            if n > _LM_STACK_TEXT:
                low = <unsigned char*>malloc(n)
                if low == NULL:
                    raise MemoryError()
            try:
                fold_into(low, raw, n)
                rid = self._last(low, n, mode, None)
            finally:
                if low != stack_text:
                    free(low)
        else:
            rid = self._last(<const unsigned char*>PyUnicode_DATA(text), n, mode, None)
        if rid < 0:
            return -1
        if <uint64_t>3 * <uint64_t>rid >= <uint64_t>self._nwords:
            raise IndexError(f"listed: rule id {rid} outside the rule words")
        return -1 if self._words[3 * rid] & self._exc_mask else rid

    cdef int32_t _last(self, const unsigned char* raw, Py_ssize_t n, int mode,
                       bytes text) except -2:
        """last_match over raw[0:n]; `text` is those bytes as an object, or
        None: built only if a regex has to run."""
        cdef unsigned char stack_text[_LM_STACK_TEXT]
        cdef int32_t stack_ids[_LM_STACK_IDS]
        cdef unsigned char* t = stack_text
        cdef _IdBuf hits
        cdef int32_t best
        cdef Py_ssize_t hi, ni
        cdef uint32_t e
        cdef const _LmEntry* en
        cdef int gate = -1
        cdef bint from_nolit
        cdef Py_ssize_t key_starts[_LM_MAX_KEYS]
        cdef uint64_t key_hashes[_LM_MAX_KEYS]
        cdef int nkeys
        if n > _LM_STACK_TEXT:
            t = <unsigned char*>malloc(n)
            if t == NULL:
                raise MemoryError()
        _idbuf_init(&hits, stack_ids, _LM_STACK_IDS)
        try:
            fold_into(t, raw, n)
            # hash slots load while the literal index scans (same answer as
            # _hash_best first, fewer stalls on a large table)
            nkeys = _lm_hash_plan(&self.ht, t, n, mode, key_starts, key_hashes)
            if self.n_pat != 0 and _li_scan_into(&self.lidx, t, n, &hits) < 0:
                raise MemoryError()
            if nkeys >= 0:
                best = _lm_hash_planned(&self.ht, t, n, key_starts, key_hashes, nkeys)
            else:
                best = self._hash_best(t, n, mode)
            if self.n_pat == 0:
                return best
            hits.n = _sort_unique_i32(hits.data, hits.n)
            hi = hits.n - 1
            ni = <Py_ssize_t>self.n_nolit - 1
            while hi >= 0 or ni >= 0:
                # next candidate in descending entry (= rule id) order
                if ni < 0 or (hi >= 0 and <uint32_t>hits.data[hi] > self.nolit[ni]):
                    e = <uint32_t>hits.data[hi]
                    hi -= 1
                    from_nolit = False
                else:
                    e = self.nolit[ni]
                    ni -= 1
                    from_nolit = True
                en = &self.ent[e]
                if en.rule_id <= best:
                    break
                if en.kind_index & _LM_REGEX:
                    if en.kind_index & _LM_NEG:
                        continue
                    if not _lm_may_match(self.pool + en.pat_off, en.pat_len, raw, n):
                        continue            # cannot match: no RE2 call
                    if text is None:
                        text = PyBytes_FromStringAndSize(<const char*>raw, n)
                    if from_nolit and not self._gate_open(text, &gate):
                        continue
                    if self._contains[en.kind_index & _LM_INDEX](text):
                        return en.rule_id
                elif wm_match(self.pool + en.pat_off, en.pat_len, t, n):
                    return en.rule_id
            return best
        finally:
            _idbuf_free(&hits)
            if t != stack_text:
                free(t)

    def first_fire(self, bytes text not None):
        """qregex dialect (docs/behaviour/control-files.md#qregex-dialect): over regex entries
        only, the smallest rule id that fires (normal: regex matches; `!`: regex does not match),
        -1 if none."""
        cdef Py_ssize_t n = PyBytes_GET_SIZE(text)
        cdef unsigned char stack_text[_LM_STACK_TEXT]
        cdef int32_t stack_ids[_LM_STACK_IDS]
        cdef unsigned char* t = stack_text
        cdef _IdBuf hits
        cdef Py_ssize_t hi, ni, k
        cdef int64_t bound = -1
        cdef uint32_t e
        cdef const _LmEntry* en
        cdef bint matched, from_nolit
        cdef int gate = -1
        cdef const unsigned char* raw = <const unsigned char*>PyBytes_AS_STRING(text)
        if self.n_regex == 0:
            return -1
        if n > _LM_STACK_TEXT:
            t = <unsigned char*>malloc(n)
            if t == NULL:
                raise MemoryError()
        _idbuf_init(&hits, stack_ids, _LM_STACK_IDS)
        try:
            fold_into(t, <const unsigned char*>PyBytes_AS_STRING(text), n)
            if _li_scan_into(&self.lidx, t, n, &hits) < 0:
                raise MemoryError()
            hits.n = _sort_unique_i32(hits.data, hits.n)
            # The first negated entry whose literal is absent fires for sure.
            hi = 0
            for k in range(self.n_neglit):
                e = self.neglit[k]
                while hi < hits.n and <uint32_t>hits.data[hi] < e:
                    hi += 1
                if hi < hits.n and <uint32_t>hits.data[hi] == e:
                    continue
                bound = e
                break
            # Smaller candidates, ascending: the first that fires wins.
            hi = 0
            ni = 0
            while hi < hits.n or ni < self.n_nolit:
                if ni >= self.n_nolit or (hi < hits.n and <uint32_t>hits.data[hi] < self.nolit[ni]):
                    e = <uint32_t>hits.data[hi]
                    hi += 1
                    from_nolit = False
                else:
                    e = self.nolit[ni]
                    ni += 1
                    from_nolit = True
                if bound >= 0 and e >= bound:
                    break
                en = &self.ent[e]
                if not (en.kind_index & _LM_REGEX):
                    continue
                if not _lm_may_match(self.pool + en.pat_off, en.pat_len, raw, n):
                    matched = False     # proven without RE2
                elif from_nolit and not (en.kind_index & _LM_NEG) and not self._gate_open(text, &gate):
                    continue            # the gate proves this regex does not match
                else:
                    matched = bool(self._contains[en.kind_index & _LM_INDEX](text))
                if matched != ((en.kind_index & _LM_NEG) != 0):
                    return en.rule_id
            if bound >= 0:
                return self.ent[bound].rule_id
            return -1
        finally:
            _idbuf_free(&hits)
            if t != stack_text:
                free(t)

    def counts(self):
        """Sizes: distinct hash keys, wildmat and regex entries, literals
        indexed by a window, states of the short-literal automaton."""
        return {"hash": self.ht.nentries, "wildmat": self.n_wild,
                "regex": self.n_regex, "literals_indexed": self.lidx.nrec,
                "aho_states": self.lidx.aho.nstates}


cdef int64_t _lm_section(const unsigned char* p, Py_ssize_t n, int off_at, int len_at,
                         uint64_t fixed_len, str what) except -1:
    """Offset of a section whose offset is stored at p+off_at and whose length
    is stored at p+len_at (or is fixed_len when len_at == 0); checks bounds."""
    cdef uint64_t off = _mf_rd64(p + off_at)
    cdef uint64_t length = _mf_rd64(p + len_at) if len_at else fixed_len
    if off & 7 or off < _LM_HEADER or off > <uint64_t>n or length > <uint64_t>n - off:
        raise ValueError(f"ListMatcher: {what} section outside the blob "
                         f"(offset {off}, length {length}, blob {n} bytes)")
    return <int64_t>off
