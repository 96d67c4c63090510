"""The outbox dispatcher: delivers committed events to notifiers, in order per (notifier, fine-tune), with
persisted retries. A failing notifier delays only its own lanes, never polling or other notifiers."""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import httpx
import structlog

from watcher.config.load import Config, NotifierConfig, NotifierSecrets
from watcher.core.models import Delivery, Event, OutboxStats
from watcher.delivery.notifiers import NotifierSet, PreparedNotifiers
from watcher.delivery.notifiers.base import DeliveryResult, Notifier, Paced
from watcher.delivery.outcomes import OutcomeLog
from watcher.delivery.retry import FALLBACK_POLICY, RetryPolicy, clip, policy_of, settle
from watcher.delivery.tasks import finish_or_cancel
from watcher.errors import StoreError
from watcher.store import Store
from watcher.store.replicas import LaneScope, ReplicaStore

__all__ = ["Dispatcher", "RetryPolicy", "policy_of"]
log = structlog.get_logger("watcher.dispatch")
T = TypeVar("T")
InStore = Callable[..., Awaitable[Any]]
EVENT_MISSING = "event_missing"  # the last error of a delivery row whose event is gone
IDLE_RECHECK_S = 1.0  # rows queued by another process (`redeliver`, `once`) are seen within this
STALE_PAUSE_S = 1.0  # a lane this replica found it no longer holds is not tried again before this


