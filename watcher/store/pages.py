"""The status page's reads: the values they return, the `Reports` protocol, and its SQL implementation shared by
SQLite and PostgreSQL: one set of queries (placeholders aside) and one way of condensing rows into those values.
Each backend supplies a read snapshot, how to test membership in a list of keys, and how to pull three fields out
of a checkpoint's JSON in the database.

The checkpoint summaries (latest, best, sparkline) are kept per fine-tune in `run_summaries`, written with the
checkpoints, and cached here by the fine-tune row's `revision`, which every commit of a fine-tune's state moves on
(whichever process or replica made it): a request re-reads only the summaries whose revision moved since.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import orjson

from watcher.core.models import Delivery, Event

T = TypeVar("T")
SPARK_POINTS = 40
BATCH = 500  # keys or ids per query: bounded result sets, and under every backend's parameter limit
_STATE = (
    "SELECT fine_tune_key, revision, last_poll_at, last_outcome, last_error, last_http_status, "
    "last_success_at, consecutive_failures, failing, not_found FROM fine_tunes"
)
_DELIVERY_COLUMNS = (
    "event_seq, event_id, notifier, fine_tune_key, batch_id, state, attempts, next_attempt_at, queued_at, "
    "last_error, last_status"
)


@dataclass(frozen=True, slots=True)
class RunSummary:
    """One fine-tune's persisted state, condensed for the overview table."""

    key: str
    last_poll_at: float | None = None
    last_outcome: str | None = None
    last_error: str | None = None
    last_http_status: int | None = None
    last_success_at: float | None = None
    consecutive_failures: int = 0
    failing: bool = False
    not_found: bool = False
    checkpoints: int = 0
    latest_step: int | None = None
    latest_loss: float | None = None
    latest_created_at: str | None = None
    latest_deployment: str | None = None
    best_loss: float | None = None
    best_step: int | None = None
    hub_status: str | None = None
    replica: str | None = None  # the replica holding its lease (PostgreSQL); None on SQLite or while unowned
    spark: tuple[tuple[int, float], ...] = ()  # (step, loss), at most SPARK_POINTS of them


@dataclass(frozen=True, slots=True)
class CheckpointRow:
    """A checkpoint as last committed (the Hub's dict, verbatim)."""

    step: int
    data: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class EventRow:
    """A committed event with its outbox rows."""

    seq: int
    event: Event
    created_at: float
    deliveries: tuple[Delivery, ...]


@dataclass(frozen=True, slots=True)
class NotifierHealth:
    """Delivery health of one notifier: pending rows, the oldest one's queue time, dead rows."""

    notifier: str
    pending: int
    oldest_pending_at: float | None
    dead: int


class Reports(Protocol):
    """Read-only queries behind the status page; called from a worker thread, never on the event loop."""

    def summaries(self, keys: Sequence[str]) -> dict[str, RunSummary]:
        """The condensed state of these fine-tunes (those never polled are absent)."""
        ...

    def checkpoints(self, key: str) -> list[CheckpointRow]:
        """Every known checkpoint of a fine-tune, by step."""
        ...

    def events(self, *, limit: int = 100, type: str | None = None, fine_tune: str | None = None) -> list[EventRow]:
        """Recent events, newest first, optionally only of one type and of one fine-tune."""
        ...

    def delivery_health(self, notifiers: Sequence[str]) -> list[NotifierHealth]:
        """Pending and dead rows per configured notifier."""
        ...

    def close(self) -> None:
        """Release the database."""
        ...


class Reader(Protocol):
    """What both drivers' connections offer: execute() returning a cursor (iterable, fetchone, fetchall)."""

    def execute(self, sql: Any, params: Any = ..., /) -> Any:
        """Run one statement."""
        ...


