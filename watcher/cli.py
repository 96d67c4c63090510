"""The `oxen-watcher` command line: run, once, check-config, status, events, redeliver, prune, demo."""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import click
import orjson

from . import __version__
from .config import Config, default_config_path, load_config, parse_config
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


_HUP_PENDING: list[bool] = []  # a SIGHUP that arrived before the daemon's event loop took the signals


def _remember_hup(signum: int, frame: Any) -> None:
    _HUP_PENDING.append(True)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"oxen-watcher: {message}", err=True)
    sys.exit(code)


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as err:
        _fail(str(err), EX_CONFIG)


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
    """Run the daemon until SIGTERM or SIGINT; SIGHUP reloads the configuration."""
    # Until the event loop takes over the signals, a stop request during start-up is a clean exit and a
    # reload request is remembered (SIGHUP's default action would kill the process), then applied once started.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    signal.signal(signal.SIGHUP, _remember_hup)
    config = _load(config_path)
    secrets = _secrets(config)
    _setup_logging(config)
    _serve(config, secrets, config_path=config_path)


def _serve(config: Config, secrets: Any, *, config_path: str | None = None, on_started: Any = None) -> None:
    from .app import App

    async def main() -> None:
        try:
            app = App(config, secrets, config_path=config_path, reload_requested=lambda: bool(_HUP_PENDING))
        except StoreError as err:
            _fail(str(err), 1)
        if on_started is not None:
            asyncio.get_running_loop().call_later(1.0, on_started, app)
        await app.run()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except OSError as err:  # e.g. the [http] listen address is taken
        _fail(f"cannot start: {err}", 1)


def _secrets(config: Config) -> Any:
    from .app import resolve_all

    try:
        secrets = resolve_all(config)
    except ConfigError as err:
        _fail(str(err), EX_CONFIG)
    REDACTOR.add(secrets.values())
    return secrets


def _make_runtime(config: Config, secrets: Any, *, readonly: bool = False, sinks: list[Any] | None = None) -> Any:
    from .app import build_runtime

    try:
        return build_runtime(
            config,
            token=secrets.hub_token,
            secrets=secrets.notifiers,
            readonly=readonly,
            sinks=sinks or [],
            state_url=secrets.state_url,
        )
    except StoreError as err:
        _fail(str(err), 1)


@cli.command()
@config_option
@click.option("--dry-run", is_flag=True, help="Print the events it would emit as JSON lines; change nothing.")
def once(config_path: str, dry_run: bool) -> None:
    """Poll every fine-tune once, commit, deliver, and exit 0 when every poll answered 200 (1 otherwise)."""
    config = _load(config_path)
    secrets = _secrets(config)
    _setup_logging(config)
    sinks = [lambda event: _json_line(event.envelope())] if dry_run else []
    watcher, dispatcher = _make_runtime(config, secrets, readonly=dry_run, sinks=sinks)
    from .lifecycle_poller import LifecycleJobs

    lifecycle = LifecycleJobs(watcher)
    leases = None
    if config.state.postgresql and not dry_run:  # replicas may be running: poll (and read) only free leases
        from .replica_setup import claim_for_once

        try:
            leases = claim_for_once(watcher, dispatcher, lifecycle)
        except StoreError as err:
            _fail(str(err), 1)

    async def main() -> list[Any]:
        try:
            await watcher.load()
            await lifecycle.once()  # sources and statuses first: what they find is polled too
            reports = await watcher.poll_all()
            if not dry_run and dispatcher.notifiers:
                await _deliver_once(config, dispatcher)
            return reports
        finally:
            await dispatcher.aclose()
            await watcher.aclose()
            if leases is not None:
                try:
                    leases.leave()  # release what it claimed: the replicas take them over at once
                except StoreError as err:
                    click.echo(f"oxen-watcher: {err} (the leases expire by themselves)", err=True)

    reports = asyncio.run(main())
    if not dry_run:
        for report in reports:
            detail = report.error or getattr(report.result, "error", None) or ""
            click.echo(f"{report.ref.key}\t{_outcome_word(report)}\t{len(report.events)} events\t{detail}".rstrip())
        polled = {report.ref.key for report in reports}
        for ft in config.fine_tunes:
            if ft.key not in polled:  # not counted as a failure: a running replica polls it
                click.echo(f"{ft.key}\tskipped\t0 events\towned by a running replica")
    sys.exit(0 if all(report.answered_200 for report in reports) else 1)


