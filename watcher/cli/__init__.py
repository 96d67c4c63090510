"""cli: the `oxen-watcher` command line; its entry point takes the stop and reload signals before the slow imports."""

from __future__ import annotations

import signal
import sys
from typing import Any

# a SIGTERM and a SIGHUP that arrived before the daemon's event loop took the signals
STOP_PENDING: list[bool] = []
HUP_PENDING: list[bool] = []


def remember_stop(signum: int, frame: Any) -> None:
    """A stop request before the daemon's event loop takes the signals: the daemon stops as soon as it can."""
    STOP_PENDING.append(True)


def remember_hup(signum: int, frame: Any) -> None:
    """A reload request before the daemon's event loop takes the signals: applied once it has started."""
    HUP_PENDING.append(True)


def take_early_signals() -> None:
    """Until the event loop takes over the signals, remember a stop or reload request (the default actions of
    SIGTERM and SIGHUP kill the process). Remembered, not acted on at once: an exit raised in the middle of an
    import can crash the interpreter (measured: SIGSEGV when it lands while orjson's extension loads)."""
    signal.signal(signal.SIGTERM, remember_stop)
    signal.signal(signal.SIGHUP, remember_hup)


def main() -> None:
    """Console-script entry point."""
    # `run` takes the signals before importing the command line (about half a second of imports): a SIGTERM
    # right after a start then exits 0 as it does later, instead of killing the process by the default action
    if sys.argv[1:2] == ["run"]:
        take_early_signals()
    from watcher.cli.main import cli

    cli()
