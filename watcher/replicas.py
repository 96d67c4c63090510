"""Replicas on PostgreSQL: the lease keeper that decides which fine-tunes this process polls and delivers.

Every `renew_s` the keeper renews its leases (one missing from the answer was taken over: `expired`), gives up
those above its fair share (`released`) and claims free or expired ones up to it (`acquired`). The watcher then
holds only the owned fine-tunes (so health, readiness and per-fine-tune gauges cover only them), the poll driver
schedules only them, each poll commits under its lease's epoch (a `fenced` commit drops the fine-tune at once),
and the dispatcher delivers only their lanes. On SQLite there is one process and no keeper: it owns everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
import structlog

from .errors import StoreError
from .metrics import Metrics
from .store.leases import Claim, Lease, Leases, PostgresLeases
from .store.postgres_base import store_error

if TYPE_CHECKING:
    from .app import App
    from .dispatch import Dispatcher
    from .poller import Watcher

log = structlog.get_logger("watcher.replicas")
T = TypeVar("T")
RETENTION_LOCK = 0x6F78_6E77_7265_7401  # pg advisory lock key: one replica prunes at a time


@dataclass(frozen=True, slots=True)
class Round:
    """What one renewal round found in the database."""

    renewed: tuple[Lease, ...]
    released: tuple[str, ...]
    claim: Claim
    unowned: int


class LeaseKeeper:
    """Holds this replica's leases; tells the watcher which fine-tunes it owns, at which epoch."""

    def __init__(
        self,
        leases: Leases,
        *,
        keys: Callable[[], Collection[str]],
        lease_s: float,
        renew_s: float,
        metrics: Metrics | None = None,
        pool_stats: Callable[[], dict[str, int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.leases = leases
        self.replica = leases.replica
        self._keys = keys
        self.lease_s = lease_s
        self.renew_s = renew_s
        self._metrics = metrics
        self._pool_stats = pool_stats
        self._clock = clock
        self.owned: dict[str, int] = {}  # fine-tune key -> epoch of the lease held
        self.last_ok = clock()  # when the last successful round started (leases good for lease_s from then)
        self.failing_since: float | None = None  # a round failed (database unreachable) since then
        self._attempt: float | None = None  # a round in progress since then
        self.live = 0
        self.on_change: Callable[[Collection[str]], Any] | None = None  # set by the app: (acquired keys) -> awaitable
        self.on_lost: Callable[[Collection[str]], None] | None = None  # set by the app: leases gone
        self._executor = ThreadPoolExecutor(1, "leases")

    # --- what the rest of the daemon asks ---------------------------------------------------------------

    def owns(self, key: str) -> bool:
        """Whether this replica holds the fine-tune's lease (as of its last round)."""
        return key in self.owned

    def fence(self, key: str) -> tuple[str, int] | None:
        """(replica, epoch) a poll of this fine-tune commits under; None when not owned."""
        epoch = self.owned.get(key)
        return None if epoch is None or self.stale() else (self.replica, epoch)

    def lanes(self) -> list[str]:
        """The fine-tunes whose outbox lanes this replica delivers: the owned ones, while the leases are fresh."""
        return [] if self._clock() - self.last_ok > self.lease_s else sorted(self.owned)

    def stale(self) -> bool:
        """Renewing has been failing past the lease deadline: the replica polls and delivers nothing."""
        now = self._clock()
        failing = self.failing_since is not None or (self._attempt is not None and now - self._attempt > self.renew_s)
        return failing and now - self.last_ok > self.lease_s

    def problem(self) -> str | None:
        """The liveness problem, if any."""
        if not self.stale():
            return None
        return f"lease renewals failing for {self._clock() - self.last_ok:.0f}s (lease {self.lease_s:g}s)"

    # --- the rounds ------------------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: fn(*args))

    def _round(self, keys: Sequence[str]) -> Round:
        renewed = self.leases.renew()
        released = self.leases.release_excess(keys)
        claim = self.leases.claim(keys)
        return Round(tuple(renewed), tuple(released), claim, self.leases.unowned(keys))

    async def step(self) -> None:
        """One round: renew, release the excess, claim the fair share; apply what changed."""
        keys = sorted(self._keys())
        started = self._attempt = self._clock()
        try:
            found = await self._call(self._round, keys)
        except StoreError as err:
            self._attempt = None
            self._failed(err)
            return
        finally:
            self._report_pool()
        self._attempt = None
        self.last_ok = started
        if self.failing_since is not None:
            log.info("replica.renew_recovered", replica=self.replica)
            self.failing_since = None
        held = {lease.key: lease.epoch for lease in found.renewed}
        for key in found.released:
            held.pop(key, None)
        expired = [key for key in self.owned if key not in held and key not in found.released]
        readopted = [key for key in held if key not in self.owned]  # leases kept through an outage
        for lease in found.claim.acquired:
            held[lease.key] = lease.epoch
        acquired = sorted({*readopted, *(lease.key for lease in found.claim.acquired)})
        released = [key for key in found.released if key in self.owned]
        self.owned = held
        self.live = found.claim.live
        self._count("expired", len(expired))
        self._count("released", len(released))
        self._count("acquired", len(acquired))
        if expired or released or acquired:
            log.info(
                "replica.leases_changed",
                replica=self.replica,
                acquired=len(acquired),
                released=len(released),
                expired=len(expired),
                owned=len(held),
                live=found.claim.live,
                share=found.claim.share,
            )
        if self._metrics is not None:
            self._metrics.leases_owned.set(len(held))
            self._metrics.replicas_live.set(found.claim.live)
            self._metrics.fine_tunes_unowned.set(found.unowned)
        if (expired or released) and self.on_lost is not None:
            self.on_lost([*expired, *released])
        if acquired and self.on_change is not None:
            await self.on_change(acquired)

    def _failed(self, err: StoreError) -> None:
        if self.failing_since is None:
            self.failing_since = self._clock()
            log.error("replica.renew_failed", replica=self.replica, error=str(err))
        if self.stale() and self.owned:
            lost = list(self.owned)
            self.owned = {}
            self._count("expired", len(lost))
            log.error(
                "replica.stopped",
                replica=self.replica,
                leases=len(lost),
                hint="renewing failed past the lease deadline: no polls or deliveries until the database answers",
            )
            if self._metrics is not None:
                self._metrics.leases_owned.set(0)
            if self.on_lost is not None:
                self.on_lost(lost)

    def fenced(self, key: str, epoch: int | None = None) -> None:
        """A poll's commit was refused: the lease moved on; drop the fine-tune now (the next round confirms)."""
        self._count("fenced", 1)
        if key in self.owned and (epoch is None or self.owned[key] == epoch):
            del self.owned[key]
            if self._metrics is not None:
                self._metrics.leases_owned.set(len(self.owned))
            if self.on_lost is not None:
                self.on_lost([key])

    def _count(self, change: str, n: int) -> None:
        if n and self._metrics is not None:
            self._metrics.lease_changes.labels(change).inc(n)

    def _report_pool(self) -> None:
        if self._metrics is None or self._pool_stats is None:
            return
        stats = self._pool_stats()
        self._metrics.db_pool_size.set(stats.get("pool_size", 0))
        self._metrics.db_pool_waiting.set(stats.get("requests_waiting", 0))

    async def run_forever(self) -> None:
        """A round every renew_s until cancelled; never raises out of a round (but for cancellation)."""
        while True:
            await asyncio.sleep(self.renew_s)
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # the top of a job: the next round still runs
                log.exception("replica.round_crashed", replica=self.replica)

    async def leave(self) -> None:
        """On shutdown: release every lease and stop counting as live."""
        try:
            await self._call(self.leases.leave)
        except StoreError as err:
            log.warning("replica.leave_failed", replica=self.replica, error=str(err))
        else:
            self._count("released", len(self.owned))
            log.info("replica.left", replica=self.replica, released=len(self.owned))
        self.owned = {}
        self._executor.shutdown(wait=False)


class AdvisoryGate:
    """A session advisory lock held on one pool connection: one replica at a time runs what it guards."""

    def __init__(self, pool: Any, key: int = RETENTION_LOCK) -> None:
        self._pool = pool
        self._key = key
        self._conn: Any = None

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another replica holds it."""
        try:
            conn = self._pool.getconn()
        except psycopg.Error as err:
            raise store_error("cannot take the retention lock", err) from err
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self._key,)).fetchone()
        except psycopg.Error as err:
            self._pool.putconn(conn)
            raise store_error("cannot take the retention lock", err) from err
        if not (row and row[0]):
            self._pool.putconn(conn)
            return False
        self._conn = conn
        return True

    def release(self) -> None:
        """Give the lock back (a lost connection released it already)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with contextlib.suppress(Exception):
            conn.execute("SELECT pg_advisory_unlock(%s)", (self._key,))
        self._pool.putconn(conn)


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
        keys=lambda: [ft.key for ft in watcher.config.fine_tunes],
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
    log.info("replica.joining", replica=keeper.replica, lease_s=state.lease_s, renew_s=state.renew_s)
    return keeper


def claim_for_once(watcher: Watcher, dispatcher: Dispatcher) -> PostgresLeases:
    """`once` on PostgreSQL: claim only free or expired leases (running replicas keep theirs), poll and deliver
    only those; the caller calls `leave()` on the returned leases when it exits."""
    import os

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
    return leases
