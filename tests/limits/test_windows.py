"""limits/windows.py: fixed windows per key, on an injected clock."""
import pytest

from mailfilter.limits.windows import FixedWindows


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_counts_within_the_window_and_starts_over_after_it():
    clock = Clock()
    w = FixedWindows(60.0, clock=clock)
    assert [w.hit("a") for _ in range(3)] == [1, 2, 3]
    clock.now += 59.9
    assert w.hit("a") == 4 and w.count("a") == 4
    clock.now += 0.1                # 60 s after the window's first event: a new window
    assert w.count("a") == 0
    assert w.hit("a") == 1


def test_keys_are_counted_apart():
    w = FixedWindows(60.0, clock=Clock())
    w.hit("a")
    w.hit("a")
    assert w.hit("b") == 1 and w.count("a") == 2 and w.count("c") == 0


def test_the_window_starts_at_the_first_event_not_at_a_clock_boundary():
    """anvil's way: a client's window begins with its first event, so a
    burst across a minute boundary is still one window."""
    clock = Clock()
    clock.now = 119.0
    w = FixedWindows(60.0, clock=clock)
    w.hit("a")
    clock.now = 121.0
    assert w.hit("a") == 2


def test_bounded_in_keys_least_recently_counted_first():
    clock = Clock()
    w = FixedWindows(60.0, size=3, clock=clock)
    for key in "abc":
        w.hit(key)
    w.hit("a")                      # a is the most recent now
    w.hit("d")                      # b goes
    assert len(w) == 3 and w.count("b") == 0 and w.count("a") == 2


@pytest.mark.parametrize("window,size", [(0, 10), (-1, 10), (60, 0)])
def test_bad_settings_are_refused(window, size):
    with pytest.raises(ValueError):
        FixedWindows(window, size)
