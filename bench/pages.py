"""Status page benchmark: render times with 2,000 fine-tunes and a year of history, and the event loop beside it.

Builds a state database (the daemon's schema) holding 2,000 watched fine-tunes, each with a year of checkpoints,
events and deliveries, then measures on the real listener (HttpServer + the status page, as the daemon serves it):
- the overview (`/`, default sort, and `?sort=loss`) cold (the first request after a start: reads every
  fine-tune's summary, kept on write) and warm (steady state: only fine-tunes whose revision moved are re-read),
  goal < 300 ms;
- the same after 20 fine-tunes changed (a poll committed a checkpoint);
- a run page with the longest history, `/events`, and the JSON API;
- the event loop's lag (what a poll would wait for) while pages render back to back, against idle.

The same database is then copied into a throwaway PostgreSQL cluster and measured again through PostgresReports
(bench/pages_postgres.py), when PostgreSQL's server binaries are installed.

Run: `.venv/bin/python bench/pages.py [--stores sqlite,postgresql]` or as a section of `bench/run.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from watcher.core.events import rfc3339
from watcher.core.health import PollHealth, Verdict
from watcher.core.models import FineTuneRef
from watcher.observe.server import HttpServer
from watcher.store import SqliteReports, SqliteStore
from watcher.store.pages import Reports, backfill_summaries
from watcher.web import views
from watcher.web.site import StatusPages

YEAR_S = 365 * 86400
NOTIFIERS = ("team-webhook", "team-slack")


def refs_of(count: int) -> list[FineTuneRef]:
    """The watched fine-tunes."""
    return [FineTuneRef("bench", f"repo-{i % 40}", f"ft-{i:05d}", f"run {i:05d}") for i in range(count)]


def build(path: Path, refs: list[FineTuneRef], *, checkpoints: int, long_run: int, now: float) -> dict[str, int]:
    """A year of history: checkpoints spread over the year, an event per checkpoint and per deployment change,
    two notifiers' outbox rows per event (delivered, a few dead, the newest pending)."""
    rng = random.Random(7)
    store = SqliteStore(path)
    store.close()
    import sqlite3

    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("BEGIN")
    counts = {"checkpoints": 0, "events": 0, "deliveries": 0}
    seq = 0
    for index, ref in enumerate(refs):
        key = ref.key
        count = long_run if index == 0 else checkpoints
        start = now - YEAR_S + rng.uniform(0, YEAR_S * 0.5)
        span = rng.uniform(3600, now - start - 60)
        failing = index % 50 == 7
        not_found = index % 100 == 13
        db.execute(
            "INSERT INTO fine_tunes (fine_tune_key, baselined, not_found, consecutive_failures, failing, best_loss, "
            "body_hash, last_poll_at, last_outcome, last_error, last_http_status, last_success_at, revision) "
            "VALUES (?, 1, ?, ?, ?, NULL, ?, ?, ?, ?, ?, ?, 1)",
            (
                key,
                int(not_found),
                5 if failing else 0,
                int(failing),
                f"h{index}",
                now - rng.uniform(0, 60),
                "error" if failing else ("not_found" if not_found else "ok"),
                "Hub answered 503" if failing else None,
                503 if failing else (404 if not_found else 200),
                now - 600 if failing else now - rng.uniform(0, 60),
            ),
        )
        rows, events, deliveries = [], [], []
        loss0 = rng.uniform(2.0, 4.0)
        for i in range(count):
            step = 100 * (i + 1)
            at = start + span * (i + 1) / count
            loss = loss0 * (0.15 + 0.85 * 2.718 ** (-i / (count / 5))) * rng.uniform(0.95, 1.05)
            if rng.random() < 0.01:
                loss *= 8  # a spike
            data = {
                "step": step,
                "created_at": rfc3339(at),
                "deployment_status": "ACTIVE" if i == count - 1 and index % 3 == 0 else None,
                "inference_samples": [],
                "metrics": {
                    "epoch": round(step / 1000, 4),
                    "grad_norm": round(rng.uniform(0.5, 2.0), 4),
                    "learning_rate": 2e-5 * (1 - i / count),
                    "loss": round(loss, 5),
                    "mean_token_accuracy": round(max(0.0, 1 - loss / 4), 4),
                },
                "model_id": None,
                "model_name": f"{ref.id}-step-{step}",
                "path": f"checkpoints/step-{step}",
                "size_bytes": 1_234_567_890,
            }
            rows.append((key, step, f"fp{step}", orjson.dumps(data).decode()))
            seq += 1
            event_id = f"evt_{seq:026d}"
            envelope = {
                "id": event_id,
                "type": "checkpoint.created",
                "timestamp": rfc3339(at),
                "data": {"fine_tune": ref.as_data(), "checkpoint": data, "is_best_loss": False},
            }
            events.append((seq, event_id, "checkpoint.created", key, at, orjson.dumps(envelope).decode()))
            for notifier in NOTIFIERS:
                if i == count - 1 and index % 10 == 0:
                    state = "pending"
                elif rng.random() < 0.002:
                    state = "dead"
                else:
                    state = "delivered"
                deliveries.append((seq, event_id, notifier, key, event_id, state, 1, at, at))
        db.executemany("INSERT INTO checkpoints (fine_tune_key, step, fingerprint, data) VALUES (?, ?, ?, ?)", rows)
        db.executemany(
            "INSERT INTO events (seq, id, type, fine_tune_key, created_at, envelope) VALUES (?, ?, ?, ?, ?, ?)",
            events,
        )
        db.executemany(
            "INSERT INTO deliveries (event_seq, event_id, notifier, fine_tune_key, batch_id, state, attempts, "
            "next_attempt_at, queued_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            deliveries,
        )
        counts["checkpoints"] += len(rows)
        counts["events"] += len(events)
        counts["deliveries"] += len(deliveries)
    # the per-fine-tune summaries the store writes with each poll's checkpoints, filled as the migration does
    backfill_summaries(db, mark="?", fields=SqliteReports.checkpoint_fields, source=SqliteReports.checkpoint_from)
    db.execute("COMMIT")
    db.close()
    return counts


