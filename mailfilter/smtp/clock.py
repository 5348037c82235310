"""One event-loop timer for every connection's deadline: due times in slots.

Job: each connection has one clock (the idle timeout, the command-line
timeout and the session deadline, smtp/protocol.py's ``_timer_due``,
docs/behaviour/smtp.md#limits). An event-loop timer per connection costs
every connection a timer handle (uvloop: about 490 bytes and 1.5 µs to
make, 0.4 µs to cancel). Here a connection is one dict entry in the slot of
its due time, and ONE loop timer is armed for the earliest slot.

Slots are RESOLUTION seconds wide and a due time goes to the slot that ends
at or after it, so:

Invariants:
- a callback never runs before its due time, and at most RESOLUTION
  seconds (plus the loop's own lateness) after it;
- an owner is in at most one slot: ``set()`` moves it, ``cancel()`` takes
  it out; ``owner.slot`` is its slot's key, or None when it has none;
- the loop timer is armed for the earliest non-empty slot, or not at all
  (no wake-ups while no connection waits for anything);
- a callback may ``set()`` or ``cancel()`` any owner, itself included; one
  that raises is logged and the others in its slot still run.

The heap of slot keys is lazy: a slot emptied by ``cancel()`` keeps its key
until the key comes up (or the heap is rebuilt when stale keys outnumber the
live slots), so moving a connection costs no heap search.
"""
from __future__ import annotations

import heapq
import logging
import math

logger = logging.getLogger("mailfilter")

RESOLUTION = 0.05       # seconds per slot: how late a timeout may fire
_FIRING = object()      # owner.slot while its slot is being run


class TimerWheel:
    """Owners (objects with a ``slot`` attribute and a ``_timer_due()``
    method) called back at their due times, on one loop timer."""

    __slots__ = ("loop", "resolution", "slots", "heap", "handle", "armed")

    def __init__(self, loop, resolution: float = RESOLUTION) -> None:
        self.loop = loop
        self.resolution = resolution
        self.slots: dict[int, dict] = {}    # key -> {owner: None} (an ordered set)
        self.heap: list[int] = []           # keys of slots, lazily cleaned
        self.handle = None                  # the loop timer, armed for `armed`
        self.armed: int | None = None

    def __len__(self) -> int:
        return sum(len(s) for s in self.slots.values())

    def set(self, owner, due: float) -> None:
        """Call ``owner._timer_due()`` once, at `due` (loop.time() clock)."""
        key = math.ceil(due / self.resolution)
        old = owner.slot
        if old == key:
            return
        if old is not None and old is not _FIRING:
            self._remove(owner, old)
        slot = self.slots.get(key)
        if slot is None:
            slot = self.slots[key] = {}
            heapq.heappush(self.heap, key)
            if self.armed is None or key < self.armed:
                self._arm(key)
        slot[owner] = None
        owner.slot = key

    def cancel(self, owner) -> None:
        old = owner.slot
        if old is not None and old is not _FIRING:
            self._remove(owner, old)
        owner.slot = None

    def close(self) -> None:
        """No more callbacks (the loop is going away)."""
        if self.handle is not None:
            self.handle.cancel()
            self.handle = self.armed = None
        for slot in self.slots.values():
            for owner in slot:
                owner.slot = None
        self.slots.clear()
        self.heap.clear()

    def _remove(self, owner, key: int) -> None:
        slot = self.slots[key]
        del slot[owner]
        if not slot:
            del self.slots[key]     # its heap key is skipped when it comes up

    def _arm(self, key: int) -> None:
        if self.handle is not None:
            self.handle.cancel()
        self.armed = key
        self.handle = self.loop.call_at(key * self.resolution, self._fire)

    def _fire(self) -> None:
        self.handle = self.armed = None
        heap, slots = self.heap, self.slots
        # the loop may run a timer up to its clock resolution early (asyncio
        # does); such a key counts as come
        now_key = math.floor((self.loop.time() + 0.001) / self.resolution)
        due = []
        while heap and heap[0] <= now_key:
            slot = slots.pop(heapq.heappop(heap), None)
            if slot is not None:
                due.extend(slot)
        for owner in due:
            owner.slot = _FIRING
        # callbacks run after the slots are taken: one that sets a due time
        # already past lands in a new slot, run on the next turn, not here
        for owner in due:
            if owner.slot is _FIRING:   # not cancelled or moved by an earlier callback
                owner.slot = None
                try:
                    owner._timer_due()
                except Exception:
                    logger.exception("connection timer failed")
        while heap and heap[0] not in slots:
            heapq.heappop(heap)
        if len(heap) > 2 * len(slots) + 1024:       # stale keys from moves: rebuild
            heap[:] = slots
            heapq.heapify(heap)
        if heap and (self.armed is None or heap[0] < self.armed):
            self._arm(heap[0])
