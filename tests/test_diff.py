"""watcher/diff.py (pure: old state + poll result -> events and new state) and the event size bound of events.py."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import pytest

from watcher.core.diff import DiffOptions, diff
from watcher.core.events import MAX_EVENT_BYTES, fit_data, stamp
from watcher.core.models import (
    EVENT_TYPES,
    LIFECYCLE_EVENT_TYPES,
    EventDraft,
    FineTuneRef,
    FineTuneState,
    PollFailed,
    PollNotFound,
    PollResult,
    PollSuccess,
    PollUnchanged,
    Transition,
)

REF = FineTuneRef(namespace="acme", repo="support-bot", id="ft_1", name="Support bot")
FINE_TUNE = {"namespace": "acme", "repo": "support-bot", "id": "ft_1", "name": "Support bot"}

CREATED = "checkpoint.created"
UPDATED = "checkpoint.updated"
DEPLOYMENT = "checkpoint.deployment_changed"
REMOVED = "checkpoint.removed"
NOT_FOUND = "fine_tune.not_found"
FAILING = "fine_tune.poll_failing"
RECOVERED = "fine_tune.poll_recovered"


# --- helpers ------------------------------------------------------------------------------------------


def ck(step: int, loss: float | None = 1.0, **fields: Any) -> dict[str, Any]:
    """A checkpoint dict as the Hub sends it."""
    checkpoint: dict[str, Any] = {
        "step": step,
        "created_at": f"2025-01-01T00:{step % 60:02d}:00Z",
        "deployment_status": None,
        "inference_samples": [{"prompt": "hi", "response": f"hello {step}"}],
        "metrics": {"epoch": step / 100, "loss": loss, "learning_rate": 1e-4},
        "model_id": f"model-{step}",
        "model_name": "support-bot-sft",
        "path": f"checkpoints/checkpoint-{step}",
        "size_bytes": 1_000_000 + step,
    }
    for key, value in fields.items():
        if key == "metrics":
            checkpoint["metrics"] = {**checkpoint["metrics"], **value}
        else:
            checkpoint[key] = value
    return checkpoint


def changed(checkpoint: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A copy of a checkpoint with some fields replaced (metrics merged key by key)."""
    new = copy.deepcopy(checkpoint)
    for key, value in fields.items():
        if key == "metrics":
            new["metrics"] = {**new["metrics"], **value}
        else:
            new[key] = value
    return new


def ok(*checkpoints: dict[str, Any]) -> PollSuccess:
    """A successful poll listing these checkpoints (sorted by step, as the client delivers them)."""
    ordered = tuple(sorted(checkpoints, key=lambda c: c["step"]))
    return PollSuccess(checkpoints=ordered, body_hash=orjson.dumps(ordered, option=orjson.OPT_SORT_KEYS).hex()[:32])


def failed(error: str = "HTTP 503", http_status: int | None = 503, outcome: str = "error") -> PollFailed:
    return PollFailed(error=error, http_status=http_status, outcome=outcome)  # type: ignore[arg-type]


def run(results: Iterable[PollResult], *, state: FineTuneState | None = None, **options: Any) -> list[Transition]:
    """Feed poll results through diff one after another, as the store does; every transition."""
    current = state or FineTuneState()
    transitions = []
    for result in results:
        transition = diff(REF, current, result, options=DiffOptions(**options))
        transitions.append(transition)
        current = transition.state
    return transitions


def baselined(*checkpoints: dict[str, Any]) -> FineTuneState:
    """The state after a silent baseline of these checkpoints."""
    return run([ok(*checkpoints)])[-1].state


def types(transition: Transition) -> list[str]:
    return [event.type for event in transition.events]


def all_events(transitions: Sequence[Transition]) -> list[EventDraft]:
    return [event for transition in transitions for event in transition.events]


# --- baseline ----------------------------------------------------------------------------------------


def test_first_poll_with_baseline_records_silently() -> None:
    cks = [ck(100, 0.9), ck(200, 0.7, deployment_status="ACTIVE"), ck(300, 0.8)]
    transition = run([ok(*cks)], baseline=True)[0]
    assert transition.events == ()
    assert [u.step for u in transition.upserts] == [100, 200, 300]
    assert [dict(u.data) for u in transition.upserts] == cks
    assert transition.deletes == ()
    assert transition.state.baselined is True
    assert sorted(transition.state.checkpoints) == [100, 200, 300]
    assert transition.state.best_loss == 0.7
    assert transition.state.body_hash == ok(*cks).body_hash


