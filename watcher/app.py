"""Wiring: config -> scheduler -> client -> diff -> store, with signals and a clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, UTC
from typing import Any, TypeVar

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from .client import FetchedBody, FetchedNotFound, HubClient
from .config import Config, FineTuneConfig
from .diff import DiffOptions
from .errors import PollError, StoreError
from .models import (
    Event,
    FineTuneRef,
    PollFailed,
    PollNotFound,
    PollResult,
    PollSuccess,
    PollUnchanged,
    outcome_of,
)
from .schema import body_hash, parse_checkpoint_list
from .dispatch import Dispatcher
from .store import Committed, Router, Store

log = structlog.get_logger("watcher")
T = TypeVar("T")
EventSink = Callable[[Event], None]


def ref_of(fine_tune: FineTuneConfig) -> FineTuneRef:
    """The FineTuneRef of a configured fine-tune."""
    return FineTuneRef(fine_tune.namespace, fine_tune.repo, fine_tune.id, fine_tune.display_name)


@dataclass(slots=True)
class PollHealth:
    """What this process knows about one fine-tune's polls (health and metrics read it)."""

    polls: int = 0
    last_outcome: str | None = None
    last_error: str | None = None
    last_poll_at: float | None = None
    failing_since: float | None = None
    store_failing: bool = False
    crashed: int = 0


@dataclass(frozen=True, slots=True)
class PollReport:
    """The outcome of one poll as `once` reports it."""

    ref: FineTuneRef
    result: PollResult | None
    events: tuple[Event, ...] = ()
    error: str | None = None

    @property
    def answered_200(self) -> bool:
        """Whether the Hub answered 200 and the outcome was committed (or previewed)."""
        return self.error is None and isinstance(self.result, PollSuccess | PollUnchanged)


