"""policy.py fast paths: shared (cached) verdicts per rule id, the skipped
transaction reset, exceptions on the inlined spamcontrol path. Every cached
verdict must equal the one built fresh (docs/behaviour/smtp.md#pending-verdicts, #rcpt-checks,
docs/behaviour/control-files.md#which-match-wins)."""
import pytest

from mailfilter.rules import bundle

from mailfilter.rules import compiler

from mailfilter.policy import engine as policy
from mailfilter.policy.engine import Client, PolicyEngine, PolicyOptions, Verdict
from mailfilter.smtp.replies import reply

FILES = {
    "rcpthosts": "example.com\n",
    "badhelo": "localhost\n.bad.example\n!ok.bad.example\n",
    "badmailfrom": "@spam.example\n!boss@spam.example\n",
    "badrcptto": "bad@example.com\n*%*\n!ok%x@example.com\n",
    "tcp.smtp": '10.0.0.:allow,TARPITCOUNT="1",TARPITDELAY="3"\n:allow,HELOCHECK=""\n',
}


@pytest.fixture
def eng(tmp_path):
    d = tmp_path / "rules"
    d.mkdir()
    for name, text in FILES.items():
        (d / name).write_text(text)
    compiled = compiler.compile_dir(str(d))
    assert compiled.diagnostics == []
    # allow_routing: the badrcptto `%` lines below are what these tests are about
    return PolicyEngine(bundle.from_compiled(compiled), PolicyOptions(allow_routing=True))


def fields(v: Verdict):
    return (v.stage, v.accept, v.reply, v.reason, v.rule, v.delay, v.close, v.recipient)


def test_pending_verdicts_are_shared_and_exact(eng):
    a, b = eng.session(Client(ip="203.0.113.5")), eng.session(Client(ip="203.0.113.6"))
    va, vb = a.helo("localhost"), b.helo("LOCALHOST")
    assert va is vb
    assert fields(va) == ("HELO", True, eng.v_helo.reply, "pending_bad_helo", "badhelo:1", 0.0, False, None)
    ma, mb = a.mail("x@spam.example"), b.mail("y@SPAM.example")
    assert ma is mb
    assert fields(ma) == ("MAIL", True, reply("mail_ok"), "pending_badmailfrom", "badmailfrom:1",
                          0.0, False, None)
    assert a.helo("mx.bad.example") is not va                   # another rule, another verdict
    assert a.helo("mx.bad.example").rule == "badhelo:2"


def test_reject_verdicts_are_shared_and_exact(eng):
    def rcpt(addr, helo="mx.good.example"):
        s = eng.session(Client(ip="203.0.113.5"))
        s.helo(helo)
        s.mail("a@good.example")
        return s.rcpt(addr)
    v1, v2 = rcpt("bad@example.com"), rcpt("BAD@example.com")
    assert v1 is v2
    assert fields(v1) == ("RCPT", False, reply("badrcptto"), "badrcptto", "badrcptto:1", 0.0, False, None)
    # refused because no rcpthosts line names the domain: the rule is the file
    assert fields(rcpt("u@far.example")) == ("RCPT", False, reply("rcpthosts"), "rcpthosts",
                                             "rcpthosts", 0.0, False, None)
    assert rcpt("u@example.com", helo="localhost").rule == "badhelo:1"


def test_exceptions_on_the_fast_path(eng):
    s = eng.session(Client(ip="203.0.113.5"))
    assert s.helo("ok.bad.example") is eng.v_helo               # `!` line last: not listed
    assert s.mail("boss@spam.example").reason == "ok"
    assert s.rcpt("ok%x@example.com").accept
    assert s.rcpt("no%x@example.com").reason == "badrcptto"


def test_tarpit_delays_are_never_shared(eng):
    s = eng.session(Client(ip="10.0.0.1"))
    s.helo("mx.good.example")
    s.mail("a@good.example")
    assert s.rcpt("u@example.com").accept                       # first: no delay
    d1, d2 = s.rcpt("bad@example.com"), s.rcpt("bad@example.com")
    assert d1.delay == 3.0 and d2.delay == 3.0 and d1 is not d2
    assert (d1.reason, d1.rule) == ("badrcptto", "badrcptto:1")
    assert eng.reject_verdict("badrcptto", "badrcptto", 0).delay == 0.0


def test_caches_are_bounded(eng, monkeypatch):
    monkeypatch.setattr(policy, "_SHARED_VERDICTS_MAX", 3)
    seen = [eng.reject_verdict("badrcptto", "badrcptto", rid) for rid in range(5)]
    assert len(eng._rejects) <= 3
    again = eng.reject_verdict("badrcptto", "badrcptto", 0)     # rebuilt after the clear
    assert fields(again) == fields(seen[0])
    for rid in range(5):
        eng.pending_verdict("MAIL", "badmailfrom", rid)
    assert len(eng._pending) <= 3


def test_transaction_reset_still_happens(eng):
    s = eng.session(Client(ip="203.0.113.5"))
    s.helo("mx.good.example")
    s.mail("x@spam.example")
    s.rcpt("u@example.com")
    assert (s.sender, s.rcpt_count) == ("x@spam.example", 1) and s.sender_verdict is not None
    s.helo("mx.good.example")                                   # HELO resets the transaction
    assert (s.sender, s.sender_verdict, s.rcpt_count, s.accepted) == (None, None, 0, 0)
    s.rcpt("u@example.com")                                     # RCPT alone dirties it too
    s.mail("a@good.example")
    assert s.rcpt_count == 0
    s.set_mail_dns("fail")
    s.helo("mx.good.example")
    assert s.mail_dns is None
    s.mail("a@good.example")
    s.reset()
    assert s.sender is None
