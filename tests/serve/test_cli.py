"""`mailfilter compile` and `mailfilter check` end to end, as real processes
(issue 2, CLI). Exit codes: compile 0/1/2, check 0 accepted / 1 rejected / 2 error."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))
GOLDEN = os.path.join(ROOT, "tests", "rules", "golden")


def mf(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mailfilter", *args], capture_output=True,
                          text=True, cwd=cwd or ROOT, timeout=60)


def test_compile_summary_and_bundle(tmp_path):
    out = tmp_path / "r.mfb"
    r = mf("compile", os.path.join(ROOT, "rules"), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.exists() and out.stat().st_size > 0
    assert "dialect spamcontrol" in r.stdout
    for kind in ("exact", "wildmat", "regex", "cidr", "signature"):
        assert f"  {kind}" in r.stdout
    assert r.stderr == ""          # not a terminal: no progress bar


def test_compile_diagnostics_exit_1(tmp_path):
    r = mf("compile", os.path.join(GOLDEN, "diagnostics", "rules"), "-o", str(tmp_path / "d.mfb"))
    assert r.returncode == 1
    assert "badmailfrom:2: unclosed '[' in wildmat: rule skipped" in r.stderr
    assert "tcp.smtp:3: expected KEY:allow or KEY:deny: rule skipped" in r.stderr
    assert "line(s) skipped" in r.stderr


def test_compile_missing_dir_exit_2(tmp_path):
    r = mf("compile", str(tmp_path / "nope"), "-o", str(tmp_path / "x.mfb"))
    assert r.returncode == 2
    assert "rules directory not found" in r.stderr


def test_check_reject_names_rule(tmp_path):
    r = mf("check", "--rules", os.path.join(ROOT, "rules"), "--ip", "203.0.113.9",
           "--helo", "mx.other.example", "--from", "someone@spam.example.org",
           "--rcpt", "info@example.com")
    assert r.returncode == 1
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("RCPT <info@example.com>: reject")
    assert "553 5.7.1 sorry, your envelope sender is in my badmailfrom list" in last
    assert "rule=badmailfrom:" in last


def test_check_accept_json_from_bundle(tmp_path):
    bundle = tmp_path / "r.mfb"
    assert mf("compile", os.path.join(ROOT, "rules"), "-o", str(bundle)).returncode == 0
    r = mf("check", "--bundle", str(bundle), "--ip", "203.0.113.9", "--helo", "mx.other.example",
           "--from", "a@sender.example", "--rcpt", "info@example.com", "--rcpt", "x@example.net",
           "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["accepted"] is True
    assert [s["stage"] for s in doc["stages"]] == ["CONNECT", "HELO", "MAIL", "RCPT", "RCPT"]
    assert doc["stages"][0]["rule"].startswith("tcp.smtp:")


def test_check_relay_client_and_rcpthosts():
    rules = os.path.join(ROOT, "rules")
    ok = mf("check", "--rules", rules, "--ip", "127.0.0.1", "--from", "a@b.example",
            "--rcpt", "x@far.example")
    assert ok.returncode == 0 and "reason=relay_client" in ok.stdout
    no = mf("check", "--rules", rules, "--ip", "203.0.113.9", "--helo", "mx.other.example",
            "--from", "a@b.example", "--rcpt", "x@far.example")
    assert no.returncode == 1
    assert "isn't in my list of allowed rcpthosts" in no.stdout


def _rules(tmp_path, files: dict) -> str:
    d = tmp_path / "r"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text)
    return str(d)


def test_check_exit_0_when_every_recipient_is_accepted(tmp_path):
    """README: exit 0 if every recipient would be accepted. A relay client
    with a bad HELO passes (HELO pending-reject, RCPT accept); it used to exit
    1 because a stage was not "accept". Without recipients a pending
    rejection still exits 1 (every RCPT would be refused)."""
    rules = _rules(tmp_path, {"badhelo": "localhost\n", "rcpthosts": "example.com\n",
                              "tcp.smtp": '127.0.0.1:allow,RELAYCLIENT="",HELOCHECK=""\n'
                                          ':allow,HELOCHECK=""\n'})
    relay = mf("check", "--rules", rules, "--ip", "127.0.0.1", "--helo", "localhost",
               "--from", "a@b.c", "--rcpt", "x@example.com", "--json")
    doc = json.loads(relay.stdout)
    assert [s["verdict"] for s in doc["stages"]] == ["accept", "pending-reject", "accept", "accept"]
    assert relay.returncode == 0 and doc["accepted"] is True
    other = mf("check", "--rules", rules, "--ip", "203.0.113.9", "--helo", "localhost",
               "--from", "a@b.c", "--rcpt", "x@example.com")
    assert other.returncode == 1
    no_rcpt = mf("check", "--rules", rules, "--ip", "203.0.113.9", "--helo", "localhost")
    assert no_rcpt.returncode == 1


def test_check_judges_address_literals_without_dns(tmp_path):
    """The server judges [literals] without a lookup; so does check, --dns or
    not (it used to call them "not performed" and let them pass)."""
    rules = _rules(tmp_path, {"rcpthosts": "example.com\n",
                              "tcp.smtp": ':allow,HELOCHECK="A",MFDNSCHECK=""\n'})
    bad = mf("check", "--rules", rules, "--ip", "198.51.100.7", "--helo", "[300.1.1.1]",
             "--from", "a@[192.0.2.1]", "--rcpt", "x@example.com")
    assert bad.returncode == 1, bad.stdout
    assert "HELOCHECK DNS A [300.1.1.1]: fail (address literal, no lookup)" in bad.stdout
    assert "MFDNSCHECK MX [192.0.2.1]: ok (address literal, no lookup)" in bad.stdout
    assert "550 5.7.1 sorry, invalid HELO/EHLO greeting" in bad.stdout.splitlines()[-1]
    good = mf("check", "--rules", rules, "--ip", "198.51.100.7", "--helo", "[192.0.2.7]",
              "--from", "a@[IPv6:2001:db8::1]", "--rcpt", "x@example.com")
    assert good.returncode == 0, good.stdout


def test_check_errors_exit_2(tmp_path):
    bad = tmp_path / "bad.mfb"
    bad.write_bytes(b"garbage" * 30)
    r = mf("check", "--bundle", str(bad), "--rcpt", "a@b")
    assert r.returncode == 2 and "not a mailfilter rule bundle" in r.stderr
    r = mf("check", "--rules", os.path.join(GOLDEN, "diagnostics", "rules"),
           "--from", "good@example.org", "--rcpt", "a@example.com")
    assert r.returncode == 2
    assert "rule skipped" in r.stderr


@pytest.mark.parametrize("ip", ["not-an-ip", "1.2.3", "203.0.113.300", ""])
def test_check_bad_ip_exit_2(ip):
    r = mf("check", "--rules", os.path.join(ROOT, "rules"), "--ip", ip, "--rcpt", "info@example.com")
    assert r.returncode == 2
    assert f"not an IP address: {ip!r}" in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("ip", ["2001:db8::25", "::ffff:203.0.113.9"])
def test_check_ipv6_ip_accepted(ip):
    r = mf("check", "--rules", os.path.join(ROOT, "rules"), "--ip", ip, "--rcpt", "info@example.com")
    assert r.returncode in (0, 1), r.stderr
    assert f"[{ip}]" in r.stdout


@pytest.mark.parametrize("dialect_dir", ["qregex"])
def test_check_qregex_dir(dialect_dir):
    r = mf("check", "--rules", os.path.join(GOLDEN, dialect_dir, "rules"), "--ip", "203.0.113.5",
           "--helo", "mx.ok.example", "--from", "x@exampleXcom.evil", "--rcpt", "u@example.com")
    assert r.returncode == 1
    assert "rule=badmailfrom:3" in r.stdout


def test_compile_progress_bar_on_a_terminal(tmp_path):
    # A progress bar appears only when stderr is a terminal (issue 2, CLI).
    import pty
    rules = tmp_path / "big"
    rules.mkdir()
    (rules / "rcpthosts").write_text("example.com\n")
    (rules / "badmailfrom").write_text("".join(f"user{i}@spam{i % 97}.example\n" for i in range(60_000)))
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "mailfilter", "compile", str(rules),
                                  "-o", str(tmp_path / "big.mfb")])
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    out = b"".join(chunks).decode()
    assert os.waitstatus_to_exitcode(status) == 0
    assert "badmailfrom" in out and "[##############################] 60000/60000" in out
    assert "exact        60000" in out


def test_check_dns_checks_use_the_servers_resolver(tmp_path):
    """`check --dns HOST:PORT` makes the HELOCHECK=A and MFDNSCHECK lookups
    the server makes (docs/behaviour/tcp-smtp.md#settings) against a real DNS responder."""
    from tests.support.dns_responder import DnsResponder

    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rcpthosts").write_text("example.com\n")
    (rules / "tcp.smtp").write_text(':allow,HELOCHECK="A",MFDNSCHECK=""\n')
    table = {("mx.ok.test", "A"): ["192.0.2.1"], ("ok.test", "MX"): ["10 mx.ok.test."],
             "nx.test": "NXDOMAIN", "fail.test": "SERVFAIL"}
    with DnsResponder(table) as dns:
        base = ["check", "--rules", str(rules), "--ip", "203.0.113.5", "--dns", f"127.0.0.1:{dns.port}"]
        ok = mf(*base, "--helo", "mx.ok.test", "--from", "a@ok.test", "--rcpt", "u@example.com")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "HELOCHECK DNS A mx.ok.test: ok" in ok.stdout and "MFDNSCHECK MX ok.test: ok" in ok.stdout
        nx = mf(*base, "--helo", "mx.ok.test", "--from", "a@nx.test", "--rcpt", "u@example.com")
        assert nx.returncode == 1
        assert "553 5.1.8 sorry, your envelope sender must exist" in nx.stdout
        temp = mf(*base, "--helo", "fail.test", "--from", "a@ok.test", "--rcpt", "u@example.com")
        assert temp.returncode == 1 and "tempfail \"451 4.4.3 DNS temporary failure\"" in temp.stdout
        # a listed sender keeps its pending-reject note beside the DNS answer
        (rules / "badmailfrom").write_text("@ok.test\n")
        both = mf(*base, "--helo", "mx.ok.test", "--from", "a@ok.test", "--rcpt", "u@example.com")
        mail_line = next(l for l in both.stdout.splitlines() if l.startswith("MAIL"))
        assert "MAIL gets 250; every RCPT gets 553; MFDNSCHECK MX ok.test: ok" in mail_line
        (rules / "badmailfrom").unlink()
    # a bad resolver address is one clear line, exit 2 (dnscheck.parse_nameserver)
    bad = mf("check", "--rules", str(rules), "--dns", "::1]", "--rcpt", "u@example.com")
    assert bad.returncode == 2 and bad.stderr.startswith("mailfilter check: --dns '::1]': ")
    # without --dns the lookups are named, not guessed
    plain = mf("check", "--rules", str(rules), "--ip", "203.0.113.5", "--helo", "mx.ok.test",
               "--from", "a@ok.test", "--rcpt", "u@example.com")
    assert "not performed (use --dns)" in plain.stdout


def test_check_refuses_what_the_server_parser_refuses():
    """`check` puts the server's command parser before the policy: an empty
    recipient (`RCPT TO:<>`) is 555 as in the server
    (docs/behaviour/differences.md#smtp-commands RFC 5321 strictness), not a mailbox lookup; the
    next recipient is still checked."""
    r = mf("check", "--rules", os.path.join(ROOT, "rules"), "--ip", "203.0.113.9",
           "--helo", "mx.other.example", "--from", "a@sender.example",
           "--rcpt", "", "--rcpt", "info@example.com", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    stages = json.loads(r.stdout)["stages"]
    assert [(s["stage"], s["argument"], s["verdict"]) for s in stages[-2:]] == [
        ("RCPT", "<>", "reject"), ("RCPT", "<info@example.com>", "accept")]
    assert stages[-2]["reply"] == "555 5.5.4 syntax error" and stages[-2]["reason"] == "syntax"
    # an 8-bit address: the server's --no-smtputf8 refuses it at MAIL; by
    # default MAIL announces SMTPUTF8 (RFC 6531) and the sender is taken
    r = mf("check", "--rules", os.path.join(ROOT, "rules"), "--ip", "203.0.113.9",
           "--from", "caf\u00e9@sender.example", "--rcpt", "info@example.com", "--no-smtputf8")
    assert r.returncode == 1
    assert "MAIL <caf\u00e9@sender.example>: reject \"553 5.6.7" in r.stdout
    r = mf("check", "--rules", os.path.join(ROOT, "rules"), "--ip", "203.0.113.9",
           "--from", "caf\u00e9@sender.example", "--rcpt", "info@example.com")
    assert "MAIL <caf\u00e9@sender.example>: accept \"250 2.1.0 ok\"" in r.stdout, r.stdout


def test_check_takes_the_servers_auth_hostname_and_config(tmp_path):
    """`check` answers as `serve` with the same settings: --auth "!" makes
    MAIL 530 (and every RCPT after it 503, as the server answers), --hostname
    is in the 220; --config reads serve's TOML and the flags win over it."""
    rules = os.path.join(ROOT, "rules")
    args = ("check", "--rules", rules, "--ip", "203.0.113.9", "--helo", "mx.other.example",
            "--from", "a@sender.example", "--rcpt", "info@example.com")
    r = mf(*args, "--auth", "!", "--hostname", "other.example", "--json")
    assert r.returncode == 1, r.stdout + r.stderr
    stages = json.loads(r.stdout)["stages"]
    assert [(s["stage"], s["reply"]) for s in stages] == [
        ("CONNECT", "220 other.example ESMTP"), ("HELO", "250 other.example"),
        ("MAIL", "530 5.7.0 authentication required"), ("RCPT", "503 5.5.1 MAIL first")]
    conf = tmp_path / "serve.toml"
    conf.write_text('auth = "!"\nhostname = "cfg.example"\n')
    r = mf(*args, "--config", str(conf))
    assert r.returncode == 1 and '"220 cfg.example ESMTP"' in r.stdout
    assert '"530 5.7.0 authentication required"' in r.stdout
    r = mf(*args, "--config", str(conf), "--auth", "", "--hostname", "flag.example")
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"220 flag.example ESMTP"' in r.stdout
    conf.write_text('auth = 1\n')
    r = mf(*args, "--config", str(conf))
    assert r.returncode == 2 and "auth" in r.stderr


def test_check_helo_goes_through_the_servers_parser(tmp_path):
    """The server strips a HELO name's padding and answers an empty one 501
    (the session goes on without a HELO); check did neither, so a padded
    listed name passed and an empty one was tested against badhelo."""
    rules = _rules(tmp_path, {"badhelo": "example.com\n", "rcpthosts": "example.com\n",
                              "tcp.smtp": ':allow,HELOCHECK="."\n'})
    padded = mf("check", "--rules", rules, "--helo", "example.com  ", "--from", "a@b.example",
                "--rcpt", "u@example.com", "--json")
    stages = json.loads(padded.stdout)["stages"]
    assert padded.returncode == 1
    assert (stages[1]["argument"], stages[1]["verdict"]) == ("example.com", "pending-reject")
    assert stages[-1]["reply"] == "550 5.7.1 sorry, invalid HELO/EHLO greeting"
    empty = mf("check", "--rules", rules, "--helo", "", "--from", "a@b.example",
               "--rcpt", "u@example.com", "--json")
    stages = json.loads(empty.stdout)["stages"]
    assert stages[1]["reply"] == "501 5.5.4 syntax error, HELO/EHLO needs a domain"
    assert stages[-1]["reason"] == "helo_missing"


@pytest.mark.parametrize("flag,value", [("--helo", "a\r\nMAIL FROM:<x@y.example>"),
                                        ("--from", "a@b.example\nRSET"), ("--rcpt", "x@example.com\rDATA")])
def test_check_refuses_line_ends_in_arguments(flag, value):
    """Each argument becomes one command line for the server's parser: a CR or
    LF in it made two commands, and check reported the smuggled one's answer
    (a NUL cannot reach argv at all)."""
    args = {"--helo": "mx.other.example", "--from": "a@sender.example", "--rcpt": "info@example.com"}
    args[flag] = value
    r = mf("check", "--rules", os.path.join(ROOT, "rules"),
           *[x for k, v in args.items() for x in (k, v)])
    assert r.returncode == 2 and "CR and LF cannot be part of an SMTP command" in r.stderr
    assert r.stdout == ""


def test_version_is_the_package_version():
    """`mailfilter --version`: one line, `mailfilter X.Y.Z`, exit 0; the
    version is the package's (and the installed distribution's, if any)."""
    import importlib.metadata
    import re

    import mailfilter

    r = mf("--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"mailfilter {mailfilter.__version__}\n", "")
    assert re.fullmatch(r"\d+\.\d+\.\d+", mailfilter.__version__)
    try:
        installed = importlib.metadata.version("mailfilter")
    except importlib.metadata.PackageNotFoundError:     # run from a checkout, not installed
        installed = None
    assert installed in (None, mailfilter.__version__)


@pytest.mark.parametrize("cmd,needles", [
    ("compile", ["(default: rules)", "(default: var/rules.mfb)", "exit codes: 0 compiled", "1 compiled but"]),
    ("check", ["(default: 127.0.0.1)", "exit codes: 0 every recipient accepted", "1 something refused"]),
    ("serve", ["(default: 127.0.0.1:2525)", "exit codes: 0 stopped cleanly", "2 could not start",
               "relative paths"]),
    ("run", ["exit codes: 0 stopped cleanly"]),
    ("policyd", ["(default: 127.0.0.1:10040)", "exit codes: 0 stopped", "2 could not start"]),
    ("passwd", ["(default 14)", "exit codes: 0 ok, 1 refused"]),
])
def test_every_subcommand_help_names_defaults_and_exit_codes(cmd, needles):
    out = subprocess.run([sys.executable, "-m", "mailfilter", cmd, "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    flat = " ".join(out.stdout.split())
    for needle in needles:
        assert needle in flat, (needle, out.stdout)
