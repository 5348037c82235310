"""metrics/counts.py, collector.py and mpfiles.py without a server: the
counts each hook makes, the label values they may take, the single-process
exposition (read back with prometheus_client's parser) and the multiprocess
files (written by a real forked process, merged by MultiProcessCollector)."""
from __future__ import annotations

import os

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from mailfilter.metrics import counts as counts_mod
from mailfilter.metrics import mpfiles
from mailfilter.metrics.collector import registry_for
from mailfilter.metrics.counts import Counts
from mailfilter.metrics.families import FAMILIES, LATENCY_BUCKETS
from mailfilter.policy.verdict import Verdict
from mailfilter.smtp.replies import reply


def read(registry) -> dict[str, dict[tuple, float]]:
    """{sample name: {sorted label pairs: value}} as Prometheus would read them."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def L(**kw) -> tuple:
    return tuple(sorted(kw.items()))


class FakeBundle:
    def __init__(self, fingerprint: bytes, n_rules: int):
        self.fingerprint = fingerprint
        self.n_rules = n_rules


def test_families_follow_the_naming_rules():
    for f in FAMILIES:
        assert f.name.startswith("mailfilter_") and not f.name.endswith("_total")
        assert f.kind != "gauge" or f.mode.startswith("live")
        assert not {"client", "ip", "host", "user", "address", "to", "from"} & set(f.labels)


def test_verdicts_are_counted_by_rule_file():
    c = Counts("serve", hop="maildir")
    c.verdict("RCPT", "accept", "recipients:2")
    c.verdict("RCPT", "accept", "recipients:4")
    c.verdict("RCPT", "reject", "rcpthosts")         # a list not naming the address
    c.verdict("DATA", "reject", None)                 # bare LF: no rule
    c.verdict("MAIL", "reject", "tcp.smtp:12")
    got = read(registry_for(c))["mailfilter_verdicts_total"]
    assert got == {L(stage="RCPT", action="accept", rule_file="recipients"): 2.0,
                   L(stage="RCPT", action="reject", rule_file="rcpthosts"): 1.0,
                   L(stage="DATA", action="reject", rule_file="-"): 1.0,
                   L(stage="MAIL", action="reject", rule_file="tcp.smtp"): 1.0}


def test_verdict_rows_are_folded_by_file_past_the_bound(monkeypatch):
    """One row per rule LINE would grow with the rules hit: past RAW_MAX
    rows they are added up by file, and no count is lost or doubled."""
    monkeypatch.setattr(counts_mod, "RAW_MAX", 8)
    c = Counts("serve")
    for i in range(100):
        c.verdict("RCPT", "reject", f"badmailfrom:{i}")
        c.verdict("RCPT", "accept", f"recipients:{i % 3}")
        assert len(c._raw) <= 8
    tables = c.tables()["mailfilter_verdicts"]
    assert tables == {("RCPT", "reject", "badmailfrom"): 100, ("RCPT", "accept", "recipients"): 100}


def test_verdict_objects_are_counted_by_what_they_decided(monkeypatch):
    """The session hands its policy Verdicts over as they are (a shared
    accept many times, fresh refusals): each is read back as stage, action
    and rule file, also after the rows were folded."""
    monkeypatch.setattr(counts_mod, "RAW_MAX", 16)
    shared = Verdict("RCPT", True, reply("rcpt_ok"), "ok", "recipients:3")
    c = Counts("serve")
    for i in range(50):
        c.decided(shared)
        c.decided(Verdict("RCPT", False, reply("badrcptto"), "badrcptto", f"badrcptto:{i}"))
        c.decided(Verdict("RCPT", False, reply("mf_dns_temp"), "mfdnscheck", None))
        assert len(c._raw) <= 16
    got = read(registry_for(c))["mailfilter_verdicts_total"]
    assert got == {L(stage="RCPT", action="accept", rule_file="recipients"): 50.0,
                   L(stage="RCPT", action="reject", rule_file="badrcptto"): 50.0,
                   L(stage="RCPT", action="tempfail", rule_file="-"): 50.0}


def test_a_commit_counts_the_decision_the_message_the_delivery_and_its_latency():
    """The latencies are values handed in (no clock is read): what is
    checked is the histogram's buckets, count and sum, not any speed."""
    c = Counts("serve", hop="smtp")
    c.committed("accept", 1000, 0.003)
    c.committed("accept", 500, 0.7)
    c.committed("tempfail", 200, 12.0)
    c.committed("reject", 300, 1000.0)                # past the last bound: +Inf
    # the rare paths: refused at the end of data, a commit that raised
    c.verdict("DATA", "reject", "databytes")
    c.message("rejected", 9000)
    c.verdict("DATA", "tempfail", None)
    c.message("tempfailed", 40)
    c.delivery("error", None)
    got = read(registry_for(c))
    assert got["mailfilter_messages_total"] == {
        L(result="accepted"): 2.0, L(result="tempfailed"): 2.0, L(result="rejected"): 2.0}
    assert got["mailfilter_message_bytes_total"] == {
        L(result="accepted"): 1500.0, L(result="tempfailed"): 240.0, L(result="rejected"): 9300.0}
    assert got["mailfilter_deliveries_total"] == {
        L(hop="smtp", result="ok"): 2.0, L(hop="smtp", result="tempfail"): 1.0,
        L(hop="smtp", result="reject"): 1.0, L(hop="smtp", result="error"): 1.0}
    assert got["mailfilter_verdicts_total"] == {
        L(stage="DATA", action="accept", rule_file="-"): 2.0,
        L(stage="DATA", action="tempfail", rule_file="-"): 2.0,
        L(stage="DATA", action="reject", rule_file="-"): 1.0,
        L(stage="DATA", action="reject", rule_file="databytes"): 1.0}
    buckets = got["mailfilter_delivery_duration_seconds_bucket"]
    assert buckets[L(hop="smtp", le="0.0025")] == 0.0
    assert buckets[L(hop="smtp", le="0.005")] == 1.0
    assert buckets[L(hop="smtp", le="1.0")] == 2.0
    assert buckets[L(hop="smtp", le="30.0")] == 3.0
    assert buckets[L(hop="smtp", le="540.0")] == 3.0
    assert buckets[L(hop="smtp", le="+Inf")] == 4.0
    assert len(buckets) == len(LATENCY_BUCKETS) + 1
    assert got["mailfilter_delivery_duration_seconds_count"] == {L(hop="smtp"): 4.0}
    assert got["mailfilter_delivery_duration_seconds_sum"][L(hop="smtp")] == pytest.approx(1012.703)


