"""Lifecycle and discovery in the daemon: source reads, status freshness, adaptive checkpoint intervals, the
final checkpoint poll of a finished run, and stalls.

Everything runs as jobs of the one monotonic PollDriver: a fine-tune's key polls its checkpoints (every
checkpoint_interval() of its status), `SOURCE_PREFIX + name` reads a [[discover]] source's list, and
`SWEEP_KEY` keeps every status fresh (GET .../fine_tunes/{id} for the ones no list read refreshed) and checks
for stalls. The rules themselves are pure (discovery.py, lifecycle.py); the state lives in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import structlog

from watcher.config.discovery import DiscoverConfig
from watcher.config.load import Config
from watcher.core.discovery import ListRead, discover, ref_of
from watcher.core.lifecycle import LifecycleOptions, checkpoint_interval, status_due, wants_final_poll
from watcher.core.models import (
    FetchedNotFound,
    FineTuneRef,
    HubFineTune,
    LifecycleState,
    PollNotFound,
    PollSuccess,
    SourceState,
)
from watcher.daemon.poller import PollReport, WatchedFineTune, Watcher
from watcher.daemon.source_reader import SourceReader
from watcher.errors import LeaseLost, PollError, StoreError
from watcher.store import LifecycleRecord
from watcher.store.replicas import ListedStatuses, ReplicaStore, SourceFence, source_lease_key

log = structlog.get_logger("watcher.lifecycle")
T = TypeVar("T")
SOURCE_PREFIX = "\x00source:"
SWEEP_KEY = "\x00lifecycle"
# changes outside a batch (e.g. the first polls after a start, finishing one by one) reschedule at most this often
RESCHEDULE_AFTER_S = 1.0


def sweep_interval(config: Config) -> float:
    """How often statuses and stalls are checked: a tenth of status_interval_s, between 0.5 and 5 s."""
    return min(5.0, max(0.5, config.lifecycle.status_interval_s / 10))


@dataclass(slots=True)
class _Source:
    """What the process knows about one source between reads."""

    state: SourceState | None = None  # once loaded
    failing: bool = False
    missing: bool = False


class LifecycleJobs:
    """The lifecycle and discovery jobs of one daemon (or of `once`): source reads, statuses, stalls."""

    def __init__(
        self,
        watcher: Watcher,
        *,
        scheduled: Callable[[str], float | None] | None = None,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.watcher = watcher
        self.on_change = on_change  # the intervals changed: reschedule
        self.scheduled = scheduled  # a key's interval in the PollDriver now
        self.clock = clock
        self.reader = SourceReader(self)
        self._sources: dict[str, _Source] = {}
        self._listed: set[str] = set()  # keys whose status a source's list keeps fresh
        self._batching = 0  # batches under way (list reads, sweeps): their changes make one reschedule at the end
        self._pending = False  # a change not rescheduled yet
        self._flush: asyncio.TimerHandle | None = None
        self._store_failing = False

    @property
    def config(self) -> Config:
        """The configuration in force."""
        return self.watcher.config

    @property
    def options(self) -> LifecycleOptions:
        """The lifecycle rules' options from [lifecycle]."""
        return LifecycleOptions(stall_after_s=self.config.lifecycle.stall_after_s)

    # --- the schedule ---------------------------------------------------------------------------------

    def interval_of(self, watched: WatchedFineTune, config: Config) -> float | None:
        """A fine-tune's checkpoint interval in its status (None: status reads only)."""
        status = watched.lifecycle.state.status if watched.lifecycle is not None else None
        checkpoints = self.watcher.store.load_cached(watched.ref.key).checkpoints
        return checkpoint_interval(
            status,
            (checkpoint.deployment_status for checkpoint in checkpoints.values()),
            interval_s=watched.interval_s,
            idle_interval_s=config.lifecycle.idle_interval_s,
        )

    def wanted(self, config: Config) -> dict[str, float]:
        """Every job of a config: checkpoint polls (adaptive), source reads, the status sweep."""
        wanted: dict[str, float] = {}
        for key, watched in self.watcher.fine_tunes.items():
            interval = self.interval_of(watched, config)
            if interval is not None:
                wanted[key] = interval
            elif not watched.health.polls:
                watched.health.deferred = True  # no checkpoint poll in this status: ready without one
        for source in config.discover:
            if self.reads(source):  # replicas: only the sources whose lease this one holds
                wanted[SOURCE_PREFIX + source.name] = source.interval_s
        if self.watcher.fine_tunes or config.discover:
            wanted[SWEEP_KEY] = sweep_interval(config)
        return wanted

    def update_metrics(self) -> None:
        """oxen_watcher_watched_fine_tunes{source} and oxen_fine_tune_status for what is watched now."""
        metrics = self.watcher.metrics
        if metrics is None or not self.watcher.commit:
            return
        counts: dict[str, int] = {"config": 0} if self.config.fine_tunes else {}
        counts.update({source.name: 0 for source in self.config.discover})
        for watched in self.watcher.fine_tunes.values():
            counts[watched.source] = counts.get(watched.source, 0) + 1
            status = watched.lifecycle.state.status if watched.lifecycle is not None else None
            metrics.lifecycle.set_status(watched.ref, status)
        metrics.lifecycle.set_watched(counts)
        metrics.lifecycle.retain(self.watcher.fine_tunes)

    def _changed(self, watched: WatchedFineTune | None = None) -> None:
        """Intervals (or the watched set) changed: reschedule, once per batch of changes.

        Rescheduling and rewriting every gauge cost time in the number of fine-tunes, so one per change made a
        start-up quadratic (every fine-tune's first status is a change): a fine-tune's own status gauge is set at
        once, and the changes of a batch (a list read, a sweep) or of the next RESCHEDULE_AFTER_S reschedule once.
        """
        metrics = self.watcher.metrics
        if watched is not None and metrics is not None and self.watcher.commit and watched.watched:
            status = watched.lifecycle.state.status if watched.lifecycle is not None else None
            metrics.lifecycle.set_status(watched.ref, status)
        self._pending = True
        if self._batching or self._flush is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a caller outside the daemon): at once
            self._reschedule()
            return
        self._flush = loop.call_later(RESCHEDULE_AFTER_S, self._reschedule)

    def _reschedule(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if not self._pending or self._batching:
            return
        self._pending = False
        self.update_metrics()
        if self.on_change is not None:
            self.on_change()

    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        """Changes inside make one reschedule when the last batch under way ends."""
        self._batching += 1
        try:
            yield
        finally:
            self._batching -= 1
            if not self._batching and self._pending:
                self._reschedule()

    # --- jobs -------------------------------------------------------------------------------------------

    async def run(self, key: str) -> object:
        """The PollDriver's job: one checkpoint poll, source read or sweep; never raises (but cancellation)."""
        try:
            if key == SWEEP_KEY:
                await self.sweep()
                return None
            if key.startswith(SOURCE_PREFIX):
                return await self.read_source(key.removeprefix(SOURCE_PREFIX))
            result = await self.poll(key)
        except asyncio.CancelledError:
            raise
        except StoreError as err:  # the store failing: said once (the polls say it too), tried again next time
            if not self._store_failing:
                log.error("lifecycle.store_failed", job=key.lstrip("\x00"), error=str(err))
            self._store_failing = True
            return None
        except Exception as err:  # the top of a job: the next one still runs
            log.exception("lifecycle.job_crashed", job=key.lstrip("\x00"), error=type(err).__name__)
            return None
        if self._store_failing and isinstance(result, PollReport) and result.error is None:
            log.info("lifecycle.store_recovered")
            self._store_failing = False
        return result

    async def poll(self, key: str) -> PollReport | None:
        """A checkpoint poll, then the lifecycle's view of it (newest checkpoint, stall end, interval)."""
        report = await self.watcher.poll(key)
        watched = self.watcher.fine_tunes.get(key)
        if report is None or watched is None or not watched.watched:
            return report
        if isinstance(report.result, PollSuccess):  # the checkpoints may have changed
            await self.advance(watched, None)
            if self.scheduled is not None and self.interval_of(watched, self.config) != self.scheduled(key):
                self._changed()  # a deployment went transitional (or settled)
        return report

    async def load_records(self, keys: list[str] | None = None) -> None:
        """Read the persisted lifecycle of watched fine-tunes not loaded yet (at start, after adoptions)."""
        wanted = [k for k, w in self.watcher.fine_tunes.items() if w.lifecycle is None and (keys is None or k in keys)]
        if not wanted:
            return
        records = await self.watcher.in_store(self.watcher.store.load_lifecycle, wanted)
        for key in wanted:
            watched = self.watcher.fine_tunes.get(key)
            if watched is not None and watched.lifecycle is None:
                watched.lifecycle = records.get(key, LifecycleRecord(LifecycleState(), watched.source))

    async def advance(
        self, watched: WatchedFineTune, fine_tune: HubFineTune | None, *, at: float | None = None
    ) -> None:
        """Commit what a status read (or the committed checkpoints alone) changes, and publish its events; `at`:
        when the status was read (now when None)."""
        watcher = self.watcher
        committed = await self._commit(
            watched.ref.key,
            watcher.store.apply_lifecycle,
            watched.ref,
            fine_tune,
            options=self.options,
            now=self.clock() if at is None else at,
            source=watched.source,
            commit=watcher.commit,
            route=watcher.route,
        )
        if committed is None:
            return
        old = watched.lifecycle
        record = committed.record
        if old is not None and (old.status_at or 0.0) > (record.status_at or 0.0):
            # statuses read without a change are fresh in memory only (no write per list read)
            record = replace(record, status_at=old.status_at)
        watched.lifecycle = record
        metrics = watcher.metrics
        if metrics is not None and watcher.commit and watched.watched:
            metrics.state.set_first_seen(watched.ref.key, record.state.newest_step, record.state.newest_seen_at)
        for event in committed.events:
            self.watcher.publish(event)
        if watched.watched and (old is None or old.state.status != record.state.status):
            if old is not None and old.state.status is not None:
                log.info("lifecycle.status", fine_tune=watched.ref.key, status=record.state.status)
            self._changed(watched)

    async def _commit(self, key: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """A store write of one fine-tune; replicas: under its lease, as polls commit (None: another replica owns
        it now, or the commit was fenced)."""
        watcher = self.watcher
        owned, fence = watcher.lease_of(key)
        if not owned:
            return None
        try:
            return await watcher.in_store(fn, *args, **kwargs, fence=fence)
        except LeaseLost as err:  # another replica took the fine-tune over: nothing was committed
            log.warning("lifecycle.fenced", fine_tune=key, error=str(err))
            watcher.fenced(key, fence)
            return None

    async def observe_status(
        self, watched: WatchedFineTune, fine_tune: HubFineTune, *, at: float | None = None
    ) -> None:
        """A fresh status: on the way to a terminal one, the final checkpoints are committed first; `at`: when it
        was read (now when None; replicas: another replica's list read, its time)."""
        record = watched.lifecycle
        if record is None:
            await self.load_records([watched.ref.key])
            record = watched.lifecycle
        assert record is not None
        old = record.state
        if (
            old.status is not None
            and fine_tune.status == old.status
            and (fine_tune.error, fine_tune.started_at or old.started_at, fine_tune.finished_at or old.finished_at)
            == (old.error, old.started_at, old.finished_at)
        ):
            watched.lifecycle = replace(record, status_at=self.clock() if at is None else at)  # nothing to write
            return
        if wants_final_poll(old, fine_tune):
            report = await self.watcher.poll(watched.ref.key)  # committed before the status_changed event
            if report is None or not report.answered_200:
                log.warning("lifecycle.final_poll_failed", fine_tune=watched.ref.key, status=fine_tune.status)
        await self.advance(watched, fine_tune, at=at)

    async def refresh_status(self, watched: WatchedFineTune) -> None:
        """GET .../fine_tunes/{id}: a 404 is the existing fine_tune.not_found."""
        ref = watched.ref
        try:
            fine_tune = await self.watcher.client.get_fine_tune(ref.namespace, ref.repo, ref.id)
        except PollError as err:
            log.debug("lifecycle.status_failed", fine_tune=ref.key, error=err.message, http_status=err.http_status)
            return
        if isinstance(fine_tune, FetchedNotFound):
            await self.not_found(ref)
            if watched.lifecycle is not None:
                watched.lifecycle = replace(watched.lifecycle, status_at=self.clock())
            return
        await self.observe_status(watched, fine_tune)

    async def not_found(self, ref: FineTuneRef) -> None:
        """Commit a 404 like a checkpoint poll's (fine_tune.not_found once, until it answers again)."""
        watcher = self.watcher
        committed = await self._commit(
            ref.key,
            watcher.store.apply_poll,
            ref,
            PollNotFound(),
            options=watcher.options,
            now=self.clock(),
            commit=watcher.commit,
            route=watcher.route,
        )
        for event in committed.events if committed else ():
            watcher.publish(event)

    async def sweep(self) -> None:
        """Keep every status at most status_interval_s old, and check running fine-tunes for a stall."""
        await self.load_records()
        config = self.config
        now = self.clock()
        step = sweep_interval(config)
        due: list[WatchedFineTune] = []
        stalls: list[WatchedFineTune] = []
        for key, watched in list(self.watcher.fine_tunes.items()):
            record = watched.lifecycle
            if record is None:
                continue
            # a list read refreshes it: a GET only when that read is late (failing); else just in time
            late = max(2 * step, config.lifecycle.status_interval_s / 2)
            slack = config.watch.jitter_s + late if key in self._listed else -step
            if status_due(record.status_at, now=now, status_interval_s=config.lifecycle.status_interval_s + slack):
                due.append(watched)
            elif (
                config.lifecycle.stall_after_s > 0
                and (record.state.status or "").casefold() == "running"
                and not record.state.stalled
            ):
                stalls.append(watched)
        # at most half the Hub's request slots: the client's queue is first come first served, and at start-up
        # every fine-tune's status is due at once; queued in one burst, those reads held back every checkpoint poll
        slots = asyncio.Semaphore(max(1, config.hub.max_concurrency // 2))

        async def refresh(watched: WatchedFineTune) -> None:
            async with slots:
                await self.refresh_status(watched)

        with self._batch():  # e.g. at start-up every fine-tune's first status: one reschedule
            await asyncio.gather(*(refresh(watched) for watched in due))
            for watched in stalls:
                if watched.watched:
                    await self.advance(watched, None)

    async def once(self) -> None:
        """`once`: read every source, then the status of each fine-tune no list refreshed."""
        for source in self.config.discover:
            await self.run(SOURCE_PREFIX + source.name)
        await self.load_records()
        read_at = self.clock()
        stale = [
            watched
            for watched in self.watcher.fine_tunes.values()
            if watched.lifecycle is None
            or watched.lifecycle.status_at is None
            or watched.lifecycle.status_at < read_at - 1
        ]
        for outcome in await asyncio.gather(*(self.refresh_status(w) for w in stale), return_exceptions=True):
            if isinstance(outcome, StoreError):  # e.g. a read-only database from before lifecycle (--dry-run)
                log.error("lifecycle.store_failed", job="once", error=str(outcome))
            elif isinstance(outcome, BaseException):
                raise outcome

    # --- [[discover]] sources -------------------------------------------------------------------------

    async def list_fine_tunes(
        self,
        namespace: str,
        repo: str,
        *,
        page: int,
        page_size: int,
        created_by: str | None = None,
        status: str | None = None,
    ) -> tuple[HubFineTune, ...] | FetchedNotFound:
        """SourceReader's lister: the watcher's current client (a reload may replace it)."""
        return await self.watcher.client.list_fine_tunes(
            namespace, repo, page=page, page_size=page_size, created_by=created_by, status=status
        )

    def source_lease(self, source: DiscoverConfig) -> tuple[bool, SourceFence | None]:
        """Whether this process reads the source's list (replicas: it holds the source's lease), and the fence
        its read commits under (None on SQLite: every source is read here)."""
        ownership = self.watcher.ownership
        if ownership is None:
            return True, None
        key = source_lease_key(source.namespace, source.repo)
        held = ownership.source_fence(key)
        return held is not None, None if held is None else (key, *held)

    def reads(self, source: DiscoverConfig) -> bool:
        """Whether this process reads the source's list (replicas: it holds the source's lease)."""
        return self.source_lease(source)[0]

    def forget_source(self, name: str) -> None:
        """Drop what this process knows of a source: its next read starts from the stored state."""
        self._sources.pop(name, None)

    async def observe_listed(self, source: DiscoverConfig, listed: ListedStatuses) -> None:
        """Replicas: the statuses another replica's read of `source` listed, taken as this one's status reads (at
        that read's time) for the fine-tunes it owns whose status is older; the sweep then GETs only when those
        reads are late, as when this replica reads the list itself."""
        keys = {f"{source.namespace}/{source.repo}/{fine_tune.id}": fine_tune for fine_tune in listed.fine_tunes}
        if source.interval_s <= self.config.lifecycle.status_interval_s:
            self._listed |= set(keys)
        stale = [
            (watched, fine_tune)
            for key, fine_tune in keys.items()
            if (watched := self.watcher.fine_tunes.get(key)) is not None
            and watched.watched
            and (watched.lifecycle is None or (watched.lifecycle.status_at or 0.0) < listed.read_at)
        ]
        if not stale:
            return
        nested = self._batching  # inside a list read's batch: that one reschedules at its end
        if not nested:
            self._batching, self._pending = True, False
        try:
            for watched, fine_tune in stale:
                await self.observe_status(watched, fine_tune, at=listed.read_at)
        finally:
            if not nested:
                self._batching = False
                if self._pending:
                    self._changed()

    def unlist(self, source: DiscoverConfig) -> None:
        """This process no longer reads the source: its list keeps no status fresh here any more."""
        prefix = f"{source.namespace}/{source.repo}/"
        self._listed.difference_update([key for key in self._listed if key.startswith(prefix)])

    def baselined(self, name: str) -> bool:
        """Whether a source's first read has been committed (by this process or an earlier one)."""
        entry = self._sources.get(name)
        return entry is not None and entry.state is not None and entry.state.baselined

    async def read_source(self, name: str) -> ListRead | None:
        """Read a source's list: discovered events, what it watches now, and every listed status."""
        source = next((s for s in self.config.discover if s.name == name), None)
        if source is None:
            return None
        reads, fence = self.source_lease(source)
        if not reads:
            return None  # another replica holds the source's lease and reads it
        entry = self._sources.setdefault(name, _Source())
        if entry.state is None:
            entry.state = await self.watcher.in_store(self.watcher.store.load_source, name)
            if fence is not None:  # replicas: go on from what the source's previous reader watched
                await self._resume(name)
        mine = {key for key, (_, owner) in self.watcher.discovered.items() if owner == name}
        try:
            read = await self.reader.read(source, watched_ids=[self.watcher.discovered[k][0].id for k in mine])
        except PollError as err:
            if not entry.failing:
                log.warning("discover.list_failed", source=name, error=err.message, http_status=err.http_status)
            entry.failing = True
            return None
        if entry.failing:
            log.info("discover.list_recovered", source=name)
            entry.failing = False
        if isinstance(read, FetchedNotFound):
            if not entry.missing:
                log.warning("discover.repo_not_found", source=name, namespace=source.namespace, repo=source.repo)
            entry.missing = True
            for key in mine:
                if self.watcher.owns(key):  # replicas: each owner commits its own fine-tunes' 404
                    await self.not_found(self.watcher.discovered[key][0])
            return None
        entry.missing = False
        with self._batch():  # one reschedule at the end of a list read, not one per fine-tune in it
            try:
                await self._adopt(source, entry, read, mine, fence)
            except LeaseLost as err:  # another replica took the source over meanwhile: nothing was committed
                log.warning("discover.fenced", source=name, error=str(err))
                self._sources.pop(name, None)  # its state moved on: read it afresh if the lease comes back
                if self.watcher.ownership is not None and fence is not None:
                    self.watcher.ownership.fenced(fence[0], fence[2])
                return None
            if source.interval_s <= self.config.lifecycle.status_interval_s:
                self._listed |= {f"{source.namespace}/{source.repo}/{ft.id}" for ft in read.fine_tunes}
            for fine_tune in read.fine_tunes:
                watched = self.watcher.fine_tunes.get(f"{source.namespace}/{source.repo}/{fine_tune.id}")
                if watched is not None and watched.watched:
                    await self.observe_status(watched, fine_tune)
        return read

    async def _resume(self, name: str) -> None:
        watcher = self.watcher
        if not isinstance(watcher.store, ReplicaStore):  # a fence comes only from a replica-aware store's leases
            return
        stored = await watcher.in_store(watcher.store.load_watching, [name])
        sources = {source.name for source in self.config.discover}
        for ref in stored.get(name, []):
            holder = watcher.discovered.get(ref.key)
            if holder is None or holder[1] not in sources:
                watcher.discovered[ref.key] = (ref, name)

    async def _adopt(
        self, source: DiscoverConfig, entry: _Source, read: ListRead, mine: set[str], fence: SourceFence | None
    ) -> None:
        watcher = self.watcher
        now = self.clock()
        before = set(watcher.discovered)
        result = discover(source, entry.state or SourceState(), read, now=now, baseline=self.config.watch.baseline)
        refs = {fine_tune.id: ref_of(source, fine_tune) for fine_tune in result.watch}
        announced = {fine_tune.id for fine_tune in result.new} if result.events else set()
        pairs = [(refs[ft.id], draft) for ft, draft in zip(reversed(result.new), result.events, strict=False)]
        listed = {f"{source.namespace}/{source.repo}/{ft.id}" for ft in read.fine_tunes}
        # one that no longer matches (aged out, filtered) goes; one missing from this read stays (not gone)
        now_mine = {ref.key: (ref, source.name) for ref in refs.values()}
        now_mine.update({key: watcher.discovered[key] for key in mine if key not in listed})
        # replicas: under the source's lease, with what it watches now (the other replicas claim from that)
        watching = None if fence is None else [ref for ref, _ in now_mine.values()]
        statuses = None if fence is None else ListedStatuses(read_at=now, fine_tunes=read.fine_tunes)
        events = await watcher.in_store(
            watcher.store.apply_discovery,
            source.name,
            result.state,
            pairs,
            now=now,
            sources=[(ref, fine_tune_id in announced) for fine_tune_id, ref in refs.items()],
            commit=watcher.commit,
            route=watcher.route,
            fence=fence,
            watching=watching,
            listed=statuses,
        )
        entry.state = result.state
        for event in events:
            watcher.publish(event)
        for key, value in now_mine.items():
            owner = watcher.discovered.get(key)
            if owner is not None and owner[1] != source.name and owner[1] in {s.name for s in self.config.discover}:
                continue  # another source found it first
            watcher.discovered[key] = value
        gone = [key for key in mine if key not in now_mine]
        for key in gone:
            del watcher.discovered[key]
        # replicas: a fine-tune found here is watched by whichever replica claims it
        added = [key for key in now_mine if key not in watcher.fine_tunes and watcher.owns(key)]
        news = added if watcher.ownership is None else [key for key in now_mine if key not in before]
        if news:
            log.info("discover.watching", source=source.name, added=len(news), removed=len(gone))
        if added or gone:
            records = await watcher.in_store(watcher.store.load_lifecycle, added)
            watcher.set_fine_tunes(self.config)
            for key in added:
                watched = watcher.fine_tunes.get(key)
                if watched is not None and watched.lifecycle is None:
                    watched.lifecycle = records.get(key, LifecycleRecord(LifecycleState(), watched.source))
            self._changed()
