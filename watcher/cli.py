"""The `oxen-watcher` command line: run, once, check-config, status, events, demo."""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click
import orjson

from . import __version__
from .config import Config, default_config_path, load_config, parse_config, resolve_hub_token
from .errors import ConfigError, StoreError
from .events import describe, rfc3339
from .logs import REDACTOR, configure_logging
from .models import Event, FineTuneStatus

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


def _exit_cleanly(signum: int, frame: Any) -> NoReturn:
    sys.exit(0)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"oxen-watcher: {message}", err=True)
    sys.exit(code)


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as err:
        _fail(str(err), EX_CONFIG)


def _hub_token(config: Config) -> str:
    try:
        token = resolve_hub_token(config)
    except ConfigError as err:
        _fail(str(err), EX_CONFIG)
    REDACTOR.add([token])
    return token


def _setup_logging(config: Config) -> None:
    configure_logging(level=config.log.level, fmt=config.log.format)


def _json_line(value: Any) -> None:
    click.echo(orjson.dumps(value).decode())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="oxen-watcher")
def cli() -> None:
    """Watch Oxen Hub fine-tunes for new checkpoints and deployment changes."""


@cli.command()
@config_option
def run(config_path: str) -> None:
    """Run the daemon until SIGTERM or SIGINT."""
    # Until the event loop takes over the signals, a stop request during start-up is a clean exit.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    config = _load(config_path)
    token = _hub_token(config)
    _setup_logging(config)
    from .app import run_daemon

    watcher = _make_watcher(config, token)
    try:
        asyncio.run(_run_until_stopped(watcher, run_daemon))
    except KeyboardInterrupt:
        pass


async def _run_until_stopped(watcher: Any, run_daemon: Callable[..., Any]) -> None:
    try:
        await run_daemon(watcher)
    finally:
        await watcher.aclose()


def _make_watcher(config: Config, token: str, *, readonly: bool = False, sinks: list[Any] | None = None) -> Any:
    from .app import Watcher, on_poll_retry
    from .client import HubClient
    from .store import SqliteStore, open_store

    try:
        store = open_store(config.state_path(), readonly=True) if readonly else SqliteStore(config.state_path())
    except StoreError as err:
        _fail(str(err), 1)
    client = HubClient(
        base_url=config.hub.url, token=token, timeout_s=config.hub.timeout_s, on_retry=on_poll_retry
    )
    return Watcher(config=config, store=store, client=client, sinks=sinks or [], commit=not readonly)


@cli.command()
@config_option
@click.option("--dry-run", is_flag=True, help="Print the events it would emit as JSON lines; change nothing.")
def once(config_path: str, dry_run: bool) -> None:
    """Poll every fine-tune once, commit, and exit 0 when every poll answered 200 (1 otherwise)."""
    config = _load(config_path)
    token = _hub_token(config)
    _setup_logging(config)
    sinks = [lambda event: _json_line(event.envelope())] if dry_run else []
    watcher = _make_watcher(config, token, readonly=dry_run, sinks=sinks)

    async def main() -> list[Any]:
        try:
            await watcher.load()
            return await watcher.poll_all()
        finally:
            await watcher.aclose()

    reports = asyncio.run(main())
    if not dry_run:
        for report in reports:
            outcome = "held back" if report.result is None else type(report.result).__name__
            detail = report.error or getattr(report.result, "error", None) or ""
            click.echo(f"{report.ref.key}\t{_outcome_word(report)}\t{len(report.events)} events\t{detail}".rstrip())
            del outcome
    sys.exit(0 if all(report.answered_200 for report in reports) else 1)


def _outcome_word(report: Any) -> str:
    from .models import outcome_of

    if report.result is None:
        return "skipped"
    return outcome_of(report.result) if report.error is None else "not-committed"


@cli.command("check-config")
@config_option
def check_config(config_path: str) -> None:
    """Validate the configuration (and resolve its secrets); exit 0, or 78 naming the bad key."""
    config = _load(config_path)
    _hub_token(config)
    click.echo(f"{config.source}: OK ({len(config.fine_tunes)} fine-tunes)")


def _open_readonly(config: Config) -> Any:
    from .store import open_store

    try:
        return open_store(config.state_path(), readonly=True)
    except StoreError as err:
        _fail(str(err), 1)


