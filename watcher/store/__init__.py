"""Durable state: protocols per concern, the SQLite implementation, the dispatch lock."""

from .lock import DispatchLock
from .protocols import (
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
from .reports_sqlite import SqliteReports
from .schema_sqlite import MIGRATIONS, SCHEMA_VERSION
from .sqlite import SqliteStore, open_store, wall_clock

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
