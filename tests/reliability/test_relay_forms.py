"""Open-relay probe forms (docs/reliability.md#open-relay-forms).

A server whose rcpthosts is example.com alone (no badrcptto, no recipients:
rcpthosts decides, docs/behaviour/control-files.md#rcpthosts) is probed by a
client with no relay rights over a real socket with recipient forms that
relay testers and spammers use to route through a local domain. None may be
accepted for a domain outside rcpthosts, neither in the RCPT reply nor in the
envelope stored (X-Envelope-To, docs/behaviour/delivery.md#maildir).

For the local domain the routing forms (`%`, `!`, a quoted, escaped or
second `@`, a source route) are refused too (docs/behaviour/control-files.md#routing);
what is accepted is asserted exactly and listed in
docs/reliability.md#known-accepted-forms.
"""
from __future__ import annotations

import re

import pytest

from tests.support.server_harness import PLAIN, RawClient, read_new, start_server, write_rules

pytestmark = pytest.mark.slow

LOCAL = {"example.com"}

FORMS = [
    # percent hack, bang path, quoted @, second @, source routes
    "u%other.test@example.com", "u%other.test%example.com@example.com",
    "u%other.test@EXAMPLE.COM", "u%example.com@other.test",
    "other.test!u@example.com", "other.test!u", "example.com!other.test!u@example.com",
    '"u@other.test"@example.com', '"u%other.test"@example.com', '"u@other.test"',
    '"u@example.com"@other.test', '"u"@other.test',
    "u@other.test@example.com", "u@example.com@other.test", "u@other.test:u@example.com",
    "@a.test,@b.test:u@other.test", "@example.com:u@other.test", "@other.test:u@example.com",
    "@example.com,@other.test:u@other.test",
    # address literals
    "u@[1.2.3.4]", "u@[127.0.0.1]", "u@[192.0.2.1]", "u@[IPv6:::1]", "u@[IPv6:2001:db8::1]",
    "u@[example.com]", "u%other.test@[127.0.0.1]", "u@1.2.3.4", "u@[1.2.3.4]@example.com",
    # case, dots, look-alikes
    "u@EXAMPLE.COM", "u@Example.Com", "u@OTHER.TEST", "u@example.com.", "u@example.com..",
    "u@other.test.", "u@.example.com", "u@sub.example.com", "u@example.com.other.test",
    "u@otherexample.com", "u@example.comother.test", "u@example.co",
    # escapes, comments, odd syntax
    "u@example.com\\@other.test", "u\\@other.test@example.com", "u@other.test (example.com)",
    "u@other.test,u@example.com", "u@other.test u@example.com", "u@example.com>,<u@other.test",
    # no domain
    "u", "postmaster",
]

# what the server accepts for the local domain: no routing form (the routing
# check, docs/behaviour/control-files.md#routing), only plain local addresses
KNOWN_ACCEPTED = {"u@EXAMPLE.COM", "u@Example.Com", "u", "postmaster"}

ENVELOPE_TO = re.compile(rb"^X-Envelope-To: <(.*)>$", re.M)


def domain_of(address: str) -> str | None:
    """The domain a next hop routes on: after the last @ (None: no domain,
    a local name)."""
    if "@" not in address:
        return None
    return address.rsplit("@", 1)[1].lower().rstrip(".")


def relays(address: str) -> bool:
    d = domain_of(address.strip('"'))
    return d is not None and d not in LOCAL


def probe(port: int, i: int, form: str) -> int:
    """RCPT TO:<form> from a client without relay rights; a message with
    X-Form: i when accepted. The RCPT reply code."""
    with RawClient(port, PLAIN) as c:
        assert c.reply()[0] == 220
        c.cmd("HELO probe.test")
        assert c.cmd("MAIL FROM:<probe@sender.test>")[0] == 250
        code = c.cmd(f"RCPT TO:<{form}>")[0]
        if code == 250:
            assert c.cmd("DATA")[0] == 354
            assert c.cmd(f"X-Form: {i}\r\n\r\nprobe\r\n.")[0] == 250
        c.cmd("QUIT")
    return code


@pytest.fixture
def server(tmp_path):
    rules = write_rules(tmp_path / "rules", {"rcpthosts": "example.com\n"},
                        remove=("badrcptto", "recipients"))
    srv = start_server("asyncio", rules, str(tmp_path / "md"))
    yield srv
    srv.stop()


def test_no_relay_form_reaches_another_domain(server, figures):
    codes = {form: probe(server.port, i, form) for i, form in enumerate(FORMS)}
    accepted = {f for f, code in codes.items() if code == 250}
    stored_to = [m.decode(errors="replace") for raw in read_new(server.maildir)
                 for m in ENVELOPE_TO.findall(raw)]
    relayed = [a for a in stored_to if relays(a)]
    figures.update(forms=len(FORMS), accepted_local=len(accepted),
                   refused=sum(1 for c in codes.values() if 500 <= c < 600),
                   stored=len(stored_to), relayed=len(relayed))
    assert all(c in (250, 553, 555, 501, 550) for c in codes.values()), codes
    assert relayed == [], f"relayed outside rcpthosts: {relayed}"
    assert not [f for f in accepted if relays(f)]
    assert len(stored_to) == len(accepted)
    assert accepted == KNOWN_ACCEPTED, (sorted(accepted - KNOWN_ACCEPTED),
                                        sorted(KNOWN_ACCEPTED - accepted))
