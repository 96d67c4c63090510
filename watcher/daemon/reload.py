"""SIGHUP: plan a reload (build everything new, touch nothing), then apply it all or nothing.

Planning may fail (it closes what it built); applying runs small steps, each with its undo: an exception
half-way undoes the steps already taken, so the old configuration stays fully in force (and it is logged).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import structlog

from watcher.config.load import Config
from watcher.daemon.poller import Watcher
from watcher.daemon.retention import RetentionJob
from watcher.daemon.runtime import Secrets
from watcher.delivery.dispatch import Dispatcher
from watcher.delivery.notifiers import PreparedNotifiers
from watcher.hub.client import HubClient
from watcher.observe.logs import REDACTOR, configure_logging
from watcher.observe.metrics import Metrics
from watcher.observe.server import HttpServer

log = structlog.get_logger("watcher")
Undo = Callable[[], None]


@dataclass(frozen=True, slots=True)
class Reloadable:
    """The parts of a running daemon that a reload changes, and how to build and retire Hub clients."""

    watcher: Watcher
    dispatcher: Dispatcher
    server: HttpServer
    retention: RetentionJob
    metrics: Metrics
    make_client: Callable[[Config, str], HubClient]
    retire: Callable[[HubClient], None]  # close a replaced client once the polls using it have ended
    reschedule: Callable[[Config], None]
    notifier_transport: httpx.AsyncBaseTransport | None = None


@dataclass(slots=True)
class ReloadPlan:
    """What a reload changes, with its new objects already built (nothing applied yet)."""

    old_config: Config
    old_secrets: Secrets
    config: Config
    secrets: Secrets
    client: HubClient | None  # a new Hub client, or None when the Hub settings did not change
    notifiers: PreparedNotifiers
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    async def discard(self, parts: Reloadable) -> None:
        """Close what the plan built (it was not applied)."""
        parts.dispatcher.discard_notifiers(self.notifiers)
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()


def plan_reload(parts: Reloadable, *, running: tuple[Config, Secrets], config: Config, secrets: Secrets) -> ReloadPlan:
    """Build the new Hub client and notifiers a config needs; the running daemon is not touched."""
    old, old_secrets = running
    hub_changed = (config.hub.url, config.hub.timeout_s, config.hub.max_concurrency, secrets.hub_token) != (
        old.hub.url,
        old.hub.timeout_s,
        old.hub.max_concurrency,
        old_secrets.hub_token,
    )
    client = parts.make_client(config, secrets.hub_token) if hub_changed else None
    try:
        notifiers = parts.dispatcher.prepare_notifiers(config, secrets.notifiers, transport=parts.notifier_transport)
    except BaseException:
        if client is not None:
            parts.retire(client)
        raise
    before, after = set(parts.watcher.fine_tunes), {ft.key for ft in config.fine_tunes}
    sources = {source.name for source in config.discover}
    after |= {key for key, (_, source) in parts.watcher.discovered.items() if source in sources}
    added, removed = sorted(after - before), sorted(before - after)
    return ReloadPlan(old, old_secrets, config, secrets, client, notifiers, added, removed)


def _swap_notifiers(parts: Reloadable, plan: ReloadPlan) -> Undo:
    """The notifier step: unchanged notifiers are kept (client, Slack limiter); replaced ones close at commit."""
    dispatcher = parts.dispatcher
    undo_configure = dispatcher.configure_undoable(plan.notifiers.notifiers, plan.config.notifiers)
    parts.metrics.set_notifiers(entry.name for entry in plan.config.notifiers)

    def undo() -> None:
        undo_configure()
        parts.metrics.set_notifiers(entry.name for entry in plan.old_config.notifiers)

    return undo


def _swap_client(parts: Reloadable, plan: ReloadPlan) -> Undo:
    if plan.client is None:
        return lambda: None
    old = parts.watcher.swap_client(plan.client)

    def undo() -> None:
        parts.watcher.swap_client(old)

    return undo


def _swap_token(parts: Reloadable, plan: ReloadPlan) -> Undo:
    parts.server.set_token(plan.secrets.metrics_token)
    return lambda: parts.server.set_token(plan.old_secrets.metrics_token)


def _swap_logging(parts: Reloadable, plan: ReloadPlan) -> Undo:
    old, new = plan.old_config.log, plan.config.log
    if (new.level, new.format) == (old.level, old.format):
        return lambda: None
    configure_logging(level=new.level, fmt=new.format)
    return lambda: configure_logging(level=old.level, fmt=old.format)


def _swap_fine_tunes(parts: Reloadable, plan: ReloadPlan) -> Undo:
    snapshot = parts.watcher.snapshot()
    parts.watcher.set_fine_tunes(plan.config)
    return lambda: parts.watcher.restore(snapshot)


def _swap_retention(parts: Reloadable, plan: ReloadPlan) -> Undo:
    old = parts.retention.retain_days
    parts.retention.set_retain_days(plan.config.model.state.retain_days)
    return lambda: parts.retention.set_retain_days(old)


def _swap_schedule(parts: Reloadable, plan: ReloadPlan) -> Undo:
    parts.reschedule(plan.config)
    return lambda: parts.reschedule(plan.old_config)


Step = Callable[[Reloadable, ReloadPlan], Undo]
STEPS: tuple[Step, ...] = (
    _swap_notifiers,
    _swap_client,
    _swap_token,
    _swap_logging,
    _swap_fine_tunes,
    _swap_retention,
    _swap_schedule,
)


def apply_reload(parts: Reloadable, plan: ReloadPlan, *, steps: tuple[Step, ...] = STEPS) -> None:
    """Apply a plan; on an exception, undo the steps taken (in reverse) and re-raise: the old config stays."""
    REDACTOR.add(plan.secrets.values())
    old = plan.old_config
    for key, changed in (
        ("state.path", plan.config.state_path() != old.state_path()),
        ("state.url", plan.secrets.state_url != plan.old_secrets.state_url),
        ("http.listen", plan.config.http.listen != old.http.listen),
    ):
        if changed:
            log.warning("reload.restart_required", key=key, hint="this setting applies at the next start")
    old_client = parts.watcher.client
    undos: list[Undo] = []
    try:
        for step in steps:
            undos.append(step(parts, plan))
    except BaseException:
        for undo in reversed(undos):
            try:
                undo()
            except Exception:
                log.exception("reload.undo_failed")
        raise
    parts.dispatcher.commit_notifiers(plan.notifiers)  # replaced notifiers close once their deliveries end
    if plan.client is not None:
        parts.retire(old_client)
    log.info(
        "reload.applied",
        fine_tunes=len(parts.watcher.fine_tunes),
        added=plan.added,
        removed=plan.removed,
        notifiers=len(plan.config.notifiers),
    )
