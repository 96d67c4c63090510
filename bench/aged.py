"""Aged database: does a year of history slow the store down, and does retention give the space back?

A store is pre-filled with a year of history (3 M events, 6 M outbox rows at AGED_SCALE=1; bulk SQL inserts of
envelopes the real code produced, not apply_poll), then the store's hot calls are measured on it and on a fresh
database in the same run (CPU time, median of interleaved rounds): an apply_poll that commits one event, an
unchanged poll (observe_unchanged + its share of flush_touches), statuses(), recent_events(limit=50) (also with a
rare --type) and outbox_stats(). Then prune (30 days) runs on the aged file, whose size is compared with a
database holding only the retention window's rows; the same build gives the bytes per event and per outbox row.

    .venv/bin/python bench/aged.py            # full scale (a few minutes, about 4 GB of disk)
    AGED_SCALE=0.01 .venv/bin/python bench/aged.py
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from watcher.core.diff import DiffOptions  # noqa: E402
from watcher.core.models import Event, FineTuneRef, PollSuccess  # noqa: E402
from watcher.hub.schema import body_hash  # noqa: E402
from watcher.store import SqliteStore  # noqa: E402

DAY = 86400.0
YEAR_EVENTS = 3_000_000
RETAIN_DAYS = 30
FINE_TUNES = 200  # fine-tunes the history is spread over, and the ones polled in the measurement
NOTIFIERS = ("hook", "slack")
OPTIONS = DiffOptions()
ROUNDS = 7


def ref(i: int) -> FineTuneRef:
    return FineTuneRef(namespace="acme", repo="models", id=f"ft_{i:04d}", name=f"fine-tune {i}")


def checkpoint(step: int) -> dict[str, Any]:
    return {
        "step": step,
        "created_at": f"2026-06-01T12:{step % 60:02d}:00Z",
        "deployment_status": "ACTIVE" if step % 10 == 0 else None,
        "metrics": {"loss": round(1.0 / (step + 1), 6), "learning_rate": 1e-5, "grad_norm": 0.5, "epoch": step / 100},
        "model_name": f"acme-step-{step}",
        "path": f"checkpoints/step-{step}",
        "size_bytes": 1_000_000 + step,
    }


def poll(steps: range) -> PollSuccess:
    checkpoints = [checkpoint(s) for s in steps]
    return PollSuccess(tuple(checkpoints), body_hash(orjson.dumps({"checkpoints": checkpoints})))


def route(event: Event) -> list[str]:
    return list(NOTIFIERS)


def template_envelope() -> dict[str, Any]:
    """A checkpoint.created envelope exactly as the real code writes it."""
    store = SqliteStore(":memory:")
    store.apply_poll(ref(0), poll(range(1, 11)), options=OPTIONS, now=time.time())
    committed = store.apply_poll(ref(0), poll(range(1, 12)), options=OPTIONS, now=time.time())
    assert committed is not None
    store.close()
    return committed.events[0].envelope()


def history_rows(
    *, events: int, now: float, only_after: float | None = None
) -> Iterator[tuple[tuple[Any, ...], list[tuple[Any, ...]]]]:
    """(event row, its outbox rows), oldest first, spread evenly over the year before `now`."""
    template = template_envelope()
    types = ["checkpoint.created"] * 90 + ["checkpoint.deployment_changed"] * 8 + ["fine_tune.poll_failing"] * 2
    span = 365 * DAY
    for n in range(events):
        created = now - span + span * n / events
        if only_after is not None and created < only_after:
            continue
        key = ref(n % FINE_TUNES).key
        event_id = f"evt_{int(created * 1000):013d}{n:09d}"
        kind = types[n % len(types)]
        envelope = {
            **template,
            "id": event_id,
            "type": kind,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(created)),
            "data": {**template["data"], "checkpoint": checkpoint(n % 5000)},
        }
        seq = n + 1
        state = "dead" if n % 200 == 0 else "delivered"
        deliveries = [
            (seq, event_id, notifier, key, event_id, state, 1, None, created, None, 200, created)
            for notifier in NOTIFIERS
        ]
        yield (seq, event_id, kind, key, created, orjson.dumps(envelope).decode()), deliveries


def fill(path: Path, rows: Iterator[tuple[tuple[Any, ...], list[tuple[Any, ...]]]]) -> tuple[int, int]:
    """Bulk-insert history rows into a store's tables (the store creates the schema); returns the counts."""
    SqliteStore(path).close()  # the schema (or nothing, when it is there)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous=OFF")
    events = deliveries = 0
    chunk_events: list[tuple[Any, ...]] = []
    chunk_deliveries: list[tuple[Any, ...]] = []

    def flush() -> None:
        db.execute("BEGIN")
        db.executemany(
            "INSERT INTO events (seq, id, type, fine_tune_key, created_at, envelope) VALUES (?, ?, ?, ?, ?, ?)",
            chunk_events,
        )
        db.executemany(
            "INSERT INTO deliveries (event_seq, event_id, notifier, fine_tune_key, batch_id, state, attempts, "
            "next_attempt_at, queued_at, last_error, last_status, delivered_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            chunk_deliveries,
        )
        db.execute("COMMIT")
        chunk_events.clear()
        chunk_deliveries.clear()

    for event, outbox in rows:
        if event:
            chunk_events.append(event)
            events += 1
        chunk_deliveries += outbox
        deliveries += len(outbox)
        if len(chunk_events) >= 20_000:
            flush()
    flush()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return events, deliveries


