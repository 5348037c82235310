"""Baselines the compiled matcher is measured against.

1. spamcontrol style (`ScanList`, `BaselineEngine`): like spamcontrol's
   bmcheck() in C, every lookup walks EVERY line of the list in file order:
   exact compare (plain, `@domain`, `.suffix`), else a wildmat match of the
   whole folded text, else `re.search` for `/regex/` lines; the last matching
   line wins, a `!` line as last match means "not listed".
   Wildmat lines are translated once, at load, to an anchored Python regex
   (same semantics: `*`, `?`, `[..]`, `[^..]`, `\\x`), i.e. what
   fnmatch.fnmatchcase does with its cache, but with INN wildmat syntax. That
   runs the per-line match in C, so this baseline is FASTER than a line-by-line
   Python port of wildmat.c (`wildmat_py` below, kept as the reference) and the
   speed-up figures against it are conservative.
   rcpthosts is a hash lookup (qmail's constmap) and tcp.smtp one hashed lookup
   per prefix length (tcpserver's cdb), as in qmail: only the pattern lists
   badmailfrom / badrcptto / badhelo are scanned.

2. stdlib `re` alternation (`ReAlternation`): all patterns of a list in one
   `re.compile("|".join(f"(?:{p})" ...), re.I)`; answers only "listed or not".
"""
from __future__ import annotations

import ipaddress
import os
import re

from mailfilter.rules import controlfiles as cf

WILDMAT_CHARS = frozenset("*?[\\")


def wildmat_py(p: str, t: str) -> bool:
    """Reference INN/spamcontrol wildmat (folded input), iterative star backtrack."""
    pi = ti = 0
    star_p = star_t = -1
    while ti < len(t):
        if pi < len(p):
            c = p[pi]
            if c == "*":
                while pi < len(p) and p[pi] == "*":
                    pi += 1
                if pi == len(p):
                    return True
                star_p, star_t = pi, ti
                continue
            if c == "?":
                pi += 1
                ti += 1
                continue
            if c == "[":
                j = pi + 1
                neg = j < len(p) and p[j] == "^"
                if neg:
                    j += 1
                ok = False
                first = True
                while j < len(p) and (p[j] != "]" or first):
                    first = False
                    lo = p[j + 1] if p[j] == "\\" and j + 1 < len(p) else p[j]
                    j += 2 if p[j] == "\\" else 1
                    if j + 1 < len(p) and p[j] == "-" and p[j + 1] != "]":
                        hi = p[j + 1]
                        j += 2
                        ok |= lo <= t[ti] <= hi
                    else:
                        ok |= lo == t[ti]
                if j >= len(p):
                    return False
                if ok != neg:
                    pi = j + 1
                    ti += 1
                    continue
            else:
                lit = c
                if c == "\\" and pi + 1 < len(p):
                    lit = p[pi + 1]
                    pi += 1
                if lit == t[ti]:
                    pi += 1
                    ti += 1
                    continue
        if star_p < 0:
            return False
        star_t += 1
        pi, ti = star_p, star_t
    while pi < len(p) and p[pi] == "*":
        pi += 1
    return pi == len(p)


def wildmat_to_re(p: str) -> str:
    """INN wildmat -> Python regex source matching the whole text."""
    out = []
    i, n = 0, len(p)
    while i < n:
        c = p[i]
        if c == "*":
            while i < n and p[i] == "*":
                i += 1
            out.append(".*")
            continue
        if c == "?":
            out.append(".")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(p[i]))
        elif c == "[":
            j = i + 1
            cls = ["["]
            if j < n and p[j] == "^":
                cls.append("^")
                j += 1
            first = True
            while j < n and (p[j] != "]" or first):
                first = False
                ch = p[j]
                if ch == "\\" and j + 1 < n:
                    j += 1
                    ch = p[j]
                    cls.append(re.escape(ch))
                elif ch == "-":
                    cls.append("-")
                elif ch in "[]^\\":
                    cls.append("\\" + ch)
                else:
                    cls.append(ch)
                j += 1
            cls.append("]")
            out.append("".join(cls))
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


# entry kinds of ScanList
EXACT, DOMAIN, SUFFIX, WILD, REGEX = range(5)
MODE_EXACT, MODE_ADDRESS, MODE_HOST = 0, 1, 2


def read_lines(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="latin-1") as fh:
        return [ln.rstrip(" \t\r\n") for ln in fh
                if ln.rstrip(" \t\r\n") and not ln.startswith("#")]


