"""DNS blocklists at connect: postscreen's first line (docs/behaviour/control-files.md#dnsbl).

Job: score a client address against the `dnsbl` control file's sites. Each
site is `zone[=filter][*weight]`; the client is looked up as its reversed
address under the zone (RFC 5782 §2.1: 192.0.2.99 -> 99.2.0.192.zone; IPv6
by nibbles, §2.4), one A query per site, all at once. A site whose answer has
an address its filter takes adds its weight once (a negative weight is an
allowlist); the client is listed when the sum reaches `dnsblthreshold`
(default 1).

Invariants:
- DNS trouble never rejects: a timeout, SERVFAIL or an unreachable resolver
  counts 0 for that site and is named in the result (`temp`), so a dead
  list can only let mail in, never keep it out;
- answers are cached by TTL (the resolver's LRU cache, negative answers too):
  a client that connects again costs no query while the TTL lasts;
- bounded: at most MAX_IN_FLIGHT queries per process at once (a connection
  flood cannot turn into a query flood), the whole check bounded by the
  resolver's timeout;
- a listed answer outside 127.0.0.0/8 is ignored: RFC 5782 §2.1 keeps list
  answers there, and a zone that answers everything with a real address
  (a wildcard, a dead list's parking page) must not list the world.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from mailfilter.policy.dns import client_address
from mailfilter.rules.format import DNSBL_DEFAULT_THRESHOLD, dnsbl_filter_matches, parse_dnsbl_site

MAX_IN_FLIGHT = 256     # DNSBL queries at once, per process


@dataclass(frozen=True)
class Site:
    zone: str
    filter: tuple | None
    weight: int
    where: str          # dnsbl:LINE, for the decision log
    text: str           # the line as written


@dataclass
class DnsblResult:
    score: int = 0
    listed: list[Site] = field(default_factory=list)     # sites that added their weight
    temp: list[str] = field(default_factory=list)        # zones that could not be asked
    threshold: int = DNSBL_DEFAULT_THRESHOLD

    @property
    def blocked(self) -> bool:
        return self.score >= self.threshold and any(s.weight > 0 for s in self.listed)

    @property
    def zones(self) -> str:
        """The zones that listed the client (positive weights), for the reply."""
        return ", ".join(s.zone for s in self.listed if s.weight > 0)

    @property
    def rules(self) -> str:
        return ",".join(s.where for s in self.listed)


def query_name(ip: str, zone: str) -> str | None:
    """The name to look up for `ip` in `zone`; None for an address no list
    has (not an IP address at all)."""
    addr = client_address(ip)
    if addr is None:
        return None
    if addr.version == 4:
        return ".".join(reversed(str(addr).split("."))) + "." + zone
    return ".".join(reversed(addr.exploded.replace(":", ""))) + "." + zone


def _is_list_answer(address: str) -> bool:
    return address.startswith("127.")


class Dnsbl:
    """The sites of one rule bundle, and the check."""

    def __init__(self, sites: list[Site], threshold: int = DNSBL_DEFAULT_THRESHOLD):
        self.sites = sites
        self.threshold = threshold
        self._gate: asyncio.Semaphore | None = None

    @classmethod
    def from_bundle(cls, bundle) -> "Dnsbl":
        sites = []
        for entry in bundle.meta.get("dnsbl", []):
            zone, flt, weight = parse_dnsbl_site(entry["site"])
            sites.append(Site(zone, flt, weight, f"dnsbl:{entry['line']}", entry["site"]))
        return cls(sites, bundle.integers.get("dnsblthreshold", DNSBL_DEFAULT_THRESHOLD))

    def __bool__(self) -> bool:
        return bool(self.sites)

    async def check(self, resolver, ip: str) -> DnsblResult:
        """The client's score; every site asked at once."""
        result = DnsblResult(threshold=self.threshold)
        names = {s.zone: query_name(ip, s.zone) for s in self.sites}
        if not self.sites or any(n is None for n in names.values()):
            return result
        if self._gate is None:
            self._gate = asyncio.Semaphore(MAX_IN_FLIGHT)
        zones = list(names)
        answers = await asyncio.gather(*(self._ask(resolver, names[z]) for z in zones))
        by_zone = dict(zip(zones, answers))
        for site in self.sites:
            status, addresses = by_zone[site.zone]
            if status == "temp":
                if site.zone not in result.temp:
                    result.temp.append(site.zone)
                continue
            if any(_is_list_answer(a) and dnsbl_filter_matches(site.filter, a) for a in addresses):
                result.score += site.weight
                result.listed.append(site)
        return result

    async def _ask(self, resolver, name: str) -> tuple[str, list[str]]:
        async with self._gate:
            try:
                return await resolver.a_records(name)
            except Exception:           # never a rejection because DNS misbehaved
                return "temp", []