def file_bytes(path: Path) -> int:
    """The database file and its WAL, after a checkpoint."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    wal = Path(f"{path}-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def cpu(fn: Callable[[], Any], repeat: int, clock: Callable[[], float] = time.process_time) -> float:
    """CPU seconds per call (or seconds of another clock: PostgreSQL does its work in the server's processes)."""
    start = clock()
    for _ in range(repeat):
        fn()
    return (clock() - start) / repeat


class Rig:
    """One store with FINE_TUNES baselined fine-tunes, each poll adding one checkpoint."""

    def __init__(self, path: Path | Any, *, now: float) -> None:
        """`path`: a SQLite file, or an open store (PostgreSQL)."""
        self.store = SqliteStore(path) if isinstance(path, Path) else path
        self.now = now
        self.steps = dict.fromkeys(range(FINE_TUNES), 10)
        for i in range(FINE_TUNES):
            self.store.apply_poll(ref(i), poll(range(1, 11)), options=OPTIONS, now=now, route=route)
        self.polls = {i: poll(range(1, 11)) for i in range(FINE_TUNES)}
        self.turn = 0

    def changed_poll(self) -> None:
        i = self.turn % FINE_TUNES
        self.turn += 1
        self.steps[i] += 1
        result = poll(range(self.steps[i] - 9, self.steps[i] + 1))  # a new step, the oldest one gone: 2 events
        self.polls[i] = result
        self.now += 0.01
        committed = self.store.apply_poll(ref(i), result, options=OPTIONS, now=self.now, route=route)
        assert committed is not None and committed.events

    def unchanged_polls(self, count: int) -> None:
        for n in range(count):
            i = n % FINE_TUNES
            self.now += 0.01
            assert self.store.observe_unchanged(ref(i).key, self.polls[i].body_hash, now=self.now) is not None
            if n % 200 == 199:  # the daemon flushes about once a second: 200 polls at 200 polls/s
                self.store.flush_touches()
        self.store.flush_touches()

    def deliver_all(self) -> None:
        for notifier in NOTIFIERS:
            due = self.store.due_deliveries([notifier], now=self.now + 1e6, limit=10_000)
            while due:
                for head in due:
                    rows = self.store.lane_batch(head)
                    self.store.record_delivery(notifier, [r.event_id for r in rows], state="delivered", now=self.now)
                due = self.store.due_deliveries([notifier], now=self.now + 1e6, limit=10_000)


def measure(
    fresh: Rig, aged: Rig, clock: Callable[[], float] = time.process_time, more: int = 1
) -> dict[str, tuple[float, float]]:
    """Median CPU (or `clock`) per call on each store, over interleaved rounds; `more` times the calls per round
    (for a coarse clock)."""
    keys = [ref(i).key for i in range(FINE_TUNES)]
    calls: dict[str, tuple[Callable[[Rig], Any], int]] = {
        "apply_poll (1 new checkpoint)": (lambda rig: rig.changed_poll(), 200),
        "unchanged poll": (lambda rig: rig.unchanged_polls(1000), 1),
        "statuses() of 200 fine-tunes": (lambda rig: rig.store.statuses(keys), 3),
        "recent_events(limit=50)": (lambda rig: rig.store.recent_events(limit=50), 50),
        "recent_events(50, type_glob='checkpoint.*')": (
            lambda rig: rig.store.recent_events(limit=50, type_glob="checkpoint.*"),
            50,
        ),
        "outbox_stats()": (lambda rig: rig.store.outbox_stats(), 200),
    }
    per: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in calls}
    for _ in range(ROUNDS):
        for name, (call, repeat) in calls.items():
            for rig, found in ((fresh, per[name][0]), (aged, per[name][1])):
                seconds = cpu(lambda rig=rig, call=call: call(rig), repeat * more, clock)
                found.append(seconds / (1000 if name == "unchanged poll" else 1))
        fresh.deliver_all()  # as the dispatcher would: the pending rows of the round go
        aged.deliver_all()
    return {name: (statistics.median(f), statistics.median(a)) for name, (f, a) in per.items()}


