"""Rules against SMTPUTF8 addresses (docs/behaviour/control-files.md#case,
#international-domain-names; RFC 6531).

A rule file's UTF-8 entry and the engine's decoded address meet byte for
byte: A-Z folded, every other byte exact. An internationalized domain in an
entry is also filed under its other IDNA 2003 spelling, in every list and
entry kind that names a domain by hash (exact, @domain, .suffix, rcpthosts,
recipients, decorated badmailfrom, badhelo); wildmat and regex entries see the
bytes the client sent. Each test builds a small rules directory.
"""
import pytest

from mailfilter.policy.engine import Client, PolicyEngine, PolicyOptions
from mailfilter.rules import bundle, compiler


def engine(tmp_path, files: dict[str, str]) -> tuple[PolicyEngine, list]:
    d = tmp_path / "rules"
    d.mkdir(exist_ok=True)
    files.setdefault("rcpthosts", "example.com\n")
    for name, text in files.items():
        (d / name).write_bytes(text.encode() if isinstance(text, str) else text)
    compiled = compiler.compile_dir(str(d))
    return PolicyEngine(bundle.from_compiled(compiled), PolicyOptions()), compiled.diagnostics


def verdicts(eng, sender, rcpts, ip="203.0.113.5", host="unknown", helo="mx.sender.example"):
    s = eng.session(Client(ip=ip, host=host))
    s.helo(helo)
    mail = s.mail(sender)
    return s, mail, [s.rcpt(r) for r in rcpts]


@pytest.mark.parametrize("sender,listed", [
    ("j\u00f6rg@example.org", True),
    ("J\u00f6RG@EXAMPLE.org", True),          # ASCII letters fold
    ("J\u00d6RG@example.org", False),         # Ö is not ö: non-ASCII bytes are exact
    ("jorg@example.org", False),
    ("x@spam.b\u00fccher.example", True),      # @domain entry in U-labels
    ("x@spam.xn--bcher-kva.example", True),    # ... the A-label spelling is the same entry
    ("x@SPAM.XN--BCHER-KVA.EXAMPLE", True),
    ("\u7528\u6237@cn.example", True),          # wildmat over UTF-8 bytes
    ("\u7528@cn.example", False),
    ("caf\u00e9@regex.example", True),          # regex: the UTF-8 bytes of é
])
def test_badmailfrom_utf8_entries(tmp_path, sender, listed):
    eng, diags = engine(tmp_path, {"badmailfrom": "j\u00f6rg@example.org\n@spam.b\u00fccher.example\n"
                                                  "\u7528\u6237*@cn.example\n/^caf\u00e9@/\n"})
    assert diags == []
    s, mail, (v,) = verdicts(eng, sender, ["u@example.com"])
    assert (s.sender_verdict is not None) is listed, sender
    assert v.accept is not listed


@pytest.mark.parametrize("rcpt,reason", [
    ("u@b\u00fccher.example", "ok"),
    ("u@xn--bcher-kva.example", "ok"),
    ("u@mail.xn--bcher-kva.example", "ok"),      # .suffix entry, other spelling
    ("u@caf\u00e9.example", "ok"),               # A-label entry, U-label address
    ("u@B\u00fcCHER.example", "ok"),             # ASCII folded
    ("u@B\u00dcCHER.example", "rcpthosts"),      # Ü is not ü (and no IDNA folding at lookup)
    ("u@strasse.example", "rcpthosts"),          # IDNA 2003 maps straße to strasse: not widened
    ("u@stra\u00dfe.example", "ok"),
])
def test_rcpthosts_both_spellings(tmp_path, rcpt, reason):
    eng, diags = engine(tmp_path, {"rcpthosts": "b\u00fccher.example\n.b\u00fccher.example\n"
                                                "xn--caf-dma.example\nstra\u00dfe.example\n"})
    assert [(d.line, d.kept) for d in diags] == [(4, True)]      # straße: one spelling only
    assert "straße.example" in diags[0].problem and "strasse.example" in diags[0].problem
    _, _, (v,) = verdicts(eng, "a@sender.example", [rcpt])
    assert v.reason == reason, rcpt


def test_recipients_and_badrcptto(tmp_path):
    eng, diags = engine(tmp_path, {
        "rcpthosts": "b\u00fccher.example\nexample.com\n",
        "recipients": "j\u00f6rg@xn--bcher-kva.example\n@example.com\n!caf\u00e9.example\n",
        "badrcptto": "\u00fcber@example.com\n"})
    assert diags == []
    _, _, vs = verdicts(eng, "a@sender.example", [
        "j\u00f6rg@b\u00fccher.example", "J\u00f6rg@B\u00fccher.example", "x\u00f6rg@b\u00fccher.example",
        "\u00fcber@example.com", "\u00dcber@example.com"])
    assert [(v.reason, v.rule) for v in vs] == [
        ("ok", "recipients:1"), ("ok", "recipients:1"), ("no_mailbox", "recipients"),
        ("badrcptto", "badrcptto:1"), ("ok", "recipients:2")]


def test_decorated_and_relaymailfrom(tmp_path):
    eng, diags = engine(tmp_path, {
        "badmailfrom": "?vip@xn--bcher-kva.example\n@b\u00fccher.example\n",
        "relaymailfrom": "@xn--caf-dma.example\n",
        "tcp.smtp": ':allow,RELAYMAILFROM=""\n'})
    assert diags == []
    s, _, (v,) = verdicts(eng, "vip@b\u00fccher.example", ["u@far.example"])
    assert s.sender_bypass and not v.accept and v.reason == "rcpthosts"     # bypassed, not relaying
    s, _, (v,) = verdicts(eng, "other@b\u00fccher.example", ["u@example.com"])
    assert v.reason == "badmailfrom"
    s, _, (v,) = verdicts(eng, "boss@caf\u00e9.example", ["u@far.example"])
    assert v.accept and v.reason == "relay_sender"


def test_not_utf8_entries_are_reported(tmp_path):
    """An 8-bit entry in an address list that is not UTF-8 can never match
    (an 8-bit address is UTF-8): file:line, rule skipped; badhelo (HELO
    names are any bytes) and regexes keep theirs."""
    eng, diags = engine(tmp_path, {
        "badmailfrom": b"m\xfcller@example.org\n/^m\xfc/\nok@example.org\n",
        "rcpthosts": b"example.com\nb\xfccher.example\n",
        "recipients": b"u@example.com\n\xe9@example.com\n",
        "badhelo": b"h\xe9lo.example\n", "tcp.smtp": ':allow,HELOCHECK="."\n'})
    assert [(d.path.rsplit("/", 1)[1], d.line, d.kept) for d in diags] == [
        ("badmailfrom", 1, False), ("rcpthosts", 2, False), ("recipients", 2, False)]
    assert "byte 0xfc at column 2 is not UTF-8" in str(diags[0])
    s, _, _ = verdicts(eng, "ok@example.org", [], helo="h\xe9lo.example")
    assert s.sender_verdict is not None and s.helo_verdict is not None