def snapshot_for(refs: list[FineTuneRef]) -> Any:
    """A live snapshot as the daemon would give it."""
    health = {ref.key: PollHealth(polls=10, last_outcome="ok", last_poll_at=time.time() - 5) for ref in refs}

    def snapshot() -> views.LiveSnapshot:
        return views.LiveSnapshot(
            refs=tuple(refs),
            health=health,
            notifiers=NOTIFIERS,
            disabled=frozenset(),
            alive=Verdict(True),
            ready=Verdict(True),
            now=time.time(),
        )

    return snapshot


def pct(values: list[float], q: float) -> float:
    """A percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def timed(client: httpx.AsyncClient, path: str, times: int) -> list[float]:
    """Wall times (ms) of sequential GETs of one path."""
    found = []
    for _ in range(times):
        started = time.perf_counter()
        response = await client.get(path)
        found.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, (path, response.status_code)
    return found


async def loop_lag(duration_s: float, load: Any = None) -> list[float]:
    """How late (ms) 10 ms sleeps wake up on this loop for a while, with `load` running beside."""
    task = asyncio.create_task(load()) if load else None
    lags = []
    deadline = time.monotonic() + duration_s
    while time.monotonic() < deadline:
        started = time.perf_counter()
        await asyncio.sleep(0.01)
        lags.append(max(0.0, (time.perf_counter() - started) * 1000 - 10))
    if task is not None:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
    return lags


def touch(path: Path, refs: list[FineTuneRef], count: int) -> None:
    """A poll's commit for `count` fine-tunes: a new checkpoint and a revision bump."""
    import sqlite3

    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    for ref in refs[:count]:
        step = db.execute("SELECT MAX(step) FROM checkpoints WHERE fine_tune_key = ?", (ref.key,)).fetchone()[0]
        data = {"step": step + 100, "metrics": {"loss": 0.5}, "created_at": rfc3339(time.time())}
        db.execute(
            "INSERT INTO checkpoints (fine_tune_key, step, fingerprint, data) VALUES (?, ?, 'x', ?)",
            (ref.key, step + 100, orjson.dumps(data).decode()),
        )
        db.execute("UPDATE fine_tunes SET revision = revision + 1 WHERE fine_tune_key = ?", (ref.key,))
    keys = [ref.key for ref in refs[:count]]  # and their summaries, as the store writes them in the same commit
    backfill_summaries(
        db, mark="?", fields=SqliteReports.checkpoint_fields, source=SqliteReports.checkpoint_from, keys=keys
    )
    db.execute("COMMIT")
    db.close()