def test_first_poll_without_baseline_announces_every_checkpoint() -> None:
    cks = [ck(100, 0.9), ck(200, 0.7), ck(300, 0.8)]
    transition = run([ok(*cks)], baseline=False)[0]
    assert types(transition) == [CREATED, CREATED, CREATED]
    assert [e.data["checkpoint"] for e in transition.events] == cks
    assert [e.data["is_best_loss"] for e in transition.events] == [True, True, False]
    assert transition.state.baselined is True
    assert [u.step for u in transition.upserts] == [100, 200, 300]


@pytest.mark.parametrize("baseline", [True, False])
def test_baseline_is_taken_once(baseline: bool) -> None:
    first, second = run([ok(ck(1)), ok(ck(1), ck(2))], baseline=baseline)
    assert types(first) == ([] if baseline else [CREATED])
    assert types(second) == [CREATED]
    assert second.events[0].data["checkpoint"] == ck(2)


def test_fine_tune_first_seen_empty_announces_every_later_checkpoint() -> None:
    empty, later, more = run([ok(), ok(ck(1, 0.5), ck(2, 0.4)), ok(ck(1, 0.5), ck(2, 0.4), ck(3, 0.6))])
    assert empty.events == () and empty.state.baselined is True and empty.upserts == ()
    assert types(later) == [CREATED, CREATED]
    assert [e.data["checkpoint"]["step"] for e in later.events] == [1, 2]
    assert types(more) == [CREATED]
    assert more.events[0].data["checkpoint"] == ck(3, 0.6)


@pytest.mark.parametrize(
    "before",
    [
        pytest.param([failed()], id="after-a-failure"),
        pytest.param([failed(), failed(), failed()], id="after-poll-failing"),
        pytest.param([PollNotFound()], id="after-a-404"),
    ],
)
def test_baseline_is_the_first_successful_poll(before: list[PollResult]) -> None:
    transitions = run([*before, ok(ck(1), ck(2))], baseline=True)
    last = transitions[-1]
    assert CREATED not in types(last)
    assert last.state.baselined is True
    assert sorted(last.state.checkpoints) == [1, 2]


# --- no-ops ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "result",
    [
        pytest.param(ok(ck(1), ck(2, deployment_status="ACTIVE")), id="identical-body"),
        pytest.param(PollUnchanged(body_hash="whatever"), id="unchanged-body"),
    ],
)
def test_nothing_changed_yields_nothing(result: PollResult) -> None:
    state = baselined(ck(1), ck(2, deployment_status="ACTIVE"))
    transition = diff(REF, state, result)
    assert transition.events == ()
    assert transition.upserts == ()
    assert transition.deletes == ()
    assert transition.state.checkpoints == state.checkpoints
    assert transition.state.baselined is True
    assert transition.state.consecutive_failures == 0


def test_diff_does_not_mutate_its_inputs() -> None:
    state = baselined(ck(1), ck(2))
    snapshot = copy.deepcopy({step: dict(k.data) for step, k in state.checkpoints.items()})
    result = ok(ck(2, 0.1, deployment_status="ACTIVE"), ck(3))
    raw = copy.deepcopy(result.checkpoints)
    diff(REF, state, result)
    assert {step: dict(k.data) for step, k in state.checkpoints.items()} == snapshot
    assert sorted(state.checkpoints) == [1, 2]
    assert result.checkpoints == raw


# --- checkpoint events: one poll against a baselined state -----------------------------------------------

BASE = ck(1, 0.5)
OTHER = ck(2, 0.6, deployment_status="ACTIVE")

