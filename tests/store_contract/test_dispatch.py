"""Contract: the dispatcher over each store (rows whose event is gone, lanes nobody owns)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

from watcher.config.load import parse_config
from watcher.core.models import Event
from watcher.delivery.dispatch import Dispatcher
from watcher.delivery.notifiers.base import DeliveryResult
from watcher.store import Store
from watcher.store.postgres.store import PostgresStore

from .support import REF, apply, cp, success


class Collecting:
    """A notifier that records what it is sent and says delivered."""

    name = "hook"
    digest_over: int | None = None

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, events: Sequence[Event]) -> DeliveryResult:
        self.sent += [event.id for event in events]
        return DeliveryResult("delivered", http_status=200)

    async def aclose(self) -> None:
        pass


def configs() -> Any:
    data = {
        "hub": {"url": "http://127.0.0.1:9", "token": "t"},
        "fine_tunes": [{"namespace": REF.namespace, "repo": REF.repo, "id": REF.id}],
        "notifiers": [{"name": "hook", "type": "log", "retry_schedule_s": [0, 0.2]}],
    }
    return parse_config(data, source="t.toml").notifiers


def execute(store: Store, sql: str, args: Sequence[Any] = ()) -> None:
    """Raw SQL on the store's database (what another process, or an old release, could leave behind)."""
    if isinstance(store, PostgresStore):
        with store.pool.connection() as conn:
            conn.execute(sql.replace("?", "%s"), args)
    else:
        store._db.execute(sql, args)  # type: ignore[attr-defined]


def test_a_row_whose_event_is_gone_turns_dead_and_never_blocks_its_lane(store: Store) -> None:
    now = time.time() - 10
    apply(store, success(cp(1)), now=now)
    first = apply(store, success(cp(1), cp(2)), now=now, route=lambda _e: ["hook"]).events[0]
    second = apply(store, success(cp(1), cp(2), cp(3)), now=now + 1, route=lambda _e: ["hook"]).events[0]
    execute(store, "DELETE FROM events WHERE id = ?", (first.id,))  # retention raced a redeliver
    notifier = Collecting()
    dispatcher = Dispatcher(store=store, notifiers={"hook": notifier}, configs=configs())

    async def deliver() -> None:
        await dispatcher.deliver_due(deadline_s=10)

    asyncio.run(deliver())
    rows = store.deliveries_of([first.id, second.id])
    assert [(d.state, d.last_error) for d in rows[first.id]] == [("dead", "event_missing")]
    assert [d.state for d in rows[second.id]] == ["delivered"]
    assert notifier.sent == [second.id]
