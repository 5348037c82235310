"""The per-user side of AUTH failure accounting (docs/behaviour/auth.md#failures-and-lockout).

Job: keep a guesser from locking the real user out. A user's failures are
counted per (user, client network) -- IPv4 /24, IPv6 /64 -- so a brute force
locks that user only for the guesser's network; networks that authenticated
the user recently are remembered (KnownNetworks) and never locked for it; and
past a budget of failures for a user across all networks its further
attempts from unknown networks are spaced out (Pacer), never refused.

Every table here is bounded in keys (LRU, ``size``) and each key in bytes
(session.tracker_key), as the failure trackers are.
"""
from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict

__all__ = ["net_key", "user_net_key", "KnownNetworks", "Pacer"]


def net_key(ip: str) -> str:
    """The client network of an address: IPv4 by its /24 (one site or one
    NAT pool), IPv6 by its /64 (one end site), an IPv4-mapped address as IPv4."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network((addr, prefix), strict=False))


def user_net_key(user: str, ip: str) -> str:
    """The per-user failure-counting key: the user name and the client's
    network. NUL cannot occur in a user name (docs/behaviour/auth.md#mechanisms),
    so no two pairs share a key."""
    return f"{user}\0{net_key(ip)}"


class KnownNetworks:
    """(user, network) pairs that authenticated successfully, for ``ttl``
    seconds after their latest success; at most ``size`` pairs (the least
    recently successful goes first)."""

    def __init__(self, ttl: float, size: int = 100_000, clock=time.monotonic):
        self.ttl, self.size, self.clock = ttl, size, clock
        self._seen: OrderedDict[str, float] = OrderedDict()

    def remember(self, key: str) -> None:
        seen = self._seen
        seen[key] = self.clock()
        seen.move_to_end(key)
        while len(seen) > self.size:
            seen.popitem(last=False)

    def __contains__(self, key: str) -> bool:
        when = self._seen.get(key)
        if when is None:
            return False
        if self.clock() - when < self.ttl:
            return True
        del self._seen[key]
        return False

    def __len__(self) -> int:
        return len(self._seen)


class Pacer:
    """Spaces out a key's attempts: ``wait(key)`` returns how long this
    attempt is to wait so that attempts start at most one per ``interval``
    seconds, never longer than ``max_wait`` (a queue of guessers must not
    hold the owner's attempt for ever; past the cap the rate rises, but each
    attempt still waits ``max_wait``). At most ``size`` keys (LRU)."""

    def __init__(self, interval: float, max_wait: float, size: int = 100_000,
                 clock=time.monotonic):
        self.interval, self.max_wait, self.size, self.clock = interval, max_wait, size, clock
        self._next: OrderedDict[str, float] = OrderedDict()

    def wait(self, key: str) -> float:
        if self.interval <= 0:
            return 0.0
        now = self.clock()
        slot = self._next.get(key, now)
        delay = min(max(0.0, slot - now), self.max_wait)
        self._next[key] = now + delay + self.interval
        self._next.move_to_end(key)
        while len(self._next) > self.size:
            self._next.popitem(last=False)
        return delay

    def __len__(self) -> int:
        return len(self._next)