# (before, after, expected [(type, data subset)]); `data.checkpoint` and `data.fine_tune` are checked for all.
CHECKPOINT_CASES: list[Any] = [
    pytest.param([BASE], [BASE, ck(3, 0.4)], [(CREATED, {"is_best_loss": True})], id="created"),
    pytest.param([BASE, OTHER], [BASE, OTHER, ck(3, 0.9)], [(CREATED, {"is_best_loss": False})], id="created-not-best"),
    pytest.param([BASE], [BASE, ck(3, None)], [(CREATED, {"is_best_loss": False})], id="created-null-loss"),
    pytest.param(
        [BASE], [BASE, {**ck(3), "metrics": None}], [(CREATED, {"is_best_loss": False})], id="created-no-metrics"
    ),
    pytest.param([BASE], [ck(0, 0.7), BASE], [(CREATED, {"is_best_loss": False})], id="created-lower-step"),
    pytest.param(
        [BASE], [changed(BASE, metrics={"loss": 0.45})], [(UPDATED, {"changed": ["metrics.loss"]})], id="metric-changed"
    ),
    pytest.param(
        [BASE],
        [changed(BASE, metrics={"grad_norm": 1.5})],
        [(UPDATED, {"changed": ["metrics.grad_norm"]})],
        id="metric-added",
    ),
    pytest.param(
        [BASE],
        [{**BASE, "metrics": {"loss": 0.5, "learning_rate": 1e-4}}],
        [(UPDATED, {"changed": ["metrics.epoch"]})],
        id="metric-removed",
    ),
    pytest.param(
        [BASE],
        [changed(BASE, metrics={"loss": None})],
        [(UPDATED, {"changed": ["metrics.loss"]})],
        id="metric-became-null",
    ),
    pytest.param([BASE], [changed(BASE, size_bytes=5)], [(UPDATED, {"changed": ["size_bytes"]})], id="size-bytes"),
    pytest.param([BASE], [changed(BASE, model_id="m2")], [(UPDATED, {"changed": ["model_id"]})], id="model-id"),
    pytest.param([BASE], [changed(BASE, model_name="n2")], [(UPDATED, {"changed": ["model_name"]})], id="model-name"),
    pytest.param([BASE], [changed(BASE, path="elsewhere")], [(UPDATED, {"changed": ["path"]})], id="path"),
    pytest.param(
        [BASE],
        [changed(BASE, created_at="2025-02-02T00:00:00Z")],
        [(UPDATED, {"changed": ["created_at"]})],
        id="created-at",
    ),
    pytest.param([BASE], [changed(BASE, path=None)], [(UPDATED, {"changed": ["path"]})], id="field-became-null"),
    pytest.param(
        [BASE],
        [changed(BASE, size_bytes=7, model_id="m2", metrics={"loss": 0.3, "epoch": 9})],
        [(UPDATED, {"changed": ["size_bytes", "model_id", "metrics.epoch", "metrics.loss"]})],
        id="several-fields",
    ),
    pytest.param(
        [BASE],
        [changed(BASE, deployment_status="PENDING")],
        [(DEPLOYMENT, {"previous_deployment_status": None, "deployment_status": "PENDING"})],
        id="deployment-from-none",
    ),
    pytest.param(
        [OTHER],
        [changed(OTHER, deployment_status="FAILED")],
        [(DEPLOYMENT, {"previous_deployment_status": "ACTIVE", "deployment_status": "FAILED"})],
        id="deployment-active-to-failed",
    ),
    pytest.param(
        [OTHER],
        [changed(OTHER, deployment_status=None)],
        [(DEPLOYMENT, {"previous_deployment_status": "ACTIVE", "deployment_status": None})],
        id="deployment-to-none",
    ),
    pytest.param(
        [changed(BASE, deployment_status="Pending")],
        [changed(BASE, deployment_status="warming_UP")],
        [(DEPLOYMENT, {"previous_deployment_status": "Pending", "deployment_status": "warming_UP"})],
        id="deployment-unknown-status-verbatim",
    ),
    pytest.param(
        [changed(BASE, deployment_status="PENDING")],
        [changed(BASE, deployment_status="ACTIVE", metrics={"loss": 0.2})],
        [
            (UPDATED, {"changed": ["metrics.loss"]}),
            (DEPLOYMENT, {"previous_deployment_status": "PENDING", "deployment_status": "ACTIVE"}),
        ],
        id="deployment-and-metric-two-events",
    ),
    pytest.param([OTHER], [changed(OTHER, deployment_status="active")], [], id="deployment-case-only"),
    pytest.param(
        [OTHER],
        [changed(OTHER, deployment_status="active", size_bytes=1)],
        [(UPDATED, {"changed": ["size_bytes"]})],
        id="deployment-case-only-plus-field",
    ),
    pytest.param(
        [BASE],
        [changed(BASE, inference_samples=[{"prompt": "new", "response": "changed"}])],
        [],
        id="inference-samples-silent",
    ),
    pytest.param([BASE], [changed(BASE, inference_samples=None)], [], id="inference-samples-dropped-silent"),
    pytest.param([ck(1, 1)], [ck(1, 1.0)], [], id="same-number-int-vs-float"),
    pytest.param([BASE], [changed(BASE, some_new_hub_field={"x": 1})], [], id="unknown-extra-field-silent"),
    pytest.param([BASE, OTHER], [OTHER], [(REMOVED, {})], id="removed"),
    pytest.param([BASE, OTHER], [], [(REMOVED, {}), (REMOVED, {})], id="all-removed"),
    pytest.param([BASE], [ck(2, 0.3)], [(CREATED, {"is_best_loss": True}), (REMOVED, {})], id="replaced"),
]


