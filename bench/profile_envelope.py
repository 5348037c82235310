"""Where the time of one envelope goes: per-stage timings and a cProfile.

    .venv/bin/python bench/profile_envelope.py [N]      # default 100000

Stage timings: each policy call (session+connect, helo, mail, rcpt) timed over
the same envelope mix as the bench, median per call; then the raw matcher
calls those stages make (the engine's bound ListMatcher.listed /
last_match_str, CidrTrie.lookup_text); then cProfile of 20k envelopes
sorted by tottime. Repeated mail()/rcpt() calls on one session include a
transaction reset and the RCPT history rows, which a fresh envelope skips.
"""
from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rulegen  # noqa: E402
from mailfilter.rules import bundle  # noqa: E402
from mailfilter.policy.engine import Client, PolicyEngine, PolicyOptions  # noqa: E402


def med_ns(fn, items, reps=5):
    best = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        for it in items:
            fn(it)
        best.append((time.perf_counter_ns() - t0) / len(items))
    return statistics.median(best)


def main(n: int) -> None:
    b = bundle.load(rulegen.ensure_bundle(n))
    eng = PolicyEngine(b, PolicyOptions())
    envs = rulegen.make_envelopes(rulegen.load_manifest(rulegen.ensure_rules(n)), 4096)

    def full(e):
        s = eng.session(Client(ip=e[0]))
        s.connect()
        s.helo(e[1])
        s.mail(e[2])
        s.rcpt(e[3])

    sessions = [eng.session(Client(ip=e[0])) for e in envs]
    pairs = list(zip(sessions, envs))
    for s, e in pairs:
        s.helo(e[1])
        s.mail(e[2])
    print(f"N={n}: ns per call (median of 5 passes over {len(envs)} envelopes)")
    rows = [
        ("full envelope", lambda e: full(e), envs),
        ("Client(ip=...)", lambda e: Client(ip=e[0]), envs),
        ("engine.session(client)", lambda e: eng.session(Client(ip=e[0])), envs),
        ("  engine.client_rule", lambda e: eng.client_rule(Client(ip=e[0])), envs),
        ("  cidr.lookup_text", lambda e: eng.cidr.lookup_text(e[0]), envs),
        ("s.connect()", lambda p: p[0].connect(), pairs),
        ("s.helo(name)", lambda p: p[0].helo(p[1][1]), pairs),
        ("  badhelo.listed", lambda e: eng.badhelo_listed(e[1], 2, True), envs),
        ("s.mail(sender)", lambda p: p[0].mail(p[1][2]), pairs),
        ("  badmailfrom.listed", lambda e: eng.badmailfrom_listed(e[2], 1), envs),
        ("s.rcpt(rcpt)", lambda p: p[0].rcpt(p[1][3]), pairs),
        ("  rcpthosts.last_match_str", lambda e: eng.rcpthosts_last(e[3], 2, e[3].rfind("@") + 1), envs),
        ("  badrcptto.listed", lambda e: eng.badrcptto_listed(e[3], 1), envs),
    ]
    for name, fn, items in rows:
        print(f"  {name:<34} {med_ns(fn, items):>9.0f}")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(5):
        for e in envs:
            full(e)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