async def _deliver_once(config: Config, dispatcher: Any) -> None:
    from .store import DispatchLock

    if config.state.postgresql:  # the lanes of the fine-tunes it claimed, and only those
        longest = max((entry.timeout_s for entry in config.notifiers), default=15.0)
        await dispatcher.deliver_due(deadline_s=longest + 5)
        return
    lock = DispatchLock(config.state_path())
    if not lock.acquire():
        log_event = "delivery.left_to_daemon"
        import structlog

        structlog.get_logger("watcher").info(log_event, reason="a running daemon delivers the outbox")
        return
    try:
        longest = max((entry.timeout_s for entry in config.notifiers), default=15.0)
        await dispatcher.deliver_due(deadline_s=longest + 5)
    finally:
        lock.release()


def _outcome_word(report: Any) -> str:
    from .models import outcome_of

    if report.result is None:
        return "skipped"
    return outcome_of(report.result) if report.error is None else "not-committed"


@cli.command("test-notify")
@config_option
@click.option("--notifier", "only", metavar="NAME", help="Only this notifier.")
def test_notify(config_path: str, only: str | None) -> None:
    """Send a clearly marked test event (type watcher.test) to each notifier now; print OK or the error."""
    import time

    from .app import ref_of
    from .events import new_event_id
    from .models import WATCHER_TEST
    from .notifiers import build_notifiers

    config = _load(config_path)
    secrets = _secrets(config).notifiers
    _setup_logging(config)
    names = [entry.name for entry in config.notifiers]
    if only is not None and only not in names:
        _fail(f"no notifier named {only!r} (configured: {', '.join(names) or 'none'})", 2)
    if not names:
        _fail("no [[notifiers]] configured", 2)
    notifiers = build_notifiers(config, secrets)
    fine_tune = config.fine_tunes[0] if config.fine_tunes else None

    async def main() -> bool:
        ok = True
        try:
            for name, notifier in notifiers.items():
                if only is not None and name != only:
                    continue
                data: dict[str, Any] = {
                    "fine_tune": ref_of(fine_tune).as_data() if fine_tune else None,
                    "notifier": name,
                    "message": "This is a test event from oxen-watcher test-notify; no fine-tune changed.",
                }
                event = Event(
                    new_event_id(), WATCHER_TEST, rfc3339(time.time()), data, fine_tune.key if fine_tune else ""
                )
                result = await notifier.send([event])
                if result.outcome == "delivered":
                    click.echo(f"{name}: OK")
                else:
                    ok = False
                    error = REDACTOR.redact(result.error or result.outcome)
                    click.echo(f"{name}: FAILED: {error[:300]}")
        finally:
            for notifier in notifiers.values():
                await notifier.aclose()
        return ok

    sys.exit(0 if asyncio.run(main()) else 1)


@cli.command()
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

    from .dispatch import Dispatcher
    from .retention import parse_since, retain_s_of

    if bool(event_ids) == dead:
        _fail("give EVENT_ID... or --dead (not both)", 2)
    if since is not None and not dead:
        _fail("--since goes with --dead", 2)
    config = _load(config_path)
    now = time.time()
    since_at = now - retain_s_of(config.model.state.retain_days)
    try:
        since_at = parse_since(since, now=now) if since is not None else since_at
    except ValueError as err:
        _fail(f"--since: {err}", 2)
    names = {entry.name for entry in config.notifiers}
    if notifier is not None and notifier not in names:
        _fail(f"no notifier named {notifier!r}", 2)
    from .runtime import open_state

    state_url = _state_url(config)
    try:
        store = open_state(config, state_url)
    except StoreError as err:
        _fail(str(err), 1)
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
        _fail(str(err), 1)
    click.echo(f"queued {count} deliveries")