@pytest.mark.parametrize(("before", "after", "expected"), CHECKPOINT_CASES)
def test_checkpoint_events(before: list[dict[str, Any]], after: list[dict[str, Any]], expected: list[Any]) -> None:
    state = baselined(*before)
    transition = diff(REF, state, ok(*after))
    assert [(e.type, {k: e.data[k] for k in subset}) for e, (_, subset) in zip(transition.events, expected)] == [
        (t, subset) for t, subset in expected
    ]
    assert len(transition.events) == len(expected), types(transition)
    before_by_step = {c["step"]: c for c in before}
    after_by_step = {c["step"]: c for c in after}
    for event in transition.events:
        assert event.data["fine_tune"] == FINE_TUNE
        if event.type == REMOVED:
            step = event.data["checkpoint"]["step"]
            assert event.data["checkpoint"] == before_by_step[step]  # as last known
            assert step not in after_by_step
        else:
            step = event.data["checkpoint"]["step"]
            assert event.data["checkpoint"] == after_by_step[step]  # as the Hub sent it
    # the new state knows exactly the checkpoints of the answer, with their latest data
    assert {step: dict(k.data) for step, k in transition.state.checkpoints.items()} == after_by_step
    assert transition.deletes == tuple(sorted(set(before_by_step) - set(after_by_step)))


def test_changed_lists_each_field_once_with_dotted_metrics() -> None:
    state = baselined(BASE)
    new = changed(BASE, metrics={"loss": 0.1, "epoch": 3, "mean_token_accuracy": 0.9}, path="p2")
    (event,) = diff(REF, state, ok(new)).events
    assert event.type == UPDATED
    assert sorted(event.data["changed"]) == ["metrics.epoch", "metrics.loss", "metrics.mean_token_accuracy", "path"]
    assert len(set(event.data["changed"])) == len(event.data["changed"])


def test_silent_changes_are_still_recorded() -> None:
    state = baselined(BASE)
    new = changed(BASE, inference_samples=[{"prompt": "p", "response": "r2"}])
    transition = diff(REF, state, ok(new))
    assert transition.events == ()
    assert [dict(u.data) for u in transition.upserts] == [new]
    assert dict(transition.state.checkpoints[1].data) == new


def test_case_only_deployment_change_then_real_change_reports_verbatim_previous() -> None:
    state = baselined(changed(BASE, deployment_status="ACTIVE"))
    quiet, loud = run(
        [ok(changed(BASE, deployment_status="Active")), ok(changed(BASE, deployment_status="FAILED"))], state=state
    )
    assert quiet.events == ()
    (event,) = loud.events
    assert event.type == DEPLOYMENT
    assert event.data["previous_deployment_status"].casefold() == "active"
    assert event.data["deployment_status"] == "FAILED"


def test_only_changed_checkpoints_are_upserted() -> None:
    state = baselined(ck(1), ck(2), ck(3))
    transition = diff(REF, state, ok(ck(1), changed(ck(2), size_bytes=9), ck(3), ck(4)))
    assert [u.step for u in transition.upserts] == [2, 4]
    assert types(transition) == [UPDATED, CREATED]


