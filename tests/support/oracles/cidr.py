"""Pure-Python twin of _core's CIDR trie (cidr.pxi), for differential tests.

Deliberately naive: entries become `ipaddress` networks, a lookup is a linear
scan over all of them keeping the longest prefix that contains the address;
among equal prefixes the entry given LAST wins (scan order + `>=`).

Same mapping rule as the Cython side (RFC 4291 §2.5.5.2): an IPv4-mapped
IPv6 query ::ffff:a.b.c.d is looked up as IPv4 a.b.c.d, and an entry inside
::ffff:0:0/96 with prefix >= 96 is an IPv4 entry of prefix - 96.
"""
import ipaddress

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def to_network(packed: bytes, plen: int):
    """(packed address, prefix length) -> ip_network; host bits dropped."""
    addr = ipaddress.ip_address(packed)
    if addr.version == 6 and plen >= 96 and addr in _MAPPED:
        addr, plen = addr.ipv4_mapped, plen - 96
    return ipaddress.ip_network((addr, plen), strict=False)


def to_query(packed: bytes):
    addr = ipaddress.ip_address(packed)
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr


class CidrOracle:
    def __init__(self, entries):
        # ints precomputed so a linear scan over thousands of entries is quick
        self.nets = []
        for packed, plen, rid in entries:
            net = to_network(packed, plen)
            self.nets.append((net.version, int(net.network_address),
                              int(net.netmask), net.prefixlen, rid))

    def __len__(self):
        return len({(v, a, p) for v, a, _, p, _ in self.nets})

    def lookup(self, packed: bytes) -> int:
        q = to_query(packed)
        qv, qi = q.version, int(q)
        best_len, best = -1, -1
        for v, a, mask, plen, rid in self.nets:
            if v == qv and qi & mask == a and plen >= best_len:
                best_len, best = plen, rid
        return best
