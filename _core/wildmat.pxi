# wildmat.pxi: INN / spamcontrol wildmat, ASCII case-insensitive.
#
# Semantics (docs/behaviour/control-files.md#wildmat; Rich Salz's INN wildmat; _core/README.md):
#   *       any sequence, including empty; consecutive * act as one
#   ?       exactly one byte
#   [abc]   one byte from the set; [a-z] a range (lo > hi matches nothing)
#   [^...]  one byte NOT in the set (^ negates; ! is an ordinary byte)
#           a ] directly after [ or [^ is literal; - first or last is literal;
#           inside a set \ is an ordinary byte (as in Salz's wildmat)
#   \x      literal x (outside sets); a trailing lone \ is malformed
#   other   literal; the pattern must match the WHOLE text
# Case: docs/behaviour/control-files.md#case makes matching ASCII case-insensitive (spamcontrol's
# case-sensitive wildmat stage is a quirk we do not copy): a text byte matches
# if it or its other ASCII case would match. wm_match() takes the text folded
# and the pattern folded by wm_fold_pattern(): everything outside [...] is
# folded, the contents of sets are kept as written, and _wm_class() tests the
# folded byte c and, for c in a-z, also its upper case against each item. So
# [0-Z] is digits, ':'..'@' and letters of either case, but not '_' (folding
# the bounds to [0-z] would take '[', '\', ']', '^', '_', '`' as well).
# Malformed patterns (unclosed [, trailing \) never match.
#
# Invariants: wm_match() is iterative, O(len(p) * len(t)) worst case and
# allocation-free: on a mismatch it only retries from the most recent * with
# one more text byte consumed (the classic "remember the last star" method,
# correct because every other token consumes exactly one byte).

cdef inline int _wm_class(const unsigned char* p, Py_ssize_t pn, Py_ssize_t i,
                          unsigned char c, Py_ssize_t* end) noexcept nogil:
    """Match byte c against the set starting at p[i] == '['.

    Returns 1 (in set), 0 (not in set) or -1 (no closing ]); *end is set to
    the index just past the closing ].
    """
    cdef Py_ssize_t j = i + 1
    cdef bint neg = False, matched = False, first = True
    cdef unsigned char x, hi
    cdef unsigned char uc = c - 32 if b'a' <= c <= b'z' else c
    if j < pn and p[j] == b'^':
        neg = True
        j += 1
    while True:
        if j >= pn:
            return -1
        x = p[j]
        if x == b']' and not first:
            break
        first = False
        if j + 2 < pn and p[j + 1] == b'-' and p[j + 2] != b']':
            hi = p[j + 2]
            j += 3
        else:
            hi = x
            j += 1
        if x <= c <= hi or (uc != c and x <= uc <= hi):
            matched = True
    end[0] = j + 1
    return 1 if matched != neg else 0


cdef bint wm_match(const unsigned char* p, Py_ssize_t pn,
                   const unsigned char* t, Py_ssize_t tn) noexcept nogil:
    """Whole-text wildmat match of folded pattern p[0:pn] against folded t[0:tn]."""
    cdef Py_ssize_t pi = 0, ti = 0, star_p = -1, star_t = 0, nxt
    cdef unsigned char c
    cdef int r
    while True:
        if pi < pn:
            c = p[pi]
            if c == b'*':
                while pi < pn and p[pi] == b'*':
                    pi += 1
                if pi == pn:
                    return True         # trailing * swallows the rest
                star_p = pi
                star_t = ti
                continue
            if ti < tn:
                if c == b'?':
                    pi += 1
                    ti += 1
                    continue
                elif c == b'[':
                    r = _wm_class(p, pn, pi, t[ti], &nxt)
                    if r < 0:
                        return False    # malformed: never matches
                    if r:
                        pi = nxt
                        ti += 1
                        continue
                elif c == b'\\':
                    if pi + 1 >= pn:
                        return False    # malformed: trailing backslash
                    if p[pi + 1] == t[ti]:
                        pi += 2
                        ti += 1
                        continue
                elif c == t[ti]:
                    pi += 1
                    ti += 1
                    continue
        elif ti == tn:
            return True
        # mismatch: let the last * absorb one more byte, if there is one
        if star_p < 0 or star_t >= tn:
            return False
        star_t += 1
        ti = star_t
        pi = star_p


def wm_fold_pattern(bytes pattern not None):
    """`pattern` ready for wm_match(): ASCII-folded outside [...] sets, set
    contents (with their bounds) kept as written; see the header."""
    cdef bytearray out = bytearray(fold_bytes(pattern))
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(pattern)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(pattern), i = 0, end, k
    while i < n:
        if p[i] == b'\\':
            i += 2
        elif p[i] == b'[':
            if _wm_class(p, n, i, 0, &end) < 0:
                break                   # malformed: never matches anyway
            for k in range(i, end):
                out[k] = p[k]
            i = end
        else:
            i += 1
    return bytes(out)


def wildmat_match(bytes pattern not None, bytes text not None):
    """True if `pattern` (wildmat, docs/behaviour/control-files.md#wildmat) matches
    the whole `text`, ASCII case-insensitively."""
    fp = wm_fold_pattern(pattern)
    ft = fold_bytes(text)
    return wm_match(<const unsigned char*>PyBytes_AS_STRING(fp), PyBytes_GET_SIZE(fp),
                    <const unsigned char*>PyBytes_AS_STRING(ft), PyBytes_GET_SIZE(ft))


def wildmat_literal(bytes pattern not None):
    """The longest run of literal bytes (folded) that every text matching
    `pattern` must contain; the first one on ties; b"" if none or if the
    pattern is malformed (it never matches, so it needs no literal)."""
    fp = fold_bytes(pattern)
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(fp)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(fp)
    cdef Py_ssize_t i = 0, end, best_len = 0
    cdef unsigned char c
    cdef bytearray cur = bytearray()
    best = b""
    while i < n:
        c = p[i]
        if c == b'*' or c == b'?' or c == b'[':
            if len(cur) > best_len:
                best = bytes(cur)
                best_len = len(cur)
            cur = bytearray()
            if c == b'[':
                if _wm_class(p, n, i, 0, &end) < 0:
                    return b""
                i = end
            else:
                i += 1
        elif c == b'\\':
            if i + 1 >= n:
                return b""
            cur.append(p[i + 1])
            i += 2
        else:
            cur.append(c)
            i += 1
    if len(cur) > best_len:
        best = bytes(cur)
    return best