def test_removed_checkpoint_that_comes_back_is_created_again() -> None:
    state = baselined(ck(1, 0.5), ck(2, 0.4))
    gone, back, steady = run([ok(ck(1, 0.5)), ok(ck(1, 0.5), ck(2, 0.4)), ok(ck(1, 0.5), ck(2, 0.4))], state=state)
    assert types(gone) == [REMOVED]
    assert gone.events[0].data["checkpoint"] == ck(2, 0.4)
    assert gone.deletes == (2,)
    assert 2 not in gone.state.checkpoints
    assert types(back) == [CREATED]
    assert back.events[0].data["checkpoint"] == ck(2, 0.4)
    assert back.events[0].data["is_best_loss"] is True  # 0.4 is still the lowest loss seen: a tie
    assert steady.events == ()


def test_removed_then_back_changed_is_created_not_updated() -> None:
    state = baselined(ck(1), ck(2))
    _, back = run([ok(ck(1)), ok(ck(1), changed(ck(2), size_bytes=1))], state=state)
    assert types(back) == [CREATED]


# --- is_best_loss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("known", "polls", "expected"),
    [
        pytest.param([0.5], [[0.4]], [[True]], id="lower"),
        pytest.param([0.5], [[0.5]], [[True]], id="tie-counts-as-best"),
        pytest.param([0.5], [[0.6]], [[False]], id="higher"),
        pytest.param([0.5, 0.3], [[0.4]], [[False]], id="not-lower-than-an-older-one"),
        pytest.param([], [[0.9]], [[True]], id="first-loss-ever"),
        pytest.param([None], [[0.9]], [[True]], id="first-numeric-loss"),
        pytest.param([0.5], [[None]], [[False]], id="no-loss"),
        pytest.param([0.5], [[0.45, 0.40, 0.42]], [[True, True, False]], id="several-in-one-poll"),
        pytest.param([0.5], [[0.4, 0.4]], [[True, True]], id="tie-within-one-poll"),
        pytest.param([0.5], [[0.45], [0.44], [0.46]], [[True], [True], [False]], id="across-polls"),
        pytest.param([0.5], [[0], [0.1]], [[True], [False]], id="integer-zero-loss"),
    ],
)
def test_is_best_loss(known: list[float | None], polls: list[list[float | None]], expected: list[list[bool]]) -> None:
    known_cks = [ck(i + 1, loss) for i, loss in enumerate(known)]
    state = baselined(*known_cks)
    current = list(known_cks)
    results = []
    for losses in polls:
        start = len(current) + 1
        current += [ck(start + i, loss) for i, loss in enumerate(losses)]
        results.append(ok(*current))
    transitions = run(results, state=state)
    flags = [[e.data["is_best_loss"] for e in t.events] for t in transitions]
    assert all(types(t) == [CREATED] * len(t.events) for t in transitions)
    assert flags == expected


def test_best_loss_remembers_removed_checkpoints() -> None:
    state = baselined(ck(1, 0.2), ck(2, 0.5))
    _gone, new = run([ok(ck(2, 0.5)), ok(ck(2, 0.5), ck(3, 0.3))], state=state)
    assert types(new) == [CREATED]
    assert new.events[0].data["is_best_loss"] is False  # 0.2 was seen


def test_best_loss_counts_a_silent_baseline() -> None:
    state = baselined(ck(1, 0.2))
    (event,) = diff(REF, state, ok(ck(1, 0.2), ck(2, 0.3))).events
    assert event.data["is_best_loss"] is False


def test_best_loss_counts_an_updated_loss() -> None:
    state = baselined(ck(1, 0.5))
    _, new = run(
        [ok(changed(ck(1, 0.5), metrics={"loss": 0.1})), ok(changed(ck(1, 0.5), metrics={"loss": 0.1}), ck(2, 0.2))],
        state=state,
    )
    assert new.events[0].data["is_best_loss"] is False


# --- fine_tune.not_found ------------------------------------------------------------------------------------


