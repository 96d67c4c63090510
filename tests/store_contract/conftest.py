"""The implementations the contract runs over, and the `store_factory` fixture.

Adding an implementation is one line in IMPLEMENTATIONS: a name and a context manager that, given a fresh
per-test folder (and the test's request, for fixtures such as `pg_url`), prepares an empty database and yields
a function opening a store on it (each call a new store object on the same database: a second process, or the
same one after a restart) and cleans up after.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from watcher.store import SqliteStore, Store
from watcher.store.postgres.store import PostgresStore

Opener = Callable[..., Store]  # open(new_id=None) -> a new store on the test's database


@contextmanager
def sqlite_database(folder: Path, request: pytest.FixtureRequest) -> Iterator[Opener]:
    path = folder / "contract.db"

    def open_store(*, new_id: Callable[[], str] | None = None) -> Store:
        return SqliteStore(path, new_id=new_id)

    yield open_store


@contextmanager
def postgresql_database(folder: Path, request: pytest.FixtureRequest) -> Iterator[Opener]:
    # a fresh database in the session's throwaway cluster (tests/pgcluster.py), dropped after the test
    url = request.getfixturevalue("pg_url")

    def open_store(*, new_id: Callable[[], str] | None = None) -> Store:
        return PostgresStore(url, new_id=new_id)

    yield open_store


@contextmanager
def postgresql_least_privilege(folder: Path, request: pytest.FixtureRequest) -> Iterator[Opener]:
    # set up as README.md's "Running several replicas" says: the replicas' role holds only the documented GRANTs
    from pg_roles import least_privilege_database

    with least_privilege_database(request.getfixturevalue("pg_cluster")) as (_, replica_url):

        def open_store(*, new_id: Callable[[], str] | None = None) -> Store:
            return PostgresStore(replica_url, new_id=new_id)

        yield open_store


IMPLEMENTATIONS: dict[str, Callable[[Path, pytest.FixtureRequest], AbstractContextManager[Opener]]] = {
    "sqlite": sqlite_database,
    "postgresql": postgresql_database,
    "postgresql-least-privilege": postgresql_least_privilege,
}


@pytest.fixture(params=list(IMPLEMENTATIONS))
def store_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens stores on one empty database of the implementation under test; all closed at the end."""
    opened: list[Store] = []
    with IMPLEMENTATIONS[request.param](tmp_path, request) as open_store:

        def make(**kwargs: Any) -> Store:
            store = open_store(**kwargs)
            opened.append(store)
            return store

        yield make
        for store in opened:
            store.close()


@pytest.fixture
def store(store_factory: Opener) -> Store:
    """A store with predictable event ids."""
    from .support import counter_ids

    return store_factory(new_id=counter_ids())
