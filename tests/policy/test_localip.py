"""localiphost (docs/behaviour/control-files.md#localiphost): a domain literal `[d.d.d.d]`
naming this host is replaced by `localiphost` (default `me`) in senders and recipients, before
rcpthosts, recipients and the lists see the address; the message is stored
for the rewritten address."""
import smtplib

import pytest

from mailfilter.rules import bundle

from mailfilter.rules import compiler
from mailfilter.policy.localip import is_local_ipv4
from mailfilter.policy.engine import Client, PolicyEngine, PolicyOptions
from tests.support.server_harness import LOOPS, TIMEOUT, read_new, start_server, write_rules


def engine(tmp_path, files, **opts):
    d = tmp_path / "rules"
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    compiled = compiler.compile_dir(str(d))
    assert compiled.diagnostics == []
    return PolicyEngine(bundle.from_compiled(compiled), PolicyOptions(**opts))


def test_is_local_ipv4():
    assert is_local_ipv4("127.0.0.1") and is_local_ipv4("127.0.0.23")    # all of 127/8
    assert not is_local_ipv4("192.0.2.1")                                 # TEST-NET-1
    for bad in ("", "1.2.3", "::1", "[127.0.0.1]", "example.com"):
        assert not is_local_ipv4(bad)


@pytest.mark.parametrize("address,expect", [
    ("postmaster@[127.0.0.1]", "postmaster@mx.example.com"),
    ("a@b@[127.0.0.1]", "a@b@mx.example.com"),            # the part after the LAST @
    ("postmaster@[192.0.2.1]", "postmaster@[192.0.2.1]"),  # not ours
    ("postmaster@[127.0.0.1] ", "postmaster@[127.0.0.1] "),
    ("postmaster@x[127.0.0.1]", "postmaster@x[127.0.0.1]"),
    ("postmaster@[::1]", "postmaster@[::1]"),              # IPv4 literals only
    ("postmaster@[IPv6:::1]", "postmaster@[IPv6:::1]"),
    ("postmaster@[127.1]", "postmaster@[127.1]"),          # exactly d.d.d.d
    ("[127.0.0.1]", "[127.0.0.1]"),                        # no @: no domain part
    ("", ""),
])
def test_local_literal(tmp_path, address, expect):
    eng = engine(tmp_path, {"me": "mx.test\n", "localiphost": "mx.example.com\n",
                            "rcpthosts": "example.com\n"})
    assert eng.local_literal(address) == expect


def test_localiphost_defaults_to_me(tmp_path):
    eng = engine(tmp_path, {"me": "mx.test\n", "rcpthosts": "example.com\n"})
    assert eng.local_literal("u@[127.0.0.1]") == "u@mx.test"


def test_rewritten_before_rcpthosts_and_lists(tmp_path):
    eng = engine(tmp_path, {"me": "mx.test\n", "localiphost": "example.com\n",
                            "rcpthosts": "example.com\n",
                            "badmailfrom": "spammer@example.com\n",
                            "badrcptto": "abuse@example.com\n"})
    s = eng.session(Client(ip="203.0.113.5"))
    s.helo("mx.sender.example")
    s.mail("a@sender.example")
    v = s.rcpt("postmaster@[127.0.0.1]")
    assert v.accept and v.recipient == "postmaster@example.com"
    v = s.rcpt("postmaster@[192.0.2.1]")                   # not ours: rcpthosts refuses
    assert not v.accept and v.reason == "rcpthosts"
    v = s.rcpt("abuse@[127.0.0.1]")                         # badrcptto sees the rewritten one
    assert not v.accept and v.reason == "badrcptto"
    s.mail("spammer@[127.0.0.1]")
    assert s.sender == "spammer@example.com"
    v = s.rcpt("postmaster@example.com")
    assert not v.accept and v.reason == "badmailfrom"
    assert s.rcpt("postmaster@example.com").rule == "badmailfrom:1"


def test_not_local_predicate_is_used(tmp_path):
    eng = engine(tmp_path, {"me": "mx.test\n", "rcpthosts": "mx.test\n"},
                 is_local_ip=lambda ip: ip == "192.0.2.7")
    assert eng.local_literal("u@[192.0.2.7]") == "u@mx.test"
    assert eng.local_literal("u@[127.0.0.1]") == "u@[127.0.0.1]"


@pytest.mark.parametrize("loop_kind", LOOPS)
def test_server_stores_rewritten_envelope(tmp_path, loop_kind):
    rules = write_rules(tmp_path / "rules", {"localiphost": "example.com\n"})
    maildir = str(tmp_path / "spool")
    srv = start_server(loop_kind, rules, maildir)
    try:
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=TIMEOUT) as s:
            s.ehlo("client.test")
            assert s.mail("a@[127.0.0.1]")[0] == 250
            assert s.rcpt("postmaster@[127.0.0.1]")[0] == 250
            assert s.rcpt("postmaster@[192.0.2.1]")[0] == 553     # not ours: not a rcpthost
            assert s.data(b"Subject: literal\r\n\r\nbody\r\n")[0] == 250
    finally:
        srv.stop()
    [raw] = read_new(maildir)
    assert raw.startswith(b"Return-Path: <a@example.com>\nX-Envelope-To: <postmaster@example.com>\n")
