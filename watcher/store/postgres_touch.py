"""The PostgreSQL store's cache of decoded state and its unchanged-poll path: a 200 that changes nothing is
recorded in a batch (poll times only) instead of a transaction per poll."""

from __future__ import annotations

import threading
from typing import Any

import psycopg

from ..models import FineTuneState
from .postgres_base import PgBase

Conn = psycopg.Connection[Any]


class PgTouches(PgBase):
    """The cache and touch half of PostgresStore."""

    # fine_tune_key -> (revision, state) as last read or written by this process
    _cache: dict[str, tuple[int, FineTuneState]]
    # unchanged polls waiting for flush_touches: key -> (body hash, revision seen, poll time)
    _touches: dict[str, tuple[str, int, float]]
    _touches_lock: threading.Lock

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
        """Write the batched poll times of unchanged polls in one transaction; returns the keys another writer
        moved on (their cache is dropped). A failed write drops the batch (poll times only) and raises StoreError."""
        with self._touches_lock:
            batch, self._touches = self._touches, {}
        if not batch:
            return []

        def write(conn: Conn) -> list[str]:
            stale = []
            for key, (digest, revision, at) in batch.items():
                updated = conn.execute(
                    "UPDATE fine_tunes SET last_poll_at = %s, last_success_at = %s, last_outcome = 'ok', "
                    "last_error = NULL, last_http_status = 200, not_before = NULL "
                    "WHERE fine_tune_key = %s AND body_hash = %s AND revision = %s "
                    "AND (last_poll_at IS NULL OR last_poll_at <= %s)",  # never over a later outcome
                    (at, at, key, digest, revision, at),
                ).rowcount
                if not updated:
                    stale.append(key)
            return stale

        stale = self._tx(write, what="record poll times")
        moved_on = []
        for key in stale:
            cached = self._cache.get(key)
            if cached is not None and cached[0] == batch[key][1]:  # not our own later commit: another writer's
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
