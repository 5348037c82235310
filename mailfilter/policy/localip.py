"""Is an IPv4 address one of this host's own? (qmail's `ipme`, SPEC B §1.7)

Job: answer for the `localiphost` substitution, which rewrites a recipient or
sender domain literal `[d.d.d.d]` naming this host. qmail-smtpd lists the
interface addresses once at start (ipme.c); here the kernel answers instead:
binding a socket to an address succeeds exactly when the address is assigned
to this host (127.0.0.0/8 included), so addresses added later count too and
no interface listing is needed.

Invariants: no packet is sent (a UDP socket is bound to port 0 and closed);
answers are cached per address, bounded; any error means "not local".
"""
from __future__ import annotations

import socket
from functools import lru_cache


@lru_cache(maxsize=1024)
def is_local_ipv4(ip: str) -> bool:
    """True if the dotted-quad `ip` is an address of this host."""
    try:
        socket.inet_pton(socket.AF_INET, ip)
    except OSError:
        return False
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((ip, 0))
        return True
    except OSError:              # EADDRNOTAVAIL: not ours; any other error: not ours either
        return False
    finally:
        s.close()
