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
    ("10.1.2.3/8:allow", "10.0.0.0/8"),          # host bits ignored
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
