"""DNS blocklists and pregreet (docs/behaviour/control-files.md#dnsbl, #pregreet).

The `dnsbl` control file (postscreen_dnsbl_sites syntax) compiled and
checked: site syntax and its diagnostics, the RFC 5782 query names, weights
(negative = allowlist) against `dnsblthreshold`, and through the real server
on both loops against the test DNS responder (UDP on 127.0.0.1): a listed
client gets 554 5.7.1 naming the zones instead of the greeting, DNS trouble
never refuses, answers are cached, relay clients are exempt; a client that
talks before the greeting is logged, and refused with --pregreet refuse.
"""
from __future__ import annotations

import asyncio

import pytest

from mailfilter.check import run_check
from mailfilter.policy.dns import Resolver
from mailfilter.policy.dnsbl import Dnsbl, query_name
from mailfilter.rules import bundle as bundle_mod
from mailfilter.rules import compiler
from mailfilter.rules.format import dnsbl_filter_matches, parse_dnsbl_site
from mailfilter.smtp.protocol import Limits
from tests.support.dns_responder import DnsResponder
from tests.support.server_harness import LOOPS, TIMEOUT, RawClient, first, start_server, write_rules

LISTED = "127.0.0.31"       # zen (weight 2): listed
ALLOWED = "127.0.0.32"      # zen 2 and the allowlist -3: not listed
FILTERED = "127.0.0.33"     # zen answers 127.0.0.99, outside its filter: 0
SMALL = "127.0.0.34"        # bl.example only (weight 1 < threshold 2)
BOTH = "127.0.0.35"         # bl 1 + zen 2 = 3
BROKEN = "127.0.0.36"       # zen SERVFAIL, bl DROP (timeout): never refused
PUBLIC = "127.0.0.37"       # zen answers 192.0.2.1: not a list answer (RFC 5782 §2.1)
CLEAN = "127.0.0.38"        # no list has it
RELAY = "127.0.0.2"         # BASE_RULES: RELAYCLIENT: exempt whatever the lists say


def rev(ip: str, zone: str) -> str:
    return ".".join(reversed(ip.split("."))) + "." + zone


DNS = {
    (rev(LISTED, "zen.test"), "A"): ["127.0.0.2"],
    (rev(ALLOWED, "zen.test"), "A"): ["127.0.0.4"],
    (rev(ALLOWED, "wl.test"), "A"): ["127.0.10.1"],
    (rev(FILTERED, "zen.test"), "A"): ["127.0.0.99"],
    (rev(SMALL, "bl.test"), "A"): ["127.0.0.2"],
    (rev(BOTH, "zen.test"), "A"): ["127.0.0.11"],
    (rev(BOTH, "bl.test"), "A"): ["127.0.0.2"],
    rev(BROKEN, "zen.test"): "SERVFAIL",
    rev(BROKEN, "bl.test"): "DROP",
    (rev(PUBLIC, "zen.test"), "A"): ["192.0.2.1"],
    (rev(RELAY, "zen.test"), "A"): ["127.0.0.2"],
}
SITES = "zen.test=127.0.0.[2..11]*2\nbl.test\nwl.test=127.0.[0..255].[1;2]*-3\n"
RULES = {"dnsbl": SITES, "dnsblthreshold": "2\n"}


# --- syntax --------------------------------------------------------------------------------
@pytest.mark.parametrize("text,zone,weight", [
    ("zen.spamhaus.org", "zen.spamhaus.org", 1),
    ("ZEN.Spamhaus.org.", "zen.spamhaus.org", 1),
    ("b.barracudacentral.org*2", "b.barracudacentral.org", 2),
    ("list.dnswl.org=127.0.[0..255].[1..3]*-2", "list.dnswl.org", -2),
    ("zen.spamhaus.org=127.0.0.[2;3;4;9..11]*+3", "zen.spamhaus.org", 3),
])
def test_site_syntax(text, zone, weight):
    z, _flt, w = parse_dnsbl_site(text)
    assert (z, w) == (zone, weight)


