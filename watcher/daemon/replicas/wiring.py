"""Replicas wired into the daemon and into `once`: the lease keeper (replicas.py) decides what this process polls,
reads and delivers; the sources' half is in source_leases.py."""

from __future__ import annotations

import os
from collections.abc import Collection
from typing import TYPE_CHECKING

import structlog

from watcher.daemon.replicas.keeper import AdvisoryGate, LeaseKeeper
from watcher.daemon.replicas.sources import attach_sources, lease_key, watched_keys
from watcher.store.postgres.leases import PostgresLeases

if TYPE_CHECKING:
    from watcher.config.discovery import DiscoverConfig
    from watcher.daemon.app import App
    from watcher.daemon.lifecycle_jobs import LifecycleJobs
    from watcher.daemon.poller import Watcher
    from watcher.delivery.dispatch import Dispatcher

log = structlog.get_logger("watcher.replicas")


def attach(app: App) -> LeaseKeeper | None:
    """Wire a lease keeper into the daemon when the store is PostgreSQL (None on SQLite: it owns everything).

    The watcher then holds (and the driver schedules) only owned fine-tunes, polls commit under their lease, the
    dispatcher delivers only their lanes, and retention runs on one replica at a time.
    """
    state = app.config.state
    if not state.postgresql:
        return None
    watcher, store = app.watcher, app.watcher.store
    app.metrics.enable_replicas()
    leases = PostgresLeases(store.pool, replica=state.replica_name(), lease_s=state.lease_s)  # type: ignore[attr-defined]
    keeper = LeaseKeeper(
        leases,
        keys=lambda: watched_keys(watcher),  # the listed fine-tunes and what the sources watch now
        lease_s=state.lease_s,
        renew_s=state.renew_s,
        metrics=app.metrics,
        pool_stats=store.pool_stats,  # type: ignore[attr-defined]
    )

    def lost(keys: Collection[str]) -> None:
        watcher.set_fine_tunes(watcher.config)  # drops them whole: health, metric series, schedule below
        for key in keys:
            store.forget(key)
        app.reschedule(app.config)

    async def acquired(keys: Collection[str]) -> None:
        for key in keys:
            store.forget(key)  # another replica moved the state on meanwhile: read it afresh
        watcher.set_fine_tunes(watcher.config)
        await watcher.load(keys)  # hold-backs and the gauges of the newly owned fine-tunes
        await app.lifecycle.load_records(list(keys))  # a new run's checkpoints are announced, not baselined
        app.reschedule(app.config)
        app.dispatcher.wake()

    keeper.on_lost = lost
    keeper.on_change = acquired
    watcher.owns = keeper.owns
    watcher.fences = keeper.fence
    watcher.on_fenced = keeper.fenced
    watcher.set_fine_tunes(watcher.config)  # nothing owned until the first round
    app.dispatcher.lanes = keeper.lanes
    app.retention.gate = AdvisoryGate(store.pool)  # type: ignore[attr-defined]
    attach_sources(watcher, app.lifecycle, keeper, lambda: app.reschedule(app.config))
    log.info("replica.joining", replica=keeper.replica, lease_s=state.lease_s, renew_s=state.renew_s)
    return keeper


def claim_for_once(watcher: Watcher, dispatcher: Dispatcher, lifecycle: LifecycleJobs | None = None) -> PostgresLeases:
    """`once` on PostgreSQL: claim only free or expired leases (running replicas keep theirs), of fine-tunes and of
    sources; poll, read and deliver only those; the caller calls `leave()` on the returned leases when it exits."""
    state = watcher.config.state
    # a name of its own: `once` beside a daemon configured with the same replica name must not take its leases
    leases = PostgresLeases(
        watcher.store.pool,  # type: ignore[attr-defined]
        replica=f"{state.replica_name()}.once-{os.getpid()}",
        lease_s=state.lease_s,
    )
    keys = [ft.key for ft in watcher.config.fine_tunes]
    claim = leases.claim(keys, up_to=len(keys))
    owned = {lease.key: lease.epoch for lease in claim.acquired}
    watcher.owns = owned.__contains__
    watcher.fences = lambda key: (leases.replica, owned[key]) if key in owned else None
    watcher.set_fine_tunes(watcher.config)
    dispatcher.lanes = lambda: sorted(owned)
    if lifecycle is not None:  # a source a running replica reads is left to it
        sources = sorted({lease_key(source) for source in watcher.config.discover})
        read = {lease.key: lease.epoch for lease in leases.claim(sources, up_to=len(sources)).acquired}

        def fence(source: DiscoverConfig) -> tuple[str, str, int] | None:
            key = lease_key(source)
            return (key, leases.replica, read[key]) if key in read else None

        lifecycle.source_fence = fence
    return leases
