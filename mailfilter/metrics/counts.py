"""The counts one process keeps: plain numbers, updated where things happen.

Job: the hot path's side of the metrics. A session, the shell, AUTH and
the reload code call one small method per event: a dict or list update, no
lock, no file, no prometheus_client call (a few tenths of a µs, where a
prometheus_client Counter costs 1 µs and more, and an mmap write per event
in multiprocess mode; bench/README.md has the figures). `samples()` turns
the numbers into the families of families.py when they are read: at
scrape time in a single process (collector.py), once a second under
--workers (mpfiles.py).

Invariants:
  - only the event loop's thread writes; a reader in another thread (the
    HTTP endpoint's) copies each table first (a dict copy is atomic under
    the GIL), so it sees every count once, possibly a turn late;
  - every label value is taken from a fixed set here (normalised: an
    unknown AUTH mechanism is `other`, a TLS error `error`) or is a rule
    FILE name, so a client cannot make a new time series;
  - values kept elsewhere (open connections, dropped log lines) are read
    from `sources` at sample time, not copied on every change.
"""
from __future__ import annotations

import time
from bisect import bisect_left

from mailfilter.metrics.families import BY_NAME, COUNTER, FAMILIES, HISTOGRAM, LATENCY_BUCKETS

NO_RULE = "-"
AUTH_MECHANISMS = frozenset(("PLAIN", "LOGIN", "CRAM-MD5"))
TLS_RESULTS = frozenset(("ok", "timeout", "eof", "no_certificate"))
POLICYD_STAGES = frozenset(("-", "CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE",
                            "VRFY", "ETRN"))
RAW_MAX = 4096              # decision rows (Verdicts, rule lines) kept before they are folded by file
# a commit's reply action -> its message result and its delivery result
ACTIONS = ("accept", "reject", "tempfail")
_MESSAGE_RESULTS = {"accept": "accepted", "reject": "rejected", "tempfail": "tempfailed"}
_DELIVERY_RESULTS = {"accept": "ok", "reject": "reject", "tempfail": "tempfail"}


def rule_file(rule: str | None) -> str:
    """The file of a `file:line` rule (the label: no line number)."""
    if not rule:
        return NO_RULE
    return rule.partition(":")[0]


def session_outcome(reason: str) -> str:
    """An engine close reason as an outcome: `eof` is the client leaving
    without QUIT; a reply code (the server closed with a 421, 554, ...) is
    `reply_NNN`; the rest with `_` for spaces (`too many errors`)."""
    if reason == "eof":
        return "disconnect"
    if reason.isdigit():
        return f"reply_{reason}"
    return reason.replace(" ", "_")


# the tables the hooks add to directly: attribute -> family
_TABLES = (
    ("connections", "mailfilter_connections"), ("refused", "mailfilter_connections_refused"),
    ("sessions", "mailfilter_sessions"), ("messages", "mailfilter_messages"),
    ("message_bytes", "mailfilter_message_bytes"), ("deliveries", "mailfilter_deliveries"),
    ("auth_results", "mailfilter_auth"), ("tls", "mailfilter_tls_handshakes"),
    ("proxy", "mailfilter_proxy_headers"), ("limits", "mailfilter_limit_hits"),
    ("fallbacks", "mailfilter_state_store_fallbacks"), ("reloads", "mailfilter_reloads"),
    ("policyd", "mailfilter_policyd_requests"),
)


def _verdict_key(row) -> tuple[str, str, str]:
    """(stage, action, rule file) of a decided() row: a Verdict or a tuple."""
    if type(row) is tuple:
        stage, action, rule = row
    else:
        stage, rule = row.stage, row.rule
        action = "accept" if row.accept else ("tempfail" if row.reply.temporary else "reject")
    return stage, action, rule_file(rule)


def _bump(table: dict, key: tuple, n: int = 1) -> None:
    table[key] = table.get(key, 0) + n


