"""Durable state: protocols per concern, the SQLite implementation, the dispatch lock."""

from .lock import DispatchLock
from .protocols import Committed, Router, Store
from .reports_sqlite import SqliteReports
from .schema_sqlite import MIGRATIONS, SCHEMA_VERSION
from .sqlite import SqliteStore, open_store, wall_clock

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Committed",
    "DispatchLock",
    "Router",
    "SqliteReports",
    "SqliteStore",
    "Store",
    "open_store",
    "wall_clock",
]
