"""Instruction counts per envelope under callgrind (stable on a noisy host).

    bench/cg_envelope.sh N [PASSES [STAGE]]   # runs this under callgrind

Loads the cached bundle for N rules, runs one warm-up pass over the bench's
4096 envelopes (lazy RE2 compilation, profile cache), then PASSES more inside
sys.call_tracing, the only code callgrind collects (--toggle-collect): the
total divided by PASSES * 4096 is the cost of one envelope, and
`callgrind_annotate --inclusive=yes` shows where it goes. STAGE (default
"full") times one policy call alone instead: client, session, helo, mail,
rcpt (the latter on sessions that went through the earlier calls; rcpt
repeats on the same session, so rcpt_count and the tarpit counters grow), or
"loop" (the list comprehension's own cost, to subtract).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rulegen  # noqa: E402
from mailfilter.rules import bundle  # noqa: E402
from mailfilter.policy.engine import Client, PolicyEngine, PolicyOptions  # noqa: E402


def main(n: int, passes: int, stage: str = "full") -> None:
    b = bundle.load(rulegen.ensure_bundle(n))
    eng = PolicyEngine(b, PolicyOptions())
    envs = rulegen.make_envelopes(rulegen.load_manifest(rulegen.ensure_rules(n)), 4096)
    sessions = [eng.session(Client(ip=e[0])) for e in envs]
    for s, e in zip(sessions, envs):
        s.helo(e[1])
        s.mail(e[2])
    pairs = list(zip(sessions, envs))

    def run() -> None:
        for ip, helo, sender, rcpt in envs:
            s = eng.session(Client(ip=ip))
            s.connect()
            s.helo(helo)
            s.mail(sender)
            s.rcpt(rcpt)

    # one stage alone, on sessions that went through the earlier stages
    stages = {
        "full": run,
        "loop": lambda: [None for _ in envs],
        "client": lambda: [Client(ip=e[0]) for e in envs],
        "session": lambda: [eng.session(Client(ip=e[0])) for e in envs],
        "helo": lambda: [s.helo(e[1]) for s, e in pairs],
        "mail": lambda: [s.mail(e[2]) for s, e in pairs],
        "rcpt": lambda: [s.rcpt(e[3]) for s, e in pairs],
    }
    run = stages[stage]

    def passes_() -> None:
        for _ in range(passes):
            run()

    run()
    # sys.call_tracing is a C function nothing else calls: cg_envelope.sh
    # collects only inside it (--toggle-collect), so the counts exclude the
    # start-up, the load and the warm-up pass.
    sys.call_tracing(passes_, ())


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:4])
