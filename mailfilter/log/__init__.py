"""Logging: one key=value decision line per verdict, anomalies, syslog.

Format (docs/architecture.md#errors-and-logging):
  action=reject stage=RCPT rule=badrcptto:14 client=host[ip]:port helo=<..>
  from=<..> to=<..> reply="553 5.7.1 .."
Values that could carry spaces, quotes or control characters are quoted and
escaped (quoting.py), so a hostile HELO cannot forge a second log line.
Secrets (AUTH responses, passwords) are never passed to this module.

Two routes, one order:
  - `setup()` (what `serve` calls) installs a fast sink (sink.py): decision,
    event and anomaly lines are formatted once and appended to its buffer,
    written once per event-loop turn; no `logging` record is made for them.
    The `mailfilter` logger keeps a handler that feeds the same sink, so the
    rare plain-text lines (start-up, reload, tracebacks) land in the same
    file or syslog socket, in order;
  - without `setup()` (library use, tests with pytest's caplog) the lines
    are records of the `mailfilter` logger, as any other.
A line is only formatted when its level is let through, so a quiet server
spends nothing on it.
"""
from __future__ import annotations

import atexit
import logging
import os
import socket
import sys

from mailfilter.log.quoting import MAX_VALUE, kv, kv_line, quote
from mailfilter.log.sink import DEFAULT_CAP, StreamSink, SyslogSink

__all__ = ["MAX_VALUE", "quote", "kv", "kv_line", "decision", "decision_in", "event", "event_in",
           "enabled", "anomaly", "setup", "flush", "close", "dropped_total", "logger", "LogSetupError"]

logger = logging.getLogger("mailfilter")
INFO, WARNING = logging.INFO, logging.WARNING
_sink = None        # the fast sink setup() installed, else None: the logger's records


class LogSetupError(ValueError):
    """The log cannot be set up (no syslog socket at the address): one line."""


def decision(verdict, *, client: str, tls=None, helo=None, sender=None, rcpt=None, **extra) -> None:
    """Log one policy verdict (policy.Verdict)."""
    sink = _sink
    if sink is None:
        if not logger.isEnabledFor(INFO):
            return
    elif sink.level > INFO:
        return
    r = verdict.reply
    line = kv_line({
        "action": "accept" if verdict.accept else ("tempfail" if r.temporary else "reject"),
        "stage": verdict.stage, "reason": verdict.reason, "rule": verdict.rule,
        "client": client, "tls": tls,
        "helo": None if helo is None else f"<{helo}>",
        "from": None if sender is None else f"<{sender}>",
        "to": None if rcpt is None else f"<{rcpt}>",
        "reply": str(r), **extra})
    if sink is None:
        logger.info(line)
    else:
        sink.write(INFO, line)


def enabled() -> bool:
    """Will an info line be written? (a caller skips building one otherwise)"""
    sink = _sink
    return logger.isEnabledFor(INFO) if sink is None else sink.level <= INFO


def decision_in(verdict, ctx: str, rcpt=None, tail: dict | None = None) -> None:
    """decision() with its client=, tls=, helo=, from= fields already made
    (`ctx`, from kv_line: a session quotes them once, not once per line);
    the same line, field for field."""
    r = verdict.reply
    head = kv_line({
        "action": "accept" if verdict.accept else ("tempfail" if r.temporary else "reject"),
        "stage": verdict.stage, "reason": verdict.reason, "rule": verdict.rule})
    rest = kv_line({"to": None if rcpt is None else f"<{rcpt}>", "reply": str(r), **(tail or {})})
    _info(f"{head} {ctx} {rest}")


def event_in(head: dict, ctx: str, tail: dict) -> None:
    """event(**head, client=.., tls=.., helo=.., from=.., **tail) with the
    middle fields already made (`ctx`): the same line, field for field."""
    _info(f"{kv_line(head)} {ctx} {kv_line(tail)}")


def _info(line: str) -> None:
    sink = _sink
    if sink is None:
        if logger.isEnabledFor(INFO):
            logger.info(line)
    elif sink.level <= INFO:
        sink.write(INFO, line)


def event(**fields) -> None:
    """One key=value line at level info (a close, a refusal, an AUTH attempt, ...)."""
    sink = _sink
    if sink is None:
        if logger.isEnabledFor(INFO):
            logger.info(kv_line(fields))
    elif sink.level <= INFO:
        sink.write(INFO, kv_line(fields))


def anomaly(tag: str, *, client: str, detail=None) -> None:
    """A protocol oddity at level warning."""
    sink = _sink
    if sink is None:
        if logger.isEnabledFor(WARNING):
            logger.warning(kv(anomaly=tag, client=client, detail=detail))
    elif sink.level <= WARNING:
        sink.write(WARNING, kv(anomaly=tag, client=client, detail=detail))


class _SinkHandler(logging.Handler):
    """The `mailfilter` logger's records (plain-text lines, tracebacks) into the sink."""

    def __init__(self, sink):
        super().__init__()
        self.sink = sink
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.sink.write(record.levelno, text, record.created)


def setup(level: str = "info", use_syslog: bool = False, syslog_address: str = "/dev/log",
          facility: str = "mail", ident: str = "mailfilter", *, syslog_format: str = "rfc3164",
          stream=None, buffer_size: int = DEFAULT_CAP):
    """Install the fast sink: stderr (or `stream`, a file with a descriptor)
    by default; `use_syslog` sends datagrams to `syslog_address` (a unix
    socket path, or HOST:PORT for UDP) instead. LogSetupError when the
    syslog socket cannot be opened. Returns the sink."""
    global _sink
    levelno = getattr(logging, level.upper())
    if use_syslog:
        try:
            new = SyslogSink(syslog_address, levelno, buffer_size, syslog_format, facility, ident)
        except (OSError, ValueError) as exc:
            what = getattr(exc, "strerror", None) or exc
            raise LogSetupError(f"--syslog-socket {syslog_address}: {what}"
                                + (" (is a syslog daemon listening there?)"
                                   if isinstance(exc, OSError) and not isinstance(exc, socket.gaierror)
                                   else "")) from None
    else:
        new = StreamSink((stream or sys.stderr).fileno(), levelno, buffer_size)
    close()
    root = logging.getLogger("mailfilter")
    root.setLevel(levelno)
    root.addHandler(_SinkHandler(new))
    root.propagate = False
    _sink = new
    return new


def flush(wait: float = 0.0) -> None:
    """Write out what is buffered now (a clean stop: syslog may wait up to `wait` s)."""
    if _sink is not None:
        _sink.flush(wait)


def dropped_total() -> int:
    """Lines the sink lost since start (0 without setup()): serve's metrics."""
    sink = _sink
    return 0 if sink is None else sink.dropped_total


def close() -> None:
    """Flush and remove the fast sink: the `mailfilter` logger as before setup()."""
    global _sink
    sink, _sink = _sink, None
    root = logging.getLogger("mailfilter")
    for h in list(root.handlers):
        if isinstance(h, _SinkHandler):
            root.removeHandler(h)
    if sink is not None:
        sink.flush(1.0)
        sink.close()
        root.setLevel(logging.NOTSET)
        root.propagate = True


def _after_fork() -> None:
    if _sink is not None:
        _sink.after_fork()


os.register_at_fork(after_in_child=_after_fork)
atexit.register(flush, 2.0)
