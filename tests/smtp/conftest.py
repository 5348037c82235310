"""Fixtures the SMTP server tests share: the event loop under test (both
loops: asyncio and uvloop), servers started on it and stopped after the
test (the decision log fixture, `decisions`, is tests/conftest.py's)."""
from __future__ import annotations

import pytest

from tests.support.server_harness import LOOPS, start_server, write_rules


@pytest.fixture(params=LOOPS)
def loop_kind(request):
    return request.param


@pytest.fixture
def rules_dir(tmp_path):
    return write_rules(tmp_path / "rules")


@pytest.fixture
def start(tmp_path, loop_kind, rules_dir):
    """start(rules=..., **start_server keywords) -> a running ServerThread on
    the loop under test, with its own maildir; no host name lookups unless
    remote_host says so."""
    servers = []

    def _start(*, rules=None, remote_host="off", **kw):
        srv = start_server(loop_kind, rules or rules_dir, str(tmp_path / f"spool{len(servers)}"),
                           remote_host=remote_host, **kw)
        servers.append(srv)
        return srv

    yield _start
    for srv in servers:
        srv.stop()

