"""One fine-tune's poll, start to commit; the watched set it polls is a WatchSet (watchset.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from watcher.core.diff import DiffOptions
from watcher.core.models import (
    Event,
    FineTuneRef,
    PollFailed,
    PollNotFound,
    PollResult,
    PollSuccess,
    PollUnchanged,
    outcome_of,
)
from watcher.daemon.watched import PollHealth, PollReport, WatchedFineTune, ref_of
from watcher.daemon.watchset import WatchSet
from watcher.delivery.tasks import finish_or_cancel
from watcher.errors import LeaseLost, PollError, StoreError
from watcher.hub.client import FetchedBody, FetchedDeferred, FetchedNotFound, HubClient
from watcher.hub.schema import body_hash, parse_checkpoint_list
from watcher.store import Committed, Router, Store
from watcher.store.replicas import Fence
from watcher.store.thread import StoreThread

__all__ = ["PollHealth", "PollReport", "WatchSet", "WatchedFineTune", "Watcher", "ref_of"]
log = structlog.get_logger("watcher")
T = TypeVar("T")
EventSink = Callable[[Event], None]
PARSE_IN_THREAD_BYTES = 512 * 1024


def _failure(err: PollError) -> PollFailed:
    return PollFailed(err.message, err.http_status, err.outcome, err.retry_after_s)


@dataclass(slots=True, kw_only=True)
class Watcher(WatchSet):
    """Polls fine-tunes and commits what changed; one instance per process, shared by all jobs."""

    store: Store
    client: HubClient
    clock: Callable[[], float] = time.time
    sinks: list[EventSink] = field(default_factory=list)
    route: Router | None = None
    thread: StoreThread = field(default_factory=StoreThread)  # shared with the dispatcher and retention
    _in_flight: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.set_fine_tunes(self.config)

    @property
    def options(self) -> DiffOptions:
        """The diff options from [watch]."""
        return DiffOptions(baseline=self.config.watch.baseline, failure_threshold=self.config.watch.failure_threshold)

    async def in_store(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store call on the store's own thread, so a slow disk never blocks the event loop."""
        return await self.thread(fn, *args, **kwargs)

    async def load(self, keys: Collection[str] | None = None) -> None:
        """Read persisted hold-backs (Retry-After) and the state the metrics show, so a restart resets neither
        (of `keys` only, e.g. fine-tunes whose leases this replica just acquired)."""
        wanted = list(self.fine_tunes) if keys is None else [key for key in keys if key in self.fine_tunes]
        if not wanted:
            return
        statuses = await self.in_store(self.store.statuses, wanted)
        for status in statuses:
            watched = self.fine_tunes.get(status.key)
            if watched is None:
                continue
            watched.status = status
            if self.metrics is not None:
                self.metrics.state.set_fine_tune(watched.ref, status)
            if status.not_before:
                watched.not_before = status.not_before
            health = watched.health
            health.last_outcome = status.last_outcome
            health.last_poll_at = status.last_poll_at
            if status.failing:
                health.failing_since = status.last_poll_at

    def lease_of(self, key: str) -> tuple[bool, Fence | None]:
        """Whether a commit of this fine-tune may go ahead here, and the fence it goes under (None on SQLite)."""
        if self.ownership is None:
            return True, None
        fence = self.ownership.fence(key)
        return fence is not None, fence

    def fenced(self, key: str, fence: Fence | None) -> None:
        """A commit under `fence` was refused: the lease moved on; the keeper drops the fine-tune."""
        if self.ownership is not None and fence is not None:
            self.ownership.fenced(key, fence[1])

    def swap_client(self, client: HubClient) -> HubClient:
        """Poll through another Hub client from now on (a reload); returns the one replaced."""
        old, self.client = self.client, client
        return old

    def _interpret(self, key: str, fetched: FetchedBody | FetchedNotFound) -> PollResult:
        if isinstance(fetched, FetchedNotFound):
            return PollNotFound()
        digest = body_hash(fetched.body)
        if digest == self.store.body_hash(key):
            return PollUnchanged(digest)
        return PollSuccess(parse_checkpoint_list(fetched.body), digest)

    async def poll(self, key: str) -> PollReport | None:
        """One poll of one fine-tune, start to commit; never raises (but for cancellation).

        Returns None when a Retry-After (of this fine-tune, or of the whole Hub) still holds it back.
        """
        watched = self.fine_tunes.get(key)
        if watched is None:  # removed by a reload while its job was due
            return None
        task = asyncio.current_task()
        if task is not None:
            self._in_flight.add(task)
        started = time.monotonic()
        outcome = "error"
        try:
            report = await self._poll(watched)
            if report is None:
                watched.health.deferred = True
                outcome = ""
                return None
            if report.result is not None and report.error is None:
                outcome = outcome_of(report.result)
            return report
        except asyncio.CancelledError:
            outcome = ""
            raise
        except Exception as err:  # the top of a job: whatever happened, the next poll still runs
            if watched.watched:
                watched.health.crashed += 1
                watched.health.last_outcome = "error"
            log.exception("poll.crashed", fine_tune=key, error=type(err).__name__)
            await self._record_crash(watched.ref, err)
            return PollReport(watched.ref, None, error=f"internal error: {type(err).__name__}")
        finally:
            if task is not None:
                self._in_flight.discard(task)
            if outcome and watched.watched and watched.children is not None:
                counter, histogram = watched.children[outcome]
                counter.inc()
                histogram.observe(time.monotonic() - started)

    async def _poll(self, watched: WatchedFineTune) -> PollReport | None:
        ref = watched.ref
        key = ref.key
        now = self.clock()
        hold = watched.not_before
        if hold is not None and now < hold:
            log.debug("poll.deferred", fine_tune=key, until=hold)
            return None
        owned, fence = self.lease_of(key)
        if not owned:  # no longer owned (or renewing failed): not ours to poll
            return None
        fetched: FetchedBody | FetchedNotFound | FetchedDeferred | None = None
        try:
            fetched = await self.client.fetch(ref)
            if isinstance(fetched, FetchedDeferred):  # the Hub asked everyone to wait: no request was made
                return None
            if isinstance(fetched, FetchedBody) and len(fetched.body) > PARSE_IN_THREAD_BYTES:
                # hashing and validating megabytes would stall every other poll on the event loop
                result = await asyncio.to_thread(self._interpret, key, fetched)
            else:
                result = self._interpret(key, fetched)
        except PollError as err:
            result = _failure(err)
        now = self.clock()
        committed = self._unchanged(watched, result, now) if isinstance(result, PollUnchanged) else None
        if committed is None:
            try:
                committed, result = await self._commit(ref, result, fetched, now, fence)
            except LeaseLost as err:  # another replica took the fine-tune over: nothing was committed
                log.warning("poll.fenced", fine_tune=key, error=str(err))
                self.fenced(key, fence)
                return PollReport(ref, result, error=str(err))
            except StoreError as err:
                if watched.watched:
                    if not watched.health.store_failing:
                        log.error("store.commit_failed", fine_tune=key, error=str(err))
                    watched.health.store_failing = True
                return PollReport(ref, result, error=str(err))
        if not watched.watched:  # dropped by a reload meanwhile: the commit stands, nothing else comes back
            for event in committed.events:
                self._publish(event)
            return PollReport(ref, result, committed.events)
        self._observe(watched, result, committed, now)
        if self.metrics is not None and self.commit:
            await self._refresh_status(watched, result, committed, now)
        return PollReport(ref, result, committed.events)

    def _unchanged(self, watched: WatchedFineTune, result: PollUnchanged, now: float) -> Committed | None:
        """The fast path of an unchanged 200 body: touch or diff, decided by the store (no I/O now).

        None when the poll must go the full way (something was failing, or not committing).
        """
        if not self.commit:
            return None
        state = self.store.observe_unchanged(watched.ref.key, result.body_hash, now=now)
        return None if state is None else Committed((), state)

    async def _commit(
        self, ref: FineTuneRef, result: PollResult, fetched: object, now: float, fence: Fence | None = None
    ) -> tuple[Committed, PollResult]:
        committed = await self._apply(ref, result, now, fence)
        if committed is None and isinstance(fetched, FetchedBody):
            # another process moved the state on since we last looked: diff the body for real
            try:
                digest = result.body_hash if isinstance(result, PollUnchanged) else body_hash(fetched.body)
                result = PollSuccess(parse_checkpoint_list(fetched.body), digest)
            except PollError as err:
                result = _failure(err)
            committed = await self._apply(ref, result, now, fence)
        assert committed is not None
        return committed, result

    async def _apply(
        self, ref: FineTuneRef, result: PollResult, now: float, fence: Fence | None = None
    ) -> Committed | None:
        options = self.options
        watched = self.fine_tunes.get(ref.key)
        if watched is not None and watched.lifecycle is not None and watched.lifecycle.announce_checkpoints:
            # discovered after its source's first read: a new run, every checkpoint it has is news
            options = DiffOptions(baseline=False, failure_threshold=options.failure_threshold)
        return await self.in_store(
            self.store.apply_poll,
            ref,
            result,
            options=options,
            now=now,
            commit=self.commit,
            route=self.route,
            fence=fence,
        )

    async def _record_crash(self, ref: FineTuneRef, err: Exception) -> None:
        # a crashed poll is a failed poll: it counts towards failure_threshold, so a fine-tune stuck on a
        # body the watcher cannot handle ends in fine_tune.poll_failing rather than in silence
        try:
            owned, fence = self.lease_of(ref.key)
            if not owned:
                return
            failed = PollFailed(f"internal error: {type(err).__name__}", None)
            committed = await self._apply(ref, failed, self.clock(), fence)
        except Exception as again:  # noqa: BLE001 - top of the job: the next poll must still happen
            log.warning("poll.crash_unrecorded", fine_tune=ref.key, error=type(again).__name__)
            return
        for event in committed.events if committed else ():
            self._publish(event)

    async def _refresh_status(
        self, watched: WatchedFineTune, result: PollResult, committed: Committed, now: float
    ) -> None:
        assert self.metrics is not None
        ref = watched.ref
        status = watched.status
        if (
            status is None
            or committed.checkpoints_changed
            or committed.events
            or (status.baselined != committed.state.baselined)
        ):
            (status,) = await self.in_store(self.store.statuses, [ref.key])
            if not watched.watched:  # dropped while the store answered
                return
            watched.status = status
            self.metrics.state.set_fine_tune(ref, status)
        if isinstance(result, PollSuccess | PollUnchanged):
            self.metrics.state.set_last_success(ref.key, now)

    def _observe(self, watched: WatchedFineTune, result: PollResult, committed: Committed, now: float) -> None:
        change = watched.record(result, now)
        self._unauthorized += change
        # one line for the Hub as a whole, however many fine-tunes it refuses
        if change > 0 and self._unauthorized == 1:
            log.error("hub.unauthorized", http_status=result.http_status, hint="check [hub] token: the Hub refused it")
        elif change < 0 and not self._unauthorized:
            log.info("hub.authorized")
        for event in committed.events:
            self._publish(event)

    def publish(self, event: Event) -> None:
        """Count, log and hand a committed event to the sinks (the lifecycle jobs' events too)."""
        self._publish(event)

    def _publish(self, event: Event) -> None:
        if self.metrics is not None and self.commit:
            self.metrics.observe_event(event.type)
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

    async def flush_touches(self) -> None:
        """Write the batched poll times of unchanged polls (every second or so, and at exit)."""
        if not self.commit:
            return
        try:
            await self.in_store(self.store.flush_touches)
        except StoreError as err:
            log.warning("store.touch_failed", error=str(err))

    async def poll_all(self) -> list[PollReport]:
        """Poll every configured fine-tune once (bounded by max_concurrency), in parallel."""
        refs = self.refs
        reports = await asyncio.gather(*(self.poll(key) for key in refs))
        return [
            report if report is not None else PollReport(ref, None, error="held back by Retry-After")
            for ref, report in zip(refs.values(), reports, strict=True)
        ]

    def in_flight(self) -> set[asyncio.Task[Any]]:
        """The polls running now (a replaced Hub client is closed once they end)."""
        return set(self._in_flight)

    async def drain(self, grace_s: float) -> None:
        """Let in-flight polls finish within grace_s, then cancel what is left."""
        pending = {task for task in self._in_flight if task is not asyncio.current_task()}
        if not pending:
            return
        log.info("shutdown.draining", in_flight=len(pending), grace_s=grace_s)
        cancelled = await finish_or_cancel(pending, grace_s)
        if cancelled:
            log.warning("shutdown.cancelled_polls", count=cancelled)

    async def aclose(self) -> None:
        """Write what is batched, close the Hub client and the store's thread."""
        await self.flush_touches()
        await self.client.aclose()
        self.thread.close()
