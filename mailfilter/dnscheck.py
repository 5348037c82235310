"""DNS checks for HELOCHECK A/M and MFDNSCHECK, asynchronous, via dnspython.

Job: answer "does this name have an A / MX record" with one of
policy.DNS_OK / DNS_FAIL / DNS_TEMP, never blocking the event loop.

Semantics (SPEC B §2.4, §2.7, §7.2):
- MX check (MFDNSCHECK): NXDOMAIN -> fail; an MX set -> ok, except a null MX
  (RFC 7505, `0 .`) -> fail; no MX but an A/AAAA record -> ok (implicit MX,
  RFC 5321 §5.1); no MX and no address -> fail;
- A check (HELOCHECK=A): an A or AAAA record -> ok; NXDOMAIN / no data -> fail;
- SERVFAIL, timeouts, unreachable resolvers -> temp (the caller answers 451).
The resolver is configurable (`Resolver("127.0.0.1:5353")`) so tests can run
their own responder on loopback.
"""
from __future__ import annotations

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from mailfilter.policy import DNS_FAIL, DNS_OK, DNS_TEMP


class Resolver:
    def __init__(self, nameserver: str | None = None, timeout: float = 5.0):
        if nameserver:
            host, _, port = nameserver.rpartition(":")
            if not host:
                host, port = nameserver, "53"
            res = dns.asyncresolver.Resolver(configure=False)
            res.nameservers = [host.strip("[]")]
            res.port = int(port)
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

    async def _query(self, name: str, rdtype: str):
        """('ok', answer) / ('nodata', None) / ('nx', None) / ('temp', None)."""
        try:
            qname = dns.name.from_text(name)
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