def test_label_values_come_from_fixed_sets():
    """A client chooses an AUTH mechanism name and a TLS failure; neither
    may make a new series."""
    c = Counts("serve")
    c.auth("PLAIN", "ok")
    c.auth("X-EVIL-MECH-1234", "unknown_mech")
    c.auth(None, "unavailable")
    c.handshake("STARTTLS", "ok")
    c.handshake("STARTTLS", "WRONG_VERSION_NUMBER")
    c.handshake("CONNECT", "timeout")
    got = read(registry_for(c))
    assert got["mailfilter_auth_total"] == {
        L(mechanism="PLAIN", result="ok"): 1.0, L(mechanism="other", result="unknown_mech"): 1.0,
        L(mechanism="-", result="unavailable"): 1.0}
    assert got["mailfilter_tls_handshakes_total"] == {
        L(stage="STARTTLS", result="ok"): 1.0, L(stage="STARTTLS", result="error"): 1.0,
        L(stage="CONNECT", result="timeout"): 1.0}


def test_limit_and_state_store_hooks():
    """The hooks the shared-state limits call (issue 14): one series per limit."""
    c = Counts("serve")
    for _ in range(3):
        c.limit_hit("rate_per_ip")
    c.limit_hit("max_per_ip")
    c.state_fallback("rate_per_ip")
    got = read(registry_for(c))
    assert got["mailfilter_limit_hits_total"] == {L(limit="rate_per_ip"): 3.0,
                                                  L(limit="max_per_ip"): 1.0}
    assert got["mailfilter_state_store_fallbacks_total"] == {L(limit="rate_per_ip"): 1.0}


def test_connections_sessions_proxy_and_sources():
    c = Counts("serve")
    open_now = [3]
    c.sources["mailfilter_connections_open"] = lambda: open_now[0]
    for _ in range(4):
        c.connection()
    c.refuse("max_connections")
    c.session_end(counts_mod.session_outcome("eof"))
    c.session_end(counts_mod.session_outcome("421"))
    c.session_end(counts_mod.session_outcome("too many errors"))
    c.proxy_header(2, "PROXY")
    c.proxy_header(2, "LOCAL")
    got = read(registry_for(c))
    assert got["mailfilter_connections_open"] == {(): 3.0}
    open_now[0] = 0                                    # read when scraped
    assert read(registry_for(c))["mailfilter_connections_open"] == {(): 0.0}
    assert got["mailfilter_connections_total"] == {(): 4.0}
    assert got["mailfilter_connections_refused_total"] == {L(reason="max_connections"): 1.0}
    assert got["mailfilter_sessions_total"] == {
        L(outcome="disconnect"): 1.0, L(outcome="reply_421"): 1.0,
        L(outcome="too_many_errors"): 1.0}
    assert got["mailfilter_proxy_headers_total"] == {L(version="2", command="PROXY"): 1.0,
                                                     L(version="2", command="LOCAL"): 1.0}


def test_rules_and_reloads():
    """The load durations (0.25, 0.5) are handed in: the gauge must show
    the latest one given, whatever the host's speed."""
    c = Counts("serve")
    c.rules_loaded(FakeBundle(bytes.fromhex("97cd99aa7e0b0c5d") + b"\0" * 24, 49), 0.25)
    c.reload("rules", True)
    c.rules_loaded(FakeBundle(bytes.fromhex("0123456789abcdef") + b"\0" * 24, 50), 0.5)
    c.reload("rules", False)
    got = read(registry_for(c))
    assert got["mailfilter_rules_info"] == {L(fingerprint="0123456789abcdef"): 1.0}
    assert got["mailfilter_rules"] == {(): 50.0}
    assert got["mailfilter_rules_load_seconds"] == {(): 0.5}
    assert got["mailfilter_reloads_total"] == {L(what="rules", result="ok"): 1.0,
                                               L(what="rules", result="failed"): 1.0}


