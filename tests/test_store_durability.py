"""SQLite: a commit that carries events is on disk when it returns (issue 15, item 14).

`synchronous = NORMAL` in WAL mode survives a crash of the process, but a power loss can roll back the last
commits, and a rolled-back event is announced again under a new id. A power loss cannot be simulated here; what
can be checked is the sync itself: the write-ahead log is fsync'ed after every commit with events (of a poll, of
a status change, of a source read), and not after the commits without (a failed poll, the batch of poll times),
which stay as cheap as before (bench/durability.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from store_contract.support import REF, T0, apply, cp, failed, success

from watcher.core.lifecycle import LifecycleOptions
from watcher.core.models import EventDraft, HubFineTune, SourceState
from watcher.store import SqliteStore


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The files fsync'ed (os.fsync still runs: only what it was given is recorded)."""
    paths: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    yield paths


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads which file an fd is from /proc")
def test_commits_with_events_sync_the_write_ahead_log_and_the_others_do_not(tmp_path: Path, synced: list[str]) -> None:
    store = SqliteStore(tmp_path / "w.db")
    wal = str((tmp_path / "w.db-wal").resolve())
    try:
        apply(store, success(cp(1)), now=T0)  # the baseline: silent, no event
        assert synced == []
        apply(store, success(cp(1), cp(2)), now=T0 + 1)  # checkpoint.created
        assert synced == [wal]
        apply(store, failed(), now=T0 + 2)  # a failed poll (below failure_threshold): no event
        store.observe_unchanged(REF.key, success(cp(1), cp(2)).body_hash, now=T0 + 3)
        store.flush_touches()
        assert synced == [wal]
        options = LifecycleOptions()
        store.apply_lifecycle(REF, HubFineTune(REF.id, status="running"), options=options, now=T0 + 4)  # silent
        assert synced == [wal]
        store.apply_lifecycle(REF, HubFineTune(REF.id, status="completed"), options=options, now=T0 + 5)
        assert synced == [wal, wal]  # fine_tune.status_changed
        draft = EventDraft("fine_tune.discovered", {"fine_tune": REF.as_data(), "source": "lab"})
        store.apply_discovery("lab", SourceState(baselined=True), [(REF, draft)], now=T0 + 6)
        assert synced == [wal, wal, wal]
    finally:
        store.close()
