"""The TLS bench harness, tested by running it (numbers, never a timing assertion).

`test_tls_side_by_side` (bench-only: it runs under `make bench`) is the
tiny version of bench/run_tls_bench.py: both certificate kinds, STARTTLS
and implicit TLS messages, STARTTLS handshakes, 100 idle connections after
STARTTLS and 100 after implicit TLS (30 each for Postfix). It checks that
the harness worked: every server that ran got messages through in every
cell with no error and presented the cell's key; idle connections were all
held and measured; a server is skipped only for a reason that means "not
there yet" (mailfilter before issue 12's merge: no --tls-cert option, or
STARTTLS not offered).
`BENCH_TLS_FULL=1` runs the whole bench and rewrites bench/TLS.md.

The other tests check the parts the harness's verdicts rest on, against
real servers on 127.0.0.1: the probe sees a server without STARTTLS, the
key check counts a server presenting another key type as an error, and the
certificates are of the kinds they claim.
"""
import json
import os
import ssl
import subprocess
import sys
import tempfile

import pytest

import run_tls_bench
import servers as srv
import tlscerts

TLSLOAD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tlsload.py")


def _tlsload(*args) -> dict:
    out = subprocess.run([sys.executable, TLSLOAD, "--json", *args], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.benchmark(group="smtp-tls")
def test_tls_side_by_side(benchmark, tmp_path):
    full = os.environ.get("BENCH_TLS_FULL") == "1"
    out = os.path.join(os.path.dirname(__file__), "TLS.md") if full else str(tmp_path / "TLS.md")
    args = ["--out", out] + ([] if full else ["--quick"])
    benchmark.pedantic(run_tls_bench.main, args=(args,), rounds=1, iterations=1)
    with open(os.path.splitext(out)[0] + ".json") as fh:
        res = json.load(fh)
    check_results(res)
    for key, rs in res["matrix"].items():
        benchmark.extra_info[f"{key} /s"] = rs[0].get("msgs_per_s")


def check_results(res: dict) -> None:
    """The harness worked (TLS.json of a run): nothing about speed."""
    names = res["meta"]["servers"]
    assert "aiosmtpd-tls" in names, "aiosmtpd is a bench dependency"
    skipped = res["skipped"]
    for key, reason in skipped.items():
        server = key.split(" | ")[1]
        assert server == "mf-tls" and reason.startswith(run_tls_bench.NOT_YET), (key, reason)
        if reason.startswith("no TLS options"):
            assert not res["meta"]["mf_has_tls"], "mailfilter has the options but was not run"
    ran = {n for n in names if not any(k.split(" | ")[1] == n for k in skipped)}
    assert "aiosmtpd-tls" in ran
    runs = res["matrix"]
    for name in ran:
        mine = {k: v for k, v in runs.items() if k.endswith(f" | {name}")}
        assert len(mine) >= 3, (name, list(mine))
        for key, rs in mine.items():
            for r in rs:
                assert r.get("messages", 0) > 0, (key, r)
                assert not r.get("errors"), (key, r.get("error_kinds"), r.get("error_samples"))
                kind = key.split(" | ")[0]
                want = tlscerts.expected_peer_kind(kind) if kind != "-" else "none"   # "-": no TLS
                assert r["tls_seen"] and all(s.endswith("/" + want) for s in r["tls_seen"]), (key, r["tls_seen"])
            if "handshakes" in key:
                assert all(r.get("per_core_s") for r in rs), key
    for key, r in res["idle"].items():
        assert r["idle_opened"] == r["idle_requested"] and not r["errors"], (key, r)
        assert r.get("rss_kb_per_conn") is not None, key
        if key.split(" | ")[1] == "postfix-tls":
            assert r["per_process"]["name"] == "smtpd" and r["per_process"]["n"] >= r["idle_opened"], r
    assert {tuple(k.split(" | ")[1:]) for k in res["idle"]} == {(n, m) for n in ran
                                                                 for m in ("starttls", "implicit")}


def test_certificates_are_the_kinds_they_claim(tmp_path):
    for kind in tlscerts.KINDS:
        pair = tlscerts.make_pair(kind, str(tmp_path))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(pair.cert, pair.key)         # the key belongs to the certificate
        assert oct(os.stat(pair.key).st_mode & 0o777) == "0o600"
        der = ssl.PEM_cert_to_DER_cert(open(pair.cert).read())
        assert tlscerts.peer_key_kind(der) == tlscerts.expected_peer_kind(kind)


def test_probe_notices_a_server_without_starttls():
    """The harness's skip rests on this: the canned-reply floor offers no STARTTLS."""
    with tempfile.TemporaryDirectory() as work:
        with srv.make("uvloop-floor", work) as floor:
            r = _tlsload("--port", str(floor.port), "--probe")
    assert r["ok"] is False and "STARTTLS not offered" in r["note"], r


def test_a_server_presenting_another_key_is_an_error(tmp_path):
    """aiosmtpd with the ECDSA certificate, the client expecting RSA: every
    worker's sample counts as an error; expecting ECDSA: none."""
    pair = tlscerts.make_pair("ecdsa", str(tmp_path / "tls"))
    with srv.make_tls("aiosmtpd-tls", str(tmp_path), pair) as s:
        wrong = _tlsload("--port", str(s.port), "-c", "2", "--procs", "2", "-n", "4", "-t", "20",
                         "--expect-key", "rsa-2048")
        right = _tlsload("--port", str(s.tls_port), "--tls", "implicit", "-c", "2", "--procs", "1",
                         "-n", "4", "-t", "20", "--expect-key", "ecdsa-p256", "--handshake-only")
    assert wrong["messages"] == 4 and wrong["error_kinds"] == {"TLS wrong key ecdsa-p256": 2}, wrong
    assert right["messages"] == 4 and right["errors"] == 0, right
    assert right["tls_seen"] == {"TLSv1.3/TLS_AES_256_GCM_SHA384/ecdsa-p256": 1}, right