@dataclass(slots=True)
class Watcher:
    """Polls fine-tunes and commits what changed; one instance per process, shared by all jobs."""

    config: Config
    store: Store
    client: HubClient
    clock: Callable[[], float] = time.time
    sinks: list[EventSink] = field(default_factory=list)
    commit: bool = True
    route: Router | None = None
    refs: dict[str, FineTuneRef] = field(default_factory=dict)
    health: dict[str, PollHealth] = field(default_factory=dict)
    _executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "store"))
    _semaphore: asyncio.Semaphore | None = None
    _not_before: dict[str, float] = field(default_factory=dict)
    _hub_unauthorized: bool = False
    _in_flight: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.set_fine_tunes(self.config)

    def set_fine_tunes(self, config: Config) -> None:
        """Adopt the fine-tunes (and options) of a config."""
        self.config = config
        self.refs = {ft.key: ref_of(ft) for ft in config.fine_tunes}
        for key in self.refs:
            self.health.setdefault(key, PollHealth())

    @property
    def options(self) -> DiffOptions:
        """The diff options from [watch]."""
        return DiffOptions(baseline=self.config.watch.baseline, failure_threshold=self.config.watch.failure_threshold)

    async def in_store(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store call on the store's own thread, so a slow disk never blocks the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def load(self) -> None:
        """Read persisted hold-backs (Retry-After) so a restart honours them."""
        statuses = await self.in_store(self.store.statuses, list(self.refs))
        for status in statuses:
            if status.not_before:
                self._not_before[status.key] = status.not_before
            health = self.health[status.key]
            health.last_outcome = status.last_outcome
            health.last_poll_at = status.last_poll_at
            if status.failing:
                health.failing_since = status.last_poll_at

    def _interpret(self, key: str, fetched: FetchedBody | FetchedNotFound) -> PollResult:
        if isinstance(fetched, FetchedNotFound):
            return PollNotFound()
        digest = body_hash(fetched.body)
        if digest == self.store.body_hash(key):
            return PollUnchanged(digest)
        return PollSuccess(parse_checkpoint_list(fetched.body), digest)

    async def poll(self, key: str) -> PollReport | None:
        """One poll of one fine-tune, start to commit; never raises (but for cancellation).

        Returns None when the Hub's Retry-After still holds the fine-tune back.
        """
        ref = self.refs.get(key)
        if ref is None:  # removed by a reload while its job was due
            return None
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        try:
            return await self._poll(ref)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the top of a job: whatever happened, the next poll still runs
            self.health[key].crashed += 1
            log.exception("poll.crashed", fine_tune=key, error=type(err).__name__)
            return PollReport(ref, None, error=f"internal error: {type(err).__name__}")
        finally:
            if task is not None:
                self._in_flight.discard(task)

    async def _poll(self, ref: FineTuneRef) -> PollReport | None:
        key = ref.key
        now = self.clock()
        hold = self._not_before.get(key)
        if hold is not None and now < hold:
            log.debug("poll.deferred", fine_tune=key, until=hold)
            return None
        fetched: FetchedBody | FetchedNotFound | None = None
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.config.hub.max_concurrency)
        try:
            async with self._semaphore:
                fetched = await self.client.fetch(ref)
            result = self._interpret(key, fetched)
        except PollError as err:
            result = PollFailed(err.message, err.http_status, err.outcome, err.retry_after_s)  # type: ignore[arg-type]
        now = self.clock()
        try:
            committed = await self.in_store(self.store.apply_poll, ref, result, options=self.options, now=now,
                                            commit=self.commit, route=self.route)
            if committed is None and isinstance(fetched, FetchedBody):
                # another process moved the state on since we last looked: diff the body for real
                try:
                    result = PollSuccess(parse_checkpoint_list(fetched.body), body_hash(fetched.body))
                except PollError as err:
                    result = PollFailed(err.message, err.http_status, err.outcome)  # type: ignore[arg-type]
                committed = await self.in_store(self.store.apply_poll, ref, result, options=self.options,
                                                now=now, commit=self.commit, route=self.route)
        except StoreError as err:
            health = self.health[key]
            if not health.store_failing:
                log.error("store.commit_failed", fine_tune=key, error=str(err))
            health.store_failing = True
            return PollReport(ref, result, error=str(err))
        assert committed is not None
        self._observe(ref, result, committed, now)
        return PollReport(ref, result, committed.events)

    def _observe(self, ref: FineTuneRef, result: PollResult, committed: Committed, now: float) -> None:
        key = ref.key
        health = self.health[key]
        if health.store_failing:
            log.info("store.recovered", fine_tune=key)
            health.store_failing = False
        outcome = outcome_of(result)
        health.polls += 1
        health.last_poll_at = now
        previous = health.last_outcome
        health.last_outcome = outcome
        if isinstance(result, PollFailed):
            health.last_error = result.error
            if result.retry_after_s:
                self._not_before[key] = now + result.retry_after_s
            if result.outcome == "unauthorized":
                if not self._hub_unauthorized:
                    log.error("hub.unauthorized", http_status=result.http_status,
                              hint="check [hub] token: the Hub refused it")
                self._hub_unauthorized = True
            elif previous in (None, "ok", "not_found"):
                log.warning("poll.failed", fine_tune=key, error=result.error, http_status=result.http_status,
                            retry_after_s=result.retry_after_s)
            if health.failing_since is None:
                health.failing_since = now
        else:
            self._not_before.pop(key, None)
            health.last_error = None
            if self._hub_unauthorized:
                log.info("hub.authorized")
                self._hub_unauthorized = False
            if previous in ("error", "unauthorized"):
                log.info("poll.recovered", fine_tune=key, outcome=outcome)
            health.failing_since = None
        for event in committed.events:
            self._publish(event)

    def _publish(self, event: Event) -> None:
        checkpoint = event.data.get("checkpoint") or {}
        log.info(
            "event.committed" if self.commit else "event.previewed",
            event_id=event.id,
            type=event.type,
            fine_tune=event.fine_tune_key,
            step=checkpoint.get("step"),
        )
        for sink in self.sinks:
            try:
                sink(event)
            except Exception:
                log.exception("event.sink_failed", event_id=event.id)

    async def poll_all(self) -> list[PollReport]:
        """Poll every configured fine-tune once (bounded by max_concurrency), in parallel."""
        keys = list(self.refs)
        reports = await asyncio.gather(*(self.poll(key) for key in keys))
        return [
            report if report is not None else PollReport(self.refs[key], None, error="held back by Retry-After")
            for key, report in zip(keys, reports, strict=True)
        ]

    async def drain(self, grace_s: float) -> None:
        """Let in-flight polls finish within grace_s, then cancel what is left."""
        pending = {task for task in self._in_flight if task is not asyncio.current_task()}
        if not pending:
            return
        log.info("shutdown.draining", in_flight=len(pending), grace_s=grace_s)
        _, late = await asyncio.wait(pending, timeout=grace_s)
        for task in late:
            task.cancel()
        if late:
            log.warning("shutdown.cancelled_polls", count=len(late))
            await asyncio.wait(late, timeout=5)

    async def aclose(self) -> None:
        """Close the Hub client and the store's thread."""
        await self.client.aclose()
        self._executor.shutdown(wait=True)


