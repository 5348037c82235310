"""Side-by-side SMTP server benchmark: mailfilter as shipped vs its peers.

usage: .venv/bin/python bench/run_server_bench.py [--seconds 2] [--repeat 3]
          [--servers mf-uvloop,mf-syslog,mf-confirmed,mf-maildir,postfix,aiosmtpd,smtp-sink,uvloop-floor]
          [--idle 5000,10000] [--out bench/SERVER.md] [--quick]

mf-uvloop is `mailfilter serve` as an operator runs it (decision log on, to a
file; rule checks on; only --remote-host off and --deliver discard chosen);
mf-syslog logs to a syslog socket instead, mf-confirmed looks client names
up (--remote-host confirmed) against a local DNS responder, mf-maildir
stores durably; postfix is Postfix smtpd with its queue on disk (the durable
peer), smtp-sink the C sink, uvloop-floor the Python floor (bench/servers.py).
The first table is issue 13's targets as ratios measured in this run.

Every server runs in its own process (bench/servers.py); the load generator
(bench/loadgen.py) runs in another. Cells: concurrency 1/10/100 x 1 KB/100 KB
x new connection per message / reused connections (+ one pipelined row), each
cell `--seconds` long, repeated `--repeat` times with the servers interleaved
(rotating order) so background load hits all of them alike; the median is
reported. Then Postfix smtp-source (when installed) drives the 1 KB c=1 and
c=100 rows the way PEERS.md did. Then the idle test: a freshly started server,
N silent connections, memory per connection and fresh-transaction latency.

Results go to the part of `--out` between the results markers (the analysis
written around them is kept) and, raw, to the same name with .json.
Numbers only: nothing here asserts a speed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import servers as srv  # noqa: E402

LOADGEN = os.path.join(HERE, "loadgen.py")
BEGIN = "<!-- results:begin (written by bench/run_server_bench.py) -->"
END = "<!-- results:end -->"
FROM = "bench@sender.example"
TO = "bench@example.net"
HELO = "bench.client.example"


def uptime() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


def loadgen(port: int, pid: int, args: list[str], timeout: float = 300) -> dict:
    cmd = [sys.executable, LOADGEN, "--port", str(port), "--server-pid", str(pid), "--json",
           "--from", FROM, "--to", TO, "--helo", HELO, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0 or not out.stdout.strip():
        return {"failed": out.stderr[-2000:], "errors": 1, "error_kinds": {"loadgen failed": 1}}
    return json.loads(out.stdout.strip().splitlines()[-1])


def smtp_source(port: int, c: int, n: int, size: int, reuse: bool = False,
                server_pid: int | None = None) -> dict:
    """Postfix smtp-source: `-d` keeps each session's connection for its next
    message (reused), else one connection per message. The server's CPU
    (utime+stime of its process tree, loadgen.server_cpu) per message beside."""
    import loadgen as lg
    cmd = [srv.SMTP_SOURCE, "-c", *(["-d"] if reuse else []), "-s", str(c), "-m", str(n),
           "-l", str(size), "-M", HELO, "-f", FROM, "-t", TO, f"127.0.0.1:{port}"]
    cpu0 = lg.server_cpu(server_pid) if server_pid else None
    t = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    dt = time.perf_counter() - t
    cpu = lg.server_cpu(server_pid) - cpu0 if server_pid else None
    err_lines = [l for l in out.stderr.splitlines() if l.strip() and not l.strip().isdigit()]
    return {"msgs_per_s": round(n / dt, 1), "n": n, "elapsed_s": round(dt, 3),
            "server_us_per_msg": round(cpu / n * 1e6, 1) if cpu is not None else None,
            "rc": out.returncode, "errors": len(err_lines) + (out.returncode != 0),
            "error_samples": err_lines[:3]}


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


CELLS_FULL = [
    # (label, concurrency, size, flags)
    *[(f"c={c} {sz // 1024} KB {mode}", c, sz, ["--reuse"] if mode == "reuse" else [])
      for sz in (1024, 102400) for mode in ("new-conn", "reuse") for c in (1, 10, 100)],
    ("c=100 1 KB reuse+pipelining", 100, 1024, ["--reuse", "--pipelining"]),
]
# mf-uvloop is mailfilter as shipped (decision log on, to a file; rule
# checks on); the others each change one thing, or are the peers
DEFAULT_SERVERS = ("mf-uvloop,mf-syslog,mf-confirmed,mf-maildir,postfix,aiosmtpd,smtp-sink,"
                   "uvloop-floor")

CELLS_QUICK = [
    ("c=1 1 KB new-conn", 1, 1024, []),
    ("c=10 1 KB reuse", 10, 1024, ["--reuse"]),
]


def run_matrix(servers, cells, seconds, repeat, log):
    results = {}   # (label, server) -> list of loadgen dicts
    for label, c, size, flags in cells:
        for rep in range(repeat):
            order = servers[rep % len(servers):] + servers[:rep % len(servers)]
            for s in order:
                r = loadgen(s.port, s.pid, ["-c", str(c), "-t", str(seconds), "--size", str(size), *flags])
                results.setdefault((label, s.name), []).append(r)
                log(f"{label:32} {s.name:11} rep{rep} {r.get('msgs_per_s')} msg/s "
                    f"p99 {r.get('p99_ms')} ms srv {r.get('server_us_per_msg')} us/msg err {r.get('errors')}")
    return results


# (label, sessions, reuse, the loadgen cell whose rate sizes the run)
SOURCE_CELLS = [
    ("smtp-source c=1 1 KB new-conn", 1, False, "c=1 1 KB new-conn"),
    ("smtp-source c=100 1 KB new-conn", 100, False, "c=100 1 KB new-conn"),
    ("smtp-source c=100 1 KB reuse", 100, True, "c=100 1 KB reuse"),
]


def run_smtp_source(servers, matrix, seconds, repeat, log):
    results = {}
    for label, c, reuse, sized_by in SOURCE_CELLS:
        for rep in range(repeat):
            order = servers[rep % len(servers):] + servers[:rep % len(servers)]
            for s in order:
                est = med([r.get("msgs_per_s") for r in matrix.get((sized_by, s.name), [])])
                n = max(200, int((est or 500) * seconds))
                r = smtp_source(s.port, c, n, 1024, reuse=reuse, server_pid=s.pid)
                results.setdefault((label, s.name), []).append(r)
                log(f"{label:32} {s.name:11} rep{rep} {r['msgs_per_s']} msg/s (n={n}) err {r['errors']}")
    return results


def run_idle(names, workdir, levels, serial, log):
    out = {}
    for name in names:
        for n in levels:
            s = srv.make(name, workdir).start()
            try:
                started = srv_mem(s.pid)
                r = loadgen(s.port, s.pid, ["--idle", str(n), "--serial", str(serial)], timeout=600)
                r["mem_started"] = started
                r["load"] = uptime()
            finally:
                s.stop()
            out[(name, n)] = r
            log(f"idle {name:11} n={n} opened {r.get('idle_opened')} rss/conn {r.get('rss_kb_per_conn')} KB "
                f"pss/conn {r.get('pss_kb_per_conn')} KB p99 {r.get('baseline_p99_ms')} -> "
                f"{r.get('held_p99_ms')} ms err {r.get('errors')} load {r['load']}")
    return out


def srv_mem(pid):
    sys.path.insert(0, HERE)
    import loadgen as lg
    return lg.server_memory(pid)


def fmt(v, nd=0):
    if v is None:
        return "–"
    return f"{v:.{nd}f}"


# issue 13's targets: (what, numerator (table, cell, server), denominator, goal)
TARGETS = [
    ("new connection, c=100 (smtp-source)", ("source", "smtp-source c=100 1 KB new-conn", "mf-uvloop"),
     ("source", "smtp-source c=100 1 KB new-conn", "smtp-sink"), ">= 0.6x smtp-sink"),
    ("new connection, c=100 (loadgen)", ("matrix", "c=100 1 KB new-conn", "mf-uvloop"),
     ("matrix", "c=100 1 KB new-conn", "smtp-sink"), ">= 0.6x smtp-sink"),
    ("reused, c=100 (smtp-source -d)", ("source", "smtp-source c=100 1 KB reuse", "mf-uvloop"),
     ("source", "smtp-source c=100 1 KB reuse", "smtp-sink"), ">= 0.5x smtp-sink"),
    ("reused, c=100 (loadgen)", ("matrix", "c=100 1 KB reuse", "mf-uvloop"),
     ("matrix", "c=100 1 KB reuse", "smtp-sink"), ">= 0.5x smtp-sink"),
    ("reused, c=100 (loadgen)", ("matrix", "c=100 1 KB reuse", "mf-uvloop"),
     ("matrix", "c=100 1 KB reuse", "aiosmtpd"), ">= 4x aiosmtpd"),
    ("new connection, c=1 (smtp-source)", ("source", "smtp-source c=1 1 KB new-conn", "mf-uvloop"),
     ("source", "smtp-source c=1 1 KB new-conn", "smtp-sink"), ">= 0.5x smtp-sink"),
    ("durable, new connection, c=100 (smtp-source)",
     ("source", "smtp-source c=100 1 KB new-conn", "mf-maildir"),
     ("source", "smtp-source c=100 1 KB new-conn", "postfix"), ">= 2.5x Postfix smtpd -> queue"),
    ("durable, new connection, c=100 (loadgen)", ("matrix", "c=100 1 KB new-conn", "mf-maildir"),
     ("matrix", "c=100 1 KB new-conn", "postfix"), ">= 2.5x Postfix smtpd -> queue"),
    ("100 KB, new connection, c=100", ("matrix", "c=100 100 KB new-conn", "mf-uvloop"),
     ("matrix", "c=100 100 KB new-conn", "smtp-sink"), ">= 0.9x smtp-sink"),
    ("100 KB, reused, c=100", ("matrix", "c=100 100 KB reuse", "mf-uvloop"),
     ("matrix", "c=100 100 KB reuse", "smtp-sink"), ">= 0.9x smtp-sink"),
]


def render_targets(matrix, source, idle) -> list[str]:
    """The issue's targets as measured in this run: ratios of medians."""
    tables = {"matrix": matrix, "source": source}

    def rate(where):
        table, label, name = where
        return med([r.get("msgs_per_s") for r in tables[table].get((label, name), [])])

    L = ["### Targets (issue 13), this run", "",
         "| target | mailfilter msgs/s | peer msgs/s | ratio | goal |", "|---|---|---|---|---|"]
    for what, num, den, goal in TARGETS:
        a, b = rate(num), rate(den)
        L.append(f"| {what}: {num[2]} vs {den[2]} | {fmt(a)} | {fmt(b)} | "
                 f"{f'{a / b:.2f}x' if a and b else '–'} | {goal} |")
    for (name, n), r in idle.items():
        if name == "mf-uvloop":
            L.append(f"| {n} idle sessions: RSS per connection | {fmt(r.get('rss_kb_per_conn'), 2)} KB "
                     "| | | <= 4 KB |")
    L.append("")
    return L