@pytest.mark.parametrize("flt,address,expect", [
    ("127.0.0.[2..11]", "127.0.0.2", True),
    ("127.0.0.[2..11]", "127.0.0.11", True),
    ("127.0.0.[2..11]", "127.0.0.12", False),
    ("127.0.[0..255].[1;2]", "127.0.9.2", True),
    ("127.0.[0..255].[1;2]", "127.0.9.3", False),
    ("127.0.0.2", "127.0.0.2", True),
    ("127.0.0.2", "127.0.1.2", False),
])
def test_filter(flt, address, expect):
    _z, parsed, _w = parse_dnsbl_site(f"x.test={flt}")
    assert dnsbl_filter_matches(parsed, address) is expect


def test_bad_lines_are_diagnostics_naming_file_line(tmp_path):
    rules = write_rules(tmp_path / "rules", {"dnsbl": (
        "zen.test\nbad zone\nx.test=127.0.0\ny.test=127.0.0.[9..2]\nz.test*many\n"
        "zen.test\nw.test*0\nv.test=127.0.0.256\n")})
    compiled = compiler.compile_dir(rules)
    problems = [(d.line, d.problem) for d in compiled.diagnostics]
    assert [n for n, _ in problems] == [2, 3, 4, 5, 6, 7, 8]
    assert "not a DNS zone name" in problems[0][1]
    assert "expected four octet patterns" in problems[1][1]
    assert "low before high" in problems[2][1]
    assert "expected an integer" in problems[3][1]
    assert "same zone and filter as dnsbl:1" in problems[4][1]
    assert "weight 0" in problems[5][1]
    assert "numbers 0..255" in problems[6][1]
    sites = Dnsbl.from_bundle(bundle_mod.from_compiled(compiled)).sites
    assert [(s.zone, s.where) for s in sites] == [("zen.test", "dnsbl:1")]


def test_query_names_rfc5782():
    assert query_name("192.0.2.99", "zen.test") == "99.2.0.192.zen.test"
    assert query_name("::ffff:192.0.2.99", "zen.test") == "99.2.0.192.zen.test"
    assert query_name("2001:db8:1:2:3:4:567:89ab", "zen.test") == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.zen.test")
    assert query_name("not-an-ip", "zen.test") is None


# --- scores against the responder ------------------------------------------------------------
@pytest.fixture(scope="module")
def dns():
    with DnsResponder(DNS, ttl=300) as responder:
        yield responder


@pytest.fixture
def sites(tmp_path):
    rules = write_rules(tmp_path / "rules", RULES)
    compiled = compiler.compile_dir(rules)
    assert not compiled.diagnostics, compiled.diagnostics
    return Dnsbl.from_bundle(bundle_mod.from_compiled(compiled))


@pytest.mark.parametrize("ip,score,blocked,temp", [
    (LISTED, 2, True, []),
    (ALLOWED, -1, False, []),
    (FILTERED, 0, False, []),
    (SMALL, 1, False, []),
    (BOTH, 3, True, []),
    (BROKEN, 0, False, ["zen.test", "bl.test"]),
    (PUBLIC, 0, False, []),
    (CLEAN, 0, False, []),
])
def test_scores(dns, sites, ip, score, blocked, temp):
    r = asyncio.run(sites.check(Resolver(dns.address, timeout=0.5), ip))
    assert (r.score, r.blocked, sorted(r.temp)) == (score, blocked, sorted(temp))


def test_answers_are_cached(dns, sites):
    resolver = Resolver(dns.address, timeout=0.5)

    async def twice():
        await sites.check(resolver, LISTED)
        before = len(dns.queries)
        r = await sites.check(resolver, LISTED)
        return r, len(dns.queries) - before

    r, asked = asyncio.run(twice())
    assert r.blocked and asked == 0


