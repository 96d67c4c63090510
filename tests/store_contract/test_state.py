"""Contract: the state of each fine-tune, moved on by apply_poll only, and touch-or-diff."""

from __future__ import annotations

from collections.abc import Callable

from watcher.core.diff import DiffOptions
from watcher.core.models import (
    CHECKPOINT_CREATED,
    CHECKPOINT_DEPLOYMENT_CHANGED,
    CHECKPOINT_REMOVED,
    CHECKPOINT_UPDATED,
    FINE_TUNE_NOT_FOUND,
    FINE_TUNE_POLL_FAILING,
    FINE_TUNE_POLL_RECOVERED,
    PollNotFound,
    PollUnchanged,
)
from watcher.store import Store

from .databases import Database
from .support import OPTIONS, OTHER, REF, T0, apply, counter_ids, cp, failed, success, types

Opener = Callable[..., Store]


def test_first_poll_is_a_silent_baseline_then_changes_are_announced(store: Store) -> None:
    baseline = apply(store, success(cp(1), cp(2)))
    assert baseline.events == ()
    assert baseline.state.baselined
    assert sorted(baseline.state.checkpoints) == [1, 2]

    created = apply(store, success(cp(1), cp(2), cp(3, loss=0.01)), now=T0 + 10)
    assert types(created) == [CHECKPOINT_CREATED]
    [event] = created.events
    assert event.data["checkpoint"] == cp(3, loss=0.01)
    assert event.data["fine_tune"] == REF.as_data()
    assert event.fine_tune_key == REF.key
    assert event.timestamp.endswith("Z")
    assert sorted(created.state.checkpoints) == [1, 2, 3]
    # the committed events are exactly what the store returns later
    assert store.recent_events() == list(created.events)
    assert [e for _, e in store.events_after(0)] == list(created.events)
    assert store.events_by_id([event.id, "evt_missing"]) == {event.id: event}


def test_returned_state_is_the_committed_state(store: Store, store_factory: Opener) -> None:
    apply(store, success(cp(1)))
    committed = apply(store, success(cp(1), cp(2, status="ACTIVE")), now=T0 + 1)
    fresh = store_factory()
    assert fresh.load_state(REF.key) == committed.state
    assert committed.state.body_hash == success(cp(1), cp(2, status="ACTIVE")).body_hash
    assert store.load_cached(REF.key) == committed.state
    assert fresh.load_cached(OTHER.key).baselined is False  # never seen: an empty state, no I/O


def test_updates_deployments_and_removals(store: Store) -> None:
    apply(store, success(cp(1), cp(2), cp(3)))
    changed = apply(store, success(cp(1, loss=0.123), cp(2, status="DEPLOYING")), now=T0 + 1)
    assert sorted(types(changed)) == sorted([CHECKPOINT_UPDATED, CHECKPOINT_DEPLOYMENT_CHANGED, CHECKPOINT_REMOVED])
    assert sorted(changed.state.checkpoints) == [1, 2]


def test_poll_unchanged_with_another_hash_returns_none_and_changes_nothing(store: Store, database: Database) -> None:
    apply(store, success(cp(1)))
    before = (store.statuses(), store.recent_events())
    rows = database.snapshot()
    assert store.apply_poll(REF, PollUnchanged("not-the-stored-hash"), options=OPTIONS, now=T0 + 1) is None
    assert store.apply_poll(OTHER, PollUnchanged("never-seen"), options=OPTIONS, now=T0 + 1) is None
    assert (store.statuses(), store.recent_events()) == before
    assert database.snapshot() == rows  # nothing written either


def test_poll_unchanged_with_the_stored_hash_commits_a_quiet_poll(store: Store) -> None:
    poll = success(cp(1), cp(2))
    apply(store, poll)
    committed = apply(store, PollUnchanged(poll.body_hash), now=T0 + 5)
    assert committed.events == ()
    assert sorted(committed.state.checkpoints) == [1, 2]
    [status] = store.statuses()
    assert (status.last_poll_at, status.last_outcome, status.last_success_at) == (T0 + 5, "ok", T0 + 5)


