"""Shared by every test directory: `oracles` importable, the decision log fixture."""
import logging
import os
import sys

import pytest

# make `tests.support.oracles` importable as `oracles`
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "support"))


@pytest.fixture
def decisions(caplog):
    """decisions() -> the mailfilter log lines (key=value) emitted so far."""
    logging.getLogger("mailfilter").propagate = True
    caplog.set_level(logging.INFO, logger="mailfilter")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "mailfilter"]
