"""mailfilter/rules/controlfiles.py: qmail control-file reading rules
(docs/behaviour/control-files.md#reading-control-files) and the tcprules syntax of tcp.smtp
(docs/behaviour/tcp-smtp.md#syntax). No _core needed."""
import ipaddress

import pytest

from mailfilter.rules import controlfiles as cf


def write(tmp_path, name, data: bytes):
    (tmp_path / name).write_bytes(data)


def test_list_reading_rules(tmp_path):
    # docs/behaviour/control-files.md#reading-control-files: trailing whitespace stripped, leading
    # kept, '#' and blank lines skipped, last line without newline accepted, line
    # numbers are 1-based.
    write(tmp_path, "badmailfrom", b"# comment\n\na@b \t\r\n  lead@x\n#x\nlast@y")
    src = cf.read_rules_dir(str(tmp_path))
    lines = src.lists["badmailfrom"]
    assert [(l.line, l.text) for l in lines] == [(3, "a@b"), (4, "  lead@x"), (6, "last@y")]
    assert lines[0].where == "badmailfrom:3"


def test_utf8_bom_is_dropped(tmp_path):
    """An editor's UTF-8 BOM must not turn the first entry into one that never matches."""
    bom = b"\xef\xbb\xbf"
    write(tmp_path, "rcpthosts", bom + b"example.com\nexample.net\n")
    write(tmp_path, "badmailfrom", bom + b"spam@example.org\n")
    write(tmp_path, "badhelo", bom + b"# comment first\nlocalhost\n")
    write(tmp_path, "me", bom + b"mx.example.com\n")
    write(tmp_path, "databytes", bom + b"1000\n")
    write(tmp_path, "tcp.smtp", bom + b"127.0.0.1:allow\n")
    src = cf.read_rules_dir(str(tmp_path))
    assert src.lists["rcpthosts"][0].text == "example.com"
    assert src.lists["badmailfrom"][0].text == "spam@example.org"
    assert [l.text for l in src.lists["badhelo"]] == ["localhost"]
    assert src.scalars["me"] == "mx.example.com"
    assert src.integers["databytes"] == 1000
    assert src.diagnostics == [] and len(src.tcp_rules) == 1
    from mailfilter.rules import bundle
    from mailfilter.rules import compiler
    from mailfilter.rules.format import MODE_ADDRESS, MODE_HOST
    b = bundle.from_compiled(compiler.compile_dir(str(tmp_path)))
    assert b.lists["rcpthosts"].last_match(b"example.com", MODE_HOST) >= 0
    assert b.lists["badmailfrom"].last_match(b"spam@example.org", MODE_ADDRESS) >= 0


def test_missing_files_switch_features_off(tmp_path):
    src = cf.read_rules_dir(str(tmp_path))
    assert src.lists == {} and src.tcp_rules == [] and src.dialect == "spamcontrol"


def test_eight_bit_bytes_survive(tmp_path):
    write(tmp_path, "badrcptto", b"caf\xe9@example.com\n")
    src = cf.read_rules_dir(str(tmp_path))
    assert src.lists["badrcptto"][0].text.encode("latin-1") == b"caf\xe9@example.com"


def test_first_line_and_integer_files(tmp_path):
    write(tmp_path, "me", b"mx.example.com  \nignored\n")
    write(tmp_path, "databytes", b"1000abc\n")
    write(tmp_path, "timeoutsmtpd", b"x12\n")
    src = cf.read_rules_dir(str(tmp_path))
    assert src.scalars["me"] == "mx.example.com"
    assert src.integers["databytes"] == 1000          # leading digits
    assert "timeoutsmtpd" not in src.integers         # docs/behaviour/control-files.md#reading-control-files: treated as absent
    assert [str(d).rsplit("/", 1)[-1] for d in src.diagnostics] == [
        "timeoutsmtpd:1: not an unsigned decimal number: 'x12': rule skipped"]


