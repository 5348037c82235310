"""`mailfilter policyd --metrics HOST:PORT`: requests counted by
protocol_state and action, the rules in force and reloads, scraped from the
spawned process (the policyd harness is tests/serve/test_policyd.py's)."""
from __future__ import annotations

import os
import signal

from tests.metrics.test_serve_metrics import (
    labels, run_with_metrics_port_taken, scrape, wait_for_counts,
)
from tests.serve.test_policyd import RULES, Policyd, answers, request
from tests.support.server_harness import free_port, write_rules


def test_policyd_counts_requests_and_reloads(tmp_path):
    rules = write_rules(tmp_path / "rules", RULES)
    mport = free_port()
    p = Policyd("--rules", rules, "--metrics", f"127.0.0.1:{mport}")
    try:
        [m] = p.log.wait_for(r"policyd: metrics on (\S+)")
        assert m.group(1) == f"http://127.0.0.1:{mport}/metrics"
        with p.connect() as s:
            s.sendall(request() + request(sender="spammer@example.org")
                      + request(protocol_state="MAIL", recipient=None)
                      + request(request="smtpd_something_else") + b"no equals sign\n\n")
            got = answers(s, 5)
        assert got[1].startswith("action=553 ")
        got = wait_for_counts(mport, {"mailfilter_policyd_requests_total": {
            labels(stage="RCPT", action="dunno"): 2.0,     # a local recipient; not ours
            labels(stage="RCPT", action="reject"): 1.0,
            labels(stage="MAIL", action="dunno"): 1.0,
            labels(stage="-", action="bad_request"): 1.0}})
        assert "mailfilter_connections_total" not in got        # serve's, not policyd's
        assert list(got["mailfilter_rules_info"].values()) == [1.0]
        p.proc.send_signal(signal.SIGHUP)
        p.log.wait_for(r"policyd: reload ok")
        os.unlink(os.path.join(rules, "rcpthosts"))
        p.proc.send_signal(signal.SIGHUP)
        p.log.wait_for(r"policyd: reload refused")
        wait_for_counts(mport, {"mailfilter_reloads_total": {
            labels(what="rules", result="ok"): 1.0, labels(what="rules", result="failed"): 1.0}})
        assert scrape(mport)["mailfilter_log_dropped_lines_total"] == {(): 0.0}
    finally:
        assert p.stop() == 0


def test_policyd_metrics_port_in_use_exits_2(tmp_path):
    rules = write_rules(tmp_path / "rules", RULES)
    proc, port = run_with_metrics_port_taken("policyd", "--rules", rules,
                                             "--listen", f"127.0.0.1:{free_port()}")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        f"mailfilter policyd: --metrics 127.0.0.1:{port}: Address already in use"
