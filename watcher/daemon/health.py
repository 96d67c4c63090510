"""The daemon's health: liveness and readiness verdicts, the systemd STATUS= line, and its watched tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import structlog

from watcher.core.health import LongOperation, PollHealth, Verdict

log = structlog.get_logger("watcher")
LOOP_SILENT_S = 10.0
DISPATCHER_SILENT_S = 30.0
STORE_SILENT_S = 30.0  # a store call (the ticker's batched poll times) unanswered this long: the store is stuck


def watch_task(task: asyncio.Task[Any], *, what: str, stopping: Callable[[], bool]) -> None:
    """Log a long-lived task that dies (with its traceback); liveness reports it as stopped."""

    def done(finished: asyncio.Task[Any]) -> None:
        if finished.cancelled() or (stopping() and finished.exception() is None):
            return
        error = finished.exception()
        if error is not None:
            log.error("task.died", task=what, error=type(error).__name__, exc_info=error)
        else:
            log.error("task.died", task=what, error="returned")

    task.add_done_callback(done)


def liveness(
    *,
    now: float,
    beat: float,
    tasks: Mapping[str, asyncio.Task[Any] | None],
    dispatcher_beat: float | None,
    stopped: Iterable[str] = (),
    store_call_since: float | None = None,
    long_operation: LongOperation | None = None,
) -> Verdict:
    """Alive while the scheduler, the dispatcher and the ticker run and the main loop answers; `stopped` names
    other parts found stopped (the housekeeping scheduler).

    `store_call_since`: when the oldest store call still unanswered was made (None: none). A planned long store
    operation (`long_operation`, a file rewrite) excuses a silent dispatcher and a slow store until its expected
    end; past it, both count again. A silent main loop is never excused."""
    problems = [f"{name} stopped" for name, task in tasks.items() if task is None or task.done()]
    problems += [f"{name} stopped" for name in stopped]
    if now - beat > LOOP_SILENT_S:
        problems.append(f"main loop silent for {now - beat:.0f}s")
    excused = long_operation is not None and not long_operation.overrun(now)
    overran = f" ({long_operation.describe()}, overrun)" if long_operation is not None and not excused else ""
    silent = dispatcher_beat is not None and now - dispatcher_beat > DISPATCHER_SILENT_S and not excused
    if silent and dispatcher_beat is not None and "dispatcher stopped" not in problems:
        problems.append(f"dispatcher silent for {now - dispatcher_beat:.0f}s{overran}")
    if store_call_since is not None and now - store_call_since > STORE_SILENT_S and not excused:
        problems.append(f"store unanswered for {now - store_call_since:.0f}s{overran}")
    detail: dict[str, object] | None = {"store": long_operation.describe()} if long_operation else None
    return Verdict(not problems, "; ".join(problems), detail)


def readiness(*, loaded: bool, health: Mapping[str, PollHealth]) -> Verdict:
    """Ready once the store is open and every fine-tune has been polled once (or is held back)."""
    if not loaded:
        return Verdict(False, "opening the state database")
    waiting = [key for key, entry in health.items() if entry.polls == 0 and not entry.deferred]
    if waiting:
        return Verdict(
            False, f"waiting for the first poll of {len(waiting)} fine-tunes", {"waiting": sorted(waiting)[:20]}
        )
    return Verdict(True)


def status_line(
    *, health: Iterable[PollHealth], pending: int, throttled: bool = False, long_operation: LongOperation | None = None
) -> str:
    """The STATUS= line systemd shows."""
    entries = list(health)
    failing = sum(1 for entry in entries if entry.last_outcome in ("error", "unauthorized"))
    line = f"watching {len(entries)} fine-tunes, {failing} failing, {pending} deliveries pending"
    if throttled:
        line += ", Hub throttling (backing off)"
    return line + f"; {long_operation.describe()}" if long_operation is not None else line
