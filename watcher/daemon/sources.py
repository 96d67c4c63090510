"""The [[discover]] half of the lifecycle jobs: reading a source's list, adopting what it watches, and taking
the statuses it lists (lifecycle_poller.LifecycleJobs mixes it in).

Replicas (source_leases.py): a source is read only by the replica holding its lease, and the read commits under
that lease's epoch with what the source watches now, so the other replicas learn it from the database."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

import structlog

from watcher.config.discovery import DiscoverConfig
from watcher.config.load import Config
from watcher.core.discovery import ListRead, discover, ref_of
from watcher.core.models import FetchedNotFound, FineTuneRef, HubFineTune, LifecycleState, SourceState
from watcher.daemon.poller import WatchedFineTune, Watcher
from watcher.errors import LeaseLost, PollError
from watcher.store import LifecycleRecord

log = structlog.get_logger("watcher.lifecycle")
discovery_log = structlog.get_logger("watcher.discovery")


PAGE_SIZE = 100
MAX_PAGES = 10


class FineTuneLister(Protocol):
    """What discovery needs of the Hub client (HubClient.list_fine_tunes)."""

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
        """One page of a repository's fine-tunes, newest first."""
        ...


class SourceReader:
    """Reads sources' lists page by page; logs once per source when max_pages cuts a read short."""

    def __init__(self, client: FineTuneLister, *, page_size: int = PAGE_SIZE, max_pages: int = MAX_PAGES) -> None:
        self._client = client
        self._page_size = page_size
        self._max_pages = max_pages
        self._truncated: set[str] = set()

    async def read(self, source: DiscoverConfig, *, watched_ids: Collection[str] = ()) -> ListRead | FetchedNotFound:
        """Pages until a short page, every id in watched_ids was seen, or max_pages; PollError when a page fails."""
        seen: dict[str, HubFineTune] = {}
        missing = set(watched_ids)
        pages = 0
        complete = False
        while pages < self._max_pages:
            page = await self._client.list_fine_tunes(
                source.namespace,
                source.repo,
                page=pages + 1,
                page_size=self._page_size,
                created_by=source.created_by or None,
            )
            if isinstance(page, FetchedNotFound):
                return page
            pages += 1
            for fine_tune in page:
                seen.setdefault(fine_tune.id, fine_tune)  # a shifted list repeats entries: the first is newest
                missing.discard(fine_tune.id)
            if len(page) < self._page_size:
                complete = True
                break
            if watched_ids and not missing:
                break  # newest first: nothing new can be further down
        truncated = not complete and pages >= self._max_pages and (not watched_ids or bool(missing))
        if truncated and source.name not in self._truncated:
            self._truncated.add(source.name)
            discovery_log.warning("discover.list_truncated", source=source.name, pages=pages, fine_tunes=len(seen))
        elif not truncated and source.name in self._truncated:
            self._truncated.discard(source.name)
            discovery_log.info("discover.list_complete", source=source.name, pages=pages, fine_tunes=len(seen))
        return ListRead(tuple(seen.values()), pages, complete, truncated)


@dataclass(slots=True)
class _Source:
    """What the process knows about one source between reads."""

    state: SourceState | None = None  # once loaded
    failing: bool = False
    missing: bool = False


class SourceReads:
    """Source reads; the status and not-found handling come from LifecycleJobs."""

    watcher: Watcher
    reader: SourceReader
    clock: Callable[[], float] = time.time
    _sources: dict[str, _Source]
    _listed: set[str]  # keys whose status a source's list keeps fresh
    _batching: bool
    _pending: bool
    # replicas: the lease a read of this source commits under, (lease key, replica, epoch), None when another
    # replica reads it; and what to do when a read's commit was fenced. None on SQLite: every source is read here
    source_fence: Callable[[DiscoverConfig], tuple[str, str, int] | None] | None = None
    on_source_fenced: Callable[[str, int], None] | None = None

    @property
    def config(self) -> Config:
        """The configuration in force."""
        return self.watcher.config

    async def observe_status(self, watched: WatchedFineTune, fine_tune: HubFineTune) -> None:
        """LifecycleJobs: take in a fresh status."""
        raise NotImplementedError

    async def not_found(self, ref: FineTuneRef) -> None:
        """LifecycleJobs: commit a 404."""
        raise NotImplementedError

    def _changed(self) -> None:
        raise NotImplementedError

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

    def reads(self, source: DiscoverConfig) -> bool:
        """Whether this process reads the source's list (replicas: it holds the source's lease)."""
        return self.source_fence is None or self.source_fence(source) is not None

    def forget_source(self, name: str) -> None:
        """Drop what this process knows of a source: its next read starts from the stored state."""
        self._sources.pop(name, None)

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
        fence = self.source_fence(source) if self.source_fence is not None else None
        if self.source_fence is not None and fence is None:
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
            owns = self.watcher.owns
            for key in mine:
                if owns is None or owns(key):  # replicas: each owner commits its own fine-tunes' 404
                    await self.not_found(self.watcher.discovered[key][0])
            return None
        entry.missing = False
        self._batching, self._pending = True, False
        try:
            try:
                await self._adopt(source, entry, read, mine, fence)
            except LeaseLost as err:  # another replica took the source over meanwhile: nothing was committed
                log.warning("discover.fenced", source=name, error=str(err))
                self._sources.pop(name, None)  # its state moved on: read it afresh if the lease comes back
                if self.on_source_fenced is not None and fence is not None:
                    self.on_source_fenced(fence[0], fence[2])
                return None
            if source.interval_s <= self.config.lifecycle.status_interval_s:
                self._listed |= {f"{source.namespace}/{source.repo}/{ft.id}" for ft in read.fine_tunes}
            for fine_tune in read.fine_tunes:
                watched = self.watcher.fine_tunes.get(f"{source.namespace}/{source.repo}/{fine_tune.id}")
                if watched is not None and watched.watched:
                    await self.observe_status(watched, fine_tune)
        finally:
            self._batching = False
            if self._pending:
                self._changed()
        return read

    async def _resume(self, name: str) -> None:
        watcher = self.watcher
        stored = await watcher.in_store(watcher.store.load_watching, [name])  # type: ignore[attr-defined]
        sources = {source.name for source in self.config.discover}
        for ref in stored.get(name, []):
            holder = watcher.discovered.get(ref.key)
            if holder is None or holder[1] not in sources:
                watcher.discovered[ref.key] = (ref, name)

    async def _adopt(
        self, source: DiscoverConfig, entry: _Source, read: ListRead, mine: set[str], fence: tuple[str, str, int] | None
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
        fenced = {} if fence is None else {"fence": fence, "watching": [ref for ref, _ in now_mine.values()]}
        events = await watcher.in_store(
            watcher.store.apply_discovery,
            source.name,
            result.state,
            pairs,
            now=now,
            sources=[(ref, fine_tune_id in announced) for fine_tune_id, ref in refs.items()],
            commit=watcher.commit,
            route=watcher.route,
            **fenced,
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
        owns = watcher.owns  # replicas: a fine-tune found here is watched by whichever replica claims it
        added = [key for key in now_mine if key not in watcher.fine_tunes and (owns is None or owns(key))]
        news = added if owns is None else [key for key in now_mine if key not in before]
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