def render(meta, servers, cells, matrix, source, idle, idle_levels) -> str:
    names = [s.name for s in servers]
    notes = {s.name: s.note for s in servers}
    L = []
    L.append(f"Run {meta['date']} on {meta['machine']}; load generator and servers share the cores, "
             f"loopback only. Cells {meta['seconds']} s each, median of {meta['repeat']} interleaved runs. "
             f"Load average (1/5/15 min): start {meta['load_start']}, after matrix {meta.get('load_matrix')}, "
             f"end {meta['load_end']}. Whole run {meta['duration_s']:.0f} s.")
    L.append("")
    L.append("Servers: " + "; ".join(f"**{n}** = {notes[n]}" for n in names) + ".")
    L.append("")
    has_ratio = "mf-uvloop" in names and "aiosmtpd" in names
    L.extend(render_targets(matrix, source, idle))

    def ratio_col(label, key="msgs_per_s"):
        a = med([r.get(key) for r in matrix.get((label, "mf-uvloop"), [])])
        b = med([r.get(key) for r in matrix.get((label, "aiosmtpd"), [])])
        return f"{a / b:.2f}×" if a and b else "–"

    L.append("### Throughput, msgs/s (loadgen, no PIPELINING unless stated, 1 recipient)")
    L.append("")
    hdr = "| cell | " + " | ".join(names) + (" | mf-uvloop ÷ aiosmtpd |" if has_ratio else " |")
    L.append(hdr)
    L.append("|---" * (len(names) + 1 + has_ratio) + "|")
    for label, *_ in cells:
        row = [fmt(med([r.get("msgs_per_s") for r in matrix.get((label, n), [])])) for n in names]
        L.append(f"| {label} | " + " | ".join(row) + (f" | {ratio_col(label)} |" if has_ratio else " |"))
    L.append("")
    if source:
        L.append("### Throughput, msgs/s, Postfix smtp-source (`-c [-d] -s C -m N -l 1024 -M "
                 f"{HELO} -f {FROM} -t {TO}`; `-d` = reuse: each session keeps its connection)")
        L.append("")
        L.append("| cell | " + " | ".join(names) + (" | mf-uvloop ÷ aiosmtpd |" if has_ratio else " |"))
        L.append("|---" * (len(names) + 1 + has_ratio) + "|")
        for label in sorted({k[0] for k in source}, key=lambda x: len(x)):
            row = [fmt(med([r.get("msgs_per_s") for r in source.get((label, n), [])])) for n in names]
            rt = "–"
            if has_ratio:
                a = med([r.get("msgs_per_s") for r in source.get((label, "mf-uvloop"), [])])
                b = med([r.get("msgs_per_s") for r in source.get((label, "aiosmtpd"), [])])
                rt = f"{a / b:.2f}×" if a and b else "–"
            L.append(f"| {label} | " + " | ".join(row) + (f" | {rt} |" if has_ratio else " |"))
        L.append("")
    L.append("### Server CPU per message, µs (utime+stime of the server process ÷ messages; "
             "less sensitive to other load than msgs/s)")
    L.append("")
    L.append("| cell | " + " | ".join(names) + (" | aiosmtpd ÷ mf-uvloop |" if has_ratio else " |"))
    L.append("|---" * (len(names) + 1 + has_ratio) + "|")
    rows = [(label, matrix) for label, *_ in cells] + [(label, source) for label, *_ in SOURCE_CELLS
                                                        if any(k[0] == label for k in source)]
    for label, table in rows:
        vals = {n: med([r.get("server_us_per_msg") for r in table.get((label, n), [])]) for n in names}
        rt = "–"
        if has_ratio and vals.get("mf-uvloop") and vals.get("aiosmtpd"):
            rt = f"{vals['aiosmtpd'] / vals['mf-uvloop']:.2f}×"
        L.append(f"| {label} | " + " | ".join(fmt(vals[n]) for n in names) + (f" | {rt} |" if has_ratio else " |"))
    L.append("")
    L.append("### Transaction latency p50 / p99, ms (median over runs)")
    L.append("")
    L.append("new-conn: connect → 250 after DATA; reuse: [RSET] MAIL → 250 after DATA.")
    L.append("")
    L.append("| cell | " + " | ".join(names) + " |")
    L.append("|---" * (len(names) + 1) + "|")
    for label, *_ in cells:
        row = []
        for n in names:
            rs = matrix.get((label, n), [])
            row.append(f"{fmt(med([r.get('p50_ms') for r in rs]), 2)} / {fmt(med([r.get('p99_ms') for r in rs]), 2)}")
        L.append(f"| {label} | " + " | ".join(row) + " |")
    L.append("")
    if idle:
        L.append("### Idle connections (each server freshly started; N connections read the 220 "
                 "and stay silent; memory of the server process tree)")
        L.append("")
        L.append("| server | N held | RSS KB/conn | PSS KB/conn | RSS before → with N (MB) | "
                 "fresh txn p50/p99 before (ms) | fresh txn p50/p99 with N held (ms) | errors | load |")
        L.append("|---|---|---|---|---|---|---|---|---|")
        for (name, n), r in idle.items():
            b, a = r.get("mem_before") or {}, r.get("mem_after") or {}
            held = f"{r.get('idle_opened')}" + (f" ({r.get('idle_still_open')} still open)"
                                               if r.get("idle_still_open") != r.get("idle_opened") else "")
            L.append(f"| {name} | {held} | {fmt(r.get('rss_kb_per_conn'), 2)} | {fmt(r.get('pss_kb_per_conn'), 2)} | "
                     f"{fmt(b.get('rss_kb', 0) / 1024, 1)} → {fmt(a.get('rss_kb', 0) / 1024, 1)} | "
                     f"{fmt(r.get('baseline_p50_ms'), 2)} / {fmt(r.get('baseline_p99_ms'), 2)} | "
                     f"{fmt(r.get('held_p50_ms'), 2)} / {fmt(r.get('held_p99_ms'), 2)} | "
                     f"{r.get('errors', 0) + r.get('idle_errors', 0)} | {r.get('load')} |")
        L.append("")
    # errors: never silently dropped
    errs = []
    for (label, n), rs in list(matrix.items()) + list(source.items()):
        kinds = {}
        for r in rs:
            for k, v in (r.get("error_kinds") or {}).items():
                kinds[k] = kinds.get(k, 0) + v
            if r.get("errors") and not r.get("error_kinds"):
                kinds["smtp-source"] = kinds.get("smtp-source", 0) + r["errors"]
        if kinds:
            errs.append(f"| {label} | {n} | {', '.join(f'{k}: {v}' for k, v in kinds.items())} |")
    for (name, n), r in idle.items():
        kinds = {**(r.get("error_kinds") or {}), **{f"idle {k}": v for k, v in (r.get('idle_error_kinds') or {}).items()}}
        if kinds:
            errs.append(f"| idle N={n} | {name} | {', '.join(f'{k}: {v}' for k, v in kinds.items())} |")
    L.append("### Errors (every non-2xx/3xx reply, connection failure or timeout, all runs)")
    L.append("")
    if errs:
        L.append("| cell | server | errors |")
        L.append("|---|---|---|")
        L.extend(errs)
    else:
        L.append("None: every transaction of every run got the expected replies.")
    L.append("")
    return "\n".join(L)


