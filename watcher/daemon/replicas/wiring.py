"""Replicas wired into the daemon and into `once`: the lease keeper (keeper.py) decides what this process polls,
reads and delivers; the sources' half is in sources.py. Everything here is built whole: the keeper (or `once`'s
claim) is the Ownership the watcher, the lifecycle jobs and the dispatcher get when they are built, and the keeper
learns of them through one `attach` of its LeaseListener."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection

import structlog

from watcher.config.load import Config
from watcher.daemon.lifecycle_jobs import LifecycleJobs
from watcher.daemon.poller import Watcher
from watcher.daemon.replicas.keeper import LeaseKeeper
from watcher.daemon.replicas.sources import SourceShare, lease_key, watched_keys
from watcher.errors import StoreError
from watcher.observe.metrics import Metrics
from watcher.store import Store
from watcher.store.replicas import Fence, Leases, ReplicaStore

log = structlog.get_logger("watcher.replicas")


def build_keeper(store: Store, config: Config, metrics: Metrics) -> LeaseKeeper | None:
    """The lease keeper of a daemon on a shared store (None on SQLite: the process owns everything)."""
    if not isinstance(store, ReplicaStore):
        return None
    state = config.state
    metrics.enable_replicas()
    return LeaseKeeper(
        store.leases(replica=state.replica_name(), lease_s=state.lease_s),
        lease_s=state.lease_s,
        renew_s=state.renew_s,
        metrics=metrics,
        pool_stats=store.pool_stats,
    )


class ReplicaRole:
    """The keeper's LeaseListener: what this replica wants leased, and what changes when its leases move.

    The watcher then holds (and the driver schedules) only owned fine-tunes, polls commit under their lease, the
    dispatcher delivers only their lanes, and the sources' leases decide which lists this replica reads."""

    def __init__(
        self,
        keeper: LeaseKeeper,
        store: ReplicaStore,
        watcher: Watcher,
        lifecycle: LifecycleJobs,
        *,
        reschedule: Callable[[], None],
        wake: Callable[[], None],
    ) -> None:
        self.watcher = watcher
        self.lifecycle = lifecycle
        self.store = store
        self.reschedule = reschedule
        self.wake = wake
        self.sources = SourceShare(watcher, lifecycle, keeper, store=store, reschedule=reschedule)
        self._unloaded: set[str] = set()  # acquired, their state not read yet: not scheduled until it is

    def wanted(self) -> Collection[str]:
        """The listed fine-tunes and what the sources watch now."""
        return watched_keys(self.watcher)

    def source_keys(self) -> Collection[str]:
        """The configured sources' lease keys."""
        return self.sources.lease_keys()

    def lost(self, keys: Collection[str]) -> None:
        """Drop them whole: health, metric series, schedule."""
        self.watcher.set_fine_tunes(self.watcher.config)
        for key in keys:
            self.watcher.store.forget(key)
        self.reschedule()

    async def acquired(self, keys: Collection[str]) -> None:
        """Watch them, from their state as the database has it now."""
        watcher = self.watcher
        for key in keys:
            watcher.store.forget(key)  # another replica moved the state on meanwhile: read it afresh
        watcher.set_fine_tunes(watcher.config)
        self._unloaded.update(keys)
        await self._load()

    async def _load(self) -> None:
        # a read that fails (the database just back from an outage) is retried after every round until it
        # succeeds: left alone, the fine-tune stayed leased and renewed, yet never scheduled, and a change the Hub
        # made meanwhile was never announced
        keys = sorted(key for key in self._unloaded if self.watcher.owns(key))
        self._unloaded = set(keys)
        if not keys:
            return
        try:
            await self.watcher.load(keys)  # hold-backs and the gauges of the newly owned fine-tunes
            await self.lifecycle.load_records(keys)  # a new run's checkpoints are announced, not baselined
        except StoreError as err:
            log.warning("replica.takeover_unread", fine_tunes=len(keys), error=str(err), hint="retried next round")
            return
        self._unloaded.difference_update(keys)
        self.reschedule()
        self.wake()

    def sources_changed(self, acquired: Collection[str], lost: Collection[str]) -> None:
        """Read newly leased sources afresh; stop reading lost ones."""
        self.sources.changed(acquired, lost)

    async def after_round(self) -> None:
        """Read the state of fine-tunes whose takeover read failed; learn what the sources other replicas read
        watch now."""
        await self._load()
        await self.sources.refresh()


