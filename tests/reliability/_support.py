"""Helpers shared by the reliability suite: reading the daemon's database the way the CLI does, its metrics
and health endpoints, and the identity of each change an event announces."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
from conftest import Daemon, cli, wait_for
from prometheus_client.parser import text_string_to_metric_families

from watcher.core.models import FineTuneStatus
from watcher.errors import StoreError
from watcher.store import open_store


def events_json(config: Path, *, check: bool = True) -> Any:
    """Every event as `events --json` prints it (with its deliveries), oldest first; with check=False, None
    when the command failed (for waits while a daemon may be recovering the database)."""
    result = cli("events", "-c", str(config), "--json", "--limit", "1000000")
    if not check and result.returncode != 0:
        return None
    assert result.returncode == 0, result.stderr
    return [orjson.loads(line) for line in reversed(result.stdout.splitlines())]


def statuses(db: Path, keys: list[str]) -> dict[str, FineTuneStatus] | None:
    """The persisted per fine-tune status, read-only (None while the database is busy or not there yet)."""
    if not db.exists():
        return None
    try:
        store = open_store(db, readonly=True)
    except StoreError:
        return None
    try:
        return {status.key: status for status in store.statuses(keys)}
    except StoreError:
        return None
    finally:
        store.close()


def stored_events(db: Path, *, after: int = 0) -> list[tuple[int, dict[str, Any]]] | None:
    """Committed events with a sequence number above `after`, oldest first, as (seq, envelope), read the way
    `events` reads them (None while the database is not there yet or busy)."""
    if not db.exists():
        return None
    try:
        store = open_store(db, readonly=True)
    except StoreError:
        return None
    try:
        return [(seq, event.envelope()) for seq, event in store.events_after(after, limit=1_000_000)]
    except StoreError:
        return None
    finally:
        store.close()


def fine_tune_key(envelope: dict[str, Any]) -> str:
    ft = envelope["data"]["fine_tune"]
    return f"{ft['namespace']}/{ft['repo']}/{ft['id']}"


def change_of(envelope: dict[str, Any]) -> tuple[Any, ...]:
    """What an event says changed: (fine-tune, step, type, detail), the detail being the deployment transition
    (previous, new) or the updated fields and the new eval_loss; fine_tune.* events have no step."""
    data = envelope["data"]
    kind = envelope["type"]
    checkpoint = data.get("checkpoint") or {}
    step = checkpoint.get("step")
    detail: Any = None
    if kind == "checkpoint.deployment_changed":
        detail = (data["previous_deployment_status"], data["deployment_status"])
    elif kind == "checkpoint.updated":
        detail = (tuple(data["changed"]), (checkpoint.get("metrics") or {}).get("eval_loss"))
    return (fine_tune_key(envelope), step, kind, detail)


def listen_port(daemon: Daemon) -> int:
    """The port of the daemon's /metrics and health endpoints ([http] listen = "127.0.0.1:0")."""
    started = wait_for(
        lambda: [e for e in daemon.logs() if e.get("event") == "watcher.started"], timeout=30, what="watcher.started"
    )
    return int(started[-1]["listen"].rsplit(":", 1)[1])


def healthz(port: int) -> int:
    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code


def polls_total(port: int) -> dict[tuple[str, str], float]:
    """oxen_watcher_polls_total by (fine-tune key, outcome), from a scrape of /metrics."""
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
    assert response.status_code == 200, response.text
    found: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == "oxen_watcher_polls_total":
                labels = sample.labels
                key = f"{labels['namespace']}/{labels['repo']}/{labels['fine_tune_id']}"
                found[(key, labels["outcome"])] = sample.value
    return found
