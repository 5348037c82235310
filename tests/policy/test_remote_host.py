"""The client host name (qmail's TCPREMOTEHOST) through the real server.

tcpserver looks the client's name up before qmail-smtpd runs; mailfilter does
the same before the greeting (server.py `remote_host`): "confirmed" (default,
tcpserver -p / Postfix) keeps the first PTR name only if it resolves back to
the client address, "ptr" takes it as it is, "off" keeps "unknown" (tcpserver
-H). The name feeds tcp.smtp `=host` / `=.suffix` / `=` keys
(docs/behaviour/tcp-smtp.md#which-rule-applies key order), HELOCHECK "="
(docs/behaviour/tcp-smtp.md#settings), decorated badmailfrom `@dom=` /
`~dom` (docs/behaviour/control-files.md#decorated-entries) and the Received header
(docs/behaviour/smtp.md#received-header).

Real sockets on 127.0.0.1 on both loops; clients bind their own 127.0.0.x
address so each has its own PTR record in the test DNS responder
(tests/dns_responder.py, UDP on 127.0.0.1). No test sleeps: waits are on
replies, on the responder having seen a query, or on a closed connection.
"""
from __future__ import annotations

import asyncio

import pytest

from mailfilter.policy.dns import Resolver
from mailfilter.smtp.protocol import Limits
from tests.support.dns_responder import DnsResponder
from tests.support.server_harness import (
    LOOPS, TIMEOUT, RawClient, first, read_new, spawn_serve, start_server,
    write_rules,
)

GOOD = "127.0.0.21"         # PTR good.rdns.test, A 127.0.0.21: confirmed
LIAR = "127.0.0.22"         # PTR liar.rdns.test, A 192.0.2.1: not confirmed
NX = "127.0.0.23"           # no PTR (NXDOMAIN)
SLOW = "127.0.0.24"         # the PTR query is never answered (timeout)
BROKEN = "127.0.0.25"       # SERVFAIL
NAMED_RELAY = "127.0.0.26"  # relay.named.test: tcp.smtp =relay.named.test RELAYCLIENT
NAMED_DENY = "127.0.0.27"   # mx.denied.test: tcp.smtp =.denied.test deny
HELO_EQ = "127.0.0.28"      # mx.eq.test: tcp.smtp =.eq.test HELOCHECK="="
WELLKNOWN = "127.0.0.29"    # mx1.wellknown.test: may send as @wellknown.test


def ptr(ip: str) -> str:
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"


DNS_TABLE = {
    (ptr(GOOD), "PTR"): ["good.rdns.test."],
    ("good.rdns.test", "A"): [GOOD],
    (ptr(LIAR), "PTR"): ["liar.rdns.test."],
    ("liar.rdns.test", "A"): ["192.0.2.1"],
    ptr(NX): "NXDOMAIN",
    ptr(SLOW): "DROP",
    ptr(BROKEN): "SERVFAIL",
    (ptr(NAMED_RELAY), "PTR"): ["relay.named.test."],
    ("relay.named.test", "A"): [NAMED_RELAY],
    (ptr(NAMED_DENY), "PTR"): ["mx.denied.test."],
    ("mx.denied.test", "A"): [NAMED_DENY],
    (ptr(HELO_EQ), "PTR"): ["mx.eq.test."],
    ("mx.eq.test", "A"): [HELO_EQ],
    (ptr(WELLKNOWN), "PTR"): ["mx1.wellknown.test."],
    ("mx1.wellknown.test", "A"): [WELLKNOWN],
}

RULES = {
    "tcp.smtp": (
        '=relay.named.test:allow,RELAYCLIENT=""\n'
        '=.denied.test:deny\n'
        '=.eq.test:allow,HELOCHECK="="\n'
        ':allow\n'
    ),
    "badmailfrom": "@wellknown.test=\n~rdns.test\n",
}

OK = "250 2.1.5 ok"
BAD_HELO = "550 5.7.1 sorry, invalid HELO/EHLO greeting"


@pytest.fixture(scope="module")
def dns():
    with DnsResponder(DNS_TABLE) as responder:
        yield responder


@pytest.fixture(params=LOOPS)
def start(request, tmp_path, dns):
    servers = []
    rules = write_rules(tmp_path / "rules", RULES)

    def _start(remote_host="confirmed", timeout=0.5, limits=None):
        srv = start_server(request.param, rules, str(tmp_path / f"spool{len(servers)}"),
                           limits=limits, resolver=Resolver(dns.address, timeout=timeout),
                           remote_host=remote_host)
        servers.append(srv)
        return srv

    yield _start
    for srv in servers:
        srv.stop()


