"""The battery's figures: each test records what it tried and what it found
(`figures` fixture); they are printed at the end of the run, for
docs/reliability.md#figures."""
from __future__ import annotations

import pytest

_FIGURES: dict[str, dict] = {}


@pytest.fixture
def figures(request):
    """A dict the test fills; shown under its name in the terminal summary."""
    out: dict = {}
    _FIGURES[request.node.name] = out
    return out


def pytest_terminal_summary(terminalreporter):
    if not _FIGURES:
        return
    terminalreporter.section("reliability figures")
    for name, figs in _FIGURES.items():
        line = ", ".join(f"{k}={v}" for k, v in figs.items())
        terminalreporter.write_line(f"{name}: {line}")
