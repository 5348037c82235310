"""`mailfilter serve --metrics HOST:PORT` as a real process: a scripted
session mix over real sockets (smtplib and a raw client), then the endpoint
scraped with urllib and read with prometheus_client's parser, and every
count checked against what the mix did (docs/operations.md#metrics); the
same under --workers 2 (the parent serves the sum of the workers'
multiprocess files); SIGHUP reloads counted ok and failed; a port in use
is a start-up error.

Waiting: the counts of a session are written when the server has seen its
end, and under --workers once a second, so each check scrapes until the
expected numbers are there, bounded (SCRAPE_WAIT), and then compares the
whole families, so a wrong number fails with the difference shown.
"""
from __future__ import annotations

import base64
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.auth_helpers import make_userdb
from tests.support.server_harness import (
    DENIED, TIMEOUT, RawClient, child_env, free_port, spawn_serve, write_rules,
)

SCRAPE_WAIT = 20.0          # seconds a check may wait for the counts to be written
MESSAGE = b"Subject: metrics\r\n\r\nline one\r\nline two\r\n"


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label pairs: value}} of one scrape."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT) as r:
        assert r.status == 200
        text = r.read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def labels(**kw) -> tuple:
    return tuple(sorted(kw.items()))


def wait_for_counts(port: int, expected: dict[str, dict[tuple, float]]) -> dict:
    """Scrape until every sample family in `expected` is exactly as given
    (bounded); then assert it, so a mismatch shows the difference."""
    deadline = time.monotonic() + SCRAPE_WAIT
    while True:
        got = scrape(port)
        if all(got.get(name, {}) == want for name, want in expected.items()) \
                or time.monotonic() > deadline:
            break
        threading.Event().wait(0.1)
    for name, want in expected.items():
        assert got.get(name, {}) == want, name
    return got


@pytest.fixture
def setup(tmp_path):
    rules = write_rules(tmp_path / "rules")
    userdb = make_userdb(tmp_path / "users.db", {"tim": "tanstaaftanstaaf"})
    return rules, userdb


def start(tmp_path, rules, userdb, *extra, listening=1):
    """The server, its TMPDIR under tmp_path (where --workers keeps its files)."""
    mport = free_port()
    (tmp_path / "tmp").mkdir()
    sp = spawn_serve("--rules", rules, "--deliver", f"maildir:{tmp_path}/spool",
                     "--metrics", f"127.0.0.1:{mport}", "--auth", "", "--userdb", userdb,
                     "--auth-fail-delay", "0", *extra, listening=listening, cwd=tmp_path,
                     env={"TMPDIR": str(tmp_path / "tmp")})
    sp.metrics_port = mport
    return sp


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE       # the server's embedded self-signed certificate
    return ctx


def auth_plain(s: smtplib.SMTP, user: str, password: str) -> int:
    arg = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
    return s.docmd("AUTH", "PLAIN " + arg)[0]


def session_mix(port: int) -> None:
    """What the counts must show (spawn_serve's own probe comes first: one
    connection, greeted, left without QUIT):
      1. two messages accepted in one session, QUIT;
      2. a RCPT refused by badrcptto, QUIT;
      3. a bad command, QUIT;
      4. STARTTLS, AUTH PLAIN failed, AUTH PLAIN ok, QUIT;
      5. a tcp.smtp deny client, closed at connect;
      6. STARTTLS answered with bytes that are no TLS: the handshake fails."""
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as s:
        s.ehlo("mix.test")
        for _ in range(2):
            s.mail("a@sender.test")
            s.rcpt("user@example.com")
            assert s.data(MESSAGE)[0] == 250
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as s:
        s.ehlo("mix.test")
        s.mail("a@sender.test")
        assert s.rcpt("noreply@example.net")[0] == 553
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as s:
        s.ehlo("mix.test")
        assert s.docmd("FOO")[0] == 500
    with smtplib.SMTP("127.0.0.1", port, timeout=TIMEOUT) as s:
        s.starttls(context=tls_context())
        s.ehlo("mix.test")
        assert auth_plain(s, "tim", "wrong") == 535
        assert auth_plain(s, "tim", "tanstaaftanstaaf") == 235
    with RawClient(port, source=DENIED) as c:
        assert c.at_eof() and c.buf == b""
    with RawClient(port) as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO mix.test")[0] == 250
        assert c.cmd("STARTTLS")[0] == 220
        c.send(b"this is not a ClientHello\r\n" * 4)
        assert c.at_eof()


