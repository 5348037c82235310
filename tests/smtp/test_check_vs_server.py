"""`mailfilter check` against the real server (README: check prints "the
reply the server would give" at each stage; issue 2 CLI, issue 3 "the server
and `mailfilter check` share this one policy code").

The same envelopes go through `run_check` and through a real session on
127.0.0.1 (each client binds its own 127.0.0.x so tcp.smtp gives it its
profile); the reply lines must be the same, stage by stage. Envelopes are a
fixed list of the cases that once differed (a padded or empty HELO, an 8-bit
HELO, a `deny` client's greeting, RCPTs after a refused MAIL, UTF-8
addresses) plus a seeded random mix. Both announce SMTPUTF8 at MAIL when an
address of the envelope is not ASCII and the server offers it; a server
with smtputf8 off refuses such an address (553 5.6.7) and check says so.
"""
import random

import pytest

from mailfilter.rules import bundle as bundle_mod
from mailfilter.rules import compiler
from mailfilter.check import run_check
from tests.support.server_harness import BASE_RULES, RawClient, first, start_server, write_rules

HELOCHECK_DOT = "127.0.0.20"    # HELOCHECK=".": a HELO is required, badhelo applies
AUTH_REQUIRED = "127.0.0.21"    # SMTPAUTH="!": 530 at MAIL without AUTH
RELAY_MAILFROM = "127.0.0.22"   # RELAYMAILFROM: senders in relaymailfrom relay
DENIED = "127.0.0.3"            # BASE_RULES: deny
PLAIN = "127.0.0.1"
RELAY = "127.0.0.2"

RULES = {
    "badhelo": "example.com\n?.numeric.example\n",
    # both spellings of an IDN domain name one entry (docs/behaviour/control-files.md#international-domain-names)
    "rcpthosts": "example.com\n.example.com\nexample.net\nb\u00fccher.example\nxn--caf-dma.example\n",
    "recipients": BASE_RULES["recipients"] + "j\u00f6rg@b\u00fccher.example\n@xn--caf-dma.example\n",
    "relaymailfrom": "boss@partner.example\n@trusted.example\n",
    "tcp.smtp": (f'{HELOCHECK_DOT}:allow,HELOCHECK="."\n'
                 f'{AUTH_REQUIRED}:allow,SMTPAUTH="!"\n'
                 f'{RELAY_MAILFROM}:allow,RELAYMAILFROM=""\n' + BASE_RULES["tcp.smtp"]),
}

# (ip, helo or None, sender, recipients)
FIXED = [
    (HELOCHECK_DOT, "example.com ", "a@b.example", ["user@example.com"]),   # padding stripped
    (HELOCHECK_DOT, "", "a@b.example", ["user@example.com"]),              # 501, then no HELO
    (PLAIN, "", "a@b.example", ["user@example.com"]),
    (HELOCHECK_DOT, "\u00e9.numeric.example", "a@b.example", ["user@example.com"]),  # 2 bytes, no match
    (HELOCHECK_DOT, "x.numeric.example", "a@b.example", ["user@example.com"]),
    (DENIED, "mx.client.example", "a@b.example", ["user@example.com", "postmaster"]),
    (AUTH_REQUIRED, "mx.client.example", "a@b.example", ["user@example.com", "x@far.example"]),
    (PLAIN, "mx.client.example", "caf\u00e9@b.example", ["user@example.com"]),   # 553 5.6.7 without SMTPUTF8
    (PLAIN, "mx.client.example", "a@b.example", ["j\u00f6rg@xn--bcher-kva.example",
                                                 "J\u00f6rg@B\u00fcCHER.example", "x@caf\u00e9.example",
                                                 "J\u00d6RG@b\u00fccher.example", "x@strasse.example"]),
    (PLAIN, "mx.client.example", "spammer@example.org", ["user@example.com", "nobody@example.com"]),
    (RELAY_MAILFROM, "mx.client.example", "boss@partner.example", ["x@far.example"]),
    (RELAY_MAILFROM, "mx.client.example", "other@partner.example", ["x@far.example"]),
    (PLAIN, None, "", ["postmaster", "user@example.com", ""]),
]

HELOS = [None, "", "mx.client.example", "example.com", " example.com", "a.numeric.example", "[192.0.2.1]"]
SENDERS = ["", "a@b.example", "spammer@example.org", "x@spam.example.org", "y@host.invalid",
           "boss@partner.example", "z@trusted.example", "bad address"]
