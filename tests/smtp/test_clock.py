"""smtp/clock.py: every connection's deadline on one loop timer.

Most tests run the wheel on a loop whose clock the test moves (call_at and
time() only, the two calls the wheel makes), so due times are exact; one
runs it on the real loops.
"""
from __future__ import annotations

import asyncio
import heapq
import random

import pytest

from mailfilter.smtp.clock import RESOLUTION, TimerWheel


class SteppedLoop:
    """time() the test sets; call_at handles run by advance()."""

    def __init__(self, now: float = 1000.0):
        self.now = now
        self.timers = []        # heap of (when, seq, handle)
        self.seq = 0

    def time(self):
        return self.now

    def call_at(self, when, fn):
        h = _Handle(when, fn)
        self.seq += 1
        heapq.heappush(self.timers, (when, self.seq, h))
        return h

    def pending(self):
        return [h for _, _, h in self.timers if not h.cancelled]

    def advance(self, to: float):
        """Run every timer due by `to`, in order, the clock at each one's time."""
        while self.timers and self.timers[0][0] <= to:
            when, _, h = heapq.heappop(self.timers)
            if h.cancelled:
                continue
            self.now = max(self.now, when)
            h.fn()
        self.now = to


class _Handle:
    def __init__(self, when, fn):
        self.when, self.fn, self.cancelled = when, fn, False

    def cancel(self):
        self.cancelled = True


class Owner:
    def __init__(self, loop, name, on_due=None):
        self.slot = None
        self.loop = loop
        self.name = name
        self.fired = []
        self.on_due = on_due

    def _timer_due(self):
        self.fired.append(self.loop.time())
        if self.on_due is not None:
            self.on_due(self)


def test_fires_at_due_never_early_at_most_one_slot_late():
    loop = SteppedLoop()
    wheel = TimerWheel(loop)
    rng = random.Random(7)
    owners = []
    for i in range(300):
        o = Owner(loop, i)
        o.due = loop.now + rng.uniform(0.001, 30)
        wheel.set(o, o.due)
        owners.append(o)
    loop.advance(loop.now + 31)
    for o in owners:
        assert len(o.fired) == 1, o.name
        assert o.due <= o.fired[0] + 0.001 <= o.due + RESOLUTION + 0.001, (o.due, o.fired)
    assert len(wheel) == 0 and not loop.pending()      # nothing armed once nobody waits


def test_set_moves_an_owner_and_cancel_removes_it():
    loop = SteppedLoop()
    wheel = TimerWheel(loop)
    a, b = Owner(loop, "a"), Owner(loop, "b")
    wheel.set(a, loop.now + 5)
    wheel.set(a, loop.now + 10)         # moved: one slot only
    wheel.set(b, loop.now + 5)
    wheel.cancel(b)
    assert b.slot is None and len(wheel) == 1
    loop.advance(loop.now + 9)
    assert a.fired == [] and b.fired == []
    loop.advance(loop.now + 2)
    assert len(a.fired) == 1 and b.fired == []
    wheel.cancel(a)                     # cancelling an owner without a slot is harmless
    assert a.slot is None


def test_an_earlier_due_time_rearms_the_loop_timer():
    loop = SteppedLoop()
    wheel = TimerWheel(loop)
    late, early = Owner(loop, "late"), Owner(loop, "early")
    wheel.set(late, loop.now + 100)
    wheel.set(early, loop.now + 1)
    assert len(loop.pending()) == 1     # one loop timer, for the earliest slot
    loop.advance(loop.now + 2)
    assert len(early.fired) == 1 and late.fired == []
    assert len(loop.pending()) == 1     # re-armed for the later one
    loop.advance(loop.now + 100)
    assert len(late.fired) == 1


def test_callback_may_rearm_itself_and_cancel_others_in_its_slot():
    loop = SteppedLoop()
    wheel = TimerWheel(loop)
    victim = Owner(loop, "victim")

    def rearm_and_cancel(o):
        wheel.cancel(victim)                    # same slot, not yet run: must not run
        if len(o.fired) < 3:
            wheel.set(o, loop.time() + 2)       # lazy re-arm, as _timer_due does

    killer = Owner(loop, "killer", rearm_and_cancel)
    wheel.set(killer, loop.now + 1)
    wheel.set(victim, loop.now + 1)
    loop.advance(loop.now + 20)
    assert len(killer.fired) == 3 and victim.fired == []
    assert len(wheel) == 0


def test_a_due_time_already_past_runs_on_the_next_turn_not_in_a_loop():
    """A callback that sets a due time in the past (the clock went on while
    it ran) is not run again inside the same firing: the wheel arms the loop
    timer and returns."""
    loop = SteppedLoop()
    wheel = TimerWheel(loop)
    calls = []

    def past(o):
        calls.append(loop.time())
        if len(calls) < 3:
            wheel.set(o, loop.time() - 5)

    o = Owner(loop, "o", past)
    wheel.set(o, loop.now + 1)
    when = loop.now + 1
    # run exactly one loop timer
    _, _, h = heapq.heappop(loop.timers)
    loop.now = when
    h.fn()
    assert len(calls) == 1 and o.slot is not None and len(loop.pending()) == 1
    loop.advance(loop.now)
    assert len(calls) == 3


def test_a_failing_callback_does_not_stop_the_others(caplog):
    loop = SteppedLoop()
    wheel = TimerWheel(loop)

    def boom(_o):
        raise RuntimeError("boom")

    bad, good = Owner(loop, "bad", boom), Owner(loop, "good")
    wheel.set(bad, loop.now + 1)
    wheel.set(good, loop.now + 1)
    loop.advance(loop.now + 2)
    assert len(good.fired) == 1
    assert "connection timer failed" in caplog.text


def test_stale_keys_from_moves_are_bounded():
    """Moving owners leaves stale keys in the lazy heap; they never outgrow
    twice the live slots plus a constant once the timer has run."""
    loop = SteppedLoop()
    wheel = TimerWheel(loop)
    owners = [Owner(loop, i) for i in range(50)]
    rng = random.Random(3)
    for step in range(200):
        for o in owners:
            wheel.set(o, loop.now + rng.uniform(1, 600))
        loop.advance(loop.now + 0.5)
    assert len(wheel.heap) <= 2 * len(wheel.slots) + 1024
    wheel.close()
    assert all(o.slot is None for o in owners) and not loop.pending()


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_runs_on_the_real_loops(kind):
    if kind == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        wheel = TimerWheel(loop)
        done = asyncio.Event()
        owners = []

        def last(o):
            if all(x.fired for x in owners):
                done.set()

        for i in range(20):
            o = Owner(loop, i, last)
            o.due = loop.time() + 0.01 * i
            owners.append(o)
            wheel.set(o, o.due)
        loop.run_until_complete(asyncio.wait_for(done.wait(), 10))
        for o in owners:
            assert o.fired[0] + 0.002 >= o.due      # never early (the loop's clock resolution aside)
    finally:
        loop.close()
