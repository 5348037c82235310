"""docs/operations.md#limits-and-timeouts, file descriptors: `mailfilter serve`
as a real process with a small RLIMIT_NOFILE (set in the child before exec,
or lowered while it serves with prlimit), real clients on 127.0.0.1.

At start the soft limit is raised to the hard one and --max-connections is
fitted to it (the default lowered with a warning, a given value that does
not fit refused); while serving, an accept() without a descriptor pauses
accepting, logs `action=refuse reason=no_descriptors` at most once per 10 s
with a count, and the clients waiting in the backlog are greeted once
descriptors free up. Every wait is bounded; nothing sleeps.
"""
from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import time

import pytest

from mailfilter.serve.descriptors import LOG_INTERVAL
from tests.support.server_harness import (
    LOOPS, TIMEOUT, LogReader, Spawned, child_env, free_port, write_rules,
)


def _limit(soft: int, hard: int):
    def preexec():          # in the child, before exec: the server starts with this limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return preexec


def serve_cmd(rules, spool, port, *args) -> list[str]:
    return [sys.executable, "-m", "mailfilter", "serve", "--rules", rules,
            "--deliver", f"maildir:{spool}", "--listen", f"127.0.0.1:{port}",
            "--remote-host", "off", "--no-tls", *args]


def spawn_limited(tmp_path, soft: int, hard: int, *args) -> Spawned:
    """serve with RLIMIT_NOFILE (soft, hard); returns once it listens."""
    port = free_port()
    rules = write_rules(tmp_path / "rules")
    proc = subprocess.Popen(serve_cmd(rules, tmp_path / "spool", port, *args),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env(),
                            preexec_fn=_limit(soft, hard))
    sp = Spawned(proc, port, LogReader(proc.stderr))
    try:
        sp.log.wait_for(rf"listening on 127\.0\.0\.1:{port} ", timeout=30)
    except BaseException:
        sp.stop()
        raise
    return sp


def greeted(port: int, timeout: float = TIMEOUT) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    assert s.recv(512).startswith(b"220 ")
    return s


def test_soft_limit_raised_default_lowered_to_fit(tmp_path):
    """The soft limit 64 is raised to the hard 200 (logged); the default
    10000 sessions cannot fit, so it is lowered with a warning naming both
    numbers, and the session after the last that fits is told 421 4.7.0
    (before: the clients past the limit were closed unanswered, or waited)."""
    sp = spawn_limited(tmp_path, 64, 200)
    clients = []
    try:
        sp.log.wait_for(r"open files: soft limit raised from 64 to the hard limit 200")
        m = sp.log.wait_for(r"--max-connections lowered from 10000 to (\d+): the open-file "
                            r"limit 200 fits")[0]
        room = int(m.group(1))
        assert 0 < room < 100           # 2 descriptors a session, the rest reserved
        clients = [greeted(sp.port) for _ in range(room)]
        with socket.create_connection(("127.0.0.1", sp.port), timeout=TIMEOUT) as extra:
            assert extra.recv(512).startswith(b"421 4.7.0 ")
        sp.log.wait_for(r"action=refuse stage=CONNECT reason=max_connections ")
    finally:
        for c in clients:
            c.close()
        sp.stop()


def test_given_max_connections_that_does_not_fit_is_refused(tmp_path):
    """A --max-connections the operator gave is a capacity they planned for:
    one that the hard limit cannot hold stops the start (exit 2) naming both
    numbers, instead of being lowered behind their back."""
    rules = write_rules(tmp_path / "rules")
    r = subprocess.run(serve_cmd(rules, tmp_path / "spool", free_port(), "--max-connections", "500"),
                       capture_output=True, text=True, timeout=60, env=child_env(),
                       preexec_fn=_limit(64, 200))
    assert r.returncode == 2, r
    last = r.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"mailfilter serve: --max-connections 500 needs \d+ open files \(2 per "
                        r"session plus \d+ reserved\), the limit is 200: raise the hard limit "
                        r"\(ulimit -Hn, LimitNOFILE=\) or give --max-connections \d+ or less", last), last


