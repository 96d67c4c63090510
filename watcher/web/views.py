"""What the pages show, as plain values: the live state snapshot joined with persisted reports, sorted and paged."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

from watcher.core.events import rfc3339
from watcher.core.health import PollHealth, Verdict
from watcher.core.models import FineTuneRef
from watcher.store.pages import NotifierHealth, RunSummary

PAGE_SIZE = 100
STALL_AFTER_S = 2 * 3600  # as the OxenFineTuneTrainingStalled alert: no new checkpoint for 2 h ...
FINISHED_AFTER_S = 24 * 3600  # ... but one newer than a day (older: taken as a finished run)
SORTS = ("failing", "name", "status", "step", "loss", "best", "deployment", "poll")


@dataclass(frozen=True, slots=True)
class LiveSnapshot:
    """The daemon's in-memory state at one moment: watched fine-tunes, poll health, notifiers, own health."""

    refs: tuple[FineTuneRef, ...]
    health: Mapping[str, PollHealth]  # copies, safe to read on a worker thread
    notifiers: tuple[str, ...]
    disabled: frozenset[str]
    alive: Verdict
    ready: Verdict
    now: float


@dataclass(frozen=True, slots=True)
class Row:
    """One fine-tune as the overview and the JSON API show it."""

    ref: FineTuneRef
    summary: RunSummary
    last_poll_at: float | None
    last_outcome: str | None
    last_error: str | None
    failing: bool
    not_found: bool
    stalled: bool
    consecutive_failures: int

    @property
    def key(self) -> str:
        """namespace/repo/id."""
        return self.ref.key

    @property
    def path(self) -> str:
        """The run page's path (each segment percent-encoded)."""
        return run_path(self.ref)

    def as_json(self) -> dict[str, Any]:
        """The `/api/v1/fine-tunes` entry."""
        s = self.summary
        return {
            "fine_tune": self.ref.as_data(),
            "hub_status": s.hub_status,
            "replica": s.replica,
            "checkpoints": s.checkpoints,
            "latest_step": s.latest_step,
            "latest_loss": s.latest_loss,
            "latest_created_at": s.latest_created_at,
            "best_loss": s.best_loss,
            "best_step": s.best_step,
            "latest_deployment_status": s.latest_deployment,
            "last_poll_at": iso(self.last_poll_at),
            "last_outcome": self.last_outcome,
            "last_error": self.last_error,
            "last_success_at": iso(s.last_success_at),
            "consecutive_failures": self.consecutive_failures,
            "failing": self.failing,
            "not_found": self.not_found,
            "stalled": self.stalled,
        }


def run_path(ref: FineTuneRef) -> str:
    """The run page of a fine-tune."""
    return "/fine-tunes/" + "/".join(quote(part, safe="") for part in (ref.namespace, ref.repo, ref.id))


def iso(at: float | None) -> str | None:
    """Unix seconds as RFC 3339 UTC."""
    return None if at is None else rfc3339(at)


def timestamp_of(text: str | None) -> float | None:
    """An ISO 8601 time from the Hub as Unix seconds (None when absent or unreadable)."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        return None
    return moment.timestamp()


def age(now: float, at: float | None) -> str:
    """How long ago, briefly: 5s, 3m, 2h, 4d."""
    if at is None:
        return "never"
    seconds = max(0.0, now - at)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit} ago"
    return f"{int(seconds)}s ago"


def build_rows(live: LiveSnapshot, summaries: Mapping[str, RunSummary]) -> list[Row]:
    """Every watched fine-tune joined with its persisted state and this process's poll health."""
    rows = []
    for ref in live.refs:
        summary = summaries.get(ref.key) or RunSummary(key=ref.key)
        poll = live.health.get(ref.key)
        polled_here = poll is not None and poll.last_poll_at is not None
        last_poll_at = poll.last_poll_at if polled_here and poll else summary.last_poll_at
        last_outcome = poll.last_outcome if polled_here and poll else summary.last_outcome
        if polled_here and poll is not None:
            last_error = poll.last_error
        else:
            last_error = summary.last_error
        failing = (
            summary.failing
            or last_outcome in ("error", "unauthorized")
            or (poll is not None and (poll.failing_since is not None or poll.store_failing))
        )
        created = timestamp_of(summary.latest_created_at)
        # only a run the Hub last said is running (or whose status was never read) can stall: a finished one cannot
        could_run = summary.hub_status is None or summary.hub_status.casefold() == "running"
        stalled = (
            could_run
            and not failing
            and created is not None
            and STALL_AFTER_S < live.now - created < FINISHED_AFTER_S
            and last_outcome == "ok"
        )
        rows.append(
            Row(
                ref=ref,
                summary=summary,
                last_poll_at=last_poll_at,
                last_outcome=last_outcome,
                last_error=last_error,
                failing=failing,
                not_found=summary.not_found or last_outcome == "not_found",
                stalled=stalled,
                consecutive_failures=summary.consecutive_failures,
            )
        )
    return rows


