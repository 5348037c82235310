"""policy.py per-client settings and verdict order (docs/behaviour/tcp-smtp.md#settings,
docs/behaviour/smtp.md#pending-verdicts, #rcpt-checks,
docs/behaviour/control-files.md#qregex-dialect; docs/behaviour/control-files.md#rcpthosts,
docs/behaviour/auth.md#after-success). Each test builds a small rules directory."""
import pytest

from mailfilter.rules import bundle

from mailfilter.rules import compiler
from mailfilter.policy.engine import DNS_FAIL, DNS_OK, DNS_TEMP, Client, PolicyEngine, PolicyOptions


def engine(tmp_path, files: dict[str, str], **opts) -> PolicyEngine:
    d = tmp_path / "rules"
    d.mkdir(exist_ok=True)
    files.setdefault("rcpthosts", "example.com\n")
    for name, text in files.items():
        (d / name).write_text(text)
    compiled = compiler.compile_dir(str(d))
    assert compiled.diagnostics == []
    return PolicyEngine(bundle.from_compiled(compiled), PolicyOptions(**opts))


def envelope(eng, helo="mx.sender.example", sender="a@sender.example", rcpt="u@example.com",
             ip="203.0.113.5", host="unknown"):
    s = eng.session(Client(ip=ip, host=host))
    if helo is not None:
        s.helo(helo)
    s.mail(sender)
    return s, s.rcpt(rcpt)


def test_helocheck_equal_needs_a_known_host(tmp_path):
    """`=` compares with the client's host name; "unknown" is no name."""
    eng = engine(tmp_path, {"tcp.smtp": ':allow,HELOCHECK="="\n'})
    for helo in ("unknown", "UNKNOWN", "mx.sender.example"):
        s, v = envelope(eng, helo=helo, host="unknown")
        assert not v.accept and v.reason == "helo_mismatch", helo


@pytest.mark.parametrize("mode,helo,expect", [
    ("!", None, "helo_missing"),       # any one-char mode rejects a missing HELO
    ("!", "", "helo_empty"),
    ("!", "localhost", None),          # "!" does not look at badhelo
    (".", "", "helo_empty"),
    (".", "localhost", "bad_helo"),
    ("", "localhost", "bad_helo"),
    ("", None, None),                  # "" is not one character: no HELO required
    ("=", "mx.sender.example", "helo_mismatch"),
    ("=", "mail.client.example", None),
])
def test_helocheck_modes(tmp_path, mode, helo, expect):
    eng = engine(tmp_path, {"badhelo": "localhost\n", "tcp.smtp": f':allow,HELOCHECK="{mode}"\n'})
    s, v = envelope(eng, helo=helo, host="mail.client.example")
    if expect is None:
        assert v.accept, v
    else:
        assert not v.accept and v.reason == expect and v.reply.code == 550


@pytest.mark.parametrize("mode,helo,expect", [
    ("!", None, "helo_missing"),       # HELOCHECK's demands hold in the qregex dialect too
    ("!", "", "helo_empty"),
    ("!", "localhost", "bad_helo"),    # ... while badhelo is read the qregex way: always
    (".", None, "helo_missing"),
    ("=", "mx.sender.example", "helo_mismatch"),
    ("=", "mail.client.example", None),
    ("=", "LOCALHOST", "bad_helo"),    # the list fires first
    ("", None, None),
])
def test_helocheck_modes_qregex(tmp_path, mode, helo, expect):
    eng = engine(tmp_path, {"dialect": "qregex\n", "badhelo": "^localhost$\n",
                            "tcp.smtp": f':allow,HELOCHECK="{mode}"\n'})
    s, v = envelope(eng, helo=helo, host="mail.client.example")
    if expect is None:
        assert v.accept, v
    else:
        assert not v.accept and v.reason == expect and v.reply.code == 550


def test_helocheck_dns_qregex(tmp_path):
    eng = engine(tmp_path, {"dialect": "qregex\n", "tcp.smtp": ':allow,HELOCHECK="M"\n'})
    s = eng.session(Client(ip="203.0.113.5"))
    s.helo("mx.nowhere.example")
    assert s.helo_dns_query() == ("MX", "mx.nowhere.example")
    s.set_helo_dns(DNS_FAIL)
    s.mail("a@b.example")
    assert s.rcpt("u@example.com").reply.code == 550
    plain = engine(tmp_path, {"dialect": "qregex\n", "tcp.smtp": ":allow\n"})
    s = plain.session(Client(ip="203.0.113.5"))
    s.helo("mx.nowhere.example")
    assert s.helo_dns_query() is None          # no HELOCHECK, no lookup