RCPTS = ["user@example.com", "nobody@example.com", "x@far.example", "a%b@example.com",
         "noreply@example.net", "any@example.net", "postmaster", "someone@sub.example.com"]
IPS = [PLAIN, RELAY, DENIED, HELOCHECK_DOT, AUTH_REQUIRED, RELAY_MAILFROM]


def _random_envelopes(n: int, seed: int = 7):
    rng = random.Random(seed)
    return [(rng.choice(IPS), rng.choice(HELOS), rng.choice(SENDERS),
             rng.sample(RCPTS, rng.randint(1, 3))) for _ in range(n)]


CLOSED = "(none: the connection is closed at once)"     # what check says for deny + close


def _server_replies(port: int, ip: str, helo, sender, rcpts, smtputf8: bool) -> list[str]:
    c = RawClient(port, ip)
    try:
        greeting = c.reply()
        if greeting is None:            # a deny client with --deny close: no session
            return [CLOSED]
        out = [first(greeting)]
        if helo is not None:
            out.append(first(c.cmd(f"HELO {helo}")))
        utf8 = smtputf8 and not all(a.isascii() for a in (sender, *rcpts))
        out.append(first(c.cmd(f"MAIL FROM:<{sender}>" + (" SMTPUTF8" if utf8 else ""))))
        out.extend(first(c.cmd(f"RCPT TO:<{r}>")) for r in rcpts)
        c.cmd("QUIT")
    finally:
        c.close()
    return out


@pytest.fixture(scope="module", params=[("close", True), ("rcpt", True), ("close", False)],
                ids=["close", "rcpt", "close-no-smtputf8"])
def rules_and_server(tmp_path_factory, request):
    """The server with each --deny mode: a deny client closed at once, or
    greeted and refused at every RCPT; and with SMTPUTF8 not offered."""
    deny, smtputf8 = request.param
    d = tmp_path_factory.mktemp("check_vs_server")
    rules = write_rules(str(d / "rules"), RULES)
    srv = start_server("uvloop", rules, str(d / "spool"), deny=deny, smtputf8=smtputf8)
    compiled = compiler.compile_dir(rules)
    assert not compiled.diagnostics, compiled.diagnostics
    yield bundle_mod.from_compiled(compiled), srv, deny, smtputf8
    srv.stop()


@pytest.mark.parametrize("envelope", FIXED + _random_envelopes(60),
                         ids=lambda e: f"{e[0]}|{e[1]!r}|{e[2]}|{','.join(e[3])}")
def test_check_gives_the_servers_replies(rules_and_server, envelope):
    b, srv, deny, smtputf8 = rules_and_server
    ip, helo, sender, rcpts = envelope
    report = run_check(b, ip=ip, helo=helo, sender=sender, recipients=rcpts, deny=deny,
                       smtputf8=smtputf8)
    assert [s.reply for s in report.stages] == _server_replies(srv.port, ip, helo, sender, rcpts,
                                                               smtputf8)


def test_utf8_envelope_replies(rules_and_server):
    """What the UTF-8 envelope of FIXED gets: with SMTPUTF8 both spellings of
    bücher.example and café.example pass rcpthosts and find their recipients
    line; a non-ASCII capital is not folded (JÖRG is not jörg); without
    SMTPUTF8 every 8-bit address is 553 5.6.7."""
    b, srv, deny, smtputf8 = rules_and_server
    rcpts = ["j\u00f6rg@xn--bcher-kva.example", "J\u00f6rg@B\u00fcCHER.example", "x@caf\u00e9.example",
             "J\u00d6RG@b\u00fccher.example", "x@strasse.example"]
    replies = _server_replies(srv.port, PLAIN, "mx.client.example", "a@b.example", rcpts, smtputf8)
    if smtputf8:
        assert replies[2:] == ["250 2.1.0 ok", "250 2.1.5 ok", "250 2.1.5 ok", "250 2.1.5 ok",
                               "550 5.1.1 sorry, no mailbox by that name",
                               "553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts"]
    else:
        assert replies[2:] == ["250 2.1.0 ok"] + ["553 5.6.7 non-ASCII address needs SMTPUTF8"] * 4 \
            + ["553 5.7.1 sorry, that domain isn't in my list of allowed rcpthosts"]