async def measure(
    reports: Callable[[], Reports], changed: Callable[[int], None], refs: list[FineTuneRef], times: int
) -> dict[str, Any]:
    """Render times over HTTP on the real listener, and the event loop's lag beside them; `changed(n)` commits a
    new checkpoint to n fine-tunes."""
    server = HttpServer(
        host="127.0.0.1",
        port=0,
        registry=CollectorRegistry(),
        liveness=lambda: Verdict(True),
        readiness=lambda: Verdict(True),
        pages=StatusPages(reports=reports(), snapshot=snapshot_for(refs)),
    )
    await server.start()
    result: dict[str, Any] = {}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=60) as client:
            result["overview_cold_ms"] = (await timed(client, "/", 1))[0]
            for name, path_ in (
                ("overview", "/"),
                ("overview_sort_loss", "/?sort=loss"),
                ("overview_page_20", "/?sort=name&page=20"),
                ("run_page_longest", f"/fine-tunes/{refs[0].namespace}/{refs[0].repo}/{refs[0].id}"),
                ("run_page", f"/fine-tunes/{refs[1].namespace}/{refs[1].repo}/{refs[1].id}"),
                ("events", "/events"),
                ("api_fine_tunes_all", "/api/v1/fine-tunes?per_page=2000"),
                ("api_events", "/api/v1/events?limit=1000"),
            ):
                warm = await timed(client, path_, times)
                result[name] = {"p50_ms": statistics.median(warm), "p95_ms": pct(warm, 0.95), "max_ms": max(warm)}
            changed(20)
            result["overview_after_20_changed_ms"] = (await timed(client, "/", 1))[0]

            async def hammer() -> None:
                while True:
                    await client.get("/")

            idle = await loop_lag(3.0)
            busy = await loop_lag(3.0, hammer)
            result["loop_lag_idle"] = {
                "p50_ms": statistics.median(idle),
                "p99_ms": pct(idle, 0.99),
                "max_ms": max(idle),
            }
            result["loop_lag_rendering"] = {
                "p50_ms": statistics.median(busy),
                "p99_ms": pct(busy, 0.99),
                "max_ms": max(busy),
            }
    finally:
        await server.stop()
    return result


def render_cpu(
    make: Callable[[], Reports], refs: list[FineTuneRef], times: int, server_cpu: Callable[[], float] | None = None
) -> dict[str, float]:
    """CPU time (ms) of the overview's reads and render alone, the first one of a new Reports (as after a start)
    and warm (this thread's time, plus the database server's for PostgreSQL (`server_cpu`: its processes' CPU
    seconds): load elsewhere on the machine does not count)."""
    from watcher.web import pages

    reports = make()
    snapshot = snapshot_for(refs)
    server_before = server_cpu() if server_cpu else 0.0
    started = time.thread_time()  # the templates are compiled by now: the reads, and the render
    pages.overview_html(reports, snapshot(), column="failing", descending=False, page=1)
    cold_ms = (time.thread_time() - started) * 1000
    cold_server_ms = ((server_cpu() if server_cpu else 0.0) - server_before) * 1000
    found = []
    for _ in range(times):
        started = time.thread_time()
        pages.overview_html(reports, snapshot(), column="failing", descending=False, page=1)
        found.append((time.thread_time() - started) * 1000)
    reports.close()
    return {
        "p50_ms": statistics.median(found),
        "max_ms": max(found),
        "cold_ms": cold_ms,
        "cold_server_ms": cold_server_ms,
    }