def _not_found_data(event: EventDraft) -> dict[str, Any]:
    return {k: event.data[k] for k in ("fine_tune", "http_status", "consecutive_failures")}


@pytest.mark.parametrize(
    ("results", "expected"),
    [
        pytest.param([PollNotFound()], [[NOT_FOUND]], id="first-poll"),
        pytest.param([PollNotFound(), PollNotFound(), PollNotFound()], [[NOT_FOUND], [], []], id="only-on-transition"),
        pytest.param([ok(ck(1)), PollNotFound()], [[], [NOT_FOUND]], id="after-success"),
        pytest.param(
            [ok(ck(1)), PollNotFound(), ok(ck(1)), PollNotFound()],
            [[], [NOT_FOUND], [], [NOT_FOUND]],
            id="again-after-it-came-back",
        ),
        pytest.param(
            [ok(ck(1)), PollNotFound(), PollUnchanged(body_hash="x"), PollNotFound()],
            [[], [NOT_FOUND], [], [NOT_FOUND]],
            id="again-after-unchanged-200",
        ),
    ],
)
def test_not_found(results: list[PollResult], expected: list[list[str]]) -> None:
    transitions = run(results)
    assert [types(t) for t in transitions] == expected
    for event in all_events(transitions):
        assert _not_found_data(event) == {"fine_tune": FINE_TUNE, "http_status": 404, "consecutive_failures": 0}
        assert isinstance(event.data["error"], str) and event.data["error"]
    assert transitions[-1].state.not_found is True


def test_not_found_is_not_a_failed_poll() -> None:
    transitions = run([failed(), failed(), PollNotFound(), failed(), failed()], failure_threshold=3)
    assert FAILING not in [e.type for e in all_events(transitions)]
    assert transitions[2].state.consecutive_failures == 0
    assert transitions[-1].state.consecutive_failures == 2


def test_not_found_keeps_nothing_stale_for_an_unchanged_body() -> None:
    # after a 404 the body hash is forgotten, so the next identical 200 body is diffed again
    transition = run([ok(ck(1)), PollNotFound()])[-1]
    assert transition.state.body_hash is None
    assert transition.upserts == () and transition.deletes == ()


def test_success_clears_not_found() -> None:
    last = run([PollNotFound(), ok(ck(1))])[-1]
    assert last.state.not_found is False


# --- poll_failing / poll_recovered ---------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [1, 2, 3, 5])
def test_poll_failing_once_at_threshold_then_recovered(threshold: int) -> None:
    failures = [failed(f"HTTP 503 #{i}", 503) for i in range(threshold + 3)]
    transitions = run([ok(ck(1)), *failures, ok(ck(1)), ok(ck(1))], failure_threshold=threshold)
    per_poll = [types(t) for t in transitions]
    failing_at = 1 + threshold - 1
    assert per_poll == [
        [],
        *([[]] * (threshold - 1)),
        [FAILING],
        [],
        [],
        [],
        [RECOVERED],
        [],
    ]
    (failing,) = transitions[failing_at].events
    assert failing.data == {
        "fine_tune": FINE_TUNE,
        "error": f"HTTP 503 #{threshold - 1}",
        "http_status": 503,
        "consecutive_failures": threshold,
    }
    (recovered,) = transitions[-2].events
    assert recovered.data["fine_tune"] == FINE_TUNE
    assert recovered.data["consecutive_failures"] == threshold + 3
    assert "error" in recovered.data and "http_status" in recovered.data
    assert transitions[-2].state.consecutive_failures == 0
    assert transitions[-2].state.failing is False


def test_poll_failing_counts_consecutive_failures() -> None:
    transitions = run(
        [failed(), failed(), ok(), failed(), failed(), ok(), failed(), failed(), failed()], failure_threshold=3
    )
    assert [types(t) for t in transitions] == [[], [], [], [], [], [], [], [], [FAILING]]
    assert [t.state.consecutive_failures for t in transitions] == [1, 2, 0, 1, 2, 0, 1, 2, 3]


def test_poll_failing_again_after_recovery() -> None:
    transitions = run([failed(), failed(), ok(), failed(), failed()], failure_threshold=2)
    assert [types(t) for t in transitions] == [[], [FAILING], [RECOVERED], [], [FAILING]]


