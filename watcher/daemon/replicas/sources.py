"""Replicas and [[discover]] sources: one replica at a time reads a source's list; all of them share its fine-tunes.

A source's list is read by the replica holding the source's lease (one per repository, `source:<namespace>/<repo>`
in the lease table, renewed and shared out in the lease keeper's rounds). That replica commits the read under the
lease's epoch (a stale owner is fenced like a stale poll) together with what the source watches now. After each
lease round every other replica reads that back from the database, so every replica knows the full set of
fine-tunes and claims its fair share of them, the discovered like the listed. On SQLite none of this runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Sequence

import structlog

from watcher.config.discovery import DiscoverConfig
from watcher.core.models import FineTuneRef
from watcher.daemon.lifecycle_jobs import LifecycleJobs
from watcher.daemon.poller import Watcher
from watcher.daemon.replicas.keeper import LeaseKeeper
from watcher.errors import StoreError
from watcher.store.replicas import ListedStatuses, ReplicaStore, source_lease_key

log = structlog.get_logger("watcher.replicas")
Discovered = dict[str, tuple[FineTuneRef, str]]


def lease_key(source: DiscoverConfig) -> str:
    """The key of a source's lease."""
    return source_lease_key(source.namespace, source.repo)


def watched_keys(watcher: Watcher) -> set[str]:
    """Every fine-tune this replica's config wants watched: the listed ones and what its sources watch now."""
    config = watcher.config
    sources = {source.name for source in config.discover}
    found = {key for key, (_, source) in watcher.discovered.items() if source in sources}
    return found | {fine_tune.key for fine_tune in config.fine_tunes}


def merge(
    sources: Sequence[DiscoverConfig],
    current: Discovered,
    read_here: Callable[[DiscoverConfig], bool],
    stored: dict[str, list[FineTuneRef]],
) -> Discovered:
    """What the sources watch: as this process read it for the sources it reads, as the database says for the
    others. A fine-tune two sources watch stays with the one that has it now (else the first in the config)."""
    listing: dict[str, list[tuple[FineTuneRef, str]]] = {}
    for source in sources:
        if read_here(source):
            refs = [ref for ref, owner in current.values() if owner == source.name]
        else:
            refs = stored.get(source.name, [])
        for ref in refs:
            listing.setdefault(ref.key, []).append((ref, source.name))
    merged: Discovered = {}
    for key, candidates in listing.items():
        holder = current.get(key)
        kept = [entry for entry in candidates if holder is not None and entry[1] == holder[1]]
        merged[key] = (kept or candidates)[0]
    return merged


class SourceShare:
    """The sources' half of a replica: which source leases it wants, what the sources others read watch now."""

    def __init__(
        self,
        watcher: Watcher,
        lifecycle: LifecycleJobs,
        keeper: LeaseKeeper,
        *,
        store: ReplicaStore,
        reschedule: Callable[[], None],
    ) -> None:
        self.watcher = watcher
        self.lifecycle = lifecycle
        self.keeper = keeper
        self.store = store
        self.reschedule = reschedule
        self._failing = False
        self._listed_at: dict[str, float] = {}  # per source read by another replica: the read last taken in
        self._applying: asyncio.Task[None] | None = None

    def lease_keys(self) -> list[str]:
        """The leases of the configured sources (the keeper claims its share of them)."""
        return sorted({lease_key(source) for source in self.watcher.config.discover})

    def reads(self, source: DiscoverConfig) -> bool:
        """Whether this replica holds the source's lease (as of its last round)."""
        return lease_key(source) in self.keeper.sources_owned

    async def refresh(self) -> None:
        """Learn what the sources other replicas read watch now (after each lease round: the next one claims
        them); a failing database is said once, and the next round tries again."""
        watcher = self.watcher
        others = [source.name for source in watcher.config.discover if not self.reads(source)]
        try:
            # not on the store's thread: a queue of poll commits there must not hold the lease rounds up
            stored, listed = await asyncio.to_thread(self._load, others) if others else ({}, {})
        except StoreError as err:
            if not self._failing:
                log.warning("replica.sources_unread", error=str(err))
            self._failing = True
            return
        if self._failing:
            log.info("replica.sources_read")
            self._failing = False
        merged = merge(watcher.config.discover, watcher.discovered, self.reads, stored)
        if merged != watcher.discovered and watcher.set_discovered(merged):
            self.reschedule()
        # the statuses their readers listed stand for this replica's status reads of what it owns among them; beside
        # the lease rounds (a status change commits, maybe after a final poll: the renewals must not wait for it)
        if listed and (self._applying is None or self._applying.done()):
            self._applying = asyncio.create_task(self._apply(listed), name="listed-statuses")

    async def _apply(self, listed: dict[str, ListedStatuses]) -> None:
        for source in self.watcher.config.discover:
            found = listed.get(source.name)
            if found is None or found.read_at <= self._listed_at.get(source.name, 0.0) or self.reads(source):
                continue
            try:
                await self.lifecycle.observe_listed(source, found)
            except Exception as err:  # the top of a task: the next round takes the read in again
                log.warning("replica.listed_statuses_failed", source=source.name, error=str(err), exc_info=err)
                continue
            self._listed_at[source.name] = found.read_at

    def _load(self, names: Sequence[str]) -> tuple[dict[str, list[FineTuneRef]], dict[str, ListedStatuses]]:
        return self.store.load_watching(names), self.store.load_listed(names)

    def changed(self, acquired: Collection[str], lost: Collection[str]) -> None:
        """The keeper's round moved source leases: read the new ones afresh, stop reading the lost ones."""
        lifecycle = self.lifecycle
        for source in self.watcher.config.discover:
            key = lease_key(source)
            if key in acquired:
                lifecycle.forget_source(source.name)  # another replica moved its state on meanwhile
            if key in lost:
                lifecycle.unlist(source)  # their statuses come from single reads (or their owner's) now
        self.reschedule()
