"""Crash leftovers in a maildir's tmp/ (docs/behaviour/delivery.md#maildir).

Real maildirs, real files, a real SIGKILLed child. The file times are real;
"36 hours later" is an injected clock (the sweep compares file times with
it), never a sleep. os.utime sets mtime only: ctime stays the real now, so a
file is old for the sweep only once the injected clock is 36 h past now.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from mailfilter.delivery import Envelope, MaildirDelivery
from mailfilter.delivery.tmpsweep import STALE_AFTER, SWEEP_INTERVAL, TmpSweeper

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 30
HOUR = 3600.0
ENV = Envelope("a@example.com", ["b@example.org"], "client.test", "192.0.2.1",
               "client.test", None, False, "mx.test")
MSG = b"Subject: hi\n\nbody\n"
# a message whose tmp/ file exists before its commit (a small one is made at commit)
LARGE = b"Subject: big\n\n" + (b"y" * 1023 + b"\n") * 65


class Clock:
    """A wall clock the test moves: starts `ahead` seconds past the real now."""

    def __init__(self, ahead: float) -> None:
        self.now = time.time() + ahead

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def records():
    """The 'mailfilter' logger's records (its own handler: log.setup() may
    have turned propagation off for the session)."""
    got: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = got.append
    lg = logging.getLogger("mailfilter")
    old_level = lg.level
    lg.addHandler(handler)
    lg.setLevel(logging.DEBUG)
    yield got
    lg.removeHandler(handler)
    lg.setLevel(old_level)


def sweep_lines(records) -> list[str]:
    return [r.getMessage() for r in records if "stale file" in r.getMessage()]


def put(path: str, mtime: float) -> str:
    with open(path, "wb") as f:
        f.write(b"partial message\n")
    os.utime(path, (mtime, mtime))
    return os.path.basename(path)


def maildir(tmp_path) -> str:
    md = str(tmp_path / "Maildir")
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(md, sub))
    return md


def tmp_names(md: str) -> list[str]:
    return sorted(os.listdir(os.path.join(md, "tmp")))


def test_constants_are_the_maildir_spec_s():
    assert STALE_AFTER == 36 * HOUR and SWEEP_INTERVAL == HOUR


def test_start_removes_stale_files_and_keeps_fresh_ones(tmp_path, records):
    md = maildir(tmp_path)
    clock = Clock(ahead=40 * HOUR)          # ctime (real now) is 40 h old for the sweep
    real = time.time()
    tmp = os.path.join(md, "tmp")
    put(os.path.join(tmp, "1.M1P1Q1.host"), real - 10 * HOUR)     # mtime 50 h old
    put(os.path.join(tmp, "2.M2P2Q2.host"), real - 1 * HOUR)      # mtime 41 h old
    fresh = put(os.path.join(tmp, "3.M3P3Q3.host"), clock() - 60)  # written a minute ago
    os.mkdir(os.path.join(tmp, "somedir"))                   # not a regular file: kept
    os.utime(os.path.join(tmp, "somedir"), (real - 50 * HOUR,) * 2)
    os.symlink("/nonexistent", os.path.join(tmp, "link"))
    in_new = put(os.path.join(md, "new", "4.M4P4Q4.host"), real - 50 * HOUR)  # tmp/ only

    MaildirDelivery(md, clock=clock).check()

    assert tmp_names(md) == sorted([fresh, "link", "somedir"])
    assert os.listdir(os.path.join(md, "new")) == [in_new]
    [line] = sweep_lines(records)           # one line for the batch
    # the age is since the later of mtime and ctime: ctime (real now), 40 h
    assert "removed 2 stale file(s)" in line and "oldest 40.0 h" in line, line


def test_old_mtime_alone_is_not_stale(tmp_path, records):
    """mtime AND ctime: a file whose mtime was set back (a restore, a touch)
    but whose inode changed recently is kept."""
    md = maildir(tmp_path)
    name = put(os.path.join(md, "tmp", "1.M1P1Q1.host"), time.time() - 100 * HOUR)
    MaildirDelivery(md).check()
    assert tmp_names(md) == [name]
    assert sweep_lines(records) == []


def test_a_delivery_in_flight_is_never_removed(tmp_path, records):
    md = maildir(tmp_path)
    clock = Clock(ahead=40 * HOUR)

    async def go():
        d = MaildirDelivery(md, clock=clock)
        sink = d.open(ENV)
        sink.write(LARGE)
        [mine] = tmp_names(md)
        os.utime(os.path.join(md, "tmp", mine), (0, 0))        # looks as old as can be
        dead = put(os.path.join(md, "tmp", "1.M1P1Q1.host"), 0)  # a dead writer's
        removed, _ = d.sweeper.sweep()
        left = tmp_names(md)
        res = await sink.commit()
        await d.close()
        return mine, dead, removed, left, res
    mine, dead, removed, left, res = asyncio.run(asyncio.wait_for(go(), TIMEOUT))
    assert removed == 1 and left == [mine]
    assert res.ok and os.listdir(os.path.join(md, "new")) == [mine]
    assert tmp_names(md) == []


def test_periodic_pass_runs_after_the_interval_from_the_delivery_path(tmp_path, records):
    md = maildir(tmp_path)
    clock = Clock(ahead=40 * HOUR)

    async def deliver_one(d):
        sink = d.open(ENV)
        sink.write(MSG)
        return await sink.commit()

    async def go():
        d = MaildirDelivery(md, clock=clock)
        d.check()                           # the pass at start
        stale = put(os.path.join(md, "tmp", "1.M1P1Q1.host"), time.time() - 10 * HOUR)
        clock.now += 59 * 60
        assert (await deliver_one(d)).ok
        await d.close()                     # waits for any pass on the pool
        within = (d.sweeper.passes, tmp_names(md))
        clock.now += 2 * 60                 # 61 minutes after the start
        assert (await deliver_one(d)).ok
        await d.close()
        after = (d.sweeper.passes, tmp_names(md))
        assert (await deliver_one(d)).ok   # just after a pass: none again
        await d.close()
        return stale, within, after, d.sweeper.passes
    stale, within, after, last = asyncio.run(asyncio.wait_for(go(), TIMEOUT))
    assert within == (1, [stale])
    assert after == (2, [])
    assert last == 2
    assert len(os.listdir(os.path.join(md, "new"))) == 3
    assert len(sweep_lines(records)) == 1


def test_sweeper_due_once_per_interval_and_after_a_clock_step_back(tmp_path):
    clock = Clock(ahead=0)
    s = TmpSweeper(str(tmp_path), set, clock=clock)
    assert s.due()                          # never swept: at once
    assert not s.due()
    clock.now += SWEEP_INTERVAL - 1
    assert not s.due()
    clock.now += 1
    assert s.due() and not s.due()
    clock.now -= 10 * HOUR                  # the wall clock stepped back
    assert s.due() and not s.due()


def test_sigkill_leftover_is_removed_by_the_next_start_once_old(tmp_path, records):
    md = str(tmp_path / "m")
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "support", "maildir_child.py"),
                          "stall", md, str(1024 * 1024)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         env=dict(os.environ, PYTHONPATH=ROOT, PYTHONDONTWRITEBYTECODE="1"))
    try:
        assert p.stdout.readline() == b"WRITING 1\n"     # mid-message
        p.kill()
        assert p.wait(timeout=TIMEOUT) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()
        p.stdin.close()
        p.stdout.close()
    [leftover] = tmp_names(md)

    MaildirDelivery(md).check()             # a start right after the crash: too young
    assert tmp_names(md) == [leftover]
    MaildirDelivery(md, clock=Clock(ahead=STALE_AFTER + 60)).check()   # a start 36 h later
    assert tmp_names(md) == []
    [line] = sweep_lines(records)
    assert "removed 1 stale file(s)" in line