def test_no_recovered_without_failing() -> None:
    transitions = run([failed(), failed(), ok(ck(1))], failure_threshold=3)
    assert all_events(transitions) == []


@pytest.mark.parametrize(
    "recovery",
    [
        pytest.param(ok(ck(1)), id="success"),
        pytest.param(PollUnchanged(body_hash="same"), id="unchanged-body"),
    ],
)
def test_recovered_on_any_200(recovery: PollResult) -> None:
    state = baselined(ck(1))
    transitions = run([failed(), recovery], state=state, failure_threshold=1)
    assert [types(t) for t in transitions] == [[FAILING], [RECOVERED]]
    assert transitions[-1].events[0].data["consecutive_failures"] == 1


@pytest.mark.parametrize(
    "failure",
    [
        pytest.param(failed("HTTP 429", 429), id="429"),
        pytest.param(failed("HTTP 500", 500), id="500"),
        pytest.param(failed("timed out", None), id="timeout-no-status"),
        pytest.param(failed("connection refused", None), id="connection-error"),
        pytest.param(failed("HTTP 401", 401, "unauthorized"), id="401"),
        pytest.param(failed("HTTP 403", 403, "unauthorized"), id="403"),
        pytest.param(failed("body is not JSON", 200), id="invalid-body"),
    ],
)
def test_failed_poll_never_changes_known_checkpoints(failure: PollFailed) -> None:
    state = baselined(ck(1, 0.5), ck(2, 0.4, deployment_status="ACTIVE"))
    transitions = run([failure], state=state, failure_threshold=1)
    (transition,) = transitions
    assert transition.upserts == () and transition.deletes == ()
    assert transition.state.checkpoints == state.checkpoints
    assert transition.state.baselined is True
    assert transition.state.best_loss == state.best_loss
    assert transition.state.body_hash == state.body_hash
    (event,) = transition.events
    assert event.type == FAILING
    assert event.data == {
        "fine_tune": FINE_TUNE,
        "error": failure.error,
        "http_status": failure.http_status,
        "consecutive_failures": 1,
    }


def test_failed_polls_then_success_diffs_against_the_old_checkpoints() -> None:
    state = baselined(ck(1), ck(2))
    transitions = run([failed(), failed(), ok(ck(2), ck(3))], state=state, failure_threshold=5)
    assert types(transitions[-1]) == [CREATED, REMOVED]


def test_failure_on_never_seen_fine_tune_keeps_it_unbaselined() -> None:
    transitions = run([failed(), failed()], failure_threshold=5)
    assert transitions[-1].state.baselined is False
    assert transitions[-1].state.checkpoints == {}


# --- every event ----------------------------------------------------------------------------------------------


def test_every_event_type_carries_the_fine_tune() -> None:
    transitions = run(
        [
            PollNotFound(),
            ok(ck(1, 0.5)),
            ok(ck(1, 0.5), ck(2, 0.4)),
            ok(changed(ck(1, 0.5), deployment_status="ACTIVE", size_bytes=1), ck(2, 0.4)),
            ok(ck(2, 0.4)),
            failed(),
            ok(ck(2, 0.4)),
        ],
        failure_threshold=1,
    )
    events = all_events(transitions)
    assert [e.type for e in events] == [NOT_FOUND, CREATED, UPDATED, DEPLOYMENT, REMOVED, FAILING, RECOVERED]
    assert {e.type for e in events} == set(EVENT_TYPES) - {"watcher.test", *LIFECYCLE_EVENT_TYPES}
    for event in events:
        assert event.data["fine_tune"] == FINE_TUNE
        orjson.dumps(event.data)  # JSON-serialisable


# --- events.fit_data: the 16 kB bound ------------------------------------------------------------------------