class ScanList:
    """One spamcontrol pattern list, scanned line by line on every lookup."""

    def __init__(self, lines: list[str]):
        self.entries: list[tuple[int, object, bool]] = []
        for text in lines:
            exc = text.startswith("!")
            body = text[1:] if exc else text
            if len(body) >= 2 and body[0] == "/" and body[-1] == "/":
                self.entries.append((REGEX, re.compile(body[1:-1], re.I), exc))
            elif any(c in WILDMAT_CHARS for c in body):
                self.entries.append((WILD, re.compile(wildmat_to_re(body.lower()), re.S), exc))
            elif body.startswith("@"):
                self.entries.append((DOMAIN, body.lower(), exc))
            elif body.startswith("."):
                self.entries.append((SUFFIX, body.lower(), exc))
            else:
                self.entries.append((EXACT, body.lower(), exc))

    def __len__(self) -> int:
        return len(self.entries)

    def last_match(self, text: str, mode: int) -> int:
        """Index of the last matching line, -1 if none (every line is tried)."""
        t = text.lower()
        if mode == MODE_ADDRESS and "@" in t:
            dom = t[t.rfind("@") + 1:]
            at_dom = "@" + dom
        else:
            dom = t if mode == MODE_HOST else None
            at_dom = None
        last = -1
        for i, (kind, data, _exc) in enumerate(self.entries):
            if kind == EXACT:
                if t == data:
                    last = i
            elif kind == DOMAIN:
                if at_dom == data or t == data:
                    last = i
            elif kind == SUFFIX:
                if (dom is not None and dom.endswith(data)) or t == data:
                    last = i
            elif kind == WILD:
                if data.fullmatch(t):
                    last = i
            elif data.search(text):
                last = i
        return last

    def listed(self, text: str, mode: int) -> bool:
        i = self.last_match(text, mode)
        return i >= 0 and not self.entries[i][2]


class BaselineEngine:
    """The envelope decision of mailfilter.policy.engine for the generated rule sets
    (spamcontrol dialect; settings RELAYCLIENT / HELOCHECK="" / deny), with
    spamcontrol-style scanned lists. envelope() returns the RCPT verdict as
    (accept, reason) with policy's reason names."""

    def __init__(self, root: str):
        self.badmailfrom = ScanList(read_lines(os.path.join(root, "badmailfrom")))
        self.badrcptto = ScanList(read_lines(os.path.join(root, "badrcptto")))
        self.badhelo = ScanList(read_lines(os.path.join(root, "badhelo")))
        self.rcpthosts = {ln.lower() for ln in read_lines(os.path.join(root, "rcpthosts"))}
        self.tcp: dict[tuple[int, int], dict[int, tuple[bool, dict]]] = {}
        self.default: tuple[bool, dict] | None = None
        for ln in cf.significant_lines("tcp.smtp", open(os.path.join(root, "tcp.smtp"), "rb").read()):
            rule = cf.parse_tcp_rule(ln)
            val = (rule.allow, dict(rule.env))
            if rule.kind == "default":
                self.default = val
                continue
            for net in rule.networks:
                key = (net.version, net.prefixlen)
                self.tcp.setdefault(key, {})[int(net.network_address) >> (net.max_prefixlen - net.prefixlen)] = val
        self.plens = {v: sorted((p for (ver, p) in self.tcp if ver == v), reverse=True) for v in (4, 6)}

    def client(self, ip: str) -> tuple[bool, dict]:
        a = ipaddress.ip_address(ip)
        bits, x = a.max_prefixlen, int(a)
        for p in self.plens[a.version]:
            hit = self.tcp[(a.version, p)].get(x >> (bits - p))
            if hit is not None:
                return hit
        return self.default or (True, {})

    def rcpthost_ok(self, rcpt: str) -> bool:
        if "@" not in rcpt:
            return True
        dom = rcpt[rcpt.rfind("@") + 1:].lower()
        if dom in self.rcpthosts:
            return True
        dot = dom.find(".")
        while dot >= 0:
            if dom[dot:] in self.rcpthosts:
                return True
            dot = dom.find(".", dot + 1)
        return False

    def envelope(self, ip: str, helo: str, sender: str, rcpt: str) -> tuple[bool, str]:
        allow, settings = self.client(ip)
        relay = "RELAYCLIENT" in settings
        bad_helo = "HELOCHECK" in settings and self.badhelo.listed(helo, MODE_HOST)
        bad_sender = bool(sender) and self.badmailfrom.listed(sender, MODE_ADDRESS)
        if not allow:
            return False, "client_denied"
        if not relay:
            if bad_helo:
                return False, "bad_helo"
            if not self.rcpthost_ok(rcpt):
                return False, "rcpthosts"
        if bad_sender:
            return False, "badmailfrom"
        if self.badrcptto.listed(rcpt, MODE_ADDRESS):
            return False, "badrcptto"
        return True, "relay_client" if relay else "ok"


class ReAlternation:
    """All regexes of a list as one stdlib alternation (bytes, re.I)."""

    def __init__(self, patterns: list[str]):
        self.rx = re.compile("|".join(f"(?:{p})" for p in patterns).encode("latin-1"), re.I)

    def search(self, text: bytes) -> bool:
        return self.rx.search(text) is not None