def test_commit_false_changes_nothing(store: Store, database: Database) -> None:
    apply(store, success(cp(1)))
    before = (store.statuses(), store.recent_events())
    rows = database.snapshot()
    dry = store.apply_poll(REF, success(cp(1), cp(2)), options=OPTIONS, now=T0 + 1, commit=False)
    assert dry is not None and types(dry) == [CHECKPOINT_CREATED]
    dry_new = store.apply_poll(OTHER, PollNotFound(), options=OPTIONS, now=T0 + 1, commit=False)
    assert dry_new is not None and types(dry_new) == [FINE_TUNE_NOT_FOUND]
    assert store.apply_poll(REF, failed(retry_after_s=60), options=OPTIONS, now=T0 + 1, commit=False) is not None
    assert (store.statuses(), store.recent_events()) == before
    assert database.snapshot() == rows  # nothing written either
    assert store.not_before(REF.key) is None
    # nothing moved on: the real poll still announces the checkpoint
    assert types(apply(store, success(cp(1), cp(2)), now=T0 + 2)) == [CHECKPOINT_CREATED]


def test_a_failed_poll_never_changes_known_checkpoints(store: Store) -> None:
    apply(store, success(cp(1), cp(2)))
    for i, result in enumerate([failed(503), failed(401, outcome="unauthorized"), failed(None)]):
        assert all(e.type == FINE_TUNE_POLL_FAILING for e in apply(store, result, now=T0 + 1 + i).events)
    assert sorted(store.load_state(REF.key).checkpoints) == [1, 2]
    assert store.statuses([REF.key])[0].checkpoints == 2


def test_statuses(store: Store) -> None:
    options = DiffOptions(failure_threshold=2)
    apply(store, success(cp(1, loss=0.9), cp(5, loss=0.4, status="ACTIVE"), cp(3, status="deploying")), now=T0)
    apply(store, PollNotFound(), ref=OTHER, now=T0 + 1)
    unknown = "ox/models/ft_unknown"

    ok, not_found, never = store.statuses([REF.key, OTHER.key, unknown])
    assert [s.key for s in store.statuses()] == sorted([REF.key, OTHER.key])
    assert (ok.key, ok.last_poll_at, ok.last_outcome, ok.last_http_status, ok.last_error) == (
        REF.key,
        T0,
        "ok",
        200,
        None,
    )
    assert (ok.baselined, ok.not_found, ok.failing, ok.consecutive_failures) == (True, False, False, 0)
    assert (ok.checkpoints, ok.latest_step, ok.latest_loss, ok.last_success_at) == (3, 5, 0.4, T0)
    assert ok.latest_created_at == cp(5)["created_at"]
    assert ok.deployments == {3: "deploying", 5: "ACTIVE"}
    assert ok.metrics["loss"] == 0.4 and ok.metrics["learning_rate"] == 1e-5
    assert (not_found.not_found, not_found.last_outcome, not_found.last_http_status, not_found.checkpoints) == (
        True,
        "not_found",
        404,
        0,
    )
    assert (never.key, never.last_poll_at, never.baselined, never.checkpoints, never.latest_step) == (
        unknown,
        None,
        False,
        0,
        None,
    )

    first = apply(store, failed(502), now=T0 + 10, options=options)
    second = apply(store, failed(503), now=T0 + 20, options=options)
    third = apply(store, failed(503), now=T0 + 30, options=options)
    assert (types(first), types(second), types(third)) == ([], [FINE_TUNE_POLL_FAILING], [])
    [status] = store.statuses([REF.key])
    assert (status.consecutive_failures, status.failing, status.last_outcome, status.last_http_status) == (
        3,
        True,
        "error",
        503,
    )
    assert status.last_error == "Hub answered 503"
    assert (status.last_poll_at, status.last_success_at) == (T0 + 30, T0)
    assert status.checkpoints == 3  # failures keep what is known

    recovered = apply(
        store,
        success(cp(1, loss=0.9), cp(5, loss=0.4, status="ACTIVE"), cp(3, status="deploying")),
        now=T0 + 40,
        options=options,
    )
    assert types(recovered) == [FINE_TUNE_POLL_RECOVERED]
    [status] = store.statuses([REF.key])
    assert (status.consecutive_failures, status.failing, status.last_error, status.last_success_at) == (
        0,
        False,
        None,
        T0 + 40,
    )


