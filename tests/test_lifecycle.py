"""The pure lifecycle rules: status transitions, run summaries, stalls, and the adaptive poll policy."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from watcher.core.diff import fingerprint
from watcher.core.events import rfc3339
from watcher.core.lifecycle import (
    LifecycleOptions,
    advance,
    checkpoint_interval,
    is_terminal,
    is_transitional_deployment,
    status_due,
    summary,
    wants_final_poll,
)
from watcher.core.models import (
    FINE_TUNE_STALLED,
    FINE_TUNE_STATUS_CHANGED,
    FineTuneRef,
    HubFineTune,
    KnownCheckpoint,
    LifecycleState,
)

REF = FineTuneRef("acme", "bot", "ft_1", "sft")
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z
STALL = LifecycleOptions(stall_after_s=600)


def iso(epoch_s: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(epoch_s, UTC).isoformat().replace("+00:00", "Z")


def hub(status: str | None, **fields: Any) -> HubFineTune:
    return HubFineTune(id="ft_1", name="sft", status=status, **fields)


def checkpoints(*points: tuple[int, float | None] | tuple[int, float | None, str | None]) -> dict[int, KnownCheckpoint]:
    """Known checkpoints from (step, loss[, created_at]) tuples."""
    known = {}
    for point in points:
        step, loss = point[0], point[1]
        data: dict[str, Any] = {"step": step, "metrics": {"loss": loss}}
        if len(point) > 2:
            data["created_at"] = point[2]
        known[step] = KnownCheckpoint(step, fingerprint(data), data)
    return known


# --- statuses ------------------------------------------------------------------------------------------


def test_first_status_is_recorded_silently() -> None:
    result = advance(REF, LifecycleState(), hub("running", started_at=iso(T0)), checkpoints={}, now=T0 + 5)
    assert result.events == ()
    assert result.state.status == "running"
    assert result.state.first_seen_at == T0 + 5
    assert result.state.started_at == iso(T0)
    assert not result.poll_checkpoints_now


def test_first_status_already_terminal_is_silent_and_needs_no_final_poll() -> None:
    fine_tune = hub("completed", started_at=iso(T0), finished_at=iso(T0 + 60))
    result = advance(REF, LifecycleState(), fine_tune, checkpoints=checkpoints((100, 1.0)), now=T0 + 100)
    assert result.events == ()
    assert not result.poll_checkpoints_now
    assert not wants_final_poll(LifecycleState(), fine_tune)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("created", "tokenizing"),
        ("tokenizing", "enqueued"),
        ("enqueued", "running"),
        ("running", "deployed"),
        ("completed", "deployed"),
        ("running", "some_new_status"),
        ("some_new_status", "running"),
    ],
)
def test_non_terminal_transitions_are_announced_without_summary(before: str, after: str) -> None:
    old = LifecycleState(status=before, first_seen_at=T0)
    result = advance(REF, old, hub(after), checkpoints=checkpoints((100, 1.0)), now=T0 + 10)
    (event,) = result.events
    assert event.type == FINE_TUNE_STATUS_CHANGED
    assert event.data["fine_tune"] == REF.as_data()
    assert (event.data["previous_status"], event.data["status"]) == (before, after)
    assert "checkpoints" not in event.data and "best_loss" not in event.data
    assert not result.poll_checkpoints_now
    assert result.state.status == after


def test_completed_carries_times_duration_and_summary_and_asks_for_a_final_poll() -> None:
    old = LifecycleState(status="running", started_at=iso(T0), first_seen_at=T0)
    fine_tune = hub("completed", started_at=iso(T0), finished_at=iso(T0 + 3723.5))
    assert wants_final_poll(old, fine_tune)
    known = checkpoints((100, 2.0), (200, 0.5), (300, 0.5), (400, 0.9), (500, None))
    result = advance(REF, old, fine_tune, checkpoints=known, now=T0 + 4000)
    (event,) = result.events
    assert result.poll_checkpoints_now
    assert event.data == {
        "fine_tune": REF.as_data(),
        "previous_status": "running",
        "status": "completed",
        "error": None,
        "started_at": iso(T0),
        "finished_at": iso(T0 + 3723.5),
        "duration_s": 3723.5,
        "checkpoints": 5,
        "latest_step": 500,
        "best_loss": 0.5,
        "best_step": 200,  # the first step to reach the best loss
    }
    assert result.state.finished_at == iso(T0 + 3723.5)


def test_errored_carries_the_hubs_error_text() -> None:
    old = LifecycleState(status="running", first_seen_at=T0)
    fine_tune = hub("errored", error="CUDA out of memory", started_at=iso(T0), finished_at=iso(T0 + 10))
    result = advance(REF, old, fine_tune, checkpoints={}, now=T0 + 20)
    (event,) = result.events
    assert event.data["status"] == "errored"
    assert event.data["error"] == "CUDA out of memory"
    assert (event.data["checkpoints"], event.data["latest_step"], event.data["best_loss"]) == (0, None, None)
    assert event.data["best_step"] is None
    assert result.poll_checkpoints_now


def test_stopped_without_times_has_no_duration() -> None:
    result = advance(REF, LifecycleState(status="running"), hub("stopped"), checkpoints={}, now=T0)
    (event,) = result.events
    assert event.data["duration_s"] is None
    assert event.data["started_at"] is None and event.data["finished_at"] is None


def test_an_unchanged_status_is_silent_and_letter_case_alone_is_no_change() -> None:
    old = LifecycleState(status="running", first_seen_at=T0)
    assert advance(REF, old, hub("running"), checkpoints={}, now=T0 + 1).events == ()
    assert advance(REF, old, hub("RUNNING"), checkpoints={}, now=T0 + 1).events == ()


def test_terminal_to_terminal_is_announced_with_a_summary() -> None:
    old = LifecycleState(status="completed")
    result = advance(REF, old, hub("stopped"), checkpoints=checkpoints((1, 0.1)), now=T0)
    (event,) = result.events
    assert event.data["checkpoints"] == 1
    assert result.poll_checkpoints_now


def test_unknown_status_is_kept_verbatim() -> None:
    old = LifecycleState(status="running")
    result = advance(REF, old, hub("Paused-By-Admin"), checkpoints={}, now=T0)
    assert result.events[0].data["status"] == "Paused-By-Admin"
    assert result.state.status == "Paused-By-Admin"


def test_a_null_status_changes_nothing() -> None:
    old = LifecycleState(status="running", first_seen_at=T0)
    result = advance(REF, old, hub(None), checkpoints={}, now=T0 + 1)
    assert result.events == ()
    assert result.state.status == "running"


def test_a_checkpoint_poll_without_a_status_read_sets_first_seen_only() -> None:
    result = advance(REF, LifecycleState(), None, checkpoints=checkpoints((1, 1.0)), now=T0)
    assert result.events == ()
    assert result.state.status is None
    assert result.state.first_seen_at == T0
    assert result.state.newest_step == 1


def test_summary_of_checkpoints_without_losses() -> None:
    assert summary(checkpoints((5, None), (3, None))) == {
        "checkpoints": 2,
        "latest_step": 5,
        "best_loss": None,
        "best_step": None,
    }


def test_is_terminal() -> None:
    assert all(is_terminal(s) for s in ("completed", "stopped", "errored", "Completed"))
    assert not any(is_terminal(s) for s in ("running", "deployed", "created", None, "weird"))


# --- stalls --------------------------------------------------------------------------------------------


def running(**fields: Any) -> LifecycleState:
    return LifecycleState(status="running", first_seen_at=T0, **fields)


def test_stall_runs_from_the_newest_checkpoints_created_at_and_fires_once() -> None:
    known = checkpoints((100, 1.0, iso(T0)), (200, 0.9, iso(T0 + 100)))
    state = advance(REF, running(), hub("running"), checkpoints=known, now=T0 + 300, options=STALL).state
    assert not state.stalled
    quiet = advance(REF, state, None, checkpoints=known, now=T0 + 699, options=STALL)
    assert quiet.events == ()
    fired = advance(REF, quiet.state, None, checkpoints=known, now=T0 + 750, options=STALL)
    (event,) = fired.events
    assert event.type == FINE_TUNE_STALLED
    assert event.data == {
        "fine_tune": REF.as_data(),
        "status": "running",
        "last_checkpoint_at": iso(T0 + 100),
        "stalled_for_s": 650.0,
    }
    assert fired.state.stalled
    again = advance(REF, fired.state, hub("running"), checkpoints=known, now=T0 + 5000, options=STALL)
    assert again.events == ()


def test_a_new_checkpoint_ends_the_stall_and_a_later_stall_fires_again() -> None:
    known = checkpoints((100, 1.0, iso(T0)))
    stalled = advance(REF, running(), None, checkpoints=known, now=T0 + 601, options=STALL).state
    assert stalled.stalled
    more = checkpoints((100, 1.0, iso(T0)), (200, 0.9, iso(T0 + 700)))
    resumed = advance(REF, stalled, None, checkpoints=more, now=T0 + 701, options=STALL)
    assert resumed.events == ()
    assert not resumed.state.stalled
    assert resumed.state.newest_step == 200
    second = advance(REF, resumed.state, None, checkpoints=more, now=T0 + 1301, options=STALL)
    assert [e.type for e in second.events] == [FINE_TUNE_STALLED]
    assert second.events[0].data["stalled_for_s"] == 601.0


def test_without_created_at_the_clock_runs_from_when_the_checkpoint_was_first_seen() -> None:
    known = checkpoints((100, 1.0))  # no created_at
    seen = advance(REF, running(), None, checkpoints=known, now=T0 + 1000, options=STALL).state
    assert seen.newest_seen_at == T0 + 1000
    assert advance(REF, seen, None, checkpoints=known, now=T0 + 1599, options=STALL).events == ()
    (event,) = advance(REF, seen, None, checkpoints=known, now=T0 + 1600, options=STALL).events
    assert event.data["last_checkpoint_at"] == rfc3339(T0 + 1000)  # when the watcher first saw it stands in
    assert event.data["stalled_for_s"] == 600.0


def test_a_running_fine_tune_is_not_judged_stalled_before_its_checkpoints_are_read_so_it_stalls_once() -> None:
    # discovered running for long (an old started_at), its checkpoints carry no created_at and are not read yet
    state = running(started_at=iso(T0))
    early = advance(REF, state, hub("running", started_at=iso(T0)), checkpoints=None, now=T0 + 5000, options=STALL)
    assert early.events == ()  # not "running without checkpoints": they are unknown, not absent
    known = checkpoints((100, 1.0), (200, 0.9))  # the first poll: checkpoints the Hub had all along
    seen = advance(REF, early.state, None, checkpoints=known, now=T0 + 5010, options=STALL)
    assert seen.events == () and seen.state.newest_seen_at == T0 + 5010
    fired = []
    state = seen.state
    for now in range(5020, 8000, 20):  # the sweep and the polls keep evaluating it; no new checkpoint comes
        step = advance(
            REF, state, hub("running") if now % 100 == 0 else None, checkpoints=known, now=T0 + now, options=STALL
        )
        fired += step.events
        state = step.state
    (event,) = fired
    assert event.data["last_checkpoint_at"] == rfc3339(T0 + 5010)
    assert event.data["stalled_for_s"] == 610.0  # the first evaluation past stall_after_s


def test_an_unparsable_created_at_falls_back_to_first_seen() -> None:
    known = checkpoints((100, 1.0, "yesterday"))
    seen = advance(REF, running(), None, checkpoints=known, now=T0, options=STALL).state
    assert advance(REF, seen, None, checkpoints=known, now=T0 + 599, options=STALL).events == ()
    assert advance(REF, seen, None, checkpoints=known, now=T0 + 600, options=STALL).events


def test_running_without_checkpoints_stalls_from_started_at() -> None:
    state = running(started_at=iso(T0))
    assert advance(REF, state, None, checkpoints={}, now=T0 + 599, options=STALL).events == ()
    (event,) = advance(REF, state, None, checkpoints={}, now=T0 + 600, options=STALL).events
    assert event.data["last_checkpoint_at"] is None
    assert event.data["stalled_for_s"] == 600.0


def test_running_without_checkpoints_or_started_at_stalls_from_when_running_was_seen() -> None:
    queued = LifecycleState(status="enqueued", first_seen_at=T0)
    started = advance(REF, queued, hub("running"), checkpoints={}, now=T0 + 5000, options=STALL)
    assert [e.type for e in started.events] == [FINE_TUNE_STATUS_CHANGED]
    assert advance(REF, started.state, None, checkpoints={}, now=T0 + 5599, options=STALL).events == ()
    assert advance(REF, started.state, None, checkpoints={}, now=T0 + 5600, options=STALL).events


@pytest.mark.parametrize("status", ["enqueued", "completed", "errored", "deployed", "weird"])
def test_only_running_fine_tunes_stall(status: str) -> None:
    known = checkpoints((100, 1.0, iso(T0)))
    state = LifecycleState(status=status, first_seen_at=T0)
    assert advance(REF, state, None, checkpoints=known, now=T0 + 10_000, options=STALL).events == ()


def test_stall_detection_is_off_by_default() -> None:
    known = checkpoints((100, 1.0, iso(T0)))
    assert advance(REF, running(), None, checkpoints=known, now=T0 + 10**6).events == ()


def test_a_stalled_run_that_finishes_clears_the_flag_and_reports_the_status_change() -> None:
    known = checkpoints((100, 1.0, iso(T0)))
    stalled = advance(REF, running(), None, checkpoints=known, now=T0 + 700, options=STALL).state
    done = advance(REF, stalled, hub("completed"), checkpoints=known, now=T0 + 800, options=STALL)
    assert [e.type for e in done.events] == [FINE_TUNE_STATUS_CHANGED]
    assert not done.state.stalled
    rerun = advance(REF, replace(done.state), hub("running"), checkpoints=known, now=T0 + 900, options=STALL)
    # back to running with the same old checkpoint: a new stall, announced once
    assert [e.type for e in rerun.events] == [FINE_TUNE_STATUS_CHANGED, FINE_TUNE_STALLED]


def test_status_change_and_stall_in_one_read() -> None:
    known = checkpoints((100, 1.0, iso(T0)))
    result = advance(
        REF, LifecycleState(status="enqueued"), hub("running"), checkpoints=known, now=T0 + 700, options=STALL
    )
    assert [e.type for e in result.events] == [FINE_TUNE_STATUS_CHANGED, FINE_TUNE_STALLED]


# --- adaptive polling ----------------------------------------------------------------------------------

INTERVALS = {"interval_s": 30.0, "idle_interval_s": 600.0}


@pytest.mark.parametrize("status", ["created", "tokenizing", "enqueued", "ENQUEUED"])
def test_no_checkpoint_polls_before_training(status: str) -> None:
    assert checkpoint_interval(status, ["DEPLOYING"], **INTERVALS) is None


@pytest.mark.parametrize("status", ["running", "Running", "something_new", None])
def test_running_and_unknown_statuses_poll_at_the_interval(status: str | None) -> None:
    assert checkpoint_interval(status, [], **INTERVALS) == 30.0


@pytest.mark.parametrize("status", ["completed", "stopped", "errored", "deployed", "Completed"])
def test_terminal_and_deployed_poll_at_the_idle_interval(status: str) -> None:
    assert checkpoint_interval(status, [], **INTERVALS) == 600.0
    assert checkpoint_interval(status, [None, "ACTIVE", "inactive", "DEPLOY_FAILED", "error"], **INTERVALS) == 600.0


@pytest.mark.parametrize(
    "deployment",
    [
        "building",
        "BUILDING",
        "deploying",
        "Deploying",
        "loading",
        "LOADING_MODEL",
        "updating",
        "UPDATING",
        "waking up",
        "WAKING_UP",
        "Waking-Up",
        "deactivating",
        "DEACTIVATING",
    ],
)
def test_a_transitional_deployment_brings_back_the_interval(deployment: str) -> None:
    assert is_transitional_deployment(deployment)
    assert checkpoint_interval("completed", ["ACTIVE", deployment], **INTERVALS) == 30.0
    assert checkpoint_interval("deployed", [deployment], **INTERVALS) == 30.0


@pytest.mark.parametrize(
    "deployment", [None, "", "ACTIVE", "active", "INACTIVE", "SCALED_TO_ZERO", "FAILED", "unknown", "wakingup"]
)
def test_settled_deployments_are_not_transitional(deployment: str | None) -> None:
    assert not is_transitional_deployment(deployment)


def test_status_due() -> None:
    assert status_due(None, now=T0, status_interval_s=60)
    assert not status_due(T0 - 59, now=T0, status_interval_s=60)
    assert status_due(T0 - 60, now=T0, status_interval_s=60)
