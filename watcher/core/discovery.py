"""Discovery's pure rules: which fine-tunes of a read of a source's list it watches, and which are new.

Lists are newest first, have no total, and shift while being read: a fine-tune created during a read pushes
entries down (de-duplicated by id by the reader, daemon/source_reader.py) and is found at the top of the next read; one
that disappears is never taken as removed (only a 404 of the fine-tune says that). A failed read changes nothing.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from watcher.core.models import (
    FINE_TUNE_DISCOVERED,
    TERMINAL_STATUSES,
    EventDraft,
    FineTuneRef,
    HubFineTune,
    SourceState,
    parse_time,
)

DAY_S = 86_400.0


class Source(Protocol):
    """What the rules read of a [[discover]] source (the daemon passes its config.discovery.DiscoverConfig)."""

    @property
    def name(self) -> str:
        """The source's name, in events."""
        ...

    @property
    def namespace(self) -> str:
        """The repository's namespace."""
        ...

    @property
    def repo(self) -> str:
        """The repository."""
        ...

    @property
    def include(self) -> Sequence[str]:
        """Globs of names or ids to watch."""
        ...

    @property
    def exclude(self) -> Sequence[str]:
        """Globs of names or ids never to watch (exclude wins)."""
        ...

    @property
    def created_by(self) -> str:
        """Only fine-tunes of this username ("" for anyone's)."""
        ...

    @property
    def max_age_days(self) -> float:
        """Fine-tunes finished longer ago than this are not watched."""
        ...


@dataclass(frozen=True, slots=True)
class ListRead:
    """One read of a source's list: every fine-tune seen once (newest first), and how the read ended.

    `complete`: a short page ended it (everything was listed); `truncated`: max_pages ended it first.
    """

    fine_tunes: tuple[HubFineTune, ...]
    pages: int
    complete: bool
    truncated: bool

    @property
    def by_id(self) -> dict[str, HubFineTune]:
        """The fine-tunes seen, by id (their statuses are fresh as of this read)."""
        return {fine_tune.id: fine_tune for fine_tune in self.fine_tunes}


def _matches_any(fine_tune: HubFineTune, globs: Iterable[str]) -> bool:
    names = [fine_tune.id] if fine_tune.name is None else [fine_tune.name, fine_tune.id]
    return any(fnmatch.fnmatchcase(name, glob) for glob in globs for name in names)


def finished_at(fine_tune: HubFineTune) -> float | None:
    """When a fine-tune finished (finished_at, else updated_at for a terminal status); None while it has not."""
    finished = parse_time(fine_tune.finished_at)
    if finished is None and (fine_tune.status or "").casefold() in TERMINAL_STATUSES:
        finished = parse_time(fine_tune.updated_at)
    return finished


def matches(source: Source, fine_tune: HubFineTune, *, now: float) -> bool:
    """Whether a source watches this fine-tune: include/exclude globs (exclude wins), creator, max_age_days."""
    if not _matches_any(fine_tune, source.include) or _matches_any(fine_tune, source.exclude):
        return False
    if source.created_by and fine_tune.created_by is not None and fine_tune.created_by != source.created_by:
        return False  # the Hub filters by creator; this guards against a Hub that ignores the filter
    finished = finished_at(fine_tune)
    return finished is None or now - finished <= source.max_age_days * DAY_S


def ref_of(source: Source, fine_tune: HubFineTune) -> FineTuneRef:
    """The reference of a discovered fine-tune: named by the Hub's name, else its id."""
    return FineTuneRef(source.namespace, source.repo, fine_tune.id, fine_tune.name or fine_tune.id)


@dataclass(frozen=True, slots=True)
class Discovery:
    """What one read of a source changes: events, the source's new state, and what it watches now."""

    events: tuple[EventDraft, ...]
    state: SourceState
    watch: tuple[HubFineTune, ...]  # the fine-tunes of this read the source watches, newest first
    new: tuple[HubFineTune, ...]  # the ones first seen in this read (announced unless it was the baseline)


def discover(source: Source, old: SourceState, read: ListRead, *, now: float, baseline: bool = True) -> Discovery:
    """The pure decision: fine-tunes of this read not in the source's known ids are new.

    The first read of a source records what it finds silently when `baseline` ([watch] baseline) is on; every
    id seen becomes known (also ones filtered out, so a filter change later does not announce old runs) and
    stays known (a fine-tune missing from a list is not gone).
    """
    watch = tuple(fine_tune for fine_tune in read.fine_tunes if matches(source, fine_tune, now=now))
    new = tuple(fine_tune for fine_tune in watch if fine_tune.id not in old.known_ids)
    silent = baseline and not old.baselined
    events = () if silent else tuple(_discovered(source, fine_tune) for fine_tune in reversed(new))
    known = old.known_ids | {fine_tune.id for fine_tune in read.fine_tunes}
    return Discovery(events, SourceState(baselined=True, known_ids=frozenset(known)), watch, new)


def _discovered(source: Source, fine_tune: HubFineTune) -> EventDraft:
    return EventDraft(
        FINE_TUNE_DISCOVERED,
        {
            "fine_tune": ref_of(source, fine_tune).as_data(),
            "source": source.name,
            "status": fine_tune.status,
            "created_at": fine_tune.created_at,
            "base_model": fine_tune.base_model,
            "created_by": fine_tune.created_by,
        },
    )