@cli.command()
@config_option
@click.option("--dry-run", is_flag=True, help="Print what it would remove; change nothing.")
def prune(config_path: str, dry_run: bool) -> None:
    """Apply retention now: delete events older than [state] retain_days (never one still pending delivery)."""
    import time

    from .retention import retain_s_of

    config = _load(config_path)
    days = config.model.state.retain_days
    state_url = _state_url(config)
    if state_url is None and not config.state_path().exists():
        click.echo(f"nothing to prune: no state database at {config.state_path()} yet")
        return
    from .runtime import open_state
    from .store import SqliteStore

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
        _fail(str(err), 1)
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


@cli.command("check-config")
@config_option
def check_config(config_path: str) -> None:
    """Validate the configuration (and resolve its secrets); exit 0, or 78 naming the bad key."""
    config = _load(config_path)
    _secrets(config)
    from .config import resolve_state_url
    from .logs import database_url_secrets

    try:
        url = resolve_state_url(config)
    except ConfigError as err:
        _fail(str(err), EX_CONFIG)
    REDACTOR.add(database_url_secrets(url) if url else ())
    click.echo(
        f"{config.source}: OK ({len(config.fine_tunes)} fine-tunes, {len(config.notifiers)} notifiers, "
        f"{config.state.kind} store)"
    )


def _state_url(config: Config) -> str | None:
    """The PostgreSQL URL of a config (None for SQLite), added to the redactor; a bad one exits 78."""
    from .config import resolve_state_url
    from .logs import database_url_secrets

    try:
        url = resolve_state_url(config)
    except ConfigError as err:
        _fail(str(err), EX_CONFIG)
    REDACTOR.add(database_url_secrets(url) if url else ())
    return url


def _open_readonly(config: Config) -> Any:
    """The state database read-only (SQLite: an empty state when it does not exist yet)."""
    from .runtime import open_state

    state_url = _state_url(config)
    try:
        return open_state(config, state_url, readonly=True)
    except StoreError as err:
        _fail(str(err), 1)


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


@cli.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per fine-tune, one per line.")
def status(config_path: str, as_json: bool) -> None:
    """Per fine-tune: last poll, outcome, failures, checkpoints, latest step and loss, deployments."""
    config = _load(config_path)
    store = _open_readonly(config)
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
        _fail(str(err), 1)
    if as_json:
        for row in rows:
            _json_line(row)
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
    try:
        deliveries = store.deliveries_of([event.id for event in found])
    except StoreError as err:
        _fail(str(err), 1)
    if as_json:
        for event in found:
            _json_line({**event.envelope(), "deliveries": [d.as_json() for d in deliveries.get(event.id, [])]})
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


@cli.command()
def demo() -> None:
    """Watch a simulated Hub whose fine-tunes keep training; prints each event until Ctrl-C."""
    from .demo import DEMO_TOKEN, DEMO_WEBHOOK_URL, DemoTrainer, demo_config
    from .simhub import SimHub

    with tempfile.TemporaryDirectory(prefix="oxen-watcher-demo-") as folder, SimHub(token=DEMO_TOKEN) as hub:
        trainer = DemoTrainer(hub)
        trainer.seed()
        config = parse_config(demo_config(hub, Path(folder)), source="<demo>", directory=Path(folder))
        secrets = _secrets(config)
        _setup_logging(config)
        click.echo(f"oxen-watcher demo: simulated Hub at {hub.url}, state in {folder}")
        click.echo("watching 3 fine-tunes every 2-3 s; the first poll records a silent baseline. Ctrl-C to stop.")
        click.echo(f"signed webhooks go to {DEMO_WEBHOOK_URL} (start the README's receiver to see them)")

        def started(app: Any) -> None:
            click.echo(f"metrics: http://127.0.0.1:{app.server.port}/metrics  health: /healthz /readyz")

        trainer.start()
        try:
            _serve(config, secrets, on_started=started)
        finally:
            trainer.stop()


def main() -> None:
    """Console-script entry point."""
    cli()
