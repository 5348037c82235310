"""Address literals: pack_ip, and is an IPv4 address one of this host's own?
(qmail's `ipme`, docs/behaviour/control-files.md#localiphost)

Job: what the `localiphost` substitution needs to know about a domain literal
`[d.d.d.d]` in a recipient or sender: is it an address at all (pack_ip), and
is it one of this host's. qmail-smtpd lists the interface addresses once at
start (ipme.c); here the kernel answers instead: binding a socket to an
address succeeds exactly when the address is assigned to this host
(127.0.0.0/8 included), so addresses added later count too and no interface
listing is needed.

Invariants: is_local_ipv4 sends no packet (a UDP socket is bound to port 0
and closed); its answers are cached per address, bounded; any error means
"not local".
"""
from __future__ import annotations

import socket
from functools import lru_cache


_inet_pton, _AF_INET, _AF_INET6 = socket.inet_pton, socket.AF_INET, socket.AF_INET6


def pack_ip(ip: str) -> bytes | None:
    """4 or 16 bytes for an address literal (an IPv6 zone `%...` is ignored),
    None if it is not one. Only IPv6 text contains ':' and dotted IPv4 never
    does, so one inet_pton call decides. CidrTrie.lookup_text does the same
    in C; this is its reference (tests)."""
    try:
        if ":" in ip:
            return _inet_pton(_AF_INET6, ip.split("%", 1)[0])
        return _inet_pton(_AF_INET, ip)
    except OSError:
        return None


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
