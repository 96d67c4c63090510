"""Every Prometheus metric of oxen-watcher, defined once, on a registry passed in.

Counters and the histogram count what this process did. The state gauges (fine-tunes, checkpoints,
deployments, the outbox) come from a snapshot of the persisted state that the app refreshes on its store
thread, so a scrape never touches the database and a restart does not reset them.
"""

from __future__ import annotations

import contextlib
import platform
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from watcher.core.models import EVENT_TYPES, FineTuneRef, FineTuneStatus, OutboxStats, parse_time

POLL_OUTCOMES = ("ok", "not_found", "unauthorized", "error")
DELIVERY_OUTCOMES = ("delivered", "retried", "dead")
LEASE_CHANGES = ("acquired", "released", "expired", "fenced")
HUB_ENDPOINTS = ("checkpoints", "fine_tune", "list")
PollChildren = Mapping[str, tuple[Any, Any]]  # outcome -> (polls counter child, duration histogram child)
FINE_TUNE_LABELS = ("namespace", "repo", "fine_tune_id", "name")
_TRAINING_METRICS = ("loss", "learning_rate", "grad_norm", "mean_token_accuracy", "epoch")


class StateCollector(Collector):
    """Turns the latest StateSnapshot into gauge families at scrape time (no I/O)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._fine_tunes: dict[str, tuple[FineTuneRef, FineTuneStatus]] = {}
        self._last_success: dict[str, float] = {}
        # key -> (step, when the watcher first saw it): stands in for a newest checkpoint without created_at
        self._first_seen: dict[str, tuple[int, float]] = {}
        self._outbox: dict[str, OutboxStats] = {}
        self._notifiers: tuple[str, ...] = ()

    def set_fine_tune(self, ref: FineTuneRef, status: FineTuneStatus) -> None:
        """Show this status for a fine-tune from now on."""
        with self._lock:
            self._fine_tunes[ref.key] = (ref, status)

    def set_last_success(self, key: str, at: float) -> None:
        """Record a 200 poll (cheaper than a whole new status, once per poll)."""
        self._last_success[key] = at  # a single dict store is atomic under the GIL

    def set_first_seen(self, key: str, step: int | None, at: float | None) -> None:
        """When the watcher first saw a fine-tune's newest checkpoint: its timestamp when the Hub gives no
        created_at (the lifecycle's stall clock, so the metric and fine_tune.stalled agree)."""
        with self._lock:
            if step is None or at is None:
                self._first_seen.pop(key, None)
            else:
                self._first_seen[key] = (step, at)

    def forget_fine_tune(self, key: str) -> None:
        """Forget one fine-tune (no longer watched)."""
        with self._lock:
            self._fine_tunes.pop(key, None)
            self._last_success.pop(key, None)
            self._first_seen.pop(key, None)

    def pending_total(self) -> int:
        """Deliveries pending across notifiers, as last reported."""
        with self._lock:
            return sum(entry.pending for entry in self._outbox.values())

    def set_outbox(self, stats: Iterable[OutboxStats], notifiers: Sequence[str]) -> None:
        """Show these pending counts; configured notifiers without pending rows show 0."""
        with self._lock:
            self._outbox = {entry.notifier: entry for entry in stats}
            self._notifiers = tuple(notifiers)

    def describe(self) -> Iterable[Metric]:
        """Nothing at registration time: the families depend on the snapshot."""
        return []

    def collect(self) -> Iterable[Metric]:
        """The state gauges."""
        with self._lock:
            fine_tunes = list(self._fine_tunes.values())
            last_success = dict(self._last_success)
            first_seen = dict(self._first_seen)
            outbox = dict(self._outbox)
            notifiers = self._notifiers
        now = self._clock()
        last_success_family = GaugeMetricFamily(
            "oxen_watcher_last_success_timestamp_seconds",
            "Unix time of the last poll of a fine-tune that the Hub answered 200.",
            labels=("namespace", "repo", "fine_tune_id"),
        )
        checkpoints = GaugeMetricFamily(
            "oxen_fine_tune_checkpoints", "Checkpoints the Hub lists for a fine-tune.", labels=FINE_TUNE_LABELS
        )
        latest_step = GaugeMetricFamily(
            "oxen_fine_tune_latest_step", "Step of the newest checkpoint of a fine-tune.", labels=FINE_TUNE_LABELS
        )
        training = {
            name: GaugeMetricFamily(
                f"oxen_fine_tune_{name}",
                f"The {name.replace('_', ' ')} of the latest checkpoint of a fine-tune that reports it.",
                labels=FINE_TUNE_LABELS,
            )
            for name in _TRAINING_METRICS
        }
        latest_at = GaugeMetricFamily(
            "oxen_fine_tune_latest_checkpoint_timestamp_seconds",
            "created_at of the newest checkpoint of a fine-tune, as Unix time.",
            labels=FINE_TUNE_LABELS,
        )
        deployment = GaugeMetricFamily(
            "oxen_checkpoint_deployment_status",
            "1 for the current deployment status of each checkpoint that has one (status verbatim from the Hub).",
            labels=("namespace", "repo", "fine_tune_id", "step", "status"),
        )
        for ref, status in fine_tunes:
            ids = [ref.namespace, ref.repo, ref.id]
            labels = [*ids, ref.name]
            success_at = max(status.last_success_at or 0.0, last_success.get(ref.key, 0.0))
            if success_at:
                last_success_family.add_metric(ids, success_at)
            if not status.baselined:
                continue
            checkpoints.add_metric(labels, status.checkpoints)
            if status.latest_step is not None:
                latest_step.add_metric(labels, status.latest_step)
            for name, family in training.items():
                value = status.metrics.get(name)
                if value is not None:
                    family.add_metric(labels, value)
            created = parse_time(status.latest_created_at)
            seen = first_seen.get(ref.key)
            if created is None and status.latest_created_at is None and seen and seen[0] == status.latest_step:
                created = seen[1]  # no created_at from the Hub: when the watcher first saw it stands in
            if created is not None:
                latest_at.add_metric(labels, created)
            for step, deployment_status in sorted(status.deployments.items()):
                deployment.add_metric([*ids, str(step), deployment_status], 1)
        pending = GaugeMetricFamily(
            "oxen_watcher_outbox_pending",
            "Deliveries waiting to be sent (or retried), per notifier.",
            labels=("notifier",),
        )
        oldest = GaugeMetricFamily(
            "oxen_watcher_outbox_oldest_pending_age_seconds",
            "Age of the oldest delivery still pending, per notifier (0 when none).",
            labels=("notifier",),
        )
        for notifier in sorted(set(notifiers) | set(outbox)):
            stats = outbox.get(notifier)
            pending.add_metric([notifier], stats.pending if stats else 0)
            age = max(0.0, now - stats.oldest_pending_at) if stats and stats.oldest_pending_at else 0.0
            oldest.add_metric([notifier], age)
        yield from (
            last_success_family,
            checkpoints,
            latest_step,
            *training.values(),
            latest_at,
            deployment,
            pending,
            oldest,
        )


class LifecycleCollector(Collector):
    """Fine-tune statuses and watched counts per source, set by the daemon, turned into gauges at scrape time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._statuses: dict[str, tuple[FineTuneRef, str]] = {}
        self._watched: dict[str, int] = {}

    def set_status(self, ref: FineTuneRef, status: str | None) -> None:
        """Show this Hub status (verbatim) for a fine-tune from now on; None: no status known."""
        with self._lock:
            if status is None:
                self._statuses.pop(ref.key, None)
            else:
                self._statuses[ref.key] = (ref, status)

    def retain(self, keys: Iterable[str]) -> None:
        """Forget the statuses of fine-tunes no longer watched."""
        wanted = set(keys)
        with self._lock:
            for key in [k for k in self._statuses if k not in wanted]:
                del self._statuses[key]

    def set_watched(self, counts: dict[str, int]) -> None:
        """Watched fine-tunes per source ("config" or a [[discover]] name); sources not given vanish."""
        with self._lock:
            self._watched = dict(counts)

    def describe(self) -> Iterable[Metric]:
        """Nothing at registration time: the families depend on what is set."""
        return []

    def collect(self) -> Iterable[Metric]:
        """The lifecycle gauges."""
        with self._lock:
            statuses = list(self._statuses.values())
            watched = dict(self._watched)
        status_family = GaugeMetricFamily(
            "oxen_fine_tune_status",
            "1 for the current Hub status of each watched fine-tune (status verbatim from the Hub).",
            labels=(*FINE_TUNE_LABELS, "status"),
        )
        for ref, status in statuses:
            status_family.add_metric([ref.namespace, ref.repo, ref.id, ref.name, status], 1)
        watched_family = GaugeMetricFamily(
            "oxen_watcher_watched_fine_tunes",
            "Fine-tunes watched, per source: config ([[fine_tunes]]) or a [[discover]] name.",
            labels=("source",),
        )
        for source, count in sorted(watched.items()):
            watched_family.add_metric([source], count)
        yield from (status_family, watched_family)


class Metrics:
    """The watcher's metrics on one registry (a fresh CollectorRegistry in tests)."""

    def __init__(self, registry: CollectorRegistry, *, version: str, clock: Callable[[], float] = time.time) -> None:
        # `_created` series only add noise to a watcher's counters; prometheus_client offers no per-registry switch
        disable_created_metrics()
        self.registry = registry
        self.build_info = Gauge(
            "oxen_watcher_build_info",
            "Build information; always 1.",
            ("version", "python_version"),
            registry=registry,
        )
        self.build_info.labels(version, platform.python_version()).set(1)
        self.polls = Counter(
            "oxen_watcher_polls",
            "Polls of a fine-tune's checkpoints, by outcome.",
            ("namespace", "repo", "fine_tune_id", "outcome"),
            registry=registry,
        )
        self.poll_duration = Histogram(
            "oxen_watcher_poll_duration_seconds",
            "Time of one poll, HTTP through commit, by outcome.",
            ("outcome",),
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=registry,
        )
        self.events = Counter("oxen_watcher_events", "Events committed, by type.", ("type",), registry=registry)
        for event_type in EVENT_TYPES:  # every known series from 0: rate() and increase() see the first event
            self.events.labels(event_type)
        self.deliveries = Counter(
            "oxen_watcher_deliveries",
            "Delivery attempts by notifier and outcome.",
            ("notifier", "outcome"),
            registry=registry,
        )
        self._notifiers: set[str] = set()
        self.polls_skipped = Counter(
            "oxen_watcher_polls_skipped",
            "Scheduled polls skipped because the fine-tune's previous poll was still running.",
            registry=registry,
        )
        self.state = StateCollector(clock)
        registry.register(self.state)
        self.hub_requests = Counter(
            "oxen_watcher_hub_requests",
            "HTTP requests to the Hub by endpoint (checkpoints, fine_tune, list) and outcome.",
            ("endpoint", "outcome"),
            registry=registry,
        )
        self.lifecycle = LifecycleCollector()
        registry.register(self.lifecycle)

    def enable_replicas(self) -> None:
        """The replica metrics (PostgreSQL store only): leases, live replicas, unowned fine-tunes, the pool."""
        registry = self.registry
        self.leases_owned = Gauge(
            "oxen_watcher_leases_owned", "Leases this replica holds (fine-tunes and sources).", registry=registry
        )
        self.lease_changes = Counter(
            "oxen_watcher_lease_changes",
            "Lease changes of this replica: acquired, released, expired (lost to a takeover), fenced (a poll's "
            "or a source read's commit refused because the lease had moved on).",
            ("change",),
            registry=registry,
        )
        for change in LEASE_CHANGES:
            self.lease_changes.labels(change)
        self.replicas_live = Gauge("oxen_watcher_replicas_live", "Replicas with a live heartbeat.", registry=registry)
        self.fine_tunes_unowned = Gauge(
            "oxen_watcher_fine_tunes_unowned",
            "Configured fine-tunes no live replica holds a lease on (from the database).",
            registry=registry,
        )
        self.db_pool_size = Gauge("oxen_watcher_db_pool_size", "Connections in the database pool.", registry=registry)
        self.db_pool_waiting = Gauge(
            "oxen_watcher_db_pool_waiting", "Callers waiting for a database pool connection.", registry=registry
        )

    def poll_children(self, ref: FineTuneRef) -> PollChildren:
        """The poll counters of a fine-tune that starts being watched, every outcome shown at 0."""
        children = {
            outcome: (self.polls.labels(ref.namespace, ref.repo, ref.id, outcome), self.poll_duration.labels(outcome))
            for outcome in POLL_OUTCOMES
        }
        return children

    def drop_fine_tune(self, ref: FineTuneRef) -> None:
        """Remove every series of a fine-tune no longer watched."""
        for outcome in POLL_OUTCOMES:
            with contextlib.suppress(KeyError):
                self.polls.remove(ref.namespace, ref.repo, ref.id, outcome)
        self.state.forget_fine_tune(ref.key)

    def set_notifiers(self, names: Iterable[str]) -> None:
        """Show every (notifier, outcome) of the configured notifiers from 0; removed notifiers' series go."""
        wanted = set(names)
        for name in self._notifiers - wanted:
            for outcome in DELIVERY_OUTCOMES:
                with contextlib.suppress(KeyError):
                    self.deliveries.remove(name, outcome)
        for name in wanted - self._notifiers:
            for outcome in DELIVERY_OUTCOMES:
                self.deliveries.labels(name, outcome)
        self._notifiers = wanted

    def observe_hub_request(self, endpoint: str, outcome: str) -> None:
        """Count one HTTP request to the Hub (HubClient.on_request)."""
        self.hub_requests.labels(endpoint, outcome).inc()

    def observe_event(self, event_type: str) -> None:
        """Count one committed event."""
        self.events.labels(event_type).inc()

    def observe_delivery(self, notifier: str, outcome: str) -> None:
        """Count one delivery outcome (delivered, retried, dead)."""
        self.deliveries.labels(notifier, outcome).inc()