def test_unknown_dialect_is_a_diagnostic(tmp_path):
    write(tmp_path, "dialect", b"perl\n")
    src = cf.read_rules_dir(str(tmp_path))
    assert src.dialect == "spamcontrol"
    assert "unknown dialect 'perl'" in str(src.diagnostics[0])


def rule(text):
    return cf.parse_tcp_rule(cf.Line("tcp.smtp", 1, text))


@pytest.mark.parametrize("text,net", [
    ("1.2.3.4:allow", "1.2.3.4/32"),
    ("10.:deny", "10.0.0.0/8"),
    ("192.168.1.:allow", "192.168.1.0/24"),
    ("10.0.0.0/8:allow", "10.0.0.0/8"),
    ("2001:db8::/32:allow", "2001:db8::/32"),
    ("::1:allow", "::1/128"),
    ("2001:db8::ad:allow", "2001:db8::ad/128"),   # ':ad' is not an action
])
def test_tcp_rule_networks(text, net):
    r = rule(text)
    assert r.kind == "cidr" and r.networks == (ipaddress.ip_network(net),)


def test_tcp_rule_range_and_env():
    r = rule('192.0.2.37-53:allow,RELAYCLIENT="",HELOCHECK=".",X_Y=\'a,b\',DATABYTES=100')
    assert r.allow
    assert [str(n) for n in r.networks] == ["192.0.2.37/32", "192.0.2.38/31", "192.0.2.40/29",
                                           "192.0.2.48/30", "192.0.2.52/31"]
    assert r.env == (("RELAYCLIENT", ""), ("HELOCHECK", "."), ("X_Y", "a,b"), ("DATABYTES", "100"))


def test_tcp_rule_host_and_default_keys():
    assert rule("=mx.Example.org:allow").kind == "host"
    assert rule("=mx.Example.org:allow").host == "mx.example.org"
    assert rule("=.example.org:deny").kind == "hostsuffix"
    assert rule("=:allow").kind == "anyhost"
    d = rule(":allow,HELOCHECK=\"\"")
    assert d.kind == "default" and d.env == (("HELOCHECK", ""),)


