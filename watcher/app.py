"""Wiring: config -> scheduler -> client -> diff -> store, with signals and a clean shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client import CollectorRegistry

from . import __version__
from .client import FetchedBody, FetchedNotFound, HubClient
from .config import (
    Config,
    FineTuneConfig,
    NotifierSecrets,
    load_config,
    resolve_hub_token,
    resolve_notifier_secrets,
    resolve_secret,
)
from .diff import DiffOptions
from .dispatch import Dispatcher
from .errors import ConfigError, PollError, StoreError
from .logs import REDACTOR, configure_logging
from .metrics import Metrics
from .models import (
    Event,
    FineTuneRef,
    FineTuneStatus,
    PollFailed,
    PollNotFound,
    PollResult,
    PollSuccess,
    PollUnchanged,
    outcome_of,
)
from .schema import body_hash, parse_checkpoint_list
from .server import HttpServer, Verdict
from .store import Committed, DispatchLock, Router, SqliteStore, Store, open_store
from .systemd import Notifier as SystemdNotifier
from .tasks import finish_or_cancel
from .web.site import StatusPages

log = structlog.get_logger("watcher")
T = TypeVar("T")
EventSink = Callable[[Event], None]
PARSE_IN_THREAD_BYTES = 512 * 1024


def _failure(err: PollError) -> PollFailed:
    return PollFailed(err.message, err.http_status, err.outcome, err.retry_after_s)  # type: ignore[arg-type]


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
    deferred: bool = False


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
    metrics: Metrics | None = None
    refs: dict[str, FineTuneRef] = field(default_factory=dict)
    health: dict[str, PollHealth] = field(default_factory=dict)
    _executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "store"))
    _not_before: dict[str, float] = field(default_factory=dict)
    _unauthorized: set[str] = field(default_factory=set)  # fine-tunes whose last answer was 401/403
    _in_flight: set[asyncio.Task[Any]] = field(default_factory=set)
    _statuses: dict[str, FineTuneStatus] = field(default_factory=dict)
    _touches: dict[str, tuple[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.set_fine_tunes(self.config)

    def set_fine_tunes(self, config: Config) -> None:
        """Adopt the fine-tunes (and options) of a config."""
        self.config = config
        self.refs = {ft.key: ref_of(ft) for ft in config.fine_tunes}
        for key in self.refs:
            self.health.setdefault(key, PollHealth())
        for key in [k for k in self.health if k not in self.refs]:
            del self.health[key]
            self._statuses.pop(key, None)
        if self.metrics is not None:
            self.metrics.state.retain_fine_tunes(self.refs)
            self.metrics.forget_fine_tunes(self.refs.values())

    @property
    def options(self) -> DiffOptions:
        """The diff options from [watch]."""
        return DiffOptions(baseline=self.config.watch.baseline, failure_threshold=self.config.watch.failure_threshold)

    async def in_store(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a store call on the store's own thread, so a slow disk never blocks the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    async def load(self) -> None:
        """Read persisted hold-backs (Retry-After) and the state the metrics show, so a restart resets neither."""
        statuses = await self.in_store(self.store.statuses, list(self.refs))
        for status in statuses:
            self._statuses[status.key] = status
            if self.metrics is not None:
                self.metrics.state.set_fine_tune(self.refs[status.key], status)
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
        started = time.monotonic()
        outcome = "error"
        try:
            report = await self._poll(ref)
            if report is None:
                self.health.setdefault(key, PollHealth()).deferred = True
                outcome = ""
                return None
            if report.result is not None and report.error is None:
                outcome = outcome_of(report.result)
            return report
        except asyncio.CancelledError:
            outcome = ""
            raise
        except Exception as err:  # the top of a job: whatever happened, the next poll still runs
            health = self.health.setdefault(key, PollHealth())
            health.crashed += 1
            health.last_outcome = "error"
            log.exception("poll.crashed", fine_tune=key, error=type(err).__name__)
            await self._record_crash(ref, err)
            return PollReport(ref, None, error=f"internal error: {type(err).__name__}")
        finally:
            if task is not None:
                self._in_flight.discard(task)
            if self.metrics is not None and outcome:
                self.metrics.observe_poll(ref, outcome, time.monotonic() - started)

    async def _poll(self, ref: FineTuneRef) -> PollReport | None:
        key = ref.key
        now = self.clock()
        hold = self._not_before.get(key)
        if hold is not None and now < hold:
            log.debug("poll.deferred", fine_tune=key, until=hold)
            return None
        fetched: FetchedBody | FetchedNotFound | None = None
        try:
            fetched = await self.client.fetch(ref)
            if isinstance(fetched, FetchedBody) and len(fetched.body) > PARSE_IN_THREAD_BYTES:
                # hashing and validating megabytes would stall every other poll on the event loop
                result = await asyncio.to_thread(self._interpret, key, fetched)
            else:
                result = self._interpret(key, fetched)
        except PollError as err:
            result = _failure(err)
        now = self.clock()
        if isinstance(result, PollUnchanged) and self.commit and self.store.quiet(key, result.body_hash):
            # nothing changed and nothing was failing: no transaction now, the poll time is written in a batch
            self._touches[key] = (result.body_hash, now)
            committed: Committed | None = Committed((), self.store.load_cached(key))
        else:
            # a batched poll time must not land after (and over) this poll's outcome
            self._touches.pop(key, None)
            try:
                committed = await self.in_store(
                    self.store.apply_poll,
                    ref,
                    result,
                    options=self.options,
                    now=now,
                    commit=self.commit,
                    route=self.route,
                )
                if committed is None and isinstance(fetched, FetchedBody):
                    # another process moved the state on since we last looked: diff the body for real
                    try:
                        digest = result.body_hash if isinstance(result, PollUnchanged) else body_hash(fetched.body)
                        result = PollSuccess(parse_checkpoint_list(fetched.body), digest)
                    except PollError as err:
                        result = _failure(err)
                    committed = await self.in_store(
                        self.store.apply_poll,
                        ref,
                        result,
                        options=self.options,
                        now=now,
                        commit=self.commit,
                        route=self.route,
                    )
            except StoreError as err:
                health = self.health.setdefault(key, PollHealth())
                if not health.store_failing:
                    log.error("store.commit_failed", fine_tune=key, error=str(err))
                health.store_failing = True
                return PollReport(ref, result, error=str(err))
        assert committed is not None
        self._observe(ref, result, committed, now)
        if self.metrics is not None and self.commit:
            await self._refresh_status(ref, result, committed, now)
        return PollReport(ref, result, committed.events)

    async def _record_crash(self, ref: FineTuneRef, err: Exception) -> None:
        # a crashed poll is a failed poll: it counts towards failure_threshold, so a fine-tune stuck on a
        # body the watcher cannot handle ends in fine_tune.poll_failing rather than in silence
        result = PollFailed(f"internal error: {type(err).__name__}", None)
        try:
            committed = await self.in_store(
                self.store.apply_poll,
                ref,
                result,
                options=self.options,
                now=self.clock(),
                commit=self.commit,
                route=self.route,
            )
        except Exception as again:  # noqa: BLE001 - top of the job: the next poll must still happen
            log.warning("poll.crash_unrecorded", fine_tune=ref.key, error=type(again).__name__)
            return
        for event in committed.events if committed else ():
            self._publish(event)

    async def _refresh_status(self, ref: FineTuneRef, result: PollResult, committed: Committed, now: float) -> None:
        assert self.metrics is not None
        status = self._statuses.get(ref.key)
        if (
            status is None
            or committed.checkpoints_changed
            or committed.events
            or (status.baselined != committed.state.baselined)
        ):
            (status,) = await self.in_store(self.store.statuses, [ref.key])
            self._statuses[ref.key] = status
            self.metrics.state.set_fine_tune(ref, status)
        if isinstance(result, PollSuccess | PollUnchanged):
            self.metrics.state.set_last_success(ref.key, now)

    def _observe(self, ref: FineTuneRef, result: PollResult, committed: Committed, now: float) -> None:
        key = ref.key
        health = self.health.setdefault(key, PollHealth())
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
                # one line for the Hub as a whole, however many fine-tunes it refuses
                if not self._unauthorized:
                    log.error(
                        "hub.unauthorized", http_status=result.http_status, hint="check [hub] token: the Hub refused it"
                    )
                self._unauthorized.add(key)
            elif previous != "error":
                log.warning(
                    "poll.failed",
                    fine_tune=key,
                    error=result.error,
                    http_status=result.http_status,
                    retry_after_s=result.retry_after_s,
                )
            if health.failing_since is None:
                health.failing_since = now
        else:
            self._not_before.pop(key, None)
            health.last_error = None
            if key in self._unauthorized:
                self._unauthorized.discard(key)
                if not self._unauthorized:
                    log.info("hub.authorized")
            if previous in ("error", "unauthorized"):
                log.info("poll.recovered", fine_tune=key, outcome=outcome)
            health.failing_since = None
        for event in committed.events:
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
        if not self._touches:
            return
        batch = [(key, digest, at) for key, (digest, at) in self._touches.items()]
        self._touches = {}
        try:
            moved_on = await self.in_store(self.store.touch, batch)
        except StoreError as err:
            log.warning("store.touch_failed", error=str(err), polls=len(batch))
            return
        for key in moved_on:  # another process committed a newer state: diff the next answer for real
            self.store.forget(key)

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
        cancelled = await finish_or_cancel(pending, grace_s)
        if cancelled:
            log.warning("shutdown.cancelled_polls", count=cancelled)

    async def aclose(self) -> None:
        """Write what is batched, close the Hub client and the store's thread."""
        await self.flush_touches()
        await self.client.aclose()
        self._executor.shutdown(wait=True)


