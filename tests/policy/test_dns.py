"""dnscheck.Resolver on its own: the resolver address forms and the client
host name lookup (TCPREMOTEHOST), against the test DNS responder on
127.0.0.1, on both event loops."""
from __future__ import annotations

import asyncio
import socket
import time

import pytest

from mailfilter.policy.dns import Resolver, parse_nameserver
from mailfilter.policy.engine import DNS_FAIL, DNS_OK
from tests.support.dns_responder import DnsResponder
from tests.support.server_harness import LOOPS, new_loop


@pytest.mark.parametrize("spec,expect", [
    ("127.0.0.1", ("127.0.0.1", 53)),
    ("127.0.0.1:5353", ("127.0.0.1", 5353)),
    (" 192.0.2.1:53 ", ("192.0.2.1", 53)),
    ("::1", ("::1", 53)),                        # bare IPv6: the whole text is the address
    ("2001:db8::53", ("2001:db8::53", 53)),
    ("::1:53", ("::1:53", 53)),                  # ... so a port needs brackets
    ("[::1]", ("::1", 53)),
    ("[::1]:5353", ("::1", 5353)),
    ("[2001:DB8::1]:53", ("2001:db8::1", 53)),
])
def test_parse_nameserver_forms(spec, expect):
    """HOST, HOST:PORT, [V6], [V6]:PORT, bare V6 (the old rpartition split
    `::1` into host `::` port 1)."""
    assert parse_nameserver(spec) == expect


@pytest.mark.parametrize("spec,problem", [
    ("", "is not an IP address"),
    ("dns.example", "is not an IP address"),
    ("[::1", "expected HOST, HOST:PORT"),
    ("[::1]53", "expected HOST, HOST:PORT"),
    ("::1]", "is not an IP address"),
    ("127.0.0.1:", "bad port ''"),
    ("127.0.0.1:dns", "bad port 'dns'"),
    ("127.0.0.1:0", "bad port '0'"),
    ("[::1]:65536", "bad port '65536'"),
    ("1.2.3.4.5", "is not an IP address"),
])
def test_parse_nameserver_errors(spec, problem):
    with pytest.raises(ValueError, match=problem):
        parse_nameserver(spec)


def _servers(resolver: Resolver) -> list[tuple[str, int]]:
    return [(ns.address, ns.port) for ns in resolver._res.nameservers]


def test_resolver_uses_the_parsed_address():
    assert _servers(Resolver("::1")) == [("::1", 53)]
    assert _servers(Resolver("[::1]:5353")) == [("::1", 5353)]
    assert _servers(Resolver("127.0.0.1:5353,[::1]")) == [("127.0.0.1", 5353), ("::1", 53)]
    with pytest.raises(ValueError, match="not an IP address"):
        Resolver("::1]")
    with pytest.raises(ValueError, match="not an IP address"):
        Resolver("127.0.0.1,")


def test_a_dead_first_nameserver_leaves_time_for_the_next():
    """dnspython gives each server min(timeout, rest of lifetime): with both
    equal (as before), a first server that never answers used the whole
    budget and the working second one was never asked (resolv.conf
    failover). Now each of up to 3 servers gets its share."""
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))              # receives, never answers
    try:
        with DnsResponder(TABLE) as dns:
            r = Resolver(f"127.0.0.1:{dead.getsockname()[1]},{dns.address}", timeout=4.0)
            assert r._res.lifetime == 4.0 and r._res.timeout == 2.0
            assert asyncio.run(r.has_address("mx.ok.test")) == DNS_OK
            assert ("mx.ok.test", "A") in dns.queries
    finally:
        dead.close()


@pytest.mark.parametrize("name,status", [
    ("[192.0.2.1]", DNS_OK), ("[IPv6:2001:db8::1]", DNS_OK), ("[ipv6:::1]", DNS_OK),
    ("192.0.2.1", DNS_OK),                                  # bare IPv4 (qmail ip_scan)
    ("[999.1.1.1]", DNS_FAIL), ("[2001:db8::1]", DNS_FAIL),   # v6 needs its tag (RFC 5321 §4.1.3)
    ("[IPv6:192.0.2.1]", DNS_FAIL), ("[192.0.2.1", DNS_FAIL),
])
def test_address_literals_are_not_looked_up(name, status):
    """RFC 5321 §4.1.3 literals for MFDNSCHECK and HELOCHECK A/M: no query
    (they used to become a bogus name and NXDOMAIN, a hard reject)."""
    with DnsResponder(TABLE) as dns:
        r = Resolver(dns.address, timeout=3.0)
        assert asyncio.run(r.has_mx(name)) == status
        assert asyncio.run(r.has_address(name)) == status
        assert asyncio.run(r.check("MX", name)) == status
        assert dns.queries == []


