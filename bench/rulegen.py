"""Seeded generator of realistic rules directories and matching queries.

`ensure_rules(n, seed)` writes (once, then reuses) a spamcontrol-dialect rules
directory of about `n` entries under bench/.cache/rules-<n>-<seed>/ and returns
its path; `ensure_bundle(n, seed)` compiles it once to a cached bundle file.
`load_manifest(dir)` + `make_envelopes(manifest, count, seed)` give envelopes
(ip, helo, sender, rcpt) mixing hits on every entry kind with misses.

Entry mix (percent of n, spread over the files the way real lists look):

  kind          total  badmailfrom badrcptto badhelo rcpthosts tcp.smtp
  exact          60       38         10        7        5
  @dom/.suffix   25      9+5          2        3        6
  wildmat        10        6          2        2
  regex           1      0.6        0.2      0.2
  CIDR            4                                            4 (IPv4+IPv6)

Regexes are RE2- and Python-`re`-compatible; almost all carry a distinctive
literal fragment (the Aho-Corasick prefilter keys on it). A FIXED handful per
list has no usable literal (or only "@"), so they are candidates for every
lookup, as in real lists, whose count does not grow with the list size.
Likewise three wildmats in badrcptto (`*%*`, `*!*`, `*@*@*`) are relay-probe
patterns whose literal is in nearly every address.

Everything derives from random.Random(seed): the same (n, seed) gives the same
bytes. GEN_VERSION is part of the cache key; bump it when the output changes.
"""
from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import sys
from typing import Callable, NamedTuple

GEN_VERSION = 2     # 2: no two tcp.smtp lines with the same key (a diagnostic since then)
CACHE_DIR = os.environ.get(
    "MAILFILTER_BENCH_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache"))

N_SAMPLES = 400          # hit material kept per (file, kind) in the manifest
NOLIT_REGEX_PER_LIST = 2  # fixed, independent of n

SPAM_SYL = ("pro", "mo", "deal", "cash", "win", "pil", "lo", "max", "bul", "ka",
            "zor", "vex", "qui", "tra", "fin", "loan", "rx", "ga", "bet", "sl")
OK_SYL = ("an", "be", "co", "da", "el", "fa", "gu", "hi", "jo", "ke", "li", "mu")
SPAM_TLD = ("com", "net", "info", "biz", "ru", "cn", "xyz", "top", "click", "work")
OUR_TLD = ("com", "net", "org", "de", "co.uk")
LOCALS = ("info", "sales", "news", "offer", "promo", "admin", "mail", "contact",
          "support", "noreply", "bounce", "list", "john", "anna", "team")


class _Gen:
    def __init__(self, seed: int):
        self.r = random.Random(seed)
        self.serial = 0

    def word(self, syl=SPAM_SYL, lo=2, hi=4) -> str:
        r = self.r
        return "".join(r.choice(syl) for _ in range(r.randint(lo, hi)))

    def token(self) -> str:
        """A unique spam token, e.g. `dealzor4711`."""
        self.serial += 1
        return f"{self.word()}{self.serial}"

    def spam_domain(self) -> str:
        return f"{self.token()}.{self.r.choice(SPAM_TLD)}"

    def local(self) -> str:
        r = self.r
        base = r.choice(LOCALS) if r.random() < 0.5 else self.word(lo=1, hi=3)
        return base + (str(r.randint(1, 9999)) if r.random() < 0.5 else "")


# ----------------------------------------------------------------- templates
# each returns (entry line, hit example) ; hit examples are folded already

def _wild_badmailfrom(g: _Gen):
    t, tld = g.token(), g.r.choice(SPAM_TLD)
    k = g.r.randrange(5)
    if k == 0:
        return f"*@*.{t}.{tld}", f"{g.local()}@mx{g.r.randint(1, 99)}.{t}.{tld}"
    if k == 1:
        return f"[0-9][0-9]*@{t}.{tld}", f"{g.r.randint(10, 99999)}{g.local()}@{t}.{tld}"
    if k == 2:
        return f"{t}-*@*", f"{t}-{g.local()}@{g.spam_domain()}"
    if k == 3:
        return f"*@{t}?.{tld}", f"{g.local()}@{t}{g.r.randint(0, 9)}.{tld}"
    return f"[a-z]*.{t}@*.{tld}", f"ab.{t}@{g.word()}.{tld}"


