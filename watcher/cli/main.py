"""The `oxen-watcher` command line: run, once, test-notify, check-config, demo; the others in cli_reads, cli_outbox."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from watcher import __version__
from watcher.cli import HUP_PENDING, STOP_PENDING, take_early_signals
from watcher.cli.common import (
    EX_CONFIG,
    config_option,
    fail,
    json_line,
    load,
    make_runtime,
    resolve_secrets,
    setup_logging,
    state_url_of,
)
from watcher.cli.outbox import prune, redeliver
from watcher.cli.reads import events, status
from watcher.config.load import Config, parse_config
from watcher.core.events import rfc3339
from watcher.core.models import Event
from watcher.errors import StoreError
from watcher.observe.logs import REDACTOR

__all__ = ["EX_CONFIG", "cli"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="oxen-watcher")
def cli() -> None:
    """Watch Oxen Hub fine-tunes for new checkpoints and deployment changes."""


@cli.command()
@config_option
def run(config_path: str) -> None:
    """Run the daemon until SIGTERM or SIGINT; SIGHUP reloads the configuration."""
    take_early_signals()  # the entry point took them already; here for `cli` called directly (tests)
    config = load(config_path)
    secrets = resolve_secrets(config)
    setup_logging(config)
    _serve(config, secrets, config_path=config_path)


def _serve(config: Config, secrets: Any, *, config_path: str | None = None, on_started: Any = None) -> None:
    from watcher.daemon.app import App

    async def main() -> None:
        if STOP_PENDING:  # stopped during start-up: nothing to drain yet
            return
        try:
            app = App(config, secrets, config_path=config_path, reload_requested=lambda: bool(HUP_PENDING))
        except StoreError as err:
            fail(str(err), 1)
        loop = asyncio.get_running_loop()
        if on_started is not None:
            loop.call_later(1.0, on_started, app)
        # runs once app.run() has given the signals to the loop (its first lines): a stop request remembered
        # until then stops it; one that arrives later goes to the loop's handler
        loop.call_soon(lambda: app.stop.set() if STOP_PENDING else None)
        await app.run()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
    except OSError as err:  # e.g. the [http] listen address is taken
        fail(f"cannot start: {err}", 1)


@cli.command()
@config_option
@click.option("--dry-run", is_flag=True, help="Print the events it would emit as JSON lines; change nothing.")
def once(config_path: str, dry_run: bool) -> None:
    """Poll every fine-tune once, commit, deliver, and exit 0 when every poll answered 200 (1 otherwise)."""
    config = load(config_path)
    secrets = resolve_secrets(config)
    setup_logging(config)
    sinks = [lambda event: json_line(event.envelope())] if dry_run else []
    watcher, dispatcher, leases = make_runtime(config, secrets, readonly=dry_run, sinks=sinks)
    from watcher.daemon.lifecycle_jobs import LifecycleJobs

    lifecycle = LifecycleJobs(watcher)

    async def main() -> list[Any]:
        try:
            await watcher.load()
            await lifecycle.once()  # sources and statuses first: what they find is polled too
            reports = await watcher.poll_all()
            if not dry_run and dispatcher.notifiers:
                await _deliver_once(config, dispatcher, leases)
            return reports
        finally:
            await dispatcher.aclose()
            await watcher.aclose()
            if leases is not None:
                try:
                    # release what it claimed (the replicas take them over at once), off the loop's thread
                    await asyncio.to_thread(leases.leave)
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


async def _deliver_once(config: Config, dispatcher: Any, claim: Any) -> None:
    from watcher.store import DispatchLock

    if config.state.postgresql:  # the lanes of the fine-tunes it claimed, and only those
        if claim is not None:  # each send is fenced by its lease: extended first, polling may have outlasted it
            try:
                await asyncio.to_thread(claim.renew)
            except StoreError as err:
                click.echo(f"oxen-watcher: {err} (deliveries left to the replicas)", err=True)
                return
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
    from watcher.core.models import outcome_of

    if report.result is None:
        return "skipped"
    return outcome_of(report.result) if report.error is None else "not-committed"


@cli.command("test-notify")
@config_option
@click.option("--notifier", "only", metavar="NAME", help="Only this notifier.")
def test_notify(config_path: str, only: str | None) -> None:
    """Send a clearly marked test event (type watcher.test) to each notifier now; print OK or the error."""
    import time

    from watcher.core.events import new_event_id
    from watcher.core.models import WATCHER_TEST
    from watcher.daemon.app import ref_of
    from watcher.delivery.notifiers import build_notifiers

    config = load(config_path)
    secrets = resolve_secrets(config).notifiers
    setup_logging(config)
    names = [entry.name for entry in config.notifiers]
    if only is not None and only not in names:
        fail(f"no notifier named {only!r} (configured: {', '.join(names) or 'none'})", 2)
    if not names:
        fail("no [[notifiers]] configured", 2)
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


@cli.command("check-config")
@config_option
def check_config(config_path: str) -> None:
    """Validate the configuration (and resolve its secrets); exit 0, or 78 naming the bad key."""
    config = load(config_path)
    resolve_secrets(config)
    state_url_of(config)
    click.echo(
        f"{config.source}: OK ({len(config.fine_tunes)} fine-tunes, {len(config.notifiers)} notifiers, "
        f"{config.state.kind} store)"
    )


@cli.command()
def demo() -> None:
    """Watch a simulated Hub whose fine-tunes keep training; prints each event until Ctrl-C."""
    from watcher.cli.demo import DEMO_TOKEN, DEMO_WEBHOOK_URL, DemoTrainer, demo_config
    from watcher.testing.simhub import SimHub

    with tempfile.TemporaryDirectory(prefix="oxen-watcher-demo-") as folder, SimHub(token=DEMO_TOKEN) as hub:
        trainer = DemoTrainer(hub)
        trainer.seed()
        config = parse_config(demo_config(hub, Path(folder)), source="<demo>", directory=Path(folder))
        secrets = resolve_secrets(config)
        setup_logging(config)
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


cli.add_command(redeliver)
cli.add_command(prune)
cli.add_command(status)
cli.add_command(events)
