"""SIGHUP: plan a reload (build everything new, touch nothing), then apply it all or nothing.

Planning may fail (it closes what it built); applying runs small steps, each with its undo: an exception
half-way undoes the steps already taken, so the old configuration stays fully in force (and it is logged).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from watcher.config.load import Config
from watcher.delivery.notifiers import PreparedNotifiers
from watcher.hub.client import HubClient
from watcher.observe.logs import REDACTOR, configure_logging

if TYPE_CHECKING:
    from watcher.daemon.app import App, Secrets

log = structlog.get_logger("watcher")
Undo = Callable[[], None]


@dataclass(slots=True)
class ReloadPlan:
    """What a reload changes, with its new objects already built (nothing applied yet)."""

    config: Config
    secrets: Secrets
    client: HubClient | None  # a new Hub client, or None when the Hub settings did not change
    notifiers: PreparedNotifiers
    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    async def discard(self, app: App) -> None:
        """Close what the plan built (it was not applied)."""
        app.dispatcher.discard_notifiers(self.notifiers)
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()


def plan_reload(app: App, config: Config, secrets: Secrets) -> ReloadPlan:
    """Build the new Hub client and notifiers a config needs; the running daemon is not touched."""
    old = app.config
    hub_changed = (config.hub.url, config.hub.timeout_s, config.hub.max_concurrency, secrets.hub_token) != (
        old.hub.url,
        old.hub.timeout_s,
        old.hub.max_concurrency,
        app.secrets.hub_token,
    )
    client = app.make_client(config, secrets.hub_token) if hub_changed else None
    try:
        notifiers = app.dispatcher.prepare_notifiers(config, secrets.notifiers, transport=app.notifier_transport)
    except BaseException:
        if client is not None:
            app.retire(client)
        raise
    before, after = set(app.watcher.fine_tunes), {ft.key for ft in config.fine_tunes}
    sources = {source.name for source in config.discover}
    after |= {key for key, (_, source) in app.watcher.discovered.items() if source in sources}
    return ReloadPlan(config, secrets, client, notifiers, sorted(after - before), sorted(before - after))


def _swap_notifiers(app: App, plan: ReloadPlan) -> Undo:
    """The notifier step: unchanged notifiers are kept (client, Slack limiter); replaced ones close at commit."""
    dispatcher = app.dispatcher
    old_notifiers, old_configs = dict(dispatcher.notifiers), list(dispatcher.configs.values())
    old_disabled = set(dispatcher.disabled)
    dispatcher.configure(plan.notifiers.notifiers, plan.config.notifiers)
    app.metrics.set_notifiers(entry.name for entry in plan.config.notifiers)

    def undo() -> None:
        dispatcher.configure(old_notifiers, old_configs)
        dispatcher.disabled |= old_disabled
        app.metrics.set_notifiers(entry.name for entry in old_configs)

    return undo


def _swap_client(app: App, plan: ReloadPlan) -> Undo:
    old = app.watcher.client
    if plan.client is not None:
        app.watcher.client = plan.client

    def undo() -> None:
        app.watcher.client = old

    return undo


def _swap_token(app: App, plan: ReloadPlan) -> Undo:
    old = app.secrets.metrics_token
    app.server.set_token(plan.secrets.metrics_token)
    return lambda: app.server.set_token(old)


def _swap_logging(app: App, plan: ReloadPlan) -> Undo:
    old, new = app.config.log, plan.config.log
    if (new.level, new.format) == (old.level, old.format):
        return lambda: None
    configure_logging(level=new.level, fmt=new.format)
    return lambda: configure_logging(level=old.level, fmt=old.format)


def _swap_fine_tunes(app: App, plan: ReloadPlan) -> Undo:
    snapshot = app.watcher.snapshot()
    app.watcher.set_fine_tunes(plan.config)
    return lambda: app.watcher.restore(snapshot)


def _swap_retention(app: App, plan: ReloadPlan) -> Undo:
    old = app.retention.retain_days
    app.retention.retain_days = plan.config.model.state.retain_days

    def undo() -> None:
        app.retention.retain_days = old

    return undo


def _swap_schedule(app: App, plan: ReloadPlan) -> Undo:
    old = app.config
    app.reschedule(plan.config)
    return lambda: app.reschedule(old)


STEPS: tuple[Callable[[App, ReloadPlan], Undo], ...] = (
    _swap_notifiers,
    _swap_client,
    _swap_token,
    _swap_logging,
    _swap_fine_tunes,
    _swap_retention,
    _swap_schedule,
)


def apply_reload(app: App, plan: ReloadPlan, *, steps: tuple[Callable[[App, ReloadPlan], Undo], ...] = STEPS) -> None:
    """Apply a plan; on an exception, undo the steps taken (in reverse) and re-raise: the old config stays."""
    REDACTOR.add(plan.secrets.values())
    old = app.config
    for key, changed in (
        ("state.path", plan.config.state_path() != old.state_path()),
        ("state.url", plan.secrets.state_url != app.secrets.state_url),
        ("http.listen", plan.config.http.listen != old.http.listen),
    ):
        if changed:
            log.warning("reload.restart_required", key=key, hint="this setting applies at the next start")
    old_client = app.watcher.client
    undos: list[Undo] = []
    try:
        for step in steps:
            undos.append(step(app, plan))
    except BaseException:
        for undo in reversed(undos):
            try:
                undo()
            except Exception:
                log.exception("reload.undo_failed")
        raise
    app.dispatcher.commit_notifiers(plan.notifiers)  # replaced notifiers close once their deliveries end
    if plan.client is not None:
        app.retire(old_client)
    app.config = plan.config
    app.secrets = plan.secrets
    log.info(
        "reload.applied",
        fine_tunes=len(app.watcher.fine_tunes),
        added=plan.added,
        removed=plan.removed,
        notifiers=len(plan.config.notifiers),
    )