def schedule(scheduler: AsyncIOScheduler, watcher: Watcher, *, rng: random.Random | None = None) -> None:
    """One interval job per fine-tune: jittered, one instance at a time, first runs spread over the interval."""
    rng = rng or random.Random()
    now = datetime.now(UTC)
    wanted = {ft.key: ft for ft in watcher.config.fine_tunes}
    for job in scheduler.get_jobs():
        if job.id not in wanted:
            job.remove()
    for key, fine_tune in wanted.items():
        interval = watcher.config.interval_of(fine_tune)
        trigger = IntervalTrigger(seconds=interval, jitter=watcher.config.watch.jitter_s or None)
        existing = scheduler.get_job(key)
        if existing is not None:
            if existing.trigger.interval != trigger.interval:
                existing.reschedule(trigger)
            continue
        scheduler.add_job(
            watcher.poll,
            trigger,
            args=[key],
            id=key,
            name=key,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, int(interval)),
            # no thundering herd: the first polls spread over the first interval
            next_run_time=now + timedelta(seconds=rng.uniform(0, min(interval, 60.0))),
        )


def on_poll_retry(ref: FineTuneRef, err: PollError, wait_s: float) -> None:
    """Log a quick retry inside a poll."""
    log.debug("poll.retry_scheduled", fine_tune=ref.key, error=err.message, http_status=err.http_status,
              wait_s=wait_s or None)


async def run_daemon(
    watcher: Watcher,
    *,
    dispatcher: Dispatcher | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[], Awaitable[None] | None] | None = None,
) -> None:
    """Run the scheduler and the dispatcher until stop is set (SIGTERM/SIGINT), then drain and return."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    await watcher.load()
    scheduler = AsyncIOScheduler(event_loop=loop, timezone=UTC)
    schedule(scheduler, watcher)
    scheduler.start()
    dispatching = asyncio.Event()
    delivery_task = asyncio.create_task(dispatcher.run(dispatching)) if dispatcher is not None else None
    log.info("watcher.started", fine_tunes=len(watcher.refs), hub=watcher.config.hub.url,
             notifiers=len(dispatcher.notifiers) if dispatcher else 0)
    if on_ready is not None:
        maybe = on_ready()
        if maybe is not None:
            await maybe
    try:
        await stop.wait()
    finally:
        log.info("watcher.stopping")
        scheduler.shutdown(wait=False)
        grace = watcher.config.watch.shutdown_grace_s
        dispatching.set()
        if delivery_task is not None:
            await asyncio.wait([delivery_task], timeout=5)
        drains = [watcher.drain(grace)]
        if dispatcher is not None:
            drains.append(dispatcher.drain(grace))
        await asyncio.gather(*drains)
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signum)
        log.info("watcher.stopped")
