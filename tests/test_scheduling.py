"""The poll schedule on injected clocks: exact mean period, jitter around nominal times, grid, clock steps,
and the "still running" case."""

from __future__ import annotations

import asyncio
import random

import pytest
import structlog

from watcher.daemon.scheduling import PollDriver, PollSchedule


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def simulate(schedule: PollSchedule, clock: Clock, until: float) -> list[tuple[float, str]]:
    """Wake exactly when the schedule asks (as the driver does) and record every poll started."""
    fired: list[tuple[float, str]] = []
    while True:
        wake = schedule.next_wakeup()
        assert wake is not None
        if wake > until:
            return fired
        assert wake >= clock.now - 1e-9, "a wakeup in the past"
        clock.now = max(clock.now, wake)
        fired += [(clock.now, key) for key in schedule.due(clock.now)]


@pytest.mark.parametrize(("interval", "jitter"), [(10.0, 1.0), (2.0, 1.0), (0.5, 0.5), (3.0, 0.0)])
def test_the_mean_period_is_the_interval_and_jitter_stays_around_nominal_times(interval: float, jitter: float):
    clock = Clock(1000.0)
    schedule = PollSchedule(clock=clock, rng=random.Random(7), grid_s=0.25)
    keys = [f"ns/repo/ft_{n}" for n in range(200)]
    schedule.set(dict.fromkeys(keys, interval), jitter_s=jitter)
    anchors = {key: schedule.nominal(key, 0) for key in keys}
    horizon = 1000.0 + 100 * interval
    fired = simulate(schedule, clock, horizon)
    by_key: dict[str, list[float]] = {}
    for at, key in fired:
        by_key.setdefault(key, []).append(at)
    for key, times in by_key.items():
        # rate: every period polled once, none lost to jitter or to the grid (the old trigger reached 76-94 %)
        expected = int((horizon - anchors[key]) / interval) + 1
        assert abs(len(times) - expected) <= 1, (key, len(times), expected)
        for period, at in enumerate(times):
            nominal = anchors[key] + period * interval
            # at most +-jitter/2 around the nominal time, plus the 250 ms grid: never accumulating
            assert nominal - jitter / 2 - 1e-9 <= at <= nominal + jitter / 2 + 0.25 + 1e-9, (key, period, at - nominal)
    total = len(fired)
    configured = sum((horizon - anchors[key]) / interval for key in keys)
    assert total / configured >= 0.99


def test_first_polls_spread_over_the_first_interval():
    clock = Clock(50.0)
    schedule = PollSchedule(clock=clock, rng=random.Random(1))
    schedule.set({f"k{n}": 10.0 for n in range(1000)}, jitter_s=1.0)
    firsts = sorted(schedule.nominal(f"k{n}", 0) - 50.0 for n in range(1000))
    assert 0 <= firsts[0] < 0.5 and 9.5 < firsts[-1] <= 10.0
    assert 400 < sum(1 for f in firsts if f < 5.0) < 600


def test_a_reload_keeps_the_phase_of_unchanged_fine_tunes_and_drops_removed_ones():
    clock = Clock(0.0)
    schedule = PollSchedule(clock=clock, rng=random.Random(3))
    schedule.set({"a": 5.0, "b": 5.0}, jitter_s=0)
    anchor_a = schedule.nominal("a", 0)
    simulate(schedule, clock, 12.0)
    schedule.set({"a": 5.0, "c": 2.0}, jitter_s=0)
    assert schedule.nominal("a", 0) == anchor_a
    assert schedule.keys() == {"a", "c"}
    fired = simulate(schedule, clock, 40.0)
    assert "b" not in {key for _, key in fired}
    assert {key for _, key in fired} == {"a", "c"}


def test_a_stalled_process_coalesces_missed_periods_instead_of_bursting():
    clock = Clock(0.0)
    schedule = PollSchedule(clock=clock, rng=random.Random(5), grid_s=0)
    schedule.set({"a": 1.0}, jitter_s=0)
    simulate(schedule, clock, 3.0)
    clock.now = 30.0  # the loop was blocked (or the VM paused) for 27 s
    assert schedule.due(clock.now) == ["a"]
    assert schedule.due(clock.now) == []
    wake = schedule.next_wakeup()
    assert wake is not None and 30.0 < wake <= 31.0


async def test_a_wall_clock_step_back_does_not_stall_polling():
    """The driver runs on the monotonic clock; the wall clock (reported in polls) steps back 600 s mid-run."""
    mono = Clock(10_000.0)
    wall = Clock(1_800_000_000.0)
    reported: list[tuple[float, float]] = []

    async def poll(key: str) -> None:
        reported.append((mono.now, wall()))

    driver = PollDriver(PollSchedule(clock=mono, rng=random.Random(2)), poll, clock=mono)
    driver.reschedule({f"k{n}": 1.0 for n in range(10)}, jitter_s=0.5)

    async def run_for(seconds: float) -> int:
        before = len(reported)
        end = mono.now + seconds
        while True:
            wake = driver.tick(mono.now)
            await asyncio.sleep(0)  # let the started polls run
            assert wake is not None
            if wake > end:
                wall.now += end - mono.now
                mono.now = end
                return len(reported) - before
            wall.now += wake - mono.now
            mono.now = wake

    first = await run_for(30.0)
    wall.now -= 600.0  # NTP or a VM resume steps the wall clock back
    second = await run_for(30.0)
    assert first >= 280 and second >= 295, (first, second)  # 10 fine-tunes at 1 s: ~300 polls per 30 s
    assert any(w2 < w1 for (_, w1), (_, w2) in zip(reported, reported[1:], strict=False)), "the wall clock stepped"


async def test_a_poll_still_running_is_skipped_and_logged_once_per_state_change():
    mono = Clock(0.0)
    release = asyncio.Event()
    started: list[str] = []
    skipped: list[str] = []

    async def poll(key: str) -> None:
        started.append(key)
        await release.wait()

    driver = PollDriver(
        PollSchedule(clock=mono, rng=random.Random(4), grid_s=0), poll, clock=mono, on_skip=skipped.append
    )
    driver.reschedule({"a": 1.0, "b": 1.0}, jitter_s=0)
    with structlog.testing.capture_logs() as logs:
        for _ in range(10):  # ten periods while both polls hang
            wake = driver.tick(mono.now)
            await asyncio.sleep(0)
            assert wake is not None
            mono.now = wake
        release.set()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        for _ in range(3):
            wake = driver.tick(mono.now)
            await asyncio.sleep(0)
            assert wake is not None
            mono.now = wake
    assert started.count("a") >= 2 and started.count("b") >= 2
    assert len(skipped) >= 6 and driver.skipped == len(skipped)  # every skip counted
    events = [entry["event"] for entry in logs]
    assert events.count("schedule.overrun") == 1
    assert events.count("schedule.caught_up") == 1