def expected_mix(sizes: list[int], hop_ok: int = 2) -> dict:
    return {
        "mailfilter_connections_total": {(): 7.0},
        "mailfilter_connections_refused_total": {labels(reason="client_denied"): 1.0},
        "mailfilter_sessions_total": {
            labels(outcome="disconnect"): 1.0, labels(outcome="quit"): 4.0,
            labels(outcome="refused"): 1.0, labels(outcome="tls_fail"): 1.0},
        "mailfilter_verdicts_total": {
            labels(stage="RCPT", action="accept", rule_file="recipients"): 2.0,
            labels(stage="RCPT", action="reject", rule_file="badrcptto"): 1.0,
            labels(stage="DATA", action="accept", rule_file="-"): 2.0},
        "mailfilter_messages_total": {labels(result="accepted"): 2.0},
        "mailfilter_message_bytes_total": {labels(result="accepted"): float(sum(sizes))},
        "mailfilter_deliveries_total": {labels(hop="maildir", result="ok"): float(hop_ok)},
        "mailfilter_delivery_duration_seconds_count": {labels(hop="maildir"): float(hop_ok)},
        "mailfilter_auth_total": {labels(mechanism="PLAIN", result="fail"): 1.0,
                                  labels(mechanism="PLAIN", result="ok"): 1.0},
        "mailfilter_tls_handshakes_total": {labels(stage="STARTTLS", result="ok"): 1.0,
                                            labels(stage="STARTTLS", result="error"): 1.0},
        "mailfilter_connections_open": {(): 0.0},
        "mailfilter_log_dropped_lines_total": {(): 0.0},
    }


def rules_facts(sp) -> tuple[str, int]:
    """The fingerprint and rule count of the start-up `rules:` line."""
    [m] = sp.log.wait_for(r"rules: (\d+) rules from .* fingerprint ([0-9a-f]{16})")[:1]
    return m.group(2), int(m.group(1))


def message_sizes(sp, n: int) -> list[int]:
    return [int(m.group(1)) for m in
            sp.log.wait_for(r"action=accept stage=DATA .* size=(\d+) ", count=n)]


def test_single_process_counts_a_session_mix_and_reloads(tmp_path, setup):
    rules, userdb = setup
    sp = start(tmp_path, rules, userdb)
    try:
        sp.log.wait_for(rf"metrics: http://127\.0\.0\.1:{sp.metrics_port}/metrics")
        fingerprint, n_rules = rules_facts(sp)
        before = scrape(sp.metrics_port)
        assert before["mailfilter_rules_info"] == {labels(fingerprint=fingerprint): 1.0}
        assert before["mailfilter_rules"] == {(): float(n_rules)}
        loaded = before["mailfilter_rules_loaded_timestamp_seconds"][()]
        assert before["mailfilter_rules_load_seconds"][()] > 0
        session_mix(sp.port)
        got = wait_for_counts(sp.metrics_port, expected_mix(message_sizes(sp, 2)))
        assert "mailfilter_reloads_total" not in got
        # no address, host name or user in any label value
        values = {v for family in got.values() for key in family for _, v in key}
        for secret in ("127.0.0", "tim", "example", "sender.test", "mix.test"):
            assert not [v for v in values if secret in v]

        # a good reload, with one more rule: a new fingerprint, counted ok
        with open(os.path.join(rules, "badmailfrom"), "a") as fh:
            fh.write("new-spammer@evil.test\n")
        sp.signal(signal.SIGHUP)
        sp.log.wait_for(r"reload ok: (\d+) rules")
        got = wait_for_counts(sp.metrics_port, {"mailfilter_reloads_total": {
            labels(what="rules", result="ok"): 1.0, labels(what="tls", result="ok"): 1.0}})
        [(key, one)] = got["mailfilter_rules_info"].items()
        assert one == 1.0 and key != labels(fingerprint=fingerprint)
        assert got["mailfilter_rules"] == {(): float(n_rules + 1)}
        assert got["mailfilter_rules_loaded_timestamp_seconds"][()] > loaded

        # a reload that fails keeps the rules and is counted failed
        os.unlink(os.path.join(rules, "rcpthosts"))
        sp.signal(signal.SIGHUP)
        sp.log.wait_for(r"reload refused, keeping the current rules")
        got = wait_for_counts(sp.metrics_port, {"mailfilter_reloads_total": {
            labels(what="rules", result="ok"): 1.0, labels(what="rules", result="failed"): 1.0,
            labels(what="tls", result="ok"): 2.0}})
        assert got["mailfilter_rules_info"] == {key: 1.0}
    finally:
        assert sp.stop() == 0


def test_workers_counts_are_summed_by_the_parent(tmp_path, setup):
    rules, userdb = setup
    sp = start(tmp_path, rules, userdb, "--workers", "2", listening=2)
    try:
        sp.log.wait_for(rf"metrics: http://127\.0\.0\.1:{sp.metrics_port}/metrics, served by "
                        rf"the parent, pid {sp.proc.pid}", count=2)
        fingerprint, n_rules = rules_facts(sp)
        pids = {int(m.group(1)) for m in
                sp.log.wait_for(r"listening on 127\.0\.0\.1:\d+ \(pid (\d+)", count=2)}
        session_mix(sp.port)
        # spread over both workers: more accepted messages, each its own connection
        for _ in range(20):
            with smtplib.SMTP("127.0.0.1", sp.port, timeout=TIMEOUT) as s:
                s.mail("a@sender.test")
                s.rcpt("user@example.com")
                assert s.data(MESSAGE)[0] == 250
        sizes = message_sizes(sp, 22)
        writers = {int(m.group(1)) for m in
                   sp.log.wait_for(r"\[(\d+)\] INFO action=accept stage=DATA", count=22)}
        assert writers == pids                  # both workers took messages
        want = expected_mix(sizes, hop_ok=22)
        want["mailfilter_connections_total"] = {(): 27.0}
        want["mailfilter_sessions_total"][labels(outcome="quit")] = 24.0
        want["mailfilter_verdicts_total"][labels(stage="RCPT", action="accept",
                                                 rule_file="recipients")] = 22.0
        want["mailfilter_verdicts_total"][labels(stage="DATA", action="accept", rule_file="-")] = 22.0
        want["mailfilter_messages_total"] = {labels(result="accepted"): 22.0}
        got = wait_for_counts(sp.metrics_port, want)
        # every worker has the same rules: the gauges are not summed
        assert got["mailfilter_rules_info"] == {labels(fingerprint=fingerprint): 1.0}
        assert got["mailfilter_rules"] == {(): float(n_rules)}

        # SIGHUP reaches both workers: two rule reloads
        sp.signal(signal.SIGHUP)
        sp.log.wait_for(r"reload ok: ", count=2)
        wait_for_counts(sp.metrics_port, {"mailfilter_reloads_total": {
            labels(what="rules", result="ok"): 2.0, labels(what="tls", result="ok"): 2.0}})

        # a worker killed outright: it is replaced, and what it had written stays
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        sp.log.wait_for(rf"worker {victim} was killed by signal 9; starting a new one")
        sp.log.wait_for(r"listening on 127\.0\.0\.1:\d+ \(pid (\d+)", count=3)
        want["mailfilter_reloads_total"] = {labels(what="rules", result="ok"): 2.0,
                                            labels(what="tls", result="ok"): 2.0}
        got = wait_for_counts(sp.metrics_port, want)
        assert got["mailfilter_rules_info"] == {labels(fingerprint=fingerprint): 1.0}
        [files] = os.listdir(tmp_path / "tmp")   # the parent's private directory of files
        assert files.startswith("mailfilter-metrics-")
        assert oct(os.stat(tmp_path / "tmp" / files).st_mode & 0o777) == "0o700"
    finally:
        assert sp.stop() == 0
    assert os.listdir(tmp_path / "tmp") == []      # removed when the parent exits


