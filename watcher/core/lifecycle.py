"""The pure lifecycle rules: previous state + the Hub's fine-tune + the known checkpoints + now -> events.

Like diff.py: no I/O, no clock of its own (now is passed in), no ids. Also the adaptive poll policy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from watcher.core.events import rfc3339
from watcher.core.models import (
    FINE_TUNE_STALLED,
    FINE_TUNE_STATUS_CHANGED,
    JSON,
    TERMINAL_STATUSES,
    EventDraft,
    FineTuneRef,
    HubFineTune,
    KnownCheckpoint,
    LifecycleState,
    metric_of,
    parse_time,
)

RUNNING = "running"
DEPLOYED = "deployed"
# Before training starts there is nothing to poll but the status.
WAITING_STATUSES = frozenset({"created", "tokenizing", "enqueued"})
# Deployment statuses (Oxen's and Baseten's forms, normalized) during which a checkpoint changes quickly.
TRANSITIONAL_DEPLOYMENTS = frozenset(
    {"building", "deploying", "loading", "loading model", "updating", "waking up", "deactivating"}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class LifecycleOptions:
    """The knobs of the lifecycle rules, from [lifecycle]."""

    stall_after_s: float = 0.0  # 0: stalls are not detected


@dataclass(frozen=True, slots=True)
class LifecycleTransition:
    """What one evaluation yields: events, the state to persist, and whether to poll checkpoints at once.

    `poll_checkpoints_now` is set on the transition to a terminal status: the final checkpoints must be polled
    and committed before the status_changed event is delivered (see wants_final_poll()).
    """

    events: tuple[EventDraft, ...]
    state: LifecycleState
    poll_checkpoints_now: bool = False


def _norm(status: str | None) -> str | None:
    return status.casefold() if status is not None else None


def is_terminal(status: str | None) -> bool:
    """Whether a status is terminal (completed, stopped, errored; letter case ignored)."""
    return _norm(status) in TERMINAL_STATUSES


def is_transitional_deployment(status: str | None) -> bool:
    """Whether a checkpoint's deployment status is on its way somewhere (building, LOADING_MODEL, waking up...)."""
    if not status:
        return False
    return " ".join(status.casefold().replace("_", " ").replace("-", " ").split()) in TRANSITIONAL_DEPLOYMENTS


def checkpoint_interval(
    status: str | None,
    deployment_statuses: Iterable[str | None],
    *,
    interval_s: float,
    idle_interval_s: float,
) -> float | None:
    """How often to poll a fine-tune's checkpoints in this status; None: not at all (status reads only).

    created/tokenizing/enqueued: None; running and any unknown status (or none read yet): interval_s; terminal
    statuses and deployed: idle_interval_s, unless a checkpoint's deployment is transitional (then interval_s).
    """
    normalized = _norm(status)
    if normalized in WAITING_STATUSES:
        return None
    if normalized in TERMINAL_STATUSES or normalized == DEPLOYED:
        if any(is_transitional_deployment(value) for value in deployment_statuses):
            return interval_s
        return idle_interval_s
    return interval_s


def status_due(last_status_at: float | None, *, now: float, status_interval_s: float) -> bool:
    """Whether a fine-tune's status (from a list page or a single read, whichever came last) needs a new read."""
    return last_status_at is None or now - last_status_at >= status_interval_s


def wants_final_poll(old: LifecycleState, fine_tune: HubFineTune) -> bool:
    """Whether this status read is the transition to a terminal status (poll checkpoints once, before advance())."""
    if old.status is None or fine_tune.status is None:
        return False
    return is_terminal(fine_tune.status) and _norm(old.status) != _norm(fine_tune.status)


def summary(checkpoints: Mapping[int, KnownCheckpoint]) -> JSON:
    """The run summary of a terminal status: checkpoints (count), latest_step, best_loss, best_step."""
    best_loss: float | None = None
    best_step: int | None = None
    for step in sorted(checkpoints):
        loss = metric_of(checkpoints[step].data, "loss")
        if loss is not None and (best_loss is None or loss < best_loss):
            best_loss, best_step = loss, step
    return {
        "checkpoints": len(checkpoints),
        "latest_step": max(checkpoints, default=None),
        "best_loss": best_loss,
        "best_step": best_step,
    }


def _duration(started_at: str | None, finished_at: str | None) -> float | None:
    started, finished = parse_time(started_at), parse_time(finished_at)
    if started is None or finished is None:
        return None
    return round(max(0.0, finished - started), 3)