SCHEDULE_GRID_S = 0.25


class GridIntervalTrigger(IntervalTrigger):
    """An interval trigger whose fire times land on a 250 ms grid.

    With thousands of fine-tunes, polls due within the same quarter second then start in one event-loop
    wakeup and share its cost (timer, scheduler pass, epoll); the load still spreads over the interval.
    """

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        """The next fire time, rounded up to the grid."""
        fire = super().get_next_fire_time(previous_fire_time, now)
        return None if fire is None else _on_grid(fire)


def _on_grid(moment: datetime) -> datetime:
    micros = int(SCHEDULE_GRID_S * 1_000_000)
    stamp = int(moment.timestamp() * 1_000_000)
    return moment + timedelta(microseconds=(-stamp) % micros)


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
        trigger = GridIntervalTrigger(seconds=interval, jitter=watcher.config.watch.jitter_s or None)
        existing = scheduler.get_job(key)
        if existing is not None:
            if (existing.trigger.interval, existing.trigger.jitter) != (trigger.interval, trigger.jitter):
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
            next_run_time=_on_grid(now + timedelta(seconds=rng.uniform(0, min(interval, 60.0)))),
        )


def on_poll_retry(ref: FineTuneRef, err: PollError, wait_s: float) -> None:
    """Log a quick retry inside a poll."""
    log.debug(
        "poll.retry_scheduled", fine_tune=ref.key, error=err.message, http_status=err.http_status, wait_s=wait_s or None
    )


def build_runtime(
    config: Config,
    *,
    token: str,
    secrets: Mapping[str, NotifierSecrets],
    readonly: bool = False,
    metrics: Metrics | None = None,
    sinks: Sequence[EventSink] = (),
    hub_transport: httpx.AsyncBaseTransport | None = None,
    notifier_transport: httpx.AsyncBaseTransport | None = None,
) -> tuple[Watcher, Dispatcher]:
    """The watcher and the dispatcher over one store (read-only and silent for a dry run)."""
    store = open_store(config.state_path(), readonly=True) if readonly else SqliteStore(config.state_path())
    client = HubClient(
        base_url=config.hub.url,
        token=token,
        timeout_s=config.hub.timeout_s,
        max_concurrency=config.hub.max_concurrency,
        on_retry=on_poll_retry,
        transport=hub_transport,
    )
    watcher = Watcher(
        config=config, store=store, client=client, sinks=list(sinks), commit=not readonly, metrics=metrics
    )
    dispatcher = Dispatcher(
        store=store,
        notifiers={},
        configs=config.notifiers,
        in_store=watcher.in_store,
        on_outcome=metrics.observe_delivery if metrics is not None else None,
        redact=REDACTOR.redact,
        on_outbox=metrics.state.set_outbox if metrics is not None else None,
    )
    if not readonly:
        dispatcher.reconfigure(config, secrets, transport=notifier_transport)
    watcher.route = dispatcher.route
    watcher.sinks.append(lambda _event: dispatcher.wake())
    return watcher, dispatcher


@dataclass(frozen=True, slots=True)
class Secrets:
    """Everything secret a config resolves to (never logged)."""

    hub_token: str
    notifiers: Mapping[str, NotifierSecrets]
    metrics_token: str | None

    def values(self) -> list[str]:
        """Every secret string, for the log redactor."""
        found = [self.hub_token, self.metrics_token or ""]
        for resolved in self.notifiers.values():
            found += [resolved.url or "", *resolved.secrets]
            if resolved.url:
                # the secret part of a webhook URL is its path (Slack: /services/T…/B…/…); receivers echo it
                parts = urlsplit(resolved.url)
                found += [part for part in (parts.path, parts.query) if len(part) >= 8]
        return [value for value in found if value]


def resolve_all(config: Config) -> Secrets:
    """Resolve every secret of a config; ConfigError names the first bad key."""
    return Secrets(
        hub_token=resolve_hub_token(config),
        notifiers=resolve_notifier_secrets(config),
        metrics_token=resolve_secret(config.http, "token", key="http", config=config),
    )


class App:
    """The daemon: scheduler, dispatcher, HTTP endpoints, systemd notifications, signals and reloads."""

    def __init__(
        self,
        config: Config,
        secrets: Secrets,
        *,
        config_path: str | None = None,
        registry: CollectorRegistry | None = None,
        sinks: Sequence[EventSink] = (),
        sd: SystemdNotifier | None = None,
        hub_transport: httpx.AsyncBaseTransport | None = None,
        notifier_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.secrets = secrets
        self.config_path = config_path
        self.metrics = Metrics(registry or CollectorRegistry(), version=__version__)
        self.sd = sd or SystemdNotifier()
        self._hub_transport = hub_transport
        self._notifier_transport = notifier_transport
        REDACTOR.add(secrets.values())
        self.watcher, self.dispatcher = build_runtime(
            config,
            token=secrets.hub_token,
            secrets=secrets.notifiers,
            metrics=self.metrics,
            sinks=sinks,
            hub_transport=hub_transport,
            notifier_transport=notifier_transport,
        )
        self.server = HttpServer(
            host=config.http.host,
            port=config.http.port,
            registry=self.metrics.registry,
            liveness=self.liveness,
            readiness=self.readiness,
            token=secrets.metrics_token,
            pages=StatusPages.for_app(self),
        )
        self.scheduler: AsyncIOScheduler | None = None
        self.stop = asyncio.Event()
        self._loaded = False
        self._beat = time.monotonic()
        self._dispatch_task: asyncio.Task[None] | None = None
        self._retired: list[Any] = []  # replaced clients, closed at exit (in-flight work may still hold them)
        self._reloading = asyncio.Lock()
        self._dispatch_lock = DispatchLock(config.state_path())

    # --- health -------------------------------------------------------------------------------------

    def liveness(self) -> Verdict:
        """Alive while the scheduler and the dispatcher loops run."""
        now = time.monotonic()
        problems = []
        if self.scheduler is None or not self.scheduler.running:
            problems.append("scheduler stopped")
        if now - self._beat > 10:
            problems.append(f"main loop silent for {now - self._beat:.0f}s")
        if self._dispatch_task is None or self._dispatch_task.done():
            problems.append("dispatcher stopped")
        elif now - self.dispatcher.last_beat > 30:
            problems.append(f"dispatcher silent for {now - self.dispatcher.last_beat:.0f}s")
        return Verdict(not problems, "; ".join(problems))

    def readiness(self) -> Verdict:
        """Ready once the store is open and every fine-tune has been polled once."""
        if not self._loaded:
            return Verdict(False, "opening the state database")
        waiting = [key for key, health in self.watcher.health.items() if health.polls == 0 and not health.deferred]
        if waiting:
            return Verdict(
                False, f"waiting for the first poll of {len(waiting)} fine-tunes", {"waiting": sorted(waiting)[:20]}
            )
        return Verdict(True)

    def status_line(self) -> str:
        """The STATUS= line systemd shows."""
        failing = sum(1 for health in self.watcher.health.values() if health.last_outcome in ("error", "unauthorized"))
        pending = self.metrics.state.pending_total()
        return f"watching {len(self.watcher.refs)} fine-tunes, {failing} failing, {pending} deliveries pending"

    # --- lifecycle ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or `stop`), then drain in-flight work within the grace period."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        try:
            await self.watcher.load()
            await self.dispatcher.report_outbox()
            self._loaded = True
            if not self._dispatch_lock.acquire():
                log.warning("dispatch.lock_busy", hint="another process delivers this outbox; it may send twice")
            await self.server.start()
            self.scheduler = AsyncIOScheduler(event_loop=loop, timezone=UTC)
            schedule(self.scheduler, self.watcher)
            self.scheduler.start()
            dispatching = asyncio.Event()
            self._dispatch_task = asyncio.create_task(self.dispatcher.run(dispatching), name="dispatcher")
            ticker = asyncio.create_task(self._tick(), name="ticker")
            log.info(
                "watcher.started",
                fine_tunes=len(self.watcher.refs),
                notifiers=len(self.dispatcher.notifiers),
                hub=self.config.hub.url,
                listen=f"{self.config.http.host}:{self.server.port}",
            )
            self.sd.send(ready="1", status=self.status_line())
            await self.stop.wait()
            log.info("watcher.stopping")
            self.sd.send(stopping="1", status="stopping: finishing in-flight work")
            # pause, not shutdown: APScheduler's asyncio executor cancels running jobs on shutdown, and
            # in-flight polls get the grace period to finish and commit
            self.scheduler.pause()
            dispatching.set()
            await asyncio.wait([self._dispatch_task], timeout=5)
            grace = self.config.watch.shutdown_grace_s
            await asyncio.gather(self.watcher.drain(grace), self.dispatcher.drain(grace))
            self.scheduler.shutdown(wait=False)
            ticker.cancel()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(signum)
            await self.server.stop()
            self._dispatch_lock.release()
            await self.dispatcher.aclose()
            await self.watcher.aclose()
            for retired in self._retired:
                with contextlib.suppress(Exception):
                    await retired.aclose()
            log.info("watcher.stopped")

    async def _tick(self) -> None:
        last_watchdog = last_status = 0.0
        while True:
            now = time.monotonic()
            self._beat = now
            watchdog = self.sd.watchdog_s
            # only a healthy process pets the watchdog, so systemd restarts a wedged one
            if watchdog and now - last_watchdog >= watchdog / 2 and self.liveness().ok:
                self.sd.send(watchdog="1")
                last_watchdog = now
            await self.watcher.flush_touches()
            if now - last_status >= 10:
                self.sd.send(status=self.status_line())
                last_status = now
            await asyncio.sleep(1)

    # --- reload -------------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """SIGHUP: re-read the config and apply it; an invalid one is rejected and the old one keeps running."""
        async with self._reloading:
            if self.config_path is None:
                log.warning("reload.unsupported", reason="no config file")
                return False
            self.sd.send(status="reloading the configuration")
            try:
                config = load_config(self.config_path)
                secrets = resolve_all(config)
            except ConfigError as err:
                log.error("reload.rejected", error=str(err), hint="the previous configuration keeps running")
                self.sd.send(status=self.status_line())
                return False
            self._apply(config, secrets)
            self.sd.send(status=self.status_line())
            return True

    def _apply(self, config: Config, secrets: Secrets) -> None:
        old = self.config
        REDACTOR.add(secrets.values())
        if config.state_path() != old.state_path():
            log.warning("reload.restart_required", key="state.path", hint="still using the database opened at start")
        if config.http.listen != old.http.listen:
            log.warning("reload.restart_required", key="http.listen", hint="still listening where it started")
        if (config.hub.url, config.hub.timeout_s, config.hub.max_concurrency, secrets.hub_token) != (
            old.hub.url,
            old.hub.timeout_s,
            old.hub.max_concurrency,
            self.secrets.hub_token,
        ):
            self._retired.append(self.watcher.client)
            self.watcher.client = HubClient(
                base_url=config.hub.url,
                token=secrets.hub_token,
                timeout_s=config.hub.timeout_s,
                max_concurrency=config.hub.max_concurrency,
                on_retry=on_poll_retry,
                transport=self._hub_transport,
            )
        if (config.log.level, config.log.format) != (old.log.level, old.log.format):
            configure_logging(level=config.log.level, fmt=config.log.format)
        before = set(self.watcher.refs)
        self.watcher.set_fine_tunes(config)
        after = set(self.watcher.refs)
        if self.scheduler is not None:
            schedule(self.scheduler, self.watcher)
        self.dispatcher.reconfigure(config, secrets.notifiers, transport=self._notifier_transport)
        self.server.set_token(secrets.metrics_token)
        self.config = config
        self.secrets = secrets
        log.info(
            "reload.applied",
            fine_tunes=len(after),
            added=sorted(after - before),
            removed=sorted(before - after),
            notifiers=len(config.notifiers),
        )
