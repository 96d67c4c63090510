"""Contract: the outbox, lanes in event order, outcomes, statistics, redelivery and retired notifiers."""

from __future__ import annotations

from watcher.core.models import Event
from watcher.store import Store

from .support import OTHER, REF, T0, apply, cp, success

NOTIFIERS = ["hook", "slack"]


def everywhere(event: Event) -> list[str]:
    return NOTIFIERS


def history(store: Store) -> list[Event]:
    """Two events for REF from one poll, one for OTHER, all routed to both notifiers."""
    apply(store, success(cp(1)), route=everywhere)
    apply(store, success(cp(1)), ref=OTHER, route=everywhere)
    first = apply(store, success(cp(1), cp(2), cp(3)), now=T0 + 10, route=everywhere)
    other = apply(store, success(cp(1), cp(2)), ref=OTHER, now=T0 + 11, route=everywhere)
    return [*first.events, *other.events]


def test_due_heads_lane_batches_and_outcomes(store: Store) -> None:
    a2, a3, b2 = history(store)
    assert store.due_deliveries(NOTIFIERS, now=T0 + 9) == []  # nothing due before its time
    heads = store.due_deliveries(["hook"], now=T0 + 20)
    assert sorted((d.event_id, d.notifier, d.state, d.attempts) for d in heads) == sorted(
        [(a2.id, "hook", "pending", 0), (b2.id, "hook", "pending", 0)]
    )  # one head per (notifier, fine-tune) lane
    head = next(d for d in heads if d.fine_tune_key == REF.key)
    assert [d.event_id for d in store.lane_batch(head)] == [a2.id, a3.id]
    assert store.next_due_at(NOTIFIERS) == T0 + 10
    assert store.next_due_at([]) is None
    assert store.next_due_at(["unknown"]) is None
    assert {s.notifier: (s.pending, s.oldest_pending_at) for s in store.outbox_stats()} == {
        "hook": (3, T0 + 10),
        "slack": (3, T0 + 10),
    }

    store.record_delivery("hook", [a2.id], state="pending", now=T0 + 20, next_attempt_at=T0 + 60, error="503")
    assert [d.event_id for d in store.due_deliveries(["hook"], now=T0 + 30)] == [b2.id]  # a2 waits, a3 behind it
    store.record_delivery("hook", [a2.id, a3.id], state="delivered", now=T0 + 61, http_status=200)
    store.record_delivery("hook", [b2.id], state="dead", now=T0 + 61, error="410 Gone", http_status=410)
    assert store.due_deliveries(["hook"], now=T0 + 100) == []
    assert {s.notifier: s.pending for s in store.outbox_stats()} == {"slack": 3}
    rows = store.deliveries_of([a2.id, b2.id])
    hook_a2 = next(d for d in rows[a2.id] if d.notifier == "hook")
    assert (hook_a2.state, hook_a2.attempts) == ("delivered", 2)
    hook_b2 = next(d for d in rows[b2.id] if d.notifier == "hook")
    assert (hook_b2.state, hook_b2.last_error, hook_b2.last_status) == ("dead", "410 Gone", 410)
    assert [d.notifier for d in rows[a2.id]] == NOTIFIERS
    # an outcome for a row that is no longer pending changes nothing
    store.record_delivery("hook", [a2.id], state="dead", now=T0 + 70, error="late")
    assert next(d for d in store.deliveries_of([a2.id])[a2.id] if d.notifier == "hook").state == "delivered"


def test_redeliver_dead_rows_bounded_by_since_and_notifier(store: Store) -> None:
    a2, a3, b2 = history(store)
    store.record_delivery("hook", [a2.id, a3.id], state="dead", now=T0 + 20, error="x")
    store.record_delivery("slack", [b2.id], state="dead", now=T0 + 20, error="x")
    assert store.redeliver(now=T0 + 30, dead=True, since=T0 + 10.5) == 1  # only the row queued at T0 + 11
    assert store.redeliver(now=T0 + 31, dead=True, notifier="slack") == 0  # that one is pending again
    assert store.redeliver(now=T0 + 32, dead=True, notifier="hook", since=T0) == 2
    requeued = store.deliveries_of([a2.id])[a2.id]
    hook = next(d for d in requeued if d.notifier == "hook")
    assert (hook.state, hook.attempts, hook.queued_at, hook.next_attempt_at) == ("pending", 0, T0 + 32, T0 + 32)


def test_redeliver_named_events_to_routed_or_one_notifier(store: Store) -> None:
    a2, _a3, _b2 = history(store)
    store.record_delivery("hook", [a2.id], state="delivered", now=T0 + 20)
    assert store.redeliver(now=T0 + 30, event_ids=[a2.id], notifier="hook") == 1
    assert store.redeliver(now=T0 + 31, event_ids=[a2.id], route=lambda e: ["hook", "new"]) == 2
    assert sorted(d.notifier for d in store.deliveries_of([a2.id])[a2.id]) == ["hook", "new", "slack"]
    import pytest

    from watcher.errors import StoreError

    with pytest.raises(StoreError):
        store.redeliver(now=T0 + 32, event_ids=["evt_unknown"])


def test_retire_notifiers_turns_their_pending_rows_dead(store: Store) -> None:
    a2, a3, b2 = history(store)
    store.record_delivery("slack", [a2.id], state="delivered", now=T0 + 20)
    assert store.retire_notifiers(["hook"], now=T0 + 30) == 2  # slack's a3 and b2; a2 stays delivered
    slack = {
        e: next(d for d in rows if d.notifier == "slack")
        for e, rows in store.deliveries_of([a2.id, a3.id, b2.id]).items()
    }
    assert [(slack[e.id].state, slack[e.id].last_error) for e in (a2, a3, b2)] == [
        ("delivered", None),
        ("dead", "notifier_removed"),
        ("dead", "notifier_removed"),
    ]
    assert {s.notifier for s in store.outbox_stats()} == {"hook"}
    assert store.due_deliveries(["slack"], now=T0 + 100) == []
    assert store.retire_notifiers(["hook"], now=T0 + 31) == 0
    assert store.retire_notifiers([], now=T0 + 32, reason="no notifiers") == 3
    assert store.outbox_stats() == []
    assert {d.last_error for rows in store.deliveries_of([a3.id]).values() for d in rows} == {
        "notifier_removed",
        "no notifiers",
    }
