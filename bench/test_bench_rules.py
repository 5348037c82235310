"""Benches for the issue "Rule compiler, Cython matching core and binary rule
bundle". pytest-benchmark only reports numbers; nothing here asserts a time
(the asserts check that matcher and baseline AGREE before anything is timed).

Groups (one table each):
  envelope ...        ip + HELO + MAIL + 1 RCPT through the policy API, as the
                      server drives it, at 1k..1M rules; the spamcontrol-style
                      baseline beside it at 1k and 10k
  list ...            badmailfrom ListMatcher.last_match alone (no policy)
  regex ...           a list of only regexes: ListMatcher vs one re alternation
  compile / load / rss  1M (and 100k) rules: compile once, load, RSS
  micro ...           core primitives
"""
from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

import baseline
import rulegen
from conftest import NOTES, RESULTS, record, sizes
from mailfilter.rules import bundle as mfbundle
from mailfilter.rules import compiler
from mailfilter.rules import controlfiles
from mailfilter.core import core
from mailfilter.policy.engine import Client, PolicyEngine, PolicyOptions
from mailfilter.rules.prefilters import required_literal
from mailfilter.rules.regexes import compile_re2

N_ENVELOPES = 4096
_bundles: dict[int, mfbundle.Bundle] = {}


def loaded(n: int) -> mfbundle.Bundle:
    if n not in _bundles:
        _bundles[n] = mfbundle.load(rulegen.ensure_bundle(n))
    return _bundles[n]


def envelopes(n: int):
    return rulegen.make_envelopes(rulegen.load_manifest(rulegen.ensure_rules(n)), N_ENVELOPES)


# ------------------------------------------------------------------ envelope

@pytest.mark.benchmark(group="envelope: ip+helo+from+1 rcpt, per envelope")
@pytest.mark.parametrize("n", sizes(1_000, 10_000, 100_000, 1_000_000))
def test_envelope_policy(benchmark, n):
    engine = PolicyEngine(loaded(n), PolicyOptions())
    envs = itertools.cycle(envelopes(n))

    def one():
        ip, helo, sender, rcpt = next(envs)
        s = engine.session(Client(ip=ip))
        s.connect()
        s.helo(helo)
        s.mail(sender)
        return s.rcpt(rcpt)

    benchmark(one)
    record(benchmark, f"envelope/{n}")


@pytest.mark.benchmark(group="envelope: ip+helo+from+1 rcpt, per envelope")
@pytest.mark.parametrize("n", sizes(1_000, 10_000))
def test_envelope_spamcontrol_baseline(benchmark, n):
    base = baseline.BaselineEngine(rulegen.ensure_rules(n))
    envs_list = envelopes(n)
    # same decisions as the policy engine on every envelope (not a timing check)
    engine = PolicyEngine(loaded(n), PolicyOptions())
    for ip, helo, sender, rcpt in envs_list[:500]:
        s = engine.session(Client(ip=ip))
        s.connect()
        s.helo(helo)
        s.mail(sender)
        v = s.rcpt(rcpt)
        assert (v.accept, v.reason) == base.envelope(ip, helo, sender, rcpt), (ip, helo, sender, rcpt)
    envs = itertools.cycle(envs_list)

    def one():
        return base.envelope(*next(envs))

    benchmark(one)
    record(benchmark, f"baseline/{n}")


@pytest.mark.benchmark(group="envelope core only: cidr + 4 list lookups, no policy objects")
@pytest.mark.parametrize("n", sizes(1_000, 10_000, 100_000, 1_000_000))
def test_envelope_core_lookups(benchmark, n):
    """Lower bound for the envelope: the Cython lookups the policy makes (all
    of them, every time), with socket.inet_pton instead of ipaddress."""
    import socket
    b = loaded(n)
    cidr, bh, bmf, rh, brt = (b.cidr, b.lists["badhelo"], b.lists["badmailfrom"],
                              b.lists["rcpthosts"], b.lists["badrcptto"])
    envs = itertools.cycle(envelopes(n))
    v6 = socket.AF_INET6
    v4 = socket.AF_INET

    def one():
        ip, helo, sender, rcpt = next(envs)
        cidr.lookup(socket.inet_pton(v6 if ":" in ip else v4, ip))
        bh.last_match(helo.encode("latin-1"), 2)
        bmf.last_match(sender.encode("latin-1"), 1)
        r = rcpt.encode("latin-1")
        rh.last_match(r[r.rfind(b"@") + 1:], 2)
        return brt.last_match(r, 1)

    benchmark(one)
    record(benchmark, f"core/{n}")