def test_helocheck_dns_a(tmp_path):
    eng = engine(tmp_path, {"badhelo": "ok.example!\n", "tcp.smtp": ':allow,HELOCHECK="A"\n'})
    s = eng.session(Client(ip="203.0.113.5"))
    s.helo("mx.nowhere.example")
    assert s.helo_dns_query() == ("A", "mx.nowhere.example")
    for status, code in ((DNS_FAIL, 550), (DNS_TEMP, 451), (DNS_OK, 250)):
        s.set_helo_dns(status)
        s.mail("a@b.example")
        assert s.rcpt("u@example.com").reply.code == code
    s.helo("OK.example")                       # name!: no DNS test
                                               # (docs/behaviour/control-files.md#acceptable-helo-names)
    assert s.helo_dns_query() is None


def test_mfdnscheck(tmp_path):
    eng = engine(tmp_path, {"badmailfrom": "?vip@nxdomain.example\n",
                            "tcp.smtp": ':allow,MFDNSCHECK=""\n127.0.0.1:allow,RELAYCLIENT="",MFDNSCHECK=""\n'})
    s = eng.session(Client(ip="203.0.113.5"))
    s.helo("x")
    s.mail("a@nxdomain.example")
    assert s.mail_dns_query() == "nxdomain.example"
    s.set_mail_dns(DNS_FAIL)
    v = s.rcpt("u@example.com")
    assert (v.reply.code, v.reply.enhanced, v.reason) == (553, "5.1.8", "mf_dns")
    s.mail("a@slow.example")
    s.set_mail_dns(DNS_TEMP)
    assert s.rcpt("u@example.com").reply.code == 451     # one 451, quirk
                                                         # docs/behaviour/differences.md#spamcontrol-bugs #3 fixed
    s.mail("vip@nxdomain.example")                      # ? bypass skips MFDNSCHECK
    assert s.mail_dns_query() is None
    relay = eng.session(Client(ip="127.0.0.1"))
    relay.mail("a@nxdomain.example")
    assert relay.mail_dns_query() is None                # relay clients skip it


def test_relaymailfrom_needs_the_setting(tmp_path):
    eng = engine(tmp_path, {"relaymailfrom": "@partner.example\n",
                            "tcp.smtp": '198.51.100.:allow,RELAYMAILFROM=""\n:allow\n'})
    _, v = envelope(eng, sender="x@partner.example", rcpt="u@far.example", ip="198.51.100.7")
    assert v.accept and v.reason == "relay_sender"
    _, v = envelope(eng, sender="x@partner.example", rcpt="u@far.example", ip="203.0.113.5")
    assert not v.accept and v.reason == "rcpthosts"      # forgeable: never global


def test_smtpauth_required(tmp_path):
    eng = engine(tmp_path, {"tcp.smtp": ':allow,SMTPAUTH="!"\n'})
    s = eng.session(Client(ip="203.0.113.5"))
    v = s.mail("a@b.example")
    assert (v.accept, v.reply.code) == (False, 530)
    s.auth_success("alice")
    assert s.mail("a@b.example").accept
    v = s.rcpt("u@far.example")                         # authenticated: relay
                                                        # (docs/behaviour/auth.md#after-success)
    assert v.accept and v.reason == "relay_auth"
    s.reset()
    assert s.authenticated == "alice"                    # survives RSET
                                                         # (docs/behaviour/auth.md#after-success)


def test_recipients450_and_notorious(tmp_path):
    eng = engine(tmp_path, {"recipients": "ok@example.com\n",
                            "tcp.smtp": ':allow,RECIPIENTS450="",TARPITCOUNT="1",TARPITDELAY="999"\n'})
    s = eng.session(Client(ip="203.0.113.5"))
    s.helo("x")
    s.mail("a@b.example")
    v = s.rcpt("nobody@example.com")
    assert (v.reply.code, v.reply.enhanced) == (450, "4.2.1")
    v = s.rcpt("ok@example.com")                         # failed >= TARPITCOUNT: smart rejection
    assert (v.reply.code, v.reason) == (452, "too_many_failed_rcpts")
    d = s.data()
    assert d.reply.code == 503 and d.close               # 999: notorious session


