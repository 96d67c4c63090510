"""Reads written once for both stores: the same SQL but for the placeholder (the store's MARK)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from watcher.core.models import OutboxStats, SourceState


class SharedReads:
    """Outbox statistics and discovery state; the store's base provides `_read` and `MARK`."""

    MARK: ClassVar[str]
    _read: Callable[..., list[tuple[Any, ...]]]

    def outbox_stats(self) -> list[OutboxStats]:
        """Pending rows and the oldest pending row's queue time, per notifier (from the pending-only index)."""
        rows = self._read(
            "SELECT notifier, COUNT(*), MIN(queued_at) FROM deliveries WHERE state = 'pending' GROUP BY notifier"
        )
        return [OutboxStats(notifier, count, oldest) for notifier, count, oldest in rows]

    def discovered_names(self) -> dict[str, tuple[str, str]]:
        """Every fine-tune a source found: key -> (source, name as the Hub names it), for `status`."""
        rows = self._read(
            "SELECT fine_tune_key, source, name FROM lifecycle WHERE source IS NOT NULL AND source <> 'config'",
            what="read lifecycle state",
        )
        return {key: (source, name or key.rsplit("/", 1)[-1]) for key, source, name in rows}

    def load_source(self, name: str) -> SourceState:
        """A source's persisted state (an empty one when never read)."""
        mark = self.MARK
        rows = self._read(f"SELECT baselined FROM sources WHERE name = {mark}", (name,), what="read source state")
        if not rows:
            return SourceState()
        ids = self._read(
            f"SELECT fine_tune_id FROM source_ids WHERE source = {mark}", (name,), what="read source state"
        )
        return SourceState(baselined=bool(rows[0][0]), known_ids=frozenset(fine_tune_id for (fine_tune_id,) in ids))