def _wild_badrcptto(g: _Gen, ours: list[str]):
    t = g.token()
    dom = g.r.choice(ours)
    if g.r.random() < 0.5:
        return f"{t}*@{dom}", f"{t}{g.r.randint(0, 999)}@{dom}"
    return f"*.{t}@*", f"x.{t}@{dom}"


def _wild_badhelo(g: _Gen):
    t, tld = g.token(), g.r.choice(SPAM_TLD)
    k = g.r.randrange(3)
    if k == 0:
        return f"*.{t}.{tld}", f"host{g.r.randint(1, 999)}.{t}.{tld}"
    if k == 1:
        return f"{t}[0-9]*.{tld}", f"{t}{g.r.randint(0, 999)}.{tld}"
    return f"*-{t}-*", f"dsl-{t}-{g.r.randint(1, 254)}.isp.{tld}"


def _regex_badmailfrom(g: _Gen):
    t, tld = g.token(), g.r.choice(SPAM_TLD)
    k = g.r.randrange(4)
    if k == 0:
        return f"^{t}[0-9]+@", f"{t}{g.r.randint(0, 99999)}@{g.spam_domain()}"
    if k == 1:
        return (f"@([a-z0-9-]+\\.)*{t}\\.{tld}$",
                f"{g.local()}@{g.word()}.{t}.{tld}")
    if k == 2:
        return f"^[a-z]{{3,8}}\\.{t}@", f"abcd.{t}@{g.spam_domain()}"
    return f"{t}-(news|promo|info)@", f"{t}-promo@{g.spam_domain()}"


def _regex_badrcptto(g: _Gen, ours: list[str]):
    t = g.token()
    return f"^{t}[0-9]*@", f"{t}{g.r.randint(0, 99)}@{g.r.choice(ours)}"


def _regex_badhelo(g: _Gen):
    t, tld = g.token(), g.r.choice(SPAM_TLD)
    if g.r.random() < 0.5:
        return f"^{t}[0-9]*\\.{tld}$", f"{t}{g.r.randint(0, 99)}.{tld}"
    return f"\\.{t}\\.", f"mail.{t}.{tld}"


# regexes without a usable literal (or only "@"): fixed few per list; chosen
# so that the miss queries of make_envelopes never match them
NOLIT = {
    "badmailfrom": [("^[a-z0-9]{40,}@", "a" * 41 + "@x.com"),
                    ("^[0-9]{12,}@", "123456789012@x.com")],
    "badrcptto": [("^[0-9]{12,}@", "123456789012@x.com"),
                  ("^[^@]*[%!][^@]*@", "a%b@x.com")],
    "badhelo": [("^[0-9]+(\\.[0-9]+){3}$", "10.1.2.3"),
                ("^[0-9]{1,3}-[0-9]{1,3}-[0-9]{1,3}-[0-9]{1,3}$", "10-1-2-3")],
}


def _ip_net(g: _Gen) -> tuple[str, str]:
    """(tcp.smtp key, an address inside it) avoiding 198.18.0.0/15 and fd00::/8."""
    r = g.r
    if r.random() < 0.75:
        while True:
            a = r.randint(1, 223)
            if a not in (10, 127, 198):
                break
        addr = ipaddress.IPv4Address((a << 24) | r.getrandbits(24))
        k = r.random()
        if k < 0.10:                                   # qmail dotted prefix /24
            o = str(addr).split(".")
            key = ".".join(o[:3]) + "."
            return key, ".".join(o[:3] + [str(r.randint(0, 255))])
        if k < 0.20:                                   # single address
            return str(addr), str(addr)
        if k < 0.23:                                   # last-octet range
            o = str(addr).split(".")
            lo = r.randint(0, 200)
            hi = lo + r.randint(1, 50)
            return f"{'.'.join(o[:3])}.{lo}-{hi}", f"{'.'.join(o[:3])}.{r.randint(lo, hi)}"
        plen = r.choice((16, 20, 22, 24, 24, 24, 26, 28, 29, 30))
        net = ipaddress.IPv4Network(f"{addr}/{plen}", strict=False)
        host = net.network_address + r.randrange(net.num_addresses)
        return f"{net.network_address}/{plen}", str(host)
    # IPv6 inside 2000::/4 minus nothing we query as a miss (misses use fd00::/8)
    base = (0x2 << 124) | r.getrandbits(124)
    plen = r.choice((32, 40, 48, 48, 56, 64, 64, 64, 128))
    net = ipaddress.IPv6Network((base, plen), strict=False)
    host = int(net.network_address) | (r.getrandbits(128 - plen) if plen < 128 else 0)
    return f"{net.network_address}/{plen}", str(ipaddress.IPv6Address(host))