@pytest.mark.benchmark(group="envelope core only: cidr + 4 list lookups, no policy objects")
@pytest.mark.parametrize("n", sizes(1_000, 10_000, 100_000, 1_000_000))
def test_envelope_core_str_lookups(benchmark, n):
    """The same lookups through the calls the policy makes since issue 13:
    CidrTrie.lookup_text and ListMatcher.listed / last_match_str on the str
    as given (no encode, `!` exceptions tested in C)."""
    b = loaded(n)
    cidr, bh, bmf, rh, brt = (b.cidr, b.lists["badhelo"], b.lists["badmailfrom"],
                              b.lists["rcpthosts"], b.lists["badrcptto"])
    envs = itertools.cycle(envelopes(n))

    def one():
        ip, helo, sender, rcpt = next(envs)
        cidr.lookup_text(ip)
        bh.listed(helo, 2, True)
        bmf.listed(sender, 1)
        rh.last_match_str(rcpt, 2, rcpt.rfind("@") + 1)
        return brt.listed(rcpt, 1)

    benchmark(one)
    record(benchmark, f"core_str/{n}")


# ------------------------------------------------------- one list, no policy

@pytest.mark.benchmark(group="list: badmailfrom last_match, per lookup")
@pytest.mark.parametrize("n", sizes(1_000, 100_000, 1_000_000))
def test_list_badmailfrom(benchmark, n):
    m = loaded(n).lists["badmailfrom"]
    qs = itertools.cycle([q.encode("latin-1") for q in rulegen.list_queries(
        rulegen.load_manifest(rulegen.ensure_rules(n)), "badmailfrom", N_ENVELOPES)])
    benchmark(lambda: m.last_match(next(qs), 1))
    record(benchmark, f"list/{n}")


# -------------------------------------------------------------- regex lists

def _regex_matcher(count: int):
    pats, queries = rulegen.regex_patterns(count)
    ids = list(range(len(pats)))
    blob = core.listmatch_build([], [], [], [], ids, [required_literal(p) for p in pats],
                                [False] * len(pats))
    return pats, core.ListMatcher(blob, [compile_re2(p) for p in pats]), queries


@pytest.mark.benchmark(group="regex: list of N regexes, per lookup")
@pytest.mark.parametrize("count", [100, 1_000, 10_000])
def test_regex_listmatcher(benchmark, count):
    pats, m, queries = _regex_matcher(count)
    for text, hit in queries[:300]:
        assert (m.last_match(text.encode(), 1) >= 0) == hit, text
    qs = itertools.cycle([t.encode() for t, _ in queries])
    benchmark(lambda: m.last_match(next(qs), 1))
    record(benchmark, f"regex_lm/{count}")


@pytest.mark.benchmark(group="regex: list of N regexes, per lookup")
@pytest.mark.parametrize("count", [100, 1_000, 10_000])
def test_regex_stdlib_alternation(benchmark, count):
    pats, queries = rulegen.regex_patterns(count)
    t0 = time.perf_counter()
    alt = baseline.ReAlternation(pats)
    benchmark.extra_info["re_compile_s"] = round(time.perf_counter() - t0, 3)
    for text, hit in queries[:60]:
        assert alt.search(text.encode()) == hit, text
    qs = itertools.cycle([t.encode() for t, _ in queries])
    benchmark(lambda: alt.search(next(qs)))
    record(benchmark, f"regex_re/{count}")


# ------------------------------------------------------ compile, load, RSS

def _compile_to(root: str, out: str) -> dict:
    t0 = time.perf_counter()
    src = controlfiles.read_rules_dir(root)
    t1 = time.perf_counter()
    compiled = compiler.compile_source(src)
    t2 = time.perf_counter()
    size = mfbundle.write(compiled, out)
    t3 = time.perf_counter()
    assert not compiled.diagnostics
    return {"read_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
            "write_s": round(t3 - t2, 2), "bundle_mb": round(size / 1e6, 1),
            "rules": compiled.n_rules}


@pytest.mark.benchmark(group="compile: read + compile + write bundle (once)")
@pytest.mark.parametrize("n", sizes(100_000, 1_000_000))
def test_compile(benchmark, n):
    root = rulegen.ensure_rules(n)
    with tempfile.TemporaryDirectory(dir=rulegen.CACHE_DIR) as tmp:
        out = os.path.join(tmp, "b.mfb")
        phases = benchmark.pedantic(_compile_to, args=(root, out), rounds=1, iterations=1)
    benchmark.extra_info.update(phases)
    RESULTS[f"compile/{n}"] = benchmark.stats.stats.median
    NOTES.append(f"compile {n}: {phases}")


@pytest.mark.benchmark(group="load: bundle.load (mmap, checks, RE2 compile)")
@pytest.mark.parametrize("n", sizes(100_000, 1_000_000))
def test_load(benchmark, n):
    path = rulegen.ensure_bundle(n)
    mfbundle.load(path)                       # page cache warm, as on a SIGHUP reload
    benchmark.pedantic(mfbundle.load, args=(path,), rounds=5, iterations=1)
    record(benchmark, f"load/{n}")


