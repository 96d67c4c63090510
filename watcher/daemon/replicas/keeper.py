"""Replicas on PostgreSQL: the lease keeper that decides which fine-tunes this process polls and delivers.

Every `renew_s` the keeper renews its leases (one missing from the answer was taken over: `expired`), gives up
those above its fair share (`released`) and claims free or expired ones up to it (`acquired`). The watcher then
holds only the owned fine-tunes (so health, readiness and per-fine-tune gauges cover only them), the poll driver
schedules only them, each poll commits under its lease's epoch (a `fenced` commit drops the fine-tune at once),
and the dispatcher delivers only their lanes. The [[discover]] sources' leases go the same rounds, with a fair
share of their own: only the owner of a source reads its list (sources.py). On SQLite there is one process
and no keeper: it owns everything. The wiring into the daemon and `once` is in wiring.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import structlog

from watcher.errors import StoreError
from watcher.observe.metrics import Metrics
from watcher.store.postgres.leases import Claim, Lease, Leases, is_source_lease

log = structlog.get_logger("watcher.replicas")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Round:
    """What one renewal round found in the database."""

    renewed: tuple[Lease, ...]
    released: tuple[str, ...]
    claim: Claim
    unowned: int
    sources_released: tuple[str, ...] = ()
    sources_acquired: tuple[Lease, ...] = ()


@dataclass(frozen=True, slots=True)
class _Changes:
    """What one round changed for one kind of lease (fine-tunes or sources)."""

    held: dict[str, int]
    expired: list[str]
    released: list[str]
    acquired: list[str]


def _changes(
    owned: dict[str, int], renewed: Sequence[Lease], released: Sequence[str], acquired: Sequence[Lease]
) -> _Changes:
    held = {lease.key: lease.epoch for lease in renewed}
    for key in released:
        held.pop(key, None)
    expired = [key for key in owned if key not in held and key not in released]
    readopted = [key for key in held if key not in owned]  # leases kept through an outage
    for lease in acquired:
        held[lease.key] = lease.epoch
    gained = sorted({*readopted, *(lease.key for lease in acquired)})
    return _Changes(held, expired, [key for key in released if key in owned], gained)


class LeaseListener(Protocol):
    """What a lease keeper shares out and whom it tells of the changes of its rounds (replicas/wiring.py)."""

    def wanted(self) -> Collection[str]:
        """Every fine-tune this replica's config wants watched (the keeper claims its share of them)."""
        ...

    def source_keys(self) -> Collection[str]:
        """The lease keys of the configured [[discover]] sources."""
        ...

    def lost(self, keys: Collection[str]) -> None:
        """These fine-tunes' leases are gone (expired, released or fenced)."""
        ...

    def sources_changed(self, acquired: Collection[str], lost: Collection[str]) -> None:
        """Source leases moved: read the acquired ones afresh, stop reading the lost ones."""
        ...

    async def acquired(self, keys: Collection[str]) -> None:
        """These fine-tunes' leases were acquired: watch them."""
        ...

    async def after_round(self) -> None:
        """After each good round (e.g. learn what the sources other replicas read watch now)."""
        ...


class _NoListener:
    """Until attach(): nothing wanted, nothing to tell."""

    def wanted(self) -> Collection[str]:
        return ()

    def source_keys(self) -> Collection[str]:
        return ()

    def lost(self, keys: Collection[str]) -> None:
        pass

    def sources_changed(self, acquired: Collection[str], lost: Collection[str]) -> None:
        pass

    async def acquired(self, keys: Collection[str]) -> None:
        pass

    async def after_round(self) -> None:
        pass


