"""mailfilter/rules/idn.py: the other spellings of an IDN domain in a rule
entry (docs/behaviour/control-files.md#international-domain-names): IDNA 2003
(Python's encodings.idna), exact pairs only, in the control file's
one-character-per-byte form."""
import pytest

from mailfilter.rules.idn import IdnProblem, other_spellings


def file_form(text: str) -> str:
    """How controlfiles.py hands a line: its bytes, one character each."""
    return text.encode().decode("latin-1")


@pytest.mark.parametrize("written,others", [
    ("b\u00fccher.example", ("xn--bcher-kva.example",)),
    ("B\u00fccher.EXAMPLE", ("xn--bcher-kva.example",)),                 # ASCII folded first
    (".b\u00fccher.example", (".xn--bcher-kva.example",)),               # a suffix keeps its dot
    ("B\u00dcCHER.example", ("xn--bcher-kva.example", "b\u00fccher.example")),  # nameprep's lower case
    ("xn--bcher-kva.example", ("b\u00fccher.example",)),
    ("XN--BCHER-KVA.Example", ("b\u00fccher.example",)),
    ("example.com", ()),
    ("[192.0.2.1]", ()),
    ("", ()),
    ("xn--.example", ()),                   # not an A-label: matched as written
    (b"m\xfcller.example", ()),              # Latin-1 bytes, not UTF-8: none
])
def test_other_spellings(written, others):
    text = written.decode("latin-1") if isinstance(written, bytes) else file_form(written)
    assert other_spellings(text) == tuple(file_form(o) for o in others)


@pytest.mark.parametrize("written,why", [
    ("stra\u00dfe.example", "into 'strasse.example', another name"),   # IDNA 2003 maps ß to ss
    ("\uff41.example", "into 'a.example', another name"),                # full-width a (NFKC)
    ("\u00fc" * 70 + ".example", "cannot write"),                       # a label over 63 octets
])
def test_no_exact_pair_is_a_problem(written, why):
    with pytest.raises(IdnProblem, match=why):
        other_spellings(file_form(written))
