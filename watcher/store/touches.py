"""The decoded-state cache and the unchanged-poll batch, the same on both stores: a 200 that changes nothing is
recorded in a batch (poll times only) instead of a transaction per poll; the store only runs the UPDATEs."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from watcher.core.models import FineTuneState


def touch_sql(mark: str) -> str:
    """The UPDATE that records one unchanged poll, in a store's placeholder style."""
    return (
        f"UPDATE fine_tunes SET last_poll_at = {mark}, last_success_at = {mark}, last_outcome = 'ok', "
        "last_error = NULL, last_http_status = 200, not_before = NULL "
        f"WHERE fine_tune_key = {mark} AND body_hash = {mark} AND revision = {mark} "
        f"AND (last_poll_at IS NULL OR last_poll_at <= {mark})"  # never over a later outcome
    )


class TouchCache:
    """Per fine-tune (revision, state) as this process last read or wrote it, and the batch of unchanged polls."""

    MARK: ClassVar[str]  # the store's SQL placeholder
    # runs one statement per row in one transaction; returns each row's rowcount (the store's base provides it)
    _update_each: Callable[..., list[int]]

    def _init_touches(self) -> None:
        # fine_tune_key -> (revision, state) as last read or written by this process
        self._cache: dict[str, tuple[int, FineTuneState]] = {}
        # unchanged polls waiting for flush_touches: key -> (body hash, revision seen, poll time); filled on the
        # event loop's thread, written on the store's thread
        self._touches: dict[str, tuple[str, int, float]] = {}
        self._touches_lock = threading.Lock()

    def body_hash(self, key: str) -> str | None:
        """The hash of the last committed 200 body of a fine-tune (as this process last saw it)."""
        cached = self._cache.get(key)
        return cached[1].body_hash if cached else None

    def load_cached(self, key: str) -> FineTuneState:
        """The state of a fine-tune as this process last committed or read it (no I/O)."""
        cached = self._cache.get(key)
        return cached[1] if cached else FineTuneState()

    def observe_unchanged(self, key: str, body_hash: str, *, now: float) -> FineTuneState | None:
        """Touch or diff, without I/O: when a 200 with this body changes nothing (the body is the committed one
        and nothing was failing), record the poll time for the next `flush_touches` and return the state;
        otherwise None: the caller diffs the answer for real with apply_poll."""
        cached = self._cache.get(key)
        if cached is None:
            return None
        revision, state = cached
        if state.body_hash != body_hash or state.consecutive_failures or state.failing or state.not_found:
            return None
        with self._touches_lock:
            previous = self._touches.get(key)
            if previous is None or previous[2] <= now:
                self._touches[key] = (body_hash, revision, now)
        return state

    def flush_touches(self) -> list[str]:
        """Write the batched poll times of unchanged polls in one transaction (every second or so, and at exit).

        A row that moved on since its poll was observed is left alone: by this process (apply_poll committed a
        later outcome: nothing to do) or by another writer (its key is returned and its cache dropped, so the
        next answer is diffed for real). A failed write drops the batch (poll times only) and raises StoreError.
        """
        with self._touches_lock:
            batch, self._touches = self._touches, {}
        if not batch:
            return []
        keys = list(batch)
        rows: Sequence[tuple[Any, ...]] = [
            (at, at, key, digest, revision, at) for key, (digest, revision, at) in batch.items()
        ]
        counts = self._update_each(touch_sql(self.MARK), rows, what="record poll times")
        moved_on = []
        for key, updated in zip(keys, counts, strict=True):
            cached = self._cache.get(key)
            # not our own later commit: another writer's
            if not updated and cached is not None and cached[0] == batch[key][1]:
                self._cache.pop(key, None)
                moved_on.append(key)
        return moved_on

    def _drop_touch(self, key: str, now: float) -> None:
        with self._touches_lock:
            pending = self._touches.get(key)
            if pending is not None and pending[2] <= now:
                del self._touches[key]

    def forget(self, key: str) -> None:
        """Drop what this process caches of a fine-tune: the next poll reads the state from the database."""
        self._cache.pop(key, None)
