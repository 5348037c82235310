"""Shared fixtures for the benches, and a summary of the issue's targets.

MAILFILTER_BENCH_MAX (default 1000000) caps the rule-set sizes: sizes above it
are skipped (e.g. MAILFILTER_BENCH_MAX=100000 for a quick run). Generated rule
directories and compiled bundles are cached in bench/.cache/ (see rulegen.py).
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BENCH_MAX = int(os.environ.get("MAILFILTER_BENCH_MAX", "1000000"))

# name -> median seconds (or other figures), filled by the benches, read by
# the terminal summary below; numbers only, never an assertion.
RESULTS: dict[str, float] = {}
NOTES: list[str] = []


def sizes(*ns: int) -> list:
    return [pytest.param(n, id=f"{n // 1000}k" if n < 1_000_000 else f"{n // 1_000_000}M",
                         marks=pytest.mark.skipif(n > BENCH_MAX, reason=f"MAILFILTER_BENCH_MAX={BENCH_MAX}"))
            for n in ns]


def record(benchmark, key: str) -> float:
    """Remember the median of the benchmark that just ran under `key`."""
    med = benchmark.stats.stats.median
    RESULTS[key] = med
    benchmark.extra_info["median_us"] = round(med * 1e6, 3)
    return med


def _fmt_t(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.2f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def targets() -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for every target whose inputs ran."""
    R = RESULTS
    out = []

    def add(name, measured, ok):
        out.append((name, measured, "met" if ok else "NOT met"))

    if "envelope/1000000" in R:
        # issue 13's target (the rule-compiler issue's was 2 µs)
        add("envelope median at 1M <= 3 µs", _fmt_t(R["envelope/1000000"]), R["envelope/1000000"] <= 3e-6)
    sizes_run = sorted(int(k.split("/")[1]) for k in R if k.startswith("envelope/"))
    if len(sizes_run) >= 2 and sizes_run[0] == 1000:
        hi = sizes_run[-1]
        ratio = R[f"envelope/{hi}"] / R["envelope/1000"]
        add(f"envelope flat 1k -> {hi // 1000}k (<= 1.5x)", f"{ratio:.2f}x", ratio <= 1.5)
    if "envelope/10000" in R and "baseline/10000" in R:
        sp = R["baseline/10000"] / R["envelope/10000"]
        add(">= 50x faster than spamcontrol-style at 10k", f"{sp:.0f}x", sp >= 50)
    if "core/10000" in R and "baseline/10000" in R:
        sp = R["baseline/10000"] / R["core/10000"]
        add("(diagnostic) core lookups only vs baseline at 10k", f"{sp:.0f}x", sp >= 50)
    rx = sorted(int(k.split("/")[1]) for k in R if k.startswith("regex_lm/"))
    if len(rx) >= 2:
        g = R[f"regex_lm/{rx[-1]}"] / R[f"regex_lm/{rx[0]}"]
        add(f"regex list lookup flat {rx[0]} -> {rx[-1]} regexes", f"{g:.2f}x", g <= 1.5)
    if "regex_lm/10000" in R and "regex_re/10000" in R:
        sp = R["regex_re/10000"] / R["regex_lm/10000"]
        add(">= 10x faster than one stdlib re alternation (10k)", f"{sp:.0f}x", sp >= 10)
    if "core/1000000" in R:
        add("(diagnostic) core lookups only at 1M <= 2 µs", _fmt_t(R["core/1000000"]), R["core/1000000"] <= 2e-6)
    if "compile/1000000" in R:
        add("compile 1M rules <= 15 s", _fmt_t(R["compile/1000000"]), R["compile/1000000"] <= 15)
    if "load/1000000" in R:
        add("bundle load (1M) <= 200 ms", _fmt_t(R["load/1000000"]), R["load/1000000"] <= 0.2)
    if "rss_mb/1000000" in R:
        add("RSS after load (1M) <= 400 MB", f"{R['rss_mb/1000000']:.0f} MB", R["rss_mb/1000000"] <= 400)
    return out


def pytest_terminal_summary(terminalreporter):
    rows = targets()
    if not rows and not NOTES:
        return
    tr = terminalreporter
    tr.section("mailfilter bench: issue targets (numbers only, nothing asserted)")
    for name, measured, verdict in rows:
        tr.write_line(f"  {name:<52} {measured:>12}   {verdict}")
    for note in NOTES:
        tr.write_line(f"  {note}")