TABLE = {
    ("1.2.0.192.in-addr.arpa", "PTR"): ["mx.ok.test."],
    ("mx.ok.test", "A"): ["192.0.2.1"],
    ("2.2.0.192.in-addr.arpa", "PTR"): ["other.test."],
    ("other.test", "A"): ["192.0.2.99"],
    ("other.test", "AAAA"): ["2001:db8::2"],
    "3.2.0.192.in-addr.arpa": "NXDOMAIN",
    "4.2.0.192.in-addr.arpa": "SERVFAIL",
    "5.2.0.192.in-addr.arpa": "DROP",
    ("6.2.0.192.in-addr.arpa", "PTR"): ["noaddr.test."],
    ("noaddr.test", "MX"): ["10 mx.ok.test."],
    ("7.2.0.192.in-addr.arpa", "PTR"): ["bad\\032name\\255.test."],   # a space and an 8-bit byte
    (".".join(reversed("20010db8000000000000000000000002")) + ".ip6.arpa", "PTR"): ["other.test."],
}


@pytest.fixture(scope="module")
def dns():
    with DnsResponder(TABLE) as responder:
        yield responder


@pytest.fixture(params=LOOPS)
def lookup(request, dns):
    resolver = Resolver(dns.address, timeout=0.25)      # a fresh cache per test

    def run(ip, confirm=True):
        loop = new_loop(request.param)
        try:
            return loop.run_until_complete(resolver.remote_host(ip, confirm))
        finally:
            loop.close()
    run.dns = dns
    return run


@pytest.mark.parametrize("ip,confirmed,ptr", [
    ("192.0.2.1", "mx.ok.test", "mx.ok.test"),        # first PTR name, resolves back
    ("::ffff:192.0.2.1", "mx.ok.test", "mx.ok.test"),  # IPv4-mapped: looked up as IPv4
    ("192.0.2.2", "unknown", "other.test"),           # resolves elsewhere (A); AAAA is not IPv4
    ("2001:db8::2", "other.test", "other.test"),      # IPv6 client: confirmed by AAAA
    ("192.0.2.3", "unknown", "unknown"),              # NXDOMAIN
    ("192.0.2.4", "unknown", "unknown"),              # SERVFAIL: temporary -> unknown
    ("192.0.2.6", "unknown", "noaddr.test"),          # name without any address
    ("192.0.2.7", "unknown", "unknown"),              # not a host name: never used
    ("not-an-ip", "unknown", "unknown"),
])
def test_remote_host(lookup, ip, confirmed, ptr):
    assert lookup(ip) == confirmed
    assert lookup(ip, confirm=False) == ptr


def test_remote_host_timeout_bounds_the_whole_lookup(lookup):
    """A resolver that never answers: "unknown" (a bound, not a benchmark)."""
    t0 = time.monotonic()
    assert lookup("192.0.2.5") == "unknown"
    assert time.monotonic() - t0 < 3.0         # 0.25 s resolver timeout


def test_remote_host_answers_are_cached(lookup):
    assert lookup("192.0.2.1") == "mx.ok.test"
    n = len(lookup.dns.queries)
    assert lookup("192.0.2.1") == "mx.ok.test"
    assert lookup("192.0.2.3") == "unknown"
    m = len(lookup.dns.queries)
    assert lookup("192.0.2.3") == "unknown"               # negative answers too
    assert n == len(lookup.dns.queries) - 1 == m - 1


def test_utf8_domain_is_asked_as_its_a_label():
    """MFDNSCHECK of an SMTPUTF8 sender (jörg@bücher.example): the MX query
    goes out in A-labels (dnspython's IDNA), never as raw UTF-8 bytes."""
    with DnsResponder({("xn--bcher-kva.example", "MX"): ["10 mx.ok.test."]}) as dns:
        r = Resolver(dns.address, timeout=3.0)
        assert asyncio.run(r.has_mx("b\u00fccher.example")) == DNS_OK
        assert dns.queries == [("xn--bcher-kva.example", "MX")]