def test_not_found_is_announced_on_the_transition_only(store: Store) -> None:
    assert types(apply(store, PollNotFound())) == [FINE_TUNE_NOT_FOUND]
    assert types(apply(store, PollNotFound(), now=T0 + 1)) == []
    back = apply(store, success(cp(1)), now=T0 + 2)
    assert back.events == () and back.state.not_found is False  # the first answer is still the baseline
    assert types(apply(store, PollNotFound(), now=T0 + 3)) == [FINE_TUNE_NOT_FOUND]


def test_not_before_is_persisted_from_retry_after(store: Store, store_factory: Opener) -> None:
    apply(store, success(cp(1)))
    apply(store, failed(429, retry_after_s=120.0), now=T0 + 10)
    assert store.not_before(REF.key) == T0 + 130
    assert store.statuses([REF.key])[0].not_before == T0 + 130
    store.close()

    restarted = store_factory()
    assert restarted.not_before(REF.key) == T0 + 130
    assert restarted.statuses([REF.key])[0].not_before == T0 + 130

    apply(restarted, failed(503), now=T0 + 200)  # a failure without Retry-After holds nothing back
    assert restarted.not_before(REF.key) is None
    apply(restarted, failed(503, retry_after_s=30.0), now=T0 + 300)
    assert restarted.not_before(REF.key) == T0 + 330
    apply(restarted, success(cp(1)), now=T0 + 400)  # an answer clears it
    assert restarted.not_before(REF.key) is None
    assert restarted.not_before("ox/models/never") is None


def test_restart_keeps_the_baseline(store_factory: Opener) -> None:
    first = store_factory(new_id=counter_ids("evt_1_"))
    poll = success(cp(1), cp(2, status="ACTIVE"))
    assert apply(first, poll).events == ()
    apply(first, PollNotFound(), ref=OTHER)
    events_before = first.recent_events()
    first.close()

    second = store_factory(new_id=counter_ids("evt_2_"))
    assert apply(second, poll, now=T0 + 1).events == ()  # no re-announcement
    other_body = success(cp(2, status="ACTIVE"), cp(1), salt="x")
    assert apply(second, other_body, now=T0 + 2).events == ()
    assert apply(second, PollUnchanged(other_body.body_hash), now=T0 + 3).events == ()
    assert apply(second, PollNotFound(), ref=OTHER, now=T0 + 3).events == ()  # still not found: no repeat
    assert second.recent_events() == events_before
    later = apply(second, success(cp(1), cp(2, status="ACTIVE"), cp(3)), now=T0 + 4)
    assert [(e.type, e.data["checkpoint"]["step"]) for e in later.events] == [(CHECKPOINT_CREATED, 3)]


def test_fine_tunes_are_independent(store: Store) -> None:
    apply(store, success(cp(1)))
    assert apply(store, success(cp(1)), ref=OTHER).events == ()  # OTHER's own baseline
    assert types(apply(store, success(cp(1), cp(2)), ref=OTHER, now=T0 + 1)) == [CHECKPOINT_CREATED]
    assert sorted(store.load_state(REF.key).checkpoints) == [1]
    assert [s.latest_step for s in store.statuses([REF.key, OTHER.key])] == [1, 2]