def test_check_shows_the_score(dns, tmp_path):
    rules = write_rules(tmp_path / "rules", RULES)
    b = bundle_mod.from_compiled(compiler.compile_dir(rules))
    report = run_check(b, ip=BOTH, helo="x.test", sender="a@b.test", recipients=["user@example.com"],
                       resolver=Resolver(dns.address, timeout=0.5))
    [connect] = report.stages
    assert connect.verdict == "reject" and connect.reason == "dnsbl"
    assert connect.reply == f"554 5.7.1 Service unavailable; client [{BOTH}] blocked using zen.test, bl.test"
    assert "DNSBL score 3 (threshold 2), listed by dnsbl:1,dnsbl:2" in connect.note
    report = run_check(b, ip=BOTH, helo="x.test", sender="a@b.test", recipients=["user@example.com"])
    assert report.stages[0].reply.startswith("220 ") and "not performed (use --dns)" in report.stages[0].note


# --- through the server ----------------------------------------------------------------------
@pytest.fixture(params=LOOPS)
def start(request, tmp_path, dns):
    servers = []
    rules = write_rules(tmp_path / "rules", RULES)

    def _start(**kw):
        srv = start_server(request.param, rules, str(tmp_path / f"spool{len(servers)}"),
                           resolver=Resolver(dns.address, timeout=0.5), **kw)
        servers.append(srv)
        return srv

    yield _start
    for srv in servers:
        srv.stop()


def greeting(port, source) -> tuple[str, bytes]:
    c = RawClient(port, source)
    try:
        line = c.reply()
        rest = c.sock.recv(100)         # b"" once the server has closed
        return first(line), rest
    finally:
        c.close()


def test_listed_client_gets_554_naming_the_zones(start, decisions):
    srv = start()
    line, rest = greeting(srv.port, BOTH)
    assert line == f"554 5.7.1 Service unavailable; client [{BOTH}] blocked using zen.test, bl.test"
    assert rest == b""                                  # and the connection is closed
    srv.wait_lost()
    [logged] = [l for l in decisions() if "reason=dnsbl" in l]
    assert logged.startswith('action=reject stage=CONNECT reason=dnsbl rule="dnsbl:1,dnsbl:2" '
                             f"client=unknown[{BOTH}]:")
    assert logged.endswith(" score=3")


@pytest.mark.parametrize("ip", [ALLOWED, FILTERED, SMALL, BROKEN, PUBLIC, CLEAN, RELAY])
def test_not_listed_trouble_and_relay_clients_are_greeted(start, ip):
    srv = start()
    c = RawClient(srv.port, ip)
    try:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    finally:
        c.close()


def test_pregreet_is_logged_and_the_session_goes_on(start, decisions):
    srv = start(limits=Limits(greet_wait=0.3))
    c = RawClient(srv.port, CLEAN)
    try:
        c.send(b"EHLO early.test\r\n")              # before the 220
        assert c.reply()[0] == 220
        assert c.reply()[0] == 250                  # then answered in order
    finally:
        c.close()
    lines = [l for l in decisions() if "pregreet" in l]
    assert lines == [f"anomaly=pregreet client=unknown[{CLEAN}]:{lines[0].split(':')[-1].split()[0]} "
                     "detail=\"17 bytes\""]


def test_pregreet_refused(start, decisions):
    srv = start(limits=Limits(greet_wait=0.3), pregreet="refuse")
    c = RawClient(srv.port, CLEAN)
    try:
        c.send(b"EHLO early.test\r\n")
        assert first(c.reply()) == "554 5.5.1 protocol error: talking before the greeting"
        assert c.reply() is None
    finally:
        c.close()
    # a client that waits is greeted
    c = RawClient(srv.port, CLEAN)
    try:
        assert c.reply()[0] == 220
    finally:
        c.close()
    assert any(l.startswith("action=refuse stage=CONNECT reason=pregreet ") for l in decisions())