def number(value: Any) -> float | None:
    """A JSON number as a float (None for anything else, booleans included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def thin(points: list[tuple[int, float]], most: int) -> tuple[tuple[int, float], ...]:
    """At most `most` points, evenly spaced, first and last kept (a sparkline shows the shape only)."""
    if len(points) <= most:
        return tuple(points)
    last = len(points) - 1
    return tuple(points[round(i * last / (most - 1))] for i in range(most))


def checkpoint_summary(rows: Sequence[tuple[int, Any, Any, Any]]) -> dict[str, Any]:
    """The overview's fields from (step, loss, deployment_status, created_at) rows of one fine-tune, by step."""
    losses = [(step, loss) for step, raw, _, _ in rows if (loss := number(raw)) is not None]
    best = min(losses, key=lambda point: point[1]) if losses else None
    latest = rows[-1] if rows else None
    return {
        "checkpoints": len(rows),
        "latest_step": latest[0] if latest else None,
        "latest_loss": number(latest[1]) if latest else None,
        "latest_created_at": latest[3] if latest and isinstance(latest[3], str) else None,
        "latest_deployment": latest[2] if latest and isinstance(latest[2], str) else None,
        "best_loss": best[1] if best else None,
        "best_step": best[0] if best else None,
        "spark": thin(losses, SPARK_POINTS),
    }


# --- per-fine-tune summaries, kept on write -------------------------------------------------------------------
# Each commit that changes a fine-tune's checkpoints rewrites its row of `run_summaries` in the same transaction
# (the poll has every checkpoint in memory then), so the overview reads one small row per fine-tune instead of
# every checkpoint's JSON (the first overview after a start took 3 s on PostgreSQL with a year of history).

SUMMARY_COLUMNS = (
    "fine_tune_key, checkpoints, latest_step, latest_loss, latest_created_at, latest_deployment, best_loss, "
    "best_step, spark"
)


def summary_upsert(mark: str) -> str:
    """The statement writing one summary row (either dialect: `mark` is the driver's placeholder)."""
    updates = ", ".join(f"{column} = excluded.{column}" for column in SUMMARY_COLUMNS.split(", ")[1:])
    return (
        f"INSERT INTO run_summaries ({SUMMARY_COLUMNS}) VALUES ({', '.join(mark for _ in range(9))}) "
        f"ON CONFLICT (fine_tune_key) DO UPDATE SET {updates}"
    )


def summary_row(key: str, summary: Mapping[str, Any]) -> tuple[Any, ...]:
    """A checkpoint_summary() as the values of summary_upsert()."""
    return (
        key,
        summary["checkpoints"],
        summary["latest_step"],
        summary["latest_loss"],
        summary["latest_created_at"],
        summary["latest_deployment"],
        summary["best_loss"],
        summary["best_step"],
        orjson.dumps(summary["spark"]).decode(),
    )


def summary_of_row(row: Sequence[Any]) -> dict[str, Any]:
    """A run_summaries row (SUMMARY_COLUMNS, key first) as checkpoint_summary() gives it."""
    _, count, latest_step, latest_loss, created_at, deployment, best_loss, best_step, spark = row
    return {
        "checkpoints": count,
        "latest_step": latest_step,
        "latest_loss": latest_loss,
        "latest_created_at": created_at,
        "latest_deployment": deployment,
        "best_loss": best_loss,
        "best_step": best_step,
        "spark": tuple(map(tuple, orjson.loads(spark))),  # (step, loss) pairs; map: the first overview reads 2,000
    }


def summary_of_checkpoints(checkpoints: Mapping[int, Mapping[str, Any]]) -> dict[str, Any]:
    """checkpoint_summary() of a fine-tune's checkpoints (step -> the Hub's dict), as the database's JSON
    extraction gives it: the loss at metrics.loss, the deployment status and creation time when strings."""
    rows = []
    for step in sorted(checkpoints):
        data = checkpoints[step]
        metrics = data.get("metrics")
        loss = metrics.get("loss") if isinstance(metrics, Mapping) else None
        rows.append((step, loss, data.get("deployment_status"), data.get("created_at")))
    return checkpoint_summary(rows)


def backfill_summaries(db: Reader, *, mark: str, fields: str, source: str, keys: Sequence[str] = ()) -> int:
    """Write the summary of every fine-tune with checkpoints (or of `keys`) from its checkpoint rows; `fields` and
    `source` are a backend's SqlReports.checkpoint_fields and checkpoint_from. For the migration that adds the
    table, and for bulk loads that bypass the store (the benchmarks)."""
    where = f"WHERE fine_tune_key IN ({', '.join(mark for _ in keys)}) " if keys else ""
    by_key: dict[str, list[tuple[int, Any, Any, Any]]] = {}
    for key, *values in db.execute(
        f"SELECT fine_tune_key, {fields} FROM {source} {where}ORDER BY fine_tune_key, step", tuple(keys)
    ):
        by_key.setdefault(key, []).append(tuple(values))
    rows = [summary_row(key, checkpoint_summary(found)) for key, found in by_key.items()]
    if rows:
        db.cursor().executemany(summary_upsert(mark), rows)  # type: ignore[attr-defined]
    return len(rows)


