"""Building the runtime: the Hub client, the watcher and dispatcher over one store, and the resolved secrets."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import structlog

from watcher.config.load import (
    Config,
    NotifierSecrets,
    resolve_hub_token,
    resolve_notifier_secrets,
    resolve_secret,
    resolve_state_url,
)
from watcher.core.models import FineTuneRef
from watcher.daemon.ownership import Ownership
from watcher.daemon.poller import EventSink, Watcher
from watcher.delivery.dispatch import Dispatcher
from watcher.errors import PollError
from watcher.hub.client import HubClient
from watcher.observe.logs import REDACTOR, database_url_secrets
from watcher.observe.metrics import Metrics
from watcher.store import SqliteReports, SqliteStore, Store, open_store
from watcher.store.pages import Reports
from watcher.store.thread import StoreThread

log = structlog.get_logger("watcher")


def public_url(url: str) -> str:
    """A URL without its user:password@ part, for log lines."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc).geturl()


def on_poll_retry(ref: FineTuneRef, err: PollError, wait_s: float) -> None:
    """Log a quick retry inside a poll."""
    log.debug(
        "poll.retry_scheduled", fine_tune=ref.key, error=err.message, http_status=err.http_status, wait_s=wait_s or None
    )


def make_client(
    config: Config,
    token: str,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    on_request: Callable[[str, str], None] | None = None,
) -> HubClient:
    """The Hub client of a config (with its own Hub-wide back-off gate); on_request counts its requests."""
    return HubClient(
        base_url=config.hub.url,
        token=token,
        timeout_s=config.hub.timeout_s,
        max_concurrency=config.hub.max_concurrency,
        on_retry=on_poll_retry,
        on_request=on_request,
        transport=transport,
    )


def open_state(config: Config, state_url: str | None, *, readonly: bool = False) -> Store:
    """The store a config selects: PostgreSQL when [state] url is set, else the SQLite file at [state] path."""
    if config.state.postgresql:
        from watcher.store.postgres.store import PostgresStore

        assert state_url is not None, "resolve_all resolves the URL of a PostgreSQL config"
        # a transaction idle past the lease (its process stalled) is ended by the server, so its locks cannot hold
        # off the takeover of its fine-tunes
        return PostgresStore(state_url, readonly=readonly, pool_max=6, idle_limit_s=config.state.lease_s)
    return open_store(config.state_path(), readonly=True) if readonly else SqliteStore(config.state_path())


def open_reports(config: Config, store: Store) -> Reports:
    """The status page's reads of a config's state: SQLite: a read-only connection of its own; PostgreSQL: the
    store's pool, shared by every replica (each page shows every fine-tune, owned or not)."""
    if config.state.postgresql:
        from watcher.store.postgres.pages import PostgresReports
        from watcher.store.postgres.store import PostgresStore

        assert isinstance(store, PostgresStore), "open_state opens a PostgresStore for a PostgreSQL config"
        return PostgresReports(store.pool)
    return SqliteReports(config.state_path())


def build_runtime(
    config: Config,
    *,
    store: Store,
    token: str,
    secrets: Mapping[str, NotifierSecrets],
    readonly: bool = False,
    ownership: Ownership | None = None,
    metrics: Metrics | None = None,
    sinks: Sequence[EventSink] = (),
    hub_transport: httpx.AsyncBaseTransport | None = None,
    notifier_transport: httpx.AsyncBaseTransport | None = None,
) -> tuple[Watcher, Dispatcher]:
    """The watcher and the dispatcher over one store and its thread (read-only and silent for a dry run);
    `ownership`: replicas, what this process owns (None: everything)."""
    thread = StoreThread()
    dispatcher = Dispatcher(
        store=store,
        notifiers={},
        configs=config.notifiers,
        in_store=thread,
        on_outcome=metrics.observe_delivery if metrics is not None else None,
        redact=REDACTOR.redact,
        on_outbox=metrics.state.set_outbox if metrics is not None else None,
        lanes=ownership,
    )
    if not readonly:
        dispatcher.reconfigure(config, secrets, transport=notifier_transport)
    if metrics is not None:
        metrics.set_notifiers(entry.name for entry in config.notifiers)
    watcher = Watcher(
        config=config,
        store=store,
        client=make_client(
            config,
            token,
            transport=hub_transport,
            on_request=metrics.observe_hub_request if metrics is not None else None,
        ),
        sinks=[*sinks, lambda _event: dispatcher.wake()],
        route=dispatcher.route,
        commit=not readonly,
        metrics=metrics,
        ownership=ownership,
        thread=thread,
    )
    return watcher, dispatcher


@dataclass(frozen=True, slots=True)
class Secrets:
    """Everything secret a config resolves to (never logged)."""

    hub_token: str
    notifiers: Mapping[str, NotifierSecrets]
    metrics_token: str | None
    hub_url: str = ""
    state_url: str | None = None  # the PostgreSQL URL ([state] url/url_env/url_file), None for SQLite

    def values(self) -> list[str]:
        """Every secret string, for the log redactor."""
        found = [self.hub_token, self.metrics_token or ""]
        if self.state_url:
            found += database_url_secrets(self.state_url)
        hub = urlsplit(self.hub_url)
        if hub.password:  # refused by check-config; redacted wherever it could still show up
            found += [hub.password, hub.netloc]
        for resolved in self.notifiers.values():
            found += [resolved.url or "", *resolved.secrets]
            if resolved.url:
                # the secret part of a webhook URL is its path (Slack: /services/T…/B…/…); receivers echo it
                parts = urlsplit(resolved.url)
                found += [part for part in (parts.path, parts.query) if len(part) >= 8]
        return [value for value in found if value]


def resolve_all(config: Config) -> Secrets:
    """Resolve every secret of a config; ConfigError names the first bad key."""
    return Secrets(
        hub_token=resolve_hub_token(config),
        notifiers=resolve_notifier_secrets(config),
        metrics_token=resolve_secret(config.http, "token", key="http", config=config),
        hub_url=config.hub.url,
        state_url=resolve_state_url(config),
    )