def _envelope_size(event_type: str, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    event = stamp(EventDraft(event_type, data), fine_tune_key=REF.key, now=1_764_000_000.123)
    return len(orjson.dumps(event.envelope())), event.data


def _created(checkpoint: dict[str, Any]) -> dict[str, Any]:
    return {"fine_tune": FINE_TUNE, "checkpoint": checkpoint, "is_best_loss": True}


def _nested(width: int, depth: int) -> Any:
    if depth == 0:
        return 1
    return {f"label_{i:03d}_{'x' * 40}": _nested(width, depth - 1) for i in range(width)}


def test_small_event_data_is_untouched() -> None:
    data = _created(ck(1))
    assert fit_data(data) == data
    assert "truncated" not in fit_data(data)


OVERSIZED: list[Any] = [
    pytest.param(
        _created(ck(1, inference_samples=[{"prompt": "p" * 5000, "response": "r" * 5000}] * 50)),
        id="huge-inference-samples",
    ),
    pytest.param(_created(ck(1, inference_samples=[{"prompt": "😀" * 2000}] * 100)), id="multibyte-samples"),
    pytest.param(
        _created(ck(1, inference_samples=[{f"k{i}": "v" * 100 for i in range(500)}])), id="one-sample-many-keys"
    ),
    pytest.param(_created(ck(1, metrics={f"eval/metric_{i:05d}": i / 7 for i in range(5000)})), id="many-metrics"),
    pytest.param(_created(ck(1, metrics={f"m{i}_" + "x" * 3000: 1.0 for i in range(40)})), id="long-metric-names"),
    pytest.param(_created(ck(1, metrics={"notes": "z" * 100_000})), id="long-string-metric"),
    pytest.param(_created(ck(1, metrics={"confusion": _nested(40, 3)})), id="deeply-nested-metric"),
    pytest.param(_created(ck(1, path="p" * 50_000, model_name="n" * 50_000)), id="long-fields"),
    pytest.param(_created(ck(1, extra=[list(range(1000))] * 100)), id="long-extra-lists"),
    pytest.param(
        {"fine_tune": FINE_TUNE, "error": "e" * 100_000, "http_status": 500, "consecutive_failures": 3}, id="long-error"
    ),
    pytest.param(
        {"fine_tune": FINE_TUNE, "checkpoint": ck(1), "changed": [f"metrics.m{i}" for i in range(5000)]},
        id="long-changed-list",
    ),
    pytest.param(
        _created(ck(1, metrics={**{f"m{i}_" + "x" * 2000: 1.0 for i in range(16)}, "confusion": _nested(40, 3)})),
        id="nested-metric-plus-long-metric-names",
    ),
]


@pytest.mark.parametrize("data", OVERSIZED)
def test_oversized_events_fit_under_the_bound(data: dict[str, Any]) -> None:
    original = copy.deepcopy(data)
    size, fitted = _envelope_size(DEPLOYMENT, data)
    assert size <= MAX_EVENT_BYTES
    assert fitted["truncated"] is True
    assert fitted["fine_tune"] == FINE_TUNE
    if "checkpoint" in data:
        assert fitted["checkpoint"]["step"] == 1
    assert data == original  # the draft is not modified


def test_inference_samples_are_trimmed_first() -> None:
    metrics = {f"metric_{i:03d}": i / 3 for i in range(300)}  # about 9 kB: fits on its own
    checkpoint = ck(7, metrics=metrics, inference_samples=[{"prompt": "p" * 4000, "response": "r" * 4000}] * 30)
    data = _created(checkpoint)
    size, fitted = _envelope_size(CREATED, data)
    assert size <= MAX_EVENT_BYTES
    assert fitted["truncated"] is True
    # everything but the samples is intact
    assert {k: v for k, v in fitted["checkpoint"].items() if k != "inference_samples"} == {
        k: v for k, v in checkpoint.items() if k != "inference_samples"
    }
    assert fitted["is_best_loss"] is True
    samples = fitted["checkpoint"]["inference_samples"]
    assert len(orjson.dumps(samples)) < len(orjson.dumps(checkpoint["inference_samples"]))


def test_just_under_the_bound_is_not_truncated() -> None:
    checkpoint = ck(1, metrics={"notes": ""})
    base, _ = _envelope_size(DEPLOYMENT, _created(checkpoint))
    checkpoint["metrics"]["notes"] = "n" * (MAX_EVENT_BYTES - base - 200)
    size, fitted = _envelope_size(DEPLOYMENT, _created(checkpoint))
    assert size <= MAX_EVENT_BYTES
    assert "truncated" not in fitted
    assert fitted["checkpoint"] == checkpoint
