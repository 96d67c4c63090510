"""Retention: the daemon prunes old events at start and then hourly (an APScheduler job), off the hot path.

Each store call is one small transaction (a batch of deletions or a vacuum step) on the store's single thread,
so polls and deliveries interleave with a long prune instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from watcher.store import PruneReport, Retention
from watcher.store.replicas import Gate

log = structlog.get_logger("watcher.retention")


class _CancelledAtShutdown(logging.Filter):
    """Drops the scheduler's error record of a pass cancelled at shutdown (the scheduler logs a cancelled job, even
    one it never started, as an error with a traceback; a stop right after a start meets the first pass)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


_QUIET_CANCEL = _CancelledAtShutdown()

DAY_S = 86400.0
RETENTION_EVERY_S = 3600.0

InStore = Callable[..., Awaitable[Any]]


def retain_s_of(retain_days: int) -> float:
    """The retention window in seconds."""
    return retain_days * DAY_S


@dataclass(slots=True)
class RetentionJob:
    """Prunes the store now and every `every_s`; never raises out of a pass (but for cancellation)."""

    store: Retention
    in_store: InStore
    retain_days: int
    clock: Callable[[], float] = time.time
    every_s: float = RETENTION_EVERY_S
    batch: int = 500
    runs: int = 0
    failures: int = 0
    last: PruneReport | None = field(default=None)
    gate: Gate | None = None  # replicas: only the holder of the gate prunes
    _passes: set[asyncio.Task[Any]] = field(default_factory=set)

    async def run_once(self) -> PruneReport | None:
        """One full pass, a transaction per store call; logs `retention.pruned` when it removed something.

        Returns what it removed, or None when the pass failed (logged with its traceback)."""
        gate = self.gate
        try:
            if gate is not None and not await self.in_store(gate.acquire):
                log.debug("retention.left_to_another_replica")
                return PruneReport()
        except Exception:  # the top of a job: retention must never take the daemon down
            self.failures += 1
            log.exception("retention.failed", retain_days=self.retain_days)
            return None
        try:
            total = PruneReport()
            now = self.clock()
            while True:
                report: PruneReport = await self.in_store(
                    self.store.prune, now=now, retain_s=retain_s_of(self.retain_days), batch=self.batch, max_batches=1
                )
                total += report
                if report.done:
                    break
        except asyncio.CancelledError:
            if gate is not None:  # shutting down: given back on a thread of its own, never awaited
                threading.Thread(target=_release, args=(gate,), name="retention-gate", daemon=True).start()
            raise
        except Exception:  # the top of a job: retention must never take the daemon down
            self.failures += 1
            log.exception("retention.failed", retain_days=self.retain_days)
            await self._release(gate)
            return None
        await self._release(gate)
        self.runs += 1
        self.last = total
        if total.events or total.deliveries or total.bytes_freed:
            log.info(
                "retention.pruned",
                events=total.events,
                deliveries=total.deliveries,
                bytes_freed=total.bytes_freed,
                retain_days=self.retain_days,
            )
        return total

    async def _release(self, gate: Gate | None) -> None:
        # never on the loop's thread: a database that stops answering at this moment would freeze every poll
        if gate is not None:
            await self.in_store(_release, gate)

    def set_retain_days(self, retain_days: int) -> None:
        """A reload's new window, from the next pass on."""
        self.retain_days = retain_days

    def schedule(self, scheduler: AsyncIOScheduler) -> None:
        """Add this job to the daemon's wall-clock scheduler: a pass now, then every `every_s` (one at a time; a
        pass missed while the host slept runs once, late)."""
        logging.getLogger("apscheduler.executors.default").addFilter(_QUIET_CANCEL)  # once: a set of filters
        scheduler.add_job(
            self._scheduled_pass,
            IntervalTrigger(seconds=self.every_s, timezone=UTC),
            id="retention",
            name="retention",
            next_run_time=datetime.now(UTC),
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )

    async def _scheduled_pass(self) -> None:
        task = asyncio.current_task()
        assert task is not None, "APScheduler runs coroutine jobs as tasks"
        self._passes.add(task)
        try:
            await self.run_once()
        finally:
            self._passes.discard(task)

    def stop(self) -> None:
        """Cancel a pass in progress (shutdown: no new prune batches while in-flight work drains)."""
        for task in list(self._passes):
            task.cancel()


def _release(gate: Gate) -> None:
    try:
        gate.release()
    except Exception:  # the lock goes with its connection anyway; retention must never take the daemon down
        log.exception("retention.gate_release_failed")


_UNITS_S = {"d": DAY_S, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_since(text: str, *, now: float) -> float:
    """A lower time bound from a duration back from `now` (`7d`, `12h`, `30m`, `45s`) or an RFC 3339 time.

    Raises ValueError with a message naming what is accepted."""
    from datetime import datetime

    value = text.strip()
    number, unit = value[:-1], value[-1:].lower()
    if unit in _UNITS_S and number.replace(".", "", 1).isdigit():
        return now - float(number) * _UNITS_S[unit]
    try:
        moment = datetime.fromisoformat(value.replace("z", "Z"))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise ValueError(
            f"{text!r} is neither a duration (7d, 12h, 30m, 45s) nor an RFC 3339 time with an offset "
            "(2026-01-31T12:00:00Z)"
        )
    return moment.timestamp()
