"""Stored rows -> values, the same for every store: an event from its envelope, a fine-tune's status."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from watcher.core.models import Event, FineTuneStatus, metric_of

# the columns of fine_tunes that status_of reads, in its order (the key first)
STATUS_COLUMNS = (
    "fine_tune_key, last_poll_at, last_outcome, last_error, last_http_status, last_success_at, "
    "consecutive_failures, failing, not_found, baselined, not_before"
)
STATUS_METRICS = ("loss", "learning_rate", "grad_norm", "mean_token_accuracy", "epoch")


def event_from_row(envelope: str, fine_tune_key: str) -> Event:
    """An Event from its stored envelope."""
    doc = orjson.loads(envelope)
    return Event(doc["id"], doc["type"], doc["timestamp"], doc["data"], fine_tune_key)


def status_of(key: str, row: Sequence[Any] | None, checkpoints: Sequence[tuple[int, Any]]) -> FineTuneStatus:
    """A fine-tune's status from its STATUS_COLUMNS row (None: never polled) and its (step, data) checkpoints."""
    latest = checkpoints[-1][1] if checkpoints else {}
    metrics: dict[str, float | None] = {}
    for name in STATUS_METRICS:
        # the latest checkpoint that reports each metric
        metrics[name] = next((v for _, data in reversed(checkpoints) if (v := metric_of(data, name)) is not None), None)
    deployments = {
        step: data["deployment_status"] for step, data in checkpoints if isinstance(data.get("deployment_status"), str)
    }
    values = row[1:] if row else (None, None, None, None, None, 0, False, False, False, None)
    return FineTuneStatus(
        key=key,
        last_poll_at=values[0],
        last_outcome=values[1],
        last_error=values[2],
        last_http_status=values[3],
        last_success_at=values[4],
        consecutive_failures=values[5],
        failing=bool(values[6]),
        not_found=bool(values[7]),
        baselined=bool(values[8]),
        not_before=values[9],
        checkpoints=len(checkpoints),
        latest_step=checkpoints[-1][0] if checkpoints else None,
        latest_loss=metric_of(latest, "loss"),
        latest_created_at=latest.get("created_at") if isinstance(latest.get("created_at"), str) else None,
        metrics=metrics,
        deployments=deployments,
    )
