"""The status page's per-fine-tune summaries (checkpoint count, latest step and loss, best loss and its step, latest
deployment, sparkline) are kept on write, in the commit that changes the checkpoints, and filled by the migration
that adds them: the overview reads them, never every checkpoint's JSON (issue 15, item 10)."""

from __future__ import annotations

import importlib
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from store_contract.support import REF, T0, apply, cp, success
from watcher.store import SqliteReports, SqliteStore, Store
from watcher.store.pages import RunSummary, SqlReports
from watcher.store.postgres.pages import PostgresReports
from watcher.store.postgres.store import PostgresStore


@contextmanager
def _raw(store: Store) -> Iterator[Callable[[str], Any]]:
    """Statements on the store's database behind its back (as another program would run them)."""
    if isinstance(store, SqliteStore):
        db = sqlite3.connect(store.path, isolation_level=None)
        try:
            yield db.execute
        finally:
            db.close()
    else:
        assert isinstance(store, PostgresStore)
        with store.pool.connection() as conn:
            yield conn.execute


def _reports(store: Store) -> SqlReports:
    """A new Reports (an empty cache: the first overview after a start)."""
    if isinstance(store, SqliteStore):
        return SqliteReports(store.path)
    assert isinstance(store, PostgresStore)
    return PostgresReports(store.pool)


def _history(store: Store) -> None:
    apply(store, success(cp(1, loss=2.0), cp(2, loss=1.0)))  # the baseline
    apply(store, success(cp(1, loss=2.0), cp(2, loss=1.0), cp(3, loss=1.5, status="DEPLOYING")), now=T0 + 1)
    # step 1 gone from the Hub, step 3 deployed, step 4 without a loss
    apply(
        store,
        success(cp(2, loss=1.0), cp(3, loss=1.5, status="ACTIVE"), cp(4, metrics={"accuracy": 0.5})),
        now=T0 + 2,
    )


EXPECTED = RunSummary(
    key=REF.key,
    checkpoints=3,
    latest_step=4,
    latest_loss=None,
    latest_created_at=cp(4)["created_at"],
    latest_deployment=None,
    best_loss=1.0,
    best_step=2,
    spark=((2, 1.0), (3, 1.5)),
)


def _summary(store: Store) -> RunSummary:
    reports = _reports(store)
    try:
        found = reports.summaries([REF.key])[REF.key]
    finally:
        reports.close()
    # the poll's own fields aside: what the summary adds
    return RunSummary(
        key=found.key,
        checkpoints=found.checkpoints,
        latest_step=found.latest_step,
        latest_loss=found.latest_loss,
        latest_created_at=found.latest_created_at,
        latest_deployment=found.latest_deployment,
        best_loss=found.best_loss,
        best_step=found.best_step,
        spark=found.spark,
    )


def _hide_checkpoint_json(store: Store) -> None:
    # the overview must not read the checkpoints: with their JSON gone it still shows the summary
    with _raw(store) as execute:
        execute("UPDATE checkpoints SET data = '{}'")


def test_the_overview_reads_the_summaries_written_with_the_checkpoints(store_factory: Callable[..., Store]) -> None:
    store = store_factory()
    _history(store)
    assert _summary(store) == EXPECTED  # the same as computed from the checkpoints
    _hide_checkpoint_json(store)
    assert _summary(store) == EXPECTED


def test_the_migration_fills_the_summaries_of_a_database_from_before_them(
    store_factory: Callable[..., Store], request: pytest.FixtureRequest
) -> None:
    if request.node.callspec.params["implementation"] == "postgresql-least-privilege":
        pytest.skip("the replicas' role cannot migrate (the owner does, as the README says)")
    store = store_factory()
    _history(store)
    dialect = "sqlite" if isinstance(store, SqliteStore) else "postgres"
    migrations = importlib.import_module(f"watcher.store.{dialect}.schema").MIGRATIONS
    before = next(i for i, steps in enumerate(migrations) if any("run_summaries" in str(step) for step in steps))
    with _raw(store) as execute:  # the database as the release before the summaries left it
        execute("DROP TABLE run_summaries")
        execute(f"UPDATE schema_version SET version = {before}")
    store.close()
    reopened = store_factory()  # migrates
    _hide_checkpoint_json(reopened)
    assert _summary(reopened) == EXPECTED