async def _direct(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return fn(*args, **kwargs)


class Dispatcher:
    """Delivers due outbox rows; one lane (notifier, fine-tune) at a time, bounded concurrency per notifier."""

    def __init__(
        self,
        *,
        store: Store,
        notifiers: Mapping[str, Notifier],
        configs: Sequence[NotifierConfig],
        in_store: InStore | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        on_outcome: Callable[[str, str], None] | None = None,
        on_outbox: Callable[[list[OutboxStats], list[str]], None] | None = None,
        redact: Callable[[str], str] = str,
        lanes: LaneScope | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`lanes`: replicas, which lanes this process delivers (those it owns, and those nobody leases when it is
        the replica that delivers them) and under which lease (each send is fenced by it); None: every lane,
        unfenced (one process). `monotonic` times a lease's validity (a test's fake clock)."""
        self._store = store
        self._in_store = in_store or _direct
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_outcome = on_outcome
        self._on_outbox = on_outbox
        self._redact = redact  # receivers echo URLs in error bodies; nothing secret reaches the outbox table
        self._outbox_at = 0.0
        self._wake = asyncio.Event()
        self._lanes: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._outcomes = OutcomeLog()
        # lanes whose last outcome could not be recorded (the store failed): held back, with a growing pause,
        # so a store outage re-sends an event a few times rather than in a hot loop
        self._held: dict[tuple[str, str], float] = {}
        self._unrecorded = 0
        self._store_failing = False
        self.disabled: set[str] = set()
        self.last_beat = time.monotonic()
        self._set = NotifierSet()
        self._retire_due = True  # rows of notifiers no longer configured: retired by the loop at start, reload
        self._deferred_until: float | None = None  # the earliest first attempt held back by retry_schedule_s[0]
        self.lanes = lanes
        self._monotonic = monotonic
        self.configure(notifiers, configs)

    def configure(self, notifiers: Mapping[str, Notifier], configs: Sequence[NotifierConfig]) -> None:
        """Adopt a (re)loaded set of notifiers (the caller closes replaced ones); a reload re-enables
        notifiers disabled by a 410, and the running loop retires the pending rows of removed ones."""
        self.notifiers = dict(notifiers)
        self.configs = {entry.name: entry for entry in configs}
        self.policies = {entry.name: policy_of(entry) for entry in configs}
        self._semaphores = {entry.name: asyncio.Semaphore(entry.max_concurrency) for entry in configs}
        self.disabled.clear()
        self._retire_due = True
        self.wake()

    def configure_undoable(
        self, notifiers: Mapping[str, Notifier], configs: Sequence[NotifierConfig]
    ) -> Callable[[], None]:
        """configure(), returning what undoes it (back to the notifiers, configs and 410-disabled set before)."""
        old_notifiers, old_configs, old_disabled = dict(self.notifiers), list(self.configs.values()), set(self.disabled)
        self.configure(notifiers, configs)

        def undo() -> None:
            self.configure(old_notifiers, old_configs)
            self.disabled |= old_disabled

        return undo

    def reconfigure(
        self,
        config: Config,
        secrets: Mapping[str, NotifierSecrets],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """Adopt a (re)loaded config: an unchanged notifier keeps its object, client and Slack rate limiter; a
        replaced or removed one is closed once its in-flight deliveries finish."""
        before = self.notifiers
        current = self._set.update(config, secrets, transport=transport)
        self.configure(current, config.notifiers)
        if before:  # a reload: say what it kept and what it built anew
            kept = sorted(name for name, notifier in current.items() if before.get(name) is notifier)
            log.info("notifiers.updated", kept=kept, built=sorted(set(current) - set(kept)))

    def prepare_notifiers(
        self,
        config: Config,
        secrets: Mapping[str, NotifierSecrets],
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> PreparedNotifiers:
        """A reload's first half: build the notifiers that changed, keep the rest; nothing changes yet."""
        return self._set.prepare(config, secrets, transport=transport)

    def commit_notifiers(self, prepared: PreparedNotifiers) -> None:
        """A reload's last half, once every step applied: close the replaced notifiers once idle."""
        before = self.notifiers
        self._set.commit(prepared)
        kept = sorted(name for name, (_, notifier) in prepared.built.items() if before.get(name) is notifier)
        log.info("notifiers.updated", kept=kept, built=sorted(set(prepared.built) - set(kept)))

    def discard_notifiers(self, prepared: PreparedNotifiers) -> None:
        """Close what a reload that did not apply built."""
        self._set.discard(prepared)

    def route(self, event: Event) -> list[str]:
        """The notifiers whose filters want this event (disabled ones too: their rows wait)."""
        return [name for name, entry in self.configs.items() if entry.wants(event.type, event.fine_tune_key)]

    def wake(self) -> None:
        """Look for due rows now (new events were committed, or a lane finished)."""
        self._wake.set()

    @property
    def active(self) -> list[str]:
        """The notifiers that may deliver now."""
        return [name for name in self.notifiers if name not in self.disabled]

    async def run(self, stop: asyncio.Event) -> None:
        """Deliver until stop is set; at start and after each reload, retire the rows of removed notifiers."""
        while not stop.is_set():
            self.last_beat = time.monotonic()
            if self._retire_due:
                await self._retire_removed()
            await self.pass_once()
            await self.report_outbox(at_most_every_s=0.25)
            self._wake.clear()
            timeout = IDLE_RECHECK_S
            if not self._store_failing:
                try:
                    next_due = await self._in_store(self._store.next_due_at, self.active, **self._scope())
                except StoreError:
                    next_due = None
                if next_due is not None:
                    wait = next_due - self._clock()
                    if wait <= 0 and self._deferred_until is not None:  # due rows all wait for their first delay
                        wait = self._deferred_until - self._clock()
                    timeout = min(IDLE_RECHECK_S, max(0.05, wait))
            waiters = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
            try:
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()

    def _scope(self) -> dict[str, Any]:
        # only the PostgreSQL store takes `fine_tunes`; a replica owning nothing delivers nothing (but the replica
        # that delivers the lanes nobody leases)
        scope = self.lanes
        return {} if scope is None else {"fine_tunes": list(scope.lanes()), "unowned": scope.unowned_lanes()}

    async def _valid_until(self, head: Delivery) -> float | None:
        """Replicas: the monotonic time until which this process may send the head (its lease at the lane's
        current position), or None: the lane is not (or no longer) this process's to send."""
        scope = self.lanes
        if scope is None:
            return float("inf")
        fence = scope.fence(head.fine_tune_key)
        if fence is None and not scope.unowned_lanes():
            return None
        assert isinstance(self._store, ReplicaStore), "replicas share a PostgreSQL store"
        asked_at = self._monotonic()  # before the question: the answer's validity counts from no later
        left = await self._in_store(
            self._store.deliverable, head, replica=scope.replica, epoch=None if fence is None else fence[1]
        )
        return None if left is None else asked_at + left

    def _stale(self, head: Delivery) -> None:
        # held back until the lease keeper's next round has likely told who holds the lane now
        self._held[(head.notifier, head.fine_tune_key)] = time.monotonic() + STALE_PAUSE_S
        log.warning(
            "delivery.fenced",
            notifier=head.notifier,
            fine_tune=head.fine_tune_key,
            event_id=head.event_id,
            hint="this replica no longer holds the lane at this event (its lease moved on): not sent",
        )

    async def _retire_removed(self) -> None:
        self._retire_due = False
        try:
            count = await self._in_store(self._store.retire_notifiers, list(self.configs), now=self._clock())
        except StoreError as err:
            if not self._store_failing:  # an outage is logged once, by pass_once
                log.error("dispatch.store_failed", error=str(err))
            self._store_failing = True
            self._retire_due = True  # tried again on the next turn of the loop
            return
        if count:
            log.warning(
                "delivery.notifier_removed",
                rows=count,
                configured=sorted(self.configs),
                hint="pending deliveries of notifiers no longer configured are dead (reason notifier_removed)",
            )

    async def pass_once(self, *, event_ids: set[str] | None = None) -> int:
        """Start a delivery for every due lane head (only of `event_ids` when given), and give up on heads
        older than max_age_s without sending them; returns how many heads it started or gave up on."""
        now = self._clock()
        try:
            heads = await self._in_store(self._store.due_deliveries, self.active, now=now, **self._scope())
        except StoreError as err:
            if not self._store_failing:
                log.error("dispatch.store_failed", error=str(err))
            self._store_failing = True
            return 0
        if self._store_failing:
            log.info("dispatch.store_recovered")
            self._store_failing = False
        started = 0
        expired: dict[str, list[Delivery]] = {}
        self._deferred_until = None
        for head in heads:
            lane = (head.notifier, head.fine_tune_key)
            if lane in self._lanes or (event_ids is not None and head.event_id not in event_ids):
                continue
            if self._held.get(lane, 0.0) > time.monotonic():
                continue
            policy = self.policies.get(head.notifier)
            if policy is not None and head.attempts == 0:  # retries were checked against max_age_s when scheduled
                if policy.expired(queued_at=head.queued_at, now=now):  # e.g. queued while the daemon was down
                    expired.setdefault(head.notifier, []).append(head)
                    continue
                first_at = policy.first_attempt_at(head.queued_at)
                if first_at > now:
                    self._deferred_until = min(first_at, self._deferred_until or first_at)
                    continue
            task = asyncio.create_task(self._deliver(head), name=f"deliver {head.notifier}")
            self._lanes[lane] = task
            task.add_done_callback(functools.partial(self._lane_done_cb, lane))
            started += 1
        self._outcomes.expiring_only(expired)
        for name, stale in expired.items():
            started += await self._expire(name, stale, now=now)
        return started

    async def _expire(self, name: str, heads: Sequence[Delivery], *, now: float) -> int:
        max_age_s = self.policies[name].max_age_s
        error = f"expired before an attempt: queued more than max_age_s ({max_age_s:g} s) ago"
        ids = [head.event_id for head in heads]
        try:
            await self._in_store(self._store.record_delivery, name, ids, state="dead", now=now, error=error)
        except StoreError as err:
            log.error("delivery.unrecorded", notifier=name, error=str(err))
            return 0
        if self._on_outcome is not None:
            for _ in ids:
                self._on_outcome(name, "dead")
        self._outcomes.expired(name, ids, max_age_s=max_age_s)
        self.wake()  # the next rows of these lanes are heads now
        return len(ids)

    async def report_outbox(self, *, at_most_every_s: float = 0.0) -> None:
        """Hand the outbox's pending counts to `on_outbox` (the gauges and the STATUS= line)."""
        # the loop reports at most four times a second: truthful gauges without a query per delivery
        if self._on_outbox is None or time.monotonic() - self._outbox_at < at_most_every_s:
            return
        self._outbox_at = time.monotonic()
        try:
            stats = await self._in_store(self._store.outbox_stats)
        except StoreError:
            return
        self._on_outbox(stats, list(self.configs))

    def _lane_done_cb(self, lane: tuple[str, str], _task: asyncio.Task[None]) -> None:
        self._lane_done(lane)

    def _lane_done(self, lane: tuple[str, str]) -> None:
        self._lanes.pop(lane, None)
        self.wake()

    async def deliver_due(self, *, deadline_s: float) -> None:
        """`once`: deliver every due row, lane by lane, until nothing is due or time is up."""
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while loop.time() < end:
            started = await self.pass_once()  # deliveries started or stale rows given up on
            if not started and not self._lanes:
                return
            await self.drain(max(0.0, end - loop.time()))

    async def drain(self, grace_s: float) -> None:
        """Let in-flight deliveries finish (and be recorded) within grace_s, then cancel the rest."""
        cancelled = await finish_or_cancel(set(self._lanes.values()), grace_s)
        if cancelled:
            log.warning("dispatch.cancelled_deliveries", count=cancelled)

    async def _deliver(self, head: Delivery) -> None:
        notifier = self.notifiers.get(head.notifier)
        if notifier is None:
            return
        with self._set.lease(notifier):  # a reload closes a replaced notifier only after this delivery
            await self._deliver_with(notifier, head)

    async def _deliver_with(self, notifier: Notifier, head: Delivery) -> None:
        name = head.notifier
        try:
            async with self._semaphores[name]:
                if name in self.disabled:  # a 410 arrived while this lane waited for its turn
                    return
                rows = [head]
                if notifier.digest_over is not None:
                    batch = await self._in_store(self._store.lane_batch, head)
                    if len(batch) > notifier.digest_over and batch[0].event_id == head.event_id:
                        rows = batch
                events = await self._in_store(self._store.events_by_id, [row.event_id for row in rows])
                missing = [row.event_id for row in rows if row.event_id not in events]
                if missing:  # pruned under a redeliver (or by hand): such a row can never be sent, so it must not
                    # hold its lane; dead, the next row of the lane is its head
                    await self._in_store(
                        self._store.record_delivery, name, missing, state="dead", now=self._clock(), error=EVENT_MISSING
                    )
                    log.warning("delivery.event_missing", notifier=name, event_ids=missing)
                    if self._on_outcome is not None:
                        for _ in missing:
                            self._on_outcome(name, "dead")
                rows = [row for row in rows if row.event_id in events]
                ordered = [events[row.event_id] for row in rows]
                if not ordered or head.event_id in missing:  # the lane's next row is its head now: a pass of its own
                    return
                timeout = self.configs[name].timeout_s + 5 if name in self.configs else 20
                # replicas: sent only under a lease still held at the lane's current position, checked last
                # thing before the send; a process frozen past that (SIGSTOP, a paused VM) asks again, and a
                # stale one stops here: the new owner may have moved the lane on
                valid_until = await self._valid_until(head)
                if valid_until is None:
                    self._stale(head)
                    return
                if isinstance(notifier, Paced):
                    await notifier.wait_turn()  # a wait for a rate-limit slot is not a slow receiver: not timed
                    if name in self.disabled:  # a 410 arrived while this lane waited for its slot
                        return
                    if self._monotonic() >= valid_until:
                        valid_until = await self._valid_until(head)
                if valid_until is None or self._monotonic() >= valid_until:
                    self._stale(head)
                    return
                attempt = notifier.send_now(ordered) if isinstance(notifier, Paced) else notifier.send(ordered)
                try:
                    result = await asyncio.wait_for(attempt, timeout=timeout)
                except TimeoutError:
                    result = DeliveryResult("retry", error="timed out")
                try:
                    await self._record(name, rows, result)
                except StoreError as err:
                    self._hold(head, err)
                    return
                if self._unrecorded:
                    log.info("delivery.recording_again", notifier=name)
                    self._unrecorded = 0
                self._held.pop((name, head.fine_tune_key), None)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # the top of a delivery job: a crash is a failed attempt, retried on schedule
            log.exception("delivery.crashed", notifier=name, event_id=head.event_id, error=type(err).__name__)
            try:
                await self._record(name, [head], DeliveryResult("retry", error=f"internal error: {type(err).__name__}"))
            except StoreError as store_err:
                self._hold(head, store_err)

    def _hold(self, head: Delivery, err: StoreError) -> None:
        pause = min(30.0, 0.5 * 2**self._unrecorded)
        if not self._unrecorded:
            log.error(
                "delivery.unrecorded",
                notifier=head.notifier,
                event_id=head.event_id,
                error=str(err),
                hint="the outcome could not be written; the event will be sent again (at least once)",
            )
        self._unrecorded += 1
        self._held[(head.notifier, head.fine_tune_key)] = time.monotonic() + pause

    async def _record(self, name: str, rows: Sequence[Delivery], result: DeliveryResult) -> None:
        now = self._clock()
        head = rows[0]
        ids = [row.event_id for row in rows]
        # redact first, then clip: a secret cut in half would no longer match
        error = clip(self._redact(result.error)) if result.error else None
        policy = self.policies.get(name) or FALLBACK_POLICY
        settled = settle(result, head=head, policy=policy, now=now, rng=self._rng, error=error)
        await self._in_store(
            self._store.record_delivery,
            name,
            ids,
            state="pending" if settled.state == "retry" else settled.state,
            now=now,
            next_attempt_at=settled.next_attempt_at,
            error=settled.error,
            http_status=result.http_status,
        )
        outcome = {"delivered": "delivered", "retry": "retried", "dead": "dead"}[settled.state]
        if self._on_outcome is not None:
            for _ in ids:
                self._on_outcome(name, outcome)
        self._outcomes.settled(name, head, ids, settled, now=now, http_status=result.http_status)
        if result.disable:
            self.disabled.add(name)
            self._outcomes.disabled(name, result.http_status)

    async def aclose(self) -> None:
        """Close every notifier, those in force and those replaced by reloads (after draining deliveries)."""
        await self._set.aclose(also=self.notifiers.values())