def _time(epoch: float | None) -> str | None:
    return rfc3339(epoch) if epoch is not None else None


def _status_json(config: Config, status: FineTuneStatus) -> dict[str, Any]:
    fine_tune = next(ft for ft in config.fine_tunes if ft.key == status.key)
    return {
        "namespace": fine_tune.namespace,
        "repo": fine_tune.repo,
        "id": fine_tune.id,
        "name": fine_tune.display_name,
        "last_poll_at": _time(status.last_poll_at),
        "last_outcome": status.last_outcome,
        "last_error": status.last_error,
        "last_http_status": status.last_http_status,
        "last_success_at": _time(status.last_success_at),
        "consecutive_failures": status.consecutive_failures,
        "failing": status.failing,
        "not_found": status.not_found,
        "not_before": _time(status.not_before),
        "checkpoints": status.checkpoints,
        "latest_step": status.latest_step,
        "latest_loss": status.latest_loss,
        "deployments": {str(step): value for step, value in status.deployments.items()},
    }


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per fine-tune, one per line.")
def status(config_path: str, as_json: bool) -> None:
    """Per fine-tune: last poll, outcome, failures, checkpoints, latest step and loss, deployments."""
    config = _load(config_path)
    store = _open_readonly(config)
    try:
        rows = [_status_json(config, s) for s in store.statuses([ft.key for ft in config.fine_tunes])]
    except StoreError as err:
        _fail(str(err), 1)
    if as_json:
        for row in rows:
            _json_line(row)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    for column in ("name", "fine-tune", "last poll", "outcome", "fails", "ckpts", "latest step", "loss",
                   "deployments"):
        table.add_column(column)
    for row in rows:
        loss = row["latest_loss"]
        table.add_row(
            row["name"],
            f"{row['namespace']}/{row['repo']}/{row['id']}",
            row["last_poll_at"] or "never",
            (row["last_outcome"] or "-") + (f" ({row['last_error']})" if row["last_error"] else ""),
            str(row["consecutive_failures"]),
            str(row["checkpoints"]),
            "-" if row["latest_step"] is None else str(row["latest_step"]),
            "-" if loss is None else f"{loss:.4g}",
            ", ".join(f"{step}: {value}" for step, value in row["deployments"].items()) or "-",
        )
    Console(soft_wrap=True).print(table)


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One event envelope per line.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="How many events.")
@click.option("--type", "type_glob", metavar="GLOB", help="Only event types matching this glob, e.g. 'checkpoint.*'.")
def events(config_path: str, as_json: bool, limit: int, type_glob: str | None) -> None:
    """Recent events, newest first."""
    config = _load(config_path)
    store = _open_readonly(config)
    try:
        found = store.recent_events(limit=limit, type_glob=type_glob)
    except StoreError as err:
        _fail(str(err), 1)
    if as_json:
        for event in found:
            _json_line(event.envelope())
        return
    for event in found:
        click.echo(f"{event.timestamp}  {event.type:<30}  {event.id}  {describe(event)}")


def _print_event(event: Event) -> None:
    stamp = datetime.now(UTC).astimezone().strftime("%H:%M:%S")
    click.echo(f"{stamp}  {event.type:<30} {describe(event)}")


@cli.command()
def demo() -> None:
    """Watch a simulated Hub whose fine-tunes keep training; prints each event until Ctrl-C."""
    from .app import run_daemon
    from .demo import DEMO_TOKEN, DemoTrainer, demo_config
    from .simhub import SimHub

    with tempfile.TemporaryDirectory(prefix="oxen-watcher-demo-") as folder, SimHub(token=DEMO_TOKEN) as hub:
        trainer = DemoTrainer(hub)
        trainer.seed()
        config = parse_config(demo_config(hub, Path(folder)), source="<demo>", directory=Path(folder))
        _setup_logging(config)
        click.echo(f"oxen-watcher demo: simulated Hub at {hub.url}, state in {folder}")
        click.echo("watching 3 fine-tunes every 2-3 s; the first poll records a silent baseline. Ctrl-C to stop.")
        trainer.start()
        watcher = _make_watcher(config, DEMO_TOKEN, sinks=[_print_event])
        try:
            asyncio.run(_run_until_stopped(watcher, run_daemon))
        except KeyboardInterrupt:
            pass
        finally:
            trainer.stop()


def main() -> None:
    """Console-script entry point."""
    cli()
