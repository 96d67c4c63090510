"""The simulated Hub's records: fine-tunes with checkpoints and a lifecycle (statuses, scripted transitions),
FineTune objects, list queries.

Plain records and pure helpers; the SimHub holds them under its lock and serves them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from watcher.testing.simhub.faults import Fault

TERMINAL = frozenset({"completed", "stopped", "errored"})
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
DEFAULT_ERROR = "Training failed: CUDA out of memory"


@dataclass(frozen=True, slots=True)
class StatusStep:
    """One scripted transition: `at_s` seconds after the script was set, the status becomes `status`."""

    at_s: float
    status: str
    error: str | None = None


@dataclass
class RunInfo:
    """A fine-tune's lifecycle as the simulated Hub keeps it (times are Unix seconds)."""

    created_at: float
    seq: int  # insertion order: breaks ties between equal created_at
    status: str = "running"
    error: str | None = None
    base_model: str = "Qwen/Qwen3-0.6B"
    created_by: str | None = "simuser"
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    visible_at: float = 0.0  # a fine-tune "created" later is invisible (404, not listed) until then
    script: deque[tuple[float, StatusStep]] = field(default_factory=deque)


@dataclass
class FineTuneRecord:
    """One fine-tune of the simulated Hub: its checkpoints by step, queued faults, and its lifecycle."""

    namespace: str
    repo: str
    id: str
    name: str
    checkpoints: dict[int, dict[str, Any]] = field(default_factory=dict)
    faults: deque[Fault] = field(default_factory=deque)
    body: bytes | None = None  # cached serialized checkpoints answer, dropped on every change
    run: RunInfo = field(default_factory=lambda: RunInfo(created_at=time.time(), seq=0))


def key_of(namespace: str, repo: str, fine_tune_id: str) -> str:
    """The key "namespace/repo/id" of a fine-tune."""
    return f"{namespace}/{repo}/{fine_tune_id}"


def iso(epoch_s: float | None) -> str | None:
    """ISO 8601 UTC with a Z, as the Hub writes times."""
    if epoch_s is None:
        return None
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def set_status(run: RunInfo, status: str, *, now: float, error: str | None = None) -> None:
    """Move a run to a status the way the Hub does: started_at on running, finished_at on a terminal status."""
    run.status = status
    run.updated_at = now
    if status == "running" and run.started_at is None:
        run.started_at = now
    if status in TERMINAL:
        if run.started_at is None:
            run.started_at = now
        run.finished_at = run.finished_at or now
    if status == "errored":
        run.error = error or DEFAULT_ERROR
    elif status != "deployed":
        run.error = error


def apply_due(run: RunInfo, now: float) -> None:
    """Apply the scripted transitions that are due at `now`, in order."""
    while run.script and run.script[0][0] <= now:
        at, step = run.script.popleft()
        set_status(run, step.status, now=at, error=step.error)


def script(run: RunInfo, steps: Sequence[StatusStep], *, now: float) -> None:
    """Replace a run's script with these steps (at_s relative to now)."""
    run.script = deque(sorted(((now + step.at_s, step) for step in steps), key=lambda item: item[0]))


def run_steps(*, step_s: float, run_s: float, outcome: str, error: str | None) -> list[StatusStep]:
    """created -> tokenizing -> enqueued -> running -> outcome, `step_s` apart, running for `run_s`."""
    return [
        StatusStep(0.0, "created"),
        StatusStep(step_s, "tokenizing"),
        StatusStep(2 * step_s, "enqueued"),
        StatusStep(3 * step_s, "running"),
        StatusStep(3 * step_s + run_s, outcome, error if outcome == "errored" else None),
    ]


def fine_tune_object(
    fine_tune_id: str, name: str, run: RunInfo, *, repository_id: str, form: Literal["full", "simple"] = "full"
) -> dict[str, Any]:
    """The FineTune object: every documented field (full), or the simplified list entry (simple)."""
    simple = {
        "id": fine_tune_id,
        "name": name,
        "base_model": run.base_model,
        "status": run.status,
        "created_at": iso(run.created_at),
        "updated_at": iso(run.updated_at or run.created_at),
    }
    if form == "simple":
        return simple
    running_s = 0.0 if run.started_at is None else (run.finished_at or run.updated_at) - run.started_at
    user: dict[str, Any] | None = None
    if run.created_by is not None:
        user = {
            "id": f"user_{run.created_by}",
            "name": run.created_by.title(),
            "username": run.created_by,
            "image": None,
        }
    return {
        **simple,
        "display_name": name,
        "description": None,
        "error": run.error,
        "created_by": user,
        "inserted_at": iso(run.created_at),
        "started_at": iso(run.started_at),
        "finished_at": iso(run.finished_at),
        "queue_position": 1 if run.status == "enqueued" else None,
        "gpu_model": "H100",
        "gpu_count": 1,
        "credits_used": round(max(0.0, running_s) * 0.001, 4),
        "rate_per_second": 0.001,
        "total_token_count": 123_456,
        "repository_id": repository_id,
        "resource": {"path": "train.parquet", "version": "main"},
        "output_resource": None,
        "deployed_model": None,
        "source_model": None,
        "training_params": {"epochs": 1, "learning_rate": 2e-5, "batch_size": 8},
        "fine_tune_script": None,
    }


class BadQuery(ValueError):
    """A list query parameter the Hub would refuse (400 invalid_params)."""


def _positive_int(query: Mapping[str, str], name: str, default: int, maximum: int) -> int:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= maximum:
        raise BadQuery(f"{name} must be an integer from 1 to {maximum}")
    return int(raw)


def select_page(
    entries: Sequence[tuple[str, str, RunInfo]], query: Mapping[str, str]
) -> list[tuple[str, str, RunInfo]]:
    """One page of (id, name, run) entries for a list query: filters, sort (newest first by default), paging."""
    page = _positive_int(query, "page", 1, 1_000_000)
    page_size = _positive_int(query, "page_size", DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    sort = query.get("sort") or "newest"
    if sort not in ("newest", "oldest"):
        raise BadQuery("sort must be newest or oldest")
    status = query.get("status")
    search = (query.get("search") or "").casefold()
    created_by = query.get("created_by")
    chosen = [
        entry
        for entry in entries
        if (not status or entry[2].status == status)
        and (not created_by or entry[2].created_by == created_by)
        and (not search or search in entry[0].casefold() or search in entry[1].casefold())
    ]
    chosen.sort(key=lambda entry: (entry[2].created_at, entry[2].seq), reverse=sort == "newest")
    start = (page - 1) * page_size
    return chosen[start : start + page_size]
