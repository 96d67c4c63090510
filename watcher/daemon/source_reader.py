"""Reading a [[discover]] source's list from the Hub: page after page, newest first, until what the source
wants is seen (the I/O half of discovery; the rules are pure, in core/discovery.py)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

import structlog

from watcher.config.discovery import DiscoverConfig
from watcher.core.discovery import ListRead
from watcher.core.models import FetchedNotFound, HubFineTune

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