def run(
    *,
    fine_tunes: int = 2000,
    checkpoints: int = 100,
    long_run: int = 5000,
    times: int = 20,
    stores: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """The whole section: build, measure on each store (SQLite, and PostgreSQL when its server is installed)."""
    from watcher.testing.pgcluster import find_server_bindir

    stores = stores or (("sqlite", "postgresql") if find_server_bindir() is not None else ("sqlite",))
    print(
        f"== Status page: {fine_tunes} fine-tunes x {checkpoints} checkpoints over a year (one run of {long_run}), "
        f"an event and 2 deliveries per checkpoint; stores: {', '.join(stores)} =="
    )
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "watcher.db"
        refs = refs_of(fine_tunes)
        started = time.perf_counter()
        counts = build(path, refs, checkpoints=checkpoints, long_run=long_run, now=time.time())
        size_mb = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 1e6
        print(
            f"database: {counts['checkpoints']:,} checkpoints, {counts['events']:,} events, "
            f"{counts['deliveries']:,} deliveries, {size_mb:.0f} MB (built in {time.perf_counter() - started:.0f} s)"
        )
        result["dataset"] = {**counts, "fine_tunes": fine_tunes, "size_mb": size_mb}
        if "sqlite" in stores:
            figures = asyncio.run(measure(lambda: SqliteReports(path), lambda n: touch(path, refs, n), refs, times))
            figures["overview_cpu"] = render_cpu(lambda: SqliteReports(path), refs, times)
            result["sqlite"] = report("SQLite", figures)
        if "postgresql" in stores:
            import pages_postgres

            from watcher.testing.pgcluster import throwaway_cluster

            with throwaway_cluster() as cluster:
                url = cluster.create_database("pages")
                print(f"copied into PostgreSQL in {pages_postgres.copy_from_sqlite(path, url):.0f} s")
                figures = asyncio.run(
                    measure(
                        lambda: pages_postgres.reports_factory(url),
                        lambda n: pages_postgres.touch(url, refs, n),
                        refs,
                        times,
                    )
                )
                figures["overview_cpu"] = render_cpu(
                    lambda: pages_postgres.reports_factory(url),
                    refs,
                    times,
                    server_cpu=lambda: pages_postgres.server_cpu_s(cluster.postmaster_pid()),
                )
                result["postgresql"] = report("PostgreSQL", figures)
    return result


def report(store: str, result: dict[str, Any]) -> dict[str, Any]:
    """Print one store's figures."""
    print(f"-- {store}")
    cold = result["overview_cold_ms"]
    print(
        f"overview, first request after a start (every fine-tune's summary): {cold:.0f} ms "
        f"(goal < 300 ms: {'met' if cold < 300 else 'NOT met'})"
    )
    for name in (
        "overview",
        "overview_sort_loss",
        "overview_page_20",
        "run_page_longest",
        "run_page",
        "events",
        "api_fine_tunes_all",
        "api_events",
    ):
        figures = result[name]
        p50, p95, most = figures["p50_ms"], figures["p95_ms"], figures["max_ms"]
        print(f"{name:<22} p50 {p50:6.1f} ms  p95 {p95:6.1f} ms  max {most:6.1f} ms")
    cpu = result["overview_cpu"]
    first = cpu["cold_ms"] + cpu["cold_server_ms"]
    print(
        f"overview CPU per render (reads + render, this thread): first after a start {cpu['cold_ms']:.1f} ms "
        f"+ {cpu['cold_server_ms']:.1f} ms of the database server's = {first:.0f} ms (goal < 300 ms: "
        f"{'met' if first < 300 else 'NOT met'}), then p50 {cpu['p50_ms']:.1f} ms, max {cpu['max_ms']:.1f} ms"
    )
    goal = result["overview"]["p95_ms"]
    print(f"overview p95 {goal:.0f} ms (goal < 300 ms): {'met' if goal < 300 else 'NOT met'}")
    print(f"overview after 20 fine-tunes changed: {result['overview_after_20_changed_ms']:.0f} ms")
    idle, busy = result["loop_lag_idle"], result["loop_lag_rendering"]
    print(
        f"event-loop lag, idle: p50 {idle['p50_ms']:.2f} ms, p99 {idle['p99_ms']:.2f} ms, max {idle['max_ms']:.1f} ms; "
        f"rendering overviews back to back: p50 {busy['p50_ms']:.2f} ms, p99 {busy['p99_ms']:.2f} ms, "
        f"max {busy['max_ms']:.1f} ms"
    )
    return result


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fine-tunes", type=int, default=2000)
    parser.add_argument("--checkpoints", type=int, default=100)
    parser.add_argument("--long-run", type=int, default=5000)
    parser.add_argument("--times", type=int, default=20)
    parser.add_argument("--stores", default=None, help="sqlite,postgresql (default: both when PostgreSQL is installed)")
    args = parser.parse_args()
    stores = tuple(args.stores.split(",")) if args.stores else None
    run(
        fine_tunes=args.fine_tunes,
        checkpoints=args.checkpoints,
        long_run=args.long_run,
        times=args.times,
        stores=stores,
    )


if __name__ == "__main__":
    main()
