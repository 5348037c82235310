"""Syslog for the checkpassword tools (docs/behaviour/checkpassword.md#syslog).

Job: write one RFC 3164 datagram per authentication attempt to the local
syslog socket: ``<PRI>Mmm dd hh:mm:ss ident[pid]: auth RESULT mech=.. user=..
ip=.. reason=..``. The stdlib ``syslog`` module cannot be pointed at another
socket (tests bind their own), hence these few lines.

Configuration (environment, as checkpassword tools are configured,
docs/behaviour/checkpassword.md#the-fd-3-interface):
- ``MAILFILTER_SYSLOG_SOCKET``: unix datagram socket path (default /dev/log);
- ``MAILFILTER_SYSLOG_FACILITY``: ``authpriv`` (default), ``auth`` or ``mail``.

Levels: success LOG_INFO, failure LOG_NOTICE, temporary/internal error
LOG_ERR. When no syslog socket answers, the line goes to stderr instead, so
an attempt is never unlogged; logging never changes the tool's exit code.

Invariants: the caller passes only result, mechanism, user, client address
and a reason; values are sanitised (log.quote: no CR/LF, no control
characters), so a hostile login cannot forge a second line. Never a secret.
"""
from __future__ import annotations

import os
import socket
import sys
import time

from mailfilter.log import kv

__all__ = ["SyslogWriter", "FACILITIES", "LOG_INFO", "LOG_NOTICE", "LOG_ERR"]

FACILITIES = {"kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "authpriv": 10,
              "local0": 16, "local1": 17, "local2": 18, "local3": 19, "local4": 20,
              "local5": 21, "local6": 22, "local7": 23}
LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO = 3, 4, 5, 6
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class SyslogWriter:
    """ident + LOG_PID + facility, as openlog(ident, LOG_PID, facility)."""

    def __init__(self, ident: str, facility: str | None = None, address: str | None = None):
        env = os.environ
        self.ident = ident
        name = (facility or env.get("MAILFILTER_SYSLOG_FACILITY") or "authpriv").lower()
        self.facility = FACILITIES.get(name, FACILITIES["authpriv"])
        self.address = address or env.get("MAILFILTER_SYSLOG_SOCKET") or "/dev/log"
        self._sock: socket.socket | None = None

    def connect(self) -> None:
        """openlog(LOG_NDELAY): connect now, so a later setuid() cannot lose the line."""
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                s.connect(self.address)
            except OSError:
                s.close()
                return
            self._sock = s

    def line(self, level: int, message: str) -> bytes:
        t = time.localtime()
        stamp = f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
        return f"<{self.facility * 8 + level}>{stamp} {self.ident}[{os.getpid()}]: {message}".encode(
            "utf-8", "replace")

    def send(self, level: int, message: str) -> None:
        data = self.line(level, message)
        try:
            self.connect()
            if self._sock is None:
                raise OSError("no syslog socket")
            self._sock.send(data)
        except OSError:
            try:
                sys.stderr.write(data.decode("utf-8", "replace") + "\n")
            except OSError:
                pass

    def attempt(self, result: str, mech: str, user: str | None, ip: str | None,
                reason: str | None = None, port: str | None = None) -> None:
        """One attempt: result is success / fail / error
        (docs/behaviour/checkpassword.md#syslog)."""
        level = {"success": LOG_INFO, "fail": LOG_NOTICE}.get(result, LOG_ERR)
        self.send(level, f"auth {result} " + kv(mech=mech, user=user, ip=ip or "unknown",
                                                 port=port, reason=reason))
