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
