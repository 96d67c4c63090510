"""When each fine-tune is polled: exact periods on the monotonic clock, jitter around the nominal times.

APScheduler 3 computes fire times on the wall clock (a step back stalls every job) and its jittered interval
trigger adds the jitter to the previous jittered fire time (the period stretches). The polls are therefore
driven here: fine-tune k's n-th poll is due at `anchor + n * interval + offset_n`, with `offset_n` drawn in
[-jitter/2, +jitter/2] for each period, never carried into the next. Wake-ups land on a 250 ms grid so polls due
in the same quarter second share one event-loop wakeup; the grid delays a poll, never the next one's due time.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger("watcher.scheduling")
SCHEDULE_GRID_S = 0.25
FIRST_SPREAD_MAX_S = 60.0  # the first polls of a start or a reload spread over at most this long


@dataclass(slots=True)
class _Slot:
    """The schedule of one fine-tune: nominal time n is anchor + n * interval."""

    interval: float
    jitter: float
    anchor: float
    period: int = 0
    due: float = 0.0
    token: int = 0  # the heap entry that is current for this slot (older ones are stale)


class PollSchedule:
    """Which fine-tunes are due at a monotonic time; pure (no I/O, no asyncio), driven by PollDriver."""

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None, grid_s: float = 0.25
    ) -> None:
        self._clock = clock
        self._rng = rng or random.Random()
        self._grid = grid_s
        self._slots: dict[str, _Slot] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._tokens = 0

    def __len__(self) -> int:
        return len(self._slots)

    def keys(self) -> set[str]:
        """The scheduled fine-tunes."""
        return set(self._slots)

    def interval_of(self, key: str) -> float | None:
        """The period of a scheduled fine-tune."""
        slot = self._slots.get(key)
        return None if slot is None else slot.interval

    def set(self, wanted: Mapping[str, float], *, jitter_s: float) -> None:
        """Schedule exactly these fine-tunes (key -> interval); unchanged ones keep their phase."""
        now = self._clock()
        for key in [k for k in self._slots if k not in wanted]:
            del self._slots[key]
        for key, interval in wanted.items():
            jitter = min(max(jitter_s, 0.0), interval)  # offsets never reorder two consecutive polls
            slot = self._slots.get(key)
            if slot is not None and slot.interval == interval:
                slot.jitter = jitter
                continue
            # no thundering herd: the first polls spread over the first interval
            first = now + self._rng.uniform(0, min(interval, FIRST_SPREAD_MAX_S))
            slot = _Slot(interval=interval, jitter=jitter, anchor=first, period=0, due=first)
            self._slots[key] = slot
            self._push(key, slot)
        if len(self._heap) > 2 * len(self._slots) + 64:  # drop the stale entries of removed and rescheduled keys
            self._heap = [entry for entry in self._heap if self._live(entry)]
            heapq.heapify(self._heap)

    def nominal(self, key: str, period: int) -> float:
        """The nominal (unjittered) time of a fine-tune's period."""
        slot = self._slots[key]
        return slot.anchor + period * slot.interval

    def due(self, now: float) -> list[str]:
        """The fine-tunes due at `now`; each moves on to its next period (missed periods are skipped)."""
        found: list[str] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if not self._live(entry):
                continue
            key = entry[2]
            slot = self._slots[key]
            found.append(key)
            # the next period; a process that stalled for more than half a period coalesces what it missed
            # (the first period not yet begun) instead of firing a burst
            slot.period += 1
            if slot.anchor + (slot.period + 0.5) * slot.interval < now:
                slot.period = math.ceil((now - slot.anchor) / slot.interval)
            half = slot.jitter / 2
            offset = self._rng.uniform(-half, half) if half else 0.0
            slot.due = max(slot.anchor + slot.period * slot.interval + offset, now)
            self._push(key, slot)
        return found

    def next_wakeup(self) -> float | None:
        """The earliest due time, rounded up to the grid (None when nothing is scheduled)."""
        heap = self._heap
        while heap and not self._live(heap[0]):
            heapq.heappop(heap)
        if not heap:
            return None
        due = heap[0][0]
        if not self._grid:
            return due
        return math.ceil(due / self._grid - 1e-9) * self._grid

    def _push(self, key: str, slot: _Slot) -> None:
        self._tokens += 1
        slot.token = self._tokens
        heapq.heappush(self._heap, (slot.due, slot.token, key))

    def _live(self, entry: tuple[float, int, str]) -> bool:
        slot = self._slots.get(entry[2])
        return slot is not None and entry[1] == slot.token


class PollDriver:
    """Starts each due poll as a task; a poll still running when its next one is due makes that one skip."""

    def __init__(
        self,
        schedule: PollSchedule,
        poll: Callable[[str], Awaitable[Any]],
        *,
        clock: Callable[[], float] = time.monotonic,
        on_skip: Callable[[str], None] | None = None,
    ) -> None:
        self.schedule = schedule
        self._poll = poll
        self._clock = clock
        self._on_skip = on_skip
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._overrunning: set[str] = set()
        self._changed = asyncio.Event()
        self.skipped = 0
        self.paused = False

    @property
    def running(self) -> dict[str, asyncio.Task[Any]]:
        """The polls in flight, by fine-tune."""
        return self._running

    def pause(self) -> None:
        """Start no more polls (shutdown: those in flight drain)."""
        self.paused = True

    def reschedule(self, wanted: Mapping[str, float], *, jitter_s: float) -> None:
        """Adopt a new set of fine-tunes and intervals (a reload); wakes the loop."""
        self.schedule.set(wanted, jitter_s=jitter_s)
        self._overrunning &= set(wanted)
        self._changed.set()

    def tick(self, now: float) -> float | None:
        """Start every poll due at `now`; returns the monotonic time of the next wakeup."""
        if self.paused:
            return None
        for key in self.schedule.due(now):
            if key in self._running:
                self._skip(key)
                continue
            if key in self._overrunning:
                self._overrunning.discard(key)
                if not self._overrunning:
                    log.info("schedule.caught_up")
            task = asyncio.ensure_future(self._poll(key))
            self._running[key] = task
            task.add_done_callback(functools.partial(self._finished, key))
        return self.schedule.next_wakeup()

    def _finished(self, key: str, task: asyncio.Future[Any]) -> None:
        if self._running.get(key) is task:
            del self._running[key]

    def _skip(self, key: str) -> None:
        # APScheduler's "maximum number of running instances reached", handled here: counted every time,
        # logged once when the first fine-tune starts overrunning and once when the last one catches up
        self.skipped += 1
        if self._on_skip is not None:
            self._on_skip(key)
        if not self._overrunning:
            log.warning("schedule.overrun", fine_tune=key, hint="a poll was still running when the next was due")
        self._overrunning.add(key)

    async def run(self) -> None:
        """Drive the schedule until cancelled."""
        while True:
            self._changed.clear()
            wake = self.tick(self._clock())
            timeout = None if wake is None else max(0.0, wake - self._clock())
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass
