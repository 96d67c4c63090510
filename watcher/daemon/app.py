"""Wiring: config -> scheduler -> client -> diff -> store -> dispatcher, with signals and a clean shutdown.

The parts live in their own modules: `poller` (one fine-tune's poll and its state object), `scheduling` (when
each poll is due), `reload` (plan, then apply), `health` (verdicts); this module builds and runs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Sequence
from datetime import UTC
from typing import Any

import httpx
import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from prometheus_client import CollectorRegistry

from watcher import __version__
from watcher.config.load import Config, load_config
from watcher.core.health import LongOperation
from watcher.daemon.health import liveness, readiness, status_line, watch_task
from watcher.daemon.lifecycle_jobs import LifecycleJobs
from watcher.daemon.poller import EventSink, PollHealth, PollReport, WatchedFineTune, Watcher, ref_of
from watcher.daemon.reload import Reloadable, apply_reload, plan_reload
from watcher.daemon.replicas.wiring import build_keeper, join
from watcher.daemon.retention import RetentionJob
from watcher.daemon.runtime import (
    Secrets,
    build_runtime,
    make_client,
    on_poll_retry,
    open_reports,
    open_state,
    public_url,
    resolve_all,
)
from watcher.daemon.scheduling import SCHEDULE_GRID_S, PollDriver, PollSchedule
from watcher.errors import ConfigError
from watcher.hub.client import HubClient
from watcher.observe.logs import REDACTOR
from watcher.observe.metrics import Metrics
from watcher.observe.server import HttpServer, Verdict
from watcher.observe.systemd import Notifier as SystemdNotifier
from watcher.store import DispatchLock
from watcher.store.replicas import ReplicaStore

__all__ = [
    "SCHEDULE_GRID_S",
    "App",
    "EventSink",
    "PollHealth",
    "PollReport",
    "Secrets",
    "WatchedFineTune",
    "Watcher",
    "build_runtime",
    "make_client",
    "on_poll_retry",
    "public_url",
    "ref_of",
    "resolve_all",
]

from watcher.web.site import LiveSources, StatusPages

log = structlog.get_logger("watcher")
LOCK_RETRY_S = 1.0  # how often a daemon waiting for the dispatch lock tries again


class App:
    """The daemon: poll driver, dispatcher, HTTP endpoints, systemd notifications, signals and reloads."""

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
        reload_requested: Callable[[], bool] | None = None,
    ) -> None:
        self.config = config
        self.secrets = secrets
        self.config_path = config_path
        self.metrics = Metrics(registry or CollectorRegistry(), version=__version__)
        self.sd = sd or SystemdNotifier()
        self.hub_transport = hub_transport
        self.notifier_transport = notifier_transport
        self._reload_requested = reload_requested  # a SIGHUP caught before the event loop took the signals
        REDACTOR.add(secrets.values())
        store = open_state(config, secrets.state_url)
        # PostgreSQL: the lease keeper decides what this replica polls, reads and delivers; SQLite: everything
        self.keeper = build_keeper(store, config, self.metrics)
        self.watcher, self.dispatcher = build_runtime(
            config,
            store=store,
            token=secrets.hub_token,
            secrets=secrets.notifiers,
            ownership=self.keeper,
            metrics=self.metrics,
            sinks=sinks,
            hub_transport=hub_transport,
            notifier_transport=notifier_transport,
        )
        # checkpoint polls, source reads and the status sweep: one monotonic schedule (lifecycle_jobs.py)
        schedule = PollSchedule(grid_s=SCHEDULE_GRID_S)
        self.lifecycle = LifecycleJobs(
            self.watcher, scheduled=schedule.interval_of, on_change=lambda: self.reschedule(self.config)
        )
        self.driver = PollDriver(schedule, self.lifecycle.run, on_skip=self._skipped)
        self.retention = RetentionJob(
            store=store,
            in_store=self.watcher.in_store,
            retain_days=config.model.state.retain_days,
            gate=store.retention_gate() if isinstance(store, ReplicaStore) else None,  # one replica prunes
        )
        if self.keeper is not None:
            assert isinstance(store, ReplicaStore)
            join(
                self.keeper,
                store,
                self.watcher,
                self.lifecycle,
                reschedule=lambda: self.reschedule(self.config),
                wake=self.dispatcher.wake,
            )
        self.server = HttpServer(
            host=config.http.host,
            port=config.http.port,
            registry=self.metrics.registry,
            liveness=self.liveness,
            readiness=self.readiness,
            token=secrets.metrics_token,
            pages=StatusPages(
                reports=open_reports(config, self.watcher.store),
                snapshot=LiveSources(
                    watched=self.watcher.every_ref,
                    health=lambda: self.watcher.health,
                    notifiers=lambda: [entry.name for entry in self.config.notifiers],
                    disabled=lambda: self.dispatcher.disabled,
                    liveness=self.liveness,
                    readiness=self.readiness,
                ).snapshot,
            ),
        )
        # the wall-clock jobs (retention hourly); the polls have their own monotonic driver (scheduling.py)
        self.scheduler: AsyncIOScheduler | None = None
        self.stop = asyncio.Event()
        self.started = False
        self._loaded = False
        self._beat = time.monotonic()
        self._driver_task: asyncio.Task[None] | None = None
        self._dispatch_task: asyncio.Task[None] | None = None
        self._ticker_task: asyncio.Task[None] | None = None
        # the ticker's store call (batched poll times), run beside it so a long store operation never stops the
        # beat nor the watchdog; when it was made, for liveness
        self._touching: asyncio.Task[None] | None = None
        self._touching_since: float | None = None
        self._retired: list[Any] = []  # replaced Hub clients not closed yet (polls may still hold them)
        self._closing: set[asyncio.Task[None]] = set()
        self._reloading = asyncio.Lock()
        self._reload_pending = False
        self._reloads: set[asyncio.Task[bool]] = set()
        # SQLite: one process delivers the outbox; replicas on PostgreSQL each deliver the lanes they own
        self._dispatch_lock = None if config.state.postgresql else DispatchLock(config.state_path())
        self.delivering = False  # holds the dispatch lock
        self._leases_task: asyncio.Task[None] | None = None

    def parts(self) -> Reloadable:
        """What a reload changes."""
        return Reloadable(
            watcher=self.watcher,
            dispatcher=self.dispatcher,
            server=self.server,
            retention=self.retention,
            metrics=self.metrics,
            make_client=self.make_client,
            retire=self.retire,
            reschedule=self.reschedule,
            notifier_transport=self.notifier_transport,
        )

    # --- parts the reload steps use -----------------------------------------------------------------

    def make_client(self, config: Config, token: str) -> HubClient:
        """A Hub client for a (re)loaded config."""
        return make_client(config, token, transport=self.hub_transport, on_request=self.metrics.observe_hub_request)

    def retire(self, closable: Any) -> None:
        """Close a replaced Hub client once the polls running now (which may still use it) have ended."""
        self._retired.append(closable)
        task = asyncio.get_running_loop().create_task(self._close_when_idle(closable, self.watcher.in_flight()))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_when_idle(self, closable: Any, polls: set[asyncio.Task[Any]]) -> None:
        if polls:
            await asyncio.wait(polls)
        try:
            await closable.aclose()
        except Exception:  # the top of a close job: a failed close leaks one pool, it must not stop the daemon
            log.exception("hub.client_close_failed")
        finally:
            with contextlib.suppress(ValueError):
                self._retired.remove(closable)

    def reschedule(self, config: Config) -> None:
        """Schedule the jobs of a config (unchanged ones keep their phase): each fine-tune's checkpoint polls at
        the interval of its status, source reads, the status sweep. Replicas: only owned fine-tunes are watched."""
        self.driver.reschedule(self.lifecycle.wanted(config), jitter_s=config.watch.jitter_s)
        self.lifecycle.update_metrics()

    def _skipped(self, key: str) -> None:
        self.metrics.polls_skipped.inc()

    # --- health -------------------------------------------------------------------------------------

    def liveness(self) -> Verdict:
        """Alive while the poll driver, the dispatcher and the ticker run (and, replicas, lease renewals work)."""
        verdict = liveness(
            now=time.monotonic(),
            beat=self._beat,
            tasks={
                "scheduler": self._driver_task,
                "dispatcher": self._dispatch_task,
                "ticker": self._ticker_task,
                **({"leases": self._leases_task} if self.keeper is not None and self.started else {}),
            },
            dispatcher_beat=self.dispatcher.last_beat if self.delivering else None,
            stopped=["housekeeping"]
            if self.started and self.scheduler is not None and not self.scheduler.running
            else [],
            store_call_since=self._touching_since,
            long_operation=self.long_operation(),
        )
        problem = self.keeper.problem() if self.keeper is not None else None
        if problem is None:
            return verdict
        return Verdict(False, "; ".join(part for part in (verdict.reason, problem) if part), verdict.detail)

    def long_operation(self) -> LongOperation | None:
        """The planned long store operation under way (a rewrite of the SQLite file by retention), if any."""
        return self.retention.store.long_operation

    def readiness(self) -> Verdict:
        """Ready once the store is open and every fine-tune has been polled once."""
        return readiness(loaded=self._loaded, health=self.watcher.health)

    def status_line(self) -> str:
        """The STATUS= line systemd shows."""
        return status_line(
            health=self.watcher.health.values(),
            pending=self.metrics.state.pending_total(),
            throttled=self.watcher.client.gate.throttled,
            long_operation=self.long_operation(),
        )

    # --- lifecycle ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT (or `stop`), then drain in-flight work within the grace period."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        if self._reload_requested is not None and self._reload_requested():
            self.request_reload()
        try:
            await self.watcher.load()
            if self.keeper is not None:  # the first round: claim a share before polling
                await self.keeper.step()
            await self.lifecycle.load_records()
            await self.dispatcher.report_outbox()
            self._loaded = True
            await self.server.start()
            # at start, then hourly; small batches on the store thread, interleaved with the polls' commits
            self.scheduler = AsyncIOScheduler(event_loop=loop, timezone=UTC)
            self.retention.schedule(self.scheduler)
            self.scheduler.start()
            self.reschedule(self.config)
            dispatching = asyncio.Event()
            self._driver_task = asyncio.create_task(self.driver.run(), name="scheduler")
            self._dispatch_task = asyncio.create_task(self._deliver(dispatching), name="dispatcher")
            self._ticker_task = asyncio.create_task(self._tick(), name="ticker")
            if self.keeper is not None:
                self._leases_task = asyncio.create_task(self.keeper.run_forever(), name="leases")
                watch_task(self._leases_task, what="leases", stopping=self.stop.is_set)
            for task in (self._driver_task, self._dispatch_task, self._ticker_task):
                watch_task(task, what=task.get_name(), stopping=self.stop.is_set)
            log.info(
                "watcher.started",
                fine_tunes=len(self.watcher.fine_tunes),
                notifiers=len(self.dispatcher.notifiers),
                hub=public_url(self.config.hub.url),
                listen=f"{self.config.http.host}:{self.server.port}",
            )
            self.sd.send(ready="1", status=self.status_line())
            self.started = True
            if self._reload_pending:  # a SIGHUP during start-up, applied now
                self._reload_pending = False
                self.request_reload()
            await self.stop.wait()
            log.info("watcher.stopping")
            self.sd.send(stopping="1", status="stopping: finishing in-flight work")
            # no new polls; in-flight ones get the grace period to finish and commit
            self.driver.pause()
            self._driver_task.cancel()
            self.scheduler.shutdown(wait=False)
            self.retention.stop()  # no new prune batches while in-flight work drains
            dispatching.set()
            await asyncio.wait([self._dispatch_task], timeout=5)
            grace = self.config.watch.shutdown_grace_s
            await asyncio.gather(self.watcher.drain(grace), self.dispatcher.drain(grace))
            if self._leases_task is not None:
                self._leases_task.cancel()
            if self.keeper is not None:  # the other replicas take this one's fine-tunes over at once
                await self.keeper.leave()
            self._ticker_task.cancel()
            if self._touching is not None:
                await asyncio.wait([self._touching], timeout=grace)
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(signum)
            if self.scheduler is not None and self.scheduler.running:
                self.scheduler.shutdown(wait=False)
            self.retention.stop()
            tasks = (self._driver_task, self._dispatch_task, self._ticker_task, self._leases_task, self._touching)
            for running in tasks:
                if running is not None and not running.done():
                    running.cancel()
            await self.server.stop()
            if self._dispatch_lock is not None:
                self._dispatch_lock.release()
            await self.dispatcher.aclose()
            await self.watcher.aclose()
            for closing in list(self._closing):
                closing.cancel()
            for retired in list(self._retired):
                with contextlib.suppress(Exception):
                    await retired.aclose()
            log.info("watcher.stopped")

    async def _deliver(self, stop: asyncio.Event) -> None:
        """Deliver only while holding the dispatch lock; until then, try again every second."""
        waiting = False
        while self._dispatch_lock is not None and not self._dispatch_lock.acquire():
            if not waiting:
                log.warning("dispatch.lock_busy", hint="another process delivers this outbox; waiting for it")
                waiting = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LOCK_RETRY_S)
            if stop.is_set():
                return
        if waiting:
            log.info("dispatch.lock_acquired")
        self.delivering = True
        await self.dispatcher.run(stop)

    async def _tick(self) -> None:
        last_watchdog = last_status = 0.0
        operation = None
        while True:
            now = time.monotonic()
            self._beat = now
            watchdog = self.sd.watchdog_s
            # only a healthy process pets the watchdog, so systemd restarts a wedged one
            if watchdog and now - last_watchdog >= watchdog / 2 and self.liveness().ok:
                self.sd.send(watchdog="1")
                last_watchdog = now
            self._touch()
            if now - last_status >= 10 or self.long_operation() is not operation:
                operation = self.long_operation()  # a long operation's start and end are said at once
                self.sd.send(status=self.status_line())
                last_status = now
            await asyncio.sleep(1)

    def _touch(self) -> None:
        """Write the batched poll times beside the ticker, one call at a time: behind a long store operation the
        call waits, the beat goes on (a failure the call did not handle ends the ticker, as when it was inline)."""
        if self._touching is not None:
            if not self._touching.done():
                return
            self._touching.result()
        self._touching_since = time.monotonic()
        self._touching = asyncio.create_task(self._flush_touches(), name="touches")

    async def _flush_touches(self) -> None:
        try:
            await self.watcher.flush_touches()
        finally:
            self._touching_since = None

    # --- reload -------------------------------------------------------------------------------------

    def request_reload(self) -> None:
        """SIGHUP: reload now, or once started when it arrives during start-up."""
        if not self.started:
            if not self._reload_pending:
                log.info("reload.deferred", reason="still starting; applied once started")
            self._reload_pending = True
            return
        task = asyncio.get_running_loop().create_task(self.reload(), name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    async def reload(self) -> bool:
        """Re-read the config and apply it all or nothing; an invalid one is rejected, the old one keeps running."""
        async with self._reloading:
            if self.config_path is None:
                log.warning("reload.unsupported", reason="no config file")
                return False
            self.sd.send(status="reloading the configuration")
            try:
                return await self._reload()
            finally:
                self.sd.send(status=self.status_line())

    async def _reload(self) -> bool:
        assert self.config_path is not None
        try:
            config = load_config(self.config_path)
            secrets = resolve_all(config)
        except ConfigError as err:
            log.error("reload.rejected", error=str(err), hint="the previous configuration keeps running")
            return False
        parts = self.parts()
        try:
            plan = plan_reload(parts, running=(self.config, self.secrets), config=config, secrets=secrets)
        except Exception as err:
            log.exception("reload.failed", error=type(err).__name__, hint="the previous configuration keeps running")
            return False
        try:
            apply_reload(parts, plan)
        except Exception as err:
            log.exception("reload.failed", error=type(err).__name__, hint="the previous configuration keeps running")
            await plan.discard(parts)
            return False
        self.config, self.secrets = plan.config, plan.secrets
        return True
