#!/bin/sh
# Instructions (and, with CACHESIM=1, cache misses) per envelope under
# callgrind: bench/callgrind_envelope.py, collecting only the timed passes.
#   bench/cg_envelope.sh N [PASSES [STAGE]]      (from the repository root)
# Prints the per-envelope events and leaves the callgrind file for
# `callgrind_annotate --inclusive=yes FILE`.
set -e
n=${1:?usage: cg_envelope.sh N [PASSES [STAGE]]}
k=${2:-1}
py=${PYTHON:-.venv/bin/python}
out=${CG_OUT:-$(mktemp /tmp/cg-envelope.XXXXXX)}
opts="--tool=callgrind --collect-atstart=no --toggle-collect=sys_call_tracing"
# the simulated last level: 1 MB 16-way by default (this host's L2; valgrind
# would take the L3 reported by the CPU, 256 MB direct-mapped on this VM)
[ -n "$CACHESIM" ] && opts="$opts --cache-sim=yes --LL=${CG_LL:-1048576,16,64}"
valgrind $opts --callgrind-out-file="$out" -q "$py" bench/callgrind_envelope.py "$n" "$k" ${3:-full}
python3 - "$out" "$k" <<'PY'
import sys
events = totals = None
for line in open(sys.argv[1]):
    if line.startswith("events:"):
        events = line.split()[1:]
    elif line.startswith(("summary:", "totals:")):
        totals = [int(x) for x in line.split()[1:]]
k = int(sys.argv[2]) * 4096
print("per envelope: " + ", ".join(f"{e}={t / k:.0f}" for e, t in zip(events, totals)))
PY
echo "callgrind file: $out"
