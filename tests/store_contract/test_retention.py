"""Contract: retention deletes old events with their finished deliveries, never a pending one, never state."""

from __future__ import annotations

from watcher.core.models import Event
from watcher.store import Store

from .support import DAY, OTHER, REF, T0, apply, cp, success

WINDOW = 30 * DAY
PAD = "".join(f"{n:05d}" for n in range(2000))  # 10 kB that compresses little


def everywhere(event: Event) -> list[str]:
    return ["hook"]


def grow(store: Store, *, start: float, polls: int, step_s: float, first_step: int = 2, note: str = "") -> list[Event]:
    """One new checkpoint per poll (one event, one outbox row each), `step_s` apart; `note` pads each one."""
    events: list[Event] = []
    for i in range(polls):
        steps = range(1, first_step + i + 1)
        poll = success(*(cp(s, note=note) if note else cp(s) for s in steps))
        events += apply(store, poll, now=start + i * step_s, route=everywhere).events
    return events


def test_prune_removes_old_finished_events_and_keeps_pending_state_and_the_window(store: Store) -> None:
    apply(store, success(cp(1)), now=T0)
    # padded: the old events fill pages of their own, which SQLite hands back (it counts pages, PostgreSQL rows)
    old = grow(store, start=T0 + 1, polls=6, step_s=1, note=PAD)
    recent = grow(store, start=T0 + 40 * DAY, polls=2, step_s=1, first_step=8, note=PAD)
    store.record_delivery("hook", [e.id for e in old[:4]], state="delivered", now=T0 + 10)
    store.record_delivery("hook", [old[4].id], state="dead", now=T0 + 10, error="x")
    # old[5] stays pending: its event must survive however old
    state_before = (store.load_state(REF.key), store.statuses())

    report = store.prune(now=T0 + 45 * DAY, retain_s=WINDOW, batch=2)
    assert (report.events, report.deliveries, report.done) == (5, 5, True)
    # the five padded events: the pages they held (SQLite) or their rows, compressed (PostgreSQL): 4 kB each at least
    assert report.bytes_freed >= 5 * 4096, report
    left = store.events_after(0)
    assert [e.id for _, e in left] == [old[5].id, *(e.id for e in recent)]
    assert store.deliveries_of([e.id for e in old[:5]]) == {e.id: [] for e in old[:5]}
    assert [d.state for d in store.deliveries_of([old[5].id])[old[5].id]] == ["pending"]
    assert (store.load_state(REF.key), store.statuses()) == state_before  # checkpoints and state untouched
    assert store.prune(now=T0 + 45 * DAY, retain_s=WINDOW).events == 0

    # once delivered, the old event goes on the next pass
    store.record_delivery("hook", [old[5].id], state="delivered", now=T0 + 45 * DAY)
    again = store.prune(now=T0 + 45 * DAY, retain_s=WINDOW)
    assert (again.events, again.deliveries) == (1, 1)
    assert [e.id for _, e in store.events_after(0)] == [e.id for e in recent]


def test_prune_dry_run_reports_and_changes_nothing(store: Store) -> None:
    apply(store, success(cp(1)), now=T0)
    old = grow(store, start=T0 + 1, polls=4, step_s=1)
    store.record_delivery("hook", [e.id for e in old[:3]], state="delivered", now=T0 + 10)
    before = (store.events_after(0), store.deliveries_of([e.id for e in old]), store.statuses())
    dry = store.prune(now=T0 + 31 * DAY, retain_s=WINDOW, dry_run=True)
    assert (dry.events, dry.deliveries) == (3, 3)
    assert dry.bytes_freed > 0  # an estimate
    assert (store.events_after(0), store.deliveries_of([e.id for e in old]), store.statuses()) == before
    real = store.prune(now=T0 + 31 * DAY, retain_s=WINDOW)
    assert (real.events, real.deliveries) == (dry.events, dry.deliveries)


def test_prune_in_bounded_passes(store: Store) -> None:
    apply(store, success(cp(1)), now=T0)
    apply(store, success(cp(1)), ref=OTHER, now=T0)
    old = grow(store, start=T0 + 1, polls=7, step_s=1)
    store.record_delivery("hook", [e.id for e in old], state="delivered", now=T0 + 10)
    passes = []
    while True:
        report = store.prune(now=T0 + 31 * DAY, retain_s=WINDOW, batch=3, max_batches=1)
        passes.append(report.events)
        if report.done:
            break
        assert len(passes) < 20
    assert sum(passes) == 7 and max(passes) <= 3
    assert store.events_after(0) == []
    assert store.statuses([OTHER.key])[0].baselined


def test_prune_of_an_empty_store(store: Store) -> None:
    report = store.prune(now=T0, retain_s=WINDOW)
    assert (report.events, report.deliveries, report.done) == (0, 0, True)
    assert store.prune(now=T0, retain_s=WINDOW, dry_run=True).events == 0