@pytest.mark.parametrize("text,problem", [
    ("1.2.3.4:permit", "expected KEY:allow or KEY:deny"),
    ("1.2.3.4", "expected KEY:allow or KEY:deny"),
    ("300.1.1.1:deny", "bad address or network '300.1.1.1'"),
    ("10.0.0.0/33:allow", "bad address or network '10.0.0.0/33'"),
    ("1.2.3.9-4:allow", "empty address range"),
    ('1.2.3.4:allow,X="open', "unterminated quote"),
    ("1.2.3.4:allow,=1", "bad variable name"),
    ("user@1.2.3.4:allow", "TCPREMOTEINFO"),
])
def test_tcp_rule_errors(text, problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(").replace(".", r"\.")):
        rule(text)


def test_tcp_rule_errors_name_file_and_line(tmp_path):
    write(tmp_path, "tcp.smtp", b"1.2.3.4:allow\n\n1.2.3.4:permit\n")
    src = cf.read_rules_dir(str(tmp_path))
    assert len(src.tcp_rules) == 1
    assert str(src.diagnostics[0]) == f"{tmp_path}/tcp.smtp:3: expected KEY:allow or KEY:deny: rule skipped"


@pytest.mark.parametrize("key,meant", [
    ("1.2.3.4/8", "1.0.0.0/8"),
    ("10.1.2.3/31", "10.1.2.2/31"),
    ("2001:db8::1/32", "2001:db8::/32"),
    ("::ffff:10.1.2.3/104", "::ffff:a00:0/104"),
])
def test_cidr_with_host_bits_is_refused_not_widened(tmp_path, key, meant):
    """docs/behaviour/tcp-smtp.md#syntax: `1.2.3.4/8` was silently read as
    1.0.0.0/8 (relaying for a /8 where one host was meant); Postfix's cidr
    tables refuse it, and so do we, naming file:line and the network meant."""
    write(tmp_path, "tcp.smtp", f'10.0.0.0/8:deny\n{key}:allow,RELAYCLIENT=""\n'.encode())
    src = cf.read_rules_dir(str(tmp_path))
    assert [r.source.line for r in src.tcp_rules] == [1]
    assert [str(d) for d in src.diagnostics] == [
        f"{tmp_path}/tcp.smtp:2: {key} has host bits set; did you mean {meant}?: rule skipped"]


def _long(n: int) -> str:
    return "/" + "a" * (n - 2) + "/"


def test_line_at_the_limit_is_read_one_over_is_refused(tmp_path):
    at, over = _long(cf.MAX_LINE), _long(cf.MAX_LINE + 1)
    write(tmp_path, "badmailfrom", f"{at}\n{over}\nok@example.org\n".encode())
    src = cf.read_rules_dir(str(tmp_path))
    assert [ln.line for ln in src.lists["badmailfrom"]] == [1, 3]
    assert [str(d) for d in src.diagnostics] == [
        f"{tmp_path}/badmailfrom:2: line of {cf.MAX_LINE + 1} bytes, over the {cf.MAX_LINE}-byte "
        "limit (docs/behaviour/control-files.md#limits): rule skipped"]


def _python_calls(fn):
    """How many Python function calls `fn()` makes: a count of work that does
    not depend on how busy the machine is."""
    import sys
    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        if event == "call":
            calls += 1
    sys.setprofile(count)
    try:
        result = fn()
    finally:
        sys.setprofile(None)
    return result, calls


@pytest.mark.parametrize("name,line", [
    ("badmailfrom", "/(" + "a|" * 1_000_000 + "b)/"),        # a 2 MB regex
    ("tcp.smtp", "1.2.3.4:allow,X=" + "v" * 2_000_000),     # a 2 MB setting
    ("smtpgreeting", "mx.example " + "g" * 2_000_000),
    ("databytes", "1" * 2_000_000),
])
def test_oversized_line_is_refused_before_it_is_parsed(tmp_path, name, line):
    """docs/behaviour/control-files.md#limits: a 100 MB regex line used to cost
    minutes and gigabytes before RE2 refused it, and the diagnostic repeated
    it whole. Now it is refused unread: the compile makes about as many calls
    as for an empty directory, and the message is one short line."""
    from mailfilter.rules import compiler
    _, baseline = _python_calls(lambda: compiler.compile_dir(str(tmp_path)))
    first_line_file = name in ("smtpgreeting", "databytes")
    write(tmp_path, name, f"{'' if first_line_file else '# a comment' + chr(10)}{line}\n".encode())
    number = 1 if first_line_file else 2
    compiled, calls = _python_calls(lambda: compiler.compile_dir(str(tmp_path)))
    assert [str(d) for d in compiled.diagnostics] == [
        f"{tmp_path}/{name}:{number}: line of {len(line)} bytes, over the {cf.MAX_LINE}-byte "
        "limit (docs/behaviour/control-files.md#limits): rule skipped"]
    assert compiled.n_rules == 0
    assert calls < baseline + 200, (calls, baseline)


@pytest.mark.parametrize("name,line,shown", [
    ("badmailfrom", "/(?=" + "x" * 3000 + ")/", "/(?=" + "x" * 97 + "... (2904 more characters left out)/"),
    ("rcpthosts", "*" * 3000, "'" + "*" * 100 + "'... (2900 more characters left out)"),
    ("tcp.smtp", "1.2.3.4:allow,HELOCHECK=" + "h" * 3000, "'" + "h" * 100 + "'... (2900 more characters left out)"),
    ("tcp.smtp", "9" * 3000 + ":allow", "'" + "9" * 100 + "'... (2900 more characters left out)"),
])
def test_diagnostics_quote_a_bounded_part_of_the_line(tmp_path, name, line, shown):
    from mailfilter.rules import compiler
    write(tmp_path, name, f"{line}\n".encode())
    (diag,) = compiler.compile_dir(str(tmp_path)).diagnostics
    assert shown in str(diag)
    assert len(str(diag)) < len(str(tmp_path)) + cf.MAX_PROBLEM + 40
