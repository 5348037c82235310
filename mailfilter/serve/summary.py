"""What is in force: the start-up lines an operator reads to know what runs.

Job: once a serving process listens, log one line per subject, each from
the objects that are actually serving (not from the options alone):
  rules   where they came from, how many, the dialect, the fingerprint
  deliver the next hop (and the tcp.smtp QMAILQUEUE programs, checked)
  auth    who is offered AUTH and what verifies it; a missing user database
          is a WARNING now, not a silent 454 at the first AUTH
  ehlo    the EHLO keywords offered (CHUNKING, SMTPUTF8 or not, SIZE), and
          which ones depend on the client
  limits  connections, timeouts, DATA limits, --deny
  state   where the per-client limits and AUTH failure counts live, the rates
  metrics where Prometheus scrapes (--metrics), and which process serves it
  signals the pid to signal (the parent's under --workers) and what each does
Invariants: every line starts with its subject and a colon; nothing here
changes state; a subject that cannot be described is left out, never an
exception (this runs after the server listens).
docs/operations.md#start-up names the lines.
"""
from __future__ import annotations

import logging
import os

from mailfilter.smtp.engine import SMTPConnection

logger = logging.getLogger("mailfilter")


def rules_line(state, opts) -> str:
    b = state.policy.bundle
    where = f"bundle {opts.bundle}" if opts.bundle else f"directory {opts.rules}"
    fp = b.fingerprint.hex()[:16] if getattr(b, "fingerprint", None) else "-"
    return (f"rules: {b.n_rules} rules from {where} (dialect {b.dialect}, "
            f"fingerprint {fp}, tcp.smtp {'present' if b.tcp_present else 'absent'})")


def auth_lines(state, opts) -> list[tuple[int, str]]:
    """(level, text): who is offered AUTH, with what, and whether it can work."""
    b = state.policy.bundle
    per_client = sorted({s["SMTPAUTH"] for s in b.tcp_settings if "SMTPAUTH" in s})
    offered = opts.auth not in (None, "-") or any(v != "-" for v in per_client)
    who = (f"--auth {opts.auth!r} for every client" if opts.auth is not None
           else "per tcp.smtp SMTPAUTH only")
    if per_client:
        who += f" (tcp.smtp values: {', '.join(repr(v) for v in per_client)})"
    if not offered:
        return [(logging.INFO, f"auth: off ({who})")]
    if opts.checkpassword:
        return [(logging.INFO, f"auth: {who}; verified by --checkpassword {opts.checkpassword!r} "
                               f"(order {opts.checkpassword_order})")]
    path = opts.userdb
    if not os.path.exists(path):
        return [(logging.WARNING,
                 f"auth: {who}; the user database {path} does not exist: every AUTH will be "
                 f"answered 454 until it does (mailfilter passwd --db {path} add USER)")]
    return [(logging.INFO, f"auth: {who}; user database {os.path.abspath(path)}")]


def qmailqueue_lines(state, opts) -> list[tuple[int, str]]:
    """tcp.smtp QMAILQUEUE programs: used only with a qmail-queue: next hop,
    and each must be an executable file (else its clients' messages would
    get 451 one by one)."""
    progs = sorted({s["QMAILQUEUE"] for s in state.policy.bundle.tcp_settings if "QMAILQUEUE" in s})
    if not progs:
        return []
    if not opts.deliver.startswith("qmail-queue:"):
        return [(logging.WARNING, f"deliver: tcp.smtp QMAILQUEUE ({', '.join(progs)}) is used only "
                                  f"with a qmail-queue: next hop, not {opts.deliver}")]
    out = []
    for prog in progs:
        if os.path.isfile(prog) and os.access(prog, os.X_OK):
            out.append((logging.INFO, f"deliver: tcp.smtp QMAILQUEUE {prog} for its clients"))
        else:
            out.append((logging.WARNING, f"deliver: tcp.smtp QMAILQUEUE {prog} is not an "
                                         "executable file: its clients' messages will get 451"))
    return out


def ehlo_line(state) -> str:
    """The keywords every EHLO gets, as the engine builds them (a connection
    made with the server's engine configuration), then the per-client ones."""
    keywords = SMTPConnection(state.engine_config).ehlo_keywords()
    return (f"ehlo: {', '.join(keywords)}; per client: SIZE by tcp.smtp DATABYTES, STARTTLS "
            "unless --no-tls or UCSPITLS=\"-\", AUTH by SMTPAUTH")


def limits_line(state, opts) -> str:
    lim = state.limits
    return (f"limits: {lim.max_connections} sessions, {lim.max_per_ip} per client address, "
            f"idle timeout {lim.idle_timeout:g} s, session deadline {lim.session_deadline:g} s, "
            f"DATA at least {lim.data_min_rate:g} bytes/s over {lim.data_rate_window:g} s "
            f"and within {lim.data_deadline:g} s, header kept up to {lim.header_size_limit} bytes; "
            f"tcp.smtp deny: {opts.deny}")


def metrics_lines(opts) -> list[tuple[int, str]]:
    if opts.metrics is None:
        return []
    host, _, port = opts.metrics.rpartition(":")
    url = f"http://{host or '0.0.0.0'}:{port}/metrics"
    if opts.workers > 1:
        return [(logging.INFO, f"metrics: {url}, served by the parent, pid {os.getppid()}, "
                               f"for the {opts.workers} workers (each writes once a second)")]
    return [(logging.INFO, f"metrics: {url}")]


def state_line(state, opts) -> str:
    """The store the anvil and AUTH count in (--state), and the rate defaults."""
    anvil = state.anvil
    cfg = anvil.config
    store = anvil.store
    where = (f"Redis {store.url} (prefix {opts.state_prefix!r}, timeout {store.timeout:g} s; "
             "shared by every process naming it, local counts while it cannot be reached)"
             if store.shared else "local (each process counts for itself)")
    rates = ", ".join(f"{name} {n or 'off'}" for name, n in (
        ("connections", cfg.max_conn_rate), ("messages", cfg.max_msg_rate),
        ("recipients", cfg.max_rcpt_rate)))
    exempt = "RELAYCLIENT clients exempt" if cfg.relay_exempt else "RELAYCLIENT clients counted"
    return (f"state: {where}; per client address: {cfg.max_per_ip} connections at once, per "
            f"{cfg.window:g} s: {rates} ({exempt}); AUTH failures counted there too")


def signals_line(opts) -> str:
    if opts.workers > 1:
        return (f"signals: {opts.workers} workers; signal the parent, pid {os.getppid()}: "
                "HUP reloads rules and certificates, TERM stops")
    return f"signals: pid {os.getpid()}: HUP reloads rules and certificates, TERM stops"


def log_in_force(state, opts) -> None:
    """The lines, logged; a worker under --workers logs them too (its own
    pid names it), so a worker started again after a crash says the same."""
    lines: list[tuple[int, str]] = []
    for make in (lambda: [(logging.INFO, rules_line(state, opts))],
                 lambda: [(logging.INFO, f"deliver: {opts.deliver}")],
                 lambda: qmailqueue_lines(state, opts),
                 lambda: auth_lines(state, opts),
                 lambda: [(logging.INFO, ehlo_line(state))],
                 lambda: [(logging.INFO, limits_line(state, opts))],
                 lambda: [(logging.INFO, state_line(state, opts))],
                 lambda: metrics_lines(opts),
                 lambda: [(logging.INFO, signals_line(opts))]):
        try:
            lines.extend(make())
        except Exception:       # a description must never stop a server that listens
            logger.exception("start-up summary")
    for level, text in lines:
        logger.log(level, "%s", text)
