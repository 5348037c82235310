"""DNS checks for HELOCHECK A/M and MFDNSCHECK, and the client's host name,
asynchronous, via dnspython.

Job: answer "does this name have an A / MX record" with one of
policy.DNS_OK / DNS_FAIL / DNS_TEMP, and "what is this client's name"
(qmail's TCPREMOTEHOST, as tcpserver finds it), never blocking the event loop.

Semantics (SPEC B §2.4, §2.7, §7.2):
- MX check (MFDNSCHECK): NXDOMAIN -> fail; an MX set -> ok, except a null MX
  (RFC 7505, `0 .`) -> fail; no MX but an A/AAAA record -> ok (implicit MX,
  RFC 5321 §5.1); no MX and no address -> fail;
- A check (HELOCHECK=A): an A or AAAA record -> ok; NXDOMAIN / no data -> fail;
- SERVFAIL, timeouts, unreachable resolvers -> temp (the caller answers 451).
- client host name (remote_host): the first PTR name of the address; with
  confirm (tcpserver -p, Postfix) only if that name has an A (IPv4 client) or
  AAAA (IPv6 client) record equal to the address. No name, no match, a
  temporary failure or a timeout -> "unknown". The whole lookup, forward
  check included, is bounded by the resolver's timeout.
Every answer (negative ones too) is kept in the resolver's LRU cache.
The resolver is configurable (`Resolver("127.0.0.1:5353")`, `"[::1]:53"`,
`"::1"`) so tests can run their own responder on loopback; a bad address is a
ValueError with a clear message (serve turns it into a start-up error).
"""
from __future__ import annotations

import asyncio
import ipaddress

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver
import dns.reversename

from mailfilter.policy import DNS_FAIL, DNS_OK, DNS_TEMP

UNKNOWN = "unknown"     # TCPREMOTEHOST when there is no (confirmed) name
_FORMS = "HOST, HOST:PORT, [IPV6], [IPV6]:PORT or a bare IPv6 address"


def parse_nameserver(spec: str) -> tuple[str, int]:
    """`HOST`, `HOST:PORT`, `[V6]`, `[V6]:PORT` or a bare IPv6 address ->
    (address, port); port 53 when none is given. HOST must be an IP address
    (the resolver talks to addresses). A bare IPv6 address takes no port
    (`::1:53` is an address): bracket it to give one."""
    text = spec.strip()
    port = "53"
    if text.startswith("["):
        host, close, rest = text[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise ValueError(f"{spec!r}: expected {_FORMS}")
        port = rest[1:] if rest else port
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host = text
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{spec!r}: {host!r} is not an IP address (expected {_FORMS})") from None
    if not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"{spec!r}: bad port {port!r} (expected {_FORMS})")
    return str(address), int(port)


class Resolver:
    def __init__(self, nameserver: str | None = None, timeout: float = 5.0):
        if nameserver:
            host, port = parse_nameserver(nameserver)
            res = dns.asyncresolver.Resolver(configure=False)
            res.nameservers = [host]
            res.port = port
        else:
            try:
                res = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                res = dns.asyncresolver.Resolver(configure=False)
                res.nameservers = ["127.0.0.1"]
        res.lifetime = timeout
        res.timeout = timeout
        res.cache = dns.resolver.LRUCache(10_000)
        self._res = res
        self.timeout = timeout

    async def _query(self, name: str | dns.name.Name, rdtype: str):
        """('ok', answer) / ('nodata', None) / ('nx', None) / ('temp', None)."""
        try:
            qname = name if isinstance(name, dns.name.Name) else dns.name.from_text(name)
        except (dns.exception.DNSException, ValueError):
            return "nx", None
        try:
            return "ok", await self._res.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            return "nx", None
        except dns.resolver.NoAnswer:
            return "nodata", None
        except (dns.resolver.NoNameservers, dns.exception.Timeout, OSError):
            return "temp", None
        except dns.exception.DNSException:
            return "temp", None

    async def has_address(self, name: str) -> str:
        status, _ = await self._query(name, "A")
        if status == "ok":
            return DNS_OK
        if status == "temp":
            return DNS_TEMP
        if status == "nx":
            return DNS_FAIL
        status, _ = await self._query(name, "AAAA")
        return {"ok": DNS_OK, "temp": DNS_TEMP}.get(status, DNS_FAIL)

    async def has_mx(self, name: str, implicit: bool = True) -> str:
        status, answer = await self._query(name, "MX")
        if status == "ok":
            targets = [r for r in answer if not (r.preference == 0 and r.exchange == dns.name.root)]
            return DNS_OK if targets else DNS_FAIL
        if status == "temp":
            return DNS_TEMP
        if status == "nx" or not implicit:
            return DNS_FAIL
        return await self.has_address(name)

    async def check(self, rdtype: str, name: str) -> str:
        """policy.helo_dns_query() gives ("A"|"MX", name)."""
        if rdtype == "A":
            return await self.has_address(name)
        return await self.has_mx(name, implicit=False)

    async def remote_host(self, ip: str, confirm: bool = True) -> str:
        """TCPREMOTEHOST for the client address `ip`: its first PTR name;
        with `confirm`, only if that name resolves back to `ip`. "unknown"
        for anything else, a timeout of the whole lookup included."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self._remote_host(ip, confirm)
        except TimeoutError:
            return UNKNOWN

    async def _remote_host(self, ip: str, confirm: bool) -> str:
        try:
            address = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return UNKNOWN
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped          # a dual-stack socket's ::ffff:a.b.c.d
        status, answer = await self._query(dns.reversename.from_address(str(address)), "PTR")
        if status != "ok":
            return UNKNOWN
        target = answer[0].target
        name = target.to_text(omit_final_dot=True)
        if not name or name == ".":
            return UNKNOWN
        if not confirm:
            return name
        status, answer = await self._query(target, "A" if address.version == 4 else "AAAA")
        if status == "ok" and any(ipaddress.ip_address(r.address) == address for r in answer):
            return name
        return UNKNOWN