class LeaseKeeper:
    """Holds this replica's leases; tells the watcher which fine-tunes it owns, at which epoch."""

    def __init__(
        self,
        leases: Leases,
        *,
        lease_s: float,
        renew_s: float,
        metrics: Metrics | None = None,
        pool_stats: Callable[[], dict[str, int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.leases = leases
        self.replica = leases.replica
        self.lease_s = lease_s
        self.renew_s = renew_s
        self._metrics = metrics
        self._pool_stats = pool_stats
        self._clock = clock
        self._listener: LeaseListener = _NoListener()
        self.owned: dict[str, int] = {}  # fine-tune key -> epoch of the lease held
        self.sources_owned: dict[str, int] = {}  # source lease key -> epoch
        self.last_ok = clock()  # when the last successful round started (leases good for lease_s from then)
        self.failing_since: float | None = None  # a round failed (database unreachable) since then
        self._attempt: float | None = None  # a round in progress since then
        self.live = 0
        self.leads = False  # the first live replica by name: it delivers the lanes of fine-tunes nobody leases
        self._executor = ThreadPoolExecutor(1, "leases")

    def attach(self, listener: LeaseListener) -> None:
        """Give the keeper what it shares out and whom it tells of changes (once, before the first round)."""
        if not isinstance(self._listener, _NoListener):
            raise RuntimeError("a lease keeper takes one listener")
        self._listener = listener

    # --- what the rest of the daemon asks ---------------------------------------------------------------

    def owns(self, key: str) -> bool:
        """Whether this replica holds the fine-tune's lease (as of its last round)."""
        return key in self.owned

    def fence(self, key: str) -> tuple[str, int] | None:
        """(replica, epoch) a poll of this fine-tune commits under; None when not owned."""
        epoch = self.owned.get(key)
        return None if epoch is None or self.stale() else (self.replica, epoch)

    def source_fence(self, key: str) -> tuple[str, int] | None:
        """(replica, epoch) a read of a source commits under; None when another replica reads it."""
        epoch = self.sources_owned.get(key)
        return None if epoch is None or self.stale() else (self.replica, epoch)

    def lanes(self) -> list[str]:
        """The fine-tunes whose outbox lanes this replica delivers: the owned ones, while the leases are fresh."""
        return [] if self._clock() - self.last_ok > self.lease_s else sorted(self.owned)

    def unowned_lanes(self) -> bool:
        """Whether this replica delivers the lanes of fine-tunes nobody leases (removed from every config, aged
        out of their source, released): the first live replica by name does, while its leases are fresh."""
        return self.leads and self._clock() - self.last_ok <= self.lease_s

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

    def _round(self, keys: Sequence[str], sources: Sequence[str]) -> Round:
        renewed = self.leases.renew()
        released = self.leases.release_excess(keys)
        claim = self.leases.claim(keys)
        found = Round(tuple(renewed), tuple(released), claim, self.leases.unowned(keys))
        if not sources and not any(is_source_lease(lease.key) for lease in renewed):
            return found  # no source configured, none held: two transactions saved
        sources_released = self.leases.release_excess(sources, sources=True)
        sources_claim = self.leases.claim(sources)
        return Round(
            found.renewed, found.released, claim, found.unowned, tuple(sources_released), sources_claim.acquired
        )

    async def step(self) -> None:
        """One round: renew, release the excess, claim the fair share (of fine-tunes, then of sources); apply what
        changed, then run `after_round`."""
        listener = self._listener
        keys = sorted(listener.wanted())
        sources = sorted(listener.source_keys())
        started = self._attempt = self._clock()
        try:
            found = await self._call(self._round, keys, sources)
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
        fine_tunes = [lease for lease in found.renewed if not is_source_lease(lease.key)]
        changed = _changes(self.owned, fine_tunes, found.released, found.claim.acquired)
        held, expired, released, acquired = changed.held, changed.expired, changed.released, changed.acquired
        self.owned = held
        self.live = found.claim.live
        self.leads = found.claim.leader == self.replica
        changed_sources = self._sources_round(found)
        for change in ("expired", "released", "acquired"):
            self._count(change, len(getattr(changed, change)) + len(getattr(changed_sources, change)))
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
            self._metrics.leases_owned.set(len(held) + len(self.sources_owned))
            self._metrics.replicas_live.set(found.claim.live)
            self._metrics.fine_tunes_unowned.set(found.unowned)
        if expired or released:
            listener.lost([*expired, *released])
        lost_sources = [*changed_sources.expired, *changed_sources.released]
        if changed_sources.acquired or lost_sources:
            listener.sources_changed(changed_sources.acquired, lost_sources)
        if acquired:
            await self._take_over(listener, acquired)
        await listener.after_round()  # e.g. learn what other replicas' sources found: claimed next round

    async def _take_over(self, listener: LeaseListener, keys: Sequence[str]) -> None:
        try:
            await listener.acquired(keys)
        except asyncio.CancelledError:
            raise
        except Exception:  # e.g. the state of a taken-over fine-tune could not be read
            # a lease renewed while nothing polls its fine-tune strands it: give the leases back, for another
            # replica (or this one, next round) to take over and load afresh
            for key in keys:
                self.owned.pop(key, None)
            if self._metrics is not None:
                self._metrics.leases_owned.set(len(self.owned) + len(self.sources_owned))
            listener.lost(keys)
            log.exception("replica.takeover_failed", replica=self.replica, fine_tunes=len(keys))
            try:
                released = await self._call(self.leases.release, list(keys))
            except StoreError as release_err:
                # still ours in the database: the next round renews them, finds them not held here and loads them
                log.warning("replica.release_failed", replica=self.replica, error=str(release_err))
            else:
                self._count("released", len(released))

    def _sources_round(self, found: Round) -> _Changes:
        renewed = [lease for lease in found.renewed if is_source_lease(lease.key)]
        changed = _changes(self.sources_owned, renewed, found.sources_released, found.sources_acquired)
        self.sources_owned = changed.held
        if changed.expired or changed.released or changed.acquired:
            log.info(
                "replica.sources_changed",
                replica=self.replica,
                acquired=changed.acquired,
                released=changed.released,
                expired=changed.expired,
                owned=len(changed.held),
            )
        return changed

    def _failed(self, err: StoreError) -> None:
        if self.failing_since is None:
            self.failing_since = self._clock()
            log.error("replica.renew_failed", replica=self.replica, error=str(err))
        if not self.stale() or not (self.owned or self.sources_owned):
            return
        lost, sources = list(self.owned), list(self.sources_owned)
        self.owned, self.sources_owned = {}, {}
        self._count("expired", len(lost) + len(sources))
        log.error(
            "replica.stopped",
            replica=self.replica,
            leases=len(lost),
            sources=len(sources),
            hint="renewing failed past the lease deadline: no polls, reads or deliveries until the database answers",
        )
        if self._metrics is not None:
            self._metrics.leases_owned.set(0)
        if sources:
            self._listener.sources_changed((), sources)
        if lost:
            self._listener.lost(lost)

    def fenced(self, key: str, epoch: int | None = None) -> None:
        """A poll's (or a source read's) commit was refused: the lease moved on; drop it now (the next round
        confirms)."""
        self._count("fenced", 1)
        held = self.sources_owned if is_source_lease(key) else self.owned
        if key not in held or (epoch is not None and held[key] != epoch):
            return
        del held[key]
        if self._metrics is not None:
            self._metrics.leases_owned.set(len(self.owned) + len(self.sources_owned))
        if held is self.sources_owned:
            self._listener.sources_changed((), [key])
        else:
            self._listener.lost([key])

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
            self._count("released", len(self.owned) + len(self.sources_owned))
            log.info("replica.left", replica=self.replica, released=len(self.owned) + len(self.sources_owned))
        self.owned = {}
        self.sources_owned = {}
        self._executor.shutdown(wait=False)