def _severity(row: Row) -> int:
    if row.failing:
        return 0
    if row.not_found:
        return 1
    if row.stalled:
        return 2
    return 3


_SORT_KEYS: dict[str, Callable[[Row], Any]] = {
    "failing": _severity,
    "name": lambda row: row.ref.name.casefold(),
    "status": lambda row: row.summary.hub_status,
    "step": lambda row: row.summary.latest_step,
    "loss": lambda row: row.summary.latest_loss,
    "best": lambda row: row.summary.best_loss,
    "deployment": lambda row: (row.summary.latest_deployment or "").casefold() or None,
    "poll": lambda row: row.last_poll_at,
}


def parse_sort(text: str | None) -> tuple[str, bool]:
    """`?sort=` as (column, descending); unknown values fall back to the default (failing first)."""
    text = (text or "failing").strip()
    descending = text.startswith("-")
    column = text.lstrip("-")
    if column not in _SORT_KEYS:
        return "failing", False
    return column, descending


def sort_rows(rows: Sequence[Row], column: str, descending: bool) -> list[Row]:
    """Rows sorted by a column (unknown values last either way), ties broken by name then key."""
    key = _SORT_KEYS[column]
    by_name = sorted(rows, key=lambda row: (row.ref.name.casefold(), row.key))
    known = [row for row in by_name if key(row) is not None]
    unknown = [row for row in by_name if key(row) is None]
    known.sort(key=key, reverse=descending)
    return known + unknown


def parse_page(text: str | None) -> int:
    """`?page=` as a 1-based page number (bad values give page 1)."""
    try:
        return max(1, int(text or "1"))
    except ValueError:
        return 1


def page_of(rows: Sequence[Row], page: int, size: int = PAGE_SIZE) -> tuple[list[Row], int, int]:
    """The rows of one page, the page number (clamped) and the page count."""
    pages = max(1, math.ceil(len(rows) / size))
    page = min(page, pages)
    return list(rows[(page - 1) * size : page * size]), page, pages


@dataclass(frozen=True, slots=True)
class NotifierView:
    """One notifier's delivery health as the header shows it."""

    name: str
    pending: int
    oldest_pending_age: str
    oldest_pending_s: float | None
    dead: int
    disabled: bool

    @property
    def ok(self) -> bool:
        """No dead rows, not disabled, nothing pending for over ten minutes."""
        return not self.dead and not self.disabled and (self.oldest_pending_s or 0) < 600

    def as_json(self) -> dict[str, Any]:
        """The `delivery` entry of the JSON API."""
        return {
            "notifier": self.name,
            "pending": self.pending,
            "oldest_pending_age_s": self.oldest_pending_s,
            "dead": self.dead,
            "disabled": self.disabled,
        }


def notifier_views(live: LiveSnapshot, health: Sequence[NotifierHealth]) -> list[NotifierView]:
    """Delivery health per configured notifier."""
    views = []
    for entry in health:
        oldest = max(0.0, live.now - entry.oldest_pending_at) if entry.oldest_pending_at else None
        views.append(
            NotifierView(
                name=entry.notifier,
                pending=entry.pending,
                oldest_pending_age="—"
                if oldest is None
                else age(live.now, entry.oldest_pending_at).removesuffix(" ago"),
                oldest_pending_s=oldest,
                dead=entry.dead,
                disabled=entry.notifier in live.disabled,
            )
        )
    return views


def human_bytes(size: Any) -> str:
    """A size in bytes as 1.2 GB."""
    if isinstance(size, bool) or not isinstance(size, int | float):
        return "—"
    value = float(size)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"