def test_maxrecipients_counts_accepted_only(tmp_path):
    eng = engine(tmp_path, {"badrcptto": "bad@example.com\n", "tcp.smtp": ':allow,MAXRECIPIENTS="1"\n'})
    s = eng.session(Client(ip="203.0.113.5"))
    s.mail("a@b.example")
    assert s.rcpt("bad@example.com").reason == "badrcptto"
    assert s.rcpt("good@example.com").accept              # quirk
                                                          # docs/behaviour/differences.md#spamcontrol-bugs #7 fixed
    assert s.rcpt("more@example.com").reply.code == 452


def test_disable_badmailfrom(tmp_path):
    eng = engine(tmp_path, {"badmailfrom": "@spam.example\n",
                            "tcp.smtp": '198.51.100.:allow,DISABLE_BADMAILFROM=""\n:allow\n'})
    assert envelope(eng, sender="x@spam.example", ip="198.51.100.1")[1].accept
    assert not envelope(eng, sender="x@spam.example", ip="203.0.113.5")[1].accept


def test_qregex_nobadhelo_and_norelay(tmp_path):
    eng = engine(tmp_path, {"dialect": "qregex\n", "badhelo": "^localhost$\n",
                            "badhelonorelay": "^bad\\.\n",
                            "tcp.smtp": '198.51.100.:allow,NOBADHELO=""\n127.0.0.1:allow,RELAYCLIENT=""\n:allow\n'})
    assert not envelope(eng, helo="localhost")[1].accept
    assert envelope(eng, helo="localhost", ip="198.51.100.1")[1].accept
    assert not envelope(eng, helo="bad.example")[1].accept
    assert envelope(eng, helo="bad.example", ip="127.0.0.1")[1].accept   # norelay file


