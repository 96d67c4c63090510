"""A database set up exactly as README.md's "Running several replicas" says: an owner role that creates the
schema, and the replicas' role with only the GRANTs listed there. The SQL is read from the README itself, so
the documented grants are the tested ones."""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from watcher.store.postgres.store import PostgresStore
from watcher.testing.pgcluster import SUPERUSER, PgCluster

README = Path(__file__).resolve().parent.parent / "README.md"
OWNER, REPLICA = "oxen_watcher_owner", "oxen_watcher"
_numbers = itertools.count(1)


def readme_sql() -> tuple[list[str], list[str]]:
    """The statements of the section's two SQL blocks: (as a superuser, as the owner once the schema exists)."""
    text = README.read_text()
    section = text[text.index("## Running several replicas") :]
    blocks = re.findall(r"```sql\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, "README: the replicas section has two ```sql blocks"

    def statements(block: str) -> list[str]:
        lines = [line.split("--", 1)[0].strip() for line in block.splitlines()]
        return [s.strip() for s in " ".join(lines).split(";") if s.strip()]

    return statements(blocks[0]), statements(blocks[1])


@contextmanager
def least_privilege_database(cluster: PgCluster) -> Iterator[tuple[str, str]]:
    """A fresh database set up by the README's SQL, its schema created by the owner; yields the URLs (owner,
    replica role). Roles are cluster-wide: made once per cluster, found again afterwards."""
    as_superuser, as_owner = readme_sql()
    name = f"least_{os.getpid()}_{next(_numbers)}"
    with psycopg.connect(cluster.url(), autocommit=True) as admin:
        for statement in as_superuser:
            try:
                admin.execute(statement.replace("DATABASE oxen_watcher", f'DATABASE "{name}"'))  # type: ignore[arg-type]
            except psycopg.errors.DuplicateObject:
                assert statement.startswith("CREATE ROLE"), statement
    owner_url = cluster.url(name).replace(f"{SUPERUSER}@", f"{OWNER}@", 1)
    replica_url = cluster.url(name).replace(f"{SUPERUSER}@", f"{REPLICA}@", 1)
    try:
        PostgresStore(owner_url).close()  # the schema, created by its owner (as `prune` does in the README)
        with psycopg.connect(owner_url, autocommit=True) as owner:
            for statement in as_owner:
                owner.execute(statement)  # type: ignore[arg-type]
        yield owner_url, replica_url
    finally:
        with psycopg.connect(cluster.url(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]
