"""Stamping drafts into events: ids, timestamps, and the 16 kB size bound."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import orjson
from ulid import ULID

from watcher.core.models import JSON, Event, EventDraft

MAX_EVENT_BYTES = 16_000


def new_event_id() -> str:
    """A unique, time-ordered event id without '.' (signatures join fields with '.')."""
    return f"evt_{ULID()}"


def rfc3339(epoch_s: float) -> str:
    """An RFC 3339 UTC timestamp with milliseconds, e.g. 2026-11-25T15:06:56.123Z."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def stamp(draft: EventDraft, *, fine_tune_key: str, now: float, event_id: str | None = None) -> Event:
    """An event from a draft: a new id, the time of detection, and data that fits the size bound."""
    return Event(
        id=event_id or new_event_id(),
        type=draft.type,
        timestamp=rfc3339(now),
        data=fit_data(draft.data),
        fine_tune_key=fine_tune_key,
    )


def _size(data: JSON) -> int:
    # The envelope adds about 120 bytes of id, type and timestamp around data.
    return len(orjson.dumps(data)) + 160


def _shorten(value: Any, *, max_chars: int, max_items: int) -> Any:
    if isinstance(value, str) and len(value) > max_chars:
        return value[:max_chars] + "…"
    if isinstance(value, list):
        return [_shorten(item, max_chars=max_chars, max_items=max_items) for item in value[:max_items]]
    if isinstance(value, dict):
        items = list(value.items())[: max_items * 4]
        return {key[:max_chars]: _shorten(item, max_chars=max_chars, max_items=max_items) for key, item in items}
    return value


_ESSENTIAL = ("step", "created_at", "deployment_status", "model_id", "model_name", "path", "size_bytes")


def fit_data(data: JSON) -> JSON:
    """Event data under MAX_EVENT_BYTES: inference samples trimmed first, then any oversized value.

    Sets `truncated = true` when anything was cut.
    """
    if _size(data) <= MAX_EVENT_BYTES:
        return data
    data = copy.deepcopy(data)
    data["truncated"] = True
    checkpoint = data.get("checkpoint")
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("inference_samples"), list):
        samples = [_shorten(sample, max_chars=300, max_items=20) for sample in checkpoint["inference_samples"]]
        checkpoint["inference_samples"] = samples
        while samples and _size(data) > MAX_EVENT_BYTES:
            samples.pop()
    for max_chars, max_items in ((1000, 50), (200, 20), (64, 8)):
        if _size(data) <= MAX_EVENT_BYTES:
            return data
        data = _shorten(data, max_chars=max_chars, max_items=max_items)
    if isinstance(checkpoint, dict) and _size(data) > MAX_EVENT_BYTES:
        metrics = _dict(checkpoint.get("metrics"))
        data["checkpoint"] = {
            **{key: _shorten(checkpoint.get(key), max_chars=64, max_items=1) for key in _ESSENTIAL},
            "metrics": {k[:64]: v for k, v in list(metrics.items())[:16] if isinstance(v, int | float) or v is None},
            "inference_samples": [],
        }
    return data


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def describe(event: Event) -> str:
    """A one-line human summary of an event (demo output, CLI tables, chat fallbacks)."""
    data = event.data
    name = _dict(data.get("fine_tune")).get("name", "?")
    checkpoint = _dict(data.get("checkpoint"))
    step = checkpoint.get("step")
    metrics = _dict(checkpoint.get("metrics"))
    if event.type == "checkpoint.created":
        parts = [f"{name}: new checkpoint at step {step}"]
        shown = [
            f"{m} {_number(metrics[m])}"
            for m in ("loss", "mean_token_accuracy", "learning_rate")
            if metrics.get(m) is not None
        ]
        if shown:
            parts.append(", ".join(shown))
        if data.get("is_best_loss"):
            parts.append("best loss so far")
        return " · ".join(parts)
    if event.type == "checkpoint.updated":
        return f"{name}: step {step} updated ({', '.join(data.get('changed') or [])})"
    if event.type == "checkpoint.deployment_changed":
        before = data.get("previous_deployment_status") or "none"
        after = data.get("deployment_status") or "none"
        return f"{name}: step {step} deployment {before} -> {after}"
    if event.type == "checkpoint.removed":
        return f"{name}: step {step} removed"
    if event.type == "fine_tune.not_found":
        return f"{name}: fine-tune not found on the Hub (404)"
    if event.type == "fine_tune.poll_failing":
        return f"{name}: polls failing ({data.get('consecutive_failures')} in a row): {data.get('error')}"
    if event.type == "fine_tune.poll_recovered":
        return f"{name}: polls recovered after {data.get('consecutive_failures')} failures"
    if event.type == "watcher.test":
        return f"test event from oxen-watcher for notifier {data.get('notifier')}"
    lifecycle = _describe_lifecycle(event.type, name, data)
    return lifecycle if lifecycle is not None else f"{name}: {event.type}"


def duration_text(seconds: Any) -> str | None:
    """A duration in seconds as "1h 02m", "3m 05s" or "42s"; None when not a number."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
        return None
    total = round(seconds)
    days, rest = divmod(total, 86_400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _describe_lifecycle(kind: str, name: Any, data: JSON) -> str | None:
    if kind == "fine_tune.discovered":
        by = f" by {data['created_by']}" if data.get("created_by") else ""
        model = f" on {data['base_model']}" if data.get("base_model") else ""
        return f"{name}: new fine-tune{model}{by} in {data.get('source')} ({data.get('status') or 'unknown status'})"
    if kind == "fine_tune.stalled":
        stalled = duration_text(data.get("stalled_for_s")) or "a while"
        return f"{name}: no new checkpoint for {stalled} while {data.get('status')}"
    if kind != "fine_tune.status_changed":
        return None
    status = data.get("status")
    parts = [f"{name}: {data.get('previous_status')} -> {status}"]
    duration = duration_text(data.get("duration_s"))
    if duration:
        parts.append(f"ran {duration}")
    if "checkpoints" in data:
        parts.append(f"{data.get('checkpoints')} checkpoints")
        if data.get("best_loss") is not None:
            parts.append(f"best loss {_number(data['best_loss'])} at step {data.get('best_step')}")
    if status == "errored" and data.get("error"):
        parts.append(str(data["error"])[:200])
    return " · ".join(parts)
