"""Contract: lifecycle state per fine-tune and discovery state per source, committed with their events."""

from __future__ import annotations

from watcher.core.events import rfc3339
from watcher.core.lifecycle import LifecycleOptions
from watcher.core.models import EventDraft, HubFineTune, SourceState
from watcher.store import Store

from .conftest import Opener
from .support import OTHER, REF, T0, apply, cp, success

OPTIONS = LifecycleOptions(stall_after_s=100)
ROUTE = lambda event: ["hook"]


def ft(status: str, **kw: str) -> HubFineTune:
    return HubFineTune(REF.id, name=REF.name, status=status, **kw)


def test_first_status_is_recorded_silently_and_survives_a_new_store(store_factory: Opener) -> None:
    store = store_factory()
    committed = store.apply_lifecycle(REF, ft("running"), options=OPTIONS, now=T0, source="config", route=ROUTE)
    assert committed.events == ()
    assert committed.record.state.status == "running" and committed.record.status_at == T0
    again = store_factory()
    record = again.load_lifecycle([REF.key])[REF.key]
    assert record.state.status == "running" and record.source == "config" and record.status_at == T0
    assert again.load_lifecycle([OTHER.key]) == {}


def test_a_status_change_commits_its_event_and_outbox_row_once(store: Store) -> None:
    store.apply_lifecycle(REF, ft("running"), options=OPTIONS, now=T0, route=ROUTE)
    apply(store, success(cp(1, loss=0.9), cp(2, loss=0.5)), now=T0 + 1)
    done = store.apply_lifecycle(
        REF,
        ft("completed", started_at="2025-06-01T12:00:00Z", finished_at="2025-06-01T13:00:00Z"),
        options=OPTIONS,
        now=T0 + 2,
        route=ROUTE,
    )
    (event,) = done.events
    assert event.type == "fine_tune.status_changed" and event.fine_tune_key == REF.key
    assert event.data["previous_status"] == "running" and event.data["status"] == "completed"
    assert event.data["checkpoints"] == 2 and event.data["best_loss"] == 0.5 and event.data["best_step"] == 2
    assert event.data["duration_s"] == 3600.0
    assert [e.id for e in store.recent_events(type_glob="fine_tune.*")] == [event.id]
    assert [d.event_id for d in store.deliveries_of([event.id])[event.id]] == [event.id]
    repeat = store.apply_lifecycle(REF, ft("completed"), options=OPTIONS, now=T0 + 3, route=ROUTE)
    assert repeat.events == ()
    assert len(store.recent_events(type_glob="fine_tune.*")) == 1


def test_a_dry_run_writes_nothing(store: Store) -> None:
    store.apply_lifecycle(REF, ft("running"), options=OPTIONS, now=T0)
    preview = store.apply_lifecycle(REF, ft("errored", error="OOM"), options=OPTIONS, now=T0 + 1, commit=False)
    assert [e.type for e in preview.events] == ["fine_tune.status_changed"]
    assert store.load_lifecycle([REF.key])[REF.key].state.status == "running"
    assert store.recent_events() == []


def test_stall_is_persisted_once(store: Store) -> None:
    apply(store, success(), now=T0)  # polled: no checkpoint (a stall is judged only once they were read)
    store.apply_lifecycle(REF, ft("running"), options=OPTIONS, now=T0)  # no started_at: the clock runs from now
    stalled = store.apply_lifecycle(REF, None, options=OPTIONS, now=T0 + 200)
    assert [e.type for e in stalled.events] == ["fine_tune.stalled"]
    assert store.load_lifecycle()[REF.key].state.stalled
    assert store.apply_lifecycle(REF, None, options=OPTIONS, now=T0 + 300).events == ()


def test_source_state_and_discovered_events_commit_together(store_factory: Opener) -> None:
    store = store_factory()
    assert store.load_source("support") == SourceState()
    draft = EventDraft("fine_tune.discovered", {"fine_tune": OTHER.as_data(), "source": "support"})
    state = SourceState(baselined=True, known_ids=frozenset({REF.id, OTHER.id}))
    (event,) = store.apply_discovery(
        "support", state, [(OTHER, draft)], now=T0, sources=[(OTHER, True), (REF, False)], route=ROUTE
    )
    assert event.fine_tune_key == OTHER.key and event.type == "fine_tune.discovered"
    again = store_factory()
    assert again.load_source("support") == state
    records = again.load_lifecycle([REF.key, OTHER.key])
    assert records[OTHER.key].announce_checkpoints and records[OTHER.key].source == "support"
    assert not records[REF.key].announce_checkpoints
    assert [d.notifier for d in again.deliveries_of([event.id])[event.id]] == ["hook"]
    assert again.discovered_names() == {OTHER.key: ("support", "second"), REF.key: ("support", "first")}
    # ids are never forgotten, even when a later state omits them
    again.apply_discovery("support", SourceState(baselined=True, known_ids=frozenset()), [], now=T0 + 1)
    assert again.load_source("support").known_ids == {REF.id, OTHER.id}


def test_a_listed_fine_tune_keeps_config_as_its_source(store: Store) -> None:
    store.apply_lifecycle(REF, ft("running"), options=OPTIONS, now=T0, source="config")
    store.apply_discovery("support", SourceState(baselined=True), [], now=T0, sources=[(REF, False)])
    assert store.load_lifecycle()[REF.key].source == "config"


def test_a_running_fine_tune_read_before_its_first_poll_stalls_once_from_when_its_checkpoint_was_first_seen(
    store: Store,
) -> None:
    # discovered running since long ago; its checkpoints carry no created_at and have not been polled yet
    started = "2025-06-01T12:00:00Z"
    early = store.apply_lifecycle(REF, ft("running", started_at=started), options=OPTIONS, now=T0, route=ROUTE)
    assert early.events == ()  # its checkpoints are unknown, not absent: no stall judged yet
    no_created_at = [{k: v for k, v in cp(step).items() if k != "created_at"} for step in (100, 200)]
    apply(store, success(*no_created_at), now=T0 + 10)  # the first poll: what the Hub had all along
    fired = []
    for offset in range(20, 1000, 20):  # the sweep keeps evaluating it; no new checkpoint comes
        fine_tune = ft("running", started_at=started) if offset % 100 == 0 else None
        fired += store.apply_lifecycle(REF, fine_tune, options=OPTIONS, now=T0 + offset, route=ROUTE).events
    (event,) = fired
    assert event.type == "fine_tune.stalled"
    assert event.data["last_checkpoint_at"] == rfc3339(T0 + 20)  # first seen by the lifecycle after that poll
    assert len(store.recent_events(type_glob="fine_tune.stalled")) == 1
