"""DNS checks for HELOCHECK A/M and MFDNSCHECK, and the client's host name,
asynchronous, via dnspython.

Job: answer "does this name have an A / MX record" with one of
policy.DNS_OK / DNS_FAIL / DNS_TEMP, and "what is this client's name"
(qmail's TCPREMOTEHOST, as tcpserver finds it), never blocking the event loop.

Semantics (docs/behaviour/tcp-smtp.md#settings, docs/behaviour/smtp.md#replies):
- MX check (MFDNSCHECK): NXDOMAIN -> fail; an MX set -> ok, except a lone
  null MX (RFC 7505, `0 .`) -> nullmx (the caller answers 550 5.7.27, §4.2);
  no MX but an A/AAAA record -> ok (implicit MX, RFC 5321 §5.1); no MX and
  no address -> fail;
- HELOCHECK=M: the same MX check, an A/AAAA record standing in for a
  missing MX as in qmail's dns_mxip (spamcontrol `dnsq(helohost, "M")`):
  real outbound hosts rarely have an MX of their own; a null MX -> fail;
- A check (HELOCHECK=A): an A or AAAA record -> ok; NXDOMAIN / no data -> fail;
- address literals (`[192.0.2.1]`, `[IPv6:2001:db8::1]`, RFC 5321 §4.1.3) and
  a bare IPv4 address are not looked up (qmail's ip_scan/ip_scanbracket
  short cut): a valid one -> ok, a malformed literal -> fail;
- SERVFAIL, timeouts, unreachable resolvers -> temp (the caller answers 451).
  With several nameservers (resolv.conf) each gets a share of the timeout,
  so a dead first server still leaves time to ask the next one.
- client host name (remote_host): the first PTR name of the address; with
  confirm (tcpserver -p, Postfix) only if that name has an A (IPv4 client) or
  AAAA (IPv6 client) record equal to the address. No name, no match, a
  temporary failure or a timeout -> "unknown"; so is a name that is not a
  plausible host name (only letters, digits, `-`, `_` and dots, at most 253
  characters): whoever owns a reverse zone could otherwise put arbitrary
  bytes into Received headers and `=host` matching. The whole lookup,
  forward check included, is bounded by the resolver's timeout.
Every answer (negative ones too) is kept in the resolver's LRU cache.
The resolver is configurable (`Resolver("127.0.0.1:5353")`, `"[::1]:53"`,
`"::1"`, or several separated by commas, asked in order) so tests can run
their own responder on loopback; a bad address is a ValueError with a clear
message (serve turns it into a start-up error).
"""
from __future__ import annotations

import asyncio
import ipaddress
import re

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver
import dns.reversename

from mailfilter.policy.verdict import DNS_FAIL, DNS_NULLMX, DNS_OK, DNS_TEMP

UNKNOWN = "unknown"     # TCPREMOTEHOST when there is no (confirmed) name
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\Z")
MAX_SERVERS_TRIED = 3   # nameservers that share the timeout


def literal_status(name: str) -> str | None:
    """DNS_OK / DNS_FAIL for an address literal or a bare IPv4 address (no
    lookup: qmail's ip_scan / ip_scanbracket), None for a name to look up."""
    if name.startswith("["):
        inner = name[1:-1] if name.endswith("]") else None
        if inner is not None and inner[:5].lower() == "ipv6:":
            inner = inner[5:]
            version = 6
        else:
            version = 4
        try:
            return DNS_OK if inner is not None and ipaddress.ip_address(inner).version == version \
                else DNS_FAIL
        except ValueError:
            return DNS_FAIL
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return None
    return DNS_OK
def client_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address as the DNS knows it: a scope id dropped, and a
    dual-stack socket's ::ffff:a.b.c.d as the IPv4 address; None when `ip`
    is not an address."""
    try:
        address = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


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
            res = dns.asyncresolver.Resolver(configure=False)
            res.nameservers = [dns.nameserver.Do53Nameserver(*parse_nameserver(spec))
                               for spec in nameserver.split(",")]
        else:
            try:
                res = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                res = dns.asyncresolver.Resolver(configure=False)
                res.nameservers = ["127.0.0.1"]
        res.lifetime = timeout
        # dnspython gives each server min(timeout, what is left of lifetime):
        # with timeout == lifetime a dead first server used all of it
        res.timeout = max(1.0, timeout / max(1, min(MAX_SERVERS_TRIED, len(res.nameservers))))
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

    async def a_records(self, name: str) -> tuple[str, list[str]]:
        """The A records of `name` as dotted quads: ("ok", [...]), or
        ("none", []) for NXDOMAIN / no data, ("temp", []) for trouble (a DNSBL
        query, policy/dnsbl.py). Cached like every answer."""
        status, answer = await self._query(name, "A")
        if status == "ok":
            return "ok", [r.address for r in answer]
        return ("temp" if status == "temp" else "none"), []

    async def has_address(self, name: str) -> str:
        literal = literal_status(name)
        if literal is not None:
            return literal
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
        literal = literal_status(name)
        if literal is not None:
            return literal
        status, answer = await self._query(name, "MX")
        if status == "ok":
            targets = [r for r in answer if not (r.preference == 0 and r.exchange == dns.name.root)]
            return DNS_OK if targets else DNS_NULLMX
        if status == "temp":
            return DNS_TEMP
        if status == "nx" or not implicit:
            return DNS_FAIL
        return await self.has_address(name)

    async def check(self, rdtype: str, name: str) -> str:
        """policy.helo_dns_query() gives ("A"|"MX", name)."""
        if rdtype == "A":
            return await self.has_address(name)
        status = await self.has_mx(name)          # A/AAAA stand in for a missing MX
        return DNS_FAIL if status == DNS_NULLMX else status

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
        address = client_address(ip)
        if address is None:
            return UNKNOWN
        status, answer = await self._query(dns.reversename.from_address(str(address)), "PTR")
        if status != "ok":
            return UNKNOWN
        target = answer[0].target
        name = target.to_text(omit_final_dot=True)
        if len(name) > 253 or _HOST_NAME.match(name) is None:
            return UNKNOWN
        if not confirm:
            return name
        status, answer = await self._query(target, "A" if address.version == 4 else "AAAA")
        if status == "ok" and any(ipaddress.ip_address(r.address) == address for r in answer):
            return name
        return UNKNOWN
