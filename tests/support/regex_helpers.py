"""Test helper shared by the regex tests: an RE2 regex behind a call counter,
to prove when a ListMatcher ran a regex and when its filters or gate spared it."""
from mailfilter.rules.regexes import compile_re2


class CountingRegex:
    """A regex that has contains() and nothing else (all a ListMatcher may
    use), counting its calls."""

    def __init__(self, pattern: str):
        self.rx = compile_re2(pattern)
        self.calls = 0

    def contains(self, text: bytes) -> bool:
        self.calls += 1
        return self.rx.contains(text)
