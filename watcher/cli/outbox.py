"""Commands on the outbox and the database: redeliver, prune."""

from __future__ import annotations

import click

from watcher.cli.common import config_option, fail, load, state_url_of
from watcher.errors import StoreError


@click.command()
@config_option
@click.argument("event_ids", nargs=-1, metavar="[EVENT_ID]...")
@click.option("--dead", is_flag=True, help="Queue the dead deliveries again (those queued within --since).")
@click.option("--notifier", metavar="NAME", help="Only deliveries to this notifier.")
@click.option(
    "--since",
    metavar="WHEN",
    help="With --dead: only rows queued since WHEN, a duration back from now (7d, 12h, 30m) or an RFC 3339 time."
    "  [default: the retention window, [state] retain_days]",
)
def redeliver(
    config_path: str, event_ids: tuple[str, ...], dead: bool, notifier: str | None, since: str | None
) -> None:
    """Queue events for delivery again: the named events, or the dead deliveries (--dead, bounded by --since)."""
    import time

    from watcher.daemon.retention import parse_since, retain_s_of
    from watcher.delivery.dispatch import Dispatcher

    if bool(event_ids) == dead:
        fail("give EVENT_ID... or --dead (not both)", 2)
    if since is not None and not dead:
        fail("--since goes with --dead", 2)
    config = load(config_path)
    now = time.time()
    since_at = now - retain_s_of(config.model.state.retain_days)
    try:
        since_at = parse_since(since, now=now) if since is not None else since_at
    except ValueError as err:
        fail(f"--since: {err}", 2)
    names = {entry.name for entry in config.notifiers}
    if notifier is not None and notifier not in names:
        fail(f"no notifier named {notifier!r}", 2)
    from watcher.daemon.runtime import open_state

    state_url = state_url_of(config)
    try:
        store = open_state(config, state_url)
    except StoreError as err:
        fail(str(err), 1)
    router = Dispatcher(store=store, notifiers={}, configs=config.notifiers).route
    try:
        count = store.redeliver(
            now=now,
            event_ids=list(event_ids),
            dead=dead,
            notifier=notifier,
            route=router,
            since=since_at if dead else None,
        )
    except StoreError as err:
        fail(str(err), 1)
    click.echo(f"queued {count} deliveries")


@click.command()
@config_option
@click.option("--dry-run", is_flag=True, help="Print what it would remove; change nothing.")
def prune(config_path: str, dry_run: bool) -> None:
    """Apply retention now: delete events older than [state] retain_days (never one still pending delivery)."""
    import time

    from watcher.daemon.retention import retain_s_of

    config = load(config_path)
    days = config.model.state.retain_days
    state_url = state_url_of(config)
    if state_url is None and not config.state_path().exists():
        click.echo(f"nothing to prune: no state database at {config.state_path()} yet")
        return
    from watcher.daemon.runtime import open_state
    from watcher.store import SqliteStore

    try:
        if dry_run or state_url is not None:
            store = open_state(config, state_url, readonly=dry_run)
        else:  # converts a database of an earlier release whatever its size (the daemon only converts small ones)
            store = SqliteStore(config.state_path(), convert_max_bytes=None)
        try:
            report = store.prune(now=time.time(), retain_s=retain_s_of(days), dry_run=dry_run)
        finally:
            store.close()
    except StoreError as err:
        fail(str(err), 1)
    if dry_run:
        click.echo(
            f"would remove {report.events} events and {report.deliveries} deliveries older than {days} days, "
            f"freeing about {_size(report.bytes_freed)}"
        )
    else:
        click.echo(
            f"removed {report.events} events and {report.deliveries} deliveries older than {days} days, "
            f"freed {_size(report.bytes_freed)}"
        )


def _size(n: int) -> str:
    return f"{n} bytes" if n < 1024 * 1024 else f"{n} bytes ({n / 1024 / 1024:.1f} MiB)"
