"""What the command line's commands share: the --config option, loading, secrets, the store, exits."""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import click
import orjson

from watcher.config.load import Config, default_config_path, load_config
from watcher.errors import ConfigError, StoreError
from watcher.observe.logs import REDACTOR, configure_logging

EX_CONFIG = 78

config_option = click.option(
    "-c",
    "--config",
    "config_path",
    metavar="CONFIG",
    default=default_config_path,
    show_default="$OXEN_WATCHER_CONFIG, else /etc/oxen-watcher/config.toml",
    help="The TOML configuration file.",
)


def fail(message: str, code: int) -> NoReturn:
    """Print the message to stderr and exit with the code."""
    click.echo(f"oxen-watcher: {message}", err=True)
    sys.exit(code)


def load(path: str) -> Config:
    """The configuration, or exit 78 naming the bad key."""
    try:
        return load_config(path)
    except ConfigError as err:
        fail(str(err), EX_CONFIG)


def setup_logging(config: Config) -> None:
    """Logging as the configuration says."""
    configure_logging(level=config.log.level, fmt=config.log.format)


def json_line(value: Any) -> None:
    """One JSON document on its own line."""
    click.echo(orjson.dumps(value).decode())


def resolve_secrets(config: Config) -> Any:
    """The configuration's secrets, added to the log redactor; a missing one exits 78."""
    from watcher.daemon.app import resolve_all

    try:
        secrets = resolve_all(config)
    except ConfigError as err:
        fail(str(err), EX_CONFIG)
    REDACTOR.add(secrets.values())
    return secrets


def make_runtime(config: Config, secrets: Any, *, readonly: bool = False, sinks: list[Any] | None = None) -> Any:
    """`once`: the watcher and dispatcher of a configuration, and the leases it claimed on a shared store (None on
    SQLite, or for a dry run); a store that cannot open (or claim) exits 1."""
    from watcher.daemon.replicas.wiring import claim_for_once
    from watcher.daemon.runtime import build_runtime, open_state

    try:
        store = open_state(config, secrets.state_url, readonly=readonly)
        # replicas may be running: poll (and read) only free leases
        claim = None if readonly else claim_for_once(store, config)
        watcher, dispatcher = build_runtime(
            config,
            store=store,
            token=secrets.hub_token,
            secrets=secrets.notifiers,
            readonly=readonly,
            ownership=claim,
            sinks=sinks or [],
        )
    except StoreError as err:
        fail(str(err), 1)
    return watcher, dispatcher, claim


def state_url_of(config: Config) -> str | None:
    """The PostgreSQL URL of a config (None for SQLite), added to the redactor; a bad one exits 78."""
    from watcher.config.load import resolve_state_url
    from watcher.observe.logs import database_url_secrets

    try:
        url = resolve_state_url(config)
    except ConfigError as err:
        fail(str(err), EX_CONFIG)
    REDACTOR.add(database_url_secrets(url) if url else ())
    return url


def open_readonly(config: Config) -> Any:
    """The state database read-only (SQLite: an empty state when it does not exist yet)."""
    from watcher.daemon.runtime import open_state

    state_url = state_url_of(config)
    try:
        return open_state(config, state_url, readonly=True)
    except StoreError as err:
        fail(str(err), 1)