RSS_SCRIPT = r"""
import json, resource, sys, time
def status():
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            d[k] = int(v.split()[0]) / 1024
    return d
from mailfilter.rules import bundle
from mailfilter.policy.engine import PolicyEngine, PolicyOptions
before = status()
t0 = time.perf_counter()
b = bundle.load(sys.argv[1])
e = PolicyEngine(b, PolicyOptions())
t = time.perf_counter() - t0
after = status()
print(json.dumps({"rss_before_mb": before["VmRSS"], "rss_mb": after["VmRSS"],
                  "hwm_mb": after["VmHWM"],
                  "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "cold_load_s": t}))
"""


@pytest.mark.benchmark(group="rss: fresh process, load bundle + PolicyEngine")
@pytest.mark.parametrize("n", sizes(100_000, 1_000_000))
def test_rss_after_load(benchmark, n):
    path = rulegen.ensure_bundle(n)

    def run():
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, path], check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out)

    info = benchmark.pedantic(run, rounds=1, iterations=1)
    info = {k: round(v, 3) for k, v in info.items()}
    benchmark.extra_info.update(info)
    RESULTS[f"rss_mb/{n}"] = info["rss_mb"]
    msg = (f"RSS {n}: {info['rss_mb']:.0f} MB after load (interpreter+imports "
           f"{info['rss_before_mb']:.0f} MB, peak {info['hwm_mb']:.0f} MB, "
           f"load in fresh process {info['cold_load_s'] * 1e3:.0f} ms)")
    NOTES.append(msg)
    print(msg)


# ------------------------------------------------------------------- micro

@pytest.fixture(scope="module")
def micro():
    keys = [f"user{i}@dom{i % 997}.example".encode() for i in range(100_000)]
    ht = core.HashTable(core.hashtab_build(keys, list(range(len(keys)))))
    pats = [f"tok{i}x".encode() for i in range(10_000)]
    aho = core.AhoCorasick(core.aho_build(pats, list(range(len(pats))), True))
    b = loaded(min(100_000, rulegen_max()))
    states = core.cram_states(b"tanstaaftanstaaf")
    challenge = b"<1896.697170952@postoffice.reston.mci.com>"
    good = core.cram_digest(states, challenge).hex().encode()
    return dict(ht=ht, keys=keys, aho=aho, cidr=b.cidr, states=states,
                challenge=challenge, good=good)


def rulegen_max():
    from conftest import BENCH_MAX
    return BENCH_MAX


@pytest.mark.benchmark(group="micro: HashTable.get (100k keys)")
def test_micro_hashtable_hit(benchmark, micro):
    key = micro["keys"][4711].upper()
    assert micro["ht"].get(key) == 4711
    benchmark(micro["ht"].get, key)


@pytest.mark.benchmark(group="micro: HashTable.get (100k keys)")
def test_micro_hashtable_miss(benchmark, micro):
    benchmark(micro["ht"].get, b"nobody@nowhere.example")


@pytest.mark.benchmark(group="micro: HashTable.get (100k keys)")
def test_micro_python_dict_hit_for_scale(benchmark, micro):
    d = {k: i for i, k in enumerate(micro["keys"])}
    key = micro["keys"][4711].upper()
    benchmark(lambda: d.get(key.lower(), -1))


@pytest.mark.benchmark(group="micro: AhoCorasick.find_all (10k patterns, 40 B text)")
def test_micro_aho_find_all(benchmark, micro):
    text = b"someone.tok4711x@mail.tok99x.example.org"
    assert micro["aho"].find_all(text) == [99, 4711]
    benchmark(micro["aho"].find_all, text)


@pytest.mark.benchmark(group="micro: wildmat_match")
@pytest.mark.parametrize("pattern,text", [
    (b"*@*.spam.example", b"someone@mx1.mail.spam.example"),
    (b"[0-9][0-9]*@freemail.example", b"12345abc@freemail.example"),
    (b"*a*a*a*a*a*b", b"a" * 60),
], ids=["suffix", "class", "pathological"])
def test_micro_wildmat(benchmark, pattern, text):
    benchmark(core.wildmat_match, pattern, text)


@pytest.mark.benchmark(group="micro: CidrTrie.lookup (100k-rule bundle)")
@pytest.mark.parametrize("ip", ["198.18.1.2", "fd00::1"], ids=["v4-miss", "v6-miss"])
def test_micro_cidr(benchmark, micro, ip):
    import ipaddress
    packed = ipaddress.ip_address(ip).packed
    benchmark(micro["cidr"].lookup, packed)


@pytest.mark.benchmark(group="micro: CRAM-MD5 verify")
def test_micro_cram_verify(benchmark, micro):
    assert core.cram_verify(micro["states"], micro["challenge"], micro["good"])
    benchmark(core.cram_verify, micro["states"], micro["challenge"], micro["good"])


@pytest.mark.benchmark(group="micro: CRAM-MD5 verify")
def test_micro_stdlib_hmac(benchmark, micro):
    secret, challenge, good = b"tanstaaftanstaaf", micro["challenge"], micro["good"]
    assert hmac.new(secret, challenge, hashlib.md5).hexdigest().encode() == good

    def verify():
        return hmac.compare_digest(hmac.new(secret, challenge, hashlib.md5).hexdigest().encode(), good)

    benchmark(verify)