def _key_networks(key: str) -> frozenset:
    """The networks a generated tcp.smtp key stands for (as the compiler sees
    them: a dotted prefix, one address, a last-octet range, a CIDR block)."""
    if key.endswith("."):
        return frozenset([ipaddress.ip_network(key + "0/24")])
    if "-" in key:
        head, _, hi = key.rpartition("-")
        lo_addr = ipaddress.IPv4Address(head)
        hi_addr = ipaddress.IPv4Address(head.rsplit(".", 1)[0] + "." + hi)
        return frozenset(ipaddress.summarize_address_range(lo_addr, hi_addr))
    return frozenset([ipaddress.ip_network(key, strict=False)])


TCP_SETTINGS = [
    (0.55, "deny", True),                               # known-bad ranges
    (0.20, 'allow,RELAYCLIENT=""', False),              # our relay networks
    (0.10, 'allow,HELOCHECK="",TARPITCOUNT="5",TARPITDELAY="2"', False),
    (0.10, "allow", False),                             # trusted, no checks
    (0.05, 'allow,HELOCHECK="",DATABYTES="1000000",MAXRECIPIENTS="20"', False),
]


# ----------------------------------------------------------------- the lists
# One table (LISTS) says what each file holds; one loop (generate) writes it.
# The order of the lists and of their rows is the order in which the seeded
# random stream is consumed: reordering them changes the output (bump
# GEN_VERSION).

class _Row(NamedTuple):
    """One kind of entry in one file."""
    kind: str
    share: float                 # of n
    make: Callable               # _Run -> (entry, hit example or None: no sample)
    reserve: int = 0             # entries of this kind that are fixed, not generated
    then: Callable | None = None  # (_Run, file, entry), after the entry's sample is kept


class _List(NamedTuple):
    """One file: its generated rows, shuffled (or not), then the fixed parts."""
    name: str
    rows: tuple
    shuffle: bool = True
    head: tuple = ()             # fixed first entries: (entry, kind, hit template or None)
    nolit: tuple = ()            # regexes without a literal, inserted at random places
    tail: tuple = ()             # fixed last entries