def run_with_metrics_port_taken(*argv, cwd=None) -> tuple[subprocess.CompletedProcess, int]:
    """`python -m mailfilter ARGV --metrics 127.0.0.1:PORT` while PORT is
    held by a listening socket: (the finished process, PORT)."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        return subprocess.run([sys.executable, "-m", "mailfilter", *argv,
                               "--metrics", f"127.0.0.1:{port}"],
                              capture_output=True, text=True, timeout=60, env=child_env(),
                              cwd=cwd), port


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_metrics_port_in_use_is_a_startup_error(tmp_path, setup, workers):
    rules, _ = setup
    proc, port = run_with_metrics_port_taken(
        "serve", "--rules", rules, "--listen", f"127.0.0.1:{free_port()}", "--remote-host", "off",
        "--deliver", f"maildir:{tmp_path}/spool", "--workers", workers, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        f"mailfilter serve: --metrics 127.0.0.1:{port}: Address already in use", proc.stderr


def test_a_bad_metrics_address_is_a_startup_error(tmp_path, setup):
    rules, _ = setup
    proc = subprocess.run(
        [sys.executable, "-m", "mailfilter", "serve", "--rules", rules, "--metrics", "9100"],
        capture_output=True, text=True, timeout=60, env=child_env(), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("mailfilter serve: --metrics wants HOST:PORT with PORT "
                                   "0-65535, got '9100'")


def test_without_metrics_nothing_listens_and_prometheus_is_not_imported(tmp_path, setup):
    """Off by default: no endpoint, no prometheus_client in the process."""
    rules, _ = setup
    probe = ("import sys, mailfilter.serve.lifecycle as l, mailfilter.serve.supervise;"
             "from mailfilter.serve.config import ServeOptions;"
             f"st = l.build_state(ServeOptions(rules={rules!r}, deliver='discard', no_tls=True));"
             "assert st.metrics is None and st.session_config.metrics is None;"
             "print('prometheus_client' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60, env=child_env(), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_limits_and_proxy_headers_are_counted(tmp_path, setup):
    """The limits the server has (a second connection past --max-per-ip, an
    idle client past --timeout) and PROXY headers, good and bad, on a
    --proxy-listen address."""
    rules, userdb = setup
    pport = free_port()
    sp = start(tmp_path, rules, userdb, "--max-per-ip", "1", "--timeout", "1",
               "--proxy-listen", f"127.0.0.1:{pport}", "--proxy-protocol", "127.0.0.1/32")
    try:
        # spawn_serve's probe has left (its slot for 127.0.0.1 is free again)
        wait_for_counts(sp.metrics_port, {"mailfilter_sessions_total": {
            labels(outcome="disconnect"): 1.0}})
        with RawClient(sp.port) as idle:
            assert idle.reply()[0] == 220
            with RawClient(sp.port) as second:
                assert second.reply()[0] == 421
            assert idle.reply()[0] == 421             # --timeout 1: the idle one is closed
            assert idle.at_eof()
        with RawClient(pport) as c:
            c.send(b"PROXY TCP4 192.0.2.7 192.0.2.1 40000 25\r\n")
            assert c.reply()[0] == 220
            assert c.cmd("QUIT")[0] == 221
        with RawClient(pport) as c:
            c.send(b"GET / HTTP/1.0\r\n\r\n")
            assert c.at_eof()
        with RawClient(pport, source="127.0.0.2") as c:    # not a --proxy-protocol source
            assert c.at_eof()
        wait_for_counts(sp.metrics_port, {
            "mailfilter_connections_total": {(): 6.0},
            "mailfilter_connections_refused_total": {labels(reason="conn_count"): 1.0,
                                                     labels(reason="proxy_header"): 1.0,
                                                     labels(reason="proxy_source"): 1.0},
            "mailfilter_limit_hits_total": {labels(limit="conn_count"): 1.0,
                                            labels(limit="timeout"): 1.0},
            "mailfilter_sessions_total": {labels(outcome="disconnect"): 1.0,
                                          labels(outcome="timeout"): 1.0,
                                          labels(outcome="quit"): 1.0},
            "mailfilter_proxy_headers_total": {labels(version="1", command="PROXY"): 1.0},
            "mailfilter_connections_open": {(): 0.0}})
    finally:
        assert sp.stop() == 0


def test_rate_limits_and_state_fallbacks_are_counted(tmp_path, setup):
    """--max-msg-rate 1 with --state naming a Redis that is not there: the
    checks are answered from the process's own counts (each one a state
    store fallback, by check), and the second MAIL's 451 is a msg_rate limit
    hit and a MAIL tempfail verdict (docs/behaviour/limits.md)."""
    rules, userdb = setup
    nobody = free_port()                # nothing listens there: Redis is down
    sp = start(tmp_path, rules, userdb, "--max-msg-rate", "1", "--state",
               f"redis://127.0.0.1:{nobody}/0")
    try:
        with smtplib.SMTP("127.0.0.1", sp.port, timeout=TIMEOUT) as s:
            s.ehlo("client.test")
            assert s.mail("a@sender.test")[0] == 250
            assert s.rset()[0] == 250
            code, text = s.mail("b@sender.test")
            assert (code, text) == (451, b"4.7.1 too many messages from your address, try again later")
        got = wait_for_counts(sp.metrics_port, {
            "mailfilter_limit_hits_total": {labels(limit="msg_rate"): 1.0}})
        assert got["mailfilter_verdicts_total"][
            labels(stage="MAIL", action="tempfail", rule_file="--max-msg-rate")] == 1.0
        fallbacks = got["mailfilter_state_store_fallbacks_total"]
        # spawn_serve's probe and this client: two connects; two MAIL rate checks
        assert fallbacks[labels(limit="rate")] == 2.0
        assert fallbacks[labels(limit="connect")] == 2.0
        sp.log.wait_for(r"action=state_fallback store=redis://127\.0\.0\.1:\d+/0 ")
    finally:
        assert sp.stop() == 0