def advance(
    ref: FineTuneRef,
    old: LifecycleState,
    fine_tune: HubFineTune | None,
    *,
    checkpoints: Mapping[int, KnownCheckpoint] | None,
    now: float,
    options: LifecycleOptions = LifecycleOptions(),
) -> LifecycleTransition:
    """Events and new state after a status read (fine_tune given) or a checkpoint poll (fine_tune None).

    The first status is recorded silently; a change of status (letter case alone is none) is a
    fine_tune.status_changed, with the run summary for a terminal status computed from `checkpoints` (the
    committed checkpoints, so poll them first when wants_final_poll() says so); a running fine-tune without a
    new checkpoint for stall_after_s is a fine_tune.stalled, once per stall. `checkpoints` None: not read yet
    (no 200 committed), so no stall is judged: checkpoints the Hub had all along, first seen by the first poll,
    would end a stall judged without them and start a second one.
    """
    known: Mapping[int, KnownCheckpoint] = checkpoints if checkpoints is not None else {}
    events: list[EventDraft] = []
    state = old
    poll_now = False
    if fine_tune is not None and fine_tune.status is not None:
        state = replace(
            state,
            error=fine_tune.error,
            started_at=fine_tune.started_at or state.started_at,
            finished_at=fine_tune.finished_at or state.finished_at,
        )
        if old.status is None:
            state = replace(state, status=fine_tune.status, first_seen_at=old.first_seen_at or now)
        elif _norm(old.status) != _norm(fine_tune.status):
            poll_now = wants_final_poll(old, fine_tune)
            state = replace(state, status=fine_tune.status)
            events.append(_status_changed(ref, old.status, fine_tune, known))
        else:
            state = replace(state, status=fine_tune.status)
    elif state.first_seen_at is None:
        state = replace(state, first_seen_at=now)
    if checkpoints is not None:
        state, stall = _stall(ref, state, checkpoints, now=now, options=options)
        events.extend(stall)
    return LifecycleTransition(tuple(events), state, poll_now)


def _status_changed(
    ref: FineTuneRef, previous: str, fine_tune: HubFineTune, checkpoints: Mapping[int, KnownCheckpoint]
) -> EventDraft:
    data: JSON = {
        "fine_tune": ref.as_data(),
        "previous_status": previous,
        "status": fine_tune.status,
        "error": fine_tune.error,
        "started_at": fine_tune.started_at,
        "finished_at": fine_tune.finished_at,
        "duration_s": _duration(fine_tune.started_at, fine_tune.finished_at),
    }
    if is_terminal(fine_tune.status):
        data.update(summary(checkpoints))
    return EventDraft(FINE_TUNE_STATUS_CHANGED, data)


def _stall(
    ref: FineTuneRef,
    state: LifecycleState,
    checkpoints: Mapping[int, KnownCheckpoint],
    *,
    now: float,
    options: LifecycleOptions,
) -> tuple[LifecycleState, list[EventDraft]]:
    newest = max(checkpoints, default=None)
    if newest is not None and newest != state.newest_step:
        # a new checkpoint (or the first one known): it ends any stall and restarts the clock
        state = replace(state, newest_step=newest, newest_seen_at=now, stalled=False)
    if _norm(state.status) != RUNNING:
        if state.stalled or (newest is None and state.newest_seen_at is not None):
            state = replace(state, stalled=False, newest_seen_at=None if newest is None else state.newest_seen_at)
        return state, []
    if newest is None and state.newest_seen_at is None:
        # running with no checkpoint: without a started_at, the clock runs from when running was first seen
        state = replace(state, newest_seen_at=now)
    if options.stall_after_s <= 0 or state.stalled:
        return state, []
    last_checkpoint_at: str | None = None
    if newest is not None:
        created = checkpoints[newest].data.get("created_at")
        since = parse_time(created if isinstance(created, str) else None)
        if since is None:
            since = state.newest_seen_at
        # no created_at from the Hub: when the watcher first saw the checkpoint stands in for it
        last_checkpoint_at = created if isinstance(created, str) else _time_or_none(state.newest_seen_at)
    else:
        since = parse_time(state.started_at)
        if since is None:
            since = state.newest_seen_at
    if since is None or now - since < options.stall_after_s:
        return state, []
    event = EventDraft(
        FINE_TUNE_STALLED,
        {
            "fine_tune": ref.as_data(),
            "status": state.status,
            "last_checkpoint_at": last_checkpoint_at,
            "stalled_for_s": round(now - since, 3),
        },
    )
    return replace(state, stalled=True), [event]


def _time_or_none(epoch_s: float | None) -> str | None:
    return None if epoch_s is None else rfc3339(epoch_s)
