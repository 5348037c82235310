"""`make bench`: a short side-by-side SMTP server run (numbers, never assertions on speed).

The quick run (2 cells, 1 s each, 500 idle connections; mailfilter and
aiosmtpd+uvloop, plus smtp-sink when installed) writes its table to a
temporary file and prints it. BENCH_SERVER_FULL=1 runs the whole matrix
(~15 minutes) and rewrites bench/SERVER.md. The only checks are that the
harness worked: every server answered and no transaction failed.
"""
import json
import os

import pytest

import run_server_bench


@pytest.mark.benchmark(group="smtp-server")
def test_server_side_by_side(benchmark, tmp_path, capsys):
    full = os.environ.get("BENCH_SERVER_FULL") == "1"
    out = os.path.join(os.path.dirname(__file__), "SERVER.md") if full else str(tmp_path / "SERVER.md")
    args = ["--out", out] + ([] if full else
                             ["--quick", "--servers", "mf-uvloop,aiosmtpd,smtp-sink", "--idle-servers",
                              "mf-uvloop,aiosmtpd"])
    benchmark.pedantic(run_server_bench.main, args=(args,), rounds=1, iterations=1)
    with open(os.path.splitext(out)[0] + ".json") as fh:
        res = json.load(fh)
    runs = [r for rs in res["matrix"].values() for r in rs]
    assert runs and all(r.get("messages", 0) > 0 for r in runs), "a server answered nothing"
    errors = {k: r.get("error_kinds") for k, rs in res["matrix"].items() for r in rs if r.get("errors")}
    assert not errors, errors
    for key, r in res["idle"].items():
        benchmark.extra_info[f"idle {key} rss KB/conn"] = r.get("rss_kb_per_conn")
    for key, rs in res["matrix"].items():
        benchmark.extra_info[f"{key} msgs/s"] = rs[0].get("msgs_per_s")
