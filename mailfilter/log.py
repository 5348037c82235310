"""Logging: one key=value decision line per verdict, anomalies, syslog.

Format (docs/architecture.md#errors-and-logging):
  action=reject stage=RCPT rule=badrcptto:14 client=host[ip]:port helo=<..>
  from=<..> to=<..> reply="553 5.7.1 .."
Values that could carry spaces, quotes or control characters are quoted and
escaped, so a hostile HELO cannot forge a second log line. Secrets (AUTH
responses, passwords) are never passed to this module.
The line is only formatted when the logger is enabled for INFO, so a quiet
server spends nothing on it.
"""
from __future__ import annotations

import logging
import logging.handlers
import sys

logger = logging.getLogger("mailfilter")

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_@:[]<>+/=%!")

# A value whose quoted form would pass this many characters is cut (a client
# controls most of them: a HELO, an AUTH user name, the DATA line's list of
# 1000 recipients) and says how much was left out, so a line stays readable
# and fits one syslog datagram.
MAX_VALUE = 512


def _escape(c: str) -> str:
    n = ord(c)
    if n < 0x100:
        return f"\\x{n:02x}"
    return f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def quote(value) -> str:
    """`value` as it stands, or double-quoted with `"` and `\\` escaped and
    every other character outside printable ASCII written \\xNN, \\uNNNN or
    \\UNNNNNNNN by its code point (one reading: \\x is always two digits)."""
    text = str(value)
    if text and len(text) <= MAX_VALUE and all(c in _SAFE for c in text):
        return text
    out = []
    size = 0
    for i, c in enumerate(text):
        if c in '"\\':
            c = "\\" + c
        elif not " " <= c <= "~":
            c = _escape(c)
        size += len(c)
        if size > MAX_VALUE:
            out.append(f"...[{len(text) - i} more]")
            break
        out.append(c)
    return '"' + "".join(out) + '"'


def kv(**fields) -> str:
    return " ".join(f"{k}={quote(v)}" for k, v in fields.items() if v is not None)


def decision(verdict, *, client: str, tls=None, helo=None, sender=None, rcpt=None, **extra) -> None:
    """Log one policy verdict (policy.Verdict)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    action = "accept" if verdict.accept else ("tempfail" if verdict.reply.temporary else "reject")
    logger.info(kv(
        action=action, stage=verdict.stage, reason=verdict.reason, rule=verdict.rule,
        client=client, tls=tls,
        helo=None if helo is None else f"<{helo}>",
        **{"from": None if sender is None else f"<{sender}>"},
        to=None if rcpt is None else f"<{rcpt}>",
        reply=str(verdict.reply), **extra))


def anomaly(tag: str, *, client: str, detail=None) -> None:
    if logger.isEnabledFor(logging.WARNING):
        logger.warning(kv(anomaly=tag, client=client, detail=detail))


def event(**fields) -> None:
    if logger.isEnabledFor(logging.INFO):
        logger.info(kv(**fields))


def setup(level: str = "info", use_syslog: bool = False, syslog_address: str = "/dev/log",
          facility: str = "mail", ident: str = "mailfilter") -> None:
    """stderr by default; `--syslog` sends to syslog (facility mail)."""
    root = logging.getLogger("mailfilter")
    root.handlers.clear()
    root.setLevel(getattr(logging, level.upper()))
    if use_syslog:
        handler = logging.handlers.SysLogHandler(
            address=syslog_address,
            facility=logging.handlers.SysLogHandler.facility_names[facility])
        # openlog(ident, LOG_PID): the pid is the record's, so each --workers
        # process names itself (a forked worker's records carry its own pid)
        handler.setFormatter(logging.Formatter(f"{ident}[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(message)s"))
    root.addHandler(handler)
    root.propagate = False