class Counts:
    """One process's counts; see the module docstring."""

    __slots__ = ("program", "values", "latency", "sources", "hop", "_raw", "_verdict_tables",
                 "_commits", "refused", "sessions", "messages", "message_bytes", "deliveries",
                 "auth_results", "tls", "proxy", "limits", "fallbacks", "reloads",
                 "policyd", "connections")

    def __init__(self, program: str = "serve", hop: str = "-") -> None:
        self.program = program
        self.hop = hop                          # the next hop's kind (one per process)
        self.values: dict[str, dict[tuple, float]] = {
            f.name: {} for f in FAMILIES if f.kind != HISTOGRAM and program in f.programs}
        # the hop's latency: non-cumulative bucket counts, +Inf last, then the sum
        self.latency = [0] * (len(LATENCY_BUCKETS) + 2)
        self.sources: dict[str, object] = {}    # family -> zero-argument callable
        # verdicts: (stage, action, rule as logged) -> n, the rows written now,
        # and the rows folded by rule file before (never changed once made);
        # a reader takes the pair at once, so it sees each count once
        self._raw: dict[tuple, int] = {}
        self._verdict_tables: tuple[dict, dict] = ({}, self._raw)
        # commits by their reply's action: [messages, octets]
        self._commits = {a: [0, 0] for a in ACTIONS}
        for slot, family in _TABLES:        # None: not a family of this program
            setattr(self, slot, self.values.get(family))

    # --- connections and sessions ------------------------------------------------
    def connection(self) -> None:
        _bump(self.connections, ())

    def refuse(self, reason: str) -> None:
        """A connection refused at connect (`reason` of its action=refuse line)."""
        _bump(self.refused, (reason,))

    def session_end(self, outcome: str) -> None:
        _bump(self.sessions, (outcome,))

    def limit_hit(self, limit: str) -> None:
        """A limit was reached (`limit`: its name, a fixed word: conn_count,
        msg_rate, timeout, ...). The hook for every limit, the shared-store
        ones too."""
        _bump(self.limits, (limit,))

    def state_fallback(self, limit: str) -> None:
        """A limit decided on this process's own state because the shared
        state store did not answer (`limit`: the store's check, a fixed word:
        connect, disconnect, rate, auth_view, auth_fail, auth_ok)."""
        _bump(self.fallbacks, (limit,))

    # --- decisions ---------------------------------------------------------------
    def verdict(self, stage: str, action: str, rule: str | None) -> None:
        """One decision line: `action` accept, reject or tempfail; `rule`
        as the line names it (file:line, a file, or None). Counted by the
        rule as given (no parsing here); the file is taken when read."""
        self.decided((stage, action, rule))

    def decided(self, v) -> None:
        """One decision line for the policy Verdict `v` (policy/verdict.py),
        or a (stage, action, rule) row. A Verdict is counted by identity:
        the accepts a session gives most (a recipient accepted by a rule)
        are shared, read-only objects, so this is one dict update with no
        tuple made and no string hashed; what it decided is read from it
        when the counts are read."""
        d = self._raw
        n = d.get(v)
        if n is None:
            if len(d) >= RAW_MAX:
                d = self._fold()
            n = 0
        d[v] = n + 1

    def _fold(self) -> dict:
        """The rows so far added up by rule file into a new folded table;
        a new, empty table for the rows to come (bounds the memory: a row
        per fresh Verdict, or per rule line hit, would grow without end)."""
        folded = dict(self._verdict_tables[0])
        for row, n in self._raw.items():
            _bump(folded, _verdict_key(row), n)
        self._raw = {}
        self._verdict_tables = (folded, self._raw)
        return self._raw

    def message(self, result: str, size: int) -> None:
        """The end of DATA: `result` accepted, rejected or tempfailed."""
        key = (result,)
        _bump(self.messages, key)
        _bump(self.message_bytes, key, size)

    def delivery(self, result: str, seconds: float | None) -> None:
        """A hand-over to the next hop: `result` ok, tempfail, reject or
        error (it raised); `seconds` it took (None: not measured)."""
        _bump(self.deliveries, (self.hop, result))
        if seconds is not None:
            h = self.latency
            h[bisect_left(LATENCY_BUCKETS, seconds)] += 1
            h[-1] += seconds

    def committed(self, action: str, size: int, seconds: float) -> None:
        """A commit the next hop answered (its reply's `action`: accept,
        reject, tempfail) after `seconds`: once per message, so one row and
        the latency here; the DATA decision, the message and the delivery
        are made from the row when read."""
        row = self._commits[action]
        row[0] += 1
        row[1] += size
        h = self.latency
        h[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        h[-1] += seconds

    # --- AUTH, TLS, PROXY ----------------------------------------------------------
    def auth(self, mechanism: str | None, result: str) -> None:
        mech = mechanism if mechanism in AUTH_MECHANISMS else ("-" if mechanism is None else "other")
        _bump(self.auth_results, (mech, result))

    def handshake(self, stage: str, result: str) -> None:
        _bump(self.tls, (stage, result if result in TLS_RESULTS else "error"))

    def proxy_header(self, version: int, command: str) -> None:
        _bump(self.proxy, (str(version), command))

    # --- rules and reloads ---------------------------------------------------------
    def rules_loaded(self, bundle, seconds: float) -> None:
        """The rules in force are now `bundle`, loaded in `seconds`."""
        fp = bundle.fingerprint.hex()[:16] if getattr(bundle, "fingerprint", None) else NO_RULE
        self.values["mailfilter_rules_info"] = {(fp,): 1}
        self.values["mailfilter_rules"] = {(): bundle.n_rules}
        self.values["mailfilter_rules_loaded_timestamp_seconds"] = {(): time.time()}
        self.values["mailfilter_rules_load_seconds"] = {(): seconds}

    def reload(self, what: str, ok: bool) -> None:
        _bump(self.reloads, (what, "ok" if ok else "failed"))

    def policyd_request(self, stage: str, action: str) -> None:
        _bump(self.policyd, (stage if stage in POLICYD_STAGES else "other", action))

    # --- reading ---------------------------------------------------------------------
    def tables(self) -> dict[str, dict[tuple, float]]:
        """Every counter and gauge family of the program: {name: {labels:
        value}}, copied, with the verdict rows by rule file and the commit
        rows spread over their families."""
        out = {name: table.copy() for name, table in self.values.items()}
        for name, source in self.sources.items():
            out[name] = {(): source()}
        if self.program not in BY_NAME["mailfilter_verdicts"].programs:
            return out
        folded, raw = self._verdict_tables
        verdicts = out["mailfilter_verdicts"] = dict(folded)
        for row, n in raw.copy().items():
            _bump(verdicts, _verdict_key(row), n)
        for action, row in self._commits.items():
            n, size = list(row)
            if not n:
                continue
            for name, key, value in (
                    ("mailfilter_verdicts", ("DATA", action, NO_RULE), n),
                    ("mailfilter_messages", (_MESSAGE_RESULTS[action],), n),
                    ("mailfilter_message_bytes", (_MESSAGE_RESULTS[action],), size),
                    ("mailfilter_deliveries", (self.hop, _DELIVERY_RESULTS[action]), n)):
                _bump(out[name], key, value)
        return out

    def samples(self):
        """(family, label values, value) for every counter and gauge series,
        then (family, (hop,), (bucket counts, +Inf last; sum)) for the
        latency histogram once a delivery was timed. A label-less counter
        is there even at 0."""
        for name, table in self.tables().items():
            fam = BY_NAME[name]
            if not table and fam.kind == COUNTER and not fam.labels:
                table = {(): 0}
            for labels, value in table.items():
                yield fam, labels, value
        fam = BY_NAME["mailfilter_delivery_duration_seconds"]
        h = list(self.latency)
        if self.program in fam.programs and any(h[:-1]):
            yield fam, (self.hop,), (h[:-1], h[-1])
