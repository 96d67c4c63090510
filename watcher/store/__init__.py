"""Durable state: protocols per concern, the SQLite implementation, the dispatch lock."""

from watcher.store.lock import DispatchLock
from watcher.store.protocols import (
    Committed,
    EventLog,
    LifecycleCommitted,
    LifecycleRecord,
    LifecycleStore,
    Outbox,
    PruneReport,
    Retention,
    Router,
    StateStore,
    Store,
)
from watcher.store.sqlite.pages import SqliteReports
from watcher.store.sqlite.schema import MIGRATIONS, SCHEMA_VERSION
from watcher.store.sqlite.store import SqliteStore, open_store, wall_clock

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Committed",
    "DispatchLock",
    "EventLog",
    "LifecycleCommitted",
    "LifecycleRecord",
    "LifecycleStore",
    "Outbox",
    "PruneReport",
    "Retention",
    "Router",
    "SqliteReports",
    "SqliteStore",
    "StateStore",
    "Store",
    "open_store",
    "wall_clock",
]
