"""The pure heart of the watcher: previous state + one poll result -> events and the new state.

No I/O, no clock, no ids: the store stamps ids and timestamps on the drafts it commits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson

from watcher.core.models import (
    CHECKPOINT_CREATED,
    CHECKPOINT_DEPLOYMENT_CHANGED,
    CHECKPOINT_REMOVED,
    CHECKPOINT_UPDATED,
    FINE_TUNE_NOT_FOUND,
    FINE_TUNE_POLL_FAILING,
    FINE_TUNE_POLL_RECOVERED,
    JSON,
    EventDraft,
    FineTuneRef,
    FineTuneState,
    KnownCheckpoint,
    PollFailed,
    PollNotFound,
    PollResult,
    PollSuccess,
    PollUnchanged,
    Transition,
    metric_of,
)

# A change in any of these (metrics compared key by key) is a checkpoint.updated; deployment_status has its
# own event, and inference_samples changes are recorded silently.
TRACKED_FIELDS = ("size_bytes", "model_id", "model_name", "path", "created_at")


@dataclass(frozen=True, slots=True, kw_only=True)
class DiffOptions:
    """The knobs of the diff, from [watch]."""

    baseline: bool = True
    failure_threshold: int = 3


def fingerprint(checkpoint: Mapping[str, Any]) -> str:
    """A digest of everything the Hub said about a checkpoint: equal digests mean nothing changed."""
    return hashlib.blake2b(orjson.dumps(checkpoint, option=orjson.OPT_SORT_KEYS), digest_size=12).hexdigest()


def _same_status(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.casefold() == b.casefold()


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The tracked fields that differ between two versions of a checkpoint (metrics dotted: metrics.loss)."""
    changed = [name for name in TRACKED_FIELDS if not _same_value(old.get(name), new.get(name))]
    old_metrics = _mapping(old.get("metrics"))
    new_metrics = _mapping(new.get("metrics"))
    for name in sorted(set(old_metrics) | set(new_metrics)):
        if not _same_value(old_metrics.get(name), new_metrics.get(name)):
            changed.append(f"metrics.{name}")
    return changed


def _same_value(a: Any, b: Any) -> bool:
    # 1 and 1.0 are the same number; True and 1 are not the same value.
    if _plain_number(a) and _plain_number(b):
        return bool(a == b)
    return type(a) is type(b) and bool(a == b)


def _plain_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _failure_data(error: str | None, http_status: int | None, consecutive_failures: int) -> JSON:
    return {"error": error, "http_status": http_status, "consecutive_failures": consecutive_failures}


def diff(
    ref: FineTuneRef, old: FineTuneState, result: PollResult, *, options: DiffOptions = DiffOptions()
) -> Transition:
    """The events one poll result yields against the previous state, and the state after it."""
    fine_tune = ref.as_data()
    if isinstance(result, PollFailed):
        failures = old.consecutive_failures + 1
        events: list[EventDraft] = []
        failing = old.failing
        if not failing and failures >= options.failure_threshold:
            failing = True
            events.append(
                EventDraft(
                    FINE_TUNE_POLL_FAILING,
                    {"fine_tune": fine_tune, **_failure_data(result.error, result.http_status, failures)},
                )
            )
        return Transition(tuple(events), replace(old, consecutive_failures=failures, failing=failing))

    events = []
    if old.failing:
        events.append(
            EventDraft(
                FINE_TUNE_POLL_RECOVERED,
                {
                    "fine_tune": fine_tune,
                    **_failure_data(None, result.http_status, old.consecutive_failures),
                },
            )
        )
    answered = replace(old, consecutive_failures=0, failing=False)

    if isinstance(result, PollNotFound):
        if not old.not_found:
            events.append(
                EventDraft(
                    FINE_TUNE_NOT_FOUND,
                    {"fine_tune": fine_tune, **_failure_data("fine-tune not found", 404, 0)},
                )
            )
        return Transition(tuple(events), replace(answered, not_found=True, body_hash=None))

    if isinstance(result, PollUnchanged):
        return Transition(tuple(events), replace(answered, not_found=False))

    assert isinstance(result, PollSuccess)
    return _diff_checkpoints(ref, answered, result, options=options, events=events)


def _diff_checkpoints(
    ref: FineTuneRef,
    old: FineTuneState,
    result: PollSuccess,
    *,
    options: DiffOptions,
    events: list[EventDraft],
) -> Transition:
    fine_tune = ref.as_data()
    silent = options.baseline and not old.baselined
    known = old.checkpoints
    best_loss = old.best_loss
    upserts: list[KnownCheckpoint] = []
    current: dict[int, KnownCheckpoint] = {}
    for checkpoint in result.checkpoints:
        step: int = checkpoint["step"]
        digest = fingerprint(checkpoint)
        previous = known.get(step)
        if previous is not None and previous.fingerprint == digest:
            current[step] = previous
            continue
        entry = KnownCheckpoint(step=step, fingerprint=digest, data=checkpoint)
        current[step] = entry
        upserts.append(entry)
        loss = metric_of(checkpoint, "loss")
        is_best = loss is not None and (best_loss is None or loss <= best_loss)
        if loss is not None and (best_loss is None or loss < best_loss):
            best_loss = loss
        if silent:
            continue
        if previous is None:
            events.append(
                EventDraft(
                    CHECKPOINT_CREATED,
                    {"fine_tune": fine_tune, "checkpoint": checkpoint, "is_best_loss": is_best},
                )
            )
            continue
        changed = changed_fields(previous.data, checkpoint)
        if changed:
            events.append(
                EventDraft(
                    CHECKPOINT_UPDATED,
                    {"fine_tune": fine_tune, "checkpoint": checkpoint, "changed": changed},
                )
            )
        new_status = checkpoint.get("deployment_status")
        if not _same_status(previous.deployment_status, new_status):
            events.append(
                EventDraft(
                    CHECKPOINT_DEPLOYMENT_CHANGED,
                    {
                        "fine_tune": fine_tune,
                        "checkpoint": checkpoint,
                        "previous_deployment_status": previous.deployment_status,
                        "deployment_status": new_status,
                    },
                )
            )
    deletes = tuple(sorted(step for step in known if step not in current))
    if not silent:
        for step in deletes:
            events.append(
                EventDraft(CHECKPOINT_REMOVED, {"fine_tune": fine_tune, "checkpoint": dict(known[step].data)})
            )
    state = replace(
        old,
        baselined=True,
        not_found=False,
        best_loss=best_loss,
        body_hash=result.body_hash,
        checkpoints=current,
    )
    return Transition(tuple(events), state, tuple(upserts), deletes)
