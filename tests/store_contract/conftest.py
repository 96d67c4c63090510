"""The implementations the contract runs over, and the `store_factory` and `database` fixtures.

Adding an implementation is one line in IMPLEMENTATIONS: a name and a context manager that, given a fresh
per-test folder (and the test's request, for fixtures such as `pg_url`), prepares an empty database and yields
an Implementation: a function opening a store on it (each call a new store object on the same database: a second
process, or the same one after a restart; keyword arguments go to the store, such as `readonly`), and the
database itself for reading and changing its tables past the store (databases.py); it cleans up after.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from watcher.store import SqliteStore, Store
from watcher.store.postgres.store import PostgresStore
from watcher.testing.pgcluster import SUPERUSER

from .databases import Database, PostgresDatabase, SqliteFile

Opener = Callable[..., Store]  # open(new_id=None, readonly=False) -> a new store on the test's database


@dataclass(frozen=True, slots=True)
class Implementation:
    """A store implementation on one empty database."""

    open: Opener
    database: Database


@contextmanager
def sqlite_database(folder: Path, request: pytest.FixtureRequest) -> Iterator[Implementation]:
    path = folder / "contract.db"

    def open_store(**kwargs: Any) -> Store:
        return SqliteStore(path, **kwargs)

    yield Implementation(open_store, SqliteFile(path))


@contextmanager
def postgresql_database(folder: Path, request: pytest.FixtureRequest) -> Iterator[Implementation]:
    # a fresh database in the session's throwaway cluster (tests/pgcluster.py), dropped after the test
    url = request.getfixturevalue("pg_url")

    def open_store(**kwargs: Any) -> Store:
        return PostgresStore(url, **kwargs)

    yield Implementation(open_store, PostgresDatabase(url))


@contextmanager
def postgresql_least_privilege(folder: Path, request: pytest.FixtureRequest) -> Iterator[Implementation]:
    # set up as README.md's "Running several replicas" says: the replicas' role holds only the documented GRANTs
    from pg_roles import OWNER, least_privilege_database

    with least_privilege_database(request.getfixturevalue("pg_cluster")) as (owner_url, replica_url):

        def open_store(**kwargs: Any) -> Store:
            return PostgresStore(replica_url, **kwargs)

        # the tables are read and changed as the cluster's superuser, whatever the replicas' role may do
        yield Implementation(open_store, PostgresDatabase(owner_url.replace(f"{OWNER}@", f"{SUPERUSER}@", 1)))


IMPLEMENTATIONS: dict[str, Callable[[Path, pytest.FixtureRequest], AbstractContextManager[Implementation]]] = {
    "sqlite": sqlite_database,
    "postgresql": postgresql_database,
    "postgresql-least-privilege": postgresql_least_privilege,
}


@pytest.fixture(params=list(IMPLEMENTATIONS))
def implementation(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Implementation]:
    """One implementation on an empty database, cleaned up after the test."""
    with IMPLEMENTATIONS[request.param](tmp_path, request) as found:
        yield found


@pytest.fixture
def store_factory(implementation: Implementation) -> Iterator[Opener]:
    """Opens stores on one empty database of the implementation under test; all closed at the end."""
    opened: list[Store] = []

    def make(**kwargs: Any) -> Store:
        store = implementation.open(**kwargs)
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


@pytest.fixture
def database(implementation: Implementation) -> Database:
    """The test's database itself, beside the stores `store_factory` opens on it."""
    return implementation.database


@pytest.fixture
def store(store_factory: Opener) -> Store:
    """A store with predictable event ids."""
    from .support import counter_ids

    return store_factory(new_id=counter_ids())
