"""Shared fixtures: the simulated Hub on 127.0.0.1, config files, the real daemon process, deadline waits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from watcher.testing.simhub import SimHub

# the throwaway PostgreSQL cluster (`pg_cluster`, session) and a fresh database per test (`pg_url`)
pytest_plugins = ["pgcluster"]

T = TypeVar("T")
TOKEN = "simhub-token"
ROOT = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], T], *, timeout: float = 20.0, interval: float = 0.05, what: str = "") -> T:
    """Poll `condition` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(interval)


def toml_value(value: Any) -> str:
    """A TOML literal for a Python value (enough for test configs)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return orjson.dumps(value).decode()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def write_config(path: Path, data: dict[str, Any]) -> Path:
    """Write a config dict (tables and arrays of tables) as TOML."""
    lines: list[str] = []
    for section, body in data.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{section}]]")
                lines.extend(f"{k} = {toml_value(v)}" for k, v in item.items())
                lines.append("")
        else:
            lines.append(f"[{section}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in body.items())
            lines.append("")
    path.write_text("\n".join(lines))
    return path


@pytest.fixture
def hub() -> Iterator[SimHub]:
    """A running simulated Hub."""
    with SimHub(token=TOKEN) as simulated:
        yield simulated


def base_config(hub: SimHub, tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A fast-polling config against the simulated Hub, state in tmp_path; sections override keys."""
    config: dict[str, Any] = {
        "hub": {"url": hub.url, "token": TOKEN, "timeout_s": 5},
        "watch": {"interval_s": 0.5, "jitter_s": 0, "failure_threshold": 3, "shutdown_grace_s": 5},
        "state": {"path": str(tmp_path / "watcher.db")},
        "http": {"listen": "127.0.0.1:0"},
        "log": {"level": "info", "format": "json"},
        "fine_tunes": [],
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            config[section] = {**config.get(section, {}), **values}
        else:
            config[section] = values
    return config


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `python -m watcher ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "watcher", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


class Daemon:
    """The real `oxen-watcher run` process, its output captured to files."""

    def __init__(self, config: Path, *, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = env
        self.stdout = config.with_suffix(".stdout.log")
        self.stderr = config.with_suffix(".stderr.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self.offset = 0

    def start(self) -> Daemon:
        """Start the daemon (logs() then reads only what this run writes)."""
        self.offset = self.stderr.stat().st_size if self.stderr.exists() else 0
        out = self.stdout.open("ab")
        err = self.stderr.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watcher", "run", "-c", str(self.config)],
            stdout=out,
            stderr=err,
            env={**os.environ, **(self.env or {})},
            cwd=ROOT,
        )
        out.close()
        err.close()
        return self

    def kill9(self) -> None:
        """SIGKILL: no chance to clean up."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait for the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def logs(self) -> list[dict[str, Any]]:
        """The JSON log lines this run wrote so far."""
        found = []
        for line in self.stderr.read_bytes()[self.offset :].splitlines():
            try:
                found.append(orjson.loads(line))
            except orjson.JSONDecodeError:
                continue
        return found

    def output(self) -> str:
        """Everything the daemon printed so far."""
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")


@pytest.fixture
def daemons() -> Iterator[Callable[..., Daemon]]:
    """A factory of daemons that are all stopped at the end of the test."""
    started: list[Daemon] = []

    def make(config: Path, **kwargs: Any) -> Daemon:
        daemon = Daemon(config, **kwargs).start()
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)