def write_out(path: str, table: str, begin: str = BEGIN, end: str = END,
              title: str = "# SMTP server benchmark") -> None:
    """Replace the block between the markers in `path`; the text around it stays."""
    text = ""
    if os.path.exists(path):
        with open(path) as fh:
            text = fh.read()
    block = f"{begin}\n{table}\n{end}"
    if begin in text and end in text:
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        text = head + block + tail
    else:
        text = f"{title}\n\n" + block + "\n" + text
    with open(path, "w") as fh:
        fh.write(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--servers", default=DEFAULT_SERVERS)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--idle", default="5000,10000", help="idle levels, comma separated ('' for none)")
    p.add_argument("--idle-servers", default=None,
                   help="default: those of --servers among mf-uvloop, mf-maildir, aiosmtpd, smtp-sink")
    p.add_argument("--serial", type=int, default=300, help="fresh transactions per idle measurement")
    p.add_argument("--no-smtp-source", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny run: 2 cells, 1 repeat, 500 idle")
    p.add_argument("--out", default=os.path.join(HERE, "SERVER.md"))
    a = p.parse_args(argv)
    cells = CELLS_FULL
    if a.quick:
        cells, a.seconds, a.repeat, a.idle, a.serial = CELLS_QUICK, 1.0, 1, "500", 50
        a.no_smtp_source = True
    names = srv.available(a.servers.split(","))
    idle_levels = [int(x) for x in a.idle.split(",") if x.strip()]
    t0 = time.monotonic()
    meta = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "machine": f"{os.cpu_count()} CPU {platform.machine()}, Linux {platform.release()}, "
                       f"Python {platform.python_version()}",
            "seconds": a.seconds, "repeat": a.repeat, "load_start": uptime()}

    def log(msg):
        print(f"[{time.monotonic() - t0:6.1f}s] {msg}", flush=True)

    log(f"servers {names}; load {meta['load_start']}")
    workdir = tempfile.mkdtemp(prefix="server-bench-")
    running = []
    try:
        for n in names:
            running.append(srv.make(n, workdir).start())
        for s in running:    # warm-up
            loadgen(s.port, s.pid, ["-c", "10", "-t", "0.5", "--reuse"])
        matrix = run_matrix(running, cells, a.seconds, a.repeat, log)
        meta["load_matrix"] = uptime()
        source = {}
        if not a.no_smtp_source and os.access(srv.SMTP_SOURCE, os.X_OK):
            source = run_smtp_source(running, matrix, a.seconds, a.repeat, log)
    finally:
        for s in running:
            s.stop()
    # by default not the floor (no session state), not the mf-* variants
    # that hold the same per-connection state as mf-uvloop, and not Postfix
    # (a process per connection: 10,000 idle sessions would be 10,000 smtpd)
    idle_names = (srv.available(a.idle_servers.split(",")) if a.idle_servers
                  else [n for n in names if n in ("mf-uvloop", "mf-maildir", "aiosmtpd", "smtp-sink")])
    idle = run_idle(idle_names, workdir, idle_levels, a.serial, log) if idle_levels else {}
    meta["load_end"] = uptime()
    meta["duration_s"] = time.monotonic() - t0
    table = render(meta, running, cells, matrix, source, idle, idle_levels)
    write_out(a.out, table)
    with open(os.path.splitext(a.out)[0] + ".json", "w") as fh:
        json.dump({"meta": meta,
                   "matrix": {f"{k[0]} | {k[1]}": v for k, v in matrix.items()},
                   "smtp_source": {f"{k[0]} | {k[1]}": v for k, v in source.items()},
                   "idle": {f"{k[0]} | {k[1]}": v for k, v in idle.items()}}, fh, indent=1)
    print(table)
    log(f"done; load {meta['load_end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