def test_policyd_counts_only_its_families():
    c = Counts("policyd")
    c.policyd_request("RCPT", "reject")
    c.policyd_request("SOMETHING-NEW", "dunno")
    got = read(registry_for(c))
    assert got["mailfilter_policyd_requests_total"] == {
        L(stage="RCPT", action="reject"): 1.0, L(stage="other", action="dunno"): 1.0}
    assert "mailfilter_connections_total" not in got
    assert "mailfilter_log_dropped_lines_total" in got


def _child_writes(path: str) -> int:
    """A forked process that counts, writes its files and exits: its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            c = Counts("serve", hop="maildir")
            c.sources["mailfilter_connections_open"] = lambda: 2
            c.verdict("RCPT", "accept", "recipients:2")
            c.committed("accept", 100, 0.01)
            c.rules_loaded(FakeBundle(b"\xaa" * 32, 7), 0.1)
            mpfiles.FileWriter(c).close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return pid


def test_multiprocess_files_are_summed_and_a_dead_worker_keeps_its_counters(tmp_path, monkeypatch):
    monkeypatch.setenv(mpfiles.ENV, str(tmp_path))
    child = _child_writes(str(tmp_path))
    mine = Counts("serve", hop="maildir")
    open_here = [1]
    mine.sources["mailfilter_connections_open"] = lambda: open_here[0]
    mine.verdict("RCPT", "accept", "recipients:3")
    mine.committed("accept", 50, 2.0)
    mine.rules_loaded(FakeBundle(b"\xaa" * 32, 7), 0.2)
    writer = mpfiles.FileWriter(mine)
    writer.flush()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    got = read(registry)
    assert got["mailfilter_verdicts_total"] == {
        L(stage="RCPT", action="accept", rule_file="recipients"): 2.0,
        L(stage="DATA", action="accept", rule_file="-"): 2.0}
    assert got["mailfilter_message_bytes_total"] == {L(result="accepted"): 150.0}
    assert got["mailfilter_connections_open"] == {(): 3.0}                   # livesum
    assert got["mailfilter_rules_info"] == {L(fingerprint="aa" * 8): 1.0}     # livemax
    assert got["mailfilter_delivery_duration_seconds_count"] == {L(hop="maildir"): 2.0}
    assert got["mailfilter_delivery_duration_seconds_bucket"][L(hop="maildir", le="0.01")] == 1.0

    # the child is gone: its live gauges go, its counters stay
    mpfiles.worker_gone(child, str(tmp_path))
    # and this process reloads other rules: the old fingerprint is written 0
    mine.rules_loaded(FakeBundle(b"\xbb" * 32, 8), 0.2)
    open_here[0] = 0
    mine.committed("accept", 10, 0.001)
    writer.flush()
    got = read(registry)
    assert got["mailfilter_connections_open"] == {(): 0.0}
    assert got["mailfilter_rules_info"] == {L(fingerprint="aa" * 8): 0.0,
                                            L(fingerprint="bb" * 8): 1.0}
    assert got["mailfilter_rules"] == {(): 8.0}
    assert got["mailfilter_messages_total"] == {L(result="accepted"): 3.0}
    assert got["mailfilter_message_bytes_total"] == {L(result="accepted"): 160.0}


def test_the_writer_writes_only_what_changed(tmp_path, monkeypatch):
    monkeypatch.setenv(mpfiles.ENV, str(tmp_path))
    c = Counts("serve")
    writer = mpfiles.FileWriter(c)
    writer.flush()
    first = dict(writer._written)
    c.connection()
    writer.flush()
    changed = {k for k, v in writer._written.items() if first.get(k) != v}
    assert changed == {("mailfilter_connections_total", ())}


def test_make_dir_is_private_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.delenv(mpfiles.ENV, raising=False)
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    path = mpfiles.make_dir()
    assert os.environ[mpfiles.ENV] == path and os.path.dirname(path) == str(tmp_path)
    assert os.stat(path).st_mode & 0o777 == 0o700 and os.listdir(path) == []
    mpfiles.remove_dir(path)
    assert not os.path.exists(path)


def test_the_operations_table_lists_every_family_with_its_type_and_labels():
    """docs/operations.md#the-metrics is the operator's list: one row per
    family of families.py, its exposed name, type and labels."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "docs", "operations.md")) as fh:
        text = fh.read()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`mailfilter_"):
            labels = tuple(x.strip("` ") for x in cells[2].split(",") if x.strip())
            rows[cells[0].strip("`")] = (cells[1], labels)
    want = {(f.name + "_total" if f.kind == "counter" else f.name): (f.kind, f.labels)
            for f in FAMILIES}
    assert rows == want
