"""The throwaway PostgreSQL cluster as fixtures (the cluster itself: watcher/testing/pgcluster.py).

Registered from conftest.py. `pg_cluster` (session) starts one server for the whole run; `pg_url` (per test) is a
fresh database in it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from watcher.testing.pgcluster import (
    SUPERUSER,
    ClusterUnavailable,
    PgCluster,
    find_server_bindir,
    throwaway_cluster,
)

__all__ = ["SUPERUSER", "PgCluster", "find_server_bindir", "pg_cluster", "pg_url"]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A PostgreSQL server for the whole test session; fails (never skips) when the server binaries are missing."""
    try:
        cluster = throwaway_cluster()
        started = cluster.__enter__()
    except ClusterUnavailable as err:
        pytest.fail(str(err))
    try:
        yield started
    finally:
        cluster.__exit__(None, None, None)


_numbers = itertools.count(1)


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> Iterator[str]:
    """The URL of a fresh, empty database for one test (dropped after it)."""
    name = f"test_{os.getpid()}_{next(_numbers)}"
    url = pg_cluster.create_database(name)
    try:
        yield url
    finally:
        pg_cluster.drop_database(name)
