"""The metric families: ONE table, from which both exports are made.

Job: declare every metric once (name, type, help, label names, and for a
gauge how the --workers processes combine), the way serve/config.py
declares options: the single-process collector (collector.py) and the
multiprocess file writer (mpfiles.py) both read this table, and
docs/operations.md#metrics lists it.

Invariants:
  - names carry the `mailfilter_` prefix and their unit (`_seconds`,
    `_bytes`); a counter's name is the family name, exposed with `_total`;
  - label values come from fixed sets (a stage, a reason tag, a rule FILE
    name, a mechanism, a next-hop kind), never from a client: no address,
    no host name, no user, no line number;
  - `mode` is prometheus_client's multiprocess_mode of a gauge: how the
    values of the --workers processes are combined (`livesum`: added over
    the live workers; `livemax`: the largest of them).
"""
from __future__ import annotations

from dataclasses import dataclass

COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
SERVE, POLICYD = "serve", "policyd"


@dataclass(frozen=True)
class Family:
    name: str                           # without `_total` for a counter
    kind: str                           # COUNTER, GAUGE or HISTOGRAM
    help: str
    labels: tuple[str, ...] = ()
    mode: str = ""                      # a gauge's multiprocess_mode
    programs: tuple[str, ...] = (SERVE,)


# delivery latency buckets, seconds: a maildir commit is milliseconds (an
# fsync), a forward tens of ms to seconds, and HANDOVER_TIMEOUT is 540 s
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0, 300.0, 540.0)

FAMILIES: tuple[Family, ...] = (
    Family("mailfilter_connections_open", GAUGE, "Connections open now (with --workers: summed "
           "over the live workers, as of their last write, at most a second old)", mode="livesum"),
    Family("mailfilter_connections", COUNTER, "Connections accepted, including those refused "
           "at connect"),
    Family("mailfilter_connections_refused", COUNTER, "Connections refused at connect, by the "
           "reason of their action=refuse line (or dnsbl)", ("reason",)),
    Family("mailfilter_sessions", COUNTER, "SMTP sessions ended, by how they ended", ("outcome",)),
    Family("mailfilter_verdicts", COUNTER, "Policy decisions, one per decision line, by stage, "
           "action and the file of the deciding rule (- when none)",
           ("stage", "action", "rule_file")),
    Family("mailfilter_messages", COUNTER, "Messages at the end of DATA, by the reply "
           "(accepted, rejected, tempfailed)", ("result",)),
    Family("mailfilter_message_bytes", COUNTER, "Octets of the messages counted in "
           "mailfilter_messages_total, by the same result", ("result",)),
    Family("mailfilter_deliveries", COUNTER, "Hand-overs to the next hop, by its kind and the "
           "result (ok, tempfail, reject, error)", ("hop", "result")),
    Family("mailfilter_delivery_duration_seconds", HISTOGRAM, "Seconds from the end of DATA to "
           "the next hop's answer", ("hop",)),
    Family("mailfilter_auth", COUNTER, "AUTH attempts, by mechanism and result, one per "
           "action=auth line", ("mechanism", "result")),
    Family("mailfilter_tls_handshakes", COUNTER, "TLS handshakes, by stage (STARTTLS, or CONNECT "
           "for implicit TLS) and result (ok, timeout, eof, error, no_certificate)",
           ("stage", "result")),
    Family("mailfilter_proxy_headers", COUNTER, "PROXY protocol headers taken, by version and "
           "command", ("version", "command")),
    Family("mailfilter_limit_hits", COUNTER, "Limits reached, by limit", ("limit",)),
    Family("mailfilter_state_store_fallbacks", COUNTER, "Limit decisions taken on local state "
           "because the shared state store could not answer, by limit", ("limit",)),
    Family("mailfilter_log_dropped_lines", COUNTER, "Log lines dropped because syslog did not "
           "take them (the action=log_gap lines' dropped=N, added up)",
           programs=(SERVE, POLICYD)),
    Family("mailfilter_rules_info", GAUGE, "1 for the fingerprint of the rules in force (the "
           "start-up line's 16 hex digits)", ("fingerprint",), mode="livemax",
           programs=(SERVE, POLICYD)),
    Family("mailfilter_rules", GAUGE, "Rules in the bundle in force", mode="livemax",
           programs=(SERVE, POLICYD)),
    Family("mailfilter_rules_loaded_timestamp_seconds", GAUGE, "Unix time the rules in force "
           "were loaded", mode="livemax", programs=(SERVE, POLICYD)),
    Family("mailfilter_rules_load_seconds", GAUGE, "Seconds the last load of the rules took "
           "(compile and load)", mode="livemax", programs=(SERVE, POLICYD)),
    Family("mailfilter_reloads", COUNTER, "Reloads (SIGHUP, a --bundle replaced), by what was "
           "reloaded (rules, tls) and the result (ok, failed)", ("what", "result"),
           programs=(SERVE, POLICYD)),
    Family("mailfilter_policyd_requests", COUNTER, "Policy requests answered, by protocol_state "
           "and action (dunno, reject, defer, bad_request, internal_error)", ("stage", "action"),
           programs=(POLICYD,)),
)

BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}
