"""Read-only commands on the shared state: status, events."""

from __future__ import annotations

from typing import Any

import click

from watcher.cli.common import config_option, fail, json_line, load, open_readonly
from watcher.config.load import Config
from watcher.core.events import rfc3339
from watcher.core.headline import describe
from watcher.core.models import FineTuneStatus
from watcher.errors import StoreError


def _time(epoch: float | None) -> str | None:
    return rfc3339(epoch) if epoch is not None else None


def _status_json(
    config: Config, status: FineTuneStatus, lifecycle: Any, discovered: dict[str, tuple[str, str]]
) -> dict[str, Any]:
    fine_tune = next((ft for ft in config.fine_tunes if ft.key == status.key), None)
    namespace, repo, fine_tune_id = status.key.split("/", 2)
    record = lifecycle.get(status.key)
    return {
        "namespace": namespace,
        "repo": repo,
        "id": fine_tune_id,
        "name": fine_tune.display_name if fine_tune is not None else discovered[status.key][1],
        "source": "config" if fine_tune is not None else discovered[status.key][0],
        "hub_status": record.state.status if record is not None else None,
        "hub_error": record.state.error if record is not None else None,
        "stalled": record.state.stalled if record is not None else False,
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


@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per fine-tune, one per line.")
def status(config_path: str, as_json: bool) -> None:
    """Per fine-tune: last poll, outcome, failures, checkpoints, latest step and loss, deployments."""
    config = load(config_path)
    store = open_readonly(config)
    try:
        keys = [ft.key for ft in config.fine_tunes]
        try:
            sources = {source.name for source in config.discover}
            discovered = {k: v for k, v in store.discovered_names().items() if v[0] in sources and k not in keys}
            lifecycle = store.load_lifecycle([*keys, *discovered])
        except StoreError:  # a database from before lifecycle (read-only: not migrated yet)
            discovered, lifecycle = {}, {}
        rows = [_status_json(config, s, lifecycle, discovered) for s in store.statuses([*keys, *sorted(discovered)])]
    except StoreError as err:
        fail(str(err), 1)
    if as_json:
        for row in rows:
            json_line(row)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(box=None, pad_edge=False)
    columns = ("name", "fine-tune", "source", "hub status", "last poll", "outcome", "fails", "ckpts", "latest step")
    for column in (*columns, "loss", "deployments"):
        table.add_column(column)
    for row in rows:
        loss = row["latest_loss"]
        table.add_row(
            row["name"],
            f"{row['namespace']}/{row['repo']}/{row['id']}",
            row["source"],
            (row["hub_status"] or "-") + (" (stalled)" if row["stalled"] else ""),
            row["last_poll_at"] or "never",
            (row["last_outcome"] or "-") + (f" ({row['last_error']})" if row["last_error"] else ""),
            str(row["consecutive_failures"]),
            str(row["checkpoints"]),
            "-" if row["latest_step"] is None else str(row["latest_step"]),
            "-" if loss is None else f"{loss:.4g}",
            ", ".join(f"{step}: {value}" for step, value in row["deployments"].items()) or "-",
        )
    Console(soft_wrap=True).print(table)


@click.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One event envelope per line.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="How many events.")
@click.option("--type", "type_glob", metavar="GLOB", help="Only event types matching this glob, e.g. 'checkpoint.*'.")
def events(config_path: str, as_json: bool, limit: int, type_glob: str | None) -> None:
    """Recent events, newest first."""
    config = load(config_path)
    store = open_readonly(config)
    try:
        found = store.recent_events(limit=limit, type_glob=type_glob)
    except StoreError as err:
        fail(str(err), 1)
    try:
        deliveries = store.deliveries_of([event.id for event in found])
    except StoreError as err:
        fail(str(err), 1)
    if as_json:
        for event in found:
            json_line({**event.envelope(), "deliveries": [d.as_json() for d in deliveries.get(event.id, [])]})
        return
    for event in found:
        click.echo(f"{event.timestamp}  {event.type:<30}  {event.id}  {describe(event)}")
        for d in deliveries.get(event.id, []):
            line = f"    -> {d.notifier}: {d.state}, {d.attempts} attempts"
            if d.state == "pending" and d.next_attempt_at is not None:
                line += f", next at {rfc3339(d.next_attempt_at)}"
            if d.last_error:
                line += f", last error: {d.last_error}"
            click.echo(line)
