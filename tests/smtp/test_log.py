"""mailfilter.log: one line per record whatever a client sends
(docs/architecture.md#errors-and-logging): quoting, escaping by code point, the value cap."""
from mailfilter import log


def test_plain_values_stand_as_they_are():
    assert log.kv(action="accept", rule="badmailfrom:6", to="<a@b.example>") == \
        "action=accept rule=badmailfrom:6 to=<a@b.example>"


def test_quotes_escapes_and_controls():
    assert log.quote('a "b" \\ c') == '"a \\"b\\" \\\\ c"'
    assert log.quote("x\r\ny\x00\x1b") == '"x\\x0d\\x0ay\\x00\\x1b"'
    assert log.quote("") == '""'


def test_code_points_above_0xff_are_not_ambiguous():
    """U+2028 used to be written \\x2028, which reads as \\x20 followed by
    "28"; \\x is now always two hex digits."""
    assert log.quote("\u00e9") == '"\\xe9"'
    assert log.quote("\u2028") == '"\\u2028"'
    assert log.quote("\U0001f600") == '"\\U0001f600"'


def test_long_values_are_cut_and_say_how_much():
    q = log.quote("x" * 10_000)
    assert q.startswith('"xxx') and q.endswith('...[9488 more]"')
    assert len(q) <= log.MAX_VALUE + 20
    # escapes count with their printed length: 9000 control bytes -> 4 chars each
    q = log.quote("\x01" * 9000)
    assert len(q) <= log.MAX_VALUE + 20 and q.endswith(f"...[{9000 - log.MAX_VALUE // 4} more]\"")
    exact = "y" * log.MAX_VALUE
    assert log.quote(exact) == exact
