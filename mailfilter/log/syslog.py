"""Syslog datagrams: where they go and how they are framed.

Job: parse `--syslog-socket` (a unix datagram socket path, or HOST:PORT for
UDP), open a non-blocking datagram socket to it, and frame a message as
  - RFC 3164 (the default): `<PRI>Mmm dd hh:mm:ss ident[pid]: msg`, what
    glibc's syslog() sends to /dev/log; over UDP the host name follows the
    time stamp (RFC 3164 §4.1.2: HEADER = TIMESTAMP HOSTNAME);
  - RFC 5424: `<PRI>1 TIMESTAMP HOSTNAME ident PID - - msg` (RFC 5424 §6:
    VERSION 1, MSGID and STRUCTURED-DATA nil).
PRI is facility * 8 + severity (RFC 5424 §6.2.1). No trailing NUL or newline.

Invariants: the pid in a frame is the current process's (`Framer.after_fork`
re-reads it in a forked worker); the time stamp text is made once per second.
"""
from __future__ import annotations

import logging
import os
import socket
import time

FACILITIES = {"kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6,
              "news": 7, "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
              "local0": 16, "local1": 17, "local2": 18, "local3": 19, "local4": 20,
              "local5": 21, "local6": 22, "local7": 23}
FORMATS = ("rfc3164", "rfc5424")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def severity(levelno: int) -> int:
    """A logging level as a syslog severity (RFC 5424 §6.2.1 table 2)."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def parse_address(spec: str) -> tuple[int, object]:
    """(address family, address): a spec with a `/` is a unix socket path,
    otherwise HOST:PORT or [IPV6]:PORT is UDP. ValueError when neither."""
    if "/" in spec:
        return socket.AF_UNIX, spec
    host, sep, port = spec.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"{spec!r} is neither a socket path (with a /) nor HOST:PORT")
    host = host.strip("[]")
    return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))


def resolve(family: int, address) -> tuple[int, object]:
    """A UDP HOST:PORT as (family, socket address), looked up once at start
    (a name lookup at each re-open would block the event loop); a unix path
    as it is. OSError (socket.gaierror) when the host has no address."""
    if family == socket.AF_UNIX:
        return family, address
    try:
        info = socket.getaddrinfo(address[0], address[1], family, socket.SOCK_DGRAM)
    except UnicodeError as exc:
        raise OSError(str(exc)) from None
    return info[0][0], info[0][4]


def open_socket(family: int, address) -> socket.socket:
    """A connected, non-blocking datagram socket to a resolved address;
    OSError when it cannot be reached (no such socket, nobody bound to it)."""
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.connect(address)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class Framer:
    """Frames one message as a syslog datagram (str; the sink encodes)."""

    def __init__(self, fmt: str = "rfc3164", facility: str = "mail", ident: str = "mailfilter",
                 remote: bool = False):
        if fmt not in FORMATS:
            raise ValueError(f"syslog format must be {' or '.join(FORMATS)}, not {fmt!r}")
        self.fmt = fmt
        self.facility = FACILITIES[facility]
        self.ident = ident
        # RFC 3164 to the local socket carries no host name (glibc); over the
        # network the receiver needs it. RFC 5424 always names it (or "-").
        self.hostname = socket.gethostname() or "-"
        self.remote = remote
        self._second = -1
        self._stamp = ""
        self.after_fork()

    def after_fork(self) -> None:
        self.pid = os.getpid()
        self._second = -1

    def _head(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            t = time.localtime(second)
            if self.fmt == "rfc3164":
                stamp = (f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} "
                         f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}")
                host = f" {self.hostname}" if self.remote else ""
                self._stamp = f"{stamp}{host} {self.ident}[{self.pid}]: "
            else:
                off = t.tm_gmtoff // 60
                sign = "+" if off > 0 else "-"
                zone = "Z" if off == 0 else f"{sign}{abs(off) // 60:02d}:{abs(off) % 60:02d}"
                # the fraction goes between the seconds and the zone: kept apart
                self._stamp = (time.strftime("%Y-%m-%dT%H:%M:%S", t),
                               f"{zone} {self.hostname} {self.ident} {self.pid} - - ")
            self._second = second
        return self._stamp

    def frame(self, levelno: int, message: str, now: float) -> str:
        head = self._head(now)
        pri = self.facility * 8 + severity(levelno)
        if self.fmt == "rfc3164":
            return f"<{pri}>{head}{message}"
        # RFC 5424 §6.2.3: TIME-SECFRAC, up to six digits
        return f"<{pri}>1 {head[0]}.{int((now % 1) * 1e6):06d}{head[1]}{message}"
