"""Poll results and ids shared by the contract suite and the SQLite-specific tests."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import Any

import orjson

from watcher.core.diff import DiffOptions
from watcher.core.models import FineTuneRef, PollFailed, PollSuccess
from watcher.hub.schema import body_hash
from watcher.store import Committed, StateStore

REF = FineTuneRef(namespace="ox", repo="models", id="ft_1", name="first")
OTHER = FineTuneRef(namespace="ox", repo="models", id="ft_2", name="second")
OPTIONS = DiffOptions()
T0 = 1_750_000_000.0
DAY = 86400.0


def cp(step: int, *, loss: float | None = None, status: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "step": step,
        "created_at": f"2025-06-01T12:{step % 60:02d}:00Z",
        "deployment_status": status,
        "metrics": {"loss": loss if loss is not None else round(1.0 / (step + 1), 6), "learning_rate": 1e-5},
        "model_name": f"first-step-{step}",
        "path": f"checkpoints/step-{step}",
        "size_bytes": 1000 + step,
        **extra,
    }


def success(*checkpoints: dict[str, Any], salt: str = "") -> PollSuccess:
    """A PollSuccess as the app builds it: sorted checkpoints and the hash of the body."""
    body = orjson.dumps({"checkpoints": list(checkpoints), "status": "success", "salt": salt})
    return PollSuccess(tuple(sorted(checkpoints, key=lambda c: c["step"])), body_hash(body))


def failed(status: int | None = 503, retry_after_s: float | None = None, outcome: str = "error") -> PollFailed:
    return PollFailed(f"Hub answered {status}", status, outcome, retry_after_s)  # type: ignore[arg-type]


def counter_ids(prefix: str = "evt_t") -> Callable[[], str]:
    numbers = itertools.count(1)
    lock = threading.Lock()

    def new_id() -> str:
        with lock:
            return f"{prefix}{next(numbers):06d}"

    return new_id


def apply(store: StateStore, result: Any, *, ref: FineTuneRef = REF, now: float = T0, **kw: Any) -> Committed:
    committed = store.apply_poll(ref, result, options=kw.pop("options", OPTIONS), now=now, **kw)
    assert committed is not None
    return committed


def types(committed: Committed) -> list[str]:
    return [event.type for event in committed.events]