def test_no_rcpthosts_refuses_unless_open_relay(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    b = bundle.from_compiled(compiler.compile_dir(str(d)))
    closed = PolicyEngine(b, PolicyOptions())
    assert not closed.rcpthosts_present
    assert envelope(closed, rcpt="u@anywhere.example")[1].reason == "rcpthosts"
    opened = PolicyEngine(b, PolicyOptions(open_relay=True))
    assert envelope(opened, rcpt="u@anywhere.example")[1].accept


def test_relayclient_suffix_and_defaults(tmp_path):
    eng = engine(tmp_path, {"tcp.smtp": '10.:allow,RELAYCLIENT="@fix"\n'}, defaults={"MAXRECIPIENTS": "5"})
    s, v = envelope(eng, ip="10.1.1.1", rcpt="u@far.example")
    assert v.recipient == "u@far.example@fix"            # docs/behaviour/tcp-smtp.md#settings
    assert s.max_recipients == 5                         # global default kept


def test_setting_verdicts_name_their_tcp_smtp_line(tmp_path):
    """A verdict a per-client setting caused names the tcp.smtp line that set it
    (docs/architecture.md#errors-and-logging: the deciding rule as file:line); a setting
    from the global defaults names no line."""
    eng = engine(tmp_path, {"tcp.smtp": '203.0.113.5:allow,HELOCHECK="=",MAXRECIPIENTS="1"\n'
                                        '203.0.113.6:allow,MFDNSCHECK=""\n'
                                        '203.0.113.7:allow,TARPITCOUNT="1",TARPITDELAY="0"\n'
                                        ':allow\n'},
                 defaults={"HELOCHECK": "!"})
    s, v = envelope(eng, helo="mx.sender.example", host="mail.client.example")
    assert (v.reason, v.rule) == ("helo_mismatch", "tcp.smtp:1")
    s, v = envelope(eng, helo=None, host="mail.client.example")
    assert (v.reason, v.rule) == ("helo_missing", "tcp.smtp:1")
    s, v = envelope(eng, helo="mail.client.example", host="mail.client.example")
    assert v.accept
    v = s.rcpt("u2@example.com")
    assert (v.reason, v.rule) == ("too_many_rcpts", "tcp.smtp:1")
    s = eng.session(Client(ip="203.0.113.6"))
    s.helo("x")
    s.mail("a@nxdomain.example")
    s.set_mail_dns(DNS_FAIL)
    v = s.rcpt("u@example.com")
    assert (v.reason, v.rule) == ("mf_dns", "tcp.smtp:2")
    s, v = envelope(eng, helo=None, ip="198.51.100.1")      # HELOCHECK from the defaults
    assert (v.reason, v.rule) == ("helo_missing", None)


def test_tarpit_refusal_names_its_line(tmp_path):
    eng = engine(tmp_path, {"recipients": "u@example.com\n",
                            "tcp.smtp": '203.0.113.7:allow,TARPITCOUNT="1",TARPITDELAY="0"\n'})
    s, v = envelope(eng, rcpt="nobody@example.com", ip="203.0.113.7")
    # no line names a missing mailbox: the file that does not list it decides
    assert v.reason == "no_mailbox" and v.rule == "recipients"
    v = s.rcpt("other@example.com")
    assert (v.reason, v.rule) == ("too_many_failed_rcpts", "tcp.smtp:1")


def test_morercpthosts_merged_with_rcpthosts(tmp_path):
    """docs/behaviour/control-files.md#rcpthosts: morercpthosts extends rcpthosts (qmail:
    its cdb); either file alone is enough to turn the check on."""
    eng = engine(tmp_path, {"rcpthosts": "example.com\n", "morercpthosts": "example.net\n.sub.example.org\n"})
    for rcpt, ok in (("u@example.com", True), ("u@example.net", True), ("u@a.sub.example.org", True),
                     ("u@sub.example.org", False), ("u@elsewhere.example", False)):
        s, v = envelope(eng, rcpt=rcpt)
        assert v.accept == ok, (rcpt, v)
        if not ok:
            assert v.reason == "rcpthosts"
    d = tmp_path / "only"
    d.mkdir()
    (d / "morercpthosts").write_text("example.net\n")
    only = PolicyEngine(bundle.from_compiled(compiler.compile_dir(str(d))), PolicyOptions())
    s = only.session(Client(ip="203.0.113.5"))
    s.helo("x")
    s.mail("a@b.example")
    assert s.rcpt("u@example.net").accept
    assert s.rcpt("u@example.com").reason == "rcpthosts"


@pytest.mark.parametrize("text", ["", "# no domains yet\n"])
def test_an_empty_morercpthosts_alone_is_a_list(tmp_path, text):
    """docs/behaviour/control-files.md#rcpthosts: an existing list, even empty, turns
    the check on: no domain is accepted for non-relay clients, a bare `postmaster` still is
    (README). It used to count as "no list": an open relay with
    --open-relay, and postmaster refused without."""
    d = tmp_path / "emptymore"
    d.mkdir()
    (d / "morercpthosts").write_text(text)
    for open_relay in (False, True):
        eng = PolicyEngine(bundle.from_compiled(compiler.compile_dir(str(d))),
                           PolicyOptions(open_relay=open_relay))
        assert eng.rcpthosts_present
        s = eng.session(Client(ip="203.0.113.5"))
        s.helo("x")
        s.mail("a@b.example")
        assert s.rcpt("u@victim.example").reason == "rcpthosts"
        assert s.rcpt("postmaster").accept


def test_qregex_relaymailfrom_is_a_spamcontrol_list(tmp_path):
    """rules/README: qregex turns only the bad* and *norelay files into regex
    lists; relaymailfrom keeps last-match-wins with `!` exceptions and every
    entry kind. In qregex mode it used to be asked first_fire(), which sees
    regex lines only: a `!`-excluded sender could relay, @domain lines never
    matched."""
    eng = engine(tmp_path, {"dialect": "qregex\n",
                            "relaymailfrom": "/@partner\\.example$/\n!evil@partner.example\n@trusted.example\n",
                            "tcp.smtp": ':allow,RELAYMAILFROM=""\n'})
    for sender, relayed in (("good@partner.example", True), ("evil@partner.example", False),
                            ("x@trusted.example", True), ("x@other.example", False)):
        s = eng.session(Client(ip="203.0.113.5"))
        s.helo("mx.example.org")
        s.mail(sender)
        v = s.rcpt("u@far.example")
        assert v.accept == relayed, (sender, v)
        assert (v.reason == "relay_sender") if relayed else (v.reason == "rcpthosts")


def test_qregex_badhelo_binds_relay_clients(tmp_path):
    """qregex: `badhelo` has no split horizon (only NOBADHELO turns it off);
    `badhelonorelay` spares relay clients (docs/behaviour/control-files.md#qregex-dialect)."""
    eng = engine(tmp_path, {"dialect": "qregex\n", "badhelo": "^bad\\.example$\n",
                            "badhelonorelay": "^local$\n",
                            "tcp.smtp": '127.0.0.2:allow,RELAYCLIENT=""\n'
                                        '127.0.0.3:allow,RELAYCLIENT="",NOBADHELO=""\n:allow\n'})
    for ip, helo, expect in (("127.0.0.2", "bad.example", "bad_helo"),
                             ("203.0.113.5", "bad.example", "bad_helo"),
                             ("127.0.0.3", "bad.example", None),
                             ("127.0.0.2", "local", None),
                             ("203.0.113.5", "local", "bad_helo_norelay")):
        s, v = envelope(eng, helo=helo, ip=ip, rcpt="u@example.com")
        if expect is None:
            assert v.accept, (ip, helo, v)
        else:
            assert not v.accept and v.reason == expect and v.reply.code == 550, (ip, helo, v)
            assert v.rule.startswith("badhelo")
    s = eng.session(Client(ip="203.0.113.5"))        # authenticated after EHLO: norelay no longer applies
    s.helo("local")
    s.auth_success("user")
    s.mail("a@b.example")
    assert s.rcpt("x@far.example").accept


def test_recipients_bang_star_spares_only_unnamed_domains(tmp_path):
    """rules/README.md: `!*` = recipients at domains NOT named in the file are
    not checked; a domain the file names stays fail-closed
    (docs/behaviour/control-files.md#recipients)."""
    eng = engine(tmp_path, {"rcpthosts": "example.com\nexample.net\nother.example\n",
                            "recipients": "user@example.com\nlist-@example.net\n!*\n"})
    for rcpt, ok in (("user@example.com", True), ("nosuch@example.com", False),
                     ("list-x@example.net", True), ("nosuch@example.net", False),
                     ("anyone@other.example", True)):
        s, v = envelope(eng, rcpt=rcpt)
        assert v.accept == ok, (rcpt, v)
        if not ok:
            assert v.reason == "no_mailbox"


@pytest.mark.parametrize("value", ["\u00b2", "1\u00b3", "\u00b9\u00b2"])
def test_latin1_superscript_digits_are_not_numbers(tmp_path, value):
    """str.isdigit() takes "\\xb2"; int() does not. The compiler refuses such
    a setting (a typo must not switch a limit off); the policy still reads one
    qmail-style (leading ASCII digits, else the default), never a crash."""
    from mailfilter.policy.engine import _int_setting
    assert _int_setting(value) == (1 if value.startswith("1") else 0)
    for name in ("DATABYTES", "MAXRECIPIENTS", "TARPITCOUNT", "TARPITDELAY"):
        d = tmp_path / name
        d.mkdir()
        (d / "rcpthosts").write_text("example.com\n")
        (d / "tcp.smtp").write_bytes(f':allow,{name}="{value}"\n'.encode("latin-1"))
        problems = [str(x) for x in compiler.compile_dir(str(d)).diagnostics]
        assert len(problems) == 1 and f"{name}={value!r} is not a decimal number" in problems[0], problems


def test_latin1_superscript_in_numeric_file_is_a_diagnostic(tmp_path):
    d = tmp_path / "rules"
    d.mkdir()
    (d / "rcpthosts").write_text("example.com\n")
    (d / "databytes").write_bytes(b"\xb2\n")
    (d / "tcp.smtp").write_bytes(b"1.\xb2.:deny\n:allow\n")
    compiled = compiler.compile_dir(str(d))
    problems = sorted(str(x) for x in compiled.diagnostics)
    assert len(problems) == 2, problems
    assert problems[0].endswith("databytes:1: not an unsigned decimal number: '\u00b2': rule skipped")
    assert "tcp.smtp:1:" in problems[1] and problems[1].endswith("rule skipped")


def test_relay_and_auth_verdicts_name_their_lines(tmp_path):
    """README: every decision names its rule. A relaymailfrom relay names the
    relaymailfrom line; MAIL refused for SMTPAUTH="!" names the tcp.smtp line
    that set it (None when it is the server's global --auth); an accepted
    RCPT names the rcpthosts or recipients line (both used to say nothing)."""
    eng = engine(tmp_path, {"relaymailfrom": "# partners\nboss@partner.example\n",
                            "recipients": "u@example.com\n@example.net\n",
                            "rcpthosts": "example.com\nexample.net\n",
                            "tcp.smtp": '203.0.113.7:allow,RELAYMAILFROM=""\n'
                                        '203.0.113.8:allow,SMTPAUTH="!"\n:allow\n'})
    s, v = envelope(eng, sender="boss@partner.example", rcpt="x@far.example", ip="203.0.113.7")
    assert (v.accept, v.reason, v.rule) == (True, "relay_sender", "relaymailfrom:2")
    s = eng.session(Client(ip="203.0.113.8"))
    v = s.mail("a@sender.example")
    assert (v.accept, v.reason, v.rule) == (False, "auth_required", "tcp.smtp:2")
    for rcpt, rule in (("u@example.com", "recipients:1"), ("any@example.net", "recipients:2")):
        s, v = envelope(eng, rcpt=rcpt)
        assert (v.accept, v.reason, v.rule) == (True, "ok", rule)
    glob = engine(tmp_path, {"tcp.smtp": ":allow\n"}, defaults={"SMTPAUTH": "!"})
    v = glob.session(Client(ip="203.0.113.8")).mail("a@sender.example")
    assert (v.accept, v.reason, v.rule) == (False, "auth_required", None)


def test_unqualified_postmaster_is_never_refused_by_recipients(tmp_path):
    """RFC 5321 §4.5.1: every server takes <postmaster> (no domain); the
    recipients lookup as postmaster@localhost used to refuse it."""
    eng = engine(tmp_path, {"recipients": "u@example.com\n"})
    for rcpt in ("postmaster", "PostMaster"):
        s, v = envelope(eng, rcpt=rcpt)
        assert v.accept, (rcpt, v)
    s, v = envelope(eng, rcpt="someone")          # other local names are still looked up
    assert (v.accept, v.reason) == (False, "no_mailbox")


def test_unchecked_recipient_names_the_exempting_line(tmp_path):
    """A recipient let in because `recipients` does not check its domain
    (`!domain`, or `!*` for domains it does not name) names that line."""
    eng = engine(tmp_path, {"recipients": "u@example.com\n!example.org\n!*\n",
                            "rcpthosts": "example.com\nexample.org\nexample.net\n"})
    for rcpt, rule in (("x@example.org", "recipients:2"), ("y@example.net", "recipients:3"),
                       ("u@example.com", "recipients:1")):
        s, v = envelope(eng, rcpt=rcpt)
        assert (v.accept, v.rule) == (True, rule), rcpt
    s, v = envelope(eng, rcpt="nobody@example.com")        # a named domain is still checked
    assert (v.accept, v.reason, v.rule) == (False, "no_mailbox", "recipients")


def test_client_profiles_cache_is_bounded(tmp_path, monkeypatch):
    """One ClientProfile (~1 KB) per tcp.smtp rule a client matched: clients
    fill it rule by rule, so a 1M-line tcp.smtp kept ~1 GB. The cache starts
    over at its cap and the answers stay right."""
    from mailfilter.policy import engine as policy_mod

    monkeypatch.setattr(policy_mod, "_PROFILES_MAX", 16)
    lines = "".join(f'10.0.{i // 250}.{i % 250}:allow,MAXRECIPIENTS="{i + 1}"\n' for i in range(100))
    eng = engine(tmp_path, {"tcp.smtp": lines + ":allow\n"})
    for i in range(100):
        s = eng.session(Client(ip=f"10.0.{i // 250}.{i % 250}"))
        assert s.profile.max_recipients == i + 1 and s.profile.rule == f"tcp.smtp:{i + 1}"
        assert len(eng._profiles) <= 16