def greeted(port, source, helo="client.test") -> RawClient:
    c = RawClient(port, source)
    assert c.reply()[0] == 220
    assert c.cmd(f"EHLO {helo}")[0] == 250
    return c


def host_seen(srv) -> str:
    """TCPREMOTEHOST of the server's latest session."""
    return srv.connections[-1].client.host


# ------------------------------------------------------------------ lookups
@pytest.mark.parametrize("mode,source,host", [
    ("confirmed", GOOD, "good.rdns.test"),
    ("confirmed", LIAR, "unknown"),          # the PTR name does not resolve back
    ("confirmed", NX, "unknown"),
    ("confirmed", BROKEN, "unknown"),        # a temporary failure is "unknown"
    ("ptr", GOOD, "good.rdns.test"),
    ("ptr", LIAR, "liar.rdns.test"),         # first PTR name, unconfirmed
    ("ptr", NX, "unknown"),
])
def test_remote_host_modes(start, dns, mode, source, host):
    """confirmed = tcpserver -p / Postfix, ptr = the first PTR name."""
    srv = start(remote_host=mode)
    c = greeted(srv.port, source)
    assert first(c.cmd("NOOP")) == "250 2.0.0 ok"
    c.close()
    assert host_seen(srv) == host
    assert srv.connections[-1].client_label.startswith(f"{host}[{source}]:")
    assert (ptr(source), "PTR") in dns.queries


def test_remote_host_timeout_is_unknown_and_bounded(start, dns):
    """A resolver that never answers: "unknown" once the resolver's timeout
    is over, then the session runs normally."""
    srv = start(timeout=0.1)
    c = greeted(srv.port, SLOW)
    assert first(c.cmd("NOOP")) == "250 2.0.0 ok"
    c.close()
    assert host_seen(srv) == "unknown"


def test_remote_host_off_makes_no_query(start, dns):
    """off = tcpserver -H: no PTR query at all, the client is "unknown"."""
    srv = start(remote_host="off")
    before = len(dns.queries)
    c = greeted(srv.port, GOOD)
    c.close()
    assert host_seen(srv) == "unknown"
    assert dns.queries[before:] == []


# ------------------------------------------------------------------ uses of the name
def _deliver(c: RawClient, sender="a@rdns.test", rcpt="user@example.com") -> str:
    c.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n".encode())
    assert [r[0] for r in c.replies(3)] == [250, 250, 354]
    c.send(b"Subject: r\r\n\r\nbody\r\n.\r\n")
    return first(c.reply())


@pytest.mark.parametrize("helo,trace", [
    ("good.rdns.test", b"Received: from good.rdns.test (127.0.0.21)\n"),
    ("other.test", b"Received: from good.rdns.test (HELO other.test) (127.0.0.21)\n"),
])
def test_received_header_names_the_host(start, helo, trace):
    """docs/behaviour/smtp.md#received-header: `from <TCPREMOTEHOST>`; `(HELO x)` only
    when it differs."""
    srv = start()
    c = greeted(srv.port, GOOD, helo)
    assert _deliver(c).startswith("250 2.0.0 ok")
    c.close()
    [raw] = read_new(srv.maildir)
    assert trace in raw