class _Run:
    """What one generate() call shares between the entry makers."""

    def __init__(self, n: int, seed: int) -> None:
        self.g = g = _Gen(seed)
        self.r = r = g.r
        self.counts = {(spec.name, row.kind): max(1, round(n * row.share))
                       for spec in LISTS for row in spec.rows}
        # our own domains first: rcpthosts lists them and badrcptto refers to them
        self.our_hosts = [f"{g.word(OK_SYL)}{i}.{r.choice(OUR_TLD)}"
                          for i in range(self.counts[("rcpthosts", "host")])]
        self.our_suffixes = [f".{g.word(OK_SYL)}{i}.{r.choice(OUR_TLD)}"
                             for i in range(self.counts[("rcpthosts", "suffix")])]
        self.ours_sample = self.our_hosts[: max(50, min(len(self.our_hosts), 5000))]
        self.spam_domains = [g.spam_domain() for _ in
                             range(max(10, self.counts[("badmailfrom", "exact")] // 8))]
        self.hosts = enumerate(self.our_hosts)
        self.suffixes = enumerate(self.our_suffixes)
        self.seen_nets: set = set()
        self.trailer: dict[str, list[str]] = {spec.name: [] for spec in LISTS}
        self.samples: dict[str, dict[str, list]] = {spec.name: {} for spec in LISTS}

    def keep(self, f: str, kind: str, hit) -> None:
        lst = self.samples[f].setdefault(kind, [])
        if len(lst) < N_SAMPLES:
            lst.append(hit)
        else:                                          # reservoir-ish: stay spread out
            j = self.r.randrange(len(lst) * 4)
            if j < len(lst):
                lst[j] = hit


def _slashed(pair: tuple[str, str]) -> tuple[str, str]:
    """A regex template's (pattern, hit) as a list entry `/pattern/`."""
    return f"/{pair[0]}/", pair[1]


def _exact_badmailfrom(run: _Run):
    g = run.g
    a = f"{g.local()}.{g.serial}@{g.r.choice(run.spam_domains)}"
    g.serial += 1
    return a, a


def _exact_badrcptto(run: _Run):
    g = run.g
    a = f"{g.local()}-{g.serial}@{g.r.choice(run.ours_sample)}"
    g.serial += 1
    return a, a


def _exact_badhelo(run: _Run):
    g = run.g
    h = f"{g.word()}{g.serial}.{g.r.choice(SPAM_TLD)}"
    g.serial += 1
    return h, h


def _domain(run: _Run):
    d = run.g.spam_domain()
    return "@" + d, f"{run.g.local()}@{d}"


def _exception(run: _Run, f: str, entry: str) -> None:
    """Now and then an `@dom` gets a `!postmaster@dom` exception, listed
    after everything else (the file's trailer)."""
    if run.r.random() < 0.02:
        d = entry[1:]
        run.trailer[f].append(f"!postmaster@{d}")
        run.keep(f, "exception", f"postmaster@{d}")


def _suffix_badmailfrom(run: _Run):
    g = run.g
    d = g.spam_domain()
    return "." + d, f"{g.local()}@{g.word()}.{d}"


def _suffix_badhelo(run: _Run):
    d = run.g.spam_domain()
    return "." + d, f"mx{run.r.randint(1, 9)}.{d}"


def _our_host(run: _Run):
    """The next of our hosts; the first N_SAMPLES are the samples."""
    i, h = next(run.hosts)
    return h, (h if i < N_SAMPLES else None)


def _our_suffix(run: _Run):
    i, s = next(run.suffixes)
    return s, (f"mail{s}" if i < N_SAMPLES else None)


def _tcp_rule(run: _Run):
    """A tcp.smtp line whose networks overlap no earlier line's (a repeated
    key would be a compiler diagnostic), with an action drawn by share."""
    while True:
        key, hit = _ip_net(run.g)
        nets = _key_networks(key)
        if not nets & run.seen_nets:
            break
    run.seen_nets |= nets
    x, acc = run.r.random(), 0.0
    for share, action, _deny in TCP_SETTINGS:
        acc += share
        if x < acc:
            break
    return f"{key}:{action}", hit


# badrcptto starts with relay probes (fixed): `*%*`, `*!*`, `*@*@*`
PROBES = (("*%*", "wildmat", "a%b@{our}"), ("*!*", "wildmat", None),
          ("*@*@*", "wildmat", None))

LISTS = (
    _List("badmailfrom", (
        _Row("exact", 0.38, _exact_badmailfrom),
        _Row("domain", 0.09, _domain, then=_exception),
        _Row("suffix", 0.05, _suffix_badmailfrom),
        _Row("wildmat", 0.06, lambda run: _wild_badmailfrom(run.g)),
        _Row("regex", 0.006, lambda run: _slashed(_regex_badmailfrom(run.g)),
             reserve=len(NOLIT["badmailfrom"])),
    ), nolit=tuple(NOLIT["badmailfrom"])),
    _List("badrcptto", (
        _Row("exact", 0.10, _exact_badrcptto),
        _Row("domain", 0.02, _domain),
        _Row("wildmat", 0.02, lambda run: _wild_badrcptto(run.g, run.ours_sample),
             reserve=len(PROBES)),
        _Row("regex", 0.002, lambda run: _slashed(_regex_badrcptto(run.g, run.ours_sample)),
             reserve=len(NOLIT["badrcptto"])),
    ), head=PROBES, nolit=tuple(NOLIT["badrcptto"])),
    _List("badhelo", (
        _Row("exact", 0.07, _exact_badhelo),
        _Row("suffix", 0.03, _suffix_badhelo),
        _Row("wildmat", 0.02, lambda run: _wild_badhelo(run.g)),
        _Row("regex", 0.002, lambda run: _slashed(_regex_badhelo(run.g)),
             reserve=len(NOLIT["badhelo"])),
    ), nolit=tuple(NOLIT["badhelo"])),
    _List("rcpthosts", (
        _Row("host", 0.05, _our_host),
        _Row("suffix", 0.06, _our_suffix),
    )),
    _List("tcp.smtp", (
        _Row("cidr", 0.04, _tcp_rule),
    ), shuffle=False, tail=('127.0.0.1:allow,RELAYCLIENT=""',
                            ':allow,HELOCHECK="",MAXRECIPIENTS="100"')),
)


def generate(root: str, n: int, seed: int) -> dict:
    """Write the rules directory `root` (must not exist) and return the manifest."""
    run = _Run(n, seed)
    files: dict[str, list[str]] = {}
    for spec in LISTS:
        bulk = []
        for row in spec.rows:
            for _ in range(max(0, run.counts[(spec.name, row.kind)] - row.reserve)):
                entry, hit = row.make(run)
                bulk.append(entry)
                if hit is not None:
                    run.keep(spec.name, row.kind, hit)
                if row.then is not None:
                    row.then(run, spec.name, entry)
        if spec.shuffle:
            run.r.shuffle(bulk)
        out = files[spec.name] = [entry for entry, _kind, _hit in spec.head] + bulk
        for _entry, kind, hit in spec.head:
            if hit is not None:
                run.keep(spec.name, kind, hit.format(our=run.ours_sample[0]))
        for e, hit in spec.nolit:
            out.insert(run.r.randrange(len(out) + 1), f"/{e}/")
            run.keep(spec.name, "regex_nolit", hit)
        out += run.trailer[spec.name] + list(spec.tail)

    os.makedirs(root)
    for name, lines in files.items():
        with open(os.path.join(root, name), "w", encoding="latin-1") as fh:
            fh.write(f"# generated by bench/rulegen.py n={n} seed={seed}\n")
            fh.write("\n".join(lines))
            fh.write("\n")
    for name, value in (("me", "mx.bench.example"), ("dialect", "spamcontrol"),
                        ("databytes", "10485760")):
        with open(os.path.join(root, name), "w") as fh:
            fh.write(value + "\n")
    total = sum(len(v) for v in files.values())
    manifest = {
        "n": n, "seed": seed, "gen_version": GEN_VERSION, "entries": total,
        "per_file": {k: len(v) for k, v in files.items()},
        "per_kind": {f"{f}/{k}": c for (f, k), c in run.counts.items()},
        "samples": run.samples,
    }
    with open(os.path.join(root, "manifest.json"), "w") as fh:
        json.dump(manifest, fh)
    return manifest


# ------------------------------------------------------------------- caching

def rules_dir(n: int, seed: int = 1) -> str:
    return os.path.join(CACHE_DIR, f"rules-v{GEN_VERSION}-{n}-{seed}")


def ensure_rules(n: int, seed: int = 1) -> str:
    """Path of the cached rules dir for (n, seed), generated on first use."""
    root = rules_dir(n, seed)
    if os.path.exists(os.path.join(root, "manifest.json")):
        return root
    if os.path.exists(root):
        shutil.rmtree(root)
    tmp = root + f".tmp{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(CACHE_DIR, exist_ok=True)
    generate(tmp, n, seed)
    os.replace(tmp, root)
    return root


def ensure_bundle(n: int, seed: int = 1) -> str:
    """Path of the cached compiled bundle for (n, seed); compiled on first use
    or when the bundle format changed (the file does not load)."""
    from mailfilter.rules import bundle
    from mailfilter.rules import compiler
    from mailfilter.rules import controlfiles

    root = ensure_rules(n, seed)
    path = f"{root}.v{bundle.FORMAT_VERSION}.mfb"
    if os.path.exists(path):
        try:
            bundle.load(path)
            return path
        except bundle.BundleError:
            os.unlink(path)
    compiled = compiler.compile_source(controlfiles.read_rules_dir(root))
    if compiled.diagnostics:
        raise RuntimeError("generated rules have diagnostics: "
                           + "; ".join(map(str, compiled.diagnostics[:5])))
    bundle.write(compiled, path)
    return path


def load_manifest(root: str) -> dict:
    with open(os.path.join(root, "manifest.json")) as fh:
        return json.load(fh)


# ------------------------------------------------------------------- queries

def _miss_ip(r: random.Random) -> str:
    if r.random() < 0.8:
        return str(ipaddress.IPv4Address((198 << 24) | (18 << 16) | r.getrandbits(17)))
    return str(ipaddress.IPv6Address((0xfd << 120) | r.getrandbits(120)))


def _miss_word(r: random.Random) -> str:
    return "".join(r.choice(OK_SYL) for _ in range(r.randint(2, 4))) + str(r.randint(1, 999))


def make_envelopes(manifest: dict, count: int, seed: int = 2, hit_rate: float = 0.3,
                   foreign_rcpt: float = 0.1) -> list[tuple[str, str, str, str]]:
    """`count` envelopes (ip, helo, sender, rcpt). Each of ip/helo/sender/rcpt
    is, with probability `hit_rate`, taken from a listed entry of its file (kind
    chosen at random among the kinds present); otherwise a miss. The recipient
    domain is one of ours (rcpthosts) except with probability `foreign_rcpt`."""
    r = random.Random(seed)
    s = manifest["samples"]

    def hit(f: str) -> str:
        kinds = sorted(s[f])
        return r.choice(s[f][r.choice(kinds)])

    ours = s["rcpthosts"]["host"] + s["rcpthosts"]["suffix"]
    out = []
    for _ in range(count):
        ip = hit("tcp.smtp") if r.random() < hit_rate else _miss_ip(r)
        helo = hit("badhelo") if r.random() < hit_rate else f"mail.{_miss_word(r)}.example"
        sender = (hit("badmailfrom") if r.random() < hit_rate
                  else f"{_miss_word(r)}@{_miss_word(r)}.example")
        if r.random() < hit_rate:
            rcpt = hit("badrcptto")
        elif r.random() < foreign_rcpt:
            rcpt = f"{_miss_word(r)}@{_miss_word(r)}.example"
        else:
            rcpt = f"{_miss_word(r)}@{r.choice(ours)}"
        out.append((ip, helo, sender, rcpt))
    return out


def list_queries(manifest: dict, name: str, count: int, seed: int = 3,
                 hit_rate: float = 0.3) -> list[str]:
    """Texts to look up in one list (addresses or host names)."""
    r = random.Random(seed)
    s = manifest["samples"][name]
    kinds = sorted(s)
    out = []
    for _ in range(count):
        if r.random() < hit_rate:
            out.append(r.choice(s[r.choice(kinds)]))
        elif name == "badhelo":
            out.append(f"mail.{_miss_word(r)}.example")
        else:
            out.append(f"{_miss_word(r)}@{_miss_word(r)}.example")
    return out


# ------------------------------------------------- regex-only list (bench 2)

def regex_patterns(count: int, seed: int = 4) -> tuple[list[str], list[tuple[str, bool]]]:
    """`count` badmailfrom-style regexes (a fixed 2 without literal) and
    queries [(text, is_hit)] mixing hits and misses."""
    g = _Gen(seed)
    pats, hits = [], []
    for _ in range(count - len(NOLIT["badmailfrom"])):
        p, h = _regex_badmailfrom(g)
        pats.append(p)
        hits.append(h)
    for p, h in NOLIT["badmailfrom"]:
        pats.insert(g.r.randrange(len(pats) + 1), p)
        hits.append(h)
    r = random.Random(seed + 1)
    queries = []
    for _ in range(2000):
        if r.random() < 0.3:
            queries.append((r.choice(hits), True))
        else:
            queries.append((f"{_miss_word(r)}@{_miss_word(r)}.example", False))
    return pats, queries


if __name__ == "__main__":
    import time
    for arg in sys.argv[1:] or ["1000"]:
        t0 = time.perf_counter()
        d = ensure_rules(int(arg))
        t1 = time.perf_counter()
        b = ensure_bundle(int(arg))
        print(f"{d} ({t1 - t0:.1f} s)  {b} ({time.perf_counter() - t1:.1f} s, "
              f"{os.path.getsize(b) / 1e6:.1f} MB)")
