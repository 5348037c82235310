"""Pure-Python twins of the _core matchers, used as differential-test oracles.

They implement the contract in _core/README.md literally and slowly: no
automaton, no prefilter, no clever algorithms. Semantics sources:
docs/behaviour/control-files.md#case (ASCII case-insensitive everywhere),
docs/behaviour/control-files.md#wildmat (wildmat, last-match-wins),
docs/behaviour/control-files.md#qregex-dialect (qregex first-firing-line-wins, `!` = require).
"""
from functools import lru_cache

MODE_EXACT, MODE_ADDRESS, MODE_HOST = 0, 1, 2

_UPPER = bytes(range(ord("A"), ord("Z") + 1))
_LOWER = bytes(range(ord("a"), ord("z") + 1))
_FOLD = bytes.maketrans(_UPPER, _LOWER)


def fold(b: bytes) -> bytes:
    """ASCII-only lower-casing; bytes >= 0x80 untouched."""
    return b.translate(_FOLD)


# --------------------------------------------------------------------- hash
class HashOracle:
    def __init__(self, keys, values):
        self.d = {}
        for k, v in zip(keys, values):
            self.d[fold(k)] = v          # later assignment wins

    def get(self, key):
        return self.d.get(fold(key), -1)

    def __len__(self):
        return len(self.d)


# ---------------------------------------------------------------- substring
class AhoOracle:
    """Naive substring search standing in for Aho-Corasick."""

    def __init__(self, patterns, ids, fold_case):
        if any(len(p) == 0 for p in patterns):
            raise ValueError("empty pattern")
        self.fold_case = fold_case
        self.pats = [(fold(p) if fold_case else p, i) for p, i in zip(patterns, ids)]

    def _t(self, text):
        return fold(text) if self.fold_case else text

    def find_all(self, text):
        t = self._t(text)
        return sorted({i for p, i in self.pats if p in t})

    def search(self, text):
        t = self._t(text)
        for end in range(1, len(t) + 1):
            found = [(-len(p), i) for p, i in self.pats
                     if len(p) <= end and t[end - len(p):end] == p]
            if found:
                neglen, i = min(found)       # longest, then smallest id
                return (i, end + neglen)
        return (-1, -1)


# ------------------------------------------------------------------ wildmat
def _wm_tokens(p: bytes):
    """Tokenize a wildmat pattern as written; None if malformed.

    Tokens: ("*",), ("?",), ("lit", folded byte), ("set", negated, [(lo, hi), ...])
    with the set items as written (not folded: see wildmat_match).
    """
    toks = []
    i, n = 0, len(p)
    while i < n:
        c = p[i]
        if c == ord("*"):
            toks.append(("*",))
            i += 1
        elif c == ord("?"):
            toks.append(("?",))
            i += 1
        elif c == ord("\\"):
            if i + 1 == n:
                return None
            toks.append(("lit", fold(p[i + 1:i + 2])[0]))
            i += 2
        elif c == ord("["):
            i += 1
            neg = False
            if i < n and p[i] == ord("^"):
                neg = True
                i += 1
            items = []
            first = True
            while True:
                if i >= n:
                    return None
                if p[i] == ord("]") and not first:
                    i += 1
                    break
                first = False
                if i + 2 < n and p[i + 1] == ord("-") and p[i + 2] != ord("]"):
                    items.append((p[i], p[i + 2]))
                    i += 3
                else:
                    items.append((p[i], p[i]))
                    i += 1
            toks.append(("set", neg, items))
        else:
            toks.append(("lit", fold(bytes([c]))[0]))
            i += 1
    return toks


def wildmat_match(pattern: bytes, text: bytes) -> bool:
    """Recursive (memoised) whole-string wildmat, ASCII case-insensitive: a
    text byte matches a literal or a set if it or its other ASCII case does
    (so [0-Z] takes digits, ':'..'@' and letters, never '_')."""
    toks = _wm_tokens(pattern)
    if toks is None:
        return False
    t = fold(text)

    @lru_cache(maxsize=None)
    def m(ki, ti):
        if ki == len(toks):
            return ti == len(t)
        tok = toks[ki]
        if tok[0] == "*":
            return any(m(ki + 1, j) for j in range(ti, len(t) + 1))
        if ti == len(t):
            return False
        c = t[ti]
        if tok[0] == "?":
            ok = True
        elif tok[0] == "lit":
            ok = c == tok[1]
        else:
            variants = {c, c - 32} if 97 <= c <= 122 else {c}
            ok = any(lo <= v <= hi for lo, hi in tok[2] for v in variants) != tok[1]
        return ok and m(ki + 1, ti + 1)

    return m(0, 0)


def wildmat_literal(pattern: bytes) -> bytes:
    """Longest (first on ties) run of consecutive literal tokens, folded."""
    toks = _wm_tokens(pattern)
    if toks is None:
        return b""
    best, cur = b"", b""
    for tok in toks + [("*",)]:
        if tok[0] == "lit":
            cur += bytes([tok[1]])
        else:
            if len(cur) > len(best):
                best = cur
            cur = b""
    return best


# -------------------------------------------------------------- listmatcher
def hash_keys_for(text: bytes, mode: int):
    """The folded keys the contract says `mode` tries for `text`."""
    t = fold(text)
    keys = [t]
    if mode == MODE_ADDRESS:
        if b"@" in t:
            at = t.rindex(b"@")
            domain = t[at + 1:]
            keys.append(b"@" + domain)
            keys += [domain[i:] for i in range(len(domain)) if domain[i:i + 1] == b"."]
    elif mode == MODE_HOST:
        keys += [t[i:] for i in range(len(t)) if t[i:i + 1] == b"."]
    return keys


class ListMatcherOracle:
    def __init__(self, hash_keys, hash_ids, wild_patterns, wild_ids,
                 regex_ids, regex_literals, regex_negated, regexes):
        self.hash = HashOracle(hash_keys, hash_ids)
        self.wild = list(zip(wild_patterns, wild_ids))
        self.regex = sorted(zip(regex_ids, regex_negated, regexes), key=lambda e: e[0])

    def last_match(self, text, mode):
        ids = [self.hash.get(k) for k in hash_keys_for(text, mode)]
        ids += [i for p, i in self.wild if wildmat_match(p, text)]
        ids += [i for i, neg, rx in self.regex if not neg and rx.search(text) is not None]
        return max(ids + [-1])

    def first_fire(self, text):
        for i, neg, rx in self.regex:
            if (rx.search(text) is not None) != bool(neg):
                return i
        return -1