def join(
    keeper: LeaseKeeper,
    store: ReplicaStore,
    watcher: Watcher,
    lifecycle: LifecycleJobs,
    *,
    reschedule: Callable[[], None],
    wake: Callable[[], None],
) -> None:
    """Attach this daemon's parts to its keeper (before the first round)."""
    keeper.attach(ReplicaRole(keeper, store, watcher, lifecycle, reschedule=reschedule, wake=wake))
    log.info("replica.joining", replica=keeper.replica, lease_s=keeper.lease_s, renew_s=keeper.renew_s)


class OnceClaim:
    """`once` on a shared store: the free or expired leases it claimed (running replicas keep theirs), of
    fine-tunes and of sources; it polls, reads and delivers only those. An Ownership."""

    def __init__(self, leases: Leases, *, owned: dict[str, int], sources: dict[str, int]) -> None:
        self.leases = leases
        self._owned = owned
        self._sources = sources

    def owns(self, key: str) -> bool:
        """Whether `once` claimed the fine-tune."""
        return key in self._owned

    def fence(self, key: str) -> Fence | None:
        """(replica, epoch) of a claimed fine-tune."""
        epoch = self._owned.get(key)
        return None if epoch is None else (self.leases.replica, epoch)

    def source_fence(self, key: str) -> Fence | None:
        """(replica, epoch) of a claimed source."""
        epoch = self._sources.get(key)
        return None if epoch is None else (self.leases.replica, epoch)

    def fenced(self, key: str, epoch: int | None = None) -> None:
        """A refused commit: `once` polls each fine-tune once, so there is nothing to drop."""

    @property
    def replica(self) -> str:
        """The name `once` claimed under."""
        return self.leases.replica

    def lanes(self) -> list[str]:
        """The claimed fine-tunes' lanes."""
        return sorted(self._owned)

    def unowned_lanes(self) -> bool:
        """Never: the daemons' first live replica delivers the lanes nobody leases."""
        return False

    def renew(self) -> None:
        """Extend the claimed leases (before delivering: polling may have outlasted them); one taken over meanwhile
        is dropped, its lane left to its new owner."""
        held = {lease.key: lease.epoch for lease in self.leases.renew()}
        self._owned = {key: epoch for key, epoch in self._owned.items() if held.get(key) == epoch}
        self._sources = {key: epoch for key, epoch in self._sources.items() if held.get(key) == epoch}

    def leave(self) -> None:
        """Release every claimed lease: the running replicas take them over at once."""
        self.leases.leave()


def claim_for_once(store: Store, config: Config) -> OnceClaim | None:
    """`once` on a shared store: claim only free or expired leases (None on SQLite: it owns everything); the
    caller calls `leave()` on the claim when it exits."""
    if not isinstance(store, ReplicaStore):
        return None
    state = config.state
    # a name of its own: `once` beside a daemon configured with the same replica name must not take its leases;
    # not counted: the daemons' fair share (and what they hold) must not change because `once` runs for a while
    leases = store.leases(replica=f"{state.replica_name()}.once-{os.getpid()}", lease_s=state.lease_s, counted=False)
    keys = [ft.key for ft in config.fine_tunes]
    owned = {lease.key: lease.epoch for lease in leases.claim(keys, up_to=len(keys)).acquired}
    sources = sorted({lease_key(source) for source in config.discover})  # one a running replica reads stays its
    read = {lease.key: lease.epoch for lease in leases.claim(sources, up_to=len(sources)).acquired}
    return OnceClaim(leases, owned=owned, sources=read)