def run(scale: float | None = None, folder: Path | None = None) -> dict[str, Any]:
    """The aged-database section; returns its figures."""
    scale = float(os.environ.get("AGED_SCALE", "1")) if scale is None else scale
    events = max(1000, int(YEAR_EVENTS * scale))
    with tempfile.TemporaryDirectory(prefix="oxen-aged-", dir=folder) as tmp:
        tmp_path = Path(tmp)
        now = time.time()
        print(f"== Aged database: {events:,} events, {2 * events:,} outbox rows over a year (AGED_SCALE={scale}) ==")
        started = time.monotonic()
        aged_path = tmp_path / "aged.db"
        counts = fill(aged_path, history_rows(events=events, now=now))
        aged_size = file_bytes(aged_path)
        print(
            f"built in {time.monotonic() - started:.0f} s: {counts[0]:,} events, {counts[1]:,} outbox rows, "
            f"{aged_size / 2**20:,.0f} MiB"
        )
        fresh = Rig(tmp_path / "fresh.db", now=now)
        aged = Rig(aged_path, now=now)
        results = measure(fresh, aged)
        figures: dict[str, Any] = {"events": counts[0], "deliveries": counts[1], "aged_bytes": aged_size, "calls": {}}
        worst = 0.0
        for name, (on_fresh, on_aged) in results.items():
            ratio = on_aged / on_fresh if on_fresh else float("inf")
            worst = max(worst, ratio)
            figures["calls"][name] = {"fresh_s": on_fresh, "aged_s": on_aged, "ratio": ratio}
            print(f"{name:<44} fresh {on_fresh * 1e3:8.3f} ms  aged {on_aged * 1e3:8.3f} ms  = {ratio:4.2f}x")
        print(f"worst ratio {worst:.2f}x (goal <= 1.2x): {'met' if worst <= 1.2 else 'NOT met'}")
        rare = cpu(lambda: aged.store.recent_events(limit=50, type_glob="fine_tune.*"), 20)
        print(f"aged only: recent_events(50, type_glob='fine_tune.*') (2 % of the events) {rare * 1e3:.3f} ms")
        figures["rare_type_s"] = rare
        fresh.store.close()

        started_prune = time.monotonic()
        report = aged.store.prune(now=aged.now, retain_s=RETAIN_DAYS * DAY)
        prune_s = time.monotonic() - started_prune
        aged.store.close()
        pruned_size = file_bytes(aged_path)
        print(
            f"prune ({RETAIN_DAYS} days): {report.events:,} events and {report.deliveries:,} outbox rows removed "
            f"in {prune_s:.0f} s, {report.bytes_freed / 2**20:,.0f} MiB freed"
        )

        # the same rows written compactly (VACUUM INTO): the size the window's rows need
        compact_path = tmp_path / "compact.db"
        db = sqlite3.connect(aged_path, isolation_level=None)
        db.execute("VACUUM INTO ?", (str(compact_path),))
        db.close()
        window_size = file_bytes(compact_path)
        ratio = pruned_size / window_size
        print(
            f"file after prune {pruned_size / 2**20:,.1f} MiB vs {window_size / 2**20:,.1f} MiB for the same rows "
            f"written compactly = {ratio:.2f}x (was {aged_size / 2**20:,.0f} MiB)"
        )

        # what each kind of row costs: the window's events, then their outbox rows, into an empty store
        rows_path = tmp_path / "rows.db"
        SqliteStore(rows_path).close()
        empty = file_bytes(rows_path)
        window_rows = list(history_rows(events=events, now=now, only_after=now - RETAIN_DAYS * DAY))
        fill(rows_path, iter([(event, []) for event, _ in window_rows]))
        with_events = file_bytes(rows_path)
        fill(rows_path, iter([((), outbox) for _, outbox in window_rows]))
        with_deliveries = file_bytes(rows_path)
        per_event = (with_events - empty) / len(window_rows)
        per_delivery = (with_deliveries - with_events) / (2 * len(window_rows))
        print(f"cost: {per_event:,.0f} bytes per event, {per_delivery:,.0f} bytes per outbox row")
        figures.update(
            {
                "prune": {"events": report.events, "deliveries": report.deliveries, "seconds": prune_s},
                "pruned_bytes": pruned_size,
                "window_bytes": window_size,
                "size_ratio": ratio,
                "bytes_per_event": per_event,
                "bytes_per_delivery": per_delivery,
                "worst_ratio": worst,
            }
        )
        return figures


if __name__ == "__main__":
    run()