def _batches(values: Sequence[T]) -> Iterable[Sequence[T]]:
    for start in range(0, len(values), BATCH):
        yield values[start : start + BATCH]


class SqlReports:
    """The `Reports` protocol over any SQL backend; subclasses provide the snapshot and the dialect."""

    mark = "?"  # the driver's placeholder
    # (step, loss, deployment_status, created_at) of a checkpoint row, pulled out by the database: the overview
    # never decodes whole checkpoints in Python (inference samples can be big)
    checkpoint_fields = ""
    checkpoint_from = "checkpoints"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # fine_tune_key -> (revision, summary of its checkpoints): rereads only the fine-tunes that changed
        self._cache: dict[str, tuple[int, dict[str, Any]]] = {}

    # --- what a backend provides -------------------------------------------------------------------

    def _snapshot(self, fn: Callable[[Reader], T], empty: T) -> T:
        """Run `fn` in one read-only transaction (a consistent snapshot); `empty` when there is no database."""
        raise NotImplementedError

    def _in(self, column: str, values: Sequence[Any]) -> tuple[str, list[Any]]:
        """`column` is one of `values`: the SQL and its parameters."""
        return f"{column} IN ({', '.join(self.mark for _ in values)})", list(values)

    def _hub_statuses(self, db: Reader) -> dict[str, str]:
        """The Hub status the lifecycle jobs persisted, per fine-tune."""
        return dict(db.execute("SELECT fine_tune_key, status FROM lifecycle").fetchall())

    def _replicas(self, db: Reader) -> dict[str, str]:
        """The replica holding each leased fine-tune (none without leases: one process owns everything)."""
        return {}

    # --- the overview -------------------------------------------------------------------------------

    def summaries(self, keys: Sequence[str]) -> dict[str, RunSummary]:
        """The condensed state of these fine-tunes (those never polled are absent)."""
        wanted = set(keys)
        return self._snapshot(lambda db: self._summaries(db, wanted), {})

    def _summaries(self, db: Reader, wanted: set[str]) -> dict[str, RunSummary]:
        every = db.execute(_STATE).fetchall()
        rows = [row for row in every if row[0] in wanted]
        stale = [(key, revision) for key, revision, *_ in rows if self._cached(key, revision) is None]
        if stale:
            fresh = self._checkpoint_summaries(db, [key for key, _ in stale])
            for key, revision in stale:
                self._cache[key] = (revision, fresh[key])
        hub_statuses = self._hub_statuses(db) if rows else {}
        replicas = self._replicas(db) if rows else {}
        found: dict[str, RunSummary] = {}
        for key, _, poll_at, outcome, error, http_status, success_at, failures, failing, not_found in rows:
            found[key] = RunSummary(
                key=key,
                last_poll_at=poll_at,
                last_outcome=outcome,
                last_error=error,
                last_http_status=http_status,
                last_success_at=success_at,
                consecutive_failures=failures,
                failing=bool(failing),
                not_found=bool(not_found),
                hub_status="not found" if not_found else hub_statuses.get(key),
                replica=replicas.get(key),
                **self._cache[key][1],
            )
        # only fine-tunes gone from the database leave the cache: the run page asks for one fine-tune, and what
        # the overview cached for the others must stay
        known = {row[0] for row in every}
        for key in [k for k in self._cache if k not in known]:
            del self._cache[key]
        return found

    def _cached(self, key: str, revision: int) -> dict[str, Any] | None:
        cached = self._cache.get(key)
        return cached[1] if cached is not None and cached[0] == revision else None

    def _checkpoint_summaries(self, db: Reader, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        if len(keys) > BATCH:  # the first overview after a start: every row, in one read of the table
            wanted = set(keys)
            for row in db.execute(f"SELECT {SUMMARY_COLUMNS} FROM run_summaries"):
                if row[0] in wanted:
                    found[row[0]] = summary_of_row(row)
        else:
            for batch in _batches(keys):
                where, args = self._in("fine_tune_key", batch)
                for row in db.execute(f"SELECT {SUMMARY_COLUMNS} FROM run_summaries WHERE {where}", args):
                    found[row[0]] = summary_of_row(row)
        # none kept (a fine-tune with no checkpoint committed yet): from its checkpoint rows, if any
        missing = [key for key in keys if key not in found]
        return {**found, **self._scan_checkpoints(db, missing)} if missing else found

    def _scan_checkpoints(self, db: Reader, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
        by_key: dict[str, list[tuple[int, Any, Any, Any]]] = {key: [] for key in keys}
        for batch in _batches(keys):
            where, args = self._in("fine_tune_key", batch)
            for key, *fields in db.execute(
                f"SELECT fine_tune_key, {self.checkpoint_fields} FROM {self.checkpoint_from} "
                f"WHERE {where} ORDER BY fine_tune_key, step",
                args,
            ):
                by_key[key].append(tuple(fields))
        return {key: checkpoint_summary(rows) for key, rows in by_key.items()}

    # --- one run ------------------------------------------------------------------------------------

    def checkpoints(self, key: str) -> list[CheckpointRow]:
        """Every known checkpoint of a fine-tune, by step."""

        def read(db: Reader) -> list[CheckpointRow]:
            return [
                CheckpointRow(step, orjson.loads(data))
                for step, data in db.execute(
                    f"SELECT step, data FROM checkpoints WHERE fine_tune_key = {self.mark} ORDER BY step", (key,)
                )
            ]

        return self._snapshot(read, [])

    # --- events and deliveries ----------------------------------------------------------------------

    def events(self, *, limit: int = 100, type: str | None = None, fine_tune: str | None = None) -> list[EventRow]:
        """Recent events, newest first, optionally only of one type and of one fine-tune."""

        def read(db: Reader) -> list[EventRow]:
            where, args = [], []
            if type is not None:
                where.append(f"type = {self.mark}")
                args.append(type)
            if fine_tune is not None:
                where.append(f"fine_tune_key = {self.mark}")
                args.append(fine_tune)
            clause = f"WHERE {' AND '.join(where)} " if where else ""
            rows = db.execute(
                f"SELECT seq, envelope, fine_tune_key, created_at FROM events {clause}"
                f"ORDER BY seq DESC LIMIT {self.mark}",
                (*args, max(0, limit)),
            ).fetchall()
            documents = [orjson.loads(envelope) for _, envelope, _, _ in rows]
            deliveries: dict[str, list[Delivery]] = {}
            for batch in _batches([doc["id"] for doc in documents]):
                where_ids, ids = self._in("event_id", batch)
                for row in db.execute(
                    f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE {where_ids} ORDER BY notifier", ids
                ):
                    deliveries.setdefault(row[1], []).append(Delivery(*row))
            found = []
            for (seq, _, key, created_at), doc in zip(rows, documents):
                event = Event(doc["id"], doc["type"], doc["timestamp"], doc["data"], key)
                found.append(EventRow(seq, event, created_at, tuple(deliveries.get(doc["id"], ()))))
            return found

        return self._snapshot(read, [])

    def delivery_health(self, notifiers: Sequence[str]) -> list[NotifierHealth]:
        """Pending and dead rows per configured notifier."""

        def read(db: Reader) -> list[NotifierHealth]:
            found = []
            for name in dict.fromkeys(notifiers):
                # per notifier and state: each query is a range of an index on (notifier, state, ...)
                pending, oldest = db.execute(
                    "SELECT COUNT(*), MIN(queued_at) FROM deliveries "
                    f"WHERE notifier = {self.mark} AND state = 'pending'",
                    (name,),
                ).fetchone()
                (dead,) = db.execute(
                    f"SELECT COUNT(*) FROM deliveries WHERE notifier = {self.mark} AND state = 'dead'", (name,)
                ).fetchone()
                found.append(NotifierHealth(name, pending, oldest, dead))
            return found

        return self._snapshot(read, [NotifierHealth(name, 0, None, 0) for name in notifiers])