@pytest.mark.parametrize("helo,expect", [
    ("mx.eq.test", OK), ("MX.EQ.Test", OK), ("other.test", BAD_HELO),
])
def test_helocheck_equals_through_the_server(start, helo, expect):
    """docs/behaviour/tcp-smtp.md#settings HELOCHECK "=": the HELO must be the client's host name
    (case-insensitive); the setting itself comes from a tcp.smtp `=.suffix` key."""
    srv = start()
    c = greeted(srv.port, HELO_EQ, helo)
    c.send(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<user@example.com>\r\n")
    assert [first(r) for r in c.replies(2)] == ["250 2.1.0 ok", expect]
    c.close()


def test_tcp_smtp_host_rules_through_the_server(start):
    """docs/behaviour/tcp-smtp.md#denied-clients, #which-rule-applies: `=host` (RELAYCLIENT) and
    `=.suffix` (deny) keys apply to clients with no address rule; an unconfirmed name
    matches none."""
    srv = start()
    c = greeted(srv.port, NAMED_RELAY)
    assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    assert first(c.cmd("RCPT TO:<someone@elsewhere.test>")) == OK      # relayed
    c.close()
    c = RawClient(srv.port, NAMED_DENY)       # denied by its name: closed at once (--deny close)
    assert c.reply() is None
    c.close()
    c = greeted(srv.port, LIAR)                                         # "unknown": default rule
    assert first(c.cmd("MAIL FROM:<a@sender.test>")) == "250 2.1.0 ok"
    assert first(c.cmd("RCPT TO:<someone@elsewhere.test>")).startswith("553 5.7.1 sorry, that domain")
    c.close()


@pytest.mark.parametrize("source,sender,expect", [
    (WELLKNOWN, "x@wellknown.test", OK),       # @dom=: from a host in the domain
    (GOOD, "x@wellknown.test", "553"),         # ... and from anybody else: refused
    (GOOD, "x@gmail.test", "553"),             # ~rdns.test: a host of rdns.test as someone else
    (GOOD, "x@rdns.test", OK),                 # ... but as itself
    (NX, "x@gmail.test", OK),                  # ~dom never for "unknown"
])
def test_decorated_badmailfrom_with_host_names(start, source, sender, expect):
    """docs/behaviour/control-files.md#decorated-entries: `@dom=` (well-known domain) and `~dom`
    (mismatched domains) compare the sender with the client's host name."""
    srv = start()
    c = greeted(srv.port, source)
    c.send(f"MAIL FROM:<{sender}>\r\nRCPT TO:<user@example.com>\r\n".encode())
    assert first(c.reply()) == "250 2.1.0 ok"
    assert first(c.reply()).startswith(expect)
    c.close()


# ------------------------------------------------------------------ the lookup and the connection
def test_input_before_the_greeting_waits_for_the_lookup(start, dns):
    """Commands sent before the greeting (while the name is looked up) are
    answered after the 220, in order; nothing is lost or answered early."""
    srv = start(timeout=0.2)
    n = len(dns.queries)
    c = RawClient(srv.port, SLOW)
    c.send(b"EHLO early.test\r\nNOOP\r\n")
    assert dns.wait_query(ptr(SLOW), "PTR", since=n)
    assert c.reply()[0] == 220
    assert c.reply()[0] == 250
    assert first(c.reply()) == "250 2.0.0 ok"
    assert first(c.cmd("QUIT")).startswith("221")
    c.close()
    assert srv.connections[-1].writes[0].startswith(b"220 ")


def test_client_gone_during_the_lookup_cancels_it(start, dns):
    """A client that leaves before the greeting: the lookup task is
    cancelled at once (long before the resolver's 5 s timeout), the
    connection is counted out, nothing was written."""
    srv = start(timeout=5.0)
    n = len(dns.queries)
    c = RawClient(srv.port, SLOW)
    assert dns.wait_query(ptr(SLOW), "PTR", since=n)
    proto = srv.connections[-1]
    task = proto.task
    assert task is not None and not task.done()
    c.close()
    [lost] = srv.wait_lost(timeout=3.0)
    assert lost is proto
    assert srv.call(_settled(task)) is True
    assert proto.writes == [] and proto.engine is None
    assert srv.state.connections == 0 and not srv.state.per_ip


async def _settled(task) -> bool:
    """True when `task` ended cancelled."""
    await asyncio.wait([task])
    return task.cancelled()


def test_timers_after_the_lookup(start):
    """The idle timeout starts at the greeting; the session deadline counts
    from the connection (tcpserver's lookup time is the session's too)."""
    srv = start(timeout=0.1, limits=Limits(idle_timeout=0.2))
    c = greeted(srv.port, SLOW)
    assert first(c.reply()) == "421 4.4.2 mx.test timeout, closing connection"
    assert c.at_eof()
    c.close()
    srv = start(timeout=0.1, limits=Limits(idle_timeout=60, session_deadline=0.3))
    c = greeted(srv.port, SLOW)
    assert first(c.reply()) == "421 4.4.2 mx.test session too long, closing connection"
    c.close()


# ------------------------------------------------------------------ the real process
def test_serve_remote_host_flag(tmp_path, dns):
    """`mailfilter serve --remote-host confirmed --resolver ADDR`: the log
    and the Received header name the client; `--remote-host off` does not."""
    rules = write_rules(tmp_path / "rules", RULES)
    for mode, label in (("confirmed", "good.rdns.test"), ("off", "unknown")):
        sp = spawn_serve("--rules", rules, "--deliver", f"maildir:{tmp_path}/{mode}",
                         "--resolver", dns.address, "--remote-host", mode)
        try:
            with RawClient(sp.port, GOOD, timeout=TIMEOUT) as c:
                assert c.reply()[0] == 220
                assert c.cmd("EHLO good.rdns.test")[0] == 250
                assert _deliver(c).startswith("250 2.0.0 ok")
            sp.log.wait_for(rf"action=accept stage=DATA client={label}\[{GOOD}\]:\d+")
        finally:
            assert sp.stop() == 0
        [raw] = read_new(tmp_path / mode)
        assert f"Received: from {label} ".encode() in raw