def test_restart_remembers_the_last_body_hash(store_factory: Opener) -> None:
    first = store_factory()
    poll = success(cp(1), cp(2))
    apply(first, poll)
    first.close()
    second = store_factory()
    assert second.apply_poll(REF, PollUnchanged("some-other-hash"), options=OPTIONS, now=T0 + 1) is None
    quiet = apply(second, PollUnchanged(poll.body_hash), now=T0 + 1)
    assert quiet.events == () and quiet.state.body_hash == poll.body_hash
    assert sorted(quiet.state.checkpoints) == [1, 2]
    assert second.body_hash(REF.key) == poll.body_hash
    assert second.body_hash(OTHER.key) is None


# --- touch or diff --------------------------------------------------------------------------------------


def test_observe_unchanged_returns_the_state_and_batches_the_poll_time(store: Store) -> None:
    poll = success(cp(1), cp(2))
    committed = apply(store, poll)
    assert store.observe_unchanged(REF.key, poll.body_hash, now=T0 + 5) == committed.state
    assert store.statuses([REF.key])[0].last_poll_at == T0  # batched, not written yet
    assert store.observe_unchanged(REF.key, poll.body_hash, now=T0 + 7) == committed.state
    assert store.flush_touches() == []
    [status] = store.statuses([REF.key])
    assert (status.last_poll_at, status.last_success_at, status.last_outcome) == (T0 + 7, T0 + 7, "ok")
    assert store.flush_touches() == []  # nothing left to write
    assert store.recent_events() == []


def test_observe_unchanged_says_diff_when_anything_differs(store: Store, store_factory: Opener) -> None:
    poll = success(cp(1))
    assert store.observe_unchanged(REF.key, poll.body_hash, now=T0) is None  # never seen
    apply(store, poll)
    assert store.observe_unchanged(REF.key, "another-body", now=T0 + 1) is None
    apply(store, failed(503), now=T0 + 2)
    assert store.observe_unchanged(REF.key, poll.body_hash, now=T0 + 3) is None  # a failure to recover from
    apply(store, poll, now=T0 + 4)
    assert store.observe_unchanged(REF.key, poll.body_hash, now=T0 + 5) is not None
    apply(store, PollNotFound(), ref=OTHER, now=T0 + 5)
    assert store.observe_unchanged(OTHER.key, poll.body_hash, now=T0 + 6) is None
    # another process (a fresh store) has seen nothing yet: it diffs, then knows
    other = store_factory()
    assert other.observe_unchanged(REF.key, poll.body_hash, now=T0 + 6) is None
    apply(other, PollUnchanged(poll.body_hash), now=T0 + 6)
    assert other.observe_unchanged(REF.key, poll.body_hash, now=T0 + 7) is not None


def test_a_batched_poll_time_never_lands_over_a_later_outcome(store: Store) -> None:
    poll = success(cp(1))
    apply(store, poll)
    assert store.observe_unchanged(REF.key, poll.body_hash, now=T0 + 5) is not None
    apply(store, failed(503), now=T0 + 6)  # a later outcome, committed before the flush
    assert store.flush_touches() == []
    [status] = store.statuses([REF.key])
    assert (status.last_poll_at, status.last_outcome, status.consecutive_failures) == (T0 + 6, "error", 1)
    assert status.last_success_at == T0


def test_a_batched_poll_time_is_dropped_when_another_writer_moved_on(store: Store, store_factory: Opener) -> None:
    poll = success(cp(1))
    apply(store, poll)
    assert store.observe_unchanged(REF.key, poll.body_hash, now=T0 + 5) is not None
    other = store_factory(new_id=counter_ids("evt_o"))
    assert types(apply(other, success(cp(1), cp(2)), now=T0 + 6)) == [CHECKPOINT_CREATED]
    assert store.flush_touches() == [REF.key]  # its cache is dropped: the next answer is diffed for real
    [status] = store.statuses([REF.key])
    assert (status.last_poll_at, status.checkpoints) == (T0 + 6, 2)
    assert store.observe_unchanged(REF.key, poll.body_hash, now=T0 + 7) is None
    assert store.apply_poll(REF, PollUnchanged(poll.body_hash), options=OPTIONS, now=T0 + 7) is None