def test_given_max_connections_that_fits_is_kept(tmp_path):
    sp = spawn_limited(tmp_path, 64, 200, "--max-connections", "3")
    clients = []
    try:
        clients = [greeted(sp.port) for _ in range(3)]
        with socket.create_connection(("127.0.0.1", sp.port), timeout=TIMEOUT) as extra:
            assert extra.recv(512).startswith(b"421 4.7.0 ")
        assert "lowered" not in sp.log.text()
    finally:
        for c in clients:
            c.close()
        sp.stop()


@pytest.mark.parametrize("loop", LOOPS)
def test_no_descriptors_logged_once_per_interval_and_recovers(tmp_path, loop):
    """The soft limit lowered under a serving process (prlimit) so accept()
    fails with EMFILE: the clients that fit are greeted, the next ones are
    answered `421 4.3.2` on the spare descriptor and closed (nobody is closed
    unanswered: uvloop used to accept and close them silently); one line per
    LOG_INTERVAL with a count; and once sessions close, new clients are
    greeted."""
    sp = spawn_limited(tmp_path, 1024, 1024, "--loop", loop)
    clients, refused = [], []
    try:
        in_use = len(os.listdir(f"/proc/{sp.proc.pid}/fd"))
        resource.prlimit(sp.proc.pid, resource.RLIMIT_NOFILE, (in_use + 5, 1024))
        # room for about 5 sessions: open them until one is refused
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", sp.port), timeout=TIMEOUT)
            s.settimeout(TIMEOUT)
            data = s.recv(512)
            if data.startswith(b"421 "):
                assert data == b"421 4.3.2 mx.test out of resources, try again later\r\n", data
                refused.append(s)
                if len(refused) == 3:
                    break
                continue
            assert data.startswith(b"220 "), data      # not closed unanswered
            clients.append(s)
        assert len(refused) == 3 and 1 <= len(clients) <= 6, (len(clients), len(refused))
        assert refused[0].recv(512) == b""             # and then closed
        # the first failure is logged at once, the ones after it one interval later
        lines = sp.log.wait_for(r"action=refuse stage=CONNECT reason=no_descriptors "
                                r"count=(\d+) sessions=\d+ error=EMFILE", count=2,
                                timeout=LOG_INTERVAL * 3)
        assert int(lines[0].group(1)) == 1 and int(lines[1].group(1)) > 1   # the rest batched
        # descriptors free up: a new client is greeted
        for c in clients:
            c.close()
        deadline = time.monotonic() + TIMEOUT
        while True:                     # the server notices the closes on its next turns
            with socket.create_connection(("127.0.0.1", sp.port), timeout=TIMEOUT) as s:
                s.settimeout(TIMEOUT)
                if s.recv(512).startswith(b"220 "):
                    break
            assert time.monotonic() < deadline, "never greeted after sessions closed"
    finally:
        for c in clients + refused:
            c.close()
        sp.stop()


def test_no_descriptors_log_is_one_line_per_interval(caplog):
    """NoDescriptorLog on a clock the test moves: the first failure is logged
    at once, the ones within LOG_INTERVAL after it are only counted and go
    out as one line when the interval is over (the timer it set), then the
    next failure after a quiet interval is logged at once again."""
    import asyncio
    import logging
    from types import SimpleNamespace

    from mailfilter.serve.descriptors import NoDescriptorLog
    caplog.set_level(logging.WARNING, logger="mailfilter")
    logging.getLogger("mailfilter").propagate = True
    now = [1000.0]
    loop = asyncio.new_event_loop()
    try:
        nolog = NoDescriptorLog(loop, SimpleNamespace(connections=7, metrics=None), clock=lambda: now[0])
        emfile = OSError(24, "Too many open files")
        lines = lambda: [r.getMessage() for r in caplog.records if "no_descriptors" in r.getMessage()]
        nolog.note(emfile)
        assert len(lines()) == 1 and "count=1 sessions=7 error=EMFILE" in lines()[0]
        for step in (1.0, 2.0, 5.0):
            now[0] += step
            nolog.note(emfile)
        assert len(lines()) == 1 and nolog.timer is not None     # counted, not logged
        now[0] = 1000.0 + LOG_INTERVAL
        nolog.flush()                                            # the timer's call
        assert len(lines()) == 2 and "count=3 " in lines()[1]
        now[0] += LOG_INTERVAL + 1
        nolog.note(emfile)                                       # quiet long enough: at once
        assert len(lines()) == 3 and "count=1 " in lines()[2]
        nolog.close()
    finally:
        loop.close()
