"""ListMatcher asks regexes only "does it match" (`.contains(bytes) -> bool`, no
Match object), through the lazy stubs of rules/bundle.py as well as with eager
compilation. Answers must equal RE2's `search(...) is not None` (the oracle
in tests/support/oracles/matchers.py still uses `search`, so the differential
tests of tests/core/test_listmatch.py compare the two methods on every
lookup)."""
import pytest

from mailfilter.rules import bundle

from mailfilter.rules import compiler
from mailfilter.rules.format import MODE_ADDRESS
from mailfilter.core import core
from mailfilter.rules.regexes import compile_re2
from tests.support.regex_helpers import CountingRegex


class SearchOnly:
    def search(self, text: bytes):
        raise AssertionError("search must not be called")


def matcher(regexes, negated=None):
    n = len(regexes)
    blob = core.listmatch_build([], [], [], [], list(range(1, n + 1)), [b""] * n,
                                negated or [False] * n)
    return core.ListMatcher(blob, regexes)


def test_only_contains_is_used():
    rx = CountingRegex(r"^spam[0-9]+@")
    m = matcher([rx])
    assert m.last_match(b"spam12@x", MODE_ADDRESS) == 1
    assert m.last_match(b"ham12@x", MODE_ADDRESS) == -1
    assert m.first_fire(b"SPAM1@x") == 1
    assert rx.calls == 3


def test_a_regex_without_contains_is_refused():
    with pytest.raises(AttributeError):
        matcher([SearchOnly()])


@pytest.mark.parametrize("truthy", [1, "yes", [0]])
def test_contains_result_is_taken_as_truth_value(truthy):
    class Odd:
        def contains(self, text):
            return truthy if text == b"hit" else 0
    m = matcher([Odd()])
    assert m.last_match(b"hit", 0) == 1 and m.last_match(b"miss", 0) == -1
    neg = matcher([Odd()], [True])
    assert neg.first_fire(b"hit") == -1 and neg.first_fire(b"miss") == 1


def test_set_contains_swaps_one_entry():
    m = matcher([CountingRegex("a"), CountingRegex("b")])
    assert m.last_match(b"b", 0) == 2
    m.set_contains(1, lambda text: False)
    assert m.last_match(b"b", 0) == -1
    with pytest.raises(IndexError):
        m.set_contains(2, lambda text: True)


def rules(tmp_path):
    d = tmp_path / "rules"
    d.mkdir()
    (d / "rcpthosts").write_text("example.com\n")
    (d / "badmailfrom").write_text(
        "/^[a-z]{6}[0-9]{2}@/\n/[0-9]{5,}/\n/viagra/\n!/^xok/\n/@.*\\.(ru|cn)$/\n")
    return str(d)


def test_lazy_and_eager_bundles_agree(tmp_path):
    compiled = compiler.compile_dir(rules(tmp_path))
    assert compiled.diagnostics == []
    data = bundle.serialize(compiled)
    lazy = bundle.Bundle(data).lists["badmailfrom"]
    eager = bundle.Bundle(data, eager_regex=True).lists["badmailfrom"]
    queries = [b"abcdef12@x", b"x123456@y", b"VIAGRA@z", b"xok@a.ru", b"joe@b.cn",
               b"joe@example.com", b"", b"@"]
    for _ in range(2):          # first round compiles the stubs, second uses RE2 directly
        for q in queries:
            assert lazy.last_match(q, MODE_ADDRESS) == eager.last_match(q, MODE_ADDRESS), q


def test_lazy_regex_swaps_in_compiled_contains():
    m = matcher([CountingRegex("zzz")])
    stub = bundle._LazyRegex("ab+c", 0)
    stub.matcher = m
    m.set_contains(0, stub.contains)
    assert m.last_match(b"xABBCx", 0) == 1          # compiles, swaps, answers
    stub.pattern = "("                               # RE2 would refuse this now
    assert m.last_match(b"abc", 0) == 1 and m.last_match(b"ac", 0) == -1


def test_lazy_gate_answers_bool_then_steps_aside():
    rx = CountingRegex("x")
    m = matcher([rx])
    gate = bundle._LazyGate("(?:x)|(?:y)", m)       # the alternation of the gated regexes
    m.set_gate(gate.contains)
    assert gate.contains(b"zzy") is True            # compiles, installs RE2's contains
    assert gate.contains(b"zzz") is False
    gate.pattern = "("                               # the stub is no longer called
    assert m.last_match(b"zx", 0) == 1 and rx.calls == 1
    assert m.last_match(b"zz", 0) == -1 and rx.calls == 1   # closed gate: regex not run
